#!/usr/bin/python3
"""Writes adamw_golden.safetensors: three torch.optim.AdamW steps on a float64 tensor with
given gradients, the tensor after each step, and the hyper-parameters in __metadata__.
Usage: /usr/bin/python3 tests/data/adamw/make_adamw_golden.py tests/data/adamw/adamw_golden.safetensors
Needs python3-torch; the safetensors writer is the golden cases' (../golden/make_golden.py)."""
import os, sys
import torch

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "golden"))
from make_golden import write_safetensors

torch.manual_seed(1234)
hp = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
p = torch.nn.Parameter(torch.randn(5, 7, dtype=torch.float64))
tensors = {"param.0": p.detach().clone()}
opt = torch.optim.AdamW([p], lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                        weight_decay=hp["weight_decay"])
for step in range(1, 4):
    g = torch.randn(5, 7, dtype=torch.float64) * (10.0 ** (step - 2))
    p.grad = g.clone()
    opt.step()
    tensors[f"grad.{step}"] = g
    tensors[f"param.{step}"] = p.detach().clone()
meta = {"lr": hp["lr"], "beta1": hp["betas"][0], "beta2": hp["betas"][1], "eps": hp["eps"],
        "weight_decay": hp["weight_decay"], "torch": torch.__version__}
write_safetensors(sys.argv[1], tensors, meta)
print("wrote", sys.argv[1])
