//! Quantized GEMV and sparse down-projection throughput, per available kernel tier, one thread.
//!
//! GB/s counts bytes of weight blocks read (34 B per 32 weights for Q8_0, 18 B for Q4_0); the
//! GEMV time includes quantizing the f32 input once. Shapes are PLM's (rows × cols):
//! 8192×2048 (up/gate), 2048×8192 (dense down), 151936×2048 (lm_head), 3072×2048 (q/kv).
//! The sparse down projection loops over rows of W_downᵀ [8192, 2048] and skips zero
//! activations (ReLU² makes most of them exactly zero); its GB/s counts only rows touched.
//!
//! Quick run (a few minutes): `cargo bench -p sparselm-core --bench quant -- --quick`.
//! As a test (each benchmark once): `cargo test -p sparselm-core --bench quant`.

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use half::bf16;
use sparselm_core::kernels::{kernels, Kernels, Tier};
use sparselm_core::quant::{quant_kernels, quant_kernels_for, BlockQ4_0, BlockQ8_0, QuantKernels};

/// Thread CPU time (`CLOCK_THREAD_CPUTIME_ID`) instead of wall time: on a shared machine the
/// time this thread spends descheduled is not charged to the kernel (cache and memory-bandwidth
/// contention from other jobs still is). Unloaded, the two clocks agree for a 1-thread loop.
struct CpuTime(WallTime);

#[cfg(target_os = "linux")]
fn thread_cpu_ns() -> u64 {
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clk: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec (64-bit Linux layout) into `ts`.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(not(target_os = "linux"))]
fn thread_cpu_ns() -> u64 {
    static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    T0.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
}

impl Measurement for CpuTime {
    type Intermediate = u64;
    type Value = Duration;
    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, t0: u64) -> Duration {
        Duration::from_nanos(thread_cpu_ns() - t0)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, v: &Duration) -> f64 {
        v.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        self.0.formatter()
    }
}

type C = Criterion<CpuTime>;

/// Deterministic xorshift64 stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// A plausible weight scale (f16 in [2^-10, 2^-6)).
    fn d(&mut self) -> half::f16 {
        half::f16::from_f32(
            (1.0 + (self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2f32.powi(-8),
        )
    }
}

fn random_q8(n: usize, seed: u64) -> Vec<BlockQ8_0> {
    let mut r = Rng(seed | 1);
    (0..n)
        .map(|_| {
            let mut qs = [0i8; 32];
            for c in qs.chunks_exact_mut(8) {
                let v = r.next().to_le_bytes();
                for (q, b) in c.iter_mut().zip(v) {
                    *q = (b as i8).max(-127);
                }
            }
            BlockQ8_0 { d: r.d(), qs }
        })
        .collect()
}

fn random_q4(n: usize, seed: u64) -> Vec<BlockQ4_0> {
    let mut r = Rng(seed | 1);
    (0..n)
        .map(|_| {
            let mut qs = [0u8; 16];
            for c in qs.chunks_exact_mut(8) {
                c.copy_from_slice(&r.next().to_le_bytes());
            }
            BlockQ4_0 { d: r.d(), qs }
        })
        .collect()
}

fn tiers() -> Vec<QuantKernels> {
    Tier::available()
        .into_iter()
        .filter_map(quant_kernels_for)
        .collect()
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn header() {
    eprintln!(
        "quant bench: cpu '{}', default tier {} (quant {}), tiers run: {}, 1 thread",
        cpu_name(),
        kernels().tier.name(),
        quant_kernels().tier_name,
        tiers()
            .iter()
            .map(|k| k.tier_name)
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// PLM shapes, plus 256×2048 whose weights (557 KB Q8_0) stay in L2: kernel speed without DRAM.
const SHAPES: [(usize, usize); 5] = [
    (8192, 2048),
    (2048, 8192),
    (151936, 2048),
    (3072, 2048),
    (256, 2048),
];

fn gemv(c: &mut C) {
    header();
    for (rows, cols) in SHAPES {
        let nb = cols / 32;
        let mut r = Rng(7);
        let xf: Vec<f32> = (0..cols).map(|_| r.unit()).collect();
        let mut xq = vec![BlockQ8_0::default(); nb];
        let mut y = vec![0f32; rows];
        let big = rows * cols > 64 << 20;

        let w8 = random_q8(rows * nb, 11);
        let mut g = c.benchmark_group(format!("gemv_q8_0/{rows}x{cols}"));
        g.throughput(Throughput::BytesDecimal((w8.len() * 34) as u64));
        if big {
            g.sampling_mode(SamplingMode::Flat);
        }
        for k in tiers() {
            g.bench_function(k.tier_name, |b| {
                b.iter(|| {
                    (k.quantize_row_q8_0)(black_box(&xf), &mut xq);
                    for (yi, row) in y.iter_mut().zip(w8.chunks_exact(nb)) {
                        *yi = (k.vec_dot_q8_0_q8_0)(row, &xq);
                    }
                    black_box(&y);
                })
            });
        }
        g.finish();
        drop(w8);

        let w4 = random_q4(rows * nb, 13);
        let mut g = c.benchmark_group(format!("gemv_q4_0/{rows}x{cols}"));
        g.throughput(Throughput::BytesDecimal((w4.len() * 18) as u64));
        if big {
            g.sampling_mode(SamplingMode::Flat);
        }
        for k in tiers() {
            g.bench_function(k.tier_name, |b| {
                b.iter(|| {
                    (k.quantize_row_q8_0)(black_box(&xf), &mut xq);
                    for (yi, row) in y.iter_mut().zip(w4.chunks_exact(nb)) {
                        *yi = (k.vec_dot_q4_0_q8_0)(row, &xq);
                    }
                    black_box(&y);
                })
            });
        }
        g.finish();
    }

    // Baseline: the bf16 GEMV of `crate::kernels` at the up/gate shape (2 bytes per weight).
    let (rows, cols) = (8192, 2048);
    let mut r = Rng(17);
    let w: Vec<bf16> = (0..rows * cols)
        .map(|_| bf16::from_f32(r.unit() * 0.05))
        .collect();
    let x: Vec<f32> = (0..cols).map(|_| r.unit()).collect();
    let mut y = vec![0f32; rows];
    let mut g = c.benchmark_group(format!("gemv_bf16/{rows}x{cols}"));
    g.throughput(Throughput::BytesDecimal((w.len() * 2) as u64));
    for t in Tier::available() {
        let k = Kernels::for_tier(t).expect("available tier");
        g.bench_function(t.name(), |b| {
            b.iter(|| {
                for (yi, row) in y.iter_mut().zip(w.chunks_exact(cols)) {
                    *yi = (k.dot_bf16)(row, black_box(&x));
                }
                black_box(&y);
            })
        });
    }
    g.finish();
}

fn quantize_activations(c: &mut C) {
    for n in [2048usize, 8192] {
        let mut r = Rng(5);
        let x: Vec<f32> = (0..n).map(|_| r.unit()).collect();
        let mut q = vec![BlockQ8_0::default(); n / 32];
        let mut g = c.benchmark_group(format!("quantize_row_q8_0/{n}"));
        g.throughput(Throughput::BytesDecimal((n * 4) as u64));
        for k in tiers() {
            g.bench_function(k.tier_name, |b| {
                b.iter(|| (k.quantize_row_q8_0)(black_box(&x), &mut q))
            });
        }
        g.finish();
    }
}

/// Rows of W_downᵀ [intermediate = 8192, hidden = 2048]; `a` has the given share of zeros.
fn sparse_down(c: &mut C) {
    let (inter, hidden) = (8192usize, 2048usize);
    let nb = hidden / 32;
    let w8 = random_q8(inter * nb, 19);
    let w4 = random_q4(inter * nb, 23);
    let mut y = vec![0f32; hidden];
    for zeros in [0u32, 50, 90, 95, 99] {
        let mut r = Rng(29 + zeros as u64);
        let a: Vec<f32> = (0..inter)
            .map(|_| {
                if (r.next() % 10_000) < zeros as u64 * 100 {
                    0.0
                } else {
                    r.unit()
                }
            })
            .collect();
        let nnz = a.iter().filter(|v| **v != 0.0).count();
        for (fmt, row_bytes) in [("q8_0", nb * 34), ("q4_0", nb * 18)] {
            let mut g = c.benchmark_group(format!("sparse_down_{fmt}/zeros={zeros}%"));
            g.throughput(Throughput::BytesDecimal((nnz * row_bytes) as u64));
            for k in tiers() {
                g.bench_function(k.tier_name, |b| {
                    b.iter(|| {
                        y.fill(0.0);
                        for (i, &ai) in a.iter().enumerate() {
                            if ai != 0.0 {
                                if fmt == "q8_0" {
                                    (k.axpy_q8_0)(ai, &w8[i * nb..(i + 1) * nb], &mut y);
                                } else {
                                    (k.axpy_q4_0)(ai, &w4[i * nb..(i + 1) * nb], &mut y);
                                }
                            }
                        }
                        black_box(&y);
                    })
                });
            }
            g.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .with_measurement(CpuTime(WallTime))
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = gemv, quantize_activations, sparse_down
}
criterion_main!(benches);
