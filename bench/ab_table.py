#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Side-by-side table of two builds' Google Benchmark runs (.ci/gpu-check's `ab` stage): JSON
files named NAME_ROUND.json (e.g. base_1.json new_1.json base_2.json new_2.json, run
alternately), one column per file, and the ratio of the second name's mean time to the first's per
benchmark.

    python3 bench/ab_table.py base_1.json new_1.json base_2.json new_2.json
"""
import json
import os
import sys

UNIT_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}


def times(path):
    """{benchmark name: milliseconds} of one run; benchmarks that reported an error are left out."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"ab_table.py: {path} holds no benchmark report (did its run fail?): {e}")
    out = {}
    for b in data.get("benchmarks", []):
        if b.get("error_occurred"):
            continue
        out[b["name"].replace("/manual_time", "")] = b["real_time"] * UNIT_MS[b.get("time_unit", "ns")]
    return out


def main(paths):
    if len(paths) < 2:
        raise SystemExit("usage: ab_table.py NAME_ROUND.json ... (at least one file for each of two names)")
    runs = [(os.path.basename(p)[:-len(".json")], times(p)) for p in paths]
    names = list(dict.fromkeys(label.rsplit("_", 1)[0] for label, _ in runs))
    if len(names) != 2:
        raise SystemExit(f"ab_table.py: expected two builds' files, got {names}")
    benchmarks = list(dict.fromkeys(b for _, t in runs for b in t))
    if not benchmarks:
        raise SystemExit("ab_table.py: no benchmark ran without an error")
    print("| benchmark (ms) | " + " | ".join(label for label, _ in runs) + f" | {names[1]} / {names[0]} |")
    print("|---|" + "---:|" * (len(runs) + 1))
    for b in benchmarks:
        cells = [f"{t[b]:.3f}" if b in t else "-" for _, t in runs]
        means = []
        for n in names:
            own = [t[b] for label, t in runs if label.rsplit("_", 1)[0] == n and b in t]
            means.append(sum(own) / len(own) if own else 0.0)
        ratio = f"{means[1] / means[0]:.3f}" if means[0] > 0 and means[1] > 0 else "-"
        print(f"| {b} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1:])
