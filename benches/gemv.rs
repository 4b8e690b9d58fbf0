//! criterion: GEMV throughput (GB/s of weights) at PLM-1.8B shapes for every weight format, and
//! the sparse down projection at 0/50/90/95/99 % zero activations against the dense one: from
//! L3 (one matrix, 1 thread) and from DRAM (32 layers' matrices, 2 threads, as in decode).
//!
//! The kernel tier is chosen once per process: run once per tier with
//! `SPARSELM_KERNEL=scalar|avx2|avx512 cargo bench -p sparselm-core --bench gemv`
//! (benches/run_criterion.sh does all available tiers). Threads: SPARSELM_BENCH_THREADS (default 1,2).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sparselm_core::kernels::kernels;
use sparselm_core::team::{with_team, Team};
use sparselm_core::tensor::{DType, DownPlan, Matrix};

/// The engine's allocator (weights on transparent huge pages), as the frontends install it.
#[global_allocator]
static ALLOC: sparselm_core::alloc::HugePageAlloc = sparselm_core::alloc::HugePageAlloc;

const SHAPES: [(usize, usize, &str); 4] = [
    (8192, 2048, "up_proj"),
    (2048, 8192, "down_proj(dense)"),
    (151936, 2048, "lm_head"),
    (3072, 2048, "q_proj"),
];
const FORMATS: [DType; 5] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::Q8_0,
    DType::Q4_0,
];

fn weights(n: usize) -> Vec<f32> {
    let mut s = 0x9E37_79B9u32;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * 0.04
        })
        .collect()
}

fn thread_counts() -> Vec<usize> {
    std::env::var("SPARSELM_BENCH_THREADS")
        .ok()
        .map(|s| s.split(',').filter_map(|t| t.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2])
}

fn gemv(c: &mut Criterion) {
    let tier = kernels().tier.name();
    for &(rows, cols, name) in &SHAPES {
        let w = weights(rows * cols);
        let x = weights(cols);
        let mut g = c.benchmark_group(format!("gemv/{tier}/{name}/{rows}x{cols}"));
        g.sample_size(10);
        for dt in FORMATS {
            if rows == 151936 && dt == DType::F32 {
                continue; // 1.2 GB: skip to keep the bench's memory and time modest
            }
            // the layout the engine loads GEMV matrices into (16-row interleaved where available)
            let m = Matrix::from_f32(rows, cols, &w, dt).into_gemv_layout();
            g.throughput(Throughput::Bytes(m.nbytes() as u64));
            for threads in thread_counts() {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut y = vec![0f32; rows];
                g.bench_with_input(
                    BenchmarkId::new(dt.name(), format!("{threads}t")),
                    &threads,
                    |b, _| pool.install(|| b.iter(|| m.matvec(black_box(&x), black_box(&mut y)))),
                );
            }
        }
        g.finish();
    }
}

fn sparse_down(c: &mut Criterion) {
    let tier = kernels().tier.name();
    let (inter, d) = (8192usize, 2048usize);
    let w = weights(inter * d);
    for dt in [DType::BF16, DType::F16, DType::Q8_0, DType::Q4_0] {
        // W_downᵀ: [inter, d], one row per neuron, in the layout the model loads (planar int8
        // kernel for Q8_0/Q4_0 where this CPU has it).
        let m = Matrix::from_f32(inter, d, &w, dt).into_down_layout();
        let mut g = c.benchmark_group(format!("sparse_down/{tier}/{}", dt.name()));
        g.sample_size(10);
        for zeros in [0u32, 50, 90, 95, 99] {
            // Active neurons spread uniformly (every k-th row), like a ReLU² mask.
            let active: Vec<(u32, f32)> = (0..inter)
                .filter(|j| (j * 7919 % 100) as u32 >= zeros)
                .map(|j| (j as u32, 0.5))
                .collect();
            g.throughput(Throughput::Bytes(
                (active.len() * d * m.nbytes() / (inter * d)) as u64,
            ));
            let mut y = vec![0f32; d];
            g.bench_function(BenchmarkId::new("zeros", format!("{zeros}%")), |b| {
                b.iter(|| {
                    // what one decode thread does with its run of active neurons
                    m.sparse_axpy(&active, &mut y);
                    black_box(&y);
                })
            });
        }
        // The dense down projection of the same format: W_down [d, inter] · act.
        let dense = Matrix::from_f32(d, inter, &w, dt).into_gemv_layout();
        let act = weights(inter);
        let mut y = vec![0f32; d];
        g.throughput(Throughput::Bytes(dense.nbytes() as u64));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        g.bench_function("dense", |b| {
            pool.install(|| b.iter(|| dense.matvec(black_box(&act), &mut y)))
        });
        g.finish();
    }
}

/// The down projection as decode meets it: 32 layers' matrices (more than any L3), each
/// iteration the next layer, so weights come from DRAM; 2 threads on the decode thread team
/// with the decode split (one run per thread, `sparse_axpy_par`), against the dense GEMV of
/// W_down, same format, same conditions. (`sparse_down` above is one matrix that stays in L3.)
fn sparse_down_dram(c: &mut Criterion) {
    let tier = kernels().tier.name();
    let (inter, d, layers) = (8192usize, 2048usize, 32usize);
    let w = weights(inter * d);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let team = Team::new(2).expect("decode team");
    for dt in [DType::F16, DType::Q8_0, DType::Q4_0] {
        let one = Matrix::from_f32(inter, d, &w, dt).into_down_layout();
        let ms: Vec<Matrix> = (0..layers).map(|_| one.clone()).collect();
        drop(one);
        let mut g = c.benchmark_group(format!("sparse_down_dram/{tier}/{}/2t", dt.name()));
        g.sample_size(10);
        let (mut plan, mut parts) = (DownPlan::new(), Vec::new());
        let mut layer = 0usize;
        for zeros in [0u32, 50, 90, 95, 99] {
            let active: Vec<(u32, f32)> = (0..inter)
                .filter(|j| (j * 7919 % 100) as u32 >= zeros)
                .map(|j| (j as u32, 0.5))
                .collect();
            g.throughput(Throughput::Bytes(
                (active.len() * d * ms[0].nbytes() / (inter * d)) as u64,
            ));
            g.bench_function(BenchmarkId::new("zeros", format!("{zeros}%")), |b| {
                pool.install(|| {
                    with_team(&team, || {
                        b.iter(|| {
                            layer = (layer + 1) % layers;
                            ms[layer].sparse_axpy_par(&active, &mut plan, &mut parts);
                            black_box(&parts);
                        })
                    })
                })
            });
        }
        drop(ms);
        let one = Matrix::from_f32(d, inter, &w, dt).into_gemv_layout();
        let dense: Vec<Matrix> = (0..layers).map(|_| one.clone()).collect();
        drop(one);
        let act = weights(inter);
        let mut y = vec![0f32; d];
        g.throughput(Throughput::Bytes(dense[0].nbytes() as u64));
        g.bench_function("dense", |b| {
            pool.install(|| {
                with_team(&team, || {
                    b.iter(|| {
                        layer = (layer + 1) % layers;
                        dense[layer].matvec(black_box(&act), &mut y);
                    })
                })
            })
        });
        g.finish();
    }
}

criterion_group!(benches, gemv, sparse_down, sparse_down_dram);
criterion_main!(benches);
