//! Guest reads and writes on a qcow2b node: the engine's three steps around the node's lock
//! (see `node.rs`), with the data step moving bytes straight between the request's
//! `QEMUIOVector` and the file or backing child, without a copy.

use std::io;

use super::bindings::{self, BdrvChild, BlockDriverState, QEMUIOVector};
use super::file::FileAccess;
use super::node::{Node, PendingBarrier};
use super::storage::ChildStorage;
use super::txg;
use crate::engine::format::compress::compress_cluster;
use crate::engine::format::header::CompressionType;
use crate::engine::image::dataio::{DataContext, ReadTarget, WriteSource};
use crate::engine::{Backing, DebugEvent, Encryption, Error, Image, Storage, WritePiece};

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

/// A request's I/O vector, from `qiov_offset` on, and where its bytes move to and from.
struct QiovIo {
    file: FileAccess,
    /// NULL without a backing file.
    backing: *mut BdrvChild,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
}

impl ReadTarget for QiovIo {
    fn read_file(&mut self, host_offset: u64, at: usize, len: usize) -> io::Result<()> {
        // SAFETY: in a coroutine (the request's); the qiov holds the request's bytes from
        // qiov_offset on (block-layer contract), and the plan stays inside the request.
        unsafe {
            self.file
                .read_qiov(host_offset, len, self.qiov, self.qiov_offset + at)
        }
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
        // SAFETY: in a coroutine; the qiov holds the request's bytes (as for reads).
        unsafe {
            self.file.write_qiov(
                host_offset,
                head,
                len,
                self.qiov,
                self.qiov_offset + at,
                tail,
            )
        }
    }

    fn copy_request(&mut self, at: usize, dst: &mut [u8]) -> io::Result<()> {
        // SAFETY: the qiov holds the request's bytes (as for reads); dst is valid for its
        // length.
        let copied = unsafe {
            bindings::qemu_iovec_to_buf(
                self.qiov,
                self.qiov_offset + at,
                dst.as_mut_ptr().cast(),
                dst.len(),
            )
        };
        if copied == dst.len() {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        }
    }
}

impl QiovIo {
    /// # Safety
    /// `bs` is an open qcow2b node; `qiov` is valid for the request.
    unsafe fn new(
        node: &Node,
        bs: *mut BlockDriverState,
        qiov: *mut QEMUIOVector,
        qiov_offset: usize,
    ) -> Self {
        QiovIo {
            file: node.data_storage().clone(),
            // SAFETY: per the caller.
            backing: unsafe { (*bs).backing },
            qiov,
            qiov_offset,
        }
    }
}

/// The backing child, for the data step's own small reads (copy-on-write fills).
pub fn backing_of(bs: *mut BlockDriverState) -> Option<ChildStorage> {
    // SAFETY: bs is an open node (callers' contract); a backing child stays attached while
    // requests run.
    let backing = unsafe { (*bs).backing };
    // SAFETY: as above.
    (!backing.is_null()).then(|| unsafe { ChildStorage::new(backing) })
}

/// What the data step needs of the image, copied out under the lock (the data step runs
/// without it).
struct DataFormat {
    compression: CompressionType,
    cluster_size: u64,
    encryption: Option<Encryption>,
}

impl DataFormat {
    fn of(image: &Image<FileAccess>) -> DataFormat {
        DataFormat {
            compression: image.header().compression_type,
            cluster_size: image.cluster_size(),
            encryption: image.encryption().cloned(),
        }
    }

    fn context<'a>(
        &'a self,
        file: &'a FileAccess,
        backing: Option<&'a ChildStorage>,
    ) -> DataContext<'a, FileAccess> {
        DataContext {
            storage: file,
            backing: backing.map(|b| b as &dyn Backing),
            compression: self.compression,
            cluster_size: self.cluster_size,
            encryption: self.encryption.as_ref(),
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
    let (plan, format) = {
        // SAFETY: as above.
        let mut locked = unsafe { node.lock() }?;
        let image = locked.image();
        let plan = image.plan_read(offset, bytes)?;
        (plan, DataFormat::of(image))
    };
    // SAFETY: as above.
    let mut io = unsafe { QiovIo::new(node, bs, qiov, qiov_offset) };
    let backing = backing_of(bs);
    let result = format
        .context(node.data_storage(), backing.as_ref())
        .read(&plan, &mut io);
    if plan.holds_ticket() {
        // SAFETY: as above.
        let mut locked = unsafe { node.lock() }?;
        locked.image().finish_read(plan);
    }
    result
}

/// A guest write of `bytes` bytes at `offset` from `qiov` at `qiov_offset`. With
/// `barrier`, the guest's barrier write: once this write and every write that arrived before
/// it are done, the metadata naming them is written back in order and a storage barrier
/// placed (no sync); the write completes after that.
///
/// # Safety
/// As for [`read`].
pub unsafe fn write(
    bs: *mut BlockDriverState,
    offset: u64,
    bytes: u64,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
    barrier: bool,
) -> Result<(), Error> {
    // SAFETY: the caller's contract (also for the unsafe blocks below).
    let node = unsafe { Node::of(bs) };
    let arrival = node.write_arrives();
    // INVARIANT: a write submitted after a guest barrier reaches the file only once that
    // barrier is placed (its own write is the barrier's, and goes first).
    node.wait_for_barriers_before(arrival);
    let pending = barrier.then(|| PendingBarrier::new(node, arrival));
    // SAFETY: as above.
    let result = unsafe { write_data(node, bs, offset, bytes, qiov, qiov_offset) };
    node.write_done(arrival);
    if let Some(due) = result? {
        // SAFETY: as above.
        unsafe { txg::after_write(bs, node, due) };
    }
    if let Some(_pending) = pending {
        node.barrier_writes.set(node.barrier_writes.get() + 1);
        node.wait_for_writes_before(arrival);
        // SAFETY: as above.
        let mut locked = unsafe { node.lock() }?;
        locked.image().barrier()?;
    }
    Ok(())
}

/// A guest barrier without data: orders everything written before it before everything
/// written after it. `guest_flush`: it stands for a guest's flush that its device takes as
/// an ordering point (virtio-blk `guest-flush=barrier`); it is ordered like any barrier,
/// and made durable within the mode's bound: `txg` commits the group within
/// `txg-max-age-ms` and `txg-max-bytes` (the committer, `txg.rs`); `ordered` writes the
/// closed epoch back and syncs it in the background at once (`file.rs`), so at most
/// `buffer-size` bytes wait for the disk; `flush` and `barrierfs` answer it as a barrier
/// there (an fdatasync, or BarrierFS's fdatabarrier).
///
/// # Safety
/// As for [`read`].
pub unsafe fn barrier(bs: *mut BlockDriverState, guest_flush: bool) -> Result<(), Error> {
    // SAFETY: the caller's contract.
    let node = unsafe { Node::of(bs) };
    if guest_flush {
        node.guest_flush_barriers
            .set(node.guest_flush_barriers.get() + 1);
    }
    let n = node.bare_barrier_arrives();
    let _pending = PendingBarrier::new(node, n);
    node.wait_for_writes_before(n);
    // SAFETY: as above.
    let mut locked = unsafe { node.lock() }?;
    locked.image().barrier()
}

/// The engine's three steps for one write. In the txg mode, returns whether the group
/// reached a bound (`None` in other modes).
///
/// # Safety
/// As for [`read`].
unsafe fn write_data(
    node: &Node,
    bs: *mut BlockDriverState,
    offset: u64,
    bytes: u64,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
) -> Result<Option<bool>, Error> {
    let (plan, format) = {
        // SAFETY: the caller's contract.
        let mut locked = unsafe { node.lock() }?;
        let plan = loop {
            match locked.image().plan_write(offset, bytes)? {
                Some(plan) => break plan,
                None => locked.wait_for_allocations(),
            }
        };
        (plan, DataFormat::of(locked.image()))
    };
    // SAFETY: as above.
    let mut io = unsafe { QiovIo::new(node, bs, qiov, qiov_offset) };
    let backing = backing_of(bs);
    let data = format
        .context(node.data_storage(), backing.as_ref())
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
    // A commit waiting for the plans in flight is woken by every plan's end.
    if allocates || image.commit_pending() {
        locked.wake_allocation_waiters();
    }
    result?;
    let image = locked.image();
    Ok(image.in_transaction_groups().then(|| image.group_is_due()))
}

/// A compressed write (`bdrv_co_pwritev_compressed_part`) of `bytes` bytes at `offset` from
/// `qiov` at `qiov_offset`: whole clusters (the disk's last one may be short), each compressed
/// on its own and written through the engine's compressed write (`compressed.rs`), or, when
/// it does not compress below the cluster size, as an ordinary write, as QEMU's qcow2 does.
/// `bytes` 0 ends a compressed stream (`qemu-img convert -c` sends it last). Ordered with
/// the guest's barriers like any write. The compression runs in the request's coroutine
/// (QEMU's qcow2 hands it to a thread pool): one cluster at a time.
///
/// # Safety
/// As for [`read`].
pub unsafe fn write_compressed(
    bs: *mut BlockDriverState,
    offset: u64,
    bytes: u64,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
) -> Result<(), Error> {
    // SAFETY: the caller's contract (also for the unsafe blocks below).
    let node = unsafe { Node::of(bs) };
    let (kind, cluster_size) = {
        // SAFETY: as above.
        let mut locked = unsafe { node.lock() }?;
        let image = locked.image();
        if bytes == 0 {
            return image.end_compressed_stream();
        }
        image.check_compressed_write(offset, bytes)?;
        (image.header().compression_type, image.cluster_size())
    };
    let arrival = node.write_arrives();
    // As for `write`: after every guest barrier that arrived before it.
    node.wait_for_barriers_before(arrival);
    let mut result = Ok(());
    let mut done = 0;
    while done < bytes && result.is_ok() {
        let len = (bytes - done).min(cluster_size);
        // SAFETY: as above; the chunk lies inside the request.
        result = unsafe {
            write_one_compressed(
                node,
                bs,
                kind,
                cluster_size,
                offset + done,
                len,
                qiov,
                qiov_offset + done as usize,
            )
        };
        done += len;
    }
    node.write_done(arrival);
    result
}

/// One cluster of [`write_compressed`]: `len` bytes (the cluster's size, or less for the
/// disk's last one) at `offset`.
///
/// # Safety
/// As for [`read`].
#[allow(clippy::too_many_arguments)]
unsafe fn write_one_compressed(
    node: &Node,
    bs: *mut BlockDriverState,
    kind: CompressionType,
    cluster_size: u64,
    offset: u64,
    len: u64,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
) -> Result<(), Error> {
    let mut cluster = vec![0u8; cluster_size as usize];
    // SAFETY: the qiov holds the request's bytes from qiov_offset on (block-layer contract);
    // `len` bytes of it belong to this cluster; the buffer holds at least as many.
    let copied = unsafe {
        bindings::qemu_iovec_to_buf(qiov, qiov_offset, cluster.as_mut_ptr().cast(), len as usize)
    };
    if copied != len as usize {
        return Err(Error::io(
            "copying a compressed write's cluster",
            io::Error::from_raw_os_error(libc::EINVAL),
        ));
    }
    let due = match compress_cluster(kind, &cluster)? {
        // Not smaller compressed: an ordinary write of the cluster.
        // SAFETY: as above.
        None => unsafe { write_data(node, bs, offset, len, qiov, qiov_offset) }?,
        Some(packed) => {
            let plan = {
                // SAFETY: as above.
                let mut locked = unsafe { node.lock() }?;
                loop {
                    match locked
                        .image()
                        .plan_compressed_write(offset, packed.len() as u64)?
                    {
                        Some(plan) => break plan,
                        None => locked.wait_for_allocations(),
                    }
                }
            };
            let file = node.data_storage();
            file.debug_event(DebugEvent::WriteCompressed);
            let data = file.write_at(plan.host_offset, &packed);
            // SAFETY: as above. (A node poisoned meanwhile: the plan is dropped, its bytes
            // leak, as in `write_data`.)
            let mut locked = unsafe { node.lock() }?;
            let image = locked.image();
            let result = match data {
                Ok(()) => image.finish_compressed_write(plan),
                Err(e) => {
                    let host_offset = plan.host_offset;
                    image.abort_compressed_write(plan);
                    Err(Error::io(
                        format!("writing a compressed cluster at {host_offset:#x}"),
                        e,
                    ))
                }
            };
            locked.wake_allocation_waiters();
            result?;
            let image = locked.image();
            image.in_transaction_groups().then(|| image.group_is_due())
        }
    };
    if let Some(due) = due {
        // SAFETY: as above.
        unsafe { txg::after_write(bs, node, due) };
    }
    Ok(())
}
