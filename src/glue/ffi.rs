//! The FFI edge: every function C calls is made by [`entries!`], which runs its body inside
//! the one guard, [`run_entry`]: a panic stops there (it never unwinds into C), and an
//! engine error becomes `-errno` (plus an `Error **errp` message where the entry has one) in
//! this one place.
//!
//! No `extern "C" fn` is written by hand anywhere else (`tests/ffi_entries_guarded.rs` fails
//! when one is), so an entry cannot be added without the guard.

use std::ffi::{c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use super::bindings;
use crate::engine::Error as EngineError;

/// Defines `unsafe extern "C"` functions whose bodies run inside [`run_entry`]:
///
/// ```text
/// entries! {
///     /// docs
///     fn name(arg: Type, ...) -> Outcome { body }
///     fn other(..., errp: *mut *mut bindings::Error) -> Outcome, errp = errp { body }
/// }
/// ```
///
/// The body's value is an [`Outcome`] (a `Result` with the engine's error, or a plain C
/// value); the C function returns its [`Outcome::C`]. With `errp = NAME`, an error or a
/// panic is reported through that `Error **` argument; without, through the log.
macro_rules! entries {
    ($(
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty
            $(, errp = $errp:ident)? $body:block
    )*) => {$(
        $(#[$meta])*
        $vis unsafe extern "C" fn $name($($arg: $ty),*)
            -> <$ret as $crate::glue::ffi::Outcome>::C
        {
            $crate::glue::ffi::run_entry::<$ret>(
                stringify!($name),
                $crate::glue::ffi::errp_arg!($($errp)?),
                // The body's references to the arguments are moved in: they are all Copy.
                move || $body,
            )
        }
    )*};
}
pub(crate) use entries;

/// The `errp` of an entry that names one.
macro_rules! errp_arg {
    () => {
        None
    };
    ($errp:ident) => {
        Some($errp)
    };
}
pub(crate) use errp_arg;

/// What an entry's body gives, and what C gets for it.
pub trait Outcome {
    /// The C return type.
    type C;
    /// The C value for a body that returned; an error is reported (through `errp` when the
    /// entry has one).
    fn into_c(self, entry: &str, errp: Option<*mut *mut bindings::Error>) -> Self::C;
    /// The C value for a body that panicked (reported already).
    fn after_panic() -> Self::C;
}

impl Outcome for Result<c_int, EngineError> {
    type C = c_int;
    fn into_c(self, _entry: &str, errp: Option<*mut *mut bindings::Error>) -> c_int {
        match self {
            Ok(v) => v,
            Err(e) => {
                report_error(&e, errp);
                -e.errno()
            }
        }
    }
    fn after_panic() -> c_int {
        -libc::EIO
    }
}

impl<T> Outcome for Result<*mut T, EngineError> {
    type C = *mut T;
    fn into_c(self, _entry: &str, errp: Option<*mut *mut bindings::Error>) -> *mut T {
        self.unwrap_or_else(|e| {
            report_error(&e, errp);
            ptr::null_mut()
        })
    }
    fn after_panic() -> *mut T {
        ptr::null_mut()
    }
}

impl Outcome for Result<bool, EngineError> {
    type C = bool;
    fn into_c(self, _entry: &str, errp: Option<*mut *mut bindings::Error>) -> bool {
        self.unwrap_or_else(|e| {
            report_error(&e, errp);
            false
        })
    }
    fn after_panic() -> bool {
        false
    }
}

impl Outcome for Result<(), EngineError> {
    type C = ();
    fn into_c(self, entry: &str, errp: Option<*mut *mut bindings::Error>) {
        if let Err(e) = self {
            match errp {
                Some(_) => report_error(&e, errp),
                None => log::error!("qcow2b: {entry}: {e}"),
            }
        }
    }
    fn after_panic() {}
}

/// A body that cannot fail: its value is C's.
macro_rules! plain_outcome {
    ($($t:ty => $panic:expr),*) => {$(
        impl Outcome for $t {
            type C = $t;
            fn into_c(self, _entry: &str, _errp: Option<*mut *mut bindings::Error>) -> $t {
                self
            }
            fn after_panic() -> $t {
                $panic
            }
        }
    )*};
}
plain_outcome!(c_int => -libc::EIO, i64 => -i64::from(libc::EIO), () => (), bool => false);

impl<T> Outcome for *mut T {
    type C = *mut T;
    fn into_c(self, _entry: &str, _errp: Option<*mut *mut bindings::Error>) -> *mut T {
        self
    }
    fn after_panic() -> *mut T {
        ptr::null_mut()
    }
}

/// Runs `body` for the C entry `entry` and turns its outcome into C's convention. A panic is
/// reported (through `errp` when given, else the log) and becomes [`Outcome::after_panic`]:
/// `-EIO`, NULL or nothing; it never unwinds into C.
pub fn run_entry<R: Outcome>(
    entry: &str,
    errp: Option<*mut *mut bindings::Error>,
    body: impl FnOnce() -> R,
) -> R::C {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(outcome) => outcome.into_c(entry, errp),
        Err(panic) => {
            let msg = format!(
                "qcow2b: internal error in {entry}: {}",
                panic_message(&*panic)
            );
            match errp {
                // SAFETY: an entry names as errp only the `Error **` QEMU passed it.
                Some(errp) => unsafe { set_error(errp, &msg) },
                None => log::error!("{msg}"),
            }
            R::after_panic()
        }
    }
}

/// A result inside an entry's body in C's convention (`-errno` on failure, reported as
/// [`run_entry`] reports an entry's own error). Panics are the enclosing entry's to stop.
pub fn to_c(entry: &str, body: impl FnOnce() -> Result<c_int, EngineError>) -> c_int {
    body().into_c(entry, None)
}

/// Like [`to_c`], reporting a failure through `errp`.
///
/// # Safety
/// `errp` must be NULL or a valid `Error **` as QEMU passes it.
pub unsafe fn to_c_errp(
    entry: &str,
    errp: *mut *mut bindings::Error,
    body: impl FnOnce() -> Result<c_int, EngineError>,
) -> c_int {
    body().into_c(entry, Some(errp))
}

/// Reports an engine error: into `*errp` when the entry has one; otherwise damaged metadata
/// is reported through the log (QEMU's callers see only the errno).
fn report_error(e: &EngineError, errp: Option<*mut *mut bindings::Error>) {
    match errp {
        // SAFETY: an entry names as errp only the `Error **` QEMU passed it.
        Some(errp) => unsafe { set_error(errp, &e.to_string()) },
        None if matches!(e, EngineError::Corrupt(_) | EngineError::Invalid(_)) => report_damage(e),
        None => {}
    }
}

/// Sets `*errp` to a new error carrying `msg` (QEMU's `error_setg`).
///
/// # Safety
/// `errp` must be NULL or a valid `Error **` whose `*errp` is NULL.
pub unsafe fn set_error(errp: *mut *mut bindings::Error, msg: &str) {
    let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    // SAFETY: the format string is a literal "%s" consuming exactly the one C string argument;
    // file and func are NUL-terminated literals; errp validity is the caller's promise.
    unsafe {
        bindings::error_setg_internal(
            errp,
            c"qcow2b".as_ptr(),
            0,
            c"qcow2b".as_ptr(),
            c"%s".as_ptr(),
            msg.as_ptr(),
        );
    }
}

/// The message of a QEMU `Error`, which is freed.
///
/// # Safety
/// `err` is NULL or an `Error` QEMU set, owned by the caller.
pub unsafe fn take_error(err: *mut bindings::Error) -> String {
    if err.is_null() {
        return "unknown error".into();
    }
    // SAFETY: per the caller; the message is read before the error is freed.
    unsafe {
        let msg = CStr::from_ptr(bindings::error_get_pretty(err))
            .to_string_lossy()
            .into_owned();
        bindings::error_free(err);
        msg
    }
}

/// At most this many reports of damaged metadata per process: a guest that keeps reading a
/// damaged cluster must not flood the log.
const MAX_DAMAGE_REPORTS: u32 = 100;

/// Reports damaged metadata through the log (QEMU's error reporting, `log.rs`), skipping
/// repeats of the last message.
fn report_damage(e: &EngineError) {
    use std::sync::Mutex;
    static LAST: Mutex<(u32, String)> = Mutex::new((0, String::new()));
    let msg = e.to_string();
    let Ok(mut last) = LAST.lock() else {
        return;
    };
    if last.1 == msg || last.0 > MAX_DAMAGE_REPORTS {
        return;
    }
    last.0 += 1;
    if last.0 > MAX_DAMAGE_REPORTS {
        log::error!("qcow2b: further reports of damaged metadata are suppressed");
    } else {
        log::error!("qcow2b: {msg}");
    }
    last.1 = msg;
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}
