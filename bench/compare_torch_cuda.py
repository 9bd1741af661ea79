#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Times the authors' MxD layer in PyTorch on the GPU (eager and torch.compile; fp32, TF32,
bf16 weights and bf16 autocast), mxd_torch.MxD (mxd's CUDA backend inside PyTorch: eager and
torch.compile; fp32, TF32, bf16 autocast) and `mxd bench --device cuda` (fp32, TF32, bf16
GEMMs) in the same run on the same GPU, and prints a markdown table for bench/RESULTS.md with
ratios against PyTorch eager fp32. Each row is printed as soon as it is measured, so a run cut
short still reports what it timed.

Also measures the cuBLAS bf16 GEMM rate on the layer's own GEMM shapes (forward and backward
of the dense torch layer's products, no experts) and reports the time those FLOPs need at that
rate: the floor a bf16 step is compared with.

    python3 bench/compare_torch_cuda.py --mxd build/examples/mxd --batch 4096 \
        --module-path build-gpu/torch-lib
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_torch import MxD  # noqa: E402  the same torch layer as the CPU comparison


def cuda_time(fn, iters, warmup):
    """Median milliseconds of fn() over iters calls after warmup, by CUDA events."""
    times = []
    for it in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if it >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_torch(cfg, batch, iters, warmup, dtype, tf32, compiled, module=None, autocast=False):
    """The authors' layer (module None) or mxd_torch.MxD, trained with torch's AdamW; weights
    and inputs in dtype, under bf16 autocast where asked."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(0)
    shape = (cfg["d_in"], cfg["d_hidden"], cfg["d_out"], cfg["n_experts"], cfg["k"])
    layer = (MxD(*shape) if module is None else module.MxD(*shape, activation="gelu")).to("cuda", dtype)
    opt = torch.optim.AdamW(layer.parameters(), lr=4e-4, weight_decay=0.0)
    fwd = torch.compile(layer) if compiled else layer
    x = torch.randn(batch, cfg["d_in"], device="cuda", dtype=dtype)
    dy = torch.randn(batch, cfg["d_out"], device="cuda", dtype=dtype) / batch
    cast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    out = {}

    def forward():
        with torch.no_grad(), cast():
            fwd(x)

    def backward_only():
        with cast():
            y = fwd(x)
        opt.zero_grad(set_to_none=False)
        y.backward(dy.to(y.dtype))

    def step():
        backward_only()
        opt.step()

    out["forward_ms"] = cuda_time(forward, iters, warmup)
    out["fwd_bwd_ms"] = cuda_time(backward_only, iters, warmup)
    out["step_ms"] = cuda_time(step, iters, warmup)
    out["backward_ms"] = out["fwd_bwd_ms"] - out["forward_ms"]
    return out


def time_mxd(exe, cfg, batch, iters, warmup, extra):
    cmd = [exe, "bench", "--device", "cuda", "--json", "--batch", str(batch), "--iters",
           str(iters), "--warmup", str(warmup), "--d-in", str(cfg["d_in"]), "--d-hidden",
           str(cfg["d_hidden"]), "--d-out", str(cfg["d_out"]), "--experts", str(cfg["n_experts"]),
           "--k", str(cfg["k"]), "--activation", "gelu"] + extra
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def gemm_floor_ms(cfg, batch, iters, warmup):
    """(time of the dense layer's GEMMs in bf16, their TFLOP/s): forward x E, z D, x G^T and
    each one's two backward products, as cuBLAS runs them here."""
    B, I, H, O, N = batch, cfg["d_in"], cfg["d_hidden"], cfg["d_out"], cfg["n_experts"]
    shapes = []  # (m, k, n) of each forward product and its two gradients
    for (m, k, n) in ((B, I, H), (B, H, O), (B, I, N)):
        shapes += [(m, k, n), (m, n, k), (k, m, n)]
    mats = [(torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
             torch.randn(k, n, device="cuda", dtype=torch.bfloat16)) for (m, k, n) in shapes]
    ms = cuda_time(lambda: [a @ b for a, b in mats], iters, warmup)
    flops = sum(2 * m * k * n for (m, k, n) in shapes)
    return ms, flops / (ms * 1e-3) / 1e12


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mxd", default="build/examples/mxd")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--module-path", default="",
                    help="directory holding an mxd_torch built with CUDA: adds its rows")
    args = ap.parse_args()
    cfg = {"d_in": 768, "d_hidden": 3072, "d_out": 768, "n_experts": 21504, "k": 32}
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, batch {args.batch}, "
          f"GPT-2 small MxD {cfg}", flush=True)

    floor, rate = gemm_floor_ms(cfg, args.batch, args.iters, args.warmup)
    print(f"cuBLAS bf16 on the dense layer's 9 GEMM shapes: {rate:.0f} TFLOP/s, "
          f"{floor:.3f} ms for their FLOPs (the bf16 step target is within 2x of this)")
    module = None
    if args.module_path:
        sys.path.insert(0, args.module_path)
        import mxd_torch as module  # asked for: an import failure is an error

    print("\n| run | forward ms | backward ms | step ms | step vs torch eager fp32 |")
    print("|---|---:|---:|---:|---:|", flush=True)
    rows = []

    def report(label, r):
        rows.append((label, r))
        base = rows[0][1]["step_ms"]
        print(f"| {label} | {r['forward_ms']:.3f} | {r['backward_ms']:.3f} | {r['step_ms']:.3f} | "
              f"{base / r['step_ms']:.2f}x |", flush=True)

    f32, bf16 = torch.float32, torch.bfloat16
    # (label, module, dtype, tf32, autocast, compiled); the compiled rows last, being the slowest
    # to set up.
    runs = [("torch eager fp32", None, f32, False, False, False),
            ("torch eager TF32", None, f32, True, False, False),
            ("torch eager bf16", None, bf16, False, False, False),
            ("torch eager bf16 autocast", None, f32, False, True, False)]
    if module is not None:
        runs += [("mxd_torch fp32", module, f32, False, False, False),
                 ("mxd_torch TF32", module, f32, True, False, False),
                 ("mxd_torch bf16 autocast", module, f32, False, True, False)]
    for label, extra in (("mxd fp32", []), ("mxd TF32", ["--tf32"]), ("mxd bf16 GEMMs", ["--dtype", "bf16"])):
        runs.append((label, extra))
    if not args.no_compile:
        runs += [("torch.compile fp32", None, f32, False, False, True),
                 ("torch.compile bf16", None, bf16, False, False, True)]
        if module is not None:
            runs += [("torch.compile mxd_torch fp32", module, f32, False, False, True),
                     ("torch.compile mxd_torch bf16 autocast", module, f32, False, True, True)]
    for run in runs:
        label = run[0]
        try:
            if len(run) == 2:
                r = time_mxd(args.mxd, cfg, args.batch, args.iters, args.warmup, run[1])
            else:
                _, mod, dtype, tf32, autocast, compiled = run
                r = time_torch(cfg, args.batch, args.iters, args.warmup, dtype, tf32, compiled,
                               mod, autocast)
        except Exception as e:  # torch.compile needs a working Triton; report, do not stop
            print(f"{label}: failed ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
            continue
        report(label, r)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
