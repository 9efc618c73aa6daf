"""A guest's flushes taken as ordering points (virtio-blk guest-flush=barrier, qemu-patches
0013) and the durability that must follow anyway: in barrier=txg a write the guest was told
is ordered sits in the open transaction group, and every point where QEMU itself needs the
image durable must commit it.

Each check runs one system emulator (accel qtest: no guest code) on a qcow2b drive in the txg
mode with an age bound far away, writes through HMP qemu-io (no flush), and reads the image
file from another process with QEMU's own qcow2 driver (-U): that reader sees only what the
header on the file names, the last committed group. So "absent before, present after" shows
that the point committed. The first check is the negative control: without a durability
point the write must be absent (else every later check would pass for nothing).

Durability points: VM stop, an operator's flush (HMP qemu-io flush), an external snapshot
(blockdev-snapshot-sync), migration (the node is inactivated), quit (close), the mirror and
backup jobs' completion (the target holds the write), the age bound, and the age bound after
a drain (the committer's restart timer) and after a move to an iothread. A SIGKILL without a
point loses the write and leaves a clean image. Bad input: the property's value, a read-only
drive, another format, absurd txg bounds.
"""

import os
import subprocess
import sys
import time

from qemu_tools import BIN, QEMU_IMG, QEMU_IO, Failure, Scratch, check_clean, check_consistent, main, run

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import benchlib as bl  # noqa: E402

QEMU_SYSTEM = os.path.join(BIN, "qemu-system-x86_64")
FAR = "txg-max-age-ms=3600000"
CLUSTER = 65536


class Vm:
    """One emulator with drive d0 (qcow2b, barrier=txg) on a virtio-blk device."""

    def __init__(self, scratch, image, drive_opts=FAR, device="guest-flush=barrier",
                 extra=()):
        self.qmp_path = scratch.path(f"qmp.{time.monotonic_ns()}")
        drive = f"if=none,id=d0,node-name=n0,driver=qcow2b,barrier=txg,{drive_opts}," \
                f"file.filename={image}"
        args = [QEMU_SYSTEM, "-M", "q35", "-accel", "qtest", "-nodefaults", "-display", "none",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off", "-drive", drive,
                "-device", f"virtio-blk-pci,drive=d0,{device}", *extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        try:
            self.qmp = bl.Qmp(self.qmp_path, timeout=20)
        except Exception:
            self.proc.kill()
            raise Failure("the emulator did not start:\n" + self.proc.communicate()[0].decode())

    def write(self, pattern, offset):
        # HMP qemu-io prints to the emulator's stdout; the reads below show the write.
        self.qmp.hmp(f'qemu-io d0 "write -P {pattern:#x} {offset} 64k"')

    def cmd(self, name, **arguments):
        reply = self.qmp.cmd(name, **arguments)
        if "error" in reply:
            raise Failure(f"{name}: {reply['error']}")
        return reply["return"]

    def quit(self):
        self.qmp.cmd("quit")
        self.proc.wait(timeout=60)

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=60)


def durable(image, pattern, offset):
    """Whether the committed image (what its header names) holds the pattern there."""
    _, out = run(QEMU_IO, "-U", "-r", "-f", "qcow2", "-c",
                 f"read -P {pattern:#x} {offset} 64k", image, check=False)
    if "Pattern verification failed" in out:
        return False
    if "read 65536/65536" in out:
        return True
    raise Failure(f"reading {image}: {out}")


def fresh(scratch, name, backing=None):
    image = scratch.path(name)
    args = ["-b", backing, "-F", "qcow2"] if backing else []
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", *args, image, "64M")
    return image


def point(scratch, name, act, pattern=0x5a, drive_opts=FAR, extra=(), backing=False):
    """Writes, checks that the write is not durable, runs `act(vm, image)`, and returns the
    image whose committed state must now hold the write (act's answer, or the drive's).
    With `backing`, the drive's image has a backing file (`image + ".base"`)."""
    base = None
    if backing:
        base = fresh(scratch, f"{name}.qcow2.base")
    image = fresh(scratch, f"{name}.qcow2", backing=base)
    vm = Vm(scratch, image, drive_opts=drive_opts, extra=extra)
    try:
        vm.write(pattern, 0)
        if durable(image, pattern, 0):
            raise Failure(f"{name}: the write was durable before the point (the check would "
                          f"prove nothing)")
        where = act(vm, image) or image
        if not durable(where, pattern, 0):
            raise Failure(f"{name}: the acknowledged write is not in {os.path.basename(where)}")
    finally:
        if vm.proc.poll() is None:
            vm.kill()
    print(f"ok    {name}: absent before, committed after")


def wait_job(vm, kind):
    vm.qmp.wait_event(kind, timeout=60)


def checks():
    with Scratch() as s:
        # The negative control: nothing commits the group, the process dies.
        image = fresh(s, "killed.qcow2")
        vm = Vm(s, image)
        vm.write(0x11, 0)
        time.sleep(0.3)
        vm.kill()
        if durable(image, 0x11, 0):
            raise Failure("killed: an uncommitted write survived a SIGKILL: the reads of "
                          "this test cannot tell committed from not")
        # Before the group's first barrier the write went in place, into a cluster of the zero
        # reserve, which the crash leaves counted: leaked, nothing worse.
        check_consistent(image)
        print("ok    negative control: no durability point, SIGKILL: the write is lost and "
              "the image is consistent")

        def stop(vm, _image):
            vm.cmd("stop")

        def operator_flush(vm, _image):
            vm.qmp.hmp('qemu-io d0 "flush"')

        def external_snapshot(vm, image):
            vm.cmd("blockdev-snapshot-sync", device="d0", format="qcow2",
                   **{"snapshot-file": image + ".overlay"})
            return image

        def migration(vm, _image):
            vm.cmd("migrate", uri="exec:cat > /dev/null")
            deadline = time.monotonic() + 60
            while vm.cmd("query-migrate").get("status") != "completed":
                if time.monotonic() > deadline:
                    raise Failure("migration did not complete")
                time.sleep(0.1)

        def close(vm, _image):
            vm.quit()

        def mirror(vm, image):
            target = image + ".mirror"
            vm.cmd("drive-mirror", device="d0", target=target, format="qcow2", sync="full",
                   **{"job-id": "m"})
            wait_job(vm, "BLOCK_JOB_READY")
            vm.cmd("block-job-complete", device="m")
            wait_job(vm, "BLOCK_JOB_COMPLETED")
            return target

        def backup(vm, image):
            target = image + ".backup"
            vm.cmd("drive-backup", device="d0", target=target, format="qcow2", sync="full",
                   **{"job-id": "b"})
            wait_job(vm, "BLOCK_JOB_COMPLETED")
            return target

        def active_commit(vm, image):
            # The drive's image into its backing file: the write must land there, durably.
            vm.cmd("block-commit", device="d0", **{"job-id": "c"})
            wait_job(vm, "BLOCK_JOB_READY")
            vm.cmd("block-job-complete", device="c")
            wait_job(vm, "BLOCK_JOB_COMPLETED")
            return image + ".base"

        def stream(vm, _image):
            # The backing file's data into the drive's image: its header changes (a backing
            # file no more), which is written outside the group, after committing it.
            vm.cmd("block-stream", device="d0", **{"job-id": "s"})
            wait_job(vm, "BLOCK_JOB_COMPLETED")

        def age_bound(vm, _image):
            time.sleep(1.0)

        def age_bound_after_drain(vm, image):
            # A backup job drains the node twice (its filter goes in and comes out) and
            # flushes nothing of it; no write comes after: only the restart timer starts
            # the committer again.
            vm.cmd("drive-backup", device="d0", target=image + ".backup", format="qcow2",
                   sync="full", **{"job-id": "b"})
            wait_job(vm, "BLOCK_JOB_COMPLETED")
            time.sleep(1.0)

        for name, act in [("active commit job completion (into the backing file)",
                           active_commit),
                          ("stream job completion", stream)]:
            point(s, name, act, backing=True)

        for name, act, opts, extra in [
            ("VM stop", stop, FAR, ()),
            ("an operator's flush (HMP qemu-io flush)", operator_flush, FAR, ()),
            ("external snapshot (blockdev-snapshot-sync)", external_snapshot, FAR, ()),
            ("migration (inactivation)", migration, FAR, ()),
            ("quit (close)", close, FAR, ()),
            ("mirror job completion (target)", mirror, FAR, ()),
            ("backup job completion (target)", backup, FAR, ()),
            ("the age bound (txg-max-age-ms=300)", age_bound, "txg-max-age-ms=300", ()),
            ("the age bound after a drain (restart timer)", age_bound_after_drain,
             "txg-max-age-ms=300", ()),
        ]:
            point(s, name, act, drive_opts=opts, extra=extra)

        # A node moving to an iothread with a group open: the timer follows it.
        image = fresh(s, "iothread.qcow2")
        args = [QEMU_SYSTEM, "-M", "q35", "-accel", "qtest", "-nodefaults", "-display", "none",
                "-object", "iothread,id=io0",
                "-qmp", f"unix:{s.path('qmp.io')},server=on,wait=off",
                "-blockdev", f"driver=file,node-name=f0,filename={image}",
                "-blockdev", "driver=qcow2b,node-name=n0,file=f0,barrier=txg,"
                             "txg-max-age-ms=300"]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            qmp = bl.Qmp(s.path("qmp.io"), timeout=20)
            qmp.hmp('qemu-io n0 "write -P 0x77 0 64k"')
            reply = qmp.cmd("x-blockdev-set-iothread", **{"node-name": "n0",
                                                           "iothread": "io0"})
            if "error" in reply:
                raise Failure(f"x-blockdev-set-iothread: {reply['error']}")
            time.sleep(1.0)
            if not durable(image, 0x77, 0):
                raise Failure("iothread: the group was not committed within its age bound "
                              "after the node moved to an iothread")
            qmp.cmd("quit")
            proc.wait(timeout=60)
            if proc.returncode != 0:
                raise Failure(f"iothread: QEMU exited {proc.returncode}:\n"
                              + proc.stdout.read().decode())
        finally:
            if proc.poll() is None:
                proc.kill()
        check_clean(image)
        print("ok    the age bound after a move to an iothread")

        bad_input(s)
    print("guest-flush-barrier: all checks passed")


def starts(scratch, drive_opts, device, image):
    """Runs the emulator with these options and quits; returns (exit status, output)."""
    drive = f"if=none,id=d0,{drive_opts},file.filename={image}"
    p = subprocess.run([QEMU_SYSTEM, "-M", "q35", "-accel", "qtest", "-nodefaults", "-display",
                        "none", "-qmp", "stdio", "-drive", drive, "-device",
                        f"virtio-blk-pci,drive=d0,{device}"],
                       input=b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    return p.returncode, p.stdout.decode(errors="replace")


def bad_input(s):
    image = fresh(s, "bad.qcow2")
    cases = [
        ("driver=qcow2b", "guest-flush=sometimes", False,
         "guest-flush must be 'durable' or 'barrier', not 'sometimes'"),
        ("driver=qcow2b,read-only=on", "guest-flush=barrier", False,
         "guest-flush=barrier needs a writable drive"),
        ("driver=qcow2", "guest-flush=barrier", True,
         "the drive's format 'qcow2' has no barrier of its own"),
        ("driver=qcow2b,barrier=txg,txg-max-age-ms=0", "guest-flush=barrier", False,
         "txg-max-age-ms 0 is outside 1 to 3600000"),
        ("driver=qcow2b,barrier=txg,txg-max-age-ms=-5", "guest-flush=barrier", False,
         "txg-max-age-ms"),
        ("driver=qcow2b,barrier=txg,txg-max-age-ms=99999999999", "guest-flush=barrier", False,
         "is outside 1 to 3600000"),
        ("driver=qcow2b,barrier=txg,txg-max-bytes=0", "guest-flush=barrier", False,
         "txg-max-bytes 0 is below 1 MiB"),
        ("driver=qcow2b,barrier=flush", "guest-flush=barrier", True, None),
        ("driver=qcow2b", "guest-flush=durable", True, None),
    ]
    for drive, device, ok, message in cases:
        status, out = starts(s, drive, device, image)
        if (status == 0) != ok or (message and message not in out):
            raise Failure(f"{drive} {device}: exit {status}, expected "
                          f"{'success' if ok else 'an error'} saying {message!r}:\n{out}")
        print(f"ok    bad input: {drive} {device}: "
              f"{'starts' if ok else 'refused'}{', ' + message if message else ''}")
    check_clean(image)


if __name__ == "__main__":
    main(checks)
