//! `barrier=txg` in QEMU: when a transaction group commits (`engine::image::txg`).
//!
//! - At a guest flush, in the flush's coroutine ([`commit`] with `Durability::Flush`).
//! - With no group open (the interval before the guest's next barrier), a reached bound has
//!   the interval's metadata written back and then syncs the file with the node unlocked, so
//!   that requests do not wait for a sync nobody asked for.
//! - When the group reaches its byte bound or its age bound, in the node's committer: a
//!   coroutine that commits while a bound is reached and then ends, started by a write that
//!   reached the byte bound, or by the node's timer. The timer is armed for the group's age
//!   bound when the group opens (by a committer started for its first write, which commits
//!   nothing and ends), and for the pause after a failed commit. The committer counts as a
//!   request of the node (so drain and close wait for it) only while it runs, and it runs
//!   only to commit: an idle node in the txg mode holds no request. So a drain needs no
//!   callback, and neither polls nor waits for an age bound: QEMU 7.2 runs a driver's drain
//!   callbacks as coroutines it must poll for, and polling a node of an iothread from a
//!   reopen that attaches it as a backing file aborts QEMU (iotest 245,
//!   test_iothreads_switch_overlay: the main loop does not hold the iothread's AioContext).
//!   "A drain is on" is the node's `quiesce_counter`: a committer that finds one ends
//!   without committing (the group stays open, nothing is lost: close commits it), and a
//!   timer that fires during one looks again every [`RESTART_RETRY`]. So the age bound holds
//!   for a guest that goes idle (a guest whose flushes are barriers relies on it), stretched
//!   by a drain's length only.
//! - The timer lives in one AioContext: the node's detach callback deletes it and the attach
//!   callback arms it again in the new one ([`detach`], [`attach`]); close deletes it before
//!   the node goes.
//!
//! A commit of an open group waits for the write plans in flight and holds new ones back
//! meanwhile (a plan may write in place into a cluster the group owns, which the commit hands
//! to the durable image): [`commit`] asks the engine for the commit, then sleeps on the
//! allocation queue until no plan is left. With no group open (the interval of one epoch
//! before the guest's next barrier, `engine::image::txg`), the durability point is the ordinary
//! flush, which waits for nothing.

use std::ffi::c_void;
use std::time::Duration;

use super::bindings::{AioContext, BlockDriverState};
use super::ffi::entries;
use super::node::InFlight;
use super::node::Node;
use super::timer::{drained, start_task};
use crate::engine::{Error, Storage};

/// How often the node's timer looks again while a drain is on.
pub const RESTART_RETRY: Duration = Duration::from_millis(10);

/// What the commit is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The durable half of a guest flush (`flush_to_disk`; the first half counted it): a
    /// sync even outside groups.
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
            Durability::Flush => locked.image().flush_to_disk(),
            Durability::Bound => Ok(()),
        };
    }
    if why == Durability::Bound && !locked.image().group_open() {
        // No group open: the bound's sync runs with the image unlocked, off the guest's
        // critical path (`Image::write_back_interval_for_bound`).
        let sync_due = locked.image().write_back_interval_for_bound()?;
        drop(locked);
        return if sync_due {
            node.file
                .flush()
                .map_err(|e| Error::io("syncing the image file for the durability bound", e))
        } else {
            Ok(())
        };
    }
    loop {
        if !locked.image().group_open() {
            // No group open (or it committed meanwhile): the interval's durability point is
            // the ordinary flush, which needs no plan to end first.
            break;
        }
        // Asked again on every round: a commit that ran meanwhile (another flush's) cleared
        // the request, and new plans must not starve this one.
        locked.image().request_commit();
        if !locked.image().has_write_plans_in_flight() {
            break;
        }
        locked.wait_for_allocations();
    }
    let result = match why {
        Durability::Flush => locked.image().flush_to_disk(),
        Durability::Bound => locked.image().commit(),
    };
    // Plans that waited for the commit go on.
    locked.wake_allocation_waiters();
    result
}

/// After a guest write: starts the committer when the group reached its byte bound, or
/// when the group is new (nothing armed the timer for its age bound yet).
///
/// # Safety
/// In a coroutine of the node's AioContext; `bs` an open qcow2b node in the txg mode.
pub unsafe fn after_write(bs: *mut BlockDriverState, node: &Node, due: bool) {
    // SAFETY: per the caller.
    if unsafe { drained(bs) } {
        // A write of the drain's owner: the group stays open for its flush or close; the
        // timer starts the committer once the drain is over.
        // SAFETY: per the caller.
        unsafe { node.txg.timer.arm(bs, RESTART_RETRY) };
        return;
    }
    let c = &node.txg;
    if c.committer_running.get() {
        // It commits again before it ends while the bound is reached.
        return;
    }
    if (due && !c.backing_off.get()) || !c.timer.armed() {
        // SAFETY: per the caller.
        unsafe { start_committer(bs, node) };
    }
}

/// Starts the committer coroutine (it is not running).
///
/// # Safety
/// In the node's AioContext thread; `bs` an open qcow2b node in the txg mode.
unsafe fn start_committer(bs: *mut BlockDriverState, node: &Node) {
    node.txg.committer_running.set(true);
    // SAFETY: per the caller; the committer ends the task (its InFlight guard).
    unsafe { start_task(bs, committer_entry) };
}

/// The node leaves its AioContext (the detach callback): the timer goes with it.
///
/// # Safety
/// `bs` an open qcow2b node, drained (QEMU detaches drained nodes).
pub unsafe fn detach(node: &Node) {
    // SAFETY: per the caller.
    unsafe { node.txg.timer.forget() };
}

/// The node is in `ctx` now (the attach callback): a group left open by the drain that came
/// with the switch gets its committer there.
///
/// # Safety
/// `bs` an open qcow2b node, in the txg mode, attached to `ctx` now.
pub unsafe fn attach(bs: *mut BlockDriverState, node: &Node, _ctx: *mut AioContext) {
    // SAFETY: per the caller; the committer it may start finds out whether a group is open.
    unsafe { node.txg.timer.arm(bs, RESTART_RETRY) };
}

/// Close: the timer must not fire for a node that is gone.
///
/// # Safety
/// As for [`detach`].
pub unsafe fn close(node: &Node) {
    // SAFETY: per the caller.
    unsafe { node.txg.timer.forget() };
}

entries! {
/// The node's timer fired, in the node's AioContext thread: start the committer once no
/// drain is on.
pub fn timer_fired(opaque: *mut c_void) -> () {
    let bs: *mut BlockDriverState = opaque.cast();
    // SAFETY: the timer is deleted before the node closes or changes context, so bs is an
    // open node in this thread's context.
    let node = unsafe { Node::of(bs) };
    node.txg.backing_off.set(false);
    // SAFETY: as above.
    unsafe {
        if drained(bs) {
            node.txg.timer.arm(bs, RESTART_RETRY);
        } else if !node.txg.committer_running.get() {
            start_committer(bs, node);
        }
    }
}
}

entries! {
fn committer_entry(opaque: *mut c_void) -> () {
    let bs: *mut BlockDriverState = opaque.cast();
    // SAFETY: `start_committer` passed an open node, kept open by the in-flight count.
    let node = unsafe { Node::of(bs) };
    // The task ends on every path (a panic in the commit included: the node is poisoned then,
    // and no timer is armed again).
    let _task = InFlight(bs);
    let outcome = {
        let _running = Running(&node.txg.committer_running);
        // SAFETY: in the coroutine created for it, in the node's AioContext.
        unsafe { run_committer(bs, node) }
    };
    // SAFETY: as above.
    let drain_on = unsafe { drained(bs) };
    let delay = match outcome {
        Err(e) => {
            log::error!(
                "qcow2b: a transaction group commit failed (the next flush retries it): {e}"
            );
            // Not again at once: the bound is still reached, and a failing disk would be
            // asked in a loop. The next flush retries meanwhile.
            node.txg.backing_off.set(true);
            Some(node.txg.max_age)
        }
        // Ended for a drain, maybe with a group open: looked at again after it.
        Ok(_) if drain_on => Some(RESTART_RETRY),
        Ok(next) => next,
    };
    if let Some(delay) = delay {
        // SAFETY: as above; in the node's AioContext.
        unsafe { node.txg.timer.arm(bs, delay) };
    }
}
}

/// The committer's flag, cleared on every path out of it.
struct Running<'a>(&'a std::cell::Cell<bool>);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// The committer's body: commits while a bound is reached and no drain is on; returns when
/// the timer should look again (the open group's age bound), `None` when no group is open.
///
/// # Safety
/// As for [`commit`].
unsafe fn run_committer(bs: *mut BlockDriverState, node: &Node) -> Result<Option<Duration>, Error> {
    // SAFETY: per the caller.
    while !unsafe { drained(bs) } {
        let (due, age_left) = {
            // SAFETY: per the caller.
            let mut locked = unsafe { node.lock() }?;
            let image = locked.image();
            (image.group_is_due(), image.group_age_left())
        };
        if !due {
            return Ok(age_left.map(|left| left.max(Duration::from_millis(1))));
        }
        // SAFETY: per the caller.
        unsafe { commit(node, Durability::Bound) }?;
    }
    Ok(None)
}
