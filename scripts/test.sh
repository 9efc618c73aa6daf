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

# The tests name the driver they mean: a host whose qcow2b.conf switches qcow2b in for the
# format name qcow2 (README "qcow2b in place of qcow2") must not change what `qcow2` means
# here. tests/integration/serve-qcow2.py and libvirt-dropin.py name their own files.
export QCOW2B_CONF=/dev/null

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
QCOW2B_QEMU_BUILD=$QEMU_BUILD cargo clippy --quiet --lib --tests --features glue-tests \
  --target-dir "$BUILD_ROOT/glue-test-target" -- -D warnings
record "cargo clippy --features glue-tests (the glue's tests)" $?

# One cargo test run: its "test result:" lines counted into the totals.
cargo_tests() { # name, then cargo's arguments
  local name=$1 log status cargo_passed cargo_failed; shift
  log=$(mktemp)
  "$@" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  cargo_passed=$(awk '/^test result:/ {s += $4} END {print s + 0}' "$log")
  cargo_failed=$(awk '/^test result:/ {s += $6} END {print s + 0}' "$log")
  rm -f "$log"
  if [ "$status" != 0 ] && [ "$cargo_failed" = 0 ]; then cargo_failed=1; failures+=("$name (build)"); fi
  passed=$((passed + cargo_passed)) failed=$((failed + cargo_failed))
  [ "$cargo_failed" = 0 ] || failures+=("$name")
}

say "cargo test"
cargo_tests "cargo test" cargo test --quiet

# The glue's Rust tests: the driver table called from Rust, QEMU's side played by test
# doubles (feature glue-tests); the bindings need the configured QEMU tree built above.
say "glue tests (cargo test --features glue-tests --lib glue::)"
cargo_tests "glue tests" env QCOW2B_QEMU_BUILD="$QEMU_BUILD" cargo test --quiet \
  --features glue-tests --lib --target-dir "$BUILD_ROOT/glue-test-target" glue::

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
if [ "$status" != 0 ]; then
  # Its failed states, or, when it stopped before checking any (a recording that failed), how.
  printf '%s\n' "$out" | grep -A3 '^  FAIL' | head -40 | sed 's/^/    /'
  printf '%s\n' "$out" | grep -q '^  FAIL' || printf '%s\n' "$out" | tail -20 | sed 's/^/    /'
fi

# Crash states of a real ext4 guest (tests/crash/vm.py): every mode passes, every negative
# control fails.
out=$(timeout 3600 bash tests/crash/run-vm.sh --quick 2>&1); status=$?
record "real-guest crash states (tests/crash/run-vm.sh --quick)" "$status"
printf '%s\n' "$out" | sed -n '/^mode /,$p' | sed 's/^/    /'
[ "$status" = 0 ] || printf '%s\n' "$out" | grep -A3 'FAIL\|Error\|error' | head -40 | sed 's/^/    /'

say "QEMU's iotests with -qcow2b: the whole list of tests that support qcow2 (tests/qemu-iotests/)"
# One ./check per test, so that one that hangs cannot stop the others. A test passes, is "not
# run" (with its reason: qcow2b-not-run for what qcow2b does not do; the environment for the
# rest), or fails; a failure listed in qcow2b-known-failures is expected and counted apart.
# The named tests (the metadata and crash tests, the ones fixed for qcow2b) and the
# project's own must pass (or be listed as not run).
iotests_dir=$QEMU_BUILD/tests/qemu-iotests
listed() { awk -v t="$2" '$1 == t { found = 1 } END { exit !found }' "$1"; }
own=$(cd tests/qemu-iotests/tests && ls qcow2b-* | grep -v '\.out')
must_pass="015 022 026 029 039 044 046 051 057 058 060 062 065 068 080 085 102 103 108 121 125 130 134
  137 138 142 144 158 179 201 217 267 286 qcow2-internal-snapshots
  182 197 215 248 271 273 274 289 302 305 backing-file-invalidation copy-before-write
  mirror-ready-cancel-error 243 270 289 041 292 013 014 023 053 055 061 073 090 153 163 214
  245 272 287 122 250 298 112 261 $own"
all=$(cd "$iotests_dir" && ./check -qcow2b -n | sed 's|^tests/||')
# No dot in the path: 197 and 215 refuse a TEST_DIR with characters outside [-_a-zA-Z0-9/].
iotests_scratch=$(mktemp -d "${TMPDIR:-/tmp}/qcow2b-iotests-XXXXXX")
io_pass=0 io_notrun=0 io_xfail=0 io_start=$SECONDS
for t in $(printf '%s\n' $all $must_pass | sort -u); do
  tap=$(cd "$iotests_dir" && TEST_DIR=$iotests_scratch/$t timeout 900 ./check -qcow2b -tap "$t" 2>&1)
  line=$(grep -E "^(not )?ok qcow2b " <<< "$tap" | head -n1)
  case "$line" in
    "ok qcow2b $t # SKIP"*)
      io_notrun=$((io_notrun + 1))
      reason=$(cat "$iotests_scratch/$t/$t.notrun" 2>/dev/null)
      if [[ " $must_pass " == *" $t "* ]] && ! listed tests/qemu-iotests/qcow2b-not-run "$t"; then
        record "iotest $t (not run: $reason)" 1
      else
        echo "--    iotest $t not run: $reason"
      fi ;;
    "ok qcow2b $t") io_pass=$((io_pass + 1)); record "iotest $t" 0 ;;
    *)
      if listed tests/qemu-iotests/qcow2b-known-failures "$t"; then
        io_xfail=$((io_xfail + 1)); echo "xfail iotest $t (qcow2b-known-failures)"
      else
        record "iotest $t" 1
        printf '%s\n' "$tap" | grep -v '^ok\|^not ok' | tail -20 | sed 's/^/    /'
      fi ;;
  esac
done
rm -rf "$iotests_scratch"
echo "iotests -qcow2b: $io_pass pass, $io_notrun not run, $io_xfail known failures," \
  "$((SECONDS - io_start)) s"

echo
[ ${#failures[@]} = 0 ] || printf 'failed: %s\n' "${failures[@]}"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
