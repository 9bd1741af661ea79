# SPDX-License-Identifier: MIT
"""The experiment's stages after the LM: dump one block's MLP activations, train the three
replacements with `mxd train --data`, splice each into the LM, and tabulate and plot."""
import hashlib
import json
import math
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import lm

METHODS = ["mxd", "topk_transcoder", "skip_transcoder", "mxd_skip", "topk_saelens", "skip_saelens"]
# The paper's three methods, MxD with the skip transcoder's linear skip path (its expert count
# lowered to keep the parameter count), and both transcoders trained with SAELens's recipe
# (--tc-recipe saelens) instead of the MxD authors'; `runs` says how `mxd train` trains them.
REFERENCE = ["topk_saelens_lib"]
# A reference row, not one of the compared methods: the TopK transcoder trained by SAELens
# itself (saelens_reference.py, run by --saelens-python), to check mxd's imitation of its recipe.
TABLED = METHODS + REFERENCE
PAPER = METHODS[:4]  # the paper's comparison, each transcoder by the authors' recipe, and MxD+skip
SAELENS_SCRIPT = Path(__file__).resolve().parent / "saelens_reference.py"


# --- the trained layers, read from mxd's safetensors files, computed in plain torch ----------

class MxDLayer(nn.Module):
    """y = (z D) * (a C^T) (+ x W_skip^T) + b_out, a = top-k(relu(x G^T + b_gate)), with
    z = act(x E + b_enc), or with GLU z = act(x E + b_enc) * (x W_glu^T + b_glu).
    Written from the paper's equations in plain torch, independently of mxd's C++."""

    def __init__(self, path):
        super().__init__()
        t, meta = lm.load_file(path)
        if meta.get("model", "mxd") != "mxd":
            raise ValueError(f"{path}: not an MxD checkpoint: metadata {meta}")
        self.p, self.k, self.units = t, int(meta["k"]), t["gate"].shape[0]
        self.act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[meta["activation"]]
        self.glu = meta.get("glu", "0") == "1"
        self.n_params = sum(v.numel() for n, v in t.items() if not n.startswith("optim."))

    def forward(self, x):  # x: [..., d_in] -> y: [..., d_out]; last selection in self.idx
        p = self.p
        z = self.act(x @ p["W_enc"] + p["b_enc"])
        if self.glu:
            z = z * (x @ p["W_glu.weight"].T + p["W_glu.bias"])
        u = z @ p["W_dec"]
        top = torch.topk(F.relu(x @ p["gate"].T + p["gate_bias"]), self.k, dim=-1)
        self.idx, self.val = top.indices, top.values
        y = u * (torch.zeros(*x.shape[:-1], self.units).scatter(-1, top.indices, top.values) @ p["W_cond"].T)
        if "W_skip.weight" in p:
            y = y + x @ p["W_skip.weight"].T
        return y + p["b_dec_out"]


class TranscoderLayer(nn.Module):
    """y = top-k(relu(x W_enc + b_enc)) W_dec (+ x W_skip^T) + b_out: TopK / skip transcoder;
    with rank_by_decoder_norm (SAELens's rule, mxd's default baseline) the k latents are those
    of largest relu(pre) |W_dec row|, still weighted by relu(pre)."""

    def __init__(self, path):
        super().__init__()
        t, meta = lm.load_file(path)
        if meta.get("model") != "topk_transcoder":
            raise ValueError(f"{path}: not a transcoder checkpoint: metadata {meta}")
        self.p, self.k, self.units = t, int(meta["k"]), t["W_enc"].shape[1]
        self.n_params = sum(v.numel() for n, v in t.items() if not n.startswith("optim."))
        self.rank = t["W_dec"].norm(dim=1) if meta.get("rank_by_decoder_norm") == "1" else None

    def forward(self, x):  # x: [..., d_in] -> y: [..., d_out]
        p = self.p
        s = F.relu(x @ p["W_enc"] + p["b_enc"])
        if self.rank is None:
            top = torch.topk(s, self.k, dim=-1)
            self.idx, self.val = top.indices, top.values
        else:
            self.idx = torch.topk(s * self.rank, self.k, dim=-1).indices
            self.val = s.gather(-1, self.idx)
        y = torch.zeros(*x.shape[:-1], self.units).scatter(-1, self.idx, self.val) @ p["W_dec"]
        if "W_skip.weight" in p:
            y = y + x @ p["W_skip.weight"].T
        return y + p["b_dec_out"]


class MxdTorchLayer(nn.Module):
    """The same layers through mxd_torch: mxd's C++ forward on the tensors' own memory."""

    def __init__(self, path):
        super().__init__()
        import mxd_torch
        transcoder = "transcoder" in Path(path).name
        self.m = (mxd_torch.TopKTranscoder if transcoder else mxd_torch.MxD).from_file(path)
        self.k = self.m.config.k
        self.units = self.m.config.n_latents if transcoder else self.m.config.n_experts
        self.n_params = sum(p.numel() for p in self.m.parameters())

    def forward(self, x):  # x: [..., d_in] -> y: [..., d_out]; last selection in self.idx
        y = self.m(x.contiguous())
        self.idx, self.val = self.m.topk()
        return y


def load_layer(path, backend="torch"):
    """A trained layer from mxd's checkpoint at `path`: in plain torch, or with mxd_torch."""
    if backend == "mxd_torch":
        return MxdTorchLayer(path)
    return TranscoderLayer(path) if "transcoder" in Path(path).name else MxDLayer(path)


class Constant(nn.Module):
    """Mean ablation: the MLP's mean output over the training activations, for every token."""

    def __init__(self, mean):
        super().__init__()
        self.mean = mean

    def forward(self, x):  # x: [..., d] -> [..., d]
        return self.mean.expand(*x.shape[:-1], -1)


class Probe(nn.Module):
    """Stands in for the MLP: returns `layer(x)` and accumulates its error against the MLP's
    own output (for the normalised MSE) and which units it used (for the dead fraction)."""

    def __init__(self, mlp, layer):
        super().__init__()
        self.mlp, self.layer = mlp, layer
        self.err = self.sq = 0.0
        self.t_sum, self.n = 0.0, 0
        self.used = None

    def forward(self, x):  # x: [B, L, d]
        t, y = self.mlp(x).double(), self.layer(x)
        self.err += float(((y.double() - t) ** 2).sum())
        self.sq += float((t ** 2).sum())
        self.t_sum = self.t_sum + t.sum((0, 1))
        self.n += t.shape[0] * t.shape[1]
        if hasattr(self.layer, "idx"):
            if self.used is None:
                self.used = torch.zeros(self.layer.units, dtype=torch.bool)
            self.used[self.layer.idx[self.layer.val > 0]] = True
        return y

    def nmse(self):  # sum (y - t)^2 / sum (t - mean t)^2, the fraction of variance unexplained
        return self.err / (self.sq - float((self.t_sum ** 2).sum()) / self.n)

    def dead(self):
        return None if self.used is None else 1.0 - float(self.used.float().mean())


@torch.no_grad()
def held_out_ce(model, data, starts, batch=32):
    """Mean next-token cross-entropy (nats per byte) over the windows at `starts`."""
    total, n = 0.0, 0
    for i in range(0, len(starts), batch):
        x, t = lm.windows(data, model.config["ctx"], starts[i:i + batch])
        total += float(F.cross_entropy(model(x).flatten(0, 1), t.flatten(), reduction="sum"))
        n += t.numel()
    return total / n


@torch.no_grad()
def spliced_ce(model, index, layer, data, starts):
    """CE with block `index`'s MLP replaced by `layer`; returns (ce, probe) and restores it."""
    block = model.h[index]
    mlp = block.mlp
    probe = Probe(mlp, layer)
    block.mlp = probe
    try:
        return held_out_ce(model, data, starts), probe
    finally:
        block.mlp = mlp


# --- activations -----------------------------------------------------------------------------

@torch.no_grad()
def dump(model, index, data, starts, path, dtype="F16", batch=32):
    """Streams block `index`'s MLP input x and output y over the windows at `starts` into a
    safetensors file, `batch` windows at a time; returns the mean of y (float64)."""
    ctx, d = model.config["ctx"], model.config["d"]
    rows = len(starts) * ctx
    w = lm.StreamWriter(path, {"x": (rows, d), "y": (rows, d)}, dtype)
    got, y_sum = [], torch.zeros(d, dtype=torch.float64)
    handle = model.h[index].mlp.register_forward_hook(lambda m, i, o: got.append((i[0], o)))
    try:
        for i in range(0, len(starts), batch):
            got.clear()
            model(lm.windows(data, ctx, starts[i:i + batch])[0])
            x, y = (a.flatten(0, 1) for a in got[0])
            w.write("x", i * ctx, x.numpy())
            w.write("y", i * ctx, y.numpy())
            y_sum += y.double().sum(0)
    finally:
        handle.remove()
    w.close()
    return y_sum / rows


# --- training through the mxd tool -----------------------------------------------------------

def skip_latents(c):
    """The skip transcoder's width: the TopK transcoder's less the skip's d x d weights in units
    of a latent's 2 d + 1 (rounded), so all four methods are within a few parameters and each
    pair (MxD vs TopK, MxD+skip vs skip transcoder) is matched exactly by `mxd train --latents`."""
    return c["latents"] - round(c["d"] * c["d"] / (2 * c["d"] + 1))


def runs(c):
    """`mxd train` runs per (k, seed) as (tag, flags, {checkpoint file: method}): each model is
    trained once (--models), each pair in one run with the same batches, matched exactly
    (to the nearest expert with a GLU MxD, which mirrors a GLU LM's MLP as the paper's do)."""
    glu = ["--glu", "--activation", "silu"] if c.get("mlp") == "glu" else []
    return [("pair", ["--models", "mxd,topk", "--latents", str(c["latents"]), "--tc-recipe", "authors", *glu],
             {"mxd": "mxd", "topk_transcoder": "topk_transcoder"}),
            ("skip", ["--models", "mxd,skip", "--skip", "--latents", str(skip_latents(c)), "--tc-recipe", "authors",
                      *glu],
             {"mxd": "mxd_skip", "skip_transcoder": "skip_transcoder"}),
            ("topksl", ["--models", "topk", "--latents", str(c["latents"]), "--tc-recipe", "saelens"],
             {"topk_transcoder": "topk_saelens"}),
            ("skipsl", ["--models", "skip", "--latents", str(skip_latents(c)), "--tc-recipe", "saelens"],
             {"skip_transcoder": "skip_saelens"})]


def lengths(c, k):
    """The lengths (steps) at which k's runs are tabulated, each continued from the one before
    (`--resume`, which ends with the bytes of an uninterrupted run): the main length, the k
    sweep's second length, and at scaling_k the training-length study's."""
    chain = {c["steps"]} | ({c["sweep_steps"]} if c.get("sweep_steps") else set())
    return sorted(chain | (set(c["scaling_steps"]) if k == c["scaling_k"] else set()))


def train_tool(mxd, data, out_dir, c, k, steps, seed, threads, log, resume=None, flags=(),
               cached_only=False):
    """`mxd train --data` at one k; returns the metrics rows. A finished run in out_dir is
    reused when it was made by the same command (cmd.json), refused when not; with
    cached_only an unfinished one is not run (None)."""
    cmd = ["train", "--data", str(data), "--k", str(k), "--d-hidden", str(c["hidden"]),
           "--batch", str(c["batch"]), "--steps", str(steps), "--lr", str(c["lr"]),
           "--warmup", str(c["warmup"]), "--seed", str(seed), "--log-every", "25", *flags]
    full = [mxd, *cmd, "--threads", str(threads), "--out", str(out_dir)]
    if resume:
        full += ["--resume", str(resume)]
    else:  # a run killed before metrics.json leaves checkpoints that a fresh run replaces
        full += ["--overwrite"]
    return cached_run(out_dir, cmd, full, log, cached_only)


def cached_run(out_dir, cmd, full, log, cached_only, log_file=None):
    """Runs `full` (which writes out_dir/metrics.json; its output to log_file, else dropped)
    unless out_dir already holds the run of `cmd`; returns its metrics rows, or None when
    cached_only and not cached."""
    out_dir = Path(out_dir)
    metrics, cmd_file = out_dir / "metrics.json", out_dir / "cmd.json"
    if metrics.exists():
        if cmd_file.exists() and json.loads(cmd_file.read_text()) != cmd:
            raise SystemExit(f"{out_dir} caches a run of another command ({cmd_file}); remove it")
        return json.loads(metrics.read_text())["models"]
    if cached_only:
        return None
    log(" ".join(full))
    t0 = time.time()
    if log_file:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w") as f:
            subprocess.run(full, check=True, stdout=f, stderr=subprocess.STDOUT)
    else:
        subprocess.run(full, check=True, stdout=subprocess.DEVNULL)
    write_text(cmd_file, json.dumps(cmd) + "\n")
    log(f"  {time.time() - t0:.0f} s")
    return json.loads(metrics.read_text())["models"]


def saelens_probe(python):
    """Why the SAELens reference row cannot be trained with `python`, or None when it can."""
    if not python:
        return "no --saelens-python given"
    try:
        r = subprocess.run([python, str(SAELENS_SCRIPT), "--probe"], capture_output=True, text=True)
    except OSError as e:
        return f"{python}: {e}"
    if r.returncode:
        return f"`import sae_lens` fails under {python}: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def train_saelens(python, data, out_dir, c, k, steps, seed, threads, log, cached_only=False):
    """saelens_reference.py at one k for `steps` (the experiment's width, batch, lr); its output
    goes to out_dir/log.txt. Returns the metrics rows, as train_tool does."""
    cmd = ["--data", str(data), "--k", str(k), "--latents", str(c["latents"]), "--batch", str(c["batch"]),
           "--steps", str(steps), "--lr", str(c["lr"]), "--seed", str(seed)]
    full = [str(python), str(SAELENS_SCRIPT), *cmd, "--threads", str(threads), "--out", str(out_dir)]
    return cached_run(out_dir, cmd, full, log, cached_only, log_file=Path(out_dir) / "log.txt")


def evaluate(model, c, path, data, starts, ce_orig, ce_abl, backend):
    layer = load_layer(path, backend)
    ce, probe = spliced_ce(model, c["layer"], layer, data, starts)
    return {"params": layer.n_params, "ce": ce, "delta_ce": ce - ce_orig,
            "fraction_recovered": (ce_abl - ce) / (ce_abl - ce_orig),
            "nmse": probe.nmse(), "dead_fraction": probe.dead()}


def evaluated(cache, out, path, fn):
    """fn()'s result for the checkpoint `path`, cached in the dict `cache` (evaluation.json in
    --out) under its path in `out` with the file's SHA-256: reused only for the same bytes, so
    a checkpoint retrained at the same path (or cached before the hash was kept) is evaluated
    again."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    key = str(Path(path).relative_to(out))
    if cache.get(key, {}).get("sha256") != digest:
        cache[key] = fn()
    cache[key]["sha256"] = digest
    r = dict(cache[key])
    del r["sha256"]
    return r


class Linear(nn.Module):
    """y = x W + b: the least-squares linear map from the MLP's input to its output."""

    def __init__(self, W, b):
        super().__init__()
        self.W, self.b = W, b

    def forward(self, x):
        return x @ self.W + self.b


def linear_fit(acts, eval_fraction=0.05):
    """The best linear map (least squares, float64, with a bias) from x to y on the dump's
    training rows (the tool's split: the last 5% held out); returns (Linear, held-out FVU)."""
    t, _ = lm.load_file(acts)
    x, y = t["x"].double(), t["y"].double()
    n = x.shape[0]
    held = max(1, int(n * eval_fraction))
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    A, B = xa[:n - held], y[:n - held]
    sol = torch.linalg.solve(A.T @ A + 1e-9 * torch.eye(A.shape[1], dtype=A.dtype), A.T @ B)
    pred, t_h = xa[n - held:] @ sol, y[n - held:]
    fvu = float(((pred - t_h) ** 2).sum() / ((t_h - t_h.mean(0)) ** 2).sum())
    return Linear(sol[:-1].float(), sol[-1].float()), fvu


ABLATION = [  # (slug, name, flags): the two recipes, then SAELens's knobs one at a time
    # (train/baseline.hpp) over the authors' recipe, named explicitly so that the table does not
    # move with mxd's default; last, the two knobs that carry the effect, together
    ("authors", "authors", ["--tc-recipe", "authors"]),
    ("all", "all (saelens)", ["--tc-recipe", "saelens"]),
    ("mse", "mse loss", ["--tc-recipe", "authors", "--tc-loss", "mse"]),
    ("sse", "sse loss", ["--tc-recipe", "authors", "--tc-loss", "sse"]),
    ("clip", "clip grad 1", ["--tc-recipe", "authors", "--tc-clip-grad", "1"]),
    ("tied", "tied init 0.1", ["--tc-recipe", "authors", "--tc-init", "tied"]),
    ("no", "no warm-up", ["--tc-recipe", "authors", "--tc-warmup", "0"]),
    ("auxk", "AuxK d/2", ["--tc-recipe", "authors", "--tc-aux-k", "{aux_k}"]),
    ("free", "free decoder rows", ["--tc-recipe", "authors", "--tc-norm-dec", "off"]),
    ("rank", "free rows, ranked by norm", ["--tc-recipe", "authors", "--tc-norm-dec", "off",
                                           "--tc-rank-by-dec-norm", "on"]),
    ("tiednowarm", "tied init, no warm-up", ["--tc-recipe", "authors", "--tc-init", "tied", "--tc-warmup", "0"]),
]


def run_ablation(args, c, out, model, held, starts, ce_orig, ce_abl, cache, log):
    """The TopK transcoder alone (--models topk) under each knob of SAELens's recipe, at
    c["ablation_ks"], c["ablation_steps"] steps, each seed of --seeds; returns the rows."""
    rows = []
    acts = out / "acts_train.safetensors"
    for slug, name, flags in ABLATION:  # both recipes first, at every k and seed
        for k in c["ablation_ks"]:
            for seed in args.seeds:
                flags = [f.format(aux_k=c["d"] // 2) for f in flags]
                d = out / f"ablation_{slug}_k{k}_s{c['ablation_steps']}_seed{seed}"
                tool = train_tool(args.mxd, acts, d, c, k, c["ablation_steps"], seed, args.threads, log,
                                  flags=["--models", "topk", "--latents", str(c["latents"]), *flags],
                                  cached_only=args.cached_only)
                if tool is None:
                    continue
                path = d / "topk_transcoder.safetensors"
                r = evaluated(cache, out, path,
                              lambda: evaluate(model, c, path, held, starts, ce_orig, ce_abl, args.backend))
                r.update(recipe=name, k=k, seed=seed, steps=c["ablation_steps"], tool_fvu=tool[0]["fvu"])
                rows.append(r)
                log(f"  ablation {name:18s} k={k:3d} seed {seed} delta CE {r['delta_ce']:+.4f} "
                    f"nmse {r['nmse']:.4f} dead {r['dead_fraction']:.3f}")
    return rows


def run_all(args, c, out, model, train, held, log):
    rng = np.random.default_rng(1)
    ctx = c["ctx"]
    train_starts = np.sort(rng.integers(0, len(train) - ctx - 1, c["dump_windows"]))
    starts = lm.eval_starts(held, ctx, c["eval_windows"])
    acts = out / "acts_train.safetensors"
    mean_path = out / "mlp_mean.safetensors"
    if not (acts.exists() and mean_path.exists()):
        t0 = time.time()
        mean = dump(model, c["layer"], train, train_starts, acts)
        lm.save_file({"mean": mean.float().numpy()}, mean_path)
        log(f"dumped {len(train_starts) * ctx} rows of block {c['layer']}'s MLP in {time.time() - t0:.0f} s")
    mean = lm.load_file(mean_path)[0]["mean"]

    ce_orig = held_out_ce(model, held, starts)
    ce_abl, _ = spliced_ce(model, c["layer"], Constant(mean), held, starts)
    log(f"held-out CE: original {ce_orig:.4f}, mean-ablated MLP {ce_abl:.4f} nats/byte")
    cache_path = out / "evaluation.json"  # spliced CE per checkpoint: a rerun only tabulates
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}

    # 23.7: how much of the MLP is linear, and what the best linear map costs spliced in.
    lin_layer, lin_fvu = linear_fit(acts)
    ce_lin, lin_probe = spliced_ce(model, c["layer"], lin_layer, held, starts)
    linear = {"fvu_tool_rows": lin_fvu, "nmse": lin_probe.nmse(), "ce": ce_lin, "delta_ce": ce_lin - ce_orig,
              "fraction_recovered": (ce_abl - ce_lin) / (ce_abl - ce_orig)}
    log(f"best linear map: FVU {lin_fvu:.4f} (tool's held-out rows), NMSE {linear['nmse']:.4f} and CE "
        f"{ce_lin:.4f} (+{ce_lin - ce_orig:.4f}) on the held-out bytes")

    rows = []
    # The reference row needs SAELens in another Python; without it, reported skipped (cached
    # runs are still tabulated).
    skipped = {}
    sl_skip = saelens_probe(args.saelens_python) if args.ks else None
    for k in args.ks:
        for seed in args.seeds:
            for tag, flags, files in runs(c):
                prev = None
                for s in lengths(c, k):
                    d = out / f"train_{tag}_k{k}_s{s}_seed{seed}"
                    tool = train_tool(args.mxd, acts, d, c, k, s, seed, args.threads, log,
                                      resume=prev, flags=flags, cached_only=args.cached_only)
                    if tool is None:
                        break
                    prev = d
                    for file, method in files.items():
                        path = d / f"{file}.safetensors"
                        r = evaluated(cache, out, path,
                                      lambda: evaluate(model, c, path, held, starts, ce_orig, ce_abl, args.backend))
                        t = next(m for m in tool if m["name"] == file)
                        r.update(method=method, k=k, seed=seed, steps=s, tokens=s * c["batch"],
                                 tool_fvu=t["fvu"], checkpoint=str(path.relative_to(out)))
                        rows.append(r)
                        log(f"  {method:16s} k={k:3d} seed {seed} steps={s:5d} CE {r['ce']:.4f} "
                            f"(+{r['delta_ce']:.4f}) recovered {r['fraction_recovered']:.3f} nmse {r['nmse']:.4f}")
                write_text(cache_path, json.dumps(cache, indent=1) + "\n")
            # SAELens's trainer has no resume: each length is a run of its own, from the start.
            for s in [c["steps"]] + ([c["sweep_steps"]] if c["sweep_steps"] else []):
                d = out / f"train_saelenslib_k{k}_s{s}_seed{seed}"
                tool = train_saelens(args.saelens_python, acts, d, c, k, s, seed, args.threads, log,
                                     cached_only=args.cached_only or sl_skip is not None)
                if tool is None:
                    if sl_skip:
                        skipped["topk_saelens_lib"] = sl_skip
                    continue
                path = d / "topk_transcoder.safetensors"
                r = evaluated(cache, out, path,
                              lambda: evaluate(model, c, path, held, starts, ce_orig, ce_abl, args.backend))
                r.update(method="topk_saelens_lib", k=k, seed=seed, steps=s, tokens=s * c["batch"],
                         tool_fvu=tool[0]["fvu"], checkpoint=str(path.relative_to(out)))
                rows.append(r)
                log(f"  {'topk_saelens_lib':16s} k={k:3d} seed {seed} steps={s:5d} CE {r['ce']:.4f} "
                    f"(+{r['delta_ce']:.4f}) recovered {r['fraction_recovered']:.3f} nmse {r['nmse']:.4f}")
                write_text(cache_path, json.dumps(cache, indent=1) + "\n")
    ablation = run_ablation(args, c, out, model, held, starts, ce_orig, ce_abl, cache, log) if args.ablation else []
    write_text(cache_path, json.dumps(cache, indent=1) + "\n")
    result = {"config": c, "ks": args.ks, "seeds": args.seeds, "ce_original": ce_orig, "ce_mean_ablated": ce_abl,
              "eval_tokens": len(starts) * ctx, "train_rows": len(train_starts) * ctx, "linear": linear,
              "rows": rows, "ablation": ablation, "skipped": skipped}
    write_text(out / "results.json", json.dumps(result, indent=1) + "\n")
    write_text(out / "results.md", table(result))
    for name, steps in (("frontier.svg", c["steps"]), ("frontier_sweep.svg", c.get("sweep_steps"))):
        if rows_at(result, steps):
            write_text(out / name, frontier_svg(result, steps))
    if len({r["steps"] for r in rows if r["k"] == c["scaling_k"]}) > 1:
        write_text(out / "scaling.svg", scaling_svg(result))
    log(f"wrote {out}/results.md, results.json, frontier*.svg")
    print(table(result))
    return 0


def write_text(path, text):
    """Replaces path's contents at once; processes sharing an --out (one per seed, say) each
    write a temporary of their own, so the file is always one of theirs, never a mix."""
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_text(text)
    Path(tmp).replace(path)


def rows_at(result, steps):
    return [r for r in result["rows"] if r["steps"] == steps]


STATS = ("ce", "delta_ce", "fraction_recovered", "nmse", "dead_fraction")


def aggregate(rows, keys, stats=STATS):
    """Rows grouped by `keys`: {key tuple: {stat: (mean, std, n), "params": ...}} over seeds
    (std: the sample standard deviation, 0 for one seed)."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = {}
    for key, rs in groups.items():
        a = {"params": rs[0].get("params"), "n": len(rs)}
        for s in stats:
            v = np.array([r[s] for r in rs if r.get(s) is not None], dtype=float)
            a[s] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v))
        out[key] = a
    return out


def pm(stat, digits=4, sign=False):  # callers give delta CE 5 digits: its gaps at 4M tokens are ~1e-4
    m, sd, n = stat
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f.format(m) + (f" ± {sd:.{digits}f}" if n > 1 else "")


def verdict(a, b, lower_is_better=True):
    """'a' or 'b' when one interval (mean ± std) lies wholly on the better side, else 'overlap'."""
    (ma, sa, na), (mb, sb, nb) = a, b
    if na < 2 or nb < 2:
        return "one seed: no call"
    if ma + sa < mb - sb:
        return "first" if lower_is_better else "second"
    if mb + sb < ma - sa:
        return "second" if lower_is_better else "first"
    return "overlap"


PAIRS = [("mxd", "topk_transcoder"), ("mxd", "topk_saelens"), ("mxd_skip", "skip_transcoder"),
         ("mxd_skip", "skip_saelens"), ("mxd", "skip_transcoder"), ("topk_saelens", "topk_transcoder"),
         ("mxd", "topk_saelens_lib"), ("topk_saelens", "topk_saelens_lib")]


def table(result):
    seeds = result.get("seeds", [0])
    lines = [f"Held-out CE (nats/byte): original LM {result['ce_original']:.4f}, "
             f"MLP mean-ablated {result['ce_mean_ablated']:.4f}; {result['eval_tokens']} held-out bytes. "
             f"Each figure: mean ± sample std over seeds {', '.join(map(str, seeds))} of `mxd train --seed` "
             "(initialisation and data order).", ""]
    lin = result.get("linear")
    if lin:
        lines += [f"The best linear map from the MLP's input to its output (least squares on the dump): "
                  f"FVU {lin['fvu_tool_rows']:.4f} on the tool's held-out rows, NMSE {lin['nmse']:.4f} on the "
                  f"held-out bytes; spliced in, CE {lin['ce']:.4f} (delta {lin['delta_ce']:+.4f}, "
                  f"{lin['fraction_recovered']:.3f} recovered).", ""]
    for m, why in result.get("skipped", {}).items():
        lines += [f"{m} (the TopK transcoder trained by SAELens itself, a reference row): skipped, {why}.", ""]
    c = result["config"]
    for steps in (c["steps"], c.get("sweep_steps")):
        agg = aggregate(rows_at(result, steps), ("method", "k")) if steps else {}
        if agg:
            lines += k_table(agg, steps, steps * c["batch"])
    lines += scaling_table(result)
    abl = aggregate(result.get("ablation", []), ("recipe", "k"))
    if abl:
        steps = result["ablation"][0]["steps"]
        lines += [f"The TopK transcoder's recipe, knob by knob ({steps} steps of {result['config']['batch']} "
                  "rows, `--models topk`; mean ± std over seeds):", "",
                  "| recipe | k | seeds | delta CE | CE recovered | NMSE | dead |", "|---|---:|---:|---:|---:|---:|---:|"]
        names = [n for _, n, _ in ABLATION]
        for (name, k), a in sorted(abl.items(), key=lambda i: (i[0][1], names.index(i[0][0]))):
            lines.append(f"| {name} | {k} | {a['n']} | {pm(a['delta_ce'], 5, sign=True)} | "
                         f"{pm(a['fraction_recovered'], 3)} | {pm(a['nmse'])} | {pm(a['dead_fraction'], 3)} |")
    return "\n".join(lines) + "\n"


def k_table(agg, steps, tokens):
    """Every method at every k after `steps` steps (agg: aggregate over ("method", "k")), then
    the pairs' verdicts."""
    lines = [f"After {tokens} training tokens ({steps} steps):", "",
             "| method | k | params | seeds | delta CE | CE recovered | NMSE | dead |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (m, k), a in sorted(agg.items(), key=lambda i: (TABLED.index(i[0][0]), i[0][1])):
        lines.append(f"| {m} | {k} | {a['params']} | {a['n']} | {pm(a['delta_ce'], 5, sign=True)} | "
                     f"{pm(a['fraction_recovered'], 3)} | {pm(a['nmse'])} | {pm(a['dead_fraction'], 3)} |")
    lines += ["", f"Pairs after {tokens} tokens (delta CE; a win only where the mean ± std intervals do not "
              "overlap):", "", "| k | first | second | first's delta CE | second's delta CE | lower |",
              "|---:|---|---|---:|---:|---|"]
    for k in sorted({k for _, k in agg}):
        for a, b in PAIRS:
            if (a, k) in agg and (b, k) in agg:
                v = verdict(agg[(a, k)]["delta_ce"], agg[(b, k)]["delta_ce"])
                who = {"first": a, "second": b}.get(v, v)
                lines.append(f"| {k} | {a} | {b} | {pm(agg[(a, k)]['delta_ce'], 5, sign=True)} | "
                             f"{pm(agg[(b, k)]['delta_ce'], 5, sign=True)} | {who} |")
    return lines + [""]


def order(sc, methods, tokens):
    """`methods` by mean delta CE at `tokens`, lowest first (sc: aggregate over ("method", "tokens"))."""
    return tuple(sorted((m for m in methods if (m, tokens) in sc), key=lambda m: sc[(m, tokens)]["delta_ce"][0]))


def settled(sc, methods, tokens):
    """The first three lengths t, 2t, 4t from which on every length has one order of all
    `methods`, or None: two successive doublings of the training, and all longer runs, leave
    the ranking unchanged (issue 23's criterion)."""
    for t in tokens:
        run = [t, 2 * t, 4 * t]
        if all(u in tokens for u in run):
            orders = {order(sc, methods, u) for u in tokens if u >= t}
            if len(orders) == 1 and len(next(iter(orders))) == len(methods):
                return run
    return None


def scaling_table(result):
    """delta CE at every length of the training-length study (k = scaling_k), the order of the
    methods at each, and where the paper's four stop moving."""
    sk = result["config"]["scaling_k"]
    sc = aggregate([r for r in result["rows"] if r["k"] == sk], ("method", "tokens"))
    tokens = sorted({t for _, t in sc})
    if len(tokens) < 2:
        return []
    methods = [m for m in METHODS if any((m, t) in sc for t in tokens)]
    lines = [f"Training length at k = {sk} (delta CE, mean ± std over seeds; order: the paper's four "
             "methods by mean, lowest first):", "",
             "| tokens | " + " | ".join(methods) + " | order |", "|---:|" + "---:|" * len(methods) + "---|"]
    for t in tokens:
        lines.append(f"| {t} | " + " | ".join(pm(sc[(m, t)]["delta_ce"], 5, sign=True) if (m, t) in sc else ""
                                              for m in methods) + " | " + " < ".join(order(sc, PAPER, t)) + " |")
    run = settled(sc, PAPER, tokens)
    doublings = any(all(u in tokens for u in (t, 2 * t, 4 * t)) for t in tokens)
    lines += ["", f"The order of the paper's four methods is the same at {run[0]}, {run[1]} and {run[2]} tokens: "
              "two successive doublings leave it unchanged." if run else
              f"The order of the paper's four methods still moved within the last two doublings (to {tokens[-1]} "
              "tokens)." if doublings else
              "These lengths hold no two successive doublings (t, 2t, 4t): the rule that the order has "
              "settled cannot be applied."]
    return lines + [""]


COLORS = {"mxd": "#d62728", "topk_transcoder": "#1f77b4", "skip_transcoder": "#2ca02c", "mxd_skip": "#9467bd",
          "topk_saelens": "#17becf", "skip_saelens": "#bcbd22", "topk_saelens_lib": "#7f7f7f"}
MARKS = {"mxd": "circle", "topk_transcoder": "square", "skip_transcoder": "diamond", "mxd_skip": "triangle",
         "topk_saelens": "square", "skip_saelens": "diamond", "topk_saelens_lib": "square"}


def line_plot(title, xlabel, ylabel, series, xticks, log_x=True, log_y=False):
    """A small SVG line chart: series {name: [(x, y), ...]}, ticks at `xticks`, markers."""
    W, H, L, R, T, B = 640, 420, 80, 190, 40, 60
    gy = math.log10 if log_y else (lambda v: v)
    series = {n: [p if len(p) == 3 else (p[0], p[1], 0.0) for p in pts] for n, pts in series.items()}
    ys = [gy(v) for pts in series.values() for _, y, e in pts for v in (y - e, y + e) if not log_y or v > 0]
    lo, hi = min(ys) if log_y else min(ys + [0.0]), max(ys)
    span = hi - lo or 1
    hi, lo = hi + 0.05 * span, lo - (0.05 * span if log_y else 0)
    fx = (lambda v: math.log2(v)) if log_x else (lambda v: v)
    x0, x1 = fx(min(xticks)), fx(max(xticks))
    pad = 0.06 * (x1 - x0) or 0.5  # markers clear of the axes
    x0, x1 = x0 - pad, x1 + pad
    px = lambda v: L + (fx(v) - x0) / (x1 - x0) * (W - L - R)
    py = lambda v: H - B - (gy(v) - lo) / (hi - lo) * (H - T - B)
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2 - R / 2 + L / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
         f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
         f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
         f'<text x="{(L + W - R) / 2}" y="{H - 15}" text-anchor="middle">{xlabel}</text>',
         f'<text transform="translate(20 {(T + H - B) / 2}) rotate(-90)" text-anchor="middle">{ylabel}</text>']
    for v in xticks:
        s.append(f'<line x1="{px(v):.1f}" y1="{H - B}" x2="{px(v):.1f}" y2="{H - B + 5}" stroke="black"/>')
        s.append(f'<text x="{px(v):.1f}" y="{H - B + 18}" text-anchor="middle">{v}</text>')
    for i in range(6):
        v = lo + (hi - lo) * i / 5
        v = 10 ** v if log_y else v
        s.append(f'<line x1="{L - 5}" y1="{py(v):.1f}" x2="{W - R}" y2="{py(v):.1f}" stroke="#ddd"/>')
        s.append(f'<text x="{L - 8}" y="{py(v) + 4:.1f}" text-anchor="end">{format(v, ".2g" if log_y else ".3f")}</text>')
    for j, (name, pts) in enumerate(series.items()):
        col = COLORS[name]
        s.append(f'<polyline fill="none" stroke="{col}" stroke-width="2" points="'
                 + " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y, _ in pts) + '"/>')
        for x, y, e in pts:
            if e > 0:  # the spread over seeds: mean +- std
                y0, y1 = py(y - e) if not log_y or y - e > 0 else H - B, py(y + e)
                s.append(f'<line x1="{px(x):.1f}" y1="{y0:.1f}" x2="{px(x):.1f}" y2="{y1:.1f}" stroke="{col}" stroke-width="1.5"/>')
                for yy in (y0, y1):
                    s.append(f'<line x1="{px(x) - 4:.1f}" y1="{yy:.1f}" x2="{px(x) + 4:.1f}" y2="{yy:.1f}" stroke="{col}" stroke-width="1.5"/>')
            s.append(marker(MARKS[name], px(x), py(y), col))
        ly = T + 10 + 22 * j
        s.append(f'<line x1="{W - R + 15}" y1="{ly}" x2="{W - R + 45}" y2="{ly}" stroke="{col}" stroke-width="2"/>')
        s.append(marker(MARKS[name], W - R + 30, ly, col))
        s.append(f'<text x="{W - R + 52}" y="{ly + 4}">{name}</text>')
    return "\n".join(s) + "\n</svg>\n"


def marker(kind, x, y, col):
    if kind == "circle":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{col}"/>'
    if kind == "square":
        return f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{col}"/>'
    if kind == "triangle":
        return f'<polygon points="{x:.1f},{y - 5.5:.1f} {x + 5.5:.1f},{y + 4.5:.1f} {x - 5.5:.1f},{y + 4.5:.1f}" fill="{col}"/>'
    return f'<polygon points="{x:.1f},{y - 5.5:.1f} {x + 5.5:.1f},{y:.1f} {x:.1f},{y + 5.5:.1f} {x - 5.5:.1f},{y:.1f}" fill="{col}"/>'


def frontier_svg(result, steps):
    agg = aggregate(rows_at(result, steps), ("method", "k"))
    series = {m: sorted((k, a["delta_ce"][0], a["delta_ce"][1]) for (mm, k), a in agg.items() if mm == m)
              for m in TABLED}
    return line_plot(f"CE increase, MLP replaced, {steps * result['config']['batch'] / 1e6:.1f}M tokens (bars: ± std)",
                     "k (experts / latents per token)", "delta CE (nats/byte)",
                     {m: v for m, v in series.items() if v}, sorted({k for _, k in agg}))


def scaling_svg(result):
    c = result["config"]
    agg = aggregate([r for r in result["rows"] if r["k"] == c["scaling_k"]], ("method", "tokens"))
    tokens = sorted({t for _, t in agg})
    series = {m: sorted((t, a["delta_ce"][0], a["delta_ce"][1]) for (mm, t), a in agg.items() if mm == m)
              for m in METHODS}
    series = {m: v for m, v in series.items() if v}
    positive = all(y - e > 0 for pts in series.values() for _, y, e in pts)
    return line_plot(f"delta CE against training tokens, k = {c['scaling_k']}", "training tokens",
                     "delta CE (nats/byte)" + (", log scale" if positive else ""), series, tokens,
                     log_y=positive)
