"""mlx-lm's LoRA layer on torch: y = W x + b + scale * (dropout(x) @ A) @ B.

Same initialisation convention as mlx_lm.tuner.lora.LoRALinear: A (in, r) ~ U(-1/sqrt(in), 1/sqrt(in)),
B (r, out) = 0, so the adapted model starts as the base model. Parameters keep mlx-lm's names and
layouts (`<module>.lora_a`, `<module>.lora_b`), so adapters move between the two as they are.
"""

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0, generator=None, init=None):
        super().__init__()
        self.base = base
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        bound = 1 / math.sqrt(base.in_features)
        dtype = base.weight.dtype
        if init is None:
            init = torch.empty(base.in_features, rank, dtype=dtype).uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(torch.as_tensor(init).to(dtype))
        self.lora_b = nn.Parameter(torch.zeros(rank, base.out_features, dtype=dtype))

    def forward(self, x):
        return self.base(x) + self.scale * ((self.dropout(x) @ self.lora_a) @ self.lora_b)


def targets(layer: nn.Module, prefixes) -> list:
    """Names of the Linear modules in a block whose path starts with one of `prefixes`."""
    return sorted(
        name
        for name, m in layer.named_modules()
        if isinstance(m, nn.Linear) and any(name == p or name.startswith(p + ".") for p in prefixes)
    )


def apply(model, prefixes, rank: int, scale: float, layers: int = -1, dropout: float = 0.0, seed: int = 0) -> list:
    """Freeze `model` and wrap the targeted Linear layers of its last `layers` blocks (-1: all), A
    drawn by `numerics.lora_init.lora_a_init` (the MLX backend's draw too). Returns the adapted module names
    (mlx-lm's paths)."""
    from mlx_ltc.numerics.lora_init import lora_a_init

    for p in model.parameters():
        p.requires_grad_(False)
    blocks = model.model.layers
    first = 0 if layers < 0 else max(0, len(blocks) - layers)
    names = []
    for i in range(first, len(blocks)):
        for name in targets(blocks[i], prefixes):
            parent_name, _, leaf = name.rpartition(".")
            parent = blocks[i].get_submodule(parent_name) if parent_name else blocks[i]
            path, base = f"model.layers.{i}.{name}", getattr(parent, leaf)
            a = torch.from_numpy(lora_a_init(path, base.in_features, rank, seed))
            setattr(parent, leaf, LoRALinear(base, rank, scale, dropout, init=a))
            names.append(path)
    return names


def adapter_state(model) -> dict:
    """{mlx-lm adapter name: tensor} of every LoRA parameter."""
    return {n: p for n, p in model.named_parameters() if n.endswith((".lora_a", ".lora_b"))}
