//! A two-sample test by classifier: can a small CNN tell generated images of a class from real
//! ones? Held-out accuracy near 0.5 means it cannot (better for the generator); near 1.0 means
//! the generated images are easy to spot.
//!
//! The network is a few 3x3 stride-2 convolutions (batch norm, LeakyReLU 0.2), a global average
//! and a linear logit, trained with the stable binary cross-entropy and Adam on balanced
//! mini-batches; the images of each kind are split into training and held-out parts.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarMap;
use derm_core::image_io::{self, Normalize};
use derm_core::nn::{batch_norm, conv2d, Conv2dConfig};
use derm_core::optim::{OptimConfig, Optimizer, OptimizerKind};
use derm_core::{Error, Result, Rng};
use derm_kernels::ops::ConvParams;
use image::RgbImage;
use serde::{Deserialize, Serialize};

/// Settings of the real-versus-generated classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RealFakeConfig {
    /// Widths of the stride-2 convolutions.
    pub widths: Vec<usize>,
    /// Optimiser steps.
    pub steps: usize,
    /// Images per step (half real, half generated).
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Fraction of each kind held out for testing.
    pub test_fraction: f64,
    /// Images are resized to this side.
    pub size: u32,
    /// Seed of the initialisation, the split and the batches.
    pub seed: u64,
}

impl Default for RealFakeConfig {
    fn default() -> Self {
        RealFakeConfig {
            widths: vec![16, 32, 64],
            steps: 300,
            batch_size: 16,
            lr: 1e-3,
            test_fraction: 0.3,
            size: 64,
            seed: 0,
        }
    }
}

/// The classifier's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RealFakeReport {
    /// Images of each kind used for training.
    pub train_per_kind: usize,
    /// Images of each kind held out.
    pub test_per_kind: usize,
    /// Accuracy on the training images.
    pub train_accuracy: f64,
    /// Accuracy on the held-out images (0.5 = chance).
    pub test_accuracy: f64,
    /// Mean loss over the last tenth of the steps.
    pub final_loss: f64,
}

struct Net {
    convs: Vec<(derm_core::nn::Conv2d, derm_core::nn::BatchNorm)>,
    head: candle_nn::Linear,
}

impl Net {
    fn new(widths: &[usize], vb: candle_nn::VarBuilder) -> Result<Self> {
        let mut convs = Vec::new();
        let mut c = 3;
        for (i, &w) in widths.iter().enumerate() {
            let cfg = Conv2dConfig {
                params: ConvParams { padding: 1, stride: 2, ..Default::default() },
                bias: false,
                init: None,
            };
            convs.push((conv2d(c, w, 3, cfg, vb.pp(format!("conv.{i}")))?, batch_norm(w, vb.pp(format!("bn.{i}")))?));
            c = w;
        }
        Ok(Net { convs, head: candle_nn::linear(c, 1, vb.pp("head"))? })
    }

    /// Logits (N,) for images (N, 3, S, S).
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = x.clone();
        for (conv, bn) in &self.convs {
            x = derm_kernels::fused::leaky_relu(&derm_core::nn::bn(bn, &conv.forward(&x)?, train)?, 0.2)?;
        }
        let pooled = x.flatten_from(2)?.mean(2)?;
        Ok(self.head.forward(&pooled)?.flatten_all()?)
    }
}

/// Trains the classifier on `real` against `fake` and reports its held-out accuracy. The two
/// kinds are balanced by using as many of each as the smaller has.
pub fn real_vs_fake(
    real: &[RgbImage],
    fake: &[RgbImage],
    cfg: &RealFakeConfig,
    device: &Device,
) -> Result<RealFakeReport> {
    let n = real.len().min(fake.len());
    let n_test = ((n as f64 * cfg.test_fraction).round() as usize).clamp(1, n.saturating_sub(2).max(1));
    if n < 4 {
        return Err(Error::invalid(format!(
            "real_vs_fake: {} real and {} generated images; at least 4 of each are needed",
            real.len(),
            fake.len()
        )));
    }
    let n_train = n - n_test;
    let rng = Rng::new(cfg.seed);
    let prep = |imgs: &[RgbImage], stream: u64| -> Result<(Tensor, Tensor)> {
        let order = rng.fork(stream).permutation(imgs.len());
        let resized: Vec<RgbImage> =
            order[..n].iter().map(|&i| image_io::resize_rgb(&imgs[i], cfg.size, cfg.size)).collect();
        let refs: Vec<&RgbImage> = resized.iter().collect();
        let t = image_io::images_to_tensor(&refs, Normalize::HALF, device)?;
        Ok((t.narrow(0, 0, n_train)?, t.narrow(0, n_train, n_test)?))
    };
    let (real_tr, real_te) = prep(real, 1)?;
    let (fake_tr, fake_te) = prep(fake, 2)?;
    let vm = VarMap::new();
    let net = Net::new(&cfg.widths, derm_core::nn::seeded_var_builder(&vm, cfg.seed, DType::F32, device))?;
    let mut opt = Optimizer::from_varmap(
        &vm,
        OptimConfig { optimizer: OptimizerKind::adam(cfg.lr), ..Default::default() },
        |_| true,
    );
    let half = (cfg.batch_size / 2).clamp(1, n_train);
    let targets = Tensor::cat(&[Tensor::ones(half, DType::F32, device)?, Tensor::zeros(half, DType::F32, device)?], 0)?;
    let mut brng = rng.fork(3);
    let mut losses = Vec::with_capacity(cfg.steps);
    for _ in 0..cfg.steps {
        let pick = |r: &mut Rng| -> Result<Tensor> {
            let idx: Vec<u32> = (0..half).map(|_| r.below(n_train) as u32).collect();
            Ok(Tensor::new(idx, device)?)
        };
        let (ir, ifk) = (pick(&mut brng)?, pick(&mut brng)?);
        let x = Tensor::cat(&[real_tr.index_select(&ir, 0)?, fake_tr.index_select(&ifk, 0)?], 0)?;
        let loss = derm_kernels::ops::bce_with_logits(&net.forward(&x, true)?, &targets)?;
        losses.push(loss.to_scalar::<f32>()? as f64);
        opt.backward_step(&loss)?;
    }
    let accuracy = |r: &Tensor, f: &Tensor| -> Result<f64> {
        let mut correct = 0usize;
        for (x, want_real) in [(r, true), (f, false)] {
            let logits = net.forward(x, false)?.to_vec1::<f32>()?;
            correct += logits.iter().filter(|&&l| (l > 0.0) == want_real).count();
        }
        Ok(correct as f64 / (r.dim(0)? + f.dim(0)?) as f64)
    };
    let tail = losses.len() / 10;
    let final_loss = if losses.is_empty() {
        f64::NAN
    } else {
        losses[losses.len() - tail.max(1)..].iter().sum::<f64>() / tail.max(1) as f64
    };
    Ok(RealFakeReport {
        train_per_kind: n_train,
        test_per_kind: n_test,
        train_accuracy: accuracy(&real_tr, &fake_tr)?,
        test_accuracy: accuracy(&real_te, &fake_te)?,
        final_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_apart_what_differs_and_not_what_does_not() {
        let mut r = Rng::new(2);
        let noise = |r: &mut Rng, base: u8| -> RgbImage {
            RgbImage::from_fn(16, 16, |_, _| {
                let v = (base as f64 + 40.0 * r.normal()).clamp(0.0, 255.0) as u8;
                image::Rgb([v, v, v])
            })
        };
        let real: Vec<RgbImage> = (0..40).map(|_| noise(&mut r, 120)).collect();
        let fake_easy: Vec<RgbImage> = (0..40).map(|_| noise(&mut r, 200)).collect();
        let fake_same: Vec<RgbImage> = (0..40).map(|_| noise(&mut r, 120)).collect();
        let cfg = RealFakeConfig { widths: vec![4, 8], steps: 60, size: 16, ..Default::default() };
        let easy = real_vs_fake(&real, &fake_easy, &cfg, &Device::Cpu).unwrap();
        assert!(easy.test_accuracy > 0.9, "{easy:?}");
        let same = real_vs_fake(&real, &fake_same, &cfg, &Device::Cpu).unwrap();
        assert!(same.test_accuracy < 0.8, "{same:?}");
        assert_eq!((same.train_per_kind, same.test_per_kind), (28, 12));
        assert!(real_vs_fake(&real[..3], &fake_same, &cfg, &Device::Cpu).is_err());
    }
}
