"""Context parallelism's single-process parts: the kernel's query offset, the split of positions, the
planner's per-rank price. The ranks themselves run in test_distributed_*.py."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_ltc.config import Config
from mlx_ltc.distributed import World
from mlx_ltc.hardware import planner
from mlx_ltc.numerics.attention import efficient_attention, naive_attention
from mlx_ltc.train.context_parallel import Layout


@pytest.mark.parametrize("window", [None, 20])
def test_attention_of_later_query_slices_over_earlier_keys_is_the_full_attention(window):
    """Each slice's queries at their positions over the keys up to the slice's end: together the whole
    causal attention, and the gradients of the slices add up to the whole one's."""
    mx.random.seed(0)
    B, Hq, Hkv, L, D = 2, 4, 2, 96, 16
    q, k, v = (mx.random.normal((B, h, L, D)) for h in (Hq, Hkv, Hkv))
    w = mx.random.normal((B, Hq, L, D))
    whole = lambda q, k, v: (naive_attention(q, k, v, 0.25, window=window) * w).sum()  # noqa: E731
    ref = mx.grad(whole, argnums=(0, 1, 2))(q, k, v)
    got = [mx.zeros_like(q), mx.zeros_like(k), mx.zeros_like(v)]
    for s, e in ((0, 40), (40, 70), (70, 96)):

        def part(qs, k, v, s=s, e=e):
            out = efficient_attention(qs, k[:, :, :e], v[:, :, :e], 0.25, 4096, window=window, offset=s)[0]
            return (out * w[:, :, s:e]).sum()

        out = efficient_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], 0.25, 4096, window=window, offset=s)[0]
        expected = naive_attention(q, k, v, 0.25, window=window)[:, :, s:e]
        assert mx.abs(out - expected).max().item() < 1e-5
        dq, dk, dv = mx.grad(part, argnums=(0, 1, 2))(q[:, :, s:e], k, v)
        got = [got[0] + mx.pad(dq, [(0, 0), (0, 0), (s, L - e), (0, 0)]), got[1] + dk, got[2] + dv]
    for a, b in zip(got, ref):
        assert mx.abs(a - b).max().item() < 1e-5


@pytest.mark.parametrize("ranks, length", [(2, 300), (2, 4096), (3, 1000), (4, 257)])
def test_zigzag_split_covers_every_position_once_and_evens_the_work(ranks, length):
    layouts = [Layout(World(r, ranks), length) for r in range(ranks)]
    held = sorted(p for lay in layouts for s, e in lay.chunks for p in range(s, e))
    assert held == list(range(layouts[0].padded)) and layouts[0].padded >= length
    assert all(lay.local_len * ranks == lay.padded for lay in layouts)
    work = [layouts[0].work(r) for r in range(ranks)]
    contiguous = Layout(World(0, ranks), length, zigzag=False)
    uneven = [contiguous.work(r) for r in range(ranks)]
    assert max(work) / min(work) < 1.1 < max(uneven) / min(uneven)
    # the order that puts the rank-ordered gather back in sequence order
    ranked = np.array([p for lay in layouts for s, e in lay.chunks for p in range(s, e)])
    assert (ranked[layouts[0].order()] == np.arange(layouts[0].padded)).all()


def test_local_pads_the_end_and_takes_the_ranks_chunks():
    x = mx.arange(10)[None]
    lay = Layout(World(1, 2), 10)  # padded to 12: chunks of 3, rank 1 holds [3, 6) and [6, 9)
    assert lay.chunks == [(3, 6), (6, 9)]
    assert lay.local(x).tolist() == [[3, 4, 5, 6, 7, 8]]
    assert Layout(World(0, 2), 10).local(x).tolist() == [[0, 1, 2, 9, 0, 0]]


def test_planner_prices_a_context_parallel_rank_below_one_process_and_fits_about_twice_the_length():
    config = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
              "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152}  # fmt: skip
    shape = planner.Shape.from_config(config, "smollm2-135m")
    one = planner.setup_from_config(config, Config(), "cpu", 1)
    two = planner.Setup(**{**one.__dict__, "context_ranks": 2})
    for policy in ("engine", "engine_sqrt"):
        assert planner.predict(shape, two, policy, 8192)["peak"] < planner.predict(shape, one, policy, 8192)["peak"]
        assert "gathered_kv" in planner.predict(shape, two, policy, 8192)["terms"]
        budget = int(1.5e9)
        ratio = planner.max_seq_len(shape, two, policy, budget) / planner.max_seq_len(shape, one, policy, budget)
        assert 1.5 < ratio < 2.1
    # policies outside the engine don't split positions: the same price
    assert planner.predict(shape, two, "stock", 2048) == planner.predict(shape, one, "stock", 2048)
