"""Context parallelism: the ranks of a world share every sequence's positions.

The sequence (padded to a multiple of 2N positions) is cut into 2N equal chunks and rank r holds chunks
r and 2N-1-r (the zig-zag split): causal attention makes later chunks costlier, and pairing an early
chunk with a late one evens the work. Everything position-wise (embedding, norms, MLP, LoRA, the loss
chunks) runs on the rank's own positions. Attention gathers every rank's K and V (one all-gather per
layer), and each of the rank's chunks attends over the keys before it with the blockwise kernel and
its log-sum-exp (`efficient_attention(..., offset=)`); in the backward, the gradients of the gathered
K/V are summed over the ranks and each rank keeps its own positions' share.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_ltc.distributed import World
from mlx_ltc.models import patch
from mlx_ltc.numerics.attention import efficient_attention

__all__ = ["Layout", "attend", "gather_positions"]

ZIGZAG = True  # False: contiguous slices (scripts/bench_distributed.py balance measures both)


@dataclass(frozen=True)
class Layout:
    world: World
    length: int  # the sequence's real positions
    zigzag: bool = True

    @property
    def padded(self) -> int:
        unit = 2 * self.world.size
        return -(-self.length // unit) * unit

    def chunks_of(self, rank: int) -> list:
        """[start, end) position ranges rank `rank` holds, in order."""
        n = self.world.size
        if not self.zigzag:
            size = self.padded // n
            return [(rank * size, (rank + 1) * size)]
        size = self.padded // (2 * n)
        return [(c * size, (c + 1) * size) for c in (rank, 2 * n - 1 - rank)]

    @property
    def chunks(self) -> list:
        return self.chunks_of(self.world.rank)

    @property
    def local_len(self) -> int:
        return self.padded // self.world.size

    def local(self, x: mx.array, fill=0) -> mx.array:
        """The rank's positions of x (B, length, ...): axis 1, padded with `fill` at the end."""
        if x.shape[1] < self.padded:
            pad = [(0, 0), (0, self.padded - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
            x = mx.pad(x, pad, constant_values=fill)
        return mx.concatenate([x[:, s:e] for s, e in self.chunks], axis=1)

    def order(self) -> np.ndarray | None:
        """Indices that put positions gathered in rank order back in sequence order (None: already are)."""
        ranked = [p for r in range(self.world.size) for s, e in self.chunks_of(r) for p in range(s, e)]
        if ranked == list(range(self.padded)):
            return None
        return np.argsort(np.array(ranked))

    def work(self, rank: int) -> int:
        """Causal attention's query-key pairs of a rank: what its attention costs."""
        return sum((e * (e + 1) - s * (s + 1)) // 2 for s, e in self.chunks_of(rank))


def gather_positions(x: mx.array, layout: Layout) -> mx.array:
    """(B, H, local, C) -> (B, H, padded, C) in sequence order, on every rank; the backward sums the
    cotangents of all ranks and returns this rank's share (MLX's own all_gather VJP keeps only the local
    cotangent, which drops the other ranks' attention to our keys)."""
    world, local = layout.world, layout.local_len

    @mx.custom_function
    def gather(x):
        return mx.distributed.all_gather(x.transpose(2, 0, 1, 3), group=world.group).transpose(1, 2, 0, 3)

    @gather.vjp
    def gather_vjp(primals, cotangent, output):
        full = world.all_sum(cotangent)
        return full[:, :, world.rank * local : (world.rank + 1) * local]

    y = gather(x)
    order = layout.order()
    return y if order is None else y[:, :, mx.array(order)]


def project(attn, x, layout: Layout):
    """q, k, v (B, H, local, D) of the rank's positions, each chunk rotated at its own positions."""
    B, L, _ = x.shape
    q = attn.q_proj(x).reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3)
    k = attn.k_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = attn.v_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    qs, ks, at = [], [], 0
    for s, e in layout.chunks:
        qs.append(attn.rope(q[:, :, at : at + e - s], offset=s))
        ks.append(attn.rope(k[:, :, at : at + e - s], offset=s))
        at += e - s
    return mx.concatenate(qs, axis=2), mx.concatenate(ks, axis=2), v


def attend(attn, x, layout: Layout, block_bytes: int, saved=None):
    """Attention output of the rank's positions (before the residual) and the per-chunk (output, lse)
    to reuse in a recomputation, as `engine._attend`."""
    B, L, _ = x.shape
    q, k, v = project(attn, x, layout)
    D = k.shape[-1]
    kv = gather_positions(mx.concatenate([k, v], axis=-1), layout)  # one collective for both
    k_all, v_all = kv[..., :D], kv[..., D:]
    window = patch.attribute(attn, "window")  # models.faithful's sliding window
    outs, kept, at = [], [], 0
    for i, (s, e) in enumerate(layout.chunks):
        mine = None if saved is None else saved[2 * i : 2 * i + 2]
        o, lse = efficient_attention(
            q[:, :, at : at + e - s],
            k_all[:, :, :e],
            v_all[:, :, :e],
            attn.scale,
            block_bytes,
            saved=mine,
            window=window,
            offset=s,
        )
        outs.append(o)
        kept += [o, lse]
        at += e - s
    o = mx.concatenate(outs, axis=2)
    return attn.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1)), tuple(kept)
