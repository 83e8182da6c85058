//! Opt-in timing of derm's CPU kernels: with `DERM_PROFILE=1` in the environment, every
//! convolution, batch-norm and activation kernel adds its wall time and call count to a
//! process-wide table that [`report`] returns (`cargo xtask bench` prints it per group). Off, a
//! kernel pays one relaxed atomic load.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// 0: not read yet, 1: off, 2: on.
static STATE: AtomicU8 = AtomicU8::new(0);
static TABLE: Mutex<Vec<(&'static str, f64, u64)>> = Mutex::new(Vec::new());

/// Whether kernel timing is on (`DERM_PROFILE` set to anything but `0`).
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("DERM_PROFILE").is_ok_and(|v| v != "0");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        s => s == 2,
    }
}

/// Times its own life when profiling is on.
pub struct Span {
    name: &'static str,
    start: Option<Instant>,
}

/// Starts timing `name` (until the returned guard drops).
pub fn span(name: &'static str) -> Span {
    Span { name, start: enabled().then(Instant::now) }
}

impl Drop for Span {
    fn drop(&mut self) {
        let Some(t) = self.start else { return };
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if let Ok(mut table) = TABLE.lock() {
            match table.iter_mut().find(|e| e.0 == self.name) {
                Some(e) => {
                    e.1 += ms;
                    e.2 += 1;
                }
                None => table.push((self.name, ms, 1)),
            }
        }
    }
}

/// The table so far, (kernel, total ms, calls), slowest first; empties it.
pub fn report() -> Vec<(&'static str, f64, u64)> {
    let mut t = TABLE.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
    t.sort_by(|a, b| b.1.total_cmp(&a.1));
    t
}

#[cfg(test)]
mod tests {
    #[test]
    fn spans_add_up_when_enabled() {
        // The switch is read once per process; force it on for this test binary.
        super::STATE.store(2, std::sync::atomic::Ordering::Relaxed);
        for _ in 0..3 {
            let _s = super::span("test-kernel");
        }
        let r = super::report();
        let row = r.iter().find(|e| e.0 == "test-kernel").expect("recorded");
        assert_eq!(row.2, 3);
        assert!(super::report().iter().all(|e| e.0 != "test-kernel"), "report empties the table");
    }
}
