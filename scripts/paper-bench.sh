#!/usr/bin/env bash
# The main job: the paper's evaluation (Figures 3-5: varmail, Mobibench, GNU dd) for QEMU,
# QEMU-HostB and QEMU-AllB on this machine, every configuration side by side in one run, with
# and without the flush-latency model, and the real guest (TCG). Writes results/ (the table
# paper-bench.md, the charts fig3-varmail.png, fig4-mobibench.png, fig5-dd.png) and prints
# the table. Arguments go to bench/paper-bench.py: --quick (default, about 5 minutes with the
# guest), --full (about 50 minutes), --no-guest to leave the real guest out, -n N, --reps R,
# --latency-ms MS; see `python3 bench/paper-bench.py --help`.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
[ -x "$BUILD_ROOT/bin/qemu-io" ] || die "no built qemu-io in $BUILD_ROOT/bin; run scripts/setup.sh"
guest=(--guest)
args=()
for a in "$@"; do
  case "$a" in
    --no-guest) guest=() ;;
    *) args+=("$a") ;;
  esac
done
exec python3 "$QCOW2B_ROOT/bench/paper-bench.py" "${guest[@]}" "${args[@]}"
