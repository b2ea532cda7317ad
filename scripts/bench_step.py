"""Training-step throughput of the memory engine's parts vs stock MLX, side by side, at one length.

    python scripts/bench_step.py [--seq-len 512] [--rank 8] [--model smollm2-135m] [--steps 4]

Each configuration runs in its own process: stock (mlx-lm's loss, MLX attention, one lazy graph),
staged execution only, efficient attention + chunked loss only, and the full engine (the default).
Prints tokens/s (median of the steps after the first) and the ratio to stock.
"""

import argparse
import json
import subprocess
import sys
import time

CONFIGS = {
    "stock": {"attention": "stock", "loss": "full", "staged": False},
    "staged only": {"attention": "stock", "loss": "full", "staged": True},
    "attention + loss only": {"attention": "efficient", "loss": "chunked", "staged": False},
    "engine (default)": {},
}


def child(name, seq_len, rank, model, steps):
    import mlx.core as mx
    import numpy as np

    from mlx_ltc import models
    from mlx_ltc.train.lora import apply_lora
    from mlx_ltc.config import LoraConfig, MemoryConfig
    from mlx_ltc.train import engine

    loaded = models.load(models.resolve(model, models.default_cache_dir()), "auto")
    memory = MemoryConfig(**CONFIGS[name])
    if memory.attention == "efficient":
        engine.use_efficient_attention(loaded.model, memory.block_mb << 20)
    apply_lora(loaded.model, LoraConfig(rank=rank))
    step = engine.loss_and_grad(loaded.model, memory)
    tokens = mx.array(np.random.default_rng(0).integers(100, 40000, (1, seq_len)).astype(np.int32))
    weights = mx.ones((1, seq_len - 1))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        (s, _), g = step(loaded.model, tokens, weights)
        mx.eval(s, g)
        times.append(time.perf_counter() - start)
    print(json.dumps({"tokens_per_s": (seq_len - 1) / float(np.median(times[1:])), "steps_s": times}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.seq_len, args.rank, args.model, max(2, args.steps))
    from mlx_ltc import hardware

    hardware.ensure_fast_blas(script=__file__)  # children inherit the preload
    print(f"{args.model}, LoRA rank {args.rank}, {args.seq_len} tokens, batch 1")
    stock = None
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--child", name, "--seq-len", str(args.seq_len), "--rank", str(args.rank),
               "--model", args.model, "--steps", str(args.steps)]  # fmt: skip
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        stock = stock or out["tokens_per_s"]
        print(f"  {name:<24}{out['tokens_per_s']:>8.1f} tokens/s  {out['tokens_per_s'] / stock:.2f}x stock")


if __name__ == "__main__":
    main()
