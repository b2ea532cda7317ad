"""Explicit per-token positions through a wrapped mlx-lm model (the working context's feed)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama

from mlx_ltc.research.megacontext.positions import forward_at, positioned_rope


def tiny_llama():
    mx.random.seed(0)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=101,
                           rope_theta=100000.0, tie_word_embeddings=True)  # fmt: skip
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def test_consecutive_positions_give_the_models_own_logits():
    model = tiny_llama()
    tokens = mx.array(np.random.default_rng(0).integers(0, 101, (2, 40)).astype(np.int32))
    want = model(tokens)
    got = forward_at(model, model.model.embed_tokens(tokens), mx.arange(40))
    assert mx.abs(got - want).max().item() < 1e-5
    # RoPE is relative: shifting every position leaves the logits alone
    shifted = forward_at(model, model.model.embed_tokens(tokens), mx.arange(40) + 1000)
    assert mx.abs(shifted - want).max().item() < 1e-3
    # a gap is not a shift
    gapped = forward_at(model, model.model.embed_tokens(tokens), mx.concatenate([mx.arange(20), mx.arange(20) + 500]))
    assert mx.abs(gapped[:, :20] - want[:, :20]).max().item() < 1e-5
    assert mx.abs(gapped[:, 20:] - want[:, 20:]).max().item() > 1e-2
    assert mx.abs(model(tokens) - want).max().item() == 0  # positions are cleared afterwards


def test_half_token_positions_rotate_like_the_formula():
    rope = positioned_rope(nn.RoPE(16, base=10000.0))
    x = mx.array(np.random.default_rng(1).normal(size=(1, 2, 5, 16)).astype(np.float32))
    positions = np.array([0.0, 3.5, 15.5, 47.5, 1000.0])
    rope.positions = mx.array(positions)
    got = np.array(rope(x))
    freqs = 10000.0 ** (-np.arange(0, 16, 2) / 16)
    theta = positions[:, None] * freqs[None, :]
    a, b = np.array(x)[..., :8], np.array(x)[..., 8:]
    want = np.concatenate([a * np.cos(theta) - b * np.sin(theta), a * np.sin(theta) + b * np.cos(theta)], -1)
    np.testing.assert_allclose(got, want, atol=2e-4)
