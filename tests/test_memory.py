"""The memory engine: attention, chunked loss and staged execution against their oracles, and the
memory properties they exist for (no L x L, no L x V arrays)."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import run_cli
from mlx.utils import tree_flatten, tree_unflatten

from mlx_ltc import models
from mlx_ltc.config import LoraConfig, MemoryConfig
from mlx_ltc.errors import UserError
from mlx_ltc.hardware import profile
from mlx_ltc.train import engine
from mlx_ltc.train.lora import apply_lora
from mlx_ltc.numerics.attention import efficient_attention, naive_attention
from mlx_ltc.numerics.loss import chunked_nll, nll_sum


def _rel(a, b):
    return (mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1e-12)).item()


@pytest.mark.parametrize(
    "batch,q_heads,kv_heads,length,head_dim",
    [(1, 2, 2, 1, 64), (2, 3, 1, 129, 96), (1, 12, 1, 77, 128), (2, 6, 2, 200, 64), (1, 24, 2, 65, 128)],
)
def test_attention_matches_naive_forward_and_gradients(batch, q_heads, kv_heads, length, head_dim):
    mx.random.seed(length)
    q = mx.random.normal((batch, q_heads, length, head_dim))
    k = mx.random.normal((batch, kv_heads, length, head_dim))
    v = mx.random.normal((batch, kv_heads, length, head_dim))
    cot = mx.random.normal(q.shape)
    scale = head_dim**-0.5
    # a small block budget forces several blocks, the last one partial
    block = 16 * batch * q_heads * length * 32
    ours = lambda q, k, v: (efficient_attention(q, k, v, scale, block_bytes=block)[0] * cot).sum()
    oracle = lambda q, k, v: (naive_attention(q, k, v, scale) * cot).sum()
    (a, ga), (b, gb) = (mx.value_and_grad(f, argnums=(0, 1, 2))(q, k, v) for f in (ours, oracle))
    assert abs(a.item() - b.item()) <= 1e-4 * max(1.0, abs(b.item()))
    for x, y in zip(ga, gb):
        assert mx.abs(x - y).max().item() <= 1e-4 * max(1.0, mx.abs(y).max().item())


def test_attention_within_segments_never_crosses_documents():
    mx.random.seed(0)
    q, k, v = (mx.random.normal((2, 4, 50, 64)) for _ in range(3))
    segments = mx.array(np.repeat([[0, 1, 2], [0, 0, 1]], [20, 20, 10], axis=1)[:, :50].astype(np.int32))
    ours = efficient_attention(q, k, v, 0.125, block_bytes=16 * 2 * 4 * 50 * 16, segments=segments)[0]
    assert _rel(ours, naive_attention(q, k, v, 0.125, segments=segments)) < 1e-5
    # the first token of a document sees only itself
    assert _rel(ours[0, :, 20], v[0, :, 20]) < 1e-5


def test_attention_backward_memory_is_linear_not_quadratic():
    heads = 8

    def peak(fn, L):
        mx.random.seed(0)
        q, k, v, cot = (mx.random.normal((1, heads, L, 64)) for _ in range(4))
        mx.eval(q, k, v, cot)
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(mx.grad(lambda q, k, v: (fn(q, k, v) * cot).sum(), argnums=(0, 1, 2))(q, k, v))
        return mx.get_peak_memory() - base

    ours = lambda q, k, v: efficient_attention(q, k, v, 0.125, block_bytes=8 << 20)[0]
    naive = lambda q, k, v: naive_attention(q, k, v, 0.125)
    p1, p2, n2 = peak(ours, 1024), peak(ours, 2048), peak(naive, 2048)
    assert n2 > heads * 2048 * 2048 * 4  # the oracle really holds an L x L matrix per head
    assert p2 < 2.5 * p1, (p1, p2)  # doubling L roughly doubles ours
    assert p2 < n2 / 3, (p2, n2)


def test_chunked_nll_matches_full_cross_entropy_with_weights():
    mx.random.seed(0)
    hidden = mx.random.normal((2, 37, 16))
    head = nn.Linear(16, 50, bias=False)
    targets = mx.random.randint(0, 50, (2, 37))
    weights = mx.array(np.random.default_rng(0).random((2, 37)).astype(np.float32)) * (mx.arange(37) < 30)
    full = lambda h: (nn.losses.cross_entropy(head(h), targets) * weights).sum()
    chunked = lambda h: chunked_nll(h, head, targets, weights, chunk=8)
    (a, ga), (b, gb) = mx.value_and_grad(chunked)(hidden), mx.value_and_grad(full)(hidden)
    assert abs(a.item() - b.item()) < 1e-4 * abs(b.item())
    assert _rel(ga, gb) < 1e-5
    assert mx.abs(ga[:, 30:]).max().item() == 0.0  # ignored positions get no gradient


def _model(tiny_dir, layers=-1):
    model = models.load(tiny_dir).model
    apply_lora(model, LoraConfig(layers=layers), seed=0)
    mx.random.seed(1)  # non-zero B, so every LoRA gradient is exercised
    flat = tree_flatten(model.trainable_parameters())
    flat = [(k, mx.random.normal(v.shape) * 0.02 if k.endswith("lora_b") else v) for k, v in flat]
    model.update(tree_unflatten(flat))
    return model


@pytest.mark.parametrize(
    "memory,layers",
    [
        (MemoryConfig(), -1),
        (MemoryConfig(layers_per_stage=2, loss_chunk=24, block_mb=1), -1),
        (MemoryConfig(), 1),
        (MemoryConfig(staged=False), -1),
        (MemoryConfig(attention="stock", loss="full"), -1),
    ],
    ids=["staged", "staged-k2-small-chunks", "staged-last-layer-only", "one-graph", "staged-stock-parts"],
)
def test_engine_matches_stock_loss_and_lora_gradients(tiny_dir, memory, layers):
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(0, 2000, (2, 101)).astype(np.int32))
    lengths = mx.array([101, 60])  # second row padded
    stock_model, our_model = _model(tiny_dir, layers), _model(tiny_dir, layers)
    (s_ref, n_ref), g_ref = nn.value_and_grad(stock_model, nll_sum)(stock_model, tokens, lengths)
    (s, n), g = engine.loss_and_grad(our_model, memory)(our_model, tokens, lengths)
    assert n.item() == n_ref.item() == 159
    assert abs(s.item() - s_ref.item()) <= 1e-4 * abs(s_ref.item())
    ref, ours = dict(tree_flatten(g_ref)), dict(tree_flatten(g))
    assert set(ours) == set(ref) and ref
    for key, value in ref.items():
        assert _rel(ours[key], value) < 1e-4, key


def test_engine_rejects_unsupported_models():
    class Other(nn.Module):
        model_type = "mamba"

    assert not engine.supports(Other())  # run_train then falls back to MLX's attention, one graph
    with pytest.raises(UserError, match="memory engine supports"):
        engine.check_supported(Other())


@pytest.mark.slow
def test_staged_peak_stays_below_stock_as_length_grows(smollm2_dir):
    """The point of the engine: at 1024 tokens the embedded model's step peaks well below stock's."""
    model = models.load(smollm2_dir).model
    apply_lora(model, LoraConfig(), seed=0)
    mx.eval(model.parameters())
    tokens = mx.array(np.random.default_rng(0).integers(0, 49152, (1, 1025)).astype(np.int32))
    lengths = mx.array([1025])
    peaks = {}
    for name, fn in [("stock", nn.value_and_grad(model, nll_sum)), ("ours", engine.StagedStep(model, MemoryConfig()))]:
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(fn(model, tokens, lengths))
        peaks[name] = mx.get_peak_memory()
    assert peaks["ours"] < 0.5 * peaks["stock"], peaks


def test_parse_size():
    assert profile.parse_size("5.3GB") == 5_300_000_000
    assert profile.parse_size("4GiB") == 4 * 2**30
    assert profile.parse_size("1500MB") == 1_500_000_000
    for bad in ("lots", "-1GB", "5 parsecs", "0"):
        with pytest.raises(UserError):
            profile.parse_size(bad)


def test_search_finds_the_boundary_by_doubling_then_bisection():
    calls = []

    def try_len(n):
        calls.append(n)
        fits = n <= 3000
        return profile.Probe(n, fits, n if fits else None, 1.0 if fits else None, n if fits else None, 1)

    best, probes = profile.search(try_len, 256, 65536, 128, log=lambda _: None)
    assert best.seq_len == 2944  # largest multiple of 128 <= 3000
    assert calls[:5] == [256, 512, 1024, 2048, 4096]
    assert len(probes) == len(calls) <= 10
    best, _ = profile.search(lambda n: profile.Probe(n, True, 1, 1.0, 1.0, 1), 256, 1000, 128, log=lambda _: None)
    assert best.seq_len == 1000  # the cap itself fits
    best, _ = profile.search(lambda n: profile.Probe(n, False, None, None, None, 1), 256, 1000, 128, log=print)
    assert best is None


@pytest.mark.slow
def test_profile_finds_a_length_and_train_uses_it(tiny_dir, tmp_path, small_repo):
    out = tmp_path / "profile.json"
    r = run_cli("profile", "--model", "tiny-starcoder2", "--memory-budget", "200MB", "--max-len", "1024", "--json", out)
    assert r.returncode == 0, r.stderr
    p = json.loads(out.read_text())
    assert p["backend"] == "cpu" and 256 <= p["max_seq_len"] <= 1024 and p["tokens_per_s"] > 0
    assert all(pr["peak_bytes"] <= 200e6 for pr in p["probes"] if pr["fits"])
    assert p["policy"] == "engine" and p["planned_max_seq_len"] > 0 and p["planned_peak_bytes"] > 0
    assert "the planner (engine) expects" in r.stderr and "planned (engine)" in r.stdout
    r = run_cli("train", "--repo", small_repo, "--model", "tiny-starcoder2", "--max-steps", 1, "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    assert f"seq_len {p['max_seq_len']}" in r.stderr and "memory profile" in r.stderr


def test_profile_budget_below_the_weights_is_one_clear_error(tiny_dir):
    r = run_cli("profile", "--model", "tiny-starcoder2", "--memory-budget", "5MB", "--max-len", "512")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: memory budget 0.01 GB is below what tiny-starcoder2 needs")
    assert "give at least" in lines[-1] and "Traceback" not in r.stderr


def test_chunked_nll_and_attention_in_bf16_with_a_quantized_tied_head():
    """The GPU path: bf16 activations, a 4-bit tied embedding as the head, GQA 12:1, head_dim 128."""
    mx.random.seed(0)
    emb = nn.QuantizedEmbedding.from_embedding(nn.Embedding(256, 64), group_size=64, bits=4)
    h = mx.random.normal((2, 37, 64)).astype(mx.bfloat16)
    targets, weights = mx.random.randint(0, 256, (2, 37)), mx.ones((2, 37))
    full = lambda h: (nn.losses.cross_entropy(emb.as_linear(h).astype(mx.float32), targets) * weights).sum()
    (a, ga), (b, gb) = (
        mx.value_and_grad(f)(h) for f in (lambda h: chunked_nll(h, emb.as_linear, targets, weights, 16), full)
    )
    assert abs(a.item() - b.item()) < 1e-4 * abs(b.item()) and ga.dtype == mx.bfloat16
    assert _rel(ga.astype(mx.float32), gb.astype(mx.float32)) < 2e-2
    q = mx.random.normal((1, 24, 70, 128)).astype(mx.bfloat16)
    k, v = (mx.random.normal((1, 2, 70, 128)).astype(mx.bfloat16) for _ in range(2))
    ours = efficient_attention(q, k, v, 128**-0.5, block_bytes=16 * 24 * 70 * 16)[0]
    assert ours.dtype == mx.bfloat16
    assert _rel(ours.astype(mx.float32), naive_attention(q, k, v, 128**-0.5).astype(mx.float32)) < 2e-2


@pytest.mark.slow
def test_train_can_switch_each_part_of_the_engine_off(tiny_dir, tmp_path, small_repo):
    out = tmp_path / "run"
    r = run_cli(
        "train", "--repo", small_repo, "--model", "tiny-starcoder2", "--max-steps", 2, "--seq-len", 64, "--out", out,
        "--no-staged", "--no-chunked-loss", "--no-efficient-attention",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    memory = json.loads((out / "config.json").read_text())["config"]["memory"]
    assert memory["staged"] is False and memory["loss"] == "full" and memory["attention"] == "stock"
    plan = json.loads((out / "plan.json").read_text())
    assert [plan[k]["source"] for k in ("attention", "loss", "staged")] == ["flag"] * 3
    assert (out / "COMPLETE").exists()
