//! Augmentation: flips, 90-degree rotations, random crops with rescaling, free rotations and
//! elastic warps, colour jitter, and random erasing.
//!
//! One draw of the geometric transform is applied to the image, its mask and every paired image
//! or mask (a phantom's clean image and occlusion mask), so they stay aligned pixel for pixel;
//! one draw of the colour jitter is applied to every colour image of the sample alike, so an
//! (occluded, clean) pair keeps its relation.

use derm_core::image_io::{resize_mask, resize_rgb, Crop};
use derm_core::symmetry::Symmetry;
use derm_core::Rng;
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::cache::Item;

/// What augmentation draws from. Jitter strengths are the largest relative change (0 = off).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Flip left-right with probability one half.
    pub hflip: bool,
    /// Flip top-bottom with probability one half.
    pub vflip: bool,
    /// Rotate by a random multiple of 90 degrees.
    pub rot90: bool,
    /// Side of the random square-ish crop as a fraction of the image side, drawn uniformly from
    /// this range; `[1.0, 1.0]` disables cropping. The crop is rescaled to the output size.
    pub crop_scale: [f64; 2],
    /// Brightness factor drawn from `1 ± brightness`.
    pub brightness: f64,
    /// Contrast factor drawn from `1 ± contrast` (about the mean luma).
    pub contrast: f64,
    /// Saturation factor drawn from `1 ± saturation` (blend with the luma).
    pub saturation: f64,
    /// Hue rotation drawn from `± hue` turns (in the YIQ chroma plane).
    pub hue: f64,
    /// Free rotation about the centre by an angle drawn uniformly from `± rotate` degrees (0 =
    /// off). Where the turned window reaches past the image, the image is mirrored at its edge.
    pub rotate: f64,
    /// Elastic warp: each point of a 5 x 5 grid over the output moves by up to this share of
    /// the output's side in each direction (uniform draws), and the pixels between follow by
    /// bilinear interpolation of the moves (0 = off). 0.03 bends a lesion's border visibly
    /// without tearing it.
    pub elastic: f64,
    /// Random erasing: with this probability a box of 2-25 % of the view (sides' ratio 0.3 to
    /// 3.3) is filled with uniform noise, in the sample's main colour image only: masks keep
    /// showing what lies under it, and paired images (a phantom's clean image) are left whole
    /// (0 = off).
    pub erase: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            hflip: true,
            vflip: true,
            rot90: true,
            crop_scale: [0.8, 1.0],
            brightness: 0.1,
            contrast: 0.1,
            saturation: 0.1,
            hue: 0.02,
            rotate: 0.0,
            elastic: 0.0,
            erase: 0.0,
        }
    }
}

impl AugmentConfig {
    /// Checks that every range is one a draw can come from: crop sides in (0, 1] and ordered,
    /// jitter strengths in [0, 1), rotations in [0, 180] degrees, elastic reach in [0, 0.25].
    pub fn validate(&self) -> derm_core::Result<()> {
        let bad = |what: String| Err(derm_core::Error::invalid(format!("augment: {what}")));
        let [lo, hi] = self.crop_scale;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return bad(format!("crop_scale [{lo}, {hi}] must satisfy 0 < low <= high <= 1"));
        }
        for (name, v) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
            ("hue", self.hue),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(format!("{name} {v} is not in [0, 1)"));
            }
        }
        if !(0.0..=180.0).contains(&self.rotate) {
            return bad(format!("rotate {} degrees is not in [0, 180]", self.rotate));
        }
        if !(0.0..=0.25).contains(&self.elastic) {
            return bad(format!("elastic {} is not in [0, 0.25] (a share of the side)", self.elastic));
        }
        if !(0.0..=1.0).contains(&self.erase) {
            return bad(format!("erase {} is not a probability", self.erase));
        }
        Ok(())
    }

    /// Geometric transforms only (no colour jitter).
    pub fn geometric() -> Self {
        AugmentConfig { brightness: 0.0, contrast: 0.0, saturation: 0.0, hue: 0.0, ..Default::default() }
    }

    /// Left-right and top-bottom flips only (the paper's classification augmentation).
    pub fn flips() -> Self {
        AugmentConfig { rot90: false, crop_scale: [1.0, 1.0], ..Self::geometric() }
    }

    /// The augmentation in words (`flips`, `flips, quarter turns, crops 0.8-1, colour jitter 0.1,
    /// hue 0.02`, `none`), for run logs.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match (self.hflip, self.vflip) {
            (true, true) => parts.push("flips".to_string()),
            (true, false) => parts.push("left-right flips".to_string()),
            (false, true) => parts.push("top-bottom flips".to_string()),
            (false, false) => {}
        }
        if self.rot90 {
            parts.push("quarter turns".into());
        }
        let [lo, hi] = self.crop_scale;
        if lo < 1.0 || hi < 1.0 {
            parts.push(format!("crops {lo}-{hi}"));
        }
        let jitter = self.brightness.max(self.contrast).max(self.saturation);
        if jitter > 0.0 {
            parts.push(format!("colour jitter {jitter}"));
        }
        if self.hue > 0.0 {
            parts.push(format!("hue {}", self.hue));
        }
        if self.rotate > 0.0 {
            parts.push(format!("rotations ±{}°", self.rotate));
        }
        if self.elastic > 0.0 {
            parts.push(format!("elastic {}", self.elastic));
        }
        if self.erase > 0.0 {
            parts.push(format!("erasing {}", self.erase));
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }

    /// The symmetries of the square this augmentation trains a model to ignore, identity first:
    /// the test-time views ([`Symmetry::group`] of its flips and quarter turns).
    pub fn symmetries(&self) -> Vec<Symmetry> {
        Symmetry::group(self.hflip, self.vflip, self.rot90)
    }

    /// The views a model trained with this augmentation averages at test time: its
    /// [`AugmentConfig::symmetries`] when `tta` is on, the image alone when it is off.
    pub fn test_time_views(&self, tta: bool) -> Vec<Symmetry> {
        if tta {
            self.symmetries()
        } else {
            vec![Symmetry::IDENTITY]
        }
    }
}

/// One draw of the geometric transform.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    /// Flip left-right.
    pub hflip: bool,
    /// Flip top-bottom.
    pub vflip: bool,
    /// Quarter turns clockwise (0..4).
    pub quarter_turns: u8,
    /// The crop window, on the flipped and rotated image.
    pub crop: Crop,
    /// Output size (width, height).
    pub out: (u32, u32),
    /// The free rotation and elastic warp, if the augmentation draws them.
    pub warp: Option<Warp>,
}

/// Control points per side of the elastic warp's grid.
pub const WARP_GRID: usize = 5;

/// One draw of the free rotation and the elastic warp, applied in the output's frame: the output
/// pixel at `p` reads the crop (rescaled to the output size) at
/// `centre + R(angle) (p - centre) + d(p)`, `d` interpolated bilinearly from the moves at a
/// [`WARP_GRID`] x [`WARP_GRID`] grid spanning the output (corners included).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Warp {
    /// Rotation in radians.
    pub angle: f32,
    /// Moves `(dx, dy)` in output pixels at the grid points, row by row.
    pub moves: [[f32; 2]; WARP_GRID * WARP_GRID],
}

impl Warp {
    /// Draws a warp for an output of `out`, or `None` when the augmentation has neither a free
    /// rotation nor an elastic warp (then nothing is drawn from `rng`).
    pub fn draw(cfg: &AugmentConfig, out: (u32, u32), rng: &mut Rng) -> Option<Warp> {
        if cfg.rotate <= 0.0 && cfg.elastic <= 0.0 {
            return None;
        }
        let angle = if cfg.rotate > 0.0 { rng.uniform(-cfg.rotate, cfg.rotate).to_radians() as f32 } else { 0.0 };
        let mut moves = [[0.0f32; 2]; WARP_GRID * WARP_GRID];
        if cfg.elastic > 0.0 {
            let reach = [cfg.elastic * out.0 as f64, cfg.elastic * out.1 as f64];
            for m in &mut moves {
                *m = [rng.uniform(-reach[0], reach[0]) as f32, rng.uniform(-reach[1], reach[1]) as f32];
            }
        }
        Some(Warp { angle, moves })
    }

    /// The move at a point of the output (continuous pixel coordinates).
    fn moved(&self, x: f32, y: f32, out: (u32, u32)) -> [f32; 2] {
        let last = (WARP_GRID - 1) as f32;
        let gx = (x / out.0.max(1) as f32 * last).clamp(0.0, last);
        let gy = (y / out.1.max(1) as f32 * last).clamp(0.0, last);
        let (i, j) = ((gx as usize).min(WARP_GRID - 2), (gy as usize).min(WARP_GRID - 2));
        let (fx, fy) = (gx - i as f32, gy - j as f32);
        let at = |i: usize, j: usize| self.moves[j * WARP_GRID + i];
        let (a, b, c, d) = (at(i, j), at(i + 1, j), at(i, j + 1), at(i + 1, j + 1));
        let lerp = |k: usize| (a[k] * (1.0 - fx) + b[k] * fx) * (1.0 - fy) + (c[k] * (1.0 - fx) + d[k] * fx) * fy;
        [lerp(0), lerp(1)]
    }

    /// Where each output pixel `(x, y)` of an output of `out` reads, in the output's continuous
    /// frame (pixel centres at half-integers); the rotation's sine and cosine are taken once.
    fn source(&self, out: (u32, u32)) -> impl Fn(u32, u32) -> [f32; 2] + '_ {
        let (cx, cy) = (out.0 as f32 / 2.0, out.1 as f32 / 2.0);
        let (sin, cos) = self.angle.sin_cos();
        move |x, y| {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let (u, v) = (px - cx, py - cy);
            let d = self.moved(px, py, out);
            [cx + cos * u - sin * v + d[0], cy + sin * u + cos * v + d[1]]
        }
    }
}

/// Mirrors a continuous pixel index into `0..=n-1` (the edge pixel is not repeated).
fn mirror(t: f32, n: u32) -> f32 {
    let last = n.saturating_sub(1) as f32;
    if last == 0.0 {
        return 0.0;
    }
    let period = 2.0 * last;
    let t = t.rem_euclid(period);
    if t > last {
        period - t
    } else {
        t
    }
}

/// Bilinear samples of an interleaved `u8` image of `dims` with `channels` channels, read where
/// `at` says for each output pixel (continuous coordinates, centres at half-integers; mirrored at
/// the edges).
fn resample(
    raw: &[u8],
    dims: (u32, u32),
    channels: usize,
    out: (u32, u32),
    at: impl Fn(u32, u32) -> [f32; 2],
) -> Vec<f32> {
    let (w, h) = dims;
    let mut v = Vec::with_capacity(out.0 as usize * out.1 as usize * channels);
    if w == 0 || h == 0 {
        v.resize(out.0 as usize * out.1 as usize * channels, 0.0);
        return v;
    }
    for y in 0..out.1 {
        for x in 0..out.0 {
            let [sx, sy] = at(x, y);
            let (fx, fy) = (mirror(sx - 0.5, w), mirror(sy - 0.5, h));
            let (x0, y0) = (fx.floor() as u32, fy.floor() as u32);
            let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
            let (ax, ay) = (fx - x0 as f32, fy - y0 as f32);
            let px = |x: u32, y: u32, c: usize| raw[(y as usize * w as usize + x as usize) * channels + c] as f32;
            for c in 0..channels {
                let top = px(x0, y0, c) * (1.0 - ax) + px(x1, y0, c) * ax;
                let bottom = px(x0, y1, c) * (1.0 - ax) + px(x1, y1, c) * ax;
                v.push(top * (1.0 - ay) + bottom * ay);
            }
        }
    }
    v
}

/// One draw of the colour jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Jitter {
    /// Brightness factor.
    pub brightness: f32,
    /// Contrast factor.
    pub contrast: f32,
    /// Saturation factor.
    pub saturation: f32,
    /// Hue rotation in radians.
    pub hue: f32,
}

impl Geometry {
    /// Draws a transform for images of `dims`, producing images of `out` (default `dims`).
    pub fn draw(cfg: &AugmentConfig, dims: (u32, u32), out: Option<(u32, u32)>, rng: &mut Rng) -> Geometry {
        let hflip = cfg.hflip && rng.bernoulli(0.5);
        let vflip = cfg.vflip && rng.bernoulli(0.5);
        let quarter_turns = if cfg.rot90 { rng.below(4) as u8 } else { 0 };
        let (w, h) = if quarter_turns % 2 == 1 { (dims.1, dims.0) } else { dims };
        let [lo, hi] = cfg.crop_scale;
        let s = if hi > lo { rng.uniform(lo, hi) } else { hi }.clamp(0.05, 1.0);
        let cw = ((w as f64 * s).round() as u32).clamp(1, w);
        let ch = ((h as f64 * s).round() as u32).clamp(1, h);
        let crop = Crop::random(w, h, cw, ch, rng);
        let out = out.unwrap_or(dims);
        let warp = Warp::draw(cfg, out, rng);
        Geometry { hflip, vflip, quarter_turns, crop, out, warp }
    }

    /// The flips and quarter turns as one symmetry of the square.
    pub fn symmetry(&self) -> Symmetry {
        let flips = Symmetry { hflip: self.hflip, vflip: self.vflip, transpose: false };
        (0..self.quarter_turns).fold(flips, |s, _| s.then(Symmetry::QUARTER_TURN))
    }

    /// Applies the transform to a colour image.
    pub fn rgb(&self, img: &RgbImage) -> RgbImage {
        let turned = self.symmetry().image(img);
        match self.warped(turned.as_raw(), turned.dimensions(), 3) {
            Some(v) => RgbImage::from_raw(self.out.0, self.out.1, v.iter().map(|c| c.round() as u8).collect())
                .unwrap_or_else(|| unreachable!("resample writes out.0 x out.1 x 3 values")),
            None => resize_rgb(&self.crop.apply(&turned), self.out.0, self.out.1),
        }
    }

    /// Applies the transform to a binary mask (re-binarised after rescaling or warping).
    pub fn mask(&self, m: &GrayImage) -> GrayImage {
        let turned = self.symmetry().image(m);
        match self.warped(turned.as_raw(), turned.dimensions(), 1) {
            Some(v) => GrayImage::from_raw(
                self.out.0,
                self.out.1,
                v.iter().map(|&c| if c >= 127.5 { 255 } else { 0 }).collect(),
            )
            .unwrap_or_else(|| unreachable!("resample writes out.0 x out.1 values")),
            None => resize_mask(&self.crop.apply(&turned), self.out.0, self.out.1),
        }
    }

    /// With a warp: the crop, rescaled to the output size, rotated and warped, read from the
    /// flipped and turned image in one bilinear pass (one interpolation, not two).
    fn warped(&self, raw: &[u8], dims: (u32, u32), channels: usize) -> Option<Vec<f32>> {
        let warp = self.warp.as_ref()?;
        let sx = self.crop.w as f32 / self.out.0.max(1) as f32;
        let sy = self.crop.h as f32 / self.out.1.max(1) as f32;
        let (ox, oy) = (self.crop.x as f32, self.crop.y as f32);
        let source = warp.source(self.out);
        Some(resample(raw, dims, channels, self.out, |x, y| {
            let [u, v] = source(x, y);
            [ox + u * sx, oy + v * sy]
        }))
    }
}

impl Jitter {
    /// Draws a jitter.
    pub fn draw(cfg: &AugmentConfig, rng: &mut Rng) -> Jitter {
        let mut f = |s: f64| if s > 0.0 { rng.uniform(1.0 - s, 1.0 + s) as f32 } else { 1.0 };
        let brightness = f(cfg.brightness);
        let contrast = f(cfg.contrast);
        let saturation = f(cfg.saturation);
        let hue = if cfg.hue > 0.0 { (rng.uniform(-cfg.hue, cfg.hue) * std::f64::consts::TAU) as f32 } else { 0.0 };
        Jitter { brightness, contrast, saturation, hue }
    }

    /// True when the jitter changes nothing.
    pub fn is_identity(&self) -> bool {
        self.brightness == 1.0 && self.contrast == 1.0 && self.saturation == 1.0 && self.hue == 0.0
    }

    /// Applies the jitter to a colour image in place.
    pub fn apply(&self, img: &mut RgbImage) {
        if self.is_identity() {
            return;
        }
        let luma = |p: &[f32; 3]| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
        let n = (img.width() * img.height()).max(1) as f32;
        let mean = img.pixels().map(|p| luma(&p.0.map(f32::from))).sum::<f32>() / n * self.brightness;
        let (sin, cos) = self.hue.sin_cos();
        for p in img.pixels_mut() {
            let mut v = p.0.map(|c| c as f32 * self.brightness);
            let y = luma(&v);
            for c in &mut v {
                *c = y + (*c - y) * self.saturation;
                *c = mean + (*c - mean) * self.contrast;
            }
            if self.hue != 0.0 {
                // Rotate the chroma (I, Q) of YIQ, keeping Y.
                let y = luma(&v);
                let i = 0.596 * v[0] - 0.274 * v[1] - 0.322 * v[2];
                let q = 0.211 * v[0] - 0.523 * v[1] + 0.312 * v[2];
                let (i, q) = (i * cos - q * sin, i * sin + q * cos);
                v = [y + 0.956 * i + 0.621 * q, y - 0.272 * i - 0.647 * q, y - 1.106 * i + 1.703 * q];
            }
            p.0 = v.map(|c| c.round().clamp(0.0, 255.0) as u8);
        }
    }
}

/// One draw of random erasing: the box, and the seed of its noise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Erase {
    /// The box, in the view's pixels.
    pub crop: Crop,
    /// Seed of the noise that fills it.
    pub noise: u64,
}

impl Erase {
    /// Draws whether a view of `dims` is erased and where, or `None` (nothing is drawn from `rng`
    /// when the augmentation has no erasing).
    pub fn draw(cfg: &AugmentConfig, dims: (u32, u32), rng: &mut Rng) -> Option<Erase> {
        if cfg.erase <= 0.0 || !rng.bernoulli(cfg.erase) {
            return None;
        }
        let (w, h) = dims;
        let area = rng.uniform(0.02, 0.25) * w as f64 * h as f64;
        let ratio = rng.uniform(0.3f64.ln(), (1.0 / 0.3f64).ln()).exp();
        let bw = (((area * ratio).sqrt().round()) as u32).clamp(1, w.max(1));
        let bh = (((area / ratio).sqrt().round()) as u32).clamp(1, h.max(1));
        let crop = Crop::random(w, h, bw, bh, rng);
        Some(Erase { crop, noise: rng.next_u64() })
    }

    /// Fills the box with uniform noise.
    pub fn apply(&self, img: &mut RgbImage) {
        let mut noise = Rng::new(self.noise);
        let Crop { x, y, w, h } = self.crop;
        for yy in y..(y + h).min(img.height()) {
            for xx in x..(x + w).min(img.width()) {
                let v = noise.next_u64().to_le_bytes();
                img.put_pixel(xx, yy, image::Rgb([v[0], v[1], v[2]]));
            }
        }
    }
}

/// Augments a decoded sample in place: one geometric draw for all its images and masks, one
/// jitter draw for all its colour images, and random erasing of its main image alone. The output
/// keeps the input's size unless `out`.
pub fn augment_item(cfg: &AugmentConfig, item: &mut Item, out: Option<(u32, u32)>, rng: &mut Rng) {
    let g = Geometry::draw(cfg, item.image.dimensions(), out, rng);
    let j = Jitter::draw(cfg, rng);
    item.image = g.rgb(&item.image);
    j.apply(&mut item.image);
    if let Some(e) = Erase::draw(cfg, item.image.dimensions(), rng) {
        e.apply(&mut item.image);
    }
    if let Some(m) = &item.mask {
        item.mask = Some(g.mask(m));
    }
    for img in item.extra_images.values_mut() {
        *img = g.rgb(img);
        j.apply(img);
    }
    for m in item.extra_masks.values_mut() {
        *m = g.mask(m);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// An L-shaped, asymmetric 17x13 sample whose image, mask and extras all encode the same
    /// shape.
    fn item() -> Item {
        let inside = |x: u32, y: u32| (x < 6 && y < 11) || ((8..11).contains(&y) && x < 14);
        let mask = GrayImage::from_fn(17, 13, |x, y| image::Luma([if inside(x, y) { 255 } else { 0 }]));
        let image = RgbImage::from_fn(17, 13, |x, y| {
            let v = if inside(x, y) { 255 } else { 0 };
            image::Rgb([v, v, v])
        });
        Item {
            id: "a".into(),
            image: image.clone(),
            mask: Some(mask.clone()),
            label: Some(0),
            extra_images: BTreeMap::from([("clean".to_string(), image)]),
            extra_masks: BTreeMap::from([("occlusion".to_string(), mask)]),
        }
    }

    #[test]
    fn geometry_keeps_image_mask_and_extras_aligned() {
        let cfg = AugmentConfig { crop_scale: [0.6, 1.0], ..AugmentConfig::geometric() };
        let mut turns = [0usize; 4];
        for seed in 0..64 {
            let mut it = item();
            let g = Geometry::draw(&cfg, (17, 13), Some((16, 16)), &mut Rng::new(seed));
            turns[g.quarter_turns as usize] += 1;
            augment_item(&cfg, &mut it, Some((16, 16)), &mut Rng::new(seed));
            let m = it.mask.as_ref().unwrap();
            assert_eq!(m.dimensions(), (16, 16));
            for (x, y, p) in m.enumerate_pixels() {
                let img_in = it.image.get_pixel(x, y).0[0] >= 128;
                assert_eq!(img_in, p.0[0] == 255, "seed {seed} at {x},{y}");
                assert_eq!(it.extra_masks["occlusion"].get_pixel(x, y), p);
                assert_eq!(it.extra_images["clean"].get_pixel(x, y), it.image.get_pixel(x, y));
            }
        }
        assert!(turns.iter().all(|&t| t > 5), "{turns:?}");
    }

    #[test]
    fn warped_geometry_keeps_image_mask_and_extras_aligned() {
        let cfg = AugmentConfig { crop_scale: [0.7, 1.0], rotate: 40.0, elastic: 0.05, ..AugmentConfig::geometric() };
        let mut moved = 0;
        for seed in 0..32 {
            let mut it = item();
            augment_item(&cfg, &mut it, Some((24, 24)), &mut Rng::new(seed));
            let m = it.mask.as_ref().unwrap();
            assert_eq!(m.dimensions(), (24, 24));
            let plain = {
                let mut p = item();
                let flat = AugmentConfig { rotate: 0.0, elastic: 0.0, ..cfg };
                augment_item(&flat, &mut p, Some((24, 24)), &mut Rng::new(seed));
                p.mask.unwrap()
            };
            moved += usize::from(&plain != m);
            for (x, y, p) in m.enumerate_pixels() {
                let img_in = it.image.get_pixel(x, y).0[0] >= 128;
                assert_eq!(img_in, p.0[0] == 255, "seed {seed} at {x},{y}");
                assert_eq!(it.extra_masks["occlusion"].get_pixel(x, y), p);
                assert_eq!(it.extra_images["clean"].get_pixel(x, y), it.image.get_pixel(x, y));
            }
        }
        assert!(moved >= 30, "{moved} of 32 draws changed the mask");
    }

    #[test]
    fn a_half_turn_warp_is_the_exact_half_turn_and_a_quarter_one_a_quarter_turn() {
        let img = RgbImage::from_fn(9, 9, |x, y| image::Rgb([(x * 28) as u8, (y * 28) as u8, (x * y) as u8]));
        let warp = |angle: f32| Geometry {
            hflip: false,
            vflip: false,
            quarter_turns: 0,
            crop: Crop::center(9, 9, 9, 9),
            out: (9, 9),
            warp: Some(Warp { angle, moves: [[0.0; 2]; WARP_GRID * WARP_GRID] }),
        };
        let half = warp(std::f32::consts::PI).rgb(&img);
        for (x, y, p) in half.enumerate_pixels() {
            assert_eq!(p, img.get_pixel(8 - x, 8 - y), "at {x},{y}");
        }
        let quarter = warp(std::f32::consts::FRAC_PI_2).rgb(&img);
        let turned =
            [Symmetry::QUARTER_TURN, Symmetry::QUARTER_TURN.then(Symmetry::QUARTER_TURN).then(Symmetry::QUARTER_TURN)]
                .map(|s| s.image(&img));
        assert!(turned.contains(&quarter), "a quarter-turn warp is one of the two quarter turns");
        // No rotation and no moves: the crop, rescaled by bilinear reading, and the identity at
        // equal size.
        assert_eq!(warp(0.0).rgb(&img), img);
    }

    #[test]
    fn erasing_hides_a_box_of_the_image_only_and_only_when_asked() {
        let mut rng = Rng::new(2);
        let before = rng.clone();
        assert_eq!(Erase::draw(&AugmentConfig::default(), (32, 32), &mut rng), None);
        assert_eq!(rng, before, "no draw without erasing");
        let always = AugmentConfig { erase: 1.0, ..AugmentConfig::flips() };
        for seed in 0..16 {
            let e = Erase::draw(&always, (40, 30), &mut Rng::new(seed)).unwrap();
            let area = (e.crop.w * e.crop.h) as f64 / 1200.0;
            assert!(e.crop.x + e.crop.w <= 40 && e.crop.y + e.crop.h <= 30, "{e:?}");
            assert!((0.01..=0.3).contains(&area), "{e:?}");
        }
        let none = AugmentConfig { hflip: false, vflip: false, ..always };
        let plain = item();
        let mut a = item();
        augment_item(&none, &mut a, None, &mut Rng::new(5));
        assert_ne!(a.image, plain.image, "the box was filled");
        assert_eq!(a.mask, plain.mask);
        assert_eq!(a.extra_images, plain.extra_images, "paired images stay whole");
        let changed = a.image.pixels().zip(plain.image.pixels()).filter(|(p, q)| p != q).count();
        assert!(changed <= (0.25 * 17.0 * 13.0) as usize + 1, "{changed} pixels changed");
        let mut b = item();
        augment_item(&none, &mut b, None, &mut Rng::new(5));
        assert_eq!(a, b, "the same seed erases the same box with the same noise");
    }

    #[test]
    fn ranges_no_draw_can_come_from_are_refused_by_name() {
        assert!(AugmentConfig::default().validate().is_ok());
        assert!(AugmentConfig { rotate: 180.0, elastic: 0.25, ..AugmentConfig::flips() }.validate().is_ok());
        for (cfg, word) in [
            (AugmentConfig { rotate: -5.0, ..AugmentConfig::default() }, "rotate"),
            (AugmentConfig { rotate: f64::NAN, ..AugmentConfig::default() }, "rotate"),
            (AugmentConfig { elastic: 0.5, ..AugmentConfig::default() }, "elastic"),
            (AugmentConfig { crop_scale: [0.9, 0.8], ..AugmentConfig::default() }, "crop_scale"),
            (AugmentConfig { crop_scale: [0.0, 1.0], ..AugmentConfig::default() }, "crop_scale"),
            (AugmentConfig { hue: 1.5, ..AugmentConfig::default() }, "hue"),
            (AugmentConfig { erase: 1.5, ..AugmentConfig::default() }, "erase"),
        ] {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(word), "{e}");
        }
    }

    #[test]
    fn warps_are_drawn_only_when_asked_and_move_within_their_reach() {
        let mut rng = Rng::new(4);
        let before = rng.clone();
        assert_eq!(Warp::draw(&AugmentConfig::default(), (32, 32), &mut rng), None);
        assert_eq!(rng, before, "no draw without a warp");
        let cfg = AugmentConfig { rotate: 10.0, elastic: 0.05, ..AugmentConfig::default() };
        for seed in 0..16 {
            let w = Warp::draw(&cfg, (40, 20), &mut Rng::new(seed)).unwrap();
            assert!(w.angle.abs() <= 10f32.to_radians());
            assert!(w.moves.iter().all(|m| m[0].abs() <= 2.0 && m[1].abs() <= 1.0), "{w:?}");
            assert!(w.moves.iter().any(|m| m[0] != 0.0));
        }
        let turn = Warp::draw(&AugmentConfig { rotate: 10.0, ..AugmentConfig::default() }, (8, 8), &mut Rng::new(1));
        assert!(turn.unwrap().moves.iter().all(|m| *m == [0.0, 0.0]));
        assert_eq!(mirror(-1.0, 5), 1.0);
        assert_eq!(mirror(5.0, 5), 3.0);
        assert_eq!(mirror(2.5, 5), 2.5);
        assert_eq!(mirror(3.0, 1), 0.0);
    }

    #[test]
    fn test_time_views_are_the_trained_symmetries_or_the_image_alone() {
        let full = AugmentConfig::default();
        assert_eq!(full.test_time_views(true).len(), 8);
        assert_eq!(AugmentConfig::flips().test_time_views(true).len(), 4);
        let one_flip = AugmentConfig { vflip: false, ..AugmentConfig::flips() };
        assert_eq!(one_flip.test_time_views(true).len(), 2);
        for cfg in [full, AugmentConfig::flips(), one_flip] {
            assert_eq!(cfg.test_time_views(false), vec![Symmetry::IDENTITY]);
            assert_eq!(cfg.test_time_views(true)[0], Symmetry::IDENTITY);
        }
    }

    #[test]
    fn the_augmentation_in_words_names_each_part_that_is_on() {
        assert_eq!(AugmentConfig::flips().describe(), "flips");
        assert_eq!(
            AugmentConfig::default().describe(),
            "flips, quarter turns, crops 0.8-1, colour jitter 0.1, hue 0.02"
        );
        let none = AugmentConfig { hflip: false, vflip: false, ..AugmentConfig::flips() };
        assert_eq!(none.describe(), "none");
        assert_eq!(AugmentConfig { vflip: false, ..AugmentConfig::flips() }.describe(), "left-right flips");
        assert_eq!(
            AugmentConfig { rotate: 30.0, elastic: 0.03, ..AugmentConfig::flips() }.describe(),
            "flips, rotations ±30°, elastic 0.03"
        );
        assert_eq!(AugmentConfig { erase: 0.5, ..AugmentConfig::flips() }.describe(), "flips, erasing 0.5");
    }

    #[test]
    fn flips_and_turns_are_exact_permutations() {
        let it = item();
        let g = Geometry {
            hflip: true,
            vflip: false,
            quarter_turns: 1,
            crop: Crop::center(13, 17, 13, 17),
            out: (13, 17),
            warp: None,
        };
        let m = g.mask(it.mask.as_ref().unwrap());
        assert_eq!(m.dimensions(), (13, 17));
        let count = |m: &GrayImage| m.pixels().filter(|p| p.0[0] == 255).count();
        assert_eq!(count(&m), count(it.mask.as_ref().unwrap()));
        // Flip left-right then a clockwise turn maps (x, y) to (h - 1 - y, w - 1 - x).
        let src = it.mask.as_ref().unwrap();
        for (x, y, p) in src.enumerate_pixels() {
            assert_eq!(m.get_pixel(12 - y, 16 - x), p);
        }
    }

    #[test]
    fn jitter_changes_colour_deterministically_and_alike_on_pairs() {
        let cfg = AugmentConfig {
            hflip: false,
            vflip: false,
            rot90: false,
            crop_scale: [1.0, 1.0],
            brightness: 0.3,
            contrast: 0.3,
            saturation: 0.3,
            hue: 0.1,
            ..AugmentConfig::default()
        };
        let mut base = item();
        base.image = RgbImage::from_fn(17, 13, |x, y| image::Rgb([(x * 12) as u8, (y * 15) as u8, 90]));
        base.extra_images.insert("clean".into(), base.image.clone());
        let mut a = base.clone();
        let mut b = base.clone();
        augment_item(&cfg, &mut a, None, &mut Rng::new(9));
        augment_item(&cfg, &mut b, None, &mut Rng::new(9));
        assert_eq!(a, b);
        assert_ne!(a.image, base.image);
        assert_eq!(a.image, a.extra_images["clean"]);
        assert_eq!(a.mask, base.mask);
        let id = Jitter { brightness: 1.0, contrast: 1.0, saturation: 1.0, hue: 0.0 };
        let mut c = base.image.clone();
        id.apply(&mut c);
        assert_eq!(c, base.image);
        // A zero hue turn with unit factors through the YIQ path is close to the identity.
        let tiny = Jitter { hue: 1e-6, ..id };
        let mut c = base.image.clone();
        tiny.apply(&mut c);
        let diff =
            c.as_raw().iter().zip(base.image.as_raw()).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
        assert!(diff <= 1, "{diff}");
    }
}
