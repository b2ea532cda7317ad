"""GistNet starts at the last-input floor, sees the whole block, and learns."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_ltc.research.megacontext.gistnet import GistConfig, GistNet, compressor
from mlx_ltc.research.megacontext.tree import GistTree, last_input, mean_gist


def net_and_table(pick: float = 8.0):
    mx.random.seed(0)
    net = GistNet(GistConfig(width=24, hidden=32, layers=1, heads=4, pick=pick))
    table = nn.Embedding(50, 24)
    mx.eval(net.parameters(), table.parameters())
    return net, table


def test_an_untrained_gistnet_is_the_last_input_floor():
    tokens = np.random.default_rng(0).integers(0, 50, 32 * 40).astype(np.int32)
    trees = {name: GistTree(width=24, model_id="t") for name in ("net", "sharp", "last", "mean", "untrained_l2")}
    net, table = net_and_table()
    trees["net"].append(tokens, compressor(net, table))
    trees["sharp"].append(tokens, compressor(net_and_table(pick=30.0)[0], table))
    trees["last"].append(tokens, last_input(np.array(table.weight)))
    trees["mean"].append(tokens, mean_gist(np.array(table.weight)))
    trees["untrained_l2"].append(tokens, compressor(net, table, trained_levels=(1,)))
    for a, b in zip(trees["sharp"].levels[1:], trees["last"].levels[1:]):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert trees["last"].levels[2].shape == (1, 24)
    np.testing.assert_allclose(trees["untrained_l2"].levels[2][0], trees["net"].levels[1][31], atol=1e-6)
    # the default pick puts 0.99 of the weight on the last input: near it, far from the mean
    near = np.linalg.norm(trees["net"].levels[1] - trees["last"].levels[1], axis=1)
    far = np.linalg.norm(trees["mean"].levels[1] - trees["last"].levels[1], axis=1)
    assert near.max() < 0.05 * far.min()


def test_training_moves_gists_toward_a_target_that_needs_the_whole_block():
    """Target: the first input minus the second (neither the floor nor mean pooling can express it)."""
    net, _ = net_and_table()
    x = mx.array(np.random.default_rng(1).normal(size=(64, 32, 24)).astype(np.float32))
    target = x[:, 0] - x[:, 1]

    def loss_fn(model):
        return ((model(x, 1) - target) ** 2).mean()

    opt = optim.Adam(learning_rate=3e-3)
    step = nn.value_and_grad(net, loss_fn)
    first = loss_fn(net).item()
    for _ in range(150):
        loss, grads = step(net)
        opt.update(net, grads)
        mx.eval(net.parameters(), opt.state)
    assert loss.item() < 0.3 * first, (first, loss.item())
    # bidirectional: the first slot's encoding depends on the last slot's input (no causal mask)

    def first_slot(inputs):
        return net.encoder(net.inputs(inputs) + net.slot.weight + net.level.weight[0], None)[:, 0]

    assert mx.abs(first_slot(x.at[:, -1].add(1.0)) - first_slot(x)).max().item() > 1e-3


def test_a_gist_cannot_outgrow_its_inputs():
    """The norm cap: however far training pushes the correction, a gist stays within max_norm x the inputs'
    mean norm (the uncapped net collapsed into one huge input-independent vector)."""
    net, _ = net_and_table()
    net.correction.bias = mx.full(net.correction.bias.shape, 100.0)
    x = mx.array(np.random.default_rng(2).normal(size=(8, 32, 24)).astype(np.float32))
    out = net(x, 1)
    cap = net.config.max_norm * mx.linalg.norm(x, axis=-1).mean(axis=-1)
    assert mx.all(mx.linalg.norm(out, axis=-1) <= cap * (1 + 1e-5)).item()
    net.config.max_norm = 0
    assert mx.all(mx.linalg.norm(net(x, 1), axis=-1) > 10 * cap).item()
