//! Rulers: long straight dark lines with regularly spaced tick marks beside them.
//!
//! The thin dark structures of the black-hat mask vote in a Hough transform (1° steps), on a copy
//! of the mask reduced to a short side of about `size_ref` so the cost does not grow with the
//! image. For the strongest line, the longest run of mask pixels along it must reach
//! `ruler_min_length`; then the mask is read in a band beside the line, and the ticks must make
//! that profile periodic (normalised autocorrelation of at least [`MIN_PERIODICITY`] at some lag
//! between 3 px and an eighth of the run, so at least eight ticks), and the run must cover at
//! least half of the line's chord through the image (a ruler crosses the image). A straight hair has a long run but no periodic
//! profile, so it is left to the hair mask. Up to [`MAX_RULERS`] rulers are found; each adds its
//! line across the whole image, the mask pixels of its ticks, and, when the tick side is clearly
//! paler (smallest channel) up to a sharp edge parallel to the line (a translucent ruler body),
//! that band.

use derm_core::Result;
use image::{GrayImage, RgbImage};

use crate::config::HairConfig;
use crate::mask::raw_parts;

/// How periodic the tick profile must be (autocorrelation at the best lag).
pub const MIN_PERIODICITY: f32 = 0.5;
/// The most rulers looked for in one image.
pub const MAX_RULERS: usize = 2;
const ANGLES: usize = 180;

/// The ruler pixels of `img` (0/255), empty when there is none.
pub fn detect_ruler(img: &RgbImage, cfg: &HairConfig) -> Result<GrayImage> {
    crate::mask::check_inputs(img, None, cfg)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (_, raw) = raw_parts(img, cfg);
    let m = ruler_mask(&raw, img, w, h, cfg);
    GrayImage::from_raw(w as u32, h as u32, m).ok_or_else(|| derm_core::Error::invalid("ruler mask buffer size"))
}

/// A ruler: the line `x cos a + y sin a = rho`, with its ticks on the side `side` (±1 along the
/// normal `(cos a, sin a)`) reaching `tick` px, and, when found, a pale band `(side, extent)`.
/// It is seen from `t0` to `t1` along the line (`t = -x sin a + y cos a`).
#[derive(Debug, Clone, Copy)]
struct Ruler {
    cos: f32,
    sin: f32,
    rho: f32,
    t0: f32,
    t1: f32,
    side: f32,
    tick: f32,
    band: Option<(f32, f32)>,
}

/// Ruler pixels among the non-zero pixels of the thin-dark-structure mask `raw`, plus the pale
/// band of the ruler when `img` shows one.
pub(crate) fn ruler_mask(raw: &[u8], img: &RgbImage, w: usize, h: usize, cfg: &HairConfig) -> Vec<u8> {
    let f = ((w.min(h) as f32 / cfg.size_ref.max(1) as f32).floor() as usize).max(1);
    let (pw, ph) = (w.div_ceil(f), h.div_ceil(f));
    let mut pooled = vec![0u8; pw * ph];
    for y in 0..h {
        for x in 0..w {
            if raw[y * w + x] != 0 {
                pooled[(y / f) * pw + x / f] = 255;
            }
        }
    }
    // Only long pieces can hold a ruler line; the rest (hair bits, texture) do not vote.
    let s = cfg.scale(w as u32, h as u32) / f as f32; // sizes at pooled resolution
    let min_len = cfg.ruler_min_length * s;
    for c in crate::morph::components(&pooled, pw, ph, true) {
        let [x0, y0, x1, y1] = c.bbox;
        let ext = ((x1 - x0) as f32).hypot((y1 - y0) as f32);
        if ext < 0.5 * min_len {
            for p in c.pixels(pw) {
                pooled[p] = 0;
            }
        }
    }
    let mut out = vec![0u8; w * h];
    let mut work = pooled.clone();
    let sf = cfg.scale(w as u32, h as u32);
    // Paleness (the smallest channel): a translucent white ruler body raises it over skin,
    // lesion and the black corners alike, even where it hardly changes the luminance.
    let mut pale: Vec<u8> = Vec::new();
    for _ in 0..MAX_RULERS {
        let Some(r) = strongest_ruler(&work, pw, ph, min_len, s) else {
            break;
        };
        // Remove it from the pooled mask before looking for another.
        paint(&mut work, &pooled, pw, ph, &r, 0, 1.0);
        let (ff, half) = (f as f32, (f as f32 - 1.0) / 2.0);
        let mut full = Ruler {
            rho: r.rho * ff + half * (r.cos + r.sin),
            t0: r.t0 * ff + half * (r.cos - r.sin),
            t1: (r.t1 + 1.0) * ff + half * (r.cos - r.sin),
            tick: r.tick * ff,
            ..r
        };
        if pale.is_empty() {
            pale = img.as_raw().chunks_exact(3).map(|p| p[0].min(p[1]).min(p[2])).collect();
        }
        full.band = find_band(&pale, raw, w, h, &full, sf);
        tracing::debug!(
            rho = full.rho,
            angle = full.sin.atan2(full.cos).to_degrees(),
            band = ?full.band,
            "ruler found"
        );
        paint(&mut out, raw, w, h, &full, 255, sf);
    }
    out
}

/// Upper quartile of `lum` over the pixels at signed offset `o` (px, along the normal) from the ruler
/// line, ignoring dark-structure pixels; NaN where too few are in the image.
fn offset_profile(
    lum: &[u8],
    raw: &[u8],
    w: usize,
    h: usize,
    r: &Ruler,
    offsets: impl Iterator<Item = f32>,
) -> Vec<f32> {
    let tmax = ((w * w + h * h) as f32).sqrt();
    let mut vals = Vec::new();
    offsets
        .map(|o| {
            vals.clear();
            let mut t = -tmax;
            while t <= tmax {
                let x = r.rho * r.cos - t * r.sin + o * r.cos;
                let y = r.rho * r.sin + t * r.cos + o * r.sin;
                let (xi, yi) = (x.round() as isize, y.round() as isize);
                if xi >= 0 && yi >= 0 && (xi as usize) < w && (yi as usize) < h {
                    let i = yi as usize * w + xi as usize;
                    if raw[i] == 0 {
                        vals.push(lum[i]);
                    }
                }
                t += 2.0;
            }
            if vals.len() < 8 {
                return f32::NAN;
            }
            // The upper quartile: robust to the dark corners of the field of view, which cover
            // parts of the line.
            vals.sort_unstable();
            vals[vals.len() * 3 / 4] as f32
        })
        .collect()
}

/// Median over the ruler line of the drop of `pale` from offset `o - 1` to `o + 2` (px, along
/// the normal), ignoring dark-structure pixels: large where an edge runs parallel to the line
/// there (the far edge of a ruler body), small for edges that cross the line at an angle (the
/// lesion, the round field of view). NaN where too few samples are in the image.
fn edge_profile(
    pale: &[u8],
    raw: &[u8],
    w: usize,
    h: usize,
    r: &Ruler,
    offsets: impl Iterator<Item = f32>,
) -> Vec<f32> {
    let tmax = ((w * w + h * h) as f32).sqrt();
    let at = |t: f32, o: f32| -> Option<f32> {
        let x = r.rho * r.cos - t * r.sin + o * r.cos;
        let y = r.rho * r.sin + t * r.cos + o * r.sin;
        let (xi, yi) = (x.round() as isize, y.round() as isize);
        if xi >= 0 && yi >= 0 && (xi as usize) < w && (yi as usize) < h {
            let i = yi as usize * w + xi as usize;
            (raw[i] == 0).then_some(pale[i] as f32)
        } else {
            None
        }
    };
    let mut vals = Vec::new();
    offsets
        .map(|o| {
            vals.clear();
            let sgn = o.signum();
            let mut t = -tmax;
            while t <= tmax {
                if let (Some(a), Some(b)) = (at(t, o - sgn), at(t, o + 2.0 * sgn)) {
                    vals.push(a - b);
                }
                t += 2.0;
            }
            if vals.len() < 8 {
                return f32::NAN;
            }
            vals.sort_unstable_by(f32::total_cmp);
            vals[vals.len() / 2]
        })
        .collect()
}

/// A pale (translucent) ruler body along the line: on one side, the image is clearly paler
/// than on the other, up to a sharp edge parallel to the line or the image border. Returns the
/// side (±1) and the extent (px).
fn find_band(pale: &[u8], raw: &[u8], w: usize, h: usize, r: &Ruler, s: f32) -> Option<(f32, f32)> {
    let n = w.min(h) as f32;
    let omax = (0.16 * n) as usize;
    let wide = ((0.04 * n) as usize).max(4);
    let lo = ((0.03 * n) as usize).max(4);
    let mean = |v: &[f32], a: usize, b: usize| -> f32 {
        let x: Vec<f32> = v[a.min(v.len())..b.min(v.len())].iter().copied().filter(|v| v.is_finite()).collect();
        if x.len() * 2 < b.saturating_sub(a).max(1) {
            f32::NAN
        } else {
            x.iter().sum::<f32>() / x.len() as f32
        }
    };
    let mut best: Option<(f32, f32, f32)> = None; // (score, side, extent)
    for side in [-1.0f32, 1.0] {
        let p = offset_profile(pale, raw, w, h, r, (0..=omax + wide + 6).map(|o| side * o as f32));
        let q = offset_profile(pale, raw, w, h, r, (0..=omax + wide + 6).map(|o| -side * o as f32));
        let edge = edge_profile(pale, raw, w, h, r, (lo..=omax).map(|o| side * o as f32));
        // The strongest parallel edge, or the image border when the profile runs out first.
        let mut end: Option<(usize, f32)> = None;
        for (k, &d) in edge.iter().enumerate() {
            let e = lo + k;
            if !p.get(e + 2).is_some_and(|v| v.is_finite()) {
                if end.is_none_or(|(_, s)| s < 12.0) {
                    end = Some((usize::MAX, 0.0));
                }
                break;
            }
            // A body's edge is sharp; the soft rim of the field of view falls on over many
            // pixels (the profile keeps dropping past it).
            let around = |j: Option<usize>| j.and_then(|j| edge.get(j)).copied().filter(|v| v.is_finite());
            let sharp = around(k.checked_sub(3)).is_none_or(|v| v < 0.35 * d)
                && around(Some(k + 3)).is_some_and(|v| v < 0.35 * d);
            if d.is_finite() && d >= 12.0 && sharp && end.is_none_or(|(_, s)| d > s) {
                end = Some((e, d));
            }
        }
        let Some((e, step)) = end else { continue };
        let border = e == usize::MAX;
        let e = if border { p.iter().rposition(|v| v.is_finite()).unwrap_or(0) } else { e };
        if e < 5 {
            continue;
        }
        let inside = mean(&p, 2, e - 1);
        let other = mean(&q, 3, 3 + wide);
        let contrast = inside - other;
        // A clear edge parallel to the line all along it is a ruler body by itself, even where
        // the body is hardly paler than pale skin beside the ruler.
        let enough = if !border && step >= 24.0 { f32::NEG_INFINITY } else { 10.0 };
        if !contrast.is_finite() || contrast < enough {
            continue;
        }
        let score = if border { contrast } else { contrast.max(0.0) + step };
        if best.is_none_or(|(c, _, _)| score > c) {
            best = Some((score, side, if border { n } else { e as f32 + 1.0 + s }));
        }
    }
    best.map(|(_, side, ext)| (side, ext))
}

/// Sets to `value` the pixels of the ruler: the line itself, the ticks, and the whole band when
/// there is one. A tick is the run of non-zero pixels of `src` that starts at the line and goes
/// straight out on the tick side, up to the tick length (texture that lies beside the ruler
/// without touching it stays out). A ruler with a body (band) is painted across the image; one
/// without only where it is seen (its pieces along the line, plus a little over a tick pitch at
/// each end), so that a straight hair taken for a ruler is not extended over the skin. `s` is
/// the image scale.
fn paint(dst: &mut [u8], src: &[u8], w: usize, h: usize, r: &Ruler, value: u8, s: f32) {
    let line = 1.5 * s.max(1.0);
    let reach = 10.0 * s.max(1.0);
    let along = |x: f32, y: f32| -x * r.sin + y * r.cos;
    for y in 0..h {
        for x in 0..w {
            let t = along(x as f32, y as f32);
            if r.band.is_none() && (t < r.t0 - reach || t > r.t1 + reach) {
                continue;
            }
            let d = x as f32 * r.cos + y as f32 * r.sin - r.rho;
            let in_band = r.band.is_some_and(|(bs, b)| d * bs >= -line && d * bs <= b);
            if d.abs() <= line || in_band {
                dst[y * w + x] = value;
            }
        }
    }
    // Ticks: from every half pixel along the seen line, out along the normal while `src` holds
    // (gaps up to a pixel bridged).
    let pixel = |t: f32, o: f32| -> Option<usize> {
        let x = (r.rho * r.cos - t * r.sin + o * r.cos).round();
        let y = (r.rho * r.sin + t * r.cos + o * r.sin).round();
        (x >= 0.0 && y >= 0.0 && (x as usize) < w && (y as usize) < h).then(|| y as usize * w + x as usize)
    };
    let corners = [(0.0, 0.0), (w as f32, 0.0), (0.0, h as f32), (w as f32, h as f32)].map(|(x, y)| along(x, y));
    let lo = corners.iter().copied().fold(f32::INFINITY, f32::min).max(r.t0 - reach);
    let hi = corners.iter().copied().fold(f32::NEG_INFINITY, f32::max).min(r.t1 + reach);
    let end = r.tick + 2.0 * s.max(1.0);
    let mut t = lo;
    let mut run = Vec::new();
    while t <= hi {
        run.clear();
        let (mut o, mut gap) = (-line - 1.0, 0.0);
        while o <= end && gap <= 1.0 {
            match pixel(t, o * r.side) {
                Some(i) if src[i] != 0 => {
                    run.push(i);
                    gap = 0.0;
                }
                // The line's own pixels may be missing from `src`; the walk starts past them.
                _ if o.abs() <= line => {}
                _ => gap += 0.5,
            }
            o += 0.5;
        }
        for &i in &run {
            dst[i] = value;
        }
        t += 0.5;
    }
}

fn strongest_ruler(m: &[u8], w: usize, h: usize, min_len: f32, s: f32) -> Option<Ruler> {
    let diag = ((w * w + h * h) as f32).sqrt().ceil() as usize;
    let nr = 2 * diag + 1;
    let trig: Vec<(f32, f32)> = (0..ANGLES)
        .map(|i| {
            let a = i as f32 * std::f32::consts::PI / ANGLES as f32;
            (a.cos(), a.sin())
        })
        .collect();
    let mut acc = vec![0u32; ANGLES * nr];
    let pts: Vec<(f32, f32)> = (0..w * h).filter(|&i| m[i] != 0).map(|i| ((i % w) as f32, (i / w) as f32)).collect();
    if (pts.len() as f32) < min_len {
        return None;
    }
    for &(x, y) in &pts {
        for (a, &(c, sn)) in trig.iter().enumerate() {
            let rho = (x * c + y * sn).round() as isize + diag as isize;
            acc[a * nr + rho as usize] += 1;
        }
    }
    // Try the few strongest lines: a long straight hair may out-vote a short ruler.
    let mut order: Vec<usize> = (0..acc.len()).filter(|&i| acc[i] as f32 >= min_len * 0.5).collect();
    order.sort_unstable_by(|&a, &b| acc[b].cmp(&acc[a]));
    for &best in order.iter().take(8) {
        let (a, rb) = (best / nr, best % nr);
        let (c, sn) = trig[a];
        let rho = rb as f32 - diag as f32;
        if let Some(r) = check_line(m, w, h, c, sn, rho, min_len, s) {
            return Some(r);
        }
    }
    None
}

/// Whether the line `x c + y sn = rho` carries a ruler: a long run and periodic ticks beside it.
#[allow(clippy::too_many_arguments)]
fn check_line(m: &[u8], w: usize, h: usize, c: f32, sn: f32, rho: f32, min_len: f32, s: f32) -> Option<Ruler> {
    let at = |x: f32, y: f32| -> bool {
        let (xi, yi) = (x.round() as isize, y.round() as isize);
        xi >= 0 && yi >= 0 && (xi as usize) < w && (yi as usize) < h && m[yi as usize * w + xi as usize] != 0
    };
    // Walk the line through the image: points p(t) = rho * n + t * d with n = (c, sn), d = (-sn, c).
    let tmax = ((w * w + h * h) as f32).sqrt();
    let point = |t: f32, off: f32| (rho * c - t * sn + off * c, rho * sn + t * c + off * sn);
    let on: Vec<bool> = (0..=(2.0 * tmax) as usize)
        .map(|i| {
            let t = i as f32 - tmax;
            (-1..=1).any(|o| {
                let (x, y) = point(t, o as f32);
                at(x, y)
            })
        })
        .collect();
    // Runs, bridging gaps of up to 2 samples; the longest is the ruler's.
    let (mut runs, mut cur_start, mut last_on, mut gap) = (Vec::new(), None::<usize>, 0usize, 0usize);
    for (i, &v) in on.iter().enumerate() {
        if v {
            if cur_start.is_none() {
                cur_start = Some(i);
            }
            last_on = i;
            gap = 0;
        } else if let Some(st) = cur_start {
            gap += 1;
            if gap > 2 {
                runs.push((st, last_on));
                cur_start = None;
            }
        }
    }
    if let Some(st) = cur_start {
        runs.push((st, last_on));
    }
    let best = runs.iter().copied().max_by_key(|&(a, b)| (b - a, usize::MAX - a)).unwrap_or((0, 0));
    let run = (best.1 - best.0) as f32;
    // A ruler crosses the image: its run covers most of the line's chord through the image.
    let chord = on
        .iter()
        .enumerate()
        .filter(|&(i, _)| {
            let (x, y) = point(i as f32 - tmax, 0.0);
            x >= 0.0 && y >= 0.0 && x <= (w - 1) as f32 && y <= (h - 1) as f32
        })
        .count() as f32;
    if run < min_len || run < 0.5 * chord {
        return None;
    }
    // Tick profile: on each side, mask pixels at offsets 2..=tick from the line.
    let tick = (8.0 * s).max(4.0);
    let band_lo = 2.5f32.max(2.0 * s);
    let mut best_side: Option<(f32, f32)> = None; // (periodicity, side)
    for side in [-1.0f32, 1.0] {
        let prof: Vec<f32> = (best.0..=best.1)
            .map(|i| {
                let t = i as f32 - tmax;
                let mut n = 0;
                let mut o = band_lo;
                while o <= tick {
                    let (x, y) = point(t, side * o);
                    n += usize::from(at(x, y));
                    o += 1.0;
                }
                // A tick crosses several offsets; the jagged edge of a digitised tilted line only
                // one or two, and would look periodic too.
                if n >= 3 {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        // Tick pitch between 4 and 20 px at the reference size.
        let p = periodicity(&prof, (4.0 * s).max(3.0) as usize, ((20.0 * s) as usize).min(prof.len() / 8));
        if best_side.is_none_or(|(bp, _)| p > bp) {
            best_side = Some((p, side));
        }
    }
    let (p, side) = best_side?;
    if p < MIN_PERIODICITY {
        return None;
    }
    // Long ticks reach about twice as far as the profile band.
    // The ruler is seen where its line has long pieces (it may fade over the lesion or under
    // the dark rim); the line is not extended past the last of them.
    let pieces = runs.iter().filter(|&&(a, b)| (b - a) as f32 >= 0.25 * min_len);
    let first = pieces.clone().map(|r| r.0).min().unwrap_or(best.0);
    let last = pieces.map(|r| r.1).max().unwrap_or(best.1);
    let (t0, t1) = (first as f32 - tmax, last as f32 - tmax);
    Some(Ruler { cos: c, sin: sn, rho, t0, t1, side, tick: 2.0 * tick, band: None })
}

/// The largest normalised autocorrelation of `x` (mean removed) over lags in `[lo, hi]`; 0 for a
/// flat or too short profile.
fn periodicity(x: &[f32], lo: usize, hi: usize) -> f32 {
    if x.len() < 2 * lo || hi < lo {
        return 0.0;
    }
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let d: Vec<f32> = x.iter().map(|v| v - mean).collect();
    let var: f32 = d.iter().map(|v| v * v).sum::<f32>() / n;
    if var < 1e-6 {
        return 0.0;
    }
    // Ticks must be a clear part of the profile, not a few stray pixels.
    // Ticks are thin: most of the profile is between them.
    let busy = x.iter().filter(|&&v| v > 0.0).count() as f32 / n;
    if !(0.08..=0.6).contains(&busy) {
        return 0.0;
    }
    // A lag counts only once the profile has decorrelated at a shorter one (ticks are apart at
    // half their pitch): a profile of long blobs (texture beside a hair) stays correlated over
    // small lags without being periodic.
    let (mut best, mut dipped) = (0f32, false);
    for lag in 1..=hi.min(x.len() - 1) {
        let m = x.len() - lag;
        let c = (0..m).map(|i| d[i] * d[i + lag]).sum::<f32>() / m as f32 / var;
        if lag >= lo && dipped {
            best = best.max(c);
        }
        dipped |= c <= 0.0;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Skin with a dark straight 3 px line through (0, 40), slightly tilted, from outside the
    /// left border to `end` px along it, and, when `ticks`, perpendicular tick marks every 8 px.
    fn scene(ticks: bool, end: i32) -> (RgbImage, GrayImage) {
        let (w, h) = (256u32, 200u32);
        let mut img = RgbImage::from_pixel(w, h, image::Rgb([215, 170, 150]));
        let mut truth = GrayImage::new(w, h);
        let mut put = |x: f32, y: f32| {
            let (xi, yi) = (x.round() as i64, y.round() as i64);
            if xi >= 0 && yi >= 0 && xi < w as i64 && yi < h as i64 {
                img.put_pixel(xi as u32, yi as u32, image::Rgb([30, 30, 30]));
                truth.put_pixel(xi as u32, yi as u32, image::Luma([255]));
            }
        };
        let (dx, dy) = (0.97f32, 0.2425f32);
        for i in -20..end {
            let t = i as f32;
            for o in [-1.0f32, 0.0, 1.0] {
                put(t * dx - o * dy, 40.0 + t * dy + o * dx);
                put((t + 0.5) * dx - o * dy, 40.0 + (t + 0.5) * dy + o * dx);
            }
            if ticks && i % 8 == 0 {
                let len = if i % 40 == 0 { 10 } else { 6 };
                for o in 1..=len {
                    put(t * dx - o as f32 * dy, 40.0 + t * dy + o as f32 * dx);
                }
            }
        }
        (img, truth)
    }

    #[test]
    fn finds_a_ruler_and_ignores_a_straight_hair() {
        let cfg = HairConfig::default();
        let (img, truth) = scene(true, 300);
        let r = detect_ruler(&img, &cfg).unwrap();
        let sc = crate::eval::pixel_scores(&r, &truth).unwrap();
        // The line is painted 3 px wide across the whole image and the ticks within reach.
        assert!(sc.recall > 0.9 && sc.precision > 0.75, "{sc:?}");
        let (img, _) = scene(false, 300);
        let r = detect_ruler(&img, &cfg).unwrap();
        assert!(r.pixels().all(|p| p.0[0] == 0), "a straight line without ticks is not a ruler");
    }

    #[test]
    fn a_ruler_is_not_extended_past_where_it_is_seen() {
        let cfg = HairConfig::default();
        let (img, truth) = scene(true, 190);
        let r = detect_ruler(&img, &cfg).unwrap();
        let sc = crate::eval::pixel_scores(&r, &truth).unwrap();
        assert!(sc.recall > 0.9 && sc.precision > 0.75, "{sc:?}");
        // Its line ends near x = 184 (t = 190); beyond a tick pitch or so nothing is marked.
        let beyond = r.enumerate_pixels().filter(|(x, _, p)| *x >= 205 && p.0[0] != 0).count();
        assert_eq!(beyond, 0, "marked past the ruler's end");
    }

    #[test]
    fn periodicity_of_profiles() {
        let ticks: Vec<f32> = (0..100).map(|i| if i % 8 < 2 { 3.0 } else { 0.0 }).collect();
        assert!(periodicity(&ticks, 3, 25) > 0.8);
        let flat = vec![1.0f32; 100];
        assert_eq!(periodicity(&flat, 3, 25), 0.0);
        let mut rng = derm_core::Rng::new(2);
        let noise: Vec<f32> = (0..100).map(|_| if rng.bernoulli(0.2) { 1.0 } else { 0.0 }).collect();
        assert!(periodicity(&noise, 3, 25) < MIN_PERIODICITY);
        // Long blobs (texture beside a hair) correlate over short lags but are not periodic.
        let mut blobs = Vec::new();
        while blobs.len() < 200 {
            let (on, off) = (8 + rng.below(20), 10 + rng.below(40));
            blobs.extend(std::iter::repeat_n(1.0f32, on).chain(std::iter::repeat_n(0.0, off)));
        }
        assert!(periodicity(&blobs, 3, 25) < MIN_PERIODICITY, "{}", periodicity(&blobs, 3, 25));
    }
}
