//! A counting global allocator: heap bytes in use and their peak, for the benchmarks'
//! memory figures and the tests that bound them. A binary opts in with
//! `#[global_allocator] static A: Counting = Counting;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to the system allocator unchanged; the counts are a side effect.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Relaxed);
    }
}

/// Heap bytes in use now (0 in a binary that did not opt in).
pub fn in_use() -> usize {
    IN_USE.load(Relaxed)
}

/// The most heap bytes in use at once since the last [`reset_peak`].
pub fn peak() -> usize {
    PEAK.load(Relaxed)
}

/// Starts a new peak from what is in use now; returns that.
pub fn reset_peak() -> usize {
    let now = in_use();
    PEAK.store(now, Relaxed);
    now
}

pub fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}
