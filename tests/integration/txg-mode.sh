#!/usr/bin/env bash
# barrier=txg through the built tools (-t writeback: qemu-io's default, writethrough, would
# add a flush to every write):
# - 1000 x 64 KiB barrier writes + one flush cost one commit (2 host fdatasyncs) plus, when
#   appending, one for the close's give-back of the unused zero reserve (the first write,
#   before the first barrier, drew from it); no barrier costs a host barrier, not even the
#   one that opens the group; a flush with nothing new costs none; the data reads back and
#   QEMU's own qcow2 finds the image clean;
# - writes and flushes without barriers open no group: one fdatasync per flush, as outside
#   groups, appending and overwriting;
# - the byte bound and the age bound commit on their own (counters), the options refuse
#   what does not apply, -blockdev takes them through the QAPI schema;
# - a process that dies (qemu-io's abort) leaves the last committed group, clean: a write
#   committed by the age bound is there, a later barrier write of the open group is not;
# - concurrent writes and flushes (aio) commit without losing a write;
# - QEMU's qcow2 and qcow2b txg take turns on one image.
. "$(dirname "$0")/lib.sh"

fdatasyncs() {
  strace -f -c -e trace=fdatasync,fsync -o "$SCRATCH/strace" "$@" > "$SCRATCH/out" 2>&1 \
    || { cat "$SCRATCH/out" >&2; fail "$* failed"; }
  qemu_io_clean
  awk '$NF == "fdatasync" || $NF == "fsync" {s += $4} END {print s + 0}' "$SCRATCH/strace"
}
# qemu_io_clean, but the counters' "host errors: 0" line is no error.
qemu_io_clean() {
  ! grep -v "host errors: 0" "$SCRATCH/out" | grep -Eq "Pattern verification failed|failed:|error|Error" \
    || { cat "$SCRATCH/out" >&2; fail "qemu-io reported an error"; }
}
counter() { sed -n "s/^ *$1: \([0-9]*\)$/\1/p" "$SCRATCH/out" | tail -n1; }
new_image() { rm -f "$1"; "$SYS_QEMU_IMG" create -q -f qcow2 "$1" "$2"; }
txg() { echo "driver=qcow2b,barrier=txg,file.filename=$1${2:+,$2}"; }

img=$SCRATCH/t.qcow2
writes=() reads=()
for ((i = 0; i < 1000; i++)); do
  writes+=(-c "write -q -B -P $((i % 250 + 1)) $((i * 65536)) 64k")
done
for i in 0 1 500 999; do reads+=(-c "read -q -P $((i % 250 + 1)) $((i * 65536)) 64k"); done

# --- sync counts -----------------------------------------------------------------------------
new_image "$img" 1G
n=$(fdatasyncs "$QEMU_IO" -t writeback --image-opts "$(txg "$img")" "${writes[@]}" -c flush -c info)
echo "1000 barrier writes (append) + flush, barrier=txg: $n fdatasyncs, $(counter 'groups committed') group(s)"
[ "$n" = 3 ] || fail "append: $n fdatasyncs (a commit of 2, the close's reserve give-back)"
[ "$(counter 'groups committed')" = 1 ] || fail "append: groups committed"
[ "$(counter 'guest barrier writes')" = 1000 ] || fail "append: guest barrier writes counter"
[ "$(counter 'host barriers')" = 0 ] || fail "append: a barrier issues no host barrier"
expect_ok "QEMU's qcow2 reads the group" "$SYS_QEMU_IO" -f qcow2 "${reads[@]}" "$img"
qemu_io_clean
expect_ok "check after append" "$SYS_QEMU_IMG" check -f qcow2 "$img"

before=$(stat -c %s "$img")
n=$(fdatasyncs "$QEMU_IO" -t writeback --image-opts "$(txg "$img")" "${writes[@]}" -c flush -c info)
after=$(stat -c %s "$img")
echo "1000 barrier writes (overwrite) + flush: $n fdatasyncs; file $before -> $after bytes"
[ "$n" = 2 ] || fail "overwrite: $n fdatasyncs (one commit is 2)"
# Every cluster is copied once inside the group: at most twice the data, plus tables.
[ "$after" -le $((2 * before + (4 << 20))) ] || fail "overwrite grew the file to $after"
expect_ok "check after overwrite" "$SYS_QEMU_IMG" check -f qcow2 "$img"

n=$(fdatasyncs "$QEMU_IO" -t writeback --image-opts "$(txg "$img")" -c flush -c flush -c info)
[ "$n" = 0 ] || fail "flushes with nothing new cost $n fdatasyncs"

flushed=()
for ((i = 0; i < 100; i++)); do
  flushed+=(-c "write -q -P 3 $((i * 65536)) 4k" -c flush)
done
n=$(fdatasyncs "$QEMU_IO" -t writeback --image-opts "$(txg "$img")" "${flushed[@]}" -c info)
echo "100 overwrites, each flushed, barrier=txg: $n fdatasyncs, $(counter 'groups committed') group(s)"
[ "$n" = 100 ] || fail "overwrite + flush: $n fdatasyncs (one per flush)"
[ "$(counter 'groups committed')" = 100 ] || fail "overwrite + flush: groups committed"
new_image "$img" 1G
n=$(fdatasyncs "$QEMU_IO" -t writeback --image-opts "$(txg "$img")" "${flushed[@]}" -c info)
echo "100 appends, each flushed, barrier=txg: $n fdatasyncs"
# The first appends come before the zero reserve is counted and ordered (as outside groups);
# from then on one per flush; the close gives the unused reserve back.
[ "$n" -le 104 ] || fail "append + flush: $n fdatasyncs (one per flush)"
expect_ok "check after appends" "$SYS_QEMU_IMG" check -f qcow2 "$img"
new_image "$img" 1G

# --- bounds and options ----------------------------------------------------------------------
new_image "$img" 1G
small=()
for ((i = 0; i < 40; i++)); do small+=(-c "write -q -P 7 $((i * 65536)) 64k"); done
# The bound's commits run in the node's committer, beside qemu-io's commands: a pause lets
# the last one end before "info" reads the counter (on a loaded machine it may not have).
expect_ok "byte bound" "$QEMU_IO" -t writeback --image-opts "$(txg "$img" txg-max-bytes=1M)" \
  "${small[@]}" -c "sleep 2000" -c info
qemu_io_clean
[ "$(counter 'groups committed')" = 2 ] || fail "2.5 MiB in 1 MiB groups: $(counter 'groups committed') commits before close"
[ "$(counter 'guest flushes')" = 0 ] || fail "byte bound: no guest flush was sent"

expect_ok "age bound" "$QEMU_IO" -t writeback --image-opts "$(txg "$img" txg-max-age-ms=50)" \
  -c 'write -q -P 8 0 64k' -c 'sleep 400' -c info
qemu_io_clean
[ "$(counter 'groups committed')" = 1 ] || fail "age bound: $(counter 'groups committed') commits"

expect_status 1 "txg-max-bytes below 1 MiB" "$QEMU_IO" --image-opts "$(txg "$img" txg-max-bytes=4096)" -c info
expect_output "txg-max-bytes 4096 is below 1 MiB"
expect_status 1 "txg options without txg" "$QEMU_IO" \
  --image-opts "driver=qcow2b,barrier=ordered,txg-max-age-ms=5,file.filename=$img" -c info
expect_output "apply to barrier=txg only"
expect_ok "-blockdev with barrier txg" "$QEMU_IO" -c 'write -q -B -P 9 0 4k' -c flush -c info \
  "json:{\"driver\": \"qcow2b\", \"barrier\": \"txg\", \"txg-max-age-ms\": 1000, \"txg-max-bytes\": 2097152, \"file\": {\"driver\": \"file\", \"filename\": \"$img\"}}"
qemu_io_clean
expect_output "barrier mode: txg"
[ "$(counter 'groups committed')" = 1 ] || fail "-blockdev: groups committed"

# --- a crash keeps the last committed group --------------------------------------------------
new_image "$img" 64M
status=0
"$QEMU_IO" -t writeback --image-opts "$(txg "$img" txg-max-age-ms=50)" \
  -c 'write -q -P 0x11 0 64k' -c 'sleep 400' \
  -c 'write -q -B -P 0x22 0 64k' -c 'write -q -B -P 0x33 1M 64k' -c abort \
  > "$SCRATCH/out" 2>&1 &
wait $! 2>/dev/null || status=$?   # (bash's "Aborted" report goes to the wait's stderr)
[ "$status" -ge 128 ] || fail "qemu-io abort should end with a signal (exit $status)"
# The write of 0x22 came before the group's first barrier: it went in place, in the interval
# of one epoch before the group, and a crash may show it; 0x33 is the group's.
code=0; "$SYS_QEMU_IMG" check -f qcow2 "$img" > "$SCRATCH/check" 2>&1 || code=$?
[ "$code" = 0 ] || [ "$code" = 3 ] || { cat "$SCRATCH/check" >&2; fail "check after the crash: exit $code"; }
! grep -q ERROR "$SCRATCH/check" || fail "check after the crash found errors"
"$SYS_QEMU_IO" -f qcow2 -c 'read -q -P 0x11 0 64k' "$img" > "$SCRATCH/out" 2>&1 || true
grep -q "Pattern verification failed" "$SCRATCH/out" \
  && expect_ok "the interval's write" "$SYS_QEMU_IO" -f qcow2 -c 'read -q -P 0x22 0 64k' "$img"
expect_ok "the open group is not there" "$SYS_QEMU_IO" -f qcow2 -c 'read -q -P 0 1M 64k' "$img"
qemu_io_clean

# --- concurrent writes and flushes -----------------------------------------------------------
new_image "$img" 256M
aio=()
for ((i = 0; i < 64; i++)); do
  aio+=(-c "aio_write -q -P $((i + 1)) $((i * 96))k 96k")
  if ((i % 8 == 7)); then aio+=(-c aio_flush); fi
done
expect_ok "aio writes and flushes" "$QEMU_IO" -t writeback --image-opts "$(txg "$img")" "${aio[@]}" -c aio_flush
qemu_io_clean
checks=()
# Adjacent 96 KiB writes share clusters with their neighbours: each is there whole.
for ((i = 0; i < 64; i++)); do checks+=(-c "read -q -P $((i + 1)) $((i * 96))k 96k"); done
expect_ok "every aio write is there" "$SYS_QEMU_IO" -f qcow2 "${checks[@]}" "$img"
qemu_io_clean
expect_ok "check after aio" "$SYS_QEMU_IMG" check -f qcow2 "$img"

# --- QEMU's qcow2 and qcow2b txg take turns ----------------------------------------------------
expect_ok "QEMU's qcow2 writes" "$SYS_QEMU_IO" -f qcow2 -c 'write -q -P 0x44 8M 1M' "$img"
expect_ok "txg overwrites part of it" "$QEMU_IO" -t writeback --image-opts "$(txg "$img")" \
  -c 'read -q -P 0x44 8M 1M' -c 'write -q -B -P 0x55 8M 4k' -c flush
qemu_io_clean
expect_ok "QEMU's qcow2 reads both" "$SYS_QEMU_IO" -f qcow2 -c 'read -q -P 0x55 8M 4k' \
  -c 'read -q -P 0x44 8196k 1020k' "$img"
qemu_io_clean
expect_ok "final check" "$SYS_QEMU_IMG" check -f qcow2 "$img"
# --- sustained overwrite: 10x the disk, with an internal snapshot -----------------------------
img2=$SCRATCH/o.qcow2
new_image "$img2" 16M
expect_ok "fill" "$SYS_QEMU_IO" -f qcow2 -c 'write -q -P 0x60 0 16M' "$img2"
expect_ok "snapshot" "$SYS_QEMU_IMG" snapshot -c s0 "$img2"
start=$(stat -c %s "$img2")
passes=()
for ((p = 1; p <= 10; p++)); do
  for ((i = 0; i < 256; i++)); do
    passes+=(-c "write -q -B -P $((0x60 + p)) $(( ((i * 97) % 256) * 64 ))k 64k")
  done
done
expect_ok "10 overwrite passes" "$QEMU_IO" -t writeback \
  --image-opts "$(txg "$img2" txg-max-bytes=4M)" "${passes[@]}" -c flush -c info
qemu_io_clean
end=$(stat -c %s "$img2")
echo "overwrite 10 x 16 MiB in 4 MiB groups: file $start -> $end bytes, $(counter 'groups committed') groups"
# The snapshot keeps the first 16 MiB (QEMU's qcow2 grows the same); beyond that one group's
# copies (4 MiB) and tables, and the zero reserve of the intervals between groups (at most an
# eighth of the disk, 2 MiB here), however many passes.
[ "$end" -le $((start + (16 << 20) + (4 << 20) + (2 << 20) + (2 << 20))) ] || fail "sustained overwrite grew the file to $end"
expect_ok "check after overwrite passes" "$SYS_QEMU_IMG" check -f qcow2 "$img2"
expect_ok "last pass reads back" "$SYS_QEMU_IO" -f qcow2 -c 'read -q -P 0x6a 0 16M' "$img2"
qemu_io_clean
expect_ok "apply the snapshot" "$SYS_QEMU_IMG" snapshot -a s0 "$img2"
expect_ok "the snapshot's data" "$SYS_QEMU_IO" -f qcow2 -c 'read -q -P 0x60 0 16M' "$img2"
qemu_io_clean
expect_ok "check after apply" "$SYS_QEMU_IMG" check -f qcow2 "$img2"
echo "txg mode: ok"
