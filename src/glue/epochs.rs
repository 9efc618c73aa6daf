//! The `ordered` mode's epoch buffer in front of the file child, and its background writer:
//! the QEMU half of `ordering::epochs` (which keeps the epochs), as `txg.rs` is of
//! `engine::image::txg`. The writer runs as a coroutine in the node's AioContext. The `txg`
//! mode uses the same buffer as its write-back buffer, without a sync per epoch.
//!
//! Everything here runs in the node's AioContext thread: the buffer is a `RefCell`, and no
//! borrow of it is held across a yield (every call into the block layer may yield).
//!
//! The ordered mode's contract, kept here:
//! - while nothing is buffered or being written back (every earlier epoch is durable), a
//!   write goes straight to the file: the open epoch may reach the file at any time, only its
//!   sync must wait. A barrier after such direct writes makes them an epoch of their own:
//!   the writer syncs them before anything buffered after the barrier reaches the file;
//! - otherwise writes go into the open epoch and complete there; a barrier closes the epoch;
//! - the writer writes one epoch at a time: all its writes, then one fdatasync, and only then
//!   the next epoch (never two in flight: `EpochBuffer::take_next`);
//! - a flush waits until every epoch before it is durable (the last epoch's fdatasync is the
//!   flush's own); reads see buffered bytes (an overlay taken before the file read);
//! - a write that finds the buffer full waits, first come first served, until the writer
//!   frees space; a background error is kept and returned by the next flush or barrier (and
//!   to writes that wait for space meanwhile), the data stays buffered, and the next flush or
//!   barrier retries it;
//! - outside a coroutine (open, close, reopen, all of them drained), the buffer is emptied
//!   synchronously first and the file used directly.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::ffi::c_void;
use std::io;
use std::rc::Rc;
use std::time::Instant;

use super::bindings::{self, BdrvChild, BlockDriverState, CoQueue, QEMUIOVector};
use super::ffi::entries;
use super::file::{
    check, child_flush, child_pread, child_pwrite, in_coroutine, to_i64, HostCounters,
};
use super::node::InFlight;
use crate::ordering::epochs::{EpochBuffer, Job, JobWrite, WriteError};

/// The write-back buffer of a node in the txg mode: what a transaction group writes waits
/// here, so a guest write completes without a round trip to the file; the writer writes it
/// back in the background once a quarter of it is used, and a commit's first sync writes the
/// rest. Per node, so it stays small.
pub const TXG_BUFFER_BYTES: u64 = 16 << 20;

/// What [`FileAccess::unsynced`] reports.
#[derive(Default)]
pub struct Unsynced {
    pub bytes: u64,
    pub peak_bytes: u64,
    pub age: Option<std::time::Duration>,
    pub peak_age_ms: u64,
}

/// The `ordered` mode: the epoch buffer in front of the file child, and its writer.
pub struct OrderedFile {
    /// The qcow2b node: the writer counts as one of its requests, so drain waits for it.
    pub(super) bs: *mut BlockDriverState,
    pub(super) buffer: RefCell<EpochBuffer>,
    /// The writer coroutine is running (at most one).
    pub(super) writer_running: Cell<bool>,
    /// Requests (flushes, drains, writes waiting for space) that need the open epoch written
    /// too; while non-zero the writer takes it.
    pub(super) want_open_epoch: Cell<u32>,
    /// The errno of the last background failure, until a flush or barrier reports it; writes
    /// waiting for space fail with it meanwhile instead of waiting forever.
    pub(super) failed_errno: Cell<Option<i32>>,
    /// Writes waiting for space, first come first served.
    pub(super) space_waiters: UnsafeCell<CoQueue>,
    /// Flushes and drains waiting for the writer.
    pub(super) progress_waiters: UnsafeCell<CoQueue>,
    /// The mark of the last epoch boundary counted as a host barrier.
    pub(super) last_mark: Cell<u64>,
    /// Writes went straight to the file since its last sync.
    pub(super) direct_unsynced: Cell<bool>,
    /// Direct writes issued and not yet complete. A sync issued meanwhile does not cover them
    /// (it covers what completed before it), so it leaves `direct_unsynced` set.
    pub(super) direct_in_flight: Cell<u32>,
    /// A barrier followed direct writes: they must be synced before anything buffered since
    /// reaches the file (the writer does it first).
    pub(super) direct_sync_due: Cell<bool>,
    /// The errno of a failed sync of direct writes, until a flush or barrier reports it.
    pub(super) direct_error: Cell<Option<i32>>,
    /// The highest byte any buffered write reached (the file is at least this long once
    /// written back).
    pub(super) buffered_end: Cell<u64>,
    /// Bytes written directly since the last sync that covered them all.
    pub(super) direct_unsynced_bytes: Cell<u64>,
    /// Whether each epoch is synced before the next one is written (`ordered`). Without
    /// (`txg`): epochs are written back in order and not synced, and nothing is ever written
    /// directly. INVARIANT (txg): no order is owed between two writes of an open group (a
    /// crash shows the durable image, which names none of them), so they need no sync
    /// between them; the commit's syncs are [`OrderedFile::flush`]es, which write
    /// everything back and then sync once; and an ordering point outside a group
    /// (resize, check) is such a flush too ([`OrderedFile::barrier`]).
    pub(super) sync_epochs: bool,
    /// txg: writes may go straight to the file while nothing is buffered (as in `ordered`).
    /// The node sets it while no transaction group is open ([`OrderedFile::set_direct_writes`]):
    /// the interval before a group follows the ordinary rules, whose writes gain nothing from
    /// a copy into the buffer. Performance only: in txg every ordering point is a flush, and a
    /// flush syncs direct and written-back writes alike, so no order depends on it.
    pub(super) direct_allowed: Cell<bool>,
    /// Epochs written back since the last sync (txg).
    pub(super) written_unsynced: Cell<bool>,
    /// Since when something written is not durable (`None`: everything is), and the peaks
    /// of [`FileAccess::unsynced`].
    pub(super) unsynced_since: Cell<Option<Instant>>,
    pub(super) peak_unsynced_bytes: Cell<u64>,
    pub(super) peak_unsynced_age_ms: Cell<u64>,
    pub(super) counters: Rc<HostCounters>,
}

impl OrderedFile {
    pub(super) fn new(
        bs: *mut BlockDriverState,
        limit_bytes: u64,
        counters: Rc<HostCounters>,
        sync_epochs: bool,
    ) -> Rc<OrderedFile> {
        let o = Rc::new(OrderedFile {
            bs,
            buffer: RefCell::new(EpochBuffer::new(limit_bytes)),
            writer_running: Cell::new(false),
            want_open_epoch: Cell::new(0),
            failed_errno: Cell::new(None),
            space_waiters: UnsafeCell::new(CoQueue::default()),
            progress_waiters: UnsafeCell::new(CoQueue::default()),
            last_mark: Cell::new(0),
            direct_unsynced: Cell::new(false),
            direct_in_flight: Cell::new(0),
            direct_sync_due: Cell::new(false),
            direct_error: Cell::new(None),
            buffered_end: Cell::new(0),
            direct_unsynced_bytes: Cell::new(0),
            sync_epochs,
            direct_allowed: Cell::new(true),
            written_unsynced: Cell::new(false),
            unsynced_since: Cell::new(None),
            peak_unsynced_bytes: Cell::new(0),
            peak_unsynced_age_ms: Cell::new(0),
            counters,
        });
        // SAFETY: both queues live at their final address inside the Rc allocation.
        unsafe {
            bindings::qemu_co_queue_init(o.space_waiters.get());
            bindings::qemu_co_queue_init(o.progress_waiters.get());
        }
        o
    }

    /// The node's `file` child, looked up at each use: a reopen may replace it (blockdev-reopen
    /// with another `file`; the buffer was emptied into the old one in reopen_prepare).
    pub(super) fn file(&self) -> *mut BdrvChild {
        // SAFETY: the node outlives its OrderedFile.
        unsafe { (*self.bs).file }
    }

    pub(super) fn unsynced_bytes(&self) -> u64 {
        self.buffer.borrow().buffered_bytes() + self.direct_unsynced_bytes.get()
    }

    /// A write was buffered or written directly: it is not durable yet.
    pub(super) fn note_unsynced_write(&self) {
        if self.unsynced_since.get().is_none() {
            self.unsynced_since.set(Some(Instant::now()));
        }
        let bytes = self.unsynced_bytes();
        if bytes > self.peak_unsynced_bytes.get() {
            self.peak_unsynced_bytes.set(bytes);
        }
    }

    /// The direct writes so far are durable (a sync issued with none in flight).
    pub(super) fn direct_synced(&self) {
        self.direct_unsynced.set(false);
        self.direct_unsynced_bytes.set(0);
        self.note_synced();
    }

    /// After a sync: once nothing is buffered or unsynced, everything is durable.
    pub(super) fn note_synced(&self) {
        if self.direct_unsynced.get()
            || self.written_unsynced.get()
            || !self.buffer.borrow().is_empty()
        {
            return;
        }
        if let Some(since) = self.unsynced_since.take() {
            let ms = since.elapsed().as_millis() as u64;
            if ms > self.peak_unsynced_age_ms.get() {
                self.peak_unsynced_age_ms.set(ms);
            }
        }
    }

    pub(super) fn wait(queue: &UnsafeCell<CoQueue>) {
        // SAFETY: in a coroutine of this AioContext; no lock to drop (one thread, and
        // nothing runs between the check that led here and the wait).
        unsafe { bindings::qemu_co_queue_wait_impl(queue.get(), std::ptr::null_mut(), 0) };
    }

    pub(super) fn wake_all(queue: &UnsafeCell<CoQueue>) {
        // SAFETY: as above; restart_all schedules the waiters, it does not run them here.
        unsafe {
            if !bindings::qemu_co_queue_empty(queue.get()) {
                bindings::qemu_co_queue_restart_all(queue.get());
            }
        }
    }

    pub(super) fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if !in_coroutine() {
            // Outside a coroutine (the node drained: open, close, a snapshot operation) a
            // write goes to the file at once, after everything buffered; it is a direct write
            // not yet synced, so that the next barrier or flush syncs it before what follows
            // (without that, a snapshot's table and the header naming it could reach the disk
            // in either order).
            // Only what is buffered goes first (and its epochs are synced); direct writes
            // need no sync between them, only before what the next ordering point orders
            // after them.
            if !self.buffer.borrow().is_empty() || self.writer_running.get() {
                self.drain()?;
            }
            self.take_error()?;
            child_pwrite(self.file(), offset, data)?;
            self.direct_unsynced.set(true);
            self.direct_unsynced_bytes
                .set(self.direct_unsynced_bytes.get() + data.len() as u64);
            self.note_unsynced_write();
            return Ok(());
        }
        // First come first served: a write does not pass one already waiting for space.
        // SAFETY: the queue was initialised in `new`.
        if unsafe { !bindings::qemu_co_queue_empty(self.space_waiters.get()) } {
            Self::wait(&self.space_waiters);
        }
        if self.may_write_directly() {
            // Every earlier epoch is durable: this write may reach the file now.
            self.direct_unsynced.set(true);
            self.direct_unsynced_bytes
                .set(self.direct_unsynced_bytes.get() + data.len() as u64);
            self.note_unsynced_write();
            self.direct_in_flight.set(self.direct_in_flight.get() + 1);
            let result = child_pwrite(self.file(), offset, data);
            self.direct_in_flight.set(self.direct_in_flight.get() - 1);
            self.buffered_end
                .set(self.buffered_end.get().max(offset + data.len() as u64));
            return self.counters.count_error(result);
        }
        let mut waited_since: Option<Instant> = None;
        let result = loop {
            let attempt = self.buffer.borrow_mut().write(offset, data);
            match attempt {
                Ok(()) => break Ok(()),
                Err(WriteError::OutOfRange { .. }) => {
                    break Err(io::Error::from_raw_os_error(libc::EFBIG))
                }
                Err(WriteError::Full { .. }) => {
                    if let Some(errno) = self.failed_errno.get() {
                        break Err(io::Error::from_raw_os_error(errno));
                    }
                    waited_since.get_or_insert_with(Instant::now);
                    self.want_open_epoch.set(self.want_open_epoch.get() + 1);
                    self.kick();
                    Self::wait(&self.space_waiters);
                    self.want_open_epoch.set(self.want_open_epoch.get() - 1);
                }
            }
        };
        if let Some(since) = waited_since {
            let waited = since.elapsed().as_nanos() as u64;
            self.counters
                .full_wait_ns
                .set(self.counters.full_wait_ns.get() + waited);
        }
        // The next writer in line may fit now too.
        // SAFETY: as above.
        unsafe { bindings::qemu_co_queue_next(self.space_waiters.get()) };
        if result.is_ok() {
            let end = offset + data.len() as u64;
            self.buffered_end.set(self.buffered_end.get().max(end));
            self.note_unsynced_write();
            if !self.sync_epochs && !self.writer_running.get() {
                let buffer = self.buffer.borrow();
                let due = buffer.buffered_bytes() >= buffer.limit_bytes() / 4;
                drop(buffer);
                if due {
                    // In the background, before writes have to wait for room: the open
                    // epoch closes (no order is owed inside a group) and is written back.
                    self.buffer.borrow_mut().barrier();
                    self.kick();
                }
            }
        }
        result
    }

    /// txg: whether writes may bypass the buffer (see `direct_allowed`). The node allows them
    /// while no group is open; inside a group they go to the buffer (a direct write costs the
    /// guest a round trip to the file, which a group's writes need not pay).
    pub fn set_direct_writes(&self, allowed: bool) {
        self.direct_allowed.set(allowed);
    }

    /// Whether a write may bypass the buffer: allowed (always in `ordered`), nothing buffered
    /// or in flight, no sync of earlier direct writes due, and no background error waiting to
    /// be reported.
    pub(super) fn may_write_directly(&self) -> bool {
        (self.sync_epochs || self.direct_allowed.get())
            && !self.direct_sync_due.get()
            && self.failed_errno.get().is_none()
            && self.buffer.borrow().is_empty()
    }

    pub(super) fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // The overlay is taken before the file is read: an epoch that completes meanwhile is
        // either in the file or in the overlay.
        let overlay = self.buffer.borrow().snapshot(offset, buf.len());
        child_pread(self.file(), offset, buf)?;
        overlay.apply(buf);
        Ok(())
    }

    /// A background failure not yet reported, if any (the next retry starts then).
    pub(super) fn take_error(&self) -> io::Result<()> {
        let buffered = self.buffer.borrow_mut().take_error();
        let direct = self.direct_error.take().map(io::Error::from_raw_os_error);
        match buffered.or(direct) {
            Some(e) => {
                self.failed_errno.set(None);
                Err(e)
            }
            None => Ok(()),
        }
    }

    pub(super) fn barrier(&self) -> io::Result<()> {
        if !self.sync_epochs {
            // Outside a transaction group an ordering point is a sync (see `sync_epochs`).
            self.counters.barriers.set(self.counters.barriers.get() + 1);
            return self.flush();
        }
        self.take_error()?;
        if self.direct_unsynced.get() && !self.direct_sync_due.get() {
            // The direct writes since the last sync become an epoch of their own.
            self.direct_sync_due.set(true);
            self.counters.barriers.set(self.counters.barriers.get() + 1);
        }
        let mark = self.buffer.borrow_mut().barrier();
        if mark > self.last_mark.get() {
            // A new epoch boundary (a barrier with nothing new adds none).
            self.last_mark.set(mark);
            self.counters.barriers.set(self.counters.barriers.get() + 1);
        }
        if in_coroutine() {
            self.kick();
            Ok(())
        } else {
            self.drain()
        }
    }

    pub(super) fn flush(&self) -> io::Result<()> {
        if !in_coroutine() {
            self.drain()?;
            return child_flush(self.file(), &self.counters);
        }
        self.take_error()?;
        if self.may_write_directly() {
            // Only direct writes (or none) since the last sync, and in txg perhaps epochs
            // written back before them: this flush syncs them all.
            if !self.direct_unsynced.get() && !self.written_unsynced.get() {
                return Ok(());
            }
            let covers_all = self.direct_in_flight.get() == 0;
            let written = self.written_unsynced.replace(false);
            self.counters.epochs.set(self.counters.epochs.get() + 1);
            let result = self
                .counters
                .count_error(child_flush(self.file(), &self.counters));
            if result.is_err() {
                self.written_unsynced.set(written);
                return result;
            }
            if covers_all {
                self.direct_synced();
            } else {
                self.note_synced();
            }
            return Ok(());
        }
        if self.direct_unsynced.get() && self.sync_epochs {
            // ordered: the direct writes are an epoch of their own, synced before the
            // buffered ones reach the file. (txg owes no order between them: the one sync
            // below covers both.)
            self.direct_sync_due.set(true);
        }
        let mark = self.buffer.borrow_mut().barrier();
        // Every epoch up to the mark gets its own fdatasync: the last one is this flush's.
        // (txg: every epoch up to the mark is written back, and this flush syncs them.)
        loop {
            if self.buffer.borrow().is_durable(mark) && !self.direct_sync_due.get() {
                break;
            }
            if self.failed_errno.get().is_some() && !self.writer_running.get() {
                break;
            }
            self.kick();
            Self::wait(&self.progress_waiters);
        }
        self.take_error()?;
        self.sync_written()
    }

    /// txg: the sync that makes the epochs written back since the last one durable, and the
    /// direct writes complete when it is issued.
    pub(super) fn sync_written(&self) -> io::Result<()> {
        if self.sync_epochs || (!self.written_unsynced.get() && !self.direct_unsynced.get()) {
            return Ok(());
        }
        let covers_direct = self.direct_in_flight.get() == 0;
        // Cleared first: an epoch written back while the sync runs sets it again.
        self.written_unsynced.set(false);
        let result = self
            .counters
            .count_error(child_flush(self.file(), &self.counters));
        match result {
            Ok(()) if covers_direct => self.direct_synced(),
            Ok(()) => self.note_synced(),
            Err(_) => self.written_unsynced.set(true),
        }
        result
    }

    /// Starts the writer coroutine unless it runs already.
    pub(super) fn kick(&self) {
        if self.writer_running.get() {
            return;
        }
        self.writer_running.set(true);
        // SAFETY: the node is open; the writer is accounted as a request of it until it ends,
        // so drain and close wait for it, and `self` (owned by the node) outlives it.
        unsafe {
            bindings::bdrv_inc_in_flight(self.bs);
            let co = bindings::qemu_coroutine_create(
                Some(writer_entry),
                self as *const OrderedFile as *mut c_void,
            );
            bindings::aio_co_enter(bindings::bdrv_get_aio_context(self.bs), co);
        }
    }

    /// One job: its writes, then one fdatasync. Adjacent writes go as one vectored write (of
    /// at most the file's `max_iov` pieces: preadv and pwritev refuse more than IOV_MAX), and
    /// up to [`WRITE_BACK_PARALLEL`] of them are in flight at once: no order is owed between
    /// the writes of one job (E3: disjoint; order is owed only between epochs, by the sync
    /// that ends each), so they reach the file as a guest's own queue of requests would.
    pub(super) fn write_back(&self, job: &Job) -> io::Result<()> {
        // SAFETY: the child is open while the node is (constructor contract).
        let max_iov = unsafe { (*(*self.file()).bs).bl.max_iov };
        let max_iov = usize::try_from(max_iov)
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or(1024);
        let mut pieces = job.runs().flat_map(|run| run.chunks(max_iov)).peekable();
        let Some(first) = pieces.next() else {
            return self.end_write_back();
        };
        if pieces.peek().is_none() {
            check(write_run(self.file(), first))?;
            return self.end_write_back();
        }
        let join = Join::new();
        for run in std::iter::once(first).chain(pieces) {
            while join.pending.get() >= WRITE_BACK_PARALLEL {
                Self::wait(&join.queue);
            }
            join.pending.set(join.pending.get() + 1);
            let task = Box::new(WriteTask {
                join: &*join,
                child: self.file(),
                run: run as *const [JobWrite],
            });
            // SAFETY: the task coroutine runs in this AioContext after this one yields (a
            // coroutine entering another of its context queues it); `join` and the job's
            // data outlive it, as this loop and the one below wait for every task.
            unsafe {
                let co = bindings::qemu_coroutine_create(
                    Some(write_task_entry),
                    Box::into_raw(task).cast(),
                );
                bindings::aio_co_enter(bindings::bdrv_get_aio_context(self.bs), co);
            }
        }
        while join.pending.get() > 0 {
            Self::wait(&join.queue);
        }
        match join.error.get() {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => self.end_write_back(),
        }
    }

    /// After a job's writes: its sync (ordered), or a note that one is owed (txg).
    pub(super) fn end_write_back(&self) -> io::Result<()> {
        if !self.sync_epochs {
            self.written_unsynced.set(true);
            return Ok(());
        }
        child_flush(self.file(), &self.counters)
    }

    /// The writer coroutine's body: epochs, oldest first, until none is due or one fails.
    pub(super) fn run_writer(&self) {
        if self.direct_sync_due.get() {
            // Direct writes before a barrier: durable before anything buffered after it.
            // INVARIANT: only writes complete when the sync is issued are covered by it; one
            // still in flight keeps `direct_unsynced`, so the next barrier syncs it again.
            let covers_all = self.direct_in_flight.get() == 0;
            match self
                .counters
                .count_error(child_flush(self.file(), &self.counters))
            {
                Ok(()) => {
                    self.direct_sync_due.set(false);
                    if covers_all {
                        self.direct_synced();
                    }
                    self.counters.epochs.set(self.counters.epochs.get() + 1);
                }
                Err(e) => {
                    // Kept like an epoch's failure; the next flush or barrier retries.
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    self.failed_errno.set(Some(errno));
                    self.direct_error.set(Some(errno));
                    self.writer_running.set(false);
                    Self::wake_all(&self.progress_waiters);
                    Self::wake_all(&self.space_waiters);
                    return;
                }
            }
        }
        loop {
            let include_open = self.want_open_epoch.get() > 0;
            let Some(job) = self.buffer.borrow_mut().take_next(include_open) else {
                break;
            };
            match self.counters.count_error(self.write_back(&job)) {
                Ok(()) => {
                    let _ = self.buffer.borrow_mut().complete(job);
                    self.counters.epochs.set(self.counters.epochs.get() + 1);
                    self.note_synced();
                }
                Err(e) => {
                    self.failed_errno
                        .set(Some(e.raw_os_error().unwrap_or(libc::EIO)));
                    let _ = self.buffer.borrow_mut().fail(job, e);
                    break;
                }
            }
            Self::wake_all(&self.progress_waiters);
            // SAFETY: the queue was initialised in `new`.
            unsafe { bindings::qemu_co_queue_next(self.space_waiters.get()) };
        }
        self.writer_running.set(false);
        Self::wake_all(&self.progress_waiters);
        Self::wake_all(&self.space_waiters);
    }

    /// Empties the buffer: every epoch written back and durable (txg: written back; the next
    /// flush syncs it). In a coroutine by the writer; outside one (the node drained)
    /// synchronously here, each epoch synced.
    pub fn drain(&self) -> io::Result<()> {
        self.buffer.borrow_mut().barrier();
        if in_coroutine() {
            self.want_open_epoch.set(self.want_open_epoch.get() + 1);
            if self.direct_unsynced.get() {
                self.direct_sync_due.set(true);
            }
            while !self.buffer.borrow().is_empty() || self.direct_sync_due.get() {
                if self.failed_errno.get().is_some() && !self.writer_running.get() {
                    break;
                }
                self.kick();
                Self::wait(&self.progress_waiters);
            }
            self.want_open_epoch.set(self.want_open_epoch.get() - 1);
            return self.take_error();
        }
        // Outside a coroutine the node is drained, so the writer has stopped; if not, let
        // the event loop finish it first.
        while self.writer_running.get() {
            // SAFETY: polling the node's AioContext from its home thread, as BDRV_POLL_WHILE
            // does.
            unsafe { bindings::aio_poll(bindings::bdrv_get_aio_context(self.bs), true) };
        }
        self.take_error()?;
        if self.direct_unsynced.get() {
            // Direct writes before whatever is buffered: durable first.
            child_flush(self.file(), &self.counters)?;
            self.direct_synced();
            self.direct_sync_due.set(false);
        }
        loop {
            let Some(job) = self.buffer.borrow_mut().take_next(true) else {
                break;
            };
            let result = job
                .writes()
                .iter()
                .try_for_each(|w| child_pwrite(self.file(), w.offset, &w.data))
                .and_then(|()| child_flush(self.file(), &self.counters));
            match result {
                Ok(()) => {
                    let _ = self.buffer.borrow_mut().complete(job);
                    self.counters.epochs.set(self.counters.epochs.get() + 1);
                    self.note_synced();
                }
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    let _ = self.buffer.borrow_mut().fail(job, e);
                    let _ = self.buffer.borrow_mut().take_error();
                    return Err(io::Error::from_raw_os_error(errno));
                }
            }
        }
        Ok(())
    }
}

/// How many of one epoch's writes the writer has in flight at once.
const WRITE_BACK_PARALLEL: u32 = 16;

/// The writes of one job in flight, and the writer waiting for them.
struct Join {
    queue: UnsafeCell<CoQueue>,
    pending: Cell<u32>,
    /// The first failure's errno.
    error: Cell<Option<i32>>,
}

impl Join {
    /// On the heap: an initialised CoQueue points into itself, so it must not move.
    fn new() -> Box<Join> {
        let join = Box::new(Join {
            queue: UnsafeCell::new(CoQueue::default()),
            pending: Cell::new(0),
            error: Cell::new(None),
        });
        // SAFETY: the queue is initialised where it stays until the box is dropped, after
        // every task (the writer waits for them all).
        unsafe { bindings::qemu_co_queue_init(join.queue.get()) };
        join
    }
}

/// One vectored write of the write-back, as a coroutine of its own.
struct WriteTask {
    join: *const Join,
    child: *mut BdrvChild,
    run: *const [JobWrite],
}

/// Writes one run of adjacent writes as one vectored write; returns QEMU's result.
fn write_run(child: *mut BdrvChild, run: &[JobWrite]) -> i32 {
    let total: usize = run.iter().map(|w| w.data.len()).sum();
    let (Ok(offset), Ok(bytes)) = (to_i64(run[0].offset), to_i64(total as u64)) else {
        return -libc::EINVAL;
    };
    let mut qiov = std::mem::MaybeUninit::<QEMUIOVector>::zeroed();
    // SAFETY: the qiov is initialised, used for one write, and destroyed; the caller keeps
    // the data alive meanwhile; the child is open; in a coroutine.
    unsafe {
        let q = qiov.as_mut_ptr();
        bindings::qemu_iovec_init(q, run.len() as i32);
        for w in run {
            bindings::qemu_iovec_add(q, w.data.as_ptr() as *mut _, w.data.len());
        }
        let ret = bindings::bdrv_co_pwritev(child, offset, bytes, q, 0);
        bindings::qemu_iovec_destroy(q);
        ret
    }
}

/// A write task's end, on every path out of it: its error (if any) noted, the writer told.
struct TaskDone<'a> {
    join: &'a Join,
    /// 0 for a write that succeeded; stays EIO if the write never returned (a panic).
    errno: Cell<i32>,
}

impl Drop for TaskDone<'_> {
    fn drop(&mut self) {
        let errno = self.errno.get();
        if errno != 0 && self.join.error.get().is_none() {
            self.join.error.set(Some(errno));
        }
        self.join.pending.set(self.join.pending.get() - 1);
        // SAFETY: the queue is initialised; restarting schedules the writer, it does not run
        // it.
        unsafe { bindings::qemu_co_queue_next(self.join.queue.get()) };
    }
}

entries! {
fn write_task_entry(opaque: *mut c_void) -> () {
    // SAFETY: made by `write_back` with Box::into_raw, entered once.
    let task = unsafe { Box::from_raw(opaque as *mut WriteTask) };
    // SAFETY: the writer waits for this task before `join` or the job goes.
    let join = unsafe { &*task.join };
    // The task is done whatever happens in the write (a panic unwinds through this), or
    // the writer would wait for it forever.
    let done = TaskDone {
        join,
        errno: Cell::new(libc::EIO),
    };
    // SAFETY: as above.
    let ret = write_run(task.child, unsafe { &*task.run });
    done.errno.set(if ret < 0 { -ret } else { 0 });
}
}

entries! {
fn writer_entry(opaque: *mut c_void) -> () {
    // SAFETY: `kick` passed the OrderedFile, which lives as long as the node, and the node
    // does not close while this writer counts as one of its requests.
    let o = unsafe { &*(opaque as *const OrderedFile) };
    // No longer one of the node's requests once it ends, a panic included (the entry stops
    // the panic; drain and close must not wait for a writer that is gone).
    let _in_flight = InFlight(o.bs);
    o.run_writer();
}
}
