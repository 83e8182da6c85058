//! `derm phantom`: draws procedural dermoscopy phantoms with exact ground truth into a folder
//! that loads like any data set.

use std::path::PathBuf;

use anyhow::Context;
use derm_data::phantom::{write_phantom_set_with, PhantomConfig};

use crate::GlobalOpts;

/// Arguments of `derm phantom` (the seed is the global `--seed`).
#[derive(Debug, clap::Args)]
pub struct PhantomArgs {
    /// Number of phantoms.
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    /// Output folder (images/, clean/, masks/, occlusion/, labels.csv, manifest.toml).
    #[arg(long)]
    pub out: PathBuf,
    /// Equal class frequencies instead of ISIC 2017's 374 : 254 : 1372.
    #[arg(long, conflicts_with = "weights")]
    pub balanced: bool,
    /// Relative class frequencies: melanoma,seborrheic_keratosis,nevus.
    #[arg(long, value_delimiter = ',', num_args = 3)]
    pub weights: Option<Vec<f64>>,
    /// Probability that a phantom has hairs.
    #[arg(long)]
    pub hair_probability: Option<f64>,
    /// Probability of a ruler.
    #[arg(long)]
    pub ruler_probability: Option<f64>,
    /// Probability of an ink mark.
    #[arg(long)]
    pub ink_probability: Option<f64>,
}

impl PhantomArgs {
    /// Draws and writes the phantoms.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let mut cfg = if self.balanced { PhantomConfig::balanced() } else { PhantomConfig::default() };
        cfg.size = self.size;
        if let Some(w) = &self.weights {
            cfg.class_weights = w.clone();
        }
        if let Some(p) = self.hair_probability {
            cfg.hair_probability = p;
        }
        if let Some(p) = self.ruler_probability {
            cfg.ruler_probability = p;
        }
        if let Some(p) = self.ink_probability {
            cfg.ink_probability = p;
        }
        cfg.validate()?;
        let bar = crate::progress::bar(self.count as u64, "phantoms", g.quiet);
        let start = std::time::Instant::now();
        let manifest =
            write_phantom_set_with(&self.out, &cfg, g.seed, self.count, &|done| bar.set_position(done as u64))
                .with_context(|| format!("writing phantoms to {}", self.out.display()))?;
        bar.finish_and_clear();
        if !g.quiet {
            eprintln!(
                "wrote {} phantoms ({}x{}, seed {}) to {} in {:.1}s; manifest {}",
                self.count,
                self.size,
                self.size,
                g.seed,
                self.out.display(),
                start.elapsed().as_secs_f64(),
                manifest.display()
            );
        }
        Ok(())
    }
}
