#!/usr/bin/env bash
# Images with extended L2 entries (subclusters) between qcow2b and QEMU's own qcow2, the
# distribution's (10.0) and the built one (7.2): what one writes the other reads alike, and
# every check stays clean; creation, info and measure with extended_l2=on as QEMU's qcow2.
. "$(dirname "$0")/lib.sh"

base=$SCRATCH/base.raw
"$SYS_QEMU_IMG" create -q -f raw "$base" 4M
"$SYS_QEMU_IO" -f raw -c 'write -q -P 0xff 0 4M' "$base" > /dev/null

# The guest content of IMG through driver DRIVER of qemu-img BINARY, as raw bytes in OUT.
to_raw() { # binary driver img out
  expect_ok "convert -f $2 ($1)" "$1" convert -f "$2" -O raw "$3" "$4"
}

checks_clean() { # img
  expect_ok "qemu-img check (system qcow2)" "$SYS_QEMU_IMG" check -f qcow2 "$1"
  expect_ok "qemu-img check (built qcow2)" "$QEMU_IMG" check -f qcow2 "$1"
  expect_ok "qemu-img check (qcow2b)" "$QEMU_IMG" check -f qcow2b "$1"
}

# Partial subclusters over the backing file, a write across two clusters, zeroed and
# unmapped subclusters and clusters, a discard, a write into the unallocated subclusters of
# an allocated cluster.
writes=(-c 'write -q -P 1 1k 2k' -c 'write -q -P 2 63k 4k' -c 'write -q -z 100k 4k'
        -c 'write -q -z -u 192k 64k' -c 'discard -q 256k 64k' -c 'write -q -P 3 300k 512'
        -c 'flush' -c 'write -q -P 4 2M 1M' -c 'write -q -P 5 40k 2k'
        -c 'write -q -z 2100k 3k')
reads=(-c 'read -q -P 0xff 0 1k' -c 'read -q -P 1 1k 2k' -c 'read -q -P 0xff 3k 37k'
       -c 'read -q -P 5 40k 2k' -c 'read -q -P 0xff 42k 21k' -c 'read -q -P 2 63k 4k'
       -c 'read -q -P 0xff 67k 33k' -c 'read -q -P 0 100k 4k' -c 'read -q -P 0xff 104k 88k'
       -c 'read -q -P 0 192k 64k' -c 'read -q -P 0 256k 44k' -c 'read -q -P 3 300k 512'
       -c 'read -q -P 0 300.5k 19.5k' -c 'read -q -P 0xff 320k 1728k'
       -c 'read -q -P 4 2M 52k' -c 'read -q -P 0 2100k 3k' -c 'read -q -P 4 2103k 969k'
       -c 'read -q -P 0xff 3M 1M')

# 1. qcow2b creates and writes; QEMU's qcow2 (both) reads it as qcow2b does.
img=$SCRATCH/by-qcow2b.qcow2
expect_ok "create -f qcow2b -o extended_l2=on" "$QEMU_IMG" create -q -f qcow2b \
  -o extended_l2=on -b base.raw -F raw "$img" 4M
expect_ok "qcow2b writes" "$QEMU_IO" -f qcow2b "${writes[@]}" "$img"
qemu_io_clean
for io in "$SYS_QEMU_IO" "$QEMU_IO"; do
  expect_ok "$io reads (qcow2)" "$io" -r -f qcow2 "${reads[@]}" "$img"
  qemu_io_clean
done
checks_clean "$img"
expect_ok "info" "$SYS_QEMU_IMG" info -f qcow2 "$img"
expect_output "extended l2: true"
to_raw "$QEMU_IMG" qcow2b "$img" "$SCRATCH/b.raw"
to_raw "$SYS_QEMU_IMG" qcow2 "$img" "$SCRATCH/q.raw"
cmp "$SCRATCH/b.raw" "$SCRATCH/q.raw" || fail "qcow2b and QEMU's qcow2 read the image otherwise"

# 2. QEMU's qcow2 (each) creates and writes; qcow2b reads it alike, writes into it, and QEMU
# reads what qcow2b wrote.
for img_tool in "$SYS_QEMU_IMG" "$QEMU_IMG"; do
  io_tool=${img_tool%qemu-img}qemu-io
  img=$SCRATCH/by-qemu.qcow2
  rm -f "$img"
  expect_ok "create -f qcow2 ($img_tool)" "$img_tool" create -q -f qcow2 \
    -o extended_l2=on,cluster_size=32k -b base.raw -F raw "$img" 4M
  expect_ok "qcow2 writes ($io_tool)" "$io_tool" -f qcow2 "${writes[@]}" "$img"
  expect_ok "qcow2b reads" "$QEMU_IO" -r -f qcow2b "${reads[@]}" "$img"
  qemu_io_clean
  checks_clean "$img"
  expect_ok "qcow2b writes over QEMU's subclusters" "$QEMU_IO" -f qcow2b \
    -c 'write -q -P 6 1.5k 1k' -c 'write -q -P 7 50k 512' -c 'write -q -z 63.5k 1k' "$img"
  qemu_io_clean
  expect_ok "$io_tool reads what qcow2b wrote" "$io_tool" -r -f qcow2 \
    -c 'read -q -P 1 1k 512' -c 'read -q -P 6 1.5k 1k' -c 'read -q -P 1 2.5k 512' \
    -c 'read -q -P 0xff 48k 2k' -c 'read -q -P 7 50k 512' -c 'read -q -P 0xff 50.5k 12.5k' \
    -c 'read -q -P 2 63k 512' -c 'read -q -P 0 63.5k 1k' -c 'read -q -P 2 64.5k 2.5k' "$img"
  qemu_io_clean
  checks_clean "$img"
  to_raw "$QEMU_IMG" qcow2b "$img" "$SCRATCH/b.raw"
  to_raw "$SYS_QEMU_IMG" qcow2 "$img" "$SCRATCH/q.raw"
  cmp "$SCRATCH/b.raw" "$SCRATCH/q.raw" || fail "qcow2b and QEMU's qcow2 read the image otherwise"
done

# 3. Creation checks and measure, as QEMU's qcow2 (messages and figures).
expect_status 1 "8k clusters" "$QEMU_IMG" create -q -f qcow2b -o extended_l2=on,cluster_size=8k \
  "$SCRATCH/small.qcow2" 1M
expect_output "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
expect_status 1 "compat=0.10" "$QEMU_IMG" create -q -f qcow2b -o extended_l2=on,compat=0.10 \
  "$SCRATCH/v2.qcow2" 1M
expect_output "Extended L2 entries are only supported with compatibility level 1.1"
for args in "--size 512M" "--size 64G -o cluster_size=16k" "--size 1024T" "--size 3G -o cluster_size=2M"; do
  # shellcheck disable=SC2086
  want=$("$QEMU_IMG" measure -O qcow2 -o extended_l2=on $args 2>&1)
  # shellcheck disable=SC2086
  got=$("$QEMU_IMG" measure -O qcow2b -o extended_l2=on $args 2>&1)
  [ "$got" = "$want" ] || fail "measure $args: qcow2b says '$got', qcow2 '$want'"
done
expect_status 1 "1025T" "$QEMU_IMG" measure -O qcow2b -o extended_l2=on --size 1025T
expect_output "The image size is too large"
