# SPDX-License-Identifier: MIT
"""mxd_torch against torch's autograd, the golden files, `mxd eval`, torch.optim.AdamW and its
own files, and its error paths; with torch >= 2.4 also its custom ops under torch.compile,
torch.export and torch.library.opcheck. Run by ctest (mxd_torch_tests) with each Python that
has torch:

    /usr/bin/python3 tests/torch/test_mxd_torch.py [--mxd build/examples/mxd]

Tolerances are normwise relative errors (max|a - b| / max|b|): float64 keeps ~1e-16 per
rounding, so 1e-10 leaves room for sums over N experts (the C++ suite's budget); float32's
~6e-8 grows to ~1e-5 over the same sums, hence 1e-4. Where both sides run the same mxd code
in the same precision the results must agree to 1e-13.
"""
import argparse
import copy
import glob
import json
import os
import subprocess
import sys
import tempfile
import unittest

import torch

import mxd_torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data")
MXD_TOOL = os.environ.get("MXD_TOOL", "")
ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "sigmoid", "silu"]


def rel_error(a, b):
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def check_same_run(test, got, want, tol):
    """Two runs' (y, gradients, selections) agree: y and every gradient within tol (relative),
    the same experts selected with coefficients within tol."""
    (yg, grads_g, topks_g), (yw, grads_w, topks_w) = got, want
    test.assertLessEqual(rel_error(yg, yw), tol)
    for i, (a, b) in enumerate(zip(grads_g, grads_w)):
        test.assertLessEqual(rel_error(a, b), tol, i)
    for (i1, v1), (i2, v2) in zip(topks_g, topks_w):
        test.assertTrue(torch.equal(i1, i2))
        test.assertLessEqual(rel_error(v1, v2), tol)


def randomise(layer, seed, gate_shift=0.3):
    """Random parameters of unit-ish scale (in place, keeping W_cond's layout), gate scores
    mostly positive so that gradients reach the gate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
            if name in ("gate_bias", "b_enc") and isinstance(layer, mxd_torch.TopKTranscoder):
                p.add_(gate_shift)
            elif name == "gate_bias":
                p.add_(gate_shift)
    return layer


def golden_cases():
    cases = sorted(glob.glob(os.path.join(DATA, "*.safetensors")))
    assert len(cases) >= 10, f"expected the 10 golden cases in {DATA}, found {len(cases)}"
    return cases


class GradCheck(unittest.TestCase):
    """torch.autograd.gradcheck (float64 finite differences) against mxd's analytic backward,
    for x and every parameter."""

    def check(self, layer, x, steering=None):
        params = layer.params()

        def f(x, *ps):
            return mxd_torch._LayerFunction.apply(layer, steering, "fp32", x, *ps)

        inputs = (x.requires_grad_(),) + tuple(params)
        self.assertTrue(torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4))

    def test_every_mxd_variant(self):
        for act in ACTIVATIONS:
            for glu in (False, True):
                for skip in (False, True):
                    with self.subTest(activation=act, glu=glu, skip=skip):
                        torch.manual_seed(0)
                        layer = randomise(mxd_torch.MxD(5, 7, 5, 9, 3, act, glu, skip,
                                                        dtype=torch.float64), 1)
                        self.check(layer, torch.randn(4, 5, dtype=torch.float64))

    def test_steered_mxd(self):
        layer = randomise(mxd_torch.MxD(5, 7, 4, 9, 3, "gelu", dtype=torch.float64), 2)
        steering = mxd_torch.Steering().add(2, 1.5).zero(4).clamp(7, 0.25)
        self.check(layer, torch.randn(4, 5, dtype=torch.float64), steering)

    def test_transcoders(self):
        for layer in (mxd_torch.TopKTranscoder(5, 4, 12, 3, dtype=torch.float64),
                      mxd_torch.SkipTranscoder(5, 12, 3, dtype=torch.float64)):
            with self.subTest(skip=layer.config.skip):
                self.check(randomise(layer, 3), torch.randn(4, 5, dtype=torch.float64))
                idx, vals = layer.topk()  # the latents each row used, best first
                self.assertEqual(tuple(idx.shape), (4, 3))
                self.assertTrue(bool((vals[:, :-1] >= vals[:, 1:]).all()))

    @unittest.skipUnless(mxd_torch._OPS, "torch.library.custom_op needs torch >= 2.4")
    def test_custom_ops(self):
        """The ops' backward (the route torch.compile takes) against finite differences."""
        mxd = randomise(mxd_torch.MxD(5, 7, 5, 9, 3, "silu", True, True, dtype=torch.float64), 2)
        edits = mxd_torch._edit_lists(mxd_torch.Steering().add(2, 1.5).zero(4).clamp(7, 0.25))
        tc = randomise(mxd_torch.SkipTranscoder(5, 12, 3, dtype=torch.float64), 3)
        cases = ((mxd, lambda x, *ps: mxd_torch._ops.mxd_forward(x, ps, mxd._op_config, edits)[0]),
                 (tc, lambda x, *ps: mxd_torch._ops.transcoder_forward(x, ps, tc._op_config)[0]))
        for layer, f in cases:
            with self.subTest(layer=type(layer).__name__):
                inputs = (torch.randn(4, 5, dtype=torch.float64).requires_grad_(),
                          *layer.params())
                self.assertTrue(torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6,
                                                         rtol=1e-4))


class Golden(unittest.TestCase):
    """The golden files (the authors' math in float64), read with mxd's reader: outputs,
    top-k, every gradient of L = sum(y * dy) and dL/dx, in float64 and float32."""

    def test_every_case(self):
        for case in golden_cases():
            g, meta = mxd_torch.read_safetensors(case)
            for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
                with self.subTest(case=os.path.basename(case), dtype=dtype):
                    layer = mxd_torch.MxD.from_file(case, dtype=dtype)
                    self.assertEqual(layer.config.k, int(meta["k"]))
                    x = g["x"].to(dtype).clone().requires_grad_()
                    y = layer(x)
                    self.assertLessEqual(rel_error(y, g["y"]), tol)
                    idx, vals = layer.topk()
                    self.assertLessEqual(rel_error(vals, g["topk_values"]), tol)
                    if dtype == torch.float64:  # selected experts (positive scores) agree
                        pos = g["topk_values"] > 0
                        self.assertTrue(torch.equal(idx[pos], g["topk_indices"][pos]))
                    (y * g["dy"].to(dtype)).sum().backward()
                    self.assertLessEqual(rel_error(x.grad, g["grad.x"]), tol)
                    for name, p in layer.named_parameters():
                        self.assertEqual(tuple(p.grad.shape), tuple(g["grad." + name].shape))
                        self.assertLessEqual(rel_error(p.grad, g["grad." + name]), tol, name)

    def test_authors_state_dict(self):
        """The authors' state dict (contiguous W_cond [O, N], their unused b_dec) loads as it
        is and gives the golden output; state_dict() hands back their names and shapes."""
        case = os.path.join(DATA, "silu_glu_skip.safetensors")
        g, meta = mxd_torch.read_safetensors(case)
        ref = mxd_torch.MxD.from_file(case, dtype=torch.float64)
        authors = {name: g[name].clone() for name in ref.state_dict()}
        authors["b_dec"] = torch.zeros(ref.config.d_in, dtype=torch.float64)
        c = ref.config
        layer = mxd_torch.MxD(c.d_in, c.d_hidden, c.d_out, c.n_experts, c.k, c.activation,
                              c.glu, c.skip, dtype=torch.float64)
        layer.load_state_dict(authors)
        self.assertLessEqual(rel_error(layer(g["x"]), g["y"]), 1e-10)
        sd = layer.state_dict()
        self.assertEqual(sorted(sd), sorted(k for k in authors if k != "b_dec"))
        for name, t in sd.items():
            self.assertTrue(torch.equal(t, g[name]), name)
        self.assertEqual(tuple(sd["W_cond"].shape), (c.d_out, c.n_experts))

    def test_three_dimensional_input_is_rows(self):
        """[batch, seq, d] in gives [batch, seq, d_out] out, row for row as the 2-D call."""
        layer = randomise(mxd_torch.MxD(6, 10, 6, 20, 4, dtype=torch.float64), 4)
        x = torch.randn(3, 5, 6, dtype=torch.float64)
        y3 = layer(x)
        idx3, _ = layer.topk()
        y2 = layer(x.reshape(15, 6))
        idx2, _ = layer.topk()
        self.assertEqual(tuple(y3.shape), (3, 5, 6))
        self.assertTrue(torch.equal(y3.reshape(15, 6), y2))
        self.assertEqual(tuple(idx3.shape), (3, 5, 4))
        self.assertTrue(torch.equal(idx3.reshape(15, 4), idx2))


@unittest.skipUnless(MXD_TOOL, "no mxd tool given (--mxd or MXD_TOOL)")
class AgainstTool(unittest.TestCase):
    """`mxd eval` and the module run the same mxd code on the same file: same outputs."""

    def test_eval(self):
        with tempfile.TemporaryDirectory() as tmp:
            for case in ("gelu_glu", "silu_glu_skip", "k_equals_n"):
                src = os.path.join(DATA, case + ".safetensors")
                out = os.path.join(tmp, case + ".safetensors")
                subprocess.run([MXD_TOOL, "eval", src, out, "--dtype", "f64"], check=True,
                               capture_output=True)
                tool, _ = mxd_torch.read_safetensors(out)
                g, _ = mxd_torch.read_safetensors(src)
                layer = mxd_torch.MxD.from_file(src, dtype=torch.float64)
                x = g["x"].clone().requires_grad_()
                y = layer(x)
                (y * g["dy"]).sum().backward()
                idx, vals = layer.topk()
                with self.subTest(case=case):
                    self.assertLessEqual(rel_error(y, tool["y"]), 1e-13)
                    self.assertTrue(torch.equal(idx, tool["topk_indices"]))
                    self.assertLessEqual(rel_error(vals, tool["topk_values"]), 1e-13)
                    self.assertLessEqual(rel_error(x.grad, tool["grad.x"]), 1e-13)
                    for name, p in layer.named_parameters():
                        self.assertLessEqual(rel_error(p.grad, tool["grad." + name]), 1e-13, name)


    def test_tool_checkpoints_load(self):
        """`mxd train` checkpoints load into the modules and compute the authors' math
        (written out in torch here) on their parameters."""
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([MXD_TOOL, "train", "--d-in", "8", "--d-hidden", "16", "--d-out", "8",
                            "--teacher-hidden", "16", "--k", "4", "--expansion", "4", "--steps",
                            "3", "--batch", "32", "--eval-rows", "64", "--baseline", "skip",
                            "--activation", "silu", "--threads", "1", "--out", tmp],
                           check=True, capture_output=True)
            layer = mxd_torch.MxD.from_file(os.path.join(tmp, "mxd.safetensors"), torch.float64)
            tc = mxd_torch.TopKTranscoder.from_file(os.path.join(tmp, "skip_transcoder.safetensors"),
                                                    torch.float64)
            raw, meta = mxd_torch.read_safetensors(os.path.join(tmp, "skip_transcoder.safetensors"))
        self.assertIsInstance(tc, mxd_torch.SkipTranscoder)
        # mxd train's default baseline ranks its latents by decoder norm (SAELens's rule): the
        # file says so, and the module, which loads it folded, computes the file's model.
        self.assertEqual(meta.get("rank_by_decoder_norm"), "1")
        x = torch.randn(10, 8, dtype=torch.float64)
        with torch.no_grad():
            p = dict(layer.named_parameters())
            s = torch.relu(x @ p["gate"].T + p["gate_bias"])
            vals, idx = s.topk(layer.config.k, dim=-1)
            a = torch.zeros_like(s).scatter(-1, idx, vals)
            z = torch.nn.functional.silu(x @ p["W_enc"] + p["b_enc"])
            y = (z @ p["W_dec"]) * (a @ p["W_cond"].T) + p["b_dec_out"]
            self.assertLessEqual(rel_error(layer(x), y), 1e-12)
            q = dict(tc.named_parameters())
            s = torch.relu(x @ q["W_enc"] + q["b_enc"])
            vals, idx = s.topk(tc.config.k, dim=-1)
            a = torch.zeros_like(s).scatter(-1, idx, vals)
            y = a @ q["W_dec"] + x @ q["W_skip.weight"].T + q["b_dec_out"]
            self.assertLessEqual(rel_error(tc(x), y), 1e-12)
            pre = x @ raw["W_enc"] + raw["b_enc"]
            _, idx = (torch.relu(pre) * raw["W_dec"].norm(dim=1)).topk(tc.config.k, dim=-1)
            a = torch.zeros_like(pre).scatter(-1, idx, torch.relu(pre).gather(-1, idx))
            y = a @ raw["W_dec"] + x @ raw["W_skip.weight"].T + raw["b_dec_out"]
            self.assertLessEqual(rel_error(tc(x), y), 1e-12)

    def test_module_files_read_by_the_tool(self):
        """A file the module saves is read by `mxd inspect`, which finds the same expert usage
        as the module's top-k on the same rows."""
        case = os.path.join(DATA, "relu_basic.safetensors")
        g, _ = mxd_torch.read_safetensors(case)
        src = mxd_torch.MxD.from_file(case, dtype=torch.float64)
        c = src.config
        layer = randomise(mxd_torch.MxD(c.d_in, c.d_hidden, c.d_out, c.n_experts, c.k, c.activation,
                                        dtype=torch.float64), 14)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "module.safetensors")
            layer.save(path)
            out = subprocess.run([MXD_TOOL, "inspect", path, "--data", case, "--json"],
                                 check=True, capture_output=True, text=True).stdout
        report = json.loads(out)
        with torch.no_grad():
            layer(g["x"])
        idx, vals = layer.topk()
        rows = idx.shape[0]
        self.assertEqual(report["rows"], rows)
        self.assertGreater(len(report["top_experts"]), 0)
        for e in report["top_experts"]:
            used = int(((idx == e["expert"]) & (vals > 0)).sum())
            self.assertAlmostEqual(e["frequency"], used / rows, places=12)


class Files(unittest.TestCase):
    """save / from_file round trips through mxd's writer and reader, both ways."""

    def roundtrip(self, layer, cls, tmp):
        path = os.path.join(tmp, "layer.safetensors")
        layer.save(path)
        back = cls.from_file(path, dtype=layer.W_enc.dtype)
        self.assertIs(type(back), type(layer))
        self.assertEqual(back.extra_repr(), layer.extra_repr())
        for (n1, p1), (n2, p2) in zip(layer.named_parameters(), back.named_parameters()):
            self.assertEqual(n1, n2)
            self.assertTrue(torch.equal(p1, p2), n1)
            self.assertEqual(p1.stride(), p2.stride(), n1)
        back.save(os.path.join(tmp, "again.safetensors"))
        a, ma = mxd_torch.read_safetensors(path)
        b, mb = mxd_torch.read_safetensors(os.path.join(tmp, "again.safetensors"))
        self.assertEqual(ma, mb)
        self.assertEqual(sorted(a), sorted(b))
        for name in a:
            self.assertTrue(torch.equal(a[name], b[name]), name)
        return path

    def test_mxd(self):
        for dtype in (torch.float32, torch.float64):
            for glu, skip in ((False, False), (True, True)):
                with self.subTest(dtype=dtype, glu=glu, skip=skip):
                    layer = randomise(mxd_torch.MxD(6, 8, 6, 15, 3, "silu", glu, skip, dtype=dtype), 5)
                    with tempfile.TemporaryDirectory() as tmp:
                        self.roundtrip(layer, mxd_torch.MxD, tmp)

    def test_golden_file_reads_as_written(self):
        """A file from the authors' tensors reads into the same values mxd's reader sees."""
        case = os.path.join(DATA, "gelu_tanh_skip.safetensors")
        g, _ = mxd_torch.read_safetensors(case)
        layer = mxd_torch.MxD.from_file(case, dtype=torch.float64)
        for name, p in layer.state_dict().items():
            self.assertTrue(torch.equal(p, g[name]), name)

    def test_transcoders(self):
        for layer in (mxd_torch.TopKTranscoder(6, 5, 20, 4), mxd_torch.SkipTranscoder(6, 20, 4)):
            with self.subTest(skip=layer.config.skip), tempfile.TemporaryDirectory() as tmp:
                path = self.roundtrip(randomise(layer, 6), mxd_torch.TopKTranscoder, tmp)
                with self.assertRaisesRegex(mxd_torch.Error, "holds a 'topk_transcoder' model"):
                    mxd_torch.MxD.from_file(path)

    def test_mxd_file_is_not_a_transcoder(self):
        with self.assertRaisesRegex(mxd_torch.Error, "not a transcoder checkpoint"):
            mxd_torch.TopKTranscoder.from_file(os.path.join(DATA, "relu_basic.safetensors"))


class Optimizer(unittest.TestCase):
    """torch.optim.AdamW on the module's parameters and mxd::AdamW (mxd_torch.AdamW) take the
    same steps (float64: both are the same formula, so only rounding order differs)."""

    def train(self, layer, make_opt, steps=4):
        g = torch.Generator().manual_seed(7)
        opt = make_opt(layer)
        for _ in range(steps):
            x = torch.randn(8, layer.config.d_in, generator=g, dtype=torch.float64)
            t = torch.randn(8, layer.config.d_out, generator=g, dtype=torch.float64)
            loss = ((layer(x) - t) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return layer

    def compare(self, layer):
        a = self.train(copy.deepcopy(layer), lambda m: torch.optim.AdamW(
            m.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05))
        b = self.train(copy.deepcopy(layer), lambda m: mxd_torch.AdamW(
            m, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05))
        moved = 0
        for (name, pa), (_, pb), (_, p0) in zip(a.named_parameters(), b.named_parameters(),
                                                layer.named_parameters()):
            self.assertLessEqual(rel_error(pb, pa), 1e-12, name)
            self.assertEqual(pa.stride(), pb.stride(), name)
            moved += not torch.equal(pa, p0)
        self.assertEqual(moved, len(layer.params()))  # every parameter took steps

    def test_mxd(self):
        self.compare(randomise(mxd_torch.MxD(6, 8, 6, 15, 3, "gelu", True, True,
                                             dtype=torch.float64), 8))

    def test_transcoder(self):
        self.compare(randomise(mxd_torch.SkipTranscoder(6, 20, 4, dtype=torch.float64), 9))


class GradientMemory(unittest.TestCase):
    """Backward reuses its gradient memory only where nobody else holds it."""

    def test_zero_grad_modes_agree(self):
        """Training with .grad kept and zeroed (buffers reused) equals .grad set to None."""
        layer = randomise(mxd_torch.MxD(6, 8, 6, 15, 3, "gelu", True, True, dtype=torch.float64), 11)
        runs = []
        for set_to_none in (True, False):
            m = copy.deepcopy(layer)
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            g = torch.Generator().manual_seed(12)
            for _ in range(3):
                opt.zero_grad(set_to_none=set_to_none)
                m(torch.randn(5, 6, generator=g, dtype=torch.float64)).pow(2).sum().backward()
                opt.step()
            runs.append(m)
        for (name, a), (_, b) in zip(runs[0].named_parameters(), runs[1].named_parameters()):
            self.assertTrue(torch.equal(a, b), name)
            self.assertEqual(a.stride(), b.stride(), name)

    def test_gradients_handed_out_are_not_overwritten(self):
        layer = randomise(mxd_torch.MxD(6, 8, 6, 15, 3, dtype=torch.float64), 13)
        x1, x2 = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
        layer(x1).sum().backward()  # every .grad exists from now on
        g1 = torch.autograd.grad(layer(x1).sum(), layer.params())
        kept = [g.clone() for g in g1]
        g2 = torch.autograd.grad(layer(x2).sum(), layer.params())
        for a, b, c in zip(g1, kept, g2):
            self.assertTrue(torch.equal(a, b))
            self.assertNotEqual(a.data_ptr(), c.data_ptr())


class Steering(unittest.TestCase):
    def test_edits_change_the_output_as_documented(self):
        layer = randomise(mxd_torch.MxD(5, 7, 4, 9, 3, "relu", dtype=torch.float64), 10)
        x = torch.randn(6, 5, dtype=torch.float64)
        with torch.no_grad():
            y = layer(x)
            # Zeroing every expert leaves only the output bias.
            off = mxd_torch.Steering()
            for n in range(9):
                off.zero(n)
            self.assertTrue(torch.allclose(layer(x, steering=off),
                                           layer.b_dec_out.expand(6, 4), rtol=0, atol=1e-15))
            # add(n, v) moves y by v * (z W_dec) * c_n (whether or not n was selected).
            u = torch.relu(x @ layer.W_enc + layer.b_enc) @ layer.W_dec
            layer.steering = mxd_torch.Steering().add(4, 2.0)
            ys = layer(x)
            layer.steering = None
            self.assertLessEqual(rel_error(ys - y, 2.0 * u * layer.W_cond[:, 4]), 1e-12)
            idx, vals = layer(x) is not None and layer.topk()
            self.assertEqual(tuple(idx.shape), (6, 3))
            layer(x, steering=mxd_torch.Steering().add(4, 2.0))
            idx, vals = layer.topk()
            self.assertEqual(tuple(idx.shape), (6, 4))  # one column per edit
            self.assertTrue(bool((idx[:, 3] == 4).all()))

    def test_bad_expert(self):
        layer = mxd_torch.MxD(5, 7, 4, 9, 3)
        with self.assertRaisesRegex(mxd_torch.Error, r"Steering: expert 9 is outside \[0, 9\)"):
            layer(torch.randn(2, 5), steering=mxd_torch.Steering().add(9, 1.0))


class BadArguments(unittest.TestCase):
    """Bad arguments raise mxd_torch.Error carrying mxd's message naming the value."""

    def setUp(self):
        self.layer = mxd_torch.MxD(5, 7, 4, 9, 3)

    def raises(self, pattern, f):
        with self.assertRaisesRegex(mxd_torch.Error, pattern):
            f()

    def test_config(self):
        self.raises(r"Config.k = 10 exceeds Config.n_experts = 9",
                    lambda: mxd_torch.MxD(5, 7, 4, 9, 10))
        self.raises(r"Config.d_hidden = 0 must be positive", lambda: mxd_torch.MxD(5, 0, 4, 9, 3))
        self.raises(r"unknown name 'tanh'", lambda: mxd_torch.MxD(5, 7, 4, 9, 3, "tanh"))
        self.raises(r"skip needs d_in == d_out", lambda: mxd_torch.MxD(5, 7, 4, 9, 3, skip=True))
        self.raises(r"TranscoderConfig.k = 30 exceeds n_latents = 20",
                    lambda: mxd_torch.TopKTranscoder(5, 5, 20, 30))
        self.raises(r"dtype .*float16", lambda: mxd_torch.MxD(5, 7, 4, 9, 3, dtype=torch.float16))

    def test_inputs(self):
        self.raises(r"x has dtype Double, expected Float", lambda: self.layer(torch.randn(3, 5).double()))
        self.raises(r"x has dtype Int, expected Float",
                    lambda: self.layer(torch.ones(3, 5, dtype=torch.int32)))
        self.raises(r"x has shape \[3, 6\], expected \[\.\.\., 5\]", lambda: self.layer(torch.randn(3, 6)))
        self.raises(r"x \[3, 5\] has strides \[1, 3\] and must be contiguous",
                    lambda: self.layer(torch.randn(5, 3).t()))

    def test_parameters(self):
        layer = copy.deepcopy(self.layer)
        layer.W_cond.data = layer.W_cond.data.contiguous()  # the authors' layout, not mxd's
        self.raises(r"W_cond \[4, 9\] has strides \[9, 1\]: mxd needs it stored as the transpose",
                    lambda: layer(torch.randn(3, 5)))
        layer = copy.deepcopy(self.layer)
        layer.gate.data = layer.gate.data.double()
        self.raises(r"gate has dtype Double, expected Float", lambda: layer(torch.randn(3, 5)))
        layer = copy.deepcopy(self.layer)
        layer.W_dec.data = torch.randn(7, 5)
        self.raises(r"W_dec has shape \[7, 5\], expected \[7, 4\]", lambda: layer(torch.randn(3, 5)))

    def test_files(self):
        self.raises(r"/nonexistent\.safetensors", lambda: mxd_torch.MxD.from_file("/nonexistent.safetensors"))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "junk.safetensors")
            with open(path, "wb") as f:
                f.write(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
            self.raises(r"junk\.safetensors", lambda: mxd_torch.MxD.from_file(path))

    def test_optimizer(self):
        layer = mxd_torch.MxD(5, 7, 4, 9, 3)
        opt = mxd_torch.AdamW(layer, lr=1e-3)
        self.raises(r"AdamW.step: W_enc has no gradient", opt.step)  # no backward yet
        self.raises(r"AdamWConfig.lr = -1 must be finite and >= 0", lambda: mxd_torch.AdamW(layer, lr=-1.0))


class Conventions(unittest.TestCase):
    """As torch's own layers: empty batches, device= and dtype=, the meta device."""

    def layers(self):
        return (randomise(mxd_torch.MxD(5, 7, 5, 9, 3, "gelu", True, True, dtype=torch.float64), 1),
                randomise(mxd_torch.TopKTranscoder(5, 4, 12, 3, dtype=torch.float64), 2),
                randomise(mxd_torch.SkipTranscoder(5, 12, 3, dtype=torch.float64), 3))

    def test_empty_batch(self):
        """An empty batch gives an empty output, empty top-k, empty dx and zero gradients."""
        for layer in self.layers():
            for steering in ((None, mxd_torch.Steering().add(2, 1.0))
                             if isinstance(layer, mxd_torch.MxD) else (None,)):
                with self.subTest(layer=type(layer).__name__, steered=steering is not None):
                    layer.zero_grad()
                    x = torch.randn(2, 0, 5, dtype=torch.float64, requires_grad=True)
                    y = layer(x, steering) if steering else layer(x)
                    self.assertEqual(tuple(y.shape), (2, 0, layer.config.d_out))
                    idx, vals = layer.topk()
                    k = layer.config.k + (1 if steering else 0)
                    self.assertEqual((tuple(idx.shape), tuple(vals.shape)), ((2, 0, k), (2, 0, k)))
                    y.sum().backward()
                    self.assertEqual(x.grad.shape, x.shape)
                    for name, p in layer.named_parameters():
                        self.assertTrue(torch.equal(p.grad, torch.zeros_like(p)), name)
                        self.assertEqual(p.grad.stride(), p.stride(), name)

    def test_device_and_dtype(self):
        for make in (lambda **kw: mxd_torch.MxD(5, 7, 5, 9, 3, glu=True, **kw),
                     lambda **kw: mxd_torch.TopKTranscoder(5, 4, 12, 3, **kw),
                     lambda **kw: mxd_torch.SkipTranscoder(5, 12, 3, **kw)):
            layer = make(device="cpu", dtype=torch.float64)
            self.assertTrue(all(p.dtype == torch.float64 and p.device.type == "cpu"
                                for p in layer.parameters()))
            self.assertEqual(make(device=torch.device("cpu")).W_enc.dtype, torch.float32)
            if not mxd_torch.built_with_cuda:  # else tests/torch/test_mxd_torch_cuda.py
                with self.assertRaisesRegex(mxd_torch.Error, r"device cuda:1: .*built without CUDA"):
                    make(device="cuda:1")
            meta = make(device="meta", dtype=torch.float64)
            for p, q in zip(meta.parameters(), layer.parameters()):
                self.assertEqual((p.device.type, p.shape, p.stride(), p.dtype),
                                 ("meta", q.shape, q.stride(), q.dtype))
            if hasattr(torch, "set_default_device"):  # torch >= 2.0: no device= follows it
                with torch.device("meta"):
                    self.assertEqual({p.device.type for p in make().parameters()}, {"meta"})
                self.assertEqual({p.device.type for p in make().parameters()}, {"cpu"})

    def test_meta_tensors(self):
        """With torch >= 2.4 meta tensors run through the ops' fake kernels (shapes only);
        before, they are refused with a message naming the device."""
        for layer in self.layers():
            meta = copy.deepcopy(layer).to("meta")
            x = torch.randn(3, 4, 5, dtype=torch.float64, device="meta")
            with self.subTest(layer=type(layer).__name__):
                if not mxd_torch._OPS:
                    with self.assertRaisesRegex(mxd_torch.Error, r"x is on meta: mxd_torch computes on the CPU$"):
                        meta(x)
                    continue
                for rows in (4, 0):
                    y = meta(x[:, :rows])
                    self.assertEqual((y.device.type, tuple(y.shape)),
                                     ("meta", (3, rows, layer.config.d_out)))
                    self.assertEqual(tuple(meta.topk()[0].shape), (3, rows, layer.config.k))


class CompileModel(torch.nn.Module):
    """A linear layer, then an MxD, a TopK and a skip transcoder (tiny, float64): what the
    compile tests trace."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 5, dtype=torch.float64)
        self.mxd = mxd_torch.MxD(5, 7, 5, 9, 3, "gelu", True, True, dtype=torch.float64)
        self.tc = mxd_torch.TopKTranscoder(5, 5, 12, 3, dtype=torch.float64)
        self.skip = mxd_torch.SkipTranscoder(5, 12, 3, dtype=torch.float64)

    def forward(self, x, steering=None):
        return self.skip(self.tc(self.mxd(torch.tanh(self.lin(x)), steering)))


def compile_model(device="cpu"):
    torch.manual_seed(0)
    m = CompileModel()
    for layer, seed in ((m.mxd, 1), (m.tc, 2), (m.skip, 3)):
        randomise(layer, seed)
    return m.to(device)


def run_compile_model(m, x, steering):
    """(y, [dx] + parameter gradients, each layer's selection) of one forward and backward."""
    x = x.clone().requires_grad_()
    m.zero_grad()
    y = m(x, steering)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape)).sum().backward()
    return y, [x.grad] + [p.grad for p in m.parameters()], [l.topk() for l in (m.mxd, m.tc, m.skip)]


@unittest.skipUnless(mxd_torch._OPS, "torch.library.custom_op needs torch >= 2.4")
class Compile(unittest.TestCase):
    """The layers as torch.library custom ops: torch.compile(fullgraph=True) traces a model
    with them and computes what eager does, torch.export exports it, opcheck passes. Tiny
    layers: compiling is the cost here."""

    device = "cpu"  # the GPU suite runs these tests again with "cuda"

    def test_compiled_equals_eager(self):
        torch._dynamo.reset()
        m = compile_model(self.device)
        compiled = torch.compile(m, fullgraph=True)
        x = torch.randn(2, 6, 5, dtype=torch.float64, device=self.device)
        for steering in (None, mxd_torch.Steering().add(2, 1.5).zero(4)):
            with self.subTest(steered=steering is not None):
                got = run_compile_model(compiled, x, steering)
                self.assertEqual(got[0].device.type, torch.device(self.device).type)
                check_same_run(self, got, run_compile_model(m, x, steering), 1e-12)

    def test_export(self):
        m = compile_model(self.device)
        x = torch.randn(4, 5, dtype=torch.float64, device=self.device)
        ep = torch.export.export(m, (x,))
        ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        self.assertTrue({"mxd.mxd_forward.default", "mxd.transcoder_forward.default"} <= ops, ops)
        with torch.no_grad():
            self.assertLessEqual(rel_error(ep.module()(x), m(x)), 1e-12)

    def test_opcheck(self):
        mxd = randomise(mxd_torch.MxD(5, 7, 5, 9, 3, "silu", True, True, dtype=torch.float64),
                        4).to(self.device)
        tc = randomise(mxd_torch.SkipTranscoder(5, 12, 3, dtype=torch.float64), 5).to(self.device)
        x = torch.randn(6, 5, dtype=torch.float64, device=self.device, requires_grad=True)
        cases = [(torch.ops.mxd.mxd_forward.default,
                  (x, mxd.params(), *mxd._op_config, edits or None, [2, 4][:len(edits)] or None,
                   [1.5, 0.0][:len(edits)] or None, "fp32")) for edits in ([], [0, 2])]
        cases.append((torch.ops.mxd.transcoder_forward.default,
                      (x, tc.params(), *tc._op_config, "fp32")))
        # The backward ops have no backward of their own (mxd's is once differentiable).
        with torch.no_grad():
            dy = torch.randn(6, 5, dtype=torch.float64, device=self.device)
            ps = [p.detach() for p in mxd.params()]
            _, saved = torch.ops.mxd.mxd_forward(x, ps, *mxd._op_config, None, None, None, "fp32")
            cases.append((torch.ops.mxd.mxd_backward.default,
                          (x.detach(), ps, saved, dy, *mxd._op_config, True, "fp32")))
            ps = [p.detach() for p in tc.params()]
            _, saved = torch.ops.mxd.transcoder_forward(x, ps, *tc._op_config, "fp32")
            cases.append((torch.ops.mxd.transcoder_backward.default,
                          (x.detach(), ps, saved, dy, *tc._op_config, False, "fp32")))
        for op, args in cases:
            with self.subTest(op=str(op)):
                torch.library.opcheck(op, args)


def run_suite(module, list_skipped=False):
    """Runs a module's tests on 2 threads; prints "N passed, F failed, S skipped" (what ctest
    reads) and, with list_skipped, each skip's reason. Returns the exit status."""
    torch.set_num_threads(2)
    suite = unittest.defaultTestLoader.loadTestsFromModule(module)
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed - len(result.skipped)} passed, {failed} failed, "
          f"{len(result.skipped)} skipped")
    for test, reason in result.skipped if list_skipped else []:
        print(f"skipped: {test.id()}: {reason}")
    return 0 if result.wasSuccessful() else 1


def main():
    global MXD_TOOL
    ap = argparse.ArgumentParser()
    ap.add_argument("--mxd", default=MXD_TOOL, help="the mxd tool, for the `mxd eval` comparison")
    args, rest = ap.parse_known_args()
    MXD_TOOL = args.mxd
    AgainstTool.__unittest_skip__ = not MXD_TOOL
    return run_suite(sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
