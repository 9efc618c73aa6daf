//! `qcow2b-recorder`: a filter driver that passes every request to its `file` child and
//! records, in a log file, every write, write_zeroes, discard, flush, barrier and truncate
//! that goes through it, each with an *issue* and a *completion* record. It exists for the
//! crash-consistency harness (`tests/crash/`), which replays what reached the image file to
//! build the states a crash could leave.
//!
//! ```text
//! --image-opts driver=qcow2b,file.driver=qcow2b-recorder,file.log=L,file.file.filename=IMG
//! ```
//!
//! The same works under QEMU's `qcow2`, and above a format node (then it records what the
//! guest sent). It has no QAPI schema entry: it is opened through `--image-opts` or `-drive`,
//! not `-blockdev` or QMP. It is a filter (`is_filter`): `bdrv_skip_filters` looks through it, so a
//! qcow2b node in `barrierfs` mode registers its barrier primitive for the protocol node
//! below, and the barriers recorded here reach that primitive.
//!
//! # Log format (version 1, little-endian)
//! The file starts with the 8 bytes `QRECLOG1`, then records:
//! - issue: `b'I'`, `seq: u64`, `op: u8`, `flags: u32`, `offset: u64`, `len: u64`, then for
//!   `op == b'W'` the `len` bytes written. `op` is `W` write, `Z` write_zeroes, `D` discard,
//!   `F` flush, `B` barrier, `T` truncate (`offset` is the new length, `len` 0, `flags` the
//!   preallocation mode). `flags` are the request's `BdrvRequestFlags`.
//! - completion: `b'C'`, `seq: u64`, `issue_seq: u64` (the `seq` of its issue), `ret: i32`.
//!
//! `seq` comes from one counter shared by every recorder in the process, so the logs of two
//! recorders (one above a format node, one below it) interleave into one total order. An
//! issue record is written before the request is passed on, its completion once the child
//! answered: a request is "in flight" between the two. Reads are passed on and not recorded.
//!
//! A node opened with `cache.no-flush=on` records no flush: none reaches the disk.
//!
//! A request whose record cannot be written fails with the error of the log write: a
//! harness must never trust an incomplete log.

use std::ffi::{c_int, CStr};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::bindings::{self, BlockDriver, BlockDriverState, QDict, QEMUIOVector};
use super::ffi::{entries, to_c, to_c_errp};
use super::filter;
use super::opts::{leak_list, string_opt, Opts, OptsListCell};
use crate::engine::Error;

static FORMAT_NAME: &CStr = c"qcow2b-recorder";
const LOG: &CStr = c"log";
const LOG_MAGIC: &[u8; 8] = b"QRECLOG1";

/// The process-wide event counter: every issue and completion takes the next number.
static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

/// What a recorded request does to the file.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write,
    Zeroes,
    Discard,
    Flush,
    Barrier,
    Truncate,
}

impl Op {
    fn code(self) -> u8 {
        match self {
            Op::Write => b'W',
            Op::Zeroes => b'Z',
            Op::Discard => b'D',
            Op::Flush => b'F',
            Op::Barrier => b'B',
            Op::Truncate => b'T',
        }
    }
}

/// The log of one recorder node.
struct Recorder {
    log: Mutex<BufWriter<File>>,
}

impl Recorder {
    fn create(path: &str) -> io::Result<Recorder> {
        let mut log = BufWriter::new(File::create(path)?);
        log.write_all(LOG_MAGIC)?;
        log.flush()?;
        Ok(Recorder {
            log: Mutex::new(log),
        })
    }

    fn locked(&self) -> io::Result<std::sync::MutexGuard<'_, BufWriter<File>>> {
        self.log
            .lock()
            .map_err(|_| io::Error::other("the recorder's log lock is poisoned"))
    }

    /// Records the issue of a request; returns its sequence number.
    fn issue(
        &self,
        op: Op,
        flags: u32,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> io::Result<u64> {
        let mut log = self.locked()?;
        // Numbered under the lock, so each log lists its records in sequence order.
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        log.write_all(b"I")?;
        log.write_all(&seq.to_le_bytes())?;
        log.write_all(&[op.code()])?;
        log.write_all(&flags.to_le_bytes())?;
        log.write_all(&offset.to_le_bytes())?;
        log.write_all(&len.to_le_bytes())?;
        if let Some(data) = data {
            log.write_all(data)?;
        }
        Ok(seq)
    }

    /// Records the completion of the request issued as `issue_seq`. The log reaches the
    /// file at every flush and barrier, so a process that dies keeps most of it.
    fn complete(&self, op: Op, issue_seq: u64, ret: c_int) -> io::Result<()> {
        let mut log = self.locked()?;
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        log.write_all(b"C")?;
        log.write_all(&seq.to_le_bytes())?;
        log.write_all(&issue_seq.to_le_bytes())?;
        log.write_all(&ret.to_le_bytes())?;
        if matches!(op, Op::Flush | Op::Barrier) {
            log.flush()?;
        }
        Ok(())
    }

    /// Records `op`, runs `request` (the child's answer, 0 or -errno), records its
    /// completion, and returns the answer, or the log's error if a record failed.
    fn around(
        &self,
        op: Op,
        flags: u32,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        request: impl FnOnce() -> c_int,
    ) -> Result<c_int, Error> {
        let seq = self
            .issue(op, flags, offset, len, data)
            .map_err(|e| Error::io("qcow2b-recorder: writing an issue record", e))?;
        let ret = request();
        self.complete(op, seq, ret)
            .map_err(|e| Error::io("qcow2b-recorder: writing a completion record", e))?;
        Ok(ret)
    }
}

/// The runtime options, built once.
fn runtime_opts() -> *mut bindings::QemuOptsList {
    static LIST: OptsListCell = OptsListCell::new();
    LIST.get_or_init(|| {
        leak_list::<2>(
            FORMAT_NAME,
            &[string_opt(
                LOG,
                c"File that receives the record of every write, flush and barrier (created anew)",
            )],
        )
    })
}

/// The recorder of `bs`.
///
/// # Safety
/// `bs` is a node opened by this driver and not yet closed.
unsafe fn recorder_of<'a>(bs: *mut BlockDriverState) -> &'a Recorder {
    // SAFETY: recorder_open stored a Box<Recorder> pointer in the opaque area (instance_size
    // is one pointer); it stays valid until recorder_close.
    unsafe { &**((*bs).opaque as *const *const Recorder) }
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

entries! {
fn recorder_open(
    bs: *mut BlockDriverState,
    options: *mut QDict,
    _flags: c_int,
    errp: *mut *mut bindings::Error,
) -> c_int, errp = errp {
    // SAFETY: QEMU passes a valid node, options and errp.
    unsafe {
        to_c_errp("qcow2b-recorder open", errp, || {
            let ret =
                bindings::bdrv_open_file_child(ptr::null(), options, c"file".as_ptr(), bs, errp);
            if ret < 0 {
                // errp already says why.
                return Ok(ret);
            }
            let Some(opts) = Opts::absorb(runtime_opts(), options, errp) else {
                return Ok(-libc::EINVAL);
            };
            let path = opts
                .string(LOG)
                .ok_or_else(|| Error::BadOption("qcow2b-recorder needs log=PATH".into()))?;
            let recorder = Recorder::create(&path)
                .map_err(|e| Error::io(format!("qcow2b-recorder: creating the log {path}"), e))?;
            let child = (*(*bs).file).bs;
            // Barrier writes are passed on as they are (the block layer below emulates them
            // with a flush where the child has no barrier), so that a recorder above a format
            // node sees the guest's barriers as barriers.
            (*bs).supported_write_flags = bindings::BDRV_REQ_WRITE_UNCHANGED
                | bindings::BDRV_REQ_BARRIER
                | (bindings::BDRV_REQ_FUA & (*child).supported_write_flags);
            (*bs).supported_zero_flags = bindings::BDRV_REQ_WRITE_UNCHANGED
                | bindings::BDRV_REQ_BARRIER
                | ((bindings::BDRV_REQ_FUA
                    | bindings::BDRV_REQ_MAY_UNMAP
                    | bindings::BDRV_REQ_NO_FALLBACK)
                    & (*child).supported_zero_flags);
            *((*bs).opaque as *mut *mut Recorder) = Box::into_raw(Box::new(recorder));
            Ok(0)
        })
    }
}
}

entries! {
fn recorder_close(bs: *mut BlockDriverState) -> () {
    // SAFETY: QEMU closes only nodes it opened, drained; nothing uses the node afterwards.
    // The slot holds a Box<Recorder> pointer or NULL.
    let recorder = unsafe {
        let slot = (*bs).opaque as *mut *mut Recorder;
        let raw = std::mem::replace(&mut *slot, ptr::null_mut());
        (!raw.is_null()).then(|| Box::from_raw(raw))
    };
    let Some(recorder) = recorder else {
        return;
    };
    let ret = to_c("qcow2b-recorder close", move || {
        recorder
            .locked()
            .and_then(|mut log| log.flush())
            .map(|()| 0)
            .map_err(|e| Error::io("qcow2b-recorder: writing the log", e))
    });
    if ret < 0 {
        log::error!("qcow2b-recorder: the log is incomplete");
    }
}
}

entries! {
fn recorder_co_pwritev_part(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
    flags: bindings::BdrvRequestFlags,
) -> c_int {
    to_c("qcow2b-recorder write", || {
        let len = usize::try_from(bytes).map_err(|_| Error::Invalid("negative length".into()))?;
        let mut data = vec![0u8; len];
        if !qiov.is_null() {
            // SAFETY: the qiov holds `bytes` bytes from qiov_offset (block-layer contract).
            unsafe {
                bindings::qemu_iovec_to_buf(qiov, qiov_offset, data.as_mut_ptr().cast(), len)
            };
        }
        // SAFETY: as above; an open recorder node in one of its coroutines.
        let recorder = unsafe { recorder_of(bs) };
        recorder.around(
            Op::Write,
            flags,
            to_u64(offset),
            len as u64,
            Some(&data),
            // SAFETY: as above; the child is open.
            || unsafe {
                bindings::bdrv_co_pwritev_part(
                    filter::child(bs),
                    offset,
                    bytes,
                    qiov,
                    qiov_offset,
                    flags,
                )
            },
        )
    })
}
}

entries! {
/// A compressed write: recorded as the write of its bytes (what the guest reads back; the
/// flag is logged with it), passed on as a compressed write. The end of a compressed stream
/// (0 bytes) is passed on only.
fn recorder_co_pwritev_compressed_part(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
) -> c_int {
    let compressed = bindings::BDRV_REQ_WRITE_COMPRESSED;
    if bytes == 0 {
        // SAFETY: called by the block layer in a coroutine of an open recorder node; the
        // child is open.
        return unsafe {
            bindings::bdrv_co_pwritev_part(filter::child(bs), offset, 0, qiov, qiov_offset, compressed)
        };
    }
    // SAFETY: as above, with a qiov of `bytes` bytes from qiov_offset: the write entry's
    // contract.
    unsafe { recorder_co_pwritev_part(bs, offset, bytes, qiov, qiov_offset, compressed) }
}
}

entries! {
fn recorder_co_pwrite_zeroes(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
    flags: bindings::BdrvRequestFlags,
) -> c_int {
    to_c("qcow2b-recorder write_zeroes", || {
        // SAFETY: called by the block layer in a coroutine of an open recorder node.
        let recorder = unsafe { recorder_of(bs) };
        recorder.around(
            Op::Zeroes,
            flags,
            to_u64(offset),
            to_u64(bytes),
            None,
            // SAFETY: as above; the child is open.
            || unsafe { bindings::bdrv_co_pwrite_zeroes(filter::child(bs), offset, bytes, flags) },
        )
    })
}
}

entries! {
fn recorder_co_pdiscard(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
) -> c_int {
    to_c("qcow2b-recorder discard", || {
        // SAFETY: called by the block layer in a coroutine of an open recorder node.
        let recorder = unsafe { recorder_of(bs) };
        recorder.around(
            Op::Discard,
            0,
            to_u64(offset),
            to_u64(bytes),
            None,
            // SAFETY: as above; the child is open.
            || unsafe { bindings::bdrv_co_pdiscard(filter::child(bs), offset, bytes) },
        )
    })
}
}

entries! {
fn recorder_co_flush(bs: *mut BlockDriverState) -> c_int {
    to_c("qcow2b-recorder flush", || {
        // SAFETY: called by the block layer in a coroutine of an open recorder node.
        let recorder = unsafe { recorder_of(bs) };
        // SAFETY: as above; the child and its node are open.
        let flush = || unsafe { bindings::bdrv_co_flush((*filter::child(bs)).bs) };
        // With cache.no-flush=on (what cache=unsafe sets, inherited by this node) the block
        // layer lets no flush reach the disk below: nothing is recorded, so that a harness
        // sees what such a node promises (nothing becomes durable before the process ends).
        // SAFETY: bs is an open node.
        if unsafe { (*bs).open_flags } & bindings::BDRV_O_NO_FLUSH as c_int != 0 {
            return Ok(flush());
        }
        recorder.around(Op::Flush, 0, 0, 0, None, flush)
    })
}
}

entries! {
fn recorder_co_barrier(
    bs: *mut BlockDriverState,
    flags: bindings::BdrvRequestFlags,
) -> c_int {
    to_c("qcow2b-recorder barrier", || {
        // SAFETY: called by the block layer in a coroutine of an open recorder node.
        let recorder = unsafe { recorder_of(bs) };
        recorder.around(Op::Barrier, 0, 0, 0, None, || {
            // SAFETY: as above; the child is open. file-posix below runs the primitive
            // registered for its node (this filter is skipped when it is looked up).
            unsafe { bindings::bdrv_co_barrier(filter::child(bs), flags) }
        })
    })
}
}

entries! {
fn recorder_co_truncate(
    bs: *mut BlockDriverState,
    offset: i64,
    exact: bool,
    prealloc: bindings::PreallocMode,
    flags: bindings::BdrvRequestFlags,
    errp: *mut *mut bindings::Error,
) -> c_int, errp = errp {
    // SAFETY: QEMU passes a valid node and errp; we run in a coroutine of the node.
    unsafe {
        to_c_errp("qcow2b-recorder truncate", errp, || {
            let recorder = recorder_of(bs);
            let seq = recorder
                .issue(Op::Truncate, prealloc, to_u64(offset), 0, None)
                .map_err(|e| Error::io("qcow2b-recorder: writing an issue record", e))?;
            let ret =
                bindings::bdrv_co_truncate(filter::child(bs), offset, exact, prealloc, flags, errp);
            let logged = recorder.complete(Op::Truncate, seq, ret);
            if ret < 0 {
                // errp already says why; the log's own failure must not set it twice.
                return Ok(ret);
            }
            logged.map_err(|e| Error::io("qcow2b-recorder: writing a completion record", e))?;
            Ok(ret)
        })
    }
}
}

/// Registers the `qcow2b-recorder` driver (from `qcow2b_register`).
pub fn register() {
    to_c("qcow2b-recorder register", || {
        let drv = BlockDriver {
            format_name: FORMAT_NAME.as_ptr(),
            instance_size: std::mem::size_of::<*mut Recorder>() as c_int,
            is_filter: true,
            has_variable_length: true,
            bdrv_open: Some(recorder_open),
            bdrv_close: Some(recorder_close),
            bdrv_reopen_prepare: Some(filter::reopen_prepare),
            bdrv_child_perm: Some(bindings::bdrv_default_perms),
            bdrv_getlength: Some(filter::getlength),
            bdrv_co_preadv_part: Some(filter::co_preadv_part),
            bdrv_co_pwritev_part: Some(recorder_co_pwritev_part),
            bdrv_co_pwritev_compressed_part: Some(recorder_co_pwritev_compressed_part),
            bdrv_co_pwrite_zeroes: Some(recorder_co_pwrite_zeroes),
            bdrv_co_pdiscard: Some(recorder_co_pdiscard),
            bdrv_co_flush: Some(recorder_co_flush),
            bdrv_co_barrier: Some(recorder_co_barrier),
            bdrv_co_truncate: Some(recorder_co_truncate),
            // No block_status: the block layer's default for filters asks the child.
            ..Default::default()
        };
        // The table lives for the whole process, as QEMU's static driver tables do.
        let drv: &'static mut BlockDriver = Box::leak(Box::new(drv));
        // SAFETY: drv is a fully initialised driver table that is never freed.
        unsafe { bindings::bdrv_register(drv) };
        Ok(0)
    });
}
