"""The base eval runs after training with the adapters switched off (so the first training step is not
held back by a pass over the validation split): its numbers must be the base model's, on either backend."""

import math

import numpy as np
import pytest

from mlx_ltc import backend
from mlx_ltc.config import Config, LoraConfig, TrainConfig, merge
from mlx_ltc.data import Split


def windows(n, length, seed):
    rng = np.random.default_rng(seed)
    return Split.from_rows([rng.integers(100, 40000, length, dtype=np.int32) for _ in range(n)])


def close(a, b, rel=1e-5):
    return math.isclose(a, b, rel_tol=rel)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_adapters_off_after_training_gives_the_base_models_perplexity(name, tiny_dir, tmp_path):
    if name == "torch":
        pytest.importorskip("torch")
    seq_len = 48
    cfg = merge(
        Config(
            train=TrainConfig(max_steps=2, batch_size=2, lr=1e-2, warmup_steps=0, eval_batch_size=2, backend=name),
            lora=LoraConfig(rank=4),
        ),
        {"data": {"seq_len": seq_len}, "curriculum": {"phases": 1}, "orchestrator": {"converge_tol": 0.0}},
    )
    compute_with = backend.get(name)
    loaded = compute_with.load(tiny_dir, cfg, lambda msg: None)
    compute_with.prepare(loaded, cfg)
    train, val = windows(6, seq_len, 0), windows(4, seq_len, 1)
    model = loaded.model
    before = compute_with.perplexity(model, val, 2, "eval base", False)  # as runs measured it, before LoRA

    compute_with.apply_lora(model, cfg)
    compute_with.train(model, train, val, cfg, tmp_path, False)
    adapted = compute_with.perplexity(model, val, 2, "eval adapted", False)
    with compute_with.adapters_off(model):
        after = compute_with.perplexity(model, val, 2, "eval base", False)
    again = compute_with.perplexity(model, val, 2, "eval adapted", False)

    assert not close(adapted.loss, before.loss, 1e-4)  # training moved the adapters
    assert close(after.loss, before.loss) and close(after.ppl, before.ppl) and after.tokens == before.tokens
    for kind in ("file", "chain"):
        b, a = before.of(kind), after.of(kind)
        assert a[1] == b[1] and (b[0] is None or close(a[0], b[0]))
    assert again.loss == adapted.loss  # the adapters are back on after the block
