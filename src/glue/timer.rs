//! A timer of one node, in the node's AioContext: the txg committer's (`txg.rs`) and the
//! cache cleaner's (`cache_clean.rs`).
//!
//! A QEMU timer lives in one AioContext's timer list. [`NodeTimer::arm`] sets it up in the
//! node's current context the first time and again after the node moved; the node's detach
//! callback and close delete it ([`NodeTimer::forget`]) before the node leaves its context or
//! goes, so the callback only ever runs for an open node in its own context's thread.

use std::cell::{Cell, UnsafeCell};
use std::ffi::c_void;
use std::time::Duration;

use super::bindings::{self, AioContext, BlockDriverState, QEMUTimer};

/// What a timer runs when it fires: called with the node (`*mut BlockDriverState`).
pub type TimerCallback = unsafe extern "C" fn(opaque: *mut c_void);

pub struct NodeTimer {
    timer: UnsafeCell<QEMUTimer>,
    /// The AioContext the timer was set up in; null when it is in none.
    ctx: Cell<*mut AioContext>,
    callback: TimerCallback,
}

impl NodeTimer {
    pub fn new(callback: TimerCallback) -> NodeTimer {
        NodeTimer {
            timer: UnsafeCell::new(QEMUTimer::default()),
            ctx: Cell::new(std::ptr::null_mut()),
            callback,
        }
    }

    /// Arms the timer to fire `delay` from now in the node's current AioContext (set up there
    /// first if it lived in no context or another one), with `bs` as the callback's argument.
    ///
    /// # Safety
    /// In the node's AioContext thread; `bs` an open qcow2b node that owns this timer.
    pub unsafe fn arm(&self, bs: *mut BlockDriverState, delay: Duration) {
        let timer = self.timer.get();
        // SAFETY: bs is open; its AioContext outlives the timer set up in it (detach deletes
        // it before the node leaves that context).
        unsafe {
            let ctx = bindings::bdrv_get_aio_context(bs);
            if self.ctx.get() != ctx {
                self.forget();
                bindings::timer_init_full(
                    timer,
                    &raw mut (*ctx).tlg,
                    bindings::QEMU_CLOCK_REALTIME,
                    1, // nanoseconds
                    0,
                    Some(self.callback),
                    bs.cast(),
                );
                self.ctx.set(ctx);
            }
            let ns = i64::try_from(delay.as_nanos()).unwrap_or(i64::MAX);
            let now = bindings::qemu_clock_get_ns(bindings::QEMU_CLOCK_REALTIME);
            bindings::timer_mod(timer, now.saturating_add(ns));
        }
    }

    /// Whether the timer is armed: set up in a context and pending there (QEMU marks a timer
    /// not pending before it runs its callback, and when it is deleted).
    pub fn armed(&self) -> bool {
        // SAFETY: a timer set up in a context (non-null `ctx`) was initialised by `arm` and
        // not yet deinitialised (`forget` clears the context).
        !self.ctx.get().is_null() && unsafe { bindings::timer_pending(self.timer.get()) }
    }

    /// Deletes the timer from the context it was set up in, if any.
    ///
    /// # Safety
    /// In the thread of that context (or with it quiescent: detach, close).
    pub unsafe fn forget(&self) {
        if self.ctx.get().is_null() {
            return;
        }
        // SAFETY: the timer was set up by `arm` and is deleted once.
        unsafe {
            bindings::timer_del(self.timer.get());
            bindings::timer_deinit(self.timer.get());
        }
        self.ctx.set(std::ptr::null_mut());
    }
}

/// Whether a drained section of the node is on.
///
/// # Safety
/// `bs` an open node.
pub unsafe fn drained(bs: *mut BlockDriverState) -> bool {
    // SAFETY: the field lives as long as the node; QEMU updates it with atomics.
    let counter = unsafe { std::sync::atomic::AtomicI32::from_ptr(&raw mut (*bs).quiesce_counter) };
    counter.load(std::sync::atomic::Ordering::Relaxed) > 0
}

/// Runs `entry(bs)` in a new coroutine of the node's AioContext, counted as a request of the
/// node until `entry` calls an `InFlight` guard (`file.rs`) (so drain and close wait for it).
///
/// # Safety
/// In the node's AioContext thread; `bs` an open qcow2b node; `entry` ends with
/// an `InFlight` guard (`file.rs`).
pub unsafe fn start_task(bs: *mut BlockDriverState, entry: TimerCallback) {
    // SAFETY: per the caller: the task counts as a request until it ends, so the node
    // outlives it.
    unsafe {
        bindings::bdrv_inc_in_flight(bs);
        let co = bindings::qemu_coroutine_create(Some(entry), bs.cast());
        bindings::aio_co_enter(bindings::bdrv_get_aio_context(bs), co);
    }
}
