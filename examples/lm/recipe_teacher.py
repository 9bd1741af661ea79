# SPDX-License-Identifier: MIT
"""The TopK transcoder's training recipe, knob by knob, on `mxd train`'s built-in teacher (a
GELU MLP 64 -> 256 -> 64 on x ~ N(0, I)): the MxD authors' recipe, each knob of SAELens 6.x's
alone, all of them (--tc-recipe saelens, mxd's default), and the two that carry the effect
together (tied init, no warm-up), a short run at k = 8 and 32; then those recipes at 1000
steps. Transcoder alone (--models topk), 2048 latents, batch 1024, lr 4e-4, warm-up 100 unless
removed; held-out NMSE (reference), FVU and dead fraction, mean ± sample std over seeds. Needs
no LM and no torch (numpy only for the table).

    /usr/bin/python3 examples/lm/recipe_teacher.py --mxd build/examples/mxd --out examples/lm/results/recipe_teacher

Every run is cached in --out (one folder each) and reused; --cached-only tabulates what is there.
"""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

A = ["--tc-recipe", "authors"]  # named, so that the table does not move with mxd's default
KNOBS = [("authors", A), ("mse loss", A + ["--tc-loss", "mse"]), ("sse loss", A + ["--tc-loss", "sse"]),
         ("clip grad 1", A + ["--tc-clip-grad", "1"]),
         ("tied init 0.1", A + ["--tc-init", "tied"]), ("no warm-up", A + ["--tc-warmup", "0"]),
         ("AuxK d/2", A + ["--tc-aux-k", "32"]), ("free decoder rows", A + ["--tc-norm-dec", "off"]),
         ("free rows, ranked by norm", A + ["--tc-norm-dec", "off", "--tc-rank-by-dec-norm", "on"]),
         ("all (saelens)", ["--tc-recipe", "saelens"]),
         ("tied init, no warm-up", A + ["--tc-init", "tied", "--tc-warmup", "0"])]
RECIPES = [("authors", A), ("saelens", ["--tc-recipe", "saelens"]),
           ("tied, no warm-up", A + ["--tc-init", "tied", "--tc-warmup", "0"])]


def run(mxd, out_dir, k, steps, seed, flags, threads, cached_only):
    metrics = out_dir / "metrics.json"
    if not metrics.exists():
        if cached_only:
            return None
        cmd = [mxd, "train", "--models", "topk", "--latents", "2048", "--k", str(k), "--steps", str(steps),
               "--batch", "1024", "--lr", "4e-4", "--warmup", "100", "--seed", str(seed), "--threads",
               str(threads), "--log-every", "25", "--out", str(out_dir), "--overwrite", *flags]
        print(" ".join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"  {time.time() - t0:.0f} s", flush=True)
    m = json.loads(metrics.read_text())["models"][0]
    return m["nmse"], m["fvu"], m["dead_fraction"]


def table(rows, names):
    lines = ["| recipe | k | steps | seeds | NMSE (ref) | FVU | dead |", "|---|---:|---:|---:|---:|---:|---:|"]
    for (name, k, steps), v in sorted(rows.items(), key=lambda i: (i[0][2], i[0][1], names.index(i[0][0]))):
        a = np.array(v)
        f = lambda j, d: f"{a[:, j].mean():.{d}f}" + (f" ± {a[:, j].std(ddof=1):.{d}f}" if len(a) > 1 else "")
        lines.append(f"| {name} | {k} | {steps} | {len(a)} | {f(0, 4)} | {f(1, 4)} | {f(2, 3)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mxd", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--short-steps", type=int, default=300)
    ap.add_argument("--long-steps", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cached-only", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    short, long_ = {}, {}
    for k in (8, 32):
        for seed in seeds:
            for name, flags in KNOBS:
                slug = re.sub(r"\W+", "_", name).strip("_")
                r = run(a.mxd, out / f"abl_{slug}_k{k}_seed{seed}", k, a.short_steps, seed, flags, a.threads, a.cached_only)
                if r:
                    short.setdefault((name, k, a.short_steps), []).append(r)
    for seed in seeds:
        for k in (8, 32):
            for name, flags in RECIPES:
                r = run(a.mxd, out / f"long_{name.split(',')[0]}_k{k}_seed{seed}", k, a.long_steps, seed, flags, a.threads, a.cached_only)
                if r:
                    long_.setdefault((name, k, a.long_steps), []).append(r)
    text = (f"Each knob alone and all together, {a.short_steps} steps:\n\n" + table(short, [n for n, _ in KNOBS]) +
            f"\nThe recipes at {a.long_steps} steps:\n\n" + table(long_, [n for n, _ in RECIPES]))
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
