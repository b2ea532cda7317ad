"""Does the model use its context? Perplexity at several evaluation lengths over the same tokens, and
mean NLL by position (log-spaced buckets) at the longest length: a model that uses its context gets
better the further into a window it predicts."""

import math
from dataclasses import dataclass, field

import numpy as np

from mlx_ltc.errors import UserError
from mlx_ltc.eval.stream import chunk_nll
from mlx_ltc.records import Record


@dataclass
class ContextCurve(Record):
    tokens: int  # stream tokens evaluated at every length
    lengths: list  # evaluation lengths
    ppl: list  # perplexity at each length (windows of that length over the same tokens)
    buckets: list = field(default_factory=list)  # {"start", "end", "nll", "targets"} at the longest length
    position_nll: list = field(default_factory=list)  # mean NLL at each position, longest length


def default_lengths(trained: int) -> list:
    """512, 1,024, ... up to twice the trained length (and the trained length itself)."""
    lengths, n = [], 512
    while n <= 2 * trained:
        lengths.append(n)
        n *= 2
    return sorted(set(lengths + [trained]))


def position_buckets(length: int) -> list:
    """[start, end) target positions: [0, 16), [16, 32), [32, 64), ... doubling to `length`."""
    edges = [0, 16]
    while edges[-1] < length:
        edges.append(min(edges[-1] * 2, length))
    return list(zip(edges[:-1], edges[1:]))


def context_curve(model, stream: np.ndarray, lengths: list, max_tokens: int, progress=None) -> ContextCurve:
    """Windows of each length, back to back over the stream's first tokens (a multiple of the
    longest length, at most `max_tokens`); each window is one sequence (full causal attention)."""
    longest = max(lengths)
    if len(stream) < longest:
        raise UserError(f"the stream has {len(stream):,} tokens, fewer than the longest evaluation length {longest:,}")
    used = max(longest, min(max_tokens, len(stream)) // longest * longest)
    ppl, sums, counts = [], None, None
    for length in sorted(lengths):
        total, count = 0.0, 0
        by_pos = np.zeros(length - 1)
        for w in range(0, used - length + 1, length):
            for start, nll in chunk_nll(model, stream[w : w + length]):
                total += nll.sum()
                count += len(nll)
                by_pos[start : start + len(nll)] += nll
            if progress is not None:
                progress.update(length)
        ppl.append(math.exp(total / count))
        if length == longest:
            sums, counts = by_pos, used // length
    buckets = [
        {"start": s, "end": e, "nll": float(sums[s:e].sum() / (counts * (e - s))), "targets": counts * (e - s)}
        for s, e in position_buckets(longest - 1)
    ]
    return ContextCurve(used, sorted(lengths), ppl, buckets, (sums / counts).tolist())
