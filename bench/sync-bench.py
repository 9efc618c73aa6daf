#!/usr/bin/env python3
"""The dd-like block workload of the barrier issue, side by side in one run: N x 64 KiB
writes, either each followed by a flush (what a guest's dsync writes send: "flush per
write"), or each a barrier write with one flush at the end (what a barrier-enabled guest
sends: "barrier per write"), appending (fresh clusters) or overwriting (allocated clusters).

Configurations: QEMU's qcow2, qcow2 with lazy_refcounts=on, and qcow2b in each barrier mode
(flush, ordered, barrierfs with the injected primitive: an upper bound for barrier hardware,
no real ordering on this kernel). Everything runs through the built qemu-io on a fresh image
in a folder of the build root (the machine's real disk; no latency model).

For each cell: throughput (median of REPS timed runs, without tracing), host fdatasync per
operation (one extra run under strace, which slows syscalls and so is never timed), and the
ratio to QEMU's qcow2 with a flush per write (the stock baseline).

Usage: sync-bench.py [N] [REPS]   (defaults 1000 and 3)"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import BUILD_ROOT, QEMU_IO, create_image, median, require_tools  # noqa: E402
from benchlib import strace_prefix, strace_syncs  # noqa: E402

CONFIGS = [
    # name, create options, qemu-io --image-opts driver part
    ("qcow2", "", "driver=qcow2"),
    ("qcow2 lazy_refcounts", "lazy_refcounts=on", "driver=qcow2"),
    ("qcow2b flush", "", "driver=qcow2b,barrier=flush"),
    ("qcow2b ordered", "", "driver=qcow2b,barrier=ordered"),
    ("qcow2b barrierfs*", "", "driver=qcow2b,barrier=barrierfs,x-barrierfs-inject=on"),
]
WORKLOADS = [
    # name, overwrite?, barrier writes?
    ("append, flush per write", False, False),
    ("append, barrier per write", False, True),
    ("overwrite, flush per write", True, False),
    ("overwrite, barrier per write", True, True),
]


def commands(n, barrier):
    cmds = []
    for i in range(n):
        if barrier:
            cmds += ["-c", f"write -q -B -P {i % 250 + 1} {i * 65536} 64k"]
        else:
            cmds += ["-c", f"write -q -P {i % 250 + 1} {i * 65536} 64k", "-c", "flush"]
    if barrier:
        cmds += ["-c", "flush"]
    return cmds


def prepare(work, opts, overwrite, n):
    img = os.path.join(work, "bench.qcow2")
    create_image(img, max(n * 64 + 1024, 1 << 20) * 1024, opts)
    if overwrite:
        subprocess.run([QEMU_IO, "-f", "qcow2", "-c", f"write -q -P 0x11 0 {n * 64}k", img],
                       check=True, stdout=subprocess.DEVNULL)
    return img


def run(work, config, workload, n, trace):
    name, opts, drv = config
    _, overwrite, barrier = workload
    img = prepare(work, opts, overwrite, n)
    # -t writeback: qemu-io defaults to writethrough, which adds a flush to every write.
    cmd = [QEMU_IO, "-t", "writeback", "--image-opts", f"{drv},file.filename={img}"]
    cmd += commands(n, barrier)
    if trace:
        log = os.path.join(work, "strace.log")
        cmd = strace_prefix(log) + cmd
    start = time.monotonic()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    elapsed = time.monotonic() - start
    out = p.stdout.decode(errors="replace")
    if p.returncode != 0 or "failed" in out or "rror" in out:
        return None, out.strip().splitlines()[-1] if out.strip() else f"exit {p.returncode}"
    if trace:
        return strace_syncs(log), None
    return elapsed, None


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    require_tools()
    work = tempfile.mkdtemp(prefix="sync-bench.", dir=BUILD_ROOT)
    try:
        results = {}
        for workload in WORKLOADS:
            for config in CONFIGS:
                syncs, err = run(work, config, workload, n, trace=True)
                times = []
                if err is None:
                    for _ in range(reps):
                        t, err = run(work, config, workload, n, trace=False)
                        if err:
                            break
                        times.append(t)
                results[workload[0], config[0]] = (syncs, median(times), err)
        print(f"\n{n} x 64 KiB writes per run; throughput is the median of {reps} runs; "
              f"ratio is against qcow2 with a flush per write (append or overwrite alike).")
        print(f"* barrierfs with the injected primitive: the bound for barrier hardware; "
              f"this kernel keeps no order for it.\n")
        print(f"{'workload':<30} {'configuration':<22} {'MiB/s':>8} {'fdatasync/op':>13} {'ratio':>7}")
        for workload in WORKLOADS:
            kind = workload[0].split(",")[0]
            base = results.get((f"{kind}, flush per write", "qcow2"))
            for config in CONFIGS:
                syncs, t, err = results[workload[0], config[0]]
                if err:
                    print(f"{workload[0]:<30} {config[0]:<22} {'-':>8} {'-':>13} {'-':>7}  ({err})")
                    continue
                mib = n * 64 / 1024 / t
                ratio = base[1] / t if base and base[1] else float("nan")
                print(f"{workload[0]:<30} {config[0]:<22} {mib:8.1f} {syncs / n:13.2f} {ratio:7.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


main()
