//! qcow2b: a qcow2 block driver for QEMU whose metadata write-back is ordered by barriers.
//!
//! Three layers, each in its own module:
//! - [`engine`]: the qcow2 format and its read/write engine, pure Rust, generic over a
//!   [`engine::Storage`] trait, testable with `cargo test` alone.
//! - [`ordering`]: how barriers are kept on the host (barrier modes, the host barrier
//!   primitive, the `ordered` mode's epoch buffer); pure Rust.
//! - `glue` (feature `qemu`): the only code that knows QEMU exists: bindgen bindings, the
//!   BlockDriver table, and the storage implementation over a `BdrvChild`.

pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod ordering;

#[cfg(feature = "qemu")]
mod glue;
