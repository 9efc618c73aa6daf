//! Persistent dirty bitmaps, the QEMU half: the bitmaps the image stores become QEMU's
//! `BdrvDirtyBitmap`s at open (which the block layer marks on every guest write), and are
//! written back at close, at inactivation (migration) and at a reopen to read-only; the
//! driver callbacks QMP and qemu-img go through (`block-dirty-bitmap-add persistent=true`,
//! `-remove`, `qemu-img bitmap`), and the bitmaps `qemu-img info` lists. What is stored where,
//! and in which order, is the engine's (`engine/image/bitmaps.rs`); this module moves bits
//! between it and QEMU, as QEMU's qcow2 does (block/qcow2-bitmap.c).
//!
//! Trust, as in QEMU: a bitmap found in use at open is created inconsistent, without its
//! bits (QEMU refuses to use it for a backup, and only its removal is allowed); one not in
//! use is loaded with its bits, the engine marks it in use before the first guest write, and
//! storing it clears the flag again. A read-only node's bitmaps are read-only in QEMU too.

use std::ffi::{c_char, c_int, CStr, CString};
use std::ptr;

use super::bindings::{self, BdrvDirtyBitmap, BlockDriverState};
use super::ffi::{entries, take_error};
use super::file::FileAccess;
use super::node::Node;
use crate::engine::format::bitmap::{data_bytes, entry_bytes};
use crate::engine::format::layout::{MAX_BITMAPS, MAX_BITMAP_DIRECTORY_BYTES};
use crate::engine::{bitmap_constraints, Error, Image, StoredBitmap};

/// A bitmap read from the image at open, before it is created in QEMU.
pub struct LoadedBitmap {
    name: CString,
    granularity: u32,
    enabled: bool,
    /// Its bits, or `None` for an inconsistent bitmap (in use from before this open).
    bits: Option<Vec<u8>>,
}

/// What an open loads: every bitmap of the directory, the consistent ones with their bits.
/// Run before the open writes anything (the engine marks them in use then), so that a
/// bitmap that does not read fails the open and changes nothing, as in QEMU's qcow2.
pub fn read_for_load(image: &Image<FileAccess>) -> Result<Vec<LoadedBitmap>, Error> {
    let mut out = Vec::new();
    for entry in image.bitmaps() {
        let name = CString::new(entry.name.clone()).map_err(|_| {
            Error::Invalid(format!(
                "bitmap name '{}' holds a NUL byte",
                entry.display_name()
            ))
        })?;
        let bits = if image.bitmap_consistent(&entry.name) {
            Some(image.read_bitmap(&entry.name).map_err(|e| {
                Error::Invalid(format!(
                    "Could not read bitmap '{}' from image: {e}",
                    entry.display_name()
                ))
            })?)
        } else {
            None
        };
        out.push(LoadedBitmap {
            name,
            granularity: entry.granularity() as u32,
            enabled: entry.auto(),
            bits,
        });
    }
    Ok(out)
}

/// Every dirty bitmap of the node, in QEMU's order.
///
/// # Safety
/// `bs` is an open node; the pointers are valid until a bitmap is released.
unsafe fn all_bitmaps(bs: *mut BlockDriverState) -> Vec<*mut BdrvDirtyBitmap> {
    let mut out = Vec::new();
    // SAFETY: per the caller (QEMU's FOR_EACH_DIRTY_BITMAP).
    unsafe {
        let mut bm = bindings::bdrv_dirty_bitmap_first(bs);
        while !bm.is_null() {
            out.push(bm);
            bm = bindings::bdrv_dirty_bitmap_next(bm);
        }
    }
    out
}

/// The name of a bitmap, as bytes.
///
/// # Safety
/// `bm` is a live bitmap (named: persistent bitmaps always are).
unsafe fn name_of<'a>(bm: *mut BdrvDirtyBitmap) -> &'a [u8] {
    // SAFETY: per the caller; a NULL name reads as empty.
    unsafe {
        let name = bindings::bdrv_dirty_bitmap_name(bm);
        if name.is_null() {
            return b"";
        }
        CStr::from_ptr(name).to_bytes()
    }
}

/// Creates the loaded bitmaps in QEMU (QEMU's `qcow2_load_dirty_bitmaps`): persistent,
/// inconsistent when they were in use, disabled when not AUTO, read-only on a read-only
/// node. An inconsistent bitmap QEMU already has (it came with an incoming migration) is
/// left to it. On failure every bitmap created here is released.
///
/// # Safety
/// `bs` is an open qcow2b node, outside any coroutine or in its own.
pub unsafe fn create_in_qemu(
    bs: *mut BlockDriverState,
    loaded: Vec<LoadedBitmap>,
    read_only: bool,
) -> Result<(), Error> {
    let mut created: Vec<*mut BdrvDirtyBitmap> = Vec::new();
    // SAFETY: per the caller; each bitmap pointer is one QEMU just made for this node.
    unsafe {
        for l in loaded {
            if l.bits.is_none() && !bindings::bdrv_find_dirty_bitmap(bs, l.name.as_ptr()).is_null()
            {
                continue;
            }
            let inconsistent = l.bits.is_none();
            let mut err = ptr::null_mut();
            let bm =
                bindings::bdrv_create_dirty_bitmap(bs, l.granularity, l.name.as_ptr(), &mut err);
            if bm.is_null() {
                for bm in created {
                    bindings::bdrv_release_dirty_bitmap(bm);
                }
                return Err(Error::Invalid(take_error(err)));
            }
            if let Some(mut bits) = l.bits {
                let size = bindings::bdrv_dirty_bitmap_size(bm).max(0) as u64;
                let len = bindings::bdrv_dirty_bitmap_serialization_size(bm, 0, size) as usize;
                bits.resize(len, 0);
                if size > 0 {
                    bindings::bdrv_dirty_bitmap_deserialize_part(
                        bm,
                        bits.as_mut_ptr(),
                        0,
                        size,
                        false,
                    );
                }
                bindings::bdrv_dirty_bitmap_deserialize_finish(bm);
            }
            bindings::bdrv_dirty_bitmap_set_persistence(bm, true);
            if inconsistent {
                bindings::bdrv_dirty_bitmap_set_inconsistent(bm);
            }
            if !l.enabled {
                bindings::bdrv_disable_dirty_bitmap(bm);
            }
            created.push(bm);
        }
        if read_only {
            for &bm in &created {
                bindings::bdrv_dirty_bitmap_set_readonly(bm, true);
            }
        }
    }
    Ok(())
}

/// Stores the node's persistent bitmaps that are writable and consistent (QEMU's
/// `qcow2_store_persistent_dirty_bitmaps`), in one engine operation; with `release`, every
/// persistent consistent bitmap is released afterwards (a close, an inactivation: the image
/// is no longer this node's to track).
///
/// # Safety
/// `bs` is an open qcow2b node and `image` its image, with no request in flight.
pub unsafe fn store(
    bs: *mut BlockDriverState,
    image: &mut Image<FileAccess>,
    release: bool,
) -> Result<(), Error> {
    let mut to_store = Vec::new();
    let mut stored = Vec::new();
    let virtual_size = image.virtual_size();
    // SAFETY: per the caller; the bitmaps are the node's, alive until released below.
    unsafe {
        for bm in all_bitmaps(bs) {
            if !bindings::bdrv_dirty_bitmap_get_persistence(bm)
                || bindings::bdrv_dirty_bitmap_inconsistent(bm)
            {
                continue;
            }
            stored.push(bm);
            if bindings::bdrv_dirty_bitmap_readonly(bm) {
                continue;
            }
            let granularity_bits =
                bindings::bdrv_dirty_bitmap_granularity(bm).trailing_zeros() as u8;
            let size = bindings::bdrv_dirty_bitmap_size(bm).max(0) as u64;
            let len = bindings::bdrv_dirty_bitmap_serialization_size(bm, 0, size) as usize;
            let mut data = vec![0u8; len];
            if size > 0 {
                bindings::bdrv_dirty_bitmap_serialize_part(bm, data.as_mut_ptr(), 0, size);
            }
            data.resize(data_bytes(virtual_size, granularity_bits) as usize, 0);
            to_store.push(StoredBitmap {
                name: name_of(bm).to_vec(),
                granularity_bits,
                enabled: bindings::bdrv_dirty_bitmap_enabled(bm),
                data,
            });
        }
    }
    if !to_store.is_empty() {
        if image.is_read_only() {
            return Err(Error::Refused {
                errno: libc::EINVAL,
                msg: "No write access".into(),
            });
        }
        image.store_bitmaps(&to_store)?;
    }
    if release {
        for bm in stored {
            // SAFETY: a bitmap of the node, released once.
            unsafe { bindings::bdrv_release_dirty_bitmap(bm) };
        }
    }
    Ok(())
}

/// A reopen to read-only (QEMU's `qcow2_reopen_bitmaps_ro`): the bitmaps stored, then every
/// persistent one read-only.
///
/// # Safety
/// As [`store`].
pub unsafe fn reopen_read_only(
    bs: *mut BlockDriverState,
    image: &mut Image<FileAccess>,
) -> Result<(), Error> {
    // SAFETY: per the caller.
    unsafe {
        store(bs, image, false)?;
        for bm in all_bitmaps(bs) {
            if bindings::bdrv_dirty_bitmap_get_persistence(bm) {
                bindings::bdrv_dirty_bitmap_set_readonly(bm, true);
            }
        }
    }
    Ok(())
}

/// After a reopen to read-write (the engine marked the stored bitmaps in use): the node's
/// read-only persistent bitmaps the image names become writable (QEMU's
/// `qcow2_reopen_bitmaps_rw`). A bitmap of the image QEMU does not have is an error, as
/// there.
///
/// # Safety
/// As [`store`].
pub unsafe fn reopen_read_write(
    bs: *mut BlockDriverState,
    image: &Image<FileAccess>,
) -> Result<(), Error> {
    // SAFETY: per the caller.
    unsafe {
        for entry in image.bitmaps() {
            let Ok(name) = CString::new(entry.name.clone()) else {
                continue;
            };
            let bm = bindings::bdrv_find_dirty_bitmap(bs, name.as_ptr());
            if bm.is_null() {
                return Err(Error::Invalid(format!(
                    "Unexpected bitmap '{}' in the image",
                    entry.display_name()
                )));
            }
            if bindings::bdrv_dirty_bitmap_readonly(bm) {
                bindings::bdrv_dirty_bitmap_set_readonly(bm, false);
            }
        }
    }
    Ok(())
}

/// Refuses a resize while a bitmap of the image is not in memory, or in memory but
/// inconsistent or read-only (QEMU's `qcow2_truncate_bitmaps_check`): the block layer
/// resizes the bitmaps it has, and only those.
///
/// # Safety
/// `bs` is an open qcow2b node whose image is `image`.
pub unsafe fn check_resize(
    bs: *mut BlockDriverState,
    image: &Image<FileAccess>,
) -> Result<(), Error> {
    for entry in image.bitmaps() {
        let Ok(name) = CString::new(entry.name.clone()) else {
            continue;
        };
        // SAFETY: per the caller.
        let bm = unsafe { bindings::bdrv_find_dirty_bitmap(bs, name.as_ptr()) };
        if bm.is_null() {
            return Err(Error::Unsupported(
                "Cannot resize qcow2 with persistent bitmaps that were not loaded into memory"
                    .into(),
            ));
        }
        // SAFETY: a live bitmap of the node.
        let (inconsistent, read_only) = unsafe {
            (
                bindings::bdrv_dirty_bitmap_inconsistent(bm),
                bindings::bdrv_dirty_bitmap_readonly(bm),
            )
        };
        if inconsistent {
            return Err(Error::Unsupported(format!(
                "Bitmap '{}' is inconsistent and cannot be used",
                entry.display_name()
            )));
        }
        if read_only {
            return Err(Error::Unsupported(format!(
                "Bitmap '{}' is readonly and cannot be modified",
                entry.display_name()
            )));
        }
    }
    Ok(())
}

/// `qemu-img info`'s bitmap list (QEMU's `qcow2_get_bitmap_info_list`): name, granularity
/// and flags as the directory on storage has them; NULL without bitmaps.
///
/// # Safety
/// The result is a QAPI list allocated with glib, freed with the info that holds it.
pub unsafe fn info_list(image: &Image<FileAccess>) -> *mut bindings::Qcow2BitmapInfoList {
    let mut head: *mut bindings::Qcow2BitmapInfoList = ptr::null_mut();
    let mut tail: *mut *mut bindings::Qcow2BitmapInfoList = &mut head;
    // SAFETY: every object is zero-initialised by glib (a valid empty QAPI value) and
    // linked once.
    unsafe {
        for entry in image.bitmaps() {
            let name = CString::new(entry.name.clone()).unwrap_or_default();
            let info: *mut bindings::Qcow2BitmapInfo = qapi_new();
            (*info).name = bindings::g_strdup(name.as_ptr() as *const c_char);
            (*info).granularity = entry.granularity() as u32;
            let mut flags_tail: *mut *mut bindings::Qcow2BitmapInfoFlagsList = &mut (*info).flags;
            for (set, flag) in [
                (entry.in_use(), bindings::QCOW2_BITMAP_INFO_FLAGS_IN_USE),
                (entry.auto(), bindings::QCOW2_BITMAP_INFO_FLAGS_AUTO),
            ] {
                if set {
                    let f: *mut bindings::Qcow2BitmapInfoFlagsList = qapi_new();
                    (*f).value = flag;
                    *flags_tail = f;
                    flags_tail = &mut (*f).next;
                }
            }
            let item: *mut bindings::Qcow2BitmapInfoList = qapi_new();
            (*item).value = info;
            *tail = item;
            tail = &mut (*item).next;
        }
    }
    head
}

/// A zeroed QAPI object allocated with glib.
///
/// # Safety
/// `T` is a QAPI C struct, for which all zeros is a valid value.
unsafe fn qapi_new<T>() -> *mut T {
    // SAFETY: per the caller; g_malloc0 aborts rather than return NULL.
    unsafe { bindings::g_malloc0(std::mem::size_of::<T>() as u64).cast() }
}

entries! {
/// Whether the node can keep persistent bitmaps: version 3 images (the autoclear bits).
pub fn qcow2b_supports_persistent_dirty_bitmap(bs: *mut BlockDriverState) -> bool {
    // SAFETY: QEMU asks about an open qcow2b node; only the header's version is read.
    unsafe { Node::of(bs).image_drained() }.supports_bitmaps()
}

/// Whether a new persistent bitmap `name` of `granularity` fits in the image (QEMU's
/// `qcow2_co_can_store_new_dirty_bitmap`), with QEMU's messages.
pub fn qcow2b_co_can_store_new_dirty_bitmap(
    bs: *mut BlockDriverState,
    name: *const c_char,
    granularity: u32,
    errp: *mut *mut bindings::Error,
) -> Result<bool, Error>, errp = errp {
    // SAFETY: QEMU passes an open node, a NUL-terminated name, and runs us in a coroutine.
    unsafe {
        let name_bytes = CStr::from_ptr(name).to_bytes();
        let fail = |why: String| -> Result<bool, Error> {
            let node_name = CStr::from_ptr(bindings::bdrv_get_device_or_node_name(bs));
            Err(Error::BadOption(format!(
                "Can't make bitmap '{}' persistent in '{}': {why}",
                String::from_utf8_lossy(name_bytes),
                node_name.to_string_lossy()
            )))
        };
        if !bindings::bdrv_find_dirty_bitmap(bs, name).is_null() {
            return Err(Error::BadOption(format!(
                "Bitmap already exists: {}",
                String::from_utf8_lossy(name_bytes)
            )));
        }
        let node = Node::of(bs);
        let mut locked = node.lock()?;
        let image = locked.image();
        if !image.supports_bitmaps() {
            return fail("Cannot store dirty bitmaps in qcow2 v2 files".into());
        }
        let bits = granularity.trailing_zeros() as u8;
        if let Some(why) =
            bitmap_constraints(name_bytes, bits, image.cluster_size(), image.virtual_size())
        {
            return fail(why);
        }
        let mut count = 1u64;
        let mut directory_bytes = entry_bytes(name_bytes.len(), 0) as u64;
        for bm in all_bitmaps(bs) {
            if bindings::bdrv_dirty_bitmap_get_persistence(bm) {
                count += 1;
                directory_bytes += entry_bytes(name_of(bm).len(), 0) as u64;
            }
        }
        if count > u64::from(MAX_BITMAPS) {
            return fail("Maximum number of persistent bitmaps is already reached".into());
        }
        if directory_bytes > MAX_BITMAP_DIRECTORY_BYTES {
            return fail("Not enough space in the bitmap directory".into());
        }
        Ok(true)
    }
}

/// Removes the persistent bitmap `name` from the image (QEMU's
/// `qcow2_co_remove_persistent_dirty_bitmap`); one not in the image is no error.
pub fn qcow2b_co_remove_persistent_dirty_bitmap(
    bs: *mut BlockDriverState,
    name: *const c_char,
    errp: *mut *mut bindings::Error,
) -> Result<c_int, Error>, errp = errp {
    // SAFETY: QEMU passes an open node and a NUL-terminated name, in a coroutine.
    unsafe {
        let name = CStr::from_ptr(name).to_bytes();
        let node = Node::of(bs);
        if !node.image_drained().bitmaps().iter().any(|e| e.name == name) {
            return Ok(0);
        }
        node.drain_ordered_buffer("remove a bitmap")?;
        let mut locked = node.lock()?;
        // As a resize: an open transaction group commits first, with no write between its
        // plan and its finish.
        while locked.image().group_open() && locked.image().has_write_plans_in_flight() {
            locked.image().request_commit();
            locked.wait_for_allocations();
        }
        let removed = locked.image().remove_bitmap(name);
        locked.wake_allocation_waiters();
        removed
            .map(|_| 0)
            .map_err(|e| Error::Invalid(format!("Failed to update bitmap extension: {e}")))
    }
}
}
