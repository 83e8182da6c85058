//! The open pigment-network targets of issue 18 (BENCH.md, "Not met"), measured rather than
//! tested until they pass:
//!
//! - a Voronoi pigment network without hair (cells of 6 px and lines of 2 px at 160 px, 45 %
//!   darker than the lesion, with dots), at 160 and 320 px: the share of its lesion marked
//!   (target under 1 %);
//! - three dark hairs drawn over that network at 256 px: recall, precision, recall on the lesion
//!   and the share of the lesion marked where no hair is (targets above 0.9, 0.6, 0.9; under 3 %).
//!
//! `cargo run -p derm-hair --example hair_network` (`HAIR_CFG='{"coherence":0.45}'` to try
//! another config).

use derm_hair::{eval, hair_mask, HairConfig};
use image::{GrayImage, RgbImage};

/// A textured lesion: brown with a reticular pigment network (dark lines around cells of
/// about 6 px at 160 px), dark dots and noise, on noisy skin.
fn network_lesion(size: u32, seed: u64) -> (RgbImage, GrayImage) {
    let mut rng = derm_core::Rng::new(seed);
    let s = size as f32;
    let (cx, cy, rad) = (s * 0.5, s * 0.5, s * 0.3);
    let cell = 6.0 * s / 160.0;
    let mut lesion = GrayImage::new(size, size);
    let img = RgbImage::from_fn(size, size, |x, y| {
        let n = (rng.normal() * 3.0) as f32;
        let (xf, yf) = (x as f32, y as f32);
        let d = ((xf - cx).powi(2) + (yf - cy).powi(2)).sqrt();
        if d < rad {
            lesion.put_pixel(x, y, image::Luma([255]));
            // Network: the edges of a Voronoi diagram of jittered cell centres (short
            // segments meeting at junctions, as in a real reticular network).
            let (gx, gy) = ((xf / cell).floor() as i64, (yf / cell).floor() as i64);
            let (mut d1, mut d2) = (f32::MAX, f32::MAX);
            for j in gy - 1..=gy + 1 {
                for i in gx - 1..=gx + 1 {
                    let hsh = derm_core::rng::splitmix_mix(((i + 100) as u64) << 32 | (j + 100) as u64);
                    let (jx, jy) = ((hsh & 0xffff) as f32 / 65535.0, ((hsh >> 16) & 0xffff) as f32 / 65535.0);
                    let (px, py) = ((i as f32 + 0.15 + 0.7 * jx) * cell, (j as f32 + 0.15 + 0.7 * jy) * cell);
                    let d = ((xf - px).powi(2) + (yf - py).powi(2)).sqrt();
                    if d < d1 {
                        d2 = d1;
                        d1 = d;
                    } else if d < d2 {
                        d2 = d;
                    }
                }
            }
            let edge = (d2 - d1) / 2.0;
            let line = (1.0 * s / 160.0 - edge).clamp(0.0, 1.0);
            let dot = derm_core::rng::splitmix_mix(((x as u64 / 4) << 32) | (y as u64 / 4)).is_multiple_of(9)
                && x % 4 < 2
                && y % 4 < 2;
            let v = (1.0 - 0.45 * line) * if dot { 0.6 } else { 1.0 };
            image::Rgb([(140.0 * v + n) as u8, (95.0 * v + n) as u8, (70.0 * v + n) as u8])
        } else {
            image::Rgb([(215.0 + n) as u8, (170.0 + n) as u8, (150.0 + n) as u8])
        }
    });
    (img, lesion)
}
/// Recall of the `hair` pixels inside `lesion`.
fn lesion_recall(m: &GrayImage, lesion: &GrayImage, hair: &GrayImage) -> f64 {
    let (mut tp, mut n) = (0, 0);
    for ((p, l), t) in m.pixels().zip(lesion.pixels()).zip(hair.pixels()) {
        if l.0[0] != 0 && t.0[0] != 0 {
            n += 1;
            tp += usize::from(p.0[0] != 0);
        }
    }
    tp as f64 / n.max(1) as f64
}

/// Three dark hairs 1.5-3 px wide drawn into `img`, two crossing the lesion and one ending in it;
/// returns their mask.
fn draw_hairs(img: &mut RgbImage) -> GrayImage {
    let (w, h) = img.dimensions();
    let mut hair = GrayImage::new(w, h);
    let hairs = [
        ((10.0f32, 40.0f32), (250.0f32, 200.0f32), 1.5f32),
        ((60.0, 250.0), (200.0, 20.0), 3.0),
        ((5.0, 128.0), (140.0, 120.0), 2.0),
    ];
    for ((x0, y0), (x1, y1), wd) in hairs {
        for k in 0..=2000 {
            let t = k as f32 / 2000.0;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t + 12.0 * (std::f32::consts::PI * t).sin());
            for dy in -3i32..=3 {
                for dx in -3i32..=3 {
                    let (px, py) = (x.round() as i32 + dx, y.round() as i32 + dy);
                    if px < 0 || py < 0 || px >= w as i32 || py >= h as i32 {
                        continue;
                    }
                    if ((px as f32 - x).powi(2) + (py as f32 - y).powi(2)).sqrt() <= wd / 2.0 {
                        img.put_pixel(px as u32, py as u32, image::Rgb([35, 28, 25]));
                        hair.put_pixel(px as u32, py as u32, image::Luma([255]));
                    }
                }
            }
        }
    }
    hair
}

fn main() -> anyhow::Result<()> {
    let cfg: HairConfig = match std::env::var("HAIR_CFG") {
        Ok(j) => serde_json::from_str(&j)?,
        Err(_) => HairConfig::default(),
    };
    for size in [160u32, 320] {
        let (img, lesion) = network_lesion(size, 7);
        let m = hair_mask(&img, Some(&lesion), &cfg)?;
        let leak = eval::lesion_leak(&m, &lesion, &GrayImage::new(size, size))?;
        println!("network without hair, {size} px: {:.2} % of the lesion marked", leak * 100.0);
    }
    let (mut img, lesion) = network_lesion(256, 3);
    let hair = draw_hairs(&mut img);
    let m = hair_mask(&img, Some(&lesion), &cfg)?;
    let s = eval::pixel_scores(&m, &hair)?;
    println!(
        "hairs over the network, 256 px: recall {:.3}, precision {:.3}, recall on the lesion {:.3}, lesion marked beside them {:.2} %",
        s.recall,
        s.precision,
        lesion_recall(&m, &lesion, &hair),
        eval::lesion_leak(&m, &lesion, &hair)? * 100.0
    );
    Ok(())
}
