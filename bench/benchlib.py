"""What the benchmarks share: the built tools, image creation, host fdatasync counts from
strace, medians of paired runs, a qemu-io session that times groups of requests, and a QMP
client.

Imported by bench/sync-bench.py and bench/paper-bench.py (they run from any folder)."""

import json
import os
import re
import select
import shutil
import socket
import statistics
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_ROOT = os.environ.get("QCOW2B_BUILD_ROOT", os.path.join(ROOT, ".build"))
BIN = os.path.join(BUILD_ROOT, "bin")
QEMU_IMG, QEMU_IO = os.path.join(BIN, "qemu-img"), os.path.join(BIN, "qemu-io")
QEMU_SYSTEM = os.path.join(BIN, "qemu-system-x86_64")


class Qmp:
    """A QMP client on a unix socket: commands, HMP commands, and the qcow2b counters of
    query-block. Events that arrive meanwhile are kept in `events`."""

    def __init__(self, path, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.buf = b""
        self.events = []
        self._read()
        self.cmd("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("QMP closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **arguments):
        msg = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply or "error" in reply:
                return reply
            self.events.append(reply)

    def hmp(self, command_line):
        """An HMP command; returns its output (a QMP error raises)."""
        reply = self.cmd("human-monitor-command", **{"command-line": command_line})
        if "error" in reply:
            raise RuntimeError(f"HMP {command_line}: {reply['error']}")
        return reply["return"]

    def wait_event(self, name, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get("event") == name:
                    return self.events.pop(i)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no QMP event {name} in {timeout} s")
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                self.events.append(self._read())
            finally:
                self.sock.settimeout(None)

    def qcow2b_counters(self, device=None):
        """The counters of the first qcow2b drive (or of `device`), or None."""
        # The driver's statistics (query-blockstats, driver-specific): the image
        # information of a qcow2b node is that of any qcow2 image.
        for dev in self.cmd("query-blockstats").get("return", []):
            if device is not None and dev.get("device") != device:
                continue
            spec = dev.get("driver-specific", {})
            if spec.get("driver") == "qcow2b":
                return spec["counters"]
        return None

    def host_fdatasyncs(self):
        counters = self.qcow2b_counters()
        return None if counters is None else counters["host-fdatasyncs"]


def require_tools(*tools):
    for tool in tools or (QEMU_IMG, QEMU_IO):
        if not os.access(tool, os.X_OK):
            raise SystemExit(f"no built {tool}; run scripts/setup.sh")


def create_image(path, size_bytes, opts=""):
    """A fresh qcow2 image (64 KiB clusters, QEMU's default), made by the built qemu-img."""
    if os.path.exists(path):
        os.unlink(path)
    args = [QEMU_IMG, "create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else [])
    subprocess.run(args + [path, str(size_bytes)], check=True)


def strace_prefix(log):
    """strace counting the host's sync calls of a command and its threads (QEMU syncs from
    worker threads). It slows every traced call, so a traced run is never a timed one."""
    return ["strace", "-f", "-c", "-e", "trace=fdatasync,fsync", "-o", log]


def strace_syncs(log):
    """fdatasync + fsync calls in an `strace -c` summary."""
    syncs = 0
    with open(log) as f:
        for line in f:
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(fdatasync|fsync)\s*$", line)
            if m:
                syncs += int(m.group(1))
    return syncs


def median(values):
    return statistics.median(values) if values else None


def percentile(values, p):
    """The p-th percentile (nearest rank) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def have_stdbuf():
    return shutil.which("stdbuf") is not None


class QemuIoSession:
    """One qemu-io process in interactive mode, fed one group of commands at a time.

    qemu-io reads a command line with fgets() whenever stdin is readable and prints its
    prompt when the command has completed. With stdio's buffer on stdin, a group sent at
    once would sit in the buffer while qemu-io waits for the descriptor, so stdin is made
    unbuffered (coreutils' stdbuf -i0): qemu-io then runs the lines of a group back to back
    without a round trip to this process per command, and the group's time is the time
    from sending it to its last prompt (the requests run one after the other, queue depth 1,
    as a guest's fsync path issues them). Output of commands (errors) is collected and
    checked."""

    PROMPT = b"qemu-io> "

    def __init__(self, args, trace_log=None):
        cmd = ["stdbuf", "-i0", QEMU_IO] + list(args)
        if trace_log:
            cmd = strace_prefix(trace_log) + cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, bufsize=0)
        self.pending = b""
        self.output = []
        self._wait_prompts(1)

    def _wait_prompts(self, count):
        fd = self.proc.stdout.fileno()
        seen = 0
        while True:
            n = self.pending.count(self.PROMPT)
            if n >= count:
                # Keep what follows the count-th prompt (nothing, normally).
                parts = self.pending.split(self.PROMPT)
                text = self.PROMPT.join(parts[:count])
                self.pending = self.PROMPT.join(parts[count:])
                if text.strip():
                    self.output.append(text.decode(errors="replace"))
                return
            select.select([fd], [], [], 600)
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("qemu-io exited: " + (self.pending + b"").decode(errors="replace")[-2000:])
            self.pending += chunk
            seen += 1

    def run(self, commands):
        """Runs a group of commands; returns its time in seconds."""
        data = "".join(c + "\n" for c in commands).encode()
        start = time.perf_counter()
        self.proc.stdin.write(data)
        self._wait_prompts(len(commands))
        return time.perf_counter() - start

    def close(self):
        """Quits; returns everything the commands printed (errors among it)."""
        try:
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        rest = self.proc.stdout.read()
        self.proc.wait()
        text = "".join(self.output) + (self.pending + rest).decode(errors="replace")
        return self.proc.returncode, text.replace(self.PROMPT.decode(), "")


def output_errors(text):
    """The lines of qemu-io output that report a failure (qemu-io exits 0 for some); the
    counters' "host errors: 0" line is not one."""
    bad = re.compile(r"failed|\berror\b|Pattern verification", re.IGNORECASE)
    return [line for line in text.splitlines() if bad.search(line)]
