"""Next-token loss over real tokens only: padding never contributes."""

import mlx.core as mx
import mlx.nn as nn


def nll_sum(model, tokens: mx.array, lengths: mx.array):
    """Summed next-token NLL over real tokens, and how many there were.

    tokens: (B, T) int32, row b real for its first lengths[b] entries; predicts tokens[:, 1:].
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs).astype(mx.float32)
    mask = mx.arange(targets.shape[1])[None, :] < (lengths[:, None] - 1)
    nll = nn.losses.cross_entropy(logits, targets) * mask
    return nll.sum(), mask.sum()
