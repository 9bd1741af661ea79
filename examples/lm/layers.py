# SPDX-License-Identifier: MIT
"""The experiment's stages after the LM: dump one block's MLP activations, train the three
replacements with `mxd train --data`, splice each into the LM, and tabulate and plot."""
import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import lm

METHODS = ["mxd", "topk_transcoder", "skip_transcoder", "mxd_skip"]
# The paper's three methods, and MxD with the skip transcoder's linear skip path (its expert
# count lowered to keep the parameter count): `mxd train` runs as (tag, --baseline, extra
# flags, {checkpoint file: method}). A skip-baseline run retrains the same MxD; it is not used.
RUNS = [("topk", "topk", [], {"mxd": "mxd", "topk_transcoder": "topk_transcoder"}),
        ("skip", "skip", [], {"skip_transcoder": "skip_transcoder"}),
        ("mxdskip", "none", ["--skip"], {"mxd": "mxd_skip"})]


# --- the trained layers, read from mxd's safetensors files, computed in plain torch ----------

class MxDLayer(nn.Module):
    """y = (act(x E + b_enc) D) * (a C^T) (+ x W_skip^T) + b_out, a = top-k(relu(x G^T + b_gate)).
    Written from the paper's equations in plain torch, independently of mxd's C++."""

    def __init__(self, path):
        super().__init__()
        t, meta = lm.load_file(path)
        if meta.get("model", "mxd") != "mxd" or meta.get("glu", "0") != "0":
            raise ValueError(f"{path}: not a (non-GLU) MxD checkpoint: metadata {meta}")
        self.p, self.k, self.units = t, int(meta["k"]), t["gate"].shape[0]
        self.act = {"gelu": F.gelu, "relu": F.relu}[meta["activation"]]
        self.n_params = sum(v.numel() for n, v in t.items() if not n.startswith("optim."))

    def forward(self, x):  # x: [..., d_in] -> y: [..., d_out]; last selection in self.idx
        p = self.p
        u = self.act(x @ p["W_enc"] + p["b_enc"]) @ p["W_dec"]
        top = torch.topk(F.relu(x @ p["gate"].T + p["gate_bias"]), self.k, dim=-1)
        self.idx, self.val = top.indices, top.values
        y = u * (torch.zeros(*x.shape[:-1], self.units).scatter(-1, top.indices, top.values) @ p["W_cond"].T)
        if "W_skip.weight" in p:
            y = y + x @ p["W_skip.weight"].T
        return y + p["b_dec_out"]


class TranscoderLayer(nn.Module):
    """y = top-k(relu(x W_enc + b_enc)) W_dec (+ x W_skip^T) + b_out: TopK / skip transcoder."""

    def __init__(self, path):
        super().__init__()
        t, meta = lm.load_file(path)
        if meta.get("model") != "topk_transcoder":
            raise ValueError(f"{path}: not a transcoder checkpoint: metadata {meta}")
        self.p, self.k, self.units = t, int(meta["k"]), t["W_enc"].shape[1]
        self.n_params = sum(v.numel() for n, v in t.items() if not n.startswith("optim."))

    def forward(self, x):  # x: [..., d_in] -> y: [..., d_out]
        p = self.p
        top = torch.topk(F.relu(x @ p["W_enc"] + p["b_enc"]), self.k, dim=-1)
        self.idx, self.val = top.indices, top.values
        y = torch.zeros(*x.shape[:-1], self.units).scatter(-1, top.indices, top.values) @ p["W_dec"]
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

def train_tool(mxd, data, out_dir, c, k, baseline, steps, threads, log, resume=None, flags=()):
    """`mxd train --data` at one k for an MxD and a baseline; returns the metrics rows."""
    metrics = Path(out_dir) / "metrics.json"
    if metrics.exists():
        return json.loads(metrics.read_text())["models"]
    cmd = [mxd, "train", "--data", str(data), "--k", str(k), "--baseline", baseline,
           "--d-hidden", str(c["hidden"]), "--expansion", str(c["expansion"]),
           "--batch", str(c["batch"]), "--steps", str(steps), "--lr", str(c["lr"]),
           "--warmup", str(c["warmup"]), "--threads", str(threads), "--seed", "0",
           "--log-every", "25", "--out", str(out_dir), *flags]
    if resume:
        cmd += ["--resume", str(resume)]
    else:  # a run killed before metrics.json leaves checkpoints that a fresh run replaces
        cmd += ["--overwrite"]
    log(" ".join(cmd))
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    log(f"  {time.time() - t0:.0f} s")
    return json.loads(metrics.read_text())["models"]


def evaluate(model, c, path, data, starts, ce_orig, ce_abl, backend):
    layer = load_layer(path, backend)
    ce, probe = spliced_ce(model, c["layer"], layer, data, starts)
    return {"params": layer.n_params, "ce": ce, "delta_ce": ce - ce_orig,
            "fraction_recovered": (ce_abl - ce) / (ce_abl - ce_orig),
            "nmse": probe.nmse(), "dead_fraction": probe.dead()}


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

    rows = []
    for k in c["ks"]:
        for tag, baseline, flags, files in RUNS:
            chain = k == c["scaling_k"] and tag != "mxdskip" and c["scaling_steps"]
            prev = None
            for s in c["scaling_steps"] if chain else [c["steps"]]:
                d = out / f"train_{tag}_k{k}_s{s}"
                tool = train_tool(args.mxd, acts, d, c, k, baseline, s, args.threads, log,
                                  resume=prev and prev / "mxd.safetensors", flags=flags)
                prev = d
                for file, method in files.items():
                    r = evaluate(model, c, d / f"{file}.safetensors", held, starts, ce_orig, ce_abl, args.backend)
                    t = next(m for m in tool if m["name"] == file)
                    r.update(method=method, k=k, steps=s, tokens=s * c["batch"], tool_fvu=t["fvu"],
                             checkpoint=str((d / f"{file}.safetensors").relative_to(out)))
                    rows.append(r)
                    log(f"  {method:16s} k={k:3d} steps={s:5d} CE {r['ce']:.4f} (+{r['delta_ce']:.4f}) "
                        f"recovered {r['fraction_recovered']:.3f} nmse {r['nmse']:.4f}")
    result = {"config": c, "ce_original": ce_orig, "ce_mean_ablated": ce_abl,
              "eval_tokens": len(starts) * ctx, "train_rows": len(train_starts) * ctx, "rows": rows}
    write_text(out / "results.json", json.dumps(result, indent=1) + "\n")
    write_text(out / "results.md", table(result))
    write_text(out / "frontier.svg", frontier_svg(result))
    if len(c["scaling_steps"]) > 1:
        write_text(out / "scaling.svg", scaling_svg(result))
    log(f"wrote {out}/results.md, results.json, frontier.svg")
    print(table(result))
    return 0


def write_text(path, text):
    tmp = f"{path}.tmp"
    Path(tmp).write_text(text)
    Path(tmp).replace(path)


def final_rows(result):
    steps = result["config"]["steps"]
    return [r for r in result["rows"] if r["steps"] == steps]


def table(result):
    lines = [f"Held-out CE (nats/byte): original LM {result['ce_original']:.4f}, "
             f"MLP mean-ablated {result['ce_mean_ablated']:.4f}; {result['eval_tokens']} held-out bytes.",
             "", "| method | k | params | CE | delta CE | CE recovered | NMSE | dead |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(final_rows(result), key=lambda r: (METHODS.index(r["method"]), r["k"])):
        lines.append(f"| {r['method']} | {r['k']} | {r['params']} | {r['ce']:.4f} | {r['delta_ce']:+.4f} | "
                     f"{r['fraction_recovered']:.3f} | {r['nmse']:.4f} | {r['dead_fraction']:.3f} |")
    sc = [r for r in result["rows"] if r["k"] == result["config"]["scaling_k"]]
    if len({r["steps"] for r in sc}) > 1:
        lines += ["", f"Training length at k = {result['config']['scaling_k']} (delta CE):", "",
                  "| tokens | " + " | ".join(CHAINED) + " |", "|---:|" + "---:|" * len(CHAINED)]
        for s in sorted({r["steps"] for r in sc}):
            by = {r["method"]: r for r in sc if r["steps"] == s}
            lines.append(f"| {by['mxd']['tokens']} | " + " | ".join(f"{by[m]['delta_ce']:+.4f}" for m in CHAINED) + " |")
    return "\n".join(lines) + "\n"


CHAINED = METHODS[:3]  # the methods the training-length study follows
COLORS = {"mxd": "#d62728", "topk_transcoder": "#1f77b4", "skip_transcoder": "#2ca02c", "mxd_skip": "#9467bd"}
MARKS = {"mxd": "circle", "topk_transcoder": "square", "skip_transcoder": "diamond", "mxd_skip": "triangle"}


def line_plot(title, xlabel, ylabel, series, xticks, log_x=True, log_y=False):
    """A small SVG line chart: series {name: [(x, y), ...]}, ticks at `xticks`, markers."""
    W, H, L, R, T, B = 640, 420, 80, 190, 40, 60
    gy = math.log10 if log_y else (lambda v: v)
    ys = [gy(y) for pts in series.values() for _, y in pts]
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
                 + " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts) + '"/>')
        for x, y in pts:
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


def frontier_svg(result):
    rows = final_rows(result)
    series = {m: sorted((r["k"], r["delta_ce"]) for r in rows if r["method"] == m) for m in METHODS}
    return line_plot("held-out CE increase with the MLP replaced", "k (experts / latents per token)",
                     "delta CE (nats/byte)", {m: v for m, v in series.items() if v}, result["config"]["ks"])


def scaling_svg(result):
    c = result["config"]
    rows = [r for r in result["rows"] if r["k"] == c["scaling_k"]]
    tokens = sorted({r["tokens"] for r in rows})
    series = {m: sorted((r["tokens"], r["delta_ce"]) for r in rows if r["method"] == m) for m in CHAINED}
    positive = all(y > 0 for pts in series.values() for _, y in pts)
    return line_plot(f"delta CE against training tokens, k = {c['scaling_k']}", "training tokens",
                     "delta CE (nats/byte)" + (", log scale" if positive else ""), series, tokens,
                     log_y=positive)
