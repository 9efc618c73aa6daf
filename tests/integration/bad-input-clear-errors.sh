#!/usr/bin/env bash
# Bad input gets a clear error and an ordinary exit status, never a signal: a file that is not
# qcow2, a truncated header, creation options qcow2b refuses or QEMU would refuse.
. "$(dirname "$0")/lib.sh"

head -c 1M /dev/urandom > "$SCRATCH/random.img"
expect_status 1 "info on random bytes" "$QEMU_IMG" info -f qcow2b "$SCRATCH/random.img"
expect_output "qcow2b|qcow2|magic"

"$SYS_QEMU_IMG" create -q -f qcow2 "$SCRATCH/t.qcow2" 1M
head -c 50 "$SCRATCH/t.qcow2" > "$SCRATCH/truncated.qcow2"
expect_status 1 "info on a truncated header" "$QEMU_IMG" info -f qcow2b "$SCRATCH/truncated.qcow2"

expect_status 1 "read from random bytes" "$QEMU_IO" -f qcow2b -c 'read 0 4k' "$SCRATCH/random.img"

expect_status 1 "create with encryption and no key" "$QEMU_IMG" create -f qcow2b -o encryption=on "$SCRATCH/new.qcow2" 1M
expect_output "Parameter 'encrypt.key-secret' is required for cipher"
[ ! -e "$SCRATCH/new.qcow2" ] || fail "a refused create left a file behind"
expect_status 1 "create with LUKS in xts mode (not in this build's crypto)" "$QEMU_IMG" create -f qcow2b \
  --object secret,id=sec0,data=key -o encrypt.format=luks,encrypt.key-secret=sec0 "$SCRATCH/new.qcow2" 1M
expect_output "Unsupported cipher mode xts"
[ ! -e "$SCRATCH/new.qcow2" ] || fail "a refused create left a file behind"
expect_status 1 "create with extended L2 and small clusters" "$QEMU_IMG" create -f qcow2b \
  -o extended_l2=on,cluster_size=8k "$SCRATCH/new.qcow2" 1M
expect_output "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
expect_status 1 "create with a bad cluster size" "$QEMU_IMG" create -f qcow2b -o cluster_size=3k "$SCRATCH/new.qcow2" 1M
expect_output "Cluster size must be a power of two between 512 and 2048k"
expect_status 1 "create with an unknown option" "$QEMU_IMG" create -f qcow2b -o bogus=1 "$SCRATCH/new.qcow2" 1M
expect_output "Invalid parameter 'bogus'"

# qcow2's runtime option lazy-refcounts: accepted (moot for qcow2b, which never marks the
# image dirty), refused on a version 2 image with QEMU's message.
"$SYS_QEMU_IMG" create -q -f qcow2 -o compat=0.10 "$SCRATCH/v2.qcow2" 1M
expect_status 1 "lazy-refcounts on a compat=0.10 image" "$QEMU_IO" \
  --image-opts "driver=qcow2b,lazy-refcounts=on,file.filename=$SCRATCH/v2.qcow2" -c 'read 0 4k'
expect_output "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
expect_status 0 "lazy-refcounts on a compat=1.1 image" "$QEMU_IO" \
  --image-opts "driver=qcow2b,lazy-refcounts=on,file.filename=$SCRATCH/t.qcow2" -c 'write -P 7 0 4k'
qemu_io_clean
"$SYS_QEMU_IMG" info --output=json "$SCRATCH/t.qcow2" > "$SCRATCH/info.json"
! grep -q '"dirty-flag": true' "$SCRATCH/info.json" || fail "lazy-refcounts=on left the image dirty"
expect_status 0 "the write is there" "$SYS_QEMU_IO" -f qcow2 -c 'read -P 7 0 4k' "$SCRATCH/t.qcow2"
qemu_io_clean
"$SYS_QEMU_IO" -f qcow2 -c 'write -P 0 0 4k' "$SCRATCH/t.qcow2" > /dev/null

# Check of a clean image: what QEMU's qcow2 says.
expect_status 0 "check" "$QEMU_IMG" check -f qcow2b "$SCRATCH/t.qcow2"
expect_output "No errors were found on the image"
