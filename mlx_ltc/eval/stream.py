"""Next-token NLL over long token streams by chunked prefill through a KV cache.

`window=None` keeps every key (mlx-lm's KVCache): the numbers of one forward pass over the whole
stream, computed chunk by chunk. `window=W` keeps the last W keys (mlx-lm's RotatingKVCache, no sink
tokens): sliding-window attention in every layer, the way a bounded cache computes it (a kept key
still carries what its own layer below saw further back), and memory bounded however long the
stream. Positions keep counting (RoPE offsets grow); attention only ever sees differences.
"""

import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache

from mlx_ltc.numerics.loss import head_of, token_nll
from mlx_ltc.records import Record

HEAD_CHUNK = 128  # positions per LM-head call: never (chunk x vocab) logits at once


@dataclass
class StreamPoint(Record):
    tokens: int  # stream length so far (tokens read; tokens - 1 predicted)
    window: int  # keys kept (0: all)
    nll: float  # mean NLL per predicted token over the stream so far
    peak_bytes: int  # MLX peak memory since the stream began
    tokens_per_s: float


def model_window(model) -> int | None:
    """The narrowest sliding window the model's attention enforces itself (StarCoder2), or None."""
    windows = [getattr(layer.self_attn, "window", None) for layer in model.layers]
    windows = [w for w in windows if w]
    return min(windows) if windows else None


def make_cache(model, window: int | None):
    return [KVCache() if window is None else RotatingKVCache(max_size=window) for _ in model.layers]


def chunk_nll(model, tokens: np.ndarray, window: int | None = None, chunk: int = 512):
    """Yield (first target index, NLL of each target in the chunk as float64) over the stream:
    target t is tokens[t + 1], predicted from tokens[<= t] (the last `window` of them)."""
    model.eval()
    head = head_of(model)
    cache = make_cache(model, window)
    n = len(tokens) - 1
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        hidden = model.model(mx.array(tokens[None, start:end], dtype=mx.int32), cache=cache)
        targets = mx.array(tokens[None, start + 1 : end + 1], dtype=mx.int32)
        parts = []
        for s in range(0, end - start, HEAD_CHUNK):
            e = min(s + HEAD_CHUNK, end - start)
            parts.append(token_nll(head(hidden[:, s:e]).astype(mx.float32), targets[:, s:e])[0])
        nll = mx.concatenate(parts)
        mx.eval(nll, [c.state for c in cache])
        yield start, np.array(nll, dtype=np.float64)


def marks_for(total: int) -> list:
    """Stream lengths to report: 1K, 4K, 16K, 64K, 256K, 1M, ... below `total`, and `total`."""
    marks, m = [], 1024
    while m < total:
        marks.append(m)
        m *= 4
    return marks + [total]


def stream_eval(
    model, tokens: np.ndarray, window: int | None, chunk: int = 512, marks=None, progress=None, on_point=None
) -> list:
    """StreamPoints at each mark (stream lengths in tokens; default `marks_for`). `progress`: a tqdm
    bar advanced by tokens read, or None; `on_point`: called with each StreamPoint as it is reached."""
    pending = sorted(set(marks or marks_for(len(tokens))))
    points, total, count = [], 0.0, 0
    mx.synchronize()
    mx.reset_peak_memory()
    began = time.perf_counter()
    for _, nll in chunk_nll(model, tokens, window, chunk):
        while pending and pending[0] - 1 <= count + len(nll):  # a mark inside this chunk: exact
            upto = pending.pop(0) - 1 - count
            seen = count + upto
            point = StreamPoint(
                tokens=seen + 1,
                window=window or 0,
                nll=(total + float(nll[:upto].sum())) / max(seen, 1),
                peak_bytes=int(mx.get_peak_memory()),
                tokens_per_s=(seen + 1) / max(time.perf_counter() - began, 1e-9),
            )
            points.append(point)
            if on_point is not None:
                on_point(point)
        total += float(nll.sum())
        count += len(nll)
        if progress is not None:
            progress.update(len(nll))
    return points
