//! Timings of the partial-convolution U-Net on this machine: one training step (forward,
//! backward, Adam) of a preset at a batch and size, and inference per image.
//!
//! `cargo run -p derm-purify --example purify_bench -- [preset] [batch] [size] [repeats]`
//! (defaults: peer 4 256 3), compare with the peer's PyTorch `pconv_train_step b4 256x256 L5`.

use std::time::Instant;

use derm_core::image_io::{self, Normalize};
use derm_core::{Device, Rng};
use derm_purify::{
    inpainting_loss, purify_image, LossWeights, MaskConfig, MaskGenerator, MaskLibrary, PConvUNetConfig, Purifier,
    PurifyConfig,
};
use image::{GrayImage, RgbImage};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let preset = args.first().map(String::as_str).unwrap_or("peer");
    let batch: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(4);
    let size: u32 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let repeats: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let model = PConvUNetConfig::preset(preset).ok_or_else(|| anyhow::anyhow!("unknown preset {preset}"))?;
    let cfg = PurifyConfig { model, size, batch_size: batch, ..Default::default() };
    let dev = Device::Cpu;
    let p = Purifier::new(cfg.clone(), &dev)?;
    let nparams = derm_core::nn::parameter_count(&p.varmap, "");
    let mut opt = derm_core::optim::Optimizer::from_varmap(&p.varmap, cfg.optim, |_| true);
    let mut rng = Rng::new(0);
    let gen = MaskGenerator::new(MaskConfig::default(), MaskLibrary::default())?;
    let imgs: Vec<RgbImage> = (0..batch)
        .map(|_| {
            let v: Vec<u8> = (0..size * size * 3).map(|_| rng.below(256) as u8).collect();
            RgbImage::from_raw(size, size, v).unwrap_or_default()
        })
        .collect();
    let holes: Vec<GrayImage> = (0..batch).map(|_| gen.generate(size, size, &mut rng)).collect();
    let irefs: Vec<&RgbImage> = imgs.iter().collect();
    let hrefs: Vec<&GrayImage> = holes.iter().collect();
    let t = image_io::images_to_tensor(&irefs, Normalize::HALF, &dev)?;
    let valid = image_io::masks_to_tensor(&hrefs, &dev)?.affine(-1.0, 1.0)?;
    let mut steps = Vec::new();
    for i in 0..repeats + 1 {
        let t0 = Instant::now();
        let out = p.net.forward_t(&t.broadcast_mul(&valid)?, &valid, true)?;
        let (loss, parts) = inpainting_loss(&out, &t, &valid, &LossWeights::default(), None, Normalize::HALF)?;
        opt.backward_step(&loss)?;
        let dt = t0.elapsed().as_secs_f64();
        eprintln!("step {i}: {:.3} s, loss {:.4}", dt, parts.read()?.total);
        if i > 0 {
            steps.push(dt);
        }
    }
    let mut infer = Vec::new();
    for i in 0..repeats + 1 {
        let t0 = Instant::now();
        let _ = purify_image(&p, &imgs[0], &holes[0])?;
        if i > 0 {
            infer.push(t0.elapsed().as_secs_f64());
        }
    }
    println!(
        "{preset} ({nparams} params) b{batch} {size}x{size}: train step median {:.3} s ({:?}); inference {:.1} ms per image",
        median(steps.clone()),
        steps.iter().map(|s| (s * 1e3).round() / 1e3).collect::<Vec<_>>(),
        1e3 * median(infer)
    );
    Ok(())
}
