//! What the project's filter drivers (`qcow2b-recorder`, `qcow2b-synclat`) do alike: they
//! sit on one `file` child and pass reads, the length and reopening through unchanged.

use super::ffi::entries;
use std::ffi::c_int;

use super::bindings::{self, BlockDriverState, QEMUIOVector};

/// The `file` child of a filter node.
///
/// # Safety
/// `bs` is an open filter node (its child was attached at open).
pub unsafe fn child(bs: *mut BlockDriverState) -> *mut bindings::BdrvChild {
    // SAFETY: per the caller.
    unsafe { (*bs).file }
}

entries! {
pub fn getlength(bs: *mut BlockDriverState) -> i64 {
    // SAFETY: the block layer asks only open nodes; their child is open.
    unsafe { bindings::bdrv_getlength((*child(bs)).bs) }
}
}

entries! {
pub fn co_preadv_part(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
    flags: bindings::BdrvRequestFlags,
) -> c_int {
    // SAFETY: called by the block layer in a coroutine of an open node, with a qiov of
    // `bytes` bytes from qiov_offset; forwarded as it came.
    unsafe { bindings::bdrv_co_preadv_part(child(bs), offset, bytes, qiov, qiov_offset, flags) }
}
}

entries! {
/// Nothing of the filter's own changes on reopen (the block layer reopens the child).
pub fn reopen_prepare(
    _state: *mut bindings::BDRVReopenState,
    _queue: *mut bindings::BlockReopenQueue,
    _errp: *mut *mut bindings::Error,
) -> c_int {
    0
}
}
