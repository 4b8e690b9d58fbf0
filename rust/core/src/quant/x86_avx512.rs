//! AVX-512 VNNI tier of the quantized kernels (avx512f + bw + vl + vnni, plus the AVX2/F16C
//! base): same names, signatures and results (bit for bit) as `scalar`. Reachable only through
//! `KERNELS`, which `quant_kernels_for` hands out after [`vnni_detected`].
//!
//! Q8_0: two blocks share a `zmm` (`[block k | block k+4]`), `vpdpbusd` forms their i32 partial
//! sums without saturation, and a 3-level shuffle tree turns four such registers into one
//! `__m256i` holding the exact sums of blocks k = 0..7 in lane order. Q4_0: one block per `ymm`
//! (`vpdpbusd` under avx512vl) and the AVX2 transpose. In both, the f32 part is the scalar spec
//! in 8 lanes (the same code as the AVX2 tier). Activation quantization reuses the AVX2 code.

use std::arch::x86_64::*;

use crate::kernels::x86_avx512::prefetch_lines;

use super::x86_avx2::{halves8, lanes, transpose_sum8};

use super::{
    planar_group_rows, scalar, BlockQ4_0, BlockQ4_0x16, BlockQ8_0, BlockQ8_0x16, Planar,
    PlanarGeom, QuantKernels, PLANAR_GROUP, PLANAR_SCALE_LINE, PLANAR_TILE, QK8_0,
};

pub(super) const KERNELS: QuantKernels = QuantKernels {
    tier_name: "avx512vnni",
    vec_dot_q8_0_q8_0,
    vec_dot_q4_0_q8_0,
    axpy_q8_0,
    axpy_q4_0,
    // Activation quantization is a small share of a GEMV: the AVX2 version serves this tier.
    quantize_row_q8_0: super::x86_avx2::KERNELS.quantize_row_q8_0,
    quantize_row_q4_0: super::x86_avx2::KERNELS.quantize_row_q4_0,
    axpy4_q8_0: Some(axpy4_q8_0),
    axpy4_q4_0: Some(axpy4_q4_0),
    gemv16_q4_0: Some(gemv16_q4_0),
    gemv16_q8_0: Some(gemv16_q8_0),
    gemm16_q4_0: Some(gemm16_q4_0),
    gemm16_q8_0: Some(gemm16_q8_0),
    down_q4_0: Some(down_q4_0),
    down_q8_0: Some(down_q8_0),
};

const G: usize = scalar::LANES;

/// Whether this CPU runs this tier (on top of the AVX2 tier's avx2 + fma + f16c).
pub(super) fn vnni_detected() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512vnni")
}

/// Per 128-bit chunk: `[a0+a1, a2+a3, b0+b1, b2+b3]` (an `hadd` on 512 bits).
#[inline]
#[target_feature(enable = "avx512f")]
fn hadd512(a: __m512i, b: __m512i) -> __m512i {
    let (fa, fb) = (_mm512_castsi512_ps(a), _mm512_castsi512_ps(b));
    let even = _mm512_castps_si512(_mm512_shuffle_ps::<0b10_00_10_00>(fa, fb));
    let odd = _mm512_castps_si512(_mm512_shuffle_ps::<0b11_01_11_01>(fa, fb));
    _mm512_add_epi32(even, odd)
}

/// `s[k]` holds 8 partial sums of block k in lanes 0..8 and of block k+4 in lanes 8..16;
/// returns the 8 block sums in block order.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose_sum4(s: &[__m512i; 4]) -> __m256i {
    // 128-bit chunks of h: [b0..b3 lanes 0-3, b0..b3 lanes 4-7, b4..b7 lanes 0-3, b4..b7 lanes 4-7]
    let h = hadd512(hadd512(s[0], s[1]), hadd512(s[2], s[3]));
    let a = _mm512_shuffle_i64x2::<0b10_00_10_00>(h, h); // chunks [0, 2, 0, 2]
    let b = _mm512_shuffle_i64x2::<0b11_01_11_01>(h, h); // chunks [1, 3, 1, 3]
    _mm512_castsi512_si256(_mm512_add_epi32(a, b))
}

/// `[p | q]`: 32 bytes at `p` in the low half, 32 bytes at `q` in the high half.
///
/// # Safety
/// 32 bytes must be readable at `p` and at `q`; the CPU must support avx512f.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load2x32(p: *const i8, q: *const i8) -> __m512i {
    // SAFETY: caller guarantees 32 readable bytes at p and q.
    unsafe {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_loadu_si256(p as *const __m256i)),
            _mm256_loadu_si256(q as *const __m256i),
        )
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    let n = w.len().min(x.len()) / G * G;
    let off = _mm512_set1_epi8(-128); // 0x80: u8 128, and w ⊕ 0x80 = w + 128 as u8
    let zero = _mm512_setzero_si512();
    let mut acc = _mm256_setzero_ps();
    for (wg, xg) in w[..n].chunks_exact(G).zip(x[..n].chunks_exact(G)) {
        let mut s = [zero; 4];
        for k in 0..4 {
            // SAFETY: qs fields are 32 bytes each.
            let (wz, xz) = unsafe {
                (
                    load2x32(wg[k].qs.as_ptr(), wg[k + 4].qs.as_ptr()),
                    load2x32(xg[k].qs.as_ptr(), xg[k + 4].qs.as_ptr()),
                )
            };
            // Σ (w+128)·x − Σ 128·x = Σ w·x, exact for every pair of i8 codes.
            let p = _mm512_dpbusd_epi32(zero, _mm512_xor_si512(wz, off), xz);
            let c = _mm512_dpbusd_epi32(zero, off, xz);
            s[k] = _mm512_sub_epi32(p, c);
        }
        let sumi = _mm256_cvtepi32_ps(transpose_sum4(&s));
        let dd = _mm256_mul_ps(
            halves8(std::array::from_fn(|k| wg[k].d.to_bits())),
            halves8(std::array::from_fn(|k| xg[k].d.to_bits())),
        );
        acc = _mm256_add_ps(acc, _mm256_mul_ps(sumi, dd));
    }
    scalar::finish_q8_0_q8_0(w, x, n, lanes(acc))
}

/// Q4_0 with 256-bit `vpdpbusd` (one block per `ymm`) and the AVX2 transpose: on Zen 4, where
/// 512-bit ops are double-pumped, this beat the two-blocks-per-`zmm` layout of the Q8_0 kernel
/// (which needs extra `vinserti64x4`/`vshufi64x2` to unpack nibbles): 13.5 vs 10.7 GB/s.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_q4_0_q8_0(w: &[BlockQ4_0], x: &[BlockQ8_0]) -> f32 {
    let n = w.len().min(x.len()) / G * G;
    let (m4, eight, zero) = (
        _mm256_set1_epi8(0x0F),
        _mm256_set1_epi8(8),
        _mm256_setzero_si256(),
    );
    let mut acc = _mm256_setzero_ps();
    for (wg, xg) in w[..n].chunks_exact(G).zip(x[..n].chunks_exact(G)) {
        let mut s = [zero; G];
        for k in 0..G {
            // SAFETY: Q4_0 qs fields are 16 bytes, Q8_0 qs fields 32 bytes.
            let (t, xv) = unsafe {
                (
                    _mm_loadu_si128(wg[k].qs.as_ptr() as *const __m128i),
                    _mm256_loadu_si256(xg[k].qs.as_ptr() as *const __m256i),
                )
            };
            let q = _mm256_and_si256(
                _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(t), _mm_srli_epi16::<4>(t)),
                m4,
            );
            s[k] = _mm256_sub_epi32(
                _mm256_dpbusd_epi32(zero, q, xv),
                _mm256_dpbusd_epi32(zero, eight, xv),
            );
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

/// `y[0..16] += s · codes` (16 i8 codes in `q`).
#[inline]
#[target_feature(enable = "avx512f")]
fn axpy16(s: __m512, q: __m128i, y: &mut [f32]) {
    assert!(y.len() >= 16); // compiled away: callers pass fixed halves of a 32-chunk
    let v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
    // SAFETY: y has at least 16 elements (asserted above).
    unsafe {
        let yv = _mm512_loadu_ps(y.as_ptr());
        _mm512_storeu_ps(y.as_mut_ptr(), _mm512_add_ps(yv, _mm512_mul_ps(s, v)));
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn axpy_q8_0_i(a: f32, w: &[BlockQ8_0], y: &mut [f32]) {
    let va = _mm512_set1_ps(a);
    for (b, ys) in w.iter().zip(y.chunks_exact_mut(QK8_0)) {
        // s = a · d in every lane (the scalar spec's a * d.to_f32()).
        let s = _mm512_mul_ps(va, _mm512_cvtph_ps(_mm256_set1_epi16(b.d.to_bits() as i16)));
        let p = b.qs.as_ptr() as *const __m128i;
        // SAFETY: qs is 32 bytes: two 16-byte unaligned loads.
        let (q0, q1) = unsafe { (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1))) };
        let (y0, y1) = ys.split_at_mut(16);
        axpy16(s, q0, y0);
        axpy16(s, q1, y1);
    }
}

/// `[(q − 8) · s for q in 0..16]`: every product a Q4_0 AXPY can need for one block, made
/// with the scalar spec's own multiplication `s · (q − 8)`, so a table lookup is bit-identical.
#[inline]
#[target_feature(enable = "avx512f")]
fn q4_table(s: __m512) -> __m512 {
    let codes = _mm512_setr_ps(
        -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0,
    );
    _mm512_mul_ps(s, codes)
}

/// The 16 code bytes of a Q4_0 block widened to i32 lanes: the low nibble is weight j, bits
/// 4..8 weight j + 16 (`vpermps` reads only the low 4 bits of each index lane).
#[inline]
#[target_feature(enable = "avx512f")]
fn q4_index(b: &BlockQ4_0) -> (__m512i, __m512i) {
    // SAFETY: qs is exactly 16 bytes.
    let t = unsafe { _mm_loadu_si128(b.qs.as_ptr() as *const __m128i) };
    let lo = _mm512_cvtepu8_epi32(t);
    (lo, _mm512_srli_epi32::<4>(lo))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn axpy_q4_0_i(a: f32, w: &[BlockQ4_0], y: &mut [f32]) {
    let va = _mm512_set1_ps(a);
    for (b, ys) in w.iter().zip(y.chunks_exact_mut(QK8_0)) {
        let s = _mm512_mul_ps(va, _mm512_cvtph_ps(_mm256_set1_epi16(b.d.to_bits() as i16)));
        let tab = q4_table(s);
        let (lo, hi) = q4_index(b);
        let (y0, y1) = ys.split_at_mut(16);
        // SAFETY: y0 and y1 have 16 elements each (a 32-chunk split in halves).
        unsafe {
            let p0 = _mm512_add_ps(_mm512_loadu_ps(y0.as_ptr()), _mm512_permutexvar_ps(lo, tab));
            let p1 = _mm512_add_ps(_mm512_loadu_ps(y1.as_ptr()), _mm512_permutexvar_ps(hi, tab));
            _mm512_storeu_ps(y0.as_mut_ptr(), p0);
            _mm512_storeu_ps(y1.as_mut_ptr(), p1);
        }
    }
}

fn vec_dot_q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    // SAFETY: KERNELS is handed out only when vnni_detected() and the AVX2 tier is available.
    unsafe { dot_q8_0_q8_0(w, x) }
}

fn vec_dot_q4_0_q8_0(w: &[BlockQ4_0], x: &[BlockQ8_0]) -> f32 {
    // SAFETY: KERNELS is handed out only when vnni_detected() and the AVX2 tier is available.
    unsafe { dot_q4_0_q8_0(w, x) }
}

fn axpy_q8_0(a: f32, w: &[BlockQ8_0], y: &mut [f32]) {
    // SAFETY: KERNELS is handed out only when vnni_detected() and the AVX2 tier is available.
    unsafe { axpy_q8_0_i(a, w, y) }
}

fn axpy_q4_0(a: f32, w: &[BlockQ4_0], y: &mut [f32]) {
    // SAFETY: KERNELS is handed out only when vnni_detected() and the AVX2 tier is available.
    unsafe { axpy_q4_0_i(a, w, y) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn axpy4_q8_0_i(a: &[f32; 4], w: [&[BlockQ8_0]; 4], y: &mut [f32]) {
    let nb = w
        .iter()
        .map(|r| r.len())
        .min()
        .unwrap_or(0)
        .min(y.len() / QK8_0);
    for (b, ys) in y.chunks_exact_mut(QK8_0).take(nb).enumerate() {
        let (y0, y1) = ys.split_at_mut(16);
        // SAFETY: y0 and y1 have 16 elements each (a 32-chunk split in halves).
        let (mut acc0, mut acc1) =
            unsafe { (_mm512_loadu_ps(y0.as_ptr()), _mm512_loadu_ps(y1.as_ptr())) };
        for r in 0..4 {
            let blk = &w[r][b];
            let s = _mm512_mul_ps(
                _mm512_set1_ps(a[r]),
                _mm512_cvtph_ps(_mm256_set1_epi16(blk.d.to_bits() as i16)),
            );
            let p = blk.qs.as_ptr() as *const __m128i;
            // SAFETY: qs is 32 bytes: two 16-byte unaligned loads.
            let (q0, q1) = unsafe { (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1))) };
            acc0 = _mm512_add_ps(
                acc0,
                _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0))),
            );
            acc1 = _mm512_add_ps(
                acc1,
                _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1))),
            );
        }
        // SAFETY: as above.
        unsafe {
            _mm512_storeu_ps(y0.as_mut_ptr(), acc0);
            _mm512_storeu_ps(y1.as_mut_ptr(), acc1);
        }
    }
}

fn axpy4_q8_0(a: &[f32; 4], w: [&[BlockQ8_0]; 4], y: &mut [f32]) {
    // SAFETY: KERNELS is handed out only when vnni_detected() and the AVX2 tier is available.
    unsafe { axpy4_q8_0_i(a, w, y) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn axpy4_q4_0_i(a: &[f32; 4], w: [&[BlockQ4_0]; 4], y: &mut [f32]) {
    let nb = w
        .iter()
        .map(|r| r.len())
        .min()
        .unwrap_or(0)
        .min(y.len() / QK8_0);
    for (b, ys) in y.chunks_exact_mut(QK8_0).take(nb).enumerate() {
        let (y0, y1) = ys.split_at_mut(16);
        // SAFETY: y0 and y1 have 16 elements each (a 32-chunk split in halves).
        let (mut acc0, mut acc1) =
            unsafe { (_mm512_loadu_ps(y0.as_ptr()), _mm512_loadu_ps(y1.as_ptr())) };
        for r in 0..4 {
            let blk = &w[r][b];
            let s = _mm512_mul_ps(
                _mm512_set1_ps(a[r]),
                _mm512_cvtph_ps(_mm256_set1_epi16(blk.d.to_bits() as i16)),
            );
            let tab = q4_table(s);
            let (lo, hi) = q4_index(blk);
            acc0 = _mm512_add_ps(acc0, _mm512_permutexvar_ps(lo, tab));
            acc1 = _mm512_add_ps(acc1, _mm512_permutexvar_ps(hi, tab));
        }
        // SAFETY: as above.
        unsafe {
            _mm512_storeu_ps(y0.as_mut_ptr(), acc0);
            _mm512_storeu_ps(y1.as_mut_ptr(), acc1);
        }
    }
}

fn axpy4_q4_0(a: &[f32; 4], w: [&[BlockQ4_0]; 4], y: &mut [f32]) {
    // SAFETY: KERNELS is handed out only when vnni_detected() and the AVX2 tier is available.
    unsafe { axpy4_q4_0_i(a, w, y) }
}

/// 16 interleaved Q4_0 rows against one Q8_0 input (see `BlockQ4_0x16`): per block, 8
/// `vpdpbusd` with the input's 4-byte groups broadcast form all 16 rows' exact integer sums in
/// one register (no horizontal sums), then one FMA per block per 16 rows applies the scales.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn gemv16_q4_0_i(w: &[BlockQ4_0x16], x: &[BlockQ8_0], xsum8: &[i32], out: &mut [f32; 16]) {
    let nb = w.len();
    assert!(
        x.len() >= nb && xsum8.len() >= nb,
        "gemv16_q4_0 input length"
    );
    let m4 = _mm512_set1_epi8(0x0F);
    let mut acc = _mm512_setzero_ps();
    let pf = crate::kernels::prefetch_distance();
    let size = std::mem::size_of::<BlockQ4_0x16>();
    for b in 0..nb {
        if pf > 0 {
            prefetch_lines::<_MM_HINT_T0>(w.as_ptr() as *const u8, b * size + pf, size);
        }
        let (wb, xb) = (&w[b], &x[b]);
        let xg = |k: usize| {
            _mm512_set1_epi32(i32::from_le_bytes([
                xb.qs[4 * k] as u8,
                xb.qs[4 * k + 1] as u8,
                xb.qs[4 * k + 2] as u8,
                xb.qs[4 * k + 3] as u8,
            ]))
        };
        let mut si = _mm512_setzero_si512();
        for g in 0..4 {
            // SAFETY: qs[g] is 64 bytes.
            let v = unsafe { _mm512_loadu_si512(wb.qs[g].as_ptr() as *const _) };
            let lo = _mm512_and_si512(v, m4); // codes 4g..4g+4 of each row
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4); // codes 16+4g..
            si = _mm512_dpbusd_epi32(si, lo, xg(g));
            si = _mm512_dpbusd_epi32(si, hi, xg(4 + g));
        }
        // Σ (q − 8)·x = Σ q·x − 8·Σ x (exact in i32)
        let si = _mm512_sub_epi32(si, _mm512_set1_epi32(xsum8[b]));
        // SAFETY: d is 16 f16 = 32 bytes.
        let dw = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(wb.d.as_ptr() as *const __m256i) });
        let dd = _mm512_mul_ps(dw, _mm512_set1_ps(xb.d.to_f32()));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), dd, acc);
    }
    // SAFETY: out is 16 f32.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), acc) };
}

fn gemv16_q4_0(w: &[BlockQ4_0x16], x: &[BlockQ8_0], xsum8: &[i32], out: &mut [f32; 16]) {
    // SAFETY: KERNELS is handed out only when vnni_detected() and the AVX2 tier is available.
    unsafe { gemv16_q4_0_i(w, x, xsum8, out) }
}

/// 16 interleaved Q8_0 rows (codes stored + 128) against one Q8_0 input: 8 `vpdpbusd` per
/// block, then `Σ (w + 128)·x − 128·Σ x = Σ w·x` (exact) and one FMA with the scales.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn gemv16_q8_0_i(w: &[BlockQ8_0x16], x: &[BlockQ8_0], xsum128: &[i32], out: &mut [f32; 16]) {
    let nb = w.len();
    assert!(
        x.len() >= nb && xsum128.len() >= nb,
        "gemv16_q8_0 input length"
    );
    let mut acc = _mm512_setzero_ps();
    let pf = crate::kernels::prefetch_distance();
    let size = std::mem::size_of::<BlockQ8_0x16>();
    for b in 0..nb {
        if pf > 0 {
            prefetch_lines::<_MM_HINT_T0>(w.as_ptr() as *const u8, b * size + pf, size);
        }
        let (wb, xb) = (&w[b], &x[b]);
        let mut si = _mm512_setzero_si512();
        for g in 0..8 {
            // SAFETY: qs[g] is 64 bytes.
            let v = unsafe { _mm512_loadu_si512(wb.qs[g].as_ptr() as *const _) };
            let xg = _mm512_set1_epi32(i32::from_le_bytes([
                xb.qs[4 * g] as u8,
                xb.qs[4 * g + 1] as u8,
                xb.qs[4 * g + 2] as u8,
                xb.qs[4 * g + 3] as u8,
            ]));
            si = _mm512_dpbusd_epi32(si, v, xg);
        }
        let si = _mm512_sub_epi32(si, _mm512_set1_epi32(xsum128[b]));
        // SAFETY: d is 16 f16 = 32 bytes.
        let dw = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(wb.d.as_ptr() as *const __m256i) });
        let dd = _mm512_mul_ps(dw, _mm512_set1_ps(xb.d.to_f32()));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), dd, acc);
    }
    // SAFETY: out is 16 f32.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), acc) };
}

fn gemv16_q8_0(w: &[BlockQ8_0x16], x: &[BlockQ8_0], xsum128: &[i32], out: &mut [f32; 16]) {
    // SAFETY: KERNELS is handed out only when vnni_detected() and the AVX2 tier is available.
    unsafe { gemv16_q8_0_i(w, x, xsum128, out) }
}

/// `xb`'s 4-byte group `k` broadcast to every lane (the signed `vpdpbusd` operand).
#[inline]
#[target_feature(enable = "avx512f")]
fn xgroup(xb: &BlockQ8_0, k: usize) -> __m512i {
    _mm512_set1_epi32(i32::from_le_bytes([
        xb.qs[4 * k] as u8,
        xb.qs[4 * k + 1] as u8,
        xb.qs[4 * k + 2] as u8,
        xb.qs[4 * k + 3] as u8,
    ]))
}

/// Tokens per register tile of the 16-row GEMMs.
const GT: usize = 4;

/// Prompt version of [`gemv16_q4_0`]: per block, the 16 rows' codes are unpacked once and
/// reused by up to 4 tokens; per (row, token) the operations equal `gemv16_q4_0`'s.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn gemm16_q4_0_i(w: &[BlockQ4_0x16], x: &[BlockQ8_0], xsum8: &[i32], t: usize, out: &mut [f32]) {
    let nb = w.len();
    assert!(
        x.len() >= t.saturating_mul(nb)
            && xsum8.len() >= t.saturating_mul(nb)
            && out.len() >= t.saturating_mul(16),
        "gemm16_q4_0 shapes"
    );
    let m4 = _mm512_set1_epi8(0x0F);
    let mut t0 = 0;
    while t0 < t {
        let m = GT.min(t - t0);
        let mut acc = [_mm512_setzero_ps(); GT];
        for b in 0..nb {
            let wb = &w[b];
            let mut codes = [_mm512_setzero_si512(); 8];
            for g in 0..4 {
                // SAFETY: qs[g] is 64 bytes.
                let v = unsafe { _mm512_loadu_si512(wb.qs[g].as_ptr() as *const _) };
                codes[g] = _mm512_and_si512(v, m4);
                codes[4 + g] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
            }
            // SAFETY: d is 16 f16 = 32 bytes.
            let dw =
                _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(wb.d.as_ptr() as *const __m256i) });
            for (j, a) in acc.iter_mut().enumerate().take(m) {
                let xb = &x[(t0 + j) * nb + b];
                let mut si = _mm512_setzero_si512();
                for g in 0..4 {
                    si = _mm512_dpbusd_epi32(si, codes[g], xgroup(xb, g));
                    si = _mm512_dpbusd_epi32(si, codes[4 + g], xgroup(xb, 4 + g));
                }
                let si = _mm512_sub_epi32(si, _mm512_set1_epi32(xsum8[(t0 + j) * nb + b]));
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(xb.d.to_f32()));
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), dd, *a);
            }
        }
        for (j, a) in acc.iter().enumerate().take(m) {
            // SAFETY: (t0 + j)·16 + 16 <= 16·t <= out.len().
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add((t0 + j) * 16), *a) };
        }
        t0 += m;
    }
}

fn gemm16_q4_0(w: &[BlockQ4_0x16], x: &[BlockQ8_0], xsum8: &[i32], t: usize, out: &mut [f32]) {
    // SAFETY: KERNELS is handed out only when vnni_detected() and the AVX2 tier is available.
    unsafe { gemm16_q4_0_i(w, x, xsum8, t, out) }
}

/// Prompt version of [`gemv16_q8_0`] (weights loaded once per block for up to 4 tokens).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
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
        let mut acc = [_mm512_setzero_ps(); GT];
        for b in 0..nb {
            let wb = &w[b];
            let mut codes = [_mm512_setzero_si512(); 8];
            for (g, c) in codes.iter_mut().enumerate() {
                // SAFETY: qs[g] is 64 bytes.
                *c = unsafe { _mm512_loadu_si512(wb.qs[g].as_ptr() as *const _) };
            }
            // SAFETY: d is 16 f16 = 32 bytes.
            let dw =
                _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(wb.d.as_ptr() as *const __m256i) });
            for (j, a) in acc.iter_mut().enumerate().take(m) {
                let xb = &x[(t0 + j) * nb + b];
                let mut si = _mm512_setzero_si512();
                for (g, c) in codes.iter().enumerate() {
                    si = _mm512_dpbusd_epi32(si, *c, xgroup(xb, g));
                }
                let si = _mm512_sub_epi32(si, _mm512_set1_epi32(xsum128[(t0 + j) * nb + b]));
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(xb.d.to_f32()));
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), dd, *a);
            }
        }
        for (j, a) in acc.iter().enumerate().take(m) {
            // SAFETY: (t0 + j)·16 + 16 <= 16·t <= out.len().
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add((t0 + j) * 16), *a) };
        }
        t0 += m;
    }
}

fn gemm16_q8_0(w: &[BlockQ8_0x16], x: &[BlockQ8_0], xsum128: &[i32], t: usize, out: &mut [f32]) {
    // SAFETY: KERNELS is handed out only when vnni_detected() and the AVX2 tier is available.
    unsafe { gemm16_q8_0_i(w, x, xsum128, t, out) }
}

/// Whether this CPU also has avx512vbmi (byte permutes), which the planar down kernels use to
/// interleave four rows' codes into `vpdpbusd` groups.
pub(super) fn vbmi_detected() -> bool {
    vnni_detected() && std::is_x86_feature_detected!("avx512vbmi")
}

/// Bounds of a down-kernel call, checked once so the loops can use raw loads: the rows lie
/// inside `w` (and, in a tiled matrix, in groups of one size), `y` holds `32·nb` floats.
fn check_down<Q: super::Pod>(w: &Planar<Q>, rows: &[u32], a: &[f32], y: &[f32]) {
    let g = w.geom();
    assert!(
        rows.len() == a.len() && rows.len().is_multiple_of(4) && rows.len() <= 32,
        "down kernel: rows/coefficients must be a multiple of 4, at most 32"
    );
    assert!(y.len() >= 32 * g.nb, "down kernel: y shorter than 32·nb");
    assert!(
        w.bytes().len() >= g.bytes() && g.qsz == std::mem::size_of::<Q>(),
        "down kernel: buffer shorter than its geometry"
    );
    assert!(
        rows.iter().all(|&r| (r as usize) < g.rows),
        "down kernel: row out of range"
    );
    if g.is_tiled() {
        let gr = rows
            .first()
            .map_or(PLANAR_GROUP, |&r| planar_group_rows(g.rows, r as usize));
        assert!(
            rows.iter()
                .all(|&r| planar_group_rows(g.rows, r as usize) == gr),
            "down kernel: rows from groups of different sizes"
        );
    }
}

/// Pass 1 of a planar down kernel for one scale tile (`wt` blocks; lanes beyond are zero):
/// row `i`'s scales start at byte `so[i]` of `base`. Per block the int8 coefficients of each row, packed
/// four rows per 32-bit group into `cq[q]`, the coefficient sums times `-offset` into `corr`,
/// and the scales `s`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn down_coefficients(
    base: *const u8,
    so: &[usize; 32],
    wt: usize,
    a: &[f32],
    offset: i32,
    cq: &mut [[i32; 16]; 8],
    corr: &mut [i32; 16],
    s: &mut [f32; 16],
) {
    let mask = (((1u32 << wt) - 1) & 0xFFFF) as __mmask16;
    // a_i·d_i per row, kept for the second pass (stores and loads are cheaper than converting
    // the scales twice)
    let mut pv = [_mm512_setzero_ps(); 32];
    let mut m = _mm512_setzero_ps();
    for (i, pv) in pv.iter_mut().enumerate().take(a.len()) {
        // SAFETY (caller): row i's tile has wt scales at so[i]; lanes past wt are masked.
        let dv = unsafe {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                mask,
                base.add(so[i]) as *const i16,
            ))
        };
        *pv = _mm512_mul_ps(_mm512_set1_ps(a[i]), dv);
        // max_ps returns its second operand when either is NaN: a NaN product never wins, as
        // in the spec's f32::max
        m = _mm512_max_ps(_mm512_abs_ps(*pv), m);
    }
    let c127 = _mm512_set1_ps(127.0);
    // blocks whose 127 / m is not finite (m = 0, or m below ~3.7e-37) add nothing: their
    // coefficients and scale are 0, as in the spec
    let q = _mm512_div_ps(c127, m);
    let ok = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(q, _mm512_set1_ps(f32::INFINITY));
    let inv = _mm512_maskz_mov_ps(ok, q);
    let mut sum = _mm512_setzero_si512();
    for (q, cq) in cq.iter_mut().enumerate().take(a.len() / 4) {
        let mut packed = _mm512_setzero_si512();
        for kk in 0..4 {
            // A NaN product converts to i32::MIN (the spec's `NaN as i32` is 0): its packed
            // byte is 0 all the same, and in the correction sum, which is only ever multiplied
            // by the code offset (8 or 128) in wrapping i32, it adds 0 mod 2^32. So the
            // result keeps the spec's bits (tested) without a mask here.
            let c = _mm512_cvtps_epi32(_mm512_mul_ps(pv[4 * q + kk], inv));
            sum = _mm512_add_epi32(sum, c);
            // packed |= (c << 8kk) & (0xFF << 8kk): one shift and one ternary logic op
            let sh = _mm512_sllv_epi32(c, _mm512_set1_epi32(8 * kk as i32));
            let byte = _mm512_set1_epi32(0xFF << (8 * kk));
            packed = _mm512_ternarylogic_epi32::<0xF8>(packed, sh, byte);
        }
        // SAFETY: cq is 16 i32.
        unsafe { _mm512_storeu_si512(cq.as_mut_ptr() as *mut _, packed) };
    }
    let corr_v = _mm512_mullo_epi32(sum, _mm512_set1_epi32(-offset));
    // SAFETY: corr and s are 16 lanes.
    unsafe {
        _mm512_storeu_si512(corr.as_mut_ptr() as *mut _, corr_v);
        _mm512_storeu_ps(s.as_mut_ptr(), _mm512_maskz_div_ps(ok, m, c127));
    }
}

/// `y[32b..32b+32] = fma(s, acc, y)` for one block's two accumulators.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn down_finish(y: *mut f32, s: f32, acc0: __m512i, acc1: __m512i) {
    let sv = _mm512_set1_ps(s);
    // SAFETY (caller): y points at 32 floats.
    unsafe {
        _mm512_storeu_ps(
            y,
            _mm512_fmadd_ps(sv, _mm512_cvtepi32_ps(acc0), _mm512_loadu_ps(y)),
        );
        let y1 = y.add(16);
        _mm512_storeu_ps(
            y1,
            _mm512_fmadd_ps(sv, _mm512_cvtepi32_ps(acc1), _mm512_loadu_ps(y1)),
        );
    }
}

/// The sum of a Q4_0 high-nibble accumulator that was fed the codes' high nibbles in place
/// (`q & 0xF0`, i.e. 16·q, which saves a shift per register) and started at 16·`corr`: every
/// term is a multiple of 16, so the arithmetic shift gives the plain sum exactly.
#[inline]
#[target_feature(enable = "avx512f")]
fn hi_sum(acc16: __m512i) -> __m512i {
    _mm512_srai_epi32::<4>(acc16)
}

/// Four rows' 64-byte loads, each four 16-byte lanes, regrouped so that output `k` holds lane
/// `k` of all four rows with byte `j` of row `i` at byte `4j + i` (`vpdpbusd` groups of four
/// rows): two 128-bit shuffles per pair of rows and one `vpermt2b` per output.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
fn regroup4(r: [__m512i; 4], idx_even: __m512i, idx_odd: __m512i) -> [__m512i; 4] {
    let a = _mm512_shuffle_i64x2::<0b01_00_01_00>(r[0], r[1]); // r0.L0 r0.L1 r1.L0 r1.L1
    let b = _mm512_shuffle_i64x2::<0b11_10_11_10>(r[0], r[1]); // r0.L2 r0.L3 r1.L2 r1.L3
    let c = _mm512_shuffle_i64x2::<0b01_00_01_00>(r[2], r[3]);
    let d = _mm512_shuffle_i64x2::<0b11_10_11_10>(r[2], r[3]);
    [
        _mm512_permutex2var_epi8(a, idx_even, c),
        _mm512_permutex2var_epi8(a, idx_odd, c),
        _mm512_permutex2var_epi8(b, idx_even, d),
        _mm512_permutex2var_epi8(b, idx_odd, d),
    ]
}

/// `vpermt2b` indices taking byte `j` of 16-byte lane `lane` (0 or 1) of row `i` from byte
/// `32·i + 16·lane + j` of two tables to byte `4j + i`. Both users put row `i` at `32·i` of the
/// 128 bytes: [`regroup4`] (`[r0.L0 r0.L1 r1.L0 r1.L1]`, `[r2.. r3..]`) and a single Q8_0 block
/// of four rows (`[r0 | r1]`, `[r2 | r3]`, 32 bytes each).
#[inline]
#[target_feature(enable = "avx512f")]
fn regroup_index(lane: usize) -> __m512i {
    let mut t = [0u8; 64];
    for (p, v) in t.iter_mut().enumerate() {
        *v = (32 * (p % 4) + 16 * lane + p / 4) as u8;
    }
    // SAFETY: 64 bytes.
    unsafe { _mm512_loadu_si512(t.as_ptr() as *const _) }
}

/// The int8 coefficients of one scale tile (see [`down_coefficients`]).
struct Tile {
    cq: [[i32; 16]; 8],
    corr: [i32; 16],
    s: [f32; 16],
}

/// The rows of the next kernel call (`next`), whose pieces a down kernel asks the CPU to load
/// into L2. In a tiled matrix ([`DownLayout::Groups`](super::DownLayout)), where a row is
/// several pieces, as the kernel reaches the same chunk / scale line of its own rows: the
/// prefetches of the next call come in one burst per tile instead of one per call, which
/// stalled on full miss buffers. Where each row is one record, [`RowStream`] spreads them
/// finer. A hint only; it changes no result.
struct Ahead {
    next: *const u32,
    n: usize,
    geom: PlanarGeom,
    base: *const u8,
}

impl Ahead {
    /// The hint for rows `next` of the planar matrix `w`.
    fn new<Q: super::Pod>(next: &[u32], w: &Planar<Q>) -> Ahead {
        Ahead {
            next: next.as_ptr(),
            n: next.len(),
            geom: *w.geom(),
            base: w.bytes().as_ptr(),
        }
    }

    /// Row `i` of `next` if it lies inside the matrix.
    #[inline(always)]
    fn row(&self, i: usize) -> Option<usize> {
        // SAFETY: `next` holds n rows (from a slice) and i < n at every caller.
        let r = unsafe { *self.next.add(i) } as usize;
        (r < self.geom.rows).then_some(r)
    }

    /// Prefetch the scale piece starting at block `b0` of each next row (every line of it).
    #[inline(always)]
    fn scales(&self, b0: usize) {
        let len = 2 * self.geom.scale_run(b0);
        for i in 0..self.n {
            if let Some(r) = self.row(i) {
                // the piece lies inside the buffer (and a prefetch never faults)
                super::planar_prefetch::<_MM_HINT_T1>(self.base, self.geom.scale_at(r, b0), len);
            }
        }
    }

    /// Prefetch blocks `b..b + wc` of each next row's codes (stored consecutively), every
    /// line of them.
    #[inline(always)]
    fn codes(&self, b: usize, wc: usize) {
        let len = wc * self.geom.qsz;
        for i in 0..self.n {
            if let Some(r) = self.row(i) {
                super::planar_prefetch::<_MM_HINT_T1>(self.base, self.geom.code_at(r, b), len);
            }
        }
    }
}

/// The next call's rows prefetched into L2 as one stream of 64-byte lines, a few lines per
/// step of the kernel's inner loop (one step per line of four of its own rows), so that the
/// prefetches are spread evenly over the compute instead of stalling it in bursts on full miss
/// buffers. A record's lines (its codes, then its scales) go in ascending order by runs of a
/// tile's lines (16 blocks: 4 lines of Q4_0, 8 of Q8_0; at widths of whole tiles the scale
/// lines are the last run), and in a run row by row. (Scale lines first, or a record laid out
/// as segments of a scale line and its codes, measured slower: PERF NOTES, stop 19.) Measured on the Xeon
/// (`examples/bw_probe DOWN=1`, in-process alternation, 90 % zeros), Q4_0: this order 119-124
/// µs per layer against 127-137 for whole rows one after the other and 129-147 for the
/// per-tile bursts of [`Ahead`]; single-line runs were slower (101-121 against 83-123 in a
/// faster phase), 2- or 8-line runs equal within noise. Only where each row is one record
/// ([`DownLayout::Rows`](super::DownLayout)); tiled matrices use [`Ahead`]'s per-tile bursts.
struct RowStream {
    /// The rows' records (each 64-byte aligned).
    rec: [*const i8; 32],
    /// Rows in the stream.
    n: usize,
    /// Lines per record that hold blocks (its codes, then its scales).
    lines: usize,
    /// Lines per [`Self::step`].
    per_step: usize,
    /// Lines per run.
    run: usize,
    /// The next line: run `k`, row `row`, line `line` of the run.
    k: usize,
    row: usize,
    line: usize,
}

impl RowStream {
    /// The stream of `ahead`'s rows, spread over `steps` calls of [`Self::step`]. Empty (its
    /// `burst` then hands the per-tile bursts `ahead`) in a tiled matrix, for more than 32 next
    /// rows, and at width 0; without rows inside the matrix it holds none.
    fn new(ahead: &Ahead, steps: usize) -> RowStream {
        let g = &ahead.geom;
        let mut st = RowStream {
            rec: [std::ptr::null(); 32],
            n: 0,
            lines: (g.nb * (g.qsz + 2)).div_ceil(64),
            per_step: 0,
            run: (PLANAR_TILE * g.qsz).div_ceil(64),
            k: 0,
            row: 0,
            line: 0,
        };
        if g.nb == 0 || g.is_tiled() || ahead.n > 32 {
            return st;
        }
        for i in 0..ahead.n {
            if let Some(r) = ahead.row(i) {
                // a record starts with its first block's codes, on a cache line, inside the
                // buffer
                st.rec[st.n] = ahead.base.wrapping_add(g.code_at(r, 0)) as *const i8;
                st.n += 1;
            }
        }
        st.per_step = (st.n * st.lines).div_ceil(steps.max(1));
        st
    }

    /// `ahead` if this stream is empty (the per-tile bursts then prefetch the next rows).
    fn burst<'a>(&self, ahead: &'a Ahead) -> Option<&'a Ahead> {
        (self.per_step == 0).then_some(ahead)
    }

    /// Prefetch the next `per_step` lines of the stream.
    #[inline(always)]
    fn step(&mut self) {
        for _ in 0..self.per_step {
            self.one();
        }
    }

    #[inline(always)]
    fn one(&mut self) {
        if self.row >= self.n {
            return;
        }
        let line = self.k * self.run + self.line;
        let p = self.rec[self.row].wrapping_add(64 * line);
        // SAFETY: a prefetch is a hint that never faults (and p lies in the row's record).
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p) };
        self.line += 1;
        if self.line >= self.run || line + 1 >= self.lines {
            self.line = 0;
            self.row += 1;
            if self.row == self.n && (self.k + 1) * self.run < self.lines {
                (self.k, self.row) = (self.k + 1, 0);
            }
        }
    }

    /// Whatever the steps left (the rows past the last step).
    fn rest(&mut self) {
        while self.row < self.n {
            self.one();
        }
    }
}

/// The loop both planar down kernels share: per scale tile of 16 blocks the coefficient pass
/// (code offset `offset`), then per run of the tile's blocks stored consecutively (a code
/// piece may span several tiles, as a record's and a tiled Q8_0 chunk do, or a tile several
/// pieces, as tiled Q4_0 chunks do) the rows' byte offsets `ro` of the run's first block in
/// `base`, handed to `chunk(tile, ro, wc, bb, b)`, which adds the run's `wc` blocks into y
/// (`bb`: its first block in the tile, `b`: in the row).
///
/// # Safety
/// The call's bounds must have been checked by [`check_down`]; `base` is the matrix's buffer.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn down_tiles(
    base: *const u8,
    g: &PlanarGeom,
    rows: &[u32],
    a: &[f32],
    offset: i32,
    ahead: Option<&Ahead>,
    mut chunk: impl FnMut(&Tile, &[usize; 32], usize, usize, usize),
) {
    let mut t = Tile {
        cq: [[0; 16]; 8],
        corr: [0; 16],
        s: [0.0; 16],
    };
    let (mut so, mut ro) = ([0usize; 32], [0usize; 32]);
    let nb = g.nb;
    for ti in 0..nb.div_ceil(PLANAR_TILE) {
        let b0 = ti * PLANAR_TILE;
        let wt = PLANAR_TILE.min(nb - b0);
        // a tile never straddles two scale pieces (64 blocks, or a whole record)
        for (o, &r) in so.iter_mut().zip(rows) {
            *o = g.scale_at(r as usize, b0);
        }
        if let Some(ahead) = ahead.filter(|_| b0.is_multiple_of(PLANAR_SCALE_LINE)) {
            ahead.scales(b0);
        }
        // SAFETY (caller): bounds checked by check_down.
        unsafe { down_coefficients(base, &so, wt, a, offset, &mut t.cq, &mut t.corr, &mut t.s) };
        let mut b = b0;
        while b < b0 + wt {
            let end = (b + g.code_run(b)).min(b0 + wt);
            if let Some(ahead) = ahead {
                ahead.codes(b, end - b);
            }
            for (o, &r) in ro.iter_mut().zip(rows) {
                *o = g.code_at(r as usize, b);
            }
            chunk(&t, &ro, end - b, b - b0, b);
            b = end;
        }
    }
}

/// `4·H` consecutive blocks of planar Q4_0 pieces for every row (four at a time): row `i`'s
/// first block is at byte `ro[i]` of `qp`; `bb` is the first block's index in the coefficient tile,
/// `y` its first output column.
///
/// # Safety
/// Blocks `0..4H` from each `ro[i]` and 32·4H floats of `y` must be in bounds.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn q4_blocks<const H: usize>(
    qp: *const u8,
    ro: &[usize; 32],
    n: usize,
    cq: &[[i32; 16]; 8],
    corr: &[i32; 16],
    s: &[f32; 16],
    bb: usize,
    y: *mut f32,
    ie: __m512i,
    io: __m512i,
    pf: &mut RowStream,
) {
    let mh = _mm512_set1_epi8(0xF0u8 as i8);
    // acc[2j]: block j's whole code bytes (lo + 16·hi) summed, started at 17·corr;
    // acc[2j + 1]: its high nibbles in place (16·hi), started at 16·corr (see hi_sum). Their
    // difference is the low-nibble sum: one AND per register instead of two.
    let mut acc = [_mm512_setzero_si512(); 16];
    for (j, a) in acc.iter_mut().enumerate().take(8 * H) {
        *a = _mm512_set1_epi32(corr[bb + j / 2] * (16 + (j % 2 == 0) as i32));
    }
    for (q, cq) in cq.iter().enumerate().take(n / 4) {
        for h in 0..H {
            // SAFETY (caller): blocks 4h..4h+4 of the row's piece are 64 contiguous bytes.
            let r: [__m512i; 4] = std::array::from_fn(|i| unsafe {
                _mm512_loadu_si512(qp.add(ro[4 * q + i] + 64 * h) as *const _)
            });
            pf.step();
            let v = regroup4(r, ie, io);
            for (j, v) in v.iter().enumerate() {
                let blk = 4 * h + j;
                let c = _mm512_set1_epi32(cq[bb + blk]);
                acc[2 * blk] = _mm512_dpbusd_epi32(acc[2 * blk], *v, c);
                let hi = _mm512_and_si512(*v, mh);
                acc[2 * blk + 1] = _mm512_dpbusd_epi32(acc[2 * blk + 1], hi, c);
            }
        }
    }
    for j in 0..4 * H {
        if s[bb + j] != 0.0 {
            let (lo, hi) = q4_sums(acc[2 * j], acc[2 * j + 1]);
            // SAFETY (caller): y holds 32·4H floats.
            unsafe { down_finish(y.add(32 * j), s[bb + j], lo, hi) };
        }
    }
}

/// The low- and high-nibble sums of a Q4_0 block from its two accumulators: the whole code
/// bytes' sum (`Σ (lo + 16·hi)·c + 17·corr`) and the high nibbles' in place (`Σ 16·hi·c +
/// 16·corr`). Exact: both are integers and the second is a multiple of 16.
#[inline]
#[target_feature(enable = "avx512f")]
fn q4_sums(full: __m512i, hi16: __m512i) -> (__m512i, __m512i) {
    (_mm512_sub_epi32(full, hi16), hi_sum(hi16))
}

/// Planar Q4_0 down kernel (`scalar::down_q4_0`, bit for bit). Four rows at a time and, where a
/// chunk allows, 8 or 4 blocks at a time: one 64-byte load per row and 4 blocks, [`regroup4`]
/// turns four rows' loads into one register per block with byte j of the four rows in 32-bit
/// group j, and two `vpdpbusd` per block add `Σ c_i · q_i` with the four int8 coefficients
/// broadcast: one over the whole code bytes, one over the high nibbles in place, whose
/// difference gives the low nibbles (columns j and 16 + j, see [`q4_sums`]). Up to 16
/// independent accumulators hide `vpdpbusd`'s latency; a whole 8-block chunk reads both cache
/// lines of each row's piece in one pass.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
fn down_q4_0_i(w: &Planar<[u8; 16]>, rows: &[u32], a: &[f32], next: &[u32], y: &mut [f32]) {
    check_down(w, rows, a, y);
    let (g, nb) = (w.geom(), w.nb);
    let n = rows.len();
    let (ie, io) = (regroup_index(0), regroup_index(1));
    // one block of four rows as [r0 | r1 | r2 | r3] → groups of four rows (vpermb)
    let single = {
        let mut t = [0u8; 64];
        for (p, v) in t.iter_mut().enumerate() {
            *v = (16 * (p % 4) + p / 4) as u8;
        }
        // SAFETY: 64 bytes.
        unsafe { _mm512_loadu_si512(t.as_ptr() as *const _) }
    };
    let mh = _mm512_set1_epi8(0xF0u8 as i8);
    let qp = w.bytes().as_ptr();
    let yp = y.as_mut_ptr();
    let ahead = Ahead::new(next, w);
    // one (4 rows, 4 blocks) step per 64-byte line of four rows
    let mut pf = RowStream::new(&ahead, n / 4 * nb.div_ceil(4));
    let burst = pf.burst(&ahead);
    let chunk = |t: &Tile, ro: &[usize; 32], wc: usize, bb: usize, b: usize| {
        let (cq, corr, s) = (&t.cq, &t.corr, &t.s);
        let mut k = 0;
        // 8 blocks at a time (both lines of a row's 128-byte piece in one pass), then 4
        while k + 4 <= wc {
            let rk: [usize; 32] = std::array::from_fn(|i| ro[i] + 16 * k);
            let (bk, wide) = (bb + k, k + 8 <= wc);
            // SAFETY: blocks k..k+8 (wide) or k..k+4 of each row's piece are inside the
            // buffer, and y holds their 32 columns each (check_down).
            unsafe {
                let yk = yp.add(32 * (b + k));
                if wide {
                    q4_blocks::<2>(qp, &rk, n, cq, corr, s, bk, yk, ie, io, &mut pf);
                } else {
                    q4_blocks::<1>(qp, &rk, n, cq, corr, s, bk, yk, ie, io, &mut pf);
                }
            }
            k += if wide { 8 } else { 4 };
        }
        // the last 1-3 blocks of a narrower chunk, one at a time
        for k in k..wc {
            if s[bb + k] == 0.0 {
                continue;
            }
            // as in q4_blocks: whole bytes and high nibbles in place
            let mut acc0 = _mm512_set1_epi32(corr[bb + k] * 17);
            let mut acc1 = _mm512_set1_epi32(corr[bb + k] << 4);
            for (q, cq) in cq.iter().enumerate().take(n / 4) {
                pf.step();
                // SAFETY: inside the row's piece (check_down), k < wc.
                let at = |i: usize| unsafe { qp.add(ro[4 * q + i] + 16 * k) as *const __m128i };
                // SAFETY: each row block is 16 bytes.
                let z = unsafe {
                    let z = _mm512_castsi128_si512(_mm_loadu_si128(at(0)));
                    let z = _mm512_inserti32x4::<1>(z, _mm_loadu_si128(at(1)));
                    let z = _mm512_inserti32x4::<2>(z, _mm_loadu_si128(at(2)));
                    _mm512_inserti32x4::<3>(z, _mm_loadu_si128(at(3)))
                };
                let v = _mm512_permutexvar_epi8(single, z);
                let c = _mm512_set1_epi32(cq[bb + k]);
                acc0 = _mm512_dpbusd_epi32(acc0, v, c);
                acc1 = _mm512_dpbusd_epi32(acc1, _mm512_and_si512(v, mh), c);
            }
            let (lo, hi) = q4_sums(acc0, acc1);
            // SAFETY: y holds 32·nb floats (check_down).
            unsafe { down_finish(yp.add(32 * (b + k)), s[bb + k], lo, hi) };
        }
    };
    // SAFETY: bounds checked by check_down.
    unsafe {
        down_tiles(qp, g, rows, a, 8, burst, chunk);
    }
    pf.rest();
}

fn down_q4_0(w: &Planar<[u8; 16]>, rows: &[u32], a: &[f32], next: &[u32], y: &mut [f32]) {
    // SAFETY: handed out only when vbmi_detected() (which implies vnni_detected()).
    unsafe { down_q4_0_i(w, rows, a, next, y) }
}

/// Planar Q8_0 down kernel (`scalar::down_q8_0`, bit for bit). Codes are stored `+ 128`. Four
/// rows at a time and, where a run allows, four blocks at a time: two 64-byte loads per row
/// (blocks b, b+1 and b+2, b+3), each set of four rows regrouped by [`regroup4`] into columns
/// 0..16 / 16..32 of two blocks, one `vpdpbusd` per register; eight independent accumulators.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
fn down_q8_0_i(w: &Planar<[u8; 32]>, rows: &[u32], a: &[f32], next: &[u32], y: &mut [f32]) {
    check_down(w, rows, a, y);
    let (g, nb) = (w.geom(), w.nb);
    let n = rows.len();
    let (ie, io) = (regroup_index(0), regroup_index(1));
    let qp = w.bytes().as_ptr();
    let yp = y.as_mut_ptr();
    let ahead = Ahead::new(next, w);
    // one (4 rows, 2 blocks) step per 64-byte line of four rows
    let mut pf = RowStream::new(&ahead, n / 4 * nb.div_ceil(2));
    let burst = pf.burst(&ahead);
    let chunk = |t: &Tile, ro: &[usize; 32], wc: usize, bb: usize, b: usize| {
        let (cq, corr, s) = (&t.cq, &t.corr, &t.s);
        let mut k0 = 0;
        while k0 + 4 <= wc {
            let (bb, b) = (bb + k0, b + k0);
            let ro: [usize; 32] = std::array::from_fn(|i| ro[i] + 32 * k0);
            k0 += 4;
            // acc[2j], acc[2j+1]: columns 0..16, 16..32 of block b + j
            let mut acc: [__m512i; 8] =
                std::array::from_fn(|i| _mm512_set1_epi32(corr[bb + i / 2]));
            for (q, cq) in cq.iter().enumerate().take(n / 4) {
                for h in 0..2 {
                    // SAFETY: blocks 2h, 2h+1 of the row's piece are 64 contiguous bytes.
                    let r: [__m512i; 4] = std::array::from_fn(|i| unsafe {
                        _mm512_loadu_si512(qp.add(ro[4 * q + i] + 64 * h) as *const _)
                    });
                    pf.step();
                    let v = regroup4(r, ie, io);
                    for (j, v) in v.iter().enumerate() {
                        let blk = 2 * h + j / 2;
                        let c = _mm512_set1_epi32(cq[bb + blk]);
                        acc[2 * blk + j % 2] = _mm512_dpbusd_epi32(acc[2 * blk + j % 2], *v, c);
                    }
                }
            }
            for j in 0..4 {
                if s[bb + j] != 0.0 {
                    // SAFETY: y holds 32·nb floats (check_down).
                    unsafe {
                        down_finish(yp.add(32 * (b + j)), s[bb + j], acc[2 * j], acc[2 * j + 1])
                    };
                }
            }
        }
        // the last 1-3 blocks of a narrower piece, one at a time
        for k in k0..wc {
            if s[bb + k] == 0.0 {
                continue;
            }
            let mut acc0 = _mm512_set1_epi32(corr[bb + k]);
            let mut acc1 = acc0;
            for (q, cq) in cq.iter().enumerate().take(n / 4) {
                pf.step();
                // SAFETY: inside the row's piece (check_down), k < wc.
                let at = |i: usize| unsafe { qp.add(ro[4 * q + i] + 32 * k) as *const __m256i };
                // SAFETY: each row block is 32 bytes.
                let (z1, z2) = unsafe {
                    (
                        _mm512_inserti64x4::<1>(
                            _mm512_castsi256_si512(_mm256_loadu_si256(at(0))),
                            _mm256_loadu_si256(at(1)),
                        ),
                        _mm512_inserti64x4::<1>(
                            _mm512_castsi256_si512(_mm256_loadu_si256(at(2))),
                            _mm256_loadu_si256(at(3)),
                        ),
                    )
                };
                let c = _mm512_set1_epi32(cq[bb + k]);
                acc0 = _mm512_dpbusd_epi32(acc0, _mm512_permutex2var_epi8(z1, ie, z2), c);
                acc1 = _mm512_dpbusd_epi32(acc1, _mm512_permutex2var_epi8(z1, io, z2), c);
            }
            // SAFETY: y holds 32·nb floats (check_down).
            unsafe { down_finish(yp.add(32 * (b + k)), s[bb + k], acc0, acc1) };
        }
    };
    // SAFETY: bounds checked by check_down.
    unsafe {
        down_tiles(qp, g, rows, a, 128, burst, chunk);
    }
    pf.rest();
}

fn down_q8_0(w: &Planar<[u8; 32]>, rows: &[u32], a: &[f32], next: &[u32], y: &mut [f32]) {
    // SAFETY: handed out only when vbmi_detected() (which implies vnni_detected()).
    unsafe { down_q8_0_i(w, rows, a, next, y) }
}
