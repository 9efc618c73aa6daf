#!/usr/bin/env bash
# An image made and filled by the distribution's QEMU reads back through qcow2b, both with
# --image-opts and with -f, including unwritten (zero) regions and a backing file.
. "$(dirname "$0")/lib.sh"

img=$SCRATCH/sys.qcow2
"$SYS_QEMU_IMG" create -q -f qcow2 "$img" 4M
"$SYS_QEMU_IO" -f qcow2 -c 'write -q -P 0x5a 0 128k' -c 'write -q -P 0x33 1000k 3k' "$img" >/dev/null

expect_ok "read via --image-opts" "$QEMU_IO" --image-opts "driver=qcow2b,file.filename=$img" \
  -c 'read -P 0x5a 0 128k' -c 'read -P 0 128k 872k' -c 'read -P 0x33 1000k 3k' -c 'read -P 0 1003k 3093k'
qemu_io_clean
expect_output "read 131072/131072 bytes at offset 0"

expect_ok "read via -f qcow2b" "$QEMU_IO" -r -f qcow2b -c 'read -P 0x5a 64k 64k' "$img"
qemu_io_clean

# Backing chain: unallocated clusters of the overlay read through to the base.
base=$SCRATCH/base.qcow2 top=$SCRATCH/top.qcow2
"$SYS_QEMU_IMG" create -q -f qcow2 "$base" 2M
"$SYS_QEMU_IO" -f qcow2 -c 'write -q -P 0x11 0 2M' "$base" >/dev/null
"$SYS_QEMU_IMG" create -q -f qcow2 -b "$base" -F qcow2 "$top"
"$SYS_QEMU_IO" -f qcow2 -c 'write -q -P 0x22 512k 64k' "$top" >/dev/null
expect_ok "read overlay" "$QEMU_IO" -r -f qcow2b -c 'read -P 0x11 0 512k' -c 'read -P 0x22 512k 64k' \
  -c 'read -P 0x11 576k 1472k' "$top"
qemu_io_clean
