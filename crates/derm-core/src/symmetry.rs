//! The eight symmetries of the square, for test-time views.
//!
//! A model trained with random flips and quarter turns has learnt to ignore them; averaging its
//! predictions over the same symmetries at inference removes what it has not quite learnt.
//! [`Symmetry::group`] gives the views a training augmentation makes: every composition of the
//! flips and turns it draws (two for one flip, four for both flips or for quarter turns alone,
//! all eight for flips with quarter turns). A symmetry applies to an image or to the last two
//! dimensions (height, width) of a tensor, and [`Symmetry::undo`] maps a dense prediction of the
//! transformed tensor back onto the original pixels.

use candle_core::Tensor;
use image::{ImageBuffer, Pixel};

use crate::Result;

/// One symmetry of the square: flip left-right and/or top-bottom, then optionally swap the axes
/// (a mirror in the main diagonal). The eight combinations are the whole group; a quarter turn
/// clockwise is a top-bottom flip followed by the swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Symmetry {
    /// Swap the two axes after the flips (width becomes height).
    pub transpose: bool,
    /// Flip top-bottom.
    pub vflip: bool,
    /// Flip left-right.
    pub hflip: bool,
}

impl Symmetry {
    /// Leaves everything as it is.
    pub const IDENTITY: Symmetry = Symmetry { transpose: false, vflip: false, hflip: false };
    /// A quarter turn clockwise.
    pub const QUARTER_TURN: Symmetry = Symmetry { transpose: true, vflip: true, hflip: false };

    /// Symmetry `k` of the eight (taken modulo 8): bit 0 flips left-right, bit 1 top-bottom,
    /// bit 2 swaps the axes. 0-3 keep an image's width and height.
    pub fn from_index(k: usize) -> Symmetry {
        Symmetry { hflip: k & 1 != 0, vflip: k & 2 != 0, transpose: k & 4 != 0 }
    }

    /// The inverse of [`Symmetry::from_index`].
    pub fn index(self) -> usize {
        self.hflip as usize | (self.vflip as usize) << 1 | (self.transpose as usize) << 2
    }

    /// `self` and then `next`, as one symmetry.
    pub fn then(self, next: Symmetry) -> Symmetry {
        // After a swap of the axes, `next`'s flips act on the other axis: move them ahead of
        // the swap, where flips combine by parity, and so do the two swaps.
        let (h, v) = if self.transpose { (next.vflip, next.hflip) } else { (next.hflip, next.vflip) };
        Symmetry { hflip: self.hflip ^ h, vflip: self.vflip ^ v, transpose: self.transpose ^ next.transpose }
    }

    /// Every symmetry made by composing left-right flips (`hflip`), top-bottom flips (`vflip`)
    /// and quarter turns (`quarter_turns`): the views an augmentation drawing those makes. The
    /// identity comes first, the rest in index order.
    pub fn group(hflip: bool, vflip: bool, quarter_turns: bool) -> Vec<Symmetry> {
        let generators: Vec<Symmetry> = [
            (hflip, Symmetry { hflip: true, ..Symmetry::IDENTITY }),
            (vflip, Symmetry { vflip: true, ..Symmetry::IDENTITY }),
            (quarter_turns, Symmetry::QUARTER_TURN),
        ]
        .into_iter()
        .filter_map(|(on, g)| on.then_some(g))
        .collect();
        let mut found = vec![Symmetry::IDENTITY];
        let mut i = 0;
        while i < found.len() {
            for g in &generators {
                let s = found[i].then(*g);
                if !found.contains(&s) {
                    found.push(s);
                }
            }
            i += 1;
        }
        found.sort_by_key(|s| s.index());
        found
    }

    /// The symmetry applied to an image (any pixel type).
    pub fn image<P: Pixel + 'static>(self, img: &ImageBuffer<P, Vec<P::Subpixel>>) -> ImageBuffer<P, Vec<P::Subpixel>> {
        use image::imageops::{flip_horizontal, flip_vertical};
        let mut out = match (self.hflip, self.vflip) {
            (false, false) => img.clone(),
            (true, false) => flip_horizontal(img),
            (false, true) => flip_vertical(img),
            (true, true) => flip_vertical(&flip_horizontal(img)),
        };
        if self.transpose {
            let src = out;
            out = ImageBuffer::from_fn(src.height(), src.width(), |x, y| *src.get_pixel(y, x));
        }
        out
    }

    /// The symmetry applied to the last two dimensions (height, width) of a tensor of rank 2 or
    /// more.
    pub fn tensor(self, x: &Tensor) -> Result<Tensor> {
        let r = planar_rank(x)?;
        let mut out = x.clone();
        if self.hflip {
            out = reverse(&out, r - 1)?;
        }
        if self.vflip {
            out = reverse(&out, r - 2)?;
        }
        if self.transpose {
            out = out.transpose(r - 2, r - 1)?.contiguous()?;
        }
        Ok(out)
    }

    /// Maps a tensor made by [`Symmetry::tensor`] (or a dense prediction of one, same last two
    /// dimensions) back onto the original's pixels.
    pub fn undo(self, y: &Tensor) -> Result<Tensor> {
        let r = planar_rank(y)?;
        let mut out = y.clone();
        if self.transpose {
            out = out.transpose(r - 2, r - 1)?.contiguous()?;
        }
        if self.vflip {
            out = reverse(&out, r - 2)?;
        }
        if self.hflip {
            out = reverse(&out, r - 1)?;
        }
        Ok(out)
    }
}

/// The rank of a tensor that has a plane (height, width) in its last two dimensions.
fn planar_rank(x: &Tensor) -> Result<usize> {
    match x.rank() {
        r if r >= 2 => Ok(r),
        r => Err(crate::Error::invalid(format!("symmetry: a tensor of rank {r} has no image plane"))),
    }
}

/// `x` reversed along dimension `d`.
fn reverse(x: &Tensor, d: usize) -> Result<Tensor> {
    let n = x.dim(d)? as u32;
    let rev = Tensor::new((0..n).rev().collect::<Vec<u32>>(), x.device())?;
    Ok(x.index_select(&rev, d)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use image::{GrayImage, Luma};

    fn numbered(w: u32, h: u32) -> GrayImage {
        GrayImage::from_fn(w, h, |x, y| Luma([(w * y + x) as u8]))
    }

    #[test]
    fn the_eight_are_distinct_and_a_quarter_turn_is_image_rotate90() {
        let img = numbered(5, 3);
        let views: Vec<GrayImage> = (0..8).map(|k| Symmetry::from_index(k).image(&img)).collect();
        for (i, a) in views.iter().enumerate() {
            assert_eq!(Symmetry::from_index(i).index(), i);
            for b in &views[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(Symmetry::QUARTER_TURN.image(&img), image::imageops::rotate90(&img));
        assert_eq!(views[3], image::imageops::rotate180(&img));
        assert_eq!(views[4].dimensions(), (3, 5));
        assert_eq!(views[4].get_pixel(2, 1), img.get_pixel(1, 2), "the swap mirrors in the diagonal");
    }

    #[test]
    fn the_group_of_an_augmentation_is_closed_and_has_the_expected_size() {
        let size = |h, v, q| Symmetry::group(h, v, q).len();
        assert_eq!(size(false, false, false), 1);
        assert_eq!(size(true, false, false), 2);
        assert_eq!(size(true, true, false), 4);
        assert_eq!(size(false, false, true), 4);
        assert_eq!(size(true, false, true), 8);
        assert_eq!(size(true, true, true), 8);
        // Quarter turns alone are the four rotations: no mirror among them.
        let img = numbered(4, 4);
        let turns: Vec<GrayImage> = Symmetry::group(false, false, true).iter().map(|s| s.image(&img)).collect();
        let mut r = img.clone();
        for _ in 0..4 {
            assert!(turns.contains(&r));
            r = image::imageops::rotate90(&r);
        }
        for h in [false, true] {
            for v in [false, true] {
                for q in [false, true] {
                    let g = Symmetry::group(h, v, q);
                    assert_eq!(g[0], Symmetry::IDENTITY);
                    for a in &g {
                        for b in &g {
                            assert!(g.contains(&a.then(*b)), "{h} {v} {q}: not closed");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn composition_matches_applying_one_after_the_other() {
        let img = numbered(4, 4);
        for i in 0..8 {
            for j in 0..8 {
                let (a, b) = (Symmetry::from_index(i), Symmetry::from_index(j));
                assert_eq!(a.then(b).image(&img), b.image(&a.image(&img)), "{a:?} then {b:?}");
            }
        }
    }

    #[test]
    fn tensors_follow_images_and_undo_restores_them() {
        let line = Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(Symmetry::QUARTER_TURN.tensor(&line).is_err() && Symmetry::IDENTITY.undo(&line).is_err());
        let (w, h) = (5u32, 3u32);
        let img = numbered(w, h);
        let x =
            Tensor::from_vec(img.as_raw().iter().map(|&v| v as f32).collect::<Vec<_>>(), (1, 1, 3, 5), &Device::Cpu)
                .unwrap();
        for k in 0..8 {
            let s = Symmetry::from_index(k);
            let t = s.tensor(&x).unwrap();
            let want: Vec<f32> = s.image(&img).as_raw().iter().map(|&v| v as f32).collect();
            assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want, "{s:?}");
            let back = s.undo(&t).unwrap();
            assert_eq!(back.dims(), x.dims());
            assert_eq!(
                back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                img.as_raw().iter().map(|&v| v as f32).collect::<Vec<_>>()
            );
        }
    }
}
