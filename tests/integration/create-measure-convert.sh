#!/usr/bin/env bash
# qemu-img create -f qcow2b makes standard qcow2 images (QEMU's qcow2 reads, checks and
# describes them as it would its own), with every creation option the issue names;
# qemu-img measure -O qcow2b agrees with -O qcow2; qemu-img convert -O qcow2b copies exactly.
. "$(dirname "$0")/lib.sh"

info_field() { # image key -> value from qemu-img info --output=json (the top level)
  "$SYS_QEMU_IMG" info --output=json "$1" | python3 -c '
import json, sys
info = json.load(sys.stdin)
value = info
for k in sys.argv[1].split("/"):
    value = value[k]
print(str(value).lower())' "$2"
}

n=0
for opts in "" "compat=0.10" "cluster_size=512" "cluster_size=2M" "refcount_bits=1" "refcount_bits=64" \
            "lazy_refcounts=on" "compression_type=zstd" "preallocation=metadata" "preallocation=falloc" \
            "preallocation=full" "cluster_size=4k,refcount_bits=8,lazy_refcounts=on,compression_type=zstd"; do
  n=$((n + 1)); img=$SCRATCH/img$n.qcow2
  expect_ok "create -o '$opts'" "$QEMU_IMG" create -q -f qcow2b ${opts:+-o "$opts"} "$img" 64M
  expect_ok "check ($opts)" "$SYS_QEMU_IMG" check -f qcow2 "$img"
  [ "$(info_field "$img" format)" = qcow2 ] || fail "probing should say qcow2 ($opts)"
  [ "$(info_field "$img" virtual-size)" = 67108864 ] || fail "virtual size ($opts)"
  case "$opts" in *compat=0.10*) want=0.10 ;; *) want=1.1 ;; esac
  [ "$(info_field "$img" format-specific/data/compat)" = "$want" ] || fail "compat ($opts)"
  case "$opts" in *cluster_size=512*) c=512 ;; *cluster_size=2M*) c=2097152 ;; *cluster_size=4k*) c=4096 ;; *) c=65536 ;; esac
  [ "$(info_field "$img" cluster-size)" = "$c" ] || fail "cluster size ($opts)"
  case "$opts" in *refcount_bits=1,*|*refcount_bits=1) r=1 ;; *refcount_bits=64*) r=64 ;; *refcount_bits=8*) r=8 ;; *) r=16 ;; esac
  [ "$(info_field "$img" format-specific/data/refcount-bits)" = "$r" ] || fail "refcount bits ($opts)"
  case "$opts" in *lazy_refcounts=on*) l=true ;; *compat=0.10*) l=skip ;; *) l=false ;; esac
  [ "$l" = skip ] || [ "$(info_field "$img" format-specific/data/lazy-refcounts)" = "$l" ] || fail "lazy refcounts ($opts)"
  case "$opts" in *zstd*) z=zstd ;; *) z=zlib ;; esac
  [ "$(info_field "$img" format-specific/data/compression-type)" = "$z" ] || fail "compression type ($opts)"
  # Written through qcow2b, read through QEMU's qcow2.
  expect_ok "write ($opts)" "$QEMU_IO" -f qcow2b -c 'write -P 0x5c 1M 100k' "$img"
  expect_ok "read ($opts)" "$SYS_QEMU_IO" -r -f qcow2 -c 'read -P 0x5c 1M 100k' -c 'read -P 0 0 1M' "$img"
  qemu_io_clean
  expect_ok "check after write ($opts)" "$SYS_QEMU_IMG" check -f qcow2 "$img"
done

# Preallocation: metadata maps every cluster, full and falloc allocate the file like QEMU's.
"$SYS_QEMU_IMG" create -q -f qcow2 -o preallocation=full "$SCRATCH/ref-full.qcow2" 64M
[ "$(stat -c %s "$SCRATCH/img11.qcow2")" = "$(stat -c %s "$SCRATCH/ref-full.qcow2")" ] \
  || fail "preallocation=full: file length differs from QEMU's"
[ "$(stat -c %b "$SCRATCH/img11.qcow2")" -ge $((64 * 2048)) ] || fail "preallocation=full did not allocate"
[ "$(stat -c %b "$SCRATCH/img10.qcow2")" -ge $((64 * 2048)) ] || fail "preallocation=falloc did not allocate"
"$SYS_QEMU_IMG" map --output=json -f qcow2 "$SCRATCH/img9.qcow2" > "$SCRATCH/map"
grep -q '"present": false' "$SCRATCH/map" && fail "preallocation=metadata left unallocated clusters"

# Backing file and format.
base=$SCRATCH/base.qcow2 top=$SCRATCH/top.qcow2
"$SYS_QEMU_IMG" create -q -f qcow2 "$base" 8M
"$SYS_QEMU_IO" -f qcow2 -c 'write -q -P 0x11 0 8M' "$base" >/dev/null
expect_ok "create with a backing file" "$QEMU_IMG" create -q -f qcow2b -b "$base" -F qcow2 "$top"
[ "$(info_field "$top" backing-filename)" = "${base,,}" ] || fail "backing file name"
[ "$(info_field "$top" backing-filename-format)" = qcow2 ] || fail "backing format"
[ "$(info_field "$top" virtual-size)" = 8388608 ] || fail "size taken from the backing file"
expect_ok "read through" "$QEMU_IO" -r -f qcow2b -c 'read -P 0x11 0 8M' "$top"
qemu_io_clean

# measure: the same numbers as for qcow2, for a size and for an existing image.
for args in "--size 10G" "--size 1G -o cluster_size=4k,refcount_bits=64" "--size 100M -o preallocation=full"; do
  a=$("$QEMU_IMG" measure -O qcow2b $args) b=$("$SYS_QEMU_IMG" measure -O qcow2 $args)
  [ "$a" = "$b" ] || fail "measure $args: qcow2b says '$a', qcow2 says '$b'"
done
a=$("$QEMU_IMG" measure -f qcow2 -O qcow2b "$base" | head -2) b=$("$SYS_QEMU_IMG" measure -f qcow2 -O qcow2 "$base" | head -2)
[ "$a" = "$b" ] || fail "measure of an image: qcow2b says '$a', qcow2 says '$b'"

# convert into a new qcow2b image, plain and compressed source.
"$SYS_QEMU_IMG" convert -c -f qcow2 -O qcow2 "$base" "$SCRATCH/compressed.qcow2"
for src in "$base" "$SCRATCH/compressed.qcow2" "$top"; do
  expect_ok "convert -O qcow2b $(basename "$src")" "$QEMU_IMG" convert -f qcow2 -O qcow2b "$src" "$SCRATCH/conv.qcow2"
  expect_ok "compare" "$SYS_QEMU_IMG" compare -f qcow2 -F qcow2 "$src" "$SCRATCH/conv.qcow2"
  expect_ok "check" "$SYS_QEMU_IMG" check -f qcow2 "$SCRATCH/conv.qcow2"
done

# convert -c into qcow2b (zlib and zstd): every cluster compressed, as QEMU's qcow2 makes them
# (the same compressed cluster count and file size), read back by the system's QEMU, both
# checks clean.
for z in zlib zstd; do
  expect_ok "convert -c -O qcow2b ($z)" "$QEMU_IMG" convert -c -f qcow2 -O qcow2b \
    -o compression_type=$z "$top" "$SCRATCH/conv-c.qcow2"
  expect_ok "convert -c -O qcow2 ($z)" "$SYS_QEMU_IMG" convert -c -f qcow2 -O qcow2 \
    -o compression_type=$z "$top" "$SCRATCH/conv-c-ref.qcow2"
  expect_ok "compare ($z)" "$SYS_QEMU_IMG" compare -f qcow2 -F qcow2 "$top" "$SCRATCH/conv-c.qcow2"
  expect_ok "check ($z)" "$SYS_QEMU_IMG" check -f qcow2 "$SCRATCH/conv-c.qcow2"
  expect_ok "check -f qcow2b ($z)" "$QEMU_IMG" check -f qcow2b "$SCRATCH/conv-c.qcow2"
  a=$("$SYS_QEMU_IMG" check -f qcow2 --output=json "$SCRATCH/conv-c.qcow2" | grep compressed-clusters)
  b=$("$SYS_QEMU_IMG" check -f qcow2 --output=json "$SCRATCH/conv-c-ref.qcow2" | grep compressed-clusters)
  [ -n "$a" ] && [ "$a" = "$b" ] || fail "convert -c ($z): qcow2b '$a', qcow2 '$b'"
done
