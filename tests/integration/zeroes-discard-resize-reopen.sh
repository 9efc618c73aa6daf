#!/usr/bin/env bash
# The metadata operations of the driver through the built tools: write_zeroes (with and
# without unmap, partial clusters), discard, growing and shrinking with qemu-img resize
# (shrinking with preallocation refused with qemu-img's message), reopen between read-only and read-write, runtime options, and the
# format-specific part of qemu-img info.
. "$(dirname "$0")/lib.sh"

img=$SCRATCH/z.qcow2
"$SYS_QEMU_IMG" create -q -f qcow2 "$img" 4M
expect_ok "zeroes and discard" "$QEMU_IO" -f qcow2b -c 'write -P 0x11 0 1M' -c 'write -z 64k 128k' \
  -c 'write -z -u 256k 64k' -c 'discard 512k 128k' -c 'write -z 1000 3000' "$img"
qemu_io_clean
expect_ok "check" "$SYS_QEMU_IMG" check -f qcow2 "$img"
expect_ok "QEMU reads the zeros" "$SYS_QEMU_IO" -r -f qcow2 -c 'read -P 0x11 0 1000' -c 'read -P 0 1000 3000' \
  -c 'read -P 0x11 4000 61536' -c 'read -P 0 64k 128k' -c 'read -P 0x11 192k 64k' -c 'read -P 0 256k 64k' \
  -c 'read -P 0x11 320k 192k' -c 'read -P 0 512k 128k' -c 'read -P 0x11 640k 384k' "$img"
qemu_io_clean
"$SYS_QEMU_IMG" map --output=json "$img" > "$SCRATCH/map"
# write -z without -u keeps the cluster (zero flag with an offset); -u and discard drop it.
grep -q '"start": 65536, "length": 131072, "depth": 0, "present": true, "zero": true, "data": false, "compressed": false, "offset"' "$SCRATCH/map" \
  || { cat "$SCRATCH/map"; fail "write -z without unmap should keep the clusters allocated"; }
grep -q '"start": 262144, "length": 65536, "depth": 0, "present": true, "zero": true, "data": false, "compressed": false}' "$SCRATCH/map" \
  || { cat "$SCRATCH/map"; fail "write -z -u should unmap"; }

expect_ok "grow" "$QEMU_IMG" resize -f qcow2b "$img" +1G
expect_ok "write at the new end" "$QEMU_IO" -f qcow2b -c 'write -P 0x33 1027M 64k' "$img"
expect_ok "size and data" "$SYS_QEMU_IO" -r -f qcow2 -c 'read -P 0x33 1027M 64k' -c 'read -P 0x11 0 1000' "$img"
qemu_io_clean
size=$("$SYS_QEMU_IMG" info --output=json "$img" | python3 -c 'import json, sys; print(json.load(sys.stdin)["virtual-size"])')
[ "$size" = 1077936128 ] || fail "virtual size after resize: $size"
expect_status 1 "shrink with preallocation" "$QEMU_IMG" resize --shrink --preallocation=metadata \
  -f qcow2b "$img" 1051712K
expect_output "Preallocation can only be used for growing images"
expect_ok "shrink" "$QEMU_IMG" resize --shrink -f qcow2b "$img" 1051712K
size=$("$SYS_QEMU_IMG" info --output=json "$img" | python3 -c 'import json, sys; print(json.load(sys.stdin)["virtual-size"])')
[ "$size" = 1076953088 ] || fail "virtual size after the shrink: $size"
expect_ok "data after the shrink" "$SYS_QEMU_IO" -r -f qcow2 -c 'read -P 0x33 1027M 64k' -c 'read -P 0x11 0 1000' "$img"
qemu_io_clean
expect_ok "check after resize" "$SYS_QEMU_IMG" check -f qcow2 "$img"

expect_status 1 "reopen (the write while read-only fails)" "$QEMU_IO" -f qcow2b -c 'write -P 1 0 64k' -c 'reopen -r' -c 'write -P 2 0 64k' \
  -c 'reopen -w' -c 'write -P 3 64k 64k' "$img"
expect_output "Block node is read-only"
expect_ok "data after reopen" "$SYS_QEMU_IO" -r -f qcow2 -c 'read -P 1 0 64k' -c 'read -P 3 64k 64k' "$img"
qemu_io_clean

expect_ok "small L2 cache" "$QEMU_IO" --image-opts "driver=qcow2b,file.filename=$img,l2-cache-size=128k" \
  -c 'read -P 3 64k 64k' -c 'read -P 0x33 1027M 64k'
qemu_io_clean
expect_status 1 "conflicting cache sizes" "$QEMU_IO" --image-opts \
  "driver=qcow2b,file.filename=$img,cache-size=1M,l2-cache-size=512k,refcount-cache-size=512k" -c 'read 0 4k'
expect_output "may not be set at the same time"
expect_status 1 "unknown option" "$QEMU_IO" --image-opts "driver=qcow2b,file.filename=$img,bogus=1" -c 'read 0 4k'
expect_output "does not support the option 'bogus'"

expect_ok "info" "$QEMU_IMG" info -f qcow2b "$img"
expect_output "file format: qcow2b"
expect_output "compat: 1.1"
expect_output "refcount bits: 16"
