"""Training GistNet on substitutability against the frozen base (`objective.substitution_loss`)."""

import math
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_ltc.research.megacontext.gistnet import GistNet
from mlx_ltc.research.megacontext.objective import substitution_loss, teacher_logprobs

__all__ = ["sample_windows", "train_gistnet"]


def sample_windows(files: list, length: int, batch: int, rng) -> mx.array:
    """(batch, length) windows at random places of random files long enough to hold one."""
    long_enough = [f for f in files if len(f) >= length]
    if not long_enough:
        raise ValueError(f"no training file holds {length} tokens")
    picks = rng.integers(0, len(long_enough), batch)
    rows = []
    for i in picks:
        start = rng.integers(0, len(long_enough[i]) - length + 1)
        rows.append(long_enough[i][start : start + length])
    return mx.array(np.stack(rows).astype(np.int32))


def train_gistnet(
    net: GistNet, model, files: list, steps: int, blocks: int = 8, keep: int = 2, horizon: int = 64,
    batch: int = 2, lr: float = 1e-3, max_grad_norm: float = 1.0, seed: int = 0, contrast: float = 0.0,
    level: int = 1, log=None,
) -> list:  # fmt: skip
    """AdamW with warmup + cosine on windows of `blocks` blocks + `horizon` tokens; returns one record per step
    (loss, KL, extra NLL, contrast gap, grad norm, seconds)."""
    rng = np.random.default_rng(seed)
    warmup = max(1, steps // 10)
    schedule = lambda i: lr * min((i + 1) / warmup, 0.5 * (1 + math.cos(math.pi * i / max(steps, 1))))  # noqa: E731
    opt = optim.AdamW(learning_rate=lr, weight_decay=0.0)

    def loss_fn(net, tokens, teacher):
        return substitution_loss(net, model, tokens, teacher, keep, contrast=contrast, level=level)

    step = nn.value_and_grad(net, loss_fn)
    length = blocks * net.config.block + horizon
    records = []
    for i in range(steps):
        began = time.perf_counter()
        tokens = sample_windows(files, length, batch, rng)
        (loss, kl, extra, gap), grads = step(net, tokens, teacher_logprobs(model, tokens, horizon))
        grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
        opt.learning_rate = schedule(i)
        opt.update(net, grads)
        mx.eval(net.parameters(), opt.state, loss, kl, extra, gap)
        seconds = time.perf_counter() - began
        records.append({"step": i + 1, "loss": loss.item(), "kl": kl.item(), "extra_nll": extra.item(),
                        "contrast_gap": gap.item(), "grad_norm": norm.item(), "lr": schedule(i),
                        "seconds": seconds})  # fmt: skip
        if log:
            log(records[-1])
    return records
