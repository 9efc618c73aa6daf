#!/usr/bin/env bash
# qemu-system-x86_64 accepts -drive driver=qcow2b and -blockdev driver=qcow2b; the HMP
# qemu-io command reads and writes through the attached node.
. "$(dirname "$0")/lib.sh"

img=$SCRATCH/s.qcow2 img2=$SCRATCH/s2.qcow2
"$SYS_QEMU_IMG" create -q -f qcow2 "$img" 4M
"$SYS_QEMU_IMG" create -q -f qcow2 "$img2" 4M
"$SYS_QEMU_IO" -f qcow2 -c 'write -q -P 0x5a 0 128k' "$img" >/dev/null

printf '%s\n' 'info block' 'qemu-io d0 "read -P 0x5a 0 128k"' 'qemu-io d0 "write -P 0x77 2M 64k"' \
  'qemu-io q1 "write -P 0x78 0 64k"' 'quit' |
  timeout 60 "$QEMU_SYSTEM" -M none -accel tcg -display none -nodefaults -monitor stdio \
    -drive "driver=qcow2b,file.filename=$img,if=none,id=d0" \
    -blockdev "driver=file,node-name=f1,filename=$img2" -blockdev driver=qcow2b,node-name=q1,file=f1 \
    > "$SCRATCH/out" 2>&1 || { cat "$SCRATCH/out"; fail "qemu-system-x86_64 exited with $?"; }
expect_output "d0 \(#block[0-9]+\): .*s.qcow2 \(qcow2b\)"
expect_output "read 131072/131072 bytes at offset 0"
expect_output "wrote 65536/65536 bytes at offset 2097152"
qemu_io_clean

expect_ok "QEMU's qcow2 reads the emulator's writes" "$SYS_QEMU_IO" -r -f qcow2 -c 'read -P 0x77 2M 64k' "$img"
qemu_io_clean
expect_ok "and the -blockdev node's" "$SYS_QEMU_IO" -r -f qcow2 -c 'read -P 0x78 0 64k' "$img2"
qemu_io_clean
