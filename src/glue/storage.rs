//! The engine's storage traits over QEMU block-layer objects other than the image file
//! (which is `file.rs`): the backing child, and the BlockBackend of an image being created.
//!
//! `bdrv_pread` and friends are QEMU's generated coroutine wrappers: inside a coroutine they
//! call the `bdrv_co_*` function directly (yielding while the I/O is in flight), outside one
//! (open, close) they create a coroutine and poll the AioContext until it finishes. So the
//! same storage works on both paths.

use std::io;

use super::bindings::{self, BdrvChild};
use crate::engine::{Backing, Storage};

/// The `backing` child of a qcow2b node.
pub struct ChildStorage {
    child: *mut BdrvChild,
}

impl ChildStorage {
    /// # Safety
    /// `child` must be a valid child of an open node and outlive the returned value.
    pub unsafe fn new(child: *mut BdrvChild) -> Self {
        ChildStorage { child }
    }
}

fn check(ret: i32) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::from_raw_os_error(-ret))
    } else {
        Ok(())
    }
}

fn check_len(len: usize) -> io::Result<i64> {
    i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl ChildStorage {
    fn pread(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let offset =
            i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // Reads past the end of the file: the block layer zero-fills them for format children.
        // SAFETY: self.child is valid (constructor contract); buf is valid for buf.len() bytes.
        check(unsafe {
            bindings::bdrv_pread(
                self.child,
                offset,
                check_len(buf.len())?,
                buf.as_mut_ptr().cast(),
                0,
            )
        })
    }
}

impl Backing for ChildStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // A backing image shorter than this one reads as zeros past its end.
        // SAFETY: the child and its node are open while the image is.
        let len = unsafe { bindings::bdrv_getlength((*self.child).bs) };
        let len = u64::try_from(len).map_err(|_| io::Error::from_raw_os_error(-(len as i32)))?;
        let avail = len.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        self.pread(offset, head)?;
        tail.fill(0);
        Ok(())
    }
}

/// A `BlockBackend` on a protocol node: the storage of an image being created (opened by
/// name for `qemu-img create`, on a given node for `blockdev-create`).
pub struct BlkStorage {
    blk: *mut bindings::BlockBackend,
}

impl BlkStorage {
    /// Opens `filename` (a protocol node, read-write and resizable) for image creation.
    ///
    /// # Safety
    /// `filename` is a valid C string; `errp` is NULL or valid.
    pub unsafe fn open(
        filename: *const std::ffi::c_char,
        errp: *mut *mut bindings::Error,
    ) -> Option<BlkStorage> {
        let flags = bindings::BDRV_O_RDWR | bindings::BDRV_O_RESIZE | bindings::BDRV_O_PROTOCOL;
        // SAFETY: per the caller; NULL reference and options are allowed.
        let blk = unsafe {
            bindings::blk_new_open(
                filename,
                std::ptr::null(),
                std::ptr::null_mut(),
                flags as i32,
                errp,
            )
        };
        if blk.is_null() {
            return None;
        }
        // SAFETY: blk was just opened; creation writes tables past the current end.
        unsafe { bindings::blk_set_allow_write_beyond_eof(blk, true) };
        Some(BlkStorage { blk })
    }
}

impl BlkStorage {
    /// A backend on the open node `bs` (`blockdev-create`'s `file` or `data-file`), with the
    /// permissions creation needs: write and resize, sharing everything (as QEMU's qcow2).
    ///
    /// # Safety
    /// `bs` is an open node the caller holds a reference to; `errp` is NULL or valid.
    pub unsafe fn on_node(
        bs: *mut bindings::BlockDriverState,
        errp: *mut *mut bindings::Error,
    ) -> Option<BlkStorage> {
        let perm = u64::from(bindings::BLK_PERM_WRITE | bindings::BLK_PERM_RESIZE);
        // SAFETY: per the caller; the backend takes a reference of its own to the node.
        let blk =
            unsafe { bindings::blk_new_with_bs(bs, perm, u64::from(bindings::BLK_PERM_ALL), errp) };
        if blk.is_null() {
            return None;
        }
        // SAFETY: blk was just made; creation writes tables past the current end.
        unsafe { bindings::blk_set_allow_write_beyond_eof(blk, true) };
        Some(BlkStorage { blk })
    }
}

impl Drop for BlkStorage {
    fn drop(&mut self) {
        // SAFETY: the backend was opened in `open` and is released once.
        unsafe { bindings::blk_unref(self.blk) };
    }
}

impl Storage for BlkStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        // SAFETY: blk is open; buf is valid for writes of buf.len() bytes.
        check(unsafe {
            bindings::blk_pread(
                self.blk,
                i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
                check_len(buf.len())?,
                buf.as_mut_ptr().cast(),
                0,
            )
        })
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        // SAFETY: blk is open; buf is valid for reads of buf.len() bytes.
        check(unsafe {
            bindings::blk_pwrite(
                self.blk,
                i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
                check_len(buf.len())?,
                buf.as_ptr().cast(),
                0,
            )
        })
    }

    fn flush(&self) -> io::Result<()> {
        // SAFETY: blk is open.
        check(unsafe { bindings::blk_flush(self.blk) })
    }

    fn len(&self) -> io::Result<u64> {
        // SAFETY: blk is open.
        let len = unsafe { bindings::blk_getlength(self.blk) };
        u64::try_from(len).map_err(|_| io::Error::from_raw_os_error(-(len as i32)))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.truncate(len, bindings::PREALLOC_MODE_OFF)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        // The protocol driver reserves the space (fallocate for files), as QEMU's qcow2 does
        // for preallocation=falloc; a range inside the file is already backed.
        let end = offset.saturating_add(len);
        if end <= self.len()? {
            return Ok(());
        }
        self.truncate(end, bindings::PREALLOC_MODE_FALLOC)
    }
}

impl BlkStorage {
    fn truncate(&self, len: u64, prealloc: bindings::PreallocMode) -> io::Result<()> {
        let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: blk is open; errp NULL keeps only the errno.
        check(unsafe {
            bindings::blk_truncate(self.blk, len, false, prealloc, 0, std::ptr::null_mut())
        })
    }
}
