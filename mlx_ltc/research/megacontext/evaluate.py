"""Does a gisted head beat truncation? NLL of a file's last `horizon` tokens under each condition, at equal
working-context budgets, with paired bootstrap confidence intervals over files.

Conditions, for a history (the file minus its last `horizon` tokens) and a budget W of positions:
- truncation: the last W history tokens, raw, at positions 0..;
- full: the whole history, raw (the upper bound);
- mean_gist / last_input / gist / gist_lora: the recency tiling within W (newest blocks raw, older ones as L1
  then L2 gists), gists from mean pooling (the baseline), the last input (the untrained GistNet), the trained
  GistNet or the trained base-LoRA encoder;
- controls on the same tiling, with the run's main gists (gist_lora when it has them, else gist): shuffled
  (the gists permuted among their entries), other_file (another file's gists at the same entries), zeroed
  (zero vectors).
"""

import mlx.core as mx
import numpy as np

from mlx_ltc.research.megacontext import context as wc
from mlx_ltc.research.megacontext.objective import rebuild
from mlx_ltc.research.megacontext.tree import GistTree
from mlx_ltc.numerics.loss import token_nll

__all__ = [
    "CONDITIONS",
    "bootstrap_mean",
    "build_tree",
    "gap_closed",
    "main_gists",
    "memoized",
    "plain_nll",
    "reconstruction",
    "score_file",
]

CONDITIONS = ("truncation", "mean_gist", "last_input", "gist", "gist_lora", "full", "shuffled", "other_file", "zeroed")
GISTED = ("mean_gist", "last_input", "gist", "gist_lora")


def plain_nll(model, prefix: np.ndarray, target: np.ndarray) -> np.ndarray:
    """NLL of target after prefix, the model fed raw tokens at positions 0, 1, ..."""
    tokens = mx.array(np.concatenate([prefix, target[:-1]]).astype(np.int32))[None]
    logits = model(tokens)[0, len(prefix) - 1 :].astype(mx.float32)
    return np.array(token_nll(logits, mx.array(target.astype(np.int32)))).astype(np.float64)


def build_tree(history, width: int, gist) -> GistTree:
    """A tree of the history (token ids), gisted by `gist`."""
    tree = GistTree(width=width, model_id="")
    tree.append(np.asarray(history, np.int32), gist)
    return tree


def score_file(model, tokens: np.ndarray, budget: int, horizon: int, conditions, gists: dict, other=None,
               positions: str = "global", seed: int = 0) -> dict:  # fmt: skip
    """{condition: per-token NLL of the last `horizon` tokens}. gists: compressor per gist condition
    (`GISTED`); the controls take the main one (`main_gists`). other: another file's tokens, for other_file."""
    history, target = tokens[:-horizon], tokens[-horizon:]
    width = model.model.embed_tokens.weight.shape[1]
    out, trees = {}, {}
    for condition in conditions:
        if condition == "truncation":
            out[condition] = plain_nll(model, history[-budget:], target)
        elif condition == "full":
            out[condition] = plain_nll(model, history, target)
        else:
            key = condition if condition in GISTED else main_gists(gists)
            if key not in trees:
                trees[key] = build_tree(history, width, gists[key])
            tree = trees[key]
            entries = wc.recency(tree, budget)
            out[condition] = wc.target_nll(model, tree, entries, target, _control(condition, tree, entries, other,
                                           width, gists[key], seed), positions)  # fmt: skip
    return out


def memoized(gist):
    """The compressor, remembering each block's gist (it depends on the block's inputs alone), so that one
    file's conditions, budgets and streamed focus loop gist each block once. Keeps a compressor's `many`."""
    seen = {}

    def many(level, inputs: list) -> list:
        keys = [(level, np.asarray(i).tobytes()) for i in inputs]
        todo = {k: i for k, i in zip(keys, inputs) if k not in seen}
        if todo:
            made = (
                gist.many(level, list(todo.values()))
                if hasattr(gist, "many")
                else [gist(level, i) for i in todo.values()]
            )
            seen.update(zip(todo, made))
        return [seen[k] for k in keys]

    def one(level, inputs):
        return many(level, [inputs])[0]

    one.many = many
    return one


def main_gists(gists: dict) -> str:
    """The condition whose gists the controls (and LensNet focus) use: the newest trained encoder's."""
    return next(c for c in ("gist_lora", "gist", "mean_gist") if c in gists)


def _control(condition, tree, entries, other, width, gist, seed):
    """The gist lookup a control feeds instead of the tree's own (None: the tree's)."""
    if condition in GISTED:
        return None
    if condition == "zeroed":
        return lambda level, index: np.zeros(width, np.float32)
    if condition == "shuffled":
        slots = [(e.level, e.index) for e in entries if e.level > 0]
        order = np.random.default_rng(seed).permutation(len(slots))
        moved = {slots[i]: slots[j] for i, j in enumerate(order)}
        return lambda level, index: tree.levels[moved[(level, index)][0]][moved[(level, index)][1]]
    if condition == "other_file":
        if other is None:
            raise ValueError("other_file needs another file's tokens")
        donor = build_tree(other, width, gist)

        def lookup(level, index):
            rows = donor.levels[level] if len(donor.levels[level]) else donor.levels[1]
            return rows[index % len(rows)]

        return lookup
    raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")


def bootstrap_mean(values, n: int = 2000, seed: int = 0) -> tuple:
    """(mean, 2.5th, 97.5th percentile) of the mean of per-file values, resampling files."""
    values = np.asarray(values, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(values), (n, len(values)))
    means = values[idx].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def gap_closed(truncation, method, full, n: int = 2000, seed: int = 0) -> tuple:
    """(fraction, CI low, CI high) of the truncation-to-full gap a method closes, (a - c) / (a - d), over
    per-file NLLs, with the files resampled jointly (paired)."""
    a, c, d = (np.asarray(x, np.float64) for x in (truncation, method, full))
    idx = np.random.default_rng(seed).integers(0, len(a), (n, len(a)))
    gap = a[idx].mean(1) - d[idx].mean(1)
    fractions = np.where(np.abs(gap) > 1e-12, (a[idx].mean(1) - c[idx].mean(1)) / np.where(gap == 0, 1, gap), np.nan)
    point = (a.mean() - c.mean()) / (a.mean() - d.mean())
    return float(point), float(np.nanpercentile(fractions, 2.5)), float(np.nanpercentile(fractions, 97.5))


def reconstruction(model, history: np.ndarray, gists: dict, marker, blocks: int = 16) -> dict:
    """Token accuracy (teacher forcing) of the decoder rebuilding `blocks` of the history's 32-token blocks,
    evenly spread, from one L1 gist each: {condition: accuracy} per gist condition, plus "shuffled" (each
    block read from the next chosen block's main gist) and "no_gist" (the marker alone: the decoder's guess
    from the block's own earlier tokens)."""
    n = len(history) // 32
    if n == 0:  # a history shorter than one block has nothing to rebuild
        return {}
    picks = np.unique(np.linspace(0, n - 1, min(blocks, n)).round().astype(int))
    chosen = np.stack([history[32 * i : 32 * (i + 1)] for i in picks]).astype(np.int32)
    ids = mx.array(chosen)
    out, vectors = {}, {}
    for condition, gist in gists.items():
        vectors[condition] = np.stack([np.asarray(gist(1, row), np.float32) for row in chosen])
        hits = rebuild(model, mx.array(vectors[condition])[:, None], ids, marker)[1]
        out[condition] = float(hits.astype(mx.float32).mean().item())
    if len(picks) > 1:
        moved = np.roll(vectors[main_gists(gists)], 1, axis=0)
        out["shuffled"] = float(
            rebuild(model, mx.array(moved)[:, None], ids, marker)[1].astype(mx.float32).mean().item()
        )
    width = model.model.embed_tokens.weight.shape[1]
    none = rebuild(model, mx.zeros((len(picks), 0, width)), ids, marker)[1]
    out["no_gist"] = float(none.astype(mx.float32).mean().item())
    return out
