//! The QEMU glue: the only part of qcow2b that knows QEMU exists.
//!
//! - `bindings`: bindgen output for include/qcow2b-qemu.h, used by nothing outside this module;
//! - `ffi`: the one guard of every function C calls (the `entries!` macro makes each
//!   trampoline): panics stop there, and engine errors become `-errno` plus an
//!   `Error **errp` message there;
//! - `logger`: the `log` facade's records to QEMU's error reporting (the glue never prints
//!   by hand, the engine never prints);
//! - `storage`: the engine's [`crate::engine::Storage`] over a `BdrvChild`;
//! - `file`: the image file as the engine and the data step reach it, in every mode;
//! - `epochs`: the `ordered` mode's epoch buffer and its background writer (the QEMU half
//!   of `ordering::epochs`; also the `txg` mode's write-back buffer);
//! - `node`: the per-node state and its metadata lock (`CoMutex`, `CoQueue`);
//! - `request`: guest reads and writes, with the data step on the request's `QEMUIOVector`;
//! - `opts`: QEMU option lists declared from Rust tables;
//! - `host_barrier`: the C entry point file-posix calls for a barrier;
//! - `create`: `qemu-img create` and `qemu-img measure` (QEMU option lists to the engine's);
//! - `crypto`: encrypted images through QEMU's crypto layer (the engine's cipher, the
//!   LUKS header at open and at creation);
//! - `txg`: when the `txg` barrier mode's transaction groups commit (flush, bounds);
//! - `driver`: the `BlockDriver` table registered under the format name `qcow2b`;
//! - `serve_qcow2`: the administrator's switch (a configuration file read once at start)
//!   that registers a copy of that table under the name `qcow2`;
//! - `recorder`: the `qcow2b-recorder` filter, which logs what reaches its child (for the
//!   crash-consistency harness, `tests/crash/`);
//! - `latency`: the `qcow2b-synclat` filter, a fixed extra cost per host fdatasync (the
//!   paper benchmark's flush-latency model);
//! - `filter`: what the two filters do alike (reads, length and reopen passed through).

mod amend;
mod bindings;
mod bitmaps;
mod cache_clean;
mod create;
mod crypto;
mod driver;
mod epochs;
mod ffi;
mod file;
mod filter;
mod host_barrier;
mod latency;
mod logger;
mod node;
mod opts;
mod recorder;
mod request;
mod runtime_opts;
mod serve_qcow2;
mod storage;
mod timer;
mod txg;

#[cfg(all(test, feature = "glue-tests"))]
mod qemu_stubs;
#[cfg(all(test, feature = "glue-tests"))]
mod tests;
