//! The glue's logger: what qcow2b reports goes through the `log` facade (the engine never
//! prints; the glue says what happened), and this logger hands each record to QEMU's error
//! reporting, so it carries the program's prefix and goes to the monitor or stderr as QEMU's
//! own messages do:
//! - `error!` and `warn!`: `error_report` (a failed close, damaged metadata, a panic);
//! - `info!`: `error_printf`, the line as it is: the output of a command that QEMU's qcow2
//!   prints without a prefix (the findings of `qemu-img check`);
//! - `debug!` and `trace!`: dropped.

use std::ffi::CString;

use log::{Level, LevelFilter, Log, Metadata, Record};

use super::bindings;

struct QemuLogger;

static LOGGER: QemuLogger = QemuLogger;

impl Log for QemuLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= Level::Info
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let text = CString::new(record.args().to_string().replace('\0', " ")).unwrap_or_default();
        match record.level() {
            // SAFETY: "%s" consumes exactly the one NUL-terminated string passed.
            Level::Error | Level::Warn => unsafe {
                bindings::error_report(c"%s".as_ptr(), text.as_ptr())
            },
            _ => {
                // SAFETY: as above, with the line's end.
                unsafe { bindings::error_printf(c"%s\n".as_ptr(), text.as_ptr()) };
            }
        }
    }

    fn flush(&self) {}
}

/// Makes QEMU's error reporting the destination of qcow2b's records (once per process; a
/// logger set before, by whoever, stays).
pub fn install() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(LevelFilter::Info);
    }
}
