//! libFuzzer wrapper of `qcow2b::fuzzing::snapshots` (see that module for what it checks).
#![no_main]
#[path = "common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: common::BoundedAlloc = common::BoundedAlloc;

fuzz_target!(|data: &[u8]| {
    // The input is spliced into a base image of 10 clusters.
    common::bound_allocations(data.len() + 10 * 65536);
    qcow2b::fuzzing::snapshots::run(data);
});
