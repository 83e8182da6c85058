//! `derm info`: version, enabled features and devices.

use crate::GlobalOpts;

/// Arguments of `derm info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl InfoArgs {
    /// Prints what this build can do.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let features = derm_core::device::enabled_features();
        let device = g.device();
        let threads = rayon::current_num_threads();
        if self.json {
            let v = serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "features": features,
                "device": g.device,
                "device_ok": device.is_ok(),
                "threads": threads,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!("derm {}", env!("CARGO_PKG_VERSION"));
            println!("features: {}", features.join(", "));
            println!("cpu threads: {threads}");
            match device {
                Ok(d) => println!("device {}: ok ({:?})", g.device, d.location()),
                Err(e) => println!("device {}: unavailable: {e:#}", g.device),
            }
        }
        Ok(())
    }
}
