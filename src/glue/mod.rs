//! The QEMU glue: the only part of qcow2b that knows QEMU exists.
//!
//! - `bindings`: bindgen output for include/qcow2b-qemu.h, used by nothing outside this module;
//! - `ffi`: the one place where engine errors become `-errno` plus an `Error **errp` message,
//!   and where panics are stopped before they reach C;
//! - `storage`: the engine's [`crate::engine::Storage`] over a `BdrvChild`;
//! - `driver`: the `BlockDriver` table registered under the format name `qcow2b`.

mod bindings;
mod driver;
mod ffi;
mod storage;
