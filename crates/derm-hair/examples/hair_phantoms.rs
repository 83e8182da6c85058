//! Scores the occlusion mask and the inpainting on derm-data phantoms against their drawn
//! occlusion and clean images, per phantom and pooled.
//!
//! `cargo run -p derm-hair --example hair_phantoms [-- COUNT SIZE]`; `HAIR_CFG` may hold a JSON
//! `HairConfig`; `HAIR_SAVE=DIR` writes composites (image | mask: white hit, red miss, blue false |
//! inpainted).

use derm_data::phantom::{draw_phantoms, PhantomConfig};
use derm_hair::{clean, eval, HairConfig};
use image::{GrayImage, RgbImage};

fn composite(img: &RgbImage, pred: &GrayImage, truth: &GrayImage, out: &RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    let mut c = RgbImage::new(3 * w, h);
    for y in 0..h {
        for x in 0..w {
            c.put_pixel(x, y, *img.get_pixel(x, y));
            let (p, t) = (pred.get_pixel(x, y).0[0] != 0, truth.get_pixel(x, y).0[0] != 0);
            let col = match (p, t) {
                (true, true) => [255, 255, 255],
                (false, true) => [255, 0, 0],
                (true, false) => [0, 120, 255],
                _ => [0, 0, 0],
            };
            c.put_pixel(w + x, y, image::Rgb(col));
            c.put_pixel(2 * w + x, y, *out.get_pixel(x, y));
        }
    }
    c
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let count: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(16);
    let size: u32 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let cfg: HairConfig = match std::env::var("HAIR_CFG") {
        Ok(j) => serde_json::from_str(&j)?,
        Err(_) => HairConfig::default(),
    };
    let pc = PhantomConfig {
        size,
        hair_probability: 1.0,
        ruler_probability: 0.3,
        ink_probability: 0.3,
        ..PhantomConfig::default()
    };
    let save = std::env::var_os("HAIR_SAVE").map(std::path::PathBuf::from);
    let mut pooled = eval::PixelScores::default();
    let (mut leak_px, mut lesion_px) = (0.0f64, 0.0f64);
    let seed: u64 = std::env::var("HAIR_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    for p in draw_phantoms(&pc, seed, count) {
        let lesion = if std::env::var_os("HAIR_NO_LESION").is_some() { None } else { Some(&p.lesion) };
        let r = clean(&p.image, lesion, &cfg)?;
        let sc = eval::pixel_scores(&r.occlusion, &p.occlusion)?;
        let leak = eval::lesion_leak(&r.occlusion, &p.lesion, &p.occlusion)?;
        let area = p.lesion.pixels().filter(|v| v.0[0] != 0).count() as f64;
        leak_px += leak * area;
        lesion_px += area;
        pooled = pooled.merge(&sc);
        println!(
            "{}: recall {:.3} precision {:.3} leak {:.4} drawn {} psnr {:.2} -> {:.2} dB (in mask {:.2} -> {:.2})",
            p.id,
            sc.recall,
            sc.precision,
            leak,
            sc.tp + sc.fn_,
            eval::psnr(&p.image, &p.clean)?,
            eval::psnr(&r.clean, &p.clean)?,
            eval::psnr_masked(&p.image, &p.clean, &p.occlusion)?,
            eval::psnr_masked(&r.clean, &p.clean, &p.occlusion)?,
        );
        if let Some(dir) = &save {
            let c = composite(&p.image, &r.occlusion, &p.occlusion, &r.clean);
            derm_core::image_io::save_png(&dir.join(format!("{}.png", p.id)), &c)?;
        }
    }
    println!(
        "pooled: recall {:.4} precision {:.4} lesion leak {:.4}",
        pooled.recall,
        pooled.precision,
        leak_px / lesion_px.max(1.0)
    );
    Ok(())
}
