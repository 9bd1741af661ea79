# SPDX-License-Identifier: MIT
"""Runs the Python snippets about mxd_torch as written: those of README.md's "Use it from
PyTorch" section and every one of examples/torch/README.md.

The GPT-2 snippet needs `transformers`; without it that snippet is reported as skipped. It
runs on a GPT2Model built from a small config (9 layers, width 32, random weights): the test
substitutes GPT2Model.from_pretrained, so no download is needed and every other line of the
snippet runs unchanged.

    /usr/bin/python3 tests/torch/test_readme.py [--device cuda]

With --device the snippets run with that device as torch's default (torch.set_default_device,
torch >= 2.0), as a user with a GPU would run them: their tensors, the GPT-2 model and the
mxd_torch layers (device=None follows torch's default, as torch's layers do) are created
there. Where that device is not available the run reports itself skipped.
"""
import os
import re
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
# (file, section heading or None for the whole file, how many Python snippets it must have)
SOURCES = [("README.md", "## Use it from PyTorch", 1),
           (os.path.join("examples", "torch", "README.md"), None, 2)]


def snippets():
    """(where, code) for each Python block of SOURCES, in order."""
    found = []
    for name, heading, expected in SOURCES:
        text = open(os.path.join(ROOT, name), encoding="utf-8").read()
        if heading:
            start = text.index(heading)
            end = text.find("\n## ", start + 1)
            text = text[start:end if end >= 0 else len(text)]
        blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
        where = f"{name} ({heading.lstrip('# ')})" if heading else name
        assert len(blocks) >= expected, f"expected {expected} Python snippets in {where}, found {len(blocks)}"
        found += [(f"{where} snippet {i}", code) for i, code in enumerate(blocks)]
    return found


def small_gpt2():
    import transformers

    def from_pretrained(cls, name, *args, **kwargs):
        assert name == "gpt2", name
        torch.manual_seed(0)
        return cls(transformers.GPT2Config(n_layer=9, n_embd=32, n_head=2, n_positions=128,
                                           vocab_size=500))

    transformers.GPT2Model.from_pretrained = classmethod(from_pretrained)


def check_basic(ns):
    layer, x, y = ns["layer"], ns["x"], ns["y"]
    assert tuple(y.shape) == tuple(x.shape[:-1]) + (layer.config.d_out,)
    for t in (x, layer.W_enc, layer.W_cond):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    idx, vals = ns["idx"], ns["vals"]
    assert tuple(idx.shape) == (x.shape[0], layer.config.k), idx.shape


def check_gpt2(ns):
    import mxd_torch
    model, layer, x, y = ns["model"], ns["layer"], ns["x"], ns["y"]
    assert isinstance(model.h[8].mlp, mxd_torch.MxD)
    assert tuple(ns["hidden"].shape) == tuple(ns["tokens"].shape) + (model.config.n_embd,)
    assert torch.isfinite(ns["hidden"]).all()
    with torch.no_grad():  # the trained layer explains part of the MLP's output
        nmse = ((layer(x) - y) ** 2).sum() / (y ** 2).sum()
    assert nmse < 0.9, f"normalised MSE after training {nmse:.3f}"
    with torch.no_grad():  # the spliced MxD is the trained one
        assert torch.equal(model.h[8].mlp(x[:16]), layer(x[:16]))


def main(argv):
    # One thread: the snippets' 200 small training steps would mostly wait at OpenMP barriers
    # on a busy 2-core machine; results do not depend on the thread count.
    torch.set_num_threads(1)
    if argv[:1] == ["--device"] and len(argv) == 2:
        import mxd_torch
        device = torch.device(argv[1])
        if device.type == "cuda" and not (mxd_torch.built_with_cuda and torch.cuda.is_available()):
            print(f"skipped: --device {device}: no GPU visible or mxd_torch built without CUDA")
            return 0
        torch.set_default_device(device)
    elif argv:
        raise SystemExit(f"usage: test_readme.py [--device DEVICE], not {argv}")
    passed = failed = skipped = 0
    for i, (where, code) in enumerate(snippets()):
        needs_transformers = "transformers" in code
        if needs_transformers:
            try:
                small_gpt2()
            except ImportError:
                print(f"{where}: skipped: transformers is not installed")
                skipped += 1
                continue
        ns = {"__name__": f"readme_snippet_{i}"}
        cwd = os.getcwd()
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            try:
                exec(compile(code, where, "exec"), ns)
                (check_gpt2 if needs_transformers else check_basic)(ns)
                print(f"{where}: passed")
                passed += 1
            except Exception as e:  # report and go on to the next snippet
                print(f"{where}: FAILED: {type(e).__name__}: {e}")
                failed += 1
            finally:
                os.chdir(cwd)
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
