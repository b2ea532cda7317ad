"""Evaluation: perplexity over a split's real tokens (every token counts once, whatever its role weight)."""

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_ltc.data import Split
from mlx_ltc.errors import UserError
from mlx_ltc.train.loss import head_of, nll_sum_chunked, token_nll


@dataclass
class Perplexity:
    loss: float  # mean NLL per predicted token (nats)
    ppl: float
    tokens: int


def perplexity(model, split: Split, batch_size: int = 4, desc: str = "eval", progress: bool = True) -> Perplexity:
    if len(split) == 0:
        raise UserError(f"{desc}: the split is empty")
    from tqdm import tqdm

    model.eval()
    total, count = 0.0, 0
    for tokens, real in tqdm(
        _real_batches(split, batch_size),
        total=math.ceil(len(split) / batch_size),
        desc=desc,
        unit="batch",
        disable=None if progress else True,
        leave=False,
    ):
        s, n = nll_sum_chunked(model, tokens, real, chunk=128)  # never (B, L, V) logits
        mx.eval(s, n)
        total += s.item()
        count += n.item()
    loss = total / count
    return Perplexity(loss=loss, ppl=math.exp(loss), tokens=int(count))


def position_nll(model, split: Split, batch_size: int = 4, chunk: int = 128):
    """(loss, NLL summed per position (L-1,), real targets per position (L-1,)) over the split's real
    targets; position i predicts token i+1. Never holds more than `chunk` positions of logits."""
    model.eval()
    head = head_of(model)
    width = split.tokens.shape[1] - 1
    total, count = np.zeros(width), np.zeros(width)
    for tokens, real in _real_batches(split, batch_size):
        hidden = model.model(tokens[:, :-1])
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            logits = head(hidden[:, start:end]).astype(mx.float32)
            nll = token_nll(logits, tokens[:, start + 1 : end + 1]) * real[:, start:end]
            mx.eval(nll)
            total[start:end] += np.array(nll.sum(axis=0), dtype=np.float64)
        count += np.array(real.sum(axis=0), dtype=np.float64)
    return float(total.sum() / max(count.sum(), 1)), total, count


def _real_batches(split: Split, batch_size: int):
    for s in range(0, len(split), batch_size):
        yield mx.array(split.tokens[s : s + batch_size]), mx.array(split.real[s : s + batch_size].astype("float32"))
