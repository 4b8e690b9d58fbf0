//! Decode down-projection probe: the GGUF-row f32 AXPY against the planar int8 kernel, over
//! 32 layers of W_downᵀ 8192×2048 (from DRAM) at several sparsities, with the model's split
//! into one run per thread; for float dtypes (`DTYPES=f16,bf16`) the decode path alone.
//! `cargo run --release --example down_probe -p sparselm-core [threads]`
//! (`ZEROS=90,99` picks the sparsities, `LAYERS` / `ROWS` the sizes)
use sparselm_core::tensor::{DownPlan, Matrix};
use std::time::Instant;

#[global_allocator]
static ALLOC: sparselm_core::alloc::HugePageAlloc = sparselm_core::alloc::HugePageAlloc;

fn run(ms: &[Matrix], acts: &[Vec<(u32, f32)>], plan: &mut DownPlan, parts: &mut Vec<f32>) -> f64 {
    let t = Instant::now();
    let reps = std::env::var("REPS").map_or(3, |s| s.parse().expect("REPS: a count"));
    for _ in 0..reps {
        for (m, act) in ms.iter().zip(acts.iter().cycle()) {
            // what one decode step does: per-thread partials (their final sum is left out)
            m.sparse_axpy_par(act, plan, parts);
        }
    }
    t.elapsed().as_secs_f64() / (reps * ms.len()) as f64
}

fn main() {
    let threads: usize = std::env::args().nth(1).map_or(2, |s| s.parse().unwrap());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let env = |k: &str, v: usize| std::env::var(k).map_or(v, |s| s.parse().unwrap());
    let (rows, cols, layers) = (env("ROWS", 8192), 2048usize, env("LAYERS", 32));
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let (mut parts, mut plan) = (Vec::new(), DownPlan::new());
    let dtypes = std::env::var("DTYPES").unwrap_or("q8_0,q4_0".into());
    for name in dtypes.split(',') {
        let dt = sparselm_core::model::parse_dtype(name)
            .unwrap()
            .expect("a dtype");
        let plain: Vec<Matrix> = (0..layers)
            .map(|_| Matrix::from_f32(rows, cols, &w, dt))
            .collect();
        let planar: Vec<Matrix> = plain.iter().map(|m| m.clone().into_down_layout()).collect();
        // The baseline of "sparse down vs dense": the dense GEMV of the untransposed W_down
        // (cols × rows, the GEMV layout of the engine), same format, also from DRAM.
        let dense: Vec<Matrix> = (0..layers)
            .map(|_| Matrix::from_f32(cols, rows, &w, dt).into_gemv_layout())
            .collect();
        let x: Vec<f32> = (0..rows).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let mut y = vec![0f32; cols];
        let gemv = pool.install(|| {
            let mut pass = || {
                let t = Instant::now();
                for m in &dense {
                    m.matvec(&x, &mut y);
                }
                t.elapsed().as_secs_f64() / dense.len() as f64
            };
            pass(); // warm-up, as for the sparse runs
            (0..3).map(|_| pass()).sum::<f64>() / 3.0
        });
        println!(
            "{dt:?} dense GEMV of W_down: {:.3} ms ({:.1} GB/s)",
            gemv * 1e3,
            dense[0].nbytes() as f64 / gemv / 1e9
        );
        let zs = std::env::var("ZEROS").unwrap_or("0,50,90,99".into());
        for zeros in zs
            .split(',')
            .map(|z| z.parse::<u32>().expect("ZEROS: percentages"))
        {
            let acts: Vec<Vec<(u32, f32)>> = (0..7u32)
                .map(|s| {
                    (0..rows as u32)
                        .filter(|j| {
                            (j.wrapping_mul(2654435761).wrapping_add(s * 977)) % 100 >= zeros
                        })
                        .map(|j| (j, 1.0 + (j % 7) as f32))
                        .collect()
                })
                .collect();
            let bytes = plain[0].nbytes() as f64 * (100 - zeros) as f64 / 100.0;
            if !dt.is_quantized() {
                pool.install(|| {
                    run(&plain, &acts, &mut plan, &mut parts);
                    let a = run(&plain, &acts, &mut plan, &mut parts);
                    println!(
                        "{dt:?} {zeros:>2}% zeros: rows AXPY {:.3} ms ({:.1} GB/s), {:.2}x faster than dense GEMV",
                        a * 1e3,
                        bytes / a / 1e9,
                        gemv / a
                    );
                });
                continue;
            }
            pool.install(|| {
                run(&plain, &acts, &mut plan, &mut parts);
                let a = run(&plain, &acts, &mut plan, &mut parts);
                run(&planar, &acts, &mut plan, &mut parts);
                let b = run(&planar, &acts, &mut plan, &mut parts);
                println!(
                    "{dt:?} {zeros:>2}% zeros: rows AXPY {:.3} ms ({:.1} GB/s), planar int8 {:.3} ms ({:.1} GB/s), {:.2}x; {:.2}x faster than dense GEMV",
                    a * 1e3,
                    bytes / a / 1e9,
                    b * 1e3,
                    bytes / b / 1e9,
                    a / b,
                    gemv / b
                );
            });
        }
    }
}
