"""The base-LoRA gist encoder and its objectives (autoencoding, continuation), on a tiny llama."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_megacontext_positions import tiny_llama

from mlx_ltc.config import LoraConfig
from mlx_ltc.research.megacontext import evaluate as ev
from mlx_ltc.research.megacontext.encoder import EncoderConfig, LoraEncoder, encoder_compressor
from mlx_ltc.research.megacontext.gistnet import GistConfig, GistNet
from mlx_ltc.research.megacontext.objective import (
    autoencoding,
    continuation,
    rebuild,
    substitution_loss,
    teacher_logprobs,
)
from mlx_ltc.research.megacontext.train import EncoderWeights, _Joint, encoder_loss, train_encoder
from mlx_ltc.research.megacontext.tree import last_input
from mlx_ltc.train.lora import adapters_off, apply_lora


def encoder_and_reader(slots=1, reading=True):
    reader = tiny_llama()
    reader.freeze()
    if reading:
        apply_lora(reader, LoraConfig(rank=4, targets=["self_attn"], layers=2))
    base = tiny_llama()
    apply_lora(base, LoraConfig(rank=8, targets=["self_attn", "mlp"], layers=-1), seed=1)
    encoder = LoraEncoder(base, EncoderConfig(slots=slots))
    mx.eval(encoder.parameters())
    return encoder, reader


def blocks_of(seed, n=6):
    return mx.array(np.random.default_rng(seed).integers(0, 101, (n, 32)).astype(np.int32))


def test_a_gist_is_the_memory_slots_final_state_projected_and_norm_matched():
    encoder, reader = encoder_and_reader(slots=2)
    blocks = blocks_of(0)
    x = reader.model.embed_tokens(blocks).astype(mx.float32)
    gists = encoder(x, 1)
    assert gists.shape == (6, 2, 64)
    want_norm = mx.linalg.norm(x, axis=-1).mean(axis=-1)
    assert mx.allclose(mx.linalg.norm(gists, axis=-1), want_norm[:, None], rtol=1e-5).item()
    memory = mx.broadcast_to(encoder.memory[0][None], (6, 2, 64))
    hidden = encoder.base.model(None, input_embeddings=mx.concatenate([x, memory], axis=1))[:, -2:]
    unit = lambda v: v / mx.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    assert mx.allclose(unit(gists), unit(hidden), atol=1e-5).item()  # the projection starts at the identity
    # a block's gist reads its own block only, and level 2 has its own memory embeddings
    other = x.at[1:].add(1.0)
    assert mx.allclose(encoder(other, 1)[0], gists[0], atol=1e-5).item()
    assert not mx.allclose(encoder(x, 2), gists, atol=1e-3).item()


def test_the_encoders_lora_is_on_its_own_instance_and_joint_training_moves_only_what_it_should():
    encoder, reader = encoder_and_reader()
    frozen = {k: np.array(v) for k, v in tree_flatten(reader.parameters()) if "lora" not in k}
    tokens = blocks_of(1, 4).reshape(2, 64)
    before = np.array(reader(tokens))
    joint = _Joint(encoder, reader)
    names = {k for k, _ in tree_flatten(joint.trainable_parameters())}
    assert any(k.startswith("encoder.base.") and "lora_a" in k for k in names)
    assert {"encoder.memory", "encoder.marker", "encoder.project.weight"} <= names
    assert any(k.startswith("reader.") and "lora_b" in k for k in names)  # the reading LoRA trains jointly
    assert not any(k.startswith("reader.") and "lora" not in k for k in names)
    without = _Joint(*encoder_and_reader(reading=False)).trainable_parameters()
    assert all(k.startswith("encoder.") for k, _ in tree_flatten(without))  # a frozen reader trains nothing
    train_encoder(encoder, reader, [np.array(tokens).reshape(-1)] * 2, steps=3, autoencode_steps=1, blocks=1,
                  keep=0, horizon=32, batch=2, lr=1e-2)  # fmt: skip
    after = {k: np.array(v) for k, v in tree_flatten(reader.parameters()) if "lora" not in k}
    assert all(np.array_equal(frozen[k], after[k]) for k in frozen)
    assert not np.allclose(np.array(reader(tokens)), before)  # the reading LoRA moved
    with adapters_off(reader):  # the teacher: the reader with its adapters off is the untouched base
        assert np.allclose(np.array(reader(tokens)), before, atol=1e-5)


def test_rebuild_scores_tokens_by_teacher_forcing_and_autoencoding_training_lowers_it():
    encoder, reader = encoder_and_reader()
    blocks = blocks_of(2, 4)
    x = reader.model.embed_tokens(blocks).astype(mx.float32)
    nll, hits = rebuild(reader, encoder(x, 1), blocks, encoder.marker)
    assert nll.shape == hits.shape == (4, 32)
    mean_nll, accuracy = autoencoding(reader, encoder(x, 1), blocks, encoder.marker)
    assert abs(mean_nll.item() - nll.mean().item()) < 1e-6 and accuracy.item() == hits.astype(mx.float32).mean().item()
    # no gist: the decoder on [marker, block[:-1]] alone
    none_nll, _ = rebuild(reader, mx.zeros((4, 0, 64)), blocks, encoder.marker)
    inputs = mx.concatenate([mx.broadcast_to(encoder.marker, (4, 1, 64)), x[:, :-1]], axis=1)
    logits = reader(None, input_embeddings=inputs)
    want = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, blocks[..., None], axis=-1)[..., 0]
    assert mx.allclose(none_nll, want, atol=1e-4).item()

    files = [np.array(blocks).reshape(-1)]
    records = train_encoder(encoder, reader, files, steps=40, autoencode_steps=40, blocks=4, keep=0, horizon=0,
                            batch=1, lr=1e-2)  # fmt: skip
    assert all(set(r) >= {"ae_nll", "ae_acc", "grad_norm"} and "kl" not in r for r in records)
    assert records[-1]["ae_nll"] < 0.7 * records[0]["ae_nll"], (records[0], records[-1])  # fits 4 blocks


def test_continuation_with_one_slot_is_gistnets_substitution_loss():
    model = tiny_llama()
    model.freeze()
    mx.random.seed(0)
    net = GistNet(GistConfig(width=64, hidden=32, layers=1, heads=4))
    tokens = mx.array(np.random.default_rng(3).integers(0, 101, (2, 4 * 32 + 16)).astype(np.int32))
    teacher = teacher_logprobs(model, tokens, 16)
    loss, kl, extra, gap = substitution_loss(net, model, tokens, teacher, keep=1, contrast=1.0)
    raw = model.model.embed_tokens(tokens).astype(mx.float32)
    gists = net(raw[:, :96].reshape(6, 32, 64), 1).reshape(2, 3, 1, 64)
    kl2, extra2, gap2, hinge = continuation(model, gists, raw, tokens, teacher, 32, contrast=1.0)
    assert abs(kl.item() - kl2.item()) < 1e-6 and abs(extra.item() - extra2.item()) < 1e-6
    assert abs(gap.item() - gap2.item()) < 1e-6
    assert abs(loss.item() - (kl2 + extra2 + hinge).item()) < 1e-5


def test_two_slots_per_block_run_through_both_objectives_and_working_contexts_refuse_them():
    encoder, reader = encoder_and_reader(slots=2, reading=False)
    tokens = blocks_of(4, 3).reshape(1, 96)
    teacher = teacher_logprobs(reader, tokens, 16)
    loss, parts = encoder_loss(_Joint(encoder, reader), tokens, teacher, keep=0, weights=EncoderWeights())
    assert np.isfinite(loss.item()) and parts["kl"].item() >= -1e-6
    with pytest.raises(ValueError, match="one gist per block"):
        encoder_compressor(encoder, reader.model.embed_tokens)


def test_the_compressor_gists_a_tree_in_batches_like_one_block_at_a_time():
    encoder, reader = encoder_and_reader()
    gist = encoder_compressor(encoder, reader.model.embed_tokens, trained_levels=(1,))
    history = np.random.default_rng(5).integers(0, 101, 1024 + 3 * 32 + 7).astype(np.int32)
    batched = ev.build_tree(history, 64, gist)
    single = ev.build_tree(history, 64, lambda level, inputs: gist(level, inputs))  # no `many`: block by block
    assert batched.levels[1].shape == (35, 64) and batched.levels[2].shape == (1, 64)
    assert np.allclose(batched.levels[1], single.levels[1], atol=1e-5)
    assert np.array_equal(batched.levels[2][0], batched.levels[1][31])  # an untrained L2 is its last L1 gist


def test_reconstruction_reports_each_gist_condition_and_the_controls():
    encoder, reader = encoder_and_reader()
    table = np.array(reader.model.embed_tokens.weight)
    gists = {"last_input": last_input(table), "gist_lora": encoder_compressor(encoder, reader.model.embed_tokens)}
    history = np.random.default_rng(6).integers(0, 101, 20 * 32).astype(np.int32)
    out = ev.reconstruction(reader, history, gists, encoder.marker, blocks=8)
    assert set(out) == {"last_input", "gist_lora", "shuffled", "no_gist"}
    assert ev.reconstruction(reader, history[:31], gists, encoder.marker) == {}  # no whole block
    assert all(0.0 <= v <= 1.0 for v in out.values())
    # the measure against a direct count: 8 blocks spread over the history, each read from its last token
    rows = np.stack([history[32 * i : 32 * (i + 1)] for i in np.unique(np.linspace(0, 19, 8).round().astype(int))])
    vec = mx.array(np.stack([table[r[-1]] for r in rows]))[:, None]
    hits = rebuild(reader, vec, mx.array(rows), encoder.marker)[1]
    assert abs(out["last_input"] - hits.astype(mx.float32).mean().item()) < 1e-6
