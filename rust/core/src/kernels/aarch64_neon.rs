//! NEON (AdvSIMD) tier for aarch64. Same names and signatures as `scalar`; the dispatch table
//! points here after `is_aarch64_feature_detected!("neon")` (every ARMv8-A Linux CPU has it).
//! The `neon-dotprod` tier uses these same float kernels: dotprod only changes int8 kernels.
//!
//! Invariants:
//! - Every kernel mirrors its `x86_avx2` twin operation for operation: 8-wide "vectors" held as
//!   two `float32x4_t` (lo, hi); dot products with 4 independent accumulators reduced as
//!   `(acc0+acc1)+(acc2+acc3)`, then `lo+hi`, then `(s0+s2)+(s1+s3)`, with the same 32/8/scalar
//!   tail split; AXPYs, `axpy4` and `rank4x64` with the same per-element FMA sequence and the
//!   same scalar tails; `tile4x4` as two 2x4 tiles. With fused multiply-add on both sides the
//!   NEON tier is bit-identical to the AVX2 tier, so an aarch64 board and an x86_64 machine
//!   forced to `SPARSELM_KERNEL=avx2` produce the same logits (checked by `.ci/arm64.sh`).
//! - Only stable, base ARMv8.0 instructions: f16 widening uses `fcvtl`/`fcvtl2` through `asm!`
//!   (base AdvSIMD; it does not need FEAT_FP16), because `vcvt_f32_f16`/`float16x4_t` were
//!   stabilised only recently (they compile on Debian's 1.96; our MSRV is 1.89).
//!   bf16 widening is a 16-bit left shift (`vshll_n_u16::<16>`).

use std::arch::aarch64::*;
use std::arch::asm;

use half::{bf16, f16};

/// Eight f32 lanes as two NEON registers.
#[derive(Clone, Copy)]
struct F32x8 {
    lo: float32x4_t,
    hi: float32x4_t,
}

#[inline]
#[target_feature(enable = "neon")]
fn zero8() -> F32x8 {
    F32x8 {
        lo: vdupq_n_f32(0.0),
        hi: vdupq_n_f32(0.0),
    }
}

/// `acc + a·b` lane-wise, fused (like `_mm256_fmadd_ps`).
#[inline]
#[target_feature(enable = "neon")]
fn fma8(acc: F32x8, a: F32x8, b: F32x8) -> F32x8 {
    F32x8 {
        lo: vfmaq_f32(acc.lo, a.lo, b.lo),
        hi: vfmaq_f32(acc.hi, a.hi, b.hi),
    }
}

#[inline]
#[target_feature(enable = "neon")]
fn add8(a: F32x8, b: F32x8) -> F32x8 {
    F32x8 {
        lo: vaddq_f32(a.lo, b.lo),
        hi: vaddq_f32(a.hi, b.hi),
    }
}

/// Horizontal sum in the association order of `x86_avx2::hsum256`.
#[inline]
#[target_feature(enable = "neon")]
fn hsum8(v: F32x8) -> f32 {
    let s = vaddq_f32(v.lo, v.hi); // [s0, s1, s2, s3]
    let t = vadd_f32(vget_low_f32(s), vget_high_f32(s)); // [s0+s2, s1+s3]
    vpadds_f32(t) // (s0+s2)+(s1+s3)
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_f32(p: *const f32) -> F32x8 {
    // SAFETY: caller guarantees 8 readable f32 at p.
    unsafe {
        F32x8 {
            lo: vld1q_f32(p),
            hi: vld1q_f32(p.add(4)),
        }
    }
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn store_f32(p: *mut f32, v: F32x8) {
    // SAFETY: caller guarantees 8 writable f32 at p.
    unsafe {
        vst1q_f32(p, v.lo);
        vst1q_f32(p.add(4), v.hi);
    }
}

/// Eight bf16 values widened to f32 (bf16 is the high half of an f32).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_bf16(p: *const bf16) -> F32x8 {
    // SAFETY: caller guarantees 8 readable bf16 (16 bytes) at p.
    let h = unsafe { vld1q_u16(p as *const u16) };
    F32x8 {
        lo: vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
        hi: vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
    }
}

/// Eight IEEE half values widened to f32 with `fcvtl`/`fcvtl2` (exact, including subnormals,
/// infinities; NaN stays NaN, like `half::f16::to_f32`).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_f16(p: *const f16) -> F32x8 {
    // SAFETY: caller guarantees 8 readable f16 (16 bytes) at p.
    let h = unsafe { vld1q_u16(p as *const u16) };
    let (lo, hi): (float32x4_t, float32x4_t);
    // SAFETY: fcvtl/fcvtl2 (half → single) are base ARMv8.0 AdvSIMD instructions; they only
    // read and write the named vector registers.
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
    F32x8 { lo, hi }
}

macro_rules! dot_impl {
    ($name:ident, $inner:ident, $t:ty, $load:ident, $scalar:path) => {
        #[target_feature(enable = "neon")]
        unsafe fn $inner(w: &[$t], x: &[f32]) -> f32 {
            let n = w.len().min(x.len());
            let (pw, px) = (w.as_ptr(), x.as_ptr());
            let mut acc = [zero8(); 4];
            let mut i = 0;
            // SAFETY (all loads below): i + 32 <= n or i + 8 <= n bounds every 8-wide load.
            while i + 32 <= n {
                for k in 0..4 {
                    let a = unsafe { $load(pw.add(i + 8 * k)) };
                    let b = unsafe { load_f32(px.add(i + 8 * k)) };
                    acc[k] = fma8(acc[k], a, b);
                }
                i += 32;
            }
            while i + 8 <= n {
                let a = unsafe { $load(pw.add(i)) };
                let b = unsafe { load_f32(px.add(i)) };
                acc[0] = fma8(acc[0], a, b);
                i += 8;
            }
            let v = add8(add8(acc[0], acc[1]), add8(acc[2], acc[3]));
            // the scalar tail only when there is one (a call per row costs ~0.5 % of an f16
            // decode otherwise)
            let tail = if i < n {
                $scalar(&w[i..n], &x[i..n])
            } else {
                0.0
            };
            hsum8(v) + tail
        }

        pub fn $name(w: &[$t], x: &[f32]) -> f32 {
            // SAFETY: this tier is installed only when neon is detected.
            unsafe { $inner(w, x) }
        }
    };
}

macro_rules! axpy_impl {
    ($name:ident, $inner:ident, $t:ty, $load:ident, $scalar:path) => {
        #[target_feature(enable = "neon")]
        unsafe fn $inner(a: f32, w: &[$t], y: &mut [f32]) {
            let n = w.len().min(y.len());
            let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
            let va = F32x8 {
                lo: vdupq_n_f32(a),
                hi: vdupq_n_f32(a),
            };
            let mut i = 0;
            // SAFETY: i + 8 <= n bounds every 8-wide load and store.
            while i + 8 <= n {
                unsafe {
                    let wv = $load(pw.add(i));
                    let yv = load_f32(py.add(i));
                    store_f32(py.add(i), fma8(yv, va, wv));
                }
                i += 8;
            }
            if i < n {
                $scalar(a, &w[i..n], &mut y[i..n]);
            }
        }

        pub fn $name(a: f32, w: &[$t], y: &mut [f32]) {
            // SAFETY: this tier is installed only when neon is detected.
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

/// Two rows of `w` against four rows of `x` (the `x86_avx2::tile2x4_f32` schedule: one 8-wide
/// accumulator per output, 16 of the 32 vector registers).
#[target_feature(enable = "neon")]
unsafe fn tile2x4_f32(w: &[f32], ws: usize, x: &[f32], xs: usize, k: usize, out: &mut [f32]) {
    assert!(
        w.len() >= super::span(2, ws, k) && x.len() >= super::span(4, xs, k),
        "tile2x4 bounds"
    );
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [zero8(); 8];
    let mut p = 0;
    // SAFETY: p + 8 <= k and the assert above keep every row load in bounds.
    while p + 8 <= k {
        unsafe {
            let w0 = load_f32(pw.add(p));
            let w1 = load_f32(pw.add(ws + p));
            for j in 0..4 {
                let xv = load_f32(px.add(j * xs + p));
                acc[j] = fma8(acc[j], w0, xv);
                acc[4 + j] = fma8(acc[4 + j], w1, xv);
            }
        }
        p += 8;
    }
    for i in 0..2 {
        for j in 0..4 {
            let tail =
                super::scalar::dot_f32(&w[i * ws + p..i * ws + k], &x[j * xs + p..j * xs + k]);
            out[4 * i + j] = hsum8(acc[4 * i + j]) + tail;
        }
    }
}

pub fn tile4x4_f32(w: &[f32], ws: usize, x: &[f32], xs: usize, k: usize, out: &mut [f32; 16]) {
    let (top, bottom) = out.split_at_mut(8);
    // SAFETY: this tier is installed only when neon is detected.
    unsafe {
        tile2x4_f32(w, ws, x, xs, k, top);
        tile2x4_f32(&w[2 * ws..], ws, x, xs, k, bottom);
    }
}

/// All 8 lanes = `a`.
#[inline]
#[target_feature(enable = "neon")]
fn splat8(a: f32) -> F32x8 {
    F32x8 {
        lo: vdupq_n_f32(a),
        hi: vdupq_n_f32(a),
    }
}

macro_rules! axpyn_impl {
    ($name:ident, $inner:ident, $t:ty, $load:ident, $scalar:path) => {
        // `x86_avx2::axpyn_*` schedule: per element `acc = y; acc = fma(a_r, w_r, acc)` for
        // r = 0..N, 8 elements per step, the same scalar tail split (bit-identical).
        #[target_feature(enable = "neon")]
        unsafe fn $inner<const N: usize>(a: &[f32; N], w: [&[$t]; N], y: &mut [f32]) {
            let n = y.len();
            assert!(w.iter().all(|r| r.len() >= n), "axpyn row lengths");
            let p = w.map(|r| r.as_ptr());
            let va = a.map(|v| splat8(v));
            let py = y.as_mut_ptr();
            let mut i = 0;
            // SAFETY: i + 8 <= n <= every row length bounds all loads and the store.
            while i + 8 <= n {
                unsafe {
                    let mut acc = load_f32(py.add(i));
                    for r in 0..N {
                        acc = fma8(acc, va[r], $load(p[r].add(i)));
                    }
                    store_f32(py.add(i), acc);
                }
                i += 8;
            }
            $scalar(a, w.map(|r| &r[i..n]), &mut y[i..]);
        }

        /// `y += Σ_r a[r]·w[r]` over `N` rows.
        pub fn $name<const N: usize>(a: &[f32; N], w: [&[$t]; N], y: &mut [f32]) {
            // SAFETY: this tier is installed only when neon is detected.
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
        // Four passes of 16 columns: 4 tokens x 16 columns = 16 accumulator registers plus 4
        // for the weight row (of 32). Every output gets the same FMA sequence (over `js` in
        // order, zero activations included) as in `x86_avx2::rank4x64_*`: bit-identical.
        #[target_feature(enable = "neon")]
        unsafe fn $inner(
            act: &[f32],
            stride: usize,
            js: &[u32],
            w: &[$t],
            ws: usize,
            y: &mut [f32; 256],
        ) {
            for pass in 0..4 {
                let c0 = pass * 16;
                // acc[2i + h]: token i, columns c0 + 8h .. c0 + 8h + 8.
                let mut acc = [zero8(); 8];
                for i in 0..4 {
                    for h in 0..2 {
                        // SAFETY: i·64 + c0 + 8h + 8 <= 256.
                        acc[2 * i + h] = unsafe { load_f32(y.as_ptr().add(i * 64 + c0 + 8 * h)) };
                    }
                }
                for &j in js {
                    let j = j as usize;
                    let row = &w[j * ws + c0..j * ws + c0 + 16];
                    // SAFETY: row has 16 elements: two 8-wide loads.
                    let wv = unsafe { [$load(row.as_ptr()), $load(row.as_ptr().add(8))] };
                    for i in 0..4 {
                        // Branch-free: a zero activation adds an exact 0.
                        let va = splat8(act[i * stride + j]);
                        for h in 0..2 {
                            acc[2 * i + h] = fma8(acc[2 * i + h], va, wv[h]);
                        }
                    }
                }
                for i in 0..4 {
                    for h in 0..2 {
                        // SAFETY: as above.
                        unsafe {
                            store_f32(y.as_mut_ptr().add(i * 64 + c0 + 8 * h), acc[2 * i + h])
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
            // SAFETY: this tier is installed only when neon is detected.
            unsafe { $inner(act, stride, js, w, ws, y) }
        }
    };
}

rank_update_impl!(rank4x64_f32, rank4x64_f32_i, f32, load_f32);
rank_update_impl!(rank4x64_f16, rank4x64_f16_i, f16, load_f16);
rank_update_impl!(rank4x64_bf16, rank4x64_bf16_i, bf16, load_bf16);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every f16 bit pattern (normals, subnormals, ±0, ±inf, NaNs) widens exactly as `half` does.
    #[test]
    fn f16_widening_is_exact_for_all_bit_patterns() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        for c in all.chunks_exact(8) {
            // SAFETY: c has 8 elements; neon is mandatory on aarch64 Linux.
            let v = unsafe { load_f16(c.as_ptr()) };
            let mut out = [0f32; 8];
            // SAFETY: out has 8 writable f32.
            unsafe { store_f32(out.as_mut_ptr(), v) };
            for (h, f) in c.iter().zip(out) {
                let want = h.to_f32();
                if want.is_nan() {
                    assert!(f.is_nan(), "{:#06x}", h.to_bits());
                } else {
                    assert_eq!(f.to_bits(), want.to_bits(), "{:#06x}", h.to_bits());
                }
            }
        }
    }

    #[test]
    fn bf16_widening_is_exact_for_all_bit_patterns() {
        let all: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        for c in all.chunks_exact(8) {
            // SAFETY: c has 8 elements; neon is mandatory on aarch64 Linux.
            let v = unsafe { load_bf16(c.as_ptr()) };
            let mut out = [0f32; 8];
            // SAFETY: out has 8 writable f32.
            unsafe { store_f32(out.as_mut_ptr(), v) };
            for (h, f) in c.iter().zip(out) {
                assert_eq!(
                    f.to_bits(),
                    (h.to_bits() as u32) << 16,
                    "{:#06x}",
                    h.to_bits()
                );
            }
        }
    }
}
