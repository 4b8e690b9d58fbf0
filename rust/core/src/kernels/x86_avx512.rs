//! AVX-512 (F) tier. Same names and signatures as `scalar`; installed only after
//! `is_x86_feature_detected!("avx512f")` (plus f16c/fma, implied on every AVX-512 CPU).

use std::arch::x86_64::*;

use half::{bf16, f16};

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_f32(p: *const f32) -> __m512 {
    // SAFETY: caller guarantees 16 readable f32 at p.
    unsafe { _mm512_loadu_ps(p) }
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_f16(p: *const f16) -> __m512 {
    // SAFETY: caller guarantees 16 readable f16 at p.
    _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p as *const __m256i) })
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_bf16(p: *const bf16) -> __m512 {
    // SAFETY: caller guarantees 16 readable bf16 at p.
    let h = unsafe { _mm256_loadu_si256(p as *const __m256i) };
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
}

/// Software prefetches (`HINT`: `_MM_HINT_T0` to L1, `_MM_HINT_T1` to L2) of the `len` bytes
/// at `base + off`, one per 64-byte line. The addresses may lie past the end of the data: a
/// prefetch never faults, and the pointer is only formed with wrapping arithmetic, never
/// dereferenced.
#[inline(always)]
pub(crate) fn prefetch_lines<const HINT: i32>(base: *const u8, off: usize, len: usize) {
    let mut o = 0;
    while o < len {
        // SAFETY: _mm_prefetch is a hint that touches no architectural state and cannot fault.
        unsafe { _mm_prefetch::<HINT>(base.wrapping_add(off + o) as *const i8) };
        o += 64;
    }
}

macro_rules! dot_impl {
    ($name:ident, $inner:ident, $t:ty, $load:ident, $scalar:path) => {
        #[target_feature(enable = "avx512f")]
        unsafe fn $inner(w: &[$t], x: &[f32]) -> f32 {
            let n = w.len().min(x.len());
            let (pw, px) = (w.as_ptr(), x.as_ptr());
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            let pf = super::prefetch_distance();
            // SAFETY (all loads below): i + 64 <= n or i + 16 <= n bounds every 16-wide load.
            while i + 64 <= n {
                if pf > 0 {
                    prefetch_lines::<_MM_HINT_T0>(
                        pw as *const u8,
                        i * std::mem::size_of::<$t>() + pf,
                        64 * std::mem::size_of::<$t>(),
                    );
                }
                for k in 0..4 {
                    let a = unsafe { $load(pw.add(i + 16 * k)) };
                    let b = unsafe { _mm512_loadu_ps(px.add(i + 16 * k)) };
                    acc[k] = _mm512_fmadd_ps(a, b, acc[k]);
                }
                i += 64;
            }
            while i + 16 <= n {
                let a = unsafe { $load(pw.add(i)) };
                let b = unsafe { _mm512_loadu_ps(px.add(i)) };
                acc[0] = _mm512_fmadd_ps(a, b, acc[0]);
                i += 16;
            }
            let v = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            // the scalar tail only when there is one (a call per row costs ~0.5 % of an f16
            // decode otherwise)
            let tail = if i < n {
                $scalar(&w[i..n], &x[i..n])
            } else {
                0.0
            };
            _mm512_reduce_add_ps(v) + tail
        }

        pub fn $name(w: &[$t], x: &[f32]) -> f32 {
            // SAFETY: this tier is installed only when avx512f is detected.
            unsafe { $inner(w, x) }
        }
    };
}

macro_rules! axpy_impl {
    ($name:ident, $inner:ident, $t:ty, $load:ident, $scalar:path) => {
        #[target_feature(enable = "avx512f")]
        unsafe fn $inner(a: f32, w: &[$t], y: &mut [f32]) {
            let n = w.len().min(y.len());
            let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
            let va = _mm512_set1_ps(a);
            let mut i = 0;
            // SAFETY: i + 16 <= n bounds every 16-wide load and store.
            while i + 16 <= n {
                unsafe {
                    let wv = $load(pw.add(i));
                    let yv = _mm512_loadu_ps(py.add(i));
                    _mm512_storeu_ps(py.add(i), _mm512_fmadd_ps(va, wv, yv));
                }
                i += 16;
            }
            if i < n {
                $scalar(a, &w[i..n], &mut y[i..n]);
            }
        }

        pub fn $name(a: f32, w: &[$t], y: &mut [f32]) {
            // SAFETY: this tier is installed only when avx512f is detected.
            unsafe { $inner(a, w, y) }
        }
    };
}

dot_impl!(dot_f32, dot_f32_i, f32, load_f32, super::scalar::dot_f32);
dot_impl!(dot_f16, dot_f16_i, f16, load_f16, super::scalar::dot_f16);
dot_impl!(
    dot_bf16,
    dot_bf16_i,
    bf16,
    load_bf16,
    super::scalar::dot_bf16
);
axpy_impl!(axpy_f32, axpy_f32_i, f32, load_f32, super::scalar::axpy_f32);
axpy_impl!(axpy_f16, axpy_f16_i, f16, load_f16, super::scalar::axpy_f16);
axpy_impl!(
    axpy_bf16,
    axpy_bf16_i,
    bf16,
    load_bf16,
    super::scalar::axpy_bf16
);

#[target_feature(enable = "avx512f")]
unsafe fn tile4x4_f32_i(w: &[f32], ws: usize, x: &[f32], xs: usize, k: usize, out: &mut [f32; 16]) {
    assert!(
        w.len() >= super::span(4, ws, k) && x.len() >= super::span(4, xs, k),
        "tile4x4 bounds"
    );
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 16];
    let mut p = 0;
    // SAFETY: p + 16 <= k and the assert above keep every row load in bounds.
    while p + 16 <= k {
        unsafe {
            let wv = [
                _mm512_loadu_ps(pw.add(p)),
                _mm512_loadu_ps(pw.add(ws + p)),
                _mm512_loadu_ps(pw.add(2 * ws + p)),
                _mm512_loadu_ps(pw.add(3 * ws + p)),
            ];
            for j in 0..4 {
                let xv = _mm512_loadu_ps(px.add(j * xs + p));
                for i in 0..4 {
                    acc[4 * i + j] = _mm512_fmadd_ps(wv[i], xv, acc[4 * i + j]);
                }
            }
        }
        p += 16;
    }
    let mut sums = [0f32; 16];
    // SAFETY: sums is 16 f32.
    unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), reduce16(&acc)) };
    for i in 0..4 {
        for j in 0..4 {
            let tail =
                super::scalar::dot_f32(&w[i * ws + p..i * ws + k], &x[j * xs + p..j * xs + k]);
            out[4 * i + j] = sums[4 * i + j] + tail;
        }
    }
}

/// Lane `q` of the result is the sum of the 16 lanes of `a[q]`: three folding levels of
/// 128-bit shuffles and in-lane unpacks, 45 operations instead of 16 full reductions (~130).
#[inline]
#[target_feature(enable = "avx512f")]
fn reduce16(a: &[__m512; 16]) -> __m512 {
    // level 1: s[m] = [a(2m) lanes 0+2, 1+3 | a(2m+1) lanes 0+2, 1+3]
    let s: [__m512; 8] = std::array::from_fn(|m| {
        let (x, y) = (a[2 * m], a[2 * m + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
        )
    });
    // level 2: w[k] lane l = a(4k + l) folded to 4 floats
    let w: [__m512; 4] = std::array::from_fn(|k| {
        let (x, y) = (s[2 * k], s[2 * k + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
        )
    });
    // level 3: in lane l, [Σ a(l), Σ a(4 + l), Σ a(8 + l), Σ a(12 + l)]
    let t1 = _mm512_add_ps(
        _mm512_unpacklo_ps(w[0], w[1]),
        _mm512_unpackhi_ps(w[0], w[1]),
    );
    let t2 = _mm512_add_ps(
        _mm512_unpacklo_ps(w[2], w[3]),
        _mm512_unpackhi_ps(w[2], w[3]),
    );
    let v = _mm512_add_ps(
        _mm512_shuffle_ps::<0b01_00_01_00>(t1, t2),
        _mm512_shuffle_ps::<0b11_10_11_10>(t1, t2),
    );
    // element 4l + m holds Σ a(4m + l): transpose the 4×4 back to a's order
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(idx, v)
}

pub fn tile4x4_f32(w: &[f32], ws: usize, x: &[f32], xs: usize, k: usize, out: &mut [f32; 16]) {
    // SAFETY: this tier is installed only when avx512f is detected.
    unsafe { tile4x4_f32_i(w, ws, x, xs, k, out) }
}

macro_rules! axpyn_impl {
    ($name:ident, $inner:ident, $t:ty, $load:ident, $scalar:path) => {
        #[target_feature(enable = "avx512f")]
        unsafe fn $inner<const N: usize>(a: &[f32; N], w: [&[$t]; N], y: &mut [f32]) {
            let n = y.len();
            assert!(w.iter().all(|r| r.len() >= n), "axpyn row lengths");
            let p = w.map(|r| r.as_ptr());
            let va = a.map(|v| _mm512_set1_ps(v));
            let py = y.as_mut_ptr();
            let mut i = 0;
            // SAFETY: i + 16 <= n <= every row length bounds all loads and the store.
            while i + 16 <= n {
                unsafe {
                    let mut acc = _mm512_loadu_ps(py.add(i));
                    for r in 0..N {
                        acc = _mm512_fmadd_ps(va[r], $load(p[r].add(i)), acc);
                    }
                    _mm512_storeu_ps(py.add(i), acc);
                }
                i += 16;
            }
            $scalar(a, w.map(|r| &r[i..n]), &mut y[i..]);
        }

        /// `y += Σ_r a[r]·w[r]` over `N` rows (per element: `acc = y`, then one FMA per row
        /// in row order).
        pub fn $name<const N: usize>(a: &[f32; N], w: [&[$t]; N], y: &mut [f32]) {
            // SAFETY: this tier is installed only when avx512f is detected.
            unsafe { $inner(a, w, y) }
        }
    };
}

axpyn_impl!(
    axpyn_f32,
    axpyn_f32_i,
    f32,
    load_f32,
    super::scalar::axpyn_f32
);
axpyn_impl!(
    axpyn_f16,
    axpyn_f16_i,
    f16,
    load_f16,
    super::scalar::axpyn_f16
);
axpyn_impl!(
    axpyn_bf16,
    axpyn_bf16_i,
    bf16,
    load_bf16,
    super::scalar::axpyn_bf16
);

macro_rules! rank_update_impl {
    ($name:ident, $inner:ident, $t:ty, $load:ident) => {
        #[target_feature(enable = "avx512f")]
        unsafe fn $inner(
            act: &[f32],
            stride: usize,
            js: &[u32],
            w: &[$t],
            ws: usize,
            y: &mut [f32; 256],
        ) {
            let mut acc = [_mm512_setzero_ps(); 16];
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: y has 256 floats; k·16 + 16 <= 256.
                *a = unsafe { _mm512_loadu_ps(y.as_ptr().add(k * 16)) };
            }
            for &j in js {
                let j = j as usize;
                let row = &w[j * ws..j * ws + 64]; // bounds-checked once per row
                let a = [
                    act[j],
                    act[stride + j],
                    act[2 * stride + j],
                    act[3 * stride + j],
                ];
                // SAFETY: row has 64 elements: four 16-wide loads.
                let wv = unsafe {
                    [
                        $load(row.as_ptr()),
                        $load(row.as_ptr().add(16)),
                        $load(row.as_ptr().add(32)),
                        $load(row.as_ptr().add(48)),
                    ]
                };
                // Branch-free: a zero activation adds an exact 0 (mispredicted branches on random
                // sparsity patterns cost more than the 4 FMAs they would skip).
                for i in 0..4 {
                    let va = _mm512_set1_ps(a[i]);
                    for q in 0..4 {
                        acc[i * 4 + q] = _mm512_fmadd_ps(va, wv[q], acc[i * 4 + q]);
                    }
                }
            }
            for (k, a) in acc.iter().enumerate() {
                // SAFETY: as above.
                unsafe { _mm512_storeu_ps(y.as_mut_ptr().add(k * 16), *a) };
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
            assert!(
                act.len() >= 3 * stride + js.iter().map(|&j| j as usize + 1).max().unwrap_or(0)
            );
            // SAFETY: this tier is installed only when avx512f is detected.
            unsafe { $inner(act, stride, js, w, ws, y) }
        }
    };
}

rank_update_impl!(rank4x64_f32, rank4x64_f32_i, f32, load_f32);
rank_update_impl!(rank4x64_f16, rank4x64_f16_i, f16, load_f16);
rank_update_impl!(rank4x64_bf16, rank4x64_bf16_i, bf16, load_bf16);
