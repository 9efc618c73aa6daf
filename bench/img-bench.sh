#!/usr/bin/env bash
# qcow2b vs QEMU's qcow2, same binary, same image, side by side in one run: qemu-img bench
# for read and write, 4 KiB and 64 KiB requests, queue depth 1 and 32, cache=none and
# writeback. Each cell runs the two drivers back to back REPS times. The ratio column is the
# median over those pairs of qcow2b's throughput divided by qcow2's (1.00 = equal, higher =
# qcow2b faster): pairing cancels the slow drift of a shared machine, where single runs of one
# driver vary by 10-20%; "spread" is the lowest and highest pair ratio.
#
# Usage: img-bench.sh [REPS] [SCALE]   (defaults 5 and 3; SCALE multiplies the request counts)
# Writes go to clusters that are already allocated (the image is filled first), so the
# numbers compare the data paths; allocation cost is what the sync-count benchmarks measure.
set -euo pipefail
. "$(dirname "$0")/../scripts/lib.sh"
bin=$BUILD_ROOT/bin
[ -x "$bin/qemu-img" ] || die "no built qemu-img; run scripts/setup.sh"
reps=${1:-5} scale=${2:-3}
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

printf '\n%-6s %-5s %-5s %-10s %12s %12s %8s %13s\n' op size depth cache "qcow2 MiB/s" "qcow2b MiB/s" ratio spread
for cache in none writeback; do
  for rw in read write; do
    for size in 4k 64k; do
      for depth in 1 32; do
        bytes=$([ "$size" = 4k ] && echo 4096 || echo 65536)
        count=$(( ($([ "$size" = 4k ] && echo 20000 || echo 4000)) * scale ))
        : > "$work/pairs"
        for ((r = 0; r < reps; r++)); do
          # Alternate which driver goes first, so neither always runs on a warmer cache.
          if ((r % 2)); then order="qcow2b qcow2"; else order="qcow2 qcow2b"; fi
          declare -A t=()
          for drv in $order; do t[$drv]=$(run "$drv" "$rw" "$size" "$depth" "$cache" "$count"); done
          echo "${t[qcow2]} ${t[qcow2b]}" >> "$work/pairs"
        done
        python3 - "$rw" "$size" "$depth" "$cache" "$count" "$bytes" "$work/pairs" <<'PY'
import statistics, sys
op, size, depth, cache, count, nbytes, path = sys.argv[1:]
pairs = [tuple(map(float, line.split())) for line in open(path) if line.strip()]
mib = int(count) * int(nbytes) / 1048576
ratios = sorted(a / q for a, q in pairs)   # seconds: qcow2 / qcow2b = qcow2b's speed-up
qcow2 = mib / statistics.median(a for a, _ in pairs)
qcow2b = mib / statistics.median(q for _, q in pairs)
print(f"{op:<6} {size:<5} {depth:<5} {cache:<10} {qcow2:12.1f} {qcow2b:12.1f} "
      f"{statistics.median(ratios):8.2f} {ratios[0]:6.2f}-{ratios[-1]:<6.2f}")
PY
      done
    done
  done
done
