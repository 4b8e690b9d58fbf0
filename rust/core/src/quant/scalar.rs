//! Scalar quantized kernels: the specification every SIMD tier must match bit for bit.
//!
//! Dot products: per block an exact i32 sum, then `p_b = (sumi as f32) · (d_w · d_x)` added to
//! partial sum `acc[b % 8]`, then the fixed reduction [`reduce8`]. AXPY: `s = a · d_b`, then
//! `y += s · q` element by element (multiply and add, never fused). The helpers here are also
//! what the SIMD tiers call for their tail blocks, so the tails are the spec by construction.

use half::f16;

use super::{quantize_block_q8_0, BlockQ4_0, BlockQ8_0, Planar, Pod, QK4_0, QK8_0};

/// Number of interleaved f32 partial sums of the dot kernels (one per `__m256` lane).
pub const LANES: usize = 8;

/// `((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7))`: the order of `lo128 + hi128`, then `movehl`,
/// then the last pair, as the x86 tiers reduce a `__m256`.
#[inline]
pub fn reduce8(a: &[f32; LANES]) -> f32 {
    let s4 = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// Product of two block scales in f32 (both widenings are exact).
#[inline]
pub fn scale(dw: f16, dx: f16) -> f32 {
    dw.to_f32() * dx.to_f32()
}

/// `Σ_j w_j · x_j` of one Q8_0 × Q8_0 block pair (exact; |result| ≤ 32·128·128).
#[inline]
pub fn sumi_q8_0(w: &BlockQ8_0, x: &BlockQ8_0) -> i32 {
    w.qs.iter()
        .zip(&x.qs)
        .map(|(&a, &b)| a as i32 * b as i32)
        .sum()
}

/// `Σ_j (q_j − 8) · x_j` of one Q4_0 × Q8_0 block pair (exact).
#[inline]
pub fn sumi_q4_0(w: &BlockQ4_0, x: &BlockQ8_0) -> i32 {
    let mut s = 0i32;
    for j in 0..QK4_0 / 2 {
        s += ((w.qs[j] & 0x0F) as i32 - 8) * x.qs[j] as i32;
        s += ((w.qs[j] >> 4) as i32 - 8) * x.qs[j + QK4_0 / 2] as i32;
    }
    s
}

/// Finish a Q8_0 · Q8_0 dot from block `start` with partial sums `acc` (`start % 8 == 0`).
#[inline]
pub fn finish_q8_0_q8_0(
    w: &[BlockQ8_0],
    x: &[BlockQ8_0],
    start: usize,
    mut acc: [f32; LANES],
) -> f32 {
    let n = w.len().min(x.len());
    for b in start..n {
        acc[b % LANES] += sumi_q8_0(&w[b], &x[b]) as f32 * scale(w[b].d, x[b].d);
    }
    reduce8(&acc)
}

/// Finish a Q4_0 · Q8_0 dot from block `start` with partial sums `acc` (`start % 8 == 0`).
#[inline]
pub fn finish_q4_0_q8_0(
    w: &[BlockQ4_0],
    x: &[BlockQ8_0],
    start: usize,
    mut acc: [f32; LANES],
) -> f32 {
    let n = w.len().min(x.len());
    for b in start..n {
        acc[b % LANES] += sumi_q4_0(&w[b], &x[b]) as f32 * scale(w[b].d, x[b].d);
    }
    reduce8(&acc)
}

/// `Σ_b sumi_b · d_w,b · d_x,b` over `min(w.len(), x.len())` blocks (see the module docs for the
/// exact float order).
pub fn vec_dot_q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    finish_q8_0_q8_0(w, x, 0, [0.0; LANES])
}

/// `Σ_b sumi_b · d_w,b · d_x,b` with Q4_0 weights, over `min(w.len(), x.len())` blocks.
pub fn vec_dot_q4_0_q8_0(w: &[BlockQ4_0], x: &[BlockQ8_0]) -> f32 {
    finish_q4_0_q8_0(w, x, 0, [0.0; LANES])
}

/// `y[32b + j] += (a · d_b) · q_j`, for `b < min(w.len(), y.len() / 32)`.
pub fn axpy_q8_0(a: f32, w: &[BlockQ8_0], y: &mut [f32]) {
    for (b, ys) in w.iter().zip(y.chunks_exact_mut(QK8_0)) {
        let s = a * b.d.to_f32();
        for (yv, &q) in ys.iter_mut().zip(&b.qs) {
            *yv += s * q as f32;
        }
    }
}

/// `y[32b + j] += (a · d_b) · (q_j − 8)`, for `b < min(w.len(), y.len() / 32)`.
pub fn axpy_q4_0(a: f32, w: &[BlockQ4_0], y: &mut [f32]) {
    for (b, ys) in w.iter().zip(y.chunks_exact_mut(QK4_0)) {
        let s = a * b.d.to_f32();
        let (lo, hi) = ys.split_at_mut(QK4_0 / 2);
        for j in 0..QK4_0 / 2 {
            lo[j] += s * ((b.qs[j] & 0x0F) as i32 - 8) as f32;
            hi[j] += s * ((b.qs[j] >> 4) as i32 - 8) as f32;
        }
    }
}

/// `out[b] = quantize_block_q4_0(x[32b..32b + 32])`, for `b < min(out.len(), x.len() / 32)`.
pub fn quantize_row_q4_0(x: &[f32], out: &mut [BlockQ4_0]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK4_0)) {
        *b = super::quantize_block_q4_0(xs.try_into().expect("chunks_exact(32)"));
    }
}

/// `out[b] = quantize_block_q8_0(x[32b..32b + 32])`, for `b < min(out.len(), x.len() / 32)`.
pub fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK8_0)) {
        *b = quantize_block_q8_0(xs.try_into().expect("chunks_exact(32)"));
    }
}

/// Block scale and the row's code for column `j` of a planar Q4_0 block (`q − 8`).
#[inline]
fn code_q4_0(qs: &[u8; 16], j: usize) -> i32 {
    let byte = qs[j % 16];
    (if j < 16 { byte & 0x0F } else { byte >> 4 }) as i32 - 8
}

/// The specification of the int8 down-projection kernel over a set of rows of a planar matrix
/// `w` (`super::Planar`, `nb` blocks per row, in either geometry), generic over the code format through `code(block, j)`.
///
/// For each block `b < nb` (columns `32b..32b + 32`), with `p_i = a[i] · d_{rows[i], b}`:
/// - `m = max_i |p_i|` (NaN products ignored, as `f32::max` does), `inv = 127 / m`; if `inv`
///   is not finite (`m == 0`, or `m` below about 3.7e-37) the block is skipped (`y`
///   unchanged);
/// - `s = m / 127`, `c_i = round_ties_even(p_i · inv)` (in −127..=127; 0 for a NaN product,
///   as `NaN as i32`);
/// - `acc_j = Σ_i c_i · code_{rows[i], b, j}` in i32 (exact);
/// - `y[32b + j] = fma(s, acc_j as f32, y[32b + j])`.
///
/// Entries with `a[i] == 0` contribute exactly nothing (they change neither `m` nor `acc`), so
/// visiting only the non-zero activations gives the bits of visiting all of them.
#[inline]
fn down_group<Q: Pod>(
    w: &Planar<Q>,
    rows: &[u32],
    a: &[f32],
    y: &mut [f32],
    code: impl Fn(&Q, usize) -> i32,
) {
    let n = rows.len().min(a.len());
    for (b, yb) in y.chunks_exact_mut(32).take(w.nb).enumerate() {
        let p = |i: usize| a[i] * w.scales(rows[i] as usize, b, 1)[0].to_f32();
        let m = (0..n).fold(0f32, |m, i| m.max(p(i).abs()));
        let inv = 127.0 / m;
        // m = 0, or m so small (below ~3.7e-37) that 127 / m overflows: the block adds nothing
        if !inv.is_finite() {
            continue;
        }
        let s = m / 127.0;
        let mut acc = [0i32; 32];
        for i in 0..n {
            let c = (p(i) * inv).round_ties_even() as i32;
            let blk = &w.codes(rows[i] as usize, b, 1)[0];
            for (j, v) in acc.iter_mut().enumerate() {
                *v += c * code(blk, j);
            }
        }
        for (yv, &v) in yb.iter_mut().zip(&acc) {
            *yv = s.mul_add(v as f32, *yv);
        }
    }
}

/// `down_group` (above) over planar Q4_0 rows: `y += Σ_i a[i] · row[rows[i]]` with int8 coefficients.
pub fn down_q4_0(w: &Planar<[u8; 16]>, rows: &[u32], a: &[f32], y: &mut [f32]) {
    down_group(w, rows, a, y, code_q4_0);
}

/// `down_group` (above) over planar Q8_0 rows (codes stored `+ 128`).
pub fn down_q8_0(w: &Planar<[u8; 32]>, rows: &[u32], a: &[f32], y: &mut [f32]) {
    down_group(w, rows, a, y, |q, j| q[j] as i32 - 128);
}
