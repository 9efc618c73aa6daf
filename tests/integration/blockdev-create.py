#!/usr/bin/env python3
"""QMP blockdev-create with driver qcow2b, as libvirt calls it in -blockdev mode for an
external snapshot: blockdev-create of the file (driver file), blockdev-add of the file node,
blockdev-create of the qcow2b image on it (size, cluster-size, backing-file, backing-fmt),
blockdev-add of it with backing null, blockdev-snapshot making it the active overlay of a
running VM's disk. Writes through the new overlay land there, the base keeps its data, and
the chain is checked and read by the qcow2b and qcow2 drivers (and the system's qemu-img, when
there is one). The other options qcow2b creates (extended L2 entries, a raw external data
file, LUKS) are made the same way and described by QEMU's qcow2 as it makes them. Each refused
option gets QEMU's qcow2's message (the same command with driver qcow2 says the same), or
qcow2b's own for what it cannot create, and leaves the file node empty."""

import json
import os
import select
import shutil
import socket
import subprocess
import tempfile
import time

from qemu_tools import (BIN, QEMU_IMG, QEMU_IO, SYS_QEMU_IMG, SYS_QEMU_IO, Failure,
                        Scratch, main, qemu_io, run)

QEMU_SYSTEM = os.path.join(BIN, "qemu-system-x86_64")
M = 1024 * 1024
SIZE = 16 * M
# The guest disk's virtio-blk device (its backend is the disk's BlockBackend).
DISK = "/machine/peripheral/vd0/virtio-backend"


class Vm:
    """A VM without guest code (qtest accelerator) driven over QMP on a socket; its stdout and
    stderr (where HMP's qemu-io prints) go to a log, read once it has quit."""

    def __init__(self, *args):
        self.dir = tempfile.mkdtemp(prefix="qcow2b-vm.")
        path = os.path.join(self.dir, "qmp")
        self.log = open(os.path.join(self.dir, "log"), "w+b")
        self.proc = subprocess.Popen(
            [QEMU_SYSTEM, "-nodefaults", "-display", "none", "-accel", "qtest",
             "-machine", "pc", "-qmp", f"unix:{path},server=on,wait=off", *args],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.sock = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise Failure(f"QEMU did not start:\n{self.output()}")
                time.sleep(0.05)
        self.buffer = b""
        self.events = []
        self.read_message()  # the greeting
        self.command("qmp_capabilities")

    def read_message(self, timeout=60):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise Failure(f"QEMU sent nothing for {timeout} s:\n{self.output()}")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Failure(f"QEMU exited ({self.proc.wait()}):\n{self.output()}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def output(self):
        """What QEMU printed (complete once it has exited)."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def send(self, execute, **arguments):
        """The reply to a command: {"return": ...} or {"error": ...}."""
        msg = {"execute": execute}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall((json.dumps(msg) + "\n").encode())
        while True:
            reply = self.read_message()
            if "event" in reply:
                self.events.append(reply)
            else:
                return reply

    def command(self, execute, **arguments):
        reply = self.send(execute, **arguments)
        if "return" not in reply:
            raise Failure(f"{execute} {arguments}: {reply}")
        return reply["return"]

    def qemu_io(self, device, command):
        """A qemu-io command on a device's backend (HMP qemu-io -d); qemu-io prints its
        results on QEMU's stdout, which the caller reads once QEMU has quit."""
        out = self.command("human-monitor-command",
                           **{"command-line": f'qemu-io -d {device} "{command}"'})
        if out.strip():
            raise Failure(f"qemu-io {command} on {device}: {out}")

    def create(self, job_id, options):
        """blockdev-create as a job, to its end: None on success, else the job's error."""
        self.command("blockdev-create", **{"job-id": job_id, "options": options})
        while not any(e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job_id
                      and e["data"]["status"] == "concluded" for e in self.events):
            self.events.append(self.read_message())
        job = [j for j in self.command("query-jobs") if j["id"] == job_id]
        self.command("job-dismiss", id=job_id)
        self.events = []
        return job[0].get("error")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        """Quits QEMU if still running (it must exit 0); after a failure it is killed."""
        if self.proc.poll() is None:
            if exc_type is None:
                self.quit()
            else:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def quit(self):
        """Quits QEMU (which must exit 0) and returns what it printed."""
        self.send("quit")
        status = self.proc.wait(timeout=60)
        out = self.output()
        if status != 0:
            raise Failure(f"QEMU exited {status}:\n{out}")
        return out


def read_through(fmt, image, checks):
    """`checks` (pattern, offset, length) read from the image with the built qemu-io through
    `fmt`, and with the system's through qcow2 when there is one."""
    cmds = [f"read -q -P {p} {o} {n}" for p, o, n in checks]
    qemu_io(QEMU_IO, fmt, image, cmds, read_only=True)
    if fmt == "qcow2" and os.access(SYS_QEMU_IO, os.X_OK):
        qemu_io(SYS_QEMU_IO, "qcow2", image, cmds, read_only=True)


def check_everywhere(image):
    """qemu-img check of the image through qcow2b and qcow2 (built), and the system's."""
    tools = [(QEMU_IMG, "qcow2b"), (QEMU_IMG, "qcow2")]
    if os.access(SYS_QEMU_IMG, os.X_OK):
        tools.append((SYS_QEMU_IMG, "qcow2"))
    for tool, fmt in tools:
        status, out = run(tool, "check", "-f", fmt, image, check=False)
        if status != 0:
            raise Failure(f"{tool} check -f {fmt} {image} exited {status}:\n{out}")


def info(tool, fmt, image, *extra):
    _, out = run(tool, "info", "--output=json", "-f", fmt, *extra, image)
    return json.loads(out)


def expect(what, got, want):
    if got != want:
        raise Failure(f"{what}: {got!r}, expected {want!r}")


def libvirt_external_snapshot(s):
    base = s.path("base.qcow2")
    top = s.path("top.qcow2")
    run(QEMU_IMG, "create", "-q", "-f", "qcow2b", base, str(SIZE))
    qemu_io(QEMU_IO, "qcow2b", base, ["write -q -P 0x11 0 1M", "write -q -P 0x12 8M 64k"])
    with Vm("-blockdev", f"driver=file,node-name=base-file,filename={base}",
            "-blockdev", "driver=qcow2b,node-name=base-fmt,file=base-file",
            "-device", "virtio-blk-pci,drive=base-fmt,id=vd0") as vm:
        # libvirt's order (qemuBlockStorageSourceCreate): the file, its node, the format on
        # it, the format's node without its backing chain, then the snapshot.
        expect("blockdev-create of the file",
               vm.create("create-file", {"driver": "file", "filename": top, "size": 0}), None)
        vm.command("blockdev-add", driver="file", **{"node-name": "top-file"}, filename=top)
        expect("blockdev-create of the qcow2b overlay",
               vm.create("create-fmt", {"driver": "qcow2b", "file": "top-file", "size": SIZE,
                                        "cluster-size": 65536, "backing-file": base,
                                        "backing-fmt": "qcow2"}), None)
        vm.command("blockdev-add", driver="qcow2b", **{"node-name": "top-fmt"},
                   file="top-file", backing=None)
        vm.command("blockdev-snapshot", node="base-fmt", overlay="top-fmt")
        block = [b for b in vm.command("query-block") if "/vd0/" in b.get("qdev", "")]
        expect("the disk's active node", block[0]["inserted"]["node-name"], "top-fmt")
        expect("its backing node", block[0]["inserted"]["image"]["backing-image"]["filename"],
               base)
        # The guest's writes, through the disk's backend, now on the overlay, and its view:
        # the new data over the base's.
        commands = ["write -P 0x22 0 64k", "write -P 0x23 12M 128k", "flush",
                    "read -P 0x22 0 64k", "read -P 0x11 64k 960k", "read -P 0x12 8M 64k"]
        for command in commands:
            vm.qemu_io(DISK, command)
        printed = [line for line in vm.quit().splitlines() if line.startswith(("wrote", "read"))
                   or "fail" in line or "rror" in line]
        expect("what qemu-io printed in the VM", printed, [
            "wrote 65536/65536 bytes at offset 0", "wrote 131072/131072 bytes at offset 12582912",
            "read 65536/65536 bytes at offset 0", "read 983040/983040 bytes at offset 65536",
            "read 65536/65536 bytes at offset 8388608"])

    for fmt in ("qcow2b", "qcow2"):
        for image in (top, base):
            check_everywhere(image)
        chain = info(QEMU_IMG, fmt, top, "--backing-chain")
        expect(f"chain length through {fmt}", len(chain), 2)
        expect("overlay size", chain[0]["virtual-size"], SIZE)
        expect("overlay cluster size", chain[0]["cluster-size"], 65536)
        expect("overlay backing file", chain[0]["backing-filename"], base)
        expect("overlay backing format", chain[0]["backing-filename-format"], "qcow2")
        expect("overlay version", chain[0]["format-specific"]["data"]["compat"], "1.1")
        read_through(fmt, top, [("0x22", 0, 64 * 1024), ("0x11", 64 * 1024, 960 * 1024),
                                ("0x12", 8 * M, 64 * 1024), ("0x23", 12 * M, 128 * 1024),
                                ("0", 4 * M, 64 * 1024)])
        # The base is as it was: the writes went to the overlay.
        read_through(fmt, base, [("0x11", 0, M), ("0", 12 * M, 128 * 1024)])
    if os.access(SYS_QEMU_IMG, os.X_OK):
        chain = info(SYS_QEMU_IMG, "qcow2", top, "--backing-chain")
        expect("the system's qemu-img: chain", [c["filename"] for c in chain], [top, base])


def supported_options(s):
    """What qcow2b creates besides the plain image, made by blockdev-create and described by
    QEMU's qcow2 as it makes them; the data reads back through both drivers."""
    ext = s.path("ext.qcow2")
    meta, data = s.path("meta.qcow2"), s.path("meta.data")
    luks = s.path("luks.qcow2")
    for path in (ext, meta, data, luks):
        open(path, "wb").close()
    with open(data, "wb") as f:
        f.write(b"\x42" * M)  # a raw image's data stays (data-file-raw)
    with Vm("-object", "secret,id=sec0,data=blockdev-create-test",
            "-blockdev", f"driver=file,node-name=ext,filename={ext}",
            "-blockdev", f"driver=file,node-name=meta,filename={meta}",
            "-blockdev", f"driver=file,node-name=data,filename={data}",
            "-blockdev", f"driver=file,node-name=luks,filename={luks}") as vm:
        expect("extended-l2", vm.create("ext", {
            "driver": "qcow2b", "file": "ext", "size": 4 * M, "extended-l2": True,
            "cluster-size": 131072, "refcount-bits": 64, "lazy-refcounts": True,
            "compression-type": "zstd", "preallocation": "metadata"}), None)
        expect("data-file-raw", vm.create("raw", {
            "driver": "qcow2b", "file": "meta", "size": M, "data-file": "data",
            "data-file-raw": True}), None)
        expect("luks", vm.create("luks", {
            "driver": "qcow2b", "file": "luks", "size": M, "encrypt": {
                "format": "luks", "key-secret": "sec0", "cipher-mode": "cbc",
                "ivgen-alg": "essiv", "ivgen-hash-alg": "sha256", "iter-time": 10}}), None)

    for fmt in ("qcow2b", "qcow2"):
        check_everywhere(ext)
        spec = info(QEMU_IMG, fmt, ext)
        expect("cluster size", spec["cluster-size"], 131072)
        data_ = spec["format-specific"]["data"]
        expect("extended-l2", data_.get("extended-l2"), True)
        expect("refcount bits", data_["refcount-bits"], 64)
        expect("lazy refcounts", data_["lazy-refcounts"], True)
        expect("compression type", data_["compression-type"], "zstd")
        qemu_io(QEMU_IO, fmt, ext, ["write -q -P 0x31 4k 8k", "read -q -P 0x31 4k 8k",
                                    "read -q -P 0 0 4k"])

        spec = info(QEMU_IMG, fmt, meta)
        expect("data file", spec["format-specific"]["data"]["data-file"], data)
        expect("data file raw", spec["format-specific"]["data"]["data-file-raw"], True)
        read_through(fmt, meta, [("0x42", 0, M)])
    check_everywhere(meta)
    with open(data, "rb") as f:
        expect("the raw data file's bytes", f.read(), b"\x42" * M)

    secret = "--object", "secret,id=sec0,data=blockdev-create-test"
    for fmt in ("qcow2b", "qcow2"):
        _, out = run(QEMU_IMG, "info", "--output=json", *secret, "--image-opts",
                     f"driver={fmt},file.filename={luks},encrypt.key-secret=sec0")
        spec = json.loads(out)
        expect("encrypted", spec["encrypted"], True)
        expect("encryption format", spec["format-specific"]["data"]["encrypt"]["format"],
               "luks")
        status, out = run(QEMU_IO, *secret, "--image-opts",
                          f"driver={fmt},file.filename={luks},encrypt.key-secret=sec0",
                          "-c", "write -q -P 0x51 0 64k", "-c", "read -q -P 0x51 0 64k")
        if "rror" in out or "failed" in out:
            raise Failure(f"the LUKS image through {fmt}: {out}")
    status, out = run(QEMU_IMG, "check", *secret, "--image-opts",
                      f"driver=qcow2,file.filename={luks},encrypt.key-secret=sec0",
                      check=False)
    expect(f"check of the LUKS image ({out})", status, 0)


# Options QEMU's qcow2 refuses, with its message; qcow2b gives the same.
REFUSED_AS_QCOW2 = [
    ({"size": 1000}, "Image size must be a multiple of 512 bytes"),
    # Sizes qcow2 refuses only when it truncates the new image to its size.
    ({"size": 1 << 63}, "Could not resize image: Image size cannot be negative"),
    ({"size": (1 << 63) - 512},
     "Could not resize image: offset(9223372036854775296) exceeds maximum(9223372035781033984)"),
    ({"size": 1 << 48, "cluster-size": 512},
     "Could not resize image: Failed to grow the L1 table: File too large"),
    ({"cluster-size": 1234}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster-size": 4 * M}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"refcount-bits": 3},
     "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"refcount-bits": 128},
     "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"version": "v2", "refcount-bits": 8},
     "Different refcount widths than 16 bits require compatibility level 1.1 or above "
     "(use version=v3 or greater)"),
    ({"version": "v2", "lazy-refcounts": True},
     "Lazy refcounts only supported with compatibility level 1.1 and above "
     "(use version=v3 or greater)"),
    ({"version": "v2", "extended-l2": True},
     "Extended L2 entries are only supported with compatibility level 1.1 and above "
     "(use version=v3 or greater)"),
    ({"extended-l2": True, "cluster-size": 4096},
     "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
    ({"version": "v2", "compression-type": "zstd"},
     "Non-zlib compression type is only supported with compatibility level 1.1 and above "
     "(use version=v3 or greater)"),
    ({"backing-fmt": "qcow2"}, "Backing format cannot be used without backing file"),
    ({"backing-file": "base.qcow2", "preallocation": "metadata"},
     "Backing file and preallocation can only be used at the same time if extended_l2 is on"),
    ({"data-file-raw": True}, "data-file-raw requires data-file"),
    ({"data-file": "data", "data-file-raw": True, "backing-file": "base.qcow2"},
     "Backing file and data-file-raw cannot be used at the same time"),
    ({"version": "v2", "data-file": "data"},
     "External data files are only supported with compatibility level 1.1 and above "
     "(use version=v3 or greater)"),
]

# What qcow2b cannot create (QEMU's qcow2 can): refused with ENOTSUP, naming it.
REFUSED_BY_QCOW2B = [
    ({"extended-l2": True, "data-file": "data"},
     "not supported by qcow2b: creating an image with extended L2 entries with an external "
     "data file"),
    ({"extended-l2": True, "encrypt": {"format": "luks", "key-secret": "sec0",
                                       "cipher-mode": "cbc", "ivgen-alg": "essiv",
                                       "ivgen-hash-alg": "sha256", "iter-time": 10}},
     "not supported by qcow2b: creating an image with extended L2 entries with encryption"),
]


def refused_options(s):
    image, data = s.path("refused.qcow2"), s.path("refused.data")
    for path in (image, data):
        open(path, "wb").close()
    with Vm("-object", "secret,id=sec0,data=blockdev-create-test",
            "-blockdev", f"driver=file,node-name=img,filename={image}",
            "-blockdev", f"driver=file,node-name=data,filename={data}") as vm:
        for n, (extra, message) in enumerate(REFUSED_AS_QCOW2 + REFUSED_BY_QCOW2B):
            options = {"file": "img", "size": M, **extra}
            got = vm.create(f"qcow2b-{n}", {"driver": "qcow2b", **options})
            expect(f"qcow2b's error for {extra}", got, message)
            # Nothing was written: the file and the data file are as they were.
            for path in (image, data):
                expect(f"{path} after the refusal of {extra}", os.path.getsize(path), 0)
            if (extra, message) in REFUSED_AS_QCOW2:
                got = vm.create(f"qcow2-{n}", {"driver": "qcow2", **options})
                expect(f"QEMU's qcow2's error for {extra}", got, message)
                # qcow2 refuses a size after it wrote its header: empty again for the next.
                os.truncate(image, 0)
        # A file reference that names no node: QEMU's message for it, before anything else.
        got = vm.create("nonode", {"driver": "qcow2b", "file": "nonode", "size": M})
        expect("a missing file node",
               got, "Cannot find device='nonode' nor node-name='nonode'")
        # After every refusal the node still takes an image.
        expect("a good image after the refusals",
               vm.create("good", {"driver": "qcow2b", "file": "img", "size": M}), None)
    check_everywhere(image)


def body():
    with Scratch() as s:
        libvirt_external_snapshot(s)
        supported_options(s)
        refused_options(s)
    print("blockdev-create with driver qcow2b: libvirt's external snapshot flow, extended L2, "
          "raw data file, LUKS, refused options with their messages: ok")


if __name__ == "__main__":
    main(body)
