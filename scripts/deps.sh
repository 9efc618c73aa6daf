#!/usr/bin/env bash
# Installs everything the build and the tests need on Debian 12 (run as root). Idempotent.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

packages=(
  # QEMU 7.2 build (FACTS.md), plus zstd and zlib for compressed clusters
  build-essential meson ninja-build pkg-config python3-venv flex bison
  libglib2.0-dev libpixman-1-dev libfdt-dev libaio-dev liburing-dev libslirp-dev
  zlib1g-dev libzstd-dev
  # fetching and unpacking Debian's source package
  dpkg-dev xz-utils rsync patch
  # bindgen (build.rs) needs libclang
  libclang-dev clang
  # tests: the system's qemu-img as the reference implementation, strace for sync counts,
  # a BIOS image and the option ROMs the pc machine loads, for qos-test and the iotests' VMs
  # (Debian's QEMU source ships no firmware)
  qemu-utils strace seabios qemu-system-data
  # iotest 108 reads the image through a loop device (sudo -n losetup)
  sudo
  # the paper benchmark (bench/paper-bench.py): charts; the real guest's tools, copied with
  # their libraries into its initramfs (bench/guest/build-guest.sh), and cpio to pack it
  python3-matplotlib fio cpio e2fsprogs coreutils sqlite3
  # the libvirt drop-in test (tests/integration/libvirt-dropin.py): Debian 12's libvirt 9.0,
  # run without systemd (virtlogd -d, libvirtd -d) against the built qemu-system-x86_64
  libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing packages (${missing[*]}); run this script as root"
  say "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (rustup) first"
# The fuzz targets (fuzz/) build with cargo-fuzz on the stable toolchain.
if ! command -v cargo-fuzz >/dev/null; then
  say "cargo install cargo-fuzz"
  cargo install --quiet --locked cargo-fuzz || die "cargo install cargo-fuzz failed"
fi
say "dependencies present"
