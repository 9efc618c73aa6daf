#!/usr/bin/env bash
# qemu-img check -f qcow2b reports leaks and corruptions as QEMU's qcow2 does (same exit
# status, same counts) and repairs them with -r leaks and -r all; an image marked corrupt is
# repaired by check -r all and then opens read-write; an image left dirty by a killed writer
# with lazy_refcounts is repaired at a read-write open; snapshots are listed.
. "$(dirname "$0")/lib.sh"

# put16 FILE OFFSET VALUE: writes a big-endian 16-bit value.
put16() { printf "$(printf '\\x%02x\\x%02x' $(($3 >> 8)) $(($3 & 255)))" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none; }
# put64 FILE OFFSET VALUE
put64() { printf "$(printf '%016x' "$3" | sed 's/../\\x&/g')" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none; }

img=$SCRATCH/k.qcow2
"$SYS_QEMU_IMG" create -q -f qcow2 "$img" 8M
"$SYS_QEMU_IO" -f qcow2 -c 'write -q -P 0x5a 0 256k' "$img" >/dev/null
cp "$img" "$SCRATCH/pristine.qcow2"
expect_status 0 "clean" "$QEMU_IMG" check -f qcow2b "$img"
expect_output "No errors were found"

# A leak: a refcount on a cluster nothing uses (one more cluster at the end of the file; the
# refcount block is at 128k).
leaked=$(( $(stat -c %s "$img") / 65536 ))
truncate -s $(( (leaked + 1) * 65536 )) "$img"
put16 "$img" $((0x20000 + 2 * leaked)) 1
expect_status 3 "leak (QEMU)" "$SYS_QEMU_IMG" check -f qcow2 "$img"
expect_status 3 "leak" "$QEMU_IMG" check -f qcow2b "$img"
expect_output "1 leaked clusters were found"
expect_output "Leaked cluster $leaked refcount=1 reference=0"
expect_status 0 "repair leaks" "$QEMU_IMG" check -r leaks -f qcow2b "$img"
expect_status 0 "clean after repair (QEMU)" "$SYS_QEMU_IMG" check -f qcow2 "$img"

# A corruption: a data cluster's refcount 0 (the first data cluster after the L2 table).
l2=$(od -An -tx8 --endian=big -j $((0x30000)) -N 8 "$img" | tr -d ' ')
l2=$((0x$l2 & 0x00fffffffffffe00))
data=$(od -An -tx8 --endian=big -j "$l2" -N 8 "$img" | tr -d ' ')
data=$((0x$data & 0x00fffffffffffe00))
put16 "$img" $((0x20000 + 2 * (data >> 16))) 0
expect_status 2 "corruption (QEMU)" "$SYS_QEMU_IMG" check -f qcow2 "$img"
qemu_says=$(grep -o "[0-9]* errors were found on the image" "$SCRATCH/out")
expect_status 2 "corruption" "$QEMU_IMG" check -f qcow2b "$img"
expect_output "^$qemu_says"
expect_output "ERROR cluster $((data >> 16)) refcount=0 reference=1"
expect_status 0 "repair all" "$QEMU_IMG" check -r all -f qcow2b "$img"
expect_status 0 "clean after repair (QEMU)" "$SYS_QEMU_IMG" check -f qcow2 "$img"
expect_ok "data intact" "$SYS_QEMU_IMG" compare -f qcow2 -F qcow2 "$img" "$SCRATCH/pristine.qcow2"

# The corrupt bit: refused read-write, repaired by check -r all, then writable again.
put64 "$img" 72 2
expect_status 1 "corrupt image refused read-write" "$QEMU_IO" -f qcow2b -c 'write 0 4k' "$img"
expect_output "marked corrupt"
expect_ok "corrupt image reads" "$QEMU_IO" -r -f qcow2b -c 'read -P 0x5a 0 4k' "$img"
expect_status 0 "check -r all clears the corrupt bit" "$QEMU_IMG" check -r all -f qcow2b "$img"
expect_ok "writable again" "$QEMU_IO" -f qcow2b -c 'write -P 0x66 0 4k' "$img"
"$SYS_QEMU_IMG" info "$img" | grep -q "corrupt: false" || fail "corrupt bit still set"

# A dirty image from a writer killed with lazy_refcounts=on.
dirty=$SCRATCH/dirty.qcow2
"$SYS_QEMU_IMG" create -q -f qcow2 -o lazy_refcounts=on "$dirty" 8M
"$SYS_QEMU_IO" -f qcow2 -c 'write -P 0x77 0 1M' -c 'write -P 0x78 4M 64k' -c flush -c 'sigraise 9' "$dirty" >/dev/null 2>&1 || true
"$SYS_QEMU_IMG" info "$dirty" | grep -q "lazy refcounts: true" || fail "setup: no lazy refcounts"
status=0; "$SYS_QEMU_IMG" check -f qcow2 "$dirty" > /dev/null 2>&1 || status=$?
[ "$status" = 2 ] || fail "setup: QEMU should see the dirty image's refcounts broken (exit $status)"
expect_status 2 "check reports the dirty image's missing refcounts" "$QEMU_IMG" check -f qcow2b "$dirty"
expect_ok "read-write open repairs" "$QEMU_IO" -f qcow2b -c 'write -P 0x79 2M 64k' "$dirty"
expect_status 0 "clean afterwards (QEMU)" "$SYS_QEMU_IMG" check -f qcow2 "$dirty"
expect_ok "data after repair" "$SYS_QEMU_IO" -r -f qcow2 -c 'read -P 0x77 0 1M' -c 'read -P 0x78 4M 64k' \
  -c 'read -P 0x79 2M 64k' "$dirty"
qemu_io_clean

# Snapshots listed (qemu-img 7.2's snapshot command takes --image-opts rather than -f).
"$SYS_QEMU_IMG" snapshot -c first "$img"
"$SYS_QEMU_IMG" snapshot -c second "$img"
expect_ok "snapshot -l" "$QEMU_IMG" snapshot -l --image-opts "driver=qcow2b,file.filename=$img"
expect_output "^1 +first "
expect_output "^2 +second "
