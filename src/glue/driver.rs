//! The `qcow2b` BlockDriver: QEMU's callbacks, each a thin trampoline into the engine.
//!
//! Every callback follows one shape: recover the node (`node.rs`), run the body inside
//! the one guard of `ffi::entries!` (no panic reaches C; errors become `-errno` there), and reach the
//! engine through the node's lock. Guest reads and writes are in `request.rs`.
//!
//! Format probing is left to QEMU's qcow2: qcow2b drives the same on-disk format and is used
//! only when asked for by name, unless the environment says `QCOW2B_PROBE=1` (see
//! [`qcow2b_probe`]).

use std::ffi::{c_char, c_int, CStr, CString};
use std::ptr;

use super::amend;
use super::bindings::{
    self, BDRVReopenState, BlockDriver, BlockDriverInfo, BlockDriverState, BlockReopenQueue, QDict,
    QEMUIOVector,
};
use super::bitmaps;
use super::cache_clean;
use super::create;
use super::crypto;
use super::epochs::Unsynced;
use super::ffi::{entries, to_c, to_c_errp};
use super::file::FileAccess;
use super::node::Node;
use super::opts::Opts;
use super::request;
use super::runtime_opts::{self, Settings};
use super::txg;
use crate::engine::format::entry::L2Width;
use crate::engine::format::header::{
    looks_like_qcow2, CompatibleFeatures, CompressionType, IncompatibleFeatures,
};
use crate::engine::{Backing, CheckFix, Error, Growth, Image, Mapping, Preallocation};
use crate::ordering::primitive::{self, Primitive};
use crate::ordering::BarrierMode;

/// Copies `value` (a name as the image stores it: bytes) into a fixed C char array,
/// NUL-terminated; refuses what does not fit.
fn set_c_string(dst: &mut [c_char], value: &[u8], what: &str) -> Result<(), Error> {
    if value.len() >= dst.len() {
        return Err(Error::Invalid(format!(
            "{what} of {} bytes is too long",
            value.len()
        )));
    }
    for (d, &s) in dst.iter_mut().zip(value) {
        *d = s as c_char;
    }
    dst[value.len()] = 0;
    Ok(())
}

/// Registers the barrier primitive of a barrierfs mode for the protocol node under `bs`
/// (through any filters), so that file-posix's barrier runs it. Returns that node.
///
/// # Safety
/// `bs` is a qcow2b node whose file child is open.
unsafe fn register_primitive(bs: *mut BlockDriverState, mode: BarrierMode) -> Option<usize> {
    let primitive = match mode {
        BarrierMode::BarrierFs { syscall } => Primitive::FdataBarrier { syscall },
        BarrierMode::Injected => Primitive::Injected,
        BarrierMode::Flush | BarrierMode::Ordered { .. } | BarrierMode::Txg(_) => return None,
    };
    // SAFETY: per the caller.
    let protocol = unsafe { bindings::bdrv_skip_filters((*(*bs).file).bs) } as usize;
    primitive::register(protocol, primitive);
    Some(protocol)
}

/// Publishes what QEMU's generic code reads from the node after open or a resize.
///
/// # Safety
/// `bs` valid.
pub(super) unsafe fn publish_image_fields(
    bs: *mut BlockDriverState,
    image: &Image<FileAccess>,
) -> Result<(), Error> {
    // SAFETY: per the caller.
    let bs = unsafe { &mut *bs };
    bs.total_sectors = (image.virtual_size() / 512) as i64;
    if let Some(name) = image.backing_file() {
        // Only a name that changed is published: after an incoming migration the image is
        // read anew (invalidate_cache), and auto_backing_file may hold what the block layer
        // made of a json: name; set again, the node's file name would turn into json: too.
        // SAFETY: backing_file is a NUL-terminated array.
        let current = unsafe { CStr::from_ptr(bs.backing_file.as_ptr()) };
        if current.to_bytes() != name {
            set_c_string(&mut bs.backing_file, name, "backing file name")?;
            set_c_string(&mut bs.auto_backing_file, name, "backing file name")?;
        }
        if let Some(fmt) = image.backing_format() {
            set_c_string(&mut bs.backing_format, fmt, "backing format")?;
        }
    }
    Ok(())
}

/// What [`open_data_file`] did.
enum DataFileChild {
    Opened(*mut bindings::BdrvChild),
    /// The image has no external data file, and none was named.
    None,
    /// Opening it failed; errp says why.
    Failed(c_int),
}

/// The external data file child, as QEMU's qcow2 opens it: the `data-file` option (a node or
/// its options), else the name the image's header records; refused for an image without one.
/// The image file then holds no guest data (its role loses `BDRV_CHILD_DATA`).
///
/// # Safety
/// `bs` is a qcow2b node whose `file` child is open; `options` and `errp` valid.
unsafe fn open_data_file(
    bs: *mut BlockDriverState,
    options: *mut QDict,
    file: &FileAccess,
    errp: *mut *mut bindings::Error,
) -> Result<DataFileChild, Error> {
    let header = Image::read_header(file)?;
    let open = |filename: *const c_char, allow_none: bool| {
        // SAFETY: per the caller; child_of_bds is QEMU's class for a node's children.
        unsafe {
            bindings::bdrv_open_child(
                filename,
                options,
                c"data-file".as_ptr(),
                bs,
                &bindings::child_of_bds,
                bindings::BDRV_CHILD_DATA,
                allow_none,
                errp,
            )
        }
    };
    let mut child = open(ptr::null(), true);
    // SAFETY: errp is valid; a set error means the open failed.
    if child.is_null() && unsafe { !(*errp).is_null() } {
        return Ok(DataFileChild::Failed(-libc::EINVAL));
    }
    if !header.has_data_file() {
        if !child.is_null() {
            return Err(Error::BadOption(
                "'data-file' can only be set for images with an external data file".into(),
            ));
        }
        return Ok(DataFileChild::None);
    }
    if child.is_null() {
        if let Some(name) = header.data_file_name() {
            let name = CString::new(name).map_err(|_| {
                Error::Invalid("the external data file name holds a NUL byte".into())
            })?;
            child = open(name.as_ptr(), false);
            if child.is_null() {
                return Ok(DataFileChild::Failed(-libc::EINVAL));
            }
        }
    }
    if child.is_null() {
        return Err(Error::BadOption(
            "'data-file' is required for this image".into(),
        ));
    }
    // SAFETY: the file child is open; no guest data in it from now on.
    unsafe {
        (*(*bs).file).role &= !bindings::BDRV_CHILD_DATA;
        let ret = bindings::bdrv_child_refresh_perms(bs, (*bs).file, errp);
        if ret < 0 {
            return Ok(DataFileChild::Failed(ret));
        }
    }
    Ok(DataFileChild::Opened(child))
}

entries! {
fn qcow2b_open(
    bs: *mut BlockDriverState,
    options: *mut QDict,
    flags: c_int,
    errp: *mut *mut bindings::Error,
) -> c_int, errp = errp {
    // SAFETY: QEMU passes a valid node, options and errp.
    unsafe {
        to_c_errp("open", errp, || {
            let ret =
                bindings::bdrv_open_file_child(ptr::null(), options, c"file".as_ptr(), bs, errp);
            if ret < 0 {
                // errp already says why.
                return Ok(ret);
            }
            let Some(opts) = Opts::absorb(runtime_opts::list(), options, errp) else {
                return Ok(-libc::EINVAL);
            };
            let settings = Settings::read(&opts, flags)?;
            let mode = settings.mode;
            let file = FileAccess::new(bs, mode);
            let data_file = match open_data_file(bs, options, &file, errp)? {
                DataFileChild::Opened(child) => Some(FileAccess::data_file(bs, child, &file)),
                DataFileChild::None => None,
                DataFileChild::Failed(ret) => return Ok(ret),
            };
            // The options are checked against the header, and an encrypted image's key
            // unlocked, before a read-write open writes anything (QEMU's qcow2 opens its
            // crypto layer while it reads the header extensions).
            let mut crypto = None;
            let mut refused = None;
            // An inactive node (an incoming migration's) writes nothing until it is activated
            // (invalidate_cache opens the image anew): the other side still owns the image.
            let inactive = flags & bindings::BDRV_O_INACTIVE as c_int != 0;
            let mut first_open = settings.open.clone();
            first_open.read_only |= inactive;
            // The bitmaps are read before the open writes anything (`bitmaps.rs`).
            let mut loaded = Vec::new();
            let opened = Image::open_with(file.clone(), data_file.clone(), &first_open, |image| {
                settings.check_image(image.header())?;
                match crypto::open(image, settings.key_secret.as_deref(), flags, errp) {
                    Ok(c) => {
                        crypto::attach(image, c.as_ref())?;
                        crypto = c;
                        if !inactive {
                            loaded = bitmaps::read_for_load(image)?;
                        }
                        Ok(())
                    }
                    Err(errno) => {
                        refused = Some(errno);
                        // *errp says why (QEMU's message); this error is not reported.
                        Err(Error::BadOption(String::new()))
                    }
                }
            });
            let image = match (opened, refused) {
                (Err(_), Some(errno)) => return Ok(errno),
                (opened, _) => opened?,
            };
            (*bs).encrypted = image.encryption().is_some();
            publish_image_fields(bs, &image)?;
            // The node's size is published: the bitmaps can be made (a failure drops the
            // image, which the open left clean).
            bitmaps::create_in_qemu(bs, loaded, image.is_read_only())?;
            // FUA is ours too (a whole flush after the request, `durable_now`): the block
            // layer's emulation flushes before the write counts as done, which the two
            // halves of a flush cannot tell from a flush with nothing new.
            (*bs).supported_zero_flags = bindings::BDRV_REQ_MAY_UNMAP
                | bindings::BDRV_REQ_NO_FALLBACK
                | bindings::BDRV_REQ_FUA;
            // Barrier writes are ours: the block layer hands them over instead of emulating.
            (*bs).supported_write_flags = bindings::BDRV_REQ_BARRIER | bindings::BDRV_REQ_FUA;
            // A growth over a longer backing file reads as zeros (Image::grow).
            (*bs).supported_truncate_flags = bindings::BDRV_REQ_ZERO_WRITE;
            let primitive_node = register_primitive(bs, mode);
            let mut node = Node::new(
                image,
                file,
                data_file,
                mode,
                primitive_node,
                settings.open,
                settings.cache_clean_interval,
            );
            node.crypto = crypto;
            let node = Box::into_raw(node);
            *((*bs).opaque as *mut *mut Node) = node;
            cache_clean::start(bs, &*node);
            Ok(0)
        })
    }
}
}

entries! {
fn qcow2b_close(bs: *mut BlockDriverState) -> () {
    // SAFETY: QEMU closes only nodes it opened, drained; nothing uses the node afterwards.
    let Some(node) = (unsafe { Node::take(bs) }) else {
        return;
    };
    // SAFETY: the node is drained and about to go.
    unsafe {
        txg::close(&node);
        cache_clean::stop(&node);
    }
    if let Some(protocol) = node.primitive_node {
        primitive::unregister(protocol);
    }
    // SAFETY: bs is valid for the whole call.
    if unsafe { (*bs).open_flags } & bindings::BDRV_O_INACTIVE as c_int != 0 {
        // Inactivated (migrated away): everything was written then, and the image belongs to
        // the other side now; writing here would break it (and QEMU asserts against it).
        return;
    }
    // SAFETY: bs is valid for the whole call; the node is drained.
    let stored = unsafe { bitmaps::store(bs, node.image_drained(), true) };
    if let Err(e) = stored {
        log::error!("Lost persistent bitmaps during inactivation of node: {e}");
    }
    if node.file.counters().errors.get() > 0 {
        // The file failed a request: one flush first, whose failure is not the end, as the
        // close writes everything back again and reports only its own failure. QEMU flushes
        // a node before closing it, but skips that when no write completed since the last
        // flush (the write that failed), so the close's write-back may be the first attempt
        // at what the failed write left dirty, and a transient error there (iotest 026,
        // ENOSPC injected once) would lose it. Without errors the close alone writes back,
        // with one sync.
        let _first_attempt = to_c("close", || {
            // SAFETY: the node is drained; nothing else runs on it.
            unsafe { node.image_drained() }.flush().map(|_| 0)
        });
    }
    let ret = to_c("close", move || node.into_image().close().map(|_storage| 0));
    if ret < 0 {
        log::error!(
            "qcow2b: writing metadata back on close failed: {}",
            std::io::Error::from_raw_os_error(-ret)
        );
    }
}
}

entries! {
fn qcow2b_co_preadv_part(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
    _flags: bindings::BdrvRequestFlags,
) -> c_int {
    to_c("read", || {
        // SAFETY: called by the block layer in a coroutine of a node we opened, with a qiov
        // of `bytes` bytes from qiov_offset (offsets and sizes are non-negative there).
        unsafe { request::read(bs, offset as u64, bytes as u64, qiov, qiov_offset) }.map(|_| 0)
    })
}
}

entries! {
fn qcow2b_co_pwritev_part(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
    flags: bindings::BdrvRequestFlags,
) -> c_int {
    let barrier = flags & bindings::BDRV_REQ_BARRIER != 0;
    to_c("write", || {
        // SAFETY: as for reads.
        unsafe {
            request::write(bs, offset as u64, bytes as u64, qiov, qiov_offset, barrier)?;
            if flags & bindings::BDRV_REQ_FUA != 0 {
                durable_now(bs)?;
            }
        }
        Ok(0)
    })
}
}

entries! {
fn qcow2b_co_pwritev_compressed_part(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
    qiov: *mut QEMUIOVector,
    qiov_offset: usize,
) -> c_int {
    to_c("compressed write", || {
        // SAFETY: as for reads (`bytes` may be 0: the end of a compressed stream).
        unsafe {
            request::write_compressed(bs, offset as u64, bytes as u64, qiov, qiov_offset)
        }
        .map(|_| 0)
    })
}
}

entries! {
fn qcow2b_co_barrier(
    bs: *mut BlockDriverState,
    flags: bindings::BdrvRequestFlags,
) -> c_int {
    let guest_flush = flags & bindings::BDRV_REQ_GUEST_FLUSH != 0;
    to_c("barrier", || {
        // SAFETY: called by the block layer in a coroutine of a node we opened.
        unsafe { request::barrier(bs, guest_flush) }.map(|_| 0)
    })
}
}

/// Runs a metadata-only change of a guest range once no allocation in flight overlaps it.
///
/// # Safety
/// In a coroutine of the node's AioContext; `bs` an open qcow2b node.
unsafe fn change_range(
    bs: *mut BlockDriverState,
    offset: u64,
    bytes: u64,
    change: impl FnOnce(&mut Image<FileAccess>) -> Result<(), Error>,
) -> Result<(), Error> {
    // SAFETY: per the caller.
    let node = unsafe { Node::of(bs) };
    // SAFETY: as above.
    let mut locked = unsafe { node.lock() }?;
    while locked.image().write_conflicts(offset, bytes) {
        locked.wait_for_allocations();
    }
    change(locked.image())?;
    let image = locked.image();
    let due = image.in_transaction_groups().then(|| image.group_is_due());
    drop(locked);
    if let Some(due) = due {
        // SAFETY: as above.
        unsafe { txg::after_write(bs, node, due) };
    }
    Ok(())
}

/// Whether a range covers whole clusters only (its end may be the end of the disk).
fn whole_clusters(image: &Image<FileAccess>, offset: u64, bytes: u64) -> bool {
    let mask = image.cluster_size() - 1;
    let end = offset + bytes;
    offset & mask == 0 && (end & mask == 0 || end == image.virtual_size())
}

entries! {
fn qcow2b_co_pwrite_zeroes(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
    flags: bindings::BdrvRequestFlags,
) -> c_int {
    let unmap = flags & bindings::BDRV_REQ_MAY_UNMAP != 0;
    to_c("write_zeroes", || {
        // SAFETY: called by the block layer in a coroutine of a node we opened.
        unsafe {
            change_range(bs, offset as u64, bytes as u64, |image| {
                // Zeros by table entries alone where QEMU's qcow2 uses them; for anything else
                // (Unsupported) the block layer writes zeros through the ordinary write path.
                image.zero_by_metadata(offset as u64, bytes as u64, unmap)
            })?;
            if flags & bindings::BDRV_REQ_FUA != 0 {
                durable_now(bs)?;
            }
        }
        Ok(0)
    })
}
}

entries! {
fn qcow2b_co_pdiscard(
    bs: *mut BlockDriverState,
    offset: i64,
    bytes: i64,
) -> c_int {
    to_c("discard", || {
        // SAFETY: called by the block layer in a coroutine of a node we opened.
        let has_backing = unsafe { !(*bs).backing.is_null() };
        // SAFETY: as above.
        unsafe {
            change_range(bs, offset as u64, bytes as u64, |image| {
                // On version 2 a discarded cluster reads from the backing file again, which
                // would show stale data: refused, as QEMU's qcow2 does. Partial clusters are
                // left alone (discard is advisory).
                if (image.header().version < 3 && has_backing)
                    || !whole_clusters(image, offset as u64, bytes as u64)
                {
                    return Err(Error::Unsupported("discard of this range".into()));
                }
                image.discard(offset as u64, bytes as u64)
            })
        }
        .map(|_| 0)
    })
}
}

/// Both halves of a guest flush at once: for a FUA request, and for a node that may not
/// flush (whose flush_to_disk the block layer never calls).
///
/// # Safety
/// In a coroutine of the node's AioContext; `bs` an open qcow2b node.
unsafe fn durable_now(bs: *mut BlockDriverState) -> Result<(), Error> {
    // SAFETY: per the caller.
    let node = unsafe { Node::of(bs) };
    // SAFETY: as above.
    unsafe { node.lock() }?.image().flush_to_os()?;
    // SAFETY: as above.
    unsafe { txg::commit(node, txg::Durability::Flush) }
}

entries! {
fn qcow2b_co_flush_to_os(bs: *mut BlockDriverState) -> c_int {
    // A guest flush in QEMU's two halves. This one writes the metadata back in order (in the
    // ordered mode into its epochs, which the writer takes on), and flush_to_disk below
    // makes it durable with one sync (txg: commits the group, two syncs or none). Between
    // them the block layer announces flush_to_disk (a blkdebug event), so an error injected
    // there meets the sync that follows, as with QEMU's qcow2; and the block layer's own
    // flush of bs->file afterwards finds nothing new and costs no second sync. A node that
    // may not flush (cache.no-flush=on) gets no second half: both run here then.
    to_c("flush", || {
        // SAFETY: called by the block layer in a coroutine of a node we opened.
        unsafe {
            if (*bs).open_flags & bindings::BDRV_O_NO_FLUSH as c_int != 0 {
                return durable_now(bs).map(|()| 0);
            }
            Node::of(bs).lock()?.image().flush_to_os()?;
        }
        Ok(0)
    })
}

fn qcow2b_co_flush_to_disk(bs: *mut BlockDriverState) -> c_int {
    to_c("flush", || {
        // SAFETY: called by the block layer in a coroutine of a node we opened.
        unsafe { txg::commit(Node::of(bs), txg::Durability::Flush) }.map(|_| 0)
    })
}
}

entries! {
fn qcow2b_co_truncate(
    bs: *mut BlockDriverState,
    offset: i64,
    _exact: bool,
    prealloc: bindings::PreallocMode,
    flags: bindings::BdrvRequestFlags,
    errp: *mut *mut bindings::Error,
) -> c_int, errp = errp {
    // SAFETY: QEMU passes a valid node and errp; we run in a coroutine of the node.
    unsafe {
        to_c_errp("truncate", errp, || {
            let preallocation = match prealloc {
                bindings::PREALLOC_MODE_OFF => Preallocation::Off,
                bindings::PREALLOC_MODE_METADATA => Preallocation::Metadata,
                bindings::PREALLOC_MODE_FALLOC => Preallocation::Falloc,
                bindings::PREALLOC_MODE_FULL => Preallocation::Full,
                _ => {
                    return Err(Error::BadOption(
                        "Unsupported preallocation mode (qcow2b: off, metadata, falloc, full)"
                            .into(),
                    ))
                }
            };
            let growth = Growth {
                preallocation,
                // The block layer asks for it when the backing file reaches into the new
                // area (supported_truncate_flags).
                zero: flags & bindings::BDRV_REQ_ZERO_WRITE != 0,
            };
            let node = Node::of(bs);
            // The ordered mode's buffer is emptied first: the new size and L1 table reach a
            // file that holds everything written before.
            node.drain_ordered_buffer("resize")?;
            let mut locked = node.lock()?;
            // A resize commits an open transaction group first, which no write may be
            // between its plan and its finish for: they end first, and new ones wait (the
            // pending commit holds them back), as for a flush (`txg.rs`). Outside a group the
            // block layer's serialising request orders the resize with the writes it
            // overlaps.
            while locked.image().group_open() && locked.image().has_write_plans_in_flight() {
                locked.image().request_commit();
                locked.wait_for_allocations();
            }
            let image = locked.image();
            // The block layer resizes the bitmaps it holds: every one the image has must be.
            bitmaps::check_resize(bs, image)?;
            let backing = request::backing_of(bs);
            let resized = if (offset as u64) < image.virtual_size() {
                // QEMU's message; the shrink itself: `engine/image/shrink.rs`.
                if preallocation != Preallocation::Off {
                    Err(Error::BadOption(
                        "Preallocation can't be used for shrinking an image".into(),
                    ))
                } else {
                    image.shrink(offset as u64)
                }
            } else {
                image.grow(
                    offset as u64,
                    growth,
                    backing.as_ref().map(|b| b as &dyn Backing),
                )
            }
            .and_then(|()| publish_image_fields(bs, image));
            // Writes held back for the resize go on, whatever became of it.
            locked.wake_allocation_waiters();
            resized.map(|()| 0)
        })
    }
}
}

/// The variable that makes probing pick qcow2b for qcow2 images.
const PROBE_VARIABLE: &str = "QCOW2B_PROBE";

entries! {
/// Probing: nothing, unless `QCOW2B_PROBE=1` is set in the environment; then a qcow2 header
/// (magic, version 2 or 3) scores above QEMU's qcow2 (100), so every image opened without a
/// format name (`qemu-img info img`, a backing file without backing_fmt) is driven by qcow2b.
/// QEMU's iotests set it with `./check -qcow2b`, so that a test's commands without `-f`
/// exercise qcow2b as they exercise qcow2 under `-qcow2`.
fn qcow2b_probe(
    buf: *const u8,
    buf_size: c_int,
    _filename: *const c_char,
) -> c_int {
    if std::env::var_os(PROBE_VARIABLE).is_none_or(|v| v != "1") || buf.is_null() || buf_size < 8 {
        return 0;
    }
    // SAFETY: QEMU passes buf_size readable bytes (checked above: at least 8).
    let head = unsafe { std::slice::from_raw_parts(buf, 8) };
    if looks_like_qcow2(head) {
        101
    } else {
        0
    }
}
}

entries! {
fn qcow2b_change_backing_file(
    bs: *mut BlockDriverState,
    backing_file: *const c_char,
    backing_fmt: *const c_char,
) -> c_int {
    to_c("change_backing_file", || {
        // Names are bytes, as the image stores them.
        let text = |p: *const c_char| {
            // SAFETY: QEMU passes NULL or a NUL-terminated string.
            (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_bytes().to_vec())
        };
        let (file, format) = (text(backing_file), text(backing_fmt));
        // SAFETY: called outside any request of the node (qemu-img rebase, the end of a block
        // job), as QEMU's qcow2 assumes too. bdrv_change_backing_file() updates the node's
        // backing_file fields itself once this succeeds.
        unsafe { Node::of(bs).image_drained() }
            .change_backing_file(file.as_deref(), format.as_deref())
            .map(|()| 0)
    })
}
}

entries! {
fn qcow2b_make_empty(bs: *mut BlockDriverState) -> c_int {
    // qemu-img commit (and HMP commit) empty the committed image so that it reads as its
    // backing file again. Called in the main loop, outside any coroutine; the node is
    // drained for it, so that no request sees the table entries change under it. The drained
    // section ends whatever the engine does (its panics stop in the entry's guard).
    // SAFETY: QEMU passes an open node, in the main loop.
    unsafe { bindings::bdrv_drained_begin(bs) };
    let ret = to_c("make_empty", || {
        // SAFETY: the node is drained until the end of the section below.
        unsafe { Node::of(bs).image_drained() }
            .make_empty()
            .map(|()| 0)
    });
    // SAFETY: ends the section begun above.
    unsafe { bindings::bdrv_drained_end(bs) };
    ret
}
}

entries! {
fn qcow2b_co_block_status(
    bs: *mut BlockDriverState,
    _want_zero: bool,
    offset: i64,
    bytes: i64,
    pnum: *mut i64,
    map: *mut i64,
    file: *mut *mut BlockDriverState,
) -> c_int {
    to_c("block_status", || {
        // SAFETY: called in a coroutine of a node we opened.
        let node = unsafe { Node::of(bs) };
        let (mapping, len, encrypted) = {
            // SAFETY: as above.
            let mut locked = unsafe { node.lock() }?;
            let image = locked.image();
            if node.metadata_preallocated.get().is_none() {
                // SAFETY: the image file's child is open; QEMU's qcow2 asks the same function
                // from its block-status coroutine.
                let allocated = unsafe {
                    bindings::bdrv_get_allocated_file_size((*node.file.child()).bs)
                };
                // A file layer that cannot tell (blkdebug, some network protocols), or a
                // refcount that cannot be read, leaves the answer "no", as with QEMU's qcow2:
                // block status then reports the clusters as data, which is never wrong.
                let preallocated = u64::try_from(allocated)
                    .ok()
                    .and_then(|allocated| image.looks_metadata_preallocated(allocated).ok())
                    .unwrap_or(false);
                node.metadata_preallocated.set(Some(preallocated));
            }
            let (mapping, len) = image.map(offset as u64, bytes as u64)?;
            (mapping, len, image.encryption().is_some())
        };
        // Data clusters of a metadata-preallocated image may be holes in the file: the block
        // layer asks the file (RECURSE) and reads a hole as zeros, as for QEMU's qcow2.
        let recurse = if node.metadata_preallocated.get() == Some(true) {
            bindings::BDRV_BLOCK_RECURSE as c_int
        } else {
            0
        };
        // SAFETY: the out-pointers are valid (block-layer contract); the children are open.
        unsafe {
            // Where host offsets point: the external data file, or the image file.
            let data_bs = (*node.data_storage().child()).bs;
            *pnum = len as i64;
            Ok(match mapping {
                Mapping::Unallocated => 0,
                Mapping::Zero { host_offset: None } => bindings::BDRV_BLOCK_ZERO as c_int,
                // An encrypted cluster's bytes in the file are not the guest's: no offset, as
                // QEMU's qcow2 (nothing may copy them from the file as they are).
                Mapping::Zero {
                    host_offset: Some(_),
                } if encrypted => bindings::BDRV_BLOCK_ZERO as c_int,
                Mapping::Data { .. } if encrypted => bindings::BDRV_BLOCK_DATA as c_int,
                Mapping::Zero {
                    host_offset: Some(host_offset),
                } => {
                    // A preallocated zero cluster: where it is, as QEMU's qcow2 says.
                    *map = host_offset as i64;
                    *file = data_bs;
                    (bindings::BDRV_BLOCK_ZERO | bindings::BDRV_BLOCK_OFFSET_VALID) as c_int
                }
                Mapping::Compressed => bindings::BDRV_BLOCK_DATA as c_int,
                Mapping::Data { host_offset } => {
                    *map = host_offset as i64;
                    *file = data_bs;
                    (bindings::BDRV_BLOCK_DATA | bindings::BDRV_BLOCK_OFFSET_VALID) as c_int
                        | recurse
                }
            })
        }
    })
}
}

entries! {
fn qcow2b_refresh_limits(
    bs: *mut BlockDriverState,
    _errp: *mut *mut bindings::Error,
) -> () {
    // SAFETY: QEMU passes an open node, drained.
    unsafe {
        let node = Node::of(bs);
        let image = node.image_drained();
        // Zeroes work on whole subclusters (whole clusters with standard L2 entries), as
        // QEMU's qcow2 sets it; discards on whole clusters.
        (*bs).bl.pwrite_zeroes_alignment = image.subcluster_size() as u32;
        (*bs).bl.pdiscard_alignment = image.cluster_size() as u32;
        if image.encryption().is_some() {
            // Encryption works in whole sectors: the block layer reads around the rest.
            let sector = node
                .crypto
                .as_ref()
                .map_or(crate::engine::ENCRYPTION_SECTOR_BYTES, |c| c.sector_size());
            (*bs).bl.request_alignment = sector as u32;
        }
    }
}
}

entries! {
fn qcow2b_has_zero_init(bs: *mut BlockDriverState) -> c_int {
    // A new qcow2 image reads as zeros wherever nothing was written (no external data file),
    // except an encrypted one whose clusters were preallocated: they decrypt to noise. As
    // QEMU's qcow2, a first L2 table means a preallocated image.
    let answer = |image: &Image<FileAccess>| {
        c_int::from(image.encryption().is_none() || !image.first_l2_table_allocated())
    };
    // SAFETY: QEMU passes an open node. Inside a coroutine (a mirror job's start) requests
    // may be in flight: the lock, as QEMU's qcow2 takes it; outside one the node is idle.
    unsafe {
        let node = Node::of(bs);
        if super::file::in_coroutine() {
            match node.lock() {
                Ok(mut locked) => answer(locked.image()),
                // A poisoned node promises nothing.
                Err(_) => 0,
            }
        } else {
            answer(node.image_drained())
        }
    }
}
}

/// What a reopen's prepare decided, for its commit (`BDRVReopenState.opaque`; freed by
/// commit or abort).
struct ReopenPlan {
    /// The file's node before the reopen: commit reads the image anew if it changed.
    old_file: *mut BlockDriverState,
    /// The runtime options of the reopen, checked.
    settings: Settings,
}

entries! {
fn qcow2b_reopen_prepare(
    state: *mut BDRVReopenState,
    _queue: *mut BlockReopenQueue,
    errp: *mut *mut bindings::Error,
) -> c_int, errp = errp {
    // SAFETY: QEMU passes a valid reopen state of a drained qcow2b node, and errp.
    unsafe {
        to_c_errp("reopen", errp, || {
            let bs = (*state).bs;
            let read_only = (*state).flags & bindings::BDRV_O_RDWR as c_int == 0;
            let node = Node::of(bs);
            // The options first, so that a refused one changes nothing. Taken out of the
            // reopen's options: what is left the block layer checks is unchanged.
            let Some(opts) = Opts::absorb(runtime_opts::list(), (*state).options, errp) else {
                return Ok(-libc::EINVAL);
            };
            let settings = Settings::read(&opts, (*state).flags)?;
            let image = node.image_drained();
            settings.check_image(image.header())?;
            if settings.mode != node.mode {
                return Err(Error::BadOption(format!(
                    "a reopen cannot change qcow2b's barrier mode or its bounds (it is {}; \
                     asked for {}): close and open the image again",
                    node.mode.describe(),
                    settings.mode.describe()
                )));
            }
            let file_changes = names_another_file(state);
            if file_changes && !image.is_read_only() {
                // Everything out to the file it belongs to, durably, and the zero reserve
                // given back, as at a close: after the switch, buffered epochs and dirty
                // tables would reach the other file.
                image.hand_over()?;
            } else if !image.is_read_only() {
                if read_only {
                    // The bitmaps stored and made read-only first (QEMU's
                    // qcow2_reopen_bitmaps_ro).
                    bitmaps::reopen_read_only(bs, image)?;
                }
                // A node going read-only loses its write permission: everything out,
                // durably. QEMU's qcow2 writes its caches out at every reopen; so does this
                // (free when nothing is dirty).
                image.flush()?;
            }
            if !read_only {
                // What make_writable would refuse in commit_post, where it cannot fail.
                image.check_can_write()?;
            }
            let plan = ReopenPlan {
                old_file: (*(*bs).file).bs,
                settings,
            };
            (*state).opaque = Box::into_raw(Box::new(plan)).cast();
            Ok(0)
        })
    }
}
}

/// Whether a reopen names another node as the `file` child (blockdev-reopen; without the
/// key the child stays).
///
/// # Safety
/// `state` is the reopen state of an open qcow2b node, before the block layer parses the
/// children (the driver's prepare).
unsafe fn names_another_file(state: *mut BDRVReopenState) -> bool {
    // SAFETY: per the caller; node names are NUL-terminated arrays.
    unsafe {
        let name = bindings::qdict_get_try_str((*state).options, c"file".as_ptr());
        let current = (*(*(*state).bs).file).bs;
        !name.is_null() && CStr::from_ptr(name) != CStr::from_ptr((*current).node_name.as_ptr())
    }
}

/// After a reopen that replaced the `file` child: the image is read from the new file (the
/// old one was handed over in prepare). Nothing here may fail the reopen any more, so a
/// node whose new file does not open refuses every request from now on.
///
/// # Safety
/// `bs` an open qcow2b node, drained, whose `file` child is the new one.
unsafe fn reopen_new_file(bs: *mut BlockDriverState) {
    // SAFETY: per the caller.
    let node = unsafe { Node::of(bs) };
    let ret = to_c("reopen", || {
        let mut options = node.open_options.borrow().clone();
        // SAFETY: per the caller.
        let image = unsafe { node.image_drained() };
        options.read_only = image.is_read_only();
        let fresh = node.open_image(&options)?;
        // SAFETY: per the caller.
        unsafe { publish_image_fields(bs, &fresh) }?;
        let _old = std::mem::replace(image, fresh);
        Ok(0)
    });
    if ret < 0 {
        node.poison();
        log::error!(
            "qcow2b: reopen with another file: the image in the new file does not open, so \
             this node refuses every request: {}",
            std::io::Error::from_raw_os_error(-ret)
        );
    }
}

entries! {
fn qcow2b_reopen_commit(state: *mut BDRVReopenState) -> () {
    // SAFETY: as in prepare; prepare succeeded, so opaque holds its plan, taken back here
    // once.
    unsafe {
        let bs = (*state).bs;
        let node = Node::of(bs);
        let plan = Box::from_raw((*state).opaque.cast::<ReopenPlan>());
        (*state).opaque = ptr::null_mut();
        let settings = plan.settings;
        let image = node.image_drained();
        image.set_cache_sizes(&settings.open);
        image.set_discard_policy(settings.open.discard);
        *node.open_options.borrow_mut() = settings.open;
        cache_clean::set_interval(bs, node, settings.cache_clean_interval);
        if (*(*bs).file).bs != plan.old_file {
            reopen_new_file(bs);
        }
        if (*state).flags & bindings::BDRV_O_RDWR as c_int == 0 {
            let bs = (*state).bs;
            let ret = to_c("reopen", || {
                Node::of(bs).image_drained().make_read_only().map(|_| 0)
            });
            if ret < 0 {
                log::error!(
                    "qcow2b: reopen read-only: {}",
                    std::io::Error::from_raw_os_error(-ret)
                );
            }
        }
    }
}
}

entries! {
fn qcow2b_reopen_commit_post(state: *mut BDRVReopenState) -> () {
    // Becoming writable writes the header (autoclear bits), which needs the file child's
    // write permission: granted only after commit.
    // SAFETY: as in prepare.
    unsafe {
        if (*state).flags & bindings::BDRV_O_RDWR as c_int != 0 {
            let bs = (*state).bs;
            let ret = to_c("reopen", || {
                let image = Node::of(bs).image_drained();
                image.make_writable()?;
                // The bitmaps the engine just marked in use become writable in QEMU.
                bitmaps::reopen_read_write(bs, image).map(|_| 0)
            });
            if ret < 0 {
                log::error!(
                    "qcow2b: reopen read-write failed, the node stays read-only: {}",
                    std::io::Error::from_raw_os_error(-ret)
                );
            }
        }
    }
}
}

entries! {
fn qcow2b_reopen_abort(state: *mut BDRVReopenState) -> () {
    // SAFETY: QEMU aborts only a reopen whose prepare succeeded, so opaque holds its plan,
    // dropped here once.
    unsafe {
        if !(*state).opaque.is_null() {
            drop(Box::from_raw((*state).opaque.cast::<ReopenPlan>()));
            (*state).opaque = ptr::null_mut();
        }
    }
}
}

entries! {
fn qcow2b_detach_aio_context(bs: *mut BlockDriverState) -> () {
    // SAFETY: QEMU detaches open, drained nodes.
    unsafe {
        let node = Node::of(bs);
        txg::detach(node);
        cache_clean::stop(node);
    }
}
}

entries! {
fn qcow2b_attach_aio_context(
    bs: *mut BlockDriverState,
    ctx: *mut bindings::AioContext,
) -> () {
    // SAFETY: QEMU attaches open nodes, now in ctx.
    let node = unsafe { Node::of(bs) };
    if node.open_options.borrow().txg.is_some() {
        // SAFETY: as above; the node is in the txg mode.
        unsafe { txg::attach(bs, node, ctx) };
    }
    // SAFETY: as above.
    unsafe { cache_clean::start(bs, node) };
}
}

entries! {
fn qcow2b_inactivate(bs: *mut BlockDriverState) -> c_int {
    // Before another process takes the image over (migration): everything out, durably, and
    // the zero reserve given back, as at a close.
    to_c("inactivate", || {
        // SAFETY: QEMU inactivates a drained, open node.
        let image = unsafe { Node::of(bs).image_drained() };
        // The bitmaps first (released: the image is no longer this node's to track), as
        // QEMU's qcow2; a failure loses them but not the rest of the hand-over.
        // SAFETY: as above.
        let stored = unsafe { bitmaps::store(bs, image, true) };
        image.hand_over()?;
        match stored {
            Ok(()) => Ok(0),
            Err(e) => {
                log::error!("Lost persistent bitmaps during inactivation of node: {e}");
                Ok(-libc::EINVAL)
            }
        }
    })
}
}

entries! {
fn qcow2b_co_invalidate_cache(
    bs: *mut BlockDriverState,
    errp: *mut *mut bindings::Error,
) -> (), errp = errp {
    // Another process may have changed the image (incoming migration): read it anew.
    // SAFETY: QEMU passes an open node and errp; the node is drained.
    unsafe {
        to_c_errp("invalidate_cache", errp, || {
            let node = Node::of(bs);
            let options = node.open_options.borrow().clone();
            let fresh = node.open_image(&options)?;
            publish_image_fields(bs, &fresh)?;
            // The old state is dropped unflushed: its metadata is what the other side wrote
            // over, and this side wrote nothing since it was inactivated.
            let _old = std::mem::replace(node.image_drained(), fresh);
            // The other side may have preallocated or written: look again.
            node.metadata_preallocated.set(None);
            // The bitmaps as the other side stored them (QEMU's qcow2 loads them again at
            // this point; those it migrated are left to it).
            let image = node.image_drained();
            let loaded = bitmaps::read_for_load(image)?;
            bitmaps::create_in_qemu(bs, loaded, image.is_read_only())?;
            Ok(0)
        })
    };
}
}

entries! {
fn qcow2b_get_info(
    bs: *mut BlockDriverState,
    bdi: *mut BlockDriverInfo,
) -> c_int {
    to_c("get_info", || {
        // SAFETY: bs is an open qcow2b node and bdi a valid out-pointer.
        unsafe {
            let image = Node::of(bs).image_drained();
            (*bdi).cluster_size = image.cluster_size() as c_int;
            (*bdi).is_dirty = false;
        }
        Ok(0)
    })
}
}

/// Allocates a zeroed QAPI object with glib, as QEMU frees them (qapi_free_*).
///
/// # Safety
/// `T` is a QAPI C struct, for which all zeros is a valid (empty) value.
unsafe fn qapi_new<T>() -> *mut T {
    // SAFETY: per the caller; g_malloc0 aborts rather than return NULL.
    unsafe { bindings::g_malloc0(std::mem::size_of::<T>() as u64).cast() }
}

/// `qemu-img info`'s `encrypt` for a qcow2 image: the crypto layer's description, under
/// qcow2's format names.
///
/// # Safety
/// `crypto` is open; the result is a QAPI object allocated with glib (freed with the info
/// that holds it).
unsafe fn encryption_info(
    crypto: &crypto::QemuCrypto,
) -> Result<*mut bindings::ImageInfoSpecificQCow2Encryption, Error> {
    let info = crypto.info()?;
    // SAFETY: info is a QCryptoBlockInfo QEMU made for us; its LUKS part moves into the new
    // object and is zeroed in the old one, so freeing that frees nothing of it.
    unsafe {
        let encrypt: *mut bindings::ImageInfoSpecificQCow2Encryption = qapi_new();
        (*encrypt).format = if (*info).format == bindings::Q_CRYPTO_BLOCK_FORMAT_LUKS {
            (*encrypt).u.luks = (*info).u.luks;
            bindings::BLOCKDEV_QCOW2_ENCRYPTION_FORMAT_LUKS
        } else {
            bindings::BLOCKDEV_QCOW2_ENCRYPTION_FORMAT_AES
        };
        ptr::write_bytes(ptr::addr_of_mut!((*info).u), 0, 1);
        bindings::qapi_free_QCryptoBlockInfo(info);
        Ok(encrypt)
    }
}

entries! {
/// The image information of a qcow2b node: that of a qcow2 image, field for field, so that
/// `qemu-img info`, query-block and query-named-block-nodes show what they show for QEMU's
/// qcow2 (management tools and tests read it, and compare it before and after an operation).
/// What is the driver's own (barrier mode, counters) is in its statistics
/// ([`qcow2b_get_specific_stats`]).
fn qcow2b_get_specific_info(
    bs: *mut BlockDriverState,
    errp: *mut *mut bindings::Error,
) -> *mut bindings::ImageInfoSpecific, errp = errp {
    let mut out = ptr::null_mut();
    // SAFETY: bs is an open qcow2b node; the QAPI objects are allocated with glib, as QEMU
    // frees them with qapi_free_ImageInfoSpecific.
    unsafe {
        to_c_errp("get_specific_info", errp, || {
            let node = Node::of(bs);
            let header = node.image_drained().header().clone();
            let bitmap_list = if header.version >= 3 {
                bitmaps::info_list(node.image_drained())
            } else {
                ptr::null_mut()
            };
            let encrypt = match &node.crypto {
                Some(crypto) => encryption_info(crypto)?,
                None => ptr::null_mut(),
            };
            let info: *mut bindings::ImageInfoSpecificQCow2 = qapi_new();
            let i = &mut *info;
            let compat = if header.version >= 3 { c"1.1" } else { c"0.10" };
            i.compat = bindings::g_strdup(compat.as_ptr());
            i.refcount_bits = 1i64 << header.refcount_order;
            if header.version >= 3 {
                i.has_lazy_refcounts = true;
                i.lazy_refcounts = header
                    .compatible
                    .contains(CompatibleFeatures::LAZY_REFCOUNTS);
                i.has_corrupt = true;
                i.corrupt = header.incompatible.contains(IncompatibleFeatures::CORRUPT);
                i.has_extended_l2 = true;
                i.extended_l2 = header.l2_width() == L2Width::Extended;
                // As QEMU's qcow2: whether the data file is raw, for images that have one.
                i.has_data_file_raw = header.has_data_file();
                i.data_file_raw = header.data_file_raw();
            }
            if let Some(name) = header.data_file_name() {
                let name = CString::new(name).unwrap_or_default();
                i.has_data_file = true;
                i.data_file = bindings::g_strdup(name.as_ptr());
            }
            i.has_bitmaps = !bitmap_list.is_null();
            i.bitmaps = bitmap_list;
            i.has_encrypt = !encrypt.is_null();
            i.encrypt = encrypt;
            i.compression_type = match header.compression_type {
                CompressionType::Zlib => bindings::QCOW2_COMPRESSION_TYPE_ZLIB,
                CompressionType::Zstd => bindings::QCOW2_COMPRESSION_TYPE_ZSTD,
            };
            let spec: *mut bindings::ImageInfoSpecific = qapi_new();
            (*spec).type_ = bindings::IMAGE_INFO_SPECIFIC_KIND_QCOW2;
            (*spec).u.qcow2.data = info;
            out = spec;
            Ok(0)
        });
    }
    out
}
}

entries! {
/// The driver's statistics (QMP query-blockstats, `driver-specific`; qemu-io's info): the
/// barrier mode and the counters of what the node received and issued since it was opened.
fn qcow2b_get_specific_stats(
    bs: *mut BlockDriverState,
) -> *mut bindings::BlockStatsSpecific {
    let mut out = ptr::null_mut();
    // SAFETY: bs is an open qcow2b node; the QAPI objects are allocated with glib, as QEMU
    // frees them with qapi_free_BlockStatsSpecific.
    // Statistics are optional: a failure leaves `out` NULL (none rather than a half-built
    // object), and the error was reported.
    let _ = to_c("get_specific_stats", || unsafe {
        let node = Node::of(bs);
        let image = node.image_drained();
        let engine = image.counters();
        let (cached_l2, cached_refblocks) = image.cached_tables();
        let host = node.file.counters();
        let (buffered, peak) = node.file.buffered_bytes();
        // Not yet durable: the open group's (txg), the buffer's and the unsynced direct
        // writes' (ordered); the other modes do not track it.
        let unsynced = match (image.group_exposure(), node.file.unsynced()) {
            (Some(group), _) => Unsynced {
                bytes: group.bytes,
                peak_bytes: engine.peak_group_bytes.max(group.bytes),
                age: group.age,
                peak_age_ms: engine.peak_group_age_ms,
            },
            (None, Some(ordered)) => ordered,
            (None, None) => Unsynced::default(),
        };
        let c: *mut bindings::Qcow2bCounters = qapi_new();
        let n = |v: u64| v as i64;
        *c = bindings::Qcow2bCounters {
            guest_flushes: n(engine.guest_flushes),
            guest_barrier_writes: n(node.barrier_writes.get()),
            guest_barriers: n(engine.guest_barriers),
            host_fdatasyncs: n(host.fdatasyncs.get()),
            host_barriers: n(host.barriers.get()),
            epochs: n(host.epochs.get()),
            buffered_bytes: n(buffered),
            peak_buffered_bytes: n(peak),
            full_buffer_wait_ns: n(host.full_wait_ns.get()),
            ordering_points: n(engine.ordering_points),
            metadata_writes: n(engine.metadata_writes),
            data_writes: n(engine.data_writes),
            host_errors: n(host.errors.get()),
            groups_committed: n(engine.groups_committed),
            groups_committed_by_age: n(engine.groups_committed_by_age),
            groups_committed_by_size: n(engine.groups_committed_by_size),
            groups_committed_for_durability: n(engine.groups_committed_for_durability),
            guest_flushes_as_barriers: n(node.guest_flush_barriers.get()),
            unsynced_bytes: n(unsynced.bytes),
            peak_unsynced_bytes: n(unsynced.peak_bytes),
            unsynced_age_ms: n(unsynced.age.map_or(0, |a| a.as_millis() as u64)),
            peak_unsynced_age_ms: n(unsynced.peak_age_ms),
            discarded_clusters: n(engine.discarded_clusters),
            cached_l2_tables: n(cached_l2 as u64),
            cached_refcount_blocks: n(cached_refblocks as u64),
        };
        let stats: *mut bindings::BlockStatsSpecific = qapi_new();
        (*stats).driver = bindings::BLOCKDEV_DRIVER_QCOW2B;
        let mode = CString::new(node.mode.name()).unwrap_or_default();
        (*stats).u.qcow2b.barrier_mode = bindings::g_strdup(mode.as_ptr());
        (*stats).u.qcow2b.counters = c;
        out = stats;
        Ok(0)
    });
    out
}
}

entries! {
fn qcow2b_co_check(
    bs: *mut BlockDriverState,
    result: *mut bindings::BdrvCheckResult,
    fix: bindings::BdrvCheckMode,
) -> c_int {
    let fix = if fix & bindings::BDRV_FIX_ERRORS != 0 {
        CheckFix::All
    } else if fix & bindings::BDRV_FIX_LEAKS != 0 {
        CheckFix::Leaks
    } else {
        CheckFix::None
    };
    to_c("check", || {
        // SAFETY: called by qemu-img in a coroutine of a node we opened.
        let mut locked = unsafe { Node::of(bs).lock() }?;
        let report = match locked.image().check(fix) {
            // What stops a check (a snapshot table over QEMU's limits without -r all) is
            // printed as QEMU's qcow2 prints it; qemu-img then names the errno.
            Err(Error::Refused { errno, msg }) => {
                log::error!("{msg}");
                return Ok(-errno);
            }
            other => other?,
        };
        // What QEMU's qcow2 prints as it goes ("Leaked cluster ...", "ERROR ..."), on stderr.
        for message in &report.messages {
            log::info!("{message}");
        }
        if report.messages_dropped > 0 {
            log::info!("({} more messages not shown)", report.messages_dropped);
        }
        let clamp = |n: u64| c_int::try_from(n).unwrap_or(c_int::MAX);
        // SAFETY: result is a valid out-pointer (block-layer contract).
        let r = unsafe { &mut *result };
        r.corruptions = clamp(report.corruptions);
        r.leaks = clamp(report.leaks);
        r.check_errors = clamp(report.check_errors);
        r.corruptions_fixed = clamp(report.corruptions_fixed);
        r.leaks_fixed = clamp(report.leaks_fixed);
        r.image_end_offset = report.image_end_offset as i64;
        r.bfi.total_clusters = report.fragmentation.total_clusters;
        r.bfi.allocated_clusters = report.fragmentation.allocated_clusters;
        r.bfi.fragmented_clusters = report.fragmentation.fragmented_clusters;
        r.bfi.compressed_clusters = report.fragmentation.compressed_clusters;
        // The check could not finish (as QEMU's qcow2, -EIO then; the counts still print).
        Ok(if report.check_errors > 0 {
            -libc::EIO
        } else {
            0
        })
    })
}
}

entries! {
fn qcow2b_snapshot_list(
    bs: *mut BlockDriverState,
    psn_info: *mut *mut bindings::QEMUSnapshotInfo,
) -> c_int {
    to_c("snapshot_list", || {
        // SAFETY: bs is an open qcow2b node, drained (snapshot commands run outside requests).
        let snapshots = unsafe { Node::of(bs).image_drained() }.snapshots().to_vec();
        let size = std::mem::size_of::<bindings::QEMUSnapshotInfo>() * snapshots.len().max(1);
        // SAFETY: the array is freed by the caller with g_free, as for QEMU's qcow2.
        let list: *mut bindings::QEMUSnapshotInfo =
            unsafe { bindings::g_malloc0(size as u64) }.cast();
        for (i, sn) in snapshots.iter().enumerate() {
            // SAFETY: list has room for snapshots.len() entries, zeroed.
            let info = unsafe { &mut *list.add(i) };
            // Ids and names longer than QEMU's fields are cut, as qcow2 does (pstrcpy).
            copy_truncated(&mut info.id_str, &sn.id);
            copy_truncated(&mut info.name, &sn.name);
            info.vm_state_size = sn.vm_state_size;
            info.date_sec = sn.date_sec;
            info.date_nsec = sn.date_nsec;
            info.vm_clock_nsec = sn.vm_clock_nsec;
            info.icount = sn.icount.unwrap_or(u64::MAX);
        }
        // SAFETY: psn_info is a valid out-pointer.
        unsafe { *psn_info = list };
        Ok(snapshots.len() as c_int)
    })
}
}

/// Runs `op` on the image of `bs` drained (a snapshot taken, applied or deleted): the block
/// layer's drain waits for the node's requests and its ordered-mode writer (started by the
/// VM state's writes, in the node's AioContext, and polled from the right thread there),
/// then the ordered-mode buffer is emptied, so that the operation starts from a file that
/// holds everything written before. QEMU's own callers drain already (savevm, QMP); qemu-io
/// and qemu-img do not need to, but nothing is lost by draining again.
///
/// # Safety
/// `bs` is an open qcow2b node, outside any coroutine.
unsafe fn drained<T>(
    bs: *mut BlockDriverState,
    what: &str,
    op: impl FnOnce(&mut Image<FileAccess>) -> Result<T, Error>,
) -> Result<T, Error> {
    // SAFETY: per the caller.
    unsafe { bindings::bdrv_drained_begin(bs) };
    // SAFETY: per the caller; the node is drained until the end below.
    let node = unsafe { Node::of(bs) };
    let result = node
        .drain_ordered_buffer(what)
        // SAFETY: drained: nothing else uses the image.
        .and_then(|()| op(unsafe { node.image_drained() }));
    // SAFETY: paired with the begin above.
    unsafe { bindings::bdrv_drained_end(bs) };
    result
}

/// The bytes a vector holds.
///
/// # Safety
/// `qiov` is a valid vector.
unsafe fn qiov_len(qiov: *const QEMUIOVector) -> usize {
    // SAFETY: per the caller, `iov` holds `niov` entries.
    unsafe {
        let n = usize::try_from((*qiov).niov).unwrap_or(0);
        (0..n).map(|i| (*(*qiov).iov.add(i)).iov_len).sum()
    }
}

/// A C string argument QEMU may pass as NULL, as bytes.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn opt_bytes<'a>(p: *const c_char) -> Option<&'a [u8]> {
    // SAFETY: per the caller.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_bytes())
}

entries! {
/// Takes an internal snapshot (`qemu-img snapshot -c`, savevm, QMP
/// blockdev-snapshot-internal-sync): the id is the next free number, written back into
/// `sn_info` as QEMU's qcow2 does; the VM state saved before is `vm_state_size` bytes.
fn qcow2b_snapshot_create(
    bs: *mut BlockDriverState,
    sn_info: *mut bindings::QEMUSnapshotInfo,
) -> c_int {
    to_c("snapshot_create", || {
        // SAFETY: QEMU passes a valid snapshot description.
        let info = unsafe { &mut *sn_info };
        // SAFETY: name is a NUL-terminated array.
        let name = unsafe { CStr::from_ptr(info.name.as_ptr()) }.to_bytes().to_vec();
        let params = crate::engine::SnapshotParams {
            name,
            date_sec: info.date_sec,
            date_nsec: info.date_nsec,
            vm_clock_nsec: info.vm_clock_nsec,
            vm_state_size: info.vm_state_size,
            icount: (info.icount != u64::MAX).then_some(info.icount),
        };
        // SAFETY: QEMU passes an open node; snapshot callbacks run outside coroutines.
        let taken =
            unsafe { drained(bs, "take a snapshot", |image| image.create_snapshot(&params)) }?;
        copy_truncated(&mut info.id_str, &taken.id);
        Ok(0)
    })
}

/// Applies (reverts to) a snapshot, by id or else by name (`qemu-img snapshot -a`, loadvm);
/// the disk takes the snapshot's size.
fn qcow2b_snapshot_goto(bs: *mut BlockDriverState, snapshot_id: *const c_char) -> c_int {
    to_c("snapshot_goto", || {
        // SAFETY: QEMU passes a NUL-terminated id.
        let id = unsafe { CStr::from_ptr(snapshot_id) };
        // SAFETY: QEMU passes an open node; snapshot callbacks run outside coroutines.
        unsafe {
            drained(bs, "apply a snapshot", |image| {
                image.goto_snapshot(id.to_bytes())?;
                publish_image_fields(bs, image)
            })
        }?;
        Ok(0)
    })
}

/// Deletes the snapshot with this id and name, where given (`qemu-img snapshot -d`, delvm,
/// QMP blockdev-snapshot-delete-internal-sync).
fn qcow2b_snapshot_delete(
    bs: *mut BlockDriverState,
    snapshot_id: *const c_char,
    name: *const c_char,
    errp: *mut *mut bindings::Error,
) -> c_int, errp = errp {
    // SAFETY: QEMU passes an open node, drained, its strings NULL or NUL-terminated, errp.
    unsafe {
        to_c_errp("snapshot_delete", errp, || {
            drained(bs, "delete a snapshot", |image| {
                image.delete_snapshot(opt_bytes(snapshot_id), opt_bytes(name))
            })?;
            Ok(0)
        })
    }
}

/// Shows a snapshot in place of the active tables, read-only (`qemu-img convert -l`).
fn qcow2b_snapshot_load_tmp(
    bs: *mut BlockDriverState,
    snapshot_id: *const c_char,
    name: *const c_char,
    errp: *mut *mut bindings::Error,
) -> c_int, errp = errp {
    // SAFETY: as for qcow2b_snapshot_delete.
    unsafe {
        to_c_errp("snapshot_load_tmp", errp, || {
            let image = Node::of(bs).image_drained();
            image.load_snapshot_tmp(opt_bytes(snapshot_id), opt_bytes(name))?;
            Ok(0)
        })
    }
}

/// Writes VM state (savevm) into the image's VM state area, before the snapshot takes it.
fn qcow2b_save_vmstate(bs: *mut BlockDriverState, qiov: *mut QEMUIOVector, pos: i64) -> c_int {
    // SAFETY: QEMU passes an open node and a valid vector; we run in a coroutine of the node.
    unsafe {
        to_c("save_vmstate", || {
            let len = qiov_len(qiov);
            let mut buf = vec![0u8; len];
            bindings::qemu_iovec_to_buf(qiov, 0, buf.as_mut_ptr().cast(), len);
            let mut locked = Node::of(bs).lock()?;
            locked.image().write_vmstate(pos as u64, &buf)?;
            Ok(0)
        })
    }
}

/// Reads VM state (loadvm) from the VM state area of the snapshot applied last.
fn qcow2b_load_vmstate(bs: *mut BlockDriverState, qiov: *mut QEMUIOVector, pos: i64) -> c_int {
    // SAFETY: as for qcow2b_save_vmstate.
    unsafe {
        to_c("load_vmstate", || {
            let len = qiov_len(qiov);
            let mut buf = vec![0u8; len];
            {
                let mut locked = Node::of(bs).lock()?;
                locked.image().read_vmstate(pos as u64, &mut buf)?;
            }
            bindings::qemu_iovec_from_buf(qiov, 0, buf.as_ptr().cast(), len);
            Ok(0)
        })
    }
}
}

/// Copies `value` (bytes, as the image stores names) into a C char array, cut to fit and
/// NUL-terminated.
fn copy_truncated(dst: &mut [c_char], value: &[u8]) {
    let n = value.len().min(dst.len().saturating_sub(1));
    for (d, s) in dst.iter_mut().zip(&value[..n]) {
        *d = *s as c_char;
    }
    if let Some(end) = dst.get_mut(n) {
        *end = 0;
    }
}

static FORMAT_NAME: &CStr = c"qcow2b";

entries! {
/// Registers the `qcow2b` driver. Called once at start-up from QEMU's block/qcow2b.c
/// (`block_init`), before any image is opened.
#[no_mangle]
pub fn qcow2b_register() -> () {
    super::logger::install();
    to_c("register", || {
        let drv = BlockDriver {
            format_name: FORMAT_NAME.as_ptr(),
            instance_size: std::mem::size_of::<*mut Node>() as c_int,
            is_format: true,
            supports_backing: true,
            bdrv_probe: Some(qcow2b_probe),
            bdrv_open: Some(qcow2b_open),
            bdrv_close: Some(qcow2b_close),
            bdrv_reopen_prepare: Some(qcow2b_reopen_prepare),
            bdrv_reopen_commit: Some(qcow2b_reopen_commit),
            bdrv_reopen_commit_post: Some(qcow2b_reopen_commit_post),
            bdrv_reopen_abort: Some(qcow2b_reopen_abort),
            bdrv_join_options: Some(runtime_opts::join_options),
            mutable_opts: runtime_opts::mutable_opts(),
            bdrv_child_perm: Some(bindings::bdrv_default_perms),
            bdrv_co_preadv_part: Some(qcow2b_co_preadv_part),
            bdrv_co_pwritev_part: Some(qcow2b_co_pwritev_part),
            bdrv_co_pwritev_compressed_part: Some(qcow2b_co_pwritev_compressed_part),
            bdrv_co_barrier: Some(qcow2b_co_barrier),
            bdrv_detach_aio_context: Some(qcow2b_detach_aio_context),
            bdrv_attach_aio_context: Some(qcow2b_attach_aio_context),
            bdrv_co_pwrite_zeroes: Some(qcow2b_co_pwrite_zeroes),
            bdrv_co_pdiscard: Some(qcow2b_co_pdiscard),
            bdrv_co_flush_to_os: Some(qcow2b_co_flush_to_os),
            bdrv_co_flush_to_disk: Some(qcow2b_co_flush_to_disk),
            bdrv_co_truncate: Some(qcow2b_co_truncate),
            bdrv_change_backing_file: Some(qcow2b_change_backing_file),
            bdrv_make_empty: Some(qcow2b_make_empty),
            bdrv_co_block_status: Some(qcow2b_co_block_status),
            bdrv_refresh_limits: Some(qcow2b_refresh_limits),
            bdrv_has_zero_init: Some(qcow2b_has_zero_init),
            bdrv_inactivate: Some(qcow2b_inactivate),
            bdrv_co_invalidate_cache: Some(qcow2b_co_invalidate_cache),
            bdrv_get_info: Some(qcow2b_get_info),
            bdrv_get_specific_info: Some(qcow2b_get_specific_info),
            bdrv_get_specific_stats: Some(qcow2b_get_specific_stats),
            bdrv_co_check: Some(qcow2b_co_check),
            bdrv_snapshot_list: Some(qcow2b_snapshot_list),
            bdrv_snapshot_create: Some(qcow2b_snapshot_create),
            bdrv_snapshot_goto: Some(qcow2b_snapshot_goto),
            bdrv_snapshot_delete: Some(qcow2b_snapshot_delete),
            bdrv_snapshot_load_tmp: Some(qcow2b_snapshot_load_tmp),
            bdrv_save_vmstate: Some(qcow2b_save_vmstate),
            bdrv_load_vmstate: Some(qcow2b_load_vmstate),
            bdrv_co_create: Some(create::qcow2b_co_create),
            bdrv_co_create_opts: Some(create::qcow2b_co_create_opts),
            bdrv_measure: Some(create::qcow2b_measure),
            create_opts: create::create_opts(),
            bdrv_amend_options: Some(amend::qcow2b_amend_options),
            bdrv_supports_persistent_dirty_bitmap: Some(
                bitmaps::qcow2b_supports_persistent_dirty_bitmap,
            ),
            bdrv_co_can_store_new_dirty_bitmap: Some(
                bitmaps::qcow2b_co_can_store_new_dirty_bitmap,
            ),
            bdrv_co_remove_persistent_dirty_bitmap: Some(
                bitmaps::qcow2b_co_remove_persistent_dirty_bitmap,
            ),
            amend_opts: amend::amend_opts(),
            ..Default::default()
        };
        // The table lives for the whole process, as QEMU's static driver tables do.
        let drv: &'static mut BlockDriver = Box::leak(Box::new(drv));
        // SAFETY: drv is a fully initialised driver table that is never freed.
        unsafe { bindings::bdrv_register(drv) };
        // The administrator's switch may serve the name qcow2 with a copy of this table.
        super::serve_qcow2::remember_qcow2b_table(drv);
        Ok(0)
    });
    super::recorder::register();
    super::latency::register();
}
}
