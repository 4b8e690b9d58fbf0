//! Absorbed attention's float W_UK read as decode reads it, from DRAM:
//! `cargo run --release --example uk_probe -p sparselm-core` (`REPS=` lines per mode).
//!
//! 32 layers of f16 W_UK (2048 × 512, PLM-1.8B), two threads, each summing 8 heads of 128
//! consecutive rows (`q_lat_h = Σ_j q_nope_h[j] · W_UK_h[j]`), with a plain read of 1 GiB
//! before each pass. Mode 0: the 8-row passes of `sparse_axpy`; mode 1: one row at a time
//! (`axpy_consecutive`, what attention uses); mode 2: 4-row passes.
use sparselm_core::membw::PlainRead;
use sparselm_core::team::{par_chunks, with_team, Team};
use sparselm_core::tensor::{DType, Matrix};
use std::time::Instant;

#[global_allocator]
static ALLOC: sparselm_core::alloc::HugePageAlloc = sparselm_core::alloc::HugePageAlloc;

fn main() {
    let team = Team::new(2).unwrap();
    with_team(&team, || {
        let plain = PlainRead::new(1 << 30, 2).unwrap();
        let (rows, cols) = (2048usize, 512usize);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let ms: Vec<Matrix> = (0..32)
            .map(|_| Matrix::from_f32(rows, cols, &w, DType::F16))
            .collect();
        let q: Vec<f32> = (0..rows).map(|i| (i % 11) as f32 * 0.1 - 0.5).collect();
        let mut out = vec![0f32; 16 * cols];
        let run = |mode: usize, out: &mut [f32]| {
            let t = Instant::now();
            for m in &ms {
                par_chunks([&mut out[..]], [8 * cols], |gi, [o]| {
                    for hh in 0..8 {
                        let h = gi * 8 + hh;
                        let y = &mut o[hh * cols..(hh + 1) * cols];
                        let terms: Vec<(u32, f32)> =
                            (h * 128..(h + 1) * 128).map(|j| (j as u32, q[j])).collect();
                        match mode {
                            0 => {
                                m.sparse_axpy(&terms, y);
                            }
                            1 => m.axpy_consecutive(&terms, y),
                            _ => {
                                y.fill(0.0);
                                for c in terms.chunks(4) {
                                    m.axpy_rows4(
                                        [
                                            c[0].0 as usize,
                                            c[1].0 as usize,
                                            c[2].0 as usize,
                                            c[3].0 as usize,
                                        ],
                                        0,
                                        &[c[0].1, c[1].1, c[2].1, c[3].1],
                                        y,
                                    );
                                }
                            }
                        }
                    }
                });
            }
            t.elapsed().as_secs_f64() / 32.0 * 1e6
        };
        let reps: usize = std::env::var("REPS").map_or(10, |s| s.parse().unwrap());
        let mut res = vec![Vec::new(); 3];
        for _ in 0..reps {
            for mode in [0, 1, 2] {
                let r = plain.pass(&team);
                let us = run(mode, &mut out);
                res[mode].push(us);
                println!("mode {mode}: read {r:.1} GB/s, {us:.1} us per layer");
            }
        }
        for (m, v) in res.iter_mut().enumerate() {
            v.sort_by(f64::total_cmp);
            println!("mode {m} median {:.1} us", v[v.len() / 2]);
        }
    });
}
