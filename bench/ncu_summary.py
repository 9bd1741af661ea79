#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Per-kernel times of one training step from an Nsight Compute CSV (.ci/gpu-check's `profile`
stage): the profiled program ran `--steps` identical steps, one after the other (mxd_bench_cuda's
fixture runs one at construction, then one timed iteration), and the last step's kernels are
summed by name, largest first.

    ncu --clock-control none --metrics gpu__time_duration.sum --print-units base --csv \\
        build-gpu/bench/mxd_bench_cuda --benchmark_filter='BM_train_step/gpt2:0/batch:4096/math:2' \\
        --benchmark_min_time=0 > step.csv
    python3 bench/ncu_summary.py step.csv --steps 2
"""
import argparse
import collections
import csv
import sys


def kernels(lines):
    """(kernel name, nanoseconds) of each launch, in launch order; ncu's own messages (lines
    not starting with a quote) are skipped."""
    rows = list(csv.reader(line for line in lines if line.startswith('"')))
    if not rows:
        raise SystemExit("ncu_summary: no CSV rows (did ncu profile anything?)")
    head = rows[0]
    name, value, unit = (head.index(c) for c in ("Kernel Name", "Metric Value", "Metric Unit"))
    scale = {"nsecond": 1.0, "ns": 1.0, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6}
    out = []
    for r in rows[1:]:
        if r[unit] not in scale:
            raise SystemExit(f"ncu_summary: unexpected unit {r[unit]!r} (use --print-units base)")
        out.append((r[name], float(r[value].replace(",", "")) * scale[r[unit]]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--steps", type=int, default=2, help="identical steps the program ran")
    args = ap.parse_args()
    launches = kernels(open(args.csv))
    if len(launches) % args.steps:
        print(f"ncu_summary: {len(launches)} launches do not split into {args.steps} equal steps; "
              "the last step is taken as the last 1/steps of them", file=sys.stderr)
    step = launches[len(launches) - len(launches) // args.steps:]
    total = sum(ns for _, ns in step)
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for k, ns in step:
        by_name[k][0] += 1
        by_name[k][1] += ns
    print(f"{len(launches)} launches profiled; the last step: {len(step)} launches, {total / 1e3:.1f} us of kernel time")
    print("|     us | share | launches | kernel |")
    print("|---:|---:|---:|---|")
    for k, (n, ns) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
        print(f"| {ns / 1e3:.1f} | {100 * ns / total:.1f} % | {n} | {k[:90]} |")


if __name__ == "__main__":
    main()
