//! Test doubles of the QEMU functions the glue calls, for the glue's Rust tests (feature
//! `glue-tests`): the test binary links these instead of QEMU, so the exported driver table
//! can be called from Rust, as nbdkit's Rust bindings test their plugin table.
//!
//! The model is QEMU's, made synchronous and single-threaded:
//! - a node's `file` child is an in-memory file ([`set_next_file`] gives the one the next
//!   open attaches, [`file_of`] returns its bytes); reads past its end read zeros;
//! - a coroutine runs to its end when it is entered ([`aio_co_enter`]), in "coroutine
//!   context" ([`set_in_coroutine`] for the test's own calls); nothing ever waits: a wait on
//!   a queue, or a second lock of a held mutex, would block forever here, so it aborts the
//!   test binary with a message saying which;
//! - option lists and QDicts are Rust values behind the pointers QEMU would pass;
//! - the variadic reporting functions are in `qemu_stubs.c` and land in [`messages`].
//!
//! - timers are armed and deleted, and never fire (no event loop runs; the tests exercise
//!   no timer's work);
//! - a discard on the file is counted and changes nothing (it is advisory).
//!
//! What the glue calls but these tests do not exercise (image creation through a
//! BlockBackend, block status, drained sections, QEMU's crypto layer for encrypted images)
//! aborts with "not modelled", so a test that reaches it fails loudly instead of passing on
//! a stand-in.
//!
//! Each double has the signature of its binding, checked at compile time.

#![allow(clippy::missing_safety_doc, clippy::undocumented_unsafe_blocks)]

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr;
use std::sync::Mutex;

use super::bindings::{
    self, gchar, gpointer, gsize, iovec, AioContext, BdrvChild, BdrvChildRole, BdrvDirtyBitmap,
    BdrvRequestFlags, BlkdebugEvent, BlockBackend, BlockDriver, BlockDriverState, BlockReopenQueue,
    CoMutex, CoQueue, CoQueueWaitFlags, Coroutine, CoroutineEntry, Error, PreallocMode,
    QCryptoBlock, QCryptoBlockCreateOptions, QCryptoBlockInfo, QCryptoBlockInitFunc,
    QCryptoBlockOpenOptions, QCryptoBlockReadFunc, QCryptoBlockWriteFunc, QDict, QEMUClockType,
    QEMUIOVector, QEMUTimer, QEMUTimerCB, QEMUTimerListGroup, QObject, QemuCoSleep, QemuLockable,
    QemuOpts, QemuOptsList,
};

/// Makes a `#[no_mangle]` double of each named QEMU function, and checks at compile time
/// that its signature is the binding's.
macro_rules! doubles {
    ($(fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) $(-> $ret)? $body
        const _: unsafe extern "C" fn($($ty),*) $(-> $ret)? = bindings::$name;
    )*};
}

/// Stops the test binary: the glue reached something this model does not cover.
fn unmodelled(what: &str) -> ! {
    eprintln!("qemu_stubs: {what} is not modelled by the glue's tests");
    std::process::abort()
}

thread_local! {
    static FILES: RefCell<HashMap<usize, Vec<u8>>> = RefCell::new(HashMap::new());
    static FLUSHES: RefCell<HashMap<usize, u64>> = RefCell::new(HashMap::new());
    static NEXT_FILE: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
    static IN_COROUTINE: Cell<bool> = const { Cell::new(false) };
    static LOCKED: RefCell<HashSet<usize>> = RefCell::new(HashSet::new());
    static IN_FLIGHT: Cell<i64> = const { Cell::new(0) };
    static MESSAGES: RefCell<Vec<(c_int, String)>> = const { RefCell::new(Vec::new()) };
    static ARMED: RefCell<HashSet<usize>> = RefCell::new(HashSet::new());
}

/// QEMU's class of a node's ordinary children, which `bdrv_open_child` is given.
#[no_mangle]
pub static child_of_bds: bindings::BdrvChildClass = unsafe { std::mem::zeroed() };

/// The names of QEMU's block drivers (`BlockdevDriver_str`), which only `blockdev-create`
/// reads (through `qapi_enum_lookup`, not modelled): empty here.
#[repr(transparent)]
pub struct EnumLookup(bindings::QEnumLookup);

// SAFETY: the table is never written, and its null pointers are never read.
unsafe impl Sync for EnumLookup {}

#[no_mangle]
pub static BlockdevDriver_lookup: EnumLookup = EnumLookup(unsafe { std::mem::zeroed() });

/// Drivers registered with `bdrv_register`, by name (process-wide, as QEMU's list is).
static DRIVERS: Mutex<Vec<(String, usize)>> = Mutex::new(Vec::new());

/// The file the next `bdrv_open_file_child` attaches.
pub fn set_next_file(bytes: Vec<u8>) {
    NEXT_FILE.with(|f| *f.borrow_mut() = Some(bytes));
}

/// The bytes of the file node `file_bs`.
pub fn file_of(file_bs: *mut BlockDriverState) -> Vec<u8> {
    FILES.with(|f| {
        f.borrow()
            .get(&(file_bs as usize))
            .cloned()
            .unwrap_or_default()
    })
}

/// Flushes of the file node `file_bs` so far.
pub fn flushes_of(file_bs: *mut BlockDriverState) -> u64 {
    FLUSHES.with(|f| f.borrow().get(&(file_bs as usize)).copied().unwrap_or(0))
}

/// Whether calls from the test count as coroutine context (the block layer runs request
/// callbacks in coroutines, open and close outside them).
pub fn set_in_coroutine(on: bool) {
    IN_COROUTINE.with(|c| c.set(on));
}

/// Coroutines counted as requests and not yet done (`bdrv_inc/dec_in_flight`).
pub fn in_flight() -> i64 {
    IN_FLIGHT.with(Cell::get)
}

/// The messages reported so far (0 error_report, 1 error_printf, 2 error_setg, 3
/// error_append_hint), taken.
pub fn messages() -> Vec<(c_int, String)> {
    MESSAGES.with(|m| std::mem::take(&mut *m.borrow_mut()))
}

/// The driver registered as `name`.
pub fn driver(name: &str) -> *mut BlockDriver {
    let drivers = DRIVERS.lock().unwrap();
    let found = drivers.iter().find(|(n, _)| n == name);
    found.map_or(ptr::null_mut(), |&(_, p)| p as *mut BlockDriver)
}

/// Where the C doubles of the variadic functions hand their text; an `Error *` is set to the
/// token returned.
#[no_mangle]
pub unsafe extern "C" fn qcow2b_test_message(kind: c_int, text: *const c_char) -> *mut c_void {
    let text = unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned();
    MESSAGES.with(|m| m.borrow_mut().push((kind, text)));
    ptr::NonNull::<u8>::dangling().as_ptr().cast()
}

/// A QDict as the tests pass one: keys and values, taken by the options that know them.
pub struct FakeDict(pub Vec<(CString, CString)>);

impl FakeDict {
    pub fn new(pairs: &[(&str, &str)]) -> Box<FakeDict> {
        let pairs = pairs.iter();
        let owned = pairs.map(|(k, v)| (CString::new(*k).unwrap(), CString::new(*v).unwrap()));
        Box::new(FakeDict(owned.collect()))
    }
}

/// What `qemu_opts_create` makes: the list's option names and the values taken.
struct FakeOpts {
    names: Vec<CString>,
    values: Vec<(CString, CString)>,
}

fn opts<'a>(p: *mut QemuOpts) -> &'a mut FakeOpts {
    unsafe { &mut *(p as *mut FakeOpts) }
}

fn opt_value(p: *mut QemuOpts, name: *const c_char, take: bool) -> Option<CString> {
    let name = unsafe { CStr::from_ptr(name) };
    let o = opts(p);
    let at = o.values.iter().position(|(k, _)| k.as_c_str() == name)?;
    Some(if take {
        o.values.remove(at).1
    } else {
        o.values[at].1.clone()
    })
}

fn parse_size(v: &CStr) -> u64 {
    let t = v.to_str().unwrap();
    let (digits, shift) = match t.as_bytes().last() {
        Some(b'k' | b'K') => (&t[..t.len() - 1], 10),
        Some(b'M') => (&t[..t.len() - 1], 20),
        Some(b'G') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    digits.parse::<u64>().unwrap() << shift
}

fn parse_bool(v: &CStr) -> bool {
    matches!(v.to_bytes(), b"on" | b"yes" | b"true")
}

fn with_file<T>(child: *mut BdrvChild, f: impl FnOnce(&mut Vec<u8>) -> T) -> T {
    let bs = unsafe { (*child).bs } as usize;
    FILES.with(|files| f(files.borrow_mut().entry(bs).or_default()))
}

fn read_file(child: *mut BdrvChild, offset: i64, out: &mut [u8]) {
    with_file(child, |file| {
        let start = (offset as usize).min(file.len());
        let end = (start + out.len()).min(file.len());
        out[..end - start].copy_from_slice(&file[start..end]);
        out[end - start..].fill(0);
    });
}

fn write_file(child: *mut BdrvChild, offset: i64, data: &[u8]) {
    with_file(child, |file| {
        let end = offset as usize + data.len();
        if file.len() < end {
            file.resize(end, 0);
        }
        file[offset as usize..end].copy_from_slice(data);
    });
}

/// The iovecs of `qiov`.
fn iovs<'a>(qiov: *mut QEMUIOVector) -> &'a mut [iovec] {
    unsafe {
        if (*qiov).niov == 0 {
            return &mut [];
        }
        std::slice::from_raw_parts_mut((*qiov).iov, (*qiov).niov as usize)
    }
}

fn qiov_size(qiov: *mut QEMUIOVector) -> usize {
    iovs(qiov).iter().map(|v| v.iov_len).sum()
}

/// Copies between `qiov` from `offset` and `buf` (into the qiov with `into_qiov`).
fn qiov_copy(qiov: *mut QEMUIOVector, offset: usize, buf: *mut u8, bytes: usize, into_qiov: bool) {
    let (mut skip, mut done) = (offset, 0);
    for v in iovs(qiov) {
        if done == bytes {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(bytes - done);
        unsafe {
            let at = (v.iov_base as *mut u8).add(skip);
            if into_qiov {
                ptr::copy_nonoverlapping(buf.add(done), at, n);
            } else {
                ptr::copy_nonoverlapping(at, buf.add(done), n);
            }
        }
        skip = 0;
        done += n;
    }
    assert_eq!(done, bytes, "an I/O vector shorter than its request");
}

fn qiov_bytes(qiov: *mut QEMUIOVector, offset: usize, bytes: usize) -> Vec<u8> {
    let mut buf = vec![0u8; bytes];
    qiov_copy(qiov, offset, buf.as_mut_ptr(), bytes, false);
    buf
}

struct FakeCoroutine {
    entry: CoroutineEntry,
    opaque: *mut c_void,
}

doubles! {
    fn bdrv_register(bdrv: *mut BlockDriver) {
        let name = unsafe { CStr::from_ptr((*bdrv).format_name) };
        let mut drivers = DRIVERS.lock().unwrap();
        drivers.push((name.to_string_lossy().into_owned(), bdrv as usize));
    }

    fn bdrv_open_file_child(
        _filename: *const c_char,
        _options: *mut QDict,
        _bdref_key: *const c_char,
        parent: *mut BlockDriverState,
        _errp: *mut *mut bindings::Error,
    ) -> c_int {
        let bytes = NEXT_FILE.with(|f| f.borrow_mut().take()).expect("set_next_file first");
        let file_drv = Box::leak(Box::new(BlockDriver {
            format_name: c"file".as_ptr(),
            ..Default::default()
        }));
        let file_bs = Box::leak(Box::new(BlockDriverState {
            drv: file_drv,
            ..Default::default()
        }));
        let child = Box::leak(Box::new(BdrvChild {
            bs: file_bs,
            ..Default::default()
        }));
        FILES.with(|f| f.borrow_mut().insert(file_bs as *mut _ as usize, bytes));
        unsafe { (*parent).file = child };
        0
    }

    // No image in these tests has an external data file: no `data-file` child.
    fn bdrv_open_child(
        _filename: *const c_char,
        _options: *mut QDict,
        _bdref_key: *const c_char,
        _parent: *mut BlockDriverState,
        _child_class: *const bindings::BdrvChildClass,
        _child_role: BdrvChildRole,
        _allow_none: bool,
        _errp: *mut *mut bindings::Error,
    ) -> *mut BdrvChild {
        ptr::null_mut()
    }

    fn bdrv_child_refresh_perms(
        _bs: *mut BlockDriverState,
        _c: *mut BdrvChild,
        _errp: *mut *mut bindings::Error,
    ) -> c_int {
        unmodelled("bdrv_child_refresh_perms (an external data file)")
    }

    fn bdrv_getlength(bs: *mut BlockDriverState) -> i64 {
        FILES.with(|f| f.borrow().get(&(bs as usize)).map_or(0, |b| b.len() as i64))
    }

    // A file in memory is allocated as far as it is long.
    fn bdrv_get_allocated_file_size(bs: *mut BlockDriverState) -> i64 {
        FILES.with(|f| f.borrow().get(&(bs as usize)).map_or(0, |b| b.len() as i64))
    }

    fn bdrv_pread(
        child: *mut BdrvChild,
        offset: i64,
        bytes: i64,
        buf: *mut c_void,
        _flags: BdrvRequestFlags,
    ) -> c_int {
        let out = unsafe { std::slice::from_raw_parts_mut(buf as *mut u8, bytes as usize) };
        read_file(child, offset, out);
        0
    }

    fn bdrv_pwrite(
        child: *mut BdrvChild,
        offset: i64,
        bytes: i64,
        buf: *const c_void,
        _flags: BdrvRequestFlags,
    ) -> c_int {
        let data = unsafe { std::slice::from_raw_parts(buf as *const u8, bytes as usize) };
        write_file(child, offset, data);
        0
    }

    fn bdrv_co_preadv_part(
        child: *mut BdrvChild,
        offset: i64,
        bytes: i64,
        qiov: *mut QEMUIOVector,
        qiov_offset: usize,
        _flags: BdrvRequestFlags,
    ) -> c_int {
        let mut buf = vec![0u8; bytes as usize];
        read_file(child, offset, &mut buf);
        qiov_copy(qiov, qiov_offset, buf.as_mut_ptr(), buf.len(), true);
        0
    }

    fn bdrv_co_pwritev_part(
        child: *mut BdrvChild,
        offset: i64,
        bytes: i64,
        qiov: *mut QEMUIOVector,
        qiov_offset: usize,
        _flags: BdrvRequestFlags,
    ) -> c_int {
        write_file(child, offset, &qiov_bytes(qiov, qiov_offset, bytes as usize));
        0
    }

    fn bdrv_co_pwritev(
        child: *mut BdrvChild,
        offset: i64,
        bytes: i64,
        qiov: *mut QEMUIOVector,
        _flags: BdrvRequestFlags,
    ) -> c_int {
        write_file(child, offset, &qiov_bytes(qiov, 0, bytes as usize));
        0
    }

    fn bdrv_co_pwrite_zeroes(
        child: *mut BdrvChild,
        offset: i64,
        bytes: i64,
        _flags: BdrvRequestFlags,
    ) -> c_int {
        write_file(child, offset, &vec![0u8; bytes as usize]);
        0
    }

    fn bdrv_co_pdiscard(_child: *mut BdrvChild, _offset: i64, _bytes: i64) -> c_int {
        0
    }

    fn bdrv_pdiscard(_child: *mut BdrvChild, _offset: i64, _bytes: i64) -> c_int {
        0
    }

    fn bdrv_flush(bs: *mut BlockDriverState) -> c_int {
        FLUSHES.with(|f| *f.borrow_mut().entry(bs as usize).or_default() += 1);
        0
    }

    fn bdrv_co_flush(bs: *mut BlockDriverState) -> c_int {
        unsafe { bdrv_flush(bs) }
    }

    fn bdrv_co_barrier(child: *mut BdrvChild, _flags: BdrvRequestFlags) -> c_int {
        // file-posix answers a barrier without a registered primitive with a sync.
        unsafe { bdrv_flush((*child).bs) }
    }

    fn bdrv_truncate(
        child: *mut BdrvChild,
        offset: i64,
        _exact: bool,
        _prealloc: PreallocMode,
        _flags: BdrvRequestFlags,
        _errp: *mut *mut bindings::Error,
    ) -> c_int {
        with_file(child, |file| file.resize(offset as usize, 0));
        0
    }

    fn bdrv_co_truncate(
        _child: *mut BdrvChild,
        _offset: i64,
        _exact: bool,
        _prealloc: PreallocMode,
        _flags: BdrvRequestFlags,
        _errp: *mut *mut bindings::Error,
    ) -> c_int {
        unmodelled("bdrv_co_truncate")
    }

    fn bdrv_debug_event(_bs: *mut BlockDriverState, _event: BlkdebugEvent) {}

    fn bdrv_skip_filters(bs: *mut BlockDriverState) -> *mut BlockDriverState {
        bs
    }

    fn bdrv_get_aio_context(_bs: *mut BlockDriverState) -> *mut AioContext {
        ptr::NonNull::<AioContext>::dangling().as_ptr()
    }

    fn bdrv_inc_in_flight(_bs: *mut BlockDriverState) {
        IN_FLIGHT.with(|n| n.set(n.get() + 1));
    }

    fn bdrv_dec_in_flight(_bs: *mut BlockDriverState) {
        IN_FLIGHT.with(|n| n.set(n.get() - 1));
    }

    fn bdrv_drained_begin(_bs: *mut BlockDriverState) {
        unmodelled("bdrv_drained_begin")
    }

    fn bdrv_drained_end(_bs: *mut BlockDriverState) {
        unmodelled("bdrv_drained_end")
    }

    fn bdrv_default_perms(
        _bs: *mut BlockDriverState,
        _c: *mut BdrvChild,
        _role: BdrvChildRole,
        _reopen_queue: *mut BlockReopenQueue,
        _perm: u64,
        _shared: u64,
        _nperm: *mut u64,
        _nshared: *mut u64,
    ) {
        unmodelled("bdrv_default_perms")
    }

    fn bdrv_block_status_above(
        _bs: *mut BlockDriverState,
        _base: *mut BlockDriverState,
        _offset: i64,
        _bytes: i64,
        _pnum: *mut i64,
        _map: *mut i64,
        _file: *mut *mut BlockDriverState,
    ) -> c_int {
        unmodelled("bdrv_block_status_above")
    }

    fn bdrv_create_file(
        _filename: *const c_char,
        _opts: *mut QemuOpts,
        _errp: *mut *mut bindings::Error,
    ) -> c_int {
        unmodelled("bdrv_create_file")
    }

    fn blk_new_open(
        _filename: *const c_char,
        _reference: *const c_char,
        _options: *mut QDict,
        _flags: c_int,
        _errp: *mut *mut bindings::Error,
    ) -> *mut BlockBackend {
        unmodelled("blk_new_open")
    }

    fn blk_unref(_blk: *mut BlockBackend) {
        unmodelled("blk_unref")
    }

    // blockdev-create's nodes: image creation is not modelled (see the module's docs).
    fn bdrv_open_blockdev_ref(
        _reference: *mut bindings::BlockdevRef,
        _errp: *mut *mut bindings::Error,
    ) -> *mut BlockDriverState {
        unmodelled("bdrv_open_blockdev_ref")
    }

    fn bdrv_unref(_bs: *mut BlockDriverState) {
        unmodelled("bdrv_unref")
    }

    fn blk_new_with_bs(
        _bs: *mut BlockDriverState,
        _perm: u64,
        _shared_perm: u64,
        _errp: *mut *mut bindings::Error,
    ) -> *mut BlockBackend {
        unmodelled("blk_new_with_bs")
    }

    fn qapi_enum_lookup(
        _lookup: *const bindings::QEnumLookup,
        _val: c_int,
    ) -> *const c_char {
        unmodelled("qapi_enum_lookup")
    }

    fn blk_pread(
        _blk: *mut BlockBackend,
        _offset: i64,
        _bytes: i64,
        _buf: *mut c_void,
        _flags: BdrvRequestFlags,
    ) -> c_int {
        unmodelled("blk_pread")
    }

    fn blk_pwrite(
        _blk: *mut BlockBackend,
        _offset: i64,
        _bytes: i64,
        _buf: *const c_void,
        _flags: BdrvRequestFlags,
    ) -> c_int {
        unmodelled("blk_pwrite")
    }

    fn blk_flush(_blk: *mut BlockBackend) -> c_int {
        unmodelled("blk_flush")
    }

    fn blk_getlength(_blk: *mut BlockBackend) -> i64 {
        unmodelled("blk_getlength")
    }

    fn blk_truncate(
        _blk: *mut BlockBackend,
        _offset: i64,
        _exact: bool,
        _prealloc: PreallocMode,
        _flags: BdrvRequestFlags,
        _errp: *mut *mut bindings::Error,
    ) -> c_int {
        unmodelled("blk_truncate")
    }

    fn blk_set_allow_write_beyond_eof(_blk: *mut BlockBackend, _allow: bool) {
        unmodelled("blk_set_allow_write_beyond_eof")
    }

    fn qemu_in_coroutine() -> bool {
        IN_COROUTINE.with(Cell::get)
    }

    fn qemu_coroutine_create(entry: CoroutineEntry, opaque: *mut c_void) -> *mut Coroutine {
        Box::into_raw(Box::new(FakeCoroutine { entry, opaque })).cast()
    }

    fn aio_co_enter(_ctx: *mut AioContext, co: *mut Coroutine) {
        let co = unsafe { Box::from_raw(co as *mut FakeCoroutine) };
        let outer = IN_COROUTINE.with(|c| c.replace(true));
        unsafe { (co.entry.expect("a coroutine entry"))(co.opaque) };
        IN_COROUTINE.with(|c| c.set(outer));
    }

    fn aio_poll(_ctx: *mut AioContext, _blocking: bool) -> bool {
        false
    }

    fn qemu_co_mutex_init(_mutex: *mut CoMutex) {}

    fn qemu_co_mutex_lock(mutex: *mut CoMutex) {
        if !LOCKED.with(|l| l.borrow_mut().insert(mutex as usize)) {
            unmodelled("a second lock of a held CoMutex (it would wait)")
        }
    }

    fn qemu_co_mutex_unlock(mutex: *mut CoMutex) {
        assert!(LOCKED.with(|l| l.borrow_mut().remove(&(mutex as usize))));
    }

    fn qemu_co_queue_init(_queue: *mut CoQueue) {}

    fn qemu_co_queue_empty(_queue: *mut CoQueue) -> bool {
        true
    }

    fn qemu_co_queue_next(_queue: *mut CoQueue) -> bool {
        false
    }

    fn qemu_co_queue_restart_all(_queue: *mut CoQueue) {}

    fn qemu_co_queue_wait_impl(
        _queue: *mut CoQueue,
        _lock: *mut QemuLockable,
        _flags: CoQueueWaitFlags,
    ) {
        unmodelled("a wait on a CoQueue (nothing would wake it)")
    }

    fn qemu_co_sleep_ns_wakeable(_w: *mut QemuCoSleep, _type_: QEMUClockType, _ns: i64) {}

    fn qemu_clock_get_ns(_type_: QEMUClockType) -> i64 {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        START.get_or_init(std::time::Instant::now).elapsed().as_nanos() as i64
    }

    fn timer_init_full(
        _ts: *mut QEMUTimer,
        _timer_list_group: *mut QEMUTimerListGroup,
        _type_: QEMUClockType,
        _scale: c_int,
        _attributes: c_int,
        _cb: QEMUTimerCB,
        _opaque: *mut c_void,
    ) {
    }

    fn timer_mod(ts: *mut QEMUTimer, _expire_timer: i64) {
        ARMED.with(|a| a.borrow_mut().insert(ts as usize));
    }

    fn timer_del(ts: *mut QEMUTimer) {
        ARMED.with(|a| a.borrow_mut().remove(&(ts as usize)));
    }

    fn timer_deinit(ts: *mut QEMUTimer) {
        ARMED.with(|a| a.borrow_mut().remove(&(ts as usize)));
    }

    fn timer_pending(ts: *mut QEMUTimer) -> bool {
        ARMED.with(|a| a.borrow().contains(&(ts as usize)))
    }

    fn qemu_iovec_init(qiov: *mut QEMUIOVector, _alloc_hint: c_int) {
        unsafe {
            (*qiov).iov = ptr::null_mut();
            (*qiov).niov = 0;
        }
    }

    fn qemu_iovec_add(qiov: *mut QEMUIOVector, base: *mut c_void, len: usize) {
        let mut v: Vec<iovec> = iovs(qiov).to_vec();
        v.push(iovec { iov_base: base, iov_len: len });
        unsafe {
            if !(*qiov).iov.is_null() {
                drop(Box::from_raw(iovs(qiov) as *mut [iovec]));
            }
            (*qiov).niov = v.len() as c_int;
            (*qiov).iov = Box::leak(v.into_boxed_slice()).as_mut_ptr();
            (*qiov).__bindgen_anon_1.__bindgen_anon_2.size = qiov_size(qiov);
        }
    }

    fn qemu_iovec_concat(
        dst: *mut QEMUIOVector,
        src: *mut QEMUIOVector,
        soffset: usize,
        sbytes: usize,
    ) {
        let (mut skip, mut left) = (soffset, sbytes);
        for v in iovs(src).to_vec() {
            if left == 0 {
                break;
            }
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            let n = (v.iov_len - skip).min(left);
            unsafe { qemu_iovec_add(dst, (v.iov_base as *mut u8).add(skip).cast(), n) };
            skip = 0;
            left -= n;
        }
    }

    fn qemu_iovec_destroy(qiov: *mut QEMUIOVector) {
        unsafe {
            if !(*qiov).iov.is_null() {
                drop(Box::from_raw(iovs(qiov) as *mut [iovec]));
            }
            (*qiov).iov = ptr::null_mut();
            (*qiov).niov = 0;
        }
    }

    fn qemu_iovec_to_buf(
        qiov: *mut QEMUIOVector,
        offset: usize,
        buf: *mut c_void,
        bytes: usize,
    ) -> usize {
        qiov_copy(qiov, offset, buf.cast(), bytes, false);
        bytes
    }

    fn qemu_iovec_from_buf(
        qiov: *mut QEMUIOVector,
        offset: usize,
        buf: *const c_void,
        bytes: usize,
    ) -> usize {
        qiov_copy(qiov, offset, buf as *mut u8, bytes, true);
        bytes
    }

    fn qemu_iovec_memset(
        qiov: *mut QEMUIOVector,
        offset: usize,
        fillc: c_int,
        bytes: usize,
    ) -> usize {
        let mut fill = vec![fillc as u8; bytes];
        qiov_copy(qiov, offset, fill.as_mut_ptr(), bytes, true);
        bytes
    }

    fn qemu_opts_create(
        list: *mut QemuOptsList,
        _id: *const c_char,
        _fail_if_exists: c_int,
        _errp: *mut *mut bindings::Error,
    ) -> *mut QemuOpts {
        let mut names = Vec::new();
        unsafe {
            let mut desc = (*list).desc.as_ptr();
            while !(*desc).name.is_null() {
                names.push(CStr::from_ptr((*desc).name).to_owned());
                desc = desc.add(1);
            }
        }
        let opts = FakeOpts { names, values: Vec::new() };
        Box::into_raw(Box::new(opts)).cast()
    }

    fn qemu_opts_absorb_qdict(
        opts_: *mut QemuOpts,
        qdict: *mut QDict,
        _errp: *mut *mut bindings::Error,
    ) -> bool {
        let dict = unsafe { &mut *(qdict as *mut FakeDict) };
        let o = opts(opts_);
        let (known, rest): (Vec<_>, Vec<_>) =
            dict.0.drain(..).partition(|(k, _)| o.names.contains(k));
        o.values.extend(known);
        dict.0 = rest;
        true
    }

    fn qemu_opts_del(opts_: *mut QemuOpts) {
        drop(unsafe { Box::from_raw(opts_ as *mut FakeOpts) });
    }

    fn qemu_opt_get(opts_: *mut QemuOpts, name: *const c_char) -> *const c_char {
        let name = unsafe { CStr::from_ptr(name) };
        let o = opts(opts_);
        let found = o.values.iter().find(|(k, _)| k.as_c_str() == name);
        found.map_or(ptr::null(), |(_, v)| v.as_ptr())
    }

    fn qemu_opt_get_del(opts_: *mut QemuOpts, name: *const c_char) -> *mut c_char {
        opt_value(opts_, name, true).map_or(ptr::null_mut(), |v| unsafe { libc::strdup(v.as_ptr()) })
    }

    fn qemu_opt_get_size(opts_: *mut QemuOpts, name: *const c_char, defval: u64) -> u64 {
        opt_value(opts_, name, false).map_or(defval, |v| parse_size(&v))
    }

    fn qemu_opt_get_size_del(opts_: *mut QemuOpts, name: *const c_char, defval: u64) -> u64 {
        opt_value(opts_, name, true).map_or(defval, |v| parse_size(&v))
    }

    fn qemu_opt_get_number(opts_: *mut QemuOpts, name: *const c_char, defval: u64) -> u64 {
        opt_value(opts_, name, false).map_or(defval, |v| v.to_str().unwrap().parse().unwrap())
    }

    fn qemu_opt_get_number_del(opts_: *mut QemuOpts, name: *const c_char, defval: u64) -> u64 {
        opt_value(opts_, name, true).map_or(defval, |v| v.to_str().unwrap().parse().unwrap())
    }

    fn qemu_opt_get_bool(opts_: *mut QemuOpts, name: *const c_char, defval: bool) -> bool {
        opt_value(opts_, name, false).map_or(defval, |v| parse_bool(&v))
    }

    fn qemu_opt_get_bool_del(opts_: *mut QemuOpts, name: *const c_char, defval: bool) -> bool {
        opt_value(opts_, name, true).map_or(defval, |v| parse_bool(&v))
    }

    fn qdict_get_try_str(qdict: *const QDict, key: *const c_char) -> *const c_char {
        let dict = unsafe { &*(qdict as *const FakeDict) };
        let key = unsafe { CStr::from_ptr(key) };
        let found = dict.0.iter().find(|(k, _)| k.as_c_str() == key);
        found.map_or(ptr::null(), |(_, v)| v.as_ptr())
    }

    fn qdict_haskey(qdict: *const QDict, key: *const c_char) -> c_int {
        c_int::from(!unsafe { qdict_get_try_str(qdict, key) }.is_null())
    }

    fn qdict_del(qdict: *mut QDict, key: *const c_char) {
        let dict = unsafe { &mut *(qdict as *mut FakeDict) };
        let key = unsafe { CStr::from_ptr(key) };
        dict.0.retain(|(k, _)| k.as_c_str() != key);
    }

    fn qdict_join(dest: *mut QDict, src: *mut QDict, overwrite: bool) {
        let (dest, src) = unsafe { (&mut *(dest as *mut FakeDict), &mut *(src as *mut FakeDict)) };
        for (k, v) in std::mem::take(&mut src.0) {
            match dest.0.iter_mut().find(|(dk, _)| *dk == k) {
                Some(entry) if overwrite => entry.1 = v,
                Some(_) => src.0.push((k, v)),
                None => dest.0.push((k, v)),
            }
        }
    }

    fn g_malloc0(n_bytes: gsize) -> gpointer {
        unsafe { libc::calloc(1, (n_bytes as usize).max(1)) }
    }

    fn g_free(mem: gpointer) {
        unsafe { libc::free(mem) }
    }

    fn g_strdup(str_: *const gchar) -> *mut gchar {
        unsafe { libc::strdup(str_) }
    }
}

// QEMU's crypto layer and the QDicts and errors it works with: only encrypted images (and
// their creation) reach them, which these tests do not model.
doubles! {
    fn qcrypto_block_open(
        _options: *mut QCryptoBlockOpenOptions,
        _optprefix: *const c_char,
        _readfunc: QCryptoBlockReadFunc,
        _opaque: *mut c_void,
        _flags: std::ffi::c_uint,
        _n_threads: usize,
        _errp: *mut *mut Error,
    ) -> *mut QCryptoBlock {
        unmodelled("qcrypto_block_open")
    }

    fn qcrypto_block_create(
        _options: *mut QCryptoBlockCreateOptions,
        _optprefix: *const c_char,
        _initfunc: QCryptoBlockInitFunc,
        _writefunc: QCryptoBlockWriteFunc,
        _opaque: *mut c_void,
        _errp: *mut *mut Error,
    ) -> *mut QCryptoBlock {
        unmodelled("qcrypto_block_create")
    }

    fn qcrypto_block_encrypt(
        _block: *mut QCryptoBlock,
        _offset: u64,
        _buf: *mut u8,
        _len: usize,
        _errp: *mut *mut Error,
    ) -> c_int {
        unmodelled("qcrypto_block_encrypt")
    }

    fn qcrypto_block_decrypt(
        _block: *mut QCryptoBlock,
        _offset: u64,
        _buf: *mut u8,
        _len: usize,
        _errp: *mut *mut Error,
    ) -> c_int {
        unmodelled("qcrypto_block_decrypt")
    }

    fn qcrypto_block_free(_block: *mut QCryptoBlock) {
        unmodelled("qcrypto_block_free")
    }

    fn qcrypto_block_get_sector_size(_block: *mut QCryptoBlock) -> u64 {
        unmodelled("qcrypto_block_get_sector_size")
    }

    fn qcrypto_block_get_info(
        _block: *mut QCryptoBlock,
        _errp: *mut *mut Error,
    ) -> *mut QCryptoBlockInfo {
        unmodelled("qcrypto_block_get_info")
    }

    fn qcrypto_block_calculate_payload_offset(
        _create_opts: *mut QCryptoBlockCreateOptions,
        _optprefix: *const c_char,
        _len: *mut usize,
        _errp: *mut *mut Error,
    ) -> bool {
        unmodelled("qcrypto_block_calculate_payload_offset")
    }

    fn block_crypto_open_opts_init(
        _opts: *mut QDict,
        _errp: *mut *mut Error,
    ) -> *mut QCryptoBlockOpenOptions {
        unmodelled("block_crypto_open_opts_init")
    }

    fn block_crypto_create_opts_init(
        _opts: *mut QDict,
        _errp: *mut *mut Error,
    ) -> *mut QCryptoBlockCreateOptions {
        unmodelled("block_crypto_create_opts_init")
    }

    fn qapi_free_QCryptoBlockOpenOptions(_obj: *mut QCryptoBlockOpenOptions) {
        unmodelled("qapi_free_QCryptoBlockOpenOptions")
    }

    fn qapi_free_QCryptoBlockCreateOptions(_obj: *mut QCryptoBlockCreateOptions) {
        unmodelled("qapi_free_QCryptoBlockCreateOptions")
    }

    fn qapi_free_QCryptoBlockInfo(_obj: *mut QCryptoBlockInfo) {
        unmodelled("qapi_free_QCryptoBlockInfo")
    }

    fn qdict_new() -> *mut QDict {
        unmodelled("qdict_new")
    }

    fn qdict_put_str(_qdict: *mut QDict, _key: *const c_char, _value: *const c_char) {
        unmodelled("qdict_put_str")
    }

    fn qdict_extract_subqdict(_src: *mut QDict, _dst: *mut *mut QDict, _start: *const c_char) {
        unmodelled("qdict_extract_subqdict")
    }

    fn qemu_opts_to_qdict(_opts: *mut QemuOpts, _qdict: *mut QDict) -> *mut QDict {
        unmodelled("qemu_opts_to_qdict")
    }

    fn qobject_destroy(_obj: *mut QObject) {
        unmodelled("qobject_destroy")
    }

    fn bdrv_uses_whitelist() -> bool {
        unmodelled("bdrv_uses_whitelist")
    }

    fn error_get_pretty(_err: *const Error) -> *const c_char {
        unmodelled("error_get_pretty")
    }

    fn error_free(_err: *mut Error) {
        unmodelled("error_free")
    }

    // Dirty bitmaps: the model's nodes have none (the images the tests open hold no
    // persistent bitmap), so the walk over a node's bitmaps finds nothing and a lookup by
    // name fails; making or changing one is not modelled.
    fn bdrv_dirty_bitmap_first(_bs: *mut BlockDriverState) -> *mut BdrvDirtyBitmap {
        ptr::null_mut()
    }

    fn bdrv_dirty_bitmap_next(_bitmap: *mut BdrvDirtyBitmap) -> *mut BdrvDirtyBitmap {
        ptr::null_mut()
    }

    fn bdrv_find_dirty_bitmap(
        _bs: *mut BlockDriverState,
        _name: *const c_char,
    ) -> *mut BdrvDirtyBitmap {
        ptr::null_mut()
    }

    fn bdrv_create_dirty_bitmap(
        _bs: *mut BlockDriverState,
        _granularity: u32,
        _name: *const c_char,
        _errp: *mut *mut Error,
    ) -> *mut BdrvDirtyBitmap {
        unmodelled("bdrv_create_dirty_bitmap")
    }

    fn bdrv_release_dirty_bitmap(_bitmap: *mut BdrvDirtyBitmap) {
        unmodelled("bdrv_release_dirty_bitmap")
    }

    fn bdrv_dirty_bitmap_name(_bitmap: *const BdrvDirtyBitmap) -> *const c_char {
        unmodelled("bdrv_dirty_bitmap_name")
    }

    fn bdrv_dirty_bitmap_granularity(_bitmap: *const BdrvDirtyBitmap) -> u32 {
        unmodelled("bdrv_dirty_bitmap_granularity")
    }

    fn bdrv_dirty_bitmap_size(_bitmap: *const BdrvDirtyBitmap) -> i64 {
        unmodelled("bdrv_dirty_bitmap_size")
    }

    fn bdrv_dirty_bitmap_enabled(_bitmap: *mut BdrvDirtyBitmap) -> bool {
        unmodelled("bdrv_dirty_bitmap_enabled")
    }

    fn bdrv_disable_dirty_bitmap(_bitmap: *mut BdrvDirtyBitmap) {
        unmodelled("bdrv_disable_dirty_bitmap")
    }

    fn bdrv_dirty_bitmap_get_persistence(_bitmap: *mut BdrvDirtyBitmap) -> bool {
        unmodelled("bdrv_dirty_bitmap_get_persistence")
    }

    fn bdrv_dirty_bitmap_set_persistence(_bitmap: *mut BdrvDirtyBitmap, _persistent: bool) {
        unmodelled("bdrv_dirty_bitmap_set_persistence")
    }

    fn bdrv_dirty_bitmap_inconsistent(_bitmap: *const BdrvDirtyBitmap) -> bool {
        unmodelled("bdrv_dirty_bitmap_inconsistent")
    }

    fn bdrv_dirty_bitmap_set_inconsistent(_bitmap: *mut BdrvDirtyBitmap) {
        unmodelled("bdrv_dirty_bitmap_set_inconsistent")
    }

    fn bdrv_dirty_bitmap_readonly(_bitmap: *const BdrvDirtyBitmap) -> bool {
        unmodelled("bdrv_dirty_bitmap_readonly")
    }

    fn bdrv_dirty_bitmap_set_readonly(_bitmap: *mut BdrvDirtyBitmap, _value: bool) {
        unmodelled("bdrv_dirty_bitmap_set_readonly")
    }

    fn bdrv_dirty_bitmap_serialization_size(
        _bitmap: *const BdrvDirtyBitmap,
        _offset: u64,
        _bytes: u64,
    ) -> u64 {
        unmodelled("bdrv_dirty_bitmap_serialization_size")
    }

    fn bdrv_dirty_bitmap_serialize_part(
        _bitmap: *const BdrvDirtyBitmap,
        _buf: *mut u8,
        _offset: u64,
        _bytes: u64,
    ) {
        unmodelled("bdrv_dirty_bitmap_serialize_part")
    }

    fn bdrv_dirty_bitmap_deserialize_part(
        _bitmap: *mut BdrvDirtyBitmap,
        _buf: *mut u8,
        _offset: u64,
        _bytes: u64,
        _finish: bool,
    ) {
        unmodelled("bdrv_dirty_bitmap_deserialize_part")
    }

    fn bdrv_dirty_bitmap_deserialize_finish(_bitmap: *mut BdrvDirtyBitmap) {
        unmodelled("bdrv_dirty_bitmap_deserialize_finish")
    }

    fn bdrv_get_device_or_node_name(_bs: *const BlockDriverState) -> *const c_char {
        unmodelled("bdrv_get_device_or_node_name")
    }
}
