#!/usr/bin/env bash
# Many requests in flight (qemu-img bench -d 32): allocating writes that share clusters, and
# copy-on-write from a backing file, leave the data right and the image clean (QEMU's check,
# system and built), as QEMU's own qcow2 reads it.
. "$(dirname "$0")/lib.sh"

img=$SCRATCH/c.qcow2
"$SYS_QEMU_IMG" create -q -f qcow2 "$img" 64M
# 4 KiB writes 12 KiB apart: neighbouring requests allocate the same 64 KiB cluster at once.
expect_ok "bench -d 32 allocating writes" "$QEMU_IMG" bench -f qcow2b -w -d 32 -c 5000 -s 4k -S 12k \
  --pattern=0x77 "$img"
expect_ok "system check" "$SYS_QEMU_IMG" check -f qcow2 "$img"
expect_ok "built check" "$QEMU_IMG" check -f qcow2 "$img"
reads=()
for off in 0 12k 60k 120k 1200k 58596k; do reads+=(-c "read -P 0x77 $off 4k"); done
for off in 4k 16k 64k 124k 1204k; do reads+=(-c "read -P 0 $off 8k"); done
expect_ok "QEMU's qcow2 reads the pattern" "$SYS_QEMU_IO" -r -f qcow2 "${reads[@]}" "$img"
qemu_io_clean

# Partial-cluster writes at depth 32 over a backing file: every cluster is copied from the
# base, exactly once, with the request's bytes on top.
base=$SCRATCH/base.qcow2 top=$SCRATCH/top.qcow2
"$SYS_QEMU_IMG" create -q -f qcow2 "$base" 16M
"$SYS_QEMU_IO" -f qcow2 -c 'write -q -P 0x11 0 16M' "$base" >/dev/null
"$SYS_QEMU_IMG" create -q -f qcow2 -b "$base" -F qcow2 "$top"
expect_ok "bench -d 32 over a backing file" "$QEMU_IMG" bench -f qcow2b -w -d 32 -c 2000 -s 512 -S 8k \
  --pattern=0x22 "$top"
expect_ok "check" "$SYS_QEMU_IMG" check -f qcow2 "$top"
expect_ok "reads" "$SYS_QEMU_IO" -r -f qcow2 -c 'read -P 0x22 0 512' -c 'read -P 0x11 512 7680' \
  -c 'read -P 0x22 8k 512' -c 'read -P 0x22 15992k 512' -c 'read -P 0x11 15992.5k 7.5k' "$top"
qemu_io_clean

# More adjacent small writes in one buffered epoch than one vectored write may carry (the
# kernel refuses more than IOV_MAX pieces): 20,000 sequential 4 KiB writes without a flush,
# in the two modes that buffer, each written back in pieces and read back whole.
for mode in ordered txg; do
  seq_img=$SCRATCH/seq-$mode.qcow2
  "$SYS_QEMU_IMG" create -q -f qcow2 "$seq_img" 256M
  expect_ok "bench: 20000 sequential 4 KiB writes, barrier=$mode" "$QEMU_IMG" bench -t writeback \
    -w -d 1 -c 20000 -s 4k -S 4k --pattern=0x5c \
    --image-opts "driver=qcow2b,barrier=$mode,file.filename=$seq_img"
  expect_ok "check ($mode)" "$SYS_QEMU_IMG" check -f qcow2 "$seq_img"
  expect_ok "QEMU's qcow2 reads them ($mode)" "$SYS_QEMU_IO" -r -f qcow2 \
    -c 'read -q -P 0x5c 0 80000k' -c 'read -q -P 0 80000k 1M' "$seq_img"
  qemu_io_clean
done

# Reads at depth 32 while the same process writes nothing: data and holes come back right.
expect_ok "bench -d 32 reads" "$QEMU_IMG" bench -f qcow2b -d 32 -c 4000 -s 64k "$img"
