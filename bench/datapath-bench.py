#!/usr/bin/env python3
"""qcow2b's data path against QEMU's qcow2 (same binary), a matrix side by side in one run:
reads, allocating writes, overwrites, copy-on-write over a backing file, write_zeroes and
discard, each at several guest flush cadences, on tmpfs and on the disk.

Drivers: `qcow2`, and `qcow2b` with barrier=ordered, barrier=flush and barrier=txg, each
opened with `--image-opts driver=...,file.filename=IMG` and `-t writeback`.

Cells (1 GiB virtual size unless said, 64 KiB clusters; requests per run at --scale 1):
  rd-4k-qd1          qemu-img bench read, 4 KiB, qd1, sequential: 30000
  rd-4k-qd32         read, 4 KiB, qd32: 100000
  rd-64k-qd8         read, 64 KiB, qd8: 40000 (about 2.4 passes)
      reads run on one fully allocated image (written once with `write -P 0x5a` through
      qcow2), opened read-only and shared by every run of the medium
  alloc-sparse-4k    write, 4 KiB, qd32, step 69632 (64 KiB + 4 KiB: every write starts a
                     new cluster), fresh image: 15000
  alloc-4k-qd1       write, 4 KiB, qd1, sequential, fresh image: 30000; 3000 with a flush
                     after every write
  alloc-4k-qd32      write, 4 KiB, qd32, sequential, fresh image: 100000
  alloc-64k-qd8      write, 64 KiB, qd8, sequential, fresh image: 12000
      an allocating, cow, zero or discard cell whose requests would pass the end of its
      image gets a larger one (only with --scale above 1), so that none wraps around
  over-4k-qd32-1g    write, 4 KiB, qd32, step 69632 over a fully allocated 1 GiB image:
                     30000 (about two passes: every cluster is rewritten)
  over-4k-qd32-2g    the same over a 2 GiB image: 30000 (nearly one pass; twice the metadata)
  cow-4k-qd32        write, 4 KiB, qd32, step 69632, on a fresh qcow2 overlay
                     (-b base -F qcow2) over a fully allocated 1 GiB base: 15000 (every
                     write copies the rest of its cluster from the base)
  zero-64k-qd1       qemu-io `write -q -z OFF 64k`, one after another over a fully allocated
                     image (every 64 KiB once): 16384; 4096 with a flush after every command
  discard-64k-qd1    qemu-io `discard -q OFF 64k`, likewise: 16384; 4096 with flushes
Guest flush cadence of the write cells: none, `--flush-interval=32` (qemu-img bench drains
the queue, then flushes) and, at queue depth 1 only, `--flush-interval=1` (qemu-img bench
refuses an interval below the queue depth); of the qemu-io cells: none and a `flush` after
every command. Reads have no flush. Every run of a cell that writes gets a fresh copy of a
template made once per medium (creating and filling is not timed; a copy on the disk is
fsynced before the run, so its writeback does not fall into the run). qemu-io reads its
commands from a script file on stdin (no argv limit; it runs its main loop between commands,
as a VM does).

Timing: each cell runs the drivers back to back --reps times (default 3), in reverse order on
every other repetition, so each qcow2b mode runs once before and once after qcow2 in turn.
A run's time is the whole process: start, open, the requests, and the close, whose flush
makes everything written durable (--timing run takes qemu-img bench's own "Run completed"
figure instead, which leaves out open and close; qemu-io cells have only the process time).
Reported: the median time per driver and, per qcow2b mode, the median over repetitions of
the paired ratio qcow2 s / qcow2b s (above 1.00 = qcow2b faster) with the lowest and highest
pair. Peak RSS is the largest ru_maxrss (os.wait4) of the timed runs.

Counting: one extra run per (cell, driver), never timed, under
  strace -f --seccomp-bpf -y -s 0 -e trace=fdatasync,fsync,pwrite64,pwritev,pwritev2,write,
                                          fallocate
gives the host fdatasync + fsync calls (on any file), the bytes written to the image file
(successful returns of the write calls whose descriptor -y names as the image) and the
fallocate calls on it.

Output: one table per medium, a summary per mode (cells at >= 1.00x for ordered and txg,
>= 0.95x for flush, and those below), and the cells without a guest flush where a qcow2b
mode made more host syncs than qcow2. --json FILE writes every figure.

The counts aim at 0.5-3 s per qcow2 run on the 2-vCPU build machine (extrapolated from
--smoke runs on a loaded machine; flush cadences and txg's copy-on-write overwrites take
longer). A default run (both media, 3 repetitions) makes 22 rows x 4 drivers x (3 timed + 1
counted) = 352 runs per medium plus the image copies, roughly 30-40 minutes; --smoke (1
repetition, counts / 64, images / 16, tmpfs) takes about half a minute and proves that
everything runs.

--driver NAME=OPTIONS adds a qcow2b configuration of your own to the run (repeatable), for
example `--driver ordered16=barrier=ordered,buffer-size=16M`: it runs beside the others and
is held to the target of the barrier mode its options name. --bin NAME=DIR runs that driver
with the qemu-img and qemu-io of another build (say, the Rust library built with other
profile settings), so two builds are compared in one run, each against QEMU's qcow2.

Usage: datapath-bench.py [--reps N] [--scale X] [--media tmpfs,disk] [--cells a,b]
                         [--modes ordered,flush,txg] [--driver NAME=OPTIONS]...
                         [--bin NAME=DIR]...
                         [--timing process|run] [--json FILE] [--smoke]"""

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
# 64 KiB + 4 KiB: with 64 KiB clusters, every 4 KiB request starts in a cluster of its own.
CLUSTER_STRIDE_BYTES = 69632
FILL_PATTERN = "0x5a"
WRITE_PATTERN = "0x3c"

DRIVERS = {
    "qcow2": "driver=qcow2",
    "ordered": "driver=qcow2b,barrier=ordered",
    "flush": "driver=qcow2b,barrier=flush",
    "txg": "driver=qcow2b,barrier=txg",
}
MODES = ("ordered", "flush", "txg")
# The ratio a mode should reach: flush pays a host sync at every ordering point by design.
TARGET_RATIO = {"ordered": 1.0, "flush": 0.95, "txg": 1.0}

MEDIA = {"tmpfs": "/dev/shm", "disk": bl.BUILD_ROOT}
# A driver whose qemu-img and qemu-io come from another build (--bin NAME=DIR).
BIN_DIRS = {}

SMOKE_SCALE = 1 / 64
SMOKE_SIZE_DIVISOR = 16


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str
    what: str
    # What a run works on: "shared" (the filled image itself, read-only), "filled" (a copy of
    # a fully allocated image), "fresh" (a copy of an empty one), "overlay" (a copy of an
    # empty overlay whose backing file is a fully allocated image).
    image: str
    count: int
    every_count: int = 0  # requests per run with a flush after every request
    tool: str = "bench"  # or "qemu-io"
    write: bool = True
    request_bytes: int = 4 * KIB
    depth: int = 1
    step_bytes: int = 0  # 0: sequential (qemu-img bench's default, the request size)
    size_bytes: int = GIB
    qemu_io_cmd: str = ""  # "write -q -z" or "discard -q"
    # The image grows past size_bytes when count requests would pass its end (allocating
    # cells stay allocating, the qemu-io cells touch every 64 KiB once).
    grow: bool = False

    @property
    def stride_bytes(self):
        return self.step_bytes or self.request_bytes


CELLS = [
    Cell("rd-4k-qd1", "read 4 KiB qd1", "shared", 30000, write=False),
    Cell("rd-4k-qd32", "read 4 KiB qd32", "shared", 100000, write=False, depth=32),
    Cell("rd-64k-qd8", "read 64 KiB qd8", "shared", 40000, write=False,
         request_bytes=64 * KIB, depth=8),
    Cell("alloc-sparse-4k", "allocating 4 KiB qd32, a new cluster each", "fresh", 15000,
         depth=32, step_bytes=CLUSTER_STRIDE_BYTES, grow=True),
    Cell("alloc-4k-qd1", "allocating 4 KiB qd1 sequential", "fresh", 30000, every_count=3000,
         grow=True),
    Cell("alloc-4k-qd32", "allocating 4 KiB qd32 sequential", "fresh", 100000, depth=32,
         grow=True),
    Cell("alloc-64k-qd8", "allocating 64 KiB qd8 sequential", "fresh", 12000,
         request_bytes=64 * KIB, depth=8, grow=True),
    Cell("over-4k-qd32-1g", "overwrite 4 KiB qd32, a cluster each, 1 GiB", "filled", 30000,
         depth=32, step_bytes=CLUSTER_STRIDE_BYTES),
    Cell("over-4k-qd32-2g", "overwrite 4 KiB qd32, a cluster each, 2 GiB", "filled", 30000,
         depth=32, step_bytes=CLUSTER_STRIDE_BYTES, size_bytes=2 * GIB),
    Cell("cow-4k-qd32", "4 KiB qd32 on an overlay, a cluster each", "overlay", 15000,
         depth=32, step_bytes=CLUSTER_STRIDE_BYTES, grow=True),
    Cell("zero-64k-qd1", "qemu-io write -z 64 KiB qd1", "filled", 16384, every_count=4096,
         tool="qemu-io", request_bytes=64 * KIB, qemu_io_cmd="write -q -z", grow=True),
    Cell("discard-64k-qd1", "qemu-io discard 64 KiB qd1", "filled", 16384, every_count=4096,
         tool="qemu-io", request_bytes=64 * KIB, qemu_io_cmd="discard -q", grow=True),
]


def cadences(cell):
    """The guest flush cadences of a cell: (label, requests per flush; 0 = no flush)."""
    if not cell.write:
        return [("none", 0)]
    if cell.tool == "qemu-io":
        return [("none", 0), ("every 1", 1)]
    # qemu-img bench refuses a flush interval below the queue depth.
    return [("none", 0), ("every 32", 32)] + ([("every 1", 1)] if cell.depth == 1 else [])


class ToolFailed(Exception):
    pass


def run_tool(cmd, stdin_path=None):
    """Runs a command with its output in a file; returns (seconds, output, peak RSS in KiB).
    A non-zero exit, or an error that qemu-io printed but did not exit for, raises
    ToolFailed with the command line and its output."""
    with tempfile.TemporaryFile() as out, open(stdin_path or os.devnull, "rb") as stdin:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=stdin, stdout=out, stderr=subprocess.STDOUT)
        _, status, rusage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    errors = bl.output_errors(text)
    if proc.returncode != 0 or errors:
        raise ToolFailed(f"exit {proc.returncode}: {shlex.join(cmd)}\n{text[-4000:].rstrip()}")
    return seconds, text, rusage.ru_maxrss


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Workspace:
    """A folder on one medium: the templates (made once, on first use) and the run image."""

    def __init__(self, medium, size_divisor):
        self.medium = medium
        self.dir = tempfile.mkdtemp(prefix="datapath-bench.", dir=MEDIA[medium])
        self.size_divisor = size_divisor
        self.templates = {}

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def template(self, kind, size_bytes):
        """The template of a run image: "empty", "filled" or "overlay" (over "filled")."""
        key = kind, size_bytes
        if key not in self.templates:
            path = os.path.join(self.dir, f"{kind}-{size_bytes // MIB}M.qcow2")
            if kind == "overlay":
                base = self.template("filled", size_bytes)
                bl.create_image(path, size_bytes, f"backing_file={base},backing_fmt=qcow2")
            else:
                bl.create_image(path, size_bytes)
            if kind == "filled":
                # qemu-io takes at most 2 GiB - 512 bytes per request: fill in 1 GiB parts.
                fill = []
                for offset in range(0, size_bytes, GIB):
                    length = min(GIB, size_bytes - offset)
                    fill += ["-c", f"write -q -P {FILL_PATTERN} {offset} {length}"]
                run_tool([bl.QEMU_IO, "-t", "writeback", "-f", "qcow2"] + fill + [path])
            fsync_path(path)
            self.templates[key] = path
        return self.templates[key]

    def run_image(self, cell, size_bytes):
        """The image one run works on: the shared template, or a fresh copy of one."""
        kind = {"shared": "filled", "filled": "filled", "fresh": "empty",
                "overlay": "overlay"}[cell.image]
        template = self.template(kind, size_bytes)
        if cell.image == "shared":
            return template
        path = os.path.join(self.dir, "run.qcow2")
        shutil.copyfile(template, path)
        fsync_path(path)
        return path

    def release(self, cell, path):
        if cell.image != "shared":
            os.unlink(path)


def request_count(cell, interval, scale):
    count = cell.every_count if interval == 1 and cell.every_count else cell.count
    return max(cell.depth, interval, int(round(count * scale)))


def image_size_bytes(cell, count, size_divisor):
    size = cell.size_bytes // size_divisor
    if cell.grow:
        size = max(size, -(-count * cell.stride_bytes // MIB) * MIB)
    return size


def qemu_io_script(path, cell, count, interval, size_bytes):
    with open(path, "w") as f:
        for i in range(count):
            offset = i * cell.stride_bytes % size_bytes
            f.write(f"{cell.qemu_io_cmd} {offset} {cell.request_bytes}\n")
            if interval:
                f.write("flush\n")


def command(cell, driver, image, count, interval):
    spec = f"{DRIVERS[driver]},file.filename={image}"
    qemu_img, qemu_io = bl.QEMU_IMG, bl.QEMU_IO
    if driver in BIN_DIRS:
        qemu_img, qemu_io = (os.path.join(BIN_DIRS[driver], t) for t in ("qemu-img", "qemu-io"))
    if cell.tool == "qemu-io":
        return [qemu_io, "-t", "writeback", "--image-opts", spec]
    cmd = [qemu_img, "bench", "-t", "writeback", "-c", str(count), "-d", str(cell.depth),
           "-s", str(cell.request_bytes), "-S", str(cell.stride_bytes)]
    if cell.write:
        cmd += ["-w", f"--pattern={WRITE_PATTERN}"]
    if interval:
        cmd.append(f"--flush-interval={interval}")
    return cmd + ["--image-opts", spec]


TRACED = "fdatasync,fsync,pwrite64,pwritev,pwritev2,write,fallocate"
# strace -f -y -s 0 lines: `PID name(FD</path>, ...) = RET`, or split in two around a switch
# to another thread: `PID name(FD</path>, ... <unfinished ...>` and later
# `PID <... name resumed>...) = RET`.
SYSCALL_LINE = re.compile(r"^(?:(\d+) +)?(\w+)\(-?\d+(?:<(.*?)>)?")
RESUMED_LINE = re.compile(r"^(?:(\d+) +)?<\.\.\. (\w+) resumed>")
RETURN_VALUE = re.compile(r"\) += (-?\d+)")


def strace_command(log):
    return ["strace", "-f", "--seccomp-bpf", "-y", "-s", "0", "-e", f"trace={TRACED}",
            "-o", log]


def trace_counts(log, image):
    """Host syncs (any file), and bytes written and fallocate calls on the image file."""
    image = os.path.realpath(image)
    counts = {"fdatasync": 0, "fsync": 0, "bytes_written": 0, "fallocate": 0,
              "fallocate_failed": 0}
    unfinished = {}
    with open(log, errors="replace") as f:
        for line in f:
            resumed = RESUMED_LINE.match(line)
            if resumed:
                call = unfinished.pop(resumed.group(1), None)
                if call is None:
                    continue
            else:
                m = SYSCALL_LINE.match(line)
                if not m:
                    continue  # signals, exits
                call = m.group(2), m.group(3)
                if line.rstrip().endswith("<unfinished ...>"):
                    unfinished[m.group(1)] = call
                    continue
            name, path = call
            returns = RETURN_VALUE.findall(line)
            ret = int(returns[-1]) if returns else -1
            if name in ("fdatasync", "fsync"):
                counts[name] += 1
            elif path != image:
                continue
            elif name == "fallocate":
                counts["fallocate"] += 1
                counts["fallocate_failed"] += ret < 0
            elif ret > 0:
                counts["bytes_written"] += ret
    counts["syncs"] = counts["fdatasync"] + counts["fsync"]
    return counts


def bench_seconds(output):
    """qemu-img bench's own time: the requests, without opening and closing."""
    m = re.search(r"Run completed in ([\d.]+) seconds", output)
    return float(m.group(1)) if m else None


def measure(ws, cell, cadence, interval, drivers, reps, scale, timing):
    """One row: every driver REPS times, alternating the order, then one counting run each."""
    count = request_count(cell, interval, scale)
    size_bytes = image_size_bytes(cell, count, ws.size_divisor)
    script = None
    if cell.tool == "qemu-io":
        script = os.path.join(ws.dir, "commands.txt")
        qemu_io_script(script, cell, count, interval, size_bytes)
    runs = {d: [] for d in drivers}
    for rep in range(reps):
        for driver in drivers if rep % 2 == 0 else drivers[::-1]:
            image = ws.run_image(cell, size_bytes)
            seconds, output, rss_kib = run_tool(
                command(cell, driver, image, count, interval), script)
            ws.release(cell, image)
            runs[driver].append({"process_s": seconds, "bench_s": bench_seconds(output),
                                 "rss_kib": rss_kib})
    counted = {}
    for driver in drivers:
        image = ws.run_image(cell, size_bytes)
        log = os.path.join(ws.dir, "strace.log")
        cmd = command(cell, driver, image, count, interval)
        run_tool(strace_command(log) + cmd, script)
        counted[driver] = dict(trace_counts(log, image), cmd=shlex.join(cmd))
        os.unlink(log)
        ws.release(cell, image)
    if script:
        os.unlink(script)

    def seconds(run):
        if timing == "run" and run["bench_s"] is not None:
            return run["bench_s"]
        return run["process_s"]

    row = {"medium": ws.medium, "cell": cell.name, "what": cell.what, "cadence": cadence,
           "flush_interval": interval, "requests": count, "request_bytes": cell.request_bytes,
           "depth": cell.depth, "stride_bytes": cell.stride_bytes, "image_bytes": size_bytes,
           "drivers": {}, "ratios": {}}
    for driver in drivers:
        times = [seconds(r) for r in runs[driver]]
        row["drivers"][driver] = {
            "runs": runs[driver], "seconds": times, "median_s": bl.median(times),
            "peak_rss_kib": max(r["rss_kib"] for r in runs[driver]), **counted[driver]}
    for mode in drivers[1:]:
        pairs = [q / b for q, b in zip(row["drivers"]["qcow2"]["seconds"],
                                       row["drivers"][mode]["seconds"])]
        row["ratios"][mode] = {"pairs": pairs, "median": bl.median(pairs),
                               "lowest": min(pairs), "highest": max(pairs)}
    return row


def print_table(medium, rows, drivers, reps, timing):
    modes = drivers[1:]
    what = "qemu-img bench's own time" if timing == "run" else "whole process runs"
    pairs = f"{reps} pair" + ("s" if reps != 1 else "")
    print(f"\n{medium} ({MEDIA[medium]}): {what}; ratio = qcow2 s / qcow2b s (above 1.00 = "
          f"qcow2b faster), median of {pairs} (lowest-highest); counts per driver: "
          + "/".join(drivers))
    head = (["cell", "guest flush", "qcow2 s"] + [f"{m} x" for m in modes]
            + ["host syncs", "MiB written", "fallocates", "peak RSS MiB"])
    table = [head]
    for row in rows:
        d = row["drivers"]
        line = [row["cell"], row["cadence"], f"{d['qcow2']['median_s']:.3f}"]
        for mode in modes:
            r = row["ratios"][mode]
            line.append(f"{r['median']:.2f} ({r['lowest']:.2f}-{r['highest']:.2f})")
        line.append("/".join(str(d[k]["syncs"]) for k in drivers))
        line.append("/".join(f"{d[k]['bytes_written'] / MIB:.1f}" for k in drivers))
        line.append("/".join(str(d[k]["fallocate"]) for k in drivers))
        line.append("/".join(f"{d[k]['peak_rss_kib'] / KIB:.0f}" for k in drivers))
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    for line in table:
        cols = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        print("  ".join(cols).rstrip())


def target_ratio(driver):
    """The ratio a driver is held to: its barrier mode's (ordered when its options name none)."""
    m = re.search(r"(?:^|,)barrier=(\w+)", DRIVERS[driver])
    return TARGET_RATIO.get(m.group(1) if m else "ordered", 1.0)


def extra_driver(text):
    """--driver NAME=OPTIONS: a qcow2b configuration beside the built-in ones."""
    name, sep, options = text.partition("=")
    if not sep or not re.fullmatch(r"[\w-]+", name) or not options:
        raise SystemExit(f"--driver wants NAME=OPTIONS (like ordered16=barrier=ordered,"
                         f"buffer-size=16M), not {text!r}")
    if name in DRIVERS:
        raise SystemExit(f"--driver {name}: that name is taken ({', '.join(DRIVERS)})")
    if "driver=" in options or "file." in options:
        raise SystemExit(f"--driver {name}: give qcow2b's options only (the driver and "
                         "file.filename are set by the benchmark)")
    DRIVERS[name] = f"driver=qcow2b,{options}"
    return name


def bin_dir(text):
    """--bin NAME=DIR: driver NAME runs the qemu-img and qemu-io of DIR."""
    name, sep, path = text.partition("=")
    if not sep or name not in DRIVERS or name == "qcow2":
        raise SystemExit(f"--bin wants NAME=DIR with NAME a qcow2b driver of this run, not {text!r}")
    for tool in ("qemu-img", "qemu-io"):
        if not os.access(os.path.join(path, tool), os.X_OK):
            raise SystemExit(f"--bin {name}: no {tool} in {path}")
    BIN_DIRS[name] = os.path.abspath(path)


def print_summary(rows, modes):
    for mode in modes:
        target = target_ratio(mode)
        below = [r for r in rows if r["ratios"][mode]["median"] < target]
        listed = ", ".join(f"{r['cell']} {r['cadence']} ({r['ratios'][mode]['median']:.3f})"
                           for r in below) or "none"
        print(f"{mode}: {len(rows) - len(below)} of {len(rows)} cells at >= {target:.2f}x; "
              f"below: {listed}")
    more = [f"{mode} {r['cell']} ({r['drivers'][mode]['syncs']} vs "
            f"{r['drivers']['qcow2']['syncs']})"
            for r in rows if r["flush_interval"] == 0 for mode in modes
            if r["drivers"][mode]["syncs"] > r["drivers"]["qcow2"]["syncs"]]
    print("more host syncs than qcow2 without a guest flush: " + (", ".join(more) or "none"))


def choose(value, known, what):
    names = [n for n in value.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"unknown {what}: {','.join(unknown) or '(none)'}; "
                         f"known: {','.join(known)}")
    return names


def parse_args():
    cell_list = "\n".join(f"  {c.name:<18} {c.what}" for c in CELLS)
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"cells (--cells):\n{cell_list}\n\nThe module docstring has the counts and "
               "the method.")
    ap.add_argument("--reps", type=int, help="paired repetitions per cell (default 3; smoke 1)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the request counts")
    ap.add_argument("--media", help="tmpfs,disk (default both; smoke: tmpfs)")
    ap.add_argument("--cells", default=",".join(c.name for c in CELLS),
                    help="comma-separated cell names (default all)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="qcow2b barrier modes to run against qcow2 (default ordered,flush,txg)")
    ap.add_argument("--driver", action="append", default=[], metavar="NAME=OPTIONS",
                    help="another qcow2b configuration to run beside the others (repeatable)")
    ap.add_argument("--bin", action="append", default=[], metavar="NAME=DIR",
                    help="driver NAME (a --driver) runs the qemu-img and qemu-io in DIR, another "
                         "build of the same tree (repeatable)")
    ap.add_argument("--timing", choices=["process", "run"], default="process",
                    help="time a run as the whole process (default) or as qemu-img bench "
                         "reports it")
    ap.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    ap.add_argument("--smoke", action="store_true",
                    help="1 repetition, counts / 64, images / 16, tmpfs: proves it runs")
    args = ap.parse_args()
    args.reps = args.reps or (1 if args.smoke else 3)
    if args.reps < 1 or args.scale <= 0:
        raise SystemExit("--reps and --scale must be positive")
    args.media = choose(args.media or ("tmpfs" if args.smoke else "tmpfs,disk"), MEDIA, "media")
    wanted = choose(args.cells, [c.name for c in CELLS], "cells")
    args.cells = [c for c in CELLS if c.name in wanted]
    args.drivers = ["qcow2"] + [m for m in MODES if m in choose(args.modes, MODES, "modes")]
    args.drivers += [extra_driver(d) for d in args.driver]
    for b in args.bin:
        bin_dir(b)
    return args


def main():
    args = parse_args()
    bl.require_tools()
    if shutil.which("strace") is None:
        raise SystemExit("strace is needed for the host sync counts")
    scale = args.scale * (SMOKE_SCALE if args.smoke else 1)
    size_divisor = SMOKE_SIZE_DIVISOR if args.smoke else 1
    started = time.monotonic()
    results = {"reps": args.reps, "scale": scale, "image_size_divisor": size_divisor,
               "timing": args.timing, "drivers": {d: DRIVERS[d] for d in args.drivers},
               "bin_dirs": BIN_DIRS,
               "rows": []}
    for medium in args.media:
        ws = Workspace(medium, size_divisor)
        rows = []
        try:
            for cell in args.cells:
                for cadence, interval in cadences(cell):
                    row = measure(ws, cell, cadence, interval, args.drivers, args.reps, scale,
                                  args.timing)
                    rows.append(row)
                    times = ", ".join(f"{d} {row['drivers'][d]['median_s']:.3f} s"
                                      for d in args.drivers)
                    print(f"[{medium}] {cell.name} {cadence}: {times}", file=sys.stderr)
        except ToolFailed as e:
            raise SystemExit(f"a tool failed, stopping:\n{e}")
        finally:
            ws.remove()
        print_table(medium, rows, args.drivers, args.reps, args.timing)
        print_summary(rows, args.drivers[1:])
        results["rows"] += rows
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    print(f"\ndone in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
