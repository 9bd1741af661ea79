#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""Writes the golden cases tests/data/<case>.safetensors from a float64 PyTorch implementation
of the MxD layer written from the paper's equations (independent of the C++ code), or checks
that the files on disk are what it would write.

    /usr/bin/python3 tests/data/golden/make_golden.py OUT_DIR            # write the 10 cases
    /usr/bin/python3 tests/data/golden/make_golden.py --check tests/data  # regenerate and compare

It also writes split/gelu_glu_layer.safetensors (the case's parameters and metadata) and
split/gelu_glu_batch.safetensors (its x, dy and target), for `mxd eval LAYER OUT --batch BATCH`.

Each case holds the parameters under the authors' names and layouts (W_enc [I,H], b_enc [H],
W_dec [H,O], gate [N,I], gate_bias [N], W_cond [O,N], b_dec_out [O], W_glu.weight [H,I],
W_glu.bias [H], W_skip.weight [O,I]), a batch x [B,I], a target and an upstream gradient dy,
and what the layer computes: y, topk_indices (I64) and topk_values, grad.x and grad.NAME for
L = sum(y * dy), loss_nmse_ref and dloss_dy. Floats are F64; __metadata__ holds activation,
k, glu, skip and the sizes as strings.

The layer, per row x (top-k keeps the k largest gate scores, largest first):
    z = act(x W_enc + b_enc)                 GLU: z = (x W_glu^T + b_glu) * act(x W_enc + b_enc)
    a = top-k(relu(x gate^T + gate_bias))    (index, value) pairs
    y = (z W_dec) * (sum_j a_j W_cond[:, idx_j])  (+ x W_skip^T)  + b_dec_out
and loss_nmse_ref = mean over elements of (y - target)^2 / ||target row||_2.

--check compares every tensor and the metadata. Parameters and inputs come from seeded
torch.randn draws and must be equal bit for bit; topk_indices must be equal where the value
is positive (elsewhere the order of zero scores is arbitrary). Computed floats must agree to
1e-14 normwise (max |a - b| / max |b|): they are equal up to rounding, not bit for bit,
because the files were written with the dense form v = a W_cond^T (a scattered to all N
experts) where this script sums the k selected experts, and a GEMM of another torch or BLAS
build may sum in another order. Each such reordering moves a result by a few units of
2^-52 ~ 2.2e-16; the largest difference with torch 1.13 is 8.4e-16.
"""
import json
import os
import struct
import sys
import tempfile

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)

# name, d_in I, d_hidden H, d_out O, n_experts N, k, batch B, activation, glu, skip, variant
CASES = [
    ("relu_basic", 16, 64, 12, 200, 8, 5, "relu", False, False, None),
    ("gelu_glu", 16, 48, 10, 120, 6, 7, "gelu", True, False, None),
    ("gelu_tanh_skip", 12, 40, 12, 90, 5, 4, "gelu_tanh", False, True, None),
    ("sigmoid", 8, 32, 6, 64, 4, 3, "sigmoid", False, False, None),
    ("silu_glu_skip", 10, 30, 10, 50, 3, 6, "silu", True, True, None),
    ("k_equals_n", 6, 12, 5, 9, 9, 4, "relu", False, False, None),  # k = n_experts
    ("k_one", 9, 18, 7, 33, 1, 5, "gelu", False, False, None),
    # gate_bias shifted by -1.2: fewer than k positive scores in most rows, none in one
    ("few_positive", 8, 16, 8, 40, 10, 6, "relu", False, False, "negative_gate_bias"),
    ("single_row", 16, 64, 16, 300, 16, 1, "relu", False, False, None),
    ("wide_gate", 24, 96, 20, 2000, 32, 3, "relu", False, False, None),
]

ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": F.gelu,  # the exact erf form
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
}

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.int64: "I64"}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def write_safetensors(path, tensors, metadata):
    """Writes a safetensors file: u64 header length, JSON header (padded to 8 bytes), data."""
    header, chunks, offset = {"__metadata__": {k: str(v) for k, v in metadata.items()}}, [], 0
    for name, t in tensors.items():
        data = t.detach().contiguous().numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))
    os.replace(tmp, path)


def read_safetensors(path):
    """Returns ({name: tensor}, metadata) of a file with F64, F32 or I64 tensors."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, info in header.items():
        begin, end = (8 + n + o for o in info["data_offsets"])
        flat = torch.frombuffer(bytearray(blob[begin:end]), dtype=TORCH_DTYPES[info["dtype"]])
        tensors[name] = flat.reshape(info["shape"])
    return tensors, metadata


def make_params(I, H, O, N, glu, skip, seed):
    """Parameters from one seeded stream, in this order: N(0, 1) draws, weights divided by
    sqrt(fan_in), biases times 0.1."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=gen)
    p = {"W_enc": draw(I, H) / I ** 0.5, "b_enc": draw(H) * 0.1, "W_dec": draw(H, O) / H ** 0.5,
         "gate": draw(N, I) / I ** 0.5, "gate_bias": draw(N) * 0.1, "W_cond": draw(O, N),
         "b_dec_out": draw(O) * 0.1}
    if glu:
        p["W_glu.weight"] = draw(H, I) / I ** 0.5
        p["W_glu.bias"] = draw(H) * 0.1
    if skip:
        p["W_skip.weight"] = draw(O, I) / I ** 0.5
    return p


def mxd_layer(p, x, k, activation):
    """y [B,O], top-k values and indices [B,k]: only the k selected experts' vectors are
    gathered, so gradients reach the gate through the selected scores alone."""
    z = ACTIVATIONS[activation](x @ p["W_enc"] + p["b_enc"])
    if "W_glu.weight" in p:
        z = z * (x @ p["W_glu.weight"].t() + p["W_glu.bias"])
    scores = torch.relu(x @ p["gate"].t() + p["gate_bias"])
    values, indices = torch.topk(scores, k, dim=1)          # largest first
    experts = p["W_cond"].t()[indices]                         # [B, k, O]: c_n of each pick
    coefficients = (values.unsqueeze(2) * experts).sum(dim=1)  # sum_j a_j c_{idx_j}
    y = (z @ p["W_dec"]) * coefficients
    if "W_skip.weight" in p:
        y = y + x @ p["W_skip.weight"].t()
    return y + p["b_dec_out"], values, indices


def nmse_ref(y, target):
    """The authors' normalized MSE: each squared error divided by its target row's L2 norm."""
    return ((y - target).pow(2) / target.norm(dim=1, keepdim=True)).mean()


def make_case(index, name, I, H, O, N, k, B, activation, glu, skip, variant):
    seed = 1000 * (index + 1)
    p = make_params(I, H, O, N, glu, skip, seed)
    if variant == "negative_gate_bias":
        p["gate_bias"] = p["gate_bias"] - 1.2
    gen = torch.Generator().manual_seed(seed + 7)
    x, target, dy = (torch.randn(rows, cols, generator=gen) for rows, cols in ((B, I), (B, O), (B, O)))

    leaves = {n: t.clone().requires_grad_(True) for n, t in p.items()}
    x_leaf = x.clone().requires_grad_(True)
    y, values, indices = mxd_layer(leaves, x_leaf, k, activation)
    (y * dy).sum().backward()
    y_leaf = y.detach().clone().requires_grad_(True)
    loss = nmse_ref(y_leaf, target)
    loss.backward()

    out = dict(p)
    out.update({"x": x, "target": target, "dy": dy, "y": y.detach(), "topk_indices": indices,
                "topk_values": values.detach(), "loss_nmse_ref": loss.detach().reshape(1),
                "dloss_dy": y_leaf.grad, "grad.x": x_leaf.grad})
    out.update({"grad." + n: t.grad for n, t in leaves.items()})
    meta = {"activation": activation, "k": k, "glu": int(glu), "skip": int(skip), "d_in": I,
            "d_hidden": H, "d_out": O, "n_experts": N, "batch": B}
    return out, meta


# Drawn (exact) rather than computed tensors.
INPUTS = {"W_enc", "b_enc", "W_dec", "gate", "gate_bias", "W_cond", "b_dec_out", "W_glu.weight",
          "W_glu.bias", "W_skip.weight", "x", "target", "dy"}
SPLIT_CASE = "gelu_glu"
BATCH = ("x", "dy", "target")


def write_all(out_dir):
    os.makedirs(os.path.join(out_dir, "split"), exist_ok=True)
    for i, case in enumerate(CASES):
        tensors, meta = make_case(i, *case)
        write_safetensors(os.path.join(out_dir, case[0] + ".safetensors"), tensors, meta)
        if case[0] == SPLIT_CASE:
            layer = {n: t for n, t in tensors.items() if n in INPUTS and n not in BATCH}
            write_safetensors(os.path.join(out_dir, "split", case[0] + "_layer.safetensors"), layer, meta)
            batch = {n: tensors[n] for n in BATCH}
            write_safetensors(os.path.join(out_dir, "split", case[0] + "_batch.safetensors"), batch, {})


def written_files():
    return [case[0] + ".safetensors" for case in CASES] + [
        os.path.join("split", SPLIT_CASE + part + ".safetensors") for part in ("_layer", "_batch")]


TOLERANCE = 1e-14


def check(golden_dir):
    """Regenerates every case into a temporary directory and compares it with golden_dir;
    returns the number of differences (each printed)."""
    failures = 0
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        write_all(tmp)
        for name in written_files():
            new, new_meta = read_safetensors(os.path.join(tmp, name))
            old, old_meta = read_safetensors(os.path.join(golden_dir, name))
            problems = []
            if new_meta != old_meta:
                problems.append(f"metadata {old_meta} != {new_meta}")
            if sorted(new) != sorted(old):
                problems.append(f"tensors {sorted(old)} != {sorted(new)}")
            for t in sorted(set(new) & set(old)):
                a, b = new[t], old[t]
                if a.dtype != b.dtype or a.shape != b.shape:
                    problems.append(f"{t}: {b.dtype} {list(b.shape)} != {a.dtype} {list(a.shape)}")
                elif t == "topk_indices":
                    positive = old["topk_values"] > 0
                    if not torch.equal(a[positive], b[positive]):
                        problems.append(f"{t}: differs where the value is positive")
                elif t in INPUTS:
                    if not torch.equal(a, b):
                        problems.append(f"{t}: not bit-identical")
                else:
                    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
                    worst = max(worst, err)
                    if err > TOLERANCE:
                        problems.append(f"{t}: normwise error {err:.3g} > {TOLERANCE:g}")
            for problem in problems:
                print(f"{name}: {problem}")
            failures += len(problems)
    print(f"{len(CASES)} golden cases and the split case checked, {failures} differences, "
          f"largest normwise error of computed tensors {worst:.3g}")
    return failures


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        sys.exit(1 if check(sys.argv[2]) else 0)
    if len(sys.argv) == 2 and not sys.argv[1].startswith("-"):
        write_all(sys.argv[1])
        sys.exit(0)
    sys.exit(__doc__)
