#!/usr/bin/env bash
# README command 1: install every dependency, fetch and patch QEMU 7.2, build everything, run
# the demo (scripts/demo.sh: qcow2 and qcow2b side by side, read back, checked), then the main
# job: the paper benchmark's quick default (scripts/paper-bench.sh: block-level workloads with
# and without the flush-latency model, and a short real-guest run), which prints the table and
# writes the charts to results/. Arguments go to the paper benchmark (e.g. --no-guest, --full).
# Run as root on Debian 12.
set -euo pipefail
here=$(dirname "$0")
bash "$here/deps.sh"
bash "$here/fetch-qemu.sh"
bash "$here/build.sh"
bash "$here/demo.sh"
bash "$here/paper-bench.sh" "$@"
