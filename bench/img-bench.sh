#!/usr/bin/env bash
# qcow2b vs QEMU's qcow2, same binary, same image, side by side in one run: qemu-img bench
# for read and write, 4 KiB and 64 KiB requests, queue depth 1 and 32, cache=none and
# writeback. Each cell runs both drivers alternately REPS times and keeps the median; the last
# column is qcow2b's throughput as a ratio of qcow2's (1.00 = equal, higher = qcow2b faster).
#
# Usage: img-bench.sh [REPS] [SCALE]   (defaults 3 and 1; SCALE multiplies the request counts)
# Writes go to clusters that are already allocated (the image is filled first), so the
# numbers compare the data paths; allocation cost is what the sync-count benchmarks measure.
set -euo pipefail
. "$(dirname "$0")/../scripts/lib.sh"
bin=$BUILD_ROOT/bin
[ -x "$bin/qemu-img" ] || die "no built qemu-img; run scripts/setup.sh"
reps=${1:-3} scale=${2:-1}
work=$(mktemp -d "$BUILD_ROOT/bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
img=$work/bench.qcow2

say "preparing a filled 1 GiB qcow2 image (64 KiB clusters)"
"$bin/qemu-img" create -q -f qcow2 "$img" 1G
"$bin/qemu-io" -f qcow2 -c 'write -q -P 0x5a 0 1G' "$img" >/dev/null

run() { # driver rw size depth cache count -> seconds
  local drv=$1 rw=$2 size=$3 depth=$4 cache=$5 count=$6 args=()
  [ "$rw" = write ] && args+=(-w --pattern=0x3c)
  "$bin/qemu-img" bench -f "$drv" -t "$cache" -c "$count" -d "$depth" -s "$size" \
    -S "$size" "${args[@]}" "$img" 2>&1 | sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p'
}
median() { sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

printf '\n%-6s %-5s %-5s %-10s %12s %12s %8s\n' op size depth cache "qcow2 MiB/s" "qcow2b MiB/s" ratio
for cache in none writeback; do
  for rw in read write; do
    for size in 4k 64k; do
      for depth in 1 32; do
        bytes=$([ "$size" = 4k ] && echo 4096 || echo 65536)
        count=$(( ($([ "$size" = 4k ] && echo 20000 || echo 4000)) * scale ))
        declare -A t=()
        for drv in qcow2 qcow2b; do : > "$work/t.$drv"; done
        for ((r = 0; r < reps; r++)); do
          for drv in qcow2 qcow2b; do run "$drv" "$rw" "$size" "$depth" "$cache" "$count" >> "$work/t.$drv"; done
        done
        for drv in qcow2 qcow2b; do t[$drv]=$(median < "$work/t.$drv"); done
        awk -v op="$rw" -v sz="$size" -v d="$depth" -v c="$cache" -v n="$count" -v b="$bytes" \
            -v a="${t[qcow2]}" -v q="${t[qcow2b]}" 'BEGIN {
          mb = n * b / 1048576; ra = mb / a; rq = mb / q
          printf "%-6s %-5s %-5s %-10s %12.1f %12.1f %8.2f\n", op, sz, d, c, ra, rq, rq / ra }'
      done
    done
  done
done
