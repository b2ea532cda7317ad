"""Run on every rank of `mlx.launch -n 2 --backend ring`: compares distributed gradients with one process's.

Every rank builds the same tiny model (seeded), so each can compute the one-process result locally and
compare it with the ranks' summed one. Prints one JSON line per rank: {"rank", "size", "results": [...]}
with, per case, the largest relative differences of the loss and the LoRA gradients.
"""

import json
import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_ltc.config import LoraConfig, MemoryConfig, TrainConfig
from mlx_ltc.distributed import World, world
from mlx_ltc.train.engine import StagedStep
from mlx_ltc.train.lora import apply_lora
from mlx_ltc.train.update import Updater, share

VOCAB = 97


def tiny_model(kind: str):
    common = dict(
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        rope_theta=10000.0,
    )
    mx.random.seed(1234)
    if kind == "starcoder2":
        from mlx_lm.models import starcoder2 as module

        args = module.ModelArgs(model_type="starcoder2", norm_epsilon=1e-5, tie_word_embeddings=True, **common)
    else:
        from mlx_lm.models import llama as module

        args = module.ModelArgs(model_type="llama", rms_norm_eps=1e-5, tie_word_embeddings=False, **common)
    model = module.Model(args)
    mx.eval(model.parameters())
    apply_lora(model, LoraConfig(rank=4), seed=0)
    rng = np.random.default_rng(7)
    trainable = [
        (name, mx.array(rng.normal(0, 0.05, p.shape).astype(np.float32)))
        for name, p in tree_flatten(model.trainable_parameters())
    ]
    model.update(tree_unflatten(trainable))
    mx.eval(model.parameters())
    return model


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def grad_diff(grads, reference) -> float:
    ref = dict(tree_flatten(reference))
    mine = dict(tree_flatten(grads))
    assert mine.keys() == ref.keys() and mine, (sorted(mine)[:3], sorted(ref)[:3])
    return max(rel_diff(np.array(mine[k]), np.array(ref[k])) for k in ref)


def context_parallel_case(kind: str, w: World) -> dict:
    model = tiny_model(kind)
    rng = np.random.default_rng(11)
    tokens = mx.array(rng.integers(0, VOCAB, (2, 301)).astype(np.int32))
    weights = mx.array(rng.uniform(0.0, 1.0, (2, 300)).astype(np.float32))
    (loss1, n1), grads1 = StagedStep(model, MemoryConfig(block_mb=1))(model, tokens, weights)
    mx.eval(loss1, n1, grads1)
    nll1 = StagedStep(model, MemoryConfig(block_mb=1)).target_nll(model, tokens)
    cp = StagedStep(model, MemoryConfig(block_mb=1, context_parallel=True), world=w)
    (loss, n), grads = cp(model, tokens, weights)
    loss, n, grads = w.all_sum(loss), w.all_sum(n), w.sum_tree(grads)
    mx.eval(loss, n, grads)
    nll = cp.target_nll(model, tokens)
    return {
        "case": f"context_parallel/{kind}",
        "loss": rel_diff(loss.item(), loss1.item()),
        "count": rel_diff(n.item(), n1.item()),
        "grads": grad_diff(grads, grads1),
        "nll": rel_diff(nll, nll1),
        "nll_shape_equal": list(np.shape(nll)) == list(np.shape(nll1)),
    }


def data_parallel_case(kind: str, micro: int, w: World) -> dict:
    model = tiny_model(kind)
    rng = np.random.default_rng(100 + micro)
    batches = []
    for _ in range(micro):
        tokens = mx.array(rng.integers(0, VOCAB, (1, 129)).astype(np.int32))
        weights = mx.array(rng.uniform(0.0, 1.0, (1, 128)).astype(np.float32))
        batches.append((tokens, weights, np.array([128])))
    cfg, memory = TrainConfig(), MemoryConfig(block_mb=1)
    grads1, loss1, tokens1 = Updater(model, cfg, memory).gradients(batches)
    grads, loss, tokens = Updater(model, cfg, memory, world=w).gradients(batches)
    return {
        "case": f"data_parallel/{kind}/{micro}",
        "loss": rel_diff(loss, loss1),
        "grads": grad_diff(grads, grads1),
        "tokens": [tokens, tokens1],
        "my_sequences": sum(int(b[0].shape[0]) for b in share(batches, w)),
    }


def main() -> int:
    w = world()
    results = []
    for kind in ("starcoder2", "llama"):
        results.append(context_parallel_case(kind, w))
        for micro in (4, 3, 1):
            results.append(data_parallel_case(kind, micro, w))
    print(json.dumps({"rank": w.rank, "size": w.size, "results": results}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
