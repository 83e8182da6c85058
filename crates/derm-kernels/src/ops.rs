//! Differentiable ops with correct gradients at every shape.
//!
//! candle 0.11 on CPU gets several gradients wrong or has none (docs/candle-notes.md#gradients):
//! `max_pool2d` backward is scaled by 1/(k*k), pooling with kernel != stride has no backward,
//! nearest upsampling overwrites its accumulated gradient, fractional and bilinear resizing have no
//! backward, conv2d with stride 2 fails in backward on non-square inputs, BCE with logits gives
//! inf/NaN at large logits, and the fused softmax returns no gradient. The functions here replace
//! those ops; every stage crate uses them. Pooling and resizing are custom ops whose backward is a
//! second custom op (scatter-add), so gradients accumulate correctly whatever else consumes the
//! input. Each op has a finite-difference gradient test in f64.
//!
//! Tensors are NCHW. The custom ops run on the CPU. On another device (CUDA, Metal), pooling and
//! resizing are composed from candle ops whose generic backward is right, so nothing leaves the
//! device: pooling as a maximum or sum over the window's strided views of the padded input,
//! resizing as index selections (whose backward is a scatter-add) blended with per-row and
//! per-column weights, integer nearest upsampling as a broadcast. [`with_device_path`] forces
//! that path on CPU tensors, which is how it is tested without a GPU: forward and gradients
//! equal the CPU kernels' on the same shapes.
//!
//! Ties in max pooling: the CPU kernel gives a window's whole gradient to its first maximum in
//! row-major order; the device path shares it among the tied elements (candle's `maximum`
//! backward halves the gradient at each tie of the chained comparisons, so the shares are not
//! equal). Ties only matter on plateaus such as ReLU zeros.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, WithDType, D};
use rayon::prelude::*;
use std::cell::Cell;
use std::sync::{Arc, Mutex};

use crate::cpu::{data, float_dispatch};

type CResult<T> = candle_core::Result<T>;

thread_local! {
    static FORCE_DEVICE_PATH: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with CPU tensors taking the path of CUDA and Metal tensors (this thread only): pooling
/// and resizing composed from candle ops, candle's convolution, batch norm from candle ops with
/// its statistics and running averages kept as tensors, the optimiser's tensor update. How that
/// path is tested on a machine without a GPU.
pub fn with_device_path<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCE_DEVICE_PATH.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCE_DEVICE_PATH.with(|c| c.replace(true)));
    f()
}

/// Called first by each of derm's CPU kernels (custom ops): on the forced device path the kernel
/// stands for one that a GPU does not have, so it counts as a host round trip in [`host_reads`].
pub fn note_cpu_kernel() {
    if FORCE_DEVICE_PATH.with(|c| c.get()) {
        candle_core::host_reads::note();
    }
}

/// Host round trips made by this thread so far: every read of tensor data to the host
/// (`to_scalar`, `to_vec*`, `to_device(&Device::Cpu)`, counted by derm's candle-core patch) and,
/// under [`with_device_path`], every derm CPU kernel run. A GPU training step must make none; tests
/// take the difference around one step run on the forced device path.
pub fn host_reads() -> u64 {
    candle_core::host_reads::count()
}

/// Runs `f` on the forced device path ([`with_device_path`]) and returns its result with the
/// number of host round trips it made ([`host_reads`]): what a GPU training step must keep at 0.
pub fn host_reads_on_device_path<R>(f: impl FnOnce() -> R) -> (R, u64) {
    with_device_path(|| {
        let before = host_reads();
        let r = f();
        (r, host_reads() - before)
    })
}

/// Whether `x` takes the composed (device) path: not on the CPU, or forced.
fn device_path(x: &Tensor) -> bool {
    !x.device().is_cpu() || FORCE_DEVICE_PATH.with(|c| c.get())
}

/// Whether `x` goes to derm's CPU kernels (convolution, fused batch norm and bias, the in-place
/// optimiser): a CPU tensor, with the device path not forced ([`with_device_path`] forces every
/// one of those decisions, so a whole training step can take the device path on the CPU).
pub fn host_kernels(x: &Tensor) -> bool {
    !device_path(x)
}

/// `count` slices of `dim` from `start`, `step` apart, as a strided view made of a narrow and a
/// reshape (so its backward is candle's, a zero-padded scatter). Needs `start + count * step`
/// elements along `dim`.
fn strided(x: &Tensor, dim: usize, start: usize, count: usize, step: usize) -> CResult<Tensor> {
    if step == 1 {
        return x.narrow(dim, start, count);
    }
    let t = x.narrow(dim, start, count * step)?;
    let mut shape = t.dims().to_vec();
    shape[dim] = count;
    shape.insert(dim + 1, step);
    t.reshape(shape)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)
}

/// `x` with `before` rows of `fill` in front along `dim` and then cut or filled to `total`.
fn pad_dim(x: &Tensor, dim: usize, before: usize, total: usize, fill: f64) -> CResult<Tensor> {
    let len = x.dim(dim)?;
    let block = |n: usize| -> CResult<Tensor> {
        let mut shape = x.dims().to_vec();
        shape[dim] = n;
        Tensor::zeros(shape, x.dtype(), x.device())?.affine(1.0, fill)
    };
    let mut parts = Vec::with_capacity(3);
    if before > 0 {
        parts.push(block(before)?);
    }
    let keep = len.min(total.saturating_sub(before));
    parts.push(x.narrow(dim, 0, keep)?);
    if before + keep < total {
        parts.push(block(total - before - keep)?);
    }
    Tensor::cat(&parts, dim)
}

/// Pooling composed from candle ops (see the module doc): the padded input is read through one
/// strided view per window tap, combined with `maximum` or summed.
fn composed_pool(x: &Tensor, geo: Pool2d, kind: PoolKind) -> CResult<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (oh, ow) = geo.out_size(h, w)?;
    let ((kh, kw), (sh, sw), (ph, pw)) = (geo.kernel, geo.stride, geo.padding);
    let fill = match kind {
        PoolKind::Max => f64::NEG_INFINITY,
        PoolKind::Avg => 0.0,
    };
    // Tap (dy, dx) reads padded rows dy, dy + sh, ..., dy + (oh - 1) sh; the strided view takes
    // oh * sh rows from dy, so the padded input has kh - 1 + oh * sh rows (likewise columns).
    let xp = pad_dim(x, 2, ph, kh - 1 + oh * sh, fill)?;
    let xp = pad_dim(&xp, 3, pw, kw - 1 + ow * sw, fill)?;
    let mut acc: Option<Tensor> = None;
    for dy in 0..kh {
        let rows = strided(&xp, 2, dy, oh, sh)?;
        for dx in 0..kw {
            let tap = strided(&rows, 3, dx, ow, sw)?;
            acc = Some(match (acc, kind) {
                (None, _) => tap,
                (Some(a), PoolKind::Max) => a.maximum(&tap)?,
                (Some(a), PoolKind::Avg) => (a + tap)?,
            });
        }
    }
    let y = acc.ok_or_else(|| candle_core::Error::Msg("pool2d: empty window".into()))?;
    match kind {
        PoolKind::Max => Ok(y),
        PoolKind::Avg => y.affine(1.0 / (kh * kw) as f64, 0.0),
    }
}

/// Resizing composed from candle ops (see the module doc).
fn composed_resize(x: &Tensor, oh: usize, ow: usize, mode: ResizeMode) -> CResult<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if mode == ResizeMode::Nearest && oh.is_multiple_of(h) && ow.is_multiple_of(w) {
        // Integer factors: every source pixel repeated fh x fw times, a broadcast whose backward
        // sums the copies.
        let (fh, fw) = (oh / h, ow / w);
        return x.reshape((n, c, h, 1, w, 1))?.broadcast_as((n, c, h, fh, w, fw))?.reshape((n, c, oh, ow));
    }
    let y = resize_axis(x, 2, h, oh, mode)?;
    resize_axis(&y, 3, w, ow, mode)
}

/// Resizes along one axis: the taps' source rows picked by `index_select` and blended.
fn resize_axis(x: &Tensor, dim: usize, src: usize, dst: usize, mode: ResizeMode) -> CResult<Tensor> {
    if src == dst {
        return Ok(x.clone());
    }
    let taps = resize_taps(src, dst, mode);
    let ids = |pick: fn(&(usize, usize, f64)) -> usize| -> CResult<Tensor> {
        Tensor::from_vec(taps.iter().map(|t| pick(t) as u32).collect::<Vec<_>>(), dst, x.device())
    };
    let a = x.index_select(&ids(|t| t.0)?, dim)?;
    if mode == ResizeMode::Nearest {
        return Ok(a);
    }
    let b = x.index_select(&ids(|t| t.1)?, dim)?;
    let mut shape = vec![1usize; 4];
    shape[dim] = dst;
    let wt = |f: fn(f64) -> f64| -> CResult<Tensor> {
        Tensor::from_vec(taps.iter().map(|t| f(t.2)).collect::<Vec<f64>>(), shape.as_slice(), x.device())?
            .to_dtype(x.dtype())
    };
    a.broadcast_mul(&wt(|t| 1.0 - t)?)? + b.broadcast_mul(&wt(|t| t)?)?
}

/// Geometry of a 2-D pooling window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2d {
    /// Window height and width.
    pub kernel: (usize, usize),
    /// Step between windows.
    pub stride: (usize, usize),
    /// Implicit padding on each side.
    pub padding: (usize, usize),
}

impl Pool2d {
    /// A square window `k` with stride `s` and padding `p`.
    pub fn square(k: usize, s: usize, p: usize) -> Self {
        Pool2d { kernel: (k, k), stride: (s, s), padding: (p, p) }
    }
    /// Output height and width for an input of `h` x `w`.
    pub fn out_size(&self, h: usize, w: usize) -> CResult<(usize, usize)> {
        let (kh, kw) = self.kernel;
        let (sh, sw) = self.stride;
        let (ph, pw) = self.padding;
        if kh == 0 || kw == 0 || sh == 0 || sw == 0 {
            candle_core::bail!("pool2d: kernel and stride must be positive")
        }
        if ph * 2 > kh || pw * 2 > kw {
            candle_core::bail!("pool2d: padding must be at most half the kernel")
        }
        if h == 0 || w == 0 {
            candle_core::bail!("pool2d: empty {h}x{w} input")
        }
        if h + 2 * ph < kh || w + 2 * pw < kw {
            candle_core::bail!("pool2d: input {h}x{w} is smaller than the window {kh}x{kw}")
        }
        Ok(((h + 2 * ph - kh) / sh + 1, (w + 2 * pw - kw) / sw + 1))
    }
    /// Input rows/cols covered by output (oy, ox), clipped to the input.
    #[inline]
    fn window(&self, oy: usize, ox: usize, h: usize, w: usize) -> (usize, usize, usize, usize) {
        let y0 = (oy * self.stride.0) as isize - self.padding.0 as isize;
        let x0 = (ox * self.stride.1) as isize - self.padding.1 as isize;
        let y1 = (y0 + self.kernel.0 as isize).min(h as isize);
        let x1 = (x0 + self.kernel.1 as isize).min(w as isize);
        (y0.max(0) as usize, y1 as usize, x0.max(0) as usize, x1 as usize)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PoolKind {
    Max,
    Avg,
}

struct PoolFwd {
    geo: Pool2d,
    kind: PoolKind,
    /// Max pooling: the in-plane index of each output's maximum, kept by the forward pass for the
    /// backward one (a scatter instead of a second search of every window).
    argmax: Mutex<Option<Arc<Vec<u32>>>>,
}

impl PoolFwd {
    fn new(geo: Pool2d, kind: PoolKind) -> Self {
        PoolFwd { geo, kind, argmax: Mutex::new(None) }
    }
}

/// The column span `[x0, x1)` of each output column's window, clipped to the image.
fn column_windows(geo: Pool2d, h: usize, w: usize, ow: usize) -> Vec<(usize, usize)> {
    (0..ow)
        .map(|ox| {
            let (_, _, x0, x1) = geo.window(0, ox, h, w);
            (x0, x1)
        })
        .collect()
}

/// Max pooling of one plane: each output is the first maximum of its window in row-major order,
/// and `idx` gets its in-plane position. Works along whole output rows: for each window row and
/// kernel column, one pass over the output columns whose tap falls inside the image.
fn max_plane<T: WithDType>(
    xs: &[T],
    (h, w): (usize, usize),
    geo: Pool2d,
    cols: &[(usize, usize)],
    o: &mut [T],
    idx: &mut [u32],
) {
    let ow = cols.len();
    let (sw, pw) = (geo.stride.1, geo.padding.1);
    // The output columns [lo, hi) whose tap `kx` lies inside the row.
    let spans: Vec<(usize, usize)> = (0..geo.kernel.1)
        .map(|kx| {
            let lo = pw.saturating_sub(kx).div_ceil(sw);
            let hi = if kx < w + pw { ((w + pw - 1 - kx) / sw + 1).min(ow) } else { 0 };
            (lo.min(hi), hi)
        })
        .collect();
    for (oy, (orow, irow)) in o.chunks_exact_mut(ow).zip(idx.chunks_exact_mut(ow)).enumerate() {
        let (y0, y1, _, _) = geo.window(oy, 0, h, w);
        for ((ov, iv), &(x0, _)) in orow.iter_mut().zip(irow.iter_mut()).zip(cols) {
            *ov = xs[y0 * w + x0];
            *iv = (y0 * w + x0) as u32;
        }
        for yy in y0..y1 {
            let row = &xs[yy * w..(yy + 1) * w];
            for (kx, &(lo, hi)) in spans.iter().enumerate() {
                if lo >= hi {
                    continue;
                }
                let first = lo * sw + kx - pw;
                let taps = row[first..].iter().step_by(sw);
                let mut pos = (yy * w + first) as u32;
                for ((ov, iv), &v) in orow[lo..hi].iter_mut().zip(&mut irow[lo..hi]).zip(taps) {
                    // Selects, not a branch: which element wins is data-dependent.
                    let gt = v > *ov;
                    *ov = std::hint::select_unpredictable(gt, v, *ov);
                    *iv = std::hint::select_unpredictable(gt, pos, *iv);
                    pos = pos.wrapping_add(sw as u32);
                }
            }
        }
    }
}

/// Pooling forward: the output and, for max pooling, the argmax indices.
fn pool_fwd<T: WithDType>(
    x: &[T],
    dims: (usize, usize, usize, usize),
    geo: Pool2d,
    kind: PoolKind,
) -> CResult<(Vec<T>, Option<Vec<u32>>, Shape)> {
    let (n, c, h, w) = dims;
    let (oh, ow) = geo.out_size(h, w)?;
    if h * w > u32::MAX as usize {
        candle_core::bail!("pool2d: a {h}x{w} plane is too large to index")
    }
    let shape = Shape::from((n, c, oh, ow));
    let cols = column_windows(geo, h, w, ow);
    let mut out = vec![T::zero(); n * c * oh * ow];
    let mut idx = vec![0u32; if kind == PoolKind::Max { out.len() } else { 0 }];
    let planes = out.par_chunks_mut(oh * ow).zip(x.par_chunks(h * w));
    match kind {
        PoolKind::Max => {
            planes.zip(idx.par_chunks_mut(oh * ow)).for_each(|((o, xs), ix)| max_plane(xs, (h, w), geo, &cols, o, ix));
            Ok((out, Some(idx), shape))
        }
        PoolKind::Avg => {
            let area = T::from_f64((geo.kernel.0 * geo.kernel.1) as f64);
            planes.for_each(|(o, xs)| {
                for (oy, orow) in o.chunks_exact_mut(ow).enumerate() {
                    let (y0, y1, _, _) = geo.window(oy, 0, h, w);
                    for (ov, &(x0, x1)) in orow.iter_mut().zip(&cols) {
                        let mut s = T::zero();
                        for yy in y0..y1 {
                            for &v in &xs[yy * w + x0..yy * w + x1] {
                                s += v;
                            }
                        }
                        *ov = s / area;
                    }
                }
            });
            Ok((out, None, shape))
        }
    }
}

impl CustomOp1 for PoolFwd {
    fn name(&self) -> &'static str {
        match self.kind {
            PoolKind::Max => "derm-max-pool2d",
            PoolKind::Avg => "derm-avg-pool2d",
        }
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        crate::ops::note_cpu_kernel();
        let _span = crate::profile::span(self.name());
        let dims = l.shape().dims4()?;
        float_dispatch!(self.name(), s, |T| {
            let (v, idx, sh) = pool_fwd::<T>(data(self.name(), s, l)?, dims, self.geo, self.kind)?;
            if let Ok(mut slot) = self.argmax.lock() {
                *slot = idx.map(Arc::new);
            }
            Ok((T::to_cpu_storage_owned(v), sh))
        })
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let g = match self.kind {
            PoolKind::Max => {
                let idx = self.argmax.lock().ok().and_then(|s| s.clone());
                let Some(idx) = idx else {
                    candle_core::bail!("derm-max-pool2d: backward without the forward pass's indices")
                };
                let (_, _, h, w) = arg.dims4()?;
                grad.apply_op1_no_bwd(&MaxScatter { idx, in_plane: h * w, in_shape: arg.shape().clone() })?
            }
            PoolKind::Avg => grad.apply_op1_no_bwd(&AvgPoolBwd { geo: self.geo, in_shape: arg.shape().clone() })?,
        };
        Ok(Some(g))
    }
}

/// Max pooling backward: each output's gradient added at its window's maximum.
struct MaxScatter {
    idx: Arc<Vec<u32>>,
    in_plane: usize,
    in_shape: Shape,
}

impl CustomOp1 for MaxScatter {
    fn name(&self) -> &'static str {
        "derm-pool2d-bwd"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        crate::ops::note_cpu_kernel();
        let _span = crate::profile::span(self.name());
        float_dispatch!(self.name(), s, |T| {
            let gx = max_scatter::<T>(data(self.name(), s, l)?, &self.idx, self.in_plane, self.in_shape.elem_count())?;
            Ok((T::to_cpu_storage_owned(gx), self.in_shape.clone()))
        })
    }
}

/// `gx` of `len` values, planes of `in_plane`, with `g[i]` added at `idx[i]` of its plane.
fn max_scatter<T: WithDType>(g: &[T], idx: &[u32], in_plane: usize, len: usize) -> CResult<Vec<T>> {
    if g.len() != idx.len() || in_plane == 0 || !len.is_multiple_of(in_plane) {
        candle_core::bail!("derm-pool2d-bwd: gradient of {} values for {} indices", g.len(), idx.len())
    }
    let out_plane = g.len() / (len / in_plane).max(1);
    let mut gx = vec![T::zero(); len];
    if out_plane == 0 {
        return Ok(gx);
    }
    gx.par_chunks_mut(in_plane).zip(g.par_chunks(out_plane).zip(idx.par_chunks(out_plane))).for_each(
        |(gxp, (gp, ip))| {
            for (&v, &i) in gp.iter().zip(ip) {
                gxp[i as usize] += v;
            }
        },
    );
    Ok(gx)
}

/// Average pooling backward: each output's gradient shared over its window.
struct AvgPoolBwd {
    geo: Pool2d,
    in_shape: Shape,
}

fn avg_pool_bwd<T: WithDType>(g: &[T], dims: (usize, usize, usize, usize), geo: Pool2d) -> CResult<Vec<T>> {
    let (n, c, h, w) = dims;
    let (oh, ow) = geo.out_size(h, w)?;
    let cols = column_windows(geo, h, w, ow);
    let mut gx = vec![T::zero(); n * c * h * w];
    let area = T::from_f64((geo.kernel.0 * geo.kernel.1) as f64);
    gx.par_chunks_mut(h * w).zip(g.par_chunks(oh * ow)).for_each(|(gxp, gs)| {
        for (oy, grow) in gs.chunks_exact(ow).enumerate() {
            let (y0, y1, _, _) = geo.window(oy, 0, h, w);
            for (&gv, &(x0, x1)) in grow.iter().zip(&cols) {
                let share = gv / area;
                for yy in y0..y1 {
                    for v in &mut gxp[yy * w + x0..yy * w + x1] {
                        *v += share;
                    }
                }
            }
        }
    });
    Ok(gx)
}

impl CustomOp1 for AvgPoolBwd {
    fn name(&self) -> &'static str {
        "derm-pool2d-bwd"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        crate::ops::note_cpu_kernel();
        let _span = crate::profile::span(self.name());
        let dims = self.in_shape.dims4()?;
        float_dispatch!(self.name(), s, |T| {
            let v = avg_pool_bwd::<T>(data(self.name(), s, l)?, dims, self.geo)?;
            Ok((T::to_cpu_storage_owned(v), self.in_shape.clone()))
        })
    }
}

/// Max pooling of an (N, C, H, W) tensor with any kernel, stride and padding (padding acts as
/// -inf). The gradient goes in full to the first maximum of each window.
pub fn max_pool2d(x: &Tensor, geo: Pool2d) -> CResult<Tensor> {
    if device_path(x) {
        return composed_pool(x, geo, PoolKind::Max);
    }
    x.contiguous()?.apply_op1(PoolFwd::new(geo, PoolKind::Max))
}

/// Average pooling of an (N, C, H, W) tensor with any kernel, stride and padding (zero padding,
/// counted in the divisor as PyTorch's default `count_include_pad=True`).
pub fn avg_pool2d(x: &Tensor, geo: Pool2d) -> CResult<Tensor> {
    if device_path(x) {
        return composed_pool(x, geo, PoolKind::Avg);
    }
    x.contiguous()?.apply_op1(PoolFwd::new(geo, PoolKind::Avg))
}

/// Resizing modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMode {
    /// Nearest neighbour (PyTorch's `nearest`: source index floor(dst * in / out)).
    Nearest,
    /// Bilinear with half-pixel centres (PyTorch's `bilinear`, `align_corners=False`).
    Bilinear,
}

/// Per-output taps along one axis: (i0, i1, weight of i1).
fn resize_taps(src: usize, dst: usize, mode: ResizeMode) -> Vec<(usize, usize, f64)> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|o| match mode {
            ResizeMode::Nearest => {
                let i = ((o as f64 * scale).floor() as usize).min(src - 1);
                (i, i, 0.0)
            }
            ResizeMode::Bilinear => {
                let c = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (c.floor() as usize).min(src - 1);
                let i1 = (i0 + 1).min(src - 1);
                let t = if i1 == i0 { 0.0 } else { c - i0 as f64 };
                (i0, i1, t)
            }
        })
        .collect()
}

struct ResizeFwd {
    out: (usize, usize),
    mode: ResizeMode,
}

fn resize_fwd<T: WithDType>(
    x: &[T],
    dims: (usize, usize, usize, usize),
    out: (usize, usize),
    mode: ResizeMode,
) -> Vec<T> {
    let (n, c, h, w) = dims;
    let (oh, ow) = out;
    let ty = resize_taps(h, oh, mode);
    let tx = resize_taps(w, ow, mode);
    let mut o = vec![T::zero(); n * c * oh * ow];
    o.par_chunks_mut(oh * ow).enumerate().for_each(|(plane, op)| {
        let xs = &x[plane * h * w..(plane + 1) * h * w];
        for (oy, &(y0, y1, ty1)) in ty.iter().enumerate() {
            let (a0, a1) = (T::from_f64(1.0 - ty1), T::from_f64(ty1));
            for (ox, &(x0, x1, tx1)) in tx.iter().enumerate() {
                let (b0, b1) = (T::from_f64(1.0 - tx1), T::from_f64(tx1));
                let v = a0 * (b0 * xs[y0 * w + x0] + b1 * xs[y0 * w + x1])
                    + a1 * (b0 * xs[y1 * w + x0] + b1 * xs[y1 * w + x1]);
                op[oy * ow + ox] = v;
            }
        }
    });
    o
}

impl CustomOp1 for ResizeFwd {
    fn name(&self) -> &'static str {
        "derm-resize2d"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        crate::ops::note_cpu_kernel();
        let _span = crate::profile::span(self.name());
        let dims = l.shape().dims4()?;
        let (n, c, _, _) = dims;
        float_dispatch!(self.name(), s, |T| {
            let v = resize_fwd::<T>(data(self.name(), s, l)?, dims, self.out, self.mode);
            Ok((T::to_cpu_storage_owned(v), Shape::from((n, c, self.out.0, self.out.1))))
        })
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &ResizeBwd { mode: self.mode })?))
    }
}

struct ResizeBwd {
    mode: ResizeMode,
}

impl CustomOp2 for ResizeBwd {
    fn name(&self) -> &'static str {
        "derm-resize2d-bwd"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        crate::ops::note_cpu_kernel();
        let _span = crate::profile::span(self.name());
        let (n, c, h, w) = l1.shape().dims4()?;
        let (_, _, oh, ow) = l2.shape().dims4()?;
        let ty = resize_taps(h, oh, self.mode);
        let tx = resize_taps(w, ow, self.mode);
        float_dispatch!(self.name(), s1, |T| {
            let g: &[T] = data(self.name(), s2, l2)?;
            let mut gx = vec![T::from_f64(0.0); n * c * h * w];
            gx.par_chunks_mut(h * w).enumerate().for_each(|(plane, gp)| {
                let gs = &g[plane * oh * ow..(plane + 1) * oh * ow];
                for (oy, &(y0, y1, ty1)) in ty.iter().enumerate() {
                    let (a0, a1) = (T::from_f64(1.0 - ty1), T::from_f64(ty1));
                    for (ox, &(x0, x1, tx1)) in tx.iter().enumerate() {
                        let (b0, b1) = (T::from_f64(1.0 - tx1), T::from_f64(tx1));
                        let gv = gs[oy * ow + ox];
                        gp[y0 * w + x0] += a0 * b0 * gv;
                        gp[y0 * w + x1] += a0 * b1 * gv;
                        gp[y1 * w + x0] += a1 * b0 * gv;
                        gp[y1 * w + x1] += a1 * b1 * gv;
                    }
                }
            });
            Ok((T::to_cpu_storage_owned(gx), l1.shape().clone()))
        })
    }
}

/// Resizes an (N, C, H, W) tensor to (N, C, out_h, out_w), any factor, with a gradient that
/// accumulates correctly.
pub fn resize2d(x: &Tensor, out_h: usize, out_w: usize, mode: ResizeMode) -> CResult<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if out_h == 0 || out_w == 0 || h == 0 || w == 0 {
        candle_core::bail!("resize2d: sizes must be positive ({h}x{w} to {out_h}x{out_w})")
    }
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    if device_path(x) {
        return composed_resize(x, out_h, out_w, mode);
    }
    x.contiguous()?.apply_op1(ResizeFwd { out: (out_h, out_w), mode })
}

/// Nearest upsampling by an integer factor.
pub fn upsample_nearest(x: &Tensor, factor: usize) -> CResult<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    resize2d(x, h * factor, w * factor, ResizeMode::Nearest)
}

/// Convolution parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConvParams {
    /// Zero padding on each side.
    pub padding: usize,
    /// Stride.
    pub stride: usize,
    /// Dilation.
    pub dilation: usize,
    /// Groups.
    pub groups: usize,
}

impl Default for ConvParams {
    fn default() -> Self {
        ConvParams { padding: 0, stride: 1, dilation: 1, groups: 1 }
    }
}

/// 2-D convolution of (N, C, H, W) by (O, C/groups, KH, KW) whose backward works at every
/// shape. candle derives the backward's output padding from the height alone, which breaks
/// strided convolutions on inputs whose height and width leave different remainders. Here the
/// input is padded explicitly and trimmed to exactly the rows and columns the windows read, so no
/// output padding is ever needed; the result is identical to the plain convolution.
///
/// Ungrouped convolutions of CPU f32/f64 tensors go to [`crate::conv::conv2d`], whose forward and
/// both gradients are GEMMs (several times faster than candle's backward); the rest use candle.
pub fn conv2d(x: &Tensor, w: &Tensor, p: ConvParams) -> CResult<Tensor> {
    if p.groups == 1 && crate::conv::supports(x, w) {
        let spec = crate::conv::ConvSpec { padding: p.padding, stride: p.stride, dilation: p.dilation };
        return crate::conv::conv2d(x, w, spec);
    }
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let span_h = p.dilation * (kh - 1) + 1;
    let span_w = p.dilation * (kw - 1) + 1;
    let (hp, wp) = (h + 2 * p.padding, wd + 2 * p.padding);
    if hp < span_h || wp < span_w {
        candle_core::bail!("conv2d: input {h}x{wd} (padding {}) is smaller than the kernel span", p.padding)
    }
    let oh = (hp - span_h) / p.stride + 1;
    let ow = (wp - span_w) / p.stride + 1;
    let (uh, uw) = ((oh - 1) * p.stride + span_h, (ow - 1) * p.stride + span_w);
    if p.stride == 1 || (uh == hp && uw == wp) {
        return x.conv2d(w, p.padding, p.stride, p.dilation, p.groups);
    }
    let mut xp = x.clone();
    if p.padding > 0 {
        xp = xp.pad_with_zeros(2, p.padding, p.padding)?.pad_with_zeros(3, p.padding, p.padding)?;
    }
    let xp = xp.narrow(2, 0, uh)?.narrow(3, 0, uw)?;
    xp.conv2d(w, 0, p.stride, p.dilation, p.groups)
}

/// Numerically stable binary cross-entropy with logits, averaged over all elements:
/// `max(x, 0) - x * t + log(1 + exp(-|x|))`. Finite for every finite logit, in f32 too.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    bce_with_logits_elementwise(logits, targets)?.mean_all()
}

/// The per-element stable binary cross-entropy with logits (no reduction).
pub fn bce_with_logits_elementwise(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    let targets = targets.to_dtype(logits.dtype())?;
    let softplus_neg_abs = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    (logits.relu()? - (logits * targets)?)? + softplus_neg_abs
}

/// One minus the soft Dice coefficient of each image, averaged over the batch: for logits and
/// 0/1 targets of shape (N, ...), with p = sigmoid(logits),
/// `1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)` per image (the 1 keeps an empty mask's loss
/// finite and near 0 when nothing is predicted). Per image, so that a small lesion weighs as
/// much as a large one, as in the per-image Jaccard it stands in for.
pub fn soft_dice_loss(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    let n = logits.dim(0)?;
    let p = candle_nn::ops::sigmoid(logits)?.reshape((n, ()))?;
    let t = targets.to_dtype(logits.dtype())?.reshape((n, ()))?;
    let inter = (&p * &t)?.sum(1)?;
    let total = (p.sum(1)? + t.sum(1)?)?;
    let dice = ((inter * 2.0)? + 1.0)?.div(&(total + 1.0)?)?;
    dice.neg()?.mean_all()? + 1.0
}

/// The Lovász hinge of each image (Berman, Triki and Blaschko 2018), averaged over the batch: a
/// convex surrogate of one minus the image's Jaccard index, for logits and 0/1 targets of shape
/// (N, ...). Each pixel's hinge error `max(0, 1 - logit * sign)` (sign +1 on the lesion, -1 off
/// it) is weighted by the rise in the Jaccard loss when that pixel joins the pixels with larger
/// errors; the weights sum to one, so all-zero logits score 1 whatever the mask, and errors that
/// are 0 or 1 score exactly one minus the Jaccard index of the prediction they stand for. Per
/// image, as the per-image Jaccard the ISIC challenges score. The weights depend only on the
/// order of the errors: they are computed on the host from a detached copy (one sort per image),
/// and the gradient flows through the errors.
pub fn lovasz_hinge_loss(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    let n = logits.dim(0)?;
    let y = logits.reshape((n, ()))?;
    let t = targets.to_dtype(logits.dtype())?.reshape((n, ()))?;
    let signs = t.affine(2.0, -1.0)?;
    let errors = (&y * &signs)?.affine(-1.0, 1.0)?;
    let host = |x: &Tensor| x.detach().to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?.to_vec2::<f32>();
    let (e, l) = (host(&errors)?, host(&t)?);
    let mut weights = Vec::with_capacity(n * e.first().map_or(0, Vec::len));
    for (e, l) in e.iter().zip(&l) {
        weights.extend(lovasz_weights(e, l));
    }
    let w = Tensor::from_vec(weights, y.shape(), &candle_core::Device::Cpu)?
        .to_dtype(logits.dtype())?
        .to_device(logits.device())?;
    (errors.relu()? * w)?.sum(1)?.mean_all()
}

/// The Lovász extension's weight of each pixel of one image: with the pixels in decreasing order
/// of `errors`, the Jaccard loss of the first k minus that of the first k - 1 (labels above 0.5
/// are the lesion).
fn lovasz_weights(errors: &[f32], labels: &[f32]) -> Vec<f32> {
    let mut order: Vec<usize> = (0..errors.len()).collect();
    order.sort_unstable_by(|&a, &b| errors[b].total_cmp(&errors[a]));
    let positives = labels.iter().filter(|&&l| l > 0.5).count() as f64;
    let (mut missed, mut false_alarms, mut before) = (0.0, 0.0, 0.0);
    let mut w = vec![0f32; errors.len()];
    for k in order {
        if labels[k] > 0.5 {
            missed += 1.0;
        } else {
            false_alarms += 1.0;
        }
        // At least one pixel counted: the union is positive even for an empty mask.
        let jaccard_loss = 1.0 - (positives - missed) / (positives + false_alarms);
        w[k] = (jaccard_loss - before) as f32;
        before = jaccard_loss;
    }
    w
}

/// Log-softmax along `dim`, stable (the maximum is subtracted as a constant).
pub fn log_softmax<Dm: candle_core::shape::Dim + Copy>(x: &Tensor, dim: Dm) -> CResult<Tensor> {
    let m = x.max_keepdim(dim)?.detach();
    let z = x.broadcast_sub(&m)?;
    let lse = z.exp()?.sum_keepdim(dim)?.log()?;
    z.broadcast_sub(&lse)
}

/// Softmax along `dim`, with a gradient (unlike candle's fused `softmax_last_dim`).
pub fn softmax<Dm: candle_core::shape::Dim + Copy>(x: &Tensor, dim: Dm) -> CResult<Tensor> {
    log_softmax(x, dim)?.exp()
}

/// Mean cross-entropy of (N, K) logits against (N,) class indices (u32), optionally weighted per
/// class (weights of shape (K,)); the weighted mean divides by the sum of the targets' weights.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, class_weights: Option<&Tensor>) -> CResult<Tensor> {
    let lsm = log_softmax(logits, D::Minus1)?;
    let t = targets.to_dtype(DType::U32)?.unsqueeze(1)?;
    let nll = lsm.gather(&t, 1)?.squeeze(1)?.neg()?;
    match class_weights {
        None => nll.mean_all(),
        Some(w) => {
            let wt = w.to_dtype(logits.dtype())?.gather(&t.squeeze(1)?, 0)?;
            // A tensor division: the sum stays on the device, and any float dtype works.
            (nll * &wt)?.sum_all()?.broadcast_div(&wt.sum_all()?)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use derm_core::Rng;

    /// Checks the gradient of `f` at a random f64 input of `shape` against central finite
    /// differences of `sum(f(x) * R)`. Returns the relative error (max abs difference over the
    /// largest numeric gradient).
    pub(crate) fn grad_error(shape: &[usize], seed: u64, f: impl Fn(&Tensor) -> CResult<Tensor>) -> f64 {
        let mut rng = Rng::new(seed);
        let n: usize = shape.iter().product();
        let x0: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let x = Var::from_vec(x0.clone(), shape, &Device::Cpu).unwrap();
        let y = f(x.as_tensor()).unwrap();
        let r: Vec<f64> = (0..y.elem_count()).map(|_| rng.normal()).collect();
        let r = Tensor::from_vec(r, y.shape(), &Device::Cpu).unwrap();
        let loss = (y * &r).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<f64> = grads
            .get(x.as_tensor())
            .map(|g| g.flatten_all().unwrap().to_vec1().unwrap())
            .unwrap_or_else(|| vec![0.0; n]);
        let eval = |v: &[f64]| -> f64 {
            let t = Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap();
            (f(&t).unwrap() * &r).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let eps = 1e-6;
        let mut num = vec![0.0; n];
        let mut xv = x0.clone();
        for i in 0..n {
            xv[i] = x0[i] + eps;
            let a = eval(&xv);
            xv[i] = x0[i] - eps;
            let b = eval(&xv);
            xv[i] = x0[i];
            num[i] = (a - b) / (2.0 * eps);
        }
        let scale = num.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
        let diff = g.iter().zip(&num).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        diff / scale
    }

    #[test]
    fn max_pool_gradient_is_not_scaled_and_handles_any_window() {
        // candle: [[1,2],[3,4]] gives [0,0,0,0.25]; the right answer is [0,0,0,1].
        let x = Var::from_vec(vec![1f64, 2., 3., 4.], (1, 1, 2, 2), &Device::Cpu).unwrap();
        let y = max_pool2d(x.as_tensor(), Pool2d::square(2, 2, 0)).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let g: Vec<f64> = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(g, vec![0., 0., 0., 1.]);
        for (geo, shape) in [
            (Pool2d::square(2, 2, 0), [2, 3, 8, 9]),
            (Pool2d::square(3, 2, 1), [1, 2, 9, 8]), // the ResNet stem pool
            (Pool2d::square(3, 1, 1), [1, 2, 5, 7]),
            (Pool2d { kernel: (2, 3), stride: (1, 2), padding: (0, 1) }, [1, 1, 6, 7]),
        ] {
            let e = grad_error(&shape, 1, |x| max_pool2d(x, geo));
            assert!(e < 1e-6, "{geo:?} {shape:?}: {e}");
        }
    }

    #[test]
    fn max_pool_ties_send_the_gradient_to_the_first_maximum() {
        // A plane of zeros (as after a ReLU) with one 1 at (1, 2), 3x3 windows with stride 2 and
        // padding 1: a window without the 1 sends its gradient to its first in-image element.
        let mut v = vec![0f32; 16];
        v[6] = 1.0;
        let x = Var::from_vec(v, (1, 1, 4, 4), &Device::Cpu).unwrap();
        let y = max_pool2d(x.as_tensor(), Pool2d::square(3, 2, 1)).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // Windows: (0,0) covers rows 0-1, cols 0-1 -> (0,0); (0,1) rows 0-1, cols 1-3 -> (1,2);
        // (1,0) rows 1-3, cols 0-1 -> (1,0); (1,1) rows 1-3, cols 1-3 -> (1,2).
        let mut want = vec![0f32; 16];
        want[0] = 1.0;
        want[6] = 2.0;
        want[4] = 1.0;
        assert_eq!(g, want);
    }

    #[test]
    fn max_pool_forward_matches_candle_where_candle_is_right() {
        let mut rng = Rng::new(2);
        let x = Tensor::from_vec(rng.normal_vec(2 * 3 * 8 * 10, 0.0, 1.0), (2, 3, 8, 10), &Device::Cpu).unwrap();
        let a = max_pool2d(&x, Pool2d::square(2, 2, 0)).unwrap();
        let b = x.max_pool2d(2).unwrap();
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let a = avg_pool2d(&x, Pool2d::square(2, 2, 0)).unwrap();
        let b = x.avg_pool2d(2).unwrap();
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6);
    }

    #[test]
    fn avg_pool_gradient_with_overlapping_windows() {
        for (geo, shape) in [(Pool2d::square(3, 1, 1), [1, 2, 5, 6]), (Pool2d::square(3, 2, 0), [2, 1, 7, 9])] {
            let e = grad_error(&shape, 3, |x| avg_pool2d(x, geo));
            assert!(e < 1e-6, "{geo:?}: {e}");
        }
    }

    #[test]
    fn resize_gradients_accumulate_and_allow_any_factor() {
        for (oh, ow, mode) in [
            (6, 6, ResizeMode::Nearest),
            (8, 12, ResizeMode::Nearest),
            (3, 5, ResizeMode::Nearest),
            (7, 11, ResizeMode::Bilinear),
            (3, 2, ResizeMode::Bilinear),
        ] {
            let e = grad_error(&[1, 2, 4, 5], 4, |x| resize2d(x, oh, ow, mode));
            assert!(e < 1e-6, "{oh}x{ow} {mode:?}: {e}");
        }
        // The input also feeds another consumer: candle overwrites, we accumulate (gradient 2).
        let x = Var::from_vec(vec![1f64, 2., 3., 4.], (1, 1, 2, 2), &Device::Cpu).unwrap();
        let up = upsample_nearest(x.as_tensor(), 2).unwrap();
        let y = (avg_pool2d(&up, Pool2d::square(2, 2, 0)).unwrap() + x.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let g: Vec<f64> = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(g, vec![2.0; 4]);
    }

    /// The forward and the gradient of `sum(f(x) * R)` for one f64 input, on the CPU kernels or
    /// (when `device`) the composed path.
    fn run_path(
        shape: &[usize],
        seed: u64,
        device: bool,
        f: &dyn Fn(&Tensor) -> CResult<Tensor>,
    ) -> (Vec<f64>, Vec<f64>) {
        let go = || {
            let mut rng = Rng::new(seed);
            let n: usize = shape.iter().product();
            let x = Var::from_vec(rng.normal_vec(n, 0.0, 1.0).iter().map(|&v| v as f64).collect(), shape, &Device::Cpu)
                .unwrap();
            let y = f(x.as_tensor()).unwrap();
            let r: Vec<f64> = (0..y.elem_count()).map(|_| rng.normal()).collect();
            let r = Tensor::from_vec(r, y.shape(), &Device::Cpu).unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            (y.flatten_all().unwrap().to_vec1::<f64>().unwrap(), g)
        };
        if device {
            with_device_path(go)
        } else {
            go()
        }
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()))
    }

    #[test]
    fn device_path_pooling_and_resizing_equal_the_cpu_kernels() {
        type Op = Box<dyn Fn(&Tensor) -> CResult<Tensor>>;
        let cases: Vec<(&str, Vec<usize>, Op)> = vec![
            ("max 2x2/2", vec![2, 3, 8, 9], Box::new(|x| max_pool2d(x, Pool2d::square(2, 2, 0)))),
            ("max 3x3/2 p1 (stem)", vec![1, 2, 9, 8], Box::new(|x| max_pool2d(x, Pool2d::square(3, 2, 1)))),
            ("max 3x3/1 p1", vec![1, 2, 5, 7], Box::new(|x| max_pool2d(x, Pool2d::square(3, 1, 1)))),
            (
                "max 2x3/(1,2) p(0,1)",
                vec![1, 1, 6, 7],
                Box::new(|x| max_pool2d(x, Pool2d { kernel: (2, 3), stride: (1, 2), padding: (0, 1) })),
            ),
            ("avg 3x3/1 p1", vec![1, 2, 5, 6], Box::new(|x| avg_pool2d(x, Pool2d::square(3, 1, 1)))),
            ("avg 3x3/2", vec![2, 1, 7, 9], Box::new(|x| avg_pool2d(x, Pool2d::square(3, 2, 0)))),
            ("avg 7x7/7 (global)", vec![2, 3, 7, 7], Box::new(|x| avg_pool2d(x, Pool2d::square(7, 7, 0)))),
            ("nearest x2", vec![1, 2, 4, 5], Box::new(|x| upsample_nearest(x, 2))),
            ("nearest 8x12", vec![1, 2, 4, 5], Box::new(|x| resize2d(x, 8, 12, ResizeMode::Nearest))),
            ("nearest 3x5", vec![1, 2, 4, 5], Box::new(|x| resize2d(x, 3, 5, ResizeMode::Nearest))),
            ("bilinear 7x11", vec![1, 2, 4, 5], Box::new(|x| resize2d(x, 7, 11, ResizeMode::Bilinear))),
            ("bilinear 3x2", vec![1, 2, 4, 5], Box::new(|x| resize2d(x, 3, 2, ResizeMode::Bilinear))),
            ("bilinear 16x16", vec![2, 1, 9, 6], Box::new(|x| resize2d(x, 16, 16, ResizeMode::Bilinear))),
        ];
        for (name, shape, f) in &cases {
            let (y_cpu, g_cpu) = run_path(shape, 7, false, f.as_ref());
            let (y_dev, g_dev) = run_path(shape, 7, true, f.as_ref());
            assert!(max_diff(&y_cpu, &y_dev) < 1e-12, "{name}: forward differs");
            assert!(max_diff(&g_cpu, &g_dev) < 1e-12, "{name}: gradient differs");
            // And the device path's gradient against finite differences.
            let e = with_device_path(|| grad_error(shape, 8, |x| f(x)));
            assert!(e < 1e-6, "{name}: device-path gradient error {e}");
        }
        // The forcing is scoped: the CPU kernels are back afterwards (their max-pool ties go to
        // the first maximum; the composed path splits them).
        let x = Var::from_vec(vec![1f64, 1., 0., 0.], (1, 1, 2, 2), &Device::Cpu).unwrap();
        let tie_grad = |device: bool| {
            let go = || {
                let y = max_pool2d(x.as_tensor(), Pool2d::square(2, 2, 0)).unwrap();
                let g = y.sum_all().unwrap().backward().unwrap();
                g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
            };
            if device {
                with_device_path(go)
            } else {
                go()
            }
        };
        assert_eq!(tie_grad(true), vec![0.5, 0.5, 0.0, 0.0]);
        assert_eq!(tie_grad(false), vec![1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn bilinear_matches_pytorch_values() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0.,1.],[2.,3.]]]]), size=(3,3),
        //   mode='bilinear', align_corners=False)
        //   -> [[0.0000, 0.5000, 1.0000], [1.0000, 1.5000, 2.0000], [2.0000, 2.5000, 3.0000]]
        let x = Tensor::from_vec(vec![0f64, 1., 2., 3.], (1, 1, 2, 2), &Device::Cpu).unwrap();
        let y: Vec<f64> = resize2d(&x, 3, 3, ResizeMode::Bilinear).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want = [0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0, 2.5, 3.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{y:?}");
        }
    }

    #[test]
    fn conv2d_backward_at_odd_non_square_shapes() {
        let mut rng = Rng::new(5);
        for (shape, k, p) in [
            ([1, 2, 8, 9], 3, ConvParams { padding: 1, stride: 2, ..Default::default() }),
            ([1, 2, 9, 8], 3, ConvParams { padding: 1, stride: 2, ..Default::default() }),
            ([2, 2, 7, 10], 4, ConvParams { padding: 1, stride: 2, ..Default::default() }),
            ([1, 2, 11, 9], 7, ConvParams { padding: 3, stride: 2, ..Default::default() }),
            ([1, 2, 9, 10], 3, ConvParams { padding: 2, stride: 1, dilation: 2, groups: 1 }),
        ] {
            let w = Tensor::from_vec(rng.normal_vec(3 * 2 * k * k, 0.0, 1.0), (3, 2, k, k), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let e = grad_error(&shape, 6, |x| conv2d(x, &w, p));
            assert!(e < 1e-6, "{shape:?} k{k} {p:?}: {e}");
            // Same values as the plain convolution.
            let x = Tensor::ones(&shape[..], DType::F64, &Device::Cpu).unwrap();
            let a = conv2d(&x, &w, p).unwrap();
            let b = x.conv2d(&w, p.padding, p.stride, p.dilation, p.groups).unwrap();
            assert_eq!(a.dims(), b.dims());
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(d < 1e-12);
        }
        // Weight gradient as well.
        let x = Tensor::from_vec(rng.normal_vec(2 * 9 * 8, 0.0, 1.0), (1, 2, 9, 8), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let p = ConvParams { padding: 1, stride: 2, ..Default::default() };
        let e = grad_error(&[3, 2, 3, 3], 7, |w| conv2d(&x, w, p));
        assert!(e < 1e-6, "weight grad {e}");
    }

    #[test]
    fn bce_is_finite_at_extreme_logits_and_has_the_right_gradient() {
        let logits = Tensor::new(&[17f32, 20., -110., 0.5, 1e4, -1e4], &Device::Cpu).unwrap();
        let t = Tensor::new(&[0f32, 1., 1., 0., 0., 1.], &Device::Cpu).unwrap();
        let v: Vec<f32> = bce_with_logits_elementwise(&logits, &t).unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
        assert!((v[0] - 17.0).abs() < 1e-4 && v[1] < 1e-7 && (v[2] - 110.0).abs() < 1e-3);
        let lv = Var::from_vec(vec![17f32, 20., -110., 0.5], 4, &Device::Cpu).unwrap();
        let t4 = t.narrow(0, 0, 4).unwrap();
        let g = bce_with_logits(lv.as_tensor(), &t4).unwrap().backward().unwrap();
        let g: Vec<f32> = g.get(lv.as_tensor()).unwrap().to_vec1().unwrap();
        assert!(g.iter().all(|x| x.is_finite()), "{g:?}");
        // d/dx = (sigmoid(x) - t) / n.
        assert!((g[0] - 0.25).abs() < 1e-6 && (g[2] + 0.25).abs() < 1e-6, "{g:?}");
        let tt = Tensor::new(&[0f64, 1., 1., 0., 0.3, 1.], &Device::Cpu).unwrap();
        let e = grad_error(&[6], 8, |x| bce_with_logits_elementwise(&(x * 5.0)?, &tt));
        assert!(e < 1e-6, "{e}");
    }

    #[test]
    fn soft_dice_is_per_image_and_has_the_right_gradient() {
        let dev = Device::Cpu;
        // Image 0: a right prediction of half its pixels; image 1: an empty mask, nothing predicted.
        let t = Tensor::new(&[[1f32, 1., 0., 0.], [0., 0., 0., 0.]], &dev).unwrap();
        let right = Tensor::new(&[[30f32, 30., -30., -30.], [-30., -30., -30., -30.]], &dev).unwrap();
        let l = soft_dice_loss(&right, &t).unwrap().to_scalar::<f32>().unwrap();
        assert!(l.abs() < 1e-5, "{l}");
        // The first image wrong: 1 - 1/5 for it, 0 for the other, 0.4 on average.
        let wrong = Tensor::new(&[[-30f32, -30., 30., 30.], [-30., -30., -30., -30.]], &dev).unwrap();
        let l = soft_dice_loss(&wrong, &t).unwrap().to_scalar::<f32>().unwrap();
        assert!((l - 0.4).abs() < 1e-5, "{l}");
        let tt = Tensor::new(&[[1f64, 0., 1.], [0., 1., 1.]], &dev).unwrap();
        let e = grad_error(&[2, 3], 10, |x| soft_dice_loss(x, &tt));
        assert!(e < 1e-6, "{e}");
    }

    #[test]
    fn lovasz_hinge_is_the_jaccard_loss_on_binary_errors_and_has_the_right_gradient() {
        let dev = Device::Cpu;
        let t = Tensor::new(&[[1f32, 1., 0., 0.], [0., 0., 0., 0.]], &dev).unwrap();
        let loss = |logits: &[[f32; 4]; 2]| {
            lovasz_hinge_loss(&Tensor::new(logits, &dev).unwrap(), &t).unwrap().to_scalar::<f32>().unwrap()
        };
        // Every pixel right by the margin: 0. All logits 0: 1 for each image, whatever its mask.
        assert!(loss(&[[1., 2., -1., -3.], [-1., -1., -1., -1.]]).abs() < 1e-6);
        assert!((loss(&[[0.; 4]; 2]) - 1.0).abs() < 1e-6);
        // Errors of 0 or 1: image 0 misses pixel 1 and claims pixel 2, Jaccard 1/3, loss 2/3; image 1
        // claims one pixel of an empty mask, Jaccard 0, loss 1. Mean 5/6.
        let l = loss(&[[1., 0., 0., -1.], [-1., 0., -1., -1.]]);
        assert!((l - 5.0 / 6.0).abs() < 1e-6, "{l}");
        // Errors of 2 count twice: the loss is linear in them for a fixed order.
        let l = loss(&[[1., -1., 1., -1.], [-1., -1., -1., -1.]]);
        assert!((l - 2.0 * 2.0 / 3.0 / 2.0).abs() < 1e-6, "{l}");
        let tt = Tensor::new(&[[1f64, 0., 1., 1., 0.], [0., 1., 0., 0., 0.]], &dev).unwrap();
        let e = grad_error(&[2, 5], 11, |x| lovasz_hinge_loss(x, &tt));
        assert!(e < 1e-6, "{e}");
    }

    #[test]
    fn softmax_and_cross_entropy_have_gradients() {
        let e = grad_error(&[3, 5], 9, |x| softmax(x, D::Minus1));
        assert!(e < 1e-6, "softmax {e}");
        let e = grad_error(&[2, 3, 4], 10, |x| log_softmax(x, 1));
        assert!(e < 1e-6, "log_softmax {e}");
        let t = Tensor::new(&[0u32, 2, 1], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f64, 2., 0.5], &Device::Cpu).unwrap();
        let e = grad_error(&[3, 3], 11, |x| cross_entropy(x, &t, Some(&w)));
        assert!(e < 1e-6, "ce {e}");
        // Weighted cross-entropy in f32 as well.
        let l32 = Tensor::new(&[[0f32, 1.], [2., 0.]], &Device::Cpu).unwrap();
        let w32 = Tensor::new(&[1f32, 3.], &Device::Cpu).unwrap();
        let t2 = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        let v = cross_entropy(&l32, &t2, Some(&w32)).unwrap().to_scalar::<f32>().unwrap();
        let want = (1.0 * (1.0 + 1f32.exp()).ln() + 3.0 * (1.0 + 2f32.exp()).ln()) / 4.0;
        assert!((v - want).abs() < 1e-5, "{v} {want}");
        // Value check against a hand computation: logits [0, 0] target 0 -> ln 2.
        let l = Tensor::new(&[[0f64, 0.]], &Device::Cpu).unwrap();
        let v = cross_entropy(&l, &Tensor::new(&[0u32], &Device::Cpu).unwrap(), None).unwrap();
        assert!((v.to_scalar::<f64>().unwrap() - 2f64.ln()).abs() < 1e-12);
    }
}
