//! Calls into the operating system and into dynamically loaded libraries that need `unsafe`,
//! kept here so that every other derm crate can forbid `unsafe` code.

/// Checks, without panicking, that the libraries candle's CUDA device loads at run time
/// (cudarc's dynamic loading) can be found: the driver's `libcuda.so` and the toolkit's cuBLAS,
/// cuBLASLt and cuRAND.
#[cfg(feature = "cuda")]
pub fn cuda_libraries_present() -> std::result::Result<(), String> {
    use candle_core::cuda_backend::cudarc;
    // SAFETY: each only tries to dlopen the library by its usual names and closes it again.
    let (driver, cublas, cublaslt, curand) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
            cudarc::cublaslt::sys::is_culib_present(),
            cudarc::curand::sys::is_culib_present(),
        )
    };
    if !driver {
        return Err("no NVIDIA driver found: libcuda.so (libcuda.so.1) could not be loaded. Install the NVIDIA \
                    driver (one supporting CUDA 13.x, R580 or newer) on a machine with an NVIDIA GPU"
            .into());
    }
    let missing: Vec<&str> =
        [(cublas, "libcublas.so.13"), (cublaslt, "libcublasLt.so.13"), (curand, "libcurand.so.10")]
            .into_iter()
            .filter(|(ok, _)| !ok)
            .map(|(_, name)| name)
            .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the NVIDIA driver is present but the CUDA 13 libraries {} could not be loaded; \
             run `eval \"$(scripts/cuda-env.sh)\"` (it sets LD_LIBRARY_PATH) or install the CUDA 13 toolkit",
            missing.join(", ")
        ));
    }
    Ok(())
}

/// Makes the child that `cmd` starts receive SIGKILL when this process dies (Linux; elsewhere a
/// no-op): a parent killed with SIGKILL must not leave a child training on into a folder that a
/// resumed run will write.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl with PR_SET_PDEATHSIG only sets a flag of the calling (child) process and
        // is async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}
