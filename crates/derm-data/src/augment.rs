//! Augmentation: flips, 90-degree rotations, random crops with rescaling, and colour jitter.
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
        }
    }
}

impl AugmentConfig {
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
        Geometry { hflip, vflip, quarter_turns, crop, out: out.unwrap_or(dims) }
    }

    /// The flips and quarter turns as one symmetry of the square.
    pub fn symmetry(&self) -> Symmetry {
        let flips = Symmetry { hflip: self.hflip, vflip: self.vflip, transpose: false };
        (0..self.quarter_turns).fold(flips, |s, _| s.then(Symmetry::QUARTER_TURN))
    }

    /// Applies the transform to a colour image.
    pub fn rgb(&self, img: &RgbImage) -> RgbImage {
        let c = self.crop.apply(&self.symmetry().image(img));
        resize_rgb(&c, self.out.0, self.out.1)
    }

    /// Applies the transform to a binary mask (re-binarised after rescaling).
    pub fn mask(&self, m: &GrayImage) -> GrayImage {
        let c = self.crop.apply(&self.symmetry().image(m));
        resize_mask(&c, self.out.0, self.out.1)
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

/// Augments a decoded sample in place: one geometric draw for all its images and masks, one
/// jitter draw for all its colour images. The output keeps the input's size unless `out`.
pub fn augment_item(cfg: &AugmentConfig, item: &mut Item, out: Option<(u32, u32)>, rng: &mut Rng) {
    let g = Geometry::draw(cfg, item.image.dimensions(), out, rng);
    let j = Jitter::draw(cfg, rng);
    item.image = g.rgb(&item.image);
    j.apply(&mut item.image);
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
    }

    #[test]
    fn flips_and_turns_are_exact_permutations() {
        let it = item();
        let g =
            Geometry { hflip: true, vflip: false, quarter_turns: 1, crop: Crop::center(13, 17, 13, 17), out: (13, 17) };
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
