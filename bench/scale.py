#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Scaling in the number of experts: a training step (forward + backward + AdamW) of `mxd bench`
and of the PyTorch layer of compare_torch.py (which materialises [B, N] gate scores and a dense
[B, N] coefficient matrix) at GPT-2 widths, for N experts x batch B, each configuration in a
fresh process so its peak resident set is its own. Prints a markdown table.

    /usr/bin/python3 bench/scale.py --mxd build/examples/mxd --threads 2

"state" is what a training step must hold: parameters, gradients and both AdamW moments,
x, y, dy, dx and mxd's workspace; "RSS / state" is the peak resident set against it.
The torch layer is skipped (and says so) where its own estimate exceeds --torch-max-gib.
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_mxd(exe, n, batch, threads, iters, warmup):
    cmd = [exe, "bench", "--json", "--experts", str(n), "--batch", str(batch),
           "--threads", str(threads), "--iters", str(iters), "--warmup", str(warmup)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


TORCH_CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
from compare_torch import time_torch
cfg = dict(d_in=768, d_hidden=3072, d_out=768, n_experts=int(sys.argv[2]), k=32)
torch.set_num_threads(int(sys.argv[4]))
r = time_torch(cfg, int(sys.argv[3]), int(sys.argv[5]), int(sys.argv[6]), torch.float32)
status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
print(json.dumps({"step_ms": r["step_ms"], "peak_rss_mib": int(status) / 1024}))
"""


def torch_estimate_gib(n, batch):
    # Parameters, gradients and two moments, plus about five [B, N] float tensors alive in
    # the step (scores, relu output, dense coefficients, and their gradients).
    params = 768 * 3072 * 2 + 2 * n * 768
    return (16 * params + 5 * 4 * batch * n) / 2 ** 30


def run_torch(n, batch, threads, iters, warmup):
    out = subprocess.run([sys.executable, "-c", TORCH_CHILD, HERE, str(n), str(batch), str(threads),
                          str(iters), str(warmup)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mxd", default="build/examples/mxd")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--experts", default="21504,65536,262144")
    ap.add_argument("--batches", default="1024,4096")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--torch-max-gib", type=float, default=12.0,
                    help="skip the torch layer where it would need more memory than this")
    ap.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    args = ap.parse_args()
    rows = []
    for batch in map(int, args.batches.split(",")):
        for n in map(int, args.experts.split(",")):
            m = run_mxd(args.mxd, n, batch, args.threads, args.iters, args.warmup)
            est = torch_estimate_gib(n, batch)
            t = run_torch(n, batch, args.threads, args.iters, args.warmup) if est <= args.torch_max_gib else None
            rows.append({"n_experts": n, "batch": batch, "mxd": m, "torch": t, "torch_estimate_gib": est})
            print(f"# N={n} B={batch}: mxd {m['step_ms']:.0f} ms"
                  + (f", torch {t['step_ms']:.0f} ms" if t else f", torch skipped (~{est:.0f} GiB)"),
                  file=sys.stderr, flush=True)
    print("| N | batch | mxd step ms | ms per 1k experts | torch step ms | torch / mxd | workspace MiB "
          "| tile rows | state MiB | mxd peak RSS MiB | RSS / state | torch peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        m, t = r["mxd"], r["torch"]
        state = m["state_bytes"] / 2 ** 20
        torch_ms = f"{t['step_ms']:.0f}" if t else f"skipped (~{r['torch_estimate_gib']:.0f} GiB)"
        ratio = f"{t['step_ms'] / m['step_ms']:.2f}" if t else "-"
        torch_rss = f"{t['peak_rss_mib']:.0f}" if t else "-"
        print(f"| {r['n_experts']} | {r['batch']} | {m['step_ms']:.0f} | {m['step_ms'] / r['n_experts'] * 1000:.2f} "
              f"| {torch_ms} | {ratio} | {m['workspace_bytes'] / 2 ** 20:.0f} | {m['tile_rows']} | {state:.0f} "
              f"| {m['peak_rss_mib']:.0f} | {m['peak_rss_mib'] / state:.2f} | {torch_rss} |")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
