//! The DCGAN generator and discriminator (Radford et al. 2016), sized for any resolution
//! 4 * 2^k, with optional class-specific last layers (a coupled GAN, after Liu and Tuzel 2016,
//! as Bisla et al. use for ISIC 2018's seven classes).
//!
//! Generator: a latent vector (N, L) goes through a 4x4 transposed convolution (stride 1, no
//! padding) to a 4x4 map, then transposed convolutions (kernel 4, stride 2, padding 1) that
//! double the side, each with batch norm and ReLU; the last one gives the image channels and a
//! tanh. Discriminator: convolutions (kernel 4, stride 2, padding 1) that halve the side, with
//! LeakyReLU 0.2 and batch norm on all but the first, then a 4x4 convolution (stride 1, no
//! padding) from the 4x4 map to one logit. No layer has a bias. Weights are drawn from
//! N(0, 0.02) and batch-norm scales from N(1, 0.02).
//!
//! With `heads > 1` the model is *coupled*: the generator's first layers are one set of weights
//! shared by every class, and its last `g_private_layers` layers exist once per class; the
//! discriminator's first layers are shared and its last `d_private_layers` layers (by default
//! only the final 4x4 logit convolution) exist once per class. One latent batch goes through the
//! shared generator layers once and then through every class's layers, so the same latent gives
//! corresponding images of every class.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use derm_core::nn::{batch_norm_dcgan, BatchNorm};
use derm_kernels::ops::ConvParams;
use serde::{Deserialize, Serialize};

/// The DCGAN weight initialisation: N(0, 0.02).
pub const DCGAN_INIT: Init = Init::Randn { mean: 0.0, stdev: 0.02 };

/// Shape of the generator and discriminator.
///
/// The number of stride-2 layers is `k = log2(size / 4)`. The generator uses `k` widths (from
/// the 4x4 map outward) and the discriminator `k` widths (from the image inward). When fewer
/// widths are given than the size needs, layers are added at the image end with half the
/// width of their neighbour (at least 4): this is how the paper extends the 64-pixel DCGAN to
/// 256 pixels. When more are given, the image-end ones are dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GanConfig {
    /// Length of the latent vector.
    pub latent: usize,
    /// Side of the square images in pixels: 4 * 2^k with k >= 1.
    pub size: usize,
    /// Image channels.
    pub channels: usize,
    /// Generator widths, from the 4x4 map outward (the image channels follow).
    pub g_widths: Vec<usize>,
    /// Discriminator widths, from the image inward (the logit follows).
    pub d_widths: Vec<usize>,
    /// Negative slope of the discriminator's LeakyReLU.
    pub leaky_slope: f64,
    /// Number of class heads: 1 for one GAN per class (decoupled), the number of classes for a
    /// coupled GAN.
    pub heads: usize,
    /// With several heads: the generator's last layers that exist once per class.
    pub g_private_layers: usize,
    /// With several heads: the discriminator's last layers that exist once per class.
    pub d_private_layers: usize,
}

impl Default for GanConfig {
    fn default() -> Self {
        GanConfig::paper()
    }
}

impl GanConfig {
    /// The authors' 256-pixel DCGAN: latent 10, generator widths 256, 128, 64, 32, 16, 8,
    /// discriminator widths 16, 32, 64, 128, 256, 512.
    pub fn paper() -> Self {
        GanConfig {
            latent: 10,
            size: 256,
            channels: 3,
            g_widths: vec![256, 128, 64, 32, 16, 8],
            d_widths: vec![16, 32, 64, 128, 256, 512],
            leaky_slope: 0.2,
            heads: 1,
            g_private_layers: 2,
            d_private_layers: 1,
        }
    }

    /// The peer reference's 64-pixel DCGAN (latent 100, generator 512, 256, 128, 64,
    /// discriminator 64, 128, 256, 512): 3,576,704 generator and 2,765,568 discriminator
    /// parameters.
    pub fn peer64() -> Self {
        GanConfig {
            latent: 100,
            size: 64,
            g_widths: vec![512, 256, 128, 64],
            d_widths: vec![64, 128, 256, 512],
            ..GanConfig::paper()
        }
    }

    /// A CPU-sized 64-pixel DCGAN: latent 32, generator 128, 64, 32, 16, discriminator 16, 32,
    /// 64, 128.
    pub fn small() -> Self {
        GanConfig {
            latent: 32,
            size: 64,
            g_widths: vec![128, 64, 32, 16],
            d_widths: vec![16, 32, 64, 128],
            ..GanConfig::paper()
        }
    }

    /// A preset by name (`paper`, `peer64` or `small`).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "paper" => Some(Self::paper()),
            "peer64" => Some(Self::peer64()),
            "small" => Some(Self::small()),
            _ => None,
        }
    }

    /// The name of the preset this shape is, if it is one (the number of heads aside: a
    /// coupled run sets it to its number of classes).
    pub fn preset_name(&self) -> Option<&'static str> {
        ["small", "peer64", "paper"]
            .into_iter()
            .find(|n| Self::preset(n).map(|p| GanConfig { heads: self.heads, ..p }).as_ref() == Some(self))
    }

    /// The number of stride-2 layers, `log2(size / 4)`.
    pub fn stride2_layers(&self) -> Result<usize> {
        let s = self.size;
        if s < 8 || !s.is_multiple_of(4) || !(s / 4).is_power_of_two() {
            candle_core::bail!("gan: size {s} is not 4 * 2^k with k >= 1 (8, 16, 32, 64, 128, 256, ...)")
        }
        Ok((s / 4).trailing_zeros() as usize)
    }

    /// The generator widths actually used at this size (see the type's documentation).
    pub fn resolved_g_widths(&self) -> Result<Vec<usize>> {
        let k = self.stride2_layers()?;
        if self.g_widths.is_empty() {
            candle_core::bail!("gan: g_widths is empty")
        }
        let mut w: Vec<usize> = self.g_widths.iter().copied().take(k).collect();
        while w.len() < k {
            let last = w.last().copied().unwrap_or(8);
            w.push((last / 2).max(4));
        }
        Ok(w)
    }

    /// The discriminator widths actually used at this size (see the type's documentation).
    pub fn resolved_d_widths(&self) -> Result<Vec<usize>> {
        let k = self.stride2_layers()?;
        if self.d_widths.is_empty() {
            candle_core::bail!("gan: d_widths is empty")
        }
        let skip = self.d_widths.len().saturating_sub(k);
        let mut w: Vec<usize> = self.d_widths[skip..].to_vec();
        while w.len() < k {
            let first = w.first().copied().unwrap_or(8);
            w.insert(0, (first / 2).max(4));
        }
        Ok(w)
    }

    /// Checks the configuration; the message says what is wrong.
    pub fn validate(&self) -> Result<()> {
        let k = self.stride2_layers()?;
        self.resolved_g_widths()?;
        self.resolved_d_widths()?;
        if self.latent == 0 || self.channels == 0 || self.heads == 0 {
            candle_core::bail!("gan: latent, channels and heads must be at least 1")
        }
        if self.heads > 1 {
            if self.g_private_layers == 0 || self.g_private_layers > k + 1 {
                candle_core::bail!("gan: g_private_layers must be 1..={} with {} heads", k + 1, self.heads)
            }
            if self.d_private_layers == 0 || self.d_private_layers > k + 1 {
                candle_core::bail!("gan: d_private_layers must be 1..={} with {} heads", k + 1, self.heads)
            }
        }
        Ok(())
    }

    fn private(&self, n: usize) -> usize {
        if self.heads > 1 {
            n.min(self.g_private_layers)
        } else {
            0
        }
    }

    fn d_private(&self, n: usize) -> usize {
        if self.heads > 1 {
            n.min(self.d_private_layers)
        } else {
            0
        }
    }
}

/// One generator layer: transposed convolution, then batch norm and ReLU, or tanh for the last.
#[derive(Debug, Clone)]
struct GLayer {
    /// Weight (C_in, C_out, 4, 4), PyTorch's `ConvTranspose2d` layout.
    weight: Tensor,
    first: bool,
    bn: Option<BatchNorm>,
}

impl GLayer {
    fn new(c_in: usize, c_out: usize, first: bool, last: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.pp("conv").get_with_hints((c_in, c_out, 4, 4), "weight", DCGAN_INIT)?;
        let bn = if last { None } else { Some(batch_norm_dcgan(c_out, vb.pp("bn"))?) };
        Ok(GLayer { weight, first, bn })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = if self.first {
            conv_transpose_4x4_from_1x1(x, &self.weight)?
        } else {
            conv_transpose_4x4_s2(x, &self.weight)?
        };
        match &self.bn {
            Some(bn) => derm_core::nn::bn_relu(bn, &y, train),
            None => y.tanh(),
        }
    }
}

/// A fast convolution: derm-kernels' GEMM convolution where it applies, candle's otherwise.
fn conv(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let x = x.contiguous()?;
    if derm_kernels::conv::supports(&x, w) {
        derm_kernels::conv::conv2d(&x, w, derm_kernels::conv::ConvSpec { padding, stride, dilation: 1 })
    } else {
        derm_kernels::ops::conv2d(&x, w, ConvParams { padding, stride, ..Default::default() })
    }
}

/// `ConvTranspose2d(k=4, stride 1, padding 0)` of a (N, C_in, 1, 1) input: a matrix product,
/// (N, C_in) x (C_in, C_out * 16), giving (N, C_out, 4, 4).
pub fn conv_transpose_4x4_from_1x1(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (ci, co, kh, kw) = w.dims4()?;
    let n = x.dim(0)?;
    x.reshape((n, ci))?.matmul(&w.reshape((ci, co * kh * kw))?)?.reshape((n, co, kh, kw))
}

/// `ConvTranspose2d(k=4, stride 2, padding 1)` (weight (C_in, C_out, 4, 4)).
///
/// On the CPU, derm-kernels' transposed convolution: one GEMM of the transposed kernel with the
/// input and a col2im with stride 2, backward as a strided convolution and its weight gradient.
///
/// Elsewhere, one ordinary 2x2 convolution with 4 * C_out outputs, one group per output parity,
/// then interleaved. Output row `2i` takes input rows `i - 1`, `i` with kernel rows 3, 1, and row
/// `2i + 1` takes rows `i`, `i + 1` with kernel rows 2, 0 (columns alike). So with the input
/// padded by one, a 2x2 convolution whose kernel rows are (3, 1) gives the even rows at offsets
/// 0..H and one with (2, 0) the odd rows at offsets 1..H+1. (It computes (H+1)(W+1) instead of
/// HW positions per parity, 56 % more work on a 4x4 input, which is why the CPU takes the GEMM
/// path: the DCGAN step measured 1340-1390 ms this way and 1235-1255 ms that way.)
pub fn conv_transpose_4x4_s2(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    if derm_kernels::conv::supports(&x, w) {
        let spec = derm_kernels::conv::ConvSpec { padding: 1, stride: 2, dilation: 1 };
        return derm_kernels::conv::conv_transpose2d(&x, w, spec, 0);
    }
    conv_transpose_4x4_by_parity(&x, w)
}

/// The parity form of [`conv_transpose_4x4_s2`].
fn conv_transpose_4x4_by_parity(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (ci, co, _, _) = w.dims4()?;
    let (_, _, h, wd) = x.dims4()?;
    let taps = Tensor::new(&[3u32, 1, 2, 0], w.device())?;
    // (ci, co, [a p], [b q]) -> (a, b, co, ci, p, q) -> (4 co, ci, 2, 2).
    let k = w.index_select(&taps, 2)?.index_select(&taps, 3)?;
    let k = k.reshape((ci, co, 2, 2, 2, 2))?.permute((2, 4, 1, 0, 3, 5))?.reshape((4 * co, ci, 2, 2))?;
    let y = conv(x, &k.contiguous()?, 1, 1)?; // (n, 4 co, h + 1, w + 1)
    derm_kernels::fused::parity_interleave(&y, co, h, wd)
}

/// One discriminator layer: convolution, then (batch norm and) LeakyReLU, or nothing for the
/// final logit convolution.
#[derive(Debug, Clone)]
struct DLayer {
    /// Weight (C_out, C_in, 4, 4).
    weight: Tensor,
    stride: usize,
    padding: usize,
    bn: Option<BatchNorm>,
    act: Option<f64>,
}

impl DLayer {
    fn new(c_in: usize, c_out: usize, kind: DKind, slope: f64, vb: VarBuilder) -> Result<Self> {
        let (stride, padding) = if kind == DKind::Final { (1, 0) } else { (2, 1) };
        let weight = vb.pp("conv").get_with_hints((c_out, c_in, 4, 4), "weight", DCGAN_INIT)?;
        let bn = if kind == DKind::Middle { Some(batch_norm_dcgan(c_out, vb.pp("bn"))?) } else { None };
        let act = if kind == DKind::Final { None } else { Some(slope) };
        Ok(DLayer { weight, stride, padding, bn, act })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = conv(x, &self.weight, self.padding, self.stride)?;
        if let Some(bn) = &self.bn {
            y = derm_core::nn::bn(bn, &y, train)?;
        }
        match self.act {
            Some(s) => derm_kernels::fused::leaky_relu(&y, s),
            None => Ok(y),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DKind {
    First,
    Middle,
    Final,
}

/// The generator: shared layers, then each head's own layers.
#[derive(Debug, Clone)]
pub struct Generator {
    latent: usize,
    shared: Vec<GLayer>,
    heads: Vec<Vec<GLayer>>,
}

impl Generator {
    /// Builds the generator under `vb` (names: `{i}.conv.weight`, `{i}.bn.*` for shared layer
    /// `i`, `head.{c}.{i}.*` for layer `i` of head `c`).
    pub fn new(cfg: &GanConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let widths = cfg.resolved_g_widths()?;
        let n = widths.len() + 1;
        let private = cfg.private(n);
        let dims = |i: usize| -> (usize, usize) {
            let c_in = if i == 0 { cfg.latent } else { widths[i - 1] };
            let c_out = if i == n - 1 { cfg.channels } else { widths[i] };
            (c_in, c_out)
        };
        let mut shared = Vec::new();
        for i in 0..n - private {
            let (a, b) = dims(i);
            shared.push(GLayer::new(a, b, i == 0, i == n - 1, vb.pp(i.to_string()))?);
        }
        let mut heads = Vec::new();
        if private > 0 {
            for c in 0..cfg.heads {
                let mut layers = Vec::new();
                for i in n - private..n {
                    let (a, b) = dims(i);
                    layers.push(GLayer::new(a, b, i == 0, i == n - 1, vb.pp(format!("head.{c}.{i}")))?);
                }
                heads.push(layers);
            }
        }
        Ok(Generator { latent: cfg.latent, shared, heads })
    }

    /// Number of heads (1 for a decoupled GAN).
    pub fn heads(&self) -> usize {
        self.heads.len().max(1)
    }

    /// Images of every head from one latent batch: `z` (N, L) or (N, L, 1, 1) gives one
    /// (N, C, S, S) tensor in [-1, 1] per head. The shared layers run once.
    pub fn forward_all(&self, z: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let mut x = self.prepare(z)?;
        for l in &self.shared {
            x = l.forward(&x, train)?;
        }
        if self.heads.is_empty() {
            return Ok(vec![x]);
        }
        self.heads
            .iter()
            .map(|layers| {
                let mut y = x.clone();
                for l in layers {
                    y = l.forward(&y, train)?;
                }
                Ok(y)
            })
            .collect()
    }

    /// Images (N, C, S, S) in [-1, 1] of head `head` for latents (N, L) or (N, L, 1, 1).
    pub fn forward_head(&self, z: &Tensor, head: usize, train: bool) -> Result<Tensor> {
        let mut x = self.prepare(z)?;
        for l in &self.shared {
            x = l.forward(&x, train)?;
        }
        if self.heads.is_empty() {
            if head != 0 {
                candle_core::bail!("generator: head {head} asked of a one-class generator")
            }
            return Ok(x);
        }
        let layers =
            self.heads.get(head).ok_or_else(|| candle_core::Error::Msg(format!("generator: no head {head}")))?;
        for l in layers {
            x = l.forward(&x, train)?;
        }
        Ok(x)
    }

    fn prepare(&self, z: &Tensor) -> Result<Tensor> {
        let n = z.dim(0)?;
        if z.elem_count() != n * self.latent {
            candle_core::bail!("generator: latents of shape {:?}, expected ({n}, {})", z.dims(), self.latent)
        }
        z.reshape((n, self.latent, 1, 1))
    }
}

/// What the discriminator says about a batch.
#[derive(Debug, Clone)]
pub struct DOutput {
    /// One logit per image, (N,).
    pub logits: Tensor,
    /// The activations that enter the final logit layer, flattened, (N, F): the intermediate
    /// features of feature matching.
    pub features: Tensor,
}

/// The discriminator: shared layers, then each head's own layers.
#[derive(Debug, Clone)]
pub struct Discriminator {
    shared: Vec<DLayer>,
    heads: Vec<Vec<DLayer>>,
}

impl Discriminator {
    /// Builds the discriminator under `vb` (names like the generator's).
    pub fn new(cfg: &GanConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let widths = cfg.resolved_d_widths()?;
        let n = widths.len() + 1;
        let private = cfg.d_private(n);
        let make = |i: usize, vb: VarBuilder| -> Result<DLayer> {
            let c_in = if i == 0 { cfg.channels } else { widths[i - 1] };
            let c_out = if i == n - 1 { 1 } else { widths[i] };
            let kind = if i == n - 1 {
                DKind::Final
            } else if i == 0 {
                DKind::First
            } else {
                DKind::Middle
            };
            DLayer::new(c_in, c_out, kind, cfg.leaky_slope, vb)
        };
        let mut shared = Vec::new();
        for i in 0..n - private {
            shared.push(make(i, vb.pp(i.to_string()))?);
        }
        let mut heads = Vec::new();
        if private > 0 {
            for c in 0..cfg.heads {
                let mut layers = Vec::new();
                for i in n - private..n {
                    layers.push(make(i, vb.pp(format!("head.{c}.{i}")))?);
                }
                heads.push(layers);
            }
        }
        Ok(Discriminator { shared, heads })
    }

    /// Judges images (N, C, S, S) in [-1, 1] with head `head`.
    pub fn forward_head(&self, x: &Tensor, head: usize, train: bool) -> Result<DOutput> {
        let mut out = self.forward_heads(std::slice::from_ref(x), train, Some(head))?;
        out.pop().ok_or_else(|| candle_core::Error::Msg("discriminator: no output".into()))
    }

    /// Judges a batch per head: `xs[c]` (N_c, C, S, S) with head `c` (or all with head
    /// `only` when given). The shared layers run once on the concatenated batch, so their
    /// batch-norm statistics are those of all the images together.
    pub fn forward_heads(&self, xs: &[Tensor], train: bool, only: Option<usize>) -> Result<Vec<DOutput>> {
        let sizes: Vec<usize> = xs.iter().map(|x| x.dim(0)).collect::<Result<_>>()?;
        let mut x = if xs.len() == 1 { xs[0].clone() } else { Tensor::cat(xs, 0)? };
        let total = self.shared.len() + self.heads.first().map_or(0, |h| h.len());
        let mut feats = None;
        for (i, l) in self.shared.iter().enumerate() {
            if i + 1 == total {
                feats = Some(x.clone());
            }
            x = l.forward(&x, train)?;
        }
        let mut outs = Vec::with_capacity(xs.len());
        let mut start = 0;
        for (c, &n) in sizes.iter().enumerate() {
            let mut y = x.narrow(0, start, n)?;
            let mut f = match &feats {
                Some(f) => Some(f.narrow(0, start, n)?),
                None => None,
            };
            start += n;
            if !self.heads.is_empty() {
                let h = only.unwrap_or(c);
                let layers =
                    self.heads.get(h).ok_or_else(|| candle_core::Error::Msg(format!("discriminator: no head {h}")))?;
                for (j, l) in layers.iter().enumerate() {
                    if j + 1 == layers.len() {
                        f = Some(y.clone());
                    }
                    y = l.forward(&y, train)?;
                }
            } else if only.is_some_and(|h| h != 0) {
                candle_core::bail!("discriminator: head {only:?} asked of a one-class discriminator")
            }
            let f = f.ok_or_else(|| candle_core::Error::Msg("discriminator: no features".into()))?;
            outs.push(DOutput { logits: y.flatten_all()?, features: f.flatten_from(1)? });
        }
        Ok(outs)
    }
}

pub use derm_core::nn::parameter_count;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn build(cfg: &GanConfig) -> (VarMap, Generator, Discriminator) {
        let vm = VarMap::new();
        let vb = derm_core::nn::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let g = Generator::new(cfg, vb.pp("g")).unwrap();
        let d = Discriminator::new(cfg, vb.pp("d")).unwrap();
        (vm, g, d)
    }

    #[test]
    fn fast_transposed_convolutions_match_candles() {
        let mut r = derm_core::Rng::new(3);
        let dev = Device::Cpu;
        let t = |shape: (usize, usize, usize, usize), r: &mut derm_core::Rng| {
            Tensor::from_vec(r.normal_vec(shape.0 * shape.1 * shape.2 * shape.3, 0.0, 1.0), shape, &dev).unwrap()
        };
        let close = |a: &Tensor, b: &Tensor| {
            assert_eq!(a.dims(), b.dims());
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "max difference {d}");
        };
        let (x, w) = (t((2, 5, 3, 6), &mut r), t((5, 4, 4, 4), &mut r));
        let (z, w0) = (t((3, 7, 1, 1), &mut r), t((7, 6, 4, 4), &mut r));
        close(&conv_transpose_4x4_from_1x1(&z, &w0).unwrap(), &z.conv_transpose2d(&w0, 0, 0, 1, 1).unwrap());
        let (xv, wv) = (candle_core::Var::from_tensor(&x).unwrap(), candle_core::Var::from_tensor(&w).unwrap());
        let rr = t((2, 4, 6, 12), &mut r);
        let gb = (xv.as_tensor().conv_transpose2d(wv.as_tensor(), 1, 0, 2, 1).unwrap() * &rr)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // The CPU path (GEMM + col2im) and the parity path used on other devices.
        let paths: [fn(&Tensor, &Tensor) -> Result<Tensor>; 2] = [conv_transpose_4x4_s2, conv_transpose_4x4_by_parity];
        for f in paths {
            close(&f(&x, &w).unwrap(), &x.conv_transpose2d(&w, 1, 0, 2, 1).unwrap());
            // Gradients agree too (loss = sum(y * R)).
            let ga = (f(xv.as_tensor(), wv.as_tensor()).unwrap() * &rr).unwrap().sum_all().unwrap().backward().unwrap();
            close(ga.get(xv.as_tensor()).unwrap(), gb.get(xv.as_tensor()).unwrap());
            close(ga.get(wv.as_tensor()).unwrap(), gb.get(wv.as_tensor()).unwrap());
        }
    }

    #[test]
    fn peer64_parameter_counts() {
        let (vm, g, d) = build(&GanConfig::peer64());
        assert_eq!(parameter_count(&vm, "g."), 3_576_704);
        assert_eq!(parameter_count(&vm, "d."), 2_765_568);
        let z = Tensor::zeros((2, 100), DType::F32, &Device::Cpu).unwrap();
        let x = g.forward_head(&z, 0, true).unwrap();
        assert_eq!(x.dims(), &[2, 3, 64, 64]);
        let o = d.forward_head(&x, 0, true).unwrap();
        assert_eq!(o.logits.dims(), &[2]);
        assert_eq!(o.features.dims(), &[2, 512 * 4 * 4]);
    }

    #[test]
    fn shapes_at_64_and_256() {
        for (cfg, n) in [
            (GanConfig::small(), 3),
            // The paper's layer structure at 256 pixels, with few channels to stay light.
            (GanConfig { g_widths: vec![8, 8, 4, 4, 4, 4], d_widths: vec![4, 4, 4, 4, 8, 8], ..GanConfig::paper() }, 1),
        ] {
            let (_, g, d) = build(&cfg);
            let z = Tensor::ones((n, cfg.latent), DType::F32, &Device::Cpu).unwrap();
            let x = g.forward_head(&z, 0, true).unwrap();
            assert_eq!(x.dims(), &[n, 3, cfg.size, cfg.size]);
            let v = x.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(v <= 1.0);
            let o = d.forward_head(&x, 0, false).unwrap();
            assert_eq!(o.logits.dims(), &[n]);
        }
        // The paper preset's widths and layer count at 256.
        let p = GanConfig::paper();
        assert_eq!(p.stride2_layers().unwrap(), 6);
        assert_eq!(p.resolved_g_widths().unwrap(), vec![256, 128, 64, 32, 16, 8]);
        // Asking for 512 pixels adds a layer at the image end of each network.
        let big = GanConfig { size: 512, ..GanConfig::paper() };
        assert_eq!(big.resolved_g_widths().unwrap(), vec![256, 128, 64, 32, 16, 8, 4]);
        assert_eq!(big.resolved_d_widths().unwrap(), vec![8, 16, 32, 64, 128, 256, 512]);
        let small = GanConfig { size: 32, ..GanConfig::paper() };
        assert_eq!(small.resolved_g_widths().unwrap(), vec![256, 128, 64]);
        assert_eq!(small.resolved_d_widths().unwrap(), vec![128, 256, 512]);
        assert!(GanConfig { size: 48, ..GanConfig::paper() }.validate().is_err());
    }

    #[test]
    fn coupled_model_shares_its_first_layers() {
        let cfg = GanConfig {
            size: 16,
            latent: 4,
            g_widths: vec![8, 4],
            d_widths: vec![4, 8],
            heads: 2,
            ..GanConfig::small()
        };
        let (vm, g, d) = build(&cfg);
        let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        // Generator layers 0 (shared) and 1, 2 (per class); discriminator 0, 1 shared, 2 per class.
        assert_eq!(names.iter().filter(|n| n.as_str() == "g.0.conv.weight").count(), 1);
        assert!(!names.iter().any(|n| n.starts_with("g.head.") && n.contains(".0.conv")));
        for c in 0..2 {
            assert!(names.contains(&format!("g.head.{c}.1.conv.weight")));
            assert!(names.contains(&format!("g.head.{c}.2.conv.weight")));
            assert!(names.contains(&format!("d.head.{c}.2.conv.weight")));
        }
        assert!(names.contains(&"d.1.conv.weight".to_string()));
        let z = Tensor::ones((3, 4), DType::F32, &Device::Cpu).unwrap();
        let xs = g.forward_all(&z, true).unwrap();
        assert_eq!(xs.len(), 2);
        let var = |n: &str| vm.data().lock().unwrap().get(n).unwrap().clone();
        let shared = var("g.0.conv.weight");
        let head1 = var("g.head.1.1.conv.weight");
        // A loss on class 0 alone, and one on class 1 alone, both reach the shared weights;
        // class 0's loss leaves class 1's layers alone.
        for c in 0..2 {
            let x = g.forward_head(&z, c, true).unwrap();
            let out = d.forward_head(&x, c, true).unwrap();
            let loss = derm_kernels::ops::bce_with_logits(&out.logits, &out.logits.ones_like().unwrap()).unwrap();
            let grads = loss.backward().unwrap();
            let gs =
                grads.get(shared.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(gs > 0.0, "class {c} does not reach the shared layer");
            let gd = grads
                .get(var("d.0.conv.weight").as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(gd > 0.0);
            assert_eq!(grads.get(head1.as_tensor()).is_some(), c == 1);
        }
        // One optimiser step on the sum of both classes' losses moves the shared weights once.
        let before = shared.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut opt = derm_core::optim::Optimizer::from_varmap(&vm, Default::default(), |n| n.starts_with("g."));
        let outs = d.forward_heads(&xs, true, None).unwrap();
        let loss = (derm_kernels::ops::bce_with_logits(&outs[0].logits, &outs[0].logits.ones_like().unwrap()).unwrap()
            + derm_kernels::ops::bce_with_logits(&outs[1].logits, &outs[1].logits.ones_like().unwrap()).unwrap())
        .unwrap();
        opt.backward_step(&loss).unwrap();
        let after = shared.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(before.iter().zip(&after).any(|(a, b)| a != b));
    }
}
