#!/usr/bin/env bash
# The built tools know the format name qcow2b, and probing still picks qcow2 for qcow2 files.
. "$(dirname "$0")/lib.sh"

expect_ok "qemu-img --help" "$QEMU_IMG" --help
grep -A3 "^Supported formats:" "$SCRATCH/out" | grep -qw qcow2b || fail "qemu-img --help does not list qcow2b"

img=$SCRATCH/probe.qcow2
"$SYS_QEMU_IMG" create -q -f qcow2 "$img" 1M
expect_ok "qemu-img info (probed)" "$QEMU_IMG" info "$img"
expect_output "^file format: qcow2$"
expect_ok "qemu-img info -f qcow2b" "$QEMU_IMG" info -f qcow2b "$img"
expect_output "^file format: qcow2b$"
expect_output "^virtual size: 1 MiB"
expect_output "^cluster_size: 65536$"
