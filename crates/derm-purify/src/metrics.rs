//! Quality inside the hole: PSNR over the hole's pixels and SSIM (Wang et al. 2004) on luma over
//! the windows centred in the hole.

use derm_core::{Error, Result};
use image::{GrayImage, RgbImage};

/// Highest PSNR reported (an exact match would be infinite).
pub const PSNR_CAP: f64 = 100.0;
/// Side of the SSIM Gaussian window.
pub const SSIM_WINDOW: usize = 11;
/// Standard deviation of the SSIM Gaussian window.
pub const SSIM_SIGMA: f64 = 1.5;

fn luma(img: &RgbImage) -> Vec<f64> {
    img.pixels().map(|p| 0.299 * p.0[0] as f64 + 0.587 * p.0[1] as f64 + 0.114 * p.0[2] as f64).collect()
}

/// PSNR (dB, peak 255, over the three channels of the hole's pixels, capped at [`PSNR_CAP`]) and
/// mean SSIM (luma, 11x11 Gaussian window with sigma 1.5, truncated and renormalised at the
/// borders, constants (0.01*255)^2 and (0.03*255)^2) over the windows centred on hole pixels, of
/// `pred` against `clean`. `hole` is non-zero in the hole. An empty hole gives (NaN, NaN).
/// Errors when the sizes differ.
pub fn hole_metrics(pred: &RgbImage, clean: &RgbImage, hole: &GrayImage) -> Result<(f64, f64)> {
    if pred.dimensions() != clean.dimensions() || hole.dimensions() != clean.dimensions() {
        return Err(Error::invalid(format!(
            "hole_metrics: prediction {:?}, clean {:?} and hole {:?} differ in size",
            pred.dimensions(),
            clean.dimensions(),
            hole.dimensions()
        )));
    }
    let (w, h) = (clean.width() as usize, clean.height() as usize);
    let idx: Vec<usize> = hole.as_raw().iter().enumerate().filter(|(_, &v)| v != 0).map(|(i, _)| i).collect();
    if idx.is_empty() {
        return Ok((f64::NAN, f64::NAN));
    }
    let (pr, cr) = (pred.as_raw(), clean.as_raw());
    let mut se = 0f64;
    for &i in &idx {
        for c in 0..3 {
            let d = pr[3 * i + c] as f64 - cr[3 * i + c] as f64;
            se += d * d;
        }
    }
    let mse = se / (3 * idx.len()) as f64;
    let psnr = if mse > 0.0 { (10.0 * (255f64 * 255.0 / mse).log10()).min(PSNR_CAP) } else { PSNR_CAP };

    let (a, b) = (luma(pred), luma(clean));
    let r = SSIM_WINDOW / 2;
    let g: Vec<f64> =
        (0..SSIM_WINDOW).map(|k| (-((k as f64 - r as f64).powi(2)) / (2.0 * SSIM_SIGMA * SSIM_SIGMA)).exp()).collect();
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let mut total = 0f64;
    for &i in &idx {
        let (x, y) = ((i % w) as isize, (i / w) as isize);
        let (mut sw, mut ma, mut mb, mut saa, mut sbb, mut sab) = (0f64, 0f64, 0f64, 0f64, 0f64, 0f64);
        for (ky, gy) in g.iter().enumerate() {
            let yy = y + ky as isize - r as isize;
            if yy < 0 || yy >= h as isize {
                continue;
            }
            for (kx, gx) in g.iter().enumerate() {
                let xx = x + kx as isize - r as isize;
                if xx < 0 || xx >= w as isize {
                    continue;
                }
                let j = yy as usize * w + xx as usize;
                let wt = gy * gx;
                sw += wt;
                ma += wt * a[j];
                mb += wt * b[j];
                saa += wt * a[j] * a[j];
                sbb += wt * b[j] * b[j];
                sab += wt * a[j] * b[j];
            }
        }
        let (ma, mb) = (ma / sw, mb / sw);
        let va = (saa / sw - ma * ma).max(0.0);
        let vb = (sbb / sw - mb * mb).max(0.0);
        let cov = sab / sw - ma * mb;
        total += ((2.0 * ma * mb + c1) * (2.0 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2));
    }
    Ok((psnr, total / idx.len() as f64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Luma, Rgb};

    #[test]
    fn identical_images_are_perfect_and_errors_lower_both() {
        let clean = RgbImage::from_fn(23, 17, |x, y| Rgb([(x * 9) as u8, (y * 13) as u8, ((x + y) * 5) as u8]));
        let hole = GrayImage::from_fn(23, 17, |x, y| {
            Luma([if (5..12).contains(&x) && (4..9).contains(&y) { 255 } else { 0 }])
        });
        let (p, s) = hole_metrics(&clean, &clean, &hole).unwrap();
        assert_eq!(p, PSNR_CAP);
        assert!((s - 1.0).abs() < 1e-12);
        // A uniform error of 10 everywhere: MSE 100, PSNR 20*log10(25.5).
        let off = RgbImage::from_fn(23, 17, |x, y| {
            let p = clean.get_pixel(x, y).0;
            Rgb([p[0].saturating_add(10), p[1].saturating_add(10), p[2].saturating_add(10)])
        });
        let (p, _) = hole_metrics(&off, &clean, &hole).unwrap();
        assert!((p - 20.0 * 25.5f64.log10()).abs() < 1e-9, "{p}");
        // Noise only outside the hole does not count for PSNR.
        let outside = RgbImage::from_fn(23, 17, |x, y| {
            if hole.get_pixel(x, y).0[0] == 0 {
                Rgb([0, 0, 0])
            } else {
                *clean.get_pixel(x, y)
            }
        });
        assert_eq!(hole_metrics(&outside, &clean, &hole).unwrap().0, PSNR_CAP);
        let flat = RgbImage::from_pixel(23, 17, Rgb([128, 128, 128]));
        let (_, s) = hole_metrics(&flat, &clean, &hole).unwrap();
        assert!(s < 0.5, "{s}");
        assert!(hole_metrics(&flat, &clean, &GrayImage::new(23, 17)).unwrap().0.is_nan());
        assert!(hole_metrics(&flat, &clean, &GrayImage::new(3, 3)).is_err());
    }
}
