#!/usr/bin/env python3
"""The paper's evaluation on this machine: Kim, Oh and Won's Figures 3 to 5 (varmail,
Mobibench, GNU dd) for QEMU, QEMU-HostB and QEMU-AllB, every configuration side by side in
one run, as a table and as bar charts.

Configurations (one built QEMU 7.2, the same image layout for all):
  QEMU                    QEMU's qcow2; a stock guest (ext4, flushes)
  QEMU lazy_refcounts=on  the same with the image option users turn on today
  QEMU-HostB flush        qcow2b barrier=flush: its ordering points are fdatasyncs; stock guest
  QEMU-HostB ordered      qcow2b barrier=ordered (the default): epochs in user space; stock guest
  QEMU-AllB ordered       qcow2b barrier=ordered; a BarrierFS guest (barrier writes, one flush
                          per fsync): what a stock Linux host really gets
  QEMU-AllB barrierfs*    qcow2b barrier=barrierfs with the injected primitive; BarrierFS guest.
                          * the model of a BarrierFS host (the paper's AllB): on this kernel
                          the injected primitive orders nothing, so it is a bound, not a mode
                          for data
  QEMU-AllB txg           qcow2b barrier=txg (transaction groups); BarrierFS guest: barriers
                          cost nothing, each guest flush commits the group (two fdatasyncs)

Workloads (bench/fsmodel.py documents the requests of each, for both guests): dd append and
overwrite (64 KiB x N, oflag=dsync), Mobibench append and overwrite (64 KiB records with
fdatasync), varmail (create/append/fsync/read/delete on many small files). Each is replayed
at the block level through the built qemu-io (-t writeback, one process per run, requests
one after another as the guest's fsync path issues them); a "guest operation" is one fsync
with the requests before it, and its latency is timed from the first request to the last
completion.

For every cell: throughput (MiB/s for dd and Mobibench, operations/s for varmail), host
fdatasync per guest operation (strace, in one extra untimed run), p50 and p99 latency of a
guest operation, and the ratio to QEMU (median over repetitions of the paired ratio: the
configurations of one repetition run back to back in a rotating order, so the slow drift of
a shared machine cancels).

The flush-latency model (--latency-ms, default 2 ms in the quick and full runs): the
qcow2b-synclat filter between the format driver and the file makes every host fdatasync cost
that much more, for every configuration alike (a SATA SSD's cache flush, as on the paper's
Samsung 850 Pro). Its numbers are a model and labelled so.

The real guest (--guest): bench/guest/run-guest.py boots a Debian kernel with ext4 under
the built qemu-system-x86_64 (TCG) and runs dd oflag=dsync and fio jobs, for QEMU and
QEMU-HostB (stock guests send no barriers); its table is added to the report.

Output: results/paper-bench.md (table, machine, targets), results/paper-bench.json (every
measurement), results/fig3-varmail.png, fig4-mobibench.png, fig5-dd.png.

Usage: paper-bench.py [--quick | --full | --smoke] [-n N] [--reps R] [--latency-ms MS]
                      [--model off|on|both] [--guest] [--out DIR] [--no-charts]"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
import fsmodel  # noqa: E402

CONFIGS = [
    # key, label, what the guest sends (fsmodel.GUESTS), image creation options, driver options
    ("qemu", "QEMU", "stock", "", "driver=qcow2"),
    ("qemu-lazy", "QEMU lazy_refcounts=on", "stock", "lazy_refcounts=on", "driver=qcow2"),
    ("qemu-unsafe", "QEMU cache=unsafe (no safety: the ceiling)", "stock", "",
     "driver=qcow2,cache.no-flush=on"),
    ("hostb-flush", "QEMU-HostB flush", "stock", "", "driver=qcow2b,barrier=flush"),
    ("hostb", "QEMU-HostB ordered", "stock", "", "driver=qcow2b,barrier=ordered"),
    ("allb", "QEMU-AllB ordered, durable fsync", "barrierfs", "", "driver=qcow2b,barrier=ordered"),
    ("allb-bfs", "QEMU-AllB barrierfs*, durable fsync", "barrierfs", "",
     "driver=qcow2b,barrier=barrierfs,x-barrierfs-inject=on"),
    ("allb-txg", "QEMU-AllB txg, durable fsync", "barrierfs", "", "driver=qcow2b,barrier=txg"),
    ("allb-rd", "QEMU-AllB ordered, relaxed durability", "barrierfs-relaxed", "",
     "driver=qcow2b,barrier=ordered"),
    ("allb-rd-txg", "QEMU-AllB txg, relaxed durability", "barrierfs-relaxed", "",
     "driver=qcow2b,barrier=txg"),
    ("gfb", "QEMU-AllB ordered, stock guest, guest-flush=barrier", "stock-barrier", "",
     "driver=qcow2b,barrier=ordered"),
    ("gfb-txg", "QEMU-AllB txg, stock guest, guest-flush=barrier", "stock-barrier", "",
     "driver=qcow2b,barrier=txg"),
]
# The real guest's configurations (bench/guest/run-guest.py) use the same keys.
LABEL = {c[0]: c[1] for c in CONFIGS}

PRESETS = {
    # name: (N guest operations per workload, repetitions, real-guest sizes)
    "smoke": (8, 1, "--fresh 0 --dd 16 --seq 16 --rand 16 --sqlite 16"),
    "quick": (200, 3, "--fresh 0 --dd 200 --seq 128 --rand 256 --sqlite 200"),
    "full": (2000, 5, "--fresh 0 --dd 2000 --seq 1024 --rand 2048 --sqlite 2000"),
}

FIGURES = [
    ("fig3-varmail.png", "Figure 3: varmail", ["varmail"]),
    ("fig4-mobibench.png", "Figure 4: Mobibench", ["Mobibench append", "Mobibench overwrite"]),
    ("fig5-dd.png", "Figure 5: GNU dd", ["dd append", "dd overwrite"]),
]


def prepare_templates(work, workload, n):
    """The workload's groups for both guests, and a prepared image (mkfs and the files that
    exist before the timed part) per image creation option, written through QEMU's qcow2."""
    by_guest = {}
    for guest in {c[2] for c in CONFIGS}:
        prepare, by_guest[guest] = fsmodel.requests_for(guest, workload, n)
    templates = {}
    for opts in sorted({c[3] for c in CONFIGS}):
        path = os.path.join(work, f"template{len(templates)}.qcow2")
        bl.create_image(path, fsmodel.DISK_BYTES, opts)
        cmds = []
        for c in fsmodel.qemu_io_commands(prepare, pattern=0x11):
            cmds += ["-c", c]
        p = subprocess.run([bl.QEMU_IO, "-t", "writeback", "-f", "qcow2"] + cmds + [path],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = p.stdout.decode(errors="replace")
        if p.returncode != 0 or bl.output_errors(out):
            raise SystemExit(f"preparing {workload}: {out[-2000:]}")
        templates[opts] = path
    return by_guest, templates


def image_opts(driver, img, latency_us):
    if latency_us is None:
        return f"{driver},file.filename={img}"
    return (f"{driver},file.driver=qcow2b-synclat,file.flush-latency-us={latency_us},"
            f"file.file.filename={img}")


def run_cell(work, template, config, groups, latency_us, trace=False):
    """One run: a copy of the prepared image, one qemu-io process, every group timed.
    Returns (group latencies in seconds, host fdatasyncs or None)."""
    key, _, _, _, driver = config
    img = os.path.join(work, "run.qcow2")
    subprocess.run(["cp", "--sparse=always", template, img], check=True)
    # The copy's pages must not be written back by the run's first fdatasync.
    fd = os.open(img, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    log = os.path.join(work, "strace.log") if trace else None
    session = bl.QemuIoSession(["-t", "writeback", "--image-opts",
                                image_opts(driver, img, latency_us)], trace_log=log)
    times = [session.run(fsmodel.qemu_io_commands(g)) for g in groups]
    status, out = session.close()
    errors = bl.output_errors(out)
    if status != 0 or errors:
        raise SystemExit(f"{key}: qemu-io exit {status}: {errors[:5] or out[-2000:]}")
    check = subprocess.run([bl.QEMU_IMG, "check", "-q", "-f", "qcow2", img],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if check.returncode != 0:  # a clean close leaves no leak either (qcow2b's reserve too)
        raise SystemExit(f"{key}: qemu-img check exit {check.returncode}: {check.stdout!r}")
    os.unlink(img)
    return times, (bl.strace_syncs(log) if trace else None)


def run_workloads(args, work, models, log):
    """Every workload x model x repetition x configuration. Returns the results dict."""
    results = {"models": {}, "syncs": {}}
    for workload in args.workloads:
        groups, templates = prepare_templates(work, workload, args.n)
        results["syncs"][workload] = {}
        for config in CONFIGS:
            _, syncs = run_cell(work, templates[config[3]], config, groups[config[2]], None,
                                trace=True)
            results["syncs"][workload][config[0]] = syncs / len(groups[config[2]])
        for model, latency_us in models:
            cells = results["models"].setdefault(model, {}).setdefault(workload, {})
            for rep in range(args.reps):
                k = rep % len(CONFIGS)
                for config in CONFIGS[k:] + CONFIGS[:k]:
                    times, _ = run_cell(work, templates[config[3]], config, groups[config[2]],
                                        latency_us)
                    cell = cells.setdefault(config[0], {"runs": []})
                    cell["runs"].append(times)
            log(f"{workload:<20} {model:<6} done")
        for path in templates.values():
            os.unlink(path)
    return results


def summarise(results):
    """Throughput, latency percentiles and paired ratios for every cell."""
    table = {}
    for model, workloads in results["models"].items():
        for workload, cells in workloads.items():
            unit_bytes = fsmodel.WORKLOADS[workload][1]
            base_runs = cells["qemu"]["runs"]
            for key, cell in cells.items():
                thr = [len(t) / sum(t) for t in cell["runs"]]            # operations/s
                ratios = [len(t) / sum(t) / (len(b) / sum(b))
                          for t, b in zip(cell["runs"], base_runs)]
                lat = [x for t in cell["runs"] for x in t]
                ops = bl.median(thr)
                table[model, workload, key] = {
                    "ops_per_s": ops,
                    "mib_per_s": ops * unit_bytes / 2**20 if unit_bytes else None,
                    "p50_ms": bl.percentile(lat, 50) * 1e3,
                    "p99_ms": bl.percentile(lat, 99) * 1e3,
                    "ratio": bl.median(ratios),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "syncs_per_op": results["syncs"][workload][key],
                }
    return table


def machine():
    """CPU, cores, memory, kernel, and the disk under the build root."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    fs = subprocess.run(["df", "-T", bl.BUILD_ROOT], stdout=subprocess.PIPE,
                        text=True).stdout.splitlines()[-1].split()
    dev, fstype = fs[0], fs[1]
    disk = dev
    base = os.path.basename(os.path.realpath(dev)).rstrip("0123456789")
    for name in (base, base.rstrip("p")):
        sysdir = f"/sys/block/{name}"
        if os.path.isdir(sysdir):
            rot = open(f"{sysdir}/queue/rotational").read().strip()
            model = ""
            if os.path.exists(f"{sysdir}/device/model"):
                model = open(f"{sysdir}/device/model").read().strip() + " "
            virt = "virtio-blk " if name.startswith("vd") else ""
            disk = f"{virt}{name} {model}({'rotational' if rot == '1' else 'non-rotational'})"
            break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "disk": f"{disk.strip()}, {fstype}",
        "fdatasync_us": fdatasync_probe(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def fdatasync_probe(count=50):
    """Median time of a 4 KiB write + fdatasync in the build root, in microseconds."""
    fd, path = tempfile.mkstemp(dir=bl.BUILD_ROOT)
    try:
        times = []
        for i in range(count):
            os.pwrite(fd, b"x" * 4096, (i % 16) * 4096)
            t = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - t)
        return round(bl.median(times) * 1e6)
    finally:
        os.close(fd)
        os.unlink(path)


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(table, model, workloads):
    lines = ["| workload | configuration | MiB/s | ops/s | host fdatasync/op | p50 ms | p99 ms "
             "| ratio to QEMU |",
             "|---|---|---|---|---|---|---|---|"]
    for workload in workloads:
        for key, _, _, _, _ in CONFIGS:
            c = table.get((model, workload, key))
            if not c:
                continue
            lines.append(f"| {workload} | {LABEL[key]} | {fmt(c['mib_per_s'])} | "
                         f"{fmt(c['ops_per_s'], 0)} | {fmt(c['syncs_per_op'], 2)} | "
                         f"{fmt(c['p50_ms'], 2)} | {fmt(c['p99_ms'], 2)} | "
                         f"{fmt(c['ratio'], 2)} |")
    return "\n".join(lines)


def targets(table, models, workloads, guest):
    """Every target of the issue, with its figure, met or not."""
    out = []
    for model in models:
        for workload in workloads:
            # Ordering without durability at each fsync: the stock guest with
            # guest-flush=barrier, and the paper's BarrierFS guest with relaxed durability.
            for key in ("gfb-txg", "allb-rd-txg"):
                c = table.get((model, workload, key))
                if not c:
                    continue
                name = f"{LABEL[key]}, {workload}, {model}"
                if model != "measured":
                    out.append((f"{name}: >= 13x QEMU", f"{c['ratio']:.3f}x",
                                c["ratio"] >= 13))
                elif "overwrite" not in workload:
                    out.append((f"{name}: >= 3.9x QEMU", f"{c['ratio']:.3f}x",
                                c["ratio"] >= 3.9))
                else:
                    # An overwrite costs QEMU one fdatasync per fsync, cheap on this disk:
                    # the bound is the no-sync ceiling of the same run, not 3.9x.
                    u = table.get((model, workload, "qemu-unsafe"))
                    if u:
                        r = c["ops_per_s"] / u["ops_per_s"]
                        out.append((f"{name}: >= 0.9x of QEMU cache=unsafe (the ceiling: "
                                    f"{u['ratio']:.2f}x QEMU)", f"{r:.3f}x ({c['ratio']:.2f}x "
                                    "QEMU)", r >= 0.9))
        for workload in ("dd append", "Mobibench append"):
            c = table.get((model, workload, "hostb"))
            if c:
                out.append((f"HostB (ordered) >= 1.5x QEMU, {workload}, {model}",
                            f"{c['ratio']:.3f}x", c["ratio"] >= 1.5))
    if guest:
        rows = {(r.get("model", "measured"), r["config"], r["test"]): r
                for r in guest.get("rows", [])}
        for (model, config, test), row in rows.items():
            if config != "gfb-txg" or not row.get("ops"):
                continue
            v = row["syncs_per_op"]
            out.append((f"real guest, {test}, {model}: guest-flush=barrier (txg) host "
                        "fdatasync per guest op <= 0.02",
                        f"{fmt(v, 3)} ({row['syncs']} for {row['ops']})", v <= 0.02))
            unsafe = rows.get((model, "qemu-unsafe", test))
            qemu = rows.get((model, "qemu", test))
            if unsafe and qemu and row["seconds"] > 0:
                r = unsafe["seconds"] / row["seconds"]
                out.append((f"real guest, {test}, {model}: guest-flush=barrier (txg) >= 0.9x "
                            "of QEMU cache=unsafe (time of the test)",
                            f"{r:.2f}x ({qemu['seconds'] / row['seconds']:.2f}x QEMU)",
                            r >= 0.9))
        for row in guest.get("rows", []):
            if (row["config"] == "hostb" and row["test"].startswith("dd")
                    and row.get("model", "measured") == "measured"):
                v = row.get("syncs_per_op")
                out.append(("real guest: HostB (ordered) host fdatasync per guest dsync write "
                            "<= 2.0", f"{fmt(v, 3)} ({row['syncs']} for {row['ops']})",
                            v is not None and v <= 2.0))
    return out


def shown_argv(argv):
    """The command line as the report shows it: without the output folder (a local path)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            out.append(a)
    return out


def report(args, table, mach, models, guest, seconds):
    model_names = {
        "measured": "Measured on this machine's disk (no latency model)",
        "model": f"Flush-latency MODEL: every host fdatasync costs {args.latency_ms:g} ms more "
                 f"(qcow2b-synclat filter; a model of a SATA SSD's flush, not a measurement)",
    }
    parts = [f"# Paper benchmark: QEMU vs QEMU-HostB vs QEMU-AllB\n",
             f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB; "
             f"Linux {mach['kernel']}; disk: {mach['disk']} (4 KiB write + fdatasync: "
             f"{mach['fdatasync_us']} us); {mach['date']}.\n",
             f"Run: `python3 bench/paper-bench.py {' '.join(shown_argv(args.argv))}` "
             f"({seconds / 60:.0f} minutes): "
             f"N = {args.n} guest operations per workload (varmail: {max(1, args.n // 2)} "
             f"loops), {args.reps} repetition(s); throughput and latency are medians of "
             f"paired, alternating runs on a shared 2-core machine (other work on it "
             f"disturbs single runs by 10-20%); host fdatasync counts come from one extra "
             f"run under strace. A guest operation is one fsync (dd: one dsync write) with "
             f"the requests before it. The guest request sequences are in bench/fsmodel.py.\n",
             "\\* barrierfs\\*: qcow2b with the injected barrier primitive, the model of a "
             "BarrierFS host (the paper's AllB setup); on this kernel it orders nothing. "
             "QEMU-AllB ordered is what a stock Linux host gets.\n"]
    for model, _ in models:
        parts.append(f"## {model_names[model]}\n")
        parts.append(markdown_table(table, model, args.workloads) + "\n")
    if guest:
        parts.append(guest_markdown(guest))
    parts.append("## Targets\n")
    parts.append("| target | figure | met |\n|---|---|---|")
    for what, figure, met in targets(table, [m for m, _ in models], args.workloads, guest):
        parts.append(f"| {what} | {figure} | {'yes' if met else 'NO'} |")
    return "\n".join(parts) + "\n"


def guest_markdown(guest):
    lines = [f"## Real guest ({guest['accel']}, Debian kernel {guest['kernel']}, ext4, "
             f"virtio-blk, cache=writeback unless named)\n",
             "| flush cost | test | configuration | guest result | seconds | host fdatasync "
             "| per guest op |",
             "|---|---|---|---|---|---|---|"]
    for row in guest["rows"]:
        model = row.get("model", "measured")
        cost = ("this disk" if model == "measured"
                else f"MODEL +{row.get('latency_ms') or 0:g} ms")
        lines.append(f"| {cost} | {row['test']} | {LABEL.get(row['config'], row['config'])} | "
                     f"{row['result']} | {fmt(row.get('seconds'), 2)} | {row['syncs']} | "
                     f"{fmt(row.get('syncs_per_op'), 3)} |")
    lines.append("\nHost fdatasync counts from strace of the QEMU process (every thread); "
                 "under TCG the guest's own CPU cost dominates its throughput, so its ratios "
                 "are compressed and the sync counts are the figure to read.\n")
    return "\n".join(lines) + "\n"


def charts(out_dir, results_json):
    """Renders the PNGs with matplotlib (Debian's python3-matplotlib when this interpreter
    lacks it)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_charts.py")
    for python in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run([python, "-c", "import matplotlib"], stderr=subprocess.DEVNULL)
        if probe.returncode == 0:
            subprocess.run([python, script, results_json, out_dir], check=True)
            return True
    print("matplotlib not found (scripts/deps.sh installs python3-matplotlib): no charts")
    return False


def write_outputs(args, text, dump):
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "paper-bench.json")
    with open(json_path, "w") as f:
        json.dump(dump, f, indent=1)
    with open(os.path.join(args.out, "paper-bench.md"), "w") as f:
        f.write(text)
    if not args.no_charts:
        charts(args.out, json_path)
    print()
    print(text)


def rerender(args):
    """The table and charts of an earlier run, from its JSON (after a change of the report's
    format, say), into --out."""
    with open(args.from_json) as f:
        dump = json.load(f)
    table = {(c["model"], c["workload"], c["config"]):
             {k: v for k, v in c.items() if k not in ("model", "workload", "config")}
             for c in dump["cells"]}
    models = [(m, None) for m in ("measured", "model") if any(k[0] == m for k in table)]
    args.argv, args.n, args.reps = dump["argv"], dump["n"], dump["reps"]
    args.latency_ms, args.workloads = dump["latency_ms"], dump["workloads"]
    text = report(args, table, dump["machine"], models, dump["guest"], dump["seconds"])
    write_outputs(args, text, dump)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    preset = ap.add_mutually_exclusive_group()
    for name in PRESETS:
        preset.add_argument(f"--{name}", dest="preset", action="store_const", const=name)
    ap.add_argument("-n", type=int, help="guest operations per workload")
    ap.add_argument("--reps", type=int, help="repetitions (paired runs) per cell")
    ap.add_argument("--latency-ms", type=float, default=2.0,
                    help="the flush-latency model's extra cost per host fdatasync")
    ap.add_argument("--model", choices=["off", "on", "both"], default="both",
                    help="run without the latency model, with it, or both (default)")
    ap.add_argument("--workloads", nargs="+", default=list(fsmodel.WORKLOADS),
                    choices=list(fsmodel.WORKLOADS), metavar="WORKLOAD")
    ap.add_argument("--guest", action="store_true", help="also run the real guest (TCG)")
    ap.add_argument("--guest-args", default="",
                    help="arguments for bench/guest/run-guest.py (default: the preset's sizes)")
    ap.add_argument("--out", default=os.path.join(bl.ROOT, "results"))
    ap.add_argument("--no-charts", action="store_true")
    ap.add_argument("--from-json", metavar="JSON",
                    help="run nothing: write the table and charts of an earlier run's JSON")
    args = ap.parse_args()
    if args.from_json:
        return rerender(args)
    args.argv = sys.argv[1:]
    n, reps, guest_sizes = PRESETS[args.preset or "quick"]
    args.guest_args = args.guest_args or guest_sizes
    args.n = args.n or n
    args.reps = args.reps or reps
    bl.require_tools()
    if not bl.have_stdbuf():
        raise SystemExit("stdbuf (coreutils) not found")
    models = []
    if args.model in ("off", "both"):
        models.append(("measured", None))
    if args.model in ("on", "both"):
        models.append(("model", int(args.latency_ms * 1000)))
    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()

    def log(msg):
        print(f"[{time.monotonic() - started:6.0f} s] {msg}", flush=True)

    work = tempfile.mkdtemp(prefix="paper-bench.", dir=bl.BUILD_ROOT)
    try:
        results = run_workloads(args, work, models, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    guest = None
    if args.guest:
        # The real guest on this machine's disk, and under the latency model when the
        # block-level run has it: one guest run each, rows marked with their model.
        for model, latency_us in models:
            guest_json = os.path.join(args.out, f"guest-{model}.json")
            cmd = [sys.executable, os.path.join(bl.ROOT, "bench", "guest", "run-guest.py"),
                   "--json", guest_json] + args.guest_args.split()
            if latency_us is not None:
                cmd += ["--latency-ms", str(latency_us / 1000)]
            log("real guest: " + " ".join(cmd[1:]))
            if subprocess.run(cmd).returncode != 0:
                log(f"real guest ({model}) failed; its rows are left out")
                continue
            with open(guest_json) as f:
                run = json.load(f)
            for row in run["rows"]:
                row["model"], row["latency_ms"] = model, run.get("latency_ms")
            if guest is None:
                guest = run
            else:
                guest["rows"] += run["rows"]
    table = summarise(results)
    mach = machine()
    seconds = round(time.monotonic() - started)
    text = report(args, table, mach, models, guest, seconds)
    dump = {
        "machine": mach, "argv": args.argv, "n": args.n, "reps": args.reps,
        "latency_ms": args.latency_ms, "workloads": args.workloads,
        "configs": [{"key": c[0], "label": c[1], "guest": c[2], "create": c[3],
                     "driver": c[4]} for c in CONFIGS],
        "figures": FIGURES,
        "cells": [dict(model=m, workload=w, config=k, **v) for (m, w, k), v in table.items()],
        "raw": results, "guest": guest, "seconds": seconds,
    }
    write_outputs(args, text, dump)
    log(f"results in {args.out}")


main()
