#!/usr/bin/env bash
# What qcow2b writes, QEMU's own qcow2 (the distribution's and the built one) reads, and the
# image stays clean: the image is plain qcow2.
. "$(dirname "$0")/lib.sh"

img=$SCRATCH/w.qcow2
"$SYS_QEMU_IMG" create -q -f qcow2 "$img" 8M
expect_ok "qcow2b writes" "$QEMU_IO" -f qcow2b \
  -c 'write -q -P 0x01 0 64k' -c 'write -q -P 0x02 100k 10k' -c 'write -q -P 0x03 4095k 2k' \
  -c 'flush' -c 'write -q -P 0x04 8k 4k' -c 'write -q -P 0x05 7M 1M' "$img"
qemu_io_clean

for io in "$SYS_QEMU_IO" "$QEMU_IO"; do
  expect_ok "$io reads" "$io" -r -f qcow2 \
    -c 'read -P 0x01 0 8k' -c 'read -P 0x04 8k 4k' -c 'read -P 0x01 12k 52k' -c 'read -P 0 64k 36k' \
    -c 'read -P 0x02 100k 10k' -c 'read -P 0 110k 3985k' -c 'read -P 0x03 4095k 2k' \
    -c 'read -P 0 4097k 2975k' -c 'read -P 0x05 7M 1M' "$img"
  qemu_io_clean
done
expect_ok "qemu-img check (system)" "$SYS_QEMU_IMG" check -f qcow2 "$img"
expect_ok "qemu-img check (built)" "$QEMU_IMG" check -f qcow2 "$img"

# qemu-img convert and bench run through the driver.
expect_ok "convert -f qcow2b" "$QEMU_IMG" convert -f qcow2b -O raw "$img" "$SCRATCH/via-qcow2b.raw"
expect_ok "convert -f qcow2" "$SYS_QEMU_IMG" convert -f qcow2 -O raw "$img" "$SCRATCH/via-qcow2.raw"
cmp "$SCRATCH/via-qcow2b.raw" "$SCRATCH/via-qcow2.raw" || fail "convert output differs between drivers"
expect_ok "bench write" "$QEMU_IMG" bench -f qcow2b -w -c 256 -d 8 -s 4k -o 1M "$img"
expect_ok "bench read" "$QEMU_IMG" bench -f qcow2b -c 256 -d 8 -s 4k "$img"
expect_ok "qemu-img check after bench" "$SYS_QEMU_IMG" check -f qcow2 "$img"
