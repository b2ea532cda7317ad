"""The base-LoRA gist encoder: the base model itself, with a LoRA of its own, writes the gists (as in the
In-Context Autoencoder, Ge et al. 2024).

A block's 32 inputs (token embeddings for L1, L1 gists for L2) go through a second instance of the base,
followed by `slots` learned memory embeddings per level; the base is causal, so each memory slot reads the
whole block. The slots' final hidden states, mapped by a learned projection (starting at the identity) and
rescaled to the inputs' mean norm, are the gists: vectors in the embedding space the base reads. The LoRA
lives only on the encoder's instance, so the decoder that reads the gists is untouched by it.

Why the base and not GistNet: a 2-layer, 256-wide GistNet wrote vectors the frozen base could not read
(trained gists = shuffled gists, README). The base already maps token sequences to states its own layers
understand; a tied-embedding model's final states point at next-token embeddings, so even the untrained
encoder's gists are token-like.

`marker` is the "repeat" embedding of the autoencoding objective: given [gists, marker, block[:-1]], the
decoder predicts the block.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

__all__ = ["EncoderConfig", "LoraEncoder", "encoder_compressor"]


@dataclass(frozen=True)
class EncoderConfig:
    slots: int = 1  # memory embeddings (gists) per block
    levels: int = 2  # L1 and L2 have their own memory embeddings
    seed: int = 0


class LoraEncoder(nn.Module):
    def __init__(self, base, config: EncoderConfig):
        """base: an mlx-lm model instance of its own (frozen, LoRA layers already added)."""
        super().__init__()
        self.config = config
        self.base = base
        table = np.array(base.model.embed_tokens.weight.astype(mx.float32))
        width = table.shape[1]
        rng = np.random.default_rng(config.seed)
        ids = rng.integers(0, len(table), (config.levels, config.slots + 1))
        self.memory = mx.array(table[ids[:, :-1]])  # (levels, slots, width): real token embeddings, readable
        self.marker = mx.array(table[ids[0, -1]])
        self.project = nn.Linear(width, width)
        self.project.weight = mx.eye(width)
        self.project.bias = mx.zeros((width,))

    def __call__(self, x: mx.array, level: int) -> mx.array:
        """x (N, block, width) -> gists (N, slots, width); level 1 or 2."""
        n, _, width = x.shape
        x = x.astype(mx.float32)
        memory = mx.broadcast_to(self.memory[level - 1][None], (n, self.config.slots, width))
        dtype = self.base.model.embed_tokens.weight.dtype
        h = self.base.model(None, input_embeddings=mx.concatenate([x, memory], axis=1).astype(dtype))
        out = self.project(h[:, -self.config.slots :].astype(mx.float32))
        target = mx.linalg.norm(x, axis=-1).mean(axis=-1)[:, None, None]
        return out * (target / mx.maximum(mx.linalg.norm(out, axis=-1, keepdims=True), 1e-6))


def encoder_compressor(encoder: LoraEncoder, embed_tokens, trained_levels=(1, 2)):
    """The tree's gist(level, inputs) (one slot: a vector of the embedding width), with `many(level, list of
    inputs)` gisting a batch of blocks in one pass. A level the encoder was not trained for takes its last
    input (an untrained L2 gist is its last L1 gist), like GistNet's `compressor`."""
    if encoder.config.slots != 1:
        raise ValueError(f"working contexts take one gist per block, not {encoder.config.slots}")

    def many(level, inputs: list) -> list:
        x = np.stack([np.asarray(i) for i in inputs])
        x = embed_tokens(mx.array(x.astype(np.int32))) if level == 1 else mx.array(x.astype(np.float32))
        x = x.astype(mx.float32)
        if level not in trained_levels:
            return list(np.array(x[:, -1]))
        out = []
        for start in range(0, len(x), 64):  # bounded activations on long histories
            out.append(np.array(encoder(x[start : start + 64], level)[:, 0]))
        return list(np.concatenate(out))

    def gist(level, inputs):
        return many(level, [inputs])[0]

    gist.many = many
    return gist
