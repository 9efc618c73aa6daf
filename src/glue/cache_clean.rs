//! `cache-clean-interval`: every interval, the node's cached L2 tables and refcount blocks
//! that went unused for a whole interval are dropped and their memory given back (as QEMU's
//! qcow2 does; default 600 s).
//!
//! The node's timer fires in its AioContext and starts a short task (a coroutine counted as
//! a request of the node, so drain and close wait for it) that takes the metadata lock, drops
//! the idle tables and arms the timer for the next interval. A timer that fires during a
//! drain looks again once the drain is over (after [`super::txg::RESTART_RETRY`]). Like the
//! txg timer it is deleted when the node leaves its AioContext and set up again in the new
//! one, and deleted at close.

use std::cell::Cell;
use std::ffi::c_void;
use std::time::Duration;

use super::bindings::BlockDriverState;
use super::ffi::entries;
use super::node::InFlight;
use super::node::Node;
use super::timer::{drained, start_task, NodeTimer};
use super::txg::RESTART_RETRY;

/// A node's cache cleaner.
pub struct CacheCleaner {
    /// Zero: never.
    interval: Cell<Duration>,
    timer: NodeTimer,
}

impl CacheCleaner {
    pub fn new(interval: Duration) -> CacheCleaner {
        CacheCleaner {
            interval: Cell::new(interval),
            timer: NodeTimer::new(timer_fired),
        }
    }
}

/// Arms the cleaner for the node's interval from now (nothing with interval 0).
///
/// # Safety
/// In the node's AioContext thread (or with the node drained); `bs` an open qcow2b node.
pub unsafe fn start(bs: *mut BlockDriverState, node: &Node) {
    let interval = node.cache_clean.interval.get();
    if !interval.is_zero() {
        // SAFETY: per the caller.
        unsafe { node.cache_clean.timer.arm(bs, interval) };
    }
}

/// A reopen changed the interval: the timer starts over with the new one.
///
/// # Safety
/// As for [`start`], with the node drained.
pub unsafe fn set_interval(bs: *mut BlockDriverState, node: &Node, interval: Duration) {
    if node.cache_clean.interval.replace(interval) == interval {
        return;
    }
    // SAFETY: per the caller.
    unsafe {
        node.cache_clean.timer.forget();
        start(bs, node);
    }
}

/// The node leaves its AioContext, or closes: the timer goes.
///
/// # Safety
/// `bs` an open qcow2b node, drained.
pub unsafe fn stop(node: &Node) {
    // SAFETY: per the caller.
    unsafe { node.cache_clean.timer.forget() };
}

entries! {
fn timer_fired(opaque: *mut c_void) -> () {
    let bs: *mut BlockDriverState = opaque.cast();
    // SAFETY: the timer is deleted before the node closes or changes context, so bs is an
    // open node in this thread's context.
    unsafe {
        let node = Node::of(bs);
        if drained(bs) {
            node.cache_clean.timer.arm(bs, RESTART_RETRY);
        } else {
            start_task(bs, clean_entry);
        }
    }
}
}

entries! {
fn clean_entry(opaque: *mut c_void) -> () {
    let bs: *mut BlockDriverState = opaque.cast();
    // SAFETY: `timer_fired` passed an open node, kept open by the task's in-flight count.
    let node = unsafe { Node::of(bs) };
    // The task ends on every path (a panic included: the entry stops it).
    let _task = InFlight(bs);
    // SAFETY: in the coroutine created for it, in the node's AioContext. A poisoned node
    // refuses the lock: there is nothing to clean then.
    if let Ok(mut locked) = unsafe { node.lock() } {
        locked.image().drop_idle_cache_tables();
    }
    // SAFETY: as above; the next interval starts now.
    unsafe { start(bs, node) };
}
}
