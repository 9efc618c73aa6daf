#!/usr/bin/env bash
# README command 2: every test. Builds first if needed (idempotent, so CI on a fresh clone
# works), then: formatting and lints, the engine's cargo tests, and the integration tests
# against the built QEMU binaries. Ends with one line "N passed, N failed".
set -uo pipefail
. "$(dirname "$0")/lib.sh"
cd "$QCOW2B_ROOT"

bash scripts/deps.sh || exit 1
bash scripts/fetch-qemu.sh || exit 1
bash scripts/build.sh || exit 1

passed=0 failed=0 failures=()
record() { # name status
  if [ "$2" = 0 ]; then passed=$((passed + 1)); echo "ok    $1"
  else failed=$((failed + 1)); failures+=("$1"); echo "FAIL  $1"; fi
}

say "lints"
cargo fmt --all -- --check > /dev/null 2>&1; record "cargo fmt --check" $?
cargo clippy --quiet --all-targets -- -D warnings; record "cargo clippy (engine)" $?
QCOW2B_QEMU_BUILD=$QEMU_BUILD cargo clippy --quiet --lib --features qemu \
  --target-dir "$BUILD_ROOT/clippy-target" -- -D warnings
record "cargo clippy --features qemu (glue)" $?

say "cargo test"
log=$(mktemp)
cargo test --quiet 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
cargo_passed=$(awk '/^test result:/ {s += $4} END {print s + 0}' "$log")
cargo_failed=$(awk '/^test result:/ {s += $6} END {print s + 0}' "$log")
rm -f "$log"
if [ "$status" != 0 ] && [ "$cargo_failed" = 0 ]; then cargo_failed=1; failures+=("cargo test (build)"); fi
passed=$((passed + cargo_passed)) failed=$((failed + cargo_failed))
[ "$cargo_failed" = 0 ] || failures+=("cargo test")

say "fuzz targets (fuzz/run.sh, 30 s each)"
bash fuzz/run.sh 30; record "fuzz targets" $?

say "integration tests (built QEMU binaries)"
for t in tests/integration/*.sh tests/integration/*.py; do
  case "$(basename "$t")" in lib.sh|qemu_tools.py) continue ;; esac
  case "$t" in *.py) runner=python3 ;; *) runner=bash ;; esac
  out=$(timeout 600 "$runner" "$t" 2>&1); status=$?
  record "$(basename "$t")" "$status"
  [ "$status" = 0 ] || printf '%s\n' "$out" | tail -20 | sed 's/^/    /'
done

# The crash-consistency harness (tests/crash/, README "Crash consistency"): one test; its
# totals per workload and mode, the known bugs and the mutation test are printed either way.
out=$(timeout 3600 bash tests/crash/run.sh --quick --strict 2>&1); status=$?
record "crash-consistency (tests/crash/run.sh --quick --strict)" "$status"
printf '%s\n' "$out" | sed -n '/^workload /,$p' | sed 's/^/    /'
[ "$status" = 0 ] || printf '%s\n' "$out" | grep -A3 '^  FAIL' | head -40 | sed 's/^/    /'

echo
[ ${#failures[@]} = 0 ] || printf 'failed: %s\n' "${failures[@]}"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
