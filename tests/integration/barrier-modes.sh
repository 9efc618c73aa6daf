#!/usr/bin/env bash
# The barrier issue's proofs, through the built qemu-io (-t writeback: qemu-io's default,
# writethrough, would add a flush to every write):
# - 200 x (64 KiB write at a new offset + flush) costs at most 203 host fdatasyncs in the
#   default mode (QEMU's qcow2 in the same binary: about 400), and writes into new L2 regions
#   one per flush (stock: 5);
# - 200 barrier writes + one flush: ordered mode writes epochs in the background (host
#   fdatasyncs at most epochs + 1, no guest request waited for room), barrierfs with the
#   injected primitive costs one fdatasync, flush mode one per barrier; data reads back and
#   the image checks clean after close in every mode;
# - the counters in qemu-io's info; barrierfs refuses to run without a system call number;
#   barrierfs-syscall calls the number given and nothing else (getpid stands in for
#   BarrierFS's fdatabarrier: harmless, and visible to strace).
. "$(dirname "$0")/lib.sh"

# fdatasyncs CMD...: host fdatasync calls of the command (strace), output in $SCRATCH/out.
fdatasyncs() {
  strace -f -c -e trace=fdatasync,fsync -o "$SCRATCH/strace" "$@" > "$SCRATCH/out" 2>&1 \
    || { cat "$SCRATCH/out" >&2; fail "$* failed"; }
  awk '$NF == "fdatasync" || $NF == "fsync" {s += $4} END {print s + 0}' "$SCRATCH/strace"
}

# counter NAME: a counter from the last qemu-io info output.
counter() {
  sed -n "s/^ *$1: \([0-9]*\)$/\1/p" "$SCRATCH/out" | tail -n1
}

new_image() { rm -f "$1"; "$SYS_QEMU_IMG" create -q -f qcow2 "$1" "$2"; }

img=$SCRATCH/b.qcow2
appends=() barrier_writes=() reads=()
for ((i = 0; i < 200; i++)); do
  appends+=(-c "write -q -P $((i % 250 + 1)) $((i * 65536)) 64k" -c flush)
  barrier_writes+=(-c "write -q -B -P $((i % 250 + 1)) $((i * 65536)) 64k")
done
for i in 0 1 99 199; do reads+=(-c "read -q -P $((i % 250 + 1)) $((i * 65536)) 64k"); done

# --- flush per write -----------------------------------------------------------------------
new_image "$img" 1G
stock=$(fdatasyncs "$QEMU_IO" -t writeback -f qcow2 "${appends[@]}" "$img")
new_image "$img" 1G
ours=$(fdatasyncs "$QEMU_IO" -t writeback -f qcow2b "${appends[@]}" -c info "$img")
echo "200 x (64k append + flush): qcow2 $stock fdatasyncs, qcow2b (default mode) $ours"
[ "$ours" -le 203 ] || fail "qcow2b: $ours fdatasyncs for 200 flushes (at most 203)"
[ "$stock" -ge 380 ] || fail "setup: QEMU's qcow2 should need about 400 here, not $stock"
[ "$(counter 'guest flushes')" = 200 ] || fail "guest flushes counter"
expect_ok "check" "$SYS_QEMU_IMG" check -f qcow2 "$img"

# New L2 regions: 512 MiB apart with 64 KiB clusters.
regions=()
for ((i = 0; i < 16; i++)); do regions+=(-c "write -q -P $((i + 1)) $((i * 512))M 4k" -c flush); done
new_image "$img" 8G
stock=$(fdatasyncs "$QEMU_IO" -t writeback -f qcow2 "${regions[@]}" "$img")
new_image "$img" 8G
ours=$(fdatasyncs "$QEMU_IO" -t writeback -f qcow2b "${regions[@]}" "$img")
echo "16 x (write into a new L2 region + flush): qcow2 $stock fdatasyncs, qcow2b $ours"
[ "$ours" -le 19 ] || fail "qcow2b: $ours fdatasyncs for 16 flushes into new L2 regions"
expect_ok "check" "$SYS_QEMU_IMG" check -f qcow2 "$img"

# --- barrier per write ---------------------------------------------------------------------
for mode in ordered barrierfs flush; do
  case $mode in
    barrierfs) opts="barrier=barrierfs,x-barrierfs-inject=on" ;;
    # 200 epochs of a 64 KiB cluster and its L2 table's write: 25 MiB, more than the default
    # 16 MiB buffer holds while the epochs before are synced; with 64M no write waits for room
    # (with the default the waits add up to what the closing flush would wait anyway).
    ordered) opts="barrier=ordered,buffer-size=64M" ;;
    *) opts="barrier=$mode" ;;
  esac
  new_image "$img" 1G
  n=$(fdatasyncs "$QEMU_IO" -t writeback --image-opts "driver=qcow2b,$opts,file.filename=$img" \
        "${barrier_writes[@]}" -c flush -c info)
  epochs=$(counter epochs) barriers=$(counter 'host barriers') waited=$(counter 'full buffer wait ns')
  echo "200 barrier writes + flush, barrier=$mode: $n fdatasyncs, $barriers host barriers, $epochs epochs"
  [ "$(counter 'guest barrier writes')" = 200 ] || fail "$mode: guest barrier writes counter"
  case $mode in
    ordered)
      [ "$n" -le $((epochs + 3)) ] || fail "ordered: $n fdatasyncs for $epochs epochs"
      [ "$epochs" -ge 200 ] || fail "ordered: each guest barrier should close an epoch ($epochs)"
      [ "$waited" = 0 ] || fail "ordered: a write waited $waited ns for room (64 MiB buffer)"
      ;;
    barrierfs)
      [ "$n" -le 3 ] || fail "barrierfs: $n fdatasyncs (the flush's, and open/close at most)"
      [ "$barriers" -ge 200 ] || fail "barrierfs: $barriers host barriers for 200 barrier writes"
      ;;
    flush) [ "$n" -ge 200 ] || fail "flush: every barrier should be an fdatasync ($n)" ;;
  esac
  expect_ok "$mode: QEMU's qcow2 reads the data" "$SYS_QEMU_IO" -r -f qcow2 "${reads[@]}" "$img"
  qemu_io_clean
  expect_ok "$mode: check after close" "$SYS_QEMU_IMG" check -f qcow2 "$img"
done

# --- options ---------------------------------------------------------------------------------
new_image "$img" 64M
expect_status 1 "barrierfs without a syscall number" "$QEMU_IO" --image-opts \
  "driver=qcow2b,barrier=barrierfs,file.filename=$img" -c 'read 0 4k'
expect_output "barrierfs-syscall=N"
expect_status 1 "bad mode" "$QEMU_IO" --image-opts "driver=qcow2b,barrier=fast,file.filename=$img" -c 'read 0 4k'
expect_output "expected auto, barrierfs, ordered, flush or txg"
expect_ok "info shows the mode" "$QEMU_IO" --image-opts "driver=qcow2b,file.filename=$img" -c info
expect_output "barrier mode: ordered"
# barrierfs-syscall=39 (getpid on x86_64) stands in for fdatabarrier: one call per barrier.
strace -f -e trace=getpid -o "$SCRATCH/getpid" "$QEMU_IO" -t writeback --image-opts \
  "driver=qcow2b,barrier=barrierfs,barrierfs-syscall=39,file.filename=$img" \
  -c 'write -q -B 0 64k' -c 'write -q -B 64k 64k' -c 'barrier' -c info > "$SCRATCH/out" 2>&1 \
  || { cat "$SCRATCH/out"; fail "barrierfs-syscall=39"; }
calls=$(grep -c 'getpid()' "$SCRATCH/getpid" || true)
[ "$calls" -ge "$(counter 'host barriers')" ] && [ "$calls" -ge 2 ] \
  || fail "barrierfs-syscall: $calls calls of the given number for $(counter 'host barriers') host barriers"
expect_ok "check" "$SYS_QEMU_IMG" check -f qcow2 "$img"
