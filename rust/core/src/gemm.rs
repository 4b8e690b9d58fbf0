//! Prompt GEMMs (several tokens at once) in bf16 × bf16 → f32, on x86-64 CPUs with
//! AVX512_BF16 (`vdpbf16ps` does twice the multiply-adds of f32 FMA per instruction).
//!
//! Owns: the two prompt-time products of the model,
//! - [`matmul_nk`]: `Y[T, N] = X[T, K] · Wᵀ` for weights stored `[N, K]` (every projection);
//! - [`matmul_kn`]: `Y[T, N] = A[T, K] · W` for the transposed down projection `[K, N]`,
//!   visiting per tile of 6 tokens only the neuron pairs that are non-zero in one of them.
//!
//! Numerics: weights and activations are rounded to bf16 (nearest even), products are exact
//! and sums are f32. Weights stored as f16/f32/Q8_0/Q4_0 are widened and rounded per panel,
//! once per call, so every weight byte is read once per prompt. The decode path (one token)
//! never comes here. Callers decide whether this precision is acceptable (see
//! `Model::fast_gemm`); everything here is exact up to those roundings.
//!
//! Must not: know about layers or heads; be called when [`available`] is false.

// Other architectures compile the drivers' shared parts but never reach them.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_imports))]

use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::kernels::{kernels, Tier};
use crate::quant::{self, quant_kernels, BlockQ8_0};
#[cfg(target_arch = "x86_64")]
use crate::quant::{Planar, PlanarBlock};
use crate::tensor::{Matrix, Storage, QBLOCK};

#[cfg(target_arch = "x86_64")]
use crate::kernels::x86_bf16 as k;

/// Neuron pairs per packed panel of [`matmul_kn`] (1024 pairs × 64 columns × 4 B = 256 KiB,
/// half of a Zen 4 L2).
const KC_PAIRS: usize = 1024;

thread_local! {
    /// Per-thread packed weight panel (bf16 bits), reused across calls.
    static PANEL: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// bf16 prompt GEMMs can run here: the dispatched tier is avx512 and the CPU has AVX512_BF16.
pub fn available() -> bool {
    static A: OnceLock<bool> = OnceLock::new();
    *A.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            kernels().tier == Tier::Avx512 && k::supported()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (kernels(), Tier::Scalar);
            false
        }
    })
}

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of elements (distinct output columns).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Row `r`, columns `c0..c0 + n` of `w`, as bf16 bits into `out[..n]`. Quantized matrices
/// need `c0` and `n` to be multiples of 32.
#[cfg(target_arch = "x86_64")]
fn row_seg_bf16(w: &Matrix, r: usize, c0: usize, n: usize, out: &mut [u16]) {
    let s = r * w.cols + c0;
    match &w.data {
        Storage::F32(v) => k::f32_to_bf16(&v[s..s + n], out),
        Storage::F16(v) => k::f16_to_bf16(&v[s..s + n], out),
        Storage::BF16(v) => {
            for (o, x) in out[..n].iter_mut().zip(&v[s..s + n]) {
                *o = x.to_bits();
            }
        }
        // planar rows: blocks joined back 8 at a time, then the GGUF converters
        Storage::Q4_0P(p) => planar_seg_bf16(
            p,
            r,
            s / QBLOCK - r * p.nb,
            n / QBLOCK,
            out,
            k::q4_0_to_bf16,
        ),
        Storage::Q8_0P(p) => planar_seg_bf16(
            p,
            r,
            s / QBLOCK - r * p.nb,
            n / QBLOCK,
            out,
            k::q8_0_to_bf16,
        ),
        Storage::Q4_0x16(_) | Storage::Q8_0x16(_) => {
            let mut t = vec![0f32; w.cols];
            w.row_to_f32(r, &mut t);
            k::f32_to_bf16(&t[c0..c0 + n], out);
        }
        Storage::Q8_0(b) => k::q8_0_to_bf16(&b[s / QBLOCK..(s + n) / QBLOCK], out),
        Storage::Q4_0(b) => k::q4_0_to_bf16(&b[s / QBLOCK..(s + n) / QBLOCK], out),
    }
}

/// Rows `r0..r1` of `w` as a bf16 panel of `nrp >= r1 - r0` rows of `w.cols` (the rows past
/// `r1` zero, padding the last kernel group): bf16 weights that need no padding are used in
/// place, anything else is converted into `pan`.
#[cfg(target_arch = "x86_64")]
fn nk_panel<'a>(
    w: &'a Matrix,
    r0: usize,
    r1: usize,
    nrp: usize,
    pan: &'a mut Vec<u16>,
) -> &'a [u16] {
    let (kk, nr) = (w.cols, r1 - r0);
    debug_assert!(nrp >= nr);
    if let Storage::BF16(v) = &w.data {
        if nr == nrp {
            let s = &v[r0 * kk..r1 * kk];
            // SAFETY: half::bf16 is #[repr(transparent)] over u16.
            return unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u16, s.len()) };
        }
    }
    pan.clear();
    pan.resize(nrp * kk, 0);
    for q in 0..nr {
        row_seg_bf16(w, r0 + q, 0, kk, &mut pan[q * kk..(q + 1) * kk]);
    }
    &pan[..]
}

/// Blocks `b0..b0 + nb` of planar row `r` as bf16 through the GGUF block converter `conv`.
#[cfg(target_arch = "x86_64")]
fn planar_seg_bf16<B: PlanarBlock + Default>(
    p: &Planar<B::Codes>,
    r: usize,
    b0: usize,
    nb: usize,
    out: &mut [u16],
    conv: fn(&[B], &mut [u16]),
) {
    let mut tmp = [B::default(); 8];
    for c in (0..nb).step_by(8) {
        let m = 8.min(nb - c);
        for (i, t) in tmp[..m].iter_mut().enumerate() {
            *t = p.block(r, b0 + c + i);
        }
        conv(&tmp[..m], &mut out[c * QBLOCK..(c + m) * QBLOCK]);
    }
}

/// Rows `r` and (with `two`) `r + 1` of a planar matrix (`r` even: one group), columns
/// `c0..c0 + n` (whole blocks), as bf16 pairs `out[c] = bf16(w[r][c]) | bf16(w[r+1][c]) << 16`
/// through `conv` (a `*_pair_to_bf16` kernel), one call per run of blocks stored
/// consecutively (a code chunk / scale line or a record; a 64-column panel is one run).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::type_complexity)]
fn planar_pairs<Q: quant::Pod>(
    p: &Planar<Q>,
    r: usize,
    two: bool,
    c0: usize,
    n: usize,
    out: &mut [u32],
    conv: fn((&[half::f16], &[Q]), Option<(&[half::f16], &[Q])>, &mut [u32]),
) {
    let (b0, nb) = (c0 / QBLOCK, n / QBLOCK);
    let g = p.geom();
    let mut b = b0;
    while b < b0 + nb {
        // blocks stored consecutively from b in both rows (the runs depend on b only)
        let m = g.code_run(b).min(g.scale_run(b)).min(b0 + nb - b);
        let hi = two.then(|| (p.scales(r + 1, b, m), p.codes(r + 1, b, m)));
        conv(
            (p.scales(r, b, m), p.codes(r, b, m)),
            hi,
            &mut out[(b - b0) * QBLOCK..(b + m - b0) * QBLOCK],
        );
        b += m;
    }
}

/// AMX tiles run this GEMM: AMX-BF16 is usable ([`crate::amx::available`]) and K is a whole
/// number of 32-wide tile steps (every PLM projection); otherwise the AVX-512 BF16 kernels do.
fn use_amx(k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        k > 0 && k.is_multiple_of(crate::amx::K_STEP) && available() && crate::amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = k;
        false
    }
}

/// The engine that runs the prompt GEMMs here: `"amx-bf16"`, `"avx512-bf16"` or `"none"`
/// (prompts then use the decode kernels, one token at a time per weight row group).
pub fn engine() -> &'static str {
    if !available() {
        "none"
    } else if use_amx(K_STEP_ANY) {
        "amx-bf16"
    } else {
        "avx512-bf16"
    }
}

/// A K that every tile path accepts (for [`engine`]).
const K_STEP_ANY: usize = 64;

/// `Y[T, N] = X[T, K] · Wᵀ` (`w: [N, K]`, `x: [t, K]`, `y: [t, N]`), rows split across the
/// current rayon pool.
pub fn matmul_nk(w: &Matrix, x: &[f32], t: usize, y: &mut [f32]) {
    matmul_nk_on(w, x, t, y, use_amx(w.cols))
}

/// [`matmul_nk`] on AMX tiles (`amx`, which needs `use_amx(w.cols)`) or AVX-512 BF16.
fn matmul_nk_on(w: &Matrix, x: &[f32], t: usize, y: &mut [f32], amx: bool) {
    #[cfg(target_arch = "x86_64")]
    if amx {
        return matmul_nk_amx(w, x, t, y);
    }
    let _ = amx;
    #[cfg(target_arch = "x86_64")]
    {
        assert!(available(), "bf16 GEMM unavailable");
        let (n, kk) = (w.rows, w.cols);
        assert!(
            x.len() >= t.saturating_mul(kk) && y.len() >= t.saturating_mul(n),
            "matmul_nk shapes"
        );
        let mr = k::MR;
        let tp = t.div_ceil(mr) * mr;
        // activations [tp, K] in bf16, zero rows pad the last tile
        let mut xb = vec![0u16; tp * kk];
        for i in 0..t {
            k::f32_to_bf16(&x[i * kk..(i + 1) * kk], &mut xb[i * kk..(i + 1) * kk]);
        }
        let threads = rayon::current_num_threads().max(1);
        // Rows per task: a multiple of 4, at most 64 (a 64 × 2048 bf16 panel is 256 KiB).
        let chunk = (n.div_ceil(threads * 4).div_ceil(4) * 4).clamp(4, 64);
        let out = OutPtr(y.as_mut_ptr());
        let ylen = y.len();
        (0..n.div_ceil(chunk)).into_par_iter().for_each(|ci| {
            let (r0, r1) = (ci * chunk, ((ci + 1) * chunk).min(n));
            let nr = r1 - r0;
            let nrp = nr.div_ceil(4) * 4;
            PANEL.with(|pan| {
                let mut pan = pan.borrow_mut();
                let panel = nk_panel(w, r0, r1, nrp, &mut pan);
                let mut tile = [[0f32; 4]; k::MR];
                for ti in (0..tp).step_by(mr) {
                    let m = mr.min(t - ti);
                    for g in (0..nr).step_by(4) {
                        k::tile_nk(&xb[ti * kk..], kk, &panel[g * kk..], kk, kk, &mut tile);
                        for (i, row) in tile.iter().enumerate().take(m) {
                            for (j, &v) in row.iter().enumerate().take((nr - g).min(4)) {
                                let idx = (ti + i) * n + r0 + g + j;
                                debug_assert!(idx < ylen);
                                // SAFETY: idx < t·n <= y.len(); column r0+g+j belongs to this
                                // task alone.
                                unsafe { *out.get().add(idx) = v };
                            }
                        }
                    }
                }
            });
        });
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, x, t, y);
        unreachable!("bf16 GEMM is x86-64 only; check available()");
    }
}

/// [`matmul_nk`] on AMX tiles: tasks of up to 64 weight rows (bf16 panels as the AVX-512
/// path builds them, zero rows up to a multiple of 32), each running [`amx::nk_pair`] over
/// every pair of 16-token tiles.
#[cfg(target_arch = "x86_64")]
fn matmul_nk_amx(w: &Matrix, x: &[f32], t: usize, y: &mut [f32]) {
    use crate::amx;
    let (n, kk) = (w.rows, w.cols);
    assert!(
        x.len() >= t.saturating_mul(kk) && y.len() >= t.saturating_mul(n),
        "matmul_nk shapes"
    );
    assert!(use_amx(kk), "AMX GEMM unavailable for K = {kk}");
    let ks = kk / amx::K_STEP;
    let tiles = t.div_ceil(32) * 2; // token tiles of 16, in pairs
    let mut xt = vec![0u32; tiles * ks * 256];
    {
        let mut xb = vec![0u16; t * kk];
        for i in 0..t {
            k::f32_to_bf16(&x[i * kk..(i + 1) * kk], &mut xb[i * kk..(i + 1) * kk]);
        }
        amx::pack_tokens(&xb, kk, t, kk, tiles, &mut xt);
    }
    let threads = rayon::current_num_threads().max(1);
    // Rows per task: a multiple of 32, at most 64 (a 64 × 2048 bf16 panel is 256 KiB).
    let chunk = (n.div_ceil(threads * 2).div_ceil(32) * 32).clamp(32, 64);
    let out = OutPtr(y.as_mut_ptr());
    let xt = &xt[..];
    (0..n.div_ceil(chunk)).into_par_iter().for_each(|ci| {
        let (r0, r1) = (ci * chunk, ((ci + 1) * chunk).min(n));
        let nr = r1 - r0;
        let nrp = nr.div_ceil(32) * 32;
        PANEL.with(|pan| {
            let mut pan = pan.borrow_mut();
            let panel = nk_panel(w, r0, r1, nrp, &mut pan);
            let _tiles = amx::Tiles::configure();
            let mut c = [[0f32; 256]; 4];
            for g in (0..nr).step_by(32) {
                for h in (0..tiles).step_by(2) {
                    // SAFETY: tiles configured above; the panel holds nrp >= g + 32 rows of kk
                    // bf16 (kk = 32·ks); xt holds `tiles` token tiles of ks·256 pairs, h + 1 <
                    // tiles.
                    unsafe {
                        amx::nk_pair(
                            panel.as_ptr().add(g * kk),
                            kk * 2,
                            xt.as_ptr().add(h * ks * 256),
                            xt.as_ptr().add((h + 1) * ks * 256),
                            ks,
                            &mut c,
                        )
                    };
                    for (q, tile) in c.iter().enumerate() {
                        let (row0, tok0) = (g + 16 * (q / 2), 16 * (h + q % 2));
                        for r in 0..16.min(nr.saturating_sub(row0)) {
                            for j in 0..16.min(t.saturating_sub(tok0)) {
                                let idx = (tok0 + j) * n + r0 + row0 + r;
                                // SAFETY: tok0 + j < t and r0 + row0 + r < r1 <= n, so idx <
                                // t·n <= y.len(); this row belongs to this task alone.
                                unsafe { *out.get().add(idx) = tile[r * 16 + j] };
                            }
                        }
                    }
                }
            }
        });
    });
}

/// `Y[T, N] = A[T, K] · W` (`w: [K, N]`, `a: [t, K]`, `y: [t, N]`). With `sparse`, each tile
/// of 6 tokens visits only the k-pairs (2p, 2p+1) where one of its tokens is non-zero (on AMX
/// tiles: each tile of 16 tokens, the 16-pair chunks): exact, since the skipped products are
/// zero. Column panels of 64 are split across the pool.
pub fn matmul_kn(w: &Matrix, a: &[f32], t: usize, sparse: bool, y: &mut [f32]) {
    matmul_kn_on(w, a, t, sparse, y, use_amx(w.rows))
}

/// [`matmul_kn`] on AMX tiles (`amx`, which needs `use_amx(w.rows)`) or AVX-512 BF16.
fn matmul_kn_on(w: &Matrix, a: &[f32], t: usize, sparse: bool, y: &mut [f32], amx: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(available(), "bf16 GEMM unavailable");
        let (kk, n) = (w.rows, w.cols);
        assert!(
            a.len() >= t.saturating_mul(kk) && y.len() >= t.saturating_mul(n),
            "matmul_kn shapes"
        );
        assert!(!amx || use_amx(kk), "AMX GEMM unavailable for K = {kk}");
        // tokens per tile: 16 rows of an AMX tile, or the AVX-512 kernel's 6
        let mr = if amx { 16 } else { k::MR };
        let tp = t.div_ceil(mr) * mr;
        let kp = kk.div_ceil(2);
        // activations as bf16 pairs [tp, kp] (zero padded)
        let mut ab = vec![0u32; tp * kp];
        {
            let mut row = vec![0u16; 2 * kp];
            for i in 0..t {
                k::f32_to_bf16(&a[i * kk..(i + 1) * kk], &mut row);
                for (p, o) in ab[i * kp..(i + 1) * kp].iter_mut().enumerate() {
                    *o = row[2 * p] as u32 | (row[2 * p + 1] as u32) << 16;
                }
            }
        }
        // per token tile: the pairs to visit (sorted); on AMX tiles the 16-pair chunks
        let unit = if amx { 16 } else { 1 };
        let lists: Vec<Vec<u32>> = (0..tp / mr)
            .map(|g| {
                let rows = &ab[g * mr * kp..(g + 1) * mr * kp];
                (0..kp.div_ceil(unit) as u32)
                    .filter(|&c| {
                        let ps = c as usize * unit..((c as usize + 1) * unit).min(kp);
                        !sparse
                            || (0..mr).any(|i| rows[i * kp..][ps.clone()].iter().any(|&v| v != 0))
                    })
                    .collect()
            })
            .collect();
        let out = OutPtr(y.as_mut_ptr());
        let nw = k::NR_KN;
        (0..n.div_ceil(nw)).into_par_iter().for_each(|ci| {
            let c0 = ci * nw;
            let nc = nw.min(n - c0);
            // columns rounded to what the row converter accepts (quantized: whole blocks)
            let ncv = if w.dtype().is_quantized() {
                nc.div_ceil(QBLOCK) * QBLOCK
            } else {
                nc
            };
            PANEL.with(|pan| {
                let mut pan = pan.borrow_mut();
                let mut lo = vec![0u16; nw];
                let mut hi = vec![0u16; nw];
                // AMX: the tiles of this column panel for every token tile, kept across the
                // K panels
                let _tiles = amx.then(crate::amx::Tiles::configure);
                let mut acc = vec![[[0f32; 64]; 16]; if amx { tp / 16 } else { 0 }];
                let mut p0 = 0;
                while p0 < kp {
                    let p1 = (p0 + KC_PAIRS).min(kp);
                    pan.clear();
                    pan.resize(2 * (p1 - p0) * nw, 0);
                    // SAFETY: u16 → u32 view of a Vec<u16> whose length is even; alignment is
                    // checked below (Vec<u16> from the global allocator is 4-aligned in
                    // practice; if not, fall back to an aligned copy).
                    let panel: &mut [u32] = {
                        let ptr = pan.as_mut_ptr();
                        assert!((ptr as usize).is_multiple_of(4), "panel alignment");
                        unsafe { std::slice::from_raw_parts_mut(ptr as *mut u32, pan.len() / 2) }
                    };
                    for p in p0..p1 {
                        let dst = &mut panel[(p - p0) * nw..(p - p0 + 1) * nw];
                        let two = 2 * p + 1 < kk;
                        match &w.data {
                            // planar rows: both rows dequantized and paired in one pass
                            Storage::Q4_0P(q) => {
                                planar_pairs(q, 2 * p, two, c0, ncv, dst, k::q4_0_pair_to_bf16);
                                dst[nc..].fill(0);
                            }
                            Storage::Q8_0P(q) => {
                                planar_pairs(q, 2 * p, two, c0, ncv, dst, k::q8_0_pair_to_bf16);
                                dst[nc..].fill(0);
                            }
                            _ => {
                                hi.fill(0);
                                row_seg_bf16(w, 2 * p, c0, ncv, &mut lo);
                                if two {
                                    row_seg_bf16(w, 2 * p + 1, c0, ncv, &mut hi);
                                }
                                lo[nc..].fill(0);
                                hi[nc..].fill(0);
                                k::interleave(&lo, &hi, dst);
                            }
                        }
                    }
                    if amx {
                        for (g, (list, c)) in lists.iter().zip(acc.iter_mut()).enumerate() {
                            let s = list.partition_point(|&ch| (ch as usize) * 16 < p0);
                            let e = list.partition_point(|&ch| (ch as usize) * 16 < p1);
                            // SAFETY: tiles configured above; kp and p0 are multiples of 16
                            // (K = 32·ks, KC_PAIRS = 1024), so every listed chunk in p0..p1
                            // lies inside row g·16.. of ab ([tp, kp]) and inside the panel
                            // ((p1 − p0) pair rows of nw = 64 u32).
                            unsafe {
                                crate::amx::kn_panel(
                                    ab.as_ptr().add(g * 16 * kp + p0),
                                    kp * 4,
                                    panel.as_ptr(),
                                    &list[s..e],
                                    (p0 / 16) as u32,
                                    c,
                                    p0 > 0,
                                )
                            };
                        }
                        p0 = p1;
                        continue;
                    }
                    for (g, list) in lists.iter().enumerate() {
                        let ti = g * mr;
                        let m = mr.min(t - ti);
                        let s = list.partition_point(|&p| (p as usize) < p0);
                        let e = list.partition_point(|&p| (p as usize) < p1);
                        // SAFETY: rows ti..ti+m, columns c0..c0+nc of y, which lie in y:
                        // (ti+m-1)·n + c0 + nc <= t·n <= y.len(); the columns belong to this
                        // task alone. A pointer, not a slice: the rows' span holds other
                        // tasks' columns, written at the same time.
                        unsafe {
                            k::tile_kn(
                                &ab[ti * kp..],
                                kp,
                                m,
                                &list[s..e],
                                p0,
                                panel,
                                out.get().add(ti * n + c0),
                                (m - 1) * n + nc,
                                n,
                                nc,
                                p0 > 0,
                            )
                        };
                    }
                    p0 = p1;
                }
                for (g, c) in acc.iter().enumerate() {
                    for (j, row) in c.iter().enumerate().take(t.saturating_sub(16 * g)) {
                        let at = (16 * g + j) * n + c0;
                        // SAFETY: token 16g + j < t and columns c0..c0 + nc <= n, so the
                        // range lies inside y (t·n); these columns belong to this task alone.
                        let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(at), nc) };
                        dst.copy_from_slice(&row[..nc]);
                    }
                }
            });
        });
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, a, t, sparse, y, amx);
        unreachable!("bf16 GEMM is x86-64 only; check available()");
    }
}

/// `Y[T, N] = X[T, K] · Wᵀ` for weights in the 16-row interleaved Q4_0/Q8_0 layouts
/// (`Matrix::into_gemv_layout`): each input row is quantized to Q8_0 as in decoding and the
/// products are VNNI int8 dot products; every (row, token) result equals what the GEMV of that
/// token alone gives, bit for bit. Row groups of 16 are split across the current pool.
pub fn matmul_q16(w: &Matrix, x: &[f32], t: usize, y: &mut [f32]) {
    matmul_q16_on(w, x, t, y, use_amx_int8())
}

/// AMX-INT8 tiles run [`matmul_q16`]: the CPU has them (with AMX-BF16, see
/// [`crate::amx::available_int8`]) and the AVX-512 tier applies the scales.
fn use_amx_int8() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        kernels().tier == Tier::Avx512 && crate::amx::available_int8()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`matmul_q16`] on AMX-INT8 tiles (`amx`, which needs `use_amx_int8()`) or AVX-512 VNNI.
fn matmul_q16_on(w: &Matrix, x: &[f32], t: usize, y: &mut [f32], amx: bool) {
    let (n, kk) = (w.rows, w.cols);
    assert!(
        x.len() >= t.saturating_mul(kk) && y.len() >= t.saturating_mul(n),
        "matmul_q16 shapes"
    );
    let nb = kk / QBLOCK;
    let mut xq = vec![BlockQ8_0::default(); t * nb];
    for j in 0..t {
        quant::quantize_row_q8_0(&x[j * kk..(j + 1) * kk], &mut xq[j * nb..(j + 1) * nb])
            .expect("interleaved matrices have cols % 32 == 0");
    }
    let mut xsum = Vec::new();
    w.input_sums(&xq, &mut xsum);
    #[cfg(target_arch = "x86_64")]
    if amx {
        assert!(use_amx_int8(), "AMX-INT8 unavailable");
        return matmul_q16_amx(w, &xq, &xsum, t, y);
    }
    let _ = amx;
    let groups = n / 16;
    let per = groups
        .div_ceil(rayon::current_num_threads().max(1) * 4)
        .max(1);
    let out = OutPtr(y.as_mut_ptr());
    let qk = quant_kernels();
    (0..groups.div_ceil(per)).into_par_iter().for_each(|ci| {
        let mut tile = vec![0f32; 16 * t];
        for g in ci * per..((ci + 1) * per).min(groups) {
            match &w.data {
                Storage::Q4_0x16(b) => (qk.gemm16_q4_0.expect("layout implies kernel"))(
                    &b[g * nb..(g + 1) * nb],
                    &xq,
                    &xsum,
                    t,
                    &mut tile,
                ),
                Storage::Q8_0x16(b) => (qk.gemm16_q8_0.expect("layout implies kernel"))(
                    &b[g * nb..(g + 1) * nb],
                    &xq,
                    &xsum,
                    t,
                    &mut tile,
                ),
                _ => unreachable!("matmul_q16 on a matrix without the interleaved layout"),
            }
            for j in 0..t {
                for i in 0..16 {
                    // SAFETY: j·n + 16g + i < t·n <= y.len(); row group g belongs to this task.
                    unsafe { *out.get().add(j * n + 16 * g + i) = tile[16 * j + i] };
                }
            }
        }
    });
}

/// [`matmul_q16`] on AMX-INT8 tiles: the tokens' Q8_0 codes as a row-major byte matrix (16-token
/// tiles, zero rows past `t`), then per 16-row group and token tile one [`crate::amx::q16_tokens`]
/// (Q4_0 codes unpacked to bytes once per group).
#[cfg(target_arch = "x86_64")]
fn matmul_q16_amx(w: &Matrix, xq: &[BlockQ8_0], xsum: &[i32], t: usize, y: &mut [f32]) {
    use crate::amx;
    use crate::quant::{BlockQ4_0x16, BlockQ8_0x16};
    let (n, kk) = (w.rows, w.cols);
    let nb = kk / QBLOCK;
    let tp = t.div_ceil(16) * 16;
    // [tp, K] token codes, [tp, nb] scales and code-offset corrections (zero padded)
    let mut xi = vec![0i8; tp * kk];
    let mut dx = vec![0f32; tp * nb];
    let mut xs = vec![0i32; tp * nb];
    for (j, blocks) in xq.chunks_exact(nb).take(t).enumerate() {
        for (b, blk) in blocks.iter().enumerate() {
            xi[j * kk + b * QBLOCK..j * kk + (b + 1) * QBLOCK].copy_from_slice(&blk.qs);
            dx[j * nb + b] = blk.d.to_f32();
            xs[j * nb + b] = xsum[j * nb + b];
        }
    }
    let groups = n / 16;
    let per = groups
        .div_ceil(rayon::current_num_threads().max(1) * 4)
        .max(1);
    let out = OutPtr(y.as_mut_ptr());
    let (xi, dx, xs) = (&xi[..], &dx[..], &xs[..]);
    (0..groups.div_ceil(per)).into_par_iter().for_each(|ci| {
        let _tiles = amx::Tiles::configure_int8();
        let mut unpacked = vec![
            [0u8; 512];
            if matches!(w.data, Storage::Q4_0x16(_)) {
                nb
            } else {
                0
            }
        ];
        let mut tile = [[0f32; 16]; 16];
        for g in ci * per..((ci + 1) * per).min(groups) {
            let (codes, cstride, d, dstride) = match &w.data {
                Storage::Q8_0x16(bl) => {
                    let p = bl[g * nb..(g + 1) * nb].as_ptr() as *const u8;
                    let sz = std::mem::size_of::<BlockQ8_0x16>();
                    // SAFETY: qs lies inside the block (repr(C)).
                    let qs = unsafe { p.add(std::mem::offset_of!(BlockQ8_0x16, qs)) };
                    (qs, sz, p, sz)
                }
                Storage::Q4_0x16(bl) => {
                    // low nibbles of qs[q] are codes 4q..4q+4 of each row (tile row q), high
                    // nibbles codes 16+4q.. (tile row 4+q)
                    for (u, blk) in unpacked.iter_mut().zip(&bl[g * nb..(g + 1) * nb]) {
                        for (q, v) in blk.qs.iter().enumerate() {
                            for (i, &c) in v.iter().enumerate() {
                                u[64 * q + i] = c & 0x0F;
                                u[64 * (4 + q) + i] = c >> 4;
                            }
                        }
                    }
                    let p = bl[g * nb..(g + 1) * nb].as_ptr() as *const u8;
                    (
                        unpacked.as_ptr() as *const u8,
                        512,
                        p,
                        std::mem::size_of::<BlockQ4_0x16>(),
                    )
                }
                _ => unreachable!("matmul_q16 on a matrix without the interleaved layout"),
            };
            for tt in 0..tp / 16 {
                // SAFETY: int8 tiles configured above; codes/d cover this group's nb blocks
                // (strides of whole blocks); xi, dx and xs hold tp >= 16tt + 16 token rows.
                unsafe {
                    amx::q16_tokens(
                        codes,
                        cstride,
                        d,
                        dstride,
                        nb,
                        xi.as_ptr().add(16 * tt * kk),
                        kk,
                        dx.as_ptr().add(16 * tt * nb),
                        xs.as_ptr().add(16 * tt * nb),
                        &mut tile,
                    )
                };
                for (j, row) in tile.iter().enumerate().take(t.saturating_sub(16 * tt)) {
                    let at = (16 * tt + j) * n + 16 * g;
                    // SAFETY: token 16tt + j < t and rows 16g..16g + 16 <= n, inside y (t·n);
                    // row group g belongs to this task alone.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(at), 16) };
                    dst.copy_from_slice(row);
                }
            }
        }
    });
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::tensor::DType;
    use half::bf16;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(7);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn rb(x: f32) -> f64 {
        bf16::from_f32(x).to_f32() as f64
    }

    /// Widened weights of `w` (exact).
    fn dense(w: &Matrix) -> Vec<f32> {
        let mut v = vec![0f32; w.rows * w.cols];
        for r in 0..w.rows {
            w.row_to_f32(r, &mut v[r * w.cols..(r + 1) * w.cols]);
        }
        v
    }

    /// The tile engines to test for a K: AVX-512 BF16, and AMX where this CPU has it.
    fn engines(k: usize) -> Vec<bool> {
        let mut v = vec![false];
        if use_amx(k) {
            v.push(true);
        }
        v
    }

    /// Shapes whose products overflow fail the shape checks (a panic) instead of wrapping past
    /// them into out-of-bounds stores (this once segfaulted).
    #[test]
    fn shape_checks_do_not_wrap() {
        if !available() {
            return;
        }
        let w = Matrix::from_f32(1usize << 60, 0, &[], DType::F32);
        let r = std::panic::catch_unwind(|| matmul_nk(&w, &[], 16, &mut [0f32; 1]));
        assert!(r.is_err(), "matmul_nk: 16 · 2^60 rows passed");
    }

    #[test]
    fn engine_names_the_tiles_in_use() {
        let e = engine();
        #[cfg(target_arch = "x86_64")]
        let amx = crate::amx::available();
        #[cfg(not(target_arch = "x86_64"))]
        let amx = false;
        match (available(), amx) {
            (false, _) => assert_eq!(e, "none"),
            (true, true) => assert_eq!(e, "amx-bf16"),
            (true, false) => assert_eq!(e, "avx512-bf16"),
        }
        eprintln!("prompt GEMM engine here: {e}");
        // A Linux that lists the AMX flags supports them (5.16+), so the tile paths must be
        // usable and so tested here, not silently skipped.
        #[cfg(target_arch = "x86_64")]
        {
            let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let listed = ["amx_tile", "amx_bf16", "amx_int8"]
                .iter()
                .all(|f| flags.split_whitespace().any(|w| w == *f));
            let off = std::env::var("SPARSELM_AMX").is_ok_and(|v| v.trim() == "0");
            if listed && !off && available() {
                assert!(crate::amx::cpu_has_amx_bf16());
                assert!(
                    amx,
                    "the CPU and kernel list AMX, but the tiles are unusable here"
                );
                assert!(use_amx_int8(), "AMX-INT8 listed but unusable");
            }
        }
    }

    fn check(got: &[f32], want: &[f64], scale: &[f64], what: &str) {
        for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
            // products exact, f32 sums: error ≤ K·2⁻²⁴·Σ|a·b|; use a looser 1e-5 relative.
            assert!(
                (g as f64 - w).abs() <= 1e-5 * s + 1e-30,
                "{what}: element {i}: got {g}, want {w} (Σ|ab| = {s})"
            );
        }
    }

    #[test]
    fn matmul_nk_matches_bf16_rounded_reference() {
        if !available() {
            eprintln!("bf16 GEMM not available on this CPU; skipping");
            return;
        }
        for &(n, kk) in &[
            (1, 1),
            (3, 5),
            (4, 32),
            (7, 33),
            (64, 64),
            (70, 96),
            (130, 257),
            (9, 2048),
            (33, 96),
        ] {
            for dt in [
                DType::F32,
                DType::F16,
                DType::BF16,
                DType::Q8_0,
                DType::Q4_0,
            ] {
                if dt.is_quantized() && kk % 32 != 0 {
                    continue;
                }
                let w = Matrix::from_f32(n, kk, &data(n * kk, (n * 31 + kk) as u32), dt);
                let wf = dense(&w);
                for t in [1usize, 2, 5, 6, 7, 13, 17, 40] {
                    let x = data(t * kk, (t * 7 + n) as u32);
                    let mut want = vec![0f64; t * n];
                    let mut scale = vec![0f64; t * n];
                    for i in 0..t {
                        for r in 0..n {
                            for p in 0..kk {
                                let pr = rb(x[i * kk + p]) * rb(wf[r * kk + p]);
                                want[i * n + r] += pr;
                                scale[i * n + r] += pr.abs();
                            }
                        }
                    }
                    for amx in engines(kk) {
                        let mut y = vec![f32::NAN; t * n];
                        matmul_nk_on(&w, &x, t, &mut y, amx);
                        let what = format!("nk {dt:?} n={n} k={kk} t={t} amx={amx}");
                        check(&y, &want, &scale, &what);
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_q16_equals_per_token_gemv() {
        let mut engines = vec![false];
        if use_amx_int8() {
            engines.push(true);
        }
        for dt in [DType::Q4_0, DType::Q8_0] {
            for &(n, kk) in &[(16usize, 32usize), (48, 96), (64, 2048)] {
                let w =
                    Matrix::from_f32(n, kk, &data(n * kk, (n + kk) as u32), dt).into_gemv_layout();
                if !w.is_interleaved() {
                    eprintln!("no 16-row kernel on this CPU; skipping");
                    return;
                }
                for (t, amx) in [1usize, 3, 4, 7, 17, 33]
                    .into_iter()
                    .flat_map(|t| engines.iter().map(move |&e| (t, e)))
                {
                    let x = data(t * kk, (t * 5 + n) as u32);
                    let mut y = vec![f32::NAN; t * n];
                    matmul_q16_on(&w, &x, t, &mut y, amx);
                    for j in 0..t {
                        let mut yv = vec![0f32; n];
                        w.matvec(&x[j * kk..(j + 1) * kk], &mut yv);
                        for r in 0..n {
                            assert_eq!(
                                y[j * n + r].to_bits(),
                                yv[r].to_bits(),
                                "{dt:?} n={n} k={kk} t={t} amx={amx}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_kn_matches_reference_dense_and_sparse() {
        if !available() {
            eprintln!("bf16 GEMM not available on this CPU; skipping");
            return;
        }
        for &(kk, n) in &[
            (1, 1),
            (3, 16),
            (64, 32),
            (97, 64),
            (256, 96),
            (2500, 130),
            (2080, 64),
        ] {
            for dt in [
                DType::F32,
                DType::F16,
                DType::BF16,
                DType::Q8_0,
                DType::Q4_0,
            ] {
                if dt.is_quantized() && n % 32 != 0 {
                    continue;
                }
                let w = Matrix::from_f32(kk, n, &data(kk * n, (kk * 3 + n) as u32), dt);
                let wf = dense(&w);
                // the decode layout of W_downᵀ (planar, where this CPU has its kernel), whose
                // panels are built by the paired converters: the same bits as the GGUF rows
                let planar = w.clone().into_down_layout();
                for t in [1usize, 4, 6, 11, 17] {
                    for zero_frac in [0.0f32, 0.1, 0.5, 0.9, 1.0] {
                        // relu²-like activations with a fraction of exact zeros
                        let mut a = data(t * kk, (t + kk) as u32);
                        let u = data(t * kk, 99 + t as u32);
                        for (v, z) in a.iter_mut().zip(&u) {
                            if (z + 1.0) / 2.0 < zero_frac {
                                *v = 0.0;
                            } else {
                                *v = *v * *v;
                            }
                        }
                        let mut want = vec![0f64; t * n];
                        let mut scale = vec![0f64; t * n];
                        for i in 0..t {
                            for j in 0..kk {
                                for c in 0..n {
                                    let pr = rb(a[i * kk + j]) * rb(wf[j * n + c]);
                                    want[i * n + c] += pr;
                                    scale[i * n + c] += pr.abs();
                                }
                            }
                        }
                        for (sparse, amx) in [false, true]
                            .into_iter()
                            .flat_map(|s| engines(kk).into_iter().map(move |e| (s, e)))
                        {
                            let mut y = vec![f32::NAN; t * n];
                            matmul_kn_on(&w, &a, t, sparse, &mut y, amx);
                            if planar.is_planar() {
                                let mut yp = vec![f32::NAN; t * n];
                                matmul_kn_on(&planar, &a, t, sparse, &mut yp, amx);
                                let bits =
                                    |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                                assert_eq!(
                                    bits(&yp),
                                    bits(&y),
                                    "planar kn {dt:?} k={kk} n={n} t={t} z={zero_frac} s={sparse} \
                                     amx={amx}"
                                );
                            }
                            check(
                                &y,
                                &want,
                                &scale,
                                &format!(
                                    "kn {dt:?} k={kk} n={n} t={t} z={zero_frac} s={sparse} amx={amx}"
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
}
