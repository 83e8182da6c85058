//! `derm hair eval`: the real-image hair benchmark ([`derm_hair::bench`]).
//!
//! Selects the hair-free images of an ISIC 2017 folder with the rule written in
//! [`derm_hair::bench`], paints artificial hairs on them (seeded), runs the hair mask and the
//! cleaning, and writes `summary.json` into `--out` with mask recall, precision and IoU (overall
//! and on the lesion), the share of lesion and image pixels marked on the unpainted images, and
//! PSNR/SSIM of the cleaned images against the originals. `--export DIR` also writes the painted
//! images and their ground truth, so another method can run on exactly the same images; `--score
//! PRED` then scores that method's outputs (`<id>_mask.png`, `<id>_clean.png`,
//! `<id>_free_mask.png`) instead of running derm.

use std::path::PathBuf;

use anyhow::{bail, Context};
use derm_hair::bench::{
    read_isic2017, run_derm, run_derm_with, score_dir, select_hair_free, BenchConfig, BenchSummary, Detector,
};
use derm_hair::paint::PaintConfig;
use derm_hair::HairConfig;
use serde::Serialize;

use crate::GlobalOpts;

/// Subcommands of `derm hair`.
#[derive(Debug, clap::Subcommand)]
pub enum HairCommand {
    /// The real-image benchmark: artificial hairs on hair-free ISIC 2017 images.
    Eval(HairEvalArgs),
}

impl HairCommand {
    /// Runs the subcommand.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        match self {
            HairCommand::Eval(a) => a.run(g),
        }
    }
}

/// Arguments of `derm hair eval` (the global `--seed` seeds the painting).
#[derive(Debug, clap::Args)]
pub struct HairEvalArgs {
    /// Data set folder (the official ISIC 2017 layout).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Layout of `--root`; only isic2017.
    #[arg(long, default_value = "isic2017", value_parser = ["isic2017"])]
    pub manifest: String,
    /// Output folder for `summary.json`.
    #[arg(long)]
    pub out: PathBuf,
    /// Side (px) the images are enlarged to before painting (256: as they are).
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    /// At most this many hair-free images (the first by id).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Also paint this many air bubbles per image (white rims, 3-20 px at 256 px); their rims
    /// count as occlusion with the hairs.
    #[arg(long, default_value_t = 0)]
    pub bubbles: usize,
    /// Also paint this many violet ink marks per image (a marker's dots and strokes); they count
    /// as occlusion with the hairs.
    #[arg(long, default_value_t = 0)]
    pub ink: usize,
    /// Also run the detector before issue 18 (`legacy_hair_mask`) and report both.
    #[arg(long)]
    pub legacy: bool,
    /// A JSON file with a `HairConfig`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Write the painted images and ground truth here (`<id>_painted.png`, `_hair`, `_touched`,
    /// `_orig`, `_lesion`).
    #[arg(long)]
    pub export: Option<PathBuf>,
    /// Score another method's outputs in this folder against `--export` instead of running derm.
    #[arg(long, requires = "export")]
    pub score: Option<PathBuf>,
    /// A trained purifier (run or checkpoint folder, `derm purify train`): also fill derm's masks
    /// with it and report that cleaning as `purifier` (train it on images the benchmark does not
    /// use: `derm purify train --ids`).
    #[arg(long)]
    pub purifier: Option<PathBuf>,
}

/// What `summary.json` holds.
#[derive(Debug, Serialize)]
struct Summary {
    manifest: String,
    seed: u64,
    size: u32,
    /// Hair-free images selected (before `--limit`).
    hair_free_selected: usize,
    images: usize,
    rule: String,
    config: HairConfig,
    paint: PaintConfig,
    derm: Option<BenchSummary>,
    legacy: Option<BenchSummary>,
    scored: Option<BenchSummary>,
    /// derm's masks filled by the purifier of `--purifier` (mask numbers as `derm`).
    purifier: Option<BenchSummary>,
}

impl HairEvalArgs {
    /// Runs the benchmark.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        derm_core::fsutil::create_dir_all(&self.out)?;
        if let Some(pred) = &self.score {
            let export = self.export.as_ref().context("--score needs --export")?;
            let t = score_dir(export, pred)?;
            let s = t.summary();
            derm_core::fsutil::write_json(&self.out.join("summary.json"), &s)?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            return Ok(());
        }
        let Some(root) = &self.root else { bail!("--root is required (or --export with --score)") };
        let cfg: HairConfig = match &self.config {
            Some(p) => derm_core::fsutil::read_json(p)?,
            None => HairConfig::default(),
        };
        cfg.validate()?;
        let all = read_isic2017(root, None)?;
        let mut free = select_hair_free(all);
        let selected = free.len();
        if let Some(k) = self.limit {
            free.truncate(k);
        }
        if free.is_empty() {
            bail!("no hair-free images selected under {}", root.display());
        }
        let seed = g.seed; // the global --seed: the painting's seed
        let paint = PaintConfig { bubbles: self.bubbles, ink: self.ink, ..PaintConfig::default() };
        let bench = BenchConfig { seed, size: self.size, paint, export: self.export.clone() };
        let purifier = match &self.purifier {
            Some(p) => Some(derm_purify::Purifier::load(p, &g.device()?)?),
            None => None,
        };
        let fill;
        let filler: Option<derm_hair::bench::Filler> = match &purifier {
            Some(model) => {
                fill = |img: &image::RgbImage, hole: &image::GrayImage| derm_purify::purify_image(model, img, hole);
                Some(&fill)
            }
            None => None,
        };
        let (derm, by_purifier) = run_derm_with(&free, &bench, &cfg, Detector::Current, filler)?;
        let (derm, by_purifier) = (derm.summary(), by_purifier.map(|t| t.summary()));
        let legacy = if self.legacy {
            let b = BenchConfig { export: None, ..bench.clone() };
            Some(run_derm(&free, &b, &cfg, Detector::Legacy)?.summary())
        } else {
            None
        };
        let summary = Summary {
            manifest: self.manifest.clone(),
            seed,
            size: self.size,
            hair_free_selected: selected,
            images: free.len(),
            rule: derm_hair::bench::RULE.to_string(),
            config: cfg,
            paint: bench.paint.clone(),
            derm: Some(derm),
            legacy,
            scored: None,
            purifier: by_purifier,
        };
        derm_core::fsutil::write_json(&self.out.join("summary.json"), &summary)?;
        if !g.quiet {
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
        Ok(())
    }
}
