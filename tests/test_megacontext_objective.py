"""GistNet's substitution loss against a frozen base (a tiny llama here)."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from test_megacontext_positions import tiny_llama

from mlx_ltc.research.megacontext.gistnet import GistConfig, GistNet
from mlx_ltc.research.megacontext.objective import substitution_loss, teacher_logprobs
from mlx_ltc.research.megacontext.train import train_gistnet


def setup(seed=0):
    model = tiny_llama()
    model.freeze()
    mx.random.seed(seed)
    net = GistNet(GistConfig(width=64, hidden=32, layers=1, heads=4))
    mx.eval(net.parameters())
    tokens = mx.array(np.random.default_rng(seed).integers(0, 101, (3, 4 * 32 + 16)).astype(np.int32))
    return model, net, tokens, teacher_logprobs(model, tokens, 16)


def test_nothing_gisted_is_the_teacher():
    model, net, tokens, teacher = setup()
    loss, kl, extra, _ = substitution_loss(net, model, tokens, teacher, keep=4)
    assert abs(kl.item()) < 1e-5 and abs(extra.item()) < 1e-4


def test_gisting_costs_something_and_training_gistnet_reduces_it():
    model, net, tokens, teacher = setup()
    loss_fn = lambda net: substitution_loss(net, model, tokens, teacher, keep=1)[0]  # noqa: E731
    start = loss_fn(net).item()
    _, kl, _, _ = substitution_loss(net, model, tokens, teacher, keep=1)
    assert kl.item() > 1e-3
    step, opt = nn.value_and_grad(net, loss_fn), optim.Adam(learning_rate=3e-3)
    for _ in range(40):
        loss, grads = step(net)
        opt.update(net, grads)
        mx.eval(net.parameters(), opt.state)
    assert loss.item() < 0.7 * start, (start, loss.item())
    assert all(not np.any(np.isnan(np.array(p))) for _, p in nn.utils.tree_flatten(model.parameters()))


def test_train_gistnet_lowers_the_substitution_loss_on_held_out_windows():
    model, net, _, _ = setup(seed=1)
    rng = np.random.default_rng(2)
    files = [rng.integers(0, 101, 600).astype(np.int32) for _ in range(4)]
    held = mx.array(np.stack([f[:144] for f in files[:3]]))
    teacher = teacher_logprobs(model, held, 16)
    before = substitution_loss(net, model, held, teacher, keep=1)[0].item()
    records = train_gistnet(net, model, files, steps=30, blocks=4, keep=1, horizon=16, batch=4, lr=3e-3)
    assert [r["step"] for r in records] == list(range(1, 31)) and all(np.isfinite(r["loss"]) for r in records)
    assert substitution_loss(net, model, held, teacher, keep=1)[0].item() < before
    with pytest.raises(ValueError, match="no training file holds"):
        train_gistnet(net, model, [files[0][:100]], steps=1, blocks=4, horizon=16)


def test_the_contrast_term_measures_how_much_a_sample_needs_its_own_gists():
    model, net, tokens, teacher = setup()
    loss0, kl, extra, gap0 = substitution_loss(net, model, tokens, teacher, keep=1)
    loss, kl2, extra2, gap = substitution_loss(net, model, tokens, teacher, keep=1, contrast=1.0, margin=0.05)
    assert gap0.item() == 0.0 and abs(kl.item() - kl2.item()) < 1e-6
    assert gap.item() != 0.0  # different random blocks' gists are different contexts
    assert abs(loss.item() - (loss0.item() + max(0.05 - gap.item(), 0.0))) < 1e-5


def test_level_2_replaces_32_blocks_by_one_gist_of_gists_at_its_span_centre():
    from mlx_ltc.research.megacontext.objective import _log_softmax
    from mlx_ltc.research.megacontext.positions import forward_at

    model = tiny_llama()
    model.freeze()
    mx.random.seed(0)
    net = GistNet(GistConfig(width=64, hidden=32, layers=1, heads=4, pick=30.0))
    mx.eval(net.parameters())
    tokens = mx.array(np.random.default_rng(4).integers(0, 101, (2, 33 * 32 + 16)).astype(np.int32))
    teacher = teacher_logprobs(model, tokens, 16)
    loss, kl, extra, _ = substitution_loss(net, model, tokens, teacher, keep=1, level=2)
    raw = model.model.embed_tokens(tokens)
    inputs = mx.concatenate([raw[:, 1023:1024], raw[:, 1024:-1]], axis=1)  # untrained: the last input's last input
    positions = mx.array(np.concatenate([[511.5], np.arange(1024, tokens.shape[1] - 1)]).astype(np.float32))
    student = _log_softmax(forward_at(model, inputs, positions)[:, -16:])
    want = (mx.exp(teacher) * (teacher - student)).sum(axis=-1).mean()
    assert abs(kl.item() - want.item()) < 1e-4 and kl.item() > 1e-3
    with pytest.raises(ValueError, match="multiple of 32"):
        substitution_loss(net, model, tokens[:, 32:], teacher, keep=1, level=2)
    step = nn.value_and_grad(net, lambda n: substitution_loss(n, model, tokens, teacher, 1, level=2)[0])
    opt = optim.Adam(learning_rate=3e-3)
    for _ in range(15):
        trained, grads = step(net)
        opt.update(net, grads)
        mx.eval(net.parameters(), opt.state)
    assert trained.item() < loss.item()
