"""The orchestrator's rules, the stability guards and the phase plan, on plain numbers."""

import math

import numpy as np
import pytest

from mlx_ltc.config import Config, OrchestratorConfig, StabilityConfig, TrainConfig, merge
from mlx_ltc.data import Split
from mlx_ltc.train import phases
from mlx_ltc.runtime import stability
from mlx_ltc.runtime.stability import GradStats, StabilityState
from mlx_ltc.train.orchestrator import Orchestrator, context_gain


def feed(orch, losses, train=None, gain=0.0, last=False, spent=1.0):
    """Events of each eval, for a sequence of val losses."""
    return [[e.kind for e in orch.on_eval(i + 1, v, train or v, gain, last, spent)] for i, v in enumerate(losses)]


def test_convergence_advances_only_when_the_context_is_used():
    cfg = OrchestratorConfig(smoothing=1.0, converge_evals=2, converge_tol=0.01)
    flat = [3.0, 2.0, 1.996, 1.995, 1.994]
    assert feed(Orchestrator(cfg), flat, gain=0.05)[3] == ["advance"]
    held = feed(Orchestrator(cfg), flat, gain=0.001)
    assert held[3] == ["hold"] and "advance" not in sum(held, [])
    assert feed(Orchestrator(cfg), flat, gain=0.05, last=True)[3] == ["stop"]
    assert feed(Orchestrator(cfg), [3.0, 2.5, 2.0, 1.5, 1.0], gain=0.05) == [[]] * 5  # still improving
    assert feed(Orchestrator(cfg), flat, gain=0.05, spent=0.1) == [[]] * 5  # too early in the phase


def test_convergence_inputs_are_logged():
    cfg = OrchestratorConfig(smoothing=1.0, converge_evals=1)
    orch = Orchestrator(cfg)
    orch.on_eval(1, 2.0, 2.0, 0.1, False)
    (event,) = orch.on_eval(2, 1.999, 1.9, 0.1, False)
    assert event.kind == "advance"
    assert event.inputs["improvement"] == pytest.approx(0.0005) and event.inputs["context_gain"] == 0.1


def test_plateau_halves_the_lr_with_cooldown_and_a_floor():
    cfg = OrchestratorConfig(smoothing=1.0, plateau_evals=2, cooldown_evals=2, min_lr_factor=0.25, converge_tol=0)
    orch = Orchestrator(cfg)
    events = feed(orch, [2.0, 2.01, 2.02, 2.01, 2.02, 2.01, 2.02, 2.01, 2.02, 2.01, 2.02])
    reductions = [i for i, e in enumerate(events) if "reduce_lr" in e]
    assert reductions[0] == 2  # two evals without a new best
    assert all(b - a >= 2 for a, b in zip(reductions, reductions[1:]))  # cooldown
    assert len(reductions) == 2 and orch.state.lr_factor == 0.25  # 1 -> 0.5 -> 0.25, then the floor


def test_divergence_reduces_the_lr():
    cfg = OrchestratorConfig(smoothing=1.0, plateau_evals=10, diverge_rise=0.05, overfit_gap=0.5)
    orch = Orchestrator(cfg)
    assert feed(orch, [2.0, 2.3])[1] == ["reduce_lr"]
    assert orch.state.lr_factor == 0.5


def test_overfitting_restores_the_best_then_stops_or_regularizes():
    cfg = OrchestratorConfig(smoothing=1.0, overfit_gap=0.15, plateau_evals=10, diverge_rise=1.0)
    orch = Orchestrator(cfg)
    events = [orch.on_eval(i, v, 1.0, 0.0, False) for i, v in enumerate([2.0, 2.05, 2.1], start=1)]
    assert [e.kind for e in events[2]] == ["restore_best", "stop"]
    assert orch.state.best_step == 1
    # val rising but train close to val: no overfitting
    orch = Orchestrator(cfg)
    assert [orch.on_eval(i, v, v * 0.95, 0.0, False) for i, v in enumerate([2.0, 2.05, 2.1], 1)][2] == []
    reg = Orchestrator(OrchestratorConfig(smoothing=1.0, overfit_action="regularize", plateau_evals=10))
    events = [reg.on_eval(i, v, 1.0, 0.0, False) for i, v in enumerate([2.0, 2.05, 2.1], start=1)]
    assert [e.kind for e in events[2]] == ["restore_best"] and reg.state.lr_factor == 0.5


def test_orchestrator_state_round_trips():
    cfg = OrchestratorConfig(smoothing=0.5)
    orch = Orchestrator(cfg)
    feed(orch, [3.0, 2.0, 2.5])
    again = Orchestrator.from_dict(cfg, orch.to_dict())
    assert again.state == orch.state


def test_spikes_are_counted_and_a_run_of_them_asks_for_a_rollback():
    state, rules = StabilityState(), StabilityConfig(spike_factor=2.0, spike_limit=3)
    for i in range(10):
        assert stability.check(state, rules, i, 1.0 + 0.01 * i, 1.0, 64) == (True, [])
    kinds = [[e.kind for e in stability.check(state, rules, 10 + i, 5.0, 1.0, 64)[1]] for i in range(3)]
    assert kinds == [["spike"], ["spike"], ["spike", "unstable"]]
    assert state.spikes == 3 and state.by_length["64"].spikes == 3
    assert stability.check(state, rules, 13, 1.0, 1.0, 64) == (True, [])  # a normal loss ends the streak
    assert state.spike_streak == 0 and max(state.recent) < 2  # spikes never enter the median window


def test_non_finite_updates_are_skipped_then_rolled_back():
    state, rules = StabilityState(), StabilityConfig(nan_limit=2)
    for i in range(6):
        stability.check(state, rules, i, 1.0, 1.0, 32)
    apply, events = stability.check(state, rules, 6, math.nan, 1.0, 32)
    assert not apply and [e.kind for e in events] == ["skip"]
    apply, events = stability.check(state, rules, 7, 1.0, math.inf, 32)
    assert not apply and [e.kind for e in events] == ["skip", "unstable"]
    assert state.skipped == 2 and state.by_length["32"].grad.n == 6  # no norm recorded for skips
    stability.rolled_back(state, StabilityState())
    assert state.rollbacks == 1 and state.skipped == 2 and state.recent == []


def test_stability_state_round_trips_through_json():
    import json

    state = StabilityState()
    for i, x in enumerate([1.0, 1.5, 0.7, 2.0, 1.1, 1.2]):
        stability.check(state, StabilityConfig(), i, x, x, 128)
    written = json.loads(json.dumps(state.to_json()))
    assert StabilityState.from_json(written) == state
    assert written["by_length"]["128"]["grad"]["n"] == 6  # the layout checkpoints have always had


def test_grad_stats_match_numpy():
    xs = np.random.default_rng(0).lognormal(size=50)
    g = GradStats()
    for x in xs:
        g.add(float(x))
    assert g.mean == pytest.approx(xs.mean()) and g.std == pytest.approx(xs.std(ddof=1))
    assert (g.min, g.max) == (xs.min(), xs.max())


def test_context_gain_compares_the_end_of_the_window_with_its_middle():
    assert context_gain(np.array([5.0, 4.0, 3.0, 3.0, 2.0, 2.0, 1.5, 1.5])) == pytest.approx(0.5)
    assert context_gain(np.full(16, 2.0)) == 0.0


def make_cfg(seq_len=256, n_phases=3, **train):
    return merge(Config(train=TrainConfig(**train)), {"data": {"seq_len": seq_len}, "curriculum": {"phases": n_phases}})


def test_plan_scales_lengths_keeps_tokens_per_update_and_uses_the_whole_budget():
    plan = phases.plan(make_cfg(batch_size=2, grad_accum=3, warmup_steps=10), 100)
    assert [p.seq_len for p in plan] == [64, 128, 256]
    assert [p.lr_mult for p in plan] == [1.0, 0.5, 0.1] and [p.band for p in plan] == [0.6, 0.85, 1.0]
    assert {p.seq_len * p.micro_batch * p.grad_accum for p in plan} == {256 * 2 * 3}
    assert sum(p.steps for p in plan) == 100 and [p.steps for p in plan] == [40, 35, 25]
    assert plan[0].warmup == 10 and plan[1].warmup == 7
    two = phases.plan(make_cfg(n_phases=2), 10)
    assert [(p.seq_len, p.lr_mult, p.band) for p in two] == [(128, 1.0, 0.85), (256, 0.5, 1.0)]
    assert len(phases.plan(make_cfg(n_phases=3), 2)) == 2  # never more phases than updates


def test_view_cuts_sequences_and_keeps_each_targets_weight():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000, (4, 16)).astype(np.int32)
    weights = rng.random((4, 15)).astype(np.float32)
    split = Split(tokens, weights, weights > 0.2, np.array([0.1, 0.9, 0.5, 0.3], np.float32))
    cut = phases.view(split, 4)
    assert cut.tokens.shape == (16, 4) and cut.weights.shape == (16, 3)
    for row in range(4):
        for piece in range(4):
            r, s = row * 4 + piece, piece * 4
            assert (cut.tokens[r] == tokens[row, s : s + 4]).all()
            assert (cut.weights[r] == weights[row, s : s + 3]).all()  # targets inside the piece only
            assert (cut.real[r] == (weights[row, s : s + 3] > 0.2)).all()
    easy = phases.view(split, 16, band=0.5)
    assert sorted(easy.difficulty.tolist()) == pytest.approx([0.1, 0.3])


def test_lr_reduction_composes_with_warmup_and_cosine():
    t = TrainConfig(lr=1e-3, min_lr_ratio=0.1)
    phase = phases.Phase(0, 64, 0.5, 1.0, steps=20, micro_batch=1, grad_accum=1, warmup=4)
    full = [phases.lr_at(t, phase, s) for s in range(20)]
    half = [phases.lr_at(t, phase, s, factor=0.5) for s in range(20)]
    assert full[:4] == pytest.approx([1.25e-4, 2.5e-4, 3.75e-4, 5e-4])
    assert full[-1] == pytest.approx(5e-5) and all(a >= b for a, b in zip(full[4:], full[5:]))
    assert half == pytest.approx([x / 2 for x in full])  # the schedule never undoes a reduction
