//! aarch64 tiers of the quantized kernels: same names, signatures and results (bit for bit) as
//! `scalar`. Reachable only through `NEON` / `DOTPROD`, which `quant_kernels_for` hands out for
//! `Tier::Neon` / `Tier::NeonDotprod` after `Tier::available()` detected neon (and dotprod).
//!
//! Integer part (exact for all codes, including −128):
//! - `neon` (Cortex-A72 / Pi 4): `vmull_s8` (i8·i8 fits i16: |−128·−128| = 2^14) then
//!   `vpaddlq_s16`/`vpadalq_s16` pairwise-widening adds into 4 i32 lanes.
//! - `neon-dotprod` (Cortex-A76 / Pi 5): `sdot` (4 i8 products summed into each i32 lane, no
//!   saturation) through `asm!`, because `vdotq_s32` is still unstable.
//! - Q4_0 codes become i8 weights `q − 8 ∈ −8..7` before the multiply, so both formats share it.
//!
//! Float part: eight blocks per step, block k's i32 sum in lane k (lanes 0-3 in one register,
//! 4-7 in another), then the scalar spec in lanes: `acc += cvt(sumi) · (d_w · d_x)` with a
//! separate multiply and add, and the tail blocks plus the final `reduce8` done by the scalar
//! helpers. AXPY: `y += (a·d) · cvt(q)`, never fused. f16 scales widen with `fcvtl`/`fcvtl2`
//! (base ARMv8.0; exact), as in `kernels::aarch64_neon`.

use std::arch::aarch64::*;
use std::arch::asm;

use half::f16;

use super::{scalar, BlockQ4_0, BlockQ4_0x16, BlockQ8_0, BlockQ8_0x16, QuantKernels, QK8_0};

pub(super) const NEON: QuantKernels = QuantKernels {
    tier_name: "neon",
    vec_dot_q8_0_q8_0: vec_dot_q8_0_q8_0_mull,
    vec_dot_q4_0_q8_0: vec_dot_q4_0_q8_0_mull,
    axpy_q8_0,
    axpy_q4_0,
    quantize_row_q8_0,
    quantize_row_q4_0: super::scalar::quantize_row_q4_0,
    axpy4_q8_0: Some(axpy4_q8_0),
    axpy4_q4_0: Some(axpy4_q4_0),
    gemv16_q4_0: None,
    gemv16_q8_0: None,
    gemm16_q4_0: None,
    gemm16_q8_0: None,
    down_q4_0: None,
    down_q8_0: None,
};

pub(super) const DOTPROD: QuantKernels = QuantKernels {
    tier_name: "neon-dotprod",
    vec_dot_q8_0_q8_0: vec_dot_q8_0_q8_0_sdot,
    vec_dot_q4_0_q8_0: vec_dot_q4_0_q8_0_sdot,
    axpy_q8_0,
    axpy_q4_0,
    quantize_row_q8_0,
    quantize_row_q4_0: super::scalar::quantize_row_q4_0,
    axpy4_q8_0: Some(axpy4_q8_0),
    axpy4_q4_0: Some(axpy4_q4_0),
    gemv16_q4_0: Some(gemv16_q4_0),
    gemv16_q8_0: Some(gemv16_q8_0),
    gemm16_q4_0: Some(gemm16_q4_0),
    gemm16_q8_0: Some(gemm16_q8_0),
    down_q4_0: None,
    down_q8_0: None,
};

const G: usize = scalar::LANES;

/// The 32 codes of a Q8_0 block as two `int8x16_t`.
#[inline]
#[target_feature(enable = "neon")]
fn q8_codes(b: &BlockQ8_0) -> (int8x16_t, int8x16_t) {
    let p = b.qs.as_ptr();
    // SAFETY: qs is 32 bytes: two 16-byte loads inside the field.
    unsafe { (vld1q_s8(p), vld1q_s8(p.add(16))) }
}

/// The 32 weights of a Q4_0 block as i8 in −8..7: (weights 0..15, weights 16..31).
#[inline]
#[target_feature(enable = "neon")]
fn q4_codes(b: &BlockQ4_0) -> (int8x16_t, int8x16_t) {
    // SAFETY: qs is exactly 16 bytes.
    let t = unsafe { vld1q_u8(b.qs.as_ptr()) };
    let eight = vdupq_n_s8(8);
    let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(t, vdupq_n_u8(0x0F))), eight);
    let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(t)), eight);
    (lo, hi)
}

/// 4 partial i32 sums of `Σ a_j·b_j` over 32 i8 pairs, plain NEON (exact, see module docs).
#[inline]
#[target_feature(enable = "neon")]
fn sum_mull(a: (int8x16_t, int8x16_t), b: (int8x16_t, int8x16_t)) -> int32x4_t {
    let s = vpaddlq_s16(vmull_s8(vget_low_s8(a.0), vget_low_s8(b.0)));
    let s = vpadalq_s16(s, vmull_high_s8(a.0, b.0));
    let s = vpadalq_s16(s, vmull_s8(vget_low_s8(a.1), vget_low_s8(b.1)));
    vpadalq_s16(s, vmull_high_s8(a.1, b.1))
}

/// 4 partial i32 sums of `Σ a_j·b_j` over 32 i8 pairs with `sdot` (exact).
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn sum_sdot(a: (int8x16_t, int8x16_t), b: (int8x16_t, int8x16_t)) -> int32x4_t {
    let mut acc = vdupq_n_s32(0);
    // SAFETY: sdot is available (dotprod is enabled on this function, which only the DOTPROD
    // table reaches after detection); it only reads and writes the named vector registers.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a0:v}.16b, {b0:v}.16b",
            "sdot {acc:v}.4s, {a1:v}.16b, {b1:v}.16b",
            acc = inout(vreg) acc,
            a0 = in(vreg) a.0,
            b0 = in(vreg) b.0,
            a1 = in(vreg) a.1,
            b1 = in(vreg) b.1,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// Lane k = sum of the 4 lanes of `v[k]` (exact i32 adds).
#[inline]
#[target_feature(enable = "neon")]
fn transpose_sum4(v: &[int32x4_t]) -> int32x4_t {
    vpaddq_s32(vpaddq_s32(v[0], v[1]), vpaddq_s32(v[2], v[3]))
}

/// Eight f16 scales widened to f32 (exact): (blocks 0..4, blocks 4..8).
#[inline]
#[target_feature(enable = "neon")]
fn halves8(bits: [u16; G]) -> (float32x4_t, float32x4_t) {
    // SAFETY: `bits` holds 8 u16.
    let h = unsafe { vld1q_u16(bits.as_ptr()) };
    let (lo, hi): (float32x4_t, float32x4_t);
    // SAFETY: fcvtl/fcvtl2 (half → single) are base ARMv8.0 AdvSIMD; registers only.
    unsafe {
        asm!(
            "fcvtl  {lo:v}.4s, {h:v}.4h",
            "fcvtl2 {hi:v}.4s, {h:v}.8h",
            h = in(vreg) h,
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    (lo, hi)
}

macro_rules! dot_impl {
    ($name:ident, $inner:ident, $wt:ty, $codes:ident, $sum:ident, $feat:literal, $finish:path) => {
        #[target_feature(enable = $feat)]
        fn $inner(w: &[$wt], x: &[BlockQ8_0]) -> f32 {
            let n = w.len().min(x.len()) / G * G;
            let (mut acc_lo, mut acc_hi) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
            for (wg, xg) in w[..n].chunks_exact(G).zip(x[..n].chunks_exact(G)) {
                let mut s = [vdupq_n_s32(0); G];
                let (mut dw, mut dx) = ([0u16; G], [0u16; G]);
                for k in 0..G {
                    s[k] = $sum($codes(&wg[k]), q8_codes(&xg[k]));
                    dw[k] = wg[k].d.to_bits();
                    dx[k] = xg[k].d.to_bits();
                }
                let (dw_lo, dw_hi) = halves8(dw);
                let (dx_lo, dx_hi) = halves8(dx);
                let sumi_lo = vcvtq_f32_s32(transpose_sum4(&s[0..4]));
                let sumi_hi = vcvtq_f32_s32(transpose_sum4(&s[4..8]));
                acc_lo = vaddq_f32(acc_lo, vmulq_f32(sumi_lo, vmulq_f32(dw_lo, dx_lo)));
                acc_hi = vaddq_f32(acc_hi, vmulq_f32(sumi_hi, vmulq_f32(dw_hi, dx_hi)));
            }
            let mut lanes = [0f32; G];
            // SAFETY: `lanes` has room for 8 f32.
            unsafe {
                vst1q_f32(lanes.as_mut_ptr(), acc_lo);
                vst1q_f32(lanes.as_mut_ptr().add(4), acc_hi);
            }
            $finish(w, x, n, lanes)
        }

        fn $name(w: &[$wt], x: &[BlockQ8_0]) -> f32 {
            // SAFETY: the table holding this function is handed out only after the CPU features
            // of `$feat` were detected (neon always; dotprod for the DOTPROD table).
            unsafe { $inner(w, x) }
        }
    };
}

dot_impl!(
    vec_dot_q8_0_q8_0_mull,
    dot_q8_0_q8_0_mull,
    BlockQ8_0,
    q8_codes,
    sum_mull,
    "neon",
    scalar::finish_q8_0_q8_0
);
dot_impl!(
    vec_dot_q4_0_q8_0_mull,
    dot_q4_0_q8_0_mull,
    BlockQ4_0,
    q4_codes,
    sum_mull,
    "neon",
    scalar::finish_q4_0_q8_0
);
dot_impl!(
    vec_dot_q8_0_q8_0_sdot,
    dot_q8_0_q8_0_sdot,
    BlockQ8_0,
    q8_codes,
    sum_sdot,
    "neon,dotprod",
    scalar::finish_q8_0_q8_0
);
dot_impl!(
    vec_dot_q4_0_q8_0_sdot,
    dot_q4_0_q8_0_sdot,
    BlockQ4_0,
    q4_codes,
    sum_sdot,
    "neon,dotprod",
    scalar::finish_q4_0_q8_0
);

/// `y[0..16] += s · codes` (multiply, then add: never fused, like the scalar spec).
#[inline]
#[target_feature(enable = "neon")]
fn axpy16(s: float32x4_t, q: int8x16_t, y: &mut [f32]) {
    assert!(y.len() >= 16); // compiled away: callers pass fixed sub-slices of a 32-chunk
    let (h0, h1) = (vmovl_s8(vget_low_s8(q)), vmovl_high_s8(q));
    let v = [
        vmovl_s16(vget_low_s16(h0)),
        vmovl_high_s16(h0),
        vmovl_s16(vget_low_s16(h1)),
        vmovl_high_s16(h1),
    ];
    for (k, vk) in v.into_iter().enumerate() {
        // SAFETY: 4k + 4 <= 16 <= y.len() (asserted above).
        unsafe {
            let p = y.as_mut_ptr().add(4 * k);
            vst1q_f32(p, vaddq_f32(vld1q_f32(p), vmulq_f32(s, vcvtq_f32_s32(vk))));
        }
    }
}

#[target_feature(enable = "neon")]
fn axpy_q8_0_i(a: f32, w: &[BlockQ8_0], y: &mut [f32]) {
    for (b, ys) in w.iter().zip(y.chunks_exact_mut(QK8_0)) {
        let s = vdupq_n_f32(a * b.d.to_f32()); // the scalar spec's `a * d.to_f32()`
        let (q0, q1) = q8_codes(b);
        axpy16(s, q0, &mut ys[0..16]);
        axpy16(s, q1, &mut ys[16..32]);
    }
}

#[target_feature(enable = "neon")]
fn axpy_q4_0_i(a: f32, w: &[BlockQ4_0], y: &mut [f32]) {
    for (b, ys) in w.iter().zip(y.chunks_exact_mut(QK8_0)) {
        let s = vdupq_n_f32(a * b.d.to_f32());
        let (lo, hi) = q4_codes(b);
        axpy16(s, lo, &mut ys[0..16]);
        axpy16(s, hi, &mut ys[16..32]);
    }
}

/// `acc[4k..4k+4] += s · q[4k..4k+4]` for the 16 codes of `q` (mul then add, as the spec).
#[inline]
#[target_feature(enable = "neon")]
fn acc16(acc: &mut [float32x4_t], s: float32x4_t, q: int8x16_t) {
    let (h0, h1) = (vmovl_s8(vget_low_s8(q)), vmovl_high_s8(q));
    let v = [
        vmovl_s16(vget_low_s16(h0)),
        vmovl_high_s16(h0),
        vmovl_s16(vget_low_s16(h1)),
        vmovl_high_s16(h1),
    ];
    for (a, vk) in acc.iter_mut().zip(v) {
        *a = vaddq_f32(*a, vmulq_f32(s, vcvtq_f32_s32(vk)));
    }
}

/// Four rows in one pass over `y`: per 32-chunk, y is loaded once, the rows are added in
/// order 0..4 exactly as four `axpy` calls would, and y is stored once.
macro_rules! neon_axpy4 {
    ($name:ident, $inner:ident, $blk:ty, $codes:ident) => {
        #[target_feature(enable = "neon")]
        fn $inner(a: &[f32; 4], w: [&[$blk]; 4], y: &mut [f32]) {
            let nb = w
                .iter()
                .map(|r| r.len())
                .min()
                .unwrap_or(0)
                .min(y.len() / QK8_0);
            for (b, ys) in y.chunks_exact_mut(QK8_0).take(nb).enumerate() {
                let p = ys.as_mut_ptr();
                // SAFETY: ys holds 32 f32: eight 4-wide loads.
                let mut acc: [float32x4_t; 8] =
                    std::array::from_fn(|k| unsafe { vld1q_f32(p.add(4 * k)) });
                for r in 0..4 {
                    let blk = &w[r][b];
                    let s = vdupq_n_f32(a[r] * blk.d.to_f32());
                    let (q0, q1) = $codes(blk);
                    acc16(&mut acc[0..4], s, q0);
                    acc16(&mut acc[4..8], s, q1);
                }
                for (k, v) in acc.into_iter().enumerate() {
                    // SAFETY: as above, eight 4-wide stores inside ys.
                    unsafe { vst1q_f32(p.add(4 * k), v) };
                }
            }
        }

        fn $name(a: &[f32; 4], w: [&[$blk]; 4], y: &mut [f32]) {
            // SAFETY: NEON/DOTPROD are handed out only after neon was detected.
            unsafe { $inner(a, w, y) }
        }
    };
}

neon_axpy4!(axpy4_q8_0, axpy4_q8_0_i, BlockQ8_0, q8_codes);
neon_axpy4!(axpy4_q4_0, axpy4_q4_0_i, BlockQ4_0, q4_codes);

fn axpy_q8_0(a: f32, w: &[BlockQ8_0], y: &mut [f32]) {
    // SAFETY: NEON/DOTPROD are handed out only after neon was detected.
    unsafe { axpy_q8_0_i(a, w, y) }
}

fn axpy_q4_0(a: f32, w: &[BlockQ4_0], y: &mut [f32]) {
    // SAFETY: NEON/DOTPROD are handed out only after neon was detected.
    unsafe { axpy_q4_0_i(a, w, y) }
}

/// `quantize_block_q8_0` per block: `amax` by `vmaxq` (exact and order-free for non-NaN input),
/// `d = amax / 127`, `id = 1 / d`, then `vcvtaq_s32_f32(x · id)`, which rounds half away from
/// zero like the spec's `round_half_away` and saturates like its `as i32`, and saturating
/// narrows to i8 like its `as i8` (so ±inf → ±127/−128, NaN → 0, as in the spec).
#[target_feature(enable = "neon")]
fn quantize_q8_0_i(x: &[f32], out: &mut [BlockQ8_0]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK8_0)) {
        let p = xs.as_ptr();
        // SAFETY: xs holds 32 f32: eight 4-wide loads.
        let v: [float32x4_t; 8] = std::array::from_fn(|k| unsafe { vld1q_f32(p.add(4 * k)) });
        let mut m = vabsq_f32(v[0]);
        for vk in &v[1..] {
            m = vmaxq_f32(m, vabsq_f32(*vk));
        }
        let amax = vmaxvq_f32(m);
        let d = amax / 127.0;
        let id = vdupq_n_f32(if d != 0.0 { 1.0 / d } else { 0.0 });
        let q: [int32x4_t; 8] = std::array::from_fn(|k| vcvtaq_s32_f32(vmulq_f32(v[k], id)));
        let h: [int16x8_t; 4] =
            std::array::from_fn(|k| vcombine_s16(vqmovn_s32(q[2 * k]), vqmovn_s32(q[2 * k + 1])));
        let lo = vcombine_s8(vqmovn_s16(h[0]), vqmovn_s16(h[1]));
        let hi = vcombine_s8(vqmovn_s16(h[2]), vqmovn_s16(h[3]));
        // SAFETY: qs is 32 bytes: two 16-byte stores.
        unsafe {
            vst1q_s8(b.qs.as_mut_ptr(), lo);
            vst1q_s8(b.qs.as_mut_ptr().add(16), hi);
        }
        b.d = f16::from_f32(d);
    }
}

fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    // SAFETY: NEON/DOTPROD are handed out only after neon was detected.
    unsafe { quantize_q8_0_i(x, out) }
}

// ---- 16-row interleaved kernels (`BlockQ4_0x16` / `BlockQ8_0x16`), neon-dotprod ----
//
// The x86 layouts (see `BlockQ4_0x16`): per block, `qs[g]` holds 4 code bytes of each of 16
// rows, one row per 32-bit lane, so one 16-byte register covers 4 rows and `sdot` with the
// input's 4-byte group broadcast adds each row's 4 products into its lane. Codes become signed
// before the multiply (Q4_0: `q − 8`; Q8_0: stored `w + 128` back to `w`), so the lane sums are
// `Σ (q − 8)·x` and `Σ w·x` directly: the same exact integers the x86 kernels form as
// `Σ q·x − 8·Σ x` and `Σ (w + 128)·x − 128·Σ x` (the `xsum` arguments are not needed here).
// The f32 part is theirs (`acc = fma(cvt(sumi), d_w · d_x, acc)` per row and block, in block
// order), so the results equal the AVX2 and AVX-512 kernels' bit for bit.

/// `acc.4s += a.16b · b.16b` per 4-byte group (`sdot`, exact).
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: sdot is available (dotprod is enabled on this function, reached only through the
    // DOTPROD table after detection); it reads and writes the named vector registers only.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// The input's 4-byte group `k` in every 32-bit lane.
#[inline]
#[target_feature(enable = "neon")]
fn xgroup(xb: &BlockQ8_0, k: usize) -> int8x16_t {
    let g = i32::from_le_bytes([
        xb.qs[4 * k] as u8,
        xb.qs[4 * k + 1] as u8,
        xb.qs[4 * k + 2] as u8,
        xb.qs[4 * k + 3] as u8,
    ]);
    vreinterpretq_s8_s32(vdupq_n_s32(g))
}

/// Bytes `16q..16q + 16` of `qs[g]` (rows `4q..4q + 4`).
#[inline]
#[target_feature(enable = "neon")]
fn quarter(v: &[u8; 64], q: usize) -> uint8x16_t {
    debug_assert!(q < 4);
    // SAFETY: q < 4, so bytes 16q..16q + 16 lie inside the 64-byte array.
    unsafe { vld1q_u8(v.as_ptr().add(16 * q)) }
}

/// Rows `4q..4q + 4`'s f16 scales widened to f32 (exact).
#[inline]
#[target_feature(enable = "neon")]
fn scales4(d: &[f16; 16], q: usize) -> float32x4_t {
    debug_assert!(q < 4);
    // SAFETY: q < 4: 4 f16 from element 4q stay inside the 16-element array.
    let h = unsafe { vld1_u16(d.as_ptr().add(4 * q) as *const u16) };
    let out: float32x4_t;
    // SAFETY: fcvtl (half → single) is base ARMv8.0 AdvSIMD; registers only.
    unsafe {
        asm!(
            "fcvtl {o:v}.4s, {h:v}.4h",
            h = in(vreg) h,
            o = out(vreg) out,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    out
}

/// Signed Q4_0 weights `q − 8` of rows `4q..`: `c[g]` codes `4g..4g + 4`, `c[4 + g]` codes
/// `16 + 4g..`.
#[inline]
#[target_feature(enable = "neon")]
fn q4x16_codes(wb: &BlockQ4_0x16, q: usize) -> [int8x16_t; 8] {
    let eight = vdupq_n_s8(8);
    let mut c = [vdupq_n_s8(0); 8];
    for g in 0..4 {
        let v = quarter(&wb.qs[g], q);
        c[g] = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F))), eight);
        c[4 + g] = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(v)), eight);
    }
    c
}

/// Signed Q8_0 weights of rows `4q..` (stored `w + 128`): `c[g]` codes `4g..4g + 4`.
#[inline]
#[target_feature(enable = "neon")]
fn q8x16_codes(wb: &BlockQ8_0x16, q: usize) -> [int8x16_t; 8] {
    let mut c = [vdupq_n_s8(0); 8];
    for (g, c) in c.iter_mut().enumerate() {
        *c = vreinterpretq_s8_u8(veorq_u8(quarter(&wb.qs[g], q), vdupq_n_u8(0x80)));
    }
    c
}

/// Per row (lane) of 4: the block's exact integer sum over the 8 groups.
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn sumi8(c: &[int8x16_t; 8], xb: &BlockQ8_0) -> int32x4_t {
    let mut s = vdupq_n_s32(0);
    for (k, ck) in c.iter().enumerate() {
        s = sdot(s, *ck, xgroup(xb, k));
    }
    s
}

/// One (4-row quarter, token) step: `acc = fma(cvt(si), d_w · d_x, acc)`.
#[inline]
#[target_feature(enable = "neon")]
fn scale_acc(acc: float32x4_t, si: int32x4_t, dw: float32x4_t, xb: &BlockQ8_0) -> float32x4_t {
    let dd = vmulq_f32(dw, vdupq_n_f32(xb.d.to_f32()));
    vfmaq_f32(acc, vcvtq_f32_s32(si), dd)
}

macro_rules! gemv16_impl {
    ($name:ident, $inner:ident, $blk:ty, $codes:ident, $what:literal) => {
        #[doc = concat!("`gemv16_", $what, "` of the x86 tiers on `sdot` (same results).")]
        #[target_feature(enable = "neon,dotprod")]
        fn $inner(w: &[$blk], x: &[BlockQ8_0], xsum: &[i32], out: &mut [f32; 16]) {
            let nb = w.len();
            assert!(
                x.len() >= nb && xsum.len() >= nb,
                concat!("gemv16_", $what, " input length")
            );
            let mut acc = [vdupq_n_f32(0.0); 4];
            for (wb, xb) in w.iter().zip(x) {
                for (q, a) in acc.iter_mut().enumerate() {
                    let si = sumi8(&$codes(wb, q), xb);
                    *a = scale_acc(*a, si, scales4(&wb.d, q), xb);
                }
            }
            for (q, a) in acc.iter().enumerate() {
                // SAFETY: out is 16 f32: four stores of 4.
                unsafe { vst1q_f32(out.as_mut_ptr().add(4 * q), *a) };
            }
        }

        fn $name(w: &[$blk], x: &[BlockQ8_0], xsum: &[i32], out: &mut [f32; 16]) {
            // SAFETY: the DOTPROD table, the only holder, is handed out after dotprod detection.
            unsafe { $inner(w, x, xsum, out) }
        }
    };
}

gemv16_impl!(
    gemv16_q4_0,
    gemv16_q4_0_i,
    BlockQ4_0x16,
    q4x16_codes,
    "q4_0"
);
gemv16_impl!(
    gemv16_q8_0,
    gemv16_q8_0_i,
    BlockQ8_0x16,
    q8x16_codes,
    "q8_0"
);

/// Tokens per register tile of the 16-row GEMMs.
const GT: usize = 4;

macro_rules! gemm16_impl {
    ($name:ident, $inner:ident, $blk:ty, $codes:ident, $what:literal) => {
        #[doc = concat!("Prompt version of `gemv16_", $what, "`: per 4-row quarter and block the")]
        #[doc = "codes are made once for up to 4 tokens; per (row, token) the same operations."]
        #[target_feature(enable = "neon,dotprod")]
        fn $inner(w: &[$blk], x: &[BlockQ8_0], xsum: &[i32], t: usize, out: &mut [f32]) {
            let nb = w.len();
            assert!(
                x.len() >= t.saturating_mul(nb)
                    && xsum.len() >= t.saturating_mul(nb)
                    && out.len() >= t.saturating_mul(16),
                concat!("gemm16_", $what, " shapes")
            );
            let mut t0 = 0;
            while t0 < t {
                let m = GT.min(t - t0);
                for q in 0..4 {
                    let mut acc = [vdupq_n_f32(0.0); GT];
                    for (b, wb) in w.iter().enumerate() {
                        let c = $codes(wb, q);
                        let dw = scales4(&wb.d, q);
                        for (j, a) in acc.iter_mut().enumerate().take(m) {
                            let xb = &x[(t0 + j) * nb + b];
                            *a = scale_acc(*a, sumi8(&c, xb), dw, xb);
                        }
                    }
                    for (j, a) in acc.iter().enumerate().take(m) {
                        // SAFETY: (t0 + j)·16 + 4q + 4 <= 16·t <= out.len().
                        unsafe { vst1q_f32(out.as_mut_ptr().add((t0 + j) * 16 + 4 * q), *a) };
                    }
                }
                t0 += m;
            }
        }

        fn $name(w: &[$blk], x: &[BlockQ8_0], xsum: &[i32], t: usize, out: &mut [f32]) {
            // SAFETY: the DOTPROD table, the only holder, is handed out after dotprod detection.
            unsafe { $inner(w, x, xsum, t, out) }
        }
    };
}

gemm16_impl!(
    gemm16_q4_0,
    gemm16_q4_0_i,
    BlockQ4_0x16,
    q4x16_codes,
    "q4_0"
);
gemm16_impl!(
    gemm16_q8_0,
    gemm16_q8_0_i,
    BlockQ8_0x16,
    q8x16_codes,
    "q8_0"
);
