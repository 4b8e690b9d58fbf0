//! GGUF/ggml-compatible quantized weight blocks (`Q8_0`, `Q4_0`), their quantizers and
//! dequantizers, and the integer dot-product / AXPY kernels of quantized GEMV, dispatched once
//! per process like `crate::kernels`.
//!
//! Owns: the block byte layouts, the reference quantizers, the scalar specification of every
//! quantized kernel (`scalar`) and its SIMD twins (`x86_avx2`, `x86_avx512`). Must not: know
//! about layers, heads or configs, allocate on the kernel path, or panic on lengths (mismatched
//! slices are truncated to the common prefix, exactly like the scalar spec does).
//!
//! # Block formats (byte-identical to ggml `block_q8_0` / `block_q4_0`, little-endian)
//! - `Q8_0`, 34 bytes per 32 weights: `d: f16` then `qs: [i8; 32]`; `w[j] = qs[j] · d`.
//! - `Q4_0`, 18 bytes per 32 weights: `d: f16` then `qs: [u8; 16]`; byte `j` holds weight `j` in
//!   its low nibble and weight `j + 16` in its high nibble; `w[j] = (nibble − 8) · d`.
//!
//! The quantizers follow ggml's reference (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`)
//! operation for operation, so a row quantized here has the same bytes as one quantized by ggml:
//! - Q8_0: `amax = max|x|`, `d = amax / 127`, `id = 1/d` (0 if d = 0), `q = roundf(x · id)`
//!   (round half away from zero), `d` stored as f16 (round to nearest even).
//! - Q4_0: `max` = the first element of largest magnitude, with its sign; `d = max / −8`,
//!   `id = 1/d`, `q = min(15, (i8)(x · id + 8.5))` (truncation toward zero).
//!
//! Non-finite inputs give unspecified (but memory-safe, panic-free) blocks, as in ggml.
//!
//! # Kernels and exactness across tiers
//! A GEMV quantizes its f32 input once with [`quantize_row_q8_0`], then calls a dot kernel per
//! weight row. The specification (`scalar`) of `vec_dot_*` is, for blocks `b = 0, 1, …`:
//! `sumi_b = Σ_j w_j · x_j` in i32 (exact: |sumi_b| ≤ 32·128·128), `p_b = (sumi_b as f32) ·
//! (d_w,b · d_x,b)`, `acc[b % 8] += p_b`, and at the end the fixed tree
//! `((acc0+acc4) + (acc2+acc6)) + ((acc1+acc5) + (acc3+acc7))`. Eight interleaved partial sums
//! (not one running sum) let the SIMD tiers keep eight blocks in the eight f32 lanes of a
//! `__m256` and still perform the *same* f32 operations in the *same* order: every tier is
//! bit-identical to scalar, for all inputs including `−128` codes (tested with `to_bits()`).
//! The AXPY spec is `s = a · d_b`, `y[32b + j] += s · (q_j as f32)` (separate multiply and add,
//! never fused), which the SIMD tiers also reproduce bit for bit.
//!
//! How the integer part stays exact on x86 (all inputs, no precondition on the codes):
//! - AVX2 Q8_0·Q8_0: sign-extend both operands to i16 and `vpmaddwd` (no saturation possible).
//!   The ggml sign trick (`maddubs(|w|, sign(x, w))`) wraps when `x = −128` and `w < 0`.
//! - AVX2 Q4_0·Q8_0: `maddubs(q, x) − maddubs(8, x)` with `q ∈ 0..15` unsigned: each i16 pair
//!   is at most 2·15·128 in magnitude, so neither `maddubs` saturates.
//! - AVX-512 VNNI Q8_0·Q8_0: offset trick, `dpbusd(w ⊕ 0x80, x) − dpbusd(0x80, x)` =
//!   `Σ (w+128)·x − 128·Σ x`; `dpbusd` does not saturate.
//! - AVX-512 VNNI Q4_0·Q8_0: `dpbusd(q, x) − dpbusd(8, x)`.
//!
//! # PERF NOTES
//! Single thread, `cargo bench -p sparselm-core --bench quant -- --quick`, AMD EPYC (Zen 4
//! class) VM shared with other jobs (load 3-9 on 2 vCPUs), so read ±15 %. Thread CPU time, not
//! wall time (wall time under that load halved every number). GB/s = weight-block bytes / s.
//! - GEMV 8192×2048 (incl. quantizing x): Q8_0 scalar 6.6, avx2 21.6, avx512vnni 21.6 GB/s;
//!   Q4_0 scalar 2.8, avx2 12.2, avx512vnni 13.5. bf16 baseline (`kernels`): avx2 19.2 GB/s,
//!   i.e. Q8_0 moves ~1.8× fewer bytes at the same GB/s, Q4_0 ~3.4× fewer at 0.65× the GB/s.
//!   151936×2048 (330 MB, DRAM): Q8_0 19.2, Q4_0 11.7 GB/s. Q4_0 is compute-bound: its time
//!   per block equals Q8_0's (the per-8-block overhead below dominates both).
//! - Per-block i32 sums of 8 blocks are transposed into one `__m256i` (hadd tree; on AVX-512
//!   Q8_0 two blocks per `zmm` and a 3-level shuffle tree) so the f32 part is one cvt, one mul
//!   and one add per 8 blocks. A single running f32 sum in block order would serialise on add
//!   latency; ggml's per-lane float accumulation is faster still but not bit-identical.
//! - Block scales: 8 `vpinsrw` + `vcvtph2ps` per 8 blocks (~30 instructions, a third of the Q8_0
//!   loop). Tried `vpgatherdd` + `vpshufb`/`vpermq`: slower on Zen 4 (16.6 vs 21.4 GB/s in L2),
//!   dropped. The activation scales are re-widened for every row because the kernel signature
//!   takes blocks only; an activation type carrying f32 scales (and Σx for the Q4_0 / offset
//!   correction) is the next step if the kernels ever become the bottleneck.
//! - AVX-512 Q4_0 two-blocks-per-`zmm` (like Q8_0): 10.7 GB/s vs 12.2 for AVX2 (double-pumped
//!   512-bit shuffles on Zen 4); replaced by 256-bit `vpdpbusd`: 13.5 GB/s, kept. Q8_0 keeps the
//!   `zmm` layout (equal to AVX2 on Zen 4, expected ahead on cores with full-width AVX-512).
//! - A 4-row Q4_0 dot (input loads, `8·Σx` and input scales shared by 4 rows, bit-identical):
//!   13.3 vs 12.6 GB/s in L3 but 6.0 vs 12.5 GB/s on the 151936×2048 lm_head from DRAM (four
//!   interleaved row streams defeat the prefetcher); dropped.
//! - 16-row interleaved GEMV (`BlockQ4_0x16` / `BlockQ8_0x16`, AVX-512 VNNI): one 64-byte
//!   load per `vpdpbusd` covers 16 rows, the input's 4-byte groups are broadcast, no
//!   horizontal sums or per-block scale gathers. 8192×2048 in L3, 2 threads: Q8_0 46 → 117 GB/s,
//!   Q4_0 25 → 84; 151936×2048 from DRAM: Q4_0 19 → 28-36 GB/s (machine noise ±20 %), Q8_0
//!   ≈ 30-37 either way (DRAM-bound). 1 thread from DRAM: Q8_0 20 → 29, Q4_0 12 → 28 GB/s.
//!   Software prefetch 2/4/8 blocks ahead: no measurable change, dropped. Per-row float order
//!   is a running FMA (not the 8-lane order of `vec_dot_*`): equal to rounding, not bits.
//! - Not tried: ggml's sign trick for AVX2 Q8_0 (`maddubs(|w|, sign(x, w))`, ~3 fewer ops per
//!   block) because it is wrong for `x = −128, w < 0`.
//! - Activation quantizer: scalar 1.5 GB/s of f32 in (a serial `maxss` chain and a scalar
//!   rounding loop), AVX2 12.9 GB/s: 2048 values in 0.63 µs instead of 5.4 µs (it was 20 % of
//!   an in-L2 256×2048 GEMV). amax over 8 running maxima (same value for non-NaN input).
//! - Sparse down (rows of W_downᵀ 8192×2048, zero activations skipped): Q8_0 avx2 1.29 ms dense
//!   → 0.17 ms at 90 % zeros → 0.016 ms at 99 %; Q4_0 about the same times (AXPY is bound by
//!   the y loads/stores and int→float converts, not by weight bytes). Random zero patterns cost
//!   more per active row than dense (prefetch restarts): 50 % zeros is 0.6-0.75× of dense time,
//!   not 0.5×. An AXPY over 4 rows at once (one pass over y, same f32 order) would cut that.
//! - Q4_0 weight quantizer (loads): scalar → AVX2 (max |x| by vector, the first lane equal to it
//!   from a movemask, codes clamped in float then truncated): PLM-1.8B q4_0 load from a bf16
//!   checkpoint 5.2-5.5 → 4.0-4.1 s wall (2 threads; the scalar quantizer was a third of the
//!   load's CPU time, page faults of the new buffers are most of the rest).
//! - Planar int8 down kernel (`down_q4_0` / `down_q8_0`, AVX-512 VNNI + VBMI): a decode profile
//!   of PLM-1.8B q4_0 with sparsity off had the f32 AXPY of W_downᵀ rows at 44 % of the time
//!   for 30 % of the bytes (13 GB/s against 38 GB/s for the 16-row GEMV of the other matrices).
//!   The kernel quantizes each block's coefficients `a_i·d_i` of a 32-row group to int8 and
//!   sums four rows per `vpdpbusd`. `examples/down_probe` (8192×2048, 32 distinct matrices so
//!   rows come from DRAM, 2 threads, ±20 % machine noise), f32 AXPY → planar kernel:
//!   - first version, rows `[rows][nb]` contiguous, one block per step: in L2 2.0× faster, from
//!     DRAM no faster (0.8-1.0×): 32 rows read 64 bytes at a time defeat the prefetchers, and one
//!     `vpdpbusd` chain per block was latency-bound;
//!   - groups tiled so a dense group is read front to back, 4 blocks per step (8 accumulators):
//!     0 % zeros Q4_0 0.63-0.85 → 0.35-0.54 ms, Q8_0 0.84-0.90 → 0.59-0.75;
//!   - sparse groups: reading only the active rows was 0.5× the AXPY at 90 % zeros without
//!     prefetch; prefetching the next rows into L1 did not help (the prefetches outnumber the
//!     L1 miss buffers), into L2 did. Prefetching dense groups cost up to 40 %, so groups with
//!     ≥ 12 active rows (`tensor::DOWN_DENSE_AT`) are read whole, without prefetch.
//!   - one call per sparse group left 90-99 % zeros at 0.4-0.8× the AXPY (per call the
//!     coefficient pass and the y updates of all 64 blocks cost as much as a few rows); pooling
//!     the active rows of sparse groups 32 per call: 90 % zeros Q4_0 0.19-0.21 → 0.09-0.15 ms,
//!     Q8_0 0.20-0.31 → 0.12-0.25; 99 % zeros 1.2-2.2× faster than the AXPY.
//!   - 8-block steps for Q4_0 (both lines of a row's 128-byte piece in one pass, 16
//!     accumulators) instead of two passes of 4 blocks: down / up time in decode 1.7-1.9 →
//!     1.3-1.6 (same run each).
//!   - Precision (bundled model, teacher-forced absorbed decode over 1008 tokens vs the f32
//!     model): f32 AXPY → int8 kernel, q8_0 top-1 99.31 → 99.21 %, ppl 57.702 → 57.709 (f32
//!     57.711); q4_0 91.17 → 91.37 %, 58.274 → 58.245. The Q8_0 activations of every other
//!     GEMV already cost more than the int8 coefficients.
//!   - Intel Xeon with AMX (stop 17; the L2 streamer stops at each 4 KiB page): with 128-byte
//!     code pieces 4 KiB apart, 90 % zeros took 3.2-3.7× (Q8_0) and 2.7-3.5× (Q4_0) less time
//!     than the dense GEMV of W_down, short of the 5× target; a profile of the Q4_0 run had
//!     52 % of the kernel's samples on its `prefetcht1`s (the 16 L1 miss buffers full) and
//!     the worker thread idle 5-10 %. Whole-row code pieces for Q8_0 (2 KiB) and 128-byte
//!     scale pieces: 5.2-6.0×, dense groups unchanged; for Q4_0 (1 KiB) 3.5-4.0× but dense
//!     groups 0.6 → 0.43× of the GEMV. Pooling the active rows of every group (never
//!     reading a group whole) at 50 % zeros: Q8_0 0.63-0.67× → 1.13-1.16× of the dense
//!     GEMV's speed, Q4_0 0.56-0.59× → 0.74-0.77×, and with whole-row Q4_0 pieces 0.93-1.09×
//!     (90 % zeros 3.78-3.96×). Whole rows and pooling are `DownLayout::Rows`, the default
//!     on Intel only (see [`Planar`]). Q4_0 high nibbles summed in place (one shift
//!     fewer per register): 90 % zeros 2.9-3.4× → 3.4-3.6×.
//!   - Stop 18, same Xeon kind. A pointer chase over 1 GiB on 2 MiB pages: 184-191 ns per
//!     hop to random lines, 152 ns within one 2 MiB page, 51 ns within one 4 KiB page; a
//!     pure read of random 1152-byte rows (`examples/rows_probe`, 90 % skipped) took 79-105
//!     µs per layer-equivalent, so with 16 L1 miss buffers per core the Q4_0 down at 90 %
//!     zeros (819 rows of 18 lines) has a floor near 5× the dense GEMV's time in a fast
//!     phase and below it in a slow one. Changes: in the rows layout the next call's rows are
//!     prefetched as one even stream inside the inner loop (`RowStream`, a few lines per step,
//!     in runs of one tile's lines) instead of a burst per tile; the Q4_0 kernel sums whole
//!     code bytes and the high nibbles (their difference is the low-nibble sum: one AND fewer
//!     per register); the coefficient pass keeps `a·d` instead of converting the scales twice;
//!     the rows layout's `DownPlan` cuts the sorted list (3.5 → 0.2 µs per projection). 90 %
//!     zeros, `bw_probe DOWN=1`, 9 lines per side in alternated process pairs against the
//!     stop-17 build, medians of three runs: Q4_0 3.85× → 4.31×, 4.50× → 4.81× (sparse time
//!     130 → 123 µs) and 4.23× → 4.35×, still short of 5×; Q8_0 5.34× → 5.70×, 5.52× → 5.76×
//!     and 5.40× → 5.69×. In-process order A/B (Q4_0, µs per layer):
//!     tile runs 119-124, whole rows one after another 127-137, per-tile bursts 129-147;
//!     single-line runs slower, 2- or 8-line runs equal within noise. Prefetch every 2nd or
//!     4th line only (leaving the rest to the hardware): 2× slower. In-cache compute
//!     (`examples/kern_probe`) differs by less than this machine's noise between builds.
//!   - Stop 19, same Xeon kind. (1) Records: in the rows layout a row is one record, its codes
//!     then its scales (Q4_0 1024 + 128 bytes, 18 lines) instead of codes and scales in two
//!     arrays (`PlanarGeom`). (2) Spans: the plan's units are cut into fixed spans (1, 1, 2,
//!     4, … units from the end), one partial each, claimed by the threads as they go, the next
//!     span claimed before the last unit of the current one so that its first rows are
//!     prefetched by that call. Timestamps in the two tasks had shown the second thread
//!     ending 4 µs after the first in a fast phase and 40-50 µs after it in a slow one (a
//!     90 µs projection): the other vCPU is slowed at times. (3) The team's published words
//!     on their own cache lines (an empty region 1.7 → 1.4 µs). 90 % zeros, `bw_probe DOWN=1`
//!     against the stop-18 build, 9 lines per side in alternated process pairs, medians of
//!     three runs: Q4_0 4.26× → 4.74×, 4.44× → 4.59×, 4.20× → 4.61× (sparse 103-119 →
//!     101-113 µs), still short of 5×; Q8_0 4.98× → 6.10×, 4.56× → 6.03×, 5.09× → 5.77×.
//!     Records alone (before spans), 9 lines each: Q4_0 4.2× → 4.35×.
//!     Measured and dropped (in-process or alternated A/B, 90 % zeros, Q4_0 µs per layer):
//!     a record's scale lines prefetched first (144 against 117) and a record laid out as
//!     segments of a scale line and its 32 blocks (109 against 94): the stream in ascending
//!     address order with the scale lines last was best both times; records padded so that
//!     none straddles a 4 KiB page (130 against 118); prefetching only a row's first 2 or 4
//!     lines (160-171 against 102-117); front-loading the stream 1.5-3× faster than even
//!     (equal or slower); the last 32 or 64 rows of a plan in 16-row units (equal within
//!     noise). The floor: with the kernel's main loop reduced to its loads and prefetches
//!     (no shuffles or dot products) a layer took 92 against 96 µs, so the compute costs
//!     about 5 %; the rest is the rate of random 18-line rows through 16 miss buffers per
//!     core. Per-line cost is lower for Q8_0's 34-line rows (5.2 against 7.0 ns per line
//!     on 2 threads), which the record layout cannot change for Q4_0. Against a pure read
//!     of such rows (`examples/rows_probe ROW_BYTES=1152 ZEROS=90 DIST=4`, alternated, 3
//!     pairs): 82-98 µs per layer for the read, 94-115 for the kernel; per layer each thread
//!     waits 6 µs for its first 32 rows, computes its last call for 3 µs with nothing left
//!     to fetch, and dispatch takes 1-2 µs (timestamps in the tasks).
//!   - Stop 20, same Xeon kind, measured and dropped (Q4_0, 90 % zeros, `bw_probe DOWN=1`,
//!     modes alternated line by line in one process, medians of 9-16 lines, µs per layer):
//!     the stream's hint NTA instead of T1, 343 against 120 (the lines leave L1 before the
//!     next call reads them); T2 and T0, equal to T1 within noise; rows-layout units of 8,
//!     16 or 24 rows instead of 32, 140, 117 and 105 against 102 (about 1.1 µs of thread
//!     time per extra kernel call); two 32-row units per kernel call, one stream over the 64
//!     rows of the next call (same bits), 145 against 110; the stream in the order the next
//!     call consumes it (a scale line, then the two tiles it scales), 128 against 116. The
//!     arithmetic of the floor: 819 rows of 18 lines are 14,742 lines; with 16 L1 miss
//!     buffers per core and 150-190 ns per line (the pointer chase above), 2 threads need
//!     69-88 µs with every buffer busy all the time; the pure read of such rows measured
//!     82-98 µs, the kernel 85-100 µs in the same phases, against a dense GEMV of W_down of
//!     430-520 µs.
//!   - Stop 21, same Xeon kind, measured and dropped. (1) A trigger for the L2 streamer: the
//!     first 1, 2 or 4 lines of each row of the call after next, spread through the stream
//!     (or as a burst before each call), so that the hardware could fetch the rest of those
//!     rows before the stream asks for them. In a pure read (`rows_probe`, rows read one after
//!     another, each line's prefetch 4 rows ahead, the first 2 lines 16 rows ahead) it was
//!     6-7 % faster in a quiet phase (1.70 against 1.83, 1.84 against 1.96 ms per 32 layers),
//!     but in the kernel (`bw_probe DOWN=1`, modes alternated line by line, 8 lines each,
//!     medians) 2 lines 89 against 88 µs, 1 line 80 against 76, 4 lines 74.5 against 76, and
//!     the burst 92 against 88: no gain. (2) The kernel's read order costs nothing in a pure
//!     read: 32-row units read in runs of 4 lines across the rows (the kernel's tile order),
//!     or 4 rows at a time, or row after row, each line prefetching the next unit's line in
//!     the same order, took 2.00 / 2.11 / 2.57 and 2.41 / 2.44 / 2.67 ms per 32 layers
//!     against 2.19 ms (twice) for rows one after another 4 rows ahead; that read's prefetch
//!     distance matters a little (2-8 rows 2.13-2.23 ms, 16-32 rows 2.55-2.61). The kernel
//!     in the same quiet phase: medians of 76-89 µs per layer (2.4-2.8 ms per 32 layers),
//!     4.9-5.3× the dense GEMV; so about 15-30 % above the pure read of its rows.
//!   - Stop 22, same Xeon kind, no kernel change; the measurement was corrected. `bw_probe` used
//!     one evenly spread hash mask for every layer and line (each 32-row group held 2-5 active
//!     rows) and left out the model's sum of the span partials; it now draws a fresh uniformly
//!     random set per layer and line and times `Matrix::sparse_down` (partials included). The
//!     criterion DRAM bench reused one mask, so its rows stayed in L3 while the dense side came
//!     from DRAM; it now also draws fresh sets and flushes L3 before each timed batch. Q4_0 at 90 %
//!     zeros: old masks 5.28× / 5.40× / 5.00× / 5.26× (medians of 6 lines, dense 427-584 µs); new
//!     masks in a slow phase (reads 11-16 GB/s) 5.16× / 5.47× / 5.13× (lines 4.26-5.85×; 94-137 µs
//!     against 476-707 µs), in a fast one (dense 380-413 µs) 4.50-4.92× (77-91 µs); criterion 4.3×
//!     and 3.6× (97 and 111 against 421 and 406 µs). Q8_0 5.8-7.4× (bw_probe lines), 5.2×
//!     (criterion: 138 against 714 µs). The ratio falls when the machine's bandwidth rises: the
//!     dense GEMV speeds up with it, the sparse rows (latency-bound) do not.

use std::sync::OnceLock;

use half::f16;

use crate::error::{Error, Result};
use crate::kernels::{kernels, Tier};

#[cfg(target_arch = "aarch64")]
mod aarch64_neon;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;

#[cfg(test)]
mod tests;

/// Weights per Q8_0 block (ggml `QK8_0`).
pub const QK8_0: usize = 32;
/// Weights per Q4_0 block (ggml `QK4_0`).
pub const QK4_0: usize = 32;

/// ggml `block_q8_0`: 32 signed 8-bit codes sharing one f16 scale. 34 bytes, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct BlockQ8_0 {
    /// Scale (IEEE half).
    pub d: f16,
    /// Codes; weight `j` is `qs[j] · d`.
    pub qs: [i8; QK8_0],
}

/// ggml `block_q4_0`: 32 unsigned 4-bit codes (offset 8) sharing one f16 scale. 18 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct BlockQ4_0 {
    /// Scale (IEEE half).
    pub d: f16,
    /// Byte `j`: weight `j` in the low nibble, weight `j + 16` in the high nibble.
    pub qs: [u8; QK4_0 / 2],
}

/// Block `b` of 16 consecutive Q4_0 rows, interleaved for the 16-row GEMV kernel (an in-memory
/// layout only; files stay GGUF Q4_0). Same 18 bytes per row-block:
/// `d[i]` is row i's scale and `qs[g][4i..4i + 4]` are bytes `4g..4g + 4` of row i's codes,
/// so one 64-byte load holds codes `4g..4g+4` (low nibbles) and `16+4g..16+4g+4` (high
/// nibbles) of all 16 rows, one row per 32-bit lane (the `vpdpbusd` layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_0x16 {
    pub d: [f16; 16],
    pub qs: [[u8; 64]; 4],
}

impl Default for BlockQ4_0x16 {
    fn default() -> Self {
        BlockQ4_0x16 {
            d: [f16::ZERO; 16],
            qs: [[0; 64]; 4],
        }
    }
}

impl BlockQ4_0x16 {
    /// Interleave block b of 16 rows.
    pub fn pack(rows: [&BlockQ4_0; 16]) -> BlockQ4_0x16 {
        let mut out = BlockQ4_0x16::default();
        for (i, r) in rows.iter().enumerate() {
            out.d[i] = r.d;
            for g in 0..4 {
                out.qs[g][4 * i..4 * i + 4].copy_from_slice(&r.qs[4 * g..4 * g + 4]);
            }
        }
        out
    }

    /// Row `i`'s block, in GGUF layout.
    pub fn row(&self, i: usize) -> BlockQ4_0 {
        let mut b = BlockQ4_0 {
            d: self.d[i],
            qs: [0; 16],
        };
        for g in 0..4 {
            b.qs[4 * g..4 * g + 4].copy_from_slice(&self.qs[g][4 * i..4 * i + 4]);
        }
        b
    }
}

/// A block of 16 interleaved rows that can give back one row's block in GGUF layout.
pub trait Interleaved16: Copy {
    type Row: Copy;
    fn row(&self, i: usize) -> Self::Row;
}

impl Interleaved16 for BlockQ4_0x16 {
    type Row = BlockQ4_0;
    fn row(&self, i: usize) -> BlockQ4_0 {
        BlockQ4_0x16::row(self, i)
    }
}

impl Interleaved16 for BlockQ8_0x16 {
    type Row = BlockQ8_0;
    fn row(&self, i: usize) -> BlockQ8_0 {
        BlockQ8_0x16::row(self, i)
    }
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0x16>() == 16 * 18);

/// Block `b` of 16 consecutive Q8_0 rows interleaved for the 16-row GEMV kernel, like
/// [`BlockQ4_0x16`]: `qs[g][4i..4i + 4]` are codes `4g..4g + 4` of row i stored as `code + 128`
/// (unsigned, the `vpdpbusd` operand), `d[i]` row i's scale. 34 bytes per row-block.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0x16 {
    pub d: [f16; 16],
    pub qs: [[u8; 64]; 8],
}

impl Default for BlockQ8_0x16 {
    fn default() -> Self {
        BlockQ8_0x16 {
            d: [f16::ZERO; 16],
            qs: [[0; 64]; 8],
        }
    }
}

impl BlockQ8_0x16 {
    /// Interleave block b of 16 rows.
    pub fn pack(rows: [&BlockQ8_0; 16]) -> BlockQ8_0x16 {
        let mut out = BlockQ8_0x16::default();
        for (i, r) in rows.iter().enumerate() {
            out.d[i] = r.d;
            for g in 0..8 {
                for k in 0..4 {
                    out.qs[g][4 * i + k] = (r.qs[4 * g + k] as u8) ^ 0x80;
                }
            }
        }
        out
    }

    /// Row `i`'s block, in GGUF layout.
    pub fn row(&self, i: usize) -> BlockQ8_0 {
        let mut b = BlockQ8_0 {
            d: self.d[i],
            qs: [0; 32],
        };
        for g in 0..8 {
            for k in 0..4 {
                b.qs[4 * g + k] = (self.qs[g][4 * i + k] ^ 0x80) as i8;
            }
        }
        b
    }
}

/// Rows per group of the planar layout (and per call of the down kernels).
pub const PLANAR_GROUP: usize = 32;
/// Bytes of one row's codes per chunk of the tiled planar layout ([`DownLayout::Groups`]; two
/// cache lines: 8 Q4_0 or 4 Q8_0 blocks). In [`DownLayout::Rows`] a row is one record.
pub const PLANAR_CHUNK_BYTES_GROUPS: usize = 128;

/// How the decode down projection stores and reads quantized `W_downᵀ` (see [`Planar`] and
/// `tensor::DownPlan`), fixed once per process: `SPARSELM_DOWN_LAYOUT=rows|groups`, by default
/// `rows` on Intel CPUs and `groups` elsewhere (PERF NOTES).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownLayout {
    /// Rows as one piece of codes each (Q8_0 2 KiB, Q4_0 1 KiB at PLM-1.8B's width); only the
    /// active rows of every group are read (pooled 32 per kernel call). Measured best on an
    /// Intel Xeon, whose L2 streamer stops at each 4 KiB page.
    Rows,
    /// 128-byte code pieces for both formats; a group with at least `tensor::DOWN_DENSE_AT`
    /// active rows is read whole, front to back. Measured best on an AMD Zen 4 (there with
    /// scale pieces of 32 blocks; both layouts now use [`PLANAR_SCALE_LINE`] = 64, which was
    /// measured on the Intel Xeon only).
    Groups,
}

impl DownLayout {
    /// The name used by `SPARSELM_DOWN_LAYOUT` and reported by `sparselm.down_layout()`.
    pub fn name(self) -> &'static str {
        match self {
            DownLayout::Rows => "rows",
            DownLayout::Groups => "groups",
        }
    }
}

/// Whether Q8_0/Q4_0 matrices read by GEMV are interleaved 16 rows at a time where this CPU has
/// the 16-row kernels (read once): on unless `SPARSELM_INTERLEAVE=0`, which keeps the GGUF row
/// order and the per-row dot kernels, whose arithmetic every tier shares bit for bit (the
/// x86-64 side of `.ci/arm64.sh`'s check that aarch64 output equals x86-64 output).
pub fn interleave_enabled() -> bool {
    static I: OnceLock<bool> = OnceLock::new();
    *I.get_or_init(|| match std::env::var("SPARSELM_INTERLEAVE") {
        Err(_) => true,
        Ok(v) => match v.trim() {
            "" | "1" => true,
            "0" => false,
            _ => {
                eprintln!("sparselm: SPARSELM_INTERLEAVE={v} is not 0 or 1; using the default (1)");
                true
            }
        },
    })
}

/// The process's [`DownLayout`] (read once).
pub fn down_layout() -> DownLayout {
    static L: OnceLock<DownLayout> = OnceLock::new();
    *L.get_or_init(|| {
        if let Ok(v) = std::env::var("SPARSELM_DOWN_LAYOUT") {
            match v.trim() {
                "rows" => return DownLayout::Rows,
                "groups" => return DownLayout::Groups,
                _ => eprintln!(
                    "sparselm: SPARSELM_DOWN_LAYOUT={v} is not 'rows' or 'groups'; using the default"
                ),
            }
        }
        if crate::kernels::cpu_vendor_is_intel() {
            DownLayout::Rows
        } else {
            DownLayout::Groups
        }
    })
}
/// Blocks per scale tile of the planar layout (one 16-lane vector of scales per row).
pub const PLANAR_TILE: usize = 16;
/// Blocks per stored piece of a row's scales in the tiled planar layout: two cache lines of
/// f16 scales (four coefficient tiles), so a sparse row's scales are `nb / 64` runs of 128
/// bytes there (a record keeps all of them in one run after its codes).
pub const PLANAR_SCALE_LINE: usize = 64;

/// One cache line, the allocation unit of [`Aligned`].
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Plain data for which every bit pattern (and all-zero) is a valid value.
///
/// # Safety
/// Implementors have no padding, no invalid bit patterns and alignment at most 64.
pub unsafe trait Pod: Copy + Send + Sync + 'static {}
// SAFETY: integers / IEEE halves and arrays of them: any bits are valid, no padding.
unsafe impl Pod for f16 {}
// SAFETY: as above.
unsafe impl Pod for u8 {}
// SAFETY: as above.
unsafe impl<const N: usize> Pod for [u8; N] {}

/// A fixed-length buffer of `T` starting on a 64-byte boundary (cache-line aligned pieces).
pub struct Aligned<T: Pod> {
    buf: Vec<Line>,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: Pod> Aligned<T> {
    /// `len` zeroed elements. Panics if their size overflows `usize` (or the allocation
    /// fails), never hands out a slice longer than its buffer.
    pub fn zeroed(len: usize) -> Self {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .unwrap_or_else(|| {
                panic!("Aligned::zeroed: {len} elements overflow the address space")
            });
        Aligned {
            buf: vec![Line([0; 64]); bytes.div_ceil(64)],
            len,
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: Pod> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the buffer holds at least len·size_of::<T>() initialised bytes, aligned to
        // 64 ≥ align_of::<T>() (Pod), and every bit pattern is a valid T.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr() as *const T, self.len) }
    }
}

impl<T: Pod> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in deref; the borrow is unique.
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr() as *mut T, self.len) }
    }
}

impl<T: Pod> Clone for Aligned<T> {
    fn clone(&self) -> Self {
        Aligned {
            buf: self.buf.clone(),
            len: self.len,
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: Pod> std::fmt::Debug for Aligned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Aligned<{}>[{}]", std::any::type_name::<T>(), self.len)
    }
}

/// Quantized rows with block scales and codes split apart ("planar"), in one 64-byte aligned
/// buffer: the layout of the decode down projection's int8 kernels (`down_q4_0` /
/// `down_q8_0`). An in-memory layout only, with the same values (and, for Q4_0, the same
/// bytes) as the GGUF blocks, which [`Planar::block`] gives back. Where each block's scale and
/// codes lie is the [`PlanarGeom`], one of two kinds chosen by the process's [`DownLayout`]:
///
/// - [`PlanarKind::Records`] ([`DownLayout::Rows`]): row `r` is one record at `r · stride`
///   bytes: its `nb` code blocks, then its `nb` f16 scales, padded to whole cache lines. At
///   PLM-1.8B's width a Q4_0 row of `W_downᵀ` is 1024 + 128 = 1152 bytes (18 lines), a Q8_0
///   row 2048 + 128 = 2176 (34 lines): a sparse row is one contiguous run of lines.
/// - [`PlanarKind::Tiled`] ([`DownLayout::Groups`]): codes first, then (from the next line)
///   scales, each tiled by groups of [`PLANAR_GROUP`] rows. Group `g` (rows `32g..32g + gr`,
///   `gr = min(32, rows − 32g)`) occupies entries `32g·nb .. 32g·nb + gr·nb` of both regions.
///   Inside it, codes are stored by chunks of `ch` blocks ([`PLANAR_CHUNK_BYTES_GROUPS`]: 128 bytes, 8
///   Q4_0 or 4 Q8_0 blocks; chunk `c = b / ch` has width `wc = min(ch, nb − ch·c)`), all rows
///   of the group per chunk: `[gr·ch·c + li·wc + b % ch]` for local row `li`; scales by pieces
///   of 64 blocks the same way: `[gr·64·t + li·wt + b % 64]` (`t = b / 64`). So a dense pass
///   over a group reads both regions front to back.
///
/// Piece sizes, measured (`examples/bw_probe DOWN=1`, 32 W_downᵀ 8192×2048 from DRAM,
/// 2 threads, sparse time against the dense GEMV of W_down in the same line; Intel Xeon with
/// AMX, stop 17): on Intel the L2 streamer stops at every 4 KiB page, and 128-byte code pieces
/// 4 KiB apart left each sparse row to demand misses and the 16 L1 miss buffers (a profile
/// had half the kernel's time on its `prefetcht1`s). Q8_0 rows as one 2 KiB piece with their
/// scales as one 128-byte piece: 90 % zeros 3.2-3.7× → 5.2-6.0× faster than the dense GEMV,
/// 0 % / 50 % zeros unchanged (0.55-0.62× of it). Q4_0 rows as one 1 KiB piece: 90 % zeros
/// 2.7-3.5× → 3.5-4.0×, but groups read whole (0 % / 50 % zeros) 0.6× → 0.43-0.46× of the
/// GEMV (a dense group is then 32 interleaved row streams). 512-byte pieces were no better
/// than 128 for either. Reading only the active rows of every group (pooled) instead of
/// reading groups with ≥ 12 active rows whole, at 50 % zeros: Q8_0 0.63-0.67× → 1.13-1.16×
/// of the dense GEMV's speed, Q4_0 (128-byte pieces) 0.56-0.59× → 0.74-0.77× (0 % zeros
/// unchanged); pooled, whole-row Q4_0 pieces are better again: 90 % zeros 3.30-3.38× →
/// 3.78-3.96×, 50 % 0.75-0.81× → 0.93-1.09×, 0 % 0.49-0.50× → 0.50-0.54× (2 alternated
/// pairs). All of this makes [`DownLayout::Rows`], the default on Intel. Stop 19: its rows
/// became records (scales right after the codes instead of in a second array; PERF NOTES).
/// On the Zen 4 whole-row pieces had made dense groups 1.1-2.4× slower and pooling half-full
/// groups was slower (kernels/mod.rs PERF NOTES), so other CPUs keep [`DownLayout::Groups`].
/// Scale pieces of 16 blocks (half a line) had measured 8-15 % slower at 90 % zeros than 32
/// on the Zen 4.
#[derive(Debug, Clone)]
pub struct Planar<Q: Pod> {
    /// Rows and blocks per row.
    pub rows: usize,
    pub nb: usize,
    geom: PlanarGeom,
    buf: Aligned<u8>,
    _q: std::marker::PhantomData<Q>,
}

/// How a [`Planar`] matrix places its blocks (see there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanarKind {
    /// Codes then scales, tiled by groups of 32 rows: code pieces of `ch` blocks, scale pieces
    /// of [`PLANAR_SCALE_LINE`]; the scale region starts at byte `scales_at`.
    Tiled { ch: usize, scales_at: usize },
    /// One record of `stride` bytes per row: codes, then scales, then padding.
    Records { stride: usize },
}

/// The byte positions of a [`Planar`] matrix's codes and scales: `rows` rows of `nb` blocks
/// whose codes take `qsz` bytes each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanarGeom {
    pub(crate) rows: usize,
    pub(crate) nb: usize,
    pub(crate) qsz: usize,
    pub(crate) kind: PlanarKind,
}

impl PlanarGeom {
    /// The geometry of the process's [`DownLayout`] for `rows × nb` blocks of `qsz`-byte codes.
    pub fn new(rows: usize, nb: usize, qsz: usize) -> PlanarGeom {
        match down_layout() {
            DownLayout::Rows => Self::records(rows, nb, qsz),
            DownLayout::Groups => Self::tiled(rows, nb, qsz),
        }
    }

    /// [`PlanarKind::Records`]: rows of whole cache lines (`qsz` must be even, so that the
    /// f16 scales after the codes are aligned).
    pub fn records(rows: usize, nb: usize, qsz: usize) -> PlanarGeom {
        assert!(
            qsz > 0 && qsz.is_multiple_of(2),
            "PlanarGeom::records: codes of {qsz} bytes"
        );
        let stride = (nb * (qsz + 2)).div_ceil(64) * 64;
        let kind = PlanarKind::Records { stride };
        PlanarGeom {
            rows,
            nb,
            qsz,
            kind,
        }
    }

    /// [`PlanarKind::Tiled`] with 128-byte code pieces (`qsz` must divide 128).
    pub fn tiled(rows: usize, nb: usize, qsz: usize) -> PlanarGeom {
        assert!(
            qsz > 0 && PLANAR_CHUNK_BYTES_GROUPS.is_multiple_of(qsz),
            "PlanarGeom::tiled: codes of {qsz} bytes"
        );
        let kind = PlanarKind::Tiled {
            ch: PLANAR_CHUNK_BYTES_GROUPS / qsz,
            scales_at: (rows * nb * qsz).div_ceil(64) * 64,
        };
        PlanarGeom {
            rows,
            nb,
            qsz,
            kind,
        }
    }

    /// Bytes of the whole matrix (a multiple of 64).
    pub fn bytes(&self) -> usize {
        match self.kind {
            PlanarKind::Records { stride } => self.rows * stride,
            PlanarKind::Tiled { scales_at, .. } => {
                scales_at + (2 * self.rows * self.nb).div_ceil(64) * 64
            }
        }
    }

    /// Byte offset of the codes of (row `r`, block `b`).
    #[inline]
    pub fn code_at(&self, r: usize, b: usize) -> usize {
        match self.kind {
            PlanarKind::Records { stride } => r * stride + b * self.qsz,
            PlanarKind::Tiled { ch, .. } => planar_pos(self.rows, self.nb, ch, r, b) * self.qsz,
        }
    }

    /// Byte offset of the f16 scale of (row `r`, block `b`) (even).
    #[inline]
    pub fn scale_at(&self, r: usize, b: usize) -> usize {
        match self.kind {
            PlanarKind::Records { stride } => r * stride + self.nb * self.qsz + 2 * b,
            PlanarKind::Tiled { scales_at, .. } => {
                scales_at + 2 * planar_pos(self.rows, self.nb, PLANAR_SCALE_LINE, r, b)
            }
        }
    }

    /// Blocks from `b` on whose codes follow block `b`'s in memory, in every row (to the end of
    /// its piece; `0` for `b ≥ nb`).
    #[inline]
    pub fn code_run(&self, b: usize) -> usize {
        let piece = match self.kind {
            PlanarKind::Records { .. } => self.nb,
            PlanarKind::Tiled { ch, .. } => ch,
        };
        piece_run(piece, self.nb, b)
    }

    /// Blocks from `b` on whose scales follow block `b`'s in memory, in every row.
    #[inline]
    pub fn scale_run(&self, b: usize) -> usize {
        let piece = match self.kind {
            PlanarKind::Records { .. } => self.nb,
            PlanarKind::Tiled { .. } => PLANAR_SCALE_LINE,
        };
        piece_run(piece, self.nb, b)
    }

    /// Whether the geometry is [`PlanarKind::Tiled`], where a row's place depends on the size
    /// of its group: rows of a partial last group cannot share a down-kernel call with rows of
    /// full groups there (records have no such limit).
    pub fn is_tiled(&self) -> bool {
        matches!(self.kind, PlanarKind::Tiled { .. })
    }
}

/// Prefetch every cache line that bytes `off..off + len` of a planar buffer (`base`, 64-byte
/// aligned) touch: pieces need not start on a line (a tiled Q4_0 chunk of 3 blocks, a record's
/// scales after an odd number of code lines).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn planar_prefetch<const HINT: i32>(base: *const u8, off: usize, len: usize) {
    if len > 0 {
        let skew = off % 64;
        crate::kernels::x86_avx512::prefetch_lines::<HINT>(base, off - skew, len + skew);
    }
}

/// Blocks from `b` to the end of its piece, for pieces of `piece` blocks in rows of `nb`.
#[inline]
fn piece_run(piece: usize, nb: usize, b: usize) -> usize {
    if b >= nb || piece == 0 {
        return 0;
    }
    let c = b / piece;
    (c * piece + piece.min(nb - c * piece)) - b
}

/// A ggml block type with a planar form.
pub trait PlanarBlock: Copy {
    type Codes: Pod + std::fmt::Debug;
    fn split(&self) -> (f16, Self::Codes);
    fn join(d: f16, qs: &Self::Codes) -> Self;
}

impl PlanarBlock for BlockQ4_0 {
    type Codes = [u8; 16];
    fn split(&self) -> (f16, [u8; 16]) {
        (self.d, self.qs)
    }
    fn join(d: f16, qs: &[u8; 16]) -> Self {
        BlockQ4_0 { d, qs: *qs }
    }
}

impl PlanarBlock for BlockQ8_0 {
    type Codes = [u8; 32];
    fn split(&self) -> (f16, [u8; 32]) {
        (self.d, self.qs.map(|q| q as u8 ^ 0x80))
    }
    fn join(d: f16, qs: &[u8; 32]) -> Self {
        BlockQ8_0 {
            d,
            qs: qs.map(|q| (q ^ 0x80) as i8),
        }
    }
}

/// Index of (local row `li`, block `b`) inside a tiled planar group of `gr` rows with `nb`
/// blocks per row, for pieces of `tile` blocks (codes: chunks of [`PLANAR_CHUNK_BYTES_GROUPS`], scales:
/// [`PLANAR_SCALE_LINE`]).
#[inline]
pub fn planar_index(gr: usize, nb: usize, tile: usize, li: usize, b: usize) -> usize {
    let c = b / tile;
    let w = tile.min(nb - tile * c);
    gr * tile * c + li * w + b % tile
}

/// Index of (row `r`, block `b`) in a tiled planar region of a matrix with `rows` rows and `nb`
/// blocks per row, for pieces of `tile` blocks (see [`Planar`]).
#[inline]
pub fn planar_pos(rows: usize, nb: usize, tile: usize, r: usize, b: usize) -> usize {
    let g = r / PLANAR_GROUP;
    let gr = PLANAR_GROUP.min(rows - g * PLANAR_GROUP);
    g * PLANAR_GROUP * nb + planar_index(gr, nb, tile, r % PLANAR_GROUP, b)
}

/// Rows in the group of row `r` (32, or fewer in a partial last group).
#[inline]
pub fn planar_group_rows(rows: usize, r: usize) -> usize {
    PLANAR_GROUP.min(rows - r / PLANAR_GROUP * PLANAR_GROUP)
}

impl<Q: Pod> Planar<Q> {
    /// Split `[rows, nb]` GGUF blocks (row-major) into the planar form of the process's
    /// [`DownLayout`].
    pub fn from_blocks<B: PlanarBlock<Codes = Q>>(
        blocks: &[B],
        rows: usize,
        nb: usize,
    ) -> Planar<Q> {
        Self::from_blocks_in(blocks, rows, nb, PlanarGeom::new(rows, nb, size_of::<Q>()))
    }

    /// [`Self::from_blocks`] into the geometry `geom` (of `rows × nb` blocks of `Q`).
    pub fn from_blocks_in<B: PlanarBlock<Codes = Q>>(
        blocks: &[B],
        rows: usize,
        nb: usize,
        geom: PlanarGeom,
    ) -> Planar<Q> {
        assert_eq!(blocks.len(), rows * nb, "Planar::from_blocks shape");
        let q = size_of::<Q>();
        assert!(
            geom == PlanarGeom::records(rows, nb, q) || geom == PlanarGeom::tiled(rows, nb, q),
            "Planar::from_blocks_in: a geometry of other dimensions"
        );
        let mut buf = Aligned::<u8>::zeroed(geom.bytes());
        for r in 0..rows {
            for b in 0..nb {
                let (dv, q) = blocks[r * nb + b].split();
                let s = geom.scale_at(r, b);
                buf[s..s + 2].copy_from_slice(&dv.to_ne_bytes());
                let c = geom.code_at(r, b);
                // SAFETY: Q is Pod (plain bytes, no padding) of size_of::<Q>() bytes.
                let qb = unsafe {
                    std::slice::from_raw_parts(&q as *const Q as *const u8, size_of::<Q>())
                };
                buf[c..c + size_of::<Q>()].copy_from_slice(qb);
            }
        }
        Planar {
            rows,
            nb,
            geom,
            buf,
            _q: std::marker::PhantomData,
        }
    }

    /// Where the blocks lie in [`Self::bytes`].
    #[inline]
    pub fn geom(&self) -> &PlanarGeom {
        &self.geom
    }

    /// The whole buffer (64-byte aligned, [`PlanarGeom::bytes`] long).
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The scales of blocks `b..b + m` of row `r`, which must be stored consecutively
    /// (`m ≤` [`PlanarGeom::scale_run`]`(b)`).
    #[inline]
    pub fn scales(&self, r: usize, b: usize, m: usize) -> &[f16] {
        assert!(
            r < self.rows && m <= self.geom.scale_run(b),
            "Planar::scales range"
        );
        self.view(self.geom.scale_at(r, b), m)
    }

    /// The codes of blocks `b..b + m` of row `r`, which must be stored consecutively
    /// (`m ≤` [`PlanarGeom::code_run`]`(b)`).
    #[inline]
    pub fn codes(&self, r: usize, b: usize, m: usize) -> &[Q] {
        assert!(
            r < self.rows && m <= self.geom.code_run(b),
            "Planar::codes range"
        );
        self.view(self.geom.code_at(r, b), m)
    }

    /// `m` values of type `T` at byte `at` of the buffer (bounds and alignment checked).
    #[inline]
    fn view<T: Pod>(&self, at: usize, m: usize) -> &[T] {
        let bytes = &self.buf[at..at + m * size_of::<T>()];
        assert!(
            (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()),
            "Planar view alignment"
        );
        // SAFETY: the m·size_of::<T>() bytes lie in the buffer and are aligned for T (both
        // checked); T is Pod, so any bits are a valid T.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, m) }
    }

    /// Block `b` of row `r` in GGUF form.
    #[inline]
    pub fn block<B: PlanarBlock<Codes = Q>>(&self, r: usize, b: usize) -> B {
        B::join(self.scales(r, b, 1)[0], &self.codes(r, b, 1)[0])
    }

    /// Prefetch hint for all of row `r` (its code pieces and scale pieces) into L2: the sparse
    /// down projection's scattered rows defeat the hardware prefetcher. (Into L1 instead, the
    /// prefetches of a group's rows outnumber the L1 miss buffers: 90 % zeros measured 0.22
    /// vs 0.08 ms for Q4_0 8192×2048 from DRAM.)
    #[inline]
    pub fn prefetch_row(&self, r: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::_MM_HINT_T1;
            let (g, base) = (&self.geom, self.buf.as_ptr());
            if r >= self.rows {
                return;
            }
            if let PlanarKind::Records { stride } = g.kind {
                planar_prefetch::<_MM_HINT_T1>(base, r * stride, g.nb * (g.qsz + 2));
                return;
            }
            let mut b = 0;
            while b < g.nb {
                let m = g.code_run(b);
                planar_prefetch::<_MM_HINT_T1>(base, g.code_at(r, b), m * g.qsz);
                b += m;
            }
            let mut b = 0;
            while b < g.nb {
                let m = g.scale_run(b);
                planar_prefetch::<_MM_HINT_T1>(base, g.scale_at(r, b), 2 * m);
                b += m;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = r;
    }
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0x16>() == 16 * 34);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::align_of::<BlockQ8_0>() == 2);
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::align_of::<BlockQ4_0>() == 2);

/// A ggml block type: plain old data, every bit pattern valid, no padding.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, contain only integer / `f16` fields with no padding, and
/// have `size_of::<Self>() == BYTES`.
pub unsafe trait QuantBlock: Copy + 'static {
    /// Bytes per block in the file.
    const BYTES: usize;
    /// Weights per block.
    const WEIGHTS: usize;
    /// ggml type name.
    const NAME: &'static str;
}

// SAFETY: repr(C) { f16, [i8; 32] }, size asserted to be 34 = 2 + 32 above (no padding).
unsafe impl QuantBlock for BlockQ8_0 {
    const BYTES: usize = 34;
    const WEIGHTS: usize = QK8_0;
    const NAME: &'static str = "q8_0";
}

// SAFETY: repr(C) { f16, [u8; 16] }, size asserted to be 18 = 2 + 16 above (no padding).
unsafe impl QuantBlock for BlockQ4_0 {
    const BYTES: usize = 18;
    const WEIGHTS: usize = QK4_0;
    const NAME: &'static str = "q4_0";
}

/// The raw file bytes of `blocks` (little-endian hosts only, like GGUF itself).
#[cfg(target_endian = "little")]
pub fn blocks_as_bytes<B: QuantBlock>(blocks: &[B]) -> &[u8] {
    // SAFETY: B is padding-free POD (QuantBlock contract); the byte length is exact and u8 has
    // alignment 1.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks))
    }
}

/// View file bytes (e.g. an mmap'd GGUF tensor) as blocks without copying. Errors if the length
/// is not a whole number of blocks or the data is not 2-byte aligned (GGUF aligns tensor data
/// to 32 bytes, so a well-formed file always passes).
#[cfg(target_endian = "little")]
pub fn blocks_from_bytes<B: QuantBlock>(bytes: &[u8]) -> Result<&[B]> {
    if !bytes.len().is_multiple_of(B::BYTES) {
        return Err(Error::Argument(format!(
            "{} data of {} bytes is not a whole number of {}-byte blocks",
            B::NAME,
            bytes.len(),
            B::BYTES
        )));
    }
    if bytes.as_ptr().align_offset(std::mem::align_of::<B>()) != 0 {
        return Err(Error::Argument(format!(
            "{} data is not {}-byte aligned",
            B::NAME,
            std::mem::align_of::<B>()
        )));
    }
    // SAFETY: alignment and whole-block length checked above; every bit pattern is a valid B
    // (QuantBlock contract); the lifetime is tied to `bytes`.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const B, bytes.len() / B::BYTES) })
}

fn check_len(what: &str, values: usize, blocks: usize, per_block: usize) -> Result<()> {
    if !values.is_multiple_of(per_block) || values / per_block != blocks {
        return Err(Error::Argument(format!(
            "{what}: {values} values need {values}/{per_block} blocks (a multiple of {per_block}), got {blocks} blocks"
        )));
    }
    Ok(())
}

/// `roundf`: round half away from zero, without a libm call (so the quantizer vectorises).
/// `v − trunc(v)` is exact (Sterbenz), so the comparison with ±0.5 decides ties exactly.
#[inline]
fn round_half_away(v: f32) -> f32 {
    let t = v as i32 as f32; // trunc toward zero; saturates beyond ±2^31 (then `as i8` saturates)
    let f = v - t;
    if f >= 0.5 {
        t + 1.0
    } else if f <= -0.5 {
        t - 1.0
    } else {
        t
    }
}

/// One Q8_0 block, as ggml `quantize_row_q8_0_ref`.
#[inline]
pub fn quantize_block_q8_0(x: &[f32; QK8_0]) -> BlockQ8_0 {
    // ggml: amax = MAX(amax, fabsf(v)) in order. max is exact and order-free for non-NaN
    // values, so eight running maxima (which vectorise to `maxps`) give the same amax.
    let mut m = [0f32; 8];
    for c in x.chunks_exact(8) {
        for (m, &v) in m.iter_mut().zip(c) {
            let a = v.abs();
            if a > *m {
                *m = a;
            }
        }
    }
    let amax = m.iter().fold(0f32, |acc, &a| if a > acc { a } else { acc });
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK8_0];
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = round_half_away(v * id) as i8;
    }
    BlockQ8_0 {
        d: f16::from_f32(d),
        qs,
    }
}

/// One Q4_0 block, as ggml `quantize_row_q4_0_ref`.
#[inline]
pub fn quantize_block_q4_0(x: &[f32; QK4_0]) -> BlockQ4_0 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let code = |v: f32| -> u8 {
        // ggml: MIN(15, (int8_t)(x*id + 8.5f)); the value is ≥ 0.49 for finite input, the
        // lower clamp only keeps garbage (NaN/inf) input inside the nibble.
        ((v * id + 8.5) as i8).clamp(0, 15) as u8
    };
    let mut qs = [0u8; QK4_0 / 2];
    for j in 0..QK4_0 / 2 {
        qs[j] = code(x[j]) | (code(x[j + QK4_0 / 2]) << 4);
    }
    BlockQ4_0 {
        d: f16::from_f32(d),
        qs,
    }
}

/// Quantize a row to Q8_0 (`x.len() == 32 · out.len()`). Also the activation quantizer of the
/// quantized GEMV: call it once per input vector, then reuse the blocks for every weight row.
/// Runs the dispatched tier's quantizer; every tier produces the bytes of
/// [`quantize_block_q8_0`] (NaN inputs excepted).
pub fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) -> Result<()> {
    check_len("quantize_row_q8_0", x.len(), out.len(), QK8_0)?;
    (quant_kernels().quantize_row_q8_0)(x, out);
    Ok(())
}

/// Quantize a row to Q4_0 (`x.len() == 32 · out.len()`).
/// Runs the dispatched tier's quantizer; every tier produces the bytes of
/// [`quantize_block_q4_0`].
pub fn quantize_row_q4_0(x: &[f32], out: &mut [BlockQ4_0]) -> Result<()> {
    check_len("quantize_row_q4_0", x.len(), out.len(), QK4_0)?;
    (quant_kernels().quantize_row_q4_0)(x, out);
    Ok(())
}

/// Quantize `x` (length a multiple of 32) into a new Q8_0 vector.
pub fn quantize_q8_0(x: &[f32]) -> Result<Vec<BlockQ8_0>> {
    let mut out = vec![BlockQ8_0::default(); x.len() / QK8_0];
    quantize_row_q8_0(x, &mut out)?;
    Ok(out)
}

/// Quantize `x` (length a multiple of 32) into a new Q4_0 vector.
pub fn quantize_q4_0(x: &[f32]) -> Result<Vec<BlockQ4_0>> {
    let mut out = vec![BlockQ4_0::default(); x.len() / QK4_0];
    quantize_row_q4_0(x, &mut out)?;
    Ok(out)
}

/// `out[32b + j] = qs[j] · d` (ggml `dequantize_row_q8_0`); `out.len() == 32 · w.len()`.
pub fn dequantize_row_q8_0(w: &[BlockQ8_0], out: &mut [f32]) -> Result<()> {
    check_len("dequantize_row_q8_0", out.len(), w.len(), QK8_0)?;
    for (b, o) in w.iter().zip(out.chunks_exact_mut(QK8_0)) {
        let d = b.d.to_f32();
        for (o, &q) in o.iter_mut().zip(&b.qs) {
            *o = q as f32 * d;
        }
    }
    Ok(())
}

/// `out[32b + j] = (nibble_j − 8) · d` (ggml `dequantize_row_q4_0`); `out.len() == 32 · w.len()`.
pub fn dequantize_row_q4_0(w: &[BlockQ4_0], out: &mut [f32]) -> Result<()> {
    check_len("dequantize_row_q4_0", out.len(), w.len(), QK4_0)?;
    for (b, o) in w.iter().zip(out.chunks_exact_mut(QK4_0)) {
        let d = b.d.to_f32();
        let (lo, hi) = o.split_at_mut(QK4_0 / 2);
        for j in 0..QK4_0 / 2 {
            lo[j] = ((b.qs[j] & 0x0F) as i32 - 8) as f32 * d;
            hi[j] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
    Ok(())
}

/// The quantized kernels of one tier. Every tier computes bit-identical results (see the module
/// docs); tiers differ only in speed.
#[derive(Clone, Copy)]
pub struct QuantKernels {
    /// What actually runs: "scalar", "avx2", "avx512vnni", "neon", "neon-dotprod".
    pub tier_name: &'static str,
    /// `Σ_b (Σ_j w·x) · d_w · d_x` over the common prefix of blocks.
    pub vec_dot_q8_0_q8_0: fn(&[BlockQ8_0], &[BlockQ8_0]) -> f32,
    /// `Σ_b (Σ_j (q−8)·x) · d_w · d_x` over the common prefix of blocks.
    pub vec_dot_q4_0_q8_0: fn(&[BlockQ4_0], &[BlockQ8_0]) -> f32,
    /// `y[32b + j] += (a · d_b) · q_j` for `b < min(w.len(), y.len() / 32)`.
    pub axpy_q8_0: fn(f32, &[BlockQ8_0], &mut [f32]),
    /// `y[32b + j] += (a · d_b) · (q_j − 8)` for `b < min(w.len(), y.len() / 32)`.
    pub axpy_q4_0: fn(f32, &[BlockQ4_0], &mut [f32]),
    /// [`quantize_block_q8_0`] for `b < min(out.len(), x.len() / 32)` (no length check; the
    /// public [`quantize_row_q8_0`] checks). The activation quantizer of every GEMV.
    pub quantize_row_q8_0: fn(&[f32], &mut [BlockQ8_0]),
    /// [`quantize_block_q4_0`] for `b < min(out.len(), x.len() / 32)` (no length check): the
    /// weight quantizer of `dtype="q4_0"` loads.
    pub quantize_row_q4_0: fn(&[f32], &mut [BlockQ4_0]),
    /// `y[32b + j] += Σ_r (a_r · d_{r,b}) · q_{r,j}` over four rows in one pass over `y`
    /// (the sparse down projection). `None`: callers do four `axpy_q8_0` calls (same math;
    /// this kernel adds the four products in the same order, so it matches to rounding).
    pub axpy4_q8_0: Option<fn(&[f32; 4], [&[BlockQ8_0]; 4], &mut [f32])>,
    /// 16 rows at once from the interleaved layout: `out[i] = Σ_b sumi_b,i · d_w · d_x` over
    /// `w.len()` blocks, given `xsum8[b] = 8 · Σ_j x_b,j`. Per-row float order differs from
    /// `vec_dot_q4_0_q8_0` (a running FMA per row), so results agree to rounding, not bits.
    /// `None`: Q4_0 matrices keep the plain GGUF layout.
    pub gemv16_q4_0: Option<fn(&[BlockQ4_0x16], &[BlockQ8_0], &[i32], &mut [f32; 16])>,
    /// The Q8_0 twin of `gemv16_q4_0`, given `xsum128[b] = 128 · Σ_j x_b,j`.
    pub gemv16_q8_0: Option<fn(&[BlockQ8_0x16], &[BlockQ8_0], &[i32], &mut [f32; 16])>,
    /// `gemv16_q4_0` for `t` inputs at once (prompts): `x` is `[t, nb]` blocks, `xsum8` is
    /// `[t, nb]`, `out` is `[t, 16]`. The weights are unpacked once per block for 4 inputs, and
    /// each (row, input) result is computed with the same operations as `gemv16_q4_0`.
    pub gemm16_q4_0: Option<fn(&[BlockQ4_0x16], &[BlockQ8_0], &[i32], usize, &mut [f32])>,
    /// The Q8_0 twin of `gemm16_q4_0` (`xsum128` instead of `xsum8`).
    pub gemm16_q8_0: Option<fn(&[BlockQ8_0x16], &[BlockQ8_0], &[i32], usize, &mut [f32])>,
    /// The Q4_0 twin of `axpy4_q8_0` (four `axpy_q4_0` calls, same order, one pass over `y`).
    pub axpy4_q4_0: Option<fn(&[f32; 4], [&[BlockQ4_0]; 4], &mut [f32])>,
    /// `y += Σ_i a[i] · row[rows[i]]` over rows of a planar Q4_0 matrix (`Planar`, `nb`
    /// blocks per row), with the coefficients of each block quantized to int8 as specified by
    /// `scalar::down_q4_0`, bit for bit; the `next` rows (those of the following call) are
    /// prefetched, a hint that changes no result. `rows.len() == a.len()`, a multiple of 4, at
    /// most 32 (pad with any listed row and a zero coefficient); in a tiled matrix the rows lie
    /// in groups of the same size (all in full groups of 32, or all in the partial last group);
    /// `y.len() >= 32·nb`. `None`: down projections keep the GGUF layout and the f32 AXPY.
    pub down_q4_0: Option<DownKernel<[u8; 16]>>,
    /// The Q8_0 twin of `down_q4_0` (`scalar::down_q8_0`).
    pub down_q8_0: Option<DownKernel<[u8; 32]>>,
}

/// Signature of the planar int8 down-projection kernels: `(matrix, rows, a, next, y)`; `next` lists the rows of the following call, which the kernel prefetches as it goes (a
/// hint: any rows, or none; rows outside the matrix are ignored; results do not depend on it).
pub type DownKernel<Q> = fn(&Planar<Q>, &[u32], &[f32], &[u32], &mut [f32]);

const SCALAR: QuantKernels = QuantKernels {
    tier_name: "scalar",
    vec_dot_q8_0_q8_0: scalar::vec_dot_q8_0_q8_0,
    vec_dot_q4_0_q8_0: scalar::vec_dot_q4_0_q8_0,
    axpy_q8_0: scalar::axpy_q8_0,
    axpy_q4_0: scalar::axpy_q4_0,
    quantize_row_q8_0: scalar::quantize_row_q8_0,
    quantize_row_q4_0: scalar::quantize_row_q4_0,
    axpy4_q8_0: None,
    axpy4_q4_0: None,
    gemv16_q4_0: None,
    gemv16_q8_0: None,
    gemm16_q4_0: None,
    gemm16_q8_0: None,
    down_q4_0: None,
    down_q8_0: None,
};

/// The quantized kernels for `tier`, or `None` if this CPU cannot run `tier`. The AVX-512 tier
/// uses VNNI kernels when avx512vnni + avx512bw + avx512vl are present, else the AVX2 kernels
/// (`tier_name` tells which). Tiers without quantized kernels of their own get scalar.
pub fn quant_kernels_for(tier: Tier) -> Option<QuantKernels> {
    if !Tier::available().contains(&tier) {
        return None;
    }
    #[allow(unreachable_patterns)]
    Some(match tier {
        Tier::Scalar => SCALAR,
        #[cfg(target_arch = "x86_64")]
        Tier::Avx2 => x86_avx2::KERNELS,
        #[cfg(target_arch = "x86_64")]
        Tier::Avx512 => {
            if x86_avx512::vnni_detected() {
                let mut k = x86_avx512::KERNELS;
                if !x86_avx512::vbmi_detected() {
                    (k.down_q4_0, k.down_q8_0) = (None, None);
                }
                k
            } else {
                x86_avx2::KERNELS
            }
        }
        #[cfg(target_arch = "aarch64")]
        Tier::Neon => aarch64_neon::NEON,
        #[cfg(target_arch = "aarch64")]
        Tier::NeonDotprod => aarch64_neon::DOTPROD,
        _ => SCALAR,
    })
}

/// The process-wide quantized kernels, chosen once to match `crate::kernels::kernels().tier`
/// (so `SPARSELM_KERNEL` applies to both tables).
pub fn quant_kernels() -> &'static QuantKernels {
    static Q: OnceLock<QuantKernels> = OnceLock::new();
    Q.get_or_init(|| quant_kernels_for(kernels().tier).unwrap_or(SCALAR))
}
