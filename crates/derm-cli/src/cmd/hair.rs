//! `derm hair`: find hairs, rulers and ink marks, and remove them with classic inpainting.
//!
//! For each input image `<id>.<ext>` writes `<id>_occlusion.png` (0/255) and `<id>_clean.png`
//! into `--out`, and `summary.json` with the masked fraction of every image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use derm_core::image_io::{is_image_path, load_mask, load_rgb, save_png};
use derm_data::handoff;
use derm_hair::{HairConfig, HairDetector, HairSummary, InpaintMethod};
use rayon::prelude::*;
use serde::Serialize;

use crate::GlobalOpts;

/// Arguments of `derm hair` (or `derm hair eval ...`, [`super::hair_eval`]).
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct HairArgs {
    #[command(subcommand)]
    pub command: Option<super::hair_eval::HairCommand>,
    /// An image, or a folder of images (not searched recursively).
    #[arg(long, required = true)]
    pub input: Option<PathBuf>,
    /// Output folder for `<id>_occlusion.png`, `<id>_clean.png` and `summary.json`.
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    /// Folder of lesion masks, matched by id: `<id>_segmentation.png`, `<id>.png` or
    /// `<id>_lesion.png`. The lesion then gets its own hair threshold (the legacy detector keeps
    /// its dark texture out of the occlusion mask).
    #[arg(long)]
    pub lesion_masks: Option<PathBuf>,
    /// Short side (px) at which the detection sizes are defined (default 256).
    #[arg(long)]
    pub size_ref: Option<u32>,
    /// A JSON file with a `HairConfig` (unknown fields are errors); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Inpainting method: telea or harmonic.
    #[arg(long, value_parser = ["telea", "harmonic"])]
    pub inpaint: Option<String>,
    /// Hair detector: oriented (the default) or legacy (the detector before issue 18).
    #[arg(long, value_parser = ["oriented", "legacy"])]
    pub detector: Option<String>,
    /// Do not look for rulers.
    #[arg(long)]
    pub no_rulers: bool,
    /// Do not look for air bubbles (rings with a bright rim; the oriented detector only).
    #[arg(long)]
    pub no_bubbles: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Per-image entry of `summary.json`.
#[derive(Debug, Serialize)]
struct Entry {
    #[serde(flatten)]
    summary: HairSummary,
    occlusion: String,
    clean: String,
}

/// What `summary.json` holds.
#[derive(Debug, Serialize)]
struct Summary {
    config: HairConfig,
    images: usize,
    failed: BTreeMap<String, String>,
    mean_masked_fraction: f64,
    results: BTreeMap<String, Entry>,
}

impl HairArgs {
    pub(crate) fn config(&self) -> anyhow::Result<HairConfig> {
        let mut cfg: HairConfig = super::common::base_config(self.config.as_deref())?;
        if let Some(s) = self.size_ref {
            cfg.size_ref = s;
        }
        if let Some(m) = &self.inpaint {
            cfg.inpaint = InpaintMethod::parse(m).with_context(|| format!("unknown inpainting method {m:?}"))?;
        }
        if let Some(d) = &self.detector {
            cfg.detector = if d == "legacy" { HairDetector::Legacy } else { HairDetector::Oriented };
        }
        if self.no_rulers {
            cfg.rulers = false;
        }
        if self.no_bubbles {
            cfg.bubbles = false;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn inputs(&self, input: &Path) -> anyhow::Result<Vec<PathBuf>> {
        if input.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(input)
                .with_context(|| format!("reading {}", input.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image_path(p))
                .collect();
            v.sort();
            if v.is_empty() {
                bail!("no images (png, jpg, bmp, tif) in {}", input.display());
            }
            Ok(v)
        } else if input.is_file() {
            Ok(vec![input.to_path_buf()])
        } else {
            bail!("{}: no such file or folder", input.display())
        }
    }

    /// Runs detection and inpainting on every input, in parallel.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        if let Some(c) = &self.command {
            return c.run(g);
        }
        let (Some(input), Some(out)) = (&self.input, &self.out) else { bail!("--input and --out are required") };
        let cfg = self.config()?;
        let inputs = self.inputs(input)?;
        if let Some(d) = &self.lesion_masks {
            if !d.is_dir() {
                bail!("--lesion-masks {}: not a folder", d.display());
            }
        }
        derm_core::fsutil::create_dir_all(out)?;
        let pb = crate::progress::bar(inputs.len() as u64, "hair", g.quiet);
        let results: Vec<(String, anyhow::Result<Entry>)> = inputs
            .par_iter()
            .map(|p| {
                let id = image_id(p);
                let r = self.one(p, &id, &cfg, out);
                pb.inc(1);
                (id, r)
            })
            .collect();
        pb.finish_and_clear();
        let mut ok = BTreeMap::new();
        let mut failed = BTreeMap::new();
        for (id, r) in results {
            match r {
                Ok(e) => {
                    ok.insert(id, e);
                }
                Err(e) => {
                    tracing::error!("{id}: {e:#}");
                    failed.insert(id, format!("{e:#}"));
                }
            }
        }
        let mean = if ok.is_empty() {
            0.0
        } else {
            ok.values().map(|e| e.summary.masked_fraction).sum::<f64>() / ok.len() as f64
        };
        let summary = Summary { config: cfg, images: ok.len(), failed, mean_masked_fraction: mean, results: ok };
        derm_core::fsutil::write_json(&out.join("summary.json"), &summary)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else if !g.quiet {
            println!(
                "{} image(s) cleaned into {}, mean masked fraction {:.4}{}",
                summary.images,
                out.display(),
                mean,
                if summary.failed.is_empty() { String::new() } else { format!(", {} failed", summary.failed.len()) }
            );
        }
        if summary.images == 0 {
            bail!("every image failed; see {}", out.join("summary.json").display());
        }
        Ok(())
    }

    fn one(&self, path: &Path, id: &str, cfg: &HairConfig, out: &Path) -> anyhow::Result<Entry> {
        let img = load_rgb(path)?;
        let lesion = match &self.lesion_masks {
            Some(dir) => match handoff::find_mask(dir, id) {
                Some(mp) => Some(load_mask(&mp, Some(img.dimensions()))?),
                None => {
                    tracing::warn!("{id}: no lesion mask in {}; lesion texture may be called hair", dir.display());
                    None
                }
            },
            None => None,
        };
        let res = derm_hair::clean(&img, lesion.as_ref(), cfg).with_context(|| path.display().to_string())?;
        let occlusion = handoff::occlusion(id);
        let clean = handoff::clean(id);
        save_png(&out.join(&occlusion), &res.occlusion)?;
        save_png(&out.join(&clean), &res.clean)?;
        Ok(Entry { summary: res.summary(lesion.is_some()), occlusion, clean })
    }
}

/// The file stem of an image.
fn image_id(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}
