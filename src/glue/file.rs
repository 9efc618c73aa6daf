//! The image file as the engine and the data step see it: the `file` child, reached directly
//! (modes `flush` and `barrierfs`) or through the `ordered` mode's epoch buffer
//! (`ordering::epochs`), whose background writer runs as a coroutine in the node's
//! AioContext.
//!
//! [`FileAccess`] is cheap to clone: the engine holds one as its [`Storage`], the data step of
//! every request another. Everything here runs in the node's AioContext thread: the buffer is
//! a `RefCell`, and no borrow of it is held across a yield (every call into the block layer
//! may yield).
//!
//! The `ordered` and `txg` modes' epoch buffer and its writer are in `epochs.rs` (the QEMU
//! half of `ordering::epochs`, as `txg.rs` is of `engine::image::txg`); this file holds what
//! every mode shares: the file child's reads, writes, syncs and length, and the blkdebug
//! events.

use std::cell::Cell;
use std::ffi::CStr;
use std::io;
use std::rc::Rc;

use super::bindings::{self, BdrvChild, BlockDriverState, QEMUIOVector};
use super::epochs::{OrderedFile, Unsynced, TXG_BUFFER_BYTES};
use crate::engine::{DebugEvent, Storage};
use crate::ordering::BarrierMode;

pub(super) fn check(ret: i32) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::from_raw_os_error(-ret))
    } else {
        Ok(())
    }
}

pub(super) fn to_i64(v: u64) -> io::Result<i64> {
    i64::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

pub(super) fn in_coroutine() -> bool {
    // SAFETY: a plain query of the current thread's coroutine state.
    unsafe { bindings::qemu_in_coroutine() }
}

/// What reached the host file, for the counters people read.
#[derive(Debug, Default)]
pub struct HostCounters {
    pub fdatasyncs: Cell<u64>,
    pub barriers: Cell<u64>,
    pub epochs: Cell<u64>,
    pub full_wait_ns: Cell<u64>,
    /// Writes, flushes and barriers of the file that failed.
    pub errors: Cell<u64>,
}

impl HostCounters {
    pub(super) fn count_error<T>(&self, result: io::Result<T>) -> io::Result<T> {
        if result.is_err() {
            self.errors.set(self.errors.get() + 1);
        }
        result
    }
}

/// How barriers reach the file in the direct modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirectBarrier {
    /// An fdatasync (`barrier=flush`).
    Flush,
    /// The block layer's barrier on the file child (`barrier=barrierfs`): file-posix runs the
    /// primitive registered for the protocol node.
    BlockLayer,
}

/// The image file of one qcow2b node (or its external data file).
#[derive(Clone)]
pub enum FileAccess {
    Direct {
        /// The qcow2b node: its `file` child is looked up at each use (a reopen may replace
        /// it).
        bs: *mut BlockDriverState,
        /// Another child than `file`: the external data file (not replaced by a reopen).
        other_child: Option<*mut BdrvChild>,
        barrier: DirectBarrier,
        counters: Rc<HostCounters>,
    },
    Ordered(Rc<OrderedFile>),
}

impl FileAccess {
    /// The file child of `bs` in `mode`.
    ///
    /// # Safety
    /// `bs` is a qcow2b node whose `file` child is open; both outlive the returned value.
    pub unsafe fn new(bs: *mut BlockDriverState, mode: BarrierMode) -> FileAccess {
        let counters = Rc::new(HostCounters::default());
        match mode {
            BarrierMode::Flush => FileAccess::Direct {
                bs,
                other_child: None,
                barrier: DirectBarrier::Flush,
                counters,
            },
            // Transaction groups order by their commit's two syncs; the engine issues no
            // barrier inside a group (outside one, for a resize or a check, a barrier is a
            // sync). What a group writes is written back from memory, without a sync (see
            // `OrderedFile::sync_epochs`).
            BarrierMode::Txg(_) => {
                FileAccess::Ordered(OrderedFile::new(bs, TXG_BUFFER_BYTES, counters, false))
            }
            BarrierMode::BarrierFs { .. } | BarrierMode::Injected => FileAccess::Direct {
                bs,
                other_child: None,
                barrier: DirectBarrier::BlockLayer,
                counters,
            },
            BarrierMode::Ordered { buffer_bytes } => {
                FileAccess::Ordered(OrderedFile::new(bs, buffer_bytes, counters, true))
            }
        }
    }

    /// The external data file `child` of `bs`, written directly in every barrier mode (the
    /// engine syncs it where its data must be durable: `engine::image::data_file`); its
    /// host requests count in `file`'s counters.
    ///
    /// # Safety
    /// `child` is an open child of `bs`; both outlive the returned value.
    pub unsafe fn data_file(
        bs: *mut BlockDriverState,
        child: *mut BdrvChild,
        file: &FileAccess,
    ) -> FileAccess {
        FileAccess::Direct {
            bs,
            other_child: Some(child),
            barrier: DirectBarrier::Flush,
            counters: match file {
                FileAccess::Direct { counters, .. } => counters.clone(),
                FileAccess::Ordered(o) => o.counters.clone(),
            },
        }
    }

    pub fn counters(&self) -> &HostCounters {
        match self {
            FileAccess::Direct { counters, .. } => counters,
            FileAccess::Ordered(o) => &o.counters,
        }
    }

    /// Bytes buffered now and at most so far (the ordered mode; 0 otherwise).
    pub fn buffered_bytes(&self) -> (u64, u64) {
        match self {
            FileAccess::Direct { .. } => (0, 0),
            FileAccess::Ordered(o) => {
                let b = o.buffer.borrow();
                (b.buffered_bytes(), b.peak_bytes())
            }
        }
    }

    /// Guest bytes written and not yet durable in the ordered mode (buffered, and written
    /// directly but not yet synced): now, at most so far, the time since everything was last
    /// durable (an upper bound on the age of the oldest of them), and the longest that time
    /// was before everything became durable again. `None` in the other modes.
    pub fn unsynced(&self) -> Option<Unsynced> {
        match self {
            FileAccess::Direct { .. } => None,
            FileAccess::Ordered(o) => Some(Unsynced {
                bytes: o.unsynced_bytes(),
                peak_bytes: o.peak_unsynced_bytes.get(),
                age: o.unsynced_since.get().map(|s| s.elapsed()),
                peak_age_ms: o.peak_unsynced_age_ms.get(),
            }),
        }
    }

    pub fn child(&self) -> *mut BdrvChild {
        match self {
            FileAccess::Direct {
                other_child: Some(child),
                ..
            } => *child,
            // SAFETY: the node is open while its FileAccess is (constructor contract).
            FileAccess::Direct { bs, .. } => unsafe { (**bs).file },
            FileAccess::Ordered(o) => o.file(),
        }
    }

    /// Reads into `qiov` from `qiov_offset` (the data step), buffered bytes included.
    ///
    /// # Safety
    /// In a coroutine; `qiov` holds `len` bytes from `qiov_offset`.
    pub unsafe fn read_qiov(
        &self,
        host_offset: u64,
        len: usize,
        qiov: *mut QEMUIOVector,
        qiov_offset: usize,
    ) -> io::Result<()> {
        let overlay = match self {
            FileAccess::Ordered(o) => Some(o.buffer.borrow().snapshot(host_offset, len)),
            FileAccess::Direct { .. } => None,
        };
        // SAFETY: per the caller; the child is open.
        check(unsafe {
            bindings::bdrv_co_preadv_part(
                self.child(),
                to_i64(host_offset)?,
                to_i64(len as u64)?,
                qiov,
                qiov_offset,
                0,
            )
        })?;
        if let Some(overlay) = overlay.filter(|o| !o.is_empty()) {
            // Rare (a read of bytes written moments ago): through a bounce buffer.
            let mut bytes = vec![0u8; len];
            // SAFETY: the qiov holds these bytes (caller's contract).
            unsafe {
                bindings::qemu_iovec_to_buf(qiov, qiov_offset, bytes.as_mut_ptr().cast(), len);
                overlay.apply(&mut bytes);
                bindings::qemu_iovec_from_buf(qiov, qiov_offset, bytes.as_ptr().cast(), len);
            }
        }
        Ok(())
    }

    /// Writes `head`, `len` bytes of `qiov` from `qiov_offset`, and `tail` at `host_offset`
    /// (the data step).
    ///
    /// # Safety
    /// In a coroutine; `qiov` holds `len` bytes from `qiov_offset`.
    pub unsafe fn write_qiov(
        &self,
        host_offset: u64,
        head: &[u8],
        len: usize,
        qiov: *mut QEMUIOVector,
        qiov_offset: usize,
        tail: &[u8],
    ) -> io::Result<()> {
        match self {
            FileAccess::Direct { .. } => {
                // SAFETY: per the caller.
                unsafe {
                    write_vectored(
                        self.child(),
                        host_offset,
                        head,
                        len,
                        qiov,
                        qiov_offset,
                        tail,
                    )
                }
            }
            FileAccess::Ordered(o) if o.may_write_directly() => {
                // Every earlier epoch is durable: straight from the request's buffers.
                o.direct_unsynced.set(true);
                o.direct_in_flight.set(o.direct_in_flight.get() + 1);
                // SAFETY: per the caller.
                let result = unsafe {
                    write_vectored(o.file(), host_offset, head, len, qiov, qiov_offset, tail)
                };
                o.direct_in_flight.set(o.direct_in_flight.get() - 1);
                let end = host_offset + (head.len() + len + tail.len()) as u64;
                o.buffered_end.set(o.buffered_end.get().max(end));
                o.counters.count_error(result)
            }
            FileAccess::Ordered(o) => {
                // Into the epoch buffer: one copy, then the write is complete.
                let mut bytes = Vec::with_capacity(head.len() + len + tail.len());
                bytes.extend_from_slice(head);
                bytes.resize(head.len() + len, 0);
                // SAFETY: per the caller.
                unsafe {
                    bindings::qemu_iovec_to_buf(
                        qiov,
                        qiov_offset,
                        bytes[head.len()..].as_mut_ptr().cast(),
                        len,
                    )
                };
                bytes.extend_from_slice(tail);
                o.write(host_offset, &bytes)
            }
        }
    }
}

/// QEMU's `BlkdebugEvent` for an engine event (the same name, see `engine::debug_event`).
fn blkdebug_event(event: DebugEvent) -> bindings::BlkdebugEvent {
    use bindings::*;
    match event {
        DebugEvent::L1Update => BLKDBG_L1_UPDATE,
        DebugEvent::L1GrowAllocTable => BLKDBG_L1_GROW_ALLOC_TABLE,
        DebugEvent::L1GrowWriteTable => BLKDBG_L1_GROW_WRITE_TABLE,
        DebugEvent::L1GrowActivateTable => BLKDBG_L1_GROW_ACTIVATE_TABLE,
        DebugEvent::L2Load => BLKDBG_L2_LOAD,
        DebugEvent::L2Update => BLKDBG_L2_UPDATE,
        DebugEvent::L2AllocCowRead => BLKDBG_L2_ALLOC_COW_READ,
        DebugEvent::L2AllocWrite => BLKDBG_L2_ALLOC_WRITE,
        DebugEvent::ReadAio => BLKDBG_READ_AIO,
        DebugEvent::ReadBackingAio => BLKDBG_READ_BACKING_AIO,
        DebugEvent::ReadCompressed => BLKDBG_READ_COMPRESSED,
        DebugEvent::WriteCompressed => BLKDBG_WRITE_COMPRESSED,
        DebugEvent::ClusterAllocBytes => BLKDBG_CLUSTER_ALLOC_BYTES,
        DebugEvent::L2UpdateCompressed => BLKDBG_L2_UPDATE_COMPRESSED,
        DebugEvent::WriteAio => BLKDBG_WRITE_AIO,
        DebugEvent::CowRead => BLKDBG_COW_READ,
        DebugEvent::CowWrite => BLKDBG_COW_WRITE,
        DebugEvent::ReftableLoad => BLKDBG_REFTABLE_LOAD,
        DebugEvent::ReftableGrow => BLKDBG_REFTABLE_GROW,
        DebugEvent::RefblockLoad => BLKDBG_REFBLOCK_LOAD,
        DebugEvent::RefblockUpdatePart => BLKDBG_REFBLOCK_UPDATE_PART,
        DebugEvent::RefblockAlloc => BLKDBG_REFBLOCK_ALLOC,
        DebugEvent::RefblockAllocHookup => BLKDBG_REFBLOCK_ALLOC_HOOKUP,
        DebugEvent::RefblockAllocWrite => BLKDBG_REFBLOCK_ALLOC_WRITE,
        DebugEvent::RefblockAllocWriteBlocks => BLKDBG_REFBLOCK_ALLOC_WRITE_BLOCKS,
        DebugEvent::RefblockAllocWriteTable => BLKDBG_REFBLOCK_ALLOC_WRITE_TABLE,
        DebugEvent::RefblockAllocSwitchTable => BLKDBG_REFBLOCK_ALLOC_SWITCH_TABLE,
        DebugEvent::ClusterAlloc => BLKDBG_CLUSTER_ALLOC,
        DebugEvent::ClusterFree => BLKDBG_CLUSTER_FREE,
        DebugEvent::ClusterAllocSpace => BLKDBG_CLUSTER_ALLOC_SPACE,
        DebugEvent::Barrier => BLKDBG_BARRIER,
    }
}

/// The most one write to a child carries: a guest request may be as large as the block
/// layer's limit (`BDRV_REQUEST_MAX_BYTES`, just under 2 GiB), and the copy-on-write fills
/// around it would take it past that (iotest 270).
const MAX_CHILD_WRITE_BYTES: usize = 1 << 30;

/// `head`, `len` bytes of `qiov` and `tail` as one vectored write at `host_offset` (as
/// several if together they exceed [`MAX_CHILD_WRITE_BYTES`]: head, the qiov's bytes in
/// pieces, tail).
///
/// # Safety
/// In a coroutine; `child` open; `qiov` holds `len` bytes from `qiov_offset`.
pub(super) unsafe fn write_vectored(
    child: *mut BdrvChild,
    host_offset: u64,
    head: &[u8],
    len: usize,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
    tail: &[u8],
) -> io::Result<()> {
    if head.len() + len + tail.len() > MAX_CHILD_WRITE_BYTES {
        child_pwrite(child, host_offset, head)?;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_CHILD_WRITE_BYTES);
            let at = host_offset + (head.len() + done) as u64;
            // SAFETY: per the caller; the piece lies inside the caller's range of the qiov.
            unsafe { write_vectored(child, at, &[], n, qiov, qiov_offset + done, &[]) }?;
            done += n;
        }
        return child_pwrite(child, host_offset + (head.len() + len) as u64, tail);
    }
    let offset = to_i64(host_offset)?;
    if head.is_empty() && tail.is_empty() {
        // SAFETY: per the caller.
        return check(unsafe {
            bindings::bdrv_co_pwritev_part(child, offset, to_i64(len as u64)?, qiov, qiov_offset, 0)
        });
    }
    let mut local = std::mem::MaybeUninit::<QEMUIOVector>::zeroed();
    let total = head.len() + len + tail.len();
    // SAFETY: `local` is initialised by qemu_iovec_init and destroyed below; head and tail
    // outlive the write; the concatenated range lies inside the caller's qiov.
    unsafe {
        let local = local.as_mut_ptr();
        bindings::qemu_iovec_init(local, (*qiov).niov + 2);
        if !head.is_empty() {
            bindings::qemu_iovec_add(local, head.as_ptr() as *mut _, head.len());
        }
        bindings::qemu_iovec_concat(local, qiov, qiov_offset, len);
        if !tail.is_empty() {
            bindings::qemu_iovec_add(local, tail.as_ptr() as *mut _, tail.len());
        }
        let ret = bindings::bdrv_co_pwritev(child, offset, to_i64(total as u64)?, local, 0);
        bindings::qemu_iovec_destroy(local);
        check(ret)
    }
}

/// Plain reads and writes of the file child (metadata, and the direct modes).
pub(super) fn child_pread(child: *mut BdrvChild, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    // SAFETY: the child is open while its node is; buf is valid for its length. Inside a
    // coroutine bdrv_pread calls the coroutine version directly; outside it polls.
    check(unsafe {
        bindings::bdrv_pread(
            child,
            to_i64(offset)?,
            to_i64(buf.len() as u64)?,
            buf.as_mut_ptr().cast(),
            0,
        )
    })
}

pub(super) fn child_pwrite(child: *mut BdrvChild, offset: u64, buf: &[u8]) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    // SAFETY: as for child_pread.
    check(unsafe {
        bindings::bdrv_pwrite(
            child,
            to_i64(offset)?,
            to_i64(buf.len() as u64)?,
            buf.as_ptr().cast(),
            0,
        )
    })
}

pub(super) fn child_flush(child: *mut BdrvChild, counters: &HostCounters) -> io::Result<()> {
    // SAFETY: the child and its node are open.
    check(unsafe { bindings::bdrv_flush((*child).bs) })?;
    counters.fdatasyncs.set(counters.fdatasyncs.get() + 1);
    Ok(())
}

fn child_discard(child: *mut BdrvChild, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = (to_i64(offset)?, to_i64(len)?);
    // SAFETY: the child and its node are open; inside a coroutine the coroutine version is
    // called, outside it the generated wrapper polls.
    check(unsafe {
        if in_coroutine() {
            bindings::bdrv_co_pdiscard(child, offset, len)
        } else {
            bindings::bdrv_pdiscard(child, offset, len)
        }
    })
}

pub(super) fn child_len(child: *mut BdrvChild) -> io::Result<u64> {
    // SAFETY: as above.
    let len = unsafe { bindings::bdrv_getlength((*child).bs) };
    u64::try_from(len).map_err(|_| io::Error::from_raw_os_error(-(len as i32)))
}

pub(super) fn child_truncate(child: *mut BdrvChild, len: u64) -> io::Result<()> {
    // SAFETY: as above; errp NULL keeps only the errno.
    check(unsafe {
        bindings::bdrv_truncate(
            child,
            to_i64(len)?,
            false,
            bindings::PREALLOC_MODE_OFF,
            0,
            std::ptr::null_mut(),
        )
    })
}

impl Storage for FileAccess {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            FileAccess::Direct { .. } => child_pread(self.child(), offset, buf),
            FileAccess::Ordered(o) => o.read(offset, buf),
        }
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        match self {
            FileAccess::Direct { .. } => child_pwrite(self.child(), offset, buf),
            FileAccess::Ordered(o) => o.write(offset, buf),
        }
    }

    fn flush(&self) -> io::Result<()> {
        match self {
            FileAccess::Direct { counters, .. } => {
                counters.count_error(child_flush(self.child(), counters))
            }
            FileAccess::Ordered(o) => o.flush(),
        }
    }

    fn barrier(&self) -> io::Result<()> {
        match self {
            FileAccess::Direct {
                barrier, counters, ..
            } => {
                let child = self.child();
                counters.barriers.set(counters.barriers.get() + 1);
                let result = match barrier {
                    DirectBarrier::Flush => child_flush(child, counters),
                    // Outside a coroutine (open, close) a flush orders just as well.
                    DirectBarrier::BlockLayer if !in_coroutine() => child_flush(child, counters),
                    DirectBarrier::BlockLayer => {
                        // SAFETY: in a coroutine; the child is open.
                        check(unsafe { bindings::bdrv_co_barrier(child, 0) })
                    }
                };
                counters.count_error(result)
            }
            FileAccess::Ordered(o) => o.barrier(),
        }
    }

    fn debug_event(&self, event: DebugEvent) {
        // SAFETY: the child and its node are open while the image is; bdrv_debug_event does
        // nothing unless the node's driver handles events (blkdebug), and a blkdebug
        // breakpoint (suspend) there is only set by tests on events met in a coroutine.
        unsafe { bindings::bdrv_debug_event((*self.child()).bs, blkdebug_event(event)) }
    }

    fn is_growable(&self) -> bool {
        // SAFETY: the child and its node are open while the image is; a protocol node always
        // has a driver, whose format_name is a static string.
        let name = unsafe {
            let protocol = bindings::bdrv_skip_filters((*self.child()).bs);
            CStr::from_ptr((*(*protocol).drv).format_name)
        };
        // file-posix refuses to grow these ("Cannot grow device files").
        name != c"host_device" && name != c"host_cdrom"
    }

    fn len(&self) -> io::Result<u64> {
        match self {
            FileAccess::Direct { .. } => child_len(self.child()),
            FileAccess::Ordered(o) => Ok(child_len(o.file())?.max(o.buffered_end.get())),
        }
    }

    /// Straight to the file in every mode: the engine discards only clusters nothing names
    /// and nothing can write any more until the discard returned (released from quarantine
    /// after a durability point, `engine::image::discard`), and a durability point left no buffered
    /// write of theirs behind; writes buffered since are to other clusters.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let child = match self {
            FileAccess::Direct { .. } => self.child(),
            FileAccess::Ordered(o) => o.file(),
        };
        child_discard(child, offset, len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        match self {
            FileAccess::Direct { .. } => child_truncate(self.child(), len),
            FileAccess::Ordered(o) => {
                o.drain()?;
                child_truncate(o.file(), len)?;
                o.buffered_end.set(len);
                Ok(())
            }
        }
    }
}
