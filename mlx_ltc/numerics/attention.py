"""Causal attention whose memory is linear in the sequence length, forward and backward.

The forward walks the queries in blocks and keeps only the output and the log-sum-exp per row; the
backward (FlashAttention-2 style) recomputes each block's probabilities from them. No L x L array
ever exists: a block holds (rows x keys-so-far) scores, and the block height is chosen so that
working set stays under `block_bytes`. Plain MLX ops, so it runs on CPU, CUDA and Metal.

Layout is mlx-lm's: q (B, Hq, L, D), k/v (B, Hkv, L, D), query head h reads KV head h // (Hq/Hkv).
RoPE is applied by the caller, as in mlx-lm's attention modules. With a sliding window W (a query
sees itself and the W - 1 keys before it, StarCoder2's rule) a block reads only the keys its window
reaches, so time and memory are O(L * W).
"""

import mlx.core as mx

from mlx_ltc.numerics.reductions import logsumexp

__all__ = ["attention_backward", "attention_forward", "efficient_attention", "naive_attention", "query_block"]


def query_block(batch: int, q_heads: int, length: int, block_bytes: int) -> int:
    """Rows per block: four fp32 (rows x length) score-sized arrays per head fit in block_bytes."""
    rows = block_bytes // max(1, 16 * batch * q_heads * length)
    rows = max(16, min(1024, rows // 16 * 16))
    return min(rows, length)


def _blocks(length: int, rows: int):
    for start in range(0, length, rows):
        yield start, min(start + rows, length)


def first_key(start: int, window: int | None) -> int:
    """The first key any query row >= start can see."""
    return 0 if window is None else max(0, start - window + 1)


def _scores(qb, k, scale, start, end, segments, window=None):
    """fp32 masked scores of the queries at positions [start, end) against keys [lo, end): (B, Hkv, G, n, end - lo)."""
    B, Hkv, G, n, D = qb.shape
    lo = first_key(start, window)
    s = (qb.reshape(B, Hkv, G * n, D) * scale) @ k[:, :, lo:end].swapaxes(-1, -2)
    s = s.reshape(B, Hkv, G, n, end - lo).astype(mx.float32)
    rows, keys = mx.arange(start, end)[:, None], mx.arange(lo, end)[None, :]
    allowed = rows >= keys
    if window is not None:
        allowed = allowed & (keys > rows - window)
    if segments is not None:
        same = segments[:, start:end, None] == segments[:, None, lo:end]  # (B, n, end - lo)
        allowed = allowed & same[:, None, None]
    return mx.where(allowed, s, -mx.inf)


def attention_forward(q, k, v, scale: float, rows: int, segments=None, window=None, offset: int = 0):
    """Returns (output (B, Hq, L, D), log-sum-exp (B, Hq, L) fp32). `offset`: the position of q's first
    row; k and v then hold the keys of positions [0, offset + L) (context parallelism's later slices)."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, L, D)
    outs, lses = [], []
    for row, row_end in _blocks(L, rows):
        qb = qg[:, :, :, row:row_end]
        if outs:  # MLX's scheduler would otherwise run blocks side by side, keeping all their scores
            qb = mx.depends(qb, outs[-1])
        start, end = row + offset, row_end + offset
        lo = first_key(start, window)
        s = _scores(qb, k, scale, start, end, segments, window)
        lse = logsumexp(s)
        p = mx.exp(s - lse[..., None]).astype(v.dtype)
        G, n = p.shape[2], p.shape[3]
        o = p.reshape(B, Hkv, G * n, end - lo) @ v[:, :, lo:end]
        outs.append(o.reshape(B, Hkv, G, n, D))
        lses.append(lse)
    out = mx.concatenate(outs, axis=3).reshape(B, Hq, L, D)
    return out, mx.concatenate(lses, axis=3).reshape(B, Hq, L)


def attention_backward(q, k, v, out, lse, d_out, scale: float, rows: int, segments=None, window=None, offset=0):
    """Gradients (dq, dk, dv) of sum(out * d_out), recomputing probabilities block by block; `offset` as in
    `attention_forward` (dk, dv then cover all offset + L keys).

    All three gradients live in one packed accumulator that each block adds into, and each block
    depends on the previous sum, so the lazy graph is one chain: a block's probabilities die before
    the next block's are made.
    """
    B, Hq, Lq, D = q.shape
    Hkv, L = k.shape[1], offset + Lq  # the accumulator spans the keys; dq sits in its last Lq rows
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G, Lq, D)
    dog = d_out.reshape(B, Hkv, G, Lq, D)
    lseg = lse.reshape(B, Hkv, G, Lq)
    delta = (dog.astype(mx.float32) * out.reshape(B, Hkv, G, Lq, D).astype(mx.float32)).sum(-1)
    k, v = k[:, :, :L], v[:, :, :L]
    kf, vf = k.astype(mx.float32), v.astype(mx.float32)
    acc = mx.zeros((B, Hkv, L, (G + 2) * D), dtype=mx.float32)  # [dq of each group | dk | dv]
    for row, row_end in _blocks(Lq, rows):
        start, end = row + offset, row_end + offset
        n, lo = end - start, first_key(start, window)
        qb, dob = mx.depends([qg[:, :, :, row:row_end], dog[:, :, :, row:row_end]], acc)  # one block at a time
        p = mx.exp(_scores(qb, k, scale, start, end, segments, window) - lseg[:, :, :, row:row_end, None])
        p2 = p.reshape(B, Hkv, G * n, end - lo)
        do2 = dob.reshape(B, Hkv, G * n, D).astype(mx.float32)
        dv = p2.swapaxes(-1, -2) @ do2
        dp = do2 @ vf[:, :, lo:end].swapaxes(-1, -2)
        ds = (p * (dp.reshape(p.shape) - delta[:, :, :, row:row_end, None])).reshape(B, Hkv, G * n, end - lo)
        dq = (ds @ kf[:, :, lo:end]) * scale
        dk = (ds.swapaxes(-1, -2) @ qb.reshape(B, Hkv, G * n, D).astype(mx.float32)) * scale
        dq = dq.reshape(B, Hkv, G, n, D).transpose(0, 1, 3, 2, 4).reshape(B, Hkv, n, G * D)
        pad = [(0, 0), (0, 0), (lo, L - end), (0, 0)]
        block = mx.concatenate(
            [mx.pad(dq, [(0, 0), (0, 0), (start, L - end), (0, 0)]), mx.pad(dk, pad), mx.pad(dv, pad)], axis=-1
        )
        acc = acc + block
    dq = acc[:, :, offset:, : G * D].reshape(B, Hkv, Lq, G, D).transpose(0, 1, 3, 2, 4).reshape(B, Hq, Lq, D)
    dk, dv = acc[..., G * D : (G + 1) * D], acc[..., (G + 1) * D :]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def efficient_attention(
    q, k, v, scale: float, block_bytes: int = 64 << 20, segments=None, saved=None, window: int | None = None,
    offset: int = 0,
):  # fmt: skip
    """Causal softmax attention (optionally within segments: packed documents never see each other;
    optionally within a sliding window) with a memory-efficient custom backward. Returns (output,
    log-sum-exp); gradients flow to q, k, v.

    `saved`: (output, lse) already computed for these very q, k, v; a recomputation for the
    backward pass then skips the forward. `offset`: q's rows are positions [offset, offset + Lq) and k, v
    hold positions [0, offset + Lq) (a context-parallel rank's queries over the keys gathered before them).
    """
    keys = k.shape[2] if window is None else min(k.shape[2], window + 1024)  # a block reads <= window + rows keys
    rows = query_block(q.shape[0], q.shape[1], keys, block_bytes)

    @mx.custom_function
    def attend(q, k, v):
        if saved is not None:
            return tuple(saved)
        return attention_forward(q, k, v, scale, rows, segments, window, offset)

    @attend.vjp
    def attend_vjp(primals, cotangents, outputs):
        q, k, v = primals
        dq, dk, dv = attention_backward(q, k, v, *outputs, cotangents[0], scale, rows, segments, window, offset)
        if dk.shape[2] < k.shape[2]:  # keys after the last query get no gradient
            pad = [(0, 0), (0, 0), (0, k.shape[2] - dk.shape[2]), (0, 0)]
            dk, dv = mx.pad(dk, pad), mx.pad(dv, pad)
        return dq, dk, dv

    return attend(q, k, v)


def naive_attention(q, k, v, scale: float, segments=None, window=None):
    """The textbook oracle: full L x L scores, for tests and small inputs only."""
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    k, v = mx.repeat(k, G, axis=1), mx.repeat(v, G, axis=1)
    s = ((q * scale) @ k.swapaxes(-1, -2)).astype(mx.float32)
    allowed = mx.tril(mx.ones((L, L), dtype=mx.bool_))
    if window is not None:
        allowed = allowed & ~mx.tril(mx.ones((L, L), dtype=mx.bool_), k=-window)
    if segments is not None:
        allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
    p = mx.softmax(mx.where(allowed, s, -mx.inf), axis=-1).astype(v.dtype)
    return p @ v
