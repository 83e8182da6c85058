//! Seeded byte mutations for the loaders' property tests and fuzz targets.
//!
//! Every loader that reads user files (images, manifests, label tables, checkpoint JSON,
//! safetensors) is run on mutations of valid inputs in the normal test run (bounded, seeded, so a
//! failure replays), and the same loaders are cargo-fuzz targets (`fuzz/`). A loader may reject
//! any input with an error; it must never panic.

use crate::Rng;

/// Values that often sit on a parser's edge (lengths, markers, sign bits).
const INTERESTING: &[u8] = &[0x00, 0x01, 0x7F, 0x80, 0xFF, 0xFE, 0x10, 0x20, 0x40, 0xD8, 0xD9, 0xDA];

/// One to four mutations of `seed`: bit flips, byte sets, interesting bytes, inserted or deleted
/// runs, a duplicated slice, a truncation, a spliced 32-bit extreme, or (rarely) random bytes.
pub fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    if rng.below(50) == 0 {
        let n = rng.below(256);
        return (0..n).map(|_| rng.below(256) as u8).collect();
    }
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        if len == 0 {
            v.push(rng.below(256) as u8);
            continue;
        }
        let at = rng.below(len);
        match rng.below(9) {
            0 => v[at] ^= 1 << rng.below(8),
            1 => v[at] = rng.below(256) as u8,
            2 => v[at] = INTERESTING[rng.below(INTERESTING.len())],
            3 => {
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.below(256) as u8).collect();
                v.splice(at..at, bytes);
            }
            4 => {
                let end = (at + 1 + rng.below(64)).min(len);
                v.drain(at..end);
            }
            5 => {
                let end = (at + 1 + rng.below(64)).min(len);
                let chunk = v[at..end].to_vec();
                let to = rng.below(v.len());
                v.splice(to..to, chunk);
            }
            6 => v.truncate(at),
            7 => {
                let word = [u32::MAX, 0, 0x7FFF_FFFF, 0x8000_0000, 65535, 65536][rng.below(6)];
                for (i, b) in word.to_be_bytes().iter().enumerate() {
                    if let Some(x) = v.get_mut(at + i) {
                        *x = *b;
                    }
                }
            }
            _ => {
                let ascii = [b'"', b',', b'\n', b'[', b']', b'{', b'}', b'=', b'\\', b'-', b'9', b'e'];
                v[at] = ascii[rng.below(ascii.len())];
            }
        }
    }
    v
}

/// Runs `f` on `cases` mutations of the `seeds` (round robin) and returns the ones that panicked
/// (case number and the panic message). `f`'s errors are fine; its panics are the bugs.
pub fn panics(seeds: &[Vec<u8>], cases: usize, rng_seed: u64, f: impl Fn(&[u8])) -> Vec<(usize, String)> {
    let mut rng = Rng::new(rng_seed);
    let mut found = Vec::new();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for case in 0..cases {
        let input = mutate(&seeds[case % seeds.len()], &mut rng);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&input)));
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            found.push((case, msg));
        }
    }
    std::panic::set_hook(hook);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_seeded_and_change_the_input() {
        let seed = b"name = \"x\"\n[[split]]\nimages = \"{id}.png\"\n".to_vec();
        let a: Vec<Vec<u8>> = (0..20).map(|i| mutate(&seed, &mut Rng::new(i))).collect();
        let b: Vec<Vec<u8>> = (0..20).map(|i| mutate(&seed, &mut Rng::new(i))).collect();
        assert_eq!(a, b);
        assert!(a.iter().filter(|m| **m != seed).count() >= 18);
        let found = panics(&[seed], 50, 1, |bytes| {
            if bytes.len() % 7 == 3 {
                panic!("boom {}", bytes.len());
            }
        });
        assert!(!found.is_empty() && found[0].1.starts_with("boom"), "{found:?}");
    }
}
