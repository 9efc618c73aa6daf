#!/usr/bin/env bash
# README command 1: install every dependency, fetch and patch QEMU 7.2, build everything, then
# run the main job (scripts/demo.sh) on its built-in default. Run as root on Debian 12.
set -euo pipefail
here=$(dirname "$0")
bash "$here/deps.sh"
bash "$here/fetch-qemu.sh"
bash "$here/build.sh"
bash "$here/demo.sh" "$@"
