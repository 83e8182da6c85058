//! The peer's benchmark models rebuilt from derm-core layers with its exact definitions
//! (bench/peer/peer_bench.py), so timings compare like with like.

use candle_core::{Module, Result, Tensor};
use candle_nn::{ConvTranspose2d, ConvTranspose2dConfig, VarBuilder};
use derm_core::nn::{batch_norm, bn, conv2d, BatchNorm, Conv2d, Conv2dConfig};
use derm_kernels::fused;
use derm_kernels::ops::{self, Pool2d};

/// A k2/s2 transposed convolution through derm-core's GEMM kernel where it applies (CPU f32),
/// else candle's.
fn transposed(up: &ConvTranspose2d, x: &Tensor) -> Result<Tensor> {
    if derm_kernels::conv::supports(x, up.weight()) {
        let spec = derm_kernels::conv::ConvSpec { padding: 0, stride: 2, dilation: 1 };
        let y = derm_kernels::conv::conv_transpose2d(x, up.weight(), spec, 0)?;
        match up.bias() {
            Some(b) => fused::add_channel_bias(&y, b),
            None => Ok(y),
        }
    } else {
        up.forward(x)
    }
}

/// conv3x3 (bias) -> ReLU -> BN, as the peer writes it.
struct ConvReluBn {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvReluBn {
    fn new(i: usize, o: usize, d: usize, vb: VarBuilder) -> Result<Self> {
        Ok(ConvReluBn { conv: conv2d(i, o, 3, Conv2dConfig::same(3, d), vb.pp("0"))?, bn: batch_norm(o, vb.pp("2"))? })
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        bn(&self.bn, &self.conv.forward_relu(x)?, train)
    }
}

/// The peer's `DilatedUNet`: enc 32/64/128/256, bottleneck d2/d4 at 512, ConvTranspose2d
/// decoder. 7,765,985 parameters.
pub struct PeerUNet {
    enc: Vec<(ConvReluBn, ConvReluBn)>,
    mid: Vec<ConvReluBn>,
    up: Vec<ConvTranspose2d>,
    dec: Vec<(ConvReluBn, ConvReluBn)>,
    head: Conv2d,
}

impl PeerUNet {
    /// Builds it.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let chans = [32, 64, 128, 256];
        let mut c = 3;
        let mut enc = Vec::new();
        for (i, &ch) in chans.iter().enumerate() {
            let v = vb.pp(format!("enc.{i}"));
            enc.push((ConvReluBn::new(c, ch, 1, v.pp("0"))?, ConvReluBn::new(ch, ch, 1, v.pp("1"))?));
            c = ch;
        }
        let mut mid = Vec::new();
        for (j, d) in [2, 4].into_iter().enumerate() {
            mid.push(ConvReluBn::new(c, 512, d, vb.pp(format!("bottleneck.{j}")))?);
            c = 512;
        }
        let mut up = Vec::new();
        let mut dec = Vec::new();
        for (i, &ch) in chans.iter().rev().enumerate() {
            let cfg = ConvTranspose2dConfig { stride: 2, ..Default::default() };
            up.push(candle_nn::conv_transpose2d(c, ch, 2, cfg, vb.pp(format!("up.{i}")))?);
            let v = vb.pp(format!("dec.{i}"));
            dec.push((ConvReluBn::new(2 * ch, ch, 1, v.pp("0"))?, ConvReluBn::new(ch, ch, 1, v.pp("1"))?));
            c = ch;
        }
        let head = conv2d(c, 1, 1, Conv2dConfig::default(), vb.pp("head"))?;
        Ok(PeerUNet { enc, mid, up, dec, head })
    }

    /// Logits (N, 1, H, W).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = x.clone();
        let mut skips = Vec::new();
        for (a, b) in &self.enc {
            x = b.forward(&a.forward(&x, train)?, train)?;
            skips.push(x.clone());
            x = ops::max_pool2d(&x, Pool2d::square(2, 2, 0))?;
        }
        for m in &self.mid {
            x = m.forward(&x, train)?;
        }
        for ((up, (a, b)), s) in self.up.iter().zip(&self.dec).zip(skips.iter().rev()) {
            x = transposed(up, &x)?;
            x = Tensor::cat(&[&x, s], 1)?;
            x = b.forward(&a.forward(&x, train)?, train)?;
        }
        self.head.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn peer_unet_has_the_peer_parameter_count() {
        let vm = candle_nn::VarMap::new();
        let vb = derm_core::nn::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let net = PeerUNet::new(vb).unwrap();
        let n: usize = derm_core::nn::parameter_count(&vm, "");
        assert_eq!(n, 7_765_985);
        let x = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(net.forward_t(&x, true).unwrap().dims(), &[1, 1, 32, 32]);
    }
}
