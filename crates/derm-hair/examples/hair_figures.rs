//! The README's hair figures, from the ISIC 2017 training images (256 px):
//!
//! `cargo run -p derm-hair --example hair_figures -- ROOT OUT_DIR`
//!
//! - `hair_real_before_after.png`: real hairy images (hairs over the lesion), one per row: the
//!   input, the mask of the detector before issue 18 (red), the current mask (red), the current
//!   cleaned image. The ground-truth lesion masks are given, as the pipeline gives the
//!   segmenter's.
//! - `hair_painted_benchmark.png`: three cases of the real-image benchmark (paint seed 18): the
//!   painted input, the painted hair mask, derm's mask, derm's cleaned image, the original.
//! - `hair_bubbles.png`: real images with air bubbles: the input, the mask without the bubble
//!   test (red), the current mask (red), the current cleaned image.

use std::path::PathBuf;

use derm_hair::bench::{make_case, read_isic2017, select_hair_free, BenchConfig, BenchImage};
use derm_hair::paint::PaintConfig;
use derm_hair::{clean_mask, hair_mask, legacy_hair_mask, HairConfig};
use image::{GrayImage, Rgb, RgbImage};

/// `img` with the non-zero pixels of `mask` in red.
fn red(img: &RgbImage, mask: &GrayImage) -> RgbImage {
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        if mask.get_pixel(x, y).0[0] != 0 {
            Rgb([255, 0, 0])
        } else {
            *img.get_pixel(x, y)
        }
    })
}

fn grey(mask: &GrayImage) -> RgbImage {
    RgbImage::from_fn(mask.width(), mask.height(), |x, y| {
        let v = mask.get_pixel(x, y).0[0];
        Rgb([v, v, v])
    })
}

/// Tiles in rows, 4 px white gaps.
fn sheet(rows: &[Vec<RgbImage>]) -> RgbImage {
    let gap = 4;
    let (tw, th) = rows[0][0].dimensions();
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let mut out = RgbImage::from_pixel(cols * (tw + gap) - gap, rows.len() as u32 * (th + gap) - gap, Rgb([255; 3]));
    for (r, row) in rows.iter().enumerate() {
        for (c, t) in row.iter().enumerate() {
            image::imageops::replace(&mut out, t, (c as u32 * (tw + gap)) as i64, (r as u32 * (th + gap)) as i64);
        }
    }
    out
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = PathBuf::from(args.first().map(String::as_str).unwrap_or("/work/shared/data/isic2017-train-256"));
    let out = PathBuf::from(args.get(1).map(String::as_str).unwrap_or("docs/img"));
    std::fs::create_dir_all(&out)?;
    let cfg = HairConfig::default();
    let all = read_isic2017(&root, None)?;
    // Rows of real images: the input, the `before` mask (red), the current mask (red), cleaned.
    let compare = |ids: &[&str], before: &dyn Fn(&BenchImage) -> derm_core::Result<GrayImage>| {
        let mut rows = Vec::new();
        for id in ids {
            let Some(b) = all.iter().find(|b| b.id == *id) else {
                anyhow::bail!("{id} is not under {}", root.display())
            };
            let after = hair_mask(&b.image, Some(&b.lesion), &cfg)?;
            let cleaned = clean_mask(&b.image, after.clone(), &cfg)?.clean;
            rows.push(vec![b.image.clone(), red(&b.image, &before(b)?), red(&b.image, &after), cleaned]);
        }
        Ok(sheet(&rows))
    };
    let legacy = |b: &BenchImage| legacy_hair_mask(&b.image, Some(&b.lesion), &cfg);
    compare(&["ISIC_0000138", "ISIC_0000042", "ISIC_0000167", "ISIC_0000219"], &legacy)?
        .save(out.join("hair_real_before_after.png"))?;
    let no_bubbles = HairConfig { bubbles: false, ..cfg.clone() };
    let without = |b: &BenchImage| hair_mask(&b.image, Some(&b.lesion), &no_bubbles);
    compare(&["ISIC_0000111", "ISIC_0000147", "ISIC_0010222", "ISIC_0015112"], &without)?
        .save(out.join("hair_bubbles.png"))?;
    let free = select_hair_free(all);
    let bench = BenchConfig { seed: 18, size: 256, paint: PaintConfig::default(), export: None };
    let mut rows = Vec::new();
    for (i, b) in free.iter().enumerate().take(3) {
        let (orig, lesion, painted) = make_case(b, i, &bench);
        let m = hair_mask(&painted.image, Some(&lesion), &cfg)?;
        let r = clean_mask(&painted.image, m, &cfg)?;
        rows.push(vec![painted.image.clone(), grey(&painted.hair), grey(&r.occlusion), r.clean, orig]);
    }
    sheet(&rows).save(out.join("hair_painted_benchmark.png"))?;
    println!("wrote {}", out.display());
    Ok(())
}
