//! What qcow2b keeps per open node, and the node's metadata lock.
//!
//! The engine is not re-entrant. Each guest request runs the engine's three steps (see
//! `engine/request.rs`): plan and finish hold the node's `CoMutex`, the data step does not. A
//! coroutine that yields inside the engine (a metadata read or write) keeps the mutex, so
//! other requests on the node wait in `qemu_co_mutex_lock` rather than seeing half-updated
//! metadata. Requests that must wait for an allocation in flight sleep on a `CoQueue` that
//! drops the mutex while they sleep.
//!
//! All coroutines of a node run in the node's AioContext thread, one at a time; the mutex
//! orders them across yields. So `&mut Image` is handed out only through [`Locked`], whose
//! lifetime is the time the mutex is held.

use super::ffi::entries;
use std::cell::{Cell, RefCell, UnsafeCell};
use std::ffi::c_void;

use super::bindings::{self, BlockDriverState, CoMutex, CoQueue, QemuLockable};
use super::cache_clean::CacheCleaner;
use super::crypto::QemuCrypto;
use super::file::FileAccess;
use super::timer::NodeTimer;
use crate::engine::{Error, Image, OpenOptions};
use crate::ordering::BarrierMode;

pub struct Node {
    image: UnsafeCell<Image<FileAccess>>,
    /// The image file as the data step reaches it (the engine holds a clone).
    pub file: FileAccess,
    /// The external data file, if the image has one: where the data step moves guest bytes
    /// (the engine holds a clone).
    pub data_file: Option<FileAccess>,
    pub mode: BarrierMode,
    /// The protocol node whose barrier primitive this node registered (barrierfs modes).
    pub primitive_node: Option<usize>,
    /// Guest writes with the barrier flag (the engine counts the barriers themselves).
    pub barrier_writes: Cell<u64>,
    /// Bare barriers that stand for a guest's flush (`BDRV_REQ_GUEST_FLUSH`).
    pub guest_flush_barriers: Cell<u64>,
    /// Guest writes in flight, by arrival number: a guest barrier waits for those that
    /// arrived before it (its promise covers everything submitted before it).
    writes_in_flight: RefCell<Arrivals>,
    next_write: Cell<u64>,
    write_done: UnsafeCell<CoQueue>,
    /// Guest barriers (barrier writes and bare barriers), by arrival number, not yet placed:
    /// a write that arrives after one waits until it is (everything submitted after a
    /// barrier is ordered after it).
    barriers_pending: RefCell<Arrivals>,
    barrier_placed: UnsafeCell<CoQueue>,
    lock: UnsafeCell<CoMutex>,
    /// Requests waiting for an allocation in flight to finish.
    alloc_waiters: UnsafeCell<CoQueue>,
    /// Set when a panic unwound while the lock was held: the in-memory metadata may be half
    /// updated, so the node refuses every further request.
    poisoned: Cell<bool>,
    /// The engine's options now (for `invalidate_cache` and a reopen with another file):
    /// those of the open, or of the last reopen.
    pub open_options: RefCell<OpenOptions>,
    /// The txg mode's committer (`txg.rs`).
    pub txg: Committer,
    /// Drops cached tables unused for `cache-clean-interval` (`cache_clean.rs`).
    pub cache_clean: CacheCleaner,
    /// An encrypted image's crypto layer (`crypto.rs`): the image's cipher, given to every
    /// image state read anew (reopen with another file, invalidate_cache).
    pub crypto: Option<std::rc::Rc<QemuCrypto>>,
    /// Whether the image looks preallocated with `preallocation=metadata`
    /// (`Image::looks_metadata_preallocated`), found out at the first block-status query of
    /// the open.
    pub metadata_preallocated: Cell<Option<bool>>,
}

/// The state of a node's transaction group committer (`txg.rs`).
pub struct Committer {
    /// The committer coroutine runs (at most one per node).
    pub committer_running: Cell<bool>,
    /// The group's age bound, also the pause after a failed commit.
    pub max_age: std::time::Duration,
    /// Starts the committer at the open group's age bound, after a failed commit's pause and
    /// after a drain (`txg.rs`).
    pub timer: NodeTimer,
    /// The last commit of a reached bound failed: the timer retries it, not every write.
    pub backing_off: Cell<bool>,
}

impl Node {
    /// Boxes a node for `bs->opaque`. The mutex and queues are initialised in place, since
    /// QEMU's initialisers may record their own address.
    pub fn new(
        image: Image<FileAccess>,
        file: FileAccess,
        data_file: Option<FileAccess>,
        mode: BarrierMode,
        primitive_node: Option<usize>,
        open_options: OpenOptions,
        cache_clean_interval: std::time::Duration,
    ) -> Box<Node> {
        let node = Box::new(Node {
            image: UnsafeCell::new(image),
            file,
            data_file,
            mode,
            primitive_node,
            barrier_writes: Cell::new(0),
            guest_flush_barriers: Cell::new(0),
            writes_in_flight: RefCell::new(Arrivals::default()),
            next_write: Cell::new(0),
            write_done: UnsafeCell::new(CoQueue::default()),
            barriers_pending: RefCell::new(Arrivals::default()),
            barrier_placed: UnsafeCell::new(CoQueue::default()),
            lock: UnsafeCell::new(CoMutex::default()),
            alloc_waiters: UnsafeCell::new(CoQueue::default()),
            poisoned: Cell::new(false),
            txg: Committer {
                committer_running: Cell::new(false),
                max_age: open_options
                    .txg
                    .map_or(std::time::Duration::ZERO, |t| t.max_group_age),
                timer: NodeTimer::new(super::txg::timer_fired),
                backing_off: Cell::new(false),
            },
            open_options: RefCell::new(open_options),
            cache_clean: CacheCleaner::new(cache_clean_interval),
            // Set by the open, once the image's key is unlocked.
            crypto: None,
            metadata_preallocated: Cell::new(None),
        });
        // SAFETY: the objects are zeroed and live at their final heap address.
        unsafe {
            bindings::qemu_co_mutex_init(node.lock.get());
            bindings::qemu_co_queue_init(node.alloc_waiters.get());
            bindings::qemu_co_queue_init(node.write_done.get());
            bindings::qemu_co_queue_init(node.barrier_placed.get());
        }
        node
    }

    /// Opens the node's image anew from its file (and data file) with `options`: after a
    /// reopen with another file, or an incoming migration.
    /// An encrypted image gets the node's cipher.
    pub fn open_image(&self, options: &OpenOptions) -> Result<Image<FileAccess>, Error> {
        Image::open_with(
            self.file.clone(),
            self.data_file.clone(),
            options,
            |fresh| super::crypto::attach(fresh, self.crypto.as_ref()),
        )
    }

    /// The storage the data step moves guest bytes through: the data file, or the file.
    pub fn data_storage(&self) -> &FileAccess {
        self.data_file.as_ref().unwrap_or(&self.file)
    }

    /// Empties the ordered mode's write-back buffer (other modes have none), so that an
    /// operation that changes the image's shape (a resize, an amend, a snapshot) starts
    /// from a file that holds everything written before; `what` names it in the error.
    pub fn drain_ordered_buffer(&self, what: &str) -> Result<(), Error> {
        match &self.file {
            FileAccess::Ordered(o) => o
                .drain()
                .map_err(|e| Error::io(format!("emptying the write-back buffer to {what}"), e)),
            _ => Ok(()),
        }
    }

    /// The node of `bs`.
    ///
    /// # Safety
    /// `bs` must be a node opened by qcow2b and not yet closed.
    pub unsafe fn of<'a>(bs: *mut BlockDriverState) -> &'a Node {
        // SAFETY: qcow2b_open stored a Box<Node> pointer in the opaque area (instance_size is
        // one pointer); it stays valid until qcow2b_close.
        unsafe { &**((*bs).opaque as *const *const Node) }
    }

    /// From now on every request of the node fails (its state cannot be trusted).
    pub fn poison(&self) {
        self.poisoned.set(true);
    }

    /// Takes the metadata lock (yielding while another coroutine holds it).
    ///
    /// # Safety
    /// Must run in a coroutine in the node's AioContext.
    pub unsafe fn lock(&self) -> Result<Locked<'_>, Error> {
        // SAFETY: the mutex was initialised in `new` and lives as long as the node.
        unsafe { bindings::qemu_co_mutex_lock(self.lock.get()) };
        let locked = Locked { node: self };
        if self.poisoned.get() {
            return Err(Error::Corrupt(
                "an internal error stopped qcow2b on this node; close and reopen the image \
                 (check it with `qemu-img check` first)"
                    .into(),
            ));
        }
        Ok(locked)
    }

    /// The image, for callers outside any coroutine with the node drained (open, close,
    /// reopen, info): nothing else can run on the node then.
    ///
    /// # Safety
    /// No request may be in flight on the node, and the reference must not outlive that.
    // The `&mut` comes from the node's UnsafeCell; the caller's contract makes it unique.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn image_drained(&self) -> &mut Image<FileAccess> {
        // SAFETY: per the caller, nothing else uses the image now.
        unsafe { &mut *self.image.get() }
    }

    /// Takes the node out of `bs->opaque` for closing.
    ///
    /// # Safety
    /// `bs` must be a node opened by qcow2b; nothing may use it afterwards.
    pub unsafe fn take(bs: *mut BlockDriverState) -> Option<Box<Node>> {
        // SAFETY: per the caller; the slot holds a Box<Node> pointer or NULL.
        unsafe {
            let slot = (*bs).opaque as *mut *mut Node;
            let node = std::mem::replace(&mut *slot, std::ptr::null_mut());
            (!node.is_null()).then(|| Box::from_raw(node))
        }
    }

    pub fn into_image(self: Box<Node>) -> Image<FileAccess> {
        self.image.into_inner()
    }

    /// Notes a guest write arriving; returns its number.
    pub fn write_arrives(&self) -> u64 {
        let n = self.next_write.get();
        self.next_write.set(n + 1);
        self.writes_in_flight.borrow_mut().insert(n);
        n
    }

    /// Notes a guest write done, and wakes barriers that may wait for it.
    pub fn write_done(&self, n: u64) {
        self.writes_in_flight.borrow_mut().remove(n);
        // SAFETY: the queue was initialised in `new`; we run in a coroutine.
        unsafe {
            if !bindings::qemu_co_queue_empty(self.write_done.get()) {
                bindings::qemu_co_queue_restart_all(self.write_done.get());
            }
        }
    }

    /// Waits until every guest write that arrived before number `n` is done (a barrier's
    /// promise covers everything submitted before it).
    pub fn wait_for_writes_before(&self, n: u64) {
        loop {
            let first = self.writes_in_flight.borrow().first().copied();
            match first {
                Some(oldest) if oldest < n => {
                    // SAFETY: in a coroutine; nothing runs between the check and the wait.
                    unsafe {
                        bindings::qemu_co_queue_wait_impl(
                            self.write_done.get(),
                            std::ptr::null_mut(),
                            0,
                        )
                    };
                }
                _ => return,
            }
        }
    }

    /// A number of its own for a bare barrier, in the writes' sequence.
    pub fn bare_barrier_arrives(&self) -> u64 {
        let n = self.next_write.get();
        self.next_write.set(n + 1);
        n
    }

    /// Notes a guest barrier arriving: `n` is its write's number, or a bare barrier's own
    /// ([`Node::bare_barrier_arrives`]). Until
    /// [`Node::barrier_placed`], writes numbered `n` or above (other than a barrier write's
    /// own) wait in [`Node::wait_for_barriers_before`].
    pub fn barrier_arrives(&self, n: u64) {
        self.barriers_pending.borrow_mut().insert(n);
    }

    /// The barrier `n` is placed (or failed): the writes after it go on.
    pub fn barrier_placed(&self, n: u64) {
        self.barriers_pending.borrow_mut().remove(n);
        // SAFETY: the queue was initialised in `new`; we run in a coroutine.
        unsafe {
            if !bindings::qemu_co_queue_empty(self.barrier_placed.get()) {
                bindings::qemu_co_queue_restart_all(self.barrier_placed.get());
            }
        }
    }

    /// Waits until every guest barrier that arrived before write `n` is placed.
    pub fn wait_for_barriers_before(&self, n: u64) {
        loop {
            let first = self.barriers_pending.borrow().first().copied();
            match first {
                Some(b) if b < n => {
                    // SAFETY: in a coroutine; nothing runs between the check and the wait.
                    unsafe {
                        bindings::qemu_co_queue_wait_impl(
                            self.barrier_placed.get(),
                            std::ptr::null_mut(),
                            0,
                        )
                    };
                }
                _ => return,
            }
        }
    }
}

/// A guest barrier from its arrival until it is placed; placed on drop, so that an error
/// never leaves later writes waiting.
pub struct PendingBarrier<'a> {
    node: &'a Node,
    n: u64,
}

impl<'a> PendingBarrier<'a> {
    pub fn new(node: &'a Node, n: u64) -> PendingBarrier<'a> {
        node.barrier_arrives(n);
        PendingBarrier { node, n }
    }
}

impl Drop for PendingBarrier<'_> {
    fn drop(&mut self) {
        self.node.barrier_placed(self.n);
    }
}

/// The metadata lock, held: the only way to the engine while requests may be in flight.
pub struct Locked<'a> {
    node: &'a Node,
}

entries! {
fn co_mutex_lock(object: *mut c_void) -> () {
    // SAFETY: `object` is the node's CoMutex (see Locked::wait_for_allocations).
    unsafe { bindings::qemu_co_mutex_lock(object.cast()) }
}
}

entries! {
fn co_mutex_unlock(object: *mut c_void) -> () {
    // SAFETY: as above.
    unsafe { bindings::qemu_co_mutex_unlock(object.cast()) }
}
}

impl Locked<'_> {
    pub fn image(&mut self) -> &mut Image<FileAccess> {
        // SAFETY: the mutex is held for as long as `self` lives, and `&mut self` keeps this
        // the only reference handed out.
        unsafe { &mut *self.node.image.get() }
    }

    /// Sleeps until some allocation in flight finishes, with the lock dropped meanwhile;
    /// holds it again on return.
    pub fn wait_for_allocations(&mut self) {
        let mut lockable = QemuLockable {
            object: self.node.lock.get().cast(),
            lock: Some(co_mutex_lock),
            unlock: Some(co_mutex_unlock),
        };
        // SAFETY: we are in a coroutine holding the mutex that `lockable` names; the queue
        // was initialised in Node::new.
        unsafe {
            bindings::qemu_co_queue_wait_impl(self.node.alloc_waiters.get(), &mut lockable, 0)
        };
    }

    /// Wakes every request waiting for an allocation to finish.
    pub fn wake_allocation_waiters(&mut self) {
        // SAFETY: the queue was initialised in Node::new; we run in a coroutine.
        unsafe {
            if !bindings::qemu_co_queue_empty(self.node.alloc_waiters.get()) {
                bindings::qemu_co_queue_restart_all(self.node.alloc_waiters.get());
            }
        }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.node.poisoned.set(true);
        } else if let (BarrierMode::Txg(_), FileAccess::Ordered(file)) =
            (self.node.mode, &self.node.file)
        {
            // Whatever the engine call did (a barrier may have opened a group, a commit
            // closes one): writes go straight to the file only while no group is open.
            // SAFETY: the mutex is still held; nothing else refers to the image now.
            let group_open = unsafe { &*self.node.image.get() }.group_open();
            file.set_direct_writes(!group_open);
        }
        // SAFETY: this coroutine took the mutex in Node::lock.
        unsafe { bindings::qemu_co_mutex_unlock(self.node.lock.get()) };
    }
}

/// A coroutine counted as a request of node `bs` (`bdrv_inc_in_flight`) until this drops.
pub struct InFlight(pub *mut BlockDriverState);

impl Drop for InFlight {
    fn drop(&mut self) {
        // SAFETY: paired with the bdrv_inc_in_flight made when the coroutine was started; the
        // node stays open while the count is held.
        unsafe { bindings::bdrv_dec_in_flight(self.0) };
    }
}

/// Arrival numbers of requests not done yet, in order. Numbers are handed out in increasing
/// order, so an arrival lands at the end (a sorted `Vec`: as many entries as requests in
/// flight, no allocation once it has grown to the queue depth, where a `BTreeSet` allocated
/// and freed a node per write).
#[derive(Default)]
struct Arrivals(Vec<u64>);

impl Arrivals {
    fn insert(&mut self, n: u64) {
        let at = self.0.partition_point(|&m| m < n);
        if self.0.get(at) != Some(&n) {
            self.0.insert(at, n);
        }
    }

    fn remove(&mut self, n: u64) {
        if let Ok(at) = self.0.binary_search(&n) {
            self.0.remove(at);
        }
    }

    fn first(&self) -> Option<&u64> {
        self.0.first()
    }
}

#[cfg(test)]
mod tests {
    use super::Arrivals;

    #[test]
    fn the_oldest_arrival_not_done_is_first_whatever_the_order_they_finish_in() {
        let mut a = Arrivals::default();
        assert_eq!(a.first(), None);
        for n in [3, 4, 5, 7] {
            a.insert(n);
        }
        a.insert(6);
        a.insert(6);
        a.remove(4);
        assert_eq!(a.first(), Some(&3));
        a.remove(3);
        assert_eq!(a.first(), Some(&5));
        a.remove(9);
        a.remove(5);
        a.remove(6);
        assert_eq!(a.first(), Some(&7));
        a.remove(7);
        assert_eq!(a.first(), None);
    }
}
