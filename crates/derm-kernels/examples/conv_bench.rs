//! Times candle's native conv2d against derm's GEMM conv2d (`derm_kernels::conv`), forward and
//! forward + backward, at the U-Net shapes of the peer benchmark (3x3 convolutions and the
//! decoder's 2x2 stride-2 transposed convolutions). Run with
//! `cargo run -p derm-kernels --example conv_bench` (add `--release` for release numbers).
//!
//! Each timing is the median of five runs after two warm-up runs. GFLOP/s counts 2*N*O*OH*OW*C*KH*KW
//! per pass: one pass forward, three forward + backward (two where the input is a constant data
//! batch and gets no gradient).

use candle_core::{Device, Tensor, Var};
use derm_kernels::conv::{conv2d, conv_transpose2d, ConvSpec};
use std::time::Instant;

type Res<T> = candle_core::Result<T>;

fn median_ms(mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    for _ in 0..2 {
        f()?;
    }
    let mut t = Vec::new();
    for _ in 0..5 {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[2])
}

fn main() -> Res<()> {
    let dev = Device::Cpu;
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "{:<42} {:>10} {:>10} {:>12} {:>12} {:>8}",
        "shape", "fwd ms", "fwd GF/s", "fwd+bwd ms", "f+b GF/s", "speedup"
    );
    // (name, (n, c, h, w), o, k, padding, dilation, input needs a gradient, transposed k2 s2)
    let rows = [
        ("3x3 16->16 8x16x128x128", (8, 16, 128, 128), 16, 3, 1, 1, true, false),
        ("3x3 32->32 8x32x128x128", (8, 32, 128, 128), 32, 3, 1, 1, true, false),
        ("3x3 128->128 8x128x16x16", (8, 128, 16, 16), 128, 3, 1, 1, true, false),
        ("3x3 3->32 8x3x128x128 (data in)", (8, 3, 128, 128), 32, 3, 1, 1, false, false),
        ("3x3 256->512 d2 8x256x16x16", (8, 256, 16, 16), 512, 3, 2, 2, true, false),
        ("convT k2s2 64->32 8x64x64x64", (8, 64, 64, 64), 32, 2, 0, 1, true, true),
        ("convT k2s2 256->128 8x256x16x16", (8, 256, 16, 16), 128, 2, 0, 1, true, true),
    ];
    // An optional argument keeps only the rows whose name contains it; `--derm` skips candle.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let derm_only = args.iter().any(|a| a == "--derm");
    let filter = args.iter().find(|a| !a.starts_with("--")).cloned().unwrap_or_default();
    for (name, (n, c, h, w), o, k, pad, dil, x_grad, transposed) in rows {
        if !name.contains(&filter) {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev)?;
        let xv = Var::from_tensor(&x)?;
        // A transposed convolution's weight is (C_in, C_out, KH, KW).
        let wshape = if transposed { (c, o, k, k) } else { (o, c, k, k) };
        let wv = Var::from_tensor(&(Tensor::randn(0f32, 1.0, wshape, &dev)? * 0.1)?)?;
        let xin: &Tensor = if x_grad { xv.as_tensor() } else { &x };
        let stride = if transposed { 2 } else { 1 };
        let spec = ConvSpec { padding: pad, stride, dilation: dil };
        // Multiply-adds: every input pixel meets the whole kernel in a transposed convolution,
        // every output pixel in a plain one.
        let (oh, ow) = if transposed { (h, w) } else { (h + 2 * pad - dil * (k - 1), w + 2 * pad - dil * (k - 1)) };
        let flop = 2.0 * (n * o * oh * ow * c * k * k) as f64;
        let passes = if x_grad { 3.0 } else { 2.0 };
        let mut res = Vec::new();
        let impls: &[bool] = if derm_only { &[false] } else { &[true, false] };
        for &native in impls {
            let fwd = |x: &Tensor| -> Res<Tensor> {
                match (native, transposed) {
                    (true, false) => x.conv2d(&wv, pad, 1, dil, 1),
                    (false, false) => conv2d(x, &wv, spec),
                    (true, true) => x.conv_transpose2d(&wv, pad, 0, stride, dil),
                    (false, true) => conv_transpose2d(x, &wv, spec, 0),
                }
            };
            let f = median_ms(|| fwd(xin).map(|_| ()))?;
            let fb = median_ms(|| {
                let g = fwd(xin)?.sum_all()?.backward()?;
                g.get(&wv).map(|_| ()).ok_or_else(|| candle_core::Error::Msg("no weight gradient".into()))
            })?;
            res.push((f, fb));
        }
        for (i, (f, fb)) in res.iter().enumerate() {
            let is_derm = derm_only || i == 1;
            let label = format!("{} {name}", if is_derm { "derm  " } else { "candle" });
            let speedup = if i == 1 { format!("{:.2}x", res[0].1 / fb) } else { String::new() };
            println!(
                "{label:<42} {f:>10.1} {:>10.1} {fb:>12.1} {:>12.1} {speedup:>8}",
                flop / f / 1e6,
                passes * flop / fb / 1e6
            );
        }
    }
    Ok(())
}
