//! Times the three phases of derm-core's conv2d (forward, input gradient, weight gradient)
//! separately at shapes from the benchmark models, with GFLOP/s.
//!
//! `cargo run -p derm-core --example conv_phases [FILTER]`: only the shapes whose name contains
//! FILTER (for example `unet`) when one is given.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use derm_core::conv::{conv2d, ConvSpec};
use derm_core::Rng;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time(reps: usize, mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    f()?;
    let mut v = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(v))
}

fn main() -> candle_core::Result<()> {
    derm_core::runtime::tune_allocator();
    let mut rng = Rng::new(0);
    // (name, n, c, h, o, k, stride, pad)
    let shapes = [
        ("unet 3x3 32->32 128", 8, 32, 128, 32, 3, 1, 1),
        ("unet 3x3 64->32 128", 8, 64, 128, 32, 3, 1, 1),
        ("unet 3x3 3->32 128", 8, 3, 128, 32, 3, 1, 1),
        ("unet 3x3 64->64 64", 8, 64, 64, 64, 3, 1, 1),
        ("unet 3x3 128->128 32", 8, 128, 32, 128, 3, 1, 1),
        ("unet 3x3 256->256 16", 8, 256, 16, 256, 3, 1, 1),
        ("unet 3x3 512->256 16", 8, 512, 16, 256, 3, 1, 1),
        ("resnet 3x3 64->64 56", 8, 64, 56, 64, 3, 1, 1),
        ("resnet 1x1 256->64 56", 8, 256, 56, 64, 1, 1, 0),
        ("resnet 1x1 64->256 56", 8, 64, 56, 256, 1, 1, 0),
        ("resnet 3x3 128->128 28", 8, 128, 28, 128, 3, 1, 1),
        ("resnet 1x1 1024->256 14", 8, 1024, 14, 256, 1, 1, 0),
        ("resnet 3x3 256->256 14", 8, 256, 14, 256, 3, 1, 1),
        ("resnet 1x1 2048->512 7", 8, 2048, 7, 512, 1, 1, 0),
        ("resnet 1x1 512->2048 7", 8, 512, 7, 2048, 1, 1, 0),
        ("resnet 3x3 512->512 7", 8, 512, 7, 512, 3, 1, 1),
        ("resnet 1x1/2 512->1024 28", 8, 512, 28, 1024, 1, 2, 0),
        ("resnet 3x3/2 256->256 28", 8, 256, 28, 256, 3, 2, 1),
        ("resnet 7x7/2 3->64 224", 8, 3, 224, 64, 7, 2, 3),
        ("dcgan 4x4/2 64->128 32", 64, 64, 32, 128, 4, 2, 1),
        ("dcgan 4x4/2 128->256 16", 64, 128, 16, 256, 4, 2, 1),
        ("dcgan 4x4/2 256->512 8", 64, 256, 8, 512, 4, 2, 1),
        ("dcgan 2x2 256->512 8", 64, 256, 8, 512, 2, 1, 0),
    ];
    let filter = std::env::args().nth(1).unwrap_or_default();
    println!("{:<26} {:>9} {:>9} {:>9}   GF/s fwd / gin / gw", "shape", "fwd ms", "gin ms", "gw ms");
    for (name, n, c, h, o, k, s, p) in shapes.into_iter().filter(|s| s.0.contains(filter.as_str())) {
        let spec = ConvSpec { padding: p, stride: s, dilation: 1 };
        let x = Tensor::from_vec(rng.normal_vec(n * c * h * h, 0.0, 1.0), (n, c, h, h), &Device::Cpu)?;
        let w = Tensor::from_vec(rng.normal_vec(o * c * k * k, 0.0, 0.1), (o, c, k, k), &Device::Cpu)?;
        let (xv, wv) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?);
        let y = conv2d(&x, &w, spec)?;
        let r = Tensor::from_vec(rng.normal_vec(y.elem_count(), 0.0, 1.0), y.shape(), &Device::Cpu)?;
        let oh = y.dim(2)?;
        let flop = 2.0 * (n * o * oh * oh * c * k * k) as f64;
        let fwd = time(5, || conv2d(&x, &w, spec).map(|_| ()))?;
        let both_x = time(5, || (conv2d(&xv, &w, spec)? * &r)?.sum_all()?.backward().map(|_| ()))?;
        let both_w = time(5, || (conv2d(&x, &wv, spec)? * &r)?.sum_all()?.backward().map(|_| ()))?;
        // Each backward run includes a forward and the loss (product with r, sum, their backward).
        let yv = Var::from_tensor(&y)?;
        let loss = time(5, || (yv.as_tensor() * &r)?.sum_all()?.backward().map(|_| ()))?;
        let (gin, gw) = (both_x - fwd - loss, both_w - fwd - loss);
        let gf = |ms: f64| flop / ms / 1e6;
        println!("{name:<26} {fwd:>9.1} {gin:>9.1} {gw:>9.1}   {:.0} / {:.0} / {:.0}", gf(fwd), gf(gin), gf(gw));
    }
    Ok(())
}
