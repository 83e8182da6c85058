//! Device choice: `cpu`, `cuda[:N]` or `metal`, parsed into a [`candle_core::Device`].
//!
//! Asking for a device whose cargo feature is off is an error, never a silent fall-back to the CPU.

use candle_core::Device;

use crate::{Error, Result};

/// A device as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DeviceSpec {
    /// The CPU (always available).
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (feature `cuda`).
    Cuda(usize),
    /// The Metal GPU (feature `metal`).
    Metal,
}

impl std::str::FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "metal" => Ok(DeviceSpec::Metal),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => {
                if let Some(n) = t.strip_prefix("cuda:") {
                    n.parse().map(DeviceSpec::Cuda).map_err(|_| Error::Device {
                        spec: s.into(),
                        msg: "expected cuda:N with N a GPU ordinal".into(),
                    })
                } else {
                    Err(Error::Device { spec: s.into(), msg: "unknown device; use cpu, cuda, cuda:N or metal".into() })
                }
            }
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Metal => write!(f, "metal"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device, or says why it cannot be had in this build.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(Error::Device {
                        spec: self.to_string(),
                        msg: "this build has no CUDA support; rebuild with `--features cuda`".into(),
                    });
                }
                #[cfg(feature = "cuda")]
                derm_kernels::sys::cuda_libraries_present()
                    .map_err(|msg| Error::Device { spec: self.to_string(), msg })?;
                // cudarc panics (rather than erring) on a missing library or driver symbol.
                match std::panic::catch_unwind(|| Device::new_cuda(n)) {
                    Ok(r) => r.map_err(|e| Error::Device { spec: self.to_string(), msg: e.to_string() }),
                    Err(_) => Err(Error::Device {
                        spec: self.to_string(),
                        msg: "the CUDA libraries failed to load (see the message above); the NVIDIA driver must \
                              support CUDA 13.x (R580 or newer)"
                            .into(),
                    }),
                }
            }
            DeviceSpec::Metal => {
                if !cfg!(feature = "metal") {
                    return Err(Error::Device {
                        spec: self.to_string(),
                        msg: "this build has no Metal support; rebuild with `--features metal`".into(),
                    });
                }
                Device::new_metal(0).map_err(|e| Error::Device { spec: self.to_string(), msg: e.to_string() })
            }
        }
    }
}

/// Parses and opens a device in one go.
pub fn parse_device(s: &str) -> Result<Device> {
    s.parse::<DeviceSpec>()?.open()
}

/// The device-related cargo features this build was made with.
pub fn enabled_features() -> Vec<&'static str> {
    let mut v = vec!["cpu"];
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    if cfg!(feature = "metal") {
        v.push("metal");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_clearly() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
        assert!(parse_device("cpu").unwrap().is_cpu());
        let e = "tpu".parse::<DeviceSpec>().unwrap_err().to_string();
        assert!(e.contains("tpu") && e.contains("unknown device"), "{e}");
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        if !cfg!(feature = "cuda") {
            let e = parse_device("cuda").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
        if !cfg!(feature = "metal") {
            assert!(parse_device("metal").is_err());
        }
    }
}
