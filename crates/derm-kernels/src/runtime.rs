//! Process-wide settings that make CPU training fast.
//!
//! candle allocates a fresh buffer for every op's output. With glibc's defaults, buffers larger
//! than the (dynamic, at most 32 MiB) mmap threshold are mapped from the kernel and unmapped when
//! freed, so every large activation of a training step is page-faulted and zeroed again: on the
//! 2-core benchmark machine that was a quarter of a U-Net training step. [`tune_allocator`] raises
//! the mmap and trim thresholds so freed buffers stay in the heap and are reused. Binaries call it
//! once at start (the `derm` CLI and `xtask` do); it is a no-op on other platforms.

/// Keeps large freed buffers in the heap for reuse (glibc on Linux); returns whether the settings
/// were applied. `DERM_MALLOC_TUNE=0` in the environment leaves glibc's defaults (for comparison).
pub fn tune_allocator() -> bool {
    if std::env::var("DERM_MALLOC_TUNE").is_ok_and(|v| v == "0") {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called before heavy work.
        unsafe {
            // Allocations up to 1 GiB come from the heap, and free memory at the top of the heap
            // is never returned to the kernel (-1 disables trimming, as mallopt(3) documents).
            let a = libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            let b = libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
            a == 1 && b == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn allocator_settings_apply_on_glibc() {
        let applied = super::tune_allocator();
        assert_eq!(applied, cfg!(all(target_os = "linux", target_env = "gnu")));
        // Large allocations still work afterwards.
        let v = vec![1u8; 64 << 20];
        assert_eq!(v[v.len() - 1], 1);
    }
}
