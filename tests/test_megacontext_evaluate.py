"""The gist-vs-truncation evaluation's conditions and statistics, on a tiny model."""

import numpy as np
import pytest
from test_megacontext_positions import tiny_llama

from mlx_ltc.research.megacontext import evaluate as ev
from mlx_ltc.research.megacontext.tree import last_input, mean_gist

CONDITIONS = ("truncation", "mean_gist", "last_input", "full", "shuffled", "other_file", "zeroed")


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    rng = np.random.default_rng(3)
    files = [rng.integers(0, 101, 1200).astype(np.int32) for _ in range(2)]
    table = np.array(model.model.embed_tokens.weight)
    return model, files, {"mean_gist": mean_gist(table), "last_input": last_input(table)}


def test_a_budget_holding_the_whole_history_makes_every_condition_the_full_one(setup):
    model, (a, b), gists = setup
    scores = ev.score_file(model, a, budget=1200, horizon=40, conditions=CONDITIONS, gists=gists, other=b)
    for condition in CONDITIONS:  # no gists in the tiling: the controls change nothing
        np.testing.assert_allclose(scores[condition], scores["full"], atol=1e-4, err_msg=condition)


def test_a_small_budget_separates_the_conditions(setup):
    model, (a, b), gists = setup
    scores = ev.score_file(model, a, budget=256, horizon=40, conditions=CONDITIONS, gists=gists, other=b)
    means = {c: float(np.mean(v)) for c, v in scores.items()}
    assert all(len(v) == 40 for v in scores.values())
    gisted = ("mean_gist", "last_input", "shuffled", "other_file", "zeroed")
    for control in gisted:
        assert abs(means[control] - means["truncation"]) > 1e-4, control
    assert len({round(means[c], 6) for c in gisted}) == len(gisted)
    with pytest.raises(ValueError, match="another file"):
        ev.score_file(model, a, 256, 40, ["other_file"], gists)


def test_bootstrap_statistics():
    rng = np.random.default_rng(0)
    a = 2 + rng.normal(0, 0.1, 50)
    d = a - 1 + rng.normal(0, 0.01, 50)
    c = a - 0.5 + rng.normal(0, 0.01, 50)
    point, low, high = ev.gap_closed(a, c, d)
    assert low <= point <= high and abs(point - 0.5) < 0.02 and high - low < 0.05
    assert ev.bootstrap_mean([3.0] * 10) == (3.0, 3.0, 3.0)
    mean, low, high = ev.bootstrap_mean(a)
    assert low < mean < high
