#!/usr/bin/env bash
# Builds the fuzz targets (cargo fuzz, stable toolchain, no sanitizer: the targets check
# bounds themselves and Rust checks the rest) and runs each for SECONDS against a working
# copy of the committed seed corpus. Any crash, panic, timeout (1 s per input), oversized
# allocation or RSS above 4 GiB fails the run; the input that caused it is left in
# fuzz/artifacts/TARGET/ for a regression test (tests/fuzz_regressions.rs).
#
# Usage: fuzz/run.sh [SECONDS] [TARGET...]   (default 30 seconds, every target)
set -uo pipefail
cd "$(dirname "$0")"
seconds=${1:-30}; shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(header tables snapshots compressed whole)
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing (scripts/deps.sh installs it)"; exit 1; }
cargo fuzz build -s none >/dev/null 2>build.log \
  || { tail -20 build.log; echo "fuzz targets do not build"; exit 1; }
rm -f build.log
failed=0 total=0
for t in "${targets[@]}"; do
  work=target/corpus-copy/$t
  mkdir -p "$work"
  log=$(mktemp)
  cargo fuzz run -s none "$t" "$work" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=1 -rss_limit_mb=4096 -print_final_stats=1 > "$log" 2>&1
  status=$?
  runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n1)
  total=$((total + ${runs:-0}))
  if [ "$status" = 0 ]; then
    echo "ok    $t: ${runs:-?} runs in ${seconds}s, $cov"
  else
    failed=1
    echo "FAIL  $t (exit $status):"
    grep -E "panicked|ERROR|SUMMARY|allocation of|Test unit written" "$log" | head -5 | sed 's/^/      /'
  fi
  rm -f "$log"
done
echo "$total runs in all"
exit $failed
