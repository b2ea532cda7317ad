"""Batch order, shared by every backend so the torch reference sees the very same batches."""

import mlx.core as mx
import numpy as np

from mlx_ltc.data import Split


def batch_indices(n: int, batch_size: int, rng=None):
    """Row indices of each batch; shuffled when rng is given."""
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
