//! The `qcow2b` BlockDriver: QEMU's callbacks, each a thin trampoline into the engine.
//!
//! Every callback follows one shape: recover the node's [`State`] from `bs->opaque`, run the
//! body inside [`ffi::guard`] (no panic reaches C; errors become `-errno` there), and for
//! requests, hold the node's `CoMutex` around the engine call. The engine is not re-entrant:
//! a coroutine that yields inside it (waiting for I/O) keeps the mutex, so a second request
//! on the same node waits in `qemu_co_mutex_lock` rather than seeing half-updated metadata.
//!
//! Format probing is left to QEMU's qcow2 (no `bdrv_probe`): qcow2b drives the same on-disk
//! format and is used only when asked for by name.

use std::ffi::{c_char, c_int, CStr};
use std::ptr;

use super::bindings::{
    self, BdrvChild, BlockDriver, BlockDriverInfo, BlockDriverState, QDict, QEMUIOVector,
};
use super::ffi::{guard, guard_errp};
use super::storage::ChildStorage;
use crate::engine::{Error, Image, Mapping, OpenOptions};

/// What qcow2b keeps per open node; `bs->opaque` holds a pointer to it.
struct State {
    image: Image<ChildStorage>,
    /// Serialises engine calls between coroutines of this node (see the module comment).
    lock: bindings::CoMutex,
}

/// # Safety
/// `bs` must be a node opened by [`qcow2b_open`] and not yet closed.
unsafe fn state<'a>(bs: *mut BlockDriverState) -> &'a mut State {
    // SAFETY: qcow2b_open stored a Box<State> pointer in the opaque area (instance_size is one
    // pointer); it stays valid until qcow2b_close.
    unsafe { &mut **((*bs).opaque as *mut *mut State) }
}

/// Runs `f` with the node's engine while holding its CoMutex.
///
/// # Safety
/// Must run in a coroutine of the node's AioContext; `bs` as for [`state`].
unsafe fn with_image<T>(
    bs: *mut BlockDriverState,
    f: impl FnOnce(&mut Image<ChildStorage>, Option<ChildStorage>) -> T,
) -> T {
    // SAFETY: the caller's contract.
    let st = unsafe { state(bs) };
    // SAFETY: the mutex was initialised in open and lives as long as the State.
    unsafe { bindings::qemu_co_mutex_lock(&mut st.lock) };
    // SAFETY: bs is valid; a backing child, when present, stays attached while requests run.
    let backing = unsafe { backing_of(bs) };
    let out = f(&mut st.image, backing);
    // SAFETY: locked above by this coroutine.
    unsafe { bindings::qemu_co_mutex_unlock(&mut st.lock) };
    out
}

/// # Safety
/// `bs` must be a valid node.
unsafe fn backing_of(bs: *mut BlockDriverState) -> Option<ChildStorage> {
    // SAFETY: bs is valid per the caller.
    let child: *mut BdrvChild = unsafe { (*bs).backing };
    // SAFETY: a non-NULL backing child is valid while attached.
    (!child.is_null()).then(|| unsafe { ChildStorage::new(child) })
}

/// Copies `value` into a fixed C char array, truncating and NUL-terminating.
fn set_c_string(dst: &mut [c_char], value: &str) -> Result<(), Error> {
    if value.len() >= dst.len() {
        return Err(Error::Invalid(format!(
            "backing file name of {} bytes is too long",
            value.len()
        )));
    }
    for (d, s) in dst.iter_mut().zip(value.bytes()) {
        *d = s as c_char;
    }
    dst[value.len()] = 0;
    Ok(())
}

unsafe extern "C" fn qcow2b_open(
    bs: *mut BlockDriverState,
    options: *mut QDict,
    flags: c_int,
    errp: *mut *mut bindings::Error,
) -> c_int {
    // SAFETY: QEMU passes a valid node, options and errp.
    unsafe {
        guard_errp("open", errp, || {
            let ret =
                bindings::bdrv_open_file_child(ptr::null(), options, c"file".as_ptr(), bs, errp);
            if ret < 0 {
                // errp already says why.
                return Ok(ret);
            }
            let read_only = flags & bindings::BDRV_O_RDWR as c_int == 0;
            let opts = OpenOptions {
                read_only,
                ..OpenOptions::default()
            };
            let image = Image::open(ChildStorage::new((*bs).file), &opts)?;

            (*bs).total_sectors = (image.virtual_size() / 512) as i64;
            if let Some(name) = image.backing_file() {
                set_c_string(&mut (*bs).backing_file, name)?;
                set_c_string(&mut (*bs).auto_backing_file, name)?;
                if let Some(fmt) = image.backing_format() {
                    set_c_string(&mut (*bs).backing_format, fmt)?;
                }
            }
            let st = Box::into_raw(Box::new(State {
                image,
                lock: Default::default(),
            }));
            bindings::qemu_co_mutex_init(&mut (*st).lock);
            *((*bs).opaque as *mut *mut State) = st;
            Ok(0)
        })
    }
}

unsafe extern "C" fn qcow2b_close(bs: *mut BlockDriverState) {
    // SAFETY: QEMU closes only nodes it opened; the pointer is taken out so nothing uses it again.
    let st = unsafe {
        let slot = (*bs).opaque as *mut *mut State;
        let st = *slot;
        *slot = ptr::null_mut();
        st
    };
    if st.is_null() {
        return;
    }
    // SAFETY: st came from Box::into_raw in qcow2b_open.
    let st = unsafe { Box::from_raw(st) };
    let ret = guard("close", move || st.image.close().map(|_| 0));
    if ret < 0 {
        eprintln!(
            "qcow2b: writing metadata back on close failed: {}",
            std::io::Error::from_raw_os_error(-ret)
        );
    }
}

unsafe extern "C" fn qcow2b_co_preadv_part(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
    _flags: bindings::BdrvRequestFlags,
) -> c_int {
    guard("read", || {
        let mut buf = vec![0u8; bytes as usize];
        // SAFETY: called by the block layer in a coroutine of a node we opened.
        unsafe {
            with_image(bs, |img, backing| {
                img.read(offset as u64, &mut buf, backing.as_ref().map(|b| b as _))
            })
        }?;
        // SAFETY: the qiov has room for `bytes` bytes from qiov_offset (block-layer contract).
        unsafe { bindings::qemu_iovec_from_buf(qiov, qiov_offset, buf.as_ptr().cast(), buf.len()) };
        Ok(0)
    })
}

unsafe extern "C" fn qcow2b_co_pwritev_part(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
    _flags: bindings::BdrvRequestFlags,
) -> c_int {
    guard("write", || {
        let mut buf = vec![0u8; bytes as usize];
        // SAFETY: the qiov holds `bytes` bytes from qiov_offset (block-layer contract).
        unsafe {
            bindings::qemu_iovec_to_buf(qiov, qiov_offset, buf.as_mut_ptr().cast(), buf.len())
        };
        // SAFETY: called by the block layer in a coroutine of a node we opened.
        unsafe {
            with_image(bs, |img, backing| {
                img.write(offset as u64, &buf, backing.as_ref().map(|b| b as _))
            })
        }?;
        Ok(0)
    })
}

unsafe extern "C" fn qcow2b_co_flush_to_os(bs: *mut BlockDriverState) -> c_int {
    // The engine's flush writes metadata back in order and syncs the file once; the block
    // layer's own flush of bs->file afterwards finds nothing new and costs no second sync.
    guard("flush", || {
        // SAFETY: called by the block layer in a coroutine of a node we opened.
        unsafe { with_image(bs, |img, _| img.flush()) }.map(|_| 0)
    })
}

unsafe extern "C" fn qcow2b_co_block_status(
    bs: *mut BlockDriverState,
    _want_zero: bool,
    offset: i64,
    bytes: i64,
    pnum: *mut i64,
    map: *mut i64,
    file: *mut *mut BlockDriverState,
) -> c_int {
    guard("block_status", || {
        // SAFETY: called in a coroutine of a node we opened.
        let (mapping, len) =
            unsafe { with_image(bs, |img, _| img.map(offset as u64, bytes as u64)) }?;
        // SAFETY: the out-pointers are valid (block-layer contract); bs->file is open.
        unsafe {
            *pnum = len as i64;
            Ok(match mapping {
                Mapping::Unallocated => 0,
                Mapping::Zero => bindings::BDRV_BLOCK_ZERO as c_int,
                Mapping::Compressed => bindings::BDRV_BLOCK_DATA as c_int,
                Mapping::Data { host_offset } => {
                    *map = host_offset as i64;
                    *file = (*(*bs).file).bs;
                    (bindings::BDRV_BLOCK_DATA | bindings::BDRV_BLOCK_OFFSET_VALID) as c_int
                }
            })
        }
    })
}

unsafe extern "C" fn qcow2b_get_info(
    bs: *mut BlockDriverState,
    bdi: *mut BlockDriverInfo,
) -> c_int {
    guard("get_info", || {
        // SAFETY: bs is an open qcow2b node and bdi a valid out-pointer.
        unsafe {
            (*bdi).cluster_size = state(bs).image.cluster_size() as c_int;
        }
        Ok(0)
    })
}

static FORMAT_NAME: &CStr = c"qcow2b";

/// Registers the `qcow2b` driver. Called once at start-up from QEMU's block/qcow2b.c
/// (`block_init`), before any image is opened.
#[no_mangle]
pub extern "C" fn qcow2b_register() {
    guard("register", || {
        let drv = BlockDriver {
            format_name: FORMAT_NAME.as_ptr(),
            instance_size: std::mem::size_of::<*mut State>() as c_int,
            is_format: true,
            supports_backing: true,
            bdrv_open: Some(qcow2b_open),
            bdrv_close: Some(qcow2b_close),
            bdrv_child_perm: Some(bindings::bdrv_default_perms),
            bdrv_co_preadv_part: Some(qcow2b_co_preadv_part),
            bdrv_co_pwritev_part: Some(qcow2b_co_pwritev_part),
            bdrv_co_flush_to_os: Some(qcow2b_co_flush_to_os),
            bdrv_co_block_status: Some(qcow2b_co_block_status),
            bdrv_get_info: Some(qcow2b_get_info),
            ..Default::default()
        };
        // The table lives for the whole process, as QEMU's static driver tables do.
        let drv: &'static mut BlockDriver = Box::leak(Box::new(drv));
        // SAFETY: drv is a fully initialised driver table that is never freed.
        unsafe { bindings::bdrv_register(drv) };
        Ok(0)
    });
}
