# Shared settings for the qcow2b scripts. Sourced, never run.
# Every build output lives under .build/ (git-ignored); nothing here names a path of one machine.

QCOW2B_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_ROOT=${QCOW2B_BUILD_ROOT:-$QCOW2B_ROOT/.build}
QEMU_PKG_DIR=$BUILD_ROOT/qemu-pkg      # the Debian source package as downloaded
QEMU_SRC=$BUILD_ROOT/qemu-src          # Debian's tree with qemu-patches/ applied
QEMU_BUILD=$BUILD_ROOT/qemu-build      # meson/ninja build directory
# The upstream tarball is the same across Debian revisions of 7.2 (see ../shared/FACTS.md).
QEMU_ORIG_SHA256=91aca71520040edc40b8d437aa3004dae614f58e286cf653ee8996c07af2962f

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
