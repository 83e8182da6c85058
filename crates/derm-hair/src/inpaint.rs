//! Classic inpainting: filling masked pixels from their surroundings, without a network.
//!
//! - [`InpaintMethod::Telea`]: Telea's fast marching method (A. Telea, "An Image Inpainting
//!   Technique Based on the Fast Marching Method", J. Graphics Tools 9(1), 2004). The distance
//!   `T` to the mask's edge is marched inwards with a heap; each pixel, when reached, becomes a
//!   weighted mean of first-order extrapolations `I(q) + ∇I(q)·(p - q)` from the known pixels `q`
//!   within the radius, weighted by direction (alignment with `∇T`), distance and level-set
//!   closeness.
//! - [`InpaintMethod::Harmonic`]: the Telea fill relaxed towards the solution of Laplace's
//!   equation with the known pixels as boundary values (successive over-relaxation).
//!
//! Unmasked pixels are returned exactly as they were.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use derm_core::{bail, Result};
use image::{GrayImage, RgbImage};

use crate::config::{HairConfig, InpaintMethod};

const KNOWN: u8 = 0;
const BAND: u8 = 1;
const INSIDE: u8 = 2;

/// Fills the pixels where `mask` is non-zero, with the method and radius of `cfg` (the radius
/// scaled to the image as every size in [`HairConfig`]).
pub fn inpaint(img: &RgbImage, mask: &GrayImage, cfg: &HairConfig) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    if mask.dimensions() != (w, h) {
        bail!("inpainting mask is {}x{} but the image is {w}x{h}", mask.width(), mask.height());
    }
    let radius = (cfg.inpaint_radius * cfg.scale(w, h)).max(1.0);
    let mut out = inpaint_telea(img, mask, radius);
    if cfg.inpaint == InpaintMethod::Harmonic {
        out = relax_harmonic(&out, mask, cfg.harmonic_iterations);
    }
    Ok(out)
}

fn neighbours4(i: usize, w: usize, h: usize) -> impl Iterator<Item = usize> {
    let (x, y) = (i % w, i / w);
    [(x > 0).then(|| i - 1), (x + 1 < w).then(|| i + 1), (y > 0).then(|| i - w), (y + 1 < h).then(|| i + w)]
        .into_iter()
        .flatten()
}

/// One solution of `|∇T| = 1` from two neighbours on perpendicular axes.
fn solve(flags: &[u8], t: &[f32], a: Option<usize>, b: Option<usize>) -> f32 {
    let ka = a.filter(|&a| flags[a] != INSIDE).map(|a| t[a]);
    let kb = b.filter(|&b| flags[b] != INSIDE).map(|b| t[b]);
    match (ka, kb) {
        (Some(r), Some(s)) => {
            if (r - s).abs() >= 1.0 {
                1.0 + r.min(s)
            } else {
                (r + s + (2.0 - (r - s) * (r - s)).sqrt()) * 0.5
            }
        }
        (Some(r), None) => 1.0 + r,
        (None, Some(s)) => 1.0 + s,
        (None, None) => 1.0e6,
    }
}

/// Telea's fast marching inpainting with neighbourhood radius `radius` (px).
pub fn inpaint_telea(img: &RgbImage, mask: &GrayImage, radius: f32) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let n = w * h;
    let m = mask.as_raw();
    let mut flags: Vec<u8> = m.iter().map(|&v| if v != 0 { INSIDE } else { KNOWN }).collect();
    if !flags.contains(&INSIDE) {
        return img.clone();
    }
    if !flags.contains(&KNOWN) {
        // Nothing to fill from: keep the image as it is.
        tracing::warn!("inpainting mask covers the whole image; nothing is filled");
        return img.clone();
    }
    let mut val: Vec<f32> = img.as_raw().iter().map(|&v| v as f32).collect();
    let mut t = vec![0f32; n];
    let mut heap: BinaryHeap<Reverse<(u32, u32)>> = BinaryHeap::new();
    for i in 0..n {
        if flags[i] == INSIDE {
            t[i] = 1.0e6;
        } else if neighbours4(i, w, h).any(|j| flags[j] == INSIDE) {
            flags[i] = BAND;
            heap.push(Reverse((0f32.to_bits(), i as u32)));
        }
    }
    let r = radius.ceil() as isize;
    let r2 = radius * radius;
    let offsets: Vec<(isize, isize)> = (-r..=r)
        .flat_map(|dy| (-r..=r).map(move |dx| (dx, dy)))
        .filter(|&(dx, dy)| (dx * dx + dy * dy) as f32 <= r2 && (dx, dy) != (0, 0))
        .collect();

    while let Some(Reverse((_, pi))) = heap.pop() {
        let p = pi as usize;
        flags[p] = KNOWN;
        let nbrs: Vec<usize> = neighbours4(p, w, h).collect();
        for q in nbrs {
            if flags[q] != INSIDE {
                continue;
            }
            let (x, y) = (q % w, q / w);
            let left = (x > 0).then(|| q - 1);
            let right = (x + 1 < w).then(|| q + 1);
            let up = (y > 0).then(|| q - w);
            let down = (y + 1 < h).then(|| q + w);
            let d = solve(&flags, &t, up, left)
                .min(solve(&flags, &t, down, right))
                .min(solve(&flags, &t, up, right))
                .min(solve(&flags, &t, down, left));
            t[q] = d;
            fill_pixel(q, w, h, &flags, m, &t, &mut val, &offsets);
            flags[q] = BAND;
            heap.push(Reverse((d.to_bits(), q as u32)));
        }
    }
    let raw = val.iter().map(|&v| v.round().clamp(0.0, 255.0) as u8).collect();
    let mut out = RgbImage::from_raw(w as u32, h as u32, raw).unwrap_or_else(|| img.clone());
    // Unmasked pixels are exactly the input's.
    for (i, (o, s)) in out.pixels_mut().zip(img.pixels()).enumerate() {
        if m[i] == 0 {
            *o = *s;
        }
    }
    out
}

/// Gradient of `T` at `q` from its not-inside neighbours (central where both exist).
fn grad_t(q: usize, w: usize, h: usize, flags: &[u8], t: &[f32]) -> (f32, f32) {
    let (x, y) = (q % w, q / w);
    let ok = |i: usize| flags[i] != INSIDE;
    let gx = match (x > 0 && ok(q - 1), x + 1 < w && ok(q + 1)) {
        (true, true) => (t[q + 1] - t[q - 1]) * 0.5,
        (true, false) => t[q] - t[q - 1],
        (false, true) => t[q + 1] - t[q],
        _ => 0.0,
    };
    let gy = match (y > 0 && ok(q - w), y + 1 < h && ok(q + w)) {
        (true, true) => (t[q + w] - t[q - w]) * 0.5,
        (true, false) => t[q] - t[q - w],
        (false, true) => t[q + w] - t[q],
        _ => 0.0,
    };
    (gx, gy)
}

/// Image gradient of channel `c` at pixel `k`, from pixels that were known from the start only
/// (gradients of filled pixels would compound from pixel to pixel); zero at a filled pixel.
fn grad_i(k: usize, c: usize, w: usize, h: usize, orig: &[u8], val: &[f32]) -> (f32, f32) {
    if orig[k] != 0 {
        return (0.0, 0.0);
    }
    let (x, y) = (k % w, k / w);
    let ok = |i: usize| orig[i] == 0;
    let v = |i: usize| val[i * 3 + c];
    let gx = match (x > 0 && ok(k - 1), x + 1 < w && ok(k + 1)) {
        (true, true) => (v(k + 1) - v(k - 1)) * 0.5,
        (true, false) => v(k) - v(k - 1),
        (false, true) => v(k + 1) - v(k),
        _ => 0.0,
    };
    let gy = match (y > 0 && ok(k - w), y + 1 < h && ok(k + w)) {
        (true, true) => (v(k + w) - v(k - w)) * 0.5,
        (true, false) => v(k) - v(k - w),
        (false, true) => v(k + w) - v(k),
        _ => 0.0,
    };
    (gx, gy)
}

#[allow(clippy::too_many_arguments)]
fn fill_pixel(
    q: usize,
    w: usize,
    h: usize,
    flags: &[u8],
    orig: &[u8],
    t: &[f32],
    val: &mut [f32],
    offsets: &[(isize, isize)],
) {
    let (gx, gy) = grad_t(q, w, h, flags, t);
    let gn = (gx * gx + gy * gy).sqrt();
    let (nx, ny) = if gn > 0.0 { (gx / gn, gy / gn) } else { (0.0, 0.0) };
    let (x, y) = ((q % w) as isize, (q / w) as isize);
    let mut acc = [0f32; 3];
    let mut wsum = 0f32;
    for &(dx, dy) in offsets {
        let (kx, ky) = (x + dx, y + dy);
        if kx < 0 || ky < 0 || kx >= w as isize || ky >= h as isize {
            continue;
        }
        let k = ky as usize * w + kx as usize;
        if flags[k] == INSIDE {
            continue;
        }
        // r points from the known pixel k to the pixel being filled.
        let (rx, ry) = (-dx as f32, -dy as f32);
        let len2 = rx * rx + ry * ry;
        let len = len2.sqrt();
        let mut dir = (rx * nx + ry * ny) / len;
        if dir.abs() <= 0.01 {
            dir = 1.0e-6;
        }
        let dst = 1.0 / len2;
        let lev = 1.0 / (1.0 + (t[k] - t[q]).abs());
        let wt = (dir * dst * lev).abs();
        for (c, a) in acc.iter_mut().enumerate() {
            let (ix, iy) = grad_i(k, c, w, h, orig, val);
            *a += wt * (val[k * 3 + c] + ix * rx + iy * ry);
        }
        wsum += wt;
    }
    if wsum > 0.0 {
        for (c, a) in acc.iter().enumerate() {
            val[q * 3 + c] = (a / wsum).clamp(0.0, 255.0);
        }
    }
}

/// Relaxes the masked pixels of `img` towards the harmonic fill (Laplace's equation with the
/// unmasked pixels as boundary values) by `iterations` sweeps of successive over-relaxation.
pub fn relax_harmonic(img: &RgbImage, mask: &GrayImage, iterations: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let m = mask.as_raw();
    let idx: Vec<usize> = (0..w * h).filter(|&i| m[i] != 0).collect();
    if idx.is_empty() || idx.len() == w * h || iterations == 0 {
        return img.clone();
    }
    // Values are kept for the masked pixels only. A neighbour is another masked pixel (its
    // slot in `idx`) or a fixed boundary value; `idx` is sorted, so the slots of the pixels a
    // row up and a row down are found by pointers that advance with the sweep.
    let src = img.as_raw();
    let fixed = |j: usize| [src[j * 3] as f32, src[j * 3 + 1] as f32, src[j * 3 + 2] as f32];
    let mut val: Vec<[f32; 3]> = idx.iter().map(|&i| fixed(i)).collect();
    const OMEGA: f32 = 1.8;
    for _ in 0..iterations {
        let (mut up, mut down) = (0usize, 0usize);
        for k in 0..idx.len() {
            let i = idx[k];
            let (x, y) = (i % w, i / w);
            let mut s = [0f32; 3];
            let mut cnt = 0f32;
            let mut add = |v: [f32; 3]| {
                for (a, b) in s.iter_mut().zip(v) {
                    *a += b;
                }
                cnt += 1.0;
            };
            if x > 0 {
                add(if k > 0 && idx[k - 1] == i - 1 { val[k - 1] } else { fixed(i - 1) });
            }
            if x + 1 < w {
                add(if idx.get(k + 1) == Some(&(i + 1)) { val[k + 1] } else { fixed(i + 1) });
            }
            if y > 0 {
                while idx[up] < i - w {
                    up += 1;
                }
                add(if idx[up] == i - w { val[up] } else { fixed(i - w) });
            }
            if y + 1 < h {
                while down < idx.len() && idx[down] < i + w {
                    down += 1;
                }
                add(if down < idx.len() && idx[down] == i + w { val[down] } else { fixed(i + w) });
            }
            for (v, sc) in val[k].iter_mut().zip(s) {
                *v += OMEGA * (sc / cnt - *v);
            }
        }
    }
    let mut out = img.clone();
    for (&i, v) in idx.iter().zip(&val) {
        for (o, x) in out.as_mut()[i * 3..i * 3 + 3].iter_mut().zip(v) {
            *o = x.round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(40 + 4 * x) as u8, (30 + 3 * y) as u8, (100 + 2 * x + y) as u8]))
    }

    fn hole(w: u32, h: u32, x0: u32, y0: u32, s: u32) -> GrayImage {
        GrayImage::from_fn(w, h, |x, y| {
            image::Luma([if (x0..x0 + s).contains(&x) && (y0..y0 + s).contains(&y) { 255 } else { 0 }])
        })
    }

    #[test]
    fn keeps_unmasked_pixels_and_fills_a_smooth_gradient() {
        let img = gradient(37, 41);
        let mask = hole(37, 41, 12, 15, 9);
        for method in [InpaintMethod::Telea, InpaintMethod::Harmonic] {
            let cfg = HairConfig { inpaint: method, size_ref: 37, ..HairConfig::default() };
            let mut damaged = img.clone();
            for (x, y, p) in damaged.enumerate_pixels_mut() {
                if mask.get_pixel(x, y).0[0] != 0 {
                    p.0 = [0, 255, 0];
                }
            }
            let out = inpaint(&damaged, &mask, &cfg).unwrap();
            let mut max_err = 0i32;
            for (x, y, p) in out.enumerate_pixels() {
                if mask.get_pixel(x, y).0[0] == 0 {
                    assert_eq!(p, damaged.get_pixel(x, y), "unmasked pixel changed");
                } else {
                    for c in 0..3 {
                        let e = (p.0[c] as i32 - img.get_pixel(x, y).0[c] as i32).abs();
                        max_err = max_err.max(e);
                    }
                }
            }
            assert!(max_err <= 6, "{method:?}: max error {max_err} in a linear gradient");
        }
    }

    #[test]
    fn odd_masks() {
        let img = gradient(9, 7);
        let empty = GrayImage::new(9, 7);
        assert_eq!(inpaint_telea(&img, &empty, 3.0), img);
        let full = GrayImage::from_pixel(9, 7, image::Luma([255]));
        assert_eq!(inpaint_telea(&img, &full, 3.0), img);
        let wrong = GrayImage::new(7, 9);
        let e = inpaint(&img, &wrong, &HairConfig::default()).unwrap_err().to_string();
        assert!(e.contains("7x9") && e.contains("9x7"), "{e}");
        // A masked border column is filled from its neighbour.
        let col = GrayImage::from_fn(9, 7, |x, _| image::Luma([if x == 0 { 255 } else { 0 }]));
        let out = inpaint_telea(&img, &col, 2.0);
        for y in 0..7 {
            let d = out.get_pixel(0, y).0[0] as i32 - img.get_pixel(0, y).0[0] as i32;
            assert!(d.abs() <= 5, "{d}");
        }
    }
}
