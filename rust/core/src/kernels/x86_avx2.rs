//! AVX2 + FMA + F16C tier. Same names and signatures as `scalar`; the dispatch table only
//! points here after `is_x86_feature_detected!` confirmed avx2, fma and f16c.

use std::arch::x86_64::*;

use half::{bf16, f16};

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum256(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}

/// Eight bf16 values widened to f32 (bf16 is the high half of an f32).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_bf16(p: *const bf16) -> __m256 {
    // SAFETY: caller guarantees 8 readable bf16 at p.
    let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_f16(p: *const f16) -> __m256 {
    // SAFETY: caller guarantees 8 readable f16 at p.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p as *const __m128i) })
}

macro_rules! dot_impl {
    ($name:ident, $inner:ident, $t:ty, $load:ident, $feat:literal, $scalar:path) => {
        #[target_feature(enable = $feat)]
        unsafe fn $inner(w: &[$t], x: &[f32]) -> f32 {
            let n = w.len().min(x.len());
            let (pw, px) = (w.as_ptr(), x.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            // SAFETY (all loads below): i + 32 <= n or i + 8 <= n bounds every 8-wide load.
            while i + 32 <= n {
                for k in 0..4 {
                    let a = unsafe { $load(pw.add(i + 8 * k)) };
                    let b = unsafe { _mm256_loadu_ps(px.add(i + 8 * k)) };
                    acc[k] = _mm256_fmadd_ps(a, b, acc[k]);
                }
                i += 32;
            }
            while i + 8 <= n {
                let a = unsafe { $load(pw.add(i)) };
                let b = unsafe { _mm256_loadu_ps(px.add(i)) };
                acc[0] = _mm256_fmadd_ps(a, b, acc[0]);
                i += 8;
            }
            let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            // the scalar tail only when there is one (a call per row costs ~0.5 % of an f16
            // decode otherwise)
            let tail = if i < n {
                $scalar(&w[i..n], &x[i..n])
            } else {
                0.0
            };
            hsum256(v) + tail
        }

        pub fn $name(w: &[$t], x: &[f32]) -> f32 {
            // SAFETY: this tier is installed only when avx2, fma and f16c are detected.
            unsafe { $inner(w, x) }
        }
    };
}

macro_rules! axpy_impl {
    ($name:ident, $inner:ident, $t:ty, $load:ident, $feat:literal, $scalar:path) => {
        #[target_feature(enable = $feat)]
        unsafe fn $inner(a: f32, w: &[$t], y: &mut [f32]) {
            let n = w.len().min(y.len());
            let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
            let va = _mm256_set1_ps(a);
            let mut i = 0;
            // SAFETY: i + 8 <= n bounds every 8-wide load and store.
            while i + 8 <= n {
                unsafe {
                    let wv = $load(pw.add(i));
                    let yv = _mm256_loadu_ps(py.add(i));
                    _mm256_storeu_ps(py.add(i), _mm256_fmadd_ps(va, wv, yv));
                }
                i += 8;
            }
            if i < n {
                $scalar(a, &w[i..n], &mut y[i..n]);
            }
        }

        pub fn $name(a: f32, w: &[$t], y: &mut [f32]) {
            // SAFETY: this tier is installed only when avx2, fma and f16c are detected.
            unsafe { $inner(a, w, y) }
        }
    };
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_f32(p: *const f32) -> __m256 {
    // SAFETY: caller guarantees 8 readable f32 at p.
    unsafe { _mm256_loadu_ps(p) }
}

dot_impl!(
    dot_f32,
    dot_f32_i,
    f32,
    load_f32,
    "avx2,fma",
    super::scalar::dot_f32
);
dot_impl!(
    dot_f16,
    dot_f16_i,
    f16,
    load_f16,
    "avx2,fma,f16c",
    super::scalar::dot_f16
);
dot_impl!(
    dot_bf16,
    dot_bf16_i,
    bf16,
    load_bf16,
    "avx2,fma",
    super::scalar::dot_bf16
);
axpy_impl!(
    axpy_f32,
    axpy_f32_i,
    f32,
    load_f32,
    "avx2,fma",
    super::scalar::axpy_f32
);
axpy_impl!(
    axpy_f16,
    axpy_f16_i,
    f16,
    load_f16,
    "avx2,fma,f16c",
    super::scalar::axpy_f16
);
axpy_impl!(
    axpy_bf16,
    axpy_bf16_i,
    bf16,
    load_bf16,
    "avx2,fma",
    super::scalar::axpy_bf16
);

#[target_feature(enable = "avx2,fma")]
unsafe fn tile2x4_f32(w: &[f32], ws: usize, x: &[f32], xs: usize, k: usize, out: &mut [f32]) {
    assert!(
        w.len() >= super::span(2, ws, k) && x.len() >= super::span(4, xs, k),
        "tile2x4 bounds"
    );
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 8];
    let mut p = 0;
    // SAFETY: p + 8 <= k and the assert above keep every row load in bounds.
    while p + 8 <= k {
        unsafe {
            let w0 = _mm256_loadu_ps(pw.add(p));
            let w1 = _mm256_loadu_ps(pw.add(ws + p));
            for j in 0..4 {
                let xv = _mm256_loadu_ps(px.add(j * xs + p));
                acc[j] = _mm256_fmadd_ps(w0, xv, acc[j]);
                acc[4 + j] = _mm256_fmadd_ps(w1, xv, acc[4 + j]);
            }
        }
        p += 8;
    }
    for i in 0..2 {
        for j in 0..4 {
            let tail =
                super::scalar::dot_f32(&w[i * ws + p..i * ws + k], &x[j * xs + p..j * xs + k]);
            out[4 * i + j] = hsum256(acc[4 * i + j]) + tail;
        }
    }
}

pub fn tile4x4_f32(w: &[f32], ws: usize, x: &[f32], xs: usize, k: usize, out: &mut [f32; 16]) {
    let (top, bottom) = out.split_at_mut(8);
    // SAFETY: this tier is installed only when avx2 and fma are detected.
    unsafe {
        tile2x4_f32(w, ws, x, xs, k, top);
        tile2x4_f32(&w[2 * ws..], ws, x, xs, k, bottom);
    }
}

macro_rules! axpyn_impl {
    ($name:ident, $inner:ident, $t:ty, $load:ident, $feat:literal, $scalar:path) => {
        #[target_feature(enable = $feat)]
        unsafe fn $inner<const N: usize>(a: &[f32; N], w: [&[$t]; N], y: &mut [f32]) {
            let n = y.len();
            assert!(w.iter().all(|r| r.len() >= n), "axpyn row lengths");
            let p = w.map(|r| r.as_ptr());
            let va = a.map(|v| _mm256_set1_ps(v));
            let py = y.as_mut_ptr();
            let mut i = 0;
            // SAFETY: i + 8 <= n <= every row length bounds all loads and the store.
            while i + 8 <= n {
                unsafe {
                    let mut acc = _mm256_loadu_ps(py.add(i));
                    for r in 0..N {
                        acc = _mm256_fmadd_ps(va[r], $load(p[r].add(i)), acc);
                    }
                    _mm256_storeu_ps(py.add(i), acc);
                }
                i += 8;
            }
            $scalar(a, w.map(|r| &r[i..n]), &mut y[i..]);
        }

        /// `y += Σ_r a[r]·w[r]` over `N` rows (per element: `acc = y`, then one FMA per row
        /// in row order).
        pub fn $name<const N: usize>(a: &[f32; N], w: [&[$t]; N], y: &mut [f32]) {
            // SAFETY: this tier is installed only when avx2, fma and f16c are detected.
            unsafe { $inner(a, w, y) }
        }
    };
}

axpyn_impl!(
    axpyn_f32,
    axpyn_f32_i,
    f32,
    load_f32,
    "avx2,fma",
    super::scalar::axpyn_f32
);
axpyn_impl!(
    axpyn_f16,
    axpyn_f16_i,
    f16,
    load_f16,
    "avx2,fma,f16c",
    super::scalar::axpyn_f16
);
axpyn_impl!(
    axpyn_bf16,
    axpyn_bf16_i,
    bf16,
    load_bf16,
    "avx2,fma",
    super::scalar::axpyn_bf16
);

macro_rules! rank_update_impl {
    ($name:ident, $inner:ident, $t:ty, $load:ident, $feat:literal) => {
        #[target_feature(enable = $feat)]
        unsafe fn $inner(
            act: &[f32],
            stride: usize,
            js: &[u32],
            w: &[$t],
            ws: usize,
            y: &mut [f32; 256],
        ) {
            // Two passes of 32 columns: 4 tokens × 4 ymm accumulators = 16 registers would spill,
            // so each pass keeps 4 × 4 × 8 = 128 outputs... in 16 ymm; loads stay in L1.
            for half in 0..2 {
                let c0 = half * 32;
                let mut acc = [_mm256_setzero_ps(); 16];
                for i in 0..4 {
                    for q in 0..4 {
                        // SAFETY: i·64 + c0 + q·8 + 8 <= 256.
                        acc[i * 4 + q] =
                            unsafe { _mm256_loadu_ps(y.as_ptr().add(i * 64 + c0 + q * 8)) };
                    }
                }
                for &j in js {
                    let j = j as usize;
                    let row = &w[j * ws + c0..j * ws + c0 + 32];
                    // SAFETY: row has 32 elements: four 8-wide loads.
                    let wv = unsafe {
                        [
                            $load(row.as_ptr()),
                            $load(row.as_ptr().add(8)),
                            $load(row.as_ptr().add(16)),
                            $load(row.as_ptr().add(24)),
                        ]
                    };
                    for i in 0..4 {
                        // Branch-free: a zero activation adds an exact 0.
                        let va = _mm256_set1_ps(act[i * stride + j]);
                        for q in 0..4 {
                            acc[i * 4 + q] = _mm256_fmadd_ps(va, wv[q], acc[i * 4 + q]);
                        }
                    }
                }
                for i in 0..4 {
                    for q in 0..4 {
                        // SAFETY: as above.
                        unsafe {
                            _mm256_storeu_ps(
                                y.as_mut_ptr().add(i * 64 + c0 + q * 8),
                                acc[i * 4 + q],
                            )
                        };
                    }
                }
            }
        }

        pub fn $name(
            act: &[f32],
            stride: usize,
            js: &[u32],
            w: &[$t],
            ws: usize,
            y: &mut [f32; 256],
        ) {
            // SAFETY: this tier is installed only when avx2, fma and f16c are detected.
            unsafe { $inner(act, stride, js, w, ws, y) }
        }
    };
}

rank_update_impl!(rank4x64_f32, rank4x64_f32_i, f32, load_f32, "avx2,fma");
rank_update_impl!(rank4x64_f16, rank4x64_f16_i, f16, load_f16, "avx2,fma,f16c");
rank_update_impl!(rank4x64_bf16, rank4x64_bf16_i, bf16, load_bf16, "avx2,fma");
