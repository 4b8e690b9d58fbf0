//! `Team`: the decode step's thread team. Workers spin briefly between parallel regions
//! instead of sleeping, so the ~200 short regions of a decode step (GEMVs, the sparse down
//! projection, attention head groups) do not each pay a futex wake-up.
//!
//! Why not rayon for these: rayon parks idle workers after a few yields, and on this 2-vCPU VM
//! a decode step saw ~80 context switches per token and used 1.78 of 2 CPUs; with one thread
//! decode ran at 93-99 % of the one-thread read bandwidth but with two at 59-69 % of the
//! two-thread one (PERF NOTES in `kernels/mod.rs`). Prompts (long GEMMs) and loading keep the
//! rayon pool.
//!
//! Protocol: a region is published by closing the next epoch in the `claim` word (epoch in the
//! high 32 bits, next task index in the low 32; index `CLOSED` while the region's task
//! function and count are written), then opening it at index 0. Workers claim task
//! indices with a compare-and-swap that fails if the epoch moved, so a worker can never run a
//! task of a region other than the one whose function it read; the caller works too, then
//! waits until every task has finished (`done`). Idle workers spin for `SPIN` (300 µs) and then park
//! on a condvar; the publisher wakes them only if one is parked (no lost wake-up: both sides
//! use SeqCst and the parked side re-checks under the mutex). A panicking task is caught on
//! the worker and re-raised on the caller after the region has drained.
//!
//! Must not: run regions re-entrantly (a task calling `run` on the same team runs the inner
//! region inline on the calling thread), or be shared by two callers at once (`run` takes a
//! lock).

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// Task index of an epoch whose region is still being set up (no task can be claimed).
const CLOSED: u64 = 0xFFFF_FFFF;

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(300);

type Task<'a> = &'a (dyn Fn(usize) + Sync);

/// A value alone on its cache line(s).
#[repr(align(64))]
struct Own<T>(T);

impl<T> std::ops::Deref for Own<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The words a region's publication writes each sit on their own cache line: idle workers
/// spin reading `claim` (and `stop`), the caller spins on `done`, so a store to one never
/// pulls the line another thread is polling. Measured on the Xeon VM (stop 19, a loop of
/// empty two-thread regions): 1.7 µs per region with all of them in one line, 1.4 µs apart.
/// What is left is mostly the caller's serialised stores, each waiting for its line to come
/// back from the other core (~0.2 µs per transfer on this VM).
struct Shared {
    /// epoch << 32 | next task index
    claim: Own<AtomicU64>,
    /// The current region's task function: a pointer to the `&dyn Fn` on `run`'s stack
    /// (valid while the region runs).
    job: Own<AtomicPtr<Task<'static>>>,
    ntasks: Own<AtomicUsize>,
    done: Own<AtomicUsize>,
    stop: Own<AtomicBool>,
    parked: AtomicUsize,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    lock: Mutex<()>,
    wake: Condvar,
    /// One caller at a time.
    caller: Mutex<()>,
}

thread_local! {
    /// Set while this thread runs a task of some team (nested regions then run inline).
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// A team of `threads − 1` spinning workers plus the calling thread.
pub struct Team {
    shared: Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<()>>,
    threads: usize,
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Team({} threads)", self.threads)
    }
}

impl Team {
    /// A team of `threads` (≥ 1) threads: the caller plus `threads − 1` workers.
    pub fn new(threads: usize) -> std::io::Result<Team> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            claim: Own(AtomicU64::new(0)),
            job: Own(AtomicPtr::new(std::ptr::null_mut())),
            ntasks: Own(AtomicUsize::new(0)),
            done: Own(AtomicUsize::new(0)),
            stop: Own(AtomicBool::new(false)),
            parked: AtomicUsize::new(0),
            panic: Mutex::new(None),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            caller: Mutex::new(()),
        });
        let mut workers = Vec::with_capacity(threads - 1);
        for i in 1..threads {
            let s = Arc::clone(&shared);
            let h = std::thread::Builder::new()
                .name(format!("sparselm-team-{i}"))
                .spawn(move || worker(&s));
            match h {
                Ok(h) => workers.push(h),
                Err(e) => {
                    shutdown(&shared, &mut workers);
                    return Err(e);
                }
            }
        }
        Ok(Team {
            shared,
            workers,
            threads,
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run `f(0), …, f(n − 1)` across the team and return when all have finished. Tasks are
    /// handed out in index order to whichever thread is free.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        if n == 1 || self.threads == 1 || IN_TASK.with(|t| t.get()) {
            (0..n).for_each(f);
            return;
        }
        let _one = self.shared.caller.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        assert!((n as u64) < CLOSED, "team: too many tasks");
        // Close the old epoch before touching the region's fields: a worker still looping in
        // the previous region could otherwise read the new task count and claim one more
        // index of the old epoch, then run it with the new function.
        let epoch = (s.claim.load(SeqCst) >> 32) + 1;
        s.claim.store(epoch << 32 | CLOSED, SeqCst);
        // Lifetime erased for the shared slot; workers use it only while this region runs.
        let job: *const Task<'_> = &f;
        s.job.store(job as *mut Task<'static>, SeqCst);
        s.ntasks.store(n, SeqCst);
        s.done.store(0, SeqCst);
        s.claim.store(epoch << 32, SeqCst);
        if s.parked.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        work(s, epoch);
        while s.done.load(SeqCst) < n {
            std::hint::spin_loop();
        }
        if let Some(p) = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
            resume_unwind(p);
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        shutdown(&self.shared, &mut self.workers);
    }
}

fn shutdown(s: &Shared, workers: &mut Vec<std::thread::JoinHandle<()>>) {
    s.stop.store(true, SeqCst);
    {
        let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
        s.wake.notify_all();
    }
    for h in workers.drain(..) {
        let _ = h.join();
    }
}

/// Claim and run tasks of region `epoch` until none is left.
fn work(s: &Shared, epoch: u64) {
    loop {
        let cur = s.claim.load(SeqCst);
        if cur >> 32 != epoch {
            return;
        }
        let i = (cur & 0xFFFF_FFFF) as usize;
        if i >= s.ntasks.load(SeqCst) {
            return;
        }
        if s.claim
            .compare_exchange_weak(cur, cur + 1, SeqCst, SeqCst)
            .is_err()
        {
            continue;
        }
        // SAFETY: task i of this epoch is claimed and not done, so its region's `run` (whose
        // stack holds the task reference, stored before the epoch was opened) has not returned.
        let f: Task<'_> = unsafe { *s.job.load(SeqCst) };
        IN_TASK.with(|t| t.set(true));
        let r = catch_unwind(AssertUnwindSafe(|| f(i)));
        IN_TASK.with(|t| t.set(false));
        if let Err(p) = r {
            s.panic
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(p);
        }
        s.done.fetch_add(1, SeqCst);
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        // spin for a new epoch, then park
        let t0 = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let c = s.claim.load(SeqCst);
            if (c >> 32 != seen && c & 0xFFFF_FFFF != CLOSED) || s.stop.load(SeqCst) {
                break c >> 32;
            }
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(64) && t0.elapsed() > SPIN {
                let g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.parked.fetch_add(1, SeqCst);
                let g = s
                    .wake
                    .wait_while(g, |_| {
                        s.claim.load(SeqCst) >> 32 == seen && !s.stop.load(SeqCst)
                    })
                    .unwrap_or_else(|e| e.into_inner());
                s.parked.fetch_sub(1, SeqCst);
                drop(g);
            }
        };
        if s.stop.load(SeqCst) {
            return;
        }
        seen = epoch;
        work(s, epoch);
    }
}

thread_local! {
    /// The team of the forward pass running on this thread (see [`with_team`]).
    static CURRENT: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
}

/// Restores this thread's previous team when dropped (also when `f` of [`with_team`] panics).
/// Private, and made only by [`with_team`], which drops it before its borrow of the team ends:
/// a guard that could be leaked, outlive its team or be dropped out of order would leave
/// [`CURRENT`] pointing at a freed team.
struct Restore {
    prev: *const Team,
}

impl Drop for Restore {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.prev));
    }
}

/// Run `f` with `team` as this thread's team: the parallel helpers below ([`par_chunks`],
/// [`par_tasks`], [`par_ranges`], [`current_threads`]) called inside `f` run on it instead of
/// the rayon pool. Calls nest; the previous team is restored when `f` returns or panics.
pub fn with_team<R>(team: &Team, f: impl FnOnce() -> R) -> R {
    let _restore = Restore {
        prev: CURRENT.with(|c| c.replace(team as *const Team)),
    };
    f()
}

/// Run `f` with the team of the innermost [`with_team`] running on this thread, if any.
pub fn with_current<R>(f: impl FnOnce(Option<&Team>) -> R) -> R {
    let p = CURRENT.with(|c| c.get());
    // SAFETY: a non-null pointer was set by a `with_team` call that is still running on this
    // thread (its guard restores the previous value before the call returns, including on
    // unwinding, and such calls nest), so the team it borrows is alive.
    f(unsafe { p.as_ref() })
}

/// `f(i, [chunk i of each buffer])` in parallel, where buffer `k` is cut into chunks of
/// `chunks[k]` elements (as many tasks as buffer 0 has chunks; the others must have at least as
/// many): on the team of a running [`with_team`] on this thread, else on the current rayon
/// pool.
pub fn par_chunks<T: Send, const N: usize>(
    bufs: [&mut [T]; N],
    chunks: [usize; N],
    f: impl Fn(usize, [&mut [T]; N]) + Sync,
) {
    let n = bufs[0].len().div_ceil(chunks[0].max(1));
    assert!(
        (0..N).all(|k| chunks[k] > 0 && bufs[k].len().div_ceil(chunks[k]) >= n),
        "par_chunks: a buffer has fewer chunks than buffer 0"
    );
    let lens: [usize; N] = std::array::from_fn(|k| bufs[k].len());
    let ptrs: [SendPtr<T>; N] = bufs.map(|b| SendPtr(b.as_mut_ptr()));
    let task = |i: usize| {
        let slices: [&mut [T]; N] = std::array::from_fn(|k| {
            let start = (i * chunks[k]).min(lens[k]);
            let end = (start + chunks[k]).min(lens[k]);
            let p = &ptrs[k];
            // SAFETY: for each buffer, chunks of distinct i are disjoint and inside it; the
            // buffers are distinct &mut borrows held for the whole call; each i runs once.
            unsafe { std::slice::from_raw_parts_mut(p.0.add(start), end - start) }
        });
        f(i, slices);
    };
    with_current(|team| match team {
        Some(t) => t.run(n, &task),
        None => (0..n).into_par_iter().for_each(task),
    })
}

/// Threads of the team of a running [`with_team`] on this thread, else of the current rayon
/// pool.
pub fn current_threads() -> usize {
    with_current(|team| team.map_or_else(rayon::current_num_threads, Team::threads)).max(1)
}

/// `f(i)` for `i < n`, in parallel on the team of a running [`with_team`] on this thread,
/// else on the current rayon pool (for tasks that share out their work themselves).
pub fn par_tasks(n: usize, f: impl Fn(usize) + Sync) {
    with_current(|team| match team {
        Some(t) => t.run(n, &f),
        // a closure, not `f` itself: rayon needs a Send function and `f` is only Sync
        #[allow(clippy::redundant_closure)]
        None => (0..n).into_par_iter().for_each(|i| f(i)),
    })
}

/// `f(start, chunk)` over disjoint chunks of `buf` that together cover it, in parallel, each
/// thread streaming through memory front to back: `buf` is cut into one contiguous range of
/// whole `unit`-element units per thread; a thread takes its own range from the front, each
/// claim half of what is left of it but at least `grain` units, then helps with the others'
/// ranges from their back ends the same way. Chunk boundaries fall on units (the last chunk may
/// be short). On the team of a running [`with_team`] on this thread, else on the current rayon
/// pool.
///
/// Why not [`par_chunks`] with many small tasks: every claim is a locked compare-and-swap,
/// which waits for the core's loads in flight, and in the machine's fast bandwidth phase 16
/// tasks per GEMV read 10-14 % slower than this (PERF NOTES in `kernels/mod.rs`).
pub fn par_ranges<T: Send>(
    buf: &mut [T],
    unit: usize,
    grain: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let unit = unit.max(1);
    let grain = grain.max(1);
    let len = buf.len();
    let units = len.div_ceil(unit);
    assert!(units < (1 << 31), "par_ranges: too many units");
    let threads = current_threads().min(units.max(1));
    if threads == 1 {
        if len > 0 {
            f(0, buf);
        }
        return;
    }
    let ptr = &SendPtr(buf.as_mut_ptr());
    // front << 32 | back, per thread, each on its own cache lines; on the stack for teams of
    // up to SPANS threads (decode runs ~200 of these per token).
    let span = |t: usize| {
        let (a, b) = (
            (t * units / threads) as u64,
            ((t + 1) * units / threads) as u64,
        );
        Span(AtomicU64::new(a << 32 | b))
    };
    const SPANS: usize = 8;
    let (on_stack, on_heap): ([Span; SPANS], Vec<Span>);
    let spans: &[Span] = if threads <= SPANS {
        on_stack = std::array::from_fn(|t| span(t.min(threads - 1)));
        &on_stack[..threads]
    } else {
        on_heap = (0..threads).map(span).collect();
        &on_heap
    };
    let run = |u0: usize, u1: usize| {
        let (start, end) = (u0 * unit, (u1 * unit).min(len));
        // SAFETY: claims are disjoint unit ranges inside `buf` (each unit is handed out once
        // by the compare-and-swap of its span), and `buf` is borrowed for the whole call.
        f(start, unsafe {
            std::slice::from_raw_parts_mut(ptr.0.add(start), end - start)
        });
    };
    let task = |t: usize| {
        // Own range, front to back.
        while let Some((a, b)) = spans[t].claim(grain, true) {
            run(a, b);
        }
        // Then the others', back to front.
        for o in (t + 1..threads).chain(0..t) {
            while let Some((a, b)) = spans[o].claim(grain, false) {
                run(a, b);
            }
        }
    };
    with_current(|team| match team {
        Some(tm) => tm.run(threads, &task),
        None => (0..threads).into_par_iter().for_each(task),
    })
}

/// One thread's range of units of [`par_ranges`]: `front << 32 | back`.
#[repr(align(128))]
struct Span(AtomicU64);

impl Span {
    /// Take units from the front (or the back): half of those left but at least `grain`
    /// (or all, if fewer); `Some((first, end))`, `None` when the range is used up.
    fn claim(&self, grain: usize, front: bool) -> Option<(usize, usize)> {
        let mut cur = self.0.load(SeqCst);
        loop {
            let (a, b) = (cur >> 32, cur & 0xFFFF_FFFF);
            if a >= b {
                return None;
            }
            // Half of what is left, at least `grain`: few claims (each compare-and-swap drains
            // the core's loads in flight), small ones only near the end.
            let k = (grain as u64).max((b - a) / 2).min(b - a);
            let (new, got) = if front {
                ((a + k) << 32 | b, (a, a + k))
            } else {
                (a << 32 | (b - k), (b - k, b))
            };
            match self.0.compare_exchange_weak(cur, new, SeqCst, SeqCst) {
                Ok(_) => return Some((got.0 as usize, got.1 as usize)),
                Err(c) => cur = c,
            }
        }
    }
}

pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: used only to hand disjoint sub-slices of one &mut [T] (T: Send) to tasks.
unsafe impl<T: Send> Sync for SendPtr<T> {}
unsafe impl<T: Send> Send for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the whole wrapper).
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Regions of alternating sizes back to back, with more workers than cores so that
    /// workers are preempted inside a region's hand-over: a worker left over from a region
    /// must never claim a task of the next one (it once ran task 3 of a 7-task region twice
    /// after a 3-task region).
    #[test]
    fn no_task_runs_twice_when_regions_change_size() {
        let team = Team::new(4).unwrap();
        let hits: Vec<AtomicU32> = (0..64).map(|_| AtomicU32::new(0)).collect();
        for round in 0..20_000usize {
            let n = [3usize, 7, 1, 64, 2, 5][round % 6];
            team.run(n, &|i| {
                hits[i].fetch_add(1, SeqCst);
            });
            for (i, h) in hits.iter().enumerate().take(n) {
                assert_eq!(h.swap(0, SeqCst), 1, "round {round}: task {i} of {n}");
            }
        }
    }

    #[test]
    fn every_task_runs_once_across_many_regions() {
        let team = Team::new(3).unwrap();
        for n in [0usize, 1, 2, 3, 7, 64, 1000] {
            for round in 0..50 {
                let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                team.run(n, &|i| {
                    hits[i].fetch_add(1, SeqCst);
                });
                assert!(
                    hits.iter().all(|h| h.load(SeqCst) == 1),
                    "n={n} round={round}"
                );
            }
        }
        // after parking
        std::thread::sleep(Duration::from_millis(5));
        let mut v = vec![0u32; 1001];
        with_team(&team, || {
            par_chunks([&mut v[..]], [16], |i, [c]| {
                for (k, x) in c.iter_mut().enumerate() {
                    *x = (i * 16 + k) as u32;
                }
            })
        });
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_team_survives() {
        let team = Team::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.run(8, &|i| {
                if i == 5 {
                    panic!("task 5");
                }
            })
        }));
        assert!(r.is_err());
        let count = AtomicU32::new(0);
        team.run(8, &|_| {
            count.fetch_add(1, SeqCst);
        });
        assert_eq!(count.load(SeqCst), 8);
    }

    /// `with_team` nests, and restores the previous team when its closure returns or panics.
    #[test]
    fn with_team_nests_and_restores_on_panic() {
        let (a, b) = (Team::new(2).unwrap(), Team::new(3).unwrap());
        assert!(with_current(|t| t.is_none()));
        with_team(&a, || {
            assert_eq!(current_threads(), 2);
            with_team(&b, || assert_eq!(current_threads(), 3));
            assert_eq!(current_threads(), 2);
            let r = catch_unwind(AssertUnwindSafe(|| with_team(&b, || panic!("inner"))));
            assert!(r.is_err());
            assert_eq!(current_threads(), 2);
        });
        assert!(with_current(|t| t.is_none()));
    }

    #[test]
    fn nested_regions_run_inline() {
        let team = Team::new(2).unwrap();
        let count = AtomicU32::new(0);
        team.run(4, &|_| {
            team.run(3, &|_| {
                count.fetch_add(1, SeqCst);
            });
        });
        assert_eq!(count.load(SeqCst), 12);
    }

    /// Every element is handed out exactly once, at its own offset, in chunks that start on
    /// unit boundaries: on teams of 1-4, 8 and 9 threads (spans on the stack up to 8, then on
    /// the heap), on the rayon pool, and nested in a task.
    #[test]
    fn par_ranges_covers_every_element_once() {
        let check = |len: usize, unit: usize, grain: usize| {
            let mut v = vec![u32::MAX; len];
            let hits: Vec<AtomicU32> = (0..len).map(|_| AtomicU32::new(0)).collect();
            par_ranges(&mut v, unit, grain, |start, c| {
                assert_eq!(start % unit.max(1), 0, "chunk off a unit boundary");
                assert!(!c.is_empty(), "empty chunk");
                for (k, x) in c.iter_mut().enumerate() {
                    *x = (start + k) as u32;
                    hits[start + k].fetch_add(1, SeqCst);
                }
            });
            assert!(
                v.iter().enumerate().all(|(i, &x)| x == i as u32),
                "{len} {unit} {grain}"
            );
            assert!(
                hits.iter().all(|h| h.load(SeqCst) == 1),
                "{len} {unit} {grain}"
            );
        };
        let shapes = [
            (0, 1, 1),
            (1, 16, 1),
            (5, 16, 4),
            (17, 16, 1),
            (100, 1, 3),
            (1000, 16, 2),
        ];
        for threads in [1, 2, 3, 4, 8, 9] {
            let team = Team::new(threads).unwrap();
            with_team(&team, || {
                for &(len, unit, grain) in &shapes {
                    check(len, unit, grain);
                }
                // inside a task the region runs inline on the calling thread
                team.run(2, &|_| check(333, 16, 1));
            });
        }
        for &(len, unit, grain) in &shapes {
            check(len, unit, grain);
        }
    }

    /// A thread that finishes its own range takes work from another's (from the back).
    #[test]
    fn par_ranges_helps_a_slow_thread() {
        let team = Team::new(2).unwrap();
        let mut v = vec![0usize; 64];
        let by: Mutex<Vec<(usize, std::thread::ThreadId)>> = Mutex::new(Vec::new());
        with_team(&team, || {
            par_ranges(&mut v, 1, 1, |start, c| {
                // the first chunk of range 0 (units 0..32) is slow
                if start == 0 {
                    std::thread::sleep(Duration::from_millis(300));
                }
                c.fill(1);
                by.lock()
                    .unwrap()
                    .push((start, std::thread::current().id()));
            })
        });
        assert!(v.iter().all(|&x| x == 1));
        let by = by.into_inner().unwrap();
        // Some thread ran units of both ranges (0..32 and 32..64): one range's thread finished
        // and took over part of the other's. Usually range 1's thread steals from the back of
        // range 0 while unit 0 sleeps; under emulation (qemu, tests in parallel) range 0's
        // thread can stall before its first claim, and then range 1's thread takes all of
        // range 0, unit 0 included (seen in CI). Without stealing, each thread would keep to
        // its own range.
        let threads: std::collections::HashSet<_> = by.iter().map(|&(_, t)| t).collect();
        assert!(
            threads.iter().any(|&t| {
                let mine = by.iter().filter(|&&(_, u)| u == t);
                mine.clone().any(|&(s, _)| s < 32) && mine.clone().any(|&(s, _)| s >= 32)
            }),
            "no thread took over units of another's range: {by:?}"
        );
    }
}
