#!/usr/bin/env python3
"""Persistent dirty bitmaps between qcow2b and QEMU's qcow2, both ways, and an incremental
backup across a restart of the VM.

- Bitmaps qcow2b stores (added with qemu-img bitmap, marked by qemu-io's writes) have the bits
  of exactly those writes in the file, are listed alike by QEMU's qcow2 (the built 7.2 and the
  system's 10.0), and QEMU's qcow2 loads them with those bits: its own writes add to them.
  The other way round: bits QEMU's qcow2 stored are loaded by qcow2b, which adds its writes.
- A qcow2b writer killed with the bitmap loaded leaves it in use: QEMU reports it so and
  refuses to copy it; removing it works.
- End to end: a full backup with a new persistent bitmap (QMP transaction), guest writes
  (HMP qemu-io), the VM quit and started again (the bitmap stored and loaded), an
  incremental backup (sync=incremental) holding exactly the changed clusters; restoring it
  over the full backup gives the disk.

The bits are read from the file itself (tests/crash/harness.py's reader), not through
either driver."""

import json
import os
import signal
import subprocess
import sys
import time

from qemu_tools import (BIN, QEMU_IMG, QEMU_IO, SYS_QEMU_IMG, SYS_QEMU_IO, Failure,
                        Scratch, check_clean, check_consistent, main, qemu_io, run)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "crash"))
from harness import bitmaps_of  # noqa: E402

QEMU_SYSTEM = os.path.join(BIN, "qemu-system-x86_64")
K = 1024
M = 1024 * K


def bits(image):
    """{name: (in_use, set of dirty granule indices or None)} read from the file."""
    out = {}
    for name, in_use, gbits, data in bitmaps_of(image):
        if data is None:
            out[name] = (in_use, None)
            continue
        out[name] = (in_use, {i * 8 + b for i, byte in enumerate(data) for b in range(8)
                              if byte >> b & 1})
    return out


def granules(ranges, gran):
    return {g for off, length in ranges for g in range(off // gran, (off + length - 1) // gran + 1)}


def listed(tool, image):
    _, out = run(tool, "info", "--output=json", "-U", image)
    data = json.loads(out)["format-specific"]["data"]
    return [(b["name"], b["granularity"], sorted(b["flags"])) for b in data.get("bitmaps", [])]


def expect_bits(image, name, ranges, gran, what):
    got = bits(image).get(name)
    want = granules(ranges, gran)
    if got is None or got[0] or got[1] != want:
        raise Failure(f"{what}: bitmap {name} of {image} is {got}, expected bits {sorted(want)}")


def both_ways(s):
    # qcow2b stores, QEMU's qcow2 (built and system) reads and adds.
    for reader, io in ((QEMU_IO, "built"), (SYS_QEMU_IO, "system")):
        img = s.path(f"qcow2b-made-{io}.qcow2")
        run(QEMU_IMG, "create", "-q", "-f", "qcow2b", img, "64M")
        run(QEMU_IMG, "bitmap", "--add", "-f", "qcow2b", img, "b0")
        run(QEMU_IMG, "bitmap", "--add", "-g", "4k", "-f", "qcow2b", img, "fine")
        writes = [(1 * M, 64 * K), (10 * M + 4 * K, 4 * K)]
        qemu_io(QEMU_IO, "qcow2b", img, [f"write -q {o} {n}" for o, n in writes])
        check_clean(img)
        expect_bits(img, "b0", writes, 64 * K, "stored by qcow2b")
        expect_bits(img, "fine", writes, 4 * K, "stored by qcow2b")
        want = [("b0", 65536, ["auto"]), ("fine", 4096, ["auto"])]
        for tool in (QEMU_IMG, SYS_QEMU_IMG):
            if listed(tool, img) != want:
                raise Failure(f"{tool} info lists {listed(tool, img)}, expected {want}")
        qemu_io(reader, "qcow2", img, ["write -q 20M 64k"])
        check_clean(img)
        expect_bits(img, "b0", writes + [(20 * M, 64 * K)], 64 * K,
                    f"qcow2b's bits loaded and stored again by the {io} qcow2")

    # QEMU's qcow2 stores, qcow2b loads and adds.
    img = s.path("qcow2-made.qcow2")
    run(SYS_QEMU_IMG, "create", "-q", "-f", "qcow2", img, "64M")
    run(SYS_QEMU_IMG, "bitmap", "--add", "-g", "128k", img, "q")
    qemu_io(SYS_QEMU_IO, "qcow2", img, ["write -q 3M 64k"])
    qemu_io(QEMU_IO, "qcow2b", img, ["write -q 30M 4k"])
    check_clean(img)
    expect_bits(img, "q", [(3 * M, 64 * K), (30 * M, 4 * K)], 128 * K,
                "QEMU's bits loaded and stored again by qcow2b")


def killed_writer(s):
    img = s.path("killed.qcow2")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2b", img, "16M")
    run(QEMU_IMG, "bitmap", "--add", "-f", "qcow2b", img, "b")
    p = subprocess.Popen([QEMU_IO, "-f", "qcow2b", "-c", "write -q 0 64k", "-c", "flush",
                          "-c", "sleep 60000", img],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    check_consistent(img)
    for tool in (QEMU_IMG, SYS_QEMU_IMG):
        if listed(tool, img) != [("b", 65536, ["auto", "in-use"])]:
            raise Failure(f"after a crash {tool} lists {listed(tool, img)}")
    status, out = run(SYS_QEMU_IMG, "convert", "--bitmaps", "-O", "qcow2", img,
                      s.path("copy.qcow2"), check=False)
    if status == 0 or "inconsistent" not in out:
        raise Failure(f"an inconsistent bitmap was copied (exit {status}): {out}")
    run(QEMU_IMG, "bitmap", "--remove", "-f", "qcow2b", img, "b")
    # The crash's leaks (the zero reserve) stay until a check -r leaks; nothing else.
    check_consistent(img)
    if listed(SYS_QEMU_IMG, img):
        raise Failure("the removed bitmap is still listed")


class Vm:
    """A VM (qtest accelerator: no guest code) with the image as drive 'd0', driven over
    QMP on stdio one command at a time."""

    def __init__(self, image):
        self.p = subprocess.Popen(
            [QEMU_SYSTEM, "-nodefaults", "-display", "none", "-accel", "qtest",
             "-machine", "pc", "-qmp", "stdio",
             "-drive", f"if=none,id=d0,driver=qcow2b,file.driver=file,file.filename={image}",
             "-device", "virtio-blk-pci,drive=d0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.events = []
        self.read()  # greeting
        self.cmd("qmp_capabilities")

    def read(self):
        """The next QMP message (lines that are not one, QEMU's own output, are skipped)."""
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise Failure("QEMU exited")
            if line.lstrip().startswith(b"{"):
                return json.loads(line)

    def cmd(self, name, **args):
        self.p.stdin.write((json.dumps({"execute": name, "arguments": args}) + "\n").encode())
        self.p.stdin.flush()
        while True:
            msg = self.read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise Failure(f"{name} {args}: {msg['error']}")
            return msg["return"]

    def wait_job(self, device):
        deadline = time.time() + 120
        while time.time() < deadline:
            for e in self.events:
                if e["event"] == "BLOCK_JOB_COMPLETED" and e["data"]["device"] == device:
                    if "error" in e["data"]:
                        raise Failure(f"job {device}: {e['data']['error']}")
                    return
            self.events.append(self.read())
        raise Failure(f"job {device} did not complete")

    def quit(self):
        self.cmd("quit")
        self.p.wait(timeout=60)


def incremental_backup(s):
    disk, full, inc = s.path("disk.qcow2"), s.path("full.qcow2"), s.path("inc.qcow2")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2b", disk, "64M")
    qemu_io(QEMU_IO, "qcow2b", disk, ["write -q -P 0x11 0 8M", "write -q -P 0x22 40M 1M"])
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", full, "64M")

    vm = Vm(disk)
    vm.cmd("transaction", actions=[
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "d0", "name": "inc0", "persistent": True}},
        {"type": "drive-backup",
         "data": {"device": "d0", "job-id": "full", "sync": "full", "target": full,
                  "format": "qcow2", "mode": "existing"}}])
    vm.wait_job("full")
    changed = [(4 * M, 64 * K), (40 * M + 4 * K, 4 * K), (60 * M, 128 * K)]
    for off, n in changed:
        vm.cmd("human-monitor-command", **{"command-line": f'qemu-io d0 "write -P 0x5a {off} {n}"'})
    vm.quit()
    # Stored at the close, consistent, with the writes' bits.
    check_clean(disk)
    expect_bits(disk, "inc0", changed, 64 * K, "stored at the VM's quit")

    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", full, "-F", "qcow2", inc)
    vm = Vm(disk)
    vm.cmd("drive-backup", **{"device": "d0", "job-id": "inc", "sync": "incremental",
                              "bitmap": "inc0", "target": inc, "format": "qcow2",
                              "mode": "existing"})
    vm.wait_job("inc")
    vm.quit()
    check_clean(disk)
    # The incremental image holds exactly the changed clusters.
    _, out = run(SYS_QEMU_IMG, "map", "--output=json", "-f", "qcow2", inc)
    own = sorted((e["start"], e["length"]) for e in json.loads(out)
                 if e["depth"] == 0 and e["data"])
    want = sorted((g * 64 * K, 64 * K) for g in granules(changed, 64 * K))
    merged = []
    for start, length in want:
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((start, length))
    if own != merged:
        raise Failure(f"incremental backup holds {own}, expected the changed clusters {merged}")
    # Restored: the full backup with the increment over it is the disk.
    restored = s.path("restored.raw")
    run(SYS_QEMU_IMG, "convert", "-O", "raw", inc, restored)
    run(QEMU_IMG, "compare", "-q", "-f", "qcow2b", "-F", "raw", disk, restored)


def body():
    with Scratch() as s:
        both_ways(s)
        killed_writer(s)
        incremental_backup(s)
    print("persistent bitmaps: qcow2b and QEMU's qcow2 (7.2 built, 10.0 system) both ways, "
          "a killed writer, an incremental backup across a VM restart: ok")


if __name__ == "__main__":
    main(body)
