#!/usr/bin/env python3
"""Internal snapshots between qcow2b and QEMU's qcow2, both ways: snapshots qcow2b takes are
listed, applied and deleted by QEMU's qcow2 (the built 7.2 and the system's 10.0) with the
same content, and the other way round; savevm with qcow2b and loadvm with QEMU's qcow2 (and
the reverse) bring back the VM state; QMP blockdev-snapshot-internal-sync and
blockdev-snapshot-delete-internal-sync on a running VM; the errors QEMU's qcow2 gives (an
unknown snapshot) given alike. Every image is checked clean by both qemu-img check after each
step."""

import json
import os
import re
import subprocess

from qemu_tools import (BIN, QEMU_IMG, QEMU_IO, SYS_QEMU_IMG, SYS_QEMU_IO, Failure,
                        Scratch, check_clean, main, qemu_io, run)

QEMU_SYSTEM = os.path.join(BIN, "qemu-system-x86_64")
M = 1024 * 1024


def opts(driver, image):
    return f"driver={driver},file.filename={image}"


def snapshot(tool, driver, image, *args, check=True):
    """qemu-img snapshot through `driver` (snapshot has no -f: --image-opts names it)."""
    if tool == SYS_QEMU_IMG:
        # The system's tools have no qcow2b; they probe qcow2.
        return run(tool, "snapshot", *args, image, check=check)
    return run(tool, "snapshot", *args, "--image-opts", opts(driver, image), check=check)


def tags(tool, driver, image):
    _, out = snapshot(tool, driver, image, "-l")
    return [line.split()[1] for line in out.splitlines()[2:] if line.strip()]


def expect_pattern(tool, driver, image, pattern, offset, length):
    io = QEMU_IO if tool == QEMU_IMG else SYS_QEMU_IO
    qemu_io(io, driver if tool == QEMU_IMG else "qcow2", image,
            [f"read -q -P {pattern} {offset} {length}"])


def hmp(image, driver, commands):
    """Runs HMP commands in a VM (qtest accelerator: no guest code) whose only drive is the
    image; returns the monitor's output."""
    args = [QEMU_SYSTEM, "-nodefaults", "-display", "none", "-accel", "qtest",
            "-machine", "pc", "-monitor", "stdio",
            "-blockdev", f"driver={driver},node-name=disk,file.driver=file,"
                         f"file.filename={image}",
            "-device", "virtio-blk-pci,drive=disk"]
    p = subprocess.run(args, input=("\n".join(commands) + "\nquit\n").encode(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    out = p.stdout.decode(errors="replace")
    if p.returncode != 0:
        raise Failure(f"{' '.join(args)} exited {p.returncode}:\n{out}")
    return out


def qmp(image, driver, commands):
    """Runs QMP commands against a VM with the image as node 'disk'; returns the replies."""
    args = [QEMU_SYSTEM, "-nodefaults", "-display", "none", "-accel", "qtest",
            "-machine", "pc", "-qmp", "stdio",
            "-blockdev", f"driver={driver},node-name=disk,file.driver=file,"
                         f"file.filename={image}",
            "-device", "virtio-blk-pci,drive=disk,id=vd0"]
    lines = [json.dumps({"execute": "qmp_capabilities"})]
    lines += [json.dumps(c) for c in commands] + [json.dumps({"execute": "quit"})]
    p = subprocess.run(args, input=("\n".join(lines) + "\n").encode(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    replies = []
    for line in p.stdout.decode(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            msg = json.loads(line)
            if "return" in msg or "error" in msg:
                replies.append(msg)
    return replies[1:-1]


def both_ways(s):
    for maker, reader in (("qcow2b", "qcow2"), ("qcow2", "qcow2b")):
        for reader_tool in ((QEMU_IMG, SYS_QEMU_IMG) if reader == "qcow2" else (QEMU_IMG,)):
            img = s.path(f"{maker}-{reader}-{os.path.basename(reader_tool)}-"
                         f"{'sys' if reader_tool == SYS_QEMU_IMG else 'built'}.qcow2")
            run(QEMU_IMG, "create", "-q", "-f", maker, img, "16M")
            qemu_io(QEMU_IO, maker, img, ["write -q -P 0x11 0 1M"])
            snapshot(QEMU_IMG, maker, img, "-c", "first")
            qemu_io(QEMU_IO, maker, img, ["write -q -P 0x22 0 64k", "write -q -P 0x33 8M 64k"])
            snapshot(QEMU_IMG, maker, img, "-c", "second")
            qemu_io(QEMU_IO, maker, img, ["write -q -P 0x44 0 4k"])
            check_clean(img)
            if tags(reader_tool, reader, img) != ["first", "second"]:
                raise Failure(f"{reader} lists {tags(reader_tool, reader, img)} in {img}")
            snapshot(reader_tool, reader, img, "-a", "first")
            expect_pattern(reader_tool, reader, img, "0x11", 0, 1 * M)
            expect_pattern(reader_tool, reader, img, "0", 8 * M, 64 * 1024)
            check_clean(img)
            snapshot(reader_tool, reader, img, "-a", "second")
            expect_pattern(reader_tool, reader, img, "0x22", 0, 64 * 1024)
            expect_pattern(reader_tool, reader, img, "0x33", 8 * M, 64 * 1024)
            snapshot(reader_tool, reader, img, "-d", "first")
            check_clean(img)
            if tags(QEMU_IMG, maker, img) != ["second"]:
                raise Failure(f"{maker} lists {tags(QEMU_IMG, maker, img)} after the delete")
            snapshot(QEMU_IMG, maker, img, "-d", "second")
            check_clean(img)


def unknown_snapshot_errors(s):
    outs = {}
    for driver in ("qcow2", "qcow2b"):
        img = s.path(f"unknown-{driver}.qcow2")
        run(QEMU_IMG, "create", "-q", "-f", driver, img, "1M")
        got = []
        for args in (("-a", "nope"), ("-d", "nope")):
            status, out = snapshot(QEMU_IMG, driver, img, *args, check=False)
            got.append((status, out.replace(img, "IMG").strip()))
        outs[driver] = got
    if outs["qcow2"] != outs["qcow2b"]:
        raise Failure(f"unknown snapshot: qcow2 says {outs['qcow2']}, qcow2b {outs['qcow2b']}")


def vm_state(s):
    for saver, loader in (("qcow2b", "qcow2"), ("qcow2", "qcow2b"), ("qcow2b", "qcow2b")):
        img = s.path(f"vm-{saver}-{loader}.qcow2")
        run(QEMU_IMG, "create", "-q", "-f", "qcow2", img, "64M")
        out = hmp(img, saver, ["savevm check1", "info snapshots"])
        m = re.search(r"check1\s+(\d+(?:\.\d+)?) (KiB|MiB|B)", out)
        if not m or float(m.group(1)) == 0:
            raise Failure(f"savevm with {saver}: no VM state recorded:\n{out}")
        check_clean(img)
        out = hmp(img, loader, ["loadvm check1", "info snapshots"])
        if "Error" in out or "error" in out:
            raise Failure(f"loadvm with {loader} of {saver}'s snapshot:\n{out}")
        out = hmp(img, loader, ["delvm check1", "info snapshots"])
        if "check1" in out.split("delvm check1", 1)[1]:
            raise Failure(f"delvm with {loader} left the snapshot:\n{out}")
        check_clean(img)


def qmp_internal_snapshots(s):
    img = s.path("qmp.qcow2")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2b", img, "16M")
    qemu_io(QEMU_IO, "qcow2b", img, ["write -q -P 0x55 0 128k"])
    replies = qmp(img, "qcow2b", [
        {"execute": "blockdev-snapshot-internal-sync",
         "arguments": {"device": "disk", "name": "live"}},
        {"execute": "blockdev-snapshot-internal-sync",
         "arguments": {"device": "disk", "name": "live"}},
        {"execute": "blockdev-snapshot-delete-internal-sync",
         "arguments": {"device": "disk", "name": "nope"}},
    ])
    if "return" not in replies[0]:
        raise Failure(f"blockdev-snapshot-internal-sync failed: {replies}")
    # QEMU refuses a second snapshot of the same name, and an unknown one to delete.
    if "error" not in replies[1] or "error" not in replies[2]:
        raise Failure(f"duplicate name or unknown snapshot accepted: {replies}")
    check_clean(img)
    if tags(SYS_QEMU_IMG, "qcow2", img) != ["live"]:
        raise Failure(f"after QMP: {tags(SYS_QEMU_IMG, 'qcow2', img)}")
    replies = qmp(img, "qcow2b", [
        {"execute": "blockdev-snapshot-delete-internal-sync",
         "arguments": {"device": "disk", "name": "live"}}])
    if "return" not in replies[0]:
        raise Failure(f"blockdev-snapshot-delete-internal-sync failed: {replies}")
    check_clean(img)
    if tags(SYS_QEMU_IMG, "qcow2", img):
        raise Failure("the snapshot is still listed after its delete")


def body():
    with Scratch() as s:
        both_ways(s)
        unknown_snapshot_errors(s)
        vm_state(s)
        qmp_internal_snapshots(s)
    print("internal snapshots: qcow2b and QEMU's qcow2 (7.2 built, 10.0 system) both ways, "
          "VM state, QMP, errors: ok")


if __name__ == "__main__":
    main(body)
