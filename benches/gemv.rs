//! criterion: GEMV throughput (GB/s of weights) at PLM-1.8B shapes for every weight format, and
//! the sparse down projection at 0/50/90/95/99 % zero activations (fresh random active sets)
//! against the engine's dense one: from L3 (one matrix, 1 thread) and from DRAM (32 layers'
//! matrices after an L3 flush, 2 threads, as in decode).
//!
//! The kernel tier is chosen once per process: run once per tier with
//! `SPARSELM_KERNEL=scalar|avx2|avx512 cargo bench -p sparselm-core --bench gemv`
//! (benches/run_criterion.sh does all available tiers). Threads: SPARSELM_BENCH_THREADS (default 1,2).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use sparselm_core::kernels::kernels;
use sparselm_core::membw::PlainRead;
use sparselm_core::team::{with_team, Team};
use sparselm_core::tensor::{matvec_blocks, DType, DownPlan, Matrix, DOWN_COL_BLOCK};

mod active_sets;
use active_sets::random_active;

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

/// The dense down projection as the engine's dense MLP keeps it: `W_down` [d, inter] in the
/// GEMV layout, float formats cut into column blocks (`matvec_blocks`).
fn dense_down(d: usize, inter: usize, w: &[f32], dt: DType) -> Vec<Matrix> {
    Matrix::from_f32(d, inter, w, dt)
        .into_gemv_layout()
        .split_cols(DOWN_COL_BLOCK)
}

/// One matrix on 1 thread, from L3 (9-34 MB, more than L2): each iteration a fresh random
/// active set (drawn outside the timed part), so the rows read are not the last iteration's.
fn sparse_down(c: &mut Criterion) {
    let tier = kernels().tier.name();
    let (inter, d) = (8192usize, 2048usize);
    let w = weights(inter * d);
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    for dt in [DType::BF16, DType::F16, DType::Q8_0, DType::Q4_0] {
        // W_downᵀ: [inter, d], one row per neuron, in the layout the model loads (planar int8
        // kernel for Q8_0/Q4_0 where this CPU has it).
        let m = Matrix::from_f32(inter, d, &w, dt).into_down_layout();
        let mut g = c.benchmark_group(format!("sparse_down/{tier}/{}", dt.name()));
        g.sample_size(10);
        for zeros in [0usize, 50, 90, 95, 99] {
            let keep = inter * (100 - zeros) / 100;
            g.throughput(Throughput::Bytes((keep * m.nbytes() / inter) as u64));
            let mut y = vec![0f32; d];
            g.bench_function(BenchmarkId::new("zeros", format!("{zeros}%")), |b| {
                b.iter_batched(
                    || random_active(inter, keep, &mut rng, |_| 0.5),
                    |active| {
                        // what one decode thread does with its run of active neurons
                        m.sparse_axpy(&active, &mut y);
                        black_box(&y);
                    },
                    BatchSize::SmallInput,
                )
            });
        }
        // The dense down projection of the same format: W_down [d, inter] · act.
        let dense = dense_down(d, inter, &w, dt);
        let act = weights(inter);
        let mut y = vec![0f32; d];
        g.throughput(Throughput::Bytes(
            dense.iter().map(Matrix::nbytes).sum::<usize>() as u64,
        ));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        g.bench_function("dense", |b| {
            pool.install(|| b.iter(|| matvec_blocks(&dense, black_box(&act), &mut y)))
        });
        g.finish();
    }
}

/// The down projection as decode meets it, from DRAM: 2 threads on the decode thread team, the
/// model's split and partial sums (`Matrix::sparse_down`), against the engine's dense GEMV of
/// W_down of the same format. Each timed batch runs 32 layers' matrices, each with a fresh
/// random active set, after a 256 MiB read has evicted the last level cache (the draw and the
/// read are not timed); times are per layer. (`sparse_down` above stays in L3.)
fn sparse_down_dram(c: &mut Criterion) {
    let tier = kernels().tier.name();
    let (inter, d, layers) = (8192usize, 2048usize, 32usize);
    let w = weights(inter * d);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let team = Team::new(2).expect("decode team");
    let flush = PlainRead::new(256 << 20, 2).expect("256 MiB to read");
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    // `iters` layers as ceil(iters / 32) timed batches of 32, each after a flush
    let per_layer = |iters: u64, mut batch: Box<dyn FnMut() -> Duration + '_>| {
        let batches = iters.div_ceil(layers as u64).max(1);
        let mut t = Duration::ZERO;
        for _ in 0..batches {
            t += batch();
        }
        t.mul_f64(iters as f64 / (batches * layers as u64) as f64)
    };
    for dt in [DType::F16, DType::Q8_0, DType::Q4_0] {
        let one = Matrix::from_f32(inter, d, &w, dt).into_down_layout();
        let ms: Vec<Matrix> = (0..layers).map(|_| one.clone()).collect();
        drop(one);
        let mut g = c.benchmark_group(format!("sparse_down_dram/{tier}/{}/2t", dt.name()));
        g.sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        let (mut plan, mut parts) = (DownPlan::new(), Vec::new());
        let mut y = vec![0f32; d];
        for zeros in [0usize, 50, 90, 95, 99] {
            let keep = inter * (100 - zeros) / 100;
            g.throughput(Throughput::Bytes((keep * ms[0].nbytes() / inter) as u64));
            g.bench_function(BenchmarkId::new("zeros", format!("{zeros}%")), |b| {
                b.iter_custom(|iters| {
                    per_layer(
                        iters,
                        Box::new(|| {
                            let acts: Vec<Vec<(u32, f32)>> = (0..layers)
                                .map(|_| random_active(inter, keep, &mut rng, |_| 0.5))
                                .collect();
                            flush.pass(&team);
                            pool.install(|| {
                                with_team(&team, || {
                                    let t = Instant::now();
                                    for (m, a) in ms.iter().zip(&acts) {
                                        m.sparse_down(a, &mut plan, &mut parts, &mut y);
                                    }
                                    black_box(&y);
                                    t.elapsed()
                                })
                            })
                        }),
                    )
                })
            });
        }
        drop(ms);
        let dense: Vec<Vec<Matrix>> = (0..layers).map(|_| dense_down(d, inter, &w, dt)).collect();
        let act = weights(inter);
        g.throughput(Throughput::Bytes(
            dense[0].iter().map(Matrix::nbytes).sum::<usize>() as u64,
        ));
        g.bench_function("dense", |b| {
            b.iter_custom(|iters| {
                per_layer(
                    iters,
                    Box::new(|| {
                        flush.pass(&team);
                        pool.install(|| {
                            with_team(&team, || {
                                let t = Instant::now();
                                for m in &dense {
                                    matvec_blocks(m, black_box(&act), &mut y);
                                }
                                black_box(&y);
                                t.elapsed()
                            })
                        })
                    }),
                )
            })
        });
        g.finish();
    }
}

criterion_group!(benches, gemv, sparse_down, sparse_down_dram);
criterion_main!(benches);
