#!/usr/bin/env python3
"""Bar charts in the style of the paper's Figures 3-5 from bench/paper-bench.py's JSON:
throughput of every configuration per workload, the ratio to QEMU on each bar, one panel
measured and one under the flush-latency model (labelled as a model).

Usage: paper_charts.py RESULTS_JSON OUT_DIR   (run by paper-bench.py; needs matplotlib)"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {
    "qemu": "#7f7f7f",
    "qemu-lazy": "#c7c7c7",
    "hostb-flush": "#9ecae1",
    "hostb": "#3182bd",
    "allb": "#fdae6b",
    "allb-bfs": "#e6550d",
    "allb-txg": "#31a354",
    "qemu-unsafe": "#ffffff",
    "allb-rd": "#bcbddc",
    "allb-rd-txg": "#756bb1",
    "gfb": "#a1d99b",
    "gfb-txg": "#006d2c",
}
PANEL_TITLES = {
    "measured": "measured (this machine's disk)",
    "model": "MODEL: +{lat:g} ms per host fdatasync",
}


def main():
    with open(sys.argv[1]) as f:
        data = json.load(f)
    out_dir = sys.argv[2]
    cells = {(c["model"], c["workload"], c["config"]): c for c in data["cells"]}
    models = [m for m in ("measured", "model") if any(k[0] == m for k in cells)]
    configs = data["configs"]
    mach = data["machine"]
    for filename, title, workloads in data["figures"]:
        workloads = [w for w in workloads if w in data["workloads"]]
        if not workloads or not models:
            continue
        fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models) + 1.2, 4.6),
                                 squeeze=False)
        for ax, model in zip(axes[0], models):
            width = 0.8 / len(configs)
            unit = "MiB/s"
            for i, cfg in enumerate(configs):
                xs, ys, labels = [], [], []
                for j, w in enumerate(workloads):
                    c = cells.get((model, w, cfg["key"]))
                    if not c:
                        continue
                    value = c["mib_per_s"] if c["mib_per_s"] is not None else c["ops_per_s"]
                    if c["mib_per_s"] is None:
                        unit = "guest operations/s"
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(value)
                    labels.append(f"{c['ratio']:.2f}x")
                hatch = {"allb-bfs": "//", "qemu-unsafe": "xx"}.get(cfg["key"])
                bars = ax.bar(xs, ys, width * 0.92, color=COLORS.get(cfg["key"], "#999999"),
                              edgecolor="black", linewidth=0.5, hatch=hatch,
                              label=cfg["label"])
                for bar, label in zip(bars, labels):
                    ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7, rotation=90,
                                xytext=(0, 2), textcoords="offset points")
            ax.set_xticks(range(len(workloads)))
            ax.set_xticklabels([w.split(" ", 1)[-1] if len(workloads) > 1 else w
                                for w in workloads])
            ax.set_ylabel(f"throughput ({unit})")
            ax.set_title(PANEL_TITLES[model].format(lat=data["latency_ms"]), fontsize=10)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.18)
            ax.grid(axis="y", linestyle=":", linewidth=0.5)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
        fig.suptitle(f"{title} (ratio to QEMU on the bars)", fontsize=11)
        fig.text(0.5, 0.115, f"{mach['cpu']}, {mach['cores']} cores, Linux {mach['kernel']}, "
                 f"{mach['disk']}; {mach['date']}; N={data['n']}, {data['reps']} rep(s). "
                 f"barrierfs*: model of a BarrierFS host.", ha="center", fontsize=6.5)
        fig.tight_layout(rect=(0, 0.14, 1, 0.95))
        fig.savefig(os.path.join(out_dir, filename), dpi=110)
        plt.close(fig)


main()
