"""One optimizer update. Gradient accumulation is token-weighted: the update is exactly the
mean-over-tokens gradient of all micro-batches together."""

from dataclasses import dataclass

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map

from mlx_ltc.config import MemoryConfig, TrainConfig
from mlx_ltc.models import patch
from mlx_ltc.train import engine


def enable_grad_checkpoint(model):
    """Recompute each transformer block in the backward pass (a per-instance patch, `models.patch`: module
    paths, and so adapter names, and other models are unchanged)."""

    def call(self, base_call, *args, **kwargs):
        def inner(params, *args, **kwargs):
            self.update(params)
            return base_call(self, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    for layer in model.layers:
        patch.install(layer, "checkpointed", call)


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
