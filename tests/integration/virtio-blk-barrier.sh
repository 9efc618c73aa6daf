#!/usr/bin/env bash
# The virtio-blk barrier (qemu-patches/0008-0010) through the built qos-test: every qos test
# path with "barrier" in its name (legacy virtio-blk-pci, barrier=on, qcow2b or raw images),
# then QEMU's own virtio-blk tests, which run with the default barrier=off and must pass as
# before. The counter values the tests measure are printed ("# ..." lines).
. "$(dirname "$0")/lib.sh"

QOS_TEST=$BIN/qos-test
[ -x "$QOS_TEST" ] || fail "missing built binary $QOS_TEST (run scripts/build.sh)"

# The pc machine needs a BIOS image even under qtest (which runs no guest code); Debian's
# QEMU source has none, the seabios package has one (scripts/deps.sh installs it). libqtest
# takes the target from the binary's name, so the firmware path comes in through a wrapper
# of that name; -nodefaults spares the default NIC and VGA their option ROMs.
FIRMWARE=/usr/share/seabios
[ -f "$FIRMWARE/bios-256k.bin" ] || fail "no $FIRMWARE/bios-256k.bin (apt-get install seabios)"
mkdir "$SCRATCH/bin"
printf '#!/bin/sh\nexec "%s" -L "%s" -nodefaults "$@"\n' "$QEMU_SYSTEM" "$FIRMWARE" \
  > "$SCRATCH/bin/qemu-system-x86_64"
chmod +x "$SCRATCH/bin/qemu-system-x86_64"
export QTEST_QEMU_BINARY=$SCRATCH/bin/qemu-system-x86_64 QTEST_QEMU_IMG=$QEMU_IMG
# The tests' own temporary images and crash copies go to the scratch folder.
export TMPDIR=$SCRATCH

# run_qos PATH: one qos-test path (a test or a group); any failure fails the script.
run_qos() {
  local status=0
  (cd "$SCRATCH" && timeout 300 "$QOS_TEST" -p "$1") > "$SCRATCH/qos.out" 2>&1 || status=$?
  grep -E '^(ok|not ok) |^# .*(host-|crash images)' "$SCRATCH/qos.out" \
    | sed -e 's|/x86_64/.*/||' || true
  if [ "$status" != 0 ] || grep -q '^not ok' "$SCRATCH/qos.out" \
     || ! grep -q '^ok ' "$SCRATCH/qos.out"; then
    tail -20 "$SCRATCH/qos.out" >&2
    fail "qos-test -p $1 (exit $status)"
  fi
}

mapfile -t paths < <("$QOS_TEST" -l | grep -E '/virtio-blk-pci/.*barrier')
[ ${#paths[@]} -ge 10 ] || fail "qos-test lists ${#paths[@]} barrier tests; are 0008-0010 applied?"
for p in "${paths[@]}"; do
  run_qos "$p"
done

blk=/x86_64/pc/i440FX-pcihost/pci-bus-pc/pci-bus/virtio-blk-pci
run_qos "$blk/virtio-blk/virtio-blk-tests"
for t in msix idx nxvirtq hotplug; do
  run_qos "$blk/virtio-blk-pci-tests/$t"
done
echo "virtio-blk barrier: ${#paths[@]} barrier tests and QEMU's virtio-blk tests passed"
