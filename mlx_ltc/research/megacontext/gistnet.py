"""GistNet: one vector in the base model's embedding space for a block of 32 inputs (token embeddings, or
32 child gists).

A small bidirectional transformer (no mask) over the block, with learned slot and level embeddings. The
output is a learned selection of the block's inputs (a softmax over them) plus a learned correction from
attention pooling. The selection starts on the last input and the correction at zero, so an untrained
GistNet is the "last input" floor and training starts from it.

Why not start from the mean: the frozen base reads a mean of 32 token embeddings as garbage. One such vector
in front of 32 raw tokens raised their NLL from 3.7 to 5.7 nats on SmolLM2-135M (rescaled to a token's norm:
5.6), while the block's last token embedding lowered it to 3.64 and carried content (0.03-0.05 nats better
than another block's; `scripts/probe_gist_floor.py`). A convex combination concentrated on one input
stays near the token embeddings the base was trained on; the correction and the content-dependent
selection move it from there.

The output's norm is capped at `max_norm` x its inputs' mean norm. Uncapped, training found a shortcut: a
gist 30x longer than any token embedding dominates the residual stream at its slot, so the base reads it as
one fixed "sink" token whatever the block held (trained = shuffled = another file's gists).
"""

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

__all__ = ["GistConfig", "GistNet", "compressor"]


@dataclass
class GistConfig:
    width: int  # the base model's embedding width
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    block: int = 32
    levels: int = 2  # L1 (over token embeddings) and L2 (over L1 gists)
    max_norm: float = 1.5  # cap on a gist's norm, in units of its inputs' mean norm (0: no cap)
    pick: float = 8.0  # the untrained selection's logit on the last input (0.99 of the weight at 32 inputs)


class GistNet(nn.Module):
    def __init__(self, config: GistConfig):
        super().__init__()
        self.config = config
        self.inputs = nn.Linear(config.width, config.hidden)
        self.slot = nn.Embedding(config.block, config.hidden)
        self.level = nn.Embedding(config.levels, config.hidden)
        self.encoder = nn.TransformerEncoder(config.layers, config.hidden, config.heads, 4 * config.hidden)
        self.query = mx.zeros((config.hidden,))
        self.chooser = mx.zeros((config.hidden,))  # content-dependent selection scores
        self.preference = mx.zeros((config.block,)).at[-1].add(config.pick)  # slot-dependent ones
        self.correction = nn.Linear(config.hidden, config.width)
        self.correction.weight = mx.zeros_like(self.correction.weight)
        self.correction.bias = mx.zeros_like(self.correction.bias)

    def __call__(self, x: mx.array, level: int) -> mx.array:
        """x (N, block, width) -> gists (N, width); level 1 or 2."""
        h = self.inputs(x) + self.slot.weight[: x.shape[1]] + self.level.weight[level - 1]
        h = self.encoder(h, None)
        weights = mx.softmax((h @ self.query) / math.sqrt(h.shape[-1]), axis=-1)
        pooled = (weights[..., None] * h).sum(axis=1)
        select = mx.softmax(h @ self.chooser + self.preference[: x.shape[1]], axis=-1)
        out = (select[..., None] * x).sum(axis=1) + self.correction(pooled)
        if not self.config.max_norm:
            return out
        cap = self.config.max_norm * mx.linalg.norm(x, axis=-1).mean(axis=-1, keepdims=True)
        norm = mx.linalg.norm(out, axis=-1, keepdims=True)
        return out * mx.minimum(1.0, cap / mx.maximum(norm, 1e-6))


def compressor(net: GistNet, embed_tokens, trained_levels=(1, 2)):
    """The tree's gist(level, inputs): level 1 embeds the block's token ids with the base's table. A level
    GistNet was not trained for takes its last input (the untrained floor) instead of the network's guess."""

    def gist(level, inputs):
        x = embed_tokens(mx.array(np.asarray(inputs, np.int32))) if level == 1 else mx.array(inputs)
        x = x.astype(mx.float32)
        return np.array(net(x[None], level)[0] if level in trained_levels else x[-1])

    return gist
