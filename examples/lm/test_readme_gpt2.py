# SPDX-License-Identifier: MIT
"""Runs the GPT-2 activation-dump snippet of examples/mxd/README.md ("Training on real
activations") as written, on a GPT2Model built from a small config (9 blocks so that h[8]
exists, random weights) and a byte-level tokenizer made here, so no download is needed. Checks
that the hook leaves the model's output unchanged, that the file holds each token's MLP input x
and output y, and that `mxd train --data` reads it.

    test_readme_gpt2.py examples/mxd/README.md [path/to/mxd]      exit 77 (skipped) without `transformers`
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

try:
    import transformers
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode
except ImportError as e:
    print(f"SKIP: transformers is not importable ({e})")
    sys.exit(77)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm  # noqa: E402


def snippet(readme):
    """The python block that follows "To dump GPT-2's layer-8 MLP input and output"."""
    text = Path(readme).read_text()
    m = re.search(r"To dump GPT-2's layer-8 MLP input and output:\s*```python\n(.*?)```", text, re.S)
    if not m:
        raise SystemExit(f"{readme}: the GPT-2 dump snippet was not found")
    return m.group(1)


def small_gpt2(*args, **kwargs):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=9, n_embd=32, n_head=2, n_positions=256, vocab_size=257)
    return transformers.GPT2Model(cfg)


def byte_tokenizer(directory):
    """A GPT2TokenizerFast over the 256 byte symbols and no merges: one token per byte."""
    def make(*args, **kwargs):
        vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
        vocab["<|endoftext|>"] = 256
        (directory / "vocab.json").write_text(json.dumps(vocab))
        (directory / "merges.txt").write_text("#version: 0.2\n")
        return transformers.GPT2TokenizerFast(str(directory / "vocab.json"), str(directory / "merges.txt"))
    return make


def main():
    if not any(lm.FORTUNES.glob("*.dat")):
        print(f"SKIP: no fortunes in {lm.FORTUNES} (apt-get install fortunes)")
        sys.exit(77)
    readme, mxd = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
    code = snippet(readme)
    _, entries = lm.corpus()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus.txt").write_text("\n\n".join(entries[:40]) + "\n\n")
        transformers.GPT2Model.from_pretrained = small_gpt2
        transformers.GPT2TokenizerFast.from_pretrained = byte_tokenizer(tmp)
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            ns = {}
            exec(compile(code, f"{readme} (GPT-2 dump snippet)", "exec"), ns)
        finally:
            os.chdir(cwd)
        model, tok, texts = ns["model"], ns["tok"], ns["texts"]
        tensors, _ = lm.load_file(tmp / "gpt2_l8.safetensors")
        x, y = tensors["x"], tensors["y"]
        n = sum(len(tok(t, truncation=True, max_length=256)["input_ids"]) for t in texts)
        assert texts and x.shape == (n, 32) and y.shape == (n, 32), (x.shape, y.shape, n)

        # The hook returns nothing: the model computes the same with and without it.
        ids = tok(texts[0], return_tensors="pt")
        with torch.no_grad():
            hooked = model(**ids).last_hidden_state
            model.h[8].mlp._forward_hooks.clear()
            plain = model(**ids).last_hidden_state
            y_ref = model.h[8].mlp(x)
        assert torch.equal(hooked, plain), "the hook changed the model's output"
        # y is the MLP of x, up to float16 rounding of y (and of x, amplified by the MLP).
        err = float((y - y_ref).abs().max() / y_ref.abs().max())
        assert err < 1e-2, f"dumped y differs from mlp(x) by {err} (relative to max |y|)"
        print(f"snippet ran: {n} tokens dumped, x and y [{n}, 32] float16, max relative error {err:.1e}")

        if mxd:
            out = subprocess.run([mxd, "train", "--data", str(tmp / "gpt2_l8.safetensors"), "--d-hidden", "128",
                                  "--k", "4", "--expansion", "8", "--steps", "3", "--batch", "64", "--threads", "1",
                                  "--out", str(tmp / "train")], capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            print(out.stdout.strip().splitlines()[-2])
    print("1 passed, 0 failed")


if __name__ == "__main__":
    main()
