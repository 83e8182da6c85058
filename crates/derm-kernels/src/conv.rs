//! A fast CPU 2-D convolution (groups 1), and its transpose, whose forward and backward are
//! all GEMMs.
//!
//! candle 0.11's CPU conv2d forward is a tiled im2col + GEMM, but its input gradient goes through
//! a naive `conv_transpose2d` loop (one dot product per output pixel) and its weight gradient
//! through a second conv2d with batch and channels swapped, so training a small-channel U-Net
//! runs at about 5 GFLOP/s on two cores (docs/candle-notes.md#cpu-convolution); its transposed
//! convolution (the U-Net decoder's upsampling) is that naive loop in the forward pass too. Here
//! the convolution is a custom op on (input, weight) whose three passes are all the same kind of
//! work:
//!
//! - forward: `out[n] = W · im2col(x[n])`, with `W` seen as an (O, C*KH*KW) matrix;
//! - input gradient: for stride 1 (and a square kernel), the forward convolution of `grad_out`
//!   with the flipped, transposed kernel; otherwise `col2im(W^T · grad_out[n])`, a GEMM followed
//!   by a scatter-add;
//! - weight gradient: `grad_W = sum_n grad_out[n] · im2row(x[n])`, a GEMM per image, where the
//!   column matrix is built patch-major from an (H, W, C) copy of the image so that the GEMM reads
//!   it without repacking; for stride 1, one GEMM per kernel tap on the padded image read in
//!   place, with no column matrix, or on planes of 64x64 and more (f32, AVX2 + FMA) dot products
//!   of the shifted rows for all taps at once (`shifted_dots`).
//!
//! [`conv2d_bias`] adds a per-channel bias and optionally a ReLU to each output tile right after
//! its GEMM, instead of in a pass of their own over the output.
//!
//! [`conv_transpose2d`] is the same three passes with the roles exchanged.
//!
//! Column matrices are built a few output rows at a time into a buffer that is reused for the
//! whole image, so they stay in cache between being written and being read by the GEMM. A 1x1
//! convolution with stride 1 and no padding needs no im2col: the image itself is the column
//! matrix. The work is spread over the rayon pool one image per task (the GEMMs then run
//! single-threaded); images left over when the batch does not divide evenly among the threads run
//! one at a time with multi-threaded GEMMs. Small planes (at most 196 output pixels per image,
//! ResNet's 14x14 and 7x7 stages) instead run per group of images, one GEMM on the group's column
//! matrices side by side; where half or more of such a stride-1 convolution's multiply-adds would
//! read padding (the U-Net bottleneck's dilation-4 convolution on 8x8 planes), the output pixels
//! are split into rectangles that read through the same kernel taps, and only the taps that read
//! the image are computed, one GEMM per (rectangle, tap).
//!
//! The GEMMs are the `gemm` crate's, the one candle itself uses, with its AVX-512 kernels enabled
//! (feature `x86-v4`, chosen at run time on CPUs that have them). The ops work in f32 and f64;
//! the backward ops have no second-order gradient. Results equal `Tensor::conv2d` (groups 1) and
//! `Tensor::conv_transpose2d` up to rounding, for any stride, padding, dilation and non-square
//! input. Grouped convolutions and tensors on other devices are left to candle (see
//! `ops::conv2d`).

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use crate::cpu::{as_f32, as_f32_mut, data};
use crate::shifted_dots::{shifted_dots, Rows};

type CResult<T> = candle_core::Result<T>;

/// The number of im2col elements per tile the tiler aims for (about 256 KiB in f32).
const TILE_ELEMS: usize = 1 << 16;
/// The fewest output pixels per tile, so that the GEMMs are never too thin to be efficient.
const MIN_TILE_PIXELS: usize = 256;
/// Convolutions with at most this many output pixels per image run as one GEMM per group of
/// images (column matrices side by side, channel-major outputs): per-image GEMMs a few dozen
/// columns wide pack the weight again for every image and, for the weight gradient, read and
/// write the whole accumulator per image (ResNet-50's 7x7 and 14x14 stages: 45-140 GFLOP/s per
/// image; `cargo run -p derm-kernels --example conv_phases`). Measured on the ResNet-50 step: 1380
/// ms with this bound, 1470 ms with none, 1400-1500 ms with 1024 (28x28 planes included).
const BATCHED_MAX_PIXELS: usize = 196;
/// A batched stride-1 convolution whose taps read padding for at least this fraction of its
/// multiply-adds skips them ([`Geo::skips_taps`]): the U-Net bottleneck's 3x3 convolution with
/// dilation 4 on 8x8 planes (56 % padding; forward 12.5-12.9 -> 8.2-9.1 ms, forward and both
/// gradients 40-47 -> 32-39 ms at batch 8, 512 -> 512 channels, interleaved best of nine). With
/// dilation 2 (31 %) the GEMMs per class are too thin to gain (21-23 ms either way), and ResNet-50's
/// 3x3 convolutions on 7x7 (18 %) and 14x14 planes (9 %) keep the single GEMM.
const TAP_SKIP_MIN_FRACTION: f64 = 0.5;
/// At most this many GEMM columns per image group of the batched path (bounds its column matrix).
const BATCHED_COLS: usize = 4096;

/// Stride, padding and dilation of a convolution; the same in both spatial directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    /// Implicit zero padding on each side.
    pub padding: usize,
    /// Step between windows.
    pub stride: usize,
    /// Spacing between kernel taps.
    pub dilation: usize,
}

/// Output pixels `ys` x `xs` (rows, columns) that all read the image through kernel rows `kys`
/// and columns `kxs` (each as first, end); see [`Geo::tap_classes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TapClass {
    ys: (usize, usize),
    xs: (usize, usize),
    kys: (usize, usize),
    kxs: (usize, usize),
}

impl TapClass {
    fn pixels(&self) -> usize {
        (self.ys.1 - self.ys.0) * (self.xs.1 - self.xs.0)
    }

    /// Kernel taps each pixel reads the image through.
    fn taps(&self) -> usize {
        (self.kys.1 - self.kys.0) * (self.kxs.1 - self.kxs.0)
    }

    /// Whether the class reads the image through tap (ky, kx).
    fn reads(&self, (ky, kx): (usize, usize)) -> bool {
        (self.kys.0..self.kys.1).contains(&ky) && (self.kxs.0..self.kxs.1).contains(&kx)
    }

    /// The class's output pixels as (row, column), row by row.
    fn coords(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (self.ys.0..self.ys.1).flat_map(move |y| (self.xs.0..self.xs.1).map(move |x| (y, x)))
    }

    /// The class's pixels of images `imgs` as (image, (row, column)), image by image: the order
    /// of its GEMM columns in a group.
    fn image_coords(&self, imgs: std::ops::Range<usize>) -> impl Iterator<Item = (usize, (usize, usize))> + '_ {
        imgs.flat_map(move |img| self.coords().map(move |c| (img, c)))
    }
}

/// The full geometry of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geo {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    s: usize,
    p: usize,
    d: usize,
    oh: usize,
    ow: usize,
}

impl Geo {
    fn new(x: (usize, usize, usize, usize), wt: (usize, usize, usize, usize), spec: ConvSpec) -> CResult<Self> {
        let (n, c, h, w) = x;
        let (o, wc, kh, kw) = wt;
        let ConvSpec { padding: p, stride: s, dilation: d } = spec;
        if wc != c {
            candle_core::bail!("conv2d: the input has {c} channels but the weight expects {wc} (groups 1)")
        }
        if s == 0 || d == 0 || kh == 0 || kw == 0 {
            candle_core::bail!("conv2d: stride, dilation and kernel size must be positive")
        }
        let (span_h, span_w) = (d * (kh - 1) + 1, d * (kw - 1) + 1);
        if h + 2 * p < span_h || w + 2 * p < span_w {
            candle_core::bail!("conv2d: input {h}x{w} (padding {p}) is smaller than the kernel span {span_h}x{span_w}")
        }
        let (oh, ow) = ((h + 2 * p - span_h) / s + 1, (w + 2 * p - span_w) / s + 1);
        Ok(Geo { n, c, h, w, o, kh, kw, s, p, d, oh, ow })
    }

    /// Rows of the column matrix: C * KH * KW.
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output pixels per image.
    fn pixels(&self) -> usize {
        self.oh * self.ow
    }

    /// One of three names by geometry (pointwise, stride 1, strided), for the kernel profile.
    fn kind(&self, names: [&'static str; 3]) -> &'static str {
        if self.is_pointwise() {
            names[0]
        } else if self.s == 1 {
            names[1]
        } else {
            names[2]
        }
    }

    /// Whether the column matrix is the image itself (1x1 kernel, stride 1, no padding).
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.s == 1 && self.p == 0
    }

    /// Whether the kernel tiles the input exactly (kernel = stride > 1, no padding or dilation, and
    /// the input a whole number of kernels): im2col is then a permutation of the image.
    fn is_patchify(&self) -> bool {
        self.s > 1
            && (self.kh, self.kw) == (self.s, self.s)
            && self.p == 0
            && self.d == 1
            && (self.h, self.w) == (self.oh * self.s, self.ow * self.s)
    }

    /// The kernel rows (`ky`) whose input row lies inside the image for output row `oy` (stride
    /// 1), as (first, end); the same for columns with `(w, kw)`.
    fn valid_taps(&self, o: usize, (len, taps): (usize, usize)) -> (usize, usize) {
        let ok = |t: usize| (o + t * self.d).checked_sub(self.p).is_some_and(|i| i < len);
        let lo = (0..taps).find(|&t| ok(t)).unwrap_or(taps);
        let hi = (lo..taps).find(|&t| !ok(t)).unwrap_or(taps);
        (lo, hi)
    }

    /// The output pixels of a stride-1 convolution split into rectangles within which every
    /// pixel reads the image through the same rectangle of kernel taps (the rest fall in the
    /// padding): runs of output rows with the same valid kernel rows, times runs of columns.
    fn tap_classes(&self) -> Vec<TapClass> {
        let runs = |out: usize, len: usize, taps: usize| {
            let mut v: Vec<((usize, usize), (usize, usize))> = Vec::new();
            for o in 0..out {
                let t = self.valid_taps(o, (len, taps));
                match v.last_mut() {
                    Some((span, last)) if *last == t => span.1 = o + 1,
                    _ => v.push(((o, o + 1), t)),
                }
            }
            v
        };
        let (rows, cols) = (runs(self.oh, self.h, self.kh), runs(self.ow, self.w, self.kw));
        let mut classes = Vec::new();
        for &(ys, kys) in &rows {
            for &(xs, kxs) in &cols {
                if kys.0 < kys.1 && kxs.0 < kxs.1 {
                    classes.push(TapClass { ys, xs, kys, kxs });
                }
            }
        }
        classes
    }

    /// Whether a batched stride-1 convolution skips the taps that read padding
    /// ([`TAP_SKIP_MIN_FRACTION`] of the multiply-adds or more).
    fn skips_taps(&self) -> bool {
        if self.s != 1 || !self.batched() || self.is_pointwise() {
            return false;
        }
        let valid: usize = self.tap_classes().iter().map(|c| c.pixels() * c.taps()).sum();
        let all = self.pixels() * self.kh * self.kw;
        (all - valid) as f64 >= TAP_SKIP_MIN_FRACTION * all as f64
    }

    /// Whether the convolution runs as GEMMs over groups of images ([`BATCHED_MAX_PIXELS`]).
    fn batched(&self) -> bool {
        self.n > 1 && self.pixels() <= BATCHED_MAX_PIXELS
    }

    /// Output rows per tile: enough for [`TILE_ELEMS`] column elements, at least
    /// [`MIN_TILE_PIXELS`] pixels, and the whole image for a pointwise convolution.
    fn tile_rows(&self) -> usize {
        if self.is_pointwise() {
            return self.oh;
        }
        let by_size = TILE_ELEMS / (self.k() * self.ow).max(1);
        let by_min = MIN_TILE_PIXELS.div_ceil(self.ow);
        by_size.max(by_min).clamp(1, self.oh)
    }

    /// The tiles of output rows, as (first row, end row).
    fn tiles(&self) -> Vec<(usize, usize)> {
        let step = self.tile_rows();
        (0..self.oh).step_by(step).map(|y0| (y0, (y0 + step).min(self.oh))).collect()
    }

    /// For kernel column `kx`, the output columns whose input column lies inside the image, as
    /// (first, end), and the input column of the first one.
    #[inline]
    fn x_span(&self, kx: usize) -> (usize, usize, usize) {
        let off = kx * self.d;
        // Output column ox reads input column ox * s + off - p. (This runs for every kernel tap of
        // every channel of every tile: no integer division for stride 1.)
        let div = |v: usize| if self.s == 1 { v } else { v.div_ceil(self.s) };
        let lo = if off >= self.p { 0 } else { div(self.p - off) };
        let hi = if self.w + self.p <= off { 0 } else { div(self.w + self.p - off) };
        let hi = hi.min(self.ow);
        let lo = lo.min(hi);
        (lo, hi, (lo * self.s + off).saturating_sub(self.p))
    }

    /// The input row read by output row `oy` at kernel row `ky`, if it lies inside the image.
    #[inline]
    fn in_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.s + ky * self.d).checked_sub(self.p).filter(|&iy| iy < self.h)
    }
}

/// Writes the im2col rows of one input channel (`plane`, H x W) for output rows `y0..y1` into
/// `dst`: KH * KW rows of `(y1 - y0) * OW` columns, `ld` elements apart. Every element of those
/// rows is written.
fn im2col_channel<T: WithDType>(plane: &[T], g: &Geo, (y0, y1): (usize, usize), dst: &mut [T], ld: usize) {
    let t = (y1 - y0) * g.ow;
    if g.is_patchify() && g.s == 2 {
        // A 2x2/2 kernel tiles the image: each input row splits into its even (kx = 0) and odd
        // (kx = 1) columns, read once for both.
        for ky in 0..2 {
            let (r0, r1) = dst[2 * ky * ld..].split_at_mut(ld);
            for (oy, (d0, d1)) in (y0..y1).zip(r0[..t].chunks_exact_mut(g.ow).zip(r1[..t].chunks_exact_mut(g.ow))) {
                let src = &plane[(2 * oy + ky) * g.w..(2 * oy + ky + 1) * g.w];
                for ((a, b), p) in d0.iter_mut().zip(d1.iter_mut()).zip(src.chunks_exact(2)) {
                    *a = p[0];
                    *b = p[1];
                }
            }
        }
        return;
    }
    let zero = T::zero();
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            let (lo, hi, ix0) = g.x_span(kx);
            let r = ky * g.kw + kx;
            let row = &mut dst[r * ld..r * ld + t];
            for (seg, oy) in row.chunks_exact_mut(g.ow).zip(y0..y1) {
                let Some(iy) = g.in_row(oy, ky) else {
                    seg.fill(zero);
                    continue;
                };
                let src = &plane[iy * g.w..(iy + 1) * g.w];
                seg[..lo].fill(zero);
                seg[hi..].fill(zero);
                if lo == hi {
                    continue;
                }
                if g.s == 1 {
                    seg[lo..hi].copy_from_slice(&src[ix0..ix0 + (hi - lo)]);
                } else {
                    for (v, &s) in seg[lo..hi].iter_mut().zip(src[ix0..].iter().step_by(g.s)) {
                        *v = s;
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col_channel`]: adds the column rows `src` (`ld` elements apart) of one
/// channel back into its input plane.
fn col2im_channel<T: WithDType>(src: &[T], g: &Geo, (y0, y1): (usize, usize), plane: &mut [T], ld: usize) {
    let t = (y1 - y0) * g.ow;
    if g.is_patchify() && g.s == 2 {
        // The even and odd columns of each input row come from two column rows, added in one pass.
        for ky in 0..2 {
            let (r0, r1) = (&src[2 * ky * ld..2 * ky * ld + t], &src[(2 * ky + 1) * ld..(2 * ky + 1) * ld + t]);
            for (oy, (s0, s1)) in (y0..y1).zip(r0.chunks_exact(g.ow).zip(r1.chunks_exact(g.ow))) {
                let dst = &mut plane[(2 * oy + ky) * g.w..(2 * oy + ky + 1) * g.w];
                for ((p, &a), &b) in dst.chunks_exact_mut(2).zip(s0).zip(s1) {
                    p[0] += a;
                    p[1] += b;
                }
            }
        }
        return;
    }
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            let (lo, hi, ix0) = g.x_span(kx);
            let r = ky * g.kw + kx;
            let row = &src[r * ld..r * ld + t];
            for (seg, oy) in row.chunks_exact(g.ow).zip(y0..y1) {
                let Some(iy) = g.in_row(oy, ky) else { continue };
                if lo == hi {
                    continue;
                }
                let dst = &mut plane[iy * g.w..(iy + 1) * g.w];
                if g.s == 1 {
                    for (d, &v) in dst[ix0..ix0 + (hi - lo)].iter_mut().zip(&seg[lo..hi]) {
                        *d += v;
                    }
                } else {
                    for (d, &v) in dst[ix0..].iter_mut().step_by(g.s).zip(&seg[lo..hi]) {
                        *d += v;
                    }
                }
            }
        }
    }
}

/// Builds the column matrix of image `x` for output rows `tile` into `col`, in parallel over
/// channels when `par` is set.
fn im2col<T: WithDType>(x: &[T], g: &Geo, tile: (usize, usize), col: &mut [T], par: bool) {
    let t = (tile.1 - tile.0) * g.ow;
    let chunk = g.kh * g.kw * t;
    let plane = g.h * g.w;
    if par {
        col.par_chunks_mut(chunk).zip(x.par_chunks(plane)).for_each(|(d, p)| im2col_channel(p, g, tile, d, t));
    } else {
        col.chunks_mut(chunk).zip(x.chunks(plane)).for_each(|(d, p)| im2col_channel(p, g, tile, d, t));
    }
}

/// Adds the column matrix `col` for output rows `tile` into image gradient `gx`, in parallel
/// over channels when `par` is set.
fn col2im<T: WithDType>(col: &[T], g: &Geo, tile: (usize, usize), gx: &mut [T], par: bool) {
    let t = (tile.1 - tile.0) * g.ow;
    let chunk = g.kh * g.kw * t;
    let plane = g.h * g.w;
    if par {
        gx.par_chunks_mut(plane).zip(col.par_chunks(chunk)).for_each(|(p, s)| col2im_channel(s, g, tile, p, t));
    } else {
        gx.chunks_mut(plane).zip(col.chunks(chunk)).for_each(|(p, s)| col2im_channel(s, g, tile, p, t));
    }
}

/// The stride-1 weight gradient runs as shifted dot products (`shifted_dots`) when an image has
/// at least this many padded pixels (64x64 and larger); below it, the GEMM crate's packed kernels
/// are as fast or faster. Measured on the U-Net's levels (batch 8, two threads, best of eight
/// interleaved runs): 32->32 and 64->32 at 128x128 164 and 162 GFLOP/s against 129 and 130 with
/// GEMMs; 64->64 at 64x64 171 against 165; 32x32 and 16x16 within 1-6 % either way.
const DOTS_MIN_DEPTH: usize = 4096;

/// What a forward convolution does to its output right after computing it, while the values
/// are in cache: add a per-channel bias, then a ReLU.
#[derive(Clone, Copy)]
struct Epilogue<'a, T> {
    bias: Option<&'a [T]>,
    relu: bool,
}

impl<T: WithDType> Epilogue<'_, T> {
    const NONE: Epilogue<'static, T> = Epilogue { bias: None, relu: false };

    fn is_none(&self) -> bool {
        self.bias.is_none() && !self.relu
    }

    /// Applies the epilogue to `v`, values of output channel `o`.
    fn apply(&self, v: &mut [T], o: usize) {
        let zero = T::zero();
        let b = self.bias.map_or(zero, |b| b[o]);
        if self.relu {
            for x in v {
                let t = *x + b;
                *x = if t > zero { t } else { zero };
            }
        } else if self.bias.is_some() {
            for x in v {
                *x += b;
            }
        }
    }

    /// Applies the epilogue to whole images of (O, P) values.
    fn apply_images(&self, out: &mut [T], o: usize, pix: usize) {
        if self.is_none() {
            return;
        }
        for (i, plane) in out.chunks_exact_mut(pix.max(1)).enumerate() {
            self.apply(plane, i % o.max(1));
        }
    }
}

/// A strided matrix view into a slice: element (i, j) is at `i * rs + j * cs`.
#[derive(Clone, Copy)]
struct View<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

/// The number of elements a `rows` x `cols` view with strides `rs` and `cs` reaches.
fn reach(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `dst (m x n, strides dst_rs and dst_cs) (+)= lhs (m x k) · rhs (k x n)`, adding to `dst` when
/// `accumulate` is set and overwriting it otherwise. All bounds are checked first.
///
/// The `gemm` crate packs an operand whose rows (lhs) or columns (rhs) are not contiguous with a
/// scalar gather, so callers lay out the big operand to need no packing: the lhs contiguous
/// down its columns (`rs == 1`), or, when the destination is row-major, the rhs contiguous along
/// its rows (the crate then transposes the whole product).
#[allow(clippy::too_many_arguments)]
fn gemm<T: WithDType>(
    dims: (usize, usize, usize),
    dst: &mut [T],
    dst_strides: (usize, usize),
    accumulate: bool,
    lhs: View<'_, T>,
    rhs: View<'_, T>,
    par: bool,
) -> CResult<()> {
    // SAFETY: `dst` is a live slice of `dst.len()` initialised elements, borrowed mutably, so it
    // overlaps neither operand.
    unsafe { gemm_raw(dims, (dst.as_mut_ptr(), dst.len()), dst_strides, accumulate, lhs, rhs, par) }
}

/// [`gemm`] into uninitialised memory, which it overwrites without reading: afterwards every
/// element of the m x n view of `dst` is initialised.
fn gemm_uninit<T: WithDType>(
    dims: (usize, usize, usize),
    dst: &mut [MaybeUninit<T>],
    dst_strides: (usize, usize),
    lhs: View<'_, T>,
    rhs: View<'_, T>,
    par: bool,
) -> CResult<()> {
    // SAFETY: `dst` is a live, mutably borrowed slice of `dst.len()` elements with the layout of
    // `T`; `gemm_raw` only writes it when `accumulate` is false (the GEMM crate stores without
    // loading when told not to read the destination, and the k = 0 case writes zeros).
    unsafe { gemm_raw(dims, (dst.as_mut_ptr().cast::<T>(), dst.len()), dst_strides, false, lhs, rhs, par) }
}

/// The body of [`gemm`] and [`gemm_uninit`].
///
/// # Safety
/// `dst` must be valid for reads and writes of `len` elements and overlap neither operand; its
/// elements may be uninitialised only when `accumulate` is false.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    (dst, len): (*mut T, usize),
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: View<'_, T>,
    rhs: View<'_, T>,
    par: bool,
) -> CResult<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if reach(m, n, dst_rs, dst_cs) > len
        || reach(m, k, lhs.rs, lhs.cs) > lhs.data.len()
        || reach(k, n, rhs.rs, rhs.cs) > rhs.data.len()
    {
        candle_core::bail!("conv2d: internal GEMM operand out of bounds ({m}x{n}x{k})")
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: the index is inside the view, checked above to fit in `len`.
                    unsafe { dst.add(i * dst_rs + j * dst_cs).write(T::zero()) };
                }
            }
        }
        return Ok(());
    }
    let parallelism =
        if par { gemm::Parallelism::Rayon(rayon::current_num_threads()) } else { gemm::Parallelism::None };
    // SAFETY: the three views were checked above to lie inside their buffers, the caller
    // guarantees that `dst` overlaps neither operand, and every stride fits in an isize because
    // it is at most a buffer length.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// Whether the rayon pool has more than one thread, so that parallel loops pay off.
fn multi_threaded() -> bool {
    rayon::current_num_threads() > 1
}

/// The number of images processed one per rayon task; the remaining images (fewer than the
/// thread count) go one at a time with multi-threaded GEMMs.
fn batch_split(n: usize) -> usize {
    let threads = rayon::current_num_threads();
    if threads <= 1 {
        0
    } else {
        n / threads * threads
    }
}

/// Forward of one image: `out = W · im2col(x)`, tile by tile, each tile followed by the
/// epilogue. Every element of `out` (O planes of OH x OW) is written, never read before.
fn fwd_image<T: WithDType>(
    x: &[T],
    wt: &[T],
    g: &Geo,
    out: &mut [MaybeUninit<T>],
    col: &mut Vec<T>,
    par: bool,
    epi: Epilogue<'_, T>,
) -> CResult<()> {
    let (k, pix) = (g.k(), g.pixels());
    for tile in g.tiles() {
        let t = (tile.1 - tile.0) * g.ow;
        let dst = &mut out[tile.0 * g.ow..];
        let w = View { data: wt, rs: k, cs: 1 };
        if g.is_pointwise() {
            gemm_uninit((g.o, t, k), dst, (pix, 1), w, View { data: &x[tile.0 * g.ow..], rs: pix, cs: 1 }, par)?;
        } else {
            col.resize(k * t, T::zero());
            im2col(x, g, tile, &mut col[..k * t], par);
            gemm_uninit((g.o, t, k), dst, (pix, 1), w, View { data: &col[..k * t], rs: t, cs: 1 }, par)?;
        }
        for o in (0..g.o).filter(|_| !epi.is_none()) {
            let part = &mut out[o * pix + tile.0 * g.ow..o * pix + tile.1 * g.ow];
            // SAFETY: the GEMM just wrote this tile's columns of every output plane, and
            // `MaybeUninit<T>` has the layout of `T`.
            let part = unsafe { &mut *(part as *mut [MaybeUninit<T>] as *mut [T]) };
            epi.apply(part, o);
        }
    }
    Ok(())
}

/// Input gradient of one image: `gx = col2im(W^T · go)`, tile by tile.
fn grad_input_image<T: WithDType>(
    go: &[T],
    wt: &[T],
    g: &Geo,
    gx: &mut [T],
    col: &mut Vec<T>,
    par: bool,
) -> CResult<()> {
    let (k, pix) = (g.k(), g.pixels());
    let wt_t = || View { data: wt, rs: 1, cs: k };
    if g.is_pointwise() {
        return gemm((g.c, pix, g.o), gx, (pix, 1), false, wt_t(), View { data: go, rs: pix, cs: 1 }, par);
    }
    gx.fill(T::zero());
    for tile in g.tiles() {
        let t = (tile.1 - tile.0) * g.ow;
        col.resize(k * t, T::zero());
        gemm(
            (k, t, g.o),
            &mut col[..k * t],
            (t, 1),
            false,
            wt_t(),
            View { data: &go[tile.0 * g.ow..], rs: pix, cs: 1 },
            par,
        )?;
        col2im(&col[..k * t], g, tile, gx, par);
    }
    Ok(())
}

/// Writes the patch-major column matrix of output rows `tile` into `dst`: one row of
/// KH * KW * C elements per output pixel, ordered (ky, kx, c), copied from the image `xt` in
/// (H, W, C) layout. Every element is written.
fn im2row<T: WithDType>(xt: &[T], g: &Geo, (y0, y1): (usize, usize), dst: &mut [T]) {
    let (c, zero) = (g.c, T::zero());
    let row_len = g.kh * g.kw * c;
    let mut rows = dst.chunks_exact_mut(row_len);
    for oy in y0..y1 {
        for ox in 0..g.ow {
            let Some(row) = rows.next() else { return };
            for (ky, taps) in row.chunks_exact_mut(g.kw * c).enumerate() {
                let Some(iy) = g.in_row(oy, ky) else {
                    taps.fill(zero);
                    continue;
                };
                let row_in = &xt[iy * g.w * c..(iy + 1) * g.w * c];
                // With dilation 1 and the whole window inside the image, the KW taps are one
                // contiguous run of the (H, W, C) image.
                if let Some(ix0) = (ox * g.s).checked_sub(g.p).filter(|&ix| g.d == 1 && ix + g.kw <= g.w) {
                    taps.copy_from_slice(&row_in[ix0 * c..(ix0 + g.kw) * c]);
                    continue;
                }
                for (kx, tap) in taps.chunks_exact_mut(c).enumerate() {
                    match (ox * g.s + kx * g.d).checked_sub(g.p).filter(|&ix| ix < g.w) {
                        Some(ix) => tap.copy_from_slice(&row_in[ix * c..(ix + 1) * c]),
                        None => tap.fill(zero),
                    }
                }
            }
        }
    }
}

/// Transposes a (C, H*W) image into (H*W, C) in `dst`.
fn to_hwc<T: WithDType>(x: &[T], c: usize, dst: &mut [T]) {
    let hw = x.len() / c.max(1);
    // Blocks of 32 pixels keep both the reads and the writes within a few cache lines per channel.
    const B: usize = 32;
    for (bi, blk) in dst.chunks_mut(B * c).enumerate() {
        for (ci, plane) in x.chunks_exact(hw).enumerate() {
            let src = &plane[bi * B..(bi * B + B).min(hw)];
            for (d, &v) in blk.iter_mut().skip(ci).step_by(c).zip(src) {
                *d = v;
            }
        }
    }
}

/// Per-task scratch space, reused across the images and tiles a task handles.
struct Scratch<T> {
    col: Vec<T>,
    hwc: Vec<T>,
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Scratch { col: Vec::new(), hwc: Vec::new() }
    }
}

/// Weight gradient of one image, added to `acc`, which holds the gradient as (O, KH, KW, C):
/// `acc += go · im2row(x)`, tile by tile. The column matrix is patch-major so that the GEMM reads
/// it as a column-contiguous lhs without packing: `acc^T (K x O) += im2row^T (K x T) · go^T`.
fn grad_weight_image<T: WithDType>(
    x: &[T],
    go: &[T],
    g: &Geo,
    acc: &mut [T],
    sc: &mut Scratch<T>,
    par: bool,
) -> CResult<()> {
    let (k, pix) = (g.k(), g.pixels());
    if g.is_pointwise() {
        // acc (O x C) += go (O x P) · x^T (P x C), both read in place.
        let go_v = View { data: go, rs: pix, cs: 1 };
        let x_t = View { data: x, rs: 1, cs: pix };
        return gemm((g.o, k, pix), acc, (k, 1), true, go_v, x_t, par);
    }
    if g.s == 1 {
        return grad_weight_shifted(x, go, g, acc, sc, par);
    }
    sc.hwc.resize(x.len(), T::zero());
    to_hwc(x, g.c, &mut sc.hwc);
    for tile in g.tiles() {
        let t = (tile.1 - tile.0) * g.ow;
        let go_t = View { data: &go[tile.0 * g.ow..], rs: 1, cs: pix };
        sc.col.resize(k * t, T::zero());
        im2row(&sc.hwc, g, tile, &mut sc.col[..k * t]);
        gemm((k, g.o, t), acc, (1, k), true, View { data: &sc.col[..k * t], rs: 1, cs: k }, go_t, par)?;
    }
    Ok(())
}

/// Weight gradient of one image for a stride-1 convolution, without a column matrix. On the
/// input padded to `Hp x Wp` and laid out flat, tap (ky, kx) of output pixel (y, x) reads
/// `x_pad[c][(y + ky d) Wp + x + kx d]`: with the output gradient also laid out at the padded
/// width (zeros in the extra columns), each tap's gradient is one GEMM over the flat pixel index
/// `q = y Wp + x` of two operands read in place: `acc[:, tap, :] (O x C) += go_pad (O x Q) ·
/// x_pad[:, q + offset]^T (Q x C)`. In f32 on AVX2 + FMA with planes of at least
/// [`DOTS_MIN_DEPTH`] pixels, all taps are computed at once as dot products of the shifted rows
/// (`shifted_dots`), with no packing; otherwise one GEMM per tap.
fn grad_weight_shifted<T: WithDType>(
    x: &[T],
    go: &[T],
    g: &Geo,
    acc: &mut [T],
    sc: &mut Scratch<T>,
    par: bool,
) -> CResult<()> {
    let (hp, wp) = (g.h + 2 * g.p, g.w + 2 * g.p);
    // The flat pixel range, rounded up to whole vectors (the output gradient is zero beyond it);
    // each padded plane is followed by the elements the last taps reach from there.
    let q = (g.oh * wp).next_multiple_of(8);
    let offs = tap_offsets(g, wp);
    let plane = (q + offs.iter().copied().max().unwrap_or(0)).max(hp * wp);
    // The scratch buffers serve every image of one convolution: their padding is zeroed when
    // they are first sized and never written after, so each image only copies its interior.
    if sc.hwc.len() != g.c * plane || sc.col.len() != g.o * q {
        sc.hwc.clear();
        sc.hwc.resize(g.c * plane, T::zero());
        sc.col.clear();
        sc.col.resize(g.o * q, T::zero());
    }
    pad_planes(x, g, plane, &mut sc.hwc);
    for (oi, src) in go.chunks_exact(g.pixels()).enumerate() {
        let dst = &mut sc.col[oi * q..(oi + 1) * q];
        for (y, row) in src.chunks_exact(g.ow).enumerate() {
            dst[y * wp..y * wp + g.ow].copy_from_slice(row);
        }
    }
    let k = g.k();
    let dots = q >= DOTS_MIN_DEPTH;
    if let (true, Some(a), Some(b), Some(acc)) = (dots, as_f32(&sc.col), as_f32(&sc.hwc), as_f32_mut(acc)) {
        let (a, b) = (Rows { data: a, rows: g.o, ld: q }, Rows { data: b, rows: g.c, ld: plane });
        if shifted_dots(a, b, &offs, q, acc, k, par) {
            return Ok(());
        }
    }
    let go_v = View { data: &sc.col, rs: q, cs: 1 };
    for (tap, &off) in offs.iter().enumerate() {
        let x_v = View { data: &sc.hwc[off..], rs: 1, cs: plane };
        gemm((g.o, g.c, q), &mut acc[tap * g.c..], (k, 1), true, go_v, x_v, par)?;
    }
    Ok(())
}

/// Copies each channel of the image `x` into the interior of its padded plane (`Hp x Wp`, laid
/// out flat, `plane` elements apart) in `dst`; the padding is left as it is.
fn pad_planes<T: WithDType>(x: &[T], g: &Geo, plane: usize, dst: &mut [T]) {
    let wp = g.w + 2 * g.p;
    for (ci, src) in x.chunks_exact((g.h * g.w).max(1)).enumerate() {
        let dst = &mut dst[ci * plane..];
        for (y, row) in src.chunks_exact(g.w.max(1)).enumerate() {
            let o = (y + g.p) * wp + g.p;
            dst[o..o + g.w].copy_from_slice(row);
        }
    }
}

/// The flat offsets of the kernel taps on a padded plane of width `wp`, in (ky, kx) order.
fn tap_offsets(g: &Geo, wp: usize) -> Vec<usize> {
    (0..g.kh).flat_map(|ky| (0..g.kw).map(move |kx| ky * g.d * wp + kx * g.d)).collect()
}

/// Reorders a weight gradient from (O, KH, KW, C) to candle's (O, C, KH, KW).
fn from_okkc<T: WithDType>(acc: &[T], g: &Geo) -> Vec<T> {
    let kk = g.kh * g.kw;
    let mut gw = vec![T::zero(); acc.len()];
    for (dst, src) in gw.chunks_exact_mut(g.k()).zip(acc.chunks_exact(g.k())) {
        for (tap, taps) in src.chunks_exact(g.c).enumerate() {
            for (ci, &v) in taps.iter().enumerate() {
                dst[ci * kk + tap] = v;
            }
        }
    }
    gw
}

/// Maps each of `n` images of `src` (`src_len` values each) to its `out_len` values of a new
/// vector with `f(src_image, out_image, scratch, par)`: whole images one per rayon task with
/// single-threaded GEMMs, and the few left over (fewer than the threads) one at a time with
/// multi-threaded GEMMs. `f` gets its output image uninitialised (a pass that accumulates
/// zeroes it first with [`zeroed`], in its task, just before use).
///
/// # Safety
/// When it returns `Ok`, `f` must have initialised every element of the output image it was given.
unsafe fn per_image<T: WithDType>(
    src: &[T],
    src_len: usize,
    n: usize,
    out_len: usize,
    f: impl Fn(&[T], &mut [MaybeUninit<T>], &mut Vec<T>, bool) -> CResult<()> + Sync,
) -> CResult<Vec<T>> {
    let total = n * out_len;
    if src.len() != n * src_len {
        candle_core::bail!("conv2d: {} input values for {n} images of {src_len}", src.len())
    }
    if src_len == 0 || out_len == 0 {
        return Ok(vec![T::zero(); total]);
    }
    let mut out: Vec<T> = Vec::with_capacity(total);
    let split = batch_split(n);
    let (out_par, out_seq) = out.spare_capacity_mut()[..total].split_at_mut(split * out_len);
    out_par
        .par_chunks_mut(out_len)
        .zip(src.par_chunks(src_len))
        .try_for_each_init(Vec::new, |col, (o, x)| f(x, o, col, false))?;
    let mut col = Vec::new();
    for (o, x) in out_seq.chunks_mut(out_len).zip(src[split * src_len..].chunks(src_len)) {
        f(x, o, &mut col, multi_threaded())?;
    }
    // SAFETY: every call of `f` returned `Ok`, so (the caller's contract) each initialised its
    // chunk, and both zips pair all `n` output chunks of the first `total` elements with an image,
    // as `src` holds exactly `n` images of `src_len`.
    unsafe { out.set_len(total) };
    Ok(out)
}

/// Zero-fills uninitialised memory and hands it out as initialised.
fn zeroed<T: WithDType>(chunk: &mut [MaybeUninit<T>]) -> &mut [T] {
    chunk.fill(MaybeUninit::new(T::zero()));
    // SAFETY: every element was just written, and `MaybeUninit<T>` has the layout of `T`.
    unsafe { &mut *(chunk as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// An (N, C, P) batch laid out channel-major, (C, N * P).
fn to_channel_major<T: WithDType>(x: &[T], (n, c, p): (usize, usize, usize)) -> Vec<T> {
    let mut out = vec![T::zero(); n * c * p];
    for (ci, dst) in out.chunks_exact_mut((n * p).max(1)).enumerate() {
        for (ni, d) in dst.chunks_exact_mut(p.max(1)).enumerate() {
            d.copy_from_slice(&x[(ni * c + ci) * p..(ni * c + ci + 1) * p]);
        }
    }
    out
}

/// Writes a channel-major (C, N * P) batch into `out` as (N, C, P).
fn from_channel_major<T: WithDType>(b: &[T], (n, c, p): (usize, usize, usize), out: &mut [T]) {
    for (ni, dst) in out[..n * c * p].chunks_exact_mut((c * p).max(1)).enumerate() {
        for (ci, d) in dst.chunks_exact_mut(p.max(1)).enumerate() {
            d.copy_from_slice(&b[ci * n * p + ni * p..ci * n * p + (ni + 1) * p]);
        }
    }
}

/// The column matrix of images `n0..n1` side by side: K rows of `(n1 - n0) * P` columns, image
/// by image.
fn group_columns<T: WithDType>(x: &[T], g: &Geo, (n0, n1): (usize, usize)) -> Vec<T> {
    let (pix, hw, kk) = (g.pixels(), g.h * g.w, g.kh * g.kw);
    let np = (n1 - n0) * pix;
    let mut col = vec![T::zero(); g.k() * np];
    for (ci, blk) in col.chunks_exact_mut((kk * np).max(1)).enumerate() {
        for (j, ni) in (n0..n1).enumerate() {
            let plane = &x[(ni * g.c + ci) * hw..(ni * g.c + ci + 1) * hw];
            im2col_channel(plane, g, (0, g.oh), &mut blk[j * pix..], np);
        }
    }
    col
}

/// Images per group of a [`Geo::batched`] convolution: the batch split evenly among the rayon
/// threads, at most [`BATCHED_COLS`] GEMM columns per group.
fn group_size(g: &Geo) -> usize {
    let per_thread = g.n.div_ceil(rayon::current_num_threads().max(1));
    per_thread.min(BATCHED_COLS / g.pixels().max(1)).max(1)
}

// A batched convolution (`Geo::batched`) runs per group of images (`group_size`), the groups in
// parallel, each one single-threaded GEMM on the group's column matrix and channel-major output
// (gradient): wider GEMMs than per image, and the weight gradient is one accumulation per group.
// The input gradient is batched only for pointwise convolutions, where its col2im is a copy.

// Tap skipping (`Geo::skips_taps`): the group's output pixels are ordered class by class
// (`Geo::tap_classes`), image by image within a class, so that each class is a run of GEMM
// columns; each (class, valid tap) pair is then one GEMM with depth C on the input pixels that tap
// reads, gathered, and the taps that read only padding are never computed.

/// The (KH*KW, O, C) tap-major copy of an (O, C, KH, KW) kernel.
fn tap_major<T: WithDType>(wt: &[T], g: &Geo) -> Vec<T> {
    let kk = g.kh * g.kw;
    let mut t = vec![T::zero(); wt.len()];
    t.par_chunks_mut((g.o * g.c).max(1)).enumerate().for_each(|(j, dst)| {
        for (d, &v) in dst.iter_mut().zip(wt.iter().skip(j).step_by(kk)) {
            *d = v;
        }
    });
    t
}

/// Into columns `col0..` of `dst` (C rows, `ld` apart): the input pixels that tap (ky, kx) reads
/// for the output pixels of `cl`, images `n0..n1` (`(n1 - n0) * cl.pixels()` columns).
#[allow(clippy::too_many_arguments)]
fn gather_tap<T: WithDType>(
    x: &[T],
    g: &Geo,
    (n0, n1): (usize, usize),
    cl: &TapClass,
    (ky, kx): (usize, usize),
    dst: &mut [T],
    (ld, col0): (usize, usize),
) {
    let (hw, nx) = (g.h * g.w, cl.xs.1 - cl.xs.0);
    let ix0 = cl.xs.0 + kx * g.d - g.p;
    for ci in 0..g.c {
        let mut col = ci * ld + col0;
        for ni in n0..n1 {
            let plane = &x[(ni * g.c + ci) * hw..(ni * g.c + ci + 1) * hw];
            for y in cl.ys.0..cl.ys.1 {
                let iy = y + ky * g.d - g.p;
                dst[col..col + nx].copy_from_slice(&plane[iy * g.w + ix0..iy * g.w + ix0 + nx]);
                col += nx;
            }
        }
    }
}

/// The first GEMM column of each class in a group of `imgs` images.
fn class_offsets(classes: &[TapClass], imgs: usize) -> Vec<usize> {
    classes.iter().scan(0, |off, c| Some(std::mem::replace(off, *off + imgs * c.pixels()))).collect()
}

fn tap_skip_fwd<T: WithDType>(x: &[T], wt: &[T], g: &Geo, epi: Epilogue<'_, T>) -> CResult<Vec<T>> {
    let (pix, step, classes) = (g.pixels(), group_size(g), g.tap_classes());
    let wtap = tap_major(wt, g);
    let mut out = vec![T::zero(); g.n * g.o * pix];
    out.par_chunks_mut((step * g.o * pix).max(1)).enumerate().try_for_each(|(i, o)| {
        let (n0, n1) = (i * step, ((i + 1) * step).min(g.n));
        let np = (n1 - n0) * pix;
        let offs = class_offsets(&classes, n1 - n0);
        let (mut ob, mut buf) = (vec![T::zero(); g.o * np], Vec::new());
        for (cl, &off) in classes.iter().zip(&offs) {
            let ncl = (n1 - n0) * cl.pixels();
            for ky in cl.kys.0..cl.kys.1 {
                for kx in cl.kxs.0..cl.kxs.1 {
                    buf.resize(g.c * ncl, T::zero());
                    gather_tap(x, g, (n0, n1), cl, (ky, kx), &mut buf, (ncl, 0));
                    let t = ky * g.kw + kx;
                    let w = View { data: &wtap[t * g.o * g.c..(t + 1) * g.o * g.c], rs: g.c, cs: 1 };
                    let b = View { data: &buf, rs: ncl, cs: 1 };
                    gemm((g.o, ncl, g.c), &mut ob[off..], (np, 1), true, w, b, false)?;
                }
            }
        }
        // Class-ordered channel-major columns back to (N, O, OH, OW).
        for oi in 0..g.o {
            for (cl, &off) in classes.iter().zip(&offs) {
                let src = &ob[oi * np + off..];
                for (&v, (img, (y, x))) in src.iter().zip(cl.image_coords(0..n1 - n0)) {
                    o[(img * g.o + oi) * pix + y * g.ow + x] = v;
                }
            }
        }
        epi.apply_images(o, g.o, pix);
        Ok::<_, candle_core::Error>(())
    })?;
    Ok(out)
}

fn tap_skip_grad_weight<T: WithDType>(x: &[T], go: &[T], g: &Geo) -> CResult<Vec<T>> {
    let (pix, step, classes, kk) = (g.pixels(), group_size(g), g.tap_classes(), g.kh * g.kw);
    let starts: Vec<usize> = (0..g.n).step_by(step).collect();
    // Per tap t, acc[t] is gw_t^T, (C, O): gw_t (O x C) += go (O x class pixels) · gathered^T.
    let acc = accumulate(starts.par_iter(), kk * g.c * g.o, |acc, _: &mut (), &n0| {
        let n1 = (n0 + step).min(g.n);
        let offs = class_offsets(&classes, n1 - n0);
        // The group's output gradient pixel-major in class order, so that it is the GEMM's lhs
        // with contiguous columns.
        let mut got = vec![T::zero(); (n1 - n0) * pix * g.o];
        for (cl, &off) in classes.iter().zip(&offs) {
            for (j, (img, (y, x))) in cl.image_coords(n0..n1).enumerate() {
                let row = &mut got[(off + j) * g.o..(off + j + 1) * g.o];
                for (oi, v) in row.iter_mut().enumerate() {
                    *v = go[(img * g.o + oi) * pix + y * g.ow + x];
                }
            }
        }
        // One GEMM per tap over all the classes that read through it, so that its depth is
        // every such pixel of the group (per class it would be a few dozen).
        let (mut lhs, mut rhs) = (Vec::new(), Vec::new());
        for (ky, kx) in (0..g.kh).flat_map(|ky| (0..g.kw).map(move |kx| (ky, kx))) {
            let nv: usize = classes.iter().filter(|c| c.reads((ky, kx))).map(|c| (n1 - n0) * c.pixels()).sum();
            if nv == 0 {
                continue;
            }
            lhs.clear();
            rhs.resize(g.c * nv, T::zero());
            let mut col0 = 0;
            for (cl, &off) in classes.iter().zip(&offs).filter(|(c, _)| c.reads((ky, kx))) {
                let ncl = (n1 - n0) * cl.pixels();
                lhs.extend_from_slice(&got[off * g.o..(off + ncl) * g.o]);
                gather_tap(x, g, (n0, n1), cl, (ky, kx), &mut rhs, (nv, col0));
                col0 += ncl;
            }
            let t = ky * g.kw + kx;
            let (l, r) = (View { data: &lhs, rs: 1, cs: g.o }, View { data: &rhs, rs: 1, cs: nv });
            gemm((g.o, g.c, nv), &mut acc[t * g.c * g.o..], (1, g.o), true, l, r, false)?;
        }
        Ok(())
    })?;
    let mut gw = vec![T::zero(); acc.len()];
    for (t, per_tap) in acc.chunks_exact((g.c * g.o).max(1)).enumerate() {
        for (ci, row) in per_tap.chunks_exact(g.o.max(1)).enumerate() {
            for (oi, &v) in row.iter().enumerate() {
                gw[(oi * g.c + ci) * kk + t] = v;
            }
        }
    }
    Ok(gw)
}

fn batched_fwd<T: WithDType>(x: &[T], wt: &[T], g: &Geo, epi: Epilogue<'_, T>) -> CResult<Vec<T>> {
    if g.skips_taps() {
        return tap_skip_fwd(x, wt, g, epi);
    }
    let (k, pix, step) = (g.k(), g.pixels(), group_size(g));
    let mut out = vec![T::zero(); g.n * g.o * pix];
    out.par_chunks_mut((step * g.o * pix).max(1)).enumerate().try_for_each(|(i, o)| {
        let (n0, n1) = (i * step, ((i + 1) * step).min(g.n));
        let np = (n1 - n0) * pix;
        let col = group_columns(x, g, (n0, n1));
        let mut ob = vec![T::zero(); g.o * np];
        let (w, c) = (View { data: wt, rs: k, cs: 1 }, View { data: &col, rs: np, cs: 1 });
        gemm((g.o, np, k), &mut ob, (np, 1), false, w, c, false)?;
        from_channel_major(&ob, (n1 - n0, g.o, pix), o);
        epi.apply_images(o, g.o, pix);
        Ok::<_, candle_core::Error>(())
    })?;
    Ok(out)
}

fn batched_grad_input<T: WithDType>(wt: &[T], go: &[T], g: &Geo) -> CResult<Vec<T>> {
    let (k, pix, hw, kk, step) = (g.k(), g.pixels(), g.h * g.w, g.kh * g.kw, group_size(g));
    let mut gx = vec![T::zero(); g.n * g.c * hw];
    gx.par_chunks_mut((step * g.c * hw).max(1)).enumerate().try_for_each(|(i, gxg)| {
        let (n0, n1) = (i * step, ((i + 1) * step).min(g.n));
        let np = (n1 - n0) * pix;
        let gob = to_channel_major(&go[n0 * g.o * pix..n1 * g.o * pix], (n1 - n0, g.o, pix));
        let mut col = vec![T::zero(); k * np];
        let (w_t, gv) = (View { data: wt, rs: 1, cs: k }, View { data: &gob, rs: np, cs: 1 });
        gemm((k, np, g.o), &mut col, (np, 1), false, w_t, gv, false)?;
        for (i, plane) in gxg.chunks_exact_mut(hw.max(1)).enumerate() {
            let (j, ci) = (i / g.c, i % g.c);
            col2im_channel(&col[ci * kk * np + j * pix..], g, (0, g.oh), plane, np);
        }
        Ok::<_, candle_core::Error>(())
    })?;
    Ok(gx)
}

/// Sums the contributions of `items` to a weight gradient of `len` values: `f(acc, scratch,
/// item)` adds one item into its block's accumulator (each block with its own scratch `S`).
///
/// The items are cut into one contiguous block per rayon thread and the blocks' sums are added
/// in block order, so the result is the same bit for bit from run to run (for a given thread
/// count). rayon's `fold`/`reduce` group items as work stealing happens to, which made two runs
/// with the same seed drift apart in the last bits (seen on the DCGAN's batch of 64).
fn accumulate<T, I, S>(
    items: I,
    len: usize,
    f: impl Fn(&mut [T], &mut S, I::Item) -> CResult<()> + Sync + Send,
) -> CResult<Vec<T>>
where
    T: WithDType,
    I: IndexedParallelIterator,
    S: Default + Send,
{
    let n = items.len();
    if n == 0 {
        return Ok(vec![T::zero(); len]);
    }
    let blocks = rayon::current_num_threads().clamp(1, n);
    let partial = items
        .chunks(n.div_ceil(blocks))
        .map(|block| {
            let (mut acc, mut sc) = (vec![T::zero(); len], S::default());
            for item in block {
                f(&mut acc, &mut sc, item)?;
            }
            Ok(acc)
        })
        .collect::<CResult<Vec<Vec<T>>>>()?;
    let mut parts = partial.into_iter();
    let mut total = parts.next().unwrap_or_else(|| vec![T::zero(); len]);
    for p in parts {
        total.iter_mut().zip(&p).for_each(|(a, &b)| *a += b);
    }
    Ok(total)
}

fn batched_grad_weight<T: WithDType>(x: &[T], go: &[T], g: &Geo) -> CResult<Vec<T>> {
    if g.skips_taps() {
        return tap_skip_grad_weight(x, go, g);
    }
    let (k, pix, step) = (g.k(), g.pixels(), group_size(g));
    // gw (O x K) += go (O x NP) · col^T (NP x K), group by group, one accumulator per rayon
    // task; K is ordered (c, ky, kx), so the result is the (O, C, KH, KW) weight layout.
    let starts: Vec<usize> = (0..g.n).step_by(step).collect();
    accumulate(starts.par_iter(), g.o * k, |acc, _: &mut (), &n0| {
        let n1 = (n0 + step).min(g.n);
        let np = (n1 - n0) * pix;
        let col = group_columns(x, g, (n0, n1));
        let gob = to_channel_major(&go[n0 * g.o * pix..n1 * g.o * pix], (n1 - n0, g.o, pix));
        let (gv, c_t) = (View { data: &gob, rs: np, cs: 1 }, View { data: &col, rs: 1, cs: np });
        gemm((g.o, k, np), acc, (k, 1), true, gv, c_t, false)
    })
}

fn conv_fwd<T: WithDType>(x: &[T], wt: &[T], g: &Geo, epi: Epilogue<'_, T>) -> CResult<Vec<T>> {
    if g.batched() {
        return batched_fwd(x, wt, g, epi);
    }
    let (xi, oi) = (g.c * g.h * g.w, g.o * g.pixels());
    // SAFETY: `fwd_image` writes every element of its output image.
    unsafe { per_image(x, xi, g.n, oi, |x, o, col, par| fwd_image(x, wt, g, o, col, par, epi)) }
}

/// For a stride-1 convolution with a square kernel and padding at most the kernel span, the
/// geometry of the equivalent forward convolution that computes the input gradient: the output
/// gradient correlated with the flipped, transposed kernel under padding `d * (k - 1) - p`.
fn transposed_geo(g: &Geo) -> Option<Geo> {
    let span = g.d * (g.kh - 1);
    if g.s != 1 || g.kh != g.kw || g.p > span || g.is_pointwise() {
        return None;
    }
    let spec = ConvSpec { padding: span - g.p, stride: 1, dilation: g.d };
    let t = Geo::new((g.n, g.o, g.oh, g.ow), (g.c, g.o, g.kh, g.kw), spec).ok()?;
    (t.oh == g.h && t.ow == g.w).then_some(t)
}

/// The (C, O, KH, KW) kernel flipped in both spatial directions, from the (O, C, KH, KW) one.
fn flip_transpose<T: WithDType>(wt: &[T], g: &Geo) -> Vec<T> {
    let kk = g.kh * g.kw;
    let mut f = vec![T::zero(); wt.len()];
    for (ci, dst) in f.chunks_exact_mut(g.o * kk).enumerate() {
        for (oi, dk) in dst.chunks_exact_mut(kk).enumerate() {
            let src = &wt[(oi * g.c + ci) * kk..(oi * g.c + ci + 1) * kk];
            for (d, &v) in dk.iter_mut().zip(src.iter().rev()) {
                *d = v;
            }
        }
    }
    f
}

fn conv_grad_input<T: WithDType>(wt: &[T], go: &[T], g: &Geo) -> CResult<Vec<T>> {
    if g.batched() && g.is_pointwise() {
        return batched_grad_input(wt, go, g);
    }
    if let Some(t) = transposed_geo(g) {
        return conv_fwd(go, &flip_transpose(wt, g), &t, Epilogue::NONE);
    }
    let (xi, oi) = (g.c * g.h * g.w, g.o * g.pixels());
    // SAFETY: each input-gradient image is zeroed before `grad_input_image` adds into it.
    unsafe { per_image(go, oi, g.n, xi, |go, gx, col, par| grad_input_image(go, wt, g, zeroed(gx), col, par)) }
}

/// Output pixels per image from which [`patchify_grad_weight`] runs: the U-Net's 2x2/2
/// transposed convolutions, best of eight interleaved runs over three: 10-20 % faster than the
/// GEMM paths with 1024 and 4096 pixels, about even with 256, and more than twice as slow with 64
/// (eight values per dot product leave the kernel no work between its reductions).
const PATCHIFY_DOTS_MIN_PIXELS: usize = 1024;

/// The weight gradient of a convolution whose kernel tiles the image ([`Geo::is_patchify`], the
/// equivalent convolution of a U-Net decoder's 2x2/2 transposed convolution): per image, the
/// column matrix (a permutation of the image) and `gw (O x K) += go (O x P) · col^T`, a product
/// with a small result and a deep sum that `shifted_dots` computes without packing (the GEMM
/// crate: 60-100 GFLOP/s on these shapes). f32 on AVX2 + FMA with a multiple of 8 output
/// pixels; `None` elsewhere.
fn patchify_grad_weight<T: WithDType>(x: &[T], go: &[T], g: &Geo) -> Option<CResult<Vec<T>>> {
    let (k, pix) = (g.k(), g.pixels());
    if !g.is_patchify()
        || !pix.is_multiple_of(8)
        || pix < PATCHIFY_DOTS_MIN_PIXELS
        || as_f32(x).is_none()
        || !crate::shifted_dots::available()
    {
        return None;
    }
    let (xi, oi) = (g.c * g.h * g.w, g.o * pix);
    let images = x.par_chunks(xi).zip(go.par_chunks(oi));
    Some(accumulate(images, g.o * k, |acc, col: &mut Vec<T>, (x, go)| {
        col.resize(k * pix, T::zero());
        im2col(x, g, (0, g.oh), col, false);
        let (Some(a), Some(b), Some(acc)) = (as_f32(go), as_f32(col), as_f32_mut(acc)) else {
            candle_core::bail!("conv2d: f32 operands expected")
        };
        let (a, b) = (Rows { data: a, rows: g.o, ld: pix }, Rows { data: b, rows: k, ld: pix });
        if !shifted_dots(a, b, &[0], pix, acc, k, false) {
            candle_core::bail!("conv2d: the weight-gradient kernel refused its operands ({g:?})")
        }
        Ok(())
    }))
}

fn conv_grad_weight<T: WithDType>(x: &[T], go: &[T], g: &Geo) -> CResult<Vec<T>> {
    if let Some(gw) = patchify_grad_weight(x, go, g) {
        return gw;
    }
    if g.batched() {
        return batched_grad_weight(x, go, g);
    }
    let (xi, oi, wn) = (g.c * g.h * g.w, g.o * g.pixels(), g.o * g.k());
    let split = batch_split(g.n);
    // Whole images one per rayon task with single-threaded GEMMs, then the few left over one at a
    // time with multi-threaded ones.
    let images = x[..split * xi].par_chunks(xi).zip(go[..split * oi].par_chunks(oi));
    let mut acc = accumulate(images, wn, |acc, sc, (x, go)| grad_weight_image(x, go, g, acc, sc, false))?;
    let mut sc = Scratch::default();
    for (x, go) in x[split * xi..].chunks(xi).zip(go[split * oi..].chunks(oi)) {
        grad_weight_image(x, go, g, &mut acc, &mut sc, multi_threaded())?;
    }
    Ok(from_okkc(&acc, g))
}

/// Runs `f` on two storages of the same float dtype.
fn dispatch2(
    name: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f32_fn: impl FnOnce(&[f32], &[f32]) -> CResult<Vec<f32>>,
    f64_fn: impl FnOnce(&[f64], &[f64]) -> CResult<Vec<f64>>,
) -> CResult<CpuStorage> {
    match (s1, s2) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => {
            Ok(CpuStorage::F32(f32_fn(data(name, s1, l1)?, data(name, s2, l2)?)?))
        }
        (CpuStorage::F64(_), CpuStorage::F64(_)) => {
            Ok(CpuStorage::F64(f64_fn(data(name, s1, l1)?, data(name, s2, l2)?)?))
        }
        _ => candle_core::bail!(
            "{name}: f32 or f64 operands of one dtype only, got {:?} and {:?}",
            s1.dtype(),
            s2.dtype()
        ),
    }
}

/// The forward pass of [`Conv2dOp`] and [`Conv2dBiasOp`] on CPU storages of one float dtype:
/// input, weight and optionally a bias, applied with the ReLU (when `relu`) as the epilogue.
fn forward_storage(
    name: &str,
    spec: ConvSpec,
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
    relu: bool,
) -> CResult<(CpuStorage, Shape)> {
    let g = Geo::new(x.1.shape().dims4()?, w.1.shape().dims4()?, spec)?;
    let _span = crate::profile::span(g.kind(["conv2d 1x1", "conv2d kxk/1", "conv2d strided"]));
    if let Some((_, l)) = bias.filter(|(_, l)| l.shape().elem_count() != g.o) {
        candle_core::bail!("conv2d: {} bias values for {} output channels", l.shape().elem_count(), g.o)
    }
    fn epilogue<'a, T: WithDType>(
        name: &str,
        bias: Option<(&'a CpuStorage, &'a Layout)>,
        relu: bool,
    ) -> CResult<Epilogue<'a, T>> {
        Ok(Epilogue { bias: bias.map(|(s, l)| data::<T>(name, s, l)).transpose()?, relu })
    }
    let out = dispatch2(
        name,
        x,
        w,
        |x, wt| conv_fwd(x, wt, &g, epilogue(name, bias, relu)?),
        |x, wt| conv_fwd(x, wt, &g, epilogue(name, bias, relu)?),
    )?;
    Ok((out, Shape::from((g.n, g.o, g.oh, g.ow))))
}

/// The convolution itself, on (input, weight).
pub(crate) struct Conv2dOp(pub(crate) ConvSpec);

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "derm-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        crate::ops::note_cpu_kernel();
        forward_storage(self.name(), self.0, (s1, l1), (s2, l2), None, false)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        conv_grads(x, w, &grad.contiguous()?, self.0)
    }
}

/// The convolution with a per-channel bias and optionally a ReLU, on (input, weight, bias).
struct Conv2dBiasOp {
    spec: ConvSpec,
    relu: bool,
}

impl CustomOp3 for Conv2dBiasOp {
    fn name(&self) -> &'static str {
        "derm-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        crate::ops::note_cpu_kernel();
        forward_storage(self.name(), self.spec, (s1, l1), (s2, l2), Some((s3, l3)), self.relu)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // With the ReLU, the gradient passes where the output is positive; the bias gradient is
        // its sum per channel, taken in the same pass.
        let (g, db) = crate::fused::bias_grads(res, grad, b, self.relu)?;
        let (gx, gw) = conv_grads(x, w, &g, self.spec)?;
        Ok((gx, gw, b.track_op().then_some(db)))
    }
}

/// The gradients of a convolution's input and weight for the output gradient `grad`
/// (contiguous); an input that nothing upstream differentiates (a data batch) gets none.
pub(crate) fn conv_grads(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    spec: ConvSpec,
) -> CResult<(Option<Tensor>, Option<Tensor>)> {
    let gx = if x.track_op() {
        Some(w.apply_op2_no_bwd(grad, &Conv2dGradInput { spec, x_dims: x.dims4()? })?)
    } else {
        None
    };
    let gw = if w.track_op() {
        Some(x.apply_op2_no_bwd(grad, &Conv2dGradWeight { spec, w_dims: w.dims4()? })?)
    } else {
        None
    };
    Ok((gx, gw))
}

/// The input gradient, on (weight, output gradient).
struct Conv2dGradInput {
    spec: ConvSpec,
    x_dims: (usize, usize, usize, usize),
}

impl CustomOp2 for Conv2dGradInput {
    fn name(&self) -> &'static str {
        "derm-conv2d-grad-input"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        crate::ops::note_cpu_kernel();
        let g = Geo::new(self.x_dims, l1.shape().dims4()?, self.spec)?;
        let _span = crate::profile::span(g.kind(["grad-input 1x1", "grad-input kxk/1", "grad-input strided"]));
        check_grad_out(self.name(), l2, &g)?;
        let gx = dispatch2(
            self.name(),
            (s1, l1),
            (s2, l2),
            |w, go| conv_grad_input(w, go, &g),
            |w, go| conv_grad_input(w, go, &g),
        )?;
        Ok((gx, Shape::from(self.x_dims)))
    }
}

/// Errors unless the output gradient has the convolution's output shape.
fn check_grad_out(name: &str, l: &Layout, g: &Geo) -> CResult<()> {
    if l.shape().dims4()? != (g.n, g.o, g.oh, g.ow) {
        candle_core::bail!("{name}: output gradient of shape {:?} for output {:?}", l.shape(), (g.n, g.o, g.oh, g.ow))
    }
    Ok(())
}

/// The weight gradient, on (input, output gradient).
struct Conv2dGradWeight {
    spec: ConvSpec,
    w_dims: (usize, usize, usize, usize),
}

impl CustomOp2 for Conv2dGradWeight {
    fn name(&self) -> &'static str {
        "derm-conv2d-grad-weight"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        crate::ops::note_cpu_kernel();
        let g = Geo::new(l1.shape().dims4()?, self.w_dims, self.spec)?;
        let _span = crate::profile::span(g.kind(["grad-weight 1x1", "grad-weight kxk/1", "grad-weight strided"]));
        check_grad_out(self.name(), l2, &g)?;
        let gw = dispatch2(
            self.name(),
            (s1, l1),
            (s2, l2),
            |x, go| conv_grad_weight(x, go, &g),
            |x, go| conv_grad_weight(x, go, &g),
        )?;
        Ok((gw, Shape::from(self.w_dims)))
    }
}

/// The transposed convolution, on (input, weight): the input gradient of the convolution whose
/// output has the input's shape, with the same GEMM + col2im.
struct ConvTranspose2dOp {
    spec: ConvSpec,
    out_dims: (usize, usize, usize, usize),
}

impl CustomOp2 for ConvTranspose2dOp {
    fn name(&self) -> &'static str {
        "derm-conv-transpose2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        crate::ops::note_cpu_kernel();
        let _span = crate::profile::span(self.name());
        Conv2dGradInput { spec: self.spec, x_dims: self.out_dims }.cpu_fwd(s2, l2, s1, l1)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // The input gradient is the forward convolution of the output gradient, and the weight
        // gradient is that convolution's weight gradient with input and output swapped.
        let gx = if x.track_op() { Some(grad.apply_op2_no_bwd(w, &Conv2dOp(self.spec))?) } else { None };
        let gw = if w.track_op() {
            Some(grad.apply_op2_no_bwd(x, &Conv2dGradWeight { spec: self.spec, w_dims: w.dims4()? })?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// 2-D transposed convolution (groups 1) of (N, C_in, H, W) by (C_in, C_out, KH, KW) into
/// (N, C_out, (H-1)s - 2p + d(KH-1) + 1 + output_padding, ...), the adjoint of [`conv2d`], with
/// GEMM-based forward and gradients. Same values as
/// `x.conv_transpose2d(w, padding, output_padding, stride, dilation)`; `output_padding` must be
/// below the stride. The operands must be CPU tensors of one float dtype ([`supports`]).
pub fn conv_transpose2d(x: &Tensor, w: &Tensor, spec: ConvSpec, output_padding: usize) -> CResult<Tensor> {
    if !supports(x, w) {
        candle_core::bail!(
            "derm conv_transpose2d: CPU f32/f64 operands of one dtype only, got {:?} and {:?}",
            x.dtype(),
            w.dtype()
        )
    }
    let (n, ci, h, wd) = x.dims4()?;
    let (wi, co, kh, kw) = w.dims4()?;
    if wi != ci {
        candle_core::bail!("conv_transpose2d: the input has {ci} channels but the weight expects {wi}")
    }
    if output_padding >= spec.stride {
        candle_core::bail!("conv_transpose2d: output padding {output_padding} must be below the stride {}", spec.stride)
    }
    let size = |i: usize, k: usize| -> CResult<usize> {
        let full = i.saturating_sub(1) * spec.stride + spec.dilation * k.saturating_sub(1) + 1 + output_padding;
        match full.checked_sub(2 * spec.padding) {
            Some(v) if v > 0 && i > 0 && k > 0 => Ok(v),
            _ => candle_core::bail!("conv_transpose2d: padding {} leaves no output for {i} inputs", spec.padding),
        }
    };
    let out_dims = (n, co, size(h, kh)?, size(wd, kw)?);
    let g = Geo::new(out_dims, (ci, co, kh, kw), spec)?;
    if (g.oh, g.ow) != (h, wd) {
        candle_core::bail!("conv_transpose2d: inconsistent geometry for input {h}x{wd}")
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, ConvTranspose2dOp { spec, out_dims })
}

/// `conv2d(x, w) + b` with the bias `b` (C_out values) per output channel, followed by a ReLU
/// when `relu` is set, as one op: the bias and the activation are applied to each tile of the
/// output right after its GEMM, while it is in cache, instead of in a pass of their own; the
/// backward masks the gradient by the ReLU and sums it per channel for the bias.
pub fn conv2d_bias(x: &Tensor, w: &Tensor, b: &Tensor, spec: ConvSpec, relu: bool) -> CResult<Tensor> {
    if !supports(x, w) || b.dtype() != x.dtype() || !b.device().is_cpu() {
        candle_core::bail!(
            "derm conv2d: CPU f32/f64 operands of one dtype only, got {:?} {:?}, {:?} {:?} and {:?} {:?}",
            x.device().location(),
            x.dtype(),
            w.device().location(),
            w.dtype(),
            b.device().location(),
            b.dtype()
        )
    }
    let g = Geo::new(x.dims4()?, w.dims4()?, spec)?;
    if b.elem_count() != g.o {
        candle_core::bail!("conv2d: {} bias values for {} output channels", b.elem_count(), g.o)
    }
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Conv2dBiasOp { spec, relu })
}

/// Whether [`conv2d`] handles these operands: CPU tensors of one float dtype (f32 or f64).
pub fn supports(x: &Tensor, w: &Tensor) -> bool {
    crate::ops::host_kernels(x)
        && w.device().is_cpu()
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// 2-D convolution (groups 1) of (N, C, H, W) by (O, C, KH, KW) into
/// (N, O, (H + 2p - d(KH-1) - 1)/s + 1, (W + 2p - d(KW-1) - 1)/s + 1), with GEMM-based forward,
/// input gradient and weight gradient. Same values as `x.conv2d(w, padding, stride, dilation, 1)`;
/// the operands must be CPU tensors of one float dtype ([`supports`]).
pub fn conv2d(x: &Tensor, w: &Tensor, spec: ConvSpec) -> CResult<Tensor> {
    if !supports(x, w) {
        candle_core::bail!(
            "derm conv2d: CPU f32/f64 operands of one dtype only, got {:?} {:?} and {:?} {:?}",
            x.device().location(),
            x.dtype(),
            w.device().location(),
            w.dtype()
        )
    }
    // Check the geometry here so that a bad shape fails with a clear message before the op runs.
    Geo::new(x.dims4()?, w.dims4()?, spec)?;
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv2dOp(spec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::grad_error;
    use candle_core::{Device, Var};
    use derm_core::Rng;

    fn randn(rng: &mut Rng, shape: &[usize], dtype: DType) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(rng.normal_vec(n, 0.0, 1.0), shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    fn spec(padding: usize, stride: usize, dilation: usize) -> ConvSpec {
        ConvSpec { padding, stride, dilation }
    }

    /// Input shape, output channels, kernel (h, w) and spec of one test convolution.
    type Case = ([usize; 4], usize, (usize, usize), ConvSpec);

    /// Cases covering odd, non-square and degenerate shapes.
    fn cases() -> Vec<Case> {
        vec![
            ([2, 3, 9, 8], 4, (3, 3), spec(1, 1, 1)),
            ([1, 2, 9, 8], 3, (3, 3), spec(1, 2, 1)),
            ([1, 2, 8, 9], 3, (3, 3), spec(1, 2, 1)),
            ([2, 3, 7, 10], 5, (4, 4), spec(1, 2, 1)),
            ([1, 2, 9, 10], 3, (3, 3), spec(2, 1, 2)),
            ([3, 2, 13, 11], 2, (3, 3), spec(4, 1, 4)),
            ([2, 4, 6, 7], 3, (1, 1), spec(0, 1, 1)),
            ([2, 4, 7, 6], 3, (1, 1), spec(0, 2, 1)),
            ([1, 3, 5, 6], 2, (1, 1), spec(1, 1, 1)),
            ([1, 2, 11, 9], 3, (7, 7), spec(3, 2, 1)),
            ([3, 1, 5, 12], 2, (2, 3), spec(0, 3, 1)),
            ([1, 2, 4, 4], 2, (3, 3), spec(0, 1, 1)),
            ([5, 3, 6, 5], 4, (3, 2), spec(2, 2, 2)),
            ([2, 3, 6, 7], 2, (2, 3), spec(1, 1, 1)),
            // Batched with taps on padding skipped (`Geo::skips_taps`): the U-Net bottleneck's
            // geometry, padding wider than the kernel span (output rows that read only padding),
            // and a non-square dilated kernel.
            ([3, 2, 8, 8], 3, (3, 3), spec(4, 1, 4)),
            ([2, 2, 3, 3], 2, (3, 3), spec(3, 1, 1)),
            ([3, 2, 6, 7], 3, (3, 2), spec(3, 1, 3)),
            // A 2x2/2 kernel tiling a non-square image (the transposed convolutions' geometry).
            ([2, 3, 6, 8], 4, (2, 2), spec(0, 2, 1)),
        ]
    }

    fn geo(x: [usize; 4], o: usize, k: (usize, usize), sp: ConvSpec) -> Geo {
        Geo::new((x[0], x[1], x[2], x[3]), (o, x[1], k.0, k.1), sp).unwrap()
    }

    #[test]
    fn tap_classes_partition_the_output_by_the_taps_that_read_the_image() {
        // Dilation 4 on 8x8: each quadrant reads through a 2x2 corner of the kernel.
        let g = geo([8, 512, 8, 8], 512, (3, 3), spec(4, 1, 4));
        let want = [
            ((0, 4), (0, 4), (1, 3), (1, 3)),
            ((0, 4), (4, 8), (1, 3), (0, 2)),
            ((4, 8), (0, 4), (0, 2), (1, 3)),
            ((4, 8), (4, 8), (0, 2), (0, 2)),
        ];
        let got: Vec<_> = g.tap_classes().iter().map(|c| (c.ys, c.xs, c.kys, c.kxs)).collect();
        assert_eq!(got, want);
        assert!(g.skips_taps());
        // Every (pixel, tap) pair that reads the image is in exactly one class.
        for (x, o, k, sp) in cases().into_iter().filter(|c| c.3.stride == 1) {
            let g = geo(x, o, k, sp);
            let mut seen = vec![0u8; g.pixels() * g.kh * g.kw];
            for c in g.tap_classes() {
                for (y, xx) in c.coords() {
                    for ky in c.kys.0..c.kys.1 {
                        for kx in c.kxs.0..c.kxs.1 {
                            seen[((y * g.ow + xx) * g.kh + ky) * g.kw + kx] += 1;
                        }
                    }
                }
            }
            for (i, &n) in seen.iter().enumerate() {
                let (pix, t) = (i / (g.kh * g.kw), i % (g.kh * g.kw));
                let reads = g.in_row(pix / g.ow, t / g.kw).is_some() && {
                    let (lo, hi, _) = g.x_span(t % g.kw);
                    (lo..hi).contains(&(pix % g.ow))
                };
                assert_eq!(n, u8::from(reads), "{x:?} {sp:?}: pixel {pix} tap {t}");
            }
        }
        // Dilation 2 on 8x8 (31 % padding) and ResNet's 7x7 planes (18 %) keep one GEMM.
        assert!(!geo([8, 256, 8, 8], 512, (3, 3), spec(2, 1, 2)).skips_taps());
        assert!(!geo([8, 512, 7, 7], 512, (3, 3), spec(1, 1, 1)).skips_taps());
        // A single image runs per image, never batched.
        assert!(!geo([1, 512, 8, 8], 512, (3, 3), spec(4, 1, 4)).skips_taps());
    }

    #[test]
    fn forward_equals_candle_in_f32_and_f64() {
        let mut rng = Rng::new(21);
        let mut all = cases();
        // Bigger images span several tiles and a batch that splits unevenly over the threads.
        all.push(([3, 5, 70, 33], 6, (3, 3), spec(1, 1, 1)));
        all.push(([5, 16, 40, 41], 8, (3, 3), spec(2, 2, 2)));
        all.push(([2, 9, 30, 20], 7, (1, 1), spec(0, 1, 1)));
        for (shape, o, (kh, kw), sp) in all {
            for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-10)] {
                let x = randn(&mut rng, &shape, dtype);
                let w = randn(&mut rng, &[o, shape[1], kh, kw], dtype);
                let a = conv2d(&x, &w, sp).unwrap();
                let b = x.conv2d(&w, sp.padding, sp.stride, sp.dilation, 1).unwrap();
                let d = max_diff(&a, &b);
                assert!(d < tol, "{shape:?} o{o} k{kh}x{kw} {sp:?} {dtype:?}: {d}");
            }
        }
    }

    #[test]
    fn input_gradient_matches_finite_differences() {
        let mut rng = Rng::new(22);
        for (shape, o, (kh, kw), sp) in cases() {
            let w = randn(&mut rng, &[o, shape[1], kh, kw], DType::F64);
            let e = grad_error(&shape, 23, |x| conv2d(x, &w, sp));
            assert!(e < 1e-6, "{shape:?} o{o} k{kh}x{kw} {sp:?}: {e}");
        }
    }

    #[test]
    fn weight_gradient_matches_finite_differences() {
        let mut rng = Rng::new(24);
        for (shape, o, (kh, kw), sp) in cases() {
            let x = randn(&mut rng, &shape, DType::F64);
            let e = grad_error(&[o, shape[1], kh, kw], 25, |w| conv2d(&x, w, sp));
            assert!(e < 1e-6, "{shape:?} o{o} k{kh}x{kw} {sp:?}: {e}");
        }
    }

    #[test]
    fn gradients_match_candle_on_larger_f32_shapes() {
        // Several tiles per image (the 90x90 case takes three in every pass), a batch that does
        // not divide among the threads, and small planes that run as GEMMs over image groups. candle's own backward fails for stride 2 on non-square
        // inputs, so the strided cases are square.
        let mut rng = Rng::new(26);
        for (shape, o, k, sp) in [
            ([3, 6, 50, 37], 5, 3, spec(1, 1, 1)),
            ([8, 3, 20, 17], 4, 3, spec(1, 1, 1)), // several images per task reuse its scratch
            ([5, 4, 33, 33], 6, 3, spec(2, 2, 2)),
            ([3, 8, 20, 21], 4, 1, spec(0, 1, 1)),
            ([5, 16, 9, 11], 7, 1, spec(0, 1, 1)), // small planes: one GEMM over the batch
            ([40, 3, 12, 12], 4, 3, spec(1, 1, 1)), // small planes in two groups of images
            ([3, 8, 90, 90], 4, 3, spec(1, 2, 1)),
            ([3, 5, 66, 70], 7, 3, spec(1, 1, 1)), // weight gradient as shifted dot products
            ([3, 4, 64, 71], 6, 3, spec(2, 1, 2)), // the same, dilated
            ([2, 5, 64, 64], 6, 2, spec(0, 2, 1)), // kernel = stride: weight gradient as dot products
            ([8, 16, 8, 8], 12, 3, spec(4, 1, 4)), // the U-Net bottleneck: taps on padding skipped
        ] {
            let x = Var::from_tensor(&randn(&mut rng, &shape, DType::F32)).unwrap();
            let w = Var::from_tensor(&randn(&mut rng, &[o, shape[1], k, k], DType::F32)).unwrap();
            let r = randn(&mut rng, &[shape[0], o, 1, 1], DType::F32);
            let ga = conv2d(&x, &w, sp).unwrap().broadcast_mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = x
                .conv2d(&w, sp.padding, sp.stride, sp.dilation, 1)
                .unwrap()
                .broadcast_mul(&r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &w] {
                let (a, b) = (ga.get(v).unwrap(), gb.get(v).unwrap());
                let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
                let d = max_diff(a, b) / scale;
                assert!(d < 1e-5, "{shape:?} k{k} {sp:?}: {d}");
            }
        }
    }

    #[test]
    fn bias_and_relu_fused_into_the_convolution_match_the_separate_ops() {
        let mut rng = Rng::new(34);
        // Per-image (tiles), batched small planes, strided, pointwise.
        for (shape, o, k, sp) in [
            ([2, 3, 9, 8], 4, 3, spec(1, 1, 1)),
            ([3, 2, 5, 6], 3, 3, spec(2, 2, 2)),
            ([2, 4, 6, 7], 3, 1, spec(0, 1, 1)),
            ([3, 5, 40, 33], 4, 3, spec(1, 1, 1)),
        ] {
            for relu in [false, true] {
                let x = randn(&mut rng, &shape, DType::F64);
                let w = randn(&mut rng, &[o, shape[1], k, k], DType::F64);
                let b = randn(&mut rng, &[o], DType::F64);
                let sep = conv2d(&x, &w, sp).unwrap().broadcast_add(&b.reshape((1, o, 1, 1)).unwrap()).unwrap();
                let sep = if relu { sep.relu().unwrap() } else { sep };
                let d = max_diff(&conv2d_bias(&x, &w, &b, sp, relu).unwrap(), &sep);
                assert!(d < 1e-10, "{shape:?} relu {relu}: {d}");
                if shape[2] > 20 {
                    continue;
                }
                let f = |x: &Tensor, w: &Tensor, b: &Tensor| conv2d_bias(x, w, b, sp, relu);
                let e = grad_error(&shape, 35, |x| f(x, &w, &b));
                assert!(e < 1e-6, "input grad {shape:?} relu {relu}: {e}");
                let e = grad_error(&[o, shape[1], k, k], 36, |w| f(&x, w, &b));
                assert!(e < 1e-6, "weight grad {shape:?} relu {relu}: {e}");
                let e = grad_error(&[o], 37, |b| f(&x, &w, b));
                assert!(e < 1e-6, "bias grad {shape:?} relu {relu}: {e}");
            }
        }
        let x = randn(&mut rng, &[1, 2, 5, 5], DType::F32);
        let w = randn(&mut rng, &[3, 2, 3, 3], DType::F32);
        assert!(conv2d_bias(&x, &w, &randn(&mut rng, &[4], DType::F32), spec(1, 1, 1), true).is_err());
        assert!(conv2d_bias(&x, &w, &randn(&mut rng, &[3], DType::F64), spec(1, 1, 1), true).is_err());
    }

    #[test]
    fn gradient_accumulates_with_another_consumer() {
        // y = conv(x) + x * 3: the gradient of x is the convolution's plus 3 everywhere.
        let mut rng = Rng::new(27);
        let w = randn(&mut rng, &[2, 2, 3, 3], DType::F64);
        let e = grad_error(&[2, 2, 7, 6], 28, |x| conv2d(x, &w, spec(1, 1, 1))? + (x * 3.0)?);
        assert!(e < 1e-6, "{e}");
        let x = Var::from_tensor(&randn(&mut rng, &[1, 2, 5, 4], DType::F64)).unwrap();
        let wv = Var::from_tensor(&w).unwrap();
        let conv_only = conv2d(&x, &wv, spec(1, 1, 1)).unwrap().sum_all().unwrap().backward().unwrap();
        let both = (conv2d(&x, &wv, spec(1, 1, 1)).unwrap().sum_all().unwrap()
            + (x.as_tensor() * 3.0).unwrap().sum_all().unwrap())
        .unwrap()
        .backward()
        .unwrap();
        let d = max_diff(&(conv_only.get(&x).unwrap() + 3.0).unwrap(), both.get(&x).unwrap());
        assert!(d < 1e-12, "{d}");
        // The weight is used twice as well.
        let e = grad_error(&[2, 2, 3, 3], 29, |w| {
            let xt = x.as_tensor().detach();
            conv2d(&xt, w, spec(1, 1, 1))? + conv2d(&xt, w, spec(2, 1, 2))?
        });
        assert!(e < 1e-6, "{e}");
    }

    #[test]
    fn transposed_convolution_matches_candle_and_finite_differences() {
        let mut rng = Rng::new(31);
        // (input shape, output channels, kernel, spec, output padding)
        let cases = [
            ([2, 3, 5, 4], 2, 2, spec(0, 2, 1), 0),
            ([1, 2, 4, 5], 3, 4, spec(1, 2, 1), 0),
            ([1, 2, 5, 3], 2, 3, spec(1, 2, 1), 1),
            ([2, 2, 4, 6], 3, 3, spec(1, 1, 1), 0),
            ([1, 3, 4, 5], 2, 3, spec(2, 1, 2), 0),
            ([3, 2, 1, 1], 2, 4, spec(0, 1, 1), 0),
        ];
        for (shape, co, k, sp, op) in cases {
            let w = randn(&mut rng, &[shape[1], co, k, k], DType::F64);
            let x = randn(&mut rng, &shape, DType::F64);
            let a = conv_transpose2d(&x, &w, sp, op).unwrap();
            let b = x.conv_transpose2d(&w, sp.padding, op, sp.stride, sp.dilation).unwrap();
            let d = max_diff(&a, &b);
            assert!(d < 1e-10, "{shape:?} k{k} {sp:?} op{op}: {d}");
            let e = grad_error(&shape, 32, |x| conv_transpose2d(x, &w, sp, op));
            assert!(e < 1e-6, "input grad {shape:?} k{k} {sp:?} op{op}: {e}");
            let e = grad_error(&[shape[1], co, k, k], 33, |w| conv_transpose2d(&x, w, sp, op));
            assert!(e < 1e-6, "weight grad {shape:?} k{k} {sp:?} op{op}: {e}");
        }
    }

    #[test]
    fn a_constant_input_gets_no_gradient_and_bad_shapes_fail() {
        let mut rng = Rng::new(30);
        let x = randn(&mut rng, &[1, 2, 5, 5], DType::F32);
        let w = Var::from_tensor(&randn(&mut rng, &[3, 2, 3, 3], DType::F32)).unwrap();
        let g = conv2d(&x, &w, spec(1, 1, 1)).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none() && g.get(&w).is_some());
        assert!(conv2d(&x, &randn(&mut rng, &[3, 4, 3, 3], DType::F32), spec(1, 1, 1)).is_err());
        assert!(conv2d(&x, &randn(&mut rng, &[3, 2, 7, 7], DType::F32), spec(0, 1, 1)).is_err());
        assert!(conv2d(&x, &randn(&mut rng, &[3, 2, 3, 3], DType::F64), spec(1, 1, 1)).is_err());
    }
}
