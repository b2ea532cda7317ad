"""Evaluation: perplexity over a split's real tokens (every token counts once, whatever its role weight),
overall and by document kind (held-out files, commit chains)."""

import math
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from mlx_ltc.data import Split
from mlx_ltc.data.dataset import KINDS
from mlx_ltc.errors import UserError
from mlx_ltc.numerics.loss import head_of, token_nll
from mlx_ltc.records import Record


@dataclass
class Perplexity(Record):
    loss: float  # mean NLL per predicted token (nats)
    ppl: float
    tokens: int
    by_kind: dict = field(default_factory=dict)  # "file" / "chain" / ... -> {"loss", "ppl", "tokens"}

    def of(self, kind: str):
        """(ppl, tokens) of one document kind, or (None, 0) when the split has none."""
        k = self.by_kind.get(kind)
        return (k["ppl"], k["tokens"]) if k else (None, 0)

    def kind(self, name: str) -> "Perplexity | None":
        """The perplexity of one document kind alone, or None when the split has none."""
        k = self.by_kind.get(name)
        return Perplexity(**k) if k else None

    def to_json(self) -> dict:
        out = super().to_json()
        return out if self.by_kind else {k: out[k] for k in ("loss", "ppl", "tokens")}  # as before the split by kind


class Tally:
    """Summed NLL and target counts, overall and per document kind."""

    def __init__(self):
        self.sums, self.counts = np.zeros(len(KINDS) + 1), np.zeros(len(KINDS) + 1, dtype=np.int64)

    def add(self, nll: np.ndarray, kind: np.ndarray) -> None:
        """nll, kind: (B, T) per-target NLL and kind codes (0: not a real target)."""
        self.sums += np.bincount(kind.ravel(), weights=nll.ravel().astype(np.float64), minlength=len(self.sums))
        self.counts += np.bincount(kind.ravel(), minlength=len(self.counts))

    def result(self) -> Perplexity:
        total, count = self.sums[1:].sum(), int(self.counts[1:].sum())
        if count == 0:
            raise UserError("nothing to evaluate: the split has no real targets")
        by_kind = {
            name: {"loss": s / n, "ppl": math.exp(s / n), "tokens": int(n)}
            for name, s, n in zip(KINDS, self.sums[1:], self.counts[1:])
            if n
        }
        return Perplexity(loss=total / count, ppl=math.exp(total / count), tokens=count, by_kind=by_kind)


def target_nll(model, tokens: mx.array, chunk: int = 128) -> np.ndarray:
    """(B, T-1) next-token NLL of every position, the LM head `chunk` positions at a time (never
    (B, T, V) logits)."""
    head = head_of(model)
    hidden = model.model(tokens[:, :-1])
    width = tokens.shape[1] - 1
    parts = []
    for start in range(0, width, chunk):
        end = min(start + chunk, width)
        nll = token_nll(head(hidden[:, start:end]).astype(mx.float32), tokens[:, start + 1 : end + 1])
        mx.eval(nll)
        parts.append(np.array(nll, dtype=np.float64))
    return np.concatenate(parts, axis=1)


def perplexity(model, split: Split, batch_size: int = 4, desc: str = "eval", progress: bool = True) -> Perplexity:
    if len(split) == 0:
        raise UserError(f"{desc}: the split is empty")
    from mlx_ltc import progress as progress_bars

    model.eval()
    tally = Tally()
    kinds = split.kinds()
    starts = range(0, len(split), batch_size)
    for s in progress_bars.bar(starts, desc=desc, unit="batch", enabled=progress, leave=False):
        tally.add(target_nll(model, mx.array(split.tokens[s : s + batch_size])), kinds[s : s + batch_size])
    return tally.result()


def position_nll(
    model, split: Split, batch_size: int = 4, chunk: int = 128, only: str | None = None, world=None, nll_fn=None
):
    """(perplexity by kind, NLL summed per position (L-1,), targets per position (L-1,)) over the split's
    real targets, those of documents of kind `only` in the position sums when the split has any;
    position i predicts token i+1. Never holds more than `chunk` positions of logits.

    Under `mlx.launch` (`world`): each rank measures its share of the batches and the sums are added over
    the ranks, or, with a context-parallel `nll_fn` (`engine.StagedStep.target_nll`), every rank runs
    every batch on its share of the positions. Every rank gets the same result."""
    model.eval()
    width = split.tokens.shape[1] - 1
    total, count = np.zeros(width), np.zeros(width)
    tally, kinds = Tally(), split.kinds()
    code = KINDS.index(only) + 1 if only else None
    if code is not None and not (kinds == code).any():
        code = None
    starts = list(range(0, len(split), batch_size))
    shared = world is not None and world.distributed and nll_fn is None
    if shared:
        starts = starts[len(starts) * world.rank // world.size : len(starts) * (world.rank + 1) // world.size]
    for s in starts:
        tokens, kind = mx.array(split.tokens[s : s + batch_size]), kinds[s : s + batch_size]
        nll = nll_fn(model, tokens, chunk) if nll_fn else target_nll(model, tokens, chunk)
        tally.add(nll, kind)
        counted = kind == code if code is not None else kind > 0
        total += (nll * counted).sum(axis=0)
        count += counted.sum(axis=0)
    if shared:
        sums = world.all_sum(mx.array(np.concatenate([tally.sums, tally.counts, total, count]).astype(np.float32)))
        sums = np.array(sums, dtype=np.float64)
        n = len(tally.sums)
        tally.sums, tally.counts = sums[:n], sums[n : 2 * n].round().astype(np.int64)
        total, count = sums[2 * n : 2 * n + width], sums[2 * n + width :]
    return tally.result(), total, count
