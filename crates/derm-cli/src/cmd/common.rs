//! Pieces the subcommands share: data-set arguments, image listing, progress from training
//! events, the run folder's history files, and the paired comparison of two evaluations.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use derm_core::optim::{LrSchedule, COSINE_OVER_RUN, STEP_DECAY};
use derm_core::train::{Event, TrainState};
use derm_data::dataset::Dataset;
use derm_visual::plot::{self, PlotOptions, Series};
use image::{GrayImage, RgbImage};

/// Where a data set is and how it is laid out.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Manifest name (isic2017, isic2018-task1, isic2018-task3, ph2, dermofit) or a manifest
    /// file; default: the folder's own manifest.toml (as phantom folders have).
    #[arg(long)]
    pub manifest: Option<String>,
    /// The unpacked data set folder.
    #[arg(long)]
    pub root: PathBuf,
    /// Split to use (default: the first split present).
    #[arg(long)]
    pub split: Option<String>,
    /// Leave out (and list) samples whose image or mask is corrupt, truncated or of the wrong
    /// size, instead of refusing the data set.
    #[arg(long)]
    pub skip_bad: bool,
    /// Use only the images listed in this file (one id per line, or a CSV with an `image_id`
    /// column; `bench/peer/reference_train.py --make-split` writes such files). An id the data
    /// set lacks is an error.
    #[arg(long, value_name = "FILE")]
    pub ids: Option<PathBuf>,
}

impl DataArgs {
    /// Opens the data set and decodes every file once: a corrupt or truncated one is an error
    /// naming it, or with `--skip-bad` is left out and listed.
    pub fn open(&self, quiet: bool) -> anyhow::Result<Dataset> {
        let mut data = Dataset::open_dir(&self.root, self.manifest.as_deref(), self.split.as_deref())
            .with_context(|| format!("opening the data set at {}", self.root.display()))?;
        if let Some(f) = &self.ids {
            data = data.select_ids(&derm_data::dataset::read_id_list(f)?, f)?;
        }
        let bar = crate::progress::bar(data.len() as u64, "decoding", quiet);
        let screened = derm_data::screen(&data, self.skip_bad, &|| bar.inc(1));
        bar.finish_and_clear();
        let (kept, bad) = screened.with_context(|| format!("checking the images of {}", self.root.display()))?;
        if !bad.is_empty() {
            eprintln!("skipped {} of {} samples (--skip-bad):", bad.len(), data.len());
            for b in &bad {
                eprintln!("  {}: {}", b.id, b.problem);
            }
        }
        Ok(kept)
    }
}

/// An image file, or the image files of a folder (sorted; not recursive).
pub fn collect_images(input: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if input.is_file() {
        return Ok(vec![input.to_path_buf()]);
    }
    if !input.is_dir() {
        bail!("{}: no such file or folder", input.display());
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(input)
        .with_context(|| format!("reading {}", input.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && derm_core::image_io::is_image_path(p))
        .collect();
    v.sort();
    if v.is_empty() {
        bail!("{}: no images (png, jpg, bmp, tif) in this folder", input.display());
    }
    Ok(v)
}

/// The id of an image file: its stem.
pub fn file_id(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into())
}

/// A lesion mask drawn as a green contour (and an optional second mask in red).
pub fn mask_overlay(img: &RgbImage, mask: &GrayImage, truth: Option<&GrayImage>) -> RgbImage {
    let mut out = plot::mask_overlay(img, mask, [40, 230, 60], true);
    if let Some(t) = truth {
        out = plot::mask_overlay(&out, t, [230, 40, 40], true);
    }
    out
}

/// A progress bar driven by training events.
pub struct StageProgress {
    bar: crate::progress::Progress,
    last_metric: Option<f64>,
}

impl StageProgress {
    /// A bar for `stage`, hidden under `--quiet`.
    pub fn new(stage: &str, quiet: bool) -> Self {
        StageProgress { bar: crate::progress::bar(0, stage, quiet), last_metric: None }
    }
    /// Updates the bar.
    pub fn event(&mut self, e: &Event) {
        match e {
            Event::Step { step, loss, total, epoch } => {
                if *total != usize::MAX && self.bar.length() != Some(*total as u64) {
                    self.bar.set_length(*total as u64);
                }
                self.bar.set_position(*step as u64);
                let m = self.last_metric.map(|m| format!(" val {m:.4}")).unwrap_or_default();
                self.bar.set_message(format!("epoch {} loss {loss:.4}{m}", epoch + 1));
            }
            Event::Eval { metric, step, best } => {
                self.last_metric = Some(*metric);
                tracing::info!(step, metric, best, "evaluation");
            }
            Event::Saved(p) => tracing::debug!(path = %p.display(), "checkpoint"),
            Event::Figure(p) => tracing::debug!(path = %p.display(), "figure"),
        }
    }
    /// Clears the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Writes `history.json` and `loss_curve.png` (training loss and validation metric by step).
pub fn write_history(out: &Path, state: &TrainState) -> anyhow::Result<()> {
    derm_core::fsutil::write_json(&out.join("history.json"), state)?;
    let loss: Vec<(f64, f64)> = state.history.iter().map(|h| (h.step as f64, h.loss)).collect();
    let metric: Vec<(f64, f64)> = state.history.iter().filter_map(|h| h.metric.map(|m| (h.step as f64, m))).collect();
    if loss.len() >= 2 {
        let mut series = vec![Series { name: "training loss".into(), points: loss, color: None }];
        if !metric.is_empty() {
            series.push(Series { name: "validation metric".into(), points: metric, color: None });
        }
        let img = plot::line_plot("training", "step", "value", &series, &PlotOptions::default());
        derm_core::image_io::save_png(&out.join("loss_curve.png"), &img)?;
    }
    Ok(())
}

/// Learning-rate schedules by name (`--schedule` of the segmenter and the classifier).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Schedule {
    /// Halve the rate every 2000 steps.
    Step,
    /// Cosine over the whole run down to 0.02 of the rate (the run's length measured under
    /// --minutes).
    Cosine,
    /// The same rate throughout.
    Constant,
}

impl Schedule {
    /// The schedule this name stands for.
    pub fn schedule(self) -> LrSchedule {
        match self {
            Schedule::Step => STEP_DECAY,
            Schedule::Cosine => COSINE_OVER_RUN,
            Schedule::Constant => LrSchedule::Constant,
        }
    }
}

/// Free rotations, elastic warps and random erasing added to a stage's training augmentation
/// (`train` of the segmenter and the classifier). Each overrides the config only when given. On
/// held-out ISIC images none helped at a CPU budget (BENCHMARKS.md, "Free rotations, elastic warps
/// and random erasing"): `--rotate 180 --elastic 0.03` left the segmenter's Jaccard at 0.829
/// against 0.831 after 40 minutes and lowered the classifier's mean AUC from 0.835 to 0.816 after
/// 20 and from 0.834 to 0.823 after 40 (with `--augment full`); `--erase 0.5` scored 0.831 after
/// 20.
#[derive(Debug, Default, clap::Args)]
pub struct AugmentArgs {
    /// Also turn each training view by an angle drawn from ± this many degrees (the image mirrored
    /// at its edges where the turned window reaches past it; 0: off). [config default: 0]
    #[arg(long, value_name = "DEGREES")]
    pub rotate: Option<f64>,
    /// Also bend each training view: a 5 x 5 grid of points each moves by up to this share of the
    /// side (0: off; 0.03 is a visible but gentle bend). [config default: 0]
    #[arg(long, value_name = "SHARE")]
    pub elastic: Option<f64>,
    /// Random erasing: with this probability fill a box of 2-25 % of each training view with
    /// noise (the image only: masks still show what is under it; 0: off). [config default: 0]
    #[arg(long, value_name = "P")]
    pub erase: Option<f64>,
}

/// Two evaluations of the same images to compare (`derm classify compare`, `derm segment
/// compare`), and how to resample them.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// The base evaluation: the folder `eval --out` wrote, or its CSV.
    pub base: PathBuf,
    /// The evaluation compared with it (the differences are this one's minus the base's).
    pub other: PathBuf,
    /// Bootstrap resamples of the images. [default: 1000]
    #[arg(long)]
    pub resamples: Option<usize>,
    /// The intervals' coverage. [default: 0.95]
    #[arg(long)]
    pub level: Option<f64>,
    /// Seed of the resamples. [default: 0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

impl CompareArgs {
    /// The CSV of `path`: the path itself, or `file` in the folder it names.
    pub fn csv(path: &Path, file: &str) -> PathBuf {
        if path.is_dir() {
            path.join(file)
        } else {
            path.to_path_buf()
        }
    }

    /// The resampling asked for; a level outside (0, 1) or no resamples is an error.
    pub fn bootstrap(&self) -> anyhow::Result<derm_core::metrics::BootstrapConfig> {
        let mut b = derm_core::metrics::BootstrapConfig::default();
        set(&mut b.resamples, self.resamples);
        set(&mut b.level, self.level);
        set(&mut b.seed, self.seed);
        if !b.is_valid() {
            bail!(
                "compare: --resamples must be at least 1 and --level inside (0, 1) (got {} and {})",
                b.resamples,
                b.level
            );
        }
        Ok(b)
    }

    /// Prints the comparison of the files `base` and `other`: a table, or JSON with `--json`.
    pub fn print(&self, base: &Path, other: &Path, c: &derm_core::metrics::Comparison) -> anyhow::Result<()> {
        if self.json {
            let doc = serde_json::json!({ "base": base, "other": other, "comparison": c });
            println!("{}", serde_json::to_string_pretty(&doc)?);
            return Ok(());
        }
        let b = &c.bootstrap;
        println!("{} images paired by id: base {}, other {}", c.items, base.display(), other.display());
        println!(
            "{} resamples of the images (seed {}); {:.0}% intervals of other - base",
            b.resamples,
            b.seed,
            b.level * 100.0
        );
        let width = c.metrics.iter().map(|m| m.metric.len()).max().unwrap_or(6).max(6);
        println!(
            "{:<width$}  {:>7}  {:>7}  {:>8}  {:>19}  {:>12}",
            "metric", "base", "other", "diff", "interval", "other higher"
        );
        for m in &c.metrics {
            let d = &m.difference;
            println!(
                "{:<width$}  {:>7.4}  {:>7.4}  {:>+8.4}  [{:>+8.4}, {:>+8.4}]  {:>11.1}%",
                m.metric,
                d.base,
                d.other,
                d.difference,
                d.low,
                d.high,
                d.other_higher * 100.0
            );
        }
        Ok(())
    }
}

impl AugmentArgs {
    /// Sets the augmentation's warp and erasing from the flags given.
    pub fn apply(&self, augment: &mut derm_data::augment::AugmentConfig) {
        set(&mut augment.rotate, self.rotate);
        set(&mut augment.elastic, self.elastic);
        set(&mut augment.erase, self.erase);
    }
}

/// The flags every `train` command shares: the loop's budget, batch size, config file, resume
/// and run folder. Each overrides the config (file or defaults) only when given.
#[derive(Debug, clap::Args)]
pub struct TrainFlags {
    /// Passes over the training data (the GAN: over its largest class). [config default]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stop after this many minutes of training, resumed runs included.
    #[arg(long)]
    pub minutes: Option<f64>,
    /// Stop after this many optimiser steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Evaluate (the GAN: check quality) every N steps. [config default: each epoch]
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Images per batch (the GAN: real images per class per step). [config default]
    #[arg(long)]
    pub batch: Option<usize>,
    /// The model the run keeps in OUT/best, which predict and eval use: `best`, the checkpoint
    /// with the best validation metric, or `last`, the final weights. [config default: last for
    /// the classifier, best for the others]
    #[arg(long)]
    pub keep: Option<derm_core::train::Keep>,
    /// A JSON file with the stage's config (missing fields take their defaults, unknown ones are
    /// errors); the flags given override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run in OUT from its last checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Run folder: best/ and last/ checkpoints, history.json, loss_curve.png.
    #[arg(long)]
    pub out: PathBuf,
}

impl TrainFlags {
    /// The stage's config from `--config`, or its defaults.
    pub fn base_config<C: serde::de::DeserializeOwned + Default>(&self) -> anyhow::Result<C> {
        base_config(self.config.as_deref())
    }

    /// Applies the loop flags and the global seed (`--seed`) to a stage config's loop and
    /// batch size.
    pub fn apply(&self, g: &crate::GlobalOpts, train: &mut derm_core::train::LoopConfig, batch_size: &mut usize) {
        set(batch_size, self.batch);
        set(&mut train.epochs, self.epochs);
        set_some(&mut train.minutes, self.minutes);
        set_some(&mut train.max_steps, self.max_steps);
        set_some(&mut train.eval_every, self.eval_every);
        set(&mut train.keep, self.keep);
        train.seed = g.seed;
    }
}

/// The config a `train` command starts from: the `--config` JSON file (fields it leaves out
/// take their defaults, unknown ones are errors), else the stage's defaults. Flags then
/// override it with [`set`] and [`set_some`], so defaults live in one place: the config's
/// `Default`.
pub fn base_config<C: serde::de::DeserializeOwned + Default>(path: Option<&Path>) -> anyhow::Result<C> {
    match path {
        Some(p) => Ok(derm_core::fsutil::read_json(p).with_context(|| format!("reading the config {}", p.display()))?),
        None => Ok(C::default()),
    }
}

/// Overrides `dst` with a flag's value when the flag was given.
pub fn set<T>(dst: &mut T, flag: Option<T>) {
    if let Some(v) = flag {
        *dst = v;
    }
}

/// Overrides an optional setting with a flag's value when the flag was given.
pub fn set_some<T>(dst: &mut Option<T>, flag: Option<T>) {
    if flag.is_some() {
        *dst = flag;
    }
}
