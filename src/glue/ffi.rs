//! The FFI edge: panics stop here, and errors cross to C as `-errno` in exactly one place.

use std::ffi::{c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::bindings;
use crate::engine::Error as EngineError;

/// Runs `body` for an `extern "C"` entry point and turns its outcome into QEMU's convention:
/// `0` (or a non-negative value) on success, `-errno` on failure. A panic is reported on stderr
/// and becomes `-EIO`; it never unwinds into C. Damaged metadata found on the way is reported
/// too (QEMU's callers see only the errno).
pub fn guard(entry: &str, body: impl FnOnce() -> Result<c_int, EngineError>) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            if matches!(e, EngineError::Corrupt(_) | EngineError::Invalid(_)) {
                report_damage(&e);
            }
            -e.errno()
        }
        Err(panic) => {
            eprintln!(
                "qcow2b: internal error in {entry}: {}",
                panic_message(&*panic)
            );
            -libc::EIO
        }
    }
}

/// Like [`guard`], for entries that also report a message through `Error **errp`.
///
/// # Safety
/// `errp` must be NULL or a valid `Error **` as QEMU passes it.
pub unsafe fn guard_errp(
    entry: &str,
    errp: *mut *mut bindings::Error,
    body: impl FnOnce() -> Result<c_int, EngineError>,
) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            // SAFETY: the caller guarantees errp is NULL or valid.
            unsafe { set_error(errp, &e.to_string()) };
            -e.errno()
        }
        Err(panic) => {
            let msg = format!(
                "qcow2b: internal error in {entry}: {}",
                panic_message(&*panic)
            );
            // SAFETY: as above.
            unsafe { set_error(errp, &msg) };
            -libc::EIO
        }
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

/// At most this many reports of damaged metadata per process: a guest that keeps reading a
/// damaged cluster must not flood the log.
const MAX_DAMAGE_REPORTS: u32 = 100;

/// Reports damaged metadata through QEMU's `error_report` (so it carries the program's prefix
/// and timestamps like QEMU's own messages), skipping repeats of the last message.
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
    let text = if last.0 > MAX_DAMAGE_REPORTS {
        "qcow2b: further reports of damaged metadata are suppressed".to_string()
    } else {
        format!("qcow2b: {msg}")
    };
    last.1 = msg;
    let text = CString::new(text.replace('\0', " ")).unwrap_or_default();
    // SAFETY: "%s" consumes exactly the one NUL-terminated string passed.
    unsafe { bindings::error_report(c"%s".as_ptr(), text.as_ptr()) };
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
