//! Oriented line morphology in any number of orientations, and the hair response built on it.
//!
//! A line of `2r + 1` samples at angle `θ` is the set of offsets `round(k cos θ, k sin θ)`,
//! `k = -r..=r`. The plane is padded by `r` on every side, so each offset is one fixed shift of
//! the flat array, and the maximum (minimum) over the line is `2r + 1` element-wise maxima of
//! shifted slices, which the compiler vectorises. Outside the image is ignored by the maximum and
//! black (0) for the minimum, as in [`crate::morph::line_closing`], so a dark region touching the
//! border (the dark corners of a dermoscope's field of view) is never thin.
//!
//! [`line_responses`] gives, for every pixel, the largest and the smallest line black-hat
//! (`closing_θ - L`) over the orientations, and the same for the white top-hat
//! (`L - opening_θ`). A hair is a thin line: the lines across it close it (large response), the
//! line along it stays inside it (response near zero), so `max - min` is large. A dot, a globule
//! or the mesh of a pigment network is closed by the lines of every orientation (each leaves it
//! within a few pixels), so `max - min` is small there.

use rayon::prelude::*;

/// A plane padded by `r` on every side.
struct Pad {
    w: usize,
    h: usize,
    r: usize,
    wp: usize,
}

impl Pad {
    fn len(&self) -> usize {
        self.wp * (self.h + 2 * self.r)
    }

    /// Copies `src` (`w` x `h`) into a padded plane whose border holds `fill`.
    fn load(&self, src: &[u8], fill: u8, out: &mut Vec<u8>) {
        out.clear();
        out.resize(self.len(), fill);
        for y in 0..self.h {
            let o = (y + self.r) * self.wp + self.r;
            out[o..o + self.w].copy_from_slice(&src[y * self.w..(y + 1) * self.w]);
        }
    }

    /// Sets the border of a padded plane to `fill`.
    fn refill(&self, buf: &mut [u8], fill: u8) {
        let (r, wp) = (self.r, self.wp);
        buf[..r * wp].fill(fill);
        buf[(self.h + r) * wp..].fill(fill);
        for y in r..self.h + r {
            buf[y * wp..y * wp + r].fill(fill);
            buf[y * wp + r + self.w..(y + 1) * wp].fill(fill);
        }
    }

    /// Flat offsets of the line at angle `theta` (radians).
    fn offsets(&self, theta: f32) -> Vec<isize> {
        let r = self.r as i64;
        let mut v: Vec<isize> = (-r..=r)
            .map(|k| {
                let dx = (k as f32 * theta.cos()).round() as isize;
                let dy = (k as f32 * theta.sin()).round() as isize;
                dy * self.wp as isize + dx
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// `out[i] = max or min over offsets o of src[i + o]`, where both are in range; `out` starts as
/// the identity of the operation.
fn line_op(src: &[u8], offs: &[isize], max: bool, out: &mut [u8]) {
    let n = src.len() as isize;
    out.fill(if max { 0 } else { 255 });
    for &o in offs {
        let lo = (-o).max(0);
        let hi = (n - o).min(n);
        if lo >= hi {
            continue;
        }
        let (lo, hi) = (lo as usize, hi as usize);
        let s = &src[(lo as isize + o) as usize..(hi as isize + o) as usize];
        let d = &mut out[lo..hi];
        if max {
            for (a, &b) in d.iter_mut().zip(s) {
                *a = (*a).max(b);
            }
        } else {
            for (a, &b) in d.iter_mut().zip(s) {
                *a = (*a).min(b);
            }
        }
    }
}

/// Per-pixel extremes of the oriented responses of [`line_responses`].
#[derive(Debug, Clone)]
pub struct Responses {
    /// Largest black-hat over the orientations.
    pub dark_max: Vec<u8>,
    /// Smallest black-hat over the orientations.
    pub dark_min: Vec<u8>,
    /// Largest white top-hat over the orientations.
    pub light_max: Vec<u8>,
    /// Smallest white top-hat over the orientations.
    pub light_min: Vec<u8>,
    /// The closing of the orientation with the largest black-hat (the surroundings a dark pixel
    /// is compared with).
    pub closing: Vec<u8>,
    /// Sum over the orientations of the black-hat times `(cos 2θ, sin 2θ)`, scaled by 1024 and
    /// rounded (whole numbers, so the sum does not depend on the order of the parallel merge): it
    /// points across a hair (the doubled angle of the orientations that close it) and is near
    /// zero on a dot, which every orientation closes alike.
    pub across: Vec<(i32, i32)>,
    /// The same sum for the white top-hat (pointing across a light hair); empty without the
    /// top-hat.
    pub light_across: Vec<(i32, i32)>,
}

/// Black-hat and white top-hat of `l` (`w` x `h`) with lines of `2 radius + 1` samples in
/// `n_dirs` orientations evenly spread over 180°, on the image widened by `widen` 3 x 3 minima
/// (maxima for the top-hat); `light` adds the top-hat (else its planes are zero).
///
/// The top-hat is taken on the image with its thin dark structures closed (the closing of the
/// orientation with the largest black-hat): the skin in the narrow wedge where two dark hairs
/// cross is lighter than the hairs on both sides of it, but not lighter than its surroundings
/// once the hairs are filled in, while a light hair is left as it is by the closing.
pub fn line_responses(
    l: &[u8],
    w: usize,
    h: usize,
    radius: usize,
    n_dirs: usize,
    light: bool,
    widen: usize,
) -> Responses {
    let border_black = true; // see the module doc
    let pad = Pad { w, h, r: radius, wp: w + 2 * radius };
    let n_dirs = n_dirs.max(2);
    // Each orientation gives its closing (and opening); the extremes are merged per task.
    // A digital line through a pixel of a thin hair at an arbitrary angle leaves the hair within
    // a few pixels; on the image widened by a 3 x 3 minimum (maximum for light hairs) the line
    // along a hair stays inside it, while dots and meshes are still left within a few pixels.
    let mut eroded = l.to_vec();
    for _ in 0..widen {
        eroded = square3(&eroded, w, h, false);
    }
    let closing_at = |i: usize| -> Vec<u8> {
        let offs = pad.offsets(i as f32 * std::f32::consts::PI / n_dirs as f32);
        let (mut a, mut b) = (Vec::new(), vec![0u8; pad.len()]);
        pad.load(&eroded, 0, &mut a);
        line_op(&a, &offs, true, &mut b);
        pad.refill(&mut b, if border_black { 0 } else { 255 });
        line_op(&b, &offs, false, &mut a);
        unpad(&a, &pad)
    };
    let n = w * h;
    let unit: Vec<(i32, i32)> = (0..n_dirs)
        .map(|i| {
            let a = 2.0 * i as f32 * std::f32::consts::PI / n_dirs as f32;
            ((a.cos() * 1024.0).round() as i32, (a.sin() * 1024.0).round() as i32)
        })
        .collect();
    let init = || Responses {
        dark_max: vec![0; n],
        dark_min: vec![255; n],
        light_max: vec![0; n],
        light_min: vec![if light { 255 } else { 0 }; n],
        closing: l.to_vec(),
        across: vec![(0, 0); n],
        light_across: Vec::new(),
    };
    let mut r = (0..n_dirs)
        .into_par_iter()
        .fold(init, |mut acc, i| {
            let c = closing_at(i);
            let (ux, uy) = unit[i];
            for k in 0..n {
                let d = c[k].saturating_sub(l[k]);
                let v = &mut acc.across[k];
                *v = (v.0 + d as i32 * ux, v.1 + d as i32 * uy);
                if d > acc.dark_max[k] {
                    acc.dark_max[k] = d;
                    acc.closing[k] = c[k];
                }
                acc.dark_min[k] = acc.dark_min[k].min(d);
            }
            acc
        })
        .reduce(init, |mut a, b| {
            for k in 0..n {
                if b.dark_max[k] > a.dark_max[k] {
                    a.dark_max[k] = b.dark_max[k];
                    a.closing[k] = b.closing[k];
                }
                a.dark_min[k] = a.dark_min[k].min(b.dark_min[k]);
                a.across[k] = (a.across[k].0 + b.across[k].0, a.across[k].1 + b.across[k].1);
            }
            a
        });
    if light {
        let mut dilated = r.closing.clone();
        for _ in 0..widen {
            dilated = square3(&dilated, w, h, true);
        }
        let opening_at = |i: usize| -> Vec<u8> {
            let offs = pad.offsets(i as f32 * std::f32::consts::PI / n_dirs as f32);
            let (mut a, mut b) = (Vec::new(), vec![0u8; pad.len()]);
            pad.load(&dilated, 255, &mut a);
            line_op(&a, &offs, false, &mut b);
            pad.refill(&mut b, 0);
            line_op(&b, &offs, true, &mut a);
            unpad(&a, &pad)
        };
        let init = || (vec![0u8; n], vec![255u8; n], vec![(0i32, 0i32); n]);
        let (hi, lo, across) = (0..n_dirs)
            .into_par_iter()
            .fold(init, |(mut hi, mut lo, mut across), i| {
                let o = opening_at(i);
                let (ux, uy) = unit[i];
                for k in 0..n {
                    let d = l[k].saturating_sub(o[k]);
                    hi[k] = hi[k].max(d);
                    lo[k] = lo[k].min(d);
                    let v = &mut across[k];
                    *v = (v.0 + d as i32 * ux, v.1 + d as i32 * uy);
                }
                (hi, lo, across)
            })
            .reduce(init, |(mut hi, mut lo, mut across), (bh, bl, ba)| {
                for k in 0..n {
                    hi[k] = hi[k].max(bh[k]);
                    lo[k] = lo[k].min(bl[k]);
                    across[k] = (across[k].0 + ba[k].0, across[k].1 + ba[k].1);
                }
                (hi, lo, across)
            });
        r.light_max = hi;
        r.light_min = lo;
        r.light_across = across;
    }
    r
}

/// 3 x 3 maximum (`max`) or minimum of a plane, the border clamped.
pub(crate) fn square3(l: &[u8], w: usize, h: usize, max: bool) -> Vec<u8> {
    let pick = |a: u8, b: u8| if max { a.max(b) } else { a.min(b) };
    let mut rows = l.to_vec();
    for y in 0..h {
        let r = &l[y * w..(y + 1) * w];
        let o = &mut rows[y * w..(y + 1) * w];
        for x in 0..w {
            let a = r[x.saturating_sub(1)];
            let b = r[(x + 1).min(w - 1)];
            o[x] = pick(pick(a, b), r[x]);
        }
    }
    let mut out = rows.clone();
    for y in 0..h {
        let (ya, yb) = (y.saturating_sub(1), (y + 1).min(h - 1));
        for x in 0..w {
            out[y * w + x] = pick(pick(rows[ya * w + x], rows[yb * w + x]), rows[y * w + x]);
        }
    }
    out
}

fn unpad(buf: &[u8], pad: &Pad) -> Vec<u8> {
    let mut out = Vec::with_capacity(pad.w * pad.h);
    for y in 0..pad.h {
        let o = (y + pad.r) * pad.wp + pad.r;
        out.extend_from_slice(&buf[o..o + pad.w]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_a_large_spread_and_a_dot_a_small_one() {
        let (w, h) = (64, 64);
        let mut l = vec![200u8; w * h];
        // A 1 px dark line at about 30°, and a 3x3 dark dot.
        for k in 0..50 {
            let (x, y) = (5.0 + k as f32 * 0.866, 5.0 + k as f32 * 0.5);
            l[y.round() as usize * w + x.round() as usize] = 80;
        }
        for y in 45..48 {
            for x in 45..48 {
                l[y * w + x] = 80;
            }
        }
        let r = line_responses(&l, w, h, 5, 12, true, 1);
        let line_px = 20usize * w + 31; // (k = ~30): x = 31, y = 20
        assert_eq!(l[line_px], 80);
        assert!(r.dark_max[line_px] >= 100, "{}", r.dark_max[line_px]);
        assert!(r.dark_min[line_px] <= 10, "{}", r.dark_min[line_px]);
        let dot = 46 * w + 46;
        assert!(r.dark_max[dot] >= 100 && r.dark_min[dot] >= 100);
        // Nothing is lighter than its surroundings here.
        assert!(r.light_max.iter().all(|&v| v == 0));
        assert_eq!(r.closing[line_px], 200);
        // Across the line is 120°; its doubled angle is 240° (cos < 0, sin < 0). The dot's
        // vector is small against its responses.
        let (vx, vy) = r.across[line_px];
        let ang = (vy as f32).atan2(vx as f32).to_degrees().rem_euclid(360.0);
        assert!((ang - 240.0).abs() < 20.0, "{ang}");
        let (dx, dy) = r.across[dot];
        let mag = ((dx as f32).powi(2) + (dy as f32).powi(2)).sqrt() / 1024.0;
        assert!(mag < 0.2 * 12.0 * r.dark_min[dot] as f32, "{mag}");
    }
}
