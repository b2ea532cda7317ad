"""LoRA adapters on an mlx-lm model: mlx-lm's own LoRA layers, saved in mlx-lm's format
(adapters.safetensors + adapter_config.json), so `mlx_lm.generate --adapter-path` and `mlx_lm.fuse`
accept them."""

from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_ltc import atomic
from mlx_ltc.config import LoraConfig
from mlx_ltc.errors import UserError
from mlx_ltc.numerics.lora_init import lora_a_init


def lora_keys(model, cfg: LoraConfig) -> list:
    """Linear layers inside each transformer block whose path starts with a target prefix."""
    layer = model.layers[0]
    keys = sorted(
        name
        for name, m in layer.named_modules()
        if isinstance(m, (nn.Linear, nn.QuantizedLinear))
        and any(name == t or name.startswith(t + ".") for t in cfg.targets)
    )
    if not keys:
        linears = sorted(n for n, m in layer.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear)))
        raise UserError(f"lora.targets {cfg.targets} match no linear layer; this model has: {', '.join(linears)}")
    return keys


def apply_lora(model, cfg: LoraConfig, seed: int = 0) -> dict:
    """Freeze the model, add mlx-lm LoRA layers, return the mlx-lm adapter config. The initial A
    matrices come from `numerics.lora_init.lora_a_init` (mlx-lm's distribution, seeded per adapter name)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n_layers = len(model.layers) if cfg.layers < 0 else min(cfg.layers, len(model.layers))
    params = {
        "rank": cfg.rank or 8,  # None outside `train` (which derives it): mlx-lm's default
        "scale": cfg.scale,
        "dropout": cfg.dropout,
        "keys": lora_keys(model, cfg),
    }
    model.freeze()
    linear_to_lora_layers(model, n_layers, params)
    fresh = [
        (name, mx.array(lora_a_init(name[: -len(".lora_a")], *p.shape, seed)))
        for name, p in tree_flatten(model.trainable_parameters())
        if name.endswith(".lora_a")
    ]
    model.update(tree_unflatten(fresh))
    return {"fine_tune_type": "lora", "num_layers": n_layers, "lora_parameters": params}


@contextmanager
def adapters_off(model):
    """The base model's numbers from a model with LoRA layers: mlx-lm's LoRA adds scale * (x A) B to the
    frozen layer's output, so with every scale 0 inside this block that term adds exactly zero."""
    layers = [m for _, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, scale in zip(layers, scales):
            m.scale = scale


def save_adapters(model, adapter_dir: Path, adapter_config: dict) -> None:
    adapter_dir = Path(adapter_dir)
    weights = dict(tree_flatten(model.trainable_parameters()))
    with atomic.atomic_path(adapter_dir / "adapters.safetensors") as tmp:
        mx.save_safetensors(str(tmp), weights)
    atomic.write_json(adapter_dir / "adapter_config.json", adapter_config)
