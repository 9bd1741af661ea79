#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The gate GEMM (x G^T, [B, I] x [I, N]: the largest product of an MxD step) through mxd's
own GEMM and through torch's sgemm (MKL or OpenBLAS, whichever that torch was built with), in
the same run, against the machine's float FMA peak.

    python3 bench/gate_gemm.py --mxd build/examples/mxd --threads 2

mxd's figure is `mxd bench`'s gate_gemm_ms (forward's row tiles, each a GEMM over all N);
torch's is one torch.mm of the whole batch, as the authors' layer computes it. Rounds alternate
the two; medians are reported. The peak is cores x FMA units x lanes x 2 flops x clock, each
factor printed with where it came from.
"""
import argparse
import json
import re
import statistics
import subprocess
import time

import torch


def cpu_peak(threads):
    """(GFLOP/s, how it was derived) for float32 FMAs on `threads` cores."""
    info = open("/proc/cpuinfo").read()
    flags = set(re.search(r"^flags\s*:\s*(.*)$", info, re.M).group(1).split())
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M).group(1).strip()
    family = int(re.search(r"^cpu family\s*:\s*(\d+)", info, re.M).group(1))
    mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M).group(1))
    try:  # the rated maximum where the kernel exposes it (not inside most VMs)
        mhz = max(mhz, int(open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read()) / 1e3)
        clock_src = "cpufreq's cpuinfo_max_freq"
    except OSError:
        clock_src = "/proc/cpuinfo's cpu MHz (no cpufreq in this VM: the nominal clock)"
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags and "fma" in flags else 4
    # Two FMA pipes per core on Intel since Haswell and AMD since Zen; Zen 1 (family 0x17,
    # models below 0x30) splits a 256-bit FMA into two 128-bit ones.
    units, units_src = 2, "2 FMA pipes per core (Intel Haswell and later, AMD Zen 2 and later)"
    if "AMD" in model and family == 0x17 and "avx512f" not in flags:
        model_no = int(re.search(r"^model\s*:\s*(\d+)", info, re.M).group(1))
        if model_no < 0x30:
            units, units_src = 1, "Zen 1: 256-bit FMAs issue as two 128-bit halves"
    peak = threads * units * lanes * 2 * mhz / 1e3
    how = (f"{threads} cores x {units} FMA units ({units_src}) x {lanes} float lanes "
           f"({'AVX-512' if lanes == 16 else 'AVX2+FMA' if lanes == 8 else 'SSE'}) x 2 flops x "
           f"{mhz:.0f} MHz ({clock_src}); {model}")
    return peak, how


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mxd", required=True, help="the mxd tool")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--experts", type=int, default=21504)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, I, N = args.batch, args.d_in, args.experts
    gflop = 2 * B * I * N / 1e9
    x, G = torch.randn(B, I), torch.randn(N, I) * I ** -0.5

    mxd_ms, torch_ms = [], []
    for r in range(args.rounds):
        out = subprocess.run([args.mxd, "bench", "--threads", str(args.threads), "--batch", str(B),
                              "--d-in", str(I), "--d-out", str(I), "--experts", str(N),
                              "--iters", str(args.iters), "--warmup", "1", "--json"],
                             check=True, capture_output=True, text=True).stdout
        mxd_ms.append(json.loads(out)["gate_gemm_ms"])
        torch.mm(x, G.t())  # warm-up
        ts = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            torch.mm(x, G.t())
            ts.append((time.perf_counter() - t0) * 1e3)
        torch_ms.append(statistics.median(ts))
        print(f"round {r}: mxd {mxd_ms[-1]:.1f} ms, torch {torch_ms[-1]:.1f} ms", flush=True)

    peak, how = cpu_peak(args.threads)
    m, t = statistics.median(mxd_ms), statistics.median(torch_ms)
    blas = "MKL" if torch.backends.mkl.is_available() else "OpenBLAS or another BLAS"
    print(f"gate GEMM [{B}, {I}] x [{I}, {N}], float32, {args.threads} threads, load average "
          f"{open('/proc/loadavg').read().split()[0]}")
    print(f"  mxd        {m:8.1f} ms  {gflop / m * 1e3:7.1f} GFLOP/s  {gflop / m * 1e3 / peak:6.1%} of peak")
    print(f"  torch {torch.__version__} ({blas}) {t:8.1f} ms  {gflop / t * 1e3:7.1f} GFLOP/s  "
          f"{gflop / t * 1e3 / peak:6.1%} of peak")
    print(f"  mxd / torch rate: {t / m:.2f}x")
    print(f"  peak {peak:.1f} GFLOP/s = {how}")


if __name__ == "__main__":
    main()
