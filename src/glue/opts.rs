//! QEMU option lists (`QemuOptsList`) declared from Rust tables: the driver's runtime options
//! (`-drive driver=qcow2b,l2-cache-size=...`) and its creation options (`qemu-img create -o`).
//!
//! A `QemuOptsList` ends in a flexible array of `QemuOptDesc` terminated by an entry whose name
//! is NULL; [`OptsList`] lays the array out right after the header, as C does.

use std::ffi::CStr;
use std::ptr;

use super::bindings::{self, QemuOptDesc, QemuOptType, QemuOptsList};

/// An option list built on first use and kept for the life of the process (a driver's
/// runtime or creation options): `static LIST: OptsListCell = OptsListCell::new();`.
pub struct OptsListCell(std::sync::OnceLock<ListPtr>);

struct ListPtr(*mut QemuOptsList);
// SAFETY: the list is built once, never changed afterwards, and only read by QEMU.
unsafe impl Send for ListPtr {}
// SAFETY: as above.
unsafe impl Sync for ListPtr {}

impl OptsListCell {
    pub const fn new() -> OptsListCell {
        OptsListCell(std::sync::OnceLock::new())
    }

    /// The list, built by `build` the first time.
    pub fn get_or_init(&self, build: impl FnOnce() -> *mut QemuOptsList) -> *mut QemuOptsList {
        self.0.get_or_init(|| ListPtr(build())).0
    }
}

/// One option: its name, type and help text.
pub struct Opt {
    pub name: &'static CStr,
    pub kind: QemuOptType,
    pub help: &'static CStr,
}

pub const fn size_opt(name: &'static CStr, help: &'static CStr) -> Opt {
    Opt {
        name,
        kind: bindings::QEMU_OPT_SIZE,
        help,
    }
}

pub const fn string_opt(name: &'static CStr, help: &'static CStr) -> Opt {
    Opt {
        name,
        kind: bindings::QEMU_OPT_STRING,
        help,
    }
}

pub const fn bool_opt(name: &'static CStr, help: &'static CStr) -> Opt {
    Opt {
        name,
        kind: bindings::QEMU_OPT_BOOL,
        help,
    }
}

pub const fn number_opt(name: &'static CStr, help: &'static CStr) -> Opt {
    Opt {
        name,
        kind: bindings::QEMU_OPT_NUMBER,
        help,
    }
}

/// A `QemuOptsList` with `N` descriptors (the last one the NULL terminator), laid out as the C
/// flexible array member expects.
#[repr(C)]
pub struct OptsList<const N: usize> {
    list: QemuOptsList,
    desc: [QemuOptDesc; N],
}

/// Builds a list named `name` from `opts` and leaks it: QEMU keeps pointers to option lists for
/// the whole process (driver tables, `qemu-img create -o help`).
///
/// `N` must be `opts.len() + 1`; a wrong `N` is a programming error caught at registration.
pub fn leak_list<const N: usize>(name: &'static CStr, opts: &[Opt]) -> *mut QemuOptsList {
    assert_eq!(
        N,
        opts.len() + 1,
        "option list {name:?} needs room for its terminator"
    );
    let mut desc = [QemuOptDesc {
        name: ptr::null(),
        type_: 0,
        help: ptr::null(),
        def_value_str: ptr::null(),
    }; N];
    for (d, o) in desc.iter_mut().zip(opts) {
        d.name = o.name.as_ptr();
        d.type_ = o.kind;
        d.help = o.help.as_ptr();
    }
    let list = Box::leak(Box::new(OptsList::<N> {
        list: QemuOptsList {
            name: name.as_ptr(),
            ..Default::default()
        },
        desc,
    }));
    let head = &mut list.list;
    // QTAILQ_HEAD_INITIALIZER: an empty tail queue's last-pointer points at its own first field.
    // SAFETY: tqh_circ is the union member QTAILQ uses; writing it initialises it.
    head.head.tqh_circ.tql_prev = unsafe { &mut head.head.tqh_circ };
    &mut list.list
}

/// Owned `QemuOpts` filled from a `QDict`; deleted on drop.
pub struct Opts(*mut bindings::QemuOpts);

impl Opts {
    /// Creates options of `list` and moves the keys it knows out of `options` (the rest stay,
    /// so the block layer can report unknown ones).
    ///
    /// # Safety
    /// `list` must be a list from [`leak_list`]; `options` a valid QDict; `errp` valid.
    pub unsafe fn absorb(
        list: *mut QemuOptsList,
        options: *mut bindings::QDict,
        errp: *mut *mut bindings::Error,
    ) -> Option<Opts> {
        // SAFETY: per the caller; a NULL id and fail_if_exists=false cannot fail.
        let opts = unsafe { bindings::qemu_opts_create(list, ptr::null(), 0, errp) };
        if opts.is_null() {
            return None;
        }
        let opts = Opts(opts);
        // SAFETY: opts was just created; options and errp are valid per the caller.
        unsafe { bindings::qemu_opts_absorb_qdict(opts.0, options, errp) }.then_some(opts)
    }

    fn present(&self, name: &CStr) -> bool {
        // SAFETY: self.0 is a live QemuOpts; name is NUL-terminated.
        unsafe { !bindings::qemu_opt_get(self.0, name.as_ptr()).is_null() }
    }

    /// The string option `name`, if it was given.
    pub fn string(&self, name: &CStr) -> Option<String> {
        // SAFETY: self.0 is a live QemuOpts; the string it returns is owned by it.
        let raw = unsafe { bindings::qemu_opt_get(self.0, name.as_ptr()) };
        (!raw.is_null()).then(|| {
            // SAFETY: a non-NULL result is a NUL-terminated string.
            unsafe { CStr::from_ptr(raw) }
                .to_string_lossy()
                .into_owned()
        })
    }

    /// The number option `name`, if it was given.
    pub fn number(&self, name: &CStr) -> Option<u64> {
        // SAFETY: as above.
        self.present(name)
            .then(|| unsafe { bindings::qemu_opt_get_number(self.0, name.as_ptr(), 0) })
    }

    /// The boolean option `name`, if it was given.
    pub fn bool(&self, name: &CStr) -> Option<bool> {
        // SAFETY: as above.
        self.present(name)
            .then(|| unsafe { bindings::qemu_opt_get_bool(self.0, name.as_ptr(), false) })
    }

    /// The size option `name`, if it was given.
    pub fn size(&self, name: &CStr) -> Option<u64> {
        // SAFETY: self.0 is a live QemuOpts; name is NUL-terminated.
        let present = unsafe { !bindings::qemu_opt_get(self.0, name.as_ptr()).is_null() };
        // SAFETY: as above.
        present.then(|| unsafe { bindings::qemu_opt_get_size(self.0, name.as_ptr(), 0) })
    }
}

impl Drop for Opts {
    fn drop(&mut self) {
        // SAFETY: self.0 came from qemu_opts_create and is deleted once.
        unsafe { bindings::qemu_opts_del(self.0) };
    }
}

/// Typed values of a `QemuOpts` QEMU owns (`qemu-img create -o`, `measure -o`): each getter
/// gives the value of an option that was given, as QEMU parsed it. With `take`, the option is
/// removed as it is read (what is left goes to the protocol layer).
pub struct OptsView {
    opts: *mut bindings::QemuOpts,
    take: bool,
}

impl OptsView {
    /// # Safety
    /// `opts` must be a live `QemuOpts` that outlives the view, of a list that has every
    /// option asked for.
    pub unsafe fn new(opts: *mut bindings::QemuOpts, take: bool) -> OptsView {
        OptsView { opts, take }
    }

    fn given(&self, name: &CStr) -> bool {
        // SAFETY: a live QemuOpts (constructor contract); our lists have no defaults, so NULL
        // means not given.
        unsafe { !bindings::qemu_opt_get(self.opts, name.as_ptr()).is_null() }
    }

    /// The value of `name` through QEMU's typed getter: `del` when the view takes options,
    /// `get` otherwise.
    fn typed<T>(
        &self,
        name: &CStr,
        default: T,
        get: unsafe extern "C" fn(*mut bindings::QemuOpts, *const std::ffi::c_char, T) -> T,
        del: unsafe extern "C" fn(*mut bindings::QemuOpts, *const std::ffi::c_char, T) -> T,
    ) -> Option<T> {
        let getter = if self.take { del } else { get };
        // SAFETY: as above; the option is given, so the typed getter parses its value.
        self.given(name)
            .then(|| unsafe { getter(self.opts, name.as_ptr(), default) })
    }

    pub fn size(&self, name: &CStr) -> Option<u64> {
        use bindings::{qemu_opt_get_size, qemu_opt_get_size_del};
        self.typed(name, 0, qemu_opt_get_size, qemu_opt_get_size_del)
    }

    pub fn number(&self, name: &CStr) -> Option<u64> {
        use bindings::{qemu_opt_get_number, qemu_opt_get_number_del};
        self.typed(name, 0, qemu_opt_get_number, qemu_opt_get_number_del)
    }

    pub fn bool(&self, name: &CStr) -> Option<bool> {
        use bindings::{qemu_opt_get_bool, qemu_opt_get_bool_del};
        self.typed(name, false, qemu_opt_get_bool, qemu_opt_get_bool_del)
    }

    /// A string value, as the bytes it is.
    pub fn string(&self, name: &CStr) -> Option<Vec<u8>> {
        if !self.given(name) {
            return None;
        }
        // SAFETY: as above: given, so non-NULL; the string from qemu_opt_get_del is ours to
        // free, the one from qemu_opt_get belongs to the options.
        unsafe {
            if self.take {
                let owned = bindings::qemu_opt_get_del(self.opts, name.as_ptr());
                let bytes = CStr::from_ptr(owned).to_bytes().to_vec();
                bindings::g_free(owned.cast());
                Some(bytes)
            } else {
                let raw = bindings::qemu_opt_get(self.opts, name.as_ptr());
                Some(CStr::from_ptr(raw).to_bytes().to_vec())
            }
        }
    }
}
