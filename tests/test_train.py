import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_ltc import models, progress
from mlx_ltc.config import Config, LoraConfig, TrainConfig, merge
from mlx_ltc.data import Split
from mlx_ltc.errors import UserError
from mlx_ltc.train import phases
from mlx_ltc.train.batches import batches
from mlx_ltc.train.lora import apply_lora, lora_keys, save_adapters
from mlx_ltc.train.update import accumulate_gradients, enable_grad_checkpoint
from mlx_ltc.numerics.loss import nll_sum
from mlx_ltc.train.trainer import Trainer


def fresh_tiny(tiny_dir, lora=True, **lora_kw):
    loaded = models.load(tiny_dir, dequantize="always")
    if lora:
        loaded.adapter_config = apply_lora(loaded.model, LoraConfig(**lora_kw))
    return loaded


def random_windows(n, length, seed=0, short_last=None):
    rng = np.random.default_rng(seed)
    rows = [rng.integers(100, 40000, length, dtype=np.int32) for _ in range(n)]
    if short_last:
        rows[-1] = rows[-1][:short_last]
    return Split.from_rows(rows)


def run_training(model, split, run_dir, val=None, n_phases=1, progress=False, **train_kw):
    """The product's loop on a bare split: no early stop, evals on `val` (default: the split)."""
    cfg = merge(
        Config(train=TrainConfig(**train_kw)),
        {
            "data": {"seq_len": split.tokens.shape[1]},
            "curriculum": {"phases": n_phases},
            "orchestrator": {"converge_tol": 0.0},
        },
    )
    trainer = Trainer(model, split, val or split, cfg, run_dir, log=lambda msg: None, progress=progress)
    trainer.start(phases.total_steps(cfg, len(split)))
    return trainer.run()


def test_padding_never_counts(tiny_dir):
    model = fresh_tiny(tiny_dir, lora=False).model
    row = mx.array(np.arange(100, 120, dtype=np.int32))
    padded = mx.concatenate([row, mx.zeros(12, dtype=mx.int32)])[None]
    s1, n1 = nll_sum(model, row[None], mx.array([20]))
    s2, n2 = nll_sum(model, padded, mx.array([20]))
    assert n1.item() == n2.item() == 19
    assert abs(s1.item() - s2.item()) < 1e-4


def test_lora_targets_attention_and_mlp_by_architecture(tiny_dir, smollm2_dir):
    tiny = models.load(tiny_dir, dequantize="always").model
    assert lora_keys(tiny, LoraConfig()) == [
        "mlp.c_fc",
        "mlp.c_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]
    smol = models.load(smollm2_dir, dequantize="never").model
    assert lora_keys(smol, LoraConfig(targets=["self_attn.q_proj", "mlp"])) == [
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "self_attn.q_proj",
    ]
    with pytest.raises(UserError, match="match no linear layer"):
        lora_keys(tiny, LoraConfig(targets=["attention"]))


def test_fresh_lora_is_the_base_model_and_only_lora_trains(tiny_dir):
    ids = mx.array([[5, 600, 7000, 80, 9]])
    base = fresh_tiny(tiny_dir, lora=False).model(ids)
    loaded = fresh_tiny(tiny_dir, rank=4)
    assert mx.array_equal(base, loaded.model(ids))
    names = [k for k, _ in tree_flatten(loaded.model.trainable_parameters())]
    assert names and all(k.endswith(("lora_a", "lora_b")) for k in names)
    assert len(names) == 2 * 6 * 2  # 2 matrices x 6 targets x 2 layers


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    lr = phases.lr_schedule(cfg, total_steps=20)
    values = [lr(s) for s in range(20)]
    assert values[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert values[4] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert values[-1] == pytest.approx(1e-4)


def test_loss_weights_scale_each_target(tiny_dir):
    """A document weighted 3x counts three times in the weighted mean; weight 0 drops a target."""
    model = fresh_tiny(tiny_dir, lora=False).model
    tokens = mx.array(np.arange(100, 120, dtype=np.int32))[None]
    per_target = nll_sum(model, tokens, mx.ones((1, 19)))[0]
    w = np.ones((1, 19), dtype=np.float32)
    w[0, :5], w[0, 5:8] = 3.0, 0.0
    s, n = nll_sum(model, tokens, mx.array(w))
    logits = model(tokens[:, :-1]).astype(mx.float32)
    nll = nn_cross_entropy(logits, tokens[:, 1:])[0]
    assert n.item() == 3 * 5 + 11
    assert abs(s.item() - (3 * nll[:5].sum() + nll[8:].sum()).item()) < 1e-3
    assert abs(per_target.item() - nll.sum().item()) < 1e-3


def nn_cross_entropy(logits, targets):
    import mlx.nn as nn

    return nn.losses.cross_entropy(logits, targets)


def test_accumulation_is_token_weighted_like_one_big_batch(tiny_dir):
    import mlx.nn as nn

    windows = random_windows(2, 33, short_last=9)  # unequal token counts per micro-batch
    loaded = fresh_tiny(tiny_dir, rank=4)
    loss_and_grad = nn.value_and_grad(loaded.model, nll_sum)
    one, s1, n1, t1 = accumulate_gradients(loss_and_grad, loaded.model, batches(windows, 2))
    two, s2, n2, t2 = accumulate_gradients(loss_and_grad, loaded.model, batches(windows, 1))
    assert n1.item() == n2.item() == t1 == t2 == 32 + 8
    assert abs(s1.item() - s2.item()) < 1e-3
    one, two = dict(tree_flatten(one)), dict(tree_flatten(two))
    assert any(mx.abs(v).max().item() > 1e-6 for v in one.values())  # a comparison of zeros proves nothing
    for k in one:
        assert np.allclose(one[k], two[k], rtol=1e-4, atol=1e-7), k


def test_grad_checkpoint_gives_the_same_gradients(tiny_dir):
    import mlx.nn as nn

    tokens, lengths = mx.array(random_windows(1, 40).tokens[:1]), mx.array([40])
    grads = []
    for ckpt in (False, True):
        loaded = fresh_tiny(tiny_dir, rank=4)
        mx.random.seed(1)  # non-zero B, so gradients reach A as well
        b_values = [
            (k, mx.random.normal(v.shape) * 0.1)
            for k, v in tree_flatten(loaded.model.trainable_parameters())
            if k.endswith("lora_b")
        ]
        loaded.model.load_weights(b_values, strict=False)
        if ckpt:
            enable_grad_checkpoint(loaded.model)
        (_, _), g = nn.value_and_grad(loaded.model, nll_sum)(loaded.model, tokens, lengths)
        grads.append(dict(tree_flatten(g)))
    assert any(mx.abs(v).max().item() > 0 for k, v in grads[0].items() if k.endswith("lora_a"))
    for k in grads[0]:
        assert np.allclose(grads[0][k], grads[1][k], atol=1e-5), k


@pytest.mark.slow
def test_training_lowers_loss_and_logs_every_step(tiny_dir, tmp_path):
    windows = random_windows(2, 65)
    loaded = fresh_tiny(tiny_dir, rank=8, scale=4.0)
    before = sum(nll_sum(loaded.model, mx.array(r)[None], mx.array([65]))[0].item() for r in windows.tokens)
    result = run_training(loaded.model, windows, tmp_path, max_steps=30, batch_size=2, lr=3e-3, warmup_steps=2)
    after = sum(nll_sum(loaded.model, mx.array(r)[None], mx.array([65]))[0].item() for r in windows.tokens)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gb"} <= r.keys() for r in rows)
    assert result.steps == 30 and result.tokens == 30 * 128
    assert after < 0.8 * before


def test_training_progress_reaches_a_log_file(tiny_dir, tmp_path, monkeypatch, capsys):
    """Output to a file, not a terminal: the log still shows the step, the phase and the loss."""
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    loaded = fresh_tiny(tiny_dir, rank=8)
    run_training(loaded.model, random_windows(2, 65), tmp_path, max_steps=4, batch_size=2, progress=True)
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.startswith("train:")]
    assert all(any(f"| {k}/4 [" in line for line in lines) for k in range(1, 5)), lines  # every step, not just the end
    assert "phase=1" in lines[-1] and "loss=" in lines[-1], lines
    assert any(line.startswith("train (validating):") for line in err), err  # the evaluations say what they are


def test_adapters_load_in_mlx_lm_and_reproduce_our_outputs(tiny_dir, tmp_path):
    from mlx_lm.utils import load

    loaded = fresh_tiny(tiny_dir, rank=4)
    run_training(loaded.model, random_windows(2, 33), tmp_path, max_steps=3, lr=1e-2)
    save_adapters(loaded.model, tmp_path / "adapters", loaded.adapter_config)
    theirs, _ = load(str(tiny_dir), adapter_path=str(tmp_path / "adapters"))
    ids = mx.array([[5, 600, 7000, 80, 9, 10, 11]])
    ours_out, theirs_out = loaded.model(ids), theirs(ids)
    assert mx.abs(ours_out - theirs_out).max().item() < 1e-3
    base = fresh_tiny(tiny_dir, lora=False).model(ids)
    assert mx.abs(ours_out - base).max().item() > 1e-3  # the adapter is not a no-op
