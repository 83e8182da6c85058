//! Liu et al.'s inpainting loss: L1 on the known and on the hole pixels, total variation of the
//! composite on the hole's 1-pixel neighbourhood, and, with VGG16 weights, perceptual and style
//! terms on pool1..pool3 of the output and of the composite.

use candle_core::{DType, Tensor};
use derm_core::image_io::Normalize;
use derm_core::Result;
use derm_kernels::ops::ConvParams;
use serde::{Deserialize, Serialize};

use crate::model::composite;
use crate::vgg::Vgg16Features;

/// Weights of the loss terms (Liu et al.: 1, 6, 0.1, 0.05, 120).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossWeights {
    /// L1 on the known pixels.
    pub valid: f64,
    /// L1 on the hole pixels.
    pub hole: f64,
    /// Total variation of the composite on the hole's 1-pixel dilation.
    pub tv: f64,
    /// Perceptual loss (VGG16 pool1-pool3 of output and composite); needs VGG weights.
    pub perceptual: f64,
    /// Style loss (Gram matrices of the same features); needs VGG weights.
    pub style: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        LossWeights { valid: 1.0, hole: 6.0, tv: 0.1, perceptual: 0.05, style: 120.0 }
    }
}

/// The value of each term (unweighted) and the weighted total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LossParts {
    /// L1 on the known pixels.
    pub valid: f64,
    /// L1 on the hole pixels.
    pub hole: f64,
    /// Total variation.
    pub tv: f64,
    /// Perceptual term (none without VGG).
    pub perceptual: Option<f64>,
    /// Style term (none without VGG).
    pub style: Option<f64>,
    /// Weighted sum.
    pub total: f64,
}

/// The hole's 1-pixel dilation (N, 1, H, W): pixels whose 3x3 neighbourhood touches the hole.
pub fn hole_neighbourhood(valid: &Tensor) -> Result<Tensor> {
    let hole = valid.detach().affine(-1.0, 1.0)?;
    let ones = Tensor::ones((1, 1, 3, 3), hole.dtype(), hole.device())?;
    Ok(crate::pconv::conv(&hole, &ones, ConvParams { padding: 1, ..Default::default() })?.clamp(0.0, 1.0)?)
}

/// Total variation of `x` (N, C, H, W) over horizontally and vertically adjacent pixel pairs that
/// both lie in `region` (N, 1, H, W), each direction divided by the element count of `x`.
pub fn tv_in_region(x: &Tensor, region: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let n = x.elem_count() as f64;
    let r = region.detach();
    let mut total = Tensor::zeros((), x.dtype(), x.device())?;
    if w > 1 {
        let d = (x.narrow(3, 1, w - 1)? - x.narrow(3, 0, w - 1)?)?.abs()?;
        let m = (r.narrow(3, 1, w - 1)? * r.narrow(3, 0, w - 1)?)?;
        total = (total + d.broadcast_mul(&m)?.sum_all()?.affine(1.0 / n, 0.0)?)?;
    }
    if h > 1 {
        let d = (x.narrow(2, 1, h - 1)? - x.narrow(2, 0, h - 1)?)?.abs()?;
        let m = (r.narrow(2, 1, h - 1)? * r.narrow(2, 0, h - 1)?)?;
        total = (total + d.broadcast_mul(&m)?.sum_all()?.affine(1.0 / n, 0.0)?)?;
    }
    Ok(total)
}

/// Gram matrices (N, C, C) of features (N, C, H, W), normalised by C*H*W.
pub fn gram(f: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = f.dims4()?;
    let f = f.reshape((n, c, h * w))?;
    Ok(f.matmul(&f.t()?)?.affine(1.0 / (c * h * w) as f64, 0.0)?)
}

/// Images normalised with `norm` to ImageNet normalisation (VGG's input).
pub fn to_imagenet(x: &Tensor, norm: Normalize) -> Result<Tensor> {
    let im = Normalize::IMAGENET;
    let dev = x.device();
    // (x * std + mean - im_mean) / im_std, per channel.
    let scale: Vec<f32> = (0..3).map(|c| norm.std[c] / im.std[c]).collect();
    let shift: Vec<f32> = (0..3).map(|c| (norm.mean[c] - im.mean[c]) / im.std[c]).collect();
    let scale = Tensor::from_vec(scale, (1, 3, 1, 1), dev)?.to_dtype(x.dtype())?;
    let shift = Tensor::from_vec(shift, (1, 3, 1, 1), dev)?.to_dtype(x.dtype())?;
    Ok(x.broadcast_mul(&scale)?.broadcast_add(&shift)?)
}

fn l1(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a - b)?.abs()?.mean_all()?)
}

/// The loss terms of one batch as scalar tensors on the device, unread: a host read is a
/// synchronising copy on a GPU, so training keeps them and reads them at its evaluations
/// ([`LossTerms::read_all`], one copy for many steps).
#[derive(Debug, Clone)]
pub struct LossTerms {
    /// L1 on the known pixels.
    pub valid: Tensor,
    /// L1 on the hole pixels.
    pub hole: Tensor,
    /// Total variation.
    pub tv: Tensor,
    /// Perceptual and style terms (with VGG).
    pub vgg: Option<(Tensor, Tensor)>,
    /// Weighted sum (detached).
    pub total: Tensor,
}

impl LossTerms {
    /// The numbers.
    pub fn read(&self) -> Result<LossParts> {
        Ok(Self::read_all(std::slice::from_ref(self))?.remove(0))
    }

    /// The numbers of many batches, read in one copy.
    pub fn read_all(terms: &[LossTerms]) -> Result<Vec<LossParts>> {
        if terms.is_empty() {
            return Ok(Vec::new());
        }
        let mut all = Vec::with_capacity(terms.len() * 6);
        for t in terms {
            all.extend([&t.valid, &t.hole, &t.tv, &t.total]);
            if let Some((p, s)) = &t.vgg {
                all.extend([p, s]);
            }
        }
        let all = all.iter().map(|t| t.to_dtype(DType::F32)?.flatten_all()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = Tensor::cat(&all, 0)?.to_vec1::<f32>()?;
        let mut at = v.into_iter().map(f64::from);
        let mut next = || at.next().unwrap_or(f64::NAN);
        Ok(terms
            .iter()
            .map(|t| {
                let (valid, hole, tv, total) = (next(), next(), next(), next());
                let (perceptual, style) = match t.vgg {
                    Some(_) => (Some(next()), Some(next())),
                    None => (None, None),
                };
                LossParts { valid, hole, tv, perceptual, style, total }
            })
            .collect())
    }
}

/// The loss of output `out` for ground truth `target` (both (N, 3, H, W) normalised with
/// `norm`) and validity mask `valid` (N, 1, H, W), 1 = known. Returns the scalar loss and its
/// terms (unread).
pub fn inpainting_loss(
    out: &Tensor,
    target: &Tensor,
    valid: &Tensor,
    w: &LossWeights,
    vgg: Option<&Vgg16Features>,
    norm: Normalize,
) -> Result<(Tensor, LossTerms)> {
    let target = target.detach();
    let valid = valid.detach().to_dtype(out.dtype())?;
    let hole = valid.affine(-1.0, 1.0)?;
    let diff = (out - &target)?.abs()?;
    let l_valid = diff.broadcast_mul(&valid)?.mean_all()?;
    let l_hole = diff.broadcast_mul(&hole)?.mean_all()?;
    let comp = composite(&target, out, &valid)?;
    let l_tv = tv_in_region(&comp, &hole_neighbourhood(&valid)?)?;
    let mut total = ((l_valid.affine(w.valid, 0.0)? + l_hole.affine(w.hole, 0.0)?)? + l_tv.affine(w.tv, 0.0)?)?;
    let mut vgg_terms = None;
    if let Some(vgg) = vgg {
        let n = out.dim(0)?;
        let all = Tensor::cat(&[out, &comp, &target], 0)?;
        let feats = vgg.forward(&to_imagenet(&all.to_dtype(DType::F32)?, norm)?)?;
        let mut perc = Tensor::zeros((), DType::F32, out.device())?;
        let mut style = Tensor::zeros((), DType::F32, out.device())?;
        for f in &feats {
            let (fo, fc, fg) = (f.narrow(0, 0, n)?, f.narrow(0, n, n)?, f.narrow(0, 2 * n, n)?.detach());
            perc = ((perc + l1(&fo, &fg)?)? + l1(&fc, &fg)?)?;
            let gg = gram(&fg)?;
            style = ((style + l1(&gram(&fo)?, &gg)?)? + l1(&gram(&fc)?, &gg)?)?;
        }
        let extra = (perc.affine(w.perceptual, 0.0)? + style.affine(w.style, 0.0)?)?.to_dtype(out.dtype())?;
        total = (total + extra)?;
        vgg_terms = Some((perc.detach(), style.detach()));
    }
    let terms = LossTerms {
        valid: l_valid.detach(),
        hole: l_hole.detach(),
        tv: l_tv.detach(),
        vgg: vgg_terms,
        total: total.detach(),
    };
    Ok((total, terms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn tv_counts_only_pairs_inside_the_hole_neighbourhood() {
        // 1x1x1x6 row, hole at x = 3: the neighbourhood is x = 2..=4.
        let x = Tensor::from_vec(vec![0f32, 10.0, 1.0, 3.0, 6.0, 100.0], (1, 1, 1, 6), &Device::Cpu).unwrap();
        let valid = Tensor::from_vec(vec![1f32, 1.0, 1.0, 0.0, 1.0, 1.0], (1, 1, 1, 6), &Device::Cpu).unwrap();
        let r = hole_neighbourhood(&valid).unwrap();
        assert_eq!(r.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0.0, 0.0, 1.0, 1.0, 1.0, 0.0]);
        let tv = tv_in_region(&x, &r).unwrap().to_scalar::<f32>().unwrap();
        assert!((tv - (2.0 + 3.0) / 6.0).abs() < 1e-6, "{tv}");
    }

    #[test]
    fn loss_is_zero_for_a_perfect_output_and_weights_the_hole() {
        let t = Tensor::rand(-1f32, 1., (2, 3, 8, 8), &Device::Cpu).unwrap();
        let mv: Vec<f32> = (0..128).map(|i| if i % 8 < 3 { 0.0 } else { 1.0 }).collect();
        let m = Tensor::from_vec(mv, (2, 1, 8, 8), &Device::Cpu).unwrap();
        let w = LossWeights::default();
        let p = inpainting_loss(&t, &t, &m, &w, None, Normalize::HALF).unwrap().1.read().unwrap();
        assert!(p.valid == 0.0 && p.hole == 0.0 && p.perceptual.is_none());
        let out = (&t + 0.5).unwrap();
        let (l, p) = inpainting_loss(&out, &t, &m, &w, None, Normalize::HALF).unwrap();
        let p = p.read().unwrap();
        assert!((p.hole - 0.5 * 3.0 / 8.0).abs() < 1e-5 && (p.valid - 0.5 * 5.0 / 8.0).abs() < 1e-5, "{p:?}");
        assert!((l.to_scalar::<f32>().unwrap() as f64 - p.total).abs() < 1e-5);
    }

    #[test]
    fn vgg_terms_are_computed_and_reach_the_output() {
        let mut t = std::collections::HashMap::new();
        for block in crate::vgg::VGG16_BLOCKS.iter().take(3) {
            for &(i, c_in, c_out) in block.iter() {
                t.insert(
                    format!("features.{i}.weight"),
                    Tensor::rand(-0.1f32, 0.1, (c_out, c_in, 3, 3), &Device::Cpu).unwrap(),
                );
                t.insert(format!("features.{i}.bias"), Tensor::rand(0f32, 0.1, c_out, &Device::Cpu).unwrap());
            }
        }
        let vgg = Vgg16Features::from_tensors(&t, 3, std::path::Path::new("fake")).unwrap();
        let target = Tensor::rand(-1f32, 1., (2, 3, 16, 16), &Device::Cpu).unwrap();
        let out =
            candle_core::Var::from_tensor(&Tensor::rand(-1f32, 1., (2, 3, 16, 16), &Device::Cpu).unwrap()).unwrap();
        let mv: Vec<f32> = (0..512).map(|i| if i % 16 < 6 { 0.0 } else { 1.0 }).collect();
        let m = Tensor::from_vec(mv, (2, 1, 16, 16), &Device::Cpu).unwrap();
        let (l, p) =
            inpainting_loss(out.as_tensor(), &target, &m, &LossWeights::default(), Some(&vgg), Normalize::HALF)
                .unwrap();
        let p = p.read().unwrap();
        assert!(p.perceptual.unwrap() > 0.0 && p.style.unwrap() > 0.0, "{p:?}");
        let g = l.backward().unwrap();
        let gv = g.get(out.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(gv > 0.0);
    }
}
