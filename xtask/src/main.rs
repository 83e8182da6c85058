//! `cargo xtask`: developer tasks for derm (the cargo-xtask pattern).
//!
//! - `cargo xtask pipeline`: every stage end to end on phantoms (or a real data set), with a run
//!   folder and `report.html`.
//! - `cargo xtask bench`: benchmarks with the peer's shapes; `--peer` runs the PyTorch peer
//!   interleaved and prints the ratio ours/peer.
//! - `cargo xtask vendor [--check]`: third_party/candle-core from candle-core 0.11.1 + its patch.
//! - `cargo xtask device-check --device cuda`: ops and one training step per network on a GPU
//!   against the CPU kernels (`scripts/gpu-check.sh` runs it with the GPU bench rows).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

mod bench;
mod contract;
mod gpu;
mod peer_models;
mod pipeline;
mod report;
mod vendor;

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "derm developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run every stage end to end and write a report.
    Pipeline(pipeline::PipelineArgs),
    /// Benchmarks with the peer's shapes.
    Bench(bench::BenchArgs),
    /// Rebuild (or --check) third_party/candle-core from crates.io's 0.11.1 and the patch file.
    Vendor(vendor::VendorArgs),
    /// Ops and one training step of each network on a device against the CPU kernels.
    DeviceCheck(gpu::DeviceCheckArgs),
}

/// Formats seconds as `1h02m`, `3m05s` or `12s`.
pub use derm_core::train::format_duration as hms;

/// The workspace root (the parent of this crate's folder).
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(1)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    derm_kernels::runtime::tune_allocator();
    let r = match cli.cmd {
        Cmd::Pipeline(a) => a.run(),
        Cmd::Bench(a) => a.run(),
        Cmd::Vendor(a) => a.run(),
        Cmd::DeviceCheck(a) => a.run(),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
