//! `barrier=txg` in QEMU: when a transaction group commits (`engine::txg`).
//!
//! - At a guest flush, in the flush's coroutine ([`commit`] with `Durability::Flush`).
//! - When the group reaches its byte bound or its age bound, in the node's committer: one
//!   background coroutine per node, started by the first write of a group. It sleeps until
//!   the group's age bound, is woken early when a write finds the byte bound reached, commits,
//!   and ends when no group is open. It counts as a request of the node (so drain and close
//!   wait for it); a drain wakes it, and it ends without committing (the group stays open,
//!   nothing is lost: close commits it, and the next write after the drain restarts the
//!   committer). "A drain is on" is the node's `quiesce_counter`, not a flag of ours: there
//!   is no drain_end callback (QEMU 7.2 runs it as a coroutine in the node's AioContext, which
//!   deadlocks when the drain ends an AioContext switch; see `driver.rs`).
//!
//! A commit waits for the write plans in flight and holds new ones back meanwhile (a plan
//! may write in place into a cluster the group owns, which the commit hands to the durable
//! image): [`commit`] asks the engine for the commit, then sleeps on the allocation queue
//! until no plan is left.

use std::ffi::c_void;
use std::time::Duration;

use super::bindings::{self, BlockDriverState};
use super::node::Node;
use crate::engine::Error;

/// What the commit is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// A guest flush: counted as one, and a sync even outside groups.
    Flush,
    /// A bound of the group was reached.
    Bound,
}

/// Commits the node's open group once no write plan is in flight.
///
/// # Safety
/// In a coroutine of the node's AioContext; `node` open.
pub unsafe fn commit(node: &Node, why: Durability) -> Result<(), Error> {
    // SAFETY: per the caller.
    let mut locked = unsafe { node.lock() }?;
    if !locked.image().in_transaction_groups() {
        return match why {
            Durability::Flush => locked.image().flush(),
            Durability::Bound => Ok(()),
        };
    }
    loop {
        // Asked again on every round: a commit that ran meanwhile (another flush's) cleared
        // the request, and new plans must not starve this one.
        locked.image().request_commit();
        if !locked.image().has_write_plans_in_flight() {
            break;
        }
        locked.wait_for_allocations();
    }
    let result = match why {
        Durability::Flush => locked.image().flush(),
        Durability::Bound => locked.image().commit(),
    };
    // Plans that waited for the commit go on.
    locked.wake_allocation_waiters();
    result
}

/// After a guest write: starts the committer when a group is open and it is not running, or
/// wakes it early when the group reached its byte bound.
///
/// # Safety
/// In a coroutine of the node's AioContext; `bs` an open qcow2b node in the txg mode.
pub unsafe fn after_write(bs: *mut BlockDriverState, node: &Node, due: bool) {
    // SAFETY: per the caller.
    if unsafe { drained(bs) } {
        // A write of the drain's owner: the group stays open for its flush or close, and the
        // first write after the drain starts the committer.
        return;
    }
    if !node.txg.committer_running.get() {
        node.txg.committer_running.set(true);
        // SAFETY: the node is open; the committer counts as a request until it ends, so drain
        // and close wait for it, and the node outlives it.
        unsafe {
            bindings::bdrv_inc_in_flight(bs);
            let co = bindings::qemu_coroutine_create(Some(committer_entry), bs.cast());
            bindings::aio_co_enter(bindings::bdrv_get_aio_context(bs), co);
        }
    } else if due {
        // SAFETY: the sleep state lives in the node; waking a committer that is not asleep
        // does nothing.
        unsafe { bindings::qemu_co_sleep_wake(node.txg.sleep.get()) };
    }
}

/// A drain begins: the committer stops sleeping and ends (it sees the drain).
pub fn drain_begin(node: &Node) {
    // SAFETY: as in `after_write`.
    unsafe { bindings::qemu_co_sleep_wake(node.txg.sleep.get()) };
}

/// Whether a drained section of the node is on.
///
/// # Safety
/// `bs` an open node.
unsafe fn drained(bs: *mut BlockDriverState) -> bool {
    // SAFETY: the field lives as long as the node; QEMU updates it with atomics.
    let counter = unsafe { std::sync::atomic::AtomicI32::from_ptr(&raw mut (*bs).quiesce_counter) };
    counter.load(std::sync::atomic::Ordering::Relaxed) > 0
}

unsafe extern "C" fn committer_entry(opaque: *mut c_void) {
    let bs: *mut BlockDriverState = opaque.cast();
    // SAFETY: `after_write` passed an open node, kept open by the in-flight count.
    let node = unsafe { Node::of(bs) };
    // SAFETY: in the coroutine created for it, in the node's AioContext.
    let outcome = super::ffi::guard("txg committer", || unsafe { run_committer(bs, node) });
    if outcome < 0 {
        eprintln!(
            "qcow2b: a transaction group commit failed (the next flush retries it): {}",
            std::io::Error::from_raw_os_error(-outcome)
        );
    }
    node.txg.committer_running.set(false);
    // SAFETY: balances the increment in `after_write`.
    unsafe { bindings::bdrv_dec_in_flight(bs) };
}

/// The committer's body: commit whenever a bound is reached, sleep until the age bound
/// otherwise; end when no group is open or a drain begins.
///
/// # Safety
/// As for [`commit`].
unsafe fn run_committer(bs: *mut BlockDriverState, node: &Node) -> Result<i32, Error> {
    let mut last_error = None;
    // SAFETY: per the caller.
    while !unsafe { drained(bs) } {
        let (due, age_left) = {
            // SAFETY: per the caller.
            let mut locked = unsafe { node.lock() }?;
            let image = locked.image();
            (image.group_is_due(), image.group_age_left())
        };
        let sleep_for = if due && last_error.is_none() {
            // SAFETY: per the caller.
            match unsafe { commit(node, Durability::Bound) } {
                Ok(()) => continue,
                Err(e) => {
                    // Not again at once: the bound is still reached, and a failing disk
                    // would be asked in a loop. The next flush retries meanwhile.
                    let backoff = node.txg.max_age;
                    last_error = Some(e);
                    backoff
                }
            }
        } else {
            match age_left {
                None => break,
                Some(left) => {
                    last_error = None;
                    left.max(Duration::from_millis(1))
                }
            }
        };
        let ns = i64::try_from(sleep_for.as_nanos()).unwrap_or(i64::MAX);
        // SAFETY: in a coroutine; the sleep state lives in the node, which outlives us.
        unsafe {
            bindings::qemu_co_sleep_ns_wakeable(
                node.txg.sleep.get(),
                bindings::QEMU_CLOCK_REALTIME,
                ns,
            )
        };
    }
    match last_error {
        Some(e) => Err(e),
        None => Ok(0),
    }
}
