#!/usr/bin/env bash
# The qcow2b-recorder filter (src/glue/recorder.rs), which the crash-consistency harness
# (tests/crash/) stands on:
# - above and below qcow2b it logs the guest's requests and what reached the file, in one
#   order, and replaying the file log onto the starting image gives the file the run left;
# - it is a filter that bdrv_skip_filters looks through: with barrier=barrierfs and the
#   injected primitive, the barriers it records reach the primitive registered for the file
#   node below it (20 barrier writes, at most the close's few fdatasyncs: a barrier that
#   fell back to fdatasync would show as one each);
# - the same under QEMU's qcow2 (whose barrier writes become write + flush);
# - a missing log option is an error that says so.
. "$(dirname "$0")/lib.sh"

img=$SCRATCH/r.qcow2
spec() { # FORMAT-OPTIONS
  echo "driver=qcow2b-recorder,log=$SCRATCH/guest.log,$1,file.file.driver=qcow2b-recorder,file.file.log=$SCRATCH/file.log,file.file.file.filename=$img"
}
writes=()
for ((i = 0; i < 20; i++)); do writes+=(-c "write -q -B -P $((i + 1)) $((i * 65536)) 64k"); done

summary() { # what the logs hold, and whether the file log replays to the image
  PYTHONPATH="$QCOW2B_ROOT/tests/crash" python3 -c '
import sys, reclog, model
d = sys.argv[1]
g, f = reclog.read_log(d + "/guest.log"), reclog.read_log(d + "/file.log")
kinds = lambda ops, k: sum(1 for o in ops if o.kind == k)
barrier_writes = sum(1 for o in g if o.kind == "W" and o.flags & reclog.REQ_BARRIER)
m = model.FileModel(f, open(d + "/start.img", "rb").read())
replayed = bytes(m.replay_all()) == open(d + "/r.qcow2", "rb").read()
done = all(o.cseq is not None and o.ret == 0 for o in g + f)
print(barrier_writes, kinds(f, "B"), kinds(f, "F"), kinds(f, "W"), int(replayed), int(done))
' "$SCRATCH"
}

# qcow2b, barrierfs with the injected primitive, under the recorder.
rm -f "$img"; "$SYS_QEMU_IMG" create -q -f qcow2 "$img" 4M; cp "$img" "$SCRATCH/start.img"
strace -f -c -e trace=fdatasync,fsync -o "$SCRATCH/strace" "$QEMU_IO" -t writeback --image-opts \
  "$(spec "file.driver=qcow2b,file.barrier=barrierfs,file.x-barrierfs-inject=on")" \
  "${writes[@]}" > "$SCRATCH/out" 2>&1 || { cat "$SCRATCH/out"; fail "qemu-io under the recorder"; }
qemu_io_clean
syncs=$(awk '$NF == "fdatasync" || $NF == "fsync" {s += $4} END {print s + 0}' "$SCRATCH/strace")
read -r bw fb ff fw replayed done <<< "$(summary)"
echo "barrierfs: $bw guest barrier writes, $fb barriers and $ff flushes logged below, $fw writes; $syncs host fdatasyncs"
[ "$bw" = 20 ] || fail "the guest log shows $bw barrier writes, not 20"
[ "$fb" -ge 20 ] || fail "only $fb barriers reached the file node's recorder"
[ "$syncs" -le 4 ] || fail "$syncs fdatasyncs: barriers below the recorder fell back to fdatasync (primitive not found through the filter?)"
[ "$replayed" = 1 ] || fail "replaying the file log does not give the image"
[ "$done" = 1 ] || fail "a logged request has no completion or failed"
expect_ok "check" "$SYS_QEMU_IMG" check -f qcow2 "$img"

# QEMU's qcow2 under the same recorders.
rm -f "$img"; "$SYS_QEMU_IMG" create -q -f qcow2 "$img" 4M; cp "$img" "$SCRATCH/start.img"
expect_ok "qcow2 under the recorder" "$QEMU_IO" -t writeback --image-opts "$(spec file.driver=qcow2)" "${writes[@]}"
qemu_io_clean
read -r bw fb ff fw replayed done <<< "$(summary)"
echo "qcow2: $bw guest barrier writes, $ff flushes and $fw writes logged below"
[ "$bw" = 20 ] && [ "$ff" -ge 20 ] && [ "$replayed" = 1 ] && [ "$done" = 1 ] \
  || fail "qcow2 under the recorder: $bw barrier writes, $ff flushes, replayed $replayed"
expect_ok "check" "$SYS_QEMU_IMG" check -f qcow2 "$img"

expect_status 1 "recorder without log=" "$QEMU_IO" --image-opts \
  "driver=qcow2b-recorder,file.filename=$img" -c 'read 0 4k'
expect_output "needs log=PATH"
