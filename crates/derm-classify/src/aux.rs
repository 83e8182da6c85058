//! The auxiliary lesion-mask head: a second task that teaches the classifier where the lesion
//! is, in training (and, with lesion pooling, at prediction).
//!
//! A 1x1 convolution on the output of one stage ([`crate::ClassifyConfig::aux_mask_stage`],
//! `layer3` by default: stride 16, 8 x 8 cells for a 128 px input; `layer2` gives 16 x 16,
//! `layer4` 4 x 4) predicts, per cell, whether the lesion covers it; its binary cross-entropy
//! against the share of each cell the training image's lesion mask covers (transformed with the
//! image: the same crop, flips and quarter turns) is added to the classification loss with
//! [`crate::ClassifyConfig::aux_mask_weight`]. The head is saved with the model (so a run
//! resumes); by default prediction never runs it and needs no mask: the lesion knowledge is in
//! the shared layers. Samples without a mask (synthetic images) add nothing to this loss.
//!
//! With [`crate::ClassifyConfig::lesion_pooling`] (off by default) the head also runs at
//! prediction, still without a mask: the last stage's features are averaged a second time, each
//! cell weighted by the head's lesion probability ([`lesion_pooled`]; at 128 px each of
//! `layer4`'s 4 x 4 cells is weighted by the probabilities of the 2 x 2 `layer3` cells it
//! covers), and a second linear map of those features (`aux_mask.pool_fc`, (K, C), starting at
//! zero) adds its logits to the classifier's ([`MaskHead::pooled_logits`]): the classifier reads
//! the lesion's features apart from the whole image's.
//!
//! With [`crate::ClassifyConfig::aux_cell_weight`] (off by default) the head also learns the
//! diagnosis cell by cell: a second 1x1 map of the same stage's features gives class logits per
//! cell ([`MaskHead::cell_logits`]), and their cross-entropy against the image's label, each cell
//! weighted by the share of it the lesion covers ([`cell_class_loss`]), is added with that
//! weight: every part of the lesion has to look like its diagnosis, not only the pooled whole.
//! Training only; prediction never reads it.
//!
//! With [`crate::ClassifyConfig::aux_mask_second_stage`] (none by default) a second 1x1 head
//! reads another stage (`layer2` beside `layer3`, say: 16 x 16 cells at 128 px) and learns the
//! same cell shares at its own grid ([`MaskHead::second_map`]); its loss is added with the same
//! weight, so the mask's signal reaches the stages below the first head's directly. Training
//! only.
//!
//! With [`crate::ClassifyConfig::aux_descriptor_weight`] (off by default) a linear map of the
//! pooled last-stage features also regresses the lesion's ABCD measurements taken from each
//! view's mask and pixels ([`crate::descriptors`]). Training only.
//!
//! Variables: `aux_mask.weight` (C,), `aux_mask.bias` (1,), with lesion pooling
//! `aux_mask.pool_fc` (K, C_last), and with the per-cell diagnosis `aux_mask.cell_fc` (K, C) and
//! `aux_mask.cell_bias` (K,), with a second stage `aux_mask.second_weight` (C2,) and
//! `aux_mask.second_bias` (1,), with descriptors `aux_mask.desc_fc` (D, C_last) and
//! `aux_mask.desc_bias` (D,), outside torchvision's names, so [`crate::load_torchvision`] leaves
//! them at their initialisation.

use candle_core::{Device, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use image::GrayImage;

use crate::descriptors;
use crate::model::Stage;

/// The prefix of the head's variables.
pub const PREFIX: &str = "aux_mask";

/// The stage whose output the head reads unless a config names another (and in every config
/// saved before the choice existed).
pub const DEFAULT_STAGE: Stage = Stage::Layer3;

/// The stages a head can read: `layer1` .. `layer4`.
pub const STAGES: [Stage; 4] = [Stage::Layer1, Stage::Layer2, Stage::Layer3, Stage::Layer4];

/// Whether variable `name` is one of the head's.
pub fn is_head_var(name: &str) -> bool {
    name.split('.').next() == Some(PREFIX)
}

/// The weights of the head's losses in a training step: the lesion mask's, the per-cell
/// diagnosis's and the lesion descriptors' ([`crate::ClassifyConfig::aux_mask_weight`],
/// [`crate::ClassifyConfig::aux_cell_weight`], [`crate::ClassifyConfig::aux_descriptor_weight`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Weights {
    /// The lesion-mask loss's.
    pub mask: f64,
    /// The per-cell diagnosis loss's (read only when the head gives per-cell diagnoses).
    pub cells: f64,
    /// The lesion descriptors' (read only when the head regresses them).
    pub descriptors: f64,
}

impl Weights {
    /// The weights `cfg` trains with.
    pub fn of(cfg: &crate::ClassifyConfig) -> Self {
        Weights { mask: cfg.aux_mask_weight, cells: cfg.aux_cell_weight, descriptors: cfg.aux_descriptor_weight }
    }
}

/// The head: per-cell lesion logits from the feature map of one stage.
#[derive(Debug, Clone)]
pub struct MaskHead {
    weight: Tensor,
    bias: Tensor,
    stage: Stage,
    /// With lesion pooling: the (K, C_last) map from lesion-pooled features to logits.
    pool: Option<Tensor>,
    /// With the per-cell diagnosis: the (K, C) map from a cell's features to class logits, and
    /// its (K,) bias.
    cells: Option<(Tensor, Tensor)>,
    /// With a second stage: that stage, and its own (C2,) weights and (1,) bias.
    second: Option<(Stage, Tensor, Tensor)>,
    /// With lesion descriptors: the (D, C_last) map from the pooled last-stage features to them,
    /// and its (D,) bias.
    descriptors: Option<(Tensor, Tensor)>,
}

impl MaskHead {
    /// A head over the `channels` output channels of `stage`, its variables under `vb`
    /// (`aux_mask.*` when `vb` is the model's root prefixed with [`PREFIX`]); weights start small
    /// and the bias at zero, so the first logits are near 0 (probability one half everywhere).
    pub fn new(channels: usize, stage: Stage, vb: VarBuilder) -> Result<Self> {
        let (weight, bias) = cell_map_vars(channels, "weight", "bias", &vb)?;
        Ok(MaskHead { weight, bias, stage, pool: None, cells: None, second: None, descriptors: None })
    }

    /// The head that also reads `stage` (of `channels` output channels) with a 1x1 map of its own
    /// (`second_weight`, `second_bias` under `vb`, initialised as the first), trained on the
    /// same masks at that stage's grid.
    pub fn with_second_stage(mut self, channels: usize, stage: Stage, vb: VarBuilder) -> Result<Self> {
        let (w, b) = cell_map_vars(channels, "second_weight", "second_bias", &vb)?;
        self.second = Some((stage, w, b));
        Ok(self)
    }

    /// The second stage the head reads, if any.
    pub fn second_stage(&self) -> Option<Stage> {
        self.second.as_ref().map(|(s, _, _)| *s)
    }

    /// The second map's logits (N, h, w) from its stage's features (N, C2, h, w); `None` without
    /// a second stage.
    pub fn second_map(&self, features: &Tensor) -> Result<Option<Tensor>> {
        match &self.second {
            Some((_, w, b)) => Ok(Some(cell_logits_of(features, w, b)?)),
            None => Ok(None),
        }
    }

    /// The head that also gives `classes` diagnosis logits per cell from the stage's `channels`
    /// features (`cell_fc`, `cell_bias` under `vb`; small weights and a zero bias, so each cell
    /// starts near the uniform distribution).
    pub fn with_cell_classes(mut self, channels: usize, classes: usize, vb: VarBuilder) -> Result<Self> {
        let bound = 1.0 / (channels as f64).sqrt();
        let w = vb.get_with_hints((classes, channels), "cell_fc", Init::Uniform { lo: -bound, up: bound })?;
        let b = vb.get_with_hints(classes, "cell_bias", Init::Const(0.0))?;
        self.cells = Some((w, b));
        Ok(self)
    }

    /// Diagnosis logits (N, h * w, K) per cell of `features` (N, C, h, w), row by row; `None`
    /// without the per-cell diagnosis.
    pub fn cell_logits(&self, features: &Tensor) -> Result<Option<Tensor>> {
        let Some((w, b)) = &self.cells else {
            return Ok(None);
        };
        let (n, c, h, wd) = features.dims4()?;
        let cells = features.reshape((n, c, h * wd))?.transpose(1, 2)?.contiguous()?;
        Ok(Some(cells.broadcast_matmul(&w.t()?)?.broadcast_add(b)?))
    }

    /// The head that also regresses the [`descriptors::COUNT`] lesion descriptors from the
    /// `features` channels of the last stage, averaged over the view (`desc_fc`, `desc_bias`
    /// under `vb`, both starting at zero, so the first predictions are the descriptors' mean).
    pub fn with_descriptors(mut self, features: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb.get_with_hints((descriptors::COUNT, features), "desc_fc", Init::Const(0.0))?;
        let b = vb.get_with_hints(descriptors::COUNT, "desc_bias", Init::Const(0.0))?;
        self.descriptors = Some((w, b));
        Ok(self)
    }

    /// The predicted standardised descriptors (N, D) from the pooled last-stage features
    /// `pooled` (N, C); `None` without them.
    pub fn descriptor_values(&self, pooled: &Tensor) -> Result<Option<Tensor>> {
        match &self.descriptors {
            Some((w, b)) => Ok(Some(pooled.matmul(&w.t()?)?.broadcast_add(b)?)),
            None => Ok(None),
        }
    }

    /// Whether the head regresses the lesion descriptors.
    pub fn describes(&self) -> bool {
        self.descriptors.is_some()
    }

    /// The head with lesion pooling: a (`classes`, `features`) map, `pool_fc` under `vb`,
    /// starting at zero (so the logits start as the plain classifier's), from the last stage's
    /// `features` channels averaged over the lesion to logits added to the classifier's.
    pub fn with_lesion_pooling(mut self, features: usize, classes: usize, vb: VarBuilder) -> Result<Self> {
        self.pool = Some(vb.get_with_hints((classes, features), "pool_fc", Init::Const(0.0))?);
        Ok(self)
    }

    /// Whether the head pools the last stage's features by its lesion map (and so runs at
    /// prediction).
    pub fn pools(&self) -> bool {
        self.pool.is_some()
    }

    /// The stage whose output the head reads.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// Logits (N, h, w) from features (N, C, h, w).
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        cell_logits_of(features, &self.weight, &self.bias)
    }

    /// With lesion pooling, the logits (N, K) the lesion's features add: `last` (N, C, h', w'),
    /// the last stage's output, averaged with the weights of the head's lesion probabilities from
    /// `map` (N, h, w), its logits ([`lesion_pooled`]), through `pool_fc`. `None` without it.
    pub fn pooled_logits(&self, last: &Tensor, map: &Tensor) -> Result<Option<Tensor>> {
        match &self.pool {
            Some(p) => Ok(Some(lesion_pooled(last, map)?.matmul(&p.t()?)?)),
            None => Ok(None),
        }
    }
}

/// A 1x1 map's (C,) weights, uniform in +-1/sqrt(C), and (1,) bias, zero, named `weight` and
/// `bias` under `vb`: its first logits are near 0 (probability one half everywhere).
fn cell_map_vars(channels: usize, weight: &str, bias: &str, vb: &VarBuilder) -> Result<(Tensor, Tensor)> {
    let bound = 1.0 / (channels as f64).sqrt();
    let w = vb.get_with_hints(channels, weight, Init::Uniform { lo: -bound, up: bound })?;
    Ok((w, vb.get_with_hints(1, bias, Init::Const(0.0))?))
}

/// Logits (N, h, w) of a 1x1 map with (C,) `weight` and (1,) `bias` over `features` (N, C, h, w).
fn cell_logits_of(features: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let c = weight.dim(0)?;
    features.broadcast_mul(&weight.reshape((1, c, 1, 1))?)?.sum(1)?.broadcast_add(bias)
}

/// The features (N, C, h', w') averaged over each image's cells weighted by the lesion
/// probabilities `sigmoid(map)` of the head's logits `map` (N, h, w): (N, C). Each head cell's
/// probability goes to the feature cell that holds it (row `i * h' / h`, column `j * w' / w`,
/// rounded down: the last stage has as many rows and columns as the head, or fewer), and a small
/// floor on the weights' sum keeps an image where no cell looks like lesion finite (its pooled
/// features tend to zero).
pub fn lesion_pooled(features: &Tensor, map: &Tensor) -> Result<Tensor> {
    let (n, c, fh, fw) = features.dims4()?;
    let (_, h, w) = map.dims3()?;
    let mut assign = vec![0f32; h * w * fh * fw];
    for i in 0..h {
        for j in 0..w {
            let to = (i * fh / h).min(fh - 1) * fw + (j * fw / w).min(fw - 1);
            assign[(i * w + j) * fh * fw + to] = 1.0;
        }
    }
    let assign = Tensor::from_vec(assign, (h * w, fh * fw), map.device())?;
    let p = candle_nn::ops::sigmoid(map)?.reshape((n, h * w))?;
    let q = p.matmul(&assign)?.unsqueeze(1)?;
    let total = p.sum_keepdim(1)?.affine(1.0, 1e-3)?;
    features.reshape((n, c, fh * fw))?.broadcast_mul(&q)?.sum(2)?.broadcast_div(&total)
}

/// The share of each of `h` x `w` equal cells that the mask's foreground (>= 128) covers, row
/// by row: the head's target for a feature map of that size. Cell (i, j) spans rows
/// `i * H / h .. (i + 1) * H / h` (rounded down) and the same for columns, so every pixel
/// belongs to exactly one cell whatever the sizes.
pub fn cell_shares(mask: &GrayImage, h: usize, w: usize) -> Vec<f32> {
    let (mw, mh) = (mask.width() as usize, mask.height() as usize);
    let mut on = vec![0u32; h * w];
    let mut all = vec![0u32; h * w];
    for (x, y, p) in mask.enumerate_pixels() {
        let cell = (y as usize * h / mh.max(1)).min(h - 1) * w + (x as usize * w / mw.max(1)).min(w - 1);
        all[cell] += 1;
        on[cell] += u32::from(p[0] >= 128);
    }
    on.iter().zip(&all).map(|(&a, &n)| if n == 0 { 0.0 } else { a as f32 / n as f32 }).collect()
}

/// What the head learns from for the views of a training batch, in the batch's order: each
/// view's lesion mask, moved with it (`None` for a sample without one), and with lesion
/// descriptors their standardised targets (N, D) and (N,) weights, 1 for a view with
/// descriptors ([`crate::descriptors::Standardizer::targets`]).
#[derive(Debug, Clone, Default)]
pub struct ViewTargets {
    /// Each view's lesion mask.
    pub masks: Vec<Option<GrayImage>>,
    /// The descriptors' targets and weights, when the head regresses them.
    pub descriptors: Option<(Tensor, Tensor)>,
}

/// The head's targets for a batch: (N, h, w) cell shares of each mask, and (N,) weights, 1 for a
/// sample with a mask and 0 for one without (its target row is zeros and counts for nothing).
pub fn targets(masks: &[Option<GrayImage>], h: usize, w: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let mut t = Vec::with_capacity(masks.len() * h * w);
    let mut present = Vec::with_capacity(masks.len());
    for m in masks {
        match m {
            Some(m) => {
                t.extend(cell_shares(m, h, w));
                present.push(1f32);
            }
            None => {
                t.extend(std::iter::repeat_n(0f32, h * w));
                present.push(0f32);
            }
        }
    }
    Ok((Tensor::from_vec(t, (masks.len(), h, w), device)?, Tensor::new(present, device)?))
}

/// Mean binary cross-entropy of the head's logits (N, h, w) against `targets` (N, h, w), over the
/// cells of the samples whose `present` weight (N,) is 1; 0 when no sample has a mask.
pub fn loss(logits: &Tensor, targets: &Tensor, present: &Tensor) -> Result<Tensor> {
    let per_sample = derm_kernels::ops::bce_with_logits_elementwise(logits, targets)?.mean((1, 2))?;
    mean_over_present(&per_sample, present)
}

/// The mean of `per_sample` (N,) over the samples whose `present` weight (N,) is 1; 0 when none
/// is.
pub(crate) fn mean_over_present(per_sample: &Tensor, present: &Tensor) -> Result<Tensor> {
    let n = present.sum_all()?.to_dtype(candle_core::DType::F32)?.clamp(1f32, f32::MAX)?;
    (per_sample * present)?.sum_all()?.div(&n)
}

/// Cross-entropy of per-cell diagnosis logits (N, h * w, K) against each image's label `y`
/// (N,) u32, each cell weighted by the share of it the lesion covers (`shares` (N, h, w), as
/// [`targets`] gives them) and averaged over the lesion's cells, then over the samples whose
/// `present` weight (N,) is 1; an image whose mask covers no cell adds zero to that mean, and the
/// loss is 0 when no sample has a mask.
pub fn cell_class_loss(logits: &Tensor, y: &Tensor, shares: &Tensor, present: &Tensor) -> Result<Tensor> {
    let (n, cells, _) = logits.dims3()?;
    let logp = derm_kernels::ops::log_softmax(logits, candle_core::D::Minus1)?;
    let index = y.to_dtype(candle_core::DType::U32)?.reshape((n, 1, 1))?.broadcast_as((n, cells, 1))?.contiguous()?;
    let nll = logp.gather(&index, 2)?.squeeze(2)?.neg()?;
    let share = shares.reshape((n, cells))?;
    let per_sample = (nll * &share)?.sum(1)?.div(&share.sum(1)?.affine(1.0, 1e-6)?)?;
    mean_over_present(&per_sample, present)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn cell_shares_average_the_mask_over_equal_cells() {
        // 4 x 4 mask: left half on, plus one pixel of the top-right cell.
        let mut m = GrayImage::from_fn(4, 4, |x, _| image::Luma([if x < 2 { 255 } else { 0 }]));
        m.put_pixel(3, 0, image::Luma([200]));
        assert_eq!(cell_shares(&m, 2, 2), vec![1.0, 0.25, 1.0, 0.0]);
        // Sizes that do not divide: every pixel in one cell, shares in [0, 1].
        let s = cell_shares(&GrayImage::from_pixel(5, 7, image::Luma([255])), 2, 3);
        assert_eq!(s, vec![1.0; 6]);
    }

    #[test]
    fn the_loss_counts_only_samples_with_a_mask() {
        let d = Device::Cpu;
        let logits = Tensor::new(&[[[0f32, 2.0]], [[5.0, -5.0]]], &d).unwrap();
        let full = GrayImage::from_pixel(2, 1, image::Luma([255]));
        let (t, p) = targets(&[Some(full), None], 1, 2, &d).unwrap();
        assert_eq!(p.to_vec1::<f32>().unwrap(), vec![1.0, 0.0]);
        let l = loss(&logits, &t, &p).unwrap().to_scalar::<f32>().unwrap();
        // -log(sigmoid(0)) and -log(sigmoid(2)), averaged; the second sample is ignored.
        let want = (std::f32::consts::LN_2 + (1.0 + (-2f32).exp()).ln()) / 2.0;
        assert!((l - want).abs() < 1e-6, "{l} vs {want}");
        // No mask at all: zero, not NaN.
        let (t, p) = targets(&[None, None], 1, 2, &d).unwrap();
        assert_eq!(loss(&logits, &t, &p).unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn lesion_pooling_averages_the_features_where_the_head_sees_the_lesion() {
        let d = Device::Cpu;
        // Features (1, 2, 2, 2): channel 0 is the cell's index, channel 1 is 1 everywhere.
        let f = Tensor::new(&[[[[0f32, 1.0], [2.0, 3.0]], [[1.0, 1.0], [1.0, 1.0]]]], &d).unwrap();
        // A 4 x 4 map: lesion (logit 30) on the top-left 2 x 2 cells and the bottom-right one.
        let mut m = [[-30f32; 4]; 4];
        (m[0][0], m[0][1], m[1][0], m[1][1], m[3][3]) = (30.0, 30.0, 30.0, 30.0, 30.0);
        let map = Tensor::new(&[m], &d).unwrap();
        let p = lesion_pooled(&f, &map).unwrap().to_vec2::<f32>().unwrap();
        // Four head cells on feature cell 0 and one on cell 3: (4 * 0 + 3) / 5, and 5 / 5.
        let total = 5.0 + 1e-3;
        assert!((p[0][0] - 3.0 / total).abs() < 1e-5 && (p[0][1] - 5.0 / total).abs() < 1e-5, "{p:?}");
        // No lesion anywhere: finite and near zero.
        let none = lesion_pooled(&f, &Tensor::full(-30f32, (1, 4, 4), &d).unwrap()).unwrap();
        assert!(none.to_vec2::<f32>().unwrap()[0].iter().all(|v| v.is_finite() && v.abs() < 1e-6));
        // Sizes that do not divide (a 5 x 5 map on 3 x 3 features, as at an odd input size):
        // the features weighted by the head cells each holds when the whole map is lesion, and
        // gradients for both inputs.
        let f = candle_core::Var::from_tensor(&Tensor::arange(0f32, 18.0, &d).unwrap().reshape((1, 2, 3, 3)).unwrap())
            .unwrap();
        let map = candle_core::Var::from_tensor(&Tensor::full(30f32, (1, 5, 5), &d).unwrap()).unwrap();
        let p = lesion_pooled(f.as_tensor(), map.as_tensor()).unwrap();
        let v = p.to_vec2::<f32>().unwrap();
        // Head rows and columns go to feature rows and columns 0, 0, 1, 1, 2: feature cell (r, c)
        // holds w[r] * w[c] of the 25 head cells.
        let w = [2.0f32, 2.0, 1.0];
        let want: f32 = (0..9).map(|k| w[k / 3] * w[k % 3] * k as f32).sum::<f32>() / 25.0;
        assert!((v[0][0] - want * 25.0 / (25.0 + 1e-3)).abs() < 1e-4, "{v:?} vs {want}");
        // The map's gradient is not zero once its cells differ (all 30 saturates the sigmoid).
        let map = candle_core::Var::from_tensor(
            &Tensor::arange(-2f32, 23.0, &d).unwrap().affine(0.2, 0.0).unwrap().reshape((1, 5, 5)).unwrap(),
        )
        .unwrap();
        let g = lesion_pooled(f.as_tensor(), map.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let norm = |t: &Tensor| g.get(t).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm(f.as_tensor()) > 0.0 && norm(map.as_tensor()) > 0.0);
    }

    #[test]
    fn the_pooled_logits_start_at_zero_and_exist_only_with_pooling() {
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let plain = MaskHead::new(3, Stage::Layer3, vb.pp(PREFIX)).unwrap();
        let f = Tensor::ones((2, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let map = Tensor::zeros((2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(!plain.pools() && plain.pooled_logits(&f, &map).unwrap().is_none());
        let pooled = plain.with_lesion_pooling(4, 5, vb.pp(PREFIX)).unwrap();
        assert!(pooled.pools());
        // It trains whenever the backbone does, like the head.
        assert!(crate::model::is_trainable("aux_mask.pool_fc", Stage::Conv1));
        assert!(!crate::model::is_trainable("aux_mask.pool_fc", Stage::Fc));
        assert!(vm.data().lock().unwrap().contains_key("aux_mask.pool_fc"));
        let l = pooled.pooled_logits(&f, &map).unwrap().unwrap();
        assert_eq!(l.dims(), &[2, 5]);
        assert_eq!(l.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn the_head_maps_features_to_one_logit_per_cell() {
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let head = MaskHead::new(3, Stage::Layer2, vb.pp(PREFIX)).unwrap();
        assert_eq!(head.stage(), Stage::Layer2);
        let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        assert!(names.iter().all(|n| is_head_var(n)), "{names:?}");
        let x = Tensor::ones((2, 3, 4, 5), DType::F32, &Device::Cpu).unwrap();
        let y = head.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 4, 5]);
        // Every cell is the sum of the weights (bias 0) for an all-ones input.
        let w: f32 = head.weight.sum_all().unwrap().to_scalar().unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(y.iter().all(|v| (v - w).abs() < 1e-5));
        assert!(!is_head_var("layer3.0.conv1.weight"));
        assert!(!is_head_var("aux_maskx.weight"));
    }

    #[test]
    fn the_cell_diagnosis_loss_weighs_each_cell_by_its_lesion_share() {
        let d = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &d);
        let plain = MaskHead::new(2, Stage::Layer3, vb.pp(PREFIX)).unwrap();
        let f = Tensor::ones((2, 2, 1, 2), DType::F32, &d).unwrap();
        assert!(plain.cell_logits(&f).unwrap().is_none());
        let head = plain.with_cell_classes(2, 3, vb.pp(PREFIX)).unwrap();
        assert!(crate::model::is_trainable("aux_mask.cell_fc", Stage::Conv1));
        assert_eq!(head.cell_logits(&f).unwrap().unwrap().dims(), &[2, 2, 3]);
        // Two images of two cells, three classes. Image 0 (label 2): cell 0 gives its label
        // probability e^2 / (e^2 + 2), cell 1 a uniform third; its lesion covers cell 0 fully and
        // half of cell 1. Image 1 (label 0) has no mask and counts for nothing.
        let logits =
            Tensor::new(&[[[0f32, 0.0, 2.0], [0.0, 0.0, 0.0]], [[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]]], &d).unwrap();
        let y = Tensor::new(&[2u32, 0], &d).unwrap();
        let shares = Tensor::new(&[[[1f32, 0.5]], [[0.0, 0.0]]], &d).unwrap();
        let present = Tensor::new(&[1f32, 0.0], &d).unwrap();
        let nll0 = -(2f32.exp() / (2f32.exp() + 2.0)).ln();
        let want = (nll0 + 0.5 * 3f32.ln()) / 1.5;
        let got = cell_class_loss(&logits, &y, &shares, &present).unwrap().to_scalar::<f32>().unwrap();
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // A cell outside the lesion does not count: a wrong confident cell 1 changes nothing when
        // its share is 0.
        let outside = Tensor::new(&[[[1f32, 0.0]], [[0.0, 0.0]]], &d).unwrap();
        let wrong =
            Tensor::new(&[[[0f32, 0.0, 2.0], [9.0, 0.0, 0.0]], [[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]]], &d).unwrap();
        let a = cell_class_loss(&logits, &y, &outside, &present).unwrap().to_scalar::<f32>().unwrap();
        let b = cell_class_loss(&wrong, &y, &outside, &present).unwrap().to_scalar::<f32>().unwrap();
        assert!((a - nll0).abs() < 1e-4 && (a - b).abs() < 1e-6, "{a} {b} {nll0}");
        // No mask in the batch: zero. And the loss trains the head's cell map.
        let none = Tensor::zeros(2, DType::F32, &d).unwrap();
        assert_eq!(cell_class_loss(&logits, &y, &shares, &none).unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let l = cell_class_loss(&head.cell_logits(&f).unwrap().unwrap(), &y, &shares, &present).unwrap();
        let g = l.backward().unwrap();
        let w = vm.data().lock().unwrap().get("aux_mask.cell_fc").unwrap().as_tensor().clone();
        assert!(g.get(&w).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    }
}
