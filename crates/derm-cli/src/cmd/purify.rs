//! `derm purify train|run|eval`: occlusion removal with the partial-convolution U-Net.
//!
//! `run` finds the occlusions with derm-hair and fills them with the network; `eval` compares no
//! inpainting, derm-hair's classic inpainting and the network inside the occluded region of
//! phantoms (PSNR and SSIM against the clean phantom), or with `--holes` the classic and the
//! network fill on real images, inside holes borrowed from other images' occlusion masks.

use super::common::{set, set_some};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use derm_core::image_io;
use derm_hair::HairConfig;
use derm_purify::{purify_image, PConvUNetConfig, Purifier, PurifyConfig};
use image::{GrayImage, RgbImage};

use crate::cmd::common::{self, collect_images, StageProgress};
use crate::GlobalOpts;

/// The purification subcommands.
// Parsed once per process: the size of the training arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, clap::Subcommand)]
pub enum PurifyCommand {
    /// Train the inpainting network on clean images with random holes.
    Train(TrainArgs),
    /// Remove hairs and rulers: find them with derm-hair, fill them with the network.
    Run(RunArgs),
    /// Hole PSNR and SSIM on phantoms: no inpainting, classic inpainting, the network.
    Eval(EvalArgs),
}

/// Arguments of `derm purify train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: common::DataArgs,
    #[command(flatten)]
    pub run: common::TrainFlags,
    /// VGG16 ImageNet weights (safetensors with torchvision names `features.N.weight/bias`) for
    /// the perceptual and style losses; without them only the L1 and TV terms are used.
    #[arg(long)]
    pub vgg: Option<PathBuf>,
    /// Network preset: small (CPU), peer (5 layers) or paper (7 layers). [config default: small]
    #[arg(long)]
    pub preset: Option<String>,
    /// Working size in pixels (images are resized to SIZE x SIZE). [config default: 128]
    #[arg(long)]
    pub size: Option<u32>,
    /// Learning rate of the Adam phase. [config default: 2e-4]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Share of the run after which SGD fine-tuning (encoder batch norm frozen) starts; 1 = never. [config default: 0.8]
    #[arg(long)]
    pub finetune_after: Option<f64>,
    /// Learning rate of the fine-tuning phase. [config default: 5e-5]
    #[arg(long)]
    pub finetune_lr: Option<f64>,
    /// Folder of `*_occlusion.png` masks (from `derm hair` on other images) used as training holes.
    #[arg(long)]
    pub hole_masks: Option<PathBuf>,
    /// Folder of `<id>_clean.png` (from `derm hair`) used as targets for real images.
    #[arg(long)]
    pub clean_dir: Option<PathBuf>,
    /// Learn a correction to the classic fill (Telea + harmonic, as `derm hair`) of each hole
    /// instead of the pixels (false: the network paints the hole alone). [config default: true]
    #[arg(long)]
    pub prior_fill: Option<bool>,
    /// A JSON file with derm-hair's `HairConfig` the images are cleaned with: its `inpaint` and
    /// `inpaint_radius` give the classic fill the network corrects. [config default: derm-hair's]
    #[arg(long)]
    pub hair_config: Option<PathBuf>,
}

impl TrainArgs {
    pub(crate) fn config(&self, g: &GlobalOpts) -> anyhow::Result<PurifyConfig> {
        let mut c: PurifyConfig = self.run.base_config()?;
        if let Some(p) = &self.preset {
            c.model = PConvUNetConfig::preset(p)
                .with_context(|| format!("unknown preset {p:?}: use small, peer or paper"))?;
        }
        set(&mut c.size, self.size);
        if let Some(lr) = self.lr {
            c.optim.optimizer.set_lr(lr);
        }
        set(&mut c.finetune_after_fraction, self.finetune_after);
        set(&mut c.finetune_lr, self.finetune_lr);
        set_some(&mut c.vgg_weights, self.vgg.clone());
        set_some(&mut c.hole_masks, self.hole_masks.clone());
        set_some(&mut c.clean_dir, self.clean_dir.clone());
        set(&mut c.prior_fill, self.prior_fill);
        if let Some(p) = &self.hair_config {
            let h = hair_config(Some(p))?;
            (c.prior_method, c.prior_radius) = (h.inpaint, h.inpaint_radius);
        }
        self.run.apply(g, &mut c.train, &mut c.batch_size);
        Ok(c)
    }

    /// Trains and writes the run folder.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let cfg = self.config(g)?;
        let described = cfg.describe();
        if !g.quiet {
            eprintln!("purify: training a {described}");
        }
        let device = g.device()?;
        let data = self.data.open(g.quiet)?;
        let mut progress = StageProgress::new("purify", g.quiet);
        let (task, state) =
            derm_purify::train(cfg, &data, &device, &self.run.out, self.run.resume, &mut |e| progress.event(e))
                .with_context(|| format!("training the purifier into {}", self.run.out.display()))?;
        progress.finish();
        common::write_history(&self.run.out, &state)?;
        let (ntrain, _) = task.sizes();
        println!(
            "trained a {described}: {} steps in {:.1} min on {ntrain} images ({}{}); best validation hole PSNR {} dB at step {}; run folder {}",
            state.step,
            state.elapsed_s / 60.0,
            state.stop_reason.as_deref().unwrap_or("done"),
            if task.finetuning() { ", fine-tuned" } else { "" },
            state.best_metric.map(|v| format!("{v:.2}")).unwrap_or_else(|| "n/a".into()),
            state.best_step.unwrap_or(0),
            self.run.out.display()
        );
        Ok(())
    }
}

/// Arguments of `derm purify run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A trained run folder or checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    /// An image or a folder of images.
    #[arg(long)]
    pub input: PathBuf,
    /// Output folder: `<id>_purified.png` and `<id>_occlusion.png`.
    #[arg(long)]
    pub out: PathBuf,
    /// Folder of lesion masks (`<id>_segmentation.png`, `<id>.png` or `<id>_lesion.png`) that keep
    /// the lesion's own dark texture out of the occlusion mask.
    #[arg(long)]
    pub lesion_masks: Option<PathBuf>,
    /// A JSON file with derm-hair's `HairConfig` for the occlusion finder.
    #[arg(long)]
    pub hair_config: Option<PathBuf>,
}

fn hair_config(p: Option<&Path>) -> anyhow::Result<HairConfig> {
    let cfg: HairConfig = match p {
        Some(p) => derm_core::fsutil::read_json(p)?,
        None => HairConfig::default(),
    };
    cfg.validate()?;
    Ok(cfg)
}

impl RunArgs {
    /// Purifies every image.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let device = g.device()?;
        let model =
            Purifier::load(&self.model, &device).with_context(|| format!("loading {}", self.model.display()))?;
        let hcfg = hair_config(self.hair_config.as_deref())?;
        let files = collect_images(&self.input)?;
        derm_core::fsutil::create_dir_all(&self.out)?;
        let pb = crate::progress::bar(files.len() as u64, "purify", g.quiet);
        let (mut t_hair, mut t_net, mut frac) = (0f64, 0f64, 0f64);
        for f in &files {
            let img = image_io::load_rgb(f)?;
            let id = common::file_id(f);
            let lesion = match &self.lesion_masks {
                Some(dir) => match derm_data::handoff::find_mask(dir, &id) {
                    Some(p) => Some(image_io::load_mask(&p, Some(img.dimensions()))?),
                    None => {
                        tracing::warn!("{id}: no lesion mask in {}", dir.display());
                        None
                    }
                },
                None => None,
            };
            let t0 = Instant::now();
            let hole = derm_hair::hair_mask(&img, lesion.as_ref(), &hcfg).with_context(|| f.display().to_string())?;
            t_hair += t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let out = purify_image(&model, &img, &hole)?;
            t_net += t1.elapsed().as_secs_f64();
            frac += derm_purify::masks::hole_fraction(&hole);
            image_io::save_png(&self.out.join(derm_data::handoff::purified(&id)), &out)?;
            image_io::save_png(&self.out.join(derm_data::handoff::occlusion(&id)), &hole)?;
            pb.inc(1);
        }
        pb.finish_and_clear();
        let n = files.len() as f64;
        println!(
            "purified {} images into {} (mean occluded share {:.4}; {:.0} ms per image finding occlusions, {:.0} ms inpainting)",
            files.len(),
            self.out.display(),
            frac / n,
            1e3 * t_hair / n,
            1e3 * t_net / n
        );
        Ok(())
    }
}

/// Arguments of `derm purify eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// A trained run folder or checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Phantoms (or any set whose samples have `clean` images and `occlusion` masks), or with
    /// `--holes` real images.
    #[command(flatten)]
    pub data: common::DataArgs,
    /// Score real images: each gets a hole shaped like another image's occlusion mask from this
    /// folder (`<id>_occlusion.png` for every image, as `derm hair` writes them; the donor drawn
    /// with `--seed`), less its own occlusions, and the fill is compared with its own pixels there.
    #[arg(long)]
    pub holes: Option<PathBuf>,
    /// Score at SIZE x SIZE (default: the model's working size).
    #[arg(long)]
    pub size: Option<u32>,
    /// Score at each image's own size instead.
    #[arg(long)]
    pub native: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

impl EvalArgs {
    /// Scores the methods: none, classic and the network against clean phantoms, or the last
    /// two inside borrowed holes (`--holes`).
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let device = g.device()?;
        let model = Purifier::load(&self.model, &device)?;
        let data = self.data.open(g.quiet)?;
        if self.holes.is_none()
            && data.samples.iter().all(|s| s.extra("clean").is_none() || s.extra("occlusion").is_none())
        {
            bail!(
                "{} split {} has no clean images with occlusion masks (use a phantom set, or --holes DIR for real images)",
                data.name,
                data.split
            );
        }
        let size = if self.native { None } else { Some(self.size.unwrap_or(model.cfg.size)) };
        let hcfg = HairConfig::default();
        let mut rows = Vec::new();
        // On borrowed holes the unfilled image is blanked there, so "none" has nothing to say.
        let methods: &[&str] =
            if self.holes.is_some() { &["classic", "network"] } else { &["none", "classic", "network"] };
        for &name in methods {
            // Time spent filling, not reading images and masks.
            let (mut n, mut spent) = (0usize, 0f64);
            let mut method = |img: &RgbImage, hole: &GrayImage| {
                let t0 = Instant::now();
                let out = match name {
                    "none" => Ok(img.clone()),
                    "classic" => derm_hair::inpaint(img, hole, &hcfg),
                    _ => purify_image(&model, img, hole),
                };
                (n, spent) = (n + 1, spent + t0.elapsed().as_secs_f64());
                out
            };
            let scores = match &self.holes {
                Some(dir) => derm_purify::evaluate_borrowed_holes(&data, dir, size, g.seed, &mut method)?,
                None => derm_purify::evaluate_holes(&data, size, &mut method)?,
            };
            let ms = 1e3 * spent / n.max(1) as f64;
            let (psnr, ssim) = scores.means();
            rows.push(derm_purify::MethodScores {
                method: name.to_string(),
                images: scores.per_image.len(),
                hole_psnr: psnr,
                hole_ssim: ssim,
                ms_per_image: ms,
            });
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            println!(
                "{} of {} at {}: PSNR and SSIM {}",
                data.split,
                data.name,
                size.map(|s| format!("{s}x{s}")).unwrap_or_else(|| "native size".into()),
                if self.holes.is_some() {
                    "inside holes borrowed from other images' occlusion masks, against the image's own pixels"
                } else {
                    "inside the occlusion mask against the clean image"
                }
            );
            println!("{:<10} {:>7} {:>10} {:>10} {:>12}", "method", "images", "PSNR dB", "SSIM", "ms/image");
            for r in &rows {
                println!(
                    "{:<10} {:>7} {:>10.2} {:>10.4} {:>12.1}",
                    r.method, r.images, r.hole_psnr, r.hole_ssim, r.ms_per_image
                );
            }
        }
        Ok(())
    }
}

impl PurifyCommand {
    /// Runs it.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        match self {
            PurifyCommand::Train(a) => a.run(g),
            PurifyCommand::Run(a) => a.run(g),
            PurifyCommand::Eval(a) => a.run(g),
        }
    }
}
