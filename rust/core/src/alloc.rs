//! `HugePageAlloc`: a global allocator that puts large buffers (weights, the latent cache,
//! prompt scratch) on transparent huge pages, and leaves everything else to the system
//! allocator.
//!
//! Why: decode streams ~1 GB of weights per token. On 4 KiB pages every 4 KiB of a stream is
//! a TLB miss and a point where the hardware prefetchers stop; on this machine a plain 2-thread
//! read of 1 GiB went from 40-47 to 62 GB/s (1 thread: 25 → 32 GB/s) once the buffer was on
//! 2 MiB pages (PERF NOTES in `kernels/mod.rs`). Most Linux systems ship THP in `madvise` mode,
//! where only regions asked for with `madvise(MADV_HUGEPAGE)` get huge pages, so the memory has
//! to be asked for explicitly: allocations of at least [`HUGE_MIN`] bytes are mapped directly
//! with `mmap` on a 2 MiB boundary and advised before their first touch. Pages stay lazily
//! committed (an untouched part of a large KV cache costs no memory), and `alloc_zeroed` needs
//! no memset because fresh anonymous mappings read as zero.
//!
//! Only on Linux and Android; elsewhere it is the system allocator. It must not allocate
//! itself (it *is* the allocator): the opt-out `SPARSELM_HUGEPAGES=0` is read with
//! `getenv`, once. Frontends (the Python extension, the CLI) install it with
//! `#[global_allocator] static A: HugePageAlloc = HugePageAlloc;`; the core does not, so a
//! program embedding the core keeps its own allocator unless it opts in.

use std::alloc::{GlobalAlloc, Layout, System};

/// Huge page size (x86-64 and aarch64 with 4 KiB base pages).
pub const HUGE_PAGE: usize = 2 << 20;
/// Allocations of at least this many bytes go on huge pages.
pub const HUGE_MIN: usize = 2 << 20;

/// See the module documentation.
pub struct HugePageAlloc;

#[cfg(any(target_os = "linux", target_os = "android"))]
mod imp {
    use super::{HUGE_MIN, HUGE_PAGE};
    use std::alloc::Layout;
    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

    /// 0: not read yet, 1: on, 2: off (`SPARSELM_HUGEPAGES=0`).
    static STATE: AtomicU8 = AtomicU8::new(0);

    fn enabled() -> bool {
        match STATE.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                // SAFETY: getenv with a NUL-terminated name; the result is only read here, before
                // any other thread of ours could change the environment (we never do).
                let v = unsafe { libc::getenv(c"SPARSELM_HUGEPAGES".as_ptr()) };
                // SAFETY: a non-null getenv result is a NUL-terminated string.
                let off = !v.is_null() && unsafe { std::ffi::CStr::from_ptr(v) }.to_bytes() == b"0";
                STATE.store(if off { 2 } else { 1 }, Ordering::Relaxed);
                !off
            }
        }
    }

    /// Whether `layout` is served by [`map`] (the same answer for alloc and dealloc of one
    /// block: it depends on the layout only, and the switch is read once).
    pub(super) fn is_huge(layout: Layout) -> bool {
        layout.size() >= HUGE_MIN && layout.align() <= HUGE_PAGE && enabled()
    }

    /// The base page size (4 KiB on x86-64; 4, 16 or 64 KiB on aarch64 kernels).
    fn page() -> usize {
        static PAGE: AtomicUsize = AtomicUsize::new(0);
        match PAGE.load(Ordering::Relaxed) {
            0 => {
                // SAFETY: sysconf has no preconditions.
                let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
                let p = if p > 0 { p as usize } else { 4096 };
                PAGE.store(p, Ordering::Relaxed);
                p
            }
            p => p,
        }
    }

    fn mapped_len(size: usize) -> usize {
        size.next_multiple_of(page())
    }

    /// A zeroed, lazily committed mapping of at least `size` bytes starting on a 2 MiB
    /// boundary, whose whole 2 MiB units are advised as huge pages (the tail stays on base
    /// pages, so rounding costs no memory); null on failure.
    pub(super) fn map(size: usize) -> *mut u8 {
        let len = mapped_len(size);
        let Some(over) = len.checked_add(HUGE_PAGE) else {
            return std::ptr::null_mut();
        };
        // SAFETY: anonymous private mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                over,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        let start = p as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE);
        let (head, tail) = (aligned - start, over - (aligned - start) - len);
        // SAFETY: the unmapped head and tail are page-aligned, lie inside the mapping just
        // made and outside [aligned, aligned + len), which is what we hand out.
        unsafe {
            if head > 0 {
                libc::munmap(p, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
            // Advice only: without THP (or with THP "never") the mapping just stays on base
            // pages, so the result is ignored.
            let whole = size / HUGE_PAGE * HUGE_PAGE;
            libc::madvise(aligned as *mut libc::c_void, whole, libc::MADV_HUGEPAGE);
        }
        aligned as *mut u8
    }

    /// Unmap a block made by [`map`] for `size` bytes.
    ///
    /// # Safety
    /// `p` must come from `map(size)` and not be used afterwards.
    pub(super) unsafe fn unmap(p: *mut u8, size: usize) {
        // SAFETY (caller): p..p + mapped_len(size) is exactly the mapping map() kept.
        unsafe { libc::munmap(p as *mut libc::c_void, mapped_len(size)) };
    }

    /// Whether a block mapped for `old` bytes already holds `new` bytes.
    pub(super) fn fits(old: usize, new: usize) -> bool {
        new >= HUGE_MIN && mapped_len(new) == mapped_len(old)
    }

    pub(super) fn no_huge_pages(p: *const u8, len: usize) {
        let start = (p as usize).next_multiple_of(page());
        let end = (p as usize + len) / page() * page();
        if end > start {
            // SAFETY: advice on whole pages of a live allocation; it changes no contents.
            unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    end - start,
                    libc::MADV_NOHUGEPAGE,
                );
            }
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod imp {
    use std::alloc::Layout;
    pub(super) fn is_huge(_: Layout) -> bool {
        false
    }
    pub(super) fn map(_: usize) -> *mut u8 {
        std::ptr::null_mut()
    }
    pub(super) unsafe fn unmap(_: *mut u8, _: usize) {}
    pub(super) fn fits(_: usize, _: usize) -> bool {
        false
    }
    pub(super) fn no_huge_pages(_: *const u8, _: usize) {}
}

/// Keep `buf` on base pages: for a large buffer that is touched only in part, like a KV cache
/// sized for the whole context, where a huge page per touched spot would commit up to 2 MiB
/// for a few KiB of data. Call it before the buffer is first written.
pub fn no_huge_pages<T>(buf: &[T]) {
    imp::no_huge_pages(buf.as_ptr() as *const u8, std::mem::size_of_val(buf));
}

// SAFETY: every block is served and released by the same side (imp::is_huge depends only on
// the layout and a switch read once), the mappings are aligned to 2 MiB ≥ any layout.align()
// they accept, and they are zero-filled, as alloc_zeroed requires.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if imp::is_huge(layout) {
            return imp::map(layout.size());
        }
        // SAFETY: forwarded contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if imp::is_huge(layout) {
            return imp::map(layout.size()); // fresh anonymous pages are zero
        }
        // SAFETY: forwarded contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if imp::is_huge(layout) {
            // SAFETY: a huge layout's block came from imp::map(layout.size()).
            return unsafe { imp::unmap(ptr, layout.size()) };
        }
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY (caller): new_size rounded to align does not overflow isize.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let (was, will) = (imp::is_huge(layout), imp::is_huge(new));
        if !was && !will {
            // SAFETY: forwarded contract.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        if was && will && imp::fits(layout.size(), new_size) {
            return ptr; // same mapping, same length
        }
        // SAFETY: `new` is a valid non-zero layout (new_size ≥ 1 per the caller's contract).
        let q = unsafe { self.alloc(new) };
        if !q.is_null() {
            // SAFETY: both blocks hold at least min(old, new) bytes and do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, q, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        q
    }
}

/// `n` zero floats from the global allocator's zeroed allocation (no page is touched), or None
/// where the allocation fails (a `vec![0.0; n]` would abort the process instead).
pub fn try_zeroed_f32(n: usize) -> Option<Vec<f32>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(n).ok()?;
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) } as *mut f32;
    if p.is_null() {
        return None;
    }
    // SAFETY: p was allocated by the global allocator with the layout of n f32s (length and
    // capacity n), and zero bytes are valid f32s.
    Some(unsafe { Vec::from_raw_parts(p, n, n) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Large and small blocks through every entry point: alignment, zeroing, and contents kept
    /// by realloc within a side and across the two sides.
    #[test]
    fn blocks_round_trip() {
        let a = HugePageAlloc;
        let pattern = |i: usize| (i % 251) as u8;
        for size in [64usize, HUGE_MIN - 1, HUGE_MIN, 3 * HUGE_MIN + 5] {
            let l = Layout::from_size_align(size, 64).unwrap();
            for new in [size, size / 2 + 1, size * 2, HUGE_MIN + 7, 100] {
                // SAFETY: non-zero layouts; each block is used within its size and freed
                // once with its own layout (realloc consumes p).
                unsafe {
                    let p = a.alloc_zeroed(l);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % 64, 0);
                    if size >= HUGE_MIN {
                        assert_eq!(p as usize % HUGE_PAGE, 0, "large block on a 2 MiB boundary");
                    }
                    let s = std::slice::from_raw_parts_mut(p, size);
                    assert!(s.iter().all(|&b| b == 0), "alloc_zeroed returns zeros");
                    for (i, b) in s.iter_mut().enumerate() {
                        *b = pattern(i);
                    }
                    let q = a.realloc(p, l, new);
                    assert!(!q.is_null());
                    let t = std::slice::from_raw_parts(q, size.min(new));
                    assert!(t.iter().enumerate().all(|(i, &b)| b == pattern(i)));
                    a.dealloc(q, Layout::from_size_align(new, 64).unwrap());
                }
            }
        }
        // through the global allocator (the core's tests install this one): a Vec growing
        // from the system side into mappings
        let mut v: Vec<u32> = Vec::with_capacity(10);
        v.extend(0..3_000_000u32); // grows through both sides
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
    }
}
