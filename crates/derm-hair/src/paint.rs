//! Artificial hairs, rulers, air bubbles and ink marks painted onto real hair-free images, with
//! the exact mask: the ground truth of the real-image benchmark ([`crate::bench`]).
//!
//! Each hair is a smooth curve: a start point, a heading, and a curvature that drifts smoothly
//! along the arc (a constant bend plus a slow sine), traced in quarter-pixel steps. It is drawn
//! anti-aliased: a pixel whose centre lies at distance `d` from the curve is covered
//! `clamp(w / 2 + 0.5 - d, 0, 1)` for a hair `w` px wide, and blended towards the hair's colour
//! by that coverage times the hair's opacity. Widths are 1-6 px at a short side of 256 px and
//! scale with the image, as do lengths; colours run from near-black through brown and grey to
//! light grey (the light ones are lighter than the skin they cross). A share of the hairs start
//! inside the lesion, so they cross it. A ruler, when drawn, is a straight dark line across the
//! image near an edge with perpendicular ticks every few pixels (every fifth one longer).
//!
//! The masks: `hair` holds the pixels covered at least half (`d <= w / 2`), `touched` every pixel
//! the painting changed at all (coverage above zero); the benchmark ignores pixels in `touched`
//! but not in `hair` when it counts false positives (they are changed, but less than half).

use derm_core::Rng;
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

/// What [`paint_hairs`] draws.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PaintConfig {
    /// Fewest hairs per image.
    pub min_hairs: usize,
    /// Most hairs per image.
    pub max_hairs: usize,
    /// Narrowest and widest hair (px at a short side of 256).
    pub width: (f32, f32),
    /// Shortest and longest hair, as a share of the short side.
    pub length: (f32, f32),
    /// Share of hairs that start inside the lesion (when there is one), so they cross it.
    pub on_lesion: f64,
    /// Share of hairs lighter than the skin (grey-white hairs).
    pub light: f64,
    /// Chance of one ruler per image.
    pub ruler_probability: f64,
    /// Air bubbles per image ([`paint_bubbles`]; their rims count as occlusion with the hairs).
    pub bubbles: usize,
    /// Violet ink marks per image (a surgical marker's dots and strokes; they count as
    /// occlusion with the hairs).
    pub ink: usize,
}

impl Default for PaintConfig {
    fn default() -> Self {
        PaintConfig {
            min_hairs: 4,
            max_hairs: 16,
            width: (1.0, 6.0),
            length: (0.25, 1.0),
            on_lesion: 0.4,
            light: 0.1,
            ruler_probability: 0.15,
            bubbles: 0,
            ink: 0,
        }
    }
}

/// A painted image with its ground truth.
#[derive(Debug, Clone)]
pub struct Painted {
    /// The image with hairs (and maybe a ruler).
    pub image: RgbImage,
    /// Pixels covered at least half by a hair or the ruler (0/255).
    pub hair: GrayImage,
    /// Pixels changed at all by the painting (0/255); contains `hair`.
    pub touched: GrayImage,
}

/// Coverage accumulator: for every pixel the largest coverage seen and the colour (with opacity)
/// of the stroke that gave it.
struct Canvas {
    w: usize,
    h: usize,
    cover: Vec<f32>,
    colour: Vec<[f32; 4]>,
    /// Scratch: distance to the current stroke (MAX where not reached) and the pixels reached.
    dist: Vec<f32>,
    seen: Vec<usize>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas {
            w,
            h,
            cover: vec![0.0; w * h],
            colour: vec![[0.0; 4]; w * h],
            dist: vec![f32::MAX; w * h],
            seen: Vec::new(),
        }
    }

    /// Draws a disc-swept stroke through `pts` of width `width` with `colour` (r, g, b, opacity):
    /// every pixel gets the coverage of its distance to the nearest sample point, and keeps the
    /// stroke that covers it most.
    fn stroke(&mut self, pts: &[(f32, f32)], width: f32, colour: [f32; 4]) {
        let half = width / 2.0;
        let reach = half + 0.5;
        for &(px, py) in pts {
            let (x0, x1) = ((px - reach).floor().max(0.0) as i64, (px + reach).ceil() as i64);
            let (y0, y1) = ((py - reach).floor().max(0.0) as i64, (py + reach).ceil() as i64);
            for y in y0..=y1.min(self.h as i64 - 1) {
                for x in x0..=x1.min(self.w as i64 - 1) {
                    let d = ((x as f32 - px).powi(2) + (y as f32 - py).powi(2)).sqrt();
                    let i = y as usize * self.w + x as usize;
                    if d < reach && d < self.dist[i] {
                        if self.dist[i] == f32::MAX {
                            self.seen.push(i);
                        }
                        self.dist[i] = d;
                    }
                }
            }
        }
        for i in self.seen.drain(..) {
            let c = (half + 0.5 - self.dist[i]).clamp(0.0, 1.0);
            self.dist[i] = f32::MAX;
            if c > self.cover[i] {
                self.cover[i] = c;
                self.colour[i] = colour;
            }
        }
    }

    fn apply(self, img: &RgbImage) -> Painted {
        let (w, h) = (self.w as u32, self.h as u32);
        let mut image = img.clone();
        let mut hair = GrayImage::new(w, h);
        let mut touched = GrayImage::new(w, h);
        for (i, (p, (&c, col))) in image.pixels_mut().zip(self.cover.iter().zip(&self.colour)).enumerate() {
            if c <= 0.0 {
                continue;
            }
            let a = c * col[3];
            for (k, v) in p.0.iter_mut().enumerate() {
                *v = (*v as f32 * (1.0 - a) + col[k] * a).round().clamp(0.0, 255.0) as u8;
            }
            let (x, y) = ((i % self.w) as u32, (i / self.w) as u32);
            touched.put_pixel(x, y, image::Luma([255]));
            if c >= 0.5 {
                hair.put_pixel(x, y, image::Luma([255]));
            }
        }
        Painted { image, hair, touched }
    }
}

/// Mean colour of `img` (for light hairs, which must be lighter than the skin).
fn mean_colour(img: &RgbImage) -> [f32; 3] {
    let mut s = [0f64; 3];
    for p in img.pixels() {
        for (a, &v) in s.iter_mut().zip(&p.0) {
            *a += v as f64;
        }
    }
    let n = (img.width() * img.height()).max(1) as f64;
    [(s[0] / n) as f32, (s[1] / n) as f32, (s[2] / n) as f32]
}

/// A smooth curve of `len` px from `(x, y)` heading `a` (radians), in quarter-pixel steps, with a
/// curvature that drifts smoothly; stops at the image border.
fn curve(rng: &mut Rng, (mut x, mut y): (f32, f32), mut a: f32, len: f32, w: f32, h: f32, s: f32) -> Vec<(f32, f32)> {
    let step = 0.25f32;
    let n = (len / step).ceil() as usize;
    // Curvature in radians per px: a bend of up to about a quarter turn over a 256 px hair, plus
    // a slow sine (period of a hair's length or more).
    let k0 = rng.uniform(-1.0, 1.0) as f32 * 0.006 / s;
    let k1 = rng.uniform(0.0, 1.0) as f32 * 0.008 / s;
    let period = len * rng.uniform(1.0, 3.0) as f32;
    let phase = rng.uniform(0.0, std::f64::consts::TAU) as f32;
    let mut pts = Vec::with_capacity(n);
    for i in 0..n {
        pts.push((x, y));
        let t = i as f32 * step;
        a += (k0 + k1 * (std::f32::consts::TAU * t / period + phase).sin()) * step;
        x += a.cos() * step;
        y += a.sin() * step;
        if x < -2.0 || y < -2.0 || x > w + 1.0 || y > h + 1.0 {
            break;
        }
    }
    pts
}

/// Paints hairs (and maybe a ruler) onto `img` with `seed`; `lesion` (non-zero inside, same size)
/// lets a share of the hairs start inside the lesion.
pub fn paint_hairs(img: &RgbImage, lesion: Option<&GrayImage>, seed: u64, cfg: &PaintConfig) -> Painted {
    let (w, h) = img.dimensions();
    let (wf, hf) = (w as f32, h as f32);
    let s = w.min(h) as f32 / 256.0;
    let mut rng = Rng::new(seed);
    let mut canvas = Canvas::new(w as usize, h as usize);
    let skin = mean_colour(img);
    let lesion_px: Vec<usize> = lesion
        .map(|l| l.as_raw().iter().enumerate().filter(|(_, &v)| v != 0).map(|(i, _)| i).collect())
        .unwrap_or_default();
    let n = cfg.min_hairs + rng.below(cfg.max_hairs.saturating_sub(cfg.min_hairs) + 1);
    for _ in 0..n {
        // Widths skewed towards thin hairs (most real hairs are 1-3 px at 256).
        let u = rng.f32();
        let width = (cfg.width.0 + (cfg.width.1 - cfg.width.0) * u * u) * s;
        let len = rng.uniform(cfg.length.0 as f64, cfg.length.1 as f64) as f32 * wf.min(hf);
        let a = rng.uniform(0.0, std::f64::consts::TAU) as f32;
        let start = if !lesion_px.is_empty() && rng.bernoulli(cfg.on_lesion) {
            let i = lesion_px[rng.below(lesion_px.len())];
            // Start half a hair back so that the hair runs through the chosen lesion pixel.
            let (cx, cy) = ((i % w as usize) as f32, (i / w as usize) as f32);
            (cx - a.cos() * len * 0.5, cy - a.sin() * len * 0.5)
        } else {
            (rng.uniform(0.0, wf as f64) as f32, rng.uniform(0.0, hf as f64) as f32)
        };
        let pts: Vec<(f32, f32)> = curve(&mut rng, start, a, len, wf, hf, s)
            .into_iter()
            .filter(|&(x, y)| x > -width && y > -width && x < wf + width && y < hf + width)
            .collect();
        let colour = if rng.bernoulli(cfg.light) {
            // Grey-white: between the skin and white.
            let t = rng.uniform(0.45, 0.9) as f32;
            [skin[0] + (250.0 - skin[0]) * t, skin[1] + (250.0 - skin[1]) * t, skin[2] + (250.0 - skin[2]) * t, 0.9]
        } else {
            // Near-black to mid-grey, brownish.
            let v = rng.uniform(15.0, 120.0) as f32;
            let warm = rng.uniform(0.0, 0.25) as f32;
            [v * (1.0 + warm), v, v * (1.0 - warm * 0.5), rng.uniform(0.85, 1.0) as f32]
        };
        canvas.stroke(&pts, width, colour);
    }
    if rng.bernoulli(cfg.ruler_probability) {
        ruler(&mut rng, &mut canvas, wf, hf, s);
    }
    bubbles(&mut rng, &mut canvas, wf, hf, cfg.bubbles);
    ink(&mut rng, &mut canvas, wf, hf, s, cfg.ink);
    canvas.apply(img)
}

/// `count` violet ink marks, as a surgical skin marker leaves them: half dots (discs of radius
/// 2-5 px at 256 px), half strokes (smooth curves 15-60 px long and 2-5 px wide), in violets from
/// blue-purple to red-purple at opacity 0.7-0.95.
fn ink(rng: &mut Rng, canvas: &mut Canvas, w: f32, h: f32, s: f32, count: usize) {
    for _ in 0..count {
        let colour = [
            rng.uniform(90.0, 135.0) as f32,
            rng.uniform(25.0, 60.0) as f32,
            rng.uniform(125.0, 170.0) as f32,
            rng.uniform(0.7, 0.95) as f32,
        ];
        let start = (rng.uniform(0.0, w as f64) as f32, rng.uniform(0.0, h as f64) as f32);
        if rng.bernoulli(0.5) {
            let r = s * rng.uniform(2.0, 5.0) as f32;
            canvas.stroke(&[start], 2.0 * r, colour);
        } else {
            let len = s * rng.uniform(15.0, 60.0) as f32;
            let heading = rng.uniform(0.0, std::f64::consts::TAU) as f32;
            let width = s * rng.uniform(2.0, 5.0) as f32;
            let pts = curve(rng, start, heading, len, w, h, s);
            canvas.stroke(&pts, width, colour);
        }
    }
}

/// A straight ruler line near one edge with perpendicular ticks on one side.
fn ruler(rng: &mut Rng, canvas: &mut Canvas, w: f32, h: f32, s: f32) {
    let horizontal = rng.bernoulli(0.5);
    let tilt = rng.uniform(-0.15, 0.15) as f32;
    let (len, across) = if horizontal { (w, h) } else { (h, w) };
    let off = rng.uniform(0.08, 0.2) as f32 * across;
    let off = if rng.bernoulli(0.5) { off } else { across - off };
    let side = if off < across / 2.0 { 1.0 } else { -1.0 };
    let point = |t: f32, o: f32| -> (f32, f32) {
        // t along the ruler, o across it (towards the image centre for positive `side`).
        let (u, v) = (t, off + (t - len / 2.0) * tilt.tan() + o * side);
        if horizontal {
            (u, v)
        } else {
            (v, u)
        }
    };
    let dark = rng.uniform(10.0, 60.0) as f32;
    let colour = [dark, dark, dark, 0.95];
    let line_w = rng.uniform(1.0, 2.0) as f32 * s;
    let line: Vec<(f32, f32)> = (0..(len * 4.0) as usize).map(|i| point(i as f32 * 0.25, 0.0)).collect();
    canvas.stroke(&line, line_w, colour);
    let period = rng.uniform(5.0, 9.0) as f32 * s;
    let tick_w = rng.uniform(1.0, 1.6) as f32 * s;
    let mut t = rng.uniform(0.0, period as f64) as f32;
    let mut k = 0;
    while t < len {
        let tl = if k % 5 == 0 { 9.0 * s } else { 5.0 * s };
        let tick: Vec<(f32, f32)> = (0..(tl * 4.0) as usize).map(|i| point(t, i as f32 * 0.25)).collect();
        canvas.stroke(&tick, tick_w, colour);
        t += period;
        k += 1;
    }
}

/// `count` air bubbles painted onto `img` at random places, with their rims' mask (`hair`):
/// ellipses of long semi-axis 3-20 px (at a short side of 256 px, scaled; log-uniform) and short
/// semi-axis 0.5-1 of it, a rim 1-2.5 px wide blended towards white at opacity 0.45-0.9; two in
/// five also get a thinner inner rim at 0.75 of the size. Real bubbles in ISIC 2017
/// (ISIC_0011112) look so at 256 px.
pub fn paint_bubbles(img: &RgbImage, seed: u64, count: usize) -> Painted {
    let (w, h) = img.dimensions();
    let mut canvas = Canvas::new(w as usize, h as usize);
    bubbles(&mut Rng::new(seed), &mut canvas, w as f32, h as f32, count);
    canvas.apply(img)
}

/// Draws `count` bubbles of [`paint_bubbles`] onto `canvas` (`wf` x `hf`).
fn bubbles(rng: &mut Rng, canvas: &mut Canvas, wf: f32, hf: f32, count: usize) {
    let s = wf.min(hf) / 256.0;
    for _ in 0..count {
        let a = 3.0 * s * (20.0f32 / 3.0).powf(rng.f32());
        let b = a * rng.uniform(0.5, 1.0) as f32;
        let theta = rng.uniform(0.0, std::f64::consts::PI) as f32;
        let rim = s * rng.uniform(1.0, 2.5) as f32;
        let alpha = rng.uniform(0.45, 0.9) as f32;
        let reach = a + rim + 2.0 * s;
        let cx = reach + rng.f32() * (wf - 2.0 * reach).max(0.0);
        let cy = reach + rng.f32() * (hf - 2.0 * reach).max(0.0);
        let ring = |k: f32| -> Vec<(f32, f32)> {
            // Quarter-pixel steps along the ellipse scaled by `k`.
            let n = (2.0 * std::f32::consts::PI * k * a * 4.0).ceil().max(16.0) as usize;
            let (c, sn) = (theta.cos(), theta.sin());
            (0..n)
                .map(|i| {
                    let t = std::f32::consts::TAU * i as f32 / n as f32;
                    let (u, v) = (k * a * t.cos(), k * b * t.sin());
                    (cx + u * c - v * sn, cy + u * sn + v * c)
                })
                .collect()
        };
        let double = rng.bernoulli(0.4);
        canvas.stroke(&ring(1.0), rim, [248.0, 248.0, 248.0, alpha]);
        if double && b * 0.25 > rim + 1.0 {
            canvas.stroke(&ring(0.75), (rim * 0.6).max(s), [248.0, 248.0, 248.0, alpha * 0.8]);
        }
    }
}

/// A synthetic lesion with a pigment network and no hair, `size` px square, and its mask: brown,
/// with a reticular network (dark lines about 2 px wide, 45 % darker, around cells of about 6 px
/// at 160 px; the edges of a Voronoi diagram of jittered cell centres, so short segments meeting
/// at junctions), dark dots and noise, on noisy skin. For the tests and the `hair_network`
/// example: a hair detector must leave it out.
pub fn network_lesion(size: u32, seed: u64) -> (RgbImage, GrayImage) {
    let mut rng = Rng::new(seed);
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

/// Three near-black hairs 1.5-3 px wide (at a short side of 256 px, scaled) drawn into `img`,
/// two crossing a lesion at the centre and one ending in it (not anti-aliased); returns their
/// mask.
pub fn three_hairs(img: &mut RgbImage) -> GrayImage {
    let (w, h) = img.dimensions();
    let mut hair = GrayImage::new(w, h);
    let hairs = [
        ((10.0f32, 40.0f32), (250.0f32, 200.0f32), 1.5f32),
        ((60.0, 250.0), (200.0, 20.0), 3.0),
        ((5.0, 128.0), (140.0, 120.0), 2.0),
    ];
    // Given at 256 px.
    let s = w.min(h) as f32 / 256.0;
    let r = (2.0 * s).ceil() as i32;
    for ((x0, y0), (x1, y1), wd) in hairs {
        let (x0, y0, x1, y1, wd) = (x0 * s, y0 * s, x1 * s, y1 * s, wd * s);
        for k in 0..=2000 {
            let t = k as f32 / 2000.0;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t + 12.0 * s * (std::f32::consts::PI * t).sin());
            for dy in -r..=r {
                for dx in -r..=r {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn painting_is_seeded_and_masks_are_consistent() {
        let img = RgbImage::from_pixel(96, 80, image::Rgb([200, 150, 130]));
        let lesion = GrayImage::from_fn(96, 80, |x, y| {
            image::Luma([if (x as i32 - 48).pow(2) + (y as i32 - 40).pow(2) < 400 { 255 } else { 0 }])
        });
        let cfg = PaintConfig { ruler_probability: 1.0, ..PaintConfig::default() };
        let a = paint_hairs(&img, Some(&lesion), 5, &cfg);
        let b = paint_hairs(&img, Some(&lesion), 5, &cfg);
        assert_eq!(a.image, b.image);
        assert_eq!(a.hair, b.hair);
        let c = paint_hairs(&img, Some(&lesion), 6, &cfg);
        assert_ne!(a.hair, c.hair);
        let n_hair = a.hair.pixels().filter(|p| p.0[0] != 0).count();
        assert!(n_hair > 100, "{n_hair}");
        for ((h, t), (p, o)) in a.hair.pixels().zip(a.touched.pixels()).zip(a.image.pixels().zip(img.pixels())) {
            // Hair pixels are touched, and untouched pixels are unchanged.
            assert!(h.0[0] == 0 || t.0[0] != 0);
            if t.0[0] == 0 {
                assert_eq!(p, o);
            }
        }
    }
}
