//! # derm-hair: hairs, rulers and ink marks found and removed without a network
//!
//! The purification stage of derm (after Bisla et al., "Skin Lesion Segmentation and
//! Classification with Deep Learning System") is trained on pairs of occluded and occlusion-free
//! images. This crate makes those pairs the classic way, after Schmid-Saugeon, Guillod and Thiran,
//! "Towards a computer-aided diagnosis system for pigmented skin lesions" (Computerized Medical
//! Imaging and Graphics 27, 2003): in CIE LUV, the luminance L* is closed morphologically with
//! line elements, and the closing minus the image (the black-hat) lights up thin dark structures
//! such as hairs. Since issue 18 the lines run in twelve orientations and a pixel's hair score is
//! the largest response minus the smallest: a hair is closed by the lines across it but not by the
//! line along it, while dots, globules and a pigment network are closed along every line. So the
//! lesion no longer vetoes hairs; it only sets its own threshold. The black-hat is also taken on
//! the value plane (the lightness of each pixel's largest channel), where a hair crossing a brown
//! lesion keeps its contrast while melanin's texture loses most of its own (the larger score
//! wins). A dense pigment network, which the black-hat lights up as a mesh of short segments,
//! is told from a hair crossing it by the length of the straight runs that point one way. Light
//! hairs are found the same way with the white top-hat, pieces must be long and thin, detection
//! runs at a working resolution chosen from the image size, and the mask is refined back to full
//! size. Rulers (long straight lines with regular ticks), violet ink and air bubbles (rings with
//! a bright rim, fitted as ellipses) are added, and the occluded pixels are filled by inpainting
//! (Telea's fast marching method, or a harmonic fill).
//!
//! - [`hair_mask`]: the occlusion mask (0/255) of an RGB image, optionally with its lesion mask.
//! - [`detect_ruler`]: ruler pixels only; [`bubble`]: air bubbles (ellipse fit, rim test).
//! - [`inpaint`](fn@inpaint): fills masked pixels ([`InpaintMethod::Telea`] or [`InpaintMethod::Harmonic`]).
//! - [`clean`]: both, as a [`HairResult`].
//! - [`color`], [`morph`]: CIE L*, and van Herk / Gil-Werman line morphology (O(1) per pixel).
//! - [`eval`]: recall and precision of a mask, lesion leak, PSNR (whole image or in a mask).
//! - [`paint`], [`bench`](mod@bench): the real-image benchmark (artificial hairs painted onto hair-free
//!   ISIC 2017 images, with exact masks), and a synthetic pigment-network lesion.
//! - [`oriented`]: line morphology in any number of orientations.
//! - [`legacy_hair_mask`]: the detector before issue 18, for comparison; [`hair_mask`] runs it
//!   when `HairConfig::detector` is [`HairDetector::Legacy`] (the default is the oriented one,
//!   [`oriented_hair_mask`]).
//!
//! Every size in [`HairConfig`] is given for a short side of `size_ref` pixels (256) and scales
//! with the image, so a photograph and its thumbnail give the same result relative to their size.
//!
//! **Consumes:** 8-bit RGB images of any size with a short side of at least [`mask::MIN_SIDE`]
//! pixels (gray images read as RGB work), and optionally a binary lesion mask (non-zero inside) of
//! the same size. **Produces:** a binary occlusion mask (0/255, same size), the inpainted RGB
//! image (unmasked pixels unchanged), and the masked fraction.

#![forbid(unsafe_code)]

pub mod bench;
pub mod bubble;
pub mod color;
pub mod config;
pub mod eval;
pub mod inpaint;
pub mod mask;
pub mod morph;
pub mod oriented;
pub mod paint;
pub mod ruler;

use derm_core::Result;
use image::{GrayImage, RgbImage};
use rayon::prelude::*;
use serde::Serialize;

pub use color::{lstar, luminance};
pub use config::{HairConfig, HairDetector, InpaintMethod};
pub use inpaint::inpaint;
pub use mask::{black_hat, hair_mask, legacy_hair_mask, oriented_hair_mask};
pub use ruler::detect_ruler;

/// What [`clean`] gives for one image.
#[derive(Debug, Clone)]
pub struct HairResult {
    /// Hairs, rulers and ink marks (0/255).
    pub occlusion: GrayImage,
    /// The image with the occluded pixels inpainted.
    pub clean: RgbImage,
    /// Share of the image's pixels in `occlusion`.
    pub masked_fraction: f64,
}

/// Per-image numbers of [`clean`], for JSON summaries.
#[derive(Debug, Clone, Serialize)]
pub struct HairSummary {
    /// Image width.
    pub width: u32,
    /// Image height.
    pub height: u32,
    /// Share of the image's pixels in the occlusion mask.
    pub masked_fraction: f64,
    /// Whether a lesion mask was used.
    pub lesion_mask: bool,
}

impl HairResult {
    /// The numbers of this result.
    pub fn summary(&self, lesion_mask: bool) -> HairSummary {
        HairSummary {
            width: self.clean.width(),
            height: self.clean.height(),
            masked_fraction: self.masked_fraction,
            lesion_mask,
        }
    }
}

/// Finds the occlusion mask of `img` ([`hair_mask`]) and inpaints it, grown by
/// `cfg.inpaint_margin` ([`inpaint`](fn@inpaint)).
pub fn clean(img: &RgbImage, lesion: Option<&GrayImage>, cfg: &HairConfig) -> Result<HairResult> {
    clean_mask(img, hair_mask(img, lesion, cfg)?, cfg)
}

/// Inpaints a given occlusion mask of `img` (grown by `cfg.inpaint_margin`) as [`clean`] does.
///
/// Images larger than the working resolution of [`hair_mask`] (factor `f > 1`) are filled there:
/// the mask is pooled (a block is masked when any of its pixels is) and grown, the reduced image
/// is inpainted, the fill is enlarged bilinearly into the masked blocks, and a few sweeps of
/// harmonic relaxation at full size join it to the full-size surroundings. This keeps the cost
/// of inpainting a 4000 x 3000 photograph near that of its 800 x 600 reduction.
pub fn clean_mask(img: &RgbImage, occlusion: GrayImage, cfg: &HairConfig) -> Result<HairResult> {
    let (w, h) = img.dimensions();
    let n = occlusion.as_raw().iter().filter(|&&v| v != 0).count();
    let masked_fraction = n as f64 / occlusion.as_raw().len().max(1) as f64;
    let f = mask::work_factor(w as usize, h as usize, cfg);
    if n == 0 {
        return Ok(HairResult { occlusion, clean: img.clone(), masked_fraction });
    }
    let clean = if f == 1 {
        inpaint(img, &inpaint_region(&occlusion, cfg), cfg)?
    } else {
        clean_reduced(img, &occlusion, f, cfg)?
    };
    Ok(HairResult { occlusion, clean, masked_fraction })
}

/// The pixels [`clean_mask`] fills for an occlusion mask: the mask grown by
/// `cfg.inpaint_margin` (scaled to the image), so that the faint edges of hairs are filled too.
pub fn inpaint_region(occlusion: &GrayImage, cfg: &HairConfig) -> GrayImage {
    let (w, h) = occlusion.dimensions();
    let margin = cfg.inpaint_margin * cfg.scale(w, h);
    if margin < 1.0 {
        return occlusion.clone();
    }
    let grown = morph::dilate_disc(occlusion.as_raw(), w as usize, h as usize, margin);
    GrayImage::from_raw(w, h, grown).unwrap_or_else(|| occlusion.clone())
}

/// The reduced-resolution fill of [`clean_mask`].
fn clean_reduced(img: &RgbImage, occlusion: &GrayImage, f: usize, cfg: &HairConfig) -> Result<RgbImage> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (ww, wh) = (w.div_ceil(f), h.div_ceil(f));
    let occ = occlusion.as_raw();
    let mut pooled = vec![0u8; ww * wh];
    pooled.par_chunks_mut(ww).enumerate().for_each(|(by, row)| {
        for y in by * f..((by + 1) * f).min(h) {
            for (bx, block) in occ[y * w..(y + 1) * w].chunks(f).enumerate() {
                if block.iter().any(|&v| v != 0) {
                    row[bx] = 255;
                }
            }
        }
    });
    let margin = cfg.inpaint_margin * cfg.scale(ww as u32, wh as u32);
    if margin >= 1.0 {
        pooled = morph::dilate_disc(&pooled, ww, wh, margin);
    }
    let small = mask::rgb_down(img, f);
    let small_mask = GrayImage::from_raw(ww as u32, wh as u32, pooled.clone())
        .ok_or_else(|| derm_core::Error::invalid("pooled mask buffer size"))?;
    let fill = inpaint(&small, &small_mask, cfg)?;
    let region = mask::up_nearest(&pooled, ww, w, h, f);
    let mut out = img.clone();
    let fr = fill.as_raw();
    out.as_mut().par_chunks_mut(w * 3).enumerate().for_each(|(y, row)| {
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            if region[y * w + x] == 0 {
                continue;
            }
            let fx = ((x as f32 + 0.5) / f as f32 - 0.5).clamp(0.0, (ww - 1) as f32);
            let fy = ((y as f32 + 0.5) / f as f32 - 0.5).clamp(0.0, (wh - 1) as f32);
            let (x0, y0) = (fx as usize, fy as usize);
            let (x1, y1) = ((x0 + 1).min(ww - 1), (y0 + 1).min(wh - 1));
            let (ax, ay) = (fx - x0 as f32, fy - y0 as f32);
            for (c, v) in px.iter_mut().enumerate() {
                let g = |xx: usize, yy: usize| fr[(yy * ww + xx) * 3 + c] as f32;
                let top = g(x0, y0) * (1.0 - ax) + g(x1, y0) * ax;
                let bot = g(x0, y1) * (1.0 - ax) + g(x1, y1) * ax;
                *v = (top * (1.0 - ay) + bot * ay).round().clamp(0.0, 255.0) as u8;
            }
        }
    });
    let region = GrayImage::from_raw(w as u32, h as u32, region)
        .ok_or_else(|| derm_core::Error::invalid("fill region buffer size"))?;
    Ok(inpaint::relax_harmonic(&out, &region, 4))
}

#[cfg(test)]
mod tests {
    use super::*;
    use derm_data::phantom::{draw_phantoms, PhantomConfig};

    /// The targets of the issue on 12 phantoms at 256 px, every one with hairs: pooled pixel
    /// recall at least 0.95 and precision at least 0.70 against the drawn occlusion mask, and
    /// little of the lesion called occlusion where nothing was drawn (lesion pixels in our mask
    /// but not in the drawn occlusion, over the lesion's area, pooled): at most 1% with the
    /// luminance alone, 1.5% with the value plane (the default). A phantom's lesion texture
    /// darkens every channel in proportion, so its network and ridges show in the largest
    /// channel as much as anywhere; melanin's real texture is faint in red, and on the
    /// real-image benchmark (BENCH.md) the value plane marks 0.21% of hair-free lesions.
    /// Inpainting must raise the PSNR against the clean phantom.
    #[test]
    fn phantom_targets() {
        let pc = PhantomConfig {
            size: 256,
            hair_probability: 1.0,
            ruler_probability: 0.3,
            ink_probability: 0.3,
            ..PhantomConfig::default()
        };
        let phantoms = draw_phantoms(&pc, 11, 12);
        // Measured: value and chroma planes (the default) recall 0.967, precision 0.848, leak
        // 0.0147; luminance and chroma recall 0.962, precision 0.869, leak 0.0081 (before the
        // relative test and the chroma plane: leak 0.0101 and 0.0048). A phantom's network darkens
        // every channel in proportion, so it is as plain in the chroma plane as in the value plane.
        for (value_plane, max_leak) in [(true, 0.015), (false, 0.01)] {
            let cfg = HairConfig { value_plane, ..HairConfig::default() };
            let mut pooled = eval::PixelScores::default();
            let (mut leak_px, mut lesion_px) = (0.0, 0.0);
            let (mut before, mut after) = (0.0, 0.0);
            for p in &phantoms {
                let r = clean(&p.image, Some(&p.lesion), &cfg).unwrap();
                pooled = pooled.merge(&eval::pixel_scores(&r.occlusion, &p.occlusion).unwrap());
                let area = p.lesion.pixels().filter(|v| v.0[0] != 0).count() as f64;
                leak_px += eval::lesion_leak(&r.occlusion, &p.lesion, &p.occlusion).unwrap() * area;
                lesion_px += area;
                before += eval::psnr(&p.image, &p.clean).unwrap().min(99.0);
                after += eval::psnr(&r.clean, &p.clean).unwrap().min(99.0);
            }
            let leak = leak_px / lesion_px;
            let n = phantoms.len() as f64;
            assert!(pooled.recall >= 0.95, "value plane {value_plane}: {pooled:?}");
            assert!(pooled.precision >= 0.70, "value plane {value_plane}: {pooled:?}");
            assert!(leak <= max_leak, "value plane {value_plane}: lesion leak {leak}");
            assert!(after / n > before / n + 5.0, "psnr {} -> {}", before / n, after / n);
        }
    }
}
