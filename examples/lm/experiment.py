# SPDX-License-Identifier: MIT
"""The paper's experiment in miniature: replace one MLP of a small byte-level LM trained on
the fortunes with an MxD, a TopK transcoder, a skip transcoder and an MxD with the skip path,
and both transcoders again with SAELens's training recipe (`--tc-recipe saelens`); each pair
matched exactly in parameters, same k, trained by `mxd train --data --models`, at several
seeds. Each is spliced back in and held-out next-token CE measured, as mean ± std. With
--saelens-python, a reference row too: the TopK transcoder trained by SAELens itself.

    /usr/bin/python3 examples/lm/experiment.py --mxd build/examples/mxd --out examples/lm/results --ablation

With --mlp glu the LM's MLPs are SwiGLU (about the GELU MLP's parameters), far less linear,
so that a skip path's linear share does not decide the comparison (issue 23, item 7).

Every stage is cached in --out (lm.pt, acts_*.safetensors, train_*/, ablation_*/,
evaluation.json) and reused by later runs: one command reproduces every table and plot.
"""
import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm  # noqa: E402
import layers  # noqa: E402

FULL = dict(d=64, layers=4, heads=4, hidden=256, ctx=128, mlp="gelu", lm_steps=600, lm_batch=32, lm_lr=3e-3,
            layer=1, dump_windows=4096, eval_windows=256, ks=[8, 16, 32, 64], seeds=[0, 1, 2],
            latents=2048, steps=1000, batch=1024, lr=4e-4, warmup=100, scaling_k=32,
            scaling_steps=[125, 250, 500, 1000, 2000, 4000], sweep_steps=4000, ablation_ks=[8, 32],
            ablation_steps=300)
# steps: the main length (1.02M tokens, the tables' first); scaling_steps: the training-length
# study at scaling_k; sweep_steps: every k again at this length (4.1M tokens, the end of the
# two doublings over which the study's order of the methods held), each run continued from
# its `steps` run.
# The ctest version: the same code on a tiny LM, few steps, one k, two seeds.
FAST = dict(FULL, d=32, layers=2, heads=2, hidden=128, ctx=32, lm_steps=30, lm_batch=16, layer=1,
            dump_windows=64, eval_windows=16, ks=[8], seeds=[0, 1], latents=256, steps=20, batch=256,
            warmup=5, scaling_steps=[], sweep_steps=40, ablation_ks=[8], ablation_steps=10)
# What lm.pt and the activation dump depend on: the caches of an --out made with other values
# are refused. (The trained layers are cached per run directory, with the command that made them.)
CACHED = ("d", "layers", "heads", "hidden", "ctx", "mlp", "lm_steps", "lm_batch", "lm_lr", "layer",
          "dump_windows", "eval_windows")
# Caches made before a setting existed were made with its default.
DEFAULTS = {"mlp": "gelu"}


def glu_config(c):
    """c with a SwiGLU MLP whose width keeps the GELU MLP's parameter count (nearest): the GELU
    MLP has (2 d + 1) hidden + d parameters, the GLU (3 d + 2) hidden + d; 170 for d 64, hidden 256."""
    return dict(c, mlp="glu", hidden=round(c["hidden"] * (2 * c["d"] + 1) / (3 * c["d"] + 2)))


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def check_cache(out, c):
    """The caches in `out` belong to the config in out/config.json: refuse to mix configs."""
    path = out / "config.json"
    if path.exists() and (out / "lm.pt").exists():
        old = json.loads(path.read_text())
        was = {k: old.get(k, DEFAULTS.get(k)) for k in CACHED}
        diff = sorted(k for k in CACHED if was[k] != c.get(k))
        if diff:
            raise SystemExit(f"{out} caches a run with other settings ({', '.join(f'{k}: {was[k]} -> {c.get(k)}' for k in diff)}); "
                             "use another --out or empty it")
    layers.write_text(path, json.dumps(c, indent=1) + "\n")


def get_lm(out, c, train):
    path = out / "lm.pt"
    if path.exists():
        return lm.load_lm(path)
    t0 = time.time()
    cfg = {k: c[k] for k in ("d", "layers", "heads", "hidden", "ctx", "mlp")}
    model = lm.train_lm(train, cfg, c["lm_steps"], c["lm_batch"], c["lm_lr"], seed=0, log=log)
    lm.save_lm(model, path)
    log(f"trained the LM in {time.time() - t0:.0f} s -> {path}")
    return model


def default_backend():
    try:
        import mxd_torch  # noqa: F401
        return "mxd_torch"
    except ImportError:
        return "torch"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mxd", required=True, help="path of the mxd tool (build/examples/mxd)")
    ap.add_argument("--out", required=True, help="output and cache directory")
    ap.add_argument("--fast", action="store_true", help="tiny LM, few steps, one k (the ctest run)")
    ap.add_argument("--mlp", choices=["gelu", "glu"], default="gelu",
                    help="the LM's MLP: GPT-2's GELU (default) or a SwiGLU of about its parameters, "
                         "much less linear; the MxD then mirrors it (--glu --activation silu)")
    ap.add_argument("--stage", choices=["lm", "all"], default="all", help="stop after training the LM")
    ap.add_argument("--threads", type=int, default=1, help="threads of torch and of mxd (default 1)")
    ap.add_argument("--backend", choices=["torch", "mxd_torch"], default=default_backend(),
                    help="how the trained layers run in the LM: mxd_torch (mxd's C++; the default "
                         "where it imports), or plain torch from the paper's equations, the "
                         "independent check; they agree to float rounding")
    ap.add_argument("--ks", help="comma-separated k to run (default: the config's, 8,16,32,64; none: only --ablation)")
    ap.add_argument("--seeds", help="comma-separated seeds of `mxd train --seed` (default: 0,1,2)")
    ap.add_argument("--ablation", action="store_true",
                    help="also train the TopK transcoder under each knob of SAELens's recipe "
                         "(ablation_ks, ablation_steps) and tabulate it")
    ap.add_argument("--scaling-steps", help="comma-separated lengths (steps) of the training-length study at "
                    "scaling_k, one run continued with --resume (default 125,...,4000; e.g. up to 16000 "
                    "for 16M tokens)")
    ap.add_argument("--sweep-steps", type=int,
                    help="the second length of every k, each run continued from the main one (default "
                         "4000, 4.1M tokens; 0: none)")
    ap.add_argument("--saelens-python",
                    help="a Python with sae_lens (e.g. /work/venv215/bin/python): adds the reference row "
                         "topk_saelens_lib, the TopK transcoder trained by SAELens itself "
                         "(saelens_reference.py); without it the row is reported skipped")
    ap.add_argument("--cached-only", action="store_true",
                    help="train nothing: tabulate the runs already cached in --out")
    args = ap.parse_args(argv)
    c = FAST if args.fast else FULL
    if args.mlp == "glu":
        c = glu_config(c)
    args.ks = [] if args.ks == "none" else [int(v) for v in args.ks.split(",")] if args.ks else c["ks"]
    args.seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else c["seeds"]
    if args.scaling_steps:  # not a cached setting: each length is its own run folder
        c = dict(c, scaling_steps=sorted(int(v) for v in args.scaling_steps.split(",")))
        if c["steps"] not in c["scaling_steps"]:
            raise SystemExit(f"--scaling-steps must include the main length, {c['steps']} steps")
    if args.sweep_steps is not None:  # not a cached setting either
        c = dict(c, sweep_steps=args.sweep_steps or None)
    if c["sweep_steps"] and c["sweep_steps"] <= c["steps"]:
        raise SystemExit(f"--sweep-steps {c['sweep_steps']} must be longer than the main length, {c['steps']} steps")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check_cache(out, c)
    lm.deterministic(0, args.threads)
    files, entries = lm.corpus()
    train, held = lm.split(entries)
    log(f"{len(files)} fortune files, {len(entries)} fortunes: {len(train)} training bytes, "
        f"{len(held)} held-out bytes")
    model = get_lm(out, c, train)
    if args.stage == "lm":
        return 0
    return layers.run_all(args, c, out, model, train, held, log)


if __name__ == "__main__":
    sys.exit(main())
