//! AVX2 + F16C tier of the quantized kernels: same names, signatures and results (bit for bit)
//! as `scalar`. Reachable only through `KERNELS`, which `quant_kernels_for` hands out after
//! `Tier::available()` confirmed avx2, fma and f16c.
//!
//! Eight blocks are processed per step: each block's exact i32 sum is an 8-lane vector, the
//! eight vectors are transposed-and-summed into one `__m256i` (lane k = block k), and the f32
//! part is then the scalar spec done in 8 lanes: `acc += cvt(sumi) · (d_w · d_x)`.

use std::arch::x86_64::*;

use half::f16;

use crate::kernels::x86_avx512::prefetch_lines;

use super::{scalar, BlockQ4_0, BlockQ4_0x16, BlockQ8_0, BlockQ8_0x16, QuantKernels, QK8_0};

pub(super) const KERNELS: QuantKernels = QuantKernels {
    tier_name: "avx2",
    vec_dot_q8_0_q8_0,
    vec_dot_q4_0_q8_0,
    axpy_q8_0,
    axpy_q4_0,
    quantize_row_q8_0,
    quantize_row_q4_0,
    axpy4_q8_0: None,
    axpy4_q4_0: None,
    gemv16_q4_0: Some(gemv16_q4_0),
    gemv16_q8_0: Some(gemv16_q8_0),
    gemm16_q4_0: Some(gemm16_q4_0),
    gemm16_q8_0: Some(gemm16_q8_0),
    down_q4_0: None,
    down_q8_0: None,
};

const G: usize = scalar::LANES;

/// Lane k of the result = sum of the 8 lanes of `v[k]` (wrapping i32 adds; exact here).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn transpose_sum8(v: &[__m256i; 8]) -> __m256i {
    // hadd per 128-bit half: [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7].
    let t0 = _mm256_hadd_epi32(v[0], v[1]);
    let t1 = _mm256_hadd_epi32(v[2], v[3]);
    let t2 = _mm256_hadd_epi32(v[4], v[5]);
    let t3 = _mm256_hadd_epi32(v[6], v[7]);
    // [Σlo v0, Σlo v1, Σlo v2, Σlo v3 | Σhi v0, Σhi v1, Σhi v2, Σhi v3]
    let u0 = _mm256_hadd_epi32(t0, t1);
    let u1 = _mm256_hadd_epi32(t2, t3);
    let lo = _mm256_permute2x128_si256::<0x20>(u0, u1);
    let hi = _mm256_permute2x128_si256::<0x31>(u0, u1);
    _mm256_add_epi32(lo, hi)
}

/// Eight f16 scales widened to f32.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn halves8(b: [u16; 8]) -> __m256 {
    _mm256_cvtph_ps(_mm_setr_epi16(
        b[0] as i16,
        b[1] as i16,
        b[2] as i16,
        b[3] as i16,
        b[4] as i16,
        b[5] as i16,
        b[6] as i16,
        b[7] as i16,
    ))
}

/// `[f32; 8]` lanes of `v`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn lanes(v: __m256) -> [f32; G] {
    let mut out = [0f32; G];
    // SAFETY: `out` has room for 8 f32; unaligned store.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
    out
}

/// 8 partial i32 sums of `Σ w_j x_j` over one Q8_0 block pair (widen to i16, `vpmaddwd`).
#[inline]
#[target_feature(enable = "avx2")]
fn sumi_q8_0(w: &BlockQ8_0, x: &BlockQ8_0) -> __m256i {
    let (pw, px) = (
        w.qs.as_ptr() as *const __m128i,
        x.qs.as_ptr() as *const __m128i,
    );
    // SAFETY: qs is 32 bytes, so 2 × 16-byte unaligned loads stay inside each block.
    let (w0, w1, x0, x1) = unsafe {
        (
            _mm_loadu_si128(pw),
            _mm_loadu_si128(pw.add(1)),
            _mm_loadu_si128(px),
            _mm_loadu_si128(px.add(1)),
        )
    };
    let p0 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(w0), _mm256_cvtepi8_epi16(x0));
    let p1 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(w1), _mm256_cvtepi8_epi16(x1));
    _mm256_add_epi32(p0, p1)
}

/// 8 partial i32 sums of `Σ (q_j − 8) x_j` over one Q4_0 × Q8_0 block pair.
#[inline]
#[target_feature(enable = "avx2")]
fn sumi_q4_0(w: &BlockQ4_0, x: &BlockQ8_0, m4: __m256i, eight: __m256i, ones: __m256i) -> __m256i {
    // SAFETY: w.qs is 16 bytes and x.qs 32 bytes: each load is exactly one field.
    let (t, xv) = unsafe {
        (
            _mm_loadu_si128(w.qs.as_ptr() as *const __m128i),
            _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i),
        )
    };
    // [low nibbles = weights 0..15 | high nibbles = weights 16..31], codes 0..15.
    let q = _mm256_and_si256(
        _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(t), _mm_srli_epi16::<4>(t)),
        m4,
    );
    // u8 × i8 pairs: |2·15·128| and |2·8·128| fit i16, so maddubs never saturates.
    let p = _mm256_maddubs_epi16(q, xv);
    let c = _mm256_maddubs_epi16(eight, xv);
    _mm256_madd_epi16(_mm256_sub_epi16(p, c), ones)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    let n = w.len().min(x.len()) / G * G;
    let mut acc = _mm256_setzero_ps();
    for (wg, xg) in w[..n].chunks_exact(G).zip(x[..n].chunks_exact(G)) {
        let mut s = [_mm256_setzero_si256(); G];
        for k in 0..G {
            s[k] = sumi_q8_0(&wg[k], &xg[k]);
        }
        let sumi = _mm256_cvtepi32_ps(transpose_sum8(&s));
        let dd = _mm256_mul_ps(
            halves8(std::array::from_fn(|k| wg[k].d.to_bits())),
            halves8(std::array::from_fn(|k| xg[k].d.to_bits())),
        );
        acc = _mm256_add_ps(acc, _mm256_mul_ps(sumi, dd));
    }
    scalar::finish_q8_0_q8_0(w, x, n, lanes(acc))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q4_0_q8_0(w: &[BlockQ4_0], x: &[BlockQ8_0]) -> f32 {
    let n = w.len().min(x.len()) / G * G;
    let (m4, eight, ones) = (
        _mm256_set1_epi8(0x0F),
        _mm256_set1_epi8(8),
        _mm256_set1_epi16(1),
    );
    let mut acc = _mm256_setzero_ps();
    for (wg, xg) in w[..n].chunks_exact(G).zip(x[..n].chunks_exact(G)) {
        let mut s = [_mm256_setzero_si256(); G];
        for k in 0..G {
            s[k] = sumi_q4_0(&wg[k], &xg[k], m4, eight, ones);
        }
        let sumi = _mm256_cvtepi32_ps(transpose_sum8(&s));
        let dd = _mm256_mul_ps(
            halves8(std::array::from_fn(|k| wg[k].d.to_bits())),
            halves8(std::array::from_fn(|k| xg[k].d.to_bits())),
        );
        acc = _mm256_add_ps(acc, _mm256_mul_ps(sumi, dd));
    }
    scalar::finish_q4_0_q8_0(w, x, n, lanes(acc))
}

/// `y[0..8] += s · codes` (8 sign-extended i8 codes in the low half of `q`).
#[inline]
#[target_feature(enable = "avx2")]
fn axpy8(s: __m256, q: __m128i, y: &mut [f32]) {
    assert!(y.len() >= 8); // compiled away: callers pass fixed sub-slices of a 32-chunk
    let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    // SAFETY: y has at least 8 elements (asserted above).
    unsafe {
        let yv = _mm256_loadu_ps(y.as_ptr());
        _mm256_storeu_ps(y.as_mut_ptr(), _mm256_add_ps(yv, _mm256_mul_ps(s, v)));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn axpy_q8_0_i(a: f32, w: &[BlockQ8_0], y: &mut [f32]) {
    let va = _mm256_set1_ps(a);
    for (b, ys) in w.iter().zip(y.chunks_exact_mut(QK8_0)) {
        // s = a · d in every lane (the scalar spec's a * d.to_f32()).
        let s = _mm256_mul_ps(va, _mm256_cvtph_ps(_mm_set1_epi16(b.d.to_bits() as i16)));
        let p = b.qs.as_ptr() as *const __m128i;
        // SAFETY: qs is 32 bytes: two 16-byte unaligned loads.
        let (q0, q1) = unsafe { (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1))) };
        axpy8(s, q0, &mut ys[0..8]);
        axpy8(s, _mm_srli_si128::<8>(q0), &mut ys[8..16]);
        axpy8(s, q1, &mut ys[16..24]);
        axpy8(s, _mm_srli_si128::<8>(q1), &mut ys[24..32]);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn axpy_q4_0_i(a: f32, w: &[BlockQ4_0], y: &mut [f32]) {
    let va = _mm256_set1_ps(a);
    let (m4, eight) = (_mm_set1_epi8(0x0F), _mm_set1_epi8(8));
    for (b, ys) in w.iter().zip(y.chunks_exact_mut(QK8_0)) {
        let s = _mm256_mul_ps(va, _mm256_cvtph_ps(_mm_set1_epi16(b.d.to_bits() as i16)));
        // SAFETY: qs is exactly 16 bytes.
        let t = unsafe { _mm_loadu_si128(b.qs.as_ptr() as *const __m128i) };
        let lo = _mm_sub_epi8(_mm_and_si128(t, m4), eight); // weights 0..15 as i8 in -8..7
        let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16::<4>(t), m4), eight); // 16..31
        axpy8(s, lo, &mut ys[0..8]);
        axpy8(s, _mm_srli_si128::<8>(lo), &mut ys[8..16]);
        axpy8(s, hi, &mut ys[16..24]);
        axpy8(s, _mm_srli_si128::<8>(hi), &mut ys[24..32]);
    }
}

/// The 32 values of one quantization block (`xs.len() >= 32`) in four registers.
#[inline]
#[target_feature(enable = "avx2")]
fn load_block(xs: &[f32]) -> [__m256; 4] {
    assert!(xs.len() >= 32);
    let p = xs.as_ptr();
    // SAFETY: 32 f32 (checked): four 8-wide unaligned loads.
    unsafe {
        [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ]
    }
}

/// The largest of the 8 lanes (exact: max is order-free for non-NaN values).
#[inline]
#[target_feature(enable = "avx2")]
fn hmax(m: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m)))
}

/// `quantize_block_q8_0` in 8 lanes: the same f32 operations (max of |x|, `amax / 127`,
/// `1 / d`, `x · id`, truncate, compare the exact remainder with ±0.5), so the same bytes.
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_q8_0_i(x: &[f32], out: &mut [BlockQ8_0]) {
    let sign = _mm256_set1_ps(-0.0);
    let (half, mhalf) = (_mm256_set1_ps(0.5), _mm256_set1_ps(-0.5));
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(QK8_0)) {
        let v = load_block(xs);
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for vk in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vk));
        }
        let amax = hmax(m);
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let mut q = [_mm256_setzero_si256(); 4];
        for k in 0..4 {
            let y = _mm256_mul_ps(v[k], id);
            let t = _mm256_cvttps_epi32(y);
            let f = _mm256_sub_ps(y, _mm256_cvtepi32_ps(t)); // exact (Sterbenz)
                                                             // Compare masks are −1 where true: t + 1 where f ≥ 0.5, t − 1 where f ≤ −0.5.
            let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(f, half));
            let dn = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(f, mhalf));
            q[k] = _mm256_add_epi32(_mm256_sub_epi32(t, up), dn);
        }
        // Saturating packs (|q| ≤ 127 here) work per 128-bit half, leaving the 4-code groups
        // as dwords [q0 0-3, q1 0-3, q2 0-3, q3 0-3, q0 4-7, q1 4-7, …]; `order` restores 0..32.
        let e = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let r = _mm256_permutevar8x32_epi32(e, order);
        // SAFETY: qs is 32 bytes.
        unsafe { _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, r) };
        b.d = f16::from_f32(d);
    }
}

/// `quantize_block_q4_0` in 8 lanes: `max` = the first element of largest |x| (found from a
/// lane mask), `d = max / −8`, `id = 1/d`, codes `trunc(x · id + 8.5)` clamped to 0..=15 —
/// clamping in float before truncating gives the integer clamp of the scalar code for every
/// input (±inf and NaN included), so the bytes are the scalar ones.
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_q4_0_i(x: &[f32], out: &mut [BlockQ4_0]) {
    let sign = _mm256_set1_ps(-0.0);
    let (c85, zero, c15) = (
        _mm256_set1_ps(8.5),
        _mm256_setzero_ps(),
        _mm256_set1_ps(15.0),
    );
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
        let v = load_block(xs);
        let a = v.map(|vk| _mm256_andnot_ps(sign, vk));
        // max_ps returns its second operand when either is NaN: NaNs never win, as in the
        // scalar `amax < |x|`
        let mut m = _mm256_setzero_ps();
        for ak in &a {
            m = _mm256_max_ps(*ak, m);
        }
        let amax = hmax(m);
        // the scalar loop keeps max = 0.0 unless some |x| > 0, then the first |x| == amax
        let max = if amax > 0.0 {
            let am = _mm256_set1_ps(amax);
            let mut bits = 0u32;
            for (k, ak) in a.iter().enumerate() {
                let eq = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(*ak, am)) as u32;
                bits |= eq << (8 * k);
            }
            xs[bits.trailing_zeros() as usize]
        } else {
            0.0
        };
        let d = max / -8.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let q = v.map(|vk| {
            let t = _mm256_add_ps(_mm256_mul_ps(vk, id), c85);
            // max_ps returns its second operand for NaN: NaN → 0, like `NaN as i8`
            _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(t, zero), c15))
        });
        // byte j = code j | code (16 + j) << 4
        let c0 = _mm256_or_si256(q[0], _mm256_slli_epi32::<4>(q[2]));
        let c1 = _mm256_or_si256(q[1], _mm256_slli_epi32::<4>(q[3]));
        // packs work per 128-bit half: [c0 0-3, c1 0-3 | c0 4-7, c1 4-7] → reorder quarters
        let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(c0, c1));
        let bytes = _mm256_permute4x64_epi64::<0b00_00_10_00>(_mm256_packus_epi16(w, w));
        // SAFETY: qs is 16 bytes.
        unsafe {
            _mm_storeu_si128(
                b.qs.as_mut_ptr() as *mut __m128i,
                _mm256_castsi256_si128(bytes),
            )
        };
        b.d = f16::from_f32(d);
    }
}

fn quantize_row_q4_0(x: &[f32], out: &mut [BlockQ4_0]) {
    // SAFETY: KERNELS is handed out only after avx2, fma and f16c were detected.
    unsafe { quantize_q4_0_i(x, out) }
}

fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    // SAFETY: KERNELS is handed out only after avx2, fma and f16c were detected.
    unsafe { quantize_q8_0_i(x, out) }
}

fn vec_dot_q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    // SAFETY: KERNELS is handed out only after avx2, fma and f16c were detected.
    unsafe { dot_q8_0_q8_0(w, x) }
}

fn vec_dot_q4_0_q8_0(w: &[BlockQ4_0], x: &[BlockQ8_0]) -> f32 {
    // SAFETY: KERNELS is handed out only after avx2, fma and f16c were detected.
    unsafe { dot_q4_0_q8_0(w, x) }
}

fn axpy_q8_0(a: f32, w: &[BlockQ8_0], y: &mut [f32]) {
    // SAFETY: KERNELS is handed out only after avx2, fma and f16c were detected.
    unsafe { axpy_q8_0_i(a, w, y) }
}

fn axpy_q4_0(a: f32, w: &[BlockQ4_0], y: &mut [f32]) {
    // SAFETY: KERNELS is handed out only after avx2, fma and f16c were detected.
    unsafe { axpy_q4_0_i(a, w, y) }
}

// ---- 16-row interleaved kernels (`BlockQ4_0x16` / `BlockQ8_0x16`) ----
//
// The same layouts as the AVX-512 VNNI kernels: per block, `qs[g]` holds 4 code bytes of each
// of 16 rows, one row per 32-bit lane, so one `ymm` covers 8 rows (bytes 0..32: rows 0..8,
// 32..64: rows 8..16). AVX2 has no `vpdpbusd`; `vpmaddubsw` (u8 × i8 → i16 pairs, saturating)
// then `vpmaddwd` with ones (i16 pairs → i32) give each row's 4-byte group sum. Every code
// fed to `vpmaddubsw` is a nibble (0..15), so a pair is at most 2·15·128 = 3840 in magnitude
// and eight pairs summed in i16 at most 30,720: exact for every i8 input, -128 included. The
// f32 part is the AVX-512 kernels' own (`acc = fma(cvt(sumi), d_w · d_x, acc)` per row and
// block, in block order), so these results equal theirs bit for bit.

/// 4-byte group `k` of `xb`'s codes broadcast to every 32-bit lane (the `vpmaddubsw` i8 operand).
#[inline]
#[target_feature(enable = "avx2")]
fn xgroup8(xb: &BlockQ8_0, k: usize) -> __m256i {
    _mm256_set1_epi32(i32::from_le_bytes([
        xb.qs[4 * k] as u8,
        xb.qs[4 * k + 1] as u8,
        xb.qs[4 * k + 2] as u8,
        xb.qs[4 * k + 3] as u8,
    ]))
}

/// Half `h` (rows `8h..8h + 8`) of `qs[g]`: 32 bytes.
#[inline]
#[target_feature(enable = "avx2")]
fn load_half(q: &[u8; 64], h: usize) -> __m256i {
    debug_assert!(h < 2);
    // SAFETY: h < 2, so bytes 32h..32h + 32 lie inside the 64-byte array.
    unsafe { _mm256_loadu_si256(q.as_ptr().add(32 * h) as *const __m256i) }
}

/// Rows `8h..8h + 8`'s scales widened to f32.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn scales_half(d: &[half::f16; 16], h: usize) -> __m256 {
    debug_assert!(h < 2);
    // SAFETY: h < 2: 8 f16 (16 bytes) from element 8h stay inside the 16-element array.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(d.as_ptr().add(8 * h) as *const __m128i) })
}

/// Low and high nibbles of the 8 rows `8h..` of a Q4_0x16 block: `c[g]` codes `4g..4g + 4`,
/// `c[4 + g]` codes `16 + 4g..`.
#[inline]
#[target_feature(enable = "avx2")]
fn q4_codes(wb: &BlockQ4_0x16, h: usize) -> [__m256i; 8] {
    let m4 = _mm256_set1_epi8(0x0F);
    let mut c = [_mm256_setzero_si256(); 8];
    for g in 0..4 {
        let v = load_half(&wb.qs[g], h);
        c[g] = _mm256_and_si256(v, m4);
        c[4 + g] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
    }
    c
}

/// Per row (lane) of 8: `Σ_k Σ_j c_k,j · x_k,j` over the 8 groups, exact (see the section notes).
#[inline]
#[target_feature(enable = "avx2")]
fn q4_sumi(c: &[__m256i; 8], xb: &BlockQ8_0) -> __m256i {
    let mut s16 = _mm256_maddubs_epi16(c[0], xgroup8(xb, 0));
    for (k, ck) in c.iter().enumerate().skip(1) {
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(*ck, xgroup8(xb, k)));
    }
    _mm256_madd_epi16(s16, _mm256_set1_epi16(1))
}

/// Q8_0x16 codes (stored + 128) of rows `8h..`, split into nibbles: `lo[g]`, `hi[g]` for
/// group g, so that `code + 128 = 16·hi + lo`.
#[inline]
#[target_feature(enable = "avx2")]
fn q8_codes(wb: &BlockQ8_0x16, h: usize) -> ([__m256i; 8], [__m256i; 8]) {
    let m4 = _mm256_set1_epi8(0x0F);
    let (mut lo, mut hi) = ([_mm256_setzero_si256(); 8], [_mm256_setzero_si256(); 8]);
    for g in 0..8 {
        let v = load_half(&wb.qs[g], h);
        lo[g] = _mm256_and_si256(v, m4);
        hi[g] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
    }
    (lo, hi)
}

/// Per row (lane) of 8: `Σ_j (code_j + 128) · x_j` over the block, exact: the low and high
/// nibbles' products summed in i16 separately (each at most 30,720), then `16·hi + lo` in i32.
#[inline]
#[target_feature(enable = "avx2")]
fn q8_sumi(lo: &[__m256i; 8], hi: &[__m256i; 8], xb: &BlockQ8_0) -> __m256i {
    let x0 = xgroup8(xb, 0);
    let mut sl = _mm256_maddubs_epi16(lo[0], x0);
    let mut sh = _mm256_maddubs_epi16(hi[0], x0);
    for g in 1..8 {
        let xg = xgroup8(xb, g);
        sl = _mm256_add_epi16(sl, _mm256_maddubs_epi16(lo[g], xg));
        sh = _mm256_add_epi16(sh, _mm256_maddubs_epi16(hi[g], xg));
    }
    _mm256_add_epi32(
        _mm256_madd_epi16(sl, _mm256_set1_epi16(1)),
        _mm256_madd_epi16(sh, _mm256_set1_epi16(16)),
    )
}

/// The AVX2 twin of the VNNI `gemv16_q4_0` (same results, bit for bit).
#[target_feature(enable = "avx2,fma,f16c")]
fn gemv16_q4_0_i(w: &[BlockQ4_0x16], x: &[BlockQ8_0], xsum8: &[i32], out: &mut [f32; 16]) {
    let nb = w.len();
    assert!(
        x.len() >= nb && xsum8.len() >= nb,
        "gemv16_q4_0 input length"
    );
    let pf = crate::kernels::prefetch_distance();
    let size = std::mem::size_of::<BlockQ4_0x16>();
    let mut acc = [_mm256_setzero_ps(); 2];
    for b in 0..nb {
        if pf > 0 {
            prefetch_lines::<_MM_HINT_T0>(w.as_ptr() as *const u8, b * size + pf, size);
        }
        let (wb, xb) = (&w[b], &x[b]);
        let dx = _mm256_set1_ps(xb.d.to_f32());
        let xs = _mm256_set1_epi32(xsum8[b]);
        for (h, a) in acc.iter_mut().enumerate() {
            // Σ (q − 8)·x = Σ q·x − 8·Σ x (exact in i32)
            let si = _mm256_sub_epi32(q4_sumi(&q4_codes(wb, h), xb), xs);
            let dd = _mm256_mul_ps(scales_half(&wb.d, h), dx);
            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), dd, *a);
        }
    }
    // SAFETY: out is 16 f32: two stores of 8.
    unsafe {
        _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[1]);
    }
}

fn gemv16_q4_0(w: &[BlockQ4_0x16], x: &[BlockQ8_0], xsum8: &[i32], out: &mut [f32; 16]) {
    // SAFETY: KERNELS is handed out only after avx2, fma and f16c were detected.
    unsafe { gemv16_q4_0_i(w, x, xsum8, out) }
}

/// The AVX2 twin of the VNNI `gemv16_q8_0` (same results, bit for bit).
#[target_feature(enable = "avx2,fma,f16c")]
fn gemv16_q8_0_i(w: &[BlockQ8_0x16], x: &[BlockQ8_0], xsum128: &[i32], out: &mut [f32; 16]) {
    let nb = w.len();
    assert!(
        x.len() >= nb && xsum128.len() >= nb,
        "gemv16_q8_0 input length"
    );
    let pf = crate::kernels::prefetch_distance();
    let size = std::mem::size_of::<BlockQ8_0x16>();
    let mut acc = [_mm256_setzero_ps(); 2];
    for b in 0..nb {
        if pf > 0 {
            prefetch_lines::<_MM_HINT_T0>(w.as_ptr() as *const u8, b * size + pf, size);
        }
        let (wb, xb) = (&w[b], &x[b]);
        let dx = _mm256_set1_ps(xb.d.to_f32());
        let xs = _mm256_set1_epi32(xsum128[b]);
        for (h, a) in acc.iter_mut().enumerate() {
            let (lo, hi) = q8_codes(wb, h);
            // Σ (w + 128)·x − 128·Σ x = Σ w·x (exact in i32)
            let si = _mm256_sub_epi32(q8_sumi(&lo, &hi, xb), xs);
            let dd = _mm256_mul_ps(scales_half(&wb.d, h), dx);
            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), dd, *a);
        }
    }
    // SAFETY: out is 16 f32: two stores of 8.
    unsafe {
        _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[1]);
    }
}

fn gemv16_q8_0(w: &[BlockQ8_0x16], x: &[BlockQ8_0], xsum128: &[i32], out: &mut [f32; 16]) {
    // SAFETY: KERNELS is handed out only after avx2, fma and f16c were detected.
    unsafe { gemv16_q8_0_i(w, x, xsum128, out) }
}

/// Tokens per register tile of the 16-row GEMMs.
const GT: usize = 4;

/// Prompt version of [`gemv16_q4_0`]: per half (8 rows) and block, the codes are unpacked once
/// for up to 4 tokens; per (row, token) the operations equal `gemv16_q4_0`'s.
#[target_feature(enable = "avx2,fma,f16c")]
fn gemm16_q4_0_i(w: &[BlockQ4_0x16], x: &[BlockQ8_0], xsum8: &[i32], t: usize, out: &mut [f32]) {
    let nb = w.len();
    assert!(
        x.len() >= t.saturating_mul(nb)
            && xsum8.len() >= t.saturating_mul(nb)
            && out.len() >= t.saturating_mul(16),
        "gemm16_q4_0 shapes"
    );
    let mut t0 = 0;
    while t0 < t {
        let m = GT.min(t - t0);
        for h in 0..2 {
            let mut acc = [_mm256_setzero_ps(); GT];
            for b in 0..nb {
                let wb = &w[b];
                let c = q4_codes(wb, h);
                let dw = scales_half(&wb.d, h);
                for (j, a) in acc.iter_mut().enumerate().take(m) {
                    let xb = &x[(t0 + j) * nb + b];
                    let xs = _mm256_set1_epi32(xsum8[(t0 + j) * nb + b]);
                    let si = _mm256_sub_epi32(q4_sumi(&c, xb), xs);
                    let dd = _mm256_mul_ps(dw, _mm256_set1_ps(xb.d.to_f32()));
                    *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), dd, *a);
                }
            }
            for (j, a) in acc.iter().enumerate().take(m) {
                // SAFETY: (t0 + j)·16 + 8h + 8 <= 16·t <= out.len().
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add((t0 + j) * 16 + 8 * h), *a) };
            }
        }
        t0 += m;
    }
}

fn gemm16_q4_0(w: &[BlockQ4_0x16], x: &[BlockQ8_0], xsum8: &[i32], t: usize, out: &mut [f32]) {
    // SAFETY: KERNELS is handed out only after avx2, fma and f16c were detected.
    unsafe { gemm16_q4_0_i(w, x, xsum8, t, out) }
}

/// Prompt version of [`gemv16_q8_0`] (codes unpacked once per half and block for up to 4
/// tokens; per (row, token) the operations equal `gemv16_q8_0`'s).
#[target_feature(enable = "avx2,fma,f16c")]
fn gemm16_q8_0_i(w: &[BlockQ8_0x16], x: &[BlockQ8_0], xsum128: &[i32], t: usize, out: &mut [f32]) {
    let nb = w.len();
    assert!(
        x.len() >= t.saturating_mul(nb)
            && xsum128.len() >= t.saturating_mul(nb)
            && out.len() >= t.saturating_mul(16),
        "gemm16_q8_0 shapes"
    );
    let mut t0 = 0;
    while t0 < t {
        let m = GT.min(t - t0);
        for h in 0..2 {
            let mut acc = [_mm256_setzero_ps(); GT];
            for b in 0..nb {
                let wb = &w[b];
                let (lo, hi) = q8_codes(wb, h);
                let dw = scales_half(&wb.d, h);
                for (j, a) in acc.iter_mut().enumerate().take(m) {
                    let xb = &x[(t0 + j) * nb + b];
                    let xs = _mm256_set1_epi32(xsum128[(t0 + j) * nb + b]);
                    let si = _mm256_sub_epi32(q8_sumi(&lo, &hi, xb), xs);
                    let dd = _mm256_mul_ps(dw, _mm256_set1_ps(xb.d.to_f32()));
                    *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), dd, *a);
                }
            }
            for (j, a) in acc.iter().enumerate().take(m) {
                // SAFETY: (t0 + j)·16 + 8h + 8 <= 16·t <= out.len().
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add((t0 + j) * 16 + 8 * h), *a) };
            }
        }
        t0 += m;
    }
}

fn gemm16_q8_0(w: &[BlockQ8_0x16], x: &[BlockQ8_0], xsum128: &[i32], t: usize, out: &mut [f32]) {
    // SAFETY: KERNELS is handed out only after avx2, fma and f16c were detected.
    unsafe { gemm16_q8_0_i(w, x, xsum128, t, out) }
}
