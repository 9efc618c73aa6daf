#!/usr/bin/env bash
# Configures (once) and builds QEMU 7.2 with the qcow2b staticlib linked in. The Rust crate is
# built by QEMU's own ninja step (meson/meson.build), so after a Rust change `ninja` is enough.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ -f "$QEMU_SRC/.qcow2b-patched" ] || die "no patched QEMU tree in $QEMU_SRC; run scripts/fetch-qemu.sh"

# A minimal configure: the tools, one system emulator, and the block features later issues need.
configure_args=(
  --target-list=x86_64-softmmu --without-default-features --enable-tools
  --disable-docs --disable-install-blobs
  --enable-linux-aio --enable-linux-io-uring --enable-fdt=system
  --enable-kvm --enable-tcg --enable-zstd
)

mkdir -p "$QEMU_BUILD"
want="${configure_args[*]}"
if [ ! -f "$QEMU_BUILD/build.ninja" ] || [ "$(cat "$QEMU_BUILD/.qcow2b-configure" 2>/dev/null)" != "$want" ]; then
  say "configure ${configure_args[*]}"
  (cd "$QEMU_BUILD" && "$QEMU_SRC/configure" "${configure_args[@]}" > configure.log 2>&1) \
    || { tail -30 "$QEMU_BUILD/configure.log"; die "QEMU configure failed (log: $QEMU_BUILD/configure.log)"; }
  echo "$want" > "$QEMU_BUILD/.qcow2b-configure"
fi

targets=(qemu-img qemu-io qemu-nbd storage-daemon/qemu-storage-daemon qemu-system-x86_64
         tests/qtest/qos-test)
say "ninja ${targets[*]}"
ninja -C "$QEMU_BUILD" "${targets[@]}"

# Debian's QEMU source ships no firmware, and the pc machine loads a BIOS image and an
# option ROM even under qtest (the iotests' VMs run no guest code). A system emulator run
# from the build tree looks in qemu-bundle/ there, at its configured data folder; Debian's
# seabios and qemu-system-data packages have the files (scripts/deps.sh installs them).
datadir=$QEMU_BUILD/qemu-bundle$(sed -n 's/^#define CONFIG_QEMU_DATADIR "\(.*\)"$/\1/p' \
  "$QEMU_BUILD/config-host.h")
mkdir -p "$datadir"
for firmware in /usr/share/seabios/bios-256k.bin /usr/share/qemu/kvmvapic.bin \
                /usr/share/qemu/linuxboot_dma.bin; do
  if [ -f "$firmware" ]; then
    ln -sf "$firmware" "$datadir/$(basename "$firmware")"
  fi
done

# The binaries a user runs, in one place.
mkdir -p "$BUILD_ROOT/bin"
for t in "${targets[@]}"; do
  ln -sf "$QEMU_BUILD/$t" "$BUILD_ROOT/bin/$(basename "$t")"
done
say "binaries in $BUILD_ROOT/bin"

# The real guest (kernel, initramfs, firmware) that the benchmark, the real-guest crash run and
# tests/integration/libvirt-dropin.py boot. Cheap to re-run: downloads are kept.
say "guest (bench/guest/build-guest.sh)"
bash "$QCOW2B_ROOT/bench/guest/build-guest.sh"
