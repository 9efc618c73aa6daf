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

expect_status 1 "create with encryption" "$QEMU_IMG" create -f qcow2b -o encryption=on "$SCRATCH/new.qcow2" 1M
expect_output "not supported by qcow2b: .*encrypt"
[ ! -e "$SCRATCH/new.qcow2" ] || fail "a refused create left a file behind"
expect_status 1 "create with extended L2" "$QEMU_IMG" create -f qcow2b -o extended_l2=on "$SCRATCH/new.qcow2" 1M
expect_output "extended_l2"
expect_status 1 "create with a bad cluster size" "$QEMU_IMG" create -f qcow2b -o cluster_size=3k "$SCRATCH/new.qcow2" 1M
expect_output "Cluster size must be a power of two between 512 and 2048k"
expect_status 1 "create with an unknown option" "$QEMU_IMG" create -f qcow2b -o bogus=1 "$SCRATCH/new.qcow2" 1M
expect_output "Invalid parameter 'bogus'"

# Check of a clean image: what QEMU's qcow2 says.
expect_status 0 "check" "$QEMU_IMG" check -f qcow2b "$SCRATCH/t.qcow2"
expect_output "No errors were found on the image"
