"""A frozen mlx-lm model fed a working context (raw token embeddings and gists) at explicit positions.

mlx-lm's attention applies RoPE with one scalar offset. `PositionedRoPE` wraps a layer's `nn.RoPE` and,
when positions are set, rotates each token by its own: the sequence is laid out as a batch of one-token
rows, so `mx.fast.rope` takes a vector of offsets. Positions have half-token resolution (a 32-token
block's centre is s + 15.5): offsets count half tokens and the scale is halved, both exact in float.
"""

import mlx.core as mx
import mlx.nn as nn

__all__ = ["PositionedRoPE", "forward_at", "positioned"]


class PositionedRoPE(nn.Module):
    def __init__(self, rope: nn.RoPE):
        super().__init__()
        if type(rope) is not nn.RoPE:
            raise ValueError(f"explicit positions need a plain nn.RoPE, not {type(rope).__name__}")
        self.rope = rope
        self.positions = None  # (B, L) or (L,) float positions; None: the wrapped RoPE, unchanged

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if self.positions is None:
            return self.rope(x, offset=offset)
        batch, heads, length, dims = x.shape
        half_tokens = mx.round(2 * (mx.broadcast_to(self.positions, (batch, length)) + offset)).astype(mx.int32)
        rows = x.transpose(0, 2, 1, 3).reshape(batch * length, heads, 1, dims)
        rows = mx.fast.rope(rows, self.rope.dims, traditional=self.rope.traditional, base=self.rope.base,
                            scale=self.rope.scale / 2, offset=half_tokens.reshape(-1))  # fmt: skip
        return rows.reshape(batch, length, heads, dims).transpose(0, 2, 1, 3)


def positioned(model) -> list:
    """Wrap every attention layer's RoPE (once) and return the wrappers, in layer order."""
    wrappers = []
    for layer in model.layers:
        if not isinstance(layer.self_attn.rope, PositionedRoPE):
            layer.self_attn.rope = PositionedRoPE(layer.self_attn.rope)
        wrappers.append(layer.self_attn.rope)
    return wrappers


def forward_at(model, embeddings: mx.array, positions: mx.array) -> mx.array:
    """Logits of input embeddings (B, L, d) at positions (B, L) or (L,), causal in entry order."""
    wrappers = positioned(model)
    for w in wrappers:
        w.positions = positions
    try:
        return model(None, input_embeddings=embeddings)
    finally:
        for w in wrappers:
            w.positions = None
