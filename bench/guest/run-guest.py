#!/usr/bin/env python3
"""The paper benchmark's real guest: a Debian 6.1 kernel with ext4 on a virtio-blk disk,
booted by the built qemu-system-x86_64, running fio random 4 KiB writes on the fresh bare disk
(no fsync until the end), GNU dd oflag=dsync, two fio jobs on ext4 and SQLite
autocommit inserts in journal_mode DELETE and WAL (bench/guest/init.sh), once per host configuration: QEMU's qcow2, qcow2 lazy_refcounts=on,
qcow2 cache=unsafe (no flush reaches the host: the ceiling, with no safety), QEMU-HostB
(qcow2b barrier=flush and barrier=ordered), and QEMU-AllB for a stock guest: its flushes
taken as ordering points by the device (virtio-blk guest-flush=barrier) on barrier=ordered
and barrier=txg.

Host fdatasync counts: the QEMU process runs under strace (only fdatasync and fsync are
traced, through seccomp, so other system calls run at full speed), with a timestamp per
call; the guest prints a marker on the serial console before and after each test, this
script timestamps the markers, and the calls between a test's markers are that test's.
For qcow2b the node's own counter (QMP query-blockstats, host-fdatasyncs) is read at each marker
as well, as a cross-check.

TCG by default (`--accel kvm` to try KVM, with `-cpu host`). On the build machine (a VM on
an AMD EPYC host, nested) KVM does not boot: with `-cpu max` or `host` QEMU aborts setting
MSR 0x10a (IA32_ARCH_CAPABILITIES), and with `host,arch-capabilities=off` the guest prints
nothing in 40 s. Builds the guest first if needed (build-guest.sh).

Usage: run-guest.py [--fresh N] [--dd N] [--seq N] [--rand N] [--sqlite N] [--configs a,b]
                    [--accel tcg|kvm] [--latency-ms MS]
                    [--json OUT]"""

import argparse
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import benchlib as bl  # noqa: E402

CONFIGS = [
    # key, image creation options, -drive options, virtio-blk-pci options
    ("qemu", "", "driver=qcow2,cache=writeback", ""),
    ("qemu-lazy", "lazy_refcounts=on", "driver=qcow2,cache=writeback", ""),
    ("qemu-unsafe", "", "driver=qcow2,cache=unsafe", ""),
    ("hostb-flush", "", "driver=qcow2b,barrier=flush,cache=writeback", ""),
    ("hostb", "", "driver=qcow2b,barrier=ordered,cache=writeback", ""),
    ("gfb", "", "driver=qcow2b,barrier=ordered,cache=writeback", "guest-flush=barrier"),
    ("gfb-txg", "", "driver=qcow2b,barrier=txg,cache=writeback", "guest-flush=barrier"),
]
GUEST = os.path.join(bl.BUILD_ROOT, "guest")


def file_options(img, latency_ms):
    """The drive's file: the image, or the image under the flush-latency model (the
    qcow2b-synclat filter: every host fdatasync costs `latency_ms` more)."""
    if latency_ms is None:
        return f"file.filename={img}"
    return (f"file.driver=qcow2b-synclat,file.flush-latency-us={round(latency_ms * 1000)},"
            f"file.file.filename={img}")


def boot(config, args, work):
    key, create, drive, device = config
    img = os.path.join(work, f"{key}.qcow2")
    bl.create_image(img, 2 << 30, create)
    qmp_path = os.path.join(work, "qmp.sock")
    trace = os.path.join(work, f"strace.{key}")
    cmdline = (f"console=ttyS0 quiet panic=-1 bench.fresh={args.fresh} bench.dd={args.dd} "
               f"bench.seq={args.seq} "
               f"bench.rand={args.rand} bench.sqlite={args.sqlite}")
    cpu = "max" if args.accel == "tcg" else "host"
    qemu = [bl.QEMU_SYSTEM, "-M", "q35", "-accel", args.accel, "-cpu", cpu, "-m", "1024",
            "-smp", "1", "-nodefaults", "-display", "none", "-no-reboot",
            "-L", os.path.join(GUEST, "firmware"),
            "-kernel", os.path.join(GUEST, "vmlinuz"),
            "-initrd", os.path.join(GUEST, "initrd.cpio"), "-append", cmdline,
            "-serial", "stdio", "-qmp", f"unix:{qmp_path},server=on,wait=off",
            "-drive", f"if=none,id=d0,{drive},{file_options(img, args.latency_ms)}",
            "-device", ",".join(filter(None, ["virtio-blk-pci,drive=d0", device]))]
    cmd = ["strace", "-f", "--seccomp-bpf", "-ttt", "-e", "trace=fdatasync,fsync",
           "-o", trace] + qemu
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL)
    qmp = None
    markers = []          # (time, kind, name, qcow2b counter)
    lines = []
    buf = b""
    deadline = time.monotonic() + args.timeout
    while True:
        if time.monotonic() > deadline:
            p.kill()
            raise RuntimeError(f"{key}: guest did not finish in {args.timeout} s:\n"
                               + "\n".join(lines[-30:]))
        r, _, _ = select.select([p.stdout], [], [], 1)
        if not r:
            continue
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            break
        now = time.time()
        buf += chunk
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            line = raw.decode(errors="replace").rstrip("\r")
            lines.append(line)
            m = re.match(r"BENCH-(BEGIN|END) (.*)", line)
            if m:
                if qmp is None:
                    qmp = bl.Qmp(qmp_path)
                markers.append((now, m.group(1), m.group(2).strip(), qmp.host_fdatasyncs()))
    p.wait()
    if not any(line.startswith("BENCH-DONE") for line in lines):
        raise RuntimeError(f"{key}: the guest stopped early:\n" + "\n".join(lines[-40:]))
    calls = []
    with open(trace) as f:
        for line in f:
            m = re.match(r"\d+\s+(\d+\.\d+)\s+(fdatasync|fsync)\(", line)
            if m:
                calls.append(float(m.group(1)))
    kernel = next((line.split()[1] for line in lines if line.startswith("BENCH-KERNEL")), "?")
    return markers, calls, lines, kernel


def summary_of(output):
    """The figures of a test's output: dd's time and rate, fio's IOPS, bandwidth and mean
    latency."""
    m = re.search(r"copied, ([\d.]+ s, [\d.]+ [kMG]?B/s)", output)
    if m:
        return m.group(1)
    m = re.search(r"sqlite rows: (\d+)", output)
    if m:
        return f"{m.group(1)} rows"
    m = re.search(r"write: (IOPS=[^,]+, BW=[^ ]+)", output)
    if m:
        lat = re.search(r"lat \((usec|msec|nsec)\): min=[^,]+, max=[^,]+, avg=([\d.]+)", output)
        return m.group(1) + (f", mean latency {lat.group(2)} {lat.group(1)}" if lat else "")
    return output[:120]


def tests_of(markers, calls, lines):
    out = []
    begins = {name: (t, c) for t, kind, name, c in markers if kind == "BEGIN"}
    for t_end, kind, name, c_end in markers:
        if kind != "END" or name not in begins:
            continue
        t_begin, c_begin = begins[name]
        syncs = sum(1 for t in calls if t_begin <= t <= t_end)
        # The test's own output: between its markers on the console.
        i = lines.index(f"BENCH-BEGIN {name}")
        j = lines.index(f"BENCH-END {name}")
        result = summary_of(" ".join(x.strip() for x in lines[i + 1:j] if x.strip()))
        ops = int(name.split()[1]) if len(name.split()) > 1 else None
        out.append({"test": name, "syncs": syncs, "ops": ops,
                    "syncs_per_op": syncs / ops if ops else None,
                    "counter": (c_end - c_begin) if c_begin is not None else None,
                    "result": result, "seconds": round(t_end - t_begin - 1, 2)})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fresh", type=int, default=2000,
                    help="fio random 4 KiB writes on the fresh disk (O_DIRECT, one fsync at "
                    "the end)")
    ap.add_argument("--dd", type=int, default=200, help="dd count (64 KiB dsync writes)")
    ap.add_argument("--seq", type=int, default=128, help="fio sequential 64 KiB + fdatasync")
    ap.add_argument("--rand", type=int, default=256, help="fio random 4 KiB + fsync")
    ap.add_argument("--sqlite", type=int, default=200,
                    help="SQLite autocommit inserts (journal_mode DELETE, then WAL)")
    ap.add_argument("--configs", default=",".join(c[0] for c in CONFIGS))
    ap.add_argument("--accel", default="tcg")
    ap.add_argument("--latency-ms", type=float,
                    help="run under the flush-latency model (qcow2b-synclat): every host "
                    "fdatasync costs this much more")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--json")
    args = ap.parse_args()
    bl.require_tools(bl.QEMU_IMG, bl.QEMU_SYSTEM)
    if not os.path.exists(os.path.join(GUEST, "initrd.cpio")):
        subprocess.run(["bash", os.path.join(HERE, "build-guest.sh")], check=True)
    wanted = args.configs.split(",")
    rows = []
    kernel = "?"
    work = tempfile.mkdtemp(prefix="guest.", dir=bl.BUILD_ROOT)
    try:
        for config in [c for c in CONFIGS if c[0] in wanted]:
            started = time.monotonic()
            markers, calls, lines, kernel = boot(config, args, work)
            for row in tests_of(markers, calls, lines):
                row["config"] = config[0]
                rows.append(row)
                per_op = "-" if row["syncs_per_op"] is None else f"{row['syncs_per_op']:.2f}"
                print(f"{config[0]:<12} {row['test']:<14} host fdatasync {row['syncs']:>5} "
                      f"({per_op} per op; qcow2b counter {row['counter']})  {row['result']}",
                      flush=True)
            print(f"{config[0]}: {time.monotonic() - started:.0f} s", flush=True)
            os.unlink(os.path.join(work, f"{config[0]}.qcow2"))
    finally:
        subprocess.run(["rm", "-rf", work])
    result = {"accel": args.accel.upper(), "kernel": kernel, "rows": rows,
              "latency_ms": args.latency_ms}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


main()
