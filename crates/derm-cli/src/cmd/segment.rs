//! `derm segment train|predict|eval|compare`: the dilated U-Net lesion segmenter.

use super::common::{set, set_some};
use std::path::PathBuf;

use anyhow::{bail, Context};
use derm_core::image_io;
use derm_data::dataset::Dataset;
use derm_segment::{SegmentConfig, Segmenter, UNetConfig};

use crate::cmd::common::{self, collect_images, StageProgress};
use crate::GlobalOpts;

/// The segmentation subcommands.
// Parsed once per process: the size of the training arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, clap::Subcommand)]
pub enum SegmentCommand {
    /// Train the segmenter on a data set with lesion masks.
    Train(TrainArgs),
    /// Segment images: masks (0/255 PNG at the input's size) and overlays.
    Predict(PredictArgs),
    /// Score a trained segmenter against ground-truth masks.
    Eval(EvalArgs),
    /// Compare two evaluations of the same images (`eval --out` folders or their per_image.csv):
    /// mean per-image Jaccard, thresholded Jaccard and Dice, with paired bootstrap intervals.
    Compare(common::CompareArgs),
}

/// Arguments of `derm segment train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: common::DataArgs,
    #[command(flatten)]
    pub run: common::TrainFlags,
    /// Shades of Gray colour constancy with this norm (6 as the ISIC 2018 winners) on every
    /// image the model reads, in training and after; saved with the model. [config default: off]
    #[arg(long)]
    pub color_constancy: Option<f32>,
    /// After training, choose the mask threshold on the validation part and save it with the
    /// best model.
    #[arg(long)]
    pub select_threshold: bool,
    /// Fraction of the split held out for validation (by id). [config default: 0.1]
    #[arg(long)]
    pub val_fraction: Option<f64>,
    /// Network preset: small or medium (CPU sizes) or paper. [config default: medium]
    #[arg(long)]
    pub preset: Option<String>,
    /// Working size in pixels (images are resized to SIZE x SIZE). [config default: 128]
    #[arg(long)]
    pub size: Option<u32>,
    /// Learning rate (Adam; the paper's was 1e-4). [config default: 3e-4]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning-rate schedule: step (halve every 2000 steps), cosine (down to 0.02 of the rate
    /// over the whole run, its length measured under --minutes) or constant. [config default: step]
    #[arg(long, value_enum)]
    pub schedule: Option<common::Schedule>,
    /// Probability threshold of the saved model. [config default: 0.5]
    #[arg(long)]
    pub threshold: Option<f32>,
    /// Evaluate and keep an exponential moving average of the weights with this decay per step
    /// (0: off). [config default: 0.998]
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// Weight of a per-image soft Dice term added to the cross-entropy (0: cross-entropy alone,
    /// as the paper). [config default: 0]
    #[arg(long)]
    pub dice_weight: Option<f64>,
    /// Weight of a per-image Lovász hinge (a convex stand-in for one minus the image's Jaccard
    /// index) added to the cross-entropy (0: off). On held-out ISIC images after 40 CPU minutes
    /// weight 1 scored 0.831 per-image Jaccard against 0.827 (one seed). [config default: 0]
    #[arg(long)]
    pub lovasz_weight: Option<f64>,
    /// Whether the saved model averages its test-time views at inference: the symmetries it was
    /// trained with (all eight symmetries of the square by default). [config default: true]
    #[arg(long)]
    pub tta: Option<bool>,
    #[command(flatten)]
    pub augment_extra: common::AugmentArgs,
}

impl TrainArgs {
    pub(crate) fn config(&self, g: &GlobalOpts) -> anyhow::Result<SegmentConfig> {
        let mut c: SegmentConfig = self.run.base_config()?;
        if let Some(p) = &self.preset {
            c.model =
                UNetConfig::preset(p).with_context(|| format!("unknown preset {p:?}: use small, medium or paper"))?;
        }
        set(&mut c.size, self.size);
        set(&mut c.val_fraction, self.val_fraction);
        set(&mut c.threshold, self.threshold);
        set(&mut c.ema_decay, self.ema_decay);
        set(&mut c.dice_weight, self.dice_weight);
        set(&mut c.lovasz_weight, self.lovasz_weight);
        set(&mut c.test_time_augmentation, self.tta);
        self.augment_extra.apply(&mut c.augment);
        if let Some(lr) = self.lr {
            c.optim.optimizer.set_lr(lr);
        }
        set(&mut c.optim.schedule, self.schedule.map(common::Schedule::schedule));
        set_some(&mut c.normalize.shades_of_gray, self.color_constancy);
        c.select_threshold |= self.select_threshold;
        self.run.apply(g, &mut c.train, &mut c.batch_size);
        Ok(c)
    }

    /// Trains and writes the run folder.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let cfg = self.config(g)?;
        let described = cfg.describe();
        if !g.quiet {
            eprintln!("segment: training a {described}");
        }
        let device = g.device()?;
        let data = self.data.open(g.quiet)?;
        let mut progress = StageProgress::new("segment", g.quiet);
        let (task, state) =
            derm_segment::train(cfg, &data, &device, &self.run.out, self.run.resume, &mut |e| progress.event(e))
                .with_context(|| format!("training the segmenter into {}", self.run.out.display()))?;
        progress.finish();
        common::write_history(&self.run.out, &state)?;
        let (ntrain, _) = task.sizes();
        println!(
            "trained a {described}: {} steps in {:.1} min on {ntrain} images ({}); best validation Jaccard {} at step {}; run folder {}",
            state.step,
            state.elapsed_s / 60.0,
            state.stop_reason.as_deref().unwrap_or("done"),
            state.best_metric.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a".into()),
            state.best_step.unwrap_or(0),
            self.run.out.display()
        );
        Ok(())
    }
}

/// Arguments of `derm segment predict`.
#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// A trained run folder or checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    /// An image or a folder of images.
    #[arg(long)]
    pub input: PathBuf,
    /// Output folder: <id>_segmentation.png (0/255), <id>_overlay.png.
    #[arg(long)]
    pub out: PathBuf,
}

impl PredictArgs {
    /// Segments every image.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let device = g.device()?;
        let seg = Segmenter::load(&self.model, &device)?;
        let files = collect_images(&self.input)?;
        let pb = crate::progress::bar(files.len() as u64, "segment", g.quiet);
        for f in &files {
            let img = image_io::load_rgb(f)?;
            let p = seg.predict(&[&img])?.remove(0);
            let id = common::file_id(f);
            image_io::save_png(&self.out.join(derm_data::handoff::segmentation(&id)), &p.mask)?;
            image_io::save_png(
                &self.out.join(derm_data::handoff::overlay(&id)),
                &common::mask_overlay(&img, &p.mask, None),
            )?;
            pb.inc(1);
        }
        pb.finish_and_clear();
        println!("segmented {} images into {}", files.len(), self.out.display());
        Ok(())
    }
}

/// Arguments of `derm segment eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// A trained run folder or checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub data: common::DataArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write metrics.json, per_image.csv and overlays (prediction green, truth red) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// How many overlays to write with --out.
    #[arg(long, default_value_t = 8)]
    pub overlays: usize,
    /// Average the test-time views (true: the symmetries the model was trained with) or score
    /// the image alone (false), whatever the model saved.
    #[arg(long)]
    pub tta: Option<bool>,
}

impl EvalArgs {
    /// Scores the model.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let device = g.device()?;
        let mut seg = Segmenter::load(&self.model, &device)?;
        set(&mut seg.cfg.test_time_augmentation, self.tta);
        let data: Dataset = self.data.open(g.quiet)?;
        if data.samples.iter().all(|s| s.mask.is_none()) {
            bail!("{} split {} has no lesion masks to score against", data.name, data.split);
        }
        let pb = crate::progress::bar(data.len() as u64, "eval", g.quiet);
        let scores = derm_segment::evaluate(&seg, &data, &mut |n| pb.inc(n as u64))?;
        pb.finish_and_clear();
        let tta_views = seg.test_time_views(seg.cfg.test_time_augmentation).len();
        let doc = derm_segment::EvalSummary { summary: scores.summary(), worst: scores.worst(10), tta_views };
        let s = &doc.summary;
        if let Some(out) = &self.out {
            derm_core::fsutil::write_json(&out.join("metrics.json"), &doc)?;
            derm_segment::PerImageScores::of(&scores, &out.join("per_image.csv")).write()?;
            let cache = derm_data::cache::ImageCache::new(0);
            for (i, (id, c)) in scores.ids.iter().zip(&scores.per_image).enumerate().take(self.overlays) {
                let item = data.load_item(i, None, &cache)?;
                let p = seg.predict(&[&item.image])?.remove(0);
                let mut img = common::mask_overlay(&item.image, &p.mask, item.mask.as_ref());
                let label = format!("J = {:.3}", c.jaccard());
                let px = (img.height() as f32 / 12.0).max(10.0);
                derm_visual::plot::draw_text(&mut img, 4, 4, px, &label, [255, 255, 255]);
                image_io::save_png(&out.join(format!("overlay_{id}.png")), &img)?;
            }
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            println!("{} images of {} ({}), {} view(s) each", s.images, data.name, data.split, doc.tta_views);
            println!("jaccard (per-image mean)  {:.4}", s.jaccard_mean);
            println!("jaccard (ISIC 2018, <0.65 = 0) {:.4}", s.jaccard_thresholded);
            println!("jaccard (global)          {:.4}", s.jaccard_global);
            println!("dice (mean)               {:.4}", s.dice_mean);
            println!("sensitivity / specificity {:.4} / {:.4}", s.sensitivity, s.specificity);
            println!("worst ten:");
            for (id, j) in &doc.worst {
                println!("  {id}  {j:.4}");
            }
        }
        Ok(())
    }
}

/// Dispatches the subcommand.
impl SegmentCommand {
    /// Runs it.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        match self {
            SegmentCommand::Train(a) => a.run(g),
            SegmentCommand::Predict(a) => a.run(g),
            SegmentCommand::Eval(a) => a.run(g),
            SegmentCommand::Compare(a) => {
                let (base, other) = (
                    common::CompareArgs::csv(&a.base, "per_image.csv"),
                    common::CompareArgs::csv(&a.other, "per_image.csv"),
                );
                let b = derm_segment::PerImageScores::read(&base)?;
                let c = b.compare(&derm_segment::PerImageScores::read(&other)?, &a.bootstrap()?)?;
                a.print(&base, &other, &c)
            }
        }
    }
}
