#!/usr/bin/env python3
"""Publishes a paper-bench run: copies its table and charts from RESULTS (default results/)
to docs/results/ and replaces the README's block between the paper-bench markers with the
table (headings two levels down, under its "Latest run"), so the README shows the latest run and its machine.

Usage: publish-results.py [RESULTS]"""

import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["paper-bench.md", "fig3-varmail.png", "fig4-mobibench.png", "fig5-dd.png"]
BEGIN, END = "<!-- paper-bench results: begin -->", "<!-- paper-bench results: end -->"


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "results")
    dst = os.path.join(ROOT, "docs", "results")
    os.makedirs(dst, exist_ok=True)
    for f in FILES:
        if not os.path.exists(os.path.join(src, f)):
            raise SystemExit(f"{src} has no {f}: run bench/paper-bench.py first")
        shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    with open(os.path.join(src, "paper-bench.md")) as f:
        table = f.read()
    # The report's title goes; its sections become subsections of the README's section.
    table = re.sub(r"^# .*\n+", "", table)
    table = re.sub(r"^(#+) ", r"\1## ", table, flags=re.MULTILINE)
    charts = "\n".join(f"![{f[:-4]}](docs/results/{f})" for f in FILES[1:])
    block = f"{BEGIN}\n{table.strip()}\n\n{charts}\n{END}"
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    with open(readme, "w") as f:
        f.write(text)
    print(f"published {src} to docs/results/ and README.md")


main()
