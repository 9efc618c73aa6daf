//! Shared by the fuzz targets: an allocator that stops the run on an allocation out of
//! proportion to the input.
//!
//! The bound: an image of N bytes may make the engine allocate a few clusters (at most 2 MiB
//! each, and a compressed cluster's input of two clusters), its tables (each inside the
//! file, so at most N bytes), and caches of tables; nothing may allocate more than
//! `FIXED_BOUND + 4 * N` in one piece. An allocation above it aborts the process, which
//! libFuzzer reports as a crash with the input that caused it.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

const FIXED_BOUND: usize = 16 << 20;

static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

pub struct BoundedAlloc;

// SAFETY: forwards to the system allocator; only adds a size check.
unsafe impl GlobalAlloc for BoundedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LIMIT.load(Ordering::Relaxed) {
            // No unwinding out of an allocator: abort, libFuzzer saves the input.
            eprintln!("allocation of {} bytes above the bound", layout.size());
            std::process::abort();
        }
        // SAFETY: the caller's layout contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Sets the allocation bound for an input of `input_len` bytes.
pub fn bound_allocations(input_len: usize) {
    LIMIT.store(FIXED_BOUND + 4 * input_len, Ordering::Relaxed);
}
