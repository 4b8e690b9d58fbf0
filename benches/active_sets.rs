//! Random active sets for the sparse down projection's benchmarks, shared by the criterion
//! bench (`benches/gemv.rs`) and `rust/core/examples/bw_probe.rs` (included by `#[path]`, so
//! the library's API does not grow a benchmark helper).

/// A fresh uniformly random set of `keep` of `rows` neurons, sorted by row, each with the
/// coefficient `coef(row)`: what a ReLU² mask looks like to the kernel (adjacent rows and long
/// gaps; a fixed set, or an evenly spread hash, would not be, and a set reused across
/// iterations stays in the caches). `rng` is the state of a xorshift64 generator (non-zero),
/// advanced by `keep` draws (a partial Fisher-Yates shuffle).
pub fn random_active(
    rows: usize,
    keep: usize,
    rng: &mut u64,
    coef: impl Fn(u32) -> f32,
) -> Vec<(u32, f32)> {
    let keep = keep.min(rows);
    let mut idx: Vec<u32> = (0..rows as u32).collect();
    for k in 0..keep {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let r = k + (*rng % (rows - k) as u64) as usize;
        idx.swap(k, r);
    }
    let mut a: Vec<(u32, f32)> = idx[..keep].iter().map(|&j| (j, coef(j))).collect();
    a.sort_by_key(|e| e.0);
    a
}
