#!/usr/bin/env bash
# The ordered mode's error paths: ENOSPC and EIO injected (blkdebug, below qcow2b) on a
# background epoch write and on its fdatasync. The guest's barrier writes complete (they are
# buffered); the error surfaces on the next flush; the data stays buffered and the flush
# after retries it once space is back (the error fires once); nothing acknowledged is lost:
# everything reads back, and the image checks clean.
. "$(dirname "$0")/lib.sh"

counter() { sed -n "s/^ *$1: \([0-9]*\)$/\1/p" "$SCRATCH/out" | sed -n "${2:-1}p"; }

img=$SCRATCH/e.qcow2
for case in "write 28" "write 5" "flush 28" "flush 5"; do
  set -- $case
  iotype=$1 errno=$2
  rm -f "$img"
  "$SYS_QEMU_IMG" create -q -f qcow2 "$img" 256M
  # Armed when the guest's flush starts (blkdebug's flush_to_os event), it fails the first
  # write or fdatasync of the write-back that flush waits for, once. (Before the first
  # barrier the ordered mode writes straight to the file, and an error there fails the
  # guest's write itself.)
  opts="driver=qcow2b,barrier=ordered,file.driver=blkdebug,file.image.filename=$img"
  opts+=",file.inject-error.0.event=flush_to_os,file.inject-error.0.iotype=$iotype"
  opts+=",file.inject-error.0.errno=$errno,file.inject-error.0.once=on"
  status=0
  "$QEMU_IO" -t writeback --image-opts "$opts" \
    -c 'write -B -P 0xcd 0 64k' -c 'write -B -P 0xce 64k 64k' \
    -c flush -c info -c flush -c info \
    -c 'read -P 0xcd 0 64k' -c 'read -P 0xce 64k 64k' > "$SCRATCH/out" 2>&1 || status=$?
  # qemu-io's flush reports a failure only in the exit status.
  [ "$status" = 1 ] || { cat "$SCRATCH/out"; fail "$case: the first flush should fail (exit $status)"; }
  grep -q "wrote 65536/65536 bytes at offset 65536" "$SCRATCH/out" \
    || { cat "$SCRATCH/out"; fail "$case: a barrier write waited for the background error"; }
  [ "$(counter 'host errors' 1)" = 1 ] || { cat "$SCRATCH/out"; fail "$case: host errors after the first flush"; }
  first=$(counter epochs 1) second=$(counter epochs 2)
  [ "$second" -ge $((first + 2)) ] || fail "$case: the second flush wrote back $((second - first)) epochs, expected the two barrier writes'"
  ! grep -q "Pattern verification failed" "$SCRATCH/out" || { cat "$SCRATCH/out"; fail "$case: data lost"; }
  expect_ok "$case: check" "$SYS_QEMU_IMG" check -f qcow2 "$img"
  expect_ok "$case: QEMU reads it" "$SYS_QEMU_IO" -r -f qcow2 -c 'read -P 0xcd 0 64k' -c 'read -P 0xce 64k 64k' "$img"
  qemu_io_clean
  echo "ok: $iotype errno $errno: the first flush failed, the second wrote it all back"
done
