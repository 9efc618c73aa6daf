//! `qemu-img amend -f qcow2b -o ...`: the driver's amendable options (QEMU 7.2's qcow2 list:
//! what it does not list, qemu-img refuses by itself with "Invalid parameter", adding "This
//! option is only supported for image creation" for the creation options) and the callback
//! that parses them into an [`Amendment`] for the engine (`engine/image/amend.rs`).

use std::ffi::{c_int, c_void, CStr};

use super::bindings::{self, BlockDriverState, QemuOpts};
use super::driver::publish_image_fields;
use super::ffi::{entries, to_c_errp};
use super::node::Node;
use super::opts::OptsView;
use super::opts::{bool_opt, leak_list, number_opt, size_opt, string_opt, Opt, OptsListCell};
use super::request;
use crate::engine::{Amendment, Backing, Error};

const SIZE: &CStr = c"size";
const COMPAT: &CStr = c"compat";
const BACKING_FILE: &CStr = c"backing_file";
const BACKING_FMT: &CStr = c"backing_fmt";
const DATA_FILE: &CStr = c"data_file";
const DATA_FILE_RAW: &CStr = c"data_file_raw";
const LAZY_REFCOUNTS: &CStr = c"lazy_refcounts";
const REFCOUNT_BITS: &CStr = c"refcount_bits";
/// LUKS key slot management (QEMU's `encrypt.` amend options): refused, by name.
const ENCRYPT_OPTS: [&CStr; 5] = [
    c"encrypt.state",
    c"encrypt.keyslot",
    c"encrypt.old-secret",
    c"encrypt.new-secret",
    c"encrypt.iter-time",
];

/// The amendable options, named and typed as QEMU 7.2's qcow2 lists them.
const AMEND_OPTS: [Opt; 13] = [
    string_opt(
        ENCRYPT_OPTS[0],
        c"Select new state of affected keyslots (active/inactive)",
    ),
    number_opt(
        ENCRYPT_OPTS[1],
        c"Select a single keyslot to modify explicitly",
    ),
    string_opt(
        ENCRYPT_OPTS[2],
        c"Select all keyslots that match this password",
    ),
    string_opt(
        ENCRYPT_OPTS[3],
        c"New secret to set in the matching keyslots",
    ),
    number_opt(ENCRYPT_OPTS[4], c"Time to spend in PBKDF in milliseconds"),
    size_opt(SIZE, c"Virtual disk size"),
    string_opt(COMPAT, c"Compatibility level (v2 [0.10] or v3 [1.1])"),
    string_opt(BACKING_FILE, c"File name of a base image"),
    string_opt(BACKING_FMT, c"Image format of the base image"),
    string_opt(DATA_FILE, c"File name of an external data file"),
    bool_opt(
        DATA_FILE_RAW,
        c"The external data file must stay valid as a raw image",
    ),
    bool_opt(LAZY_REFCOUNTS, c"Postpone refcount updates"),
    number_opt(REFCOUNT_BITS, c"Width of a reference count entry in bits"),
];

/// The option list for `BlockDriver.amend_opts`, built once.
pub fn amend_opts() -> *mut bindings::QemuOptsList {
    static LIST: OptsListCell = OptsListCell::new();
    LIST.get_or_init(|| leak_list::<14>(c"qcow2b-amend-opts", &AMEND_OPTS))
}

/// The engine's amendment from the options given (only those given: the others stay), with
/// QEMU's messages for values it refuses while parsing.
///
/// # Safety
/// `opts` is a live `QemuOpts` of the amend option list.
unsafe fn amendment(opts: *mut QemuOpts, encrypted: bool) -> Result<Amendment, Error> {
    // SAFETY: per the caller.
    let o = unsafe { OptsView::new(opts, false) };
    let mut a = Amendment::default();
    if let Some(v) = o.string(COMPAT) {
        a.version = Some(match v.as_slice() {
            b"0.10" | b"v2" => 2,
            b"1.1" | b"v3" => 3,
            _ => {
                return Err(Error::BadOption(format!(
                    "Unknown compatibility level {}",
                    String::from_utf8_lossy(&v)
                )))
            }
        });
    }
    a.size = o.size(SIZE);
    a.backing_file = o.string(BACKING_FILE);
    a.backing_format = o.string(BACKING_FMT);
    if ENCRYPT_OPTS.iter().any(|name| o.string(name).is_some()) {
        return Err(if encrypted {
            Error::Unsupported("amending the LUKS key slots of an encrypted image".into())
        } else {
            Error::BadOption("Can't amend encryption options - encryption not present".into())
        });
    }
    a.lazy_refcounts = o.bool(LAZY_REFCOUNTS);
    if let Some(bits) = o.number(REFCOUNT_BITS) {
        if bits == 0 || bits > 64 || !bits.is_power_of_two() {
            return Err(Error::BadOption(
                "Refcount width must be a power of two and may not exceed 64 bits".into(),
            ));
        }
        a.refcount_bits = Some(bits as u32);
    }
    a.data_file = o.string(DATA_FILE);
    a.data_file_raw = o.bool(DATA_FILE_RAW);
    Ok(a)
}

entries! {
/// `bdrv_amend_options`: called by qemu-img in the main loop, outside any coroutine; the node
/// is drained for it (as for `make_empty`), so no request sees the image change under it.
pub fn qcow2b_amend_options(
    bs: *mut BlockDriverState,
    opts: *mut QemuOpts,
    status_cb: bindings::BlockDriverAmendStatusCB,
    cb_opaque: *mut c_void,
    _force: bool,
    errp: *mut *mut bindings::Error,
) -> c_int, errp = errp {
    // SAFETY: QEMU passes an open node and a live QemuOpts, in the main loop.
    unsafe { bindings::bdrv_drained_begin(bs) };
    // SAFETY: errp is QEMU's; the node is drained until the end below; status_cb and
    // cb_opaque are qemu-img's progress callback and its argument, valid for this call.
    let ret = unsafe {
        to_c_errp("amend", errp, || {
            let node = Node::of(bs);
            node.drain_ordered_buffer("amend")?;
            let image = node.image_drained();
            let amendment = amendment(opts, image.header().crypt_method != 0)?;
            let backing = request::backing_of(bs);
            // The engine shares the progress among an amend's steps.
            let mut progress = |done: u64, total: u64| {
                if let Some(cb) = status_cb {
                    // QEMU's callback with its own opaque pointer, on this node (inside the
                    // entry's unsafe block: see its SAFETY note).
                    cb(bs, done as i64, total as i64, cb_opaque);
                }
            };
            image.amend_with_progress(
                &amendment,
                backing.as_ref().map(|b| b as &dyn Backing),
                &mut progress,
            )?;
            publish_image_fields(bs, image)?;
            Ok(0)
        })
    };
    // SAFETY: ends the section begun above.
    unsafe { bindings::bdrv_drained_end(bs) };
    ret
}
}
