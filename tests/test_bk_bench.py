"""scripts/bench_bk.py's parts that decide what its numbers mean: the parameter matching and the mlx-lm
adapter that the shared training and streaming code drives."""

import importlib.util
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_ltc.research.bk import BKConfig, BKModel
from mlx_ltc.research.bk.evaluate import chunk_nll
from mlx_ltc.research.bk.loss import nll_per_token

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_bk", ROOT / "scripts/bench_bk.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("sizes", [{}, {"d_model": 64, "n_layers": 1}, {"d_model": 512, "n_layers": 8}])
@pytest.mark.parametrize("kind", ["transformer", "mamba"])
def test_baselines_match_bk_parameter_count(bench, kind, sizes):
    """Within 5% of BK's count, also without the (shared) embedding, at a shape near the family's usual one."""
    cfg = BKConfig(vocab_size=49_152, **sizes)
    target, embedding = bench.n_params(BKModel(cfg)), cfg.vocab_size * cfg.d_model
    model, args = bench.build(kind, cfg)
    count = bench.n_params(model)
    assert abs(count - target) / target < 0.05
    assert abs((count - embedding) - (target - embedding)) / (target - embedding) < 0.05
    assert args["hidden_size"] == cfg.d_model and args["tie_word_embeddings"]
    assert abs(math.log(args["intermediate_size"] / (bench.FAMILIES[kind][2] * cfg.d_model))) < math.log(2)
    fixed = bench.match(kind, target, cfg.d_model, cfg.vocab_size, layers=3)
    assert fixed.num_hidden_layers == 3


@pytest.mark.parametrize("kind", ["transformer", "mamba"])
def test_adapter_streams_the_one_shot_model(bench, kind):
    """Through the adapter, chunk by chunk with mlx-lm's cache (what --scaling streams and val scores) gives the
    one-shot training forward's NLL: the cache carries the whole causal state."""
    mx.random.seed(0)
    cfg = BKConfig(vocab_size=97, d_model=32, n_layers=1, n_experts=2, top_k=1, expert_hidden=32)
    net, _ = bench.build(kind, cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 41).astype(np.int32)
    net.train()
    hidden, _ = net.hidden(mx.array(tokens[None, :-1]))
    one_shot = np.array(nll_per_token(hidden[0], net.embed.weight, mx.array(tokens[1:])))
    streamed = np.concatenate(list(chunk_nll(net, tokens, chunk=16)))  # chunk_nll sets eval mode: the cache path
    assert not net.training
    np.testing.assert_allclose(streamed, one_shot, atol=1e-4)  # a state lost between chunks: off by 0.2-1.6 nats
