#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Times the PyTorch MxD layer, mxd_torch.MxD (mxd's forward and backward inside PyTorch) and
`mxd bench` side by side, in the same run, with the same thread count, batch and layer, and
prints a ratio table (torch time / other time).

The torch layer is written here after the authors' code: the same math and the same dense
top-k scatter (a [B, N] coefficient matrix multiplied by W_cond), trained with
torch.optim.AdamW. mxd_torch.MxD is trained with torch.optim.AdamW too; `mxd bench` uses
mxd::AdamW. Rounds alternate the three so that all see the same machine load; medians are
taken over rounds. "kept" is the module's speed-up over the C++ tool's.

    /usr/bin/python3 bench/compare_torch.py --mxd build/examples/mxd --threads 2 --batch 1024

mxd_torch is imported from --module-path (e.g. build/examples/torch/python) or the installed
package; without it its column is left out.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


class MxD(torch.nn.Module):
    """The authors' MxD layer (GELU encoder, no GLU, no skip), reference parameter names."""

    def __init__(self, d_in, d_hidden, d_out, n_experts, k):
        super().__init__()
        self.k = k
        self.W_enc = torch.nn.Parameter(torch.empty(d_in, d_hidden).uniform_(-d_in ** -0.5, d_in ** -0.5))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_hidden))
        self.W_dec = torch.nn.Parameter(torch.randn(d_hidden, d_out) * d_hidden ** -0.5)
        self.gate = torch.nn.Parameter(torch.empty(n_experts, d_in).uniform_(-d_in ** -0.5, d_in ** -0.5))
        self.gate_bias = torch.nn.Parameter(torch.zeros(n_experts))
        c = torch.empty(d_out, n_experts).uniform_(-1, 1)
        self.W_cond = torch.nn.Parameter(c / c.norm(dim=0, keepdim=True))
        self.b_dec_out = torch.nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        z = torch.nn.functional.gelu(x @ self.W_enc + self.b_enc)
        scores = torch.relu(x @ self.gate.T + self.gate_bias)
        vals, idx = scores.topk(self.k, dim=-1)
        a = torch.zeros_like(scores).scatter(-1, idx, vals)  # dense [B, N] coefficients
        return (z @ self.W_dec) * (a @ self.W_cond.T) + self.b_dec_out


def time_torch(cfg, batch, iters, warmup, dtype, module=None, mxd_adamw=False, compile=False,
               fused=False):
    """The authors' layer (with compile, under torch.compile), or (module=mxd_torch)
    mxd_torch.MxD, trained with torch's AdamW (fused: its fused CPU kernel; mxd_adamw:
    mxd_torch.AdamW, mxd::AdamW on the same tensors)."""
    torch.manual_seed(0)
    if module is None:
        layer = MxD(cfg["d_in"], cfg["d_hidden"], cfg["d_out"], cfg["n_experts"], cfg["k"]).to(dtype)
    else:
        layer = module.MxD(cfg["d_in"], cfg["d_hidden"], cfg["d_out"], cfg["n_experts"], cfg["k"],
                           "gelu", dtype=dtype)
    if mxd_adamw:
        opt = module.AdamW(layer, lr=4e-4, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(layer.parameters(), lr=4e-4, weight_decay=0.0,
                                **({"fused": True} if fused else {}))
    if compile:
        layer = torch.compile(layer)
    x = torch.randn(batch, cfg["d_in"], dtype=dtype)
    dy = torch.randn(batch, cfg["d_out"], dtype=dtype) / batch
    fwd, bwd, step = [], [], []
    for it in range(warmup + iters):
        t0 = time.perf_counter()
        y = layer(x)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        y.backward(dy)
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if it >= warmup:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
            step.append((t3 - t0) * 1e3)
    return {"forward_ms": statistics.median(fwd), "backward_ms": statistics.median(bwd),
            "step_ms": statistics.median(step)}


def time_mxd(exe, cfg, batch, iters, warmup, threads, dtype):
    cmd = [exe, "bench", "--json", "--batch", str(batch), "--iters", str(iters), "--warmup",
           str(warmup), "--threads", str(threads), "--dtype", dtype, "--d-in", str(cfg["d_in"]),
           "--d-hidden", str(cfg["d_hidden"]), "--d-out", str(cfg["d_out"]), "--experts",
           str(cfg["n_experts"]), "--k", str(cfg["k"]), "--activation", "gelu"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def blas_in_use():
    """The BLAS torch's matmuls go through (Debian's torch links the generic libblas.so.3)."""
    cfg = torch.__config__.show()
    info = [f.strip() for f in cfg.replace("\n", ",").split(",") if "BLAS_INFO" in f]
    libs = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if "blas" in path.lower() or "mkl" in path.lower():
                    libs.add(path)
    except OSError:
        pass
    return (info[0].split(":")[-1].strip() if info else "BLAS_INFO unknown"), sorted(libs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mxd", default="build/examples/mxd", help="path to the mxd tool")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating torch/mxd rounds")
    ap.add_argument("--dtype", default="float", choices=["float", "double"])
    ap.add_argument("--config", default="gpt2", choices=["gpt2", "small"])
    ap.add_argument("--json", action="store_true", help="also print the raw medians as JSON")
    ap.add_argument("--module-path", default="", help="directory holding the mxd_torch package")
    ap.add_argument("--compile", action="store_true",
                    help="also time the authors' layer under torch.compile, and mxd_torch with "
                         "torch's fused AdamW (torch 2)")
    args = ap.parse_args()

    module = None
    if args.module_path:
        sys.path.insert(0, args.module_path)
    try:
        import mxd_torch as module
    except ImportError as e:
        print(f"mxd_torch not importable ({e}): its column is left out")

    cfg = ({"d_in": 768, "d_hidden": 3072, "d_out": 768, "n_experts": 21504, "k": 32}
           if args.config == "gpt2" else
           {"d_in": 256, "d_hidden": 1024, "d_out": 256, "n_experts": 4096, "k": 32})
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "float" else torch.float64

    with torch.no_grad():  # load the BLAS so /proc/self/maps shows it
        torch.ones(64, 64) @ torch.ones(64, 64)
    info, libs = blas_in_use()
    print(f"torch {torch.__version__}, {info}, threads {torch.get_num_threads()}")
    print("BLAS libraries loaded: " + (", ".join(libs) if libs else "none found"))
    print(f"layer {args.config}: {cfg}, batch {args.batch}, {args.dtype}, "
          f"{args.rounds} rounds x {args.iters} iterations (+{args.warmup} warm-up)", flush=True)

    # Each variant: (name, timing function). All run in every round, in this order.
    run = lambda **kw: lambda: time_torch(cfg, args.batch, args.iters, args.warmup, dtype, **kw)
    variants = [("torch", run())]
    if args.compile:
        variants.append(("torch.compile", run(compile=True)))
    if module is not None:
        variants.append(("mxd_torch", run(module=module)))
        if args.compile:
            variants.append(("mxd_torch+fused_adamw", run(module=module, fused=True)))
        variants.append(("mxd_torch+mxd_adamw", run(module=module, mxd_adamw=True)))
    variants.append(("mxd", lambda: time_mxd(args.mxd, cfg, args.batch, args.iters, args.warmup,
                                             args.threads, args.dtype)))
    rounds = {who: [] for who, _ in variants}
    for r in range(args.rounds):
        for who, fn in variants:
            rounds[who].append(fn())
        print(f"  round {r}: " + ", ".join(f"{who} step {rs[-1]['step_ms']:.1f} ms"
                                           for who, rs in rounds.items()),
              file=sys.stderr, flush=True)

    med = {who: {key: statistics.median(x[key] for x in rs)
                 for key in ("forward_ms", "backward_ms", "step_ms")}
           for who, rs in rounds.items()}
    if module is None:
        print(f"\n{'':<10}{'torch ms':>12}{'mxd ms':>12}{'speed-up':>12}")
    else:
        print(f"\n{'':<10}{'torch ms':>12}{'mxd_torch ms':>14}{'mxd ms':>12}"
              f"{'mxd_torch x':>13}{'mxd x':>10}{'kept':>8}")
    for key, name in (("forward_ms", "forward"), ("backward_ms", "backward"), ("step_ms", "step")):
        t, m = med["torch"][key], med["mxd"][key]
        if module is None:
            print(f"{name:<10}{t:>12.1f}{m:>12.1f}{t / m:>11.2f}x")
        else:
            mt = med["mxd_torch"][key]
            print(f"{name:<10}{t:>12.1f}{mt:>14.1f}{m:>12.1f}{t / mt:>12.2f}x{t / m:>9.2f}x"
                  f"{100 * m / mt:>7.0f}%")
    if module is not None:  # the same step, with mxd::AdamW instead of torch's
        t, m, mt = (med["torch"]["step_ms"], med["mxd"]["step_ms"],
                    med["mxd_torch+mxd_adamw"]["step_ms"])
        print(f"{'step*':<10}{t:>12.1f}{mt:>14.1f}{m:>12.1f}{t / mt:>12.2f}x{t / m:>9.2f}x"
              f"{100 * m / mt:>7.0f}%")
        print("step* = mxd_torch trained with mxd_torch.AdamW (mxd::AdamW on torch's tensors); "
              "the torch and mxd columns are as in 'step'")
    # Every variant's step against the authors' eager layer, and what the C++ step gains on it.
    print(f"\n{'step, every variant':<24}{'ms':>10}{'torch eager / it':>18}{'mxd C++ / it':>14}")
    for who in rounds:
        s = med[who]["step_ms"]
        print(f"{who:<24}{s:>10.1f}{med['torch']['step_ms'] / s:>17.2f}x"
              f"{s / med['mxd']['step_ms']:>13.2f}x")
    spread = {who: (min(x["step_ms"] for x in rs), max(x["step_ms"] for x in rs))
              for who, rs in rounds.items()}
    print("step range over rounds: " + ", ".join(f"{who} {lo:.1f}-{hi:.1f} ms"
                                                for who, (lo, hi) in spread.items()))
    last = rounds["mxd"][-1]
    print(f"mxd workspace {last.get('workspace_bytes', 0) / 2**20:.1f} MiB, "
          f"peak RSS {last.get('peak_rss_mib', 0):.1f} MiB")
    torch_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"torch process peak RSS {torch_rss:.1f} MiB (Python and torch included"
          f"{', and mxd_torch' if module is not None else ''})")
    if args.json:
        print(json.dumps({**med, "blas": info, "libs": libs}))


if __name__ == "__main__":
    main()
