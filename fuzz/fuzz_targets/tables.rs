//! libFuzzer wrapper of `qcow2b::fuzzing::tables` (see that module for what it checks).
#![no_main]
#[path = "common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: common::BoundedAlloc = common::BoundedAlloc;

fuzz_target!(|data: &[u8]| {
    common::bound_allocations(data.len());
    qcow2b::fuzzing::tables::run(data);
});
