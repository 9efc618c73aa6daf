//! The C entry point file-posix calls for `bdrv_co_barrier` (qemu-patches/0005): the host
//! barrier primitive registered for the node (`ordering::primitive`), or fdatasync.

use std::ffi::c_int;

use super::bindings::BlockDriverState;
use super::ffi::entries;
use crate::ordering::primitive;

entries! {
/// Runs the host barrier of protocol node `bs`, open as `fd`. Called from a worker thread of
/// QEMU's thread pool: it may block. Returns 0 or -errno.
///
/// # Safety
/// `bs` is only used as a key, never dereferenced; `fd` is an open descriptor.
#[no_mangle]
pub fn qcow2b_host_barrier(bs: *mut BlockDriverState, fd: c_int) -> c_int {
    match primitive::host_barrier(bs as usize, fd) {
        Ok(()) => 0,
        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
    }
}
}
