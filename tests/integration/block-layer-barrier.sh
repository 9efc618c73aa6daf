#!/usr/bin/env bash
# The block-layer barrier (qemu-patches/0004-0007) through the built tools: a barrier write
# costs what a write plus a flush costs on drivers without a barrier of their own (raw,
# QEMU's qcow2); a bare barrier on a file goes through file-posix to qcow2b_host_barrier,
# which is one fdatasync while no qcow2b node registered a primitive; qemu-io's -B and barrier;
# the qcow2b options in the QAPI schema; qemu-img info of a qcow2 image unchanged.
. "$(dirname "$0")/lib.sh"

command -v strace > /dev/null || fail "strace is not installed (scripts/deps.sh installs it)"

# fdatasyncs CMD...: runs CMD under strace, prints its fdatasync + fsync calls. The command's
# output is left in $SCRATCH/out for qemu_io_clean.
fdatasyncs() {
  strace -f -c -e trace=fdatasync,fsync -o "$SCRATCH/strace" "$@" > "$SCRATCH/out" 2>&1 \
    || { cat "$SCRATCH/out" >&2; fail "$* (under strace)"; }
  awk '$NF=="fdatasync" || $NF=="fsync" {s += $4} END {print s + 0}' "$SCRATCH/strace"
}

# N allocating 64 KiB writes: each with -B, or each followed by a flush.
n=16
barrier_writes=() flushed_writes=() reads=()
for i in $(seq 0 $((n - 1))); do
  barrier_writes+=(-c "write -q -B -P 0x$((i + 16)) $((i * 64))k 64k")
  flushed_writes+=(-c "write -q -P 0x$((i + 16)) $((i * 64))k 64k" -c flush)
  reads+=(-c "read -q -P 0x$((i + 16)) $((i * 64))k 64k")
done

# --- a barrier write costs a write plus a flush (the emulation, as for FUA) -------------------
for fmt in raw qcow2; do
  img=$SCRATCH/cost.$fmt
  rm -f "$img"; "$QEMU_IMG" create -q -f "$fmt" "$img" 4M
  with_barrier=$(fdatasyncs "$QEMU_IO" -f "$fmt" "${barrier_writes[@]}" "$img")
  qemu_io_clean
  expect_ok "$fmt: barrier writes read back" "$QEMU_IO" -r -f "$fmt" "${reads[@]}" "$img"
  qemu_io_clean
  rm -f "$img"; "$QEMU_IMG" create -q -f "$fmt" "$img" 4M
  with_flush=$(fdatasyncs "$QEMU_IO" -f "$fmt" "${flushed_writes[@]}" "$img")
  qemu_io_clean
  echo "$fmt: $n barrier writes: $with_barrier fdatasyncs; $n writes + flush: $with_flush"
  [ "$with_barrier" = "$with_flush" ] \
    || fail "$fmt: $n barrier writes cost $with_barrier fdatasyncs, $n writes + flush $with_flush"
  [ "$with_flush" -ge "$n" ] || fail "$fmt: $n flushes after writes cost only $with_flush fdatasyncs"
done
expect_ok "check after barrier writes" "$SYS_QEMU_IMG" check -f qcow2 "$SCRATCH/cost.qcow2"

# writev -B and aio_write -B set the flag as well, and the data arrives.
img=$SCRATCH/vec.raw
"$QEMU_IMG" create -q -f raw "$img" 1M
expect_ok "writev -B, aio_write -B" "$QEMU_IO" -f raw -c 'writev -q -B -P 0x31 0 4k 60k' \
  -c 'aio_write -q -B -P 0x32 64k 64k' -c aio_flush -c 'read -q -P 0x31 0 64k' \
  -c 'read -q -P 0x32 64k 64k' "$img"
qemu_io_clean

# --- a bare barrier -------------------------------------------------------------------------
img=$SCRATCH/bare.raw
"$QEMU_IMG" create -q -f raw "$img" 1M
# Nothing written since open: a flush is skipped by the block layer, a barrier is not, because
# it goes raw -> file-posix -> qcow2b_host_barrier -> fdatasync (no primitive registered).
# So one fdatasync here shows the barrier took that path and not the flush emulation.
syncs=$(fdatasyncs "$QEMU_IO" -f raw -c flush "$img")
[ "$syncs" = 0 ] || fail "a flush with nothing written cost $syncs fdatasyncs, expected 0"
syncs=$(fdatasyncs "$QEMU_IO" -f raw -c barrier "$img")
qemu_io_clean
[ "$syncs" = 1 ] || fail "a bare barrier on raw cost $syncs fdatasyncs, expected 1"
# Through a filter (blkdebug has no barrier of its own: bdrv_co_barrier recurses into its child).
syncs=$(fdatasyncs "$QEMU_IO" --image-opts \
  "driver=raw,file.driver=blkdebug,file.image.filename=$img" -c barrier)
qemu_io_clean
[ "$syncs" = 1 ] || fail "a barrier through blkdebug cost $syncs fdatasyncs, expected 1"
# After a write: the barrier's fdatasync, then the flush at close (a barrier is not a flush).
written=$(fdatasyncs "$QEMU_IO" -f raw -c 'write -q -P 0x41 0 64k' "$img")
with_barrier=$(fdatasyncs "$QEMU_IO" -f raw -c 'write -q -P 0x42 0 64k' -c barrier "$img")
qemu_io_clean
[ "$with_barrier" = $((written + 1)) ] \
  || fail "write + barrier cost $with_barrier fdatasyncs, write alone $written: expected one more"
expect_ok "data after a bare barrier" "$QEMU_IO" -r -f raw -c 'read -q -P 0x42 0 64k' "$img"
qemu_io_clean
# cache=unsafe drops barriers as it drops flushes; read-only nodes have nothing to order.
syncs=$(fdatasyncs "$QEMU_IO" -t unsafe -f raw -c 'write -q -P 0x43 0 64k' -c barrier "$img")
[ "$syncs" = 0 ] || fail "cache=unsafe: a barrier cost $syncs fdatasyncs, expected 0"
syncs=$(fdatasyncs "$QEMU_IO" -r -f raw -c barrier "$img")
qemu_io_clean
[ "$syncs" = 0 ] || fail "read-only: a barrier cost $syncs fdatasyncs, expected 0"

# QEMU's qcow2 has no barrier: a bare barrier is its flush, and costs what a flush costs.
img=$SCRATCH/bare.qcow2
"$QEMU_IMG" create -q -f qcow2 "$img" 4M
with_flush=$(fdatasyncs "$QEMU_IO" -f qcow2 -c 'write -q -P 0x51 0 64k' -c flush "$img")
rm -f "$img"; "$QEMU_IMG" create -q -f qcow2 "$img" 4M
with_barrier=$(fdatasyncs "$QEMU_IO" -f qcow2 -c 'write -q -P 0x51 0 64k' -c barrier "$img")
qemu_io_clean
[ "$with_barrier" = "$with_flush" ] \
  || fail "qcow2: write + barrier cost $with_barrier fdatasyncs, write + flush $with_flush"

# qcow2b: a barrier write never costs more than a write plus a flush.
img=$SCRATCH/cost.qcow2b
"$QEMU_IMG" create -q -f qcow2 "$img" 4M
with_barrier=$(fdatasyncs "$QEMU_IO" -f qcow2b "${barrier_writes[@]}" "$img")
qemu_io_clean
rm -f "$img"; "$QEMU_IMG" create -q -f qcow2 "$img" 4M
with_flush=$(fdatasyncs "$QEMU_IO" -f qcow2b "${flushed_writes[@]}" "$img")
qemu_io_clean
echo "qcow2b: $n barrier writes: $with_barrier fdatasyncs; $n writes + flush: $with_flush"
[ "$with_barrier" -le "$with_flush" ] \
  || fail "qcow2b: $n barrier writes cost $with_barrier fdatasyncs, more than writes + flush ($with_flush)"

# --- qemu-io: -B is documented, and refused where it makes no sense ----------------------------
img=$SCRATCH/opts.raw
"$QEMU_IMG" create -q -f raw "$img" 1M
for cmd in write writev aio_write; do
  expect_ok "help $cmd" "$QEMU_IO" -f raw -c "help $cmd" "$img"
  expect_output "^ -B, -- barrier: "
done
expect_ok "help barrier" "$QEMU_IO" -f raw -c 'help barrier' "$img"
expect_output "^barrier -- orders earlier writes before later ones \(no durability\)"
expect_status 1 "write -B -z" "$QEMU_IO" -f raw -c 'write -B -z 0 64k' "$img"
expect_output "^-B and -b, -c or -z cannot be specified at the same time"
expect_status 1 "write -B -c" "$QEMU_IO" -f raw -c 'write -B -c 0 64k' "$img"
expect_output "^-B and -b, -c or -z cannot be specified at the same time"
expect_status 1 "aio_write -B -z" "$QEMU_IO" -f raw -c 'aio_write -B -z 0 64k' "$img"
expect_output "^-B and -z cannot be specified at the same time"

# --- qemu-img info / qemu-io info of a qcow2 image: the qcow2 kind is unchanged -----------------
img=$SCRATCH/cost.qcow2
expect_ok "qemu-img info" "$QEMU_IMG" info -f qcow2 "$img"
expect_output "^Format specific information:"
expect_output "^    compat: 1.1"
expect_output "^    refcount bits: 16"
expect_ok "qemu-img info --output=json" "$QEMU_IMG" info -f qcow2 --output=json "$img"
expect_output '"type": "qcow2"'
expect_ok "qemu-io info" "$QEMU_IO" -r -f qcow2 -c info "$img"
expect_output "^format name: qcow2$"
expect_output "^    compat: 1.1"
expect_ok "qemu-img info -f qcow2b" "$QEMU_IMG" info -f qcow2b "$img"
expect_output "^file format: qcow2b"
expect_output "^    compat: 1.1"

# --- the qcow2b options in the QAPI schema (-blockdev, QMP blockdev-add) -----------------------
# qemu-storage-daemon parses --blockdev through the schema. An option the schema accepts reaches
# the driver, which opens the node (the daemon goes to the background and is stopped here) or
# refuses the value with its own message; only the schema's own errors fail this test.
img=$SCRATCH/qapi.qcow2
"$QEMU_IMG" create -q -f qcow2 "$img" 4M
stop_daemon() {
  if [ -f "$SCRATCH/qsd.pid" ]; then kill "$(cat "$SCRATCH/qsd.pid")" 2>/dev/null || true; fi
  for _ in $(seq 50); do [ -e "$SCRATCH/qsd.pid" ] || break; sleep 0.1; done
}
trap 'stop_daemon; rm -rf "$SCRATCH"' EXIT
# blockdev_qcow2b OPTIONS: exit status of opening a qcow2b node with OPTIONS; output in out.
blockdev_qcow2b() {
  local status=0
  rm -f "$SCRATCH/qsd.pid"
  "$QSD" --blockdev "driver=file,node-name=f,filename=$img" \
    --blockdev "driver=qcow2b,node-name=q,file=f,$1" \
    --pidfile "$SCRATCH/qsd.pid" --daemonize > "$SCRATCH/out" 2>&1 || status=$?
  [ "$status" != 0 ] || stop_daemon
  return "$status"
}
schema_errors="Parameter '[^']*' (is unexpected|does not accept value|expects)"
for opts in barrier=auto barrier=barrierfs barrier=ordered barrier=flush \
  barrier=ordered,buffer-size=8388608 barrier=barrierfs,x-barrierfs-inject=on \
  barrier=barrierfs,barrierfs-syscall=0 l2-cache-size=1048576,refcount-cache-size=262144 \
  cache-size=2097152; do
  # barrierfs-syscall=0 is no system call number: a driver that reads it refuses it, so no
  # system call is ever made here (see the BarrierFS danger in FACTS).
  blockdev_qcow2b "$opts" || true
  ! grep -Eq "$schema_errors" "$SCRATCH/out" || { cat "$SCRATCH/out" >&2; fail "the schema refused $opts"; }
done
expect_status 1 "barrier=bogus" blockdev_qcow2b barrier=bogus
expect_output "Parameter 'barrier' does not accept value 'bogus'"
expect_status 1 "buffer-size=big" blockdev_qcow2b buffer-size=big
expect_output "Parameter 'buffer-size' expects integer"
expect_status 1 "x-barrierfs-inject=maybe" blockdev_qcow2b x-barrierfs-inject=maybe
expect_output "Parameter 'x-barrierfs-inject' expects 'on' or 'off'"
expect_status 1 "unknown member" blockdev_qcow2b fast=on
expect_output "Parameter 'fast' is unexpected"
# QEMU's own qcow2 does not take the qcow2b members.
expect_status 1 "qcow2 with barrier=" "$QSD" --blockdev "driver=file,node-name=f,filename=$img" \
  --blockdev "driver=qcow2,node-name=q,file=f,barrier=ordered"
expect_output "Parameter 'barrier' is unexpected"
