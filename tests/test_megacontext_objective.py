"""GistNet's substitution loss against a frozen base (a tiny llama here)."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from test_megacontext_positions import tiny_llama

from mlx_ltc.megacontext.gistnet import GistConfig, GistNet
from mlx_ltc.megacontext.objective import substitution_loss, teacher_logprobs


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
    loss, kl, extra = substitution_loss(net, model, tokens, teacher, keep=4)
    assert abs(kl.item()) < 1e-5 and abs(extra.item()) < 1e-4


def test_gisting_costs_something_and_training_gistnet_reduces_it():
    model, net, tokens, teacher = setup()
    loss_fn = lambda net: substitution_loss(net, model, tokens, teacher, keep=1)[0]  # noqa: E731
    start = loss_fn(net).item()
    _, kl, _ = substitution_loss(net, model, tokens, teacher, keep=1)
    assert kl.item() > 1e-3
    step, opt = nn.value_and_grad(net, loss_fn), optim.Adam(learning_rate=3e-3)
    for _ in range(40):
        loss, grads = step(net)
        opt.update(net, grads)
        mx.eval(net.parameters(), opt.state)
    assert loss.item() < 0.7 * start, (start, loss.item())
    assert all(not np.any(np.isnan(np.array(p))) for _, p in nn.utils.tree_flatten(model.parameters()))
