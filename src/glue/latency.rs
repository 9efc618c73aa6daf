//! `qcow2b-synclat`: a filter that makes every host fdatasync cost a fixed extra time, the
//! flush-latency model of the paper benchmark (`bench/paper-bench.py`).
//!
//! The paper measured on a SATA SSD (Samsung 850 Pro), where a cache flush costs
//! milliseconds; the disks of build machines are often virtual and answer a flush in about a
//! hundred microseconds, which hides what sync amplification costs. Placed between a format
//! driver (QEMU's `qcow2` or `qcow2b`) and its file, the filter charges `flush-latency-ms`
//! to each flush that will reach the disk, the same for every format driver above it:
//!
//! ```text
//! --image-opts driver=qcow2b,file.driver=qcow2b-synclat,file.flush-latency-ms=2,file.file.filename=IMG
//! ```
//!
//! What it does, request by request:
//! - reads, writes, zero writes and discards: forwarded unchanged, no delay;
//! - a flush: the block layer calls `bdrv_co_flush_to_disk` only when something was written
//!   through this node since its last flush, which is exactly when file-posix below will
//!   call fdatasync (every write to the file passes through here). The filter sleeps there
//!   (`qemu_co_sleep_ns`, the coroutine yields: other requests go on meanwhile), then the
//!   block layer flushes the file;
//! - a barrier: forwarded without delay when the protocol node below has a barrier primitive
//!   registered (a qcow2b `barrierfs` node above: not a sync); otherwise file-posix answers it
//!   with an fdatasync, which is charged like a flush.
//!
//! It is a model, not a measurement: the numbers it produces are labelled so wherever they
//! appear.

use std::ffi::{c_int, CStr};
use std::ptr;

use super::bindings::{self, BlockDriver, BlockDriverState, QDict, QEMUIOVector};
use super::ffi::{entries, to_c, to_c_errp};
use super::filter;
use super::opts::{leak_list, number_opt, Opts, OptsListCell};
use crate::engine::Error;
use crate::ordering::primitive;

const FLUSH_LATENCY_MS: &CStr = c"flush-latency-ms";
const FLUSH_LATENCY_US: &CStr = c"flush-latency-us";

fn runtime_opts() -> *mut bindings::QemuOptsList {
    static LIST: OptsListCell = OptsListCell::new();
    LIST.get_or_init(|| {
        leak_list::<3>(
            c"qcow2b-synclat",
            &[
                number_opt(
                    FLUSH_LATENCY_MS,
                    c"Extra time each host fdatasync costs, in milliseconds (a model of a slower disk)",
                ),
                number_opt(
                    FLUSH_LATENCY_US,
                    c"Extra time each host fdatasync costs, in microseconds (added to flush-latency-ms)",
                ),
            ],
        )
    })
}

/// The node's state in `bs->opaque` (`instance_size` bytes, zeroed by QEMU).
#[repr(C)]
struct SyncLatency {
    delay_ns: i64,
}

/// # Safety
/// `bs` is an open `qcow2b-synclat` node.
unsafe fn state(bs: *mut BlockDriverState) -> &'static SyncLatency {
    // SAFETY: per the caller, opaque holds a SyncLatency written at open.
    unsafe { &*((*bs).opaque as *const SyncLatency) }
}

/// Sleeps for the node's delay (in a coroutine: only this request waits).
///
/// # Safety
/// In a coroutine of `bs`'s AioContext; `bs` an open `qcow2b-synclat` node.
unsafe fn charge_sync(bs: *mut BlockDriverState) {
    // SAFETY: per the caller.
    let delay_ns = unsafe { state(bs) }.delay_ns;
    if delay_ns > 0 {
        let mut sleep = bindings::QemuCoSleep::default();
        // SAFETY: in a coroutine; `sleep` lives on this coroutine's stack until it returns.
        unsafe {
            bindings::qemu_co_sleep_ns_wakeable(&mut sleep, bindings::QEMU_CLOCK_REALTIME, delay_ns)
        };
    }
}

entries! {
fn synclat_open(
    bs: *mut BlockDriverState,
    options: *mut QDict,
    _flags: c_int,
    errp: *mut *mut bindings::Error,
) -> c_int, errp = errp {
    // SAFETY: QEMU passes a valid node, options and errp.
    unsafe {
        to_c_errp("synclat open", errp, || {
            let ret =
                bindings::bdrv_open_file_child(ptr::null(), options, c"file".as_ptr(), bs, errp);
            if ret < 0 {
                return Ok(ret);
            }
            let Some(opts) = Opts::absorb(runtime_opts(), options, errp) else {
                return Ok(-libc::EINVAL);
            };
            let ms = opts.number(FLUSH_LATENCY_MS).unwrap_or(0);
            let us = opts.number(FLUSH_LATENCY_US).unwrap_or(0);
            let delay_ns = ms
                .checked_mul(1_000_000)
                .and_then(|ns| ns.checked_add(us.checked_mul(1_000)?))
                .and_then(|ns| i64::try_from(ns).ok())
                .ok_or_else(|| Error::BadOption("flush latency out of range".into()))?;
            (*((*bs).opaque as *mut SyncLatency)).delay_ns = delay_ns;
            let below = (*(*bs).file).bs;
            (*bs).supported_write_flags = (*below).supported_write_flags;
            (*bs).supported_zero_flags = (*below).supported_zero_flags;
            Ok(0)
        })
    }
}
}

entries! {
fn synclat_close(_bs: *mut BlockDriverState) -> () {}
}

entries! {
fn synclat_co_pwritev_part(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
    flags: bindings::BdrvRequestFlags,
) -> c_int {
    // SAFETY: as for reads.
    unsafe {
        bindings::bdrv_co_pwritev_part(filter::child(bs), offset, bytes, qiov, qiov_offset, flags)
    }
}
}

entries! {
fn synclat_co_pwrite_zeroes(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
    flags: bindings::BdrvRequestFlags,
) -> c_int {
    // SAFETY: as for reads.
    unsafe { bindings::bdrv_co_pwrite_zeroes(filter::child(bs), offset, bytes, flags) }
}
}

entries! {
fn synclat_co_pdiscard(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
) -> c_int {
    // SAFETY: as for reads.
    unsafe { bindings::bdrv_co_pdiscard(filter::child(bs), offset, bytes) }
}
}

entries! {
fn synclat_co_flush_to_disk(bs: *mut BlockDriverState) -> c_int {
    // Called only when something was written since the last flush; the block layer flushes
    // the file child (fdatasync) right after this returns.
    // SAFETY: in a coroutine of an open node.
    unsafe { charge_sync(bs) };
    0
}
}

entries! {
fn synclat_co_barrier(
    bs: *mut BlockDriverState,
    flags: bindings::BdrvRequestFlags,
) -> c_int {
    // SAFETY: in a coroutine of an open node; the file child is open.
    unsafe {
        let protocol = bindings::bdrv_skip_filters((*filter::child(bs)).bs) as usize;
        if primitive::registered(protocol).is_none() {
            // file-posix answers a barrier without a primitive with fdatasync.
            charge_sync(bs);
        }
        bindings::bdrv_co_barrier(filter::child(bs), flags)
    }
}
}

static FORMAT_NAME: &CStr = c"qcow2b-synclat";

/// Registers the `qcow2b-synclat` filter (from `qcow2b_register`).
pub fn register() {
    to_c("register synclat", || {
        let drv = BlockDriver {
            format_name: FORMAT_NAME.as_ptr(),
            instance_size: std::mem::size_of::<SyncLatency>() as c_int,
            is_filter: true,
            bdrv_open: Some(synclat_open),
            bdrv_close: Some(synclat_close),
            bdrv_reopen_prepare: Some(filter::reopen_prepare),
            bdrv_child_perm: Some(bindings::bdrv_default_perms),
            bdrv_getlength: Some(filter::getlength),
            bdrv_co_preadv_part: Some(filter::co_preadv_part),
            bdrv_co_pwritev_part: Some(synclat_co_pwritev_part),
            bdrv_co_pwrite_zeroes: Some(synclat_co_pwrite_zeroes),
            bdrv_co_pdiscard: Some(synclat_co_pdiscard),
            bdrv_co_flush_to_disk: Some(synclat_co_flush_to_disk),
            bdrv_co_barrier: Some(synclat_co_barrier),
            ..Default::default()
        };
        let drv: &'static mut BlockDriver = Box::leak(Box::new(drv));
        // SAFETY: drv is a fully initialised driver table that is never freed.
        unsafe { bindings::bdrv_register(drv) };
        Ok(0)
    });
}
