//! The real-image hair benchmark: artificial hairs ([`crate::paint`]) painted onto real
//! hair-free dermoscopy images, with the exact hair mask and the clean original as ground truth
//! (the way the published Skin Hair data set was made).
//!
//! ## Images: the hair-free rule
//!
//! From the ISIC 2017 training images (folder layout of the official download:
//! `ISIC-2017_Training_Data/ISIC_*.jpg` and `ISIC-2017_Training_Part1_GroundTruth/*_segmentation.png`),
//! an image counts as hair-free when, on its 256 x 256 version ([`hair_free_stats`], fixed
//! parameters that do not follow [`HairConfig`], so the selection stays the same when the detector
//! changes):
//! 1. **thin dark structures are rare:** at most [`FREE_MAX_THIN`] of the pixels outside the lesion
//!    (grown by 8 px) have a black-hat (CIE L*, closing with 11 px lines in four orientations) of
//!    at least 6 L* in a connected piece of at least 10 px (the detector before issue 18, without
//!    its lesion logic), and
//! 2. **no long thin piece:** no connected piece of pixels with a black-hat of at least 4 L*
//!    (a stricter threshold) outside the grown lesion is longer than [`FREE_MAX_PIECE`] px
//!    (length from the piece's second moments, [`crate::morph::Component::length`]).
//!
//! On the 2000 ISIC 2017 training images this selects the count written in the crate's
//! README/benchmark note (`derm hair eval` prints it).
//!
//! ## Metrics ([`BenchSummary`])
//!
//! Pooled over images (pixel counts summed, squared errors summed before the PSNR):
//! - mask recall, precision and IoU against the painted hair mask; pixels the painting changed by
//!   less than half a pixel's coverage are ignored as false positives (`precision`), and also
//!   counted (`precision_strict`); the same for hair pixels on the lesion;
//! - on the unpainted hair-free originals: the share of lesion pixels and of all pixels marked;
//! - PSNR and SSIM (luminance, 7 x 7 windows) of the cleaned image against the original inside
//!   the hair mask and over the lesion, and the PSNR of the painted image (no cleaning) inside the
//!   hair mask for reference.

use std::path::{Path, PathBuf};
use std::time::Instant;

use derm_core::image_io::{load_mask, load_rgb, save_png};
use derm_core::{bail, Result};
use image::{GrayImage, RgbImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::color::luminance_u8;
use crate::config::HairConfig;
use crate::morph::{black_hat_lines, components, dilate_disc, remove_small};
use crate::paint::{paint_hairs, PaintConfig, Painted};

/// Rule 1 of the hair-free selection: the largest share of thin dark pixels outside the lesion.
pub const FREE_MAX_THIN: f64 = 0.002;
/// Rule 2: the longest piece (px at 256) of faint thin dark pixels outside the lesion.
pub const FREE_MAX_PIECE: f32 = 24.0;

/// The hair-free rule in words (written into benchmark summaries).
pub const RULE: &str = "256 px image; outside the lesion grown by 8 px: at most 0.2 % of pixels with a black-hat \
(L*, 11 px lines, 4 orientations) of at least 6 L* in pieces of at least 10 px, and no piece of pixels with a \
black-hat of at least 4 L* longer than 24 px";

/// The numbers [`hair_free_stats`] computes for one image.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct FreeStats {
    /// Rule 1: share of pixels outside the grown lesion in the thin-dark mask.
    pub thin_share: f64,
    /// Rule 2: length of the longest faint thin piece outside the grown lesion.
    pub longest_piece: f32,
}

impl FreeStats {
    /// Whether the image passes the hair-free rule.
    pub fn hair_free(&self) -> bool {
        self.thin_share <= FREE_MAX_THIN && self.longest_piece <= FREE_MAX_PIECE
    }
}

/// The statistics of the hair-free rule on an image (resized to 256 x 256 when it is not).
pub fn hair_free_stats(img: &RgbImage, lesion: &GrayImage) -> FreeStats {
    let (img, lesion) = if img.dimensions() != (256, 256) {
        let l = image::imageops::resize(lesion, 256, 256, image::imageops::FilterType::Nearest);
        (image::imageops::resize(img, 256, 256, image::imageops::FilterType::Triangle), l)
    } else {
        (img.clone(), lesion.clone())
    };
    let (w, h) = (256usize, 256usize);
    let l = luminance_u8(&img);
    let bh = black_hat_lines(&l, w, h, 5);
    let grown = dilate_disc(lesion.as_raw(), w, h, 8.0);
    let outside = grown.iter().filter(|&&v| v == 0).count().max(1);
    let mut thin: Vec<u8> = bh.iter().zip(&grown).map(|(&b, &g)| if b >= 15 && g == 0 { 255 } else { 0 }).collect();
    remove_small(&mut thin, w, h, 10);
    let thin_share = thin.iter().filter(|&&v| v != 0).count() as f64 / outside as f64;
    let faint: Vec<u8> = bh.iter().zip(&grown).map(|(&b, &g)| if b >= 10 && g == 0 { 255 } else { 0 }).collect();
    let longest_piece =
        components(&faint, w, h, true).iter().filter(|c| c.area() >= 4).map(|c| c.length()).fold(0.0, f32::max);
    FreeStats { thin_share, longest_piece }
}

/// One image of the benchmark: its id, the 256 px original and its lesion mask.
#[derive(Debug, Clone)]
pub struct BenchImage {
    /// ISIC id (`ISIC_0000000`).
    pub id: String,
    /// The image.
    pub image: RgbImage,
    /// Its lesion mask (0/255).
    pub lesion: GrayImage,
}

/// Reads the ISIC 2017 training images under `root` (sorted by id), with their lesion masks.
pub fn read_isic2017(root: &Path, limit: Option<usize>) -> Result<Vec<BenchImage>> {
    let data = root.join("ISIC-2017_Training_Data");
    let gt = root.join("ISIC-2017_Training_Part1_GroundTruth");
    let mut ids: Vec<String> = std::fs::read_dir(&data)
        .map_err(|e| derm_core::Error::invalid(format!("cannot read {}: {e}", data.display())))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".jpg").filter(|s| s.starts_with("ISIC_")).map(str::to_owned)
        })
        .collect();
    ids.sort();
    if ids.is_empty() {
        bail!("no ISIC_*.jpg images in {}", data.display());
    }
    if let Some(k) = limit {
        ids.truncate(k);
    }
    ids.par_iter()
        .map(|id| {
            let image = load_rgb(&data.join(format!("{id}.jpg")))?;
            let lesion = load_mask(&gt.join(format!("{id}_segmentation.png")), Some(image.dimensions()))?;
            Ok(BenchImage { id: id.clone(), image, lesion })
        })
        .collect()
}

/// Keeps the hair-free images ([`FreeStats::hair_free`]).
pub fn select_hair_free(images: Vec<BenchImage>) -> Vec<BenchImage> {
    images.into_par_iter().filter(|b| hair_free_stats(&b.image, &b.lesion).hair_free()).collect()
}

/// Sums over images; [`Tally::summary`] turns them into rates.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Tally {
    /// Images.
    pub images: u64,
    /// Hair mask counts: true positives, false positives outside the touched pixels, false
    /// positives anywhere, false negatives.
    pub tp: u64,
    pub fp: u64,
    pub fp_strict: u64,
    pub fn_: u64,
    /// The same for hair pixels on the lesion (false positives: marked lesion pixels).
    pub les_tp: u64,
    pub les_fp: u64,
    pub les_fn: u64,
    /// Hair-free originals: marked lesion pixels, lesion pixels, marked pixels, pixels.
    pub free_les_marked: u64,
    pub free_les: u64,
    pub free_marked: u64,
    pub free_px: u64,
    /// Squared errors (summed over channels) and pixel counts: cleaned in the hair mask, painted
    /// in the hair mask, cleaned over the lesion.
    pub sse_hair: f64,
    pub sse_painted: f64,
    pub n_hair: u64,
    pub sse_lesion: f64,
    pub n_lesion: u64,
    /// SSIM map sums in the hair mask and over the lesion.
    pub ssim_hair: f64,
    pub ssim_lesion: f64,
    /// Seconds spent in the method under test (mask and cleaning of the painted image).
    pub seconds: f64,
}

impl Tally {
    fn add(mut self, o: &Tally) -> Tally {
        self.images += o.images;
        self.tp += o.tp;
        self.fp += o.fp;
        self.fp_strict += o.fp_strict;
        self.fn_ += o.fn_;
        self.les_tp += o.les_tp;
        self.les_fp += o.les_fp;
        self.les_fn += o.les_fn;
        self.free_les_marked += o.free_les_marked;
        self.free_les += o.free_les;
        self.free_marked += o.free_marked;
        self.free_px += o.free_px;
        self.sse_hair += o.sse_hair;
        self.sse_painted += o.sse_painted;
        self.n_hair += o.n_hair;
        self.sse_lesion += o.sse_lesion;
        self.n_lesion += o.n_lesion;
        self.ssim_hair += o.ssim_hair;
        self.ssim_lesion += o.ssim_lesion;
        self.seconds += o.seconds;
        self
    }

    /// The rates.
    pub fn summary(&self) -> BenchSummary {
        let rate = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        let psnr = |sse: f64, n: u64| {
            if n == 0 || sse <= 0.0 {
                99.0
            } else {
                10.0 * (255.0f64 * 255.0 / (sse / (3 * n) as f64)).log10()
            }
        };
        BenchSummary {
            images: self.images,
            recall: rate(self.tp, self.tp + self.fn_),
            precision: rate(self.tp, self.tp + self.fp),
            precision_strict: rate(self.tp, self.tp + self.fp_strict),
            iou: rate(self.tp, self.tp + self.fp + self.fn_),
            lesion_recall: rate(self.les_tp, self.les_tp + self.les_fn),
            lesion_precision: rate(self.les_tp, self.les_tp + self.les_fp),
            free_lesion_marked: rate(self.free_les_marked, self.free_les),
            free_image_marked: rate(self.free_marked, self.free_px),
            psnr_hair: psnr(self.sse_hair, self.n_hair),
            psnr_hair_painted: psnr(self.sse_painted, self.n_hair),
            ssim_hair: if self.n_hair == 0 { 1.0 } else { self.ssim_hair / self.n_hair as f64 },
            psnr_lesion: psnr(self.sse_lesion, self.n_lesion),
            ssim_lesion: if self.n_lesion == 0 { 1.0 } else { self.ssim_lesion / self.n_lesion as f64 },
            seconds_per_image: if self.images == 0 { 0.0 } else { self.seconds / self.images as f64 },
        }
    }
}

/// What the benchmark reports (see the module doc for the definitions).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct BenchSummary {
    pub images: u64,
    pub recall: f64,
    pub precision: f64,
    pub precision_strict: f64,
    pub iou: f64,
    pub lesion_recall: f64,
    pub lesion_precision: f64,
    pub free_lesion_marked: f64,
    pub free_image_marked: f64,
    pub psnr_hair: f64,
    pub psnr_hair_painted: f64,
    pub ssim_hair: f64,
    pub psnr_lesion: f64,
    pub ssim_lesion: f64,
    pub seconds_per_image: f64,
}

/// Luminance as f32 (Rec. 601 weights) for SSIM.
fn luma(img: &RgbImage) -> Vec<f32> {
    img.pixels().map(|p| 0.299 * p.0[0] as f32 + 0.587 * p.0[1] as f32 + 0.114 * p.0[2] as f32).collect()
}

/// The SSIM map of two luminance planes with 7 x 7 windows (clipped at the border), constants of
/// Wang et al. 2004 for 8-bit data.
pub fn ssim_map(a: &[f32], b: &[f32], w: usize, h: usize) -> Vec<f32> {
    // Integral images of a, b, a², b², ab (f64 to keep the differences exact enough).
    let w1 = w + 1;
    let mut ii = vec![[0f64; 5]; w1 * (h + 1)];
    for y in 0..h {
        let mut row = [0f64; 5];
        for x in 0..w {
            let (p, q) = (a[y * w + x] as f64, b[y * w + x] as f64);
            let v = [p, q, p * p, q * q, p * q];
            for k in 0..5 {
                row[k] += v[k];
                ii[(y + 1) * w1 + x + 1][k] = ii[y * w1 + x + 1][k] + row[k];
            }
        }
    }
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let r = 3usize;
    let mut out = vec![0f32; w * h];
    for y in 0..h {
        let (y0, y1) = (y.saturating_sub(r), (y + r + 1).min(h));
        for x in 0..w {
            let (x0, x1) = (x.saturating_sub(r), (x + r + 1).min(w));
            let n = ((y1 - y0) * (x1 - x0)) as f64;
            let mut s = [0f64; 5];
            for (k, sk) in s.iter_mut().enumerate() {
                *sk = ii[y1 * w1 + x1][k] - ii[y0 * w1 + x1][k] - ii[y1 * w1 + x0][k] + ii[y0 * w1 + x0][k];
            }
            let (ma, mb) = (s[0] / n, s[1] / n);
            let va = s[2] / n - ma * ma;
            let vb = s[3] / n - mb * mb;
            let cov = s[4] / n - ma * mb;
            out[y * w + x] =
                (((2.0 * ma * mb + c1) * (2.0 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))) as f32;
        }
    }
    out
}

/// Scores one painted image: `pred` is the method's mask of the painted image, `cleaned` its
/// cleaned image, `free` its mask of the unpainted original.
pub fn score_one(
    original: &RgbImage,
    lesion: &GrayImage,
    painted: &Painted,
    pred: &GrayImage,
    cleaned: &RgbImage,
    free: &GrayImage,
) -> Result<Tally> {
    let dims = original.dimensions();
    for (what, d) in [
        ("lesion", lesion.dimensions()),
        ("painted", painted.image.dimensions()),
        ("mask", pred.dimensions()),
        ("cleaned", cleaned.dimensions()),
        ("hair-free mask", free.dimensions()),
    ] {
        if d != dims {
            bail!("benchmark: {what} is {}x{} but the image is {}x{}", d.0, d.1, dims.0, dims.1);
        }
    }
    let mut t = Tally { images: 1, ..Tally::default() };
    let (w, h) = (dims.0 as usize, dims.1 as usize);
    let sm = ssim_map(&luma(cleaned), &luma(original), w, h);
    let sq = |a: &image::Rgb<u8>, b: &image::Rgb<u8>| -> f64 {
        (0..3).map(|k| (a.0[k] as f64 - b.0[k] as f64).powi(2)).sum()
    };
    for (i, &ssim) in sm.iter().enumerate().take(w * h) {
        let (x, y) = ((i % w) as u32, (i / w) as u32);
        let truth = painted.hair.as_raw()[i] != 0;
        let touched = painted.touched.as_raw()[i] != 0;
        let on_les = lesion.as_raw()[i] != 0;
        let p = pred.as_raw()[i] != 0;
        match (p, truth) {
            (true, true) => t.tp += 1,
            (true, false) => {
                t.fp_strict += 1;
                if !touched {
                    t.fp += 1;
                }
            }
            (false, true) => t.fn_ += 1,
            _ => {}
        }
        if on_les {
            match (p, truth) {
                (true, true) => t.les_tp += 1,
                (true, false) if !touched => t.les_fp += 1,
                (false, true) => t.les_fn += 1,
                _ => {}
            }
            t.free_les += 1;
            t.free_les_marked += (free.as_raw()[i] != 0) as u64;
            t.n_lesion += 1;
            t.sse_lesion += sq(cleaned.get_pixel(x, y), original.get_pixel(x, y));
            t.ssim_lesion += ssim as f64;
        }
        t.free_px += 1;
        t.free_marked += (free.as_raw()[i] != 0) as u64;
        if truth {
            t.n_hair += 1;
            t.sse_hair += sq(cleaned.get_pixel(x, y), original.get_pixel(x, y));
            t.sse_painted += sq(painted.image.get_pixel(x, y), original.get_pixel(x, y));
            t.ssim_hair += ssim as f64;
        }
    }
    Ok(t)
}

/// Settings of one benchmark run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Seed of the painting (each image gets its own stream from it and its index).
    pub seed: u64,
    /// Side (px) the 256 px images are enlarged to (Catmull-Rom) before painting; 256 keeps them.
    pub size: u32,
    /// What is painted.
    pub paint: PaintConfig,
    /// Folder to write `<id>_painted.png`, `<id>_hair.png`, `<id>_touched.png`, `<id>_orig.png`
    /// and `<id>_lesion.png` to (for other methods, scored with [`score_dir`]).
    pub export: Option<PathBuf>,
}

/// One benchmark case: the (enlarged) original, its lesion, and the painting.
pub fn make_case(b: &BenchImage, index: usize, cfg: &BenchConfig) -> (RgbImage, GrayImage, Painted) {
    let (orig, lesion) = if cfg.size != b.image.width() || cfg.size != b.image.height() {
        let s = cfg.size;
        let img = image::imageops::resize(&b.image, s, s, image::imageops::FilterType::CatmullRom);
        let l = image::imageops::resize(&b.lesion, s, s, image::imageops::FilterType::Triangle);
        let l = GrayImage::from_fn(s, s, |x, y| image::Luma([if l.get_pixel(x, y).0[0] >= 128 { 255 } else { 0 }]));
        (img, l)
    } else {
        (b.image.clone(), b.lesion.clone())
    };
    let seed = derm_core::rng::splitmix_counter(cfg.seed, 18, index as u64);
    let painted = paint_hairs(&orig, Some(&lesion), seed, &cfg.paint);
    (orig, lesion, painted)
}

/// Which derm detector [`run_derm`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Detector {
    /// [`crate::hair_mask`]: the detector `HairConfig::detector` names (oriented by default).
    Current,
    /// [`crate::legacy_hair_mask`], the detector before issue 18.
    Legacy,
}

fn detect_with(d: Detector, img: &RgbImage, lesion: &GrayImage, cfg: &HairConfig) -> Result<GrayImage> {
    match d {
        Detector::Current => crate::hair_mask(img, Some(lesion), cfg),
        Detector::Legacy => crate::legacy_hair_mask(img, Some(lesion), cfg),
    }
}

/// Another way to fill derm's hair mask (the partial-convolution purifier, say): the painted
/// image and the region to fill ([`crate::inpaint_region`] of derm's mask) to the cleaned image.
pub type Filler<'a> = &'a (dyn Fn(&RgbImage, &GrayImage) -> Result<RgbImage> + Sync);

/// Runs derm's hair mask and cleaning (with the lesion mask) on every image and scores them.
pub fn run_derm(images: &[BenchImage], bench: &BenchConfig, cfg: &HairConfig, det: Detector) -> Result<Tally> {
    Ok(run_derm_with(images, bench, cfg, det, None)?.0)
}

/// [`run_derm`], and with `fill`, the same masks filled by it, scored alike (the second tally;
/// its mask and hair-free numbers are derm's).
pub fn run_derm_with(
    images: &[BenchImage],
    bench: &BenchConfig,
    cfg: &HairConfig,
    det: Detector,
    fill: Option<Filler>,
) -> Result<(Tally, Option<Tally>)> {
    if let Some(dir) = &bench.export {
        std::fs::create_dir_all(dir).map_err(|e| derm_core::Error::invalid(format!("{}: {e}", dir.display())))?;
    }
    let tallies: Vec<(Tally, Option<Tally>)> = images
        .par_iter()
        .enumerate()
        .map(|(i, b)| {
            let (orig, lesion, painted) = make_case(b, i, bench);
            if let Some(dir) = &bench.export {
                save_png(&dir.join(format!("{}_painted.png", b.id)), &painted.image)?;
                save_png(&dir.join(format!("{}_hair.png", b.id)), &painted.hair)?;
                save_png(&dir.join(format!("{}_touched.png", b.id)), &painted.touched)?;
                save_png(&dir.join(format!("{}_orig.png", b.id)), &orig)?;
                save_png(&dir.join(format!("{}_lesion.png", b.id)), &lesion)?;
            }
            let t0 = Instant::now();
            let m = detect_with(det, &painted.image, &lesion, cfg)?;
            let r = crate::clean_mask(&painted.image, m, cfg)?;
            let secs = t0.elapsed().as_secs_f64();
            let free = detect_with(det, &orig, &lesion, cfg)?;
            if let Some(dir) = &bench.export {
                let tag = if det == Detector::Legacy { "legacy" } else { "derm" };
                save_png(&dir.join(format!("{}_{tag}_mask.png", b.id)), &r.occlusion)?;
                save_png(&dir.join(format!("{}_{tag}_clean.png", b.id)), &r.clean)?;
                save_png(&dir.join(format!("{}_{tag}_free_mask.png", b.id)), &free)?;
            }
            let mut t = score_one(&orig, &lesion, &painted, &r.occlusion, &r.clean, &free)?;
            t.seconds = secs;
            let other = match fill {
                Some(fill) => {
                    let t0 = Instant::now();
                    let cleaned = fill(&painted.image, &crate::inpaint_region(&r.occlusion, cfg))?;
                    let mut o = score_one(&orig, &lesion, &painted, &r.occlusion, &cleaned, &free)?;
                    o.seconds = t0.elapsed().as_secs_f64();
                    Some(o)
                }
                None => None,
            };
            Ok((t, other))
        })
        .collect::<Result<_>>()?;
    let derm = tallies.iter().fold(Tally::default(), |a, t| a.add(&t.0));
    let other = fill.map(|_| tallies.iter().filter_map(|t| t.1.as_ref()).fold(Tally::default(), |a, t| a.add(t)));
    Ok((derm, other))
}

/// Scores another method's outputs on an exported benchmark folder: for every `<id>_painted.png`
/// in `export`, reads `<id>_mask.png`, `<id>_clean.png` (of the painted image) and
/// `<id>_free_mask.png` (of `<id>_orig.png`) from `pred`.
pub fn score_dir(export: &Path, pred: &Path) -> Result<Tally> {
    let mut ids: Vec<String> = std::fs::read_dir(export)
        .map_err(|e| derm_core::Error::invalid(format!("cannot read {}: {e}", export.display())))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_string_lossy().strip_suffix("_painted.png").map(str::to_owned))
        .collect();
    ids.sort();
    if ids.is_empty() {
        bail!("no <id>_painted.png in {}", export.display());
    }
    let tallies: Vec<Tally> = ids
        .par_iter()
        .map(|id| {
            let f = |d: &Path, s: &str| d.join(format!("{id}_{s}.png"));
            let orig = load_rgb(&f(export, "orig"))?;
            let dims = Some(orig.dimensions());
            let painted = Painted {
                image: load_rgb(&f(export, "painted"))?,
                hair: load_mask(&f(export, "hair"), dims)?,
                touched: load_mask(&f(export, "touched"), dims)?,
            };
            let lesion = load_mask(&f(export, "lesion"), dims)?;
            let mask = load_mask(&f(pred, "mask"), dims)?;
            let cleaned = load_rgb(&f(pred, "clean"))?;
            let free = load_mask(&f(pred, "free_mask"), dims)?;
            score_one(&orig, &lesion, &painted, &mask, &cleaned, &free)
        })
        .collect::<Result<_>>()?;
    Ok(tallies.iter().fold(Tally::default(), |a, t| a.add(t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssim_is_one_for_equal_and_lower_for_noise() {
        let a: Vec<f32> = (0..400).map(|i| ((i * 37) % 101) as f32).collect();
        let m = ssim_map(&a, &a, 20, 20);
        assert!(m.iter().all(|&v| (v - 1.0).abs() < 1e-4));
        let b: Vec<f32> = a.iter().enumerate().map(|(i, &v)| v + if i % 2 == 0 { 30.0 } else { -30.0 }).collect();
        let m = ssim_map(&a, &b, 20, 20);
        assert!(m.iter().sum::<f32>() / 400.0 < 0.9);
    }

    #[test]
    fn another_filler_is_scored_on_derm_masks() {
        let img = RgbImage::from_fn(96, 96, |x, y| image::Rgb([200 + (x % 5) as u8, 150 + (y % 3) as u8, 130]));
        let lesion = GrayImage::from_fn(96, 96, |x, y| {
            image::Luma([if (30..60).contains(&x) && (30..60).contains(&y) { 255 } else { 0 }])
        });
        let images = vec![BenchImage { id: "a".into(), image: img.clone(), lesion }];
        let bench = BenchConfig { seed: 3, size: 96, paint: PaintConfig::default(), export: None };
        let cfg = HairConfig::default();
        // A filler that knows the original fills perfectly; one that leaves the hole does nothing.
        let perfect = |_: &RgbImage, hole: &GrayImage| -> Result<RgbImage> {
            assert_eq!(hole.dimensions(), (96, 96));
            Ok(img.clone())
        };
        let (derm, other) = run_derm_with(&images, &bench, &cfg, Detector::Current, Some(&perfect)).unwrap();
        let (d, o) = (derm.summary(), other.unwrap().summary());
        assert_eq!((d.recall, d.precision), (o.recall, o.precision), "the same masks");
        assert!(o.psnr_hair > d.psnr_hair, "{} vs {}", o.psnr_hair, d.psnr_hair);
        let painted = make_case(&images[0], 0, &bench).2.image;
        let nothing = move |_: &RgbImage, _: &GrayImage| -> Result<RgbImage> { Ok(painted.clone()) };
        let (_, other) = run_derm_with(&images, &bench, &cfg, Detector::Current, Some(&nothing)).unwrap();
        assert!((other.unwrap().summary().psnr_hair - d.psnr_hair_painted).abs() < 1e-9);
        assert_eq!(run_derm(&images, &bench, &cfg, Detector::Current).unwrap().summary().psnr_hair, d.psnr_hair);
    }

    #[test]
    fn perfect_method_scores_perfectly() {
        let img = RgbImage::from_fn(64, 64, |x, y| image::Rgb([180 + (x % 7) as u8, 140 + (y % 5) as u8, 120]));
        let lesion = GrayImage::from_fn(64, 64, |x, y| {
            image::Luma([if (20..44).contains(&x) && (20..44).contains(&y) { 255 } else { 0 }])
        });
        let painted = paint_hairs(&img, Some(&lesion), 1, &PaintConfig::default());
        let empty = GrayImage::new(64, 64);
        let t = score_one(&img, &lesion, &painted, &painted.hair, &img, &empty).unwrap();
        let s = t.summary();
        assert_eq!((s.recall, s.precision, s.iou, s.free_image_marked), (1.0, 1.0, 1.0, 0.0));
        assert_eq!(s.psnr_hair, 99.0);
        assert!(s.psnr_hair_painted < 40.0);
        // Doing nothing finds nothing and leaves the painted pixels.
        let t = score_one(&img, &lesion, &painted, &empty, &painted.image, &empty).unwrap();
        assert_eq!(t.summary().recall, 0.0);
        assert!((t.summary().psnr_hair - s.psnr_hair_painted).abs() < 1e-9);
    }
}
