#!/usr/bin/env bash
# The main job, for now: the same workload through QEMU's qcow2 and through qcow2b, with the
# built qemu-io, side by side. It creates a fresh image, writes N clusters at new offsets with
# a flush after each (what a guest's dsync appends send), counts the host fdatasync calls with
# strace, reads the data back through the other driver, and checks the image.
#
# Usage: demo.sh [N]   (default 64)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
bin=$BUILD_ROOT/bin
[ -x "$bin/qemu-io" ] || die "no built qemu-io in $bin; run scripts/setup.sh"
n=${1:-64}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

say "demo: $n x (64 KiB write at a new offset + flush) on a fresh 64 MiB qcow2 image"
printf '%-8s %16s %16s %12s %s\n' driver "host fdatasync" "per guest flush" "read back" "qemu-img check"
for drv in qcow2 qcow2b; do
  img=$work/$drv.qcow2
  "$bin/qemu-img" create -q -f qcow2 "$img" 64M
  cmds=()
  for ((i = 0; i < n; i++)); do
    cmds+=(-c "write -q -P $((i % 250 + 1)) $((i * 65536)) 64k" -c flush)
  done
  strace -f -c -e trace=fdatasync,fsync -o "$work/strace.$drv" \
    "$bin/qemu-io" --image-opts "driver=$drv,file.filename=$img,cache.direct=off" "${cmds[@]}" \
    > "$work/io.$drv" 2>&1 || { cat "$work/io.$drv"; die "qemu-io with driver=$drv failed"; }
  syncs=$(awk '$NF=="fdatasync" || $NF=="fsync" {s += $4} END {print s + 0}' "$work/strace.$drv")
  # Read every cluster back through the other driver: the image must be plain qcow2 either way.
  other=$([ "$drv" = qcow2 ] && echo qcow2b || echo qcow2)
  reads=()
  for ((i = 0; i < n; i++)); do
    reads+=(-c "read -q -P $((i % 250 + 1)) $((i * 65536)) 64k")
  done
  if "$bin/qemu-io" -r -f "$other" "$img" "${reads[@]}" > "$work/read.$drv" 2>&1 \
     && ! grep -q "Pattern verification failed\|error" "$work/read.$drv"; then
    readback="ok ($other)"
  else
    readback="FAILED ($other)"
  fi
  check=$("$bin/qemu-img" check -f qcow2 "$img" 2>&1 | head -n1)
  printf '%-8s %16s %16s %12s %s\n' "$drv" "$syncs" "$(awk -v s="$syncs" -v n="$n" 'BEGIN {printf "%.2f", s / n}')" "$readback" "$check"
done
say "qemu-img --help lists: $("$bin/qemu-img" --help | grep -o 'qcow2b' | head -n1)"
