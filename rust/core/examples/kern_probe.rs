//! The planar int8 down kernels' compute alone: one kernel call of 32 rows of a PLM-1.8B
//! `W_downᵀ` (8192×2048), over and over on `UNITS` (4) unit row sets that stay in L2, each call
//! prefetching the next unit's rows as decode does (`NONEXT=1`: no prefetch hint).
//! `cargo run --release --example kern_probe -p sparselm-core` (`DTYPES=q4_0,q8_0`).
//! Prints, per format, the minimum and median time per call over 40 passes of 5000 calls.
use sparselm_core::model::parse_dtype;
use sparselm_core::quant::{quant_kernels, DownKernel, Planar};
use sparselm_core::tensor::{Matrix, Storage};
use std::time::Instant;

#[global_allocator]
static ALLOC: sparselm_core::alloc::HugePageAlloc = sparselm_core::alloc::HugePageAlloc;

/// Time `kernel` on the planar matrix `p`, cycling through `sets` (the next set as `next`).
fn time<Q: sparselm_core::quant::Pod>(p: &Planar<Q>, kernel: DownKernel<Q>, sets: &[Vec<u32>]) {
    let n = sets[0].len();
    let a: Vec<f32> = (0..n).map(|i| 0.5 + i as f32 * 0.1).collect();
    let hint = std::env::var("NONEXT").map_or(true, |v| v != "1");
    let mut y = vec![0f32; p.nb * 32];
    let mut per_call = Vec::new();
    for _ in 0..40 {
        let calls = 5000;
        let t = Instant::now();
        for c in 0..calls {
            let u = c % sets.len();
            let next: &[u32] = if hint {
                &sets[(u + 1) % sets.len()]
            } else {
                &[]
            };
            kernel(p, &sets[u], &a, next, &mut y);
        }
        per_call.push(t.elapsed().as_secs_f64() / calls as f64 * 1e9);
    }
    per_call.sort_by(f64::total_cmp);
    println!(
        "min {:.0} ns per call ({:.1} per row), median {:.0}",
        per_call[0],
        per_call[0] / n as f64,
        per_call[per_call.len() / 2]
    );
    std::hint::black_box(&y);
}

fn main() {
    let (rows, cols) = (8192usize, 2048usize);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let units: usize = std::env::var("UNITS").map_or(4, |s| s.parse().expect("UNITS"));
    // 32 rows of the full groups per unit, spread over the matrix as a sparse decode's are
    let sets: Vec<Vec<u32>> = (0..units as u32)
        .map(|u| {
            (0..32u32)
                .map(|i| (i * 251 + u * 1013) % rows as u32)
                .collect()
        })
        .collect();
    let k = quant_kernels();
    for name in std::env::var("DTYPES")
        .unwrap_or("q4_0,q8_0".into())
        .split(',')
    {
        let dt = parse_dtype(name)
            .ok()
            .flatten()
            .expect("DTYPES: q4_0 or q8_0");
        print!("{dt:?} ({}): ", k.tier_name);
        match Matrix::from_f32(rows, cols, &w, dt)
            .into_down_layout()
            .into_storage()
        {
            Storage::Q4_0P(p) => time(&p, k.down_q4_0.expect("a planar kernel"), &sets),
            Storage::Q8_0P(p) => time(&p, k.down_q8_0.expect("a planar kernel"), &sets),
            _ => println!("no planar int8 kernel for this format on this CPU"),
        }
    }
}
