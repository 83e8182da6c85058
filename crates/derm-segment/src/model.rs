//! The dilated U-Net (Ronneberger et al. 2015, with the dilated bottleneck of Bisla et al.).
//!
//! Encoder levels of two 3x3 convolutions (batch norm, ReLU) and 2x2 max pooling; a bottleneck of
//! dilated 3x3 convolutions (the paper: 256->512 d2, 512->512 d2, 512->1024 d4, 1024->1024 d4);
//! a mirrored decoder of nearest upsampling, concatenation with the skip, and two 3x3
//! convolutions; a 1x1 convolution to one logit. Any input size works: the input is padded to a
//! multiple of 2^levels and the logits cropped back.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use derm_core::nn::{batch_norm, conv2d, BatchNorm, Conv2d, Conv2dConfig};
use derm_kernels::ops::{self, Pool2d};
use serde::{Deserialize, Serialize};

/// Shape of the U-Net.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UNetConfig {
    /// Input channels (3 for RGB).
    pub in_channels: usize,
    /// Width of each encoder level, shallowest first (one max pooling after each).
    pub widths: Vec<usize>,
    /// Bottleneck convolutions as (width, dilation).
    pub bottleneck: Vec<(usize, usize)>,
    /// Batch norm after each convolution.
    pub batch_norm: bool,
}

impl Default for UNetConfig {
    /// The paper's shape (the authors' public code).
    fn default() -> Self {
        UNetConfig::paper()
    }
}

impl UNetConfig {
    /// The authors' shape: 64/128/256, bottleneck 512 d2, 512 d2, 1024 d4, 1024 d4.
    pub fn paper() -> Self {
        UNetConfig {
            in_channels: 3,
            widths: vec![64, 128, 256],
            bottleneck: vec![(512, 2), (512, 2), (1024, 4), (1024, 4)],
            batch_norm: true,
        }
    }
    /// A CPU-sized version with the same structure: 16/32/64, bottleneck 128 d2, 128 d2, 128 d4,
    /// 128 d4.
    pub fn small() -> Self {
        UNetConfig {
            in_channels: 3,
            widths: vec![16, 32, 64],
            bottleneck: vec![(128, 2), (128, 2), (128, 4), (128, 4)],
            batch_norm: true,
        }
    }
    /// The small shape at 1.5 times the width: 24/48/96, bottleneck 192 d2, 192 d2, 192 d4,
    /// 192 d4. About 1.7 times the small preset's CPU time per step, and ahead of it on real
    /// images at 10 and at 40 CPU minutes (BENCHMARKS.md); the default.
    pub fn medium() -> Self {
        UNetConfig {
            in_channels: 3,
            widths: vec![24, 48, 96],
            bottleneck: vec![(192, 2), (192, 2), (192, 4), (192, 4)],
            batch_norm: true,
        }
    }
    /// A preset by name (`paper`, `medium` or `small`).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "paper" => Some(Self::paper()),
            "medium" => Some(Self::medium()),
            "small" => Some(Self::small()),
            _ => None,
        }
    }
    /// The name of the preset this shape is, if it is one.
    pub fn preset_name(&self) -> Option<&'static str> {
        ["small", "medium", "paper"].into_iter().find(|n| Self::preset(n).as_ref() == Some(self))
    }
}

/// Convolution, optional batch norm, ReLU.
#[derive(Debug, Clone)]
struct ConvBnRelu {
    conv: Conv2d,
    bn: Option<BatchNorm>,
}

impl ConvBnRelu {
    fn new(c_in: usize, c_out: usize, dilation: usize, use_bn: bool, vb: VarBuilder) -> Result<Self> {
        let mut cfg = Conv2dConfig::same(3, dilation);
        cfg.bias = !use_bn;
        let conv = conv2d(c_in, c_out, 3, cfg, vb.pp("conv"))?;
        let bn = if use_bn { Some(batch_norm(c_out, vb.pp("bn"))?) } else { None };
        Ok(ConvBnRelu { conv, bn })
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match &self.bn {
            Some(bn) => bn.forward_conv_t(&self.conv, x, train, true),
            None => self.conv.forward_relu(x),
        }
    }
}

/// Two [`ConvBnRelu`]s.
#[derive(Debug, Clone)]
struct DoubleConv(ConvBnRelu, ConvBnRelu);

impl DoubleConv {
    fn new(c_in: usize, c_out: usize, use_bn: bool, vb: VarBuilder) -> Result<Self> {
        Ok(DoubleConv(
            ConvBnRelu::new(c_in, c_out, 1, use_bn, vb.pp("0"))?,
            ConvBnRelu::new(c_out, c_out, 1, use_bn, vb.pp("1"))?,
        ))
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.1.forward(&self.0.forward(x, train)?, train)
    }
}

/// The dilated U-Net.
#[derive(Debug, Clone)]
pub struct UNet {
    cfg: UNetConfig,
    down: Vec<DoubleConv>,
    bottleneck: Vec<ConvBnRelu>,
    up: Vec<DoubleConv>,
    head: Conv2d,
}

/// Feature maps of one forward pass, for VisualBackProp: the ReLU output of each encoder level,
/// the bottleneck, and each decoder level, in forward order.
pub struct Features {
    /// The logits, (N, 1, H, W).
    pub logits: Tensor,
    /// Stage outputs (after ReLU), encoder first.
    pub stages: Vec<Tensor>,
}

impl UNet {
    /// Builds the network under `vb` (names: `down.{i}.{0,1}.{conv,bn}`, `mid.{j}`, `up.{i}`,
    /// `head`).
    pub fn new(cfg: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.widths.is_empty() {
            candle_core::bail!("unet: at least one encoder level is needed")
        }
        let mut down = Vec::new();
        let mut c = cfg.in_channels;
        for (i, &w) in cfg.widths.iter().enumerate() {
            down.push(DoubleConv::new(c, w, cfg.batch_norm, vb.pp(format!("down.{i}")))?);
            c = w;
        }
        let mut bottleneck = Vec::new();
        for (j, &(w, d)) in cfg.bottleneck.iter().enumerate() {
            bottleneck.push(ConvBnRelu::new(c, w, d, cfg.batch_norm, vb.pp(format!("mid.{j}")))?);
            c = w;
        }
        let mut up = Vec::new();
        for (i, &w) in cfg.widths.iter().enumerate().rev() {
            up.push(DoubleConv::new(c + w, w, cfg.batch_norm, vb.pp(format!("up.{i}")))?);
            c = w;
        }
        let head = conv2d(c, 1, 1, Conv2dConfig::default(), vb.pp("head"))?;
        Ok(UNet { cfg: cfg.clone(), down, bottleneck, up, head })
    }

    /// The configuration.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// Logits (N, 1, H, W) for images (N, C, H, W) normalised with mean and std 0.5, any H and W.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.forward_features(x, train)?.logits)
    }

    /// The forward pass keeping every stage's output.
    pub fn forward_features(&self, x: &Tensor, train: bool) -> Result<Features> {
        let (_, _, h, w) = x.dims4()?;
        let m = 1usize << self.cfg.widths.len();
        let (ph, pw) = (h.div_ceil(m) * m - h, w.div_ceil(m) * m - w);
        let mut x = if ph > 0 || pw > 0 { x.pad_with_same(2, 0, ph)?.pad_with_same(3, 0, pw)? } else { x.clone() };
        let mut stages = Vec::new();
        let mut skips = Vec::new();
        for block in &self.down {
            x = block.forward(&x, train)?;
            stages.push(x.clone());
            skips.push(x.clone());
            x = ops::max_pool2d(&x, Pool2d::square(2, 2, 0))?;
        }
        for layer in &self.bottleneck {
            x = layer.forward(&x, train)?;
        }
        stages.push(x.clone());
        for block in &self.up {
            let skip = skips.pop().ok_or_else(|| candle_core::Error::Msg("unet: skip stack empty".into()))?;
            x = ops::upsample_nearest(&x, 2)?;
            x = Tensor::cat(&[&x, &skip], 1)?;
            x = block.forward(&x, train)?;
            stages.push(x.clone());
        }
        let mut logits = self.head.forward(&x)?;
        if ph > 0 || pw > 0 {
            logits = logits.narrow(2, 0, h)?.narrow(3, 0, w)?;
        }
        Ok(Features { logits, stages })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn tiny() -> UNetConfig {
        UNetConfig { in_channels: 3, widths: vec![4, 8], bottleneck: vec![(8, 2), (8, 4)], batch_norm: true }
    }

    #[test]
    fn shapes_at_odd_sizes() {
        let vm = VarMap::new();
        let vb = derm_core::nn::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let net = UNet::new(&tiny(), vb).unwrap();
        for (h, w) in [(17, 23), (32, 32), (33, 47), (8, 61)] {
            let x = Tensor::zeros((2, 3, h, w), DType::F32, &Device::Cpu).unwrap();
            assert_eq!(net.forward_t(&x, true).unwrap().dims(), &[2, 1, h, w]);
            assert_eq!(net.forward_t(&x, false).unwrap().dims(), &[2, 1, h, w]);
        }
    }

    #[test]
    fn paper_preset_parameter_count() {
        // Encoder 64/128/256, bottleneck 512 d2, 512 d2, 1024 d4, 1024 d4, mirrored decoder.
        let vm = VarMap::new();
        let vb = derm_core::nn::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let _ = UNet::new(&UNetConfig::paper(), vb).unwrap();
        let n: usize = derm_core::nn::parameter_count(&vm, "");
        // 3x3 convs without bias + BN (2 per channel) + 1x1 head with bias.
        let conv = |i: usize, o: usize| 9 * i * o + 2 * o;
        let expect = conv(3, 64)
            + conv(64, 64)
            + conv(64, 128)
            + conv(128, 128)
            + conv(128, 256)
            + conv(256, 256)
            + conv(256, 512)
            + conv(512, 512)
            + conv(512, 1024)
            + conv(1024, 1024)
            + conv(1024 + 256, 256)
            + conv(256, 256)
            + conv(256 + 128, 128)
            + conv(128, 128)
            + conv(128 + 64, 64)
            + conv(64, 64)
            + 64
            + 1;
        assert_eq!(n, expect);
    }
}
