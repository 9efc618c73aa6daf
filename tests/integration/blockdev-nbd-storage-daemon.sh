#!/usr/bin/env bash
# -blockdev (through the QAPI schema), qemu-storage-daemon and qemu-nbd accept driver=qcow2b.
. "$(dirname "$0")/lib.sh"

img=$SCRATCH/b.qcow2
"$SYS_QEMU_IMG" create -q -f qcow2 "$img" 4M
"$SYS_QEMU_IO" -f qcow2 -c 'write -q -P 0x5a 0 128k' "$img" >/dev/null

# qemu-io with a -blockdev-style JSON description (parsed through the QAPI schema).
expect_ok "qemu-io json:" "$QEMU_IO" -c 'read -P 0x5a 0 128k' \
  "json:{\"driver\": \"qcow2b\", \"file\": {\"driver\": \"file\", \"filename\": \"$img\"}}"
qemu_io_clean

# qemu-storage-daemon exporting a qcow2b node over NBD; write through it, read it back.
sock=$SCRATCH/qsd.sock
"$QSD" --blockdev "driver=file,node-name=f,filename=$img" \
  --blockdev driver=qcow2b,node-name=q,file=f \
  --nbd-server "addr.type=unix,addr.path=$sock" \
  --export type=nbd,id=e,node-name=q,name=q,writable=on \
  --pidfile "$SCRATCH/qsd.pid" --daemonize
stop_daemon() {
  if [ -f "$SCRATCH/qsd.pid" ]; then kill "$(cat "$SCRATCH/qsd.pid")" 2>/dev/null || true; fi
}
trap 'stop_daemon; rm -rf "$SCRATCH"' EXIT
expect_ok "write over NBD" "$QEMU_IO" -f raw -c 'write -q -P 0x66 1M 64k' -c flush "nbd+unix:///q?socket=$sock"
qemu_io_clean
expect_ok "read over NBD" "$QEMU_IO" -f raw -c 'read -P 0x5a 0 128k' -c 'read -P 0x66 1M 64k' "nbd+unix:///q?socket=$sock"
qemu_io_clean
stop_daemon
for _ in $(seq 50); do [ -e "$SCRATCH/qsd.pid" ] || break; sleep 0.1; done

# qemu-nbd with -f qcow2b, read-only.
sock2=$SCRATCH/nbd.sock
"$QEMU_NBD" -f qcow2b -r -k "$sock2" --fork "$img"
expect_ok "read via qemu-nbd" "$QEMU_IO" -r -f raw -c 'read -P 0x66 1M 64k' "nbd+unix:///?socket=$sock2"
qemu_io_clean

expect_ok "QEMU's qcow2 reads what went through the daemon" "$SYS_QEMU_IO" -r -f qcow2 -c 'read -P 0x66 1M 64k' "$img"
qemu_io_clean
expect_ok "check" "$SYS_QEMU_IMG" check -f qcow2 "$img"
