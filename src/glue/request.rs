//! Guest reads and writes on a qcow2b node: the engine's three steps around the node's lock
//! (see `node.rs`), with the data step moving bytes straight between the request's
//! `QEMUIOVector` and the file or backing child, without a copy.

use std::io;
use std::mem::MaybeUninit;

use super::bindings::{self, BdrvChild, BlockDriverState, QEMUIOVector};
use super::node::Node;
use super::storage::ChildStorage;
use crate::engine::dataio::{DataContext, ReadTarget, WriteSource};
use crate::engine::header::CompressionType;
use crate::engine::{Backing, Error, WritePiece};

fn check(ret: i32) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::from_raw_os_error(-ret))
    } else {
        Ok(())
    }
}

fn to_i64(v: u64) -> io::Result<i64> {
    i64::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// A request's I/O vector, from `qiov_offset` on, and the children its bytes move to and from.
struct QiovIo {
    file: *mut BdrvChild,
    /// NULL without a backing file.
    backing: *mut BdrvChild,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
}

impl ReadTarget for QiovIo {
    fn read_file(&mut self, host_offset: u64, at: usize, len: usize) -> io::Result<()> {
        // SAFETY: file is the node's open file child; the qiov holds the request's bytes from
        // qiov_offset on (block-layer contract), and the plan stays inside the request.
        check(unsafe {
            bindings::bdrv_co_preadv_part(
                self.file,
                to_i64(host_offset)?,
                to_i64(len as u64)?,
                self.qiov,
                self.qiov_offset + at,
                0,
            )
        })
    }

    fn read_backing(&mut self, guest_offset: u64, at: usize, len: usize) -> io::Result<()> {
        if self.backing.is_null() {
            self.fill_zero(at, len);
            return Ok(());
        }
        // SAFETY: as above; the block layer reads zeros past the end of the backing node.
        check(unsafe {
            bindings::bdrv_co_preadv_part(
                self.backing,
                to_i64(guest_offset)?,
                to_i64(len as u64)?,
                self.qiov,
                self.qiov_offset + at,
                0,
            )
        })
    }

    fn fill_zero(&mut self, at: usize, len: usize) {
        // SAFETY: the range lies inside the request's part of the qiov.
        unsafe { bindings::qemu_iovec_memset(self.qiov, self.qiov_offset + at, 0, len) };
    }

    fn copy_from(&mut self, at: usize, src: &[u8]) {
        // SAFETY: as above; src is valid for src.len() bytes.
        unsafe {
            bindings::qemu_iovec_from_buf(
                self.qiov,
                self.qiov_offset + at,
                src.as_ptr().cast(),
                src.len(),
            )
        };
    }
}

impl WriteSource for QiovIo {
    fn write_file(
        &mut self,
        host_offset: u64,
        head: &[u8],
        at: usize,
        len: usize,
        tail: &[u8],
    ) -> io::Result<()> {
        let offset = to_i64(host_offset)?;
        if head.is_empty() && tail.is_empty() {
            // SAFETY: as for read_file.
            return check(unsafe {
                bindings::bdrv_co_pwritev_part(
                    self.file,
                    offset,
                    to_i64(len as u64)?,
                    self.qiov,
                    self.qiov_offset + at,
                    0,
                )
            });
        }
        // head + the request's bytes + tail as one vector, so a new cluster is one write.
        let mut local = MaybeUninit::<QEMUIOVector>::zeroed();
        let total = head.len() + len + tail.len();
        // SAFETY: `local` is initialised by qemu_iovec_init and destroyed below; head and
        // tail outlive the write; the concatenated range lies inside the request's qiov.
        unsafe {
            let local = local.as_mut_ptr();
            bindings::qemu_iovec_init(local, (*self.qiov).niov + 2);
            if !head.is_empty() {
                bindings::qemu_iovec_add(local, head.as_ptr() as *mut _, head.len());
            }
            bindings::qemu_iovec_concat(local, self.qiov, self.qiov_offset + at, len);
            if !tail.is_empty() {
                bindings::qemu_iovec_add(local, tail.as_ptr() as *mut _, tail.len());
            }
            let ret = bindings::bdrv_co_pwritev(self.file, offset, to_i64(total as u64)?, local, 0);
            bindings::qemu_iovec_destroy(local);
            check(ret)
        }
    }
}

impl QiovIo {
    /// # Safety
    /// `bs` is an open qcow2b node; `qiov` is valid for the request.
    unsafe fn new(bs: *mut BlockDriverState, qiov: *mut QEMUIOVector, qiov_offset: usize) -> Self {
        // SAFETY: per the caller.
        unsafe {
            QiovIo {
                file: (*bs).file,
                backing: (*bs).backing,
                qiov,
                qiov_offset,
            }
        }
    }
}

/// The file and backing children, for the data step's own small reads (copy-on-write fills,
/// compressed clusters).
struct Children {
    file: ChildStorage,
    backing: Option<ChildStorage>,
}

impl Children {
    /// # Safety
    /// `bs` is an open qcow2b node.
    unsafe fn of(bs: *mut BlockDriverState) -> Self {
        // SAFETY: per the caller; children stay attached while requests run.
        unsafe {
            let backing = (*bs).backing;
            Children {
                file: ChildStorage::new((*bs).file),
                backing: (!backing.is_null()).then(|| ChildStorage::new(backing)),
            }
        }
    }

    fn context(
        &self,
        compression: CompressionType,
        cluster_size: u64,
    ) -> DataContext<'_, ChildStorage> {
        DataContext {
            storage: &self.file,
            backing: self.backing.as_ref().map(|b| b as &dyn Backing),
            compression,
            cluster_size,
        }
    }
}

/// A guest read of `bytes` bytes at `offset` into `qiov` from `qiov_offset`.
///
/// # Safety
/// Runs in a coroutine of the node's AioContext; `bs` is an open qcow2b node; `qiov` holds
/// `bytes` bytes from `qiov_offset` on.
pub unsafe fn read(
    bs: *mut BlockDriverState,
    offset: u64,
    bytes: u64,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
) -> Result<(), Error> {
    // SAFETY: the caller's contract (also for the unsafe blocks below).
    let node = unsafe { Node::of(bs) };
    let (plan, compression, cluster_size) = {
        // SAFETY: as above.
        let mut locked = unsafe { node.lock() }?;
        let image = locked.image();
        let plan = image.plan_read(offset, bytes)?;
        (plan, image.header().compression_type, image.cluster_size())
    };
    // SAFETY: as above.
    let (mut io, children) = unsafe { (QiovIo::new(bs, qiov, qiov_offset), Children::of(bs)) };
    let result = children
        .context(compression, cluster_size)
        .read(&plan, &mut io);
    if plan.holds_ticket() {
        // SAFETY: as above.
        let mut locked = unsafe { node.lock() }?;
        locked.image().finish_read(plan);
    }
    result
}

/// A guest write of `bytes` bytes at `offset` from `qiov` at `qiov_offset`.
///
/// # Safety
/// As for [`read`].
pub unsafe fn write(
    bs: *mut BlockDriverState,
    offset: u64,
    bytes: u64,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
) -> Result<(), Error> {
    // SAFETY: the caller's contract (also for the unsafe blocks below).
    let node = unsafe { Node::of(bs) };
    let (plan, compression, cluster_size) = {
        // SAFETY: as above.
        let mut locked = unsafe { node.lock() }?;
        let plan = loop {
            match locked.image().plan_write(offset, bytes)? {
                Some(plan) => break plan,
                None => locked.wait_for_allocations(),
            }
        };
        let image = locked.image();
        (plan, image.header().compression_type, image.cluster_size())
    };
    // SAFETY: as above.
    let (mut io, children) = unsafe { (QiovIo::new(bs, qiov, qiov_offset), Children::of(bs)) };
    let data = children
        .context(compression, cluster_size)
        .write(&plan, &mut io);
    let allocates = plan
        .pieces
        .iter()
        .any(|p| matches!(p, WritePiece::Allocate { .. }));
    // A node poisoned meanwhile refuses the lock: the plan is dropped unfinished (its clusters
    // leak, its waiters stay asleep), which is all a poisoned node can promise.
    // SAFETY: as above.
    let mut locked = unsafe { node.lock() }?;
    let image = locked.image();
    let result = match data {
        Ok(()) => image.finish_write(plan),
        Err(e) => {
            image.abort_write(plan);
            Err(e)
        }
    };
    if allocates {
        locked.wake_allocation_waiters();
    }
    result
}
