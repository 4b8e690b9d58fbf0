//! Kernel dispatch: one table of safe function pointers per SIMD tier, chosen once at start-up
//! by CPU detection (overridable with `SPARSELM_KERNEL=scalar|avx2|avx512|neon|neon-dotprod`).
//!
//! Kernels know nothing of layers, heads or configs: they are dot products and AXPYs over
//! slices. `scalar` is the specification; every other tier has the same functions with the same
//! signatures and is tested against it (see the tests at the bottom of this file).
//!
//! PERF NOTES
//! - f16/bf16 weights are widened in registers (F16C `cvtph`, bf16 by a 16-bit shift); no
//!   temporary f32 copies of weight rows on the decode path.
//! - 4 independent accumulators per dot product hide FMA latency (4 cycles on Zen).
//! - aarch64 `neon`: 8-wide as two `float32x4_t`, with the same 4-accumulator / 32-8-scalar
//!   split, tile schedule, per-element FMA order (axpy4, rank4x64: 4 passes of 16 columns to
//!   fit 32 registers) and reduction order as `avx2`, so the two tiers are bit-identical
//!   (`.ci/arm64.sh` checks greedy CLI output under qemu-aarch64 == x86_64 with
//!   `SPARSELM_KERNEL=avx2`). f16 → f32 uses `fcvtl`/`fcvtl2` through `asm!` (base ARMv8.0;
//!   `vcvt_f32_f16`/`float16x4_t` compile on Debian's rustc 1.96 but are newer than our MSRV);
//!   bf16 is `vshll_n_u16::<16>`. No ARM timings yet (qemu says nothing about speed): measure
//!   on a Pi 4 / Pi 5 before tuning (e.g. 8 accumulators for A76's 2 FMA pipes).
//! - aarch64 `neon-dotprod`: same float kernels; the tier exists for the int8 (Q8_0/Q4_0)
//!   kernels in `quant/aarch64_neon.rs`: `sdot` via `asm!` in
//!   `#[target_feature(enable = "neon,dotprod")]` (`vdotq_s32` is unstable), `vmull_s8` +
//!   `vpadalq_s16` on plain `neon`; both bit-identical to the scalar spec. Stop 25:
//!   `neon-dotprod` also has the 16-row interleaved Q8_0/Q4_0 GEMV and prompt GEMM (one `sdot`
//!   per 4 rows and 4-byte group; bit-identical to the AVX2/AVX-512 ones, checked by
//!   `.ci/arm64.sh` against x86-64 AVX2); plain `neon` keeps the per-row kernels. Neither was
//!   timed on hardware. No i8mm (`smmla`) tier yet: it needs a 2-row GEMV layout to pay off.
//! - Decode down projection (8192×2048 W_downᵀ, 24 distinct matrices so rows come from DRAM,
//!   2 threads, noisy machine): splitting the active list into one run per thread, each summing
//!   whole rows into its own L1-resident partial y, beat splitting columns (each thread reading
//!   half of every row): dense Q8_0 2.61 → 2.06 ms, Q4_0 2.13 → 1.62, bf16 2.92 → 1.80. For
//!   quantized rows one row at a time beat the 4-row AXPY (Q8_0 1.28 ms, Q4_0 1.16: four
//!   interleaved streams defeat the prefetcher); bf16 keeps 4 rows (1.96 vs 2.21 ms). With 50 %
//!   random zeros, prefetching the row two ahead: Q8_0 1.71 → 1.49 ms, Q4_0 1.32 → 0.88.
//! - Attention (PLM-1.8B q4_0, 2 threads): dense prompt attention in blocks of 4 queries with
//!   4×4 score tiles and 4-row AXPYs over the values, instead of one dot call per (query, key):
//!   prefill of 2048 tokens 18.6 → 38 tok/s, 1024 tokens 45 → 64. Absorbed decode attention in
//!   groups of 4 heads that read the latent cache once (4 keys × 4 heads score tiles, 4×64 rank
//!   updates for the context) instead of once per head: decode at 2048 cached positions
//!   9.3 → 11.9 tok/s, unchanged at 128.
//! - bf16 prompt GEMM (`x86_bf16.rs`): peak on this Zen 4 VM, one core: f32 FMA 116 GFLOPS,
//!   `vdpbf16ps` 233, `vpdpbusd` 468 GOPS. Prefill of 128 tokens at the PLM-1.8B shape,
//!   2 threads: f16 28 → 70 tok/s, bf16 27.5 → 66, q8_0 19 → 59, q4_0 17 → 70.
//! - Memory, not kernels, bounds decode here (stop 9). Weights on 2 MiB transparent huge pages
//!   (`crate::alloc`): a plain 2-thread read of 1 GiB 40-47 → 56-62 GB/s (1 thread 25 → 32);
//!   PLM-1.8B q4_0 CLI decode, alternated: 21-28 → 24-30 tok/s; load 4.1-4.3 → 3.0-3.8 s.
//!   The machine's bandwidth itself drifts between 34 and 60 GB/s (2 threads) from one minute
//!   to the next. GEMV16 Q4_0 on a 175 MB matrix: one thread 28-31 GB/s, two 32-38; two
//!   1-thread pools on two matrices at once 37-38 (so the split is not what limits).
//!   `perf` of q4_0 decode: GEMV16 52 % of the time for 67 % of the bytes, the planar down
//!   kernel + coefficients 24 % for 29 %: equal cost per byte.
//! - Sparse rows do not save DRAM traffic at 50 % random zeros: a pure read (no compute) of a
//!   random half of the rows of 32 × 8192 rows took, against reading every row, 0.27 vs
//!   0.27-0.34 ms per layer for 1 KiB rows and 0.47-0.50 vs 0.52-0.75 ms for 2 KiB rows, and
//!   the half of the planar 128-byte pieces 0.30-0.33 / 0.63-0.70 ms (slower than all).
//!   Pooling the active rows of half-full planar groups instead of reading them whole
//!   (`DOWN_DENSE_AT` 20 or 33 instead of 12) was slower at 50 % zeros on huge pages too
//!   (q8_0 0.54 → 0.60-0.62 ms, q4_0 0.30-0.39 → 0.40-0.61 ms). Splitting the down plan into
//!   4 parts per thread for balance: no measurable change (dropped).
//! - Decode's ~200 parallel regions per token on a spinning team (`crate::team`) instead of
//!   rayon, whose idle workers park after a few yields: q4_0 decode, 2 threads, context
//!   switches per token 95 → 20, CPU use 1.78 → 1.90 of 2; CLI decode (96 tokens), 8
//!   alternated pairs: median 28.3 → 32.5 tok/s, 7 of 8 pairs faster, geometric mean of the
//!   pair ratios 1.10 (an earlier 6 pairs: 26.95 → 28.15). One thread ran decode at 93-99 % of the
//!   one-thread read bandwidth; two at 57-69 % of the two-thread one before the team.
//! - Prefetching the next pooled unit of the planar down plan (`tensor::plan_run`), 90 % zeros:
//!   from DRAM (`examples/down_probe`, 32 layers, 2 threads) it is what makes sparse rows
//!   pay: q8_0 0.19-0.20 → 0.09-0.14 ms, q4_0 0.12-0.15 → 0.06-0.07 ms; from L3 (criterion
//!   `sparse_down`, one matrix, 1 thread) it costs: q8_0 75 → 92-96 µs, q4_0 47 → 57-58 µs.
//!   Kept: decode reads W_downᵀ from DRAM. (Without it criterion would show 5.0× / 3.4× against
//!   the dense int8 GEMV instead of 4.1× / 2.7×.)
//! - Absorbed attention with one head group per thread (8 heads at 2 threads; the cache of a
//!   layer read once per thread instead of twice), query `[q_lat ; q_rope]` so one 4×4 tile per
//!   4 keys gives whole scores, and the 4×4 tile's 16 sums by a shuffle tree: `tile4x4` samples
//!   at 900 cached positions −16 %; end-to-end within noise.
//! - Float down projection (row-major W_downᵀ rows, decode): eight rows per pass over `y`
//!   (`axpy8`) instead of four. A standalone probe (f16, 32 × 8192×2048 from DRAM, 2 threads,
//!   one run per thread): 4 rows 0.94-1.22 ms, 8 rows 0.73-1.11, 12 rows ~ 8, 16 rows worse;
//!   `examples/down_probe` through the engine, 3 alternated pairs: f16 0 / 50 / 90 % zeros
//!   0.98-1.08 / 0.55-0.61 / 0.11-0.14 ms → 0.80-0.92 / 0.43-0.44 / 0.080-0.085 ms, bf16
//!   likewise. More rows in flight = more memory-level parallelism; one row per pass is
//!   store-bound (22 GB/s). Tried and dropped: the rows of 4-row groups interleaved by 32
//!   columns (one stream per 4 rows): 1.2-1.6× faster with every row active, but 0.65-0.75×
//!   at 50 % and 0.5-0.9× at 90 % zeros (a lone active row of a group is read strided).
//! - Sparse down at 90 % zeros against the dense GEMV of W_down, same format, both from DRAM
//!   on the decode team (criterion `sparse_down_dram`, 32 layers, 2 threads, medians of two
//!   runs): f16 1626 / 1384 vs 88 / 126 µs (18.5× / 11.0×), q8_0 347 / 552 vs 71 / 83 µs
//!   (4.9× / 6.7×), q4_0 270 / 211 vs 56 / 54 µs (4.8× / 3.9×). The int8 pooled rows take
//!   ~55 µs for q4_0 whether from L3 on one thread or from DRAM on two: latency, not bytes,
//!   bounds them (128-byte pieces 4 KiB apart). Prefetching two or three pooled units ahead
//!   instead of one: no signal above the noise (q4_0 38-75 µs either way). From L3
//!   (criterion `sparse_down`, one matrix, 1 thread) q8_0 4.1×, q4_0 2.7×.
//! - Short prompts: the bf16 GEMM of the down projection widens W_downᵀ into bf16 panels on
//!   every call (`perf`, 4-token q4_0 prompt: `row_seg_bf16` + `q4_0_to_bf16` + interleave +
//!   memset 66 % of the time, the GEMM tiles 8 %). Up to `model::DOWN_PER_TOKEN_MAX` = 16
//!   tokens the down projection runs token by token on decode's path instead. PLM-1.8B, 2
//!   threads, whole prompt, two alternated runs, GEMM → per token (ms): q4_0 2 tokens
//!   150-164 → 54-65, 8: 196-197 → 119-129, 16: 261-286 → 204-229, 32: 364-389 → 378-430;
//!   q8_0 8: 227-231 → 157-161, 16: 290-314 → 295-306, 32: 417-419 → 463-491; f16 8:
//!   337-373 → 240-254, 16: 389-479 → 351-387, 32: 560-670 → 616-700.
//! - Pooled planar rows (stop 11; `examples/down_probe`, 32 × 8192×2048 from DRAM, 2 threads,
//!   8-12 alternated runs per variant, medians): `perf` from L3 put 11 % of a 90 %-zeros Q4_0
//!   projection in the serial `DownPlan::build` (a binary search per group, its branches
//!   mispredicted) and a quarter in the prefetches of the next unit, stalled on the scale lines
//!   (4 half-used lines per row). A linear scan for the groups: 90 % Q4_0 51 → 38 µs. Scales
//!   stored per row in whole 64-byte lines of 32 blocks: 90 % Q4_0 46.5-55 → 42.5-45.5 µs, Q8_0
//!   89-91.5 → 82-84.5, dense groups unchanged. Tried and dropped: each row's codes contiguous
//!   inside its group (sparse 90 % a few % faster, dense groups 1.1-2.4× slower, with or
//!   without prefetching them); 256-byte code pieces (sparse no better; dense 1.5-1.6× slower);
//!   prefetching one line per 128-byte piece (2× slower: the second line is not fetched for
//!   us); `DOWN_DENSE_AT` 16 / 20 (50 % zeros 1.2× / 1.4× slower for Q4_0, 70 % zeros ≤ 10 %
//!   faster): 12 stays.
//! - Prefetching the next pooled unit (criterion `sparse_down_dram`, 2 threads, 90 % zeros):
//!   spread through the kernel, chunk by chunk as it computes its own rows (`DownKernel`'s
//!   `next`), instead of one burst of ~1100 prefetches before the call: Q8_0 (34 lines per row)
//!   78-103 → 48-54 µs (4 runs each); Q4_0 (18 lines) 35-38 µs in 3 of 4 runs with the burst,
//!   50-53 in 2 runs spread, so Q4_0 keeps the burst (`tensor::plan_run`).
//! - Prompt GEMM of planar W_downᵀ (≥ 17 tokens): a panel's row pair is dequantized and paired
//!   in one pass from the planar arrays (`q4_0_pair_to_bf16` / `q8_0_pair_to_bf16`:
//!   `vcvtne2ps2bf16` + `vpermw`) instead of joining GGUF blocks, converting each row and
//!   interleaving; same bits. Whole prompt, 2 threads, 3 alternated runs: q4_0 17 tokens
//!   260-278 → 237-255 ms, 32: 376-390 → 346-387, 128 within noise; q8_0 17: 291-347 →
//!   277-294. `perf` of 32-39-token q4_0 prompts after it: int8 GEMMs 26 %, the down GEMM's
//!   tiles 19 %, the pair conversion 14 %.
//! - The machine has two bandwidth phases, switching every few seconds to minutes: a plain
//!   2-thread read of 1 GiB gives ~33 GB/s in one and 55-62 GB/s in the other (1 thread: ~30
//!   in both; SSE or AVX-512 loads, two halves or 16 chunks alike). `examples/bw_probe` and
//!   `examples/decode_probe` pair each measurement with a read just before and after. In the
//!   slow phase the decode GEMVs read at 95-99 % of it; in the fast one, Q4_0 / Q8_0 GEMVs
//!   were at 81-84 % and F16 at 91 %. Fewer, larger tasks per GEMV read faster there (Q4_0,
//!   32 × 8192×2048, medians of 151 paired lines: 8 tasks per thread 82 %, 4: 86 %, 2: 89 %,
//!   1: 90 %; 64 per thread 51 %), and software prefetch in the GEMV kernel was slower (73-76
//!   %). Each task claim is a locked compare-and-swap, which waits for the core's loads in
//!   flight. `team::par_ranges` gives each thread one contiguous range and claims half of
//!   what is left each time (at least 64 KiB), stealing from the back of the other's range at
//!   the end: fast phase Q4_0 77 → 88 %, Q8_0 82 → 90 % (40 and 90 paired lines), slow phase
//!   +2-3 %. Whole decode (PLM-1.8B q4_0, 2 threads, `decode_probe`, alternated in one
//!   process): sparsity off, fast phase 34.4 → 36.4 tok/s, slow 28.2 → 28.6; on, 33.2 → 34.4
//!   and 26.1 → 26.8. A fixed 64 KiB claim was much slower (65 %).
//! - What is left in the fast phase: decode reads ~62 % of the plain read. The planar down
//!   kernel reads at 64 % of it at 50 % zeros (93 % in the slow phase): from L3 on one core it
//!   processes ~27 GB/s against the GEMV's 60, because of the 4-row byte regrouping
//!   (`vshufi64x2` + `vpermt2b`) that `vpdpbusd` needs. `perf` of sparsity-off decode: GEMVs
//!   41 %, down kernel + coefficients 25 %, attention tiles 11 % (context up to 512).
//! - Decode outside parallel regions (PLM-1.8B q4_0, 2 threads, sparsity off, context ≤ 192,
//!   timed inside `Team::run`): 6-11 % of the wall time is serial on the caller (norms, plan
//!   building, input quantization, partial sums), and the caller waits 2-4 % for the worker at
//!   region ends; `perf` puts the worker's idle spin at ~16 % of its time. Building each
//!   thread's down plan inside the parallel region (runs cut at group boundaries) instead of
//!   serially before it: 1-5 % slower in 3 of 4 phase/sparsity cells, 2 % faster in one (two
//!   sets of 6 alternated process pairs, `decode_probe`); dropped.
//! - Q4_0 pooled rows now also prefetch the next unit spread through the kernel, as Q8_0:
//!   90 % zeros, criterion `sparse_down_dram`, two alternated pairs: burst 61 / 49 µs, spread
//!   36 / 33 µs; `bw_probe` (`DOWN=1 DOWN_ZEROS=90`, 4 alternated process pairs, medians):
//!   slow phase 73 → 57 µs, fast 80 → 60 µs. (Stop 11 had measured the opposite, 35-38 vs
//!   50-53 µs, on a build before the GEMV split change; the dense GEMV it is compared to is
//!   faster now, see below.)
//! - Sparse down at 90 % zeros against the dense GEMV of W_down, both per bandwidth phase
//!   (`bw_probe DOWN=1 DOWN_ZEROS=90`, each line times both, medians): with the burst, Q4_0
//!   78 vs 287 µs (3.6×) slow, 80 vs 190 (2.4×) fast; Q8_0 83 vs 548 (6.6×) slow, 69 vs 314
//!   (4.5×) fast. Pooled rows are bound by latency, so the fast phase helps the dense GEMV only.
//!   With the spread Q4_0 prefetch (this build): Q4_0 46 vs 287 µs (5.9×) slow, 58 vs 186 µs
//!   (3.2×) fast; Q8_0 81 vs 526 µs (6.6×) slow, 72 vs 337 µs (4.6×) fast.
//! - The dense baseline (`SPARSELM_DENSE_MLP=1`, stop 13): Q8_0/Q4_0 `W_down` kept as in the
//!   file in the 16-row GEMV layout (`weights::Down::Dense`) instead of visiting every row of
//!   the planar `W_downᵀ`. PLM-1.8B, 2 threads, `decode_probe` in alternated processes, share
//!   of the plain read around each line (medians; slow / fast phase): Q4_0 rows 0.89 / 0.65 →
//!   GEMV 0.90-0.91 / 0.71-0.78; Q8_0 0.91-0.92 / 0.71 → 0.94 / 0.80-0.89. The dense layout's
//!   prompt GEMM is also faster than the planar down GEMM (128-token prefill q4_0 ~105 → ~145
//!   tok/s, q8_0 ~110 → ~145).
//! - Float `W_down` for the dense baseline (stop 15). Its GEMV, rows of 8192 values, reads
//!   32 KiB of f32 input per row, as large as L1: `bw_probe WIDE=1` (32 matrices 2048×8192,
//!   slow phase) f16 66 % of the plain read, against 99 % for the 8192×2048 shape. Tried: a
//!   fused four-row dot (`x` loaded once per four rows): 2048×8192 66 → 88 %, but 8192×2048
//!   99 → 83 % (four streams through memory instead of one; 6 alternated lines each); dropped.
//!   Kept: `W_down` cut into column blocks of 2048 (`tensor::matvec_blocks`, one region, each
//!   thread's claim going through the blocks in order), so every block is the 2048-column
//!   shape; before this stop, float formats visited every row of `W_downᵀ` (8-row AXPYs,
//!   `bw_probe DOWN=1 DOWN_ZEROS=0` f16 87 %). Whole f16 decode (`decode_probe`,
//!   `SPARSELM_DENSE_MLP=1`, 3 alternated process pairs, 12 + 9 clean slow-phase lines):
//!   decode tok/s per GB/s of the read 0.249 (blocks) vs 0.239 (all rows), +4 %.
//! - Float W_UK in absorbed attention (stop 15): a head's 128 consecutive rows of 512 summed
//!   one row at a time (`Matrix::axpy_consecutive`: one stream) instead of in 8-row passes
//!   (eight interleaved 1 KiB streams, which the prefetcher barely follows): f16, 32 layers
//!   from DRAM, 2 threads × 8 heads (`examples/uk_probe`, 12 lines, slow phase) 134 → 84 µs
//!   per layer; 4-row passes 135 µs.
//! - Where an f16 dense decode goes after those (stop 15; `perf record -e cpu-clock` of
//!   `decode_probe MODEL f16 2` with `SPARSELM_DENSE_MLP=1 CTX=192`, load skipped with `-D`):
//!   `dot_f16` 86 % of the samples (the plain reads 6 %), W_UK AXPYs 1.6 %, the team's spin
//!   waits 2.4 %, scores 0.7 %; the empty scalar tail of every float dot was 0.5 % until it
//!   was skipped. q4_0 (same command): `gemv16_q4_0` 83.5 % of the decode's samples, scores
//!   3.3 %, context sums 1.2 %, W_UK (`down_q4_0` + coefficients) 2.1 %, spin waits 4.7 %,
//!   input quantization 0.4 %. `perf` here has no hardware counters, but cpu-clock sampling
//!   works, which reproduces such breakdowns without throwaway timers.
//! - Measured and not taken (stop 15): fusing q_proj (3072×2048) and kv_a (576×2048), which
//!   take the same input, into one 3648-row GEMV (one region and one input quantization
//!   fewer per layer). 32 layers from DRAM, 16 lines each, medians: Q4_0 143.2 → 136.4 µs per
//!   layer (0.2 ms, ~0.6 % of a token), Q8_0 260.0 → 258.9 µs.
//! - Tried, no consistent difference (stop 15): decode GEMV claims of 16 / 32 KiB instead of
//!   64 (`par_ranges` grain; the caller waits ~1.6 % of a q4_0 decode at region ends).
//!   `decode_probe` q4_0 dense, alternated processes, tok/s per GB/s of the read over clean
//!   slow-phase lines: one set 16 KiB 0.861 vs 64 KiB 0.845 (13 / 10 lines), the next 16 KiB
//!   0.845, 32 KiB 0.875, 64 KiB 0.874 (15 / 14 / 12 lines). Kept 64 KiB.
//! - Tried, no gain (stop 15): pooled sparse-down units prefetched 2 or 3 calls ahead
//!   instead of 1 (`bw_probe DOWN=1 DOWN_ZEROS=90`, 3 alternated rounds): Q4_0 slow phase
//!   77.8 / 71.0 / 80.5 µs (1 / 2 / 3 ahead), Q8_0 fast phase 74.3 (1) vs 94.4 µs (2); other
//!   tenants' memory traffic put every Q8_0 slow-phase line at 120-137 µs that hour.
//! - Decode attention's share (Q4_0 dense baseline, slow phase): context up to 40 read 0.93
//!   of the plain read, up to 400 0.91.
//! - Tried and dropped: at the end of each decode GEMV, each thread prefetching into L2 the
//!   first 64 / 256 / 1024 KiB of its rows of the next matrix (to fill the waits at region
//!   ends and the serial work between GEMVs). Q4_0 dense baseline, 3 + 4 alternated process
//!   triples: slow phase 0.91 / 0.90 (none) vs 0.93 (64), 0.95 / 0.89 (256), 0.89 (1024);
//!   fast phase 0.79 / 0.81 vs 0.78, 0.77 / 0.75, 0.65: noise or worse.
//! - Where a dense-baseline decode step goes (stop 14; PLM-1.8B q4_0, 2 threads,
//!   `SPARSELM_DENSE_MLP=1`, context 16-192, slow phase; timers in a throwaway build of
//!   `decode_probe`, 4-8 lines each): 193 parallel regions per token; 97 % of the wall time
//!   inside them, the caller waiting 0.7-1.7 % at their ends, 2.8-3.2 % serial (norms and
//!   residual adds 0.6 %, latent RMSNorm + RoPE + cache write 0.5 %, ReLU² 0.3 %, quantizing
//!   GEMV inputs 0.7 %). GEMV regions 88-90 %, absorbed attention 6-9.5 % (63 µs per layer at
//!   context 16, 107 µs at 190). Per thread and layer inside attention: W_UK (8 heads × 128
//!   planar rows, 295 KB) 22-31 µs, scores 10-36, context sums 5-12, W_UV (16-row GEMV,
//!   295 KB) 18-23; run a second time from cache, W_UK 15 and W_UV 7.5 µs. f16: W_UK
//!   120-146 µs for 1 MB per thread (34-60 from cache), W_UV 46-64. With the GEMVs at 95-99 %
//!   of the read, attention and serial work (~11 % at the benchmark's context) cap the dense
//!   baseline near 0.9 of a plain read, which is what it reads.
//! - Tried and dropped (stop 14): W_UV of a head group requested into L2 (`prefetcht1`) a few
//!   lines per score tile and context strip, while attention computes. 32 lines per tile: W_UV
//!   21.0 → 17.7 µs, attention region 88 → 92 µs; 128 lines: W_UV 20.1 → 17.9, scores 17.5 →
//!   28.5 µs (medians of 16 slow-phase lines each, alternated processes). Prefetching the next
//!   8 rows during each 8-row pass of float W_UK (f16): 127 → 140 µs.
//! - Random rows from DRAM, with software prefetch (`examples/rows_probe`: pure reads of a
//!   random subset of the rows of 32 × 8192 rows on 2 MiB pages, 2 threads, 20 lines each,
//!   median time against reading every row): 50 % of the rows skipped, 1088-byte rows (a Q4_0
//!   row of 2048) 1.01 (prefetch 2 rows ahead); 2176-byte rows (Q8_0) 0.97 without software
//!   prefetch, 0.90 / 0.87 prefetching 1 / 2 rows ahead (a C twin with AVX-512 loads: 0.82-0.85
//!   over 30 lines); 4352-byte rows 0.79; 17408 0.65. 88 % skipped: 2176 0.26, 1088 0.29. So at
//!   50 % random zeros even a row-major Q8_0 `W_downᵀ` read at no compute cost would save ~13 %
//!   of its read time, ~4 % of a Q8_0 token: short of the +8.5 % that 1.4× llama.cpp needs on
//!   top of the dense baseline's 1.29×.
//! - The sparse down at 90 % zeros loses ~12 % to imbalance (`bw_probe DOWN=1`, Q4_0, 6 lines,
//!   timers in a throwaway build): plan built serially in 2-3 µs, region 44-69 µs, its longer
//!   part 43-66 µs against a mean part of 40-58. Both fixes at hand were measured before and
//!   dropped (4 parts per thread; plans built inside the region, above); dynamic stealing
//!   would make the sum order, so the logits' last bits, depend on timing.
//!
//! Stop 16 ran on another machine kind: 2 vCPUs of an Intel Xeon (family 6 model 167, KVM) with
//! AVX-512 VNNI/BF16/FP16 and AMX (TILE, BF16, INT8), 2 MiB L2 per core, a plain 2-thread read
//! of 18-22 GB/s (no fast phase seen).
//! - Software prefetch in the decode GEMVs (kept for Intel: `prefetch_distance`, 4096 bytes
//!   ahead, two or more lines per loop step). `bw_probe`, 4 lines per cell, alternated: f16
//!   8192×2048 94-99 % of the read without, 100-106 % at 1 KiB, 108-113 % at 2 KiB, 110-114 %
//!   at 4 KiB, 100-113 % at 8 KiB; the column-blocked `W_down` shape 97-102 % → 101-115 %;
//!   Q4_0 16-row GEMV 91-98 % → 109-121 %, Q8_0 100-108 % → 115-116 % (4 KiB). Whole dense
//!   decode (`decode_probe`, `SPARSELM_DENSE_MLP=1`, 2 alternated process pairs, tok/s per GB/s
//!   of the read): f16 0.257 / 0.283 → 0.301 / 0.308, Q4_0 0.825 / 0.877 → 0.978 / 1.021,
//!   Q8_0 0.510 / 0.523 → 0.558 / 0.551. Intel's L2 streamer does not cross 4 KiB pages: an
//!   f16 row of 2048 is one page, so without help every row restarts the stream. On Zen 4
//!   (stops 13-14) software prefetch in the GEMV kernel measured slower, so other vendors
//!   default to none.
//! - Prompt GEMMs on AMX tiles (`amx.rs`; `SPARSELM_AMX=0` turns them off). One `tdpbf16ps`
//!   does 16×16×32 multiply-adds; a C probe measured 817 GMAC/s on one core (10 ns each).
//!   128-token prompts, PLM-1.8B shape, 2 threads (`bench_e2e`, alternated processes): f16
//!   sparse on 25.5-26.2 → 63.5-64.2 tok/s, off 26.1-30.3 → 68.5-76.5; with the AMX-INT8
//!   `matmul_q16` too, q4_0 on 35.5 → 95.3, off 58.4 → 75.8, q8_0 on 38.7 → 67.8, off 60.4 →
//!   67.2. What is left in a Q8_0 prompt is mostly the per-block scale pass after each
//!   `tdpbsud` (16 rows × 16 tokens stored and rescaled per 32-wide block, which keeps results
//!   equal to the GEMV bit for bit) and the bf16 panel conversions.
//! - llama.cpp (llama-cpp-python 0.3.36) built with `-march=native` on this CPU compiles its
//!   own AMX-INT8 path, which crashes on PLM's Q4_0/Q8_0 weights (SIGSEGV in
//!   `ggml_backend_amx_mul_mat` on the first prompt; f16 does not use it). The comparisons of
//!   this stop build it with `-march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16`
//!   (its AVX-512 VNNI/BF16 kernels and the Q4_0 8×8 repacking stay on).
//! - Prefetch hint for sparse rows (stop 23; `rows_probe`, contiguous 1152-byte rows, 90 %
//!   skipped, 2 threads, 6 lines per cell, median time against reading every row): `t0`
//!   0.148 / 0.154 (2 / 4 rows ahead), `t1` 0.156 / 0.158, `t2` 0.163 / 0.162, `nta`
//!   0.147 / 0.141: no hint fetches random rows faster. A pure read of them took 80-89 µs a
//!   layer against ~500 for every row (17-20 GB/s): 5-6× faster than the dense GEMV (450-532
//!   µs in `bw_probe` that day), with the kernel 10-30 % above that floor (4.4-5.6×).

use std::sync::OnceLock;

use half::{bf16, f16};

use crate::error::{Error, Result};

/// Elements spanned by `rows` rows of `len` elements `stride` apart, `(rows − 1)·stride + len`,
/// saturating: a span that overflows never passes a `slice.len() >= span` bounds check (the
/// SIMD kernels' checks before their unchecked loads and stores).
#[inline]
pub(crate) fn span(rows: usize, stride: usize, len: usize) -> usize {
    rows.saturating_sub(1)
        .saturating_mul(stride)
        .saturating_add(len)
}

#[cfg(target_arch = "aarch64")]
pub(crate) mod aarch64_neon;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_bf16;

/// A SIMD instruction-set tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Scalar,
    Avx2,
    Avx512,
    /// aarch64 AdvSIMD (Cortex-A72 / Raspberry Pi 4 and up).
    Neon,
    /// NEON plus `sdot`/`udot` (Cortex-A76 / Raspberry Pi 5): the float kernels are the NEON
    /// ones; only int8 (quant) kernels differ.
    NeonDotprod,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Scalar => "scalar",
            Tier::Avx2 => "avx2",
            Tier::Avx512 => "avx512",
            Tier::Neon => "neon",
            Tier::NeonDotprod => "neon-dotprod",
        }
    }

    /// Every tier this CPU can run, slowest first.
    pub fn available() -> Vec<Tier> {
        let mut v = vec![Tier::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                v.push(Tier::Avx2);
                if std::is_x86_feature_detected!("avx512f") {
                    v.push(Tier::Avx512);
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                v.push(Tier::Neon);
                if std::arch::is_aarch64_feature_detected!("dotprod") {
                    v.push(Tier::NeonDotprod);
                }
            }
        }
        v
    }

    fn parse(s: &str) -> Option<Tier> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(Tier::Scalar),
            "avx2" => Some(Tier::Avx2),
            "avx512" => Some(Tier::Avx512),
            "neon" => Some(Tier::Neon),
            "neon-dotprod" => Some(Tier::NeonDotprod),
            _ => None,
        }
    }
}

/// The table of kernels of one tier.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub tier: Tier,
    pub dot_f32: fn(&[f32], &[f32]) -> f32,
    pub dot_f16: fn(&[f16], &[f32]) -> f32,
    pub dot_bf16: fn(&[bf16], &[f32]) -> f32,
    pub axpy_f32: fn(f32, &[f32], &mut [f32]),
    pub axpy_f16: fn(f32, &[f16], &mut [f32]),
    pub axpy_bf16: fn(f32, &[bf16], &mut [f32]),
    pub tile4x4_f32: fn(&[f32], usize, &[f32], usize, usize, &mut [f32; 16]),
    pub axpy4_f32: fn(&[f32; 4], [&[f32]; 4], &mut [f32]),
    pub axpy4_f16: fn(&[f32; 4], [&[f16]; 4], &mut [f32]),
    pub axpy4_bf16: fn(&[f32; 4], [&[bf16]; 4], &mut [f32]),
    /// Eight rows per pass: the decode down projection of float weights (PERF NOTES).
    pub axpy8_f32: fn(&[f32; 8], [&[f32]; 8], &mut [f32]),
    pub axpy8_f16: fn(&[f32; 8], [&[f16]; 8], &mut [f32]),
    pub axpy8_bf16: fn(&[f32; 8], [&[bf16]; 8], &mut [f32]),
    pub rank4x64_f32: fn(&[f32], usize, &[u32], &[f32], usize, &mut [f32; 256]),
    pub rank4x64_f16: fn(&[f32], usize, &[u32], &[f16], usize, &mut [f32; 256]),
    pub rank4x64_bf16: fn(&[f32], usize, &[u32], &[bf16], usize, &mut [f32; 256]),
}

impl Kernels {
    /// The table for `tier`, or an error if this CPU cannot run it.
    pub fn for_tier(tier: Tier) -> Result<Kernels> {
        if !Tier::available().contains(&tier) {
            return Err(Error::Argument(format!(
                "kernel tier '{}' is not supported by this CPU (available: {})",
                tier.name(),
                Tier::available()
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(match tier {
            Tier::Scalar => Kernels {
                tier,
                dot_f32: scalar::dot_f32,
                dot_f16: scalar::dot_f16,
                dot_bf16: scalar::dot_bf16,
                axpy_f32: scalar::axpy_f32,
                axpy_f16: scalar::axpy_f16,
                axpy_bf16: scalar::axpy_bf16,
                tile4x4_f32: scalar::tile4x4_f32,
                axpy4_f32: scalar::axpyn_f32::<4>,
                axpy4_f16: scalar::axpyn_f16::<4>,
                axpy4_bf16: scalar::axpyn_bf16::<4>,
                axpy8_f32: scalar::axpyn_f32::<8>,
                axpy8_f16: scalar::axpyn_f16::<8>,
                axpy8_bf16: scalar::axpyn_bf16::<8>,
                rank4x64_f32: scalar::rank4x64_f32,
                rank4x64_f16: scalar::rank4x64_f16,
                rank4x64_bf16: scalar::rank4x64_bf16,
            },
            #[cfg(target_arch = "x86_64")]
            Tier::Avx2 => Kernels {
                tier,
                dot_f32: x86_avx2::dot_f32,
                dot_f16: x86_avx2::dot_f16,
                dot_bf16: x86_avx2::dot_bf16,
                axpy_f32: x86_avx2::axpy_f32,
                axpy_f16: x86_avx2::axpy_f16,
                axpy_bf16: x86_avx2::axpy_bf16,
                tile4x4_f32: x86_avx2::tile4x4_f32,
                axpy4_f32: x86_avx2::axpyn_f32::<4>,
                axpy4_f16: x86_avx2::axpyn_f16::<4>,
                axpy4_bf16: x86_avx2::axpyn_bf16::<4>,
                axpy8_f32: x86_avx2::axpyn_f32::<8>,
                axpy8_f16: x86_avx2::axpyn_f16::<8>,
                axpy8_bf16: x86_avx2::axpyn_bf16::<8>,
                rank4x64_f32: x86_avx2::rank4x64_f32,
                rank4x64_f16: x86_avx2::rank4x64_f16,
                rank4x64_bf16: x86_avx2::rank4x64_bf16,
            },
            #[cfg(target_arch = "x86_64")]
            Tier::Avx512 => Kernels {
                tier,
                dot_f32: x86_avx512::dot_f32,
                dot_f16: x86_avx512::dot_f16,
                dot_bf16: x86_avx512::dot_bf16,
                axpy_f32: x86_avx512::axpy_f32,
                axpy_f16: x86_avx512::axpy_f16,
                axpy_bf16: x86_avx512::axpy_bf16,
                tile4x4_f32: x86_avx512::tile4x4_f32,
                axpy4_f32: x86_avx512::axpyn_f32::<4>,
                axpy4_f16: x86_avx512::axpyn_f16::<4>,
                axpy4_bf16: x86_avx512::axpyn_bf16::<4>,
                axpy8_f32: x86_avx512::axpyn_f32::<8>,
                axpy8_f16: x86_avx512::axpyn_f16::<8>,
                axpy8_bf16: x86_avx512::axpyn_bf16::<8>,
                rank4x64_f32: x86_avx512::rank4x64_f32,
                rank4x64_f16: x86_avx512::rank4x64_f16,
                rank4x64_bf16: x86_avx512::rank4x64_bf16,
            },
            // dotprod only changes int8 kernels; the float table is the NEON one.
            #[cfg(target_arch = "aarch64")]
            Tier::Neon | Tier::NeonDotprod => Kernels {
                tier,
                dot_f32: aarch64_neon::dot_f32,
                dot_f16: aarch64_neon::dot_f16,
                dot_bf16: aarch64_neon::dot_bf16,
                axpy_f32: aarch64_neon::axpy_f32,
                axpy_f16: aarch64_neon::axpy_f16,
                axpy_bf16: aarch64_neon::axpy_bf16,
                tile4x4_f32: aarch64_neon::tile4x4_f32,
                axpy4_f32: aarch64_neon::axpyn_f32::<4>,
                axpy4_f16: aarch64_neon::axpyn_f16::<4>,
                axpy4_bf16: aarch64_neon::axpyn_bf16::<4>,
                axpy8_f32: aarch64_neon::axpyn_f32::<8>,
                axpy8_f16: aarch64_neon::axpyn_f16::<8>,
                axpy8_bf16: aarch64_neon::axpyn_bf16::<8>,
                rank4x64_f32: aarch64_neon::rank4x64_f32,
                rank4x64_f16: aarch64_neon::rank4x64_f16,
                rank4x64_bf16: aarch64_neon::rank4x64_bf16,
            },
            #[allow(unreachable_patterns)]
            _ => unreachable!("available() only lists tiers compiled for this architecture"),
        })
    }
}

/// Choose the tier from `SPARSELM_KERNEL` or the fastest available.
fn select() -> Kernels {
    if let Ok(want) = std::env::var("SPARSELM_KERNEL") {
        if !want.trim().is_empty() && want.trim() != "auto" {
            match Tier::parse(&want).map(Kernels::for_tier) {
                Some(Ok(k)) => return k,
                _ => eprintln!(
                    "sparselm: SPARSELM_KERNEL={want} is unknown or unsupported on this CPU; \
                     using the fastest available tier"
                ),
            }
        }
    }
    let best = *Tier::available()
        .last()
        .expect("scalar is always available");
    Kernels::for_tier(best).expect("detected tier is available")
}

/// The process-wide kernel table, chosen on first use.
pub fn kernels() -> &'static Kernels {
    static K: OnceLock<Kernels> = OnceLock::new();
    K.get_or_init(select)
}

/// Bytes ahead of the current position at which the AVX-512 decode GEMV kernels (float row
/// dots, 16-row Q8_0/Q4_0) request weight lines with software prefetches; 0 = none.
/// `SPARSELM_PREFETCH=<bytes>` sets it (0 turns it off); by default 4096 on Intel CPUs, whose
/// L2 streamer stops at every 4 KiB page boundary (an f16 row of 2048 is one page), and 0 on
/// others (AMD Zen 4 measured no gain: PERF NOTES). Read once per process.
pub fn prefetch_distance() -> usize {
    static D: OnceLock<usize> = OnceLock::new();
    *D.get_or_init(|| {
        if let Ok(v) = std::env::var("SPARSELM_PREFETCH") {
            match v.trim().parse::<usize>() {
                Ok(d) => return d.min(1 << 20),
                Err(_) => eprintln!(
                    "sparselm: SPARSELM_PREFETCH={v} is not a byte count; using the default"
                ),
            }
        }
        if cpu_vendor_is_intel() {
            4096
        } else {
            0
        }
    })
}

/// CPUID leaf 0 names the vendor "GenuineIntel".
pub(crate) fn cpu_vendor_is_intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let r = std::arch::x86_64::__cpuid(0);
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&r.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&r.edx.to_le_bytes());
        v[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &v == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lengths() -> Vec<usize> {
        let mut v: Vec<usize> = (0..=130).collect();
        v.extend([255, 256, 257, 511, 512, 1000, 2048, 2049]);
        v
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn close(a: f32, b: f32, n: usize) -> bool {
        (a - b).abs() <= 1e-6 * (n as f32 + 1.0) * (1.0 + b.abs())
    }

    /// Strides and lengths whose bounds arithmetic overflows fail the kernels' checks (a panic)
    /// instead of wrapping past them into unchecked loads (these once segfaulted).
    #[test]
    fn tile_bounds_checks_do_not_wrap() {
        for tier in Tier::available() {
            let k = Kernels::for_tier(tier).unwrap();
            let (w, x) = ([1f32; 8], [1f32; 8]);
            // 3·xs ≡ 2 (mod 2^64): 3·xs + k wraps to a small number
            let xs = 0xAAAA_AAAA_AAAA_AAABusize.wrapping_mul(2);
            for (ws, xs, n) in [(1, 1, usize::MAX - 1), (2, xs, usize::MAX - 1), (2, xs, 6)] {
                let r = std::panic::catch_unwind(|| {
                    let mut out = [0f32; 16];
                    (k.tile4x4_f32)(&w, ws, &x, xs, n, &mut out);
                });
                assert!(
                    r.is_err(),
                    "{tier:?}: ws {ws} xs {xs} k {n} passed the bounds check"
                );
            }
        }
        #[cfg(target_arch = "x86_64")]
        if x86_bf16::supported() {
            let r = std::panic::catch_unwind(|| {
                let mut out = [[0f32; 4]; x86_bf16::MR];
                let lda = 0xCCCC_CCCC_CCCC_CCCDusize.wrapping_mul(3);
                x86_bf16::tile_nk(&[0], lda, &[0], 1, usize::MAX - 2, &mut out);
            });
            assert!(r.is_err(), "tile_nk passed the bounds check");
        }
    }

    #[test]
    fn every_tier_matches_scalar() {
        let s = Kernels::for_tier(Tier::Scalar).unwrap();
        for tier in Tier::available() {
            let k = Kernels::for_tier(tier).unwrap();
            for n in lengths() {
                for off in [0usize, 1, 3] {
                    let a = data(n + off, n as u32);
                    let b = data(n + off, n as u32 + 7);
                    let (a, b) = (&a[off..], &b[off..]);
                    let h: Vec<f16> = a.iter().map(|&x| f16::from_f32(x)).collect();
                    let bh: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
                    let (x, y) = ((s.dot_f32)(a, b), (k.dot_f32)(a, b));
                    assert!(close(y, x, n), "{tier:?} dot_f32 n={n}: {y} vs {x}");
                    let (x, y) = ((s.dot_f16)(&h, b), (k.dot_f16)(&h, b));
                    assert!(close(y, x, n), "{tier:?} dot_f16 n={n}: {y} vs {x}");
                    let (x, y) = ((s.dot_bf16)(&bh, b), (k.dot_bf16)(&bh, b));
                    assert!(close(y, x, n), "{tier:?} dot_bf16 n={n}: {y} vs {x}");
                    for (name, f, g) in
                        [("f32", s.axpy_f32 as fn(f32, &[f32], &mut [f32]), k.axpy_f32)]
                    {
                        let mut y1 = b.to_vec();
                        let mut y2 = b.to_vec();
                        f(0.37, a, &mut y1);
                        g(0.37, a, &mut y2);
                        for i in 0..n {
                            assert!(close(y2[i], y1[i], 1), "{tier:?} axpy_{name} n={n} i={i}");
                        }
                    }
                    let mut y1 = b.to_vec();
                    let mut y2 = b.to_vec();
                    (s.axpy_f16)(-1.5, &h, &mut y1);
                    (k.axpy_f16)(-1.5, &h, &mut y2);
                    assert!(
                        y1.iter().zip(&y2).all(|(p, q)| close(*q, *p, 1)),
                        "{tier:?} axpy_f16 n={n}"
                    );
                    let mut y1 = b.to_vec();
                    let mut y2 = b.to_vec();
                    (s.axpy_bf16)(2.25, &bh, &mut y1);
                    (k.axpy_bf16)(2.25, &bh, &mut y2);
                    assert!(
                        y1.iter().zip(&y2).all(|(p, q)| close(*q, *p, 1)),
                        "{tier:?} axpy_bf16 n={n}"
                    );
                }
            }
        }
    }

    #[test]
    fn tile4x4_matches_scalar() {
        let s = Kernels::for_tier(Tier::Scalar).unwrap();
        for tier in Tier::available() {
            let k = Kernels::for_tier(tier).unwrap();
            for n in [0usize, 1, 7, 8, 15, 16, 17, 33, 64, 100, 2048] {
                let ws = n + 3;
                let xs = n + 5;
                let w = data(3 * ws + n + 1, n as u32);
                let x = data(3 * xs + n + 1, n as u32 + 1);
                let (mut a, mut b) = ([0f32; 16], [0f32; 16]);
                (s.tile4x4_f32)(&w[1..], ws, &x[1..], xs, n, &mut a);
                (k.tile4x4_f32)(&w[1..], ws, &x[1..], xs, n, &mut b);
                for i in 0..16 {
                    assert!(
                        close(b[i], a[i], n),
                        "{tier:?} tile n={n} i={i}: {} vs {}",
                        b[i],
                        a[i]
                    );
                }
            }
        }
    }

    /// `axpy4` / `axpy8` of every tier against N single-row scalar AXPYs, for each dtype,
    /// over lengths 0..2·lanes, odd tails and misaligned rows (offset by one element).
    #[test]
    fn axpyn_matches_n_axpys() {
        fn check<T: Copy, const N: usize>(
            tier: Tier,
            what: &str,
            rows: &[Vec<T>],
            y0: &[f32],
            single: fn(f32, &[T], &mut [f32]),
            multi: fn(&[f32; N], [&[T]; N], &mut [f32]),
        ) {
            let a: [f32; N] =
                std::array::from_fn(|i| [0.5f32, -1.25, 2.0, 0.0, 1.5, -0.75, 0.25, -2.0][i]);
            let w: [&[T]; N] = std::array::from_fn(|i| &rows[i][1..]);
            let mut want = y0.to_vec();
            for i in 0..N {
                single(a[i], w[i], &mut want);
            }
            let mut got = y0.to_vec();
            multi(&a, w, &mut got);
            assert!(
                want.iter().zip(&got).all(|(p, q)| close(*q, *p, N)),
                "{tier:?} {what} N={N} n={}",
                y0.len()
            );
        }
        let s = Kernels::for_tier(Tier::Scalar).unwrap();
        for tier in Tier::available() {
            let k = Kernels::for_tier(tier).unwrap();
            for n in lengths() {
                let rows: Vec<Vec<f32>> = (0..8).map(|i| data(n + 1, n as u32 * 8 + i)).collect();
                let h: Vec<Vec<f16>> = rows
                    .iter()
                    .map(|r| r.iter().map(|&x| f16::from_f32(x)).collect())
                    .collect();
                let b: Vec<Vec<bf16>> = rows
                    .iter()
                    .map(|r| r.iter().map(|&x| bf16::from_f32(x)).collect())
                    .collect();
                let y0 = data(n, 99);
                check(tier, "axpy4_f32", &rows, &y0, s.axpy_f32, k.axpy4_f32);
                check(tier, "axpy8_f32", &rows, &y0, s.axpy_f32, k.axpy8_f32);
                check(tier, "axpy4_f16", &h, &y0, s.axpy_f16, k.axpy4_f16);
                check(tier, "axpy8_f16", &h, &y0, s.axpy_f16, k.axpy8_f16);
                check(tier, "axpy4_bf16", &b, &y0, s.axpy_bf16, k.axpy4_bf16);
                check(tier, "axpy8_bf16", &b, &y0, s.axpy_bf16, k.axpy8_bf16);
            }
        }
    }

    #[test]
    fn rank4x64_matches_scalar() {
        let s = Kernels::for_tier(Tier::Scalar).unwrap();
        let (ni, ws) = (40usize, 70usize);
        let w = data(ni * ws, 5);
        let wh: Vec<f16> = w.iter().map(|&x| f16::from_f32(x)).collect();
        let wb: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut act = data(4 * ni, 6);
        // sparsity patterns: zeros everywhere but some (token, row) pairs
        for (i, a) in act.iter_mut().enumerate() {
            if i % 3 == 0 || i % 7 == 0 {
                *a = 0.0;
            }
        }
        for tier in Tier::available() {
            let k = Kernels::for_tier(tier).unwrap();
            for js in [
                vec![],
                vec![3u32],
                (0..ni as u32).collect::<Vec<_>>(),
                (0..ni as u32).step_by(5).collect(),
            ] {
                let y0: Vec<f32> = data(256, 9);
                let mut a: [f32; 256] = y0.clone().try_into().unwrap();
                let mut b = a;
                (s.rank4x64_f32)(&act, ni, &js, &w[3..], ws, &mut a);
                (k.rank4x64_f32)(&act, ni, &js, &w[3..], ws, &mut b);
                assert!(
                    a.iter().zip(&b).all(|(p, q)| close(*q, *p, js.len())),
                    "{tier:?} rank f32"
                );
                let mut a: [f32; 256] = y0.clone().try_into().unwrap();
                let mut b = a;
                (s.rank4x64_f16)(&act, ni, &js, &wh[3..], ws, &mut a);
                (k.rank4x64_f16)(&act, ni, &js, &wh[3..], ws, &mut b);
                assert!(
                    a.iter().zip(&b).all(|(p, q)| close(*q, *p, js.len())),
                    "{tier:?} rank f16"
                );
                let mut a: [f32; 256] = y0.clone().try_into().unwrap();
                let mut b = a;
                (s.rank4x64_bf16)(&act, ni, &js, &wb[3..], ws, &mut a);
                (k.rank4x64_bf16)(&act, ni, &js, &wb[3..], ws, &mut b);
                assert!(
                    a.iter().zip(&b).all(|(p, q)| close(*q, *p, js.len())),
                    "{tier:?} rank bf16"
                );
            }
        }
    }

    #[test]
    fn scalar_dot_is_the_plain_sum() {
        let a = data(37, 1);
        let b = data(37, 2);
        let plain: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((scalar::dot_f32(&a, &b) as f64 - plain).abs() < 1e-5);
    }

    #[test]
    fn env_override_and_unknown_tier() {
        assert!(Tier::parse("AVX2") == Some(Tier::Avx2));
        assert!(Tier::parse("sse9").is_none());
        // The default table is the fastest available tier unless overridden.
        let chosen = kernels().tier;
        match std::env::var("SPARSELM_KERNEL")
            .ok()
            .and_then(|s| Tier::parse(&s))
        {
            Some(t) if Tier::available().contains(&t) => assert_eq!(chosen, t),
            _ => assert_eq!(Some(&chosen), Tier::available().last()),
        }
    }

    /// CI pins the CPU model (`QEMU_CPU=cortex-a72` → "neon", `cortex-a76` → "neon-dotprod")
    /// and sets `SPARSELM_EXPECT_TIER` so the run proves which tier detection chose.
    #[test]
    fn auto_selected_tier_is_the_expected_one() {
        let Some(want) = std::env::var("SPARSELM_EXPECT_TIER")
            .ok()
            .filter(|s| !s.is_empty())
        else {
            return;
        };
        let best = *Tier::available().last().unwrap();
        assert_eq!(best.name(), want, "available: {:?}", Tier::available());
        assert_eq!(Tier::parse(&want), Some(best));
        if std::env::var("SPARSELM_KERNEL").map_or(true, |s| s.trim().is_empty()) {
            assert_eq!(kernels().tier, best);
        }
        eprintln!("auto-selected kernel tier: {}", best.name());
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_tiers_parse_and_name() {
        assert_eq!(Tier::parse("NEON"), Some(Tier::Neon));
        assert_eq!(Tier::parse("neon-dotprod"), Some(Tier::NeonDotprod));
        assert_eq!(Tier::Neon.name(), "neon");
        assert_eq!(Tier::NeonDotprod.name(), "neon-dotprod");
        let tiers = Tier::available();
        assert!(tiers.contains(&Tier::Neon), "NEON is mandatory");
    }
}
