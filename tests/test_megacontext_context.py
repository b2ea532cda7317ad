"""Working contexts: tilings of the timeline within a budget, and their feed to the frozen model."""

import mlx.core as mx
import numpy as np
import pytest
from test_megacontext_positions import tiny_llama

from mlx_ltc.research.megacontext import context as wc
from mlx_ltc.research.megacontext import tree as mc_tree


def tree_of(model, n, seed=0):
    tokens = np.random.default_rng(seed).integers(0, 101, n).astype(np.int32)
    t = mc_tree.GistTree(width=64, model_id="tiny")
    t.append(tokens, mc_tree.mean_gist(np.array(model.model.embed_tokens.weight)))
    return t, tokens


def covered(t, entries):
    spans = [t.span(max(e.level, 1), e.index) for e in entries]
    return all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[0][0] == 0 and spans[-1][1]


@pytest.mark.parametrize("budget", [90, 160, 400, 1200, 2200, 5000])
def test_recency_tiles_the_timeline_within_budget_newest_first(budget):
    t, tokens = tree_of(tiny_llama(), 2 * 1024 + 3 * 32 + 7)
    entries = wc.recency(t, budget)
    assert covered(t, entries) == len(tokens) // 32 * 32
    assert wc.cost(t, entries) <= budget
    levels = [e.level for e in entries]
    assert levels == sorted(levels, reverse=True)  # coarse (old) to raw (new)
    finer = wc.recency(t, budget + 64)
    assert sum(e.level == 0 for e in finer) >= sum(e.level == 0 for e in entries)


def test_recency_extremes():
    t, tokens = tree_of(tiny_llama(), 2 * 1024 + 3 * 32 + 7)
    coarse = wc.recency(t, 2 + 3 + 7)
    assert coarse == [wc.Entry(2, 0), wc.Entry(2, 1), wc.Entry(1, 64), wc.Entry(1, 65), wc.Entry(1, 66)]
    assert all(e.level == 0 for e in wc.recency(t, len(tokens)))
    with pytest.raises(ValueError, match="below the coarsest"):
        wc.recency(t, 11)


def test_an_all_raw_context_scores_like_the_plain_model():
    model = tiny_llama()
    t, tokens = tree_of(model, 200)
    target = np.random.default_rng(5).integers(0, 101, 24).astype(np.int32)
    entries = [wc.Entry(0, i) for i in range(200 // 32)]
    logits = model(mx.array(np.concatenate([tokens, target]))[None])[0, 199:-1].astype(mx.float32)
    want = np.array(mx.logsumexp(logits, -1) - logits[mx.arange(24), mx.array(target)])
    for positions in ("global", "compact"):
        got = wc.target_nll(model, t, entries, target, positions=positions)
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_gists_sit_at_their_span_centres_or_compact_positions():
    model = tiny_llama()
    t, _ = tree_of(model, 3 * 32 + 5)
    entries = [wc.Entry(1, 0), wc.Entry(0, 1), wc.Entry(1, 2)]
    embeddings, where = wc.feed(model, t, entries)
    assert embeddings.shape == (1 + 32 + 1 + 5, 64)
    assert where.tolist() == [15.5, *range(32, 64), 79.5, *range(96, 101)]
    assert wc.feed(model, t, entries, positions="compact")[1].tolist() == list(range(39))
    zeroed, _ = wc.feed(model, t, entries, gists=lambda level, index: np.zeros(64))
    assert mx.abs(zeroed[0]).max().item() == 0 and mx.array_equal(zeroed[1:33], embeddings[1:33]).item()
