//! Tests of the quantized blocks and kernels: byte layouts, quantizer error bounds, and every
//! available tier against the scalar spec (bit-identical results) over block counts
//! 0..2·lanes and beyond, misaligned slices and value patterns; proptest for random vectors.

use proptest::prelude::*;

use super::*;

/// Inputs that once broke something; each is checked by `regressions`.
/// (The first entry is the classic `floor(|v| + 0.5)` rounding pitfall, kept preemptively.)
const ROUND_REGRESSIONS: &[f32] = &[0.499_999_97, -0.499_999_97, 8_388_609.0, 2.5, -2.5];

/// Deterministic xorshift32 stream.
struct Rng(u32);

impl Rng {
    fn new(seed: u32) -> Rng {
        Rng(seed.wrapping_mul(2_654_435_761).wrapping_add(0x9E37_79B9) | 1)
    }
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }
    fn below(&mut self, n: u32) -> u32 {
        self.next() % n
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    }
    /// Any finite f16 scale: random bits with the all-ones (inf/NaN) exponent avoided, so
    /// zeros, subnormals, negatives and 65504 all occur.
    fn scale(&mut self) -> f16 {
        let mut b = self.next() as u16;
        if (b >> 10) & 0x1F == 0x1F {
            b &= !0x4000;
        }
        f16::from_bits(b)
    }
}

/// How the codes of a generated vector look.
#[derive(Clone, Copy, Debug)]
enum Pattern {
    Zeros,
    OneNonzero,
    Random,
    /// Only the extreme codes (Q8_0: −128, −127, 127; Q4_0: nibbles 0 and 15).
    Extreme,
    AllEqual,
    /// Each code nonzero with this probability (percent).
    Sparse(u32),
}

const PATTERNS: &[Pattern] = &[
    Pattern::Zeros,
    Pattern::OneNonzero,
    Pattern::Random,
    Pattern::Extreme,
    Pattern::AllEqual,
    Pattern::Sparse(10),
    Pattern::Sparse(50),
    Pattern::Sparse(90),
];

/// Block counts: 0..2·lanes and well beyond (lanes = 8 blocks per SIMD step), block multiples,
/// odd counts.
fn block_counts() -> Vec<usize> {
    let mut v: Vec<usize> = (0..=40).collect();
    v.extend([63, 64, 65, 127, 128, 129, 263]);
    v
}

fn gen_q8(nb: usize, p: Pattern, seed: u32) -> Vec<BlockQ8_0> {
    let mut r = Rng::new(seed);
    let one = r.below((nb * QK8_0).max(1) as u32) as usize;
    let eq = r.next() as i8;
    let eq_d = r.scale();
    (0..nb)
        .map(|b| {
            let d = if matches!(p, Pattern::AllEqual) {
                eq_d
            } else {
                r.scale()
            };
            let mut qs = [0i8; QK8_0];
            for (j, q) in qs.iter_mut().enumerate() {
                *q = match p {
                    Pattern::Zeros => 0,
                    Pattern::OneNonzero => {
                        if b * QK8_0 + j == one {
                            -128
                        } else {
                            0
                        }
                    }
                    Pattern::Random => r.next() as i8,
                    Pattern::Extreme => [-128, -127, 127][r.below(3) as usize],
                    Pattern::AllEqual => eq,
                    Pattern::Sparse(pct) => {
                        if r.below(100) < pct {
                            r.next() as i8
                        } else {
                            0
                        }
                    }
                };
            }
            BlockQ8_0 { d, qs }
        })
        .collect()
}

fn gen_q4(nb: usize, p: Pattern, seed: u32) -> Vec<BlockQ4_0> {
    let mut r = Rng::new(seed);
    let one = r.below((nb * QK4_0).max(1) as u32) as usize;
    let eq = r.below(16) as u8;
    let eq_d = r.scale();
    (0..nb)
        .map(|b| {
            let d = if matches!(p, Pattern::AllEqual) {
                eq_d
            } else {
                r.scale()
            };
            // Nibble codes by weight index; code 8 is weight 0.
            let mut c = [8u8; QK4_0];
            for (j, q) in c.iter_mut().enumerate() {
                *q = match p {
                    Pattern::Zeros => 8,
                    Pattern::OneNonzero => {
                        if b * QK4_0 + j == one {
                            0
                        } else {
                            8
                        }
                    }
                    Pattern::Random => r.below(16) as u8,
                    Pattern::Extreme => [0, 15][r.below(2) as usize],
                    Pattern::AllEqual => eq,
                    Pattern::Sparse(pct) => {
                        if r.below(100) < pct {
                            r.below(16) as u8
                        } else {
                            8
                        }
                    }
                };
            }
            let mut qs = [0u8; QK4_0 / 2];
            for j in 0..QK4_0 / 2 {
                qs[j] = c[j] | (c[j + 16] << 4);
            }
            BlockQ4_0 { d, qs }
        })
        .collect()
}

/// Every available tier's table (scalar first).
fn tiers() -> Vec<QuantKernels> {
    Tier::available()
        .into_iter()
        .filter_map(quant_kernels_for)
        .collect()
}

fn scalar_k() -> QuantKernels {
    quant_kernels_for(Tier::Scalar).expect("scalar always available")
}

/// A length whose byte size overflows `usize` panics instead of handing out a slice longer
/// than the buffer.
#[test]
fn aligned_zeroed_rejects_sizes_that_overflow() {
    let r = std::panic::catch_unwind(|| Aligned::<[u8; 2]>::zeroed(1 << (usize::BITS - 1)));
    assert!(r.is_err());
    let a = Aligned::<[u8; 2]>::zeroed(33);
    assert_eq!((a.len(), a.as_ptr() as usize % 64), (33, 0));
}

#[test]
fn layout_is_ggml() {
    assert_eq!(std::mem::size_of::<BlockQ8_0>(), 34);
    assert_eq!(std::mem::size_of::<BlockQ4_0>(), 18);
    assert_eq!(std::mem::offset_of!(BlockQ8_0, qs), 2);
    assert_eq!(std::mem::offset_of!(BlockQ4_0, qs), 2);
    let v = vec![BlockQ8_0::default(); 3];
    assert_eq!(blocks_as_bytes(&v).len(), 102);
}

/// x = 0, 1, …, 31 by hand with ggml's formulas.
/// Q8_0: amax = 31, d = 31/127 = 0.244094… = 2^-3 · 1.95276 → f16 mantissa 975.62 → 976:
/// bits (15−3)<<10 | 976 = 0x33D0; q_j = round(j · 127/31).
/// Q4_0: max = 31 (first largest magnitude), d = 31/−8 = −3.875 exactly → f16 0xC3C0;
/// q_j = floor(8.5 − 8j/31): 8 8 7 7 7 7 6 6 6 6 5 5 5 5 4 4 | 4 4 3 3 3 3 2 2 2 2 1 1 1 1 0 0.
#[test]
fn byte_layout_of_a_known_vector() {
    let x: Vec<f32> = (0..32).map(|j| j as f32).collect();
    let q8 = quantize_q8_0(&x).unwrap();
    let mut want = vec![0xD0u8, 0x33];
    let codes: [i8; 32] = [
        0, 4, 8, 12, 16, 20, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61, 66, 70, 74, 78, 82, 86, 90,
        94, 98, 102, 107, 111, 115, 119, 123, 127,
    ];
    want.extend(codes.iter().map(|&c| c as u8));
    assert_eq!(blocks_as_bytes(&q8), &want[..]);

    let q4 = quantize_q4_0(&x).unwrap();
    let want4: [u8; 18] = [
        0xC0, 0xC3, 0x48, 0x48, 0x37, 0x37, 0x37, 0x37, 0x26, 0x26, 0x26, 0x26, 0x15, 0x15, 0x15,
        0x15, 0x04, 0x04,
    ];
    assert_eq!(blocks_as_bytes(&q4), &want4[..]);
    // The same vector negated keeps the codes (d flips sign).
    let neg: Vec<f32> = x.iter().map(|v| -v).collect();
    let q4n = quantize_q4_0(&neg).unwrap();
    assert_eq!(q4n[0].d.to_bits(), 0x43C0);
    assert_eq!(q4n[0].qs, q4[0].qs);

    // Round trip through bytes.
    let back: &[BlockQ8_0] = blocks_from_bytes(&want).unwrap();
    assert_eq!(back, &q8[..]);
    assert!(blocks_from_bytes::<BlockQ8_0>(&want[..33]).is_err());
    let back4: &[BlockQ4_0] = blocks_from_bytes(&want4).unwrap();
    assert_eq!(back4, &q4[..]);
}

#[test]
fn q8_0_rounds_half_away_from_zero_like_roundf() {
    // amax = 127 → d = 1, id = 1 exactly.
    let mut x = [0f32; 32];
    x[..8].copy_from_slice(&[127.0, 2.5, -2.5, 0.5, -0.5, 1.5, 126.5, -126.5]);
    let b = quantize_block_q8_0(&x);
    assert_eq!(b.d.to_bits(), 0x3C00);
    assert_eq!(&b.qs[..8], &[127, 3, -3, 1, -1, 2, 127, -127]);
    assert!(b.qs[8..].iter().all(|&q| q == 0));
}

#[test]
fn q4_0_clamp_and_first_max_wins() {
    // max = +8 → d = −1, id = −1: x = −8 maps to 16.5 → 16 → clamped to 15.
    let mut x = [-8f32; 32];
    x[0] = 8.0;
    let b = quantize_block_q4_0(&x);
    assert_eq!(b.d.to_bits(), 0xBC00);
    assert_eq!(b.qs[0], 0xF0);
    assert!(b.qs[1..].iter().all(|&q| q == 0xFF));
    // Equal magnitudes: the first one (−3) sets the sign, d = 0.375.
    let mut x = [0f32; 32];
    x[0] = -3.0;
    x[1] = 3.0;
    let b = quantize_block_q4_0(&x);
    assert_eq!(b.d.to_f32(), 0.375);
    assert_eq!(b.qs[0] & 0x0F, 0);
    assert_eq!(b.qs[1] & 0x0F, 15);
    assert_eq!(b.qs[2], 0x88);
}

/// Inputs for the quantizer: random at several magnitudes, plus blocks with exact ties
/// (amax = 127 so x · id = k + 0.5), a single nonzero, tiny (f16-subnormal d), huge, negative.
fn quantizer_inputs(nb: usize, seed: u32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    let mut x = Vec::with_capacity(nb * 32);
    for b in 0..nb {
        let mag = [1.0f32, 1e-3, 300.0, 1e-7, 1e30, 0.0][b % 6];
        let block: Vec<f32> = match b % 5 {
            0 | 1 => (0..32).map(|_| r.unit() * mag).collect(),
            2 => (0..32)
                .map(|j| {
                    if j == 0 {
                        127.0
                    } else {
                        (r.below(254) as f32 - 127.0) + 0.5
                    }
                })
                .collect(),
            3 => (0..32)
                .map(|j| if j as u32 == r.below(32) { -mag } else { 0.0 })
                .collect(),
            _ => (0..32).map(|_| -(r.unit().abs()) * mag).collect(),
        };
        x.extend(block);
    }
    x
}

#[test]
fn every_tier_q4_0_quantizer_gives_the_scalar_bytes() {
    // quantizer_inputs plus ties in |x| (the first one decides the sign of d), tiny values
    // (1/d overflows to inf), ±inf and NaN
    let mut extra: Vec<f32> = vec![0.0; 32];
    extra.extend((0..32).map(|j| if j % 2 == 0 { -3.0 } else { 3.0 }));
    extra.extend((0..32).map(|j| if j == 5 { 1e-44 } else { 0.0 }));
    extra.extend((0..32).map(|j| [1.0, f32::INFINITY, -2.0, f32::NAN][j % 4]));
    extra.extend((0..32).map(|j| -(j as f32) * 0.25));
    for nb in block_counts() {
        let mut x = quantizer_inputs(nb + 1, nb as u32 + 77);
        x.extend(&extra);
        let nbx = nb + 5;
        for off in [0usize, 1] {
            let xs = &x[off..off + nbx * 32];
            let mut want = vec![BlockQ4_0::default(); nbx];
            scalar::quantize_row_q4_0(xs, &mut want);
            for k in tiers() {
                let mut got = vec![BlockQ4_0::default(); nbx + 1];
                (k.quantize_row_q4_0)(xs, &mut got);
                assert_eq!(
                    blocks_as_bytes(&got[..nbx]),
                    blocks_as_bytes(&want),
                    "{} nb={nb} off={off}",
                    k.tier_name
                );
                assert_eq!(
                    got[nbx],
                    BlockQ4_0::default(),
                    "{} wrote past the blocks",
                    k.tier_name
                );
            }
        }
    }
}

#[test]
fn every_tier_quantizer_gives_the_scalar_bytes() {
    for nb in block_counts() {
        let x = quantizer_inputs(nb + 1, nb as u32);
        for off in [0usize, 1, 32] {
            let xs = &x[off..off + nb * 32];
            let mut want = vec![BlockQ8_0::default(); nb];
            scalar::quantize_row_q8_0(xs, &mut want);
            for k in tiers() {
                let mut got = vec![BlockQ8_0::default(); nb + 1];
                (k.quantize_row_q8_0)(xs, &mut got);
                assert_eq!(
                    blocks_as_bytes(&got[..nb]),
                    blocks_as_bytes(&want),
                    "{} nb={nb} off={off}",
                    k.tier_name
                );
                assert_eq!(
                    blocks_as_bytes(&got[nb..]),
                    blocks_as_bytes(&[BlockQ8_0::default()]),
                    "{}",
                    k.tier_name
                );
            }
        }
    }
    // The public entry point (dispatched) agrees with the per-block spec.
    let x = quantizer_inputs(40, 99);
    let q = quantize_q8_0(&x).unwrap();
    for (b, blk) in q.iter().enumerate() {
        let xs: &[f32; 32] = x[b * 32..(b + 1) * 32].try_into().unwrap();
        assert_eq!(
            blocks_as_bytes(&[quantize_block_q8_0(xs)]),
            blocks_as_bytes(&[*blk])
        );
    }
}

#[test]
fn zero_blocks() {
    let x = [0f32; 64];
    let q8 = quantize_q8_0(&x).unwrap();
    assert!(q8.iter().all(|b| b.d.to_bits() == 0 && b.qs == [0; 32]));
    let q4 = quantize_q4_0(&x).unwrap();
    // ggml computes d = 0 / −8 = −0.0, stored as f16 0x8000.
    assert!(q4
        .iter()
        .all(|b| b.d.to_bits() == 0x8000 && b.qs == [0x88; 16]));
    for k in tiers() {
        assert_eq!((k.vec_dot_q8_0_q8_0)(&q8, &q8).to_bits(), 0);
        assert_eq!((k.vec_dot_q4_0_q8_0)(&q4, &q8).to_bits(), 0);
    }
}

#[test]
fn lengths_are_checked() {
    let x = [1f32; 40];
    let mut out8 = [BlockQ8_0::default(); 1];
    let mut out4 = [BlockQ4_0::default(); 1];
    assert!(quantize_row_q8_0(&x, &mut out8).is_err());
    assert!(quantize_row_q4_0(&x, &mut out4).is_err());
    assert!(quantize_row_q8_0(&x[..32], &mut []).is_err());
    assert!(quantize_q8_0(&x).is_err());
    let mut y = [0f32; 31];
    assert!(dequantize_row_q8_0(&out8, &mut y).is_err());
    assert!(dequantize_row_q4_0(&out4, &mut y).is_err());
    assert!(quantize_row_q8_0(&[], &mut []).is_ok());
}

#[test]
fn round_half_away_matches_roundf() {
    for &v in ROUND_REGRESSIONS {
        assert_eq!(round_half_away(v) as i32, v.round() as i32, "{v}");
    }
    // Exhaustive over every f32 with |v| in [2^-2, 2^9) (the codes' range), both signs.
    let lo = 0.25f32.to_bits();
    let hi = 512f32.to_bits();
    for bits in lo..hi {
        let v = f32::from_bits(bits);
        // Compared as integers: the sign of a zero result differs (−0.25 → +0 here, −0 in
        // roundf) and is irrelevant once cast to a code.
        assert_eq!(round_half_away(v) as i32, v.round() as i32, "{v}");
        assert_eq!(round_half_away(-v) as i32, (-v).round() as i32, "{}", -v);
    }
    for v in [0.0f32, 0.1, 1e-30, 1e9, 3e9, -3e9] {
        assert_eq!(round_half_away(v) as i8, v.round() as i8, "{v}");
    }
}

/// `|x − q·d16| ≤ |d|/2 + |q|·|d − d16|` (rounding to a code, plus the f16 rounding of d), with
/// a few ulps of slack for `x · id`.
#[test]
fn q8_0_roundtrip_error_bound() {
    for (seed, mag) in [(1u32, 1.0f32), (2, 1e-3), (3, 300.0), (4, 1e-6), (5, 5e4)] {
        let mut r = Rng::new(seed);
        let x: Vec<f32> = (0..32 * 50).map(|_| r.unit() * mag).collect();
        let q = quantize_q8_0(&x).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize_row_q8_0(&q, &mut y).unwrap();
        for (b, blk) in q.iter().enumerate() {
            let xs = &x[b * 32..(b + 1) * 32];
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let d16 = blk.d.to_f32();
            for j in 0..32 {
                let err = (xs[j] - y[b * 32 + j]).abs();
                let bound = d / 2.0
                    + (blk.qs[j] as f32).abs() * (d - d16).abs()
                    + 4.0 * f32::EPSILON * amax;
                assert!(
                    err <= bound,
                    "mag {mag} block {b} j {j}: err {err} > {bound}"
                );
            }
        }
    }
}

/// `|x − (q−8)·d16| ≤ |d|/2 + 8·|d − d16|`, and `≤ |d| + …` for clamped codes (x·id ≥ 7.5).
#[test]
fn q4_0_roundtrip_error_bound() {
    for (seed, mag) in [(11u32, 1.0f32), (12, 1e-3), (13, 300.0), (14, 5e4)] {
        let mut r = Rng::new(seed);
        let x: Vec<f32> = (0..32 * 50).map(|_| r.unit() * mag).collect();
        let q = quantize_q4_0(&x).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize_row_q4_0(&q, &mut y).unwrap();
        let mut clamped = 0;
        for (b, blk) in q.iter().enumerate() {
            let xs = &x[b * 32..(b + 1) * 32];
            let max = xs
                .iter()
                .fold(0f32, |m, &v| if m.abs() < v.abs() { v } else { m });
            let d = max / -8.0;
            let id = 1.0 / d;
            let d16 = blk.d.to_f32();
            for j in 0..32 {
                let err = (xs[j] - y[b * 32 + j]).abs();
                let clamp = xs[j] * id + 8.5 >= 16.0;
                clamped += clamp as usize;
                let base = if clamp { d.abs() } else { d.abs() / 2.0 };
                let bound = base + 8.0 * (d - d16).abs() + 8.0 * f32::EPSILON * max.abs();
                assert!(
                    err <= bound,
                    "mag {mag} block {b} j {j}: err {err} > {bound}"
                );
            }
        }
        let _ = clamped; // random data rarely hits the clamp; q4_0_clamp_and_first_max_wins does
    }
}

#[test]
fn axpy_with_one_equals_dequantize() {
    let w8 = gen_q8(37, Pattern::Random, 5);
    let w4 = gen_q4(37, Pattern::Random, 6);
    for k in tiers() {
        let (mut a, mut b) = (vec![0f32; 37 * 32], vec![0f32; 37 * 32]);
        dequantize_row_q8_0(&w8, &mut a).unwrap();
        (k.axpy_q8_0)(1.0, &w8, &mut b);
        assert_eq!(a, b, "{}", k.tier_name);
        dequantize_row_q4_0(&w4, &mut a).unwrap();
        b.fill(0.0);
        (k.axpy_q4_0)(1.0, &w4, &mut b);
        assert_eq!(a, b, "{}", k.tier_name);
    }
}

#[test]
fn every_tier_dot_is_bit_identical_to_scalar() {
    let s = scalar_k();
    let ks = tiers();
    assert!(ks.len() == Tier::available().len());
    for (pi, &p) in PATTERNS.iter().enumerate() {
        for nb in block_counts() {
            let seed = (pi * 1000 + nb) as u32;
            // One spare block in front so offset 1 is a misaligned view inside a bigger Vec.
            let w8 = gen_q8(nb + 1, p, seed);
            let w4 = gen_q4(nb + 1, p, seed + 1);
            let x = gen_q8(
                nb + 1,
                if matches!(p, Pattern::Zeros) {
                    Pattern::Random
                } else {
                    p
                },
                seed + 2,
            );
            for (ow, ox) in [(0usize, 0usize), (1, 1), (1, 0), (0, 1)] {
                let (w8, w4, x) = (&w8[ow..ow + nb], &w4[ow..ow + nb], &x[ox..ox + nb]);
                let r8 = (s.vec_dot_q8_0_q8_0)(w8, x);
                let r4 = (s.vec_dot_q4_0_q8_0)(w4, x);
                for k in &ks {
                    let t8 = (k.vec_dot_q8_0_q8_0)(w8, x);
                    let t4 = (k.vec_dot_q4_0_q8_0)(w4, x);
                    assert_eq!(
                        t8.to_bits(),
                        r8.to_bits(),
                        "{} q8_0 {p:?} nb={nb} off=({ow},{ox}): {t8} vs {r8}",
                        k.tier_name
                    );
                    assert_eq!(
                        t4.to_bits(),
                        r4.to_bits(),
                        "{} q4_0 {p:?} nb={nb} off=({ow},{ox}): {t4} vs {r4}",
                        k.tier_name
                    );
                }
            }
        }
    }
}

#[test]
fn mismatched_lengths_use_the_common_prefix() {
    let w8 = gen_q8(29, Pattern::Random, 77);
    let w4 = gen_q4(29, Pattern::Random, 78);
    let x = gen_q8(21, Pattern::Random, 79);
    for k in tiers() {
        assert_eq!(
            (k.vec_dot_q8_0_q8_0)(&w8, &x).to_bits(),
            (k.vec_dot_q8_0_q8_0)(&w8[..21], &x).to_bits()
        );
        assert_eq!(
            (k.vec_dot_q8_0_q8_0)(&x, &w8).to_bits(),
            (k.vec_dot_q8_0_q8_0)(&x, &w8[..21]).to_bits()
        );
        assert_eq!(
            (k.vec_dot_q4_0_q8_0)(&w4, &x).to_bits(),
            (k.vec_dot_q4_0_q8_0)(&w4[..21], &x).to_bits()
        );
        // y shorter than the row: only whole blocks of y are touched.
        let mut y = vec![1f32; 21 * 32 + 7];
        (k.axpy_q8_0)(0.5, &w8, &mut y);
        assert!(y[21 * 32..].iter().all(|&v| v == 1.0), "{}", k.tier_name);
    }
}

/// The exact integer part: with d = 1 everywhere, the dot is the exact integer sum (which fits
/// f32 exactly here), for the worst-case codes of every tier's tricks.
#[test]
fn integer_part_is_exact_for_extreme_codes() {
    let one = f16::from_f32(1.0);
    let cases: [(i8, i8); 5] = [
        (-128, -128),
        (-128, 127),
        (127, -128),
        (127, 127),
        (-1, -128),
    ];
    for k in tiers() {
        for &(a, b) in &cases {
            for nb in [1usize, 8, 9, 16] {
                let w = vec![
                    BlockQ8_0 {
                        d: one,
                        qs: [a; 32]
                    };
                    nb
                ];
                let x = vec![
                    BlockQ8_0 {
                        d: one,
                        qs: [b; 32]
                    };
                    nb
                ];
                let want = (nb * 32) as f64 * a as f64 * b as f64;
                assert_eq!(
                    (k.vec_dot_q8_0_q8_0)(&w, &x) as f64,
                    want,
                    "{} ({a},{b}) nb={nb}",
                    k.tier_name
                );
                for nib in [0u8, 15] {
                    let w4 = vec![
                        BlockQ4_0 {
                            d: one,
                            qs: [nib | (nib << 4); 16]
                        };
                        nb
                    ];
                    let want = (nb * 32) as f64 * (nib as f64 - 8.0) * b as f64;
                    assert_eq!(
                        (k.vec_dot_q4_0_q8_0)(&w4, &x) as f64,
                        want,
                        "{} nib {nib} x {b}",
                        k.tier_name
                    );
                }
            }
        }
    }
}

#[test]
fn every_tier_axpy_is_bit_identical_to_scalar() {
    let s = scalar_k();
    let ks = tiers();
    for (pi, &p) in PATTERNS.iter().enumerate() {
        for nb in block_counts() {
            let seed = (pi * 1000 + nb) as u32 + 500_000;
            let w8 = gen_q8(nb + 1, p, seed);
            let w4 = gen_q4(nb + 1, p, seed + 1);
            let mut r = Rng::new(seed + 2);
            // y has one extra f32 in front (misaligned view) and 5 behind (must stay untouched).
            let y0: Vec<f32> = (0..nb * 32 + 6).map(|_| r.unit() * 4.0).collect();
            for a in [0.37f32, -1.5, 0.0, 1e-3] {
                for ow in [0usize, 1] {
                    let (w8, w4) = (&w8[ow..ow + nb], &w4[ow..ow + nb]);
                    let mut ys8 = y0.clone();
                    let mut ys4 = y0.clone();
                    (s.axpy_q8_0)(a, w8, &mut ys8[1..]);
                    (s.axpy_q4_0)(a, w4, &mut ys4[1..]);
                    assert_eq!(ys8[nb * 32 + 1..], y0[nb * 32 + 1..]);
                    for k in &ks {
                        let mut yt = y0.clone();
                        (k.axpy_q8_0)(a, w8, &mut yt[1..]);
                        let same = yt.iter().zip(&ys8).all(|(p, q)| p.to_bits() == q.to_bits());
                        assert!(
                            same,
                            "{} axpy_q8_0 {p:?} nb={nb} a={a} ow={ow}",
                            k.tier_name
                        );
                        let mut yt = y0.clone();
                        (k.axpy_q4_0)(a, w4, &mut yt[1..]);
                        let same = yt.iter().zip(&ys4).all(|(p, q)| p.to_bits() == q.to_bits());
                        assert!(
                            same,
                            "{} axpy_q4_0 {p:?} nb={nb} a={a} ow={ow}",
                            k.tier_name
                        );
                    }
                }
            }
        }
    }
}

/// Scalar spec vs an f64 evaluation of the same quantized values: only f32 rounding differs.
#[test]
fn scalar_dot_matches_f64_of_dequantized_values() {
    for nb in [1usize, 7, 64, 256] {
        let w8 = gen_q8(nb, Pattern::Random, 900 + nb as u32);
        let w4 = gen_q4(nb, Pattern::Random, 901 + nb as u32);
        let x = gen_q8(nb, Pattern::Random, 902 + nb as u32);
        let (mut wf, mut xf) = (vec![0f32; nb * 32], vec![0f32; nb * 32]);
        dequantize_row_q8_0(&x, &mut xf).unwrap();
        for q4 in [false, true] {
            if q4 {
                dequantize_row_q4_0(&w4, &mut wf).unwrap();
            } else {
                dequantize_row_q8_0(&w8, &mut wf).unwrap();
            }
            let exact: f64 = wf.iter().zip(&xf).map(|(&a, &b)| a as f64 * b as f64).sum();
            let mag: f64 = wf
                .iter()
                .zip(&xf)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            let got = if q4 {
                scalar::vec_dot_q4_0_q8_0(&w4, &x)
            } else {
                scalar::vec_dot_q8_0_q8_0(&w8, &x)
            };
            let tol = 1.2e-7 * (nb as f64 + 3.0) * mag;
            assert!(
                (got as f64 - exact).abs() <= tol,
                "nb={nb} q4={q4}: {got} vs {exact} (tol {tol})"
            );
        }
    }
}

#[test]
fn dispatch_follows_the_kernel_tier() {
    let k = quant_kernels();
    #[allow(unreachable_patterns)]
    let want = match kernels().tier {
        Tier::Scalar => "scalar",
        #[cfg(target_arch = "x86_64")]
        Tier::Avx2 => "avx2",
        #[cfg(target_arch = "x86_64")]
        Tier::Avx512 => {
            if x86_avx512::vnni_detected() {
                "avx512vnni"
            } else {
                "avx2"
            }
        }
        #[cfg(target_arch = "aarch64")]
        Tier::Neon => "neon",
        #[cfg(target_arch = "aarch64")]
        Tier::NeonDotprod => "neon-dotprod",
        _ => "scalar",
    };
    assert_eq!(k.tier_name, want);
    for t in Tier::available() {
        assert!(quant_kernels_for(t).is_some(), "{t:?}");
    }
}

/// Accuracy of a quantized GEMV row against the f64 dot of the original f32 values: the error
/// is within `Σ |ŵ|·|x − x̂| + |x|·|w − ŵ|` (exact algebra) plus f32 summation slack.
fn check_accuracy_and_tiers(w: &[f32], x: &[f32]) {
    let (w8, w4, xq) = (
        quantize_q8_0(w).unwrap(),
        quantize_q4_0(w).unwrap(),
        quantize_q8_0(x).unwrap(),
    );
    let n = w.len();
    let (mut w8f, mut w4f, mut xqf) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    dequantize_row_q8_0(&w8, &mut w8f).unwrap();
    dequantize_row_q4_0(&w4, &mut w4f).unwrap();
    dequantize_row_q8_0(&xq, &mut xqf).unwrap();
    let exact: f64 = w.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum();
    let s = scalar_k();
    for (name, wh, got) in [
        ("q8_0", &w8f, (s.vec_dot_q8_0_q8_0)(&w8, &xq)),
        ("q4_0", &w4f, (s.vec_dot_q4_0_q8_0)(&w4, &xq)),
    ] {
        let budget: f64 = (0..n)
            .map(|i| {
                (wh[i] as f64).abs() * (x[i] as f64 - xqf[i] as f64).abs()
                    + (x[i] as f64).abs() * (w[i] as f64 - wh[i] as f64).abs()
            })
            .sum();
        let mag: f64 = (0..n).map(|i| (wh[i] as f64 * xqf[i] as f64).abs()).sum();
        let tol = budget + 1.2e-7 * (n as f64 / 32.0 + 3.0) * mag + 1e-30;
        assert!(
            (got as f64 - exact).abs() <= tol,
            "{name}: {got} vs {exact}, budget {tol}"
        );
    }
    for k in tiers() {
        let a = (k.vec_dot_q8_0_q8_0)(&w8, &xq);
        assert_eq!(
            a.to_bits(),
            (s.vec_dot_q8_0_q8_0)(&w8, &xq).to_bits(),
            "{}",
            k.tier_name
        );
        let a = (k.vec_dot_q4_0_q8_0)(&w4, &xq);
        assert_eq!(
            a.to_bits(),
            (s.vec_dot_q4_0_q8_0)(&w4, &xq).to_bits(),
            "{}",
            k.tier_name
        );
        let (mut y1, mut y2) = (x.to_vec(), x.to_vec());
        (s.axpy_q4_0)(0.75, &w4, &mut y1);
        (k.axpy_q4_0)(0.75, &w4, &mut y2);
        assert!(
            y1.iter().zip(&y2).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{}",
            k.tier_name
        );
        (s.axpy_q8_0)(-0.5, &w8, &mut y1);
        (k.axpy_q8_0)(-0.5, &w8, &mut y2);
        assert!(
            y1.iter().zip(&y2).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{}",
            k.tier_name
        );
    }
}

#[test]
fn accuracy_on_seeded_vectors() {
    for (seed, n) in [(1u32, 32usize), (2, 2048), (3, 8192), (4, 96)] {
        let mut r = Rng::new(seed);
        let w: Vec<f32> = (0..n).map(|_| r.unit() * 0.05).collect();
        // ReLU²-like activations: many exact zeros, a heavy tail.
        let x: Vec<f32> = (0..n).map(|_| r.unit().max(0.0).powi(2) * 8.0).collect();
        check_accuracy_and_tiers(&w, &x);
    }
}

fn vec_mult32(max_blocks: usize) -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
    (0..=max_blocks).prop_flat_map(|nb| {
        let v = prop::collection::vec(-1.0e3f32..1.0e3f32, nb * 32);
        (v.clone(), v)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn prop_random_vectors((w, x) in vec_mult32(40), scale in prop::sample::select(vec![1e-4f32, 1.0, 37.0])) {
        let w: Vec<f32> = w.iter().map(|v| v * scale).collect();
        check_accuracy_and_tiers(&w, &x);
    }

    #[test]
    fn prop_random_blocks(seed in any::<u32>(), nb in 0usize..70, pi in 0usize..8) {
        let p = PATTERNS[pi];
        let (w8, w4, x) = (gen_q8(nb, p, seed), gen_q4(nb, p, seed ^ 1), gen_q8(nb, Pattern::Random, seed ^ 2));
        let s = scalar_k();
        for k in tiers() {
            prop_assert_eq!((k.vec_dot_q8_0_q8_0)(&w8, &x).to_bits(), (s.vec_dot_q8_0_q8_0)(&w8, &x).to_bits());
            prop_assert_eq!((k.vec_dot_q4_0_q8_0)(&w4, &x).to_bits(), (s.vec_dot_q4_0_q8_0)(&w4, &x).to_bits());
        }
    }
}

#[test]
fn axpy4_q8_0_equals_four_axpys() {
    // Same operations in the same order as four sequential axpy_q8_0 calls: bit-identical.
    for tier in crate::kernels::Tier::available() {
        let Some(k) = quant_kernels_for(tier) else {
            continue;
        };
        let Some(f) = k.axpy4_q8_0 else { continue };
        for nb in [0usize, 1, 2, 7, 64] {
            let rows: Vec<Vec<BlockQ8_0>> = (0..4)
                .map(|r| {
                    let x: Vec<f32> = (0..nb * 32)
                        .map(|i| (((i * 37 + r * 11) % 97) as f32 - 48.0) / 17.0)
                        .collect();
                    quantize_q8_0(&x).unwrap()
                })
                .collect();
            let a = [0.5f32, -1.5, 0.0, 2.25];
            let y0: Vec<f32> = (0..nb * 32).map(|i| (i % 13) as f32 * 0.1).collect();
            let mut want = y0.clone();
            for r in 0..4 {
                (k.axpy_q8_0)(a[r], &rows[r], &mut want);
            }
            let mut got = y0.clone();
            f(&a, [&rows[0], &rows[1], &rows[2], &rows[3]], &mut got);
            assert!(
                want.iter()
                    .zip(&got)
                    .all(|(p, q)| p.to_bits() == q.to_bits()),
                "{tier:?} nb={nb}"
            );
        }
    }
}

#[test]
fn axpy4_q4_0_equals_four_axpys() {
    // Same operations in the same order as four sequential axpy_q4_0 calls: bit-identical.
    for tier in crate::kernels::Tier::available() {
        let Some(k) = quant_kernels_for(tier) else {
            continue;
        };
        let Some(f) = k.axpy4_q4_0 else { continue };
        for nb in [0usize, 1, 2, 7, 64] {
            let rows: Vec<Vec<BlockQ4_0>> = (0..4)
                .map(|r| {
                    let x: Vec<f32> = (0..nb * 32)
                        .map(|i| (((i * 37 + r * 11) % 97) as f32 - 48.0) / 17.0)
                        .collect();
                    quantize_q4_0(&x).unwrap()
                })
                .collect();
            let a = [0.5f32, -1.5, 0.0, 2.25];
            let y0: Vec<f32> = (0..nb * 32).map(|i| (i % 13) as f32 * 0.1).collect();
            let mut want = y0.clone();
            for r in 0..4 {
                (k.axpy_q4_0)(a[r], &rows[r], &mut want);
            }
            let mut got = y0.clone();
            f(&a, [&rows[0], &rows[1], &rows[2], &rows[3]], &mut got);
            assert!(
                want.iter()
                    .zip(&got)
                    .all(|(p, q)| p.to_bits() == q.to_bits()),
                "{tier:?} nb={nb}"
            );
        }
    }
}

#[test]
fn gemv16_q4_0_matches_row_dots() {
    let s = scalar_k();
    for tier in crate::kernels::Tier::available() {
        let Some(k) = quant_kernels_for(tier) else {
            continue;
        };
        let Some(f) = k.gemv16_q4_0 else { continue };
        for nb in [0usize, 1, 2, 7, 64, 65] {
            for (pi, &p) in PATTERNS.iter().enumerate() {
                let rows: Vec<Vec<BlockQ4_0>> = (0..16)
                    .map(|r| gen_q4(nb, p, (nb * 31 + pi * 16 + r) as u32))
                    .collect();
                let x = gen_q8(nb, Pattern::Random, 5 + nb as u32);
                let packed: Vec<BlockQ4_0x16> = (0..nb)
                    .map(|b| BlockQ4_0x16::pack(std::array::from_fn(|r| &rows[r][b])))
                    .collect();
                for b in 0..nb {
                    for r in 0..16 {
                        assert_eq!(packed[b].row(r), rows[r][b], "pack/row round trip");
                    }
                }
                let xsum8: Vec<i32> = x
                    .iter()
                    .map(|b| 8 * b.qs.iter().map(|&v| v as i32).sum::<i32>())
                    .collect();
                let mut got = [0f32; 16];
                f(&packed, &x, &xsum8, &mut got);
                for r in 0..16 {
                    let want = (s.vec_dot_q4_0_q8_0)(&rows[r], &x);
                    // bound: rounding of each block term and of the running sum
                    let mag: f32 = rows[r]
                        .iter()
                        .zip(&x)
                        .map(|(w, xb)| {
                            (scalar::sumi_q4_0(w, xb) as f32 * scalar::scale(w.d, xb.d)).abs()
                        })
                        .sum();
                    let tol = 4.0 * f32::EPSILON * mag * (nb as f32 + 1.0) + f32::MIN_POSITIVE;
                    assert!(
                        (got[r] - want).abs() <= tol || (got[r].is_nan() && want.is_nan()),
                        "{tier:?} nb={nb} {p:?} row {r}: {} vs {want}",
                        got[r]
                    );
                }
            }
        }
    }
}

#[test]
fn gemv16_q8_0_matches_row_dots() {
    let s = scalar_k();
    for tier in crate::kernels::Tier::available() {
        let Some(k) = quant_kernels_for(tier) else {
            continue;
        };
        let Some(f) = k.gemv16_q8_0 else { continue };
        for nb in [0usize, 1, 2, 7, 64, 65] {
            for (pi, &p) in PATTERNS.iter().enumerate() {
                let rows: Vec<Vec<BlockQ8_0>> = (0..16)
                    .map(|r| gen_q8(nb, p, (nb * 37 + pi * 16 + r) as u32))
                    .collect();
                let x = gen_q8(nb, Pattern::Random, 9 + nb as u32);
                let packed: Vec<BlockQ8_0x16> = (0..nb)
                    .map(|b| BlockQ8_0x16::pack(std::array::from_fn(|r| &rows[r][b])))
                    .collect();
                for b in 0..nb {
                    for r in 0..16 {
                        assert_eq!(packed[b].row(r), rows[r][b], "pack/row round trip");
                    }
                }
                let xsum128: Vec<i32> = x
                    .iter()
                    .map(|b| 128 * b.qs.iter().map(|&v| v as i32).sum::<i32>())
                    .collect();
                let mut got = [0f32; 16];
                f(&packed, &x, &xsum128, &mut got);
                for r in 0..16 {
                    let want = (s.vec_dot_q8_0_q8_0)(&rows[r], &x);
                    let mag: f32 = rows[r]
                        .iter()
                        .zip(&x)
                        .map(|(w, xb)| {
                            (scalar::sumi_q8_0(w, xb) as f32 * scalar::scale(w.d, xb.d)).abs()
                        })
                        .sum();
                    let tol = 4.0 * f32::EPSILON * mag * (nb as f32 + 1.0) + f32::MIN_POSITIVE;
                    assert!(
                        (got[r] - want).abs() <= tol || (got[r].is_nan() && want.is_nan()),
                        "{tier:?} nb={nb} {p:?} row {r}: {} vs {want}",
                        got[r]
                    );
                }
            }
        }
    }
}

/// A token count whose shape products overflow fails the prompt kernels' checks (a panic)
/// instead of wrapping into out-of-bounds stores (this once segfaulted).
#[test]
fn gemm16_shape_checks_do_not_wrap() {
    for tier in crate::kernels::Tier::available() {
        let Some(k) = quant_kernels_for(tier) else {
            continue;
        };
        let t = (1usize << 60) + 1; // 16·t wraps to 16
        if let Some(m4) = k.gemm16_q4_0 {
            let r = std::panic::catch_unwind(|| m4(&[], &[], &[], t, &mut [0f32; 16]));
            assert!(r.is_err(), "{tier:?} gemm16_q4_0");
        }
        if let Some(m8) = k.gemm16_q8_0 {
            let r = std::panic::catch_unwind(|| m8(&[], &[], &[], t, &mut [0f32; 16]));
            assert!(r.is_err(), "{tier:?} gemm16_q8_0");
        }
    }
}

#[test]
fn gemm16_equals_gemv16_per_token() {
    // Same operations per (row, token): bit-identical to the GEMV kernels.
    for tier in crate::kernels::Tier::available() {
        let Some(k) = quant_kernels_for(tier) else {
            continue;
        };
        let (Some(g4), Some(m4), Some(g8), Some(m8)) =
            (k.gemv16_q4_0, k.gemm16_q4_0, k.gemv16_q8_0, k.gemm16_q8_0)
        else {
            continue;
        };
        for nb in [1usize, 3, 64] {
            for t in [1usize, 2, 4, 5, 9] {
                let r4: Vec<Vec<BlockQ4_0>> = (0..16)
                    .map(|r| gen_q4(nb, Pattern::Random, (r + 100 * nb) as u32))
                    .collect();
                let r8: Vec<Vec<BlockQ8_0>> = (0..16)
                    .map(|r| gen_q8(nb, Pattern::Random, (r + 300 * nb) as u32))
                    .collect();
                let p4: Vec<BlockQ4_0x16> = (0..nb)
                    .map(|b| BlockQ4_0x16::pack(std::array::from_fn(|r| &r4[r][b])))
                    .collect();
                let p8: Vec<BlockQ8_0x16> = (0..nb)
                    .map(|b| BlockQ8_0x16::pack(std::array::from_fn(|r| &r8[r][b])))
                    .collect();
                let x: Vec<BlockQ8_0> = (0..t)
                    .flat_map(|j| gen_q8(nb, Pattern::Random, (7 * j + nb) as u32))
                    .collect();
                let sum = |m: i32| -> Vec<i32> {
                    x.iter()
                        .map(|b| m * b.qs.iter().map(|&v| v as i32).sum::<i32>())
                        .collect()
                };
                let (s8, s128) = (sum(8), sum(128));
                let (mut o4, mut o8) = (vec![0f32; 16 * t], vec![0f32; 16 * t]);
                m4(&p4, &x, &s8, t, &mut o4);
                m8(&p8, &x, &s128, t, &mut o8);
                for j in 0..t {
                    let (mut w4, mut w8) = ([0f32; 16], [0f32; 16]);
                    g4(&p4, &x[j * nb..(j + 1) * nb], &s8[j * nb..], &mut w4);
                    g8(&p8, &x[j * nb..(j + 1) * nb], &s128[j * nb..], &mut w8);
                    for i in 0..16 {
                        assert_eq!(
                            o4[16 * j + i].to_bits(),
                            w4[i].to_bits(),
                            "{tier:?} q4 nb={nb} t={t}"
                        );
                        assert_eq!(
                            o8[16 * j + i].to_bits(),
                            w8[i].to_bits(),
                            "{tier:?} q8 nb={nb} t={t}"
                        );
                    }
                }
            }
        }
    }
}

/// Whether two float slices hold the same bits, element for element.
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Planar rows for the down kernels: `n_rows` rows of `nb` blocks in pattern `p`, records
/// (`tiled == false`) or tiled.
fn gen_planar(
    n_rows: usize,
    nb: usize,
    p: Pattern,
    seed: u32,
    tiled: bool,
) -> (Planar<[u8; 16]>, Planar<[u8; 32]>) {
    let w4 = gen_q4(n_rows * nb, p, seed);
    let w8 = gen_q8(n_rows * nb, p, seed + 1);
    let [r4, t4] = geoms(n_rows, nb, 16);
    let [r8, t8] = geoms(n_rows, nb, 32);
    let (g4, g8) = if tiled { (t4, t8) } else { (r4, r8) };
    (
        Planar::from_blocks_in(&w4, n_rows, nb, g4),
        Planar::from_blocks_in(&w8, n_rows, nb, g8),
    )
}

/// Row lists and coefficients as the decode loop passes them: up to 32 rows (repeats allowed),
/// zeros among the coefficients, padded to a multiple of 4 with zero coefficients.
fn gen_rows(n_rows: usize, n: usize, zeros_pct: u32, r: &mut Rng) -> (Vec<u32>, Vec<f32>) {
    let mut rows: Vec<u32> = (0..n).map(|_| r.below(n_rows as u32)).collect();
    let mut a: Vec<f32> = (0..n)
        .map(|_| {
            if r.below(100) < zeros_pct {
                0.0
            } else {
                // ReLU²-like: non-negative, heavy tailed; a few negatives for generality
                let v = r.unit() * 3.0;
                if r.below(10) == 0 {
                    -v * v
                } else {
                    v * v
                }
            }
        })
        .collect();
    while !rows.len().is_multiple_of(4) {
        rows.push(rows.first().copied().unwrap_or(0));
        a.push(0.0);
    }
    (rows, a)
}

/// Both planar geometries of a `rows × nb` matrix with `qsz`-byte codes.
fn geoms(rows: usize, nb: usize, qsz: usize) -> [PlanarGeom; 2] {
    [
        PlanarGeom::records(rows, nb, qsz),
        PlanarGeom::tiled(rows, nb, qsz),
    ]
}

/// Every block of `p` lies in its own bytes, inside the buffer, and the runs the geometry
/// reports are consecutive in memory.
fn check_placement<Q: Pod>(p: &Planar<Q>) {
    let g = *p.geom();
    assert_eq!(g.bytes() % 64, 0);
    assert_eq!(p.bytes().len(), g.bytes());
    assert_eq!(p.bytes().as_ptr() as usize % 64, 0, "buffer line-aligned");
    let mut owner = vec![false; g.bytes()];
    let mut claim = |at: usize, len: usize, what: &str| {
        for o in &mut owner[at..at + len] {
            assert!(!*o, "{what}: byte {at} claimed twice ({g:?})");
            *o = true;
        }
    };
    for r in 0..g.rows {
        for b in 0..g.nb {
            claim(g.code_at(r, b), g.qsz, "codes");
            claim(g.scale_at(r, b), 2, "scale");
            assert_eq!(g.scale_at(r, b) % 2, 0);
            let (cr, sr) = (g.code_run(b), g.scale_run(b));
            assert!(cr >= 1 && b + cr <= g.nb && sr >= 1 && b + sr <= g.nb);
            for k in 1..cr {
                assert_eq!(g.code_at(r, b + k), g.code_at(r, b) + k * g.qsz);
            }
            for k in 1..sr {
                assert_eq!(g.scale_at(r, b + k), g.scale_at(r, b) + 2 * k);
            }
        }
        // a row's first code piece starts on a cache line (in a tiled matrix, where the
        // pieces are whole lines)
        if !g.is_tiled() || g.nb * g.qsz >= PLANAR_CHUNK_BYTES_GROUPS {
            assert_eq!(g.code_at(r, 0) % 64, 0, "{g:?} row {r}");
        }
    }
    assert_eq!(g.code_run(g.nb), 0);
}

#[test]
fn planar_round_trips_gguf_blocks() {
    // 70 rows: two full groups and a group of 6; 19 blocks: tiled Q4_0 chunks of 8, 8, 3, Q8_0
    // chunks of 4 × 4 and 3; scale tiles of 16 and 3; 64 and 65 blocks: one whole scale piece
    // and one more
    for (rows, nb) in [(70, 19), (40, 64), (33, 65), (5, 1)] {
        let w4 = gen_q4(rows * nb, Pattern::Random, 11);
        let w8 = gen_q8(rows * nb, Pattern::Extreme, 12);
        for (g4, g8) in geoms(rows, nb, 16).into_iter().zip(geoms(rows, nb, 32)) {
            let p4 = Planar::from_blocks_in(&w4, rows, nb, g4);
            let p8 = Planar::from_blocks_in(&w8, rows, nb, g8);
            check_placement(&p4);
            check_placement(&p8);
            for r in 0..rows {
                for b in 0..nb {
                    assert_eq!(
                        p4.block::<BlockQ4_0>(r, b),
                        w4[r * nb + b],
                        "{g4:?} {r} {b}"
                    );
                    assert_eq!(
                        p8.block::<BlockQ8_0>(r, b),
                        w8[r * nb + b],
                        "{g8:?} {r} {b}"
                    );
                }
            }
            match g4.kind {
                // a record: the row's codes, then its scales, the stride whole lines
                PlanarKind::Records { stride } => {
                    assert_eq!(stride, (nb * 18).div_ceil(64) * 64);
                    assert_eq!(g4.code_at(3, 0), 3 * stride);
                    assert_eq!(g4.scale_at(3, 0), 3 * stride + 16 * nb);
                    assert_eq!(g4.code_run(0), nb);
                }
                // tiled: a group's chunk is one 128-byte piece per row
                PlanarKind::Tiled { ch, .. } => {
                    assert_eq!(ch, 8);
                    if rows > 64 {
                        assert_eq!(g4.code_at(32 + 5, 0), 32 * nb * 16 + 5 * 8 * 16);
                    }
                    assert_eq!(g4.code_run(0), 8.min(nb));
                }
            }
        }
        // the process's default geometry follows its down layout
        let g = PlanarGeom::new(rows, nb, 16);
        assert_eq!(g.is_tiled(), down_layout() == DownLayout::Groups);
    }
}

#[test]
fn every_down_kernel_is_bit_identical_to_scalar() {
    let mut tested = 0;
    for k in tiers() {
        let (Some(d4), Some(d8)) = (k.down_q4_0, k.down_q8_0) else {
            continue;
        };
        tested += 1;
        for (pi, &p) in PATTERNS.iter().enumerate() {
            for (nb, tiled) in [0usize, 1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 64, 65, 96, 129]
                .into_iter()
                .flat_map(|nb| [(nb, false), (nb, true)])
            {
                let seed = (pi * 100 + nb) as u32 + 900_000;
                // 104 rows: three full groups and a partial group of 8 (rows 96..104); in a
                // tiled matrix a call takes rows from any full groups, or from the partial one
                // only; records mix them
                let nrows = 104;
                let (p4, p8) = gen_planar(nrows, nb, p, seed, tiled);
                let mut r = Rng::new(seed + 7);
                for (n, partial) in [
                    (1usize, false),
                    (4, true),
                    (5, false),
                    (16, false),
                    (29, true),
                    (32, false),
                ] {
                    // activations so small that 127 / max|a·d| overflows for some blocks
                    // (those add nothing), and a NaN activation in the second row (ignored by
                    // the maximum, coefficient 0: the other rows' sum is unchanged)
                    for (zeros, scale, nan) in [
                        (0u32, 1.0, false),
                        (50, 1.0, false),
                        (90, 1.0, false),
                        (100, 1.0, false),
                        (50, 1e-39, false),
                        (0, 1.0, true),
                    ] {
                        let (mut rows, mut a) = if !tiled && partial {
                            gen_rows(nrows, n, zeros, &mut r)
                        } else {
                            gen_rows(if partial { 8 } else { 96 }, n, zeros, &mut r)
                        };
                        a.iter_mut().for_each(|v| *v *= scale);
                        if let Some(v) = a.get_mut(1).filter(|_| nan) {
                            *v = f32::NAN;
                        }
                        if partial && tiled {
                            rows.iter_mut().for_each(|x| *x += 96);
                        }
                        // rows of any group size to prefetch for a following call
                        // (and one past the matrix, which the hint must ignore)
                        let mut next: Vec<u32> = (0..5).map(|i| (i * 37 % nrows) as u32).collect();
                        next.push(nrows as u32 + 3);
                        // y with one float in front (misaligned) and 3 behind (untouched)
                        let y0: Vec<f32> = (0..nb * 32 + 4).map(|_| r.unit()).collect();
                        let mut want4 = y0.clone();
                        scalar::down_q4_0(&p4, &rows, &a, &mut want4[1..nb * 32 + 1]);
                        let mut got4 = y0.clone();
                        d4(&p4, &rows, &a, &[], &mut got4[1..]);
                        // prefetching other rows (the next call's) changes nothing
                        let mut ahead4 = y0.clone();
                        d4(&p4, &rows, &a, &next, &mut ahead4[1..]);
                        // more next rows than a call holds (the per-tile bursts instead)
                        let many: Vec<u32> = (0..40).map(|i| (i * 7 % nrows) as u32).collect();
                        let mut burst4 = y0.clone();
                        d4(&p4, &rows, &a, &many, &mut burst4[1..]);
                        assert!(
                            same_bits(&burst4, &got4),
                            "{} down_q4_0 with 40 next rows",
                            k.tier_name
                        );
                        assert!(
                            same_bits(&ahead4, &got4),
                            "{} down_q4_0 with next rows",
                            k.tier_name
                        );
                        let same = same_bits(&got4, &want4);
                        assert!(
                            same,
                            "{} down_q4_0 {p:?} nb={nb} n={n} zeros={zeros} tiled={tiled}",
                            k.tier_name
                        );
                        let mut want8 = y0.clone();
                        scalar::down_q8_0(&p8, &rows, &a, &mut want8[1..nb * 32 + 1]);
                        let mut got8 = y0.clone();
                        d8(&p8, &rows, &a, &next, &mut got8[1..]);
                        let same = same_bits(&got8, &want8);
                        assert!(
                            same,
                            "{} down_q8_0 {p:?} nb={nb} n={n} zeros={zeros} tiled={tiled}",
                            k.tier_name
                        );
                    }
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512vbmi") && std::is_x86_feature_detected!("avx512vnni") {
        assert!(
            tested > 0,
            "this CPU has the planar down kernels; they must be tested"
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = tested; // no planar kernels on other architectures yet
}

/// The spec against the exact sum of the dequantized rows: each int8 coefficient is off by at
/// most half a step `s/2`, so `|err_j| ≤ s/2 · Σ_i |code_ij|` per block, plus f32 rounding.
/// Zero coefficients change nothing, bit for bit.
#[test]
fn down_spec_is_the_axpy_sum_within_coefficient_rounding() {
    let (n_rows, nb) = (32, 9); // one group: local row = row
    let mut r = Rng::new(4242);
    let w4 = gen_q4(n_rows * nb, Pattern::Random, 1);
    let w8 = gen_q8(n_rows * nb, Pattern::Random, 2);
    // finite, moderate scales so f32 rounding stays far below the coefficient bound
    let fix = |d: f16| f16::from_f32(d.to_f32().clamp(-4.0, 4.0));
    let w4: Vec<BlockQ4_0> = w4
        .into_iter()
        .map(|b| BlockQ4_0 { d: fix(b.d), ..b })
        .collect();
    let w8: Vec<BlockQ8_0> = w8
        .into_iter()
        .map(|b| BlockQ8_0 { d: fix(b.d), ..b })
        .collect();
    let (p4, p8) = (
        Planar::from_blocks(&w4, n_rows, nb),
        Planar::from_blocks(&w8, n_rows, nb),
    );
    for trial in 0..20 {
        let (rows, a) = gen_rows(n_rows, 32, 30, &mut r);
        for fmt in 0..2 {
            let mut y = vec![0f32; nb * 32];
            let mut exact = vec![0f64; nb * 32];
            let mut bound = vec![0f64; nb * 32];
            for b in 0..nb {
                let m = rows
                    .iter()
                    .zip(&a)
                    .map(|(&row, &ai)| {
                        let d = if fmt == 0 {
                            w4[row as usize * nb + b].d
                        } else {
                            w8[row as usize * nb + b].d
                        };
                        (ai * d.to_f32()).abs()
                    })
                    .fold(0f32, f32::max) as f64;
                for (&row, &ai) in rows.iter().zip(&a) {
                    let mut vals = [0f32; 32];
                    let blk = row as usize * nb + b;
                    if fmt == 0 {
                        dequantize_row_q4_0(&w4[blk..blk + 1], &mut vals).unwrap();
                    } else {
                        dequantize_row_q8_0(&w8[blk..blk + 1], &mut vals).unwrap();
                    }
                    let d = if fmt == 0 { w4[blk].d } else { w8[blk].d }.to_f32() as f64;
                    for j in 0..32 {
                        exact[32 * b + j] += ai as f64 * vals[j] as f64;
                        let code = if d != 0.0 {
                            (vals[j] as f64 / d).abs()
                        } else {
                            0.0
                        };
                        bound[32 * b + j] += (m / 127.0) * 0.5 * code;
                    }
                }
            }
            if fmt == 0 {
                scalar::down_q4_0(&p4, &rows, &a, &mut y);
            } else {
                scalar::down_q8_0(&p8, &rows, &a, &mut y);
            }
            for j in 0..nb * 32 {
                let err = (y[j] as f64 - exact[j]).abs();
                let tol = bound[j] * 1.0001 + 1e-5 * exact[j].abs() + 1e-6;
                assert!(
                    err <= tol,
                    "trial {trial} fmt {fmt} col {j}: {} vs {} (bound {tol})",
                    y[j],
                    exact[j]
                );
            }
            // zero-coefficient entries are free: dropping them gives the same bits
            let keep: Vec<usize> = (0..rows.len()).filter(|&i| a[i] != 0.0).collect();
            let rows2: Vec<u32> = keep.iter().map(|&i| rows[i]).collect();
            let a2: Vec<f32> = keep.iter().map(|&i| a[i]).collect();
            let mut y2 = vec![0f32; nb * 32];
            if fmt == 0 {
                scalar::down_q4_0(&p4, &rows2, &a2, &mut y2);
            } else {
                scalar::down_q8_0(&p8, &rows2, &a2, &mut y2);
            }
            assert!(
                y.iter().zip(&y2).all(|(p, q)| p.to_bits() == q.to_bits()),
                "zeros changed the result"
            );
        }
    }
}

/// Every tier's 16-row kernels give the same bits (the AVX2 ones emulate `vpdpbusd` exactly and
/// share the f32 steps), over every code pattern, -128 inputs and codes included.
#[test]
fn gemv16_and_gemm16_agree_across_tiers() {
    let kernels: Vec<(crate::kernels::Tier, QuantKernels)> = crate::kernels::Tier::available()
        .into_iter()
        .filter_map(|t| quant_kernels_for(t).map(|k| (t, k)))
        .filter(|(_, k)| k.gemv16_q4_0.is_some())
        .collect();
    for nb in [1usize, 2, 7, 64] {
        for (pi, &p) in PATTERNS.iter().enumerate() {
            let r4: Vec<Vec<BlockQ4_0>> = (0..16)
                .map(|r| gen_q4(nb, p, (nb * 13 + pi * 16 + r) as u32))
                .collect();
            let r8: Vec<Vec<BlockQ8_0>> = (0..16)
                .map(|r| gen_q8(nb, p, (nb * 17 + pi * 16 + r) as u32))
                .collect();
            let p4: Vec<BlockQ4_0x16> = (0..nb)
                .map(|b| BlockQ4_0x16::pack(std::array::from_fn(|r| &r4[r][b])))
                .collect();
            let p8: Vec<BlockQ8_0x16> = (0..nb)
                .map(|b| BlockQ8_0x16::pack(std::array::from_fn(|r| &r8[r][b])))
                .collect();
            let t = 5;
            let x: Vec<BlockQ8_0> = (0..t)
                .flat_map(|j| {
                    let q = if j % 2 == 0 { Pattern::Extreme } else { p };
                    gen_q8(nb, q, (29 * j + nb + pi) as u32)
                })
                .collect();
            let sum = |m: i32| -> Vec<i32> {
                x.iter()
                    .map(|b| m * b.qs.iter().map(|&v| v as i32).sum::<i32>())
                    .collect()
            };
            let (s8, s128) = (sum(8), sum(128));
            let outs: Vec<(Vec<u32>, Vec<u32>)> = kernels
                .iter()
                .map(|(_, k)| {
                    let (mut o4, mut o8) = (vec![0f32; 16 * t], vec![0f32; 16 * t]);
                    (k.gemm16_q4_0.expect("with gemv16"))(&p4, &x, &s8, t, &mut o4);
                    (k.gemm16_q8_0.expect("with gemv16"))(&p8, &x, &s128, t, &mut o8);
                    let (mut g4, mut g8) = ([0f32; 16], [0f32; 16]);
                    (k.gemv16_q4_0.expect("q4"))(&p4, &x[nb..2 * nb], &s8[nb..], &mut g4);
                    (k.gemv16_q8_0.expect("q8"))(&p8, &x[nb..2 * nb], &s128[nb..], &mut g8);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    let mut a = bits(&o4);
                    a.extend(bits(&g4));
                    let mut b = bits(&o8);
                    b.extend(bits(&g8));
                    (a, b)
                })
                .collect();
            for (i, o) in outs.iter().enumerate().skip(1) {
                assert_eq!(
                    o.0, outs[0].0,
                    "q4 {:?} vs {:?} nb={nb} {p:?}",
                    kernels[i].0, kernels[0].0
                );
                assert_eq!(
                    o.1, outs[0].1,
                    "q8 {:?} vs {:?} nb={nb} {p:?}",
                    kernels[i].0, kernels[0].0
                );
            }
        }
    }
    // Both x86 tiers run here on an AVX-512 VNNI machine; elsewhere the test has less to compare.
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512vnni") && std::is_x86_feature_detected!("avx2") {
        assert!(
            kernels.len() >= 2,
            "AVX2 and AVX-512 16-row kernels both present"
        );
    }
}
