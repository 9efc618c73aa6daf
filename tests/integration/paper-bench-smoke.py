"""The paper benchmark in its quickest form (bench/paper-bench.py --smoke: 16 guest
operations per workload, one repetition, without and with the flush-latency model) runs and
reports every configuration on every workload, and the host fdatasync counts are what each
configuration promises (not timed: counts and the shape of the output only):

- QEMU's qcow2: 3 per dsync append (2 for the flush after an allocating write, 1 for the
  commit block's), 1 per overwrite;
- QEMU-HostB (qcow2b flush and ordered): one per guest flush, so 2 per append, 1 per
  overwrite, plus a small constant per run (the zero reserve, close);
- QEMU-AllB barrierfs*: one per guest operation (its single flush);
- QEMU-AllB ordered: one per epoch (3 per append: data, log, commit);
- QEMU-AllB txg: two per guest flush (the group's commit), barriers none;
- the latency model charges each fdatasync: QEMU's p50 for a dd append is at least three
  times the modelled cost."""

import json
import os
import subprocess
import sys

from qemu_tools import ROOT, Failure, Scratch, main

N = 16
LATENCY_MS = 2.0
CONSTANT = 4  # fdatasyncs per run besides the guest's own: open, reserve growth, close

PROMISES = {
    # (workload kind, config) -> fdatasync per guest operation, at most (before the constant)
    ("append", "qemu"): 3, ("append", "qemu-lazy"): 3, ("append", "hostb-flush"): 2,
    ("append", "hostb"): 2, ("append", "allb"): 3, ("append", "allb-bfs"): 1,
    ("overwrite", "qemu"): 1, ("overwrite", "qemu-lazy"): 1, ("overwrite", "hostb-flush"): 1,
    ("overwrite", "hostb"): 1, ("overwrite", "allb"): 1, ("overwrite", "allb-bfs"): 1,
    ("varmail", "hostb-flush"): 2, ("varmail", "hostb"): 2, ("varmail", "allb-bfs"): 1,
    ("varmail", "allb"): 3,
    ("append", "allb-txg"): 2, ("overwrite", "allb-txg"): 2, ("varmail", "allb-txg"): 2,
    # No fdatasync at all: flushes dropped (cache=unsafe), or barriers inside transaction
    # groups that commit at the close (the constant).
    ("append", "qemu-unsafe"): 0, ("overwrite", "qemu-unsafe"): 0, ("varmail", "qemu-unsafe"): 0,
    ("append", "allb-rd-txg"): 0, ("overwrite", "allb-rd-txg"): 0, ("varmail", "allb-rd-txg"): 0,
    ("append", "gfb-txg"): 0, ("overwrite", "gfb-txg"): 0, ("varmail", "gfb-txg"): 0,
}


def body():
    with Scratch() as s:
        out = s.path("results")
        p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "paper-bench.py"),
                            "--smoke", "-n", str(N), "--latency-ms", str(LATENCY_MS),
                            "--no-charts", "--out", out],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
        text = p.stdout.decode(errors="replace")
        if p.returncode != 0:
            raise Failure(f"paper-bench.py --smoke exited {p.returncode}:\n{text[-3000:]}")
        with open(os.path.join(out, "paper-bench.json")) as f:
            data = json.load(f)
        with open(os.path.join(out, "paper-bench.md")) as f:
            md = f.read()
        configs = [c["label"] for c in data["configs"]]
        workloads = data["workloads"]
        if len(configs) != 12 or len(workloads) != 5:
            raise Failure(f"expected 12 configurations x 5 workloads: {configs} {workloads}")
        for section in ("Measured on this machine's disk", "Flush-latency MODEL", "## Targets"):
            if section not in md:
                raise Failure(f"the report lacks the section {section!r}:\n{md}")
        cells = {(c["model"], c["workload"], c["config"]): c for c in data["cells"]}
        for model in ("measured", "model"):
            for w in workloads:
                for c in data["configs"]:
                    cell = cells.get((model, w, c["key"]))
                    if not cell:
                        raise Failure(f"no cell for {model} / {w} / {c['label']}")
                    row = f"| {w} | {c['label']} |"
                    if md.count(row) != 2:
                        raise Failure(f"the table row {row!r} is not in both tables")
                    for field in ("ops_per_s", "p50_ms", "p99_ms", "ratio"):
                        if cell[field] is None or cell[field] <= 0:
                            raise Failure(f"{model} / {w} / {c['label']}: {field} = "
                                          f"{cell[field]}")
        problems = []
        for (kind, key), promise in PROMISES.items():
            for w in workloads:
                if kind not in w:
                    continue
                got = cells["measured", w, key]["syncs_per_op"]
                if got > promise + CONSTANT / N:
                    problems.append(f"{w} / {key}: {got:.2f} fdatasync per operation, "
                                    f"promised at most {promise} + {CONSTANT}/{N}")
        base = cells["measured", "dd append", "qemu"]["syncs_per_op"]
        if base < 2.9:
            problems.append(f"QEMU's qcow2 dd append: {base:.2f} fdatasync per operation, "
                            f"expected 3 (the model lost its allocating flushes?)")
        p50 = cells["model", "dd append", "qemu"]["p50_ms"]
        if p50 < 3 * LATENCY_MS:
            problems.append(f"latency model: QEMU dd append p50 {p50:.2f} ms < 3 x "
                            f"{LATENCY_MS} ms (the filter does not charge the fdatasyncs?)")
        if problems:
            raise Failure("\n".join(problems) + "\n" + md)


main(body)
