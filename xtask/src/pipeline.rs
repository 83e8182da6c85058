//! `cargo xtask pipeline`: placeholder while the stages land.

/// Arguments of `cargo xtask pipeline`.
#[derive(Debug, clap::Args)]
pub struct PipelineArgs {}

impl PipelineArgs {
    /// Runs the pipeline.
    pub fn run(&self) -> anyhow::Result<()> {
        anyhow::bail!("the pipeline is being assembled")
    }
}
