//! Fused CPU kernels for the work around convolutions: batch normalisation (with a ReLU, and with
//! a residual added before the ReLU), a convolution followed by batch norm as one op, ReLU and
//! leaky ReLU, a per-channel bias, and the parity interleave of a stride-2 transposed convolution.
//!
//! candle composes batch norm from about ten tensor ops (a transpose and copy, means, broadcast
//! subtract, square, divide, multiply, add, copy back), each a full pass over memory that
//! allocates its output, and each with its own backward. ReLU's backward is four passes, and the
//! backward of a broadcast bias add is a strided reduction. Every graph node also costs, in
//! backward, a zero-filled gradient and an addition in candle's gradient store. Profiling a U-Net
//! training step on the 2-core machine put more time into those passes than into the
//! convolutions. Here each op is one candle custom op whose forward is one or two passes and whose
//! backward is one custom op of one or two passes, parallel over channels or planes with rayon;
//! fusing the convolution with its batch norm keeps the convolution's output out of the graph.
//!
//! Two details decide the speed: the per-channel sums (batch statistics and the backward's
//! reductions) use AVX2 + FMA when the CPU has them (the compiler keeps float sums in order and
//! will not vectorise them), and element-wise loops are written branch-free and into
//! uninitialised outputs (no zeroing pass). `cargo run -p derm-kernels --example fused_bw` measures
//! their memory throughput.
//!
//! Tensors are (N, C, ...) with any number of trailing dimensions (batch norm of (N, C) works too).
//! The kernels run on CPU f32/f64; on other devices and dtypes the functions fall back to the
//! equivalent candle composition, so results never depend on the path. Each op has an f64
//! finite-difference gradient test and a comparison with the composition.

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu::{as_f32, data, float_dispatch};

type CResult<T> = candle_core::Result<T>;

/// (N, C, S): batch, channels, and the product of the remaining dimensions.
fn ncs(name: &str, shape: &Shape) -> CResult<(usize, usize, usize)> {
    let d = shape.dims();
    if d.len() < 2 {
        candle_core::bail!("{name}: input must be (N, C, ...), got {d:?}")
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

/// Whether the fused kernels apply: CPU tensors of f32 or f64.
fn fusable(x: &Tensor) -> bool {
    crate::ops::host_kernels(x) && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// `x` reshaped so that a per-channel vector broadcasts against it: (1, C, 1, ...).
fn channel_view(v: &Tensor, x: &Tensor) -> CResult<Tensor> {
    let mut dims = vec![1; x.rank()];
    dims[1] = v.elem_count();
    v.reshape(dims)
}

/// Elements per parallel task for the flat element-wise kernels.
const CHUNK: usize = 1 << 14;

/// A vector of `n` elements written by `fill(i, chunk)` on consecutive chunks of `chunk`
/// elements (the last may be shorter), in parallel, without zeroing the memory first (a full
/// extra pass for these memory-bound kernels). Every `fill` below zips its chunk with input
/// slices at least as long, so it writes each element; that is checked before the length is set.
fn par_write<T: WithDType>(
    n: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync + Send,
) -> Vec<T> {
    let chunk = chunk.max(1);
    let mut v: Vec<T> = Vec::with_capacity(n);
    let written: usize = v.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk)
        .enumerate()
        .map(|(i, c)| {
            fill(i, c);
            c.len()
        })
        .sum();
    assert_eq!(written, n, "par_write: chunks cover the vector");
    // SAFETY: the `n` elements were handed out in disjoint chunks, and each caller's `fill`
    // writes every element of its chunk (see above).
    unsafe { v.set_len(n) };
    v
}

/// Runs `f` on the elements of `t` as one contiguous f32 slice, without copying when `t` is
/// already a contiguous CPU f32 tensor (else on a converted copy).
pub fn read_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> CResult<R> {
    let t = t.to_device(&candle_core::Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match (&*st, l.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
        _ => candle_core::bail!("read_f32: expected a contiguous CPU f32 tensor"),
    }
}

/// The mean over channels of (N, C, ...): N maps of the remaining dimensions, one parallel pass
/// that adds whole planes (candle's mean over dimension 1 reduces with a strided walk).
pub fn channel_mean_maps(t: &Tensor) -> CResult<Vec<Vec<f32>>> {
    let (n, c, s) = ncs("channel mean", t.shape())?;
    read_f32(t, |x| {
        (0..n)
            .map(|i| {
                let img = &x[i * c * s..(i + 1) * c * s];
                let mut out = vec![0f32; s];
                let chunk = s.div_ceil(rayon::current_num_threads().max(1) * 4).max(1024);
                out.par_chunks_mut(chunk).enumerate().for_each(|(k, o)| {
                    let off = k * chunk;
                    for ch in 0..c {
                        let plane = &img[ch * s + off..ch * s + off + o.len()];
                        for (a, &b) in o.iter_mut().zip(plane) {
                            *a += b;
                        }
                    }
                    let inv = 1.0 / c as f32;
                    o.iter_mut().for_each(|a| *a *= inv);
                });
                out
            })
            .collect()
    })
}

// ---------------------------------------------------------------------------------------------
// ReLU

/// The leaky ReLU of `x` into `out` (as long as `x` or shorter). Written without data-dependent
/// branches and with the slope passed by value, so that the loop vectorises.
#[inline(never)]
fn leaky_chunk<T: WithDType>(x: &[T], out: &mut [MaybeUninit<T>], k: T) {
    let z = T::zero();
    for (o, &v) in out.iter_mut().zip(x) {
        let pos = if v > z { v } else { z };
        let neg = if v < z { v } else { z };
        o.write(pos + neg * k);
    }
}

/// `dy` where `y > 0`, `k * dy` elsewhere, into `out`.
#[inline(never)]
fn leaky_bwd_chunk<T: WithDType>(y: &[T], dy: &[T], out: &mut [MaybeUninit<T>], k: T) {
    let z = T::zero();
    for ((o, &a), &g) in out.iter_mut().zip(y).zip(dy) {
        let f = if a > z { T::one() } else { k };
        o.write(g * f);
    }
}

/// `x` where positive, `slope * x` elsewhere (slope 0: ReLU).
struct Leaky(f64);

impl CustomOp1 for Leaky {
    fn name(&self) -> &'static str {
        "derm-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        crate::ops::note_cpu_kernel();
        let _span = crate::profile::span(self.name());
        fn run<T: WithDType>(x: &[T], slope: f64) -> Vec<T> {
            let k = T::from_f64(slope);
            par_write(x.len(), CHUNK, |i, y| leaky_chunk(&x[i * CHUNK..], y, k))
        }
        let out = float_dispatch!("relu", s, |T| T::to_cpu_storage_owned(run::<T>(data(self.name(), s, l)?, self.0)));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&dy.contiguous()?, &LeakyBwd(self.0))?))
    }
}

/// (y, dy) -> dy where y > 0, slope * dy elsewhere (y > 0 exactly where x > 0 for slope >= 0).
struct LeakyBwd(f64);

impl CustomOp2 for LeakyBwd {
    fn name(&self) -> &'static str {
        "derm-relu-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        crate::ops::note_cpu_kernel();
        let _span = crate::profile::span(self.name());
        fn run<T: WithDType>(y: &[T], dy: &[T], slope: f64) -> Vec<T> {
            let k = T::from_f64(slope);
            par_write(y.len(), CHUNK, |i, dx| leaky_bwd_chunk(&y[i * CHUNK..], &dy[i * CHUNK..], dx, k))
        }
        let out = float_dispatch!("relu backward", s1, |T| {
            T::to_cpu_storage_owned(run::<T>(data(self.name(), s1, l1)?, data(self.name(), s2, l2)?, self.0))
        });
        Ok((out, l1.shape().clone()))
    }
}

/// What an op left in its side-output slot (an op returns one tensor; the others it computes in
/// the same pass go through a shared slot); `what` names it in the error when the slot is empty.
fn side_output<T: Clone>(slot: &Mutex<Option<T>>, what: &str) -> CResult<T> {
    slot.lock().ok().and_then(|g| g.clone()).ok_or_else(|| candle_core::Error::Msg(format!("no {what}")))
}

/// The gradients of `y = x + b` per channel (or `y = relu(x + b)` with `relu`) from `dy`: the
/// input's (`dy`, masked where `y` is not positive) and the bias's (its sum per channel, shaped
/// like `b`), in one pass with the ReLU.
pub(crate) fn bias_grads(y: &Tensor, dy: &Tensor, b: &Tensor, relu: bool) -> CResult<(Tensor, Tensor)> {
    let dy = dy.contiguous()?;
    if !relu {
        let db = dy.apply_op1_no_bwd(&ChannelSums)?.reshape(b.shape())?;
        return Ok((dy, db));
    }
    let sums = Arc::new(Mutex::new(None));
    let g = y.apply_op2_no_bwd(&dy, &ReluBiasBwd { sums: sums.clone() })?;
    let db = side_output(&sums, "bias gradient from the ReLU-bias backward")?;
    Ok((g, Tensor::from_vec(db, b.shape(), b.device())?.to_dtype(b.dtype())?))
}

/// (y, dy) of shape (N, C, ...) -> dy where y > 0 and 0 elsewhere, with the per-channel sums of
/// that result (a bias's gradient under a ReLU) left in `sums`: the mask and the sums in one
/// pass instead of a masking pass and a summing pass.
struct ReluBiasBwd {
    sums: Arc<Mutex<Option<Vec<f64>>>>,
}

impl CustomOp2 for ReluBiasBwd {
    fn name(&self) -> &'static str {
        "derm-relu-bias-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        crate::ops::note_cpu_kernel();
        let _span = crate::profile::span(self.name());
        fn run<T: WithDType>(y: &[T], dy: &[T], (n, c, s): (usize, usize, usize)) -> (Vec<T>, Vec<f64>) {
            let total = n * c * s;
            let mut out: Vec<T> = Vec::with_capacity(total);
            let planes: Vec<f64> = out.spare_capacity_mut()[..total]
                .par_chunks_mut(s)
                .zip(y.par_chunks(s).zip(dy.par_chunks(s)))
                .map(|(o, (y, dy))| {
                    // The masked plane is written, then summed while it is still in cache, by
                    // the two vectorised kernels of the separate ops.
                    leaky_bwd_chunk(y, dy, o, T::zero());
                    // SAFETY: `leaky_bwd_chunk` wrote every element of `o` (its inputs are as
                    // long), and `MaybeUninit<T>` has the layout of `T`.
                    let o = unsafe { &*(o as *const [MaybeUninit<T>] as *const [T]) };
                    o.chunks(RUN).map(|run| shifted_sums(run, T::zero()).0).sum::<f64>()
                })
                .collect();
            // SAFETY: the zip above pairs each of the n * c output planes of `s` elements with
            // input planes of the same length (checked by the caller) and writes every element.
            unsafe { out.set_len(total) };
            let sums = (0..c).map(|ch| (0..n).map(|i| planes[i * c + ch]).sum()).collect();
            (out, sums)
        }
        let dims = ncs(self.name(), l1.shape())?;
        if l2.shape() != l1.shape() || dims.2 == 0 {
            candle_core::bail!("{}: output {:?} and gradient {:?} must match", self.name(), l1.shape(), l2.shape())
        }
        let (out, sums) = float_dispatch!("relu bias backward", s1, |T| {
            let (v, sums) = run::<T>(data(self.name(), s1, l1)?, data(self.name(), s2, l2)?, dims);
            (T::to_cpu_storage_owned(v), sums)
        });
        if let Ok(mut g) = self.sums.lock() {
            *g = Some(sums);
        }
        Ok((out, l1.shape().clone()))
    }
}

/// `max(x, 0)`, with a one-pass forward and a one-pass backward (candle's backward takes four).
pub fn relu(x: &Tensor) -> CResult<Tensor> {
    if fusable(x) {
        x.contiguous()?.apply_op1(Leaky(0.0))
    } else {
        x.relu()
    }
}

/// Leaky ReLU: `x` where positive, `slope * x` elsewhere (`slope` >= 0), one pass each way.
pub fn leaky_relu(x: &Tensor, slope: f64) -> CResult<Tensor> {
    if slope < 0.0 {
        candle_core::bail!("leaky relu: slope {slope} must be >= 0")
    }
    if fusable(x) {
        x.contiguous()?.apply_op1(Leaky(slope))
    } else {
        candle_nn::ops::leaky_relu(x, slope)
    }
}

// ---------------------------------------------------------------------------------------------
// Parity interleave (the last step of a 4x4 / stride-2 transposed convolution done as one
// 2x2 convolution with an output group per output parity)

/// (N, 4 C, H + 1, W + 1) -> (N, C, 2H, 2W): `out[n, c, 2i + a, 2j + b] = y[n, (2a + b) C + c,
/// i + a, j + b]`.
struct ParityInterleave {
    c: usize,
    h: usize,
    w: usize,
}

impl ParityInterleave {
    /// Calls `f(dst_index, src_index)` for every output element of image-channel plane `plane`
    /// (output-major order within the plane).
    #[inline]
    fn for_plane(&self, plane: usize, mut f: impl FnMut(usize, usize)) {
        let (c, h, w) = (self.c, self.h, self.w);
        let (n, ch) = (plane / c, plane % c);
        let (sh, sw) = (h + 1, w + 1);
        for oy in 0..2 * h {
            let (i, a) = (oy / 2, oy % 2);
            for ox in 0..2 * w {
                let (j, b) = (ox / 2, ox % 2);
                let src = (((n * 4 + 2 * a + b) * c + ch) * sh + i + a) * sw + j + b;
                f((plane * 2 * h + oy) * 2 * w + ox, src);
            }
        }
    }
}

impl CustomOp1 for ParityInterleave {
    fn name(&self) -> &'static str {
        "derm-parity-interleave"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        crate::ops::note_cpu_kernel();
        let _span = crate::profile::span(self.name());
        let d = l.shape().dims();
        if d.len() != 4 || d[1] != 4 * self.c || d[2] != self.h + 1 || d[3] != self.w + 1 {
            candle_core::bail!("parity interleave: input {d:?} for C={} H={} W={}", self.c, self.h, self.w)
        }
        let (n, plane) = (d[0], 4 * self.h * self.w);
        let out = float_dispatch!("parity interleave", s, |T| {
            let y = data::<T>(self.name(), s, l)?;
            T::to_cpu_storage_owned(par_write(n * self.c * plane, plane, |p, o| {
                let base = p * plane;
                self.for_plane(p, |dst, src| {
                    o[dst - base].write(y[src]);
                });
            }))
        });
        Ok((out, Shape::from((n, self.c, 2 * self.h, 2 * self.w))))
    }

    fn bwd(&self, y: &Tensor, _out: &Tensor, dout: &Tensor) -> CResult<Option<Tensor>> {
        let op = ParityScatter { c: self.c, h: self.h, w: self.w, n: y.dim(0)? };
        Ok(Some(dout.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// The backward of [`ParityInterleave`]: each output gradient back to its source; the sources no
/// output reads (the extra row and column of each parity group) get zero.
struct ParityScatter {
    c: usize,
    h: usize,
    w: usize,
    n: usize,
}

impl CustomOp1 for ParityScatter {
    fn name(&self) -> &'static str {
        "derm-parity-interleave-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        crate::ops::note_cpu_kernel();
        let _span = crate::profile::span(self.name());
        let (c, h, w, n) = (self.c, self.h, self.w, self.n);
        let fwd = ParityInterleave { c, h, w };
        let (src_len, plane) = (n * 4 * c * (h + 1) * (w + 1), 4 * h * w);
        let out = float_dispatch!("parity interleave backward", s, |T| {
            let g = data::<T>(self.name(), s, l)?;
            if g.len() != n * c * plane {
                candle_core::bail!(
                    "parity interleave backward: {} gradient values for {n}x{c}x{}x{}",
                    g.len(),
                    2 * h,
                    2 * w
                )
            }
            let mut gy = vec![T::from_f64(0.0); src_len];
            // Each source element receives exactly one output; planes write disjoint sources, but
            // of four channel groups, so the scatter runs image by image in parallel.
            let per_image = 4 * c * (h + 1) * (w + 1);
            gy.par_chunks_mut(per_image).enumerate().for_each(|(img, dst)| {
                for ch in 0..c {
                    let p = img * c + ch;
                    fwd.for_plane(p, |o, src| dst[src - img * per_image] = g[o]);
                }
            });
            T::to_cpu_storage_owned(gy)
        });
        Ok((out, Shape::from((n, 4 * c, h + 1, w + 1))))
    }
}

/// `out[n, c, 2i + a, 2j + b] = y[n, (2a + b) C + c, i + a, j + b]` for `y` of shape
/// (N, 4 C, H + 1, W + 1): the four parity planes of a 4x4 / stride-2 transposed convolution,
/// computed as one 2x2 convolution on the padded input, interleaved into (N, C, 2H, 2W) in one
/// pass (and its gradient scattered back in one), where slicing and stacking would copy each
/// plane twice forward and pad it with zeros four times backward.
pub fn parity_interleave(y: &Tensor, c: usize, h: usize, w: usize) -> CResult<Tensor> {
    if fusable(y) {
        return y.contiguous()?.apply_op1(ParityInterleave { c, h, w });
    }
    let part =
        |a: usize, b: usize| -> CResult<Tensor> { y.narrow(1, (2 * a + b) * c, c)?.narrow(2, a, h)?.narrow(3, b, w) };
    let row = |a: usize| -> CResult<Tensor> { Tensor::stack(&[part(a, 0)?, part(a, 1)?], 4) };
    Tensor::stack(&[row(0)?, row(1)?], 3)?.reshape((y.dim(0)?, c, 2 * h, 2 * w))
}

// ---------------------------------------------------------------------------------------------
// Per-channel bias

/// `x + b` per channel, followed by a ReLU when the flag is set.
struct ChannelBias(bool);

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "derm-channel-bias"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        crate::ops::note_cpu_kernel();
        let _span = crate::profile::span(self.name());
        fn run<T: WithDType>(x: &[T], b: &[T], c: usize, s: usize, relu: bool) -> Vec<T> {
            let zero = T::zero();
            par_write(x.len(), s, |p, y| {
                let bv = b[p % c];
                if relu {
                    for (o, &v) in y.iter_mut().zip(&x[p * s..]) {
                        let t = v + bv;
                        o.write(if t > zero { t } else { zero });
                    }
                } else {
                    for (o, &v) in y.iter_mut().zip(&x[p * s..]) {
                        o.write(v + bv);
                    }
                }
            })
        }
        let (_, c, s) = ncs(self.name(), l1.shape())?;
        if l2.shape().elem_count() != c {
            candle_core::bail!("channel bias: {} values for {c} channels", l2.shape().elem_count())
        }
        let out = float_dispatch!("channel bias", s1, |T| {
            T::to_cpu_storage_owned(run::<T>(
                data(self.name(), s1, l1)?,
                data(self.name(), s2, l2)?,
                c,
                s.max(1),
                self.0,
            ))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, b: &Tensor, y: &Tensor, dy: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (g, db) = bias_grads(y, dy, b, self.0)?;
        Ok((Some(g), Some(db)))
    }
}

/// (N, C, ...) -> (C,): the sum of each channel.
struct ChannelSums;

impl CustomOp1 for ChannelSums {
    fn name(&self) -> &'static str {
        "derm-channel-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        crate::ops::note_cpu_kernel();
        let _span = crate::profile::span(self.name());
        fn run<T: WithDType>(x: &[T], n: usize, c: usize, s: usize) -> Vec<T> {
            (0..c)
                .into_par_iter()
                .map(|ch| {
                    let mut acc = 0f64;
                    for i in 0..n {
                        for run in x[(i * c + ch) * s..(i * c + ch + 1) * s].chunks(RUN) {
                            acc += shifted_sums(run, T::zero()).0;
                        }
                    }
                    T::from_f64(acc)
                })
                .collect()
        }
        let (n, c, sp) = ncs(self.name(), l.shape())?;
        let out = float_dispatch!("channel sums", s, |T| T::to_cpu_storage_owned(run::<T>(
            data(self.name(), s, l)?,
            n,
            c,
            sp
        )));
        Ok((out, Shape::from(c)))
    }
}

/// `x + b` with `b` of shape (C,) (or any shape of C elements) added to channel 1 of (N, C, ...).
/// The backward passes the gradient through and sums it per channel in one pass, where candle's
/// broadcast add reduces over strided dimensions.
pub fn add_channel_bias(x: &Tensor, b: &Tensor) -> CResult<Tensor> {
    if fusable(x) && b.dtype() == x.dtype() && b.device().is_cpu() {
        x.contiguous()?.apply_op2(&b.contiguous()?, ChannelBias(false))
    } else {
        x.broadcast_add(&channel_view(b, x)?)
    }
}

/// `relu(x + b)` with `b` per channel (a convolution's bias and its activation), one pass each
/// way and one graph node.
pub fn add_channel_bias_relu(x: &Tensor, b: &Tensor) -> CResult<Tensor> {
    if fusable(x) && b.dtype() == x.dtype() && b.device().is_cpu() {
        x.contiguous()?.apply_op2(&b.contiguous()?, ChannelBias(true))
    } else {
        relu(&x.broadcast_add(&channel_view(b, x)?)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Batch normalisation

/// The per-channel statistics a batch-norm call normalised with.
#[derive(Debug, Clone, PartialEq)]
pub struct BnStats {
    /// Mean of each channel.
    pub mean: Vec<f64>,
    /// Biased (population) variance of each channel.
    pub var: Vec<f64>,
    /// Values per channel (N times the spatial size).
    pub count: usize,
}

/// The statistics of a train-mode batch-norm call, for the caller's running averages: host
/// vectors from the CPU kernels (which computed them anyway), tensors left on their device from
/// the composed path (reading them back would stall a GPU once per layer).
#[derive(Debug, Clone)]
pub enum BatchStats {
    /// From the CPU kernels.
    Host(BnStats),
    /// From the composed path: per-channel mean and biased variance, (C,), on the input's device.
    Device {
        /// Mean of each channel.
        mean: Tensor,
        /// Biased variance of each channel.
        var: Tensor,
        /// Values per channel.
        count: usize,
    },
}

impl BatchStats {
    /// Values per channel.
    pub fn count(&self) -> usize {
        match self {
            BatchStats::Host(s) => s.count,
            BatchStats::Device { count, .. } => *count,
        }
    }

    /// Mean and biased variance as f64 tensors of shape (C,) on `device` (no copy for device
    /// statistics already there).
    pub fn tensors(&self, device: &candle_core::Device) -> CResult<(Tensor, Tensor)> {
        match self {
            BatchStats::Host(s) => {
                Ok((Tensor::new(s.mean.as_slice(), device)?, Tensor::new(s.var.as_slice(), device)?))
            }
            BatchStats::Device { mean, var, .. } => {
                // Already on the running averages' device in every use (no `to_device`, which
                // the transfer count of a device-path step would flag).
                let f = |t: &Tensor| {
                    let t = t.to_dtype(DType::F64)?.flatten_all()?;
                    if t.device().same_device(device) {
                        Ok(t)
                    } else {
                        t.to_device(device)
                    }
                };
                Ok((f(mean)?, f(var)?))
            }
        }
    }

    /// The host statistics, if these came from the CPU kernels.
    pub fn host(&self) -> Option<&BnStats> {
        match self {
            BatchStats::Host(s) => Some(s),
            BatchStats::Device { .. } => None,
        }
    }
}

/// The forward op on (x, gamma, beta).
struct BnFwd {
    core: BnCore,
    /// The operands are (x, [gamma; beta], residual) and the residual is added before the ReLU;
    /// else they are (x, gamma, beta).
    residual: bool,
}

/// What every batch-norm forward op holds, and the normalisation and its backward they share.
struct BnCore {
    eps: f64,
    /// A ReLU after the normalisation (always, when a residual is added).
    relu: bool,
    /// Fixed statistics (eval mode); none to use the batch's own (train mode).
    fixed: Option<(Vec<f64>, Vec<f64>)>,
    /// What the forward normalised with, for the backward and the running averages.
    stats: Arc<Mutex<Option<BnStats>>>,
}

impl BnCore {
    fn new(eps: f64, relu: bool, fixed: Option<(Vec<f64>, Vec<f64>)>) -> BnCore {
        BnCore { eps, relu, fixed, stats: Arc::new(Mutex::new(None)) }
    }

    /// Normalises `x` (N, C, S) with weights `gb` = [gamma; beta] (plus `res`, then the ReLU),
    /// keeping the statistics it used.
    #[allow(clippy::too_many_arguments)]
    fn forward<T: WithDType>(
        &self,
        name: &str,
        x: &[T],
        gb: &[f64],
        res: Option<&[T]>,
        (n, c, s): (usize, usize, usize),
    ) -> CResult<Vec<T>> {
        if n * s == 0 {
            candle_core::bail!("{name}: empty input")
        }
        if gb.len() != 2 * c {
            candle_core::bail!("{name}: {} weights and biases for {c} channels", gb.len())
        }
        if res.is_some_and(|r| r.len() != x.len()) {
            candle_core::bail!("{name}: residual of another size than the input ({} values)", x.len())
        }
        let (mean, var) = match &self.fixed {
            Some((m, v)) => (m.clone(), v.clone()),
            None => channel_moments(x, n, c, s),
        };
        let (scale, shift) = scale_shift(&mean, &var, &gb[..c], &gb[c..], self.eps);
        let y = normalise(x, res, &scale, &shift, c, s, self.relu || res.is_some());
        if let Ok(mut g) = self.stats.lock() {
            *g = Some(BnStats { mean, var, count: n * s });
        }
        Ok(y)
    }

    /// (dx, [dgamma; dbeta] shaped like `gb`, and with `residual` the residual's gradient: dy
    /// masked by the ReLU) for the input `x` of the normalisation, its output `y` and the output
    /// gradient `dy`.
    fn backward(
        &self,
        x: &Tensor,
        gb: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        residual: bool,
    ) -> CResult<(Tensor, Tensor, Option<Tensor>)> {
        let stats = side_output(&self.stats, "forward statistics for the batch-norm backward")?;
        let mut gamma = gb.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        gamma.truncate(gamma.len() / 2);
        let sums = Arc::new(Mutex::new(None));
        let op =
            BnBwd { eps: self.eps, relu: self.relu, train: self.fixed.is_none(), gamma, stats, sums: sums.clone() };
        let dy = dy.contiguous()?;
        let dx = x.apply_op3_no_bwd(y, &dy, &op)?;
        let (mut dgb, dbeta) = side_output(&sums, "parameter gradients from the batch-norm backward")?;
        dgb.extend(dbeta);
        let dgb = Tensor::from_vec(dgb, gb.shape(), gb.device())?.to_dtype(gb.dtype())?;
        let dres = if residual { Some(y.apply_op2_no_bwd(&dy, &LeakyBwd(0.0))?) } else { None };
        Ok((dx, dgb, dres))
    }
}

/// Per-channel mean and biased variance. Values are summed in the input precision in runs of 256
/// around a shift (the channel's first value, so that large means do not cancel the variance),
/// and the runs in f64.
fn channel_moments<T: WithDType>(x: &[T], n: usize, c: usize, s: usize) -> (Vec<f64>, Vec<f64>) {
    let per: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let k = x[ch * s];
            let (mut s1, mut s2) = (0f64, 0f64);
            for i in 0..n {
                for run in x[(i * c + ch) * s..(i * c + ch + 1) * s].chunks(RUN) {
                    let (a, b) = shifted_sums(run, k);
                    s1 += a;
                    s2 += b;
                }
            }
            let m = (n * s) as f64;
            let mean_d = s1 / m;
            (k.to_f64() + mean_d, (s2 / m - mean_d * mean_d).max(0.0))
        })
        .collect();
    per.into_iter().unzip()
}

/// Values summed in the input precision before a run's sum is added in f64.
const RUN: usize = 512;
/// Independent accumulators per sum: float additions are not reassociated by the compiler, so
/// a single accumulator is a chain of dependent adds; eight lanes vectorise.
const LANES: usize = 8;

/// The sum of squares of `v`, in f64 (vectorised, in runs of [`RUN`] values).
pub fn sum_of_squares(v: &[f32]) -> f64 {
    v.chunks(RUN).map(|run| shifted_sums(run, 0f32).1).sum()
}

/// AVX2 + FMA reductions for f32 (the portable loops above do not vectorise: the compiler keeps
/// float sums in order). Each run is at most [`RUN`] values; sums are taken in two f32
/// accumulators of eight lanes and finished in f64.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// Whether the CPU has AVX2 and FMA (checked once).
    pub fn available() -> bool {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f64 {
        // SAFETY: the caller checked AVX2; the store writes the eight-lane array.
        unsafe {
            let mut a = [0f32; 8];
            _mm256_storeu_ps(a.as_mut_ptr(), v);
            a.iter().map(|&x| x as f64).sum()
        }
    }

    /// (sum (v - k), sum (v - k)^2).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn shifted_sums(v: &[f32], k: f32) -> (f64, f64) {
        // SAFETY: the caller checked AVX2 and FMA; every load is inside the slices (i + 16 <= n).
        unsafe {
            let n = v.len();
            let kv = _mm256_set1_ps(k);
            let (mut a0, mut a1, mut b0, mut b1) =
                (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
            let p = v.as_ptr();
            let mut i = 0;
            while i + 16 <= n {
                let d0 = _mm256_sub_ps(_mm256_loadu_ps(p.add(i)), kv);
                let d1 = _mm256_sub_ps(_mm256_loadu_ps(p.add(i + 8)), kv);
                a0 = _mm256_add_ps(a0, d0);
                a1 = _mm256_add_ps(a1, d1);
                b0 = _mm256_fmadd_ps(d0, d0, b0);
                b1 = _mm256_fmadd_ps(d1, d1, b1);
                i += 16;
            }
            let (mut sa, mut sb) = (hsum(_mm256_add_ps(a0, a1)), hsum(_mm256_add_ps(b0, b1)));
            for &x in &v[i..] {
                let d = (x - k) as f64;
                sa += d;
                sb += d * d;
            }
            (sa, sb)
        }
    }

    /// (sum g, sum g (x - m)) with g = dy, masked by y > 0 when `RELU`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn grad_sums<const RELU: bool>(x: &[f32], y: &[f32], dy: &[f32], m: f32) -> (f64, f64) {
        // SAFETY: the caller checked AVX2 and FMA; every load is inside the slices (i + 16 <= n).
        unsafe {
            let n = x.len().min(y.len()).min(dy.len());
            let (mv, zero) = (_mm256_set1_ps(m), _mm256_setzero_ps());
            let (mut a0, mut a1, mut b0, mut b1) = (zero, zero, zero, zero);
            let (px, py, pg) = (x.as_ptr(), y.as_ptr(), dy.as_ptr());
            let mut i = 0;
            while i + 16 <= n {
                let mut g0 = _mm256_loadu_ps(pg.add(i));
                let mut g1 = _mm256_loadu_ps(pg.add(i + 8));
                if RELU {
                    g0 = _mm256_and_ps(g0, _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_loadu_ps(py.add(i)), zero));
                    g1 = _mm256_and_ps(g1, _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_loadu_ps(py.add(i + 8)), zero));
                }
                let d0 = _mm256_sub_ps(_mm256_loadu_ps(px.add(i)), mv);
                let d1 = _mm256_sub_ps(_mm256_loadu_ps(px.add(i + 8)), mv);
                a0 = _mm256_add_ps(a0, g0);
                a1 = _mm256_add_ps(a1, g1);
                b0 = _mm256_fmadd_ps(g0, d0, b0);
                b1 = _mm256_fmadd_ps(g1, d1, b1);
                i += 16;
            }
            let (mut sa, mut sb) = (hsum(_mm256_add_ps(a0, a1)), hsum(_mm256_add_ps(b0, b1)));
            for j in i..n {
                let g = if !RELU || y[j] > 0.0 { dy[j] as f64 } else { 0.0 };
                sa += g;
                sb += g * (x[j] - m) as f64;
            }
            (sa, sb)
        }
    }
}

/// (sum (v - k), sum (v - k)^2) over `run`, in f64.
#[inline]
fn shifted_sums<T: WithDType>(run: &[T], k: T) -> (f64, f64) {
    if let Some((run, k)) = as_f32(run).zip(as_f32(std::slice::from_ref(&k))) {
        #[cfg(target_arch = "x86_64")]
        if simd::available() {
            // SAFETY: AVX2 and FMA were detected at run time.
            return unsafe { simd::shifted_sums(run, k[0]) };
        }
    }
    let (mut a, mut b) = ([T::zero(); LANES], [T::zero(); LANES]);
    let mut it = run.chunks_exact(LANES);
    for ch in &mut it {
        for l in 0..LANES {
            let d = ch[l] - k;
            a[l] += d;
            b[l] += d * d;
        }
    }
    let (mut sa, mut sb) = (0f64, 0f64);
    for l in 0..LANES {
        sa += a[l].to_f64();
        sb += b[l].to_f64();
    }
    for &v in it.remainder() {
        let d = (v - k).to_f64();
        sa += d;
        sb += d * d;
    }
    (sa, sb)
}

/// (sum g, sum g (x - m)) over a run, with g = dy masked by y > 0 when `RELU`, in f64.
#[inline(never)]
fn grad_sums<T: WithDType, const RELU: bool>(x: &[T], y: &[T], dy: &[T], m: T) -> (f64, f64) {
    if let (Some(x), Some(y), Some(dy), Some(m)) = (as_f32(x), as_f32(y), as_f32(dy), as_f32(std::slice::from_ref(&m)))
    {
        #[cfg(target_arch = "x86_64")]
        if simd::available() {
            // SAFETY: AVX2 and FMA were detected at run time.
            return unsafe { simd::grad_sums::<RELU>(x, y, dy, m[0]) };
        }
    }
    let z = T::zero();
    let (mut a, mut b) = ([z; LANES], [z; LANES]);
    let (xc, yc, gc) = (x.chunks_exact(LANES), y.chunks_exact(LANES), dy.chunks_exact(LANES));
    let (xr, yr, gr) = (xc.remainder(), yc.remainder(), gc.remainder());
    for ((xs, ys), gs) in xc.zip(yc).zip(gc) {
        for l in 0..LANES {
            let g = if !RELU || ys[l] > z { gs[l] } else { z };
            a[l] += g;
            b[l] += g * (xs[l] - m);
        }
    }
    let (mut sa, mut sb) = (0f64, 0f64);
    for l in 0..LANES {
        sa += a[l].to_f64();
        sb += b[l].to_f64();
    }
    for ((&xv, &yv), &gv) in xr.iter().zip(yr).zip(gr) {
        let g = if !RELU || yv > z { gv.to_f64() } else { 0.0 };
        sa += g;
        sb += g * (xv - m).to_f64();
    }
    (sa, sb)
}

/// The input gradient of one plane: `a g - b (x - m) - c0`, with g = dy masked by y > 0 when
/// `RELU`, into `out`.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn bn_grad_plane<T: WithDType, const RELU: bool>(
    x: &[T],
    y: &[T],
    dy: &[T],
    out: &mut [MaybeUninit<T>],
    (a, b, c0, m): (T, T, T, T),
) {
    let z = T::zero();
    for (((v, &xv), &yv), &gv) in out.iter_mut().zip(x).zip(y).zip(dy) {
        let g = if !RELU || yv > z { gv } else { z };
        v.write(a * g - b * (xv - m) - c0);
    }
}

/// Per-channel `scale = gamma / sqrt(var + eps)` and `shift = beta - mean * scale`.
fn scale_shift(mean: &[f64], var: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>) {
    let scale: Vec<f64> = gamma.iter().zip(var).map(|(g, v)| g / (v + eps).sqrt()).collect();
    let shift: Vec<f64> = beta.iter().zip(mean).zip(&scale).map(|((b, m), a)| b - m * a).collect();
    (scale, shift)
}

/// `x * scale + shift` per channel of (N, C, S) planes, plus `res` and then a ReLU when given (a
/// residual always comes with the ReLU), in one pass.
fn normalise<T: WithDType>(
    x: &[T],
    res: Option<&[T]>,
    scale: &[f64],
    shift: &[f64],
    c: usize,
    s: usize,
    relu: bool,
) -> Vec<T> {
    let zero = T::zero();
    par_write(x.len(), s, |p, y| {
        let (a, b) = (T::from_f64(scale[p % c]), T::from_f64(shift[p % c]));
        let x = &x[p * s..(p + 1) * s];
        match (res, relu) {
            (Some(r), _) => {
                for ((o, &v), &q) in y.iter_mut().zip(x).zip(&r[p * s..(p + 1) * s]) {
                    let t = v * a + b + q;
                    o.write(if t > zero { t } else { zero });
                }
            }
            (None, true) => {
                for (o, &v) in y.iter_mut().zip(x) {
                    let t = v * a + b;
                    o.write(if t > zero { t } else { zero });
                }
            }
            (None, false) => {
                for (o, &v) in y.iter_mut().zip(x) {
                    o.write(v * a + b);
                }
            }
        }
    })
}

/// Fixed (eval-mode) statistics as host vectors.
fn host_stats(fixed: Option<(&Tensor, &Tensor)>) -> CResult<Option<(Vec<f64>, Vec<f64>)>> {
    let host = |t: &Tensor| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
    Ok(match fixed {
        Some((m, v)) => Some((host(m)?, host(v)?)),
        None => None,
    })
}

/// Runs a normalising forward op on three operands; returns the output and, in train mode, the
/// batch statistics it left in `stats`.
fn launch(
    args: [&Tensor; 3],
    op: Box<dyn CustomOp3 + Send + Sync>,
    stats: &Mutex<Option<BnStats>>,
    train: bool,
) -> CResult<(Tensor, Option<BatchStats>)> {
    let y = args[0].contiguous()?.apply_op3_arc(&args[1].contiguous()?, &args[2].contiguous()?, Arc::new(op))?;
    let st = if train { stats.lock().ok().and_then(|g| g.clone()).map(BatchStats::Host) } else { None };
    Ok((y, st))
}

impl CustomOp3 for BnFwd {
    fn name(&self) -> &'static str {
        "derm-batch-norm"
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
        let _span = crate::profile::span(self.name());
        let ncs = ncs(self.name(), l1.shape())?;
        let out = float_dispatch!("batch norm", s1, |T| {
            let x = data::<T>(self.name(), s1, l1)?;
            let host =
                |s, l| -> CResult<Vec<f64>> { Ok(data::<T>(self.name(), s, l)?.iter().map(|v| v.to_f64()).collect()) };
            let y = if self.residual {
                self.core.forward(self.name(), x, &host(s2, l2)?, Some(data::<T>(self.name(), s3, l3)?), ncs)?
            } else {
                let mut gb = host(s2, l2)?;
                gb.extend(host(s3, l3)?);
                self.core.forward(self.name(), x, &gb, None, ncs)?
            };
            T::to_cpu_storage_owned(y)
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        arg2: &Tensor,
        arg3: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.residual {
            let (dx, dgb, dres) = self.core.backward(x, arg2, y, dy, true)?;
            return Ok((Some(dx), Some(dgb), dres));
        }
        let c = arg2.elem_count();
        let gb = Tensor::cat(&[&arg2.flatten_all()?, &arg3.flatten_all()?], 0)?;
        let (dx, dgb, _) = self.core.backward(x, &gb, y, dy, false)?;
        Ok((
            Some(dx),
            Some(dgb.narrow(0, 0, c)?.reshape(arg2.shape())?),
            Some(dgb.narrow(0, c, c)?.reshape(arg3.shape())?),
        ))
    }
}

/// Where the backward leaves (dgamma, dbeta).
type ParamGrads = Arc<Mutex<Option<(Vec<f64>, Vec<f64>)>>>;

/// The backward op on (x, y, dy), given the forward's statistics and the weights; stores
/// (dgamma, dbeta) for the caller.
struct BnBwd {
    eps: f64,
    relu: bool,
    train: bool,
    gamma: Vec<f64>,
    stats: BnStats,
    sums: ParamGrads,
}

impl CustomOp3 for BnBwd {
    fn name(&self) -> &'static str {
        "derm-batch-norm-bwd"
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
        let _span = crate::profile::span(self.name());
        let (n, c, s) = ncs(self.name(), l1.shape())?;
        if self.stats.mean.len() != c || self.gamma.len() != c {
            candle_core::bail!("batch norm backward: statistics for {} channels, input has {c}", self.stats.mean.len())
        }
        let out = float_dispatch!("batch norm backward", s1, |T| {
            let x = data::<T>(self.name(), s1, l1)?;
            let y = data::<T>(self.name(), s2, l2)?;
            let dy = data::<T>(self.name(), s3, l3)?;
            let (dx, dgamma, dbeta) = self.run(x, y, dy, n, c, s);
            if let Ok(mut g) = self.sums.lock() {
                *g = Some((dgamma, dbeta));
            }
            T::to_cpu_storage_owned(dx)
        });
        Ok((out, l1.shape().clone()))
    }
}

impl BnBwd {
    /// (dx, dgamma, dbeta). With xhat = (x - mean) * invstd and g the incoming gradient:
    /// dbeta = sum g, dgamma = sum g * xhat; in train mode
    /// dx = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)), in eval mode gamma * invstd * g.
    fn run<T: WithDType>(
        &self,
        x: &[T],
        y: &[T],
        dy: &[T],
        n: usize,
        c: usize,
        s: usize,
    ) -> (Vec<T>, Vec<f64>, Vec<f64>) {
        let st = &self.stats;
        let relu = self.relu;
        let invstd: Vec<f64> = st.var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        // Pass 1: per channel, sum g and sum g * (x - mean), in runs of 256 in the input precision.
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let m = T::from_f64(st.mean[ch]);
                let (mut sg, mut sgx) = (0f64, 0f64);
                for i in 0..n {
                    let o = (i * c + ch) * s;
                    for ((xr, yr), gr) in
                        x[o..o + s].chunks(RUN).zip(y[o..o + s].chunks(RUN)).zip(dy[o..o + s].chunks(RUN))
                    {
                        let (a, b) = if relu {
                            grad_sums::<T, true>(xr, yr, gr, m)
                        } else {
                            grad_sums::<T, false>(xr, yr, gr, m)
                        };
                        sg += a;
                        sgx += b;
                    }
                }
                (sg, sgx * invstd[ch])
            })
            .collect();
        let (dbeta, dgamma): (Vec<f64>, Vec<f64>) = sums.into_iter().unzip();
        // Pass 2: dx = a * g - b * (x - mean) - c0 per channel.
        let count = st.count as f64;
        let coef: Vec<(T, T, T, T)> = (0..c)
            .map(|ch| {
                let a = self.gamma[ch] * invstd[ch];
                let (b, c0) =
                    if self.train { (a * invstd[ch] * dgamma[ch] / count, a * dbeta[ch] / count) } else { (0.0, 0.0) };
                (T::from_f64(a), T::from_f64(b), T::from_f64(c0), T::from_f64(st.mean[ch]))
            })
            .collect();
        let dx = par_write(x.len(), s, |p, out| {
            let (o, k) = (p * s, coef[p % c]);
            let (x, y, dy) = (&x[o..o + s], &y[o..o + s], &dy[o..o + s]);
            if relu {
                bn_grad_plane::<T, true>(x, y, dy, out, k)
            } else {
                bn_grad_plane::<T, false>(x, y, dy, out, k)
            }
        });
        (dx, dgamma, dbeta)
    }
}

/// Batch normalisation of (N, C, ...) over every dimension but the channels, with per-channel
/// weight `gamma` and bias `beta`, followed by a ReLU when `relu` is set.
///
/// `fixed` gives the statistics to normalise with (eval mode: the running mean and variance);
/// without it the batch's own are used (train mode) and returned, so that the caller can update
/// its running averages. The gradient reaches `x`, `gamma` and `beta` in both modes.
pub fn batch_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    fixed: Option<(&Tensor, &Tensor)>,
    eps: f64,
    relu: bool,
) -> CResult<(Tensor, Option<BatchStats>)> {
    let (_, c, _) = ncs("batch norm", x.shape())?;
    for (what, t) in [("weight", gamma), ("bias", beta)] {
        if t.elem_count() != c {
            candle_core::bail!("batch norm: {what} has {} values, the input {c} channels", t.elem_count())
        }
    }
    if !fusable(x) || gamma.dtype() != x.dtype() || beta.dtype() != x.dtype() {
        return batch_norm_composed(x, gamma, beta, fixed, eps, relu);
    }
    let fixed = host_stats(fixed)?;
    let train = fixed.is_none();
    let core = BnCore::new(eps, relu, fixed);
    let stats = core.stats.clone();
    let op = BnFwd { core, residual: false };
    launch([x, gamma, beta], Box::new(op), &stats, train)
}

/// `relu(batch_norm(x) + residual)` in one pass forward (the end of a ResNet block), with
/// `residual` of the shape of `x`. Statistics and modes as [`batch_norm`].
pub fn batch_norm_add_relu(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    residual: &Tensor,
    fixed: Option<(&Tensor, &Tensor)>,
    eps: f64,
) -> CResult<(Tensor, Option<BatchStats>)> {
    let (_, c, _) = ncs("batch norm", x.shape())?;
    if residual.shape() != x.shape() {
        candle_core::bail!("batch norm: residual {:?} for an input {:?}", residual.dims(), x.dims())
    }
    let same = [gamma, beta, residual].iter().all(|t| t.dtype() == x.dtype() && t.device().is_cpu());
    if !fusable(x) || !same || gamma.elem_count() != c || beta.elem_count() != c {
        let (y, st) = batch_norm(x, gamma, beta, fixed, eps, false)?;
        return Ok((relu(&(y + residual)?)?, st));
    }
    let fixed = host_stats(fixed)?;
    let train = fixed.is_none();
    let core = BnCore::new(eps, true, fixed);
    let stats = core.stats.clone();
    let op = BnFwd { core, residual: true };
    let gb = Tensor::cat(&[&gamma.flatten_all()?, &beta.flatten_all()?], 0)?;
    launch([x, &gb, residual], Box::new(op), &stats, train)
}

/// The forward op of a convolution followed by batch norm (and a ReLU), on (x, w, [gamma; beta]).
/// The convolution's output is kept for the backward; it never becomes a graph node, so its
/// gradient is not accumulated through candle's gradient store (a zero-filled tensor and an
/// addition per node).
struct ConvBnFwd {
    spec: crate::conv::ConvSpec,
    core: BnCore,
    /// With a residual the operands are (x, [w; gamma; beta], residual), `w` of these dims, and
    /// the output is `relu(bn(conv(x)) + residual)`; else (x, w, [gamma; beta]).
    residual: Option<(usize, usize, usize, usize)>,
    conv_out: Mutex<Option<Tensor>>,
}

impl CustomOp3 for ConvBnFwd {
    fn name(&self) -> &'static str {
        "derm-conv-batch-norm"
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
        use candle_core::CustomOp2 as _;
        let (z, shape) = match self.residual {
            // The weight is the head of the packed parameters.
            Some(wd) => {
                let wl = Layout::contiguous_with_offset(wd, l2.start_offset());
                crate::conv::Conv2dOp(self.spec).cpu_fwd(s1, l1, s2, &wl)?
            }
            None => crate::conv::Conv2dOp(self.spec).cpu_fwd(s1, l1, s2, l2)?,
        };
        let _span = crate::profile::span("derm-batch-norm");
        let zl = Layout::contiguous(shape.clone());
        let ncs = ncs(self.name(), &shape)?;
        let out = float_dispatch!("conv batch norm", &z, |T| {
            let zv = data::<T>(self.name(), &z, &zl)?;
            let to_f64 = |v: &[T]| -> Vec<f64> { v.iter().map(|x| x.to_f64()).collect() };
            let y = match self.residual {
                Some((o, ci, kh, kw)) => {
                    let packed = data::<T>(self.name(), s2, l2)?;
                    let wn = (o * ci * kh * kw).min(packed.len());
                    self.core.forward(
                        self.name(),
                        zv,
                        &to_f64(&packed[wn..]),
                        Some(data::<T>(self.name(), s3, l3)?),
                        ncs,
                    )?
                }
                None => self.core.forward(self.name(), zv, &to_f64(data::<T>(self.name(), s3, l3)?), None, ncs)?,
            };
            T::to_cpu_storage_owned(y)
        });
        // The convolution's output, kept (without a copy) for the backward.
        let z = match z {
            CpuStorage::F32(v) => Tensor::from_vec(v, shape.clone(), &candle_core::Device::Cpu)?,
            CpuStorage::F64(v) => Tensor::from_vec(v, shape.clone(), &candle_core::Device::Cpu)?,
            other => candle_core::bail!(
                "conv batch norm: f32 or f64 only, got {:?}",
                candle_core::backend::BackendStorage::dtype(&other)
            ),
        };
        if let Ok(mut g) = self.conv_out.lock() {
            *g = Some(z);
        }
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        arg2: &Tensor,
        arg3: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let z = self
            .conv_out
            .lock()
            .ok()
            .and_then(|mut g| g.take())
            .ok_or_else(|| candle_core::Error::Msg("conv batch norm backward: no forward state".into()))?;
        let (w, gb) = match self.residual {
            Some(wd) => {
                let wn = wd.0 * wd.1 * wd.2 * wd.3;
                (arg2.narrow(0, 0, wn)?.reshape(wd)?, arg2.narrow(0, wn, arg2.dim(0)? - wn)?)
            }
            None => (arg2.clone(), arg3.clone()),
        };
        let (dz, dgb, dres) = self.core.backward(&z, &gb, y, dy, self.residual.is_some())?;
        let (gx, gw) = crate::conv::conv_grads(x, &w, &dz, self.spec)?;
        if self.residual.is_none() {
            return Ok((gx, gw, Some(dgb)));
        }
        // The weight's gradient heads the packed one.
        let gw = match gw {
            Some(g) => g.flatten_all()?,
            None => w.zeros_like()?.flatten_all()?,
        };
        Ok((gx, Some(Tensor::cat(&[&gw, &dgb], 0)?), dres))
    }
}

/// `batch_norm(conv2d(x, w))`, with a ReLU when `relu` is set, as one graph node on the CPU (f32
/// or f64, groups 1, no convolution bias): the convolution's output never enters candle's
/// gradient store. Statistics and modes as [`batch_norm`]; elsewhere the two ops run apart.
#[allow(clippy::too_many_arguments)]
pub fn conv_batch_norm(
    x: &Tensor,
    w: &Tensor,
    spec: crate::conv::ConvSpec,
    gamma: &Tensor,
    beta: &Tensor,
    fixed: Option<(&Tensor, &Tensor)>,
    eps: f64,
    relu: bool,
) -> CResult<(Tensor, Option<BatchStats>)> {
    let c = w.dim(0)?;
    let same = [gamma, beta].iter().all(|t| t.dtype() == x.dtype() && t.device().is_cpu() && t.elem_count() == c);
    if !crate::conv::supports(x, w) || !fusable(x) || !same {
        let p =
            crate::ops::ConvParams { padding: spec.padding, stride: spec.stride, dilation: spec.dilation, groups: 1 };
        return batch_norm(&crate::ops::conv2d(x, w, p)?, gamma, beta, fixed, eps, relu);
    }
    let fixed = host_stats(fixed)?;
    let train = fixed.is_none();
    let core = BnCore::new(eps, relu, fixed);
    let stats = core.stats.clone();
    let op = ConvBnFwd { spec, core, residual: None, conv_out: Mutex::new(None) };
    let gb = Tensor::cat(&[&gamma.flatten_all()?, &beta.flatten_all()?], 0)?;
    launch([x, w, &gb], Box::new(op), &stats, train)
}

/// `relu(batch_norm(conv2d(x, w)) + residual)`, the end of a ResNet block, as one graph node
/// (see [`conv_batch_norm`]); the weight travels packed with gamma and beta.
#[allow(clippy::too_many_arguments)]
pub fn conv_batch_norm_add_relu(
    x: &Tensor,
    w: &Tensor,
    spec: crate::conv::ConvSpec,
    gamma: &Tensor,
    beta: &Tensor,
    residual: &Tensor,
    fixed: Option<(&Tensor, &Tensor)>,
    eps: f64,
) -> CResult<(Tensor, Option<BatchStats>)> {
    let c = w.dim(0)?;
    let same = [gamma, beta].iter().all(|t| t.dtype() == x.dtype() && t.device().is_cpu() && t.elem_count() == c);
    if !crate::conv::supports(x, w) || !fusable(x) || !same || residual.dtype() != x.dtype() {
        let p =
            crate::ops::ConvParams { padding: spec.padding, stride: spec.stride, dilation: spec.dilation, groups: 1 };
        return batch_norm_add_relu(&crate::ops::conv2d(x, w, p)?, gamma, beta, residual, fixed, eps);
    }
    let fixed = host_stats(fixed)?;
    let train = fixed.is_none();
    let core = BnCore::new(eps, true, fixed);
    let stats = core.stats.clone();
    let op = ConvBnFwd { spec, core, residual: Some(w.dims4()?), conv_out: Mutex::new(None) };
    let packed = Tensor::cat(&[&w.flatten_all()?, &gamma.flatten_all()?, &beta.flatten_all()?], 0)?;
    let (y, st) = launch([x, &packed, residual], Box::new(op), &stats, train)?;
    if y.shape() != residual.shape() {
        candle_core::bail!("conv batch norm: residual {:?} for an output {:?}", residual.dims(), y.dims())
    }
    Ok((y, st))
}

/// The same normalisation from candle ops (other devices and dtypes).
fn batch_norm_composed(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    fixed: Option<(&Tensor, &Tensor)>,
    eps: f64,
    relu: bool,
) -> CResult<(Tensor, Option<BatchStats>)> {
    let dims: Vec<usize> = (0..x.rank()).filter(|&d| d != 1).collect();
    let (mean, var, stats) = match fixed {
        Some((m, v)) => (channel_view(m, x)?.to_dtype(x.dtype())?, channel_view(v, x)?.to_dtype(x.dtype())?, None),
        None => {
            let mean = x.mean_keepdim(dims.as_slice())?;
            let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim(dims.as_slice())?;
            let count = x.elem_count() / x.dim(1)?;
            let st = BatchStats::Device { mean: mean.detach().flatten_all()?, var: var.detach().flatten_all()?, count };
            (mean, var, Some(st))
        }
    };
    let xhat = x.broadcast_sub(&mean)?.broadcast_div(&(var + eps)?.sqrt()?)?;
    let y = xhat.broadcast_mul(&channel_view(gamma, x)?)?.broadcast_add(&channel_view(beta, x)?)?;
    Ok((if relu { y.relu()? } else { y }, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::grad_error;
    use candle_core::{Device, Var};
    use derm_core::Rng;

    fn randn(rng: &mut Rng, shape: &[usize], dtype: DType) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(rng.normal_vec(n, 0.5, 2.0), shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
        d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn relu_and_bias_gradients_match_finite_differences() {
        let e = grad_error(&[2, 3, 5, 7], 1, relu);
        assert!(e < 1e-6, "relu {e}");
        let e = grad_error(&[2, 3, 5, 7], 1, |x| leaky_relu(x, 0.2));
        assert!(e < 1e-6, "leaky relu {e}");
        let b = Tensor::new(&[0.3f64, -1.0, 2.0], &Device::Cpu).unwrap();
        let e = grad_error(&[2, 3, 5, 7], 2, |x| add_channel_bias(x, &b));
        assert!(e < 1e-6, "bias input {e}");
        let x = randn(&mut Rng::new(3), &[2, 3, 4, 5], DType::F64);
        let e = grad_error(&[3], 4, |b| add_channel_bias(&x, b));
        assert!(e < 1e-6, "bias {e}");
        let e = grad_error(&[2, 3, 5, 7], 5, |x| add_channel_bias_relu(x, &b));
        assert!(e < 1e-6, "bias-relu input {e}");
        let e = grad_error(&[3], 6, |b| add_channel_bias_relu(&x, b));
        assert!(e < 1e-6, "bias-relu bias {e}");
        let want = add_channel_bias(&x, &b.narrow(0, 0, 3).unwrap()).unwrap().relu().unwrap();
        assert_eq!(max_diff(&add_channel_bias_relu(&x, &b).unwrap(), &want), 0.0);
    }

    #[test]
    fn batch_norm_gradients_match_finite_differences_in_both_modes() {
        let mut rng = Rng::new(5);
        let gamma = randn(&mut rng, &[3], DType::F64);
        let beta = randn(&mut rng, &[3], DType::F64);
        let rm = randn(&mut rng, &[3], DType::F64);
        let rv = randn(&mut rng, &[3], DType::F64).abs().unwrap();
        for relu in [false, true] {
            for shape in [[2usize, 3, 5, 7], [4, 3, 1, 1]] {
                let e = grad_error(&shape, 6, |x| Ok(batch_norm(x, &gamma, &beta, None, 1e-5, relu)?.0));
                assert!(e < 1e-6, "train x relu={relu} {shape:?}: {e}");
                let e = grad_error(&shape, 7, |x| Ok(batch_norm(x, &gamma, &beta, Some((&rm, &rv)), 1e-5, relu)?.0));
                assert!(e < 1e-6, "eval x relu={relu} {shape:?}: {e}");
            }
            let x = randn(&mut rng, &[2, 3, 4, 5], DType::F64);
            let e = grad_error(&[3], 8, |g| Ok(batch_norm(&x, g, &beta, None, 1e-5, relu)?.0));
            assert!(e < 1e-6, "gamma relu={relu}: {e}");
            let e = grad_error(&[3], 9, |b| Ok(batch_norm(&x, &gamma, b, None, 1e-5, relu)?.0));
            assert!(e < 1e-6, "beta relu={relu}: {e}");
            let e = grad_error(&[3], 10, |g| Ok(batch_norm(&x, g, &beta, Some((&rm, &rv)), 1e-5, relu)?.0));
            assert!(e < 1e-6, "eval gamma relu={relu}: {e}");
        }
        // The end of a residual block: relu(bn(x) + r), gradients to x, gamma, beta and r.
        let r = randn(&mut rng, &[2, 3, 5, 7], DType::F64);
        let x = randn(&mut rng, &[2, 3, 5, 7], DType::F64);
        let e = grad_error(&[2, 3, 5, 7], 12, |x| Ok(batch_norm_add_relu(x, &gamma, &beta, &r, None, 1e-5)?.0));
        assert!(e < 1e-6, "add-relu x: {e}");
        let e = grad_error(&[2, 3, 5, 7], 13, |r| Ok(batch_norm_add_relu(&x, &gamma, &beta, r, None, 1e-5)?.0));
        assert!(e < 1e-6, "add-relu residual: {e}");
        let e = grad_error(&[3], 14, |g| Ok(batch_norm_add_relu(&x, g, &beta, &r, None, 1e-5)?.0));
        assert!(e < 1e-6, "add-relu gamma: {e}");
        let e = grad_error(&[3], 15, |b| Ok(batch_norm_add_relu(&x, &gamma, b, &r, Some((&rm, &rv)), 1e-5)?.0));
        assert!(e < 1e-6, "add-relu eval beta: {e}");
        let (a, _) = batch_norm_add_relu(&x, &gamma, &beta, &r, None, 1e-5).unwrap();
        let (b, _) = batch_norm(&x, &gamma, &beta, None, 1e-5, false).unwrap();
        let b = (b + &r).unwrap().relu().unwrap();
        assert!(max_diff(&a, &b) < 1e-12);
        // A convolution and batch norm as one node: gradients to x, w, gamma and beta, both modes.
        let spec = crate::conv::ConvSpec { padding: 1, stride: 1, dilation: 1 };
        let xin = randn(&mut rng, &[2, 2, 6, 5], DType::F64);
        let wt = randn(&mut rng, &[3, 2, 3, 3], DType::F64);
        for relu in [false, true] {
            for fixed in [None, Some((&rm, &rv))] {
                let e = grad_error(&[2, 2, 6, 5], 16, |x| {
                    Ok(conv_batch_norm(x, &wt, spec, &gamma, &beta, fixed, 1e-5, relu)?.0)
                });
                assert!(e < 1e-6, "conv-bn x relu={relu}: {e}");
                let e = grad_error(&[3, 2, 3, 3], 17, |w| {
                    Ok(conv_batch_norm(&xin, w, spec, &gamma, &beta, fixed, 1e-5, relu)?.0)
                });
                assert!(e < 1e-6, "conv-bn w relu={relu}: {e}");
                let e = grad_error(&[3], 18, |g| Ok(conv_batch_norm(&xin, &wt, spec, g, &beta, fixed, 1e-5, relu)?.0));
                assert!(e < 1e-6, "conv-bn gamma relu={relu}: {e}");
                let e = grad_error(&[3], 19, |b| Ok(conv_batch_norm(&xin, &wt, spec, &gamma, b, fixed, 1e-5, relu)?.0));
                assert!(e < 1e-6, "conv-bn beta relu={relu}: {e}");
            }
            let (a, sa) = conv_batch_norm(&xin, &wt, spec, &gamma, &beta, None, 1e-5, relu).unwrap();
            let z = crate::conv::conv2d(&xin, &wt, spec).unwrap();
            let (b, sb) = batch_norm(&z, &gamma, &beta, None, 1e-5, relu).unwrap();
            assert!(max_diff(&a, &b) < 1e-12);
            assert_eq!(sa.as_ref().and_then(BatchStats::host), sb.as_ref().and_then(BatchStats::host));
        }
        // The parity interleave against its slicing definition, and its gradient.
        let y6 = randn(&mut rng, &[2, 8, 4, 5], DType::F64);
        let fast = parity_interleave(&y6, 2, 3, 4).unwrap();
        let cpu_slow = {
            let part = |a: usize, b: usize| {
                y6.narrow(1, (2 * a + b) * 2, 2).unwrap().narrow(2, a, 3).unwrap().narrow(3, b, 4).unwrap()
            };
            let row = |a: usize| Tensor::stack(&[part(a, 0), part(a, 1)], 4).unwrap();
            Tensor::stack(&[row(0), row(1)], 3).unwrap().reshape((2, 2, 6, 8)).unwrap()
        };
        assert_eq!(max_diff(&fast, &cpu_slow), 0.0);
        let e = grad_error(&[2, 8, 4, 5], 20, |y| parity_interleave(y, 2, 3, 4));
        assert!(e < 1e-6, "parity interleave: {e}");
        assert!(parity_interleave(&y6, 3, 3, 4).is_err());
        // ... and with a residual added before the ReLU.
        let res = randn(&mut rng, &[2, 3, 6, 5], DType::F64);
        for fixed in [None, Some((&rm, &rv))] {
            let f = |x: &Tensor, w: &Tensor, g: &Tensor, r: &Tensor| {
                Ok(conv_batch_norm_add_relu(x, w, spec, g, &beta, r, fixed, 1e-5)?.0)
            };
            let e = grad_error(&[2, 2, 6, 5], 21, |x| f(x, &wt, &gamma, &res));
            assert!(e < 1e-6, "conv-bn-add x: {e}");
            let e = grad_error(&[3, 2, 3, 3], 22, |w| f(&xin, w, &gamma, &res));
            assert!(e < 1e-6, "conv-bn-add w: {e}");
            let e = grad_error(&[3], 23, |g| f(&xin, &wt, g, &res));
            assert!(e < 1e-6, "conv-bn-add gamma: {e}");
            let e = grad_error(&[2, 3, 6, 5], 24, |r| f(&xin, &wt, &gamma, r));
            assert!(e < 1e-6, "conv-bn-add residual: {e}");
        }
        let (a, _) = conv_batch_norm_add_relu(&xin, &wt, spec, &gamma, &beta, &res, None, 1e-5).unwrap();
        let z = crate::conv::conv2d(&xin, &wt, spec).unwrap();
        let (b, _) = batch_norm_add_relu(&z, &gamma, &beta, &res, None, 1e-5).unwrap();
        assert!(max_diff(&a, &b) < 1e-12);
        // (N, C) inputs, as after a linear layer.
        let g2 = Tensor::new(&[1.5f64, 0.5], &Device::Cpu).unwrap();
        let b2 = Tensor::new(&[0.1f64, -0.2], &Device::Cpu).unwrap();
        let e = grad_error(&[5, 2], 11, |x| Ok(batch_norm(x, &g2, &b2, None, 1e-5, false)?.0));
        assert!(e < 1e-6, "(N, C): {e}");
    }

    #[test]
    fn fused_kernels_equal_the_candle_composition_in_f32() {
        let mut rng = Rng::new(12);
        let x = Var::from_tensor(&randn(&mut rng, &[4, 6, 9, 11], DType::F32)).unwrap();
        let gamma = Var::from_tensor(&randn(&mut rng, &[6], DType::F32)).unwrap();
        let beta = Var::from_tensor(&randn(&mut rng, &[6], DType::F32)).unwrap();
        let w = randn(&mut rng, &[4, 6, 9, 11], DType::F32);
        for relu in [false, true] {
            let (a, sa) = batch_norm(&x, &gamma, &beta, None, 1e-5, relu).unwrap();
            let (b, sb) = batch_norm_composed(&x, &gamma, &beta, None, 1e-5, relu).unwrap();
            assert!(max_diff(&a, &b) < 1e-4, "forward {}", max_diff(&a, &b));
            let (sa, sb) = (sa.unwrap(), sb.unwrap());
            assert_eq!(sa.count(), sb.count());
            // The composed path keeps its statistics as tensors (no host read).
            assert!(sb.host().is_none());
            let host = |s: &BatchStats| s.tensors(&Device::Cpu).unwrap().1.to_vec1::<f64>().unwrap();
            for (p, q) in host(&sa).iter().zip(&host(&sb)) {
                assert!((p - q).abs() < 1e-4 * q.abs().max(1.0), "{p} {q}");
            }
            let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &gamma, &beta] {
                let (p, q) = (ga.get(v).unwrap(), gb.get(v).unwrap());
                let scale = q.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() as f64;
                assert!(max_diff(p, q) < 1e-4 * scale.max(1.0), "relu={relu}: {}", max_diff(p, q));
            }
        }
        let r = relu(&x).unwrap();
        assert_eq!(max_diff(&r, &x.relu().unwrap()), 0.0);
        let maps = channel_mean_maps(&x).unwrap();
        let want = x.mean(1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(maps.len(), 4);
        let got: Vec<f32> = maps.concat();
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5));
        let r = leaky_relu(&x, 0.2).unwrap();
        assert!(max_diff(&r, &candle_nn::ops::leaky_relu(&x, 0.2).unwrap()) < 1e-6);
    }

    #[test]
    fn moments_survive_a_large_mean_and_bad_shapes_fail() {
        // Values 1000 +- 0.01: naive sums of squares in f32 lose the variance entirely.
        let mut rng = Rng::new(13);
        let v: Vec<f32> = (0..2 * 2 * 64).map(|_| 1000.0 + 0.01 * rng.normal() as f32).collect();
        let x = Tensor::from_vec(v.clone(), (2, 2, 8, 8), &Device::Cpu).unwrap();
        let (m, var) = channel_moments(&v, 2, 2, 64);
        let x64 = x.to_dtype(DType::F64).unwrap();
        let (_, st) = batch_norm_composed(
            &x64,
            &Tensor::ones(2, DType::F64, &Device::Cpu).unwrap(),
            &Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap(),
            None,
            1e-5,
            false,
        )
        .unwrap();
        let (sm, sv) = st.unwrap().tensors(&Device::Cpu).unwrap();
        let (sm, sv) = (sm.to_vec1::<f64>().unwrap(), sv.to_vec1::<f64>().unwrap());
        for ch in 0..2 {
            assert!((m[ch] - sm[ch]).abs() < 1e-6);
            assert!((var[ch] - sv[ch]).abs() < 1e-3 * sv[ch], "{} {}", var[ch], sv[ch]);
        }
        let g = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        assert!(batch_norm(&x, &g, &g, None, 1e-5, false).is_err());
        assert!(add_channel_bias(&x, &g).is_err());
        let flat = Tensor::ones(5, DType::F32, &Device::Cpu).unwrap();
        assert!(relu(&flat).is_ok());
        assert!(batch_norm(&flat, &g, &g, None, 1e-5, false).is_err());
    }
}
