//! # derm-segment: lesion segmentation with a dilated U-Net
//!
//! Trains and runs the segmentation stage of derm (Bisla et al.): a U-Net whose bottleneck uses
//! dilated convolutions (dilation 2 and 4) to widen its view, trained with binary cross-entropy
//! (numerically stable, with logits; a per-image soft Dice term or Lovász hinge can be added) and
//! Adam (betas 0.9/0.999, step decay or a cosine over the whole run; lr 3e-4 by default, the
//! paper's 1e-4 measured lower on real images at CPU budgets), with random flips, rotations and
//! crops; the model kept is an exponential moving average of the weights
//! ([`derm_core::ema`]). Inference: sigmoid, averaged over the symmetries the model was trained
//! with (all eight symmetries of the square by default; [`derm_core::symmetry`]), threshold
//! (default 0.5), binary hole filling, optionally only the largest connected component, and masks
//! returned at the image's own size.
//! Scoring: per-image Jaccard averaged, ISIC 2018's thresholded Jaccard, Dice, pixel sensitivity
//! and specificity, and the worst images; [`PerImageScores::compare`] sets two segmenters'
//! per-image scores side by side with paired bootstrap intervals.
//!
//! **Consumes:** a data set with lesion masks (any manifest of derm-data, phantoms included):
//! RGB images of any size, masks 0/255 of the same size. **Produces:** a checkpoint folder
//! (`model.safetensors`, `config.json` = [`SegmentConfig`], `meta.json`), masks (0/255 PNG at the
//! input's size), probability maps, and metrics.

#![forbid(unsafe_code)]

pub mod model;
pub mod scores;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use derm_core::checkpoint::{self, Meta, TensorSpec};
use derm_core::ema::{self, WeightAverage};
use derm_core::image_io::{self, Normalize};
use derm_core::metrics::SegmentationScores;
use derm_core::nn::preset_label;
use derm_core::optim::{OptimConfig, Optimizer, OptimizerKind, STEP_DECAY};
use derm_core::symmetry::Symmetry;
use derm_core::train::{self, LoopConfig, StepLoss, Task, TrainState};
use derm_core::{binary, Error, Result, Rng};
use derm_data::augment::{augment_item, AugmentConfig};
use derm_data::cache::{ImageCache, Item};
use derm_data::dataset::Dataset;
use derm_data::sampler::{Sampler, ShuffleSampler};
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

pub use model::{UNet, UNetConfig};
pub use scores::PerImageScores;

/// Everything a segmentation run is made of; saved as the checkpoint's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SegmentConfig {
    /// Network shape.
    pub model: UNetConfig,
    /// Working size: images are resized to `size` x `size` for training and inference.
    pub size: u32,
    /// Images per batch.
    pub batch_size: usize,
    /// Optimiser (the paper: Adam 1e-4 with step decay).
    pub optim: OptimConfig,
    /// Epochs, step and time budget, evaluation and checkpoint cadence, seed.
    pub train: LoopConfig,
    /// Fraction of the training split held out for validation (by id hash).
    pub val_fraction: f64,
    /// Training augmentation.
    pub augment: AugmentConfig,
    /// Input normalisation (mean and std 0.5).
    pub normalize: Normalize,
    /// Probability threshold for the mask (the authors used 0.4).
    pub threshold: f32,
    /// Fill holes in the thresholded mask.
    pub fill_holes: bool,
    /// Keep only the largest connected component.
    pub largest_component: bool,
    /// After training, choose the threshold (0.30 to 0.70 in steps of 0.05) that gives the best
    /// mean validation Jaccard with the best model, and save it in `best/` (see
    /// [`select_threshold`]).
    pub select_threshold: bool,
    /// Bytes of decoded images kept in memory.
    pub cache_bytes: usize,
    /// Exponential moving average of the weights ([`derm_core::ema`]): the model is evaluated,
    /// kept and saved as the average with this decay per step (0: off). 0.998 by default: +0.03
    /// per-image Jaccard on a held-out ISIC collection at 10 CPU minutes (BENCHMARKS.md).
    pub ema_decay: f64,
    /// Weight of a per-image soft Dice term added to the cross-entropy
    /// ([`derm_kernels::ops::soft_dice_loss`]; 0: cross-entropy alone, as the paper).
    pub dice_weight: f64,
    /// Weight of a per-image Lovász hinge added to the cross-entropy
    /// ([`derm_kernels::ops::lovasz_hinge_loss`], a convex stand-in for one minus the image's
    /// Jaccard index; 0: off). On 400 held-out ISIC images after 40 CPU minutes weight 1 scored
    /// 0.831 per-image Jaccard against 0.827 without it (paired +0.004, -0.002 to +0.009; one
    /// seed; BENCHMARKS.md, "SGD for the classifier, a Lovász hinge for the segmenter").
    pub lovasz_weight: f64,
    /// Average the probabilities over the [`Segmenter::test_time_views`] at inference:
    /// prediction, evaluation and threshold selection. Validation during training scores one
    /// view. (Configs written before quarter turns joined the views call it `test_time_flips`.)
    #[serde(alias = "test_time_flips")]
    pub test_time_augmentation: bool,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        SegmentConfig {
            // The medium network at 3e-4: ahead of the small one at the paper's 1e-4 by 0.016
            // (10 CPU minutes) and 0.015 (40) Jaccard on a held-out ISIC collection
            // (BENCHMARKS.md).
            model: UNetConfig::medium(),
            size: 128,
            batch_size: 8,
            optim: OptimConfig { optimizer: OptimizerKind::adam(3e-4), schedule: STEP_DECAY, clip_grad_norm: None },
            train: LoopConfig { epochs: 20, ..Default::default() },
            val_fraction: 0.1,
            augment: AugmentConfig { crop_scale: [0.85, 1.0], ..AugmentConfig::geometric() },
            normalize: Normalize::HALF,
            threshold: 0.5,
            fill_holes: true,
            largest_component: false,
            select_threshold: false,
            cache_bytes: 1 << 30,
            ema_decay: 0.998,
            dice_weight: 0.0,
            lovasz_weight: 0.0,
            test_time_augmentation: true,
        }
    }
}

impl SegmentConfig {
    /// One line naming the network, the optimiser and the augmentation, for a command to say what
    /// it trains.
    pub fn describe(&self) -> String {
        format!(
            "dilated U-Net, {} (widths {:?}, bottleneck {:?}), {} px, batch {}, {}, augment ({})",
            preset_label(self.model.preset_name(), "custom network"),
            self.model.widths,
            self.model.bottleneck.iter().map(|b| b.0).collect::<Vec<_>>(),
            self.size,
            self.batch_size,
            self.optim.describe(),
            self.augment.describe()
        )
    }
}

fn meta(cfg: &SegmentConfig) -> Meta {
    let mut m = Meta::new("segment", "unet-dilated");
    m.inputs.push(TensorSpec {
        name: "image".into(),
        shape: vec![None, Some(3), None, None],
        dtype: "f32".into(),
        range: Some((-1.0, 1.0)),
        description: format!("RGB normalised with mean {:?} std {:?}", cfg.normalize.mean, cfg.normalize.std),
    });
    m.outputs.push(TensorSpec {
        name: "logits".into(),
        shape: vec![None, Some(1), None, None],
        dtype: "f32".into(),
        range: None,
        description: "lesion logit per pixel; sigmoid gives the probability".into(),
    });
    m.extra = serde_json::json!({ "size": cfg.size, "threshold": cfg.threshold });
    m
}

/// A built network with its weights.
pub struct Segmenter {
    /// The configuration it was trained with.
    pub cfg: SegmentConfig,
    /// The network.
    pub net: UNet,
    /// Its variables.
    pub varmap: VarMap,
    /// Where it runs.
    pub device: Device,
}

/// One image's segmentation.
pub struct Prediction {
    /// Binary mask (0/255) at the image's size.
    pub mask: GrayImage,
    /// Lesion probability (0..255) at the image's size.
    pub probability: GrayImage,
}

impl Segmenter {
    /// A freshly initialised network.
    pub fn new(cfg: SegmentConfig, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = derm_core::nn::seeded_var_builder(&varmap, cfg.train.seed, DType::F32, device);
        let net = UNet::new(&cfg.model, vb)?;
        Ok(Segmenter { cfg, net, varmap, device: device.clone() })
    }

    /// Loads a checkpoint folder (a run folder's `best` or `last`, or a run folder, whose `best`
    /// is used).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let dir = train::resolve_model_dir(dir);
        checkpoint::read_meta(&dir, "segment")?;
        let cfg: SegmentConfig = checkpoint::read_config(&dir)?;
        let s = Segmenter::new(cfg, device)?;
        let dir = checkpoint::resolve(&dir)?;
        checkpoint::load_varmap(&s.varmap, &dir.join(checkpoint::WEIGHTS), checkpoint::Strictness::Exact, |_| false)?;
        Ok(s)
    }

    /// The views test-time augmentation averages ([`AugmentConfig::test_time_views`]): with
    /// `tta`, the symmetries of the square the model was trained to ignore (all eight with the
    /// default flips and quarter turns); without, the image alone.
    pub fn test_time_views(&self, tta: bool) -> Vec<Symmetry> {
        self.cfg.augment.test_time_views(tta)
    }

    /// Probabilities (N, 1, size, size) for images already at the working size; with
    /// `cfg.test_time_augmentation` the mean over the [`Segmenter::test_time_views`].
    pub fn probabilities(&self, imgs: &[&RgbImage]) -> Result<Tensor> {
        self.probabilities_with(imgs, self.cfg.test_time_augmentation)
    }

    /// [`Segmenter::probabilities`], of the test-time views or of the image alone.
    fn probabilities_with(&self, imgs: &[&RgbImage], tta: bool) -> Result<Tensor> {
        let x = image_io::images_to_tensor(imgs, self.cfg.normalize, &self.device)?;
        let p = |x: &Tensor| -> Result<Tensor> { Ok(candle_nn::ops::sigmoid(&self.net.forward_t(x, false)?)?) };
        // The image itself, then each other view: transform the input, predict, map the
        // prediction back onto the image's pixels.
        let views = self.test_time_views(tta);
        let mut sum = p(&x)?;
        for s in views.iter().filter(|s| **s != Symmetry::IDENTITY) {
            sum = (sum + s.undo(&p(&s.tensor(&x)?)?)?)?;
        }
        if views.len() == 1 {
            return Ok(sum);
        }
        Ok((sum / views.len() as f64)?)
    }

    /// Segments images of any size: resize to the working size, predict, resize the probability
    /// back, threshold, post-process.
    pub fn predict(&self, imgs: &[&RgbImage]) -> Result<Vec<Prediction>> {
        let s = self.cfg.size;
        let mut out = Vec::with_capacity(imgs.len());
        for chunk in imgs.chunks(self.cfg.batch_size.max(1)) {
            let small: Vec<RgbImage> = chunk.iter().map(|i| image_io::resize_rgb(i, s, s)).collect();
            let refs: Vec<&RgbImage> = small.iter().collect();
            let probs = self.probabilities(&refs)?.to_device(&Device::Cpu)?;
            for (k, img) in chunk.iter().enumerate() {
                let (w, h) = img.dimensions();
                let p = probs.get(k)?.unsqueeze(0)?;
                let p =
                    derm_kernels::ops::resize2d(&p, h as usize, w as usize, derm_kernels::ops::ResizeMode::Bilinear)?;
                let v = p.flatten_all()?.to_vec1::<f32>()?;
                out.push(self.postprocess(&v, w, h));
            }
        }
        Ok(out)
    }

    fn postprocess(&self, probs: &[f32], w: u32, h: u32) -> Prediction {
        self.postprocess_at(probs, w, h, self.cfg.threshold)
    }

    fn postprocess_at(&self, probs: &[f32], w: u32, h: u32, threshold: f32) -> Prediction {
        let mut mask = binary::threshold(probs, w, h, threshold);
        if self.cfg.largest_component {
            mask = binary::largest_component(&mask);
        }
        if self.cfg.fill_holes {
            mask = binary::fill_holes(&mask);
        }
        let probability = GrayImage::from_fn(w, h, |x, y| {
            image::Luma([(probs[(y * w + x) as usize] * 255.0).round().clamp(0.0, 255.0) as u8])
        });
        Prediction { mask, probability }
    }
}

/// What `derm segment eval` reports (`--json`, `metrics.json`), read back typed by the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    /// Scores over the split.
    pub summary: derm_core::metrics::SegmentationSummary,
    /// The lowest per-image Jaccards, (id, Jaccard), worst first.
    pub worst: Vec<(String, f64)>,
    /// How many views were averaged per image ([`Segmenter::test_time_views`], or 1); 0 in
    /// summaries written before it was recorded.
    #[serde(default)]
    pub tta_views: usize,
}

/// Scores a segmenter on a data set at each image's own resolution.
pub fn evaluate(seg: &Segmenter, data: &Dataset, on_image: &mut dyn FnMut(usize)) -> Result<SegmentationScores> {
    let cache = ImageCache::new(0);
    let mut scores = SegmentationScores::default();
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(seg.cfg.batch_size.max(1)) {
        let items = data.load_items(chunk, None, &cache)?;
        for it in &items {
            if it.mask.is_none() {
                return Err(Error::invalid(format!(
                    "{}: sample {} has no lesion mask to score against",
                    data.name, it.id
                )));
            }
        }
        let imgs: Vec<&RgbImage> = items.iter().map(|i| &i.image).collect();
        let preds = seg.predict(&imgs)?;
        for (it, p) in items.iter().zip(preds) {
            if let Some(m) = &it.mask {
                scores.add(it.id.clone(), p.mask.as_raw(), m.as_raw());
            }
            on_image(1);
        }
    }
    Ok(scores)
}

/// The training task for [`derm_core::train::fit`].
pub struct SegmentTask {
    seg: Segmenter,
    opt: Optimizer,
    train: Dataset,
    val: Dataset,
    cache: ImageCache,
    /// The running average of the weights (with `ema_decay`).
    ema: Option<WeightAverage>,
    /// Validation Jaccard of the latest evaluation.
    pub last_val: Option<f64>,
}

impl SegmentTask {
    /// Sets up training on `data` (split into train and validation parts by id).
    pub fn new(cfg: SegmentConfig, data: &Dataset, device: &Device) -> Result<Self> {
        cfg.augment.validate()?;
        let with_masks = data.filter(|s| s.mask.is_some());
        if with_masks.is_empty() {
            return Err(Error::invalid(format!("{} split {}: no sample has a lesion mask", data.name, data.split)));
        }
        let (train, val) = with_masks.split_by_id(cfg.val_fraction, cfg.train.seed);
        if cfg.select_threshold && val.is_empty() {
            return Err(with_masks.no_validation_error("the threshold", cfg.val_fraction));
        }
        if train.len() < cfg.batch_size {
            return Err(Error::invalid(format!(
                "{} training samples, fewer than one batch of {}",
                train.len(),
                cfg.batch_size
            )));
        }
        tracing::info!(train = train.len(), val = val.len(), "segmentation data");
        let seg = Segmenter::new(cfg.clone(), device)?;
        let opt = Optimizer::from_varmap(&seg.varmap, cfg.optim, |_| true);
        let cache = ImageCache::new(cfg.cache_bytes);
        let ema = match cfg.ema_decay > 0.0 {
            true => Some(WeightAverage::new(&seg.varmap, cfg.ema_decay, |_| true)?),
            false => None,
        };
        Ok(SegmentTask { seg, opt, train, val, cache, ema, last_val: None })
    }

    /// The segmenter being trained.
    pub fn segmenter(&self) -> &Segmenter {
        &self.seg
    }

    /// Sizes of the training and validation parts.
    pub fn sizes(&self) -> (usize, usize) {
        (self.train.len(), self.val.len())
    }

    fn batch_items(&self, indices: &[usize], rng: &mut Rng) -> Result<Vec<Item>> {
        let s = self.seg.cfg.size;
        let mut items = self.train.load_items(indices, Some((s, s)), &self.cache)?;
        for it in &mut items {
            augment_item(&self.seg.cfg.augment, it, Some((s, s)), rng);
        }
        Ok(items)
    }

    /// Mean loss of one forward pass over the validation part (no update).
    pub fn val_loss(&self) -> Result<f64> {
        let s = self.seg.cfg.size;
        let idx: Vec<usize> = (0..self.val.len()).collect();
        let (mut sum, mut n) = (0.0, 0usize);
        for chunk in idx.chunks(self.seg.cfg.batch_size.max(1)) {
            let items = self.val.load_items(chunk, Some((s, s)), &self.cache)?;
            let b = derm_data::loader::collate(&items, self.seg.cfg.normalize, &self.seg.device)?;
            let Some(m) = b.masks else { continue };
            let l = derm_kernels::ops::bce_with_logits(&self.seg.net.forward_t(&b.images, false)?, &m)?;
            sum += l.to_scalar::<f32>()? as f64 * chunk.len() as f64;
            n += chunk.len();
        }
        Ok(sum / n.max(1) as f64)
    }

    /// Mean per-image Jaccard on the validation part under the current weights, at the working
    /// size.
    fn val_jaccard(&self) -> Result<f64> {
        let s = self.seg.cfg.size;
        let mut scores = SegmentationScores::default();
        let idx: Vec<usize> = (0..self.val.len()).collect();
        for chunk in idx.chunks(self.seg.cfg.batch_size.max(1)) {
            let items = self.val.load_items(chunk, Some((s, s)), &self.cache)?;
            let imgs: Vec<&RgbImage> = items.iter().map(|i| &i.image).collect();
            let probs = self.seg.probabilities_with(&imgs, false)?.to_device(&Device::Cpu)?;
            for (k, it) in items.iter().enumerate() {
                let v = probs.get(k)?.flatten_all()?.to_vec1::<f32>()?;
                let p = self.seg.postprocess(&v, s, s);
                if let Some(m) = &it.mask {
                    scores.add(it.id.clone(), p.mask.as_raw(), m.as_raw());
                }
            }
        }
        Ok(scores.summary().jaccard_mean)
    }
}

impl Task for SegmentTask {
    fn batches_per_epoch(&self) -> usize {
        self.train.len() / self.seg.cfg.batch_size.max(1)
    }

    fn train_batch(&mut self, epoch: usize, batch: usize, rng: &mut Rng) -> Result<StepLoss> {
        let bs = self.seg.cfg.batch_size;
        let order = ShuffleSampler::new(self.train.len(), self.seg.cfg.train.seed).epoch_indices(epoch as u64);
        let indices = &order[batch * bs..(batch + 1) * bs];
        let items = self.batch_items(indices, rng)?;
        let b = derm_data::loader::collate(&items, self.seg.cfg.normalize, &self.seg.device)?;
        let masks = b.masks.ok_or_else(|| Error::invalid("training batch without masks"))?;
        let logits = self.seg.net.forward_t(&b.images, true)?;
        let mut loss = derm_kernels::ops::bce_with_logits(&logits, &masks)?;
        if self.seg.cfg.dice_weight > 0.0 {
            loss = (loss + (derm_kernels::ops::soft_dice_loss(&logits, &masks)? * self.seg.cfg.dice_weight)?)?;
        }
        if self.seg.cfg.lovasz_weight > 0.0 {
            loss = (loss + (derm_kernels::ops::lovasz_hinge_loss(&logits, &masks)? * self.seg.cfg.lovasz_weight)?)?;
        }
        let norm = self.opt.backward_step(&loss)?;
        if let Some(e) = &mut self.ema {
            e.update()?;
        }
        Ok(StepLoss::new(loss, norm))
    }

    /// Mean per-image Jaccard on the validation part, at the working size.
    fn evaluate(&mut self) -> Result<Option<f64>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        // The average is what is kept: score it, then continue training the weights.
        if let Some(e) = &mut self.ema {
            e.swap()?;
        }
        let j = self.val_jaccard();
        if let Some(e) = &mut self.ema {
            e.swap()?;
        }
        let j = j?;
        self.last_val = Some(j);
        Ok(Some(j))
    }

    fn save(&self, dir: &Path, state: &TrainState) -> Result<()> {
        let mut m = meta(&self.seg.cfg);
        m.extra["val_jaccard"] = serde_json::json!(self.last_val);
        m.extra["step"] = serde_json::json!(state.step);
        ema::save_training(dir, self.ema.as_ref(), &self.seg.varmap, &self.seg.cfg, &m, &self.opt, state)
    }

    fn restore(&mut self, dir: &Path, _state: &TrainState) -> Result<()> {
        ema::restore_training(dir, self.ema.as_mut(), &self.seg.varmap, &mut self.opt).map(drop)
    }

    fn set_horizon(&mut self, steps: usize) {
        self.opt.set_horizon(steps);
    }

    fn check_resumable(&self, dir: &Path) -> Result<()> {
        let cfg = &self.seg.cfg;
        train::check_saved(dir, |s: &SegmentConfig| s.model == cfg.model && s.size == cfg.size, "model shape or size")
    }
}

/// Trains from scratch, or resumes from `<out>/last` when `resume` is set and it exists.
pub fn train(
    cfg: SegmentConfig,
    data: &Dataset,
    device: &Device,
    out: &Path,
    resume: bool,
    on_event: &mut dyn FnMut(&train::Event),
) -> Result<(SegmentTask, TrainState)> {
    let mut task = SegmentTask::new(cfg.clone(), data, device)?;
    let state = train::run(&mut task, &cfg.train, out, resume, on_event)?;
    if cfg.select_threshold && !task.val.is_empty() {
        select_threshold(&train::best_dir(out), &task.val, &task.cache, device)?;
    }
    Ok((task, state))
}

/// Chooses the mask threshold of the checkpoint in `dir` on `val`: the one of 0.30, 0.35, ...,
/// 0.70 with the highest mean per-image Jaccard at the working size (post-processing as
/// configured; ties go to the threshold nearest 0.5), and writes it into the checkpoint's
/// `config.json` (atomically), with the scores per threshold in `meta.json`. Returns it.
pub fn select_threshold(dir: &Path, val: &Dataset, cache: &ImageCache, device: &Device) -> Result<f32> {
    let seg = Segmenter::load(dir, device)?;
    let s = seg.cfg.size;
    let candidates: Vec<f32> = (6..=14).map(|k| k as f32 * 0.05).collect();
    let mut scores = vec![SegmentationScores::default(); candidates.len()];
    let idx: Vec<usize> = (0..val.len()).collect();
    for chunk in idx.chunks(seg.cfg.batch_size.max(1)) {
        let items = val.load_items(chunk, Some((s, s)), cache)?;
        let imgs: Vec<&RgbImage> = items.iter().map(|i| &i.image).collect();
        let probs = seg.probabilities(&imgs)?.to_device(&Device::Cpu)?;
        for (k, it) in items.iter().enumerate() {
            let Some(m) = &it.mask else { continue };
            let v = probs.get(k)?.flatten_all()?.to_vec1::<f32>()?;
            for (t, sc) in candidates.iter().zip(scores.iter_mut()) {
                sc.add(it.id.clone(), seg.postprocess_at(&v, s, s, *t).mask.as_raw(), m.as_raw());
            }
        }
    }
    let jaccard: Vec<f64> = scores.iter().map(|sc| sc.summary().jaccard_mean).collect();
    let mut best = 0;
    for k in 1..candidates.len() {
        let closer = (candidates[k] - 0.5).abs() < (candidates[best] - 0.5).abs();
        if jaccard[k] > jaccard[best] + 1e-12 || ((jaccard[k] - jaccard[best]).abs() <= 1e-12 && closer) {
            best = k;
        }
    }
    let threshold = candidates[best];
    checkpoint::amend(dir, "segment", |cfg: &mut SegmentConfig, m| {
        cfg.threshold = threshold;
        m.extra["threshold"] = serde_json::json!(threshold);
        m.extra["threshold_selection"] = serde_json::json!(candidates
            .iter()
            .zip(&jaccard)
            .map(|(t, j)| serde_json::json!({ "threshold": t, "val_jaccard": j }))
            .collect::<Vec<_>>());
    })?;
    tracing::info!(threshold, val_jaccard = jaccard[best], "mask threshold chosen on validation");
    Ok(threshold)
}

#[cfg(test)]
mod tests {
    use super::*;
    use derm_core::optim::LrSchedule;
    use derm_data::phantom::{write_phantom_set, PhantomConfig};

    fn tiny_cfg() -> SegmentConfig {
        SegmentConfig {
            model: UNetConfig {
                in_channels: 3,
                widths: vec![8, 16],
                bottleneck: vec![(16, 2), (16, 4)],
                batch_norm: true,
            },
            size: 32,
            batch_size: 4,
            optim: OptimConfig { optimizer: OptimizerKind::adam(3e-3), ..Default::default() },
            train: LoopConfig { epochs: 4, ..Default::default() },
            val_fraction: 0.25,
            ..Default::default()
        }
    }

    #[test]
    fn the_default_network_is_named_when_it_is_a_preset() {
        let def = SegmentConfig::default();
        assert_eq!((def.model.preset_name(), def.optim.optimizer.lr()), (Some("medium"), 3e-4));
        assert!(def.describe().starts_with("dilated U-Net, medium preset (widths [24, 48, 96]"), "{}", def.describe());
        assert!(
            def.describe().ends_with(
                "128 px, batch 8, adam lr 3e-4 (step 2000 x0.5), augment (flips, quarter turns, crops 0.85-1)"
            ),
            "{}",
            def.describe()
        );
        assert!(tiny_cfg().describe().contains("custom network"));
        assert_eq!(UNetConfig::paper().preset_name(), Some("paper"));
        assert_eq!(UNetConfig::small().preset_name(), Some("small"));
    }

    #[test]
    fn a_unet_training_step_on_the_device_path_reads_nothing_back() {
        // Pooling, resizing, batch norm, the loss, the gradient norm and the Adam update all as
        // device ops (forced on the CPU): two steps, no host round trip.
        let d = tempfile::tempdir().unwrap();
        write_phantom_set(&d.path().join("ph"), &PhantomConfig { size: 40, ..Default::default() }, 1, 12).unwrap();
        let data = Dataset::open_dir(&d.path().join("ph"), None, None).unwrap();
        let mut task = SegmentTask::new(tiny_cfg(), &data, &Device::Cpu).unwrap();
        let mut rng = Rng::new(3);
        let (steps, reads) = derm_kernels::ops::host_reads_on_device_path(|| {
            [task.train_batch(0, 0, &mut rng).unwrap(), task.train_batch(0, 1, &mut rng).unwrap()]
        });
        assert_eq!(reads, 0, "a U-Net training step read data back to the host");
        for s in steps {
            assert!(s.loss.to_scalar::<f32>().unwrap().is_finite());
            assert!(s.grad_norm.unwrap().to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap() > 0.0);
        }
    }

    #[test]
    fn training_lowers_the_loss_and_checkpoint_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let pc = PhantomConfig { size: 64, ..Default::default() };
        write_phantom_set(&d.path().join("ph"), &pc, 1, 24).unwrap();
        let data = Dataset::open_dir(&d.path().join("ph"), None, None).unwrap();
        let out = d.path().join("run");
        let task0 = SegmentTask::new(tiny_cfg(), &data, &Device::Cpu).unwrap();
        let before = task0.val_loss().unwrap();
        let (task, state) = train(tiny_cfg(), &data, &Device::Cpu, &out, false, &mut |_| {}).unwrap();
        let after = task.val_loss().unwrap();
        assert!(after < before, "validation loss {before} -> {after}");
        let per_epoch = task.sizes().0 / 4;
        assert_eq!(state.step, 4 * per_epoch);
        // The saved best model loads and predicts masks at the input's size.
        let seg = Segmenter::load(&out, &Device::Cpu).unwrap();
        let img = RgbImage::new(45, 37);
        let p = seg.predict(&[&img]).unwrap();
        assert_eq!(p[0].mask.dimensions(), (45, 37));
        // Loading into another architecture names the tensor.
        let mut other = tiny_cfg();
        other.model.widths = vec![8, 24];
        let s2 = Segmenter::new(other, &Device::Cpu).unwrap();
        let e = checkpoint::load_varmap(
            &s2.varmap,
            &train::last_dir(&out).join("model.safetensors"),
            checkpoint::Strictness::Exact,
            |_| false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("shape"), "{e}");
        // Resume continues to more epochs.
        let mut more = tiny_cfg();
        more.train.epochs = 5;
        let (_, st) = train(more, &data, &Device::Cpu, &out, true, &mut |_| {}).unwrap();
        assert_eq!(st.step, 5 * per_epoch);
    }

    #[test]
    fn the_dice_and_lovasz_terms_add_to_the_loss_and_the_schedule_spans_the_run() {
        let d = tempfile::tempdir().unwrap();
        write_phantom_set(&d.path().join("ph"), &PhantomConfig { size: 48, ..Default::default() }, 1, 16).unwrap();
        let data = Dataset::open_dir(&d.path().join("ph"), None, None).unwrap();
        let mut cfg =
            SegmentConfig { dice_weight: 1.0, train: LoopConfig { epochs: 3, ..Default::default() }, ..tiny_cfg() };
        cfg.optim.schedule = LrSchedule::CosineRun { floor: 0.1 };
        // Same weights, same batch: the soft Dice term (between 0 and 1) on top of the cross-entropy.
        let loss = |c: &SegmentConfig| {
            let mut t = SegmentTask::new(c.clone(), &data, &Device::Cpu).unwrap();
            t.train_batch(0, 0, &mut Rng::new(5)).unwrap().loss.to_scalar::<f32>().unwrap()
        };
        let bce = loss(&SegmentConfig { dice_weight: 0.0, ..cfg.clone() });
        let extra = loss(&cfg) - bce;
        assert!(extra > 0.0 && extra < 1.0, "dice term {extra}");
        // The Lovász hinge likewise: near 1 for a fresh network whose logits are near 0.
        let extra = loss(&SegmentConfig { dice_weight: 0.0, lovasz_weight: 1.0, ..cfg.clone() }) - bce;
        assert!(extra > 0.3 && extra < 2.0, "Lovász term {extra}");
        // The cosine runs over the three epochs and ends at its floor.
        let (task, state) = train(cfg.clone(), &data, &Device::Cpu, &d.path().join("run"), false, &mut |_| {}).unwrap();
        assert_eq!(state.horizon, Some(3 * task.batches_per_epoch()));
        assert!((task.opt.lr() - 3e-4).abs() < 1e-12, "{}", task.opt.lr());
        assert!(state.history.iter().all(|h| h.loss.is_finite()));
    }

    #[test]
    fn with_a_weight_average_the_checkpoint_holds_the_average_and_training_resumes() {
        let d = tempfile::tempdir().unwrap();
        write_phantom_set(&d.path().join("ph"), &PhantomConfig { size: 48, ..Default::default() }, 1, 16).unwrap();
        let data = Dataset::open_dir(&d.path().join("ph"), None, None).unwrap();
        let out = d.path().join("run");
        let cfg = SegmentConfig { ema_decay: 0.8, train: LoopConfig { epochs: 3, ..Default::default() }, ..tiny_cfg() };
        let (task, state) = train(cfg.clone(), &data, &Device::Cpu, &out, false, &mut |_| {}).unwrap();
        // The last checkpoint: the average as the model's weights, the trained weights beside.
        let last = train::last_dir(&out);
        let saved = checkpoint::load_tensors(&last.join(checkpoint::WEIGHTS), &Device::Cpu).unwrap();
        let trained = checkpoint::load_tensors(&last.join(checkpoint::TRAINING_WEIGHTS), &Device::Cpu).unwrap();
        let avg = checkpoint::sorted_vars(&task.ema.as_ref().unwrap().to_varmap().unwrap());
        let live = checkpoint::sorted_vars(&task.seg.varmap);
        let gap =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let mut moved = 0f32;
        for ((name, a), (_, w)) in avg.iter().zip(&live) {
            assert_eq!(gap(&saved[name], a.as_tensor()), 0.0, "{name}");
            assert_eq!(gap(&trained[name], w.as_tensor()), 0.0, "{name}");
            moved = moved.max(gap(a.as_tensor(), w.as_tensor()));
        }
        assert!(moved > 1e-6, "the average equals the trained weights");
        let more = SegmentConfig { train: LoopConfig { epochs: 4, ..Default::default() }, ..cfg };
        let (task, st) = train(more, &data, &Device::Cpu, &out, true, &mut |_| {}).unwrap();
        assert!(st.step > state.step);
        assert_eq!(task.ema.as_ref().unwrap().updates(), st.step);
    }

    #[test]
    fn test_time_views_make_the_prediction_follow_a_flipped_or_turned_image() {
        let mut rng = Rng::new(5);
        let img = RgbImage::from_fn(32, 32, |_, _| image::Rgb([rng.below(256) as u8, rng.below(256) as u8, 90]));
        // The prediction for a transformed image, mapped back, against the image's own.
        let gap = |seg: &Segmenter, s: Symmetry| {
            let a = seg.probabilities(&[&img]).unwrap();
            let b = s.undo(&seg.probabilities(&[&s.image(&img)]).unwrap()).unwrap();
            (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
        };
        let mirror = Symmetry { hflip: true, ..Symmetry::IDENTITY };
        let mut seg =
            Segmenter::new(SegmentConfig { test_time_augmentation: false, ..tiny_cfg() }, &Device::Cpu).unwrap();
        assert_eq!(seg.test_time_views(true).len(), 8, "the default augmentation draws flips and quarter turns");
        for s in [mirror, Symmetry::QUARTER_TURN] {
            assert!(gap(&seg, s) > 1e-4, "an untrained network is not equivariant by itself");
        }
        seg.cfg.test_time_augmentation = true;
        for s in [mirror, Symmetry::QUARTER_TURN] {
            assert!(gap(&seg, s) < 1e-5, "{s:?}: {}", gap(&seg, s));
        }
        // Trained without quarter turns: the four flips, and a turn is not averaged away.
        seg.cfg.augment.rot90 = false;
        assert_eq!(seg.test_time_views(true).len(), 4);
        assert!(gap(&seg, mirror) < 1e-5);
        assert!(gap(&seg, Symmetry::QUARTER_TURN) > 1e-4);
    }

    #[test]
    fn configs_saved_before_quarter_turn_views_still_read() {
        let mut v = serde_json::to_value(SegmentConfig::default()).unwrap();
        let m = v.as_object_mut().unwrap();
        m.remove("test_time_augmentation");
        m.insert("test_time_flips".into(), serde_json::Value::Bool(false));
        let c: SegmentConfig = serde_json::from_value(v).unwrap();
        assert!(!c.test_time_augmentation);
    }

    #[test]
    fn the_threshold_chosen_on_validation_is_saved_and_reloaded() {
        let d = tempfile::tempdir().unwrap();
        let pc = PhantomConfig { size: 48, ..Default::default() };
        write_phantom_set(&d.path().join("ph"), &pc, 3, 16).unwrap();
        let data = Dataset::open_dir(&d.path().join("ph"), None, None).unwrap();
        let out = d.path().join("run");
        let cfg = SegmentConfig {
            select_threshold: true,
            train: LoopConfig { epochs: 2, ..Default::default() },
            ..tiny_cfg()
        };
        train(cfg, &data, &Device::Cpu, &out, false, &mut |_| {}).unwrap();
        let m = checkpoint::read_meta(&train::best_dir(&out), "segment").unwrap();
        let table = m.extra["threshold_selection"].as_array().unwrap();
        assert_eq!(table.len(), 9);
        let best = table.iter().map(|r| r["val_jaccard"].as_f64().unwrap()).fold(f64::NEG_INFINITY, f64::max);
        let chosen = m.extra["threshold"].as_f64().unwrap() as f32;
        let row = table.iter().find(|r| (r["threshold"].as_f64().unwrap() as f32 - chosen).abs() < 1e-6).unwrap();
        assert_eq!(row["val_jaccard"].as_f64().unwrap(), best, "the chosen threshold has the best score");
        // Loading the run gives the model with that threshold.
        let seg = Segmenter::load(&out, &Device::Cpu).unwrap();
        assert_eq!(seg.cfg.threshold, chosen);
        // Choosing on another split gives a threshold of the grid too.
        let cache = ImageCache::new(0);
        let (_, val) = data.split_by_id(0.25, 0);
        let again = select_threshold(&train::best_dir(&out), &val, &cache, &Device::Cpu).unwrap();
        assert!((0.3..=0.7).contains(&again));
    }

    #[test]
    fn evaluation_scores_and_missing_masks_error() {
        let d = tempfile::tempdir().unwrap();
        let pc = PhantomConfig { size: 48, ..Default::default() };
        write_phantom_set(&d.path().join("ph"), &pc, 2, 6).unwrap();
        let data = Dataset::open_dir(&d.path().join("ph"), None, None).unwrap();
        let seg = Segmenter::new(tiny_cfg(), &Device::Cpu).unwrap();
        let s = evaluate(&seg, &data, &mut |_| {}).unwrap();
        assert_eq!(s.per_image.len(), 6);
        let sum = s.summary();
        assert!((0.0..=1.0).contains(&sum.jaccard_mean));
        let mut nomask = data.clone();
        nomask.samples[0].mask = None;
        assert!(SegmentTask::new(tiny_cfg(), &nomask.filter(|s| s.mask.is_none()), &Device::Cpu).is_err());
        // Choosing the threshold without a validation part is refused, not skipped.
        let cfg = SegmentConfig { select_threshold: true, val_fraction: 0.0, ..tiny_cfg() };
        let e = SegmentTask::new(cfg, &data, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("validation part"), "{e}");
        std::fs::remove_file(data.samples[1].mask.as_ref().unwrap()).unwrap();
        let e = evaluate(&seg, &data, &mut |_| {}).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("segmentation"), "{e}");
    }

    #[test]
    fn postprocess_fills_holes() {
        let seg = Segmenter::new(tiny_cfg(), &Device::Cpu).unwrap();
        let mut probs = vec![0f32; 25];
        for y in 1..4 {
            for x in 1..4 {
                probs[y * 5 + x] = if (x, y) == (2, 2) { 0.1 } else { 0.9 };
            }
        }
        let p = seg.postprocess(&probs, 5, 5);
        assert_eq!(p.mask.get_pixel(2, 2).0[0], 255);
        assert_eq!(p.mask.get_pixel(0, 0).0[0], 0);
    }
}
