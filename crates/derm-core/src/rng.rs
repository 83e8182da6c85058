//! The one seeded random generator used everywhere in derm.
//!
//! Every random draw in derm (weight initialisation, data shuffling, augmentation, phantoms, GAN
//! latents) comes from [`Rng`], a xoshiro256++ generator seeded through SplitMix64. The same seed
//! gives the same stream on every platform. Independent streams are made with [`Rng::fork`], so
//! that adding draws in one place does not shift the draws in another.

use serde::{Deserialize, Serialize};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function.
#[inline]
pub fn splitmix_mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Counter-based SplitMix64: the `i`-th value of stream `stream` for `seed`.
///
/// This is the recipe used by the peer reference (bench/peer/peer_bench.py) to make its metric
/// inputs, so that the reference values can be regenerated bit for bit without files.
#[inline]
pub fn splitmix_counter(seed: u64, stream: u64, i: u64) -> u64 {
    splitmix_mix(
        seed.wrapping_add(stream.wrapping_mul(0xD1B5_4A32_D192_ED03))
            .wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN)),
    )
}

/// A seeded xoshiro256++ generator. Cheap to clone; its state serialises, so training can resume
/// with the same stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator for `seed`. Any seed, zero included, gives a well-mixed state.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut s = [0u64; 4];
        for v in &mut s {
            x = x.wrapping_add(GOLDEN);
            *v = splitmix_mix(x);
        }
        Rng { s }
    }

    /// An independent generator for a named purpose, derived from this one's seed state without
    /// advancing it.
    pub fn fork(&self, stream: u64) -> Rng {
        let mix = self.s[0] ^ self.s[1].rotate_left(17) ^ self.s[2].rotate_left(31) ^ self.s[3];
        Rng::new(splitmix_mix(mix ^ splitmix_mix(stream.wrapping_add(GOLDEN))))
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    #[inline]
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, 1) with 24 random bits.
    #[inline]
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Uniform in [lo, hi).
    #[inline]
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }

    /// Uniform integer in [0, n). Returns 0 when `n` is 0.
    #[inline]
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        // Lemire's multiply-shift; the bias is below 2^-64 * n, negligible for our sizes.
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform integer in [lo, hi] (inclusive).
    #[inline]
    pub fn range_inclusive(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below((hi - lo + 1) as usize) as i64
    }

    /// True with probability `p`.
    #[inline]
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.f64() < p
    }

    /// A standard normal draw (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.f64(); // (0, 1]
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A Gamma(`shape`, 1) draw (Marsaglia and Tsang's squeeze method; for `shape` < 1 a draw at
    /// `shape + 1` scaled by `u^(1/shape)`).
    ///
    /// # Panics
    /// If `shape` is not a positive finite number (the method would never return).
    pub fn gamma(&mut self, shape: f64) -> f64 {
        assert!(shape > 0.0 && shape.is_finite(), "gamma shape {shape} is not a positive finite number");
        if shape < 1.0 {
            let u = 1.0 - self.f64(); // (0, 1]
            return self.gamma(shape + 1.0) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = 1.0 + c * x;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            let u = 1.0 - self.f64();
            // The squeeze accepts most draws without a logarithm; it never accepts one the exact
            // test would refuse.
            if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }

    /// A Beta(`a`, `b`) draw in [0, 1], as `X / (X + Y)` of two gamma draws.
    pub fn beta(&mut self, a: f64, b: f64) -> f64 {
        let x = self.gamma(a);
        let y = self.gamma(b);
        if x + y > 0.0 {
            x / (x + y)
        } else {
            // Both underflowed (tiny shapes): the draw sits at an end, each as likely as its shape.
            if self.f64() < a / (a + b) {
                1.0
            } else {
                0.0
            }
        }
    }

    /// `n` draws from N(mean, std^2) as f32.
    pub fn normal_vec(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        (0..n).map(|_| mean + std * self.normal() as f32).collect()
    }

    /// `n` draws from U(lo, hi) as f32.
    pub fn uniform_vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * self.f32()).collect()
    }

    /// Fisher-Yates shuffle in place.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i + 1);
            xs.swap(i, j);
        }
    }

    /// A random permutation of 0..n.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        self.shuffle(&mut p);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sample mean and variance of `n` draws.
    fn moments(n: usize, mut draw: impl FnMut() -> f64) -> (f64, f64) {
        let xs: Vec<f64> = (0..n).map(|_| draw()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        (mean, xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64)
    }

    #[test]
    fn gamma_and_beta_draws_have_their_means_and_variances() {
        let n = 100_000;
        // Tolerances: five standard errors for the means; for the variances 10 % (gamma, at least
        // five standard errors of a sample variance at shape 0.2) and 5 % (beta; a Beta(0.2, 0.2)
        // drawn without the small-shape boost is off by more than half).
        for k in [0.2, 1.0, 3.5] {
            let mut r = Rng::new(11);
            let (mean, var) = moments(n, || r.gamma(k));
            assert!((mean - k).abs() < 5.0 * (k / n as f64).sqrt(), "Gamma({k}) mean {mean}");
            assert!((var - k).abs() < 0.1 * k, "Gamma({k}) variance {var}");
        }
        for (a, b) in [(0.2f64, 0.2f64), (1.0, 1.0), (2.0, 5.0)] {
            let mut r = Rng::new(3);
            let (m, v) = (a / (a + b), a * b / ((a + b).powi(2) * (a + b + 1.0)));
            let (mean, var) = moments(n, || {
                let x = r.beta(a, b);
                assert!((0.0..=1.0).contains(&x), "Beta({a}, {b}) drew {x}");
                x
            });
            assert!((mean - m).abs() < 5.0 * (v / n as f64).sqrt(), "Beta({a}, {b}) mean {mean} vs {m}");
            assert!((var - v).abs() < 0.05 * v, "Beta({a}, {b}) variance {var} vs {v}");
        }
    }

    #[test]
    fn same_seed_same_stream_and_forks_differ() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xa: Vec<u64> = (0..16).map(|_| a.next_u64()).collect();
        let xb: Vec<u64> = (0..16).map(|_| b.next_u64()).collect();
        assert_eq!(xa, xb);
        let mut c = Rng::new(8);
        assert_ne!(xa[0], c.next_u64());
        let mut f1 = a.fork(1);
        let mut f2 = a.fork(2);
        assert_ne!(f1.next_u64(), f2.next_u64());
    }

    #[test]
    fn peer_counter_stream_matches_reference() {
        // Values printed by bench/peer/peer_bench.py metrics (seed 0, stream 1).
        assert_eq!(splitmix_counter(0, 1, 0), 0x2d0f28c7e7e786b2);
        assert_eq!(splitmix_counter(0, 1, 1), 0x75856f745165f252);
        assert_eq!(splitmix_counter(0, 1, 2), 0x8674bbc2735955af);
    }

    #[test]
    fn distributions_have_expected_moments() {
        let mut r = Rng::new(3);
        let n = 20000;
        let u: f64 = (0..n).map(|_| r.f64()).sum::<f64>() / n as f64;
        assert!((u - 0.5).abs() < 0.01, "uniform mean {u}");
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let m = xs.iter().sum::<f64>() / n as f64;
        let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n as f64;
        assert!(m.abs() < 0.03 && (v - 1.0).abs() < 0.05, "normal mean {m} var {v}");
        let mut counts = [0usize; 5];
        for _ in 0..n {
            counts[r.below(5)] += 1;
        }
        assert!(counts.iter().all(|&c| (c as f64 - 4000.0).abs() < 250.0), "{counts:?}");
        let p = r.permutation(10);
        let mut s = p.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
    }
}
