"""The working context: entries tiling a tree's whole timeline, fed to the frozen base as input embeddings.

An entry is (level, index): level 0 is raw 32-token block `index` (cost 32, one position per token), level
1 or 2 a gist (cost 1) covering `block**level` tokens; the incomplete tail is always raw. Entries are in
timeline order, without gaps. Positions are global (a token at its index, a gist at its span's centre) or
compact (0, 1, 2, ... over the fed entries).
"""

from typing import NamedTuple

import mlx.core as mx
import numpy as np

from mlx_ltc.research.megacontext.positions import forward_at
from mlx_ltc.research.megacontext.tree import GistTree
from mlx_ltc.numerics.loss import token_nll

__all__ = ["Entry", "cost", "feed", "recency", "target_logits", "target_nll"]


class Entry(NamedTuple):
    level: int
    index: int


def _span(tree: GistTree, e: Entry) -> tuple:
    return tree.span(max(e.level, 1), e.index)  # a raw entry is a whole block, like its L1 gist


def cost(tree: GistTree, entries: list) -> int:
    """Positions the entries take, the raw tail included."""
    tail = len(tree.tokens) % tree.block
    return sum(tree.block if e.level == 0 else 1 for e in entries) + tail


def recency(tree: GistTree, budget: int) -> list:
    """The recency heuristic: the coarsest tiling (L2 gists, then L1 for blocks no L2 covers), then expand
    the newest entry that fits, newest first (L2 -> its 32 L1 gists, L1 -> its raw block), within budget."""
    block = tree.block
    n_blocks = len(tree.tokens) // block
    n_l2 = len(tree.levels[2])
    entries = [Entry(2, i) for i in range(n_l2)] + [Entry(1, i) for i in range(n_l2 * block, n_blocks)]
    if cost(tree, entries) > budget:
        raise ValueError(f"budget {budget} is below the coarsest tiling's cost {cost(tree, entries)}")
    i = len(entries) - 1
    while i >= 0:
        e, spare = entries[i], budget - cost(tree, entries)
        if e.level == 2 and spare >= block - 1:
            entries[i : i + 1] = [Entry(1, e.index * block + j) for j in range(block)]
            i += block - 1
        elif e.level == 1 and spare >= block - 1:
            entries[i] = Entry(0, e.index)
            i -= 1
        else:
            break
    return entries


def feed(model, tree: GistTree, entries: list, gists=None, positions: str = "global") -> tuple:
    """(input embeddings (n, d), positions (n,)) of the entries and the raw tail. gists(level, index) -> the
    vector to feed for a gist entry [default: the tree's]; controls swap it (shuffled, another file's, zero)."""
    embed = model.model.embed_tokens
    tokens, block = tree.tokens, tree.block
    gists = gists or (lambda level, index: tree.levels[level][index])
    parts, where = [], []
    tail = len(tokens) - len(tokens) % block
    for e in [*entries, None]:
        start, end = (tail, len(tokens)) if e is None else _span(tree, e)
        if e is None or e.level == 0:
            if end > start:
                parts.append(embed(mx.array(tokens[start:end])))
                where.append(np.arange(start, end, dtype=np.float32))
        else:
            parts.append(mx.array(np.asarray(gists(e.level, e.index), np.float32))[None].astype(embed.weight.dtype))
            where.append(np.array([(start + end - 1) / 2], np.float32))
    where = np.concatenate(where)
    if positions == "compact":
        where = np.arange(len(where), dtype=np.float32)
    elif positions != "global":
        raise ValueError(f"positions must be 'global' or 'compact', not {positions!r}")
    return mx.concatenate(parts), where


def target_logits(model, tree: GistTree, entries: list, target, gists=None, positions: str = "global") -> mx.array:
    """(len(target), V) logits predicting `target` tokens continuing the tree's timeline, given the working
    context: the last fed entry predicts target[0], target[i] predicts target[i + 1]."""
    context, where = feed(model, tree, entries, gists, positions)
    target = np.asarray(target, np.int32)
    embeddings = mx.concatenate([context, model.model.embed_tokens(mx.array(target[:-1]))])[None]
    start = where[-1] + 1
    pos = np.concatenate([where, start + np.arange(len(target) - 1, dtype=np.float32)])
    return forward_at(model, embeddings, mx.array(pos))[0, len(where) - 1 :].astype(mx.float32)


def target_nll(model, tree: GistTree, entries: list, target, gists=None, positions: str = "global") -> np.ndarray:
    """NLL (float64, one per token) of `target` given the working context (see `target_logits`)."""
    logits = target_logits(model, tree, entries, target, gists, positions)
    return np.array(token_nll(logits, mx.array(np.asarray(target, np.int32)))).astype(np.float64)
