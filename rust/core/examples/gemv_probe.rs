//! Quick GEMV throughput probe: `cargo run --release --example gemv_probe -p sparselm-core`.
use sparselm_core::tensor::{DType, Matrix};
use std::time::Instant;

#[global_allocator]
static ALLOC: sparselm_core::alloc::HugePageAlloc = sparselm_core::alloc::HugePageAlloc;
fn main() {
    let threads: usize = std::env::args().nth(1).map_or(2, |s| s.parse().unwrap());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let only: Option<usize> = std::env::var("ROWS").ok().map(|s| s.parse().unwrap());
    for (rows, cols) in [
        (8192usize, 2048usize),
        (2048, 8192),
        (151936, 2048),
        (3072, 2048),
    ] {
        if only.is_some_and(|r| r != rows) {
            continue;
        }
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        for dt in [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::Q8_0,
            DType::Q4_0,
        ] {
            let m = Matrix::from_f32(rows, cols, &w, dt).into_gemv_layout();
            let x = vec![0.5f32; cols];
            let mut y = vec![0f32; rows];
            pool.install(|| {
                m.matvec(&x, &mut y);
                let reps = (2e9 / m.nbytes() as f64).ceil() as usize;
                let t = Instant::now();
                for _ in 0..reps {
                    m.matvec(&x, &mut y);
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
                println!(
                    "{rows}x{cols} {:?}: {:.2} ms, {:.1} GB/s",
                    dt,
                    s * 1e3,
                    m.nbytes() as f64 / s / 1e9
                );
            });
        }
    }
}
