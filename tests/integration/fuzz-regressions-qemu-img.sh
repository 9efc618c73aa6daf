#!/usr/bin/env bash
# Every image-shaped fuzz regression (fuzz/regressions/tables, header) through the built
# qemu-img info -f qcow2b: an error message and exit status 1 (or 0 for one that is a valid
# image after all), never a signal.
. "$(dirname "$0")/lib.sh"
n=0
for f in "$QCOW2B_ROOT"/fuzz/regressions/tables/* "$QCOW2B_ROOT"/fuzz/regressions/header/* \
         "$QCOW2B_ROOT"/fuzz/corpus/tables/*; do
  [ -f "$f" ] && [ "$(basename "$f")" != .keep ] || continue
  cp "$f" "$SCRATCH/img"
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
