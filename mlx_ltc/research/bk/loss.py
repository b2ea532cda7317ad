"""Next-token NLL through the BK model's tied head without (N x V) logits.

`mlx_ltc.numerics.loss.chunked_nll` treats the head as frozen (LoRA); here the head is the trainable
embedding, so the custom backward also accumulates its gradient, chunk by chunk.
"""

import mlx.core as mx

from mlx_ltc.numerics.loss import token_nll
from mlx_ltc.numerics.reductions import logsumexp

__all__ = ["HEAD_ROWS", "nll_per_token", "tied_nll_sum"]

HEAD_ROWS = 512  # positions per head call: a few fp32 (rows x vocab) arrays alive at a time


def _spans(n: int, rows: int):
    return [(s, min(s + rows, n)) for s in range(0, n, rows)]


def tied_nll_sum(hidden: mx.array, weight: mx.array, targets: mx.array, rows: int = HEAD_ROWS) -> mx.array:
    """Summed NLL of targets (B, N) under logits hidden (B, N, d) @ weight (V, d).T; differentiable in
    both hidden and weight. mx.depends chains the chunks so MLX runs them one after another."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    spans = _spans(h.shape[0], rows)

    @mx.custom_function
    def nll(h, w):
        total, lse = mx.array(0.0), []
        for s, e in spans:
            logits = (mx.depends(h[s:e], total) @ w.T).astype(mx.float32)
            lse.append(logsumexp(logits))
            picked = mx.take_along_axis(logits, t[s:e, None], axis=-1)[:, 0]
            total = total + (lse[-1] - picked).sum()
        return total, mx.concatenate(lse)

    @nll.vjp
    def nll_vjp(primals, cotangents, outputs):
        (h, w), cotangent, lse = primals, cotangents[0], outputs[1]  # the row logsumexps save an exp pass
        d_hidden, d_weight = [], mx.zeros(w.shape, dtype=mx.float32)
        for s, e in spans:
            hs = mx.depends(h[s:e], [d_weight, *d_hidden[-1:]])
            probs = mx.exp((hs @ w.T).astype(mx.float32) - lse[s:e, None])
            d_logits = (probs - (mx.arange(probs.shape[-1]) == t[s:e, None])) * cotangent
            d_hidden.append((d_logits @ w).astype(h.dtype))
            d_weight = d_weight + d_logits.T @ hs
        return mx.concatenate(d_hidden), d_weight.astype(w.dtype)

    return nll(h, weight)[0]


def nll_per_token(hidden: mx.array, weight: mx.array, targets: mx.array, rows: int = HEAD_ROWS) -> mx.array:
    """NLL of each target, (N,) float32, for one sequence hidden (N, d): evaluated a chunk at a time."""
    parts = []
    for s, e in _spans(hidden.shape[0], rows):
        parts.append(token_nll((hidden[s:e] @ weight.T).astype(mx.float32), targets[s:e]))
        mx.eval(parts[-1])
    return mx.concatenate(parts)
