"""LensNet: which working-context entries deserve more detail, and which can give theirs up.

Per entry it reads the entry's vector (its gist; a raw block is read through its L1 gist), its level, its
distance from the end and span width, plus the last few L1 gists of the tree (what is being written now), in
a small bidirectional transformer. It outputs v, the value of the entry's detail in scaled nats, and has a
learned price tau of budget; the signed utility is u = v - tau: u > 0 asks to expand, u < 0 to collapse.

Labels are counterfactual, from the frozen base: for a gist, the drop in NLL on the next H tokens when it is
expanded; for a raw block, the rise when it is collapsed to its L1 gist. Losses: robust regression of v on the
label (Huber, labels clipped), pairwise ranking within a context, budget balance of the proposed expansions
against collapses ((P - N) / (P + N))^2 (this is what sets tau), and legality (no expand request from raw
blocks, no collapse request from the top level).
"""

import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_ltc.research.megacontext import context as wc
from mlx_ltc.research.megacontext.context import Entry

__all__ = ["LABEL_SCALE", "LensNet", "huber", "counterfactual_labels", "features", "lens_loss", "train_lensnet"]

LABEL_SCALE = 20.0  # v and u are in units of 1/20 nat of mean NLL over the horizon
# The regression is robust: squared error on labels of up to 4 nats (an L2 gist expanded into 32 L1 gists)
# made the fit diverge (cycle 2 loss 6.6 -> 17.7). Labels are clipped to +-1 nat and the loss turns linear
# past 1/4 nat, so a few huge labels can't outweigh the ordering of the rest.
LABEL_CLIP = 1.0
HUBER_DELTA = 5.0  # scaled units: 1/4 nat


def huber(error: mx.array, delta: float) -> mx.array:
    """0.5 e^2 within delta, linear (slope delta) beyond."""
    a = mx.abs(error)
    return mx.where(a <= delta, 0.5 * error**2, delta * (a - 0.5 * delta))


class LensNet(nn.Module):
    def __init__(self, width: int, hidden: int = 128, layers: int = 2, heads: int = 4, tail: int = 4):
        super().__init__()
        self.tail = tail
        self.norm = nn.RMSNorm(width)
        self.inputs = nn.Linear(width, hidden)
        self.level = nn.Embedding(4, hidden)  # raw, L1, L2, and "tail gist"
        self.geometry = nn.Linear(2, hidden)
        self.encoder = nn.TransformerEncoder(layers, hidden, heads, 2 * hidden)
        self.value = nn.Linear(hidden, 1)
        self.price = mx.zeros((1,))

    def __call__(self, vectors: mx.array, levels: mx.array, geometry: mx.array) -> tuple:
        """(v, u) per row for one context: vectors (n, width), levels (n,), geometry (n, 2); rows of level 3
        are the tail gists, context for the others (their scores mean nothing)."""
        h = self.inputs(self.norm(vectors)) + self.level(levels) + self.geometry(geometry)
        v = self.value(self.encoder(h[None], None)[0])[:, 0]
        return v, v - self.price


def features(tree, entries: list, tail: int = 4) -> tuple:
    """LensNet's inputs for a context: (vectors, levels, geometry) as arrays."""
    end, block = len(tree.tokens), tree.block
    rows, levels, geometry = [], [], []
    for e in entries:
        start, stop = tree.span(max(e.level, 1), e.index)
        rows.append(tree.levels[max(e.level, 1)][e.index])
        levels.append(e.level)
        geometry.append([math.log1p((end - stop) / block) / math.log(1024), math.log(stop - start) / math.log(1024)])
    n_l1 = len(tree.levels[1])
    for k in range(max(0, n_l1 - tail), n_l1):
        rows.append(tree.levels[1][k])
        levels.append(3)
        distance = math.log1p((end - (k + 1) * block) / block) / math.log(1024)
        geometry.append([distance, math.log(block) / math.log(1024)])
    return (
        mx.array(np.stack(rows).astype(np.float32)),
        mx.array(np.array(levels, np.int32)),
        mx.array(np.array(geometry, np.float32)),
    )


def _alternative(tree, entries: list, e: Entry) -> list:
    at = entries.index(e)
    if e.level == 0:
        swap = [Entry(1, e.index)]
    elif e.level == 1:
        swap = [Entry(0, e.index)]
    else:
        swap = [Entry(1, e.index * tree.block + j) for j in range(tree.block)]
    return entries[:at] + swap + entries[at + 1 :]


def counterfactual_labels(model, tree, entries: list, target, candidates: list, gists=None) -> dict:
    """{entry: the value of its detail in nats}: NLL(coarser) - NLL(finer) of the target's mean NLL, with the
    entry expanded (a gist) or collapsed (a raw block) and everything else as it is."""
    base = float(wc.target_nll(model, tree, entries, target, gists).mean())
    labels = {}
    for e in candidates:
        other = float(wc.target_nll(model, tree, _alternative(tree, entries, e), target, gists).mean())
        labels[e] = base - other if e.level > 0 else other - base
    return labels


def lens_loss(net: LensNet, sample: dict, rank_weight=1.0, balance_weight=0.1, legality_weight=0.05) -> tuple:
    """(loss, parts) for one labelled context: sample = {vectors, levels, geometry, index (labelled entries'
    rows), labels (nats)}."""
    v, u = net(sample["vectors"], sample["levels"], sample["geometry"])
    idx, y = sample["index"], mx.clip(sample["labels"], -LABEL_CLIP, LABEL_CLIP) * LABEL_SCALE
    pred = v[idx]
    regression = huber(pred - y, HUBER_DELTA).mean()
    better = (y[:, None] - y[None, :]) > 0.1  # pairs whose labels differ by more than 1/200 nat
    pairs = mx.maximum(better.sum(), 1)
    ranking = (nn.softplus(-(pred[:, None] - pred[None, :])) * better).sum() / pairs
    levels = sample["levels"]
    gist, raw, top = (levels == 1) | (levels == 2), levels == 0, levels == 2
    p, n = (mx.maximum(u, 0) * gist).sum(), (mx.maximum(-u, 0) * raw).sum()
    balance = ((p - n) / (p + n + 1e-6)) ** 2
    legality = ((mx.maximum(u, 0) ** 2) * raw).sum() / mx.maximum(raw.sum(), 1) + (
        (mx.maximum(-u, 0) ** 2) * top
    ).sum() / mx.maximum(top.sum(), 1)
    loss = regression + rank_weight * ranking + balance_weight * balance + legality_weight * legality
    return loss, {"regression": regression, "ranking": ranking, "balance": balance, "legality": legality}


def sample_of(tree, entries: list, labels: dict, tail: int = 4) -> dict:
    vectors, levels, geometry = features(tree, entries, tail)
    labelled = [e for e in entries if e in labels]
    return {
        "vectors": vectors,
        "levels": levels,
        "geometry": geometry,
        "index": mx.array(np.array([entries.index(e) for e in labelled], np.int32)),
        "labels": mx.array(np.array([labels[e] for e in labelled], np.float32)),
    }


def train_lensnet(net: LensNet, samples: list, steps: int, lr: float = 1e-3, seed: int = 0, log=None) -> list:
    """AdamW over the labelled contexts, one per update in a shuffled order; one record per update."""
    rng = np.random.default_rng(seed)
    opt = optim.AdamW(learning_rate=lr, weight_decay=0.01)
    step = nn.value_and_grad(net, lambda net, s: lens_loss(net, s)[0])
    records = []
    for i in range(steps):
        sample = samples[rng.integers(0, len(samples))]
        loss, grads = step(net, sample)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(net, grads)
        mx.eval(net.parameters(), opt.state, loss)
        records.append({"step": i + 1, "loss": loss.item()})
        if log:
            log(records[-1])
    return records


def utilities(net: LensNet, tree, entries: list) -> np.ndarray:
    """The signed utility u of every entry (no gradient)."""
    _, u = net(*features(tree, entries, net.tail))
    return np.array(u[: len(entries)])
