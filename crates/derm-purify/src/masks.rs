//! Random hole masks for training, from three sources: occlusion masks of other images (a
//! library, for example the `*_occlusion.png` that `derm hair` finds), random irregular strokes
//! (Liu et al.'s kind of mask), and random rectangles. Every mask covers a share of the image
//! drawn from [`MaskConfig::hole_fraction`]. Masks are 0/255 gray images, 255 = hole.

use std::path::Path;

use derm_core::{image_io, Error, Result, Rng};
use image::{GrayImage, Luma};
use serde::{Deserialize, Serialize};

/// How training holes are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaskConfig {
    /// Range of the hole's share of the image; each mask draws its target uniformly from it.
    pub hole_fraction: [f64; 2],
    /// Relative frequency of masks made from library masks (ignored when there is no library).
    pub library_weight: f64,
    /// Relative frequency of irregular-stroke masks.
    pub strokes_weight: f64,
    /// Relative frequency of rectangle masks.
    pub rectangles_weight: f64,
    /// Range of a stroke's width as a share of the image's short side.
    pub stroke_width: [f64; 2],
    /// Range of a rectangle's sides as a share of the image's sides.
    pub rectangle_side: [f64; 2],
}

impl Default for MaskConfig {
    fn default() -> Self {
        MaskConfig {
            hole_fraction: [0.05, 0.5],
            library_weight: 1.0,
            strokes_weight: 1.0,
            rectangles_weight: 0.5,
            stroke_width: [0.01, 0.08],
            rectangle_side: [0.05, 0.35],
        }
    }
}

impl MaskConfig {
    /// Checks the ranges and weights.
    pub fn validate(&self) -> Result<()> {
        let [lo, hi] = self.hole_fraction;
        if !(0.0 < lo && lo <= hi && hi < 1.0) {
            return Err(Error::invalid(format!(
                "hole_fraction {:?} must satisfy 0 < lo <= hi < 1",
                self.hole_fraction
            )));
        }
        let ws = [self.library_weight, self.strokes_weight, self.rectangles_weight];
        if ws.iter().any(|w| !w.is_finite() || *w < 0.0) || self.strokes_weight + self.rectangles_weight <= 0.0 {
            return Err(Error::invalid("mask source weights must be non-negative, strokes + rectangles positive"));
        }
        for (name, [a, b]) in [("stroke_width", self.stroke_width), ("rectangle_side", self.rectangle_side)] {
            if !(0.0 < a && a <= b && b <= 1.0) {
                return Err(Error::invalid(format!("{name} [{a}, {b}] must satisfy 0 < lo <= hi <= 1")));
            }
        }
        Ok(())
    }
}

/// Where a mask's pieces come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskSource {
    /// Library masks, randomly flipped and rotated.
    Library,
    /// Irregular thick polylines.
    Strokes,
    /// Axis-aligned rectangles.
    Rectangles,
}

/// Occlusion masks of other images.
#[derive(Debug, Clone, Default)]
pub struct MaskLibrary {
    masks: Vec<GrayImage>,
}

impl MaskLibrary {
    /// The masks given.
    pub fn new(masks: Vec<GrayImage>) -> Self {
        MaskLibrary { masks }
    }

    /// Reads every `*_occlusion.png` of `dir` (binarised, resized to `size` when given),
    /// dropping empty ones.
    pub fn load_dir(dir: &Path, size: Option<(u32, u32)>) -> Result<Self> {
        let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut paths: Vec<_> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| derm_data::handoff::id_of(n, derm_data::handoff::OCCLUSION).is_some())
            })
            .collect();
        paths.sort();
        let mut masks = Vec::with_capacity(paths.len());
        for p in &paths {
            let mut m = image_io::load_mask(p, None)?;
            if let Some((w, h)) = size {
                m = image_io::resize_mask(&m, w, h);
            }
            if m.as_raw().iter().any(|&v| v != 0) {
                masks.push(m);
            }
        }
        if masks.is_empty() {
            return Err(Error::invalid(format!("{}: no non-empty *_occlusion.png masks", dir.display())));
        }
        tracing::info!(masks = masks.len(), dir = %dir.display(), "hole mask library");
        Ok(MaskLibrary { masks })
    }

    /// Number of masks.
    pub fn len(&self) -> usize {
        self.masks.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.masks.is_empty()
    }
}

/// Draws training holes.
#[derive(Debug, Clone)]
pub struct MaskGenerator {
    cfg: MaskConfig,
    library: MaskLibrary,
}

/// A mask being built: 0/1 bytes and the count of holes.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
    holes: usize,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas { w, h, px: vec![0; w * h], holes: 0 }
    }
    fn fraction(&self) -> f64 {
        self.holes as f64 / (self.w * self.h) as f64
    }
    /// Sets the pixels of `piece` (a list of indices); returns the pixels newly set.
    fn add(&mut self, piece: &[usize]) -> usize {
        let mut n = 0;
        for &i in piece {
            if self.px[i] == 0 {
                self.px[i] = 1;
                n += 1;
            }
        }
        self.holes += n;
        n
    }
    fn new_count(&self, piece: &[usize]) -> usize {
        let mut seen = std::collections::HashSet::new();
        piece.iter().filter(|&&i| self.px[i] == 0 && seen.insert(i)).count()
    }
}

impl MaskGenerator {
    /// A generator with `cfg` and an optional library (may be empty).
    pub fn new(cfg: MaskConfig, library: MaskLibrary) -> Result<Self> {
        cfg.validate()?;
        Ok(MaskGenerator { cfg, library })
    }

    /// The library.
    pub fn library(&self) -> &MaskLibrary {
        &self.library
    }

    /// Picks a source by the configured weights.
    pub fn pick_source(&self, rng: &mut Rng) -> MaskSource {
        let lib = if self.library.is_empty() { 0.0 } else { self.cfg.library_weight };
        let total = lib + self.cfg.strokes_weight + self.cfg.rectangles_weight;
        let u = rng.f64() * total;
        if u < lib {
            MaskSource::Library
        } else if u < lib + self.cfg.strokes_weight {
            MaskSource::Strokes
        } else {
            MaskSource::Rectangles
        }
    }

    /// A `w` x `h` hole mask (255 = hole) from a randomly picked source.
    pub fn generate(&self, w: u32, h: u32, rng: &mut Rng) -> GrayImage {
        let s = self.pick_source(rng);
        self.generate_from(s, w, h, rng)
    }

    /// A `w` x `h` hole mask from `source`. Pieces from the source are added until the hole
    /// reaches a target share drawn from `hole_fraction`; a piece that would pass the upper end
    /// is skipped; if the source cannot reach the lower end (a library of tiny masks, say),
    /// strokes and then small squares fill up. The share always ends in the range (up to one
    /// 3x3 square above the lower end on images too small for the range).
    pub fn generate_from(&self, source: MaskSource, w: u32, h: u32, rng: &mut Rng) -> GrayImage {
        let (wu, hu) = (w.max(1) as usize, h.max(1) as usize);
        let [lo, hi] = self.cfg.hole_fraction;
        let target = rng.uniform(lo, hi);
        let max_holes = (hi * (wu * hu) as f64).floor() as usize;
        let mut c = Canvas::new(wu, hu);
        let fill = |c: &mut Canvas, src: MaskSource, rng: &mut Rng, goal: f64, tries: usize| {
            let mut misses = 0;
            while c.fraction() < goal && misses < tries {
                let piece = match src {
                    MaskSource::Library => self.library_piece(wu, hu, rng),
                    MaskSource::Strokes => self.stroke_piece(wu, hu, rng),
                    MaskSource::Rectangles => self.rect_piece(wu, hu, rng),
                };
                let add = c.new_count(&piece);
                if add == 0 || c.holes + add > max_holes {
                    misses += 1;
                    continue;
                }
                c.add(&piece);
            }
        };
        let source =
            if source == MaskSource::Library && self.library.is_empty() { MaskSource::Strokes } else { source };
        fill(&mut c, source, rng, target, 40);
        if c.fraction() < lo {
            fill(&mut c, MaskSource::Strokes, rng, lo, 40);
        }
        // Small squares close any remaining gap.
        let mut guard = 0;
        while c.fraction() < lo && guard < 100_000 {
            guard += 1;
            let (x, y) = (rng.below(wu), rng.below(hu));
            let mut piece = Vec::with_capacity(9);
            for yy in y.saturating_sub(1)..(y + 2).min(hu) {
                for xx in x.saturating_sub(1)..(x + 2).min(wu) {
                    piece.push(yy * wu + xx);
                }
            }
            let add = c.new_count(&piece);
            if c.holes + add <= max_holes {
                c.add(&piece);
            } else if c.holes < max_holes {
                if let Some(&i) = piece.iter().find(|&&i| c.px[i] == 0) {
                    c.add(&[i]);
                }
            } else {
                break;
            }
        }
        GrayImage::from_raw(w.max(1), h.max(1), c.px.iter().map(|&v| v * 255).collect())
            .unwrap_or_else(|| GrayImage::new(w.max(1), h.max(1)))
    }

    fn library_piece(&self, w: usize, h: usize, rng: &mut Rng) -> Vec<usize> {
        if self.library.is_empty() {
            return Vec::new();
        }
        let m = &self.library.masks[rng.below(self.library.len())];
        let m = if m.dimensions() != (w as u32, h as u32) {
            image_io::resize_mask(m, w as u32, h as u32)
        } else {
            m.clone()
        };
        let (fx, fy) = (rng.bernoulli(0.5), rng.bernoulli(0.5));
        let transpose = w == h && rng.bernoulli(0.5);
        let mut out = Vec::new();
        for (i, &v) in m.as_raw().iter().enumerate() {
            if v == 0 {
                continue;
            }
            let (mut x, mut y) = (i % w, i / w);
            if transpose {
                std::mem::swap(&mut x, &mut y);
            }
            if fx {
                x = w - 1 - x;
            }
            if fy {
                y = h - 1 - y;
            }
            out.push(y * w + x);
        }
        out
    }

    fn stroke_piece(&self, w: usize, h: usize, rng: &mut Rng) -> Vec<usize> {
        let short = w.min(h) as f64;
        let [a, b] = self.cfg.stroke_width;
        let radius = (rng.uniform(a, b) * short / 2.0).max(0.5);
        let step = (short / 5.0).max(2.0);
        let mut p = (rng.uniform(0.0, w as f64), rng.uniform(0.0, h as f64));
        let mut out = Vec::new();
        for _ in 0..rng.range_inclusive(1, 5) {
            let angle = rng.uniform(0.0, std::f64::consts::TAU);
            let len = rng.uniform(0.3, 1.0) * step;
            let q = (
                (p.0 + len * angle.cos()).clamp(0.0, w as f64 - 1.0),
                (p.1 + len * angle.sin()).clamp(0.0, h as f64 - 1.0),
            );
            thick_segment(p, q, radius, w, h, &mut out);
            p = q;
        }
        out
    }

    fn rect_piece(&self, w: usize, h: usize, rng: &mut Rng) -> Vec<usize> {
        let [a, b] = self.cfg.rectangle_side;
        let rw = ((rng.uniform(a, b) * w as f64).round() as usize).clamp(1, w);
        let rh = ((rng.uniform(a, b) * h as f64).round() as usize).clamp(1, h);
        let (x0, y0) = (rng.below(w - rw + 1), rng.below(h - rh + 1));
        let mut out = Vec::with_capacity(rw * rh);
        for y in y0..y0 + rh {
            for x in x0..x0 + rw {
                out.push(y * w + x);
            }
        }
        out
    }
}

/// Pixels within `r` of the segment p-q.
fn thick_segment(p: (f64, f64), q: (f64, f64), r: f64, w: usize, h: usize, out: &mut Vec<usize>) {
    let (x0, x1) = ((p.0.min(q.0) - r).floor().max(0.0) as usize, ((p.0.max(q.0) + r).ceil() as usize).min(w - 1));
    let (y0, y1) = ((p.1.min(q.1) - r).floor().max(0.0) as usize, ((p.1.max(q.1) + r).ceil() as usize).min(h - 1));
    let (dx, dy) = (q.0 - p.0, q.1 - p.1);
    let len2 = dx * dx + dy * dy;
    for y in y0..=y1 {
        for x in x0..=x1 {
            let (px, py) = (x as f64 - p.0, y as f64 - p.1);
            let t = if len2 > 0.0 { ((px * dx + py * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
            let (ex, ey) = (px - t * dx, py - t * dy);
            if ex * ex + ey * ey <= r * r {
                out.push(y * w + x);
            }
        }
    }
}

/// Share of non-zero pixels of a mask.
pub fn hole_fraction(mask: &GrayImage) -> f64 {
    let n = mask.as_raw().iter().filter(|&&v| v != 0).count();
    n as f64 / mask.as_raw().len().max(1) as f64
}

/// A mask with every pixel set where `a` or `b` is set.
pub fn union(a: &GrayImage, b: &GrayImage) -> GrayImage {
    GrayImage::from_fn(a.width(), a.height(), |x, y| {
        let v = a.get_pixel(x, y).0[0] != 0 || b.get_pixel_checked(x, y).is_some_and(|p| p.0[0] != 0);
        Luma([if v { 255 } else { 0 }])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lib() -> MaskLibrary {
        // A thin "hair" and a big blob.
        let hair = GrayImage::from_fn(64, 64, |x, y| Luma([if (x as i32 - y as i32).abs() < 2 { 255 } else { 0 }]));
        let blob = GrayImage::from_fn(64, 64, |x, y| Luma([if x < 50 && y < 50 { 255 } else { 0 }]));
        MaskLibrary::new(vec![hair, blob])
    }

    #[test]
    fn hole_fraction_stays_in_range_for_every_source_and_size() {
        let cfg = MaskConfig::default();
        let g = MaskGenerator::new(cfg, lib()).unwrap();
        let mut rng = Rng::new(5);
        for (w, h) in [(64, 64), (128, 128), (37, 53), (256, 96)] {
            for source in [MaskSource::Library, MaskSource::Strokes, MaskSource::Rectangles] {
                for _ in 0..12 {
                    let m = g.generate_from(source, w, h, &mut rng);
                    assert_eq!(m.dimensions(), (w, h));
                    let f = hole_fraction(&m);
                    assert!((0.05..=0.5).contains(&f), "{source:?} {w}x{h}: {f}");
                }
            }
            // The mixed generator too, and a narrow range.
            let narrow = MaskGenerator::new(MaskConfig { hole_fraction: [0.2, 0.25], ..cfg }, lib()).unwrap();
            for _ in 0..12 {
                let f = hole_fraction(&g.generate(w, h, &mut rng));
                assert!((0.05..=0.5).contains(&f), "{f}");
                let f = hole_fraction(&narrow.generate(w, h, &mut rng));
                assert!((0.2..=0.25).contains(&f), "narrow {w}x{h}: {f}");
            }
        }
    }

    #[test]
    fn masks_are_seeded_and_sources_are_mixed() {
        let g = MaskGenerator::new(MaskConfig::default(), lib()).unwrap();
        let a = g.generate(48, 48, &mut Rng::new(1));
        let b = g.generate(48, 48, &mut Rng::new(1));
        assert_eq!(a, b);
        let mut rng = Rng::new(2);
        let mut seen = [0usize; 3];
        for _ in 0..300 {
            match g.pick_source(&mut rng) {
                MaskSource::Library => seen[0] += 1,
                MaskSource::Strokes => seen[1] += 1,
                MaskSource::Rectangles => seen[2] += 1,
            }
        }
        assert!(seen.iter().all(|&n| n > 30), "{seen:?}");
        // Without a library its weight is ignored.
        let g = MaskGenerator::new(MaskConfig::default(), MaskLibrary::default()).unwrap();
        assert!((0..100).all(|_| g.pick_source(&mut rng) != MaskSource::Library));
        assert!(MaskGenerator::new(
            MaskConfig { hole_fraction: [0.6, 0.5], ..Default::default() },
            MaskLibrary::default()
        )
        .is_err());
    }

    #[test]
    fn library_loads_occlusion_files_only() {
        let d = tempfile::tempdir().unwrap();
        let l = lib();
        image_io::save_png(&d.path().join("a_occlusion.png"), &l.masks[0]).unwrap();
        image_io::save_png(&d.path().join("b_occlusion.png"), &GrayImage::new(64, 64)).unwrap();
        image_io::save_png(&d.path().join("c_clean.png"), &l.masks[1]).unwrap();
        let got = MaskLibrary::load_dir(d.path(), Some((32, 32))).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got.masks[0].dimensions(), (32, 32));
        let e = MaskLibrary::load_dir(&d.path().join("nope"), None).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }
}
