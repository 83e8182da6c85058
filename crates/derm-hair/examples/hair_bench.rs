//! Times the hair mask and Telea inpainting at 512x512 on a synthetic hairy image like the peer
//! benchmark's (skin with vignetting, a mottled blurred lesion, 30 curved anti-aliased hairs of
//! 1-3 px), and prints quality against its ground truth.
//!
//! `cargo run -p derm-hair --example hair_bench [-- SIZE REPEATS]` (the dev profile is optimised;
//! set `HAIR_BENCH_SAVE=DIR` to keep the images)

use std::time::Instant;

use derm_core::Rng;
use derm_hair::{eval, hair_mask, inpaint, HairConfig, InpaintMethod};
use image::{GrayImage, RgbImage};

/// Returns (hairy, clean, hair ground truth).
fn scene(size: u32, seed: u64) -> (RgbImage, RgbImage, GrayImage) {
    let mut rng = Rng::new(seed);
    let s = size as f32;
    let (cx, cy) = (s / 2.0 + rng.uniform(-0.08, 0.08) as f32 * s, s / 2.0 + rng.uniform(-0.08, 0.08) as f32 * s);
    let (ax, ay) = (rng.uniform(0.2, 0.29) as f32 * s, rng.uniform(0.14, 0.22) as f32 * s);
    // Smooth mottling: a few random low-frequency waves.
    let waves: Vec<[f32; 4]> = (0..6)
        .map(|_| {
            let f = rng.uniform(4.0, 14.0) as f32 / s;
            let a = rng.uniform(0.0, std::f64::consts::TAU) as f32;
            [f * a.cos(), f * a.sin(), rng.uniform(0.0, 6.3) as f32, 1.0]
        })
        .collect();
    let mut clean = RgbImage::new(size, size);
    for (x, y, p) in clean.enumerate_pixels_mut() {
        let (xf, yf) = (x as f32, y as f32);
        let r2 = ((xf - s / 2.0).powi(2) + (yf - s / 2.0).powi(2)) / (s / 2.0).powi(2);
        let illum = 1.0 - 0.12 * r2;
        let e = ((xf - cx) / ax).powi(2) + ((yf - cy) / ay).powi(2);
        let les = (1.0 - (e - 0.85) / 0.3).clamp(0.0, 1.0);
        let m: f32 = waves.iter().map(|w| (std::f32::consts::TAU * (w[0] * xf + w[1] * yf) + w[2]).sin()).sum::<f32>()
            * 0.25
            / 6.0f32.sqrt();
        let skin = [222.0, 178.0, 160.0];
        let lc = [128.0, 84.0, 62.0];
        for c in 0..3 {
            let v = skin[c] * illum * (1.0 - les) + lc[c] * (1.0 + m) * les + rng.normal() as f32 * 3.0;
            p.0[c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    let mut hairy = clean.clone();
    let mut gt = GrayImage::new(size, size);
    let mut cov = vec![0f32; (size * size) as usize];
    let mut col_of = vec![[0f32; 3]; (size * size) as usize];
    for _ in 0..30 {
        let p0 = [rng.uniform(0.0, s as f64) as f32, rng.uniform(0.0, s as f64) as f32];
        let ang = rng.uniform(0.0, std::f64::consts::PI) as f32;
        let len = rng.uniform(0.16, 0.625) as f32 * s;
        let p2 = [p0[0] + len * ang.cos(), p0[1] + len * ang.sin()];
        let bend = rng.uniform(-0.35, 0.35) as f32 * len;
        let p1 = [(p0[0] + p2[0]) / 2.0 - ang.sin() * bend, (p0[1] + p2[1]) / 2.0 + ang.cos() * bend];
        let thick = (1 + rng.below(3)) as f32 * s / 512.0;
        let v = 15.0 + rng.below(35) as f32;
        let col = [v + rng.below(16) as f32, v + rng.below(9) as f32, v];
        let steps = (len * 4.0) as usize;
        let rr = (thick / 2.0 + 1.0).ceil() as i32;
        for i in 0..=steps {
            let t = i as f32 / steps as f32;
            let px = (1.0 - t).powi(2) * p0[0] + 2.0 * (1.0 - t) * t * p1[0] + t * t * p2[0];
            let py = (1.0 - t).powi(2) * p0[1] + 2.0 * (1.0 - t) * t * p1[1] + t * t * p2[1];
            for dy in -rr..=rr {
                for dx in -rr..=rr {
                    let (x, y) = (px.round() as i32 + dx, py.round() as i32 + dy);
                    if x < 0 || y < 0 || x >= size as i32 || y >= size as i32 {
                        continue;
                    }
                    let d = ((x as f32 - px).powi(2) + (y as f32 - py).powi(2)).sqrt();
                    let c = (thick / 2.0 + 0.5 - d).clamp(0.0, 1.0);
                    let k = (y as u32 * size + x as u32) as usize;
                    if c > cov[k] {
                        cov[k] = c;
                        col_of[k] = col;
                    }
                    if d <= thick / 2.0 + 0.25 {
                        gt.put_pixel(x as u32, y as u32, image::Luma([255]));
                    }
                }
            }
        }
    }
    for (k, p) in hairy.pixels_mut().enumerate() {
        if cov[k] > 0.0 {
            for (v, &c) in p.0.iter_mut().zip(&col_of[k]) {
                *v = (*v as f32 * (1.0 - cov[k]) + c * cov[k]).round() as u8;
            }
        }
    }
    (hairy, clean, gt)
}

fn median_ms(mut f: impl FnMut(), repeats: usize) -> (f64, Vec<f64>) {
    f();
    f();
    let mut v: Vec<f64> = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let raw = v.clone();
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], raw)
}

/// Median time of each stage of the mask.
fn stage_times(img: &RgbImage, cfg: &HairConfig, repeats: usize) {
    use derm_hair::morph;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let l = derm_hair::color::luminance_u8(img);
    let (t_l, _) = median_ms(|| drop(derm_hair::color::luminance_u8(img)), repeats);
    let r = ((cfg.line_length * cfg.scale(w as u32, h as u32) - 1.0) / 2.0).round() as usize;
    let (t_bh, _) = median_ms(|| drop(morph::black_hat_lines(&l, w, h, r)), repeats);
    let (t_h, _) = median_ms(|| drop(morph::line_closing(&l, w, h, morph::LineDir::Horizontal, r)), repeats);
    let (t_v, _) = median_ms(|| drop(morph::line_closing(&l, w, h, morph::LineDir::Vertical, r)), repeats);
    let (t_d, _) = median_ms(|| drop(morph::line_closing(&l, w, h, morph::LineDir::Diagonal, r)), repeats);
    let raw = derm_hair::mask::raw_hair_mask(img, cfg);
    let (t_raw, _) = median_ms(|| drop(derm_hair::mask::raw_hair_mask(img, cfg)), repeats);
    let (t_cc, _) = median_ms(|| drop(morph::components(&raw, w, h, true)), repeats);
    let (t_dil, _) = median_ms(|| drop(morph::dilate_disc(&raw, w, h, 2.0)), repeats);
    let (t_fill, _) = median_ms(|| morph::fill_holes(&mut raw.clone(), w, h, 48), repeats);
    println!(
        "stages (ms): L* {t_l:.2}, black-hat {t_bh:.2} (one closing: h {t_h:.2} v {t_v:.2} d {t_d:.2}), \
         raw mask {t_raw:.2}, components {t_cc:.2}, dilate {t_dil:.2}, fill holes {t_fill:.2}"
    );
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let size: u32 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(512);
    let repeats: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let (img, clean, gt) = scene(size, 0);
    let cfg: HairConfig = match std::env::var("HAIR_CFG") {
        Ok(j) => serde_json::from_str(&j)?,
        Err(_) => HairConfig::default(),
    };
    stage_times(&img, &cfg, repeats);
    let no_ruler = HairConfig { rulers: false, ..cfg.clone() };
    let mask = hair_mask(&img, None, &cfg)?;
    let (t_mask, raw_mask) = median_ms(|| drop(hair_mask(&img, None, &no_ruler)), repeats);
    let (t_mask_r, _) = median_ms(|| drop(hair_mask(&img, None, &cfg)), repeats);
    let out = inpaint(&img, &mask, &cfg)?;
    let (t_inp, raw_inp) = median_ms(|| drop(inpaint(&img, &mask, &cfg)), repeats);
    let harm = HairConfig { inpaint: InpaintMethod::Harmonic, ..cfg.clone() };
    let out_h = inpaint(&img, &mask, &harm)?;
    let (t_harm, _) = median_ms(|| drop(inpaint(&img, &mask, &harm)), repeats.min(5));
    let sc = eval::pixel_scores(&mask, &gt)?;
    println!("size {size}x{size}, threads {}", rayon::current_num_threads());
    println!("hair mask (no rulers)  median {t_mask:.2} ms  {raw_mask:.2?}");
    println!("hair mask (+ rulers)   median {t_mask_r:.2} ms");
    println!("telea inpaint          median {t_inp:.2} ms  {raw_inp:.1?}");
    println!("harmonic inpaint       median {t_harm:.2} ms");
    println!(
        "mask vs drawn hairs: recall {:.4} precision {:.4} ({} masked, {} drawn)",
        sc.recall,
        sc.precision,
        sc.tp + sc.fp,
        sc.tp + sc.fn_
    );
    println!(
        "psnr vs clean: before {:.2} dB, telea {:.2} dB, harmonic {:.2} dB; on hair pixels before {:.2}, after {:.2}",
        eval::psnr(&img, &clean)?,
        eval::psnr(&out, &clean)?,
        eval::psnr(&out_h, &clean)?,
        eval::psnr_masked(&img, &clean, &gt)?,
        eval::psnr_masked(&out, &clean, &gt)?
    );
    if let Some(dir) = std::env::var_os("HAIR_BENCH_SAVE") {
        let dir = std::path::PathBuf::from(dir);
        derm_core::image_io::save_png(&dir.join("input.png"), &img)?;
        derm_core::image_io::save_png(&dir.join("mask.png"), &mask)?;
        derm_core::image_io::save_png(&dir.join("gt.png"), &gt)?;
        derm_core::image_io::save_png(&dir.join("clean.png"), &out)?;
    }
    Ok(())
}
