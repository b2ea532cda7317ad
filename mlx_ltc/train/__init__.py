"""Train LoRA adapters on a (4-bit, or dequantized on CPU) mlx-lm model.

The LoRA layers are mlx-lm's own, and adapters are saved in mlx-lm's format
(adapters.safetensors + adapter_config.json), so `mlx_lm.generate --adapter-path` and
`mlx_lm.fuse` accept them. Gradient accumulation is token-weighted: the update is exactly the
mean-over-tokens gradient of all micro-batches together.
"""

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_ltc import atomic
from mlx_ltc.backend import lora_a_init
from mlx_ltc.config import LoraConfig, MemoryConfig, TrainConfig
from mlx_ltc.data import Split
from mlx_ltc.errors import UserError
from mlx_ltc.train import engine

__all__ = ["TrainResult", "Updater", "accumulate_gradients", "adapters_off", "apply_lora", "batches", "save_adapters"]


@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    peak_memory_gb: float
    final_loss: float
    trainable_params: int
    curriculum: dict | None = None  # phases, per-phase/per-length summaries, stability counts


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
    matrices come from `backend.lora_a_init` (mlx-lm's distribution, seeded per adapter name)."""
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


def batch_indices(n: int, batch_size: int, rng=None):
    """Row indices of each batch; shuffled when rng is given. Shared by every backend, so the
    torch reference sees the very same batches."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def endless_indices(n: int, batch_size: int, seed: int):
    """Epoch after epoch of shuffled batches, from one seeded generator."""
    rng = np.random.default_rng(seed)
    while True:
        yield from batch_indices(n, batch_size, rng)


def batches(split: Split, batch_size: int, rng=None):
    """Yield (tokens (B, L) int32, target weights (B, L-1) float32, real targets) batches; shuffled
    when rng is given. Weights are the documents' role weights, 0 on padding and the repo prefix."""
    for idx in batch_indices(len(split), batch_size, rng):
        yield mx.array(split.tokens[idx]), mx.array(split.weights[idx]), int(split.real[idx].sum())


def enable_grad_checkpoint(model):
    """Recompute each transformer block in the backward pass. The checkpointed __call__ lives on a
    per-model subclass, so module paths (and thus adapter names) and other models are unchanged."""
    for layer in model.layers:
        base = type(layer)

        def call(self, *args, _base=base, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return _base.__call__(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        layer.__class__ = type(base.__name__ + "Checkpointed", (base,), {"__call__": call})


def accumulate_gradients(loss_and_grad, model, micro_batches):
    """Weighted-mean gradient of several micro-batches, as if they were one batch.
    Returns (grads, summed weighted loss, summed weight, real tokens)."""
    grads, loss_sum, weight, tokens = None, mx.array(0.0), mx.array(0.0), 0
    for batch_tokens, weights, n_real in micro_batches:
        (s, n), g = loss_and_grad(model, batch_tokens, weights)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        loss_sum, weight, tokens = loss_sum + s, weight + n, tokens + n_real
        mx.eval(grads, loss_sum, weight)  # one micro-batch's graph alive at a time
    return tree_map(lambda g: g / weight, grads), loss_sum, weight, tokens


class StepLog:
    """What every backend records per optimizer step: a `metrics.jsonl` line, the progress bar (log lines
    without a terminal), and the divergence check; `result` is the run's TrainResult."""

    def __init__(self, path: Path, steps: int, progress: bool, peak_memory_gb):
        from mlx_ltc import progress as progress_bars

        self.path, self.steps, self.peak = Path(path), steps, peak_memory_gb
        self.bar = progress_bars.bar(total=steps, desc="train", unit="step", enabled=progress)
        self.tokens, self.loss, self.start = 0, float("nan"), time.perf_counter()

    def __enter__(self):
        self.file = open(self.path, "w", encoding="utf-8")
        return self

    def __exit__(self, *exc):
        self.file.close()
        self.bar.close()

    def step(self, step: int, loss: float, lr: float, grad_norm: float, tokens: int) -> None:
        if not math.isfinite(loss):
            raise UserError(f"training diverged at step {step}: loss is {loss}; lower train.lr")
        self.tokens += tokens
        self.loss = loss
        elapsed = time.perf_counter() - self.start
        row = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / elapsed,
            "peak_memory_gb": self.peak(),
            "elapsed_s": elapsed,
        }
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                             mem=f"{row['peak_memory_gb']:.2f}GB", refresh=False)  # fmt: skip
        self.bar.update(1)

    def result(self, trainable_params: int) -> TrainResult:
        wall = time.perf_counter() - self.start
        return TrainResult(
            steps=self.steps,
            tokens=self.tokens,
            wall_s=wall,
            tokens_per_s=self.tokens / wall,
            peak_memory_gb=self.peak(),
            final_loss=self.loss,
            trainable_params=trainable_params,
        )


@dataclass
class StepStats:
    loss: float  # weighted mean NLL of the update's micro-batches
    grad_norm: float  # before clipping
    lr: float  # the rate this update used
    tokens: int  # real targets


class Updater:
    """One optimizer update: accumulate the micro-batches' gradients, clip, AdamW at the given rate.

    AdamW is bias-corrected (the standard algorithm, torch.optim.AdamW's): without the correction
    MLX's default takes ~3x larger steps in the first updates.
    """

    def __init__(self, model, cfg: TrainConfig, memory: MemoryConfig | None = None):
        self.model, self.cfg = model, cfg
        self.optimizer = optim.AdamW(learning_rate=cfg.lr, weight_decay=cfg.weight_decay, bias_correction=True)
        self.step_fn = engine.loss_and_grad(model, memory or MemoryConfig())
        self.last_grads = None  # the unclipped mean gradient of the last update

    def gradients(self, micro_batches):
        """(mean gradient, mean weighted loss, real targets) of the micro-batches together."""
        grads, loss_total, weight, tokens = accumulate_gradients(self.step_fn, self.model, micro_batches)
        self.last_grads = grads
        return grads, (loss_total / weight).item(), tokens

    def clip(self, grads):
        """(clipped gradient, norm before clipping)."""
        grads, norm = optim.clip_grad_norm(grads, self.cfg.max_grad_norm)
        return grads, norm.item()

    def apply(self, grads, lr: float) -> None:
        self.optimizer.learning_rate = lr
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)

    def __call__(self, micro_batches, lr: float) -> StepStats:
        grads, loss, tokens = self.gradients(micro_batches)
        grads, norm = self.clip(grads)
        self.apply(grads, lr)
        return StepStats(loss, norm, lr, tokens)
