//! The default thread count: one per physical core this process may run on.
//!
//! Decode is bound by memory bandwidth. Two hardware threads of one core share its load ports
//! and miss buffers, so a second thread per core adds contention (and a spinning decode-team
//! worker) but little bandwidth. llama.cpp's default is the physical cores too.
//!
//! Only Linux is read: the process's affinity mask from `/proc/self/status` and each CPU's
//! sibling set from sysfs topology. Elsewhere, or when any of it cannot be read or parsed, the
//! default is `std::thread::available_parallelism` (logical CPUs, cgroup quota included).
//!
//! Must not: fail or panic. Every error falls back to the logical count.

use std::collections::BTreeSet;

/// Threads for `threads = 0` (Python `None`): the physical cores among the CPUs this process
/// may run on, at most `available_parallelism()` (which also applies cgroup CPU quotas), and at
/// least 1.
pub fn default_threads() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    physical_cores().map_or(logical, |p| p.clamp(1, logical))
}

/// The most threads a model accepts: 8 per CPU this process may run on, at least 64 (Python's
/// `sparselm.max_threads()` is the same rule). Decode threads spin between the ~200 short
/// parallel regions of a token, so more threads than CPUs only slow it down, and thousands
/// took minutes just to start.
pub fn max_threads() -> usize {
    let cpus = allowed_cpus()
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    cpus.saturating_mul(8).max(64)
}

/// The thread count a model runs with for a requested `threads` (0: [`default_threads`]), or
/// the reason it is refused: more than [`max_threads`]. `Model::load` and the native CLI's
/// `--threads` (checked before anything is read) both use it, so they refuse the same counts
/// with the same words.
pub fn resolve_threads(threads: usize) -> Result<usize, String> {
    if threads == 0 {
        return Ok(default_threads());
    }
    let limit = max_threads();
    if threads > limit {
        return Err(format!(
            "{threads} is more than this machine can use: at most {limit} (8 per CPU \
             available to this process)"
        ));
    }
    Ok(threads)
}

/// The number of CPUs of this process's affinity mask, or `None` where it cannot be read.
fn allowed_cpus() -> Option<usize> {
    allowed_cpu_list().map(|c| c.len())
}

/// The CPUs of this process's affinity mask (Linux `/proc/self/status`), or `None` where it
/// cannot be read or parsed.
fn allowed_cpu_list() -> Option<Vec<usize>> {
    #[cfg(target_os = "linux")]
    {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
        parse_cpu_list(allowed)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// Distinct physical cores among the CPUs of this process's affinity mask (Linux sysfs), or
/// `None` where that cannot be read.
pub fn physical_cores() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        let cpus = allowed_cpu_list()?;
        count_cores(&cpus, |cpu| {
            let dir = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
            // core_cpus_list since Linux 5.3; thread_siblings_list before (same content)
            std::fs::read_to_string(format!("{dir}/core_cpus_list"))
                .or_else(|_| std::fs::read_to_string(format!("{dir}/thread_siblings_list")))
                .ok()
        })
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// The number of distinct sibling sets (one per physical core) of `cpus`, where
/// `siblings(cpu)` gives the kernel's CPU list of the hardware threads sharing `cpu`'s core;
/// `None` if one cannot be read or parsed, or `cpus` is empty.
fn count_cores(cpus: &[usize], siblings: impl Fn(usize) -> Option<String>) -> Option<usize> {
    let mut cores = BTreeSet::new();
    for &cpu in cpus {
        cores.insert(parse_cpu_list(&siblings(cpu)?)?);
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// A kernel CPU list (`"0-3,8,10-11"`, surrounding white space allowed) as sorted, distinct CPU
/// numbers; `None` if malformed, empty, or naming more than 65536 CPUs.
fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut cpus = BTreeSet::new();
    for part in s.trim().split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<usize>().ok()?, b.trim().parse().ok()?),
            None => {
                let c = part.trim().parse::<usize>().ok()?;
                (c, c)
            }
        };
        if hi < lo || hi - lo >= 1 << 16 || cpus.len() + (hi - lo) >= 1 << 16 {
            return None;
        }
        cpus.extend(lo..=hi);
    }
    (!cpus.is_empty()).then(|| cpus.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_threads_picks_the_default_for_0_and_refuses_above_the_limit() {
        assert_eq!(resolve_threads(0), Ok(default_threads()));
        assert_eq!(resolve_threads(1), Ok(1));
        let m = max_threads();
        assert_eq!(resolve_threads(m), Ok(m));
        let why = resolve_threads(m + 1).unwrap_err();
        assert!(why.starts_with(&format!("{} is more than", m + 1)), "{why}");
        assert!(why.contains(&format!("at most {m}")), "{why}");
    }

    #[test]
    fn max_threads_is_eight_per_allowed_cpu_and_at_least_64() {
        let m = max_threads();
        assert!(m >= 64 && m >= default_threads());
        if let Some(n) = allowed_cpus() {
            assert_eq!(m, (8 * n).max(64));
        }
    }

    #[test]
    fn parse_cpu_list_reads_kernel_lists_and_rejects_garbage() {
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("0-3\n"), Some(vec![0, 1, 2, 3]));
        assert_eq!(parse_cpu_list(" 0-1,8,10-11 "), Some(vec![0, 1, 8, 10, 11]));
        assert_eq!(parse_cpu_list("3,1,1-2"), Some(vec![1, 2, 3]));
        for bad in ["", " ", "a", "1-", "-1", "3-1", "1,,2", "0-99999999", "1.5"] {
            assert_eq!(parse_cpu_list(bad), None, "{bad:?}");
        }
    }

    /// 4 cores × 2 threads, Linux numbering: CPU i and i + 4 share core i % 4.
    fn smt(cpu: usize) -> Option<String> {
        (cpu < 8).then(|| format!("{},{}", cpu % 4, cpu % 4 + 4))
    }

    #[test]
    fn count_cores_counts_sibling_sets_of_the_allowed_cpus() {
        let all: Vec<usize> = (0..8).collect();
        assert_eq!(count_cores(&all, smt), Some(4));
        // two threads of one core, one thread of each of two cores
        assert_eq!(count_cores(&[0, 4], smt), Some(1));
        assert_eq!(count_cores(&[0, 1], smt), Some(2));
        // no SMT: every CPU its own core
        assert_eq!(count_cores(&all, |c| Some(format!("{c}\n"))), Some(8));
        // unreadable or malformed topology, or nothing allowed: no answer
        assert_eq!(count_cores(&[0, 9], smt), None);
        assert_eq!(count_cores(&[0], |_| Some("x".into())), None);
        assert_eq!(count_cores(&[], smt), None);
    }

    #[test]
    fn default_threads_is_between_one_and_the_logical_cpus() {
        let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
        let t = default_threads();
        assert!((1..=logical).contains(&t), "{t} of {logical}");
        if let Some(p) = physical_cores() {
            assert!(p >= 1);
        }
    }
}
