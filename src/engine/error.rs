//! Errors of the qcow2 engine. Each carries the context a user needs (which field, table or
//! offset, and why); the glue turns them into `-errno` plus an `Error **errp` message in one
//! place.

use std::fmt;
use std::io;

#[derive(Debug)]
pub enum Error {
    /// The storage failed; `context` says what the engine was doing.
    Io { context: String, source: io::Error },
    /// The image is malformed: a header field, table or entry is out of bounds, misaligned,
    /// overlapping or otherwise impossible. Maps to EINVAL.
    Invalid(String),
    /// The image is consistent but uses something this engine does not implement, or the
    /// request asks for something it cannot do yet. Maps to ENOTSUP.
    Unsupported(String),
    /// Metadata found corrupt while running (for example an L2 entry pointing into the
    /// header). Maps to EIO.
    Corrupt(String),
    /// A write was attempted on an image opened read-only. Maps to EACCES.
    ReadOnly,
    /// An option or argument given by the user is not acceptable (the message says which and
    /// why). Maps to EINVAL.
    BadOption(String),
    /// A guest request outside the image. Maps to EINVAL.
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// An operation refused for a reason QEMU's qcow2 gives its own errno for (a snapshot
    /// that is not there: ENOENT; too many snapshots or too large a table: EFBIG).
    Refused { errno: i32, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The errno QEMU expects for this error (positive; the glue negates it).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Invalid(_) | Error::BadOption(_) | Error::OutOfRange { .. } => libc::EINVAL,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::Corrupt(_) => libc::EIO,
            Error::ReadOnly => libc::EACCES,
            Error::Refused { errno, .. } => *errno,
        }
    }

    /// Wraps an I/O error with what the engine was doing.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Invalid(msg) => write!(f, "invalid qcow2 image: {msg}"),
            Error::Unsupported(msg) => write!(f, "not supported by qcow2b: {msg}"),
            Error::Corrupt(msg) => write!(f, "qcow2 metadata corrupt: {msg}"),
            Error::ReadOnly => write!(f, "image is opened read-only"),
            Error::Refused { msg, .. } => write!(f, "{msg}"),
            Error::BadOption(msg) => write!(f, "{msg}"),
            Error::OutOfRange { offset, len, size } => {
                write!(
                    f,
                    "request at {offset} of {len} bytes is beyond the image size {size}"
                )
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
