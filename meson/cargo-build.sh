#!/bin/sh
# Called by ninja (meson/meson.build): builds the qcow2b staticlib with the `qemu` feature
# against this QEMU tree, then puts the library and a dep-info file where ninja expects them.
# Usage: cargo-build.sh CARGO REPO QEMU_SRC QEMU_BUILD OUTPUT DEPFILE
set -eu
cargo=$1 repo=$2 src=$3 build=$4 output=$5 depfile=$6
target=$build/qcow2b-target
profile=${QCOW2B_CARGO_PROFILE:-release}

QCOW2B_QEMU_SRC=$src QCOW2B_QEMU_BUILD=$build \
  "$cargo" build --quiet --profile "$profile" --features qemu --lib \
  --manifest-path "$repo/Cargo.toml" --target-dir "$target"

lib=$target/$profile/libqcow2b.a
cp "$lib" "$output.tmp" && mv "$output.tmp" "$output"
# cargo's dep-info names its own output; ninja wants ours.
sed "1s|^[^:]*:|$output:|" "$target/$profile/libqcow2b.d" > "$depfile"
