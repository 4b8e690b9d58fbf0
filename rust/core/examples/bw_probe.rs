//! Decode GEMVs against a plain read of memory, alternated in one process:
//! `cargo run --release --example bw_probe -p sparselm-core [threads]`.
//!
//! The machine's bandwidth drifts from minute to minute, so each line pairs a plain 2-thread
//! read of 1 GiB (the reference of that moment: a simple loop without software prefetch, which
//! the GEMVs exceed; not a ceiling) with the GEMVs of 32 PLM-1.8B-shaped up
//! projections (8192×2048) on the decode team, both from DRAM on 2 MiB pages. `WIDE=1`: the
//! shape of `W_down` (2048×8192) instead, and with `BLOCKS=1` cut into column blocks as the
//! dense float `W_down` is. `DOWN=1` times the sparse down projection of 32 `W_downᵀ` instead
//! (planar int8, or the 8-row AXPYs of float formats, then the partials added as the model does;
//! `DOWN_ZEROS=50`: % zero neurons, a fresh uniformly random set per layer and line; GB/s counted
//! on the whole matrix). `DTYPES=q4_0,q8_0,f16` picks formats, `REPS=` the
//! number of pairs. Lines whose reads are above ~45 GB/s come from the fast phase.
use sparselm_core::membw::PlainRead;
use sparselm_core::model::parse_dtype;
use sparselm_core::team::{with_team, Team};
use sparselm_core::tensor::{DType, Matrix};
use std::time::Instant;

#[path = "../../../benches/active_sets.rs"]
mod active_sets;
use active_sets::random_active;

#[global_allocator]
static ALLOC: sparselm_core::alloc::HugePageAlloc = sparselm_core::alloc::HugePageAlloc;

fn main() {
    let threads: usize = std::env::args().nth(1).map_or(2, |s| s.parse().unwrap());
    let team = Team::new(threads).unwrap();
    with_team(&team, || {
        let reps: usize = std::env::var("REPS").map_or(8, |s| s.parse().unwrap());
        let dtypes: Vec<DType> = std::env::var("DTYPES")
            .unwrap_or("q4_0,q8_0,f16".into())
            .split(',')
            .map(|s| parse_dtype(s).ok().flatten().expect("DTYPES"))
            .collect();
        let plain = PlainRead::new(1 << 30, threads).expect("1 GiB to read");
        let read = || plain.pass(&team);
        // WIDE=1: the GEMV of W_down's shape (2048×8192) instead of up's; with BLOCKS=1 cut into
        // column blocks as the dense float W_down is (`matvec_blocks`).
        let blocks = std::env::var("BLOCKS").is_ok_and(|v| v == "1");
        let (rows, cols) = if std::env::var("WIDE").is_ok_and(|v| v == "1") {
            (2048usize, 8192usize)
        } else {
            (8192usize, 2048usize)
        };
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let x = vec![0.5f32; cols];
        let mut y = vec![0f32; rows];
        for dt in dtypes {
            // DOWN=1: the decode down projection instead (planar W_downᵀ, DOWN_ZEROS % random
            // zero neurons; bytes counted as the whole matrix, as the dense groups read it all).
            let down = std::env::var("DOWN").is_ok_and(|v| v == "1");
            let zeros: u32 = std::env::var("DOWN_ZEROS").map_or(50, |s| s.parse().unwrap());
            let downs: Vec<Matrix> = if down {
                // float formats: W_downᵀ as the engine keeps it (the 8-row AXPY kernels)
                (0..32)
                    .map(|_| Matrix::from_f32(rows, cols, &w, dt).into_down_layout())
                    .collect()
            } else {
                Vec::new()
            };
            // the GEMVs, built only when they are what is timed
            let ms: Vec<Vec<Matrix>> = if downs.is_empty() {
                (0..32)
                    .map(|_| {
                        let m = Matrix::from_f32(rows, cols, &w, dt).into_gemv_layout();
                        if blocks {
                            m.split_cols(sparselm_core::tensor::DOWN_COL_BLOCK)
                        } else {
                            vec![m]
                        }
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let bytes: usize = ms.iter().flatten().chain(&downs).map(|m| m.nbytes()).sum();
            // Active neurons: exactly (100 − zeros) % of the rows, drawn uniformly at random, a
            // fresh set for each of the 32 layers on each line (a fixed set, or an evenly spread
            // hash, is not what a ReLU² mask looks like: true random sets have adjacent rows and
            // long gaps). Drawn outside the timed region.
            let keep = rows * (100 - zeros.min(100) as usize) / 100;
            let mut rng = 0x9E37_79B9_7F4A_7C15u64;
            let mut draw = || -> Vec<Vec<(u32, f32)>> {
                (0..32)
                    .map(|_| random_active(rows, keep, &mut rng, |j| 1.0 + (j % 7) as f32))
                    .collect()
            };
            // With DOWN=1, the dense GEMV of W_down (cols × rows) of the same format, laid out as
            // the engine's dense MLP keeps it (the GEMV layout; float formats in column blocks), is
            // timed on each line too: "sparse down vs dense" in one phase.
            let wdown: Vec<Vec<Matrix>> = if downs.is_empty() {
                Vec::new()
            } else {
                (0..32)
                    .map(|_| {
                        Matrix::from_f32(cols, rows, &w, dt)
                            .into_gemv_layout()
                            .split_cols(sparselm_core::tensor::DOWN_COL_BLOCK)
                    })
                    .collect()
            };
            let xd: Vec<f32> = (0..rows).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
            let mut yd = vec![0f32; cols];
            let mut dense = || {
                let t = Instant::now();
                for m in &wdown {
                    sparselm_core::tensor::matvec_blocks(m, &xd, &mut yd);
                }
                t.elapsed().as_secs_f64() / wdown.len().max(1) as f64
            };
            let (mut plan, mut parts) = (sparselm_core::tensor::DownPlan::new(), Vec::new());
            let what = if downs.is_empty() { "GEMVs" } else { "down" };
            let last_s = std::cell::Cell::new(0.0);
            let mut yo = vec![0f32; cols];
            let mut gemv = |acts: &[Vec<(u32, f32)>]| {
                let t = Instant::now();
                if downs.is_empty() {
                    for m in &ms {
                        sparselm_core::tensor::matvec_blocks(m, &x, &mut y);
                    }
                } else {
                    // as the model's MLP: the sparse projection and its partials' sum
                    for (m, act) in downs.iter().zip(acts) {
                        m.sparse_down(act, &mut plan, &mut parts, &mut yo);
                    }
                }
                last_s.set(t.elapsed().as_secs_f64() / 32.0);
                bytes as f64 / t.elapsed().as_secs_f64() / 1e9
            };
            read();
            gemv(&draw());
            let mut ratios = Vec::new();
            for _ in 0..reps {
                let acts = if downs.is_empty() { Vec::new() } else { draw() };
                let r = read();
                let g = gemv(&acts);
                let sparse_s = last_s.get();
                let dense_s = if wdown.is_empty() { 0.0 } else { dense() };
                let r2 = read();
                let ceil = (r + r2) / 2.0;
                ratios.push(g / ceil);
                let vs = if wdown.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({:.1} us per layer; dense GEMV of W_down {:.1} us, {:.2}x)",
                        sparse_s * 1e6,
                        dense_s * 1e6,
                        dense_s / sparse_s
                    )
                };
                println!(
                    "{dt:?} {threads}T: read {r:.1}/{r2:.1} GB/s, {what} {g:.1} GB/s = {:.0} %{vs}",
                    100.0 * g / ceil
                );
            }
            ratios.sort_by(f64::total_cmp);
            println!(
                "{dt:?} {threads}T {what}: median {:.0} % of the read",
                100.0 * ratios[reps / 2]
            );
        }
    });
}
