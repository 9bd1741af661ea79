# SPDX-License-Identifier: MIT
"""The GPU stages' report scripts on inputs laid out as their tools write them.

bench/ncu_summary.py on Nsight Compute CSVs: the last of two steps summed per kernel (largest
first, launches counted), microseconds and nanoseconds alike, ncu's own messages skipped, a
file with no rows refused. bench/ab_table.py on Google Benchmark JSON: a column per run, the
ratio of the mean times, errored benchmarks left out, units converted, an empty
report or one build alone refused."""
import json
import os
import subprocess
import sys
import tempfile

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench")
HEAD = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
        '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def row(i, kernel, unit, value):
    return (f'"{i}","1","mxd_bench_cuda","h","{kernel}","1","7","(512, 1, 1)","(4096, 1, 1)","0",'
            f'"9.0","Command line profiler metrics","gpu__time_duration.sum","{unit}","{value}"')


def run(lines, *args):
    with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        return subprocess.run([sys.executable, os.path.join(BENCH, "ncu_summary.py"), f.name, *args],
                              capture_output=True, text=True)
    finally:
        os.unlink(f.name)


def ncu_summary():
    step1 = [row(0, "gemm", "nsecond", "9,000"), row(1, "topk", "nsecond", "5,000"),
             row(2, "gemm", "nsecond", "1,000")]
    step2 = [row(3, "gemm", "usecond", "2.5"), row(4, "topk", "nsecond", "4,200"),
             row(5, "gemm", "nsecond", "1,500")]
    p = run(["==PROF== Connected to process 1", HEAD, *step1, *step2, "==PROF== Disconnected"])
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "6 launches profiled; the last step: 3 launches, 8.2 us of kernel time", lines[0]
    assert lines[3] == "| 4.2 | 51.2 % | 1 | topk |", lines[3]
    assert lines[4] == "| 4.0 | 48.8 % | 2 | gemm |", lines[4]  # 2.5 us + 1500 ns, two launches
    assert len(lines) == 5, lines
    # An odd count is still summarised, with a warning naming it.
    p = run([HEAD, *step1, *step2, row(6, "adamw", "nsecond", "100")])
    assert p.returncode == 0 and "7 launches do not split into 2 equal steps" in p.stderr, p.stderr
    # Nothing profiled: a clear error, not an empty table.
    p = run(["==PROF== No kernels were profiled."])
    assert p.returncode != 0 and "no CSV rows" in p.stderr + p.stdout, (p.stdout, p.stderr)


def gbench(*benchmarks):
    """A Google Benchmark JSON report of (name, time, unit[, error]) entries."""
    out = []
    for name, t, unit, *error in benchmarks:
        b = {"name": name + "/manual_time", "run_type": "iteration", "iterations": 10,
             "real_time": t, "cpu_time": 0.1, "time_unit": unit}
        if error:
            b.update(error_occurred=True, error_message=error[0])
        out.append(b)
    return {"context": {"library_build_type": "release"}, "benchmarks": out}


def ab_table():
    with tempfile.TemporaryDirectory() as d:
        runs = {"base_1": gbench(("BM_step/a", 3.0, "ms"), ("BM_topk", 900.0, "us")),
                "new_1": gbench(("BM_step/a", 2.0, "ms"), ("BM_topk", 0.5, "ms")),
                "base_2": gbench(("BM_step/a", 3.2, "ms"), ("BM_topk", 1.1, "ms")),
                "new_2": gbench(("BM_step/a", 2.2, "ms"), ("BM_topk", 0, "ms", "no CUDA device is visible"))}
        paths = []
        for label, report in runs.items():
            paths.append(os.path.join(d, label + ".json"))
            with open(paths[-1], "w") as f:
                json.dump(report, f)
        p = subprocess.run([sys.executable, os.path.join(BENCH, "ab_table.py"), *paths],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert lines[0] == "| benchmark (ms) | base_1 | new_1 | base_2 | new_2 | new / base |", lines[0]
        assert lines[2] == "| BM_step/a | 3.000 | 2.000 | 3.200 | 2.200 | 0.677 |", lines[2]  # 2.1 / 3.1
        assert lines[3] == "| BM_topk | 0.900 | 0.500 | 1.100 | - | 0.500 |", lines[3]  # the error left out
        # One build only: refused, naming what it found.
        p = subprocess.run([sys.executable, os.path.join(BENCH, "ab_table.py"), paths[0], paths[2]],
                           capture_output=True, text=True)
        assert p.returncode != 0 and "expected two builds' files, got ['base']" in p.stderr, p.stderr
        # A run that wrote nothing (its binary missing or crashed): refused, naming the file.
        open(paths[1], "w").close()
        p = subprocess.run([sys.executable, os.path.join(BENCH, "ab_table.py"), *paths],
                           capture_output=True, text=True)
        assert p.returncode != 0 and f"{paths[1]} holds no benchmark report" in p.stderr, p.stderr


if __name__ == "__main__":
    ncu_summary()
    ab_table()
    print("bench scripts: ncu_summary 3 cases, ab_table 3 cases passed")
