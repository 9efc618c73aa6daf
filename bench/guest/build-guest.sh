#!/usr/bin/env bash
# Assembles the real guest of the paper benchmark under $BUILD_ROOT/guest/ (never committed):
#   vmlinuz       Debian 12's current 6.1 kernel (the package linux-image-amd64 points at),
#                 from `apt-get download`: unpacked here, never installed on the host;
#   initrd.cpio   busybox-static as /init's shell, the kernel's virtio-blk and ext4 modules
#                 (load order from FACTS.md), and GNU dd, sync, mke2fs, fio and sqlite3 copied
#                 from the host with the libraries ldd names (busybox's dd has no oflag=dsync,
#                 its sync fsyncs no directory); bench/guest/init.sh as /init and the crash
#                 workloads (tests/crash/vm-workloads.sh) as /crash;
#   firmware/     SeaBIOS's bios-256k.bin and QEMU's linuxboot_dma.bin and kvmvapic.bin from
#                 Debian's seabios and qemu-system-data packages (the dfsg source tree ships
#                 no firmware).
# Host tools it needs (scripts/deps.sh installs them): apt-get, dpkg-deb, cpio, xz, fio,
# e2fsprogs, coreutils. Re-running is cheap: downloads are kept, the initramfs is rebuilt.
set -euo pipefail
. "$(dirname "$0")/../../scripts/lib.sh"

guest=$BUILD_ROOT/guest
debs=$guest/debs
mkdir -p "$debs"

kernel_of_the_day() {
  apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
kernel_pkg=$(kernel_of_the_day)
if [ -z "$kernel_pkg" ] && [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  kernel_pkg=$(kernel_of_the_day)
fi
[ -n "$kernel_pkg" ] || die "apt-cache knows no linux-image-amd64 (run apt-get update as root)"

fetch() { # package -> the .deb's path
  local deb
  deb=$(ls "$debs"/"$1"_*.deb 2>/dev/null | head -n1 || true)
  if [ -z "$deb" ]; then
    (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root "$1") >&2 || die "apt-get download $1 failed"
    deb=$(ls "$debs"/"$1"_*.deb | head -n1)
  fi
  echo "$deb"
}

unpack() { # package -> folder with its files
  local deb dir
  deb=$(fetch "$1")
  dir=$guest/pkg/$1
  if [ ! -f "$dir/.from" ] || [ "$(cat "$dir/.from")" != "$(basename "$deb")" ]; then
    rm -rf "$dir"
    mkdir -p "$dir"
    dpkg-deb -x "$deb" "$dir"
    basename "$deb" > "$dir/.from"
  fi
  echo "$dir"
}

say "guest kernel: $kernel_pkg"
kdir=$(unpack "$kernel_pkg")
bbdir=$(unpack busybox-static)
qdata=$(unpack qemu-system-data)
sbios=$(unpack seabios)

kver=$(ls "$kdir/lib/modules" | head -n1)
cp "$kdir"/boot/vmlinuz-"$kver" "$guest/vmlinuz"
echo "$kver" > "$guest/kernel-version"

# Firmware: the packages' files, symlinks resolved (qemu-system-data links into seabios).
mkdir -p "$guest/firmware"
cp -L "$sbios/usr/share/seabios/bios-256k.bin" "$guest/firmware/"
for f in linuxboot_dma.bin kvmvapic.bin; do
  cp -L "$qdata/usr/share/qemu/$f" "$guest/firmware/"
done

# The initramfs tree.
root=$guest/initrd
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,mnt,tmp,lib/modules}
cp "$bbdir/bin/busybox" "$root/bin/busybox"
cp "$(dirname "$0")/init.sh" "$root/init"
chmod +x "$root/init"
cp "$(dirname "$0")/../../tests/crash/vm-workloads.sh" "$root/crash"

# Modules in the order they load (each needs the ones before it); built-in ones are skipped.
modules=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
         crc16 crc32c_generic libcrc32c mbcache jbd2 ext4)
: > "$root/lib/modules/load-order"
for m in "${modules[@]}"; do
  ko=$(find "$kdir/lib/modules/$kver" -name "$m.ko" -o -name "$m.ko.xz" | head -n1)
  [ -n "$ko" ] || continue
  case "$ko" in
    *.xz) xz -dc "$ko" > "$root/lib/modules/$m.ko" ;;
    *) cp "$ko" "$root/lib/modules/$m.ko" ;;
  esac
  echo "$m" >> "$root/lib/modules/load-order"
done

copy_with_libs() { # host binary -> same path in the initramfs, with its shared libraries
  local bin=$1 lib
  [ -x "$bin" ] || die "$bin not found on the host (scripts/deps.sh installs it)"
  mkdir -p "$root$(dirname "$bin")"
  cp -L "$bin" "$root$bin"
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    [ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
  done
}
copy_with_libs /usr/bin/dd
copy_with_libs /sbin/mke2fs
copy_with_libs /usr/bin/fio
copy_with_libs /usr/bin/sqlite3
copy_with_libs /usr/bin/sync
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"

(cd "$root" && find . | cpio -o -H newc --quiet > "$guest/initrd.cpio")
say "guest in $guest: vmlinuz ($kver), initrd.cpio ($(du -m "$guest/initrd.cpio" | cut -f1) MiB)"
