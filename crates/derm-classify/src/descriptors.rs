//! Lesion descriptors: the measurements of the dermatologists' ABCD rule (asymmetry, border,
//! colour, diameter), taken from an image and its lesion mask, as a second training target.
//!
//! With [`crate::ClassifyConfig::aux_descriptor_weight`] (off by default) a linear map of the
//! classifier's pooled last-stage features ([`crate::aux::MaskHead::descriptor_values`]) regresses
//! [`COUNT`] numbers that each training view's mask and pixels give ([`describe`]), standardised
//! over the training images ([`Standardizer`]), and its mean squared error is added to the loss:
//! the features that decide the diagnosis also have to hold the lesion's shape and colour
//! spread. Training only; prediction reads neither masks nor descriptors.
//!
//! The descriptors of one view, in order ([`NAMES`]):
//! - `area`: the share of the view the lesion covers (D).
//! - `border`: `ln(P^2 / (4 pi A))` of its boundary pixels `P` (lesion pixels with a 4-neighbour
//!   that is not lesion, the outside of the view counting as not lesion) and area `A` in pixels:
//!   about -0.2 for a digital disc, higher for ragged or elongated borders (B). A lesion the view
//!   cuts is bounded by the view's edge there: one that fills the view scores its square's 0.24.
//! - `asymmetry_min`, `asymmetry_max`: the share of lesion pixels whose mirror image across one
//!   of the lesion's two principal axes (through its centroid) is not lesion or leaves the view,
//!   the lower and the higher of the two axes (A).
//! - `red_spread`, `green_spread`, `blue_spread`: the standard deviation of each channel (0..1)
//!   over the lesion's pixels: colour variegation (C).
//! - `contrast`: the mean luminance of the view outside the lesion minus inside (0 when less
//!   than [`MIN_SHARE`] of the view is outside).
//!
//! A view whose lesion covers less than [`MIN_SHARE`] of it (or no mask) has no descriptors and
//! adds nothing to the loss.

use candle_core::{Device, Result, Tensor};
use derm_core::binary::Moments;
use image::{GrayImage, RgbImage};

/// How many numbers [`describe`] gives.
pub const COUNT: usize = 8;

/// Their names, in order.
pub const NAMES: [&str; COUNT] =
    ["area", "border", "asymmetry_min", "asymmetry_max", "red_spread", "green_spread", "blue_spread", "contrast"];

/// The least share of a view the lesion (or, for `contrast`, the skin around it) must cover to
/// be described.
pub const MIN_SHARE: f64 = 0.01;

/// The descriptors of the lesion of `mask` (foreground >= 128, the size of `img`) in `img`, or
/// `None` when the lesion covers less than [`MIN_SHARE`] of the image or the sizes differ.
pub fn describe(img: &RgbImage, mask: &GrayImage) -> Option<[f32; COUNT]> {
    if img.dimensions() != mask.dimensions() {
        return None;
    }
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let on = |x: usize, y: usize| mask.get_pixel(x as u32, y as u32)[0] >= 128;
    let total = (w * h) as f64;
    let mut moments = Moments::default();
    let mut boundary = 0usize;
    let mut sum = [0f64; 3];
    let mut sq = [0f64; 3];
    let (mut lum_in, mut lum_out) = (0f64, 0f64);
    for y in 0..h {
        for x in 0..w {
            let p = img.get_pixel(x as u32, y as u32).0.map(|c| f64::from(c) / 255.0);
            let lum = 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
            if !on(x, y) {
                lum_out += lum;
                continue;
            }
            moments.add(x, y);
            lum_in += lum;
            for c in 0..3 {
                sum[c] += p[c];
                sq[c] += p[c] * p[c];
            }
            let edge = x == 0
                || y == 0
                || x + 1 == w
                || y + 1 == h
                || !on(x - 1, y)
                || !on(x + 1, y)
                || !on(x, y - 1)
                || !on(x, y + 1);
            boundary += usize::from(edge);
        }
    }
    let n = moments.count();
    if n == 0 || (n as f64) < MIN_SHARE * total {
        return None;
    }
    let nf = n as f64;
    // The principal axes, through the centroid.
    let (cx, cy) = moments.centroid();
    let (mxx, myy, mxy) = moments.covariance();
    let theta = 0.5 * (2.0 * mxy).atan2(mxx - myy);
    let asymmetry = |ux: f64, uy: f64| -> f64 {
        let mut off = 0usize;
        for y in 0..h {
            for x in 0..w {
                if !on(x, y) {
                    continue;
                }
                let (dx, dy) = (x as f64 - cx, y as f64 - cy);
                let along = dx * ux + dy * uy;
                let (rx, ry) = ((cx + 2.0 * along * ux - dx).round(), (cy + 2.0 * along * uy - dy).round());
                let inside = rx >= 0.0 && ry >= 0.0 && (rx as usize) < w && (ry as usize) < h;
                off += usize::from(!(inside && on(rx as usize, ry as usize)));
            }
        }
        off as f64 / nf
    };
    let a1 = asymmetry(theta.cos(), theta.sin());
    let a2 = asymmetry(-theta.sin(), theta.cos());
    let border = (boundary as f64).powi(2) / (4.0 * std::f64::consts::PI * nf);
    let spread = |c: usize| (sq[c] / nf - (sum[c] / nf).powi(2)).max(0.0).sqrt();
    let outside = total - nf;
    let contrast = if outside >= MIN_SHARE * total { lum_out / outside - lum_in / nf } else { 0.0 };
    Some([nf / total, border.ln(), a1.min(a2), a1.max(a2), spread(0), spread(1), spread(2), contrast].map(|v| v as f32))
}

/// Per-descriptor mean and standard deviation over a set of lesions, which turn descriptors into
/// targets of unit scale ([`Standardizer::apply`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Standardizer {
    /// The mean of each descriptor.
    pub mean: [f32; COUNT],
    /// Its standard deviation (1 where the set does not vary).
    pub std: [f32; COUNT],
}

impl Standardizer {
    /// The statistics of `rows`; `None` for no rows.
    pub fn fit(rows: &[[f32; COUNT]]) -> Option<Self> {
        if rows.is_empty() {
            return None;
        }
        let n = rows.len() as f64;
        let mut mean = [0f32; COUNT];
        let mut std = [1f32; COUNT];
        for k in 0..COUNT {
            let m = rows.iter().map(|r| f64::from(r[k])).sum::<f64>() / n;
            let v = rows.iter().map(|r| (f64::from(r[k]) - m).powi(2)).sum::<f64>() / n;
            mean[k] = m as f32;
            if v.sqrt() > 1e-6 {
                std[k] = v.sqrt() as f32;
            }
        }
        Some(Standardizer { mean, std })
    }

    /// `row` in standard units.
    pub fn apply(&self, row: &[f32; COUNT]) -> [f32; COUNT] {
        std::array::from_fn(|k| (row[k] - self.mean[k]) / self.std[k])
    }

    /// A batch's targets: (N, [`COUNT`]) standardised descriptors of each row (zeros for a view
    /// without them) and (N,) weights, 1 where a view has descriptors and 0 where it has none.
    pub fn targets(&self, rows: &[Option<[f32; COUNT]>], device: &Device) -> Result<(Tensor, Tensor)> {
        let mut t = Vec::with_capacity(rows.len() * COUNT);
        let mut present = Vec::with_capacity(rows.len());
        for r in rows {
            match r {
                Some(r) => {
                    t.extend(self.apply(r));
                    present.push(1f32);
                }
                None => {
                    t.extend([0f32; COUNT]);
                    present.push(0f32);
                }
            }
        }
        Ok((Tensor::from_vec(t, (rows.len(), COUNT), device)?, Tensor::new(present, device)?))
    }
}

/// Mean squared error of predicted descriptors (N, [`COUNT`]) against `targets` (N, [`COUNT`]),
/// averaged over the descriptors, then over the views whose `present` weight (N,) is 1; 0 when
/// none is.
pub fn loss(predicted: &Tensor, targets: &Tensor, present: &Tensor) -> Result<Tensor> {
    let per_view = (predicted - targets)?.sqr()?.mean(1)?;
    crate::aux::mean_over_present(&per_view, present)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Luma, Rgb};

    /// A `w` x `h` view of skin (180, 140, 120) with the pixels `inside` says painted `lesion`.
    fn view(w: u32, h: u32, lesion: [u8; 3], inside: impl Fn(u32, u32) -> bool) -> (RgbImage, GrayImage) {
        let img = RgbImage::from_fn(w, h, |x, y| Rgb(if inside(x, y) { lesion } else { [180, 140, 120] }));
        let mask = GrayImage::from_fn(w, h, |x, y| Luma([if inside(x, y) { 255 } else { 0 }]));
        (img, mask)
    }

    #[test]
    fn a_disc_is_round_symmetric_and_of_one_colour() {
        let (img, mask) = view(64, 64, [60, 40, 30], |x, y| (x as f64 - 31.5).hypot(y as f64 - 31.5) < 16.0);
        let d = describe(&img, &mask).unwrap();
        let area = d[0] as f64 * 64.0 * 64.0;
        assert!((area - std::f64::consts::PI * 256.0).abs() < 20.0, "area {area}");
        assert!(d[1] < 0.0 && d[1] > -0.5, "a disc's border {}", d[1]);
        assert!(d[3] < 0.03, "a disc's asymmetry {:?}", &d[2..4]);
        assert!(d[4..7].iter().all(|&s| s < 1e-4), "one colour: {:?}", &d[4..7]);
        let lum = |p: [f64; 3]| (0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]) / 255.0;
        let want = lum([180.0, 140.0, 120.0]) - lum([60.0, 40.0, 30.0]);
        assert!((f64::from(d[7]) - want).abs() < 1e-4, "contrast {} against {want}", d[7]);
    }

    #[test]
    fn ragged_lopsided_and_mottled_lesions_score_higher() {
        let disc = |x: u32, y: u32| (x as f64 - 31.5).hypot(y as f64 - 31.5) < 16.0;
        let (img, mask) = view(64, 64, [60, 40, 30], disc);
        let round = describe(&img, &mask).unwrap();
        // An ellipse tilted by 30 degrees is symmetric about both its axes, which are not the
        // image's: the descriptor finds them.
        let tilted = |x: u32, y: u32| {
            let (dx, dy) = (x as f64 - 31.5, y as f64 - 31.5);
            let (c, s) = (30f64.to_radians().cos(), 30f64.to_radians().sin());
            let (u, v) = (dx * c + dy * s, -dx * s + dy * c);
            (u / 24.0).powi(2) + (v / 10.0).powi(2) < 1.0
        };
        let (img, mask) = view(64, 64, [60, 40, 30], tilted);
        let e = describe(&img, &mask).unwrap();
        assert!(e[3] < 0.06, "a tilted ellipse's asymmetry {:?}", &e[2..4]);
        assert!(e[1] > round[1], "an ellipse's border {} against a disc's {}", e[1], round[1]);
        // A star: the radius swings with the angle.
        let star = |x: u32, y: u32| {
            let (dx, dy) = (x as f64 - 31.5, y as f64 - 31.5);
            dx.hypot(dy) < 16.0 + 7.0 * (7.0 * dy.atan2(dx)).sin()
        };
        let (img, mask) = view(64, 64, [60, 40, 30], star);
        assert!(describe(&img, &mask).unwrap()[1] > round[1] + 0.3, "a ragged border");
        // A disc with a bulge on one side of both axes: an L of two rectangles.
        let ell = |x: u32, y: u32| {
            (8..40).contains(&x) && (8..20).contains(&y) || (8..20).contains(&x) && (8..56).contains(&y)
        };
        let (img, mask) = view(64, 64, [60, 40, 30], ell);
        let l = describe(&img, &mask).unwrap();
        assert!(l[2] > round[3] + 0.1 && l[3] >= l[2], "asymmetry {:?} against {:?}", &l[2..4], &round[2..4]);
        // Two colours in the lesion: red and blue spread, green (the same in both) does not.
        let mut img = img;
        for (x, y, p) in img.enumerate_pixels_mut() {
            if ell(x, y) && x < 14 {
                *p = Rgb([120, 40, 90]);
            }
        }
        let m = describe(&img, &mask).unwrap();
        assert!(m[4] > 0.05 && m[6] > 0.05 && m[5] < 1e-4, "spread {:?}", &m[4..7]);
    }

    #[test]
    fn tiny_or_missing_lesions_and_other_sizes_have_no_descriptors() {
        let (img, mask) = view(64, 64, [60, 40, 30], |x, y| x < 3 && y < 3);
        assert!(describe(&img, &mask).is_none(), "9 of 4096 pixels");
        let (img, mask) = view(64, 64, [60, 40, 30], |_, _| false);
        assert!(describe(&img, &mask).is_none());
        let (img, _) = view(64, 64, [60, 40, 30], |_, _| true);
        let other = GrayImage::from_pixel(32, 32, Luma([255]));
        assert!(describe(&img, &other).is_none());
        // A lesion filling the view has no skin to contrast with, and the view's edge for border.
        let all = GrayImage::from_pixel(64, 64, Luma([255]));
        let d = describe(&img, &all).unwrap();
        assert_eq!((d[0], d[7]), (1.0, 0.0));
        let square = (4.0 * 63.0f64).powi(2) / (4.0 * std::f64::consts::PI * 4096.0);
        assert!((f64::from(d[1]) - square.ln()).abs() < 1e-5, "border {} against {}", d[1], square.ln());
        assert!(d[2] == 0.0 && d[3] == 0.0, "a square is symmetric");
    }

    #[test]
    fn standardised_targets_have_zero_mean_and_unit_spread_and_absent_views_count_for_nothing() {
        let rows: Vec<[f32; COUNT]> = (0..5).map(|i| std::array::from_fn(|k| (i * k) as f32)).collect();
        let s = Standardizer::fit(&rows).unwrap();
        assert_eq!(s.std[0], 1.0, "a constant descriptor keeps unit scale");
        let z: Vec<[f32; COUNT]> = rows.iter().map(|r| s.apply(r)).collect();
        for k in 1..COUNT {
            let m: f32 = z.iter().map(|r| r[k]).sum::<f32>() / 5.0;
            let v: f32 = z.iter().map(|r| r[k] * r[k]).sum::<f32>() / 5.0;
            assert!(m.abs() < 1e-5 && (v - 1.0).abs() < 1e-4, "descriptor {k}: mean {m}, variance {v}");
        }
        assert!(Standardizer::fit(&[]).is_none());
        let (t, p) = s.targets(&[Some(rows[4]), None], &Device::Cpu).unwrap();
        assert_eq!(p.to_vec1::<f32>().unwrap(), vec![1.0, 0.0]);
        // The loss reads only the first view: predicting its targets exactly gives 0 whatever the second is.
        let first = t.get(0).unwrap().unsqueeze(0).unwrap();
        let guess =
            Tensor::cat(&[first, Tensor::ones((1, COUNT), candle_core::DType::F32, &Device::Cpu).unwrap()], 0).unwrap();
        assert_eq!(loss(&guess, &t, &p).unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let zeros = Tensor::zeros((2, COUNT), candle_core::DType::F32, &Device::Cpu).unwrap();
        let want: f32 = s.apply(&rows[4]).iter().map(|v| v * v).sum::<f32>() / COUNT as f32;
        assert!((loss(&zeros, &t, &p).unwrap().to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
    }
}
