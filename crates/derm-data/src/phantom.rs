//! Procedural dermoscopy phantoms with exact ground truth: derm's embedded default data, so every
//! stage trains and is tested anywhere without a download.
//!
//! A phantom is drawn in layers: skin (tone, low-frequency shading, texture, furrows), a lesion
//! (irregular border from radial harmonics, pigment pattern and colours by class), the round dark
//! vignette of a dermoscope, and then occluders: sometimes a ruler with tick marks, occasionally a
//! violet ink mark, and hairs (thin dark curves 1 to 4 px wide at 256 px, black, brown or grey,
//! and always clearly darker than the skin or lesion they cross).
//! The image before the occluders is the clean image.
//!
//! Classes differ in ways a classifier can learn. Melanoma: large, asymmetric, irregular border,
//! several colours in patches (dark brown, black, blue-grey, red, whitish), irregular globules.
//! Nevus: small to medium, symmetric, smooth border, even brown with a regular network.
//! Seborrheic keratosis: light tan to brown, sharp "stuck-on" border, waxy cerebriform ridges,
//! bright milia-like dots and a few dark comedo-like openings.
//!
//! Ground truth:
//! - the lesion mask is the pixels whose lesion coverage is at least one half (the lesion is
//!   blended with coverage falling from 1 to 0 across the border; pixels with no coverage are the
//!   background exactly);
//! - occluders are drawn anti-aliased, but pixels with less than [`MIN_COVERAGE`] are not drawn
//!   at all, and the occlusion mask is the set of pixels where the occluded image differs from
//!   the clean one by more than [`OCCLUSION_TOLERANCE`] in some channel. So every pixel outside
//!   the occlusion mask is within the tolerance of the clean image, and every pixel inside it
//!   visibly changed (a hair crossing a region of its own colour leaves no mark and is not
//!   counted).
//!
//! Phantom `i` of seed `K` is drawn from `Rng::new(K).fork(i)` alone and is the same whatever the
//! count. Its class comes from a low-discrepancy sequence over the class weights, so any prefix
//! of a set holds the classes in proportion to within one or two phantoms.

use std::path::{Path, PathBuf};

use derm_core::image_io::save_png;
use derm_core::{Error, Result, Rng};
use image::{GrayImage, RgbImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;

/// Class names of the phantoms, in label order (those of the ISIC 2017 manifest).
pub const PHANTOM_CLASSES: [&str; 3] = ["melanoma", "seborrheic_keratosis", "nevus"];
/// Label of melanoma.
pub const MELANOMA: usize = 0;
/// Label of seborrheic keratosis.
pub const SEBORRHEIC_KERATOSIS: usize = 1;
/// Label of nevus.
pub const NEVUS: usize = 2;
/// Occluder pixels covered less than this are not drawn at all.
pub const MIN_COVERAGE: f32 = 0.25;
/// The occlusion mask holds the pixels changed by more than this (0..255) in some channel.
pub const OCCLUSION_TOLERANCE: u8 = 10;
/// ISIC 2017's training class counts (melanoma, seborrheic keratosis, nevus).
pub const ISIC2017_TRAIN_COUNTS: [f64; 3] = [374.0, 254.0, 1372.0];

/// How phantoms are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PhantomConfig {
    /// Side of the square image in pixels. Hair widths and all other lengths scale with it.
    pub size: u32,
    /// Relative class frequencies (melanoma, seborrheic keratosis, nevus). The default is ISIC
    /// 2017's training imbalance, 374 : 254 : 1372, as in the paper.
    pub class_weights: Vec<f64>,
    /// Probability that a phantom has hairs.
    pub hair_probability: f64,
    /// Largest number of hairs (fewer are likelier).
    pub max_hairs: usize,
    /// Probability of a ruler with tick marks.
    pub ruler_probability: f64,
    /// Probability of a violet ink mark.
    pub ink_probability: f64,
    /// Probability of the dermoscope's round dark vignette.
    pub vignette_probability: f64,
}

impl Default for PhantomConfig {
    fn default() -> Self {
        PhantomConfig {
            size: 256,
            class_weights: ISIC2017_TRAIN_COUNTS.to_vec(),
            hair_probability: 0.6,
            max_hairs: 24,
            ruler_probability: 0.15,
            ink_probability: 0.08,
            vignette_probability: 0.6,
        }
    }
}

impl PhantomConfig {
    /// Equal class frequencies.
    pub fn balanced() -> Self {
        PhantomConfig { class_weights: vec![1.0; 3], ..Default::default() }
    }

    /// Checks sizes, weights and probabilities.
    pub fn validate(&self) -> Result<()> {
        if self.size < 16 {
            return Err(Error::invalid(format!("phantom size {} is below 16", self.size)));
        }
        let w = &self.class_weights;
        if w.len() != 3 || w.iter().any(|x| !x.is_finite() || *x < 0.0) || w.iter().sum::<f64>() <= 0.0 {
            return Err(Error::invalid(format!(
                "phantom class_weights must be 3 non-negative numbers with a positive sum, got {w:?}"
            )));
        }
        for (name, p) in [
            ("hair_probability", self.hair_probability),
            ("ruler_probability", self.ruler_probability),
            ("ink_probability", self.ink_probability),
            ("vignette_probability", self.vignette_probability),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::invalid(format!("phantom {name} {p} is not in [0, 1]")));
            }
        }
        Ok(())
    }

    /// The class of phantom `index` of `seed`.
    pub fn class_of(&self, seed: u64, index: u64) -> usize {
        let w: Vec<f64> = if self.validate().is_ok() { self.class_weights.clone() } else { vec![1.0; 3] };
        let total: f64 = w.iter().sum();
        // Golden-ratio sequence, offset by the seed: evenly spread classes in every prefix.
        let offset = Rng::new(seed).fork(u64::MAX).f64();
        let u = (offset + index as f64 * 0.618_033_988_749_894_9).fract() * total;
        let mut acc = 0.0;
        for (c, wc) in w.iter().enumerate() {
            acc += wc;
            if u < acc {
                return c;
            }
        }
        w.iter().rposition(|&x| x > 0.0).unwrap_or(NEVUS)
    }
}

/// One phantom.
#[derive(Debug, Clone, PartialEq)]
pub struct Phantom {
    /// Id (`phantom_<seed>_<index>`).
    pub id: String,
    /// The image with hairs, ruler and ink.
    pub image: RgbImage,
    /// The same image before them.
    pub clean: RgbImage,
    /// Lesion mask, 0/255.
    pub lesion: GrayImage,
    /// Occlusion mask (hairs, ruler, ink), 0/255.
    pub occlusion: GrayImage,
    /// Class index into [`PHANTOM_CLASSES`].
    pub class: usize,
}

/// A float RGB canvas (0..255).
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<[f32; 3]>,
}

impl Canvas {
    fn to_rgb(&self) -> RgbImage {
        let raw = self.px.iter().flat_map(|p| p.map(|c| c.round().clamp(0.0, 255.0) as u8)).collect();
        RgbImage::from_raw(self.w as u32, self.h as u32, raw)
            .unwrap_or_else(|| RgbImage::new(self.w as u32, self.h as u32))
    }

    /// Draws an anti-aliased polyline of points (x, y, width); pixels covered less than
    /// [`MIN_COVERAGE`] are left alone.
    fn stroke(&mut self, pts: &[(f32, f32, f32)], colour: [f32; 3], opacity: f32) {
        self.stroke_with(pts, |_| colour, opacity);
    }

    /// [`Canvas::stroke`] with the colour of each pixel a function of what lies under it.
    fn stroke_with(&mut self, pts: &[(f32, f32, f32)], colour_over: impl Fn([f32; 3]) -> [f32; 3], opacity: f32) {
        if pts.len() < 2 {
            return;
        }
        let pad = pts.iter().map(|p| p.2).fold(0.0f32, f32::max) / 2.0 + 1.0;
        let fx0 = pts.iter().map(|p| p.0).fold(f32::MAX, f32::min) - pad;
        let fy0 = pts.iter().map(|p| p.1).fold(f32::MAX, f32::min) - pad;
        let fx1 = pts.iter().map(|p| p.0).fold(f32::MIN, f32::max) + pad;
        let fy1 = pts.iter().map(|p| p.1).fold(f32::MIN, f32::max) + pad;
        let x0 = fx0.floor().max(0.0) as usize;
        let y0 = fy0.floor().max(0.0) as usize;
        let x1 = (fx1.ceil().max(0.0) as usize).min(self.w);
        let y1 = (fy1.ceil().max(0.0) as usize).min(self.h);
        if x0 >= x1 || y0 >= y1 {
            return;
        }
        let bw = x1 - x0;
        let mut cov = vec![0f32; bw * (y1 - y0)];
        for seg in pts.windows(2) {
            let ((ax, ay, aw), (bx, by, bwid)) = (seg[0], seg[1]);
            let r = aw.max(bwid) / 2.0 + 1.0;
            let sx0 = ((ax.min(bx) - r).floor().max(x0 as f32)) as usize;
            let sy0 = ((ay.min(by) - r).floor().max(y0 as f32)) as usize;
            let sx1 = ((ax.max(bx) + r).ceil().max(0.0) as usize).min(x1);
            let sy1 = ((ay.max(by) + r).ceil().max(0.0) as usize).min(y1);
            let (dx, dy) = (bx - ax, by - ay);
            let len2 = (dx * dx + dy * dy).max(1e-6);
            for y in sy0..sy1 {
                for x in sx0..sx1 {
                    let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                    let t = (((px - ax) * dx + (py - ay) * dy) / len2).clamp(0.0, 1.0);
                    let (qx, qy) = (ax + t * dx - px, ay + t * dy - py);
                    let d = (qx * qx + qy * qy).sqrt();
                    let wid = aw + t * (bwid - aw);
                    let c = (wid / 2.0 + 0.5 - d).clamp(0.0, 1.0);
                    let k = (y - y0) * bw + (x - x0);
                    if c > cov[k] {
                        cov[k] = c;
                    }
                }
            }
        }
        for (k, &c) in cov.iter().enumerate() {
            if c < MIN_COVERAGE {
                continue;
            }
            let a = c * opacity;
            let p = &mut self.px[(y0 + k / bw) * self.w + x0 + k % bw];
            let colour = colour_over(*p);
            for ch in 0..3 {
                p[ch] += (colour[ch] - p[ch]) * a;
            }
        }
    }
}

fn smooth(t: f32) -> f32 {
    t * t * (3.0 - 2.0 * t)
}

fn mix(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t]
}

fn scale(a: [f32; 3], f: f32) -> [f32; 3] {
    a.map(|c| c * f)
}

/// Smooth value noise in [0, 1] on an `n` x `n` grid with lattice spacing `cell` pixels.
fn value_noise(rng: &mut Rng, n: usize, cell: f32) -> Vec<f32> {
    let g = (n as f32 / cell).ceil() as usize + 2;
    let lat: Vec<f32> = (0..g * g).map(|_| rng.f32()).collect();
    let axis: Vec<(usize, f32)> = (0..n)
        .map(|i| {
            let f = i as f32 / cell;
            let fl = f.floor();
            ((fl as usize).min(g - 2), smooth(f - fl))
        })
        .collect();
    let mut out = vec![0f32; n * n];
    for (y, &(iy, ty)) in axis.iter().enumerate() {
        let (r0, r1) = (&lat[iy * g..], &lat[(iy + 1) * g..]);
        for (x, &(ix, tx)) in axis.iter().enumerate() {
            let a = r0[ix] + (r0[ix + 1] - r0[ix]) * tx;
            let b = r1[ix] + (r1[ix + 1] - r1[ix]) * tx;
            out[y * n + x] = a + (b - a) * ty;
        }
    }
    out
}

/// Fractal noise in [0, 1]: `octaves` layers of value noise, each half the cell of the last.
fn fbm(rng: &mut Rng, n: usize, cell: f32, octaves: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * n];
    let (mut amp, mut total, mut c) = (1.0f32, 0.0f32, cell);
    for _ in 0..octaves {
        let layer = value_noise(rng, n, c.max(1.0));
        for (o, v) in out.iter_mut().zip(&layer) {
            *o += amp * v;
        }
        total += amp;
        amp *= 0.5;
        c /= 2.0;
    }
    out.iter_mut().for_each(|v| *v /= total);
    out
}

const TABLE: usize = 1024;

/// A periodic function of the angle as a table: 1 + sum of harmonics.
fn radial_table(harmonics: &[(f32, f32, f32)]) -> Vec<f32> {
    (0..TABLE)
        .map(|i| {
            let th = i as f32 / TABLE as f32 * std::f32::consts::TAU;
            1.0 + harmonics.iter().map(|&(k, a, ph)| a * (k * th + ph).cos()).sum::<f32>()
        })
        .collect()
}

fn lookup(table: &[f32], theta: f32) -> f32 {
    let f = (theta / std::f32::consts::TAU).rem_euclid(1.0) * TABLE as f32;
    let i = f.floor() as usize % TABLE;
    let t = f - f.floor();
    table[i] + (table[(i + 1) % TABLE] - table[i]) * t
}

// Palette (sRGB 0..255).
const LIGHT_BROWN: [f32; 3] = [172.0, 112.0, 74.0];
const MID_BROWN: [f32; 3] = [128.0, 78.0, 50.0];
const DARK_BROWN: [f32; 3] = [82.0, 48.0, 34.0];
const BLACK: [f32; 3] = [42.0, 32.0, 34.0];
const BLUE_GREY: [f32; 3] = [98.0, 108.0, 130.0];
const RED: [f32; 3] = [186.0, 92.0, 96.0];
const WHITISH: [f32; 3] = [200.0, 170.0, 160.0];
const TAN: [f32; 3] = [186.0, 146.0, 104.0];
const MILIUM: [f32; 3] = [236.0, 228.0, 200.0];

/// Everything [`draw_phantom`] makes, plus the background under the lesion (for tests).
pub(crate) struct Layers {
    pub phantom: Phantom,
    #[cfg_attr(not(test), allow(dead_code))]
    pub background: RgbImage,
}

/// Draws phantom `index` of `seed`.
pub fn draw_phantom(cfg: &PhantomConfig, seed: u64, index: u64) -> Phantom {
    render(cfg, seed, index).phantom
}

/// Draws phantoms `0..count` of `seed` in parallel.
pub fn draw_phantoms(cfg: &PhantomConfig, seed: u64, count: usize) -> Vec<Phantom> {
    (0..count as u64).into_par_iter().map(|i| draw_phantom(cfg, seed, i)).collect()
}

pub(crate) fn render(cfg: &PhantomConfig, seed: u64, index: u64) -> Layers {
    let class = cfg.class_of(seed, index);
    let n = cfg.size.max(16) as usize;
    let s = n as f32 / 256.0;
    let root = Rng::new(seed).fork(index);
    let mut rng = root.fork(1);

    // Skin: tone between pink and tan, shading, mottling, fine texture and furrows.
    let pink = [238.0, 194.0, 184.0];
    let tan = [224.0, 178.0, 146.0];
    let tone = mix(pink, tan, rng.f32());
    let tone = [0, 1, 2].map(|c| tone[c] + rng.uniform(-10.0, 10.0) as f32);
    let (gx, gy) = (rng.uniform(-0.12, 0.12) as f32, rng.uniform(-0.12, 0.12) as f32);
    let mottle = fbm(&mut rng, n, 48.0 * s, 3);
    let red = value_noise(&mut rng, n, 40.0 * s);
    let fine = value_noise(&mut rng, n, 2.0 * s.max(0.5));
    let furrow = value_noise(&mut rng, n, 6.0 * s);
    let mut px = vec![[0f32; 3]; n * n];
    for y in 0..n {
        for x in 0..n {
            let k = y * n + x;
            let (u, v) = (x as f32 / n as f32 - 0.5, y as f32 / n as f32 - 0.5);
            let shade = 1.0 + gx * u + gy * v + 0.08 * (mottle[k] - 0.5) + 0.05 * (fine[k] - 0.5);
            let ridge = 1.0 - (2.0 * furrow[k] - 1.0).abs();
            let groove = 1.0 - 0.035 * ridge.powi(12);
            let r = 14.0 * (red[k] - 0.5);
            px[k] = [tone[0] * shade * groove + r, tone[1] * shade * groove - 0.5 * r, tone[2] * shade * groove];
        }
    }
    let mut skin = px.clone();

    // Lesion geometry.
    let mut rng = root.fork(2);
    let (rmin, rmax) = match class {
        MELANOMA => (0.22, 0.36),
        SEBORRHEIC_KERATOSIS => (0.17, 0.30),
        _ => (0.13, 0.25),
    };
    let radius = rng.uniform(rmin, rmax) as f32 * n as f32;
    let cx = n as f32 * (0.5 + 0.06 * rng.normal() as f32);
    let cy = n as f32 * (0.5 + 0.06 * rng.normal() as f32);
    let aspect = rng.uniform(1.0, if class == NEVUS { 1.25 } else { 1.35 }) as f32;
    let rot = rng.uniform(0.0, std::f64::consts::PI) as f32;
    let mut harm = Vec::new();
    let mut fuzz = Vec::new();
    let ph = |rng: &mut Rng| rng.uniform(0.0, std::f64::consts::TAU) as f32;
    match class {
        MELANOMA => {
            for k in 1..=7 {
                let a = rng.uniform(0.04, 0.12) as f32 / (k as f32).sqrt();
                harm.push((k as f32, a, ph(&mut rng)));
            }
            for k in 9..=16 {
                harm.push((k as f32, rng.uniform(0.0, 0.02) as f32, ph(&mut rng)));
            }
            for k in 1..=3 {
                fuzz.push((k as f32, rng.uniform(0.3, 0.9) as f32, ph(&mut rng)));
            }
        }
        SEBORRHEIC_KERATOSIS => {
            for k in 2..=5 {
                harm.push((k as f32, rng.uniform(0.01, 0.05) as f32, ph(&mut rng)));
            }
            for k in 6..=10 {
                harm.push((k as f32, rng.uniform(0.0, 0.012) as f32, ph(&mut rng)));
            }
        }
        _ => {
            harm.push((2.0, rng.uniform(0.0, 0.04) as f32, ph(&mut rng)));
            for k in 3..=5 {
                harm.push((k as f32, rng.uniform(0.0, 0.012) as f32, ph(&mut rng)));
            }
        }
    }
    let rtab = radial_table(&harm);
    let wtab = radial_table(&fuzz);
    let edge = s * match class {
        MELANOMA => rng.uniform(1.5, 3.0),
        SEBORRHEIC_KERATOSIS => rng.uniform(0.8, 1.4),
        _ => rng.uniform(1.5, 3.5),
    } as f32;

    // Pigment: per-class colours and textures.
    let n1 = fbm(&mut rng, n, radius * 0.7, 3);
    let n2 = fbm(&mut rng, n, radius * 0.5, 3);
    let net_cell = rng.uniform(4.5, 7.0) as f32 * s;
    let net = value_noise(&mut rng, n, net_cell);
    let grain = value_noise(&mut rng, n, 1.5 * s.max(0.7));
    let base = match class {
        NEVUS => mix(MID_BROWN, LIGHT_BROWN, rng.f32() * 0.9),
        SEBORRHEIC_KERATOSIS => mix(TAN, MID_BROWN, rng.f32() * 0.7),
        _ => MID_BROWN,
    };
    // Melanoma: a palette anchored in the (n1, n2) plane, shifted along an asymmetry axis.
    let mut palette: Vec<([f32; 3], [f32; 2], f32)> = Vec::new();
    if class == MELANOMA {
        let mut extra = vec![LIGHT_BROWN, BLUE_GREY, RED, WHITISH, MID_BROWN];
        rng.shuffle(&mut extra);
        let k = 2 + rng.below(2);
        let mut cols = vec![DARK_BROWN, BLACK];
        cols.extend(extra.into_iter().take(k));
        if !cols.contains(&BLUE_GREY) && rng.bernoulli(0.6) {
            cols.push(BLUE_GREY);
        }
        // Browns and black dominate; blue-grey, red and whitish areas stay small.
        for c in cols {
            let prior = if [BLUE_GREY, RED, WHITISH].contains(&c) {
                0.25
            } else if c == DARK_BROWN {
                1.5
            } else {
                1.0
            };
            palette.push((c, [rng.f32() * 0.7 + 0.15, rng.f32() * 0.7 + 0.15], prior));
        }
    }
    let asym = rng.uniform(0.0, std::f64::consts::TAU) as f32;
    let (ax, ay) = (asym.cos(), asym.sin());
    let opacity = rng.uniform(0.88, 1.0) as f32;
    let ridge_freq = rng.uniform(14.0, 22.0) as f32;
    let (cr, sr) = (rot.cos(), rot.sin());
    let mut lesion = GrayImage::new(n as u32, n as u32);
    // Distances in the (u, v) frame are at least the pixel distance (aspect >= 1), so the
    // lesion lies within this box.
    let reach =
        radius * rtab.iter().fold(0f32, |a, &b| a.max(b)) + edge * wtab.iter().fold(0.3f32, |a, &b| a.max(b)) + 2.0;
    let span = |c: f32| ((c - reach).floor().max(0.0) as usize, ((c + reach).ceil().max(0.0) as usize).min(n));
    let ((bx0, bx1), (by0, by1)) = (span(cx), span(cy));
    for y in by0..by1 {
        for x in bx0..bx1 {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let (u, v) = (dx * cr + dy * sr, (-dx * sr + dy * cr) * aspect);
            let d = (u * u + v * v).sqrt();
            let th = v.atan2(u);
            let rr = radius * lookup(&rtab, th);
            let w = edge * lookup(&wtab, th).max(0.3);
            if d >= rr + w {
                continue;
            }
            let alpha = smooth(((rr - d) / w * 0.5 + 0.5).clamp(0.0, 1.0));
            if d < rr {
                lesion.put_pixel(x as u32, y as u32, image::Luma([255]));
            }
            let k = y * n + x;
            let rho = (d / rr).min(1.0);
            let col = match class {
                NEVUS => {
                    let centre = 0.82 + 0.18 * rho * rho;
                    let netv = 1.0 - (2.0 * net[k] - 1.0).abs();
                    let lines = 1.0 - 0.16 * netv.powi(6) * (1.0 - rho * rho);
                    scale(base, centre * lines * (1.0 + 0.16 * (grain[k] - 0.5)))
                }
                SEBORRHEIC_KERATOSIS => {
                    let gyri = (n1[k] * ridge_freq).sin().abs();
                    let waxy = 0.86 + 0.26 * gyri + 0.08 * (n2[k] - 0.5);
                    scale(base, waxy * (1.0 + 0.14 * (grain[k] - 0.5)))
                }
                _ => {
                    let g = (dx * ax + dy * ay) / radius;
                    let q = [n1[k] + 0.25 * g, n2[k] - 0.15 * g];
                    let mut acc = [0f32; 3];
                    let mut tot = 0f32;
                    // Browns and black share the lesion; accents only tint near their anchors.
                    let mut accents = Vec::new();
                    for (c, a, prior) in &palette {
                        let e = (q[0] - a[0]).powi(2) + (q[1] - a[1]).powi(2);
                        if *prior < 1.0 {
                            accents.push((*c, (1.3 * (-e / 0.008).exp()).min(0.85)));
                            continue;
                        }
                        let wk = prior * (-e / 0.012).exp();
                        acc = [acc[0] + c[0] * wk, acc[1] + c[1] * wk, acc[2] + c[2] * wk];
                        tot += wk;
                    }
                    let mut c = if tot > 1e-12 { scale(acc, 1.0 / tot) } else { DARK_BROWN };
                    for (a, t) in accents {
                        c = mix(c, a, t);
                    }
                    let netv = 1.0 - (2.0 * net[k] - 1.0).abs();
                    let lines = 1.0 - 0.3 * netv.powi(4) * n2[k];
                    scale(c, lines * (1.0 + 0.22 * (grain[k] - 0.5)))
                }
            };
            let fade = if class == SEBORRHEIC_KERATOSIS { 1.0 } else { 1.0 - 0.35 * rho.powi(4) };
            let a = alpha * opacity * fade;
            let p = &mut px[k];
            *p = mix(*p, col, a);
        }
    }
    // Spots inside the lesion only (so the mask stays exact): milia and comedos, or globules.
    let spots: Vec<([f32; 3], f32, usize)> = match class {
        SEBORRHEIC_KERATOSIS => vec![(MILIUM, 0.9, 5 + rng.below(16)), (DARK_BROWN, 0.8, 2 + rng.below(7))],
        MELANOMA => vec![(BLACK, 0.85, 3 + rng.below(12))],
        _ => vec![],
    };
    for (colour, op, count) in spots {
        for _ in 0..count {
            let r = s * rng.uniform(1.0, 2.6) as f32;
            // A point inside the lesion, away from the border (melanoma: off-centre).
            let (px0, py0) = loop_point(&mut rng, &lesion, n, r);
            let (x0, x1) = (((px0 - r - 1.0).max(0.0)) as usize, ((px0 + r + 2.0) as usize).min(n));
            let (y0, y1) = (((py0 - r - 1.0).max(0.0)) as usize, ((py0 + r + 2.0) as usize).min(n));
            for y in y0..y1 {
                for x in x0..x1 {
                    if lesion.get_pixel(x as u32, y as u32).0[0] == 0 {
                        continue;
                    }
                    let d = ((x as f32 + 0.5 - px0).powi(2) + (y as f32 + 0.5 - py0).powi(2)).sqrt();
                    let a = smooth((r + 0.5 - d).clamp(0.0, 1.0)) * op;
                    let p = &mut px[y * n + x];
                    *p = mix(*p, colour, a);
                }
            }
        }
    }

    // The dermoscope's vignette darkens skin and lesion alike.
    let mut rng = root.fork(3);
    if rng.bernoulli(cfg.vignette_probability) {
        let (vx, vy) = (n as f32 * (0.5 + 0.03 * rng.normal() as f32), n as f32 * (0.5 + 0.03 * rng.normal() as f32));
        let vr = n as f32 * rng.uniform(0.5, 0.64) as f32;
        let soft = n as f32 * rng.uniform(0.02, 0.06) as f32;
        let dark = [10.0, 8.0, 8.0];
        for y in 0..n {
            for x in 0..n {
                let d = ((x as f32 + 0.5 - vx).powi(2) + (y as f32 + 0.5 - vy).powi(2)).sqrt();
                if d > vr - soft {
                    let t = smooth(((d - vr + soft) / (2.0 * soft)).clamp(0.0, 1.0));
                    for buf in [&mut px, &mut skin] {
                        buf[y * n + x] = mix(buf[y * n + x], dark, t);
                    }
                }
            }
        }
    }
    let background = Canvas { w: n, h: n, px: skin }.to_rgb();
    let mut canvas = Canvas { w: n, h: n, px };
    let clean = canvas.to_rgb();
    // Quantise to what the clean image holds, so occluders change pixels from exactly there.
    for (p, q) in canvas.px.iter_mut().zip(clean.pixels()) {
        *p = q.0.map(f32::from);
    }

    // Occluders: ruler, ink, hairs.
    let mut rng = root.fork(4);
    if rng.bernoulli(cfg.ruler_probability) {
        draw_ruler(&mut canvas, &mut rng, s);
    }
    let mut rng = root.fork(5);
    if rng.bernoulli(cfg.ink_probability) {
        let th = rng.uniform(0.0, std::f64::consts::TAU) as f32;
        let dist = radius * rng.uniform(1.15, 1.5) as f32;
        let (mut x, mut y) = (cx + dist * th.cos(), cy + dist * th.sin());
        let width = s * rng.uniform(5.0, 11.0) as f32;
        let len = n as f32 * rng.uniform(0.03, 0.25) as f32;
        let mut dir = th + std::f32::consts::FRAC_PI_2 + rng.uniform(-0.5, 0.5) as f32;
        let mut pts = vec![(x, y, width)];
        let steps = (len / (2.0 * s)).max(1.0) as usize;
        for _ in 0..steps {
            dir += 0.08 * rng.normal() as f32;
            x += 2.0 * s * dir.cos();
            y += 2.0 * s * dir.sin();
            pts.push((x, y, width));
        }
        if pts.len() == 2 {
            pts[1].0 += 0.5;
        }
        let ink = [rng.uniform(90.0, 130.0) as f32, rng.uniform(50.0, 75.0) as f32, rng.uniform(130.0, 170.0) as f32];
        canvas.stroke(&pts, ink, rng.uniform(0.55, 0.8) as f32);
    }
    let mut rng = root.fork(6);
    if cfg.max_hairs > 0 && rng.bernoulli(cfg.hair_probability) {
        let count = 1 + (cfg.max_hairs as f64 * rng.f64().powi(2)) as usize;
        for _ in 0..count.min(cfg.max_hairs) {
            draw_hair(&mut canvas, &mut rng, n, s);
        }
    }
    let image = canvas.to_rgb();
    let occlusion = GrayImage::from_fn(n as u32, n as u32, |x, y| {
        let (a, b) = (image.get_pixel(x, y).0, clean.get_pixel(x, y).0);
        let changed = (0..3).any(|c| a[c].abs_diff(b[c]) > OCCLUSION_TOLERANCE);
        image::Luma([if changed { 255 } else { 0 }])
    });
    Layers {
        phantom: Phantom { id: format!("phantom_{seed}_{index:06}"), image, clean, lesion, occlusion, class },
        background,
    }
}

/// A point well inside the lesion (falls back to the lesion's first pixel, or the centre).
fn loop_point(rng: &mut Rng, lesion: &GrayImage, n: usize, r: f32) -> (f32, f32) {
    let margin = (r + 2.0) as i64;
    for _ in 0..64 {
        let x = rng.below(n) as i64;
        let y = rng.below(n) as i64;
        let inside = |dx: i64, dy: i64| {
            let (a, b) = (x + dx, y + dy);
            a >= 0 && b >= 0 && a < n as i64 && b < n as i64 && lesion.get_pixel(a as u32, b as u32).0[0] == 255
        };
        if inside(0, 0) && inside(margin, 0) && inside(-margin, 0) && inside(0, margin) && inside(0, -margin) {
            return (x as f32 + 0.5, y as f32 + 0.5);
        }
    }
    (n as f32 / 2.0, n as f32 / 2.0)
}

fn draw_hair(canvas: &mut Canvas, rng: &mut Rng, n: usize, s: f32) {
    let nf = n as f32;
    let (mut x, mut y) = (rng.uniform(-0.1, 1.1) as f32 * nf, rng.uniform(-0.1, 1.1) as f32 * nf);
    let mut dir = rng.uniform(0.0, std::f64::consts::TAU) as f32;
    let len = nf * rng.uniform(0.25, 1.1) as f32;
    let w0 = s * (1.0 + 3.0 * rng.f32().powf(1.6));
    let bend = rng.normal() as f32 * 0.012;
    let step = 2.0 * s.max(0.5);
    let steps = (len / step).max(2.0) as usize;
    let mut pts = Vec::with_capacity(steps + 1);
    for i in 0..=steps {
        let t = i as f32 / steps as f32;
        pts.push((x, y, (w0 * (1.0 - 0.45 * t)).max(0.8 * s)));
        dir += bend + 0.03 * rng.normal() as f32;
        x += step * dir.cos();
        y += step * dir.sin();
    }
    let l = if rng.bernoulli(0.8) { rng.uniform(12.0, 60.0) } else { rng.uniform(60.0, 115.0) } as f32;
    let colour = [l * rng.uniform(1.0, 1.25) as f32, l, l * rng.uniform(0.75, 1.0) as f32];
    // A hair absorbs light: it is never lighter than what it lies on. Where its own colour is
    // not clearly darker than the skin or lesion under it (a grey hair over a dark lesion), it
    // is that background darkened by `k`; over the black corners of the field of view it all but
    // vanishes, as it does in a dermoscope.
    let k = rng.uniform(0.45, 0.7) as f32;
    let lc = luma(colour).max(1e-3);
    let over = move |under: [f32; 3]| {
        let limit = k * luma(under);
        if lc <= limit {
            colour
        } else {
            scale(colour, limit / lc)
        }
    };
    canvas.stroke_with(&pts, over, rng.uniform(0.85, 1.0) as f32);
}

/// Luma (Rec. 709 weights on the sRGB values).
fn luma(c: [f32; 3]) -> f32 {
    0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]
}

fn draw_ruler(canvas: &mut Canvas, rng: &mut Rng, s: f32) {
    let n = canvas.w as f32;
    let side = rng.below(4);
    let off = n * rng.uniform(0.04, 0.16) as f32;
    let tilt = rng.uniform(-0.2, 0.2) as f32;
    // Along the x axis for a top/bottom ruler, then turned for left/right.
    let place = |t: f32, o: f32| -> (f32, f32) {
        let (a, b) = (t, off + o + (t - n / 2.0) * tilt);
        match side {
            0 => (a, b),
            1 => (a, n - b),
            2 => (b, a),
            _ => (n - b, a),
        }
    };
    let inward = if side == 1 || side == 3 { -1.0 } else { 1.0 };
    let (t0, t1) = (-0.2 * n, 1.2 * n);
    if rng.bernoulli(0.6) {
        let band = n * rng.uniform(0.06, 0.1) as f32;
        let (a, b) = (place(t0, 0.5 * band * inward), place(t1, 0.5 * band * inward));
        let pale =
            [rng.uniform(225.0, 245.0) as f32, rng.uniform(225.0, 240.0) as f32, rng.uniform(210.0, 230.0) as f32];
        // A translucent body that clearly lightens what it covers (a tint too faint to see is
        // no occlusion).
        canvas.stroke(&[(a.0, a.1, band), (b.0, b.1, band)], pale, rng.uniform(0.6, 0.85) as f32);
    }
    let ink = rng.uniform(15.0, 50.0) as f32;
    let colour = [ink, ink, ink * 1.1];
    let lw = s * rng.uniform(1.2, 2.0) as f32;
    let (a, b) = (place(t0, 0.0), place(t1, 0.0));
    canvas.stroke(&[(a.0, a.1, lw), (b.0, b.1, lw)], colour, 0.95);
    let pitch = s * rng.uniform(7.0, 10.0) as f32;
    let tw = s * rng.uniform(1.0, 1.6) as f32;
    let mut t = rng.uniform(0.0, pitch as f64) as f32;
    let mut i = rng.below(5);
    while t < n {
        let long = if i.is_multiple_of(5) { 0.05 } else { 0.025 } * n;
        let (p, q) = (place(t, 0.0), place(t, long * inward));
        canvas.stroke(&[(p.0, p.1, tw), (q.0, q.1, tw)], colour, 0.95);
        t += pitch;
        i += 1;
    }
}

/// Writes phantoms `0..count` of `seed` as a data set in `dir`: `images/<id>.png` (occluded),
/// `clean/<id>_clean.png`, `masks/<id>_segmentation.png`, `occlusion/<id>_occlusion.png`,
/// `labels.csv` (`image_id,melanoma,seborrheic_keratosis`, like ISIC 2017) and `manifest.toml`
/// (the built-in `phantom` manifest with exact counts and the generator settings). Returns the
/// manifest's path.
pub fn write_phantom_set(dir: &Path, cfg: &PhantomConfig, seed: u64, count: usize) -> Result<PathBuf> {
    write_phantom_set_with(dir, cfg, seed, count, &|_| {})
}

/// [`write_phantom_set`], calling `progress(done)` after each chunk.
pub fn write_phantom_set_with(
    dir: &Path,
    cfg: &PhantomConfig,
    seed: u64,
    count: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<PathBuf> {
    cfg.validate()?;
    let chunk = 64;
    let mut classes = Vec::with_capacity(count);
    let mut start = 0;
    while start < count {
        let end = (start + chunk).min(count);
        let made: Vec<(String, usize)> = (start..end)
            .into_par_iter()
            .map(|i| -> Result<(String, usize)> {
                let p = draw_phantom(cfg, seed, i as u64);
                save_png(&dir.join("images").join(format!("{}.png", p.id)), &p.image)?;
                save_png(&dir.join("clean").join(crate::handoff::clean(&p.id)), &p.clean)?;
                save_png(&dir.join("masks").join(crate::handoff::segmentation(&p.id)), &p.lesion)?;
                save_png(&dir.join("occlusion").join(crate::handoff::occlusion(&p.id)), &p.occlusion)?;
                Ok((p.id, p.class))
            })
            .collect::<Result<_>>()?;
        classes.extend(made);
        start = end;
        progress(start);
    }
    let mut csv = String::from("image_id,melanoma,seborrheic_keratosis\n");
    let mut counts = [0usize; 3];
    for (id, c) in &classes {
        counts[*c] += 1;
        let hot = |k: usize| if *c == k { "1.0" } else { "0.0" };
        csv.push_str(&format!("{id},{},{}\n", hot(MELANOMA), hot(SEBORRHEIC_KERATOSIS)));
    }
    derm_core::fsutil::write_atomic(&dir.join("labels.csv"), csv.as_bytes())?;
    let mut m = Manifest::builtin("phantom")?;
    let split = &mut m.splits[0];
    split.count = Some(count);
    split.class_counts = PHANTOM_CLASSES.iter().map(|c| c.to_string()).zip(counts).collect();
    let mut gen = toml::Table::new();
    gen.insert("kind".into(), "phantom".into());
    gen.insert("seed".into(), i64::try_from(seed).map(toml::Value::from).unwrap_or_else(|_| seed.to_string().into()));
    gen.insert("count".into(), toml::Value::Integer(count as i64));
    let cfg_table =
        toml::Table::try_from(cfg).map_err(|e| Error::invalid(format!("phantom config cannot be written: {e}")))?;
    gen.insert("config".into(), toml::Value::Table(cfg_table));
    m.generator = Some(gen);
    let path = dir.join("manifest.toml");
    m.save(&path)?;
    tracing::info!(count, dir = %dir.display(), ?counts, "phantom set written");
    Ok(path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn small() -> PhantomConfig {
        PhantomConfig {
            size: 96,
            hair_probability: 1.0,
            ruler_probability: 0.5,
            ink_probability: 0.5,
            ..PhantomConfig::balanced()
        }
    }

    #[test]
    fn lesion_mask_matches_what_was_drawn() {
        let cfg = small();
        for i in 0..24 {
            let l = render(&cfg, 3, i);
            let p = &l.phantom;
            let (mut inside, mut n_in, mut outside_changed) = (0f64, 0usize, 0usize);
            for (x, y, m) in p.lesion.enumerate_pixels() {
                let (c, b) = (p.clean.get_pixel(x, y).0, l.background.get_pixel(x, y).0);
                let diff: i32 = (0..3).map(|k| (c[k] as i32 - b[k] as i32).abs()).sum();
                if m.0[0] == 255 {
                    inside += diff as f64;
                    n_in += 1;
                } else {
                    // Outside the mask only the soft border band may differ; count pixels far
                    // from the mask that differ (there must be none).
                    let near = (-6i64..=6).any(|dy| {
                        (-6i64..=6).any(|dx| {
                            let (a, b) = (x as i64 + dx, y as i64 + dy);
                            a >= 0 && b >= 0 && a < 96 && b < 96 && p.lesion.get_pixel(a as u32, b as u32).0[0] == 255
                        })
                    });
                    if diff > 0 && !near {
                        outside_changed += 1;
                    }
                }
            }
            assert!(n_in > 200, "phantom {i}: lesion of {n_in} px");
            assert!(inside / n_in as f64 > 60.0, "phantom {i}: lesion hardly differs from skin");
            assert_eq!(outside_changed, 0, "phantom {i}");
        }
    }

    #[test]
    fn occlusion_mask_is_exactly_the_changed_pixels() {
        let cfg = small();
        let mut covered = 0;
        for i in 0..24 {
            let p = draw_phantom(&cfg, 5, i);
            for (x, y, m) in p.occlusion.enumerate_pixels() {
                let (a, b) = (p.image.get_pixel(x, y).0, p.clean.get_pixel(x, y).0);
                let d = (0..3).map(|c| a[c].abs_diff(b[c])).max().unwrap();
                assert_eq!(m.0[0] == 255, d > OCCLUSION_TOLERANCE, "phantom {i} at {x},{y}");
                covered += (m.0[0] == 255) as usize;
            }
        }
        assert!(covered > 24 * 50, "hairs cover only {covered} px");
        // Without occluders, image and clean are the same and the mask is empty.
        let none = PhantomConfig { hair_probability: 0.0, ruler_probability: 0.0, ink_probability: 0.0, ..small() };
        let p = draw_phantom(&none, 5, 1);
        assert_eq!(p.image, p.clean);
        assert!(p.occlusion.pixels().all(|v| v.0[0] == 0));
    }

    #[test]
    fn phantoms_are_deterministic_and_independent_of_count() {
        let cfg = small();
        let a = draw_phantoms(&cfg, 9, 6);
        let b = draw_phantoms(&cfg, 9, 3);
        assert_eq!(&a[..3], &b[..]);
        assert_eq!(a[4], draw_phantom(&cfg, 9, 4));
        assert_ne!(a[0].image, draw_phantom(&cfg, 10, 0).image);
        assert_eq!(a[2].id, "phantom_9_000002");
    }

    #[test]
    fn class_weights_are_followed_in_every_prefix() {
        let cfg = PhantomConfig::default();
        let mut c = [0usize; 3];
        for i in 0..2000 {
            c[cfg.class_of(0, i)] += 1;
        }
        for k in 0..3 {
            assert!((c[k] as f64 - ISIC2017_TRAIN_COUNTS[k]).abs() <= 2.0, "{c:?}");
        }
        let bal = PhantomConfig::balanced();
        let mut c = [0usize; 3];
        for i in 0..30 {
            c[bal.class_of(4, i)] += 1;
        }
        assert!(c.iter().all(|&x| (9..=11).contains(&x)), "{c:?}");
        let only = PhantomConfig { class_weights: vec![0.0, 1.0, 0.0], ..Default::default() };
        assert!((0..50).all(|i| only.class_of(1, i) == SEBORRHEIC_KERATOSIS));
        assert!(PhantomConfig { class_weights: vec![1.0, 1.0], ..Default::default() }.validate().is_err());
        assert!(PhantomConfig { size: 4, ..Default::default() }.validate().is_err());
    }

    #[test]
    fn classes_differ_in_colour_and_border() {
        // Melanomas hold more colours (higher chroma spread) and rougher borders than nevi.
        let cfg = PhantomConfig {
            size: 128,
            hair_probability: 0.0,
            ruler_probability: 0.0,
            ink_probability: 0.0,
            vignette_probability: 0.0,
            ..PhantomConfig::balanced()
        };
        let stats = |p: &Phantom| {
            let vals: Vec<[f32; 3]> = p
                .lesion
                .enumerate_pixels()
                .filter(|(_, _, m)| m.0[0] == 255)
                .map(|(x, y, _)| p.clean.get_pixel(x, y).0.map(f32::from))
                .collect();
            let n = vals.len() as f32;
            let mean = vals.iter().fold([0f32; 3], |a, v| [a[0] + v[0] / n, a[1] + v[1] / n, a[2] + v[2] / n]);
            let var: f32 = vals.iter().map(|v| (0..3).map(|c| (v[c] - mean[c]).powi(2)).sum::<f32>()).sum::<f32>() / n;
            let perim = p
                .lesion
                .enumerate_pixels()
                .filter(|(x, y, m)| m.0[0] == 255 && (*x == 0 || p.lesion.get_pixel(x - 1, *y).0[0] == 0))
                .count() as f32;
            (var.sqrt(), perim / n.sqrt())
        };
        let mut mel = (0.0, 0.0);
        let mut nev = (0.0, 0.0);
        let (mut nm, mut nn) = (0.0, 0.0);
        for i in 0..30 {
            let p = draw_phantom(&cfg, 2, i);
            let (sd, rough) = stats(&p);
            match p.class {
                MELANOMA => {
                    mel.0 += sd;
                    mel.1 += rough;
                    nm += 1.0;
                }
                NEVUS => {
                    nev.0 += sd;
                    nev.1 += rough;
                    nn += 1.0;
                }
                _ => {}
            }
        }
        let (m_sd, n_sd) = (mel.0 / nm, nev.0 / nn);
        let (m_rough, n_rough) = (mel.1 / nm, nev.1 / nn);
        assert!(m_sd > 1.25 * n_sd, "colour spread: melanoma {m_sd}, nevus {n_sd}");
        assert!(m_rough > n_rough, "border roughness: melanoma {m_rough}, nevus {n_rough}");
    }

    #[test]
    fn written_set_loads_like_any_data_set() {
        let d = tempfile::tempdir().unwrap();
        let cfg = PhantomConfig { size: 32, ..PhantomConfig::balanced() };
        let mpath = write_phantom_set(d.path(), &cfg, 1, 9).unwrap();
        let ds = crate::Dataset::open_dir(d.path(), None, None).unwrap();
        assert_eq!(ds.len(), 9);
        assert_eq!(ds.class_counts(), [3, 3, 3]);
        assert!(ds
            .samples
            .iter()
            .all(|s| s.mask.is_some() && s.extra("clean").is_some() && s.extra("occlusion").is_some()));
        let m = Manifest::load(mpath.to_str().unwrap()).unwrap();
        assert_eq!(m.splits[0].count, Some(9));
        let report = crate::check::check(&m, d.path(), &Default::default(), &|| {}).unwrap();
        assert_eq!(report.problems(), 0, "{report}");
        // The built-in manifest reads it too, and an item brings its clean image and occlusion.
        let ds2 = crate::Dataset::open_dir(d.path(), Some("phantom"), None).unwrap();
        let item = ds2.load_item(4, None, &crate::ImageCache::new(1 << 20)).unwrap();
        let p = draw_phantom(&cfg, 1, 4);
        assert_eq!(item.image, p.image);
        assert_eq!(item.extra_images["clean"], p.clean);
        assert_eq!(item.extra_masks["occlusion"], p.occlusion);
        assert_eq!(item.mask.as_ref().unwrap(), &p.lesion);
        assert_eq!(item.label, Some(p.class));
    }
}
