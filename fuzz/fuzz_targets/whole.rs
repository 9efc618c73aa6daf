//! libFuzzer wrapper of `qcow2b::fuzzing::whole` (see that module for what it checks).
#![no_main]
#[path = "common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: common::BoundedAlloc = common::BoundedAlloc;

fuzz_target!(|data: &[u8]| {
    // The target models disks of up to 32 MiB byte for byte.
    common::bound_allocations(data.len() + 2 * (32 << 20));
    qcow2b::fuzzing::whole::run(data);
});
