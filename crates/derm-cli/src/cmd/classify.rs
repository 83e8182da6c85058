//! `derm classify train|predict|eval|compare`: the ResNet lesion classifier.

use super::common::{set, set_some};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use derm_classify::{BatchMix, ClassificationReport, Classifier, ClassifyConfig, ExtraSources, ResNetConfig, Stage};
use derm_core::image_io;
use derm_core::optim::OptimizerKind;
use derm_data::augment::AugmentConfig;
use derm_data::dataset::Dataset;
use derm_visual::plot::{self, PlotOptions, Series};

use crate::cmd::common::{self, collect_images, StageProgress};
use crate::GlobalOpts;

/// The classification subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ClassifyCommand {
    // Boxed: its many flags make it the largest of derm's commands by far (clippy's
    // large_enum_variant, here and in `Command`).
    /// Train the classifier on a labelled data set (plus purified and synthetic images).
    Train(Box<TrainArgs>),
    /// Class probabilities of images.
    Predict(PredictArgs),
    /// Score a trained classifier as the ISIC 2017/2018 scorers: AUC, specificity at fixed
    /// sensitivity, confusion matrix, balanced accuracy.
    Eval(EvalArgs),
    /// Compare two evaluations of the same images (`eval --out` folders or their
    /// predictions.csv): mean and per-class AUC, with paired bootstrap intervals.
    Compare(common::CompareArgs),
}

/// Arguments of `derm classify train`.
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
    /// After training, choose per-class decision weights on the validation part for the best
    /// balanced accuracy and save them with the kept model (predictions and eval use them);
    /// `--select-operating-point false` keeps the arg-max rule. `--select-operating-point` alone
    /// means true. [config default: true, unless --val-fraction 0 leaves no validation part]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub select_operating_point: Option<bool>,
    /// A folder of <id>_purified.png (the purify stage's output) added to training.
    #[arg(long)]
    pub purified: Option<PathBuf>,
    /// A synthetic data-set folder (the synth stage's output, with its manifest) added to
    /// training.
    #[arg(long)]
    pub synthetic: Option<PathBuf>,
    /// Preset: cpu (ResNet-18 at width 32, 128 px crops of 146 px images, Adam 1e-3: the best
    /// measured on held-out ISIC images at 10-40 CPU minutes) or paper (ResNet-50 at width 64,
    /// 224 px of 256, SGD 1e-3 momentum 0.9: for a GPU or ImageNet weights). It sets the
    /// network, sizes, batch and optimiser; the flags below override it. [config default: cpu]
    #[arg(long)]
    pub preset: Option<String>,
    /// Architecture: resnet18, resnet34, resnet50 or resnet101 (the layout; the width is
    /// --width's). [config default: resnet18]
    #[arg(long)]
    pub arch: Option<String>,
    /// Base width (64 = torchvision; smaller for CPU-sized networks trained from scratch).
    /// [config default: 32; 64 with --pretrained]
    #[arg(long)]
    pub width: Option<usize>,
    /// ImageNet weights with torchvision names (safetensors); the head is replaced. The network
    /// is torchvision's width (64) unless --width says otherwise; --arch must name the file's.
    #[arg(long)]
    pub pretrained: Option<PathBuf>,
    /// Train only the final layer on features computed once (fast on a CPU).
    #[arg(long)]
    pub freeze_backbone: bool,
    /// First stage trained (conv1, layer1..layer4, fc); earlier ones stay fixed. [config default: conv1]
    #[arg(long, value_name = "STAGE", value_parser = parse_stage)]
    pub trainable_from: Option<Stage>,
    /// Space-to-depth stem: each F x F block of pixels becomes channels before the first
    /// convolution, so a view F times larger (--size) costs about what the smaller one did
    /// (1 = torchvision's stem; no ImageNet weights fit F > 1). With 2 and --size 224 it scored
    /// level with the default at 40 CPU minutes on held-out ISIC images. [config default: 1]
    #[arg(long, value_name = "F")]
    pub space_to_depth: Option<usize>,
    /// Network input size in pixels (square crop). [config default: 128]
    #[arg(long)]
    pub size: Option<u32>,
    /// Short side images are scaled to before cropping (default with --size: size * 256 / 224,
    /// as torchvision's 224 of 256). [config default: 146]
    #[arg(long)]
    pub resize: Option<u32>,
    /// Learning rate. [config default: 1e-3]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Optimiser: sgd (momentum 0.9, as the authors), adam, or adamw (Adam with decoupled weight
    /// decay, 0.01 unless --weight-decay says). On held-out ISIC images after 40 CPU minutes sgd at
    /// 0.02 with L2 5e-4 and the cosine scored as adam at 1e-3 (+0.002 mean AUC, one seed).
    /// [config default: adam; the paper preset: sgd]
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Weight decay: decoupled with adamw, added to the gradient (L2) with sgd. Plain adam takes
    /// none: use adamw. [default: 0.01 with adamw, 0 with sgd]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Learning-rate schedule: constant, cosine (down to 0.02 of the rate over the whole run, its
    /// length measured under --minutes) or step (halve every 2000 steps). Cosine and constant
    /// scored the same on held-out ISIC images after 20 CPU minutes (BENCHMARKS.md, "Schedule,
    /// input size and the reference on a faster machine"). [config default: constant]
    #[arg(long, value_enum)]
    pub schedule: Option<common::Schedule>,
    /// Class-balanced mini-batches.
    #[arg(long)]
    pub balanced: bool,
    /// Weight the loss by inverse class frequency.
    #[arg(long)]
    pub weighted_loss: bool,
    /// Fraction of the split held out for validation (by id). [config default: 0.15]
    #[arg(long)]
    pub val_fraction: Option<f64>,
    /// Evaluate and keep an exponential moving average of the weights with this decay per step
    /// (0.998 is a half-life of about 350 steps; 0: off). The decay warms up as (1 + n) / (10 +
    /// n) after n steps, so 0.998 is reached at step 4490 and 0.9995 at 17990; on held-out ISIC
    /// images 0.9995 scored as 0.998 at 20 and 40 CPU minutes (one seed each). [config default:
    /// 0.998]
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// Label smoothing: this share of each target spread evenly over the classes. [config
    /// default: 0]
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Dropout before the final layer in training: each pooled feature is zeroed with this
    /// probability (the rest scaled up), drawn from --seed; prediction uses them all. On held-out
    /// ISIC images after 20 CPU minutes 0.3 scored 0.818 mean AUC against 0.835 without it (one
    /// seed). [config default: 0]
    #[arg(long, value_name = "P")]
    pub dropout: Option<f64>,
    /// Sharpness-aware minimisation: each step descends the highest loss within this radius of
    /// the weights (two passes a step, so about half the steps in the same minutes; 0: off). On
    /// held-out ISIC images 0.05 scored 0.819 mean AUC against 0.835 without it after 20 CPU
    /// minutes, 0.823 against 0.834 after 40 (one seed each). [config default: 0]
    #[arg(long, value_name = "RHO")]
    pub sam: Option<f64>,
    /// Add a second task in training: a head on layer3 (--aux-mask-stage) learns which parts of
    /// each view the lesion covers, from the training images' lesion masks (the data set's, or
    /// --lesion-masks), its loss weighted by this (0: off). `eval` and `predict` need no mask. On
    /// held-out ISIC images after 20 CPU minutes it raised mean AUC from 0.788 / 0.801 to 0.835 /
    /// 0.820 (two seeds); weight 3 scored 0.829 (one seed). Without masks it is off, with a note.
    /// [config default: 1]
    #[arg(long, value_name = "WEIGHT")]
    pub aux_mask_weight: Option<f64>,
    /// The stage whose output the lesion-mask head reads: layer1 .. layer4 (cells of 4, 8, 16 or
    /// 32 pixels). On held-out ISIC images after 20 CPU minutes layer2 and layer4 scored 0.810
    /// and 0.808 mean AUC against layer3's 0.835 (one seed). [config default: layer3]
    #[arg(long, value_name = "STAGE", value_parser = parse_aux_stage)]
    pub aux_mask_stage: Option<Stage>,
    /// A second stage the lesion-mask head reads (layer2 beside layer3, say), with a map of its
    /// own trained on the same masks at that stage's grid and the same weight. Training only;
    /// needs the lesion-mask head. On held-out ISIC images after 40 CPU minutes layer2 scored
    /// 0.826 mean AUC against the head alone's 0.825 (one seed). [config default: none]
    #[arg(long, value_name = "STAGE", value_parser = parse_aux_stage)]
    pub aux_mask_second_stage: Option<Stage>,
    /// Lesion-weighted pooling: the lesion-mask head also runs at prediction, and layer4's
    /// features averaged over where it sees the lesion add their own logits to those of the
    /// whole image's average (prediction still needs no mask). Needs the lesion-mask head. On
    /// held-out ISIC images after 20 CPU minutes it scored 0.821 / 0.823 mean AUC against the
    /// head alone's 0.835 / 0.820 (two seeds). [config default: off]
    #[arg(long)]
    pub lesion_pooling: bool,
    /// Per-cell diagnosis: the lesion-mask head also learns the image's diagnosis on each cell
    /// the lesion covers, its loss weighted by this (0: off). Training only; needs the
    /// lesion-mask head. On held-out ISIC images after 20 CPU minutes weight 1 scored 0.827 mean
    /// AUC against 0.835 without it (one seed). [config default: 0]
    #[arg(long, value_name = "WEIGHT")]
    pub aux_cell_weight: Option<f64>,
    /// Lesion descriptors: a linear map of the pooled features also regresses each training
    /// view's ABCD measurements (lesion area, border raggedness, asymmetry about its two axes,
    /// colour spread, contrast with the skin), taken from its mask and pixels, its squared error
    /// weighted by this (0: off). Training only; needs the lesion-mask head. On held-out ISIC
    /// images after 40 CPU minutes weight 1 scored +0.011 and -0.003 mean AUC against the
    /// defaults (two seeds). [config default: 0]
    #[arg(long, value_name = "WEIGHT")]
    pub aux_descriptor_weight: Option<f64>,
    /// With --select-operating-point: keep at least this melanoma sensitivity on the validation
    /// part (the best balanced accuracy among the operating points that do; 0: no floor).
    /// [config default: 0.82, ISIC 2017's first sensitivity level]
    #[arg(long)]
    pub min_melanoma_sensitivity: Option<f64>,
    /// Classify lesion windows: cut each image to the square around its lesion mask (the data
    /// set's masks in training), widened by this share of the lesion's size on each side. `eval`
    /// and `predict` then need lesion masks (--lesion-masks, from `derm segment predict`).
    /// [config default: off]
    #[arg(long, value_name = "MARGIN")]
    pub lesion_crop: Option<f64>,
    /// Training augmentation after the random crop: flips (left-right and top-bottom, as the
    /// paper) or full (also quarter turns, crops of 0.8-1 of the side rescaled, and colour jitter
    /// of 0.1). On held-out ISIC images full scored a lower mean AUC after 10 CPU minutes
    /// (three seeds) and an equal or higher one after 20 (three seeds; BENCHMARKS.md,
    /// "Augmentation and CPU minutes"). [config default: flips]
    #[arg(long, value_enum)]
    pub augment: Option<Augment>,
    #[command(flatten)]
    pub augment_extra: common::AugmentArgs,
    /// Mix the images of each training batch: mixup (blend whole images) or cutmix (paste a box
    /// of another image), the targets weighted alike. [config default: off]
    #[arg(long, value_enum)]
    pub mix: Option<Mix>,
    /// With --mix: the mixing weight is drawn from Beta(alpha, alpha). [default: 0.2 for mixup,
    /// 1 for cutmix]
    #[arg(long, requires = "mix")]
    pub mix_alpha: Option<f64>,
    /// Whether the saved model averages its test-time views (the symmetries it was trained with)
    /// at inference and when the operating point is chosen. [config default: true]
    #[arg(long)]
    pub tta: Option<bool>,
    /// With --lesion-crop or --aux-mask-weight: read each training image's lesion mask from this
    /// folder (<id>_segmentation.png, as `derm segment predict` writes) instead of the data set's.
    #[arg(long)]
    pub lesion_masks: Option<PathBuf>,
}

/// The classifier's training augmentations by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Augment {
    /// Left-right and top-bottom flips.
    Flips,
    /// Flips, quarter turns, crop-and-rescale and colour jitter.
    Full,
}

impl Augment {
    fn config(self) -> AugmentConfig {
        match self {
            Augment::Flips => AugmentConfig::flips(),
            Augment::Full => AugmentConfig::default(),
        }
    }
}

/// Mixing of training batches by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mix {
    /// No mixing.
    Off,
    /// Whole images blended.
    Mixup,
    /// A box of another image pasted.
    Cutmix,
}

impl Mix {
    fn config(self, alpha: Option<f64>) -> anyhow::Result<BatchMix> {
        Ok(match self {
            Mix::Off if alpha.is_some() => bail!("--mix-alpha with --mix off: nothing is mixed"),
            Mix::Off => BatchMix::Off,
            Mix::Mixup => BatchMix::Mixup { alpha: alpha.unwrap_or(0.2) },
            Mix::Cutmix => BatchMix::CutMix { alpha: alpha.unwrap_or(1.0) },
        })
    }
}

impl TrainArgs {
    pub(crate) fn config(&self, g: &GlobalOpts) -> anyhow::Result<ClassifyConfig> {
        let mut c: ClassifyConfig = self.run.base_config()?;
        if let Some(p) = &self.preset {
            c.apply_preset(p)?;
        }
        if let Some(arch) = &self.arch {
            let model = ResNetConfig::by_name(arch, 3).with_context(|| {
                format!("unknown architecture {arch:?}: use resnet18, resnet34, resnet50 or resnet101")
            })?;
            // The layout only: the width stays the preset's or the config's.
            let (num_classes, base_width, space_to_depth) =
                (c.model.num_classes, c.model.base_width, c.model.space_to_depth);
            c.model = ResNetConfig { num_classes, base_width, space_to_depth, zero_init_residual: true, ..model };
        }
        if let Some(p) = &self.pretrained {
            c.pretrained = Some(p.clone());
            // Every torchvision ResNet file is at width 64.
            c.model.base_width = 64;
        }
        set(&mut c.model.base_width, self.width);
        set(&mut c.model.space_to_depth, self.space_to_depth);
        if c.pretrained.is_some() {
            // ImageNet weights come with trained residual branches.
            c.model.zero_init_residual = false;
        }
        if let Some(size) = self.size {
            c.input_size = size;
            c.resize = (size as f64 * 256.0 / 224.0).round() as u32;
        }
        set(&mut c.resize, self.resize);
        set(&mut c.val_fraction, self.val_fraction);
        set(&mut c.ema_decay, self.ema_decay);
        set(&mut c.label_smoothing, self.label_smoothing);
        set(&mut c.dropout, self.dropout);
        set(&mut c.sam_rho, self.sam);
        set(&mut c.aux_mask_weight, self.aux_mask_weight);
        set(&mut c.aux_cell_weight, self.aux_cell_weight);
        set(&mut c.aux_descriptor_weight, self.aux_descriptor_weight);
        set(&mut c.min_melanoma_sensitivity, self.min_melanoma_sensitivity);
        set_some(&mut c.lesion_crop_margin, self.lesion_crop);
        set(&mut c.augment, self.augment.map(Augment::config));
        self.augment_extra.apply(&mut c.augment);
        set(&mut c.mix, self.mix.map(|m| m.config(self.mix_alpha)).transpose()?);
        set(&mut c.test_time_augmentation, self.tta);
        c.balanced |= self.balanced;
        c.class_weighted_loss |= self.weighted_loss;
        c.freeze_backbone |= self.freeze_backbone;
        c.lesion_pooling |= self.lesion_pooling;
        set(&mut c.trainable_from, self.trainable_from);
        set(&mut c.aux_mask_stage, self.aux_mask_stage);
        set_some(&mut c.aux_mask_second_stage, self.aux_mask_second_stage);
        if let Some(o) = self.optimizer.as_deref() {
            let lr = c.optim.optimizer.lr();
            c.optim.optimizer = match o {
                "sgd" => OptimizerKind::sgd(lr, 0.9),
                "adam" => OptimizerKind::adam(lr),
                "adamw" => OptimizerKind::adamw(lr, 0.01),
                o => bail!("unknown optimizer {o:?}: use sgd, adam or adamw"),
            };
        }
        if let Some(wd) = self.weight_decay {
            if !(wd.is_finite() && wd >= 0.0) {
                bail!("--weight-decay {wd} must be a finite number >= 0");
            }
            if !c.optim.optimizer.set_weight_decay(wd) {
                bail!("--weight-decay needs --optimizer adamw (decoupled) or sgd (L2); plain adam takes none");
            }
        }
        if let Some(lr) = self.lr {
            c.optim.optimizer.set_lr(lr);
        }
        set(&mut c.optim.schedule, self.schedule.map(common::Schedule::schedule));
        set_some(&mut c.normalize.shades_of_gray, self.color_constancy);
        match self.select_operating_point {
            Some(on) => c.select_operating_point = on,
            // No validation part, no operating point (unless asked for: then the error says why).
            None if c.val_fraction == 0.0 => c.select_operating_point = false,
            None => {}
        }
        self.run.apply(g, &mut c.train, &mut c.batch_size);
        Ok(c)
    }

    /// Trains and writes the run folder.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let mut cfg = self.config(g)?;
        let device = g.device()?;
        let mut data = self.data.open(g.quiet)?;
        if let Some(dir) = &self.lesion_masks {
            data = with_lesion_masks(data, dir)?;
        }
        if let Some(why) = cfg.aux_mask_blocker(&data) {
            if let Some(w) = self.aux_mask_weight {
                bail!("--aux-mask-weight {w}: {why}");
            }
            if let Some(s) = self.aux_mask_second_stage {
                bail!("--aux-mask-second-stage {}: the lesion-mask loss cannot train: {why}", s.name());
            }
            if let Some(w) = self.aux_descriptor_weight.filter(|&w| w > 0.0) {
                bail!("--aux-descriptor-weight {w}: the lesion-mask loss cannot train: {why}");
            }
            // Where something else needs the head, the library refuses the run with the reason.
            if cfg.needs_mask_head().is_none() {
                if !g.quiet {
                    eprintln!("classify: the lesion-mask loss is off: {why}");
                }
                cfg.mask_loss_off();
            }
        }
        let described = cfg.describe();
        if !g.quiet {
            eprintln!("classify: training a {described}");
        }
        let extra = ExtraSources { purified: self.purified.clone(), synthetic: self.synthetic.clone() };
        let mut progress = StageProgress::new("classify", g.quiet);
        let (task, state) =
            derm_classify::train(cfg, &data, &extra, &device, &self.run.out, self.run.resume, &mut |e| {
                progress.event(e)
            })
            .with_context(|| format!("training the classifier into {}", self.run.out.display()))?;
        progress.finish();
        common::write_history(&self.run.out, &state)?;
        // The kept model (with its operating point) on the validation part: what predict will do.
        let kept = match task.kept_val_report(&self.run.out)? {
            Some(report) => {
                derm_core::fsutil::write_json(&self.run.out.join("validation.json"), &report)?;
                summary_line(&report)
            }
            None => "no validation part".into(),
        };
        let (ntrain, _) = task.sizes();
        println!(
            "trained a {described}: {} steps in {:.1} min on {ntrain} images ({}); best validation mean AUC {} at step {}; kept model: {}; run folder {}",
            state.step,
            state.elapsed_s / 60.0,
            state.stop_reason.as_deref().unwrap_or("done"),
            state.best_metric.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a".into()),
            state.best_step.unwrap_or(0),
            kept,
            self.run.out.display()
        );
        Ok(())
    }
}

/// `--trainable-from`: a stage of the network.
fn parse_stage(s: &str) -> Result<Stage, String> {
    Stage::parse(s).ok_or_else(|| format!("unknown stage {s:?}: use conv1, layer1..layer4 or fc"))
}

/// `--aux-mask-stage`: a stage the lesion-mask head can read.
fn parse_aux_stage(s: &str) -> Result<Stage, String> {
    parse_stage(s).ok().filter(|st| derm_classify::aux::STAGES.contains(st)).ok_or_else(|| {
        format!("{s:?} is not a stage the lesion-mask head can read: use layer1, layer2, layer3 or layer4")
    })
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a".into())
}

fn summary_line(r: &ClassificationReport) -> String {
    format!("mean AUC {} balanced accuracy {:.4} on {} images", fmt_opt(r.mean_auc), r.balanced_accuracy, r.images)
}

/// Arguments of `derm classify predict`.
#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// A trained run folder or checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    /// An image or a folder of images.
    #[arg(long)]
    pub input: PathBuf,
    /// Average the probabilities over the test-time views (the four flips; all eight symmetries
    /// of the square for a model trained with quarter turns, --augment full), or score each image
    /// alone (false), whatever the model saved. `--tta` alone means true.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub tta: Option<bool>,
    /// A folder of lesion masks, <id>_segmentation.png (as `derm segment predict` writes), for
    /// a model trained on lesion windows (`train --lesion-crop`).
    #[arg(long)]
    pub lesion_masks: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

impl PredictArgs {
    /// Prints the class probabilities of every image.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let device = g.device()?;
        let clf = Classifier::load(&self.model, &device)?;
        let classes = clf.class_names();
        let files = collect_images(&self.input)?;
        if clf.cfg.lesion_crop_margin.is_some() && self.lesion_masks.is_none() {
            bail!(
                "{} classifies lesion windows: give --lesion-masks DIR with <id>_segmentation.png for every image \
                 (`derm segment predict` writes them)",
                self.model.display()
            );
        }
        let tta = self.tta.unwrap_or(clf.cfg.test_time_augmentation);
        let pb = crate::progress::bar(files.len() as u64, "classify", g.quiet || self.json);
        let mut rows = Vec::with_capacity(files.len());
        for f in &files {
            let img = image_io::load_rgb(f)?;
            let id = common::file_id(f);
            let view = match &self.lesion_masks {
                Some(dir) => {
                    let m = lesion_mask_of(dir, &id)?;
                    let mask = image_io::load_mask(&m, Some(img.dimensions()))?;
                    clf.lesion_view(&img, &mask).with_context(|| format!("{}", f.display()))?
                }
                None => clf.view(&img),
            };
            let p = clf.view_probabilities(&[view], tta)?.remove(0);
            rows.push((id, f.clone(), p));
            pb.inc(1);
        }
        pb.finish_and_clear();
        if self.json {
            let v: Vec<serde_json::Value> = rows
                .iter()
                .map(|(id, f, p)| {
                    let best = derm_classify::eval::decide(std::slice::from_ref(p), &clf.cfg.decision_weights)[0];
                    let probs: serde_json::Map<String, serde_json::Value> =
                        classes.iter().zip(p).map(|(c, v)| (c.clone(), serde_json::json!(v))).collect();
                    serde_json::json!({ "id": id, "file": f, "class": classes[best], "probabilities": probs })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!("id,{},predicted", classes.join(","));
            for (id, _, p) in &rows {
                let best = derm_classify::eval::decide(std::slice::from_ref(p), &clf.cfg.decision_weights)[0];
                let vals: Vec<String> = p.iter().map(|v| format!("{v:.4}")).collect();
                println!("{id},{},{}", vals.join(","), classes[best]);
            }
        }
        Ok(())
    }
}

/// Arguments of `derm classify eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// A trained run folder or checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub data: common::DataArgs,
    /// Classify <id>_purified.png from this folder instead of each original image (test-time
    /// purification done beforehand by the purify stage).
    #[arg(long)]
    pub purified_input: Option<PathBuf>,
    /// Average the probabilities over the test-time views (the four flips; all eight symmetries
    /// of the square for a model trained with quarter turns, --augment full), or score each image
    /// alone (false), whatever the model saved. `--tta` alone means true.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub tta: Option<bool>,
    /// For a model trained on lesion windows: read each image's lesion mask from this folder
    /// (<id>_segmentation.png, as `derm segment predict` writes) instead of the data set's own
    /// (ground-truth) masks.
    #[arg(long)]
    pub lesion_masks: Option<PathBuf>,
    /// Output folder for roc.png, confusion.png, metrics.json, predictions.csv (default: the
    /// run folder's eval/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Replaces each sample's image by `<dir>/<id>_purified.png`, which must exist.
fn with_purified_images(mut data: Dataset, dir: &Path) -> anyhow::Result<Dataset> {
    for s in &mut data.samples {
        let p = dir.join(derm_data::handoff::purified(&s.id));
        if !p.is_file() {
            bail!("{}: no purified image for {} (expected {})", dir.display(), s.id, p.display());
        }
        s.image = p;
    }
    Ok(data)
}

/// The lesion mask of `id` in `dir`, which must exist.
fn lesion_mask_of(dir: &Path, id: &str) -> anyhow::Result<PathBuf> {
    derm_data::handoff::find_mask(dir, id).with_context(|| {
        format!(
            "{}: no lesion mask for {id} (expected {})",
            dir.display(),
            dir.join(derm_data::handoff::segmentation(id)).display()
        )
    })
}

/// Replaces each sample's lesion mask by the one of its id in `dir`, which must exist.
fn with_lesion_masks(mut data: Dataset, dir: &Path) -> anyhow::Result<Dataset> {
    for s in &mut data.samples {
        s.mask = Some(lesion_mask_of(dir, &s.id)?);
    }
    Ok(data)
}

/// The run folder of a model argument (a run folder, or one of its checkpoint folders).
fn run_folder(model: &Path) -> PathBuf {
    if model.join(derm_core::checkpoint::WEIGHTS).exists() {
        model.parent().map(Path::to_path_buf).unwrap_or_else(|| model.to_path_buf())
    } else {
        model.to_path_buf()
    }
}

impl EvalArgs {
    /// Scores the model and writes the plots and metrics.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let device = g.device()?;
        let clf = Classifier::load(&self.model, &device)?;
        let mut data: Dataset = self.data.open(g.quiet)?;
        if let Some(dir) = &self.purified_input {
            data = with_purified_images(data, dir)?;
        }
        if let Some(dir) = &self.lesion_masks {
            data = with_lesion_masks(data, dir)?;
        }
        let pb = crate::progress::bar(data.len() as u64, "eval", g.quiet || self.json);
        let tta = self.tta.unwrap_or(clf.cfg.test_time_augmentation);
        let e = derm_classify::evaluate(&clf, &data, None, tta, &mut |n| pb.inc(n as u64))?;
        pb.finish_and_clear();
        let out = self.out.clone().unwrap_or_else(|| run_folder(&self.model).join("eval"));
        derm_core::fsutil::create_dir_all(&out)?;
        let r = &e.report;
        // ROC curves, one per class.
        let series: Vec<Series> = e
            .roc_curves()
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.is_empty())
            .map(|(k, c)| {
                Series::new(
                    format!("{} (AUC {})", r.classes[k], fmt_opt(r.auc[k])),
                    c.iter().map(|p| (p.fpr, p.tpr)).collect(),
                )
            })
            .collect();
        let title = format!("ROC, {} {} (mean AUC {})", data.name, data.split, fmt_opt(r.mean_auc));
        image_io::save_png(
            &out.join("roc.png"),
            &plot::line_plot(&title, "false positive rate", "true positive rate", &series, &PlotOptions::roc()),
        )?;
        let cm = plot::confusion_matrix_image(
            &format!("confusion, {} {}", data.name, data.split),
            &r.classes,
            &r.confusion.counts,
        );
        image_io::save_png(&out.join("confusion.png"), &cm)?;
        let doc = derm_classify::EvalSummary {
            model: self.model.clone(),
            data: derm_classify::eval::DataRef {
                name: data.name.clone(),
                split: data.split.clone(),
                root: data.root.clone(),
            },
            tta,
            tta_views: clf.test_time_views(tta).len(),
            purified_input: self.purified_input.clone(),
            lesion_windows: clf.cfg.lesion_crop_margin.is_some(),
            lesion_masks: self.lesion_masks.clone(),
            report: r.clone(),
        };
        derm_core::fsutil::write_json(&out.join("metrics.json"), &doc)?;
        derm_classify::eval::Predictions {
            path: out.join("predictions.csv"),
            classes: r.classes.clone(),
            ids: e.ids.clone(),
            labels: e.labels.clone(),
            probs: e.probs.clone(),
        }
        .write()?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            println!(
                "{} images of {} ({}){}",
                r.images,
                data.name,
                data.split,
                if tta { format!(", {}-view TTA", doc.tta_views) } else { String::new() }
            );
            for (k, c) in r.classes.iter().enumerate() {
                println!(
                    "  {c:<22} n {:>5}  AUC {}  sensitivity {}  specificity {}",
                    r.class_counts[k],
                    fmt_opt(r.auc[k]),
                    fmt_opt(r.sensitivity[k]),
                    fmt_opt(r.specificity[k])
                );
            }
            let scored: Vec<&str> = r.scored_classes.iter().map(|&k| r.classes[k].as_str()).collect();
            println!("mean AUC ({})  {}", scored.join(", "), fmt_opt(r.mean_auc));
            for s in &r.melanoma_specificity {
                println!(
                    "{} specificity at {:.0}% sensitivity  {}",
                    r.classes[r.melanoma_class],
                    s.sensitivity * 100.0,
                    fmt_opt(s.specificity)
                );
            }
            println!("accuracy {:.4}  balanced accuracy {:.4}", r.accuracy, r.balanced_accuracy);
            println!("wrote roc.png, confusion.png, metrics.json, predictions.csv to {}", out.display());
        }
        Ok(())
    }
}

/// Dispatches the subcommand.
impl ClassifyCommand {
    /// Runs it.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        match self {
            ClassifyCommand::Train(a) => a.run(g),
            ClassifyCommand::Predict(a) => a.run(g),
            ClassifyCommand::Eval(a) => a.run(g),
            ClassifyCommand::Compare(a) => {
                let (base, other) = (
                    common::CompareArgs::csv(&a.base, "predictions.csv"),
                    common::CompareArgs::csv(&a.other, "predictions.csv"),
                );
                let b = derm_classify::eval::Predictions::read(&base)?;
                let c = b.compare(&derm_classify::eval::Predictions::read(&other)?, &a.bootstrap()?)?;
                a.print(&base, &other, &c)
            }
        }
    }
}
