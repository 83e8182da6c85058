//! sRGB to CIE L* (the luminance channel of CIE LUV and LAB, D65 white).
//!
//! `L* = 116 f(Y) - 16` with `f(Y) = Y^(1/3)` above `(6/29)^3` and `Y (29/6)^2 / 3 + 4/29`
//! below, where `Y = 0.2126 R + 0.7152 G + 0.0722 B` on linearised sRGB. [`lstar`] evaluates the
//! formula directly; [`luminance`] and [`luminance_u8`] use tables for speed and agree with it
//! to within 0.01 L*.

use std::sync::OnceLock;

use image::RgbImage;
use rayon::prelude::*;

/// Linear value of an 8-bit sRGB code (IEC 61966-2-1).
pub fn srgb_to_linear(v: u8) -> f64 {
    let c = v as f64 / 255.0;
    if c <= 0.04045 {
        c / 12.92
    } else {
        ((c + 0.055) / 1.055).powf(2.4)
    }
}

/// CIE L* (0-100) of a relative luminance `y` in [0, 1].
pub fn lstar_of_y(y: f64) -> f64 {
    const EPS: f64 = 216.0 / 24389.0; // (6/29)^3
    const KAPPA: f64 = 24389.0 / 27.0; // (29/3)^3
    if y > EPS {
        116.0 * y.cbrt() - 16.0
    } else {
        KAPPA * y
    }
}

/// Relative luminance Y (D65) of an sRGB pixel.
pub fn srgb_to_y(rgb: [u8; 3]) -> f64 {
    0.2126 * srgb_to_linear(rgb[0]) + 0.7152 * srgb_to_linear(rgb[1]) + 0.0722 * srgb_to_linear(rgb[2])
}

/// CIE L* (0-100) of one sRGB pixel, evaluated exactly.
pub fn lstar(rgb: [u8; 3]) -> f64 {
    lstar_of_y(srgb_to_y(rgb))
}

/// Fixed-point scale of Y in the tables.
const Y_ONE: u32 = 1 << 16;

struct Tables {
    /// Per channel, `weight * linear(v) * Y_ONE`; the three weights sum to 1.
    lin: [[f32; 256]; 3],
    /// The same rounded to integers, for [`luminance_u8`].
    lin_u32: [[u32; 256]; 3],
    /// L* at `Y = i / Y_ONE`.
    l: Vec<f32>,
    /// `L* * 2.55` rounded, at `Y = i / Y_ONE`.
    l_u8: Vec<u8>,
}

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        let weights = [0.2126, 0.7152, 0.0722];
        let mut lin = [[0f32; 256]; 3];
        for (c, row) in lin.iter_mut().enumerate() {
            for (v, e) in row.iter_mut().enumerate() {
                *e = (weights[c] * srgb_to_linear(v as u8) * Y_ONE as f64) as f32;
            }
        }
        let lin_u32 = lin.map(|row| row.map(|v| (v + 0.5) as u32));
        let l: Vec<f32> = (0..=Y_ONE + 1).map(|i| lstar_of_y(i as f64 / Y_ONE as f64) as f32).collect();
        let l_u8 = l.iter().map(|&v| (v * 2.55).round().clamp(0.0, 255.0) as u8).collect();
        Tables { lin, lin_u32, l, l_u8 }
    })
}

/// `Y * Y_ONE` of a pixel, at most `Y_ONE` plus rounding.
#[inline]
fn table_y(t: &Tables, p: &[u8]) -> f32 {
    (t.lin[0][p[0] as usize] + t.lin[1][p[1] as usize] + t.lin[2][p[2] as usize]).clamp(0.0, Y_ONE as f32)
}

/// L* by linear interpolation in the table.
#[inline]
fn table_l(t: &Tables, p: &[u8]) -> f32 {
    let y = table_y(t, p);
    let i = y as usize;
    let f = y - i as f32;
    t.l[i] + f * (t.l[i + 1] - t.l[i])
}

/// CIE L* (0-100) of every pixel, row-major.
pub fn luminance(img: &RgbImage) -> Vec<f32> {
    let t = tables();
    img.as_raw().chunks_exact(3).map(|p| table_l(t, p)).collect()
}

/// CIE L* of every pixel scaled to 0-255 (`L* * 2.55`, rounded), row-major, as OpenCV's 8-bit
/// LUV conversion stores it. The morphology runs on this plane.
pub fn luminance_u8(img: &RgbImage) -> Vec<u8> {
    let t = tables();
    let (lin, q) = (&t.lin_u32, &t.l_u8);
    let mut out = vec![0u8; img.as_raw().len() / 3];
    let row = img.width().max(1) as usize;
    out.par_chunks_mut(row * 64).zip(img.as_raw().par_chunks(row * 64 * 3)).for_each(|(o, px)| {
        for (o, p) in o.iter_mut().zip(px.chunks_exact(3)) {
            let y = lin[0][p[0] as usize] + lin[1][p[1] as usize] + lin[2][p[2] as usize];
            *o = q[(y as usize).min(q.len() - 1)];
        }
    });
    out
}

/// The lightness of each pixel's largest channel (CIE L* of the grey `(m, m, m)`,
/// `m = max(r, g, b)`, scaled to 0-255 like [`luminance_u8`]). Hair is dark in every channel;
/// melanin (lesion, pigment network) absorbs blue and green far more than red, so on a lesion a
/// hair stands out more here than in the luminance.
pub fn value_u8(img: &RgbImage) -> Vec<u8> {
    let grey = value_table();
    let mut out = vec![0u8; img.as_raw().len() / 3];
    let row = img.width().max(1) as usize;
    out.par_chunks_mut(row * 64).zip(img.as_raw().par_chunks(row * 64 * 3)).for_each(|(o, px)| {
        for (o, p) in o.iter_mut().zip(px.chunks_exact(3)) {
            *o = grey[p[0].max(p[1]).max(p[2]) as usize];
        }
    });
    out
}

/// The colourfulness of each pixel, `max - min` of its channels. Hair is grey or nearly so; skin
/// and above all a brown lesion are coloured, so a grey hair as light as the lesion it crosses is
/// still a dark line here.
pub fn chroma_u8(img: &RgbImage) -> Vec<u8> {
    img.as_raw().par_chunks_exact(3).map(|p| chroma_of(p[0], p[1], p[2])).collect()
}

/// [`chroma_u8`] of one pixel.
pub fn chroma_of(r: u8, g: u8, b: u8) -> u8 {
    let (hi, lo) = (r.max(g).max(b), r.min(g).min(b));
    hi - lo
}

/// [`value_u8`] of one pixel.
pub fn value_of(r: u8, g: u8, b: u8) -> u8 {
    value_table()[r.max(g).max(b) as usize]
}

/// `L* * 2.55` of the grey `(m, m, m)` for every `m`.
fn value_table() -> &'static [u8; 256] {
    static TABLE: std::sync::OnceLock<[u8; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let t = tables();
        let (lin, q) = (&t.lin_u32, &t.l_u8);
        std::array::from_fn(|m| q[((lin[0][m] + lin[1][m] + lin[2][m]) as usize).min(q.len() - 1)])
    })
}

/// [`luminance_u8`] and, in the same pass over the pixels, a 0/255 plane of the pixels for which
/// `flag(r, g, b)` holds, with their count.
pub(crate) fn luminance_u8_and_flags(
    img: &RgbImage,
    flag: impl Fn(i32, i32, i32) -> bool + Sync,
) -> (Vec<u8>, Vec<u8>, usize) {
    let t = tables();
    let (lin, q) = (&t.lin_u32, &t.l_u8);
    let n = img.as_raw().len() / 3;
    let (mut out, mut flags) = (vec![0u8; n], vec![0u8; n]);
    let row = img.width().max(1) as usize * 64;
    let found = out
        .par_chunks_mut(row)
        .zip(flags.par_chunks_mut(row))
        .zip(img.as_raw().par_chunks(row * 3))
        .map(|((o, fl), px)| {
            let mut k = 0;
            for ((o, f), p) in o.iter_mut().zip(fl.iter_mut()).zip(px.chunks_exact(3)) {
                let y = lin[0][p[0] as usize] + lin[1][p[1] as usize] + lin[2][p[2] as usize];
                *o = q[(y as usize).min(q.len() - 1)];
                if flag(p[0] as i32, p[1] as i32, p[2] as i32) {
                    *f = 255;
                    k += 1;
                }
            }
            k
        })
        .sum();
    (out, flags, found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_lstar_values() {
        // palette 0.7.7 (docs/candle-notes.md#colour): sRGB(200,120,90) -> L 58.47.
        assert!((lstar([200, 120, 90]) - 58.47).abs() < 0.01, "{}", lstar([200, 120, 90]));
        assert!((lstar([255, 255, 255]) - 100.0).abs() < 1e-3);
        assert_eq!(lstar([0, 0, 0]), 0.0);
        // Mid grey sRGB 119 is close to L* 50.
        assert!((lstar([119, 119, 119]) - 50.0).abs() < 0.1);
    }

    #[test]
    fn tables_agree_with_formula() {
        let mut rng = derm_core::Rng::new(1);
        let mut img = RgbImage::new(64, 64);
        for p in img.pixels_mut() {
            p.0 = [rng.below(256) as u8, rng.below(256) as u8, rng.below(256) as u8];
        }
        img.put_pixel(0, 0, image::Rgb([255, 255, 255]));
        img.put_pixel(1, 0, image::Rgb([0, 0, 0]));
        img.put_pixel(2, 0, image::Rgb([1, 0, 0]));
        let l = luminance(&img);
        let l8 = luminance_u8(&img);
        for (i, p) in img.pixels().enumerate() {
            let exact = lstar(p.0);
            assert!((l[i] as f64 - exact).abs() < 0.01, "{:?}: {} vs {exact}", p.0, l[i]);
            assert!((l8[i] as f64 - exact * 2.55).abs() <= 0.51, "{:?}", p.0);
        }
        assert_eq!(l8[0], 255);
        assert_eq!(l8[1], 0);
        // The value plane is the lightness of the grey of the largest channel.
        let v8 = value_u8(&img);
        for (i, p) in img.pixels().enumerate() {
            let m = p.0[0].max(p.0[1]).max(p.0[2]);
            assert!((v8[i] as f64 - lstar([m, m, m]) * 2.55).abs() <= 0.51, "{:?}", p.0);
            assert!(v8[i] >= l8[i], "{:?}", p.0);
        }
    }
}
