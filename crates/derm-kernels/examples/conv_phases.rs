//! Times the three phases of derm-kernels' conv2d (forward, input gradient, weight gradient)
//! separately at shapes from the benchmark models (and the U-Net decoder's transposed
//! convolutions), with GFLOP/s; each time is the best of seven runs after one warm-up.
//!
//! `cargo run -p derm-kernels --example conv_phases [FILTER]`: only the shapes whose name contains
//! FILTER (for example `unet`) when one is given.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use derm_core::Rng;
use derm_kernels::conv::{conv2d, conv_transpose2d, ConvSpec};

fn time(reps: usize, mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    f()?;
    let mut v = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(v.into_iter().fold(f64::INFINITY, f64::min))
}

fn main() -> candle_core::Result<()> {
    derm_kernels::runtime::tune_allocator();
    let mut rng = Rng::new(0);
    // (name, n, c, h, o, k, stride, pad, dilation)
    let shapes = [
        ("unet 3x3 32->32 128", 8, 32, 128, 32, 3, 1, 1, 1),
        ("unet 3x3 64->32 128", 8, 64, 128, 32, 3, 1, 1, 1),
        ("unet 3x3 3->32 128", 8, 3, 128, 32, 3, 1, 1, 1),
        ("unet 3x3 32->64 64", 8, 32, 64, 64, 3, 1, 1, 1),
        ("unet 3x3 64->64 64", 8, 64, 64, 64, 3, 1, 1, 1),
        ("unet 3x3 128->64 64", 8, 128, 64, 64, 3, 1, 1, 1),
        ("unet 3x3 64->128 32", 8, 64, 32, 128, 3, 1, 1, 1),
        ("unet 3x3 128->128 32", 8, 128, 32, 128, 3, 1, 1, 1),
        ("unet 3x3 256->128 32", 8, 256, 32, 128, 3, 1, 1, 1),
        ("unet 3x3 128->256 16", 8, 128, 16, 256, 3, 1, 1, 1),
        ("unet 3x3 256->256 16", 8, 256, 16, 256, 3, 1, 1, 1),
        ("unet 3x3 512->256 16", 8, 512, 16, 256, 3, 1, 1, 1),
        ("unet 3x3d2 256->512 8", 8, 256, 8, 512, 3, 1, 2, 2),
        ("unet 3x3d4 512->512 8", 8, 512, 8, 512, 3, 1, 4, 4),
        ("resnet 3x3 64->64 56", 8, 64, 56, 64, 3, 1, 1, 1),
        ("resnet 1x1 256->64 56", 8, 256, 56, 64, 1, 1, 0, 1),
        ("resnet 1x1 64->256 56", 8, 64, 56, 256, 1, 1, 0, 1),
        ("resnet 3x3 128->128 28", 8, 128, 28, 128, 3, 1, 1, 1),
        ("resnet 1x1 1024->256 14", 8, 1024, 14, 256, 1, 1, 0, 1),
        ("resnet 3x3 256->256 14", 8, 256, 14, 256, 3, 1, 1, 1),
        ("resnet 1x1 2048->512 7", 8, 2048, 7, 512, 1, 1, 0, 1),
        ("resnet 1x1 512->2048 7", 8, 512, 7, 2048, 1, 1, 0, 1),
        ("resnet 3x3 512->512 7", 8, 512, 7, 512, 3, 1, 1, 1),
        ("resnet 1x1/2 512->1024 28", 8, 512, 28, 1024, 1, 2, 0, 1),
        ("resnet 3x3/2 256->256 28", 8, 256, 28, 256, 3, 2, 1, 1),
        ("resnet 7x7/2 3->64 224", 8, 3, 224, 64, 7, 2, 3, 1),
        ("dcgan 4x4/2 64->128 32", 64, 64, 32, 128, 4, 2, 1, 1),
        ("dcgan 4x4/2 128->256 16", 64, 128, 16, 256, 4, 2, 1, 1),
        ("dcgan 4x4/2 256->512 8", 64, 256, 8, 512, 4, 2, 1, 1),
        ("dcgan 2x2 256->512 8", 64, 256, 8, 512, 2, 1, 0, 1),
        // Transposed (k = stride = 2, the U-Net decoder's upsampling): h is the input's size.
        ("unet convT 512->256 8", 8, 512, 8, 256, 2, 2, 0, 0),
        ("unet convT 256->128 16", 8, 256, 16, 128, 2, 2, 0, 0),
        ("unet convT 128->64 32", 8, 128, 32, 64, 2, 2, 0, 0),
        ("unet convT 64->32 64", 8, 64, 64, 32, 2, 2, 0, 0),
    ];
    let filter = std::env::args().nth(1).unwrap_or_default();
    println!("{:<26} {:>9} {:>9} {:>9}   GF/s fwd / gin / gw", "shape", "fwd ms", "gin ms", "gw ms");
    for (name, n, c, h, o, k, s, p, d) in shapes.into_iter().filter(|s| s.0.contains(filter.as_str())) {
        // A dilation of 0 marks a transposed convolution (weight (C, O, K, K), dilation 1).
        let transposed = d == 0;
        let spec = ConvSpec { padding: p, stride: s, dilation: d.max(1) };
        let op = |x: &Tensor, w: &Tensor| {
            if transposed {
                conv_transpose2d(x, w, spec, 0)
            } else {
                conv2d(x, w, spec)
            }
        };
        let x = Tensor::from_vec(rng.normal_vec(n * c * h * h, 0.0, 1.0), (n, c, h, h), &Device::Cpu)?;
        let wshape = if transposed { (c, o, k, k) } else { (o, c, k, k) };
        let w = Tensor::from_vec(rng.normal_vec(o * c * k * k, 0.0, 0.1), wshape, &Device::Cpu)?;
        let (xv, wv) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?);
        let y = op(&x, &w)?;
        let r = Tensor::from_vec(rng.normal_vec(y.elem_count(), 0.0, 1.0), y.shape(), &Device::Cpu)?;
        // Multiply-adds: every (input pixel, tap) pair of a transposed convolution, every
        // (output pixel, tap) pair of a convolution.
        let pixels = if transposed { h * h } else { y.dim(2)? * y.dim(3)? };
        let flop = 2.0 * (n * o * pixels * c * k * k) as f64;
        let fwd = time(7, || op(&x, &w).map(|_| ()))?;
        let both_x = time(7, || (op(xv.as_tensor(), &w)? * &r)?.sum_all()?.backward().map(|_| ()))?;
        let both_w = time(7, || (op(&x, wv.as_tensor())? * &r)?.sum_all()?.backward().map(|_| ()))?;
        // Each backward run includes a forward and the loss (product with r, sum, their backward).
        let yv = Var::from_tensor(&y)?;
        let loss = time(7, || (yv.as_tensor() * &r)?.sum_all()?.backward().map(|_| ()))?;
        let (gin, gw) = (both_x - fwd - loss, both_w - fwd - loss);
        let gf = |ms: f64| flop / ms / 1e6;
        println!("{name:<26} {fwd:>9.1} {gin:>9.1} {gw:>9.1}   {:.0} / {:.0} / {:.0}", gf(fwd), gf(gin), gf(gw));
    }
    Ok(())
}
