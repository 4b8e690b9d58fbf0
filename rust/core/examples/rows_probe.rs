//! Does skipping random rows save DRAM time? A pure read (no compute) of a random subset of
//! the rows of 32 PLM-shaped matrices against a read of every row, alternated in one process:
//! `cargo run --release --example rows_probe -p sparselm-core -- [threads]`.
//!
//! Each of the 32 "layers" holds 8192 rows of `ROW_BYTES` bytes (2176: one Q8_0 row of 2048
//! values with its scales; 1088 for Q4_0) on 2 MiB pages, 570 MB in all for Q8_0 rows, so every
//! pass comes from DRAM. Each thread reads its contiguous share of the rows of every layer:
//! either all of them front to back, or only the rows kept by a fresh random mask
//! (`ZEROS=50` % of the rows skipped), prefetching, line by line as it reads a row, the row
//! `DIST` kept rows ahead (`DIST=0`: none; `_mm_prefetch` on x86_64 only). Each line prints both times
//! and their ratio; a ratio of 0.5 at 50 % zeros would mean the skipped bytes cost nothing.
//! Each timed pass follows an untimed 256 MiB read that evicts the last level cache.
//! `REPS=` sets the number of lines. `SPLIT=128` gives each row a second piece of that many
//! bytes in another array (as a planar row's scales are), read and prefetched after the first:
//! 90 % skipped, 1024 + 128 bytes took 2.62-2.91 ms against 2.44-2.80 for 1152 contiguous bytes
//! (3 alternated pairs of 3 lines, stop 18). `HINT=` picks the prefetch: 0 `prefetcht0`
//! (default), 1 `t1`, 2 `t2`, 3 `nta`.
use std::hint::black_box;
use std::time::Instant;

use sparselm_core::membw::PlainRead;
use sparselm_core::team::Team;

#[global_allocator]
static ALLOC: sparselm_core::alloc::HugePageAlloc = sparselm_core::alloc::HugePageAlloc;

const LAYERS: usize = 32;
const ROWS: usize = 8192;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).map_or(default, |s| s.parse().expect(name))
}

/// Sum of `row` as u64 words, eight independent accumulators (the loads set the pace), asking
/// as it goes for the same line of `ahead` to be loaded (one hint per line read, spread over
/// the row, of the kind `hint` names (`HINT=`); none for an empty `ahead`, nor off x86_64).
fn sum_read(row: &[u8], ahead: &[u8], hint: usize) -> u64 {
    let mut s = [0u64; 8];
    for (j, c) in row.chunks_exact(64).enumerate() {
        #[cfg(target_arch = "x86_64")]
        if let Some(p) = ahead.get(64 * j) {
            use std::arch::x86_64::*;
            let p = p as *const u8 as *const i8;
            // SAFETY: `p` is inside `ahead`; a prefetch never faults.
            unsafe {
                match hint {
                    1 => _mm_prefetch::<_MM_HINT_T1>(p),
                    2 => _mm_prefetch::<_MM_HINT_T2>(p),
                    3 => _mm_prefetch::<_MM_HINT_NTA>(p),
                    _ => _mm_prefetch::<_MM_HINT_T0>(p),
                }
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (j, ahead, hint);
        for (k, w) in c.chunks_exact(8).enumerate() {
            s[k] = s[k].wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
    }
    s.iter().fold(0, |a, &x| a.wrapping_add(x))
}

/// xorshift64: the random masks (no dependency for a probe).
fn next(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .map_or(2, |s| s.parse().expect("threads"));
    let (rb, zeros, dist, reps) = (
        env("ROW_BYTES", 2176),
        env("ZEROS", 50),
        env("DIST", 2),
        env("REPS", 20),
    );
    assert!(rb >= 64 && zeros <= 100, "ROW_BYTES ≥ 64, ZEROS ≤ 100");
    let rb = rb / 64 * 64;
    let buf: Vec<u8> = (0..LAYERS * ROWS * rb)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let split = env("SPLIT", 0);
    let hint = env("HINT", 0);
    let sbuf: Vec<u8> = (0..LAYERS * ROWS * split)
        .map(|i| (i * 29 % 251) as u8)
        .collect();
    let team = Team::new(threads).expect("team");
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut kept: Vec<Vec<u32>> = vec![Vec::new(); LAYERS];
    let share = |t: usize| (t * ROWS / threads, (t + 1) * ROWS / threads);
    // An untimed read of 256 MiB before each timed pass evicts the last level cache (105 MiB
    // here), so neither pass finds the other's last layers there.
    let flush_read = PlainRead::new(256 << 20, threads).expect("256 MiB to read");
    let flush = || {
        flush_read.pass(&team);
    };
    let all = || {
        flush();
        let t0 = Instant::now();
        team.run(threads, &|t| {
            let (r0, r1) = share(t);
            for l in 0..LAYERS {
                let base = l * ROWS * rb;
                black_box(sum_read(&buf[base + r0 * rb..base + r1 * rb], &[], 0));
            }
        });
        t0.elapsed().as_secs_f64() * 1e3
    };
    let mut ratios = Vec::new();
    println!(
        "{threads} threads, rows of {rb} bytes, {zeros} % skipped, prefetch {dist} rows ahead"
    );
    for _ in 0..reps {
        for k in kept.iter_mut() {
            k.clear();
            k.extend((0..ROWS as u32).filter(|_| next(&mut seed) % 100 >= zeros as u64));
        }
        let kept = &kept;
        let a = all();
        flush();
        let t0 = Instant::now();
        team.run(threads, &|t| {
            let (r0, r1) = share(t);
            for (l, k) in kept.iter().enumerate() {
                let base = l * ROWS * rb;
                let lo = k.partition_point(|&r| (r as usize) < r0);
                let hi = k.partition_point(|&r| (r as usize) < r1);
                let mine = &k[lo..hi];
                let row = |r: u32| &buf[base + r as usize * rb..base + (r as usize + 1) * rb];
                let sbase = l * ROWS * split;
                let srow =
                    |r: u32| &sbuf[sbase + r as usize * split..sbase + (r as usize + 1) * split];
                for (i, &r) in mine.iter().enumerate() {
                    let ahead = match mine.get(i + dist) {
                        Some(&p) if dist > 0 => row(p),
                        _ => &[],
                    };
                    black_box(sum_read(row(r), ahead, hint));
                    if split > 0 {
                        let sahead = match mine.get(i + dist) {
                            Some(&p) if dist > 0 => srow(p),
                            _ => &[],
                        };
                        black_box(sum_read(srow(r), sahead, hint));
                    }
                }
            }
        });
        let s = t0.elapsed().as_secs_f64() * 1e3;
        let gb = (LAYERS * ROWS * rb) as f64 / a / 1e6;
        println!(
            "all {a:6.2} ms ({gb:4.1} GB/s)  kept rows {s:6.2} ms  ratio {:.3}",
            s / a
        );
        ratios.push(s / a);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "median ratio {:.3} (min {:.3}, max {:.3}; {} lines)",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1],
        ratios.len()
    );
}
