//! The air-bubble detector ([`derm_hair::bubble`]) measured on real images:
//!
//! - `hair_bubbles paint ROOT [SIZE] [LIMIT] [SEED]`: the hair-free ISIC 2017 images under ROOT
//!   (the hair benchmark's rule), enlarged to SIZE px (256 keeps them), four bubbles painted onto
//!   each ([`derm_hair::paint::paint_bubbles`]). Reports recall and precision of the hair mask on
//!   the painted rims with the bubble test on and off, and on the unpainted images the share of
//!   image and lesion marked and how many images the test fires on (none has a painted bubble).
//! - `hair_bubbles scan ROOT OUT`: every image under ROOT; lists those on which the bubble test
//!   adds pixels to the mask, with the share added, and writes `OUT/<id>.png`: the image beside
//!   it with the added pixels in red, to be judged by eye.
//!
//! - `hair_bubbles find IMAGE...`: the bubbles found on each image at its own size.
//!
//! `HAIR_CFG='{"bubble_coverage":0.7}'` tries another config, and `SCAN_OFF='{"ink":false}'`
//! compares with another config than the bubble test off (`scan` then lists where ink adds); with `HAIR_OUT=DIR`, `paint` writes
//! the first twelve painted images, their rims and the masks there.

use std::path::PathBuf;

use anyhow::Context;
use derm_hair::bench::{read_isic2017, select_hair_free};
use derm_hair::{eval, hair_mask, paint, HairConfig};
use image::imageops::FilterType;
use image::{GrayImage, RgbImage};
use rayon::prelude::*;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg: HairConfig = match std::env::var("HAIR_CFG") {
        Ok(j) => serde_json::from_str(&j)?,
        Err(_) => HairConfig::default(),
    };
    // What the test is compared with: bubbles off, or the config in `SCAN_OFF`.
    let off: HairConfig = match std::env::var("SCAN_OFF") {
        Ok(j) => serde_json::from_str(&j)?,
        Err(_) => HairConfig { bubbles: false, ..cfg.clone() },
    };
    if args.first().map(String::as_str) == Some("find") {
        for p in &args[1..] {
            let img = image::open(p).with_context(|| format!("reading {p}"))?.to_rgb8();
            let (w, h) = (img.width() as usize, img.height() as usize);
            let l = derm_hair::color::luminance_u8(&img);
            let (found, _) = derm_hair::bubble::find_bubbles(&l, w, h, cfg.scale(w as u32, h as u32), &cfg);
            println!("{p}: {found:?}");
        }
        return Ok(());
    }
    let root = PathBuf::from(args.get(1).context("usage: hair_bubbles paint|scan ROOT ...")?);
    match args.first().map(String::as_str) {
        Some("paint") => {
            let size: u32 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(256);
            let limit: Option<usize> = args.get(3).map(|s| s.parse()).transpose()?;
            let seed: u64 = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(5);
            let mut free = select_hair_free(read_isic2017(&root, None)?);
            if let Some(k) = limit {
                free.truncate(k);
            }
            // Per image: painted scores (on, off), the unpainted image's marked shares (image,
            // lesion; on, off) and whether the test fired there.
            let rows: Vec<anyhow::Result<_>> = free
                .par_iter()
                .enumerate()
                .map(|(i, b)| {
                    let (img, lesion) = resized(&b.image, &b.lesion, size);
                    let p = paint::paint_bubbles(&img, derm_core::rng::splitmix_counter(seed, 1, i as u64), 4);
                    let mut scores = Vec::new();
                    let mut shares = Vec::new();
                    for (k, c) in [&cfg, &off].into_iter().enumerate() {
                        let m = hair_mask(&p.image, Some(&lesion), c)?;
                        if let (Ok(dir), 0, true) = (std::env::var("HAIR_OUT"), k, i < 12) {
                            p.image.save(format!("{dir}/{i}_painted.png"))?;
                            p.hair.save(format!("{dir}/{i}_truth.png"))?;
                            m.save(format!("{dir}/{i}_mask.png"))?;
                        }
                        scores.push(scores_ignoring(&m, &p.hair, &p.touched));
                        let m = hair_mask(&img, Some(&lesion), c)?;
                        let none = GrayImage::new(img.width(), img.height());
                        shares.push((share(&m), eval::lesion_leak(&m, &lesion, &none)?));
                    }
                    Ok((scores, shares))
                })
                .collect();
            let rows = rows.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
            let n = rows.len() as f64;
            for (k, name) in ["bubble test on", "bubble test off"].iter().enumerate() {
                let (tp, fp, fn_) =
                    rows.iter().fold((0u64, 0u64, 0u64), |(a, b, c), r| (a + r.0[k].0, b + r.0[k].1, c + r.0[k].2));
                let img_share = rows.iter().map(|r| r.1[k].0).sum::<f64>() / n;
                let les_share = rows.iter().map(|r| r.1[k].1).sum::<f64>() / n;
                println!(
                    "{name}: painted rims recall {:.3} precision {:.3}; unpainted: image {:.3} %, lesion {:.3} % marked",
                    tp as f64 / (tp + fn_).max(1) as f64,
                    tp as f64 / (tp + fp).max(1) as f64,
                    img_share * 100.0,
                    les_share * 100.0
                );
            }
            let fired = rows.iter().filter(|r| r.1[0].0 > r.1[1].0).count();
            println!("{} images at {size} px, seed {seed}; the test fired on {fired} unpainted ones", rows.len());
        }
        Some("scan") => {
            let out = PathBuf::from(args.get(2).context("scan needs an output folder")?);
            std::fs::create_dir_all(&out)?;
            let all = read_isic2017(&root, None)?;
            let found: Vec<anyhow::Result<Option<(String, f64)>>> = all
                .par_iter()
                .map(|b| {
                    let on = hair_mask(&b.image, Some(&b.lesion), &cfg)?;
                    let without = hair_mask(&b.image, Some(&b.lesion), &off)?;
                    let added = GrayImage::from_fn(on.width(), on.height(), |x, y| {
                        image::Luma([if on.get_pixel(x, y).0[0] != 0 && without.get_pixel(x, y).0[0] == 0 {
                            255
                        } else {
                            0
                        }])
                    });
                    if added.pixels().all(|p| p.0[0] == 0) {
                        return Ok(None);
                    }
                    let (w, h) = b.image.dimensions();
                    let mut sheet = RgbImage::new(2 * w, h);
                    image::imageops::replace(&mut sheet, &b.image, 0, 0);
                    let mut marked = b.image.clone();
                    for (p, a) in marked.pixels_mut().zip(added.pixels()) {
                        if a.0[0] != 0 {
                            *p = image::Rgb([255, 0, 0]);
                        }
                    }
                    image::imageops::replace(&mut sheet, &marked, w as i64, 0);
                    sheet.save(out.join(format!("{}.png", b.id)))?;
                    Ok(Some((b.id.clone(), share(&added))))
                })
                .collect();
            let mut flagged = Vec::new();
            for f in found {
                if let Some(x) = f? {
                    flagged.push(x);
                }
            }
            for (id, s) in &flagged {
                println!("{id} {:.3} %", s * 100.0);
            }
            println!("{} of {} images: the test added pixels", flagged.len(), all.len());
        }
        _ => anyhow::bail!("usage: hair_bubbles paint ROOT [SIZE] [LIMIT] [SEED] | scan ROOT OUT"),
    }
    Ok(())
}

/// `img` and `lesion` enlarged to `size` (Catmull-Rom; the lesion bilinear and thresholded).
fn resized(img: &RgbImage, lesion: &GrayImage, size: u32) -> (RgbImage, GrayImage) {
    if img.width() == size && img.height() == size {
        return (img.clone(), lesion.clone());
    }
    let i = image::imageops::resize(img, size, size, FilterType::CatmullRom);
    let l = image::imageops::resize(lesion, size, size, FilterType::Triangle);
    (i, GrayImage::from_fn(size, size, |x, y| image::Luma([if l.get_pixel(x, y).0[0] >= 128 { 255 } else { 0 }])))
}

/// True positives, false positives (pixels the painting did not touch) and false negatives.
fn scores_ignoring(pred: &GrayImage, truth: &GrayImage, touched: &GrayImage) -> (u64, u64, u64) {
    let (mut tp, mut fp, mut fn_) = (0, 0, 0);
    for ((p, t), u) in pred.pixels().zip(truth.pixels()).zip(touched.pixels()) {
        match (p.0[0] != 0, t.0[0] != 0) {
            (true, true) => tp += 1,
            (true, false) if u.0[0] == 0 => fp += 1,
            (false, true) => fn_ += 1,
            _ => {}
        }
    }
    (tp, fp, fn_)
}

/// Share of non-zero pixels.
fn share(m: &GrayImage) -> f64 {
    m.pixels().filter(|p| p.0[0] != 0).count() as f64 / (m.width() * m.height()) as f64
}
