"""Training-step throughput of every memory policy and of `auto`, side by side, at one length.

    python scripts/bench_step.py [--seq-len 512] [--rank 8] [--model smollm2-135m] [--steps 4] [--json OUT]

Each policy (`mlx_ltc.train.policies`) runs in its own process; "stock" is mlx-lm's plain step (its loss,
MLX attention, one lazy graph, no checkpointing: policy `plain`) and "auto" the policy the planner picks
for this length within this machine's budget. Prints tokens/s (median of the steps after the first) and
the ratio to stock. The order of the policies' speeds is `hardware.planner.SPEED_ORDER`.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def auto_policy(loaded, seq_len: int, rank: int) -> str:
    from mlx_ltc import config
    from mlx_ltc.hardware import planner, profile

    cfg = config.build(None, {"lora": {"rank": rank}})
    shape = planner.Shape.from_config(loaded.config, "model")
    budget = profile.default_budget(profile.machine())
    return planner.plan(shape, planner.setup_for(loaded, cfg, 1, profile.backend()), budget, seq_len).auto


def child(name, seq_len, rank, model, steps, host_limit=None):
    import resource

    import mlx.core as mx

    if host_limit:  # an allocation past it fails in this process instead of the machine running out
        resource.setrlimit(resource.RLIMIT_DATA, (host_limit, host_limit))
    import numpy as np

    from mlx_ltc import models
    from mlx_ltc.config import LoraConfig, MemoryConfig
    from mlx_ltc.train import engine
    from mlx_ltc.train.lora import apply_lora
    from mlx_ltc.train.policies import POLICIES
    from mlx_ltc.train.update import enable_grad_checkpoint

    loaded = models.load(models.resolve(model, models.default_cache_dir()), "auto")
    policy = POLICIES[auto_policy(loaded, seq_len, rank) if name == "auto" else name]
    memory = policy.memory(MemoryConfig(), len(loaded.model.layers))
    if policy.checkpoint:
        enable_grad_checkpoint(loaded.model)
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
    tps = (seq_len - 1) / float(np.median(times[1:]))
    print(json.dumps({"policy": policy.name, "tokens_per_s": tps, "steps_s": times}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--policies", default="plain,stock,chunked,efficient,engine,engine_sqrt,auto")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--host-limit", type=int, default=None, help="bytes a policy's process may allocate")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.seq_len, args.rank, args.model, max(2, args.steps), args.host_limit)
    if args.host_limit is None:
        import psutil

        args.host_limit = int(psutil.virtual_memory().total * 0.85)
    from mlx_ltc import hardware

    hardware.ensure_fast_blas(script=__file__)  # children inherit the preload
    print(f"{args.model}, LoRA rank {args.rank}, {args.seq_len} tokens, batch 1", flush=True)
    names = args.policies.split(",")
    if "plain" in names:  # the baseline first
        names.remove("plain")
        names.insert(0, "plain")
    rows, stock = [], None
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, "--seq-len", str(args.seq_len), "--rank", str(args.rank),
               "--model", args.model, "--steps", str(args.steps), "--host-limit", str(args.host_limit)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        label = "stock (plain)" if name == "plain" else name
        if proc.returncode:
            why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode} (over --host-limit?)"])[-1][:120]
            rows.append({"name": name, "tokens_per_s": None, "note": why})
            print(f"  {label:<24}did not run: {why}", flush=True)
            stock = stock if name != "plain" else 0.0  # no baseline: no ratios
            continue
        out = json.loads(proc.stdout.splitlines()[-1])
        stock = out["tokens_per_s"] if stock is None else stock
        label = f"auto -> {out['policy']}" if name == "auto" else label
        ratio = out["tokens_per_s"] / stock if stock else None
        rows.append({"name": name, **out, "vs_stock": ratio})
        shown = f"{ratio:.2f}x stock" if ratio else "(stock did not run)"
        print(f"  {label:<24}{out['tokens_per_s']:>8.1f} tokens/s  {shown}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "seq_len": args.seq_len, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
