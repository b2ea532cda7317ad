"""A frozen mlx-lm model fed a working context (raw token embeddings and gists) at explicit positions.

mlx-lm's attention applies RoPE with one scalar offset. `positioned_rope` patches a layer's `nn.RoPE`
(`models.patch`) so that, inside `at_positions`, it rotates each token by its own position: the sequence
is laid out as a batch of one-token rows, so `mx.fast.rope` takes a vector of offsets. Positions have
half-token resolution (a 32-token block's centre is s + 15.5): offsets count half tokens and the scale is
halved, both exact in float.
"""

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from mlx_ltc.models import patch

__all__ = ["at_positions", "forward_at", "positioned", "positioned_rope"]


def _rotate(self, base_call, x: mx.array, offset: int = 0) -> mx.array:
    if self.positions is None:
        return base_call(self, x, offset=offset)
    batch, heads, length, dims = x.shape
    half_tokens = mx.round(2 * (mx.broadcast_to(self.positions, (batch, length)) + offset)).astype(mx.int32)
    rows = x.transpose(0, 2, 1, 3).reshape(batch * length, heads, 1, dims)
    rows = mx.fast.rope(rows, self.dims, traditional=self.traditional, base=self.base, scale=self.scale / 2,
                        offset=half_tokens.reshape(-1))  # fmt: skip
    return rows.reshape(batch, length, heads, dims).transpose(0, 2, 1, 3)


def positioned_rope(rope: nn.RoPE) -> nn.RoPE:
    """The RoPE module, patched (once) to rotate by its `positions` when they are set."""
    if not (type(rope) is nn.RoPE or "positioned" in patch.installed(rope)):
        raise ValueError(f"explicit positions need a plain nn.RoPE, not {type(rope).__name__}")
    patch.install(rope, "positioned", _rotate, positions=None)  # (B, L) or (L,) float positions
    return rope


def positioned(model) -> list:
    """Every attention layer's RoPE, patched once, in layer order."""
    return [positioned_rope(layer.self_attn.rope) for layer in model.layers]


@contextmanager
def at_positions(model, positions: mx.array):
    ropes = positioned(model)
    for rope in ropes:
        rope.positions = positions
    try:
        yield
    finally:
        for rope in ropes:
            rope.positions = None


def forward_at(model, embeddings: mx.array, positions: mx.array) -> mx.array:
    """Logits of input embeddings (B, L, d) at positions (B, L) or (L,), causal in entry order."""
    with at_positions(model, positions):
        return model(None, input_embeddings=embeddings)
