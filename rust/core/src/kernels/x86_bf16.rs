//! AVX512_BF16 kernels for prompt GEMMs (`vdpbf16ps`: 32 bf16 products into 16 f32 lanes).
//!
//! Used only through `crate::gemm`, which checks [`supported`] first. Two register tiles:
//! - [`tile_nk`]: 6 tokens × 4 weight rows, both stored along K (dot formulation; weights used
//!   in place when they are bf16). 24 accumulators, reduced 4 at a time at the end.
//! - [`tile_kn`]: 6 tokens × 64 outputs of `A · W` with W stored `[K, N]` (the transposed down
//!   projection), packed as bf16 pairs `[K/2][64]`; only the listed k-pairs are visited, which is
//!   how the sparse ReLU² MLP skips neurons that are zero in all 6 tokens.
//!
//! bf16 values travel as `u16` bits. Conversions round to nearest even (`vcvtneps2bf16`).

use std::arch::x86_64::*;

use half::f16;

/// Tokens per register tile.
pub const MR: usize = 6;
/// Weight rows per `tile_nk`.
pub const NR_NK: usize = 4;
/// Outputs per `tile_kn` (4 registers of 16).
pub const NR_KN: usize = 64;

/// AVX512-F/BW/VL plus BF16 present.
pub fn supported() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512bf16")
}

#[inline(always)]
fn bh(v: __m512i) -> __m512bh {
    // SAFETY: same size, both plain bit vectors.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn f32_to_bf16_i(x: &[f32], out: &mut [u16]) {
    let n = x.len();
    assert!(out.len() >= n, "f32_to_bf16 output length");
    let (px, po) = (x.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    // SAFETY: i + 16 <= n bounds the loads and stores; the tail uses masks of n - i lanes.
    unsafe {
        while i + 16 <= n {
            let b = _mm512_cvtneps_pbh(_mm512_loadu_ps(px.add(i)));
            _mm256_storeu_si256(
                po.add(i) as *mut __m256i,
                std::mem::transmute::<__m256bh, __m256i>(b),
            );
            i += 16;
        }
        if i < n {
            let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
            let b = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, px.add(i)));
            _mm256_mask_storeu_epi16(
                po.add(i) as *mut i16,
                m,
                std::mem::transmute::<__m256bh, __m256i>(b),
            );
        }
    }
}

/// `out[i] = bf16(x[i])`, round to nearest even (`out.len() >= x.len()`).
pub fn f32_to_bf16(x: &[f32], out: &mut [u16]) {
    // SAFETY: callers reach this module only after `supported()`.
    unsafe { f32_to_bf16_i(x, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn f16_to_bf16_i(x: &[half::f16], out: &mut [u16]) {
    let n = x.len();
    assert!(out.len() >= n, "f16_to_bf16 output length");
    let (px, po) = (x.as_ptr() as *const u16, out.as_mut_ptr());
    let mut i = 0;
    // SAFETY: as in f32_to_bf16_i.
    unsafe {
        while i + 16 <= n {
            let f = _mm512_cvtph_ps(_mm256_loadu_si256(px.add(i) as *const __m256i));
            let b = _mm512_cvtneps_pbh(f);
            _mm256_storeu_si256(
                po.add(i) as *mut __m256i,
                std::mem::transmute::<__m256bh, __m256i>(b),
            );
            i += 16;
        }
        if i < n {
            let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
            let h = _mm256_maskz_loadu_epi16(m, px.add(i) as *const i16);
            let b = _mm512_cvtneps_pbh(_mm512_cvtph_ps(h));
            _mm256_mask_storeu_epi16(
                po.add(i) as *mut i16,
                m,
                std::mem::transmute::<__m256bh, __m256i>(b),
            );
        }
    }
}

/// f16 → bf16 (exact widening to f32, then round to nearest even).
pub fn f16_to_bf16(x: &[half::f16], out: &mut [u16]) {
    // SAFETY: callers reach this module only after `supported()`.
    unsafe { f16_to_bf16_i(x, out) }
}

/// `d·q` for 16 int8 codes `c` in f32 lanes: the scalar dequantizer's product, exactly.
#[inline]
#[target_feature(enable = "avx512f")]
fn q8_values(d: f32, c: __m128i) -> __m512 {
    _mm512_mul_ps(
        _mm512_set1_ps(d),
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)),
    )
}

/// The 32 values `d·(q − 8)` of a Q4_0 block (scale `d`, 16 code bytes at `qs`), looked up by
/// code in a table of `d·(q − 8)`: columns 0..16 (low nibbles) and 16..32 (high nibbles).
///
/// # Safety
/// 16 bytes must be readable at `qs`; the CPU must have avx512f.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn q4_values(d: f32, qs: *const u8) -> [__m512; 2] {
    let codes = _mm512_setr_ps(
        -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0,
    );
    let tab = _mm512_mul_ps(_mm512_set1_ps(d), codes);
    // SAFETY (caller): 16 bytes at qs.
    let idx = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(qs as *const __m128i) });
    // vpermps reads the low 4 bits of each index lane
    [
        _mm512_permutexvar_ps(idx, tab),
        _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(idx), tab),
    ]
}

/// `out[..16] = bf16(v)` (round to nearest even).
///
/// # Safety
/// 16 `u16` must be writable at `out`; the CPU must have avx512bf16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn store_bf16(v: __m512, out: *mut u16) {
    // SAFETY: same size, both plain bit vectors; (caller) 32 bytes writable at out.
    unsafe {
        let b = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(out as *mut __m256i, b)
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn q8_0_to_bf16_i(w: &[crate::quant::BlockQ8_0], out: &mut [u16]) {
    assert!(out.len() >= 32 * w.len(), "q8_0_to_bf16 output length");
    let po = out.as_mut_ptr();
    for (b, blk) in w.iter().enumerate() {
        let p = blk.qs.as_ptr() as *const __m128i;
        for h in 0..2 {
            // SAFETY: qs is 32 bytes (two 16-byte loads); 32·b + 32 <= out.len() (asserted).
            unsafe {
                let v = q8_values(blk.d.to_f32(), _mm_loadu_si128(p.add(h)));
                store_bf16(v, po.add(32 * b + 16 * h));
            }
        }
    }
}

/// Dequantize Q8_0 blocks straight to bf16 bits (`d·q`, then round to nearest even).
pub fn q8_0_to_bf16(w: &[crate::quant::BlockQ8_0], out: &mut [u16]) {
    // SAFETY: callers reach this module only after `supported()`.
    unsafe { q8_0_to_bf16_i(w, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn q4_0_to_bf16_i(w: &[crate::quant::BlockQ4_0], out: &mut [u16]) {
    assert!(out.len() >= 32 * w.len(), "q4_0_to_bf16 output length");
    let po = out.as_mut_ptr();
    for (b, blk) in w.iter().enumerate() {
        // SAFETY: qs is 16 bytes; 32·b + 32 <= out.len() (asserted).
        unsafe {
            let [lo, hi] = q4_values(blk.d.to_f32(), blk.qs.as_ptr());
            store_bf16(lo, po.add(32 * b));
            store_bf16(hi, po.add(32 * b + 16));
        }
    }
}

/// Dequantize Q4_0 blocks straight to bf16 bits (`d·(q − 8)`, then round to nearest even).
pub fn q4_0_to_bf16(w: &[crate::quant::BlockQ4_0], out: &mut [u16]) {
    // SAFETY: callers reach this module only after `supported()`.
    unsafe { q4_0_to_bf16_i(w, out) }
}

/// Lane order that turns `[a0..a16 | b0..b16]` (bf16) into `[a0, b0, a1, b1, …]`: as `u32`
/// lanes, `a_i | b_i << 16`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn pair_order() -> __m512i {
    let t: [u16; 32] = std::array::from_fn(|l| (l / 2 + 16 * (l % 2)) as u16);
    // SAFETY: 64 bytes.
    unsafe { _mm512_loadu_si512(t.as_ptr() as *const _) }
}

/// `out[16h..16h + 16] = bf16(a) | bf16(b) << 16` (rounded to nearest even).
///
/// # Safety
/// 16 `u32` must be writable at `out`; the CPU must have avx512f/bw/bf16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn store_pairs(a: __m512, b: __m512, order: __m512i, out: *mut u32) {
    // SAFETY: same size, both plain bit vectors; (caller) 64 bytes writable at out.
    unsafe {
        let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a));
        _mm512_storeu_si512(out as *mut _, _mm512_permutexvar_epi16(order, v))
    }
}

/// The block count of a pair kernel's call, after checking its lengths.
#[allow(clippy::type_complexity)]
fn pair_blocks<Q>(lo: (&[f16], &[Q]), hi: Option<(&[f16], &[Q])>, out: &[u32]) -> usize {
    let nb = lo.0.len();
    assert!(
        lo.1.len() == nb
            && hi.is_none_or(|h| h.0.len() == nb && h.1.len() == nb)
            && out.len() >= 32 * nb,
        "pair_to_bf16 lengths"
    );
    nb
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn q4_0_pair_to_bf16_i(
    lo: (&[f16], &[[u8; 16]]),
    hi: Option<(&[f16], &[[u8; 16]])>,
    out: &mut [u32],
) {
    let nb = pair_blocks(lo, hi, out);
    let order = pair_order();
    let po = out.as_mut_ptr();
    for b in 0..nb {
        // SAFETY: codes are 16 bytes; 32·b + 32 <= out.len() (checked).
        unsafe {
            let a = q4_values(lo.0[b].to_f32(), lo.1[b].as_ptr());
            let c = match hi {
                Some((d, q)) => q4_values(d[b].to_f32(), q[b].as_ptr()),
                None => [_mm512_setzero_ps(); 2],
            };
            store_pairs(a[0], c[0], order, po.add(32 * b));
            store_pairs(a[1], c[1], order, po.add(32 * b + 16));
        }
    }
}

/// Two Q4_0 rows (scales, codes as in GGUF; the second row absent = zeros) dequantized to
/// bf16 and paired per column: `out[c] = bf16(lo[c]) | bf16(hi[c]) << 16`, the same bits as
/// [`q4_0_to_bf16`] of each row followed by [`interleave`].
pub fn q4_0_pair_to_bf16(
    lo: (&[f16], &[[u8; 16]]),
    hi: Option<(&[f16], &[[u8; 16]])>,
    out: &mut [u32],
) {
    // SAFETY: callers reach this module only after `supported()`.
    unsafe { q4_0_pair_to_bf16_i(lo, hi, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn q8_0_pair_to_bf16_i(
    lo: (&[f16], &[[u8; 32]]),
    hi: Option<(&[f16], &[[u8; 32]])>,
    out: &mut [u32],
) {
    let nb = pair_blocks(lo, hi, out);
    let order = pair_order();
    let flip = _mm_set1_epi8(-128);
    let po = out.as_mut_ptr();
    for b in 0..nb {
        for h in 0..2 {
            // SAFETY: 16 of each block's 32 bytes; 32·b + 32 <= out.len() (checked).
            unsafe {
                // codes are stored + 128: flipped back to int8, then q8_0_to_bf16's values
                let code = |q: &[u8; 32]| {
                    _mm_xor_si128(
                        _mm_loadu_si128(q.as_ptr().add(16 * h) as *const __m128i),
                        flip,
                    )
                };
                let a = q8_values(lo.0[b].to_f32(), code(&lo.1[b]));
                let c = match hi {
                    Some((d, q)) => q8_values(d[b].to_f32(), code(&q[b])),
                    None => _mm512_setzero_ps(),
                };
                store_pairs(a, c, order, po.add(32 * b + 16 * h));
            }
        }
    }
}

/// Two planar Q8_0 rows (scales; codes stored `+ 128`; the second row absent = zeros)
/// dequantized to bf16 and paired per column like [`q4_0_pair_to_bf16`]: the same bits as
/// [`q8_0_to_bf16`] of each row followed by [`interleave`].
pub fn q8_0_pair_to_bf16(
    lo: (&[f16], &[[u8; 32]]),
    hi: Option<(&[f16], &[[u8; 32]])>,
    out: &mut [u32],
) {
    // SAFETY: callers reach this module only after `supported()`.
    unsafe { q8_0_pair_to_bf16_i(lo, hi, out) }
}

/// Sum each of the four accumulators: `[Σa0, Σa1, Σa2, Σa3]`.
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
fn reduce4(a: [__m512; 4]) -> __m128 {
    // Pairwise interleave-and-add: after two rounds each 128-bit lane holds [a0 a1 a2 a3]
    // partial sums; the four lanes are then added.
    let t0 = _mm512_add_ps(
        _mm512_unpacklo_ps(a[0], a[1]),
        _mm512_unpackhi_ps(a[0], a[1]),
    );
    let t1 = _mm512_add_ps(
        _mm512_unpacklo_ps(a[2], a[3]),
        _mm512_unpackhi_ps(a[2], a[3]),
    );
    let t0d = _mm512_castps_pd(t0);
    let t1d = _mm512_castps_pd(t1);
    let u = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(t0d, t1d)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(t0d, t1d)),
    );
    let h = _mm256_add_ps(_mm512_castps512_ps256(u), _mm512_extractf32x8_ps::<1>(u));
    _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx512dq")]
unsafe fn tile_nk_i(
    a: &[u16],
    lda: usize,
    b: &[u16],
    ldb: usize,
    k: usize,
    out: &mut [[f32; 4]; MR],
) {
    assert!(
        a.len() >= super::span(MR, lda, k) && b.len() >= super::span(NR_NK, ldb, k),
        "tile_nk bounds"
    );
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); NR_NK]; MR];
    let mut p = 0;
    // SAFETY: p + 32 <= k and the assert keep every full load in bounds; the tail loads only
    // the k - p valid lanes.
    unsafe {
        while p + 32 <= k {
            let bv = [0, 1, 2, 3].map(|j| bh(_mm512_loadu_si512(pb.add(j * ldb + p) as *const _)));
            for i in 0..MR {
                let av = bh(_mm512_loadu_si512(pa.add(i * lda + p) as *const _));
                for j in 0..NR_NK {
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
                }
            }
            p += 32;
        }
        if p < k {
            let m: __mmask32 = ((1u64 << (k - p)) - 1) as u32;
            let bv = [0, 1, 2, 3].map(|j| {
                bh(_mm512_maskz_loadu_epi16(
                    m,
                    pb.add(j * ldb + p) as *const i16,
                ))
            });
            for i in 0..MR {
                let av = bh(_mm512_maskz_loadu_epi16(
                    m,
                    pa.add(i * lda + p) as *const i16,
                ));
                for j in 0..NR_NK {
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
                }
            }
        }
        for i in 0..MR {
            _mm_storeu_ps(out[i].as_mut_ptr(), reduce4(acc[i]));
        }
    }
}

/// `out[i][j] = Σ_{p<k} a[i·lda + p] · b[j·ldb + p]` for 6 token rows `i` and 4 weight rows
/// `j`, all bf16 (as bits), products exact, sums in f32.
pub fn tile_nk(a: &[u16], lda: usize, b: &[u16], ldb: usize, k: usize, out: &mut [[f32; 4]; MR]) {
    // SAFETY: callers reach this module only after `supported()`.
    unsafe { tile_nk_i(a, lda, b, ldb, k, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn tile_kn_i(
    a: &[u32],
    lda: usize,
    m: usize,
    pairs: &[u32],
    p0: usize,
    b: &[u32],
    c: *mut f32,
    c_len: usize,
    ldc: usize,
    n: usize,
    accumulate: bool,
) {
    assert!(
        (1..=MR).contains(&m) && (1..=NR_KN).contains(&n),
        "tile_kn tile size"
    );
    assert!(c_len >= super::span(m, ldc, n), "tile_kn output bounds");
    let kp = b.len() / NR_KN;
    assert!(
        pairs
            .iter()
            .all(|&p| (p as usize) >= p0 && (p as usize) < p0 + kp),
        "tile_kn pair index"
    );
    assert!(
        a.len() >= super::span(MR, lda, p0.saturating_add(kp)),
        "tile_kn activation bounds"
    );
    let masks: [__mmask16; 4] = [0, 1, 2, 3].map(|j| {
        let v = n.saturating_sub(16 * j).min(16);
        ((1u32 << v) - 1) as u16
    });
    let (pa, pb, pc) = (a.as_ptr(), b.as_ptr(), c);
    let mut acc = [[_mm512_setzero_ps(); 4]; MR];
    // SAFETY: rows i < m and lanes under masks[j] lie inside c (assert above); pair indices
    // lie in [p0, p0 + kp), so panel loads stay inside b and activation loads inside a.
    unsafe {
        if accumulate {
            for i in 0..m {
                for j in 0..4 {
                    acc[i][j] = _mm512_maskz_loadu_ps(masks[j], pc.add(i * ldc + 16 * j));
                }
            }
        }
        for &p in pairs {
            let p = p as usize;
            let bv = [0, 1, 2, 3].map(|j| {
                bh(_mm512_loadu_si512(
                    pb.add((p - p0) * NR_KN + 16 * j) as *const _
                ))
            });
            for i in 0..MR {
                let av = bh(_mm512_set1_epi32(*pa.add(i * lda + p) as i32));
                for j in 0..4 {
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
                }
            }
        }
        for i in 0..m {
            for j in 0..4 {
                _mm512_mask_storeu_ps(pc.add(i * ldc + 16 * j), masks[j], acc[i][j]);
            }
        }
    }
}

/// `c[i·ldc + col] (+)= Σ_{p ∈ pairs} pair(a[i·lda + p]) · pair(b[(p − p0)·64 + col])` for
/// rows `i < m` and columns `col < n`, where a `u32` holds the bf16 pair (k = 2p, 2p+1) and the
/// product of two pairs is `lo·lo + hi·hi`. `a` must hold 6 rows (rows ≥ m are computed and
/// dropped); `b` is the panel of pairs `[p0, p0 + kp)`, `[kp][64]`.
///
/// `c` is a pointer (with `c_len`, checked against the tile's span) rather than a slice so
/// that threads can write disjoint columns of the same rows at once.
///
/// # Safety
/// `c` is valid for reads and writes of `c_len` floats, and during the call nothing else reads
/// or writes the elements `c[i·ldc + col]`, `i < m`, `col < n`. This module is reached only
/// after `supported()`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn tile_kn(
    a: &[u32],
    lda: usize,
    m: usize,
    pairs: &[u32],
    p0: usize,
    b: &[u32],
    c: *mut f32,
    c_len: usize,
    ldc: usize,
    n: usize,
    accumulate: bool,
) {
    // SAFETY: the caller's contract above; the CPU features by `supported()`.
    unsafe { tile_kn_i(a, lda, m, pairs, p0, b, c, c_len, ldc, n, accumulate) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn interleave_i(lo: &[u16], hi: &[u16], out: &mut [u32]) {
    let n = out.len();
    assert!(
        lo.len() >= n && hi.len() >= n && n.is_multiple_of(16),
        "interleave lengths"
    );
    let mut i = 0;
    // SAFETY: i + 16 <= n bounds all three buffers.
    unsafe {
        while i < n {
            let l = _mm512_cvtepu16_epi32(_mm256_loadu_si256(lo.as_ptr().add(i) as *const __m256i));
            let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(hi.as_ptr().add(i) as *const __m256i));
            let v = _mm512_or_si512(l, _mm512_slli_epi32::<16>(h));
            _mm512_storeu_si512(out.as_mut_ptr().add(i) as *mut _, v);
            i += 16;
        }
    }
}

/// `out[c] = lo[c] | hi[c] << 16` (`out.len()` a multiple of 16).
pub fn interleave(lo: &[u16], hi: &[u16], out: &mut [u32]) {
    // SAFETY: callers reach this module only after `supported()`.
    unsafe { interleave_i(lo, hi, out) }
}
