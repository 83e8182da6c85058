//! # derm-classify: lesion classification with a trainable ResNet
//!
//! The classification stage of derm (Bisla et al., "Skin Lesion Segmentation and Classification
//! with Deep Learning System"): a ResNet (He et al. 2016; ResNet-18/34/50/101 from the same code)
//! trained on original images, optionally with the purify stage's cleaned versions and the synth
//! stage's generated images added, with flips and random crops (short side scaled to `resize`,
//! random `input_size` crop), class-balanced mini-batches or a class-weighted loss, SGD (lr 1e-3,
//! momentum 0.9, as the authors) or Adam, a second task that learns where the lesion is from the
//! training masks ([`aux`]), label smoothing, mixup or CutMix, an exponential moving
//! average of the weights as the kept model ([`derm_core::ema`]), and ImageNet normalisation. On a
//! CPU, the backbone can be frozen (pooled features computed once per image and flip, only `fc`
//! trained) or trained from a given stage on (`trainable_from`). Scoring follows the ISIC 2017
//! scorer (AUC per class and their mean, melanoma specificity at 82/89/95% sensitivity) and ISIC
//! 2018 (balanced accuracy), and an operating point for balanced accuracy is chosen on the
//! validation part and saved with the model.
//!
//! Two presets ([`ClassifyConfig::preset`]): `cpu`, the default (ResNet-18 at width 32, 128 px,
//! Adam 1e-3: the best measured on held-out ISIC images at 10-40 CPU minutes), and `paper`
//! (ResNet-50 at width 64, 224 px, SGD 1e-3 with momentum 0.9: the authors', for a GPU or
//! ImageNet weights).
//!
//! - [`model`]: the ResNet with torchvision's variable names and every stage's feature map;
//!   [`load_torchvision`] and [`Classifier::with_pretrained`] load torchvision's state dicts
//!   unchanged (`docs/pretrained.md`: the one command that converts torchvision's ImageNet
//!   weights, `bench/peer/export_torchvision.py OUT --pretrained`, the measured equivalence with
//!   PyTorch, and what `--freeze-backbone` costs on a CPU).
//! - [`data`]: purified and synthetic sources, scaled-image cache, training and test views.
//! - [`eval`]: the challenge metrics.
//! - [`mix`]: mixup and CutMix of training batches.
//! - [`aux`]: the auxiliary lesion-mask loss, on by default where the training images have
//!   masks (a head on `layer3` learns where the lesion is; prediction needs no mask).
//! - [`descriptors`]: the lesion's ABCD measurements (area, border, asymmetry, colour spread,
//!   contrast) from a view and its mask, an optional second regression target.
//!
//! **Consumes:** a labelled data set of derm-data (RGB images of any size; ISIC 2017 classes
//! melanoma, seborrheic keratosis, nevus, or any manifest's classes), optionally a folder of
//! `<id>_purified.png` and a synthetic data-set folder, optionally ImageNet weights as a
//! torchvision-named safetensors file. **Produces:** a checkpoint folder (`model.safetensors`,
//! `config.json` = [`ClassifyConfig`], `meta.json`), class probabilities (N, K) summing to 1,
//! and a [`ClassificationReport`].

#![forbid(unsafe_code)]

pub mod aux;
pub mod data;
pub mod descriptors;
pub mod eval;
pub mod mix;
pub mod model;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use derm_core::checkpoint::{self, Meta, TensorSpec};
use derm_core::ema::{self, WeightAverage};
use derm_core::image_io::{self, Normalize};
use derm_core::optim::{LrSchedule, OptimConfig, Optimizer, OptimizerKind};
use derm_core::symmetry::Symmetry;
use derm_core::train::{self, Keep, LoopConfig, StepLoss, Task, TrainState};
use derm_core::{Error, Result, Rng};
use derm_data::augment::AugmentConfig;
use derm_data::dataset::Dataset;
use derm_data::sampler::{BalancedSampler, Sampler, ShuffleSampler};
use image::{GrayImage, RgbImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use data::ExtraSources;
pub use eval::{score, ClassificationReport, EvalSummary};
pub use mix::BatchMix;
pub use model::{load_torchvision, parameter_count, BlockKind, ResNet, ResNetConfig, ResNetFeatures, Stage};

/// Everything a classification run is made of; saved as the checkpoint's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifyConfig {
    /// Network shape (`num_classes` is set from the data set's classes when training).
    pub model: ResNetConfig,
    /// Class names in label order (filled from the data set when training).
    pub classes: Vec<String>,
    /// Side of the square network input (224 for ImageNet weights; 96-128 on a CPU).
    pub input_size: u32,
    /// Images are scaled so their short side is this before cropping `input_size` (256 for 224).
    pub resize: u32,
    /// Images per batch.
    pub batch_size: usize,
    /// Optimiser (the authors: SGD, lr 1e-3, momentum 0.9).
    pub optim: OptimConfig,
    /// Epochs, step and time budget, evaluation and checkpoint cadence, seed.
    pub train: LoopConfig,
    /// Fraction of the training split held out for validation (by id hash).
    pub val_fraction: f64,
    /// Class-balanced mini-batches (each batch holds the classes equally); otherwise a shuffle.
    pub balanced: bool,
    /// Weight the loss by inverse class frequency.
    pub class_weighted_loss: bool,
    /// Random `input_size` crops in training (centred crops otherwise).
    pub random_crop: bool,
    /// Flips, quarter turns, extra crop-and-rescale and colour jitter after the crop (the
    /// authors: flips only).
    pub augment: AugmentConfig,
    /// Input normalisation (ImageNet statistics, as the pretrained weights expect).
    pub normalize: Normalize,
    /// Train only `fc` on pooled features computed once per image and view, with the backbone
    /// in eval mode (much faster on a CPU; meant for pretrained weights).
    pub freeze_backbone: bool,
    /// Views per image whose features are cached when `freeze_backbone` (1 to 8): the first
    /// `feature_views` of the augmentation's [`AugmentConfig::symmetries`], the image itself
    /// first (with flips: none, left-right, top-bottom, both; then the axis swaps of the
    /// quarter turns). An augmentation with fewer symmetries caches all it has.
    pub feature_views: usize,
    /// First stage trained when the backbone is not frozen (`conv1` trains everything; `layer4`
    /// trains layer4 and fc); earlier stages run in eval mode without gradients.
    pub trainable_from: Stage,
    /// ImageNet weights (torchvision names, safetensors) loaded before training, head replaced.
    pub pretrained: Option<PathBuf>,
    /// The operating point: per-class weights on the probabilities before the most probable
    /// class is taken (empty: all 1). AUCs do not depend on it; predictions, the confusion
    /// matrix and balanced accuracy do.
    pub decision_weights: Vec<f64>,
    /// After training, choose [`ClassifyConfig::decision_weights`] on the validation part for
    /// the best balanced accuracy and save them with the best model
    /// ([`select_operating_point`]).
    pub select_operating_point: bool,
    /// With `select_operating_point`: the operating point must keep at least this sensitivity
    /// for melanoma on the validation part (the best balanced accuracy among those that do; 0:
    /// no floor). Missing a melanoma costs more than a needless excision. By default 0.82, the
    /// first of the ISIC 2017 scorer's sensitivity levels ([`eval::ISIC2017_SENSITIVITIES`]): a
    /// floor met on a validation part of some 50 melanomas is met with less to spare on new
    /// images. Seven ISIC classifiers called 0.45-0.66 of the held-out melanomas with a floor of
    /// 0.6, and 0.64-0.75 with 0.82, at a balanced accuracy of 0.54-0.63 (BENCHMARKS.md, "The
    /// kept model and the melanoma floor").
    pub min_melanoma_sensitivity: f64,
    /// Bytes of scaled images kept in memory.
    pub cache_bytes: usize,
    /// Exponential moving average of the weights ([`derm_core::ema`]): the model is evaluated,
    /// kept and saved as the average with this decay per step (0: off, the weights of the last
    /// step). 0.998 by default: with it the validation metric rises steadily, so the kept
    /// checkpoint is not a noise peak (BENCHMARKS.md).
    pub ema_decay: f64,
    /// Label smoothing: the target puts this share of its mass evenly on all classes (0: off).
    pub label_smoothing: f64,
    /// Dropout before the final layer in training: each pooled feature of each training image is
    /// zeroed with this probability and the others scaled by `1 / (1 - p)`, drawn from the run's
    /// seed ([`dropout_mask`]; 0: off, and no draw is taken). Prediction uses every feature. 0
    /// by default, and in configs saved before it existed: on held-out ISIC images after 20 CPU
    /// minutes 0.3 scored 0.818 mean AUC against the defaults' 0.835 (one seed; BENCHMARKS.md,
    /// "A diagnosis per lesion cell, dropout and a longer weight average").
    #[serde(default)]
    pub dropout: f64,
    /// Lesion-centred classification: each image is cut to the square around its lesion mask's
    /// bounding box, widened by this share of the box's longer side on each side
    /// ([`data::lesion_window`]), before scaling and cropping; `None`: whole images. Training reads
    /// the data set's masks; evaluation and prediction need a lesion mask for every image (the
    /// segmenter's). Synthetic training images are read whole.
    pub lesion_crop_margin: Option<f64>,
    /// Mixup or CutMix of the training batches ([`mix`]; off by default). Needs the backbone
    /// trained (not `freeze_backbone`).
    pub mix: BatchMix,
    /// Average the class probabilities over the [`Classifier::test_time_views`] at inference:
    /// prediction, evaluation and the operating point's choice (validation during training
    /// scores one view). On by default: on held-out ISIC images the eight views of seven
    /// classifiers trained with quarter turns raised mean AUC by 0.003-0.010 (BENCHMARKS.md).
    pub test_time_augmentation: bool,
    /// Weight of the auxiliary lesion-mask loss ([`aux`]): a 1x1 head on
    /// [`ClassifyConfig::aux_mask_stage`] learns, from
    /// each training image's lesion mask, which cells the lesion covers, and its binary
    /// cross-entropy is added to the classification loss with this weight (0: off). Training
    /// reads lesion masks (the data set's, or `--lesion-masks`); prediction does not. 1 by
    /// default: on held-out ISIC images after 20 CPU minutes it raised the cpu preset's mean AUC
    /// from 0.788 / 0.801 to 0.835 / 0.820 (two seeds; BENCHMARKS.md, "A second task: where the
    /// lesion is"). Where it cannot train (no masks, a frozen backbone, mixing) it is off, with a
    /// warning ([`ClassifyConfig::aux_mask_blocker`]). A config saved before the head existed
    /// has no such field and reads as 0, so its checkpoint still loads.
    #[serde(default = "no_aux_mask")]
    pub aux_mask_weight: f64,
    /// The stage whose output the lesion-mask head reads: `layer1` .. `layer4` (a cell per 4, 8,
    /// 16 or 32 pixels of the input). `layer3` by default, and in configs saved before the choice
    /// existed: on held-out ISIC images after 20 CPU minutes (one seed) a head on `layer2` or
    /// `layer4` scored 0.810 / 0.808 mean AUC against `layer3`'s 0.835 and no head's 0.788
    /// (BENCHMARKS.md, "The lesion-mask head: its weight, its stage").
    #[serde(default = "aux_default_stage")]
    pub aux_mask_stage: Stage,
    /// A second stage the lesion-mask head reads (`layer1` .. `layer4`, not
    /// [`ClassifyConfig::aux_mask_stage`]): a 1x1 map of its own learns the same masks at that
    /// stage's grid, its loss added with [`ClassifyConfig::aux_mask_weight`] ([`aux`]). Training
    /// only; needs the head. None by default, and in configs saved before it existed: on held-out
    /// ISIC images after 40 CPU minutes `layer2` beside `layer3` scored 0.826 mean AUC against the
    /// head alone's 0.825, paired +0.000 (-0.009 to +0.011; one seed; BENCHMARKS.md, "A second
    /// map for the lesion-mask head").
    #[serde(default)]
    pub aux_mask_second_stage: Option<Stage>,
    /// Lesion-weighted pooling ([`aux`]): the lesion-mask head also runs at prediction, and the
    /// last stage's features averaged with the weights of its lesion probabilities add their own
    /// logits to those of the plain average, so the classifier reads the lesion apart from the
    /// whole image; prediction still needs no mask. Needs the head (`aux_mask_weight` > 0). Off
    /// by default: on held-out ISIC images after 20 CPU minutes it scored 0.821 / 0.823 mean AUC
    /// (two seeds) against the head alone's 0.835 / 0.820 (BENCHMARKS.md, "Lesion-weighted
    /// pooling").
    #[serde(default)]
    pub lesion_pooling: bool,
    /// Weight of the per-cell diagnosis loss ([`aux`]): the lesion-mask head also gives class
    /// logits for each cell of its stage, trained against the image's label on the cells the
    /// lesion covers (each weighted by its share), so that every part of the lesion has to look
    /// like its diagnosis. Training only; needs the head (`aux_mask_weight` > 0). 0 (off) by
    /// default, and in configs saved before it existed: on held-out ISIC images after 20 CPU
    /// minutes weight 1 scored 0.827 mean AUC against the defaults' 0.835 (one seed;
    /// BENCHMARKS.md, "A diagnosis per lesion cell, dropout and a longer weight average").
    #[serde(default)]
    pub aux_cell_weight: f64,
    /// Weight of the lesion-descriptor loss ([`descriptors`]): a linear map of the pooled
    /// last-stage features also regresses the ABCD measurements (area, border, asymmetry,
    /// colour spread, contrast) of each training view's lesion, standardised over the training
    /// images, and its mean squared error is added with this weight. Training only; needs the
    /// lesion-mask head (`aux_mask_weight` > 0), whose masks it reads, and is off with its loss.
    /// 0 (off) by default, and in configs saved before it existed: on held-out ISIC images after
    /// 40 CPU minutes weight 1 scored +0.011 and -0.003 mean AUC against the defaults on two
    /// seeds (paired intervals -0.009 to +0.032 and -0.024 to +0.016; BENCHMARKS.md, "Lesion
    /// descriptors as a second regression target").
    #[serde(default)]
    pub aux_descriptor_weight: f64,
    /// Sharpness-aware minimisation ([`Optimizer::sharpness_aware_step`]): each step descends the
    /// highest loss within this distance of the weights (the radius, in the weights' own units;
    /// 0: off, a plain step). Each step takes two forward and backward passes, so a run of fixed
    /// minutes takes about half the steps. 0 by default, and in configs saved before it existed:
    /// on held-out ISIC images radius 0.05 scored 0.819 mean AUC against the defaults' 0.835 after
    /// 20 CPU minutes and 0.823 against 0.834 after 40 (one seed each; BENCHMARKS.md, "Sharpness-aware
    /// steps, the test-time scale, the held-out share and the batch").
    #[serde(default)]
    pub sam_rho: f64,
}

/// The lesion-mask weight of a saved config without the field: off.
fn no_aux_mask() -> f64 {
    0.0
}

fn aux_default_stage() -> Stage {
    aux::DEFAULT_STAGE
}

/// The classifier presets `derm classify train --preset` names: `cpu`, the default, and
/// `paper`.
pub const CLASSIFY_PRESETS: [&str; 2] = ["cpu", "paper"];

/// The CPU preset, [`ClassifyConfig::default`]: the network, input and optimiser that scored
/// best on held-out ISIC images at 10-40 CPU minutes (BENCHMARKS.md, "Quality on real images"):
/// ResNet-18 at width 32 on 128 px crops of 146 px images, Adam 1e-3 at a constant rate. Width
/// 48, width 24, 160 px, the cosine and AdamW all scored level or lower at 20 minutes. On 2 CPU
/// cores a step of the paper's ResNet-50 at 224 px takes 2.0 s for a batch of 8 (`cargo xtask
/// bench`); this network's takes 0.19 s for a batch of 16.
impl Default for ClassifyConfig {
    fn default() -> Self {
        ClassifyConfig {
            // From scratch, residual branches start at zero (torchvision's zero_init_residual).
            model: ResNetConfig { base_width: 32, zero_init_residual: true, ..ResNetConfig::resnet18(3) },
            classes: Vec::new(),
            input_size: 128,
            resize: 146,
            batch_size: 16,
            optim: OptimConfig {
                optimizer: OptimizerKind::adam(1e-3),
                schedule: LrSchedule::Constant,
                clip_grad_norm: None,
            },
            // The final average, not the best of ~50 evaluations on a validation part of some 50
            // melanomas: over seven ISIC runs it scored 0.794 mean AUC on held-out images, the best
            // checkpoints 0.778 (BENCHMARKS.md).
            train: LoopConfig { epochs: 30, keep: Keep::Last, ..Default::default() },
            val_fraction: 0.15,
            balanced: false,
            class_weighted_loss: false,
            random_crop: true,
            augment: AugmentConfig::flips(),
            normalize: Normalize::IMAGENET,
            freeze_backbone: false,
            feature_views: 4,
            trainable_from: Stage::Conv1,
            pretrained: None,
            decision_weights: Vec::new(),
            // On by default: at the arg-max rule the classifier called almost every ISIC image a
            // nevus (balanced accuracy 0.41, melanoma sensitivity 0.07; issue 22).
            select_operating_point: true,
            min_melanoma_sensitivity: eval::ISIC2017_SENSITIVITIES[0],
            cache_bytes: 1 << 30,
            ema_decay: 0.998,
            label_smoothing: 0.0,
            dropout: 0.0,
            sam_rho: 0.0,
            lesion_crop_margin: None,
            mix: BatchMix::Off,
            test_time_augmentation: true,
            aux_mask_weight: 1.0,
            aux_mask_stage: aux::DEFAULT_STAGE,
            aux_mask_second_stage: None,
            lesion_pooling: false,
            aux_cell_weight: 0.0,
            aux_descriptor_weight: 0.0,
        }
    }
}

impl ClassifyConfig {
    /// The paper's classifier (Bisla et al.), for a GPU or ImageNet weights: ResNet-50 at width
    /// 64 on 224 px crops of 256 px images, SGD lr 1e-3 with momentum 0.9; everything else as
    /// the default.
    pub fn paper() -> Self {
        ClassifyConfig {
            model: ResNetConfig { zero_init_residual: true, ..ResNetConfig::resnet50(3) },
            input_size: 224,
            resize: 256,
            optim: OptimConfig { optimizer: OptimizerKind::sgd(1e-3, 0.9), ..ClassifyConfig::default().optim },
            ..ClassifyConfig::default()
        }
    }

    /// A preset by name ([`CLASSIFY_PRESETS`]): `cpu` ([`ClassifyConfig::default`]) or `paper`
    /// ([`ClassifyConfig::paper`]).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "cpu" => Some(ClassifyConfig::default()),
            "paper" => Some(ClassifyConfig::paper()),
            _ => None,
        }
    }

    /// Sets what a preset decides: the network (its class count kept), the input and resize
    /// sizes, the batch and the optimiser; the rest of the config stays.
    pub fn apply_preset(&mut self, name: &str) -> Result<()> {
        let p = ClassifyConfig::preset(name).ok_or_else(|| {
            Error::invalid(format!("unknown classifier preset {name:?}: use {}", CLASSIFY_PRESETS.join(" or ")))
        })?;
        self.model = ResNetConfig { num_classes: self.model.num_classes, ..p.model };
        (self.input_size, self.resize, self.batch_size, self.optim) = (p.input_size, p.resize, p.batch_size, p.optim);
        Ok(())
    }

    /// The preset this config's network, sizes, batch and optimiser are (whatever else is set),
    /// or `None`.
    pub fn preset_name(&self) -> Option<&'static str> {
        CLASSIFY_PRESETS.into_iter().find(|&name| {
            let mut p = self.clone();
            p.apply_preset(name).is_ok() && {
                // ImageNet weights turn the zero start of the residual branches off.
                p.model.zero_init_residual = self.model.zero_init_residual;
                p == *self
            }
        })
    }

    /// Checks sizes and settings that do not fit together.
    pub fn validate(&self) -> Result<()> {
        if self.input_size < 32 || self.resize < self.input_size {
            return Err(Error::invalid(format!(
                "classify: input_size {} must be at least 32 and resize {} at least input_size",
                self.input_size, self.resize
            )));
        }
        let f = self.model.space_to_depth;
        if f == 0 || !self.input_size.is_multiple_of(f as u32) {
            return Err(Error::invalid(format!(
                "classify: input_size {} must be a multiple of the stem's space_to_depth {f} (at least 1)",
                self.input_size
            )));
        }
        if f > 1 && self.pretrained.is_some() {
            return Err(Error::invalid(format!(
                "classify: torchvision weights fit a 7x7 stem on RGB, not space_to_depth {f}: use 1 with pretrained"
            )));
        }
        if self.batch_size == 0 {
            return Err(Error::invalid("classify: batch_size must be at least 1"));
        }
        if self.lesion_pooling && self.aux_mask_weight <= 0.0 {
            return Err(Error::invalid(
                "classify: lesion_pooling weighs the features by the lesion-mask head's map and needs aux_mask_weight > 0",
            ));
        }
        if !(self.aux_cell_weight.is_finite() && self.aux_cell_weight >= 0.0) {
            return Err(Error::invalid(format!(
                "classify: aux_cell_weight {} must be a number of at least 0",
                self.aux_cell_weight
            )));
        }
        if !(self.aux_descriptor_weight.is_finite() && self.aux_descriptor_weight >= 0.0) {
            return Err(Error::invalid(format!(
                "classify: aux_descriptor_weight {} must be a number of at least 0",
                self.aux_descriptor_weight
            )));
        }
        if self.aux_descriptor_weight > 0.0 && self.aux_mask_weight <= 0.0 {
            return Err(Error::invalid(
                "classify: aux_descriptor_weight measures each view's lesion from the lesion masks the lesion-mask \
                 head learns from and needs aux_mask_weight > 0",
            ));
        }
        if self.aux_cell_weight > 0.0 && self.aux_mask_weight <= 0.0 {
            return Err(Error::invalid(
                "classify: aux_cell_weight weighs the lesion's cells by the lesion masks the lesion-mask head learns \
                 from and needs aux_mask_weight > 0",
            ));
        }
        if !(1..=8).contains(&self.feature_views) {
            return Err(Error::invalid(format!("classify: feature_views {} is not in 1..=8", self.feature_views)));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(Error::invalid(format!("classify: ema_decay {} is not in [0, 1)", self.ema_decay)));
        }
        if !(0.0..=1.0).contains(&self.min_melanoma_sensitivity) {
            return Err(Error::invalid(format!(
                "classify: min_melanoma_sensitivity {} is not in [0, 1]",
                self.min_melanoma_sensitivity
            )));
        }
        if !(self.sam_rho >= 0.0 && self.sam_rho.is_finite()) {
            return Err(Error::invalid(format!("classify: sam_rho {} is not a finite radius >= 0", self.sam_rho)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid(format!("classify: dropout {} is not in [0, 1)", self.dropout)));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(Error::invalid(format!("classify: label_smoothing {} is not in [0, 1)", self.label_smoothing)));
        }
        self.mix.validate()?;
        self.augment.validate()?;
        if self.mix.is_on() && self.freeze_backbone {
            return Err(Error::invalid(
                "classify: mixup and CutMix mix images, so the backbone must be trained (not frozen)",
            ));
        }
        if !(self.aux_mask_weight.is_finite() && self.aux_mask_weight >= 0.0) {
            return Err(Error::invalid(format!(
                "classify: aux_mask_weight {} must be a number of at least 0",
                self.aux_mask_weight
            )));
        }
        if !aux::STAGES.contains(&self.aux_mask_stage) {
            return Err(Error::invalid(format!(
                "classify: aux_mask_stage {} is not a stage the lesion-mask head can read: use layer1 .. layer4",
                self.aux_mask_stage.name()
            )));
        }
        if let Some(second) = self.aux_mask_second_stage {
            if !aux::STAGES.contains(&second) || second == self.aux_mask_stage {
                return Err(Error::invalid(format!(
                    "classify: aux_mask_second_stage {} must be one of layer1 .. layer4 other than aux_mask_stage {}",
                    second.name(),
                    self.aux_mask_stage.name()
                )));
            }
            if self.aux_mask_weight <= 0.0 {
                return Err(Error::invalid(
                    "classify: aux_mask_second_stage adds a map to the lesion-mask head and needs aux_mask_weight > 0",
                ));
            }
        }
        if let Some(m) = self.lesion_crop_margin.filter(|m| !(0.0..=2.0).contains(m)) {
            return Err(Error::invalid(format!("classify: lesion_crop_margin {m} is not in [0, 2]")));
        }
        if !self.classes.is_empty() && self.classes.len() != self.model.num_classes {
            return Err(Error::invalid(format!(
                "classify: {} class names but the model has {} outputs",
                self.classes.len(),
                self.model.num_classes
            )));
        }
        Ok(())
    }

    /// What a run trains, in one line for its log: the network and its width, where its weights
    /// start, input size, batch, optimiser, and the options that change the training.
    pub fn describe(&self) -> String {
        let start = match &self.pretrained {
            Some(p) => format!("weights from {}", p.display()),
            None => "from scratch".into(),
        };
        let preset = self.preset_name().map(|p| format!("; {p} preset")).unwrap_or_default();
        let mut s = format!(
            "{} (width {}, {start}{preset}), {} px from {} px, batch {}, {}, augment ({})",
            self.model.name(),
            self.model.base_width,
            self.input_size,
            self.resize,
            self.batch_size,
            self.optim.describe(),
            self.augment.describe()
        );
        if self.freeze_backbone {
            s.push_str(", frozen backbone");
        } else if self.trainable_from != Stage::Conv1 {
            s.push_str(&format!(", trained from {}", self.trainable_from.name()));
        }
        if let Some(m) = self.lesion_crop_margin {
            s.push_str(&format!(", lesion windows (margin {m})"));
        }
        if self.balanced {
            s.push_str(", class-balanced batches");
        }
        if self.class_weighted_loss {
            s.push_str(", class-weighted loss");
        }
        match self.mix {
            BatchMix::Off => {}
            BatchMix::Mixup { alpha } => s.push_str(&format!(", mixup (alpha {alpha})")),
            BatchMix::CutMix { alpha } => s.push_str(&format!(", cutmix (alpha {alpha})")),
        }
        if self.label_smoothing > 0.0 {
            s.push_str(&format!(", label smoothing {}", self.label_smoothing));
        }
        if self.dropout > 0.0 {
            s.push_str(&format!(", dropout {} before fc", self.dropout));
        }
        if self.sam_rho > 0.0 {
            s.push_str(&format!(", sharpness-aware steps (radius {})", self.sam_rho));
        }
        if self.aux_mask_weight > 0.0 {
            let second = self.aux_mask_second_stage.map(|s| format!(" and {}", s.name())).unwrap_or_default();
            s.push_str(&format!(
                ", lesion-mask loss on {}{second} (weight {})",
                self.aux_mask_stage.name(),
                self.aux_mask_weight
            ));
            if self.lesion_pooling {
                s.push_str(", lesion-weighted pooling");
            }
            if self.aux_cell_weight > 0.0 {
                s.push_str(&format!(", diagnosis per lesion cell (weight {})", self.aux_cell_weight));
            }
            if self.aux_descriptor_weight > 0.0 {
                s.push_str(&format!(", lesion descriptors (weight {})", self.aux_descriptor_weight));
            }
        }
        if self.ema_decay > 0.0 {
            s.push_str(&format!(", EMA {}", self.ema_decay));
        }
        if self.select_operating_point {
            s.push_str(&format!(
                ", operating point chosen for balanced accuracy (melanoma sensitivity at least {})",
                self.min_melanoma_sensitivity
            ));
        }
        s
    }

    /// What in this config, besides the lesion-mask loss (with its second stage and the lesion
    /// descriptors, which are off with it), needs the lesion-mask head: lesion pooling or the
    /// per-cell diagnosis, by name; `None` when nothing else does. Where the head
    /// cannot train, the loss alone is turned off, but a config that needs the head is refused.
    pub fn needs_mask_head(&self) -> Option<&'static str> {
        if self.lesion_pooling {
            Some("lesion pooling")
        } else if self.aux_cell_weight > 0.0 {
            Some("the per-cell diagnosis")
        } else {
            None
        }
    }

    /// Turns the lesion-mask loss off, with what trains only beside it: its second stage and the
    /// lesion descriptors (where something else needs the head, [`ClassifyConfig::validate`]
    /// then refuses the config).
    pub fn mask_loss_off(&mut self) {
        self.aux_mask_weight = 0.0;
        self.aux_mask_second_stage = None;
        self.aux_descriptor_weight = 0.0;
    }

    /// Why the lesion-mask loss cannot train on `data` with this config, or `None` when it can
    /// (or is off). It needs unmixed images, the backbone trained up to its stage, and at least
    /// one labelled image with a lesion mask; [`ClassifyTask::new`] turns it off with a warning
    /// giving this reason, and the command line refuses an explicit `--aux-mask-weight` with it.
    pub fn aux_mask_blocker(&self, data: &Dataset) -> Option<String> {
        if self.aux_mask_weight <= 0.0 {
            return None;
        }
        let first = self.aux_mask_second_stage.map_or(self.aux_mask_stage, |s| s.min(self.aux_mask_stage));
        let stage = first.name();
        if self.mix.is_on() {
            Some("mixup and CutMix blend images, and the lesion-mask loss needs each image's own mask".into())
        } else if self.freeze_backbone {
            Some(format!("the backbone is frozen, and the lesion-mask loss trains it up to {stage}"))
        } else if self.first_trained_stage() > first {
            Some(format!(
                "training starts at {}, after {stage}, where the lesion-mask loss reads",
                self.trainable_from.name()
            ))
        } else if !data.samples.iter().any(|s| s.label.is_some() && s.mask.is_some()) {
            Some(format!(
                "no labelled image of {} has a lesion mask (give a folder of <id>_segmentation.png, as `derm segment \
                 predict` writes, with --lesion-masks)",
                data.name
            ))
        } else {
            None
        }
    }

    /// The first stage the optimiser updates.
    pub fn first_trained_stage(&self) -> Stage {
        if self.freeze_backbone {
            Stage::Fc
        } else {
            self.trainable_from
        }
    }
}

fn meta(cfg: &ClassifyConfig) -> Meta {
    let mut m = Meta::new("classify", &cfg.model.name());
    let n = cfg.normalize;
    m.inputs.push(TensorSpec {
        name: "image".into(),
        shape: vec![None, Some(3), Some(cfg.input_size as usize), Some(cfg.input_size as usize)],
        dtype: "f32".into(),
        range: None,
        description: format!(
            "RGB{}, short side scaled to {} then centre-cropped to {}, normalised with mean {:?} std {:?}",
            match cfg.lesion_crop_margin {
                Some(m) => format!(" cut to the lesion mask's bounding square widened by {m} of its side"),
                None => String::new(),
            },
            cfg.resize,
            cfg.input_size,
            n.mean,
            n.std
        ),
    });
    m.outputs.push(TensorSpec {
        name: "logits".into(),
        shape: vec![None, Some(cfg.model.num_classes)],
        dtype: "f32".into(),
        range: None,
        description: format!("class logits for {:?}; softmax gives the probabilities", cfg.classes),
    });
    m.extra = serde_json::json!({ "classes": cfg.classes, "input_size": cfg.input_size, "resize": cfg.resize });
    m
}

/// A built network with its weights.
pub struct Classifier {
    /// The configuration it was trained with.
    pub cfg: ClassifyConfig,
    /// The network.
    pub net: ResNet,
    /// Its variables.
    pub varmap: VarMap,
    /// Where it runs.
    pub device: Device,
    /// The auxiliary lesion-mask head, when `cfg.aux_mask_weight` is on (training; also prediction
    /// with `cfg.lesion_pooling`).
    pub aux: Option<aux::MaskHead>,
}

impl Classifier {
    /// A freshly initialised network (seeded by `cfg.train.seed`); no pretrained weights loaded.
    pub fn new(cfg: ClassifyConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let varmap = VarMap::new();
        let vb = derm_core::nn::seeded_var_builder(&varmap, cfg.train.seed, DType::F32, device);
        let net = ResNet::new(&cfg.model, vb.clone())?;
        let aux = match cfg.aux_mask_weight > 0.0 {
            true => {
                let stage = cfg.aux_mask_stage;
                let channels = net.stage_channels(stage);
                let mut head = aux::MaskHead::new(channels, stage, vb.pp(aux::PREFIX))?;
                if cfg.aux_cell_weight > 0.0 {
                    head = head.with_cell_classes(channels, cfg.model.num_classes, vb.pp(aux::PREFIX))?;
                }
                if let Some(second) = cfg.aux_mask_second_stage {
                    head = head.with_second_stage(net.stage_channels(second), second, vb.pp(aux::PREFIX))?;
                }
                if cfg.aux_descriptor_weight > 0.0 {
                    head = head.with_descriptors(cfg.model.feature_dim(), vb.pp(aux::PREFIX))?;
                }
                Some(match cfg.lesion_pooling {
                    true => {
                        head.with_lesion_pooling(cfg.model.feature_dim(), cfg.model.num_classes, vb.pp(aux::PREFIX))?
                    }
                    false => head,
                })
            }
            false => None,
        };
        Ok(Classifier { cfg, net, varmap, device: device.clone(), aux })
    }

    /// The batch-norm running statistics among its variables: what a training forward pass
    /// changes outside the gradient ([`StepOptions::state`]).
    pub fn running_statistics(&self) -> Vec<candle_core::Var> {
        match self.varmap.data().lock() {
            Ok(d) => d.iter().filter(|(k, _)| derm_core::optim::is_buffer(k)).map(|(_, v)| v.clone()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// A network initialised as [`Classifier::new`], then, when `cfg.pretrained` names a file,
    /// with its torchvision-named weights loaded and the classifier head replaced by a fresh one
    /// of `cfg.model.num_classes` outputs (see [`load_torchvision`]). What `derm classify train
    /// --pretrained FILE` does before training.
    pub fn with_pretrained(cfg: ClassifyConfig, device: &Device) -> Result<Self> {
        let clf = Classifier::new(cfg, device)?;
        if let Some(p) = &clf.cfg.pretrained {
            load_torchvision(&clf.varmap, p, true)?;
            tracing::info!(path = %p.display(), "pretrained weights loaded, head replaced");
        }
        Ok(clf)
    }

    /// Loads a checkpoint folder (a run folder's `best` or `last`, or a run folder, whose `best`
    /// is used).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let dir = train::resolve_model_dir(dir);
        checkpoint::read_meta(&dir, "classify")?;
        let cfg: ClassifyConfig = checkpoint::read_config(&dir)?;
        let c = Classifier::new(ClassifyConfig { pretrained: None, ..cfg }, device)?;
        let dir = checkpoint::resolve(&dir)?;
        checkpoint::load_varmap(&c.varmap, &dir.join(checkpoint::WEIGHTS), checkpoint::Strictness::Exact, |_| false)?;
        Ok(c)
    }

    /// Class names (or `class0`, `class1`, ... when the config has none).
    pub fn class_names(&self) -> Vec<String> {
        if self.cfg.classes.len() == self.cfg.model.num_classes {
            self.cfg.classes.clone()
        } else {
            (0..self.cfg.model.num_classes).map(|k| format!("class{k}")).collect()
        }
    }

    /// The evaluation view of an image of any size (short side to `resize`, centre crop).
    pub fn view(&self, img: &RgbImage) -> RgbImage {
        data::center_view(img, self.cfg.resize, self.cfg.input_size)
    }

    /// The evaluation view of an image with its lesion mask (0/255, the image's size): for a
    /// model trained on lesion windows ([`ClassifyConfig::lesion_crop_margin`]) the window around
    /// the lesion, otherwise the whole image, then [`Classifier::view`]. An empty mask leaves
    /// the image whole.
    pub fn lesion_view(&self, img: &RgbImage, mask: &GrayImage) -> Result<RgbImage> {
        if mask.dimensions() != img.dimensions() {
            return Err(Error::invalid(format!(
                "lesion mask is {}x{} but the image is {}x{}",
                mask.width(),
                mask.height(),
                img.width(),
                img.height()
            )));
        }
        Ok(match self.lesion_window(mask) {
            Some(c) => self.view(&c.apply(img)),
            None => self.view(img),
        })
    }

    /// The window this model cuts around the lesion of `mask` (`None` for a model of whole
    /// images, or an empty mask).
    pub fn lesion_window(&self, mask: &GrayImage) -> Option<image_io::Crop> {
        self.cfg.lesion_crop_margin.and_then(|m| data::lesion_window(mask, m))
    }

    /// Logits (N, K) of views already at `input_size`, batch norm in eval mode.
    pub fn logits(&self, views: &[&RgbImage]) -> Result<Tensor> {
        let x = image_io::images_to_tensor(views, self.cfg.normalize, &self.device)?;
        // The lesion-mask head runs at prediction only when the logits read its map.
        let head = self.aux.as_ref().filter(|h| h.pools());
        Ok(forward_with_head(&self.net, head, &x, false, Stage::Conv1)?.0)
    }

    /// Class probabilities (one row per image, summing to 1) of images of any size; with `tta`
    /// the mean over the [`Classifier::test_time_views`].
    pub fn probabilities(&self, imgs: &[&RgbImage], tta: bool) -> Result<Vec<Vec<f64>>> {
        let views: Vec<RgbImage> = imgs.iter().map(|i| self.view(i)).collect();
        self.view_probabilities(&views, tta)
    }

    /// The views test-time augmentation averages ([`AugmentConfig::test_time_views`]): with
    /// `tta`, the symmetries of the square the model was trained to ignore (the four flips, or
    /// all eight for a model trained with flips and quarter turns); without, the image alone.
    pub fn test_time_views(&self, tta: bool) -> Vec<Symmetry> {
        self.cfg.augment.test_time_views(tta)
    }

    /// [`Classifier::probabilities`] of views already at `input_size`.
    pub fn view_probabilities(&self, views: &[RgbImage], tta: bool) -> Result<Vec<Vec<f64>>> {
        let symmetries = self.test_time_views(tta);
        let k = self.cfg.model.num_classes;
        let mut out = vec![vec![0f64; k]; views.len()];
        let bs = self.cfg.batch_size.max(1);
        for s in &symmetries {
            for (c, chunk) in views.chunks(bs).enumerate() {
                let turned: Vec<RgbImage> = chunk.iter().map(|v| s.image(v)).collect();
                let refs: Vec<&RgbImage> = turned.iter().collect();
                let p =
                    derm_kernels::ops::softmax(&self.logits(&refs)?, 1)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
                for (i, row) in p.iter().enumerate() {
                    for (o, v) in out[c * bs + i].iter_mut().zip(row) {
                        *o += *v as f64 / symmetries.len() as f64;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// A preprocessing step applied to each image before classification (test-time purification).
pub type Preprocess<'a> = &'a dyn Fn(&RgbImage) -> Result<RgbImage>;

/// Per-image results of an evaluation, with the scores.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// Image ids, in data-set order (unlabelled samples are left out).
    pub ids: Vec<String>,
    /// True labels.
    pub labels: Vec<usize>,
    /// Class probabilities.
    pub probs: Vec<Vec<f64>>,
    /// The scores.
    pub report: ClassificationReport,
}

impl Evaluation {
    /// The one-vs-rest ROC curve of each class.
    pub fn roc_curves(&self) -> Vec<Vec<derm_core::metrics::RocPoint>> {
        eval::roc_curves(&self.probs, &self.labels, self.report.classes.len())
    }
}

/// Classifies every labelled image of `data` (after `preprocess`, for example test-time
/// purification; with `tta` averaging the [`Classifier::test_time_views`]) and scores the
/// result. The data set's classes must be the model's.
pub fn evaluate(
    clf: &Classifier,
    data: &Dataset,
    preprocess: Option<Preprocess>,
    tta: bool,
    on_image: &mut dyn FnMut(usize),
) -> Result<Evaluation> {
    let classes = clf.class_names();
    if data.classes != classes {
        return Err(Error::invalid(format!(
            "{}: classes {:?} differ from the model's {:?}",
            data.name, data.classes, classes
        )));
    }
    let labelled: Vec<usize> = (0..data.len()).filter(|&i| data.samples[i].label.is_some()).collect();
    if labelled.is_empty() {
        return Err(Error::invalid(format!("{} split {}: no labelled image to score", data.name, data.split)));
    }
    let margin = clf.cfg.lesion_crop_margin;
    if margin.is_some() {
        data::require_masks(data, "classify eval")?;
    }
    let cache = data::ScaledCache::new(clf.cfg.resize, 0, margin);
    let (mut ids, mut labels, mut probs) = (Vec::new(), Vec::new(), Vec::new());
    for chunk in labelled.chunks(clf.cfg.batch_size.max(1)) {
        let views: Vec<RgbImage> = match preprocess {
            // The preprocessing step sees each image at its own size, before the lesion window.
            Some(f) => chunk
                .iter()
                .map(|&i| {
                    let s = &data.samples[i];
                    let img = f(&image_io::load_rgb(&s.image)?)?;
                    Ok(match (margin, &s.mask) {
                        (Some(m), Some(mask)) => clf.view(&data::lesion_crop(&img, &s.image, mask, m)?),
                        _ => clf.view(&img),
                    })
                })
                .collect::<Result<_>>()?,
            None => cache.load(data, chunk)?.iter().map(|img| clf.view(img)).collect(),
        };
        probs.extend(clf.view_probabilities(&views, tta)?);
        for &i in chunk {
            ids.push(data.samples[i].id.clone());
            labels.push(data.samples[i].label.unwrap_or(0));
        }
        on_image(chunk.len());
    }
    // The data set's melanoma class, when it names the model's classes in the same order.
    let melanoma = data.melanoma_class.filter(|_| data.classes == classes);
    let report = score(&probs, &labels, &classes, melanoma, &clf.cfg.decision_weights);
    Ok(Evaluation { ids, labels, probs, report })
}

/// Mean cross-entropy of (N, K) logits against (N,) u32 labels, optionally weighted per class
/// (the weighted mean divides by the sum of the targets' weights, as PyTorch).
pub fn loss(logits: &Tensor, y: &Tensor, class_weights: Option<&Tensor>) -> Result<Tensor> {
    Ok(derm_kernels::ops::cross_entropy(logits, y, class_weights)?)
}

/// [`loss`] with label smoothing `eps`: `(1 - eps)` times the cross-entropy plus `eps` times the
/// mean over the batch and the classes of `-log p` (the cross-entropy against the uniform
/// distribution), as PyTorch's `label_smoothing` without class weights.
pub fn smoothed_loss(logits: &Tensor, y: &Tensor, class_weights: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let ce = loss(logits, y, class_weights)?;
    if eps <= 0.0 {
        return Ok(ce);
    }
    let uniform = derm_kernels::ops::log_softmax(logits, candle_core::D::Minus1)?.mean_all()?.neg()?;
    Ok(((ce * (1.0 - eps))? + (uniform * eps)?)?)
}

/// What a training step does besides its batch and network: the class weights of the loss,
/// label smoothing ([`smoothed_loss`]; 0 for none), the first stage it trains (those before it stay
/// fixed), dropout's multipliers on the pooled features ([`dropout_mask`]), and sharpness-aware
/// minimisation's radius with the variables it puts back after its second pass
/// ([`Optimizer::sharpness_aware_step`]; radius 0 for a plain step). `StepOptions::default()`:
/// none of them, every stage trained.
#[derive(Debug, Clone, Copy)]
pub struct StepOptions<'a> {
    /// Per-class weights of the cross-entropy, (K,).
    pub class_weights: Option<&'a Tensor>,
    /// Label smoothing.
    pub label_smoothing: f64,
    /// The first stage trained.
    pub trainable_from: Stage,
    /// Dropout's multipliers, (N, C).
    pub keep: Option<&'a Tensor>,
    /// SAM's radius (0: off).
    pub sam_rho: f64,
    /// The variables a forward pass changes outside the gradient (the batch-norm running
    /// statistics, [`Classifier::running_statistics`]), put back after SAM's second pass.
    pub state: &'a [candle_core::Var],
}

impl Default for StepOptions<'_> {
    fn default() -> Self {
        StepOptions {
            class_weights: None,
            label_smoothing: 0.0,
            trainable_from: Stage::Conv1,
            keep: None,
            sam_rho: 0.0,
            state: &[],
        }
    }
}

/// One optimiser step of cross-entropy on a batch: `batch.x` (N, 3, H, W) normalised, mixed or
/// as drawn ([`mix::BatchMix::apply`], [`mix::Batch::unmixed`]), `y` (N,) u32 the labels of the
/// images as drawn (a mixed batch weighs them and its partners' labels by the mixing weight),
/// with the step's [`StepOptions`]. Returns the loss before the step and the gradient norm,
/// unread ([`StepLoss`]). This is what a benchmark times.
pub fn train_step(
    net: &ResNet,
    opt: &mut Optimizer,
    batch: &mix::Batch,
    y: &Tensor,
    o: StepOptions<'_>,
) -> Result<StepLoss> {
    let (loss, norm) = opt.sharpness_aware_step(o.sam_rho, o.state, || {
        let logits = net.head().forward(&dropped(net.pooled(&batch.x, true, o.trainable_from)?, o.keep)?)?;
        batch.loss(&logits, y, |l, t| smoothed_loss(l, t, o.class_weights, o.label_smoothing))
    })?;
    Ok(StepLoss::new(loss, norm))
}

/// Dropout's multipliers for `n` images of `features` pooled features: each 0 with probability
/// `p`, else `1 / (1 - p)`, drawn from `rng` row by row; `None` (and no draw) when `p` is 0.
pub fn dropout_mask(rng: &mut Rng, n: usize, features: usize, p: f64, device: &Device) -> Result<Option<Tensor>> {
    if p <= 0.0 {
        return Ok(None);
    }
    let scale = (1.0 / (1.0 - p)) as f32;
    let keep: Vec<f32> = (0..n * features).map(|_| if rng.bernoulli(p) { 0.0 } else { scale }).collect();
    Ok(Some(Tensor::from_vec(keep, (n, features), device)?))
}

/// `pooled` (N, C) times the dropout multipliers `keep` (N, C), or as it is without them.
fn dropped(pooled: Tensor, keep: Option<&Tensor>) -> Result<Tensor> {
    Ok(match keep {
        Some(k) => (pooled * k)?,
        None => pooled,
    })
}

/// Logits (N, K) of `x` and, with a lesion-mask `head`, its logits (N, h, w) on its stage's
/// cells, in one forward pass (trainable from `trainable_from`, batch norm in training mode with
/// `train`). A head with lesion pooling adds the logits of the lesion-weighted features
/// ([`aux::MaskHead::pooled_logits`]).
pub fn forward_with_head(
    net: &ResNet,
    head: Option<&aux::MaskHead>,
    x: &Tensor,
    train: bool,
    trainable_from: Stage,
) -> Result<(Tensor, Option<Tensor>)> {
    match head {
        Some(head) => {
            let t = forward_tapped(net, head, x, train, trainable_from, None)?;
            Ok((t.logits, Some(t.map)))
        }
        None => Ok((net.forward_from(x, train, trainable_from)?, None)),
    }
}

/// What [`forward_tapped`] gives: the logits, the head's map, the features of its stage, with a
/// second stage that stage's map, and the last stage's pooled features (before dropout).
struct Tapped {
    logits: Tensor,
    map: Tensor,
    features: Tensor,
    second: Option<Tensor>,
    pooled: Tensor,
}

/// [`forward_with_head`] with a head ([`Tapped`]); `keep`, dropout's multipliers, on the pooled
/// features before the final layer.
fn forward_tapped(
    net: &ResNet,
    head: &aux::MaskHead,
    x: &Tensor,
    train: bool,
    trainable_from: Stage,
    keep: Option<&Tensor>,
) -> Result<Tapped> {
    let stages: Vec<Stage> = std::iter::once(head.stage()).chain(head.second_stage()).collect();
    let (last, tapped) = net.features_taps(x, train, trainable_from, &stages)?;
    let features = tapped[0].clone();
    let second = match tapped.get(1) {
        Some(f) => head.second_map(f)?,
        None => None,
    };
    let map = head.forward(&features)?;
    let pooled = last.mean((2, 3))?;
    let mut logits = net.head().forward(&dropped(pooled.clone(), keep)?)?;
    if let Some(extra) = head.pooled_logits(&last, &map)? {
        logits = (logits + extra)?;
    }
    Ok(Tapped { logits, map, features, second, pooled })
}

/// One optimiser step of [`train_step`] (unmixed) plus the auxiliary lesion-mask loss
/// ([`aux`]): `head` reads the output of its stage (and of its second stage, with the same
/// weight), and its cross-entropy against each view's mask (`targets.masks`, the batch's order;
/// `None` counts for nothing) is added with `weights.mask`; with a head that gives per-cell
/// diagnoses, their loss ([`aux::cell_class_loss`]) is added with `weights.cells`; with one that
/// regresses the lesion descriptors, their squared error against `targets.descriptors`
/// ([`descriptors::loss`]) with `weights.descriptors`. The rest as in [`train_step`].
#[allow(clippy::too_many_arguments)]
pub fn train_step_with_masks(
    net: &ResNet,
    head: &aux::MaskHead,
    opt: &mut Optimizer,
    x: &Tensor,
    y: &Tensor,
    targets: &aux::ViewTargets,
    weights: aux::Weights,
    o: StepOptions<'_>,
) -> Result<StepLoss> {
    let mask_loss = |map: &Tensor| -> Result<(Tensor, Tensor, Tensor)> {
        let (_, h, w) = map.dims3()?;
        let (shares, present) = aux::targets(&targets.masks, h, w, x.device())?;
        Ok((aux::loss(map, &shares, &present)?, shares, present))
    };
    let (loss, norm) = opt.sharpness_aware_step(o.sam_rho, o.state, || {
        let t = forward_tapped(net, head, x, true, o.trainable_from, o.keep)?;
        let ce = smoothed_loss(&t.logits, y, o.class_weights, o.label_smoothing)?;
        let (mut masked, shares, present) = mask_loss(&t.map)?;
        if let Some(second) = &t.second {
            masked = (masked + mask_loss(second)?.0)?;
        }
        let mut loss = (ce + (masked * weights.mask)?)?;
        if let Some(cells) = head.cell_logits(&t.features)? {
            loss = (loss + (aux::cell_class_loss(&cells, y, &shares, &present)? * weights.cells)?)?;
        }
        if let (Some(values), Some((wanted, described))) = (head.descriptor_values(&t.pooled)?, &targets.descriptors) {
            loss = (loss + (descriptors::loss(&values, wanted, described)? * weights.descriptors)?)?;
        }
        Ok(loss)
    })?;
    Ok(StepLoss::new(loss, norm))
}

/// An optimiser over the variables a config trains (`fc` only with a frozen backbone).
pub fn optimizer_for(clf: &Classifier) -> Optimizer {
    let from = clf.cfg.first_trained_stage();
    Optimizer::from_varmap(&clf.varmap, clf.cfg.optim, |n| model::is_trainable(n, from))
}

/// Pooled features of every image of a data set under each cached view (`feature_views`), computed once.
struct FeatureBank {
    /// (views * N, C), view-major.
    train: Tensor,
    n: usize,
    views: usize,
    /// (N_val, C), centre view.
    val: Tensor,
}

/// The training task for [`derm_core::train::fit`].
pub struct ClassifyTask {
    clf: Classifier,
    opt: Optimizer,
    train: Dataset,
    val: Dataset,
    cache: data::ScaledCache,
    sampler: Box<dyn Sampler>,
    per_epoch: usize,
    order: Option<(usize, Vec<usize>)>,
    class_weights: Option<Tensor>,
    bank: Option<FeatureBank>,
    /// The running average of the weights (with `ema_decay`).
    ema: Option<WeightAverage>,
    /// With lesion descriptors: their statistics over a view of each training image, which
    /// standardise each view's ([`descriptor_statistics`]).
    descriptor_stats: Option<descriptors::Standardizer>,
    /// The validation report of the latest evaluation.
    pub last_report: Option<ClassificationReport>,
    /// The kept model's validation report at its operating point, where [`train`] chose one,
    /// with the run folder it belongs to: [`ClassifyTask::kept_val_report`] hands it back instead
    /// of scoring the validation part a second time.
    kept: Option<(PathBuf, ClassificationReport)>,
}

impl ClassifyTask {
    /// Sets up training on the labelled samples of `data` (split into train and validation
    /// parts by id), with `extra` added to the training part only. Sets `cfg.classes` and
    /// `cfg.model.num_classes` from the data set and loads `cfg.pretrained` if given.
    pub fn new(mut cfg: ClassifyConfig, data: &Dataset, extra: &ExtraSources, device: &Device) -> Result<Self> {
        cfg.classes = data.classes.clone();
        cfg.model.num_classes = data.classes.len();
        cfg.validate()?;
        let labelled = data.filter(|s| s.label.is_some());
        if labelled.is_empty() {
            return Err(Error::invalid(format!("{} split {}: no sample has a class label", data.name, data.split)));
        }
        let (mut train, val) = labelled.split_by_id(cfg.val_fraction, cfg.train.seed);
        if cfg.select_operating_point && val.is_empty() {
            return Err(labelled.no_validation_error("an operating point", cfg.val_fraction));
        }
        if cfg.lesion_crop_margin.is_some() {
            data::require_masks(&labelled, "classify train")?;
        }
        if let Some(why) = cfg.aux_mask_blocker(&labelled) {
            if let Some(what) = cfg.needs_mask_head() {
                return Err(Error::invalid(format!(
                    "{what} needs the lesion-mask head, which cannot train here: {why}"
                )));
            }
            tracing::warn!("the lesion-mask loss is off: {why}");
            cfg.mask_loss_off();
        } else if cfg.aux_mask_weight > 0.0 {
            let masked = train.samples.iter().filter(|s| s.mask.is_some()).count();
            if masked < train.len() {
                tracing::warn!(
                    masked,
                    of = train.len(),
                    "the lesion-mask loss learns from the training images with a mask only"
                );
            }
        }
        let (np, ns) = data::add_sources(&mut train, extra)?;
        if train.len() < cfg.batch_size {
            return Err(Error::invalid(format!(
                "{} training samples, fewer than one batch of {}",
                train.len(),
                cfg.batch_size
            )));
        }
        tracing::info!(train = train.len(), purified = np, synthetic = ns, val = val.len(), "classification data");
        let counts = train.class_counts();
        let class_weights = if cfg.class_weighted_loss {
            let n: usize = counts.iter().sum();
            let k = counts.len() as f64;
            let w: Vec<f32> =
                counts.iter().map(|&c| if c == 0 { 0.0 } else { (n as f64 / (k * c as f64)) as f32 }).collect();
            Some(Tensor::new(w, device)?)
        } else {
            None
        };
        let (sampler, per_epoch): (Box<dyn Sampler>, usize) = if cfg.balanced {
            let s = BalancedSampler::new(&train.labels(), cfg.batch_size, cfg.train.seed)?;
            let b = s.batches();
            (Box::new(s), b)
        } else {
            (Box::new(ShuffleSampler::new(train.len(), cfg.train.seed)), train.len() / cfg.batch_size)
        };
        let cache = data::ScaledCache::new(cfg.resize, cfg.cache_bytes, cfg.lesion_crop_margin);
        let descriptor_stats = match cfg.aux_descriptor_weight > 0.0 {
            true => descriptor_statistics(&cfg, &cache, &train)?,
            false => None,
        };
        if cfg.aux_descriptor_weight > 0.0 && descriptor_stats.is_none() {
            tracing::warn!(
                "the lesion-descriptor loss is off: no training view has a lesion covering {} of it",
                descriptors::MIN_SHARE
            );
            cfg.aux_descriptor_weight = 0.0;
        }
        let clf = Classifier::with_pretrained(cfg.clone(), device)?;
        if cfg.pretrained.is_none() && cfg.freeze_backbone {
            tracing::warn!("freeze_backbone without pretrained weights: the head is trained on random features");
        }
        let opt = optimizer_for(&clf);
        let from = cfg.first_trained_stage();
        let ema = match cfg.ema_decay > 0.0 {
            true => Some(WeightAverage::new(&clf.varmap, cfg.ema_decay, |n| model::is_trainable(n, from))?),
            false => None,
        };
        Ok(ClassifyTask {
            clf,
            opt,
            train,
            val,
            cache,
            sampler,
            per_epoch,
            order: None,
            class_weights,
            bank: None,
            ema,
            descriptor_stats,
            last_report: None,
            kept: None,
        })
    }

    /// The classifier being trained.
    pub fn classifier(&self) -> &Classifier {
        &self.clf
    }

    /// Sizes of the training part (extra sources included) and the validation part.
    pub fn sizes(&self) -> (usize, usize) {
        (self.train.len(), self.val.len())
    }

    fn epoch_order(&mut self, epoch: usize) -> &[usize] {
        if self.order.as_ref().map(|o| o.0) != Some(epoch) {
            self.order = Some((epoch, self.sampler.epoch_indices(epoch as u64)));
        }
        self.order.as_ref().map(|o| o.1.as_slice()).unwrap_or(&[])
    }

    fn pooled_of(&self, views: &[RgbImage]) -> Result<Tensor> {
        let refs: Vec<&RgbImage> = views.iter().collect();
        let x = image_io::images_to_tensor(&refs, self.clf.cfg.normalize, &self.clf.device)?;
        Ok(self.clf.net.pooled(&x, false, Stage::Fc)?)
    }

    fn features(&self, data: &Dataset, view: Symmetry) -> Result<Tensor> {
        let idx: Vec<usize> = (0..data.len()).collect();
        let mut parts = Vec::new();
        for chunk in idx.chunks(self.clf.cfg.batch_size.max(1)) {
            let imgs = self.cache.load(data, chunk)?;
            let views: Vec<RgbImage> = imgs.iter().map(|i| view.image(&self.clf.view(i))).collect();
            parts.push(self.pooled_of(&views)?);
        }
        if parts.is_empty() {
            return Ok(Tensor::zeros((0, self.clf.cfg.model.feature_dim()), DType::F32, &self.clf.device)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Computes the frozen backbone's features once (train: each cached view; val: the image itself).
    fn ensure_bank(&mut self) -> Result<()> {
        if !self.clf.cfg.freeze_backbone || self.bank.is_some() {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        let symmetries: Vec<Symmetry> =
            self.clf.cfg.augment.symmetries().into_iter().take(self.clf.cfg.feature_views).collect();
        let views = symmetries.len();
        let mut parts = Vec::with_capacity(views);
        for s in symmetries {
            parts.push(self.features(&self.train, s)?);
        }
        let train = Tensor::cat(&parts, 0)?;
        let val = self.features(&self.val, Symmetry::IDENTITY)?;
        tracing::info!(
            images = self.train.len(),
            views,
            seconds = t0.elapsed().as_secs_f64(),
            "backbone features cached"
        );
        self.bank = Some(FeatureBank { train, n: self.train.len(), views, val });
        Ok(())
    }

    /// Validation probabilities under the current weights.
    pub fn val_probabilities(&mut self) -> Result<Vec<Vec<f64>>> {
        self.ensure_bank()?;
        if let Some(b) = &self.bank {
            let logits = self.clf.net.head().forward(&b.val)?;
            let p = derm_kernels::ops::softmax(&logits, 1)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
            return Ok(p.into_iter().map(|r| r.into_iter().map(f64::from).collect()).collect());
        }
        let idx: Vec<usize> = (0..self.val.len()).collect();
        let mut out = Vec::new();
        for chunk in idx.chunks(self.clf.cfg.batch_size.max(1)) {
            let imgs = self.cache.load(&self.val, chunk)?;
            let views: Vec<RgbImage> = imgs.iter().map(|i| self.clf.view(i)).collect();
            out.extend(self.clf.view_probabilities(&views, false)?);
        }
        Ok(out)
    }

    /// Mean cross-entropy over the validation part (no update).
    pub fn val_loss(&mut self) -> Result<f64> {
        let p = self.val_probabilities()?;
        let labels: Vec<usize> = self.val.samples.iter().map(|s| s.label.unwrap_or(0)).collect();
        let n = p.len().max(1) as f64;
        Ok(p.iter().zip(&labels).map(|(r, &l)| -(r[l].max(1e-12)).ln()).sum::<f64>() / n)
    }

    /// The validation report of the model the run in `out` keeps (its `best` checkpoint, else
    /// `last`, with the saved operating point), or `None` without a validation part. This is what
    /// `predict` and `eval` will use; with a moving average of the weights it is not the weights
    /// being trained, which [`ClassifyTask::val_report`] scores. After [`train`] chose the
    /// operating point of `out`, the report made then is returned without scoring again.
    pub fn kept_val_report(&self, out: &Path) -> Result<Option<ClassificationReport>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        if let Some((dir, report)) = &self.kept {
            if dir == out {
                return Ok(Some(report.clone()));
            }
        }
        let clf = Classifier::load(out, &self.clf.device)?;
        let tta = clf.cfg.test_time_augmentation;
        Ok(Some(evaluate(&clf, &self.val, None, tta, &mut |_| {})?.report))
    }

    /// The validation report under the current weights (the weights being trained, not their
    /// average), with the configured operating point.
    pub fn val_report(&mut self) -> Result<ClassificationReport> {
        let p = self.val_probabilities()?;
        let labels: Vec<usize> = self.val.samples.iter().map(|s| s.label.unwrap_or(0)).collect();
        Ok(score(&p, &labels, &self.clf.cfg.classes, self.val.melanoma_class, &self.clf.cfg.decision_weights))
    }

    /// A training batch: images (N, 3, H, W), labels (N,), and with the lesion-mask loss on,
    /// each view's lesion mask moved with it (`None` for a sample without one) and, with lesion
    /// descriptors, their targets.
    fn image_batch(&self, indices: &[usize], rng: &mut Rng) -> Result<(Tensor, Tensor, aux::ViewTargets)> {
        let cfg = &self.clf.cfg;
        let pairs: Vec<data::ScaledPair> = match self.clf.aux.is_some() {
            true => self.cache.load_with_masks(&self.train, indices)?,
            false => self.cache.load(&self.train, indices)?.into_iter().map(|i| (i, None)).collect(),
        };
        let mut rngs: Vec<Rng> = (0..indices.len()).map(|k| rng.fork(k as u64)).collect();
        // In parallel: each view has its own generator, forked in order, so the batch is the same.
        let (views, masks): (Vec<RgbImage>, Vec<Option<GrayImage>>) = pairs
            .par_iter()
            .zip(rngs.par_iter_mut())
            .map(|((img, m), r)| {
                data::train_view_with_mask(img, m.as_deref(), cfg.input_size, cfg.random_crop, &cfg.augment, r)
            })
            .unzip();
        let descriptors = match &self.descriptor_stats {
            Some(d) => {
                let rows: Vec<Option<[f32; descriptors::COUNT]>> = views
                    .par_iter()
                    .zip(&masks)
                    .map(|(v, m)| m.as_ref().and_then(|m| descriptors::describe(v, m)))
                    .collect();
                Some(d.targets(&rows, &self.clf.device)?)
            }
            None => None,
        };
        let refs: Vec<&RgbImage> = views.iter().collect();
        let x = image_io::images_to_tensor(&refs, cfg.normalize, &self.clf.device)?;
        let y = self.labels_of(indices)?;
        Ok((x, y, aux::ViewTargets { masks, descriptors }))
    }

    fn labels_of(&self, indices: &[usize]) -> Result<Tensor> {
        let y: Vec<u32> = indices.iter().map(|&i| self.train.samples[i].label.unwrap_or(0) as u32).collect();
        Ok(Tensor::new(y, &self.clf.device)?)
    }
}

impl Task for ClassifyTask {
    fn batches_per_epoch(&self) -> usize {
        self.per_epoch
    }

    fn set_horizon(&mut self, steps: usize) {
        self.opt.set_horizon(steps);
    }

    fn train_batch(&mut self, epoch: usize, batch: usize, rng: &mut Rng) -> Result<StepLoss> {
        let bs = self.clf.cfg.batch_size;
        let indices: Vec<usize> = self.epoch_order(epoch).iter().skip(batch * bs).take(bs).copied().collect();
        if indices.is_empty() {
            return Err(Error::invalid(format!("batch {batch} of epoch {epoch} is past the epoch's end")));
        }
        self.ensure_bank()?;
        let cfg = &self.clf.cfg;
        let state = match cfg.sam_rho > 0.0 {
            true => self.clf.running_statistics(),
            false => Vec::new(),
        };
        let mut o = StepOptions {
            class_weights: self.class_weights.as_ref(),
            label_smoothing: cfg.label_smoothing,
            trainable_from: cfg.first_trained_stage(),
            keep: None,
            sam_rho: cfg.sam_rho,
            state: &state,
        };
        let step = if let Some(b) = &self.bank {
            let rows: Vec<u32> = indices.iter().map(|&i| (rng.below(b.views) * b.n + i) as u32).collect();
            let x = b.train.index_select(&Tensor::new(rows, &self.clf.device)?, 0)?;
            let y = self.labels_of(&indices)?;
            let keep = dropout_mask(rng, indices.len(), x.dim(1)?, cfg.dropout, &self.clf.device)?;
            let head = self.clf.net.head();
            let (loss, norm) = self.opt.sharpness_aware_step(o.sam_rho, o.state, || {
                let logits = head.forward(&dropped(x.clone(), keep.as_ref())?)?;
                smoothed_loss(&logits, &y, o.class_weights, o.label_smoothing)
            })?;
            StepLoss::new(loss, norm)
        } else {
            let (x, y, targets) = self.image_batch(&indices, rng)?;
            let keep = dropout_mask(rng, indices.len(), cfg.model.feature_dim(), cfg.dropout, &self.clf.device)?;
            o.keep = keep.as_ref();
            let net = &self.clf.net;
            match &self.clf.aux {
                Some(head) => {
                    let weights = aux::Weights::of(cfg);
                    train_step_with_masks(net, head, &mut self.opt, &x, &y, &targets, weights, o)?
                }
                None => {
                    let batch = cfg.mix.apply(&x, rng)?;
                    train_step(net, &mut self.opt, &batch, &y, o)?
                }
            }
        };
        if let Some(e) = &mut self.ema {
            e.update()?;
        }
        Ok(step)
    }

    /// Mean validation AUC over the scored classes (balanced accuracy when no AUC exists).
    fn evaluate(&mut self) -> Result<Option<f64>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        // The average is what is kept: evaluate it, then continue training the weights.
        if let Some(e) = &mut self.ema {
            e.swap()?;
        }
        let r = self.val_report();
        if let Some(e) = &mut self.ema {
            e.swap()?;
        }
        let r = r?;
        let m = r.selection_metric();
        self.last_report = Some(r);
        Ok(Some(m))
    }

    fn save(&self, dir: &Path, state: &TrainState) -> Result<()> {
        let mut m = meta(&self.clf.cfg);
        m.extra["val_mean_auc"] = serde_json::json!(self.last_report.as_ref().and_then(|r| r.mean_auc));
        m.extra["val_auc"] = serde_json::json!(self.last_report.as_ref().map(|r| r.auc.clone()));
        m.extra["step"] = serde_json::json!(state.step);
        ema::save_training(dir, self.ema.as_ref(), &self.clf.varmap, &self.clf.cfg, &m, &self.opt, state)
    }

    fn restore(&mut self, dir: &Path, _state: &TrainState) -> Result<()> {
        ema::restore_training(dir, self.ema.as_mut(), &self.clf.varmap, &mut self.opt)?;
        self.bank = None;
        Ok(())
    }

    fn check_resumable(&self, dir: &Path) -> Result<()> {
        let now = &self.clf.cfg;
        let compatible = |s: &ClassifyConfig| {
            s.model == now.model
                && s.input_size == now.input_size
                && s.classes == now.classes
                && (s.aux_mask_weight > 0.0) == (now.aux_mask_weight > 0.0)
                && (now.aux_mask_weight == 0.0
                    || (s.aux_mask_stage, s.aux_mask_second_stage) == (now.aux_mask_stage, now.aux_mask_second_stage))
                && s.lesion_pooling == now.lesion_pooling
                && (s.aux_cell_weight > 0.0) == (now.aux_cell_weight > 0.0)
                && (s.aux_descriptor_weight > 0.0) == (now.aux_descriptor_weight > 0.0)
        };
        train::check_saved(
            dir,
            compatible,
            "model shape, input size, class list, lesion-mask head, lesion pooling, per-cell diagnosis or lesion \
             descriptors",
        )
    }
}

/// The lesion descriptors' statistics over one training view (crop and augmentation as in
/// training, drawn from a stream of the run's seed of its own, so the training draws do not
/// change) of each training image with a mask; `None` when no view has a lesion to describe.
/// The images stay in the cache for training. Not saved: a resumed run (same seed, same data)
/// draws the same views and so the same statistics.
fn descriptor_statistics(
    cfg: &ClassifyConfig,
    cache: &data::ScaledCache,
    train: &Dataset,
) -> Result<Option<descriptors::Standardizer>> {
    const STREAM: u64 = 0x0de5_c41b;
    let masked: Vec<usize> = (0..train.len()).filter(|&i| train.samples[i].mask.is_some()).collect();
    let base = Rng::new(cfg.train.seed).fork(STREAM);
    let mut rows = Vec::with_capacity(masked.len());
    for chunk in masked.chunks(64) {
        let pairs = cache.load_with_masks(train, chunk)?;
        rows.extend(
            pairs
                .par_iter()
                .zip(chunk)
                .filter_map(|((img, m), &i)| {
                    let mut r = base.fork(i as u64);
                    let (view, m) = data::train_view_with_mask(
                        img,
                        m.as_deref(),
                        cfg.input_size,
                        cfg.random_crop,
                        &cfg.augment,
                        &mut r,
                    );
                    m.and_then(|m| descriptors::describe(&view, &m))
                })
                .collect::<Vec<_>>(),
        );
    }
    let s = descriptors::Standardizer::fit(&rows);
    if let Some(s) = &s {
        tracing::info!(lesions = rows.len(), mean = ?s.mean, std = ?s.std, "lesion descriptors' statistics");
    }
    Ok(s)
}

/// Trains from scratch (or from `cfg.pretrained`), or resumes from `<out>/last` when `resume` is
/// set and it exists.
pub fn train(
    cfg: ClassifyConfig,
    data: &Dataset,
    extra: &ExtraSources,
    device: &Device,
    out: &Path,
    resume: bool,
    on_event: &mut dyn FnMut(&train::Event),
) -> Result<(ClassifyTask, TrainState)> {
    let mut task = ClassifyTask::new(cfg.clone(), data, extra, device)?;
    let state = train::run(&mut task, &cfg.train, out, resume, on_event)?;
    if cfg.select_operating_point && !task.val.is_empty() {
        let op = select_operating_point(&train::best_dir(out), &task.val, cfg.min_melanoma_sensitivity, device)?;
        task.kept = Some((out.to_path_buf(), op.report));
    }
    Ok((task, state))
}

/// An operating point chosen by [`select_operating_point`].
#[derive(Debug, Clone)]
pub struct OperatingPoint {
    /// Per-class weights on the probabilities (saved as [`ClassifyConfig::decision_weights`]).
    pub weights: Vec<f64>,
    /// The checkpoint's report on the validation part with these weights: what `eval` of the
    /// saved checkpoint on the same images gives.
    pub report: ClassificationReport,
}

/// Chooses the operating point of the checkpoint in `dir` on `val` (averaging its test-time views
/// where [`ClassifyConfig::test_time_augmentation`] says so): per-class weights on the
/// probabilities ([`eval::choose_decision_weights`]) for the best balanced accuracy among those
/// keeping a melanoma sensitivity of at least `min_melanoma_sensitivity` (0: any), written into
/// the checkpoint's `config.json` (atomically), with the balanced accuracy before and after and
/// the melanoma sensitivity in `meta.json`. Returns the weights and the validation report with
/// them.
pub fn select_operating_point(
    dir: &Path,
    val: &Dataset,
    min_melanoma_sensitivity: f64,
    device: &Device,
) -> Result<OperatingPoint> {
    let clf = Classifier::load(dir, device)?;
    let e = evaluate(&clf, val, None, clf.cfg.test_time_augmentation, &mut |_| {})?;
    let k = clf.cfg.model.num_classes;
    let s = min_melanoma_sensitivity;
    // The data set's melanoma class (its manifest names it).
    let mel = val.melanoma_class.filter(|_| val.classes == clf.class_names());
    let floor = mel.filter(|_| s > 0.0).map(|m| (m, s));
    let (weights, before, after) = eval::choose_decision_weights(&e.probs, &e.labels, k, floor);
    let chosen = score(&e.probs, &e.labels, &e.report.classes, mel, &weights);
    let mel_sens = mel.and_then(|m| chosen.sensitivity.get(m).copied().flatten());
    checkpoint::amend(dir, "classify", |cfg: &mut ClassifyConfig, m| {
        cfg.decision_weights = weights.clone();
        cfg.min_melanoma_sensitivity = s;
        m.extra["operating_point"] = serde_json::json!({
            "weights": weights, "val_balanced_accuracy_before": before, "val_balanced_accuracy": after,
            "min_melanoma_sensitivity": s, "val_melanoma_sensitivity": mel_sens
        });
    })?;
    tracing::info!(?weights, before, after, ?mel_sens, "operating point chosen on validation (balanced accuracy)");
    Ok(OperatingPoint { weights, report: chosen })
}

#[cfg(test)]
mod tests {
    use super::*;
    use derm_data::phantom::{write_phantom_set, PhantomConfig};

    fn tiny_cfg() -> ClassifyConfig {
        ClassifyConfig {
            model: ResNetConfig { base_width: 8, zero_init_residual: true, ..ResNetConfig::resnet18(3) },
            input_size: 48,
            resize: 56,
            batch_size: 6,
            optim: OptimConfig { optimizer: OptimizerKind::adam(3e-3), ..Default::default() },
            train: LoopConfig { epochs: 2, ..Default::default() },
            val_fraction: 0.25,
            balanced: true,
            ..Default::default()
        }
    }

    fn phantoms(dir: &Path, n: usize, size: u32) -> Dataset {
        write_phantom_set(&dir.join("ph"), &PhantomConfig { size, ..Default::default() }, 1, n).unwrap();
        Dataset::open_dir(&dir.join("ph"), None, None).unwrap()
    }

    #[test]
    fn the_run_description_names_network_width_and_the_options_on() {
        let d = ClassifyConfig::default().describe();
        let head = "resnet18-w32 (width 32, from scratch; cpu preset), 128 px from 146 px, batch 16, adam lr 1e-3";
        assert!(d.starts_with(&format!("{head} (constant)")), "{d}");
        let tail = "EMA 0.998, operating point chosen for balanced accuracy (melanoma sensitivity at least 0.82)";
        assert!(d.ends_with(&format!("augment (flips), lesion-mask loss on layer3 (weight 1), {tail}")), "{d}");
        let paper = ClassifyConfig { select_operating_point: false, aux_mask_weight: 0.0, ..ClassifyConfig::paper() }
            .describe();
        let head =
            "resnet50 (width 64, from scratch; paper preset), 224 px from 256 px, batch 16, sgd lr 1e-3 momentum 0.9";
        assert!(paper.starts_with(&format!("{head} (constant)")), "{paper}");
        assert!(paper.ends_with("augment (flips), EMA 0.998"), "{paper}");
        let cpu = ClassifyConfig {
            model: ResNetConfig { base_width: 32, ..ResNetConfig::resnet18(3) },
            lesion_crop_margin: Some(0.2),
            mix: BatchMix::CutMix { alpha: 1.0 },
            trainable_from: Stage::Layer3,
            ema_decay: 0.0,
            ..Default::default()
        }
        .describe();
        assert!(cpu.starts_with("resnet18-w32 (width 32, from scratch; cpu preset)"), "{cpu}");
        assert!(cpu.contains(", trained from layer3, lesion windows (margin 0.2), cutmix (alpha 1)"), "{cpu}");
        assert!(!cpu.contains("EMA"), "{cpu}");
    }

    #[test]
    fn a_preset_sets_network_sizes_batch_and_optimiser_and_keeps_the_rest() {
        assert_eq!(ClassifyConfig::default().preset_name(), Some("cpu"));
        assert_eq!(ClassifyConfig::preset("paper"), Some(ClassifyConfig::paper()));
        let mut c = ClassifyConfig { label_smoothing: 0.1, ..tiny_cfg() };
        c.model.num_classes = 5;
        assert_eq!(c.preset_name(), None);
        c.apply_preset("paper").unwrap();
        assert_eq!((c.model.name(), c.model.base_width, c.model.num_classes), ("resnet50".into(), 64, 5));
        assert_eq!((c.input_size, c.resize, c.optim), (224, 256, ClassifyConfig::paper().optim));
        assert_eq!((c.label_smoothing, c.val_fraction), (0.1, 0.25));
        assert_eq!(c.preset_name(), Some("paper"));
        // ImageNet weights start the residual branches as trained: still the paper's preset.
        let pretrained = ClassifyConfig {
            model: ResNetConfig { zero_init_residual: false, ..c.model.clone() },
            pretrained: Some("resnet50.safetensors".into()),
            ..c.clone()
        };
        assert_eq!(pretrained.preset_name(), Some("paper"));
        let e = c.apply_preset("gpu").unwrap_err().to_string();
        assert!(e.contains("\"gpu\"") && e.contains("cpu or paper"), "{e}");
    }

    #[test]
    fn a_resnet50_training_step_on_the_device_path_reads_nothing_back() {
        // ResNet-50's layout (bottleneck blocks 3-4-6-3, stem max pooling) at width 8, with
        // class weights: the weighted cross-entropy, batch norm and the update stay on the device.
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(d.path(), 12, 40);
        let cfg = ClassifyConfig {
            model: ResNetConfig { base_width: 8, ..ResNetConfig::resnet50(3) },
            input_size: 32,
            resize: 40,
            batch_size: 4,
            class_weighted_loss: true,
            ..tiny_cfg()
        };
        let mut task = ClassifyTask::new(cfg, &data, &ExtraSources::default(), &Device::Cpu).unwrap();
        assert!(task.class_weights.is_some());
        let mut rng = Rng::new(3);
        let (steps, reads) = derm_kernels::ops::host_reads_on_device_path(|| {
            [task.train_batch(0, 0, &mut rng).unwrap(), task.train_batch(0, 1, &mut rng).unwrap()]
        });
        assert_eq!(reads, 0, "a ResNet-50 training step read data back to the host");
        for s in steps {
            assert!(s.loss.to_scalar::<f32>().unwrap().is_finite());
        }
    }

    #[test]
    fn lesion_windows_are_what_training_evaluation_and_views_read() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(d.path(), 16, 64);
        let cfg = ClassifyConfig {
            lesion_crop_margin: Some(0.1),
            train: LoopConfig { max_steps: Some(2), ..tiny_cfg().train },
            ..tiny_cfg()
        };
        let mut task = ClassifyTask::new(cfg, &data, &ExtraSources::default(), &Device::Cpu).unwrap();
        // The cache holds each training image cut to its lesion window, then scaled.
        let s = task.train.samples[0].clone();
        let img = image_io::load_rgb(&s.image).unwrap();
        let mask = image_io::load_mask(s.mask.as_ref().unwrap(), None).unwrap();
        let win = data::lesion_window(&mask, 0.1).unwrap();
        assert!(win.w < 64, "the phantom's lesion fills the image: the test would not see the window");
        assert_eq!(*task.cache.get(&s).unwrap(), data::scale_short(&win.apply(&img), 56));
        task.train_batch(0, 0, &mut Rng::new(0)).unwrap();
        // Views: the window with a mask; a mask of another size is an error.
        let clf = task.classifier();
        assert_eq!(clf.lesion_view(&img, &mask).unwrap(), clf.view(&win.apply(&img)));
        assert!(clf.lesion_view(&img, &GrayImage::new(10, 10)).unwrap_err().to_string().contains("10x10"));
        // Evaluation reads windows too, and needs a mask for every image.
        let e = evaluate(clf, &data, None, false, &mut |_| {}).unwrap();
        assert_eq!(e.ids.len(), 16);
        let mut unmasked = data.clone();
        unmasked.samples[3].mask = None;
        let err = evaluate(clf, &unmasked, None, false, &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains("no lesion mask") && err.contains(&unmasked.samples[3].id), "{err}");
    }

    /// `n` training steps of `task`'s network with the lesion-mask `head` on one fixed batch (its
    /// images, labels and masks), the head's losses weighted by `weights`.
    fn head_steps(
        task: &mut ClassifyTask,
        head: &aux::MaskHead,
        (x, y, targets): (&Tensor, &Tensor, &aux::ViewTargets),
        weights: aux::Weights,
        n: usize,
    ) {
        for _ in 0..n {
            train_step_with_masks(&task.clf.net, head, &mut task.opt, x, y, targets, weights, StepOptions::default())
                .unwrap();
        }
    }

    /// The default config as a run saved before `fields` existed wrote it (each a top-level key
    /// or `model.KEY`), read back.
    fn saved_without(fields: &[&str]) -> ClassifyConfig {
        let mut old = serde_json::to_value(ClassifyConfig::default()).unwrap();
        for f in fields {
            let (obj, key) = match f.split_once('.') {
                Some((o, k)) => (&mut old[o], k),
                None => (&mut old, *f),
            };
            obj.as_object_mut().unwrap().remove(key).expect("a field the default config saves");
        }
        serde_json::from_value(old).unwrap()
    }

    /// [`head_steps`] on one fixed batch must bring `loss` of the task under `ratio` times its
    /// value before them (`what` names the loss in the failure message).
    #[allow(clippy::too_many_arguments)]
    fn head_steps_lower(
        task: &mut ClassifyTask,
        head: &aux::MaskHead,
        batch: (&Tensor, &Tensor, &aux::ViewTargets),
        weights: aux::Weights,
        n: usize,
        loss: impl Fn(&ClassifyTask) -> f32,
        ratio: f32,
        what: &str,
    ) {
        let before = loss(task);
        head_steps(task, head, batch, weights, n);
        let after = loss(task);
        assert!(after < ratio * before, "{what} {before} -> {after}");
    }

    /// Ten [`train_step`]s (SAM at radius `sam_rho`) on one fixed batch of `data` halve the
    /// batch's loss in training mode.
    fn ten_steps_halve_a_fixed_batch_loss(cfg: ClassifyConfig, data: &Dataset, sam_rho: f64) {
        let mut task = ClassifyTask::new(cfg, data, &ExtraSources::default(), &Device::Cpu).unwrap();
        let idx: Vec<usize> = (0..12).collect();
        let (x, y, _) = task.image_batch(&idx, &mut Rng::new(1)).unwrap();
        let loss = |t: &ClassifyTask| {
            derm_kernels::ops::cross_entropy(&t.clf.net.forward_t(&x, true).unwrap(), &y, None)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let before = loss(&task);
        let (batch, state) = (mix::Batch::unmixed(x.clone()), task.clf.running_statistics());
        let o = StepOptions { sam_rho, state: &state, ..Default::default() };
        for _ in 0..10 {
            train_step(&task.clf.net, &mut task.opt, &batch, &y, o).unwrap();
        }
        let after = loss(&task);
        assert!(after < 0.5 * before, "loss {before} -> {after}");
    }

    /// Trains `cfg` on `data` into `dir/run` and loads the kept model, which must give
    /// probabilities from an image alone; a run of `other` must not resume it (the refusal naming
    /// `refused`). Returns the loaded model.
    fn train_load_and_refuse_resume(
        cfg: &ClassifyConfig,
        data: &Dataset,
        dir: &Path,
        other: ClassifyConfig,
        refused: &str,
    ) -> Classifier {
        let out = dir.join("run");
        train(cfg.clone(), data, &ExtraSources::default(), &Device::Cpu, &out, false, &mut |_| {}).unwrap();
        let clf = Classifier::load(&out, &Device::Cpu).unwrap();
        let p = clf.probabilities(&[&RgbImage::from_pixel(50, 40, image::Rgb([150, 90, 70]))], true).unwrap();
        assert!((p[0].iter().sum::<f64>() - 1.0).abs() < 1e-5);
        let e = train(other, data, &ExtraSources::default(), &Device::Cpu, &out, true, &mut |_| {}).err().unwrap();
        assert!(e.to_string().contains(refused), "{e}");
        clf
    }

    #[test]
    fn a_few_steps_lower_the_loss_on_phantoms() {
        let d = tempfile::tempdir().unwrap();
        ten_steps_halve_a_fixed_batch_loss(tiny_cfg(), &phantoms(d.path(), 24, 56), 0.0);
    }

    #[test]
    fn a_space_to_depth_stem_trains_and_is_saved_with_the_model() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(d.path(), 24, 56);
        let cfg = ClassifyConfig { model: ResNetConfig { space_to_depth: 2, ..tiny_cfg().model }, ..tiny_cfg() };
        assert!(cfg.describe().starts_with("resnet18-w8-s2d2 (width 8"), "{}", cfg.describe());
        ten_steps_halve_a_fixed_batch_loss(cfg.clone(), &data, 0.0);
        let one = ClassifyConfig { train: LoopConfig { epochs: 1, ..cfg.train.clone() }, ..cfg.clone() };
        let torchvision_stem = ClassifyConfig { model: tiny_cfg().model, ..one.clone() };
        let clf = train_load_and_refuse_resume(&one, &data, d.path(), torchvision_stem, "model shape");
        assert_eq!(clf.cfg.model.space_to_depth, 2);
        // 1 in a config saved before the option existed; a size it does not divide and
        // torchvision weights are refused.
        assert_eq!(saved_without(&["model.space_to_depth"]).model.space_to_depth, 1);
        let e = ClassifyConfig { input_size: 47, resize: 56, ..cfg.clone() }.validate().unwrap_err().to_string();
        assert!(e.contains("input_size 47") && e.contains("space_to_depth 2"), "{e}");
        let e = ClassifyConfig { pretrained: Some("w.safetensors".into()), ..cfg }.validate().unwrap_err().to_string();
        assert!(e.contains("space_to_depth 2"), "{e}");
    }

    #[test]
    fn the_lesion_mask_loss_trains_the_head_and_the_saved_model_predicts_without_masks() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(d.path(), 24, 56);
        let cfg = ClassifyConfig { aux_mask_weight: 1.0, lesion_crop_margin: None, ..tiny_cfg() };
        assert_eq!(cfg.aux_mask_weight, ClassifyConfig::default().aux_mask_weight, "on by default");
        // A config saved before the head existed reads as off, so its checkpoint loads.
        let old = saved_without(&["aux_mask_weight", "aux_mask_stage"]);
        assert_eq!((old.aux_mask_weight, old.aux_mask_stage), (0.0, Stage::Layer3));
        let mut task = ClassifyTask::new(cfg.clone(), &data, &ExtraSources::default(), &Device::Cpu).unwrap();
        let head = task.clf.aux.clone().expect("the head is built when the weight is on");
        // Its variables train whenever the backbone does (the optimiser holds them).
        assert_eq!(head.stage(), Stage::Layer3);
        assert!(model::is_trainable("aux_mask.weight", Stage::Conv1));
        assert!(model::is_trainable("aux_mask.bias", Stage::Layer4));
        assert!(!model::is_trainable("aux_mask.weight", Stage::Fc));
        // One fixed batch: its views' masks are the phantoms' lesions, moved with the views.
        let idx: Vec<usize> = (0..12).collect();
        let (x, y, targets) = task.image_batch(&idx, &mut Rng::new(1)).unwrap();
        let masks = &targets.masks;
        assert!(masks.iter().all(|m| m.as_ref().is_some_and(|m| m.dimensions() == (48, 48))));
        let mask_loss = |t: &ClassifyTask| {
            let (_, f) = t.clf.net.features_tap(&x, true, Stage::Conv1, Some(head.stage())).unwrap();
            let f = f.unwrap();
            let (_, _, h, w) = f.dims4().unwrap();
            assert_eq!((h, w), (3, 3), "layer3 of a 48 px input");
            let (tg, p) = aux::targets(masks, h, w, &Device::Cpu).unwrap();
            aux::loss(&head.forward(&f).unwrap(), &tg, &p).unwrap().to_scalar::<f32>().unwrap()
        };
        let weights = aux::Weights { mask: task.clf.cfg.aux_mask_weight, ..Default::default() };
        head_steps_lower(&mut task, &head, (&x, &y, &targets), weights, 15, mask_loss, 0.7, "mask loss");
        // A whole run saves the head; the loaded model predicts from an image alone. A run without
        // the head does not resume one with it, nor does a head on another stage.
        let other = ClassifyConfig { aux_mask_weight: 0.0, ..cfg.clone() };
        let clf = train_load_and_refuse_resume(&cfg, &data, d.path(), other, "lesion-mask head");
        assert!(clf.aux.is_some() && clf.cfg.aux_mask_weight == 1.0);
        let other = ClassifyConfig { aux_mask_stage: Stage::Layer2, ..cfg.clone() };
        let out = d.path().join("run");
        let e = train(other, &data, &ExtraSources::default(), &Device::Cpu, &out, true, &mut |_| {}).err().unwrap();
        assert!(e.to_string().contains("lesion-mask head"), "{e}");
        // Where it cannot train it is off, and the reason is given: no mask at all, mixing, a
        // frozen backbone, training from after layer3. Images without a mask count for nothing.
        let mut unmasked = data.clone();
        unmasked.samples.iter_mut().for_each(|s| s.mask = None);
        let why = cfg.aux_mask_blocker(&unmasked).unwrap();
        assert!(why.contains("no labelled image") && why.contains("--lesion-masks"), "{why}");
        let t = ClassifyTask::new(cfg.clone(), &unmasked, &ExtraSources::default(), &Device::Cpu).unwrap();
        assert!(t.clf.aux.is_none() && t.clf.cfg.aux_mask_weight == 0.0);
        for (bad, says) in [
            (ClassifyConfig { mix: BatchMix::Mixup { alpha: 0.2 }, ..cfg.clone() }, "mixup"),
            (ClassifyConfig { freeze_backbone: true, ..cfg.clone() }, "frozen"),
            (ClassifyConfig { trainable_from: Stage::Layer4, ..cfg.clone() }, "layer4"),
        ] {
            assert!(bad.aux_mask_blocker(&data).unwrap().contains(says));
            let t = ClassifyTask::new(bad, &data, &ExtraSources::default(), &Device::Cpu).unwrap();
            assert!(t.clf.aux.is_none());
        }
        let mut some = data.clone();
        some.samples[2].mask = None;
        assert_eq!(cfg.aux_mask_blocker(&some), None);
        let mut t = ClassifyTask::new(cfg.clone(), &some, &ExtraSources::default(), &Device::Cpu).unwrap();
        let all: Vec<usize> = (0..t.train.len()).collect();
        let (_, _, m) = t.image_batch(&all, &mut Rng::new(0)).unwrap();
        assert!(m.descriptors.is_none(), "no descriptors unless asked for");
        assert_eq!(
            m.masks.iter().filter(|m| m.is_none()).count(),
            t.train.samples.iter().filter(|s| s.mask.is_none()).count()
        );
        t.train_batch(0, 0, &mut Rng::new(0)).unwrap();
        assert!(ClassifyConfig { aux_mask_weight: f64::NAN, ..cfg.clone() }.validate().is_err());
        for stage in [Stage::Conv1, Stage::Fc] {
            let e = ClassifyConfig { aux_mask_stage: stage, ..cfg.clone() }.validate().unwrap_err();
            assert!(e.to_string().contains(stage.name()), "{e}");
        }
        // A head on layer4 reads layer4's cells, trains with the backbone from layer4 and says so.
        let l4 = ClassifyConfig { aux_mask_stage: Stage::Layer4, trainable_from: Stage::Layer4, ..cfg.clone() };
        assert_eq!(l4.aux_mask_blocker(&data), None);
        assert!(l4.describe().contains("lesion-mask loss on layer4"), "{}", l4.describe());
        let mut t = ClassifyTask::new(l4, &data, &ExtraSources::default(), &Device::Cpu).unwrap();
        let head = t.clf.aux.clone().unwrap();
        assert_eq!(head.stage(), Stage::Layer4);
        let (_, f) = t.clf.net.features_tap(&x, true, Stage::Layer4, Some(Stage::Layer4)).unwrap();
        assert_eq!(head.forward(&f.unwrap()).unwrap().dims(), &[12, 2, 2], "layer4 of a 48 px input");
        t.train_batch(0, 0, &mut Rng::new(0)).unwrap();
    }

    #[test]
    fn lesion_descriptors_train_the_pooled_features_and_are_saved_with_the_model() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(d.path(), 24, 56);
        let cfg =
            ClassifyConfig { aux_mask_weight: 1.0, aux_descriptor_weight: 1.0, lesion_crop_margin: None, ..tiny_cfg() };
        // Off by default and in a config saved before it existed; it needs the head.
        assert_eq!(ClassifyConfig::default().aux_descriptor_weight, 0.0);
        assert_eq!(saved_without(&["aux_descriptor_weight"]).aux_descriptor_weight, 0.0);
        let e = ClassifyConfig { aux_mask_weight: 0.0, ..cfg.clone() }.validate().unwrap_err();
        assert!(e.to_string().contains("aux_descriptor_weight") && e.to_string().contains("aux_mask_weight"), "{e}");
        assert!(ClassifyConfig { aux_descriptor_weight: -1.0, ..cfg.clone() }.validate().is_err());
        assert!(cfg.describe().contains("lesion descriptors (weight 1)"), "{}", cfg.describe());
        let mut task = ClassifyTask::new(cfg.clone(), &data, &ExtraSources::default(), &Device::Cpu).unwrap();
        let head = task.clf.aux.clone().unwrap();
        assert!(head.describes());
        // The statistics come from the training images: every phantom has a lesion to describe.
        let stats = task.descriptor_stats.clone().expect("statistics of the training lesions");
        // The phantoms' lesions vary in every descriptor (a constant one would keep unit scale).
        assert!(stats.std.iter().all(|&s| s > 0.0 && s != 1.0), "{stats:?}");
        assert!(stats.mean[0] > 0.0 && stats.mean[0] < 1.0, "{stats:?}");
        let again = ClassifyTask::new(cfg.clone(), &data, &ExtraSources::default(), &Device::Cpu).unwrap();
        assert_eq!(again.descriptor_stats, Some(stats), "drawn from the run's seed");
        // Each view of a batch has its standardised descriptors, from its own mask and pixels.
        let idx: Vec<usize> = (0..12).collect();
        let (x, y, targets) = task.image_batch(&idx, &mut Rng::new(1)).unwrap();
        let (wanted, present) = targets.descriptors.clone().expect("descriptor targets");
        assert_eq!(wanted.dims(), &[12, descriptors::COUNT]);
        let described = present.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(described >= 10.0, "{described} of 12 views described");
        // Steps on one batch lower the descriptors' loss: the pooled features learn them.
        let desc_loss = |t: &ClassifyTask| {
            let last = t.clf.net.features_tap(&x, true, Stage::Conv1, None).unwrap().0;
            let values = head.descriptor_values(&last.mean((2, 3)).unwrap()).unwrap().expect("descriptor values");
            descriptors::loss(&values, &wanted, &present).unwrap().to_scalar::<f32>().unwrap()
        };
        let weights = aux::Weights { mask: 1.0, descriptors: 1.0, ..Default::default() };
        head_steps_lower(&mut task, &head, (&x, &y, &targets), weights, 20, desc_loss, 0.6, "descriptor loss");
        // A whole run saves the map; prediction does not read it; a run without it does not resume.
        let other = ClassifyConfig { aux_descriptor_weight: 0.0, ..cfg.clone() };
        let clf = train_load_and_refuse_resume(&cfg, &data, d.path(), other, "lesion descriptors");
        assert!(clf.aux.as_ref().is_some_and(|h| h.describes()));
        assert!(clf.varmap.data().lock().unwrap().contains_key("aux_mask.desc_fc"));
        // Without masks they are off with the lesion-mask loss.
        let mut unmasked = data.clone();
        unmasked.samples.iter_mut().for_each(|s| s.mask = None);
        let t = ClassifyTask::new(cfg.clone(), &unmasked, &ExtraSources::default(), &Device::Cpu).unwrap();
        assert!(t.clf.aux.is_none() && t.clf.cfg.aux_descriptor_weight == 0.0 && t.descriptor_stats.is_none());
        // So are they, alone, where no training lesion is large enough to describe.
        let mut specks = data.clone();
        for s in specks.samples.iter_mut() {
            let m = image::GrayImage::from_fn(56, 56, |x, y| image::Luma([if x < 2 && y < 2 { 255 } else { 0 }]));
            let path = d.path().join(format!("{}_speck.png", s.id));
            m.save(&path).unwrap();
            s.mask = Some(path);
        }
        let t = ClassifyTask::new(cfg, &specks, &ExtraSources::default(), &Device::Cpu).unwrap();
        assert!(t.clf.aux.as_ref().is_some_and(|h| !h.describes()) && t.descriptor_stats.is_none());
    }

    #[test]
    fn a_second_stage_trains_its_own_map_of_the_lesion_and_is_saved_with_the_model() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(d.path(), 24, 56);
        let cfg = ClassifyConfig {
            aux_mask_weight: 1.0,
            aux_mask_second_stage: Some(Stage::Layer2),
            lesion_crop_margin: None,
            ..tiny_cfg()
        };
        // None by default and in a config saved before it existed.
        assert_eq!(saved_without(&["aux_mask_second_stage"]).aux_mask_second_stage, None);
        assert!(cfg.describe().contains("lesion-mask loss on layer3 and layer2 (weight 1)"), "{}", cfg.describe());
        // Refused: the head's own stage, a stage it cannot read, no head.
        for (bad, says) in [
            (ClassifyConfig { aux_mask_second_stage: Some(Stage::Layer3), ..cfg.clone() }, "other than"),
            (ClassifyConfig { aux_mask_second_stage: Some(Stage::Fc), ..cfg.clone() }, "layer1 .. layer4"),
            (ClassifyConfig { aux_mask_weight: 0.0, ..cfg.clone() }, "aux_mask_weight > 0"),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains("aux_mask_second_stage") && e.contains(says), "{e}");
        }
        // Training from layer3 leaves layer2 untrained: the loss cannot train there.
        let late = ClassifyConfig { trainable_from: Stage::Layer3, ..cfg.clone() };
        assert!(late.aux_mask_blocker(&data).unwrap().contains("after layer2"));
        let mut task = ClassifyTask::new(cfg.clone(), &data, &ExtraSources::default(), &Device::Cpu).unwrap();
        let head = task.clf.aux.clone().unwrap();
        assert_eq!((head.stage(), head.second_stage()), (Stage::Layer3, Some(Stage::Layer2)));
        let names: Vec<String> = task.clf.varmap.data().lock().unwrap().keys().cloned().collect();
        assert!(
            names.iter().any(|n| n == "aux_mask.second_weight") && names.iter().any(|n| n == "aux_mask.second_bias")
        );
        // Steps on one batch lower the second map's loss, at layer2's grid.
        let idx: Vec<usize> = (0..12).collect();
        let (x, y, targets) = task.image_batch(&idx, &mut Rng::new(1)).unwrap();
        let masks = &targets.masks;
        let second_loss = |t: &ClassifyTask| {
            let (_, f) = t.clf.net.features_taps(&x, true, Stage::Conv1, &[Stage::Layer3, Stage::Layer2]).unwrap();
            assert_eq!(f[0].dims4().unwrap().2, 3, "layer3 of a 48 px input");
            let map = head.second_map(&f[1]).unwrap().expect("a second map");
            let (_, h, w) = map.dims3().unwrap();
            assert_eq!((h, w), (6, 6), "layer2 of a 48 px input");
            let (tg, p) = aux::targets(masks, h, w, &Device::Cpu).unwrap();
            aux::loss(&map, &tg, &p).unwrap().to_scalar::<f32>().unwrap()
        };
        let weights = aux::Weights { mask: 1.0, ..Default::default() };
        head_steps_lower(&mut task, &head, (&x, &y, &targets), weights, 30, second_loss, 0.6, "second map's loss");
        // A run saves it and loads it back; a run without it does not resume one with it.
        let one = ClassifyConfig { aux_mask_second_stage: None, ..cfg.clone() };
        let clf = train_load_and_refuse_resume(&cfg, &data, d.path(), one, "lesion-mask head");
        assert_eq!(clf.aux.as_ref().and_then(|h| h.second_stage()), Some(Stage::Layer2));
        // Without masks the whole loss is off, the second stage with it.
        let mut unmasked = data.clone();
        unmasked.samples.iter_mut().for_each(|s| s.mask = None);
        let t = ClassifyTask::new(cfg, &unmasked, &ExtraSources::default(), &Device::Cpu).unwrap();
        assert!(t.clf.aux.is_none() && t.clf.cfg.aux_mask_second_stage.is_none());
    }

    #[test]
    fn lesion_pooling_reads_the_head_at_prediction_and_is_saved_with_the_model() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(d.path(), 24, 56);
        let cfg = ClassifyConfig { aux_mask_weight: 1.0, lesion_pooling: true, lesion_crop_margin: None, ..tiny_cfg() };
        // Off by default and in a config saved before it existed; it needs the head.
        assert!(!ClassifyConfig::default().lesion_pooling);
        assert!(!saved_without(&["lesion_pooling"]).lesion_pooling);
        let e = ClassifyConfig { aux_mask_weight: 0.0, ..cfg.clone() }.validate().unwrap_err();
        assert!(e.to_string().contains("aux_mask_weight"), "{e}");
        assert!(cfg.describe().contains("lesion-weighted pooling"), "{}", cfg.describe());
        let mut task = ClassifyTask::new(cfg.clone(), &data, &ExtraSources::default(), &Device::Cpu).unwrap();
        let head = task.clf.aux.clone().unwrap();
        assert!(head.pools());
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
        };
        // At the start the lesion's logits add nothing: the plain network's logits.
        let idx: Vec<usize> = (0..12).collect();
        let (x, y, targets) = task.image_batch(&idx, &mut Rng::new(1)).unwrap();
        let (logits, map) = forward_with_head(&task.clf.net, Some(&head), &x, false, Stage::Conv1).unwrap();
        assert_eq!(diff(&logits, &task.clf.net.forward_t(&x, false).unwrap()), 0.0);
        assert_eq!(map.unwrap().dims(), &[12, 3, 3], "layer3 of a 48 px input");
        // Training moves them off zero: the logits then read the head.
        head_steps(&mut task, &head, (&x, &y, &targets), aux::Weights { mask: 1.0, ..Default::default() }, 5);
        let pool = task.clf.varmap.data().lock().unwrap()["aux_mask.pool_fc"].as_tensor().clone();
        assert!(pool.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
        let (logits, _) = forward_with_head(&task.clf.net, Some(&head), &x, false, Stage::Conv1).unwrap();
        assert!(diff(&logits, &task.clf.net.forward_t(&x, false).unwrap()) > 1e-6);
        // A whole run saves it; the loaded model runs the head at prediction, from an image alone;
        // a run without it does not resume one with it.
        let other = ClassifyConfig { lesion_pooling: false, ..cfg.clone() };
        let clf = train_load_and_refuse_resume(&cfg, &data, d.path(), other, "lesion-mask head");
        assert!(clf.cfg.lesion_pooling && clf.aux.as_ref().is_some_and(|h| h.pools()));
        let img = RgbImage::from_fn(60, 50, |x, y| image::Rgb([120 + (x % 7) as u8 * 9, 80, 60 + (y % 5) as u8 * 11]));
        let view = clf.view(&img);
        let x = image_io::images_to_tensor(&[&view], clf.cfg.normalize, &Device::Cpu).unwrap();
        assert!(diff(&clf.logits(&[&view]).unwrap(), &clf.net.forward_t(&x, false).unwrap()) > 1e-6);
        // Where the head cannot train, lesion pooling is refused with the reason, not dropped.
        let mut unmasked = data.clone();
        unmasked.samples.iter_mut().for_each(|s| s.mask = None);
        let e = ClassifyTask::new(cfg.clone(), &unmasked, &ExtraSources::default(), &Device::Cpu).err().unwrap();
        assert!(e.to_string().contains("lesion pooling") && e.to_string().contains("no labelled image"), "{e}");
    }

    #[test]
    fn dropout_drops_a_seeded_share_of_features_in_training_only() {
        let d = Device::Cpu;
        // Off: no tensor and no draw taken.
        let mut rng = Rng::new(5);
        assert!(dropout_mask(&mut rng, 4, 8, 0.0, &d).unwrap().is_none());
        assert_eq!(rng.f64(), Rng::new(5).f64());
        // On: zeros and 1 / (1 - p), about p of them zero, the same for the same seed.
        let m = dropout_mask(&mut Rng::new(5), 200, 50, 0.3, &d).unwrap().unwrap();
        assert_eq!(m.dims(), &[200, 50]);
        let v = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.7).abs() < 1e-6));
        let zeros = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        assert!((zeros - 0.3).abs() < 0.02, "{zeros}");
        let again = dropout_mask(&mut Rng::new(5), 200, 50, 0.3, &d).unwrap().unwrap();
        assert_eq!(v, again.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        // A run with it trains, says so, repeats with its seed, and is refused at p = 1.
        let dir = tempfile::tempdir().unwrap();
        let data = phantoms(dir.path(), 24, 48);
        let cfg = ClassifyConfig { dropout: 0.5, ..tiny_cfg() };
        assert!(cfg.describe().contains("dropout 0.5 before fc"), "{}", cfg.describe());
        assert!(ClassifyConfig { dropout: 1.0, ..tiny_cfg() }.validate().is_err());
        assert_eq!(saved_without(&["dropout"]).dropout, 0.0);
        let losses = |c: &ClassifyConfig| {
            let mut t = ClassifyTask::new(c.clone(), &data, &ExtraSources::default(), &Device::Cpu).unwrap();
            let mut rng = Rng::new(3);
            (0..3).map(|b| t.train_batch(0, b, &mut rng).unwrap().loss.to_scalar::<f32>().unwrap()).collect::<Vec<_>>()
        };
        let (a, b) = (losses(&cfg), losses(&cfg));
        assert_eq!(a, b);
        assert!(a.iter().all(|l| l.is_finite()));
        assert_ne!(a, losses(&tiny_cfg()), "dropout changes the training steps");
    }

    #[test]
    fn sharpness_aware_steps_train_and_leave_the_running_statistics_to_the_first_pass() {
        let dir = tempfile::tempdir().unwrap();
        let data = phantoms(dir.path(), 24, 48);
        let sam = ClassifyConfig { sam_rho: 0.05, ..tiny_cfg() };
        assert!(sam.describe().contains("sharpness-aware steps (radius 0.05)"), "{}", sam.describe());
        for bad in [-0.1, f64::NAN, f64::INFINITY] {
            assert!(ClassifyConfig { sam_rho: bad, ..tiny_cfg() }.validate().is_err(), "{bad}");
        }
        assert_eq!(saved_without(&["sam_rho"]).sam_rho, 0.0);
        // One step with the lesion-mask head from the same weights and batch: the running
        // statistics are the plain step's (the first pass's), the weights are not.
        let after_one = |c: &ClassifyConfig| {
            let mut t = ClassifyTask::new(c.clone(), &data, &ExtraSources::default(), &Device::Cpu).unwrap();
            assert!(t.clf.aux.is_some());
            t.train_batch(0, 0, &mut Rng::new(3)).unwrap();
            let vars = t.clf.varmap.data().lock().unwrap().clone();
            let read = |keep: &dyn Fn(&str) -> bool| -> std::collections::BTreeMap<String, Vec<f32>> {
                vars.iter()
                    .filter(|(k, _)| keep(k) && !k.ends_with("num_batches_tracked"))
                    .map(|(k, v)| (k.clone(), v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
                    .collect()
            };
            (read(&|k| derm_core::optim::is_buffer(k)), read(&|k| !derm_core::optim::is_buffer(k)))
        };
        let (sam_stats, sam_weights) = after_one(&sam);
        let (plain_stats, plain_weights) = after_one(&tiny_cfg());
        assert!(sam_stats.len() > 10);
        assert_eq!(sam_stats, plain_stats);
        assert_ne!(sam_weights["fc.weight"], plain_weights["fc.weight"]);
        assert_ne!(sam_weights["conv1.weight"], plain_weights["conv1.weight"]);
        // Ten steps on one fixed batch halve its loss, as plain steps do.
        ten_steps_halve_a_fixed_batch_loss(ClassifyConfig { aux_mask_weight: 0.0, ..tiny_cfg() }, &data, 0.05);
    }

    #[test]
    fn the_per_cell_diagnosis_trains_with_the_head_and_is_saved_with_the_model() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(d.path(), 24, 56);
        let cfg = ClassifyConfig { aux_mask_weight: 1.0, aux_cell_weight: 1.0, lesion_crop_margin: None, ..tiny_cfg() };
        // Off by default and in a config saved before it existed; it needs the head.
        assert_eq!(ClassifyConfig::default().aux_cell_weight, 0.0);
        assert_eq!(saved_without(&["aux_cell_weight"]).aux_cell_weight, 0.0);
        let e = ClassifyConfig { aux_mask_weight: 0.0, ..cfg.clone() }.validate().unwrap_err();
        assert!(e.to_string().contains("aux_cell_weight") && e.to_string().contains("aux_mask_weight"), "{e}");
        assert!(ClassifyConfig { aux_cell_weight: f64::INFINITY, ..cfg.clone() }.validate().is_err());
        assert!(cfg.describe().contains("diagnosis per lesion cell (weight 1)"), "{}", cfg.describe());
        let mut task = ClassifyTask::new(cfg.clone(), &data, &ExtraSources::default(), &Device::Cpu).unwrap();
        let head = task.clf.aux.clone().unwrap();
        // Steps on one batch lower the cells' loss: the head's cell map and the backbone learn.
        let idx: Vec<usize> = (0..12).collect();
        let (x, y, targets) = task.image_batch(&idx, &mut Rng::new(1)).unwrap();
        let masks = &targets.masks;
        let cell_loss = |t: &ClassifyTask| {
            let (_, f) = t.clf.net.features_tap(&x, true, Stage::Conv1, Some(head.stage())).unwrap();
            let f = f.unwrap();
            let (_, _, h, w) = f.dims4().unwrap();
            let (shares, present) = aux::targets(masks, h, w, &Device::Cpu).unwrap();
            let cells = head.cell_logits(&f).unwrap().expect("the head gives per-cell diagnoses");
            aux::cell_class_loss(&cells, &y, &shares, &present).unwrap().to_scalar::<f32>().unwrap()
        };
        let weights = aux::Weights { mask: 1.0, cells: 1.0, ..Default::default() };
        head_steps_lower(&mut task, &head, (&x, &y, &targets), weights, 15, cell_loss, 0.7, "cell loss");
        // A whole run saves it; prediction does not read it; a run without it does not resume.
        let other = ClassifyConfig { aux_cell_weight: 0.0, ..cfg.clone() };
        let clf = train_load_and_refuse_resume(&cfg, &data, d.path(), other, "per-cell diagnosis");
        assert_eq!(clf.cfg.aux_cell_weight, 1.0);
        assert!(clf.varmap.data().lock().unwrap().contains_key("aux_mask.cell_fc"));
        // Where the head cannot train, the run is refused with the reason, not trained without it.
        let mut unmasked = data.clone();
        unmasked.samples.iter_mut().for_each(|s| s.mask = None);
        let e = ClassifyTask::new(cfg, &unmasked, &ExtraSources::default(), &Device::Cpu).err().unwrap();
        assert!(e.to_string().contains("per-cell diagnosis") && e.to_string().contains("no labelled image"), "{e}");
    }

    #[test]
    fn mixed_batches_train_reproducibly_and_the_setting_is_saved() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(d.path(), 24, 48);
        let fc = |mix: BatchMix, run: &str| {
            let out = d.path().join(run);
            let cfg = ClassifyConfig { mix, label_smoothing: 0.1, ..tiny_cfg() };
            let (task, state) =
                train(cfg, &data, &ExtraSources::default(), &Device::Cpu, &out, false, &mut |_| {}).unwrap();
            assert!(state.step > 0);
            assert_eq!(Classifier::load(&out, &Device::Cpu).unwrap().cfg.mix, mix);
            let live = checkpoint::sorted_vars(&task.clf.varmap);
            let w = live.iter().find(|(n, _)| n == "fc.weight").unwrap().1.as_tensor().clone();
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let cut = BatchMix::CutMix { alpha: 1.0 };
        let a = fc(cut, "a");
        assert!(a.iter().all(|v| v.is_finite()));
        assert_eq!(a, fc(cut, "b"), "the same seed gives the same mixed training");
        assert_ne!(a, fc(BatchMix::Mixup { alpha: 0.2 }, "c"), "mixup trains other weights than CutMix");
        assert_ne!(a, fc(BatchMix::Off, "d"), "CutMix trains other weights than no mixing");
        let frozen = ClassifyConfig { freeze_backbone: true, ..tiny_cfg() };
        assert!(frozen.validate().is_ok());
        assert!(ClassifyConfig { mix: cut, ..frozen }.validate().is_err(), "mixing needs a trained backbone");
    }

    #[test]
    fn weighted_loss_matches_the_hand_computed_value() {
        let logits = Tensor::new(&[[2f32, 0.0, 0.0], [0.0, 1.0, 0.0]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f32, 1.0, 3.0], &Device::Cpu).unwrap();
        let l0 = -(2f64.exp() / (2f64.exp() + 2.0)).ln();
        let l1 = -(1.0 / (1f64.exp() + 2.0)).ln();
        let v = loss(&logits, &y, Some(&w)).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((v - (l0 + 3.0 * l1) / 4.0).abs() < 1e-5, "{v}");
        let v = loss(&logits, &y, None).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((v - (l0 + l1) / 2.0).abs() < 1e-5, "{v}");
    }

    #[test]
    fn label_smoothing_matches_the_hand_computed_value() {
        let logits = Tensor::new(&[[2f32, 0.0, 0.0], [0.0, 1.0, 0.0]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
        let (z0, z1) = ((2f64.exp() + 2.0).ln(), (1f64.exp() + 2.0).ln());
        // -log p of every class, per row.
        let nl = [[z0 - 2.0, z0, z0], [z1, z1 - 1.0, z1]];
        let ce = (nl[0][0] + nl[1][2]) / 2.0;
        let uniform = nl.iter().flatten().sum::<f64>() / 6.0;
        let v = |eps| smoothed_loss(&logits, &y, None, eps).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((v(0.1) - (0.9 * ce + 0.1 * uniform)).abs() < 1e-5, "{}", v(0.1));
        assert!((v(0.0) - ce).abs() < 1e-6);
    }

    #[test]
    fn with_a_weight_average_the_checkpoint_holds_the_average_and_training_resumes() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(d.path(), 24, 48);
        let out = d.path().join("run");
        let cfg = ClassifyConfig { ema_decay: 0.9, label_smoothing: 0.1, ..tiny_cfg() };
        let (task, state) =
            train(cfg.clone(), &data, &ExtraSources::default(), &Device::Cpu, &out, false, &mut |_| {}).unwrap();
        assert_eq!(task.ema.as_ref().unwrap().updates(), state.step);
        let last = train::last_dir(&out);
        let saved = checkpoint::load_tensors(&last.join(checkpoint::WEIGHTS), &Device::Cpu).unwrap();
        let trained = checkpoint::load_tensors(&last.join(checkpoint::TRAINING_WEIGHTS), &Device::Cpu).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let live = checkpoint::sorted_vars(&task.clf.varmap);
        let live_fc = live.iter().find(|(n, _)| n == "fc.weight").unwrap().1.as_tensor();
        // The trained weights are beside the average, which differs from them.
        assert_eq!(v(&trained["fc.weight"]), v(live_fc));
        let diff = v(&saved["fc.weight"]).iter().zip(v(live_fc)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff > 1e-6, "the checkpoint holds the trained weights, not their average");
        // The best model loads as any (the average); resuming continues weights and average.
        Classifier::load(&out, &Device::Cpu).unwrap();
        let more = ClassifyConfig { train: LoopConfig { epochs: 3, ..cfg.train }, ..cfg };
        let (task2, st) = train(more, &data, &ExtraSources::default(), &Device::Cpu, &out, true, &mut |_| {}).unwrap();
        assert!(st.step > state.step);
        assert_eq!(task2.ema.as_ref().unwrap().updates(), st.step);
    }

    #[test]
    fn balanced_batches_hold_every_class() {
        let d = tempfile::tempdir().unwrap();
        // The default phantom mix is ISIC 2017's (19% melanoma, 13% SK, 69% nevus).
        let data = phantoms(d.path(), 40, 32);
        let mut cfg = tiny_cfg();
        cfg.input_size = 32;
        cfg.resize = 32;
        let mut task = ClassifyTask::new(cfg, &data, &ExtraSources::default(), &Device::Cpu).unwrap();
        let counts = task.train.class_counts();
        assert!(counts[2] > 2 * counts[1], "{counts:?}");
        for b in 0..task.batches_per_epoch() {
            let idx: Vec<usize> = task.epoch_order(0).iter().skip(b * 6).take(6).copied().collect();
            let mut per = [0; 3];
            for i in idx {
                per[task.train.samples[i].label.unwrap()] += 1;
            }
            assert_eq!(per, [2, 2, 2], "batch {b}");
        }
    }

    #[test]
    fn training_checkpoints_resume_and_evaluate() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(d.path(), 24, 48);
        let out = d.path().join("run");
        let mut cfg = tiny_cfg();
        cfg.class_weighted_loss = true;
        cfg.balanced = false;
        let (task, state) =
            train(cfg.clone(), &data, &ExtraSources::default(), &Device::Cpu, &out, false, &mut |_| {}).unwrap();
        let per_epoch = task.sizes().0 / 6;
        assert_eq!(state.step, 2 * per_epoch);
        assert!(state.best_metric.is_some());
        let clf = Classifier::load(&out, &Device::Cpu).unwrap();
        assert_eq!(clf.class_names(), vec!["melanoma", "seborrheic_keratosis", "nevus"]);
        // Any image size; probabilities sum to one, with and without flips.
        let img = RgbImage::from_pixel(61, 45, image::Rgb([120, 80, 60]));
        for tta in [false, true] {
            let p = clf.probabilities(&[&img, &img], tta).unwrap();
            assert_eq!(p.len(), 2);
            assert!((p[0].iter().sum::<f64>() - 1.0).abs() < 1e-5);
        }
        // Evaluation with a preprocessing step (here: inverting the image).
        let mut calls = 0usize;
        let inv = |i: &RgbImage| -> Result<RgbImage> {
            let mut o = i.clone();
            image::imageops::invert(&mut o);
            Ok(o)
        };
        let e = evaluate(&clf, &data, Some(&inv), true, &mut |n| calls += n).unwrap();
        assert_eq!(e.ids.len(), 24);
        assert_eq!(calls, 24);
        assert_eq!(e.report.confusion.counts.iter().flatten().sum::<u64>(), 24);
        // Resume runs to three epochs.
        let mut more = cfg;
        more.train.epochs = 3;
        let (_, st) =
            train(more.clone(), &data, &ExtraSources::default(), &Device::Cpu, &out, true, &mut |_| {}).unwrap();
        assert_eq!(st.step, 3 * per_epoch);
        // Another shape cannot resume.
        more.model.base_width = 4;
        more.train.epochs = 4;
        assert!(train(more, &data, &ExtraSources::default(), &Device::Cpu, &out, true, &mut |_| {}).is_err());
    }

    #[test]
    fn test_time_views_make_the_probabilities_blind_to_the_trained_symmetries() {
        use image::imageops::{flip_horizontal, rotate90};
        let img = RgbImage::from_fn(48, 48, |x, y| image::Rgb([(x * 5) as u8, (y * 3 + x) as u8, (x * y) as u8]));
        let max_diff =
            |a: &[Vec<f64>], b: &[Vec<f64>]| a[0].iter().zip(&b[0]).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max);
        // Flips only: four views, blind to a mirror but not to a quarter turn.
        let flips = Classifier::new(tiny_cfg(), &Device::Cpu).unwrap();
        assert_eq!(flips.test_time_views(true).len(), 4);
        let p = |c: &Classifier, i: &RgbImage, tta| c.view_probabilities(std::slice::from_ref(i), tta).unwrap();
        assert!(max_diff(&p(&flips, &img, true), &p(&flips, &flip_horizontal(&img), true)) < 1e-5);
        assert!(max_diff(&p(&flips, &img, false), &p(&flips, &flip_horizontal(&img), false)) > 1e-5);
        // Trained with quarter turns: eight views, blind to those too.
        let turns = ClassifyConfig { augment: AugmentConfig::default(), ..tiny_cfg() };
        let turns = Classifier::new(turns, &Device::Cpu).unwrap();
        assert_eq!(turns.test_time_views(true).len(), 8);
        assert!(max_diff(&p(&turns, &img, true), &p(&turns, &rotate90(&img), true)) < 1e-5);
        assert!(max_diff(&p(&flips, &img, true), &p(&flips, &rotate90(&img), true)) > 1e-5);
    }

    #[test]
    fn the_operating_point_chosen_on_validation_is_saved_and_used() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(d.path(), 24, 48);
        let out = d.path().join("run");
        let cfg = ClassifyConfig { select_operating_point: true, min_melanoma_sensitivity: 0.0, ..tiny_cfg() };
        // Without a validation part it is refused before training, not skipped.
        let none = ClassifyConfig { val_fraction: 0.0, ..cfg.clone() };
        let e = ClassifyTask::new(none, &data, &ExtraSources::default(), &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("validation part"), "{e}");
        let (task, _) =
            train(cfg.clone(), &data, &ExtraSources::default(), &Device::Cpu, &out, false, &mut |_| {}).unwrap();
        let clf = Classifier::load(&out, &Device::Cpu).unwrap();
        let w = clf.cfg.decision_weights.clone();
        assert_eq!(w.len(), 3);
        assert_eq!(w[0], 1.0);
        let m = checkpoint::read_meta(&train::best_dir(&out), "classify").unwrap();
        let op = &m.extra["operating_point"];
        let (before, after) =
            (op["val_balanced_accuracy_before"].as_f64().unwrap(), op["val_balanced_accuracy"].as_f64().unwrap());
        assert!(after >= before, "{before} -> {after}");
        // Scoring the validation part with the reloaded model (and its test-time views, on by
        // default) gives the saved balanced accuracy.
        let (_, val) = data.split_by_id(tiny_cfg().val_fraction, tiny_cfg().train.seed);
        assert!(clf.cfg.test_time_augmentation);
        let e = evaluate(&clf, &val, None, true, &mut |_| {}).unwrap();
        assert!((e.report.balanced_accuracy - after).abs() < 1e-9, "{} vs {after}", e.report.balanced_accuracy);
        // The report `train` kept from choosing the point is the reloaded model's on the same
        // images, and only for the run folder it came from.
        let kept = task.kept_val_report(&out).unwrap().unwrap();
        assert_eq!(kept.confusion.counts, e.report.confusion.counts);
        assert_eq!((kept.balanced_accuracy, kept.mean_auc), (e.report.balanced_accuracy, e.report.mean_auc));
        assert!(task.kept_val_report(&d.path().join("elsewhere")).is_err());
        // Chosen again with a melanoma floor (on all 24 images: the validation part of 6 may
        // hold no melanoma): the saved point keeps it there, and the config records it.
        let best = train::best_dir(&out);
        select_operating_point(&best, &data, 0.9, &Device::Cpu).unwrap();
        let clf = Classifier::load(&out, &Device::Cpu).unwrap();
        assert_eq!(clf.cfg.min_melanoma_sensitivity, 0.9);
        let e = evaluate(&clf, &data, None, true, &mut |_| {}).unwrap();
        let mel = e.report.melanoma_class;
        assert!(e.labels.iter().filter(|&&l| l == mel).count() >= 3, "the test needs melanomas");
        let sens = e.report.sensitivity[mel].unwrap();
        let op = &checkpoint::read_meta(&best, "classify").unwrap().extra["operating_point"];
        assert_eq!(op["val_melanoma_sensitivity"].as_f64(), Some(sens));
        assert!(sens >= 0.9, "melanoma sensitivity {sens} with {:?}", clf.cfg.decision_weights);
    }

    #[test]
    fn the_feature_bank_caches_the_augmentations_symmetries() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(d.path(), 24, 40);
        let base = ClassifyConfig { freeze_backbone: true, feature_views: 8, input_size: 32, resize: 40, ..tiny_cfg() };
        let none = AugmentConfig { hflip: false, vflip: false, ..AugmentConfig::flips() };
        for (augment, views) in [(AugmentConfig::default(), 8), (AugmentConfig::flips(), 4), (none, 1)] {
            let cfg = ClassifyConfig { augment, ..base.clone() };
            let mut task = ClassifyTask::new(cfg, &data, &ExtraSources::default(), &Device::Cpu).unwrap();
            task.ensure_bank().unwrap();
            let bank = task.bank.as_ref().unwrap();
            assert_eq!((bank.views, bank.train.dim(0).unwrap()), (views, views * bank.n));
            // View k of the bank is the backbone's features of the k-th symmetry of each image.
            let last = task.clf.cfg.augment.symmetries()[views - 1];
            let want = task.features(&task.train, last).unwrap().to_vec2::<f32>().unwrap();
            let got = bank.train.narrow(0, (views - 1) * bank.n, bank.n).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(got, want);
        }
        let too_many = ClassifyConfig { feature_views: 9, ..base };
        assert!(ClassifyTask::new(too_many, &data, &ExtraSources::default(), &Device::Cpu).is_err());
    }

    #[test]
    fn frozen_backbone_trains_only_the_head() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(d.path(), 24, 48);
        let mut cfg = tiny_cfg();
        cfg.freeze_backbone = true;
        cfg.feature_views = 2;
        cfg.train.epochs = 3;
        // A "pretrained" file: another model's weights with a 1000-class head.
        let donor_cfg = ClassifyConfig {
            model: ResNetConfig { num_classes: 1000, ..cfg.model.clone() },
            train: LoopConfig { seed: 7, ..Default::default() },
            ..tiny_cfg()
        };
        let donor = Classifier::new(donor_cfg, &Device::Cpu).unwrap();
        let pre = d.path().join("imagenet.safetensors");
        checkpoint::save_varmap(&donor.varmap, &pre).unwrap();
        cfg.pretrained = Some(pre);
        let out = d.path().join("run");
        let (mut task, state) =
            train(cfg, &data, &ExtraSources::default(), &Device::Cpu, &out, false, &mut |_| {}).unwrap();
        assert!(state.step > 0);
        assert_eq!(task.opt.param_names(), vec!["fc.bias", "fc.weight"]);
        let w = |vm: &VarMap, n: &str| -> Vec<f32> {
            checkpoint::sorted_vars(vm)
                .into_iter()
                .find(|(k, _)| k == n)
                .unwrap()
                .1
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(w(&task.clf.varmap, "layer2.0.conv1.weight"), w(&donor.varmap, "layer2.0.conv1.weight"));
        assert_eq!(w(&task.clf.varmap, "layer2.0.bn1.running_mean"), w(&donor.varmap, "layer2.0.bn1.running_mean"));
        // The cached-feature validation equals a full forward pass.
        let from_bank = task.val_probabilities().unwrap();
        task.bank = None;
        task.clf.cfg.freeze_backbone = false;
        let full = task.val_probabilities().unwrap();
        for (a, b) in from_bank.iter().flatten().zip(full.iter().flatten()) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
