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
use crate::config::{HairConfig, HairDetector};
use crate::morph::{black_hat_lines, components, dilate_disc, fill_holes, line_filter, remove_small, LineDir, MorphOp};
use rayon::prelude::*;

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
    let (_, m, found) = crate::color::luminance_u8_and_flags(img, ink_test(img, cfg));
    ink_cleanup(m, found, img.width() as usize, img.height() as usize, cfg)
}

/// The per-pixel ink test on whole r, g, b: `r - g >= t` is `r - g >= ceil(t)`,
/// `b - g >= 1.75 t` is `b - g >= ceil(1.75 t)`, and `b >= r - t / 2` is `b >= r - floor(t / 2)`.
/// With `cfg.ink_constancy`, the channels are first scaled by the Shades of Gray gains (p = 6) of
/// `img` (taken on a reduction to about 256 px): the skin then is grey whatever the light's
/// colour, so a bluish cast is not violet, and a red-purple marker on pink skin is. On grey skin
/// a marker is redder than green by less than on the raw pink-brown skin, so the first condition
/// is then `r - g >= t / 4`.
fn ink_test(img: &RgbImage, cfg: &HairConfig) -> impl Fn(i32, i32, i32) -> bool + Sync {
    let (t2, th) = ((1.75 * cfg.ink_chroma).ceil() as i32, (cfg.ink_chroma / 2.0).floor() as i32);
    let (t, gains) = if cfg.ink_constancy {
        let f = (img.width().min(img.height()) as usize / 256).max(1);
        let small = if f > 1 { rgb_down(img, f) } else { img.clone() };
        ((cfg.ink_chroma / 4.0).ceil() as i32, derm_core::image_io::shades_of_gray_gains(&small, 6.0))
    } else {
        (cfg.ink_chroma.ceil() as i32, [1.0; 3])
    };
    // Gains in 1/1024 (whole numbers keep the test exact and fast).
    let [gr, gg, gb] = gains.map(|g| (g * 1024.0).round() as i32);
    move |r, g, b| {
        let (r, g, b) = ((r * gr) >> 10, (g * gg) >> 10, (b * gb) >> 10);
        r - g >= t && b - g >= t2 && b >= r - th
    }
}

/// Drops the ink pieces lying mostly on the lesion (`lesion` non-zero inside): a marker is drawn
/// around a lesion, while a lesion's own violet or blue-grey areas pass the colour test.
fn off_the_lesion(ink: &mut [u8], lesion: &[u8], w: usize, h: usize) {
    for c in components(ink, w, h, true) {
        if c.pixels(w).filter(|&p| lesion[p] != 0).count() * 2 > c.area() {
            for p in c.pixels(w) {
                ink[p] = 0;
            }
        }
    }
}

/// Drops small ink pieces and wide ones (a violet lesion is a blob, a pen leaves strokes and
/// dots: a piece's area over its length must be at most `cfg.ink_max_width`), and adds a
/// one-pixel (scaled) margin for the anti-aliased edge.
fn ink_cleanup(mut m: Vec<u8>, found: usize, w: usize, h: usize, cfg: &HairConfig) -> Vec<u8> {
    if found == 0 {
        return m;
    }
    let s = cfg.scale(w as u32, h as u32);
    remove_small(&mut m, w, h, (cfg.min_area * 2.0 * s * s).round() as usize);
    let widest = cfg.ink_max_width * s;
    for c in components(&m, w, h, true) {
        // A marker's band or line of dots is long for its width; a violet lesion is round.
        let length = c.length();
        let width = c.area() as f32 / length;
        if width > widest && length < 3.0 * width {
            for p in c.pixels(w) {
                m[p] = 0;
            }
        }
    }
    dilate_disc(&m, w, h, 1.5 * s)
}

/// The occlusion mask of hairs, rulers and ink marks (0/255), at the size of `img`, from the
/// detector `cfg.detector` names: [`oriented_hair_mask`] (the default) or [`legacy_hair_mask`].
///
/// With `lesion` (non-zero inside, same size as `img`), the lesion gets its own threshold
/// (oriented) or keeps its dark texture out of the mask (legacy). Errors for an image smaller
/// than [`MIN_SIDE`], a lesion mask of another size, or an invalid config. An image with no dark
/// thin structure (all black, say) gives an empty mask.
pub fn hair_mask(img: &RgbImage, lesion: Option<&GrayImage>, cfg: &HairConfig) -> Result<GrayImage> {
    match cfg.detector {
        HairDetector::Oriented => oriented_hair_mask(img, lesion, cfg),
        HairDetector::Legacy => legacy_hair_mask(img, lesion, cfg),
    }
}

/// The oriented-line detector of issue 18 ([`HairDetector::Oriented`]): the occlusion mask of
/// hairs, rulers and ink marks (0/255), at the size of `img`.
///
/// Detection runs at a working resolution: the image's L* plane averaged over `f x f` blocks,
/// `f = max(1, short side / cfg.work_side)` (so a working short side of `work_side` to twice
/// that), with every size of `cfg` scaled to it. There:
/// 1. [`crate::oriented::line_responses`]: in `cfg.directions` orientations, the line black-hat
///    (and, with `cfg.light`, the white top-hat); the hair score of a pixel is the largest
///    response minus the smallest (a hair is closed across, not along; dots, globules and a
///    pigment network are closed along every line). With `cfg.value_plane` the black-hat is
///    also taken on the value plane ([`crate::color::value_u8`]), and with `cfg.chroma_plane`
///    and a lesion mask on the chroma plane inside the lesion, half a line element away from its
///    border ([`crate::color::chroma_u8`]: a grey hair as light as the brown lesion); the
///    largest score wins;
/// 2. hysteresis: pixels scoring at least `cfg.threshold` (inside the lesion, when a lesion mask
///    is given, `cfg.lesion_threshold`; light hairs `cfg.light_threshold`) seed pieces that grow
///    through pixels scoring at least `cfg.hysteresis` (inside the lesion
///    `cfg.lesion_hysteresis`) times that, when those fainter pixels' neighbourhood is
///    orientation-coherent (`cfg.weak_coherence`): the faint stretch of a hair on a lesion
///    continues the hair's direction, the lesion's texture points every way;
/// 3. pigment network: inside the lesion, where candidates are dense (`cfg.mesh_density`) and
///    point every way (coherence under `cfg.mesh_coherence`), a candidate counts only on a
///    straight run of `cfg.mesh_length` times `cfg.min_length` through pixels pointing the run's
///    way, and joins a hair next to it only along it (`cfg.mesh_agreement`);
/// 4. shape: a piece is kept when it is at least `cfg.min_length` long (second moments) and at
///    most `cfg.max_width` wide on average (twice its area over its boundary pixels); before
///    that, pixels scoring under `cfg.relative_share` of the hair across them are dropped (the
///    lesion's texture along a hair);
/// 5. rulers ([`crate::ruler`]) on the thresholded black-hat;
/// 6. air bubbles ([`crate::bubble`], with `cfg.bubbles`) on the working luminance.
///
/// The mask is brought back to the input's size by refining the enlarged working mask (grown by
/// one working pixel): a full-size pixel is kept when it is darker than the enlarged closing (or
/// lighter than the enlarged opening) by at least half the threshold, and in the grown ring also
/// by `cfg.edge_share` of the hair's score next to it. At working size only that ring is tested,
/// the detection's pixels kept. Ink marks, dilation and hole filling then run at full size.
///
/// Errors for an image smaller than [`MIN_SIDE`], a lesion mask of another size, or an invalid
/// config. An image with no dark thin structure (all black, say) gives an empty mask.
pub fn oriented_hair_mask(img: &RgbImage, lesion: Option<&GrayImage>, cfg: &HairConfig) -> Result<GrayImage> {
    check_inputs(img, lesion, cfg)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (l, ink) = if cfg.ink {
        let (l, ink, found) = crate::color::luminance_u8_and_flags(img, ink_test(img, cfg));
        let mut ink = ink_cleanup(ink, found, w, h, cfg);
        if let Some(m) = lesion {
            off_the_lesion(&mut ink, m.as_raw(), w, h);
        }
        (l, Some(ink))
    } else {
        (luminance_u8(img), None)
    };
    let f = work_factor(w, h, cfg);
    let u = up_factor(w, h, cfg);
    // The full-size value of a pixel is looked up where it is needed (`Detection::dark_value`).
    let rgb = (cfg.value_plane || cfg.chroma_plane).then(|| img.as_raw().as_slice());
    if u > 1 {
        let v = cfg.value_plane.then(|| crate::color::value_u8(img));
        let c = (cfg.chroma_plane && lesion.is_some()).then(|| crate::color::chroma_u8(img));
        // A small image: detection on the bilinear enlargement; a pixel is kept when its block
        // holds hair and it differs from the surroundings as in [`refine`].
        let (wu, hu) = (w * u, h * u);
        let lu = up_bilinear(&l, w, h, u);
        let vu = v.as_ref().map(|v| up_bilinear(v, w, h, u));
        let cu = c.as_ref().map(|c| up_bilinear(c, w, h, u));
        let lesion_u = lesion.map(|m| up_nearest(m.as_raw(), w, wu, hu, u));
        let det = detect(&lu, vu.as_deref(), cu.as_deref(), wu, hu, lesion_u.as_deref(), cfg);
        let mut m = refine_up(&det, &l, rgb, w, h, u, cfg);
        if cfg.rulers {
            let raw = block_share(&det.raw, wu, w, h, u, 0.5);
            let ruler = crate::ruler::ruler_mask(&raw, img, w, h, cfg);
            for (a, &b) in m.iter_mut().zip(&ruler) {
                *a |= b;
            }
        }
        if cfg.bubbles {
            let rims = crate::bubble::bubble_mask(&l, w, h, cfg.scale(w as u32, h as u32), cfg);
            for (a, &b) in m.iter_mut().zip(&rims) {
                *a |= b;
            }
        }
        return finish(m, ink, w, h, 1, cfg);
    }
    let (ww, wh) = (w.div_ceil(f), h.div_ceil(f));
    let lw = box_down(&l, w, h, f);
    // The reduced colour image serves the value plane and the ruler's band search.
    let small =
        if f > 1 && (cfg.value_plane || cfg.chroma_plane || cfg.rulers) { Some(rgb_down(img, f)) } else { None };
    let small = small.as_ref().unwrap_or(img);
    let vw = cfg.value_plane.then(|| crate::color::value_u8(small));
    let cw = (cfg.chroma_plane && lesion.is_some()).then(|| crate::color::chroma_u8(small));
    let lesion_w = lesion.map(|m| box_down(m.as_raw(), w, h, f));
    let det = detect(&lw, vw.as_deref(), cw.as_deref(), ww, wh, lesion_w.as_deref(), cfg);
    let mut m = refine(&det, &l, rgb, w, h, f, cfg);
    if cfg.rulers {
        let ruler = crate::ruler::ruler_mask(&det.raw, small, ww, wh, cfg);
        if ruler.iter().any(|&v| v != 0) {
            let ruler = if f == 1 { ruler } else { up_nearest(&ruler, ww, w, h, f) };
            for (a, &b) in m.iter_mut().zip(&ruler) {
                *a |= b;
            }
        }
    }
    if cfg.bubbles {
        let rims = crate::bubble::bubble_mask(&lw, ww, wh, cfg.scale(ww as u32, wh as u32), cfg);
        if rims.iter().any(|&v| v != 0) {
            let rims = if f == 1 { rims } else { up_nearest(&rims, ww, w, h, f) };
            for (a, &b) in m.iter_mut().zip(&rims) {
                *a |= b;
            }
        }
    }
    finish(m, ink, w, h, f, cfg)
}

/// Ink marks, dilation and hole filling at full size.
fn finish(mut m: Vec<u8>, ink: Option<Vec<u8>>, w: usize, h: usize, f: usize, cfg: &HairConfig) -> Result<GrayImage> {
    let s_full = cfg.scale(w as u32, h as u32);
    if let Some(ink) = ink {
        for (a, b) in m.iter_mut().zip(ink) {
            *a |= b;
        }
    }
    if cfg.dilate_radius * s_full >= 1.0 {
        m = dilate_disc(&m, w, h, cfg.dilate_radius * s_full);
    }
    fill_holes(&mut m, w, h, (cfg.max_hole_area * s_full * s_full).round() as usize);
    if tracing::enabled!(tracing::Level::DEBUG) {
        let n = m.iter().filter(|&&v| v != 0).count();
        tracing::debug!(w, h, f, masked = n, "hair mask");
    }
    GrayImage::from_raw(w as u32, h as u32, m).ok_or_else(|| derm_core::Error::invalid("hair mask buffer size"))
}

/// The integer enlargement factor of a small image (see `HairConfig::min_work_side`).
pub fn up_factor(w: usize, h: usize, cfg: &HairConfig) -> usize {
    let short = w.min(h);
    if cfg.min_work_side == 0 || short >= cfg.min_work_side as usize {
        return 1;
    }
    (cfg.min_work_side as usize).div_ceil(short.max(1))
}

/// The mask of a small image from the detection on its enlargement by `u`: a pixel is kept when
/// its `u x u` block holds hair and the pixel is darker than the closing at the block's centre
/// (lighter than the opening, for a light hair) by at least half the threshold.
fn refine_up(det: &Detection, l: &[u8], rgb: Option<&[u8]>, w: usize, h: usize, u: usize, cfg: &HairConfig) -> Vec<u8> {
    let wu = det.w;
    let t_dark = cfg.threshold.min(cfg.lesion_threshold) * 2.55 * 0.5;
    let t_light = cfg.light_threshold * 2.55 * 0.5;
    let mut out = vec![0u8; w * h];
    for y in 0..h {
        for x in 0..w {
            let (mut hair, mut light) = (false, false);
            for yy in y * u..(y + 1) * u {
                for k in yy * wu + x * u..yy * wu + (x + 1) * u {
                    hair |= det.mask[k] != 0;
                    light |= det.light[k] != 0;
                }
            }
            if !hair {
                continue;
            }
            let c = (y * u + u / 2) * wu + x * u + u / 2;
            let i = y * w + x;
            let keep = if light {
                l[i] as f32 - det.opening[c] as f32 >= t_light
            } else {
                det.closing[c] as f32 - det.dark_value(c, l, rgb, i) >= t_dark
            };
            if keep {
                out[y * w + x] = 255;
            }
        }
    }
    out
}

/// Bilinear enlargement of a plane by `u` (pixel centres aligned, edges clamped).
fn up_bilinear(src: &[u8], w: usize, h: usize, u: usize) -> Vec<u8> {
    let (wu, hu) = (w * u, h * u);
    let mut out = vec![0u8; wu * hu];
    out.par_chunks_mut(wu).enumerate().for_each(|(y, row)| {
        for (x, o) in row.iter_mut().enumerate() {
            *o = bilinear(src, w, h, u, x, y).round().clamp(0.0, 255.0) as u8;
        }
    });
    out
}

/// A `w` x `h` mask from one `u` times larger (`wu` wide): a pixel is set when at least `share`
/// of its `u x u` block is.
fn block_share(src: &[u8], wu: usize, w: usize, h: usize, u: usize, share: f32) -> Vec<u8> {
    let need = ((share * (u * u) as f32).ceil() as usize).max(1);
    let mut out = vec![0u8; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut n = 0;
            for yy in y * u..(y + 1) * u {
                n += src[yy * wu + x * u..yy * wu + (x + 1) * u].iter().filter(|&&v| v != 0).count();
            }
            if n >= need {
                out[y * w + x] = 255;
            }
        }
    }
    out
}

/// The integer reduction factor of the working resolution.
pub fn work_factor(w: usize, h: usize, cfg: &HairConfig) -> usize {
    if cfg.work_side == 0 {
        return 1;
    }
    (w.min(h) / cfg.work_side as usize).max(1)
}

/// Mean of `f x f` blocks (partial blocks at the right and bottom edges averaged over what they
/// hold).
pub(crate) fn box_down(src: &[u8], w: usize, h: usize, f: usize) -> Vec<u8> {
    box_down_channels(src, 1, w, h, f).pop().unwrap_or_default()
}

/// [`box_down`] of each of the `n` interleaved channels of `src` (`w` x `h` pixels), in one
/// pass, rows of blocks in parallel.
fn box_down_channels(src: &[u8], n: usize, w: usize, h: usize, f: usize) -> Vec<Vec<u8>> {
    if f == 1 {
        return (0..n).map(|c| src.iter().skip(c).step_by(n).copied().collect()).collect();
    }
    let (ww, wh) = (w.div_ceil(f), h.div_ceil(f));
    let mut out = vec![0u8; ww * wh * n];
    out.par_chunks_mut(ww * n).enumerate().for_each(|(by, orow)| {
        let mut sum = vec![0u32; ww * n];
        let rows = (by * f..((by + 1) * f).min(h)).len() as u32;
        for y in by * f..((by + 1) * f).min(h) {
            let row = &src[y * w * n..(y + 1) * w * n];
            for (bx, block) in row.chunks(f * n).enumerate() {
                let acc = &mut sum[bx * n..(bx + 1) * n];
                for px in block.chunks_exact(n) {
                    for (a, &v) in acc.iter_mut().zip(px) {
                        *a += v as u32;
                    }
                }
            }
        }
        for (bx, (o, sm)) in orow.chunks_mut(n).zip(sum.chunks(n)).enumerate() {
            let cnt = rows * (((bx + 1) * f).min(w) - bx * f) as u32;
            for (o, &s) in o.iter_mut().zip(sm) {
                *o = ((s + cnt / 2) / cnt.max(1)) as u8;
            }
        }
    });
    (0..n).map(|c| out.iter().skip(c).step_by(n).copied().collect()).collect()
}

/// [`box_down`] of each channel.
pub(crate) fn rgb_down(img: &RgbImage, f: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let planes = box_down_channels(img.as_raw(), 3, w, h, f);
    let (ww, wh) = (w.div_ceil(f), h.div_ceil(f));
    RgbImage::from_fn(ww as u32, wh as u32, |x, y| {
        let i = y as usize * ww + x as usize;
        image::Rgb([planes[0][i], planes[1][i], planes[2][i]])
    })
}

/// Nearest enlargement of a working plane (`ww` wide) to `w` x `h` by `f`.
pub(crate) fn up_nearest(src: &[u8], ww: usize, w: usize, h: usize, f: usize) -> Vec<u8> {
    let mut out = vec![0u8; w * h];
    for y in 0..h {
        let srow = &src[(y / f) * ww..];
        for (x, o) in out[y * w..(y + 1) * w].iter_mut().enumerate() {
            *o = srow[x / f];
        }
    }
    out
}

/// What detection at the working resolution gives.
pub(crate) struct Detection {
    w: usize,
    h: usize,
    /// Hairs (0/255).
    pub mask: Vec<u8>,
    /// Which of them are light hairs (0/255).
    light: Vec<u8>,
    /// The thresholded largest black-hat (pieces of `min_area`), for the ruler search.
    pub raw: Vec<u8>,
    /// Closing (dark surroundings) and opening (light surroundings) of the best orientation;
    /// the closing is of the plane that gave the dark score.
    closing: Vec<u8>,
    opening: Vec<u8>,
    /// Where the value plane gave the larger dark score (0/1; empty without it).
    from_value: Vec<u8>,
    /// The largest dark score of a hair pixel in each pixel's 3 x 3 neighbourhood (the local
    /// contrast of the hair).
    peak: Vec<u8>,
    /// The working lesion mask (empty without one).
    lesion: Vec<u8>,
}

impl Detection {
    /// The value a full-size pixel `i` is compared with the closing at working pixel `k`: of the
    /// plane that gave the dark score there (the value from the pixel's colour in `rgb`).
    fn dark_value(&self, k: usize, l: &[u8], rgb: Option<&[u8]>, i: usize) -> f32 {
        match (rgb, self.from_value.get(k)) {
            (Some(p), Some(&1)) => crate::color::value_of(p[i * 3], p[i * 3 + 1], p[i * 3 + 2]) as f32,
            (Some(p), Some(&2)) => crate::color::chroma_of(p[i * 3], p[i * 3 + 1], p[i * 3 + 2]) as f32,
            _ => l[i] as f32,
        }
    }
}

/// Hair detection on an `L* * 2.55` plane `l` and, when given, the value plane
/// ([`crate::color::value_u8`]) and the chroma plane ([`crate::color::chroma_u8`], inside the
/// lesion only): the dark score of a pixel is the largest of the planes' (see [`hair_mask`]);
/// light hairs are looked for in `l`.
pub(crate) fn detect(
    l: &[u8],
    value: Option<&[u8]>,
    chroma: Option<&[u8]>,
    w: usize,
    h: usize,
    lesion: Option<&[u8]>,
    cfg: &HairConfig,
) -> Detection {
    let s = cfg.scale(w as u32, h as u32);
    let radius = ((cfg.line_length * s - 1.0) / 2.0).round().max(1.0) as usize;
    let widen = s.round().max(1.0) as usize;
    let mut r = crate::oriented::line_responses(l, w, h, radius, cfg.directions, cfg.light, widen);
    let in_lesion = |i: usize| lesion.is_some_and(|m| m[i] >= 128);
    // `from_value`: 1 where the value plane gave the larger dark score, 2 the chroma plane
    // (which counts inside the lesion only: a grey hair on a brown lesion is a dark line there,
    // while on skin grey-white scales and flakes would be too).
    let mut from_value = Vec::new();
    let chroma = chroma.filter(|_| lesion.is_some());
    // The chroma plane counts at least a line element's half length inside the lesion's border:
    // between a brown lesion and bluish skin the colours mix to grey, a thin low-chroma ring.
    let deep: Vec<u8> = match (chroma, lesion) {
        (Some(_), Some(m)) => {
            let m: Vec<u8> = m.iter().map(|&v| if v >= 128 { 255 } else { 0 }).collect();
            let e = line_filter(&m, w, h, LineDir::Horizontal, radius, MorphOp::Min);
            line_filter(&e, w, h, LineDir::Vertical, radius, MorphOp::Min)
        }
        _ => Vec::new(),
    };
    for (k, v) in [(1u8, value), (2, chroma)] {
        let Some(v) = v else { continue };
        let rv = crate::oriented::line_responses(v, w, h, radius, cfg.directions, false, widen);
        from_value.resize(w * h, 0u8);
        for (i, fv) in from_value.iter_mut().enumerate() {
            if k == 2 && deep[i] == 0 {
                continue;
            }
            if rv.dark_max[i] - rv.dark_min[i] > r.dark_max[i] - r.dark_min[i] {
                r.dark_max[i] = rv.dark_max[i];
                r.dark_min[i] = rv.dark_min[i];
                r.across[i] = rv.across[i];
                r.closing[i] = rv.closing[i];
                *fv = k;
            }
        }
    }
    let thr = |t: f32| (t * 2.55).round().max(1.0);
    let (t_out, t_in, t_light) = (thr(cfg.threshold), thr(cfg.lesion_threshold), thr(cfg.light_threshold));
    let (lo_out, lo_in) = (cfg.hysteresis.clamp(0.1, 1.0), cfg.lesion_hysteresis.clamp(0.1, 1.0));
    let mut weak = vec![0u8; w * h];
    let mut strong = vec![0u8; w * h];
    let mut light = vec![0u8; w * h];
    // The score of a candidate: its dark score, or its light one when only that passed.
    let mut score = vec![0u8; w * h];
    for i in 0..w * h {
        let (t, lo) = if in_lesion(i) { (t_in, lo_in) } else { (t_out, lo_out) };
        let (d8, g8) = (r.dark_max[i] - r.dark_min[i], r.light_max[i] - r.light_min[i]);
        let (d, g) = (d8 as f32, g8 as f32);
        score[i] = d8;
        if d >= t * lo {
            weak[i] = 255;
            if d >= t {
                strong[i] = 255;
            }
        } else if cfg.light && g >= t_light * lo {
            weak[i] = 255;
            light[i] = 255;
            score[i] = g8;
            if g >= t_light {
                strong[i] = 255;
            }
        }
    }
    // Shape: a pixel stays when a straight run of at least `min_length` fits through it in the
    // (one pixel grown) candidates while the run across it is at most `max_width` (+2 for the
    // growth): blobs, the lesion's rim and the mesh of a network fail one or the other.
    // Orientation coherence: around a hair the candidates are closed across one orientation;
    // on a pigment network, branched pieces and meshes point every way. A candidate stays when
    // the sum of its neighbours' across-vectors (within half `min_length`) is at least
    // `cfg.coherence` of the sum of their lengths.
    let rho = (cfg.min_length * s / 2.0).round().max(2.0) as usize;
    // A light hair's orientation is the top-hat's.
    let oriented: Vec<(i32, i32)> =
        (0..w * h).map(|i| if light[i] != 0 { r.light_across[i] } else { r.across[i] }).collect();
    let coh = coherence(&oriented, &weak, w, h, rho);
    // Pigment network: inside the lesion, where candidates cover at least `mesh_density` of the
    // lesion around a pixel (the same square) and its coherence is under `mesh_coherence`, the
    // pixel is in a mesh. A hair crossing the mesh is a sparse line through it, but the mesh's
    // own across-vectors outvote the hair's in the coherence sum, so a mesh pixel is judged by
    // the length of its straight run instead (below).
    let meshed: Vec<bool> = match lesion {
        Some(m) if cfg.mesh_coherence > 0.0 => {
            let density = lesion_density(&weak, m, w, h, rho);
            (0..w * h).map(|i| in_lesion(i) && density[i] >= cfg.mesh_density && coh[i] < cfg.mesh_coherence).collect()
        }
        _ => vec![false; w * h],
    };
    let cand: Vec<u8> = (0..w * h)
        .map(|i| {
            let need = if strong[i] != 0 { cfg.coherence } else { cfg.coherence.max(cfg.weak_coherence) };
            if weak[i] != 0 && !meshed[i] && coh[i] >= need {
                255
            } else {
                0
            }
        })
        .collect();
    let min_len = (cfg.min_length * s).max(3.0);
    let max_w = (cfg.max_width * s).max(1.0) + 2.0;
    let loose = dilate_disc(&cand, w, h, 1.0);
    let dirs = orientations();
    // A mesh pixel stays when a run of `mesh_length` times `min_length` through it passes only
    // pixels near a candidate pointing the run's way (a network's edges turn at every junction,
    // a cell or two apart) while the run across it in the other candidates is at most `max_w`.
    let mesh_len = min_len * cfg.mesh_length;
    let bits = if meshed.contains(&true) { direction_bits(&weak, &oriented, w, h) } else { Vec::new() };
    let mut lined = vec![0u8; w * h];
    lined.par_chunks_mut(w).enumerate().for_each(|(y, row)| {
        for (x, o) in row.iter_mut().enumerate() {
            let i = y * w + x;
            let hair = if meshed[i] {
                let (n, cap) = (dirs.len(), mesh_len.ceil() as usize);
                weak[i] != 0
                    && (0..n).any(|d| {
                        bits[i] & (1 << d) != 0
                            && run_where(w, h, x, y, dirs[d], cap, |k| bits[k] & (1 << d) != 0) as f32 >= mesh_len
                            && run_through(&loose, w, h, x, y, dirs[(d + n / 2) % n], cap) as f32 <= max_w
                    })
            } else {
                cand[i] != 0 && line_like(&loose, w, h, x, y, min_len, max_w, &dirs)
            };
            if hair {
                *o = 255;
            }
        }
    });
    // Crossings, forks, wide hairs and hairs running close together fail the coherence or width
    // test over a few pixels. Candidates within two pixels of what passed are added back when
    // they score at least `addback_share` of the strongest hair pixel there (the lesion's
    // texture beside a hair scores lower than the hair), repeatedly up to the largest width. Only
    // candidates above their threshold are added back: the fainter ones grown by hysteresis
    // must pass the shape test themselves. A mesh pixel is added back only when it points the
    // way of the hair pixels next to it (`mesh_agreement`): a network's edges meet a hair
    // crossing it at every angle, a wide hair's rim and a fork run along it.
    let steps = (cfg.max_width * s / 2.0).ceil().max(1.0) as usize;
    for _ in 0..steps {
        let held: Vec<u8> = lined.iter().zip(&score).map(|(&l, &d)| if l != 0 { d } else { 0 }).collect();
        let near = crate::oriented::square3(&held, w, h, true);
        let near = crate::oriented::square3(&near, w, h, true);
        for (i, l) in lined.iter_mut().enumerate() {
            if *l == 0
                && strong[i] != 0
                && near[i] > 0
                && score[i] as f32 >= cfg.addback_share * near[i] as f32
                && (!meshed[i] || agreement(&held, &oriented, w, h, i) >= cfg.mesh_agreement)
            {
                *l = 255;
            }
        }
    }
    // Relative strength: the lesion's texture that lies along a hair rides into the hair's piece
    // through the shape test (the two together are long and narrow) but scores well below it.
    // A pixel is dropped when its score is under `relative_share` of the largest hair score on
    // the line across it (its own across direction) within half `max_width`, unless it scores
    // `relative_keep` times its threshold. A faint hair continuing a strong one lies along it,
    // not across, and stays.
    if cfg.relative_share > 0.0 {
        let held: Vec<u8> = lined.iter().zip(&score).map(|(&l, &d)| if l != 0 { d } else { 0 }).collect();
        let reach = (cfg.max_width * s / 2.0).ceil().max(1.0) as i64;
        let drop: Vec<usize> = (0..w * h)
            .into_par_iter()
            .filter(|&i| {
                let t = if in_lesion(i) { t_in } else { t_out };
                let d = score[i] as f32;
                lined[i] != 0
                    && d < cfg.relative_keep * t
                    && d < cfg.relative_share * across_max(&held, w, h, i, r.across[i], reach) as f32
            })
            .collect();
        for i in drop {
            lined[i] = 0;
        }
    }
    let mut mask = vec![0u8; w * h];
    for c in components(&lined, w, h, true) {
        if c.length() < min_len || !c.pixels(w).any(|p| strong[p] != 0) {
            continue;
        }
        for p in c.pixels(w) {
            mask[p] = 255;
        }
    }
    for (v, m) in light.iter_mut().zip(&mask) {
        *v &= *m;
    }
    let t_raw = thr(cfg.threshold) as u8;
    let mut raw: Vec<u8> = r.dark_max.iter().map(|&v| if v >= t_raw { 255 } else { 0 }).collect();
    remove_small(&mut raw, w, h, (cfg.min_area * s * s).round() as usize);
    let opening: Vec<u8> = l.iter().zip(&r.light_max).map(|(&a, &b)| a.saturating_sub(b)).collect();
    let hair_score: Vec<u8> = mask.iter().zip(&r.dark_max).map(|(&m, &d)| if m != 0 { d } else { 0 }).collect();
    let peak = crate::oriented::square3(&hair_score, w, h, true);
    let lesion = lesion.map(<[u8]>::to_vec).unwrap_or_default();
    Detection { w, h, mask, light, raw, closing: r.closing, opening, from_value, peak, lesion }
}

/// The cosine between pixel `i`'s doubled-angle vector in `v` and the sum of those of the pixels
/// of `held` (non-zero) in the 5 x 5 square around it (-1 where none is).
fn agreement(held: &[u8], v: &[(i32, i32)], w: usize, h: usize, i: usize) -> f32 {
    let (x, y) = ((i % w) as i64, (i / w) as i64);
    let (mut sx, mut sy) = (0f64, 0f64);
    for yy in (y - 2).max(0)..(y + 3).min(h as i64) {
        for xx in (x - 2).max(0)..(x + 3).min(w as i64) {
            let k = yy as usize * w + xx as usize;
            if held[k] != 0 {
                sx += v[k].0 as f64;
                sy += v[k].1 as f64;
            }
        }
    }
    let (a, b) = (v[i].0 as f64, v[i].1 as f64);
    let d = (a * a + b * b).sqrt() * (sx * sx + sy * sy).sqrt();
    if d > 0.0 {
        ((a * sx + b * sy) / d) as f32
    } else {
        -1.0
    }
}

/// The largest value of `plane` on the line of `2 reach + 1` samples through pixel `i` in the
/// direction `across` points to (a doubled-angle vector, as [`crate::oriented::Responses`]).
fn across_max(plane: &[u8], w: usize, h: usize, i: usize, across: (i32, i32), reach: i64) -> u8 {
    let half = (across.1 as f32).atan2(across.0 as f32) / 2.0;
    let (cx, cy) = (half.cos(), half.sin());
    let (x, y) = ((i % w) as f32, (i / w) as f32);
    let mut m = 0u8;
    for k in -reach..=reach {
        let (xx, yy) = ((x + cx * k as f32).round() as i64, (y + cy * k as f32).round() as i64);
        if xx >= 0 && yy >= 0 && (xx as usize) < w && (yy as usize) < h {
            m = m.max(plane[yy as usize * w + xx as usize]);
        }
    }
    m
}

/// A summed-area table of a plane (a row and a column of zeros in front), for sums over squares.
struct Summed {
    w: usize,
    h: usize,
    s: Vec<f64>,
}

impl Summed {
    /// The table of `value(i)` over the pixels `i` of a `w` x `h` plane.
    fn new(w: usize, h: usize, value: impl Fn(usize) -> f64) -> Self {
        let w1 = w + 1;
        let mut s = vec![0f64; w1 * (h + 1)];
        for y in 0..h {
            let mut row = 0f64;
            for x in 0..w {
                row += value(y * w + x);
                let o = (y + 1) * w1 + x + 1;
                s[o] = s[o - w1] + row;
            }
        }
        Summed { w, h, s }
    }

    /// The sum over the `(2 rho + 1)^2` square around `(x, y)`, clipped to the plane.
    fn square(&self, x: usize, y: usize, rho: usize) -> f64 {
        let w1 = self.w + 1;
        let (x0, x1) = (x.saturating_sub(rho), (x + rho + 1).min(self.w));
        let (y0, y1) = (y.saturating_sub(rho), (y + rho + 1).min(self.h));
        let p = &self.s;
        p[y1 * w1 + x1] - p[y0 * w1 + x1] - p[y1 * w1 + x0] + p[y0 * w1 + x0]
    }
}

/// Per pixel, `|sum v |v|| / sum |v|^2` over the pixels of `inside` in the `(2 rho + 1)^2` square
/// around it, `v` the across-vectors of [`crate::oriented::Responses`], times the cosine between
/// the pixel's own vector and that sum (1 where the square holds none).
fn coherence(v: &[(i32, i32)], inside: &[u8], w: usize, h: usize, rho: usize) -> Vec<f32> {
    // Each vector counts with its own length as weight, so that a strong hair is not outvoted by
    // the weaker texture around it.
    let weighted = |i: usize, k: usize| -> f64 {
        if inside[i] == 0 {
            return 0.0;
        }
        let (a, b) = (v[i].0 as f64 / 1024.0, v[i].1 as f64 / 1024.0);
        let m = (a * a + b * b).sqrt();
        [a * m, b * m, m * m][k]
    };
    let (ix, iy, im) = (
        Summed::new(w, h, |i| weighted(i, 0)),
        Summed::new(w, h, |i| weighted(i, 1)),
        Summed::new(w, h, |i| weighted(i, 2)),
    );
    let mut out = vec![1f32; w * h];
    out.par_chunks_mut(w).enumerate().for_each(|(y, row)| {
        for (x, o) in row.iter_mut().enumerate() {
            let m = im.square(x, y, rho);
            let (sx, sy) = (ix.square(x, y, rho), iy.square(x, y, rho));
            let sn = (sx * sx + sy * sy).sqrt();
            if m > 0.0 && sn > 0.0 {
                // Times the cosine between the pixel's own vector and the sum: texture beside a
                // hair is not coherent through the hair's vote.
                let (a, b) = (v[y * w + x].0 as f64, v[y * w + x].1 as f64);
                let own = (a * a + b * b).sqrt();
                let cos = if own > 0.0 { ((a * sx + b * sy) / (own * sn)).max(0.0) } else { 0.0 };
                *o = (sn / m * cos) as f32;
            }
        }
    });
    out
}

/// Per pixel, the share of the lesion's pixels (`lesion` >= 128) in the `(2 rho + 1)^2` square
/// around it that are in `inside` (0 where the square holds none of the lesion).
fn lesion_density(inside: &[u8], lesion: &[u8], w: usize, h: usize, rho: usize) -> Vec<f32> {
    let il = Summed::new(w, h, |i| f64::from(u8::from(lesion[i] >= 128)));
    let ic = Summed::new(w, h, |i| f64::from(u8::from(lesion[i] >= 128 && inside[i] != 0)));
    let mut out = vec![0f32; w * h];
    out.par_chunks_mut(w).enumerate().for_each(|(y, row)| {
        for (x, o) in row.iter_mut().enumerate() {
            let n = il.square(x, y, rho);
            if n > 0.0 {
                *o = ic.square(x, y, rho) as f32 / n as f32;
            }
        }
    });
    out
}

/// Bilinear sample of a working plane at full-size pixel `(x, y)` with factor `f`.
fn bilinear(p: &[u8], w: usize, h: usize, f: usize, x: usize, y: usize) -> f32 {
    let fx = ((x as f32 + 0.5) / f as f32 - 0.5).clamp(0.0, (w - 1) as f32);
    let fy = ((y as f32 + 0.5) / f as f32 - 0.5).clamp(0.0, (h - 1) as f32);
    let (x0, y0) = (fx as usize, fy as usize);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (ax, ay) = (fx - x0 as f32, fy - y0 as f32);
    let v = |xx: usize, yy: usize| p[yy * w + xx] as f32;
    (v(x0, y0) * (1.0 - ax) + v(x1, y0) * ax) * (1.0 - ay) + (v(x0, y1) * (1.0 - ax) + v(x1, y1) * ax) * ay
}

/// The full-size mask from a working detection (see [`hair_mask`]). At working size (`f` 1) the
/// detection's pixels are kept as they are, and only the ring around them is tested: the rim of
/// a hair, partly covered, scores below the hair and may have been dropped by the relative test.
fn refine(det: &Detection, l: &[u8], rgb: Option<&[u8]>, w: usize, h: usize, f: usize, cfg: &HairConfig) -> Vec<u8> {
    let (ww, wh) = (det.w, det.h);
    let grown = dilate_disc(&det.mask, ww, wh, 1.5);
    let light = dilate_disc(&det.light, ww, wh, 1.5);
    let t_dark = cfg.threshold.min(cfg.lesion_threshold) * 2.55 * 0.5;
    let t_light = cfg.light_threshold * 2.55 * 0.5;
    let (t_ring, t_ring_lesion) = (cfg.threshold * 2.55 * 0.5, cfg.lesion_threshold * 2.55 * 0.5);
    let share = cfg.edge_share;
    let mut out = vec![0u8; w * h];
    out.par_chunks_mut(w).enumerate().for_each(|(y, row)| {
        for (x, o) in row.iter_mut().enumerate() {
            let k = (y / f) * ww + x / f;
            if grown[k] == 0 {
                continue;
            }
            let i = y * w + x;
            let keep = if f == 1 && det.mask[k] != 0 {
                true
            } else if light[k] != 0 {
                l[i] as f32 - bilinear(&det.opening, ww, wh, f, x, y) >= t_light
            } else {
                // The ring is held to the threshold of where it lies (the lesion's is higher).
                let t = if det.mask[k] != 0 {
                    t_dark
                } else if det.lesion.get(k).is_some_and(|&v| v >= 128) {
                    t_ring_lesion.max(share * det.peak[k] as f32)
                } else {
                    t_ring.max(share * det.peak[k] as f32)
                };
                bilinear(&det.closing, ww, wh, f, x, y) - det.dark_value(k, l, rgb, i) >= t
            };
            if keep {
                *o = 255;
            }
        }
    });
    out
}

/// The detector before issue 18 (kept so that the real-image benchmark can compare with it): the
/// occlusion mask of hairs, rulers and ink marks (0/255) at full size, from the black-hat in four
/// line orientations.
///
/// With `lesion` (non-zero inside, same size as `img`), the lesion's dark texture is kept out
/// of the mask; only thin elongated structures that cross the lesion border are kept inside it.
/// Errors for an image smaller than [`MIN_SIDE`], a lesion mask of another size, or an invalid
/// config. An image with no dark thin structure (all black, say) gives an empty mask.
pub fn legacy_hair_mask(img: &RgbImage, lesion: Option<&GrayImage>, cfg: &HairConfig) -> Result<GrayImage> {
    check_inputs(img, lesion, cfg)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let s = cfg.scale(img.width(), img.height());
    // One pass over the pixels gives the luminance and the ink candidates.
    let (raw, ink) = if cfg.ink {
        let (l, ink, found) = crate::color::luminance_u8_and_flags(img, ink_test(img, cfg));
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
fn run_through(inside: &[u8], w: usize, h: usize, x: usize, y: usize, dir: (f32, f32), cap: usize) -> usize {
    run_where(w, h, x, y, dir, cap, |i| inside[i] != 0)
}

/// As [`run_through`], over the pixels `i` (row-major in a `w` x `h` plane) where `inside(i)`.
fn run_where(
    w: usize,
    h: usize,
    x: usize,
    y: usize,
    (cx, cy): (f32, f32),
    cap: usize,
    inside: impl Fn(usize) -> bool,
) -> usize {
    let at = |k: f32| -> bool {
        let (xi, yi) = ((x as f32 + cx * k).round() as i32, (y as f32 + cy * k).round() as i32);
        xi >= 0 && yi >= 0 && (xi as usize) < w && (yi as usize) < h && inside(yi as usize * w + xi as usize)
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

/// Per pixel, bit `d` set when a candidate of `weak` in the 3 x 3 square around it runs along
/// orientation `d` of [`orientations`] (within one step of 11.25°), its line direction taken as
/// perpendicular to its across-vector in `v`.
fn direction_bits(weak: &[u8], v: &[(i32, i32)], w: usize, h: usize) -> Vec<u16> {
    let step = std::f32::consts::PI / 16.0;
    let own: Vec<u16> = (0..w * h)
        .map(|i| {
            let (a, b) = v[i];
            if weak[i] == 0 || (a == 0 && b == 0) {
                return 0;
            }
            let phi = (b as f32).atan2(a as f32) / 2.0 + std::f32::consts::FRAC_PI_2;
            let bin = ((phi / step).round() as i32).rem_euclid(16) as u32;
            let rot = |k: i32| 1u16 << ((bin as i32 + k).rem_euclid(16));
            rot(-1) | rot(0) | rot(1)
        })
        .collect();
    let mut out = vec![0u16; w * h];
    out.par_chunks_mut(w).enumerate().for_each(|(y, row)| {
        for (x, o) in row.iter_mut().enumerate() {
            for yy in y.saturating_sub(1)..(y + 2).min(h) {
                for xx in x.saturating_sub(1)..(x + 2).min(w) {
                    *o |= own[yy * w + xx];
                }
            }
        }
    });
    out
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
        // The lesion's dots are not hair even without the lesion mask; the detector before
        // issue 18 called them hair there.
        let m0 = hair_mask(&img, None, &cfg).unwrap();
        assert!(crate::eval::lesion_leak(&m0, &lesion, &hair).unwrap() < 0.02);
        let old = legacy_hair_mask(&img, None, &cfg).unwrap();
        assert!(crate::eval::lesion_leak(&old, &lesion, &hair).unwrap() > 0.02);
        // `cfg.detector` picks the detector `hair_mask` runs.
        let legacy = HairConfig { detector: HairDetector::Legacy, ..cfg.clone() };
        assert_eq!(hair_mask(&img, None, &legacy).unwrap(), old);
        assert_eq!(hair_mask(&img, None, &cfg).unwrap(), m0);
    }

    /// The share of the hair pixels inside the lesion that `m` marks.
    fn recall_on_lesion(m: &GrayImage, lesion: &GrayImage, hair: &GrayImage) -> f64 {
        crate::eval::lesion_recall(m, lesion, hair).unwrap()
    }

    /// A hair that is plain on the skin and faint on the lesion (between the lesion threshold and
    /// `lesion_hysteresis` of it), over a lesion dotted at the same faint contrast: the faint
    /// stretch grows from the plain one, the dots stay out.
    #[test]
    fn a_hair_faint_on_the_lesion_is_followed_across_it() {
        let mut rng = derm_core::Rng::new(11);
        let inside = |x: u32, y: u32| (x as i32 - 100).pow(2) + (y as i32 - 100).pow(2) < 70 * 70;
        let mut img = RgbImage::from_fn(200, 200, |x, y| {
            let g = (if inside(x, y) { 120.0 } else { 200.0 }) + rng.normal() * 1.5;
            image::Rgb([g as u8; 3])
        });
        let lesion = GrayImage::from_fn(200, 200, |x, y| image::Luma([if inside(x, y) { 255 } else { 0 }]));
        let faint = 103u8;
        // Dots of the hair's colour on the lesion, 3 x 3, away from the hair's line.
        for _ in 0..60 {
            let (cx, cy) = (45 + rng.below(110) as u32, 45 + rng.below(110) as u32);
            let y_line = 40 + (cx * 3) / 5;
            if !inside(cx, cy) || (cy as i32 - y_line as i32).abs() < 10 {
                continue;
            }
            for (x, y) in (cx - 1..=cx + 1).flat_map(|x| (cy - 1..=cy + 1).map(move |y| (x, y))) {
                img.put_pixel(x, y, image::Rgb([faint; 3]));
            }
        }
        let mut hair = GrayImage::new(200, 200);
        for x in 10..190u32 {
            let y = 40 + (x * 3) / 5;
            for yy in y..y + 3 {
                let g = if inside(x, yy) { faint } else { 90 };
                img.put_pixel(x, yy, image::Rgb([g; 3]));
                hair.put_pixel(x, yy, image::Luma([255]));
            }
        }
        let on_lesion = |lesion_hysteresis: f32| {
            let cfg = HairConfig { lesion_hysteresis, ..HairConfig::default() };
            let m = hair_mask(&img, Some(&lesion), &cfg).unwrap();
            (recall_on_lesion(&m, &lesion, &hair), crate::eval::lesion_leak(&m, &lesion, &hair).unwrap())
        };
        let (followed, leak) = on_lesion(HairConfig::default().lesion_hysteresis);
        let (alone, _) = on_lesion(1.0);
        assert!(followed > 0.9, "recall on the lesion with hysteresis {followed}");
        assert!(leak < 0.01, "dots marked: {leak}");
        assert!(alone < 0.5, "recall on the lesion without hysteresis {alone}");
    }

    /// A dark hair across a lesion with a strip of the lesion's mottled texture along one side of
    /// it (above the lesion threshold): together they are long and narrow and pass the shape
    /// test, but the strip scores well under the hair beside it and is dropped by the relative
    /// test.
    #[test]
    fn texture_along_a_hair_does_not_ride_into_it() {
        let mut rng = derm_core::Rng::new(3);
        let inside = |x: u32, y: u32| (x as i32 - 100).pow(2) + (y as i32 - 100).pow(2) < 70 * 70;
        let mut img = RgbImage::from_fn(200, 200, |x, y| {
            let g = (if inside(x, y) { 120.0 } else { 200.0 }) + rng.normal() * 1.5;
            image::Rgb([g as u8; 3])
        });
        let lesion = GrayImage::from_fn(200, 200, |x, y| image::Luma([if inside(x, y) { 255 } else { 0 }]));
        // A gently curved hair (a straight one this long is a ruler's edge).
        let y_hair = |x: u32| 30 + (x * 3) / 5 + (x as i32 - 100).pow(2) as u32 / 500;
        // The strip: 3 px of mottled texture about 22 darker than the lesion, right below the
        // hair, over the lesion.
        let mut strip = GrayImage::new(200, 200);
        for x in 10..190u32 {
            let y0 = y_hair(x) + 2;
            for y in y0..y0 + 3 {
                if inside(x, y) {
                    img.put_pixel(x, y, image::Rgb([(98.0 + rng.normal() * 3.0) as u8; 3]));
                    strip.put_pixel(x, y, image::Luma([255]));
                }
            }
        }
        let mut hair = GrayImage::new(200, 200);
        for x in 10..190u32 {
            let y = y_hair(x);
            for yy in y..y + 2 {
                img.put_pixel(x, yy, image::Rgb([40; 3]));
                hair.put_pixel(x, yy, image::Luma([255]));
                strip.put_pixel(x, yy, image::Luma([0]));
            }
        }
        let run = |relative_share: f32| {
            // Rulers off: a band this long and straight is also a ruler candidate (their own test).
            let cfg = HairConfig { relative_share, rulers: false, ..HairConfig::default() };
            let m = hair_mask(&img, Some(&lesion), &cfg).unwrap();
            let on_strip = strip.pixels().filter(|v| v.0[0] != 0).count() as f64;
            let marked = m.pixels().zip(strip.pixels()).filter(|(p, t)| p.0[0] != 0 && t.0[0] != 0).count() as f64;
            (recall_on_lesion(&m, &lesion, &hair), marked / on_strip)
        };
        let (recall, strip_marked) = run(HairConfig::default().relative_share);
        let (recall_off, strip_marked_off) = run(0.0);
        // Measured: recall 1 both ways; strip marked 0.22 (the row next to the hair, kept as its
        // rim), without the test 0.99.
        assert!(recall > 0.95 && recall_off > 0.95, "hair recall on the lesion {recall}, {recall_off}");
        assert!(strip_marked < 0.35, "strip marked {strip_marked}");
        assert!(strip_marked_off > 0.8, "strip marked without the relative test {strip_marked_off}");
    }

    /// A brown lesion of `colour` (a disc of radius 70 in a 200 px image) on skin, with noise.
    fn brown_lesion(colour: [f32; 3]) -> (RgbImage, GrayImage) {
        let mut rng = derm_core::Rng::new(5);
        let inside = |x: u32, y: u32| (x as i32 - 100).pow(2) + (y as i32 - 100).pow(2) < 70 * 70;
        let img = RgbImage::from_fn(200, 200, |x, y| {
            let n = (rng.normal() * 3.0) as f32;
            let c = if inside(x, y) { colour } else { [215.0, 170.0, 150.0] };
            image::Rgb([(c[0] + n) as u8, (c[1] + n) as u8, (c[2] + n) as u8])
        });
        let lesion = GrayImage::from_fn(200, 200, |x, y| image::Luma([if inside(x, y) { 255 } else { 0 }]));
        (img, lesion)
    }

    /// Recall on the lesion and lesion leak of `cfg`'s mask against the drawn `hair`.
    fn recall_and_leak(img: &RgbImage, lesion: &GrayImage, hair: &GrayImage, cfg: &HairConfig) -> (f64, f64) {
        let m = hair_mask(img, Some(lesion), cfg).unwrap();
        (recall_on_lesion(&m, lesion, hair), crate::eval::lesion_leak(&m, lesion, hair).unwrap())
    }

    /// A faint grey hair over a brown lesion (half covering its pixels), neither darker in the
    /// value plane than the lesion threshold nor lighter than the light threshold: only its lack
    /// of colour gives it away (the chroma plane).
    #[test]
    fn grey_hair_as_light_as_the_lesion_is_found_in_the_chroma_plane() {
        let (mut img, lesion) = brown_lesion([150.0, 100.0, 80.0]);
        let mut hair = GrayImage::new(200, 200);
        // Half the pixel's colour, as a hair narrower than the pixels leaves it (greys 120-140
        // were checked; 100 is dark enough in the value plane).
        let grey = 130u8;
        for x in 10..190u32 {
            let y = 40 + (x * 3) / 5 + (x as i32 - 100).pow(2) as u32 / 500;
            for yy in y..y + 3 {
                let p = img.get_pixel(x, yy).0;
                let mix = |c: u8| ((c as f32 + grey as f32) / 2.0) as u8;
                img.put_pixel(x, yy, image::Rgb([mix(p[0]), mix(p[1]), mix(p[2])]));
                hair.put_pixel(x, yy, image::Luma([255]));
            }
        }
        let found = |chroma_plane: bool| {
            recall_and_leak(&img, &lesion, &hair, &HairConfig { chroma_plane, ..HairConfig::default() })
        };
        let (with, leak) = found(true);
        let (without, _) = found(false);
        assert!(with > 0.9, "recall on the lesion with the chroma plane {with}");
        assert!(leak < 0.01, "leak {leak}");
        assert!(without < 0.5, "recall on the lesion without it {without}");
    }

    /// A grey hair over a brown lesion, of about the lesion's luminance: plain in the red
    /// channel (the value plane), faint in the luminance.
    #[test]
    fn grey_hair_on_a_brown_lesion_is_found_in_the_value_plane() {
        let (mut img, lesion) = brown_lesion([165.0, 100.0, 75.0]);
        let mut hair = GrayImage::new(200, 200);
        for x in 10..190u32 {
            let y = 40 + (x * 3) / 5;
            for yy in y..y + 3 {
                img.put_pixel(x, yy, image::Rgb([105, 100, 98]));
                hair.put_pixel(x, yy, image::Luma([255]));
            }
        }
        let found = |value_plane: bool| {
            // The chroma plane finds this hair too; this test is about the value plane.
            recall_and_leak(
                &img,
                &lesion,
                &hair,
                &HairConfig { value_plane, chroma_plane: false, ..HairConfig::default() },
            )
        };
        let (with, leak) = found(true);
        let (without, _) = found(false);
        assert!(with > 0.9, "recall on the lesion with the value plane {with}");
        assert!(leak < 0.01, "leak {leak}");
        assert!(without < 0.5, "recall on the lesion with the luminance alone {without}");
    }

    /// A violet pen stroke is ink; a violet lesion of the same colour is not.
    /// A pigment network (short dark segments meeting at junctions, dense over the lesion) is
    /// not hair, and hairs drawn over it are found there without the network beside them.
    #[test]
    fn pigment_network_is_left_out_and_hairs_over_it_are_found() {
        let cfg = HairConfig::default();
        let (img, lesion) = crate::paint::network_lesion(160, 7);
        let none = GrayImage::new(160, 160);
        let m = hair_mask(&img, Some(&lesion), &cfg).unwrap();
        let leak = crate::eval::lesion_leak(&m, &lesion, &none).unwrap();
        assert!(leak < 0.01, "network marked: {leak}");
        // Without the mesh test a third of it is.
        let off = HairConfig { mesh_coherence: 0.0, ..cfg.clone() };
        let m = hair_mask(&img, Some(&lesion), &off).unwrap();
        let leak = crate::eval::lesion_leak(&m, &lesion, &none).unwrap();
        assert!(leak > 0.2, "network marked without the mesh test: {leak}");

        let (mut img, lesion) = crate::paint::network_lesion(256, 3);
        let hair = crate::paint::three_hairs(&mut img);
        let m = hair_mask(&img, Some(&lesion), &cfg).unwrap();
        let s = crate::eval::pixel_scores(&m, &hair).unwrap();
        let on_lesion = recall_on_lesion(&m, &lesion, &hair);
        let leak = crate::eval::lesion_leak(&m, &lesion, &hair).unwrap();
        assert!(s.recall > 0.9 && on_lesion > 0.9, "{s:?}, on the lesion {on_lesion}");
        assert!(s.precision > 0.6 && leak < 0.03, "{s:?}, network beside the hairs {leak}");
    }

    /// Air bubbles on textured skin with hairs and a lesion are found by the bubble test, which
    /// the hair tests alone mostly miss; without bubbles, and on a pigment network, it adds
    /// nothing.
    #[test]
    fn air_bubbles_are_found_and_a_network_is_not_a_bubble() {
        let (scene, lesion) = crate::eval::large_benchmark_scene(320, 256, None);
        let bubbly = crate::paint::paint_bubbles(&scene, 4, 5);
        let cfg = HairConfig::default();
        let off = HairConfig { bubbles: false, ..cfg.clone() };
        let rims = |c: &HairConfig| {
            let m = hair_mask(&bubbly.image, Some(&lesion), c).unwrap();
            crate::eval::pixel_scores(&m, &bubbly.hair).unwrap().recall
        };
        let (with, without) = (rims(&cfg), rims(&off));
        assert!(with > 0.9 && with > without + 0.1, "recall {with} with the bubble test, {without} without");
        assert_eq!(hair_mask(&scene, Some(&lesion), &cfg).unwrap(), hair_mask(&scene, Some(&lesion), &off).unwrap());
        let (net, net_lesion) = crate::paint::network_lesion(256, 5);
        assert_eq!(
            hair_mask(&net, Some(&net_lesion), &cfg).unwrap(),
            hair_mask(&net, Some(&net_lesion), &off).unwrap()
        );
    }

    #[test]
    fn ink_is_a_stroke_not_a_violet_lesion() {
        let violet = image::Rgb([120u8, 70, 150]);
        let mut img = RgbImage::from_fn(256, 256, |x, y| {
            if (x as i32 - 150).pow(2) + (y as i32 - 150).pow(2) < 60 * 60 {
                violet
            } else {
                image::Rgb([215, 170, 150])
            }
        });
        for x in 20..120u32 {
            for y in 20..25u32 {
                img.put_pixel(x, y + x / 8, violet);
            }
        }
        let ink = ink_mask(&img, &HairConfig::default());
        let at = |x: usize, y: usize| ink[y * 256 + x] != 0;
        assert!(at(60, 22 + 60 / 8), "the stroke is ink");
        assert!(!at(150, 150), "the violet lesion is not ink");
        let wide = HairConfig { ink_max_width: 1000.0, ..HairConfig::default() };
        assert!(ink_mask(&img, &wide)[150 * 256 + 150] != 0, "without the width rule it was");
    }

    /// The ink test reads colours corrected for the light: a red-purple marker stroke on pink
    /// skin is ink (the raw test missed it: blue under red), a bluish light over skin and a
    /// lesion is not; and an ink piece lying mostly on the lesion is left to the lesion.
    #[test]
    fn ink_under_coloured_light_and_off_the_lesion() {
        let stroke = |skin: image::Rgb<u8>, ink: image::Rgb<u8>| {
            let mut img = RgbImage::from_pixel(256, 256, skin);
            for x in 40..200u32 {
                for y in 100..104u32 {
                    img.put_pixel(x, y + x / 10, ink);
                }
            }
            img
        };
        let magenta = stroke(image::Rgb([150, 118, 109]), image::Rgb([85, 34, 63]));
        let cfg = HairConfig::default();
        assert!(ink_mask(&magenta, &cfg)[(102 + 10) * 256 + 100] != 0, "a red-purple stroke is ink");
        let raw = HairConfig { ink_constancy: false, ..cfg.clone() };
        assert!(ink_mask(&magenta, &raw).iter().all(|&v| v == 0), "the raw colour test missed it");
        // Bluish light: skin (190, 185, 225), a lesion's stroke-shaped shadow (150, 120, 170).
        let cast = stroke(image::Rgb([190, 185, 225]), image::Rgb([150, 120, 170]));
        assert!(ink_mask(&cast, &cfg).iter().all(|&v| v == 0), "a bluish cast is not ink");
        assert!(ink_mask(&cast, &raw).iter().any(|&v| v != 0), "the raw colour test called it ink");
        // The same magenta stroke inside a lesion mask is left out of the occlusion mask.
        let lesion = GrayImage::from_fn(256, 256, |x, y| {
            image::Luma([if (30..210).contains(&x) && (80..140).contains(&y) { 255 } else { 0 }])
        });
        let mut ink = ink_mask(&magenta, &cfg);
        off_the_lesion(&mut ink, lesion.as_raw(), 256, 256);
        assert!(ink.iter().all(|&v| v == 0));
    }

    #[test]
    fn grey_and_light_hairs_are_found() {
        let cfg = HairConfig::default();
        let mut rng = derm_core::Rng::new(11);
        let mut img = RgbImage::from_fn(200, 200, |_, _| {
            let n = (rng.normal() * 3.0) as f32;
            image::Rgb([(205.0 + n) as u8, (160.0 + n) as u8, (140.0 + n) as u8])
        });
        let mut grey = GrayImage::new(200, 200);
        let mut light = GrayImage::new(200, 200);
        for x in 0..200u32 {
            let y = 60 + x / 4;
            for yy in y..y + 2 {
                img.put_pixel(x, yy, image::Rgb([120, 112, 108]));
                grey.put_pixel(x, yy, image::Luma([255]));
            }
            let y = 160 - x / 3;
            for yy in y..y + 2 {
                img.put_pixel(x, yy, image::Rgb([238, 232, 228]));
                light.put_pixel(x, yy, image::Luma([255]));
            }
        }
        let m = hair_mask(&img, None, &cfg).unwrap();
        for (what, t) in [("grey", &grey), ("light", &light)] {
            let s = crate::eval::pixel_scores(&m, t).unwrap();
            assert!(s.recall > 0.85, "{what}: {s:?}");
        }
        let both =
            GrayImage::from_fn(200, 200, |x, y| image::Luma([grey.get_pixel(x, y).0[0] | light.get_pixel(x, y).0[0]]));
        assert!(crate::eval::pixel_scores(&m, &both).unwrap().precision > 0.8);
        let no_light = HairConfig { light: false, ..cfg };
        let m = hair_mask(&img, None, &no_light).unwrap();
        assert!(crate::eval::pixel_scores(&m, &light).unwrap().recall < 0.1);
    }

    /// The narrow wedge of skin where two dark hairs cross at a small angle is lighter than the
    /// hairs on both sides of it: it must not be taken for a light hair.
    #[test]
    fn skin_between_crossing_dark_hairs_is_not_a_light_hair() {
        let mut rng = derm_core::Rng::new(4);
        let mut img = RgbImage::from_fn(256, 256, |_, _| {
            let n = (rng.normal() * 2.0) as f32;
            image::Rgb([(215.0 + n) as u8, (172.0 + n) as u8, (158.0 + n) as u8])
        });
        let mut near = GrayImage::new(256, 256);
        let mut hair = GrayImage::new(256, 256);
        let (a, width) = (18f32.to_radians(), 5.0f32);
        for y in 0..256u32 {
            for x in 0..256u32 {
                let (dx, dy) = (x as f32 + 0.5 - 128.0, y as f32 + 0.5 - 128.0);
                // Distance to the horizontal hair and to the one at angle `a`, both 200 px long.
                let along = |c: f32, s: f32| (dx * c + dy * s).abs() <= 100.0;
                let d = [(1.0f32, 0.0f32), (a.cos(), a.sin())]
                    .iter()
                    .filter(|&&(c, s)| along(c, s))
                    .map(|&(c, s)| (dy * c - dx * s).abs())
                    .fold(f32::MAX, f32::min);
                let cover = (width / 2.0 + 0.5 - d).clamp(0.0, 1.0);
                let p = img.get_pixel_mut(x, y);
                for v in &mut p.0 {
                    *v = (*v as f32 * (1.0 - cover) + 40.0 * cover) as u8;
                }
                if d <= width / 2.0 {
                    hair.put_pixel(x, y, image::Luma([255]));
                }
                if d <= width / 2.0 + 2.0 {
                    near.put_pixel(x, y, image::Luma([255]));
                }
            }
        }
        let m = hair_mask(&img, None, &HairConfig::default()).unwrap();
        let away = m.pixels().zip(near.pixels()).filter(|(p, n)| p.0[0] != 0 && n.0[0] == 0).count();
        assert!(away <= 10, "{away} skin pixels between the hairs marked");
        assert!(crate::eval::pixel_scores(&m, &hair).unwrap().recall > 0.9);
    }

    #[test]
    fn mask_has_the_input_size_for_odd_sizes() {
        let cfg = HairConfig::default();
        // 1100 x 1031 runs detection at half size (factor 2); the others at full size.
        for (w, h) in [(257u32, 131u32), (131, 257), (1100, 1031)] {
            let mut img = RgbImage::from_pixel(w, h, image::Rgb([210, 165, 145]));
            let mut hair = GrayImage::new(w, h);
            let wd = (2.0 * w.min(h) as f32 / 256.0).max(1.0);
            for x in 0..w {
                let y = (h as f32 * 0.3 + x as f32 * 0.2) as u32;
                for yy in y..(y + wd.round() as u32).min(h) {
                    img.put_pixel(x, yy, image::Rgb([40, 32, 28]));
                    hair.put_pixel(x, yy, image::Luma([255]));
                }
            }
            let m = hair_mask(&img, None, &cfg).unwrap();
            assert_eq!(m.dimensions(), (w, h));
            let s = crate::eval::pixel_scores(&m, &hair).unwrap();
            assert!(s.recall > 0.9 && s.precision > 0.8, "{w}x{h}: {s:?}");
        }
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
