#!/usr/bin/env python3
"""bench/datapath-bench.py in its smoke form (tiny counts, one repetition, tmpfs): every cell
runs every driver, and what it reports holds together. Not a speed test: no ratio is judged.

- every cell and cadence has a row with a time, a peak RSS and a trace count per driver;
- a write cell wrote to the image file (bytes > 0) under every driver, a read cell wrote
  nothing;
- a cadence with a flush after every request makes at least one host sync per driver more
  than the same cell without flushes (the counts come from strace, so they can be wrong);
- the summary lines are printed.
"""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DRIVERS = ("qcow2", "ordered", "flush", "txg")


def main():
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "smoke.json")
        p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "datapath-bench.py"),
                            "--smoke", "--json", out], capture_output=True, text=True,
                           timeout=600)
        if p.returncode != 0:
            print(p.stdout[-3000:], p.stderr[-3000:])
            sys.exit(f"FAIL: datapath-bench.py --smoke exited {p.returncode}")
        with open(out) as f:
            result = json.load(f)
    rows = result["rows"]
    cells = {r["cell"] for r in rows}
    if len(cells) < 10:
        failures.append(f"only {len(cells)} cells ran: {sorted(cells)}")
    by_key = {(r["cell"], r["cadence"]): r for r in rows}
    for r in rows:
        name = f"{r['cell']} ({r['cadence']})"
        for d in DRIVERS:
            got = r["drivers"].get(d)
            if got is None:
                failures.append(f"{name}: no figures for {d}")
                continue
            if not got["median_s"] > 0 or not got["peak_rss_kib"] > 0:
                failures.append(f"{name}: {d} has no time or no RSS: {got['median_s']}, "
                                f"{got['peak_rss_kib']}")
            writes = not r["cell"].startswith("rd-")
            if writes and got["bytes_written"] <= 0:
                failures.append(f"{name}: {d} wrote nothing to the image file")
            if not writes and got["bytes_written"] != 0:
                failures.append(f"{name}: the read cell wrote {got['bytes_written']} bytes")
        if r["cadence"] == "every 1":
            base = by_key.get((r["cell"], "none"))
            for d in DRIVERS:
                if base and r["drivers"][d]["syncs"] <= base["drivers"][d]["syncs"]:
                    failures.append(f"{name}: {d} made {r['drivers'][d]['syncs']} host syncs, "
                                    f"no more than without flushes "
                                    f"({base['drivers'][d]['syncs']})")
    for mode in DRIVERS[1:]:
        if f"\n{mode}: " not in "\n" + p.stdout:
            failures.append(f"no summary line for {mode}")
    for f in failures:
        print(f"FAIL: {f}")
    print(f"datapath-bench smoke: {len(rows)} rows, {len(cells)} cells, "
          f"{'FAIL' if failures else 'ok'}")
    sys.exit(1 if failures else 0)


main()
