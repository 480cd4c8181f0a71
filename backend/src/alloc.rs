//! A counting global allocator: the daemon can show that its request path
//! allocates nothing (the monitor's `daemon_stats` reports the count, and a
//! test compares it before and after thousands of requests). The cost is
//! one relaxed atomic add per allocation, which the request path never pays.
//!
//! The metrics server's thread counts its allocations apart
//! ([`count_this_thread_as_metrics`]): a scrape allocates (it formats the
//! text), and the proof must still hold while Prometheus scrapes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static METRICS_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    // Const-initialized with no destructor: reading it never allocates and
    // works at any point of a thread's life.
    static METRICS_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Counts one allocation of the calling thread.
fn count() {
    let metrics = METRICS_THREAD.try_with(Cell::get).unwrap_or(false);
    let counter = if metrics {
        &METRICS_ALLOCATIONS
    } else {
        &ALLOCATIONS
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// From now on, the calling thread's allocations count in
/// [`metrics_allocations`], not in [`allocations`]. For the metrics server's
/// thread only.
pub(crate) fn count_this_thread_as_metrics() {
    METRICS_THREAD.with(|m| m.set(true));
}

/// The system allocator, counting allocations (and reallocations).
#[derive(Debug)]
pub struct CountingAllocator;

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees hold; the counter has no effect on
// the memory returned.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged; the caller upholds the contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; `ptr` came from this allocator, which
        // is `System` underneath.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded unchanged; `ptr` came from `System` (see above).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Heap allocations made so far by the process, except the metrics server's
/// (0 when the binary does not install [`CountingAllocator`]).
pub fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// Heap allocations made so far by the metrics server's thread (its
/// scrapes).
pub fn metrics_allocations() -> u64 {
    METRICS_ALLOCATIONS.load(Ordering::Relaxed)
}
