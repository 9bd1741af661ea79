# SPDX-License-Identifier: MIT
"""bench/ncu_summary.py on CSVs laid out as Nsight Compute writes them: the last of two steps
summed per kernel (largest first, launches counted), microseconds and nanoseconds alike, ncu's
own messages skipped, and a file with no rows refused."""
import os
import subprocess
import sys
import tempfile

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "ncu_summary.py")
HEAD = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
        '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def row(i, kernel, unit, value):
    return (f'"{i}","1","mxd_bench_cuda","h","{kernel}","1","7","(512, 1, 1)","(4096, 1, 1)","0",'
            f'"9.0","Command line profiler metrics","gpu__time_duration.sum","{unit}","{value}"')


def run(lines, *args):
    with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        return subprocess.run([sys.executable, SCRIPT, f.name, *args], capture_output=True, text=True)
    finally:
        os.unlink(f.name)


def main():
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
    print("ncu_summary: 3 cases passed")


if __name__ == "__main__":
    main()
