# Shared by the integration tests: the built binaries, the system's qemu-img as a reference,
# a scratch folder, and small assertion helpers. Sourced by each test.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib.sh"

BIN=$BUILD_ROOT/bin
QEMU_IMG=$BIN/qemu-img
QEMU_IO=$BIN/qemu-io
QEMU_NBD=$BIN/qemu-nbd
QSD=$BIN/qemu-storage-daemon
QEMU_SYSTEM=$BIN/qemu-system-x86_64
SYS_QEMU_IMG=/usr/bin/qemu-img      # the distribution's qemu-img: QEMU's own qcow2, for reference
SYS_QEMU_IO=/usr/bin/qemu-io
for b in "$QEMU_IMG" "$QEMU_IO" "$QEMU_NBD" "$QSD" "$QEMU_SYSTEM"; do
  [ -x "$b" ] || { echo "missing built binary $b (run scripts/build.sh)"; exit 1; }
done

SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }

# expect_ok DESCRIPTION CMD...: the command must exit 0.
expect_ok() {
  local what=$1 status=0; shift
  "$@" > "$SCRATCH/out" 2>&1 || status=$?
  [ "$status" = 0 ] || { cat "$SCRATCH/out" >&2; fail "$what (exit $status)"; }
}

# expect_status N DESCRIPTION CMD...: the command must exit with status N (not a signal).
expect_status() {
  local want=$1 what=$2; shift 2
  local got=0
  "$@" > "$SCRATCH/out" 2>&1 || got=$?
  [ "$got" = "$want" ] || { cat "$SCRATCH/out" >&2; fail "$what: exit $got, expected $want"; }
}

# expect_output PATTERN: the last command's output matches the extended regex.
expect_output() {
  grep -Eq -- "$1" "$SCRATCH/out" || { cat "$SCRATCH/out" >&2; fail "output lacks /$1/"; }
}

# qemu-io prints failures on stdout and still exits 0 for some of them; treat those as errors.
qemu_io_clean() {
  ! grep -Eq "Pattern verification failed|failed:|error|Error" "$SCRATCH/out" \
    || { cat "$SCRATCH/out" >&2; fail "qemu-io reported an error"; }
}
