# SPDX-License-Identifier: MIT
"""mxd_torch: Mixture of Decoders (MxD) layers as PyTorch modules, computed by the header-only
mxd library on the tensors' own memory (float32 and float64; on the CPU, and on CUDA GPUs
when the extension is built with CUDA: see examples/torch/README.md).

    import torch, mxd_torch
    layer = mxd_torch.MxD(768, 3072, 768, n_experts=21504, k=32)        # GELU, the authors' init
    y = layer(x)                          # x: [..., 768] -> y: [..., 768]; autograd as usual
    idx, vals = layer.topk()              # the experts each row used: [..., k] each
    layer.save("mxd.safetensors")         # mxd's format; MxD.from_file reads it (and mxd's own)

Parameters carry the authors' names and shapes (W_enc [I, H], b_enc, W_dec [H, O], gate [N, I],
gate_bias [N], W_cond [O, N], b_dec_out, W_glu.weight/bias, W_skip.weight), so their state dict
loads as it is (their unused b_dec is ignored). W_cond is stored as the transpose of a
contiguous [N, O] matrix, mxd's expert-major layout: assign it with .copy_() (load_state_dict
does), never by replacing its .data with another layout.

Errors from mxd (wrong shape, dtype, layout, device, k > n_experts, a bad file) raise
mxd_torch.Error, a RuntimeError carrying mxd's message. Layers live on the CPU, on a GPU
(device='cuda', or .to('cuda'); builds with CUDA only, mxd_torch.built_with_cuda) or on the
meta device (shapes only). On a GPU every call runs mxd's CUDA backend on torch's current
stream; float32 layers take bf16/float16 inputs (autocast) and follow
torch.backends.cuda.matmul.allow_tf32 (mxd::MathMode). The CUDA route has been compiled but
not yet run on a GPU.

With torch >= 2.4 forward and backward are also torch.library custom ops (_ops.py), which
torch.compile(model, fullgraph=True) and torch.export trace; eager calls run the same C++ code
through an autograd.Function (the only route on older torch, such as Debian's 1.13).
"""
import torch

from . import _C

_OPS = hasattr(torch.library, "custom_op")
if _OPS:
    from . import _ops

__all__ = ["MxD", "TopKTranscoder", "SkipTranscoder", "Steering", "AdamW", "Error",
           "matched_experts", "read_safetensors", "built_with_cuda"]

Error = _C.Error
matched_experts = _C.matched_experts
built_with_cuda = _C.has_cuda  # the extension has mxd's CUDA backend (_ext_cuda.cu)

_EDIT_OPS = ("add", "clamp", "zero")


class Steering:
    """Edits of MxD's expert coefficients after top-k (mxd's steering.hpp), applied per row in
    the order given; each method returns the Steering, so edits chain:

        add(n, v):   a_n += v (forced on with a_n = v if top-k did not select n)
        clamp(n, v): a_n = v (forced on if not selected); no gradient reaches the gate for n
        zero(n):     a_n = 0 (ablation); no gradient reaches the gate for n
    """

    def __init__(self):
        self.edits = []  # (op, expert, value)

    def add(self, expert, value):
        self.edits.append(("add", int(expert), float(value)))
        return self

    def clamp(self, expert, value):
        self.edits.append(("clamp", int(expert), float(value)))
        return self

    def zero(self, expert):
        self.edits.append(("zero", int(expert), 0.0))
        return self


def _edit_lists(steering):
    """The edits as mxd_torch's C++ side and ops take them: (op codes, experts, values)."""
    edits = steering.edits if steering is not None else []
    return ([_EDIT_OPS.index(op) for op, _, _ in edits], [e for _, e, _ in edits],
            [v for _, _, v in edits])


def _device(device):
    """The device a layer's parameters are created on: the CPU, a GPU (builds with CUDA), or
    'meta' (shapes only). None means torch's default device, as for torch's own layers
    (torch.set_default_device, `with torch.device(...)`; the CPU unless set)."""
    d = torch.empty(0).device if device is None else torch.device(device)
    if d.type == "cuda" and not built_with_cuda:
        raise Error(f"device {d}: this mxd_torch was built without CUDA; its layers live on "
                    f"the CPU ('meta' gives their shapes only). See examples/torch/README.md "
                    f"for a build with CUDA")
    if d.type not in ("cpu", "meta", "cuda"):
        raise Error(f"device {d}: mxd_torch computes on the CPU"
                    f"{' and on CUDA GPUs' if built_with_cuda else ''} ('meta' gives shapes only)")
    return d


def _on(tensors, device):
    """`tensors` on `device` with their strides (mxd's layouts): the same tensors where they
    are there already, else copies (none for 'meta': shapes only)."""
    if all(t.device == device for t in tensors):
        return tensors
    with torch.no_grad():
        out = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
               for t in tensors]
        if device.type != "meta":
            for o, t in zip(out, tensors):
                o.copy_(t)
    return out


_LOW = (torch.bfloat16, torch.float16)
if _OPS:  # torch >= 2.4: the device-type argument (dynamo folds these calls to constants)
    def _autocast_dtype():
        return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
else:
    def _autocast_dtype():
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def _cuda_precision(x, dtype):
    """How a float32 layer computes on a GPU: (x as it computes on it, the dtype to return y in
    or None for x's, mxd's MathMode). bf16 inputs, or autocast to bf16: "bf16" (GEMM inputs
    rounded to bf16, float accumulation); float16 ones (10-bit mantissa, as TF32's) or
    torch.backends.cuda.matmul.allow_tf32: "tf32"; else "fp32". Low-precision inputs are
    computed on as float32 and y is returned in their dtype (autocast's: the autocast dtype)."""
    if dtype != torch.float32:
        return x, None, "fp32"
    low = x.dtype if x.dtype in _LOW else _autocast_dtype()
    low = low if low in _LOW else None
    if low == torch.bfloat16:
        math = "bf16"
    elif low == torch.float16 or torch._C._get_cublas_allow_tf32():
        math = "tf32"
    else:
        math = "fp32"
    if x.dtype in _LOW:
        x = x.float()
    return x, low, math


def read_safetensors(path):
    """Every tensor of a safetensors file (floats as float64, integers as int64) and its
    metadata, read with mxd's reader: (dict name -> tensor, dict)."""
    return _C.read_safetensors(str(path))


def _dtype_name(dtype):
    if dtype in (None, torch.float32):
        return "float32"
    if dtype == torch.float64:
        return "float64"
    raise Error(f"dtype {dtype}: mxd_torch supports torch.float32 and torch.float64")


def _seed():
    """A seed for mxd's initialisation drawn from torch's CPU generator, so torch.manual_seed
    makes construction reproducible, and the same on every device."""
    return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64, device="cpu"))


class _Lease:
    """Holds a forward cache for autograd; when the graph lets go of it, it goes back to the
    layer's pool, so a training loop reuses the same few caches instead of allocating."""
    __slots__ = ("pool", "cache")

    def __init__(self, pool, cache):
        self.pool, self.cache = pool, cache

    def __del__(self):
        self.pool.append(self.cache)


class _LayerFunction(torch.autograd.Function):
    """y = layer(x) with mxd's forward, and mxd's analytic backward for x and every parameter.
    math: mxd's MathMode on a GPU ("fp32", "tf32", "bf16"; "fp32" on the CPU)."""

    @staticmethod
    def forward(ctx, layer, steering, math, x, *params):
        pool = layer._caches
        cache = pool.pop() if pool else _C.Cache()
        threads = torch.get_num_threads()
        try:
            y = _C.forward(layer.config, list(params), x, cache,
                           _C.Edits(*layer._edits(steering)), threads, math)
        except BaseException:
            pool.append(cache)
            raise
        layer._last = cache
        if any(ctx.needs_input_grad):
            ctx.lease = _Lease(pool, cache)
            ctx.layer = layer
            ctx.save_for_backward(x, *params)
        else:
            pool.append(cache)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, *params = ctx.saved_tensors
        layer = ctx.layer
        # Where .grad exists autograd adds into it, so the layer's kept buffers can serve.
        reuse_ok = [p.grad is not None for p in layer.params()]
        dx, grads = _C.backward(layer.config, list(params), x, dy.contiguous(), ctx.lease.cache,
                                ctx.needs_input_grad[3], layer._grad_buffers, reuse_ok,
                                torch.get_num_threads())
        return (None, None, None, dx, *grads)


class _Holder(torch.nn.Module):
    """A parameter container, so names such as W_glu.weight match the authors' state dict."""


class _Layer(torch.nn.Module):
    """What MxD and the transcoders share: parameters under the authors' names, the autograd
    function, top-k access, state-dict and file round trips."""

    def _register(self, names, tensors):
        self._names = list(names)
        for name, t in zip(self._names, tensors):
            owner, leaf = self, name
            if "." in name:
                head, leaf = name.split(".")
                if not hasattr(self, head):
                    self.add_module(head, _Holder())
                owner = getattr(self, head)
            owner.register_parameter(leaf, torch.nn.Parameter(t))
        self._caches = []
        self._last = None
        self._grad_buffers = _C.GradBuffers()

    def params(self):
        """The parameters in mxd's order (the state dict's)."""
        return [self.get_parameter(n) for n in self._names]

    def forward(self, x, steering=None):
        """x: [..., d_in] (contiguous, the parameters' dtype and device) -> [..., d_out].
        On a GPU a float32 layer also takes bfloat16 and float16 x (see _cuda_precision)."""
        low, math = None, "fp32"
        if x.device.type == "cuda":
            x, low, math = _cuda_precision(x, self.get_parameter(self._names[0]).dtype)
        if _OPS and _ops.traced(x):
            y, idx, vals = self._op_forward(x, steering, math)
            self._last = (x.shape[:-1], idx, vals)
        else:
            y = _LayerFunction.apply(self, steering, math, x, *self.params())
        return y if low is None else y.to(low)

    def _edits(self, steering):
        """Steering's edits as lists (MxD only)."""
        return _edit_lists(None)

    def topk(self):
        """The last forward's selection: (indices int64, values), each [..., k]; values are
        the coefficients the experts were mixed with (steering edits add columns)."""
        if self._last is None:
            raise Error("topk(): no forward has run yet")
        if isinstance(self._last, tuple):  # from the ops: [B, K] tensors
            lead, idx, vals = self._last
            shape = (*lead, idx.shape[-1])
            return idx.long().reshape(shape), vals.reshape(shape)
        return self._last.topk()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The authors' modules carry an unused b_dec (the SAE's pre-encoder bias).
        state_dict.pop(prefix + "b_dec", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _dtype_name(self):
        return _dtype_name(self.get_parameter(self._names[0]).dtype)

    def _host_params(self):
        """The parameters in host memory (copies of a GPU layer's), in mxd's layouts."""
        return _on([p.detach() for p in self.params()], torch.device("cpu"))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_caches"], state["_last"] = [], None
        del state["_grad_buffers"]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._grad_buffers = _C.GradBuffers()


class MxD(_Layer):
    """A Mixture of Decoders layer (Oldfield et al., arXiv 2505.21364):

        z = act(x W_enc + b_enc)            (glu: z = (x W_glu^T + b_glu) * act(x W_enc + b_enc))
        a = top-k(relu(x gate^T + gate_bias))
        y = (z W_dec) * (a W_cond^T) (+ x W_skip^T) + b_dec_out

    activation: relu, gelu, gelu_tanh (gelu_pytorch_tanh), sigmoid or silu. Initialised as
    the authors' layer (mxd::init_params, seeded from torch's generator).
    """

    def __init__(self, d_in, d_hidden, d_out, n_experts, k, activation="gelu", glu=False,
                 skip=False, dtype=None, device=None, *, _config=None, _tensors=None):
        super().__init__()
        device = _device(device)
        c = self.config = _config or _C.Config(d_in, d_hidden, d_out, n_experts, k, activation,
                                               glu, skip)
        self._op_config = (c.k, c.activation, c.glu, c.skip)  # plain values, for tracing
        meta = device.type == "meta"
        tensors = _on(_tensors if _tensors is not None else _C.init(
            c, None if meta else _seed(), _dtype_name(dtype)), device)
        self._register(c.names(), tensors)
        self.steering = None

    def _edits(self, steering):
        return _edit_lists(steering if steering is not None else self.steering)

    def _op_forward(self, x, steering, math):
        return _ops.mxd_forward(x, self.params(), self._op_config, self._edits(steering), math)

    @classmethod
    def from_file(cls, path, dtype=None, device=None):
        """An MxD read from a safetensors file with mxd's reader: `mxd train` checkpoints,
        MxD.save files, or the authors' tensors with `activation` and `k` in the metadata."""
        config, tensors = _C.mxd_load(str(path), _dtype_name(dtype))
        return cls(None, None, None, None, None, device=device, _config=config, _tensors=tensors)

    def save(self, path):
        """Writes the parameters (in their dtype) and the config to `path` in mxd's format,
        atomically (a temporary file, then a rename); MxD.from_file and the mxd tool's
        `inspect` and `steer` read it."""
        _C.save(str(path), self.config, self._host_params())

    def extra_repr(self):
        c = self.config
        return (f"d_in={c.d_in}, d_hidden={c.d_hidden}, d_out={c.d_out}, n_experts={c.n_experts}, "
                f"k={c.k}, activation={c.activation}, glu={c.glu}, skip={c.skip}")


class TopKTranscoder(_Layer):
    """The TopK transcoder MxD is compared with (and, with skip=True, the skip transcoder):

        a = top-k(relu(x W_enc + b_enc));   y = a W_dec (+ x W_skip^T) + b_dec_out

    W_enc [d_in, n_latents] is stored as the transpose of a contiguous [n_latents, d_in]."""

    def __init__(self, d_in, d_out, n_latents, k, skip=False, dtype=None, device=None, *,
                 _config=None, _tensors=None):
        super().__init__()
        device = _device(device)
        c = self.config = _config or _C.TranscoderConfig(d_in, d_out, n_latents, k, skip)
        self._op_config = (c.k, c.skip)
        meta = device.type == "meta"
        tensors = _on(_tensors if _tensors is not None else _C.init(
            c, None if meta else _seed(), _dtype_name(dtype)), device)
        self._register(c.names(), tensors)

    def forward(self, x):
        """x: [..., d_in] (contiguous, the parameters' dtype and device) -> [..., d_out]."""
        return super().forward(x)

    def _op_forward(self, x, steering, math):
        return _ops.transcoder_forward(x, self.params(), self._op_config, math)

    @classmethod
    def from_file(cls, path, dtype=None, device=None):
        """A transcoder read from an mxd checkpoint (`mxd train`'s topk_transcoder.safetensors
        or .save); with W_skip.weight in the file it is a skip transcoder. A model trained
        ranking its latents by decoder norm (SAELens's rule, mxd train's default baseline) is
        loaded with those norms folded into its encoder: the same function, plain top-k."""
        config, tensors = _C.transcoder_load(str(path), _dtype_name(dtype))
        layer = cls.__new__(SkipTranscoder if config.skip else TopKTranscoder)
        TopKTranscoder.__init__(layer, None, None, None, None, device=device, _config=config,
                                _tensors=tensors)
        return layer

    def save(self, path):
        """Writes the parameters and config to `path` in mxd's checkpoint format, atomically."""
        _C.save(str(path), self.config, self._host_params())

    def extra_repr(self):
        c = self.config
        return (f"d_in={c.d_in}, d_out={c.d_out}, n_latents={c.n_latents}, k={c.k}, "
                f"skip={c.skip}")


class SkipTranscoder(TopKTranscoder):
    """A TopK transcoder with a linear skip connection (needs d_in == d_out)."""

    def __init__(self, d, n_latents, k, dtype=None, device=None):
        super().__init__(d, d, n_latents, k, skip=True, dtype=dtype, device=device)


class AdamW:
    """mxd::AdamW over a layer's parameters and their .grad, in place (what `mxd train` uses):
    the same update as torch.optim.AdamW, with the authors' linear warm-up to lr. Its moments
    live on the layer's device (the CPU, or a GPU on torch's current stream); move the layer
    first, then make the optimizer."""

    def __init__(self, layer, lr=4e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 warmup_steps=0):
        self.layer = layer
        self._opt = _C.AdamW(layer.config, layer.params(), lr, betas[0], betas[1], eps,
                             weight_decay, warmup_steps)

    def step(self):
        params = self.layer.params()
        for name, p in zip(self.layer._names, params):
            if p.grad is None:
                raise Error(f"AdamW.step: {name} has no gradient (call backward first)")
        with torch.no_grad():
            self._opt.step(params, [p.grad for p in params], torch.get_num_threads())

    def zero_grad(self, set_to_none=True):
        self.layer.zero_grad(set_to_none=set_to_none)

    @property
    def steps(self):
        return self._opt.steps
