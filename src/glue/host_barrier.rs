//! The C entry point file-posix calls for `bdrv_co_barrier` (qemu-patches/0005): the host
//! barrier primitive registered for the node (`ordering::primitive`), or fdatasync.

use std::ffi::c_int;

use super::bindings::BlockDriverState;
use crate::ordering::primitive;

/// Runs the host barrier of protocol node `bs`, open as `fd`. Called from a worker thread of
/// QEMU's thread pool: it may block. Returns 0 or -errno.
///
/// # Safety
/// `bs` is only used as a key, never dereferenced; `fd` is an open descriptor.
#[no_mangle]
pub unsafe extern "C" fn qcow2b_host_barrier(bs: *mut BlockDriverState, fd: c_int) -> c_int {
    let result = std::panic::catch_unwind(|| primitive::host_barrier(bs as usize, fd));
    match result {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => -e.raw_os_error().unwrap_or(libc::EIO),
        Err(_) => -libc::EIO,
    }
}
