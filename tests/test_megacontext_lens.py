"""LensNet: counterfactual labels from the frozen base, and the losses that train it to rank entries."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from test_megacontext_context import tree_of
from test_megacontext_positions import tiny_llama

from mlx_ltc.research.megacontext import context as wc
from mlx_ltc.research.megacontext import lens
from mlx_ltc.research.megacontext.context import Entry


def test_labels_are_the_nll_change_of_each_entrys_counterfactual():
    model = tiny_llama()
    t, tokens = tree_of(model, 2048 + 5 * 32)
    target = np.random.default_rng(3).integers(0, 101, 16).astype(np.int32)
    entries = wc.recency(t, 100)
    raw = next(e for e in entries if e.level == 0)
    gist = next(e for e in entries if e.level == 1)
    top = next(e for e in entries if e.level == 2)
    labels = lens.counterfactual_labels(model, t, entries, target, [raw, gist, top])
    nll = lambda es: wc.target_nll(model, t, es, target).mean()  # noqa: E731
    base = nll(entries)
    at = entries.index(raw)
    assert abs(labels[raw] - (nll(entries[:at] + [Entry(1, raw.index)] + entries[at + 1 :]) - base)) < 1e-9
    at = entries.index(gist)
    assert abs(labels[gist] - (base - nll(entries[:at] + [Entry(0, gist.index)] + entries[at + 1 :]))) < 1e-9
    at = entries.index(top)
    children = [Entry(1, top.index * 32 + j) for j in range(32)]
    assert abs(labels[top] - (base - nll(entries[:at] + children + entries[at + 1 :]))) < 1e-9
    assert len({round(v, 9) for v in labels.values()}) == 3  # three different counterfactuals


def synthetic_samples(n, seed=0):
    """Contexts whose labels are a known function of the entries (detail matters more near the end and for
    raw blocks), for LensNet to learn from its features."""
    model = tiny_llama()
    rng = np.random.default_rng(seed)
    samples = []
    for k in range(n):
        t, _ = tree_of(model, int(rng.integers(900, 2200)), seed=k)
        entries = wc.recency(t, int(rng.integers(150, 500)))
        end = len(t.tokens)
        labels = {
            e: 0.2 * np.exp(-(end - t.span(max(e.level, 1), e.index)[1]) / 300) + (0.05 if e.level == 0 else 0)
            for e in entries
        }
        samples.append(lens.sample_of(t, entries, labels, tail=4))
    return samples


def test_training_lensnet_learns_values_and_ranks_held_out_contexts():
    mx.random.seed(0)
    net = lens.LensNet(width=64, hidden=32, layers=1, heads=4)
    train, held = synthetic_samples(12), synthetic_samples(4, seed=100)

    def evaluate():
        parts = [lens.lens_loss(net, s)[1] for s in held]
        concordant = []
        for s in held:
            v, _ = net(s["vectors"], s["levels"], s["geometry"])
            pred, y = np.array(v[s["index"]]), np.array(s["labels"])
            i, j = np.triu_indices(len(y), 1)
            keep = np.abs(y[i] - y[j]) > 0.01  # pairs that differ by 1/100 nat or more
            concordant.append(np.mean(np.sign(pred[i] - pred[j])[keep] == np.sign(y[i] - y[j])[keep]))
        return np.mean([p["regression"].item() for p in parts]), np.mean(concordant)

    reg0, rank0 = evaluate()
    records = lens.train_lensnet(net, train, steps=300, lr=3e-3)
    reg1, rank1 = evaluate()
    assert all(np.isfinite(r["loss"]) for r in records)
    assert reg1 < 0.3 * reg0 and rank1 > 0.75 > rank0, (reg0, reg1, rank0, rank1)  # chance: 0.5


def test_legality_and_balance_terms_penalise_what_they_should():
    net = lens.LensNet(width=64, hidden=32, layers=1, heads=4)
    s = synthetic_samples(1)[0]
    levels = np.array(s["levels"])
    raw = levels == 0
    net.value.weight = mx.zeros_like(net.value.weight)
    net.value.bias = mx.array([0.0])
    net.price = mx.array([-1.0])  # u = +1 everywhere: raw blocks "ask to expand" (illegal), nothing collapses
    parts = lens.lens_loss(net, s)[1]
    assert parts["legality"].item() > 0.99 and parts["balance"].item() > 0.99
    net.price = mx.array([1.0])  # u = -1: only collapse requests; legal for raw, illegal for L2
    parts = lens.lens_loss(net, s)[1]
    assert parts["balance"].item() > 0.99 and (parts["legality"].item() > 0.99) == bool((levels == 2).any())
    assert raw.any()


def test_the_regression_is_robust_to_huge_labels():
    """Labels of 4 nats (an L2 gist expanded into 32 L1 gists) made the squared-error fit diverge: they are
    clipped to 1 nat and the loss turns linear past 1/4 nat."""
    assert lens.huber(mx.array(2.0), 5.0).item() == 2.0 and lens.huber(mx.array(-9.0), 5.0).item() == 32.5
    mx.random.seed(0)
    net = lens.LensNet(width=64, hidden=32, layers=1, heads=4)
    s = synthetic_samples(1)[0]
    huge = {**s, "labels": s["labels"].at[:3].add(4.0)}
    clipped = {**s, "labels": mx.clip(huge["labels"], -1.0, 1.0)}
    assert lens.lens_loss(net, huge)[1]["regression"].item() == lens.lens_loss(net, clipped)[1]["regression"].item()
    grads = nn.value_and_grad(net, lambda net: lens.lens_loss(net, huge)[1]["regression"])(net)[1]
    norm = sum((g**2).sum().item() for _, g in tree_flatten(grads)) ** 0.5
    square = nn.value_and_grad(net, lambda net: ((net(*[huge[k] for k in ("vectors", "levels", "geometry")])[0][
        huge["index"]] - huge["labels"] * lens.LABEL_SCALE) ** 2).mean())(net)[1]  # fmt: skip
    assert norm < 0.1 * sum((g**2).sum().item() for _, g in tree_flatten(square)) ** 0.5
    samples = synthetic_samples(6)
    samples = [{**x, "labels": x["labels"].at[:2].add(4.0)} for x in samples]  # the labels that diverged
    records = lens.train_lensnet(net, samples, steps=150, lr=3e-3)
    first, last = np.mean([r["loss"] for r in records[:15]]), np.mean([r["loss"] for r in records[-15:]])
    assert np.isfinite(last) and last < first, (first, last)
