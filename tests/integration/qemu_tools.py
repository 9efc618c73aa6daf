"""Shared by the Python integration tests: the built QEMU tools, the system's reference tools,
and a scratch folder. Imported by each test (they run from this folder)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_ROOT = os.environ.get("QCOW2B_BUILD_ROOT", os.path.join(ROOT, ".build"))
BIN = os.path.join(BUILD_ROOT, "bin")
QEMU_IMG = os.path.join(BIN, "qemu-img")
QEMU_IO = os.path.join(BIN, "qemu-io")
SYS_QEMU_IMG = "/usr/bin/qemu-img"
SYS_QEMU_IO = "/usr/bin/qemu-io"

for tool in (QEMU_IMG, QEMU_IO):
    if not os.access(tool, os.X_OK):
        sys.exit(f"missing built binary {tool} (run scripts/build.sh)")


class Failure(Exception):
    pass


def run(*args, check=True, timeout=120):
    """Runs a command; returns (exit status, output). A signal is always a failure."""
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    out = p.stdout.decode(errors="replace")
    if p.returncode < 0:
        raise Failure(f"{' '.join(args)} died of signal {-p.returncode}:\n{out}")
    if check and p.returncode != 0:
        raise Failure(f"{' '.join(args)} exited {p.returncode}:\n{out}")
    return p.returncode, out


def qemu_io(tool, fmt, image, commands, read_only=False):
    """Runs qemu-io commands in one process; qemu-io reports some failures on stdout with
    exit status 0, so those count as failures too."""
    args = [tool, "-f", fmt] + (["-r"] if read_only else [])
    for c in commands:
        args += ["-c", c]
    _, out = run(*args, image)
    for bad in ("Pattern verification failed", "failed:", "error", "Error"):
        if bad in out:
            raise Failure(f"qemu-io -f {fmt} {image}: {bad}\n{out[-3000:]}")
    return out


def check_clean(image):
    """qemu-img check with the system's and the built qemu-img, both must exit 0."""
    for tool in (SYS_QEMU_IMG, QEMU_IMG):
        status, out = run(tool, "check", "-f", "qcow2", image, check=False)
        if status != 0:
            raise Failure(f"{tool} check {image} exited {status}:\n{out}")


def check_consistent(image):
    """qemu-img check with the system's and the built qemu-img after a crash: no corruption,
    no check error; leaked clusters (exit 3) allowed, as a crash of any writer may leave."""
    for tool in (SYS_QEMU_IMG, QEMU_IMG):
        status, out = run(tool, "check", "-f", "qcow2", image, check=False)
        if status not in (0, 3) or "ERROR" in out:
            raise Failure(f"{tool} check {image} exited {status}:\n{out}")


def info(image):
    _, out = run(SYS_QEMU_IMG, "info", "--output=json", image)
    return json.loads(out)


def to_raw(tool, fmt, image, raw):
    run(tool, "convert", "-f", fmt, "-O", "raw", image, raw)
    with open(raw, "rb") as f:
        return f.read()


class Scratch:
    def __enter__(self):
        self.dir = tempfile.mkdtemp(prefix="qcow2b-test.")
        return self

    def path(self, name):
        return os.path.join(self.dir, name)

    def __exit__(self, *exc):
        shutil.rmtree(self.dir, ignore_errors=True)


def main(body):
    """Runs a test body; prints the failure and exits 1 on a Failure."""
    try:
        body()
    except Failure as e:
        print(f"FAIL: {e}", file=sys.stderr)
        sys.exit(1)
