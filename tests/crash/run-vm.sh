#!/usr/bin/env bash
# Crash states of a real ext4 guest (see vm.py and README "Crash consistency of a real guest").
#   bash tests/crash/run-vm.sh --quick             # the test suite's run: a few minutes
#   bash tests/crash/run-vm.sh --full              # 10,000 states per mode
#   bash tests/crash/run-vm.sh --replay DIR:STATE  # one state of a kept run, as printed on failure
# Other options: --mode M, --states N, --seed S, --jobs N, --json FILE.
set -euo pipefail
. "$(dirname "$0")/../../scripts/lib.sh"
export QCOW2B_BUILD_ROOT=$BUILD_ROOT
exec python3 "$QCOW2B_ROOT/tests/crash/vm.py" "$@"
