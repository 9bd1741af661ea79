# SPDX-License-Identifier: MIT
"""The layers' forward and backward as torch.library custom ops (torch >= 2.4), so that
torch.compile traces models with MxD layers without graph breaks and torch.export exports
them. An op is a function of tensors: each forward op also returns the cache its backward
reads (top-k indices and values; for MxD the dense activations too), which autograd saves.
They call the same C++ entry points as the eager path, bound to those tensors.

    mxd::mxd_forward(x, params, k, activation, glu, skip, edit_ops, edit_experts, edit_values,
                     math) -> (y, saved)   (the steering edits' lists, None without edits)
    mxd::mxd_backward(x, params, saved, dy, k, activation, glu, skip, need_dx, math)
        -> [dx, *grads]
    mxd::transcoder_forward(x, params, k, skip, math) -> (y, saved)
    mxd::transcoder_backward(x, params, saved, dy, k, skip, need_dx, math) -> [dx, *grads]

dx is an empty tensor when need_dx is False. Shapes and layouts come from the parameters.
math is mxd's MathMode on a GPU ("fp32", "tf32", "bf16"; the layer picks it, see
_cuda_precision in __init__.py); the CPU computes in the tensors' precision whatever it says.
Each op has a CPU kernel and a CUDA kernel (the 'CUDA' dispatch key), the same Python body:
the C++ side computes on the parameters' device (CUDA: builds with CUDA only, else it raises
mxd_torch.Error saying so). Where torch has the tag, the ops are marked cudagraph_unsafe:
mxd waits for its stream inside a forward, which CUDA graph capture forbids.
"""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _C


def traced(x):
    """True where a layer must run as ops: under torch.compile or torch.export, or on tensors
    without data (meta, fake). Eager calls keep the autograd.Function, whose caches and
    gradient buffers are reused from step to step."""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor or x.device.type == "meta"


def _rows(x):
    return math.prod(x.shape[:-1])


def _dx_and_grads(x, need_dx, result):
    dx, grads = result
    return [dx if need_dx else x.new_empty(0), *grads]


def _fake_dx_and_grads(x, params, need_dx):
    return [x.new_empty(x.shape if need_dx else 0), *(torch.empty_like(p) for p in params)]


_TAGS = {"tags": (torch.Tag.cudagraph_unsafe,)} if hasattr(torch.Tag, "cudagraph_unsafe") else {}


def _op(name, fn):
    """fn as the custom op mxd::name with CPU and CUDA kernels."""
    op = torch.library.custom_op(name, fn, mutates_args=(), device_types="cpu", **_TAGS)
    op.register_kernel("cuda", fn)
    return op


# ---- MxD ----

def _mxd_config(params, k, activation, glu, skip):
    W_enc, W_dec, gate = params[0], params[2], params[3]
    return _C.Config(W_enc.shape[0], W_enc.shape[1], W_dec.shape[1], gate.shape[0], k,
                     activation, glu, skip)


def _mxd_forward_kernel(x: Tensor, params: List[Tensor], k: int, activation: str, glu: bool,
                        skip: bool, edit_ops: Optional[List[int]],
                        edit_experts: Optional[List[int]], edit_values: Optional[List[float]],
                        math: str) -> Tuple[Tensor, List[Tensor]]:
    edits = _C.Edits(edit_ops or [], edit_experts or [], edit_values or [])
    y, saved = _C.forward_op(_mxd_config(params, k, activation, glu, skip), params, x, edits,
                             torch.get_num_threads(), math)
    return y, saved


_mxd_forward = _op("mxd::mxd_forward", _mxd_forward_kernel)


@_mxd_forward.register_fake
def _(x, params, k, activation, glu, skip, edit_ops, edit_experts, edit_values, math):
    # What _ext.cpp's mxd_saved_shapes lists.
    B, H, O, K = _rows(x), params[0].shape[1], params[2].shape[1], k + len(edit_ops or ())
    e = x.new_empty
    saved = [e(B, H), e(B if glu else 0, H), e(B, H), e(B, O), e(B, O),
             e((B, K), dtype=torch.int32), e(B, K), e(B if edit_ops else 0, K)]
    return e(*x.shape[:-1], O), saved


def _mxd_backward_kernel(x: Tensor, params: List[Tensor], saved: List[Tensor], dy: Tensor,
                         k: int, activation: str, glu: bool, skip: bool, need_dx: bool,
                         math: str) -> List[Tensor]:
    return _dx_and_grads(x, need_dx, _C.backward_op(
        _mxd_config(params, k, activation, glu, skip), params, x, dy, saved, need_dx,
        torch.get_num_threads(), math))


_mxd_backward = _op("mxd::mxd_backward", _mxd_backward_kernel)


@_mxd_backward.register_fake
def _(x, params, saved, dy, k, activation, glu, skip, need_dx, math):
    return _fake_dx_and_grads(x, params, need_dx)


def _setup(ctx, inputs, output):
    x, params = inputs[0], inputs[1]
    ctx.n_params = len(params)
    ctx.save_for_backward(x, *params, *output[1])
    ctx.mark_non_differentiable(*output[1])


def _mxd_grad(ctx, dy, _):
    x, *rest = ctx.saved_tensors
    params, saved = rest[:ctx.n_params], rest[ctx.n_params:]
    need_dx = ctx.needs_input_grad[0]
    dx, *grads = torch.ops.mxd.mxd_backward(x, params, saved, dy.contiguous(), *ctx.config,
                                            need_dx, ctx.math)
    return dx if need_dx else None, grads, *([None] * 8)


def _mxd_setup(ctx, inputs, output):
    _setup(ctx, inputs, output)
    ctx.config = inputs[2:6]  # k, activation, glu, skip
    ctx.math = inputs[9]


_mxd_forward.register_autograd(_mxd_grad, setup_context=_mxd_setup)


def mxd_forward(x, params, op_config, edit_lists, math="fp32"):
    """MxD's forward op with op_config = (k, activation, glu, skip): (y, the saved top-k
    indices int32 [B, K], coefficients [B, K])."""
    # None, not [], without edits: autograd treats an empty list as a list of tensors.
    y, saved = torch.ops.mxd.mxd_forward(x, params, *op_config, *(e or None for e in edit_lists),
                                         math)
    return y, saved[5], saved[7] if edit_lists[0] else saved[6]


# ---- TopK / skip transcoders ----

def _transcoder_config(params, k, skip):
    W_enc, W_dec = params[0], params[2]  # W_enc [I, M] (transposed), W_dec [M, O]
    return _C.TranscoderConfig(W_enc.shape[0], W_dec.shape[1], W_enc.shape[1], k, skip)


def _transcoder_forward_kernel(x: Tensor, params: List[Tensor], k: int, skip: bool,
                               math: str) -> Tuple[Tensor, List[Tensor]]:
    y, saved = _C.forward_op(_transcoder_config(params, k, skip), params, x, _C.Edits([], [], []),
                             torch.get_num_threads(), math)
    return y, saved


_transcoder_forward = _op("mxd::transcoder_forward", _transcoder_forward_kernel)


@_transcoder_forward.register_fake
def _(x, params, k, skip, math):
    B = _rows(x)
    return (x.new_empty(*x.shape[:-1], params[2].shape[1]),
            [x.new_empty((B, k), dtype=torch.int32), x.new_empty(B, k)])


def _transcoder_backward_kernel(x: Tensor, params: List[Tensor], saved: List[Tensor],
                                dy: Tensor, k: int, skip: bool, need_dx: bool,
                                math: str) -> List[Tensor]:
    return _dx_and_grads(x, need_dx, _C.backward_op(
        _transcoder_config(params, k, skip), params, x, dy, saved, need_dx,
        torch.get_num_threads(), math))


_transcoder_backward = _op("mxd::transcoder_backward", _transcoder_backward_kernel)


@_transcoder_backward.register_fake
def _(x, params, saved, dy, k, skip, need_dx, math):
    return _fake_dx_and_grads(x, params, need_dx)


def _transcoder_grad(ctx, dy, _):
    x, *rest = ctx.saved_tensors
    params, saved = rest[:ctx.n_params], rest[ctx.n_params:]
    need_dx = ctx.needs_input_grad[0]
    dx, *grads = torch.ops.mxd.transcoder_backward(x, params, saved, dy.contiguous(),
                                                   *ctx.config, need_dx, ctx.math)
    return dx if need_dx else None, grads, None, None, None


def _transcoder_setup(ctx, inputs, output):
    _setup(ctx, inputs, output)
    ctx.config = inputs[2:4]  # k, skip
    ctx.math = inputs[4]


_transcoder_forward.register_autograd(_transcoder_grad, setup_context=_transcoder_setup)


def transcoder_forward(x, params, op_config, math="fp32"):
    """The transcoder's forward op with op_config = (k, skip): (y, the saved top-k indices
    int32 [B, k], values [B, k])."""
    y, saved = torch.ops.mxd.transcoder_forward(x, params, *op_config, math)
    return y, saved[0], saved[1]
