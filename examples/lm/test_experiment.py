# SPDX-License-Identifier: MIT
"""The fast version of the whole LM experiment (tiny LM, few steps, one k) in a fresh
directory, then checks of what it produced:
  - the LM learned (held-out CE below the uniform ln 256) and the table has every method at
    every seed at both lengths (the main one and the k sweep's second, each of its runs
    continued from the first), and the recipe ablation every knob; the SAELens reference row (which needs
    --saelens-python) is reported skipped;
  - the torch layers that are spliced into the LM compute what mxd computes: their FVU on the
    tool's held-out rows equals the FVU `mxd train` reported, and the MxD's outputs equal
    `mxd eval`'s on the same rows;
  - each pair is matched exactly in parameters (MxD = TopK, MxD+skip = skip transcoder), and
    the seeds train different layers;
  - with --mxd-torch: the same layers loaded by mxd_torch's from_file give the same outputs and,
    spliced into the LM, the same CE;
  - --mlp glu (one k, one seed): the SwiGLU LM learns, its dump is its MLP's input and output,
    its MLP spliced back through the Probe leaves the CE as it was, and the GLU MxD spliced in
    computes what mxd computes (torch FVU = the tool's);
  - the training-length study's stopping rule (two successive doublings with one order of the
    paper's four methods) on made-up means;
  - evaluation.json evaluates a checkpoint again unless its bytes are the ones evaluated.

    test_experiment.py path/to/mxd [--mxd-torch]
"""
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import experiment  # noqa: E402
import layers  # noqa: E402
import lm  # noqa: E402


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}")


def held_rows(acts):
    """The rows `mxd train` holds out: the last 5% of the file (train/data.hpp)."""
    t, _ = lm.load_file(acts)
    n = t["x"].shape[0]
    held = max(1, int(n * 0.05))
    return t["x"][n - held:], t["y"][n - held:]


def main():
    if not any(lm.FORTUNES.glob("*.dat")):
        print(f"SKIP: no fortunes in {lm.FORTUNES} (apt-get install fortunes)")
        sys.exit(77)
    mxd, with_mxd_torch = sys.argv[1], "--mxd-torch" in sys.argv[2:]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        experiment.main(["--mxd", mxd, "--out", str(out), "--fast", "--ablation"])
        res = json.loads((out / "results.json").read_text())
        seeds = experiment.FAST["seeds"]
        check(res["ce_original"] < math.log(256), f"the LM learned: held-out CE {res['ce_original']:.4f} < ln 256")
        steps, sweep = experiment.FAST["steps"], experiment.FAST["sweep_steps"]
        for s in (steps, sweep):
            check(sorted(r["method"] for r in res["rows"] if r["steps"] == s) == sorted(layers.METHODS * len(seeds)),
                  f"one row per method and seed ({len(seeds)} seeds) after {s} steps")
        check(all(r["steps"] in (steps, sweep) for r in res["rows"]), "no other length without --scaling-steps")
        cmd = json.loads((out / f"train_pair_k{experiment.FAST['ks'][0]}_s{sweep}_seed0" / "cmd.json").read_text())
        check(cmd[cmd.index("--steps") + 1] == str(sweep), f"the k sweep's second length trains to {sweep} steps")
        md = (out / "results.md").read_text()
        check(all(f"After {s * experiment.FAST['batch']} training tokens" in md for s in (steps, sweep)),
              "results.md tabulates both lengths")
        check(len(res["ablation"]) == len(layers.ABLATION) * len(seeds), "one ablation row per knob and seed")
        check("±" in (out / "results.md").read_text(), "the table gives mean ± std")
        check("topk_saelens_lib" in res["skipped"] and "topk_saelens_lib" in (out / "results.md").read_text(),
              "without --saelens-python the SAELens reference row is reported skipped")
        for f in ("results.md", "frontier.svg", "frontier_sweep.svg"):
            check((out / f).stat().st_size > 0, f"{f} written")

        k = experiment.FAST["ks"][0]
        x, y = held_rows(out / "acts_train.safetensors")
        y = y.double()
        for r in res["rows"]:
            path = out / r["checkpoint"]
            with torch.no_grad():
                pred = layers.load_layer(path)(x).double()
            fvu = float(((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
            # float32 layers on both sides, sums in float64: agreement to ~1e-6; 1e-4 allows
            # for top-k ties broken differently by a rounding difference.
            check(abs(fvu - r["tool_fvu"]) <= 1e-4 * r["tool_fvu"],
                  f"{r['method']}: torch FVU {fvu:.6g} = tool's {r['tool_fvu']:.6g}")

        mxd_path = out / f"train_pair_k{k}_s{steps}_seed0" / "mxd.safetensors"
        tensors, meta = lm.load_file(mxd_path)
        params = {n: v.numpy() for n, v in tensors.items() if not n.startswith("optim.")}
        lm.save_file(dict(params, x=x.numpy()), out / "eval_in.safetensors",
                     {m: meta[m] for m in ("activation", "k", "glu", "skip")})
        subprocess.run([mxd, "eval", str(out / "eval_in.safetensors"), str(out / "eval_out.safetensors"),
                        "--dtype", "f32", "--threads", "1"], check=True, stdout=subprocess.DEVNULL)
        ref = lm.load_file(out / "eval_out.safetensors")[0]["y"]
        with torch.no_grad():
            got = layers.load_layer(mxd_path)(x)
        err = float((got - ref).abs().max() / ref.abs().max())
        check(err < 1e-5, f"torch MxD = mxd eval on {x.shape[0]} rows (max relative error {err:.1e}, float32)")

        for seed in seeds:
            p = {r["method"]: r["params"] for r in res["rows"] if r["seed"] == seed}
            check(p["mxd"] == p["topk_transcoder"] == p["topk_saelens"] and
                  p["mxd_skip"] == p["skip_transcoder"] == p["skip_saelens"],
                  f"seed {seed}: pairs matched exactly (MxD {p['mxd']} = TopK {p['topk_transcoder']}, "
                  f"MxD+skip {p['mxd_skip']} = skip {p['skip_transcoder']})")
        a = lm.load_file(mxd_path)[0]
        b = lm.load_file(out / f"train_pair_k{k}_s{steps}_seed{seeds[1]}" / "mxd.safetensors")[0]
        check(not torch.equal(a["gate"], b["gate"]), "another seed trains another MxD")

        if with_mxd_torch:
            model = lm.load_lm(out / "lm.pt")
            _, entries = lm.corpus()
            held = lm.split(entries)[1]
            starts = lm.eval_starts(held, model.config["ctx"], experiment.FAST["eval_windows"])
            for r in res["rows"]:
                path = out / r["checkpoint"]
                layer = layers.load_layer(path, "mxd_torch")
                with torch.no_grad():
                    y_ext, y_ref = layer(x), layers.load_layer(path)(x)
                err = float((y_ext - y_ref).abs().max() / y_ref.abs().max())
                check(err < 1e-5, f"{r['method']}: mxd_torch from_file = torch layer (max relative error {err:.1e})")
                ce, _ = layers.spliced_ce(model, experiment.FAST["layer"], layer, held, starts)
                check(abs(ce - r["ce"]) < 1e-5 * r["ce"], f"{r['method']}: spliced CE with mxd_torch {ce:.6f} = {r['ce']:.6f}")
    check_glu(mxd)
    check_settled()
    check_evaluation_cache()
    print("1 passed, 0 failed")


def check_evaluation_cache():
    """evaluation.json is keyed by the checkpoint's path and bytes: the same file is not
    evaluated twice, a retrained one (other bytes, same path) is; an entry from before the hash
    was kept is taken as the file's."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        path = out / "train_x" / "model.safetensors"
        path.parent.mkdir()
        path.write_bytes(b"first")
        cache, calls = {}, []
        def fn():
            calls.append(1)
            return {"ce": float(len(calls))}
        check(layers.evaluated(cache, out, path, fn) == {"ce": 1.0}, "a new checkpoint is evaluated")
        check(layers.evaluated(cache, out, path, fn) == {"ce": 1.0} and len(calls) == 1,
              "the same bytes again: the cached result")
        path.write_bytes(b"retrained")
        check(layers.evaluated(cache, out, path, fn) == {"ce": 2.0}, "retrained at the same path: evaluated again")
        cache = {"train_x/model.safetensors": {"ce": 7.0}}
        check(layers.evaluated(cache, out, path, fn) == {"ce": 3.0} and len(calls) == 3,
              "an entry without a hash (an older cache) is evaluated again")
        check(layers.evaluated(cache, out, path, fn) == {"ce": 3.0} and len(calls) == 3,
              "and then carries the file's hash")


def check_settled():
    """The training-length study's stopping rule on made-up means: the order of the four
    methods must hold at t, 2t and 4t, and a length missing from the doublings breaks the run."""
    def sc(means):  # {tokens: [mean delta CE per method of layers.PAPER]}
        return {(m, t): {"delta_ce": (v, 0.0, 3)} for t, vs in means.items() for m, v in zip(layers.PAPER, vs)}
    moving = {1: [4, 3, 2, 1], 2: [3, 4, 2, 1], 4: [3, 4, 1, 2], 8: [3, 4, 1, 2], 16: [2, 4, 1, 0.5]}
    check(layers.settled(sc(moving), layers.PAPER, sorted(moving)) is None,
          "an order that changes within every two doublings has not settled")
    moving[16] = [2, 5, 1, 1.5]
    check(layers.settled(sc(moving), layers.PAPER, sorted(moving)) == [4, 8, 16],
          "the same order at 4, 8 and 16 tokens has settled there")
    moving[32] = [2, 5, 1.5, 1]
    check(layers.settled(sc(moving), layers.PAPER, sorted(moving)) is None,
          "an order that moves again at 32 has not settled at 4-16")
    del moving[32]
    del moving[8]
    check(layers.settled(sc(moving), layers.PAPER, sorted(moving)) is None,
          "a gap in the doublings (8 missing) does not count as settled")
    rows = [dict(method=m, k=32, tokens=t, params=1, **{stat: v for stat in layers.STATS})
            for t, vs in ((1000, [4, 3, 2, 1]), (4000, [4, 3, 2, 1])) for m, v in zip(layers.PAPER, vs)]
    text = "\n".join(layers.scaling_table({"config": {"scaling_k": 32}, "rows": rows}))
    check("cannot be applied" in text and "still moved" not in text,
          "two lengths 4x apart, one order: the table says the rule cannot be applied, not that the order moved")


def fvu(pred, y):
    return float(((pred.double() - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def check_glu(mxd):
    c = experiment.glu_config(experiment.FAST)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        experiment.main(["--mxd", mxd, "--out", str(out), "--fast", "--mlp", "glu", "--ks", "8", "--seeds", "0",
                         "--sweep-steps", "0"])
        res = json.loads((out / "results.json").read_text())
        check({r["steps"] for r in res["rows"]} == {c["steps"]}, "--sweep-steps 0: only the main length")
        check(res["ce_original"] < math.log(256), f"GLU LM learned: held-out CE {res['ce_original']:.4f} < ln 256")
        model = lm.load_lm(out / "lm.pt")
        mlp = model.h[c["layer"]].mlp
        check(isinstance(mlp, lm.GLU) and model.config["hidden"] == c["hidden"], "lm.pt reloads the GLU MLP")
        t, _ = lm.load_file(out / "acts_train.safetensors")
        with torch.no_grad():
            err = float((mlp(t["x"]) - t["y"]).abs().max() / t["y"].abs().max())
        check(err < 2e-3, f"the dump's y is the GLU MLP of its x (max relative error {err:.1e}, float16 dump)")
        _, entries = lm.corpus()
        held = lm.split(entries)[1]
        starts = lm.eval_starts(held, c["ctx"], c["eval_windows"])
        ce, probe = layers.spliced_ce(model, c["layer"], mlp, held, starts)
        check(ce == res["ce_original"] and probe.err == 0, f"the GLU MLP spliced back: CE {ce:.6f} unchanged")
        x, y = held_rows(out / "acts_train.safetensors")
        for r in res["rows"]:
            layer = layers.load_layer(out / r["checkpoint"])
            with torch.no_grad():
                f = fvu(layer(x), y.double())
            check(abs(f - r["tool_fvu"]) <= 1e-4 * r["tool_fvu"],
                  f"GLU LM, {r['method']} ({r['params']} parameters): torch FVU {f:.6g} = tool's {r['tool_fvu']:.6g}")
        mxd_row = next(r for r in res["rows"] if r["method"] == "mxd")
        check(layers.load_layer(out / mxd_row["checkpoint"]).glu, "the MxD mirrors the GLU MLP (--glu)")


if __name__ == "__main__":
    main()
