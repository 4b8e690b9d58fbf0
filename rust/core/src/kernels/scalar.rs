//! Scalar kernels: the specification every SIMD tier must match.
//!
//! Plain loops, f32 accumulation in 8 independent partial sums (the same association order the
//! SIMD tiers use per lane, which keeps float differences between tiers small).

use half::{bf16, f16};

/// `Σ a[i]·b[i]`.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// `Σ w[i]·x[i]` with IEEE half weights widened to f32.
pub fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    let mut acc = [0f32; 8];
    let chunks = w.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += w[c * 8 + l].to_f32() * x[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..w.len() {
        s += w[i].to_f32() * x[i];
    }
    s
}

/// `Σ w[i]·x[i]` with bfloat16 weights widened to f32.
pub fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    let mut acc = [0f32; 8];
    let chunks = w.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += w[c * 8 + l].to_f32() * x[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..w.len() {
        s += w[i].to_f32() * x[i];
    }
    s
}

/// `y += a·x`.
pub fn axpy_f32(a: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// `y += a·w` with half weights.
pub fn axpy_f16(a: f32, w: &[f16], y: &mut [f32]) {
    debug_assert_eq!(w.len(), y.len());
    for (yi, wi) in y.iter_mut().zip(w) {
        *yi += a * wi.to_f32();
    }
}

/// `y += a·w` with bfloat16 weights.
pub fn axpy_bf16(a: f32, w: &[bf16], y: &mut [f32]) {
    debug_assert_eq!(w.len(), y.len());
    for (yi, wi) in y.iter_mut().zip(w) {
        *yi += a * wi.to_f32();
    }
}

/// A 4×4 tile of dot products for GEMM: `out[4·i + j] = w_i · x_j`, where row `i` of `w`
/// starts at `w[i·ws]`, row `j` of `x` at `x[j·xs]`, and each row has `k` elements.
pub fn tile4x4_f32(w: &[f32], ws: usize, x: &[f32], xs: usize, k: usize, out: &mut [f32; 16]) {
    for i in 0..4 {
        for j in 0..4 {
            out[4 * i + j] = dot_f32(&w[i * ws..i * ws + k], &x[j * xs..j * xs + k]);
        }
    }
}

macro_rules! axpyn_scalar {
    ($name:ident, $t:ty, $conv:expr) => {
        /// `y += Σ_i a[i]·w[i]` over `N` weight rows (one pass over `y` instead of `N`); the
        /// decode down projection uses `N = 8`, attention `N = 4`.
        pub fn $name<const N: usize>(a: &[f32; N], w: [&[$t]; N], y: &mut [f32]) {
            let conv = $conv;
            for (j, yj) in y.iter_mut().enumerate() {
                let mut acc = *yj;
                for i in 0..N {
                    acc += a[i] * conv(w[i][j]);
                }
                *yj = acc;
            }
        }
    };
}

axpyn_scalar!(axpyn_f32, f32, |v: f32| v);
axpyn_scalar!(axpyn_f16, f16, |v: f16| v.to_f32());
axpyn_scalar!(axpyn_bf16, bf16, |v: bf16| v.to_f32());

macro_rules! rank_update_scalar {
    ($name:ident, $t:ty, $conv:expr) => {
        /// Sparse rank update of a 4×64 output tile (prompt-time sparse down projection):
        /// `y[i·64 + c] += Σ_{j ∈ js} act[i·stride + j] · w[j·ws + c]`, i < 4, c < 64.
        /// `w` starts at the tile's first column; `js` lists the rows with any non-zero `act`.
        pub fn $name(
            act: &[f32],
            stride: usize,
            js: &[u32],
            w: &[$t],
            ws: usize,
            y: &mut [f32; 256],
        ) {
            let conv = $conv;
            for &j in js {
                let j = j as usize;
                let row = &w[j * ws..j * ws + 64];
                for i in 0..4 {
                    let a = act[i * stride + j];
                    if a != 0.0 {
                        for c in 0..64 {
                            y[i * 64 + c] += a * conv(row[c]);
                        }
                    }
                }
            }
        }
    };
}

rank_update_scalar!(rank4x64_f32, f32, |v: f32| v);
rank_update_scalar!(rank4x64_f16, f16, |v: f16| v.to_f32());
rank_update_scalar!(rank4x64_bf16, bf16, |v: bf16| v.to_f32());
