# SPDX-License-Identifier: MIT
"""mxd_torch on a GPU (builds with CUDA, _ext_cuda.cu): gradcheck in float64 on CUDA, CUDA =
CPU for forward, top-k and every gradient, compiled = eager on CUDA, mxd_torch.AdamW on CUDA =
on the CPU, device checks, the math modes (bf16 / float16 inputs, autocast, TF32), torch's
streams and caching allocator. Where no GPU is visible (or the extension has no CUDA) every
test is reported as skipped with the reason; tests/torch/gpu_check.sh runs this file on a GPU
machine and fails on any skip there.

    python tests/torch/test_mxd_torch_cuda.py        # PYTHONPATH: the built mxd_torch

MXD_TORCH_EXPECT_CUDA=1 makes a build without CUDA a failure instead of a skip.
Tolerances as in test_mxd_torch.py: float64 1e-10 against the CPU (cuBLAS and mxd's host GEMM
sum in other orders), 1e-12 where both sides run the same GPU code.
"""
import copy
import os
import sys
import tempfile
import unittest

import torch

import mxd_torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import test_mxd_torch as cpu_tests  # noqa: E402
from test_mxd_torch import ACTIVATIONS, randomise, rel_error  # noqa: E402

OPS = mxd_torch._OPS
GPU = torch.cuda.is_available()
WHY = ("mxd_torch was built without CUDA (see examples/torch/README.md)"
       if not mxd_torch.built_with_cuda else
       f"no GPU visible (torch {torch.__version__}: torch.cuda.is_available() is False)")
needs_gpu = unittest.skipUnless(mxd_torch.built_with_cuda and GPU, WHY)
CUDA = torch.device("cuda")
F64, F32 = torch.float64, torch.float32


def layers(dtype):
    """Every model on the CPU: MxD variants, a steered MxD (with its Steering), transcoders."""
    out = []
    for i, act in enumerate(ACTIVATIONS):
        for glu in (False, True):
            for skip in (False, True):
                out.append((f"mxd-{act}-glu{glu:d}-skip{skip:d}", randomise(
                    mxd_torch.MxD(5, 7, 5, 9, 3, act, glu, skip, dtype=dtype), 10 + i), None))
    out.append(("mxd-steered", randomise(mxd_torch.MxD(5, 7, 4, 9, 3, "gelu", dtype=dtype), 2),
                mxd_torch.Steering().add(2, 1.5).zero(4).clamp(7, 0.25)))
    out.append(("topk", randomise(mxd_torch.TopKTranscoder(5, 4, 12, 3, dtype=dtype), 3), None))
    out.append(("skip", randomise(mxd_torch.SkipTranscoder(5, 12, 3, dtype=dtype), 4), None))
    return out


def call(layer, x, steering):
    return layer(x, steering) if steering is not None else layer(x)


def run(layer, x, steering=None):
    """y, top-k, dx and every parameter's gradient of L = sum(y * w) for a fixed w."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = call(layer, x, steering)
    idx, vals = layer.topk()
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape)
    (y * w).sum().backward()
    return y, (idx, vals), x.grad, [p.grad for p in layer.params()]


class Build(unittest.TestCase):
    def test_cuda_built_where_expected(self):
        if os.environ.get("MXD_TORCH_EXPECT_CUDA") == "1":
            self.assertTrue(mxd_torch.built_with_cuda, "MXD_TORCH_EXPECT_CUDA=1 but " + WHY)
        if not mxd_torch.built_with_cuda:
            self.skipTest(WHY)


@needs_gpu
class GradCheck(unittest.TestCase):
    """torch.autograd.gradcheck (float64 finite differences) against mxd's CUDA backward."""

    def test_every_model(self):
        for name, layer, steering in layers(F64):
            with self.subTest(name):
                layer = layer.to(CUDA)
                x = torch.randn(4, 5, dtype=F64, device=CUDA, requires_grad=True)

                def f(x, *ps):
                    return mxd_torch._LayerFunction.apply(layer, steering, "fp32", x, *ps)

                self.assertTrue(torch.autograd.gradcheck(f, (x, *layer.params()), eps=1e-6,
                                                         atol=1e-6, rtol=1e-4))

    @unittest.skipUnless(OPS, "torch.library.custom_op needs torch >= 2.4")
    def test_custom_ops(self):
        """The CUDA kernels of the ops (the route torch.compile takes)."""
        mxd = randomise(mxd_torch.MxD(5, 7, 5, 9, 3, "silu", True, True, dtype=F64), 2).to(CUDA)
        edits = mxd_torch._edit_lists(mxd_torch.Steering().add(2, 1.5).zero(4).clamp(7, 0.25))
        tc = randomise(mxd_torch.SkipTranscoder(5, 12, 3, dtype=F64), 3).to(CUDA)
        cases = ((mxd, lambda x, *ps: mxd_torch._ops.mxd_forward(x, ps, mxd._op_config, edits)[0]),
                 (tc, lambda x, *ps: mxd_torch._ops.transcoder_forward(x, ps, tc._op_config)[0]))
        for layer, f in cases:
            with self.subTest(layer=type(layer).__name__):
                x = torch.randn(4, 5, dtype=F64, device=CUDA, requires_grad=True)
                self.assertTrue(torch.autograd.gradcheck(f, (x, *layer.params()), eps=1e-6,
                                                         atol=1e-6, rtol=1e-4))


@needs_gpu
class CudaEqualsCpu(unittest.TestCase):
    """The same layer and rows on the CPU and on the GPU: forward, top-k, dx and every
    gradient agree (float64: 1e-10, same selection; float32 in fp32 math: 1e-4)."""

    def setUp(self):
        self.tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 math

    def tearDown(self):
        torch.backends.cuda.matmul.allow_tf32 = self.tf32

    def compare(self, layer, x, steering, tol):
        cpu = run(layer, x, steering)
        gpu = run(copy.deepcopy(layer).to(CUDA), x.to(CUDA), steering)
        y, (idx, vals), dx, grads = gpu
        self.assertEqual(y.device.type, "cuda")
        self.assertLessEqual(rel_error(y.cpu(), cpu[0]), tol)
        if layer.W_enc.dtype == F64:
            self.assertTrue(torch.equal(idx.cpu(), cpu[1][0]))
        self.assertLessEqual(rel_error(vals.cpu(), cpu[1][1]), tol)
        self.assertLessEqual(rel_error(dx.cpu(), cpu[2]), tol)
        for name, a, b in zip(layer._names, grads, cpu[3]):
            self.assertEqual(a.device.type, "cuda", name)
            self.assertEqual(a.stride(), b.stride(), name)
            self.assertLessEqual(rel_error(a.cpu(), b), tol, name)

    def test_every_model(self):
        for dtype, tol in ((F64, 1e-10), (F32, 1e-4)):
            for name, layer, steering in layers(dtype):
                with self.subTest(name, dtype=dtype):
                    g = torch.Generator().manual_seed(5)
                    self.compare(layer, torch.randn(3, 7, 5, generator=g, dtype=dtype), steering, tol)

    def test_k_above_the_one_kernel_top_k(self):
        """k > 1024: the GPU's top-k sorts its candidates with CUB (backend<cuda>::gate_topk)."""
        layer = randomise(mxd_torch.MxD(16, 32, 16, 2048, 1100, "gelu", dtype=F64), 6)
        g = torch.Generator().manual_seed(6)
        self.compare(layer, torch.randn(300, 16, generator=g, dtype=F64), None, 1e-10)

    def test_empty_batch(self):
        for name, layer, steering in layers(F64)[-3:]:
            with self.subTest(name):
                layer = layer.to(CUDA)
                x = torch.randn(2, 0, 5, dtype=F64, device=CUDA, requires_grad=True)
                y = call(layer, x, steering)
                self.assertEqual(tuple(y.shape), (2, 0, layer.config.d_out))
                y.sum().backward()
                for p in layer.parameters():
                    self.assertTrue(torch.equal(p.grad, torch.zeros_like(p)))

    def test_side_stream(self):
        """On a stream of torch's own (non-blocking), as on the default stream."""
        layer = randomise(mxd_torch.MxD(5, 7, 5, 9, 3, "gelu", True, True, dtype=F64), 7).to(CUDA)
        x = torch.randn(64, 5, dtype=F64, device=CUDA)
        ref = run(layer, x)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            got = run(layer, x)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        self.assertTrue(torch.equal(got[0], ref[0]))
        for a, b in zip(got[3], ref[3]):
            self.assertTrue(torch.equal(a, b))

    def test_non_finite_gate_score(self):
        layer = mxd_torch.MxD(5, 7, 4, 9, 3, device=CUDA)
        with torch.no_grad():
            layer.gate_bias[4] = float("nan")
        with self.assertRaisesRegex(mxd_torch.Error, r"gate scores: non-finite value at row 0 "
                                                     r"\(expert 4\)"):
            layer(torch.randn(2, 5, device=CUDA))

    def test_workspaces_from_torchs_allocator(self):
        """After a first step, training steps make torch's allocator reserve no new segment
        (mxd's workspaces come from its pool; none is cudaMalloc'ed per call)."""
        layer = mxd_torch.MxD(64, 128, 64, 512, 8, device=CUDA)
        opt = mxd_torch.AdamW(layer, lr=1e-3)
        x = torch.randn(256, 64, device=CUDA)

        def step():
            opt.zero_grad()
            layer(x).pow(2).mean().backward()
            opt.step()

        step()
        step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()["segment.all.allocated"]
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        self.assertEqual(torch.cuda.memory_stats()["segment.all.allocated"], before)


@needs_gpu
class Devices(unittest.TestCase):
    """device= as torch's layers take it, and tensors of two devices never mixed."""

    def test_construct_move_and_files(self):
        for make in (lambda **kw: mxd_torch.MxD(5, 7, 5, 9, 3, glu=True, **kw),
                     lambda **kw: mxd_torch.TopKTranscoder(5, 4, 12, 3, **kw),
                     lambda **kw: mxd_torch.SkipTranscoder(5, 12, 3, **kw)):
            torch.manual_seed(1)
            cpu = make(dtype=F64)
            torch.manual_seed(1)
            gpu = make(device="cuda", dtype=F64)
            moved = copy.deepcopy(cpu).to("cuda")
            for (name, a), b, c in zip(cpu.named_parameters(), gpu.parameters(), moved.parameters()):
                self.assertEqual((b.device.type, b.stride()), ("cuda", a.stride()), name)
                self.assertEqual(c.stride(), a.stride(), name)
                self.assertTrue(torch.equal(b.cpu(), a) and torch.equal(c.cpu(), a), name)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "layer.safetensors")
                gpu.save(path)
                cls = type(gpu) if isinstance(gpu, mxd_torch.MxD) else mxd_torch.TopKTranscoder
                back = cls.from_file(path, dtype=F64, device="cuda")
                for (name, a), b in zip(gpu.named_parameters(), back.parameters()):
                    self.assertEqual((b.device.type, b.stride()), ("cuda", a.stride()), name)
                    self.assertTrue(torch.equal(a, b), name)

    def test_mixed_devices_are_refused(self):
        cpu = mxd_torch.MxD(5, 7, 4, 9, 3)
        gpu = copy.deepcopy(cpu).to(CUDA)
        with self.assertRaisesRegex(mxd_torch.Error, r"x is on cuda:0 but the parameters are on cpu"):
            cpu(torch.randn(3, 5, device=CUDA))
        with self.assertRaisesRegex(mxd_torch.Error, r"x is on cpu but the parameters are on cuda:0"):
            gpu(torch.randn(3, 5))
        gpu.gate.data = gpu.gate.data.cpu()
        with self.assertRaisesRegex(mxd_torch.Error, r"gate is on cpu but the parameters are on cuda:0"):
            gpu(torch.randn(3, 5, device=CUDA))


@needs_gpu
class Precision(unittest.TestCase):
    """float32 layers on bf16 / float16 inputs, under autocast and with TF32 (mxd::MathMode):
    the output in the low precision's dtype, close to the float32 result."""

    def setUp(self):
        self.tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.manual_seed(0)
        self.layer = randomise(mxd_torch.MxD(64, 128, 64, 96, 8, "gelu", True, True), 8).to(CUDA)
        self.x = torch.randn(512, 64, device=CUDA)
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.no_grad():
            self.ref = self.layer(self.x)
        self.ref_idx = self.layer.topk()[0].sort(-1).values

    def tearDown(self):
        torch.backends.cuda.matmul.allow_tf32 = self.tf32

    def check(self, y, dtype, tol):
        """y in `dtype`, within tol of the float32 result on the rows that selected the same
        experts (rounding may swap near-tied experts at the k-th place: then a row differs by
        a whole expert's share), which must be at least half of them."""
        self.assertEqual(y.dtype, dtype)
        same = (self.layer.topk()[0].sort(-1).values == self.ref_idx).all(-1)
        self.assertGreaterEqual(same.float().mean().item(), 0.5)
        self.assertLessEqual(rel_error(y.float()[same], self.ref[same]), tol)

    def test_low_precision_inputs(self):
        for dtype, tol in ((torch.bfloat16, 5e-2), (torch.float16, 1e-2)):
            with self.subTest(dtype=dtype):
                x = self.x.to(dtype).requires_grad_()
                y = self.layer(x)
                self.check(y, dtype, tol)
                y.float().sum().backward()
                self.assertEqual(x.grad.dtype, dtype)
                self.assertEqual(self.layer.W_enc.grad.dtype, F32)
                self.layer.zero_grad()

    def test_autocast(self):
        for dtype, tol in ((torch.bfloat16, 5e-2), (torch.float16, 1e-2)):
            with self.subTest(dtype=dtype), torch.autocast("cuda", dtype=dtype), torch.no_grad():
                self.check(self.layer(self.x), dtype, tol)

    def test_tf32(self):
        torch.backends.cuda.matmul.allow_tf32 = True
        with torch.no_grad():
            self.check(self.layer(self.x), F32, 1e-2)


@needs_gpu
class Optimizer(unittest.TestCase):
    """mxd_torch.AdamW on a GPU takes the CPU's steps (float64), and torch.optim.AdamW's."""

    def train(self, layer, make_opt, device, steps=4):
        g = torch.Generator().manual_seed(7)
        layer = copy.deepcopy(layer).to(device)
        opt = make_opt(layer)
        for _ in range(steps):
            x = torch.randn(8, layer.config.d_in, generator=g, dtype=F64).to(device)
            t = torch.randn(8, layer.config.d_out, generator=g, dtype=F64).to(device)
            loss = ((layer(x) - t) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return layer

    def test_cuda_equals_cpu(self):
        mxd = lambda m: mxd_torch.AdamW(m, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)
        ref = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.99),
                                          weight_decay=0.05)
        for layer in (randomise(mxd_torch.MxD(6, 8, 6, 15, 3, "gelu", True, True, dtype=F64), 8),
                      randomise(mxd_torch.SkipTranscoder(6, 20, 4, dtype=F64), 9)):
            with self.subTest(layer=type(layer).__name__):
                cpu = self.train(layer, mxd, "cpu")
                gpu = self.train(layer, mxd, CUDA)
                torch_gpu = self.train(layer, ref, CUDA)
                for (name, a), b, c in zip(cpu.named_parameters(), gpu.parameters(),
                                           torch_gpu.parameters()):
                    self.assertEqual(b.stride(), a.stride(), name)
                    self.assertLessEqual(rel_error(b.cpu(), a), 1e-10, name)
                    self.assertLessEqual(rel_error(b, c), 1e-10, name)


@needs_gpu
@unittest.skipUnless(OPS, "torch.library.custom_op needs torch >= 2.4")
class Compile(cpu_tests.Compile):
    """torch.compile(fullgraph=True) on CUDA computes what eager does; export and opcheck
    with CUDA tensors (the ops' CUDA kernels): the CPU suite's tests on "cuda"."""

    device = CUDA


def main():
    return cpu_tests.run_suite(sys.modules[__name__], list_skipped=True)


if __name__ == "__main__":
    sys.exit(main())
