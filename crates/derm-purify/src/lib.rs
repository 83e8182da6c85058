//! # derm-purify: occlusions removed by a partial-convolution U-Net
//!
//! The purification stage of derm (after Bisla et al., "Skin Lesion Segmentation and
//! Classification with Deep Learning System"): hairs, rulers and ink marks found by `derm-hair`
//! are filled in by a U-Net of partial convolutions (Liu et al., "Image Inpainting for Irregular
//! Holes Using Partial Convolutions", ECCV 2018), which only ever reads known pixels. The
//! network's output is used inside the hole only (the composite), so every other pixel is kept.
//! With [`PurifyConfig::prior_fill`] (the default) the network's output is a correction added to
//! the classic fill of `derm-hair` (Telea, then harmonic relaxation) rather than the pixels
//! themselves, and it starts at zero: an untrained network returns the classic fill, and training
//! only has to learn what the classic fill gets wrong (a coarse-then-fine scheme).
//!
//! - [`pconv`]: the partial convolution (cheap single-channel mask path, masks without gradient).
//! - [`model`]: the U-Net, presets `paper` (7 layers), `peer` (5 layers, 11,619,988 parameters)
//!   and `small` (CPU), and the composite.
//! - [`loss`]: Liu et al.'s loss: L1 on known (1) and hole (6) pixels, total variation on the
//!   hole's neighbourhood (0.1), and with VGG16 weights perceptual (0.05) and style (120) terms.
//! - [`vgg`]: a VGG16 feature extractor loading torchvision's `features.N.*` names.
//! - [`masks`]: training holes from three sources (occlusion masks of other images, irregular
//!   strokes, rectangles), 5 to 50% of the image.
//! - [`metrics`]: PSNR and SSIM inside the hole.
//! - [`train`], [`Purifier`], [`purify_image`], [`evaluate_holes`], [`evaluate_borrowed_holes`]:
//!   training with Adam and then SGD fine-tuning with the encoder's batch norm frozen, inference
//!   at any resolution, and scoring (against clean phantoms, or on real images inside holes
//!   borrowed from other images' occlusion masks).
//!
//! **Consumes:** for training, a data set of RGB images (phantoms give the clean image and the
//! occlusion mask; real images may come with `<id>_clean.png` from `derm hair`), optionally a
//! folder of `*_occlusion.png` hole masks and VGG16 weights (safetensors). For inference, an RGB
//! image of any size and a hole mask of the same size (non-zero = fill). **Produces:** a
//! checkpoint folder (`model.safetensors`, `config.json` = [`PurifyConfig`], `meta.json`) and
//! purified RGB images of the input's size, identical to the input outside the hole.

#![forbid(unsafe_code)]

pub mod loss;
pub mod masks;
pub mod metrics;
pub mod model;
pub mod pconv;
pub mod vgg;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use derm_core::checkpoint::{self, CheckpointData, Meta, TensorSpec};
use derm_core::image_io::{self, Normalize};
use derm_core::nn::preset_label;
use derm_core::optim::{LrSchedule, OptimConfig, Optimizer, OptimizerKind};
use derm_core::train::{self, LoopConfig, StepLoss, Task, TrainState};
use derm_core::{Error, Result, Rng};
use derm_data::augment::{augment_item, AugmentConfig};
use derm_data::cache::{ImageCache, Item};
use derm_data::dataset::Dataset;
use derm_data::sampler::{Sampler, ShuffleSampler};
use image::{GrayImage, Luma, RgbImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use loss::{inpainting_loss, LossParts, LossTerms, LossWeights};
pub use masks::{MaskConfig, MaskGenerator, MaskLibrary, MaskSource};
pub use metrics::hole_metrics;
pub use model::{composite, BnMode, PConvUNet, PConvUNetConfig};
pub use pconv::{partial_conv2d, PartialConv2d, PartialConv2dConfig};
pub use vgg::Vgg16Features;

/// Everything a purification run is made of; saved as the checkpoint's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PurifyConfig {
    /// Network shape.
    pub model: PConvUNetConfig,
    /// Working size: training images are resized to `size` x `size`, and so are images at
    /// inference (the filled pixels are resized back).
    pub size: u32,
    /// Images per batch.
    pub batch_size: usize,
    /// Optimiser of the first phase (Liu et al.: Adam 2e-4; betas configurable here).
    pub optim: OptimConfig,
    /// Share of the run (in steps, or of `train.minutes` when that ends it sooner) after which
    /// training switches to SGD with momentum and freezes the encoder's batch norm; 1 = never.
    pub finetune_after_fraction: f64,
    /// Learning rate of the fine-tuning phase (Liu et al.: 5e-5).
    pub finetune_lr: f64,
    /// Momentum of the fine-tuning SGD.
    pub finetune_momentum: f64,
    /// Loss weights.
    pub loss: LossWeights,
    /// Training holes.
    pub masks: MaskConfig,
    /// Epochs, step and time budget, evaluation and checkpoint cadence, seed.
    pub train: LoopConfig,
    /// Fraction of the data held out for validation (by id hash).
    pub val_fraction: f64,
    /// At most this many validation images are scored at each evaluation.
    pub val_max: usize,
    /// Training augmentation (geometric; applied alike to the image and its clean version).
    pub augment: AugmentConfig,
    /// Input normalisation (mean and std 0.5).
    pub normalize: Normalize,
    /// VGG16 weights (safetensors, torchvision names) for the perceptual and style terms; without
    /// them those terms are off.
    pub vgg_weights: Option<PathBuf>,
    /// Folder of `*_occlusion.png` masks of other images for the library hole source.
    pub hole_masks: Option<PathBuf>,
    /// Folder of `<id>_clean.png` targets (from `derm hair`) for images without a clean version;
    /// images with neither are their own target.
    pub clean_dir: Option<PathBuf>,
    /// Bytes of decoded images kept in memory.
    pub cache_bytes: usize,
    /// The network predicts a correction to the classic fill of the hole
    /// ([`derm_hair::inpaint`]: Telea, then harmonic relaxation) instead of the pixels; its last
    /// layer starts at zero, so the untrained network returns the classic fill. A checkpoint
    /// without this field was trained without it (false).
    #[serde(default)]
    pub prior_fill: bool,
    /// The classic fill's method and radius (px) under `prior_fill`: set them to the `inpaint`
    /// and `inpaint_radius` of the hair config the images are cleaned with, so that the network
    /// corrects the fill it will be given. Defaults: `derm_hair::HairConfig`'s.
    pub prior_method: derm_hair::InpaintMethod,
    /// See `prior_method`.
    pub prior_radius: f32,
}

impl Default for PurifyConfig {
    fn default() -> Self {
        PurifyConfig {
            model: PConvUNetConfig::small(),
            size: 128,
            batch_size: 6,
            optim: OptimConfig {
                optimizer: OptimizerKind::Adam { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8 },
                schedule: LrSchedule::Constant,
                clip_grad_norm: None,
            },
            finetune_after_fraction: 0.8,
            finetune_lr: 5e-5,
            finetune_momentum: 0.9,
            loss: LossWeights::default(),
            masks: MaskConfig::default(),
            train: LoopConfig { epochs: 20, ..Default::default() },
            val_fraction: 0.1,
            val_max: 64,
            augment: AugmentConfig::geometric(),
            normalize: Normalize::HALF,
            vgg_weights: None,
            hole_masks: None,
            clean_dir: None,
            cache_bytes: 1 << 30,
            prior_fill: true,
            prior_method: derm_hair::HairConfig::default().inpaint,
            prior_radius: derm_hair::HairConfig::default().inpaint_radius,
        }
    }
}

impl PurifyConfig {
    /// The optimiser of the fine-tuning phase: SGD at `finetune_lr` with `finetune_momentum`, a
    /// constant rate, and the first phase's gradient clipping.
    pub fn finetune_optim(&self) -> OptimConfig {
        OptimConfig {
            optimizer: OptimizerKind::Sgd {
                lr: self.finetune_lr,
                momentum: self.finetune_momentum,
                weight_decay: 0.0,
                nesterov: false,
            },
            schedule: LrSchedule::Constant,
            clip_grad_norm: self.optim.clip_grad_norm,
        }
    }

    /// What a run trains, in one line for its log: the network and its shape, working size,
    /// batch, both optimiser phases, the loss terms that are on, and whether the network
    /// corrects the classic fill or paints the hole alone.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "partial-convolution U-Net, {} (widths {:?}, kernels {:?}), {} px, batch {}, {}",
            preset_label(self.model.preset_name(), "custom network"),
            self.model.widths,
            self.model.kernels,
            self.size,
            self.batch_size,
            self.optim.describe()
        );
        if self.finetune_after_fraction < 1.0 {
            s.push_str(&format!(
                ", then {} with the encoder's batch norm frozen after {} of the run",
                self.finetune_optim().describe(),
                self.finetune_after_fraction
            ));
        }
        let w = &self.loss;
        s.push_str(&format!(", loss valid {} hole {} tv {}", w.valid, w.hole, w.tv));
        match &self.vgg_weights {
            Some(p) => {
                s.push_str(&format!(" perceptual {} style {} (VGG16 from {})", w.perceptual, w.style, p.display()))
            }
            None => s.push_str(" (no VGG16 weights: perceptual and style off)"),
        }
        s.push_str(&format!(", augment ({})", self.augment.describe()));
        if self.prior_fill {
            s.push_str(&format!(", corrects the {} fill (radius {} px)", self.prior_method.name(), self.prior_radius));
        } else {
            s.push_str(", paints holes alone");
        }
        s
    }
}

fn meta(cfg: &PurifyConfig) -> Meta {
    let mut m = Meta::new("purify", "pconv-unet");
    m.inputs.push(TensorSpec {
        name: "image".into(),
        shape: vec![None, Some(3), None, None],
        dtype: "f32".into(),
        range: Some((-1.0, 1.0)),
        description: format!(
            "RGB normalised with mean {:?} std {:?}; hole pixels are not read",
            cfg.normalize.mean, cfg.normalize.std
        ),
    });
    m.inputs.push(TensorSpec {
        name: "valid".into(),
        shape: vec![None, Some(1), None, None],
        dtype: "f32".into(),
        range: Some((0.0, 1.0)),
        description: "1 = known pixel, 0 = hole to fill".into(),
    });
    m.outputs.push(TensorSpec {
        name: "image".into(),
        shape: vec![None, Some(3), None, None],
        dtype: "f32".into(),
        range: Some((-1.0, 1.0)),
        description: if cfg.prior_fill {
            "a correction added to the classic fill (derm_hair::inpaint) of the hole; the composite takes the sum inside the hole only".into()
        } else {
            "the network's image; the composite takes it inside the hole only".into()
        },
    });
    let perceptual = cfg.vgg_weights.is_some();
    m.extra = serde_json::json!({
        "size": cfg.size,
        "perceptual_loss": perceptual,
        "loss_terms": if perceptual { "valid+hole+tv+perceptual+style" } else { "valid+hole+tv (no VGG16 weights: perceptual and style off)" },
    });
    m
}

/// A built network with its weights.
pub struct Purifier {
    /// The configuration it was trained with.
    pub cfg: PurifyConfig,
    /// The network.
    pub net: PConvUNet,
    /// Its variables.
    pub varmap: VarMap,
    /// Where it runs.
    pub device: Device,
}

impl Purifier {
    /// A freshly initialised network (with `prior_fill`, its last layer at zero).
    pub fn new(cfg: PurifyConfig, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = derm_core::nn::seeded_var_builder(&varmap, cfg.train.seed, DType::F32, device);
        let net = PConvUNet::new(&cfg.model, vb)?;
        if cfg.prior_fill {
            let last = format!("dec.{}.conv.", cfg.model.depth() - 1);
            for (name, var) in varmap.data().lock().map_err(|_| Error::invalid("purify: variable map poisoned"))?.iter()
            {
                if name.starts_with(&last) {
                    var.set(&var.zeros_like()?)?;
                }
            }
        }
        Ok(Purifier { cfg, net, varmap, device: device.clone() })
    }

    /// Loads a checkpoint folder (a run folder's `best` or `last`, or a run folder, whose `best`
    /// is used).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let dir = train::resolve_model_dir(dir);
        checkpoint::read_meta(&dir, "purify")?;
        let cfg: PurifyConfig = checkpoint::read_config(&dir)?;
        let p = Purifier::new(cfg, device)?;
        let dir = checkpoint::resolve(&dir)?;
        checkpoint::load_varmap(&p.varmap, &dir.join(checkpoint::WEIGHTS), checkpoint::Strictness::Exact, |_| false)?;
        Ok(p)
    }

    /// The classic fill of each image's hole (non-zero in `holes`) as a tensor with the config's
    /// normalisation, when the model adds its output to it (`prior_fill`); `None` otherwise.
    pub fn prior(&self, imgs: &[&RgbImage], holes: &[&GrayImage]) -> Result<Option<Tensor>> {
        match self.prior_images(imgs, holes)? {
            Some(filled) => self.prior_tensor(&filled.iter().collect::<Vec<_>>()).map(Some),
            None => Ok(None),
        }
    }

    /// The classic fills of [`Purifier::prior`] as images (`None` without `prior_fill`), with the
    /// config's `prior_method` and `prior_radius`.
    pub fn prior_images(&self, imgs: &[&RgbImage], holes: &[&GrayImage]) -> Result<Option<Vec<RgbImage>>> {
        if !self.cfg.prior_fill {
            return Ok(None);
        }
        let hair = derm_hair::HairConfig {
            inpaint: self.cfg.prior_method,
            inpaint_radius: self.cfg.prior_radius,
            ..derm_hair::HairConfig::default()
        };
        let filled = imgs
            .par_iter()
            .zip(holes.par_iter())
            .map(|(i, h)| derm_hair::inpaint(i, h, &hair))
            .collect::<Result<_>>()?;
        Ok(Some(filled))
    }

    /// Classic fills (from [`Purifier::prior_images`]) as the tensor [`Purifier::predict`] takes.
    pub fn prior_tensor(&self, filled: &[&RgbImage]) -> Result<Tensor> {
        image_io::images_to_tensor(filled, self.cfg.normalize, &self.device)
    }

    /// The network's image (N, 3, H, W) for images `x` whose holes it does not read, validity
    /// masks `valid` and the classic fill `prior` (required with `prior_fill`).
    pub fn predict(&self, x: &Tensor, valid: &Tensor, prior: Option<&Tensor>, mode: BnMode) -> Result<Tensor> {
        let out = self.net.forward_mode(&x.broadcast_mul(valid)?, valid, mode)?;
        match (self.cfg.prior_fill, prior) {
            (false, _) => Ok(out),
            (true, Some(p)) => Ok((out + p)?),
            (true, None) => Err(Error::invalid("purify: a model trained on the classic fill needs it (prior)")),
        }
    }

    /// The composite (N, 3, H, W) for images `x` (N, 3, H, W) normalised with the config's
    /// normalisation, validity masks `valid` (N, 1, H, W), 1 = known, and the classic fill
    /// ([`Purifier::prior`]); any H and W.
    pub fn inpaint_tensor(&self, x: &Tensor, valid: &Tensor, prior: Option<&Tensor>) -> Result<Tensor> {
        let out = self.predict(x, valid, prior, BnMode::Eval)?;
        Ok(composite(x, &out, valid)?)
    }

    /// Fills the holes (non-zero in `holes`) of images of one size, at that size (no resizing);
    /// pixels outside the holes are returned unchanged.
    pub fn inpaint(&self, imgs: &[&RgbImage], holes: &[&GrayImage]) -> Result<Vec<RgbImage>> {
        self.inpaint_with(imgs, holes, None)
    }

    /// [`Purifier::inpaint`] with the classic fills of the holes given (`prior`, one per image,
    /// from [`Purifier::prior_images`]) instead of computed.
    fn inpaint_with(
        &self,
        imgs: &[&RgbImage],
        holes: &[&GrayImage],
        prior: Option<&[&RgbImage]>,
    ) -> Result<Vec<RgbImage>> {
        if imgs.len() != holes.len() {
            return Err(Error::invalid(format!("inpaint: {} images but {} hole masks", imgs.len(), holes.len())));
        }
        if let Some(p) = prior.filter(|p| p.len() != imgs.len()) {
            return Err(Error::invalid(format!("inpaint: {} images but {} classic fills", imgs.len(), p.len())));
        }
        let mut out = Vec::with_capacity(imgs.len());
        let bs = self.cfg.batch_size.max(1);
        for (c, (ic, hc)) in imgs.chunks(bs).zip(holes.chunks(bs)).enumerate() {
            let x = image_io::images_to_tensor(ic, self.cfg.normalize, &self.device)?;
            let bin: Vec<GrayImage> = hc.iter().map(|h| binary(h)).collect();
            let refs: Vec<&GrayImage> = bin.iter().collect();
            let valid = image_io::masks_to_tensor(&refs, &self.device)?.affine(-1.0, 1.0)?;
            let prior = match prior {
                Some(p) if self.cfg.prior_fill => Some(self.prior_tensor(&p[c * bs..c * bs + ic.len()])?),
                _ => self.prior(ic, &refs)?,
            };
            let comp = self.inpaint_tensor(&x, &valid, prior.as_ref())?.to_device(&Device::Cpu)?;
            for (k, filled) in image_io::tensor_to_images(&comp, self.cfg.normalize)?.into_iter().enumerate() {
                out.push(paste(ic[k], &filled, &bin[k]));
            }
        }
        Ok(out)
    }
}

/// 255 where `m` is non-zero.
fn binary(m: &GrayImage) -> GrayImage {
    GrayImage::from_fn(m.width(), m.height(), |x, y| Luma([if m.get_pixel(x, y).0[0] != 0 { 255 } else { 0 }]))
}

/// `base` with the pixels of `hole` taken from `filled` (same sizes).
fn paste(base: &RgbImage, filled: &RgbImage, hole: &GrayImage) -> RgbImage {
    let mut out = base.clone();
    for (x, y, p) in hole.enumerate_pixels() {
        if p.0[0] != 0 {
            out.put_pixel(x, y, *filled.get_pixel(x, y));
        }
    }
    out
}

/// A hole mask shrunk (or grown) to `w` x `h` conservatively: a pixel is a hole when any source
/// pixel under it is.
pub fn resize_hole(hole: &GrayImage, w: u32, h: u32) -> GrayImage {
    let (sw, sh) = (hole.width() as f64, hole.height() as f64);
    let (fx, fy) = (sw / w as f64, sh / h as f64);
    GrayImage::from_fn(w, h, |x, y| {
        let x0 = (x as f64 * fx).floor() as u32;
        let x1 = (((x + 1) as f64 * fx).ceil() as u32).clamp(x0 + 1, hole.width());
        let y0 = (y as f64 * fy).floor() as u32;
        let y1 = (((y + 1) as f64 * fy).ceil() as u32).clamp(y0 + 1, hole.height());
        let any = (y0..y1).any(|yy| (x0..x1).any(|xx| hole.get_pixel(xx, yy).0[0] != 0));
        Luma([if any { 255 } else { 0 }])
    })
}

/// Purifies one image of any size: the image and its hole (non-zero = fill, same size) are
/// brought to the model's working size, the network fills the hole, the filled pixels are
/// resized back and pasted into the full-resolution image inside the hole only, so every pixel
/// outside it is returned bit-identical. An empty hole returns the image unchanged.
pub fn purify_image(model: &Purifier, img: &RgbImage, hole: &GrayImage) -> Result<RgbImage> {
    if img.dimensions() != hole.dimensions() {
        return Err(Error::invalid(format!(
            "purify_image: the image is {:?} but its hole mask {:?}",
            img.dimensions(),
            hole.dimensions()
        )));
    }
    if hole.as_raw().iter().all(|&v| v == 0) {
        return Ok(img.clone());
    }
    let s = model.cfg.size;
    let (w, h) = img.dimensions();
    if (w, h) == (s, s) {
        return Ok(model.inpaint(&[img], &[hole])?.remove(0));
    }
    let small = image_io::resize_rgb(img, s, s);
    let small_hole = resize_hole(hole, s, s);
    let filled = model.inpaint(&[&small], &[&small_hole])?.remove(0);
    Ok(paste(img, &image_io::resize_rgb(&filled, w, h), hole))
}

/// Hole PSNR and SSIM of one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoleScore {
    /// Sample id.
    pub id: String,
    /// PSNR in the hole (dB).
    pub psnr: f64,
    /// Mean SSIM over windows centred in the hole.
    pub ssim: f64,
    /// Share of the image in the hole.
    pub hole_fraction: f64,
}

/// Hole scores of a data set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HoleScores {
    /// One row per image with a non-empty hole.
    pub per_image: Vec<HoleScore>,
}

impl HoleScores {
    /// Mean PSNR and mean SSIM over the images (NaN when there are none).
    pub fn means(&self) -> (f64, f64) {
        let n = self.per_image.len() as f64;
        let p = self.per_image.iter().map(|s| s.psnr).sum::<f64>() / n;
        let q = self.per_image.iter().map(|s| s.ssim).sum::<f64>() / n;
        (p, q)
    }
}

/// One row of `derm purify eval`: a filling method scored inside the true occlusion masks of
/// phantoms, or inside holes borrowed from other images' masks on real images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodScores {
    /// `none` (the occluded image, on phantoms only), `classic` (derm-hair's inpainting) or `network`.
    pub method: String,
    /// Images scored.
    pub images: usize,
    /// Mean PSNR inside the hole (dB).
    pub hole_psnr: f64,
    /// Mean SSIM inside the hole.
    pub hole_ssim: f64,
    /// Milliseconds per image.
    pub ms_per_image: f64,
}

/// Scores an inpainting method on a data set whose samples have a `clean` image and an
/// `occlusion` mask (phantom sets have both): `method(image, hole)` fills the occluded image's
/// hole, and the result is compared with the clean image inside the hole ([`hole_metrics`]).
/// Images are used at `size` x `size` when given, else at their own size. Images with an empty
/// occlusion mask are skipped.
pub fn evaluate_holes(
    data: &Dataset,
    size: Option<u32>,
    method: &mut dyn FnMut(&RgbImage, &GrayImage) -> Result<RgbImage>,
) -> Result<HoleScores> {
    let cache = ImageCache::new(0);
    let mut scores = HoleScores::default();
    let dims = size.map(|s| (s, s));
    for i in 0..data.len() {
        let it = data.load_item(i, dims, &cache)?;
        let (Some(clean), Some(hole)) = (it.extra_images.get("clean"), it.extra_masks.get("occlusion")) else {
            return Err(Error::invalid(format!(
                "{}: sample {} has no clean image or occlusion mask to score against (phantom sets have both)",
                data.name, it.id
            )));
        };
        if hole.as_raw().iter().all(|&v| v == 0) {
            continue;
        }
        let pred = method(&it.image, hole)?;
        let (psnr, ssim) = hole_metrics(&pred, clean, hole)?;
        scores.per_image.push(HoleScore { id: it.id.clone(), psnr, ssim, hole_fraction: masks::hole_fraction(hole) });
    }
    Ok(scores)
}

/// Scores an inpainting method on real images, which have no occlusion-free original to compare
/// with. Each image gets a hole shaped like another image's occlusion mask (`holes` holds one
/// `<id>_occlusion.png` per image, as `derm hair` writes them; the donor is drawn with `seed`),
/// less the image's own occlusions there, where the truth is a hair rather than skin. The hole's
/// pixels are blanked before `method` sees them, and its fill is compared with the image's own
/// pixels ([`hole_metrics`]). Images are used at `size` x `size` when given, else at their own
/// size. Errors name a missing or unreadable mask; an image whose hole comes out empty is left out.
pub fn evaluate_borrowed_holes(
    data: &Dataset,
    holes: &Path,
    size: Option<u32>,
    seed: u64,
    method: &mut dyn FnMut(&RgbImage, &GrayImage) -> Result<RgbImage>,
) -> Result<HoleScores> {
    let dims = size.map(|s| (s, s));
    // Every image's own occlusion mask, read once (at the working size when there is one).
    let mut own = Vec::with_capacity(data.len());
    for smp in &data.samples {
        let p = holes.join(derm_data::handoff::occlusion(&smp.id));
        if !p.is_file() {
            return Err(Error::invalid(format!(
                "{}: no occlusion mask for image {} (run `derm hair` on the set into this folder)",
                p.display(),
                smp.id
            )));
        }
        let m = image_io::load_mask(&p, None)?;
        own.push(match dims {
            Some((w, h)) => resize_hole(&m, w, h),
            None => m,
        });
    }
    let donors: Vec<usize> = (0..own.len()).filter(|&j| own[j].as_raw().iter().any(|&v| v != 0)).collect();
    if donors.len() < 2 {
        return Err(Error::invalid(format!(
            "{}: {} of {}'s images have a non-empty occlusion mask; borrowing holes needs at least two",
            holes.display(),
            donors.len(),
            data.name
        )));
    }
    let rng = Rng::new(seed);
    let cache = ImageCache::new(0);
    let mut scores = HoleScores::default();
    for i in 0..data.len() {
        let it = data.load_item(i, dims, &cache)?;
        let (w, h) = it.image.dimensions();
        let mut r = rng.fork(i as u64);
        let donor = loop {
            let j = donors[r.below(donors.len())];
            if j != i {
                break resize_hole(&own[j], w, h);
            }
        };
        let mine = resize_hole(&own[i], w, h);
        let hole = GrayImage::from_fn(w, h, |x, y| {
            Luma([if donor.get_pixel(x, y).0[0] != 0 && mine.get_pixel(x, y).0[0] == 0 { 255 } else { 0 }])
        });
        if hole.as_raw().iter().all(|&v| v == 0) {
            continue;
        }
        let blanked = paste(&it.image, &RgbImage::new(w, h), &hole);
        let pred = method(&blanked, &hole)?;
        let (psnr, ssim) = hole_metrics(&pred, &it.image, &hole)?;
        scores.per_image.push(HoleScore { id: it.id.clone(), psnr, ssim, hole_fraction: masks::hole_fraction(&hole) });
    }
    Ok(scores)
}

/// A validation example at the working size.
struct ValExample {
    input: RgbImage,
    target: RgbImage,
    hole: GrayImage,
    /// The classic fill of the hole (under `prior_fill`), computed once.
    prior: Option<RgbImage>,
}

/// The training task for [`derm_core::train::fit`].
pub struct PurifyTask {
    pur: Purifier,
    opt: Optimizer,
    train: Dataset,
    val: Vec<ValExample>,
    masks: MaskGenerator,
    vgg: Option<Vgg16Features>,
    cache: ImageCache,
    finetuning: bool,
    started: Instant,
    elapsed0: f64,
    /// Validation hole PSNR of the latest evaluation.
    pub last_val: Option<f64>,
    /// Loss terms of the steps since the last history row, unread.
    terms: Vec<LossTerms>,
}

impl PurifyTask {
    /// Sets up training on `data` (split into train and validation parts by id).
    pub fn new(cfg: PurifyConfig, data: &Dataset, device: &Device) -> Result<Self> {
        cfg.augment.validate()?;
        if data.is_empty() {
            return Err(Error::invalid(format!("{} split {}: no samples", data.name, data.split)));
        }
        let (train, val) = data.split_by_id(cfg.val_fraction, cfg.train.seed);
        if train.len() < cfg.batch_size {
            return Err(Error::invalid(format!(
                "{} training samples, fewer than one batch of {}",
                train.len(),
                cfg.batch_size
            )));
        }
        let s = cfg.size;
        let library = match &cfg.hole_masks {
            Some(d) => MaskLibrary::load_dir(d, Some((s, s)))?,
            None => MaskLibrary::default(),
        };
        let masks = MaskGenerator::new(cfg.masks, library)?;
        let vgg = match &cfg.vgg_weights {
            Some(p) => Some(Vgg16Features::load(p, 3, device)?),
            None => {
                tracing::warn!("no VGG16 weights given: training with the L1 and total-variation terms only (perceptual and style off)");
                None
            }
        };
        let cache = ImageCache::new(cfg.cache_bytes);
        let mut val_ex = Vec::new();
        let n_val = val.len().min(cfg.val_max);
        let idx: Vec<usize> = (0..n_val).collect();
        let mut items = val.load_items(&idx, Some((s, s)), &cache)?;
        for (k, it) in items.iter_mut().enumerate() {
            add_clean(it, cfg.clean_dir.as_deref(), s, &cache)?;
            let target = it.extra_images.get("clean").cloned();
            let occl = it.extra_masks.get("occlusion").filter(|m| m.as_raw().iter().any(|&v| v != 0)).cloned();
            let ex = match (target, occl) {
                (Some(t), Some(h)) => ValExample { input: it.image.clone(), target: t, hole: h, prior: None },
                (t, _) => {
                    let t = t.unwrap_or_else(|| it.image.clone());
                    let hole = masks.generate(s, s, &mut Rng::new(cfg.train.seed).fork(0x7a1 + k as u64));
                    ValExample { input: t.clone(), target: t, hole, prior: None }
                }
            };
            val_ex.push(ex);
        }
        tracing::info!(train = train.len(), val = val_ex.len(), library = masks.library().len(), "purification data");
        let pur = Purifier::new(cfg.clone(), device)?;
        // The validation examples are fixed: their classic fills are computed once, here.
        let inputs: Vec<&RgbImage> = val_ex.iter().map(|e| &e.input).collect();
        let holes: Vec<GrayImage> = val_ex.iter().map(|e| binary(&e.hole)).collect();
        let hole_refs: Vec<&GrayImage> = holes.iter().collect();
        if let Some(filled) = pur.prior_images(&inputs, &hole_refs)? {
            for (e, f) in val_ex.iter_mut().zip(filled) {
                e.prior = Some(f);
            }
        }
        let opt = Optimizer::from_varmap(&pur.varmap, cfg.optim, |_| true);
        Ok(PurifyTask {
            pur,
            opt,
            train,
            val: val_ex,
            masks,
            vgg,
            cache,
            finetuning: false,
            started: Instant::now(),
            elapsed0: 0.0,
            last_val: None,
            terms: Vec::new(),
        })
    }

    /// The purifier being trained.
    pub fn purifier(&self) -> &Purifier {
        &self.pur
    }

    /// Sizes of the training and validation parts.
    pub fn sizes(&self) -> (usize, usize) {
        (self.train.len(), self.val.len())
    }

    /// Whether the fine-tuning phase has started.
    pub fn finetuning(&self) -> bool {
        self.finetuning
    }

    fn start_finetune(&mut self) {
        self.opt.switch(self.pur.cfg.finetune_optim());
        self.finetuning = true;
    }

    fn finetune_due(&self, step: usize) -> bool {
        let cfg = &self.pur.cfg;
        let f = cfg.finetune_after_fraction;
        if f >= 1.0 {
            return false;
        }
        let total = cfg.train.max_steps.unwrap_or(usize::MAX).min(cfg.train.epochs * self.batches_per_epoch());
        if step as f64 >= f * total as f64 {
            return true;
        }
        match cfg.train.minutes {
            Some(m) => self.elapsed0 + self.started.elapsed().as_secs_f64() >= f * m * 60.0,
            None => false,
        }
    }

    /// Mean loss over the validation examples (no update; batch norm in eval mode).
    pub fn val_loss(&self) -> Result<f64> {
        let (dev, norm) = (&self.pur.device, self.pur.cfg.normalize);
        let (mut sum, mut n) = (0.0, 0usize);
        for chunk in self.val.chunks(self.pur.cfg.batch_size.max(1)) {
            let inputs: Vec<&RgbImage> = chunk.iter().map(|e| &e.input).collect();
            let targets: Vec<&RgbImage> = chunk.iter().map(|e| &e.target).collect();
            let holes: Vec<&GrayImage> = chunk.iter().map(|e| &e.hole).collect();
            let x = image_io::images_to_tensor(&inputs, norm, dev)?;
            let t = image_io::images_to_tensor(&targets, norm, dev)?;
            let valid = image_io::masks_to_tensor(&holes, dev)?.affine(-1.0, 1.0)?;
            let prior = match chunk.iter().map(|e| e.prior.as_ref()).collect::<Option<Vec<_>>>() {
                Some(p) => Some(self.pur.prior_tensor(&p)?),
                None => self.pur.prior(&inputs, &holes)?,
            };
            let out = self.pur.predict(&x, &valid, prior.as_ref(), BnMode::Eval)?;
            let (_, p) =
                inpainting_loss(&out, &t, &valid, &self.pur.cfg.loss, self.vgg.as_ref(), self.pur.cfg.normalize)?;
            sum += p.read()?.total * chunk.len() as f64;
            n += chunk.len();
        }
        Ok(sum / n.max(1) as f64)
    }

    /// Mean hole PSNR and SSIM over the validation examples at the working size.
    pub fn val_scores(&self) -> Result<(f64, f64)> {
        let mut s = HoleScores::default();
        let inputs: Vec<&RgbImage> = self.val.iter().map(|e| &e.input).collect();
        let holes: Vec<&GrayImage> = self.val.iter().map(|e| &e.hole).collect();
        let prior: Option<Vec<&RgbImage>> = self.val.iter().map(|e| e.prior.as_ref()).collect();
        let preds = self.pur.inpaint_with(&inputs, &holes, prior.as_deref())?;
        for (k, (e, p)) in self.val.iter().zip(preds).enumerate() {
            let (psnr, ssim) = hole_metrics(&p, &e.target, &e.hole)?;
            if psnr.is_finite() {
                s.per_image.push(HoleScore {
                    id: k.to_string(),
                    psnr,
                    ssim,
                    hole_fraction: masks::hole_fraction(&e.hole),
                });
            }
        }
        Ok(s.means())
    }
}

/// Puts `<clean_dir>/<id>_clean.png` into the item's `clean` slot when it has none.
fn add_clean(it: &mut Item, clean_dir: Option<&Path>, s: u32, cache: &ImageCache) -> Result<()> {
    if it.extra_images.contains_key("clean") {
        return Ok(());
    }
    if let Some(d) = clean_dir {
        let p = d.join(derm_data::handoff::clean(&it.id));
        if p.is_file() {
            it.extra_images.insert("clean".into(), (*cache.rgb(&p, Some((s, s)))?).clone());
        }
    }
    Ok(())
}

impl Task for PurifyTask {
    fn batches_per_epoch(&self) -> usize {
        self.train.len() / self.pur.cfg.batch_size.max(1)
    }

    /// The horizon outlives the switch to SGD ([`Optimizer::switch`] keeps it and the step count).
    fn set_horizon(&mut self, steps: usize) {
        self.opt.set_horizon(steps);
    }

    fn train_batch(&mut self, epoch: usize, batch: usize, rng: &mut Rng) -> Result<StepLoss> {
        let step = epoch * self.batches_per_epoch() + batch;
        if !self.finetuning && self.finetune_due(step) {
            tracing::info!(
                step,
                lr = self.pur.cfg.finetune_lr,
                "fine-tuning: SGD with momentum, encoder batch norm frozen"
            );
            self.start_finetune();
        }
        let cfg = &self.pur.cfg;
        let (bs, s) = (cfg.batch_size, cfg.size);
        let order = ShuffleSampler::new(self.train.len(), cfg.train.seed).epoch_indices(epoch as u64);
        let indices = &order[batch * bs..(batch + 1) * bs];
        let mut items = self.train.load_items(indices, Some((s, s)), &self.cache)?;
        for it in &mut items {
            add_clean(it, cfg.clean_dir.as_deref(), s, &self.cache)?;
            augment_item(&cfg.augment, it, Some((s, s)), rng);
        }
        let targets: Vec<&RgbImage> =
            items.iter().map(|it| it.extra_images.get("clean").unwrap_or(&it.image)).collect();
        let holes: Vec<GrayImage> = (0..bs).map(|_| self.masks.generate(s, s, rng)).collect();
        let hole_refs: Vec<&GrayImage> = holes.iter().collect();
        let dev = &self.pur.device;
        let t = image_io::images_to_tensor(&targets, cfg.normalize, dev)?;
        let valid = image_io::masks_to_tensor(&hole_refs, dev)?.affine(-1.0, 1.0)?;
        let mode = if self.finetuning { BnMode::FreezeEncoder } else { BnMode::Train };
        let prior = self.pur.prior(&targets, &hole_refs)?;
        let out = self.pur.predict(&t, &valid, prior.as_ref(), mode)?;
        let (loss, terms) = inpainting_loss(&out, &t, &valid, &cfg.loss, self.vgg.as_ref(), cfg.normalize)?;
        let norm = self.opt.backward_step(&loss)?;
        self.terms.push(terms);
        Ok(StepLoss::new(loss, norm))
    }

    /// The loss terms' means since the previous history row.
    fn history_parts(&mut self) -> BTreeMap<String, f64> {
        let parts = match LossTerms::read_all(&std::mem::take(&mut self.terms)) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("could not read the loss terms for the history: {e}");
                return BTreeMap::new();
            }
        };
        if parts.is_empty() {
            return BTreeMap::new();
        }
        let n = parts.len() as f64;
        let mut out = BTreeMap::new();
        for p in &parts {
            let terms = [
                ("valid", Some(p.valid)),
                ("hole", Some(p.hole)),
                ("tv", Some(p.tv)),
                ("perceptual", p.perceptual),
                ("style", p.style),
            ];
            for (k, v) in terms {
                if let Some(v) = v {
                    *out.entry(k.to_string()).or_insert(0.0) += v / n;
                }
            }
        }
        out
    }

    /// Mean hole PSNR on the validation examples.
    fn evaluate(&mut self) -> Result<Option<f64>> {
        if self.val.is_empty() {
            return Ok(None);
        }
        let (psnr, ssim) = self.val_scores()?;
        tracing::info!(psnr, ssim, "validation hole scores");
        self.last_val = Some(psnr);
        Ok(Some(psnr))
    }

    fn save(&self, dir: &Path, state: &TrainState) -> Result<()> {
        let mut m = meta(&self.pur.cfg);
        m.extra["val_hole_psnr"] = serde_json::json!(self.last_val);
        m.extra["step"] = serde_json::json!(state.step);
        m.extra["finetune"] = serde_json::json!(self.finetuning);
        checkpoint::save(dir, &CheckpointData::training(&self.pur.varmap, &self.pur.cfg, &m, &self.opt, state))
    }

    /// Weights, the phase (Adam, or SGD fine-tuning) and the optimiser state.
    fn restore(&mut self, dir: &Path, state: &TrainState) -> Result<()> {
        let m = checkpoint::read_meta(&checkpoint::resolve(dir)?, "purify")?;
        if m.extra.get("finetune").and_then(|v| v.as_bool()) == Some(true) {
            self.start_finetune();
        }
        checkpoint::restore_training(dir, &self.pur.varmap, &mut self.opt)?;
        self.elapsed0 = state.elapsed_s;
        self.started = Instant::now();
        tracing::info!(finetune = self.finetuning, "resuming");
        Ok(())
    }

    fn check_resumable(&self, dir: &Path) -> Result<()> {
        let cfg = &self.pur.cfg;
        train::check_saved(dir, |s: &PurifyConfig| s.model == cfg.model && s.size == cfg.size, "model shape or size")
    }
}

/// Trains from scratch, or resumes from `<out>/last` when `resume` is set and it exists.
pub fn train(
    cfg: PurifyConfig,
    data: &Dataset,
    device: &Device,
    out: &Path,
    resume: bool,
    on_event: &mut dyn FnMut(&train::Event),
) -> Result<(PurifyTask, TrainState)> {
    let mut task = PurifyTask::new(cfg.clone(), data, device)?;
    let state = train::run(&mut task, &cfg.train, out, resume, on_event)?;
    Ok((task, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use derm_data::phantom::{write_phantom_set, PhantomConfig};

    fn tiny_cfg() -> PurifyConfig {
        PurifyConfig {
            model: PConvUNetConfig {
                in_channels: 3,
                widths: vec![8, 16, 16],
                kernels: vec![5, 3, 3],
                leaky_slope: 0.2,
            },
            size: 32,
            batch_size: 4,
            optim: OptimConfig { optimizer: OptimizerKind::adam(2e-3), ..Default::default() },
            train: LoopConfig { epochs: 6, ..Default::default() },
            finetune_after_fraction: 0.7,
            finetune_lr: 1e-4,
            val_fraction: 0.25,
            ..Default::default()
        }
    }

    fn phantoms(dir: &Path, n: usize) -> Dataset {
        let pc = PhantomConfig { size: 48, hair_probability: 1.0, ..Default::default() };
        write_phantom_set(dir, &pc, 1, n).unwrap();
        Dataset::open_dir(dir, None, None).unwrap()
    }

    #[test]
    fn the_run_description_names_the_network_both_phases_and_the_loss_terms_on() {
        let d = PurifyConfig::default().describe();
        for part in [
            "small preset (widths [32, 64, 128, 128], kernels [7, 5, 5, 3])",
            "128 px, batch 6, adam lr 2e-4 (constant)",
            "then sgd lr 5e-5 momentum 0.9 (constant) with the encoder's batch norm frozen after 0.8 of the run",
            "loss valid 1 hole 6 tv 0.1 (no VGG16 weights: perceptual and style off)",
            "augment (flips, quarter turns, crops 0.8-1)",
            "corrects the harmonic fill (radius 3 px)",
        ] {
            assert!(d.contains(part), "{part:?} missing from {d:?}");
        }
        let c = PurifyConfig {
            model: PConvUNetConfig::peer(),
            vgg_weights: Some("w/vgg16.safetensors".into()),
            prior_fill: false,
            finetune_after_fraction: 1.0,
            ..Default::default()
        };
        let d = c.describe();
        assert!(
            d.contains("peer preset") && d.contains("perceptual 0.05 style 120 (VGG16 from w/vgg16.safetensors)"),
            "{d}"
        );
        assert!(d.ends_with("paints holes alone") && !d.contains("sgd"), "{d}");
        assert!(tiny_cfg().describe().contains("custom network (widths [8, 16, 16]"));
    }

    #[test]
    fn a_partial_conv_training_step_on_the_device_path_reads_nothing_back() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(&d.path().join("ph"), 12);
        let mut task = PurifyTask::new(tiny_cfg(), &data, &Device::Cpu).unwrap();
        let mut rng = Rng::new(3);
        let (steps, reads) = derm_kernels::ops::host_reads_on_device_path(|| {
            [task.train_batch(0, 0, &mut rng).unwrap(), task.train_batch(0, 1, &mut rng).unwrap()]
        });
        assert_eq!(reads, 0, "a partial-convolution training step read data back to the host");
        for s in steps {
            assert!(s.loss.to_scalar::<f32>().unwrap().is_finite());
        }
        // The loss terms were kept and are read at the history row.
        let parts = task.history_parts();
        assert!(parts["hole"] > 0.0 && parts["valid"] > 0.0, "{parts:?}");
    }

    #[test]
    fn training_lowers_the_loss_fine_tunes_and_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(&d.path().join("ph"), 24);
        let out = d.path().join("run");
        // Library masks from the phantoms' own occlusion folder.
        // The network painting the holes on its own: from random weights the loss must fall.
        let mut cfg = PurifyConfig { prior_fill: false, ..tiny_cfg() };
        cfg.hole_masks = Some(d.path().join("ph").join("occlusion"));
        let task0 = PurifyTask::new(cfg.clone(), &data, &Device::Cpu).unwrap();
        assert!(!task0.masks.library().is_empty());
        let before = task0.val_loss().unwrap();
        let (task, state) = train(cfg.clone(), &data, &Device::Cpu, &out, false, &mut |_| {}).unwrap();
        let after = task.val_loss().unwrap();
        assert!(after < before, "validation loss {before} -> {after}");
        assert!(task.finetuning(), "the last 30% of the steps fine-tune");
        let per_epoch = task.sizes().0 / 4;
        assert_eq!(state.step, 6 * per_epoch);
        // The saved checkpoint loads into the same weights, and records its phase.
        let last = train::last_dir(&out);
        let p = Purifier::load(&last, &Device::Cpu).unwrap();
        for (name, v) in checkpoint::sorted_vars(&task.purifier().varmap) {
            let w = p.varmap.data().lock().unwrap().get(&name).unwrap().as_tensor().clone();
            let diff = (v.as_tensor() - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{name}");
        }
        let m = checkpoint::read_meta(&last, "purify").unwrap();
        assert_eq!(m.extra["finetune"], serde_json::json!(true));
        assert_eq!(m.extra["perceptual_loss"], serde_json::json!(false));
        // Resume continues in the fine-tuning phase.
        let mut more = cfg.clone();
        more.train.epochs = 7;
        let (t2, st) = train(more, &data, &Device::Cpu, &out, true, &mut |_| {}).unwrap();
        assert_eq!(st.step, 7 * per_epoch);
        assert!(t2.finetuning());
        // Another architecture does not load.
        let mut other = cfg;
        other.model.widths = vec![8, 16, 24];
        let p2 = Purifier::new(other, &Device::Cpu).unwrap();
        let e =
            checkpoint::load_varmap(&p2.varmap, &last.join(checkpoint::WEIGHTS), checkpoint::Strictness::Exact, |_| {
                false
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("shape"), "{e}");
    }

    #[test]
    fn purify_keeps_pixels_outside_the_hole_at_any_size() {
        let p = Purifier::new(tiny_cfg(), &Device::Cpu).unwrap();
        let img = RgbImage::from_fn(45, 37, |x, y| image::Rgb([(x * 5) as u8, (y * 6) as u8, 77]));
        let hole = GrayImage::from_fn(45, 37, |x, y| Luma([if (10..14).contains(&x) || y == 20 { 255 } else { 0 }]));
        let out = purify_image(&p, &img, &hole).unwrap();
        assert_eq!(out.dimensions(), (45, 37));
        let mut changed = 0;
        for (x, y, px) in out.enumerate_pixels() {
            if hole.get_pixel(x, y).0[0] == 0 {
                assert_eq!(px, img.get_pixel(x, y));
            } else if px != img.get_pixel(x, y) {
                changed += 1;
            }
        }
        assert!(changed > 0);
        // At the working size too, and an empty hole is a no-op.
        let img32 = image_io::resize_rgb(&img, 32, 32);
        let hole32 = resize_hole(&hole, 32, 32);
        let out32 = purify_image(&p, &img32, &hole32).unwrap();
        for (x, y, px) in out32.enumerate_pixels() {
            if hole32.get_pixel(x, y).0[0] == 0 {
                assert_eq!(px, img32.get_pixel(x, y));
            }
        }
        assert_eq!(purify_image(&p, &img, &GrayImage::new(45, 37)).unwrap(), img);
        assert!(purify_image(&p, &img, &GrayImage::new(4, 4)).is_err());
    }

    #[test]
    fn an_untrained_network_on_the_classic_fill_returns_it_and_old_configs_were_without_it() {
        let img = RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8]));
        let hole = GrayImage::from_fn(32, 32, |x, y| Luma([if (12..16).contains(&x) && y > 4 { 255 } else { 0 }]));
        let classic = derm_hair::inpaint(&img, &hole, &derm_hair::HairConfig::default()).unwrap();
        let max_diff = |a: &RgbImage| {
            a.as_raw().iter().zip(classic.as_raw()).map(|(&u, &v)| (u as i32 - v as i32).abs()).max().unwrap()
        };
        let p = Purifier::new(tiny_cfg(), &Device::Cpu).unwrap();
        assert!(p.cfg.prior_fill, "the classic fill is the default base");
        // Equal up to the normalisation's round trip.
        assert!(max_diff(&p.inpaint(&[&img], &[&hole]).unwrap()[0]) <= 1);
        // Without it the untrained network paints its own noise.
        let plain = Purifier::new(PurifyConfig { prior_fill: false, ..tiny_cfg() }, &Device::Cpu).unwrap();
        assert!(max_diff(&plain.inpaint(&[&img], &[&hole]).unwrap()[0]) > 10);
        // A checkpoint's config written before the field existed was trained without it.
        let old: PurifyConfig = serde_json::from_str("{}").unwrap();
        assert!(!old.prior_fill);
    }

    #[test]
    fn the_classic_fill_follows_the_config_and_validation_fills_are_computed_once() {
        use derm_hair::{HairConfig, InpaintMethod};
        let img = RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8]));
        let hole = GrayImage::from_fn(32, 32, |x, y| Luma([if (12..16).contains(&x) && y > 4 { 255 } else { 0 }]));
        // Not the default (harmonic relaxation after Telea, radius 3).
        let other = HairConfig { inpaint: InpaintMethod::Telea, inpaint_radius: 2.0, ..HairConfig::default() };
        let want = derm_hair::inpaint(&img, &hole, &other).unwrap();
        assert!(want != derm_hair::inpaint(&img, &hole, &HairConfig::default()).unwrap());
        let cfg = PurifyConfig { prior_method: other.inpaint, prior_radius: other.inpaint_radius, ..tiny_cfg() };
        let p = Purifier::new(cfg, &Device::Cpu).unwrap();
        let got = p.inpaint(&[&img], &[&hole]).unwrap().remove(0);
        let diff = got.as_raw().iter().zip(want.as_raw()).map(|(&u, &v)| (u as i32 - v as i32).abs()).max().unwrap();
        assert!(diff <= 1, "{diff}");
        // Given fills give the same result as computed ones.
        let fills = p.prior_images(&[&img], &[&hole]).unwrap().unwrap();
        assert!(p.inpaint_with(&[&img], &[&hole], Some(&[&fills[0]])).unwrap()[0] == got);
        // A task keeps its validation examples' fills and scores with them as without them.
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(&d.path().join("ph"), 12);
        let mut task = PurifyTask::new(tiny_cfg(), &data, &Device::Cpu).unwrap();
        assert!(!task.val.is_empty() && task.val.iter().all(|e| e.prior.is_some()));
        let (cached, loss_cached) = (task.val_scores().unwrap(), task.val_loss().unwrap());
        for e in &mut task.val {
            e.prior = None;
        }
        assert_eq!((cached, loss_cached), (task.val_scores().unwrap(), task.val_loss().unwrap()));
    }

    #[test]
    fn on_the_classic_fill_training_fits_a_batch_better_than_the_classic_fill() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(&d.path().join("ph"), 12);
        let mut task = PurifyTask::new(tiny_cfg(), &data, &Device::Cpu).unwrap();
        // The same batch and holes each time (the rng is reseeded); the loss is the one before
        // the step, so the first is the classic fill's own.
        let losses: Vec<f32> = (0..40)
            .map(|_| task.train_batch(0, 0, &mut Rng::new(9)).unwrap().loss.to_scalar::<f32>().unwrap())
            .collect();
        let (first, last) = (losses[0], losses[39]);
        assert!(last < 0.8 * first, "loss on the classic fill {first} -> {last}");
    }

    #[test]
    fn resize_hole_is_conservative() {
        let mut hole = GrayImage::new(64, 64);
        hole.put_pixel(37, 5, Luma([255]));
        let small = resize_hole(&hole, 8, 8);
        assert_eq!(small.as_raw().iter().filter(|&&v| v != 0).count(), 1);
        assert_eq!(small.get_pixel(4, 0).0[0], 255);
    }

    #[test]
    fn evaluation_scores_phantoms_and_needs_clean_images() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(&d.path().join("ph"), 4);
        let none = evaluate_holes(&data, Some(32), &mut |img, _| Ok(img.clone())).unwrap();
        assert!(!none.per_image.is_empty());
        let (p, s) = none.means();
        assert!(p.is_finite() && p < metrics::PSNR_CAP && (-1.0..=1.0).contains(&s), "{p} {s}");
        let mut bare = data.clone();
        bare.samples[0].extras.clear();
        assert!(evaluate_holes(&bare, Some(32), &mut |img, _| Ok(img.clone())).is_err());
    }

    #[test]
    fn borrowed_holes_avoid_the_images_own_hairs_and_hide_the_truth() {
        let d = tempfile::tempdir().unwrap();
        let data = phantoms(&d.path().join("ph"), 4);
        let (holes, same) = (d.path().join("holes"), d.path().join("same"));
        std::fs::create_dir_all(&holes).unwrap();
        std::fs::create_dir_all(&same).unwrap();
        // Image k's own occlusion: rows 8k..8k+8 of 32 (disjoint bands).
        for (k, smp) in data.samples.iter().enumerate() {
            let band = GrayImage::from_fn(32, 32, |_, y| Luma([if y / 8 == k as u32 { 255 } else { 0 }]));
            band.save(holes.join(derm_data::handoff::occlusion(&smp.id))).unwrap();
            GrayImage::from_pixel(32, 32, Luma([255])).save(same.join(derm_data::handoff::occlusion(&smp.id))).unwrap();
        }
        let mut seen = Vec::new();
        let scores = evaluate_borrowed_holes(&data, &holes, Some(32), 3, &mut |img, hole| {
            // Another image's band, none of the image's own, its pixels blanked.
            let rows: Vec<u32> = (0..32).filter(|&y| hole.get_pixel(0, y).0[0] != 0).collect();
            assert_eq!(rows.len(), 8);
            assert!(hole.enumerate_pixels().all(|(x, y, p)| p.0[0] == 0 || img.get_pixel(x, y).0 == [0, 0, 0]));
            seen.push(rows[0]);
            Ok(img.clone())
        })
        .unwrap();
        assert_eq!(scores.per_image.len(), 4);
        for (k, first) in seen.iter().enumerate() {
            assert_ne!(*first, 8 * k as u32, "image {k} got its own band");
        }
        assert!(scores.per_image.iter().all(|s| s.psnr < 40.0 && (s.hole_fraction - 0.25).abs() < 1e-9));
        // The same seed draws the same donors.
        let again = evaluate_borrowed_holes(&data, &holes, Some(32), 3, &mut |img, _| Ok(img.clone())).unwrap();
        assert_eq!(again, scores);
        // Where every pixel is the image's own occlusion, nothing is left to score.
        let none = evaluate_borrowed_holes(&data, &same, Some(32), 3, &mut |img, _| Ok(img.clone())).unwrap();
        assert!(none.per_image.is_empty());
        // A missing mask is an error naming it.
        std::fs::remove_file(holes.join(derm_data::handoff::occlusion(&data.samples[2].id))).unwrap();
        let e = evaluate_borrowed_holes(&data, &holes, Some(32), 3, &mut |img, _| Ok(img.clone())).unwrap_err();
        assert!(e.to_string().contains(&data.samples[2].id), "{e}");
    }
}
