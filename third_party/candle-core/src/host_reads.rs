//! derm patch: a per-thread count of the calls that bring tensor data to the host.
//!
//! Every `to_scalar`, `to_vec1`, `to_vec2` and `to_vec3` adds one, whatever device the tensor is
//! on, and so does every `to_device(&Device::Cpu)` of a tensor on another device. On a GPU each
//! of these is a synchronising copy; on the CPU a read is free, but counting it there too lets a
//! test run a training step on the CPU and prove that it would make no copy on a GPU. (A
//! `to_device(&Device::Cpu)` of a CPU tensor is not counted: candle itself moves every scalar
//! operand with `to_device`, an upload on a GPU, which on the CPU looks the same.)

use std::cell::Cell;

thread_local! {
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

/// Host reads made by this thread so far.
pub fn count() -> u64 {
    COUNT.with(|c| c.get())
}

/// Records one host read (also for callers outside candle that read tensor storage directly).
/// With `DERM_TRACE_HOST_READS=1` in the environment, each one also prints a backtrace to stderr
/// (to find the read that a transfer-count test reports).
pub fn note() {
    COUNT.with(|c| c.set(c.get() + 1));
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *TRACE.get_or_init(|| std::env::var_os("DERM_TRACE_HOST_READS").is_some_and(|v| v == "1")) {
        eprintln!("host read:\n{}", std::backtrace::Backtrace::force_capture());
    }
}
