//! A plain read of memory on a thread team: the machine's read bandwidth at this moment.
//!
//! Benchmarks pair their timings with it, because the bandwidth of a shared machine drifts:
//! on the reference VM a 2-thread read moves between ~33 and ~60 GB/s in phases of seconds to
//! minutes (PERF NOTES in `kernels/mod.rs`), so a decode speed means little without the
//! ceiling measured next to it.

use std::hint::black_box;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::team::Team;

/// Sum of `b` with eight independent accumulators (the loads, not the adds, set the pace).
fn sum_read(b: &[u64]) -> u64 {
    let mut s = [0u64; 8];
    for c in b.chunks_exact(8) {
        for k in 0..8 {
            s[k] = s[k].wrapping_add(c[k]);
        }
    }
    s.iter().fold(0, |a, &x| a.wrapping_add(x))
}

/// A buffer for plain reads of memory: distinct values (so no page can be shared), from the
/// global allocator (2 MiB pages where the binary installs `alloc::HugePageAlloc`, as the
/// Python module, the CLI and the probes do); it should be well above the last-level cache
/// (≥ 256 MiB). Kept between passes, so a probe can pair every measurement with a read.
pub struct PlainRead {
    buf: Vec<u64>,
}

impl PlainRead {
    /// About `bytes` bytes, a whole number of 8-word rows per share of up to `threads`.
    pub fn new(bytes: usize, threads: usize) -> Result<PlainRead> {
        let threads = threads.max(1);
        let share = threads.checked_mul(8).ok_or_else(|| {
            Error::Argument(format!("read_bandwidth: {threads} threads is too many"))
        })?;
        let words = bytes / 8 / share * share;
        if words == 0 {
            return Err(Error::Argument(format!(
                "read_bandwidth: {bytes} bytes is too small for {threads} threads"
            )));
        }
        let mut buf: Vec<u64> = Vec::new();
        buf.try_reserve_exact(words).map_err(|_| {
            Error::Argument(format!("read_bandwidth: cannot allocate {bytes} bytes"))
        })?;
        buf.extend((0..words as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        Ok(PlainRead { buf })
    }

    /// GB/s of one read of the whole buffer on `team`, each thread reading one contiguous share.
    pub fn pass(&self, team: &Team) -> f64 {
        let share = self.buf.len() / team.threads();
        let t = Instant::now();
        team.run(team.threads(), &|i| {
            black_box(sum_read(&self.buf[i * share..(i + 1) * share]));
        });
        (share * team.threads() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
    }
}

/// GB/s of `passes` plain reads (see [`PlainRead`]) of a `bytes`-byte buffer on `threads`
/// threads, each reading one contiguous share.
pub fn read_bandwidth(threads: usize, bytes: usize, passes: usize) -> Result<Vec<f64>> {
    if threads == 0 || passes == 0 {
        return Err(Error::Argument(
            "read_bandwidth: threads and passes must be at least 1".into(),
        ));
    }
    let buf = PlainRead::new(bytes, threads)?;
    let team = Team::new(threads).map_err(|e| Error::Argument(format!("threads: {e}")))?;
    Ok((0..passes).map(|_| buf.pass(&team)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_bandwidth_measures_and_rejects_bad_arguments() {
        let v = read_bandwidth(2, 8 << 20, 3).unwrap();
        assert_eq!(v.len(), 3);
        assert!(v.iter().all(|&g| g.is_finite() && g > 0.0), "{v:?}");
        assert!(read_bandwidth(0, 1 << 20, 1).is_err());
        assert!(read_bandwidth(1, 1 << 20, 0).is_err());
        assert!(read_bandwidth(4, 16, 1).is_err());
        // 8 · threads overflows: an error, not a division by zero
        assert!(PlainRead::new(1 << 20, 1 << 61).is_err());
    }
}
