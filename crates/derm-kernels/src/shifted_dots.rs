//! The weight gradient of a stride-1 convolution as dot products of shifted rows, in AVX2 + FMA.
//!
//! On the padded input laid out flat (see `conv::grad_weight_shifted`), the gradient of kernel
//! tap `t` between output channel `o` and input channel `c` is one dot product:
//! `sum_q go[o][q] * x[c][q + off_t]`. Both operands are contiguous along `q`, so the product
//! needs no packing at all: a block of 4 output channels by 3 input channels keeps twelve
//! eight-lane accumulators in registers and loads 7 vectors per 12 fused multiply-adds (a 3 x 4
//! block needs one register more than AVX2 has and spills an accumulator every step: half the
//! speed). The `gemm` crate, handed the same products as nine GEMMs with a small (O x C) result
//! and a depth of tens of thousands, packs both operands for every tap: about 130 GFLOP/s on the
//! U-Net's 128x128 layers (two threads), against 160-170 here, where a block of each operand
//! stays in L1 for all taps. On 64x64 planes the two are within a few per cent, and below that
//! the GEMMs are as fast or faster (`conv::DOTS_MIN_DEPTH`).
//!
//! Only f32 on x86-64 with AVX2 and FMA; [`shifted_dots`] returns `false` elsewhere and the
//! caller keeps its GEMMs.

use rayon::prelude::*;

/// Values of `q` per block: a register block's 3 input rows (plus the taps' reach) and 4 output
/// rows stay in L1 while all taps are computed. One thread, 32 x 32 channels, nine taps, best of
/// five: 1024 runs at 97-99 GFLOP/s on rows 66, 130 and 258 wide, 512 at 93-95, 256 at 83-84 (more
/// reductions per multiply-add) and 2048 at 88-90 (the rows no longer fit in L1).
const KB: usize = 1024;
/// Output channels per register block.
const MR: usize = 4;
/// Input channels per register block (at most 4: a row's sums are reduced four at a time).
const NR: usize = 3;

/// The operands of [`shifted_dots`]: row-major matrices with a row stride.
pub(crate) struct Rows<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub ld: usize,
}

/// `acc[o * ldc + t * b.rows + c] += sum_{q < len} a[o][q] * b[c][q + offs[t]]` for every output
/// row `o`, input row `c` and tap `t`. `len` must be a multiple of 8 (pad `a` with zeros). When
/// `par` is set the output rows are split over the rayon pool. Returns `false`, having done
/// nothing, where the kernel does not run (no AVX2 + FMA) or when an operand is too short.
pub(crate) fn shifted_dots(
    a: Rows<'_>,
    b: Rows<'_>,
    offs: &[usize],
    len: usize,
    acc: &mut [f32],
    ldc: usize,
    par: bool,
) -> bool {
    if !available() || !len.is_multiple_of(8) || a.rows == 0 || b.rows == 0 || offs.is_empty() || len == 0 {
        return false;
    }
    let max_off = offs.iter().copied().max().unwrap_or(0);
    let fits = (a.rows - 1) * a.ld + len <= a.data.len()
        && (b.rows - 1) * b.ld + max_off + len <= b.data.len()
        && (a.rows - 1) * ldc + offs.len() * b.rows <= acc.len()
        && offs.len() * b.rows <= ldc;
    if !fits {
        return false;
    }
    let threads = rayon::current_num_threads();
    if par && threads > 1 && a.rows > MR {
        // Output rows in chunks of whole register blocks, one chunk per thread.
        let per = a.rows.div_ceil(threads).next_multiple_of(MR);
        acc[..a.rows * ldc].par_chunks_mut(per * ldc).enumerate().for_each(|(i, acc)| {
            let rows = acc.len() / ldc;
            let a = Rows { data: &a.data[i * per * a.ld..], rows, ld: a.ld };
            // SAFETY: AVX2 and FMA are available, and the chunk's operands lie inside the
            // slices checked above (a sub-range of the output rows).
            unsafe { run(&a, &b, offs, len, acc, ldc) }
        });
    } else {
        // SAFETY: as above, for all rows.
        unsafe { run(&a, &b, offs, len, acc, ldc) }
    }
    true
}

/// Whether the CPU has AVX2 and FMA.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn run(_: &Rows<'_>, _: &Rows<'_>, _: &[usize], _: usize, _: &mut [f32], _: usize) {}

/// The blocked loop: K blocks, then input-row blocks (kept in L1), then output-row blocks, then
/// taps.
///
/// # Safety
/// AVX2 and FMA must be available and the operands must hold what [`shifted_dots`] checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run(a: &Rows<'_>, b: &Rows<'_>, offs: &[usize], len: usize, acc: &mut [f32], ldc: usize) {
    let (ap, bp, cp) = (a.data.as_ptr(), b.data.as_ptr(), acc.as_mut_ptr());
    for k0 in (0..len).step_by(KB) {
        let kl = KB.min(len - k0);
        for c0 in (0..b.rows).step_by(NR) {
            let nr = NR.min(b.rows - c0);
            for o0 in (0..a.rows).step_by(MR) {
                let mr = MR.min(a.rows - o0);
                for (t, &off) in offs.iter().enumerate() {
                    // SAFETY: rows o0..o0+mr of a and c0..c0+nr of b, values k0..k0+kl (+off),
                    // and the mr x nr results at (o0, t, c0) are inside the checked slices.
                    unsafe {
                        let blk = Block {
                            a: ap.add(o0 * a.ld + k0),
                            lda: a.ld,
                            b: bp.add(c0 * b.ld + off + k0),
                            ldb: b.ld,
                            len: kl,
                            c: cp.add(o0 * ldc + t * b.rows + c0),
                            ldc,
                        };
                        dispatch(mr, nr, &blk);
                    }
                }
            }
        }
    }
}

/// Runs the register block of `mr` x `nr` rows (at most [`MR`] x [`NR`]).
///
/// # Safety
/// As [`block`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dispatch(mr: usize, nr: usize, blk: &Block) {
    macro_rules! by_cols {
        ($m:expr) => {
            match nr {
                1 => block::<$m, 1>(blk),
                2 => block::<$m, 2>(blk),
                _ => block::<$m, NR>(blk),
            }
        };
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match mr {
            1 => by_cols!(1),
            2 => by_cols!(2),
            3 => by_cols!(3),
            _ => by_cols!(MR),
        }
    }
}

/// One register block: `MR` rows of `a` against `NR` rows of `b` over `len` values.
#[cfg(target_arch = "x86_64")]
struct Block {
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    len: usize,
    c: *mut f32,
    ldc: usize,
}

/// Loads eight f32 values from `p`, which need not be aligned.
///
/// # Safety
/// `p..p + 8` must be readable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn load(p: *const f32) -> std::arch::x86_64::__m256 {
    // SAFETY: the caller guarantees the eight values are readable; `vlddqu` needs no alignment.
    unsafe { std::arch::x86_64::_mm256_castsi256_ps(std::arch::x86_64::_mm256_lddqu_si256(p as *const _)) }
}

/// `c[r * ldc + j] += sum_{q < len} a[r * lda + q] * b[j * ldb + q]` for `r < MR`, `j < NR`.
///
/// # Safety
/// AVX2 and FMA must be available; every address named above must be valid, `len` a multiple
/// of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block<const M: usize, const N: usize>(k: &Block) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees every load and store below is in bounds.
    unsafe {
        // Row pointers advanced with wrapping arithmetic and loads through `vlddqu`: the loop then
        // carries no overflow, null or library precondition checks (`_mm256_loadu_ps` is a
        // checked `copy_nonoverlapping` in builds with debug assertions, a raw dereference a
        // null check), so it is the same 7 loads and 12 FMAs in the dev profile as in release.
        let pa: [*const f32; M] = std::array::from_fn(|r| k.a.wrapping_add(r * k.lda));
        let pb: [*const f32; N] = std::array::from_fn(|j| k.b.wrapping_add(j * k.ldb));
        let mut s = [[_mm256_setzero_ps(); N]; M];
        let mut q = 0usize;
        for _ in 0..k.len / 8 {
            let bv: [__m256; N] = std::array::from_fn(|j| load(pb[j].wrapping_add(q)));
            for r in 0..M {
                let av = load(pa[r].wrapping_add(q));
                for j in 0..N {
                    s[r][j] = _mm256_fmadd_ps(av, bv[j], s[r][j]);
                }
            }
            q = q.wrapping_add(8);
        }
        let z = _mm256_setzero_ps();
        for (r, row) in s.iter().enumerate() {
            let v = |j: usize| if j < N { row[j] } else { z };
            // Horizontal sums of four accumulators at once: [sum v0, sum v1, sum v2, sum v3].
            let h01 = _mm256_hadd_ps(v(0), v(1));
            let h23 = _mm256_hadd_ps(v(2), v(3));
            let h = _mm256_hadd_ps(h01, h23);
            let sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            let c = k.c.add(r * k.ldc);
            if N == 4 {
                _mm_storeu_ps(c, _mm_add_ps(_mm_loadu_ps(c), sums));
            } else {
                let mut out = [0f32; 4];
                _mm_storeu_ps(out.as_mut_ptr(), sums);
                for (j, &v) in out.iter().enumerate().take(N) {
                    *c.add(j) += v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use derm_core::Rng;

    #[test]
    fn matches_naive_dot_products_for_every_block_shape() {
        let mut rng = Rng::new(5);
        // Row counts that leave every remainder of the 3 x 4 blocks; lengths over several K
        // blocks; strides wider than the rows.
        for (o, c, len, offs) in [
            (7usize, 6usize, 24usize, vec![0usize, 1, 5, 9]),
            (3, 4, 8, vec![0]),
            (1, 1, 1040, vec![3, 0, 17]),
            (5, 11, 600, vec![0, 2, 4, 40, 42, 44]),
        ] {
            let (lda, ldb) = (len + 3, len + 50);
            let a: Vec<f32> = rng.normal_vec(o * lda, 0.0, 1.0);
            let b: Vec<f32> = rng.normal_vec(c * ldb, 0.0, 1.0);
            let ldc = offs.len() * c + 2;
            let acc: Vec<f32> = rng.normal_vec(o * ldc, 0.0, 1.0);
            let mut want = acc.clone();
            for oi in 0..o {
                for (t, &off) in offs.iter().enumerate() {
                    for ci in 0..c {
                        let d: f64 = (0..len).map(|q| a[oi * lda + q] as f64 * b[ci * ldb + q + off] as f64).sum();
                        want[oi * ldc + t * c + ci] += d as f32;
                    }
                }
            }
            for par in [false, true] {
                let mut got = acc.clone();
                let ran = shifted_dots(
                    Rows { data: &a, rows: o, ld: lda },
                    Rows { data: &b, rows: c, ld: ldb },
                    &offs,
                    len,
                    &mut got,
                    ldc,
                    par,
                );
                if !available() || !len.is_multiple_of(8) {
                    assert!(!ran && got == acc);
                    continue;
                }
                assert!(ran);
                let err = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
                assert!(err < 1e-3, "o{o} c{c} len{len} par {par}: {err}");
            }
        }
    }

    #[test]
    fn short_operands_are_refused() {
        let a = vec![1f32; 16];
        let b = vec![1f32; 16];
        let mut acc = vec![0f32; 4];
        let ran = shifted_dots(
            Rows { data: &a, rows: 2, ld: 8 },
            Rows { data: &b, rows: 2, ld: 8 },
            &[1],
            8,
            &mut acc,
            2,
            false,
        );
        assert!(!ran && acc.iter().all(|&v| v == 0.0));
    }
}
