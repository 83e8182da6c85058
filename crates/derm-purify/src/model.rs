//! The partial-convolution U-Net of Liu et al. (ECCV 2018).
//!
//! Encoder: partial convolutions with stride 2 (the authors' kernels 7, 5, 5, 3, 3, 3, 3 and
//! widths 64, 128, 256, 512, 512, 512, 512 for 256x256 input), batch norm on all but the first,
//! ReLU. Decoder, deepest first: nearest x2 upsampling of the features and of the mask,
//! concatenation with the skip of the same resolution (features and masks; the last skip is the
//! input image with its mask), a 3x3 partial convolution with batch norm and LeakyReLU 0.2; the
//! last one gives 3 channels with a bias and no batch norm or activation. A layer has a bias only
//! where no batch norm follows. Any input size works: image and mask are padded to a multiple of
//! 2^depth (the padding is a hole) and the output is cropped back.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use derm_core::nn::{batch_norm, BatchNorm};
use derm_kernels::ops;
use serde::{Deserialize, Serialize};

use crate::pconv::{partial_conv2d, PartialConv2d, PartialConv2dConfig};

/// Shape of the partial-convolution U-Net.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PConvUNetConfig {
    /// Image channels (3 for RGB); also the output's channels.
    pub in_channels: usize,
    /// Width of each stride-2 encoder layer, shallowest first. The depth is its length.
    pub widths: Vec<usize>,
    /// Kernel size of each encoder layer (same length as `widths`).
    pub kernels: Vec<usize>,
    /// Negative slope of the decoder's LeakyReLU.
    pub leaky_slope: f64,
}

impl Default for PConvUNetConfig {
    fn default() -> Self {
        PConvUNetConfig::small()
    }
}

impl PConvUNetConfig {
    /// Liu et al.'s network for 256x256 input: 7 layers, kernels 7,5,5,3,3,3,3, widths
    /// 64,128,256,512,512,512,512.
    pub fn paper() -> Self {
        PConvUNetConfig {
            in_channels: 3,
            widths: vec![64, 128, 256, 512, 512, 512, 512],
            kernels: vec![7, 5, 5, 3, 3, 3, 3],
            leaky_slope: 0.2,
        }
    }
    /// The peer benchmark's 5-layer version (kernels 7,5,5,3,3, widths 64,128,256,512,512;
    /// 11,619,988 parameters).
    pub fn peer() -> Self {
        PConvUNetConfig {
            in_channels: 3,
            widths: vec![64, 128, 256, 512, 512],
            kernels: vec![7, 5, 5, 3, 3],
            leaky_slope: 0.2,
        }
    }
    /// A CPU-sized version: 4 layers, kernels 7,5,5,3, widths 32,64,128,128.
    pub fn small() -> Self {
        PConvUNetConfig { in_channels: 3, widths: vec![32, 64, 128, 128], kernels: vec![7, 5, 5, 3], leaky_slope: 0.2 }
    }
    /// A preset by name: `paper`, `peer` or `small`.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "paper" => Some(Self::paper()),
            "peer" => Some(Self::peer()),
            "small" => Some(Self::small()),
            _ => None,
        }
    }
    /// The name of the preset this shape is, if it is one.
    pub fn preset_name(&self) -> Option<&'static str> {
        ["small", "peer", "paper"].into_iter().find(|n| Self::preset(n).as_ref() == Some(self))
    }
    /// Number of stride-2 layers.
    pub fn depth(&self) -> usize {
        self.widths.len()
    }
}

/// How the batch norms run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnMode {
    /// Batch statistics everywhere (training).
    Train,
    /// Running statistics everywhere (inference).
    Eval,
    /// Running statistics in the encoder, batch statistics in the decoder (Liu et al.'s
    /// fine-tuning).
    FreezeEncoder,
}

#[derive(Debug, Clone, Copy)]
enum Act {
    Relu,
    Leaky(f64),
    None,
}

/// Partial convolution, optional batch norm, activation.
#[derive(Debug, Clone)]
struct PcbActiv {
    conv: PartialConv2d,
    bn: Option<BatchNorm>,
    act: Act,
}

impl PcbActiv {
    fn new(c_in: usize, c_out: usize, k: usize, stride: usize, use_bn: bool, act: Act, vb: VarBuilder) -> Result<Self> {
        let conv = partial_conv2d(c_in, c_out, k, PartialConv2dConfig::same(k, stride, !use_bn), vb.pp("conv"))?;
        let bn = if use_bn { Some(batch_norm(c_out, vb.pp("bn"))?) } else { None };
        Ok(PcbActiv { conv, bn, act })
    }
    fn post(&self, h: Tensor, train: bool) -> Result<Tensor> {
        match (&self.bn, self.act) {
            (Some(bn), Act::Relu) => derm_core::nn::bn_relu(bn, &h, train),
            (Some(bn), act) => apply(act, derm_core::nn::bn(bn, &h, train)?),
            (None, act) => apply(act, h),
        }
    }
}

/// The partial-convolution U-Net.
#[derive(Debug, Clone)]
pub struct PConvUNet {
    cfg: PConvUNetConfig,
    enc: Vec<PcbActiv>,
    dec: Vec<PcbActiv>,
}

impl PConvUNet {
    /// Builds the network under `vb` (names `enc.{i}.conv.{weight,bias}`, `enc.{i}.bn.*`,
    /// `dec.{j}.*` with `dec.0` the deepest, as the peer's PyTorch module).
    pub fn new(cfg: &PConvUNetConfig, vb: VarBuilder) -> Result<Self> {
        let l = cfg.depth();
        if l == 0 || cfg.kernels.len() != l {
            candle_core::bail!(
                "pconv unet: {} widths and {} kernels; need the same positive number",
                l,
                cfg.kernels.len()
            )
        }
        if cfg.kernels.iter().any(|&k| k == 0 || k % 2 == 0) {
            candle_core::bail!("pconv unet: kernels must be odd, got {:?}", cfg.kernels)
        }
        let mut enc = Vec::with_capacity(l);
        let mut c = cfg.in_channels;
        for i in 0..l {
            enc.push(PcbActiv::new(c, cfg.widths[i], cfg.kernels[i], 2, i > 0, Act::Relu, vb.pp(format!("enc.{i}")))?);
            c = cfg.widths[i];
        }
        // Channels of the skip at each resolution: the input, then each encoder output.
        let skip: Vec<usize> = std::iter::once(cfg.in_channels).chain(cfg.widths.iter().copied()).collect();
        let mut dec = Vec::with_capacity(l);
        for (j, i) in (0..l).rev().enumerate() {
            let last = i == 0;
            let out = skip[i];
            let act = if last { Act::None } else { Act::Leaky(cfg.leaky_slope) };
            dec.push(PcbActiv::new(c + skip[i], out, 3, 1, !last, act, vb.pp(format!("dec.{j}")))?);
            c = out;
        }
        Ok(PConvUNet { cfg: cfg.clone(), enc, dec })
    }

    /// The configuration.
    pub fn config(&self) -> &PConvUNetConfig {
        &self.cfg
    }

    /// The raw network output (N, C, H, W) for image `x` (N, C, H, W) and validity mask `valid`
    /// (N, 1, H, W), 1 = known pixel, 0 = hole. Pixels of `x` in the hole are never read. Any H
    /// and W.
    pub fn forward_t(&self, x: &Tensor, valid: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_mode(x, valid, if train { BnMode::Train } else { BnMode::Eval })
    }

    /// [`PConvUNet::forward_t`] with an explicit batch-norm mode.
    pub fn forward_mode(&self, x: &Tensor, valid: &Tensor, mode: BnMode) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let m = 1usize << self.cfg.depth();
        let (ph, pw) = (h.div_ceil(m) * m - h, w.div_ceil(m) * m - w);
        let pad = |t: &Tensor| -> Result<Tensor> {
            if ph > 0 || pw > 0 {
                t.pad_with_zeros(2, 0, ph)?.pad_with_zeros(3, 0, pw)
            } else {
                Ok(t.clone())
            }
        };
        let (enc_train, dec_train) = match mode {
            BnMode::Train => (true, true),
            BnMode::Eval => (false, false),
            BnMode::FreezeEncoder => (false, true),
        };
        let mut hcur = pad(x)?;
        let mut mcur = pad(&valid.detach().to_dtype(x.dtype())?)?;
        let mut hs = vec![hcur.clone()];
        let mut ms = vec![mcur.clone()];
        for e in &self.enc {
            let (o, um) = e.conv.forward(&hcur, &mcur)?;
            hcur = e.post(o, enc_train)?;
            mcur = um;
            hs.push(hcur.clone());
            ms.push(mcur.clone());
        }
        let missing = || candle_core::Error::Msg("pconv unet: skip stack empty".into());
        hs.pop();
        ms.pop();
        for d in &self.dec {
            let skip = hs.pop().ok_or_else(missing)?;
            let mskip = ms.pop().ok_or_else(missing)?;
            let up = ops::upsample_nearest(&hcur, 2)?;
            let mup = ops::upsample_nearest(&mcur, 2)?;
            let (cu, cs) = (up.dim(1)?, skip.dim(1)?);
            let xm = Tensor::cat(&[&up.broadcast_mul(&mup)?, &skip.broadcast_mul(&mskip)?], 1)?;
            let msum = (mup.affine(cu as f64, 0.0)? + mskip.affine(cs as f64, 0.0)?)?;
            let (o, um) = d.conv.forward_masked(&xm, &msum)?;
            hcur = d.post(o, dec_train)?;
            mcur = um;
        }
        if ph > 0 || pw > 0 {
            hcur = hcur.narrow(2, 0, h)?.narrow(3, 0, w)?;
        }
        Ok(hcur)
    }
}

/// Liu et al.'s composite: the network's output inside the hole, the input outside it.
/// `x` and `out` (N, C, H, W), `valid` (N, 1, H, W) with 1 = known.
pub fn composite(x: &Tensor, out: &Tensor, valid: &Tensor) -> Result<Tensor> {
    let valid = valid.detach().to_dtype(x.dtype())?;
    let keep = valid.broadcast_as(x.shape())?.ge(0.5)?;
    keep.where_cond(x, out)
}

/// Applies an activation (fused kernels on the CPU).
fn apply(act: Act, h: Tensor) -> Result<Tensor> {
    match act {
        Act::Relu => derm_kernels::fused::relu(&h),
        Act::Leaky(s) => derm_kernels::fused::leaky_relu(&h, s),
        Act::None => Ok(h),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn params(vm: &VarMap) -> usize {
        derm_core::nn::parameter_count(vm, "")
    }

    #[test]
    fn peer_preset_has_the_peer_parameter_count() {
        let vm = VarMap::new();
        let vb = derm_core::nn::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let net = PConvUNet::new(&PConvUNetConfig::peer(), vb).unwrap();
        assert_eq!(params(&vm), 11_619_988);
        assert_eq!(net.config().depth(), 5);
        // Names follow the peer's PyTorch module.
        let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        assert!(names.contains(&"enc.0.conv.bias".to_string()));
        assert!(!names.contains(&"enc.1.conv.bias".to_string()));
        assert!(names.contains(&"dec.4.conv.bias".to_string()));
        assert!(names.contains(&"dec.0.bn.running_var".to_string()));
    }

    #[test]
    fn shapes_at_odd_sizes_and_composite_keeps_known_pixels() {
        let cfg = PConvUNetConfig { in_channels: 3, widths: vec![4, 8, 8], kernels: vec![7, 5, 3], leaky_slope: 0.2 };
        let vm = VarMap::new();
        let vb = derm_core::nn::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let net = PConvUNet::new(&cfg, vb).unwrap();
        for (h, w) in [(17, 23), (32, 32), (9, 40)] {
            let x = Tensor::rand(-1f32, 1f32, (2, 3, h, w), &Device::Cpu).unwrap();
            let mv: Vec<f32> = (0..2 * h * w).map(|i| if (i / 3) % 4 == 0 { 0.0 } else { 1.0 }).collect();
            let m = Tensor::from_vec(mv.clone(), (2, 1, h, w), &Device::Cpu).unwrap();
            for mode in [BnMode::Train, BnMode::Eval, BnMode::FreezeEncoder] {
                let y = net.forward_mode(&x, &m, mode).unwrap();
                assert_eq!(y.dims(), &[2, 3, h, w]);
            }
            let y = net.forward_t(&x, &m, false).unwrap();
            let c = composite(&x, &y, &m).unwrap();
            let (xv, yv, cv) = (
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                c.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            for i in 0..cv.len() {
                let (n, p) = (i / (3 * h * w), i % (h * w));
                if mv[n * h * w + p] == 1.0 {
                    assert_eq!(cv[i].to_bits(), xv[i].to_bits());
                } else {
                    assert_eq!(cv[i].to_bits(), yv[i].to_bits());
                }
            }
        }
    }

    #[test]
    fn hole_pixels_are_never_read() {
        let cfg = PConvUNetConfig { in_channels: 3, widths: vec![4, 8], kernels: vec![5, 3], leaky_slope: 0.2 };
        let vm = VarMap::new();
        let vb = derm_core::nn::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let net = PConvUNet::new(&cfg, vb).unwrap();
        let x = Tensor::rand(-1f32, 1f32, (1, 3, 12, 12), &Device::Cpu).unwrap();
        let mv: Vec<f32> = (0..144).map(|i| if (3..7).contains(&(i % 12)) { 0.0 } else { 1.0 }).collect();
        let m = Tensor::from_vec(mv, (1, 1, 12, 12), &Device::Cpu).unwrap();
        let junk = (x.clone()
            + m.affine(-1.0, 1.0)
                .unwrap()
                .broadcast_mul(&Tensor::full(50f32, (1, 3, 12, 12), &Device::Cpu).unwrap())
                .unwrap())
        .unwrap();
        let a = net.forward_t(&x, &m, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = net.forward_t(&junk, &m, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
    }
}
