# SPDX-License-Identifier: MIT
"""The small language model of the experiment: a byte-level causal transformer trained on the
English text of Debian's fortunes packages, seeded and deterministic, plus the text split and
a dependency-free safetensors reader/writer (the format mxd's tool streams)."""
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FORTUNES = Path("/usr/share/games/fortunes")
# Every English text file of the fortunes-min and fortunes packages except ascii-art (drawings).
EXCLUDED = {"ascii-art"}


def deterministic(seed, threads):
    """Seeds torch and fixes threads so a run repeats bit for bit on the same machine."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def corpus(directory=FORTUNES):
    """The fortunes as a list of strings (one per fortune), in a fixed file and entry order."""
    files = sorted(p for p in Path(directory).iterdir()
                   if p.is_file() and "." not in p.name and p.name not in EXCLUDED)
    if not files:
        raise FileNotFoundError(f"no fortune files in {directory} (apt-get install fortunes)")
    out = []
    for p in files:
        for entry in p.read_bytes().decode("utf-8", "replace").split("\n%\n"):
            entry = entry.strip("%\n")
            if entry.strip():
                out.append(entry)
    return files, out


def split(entries, every=10):
    """Every `every`-th fortune is held out; the rest trains. Returns (train, held_out) bytes."""
    train = [e for i, e in enumerate(entries) if i % every]
    held = [e for i, e in enumerate(entries) if i % every == 0]
    enc = lambda es: np.frombuffer(("\n\n".join(es) + "\n\n").encode("utf-8"), dtype=np.uint8)
    return enc(train), enc(held)


class GLU(nn.Module):
    """Llama's SwiGLU MLP, down(silu(gate(x)) * up(x)) (with biases, as the GELU MLP): a
    product of two projections, so less of it is linear than of a GELU MLP."""

    def __init__(self, d, hidden):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm transformer block; `mlp` is the module the experiment replaces (as GPT-2's):
    GPT-2's GELU MLP, or with mlp="glu" a SwiGLU one."""

    def __init__(self, d, heads, hidden, mlp="gelu"):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        if mlp == "glu":
            self.mlp = GLU(d, hidden)
        elif mlp == "gelu":
            self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        else:
            raise ValueError(f"unknown mlp {mlp!r} (gelu or glu)")

    def forward(self, x):  # x: [B, L, d]
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(B, L, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, L, d / heads]
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        mask = torch.ones(L, L, dtype=torch.bool).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, L, d))
        return x + self.mlp(self.ln_2(x))


class ByteLM(nn.Module):
    """Byte-level causal LM: 256 tokens, learned positions, `layers` pre-norm blocks."""

    def __init__(self, d=64, layers=4, heads=4, hidden=256, ctx=128, mlp="gelu"):
        super().__init__()
        self.config = dict(d=d, layers=layers, heads=heads, hidden=hidden, ctx=ctx, mlp=mlp)
        self.wte, self.wpe = nn.Embedding(256, d), nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads, hidden, mlp) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        for name, p in self.named_parameters():  # GPT-2's initialisation
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):  # idx: [B, L] bytes -> logits [B, L, 256]
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


def windows(data, ctx, starts):
    """Input/target windows at `starts`: ([n, ctx], [n, ctx]) int64."""
    idx = torch.as_tensor(np.stack([data[s:s + ctx + 1] for s in starts]).astype(np.int64))
    return idx[:, :-1], idx[:, 1:]


def eval_starts(data, ctx, n):
    """n non-overlapping held-out windows, evenly spread (the same for every method)."""
    step = (len(data) - ctx - 1) // n
    if step < ctx:
        raise ValueError(f"held-out text of {len(data)} bytes is too short for {n} windows of {ctx}")
    return [i * step for i in range(n)]


def train_lm(train, cfg, steps, batch, lr, seed, log=print):
    """Trains a ByteLM with AdamW (linear warm-up, cosine decay); returns it in eval mode."""
    torch.manual_seed(seed)
    model = ByteLM(**cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    rng = np.random.default_rng(seed)
    warm = max(1, steps // 20)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x, t = windows(train, cfg["ctx"], rng.integers(0, len(train) - cfg["ctx"] - 1, batch))
        loss = F.cross_entropy(model(x).flatten(0, 1), t.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step + 1 == steps:
            log(f"lm step {step + 1}/{steps} train CE {loss.item():.4f}")
    return model.eval()


def save_lm(model, path):
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save({"config": model.config, "state": model.state_dict()}, tmp)
    os.replace(tmp, path)


def load_lm(path):
    blob = torch.load(path)
    model = ByteLM(**blob["config"])
    model.load_state_dict(blob["state"])
    return model.eval()


# --- safetensors: header length (u64 LE), JSON header, raw little-endian data -----------------

DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32}


class StreamWriter:
    """Writes a safetensors file whose tensors' shapes are known up front, filled by rows in
    any order of calls (`write(name, first_row, rows)`), to a temporary name renamed on close."""

    def __init__(self, path, shapes, dtype="F32", metadata=None):
        self.path, self.tmp = str(path), f"{path}.{os.getpid()}.tmp"  # a process of its own
        self.np_dtype = np.dtype(DTYPES[dtype]).newbyteorder("<")
        header, offset = {}, 0
        self.layout = {}
        for name, shape in shapes.items():
            n = int(np.prod(shape)) * self.np_dtype.itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.layout[name] = (offset, shape)
            offset += n
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        self.base = 8 + len(raw)
        self.f = open(self.tmp, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.f.truncate(self.base + offset)

    def write(self, name, first_row, rows):  # rows: [n, *shape[1:]]
        offset, shape = self.layout[name]
        row_bytes = int(np.prod(shape[1:])) * self.np_dtype.itemsize
        data = np.ascontiguousarray(np.asarray(rows, dtype=self.np_dtype))
        if data.shape[1:] != tuple(shape[1:]) or first_row + data.shape[0] > shape[0]:
            raise ValueError(f"{self.path}: rows {data.shape} at {first_row} do not fit {name} {shape}")
        self.f.seek(self.base + offset + first_row * row_bytes)
        self.f.write(data.tobytes())

    def close(self):
        self.f.close()
        os.replace(self.tmp, self.path)


def save_file(tensors, path, metadata=None):
    """Writes {name: array of rank >= 1} as a float32 safetensors file."""
    w = StreamWriter(path, {k: np.shape(v) for k, v in tensors.items()}, "F32", metadata)
    for k, v in tensors.items():
        w.write(k, 0, np.asarray(v, np.float32))
    w.close()


def load_file(path):
    """Reads a safetensors file: ({name: float32 or int64 torch tensor}, metadata)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for name, info in header.items():
        if info["dtype"] == "BF16":
            a, b = info["data_offsets"]
            u16 = np.frombuffer(raw[8 + n + a:8 + n + b], dtype="<u2").astype(np.uint32) << 16
            arr = u16.view(np.float32)
        else:
            a, b = info["data_offsets"]
            arr = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=np.dtype(DTYPES[info["dtype"]]).newbyteorder("<"))
        arr = arr.reshape(info["shape"])
        out[name] = torch.from_numpy(arr.astype(np.int64 if arr.dtype.kind == "i" else np.float32))
    return out, meta
