"""One optimizer update. Gradient accumulation is token-weighted: the update is exactly the
mean-over-tokens gradient of all micro-batches together, on one process or summed over the ranks of
an `mlx.launch` world (data parallel: each rank a share of the sequences; context parallel: each rank
a share of every sequence's positions)."""

import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from mlx_ltc.config import MemoryConfig, TrainConfig
from mlx_ltc.distributed import World
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


def sum_gradients(loss_and_grad, model, micro_batches):
    """Summed gradient of the micro-batches' summed weighted loss (None for no micro-batches).
    Returns (grads, summed weighted loss, summed weight, real tokens)."""
    grads, loss_sum, weight, tokens = None, mx.array(0.0), mx.array(0.0), 0
    for batch_tokens, weights, n_real in micro_batches:
        (s, n), g = loss_and_grad(model, batch_tokens, weights)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        loss_sum, weight, tokens = loss_sum + s, weight + n, tokens + int(np.sum(n_real))
        mx.eval(grads, loss_sum, weight)  # one micro-batch's graph alive at a time
    return grads, loss_sum, weight, tokens


def accumulate_gradients(loss_and_grad, model, micro_batches):
    """Weighted-mean gradient of several micro-batches, as if they were one batch.
    Returns (grads, summed weighted loss, summed weight, real tokens)."""
    grads, loss_sum, weight, tokens = sum_gradients(loss_and_grad, model, micro_batches)
    return tree_map(lambda g: g / weight, grads), loss_sum, weight, tokens


def share(micro_batches, world: World) -> list:
    """This rank's part of an update (data parallel): the update's sequences, in order, split evenly over
    the ranks, and cut again into micro-batches no larger than the update's. Each micro-batch is
    (tokens, weights, real targets per sequence)."""
    if not world.distributed or not micro_batches:
        return micro_batches
    size = micro_batches[0][0].shape[0]
    tokens = mx.concatenate([m[0] for m in micro_batches])
    weights = mx.concatenate([m[1] for m in micro_batches])
    real = np.concatenate([np.atleast_1d(m[2]) for m in micro_batches])
    n = tokens.shape[0]
    lo, hi = n * world.rank // world.size, n * (world.rank + 1) // world.size
    return [(tokens[s : min(s + size, hi)], weights[s : min(s + size, hi)], real[s : min(s + size, hi)])
            for s in range(lo, hi, size)]  # fmt: skip


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

    def __init__(self, model, cfg: TrainConfig, memory: MemoryConfig | None = None, world: World | None = None):
        self.model, self.cfg, self.world = model, cfg, world or World()
        memory = memory or MemoryConfig()
        self.context_parallel = memory.context_parallel and self.world.distributed
        self.optimizer = optim.AdamW(learning_rate=cfg.lr, weight_decay=cfg.weight_decay, bias_correction=True)
        self.step_fn = engine.loss_and_grad(model, memory, world=self.world)
        self.last_grads = None  # the unclipped mean gradient of the last update
        self.wait_s = 0.0  # seconds the last update waited for the slowest rank
        self.all_reduce_s = 0.0  # seconds the last update then spent summing over the ranks

    def gradients(self, micro_batches):
        """(mean gradient, mean weighted loss, real targets) of the micro-batches together (all ranks')."""
        world = self.world
        mine = micro_batches if self.context_parallel else share(micro_batches, world)
        grads, loss_total, weight, tokens = sum_gradients(self.step_fn, self.model, mine)
        if world.distributed:
            if grads is None:  # more ranks than sequences in this update
                grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
            started = time.perf_counter()
            world.barrier()  # apart from the sum's own time: how uneven the ranks' shares were
            self.wait_s, started = time.perf_counter() - started, time.perf_counter()
            grads, loss_total, weight = world.sum_tree((grads, loss_total, weight))
            if not self.context_parallel:  # context parallel: every rank counted every sequence
                tokens = world.all_sum(mx.array(tokens))
            mx.eval(grads, loss_total, weight, tokens)
            tokens = int(tokens.item()) if isinstance(tokens, mx.array) else tokens
            self.all_reduce_s = time.perf_counter() - started
        grads = tree_map(lambda g: g / weight, grads)
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
