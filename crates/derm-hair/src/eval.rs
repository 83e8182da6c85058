//! Scores of an occlusion mask and of an inpainted image against ground truth (phantoms).
//!
//! Masks are binary: any non-zero pixel is foreground.

use derm_core::{bail, Result};
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

/// Pixel counts and rates of a predicted mask against a true one.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PixelScores {
    /// Foreground in both.
    pub tp: u64,
    /// Foreground in the prediction only.
    pub fp: u64,
    /// Foreground in the truth only.
    pub fn_: u64,
    /// `tp / (tp + fn)`; 1 when the truth is empty.
    pub recall: f64,
    /// `tp / (tp + fp)`; 1 when the prediction is empty.
    pub precision: f64,
}

impl PixelScores {
    /// Adds the counts of `other` and recomputes the rates (pooled over images).
    pub fn merge(&self, other: &PixelScores) -> PixelScores {
        PixelScores::from_counts(self.tp + other.tp, self.fp + other.fp, self.fn_ + other.fn_)
    }

    /// Rates from counts.
    pub fn from_counts(tp: u64, fp: u64, fn_: u64) -> PixelScores {
        let rate = |a: u64, b: u64| if a + b == 0 { 1.0 } else { a as f64 / (a + b) as f64 };
        PixelScores { tp, fp, fn_, recall: rate(tp, fn_), precision: rate(tp, fp) }
    }
}

fn same_size(a: (u32, u32), b: (u32, u32), what: &str) -> Result<()> {
    if a != b {
        bail!("{what}: {}x{} against {}x{}", a.0, a.1, b.0, b.1);
    }
    Ok(())
}

/// Recall and precision of `pred` against `truth`.
pub fn pixel_scores(pred: &GrayImage, truth: &GrayImage) -> Result<PixelScores> {
    same_size(pred.dimensions(), truth.dimensions(), "pixel scores")?;
    let (mut tp, mut fp, mut fn_) = (0u64, 0u64, 0u64);
    for (&p, &t) in pred.as_raw().iter().zip(truth.as_raw()) {
        match (p != 0, t != 0) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            _ => {}
        }
    }
    Ok(PixelScores::from_counts(tp, fp, fn_))
}

/// Lesion pixels wrongly called occlusion: the lesion pixels that `pred` marks but `truth` (the
/// drawn occlusion) does not, as a fraction of the lesion's area. Hairs that really cross the
/// lesion are in `truth` and so do not count. 0 for an empty lesion.
pub fn lesion_leak(pred: &GrayImage, lesion: &GrayImage, truth: &GrayImage) -> Result<f64> {
    same_size(pred.dimensions(), lesion.dimensions(), "lesion leak")?;
    same_size(pred.dimensions(), truth.dimensions(), "lesion leak")?;
    let (mut area, mut leak) = (0u64, 0u64);
    for ((&p, &l), &t) in pred.as_raw().iter().zip(lesion.as_raw()).zip(truth.as_raw()) {
        if l != 0 {
            area += 1;
            if p != 0 && t == 0 {
                leak += 1;
            }
        }
    }
    Ok(if area == 0 { 0.0 } else { leak as f64 / area as f64 })
}

/// Recall inside the lesion: the share of the `truth` pixels inside `lesion` that `pred` marks
/// (NaN when `truth` has none there: nothing to recall).
pub fn lesion_recall(pred: &GrayImage, lesion: &GrayImage, truth: &GrayImage) -> Result<f64> {
    same_size(pred.dimensions(), lesion.dimensions(), "lesion recall")?;
    same_size(pred.dimensions(), truth.dimensions(), "lesion recall")?;
    let (mut n, mut tp) = (0u64, 0u64);
    for ((&p, &l), &t) in pred.as_raw().iter().zip(lesion.as_raw()).zip(truth.as_raw()) {
        if l != 0 && t != 0 {
            n += 1;
            tp += u64::from(p != 0);
        }
    }
    Ok(tp as f64 / n as f64)
}

/// Peak signal-to-noise ratio (dB, peak 255) of `a` against `b` over all pixels and channels;
/// infinite for identical images.
pub fn psnr(a: &RgbImage, b: &RgbImage) -> Result<f64> {
    same_size(a.dimensions(), b.dimensions(), "psnr")?;
    Ok(psnr_of(a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| (x, y))))
}

/// PSNR over the pixels where `mask` is non-zero only; infinite when they are identical or
/// the mask is empty.
pub fn psnr_masked(a: &RgbImage, b: &RgbImage, mask: &GrayImage) -> Result<f64> {
    same_size(a.dimensions(), b.dimensions(), "psnr")?;
    same_size(a.dimensions(), mask.dimensions(), "psnr mask")?;
    let pairs = a
        .as_raw()
        .chunks_exact(3)
        .zip(b.as_raw().chunks_exact(3))
        .zip(mask.as_raw())
        .filter(|(_, &m)| m != 0)
        .flat_map(|((pa, pb), _)| pa.iter().zip(pb).map(|(&x, &y)| (x, y)));
    Ok(psnr_of(pairs))
}

fn psnr_of(pairs: impl Iterator<Item = (u8, u8)>) -> f64 {
    let (mut se, mut n) = (0f64, 0u64);
    for (x, y) in pairs {
        let d = x as f64 - y as f64;
        se += d * d;
        n += 1;
    }
    if n == 0 || se == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (255.0f64 * 255.0 / (se / n as f64)).log10()
}

/// A large test scene for timing (the 4000 x 3000 row): textured skin with a darker
/// lesion (its mask is returned too) and 16 painted hairs ([`crate::paint`], seed 1),
/// or `base` enlarged to `w` x `h` instead of the skin when given.
pub fn large_benchmark_scene(w: u32, h: u32, base: Option<&RgbImage>) -> (RgbImage, GrayImage) {
    let inside = |x: u32, y: u32| {
        let (dx, dy) = (x as f32 / w as f32 - 0.5, y as f32 / h as f32 - 0.5);
        dx * dx + dy * dy < 0.05
    };
    let base = match base {
        Some(img) => image::imageops::resize(img, w, h, image::imageops::FilterType::Triangle),
        None => {
            let mut rng = derm_core::Rng::new(3);
            RgbImage::from_fn(w, h, |x, y| {
                let n = (rng.normal() * 4.0) as f32;
                let les = if inside(x, y) { 0.6 } else { 1.0 };
                image::Rgb([(215.0 * les + n) as u8, (168.0 * les + n) as u8, (148.0 * les + n) as u8])
            })
        }
    };
    let lesion = GrayImage::from_fn(w, h, |x, y| image::Luma([if inside(x, y) { 255 } else { 0 }]));
    let cfg = crate::paint::PaintConfig { min_hairs: 16, ..crate::paint::PaintConfig::default() };
    (crate::paint::paint_hairs(&base, Some(&lesion), 1, &cfg).image, lesion)
}

/// The image `cargo xtask bench` times the hair mask on, as the peer's benchmark draws it: a
/// 512x512 skin-like gradient with 30 dark curved hairs (random walks of 400 steps, 2 px wide),
/// always the same (seed 0).
pub fn benchmark_image() -> RgbImage {
    let mut r = derm_core::Rng::new(0);
    let mut img = RgbImage::from_fn(512, 512, |x, y| {
        let v = (8.0 * ((x as f64 / 40.0).sin() + (y as f64 / 55.0).cos())) as i32;
        image::Rgb([(205 + v) as u8, (150 + v) as u8, (130 + v) as u8])
    });
    for _ in 0..30 {
        let (mut x, mut y) = (r.uniform(0.0, 512.0), r.uniform(0.0, 512.0));
        let mut ang = r.uniform(0.0, std::f64::consts::TAU);
        for _ in 0..400 {
            ang += r.uniform(-0.05, 0.05);
            x += ang.cos();
            y += ang.sin();
            for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
                let (px, py) = (x as i64 + dx, y as i64 + dy);
                if (0..512).contains(&px) && (0..512).contains(&py) {
                    img.put_pixel(px as u32, py as u32, image::Rgb([30, 20, 15]));
                }
            }
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_on_tiny_masks() {
        let t = GrayImage::from_raw(4, 1, vec![255, 255, 0, 0]).unwrap();
        let p = GrayImage::from_raw(4, 1, vec![255, 0, 255, 0]).unwrap();
        let s = pixel_scores(&p, &t).unwrap();
        assert_eq!((s.tp, s.fp, s.fn_), (1, 1, 1));
        assert_eq!((s.recall, s.precision), (0.5, 0.5));
        let m = s.merge(&pixel_scores(&t, &t).unwrap());
        assert_eq!((m.tp, m.recall), (3, 0.75));
        let l = GrayImage::from_raw(4, 1, vec![0, 255, 255, 255]).unwrap();
        assert!((lesion_leak(&p, &l, &t).unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert!(pixel_scores(&p, &GrayImage::new(2, 2)).is_err());
    }

    #[test]
    fn psnr_values() {
        let a = RgbImage::from_pixel(4, 4, image::Rgb([100, 100, 100]));
        let mut b = a.clone();
        assert!(psnr(&a, &b).unwrap().is_infinite());
        b.put_pixel(0, 0, image::Rgb([110, 110, 110]));
        // MSE = 100 * 3 / 48.
        let want = 10.0 * (255.0f64.powi(2) / (300.0 / 48.0)).log10();
        assert!((psnr(&a, &b).unwrap() - want).abs() < 1e-9);
        let mut m = GrayImage::new(4, 4);
        m.put_pixel(0, 0, image::Luma([255]));
        assert!((psnr_masked(&a, &b, &m).unwrap() - 20.0 * (25.5f64).log10()).abs() < 1e-9);
    }
}
