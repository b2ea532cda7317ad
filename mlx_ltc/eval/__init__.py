"""Evaluation: token-weighted perplexity over a split's windows."""

import math
from dataclasses import dataclass

import mlx.core as mx

from mlx_ltc.data import Windows
from mlx_ltc.errors import UserError
from mlx_ltc.train import batches
from mlx_ltc.train.loss import nll_sum_chunked


@dataclass
class Perplexity:
    loss: float  # mean NLL per predicted token (nats)
    ppl: float
    tokens: int


def perplexity(model, windows: Windows, batch_size: int = 4, desc: str = "eval", progress: bool = True) -> Perplexity:
    if len(windows) == 0:
        raise UserError(f"{desc}: the split is empty")
    from tqdm import tqdm

    model.eval()
    total, count = 0.0, 0
    for tokens, lengths in tqdm(
        batches(windows, batch_size),
        total=math.ceil(len(windows) / batch_size),
        desc=desc,
        unit="batch",
        disable=None if progress else True,
        leave=False,
    ):
        s, n = nll_sum_chunked(model, tokens, lengths, chunk=128)  # never (B, L, V) logits
        mx.eval(s, n)
        total += s.item()
        count += n.item()
    loss = total / count
    return Perplexity(loss=loss, ppl=math.exp(loss), tokens=count)
