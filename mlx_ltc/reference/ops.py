"""Oracles for the memory engine: naive softmax attention and torch's cross-entropy."""

import torch
import torch.nn.functional as F


def attention(q, k, v, scale: float, segments=None, window: int | None = None):
    """Causal softmax attention with full L x L scores. q (B, Hq, L, D), k/v (B, Hkv, L, D); query
    head h reads KV head h // (Hq / Hkv). segments (B, L): positions attend within their segment only;
    window W: a query sees itself and the W - 1 keys before it (transformers' sliding window)."""
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    allowed = (j <= i)[None, None]
    if window is not None:
        allowed = allowed & (j > i - window)[None, None]
    if segments is not None:
        segments = torch.as_tensor(segments)
        allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
    scores = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def nll_sum(logits, targets, weights):
    """sum of weights * cross-entropy(logits, targets): (B, T, V), (B, T), (B, T)."""
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten().long(), reduction="none")
    return (ce * weights.flatten().to(ce.dtype)).sum()


def next_token_nll(model, tokens, weights):
    """(summed weighted NLL, summed weight) of a transformers causal LM on tokens (B, T) with target
    weights (B, T - 1): the quantity mlx-ltc trains on."""
    logits = model(input_ids=tokens[:, :-1]).logits
    return nll_sum(logits, tokens[:, 1:], weights), weights.sum()
