"""The focus allocator: legal, block-aligned, within budget, at most n_diff actions, with hysteresis."""

import numpy as np
import pytest
from test_megacontext_context import covered, tree_of
from test_megacontext_positions import tiny_llama

from mlx_ltc.research.megacontext import context as wc
from mlx_ltc.research.megacontext.context import Entry
from mlx_ltc.research.megacontext.focus import Focus, extend


@pytest.fixture(scope="module")
def tree():
    return tree_of(tiny_llama(), 2 * 1024 + 3 * 32 + 7)[0]


def check(t, entries, budget):
    assert covered(t, entries) == len(t.tokens) // 32 * 32  # still tiles the timeline, no gaps or overlaps
    assert wc.cost(t, entries) <= budget


@pytest.mark.parametrize("seed", range(6))
def test_random_utilities_never_break_the_rules(tree, seed):
    rng = np.random.default_rng(seed)
    budget = 400
    entries, focus = wc.recency(tree, budget), Focus(budget=budget, n_diff=4)
    history = []
    for _ in range(12):
        before = list(entries)
        entries = focus.step(tree, entries, rng.normal(0, 1, len(entries)))
        check(tree, entries, budget)
        now = [a for a in focus.log if a[0] == focus.iteration]
        assert len(now) <= 4
        for _, action, level, index in now:
            assert Entry(level, index) in before
            assert not (action == "expand" and level == 0)  # raw blocks can't expand
            assert not (action == "collapse" and level == 2)  # the top level can't collapse
        history.append(now)
    assert sum(map(len, history)) > 0


def test_hysteresis_a_block_that_changed_waits_two_iterations(tree):
    budget = 400
    entries = wc.recency(tree, budget)
    focus = Focus(budget=budget, n_diff=4, cooldown=2)
    first_gist = next(e for e in reversed(entries) if e.level == 1)

    def wants(target_level):  # push exactly this block one way: expand it (or collapse it back)
        def score(e):
            if e.index == first_gist.index and e.level in (0, 1):
                return 5.0 if target_level == 0 else -5.0
            return 1.0 if e.level == 0 else -1.0

        return score

    entries = focus.step(tree, entries, [wants(0)(e) for e in entries])
    assert Entry(0, first_gist.index) in entries
    for _ in range(2):  # iterations t+1 and t+2: the block stays raw although its utility is the lowest
        entries = focus.step(tree, entries, [wants(1)(e) + (10.0 if e.level > 0 else 0) for e in entries])
        assert Entry(0, first_gist.index) in entries
    assert all(index != first_gist.index for it, _, _, index in focus.log if it > 1)


def test_greedy_expands_the_highest_utility_and_swaps_only_for_a_gain(tree):
    budget = wc.cost(tree, wc.recency(tree, 400))  # full: every expansion needs a collapse
    entries = wc.recency(tree, budget)
    gists = [e for e in entries if e.level == 1]
    best = gists[3]
    u = [(3.0 if e == best else 0.5 if e.level == 1 else -1.0) for e in entries]
    out = Focus(budget=budget, n_diff=2).step(tree, entries, u)
    assert Entry(0, best.index) in out and sum(e.level == 0 for e in out) == sum(e.level == 0 for e in entries)
    # a swap that would lose (the best gist worth less than the cheapest raw block) doesn't happen
    u = [(0.5 if e.level == 1 else 2.0) for e in entries]
    assert Focus(budget=budget, n_diff=4, tau=0.0).step(tree, entries, u) == entries


def test_a_growing_tail_forces_collapses_but_never_of_the_newest_blocks():
    model = tiny_llama()
    t, tokens = tree_of(model, 600)
    budget = 256
    small = tree_of(model, 256)[0]
    entries = extend(small, [])
    assert wc.cost(small, entries) == 256
    focus = Focus(budget=budget, protect=2)
    entries = focus.step(t, extend(t, entries), None)
    check(t, entries, budget)
    newest = len(t.tokens) // 32
    assert Entry(0, newest - 1) in entries and Entry(0, newest - 2) in entries
    assert all(action == "forced" for _, action, _, _ in focus.log)
