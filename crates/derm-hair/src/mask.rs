//! The occlusion mask: hairs (and, through [`crate::ruler`], rulers) after Schmid-Saugeon et al.
//! 2003.
//!
//! 1. CIE L* of every pixel ([`crate::color`]), stored as `L* * 2.55` in a byte.
//! 2. Black-hat: the largest `closing - L*` over closings with lines in four orientations
//!    ([`crate::morph::black_hat_lines`]); a thin dark structure lights up in every orientation
//!    that crosses it.
//! 3. Threshold, and removal of connected pieces below a minimum area.
//! 4. With a lesion mask: the lesion's own dark texture is kept out. A piece inside the lesion is
//!    kept only where a long straight segment fits in the mask through it (it is a thin
//!    elongated structure) and the piece continues outside the lesion (it crosses the border).
//! 5. Rulers, disc dilation, and filling of small holes.

use derm_core::{bail, Result};
use image::{GrayImage, RgbImage};

use crate::color::luminance_u8;
use crate::config::HairConfig;
use crate::morph::{black_hat_lines, components, dilate_disc, fill_holes, remove_small};

/// The smallest short side (px) an image may have.
pub const MIN_SIDE: u32 = 16;

/// Checks the image and lesion sizes shared by every entry point.
pub(crate) fn check_inputs(img: &RgbImage, lesion: Option<&GrayImage>, cfg: &HairConfig) -> Result<()> {
    cfg.validate()?;
    let (w, h) = img.dimensions();
    if w.min(h) < MIN_SIDE {
        bail!("image is {w}x{h}; hair detection needs at least {MIN_SIDE}x{MIN_SIDE} pixels");
    }
    if let Some(l) = lesion {
        if l.dimensions() != (w, h) {
            bail!("lesion mask is {}x{} but the image is {w}x{h}", l.width(), l.height());
        }
    }
    Ok(())
}

/// Black-hat response of `img`: how much darker (in `L* * 2.55`) each pixel is than its closing
/// with lines of `cfg.line_length` (scaled) in four orientations.
pub fn black_hat(img: &RgbImage, cfg: &HairConfig) -> Vec<u8> {
    // Kept for callers that want the response itself; the mask uses raw_parts.
    let (w, h) = (img.width() as usize, img.height() as usize);
    let s = cfg.scale(img.width(), img.height());
    let radius = ((cfg.line_length * s - 1.0) / 2.0).round().max(1.0) as usize;
    let l = luminance_u8(img);
    black_hat_lines(&l, w, h, radius)
}

/// The thresholded black-hat with small pieces removed: thin dark structures, before any
/// lesion correction, ruler detection or dilation (0/255, row-major).
pub fn raw_hair_mask(img: &RgbImage, cfg: &HairConfig) -> Vec<u8> {
    raw_parts(img, cfg).1
}

/// `L* * 2.55` and the raw hair mask.
pub(crate) fn raw_parts(img: &RgbImage, cfg: &HairConfig) -> (Vec<u8>, Vec<u8>) {
    let l = luminance_u8(img);
    let m = raw_from_luminance(&l, img.width() as usize, img.height() as usize, cfg);
    (l, m)
}

/// The thresholded black-hat of an `L* * 2.55` plane, small pieces removed.
fn raw_from_luminance(l: &[u8], w: usize, h: usize, cfg: &HairConfig) -> Vec<u8> {
    let s = cfg.scale(w as u32, h as u32);
    let radius = ((cfg.line_length * s - 1.0) / 2.0).round().max(1.0) as usize;
    let thr = (cfg.threshold * 2.55).round().max(1.0) as u8;
    let mut m = black_hat_lines(l, w, h, radius);
    for v in m.iter_mut() {
        *v = if *v >= thr { 255 } else { 0 };
    }
    remove_small(&mut m, w, h, (cfg.min_area * s * s).round() as usize);
    m
}

/// Violet ink: pixels whose red exceeds green by at least `t = cfg.ink_chroma`, whose blue
/// exceeds green by at least `1.75 t`, and whose blue is no more than `t / 2` below red (skin,
/// blood and pigment have blue well below red; pinkish skin has blue only a little above green),
/// with small pieces dropped and a one-pixel (scaled) margin for the anti-aliased edge.
pub fn ink_mask(img: &RgbImage, cfg: &HairConfig) -> Vec<u8> {
    let (_, m, found) = crate::color::luminance_u8_and_flags(img, ink_test(cfg));
    ink_cleanup(m, found, img.width() as usize, img.height() as usize, cfg)
}

/// The per-pixel ink test on whole r, g, b: `r - g >= t` is `r - g >= ceil(t)`,
/// `b - g >= 1.75 t` is `b - g >= ceil(1.75 t)`, and `b >= r - t / 2` is `b >= r - floor(t / 2)`.
fn ink_test(cfg: &HairConfig) -> impl Fn(i32, i32, i32) -> bool + Sync {
    let t = cfg.ink_chroma.ceil() as i32;
    let (t2, th) = ((1.75 * cfg.ink_chroma).ceil() as i32, (cfg.ink_chroma / 2.0).floor() as i32);
    move |r, g, b| r - g >= t && b - g >= t2 && b >= r - th
}

/// Drops small ink pieces and adds a one-pixel (scaled) margin for the anti-aliased edge.
fn ink_cleanup(mut m: Vec<u8>, found: usize, w: usize, h: usize, cfg: &HairConfig) -> Vec<u8> {
    if found == 0 {
        return m;
    }
    let s = cfg.scale(w as u32, h as u32);
    remove_small(&mut m, w, h, (cfg.min_area * 2.0 * s * s).round() as usize);
    dilate_disc(&m, w, h, 1.5 * s)
}

/// The occlusion mask of hairs, rulers and ink marks (0/255).
///
/// With `lesion` (non-zero inside, same size as `img`), the lesion's dark texture is kept out
/// of the mask; only thin elongated structures that cross the lesion border are kept inside it.
/// Errors for an image smaller than [`MIN_SIDE`], a lesion mask of another size, or an invalid
/// config. An image with no dark thin structure (all black, say) gives an empty mask.
pub fn hair_mask(img: &RgbImage, lesion: Option<&GrayImage>, cfg: &HairConfig) -> Result<GrayImage> {
    check_inputs(img, lesion, cfg)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let s = cfg.scale(img.width(), img.height());
    // One pass over the pixels gives the luminance and the ink candidates.
    let (raw, ink) = if cfg.ink {
        let (l, ink, found) = crate::color::luminance_u8_and_flags(img, ink_test(cfg));
        let raw = raw_from_luminance(&l, w, h, cfg);
        (raw, Some(ink_cleanup(ink, found, w, h, cfg)))
    } else {
        (raw_from_luminance(&luminance_u8(img), w, h, cfg), None)
    };
    // The ruler search reads the raw mask, before the lesion correction.
    let (raw_for_ruler, mut m) = if cfg.rulers { (Some(raw.clone()), raw) } else { (None, raw) };
    if let Some(l) = lesion {
        keep_lesion_out(&mut m, l.as_raw(), w, h, cfg, s);
    }
    if let Some(raw) = &raw_for_ruler {
        let ruler = crate::ruler::ruler_mask(raw, img, w, h, cfg);
        for (a, &b) in m.iter_mut().zip(&ruler) {
            *a |= b;
        }
    }
    if let Some(ink) = ink {
        for (a, b) in m.iter_mut().zip(ink) {
            *a |= b;
        }
    }
    // Every part is 0/255 already; a disc under one pixel changes nothing.
    if cfg.dilate_radius * s >= 1.0 {
        m = dilate_disc(&m, w, h, cfg.dilate_radius * s);
    }
    fill_holes(&mut m, w, h, (cfg.max_hole_area * s * s).round() as usize);
    if tracing::enabled!(tracing::Level::DEBUG) {
        let n = m.iter().filter(|&&v| v != 0).count();
        tracing::debug!(w, h, masked = n, "hair mask");
    }
    GrayImage::from_raw(w as u32, h as u32, m).ok_or_else(|| derm_core::Error::invalid("hair mask buffer size"))
}

/// Unit steps of the 16 line orientations used to test elongation (every 11.25°).
fn orientations() -> Vec<(f32, f32)> {
    (0..16)
        .map(|i| {
            let a = i as f32 * std::f32::consts::PI / 16.0;
            (a.cos(), a.sin())
        })
        .collect()
}

/// Number of consecutive samples in `inside` through `(x, y)` along `(cx, cy)` (both ways,
/// the pixel itself included), counting up to `cap` each way.
fn run_through(inside: &[u8], w: usize, h: usize, x: usize, y: usize, (cx, cy): (f32, f32), cap: usize) -> usize {
    let at = |k: f32| -> bool {
        let (xi, yi) = ((x as f32 + cx * k).round() as i32, (y as f32 + cy * k).round() as i32);
        xi >= 0 && yi >= 0 && (xi as usize) < w && (yi as usize) < h && inside[yi as usize * w + xi as usize] != 0
    };
    let mut n = 1;
    for sgn in [1.0f32, -1.0] {
        let mut k = 1;
        while k <= cap && at(sgn * k as f32) {
            k += 1;
        }
        n += k - 1;
    }
    n
}

/// True when `(x, y)` lies on a thin straight piece of `inside`: along some orientation the run
/// through it is at least `len` long while across it (at 90°) it is at most `width`.
#[allow(clippy::too_many_arguments)]
fn line_like(inside: &[u8], w: usize, h: usize, x: usize, y: usize, len: f32, width: f32, dirs: &[(f32, f32)]) -> bool {
    let cap = len.ceil() as usize;
    let n = dirs.len();
    (0..n).any(|i| {
        run_through(inside, w, h, x, y, dirs[i], cap) as f32 >= len
            && run_through(inside, w, h, x, y, dirs[(i + n / 2) % n], cap) as f32 <= width
    })
}

/// Removes the lesion's own texture from `m`: inside the lesion, a pixel is kept only when it
/// lies on a thin straight piece of the (1 px dilated) mask, at least `crossing_min_length` long
/// and at most `crossing_max_width` wide, and its connected piece has at least
/// `crossing_min_outside` pixels well outside the lesion (half a closing line away).
fn keep_lesion_out(m: &mut [u8], lesion: &[u8], w: usize, h: usize, cfg: &HairConfig, s: f32) {
    let loose = dilate_disc(m, w, h, 1.0);
    let len = (cfg.crossing_min_length * s).max(3.0);
    let width = (cfg.crossing_max_width * s).max(1.0) + 2.0;
    let dirs = orientations();
    let mut keep = vec![0u8; w * h];
    for i in 0..w * h {
        if m[i] == 0 {
            continue;
        }
        if lesion[i] == 0 || line_like(&loose, w, h, i % w, i / w, len, width, &dirs) {
            keep[i] = 255;
        }
    }
    // Crossing is judged on the pieces of what is kept, grown by a pixel so that a hair stays
    // connected to its outside part where a pixel or two fails the line test at the border, but
    // the lesion's own texture does not ride on a hair that merely touches it. Only pixels well
    // away from the lesion count as outside: the dark rim of the lesion's own border is often
    // just outside its mask.
    let min_out = (cfg.crossing_min_outside * s).round().max(1.0) as usize;
    let near = dilate_disc(lesion, w, h, (cfg.line_length * s / 2.0).max(2.0));
    let joined = dilate_disc(&keep, w, h, 1.0);
    for c in components(&joined, w, h, true) {
        let outside = c.pixels(w).filter(|&p| keep[p] != 0 && near[p] == 0).count();
        if outside < min_out {
            for p in c.pixels(w) {
                if lesion[p] != 0 {
                    keep[p] = 0;
                }
            }
        }
    }
    m.copy_from_slice(&keep);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A skin-coloured textured background with a dark blob lesion and a few dark curves; returns
    /// the image, the lesion mask and the curve mask.
    pub(crate) fn synthetic(size: u32, seed: u64) -> (RgbImage, GrayImage, GrayImage) {
        let mut rng = derm_core::Rng::new(seed);
        let s = size as f32;
        let (cx, cy, rad) = (s * 0.5, s * 0.5, s * 0.22);
        let mut img = RgbImage::from_fn(size, size, |x, y| {
            let n = (rng.normal() * 3.0) as f32;
            let shade = 1.0 - 0.1 * (((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)) / (s * s * 0.25));
            image::Rgb([
                (220.0 * shade + n).clamp(0.0, 255.0) as u8,
                (175.0 * shade + n).clamp(0.0, 255.0) as u8,
                (155.0 * shade + n).clamp(0.0, 255.0) as u8,
            ])
        });
        let mut lesion = GrayImage::new(size, size);
        for (x, y, p) in img.enumerate_pixels_mut() {
            let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
            if d < rad {
                lesion.put_pixel(x, y, image::Luma([255]));
                // Mottled brown with small dark dots (texture that is not hair).
                let cell = derm_core::rng::splitmix_mix(((x / 5) as u64) << 32 | (y / 5) as u64);
                let dot = cell.is_multiple_of(6) && x % 5 < 2 && y % 5 < 2;
                let v = if dot { 0.7 } else { 1.0 };
                p.0 = [(125.0 * v) as u8, (82.0 * v) as u8, (62.0 * v) as u8];
            }
        }
        let mut hair = GrayImage::new(size, size);
        for k in 0..4 {
            let y0 = s * (0.15 + 0.22 * k as f32);
            let bend = s * 0.05 * (k as f32 - 1.5);
            let width = 0.6 + 0.4 * k as f32 * s / 256.0;
            for xi in 0..size * 4 {
                let x = xi as f32 / 4.0;
                let t = x / s;
                let y = y0 + bend * (4.0 * t * (1.0 - t)) + 0.25 * x;
                for yy in (y - width).floor() as i32..=(y + width).ceil() as i32 {
                    if yy >= 0 && (yy as u32) < size && (yy as f32 - y).abs() <= width {
                        img.put_pixel(x as u32, yy as u32, image::Rgb([40, 30, 25]));
                        hair.put_pixel(x as u32, yy as u32, image::Luma([255]));
                    }
                }
            }
        }
        (img, lesion, hair)
    }

    #[test]
    fn finds_synthetic_hairs_and_keeps_the_lesion_out() {
        let (img, lesion, hair) = synthetic(128, 3);
        let cfg = HairConfig::default();
        let m = hair_mask(&img, Some(&lesion), &cfg).unwrap();
        let s = crate::eval::pixel_scores(&m, &hair).unwrap();
        let leak = crate::eval::lesion_leak(&m, &lesion, &hair).unwrap();
        assert!(s.recall > 0.95, "{s:?}");
        assert!(leak < 0.02, "leak {leak}");
        // Without the lesion mask, the dots inside the lesion are called hair.
        let m0 = hair_mask(&img, None, &cfg).unwrap();
        assert!(crate::eval::lesion_leak(&m0, &lesion, &hair).unwrap() > leak);
    }

    #[test]
    fn bad_inputs_are_errors_or_empty() {
        let cfg = HairConfig::default();
        let tiny = RgbImage::new(4, 4);
        let e = hair_mask(&tiny, None, &cfg).unwrap_err().to_string();
        assert!(e.contains("4x4"), "{e}");
        let black = RgbImage::new(40, 30);
        let m = hair_mask(&black, None, &cfg).unwrap();
        assert!(m.pixels().all(|p| p.0[0] == 0));
        let white = RgbImage::from_pixel(40, 30, image::Rgb([255, 255, 255]));
        assert!(hair_mask(&white, None, &cfg).unwrap().pixels().all(|p| p.0[0] == 0));
        let e = hair_mask(&black, Some(&GrayImage::new(30, 40)), &cfg).unwrap_err().to_string();
        assert!(e.contains("30x40") && e.contains("40x30"), "{e}");
        // A gray image read as RGB works like any other.
        let (img, _, hair) = synthetic(64, 1);
        let gray = image::DynamicImage::ImageRgb8(img).to_luma8();
        let rgb = image::DynamicImage::ImageLuma8(gray).to_rgb8();
        let m = hair_mask(&rgb, None, &cfg).unwrap();
        assert!(crate::eval::pixel_scores(&m, &hair).unwrap().recall > 0.9);
    }

    #[test]
    fn result_is_relative_to_image_size() {
        let cfg = HairConfig::default();
        // Nearest-neighbour enlargement keeps the hairs sharp: each is exactly twice as wide.
        let (small, _, _) = synthetic(256, 4);
        let big = image::imageops::resize(&small, 512, 512, image::imageops::FilterType::Nearest);
        let ms = hair_mask(&small, None, &cfg).unwrap();
        let mb = hair_mask(&big, None, &cfg).unwrap();
        let fs = ms.pixels().filter(|p| p.0[0] != 0).count() as f64 / (256.0 * 256.0);
        let fb = mb.pixels().filter(|p| p.0[0] != 0).count() as f64 / (512.0 * 512.0);
        assert!((fs - fb).abs() / fs < 0.15, "masked fraction {fs} at 256 px vs {fb} at 512 px");
    }
}
