#!/usr/bin/env bash
# build.rs with the `qemu` feature but no configured QEMU tree stops with a message that says
# what to run (and the pure-Rust engine builds without the feature: `cargo test` shows that).
. "$(dirname "$0")/lib.sh"
cd "$QCOW2B_ROOT"
expect_status 101 "cargo build --features qemu without a tree" \
  env QCOW2B_QEMU_BUILD="$SCRATCH/no-such-build" \
  cargo build --quiet --lib --features qemu --target-dir "$BUILD_ROOT/clippy-target"
expect_output "needs a configured QEMU tree"
expect_output "scripts/setup.sh"
