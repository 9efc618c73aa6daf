#!/usr/bin/env bash
# The crash-consistency harness (see harness.py and README "Crash consistency").
#   bash tests/crash/run.sh --quick             # the test suite's run: a few minutes
#   bash tests/crash/run.sh --full              # at least 100,000 states
#   bash tests/crash/run.sh --replay DIR:STATE  # one state of a kept run, as printed on failure
# Other options: --workload W, --mode M, --budget N, --seed S, --mutation with|only|skip.
set -euo pipefail
. "$(dirname "$0")/../../scripts/lib.sh"
export QCOW2B_BUILD_ROOT=$BUILD_ROOT
exec python3 "$QCOW2B_ROOT/tests/crash/harness.py" "$@"
