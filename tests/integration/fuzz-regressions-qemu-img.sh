#!/usr/bin/env bash
# Every image-shaped fuzz regression (fuzz/regressions/tables, header, and the image part of
# each `whole` input: a little-endian u32 length, then the image) and the tables seeds
# through the built qemu-img info -f qcow2b: an error message and exit status 1 (or 0 for one
# that is a valid image after all), never a signal.
. "$(dirname "$0")/lib.sh"
n=0
for f in "$QCOW2B_ROOT"/fuzz/regressions/tables/* "$QCOW2B_ROOT"/fuzz/regressions/header/* \
         "$QCOW2B_ROOT"/fuzz/corpus/tables/* "$QCOW2B_ROOT"/fuzz/regressions/whole/*; do
  [ -f "$f" ] || continue
  case "$f" in
    */regressions/whole/*)
      python3 -c 'import struct, sys
d = open(sys.argv[1], "rb").read()
n = struct.unpack("<I", d[:4])[0] % (1 << 20)
open(sys.argv[2], "wb").write(d[4:4 + n])' "$f" "$SCRATCH/img" ;;
    *) cp "$f" "$SCRATCH/img" ;;
  esac
  status=0
  timeout 60 "$QEMU_IMG" info -f qcow2b "$SCRATCH/img" > "$SCRATCH/out" 2>&1 || status=$?
  case $status in
    0) ;;
    1) grep -q "qcow2" "$SCRATCH/out" || { cat "$SCRATCH/out"; fail "$f: an error without a message"; } ;;
    *) cat "$SCRATCH/out"; fail "$f: qemu-img info exited $status" ;;
  esac
  n=$((n + 1))
done
echo "$n inputs through qemu-img info -f qcow2b, none died"
