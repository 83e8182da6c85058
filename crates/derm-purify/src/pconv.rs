//! Partial convolution (Liu, Reda, Shih, Wang, Tao and Catanzaro, "Image Inpainting for Irregular
//! Holes Using Partial Convolutions", ECCV 2018).
//!
//! For a window `W` of the input `X` with binary validity mask `M` (1 = valid):
//!
//! ```text
//! x' = W^T (X ⊙ M) · sum(1) / sum(M) + b    where sum(M) > 0
//! x' = 0                                     otherwise
//! m' = 1 if sum(M) > 0 else 0
//! ```
//!
//! `sum(1)` is the window size `C_in * k * k` and `sum(M)` counts the valid entries of the window
//! over all input channels. The mask path is the cheap variant: the mask sum is one
//! single-channel convolution with a ones kernel of the channel-summed mask, which equals NVIDIA's
//! multi-channel reference (a full `ones(C_out, C_in, k, k)` convolution of the mask) for any
//! mask, since both sum over every input channel of the window. Masks carry no gradient.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use derm_core::nn::torch_default_init;
use derm_kernels::ops::{self, ConvParams};

/// A convolution (groups 1) through derm-kernels' GEMM convolution on the CPU (forward and both
/// gradients are GEMMs), or [`ops::conv2d`] elsewhere.
pub fn conv(x: &Tensor, w: &Tensor, p: ConvParams) -> Result<Tensor> {
    if derm_kernels::conv::supports(x, w) {
        let spec = derm_kernels::conv::ConvSpec { padding: p.padding, stride: p.stride, dilation: p.dilation };
        derm_kernels::conv::conv2d(x, w, spec)
    } else {
        ops::conv2d(x, w, p)
    }
}

/// Geometry of a [`PartialConv2d`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialConv2dConfig {
    /// Zero padding on each side (masks are padded with zeros, i.e. invalid).
    pub padding: usize,
    /// Stride.
    pub stride: usize,
    /// Whether the layer has a bias (Liu et al.: only where no batch norm follows).
    pub bias: bool,
}

impl Default for PartialConv2dConfig {
    fn default() -> Self {
        PartialConv2dConfig { padding: 0, stride: 1, bias: true }
    }
}

impl PartialConv2dConfig {
    /// Padding `k / 2` with stride `s`, as in the authors' U-Net.
    pub fn same(k: usize, stride: usize, bias: bool) -> Self {
        PartialConv2dConfig { padding: k / 2, stride, bias }
    }
}

/// A partial convolution: weight (C_out, C_in, k, k) and an optional bias.
#[derive(Debug, Clone)]
pub struct PartialConv2d {
    /// Weight, (C_out, C_in, k, k).
    pub weight: Tensor,
    /// Bias, (C_out,).
    pub bias: Option<Tensor>,
    cfg: PartialConv2dConfig,
    c_in: usize,
    k: usize,
}

/// Builds a [`PartialConv2d`] (`weight`, `bias`) under `vb`, initialised as PyTorch's `Conv2d`.
pub fn partial_conv2d(
    c_in: usize,
    c_out: usize,
    k: usize,
    cfg: PartialConv2dConfig,
    vb: VarBuilder,
) -> Result<PartialConv2d> {
    let init = torch_default_init(c_in * k * k);
    let weight = vb.get_with_hints((c_out, c_in, k, k), "weight", init)?;
    let bias = if cfg.bias { Some(vb.get_with_hints(c_out, "bias", init)?) } else { None };
    Ok(PartialConv2d { weight, bias, cfg, c_in, k })
}

impl PartialConv2d {
    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.c_in
    }

    fn params(&self) -> ConvParams {
        ConvParams { padding: self.cfg.padding, stride: self.cfg.stride, ..Default::default() }
    }

    /// The partial convolution of features `x` (N, C_in, H, W) under mask `mask`, either one mask
    /// shared by all channels (N, 1, H, W) or one per channel (N, C_in, H, W), 1 = valid.
    /// Returns the output (N, C_out, H', W') and the updated mask (N, 1, H', W').
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let mask = mask.detach();
        let c = mask.dim(1)?;
        let xm = x.broadcast_mul(&mask)?;
        let msum = if c == 1 { mask.affine(self.c_in as f64, 0.0)? } else { mask.sum_keepdim(1)? };
        self.forward_masked(&xm, &msum)
    }

    /// The partial convolution of already masked features `xm` = X ⊙ M (N, C_in, H, W), given
    /// the mask summed over channels `mask_sum` (N, 1, H, W). This is how a decoder feeds a
    /// concatenation of tensors with different masks without building a C_in-channel mask.
    /// Returns the output (N, C_out, H', W') and the updated mask (N, 1, H', W').
    pub fn forward_masked(&self, xm: &Tensor, mask_sum: &Tensor) -> Result<(Tensor, Tensor)> {
        let p = self.params();
        let ones = Tensor::ones((1, 1, self.k, self.k), xm.dtype(), xm.device())?;
        let msum = conv(&mask_sum.detach().to_dtype(xm.dtype())?, &ones, p)?;
        let update = msum.clamp(0.0, 1.0)?;
        let window = (self.c_in * self.k * self.k) as f64;
        // window / sum, zero where nothing was valid (the floor only avoids dividing by zero).
        let ratio = (msum.maximum(1e-8)?.recip()?.affine(window, 0.0)? * &update)?;
        let raw = conv(xm, &self.weight, p)?;
        let out = raw.broadcast_mul(&ratio)?;
        let out = match &self.bias {
            Some(b) => {
                let b = b.reshape((1, b.dim(0)?, 1, 1))?;
                out.broadcast_add(&b.broadcast_mul(&update)?)?
            }
            None => out,
        };
        Ok((out, update))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    fn layer(c_in: usize, c_out: usize, k: usize, cfg: PartialConv2dConfig, dtype: DType) -> PartialConv2d {
        let vm = VarMap::new();
        let vb = derm_core::nn::seeded_var_builder(&vm, 7, dtype, &Device::Cpu);
        partial_conv2d(c_in, c_out, k, cfg, vb).unwrap()
    }

    fn randn(shape: (usize, usize, usize, usize), seed: u64, dtype: DType) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v = derm_core::Rng::new(seed).normal_vec(n, 0.0, 1.0);
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    fn vals(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    #[test]
    fn fully_valid_window_equals_a_plain_convolution() {
        let cfg = PartialConv2dConfig { padding: 0, stride: 1, bias: true };
        let l = layer(2, 3, 3, cfg, DType::F64);
        let x = randn((1, 2, 5, 4), 1, DType::F64);
        let m = Tensor::ones((1, 1, 5, 4), DType::F64, &Device::Cpu).unwrap();
        let (y, um) = l.forward(&x, &m).unwrap();
        let plain = x
            .conv2d(&l.weight, 0, 1, 1, 1)
            .unwrap()
            .broadcast_add(&l.bias.as_ref().unwrap().reshape((1, 3, 1, 1)).unwrap())
            .unwrap();
        for (a, b) in vals(&y).iter().zip(vals(&plain)) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        assert!(vals(&um).iter().all(|&v| v == 1.0));
    }

    #[test]
    fn all_hole_window_gives_zero_and_an_invalid_mask() {
        let cfg = PartialConv2dConfig { padding: 0, stride: 1, bias: true };
        let l = layer(2, 3, 3, cfg, DType::F64);
        let x = randn((1, 2, 3, 6), 2, DType::F64);
        // Columns 0..3 are a hole: the first output column sees only hole pixels.
        let m = Tensor::from_vec(
            (0..18).map(|i| if i % 6 < 3 { 0.0 } else { 1.0 }).collect::<Vec<f64>>(),
            (1, 1, 3, 6),
            &Device::Cpu,
        )
        .unwrap();
        let (y, um) = l.forward(&x, &m).unwrap();
        let y4 = y.squeeze(0).unwrap().to_vec3::<f64>().unwrap();
        let um = um.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2::<f64>().unwrap();
        assert_eq!(um[0], vec![0.0, 1.0, 1.0, 1.0]);
        for ch in &y4 {
            assert_eq!(ch[0][0], 0.0, "output at an all-hole window, bias included");
            assert!(ch[0][1] != 0.0);
        }
    }

    #[test]
    fn half_valid_window_is_rescaled_by_window_over_valid() {
        // One input channel, 2x2 kernel, no padding: a single window of 4 entries, 2 valid.
        let cfg = PartialConv2dConfig { padding: 0, stride: 1, bias: true };
        let l = layer(1, 1, 2, cfg, DType::F64);
        let x = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 4.0], (1, 1, 2, 2), &Device::Cpu).unwrap();
        let m = Tensor::from_vec(vec![1.0f64, 0.0, 0.0, 1.0], (1, 1, 2, 2), &Device::Cpu).unwrap();
        let (y, um) = l.forward(&x, &m).unwrap();
        let w = vals(&l.weight);
        let b = vals(l.bias.as_ref().unwrap())[0];
        let expect = (w[0] * 1.0 + w[3] * 4.0) * 4.0 / 2.0 + b;
        assert!((vals(&y)[0] - expect).abs() < 1e-9, "{} vs {expect}", vals(&y)[0]);
        assert_eq!(vals(&um), vec![1.0]);
        // Per-channel masks are summed over channels like NVIDIA's multi-channel layer.
        let l2 = layer(2, 1, 1, PartialConv2dConfig { bias: false, ..cfg }, DType::F64);
        let x2 = Tensor::from_vec(vec![5.0f64, 7.0], (1, 2, 1, 1), &Device::Cpu).unwrap();
        let m2 = Tensor::from_vec(vec![1.0f64, 0.0], (1, 2, 1, 1), &Device::Cpu).unwrap();
        let (y2, _) = l2.forward(&x2, &m2).unwrap();
        let w2 = vals(&l2.weight);
        assert!((vals(&y2)[0] - w2[0] * 5.0 * 2.0).abs() < 1e-9);
    }

    #[test]
    fn gradients_match_finite_differences() {
        // f64, stride 2 on an odd, non-square input, with a hole and a bias.
        let cfg = PartialConv2dConfig { padding: 1, stride: 2, bias: true };
        let l = layer(2, 3, 3, cfg, DType::F64);
        let x = Var::from_tensor(&randn((2, 2, 7, 6), 3, DType::F64)).unwrap();
        let mv: Vec<f64> = (0..2 * 7 * 6).map(|i| if (i * 7) % 5 < 2 { 0.0 } else { 1.0 }).collect();
        let m = Tensor::from_vec(mv, (2, 1, 7, 6), &Device::Cpu).unwrap();
        let (y0, _) = l.forward(x.as_tensor(), &m).unwrap();
        let r = randn(y0.dims4().unwrap(), 4, DType::F64);
        let loss = |xx: &Tensor, w: &Tensor, b: &Tensor| -> f64 {
            let ll = PartialConv2d { weight: w.clone(), bias: Some(b.clone()), ..l.clone() };
            let (y, _) = ll.forward(xx, &m).unwrap();
            (y * &r).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let wv = Var::from_tensor(&l.weight).unwrap();
        let bv = Var::from_tensor(l.bias.as_ref().unwrap()).unwrap();
        let ll = PartialConv2d { weight: wv.as_tensor().clone(), bias: Some(bv.as_tensor().clone()), ..l.clone() };
        let (y, _) = ll.forward(x.as_tensor(), &m).unwrap();
        let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let eps = 1e-6;
        for (which, var) in [("x", &x), ("w", &wv), ("b", &bv)] {
            let g = vals(grads.get(var.as_tensor()).unwrap());
            let base = vals(var.as_tensor());
            let shape = var.as_tensor().shape().clone();
            let (mut num, mut den) = (0f64, 0f64);
            for i in 0..base.len() {
                let mut p = base.clone();
                p[i] += eps;
                let mut q = base.clone();
                q[i] -= eps;
                let tp = Tensor::from_vec(p, shape.clone(), &Device::Cpu).unwrap();
                let tq = Tensor::from_vec(q, shape.clone(), &Device::Cpu).unwrap();
                let (fp, fq) = match which {
                    "x" => (
                        loss(&tp, &l.weight, ll.bias.as_ref().unwrap()),
                        loss(&tq, &l.weight, ll.bias.as_ref().unwrap()),
                    ),
                    "w" => (
                        loss(x.as_tensor(), &tp, ll.bias.as_ref().unwrap()),
                        loss(x.as_tensor(), &tq, ll.bias.as_ref().unwrap()),
                    ),
                    _ => (loss(x.as_tensor(), &l.weight, &tp), loss(x.as_tensor(), &l.weight, &tq)),
                };
                let fd = (fp - fq) / (2.0 * eps);
                num += (fd - g[i]).powi(2);
                den += fd.powi(2);
            }
            let rel = (num / den.max(1e-30)).sqrt();
            assert!(rel < 1e-6, "{which}: relative error {rel}");
        }
    }
}
