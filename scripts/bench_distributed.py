"""Past one process, side by side in one run: context parallelism's memory and data parallelism's speed.

    # the longest L one training step fits in a per-rank budget: one process vs 2 context-parallel ranks
    python scripts/bench_distributed.py cp --budget 0.9GB --policy engine --json cp.json
    # given lengths only (a table of per-rank peaks, no search)
    python scripts/bench_distributed.py cp --lens 1024,2048,4096 --policy engine
    python scripts/bench_distributed.py cp --budget 1.5GB --step 0 --lens 6656,6912 --cp-lens 12288
    # tokens/s of one process vs 2 data-parallel ranks at the same global batch, and the all-reduce time
    python scripts/bench_distributed.py dp --seq-len 512 --sequences 4 --updates 4

Every cell is a fresh process (or a fresh `mlx.launch -n 2 --backend ring` on localhost) doing one real
update of the embedded model with LoRA rank 8: forward, backward, AdamW. The peak is
`mx.get_peak_memory()` after the weights are loaded (as `bench_memory.py` and the planner count it),
each rank's own. The planner's predictions (`mlx-ltc plan --context-parallel 2`) stand next to them.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def child(args) -> None:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_ltc import distributed, models
    from mlx_ltc.config import LoraConfig, MemoryConfig, TrainConfig
    from mlx_ltc.train import context_parallel
    from mlx_ltc.train.lora import apply_lora
    from mlx_ltc.train.policies import POLICIES
    from mlx_ltc.train.update import Updater, enable_grad_checkpoint

    world = distributed.world()
    context_parallel.ZIGZAG = not args.contiguous
    loaded = models.load(models.resolve(args.model, models.default_cache_dir()))
    model = loaded.model
    apply_lora(model, LoraConfig(rank=8), seed=0)
    mx.random.seed(1)
    flat = [(k, mx.random.normal(v.shape) * 0.01 if k.endswith("lora_b") else v)
            for k, v in tree_flatten(model.trainable_parameters())]  # fmt: skip
    model.update(tree_unflatten(flat))
    mx.eval(model.parameters())
    policy = POLICIES[args.policy]
    memory = policy.memory(MemoryConfig(context_parallel=args.context_parallel), len(model.layers))
    if policy.checkpoint:
        enable_grad_checkpoint(model)
    updater = Updater(model, TrainConfig(), memory, world)
    L, n = args.seq_len, args.sequences
    rng = np.random.default_rng(0)  # the same tokens on every rank
    micro = [(mx.array(rng.integers(0, model.args.vocab_size, (1, L + 1), dtype=np.int32)),
              mx.ones((1, L), dtype=mx.float32), np.array([L])) for _ in range(n)]  # fmt: skip
    mx.clear_cache()
    mx.reset_peak_memory()
    times, reduce_s, wait_s = [], [], []
    for _ in range(args.updates):
        world.barrier()
        start = time.perf_counter()
        stats = updater(micro, 1e-5)
        times.append(time.perf_counter() - start)
        reduce_s.append(updater.all_reduce_s)
        wait_s.append(updater.wait_s)
    row = {"rank": world.rank, "ranks": world.size, "L": L, "policy": args.policy, "sequences": n,
           "context_parallel": args.context_parallel, "zigzag": not args.contiguous, "loss": stats.loss,
           "peak_bytes": mx.get_peak_memory(), "step_s": times, "all_reduce_s": reduce_s, "wait_s": wait_s,
           "tokens_per_s": n * L * len(times[1:] or times) / sum(times[1:] or times)}  # fmt: skip
    if args.context_parallel:
        layout = context_parallel.Layout(world, L, zigzag=not args.contiguous)
        row["attention_work"] = [layout.work(r) for r in range(world.size)]
    print("RESULT " + json.dumps(row), flush=True)


def run_cell(args, L: int, ranks: int, **opts) -> list | None:
    """Each rank's result row, or None when the cell failed (out of memory, a crash)."""
    cmd = [sys.executable, str(HERE), "child", "--model", args.model, "--seq-len", str(L), "--policy", args.policy]
    for k, v in opts.items():
        cmd += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    if ranks > 1:
        from mlx_ltc.launch import free_port

        launcher = Path(sys.executable).parent / "mlx.launch"
        cmd = [str(launcher), "-n", str(ranks), "--backend", "ring", "--starting-port", str(free_port()), "--"] + cmd
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # stdin stays open: mlx.launch polls it, and spins on one at end of file (/dev/null under nohup or CI)
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, text=True)
        try:
            code = proc.wait(timeout=args.timeout)
        finally:
            proc.stdin.close()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    rows = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    if code != 0 or len(rows) != ranks:
        print(f"  L={L} ranks={ranks}: failed (exit {code}): {stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return sorted(rows, key=lambda r: r["rank"])


def _planner(args, ranks: int):
    from mlx_ltc import models
    from mlx_ltc.config import Config
    from mlx_ltc.hardware import planner

    config, _ = planner.model_config(args.model, models.default_cache_dir())
    shape = planner.Shape.from_config(config, args.model)
    setup = planner.setup_from_config(config, Config(), "cpu", 1)
    import dataclasses

    return shape, dataclasses.replace(setup, context_ranks=ranks)


def cp(args) -> None:
    from mlx_ltc.hardware import planner
    from mlx_ltc.hardware.profile import parse_size

    budget = parse_size(args.budget) if args.budget else None
    models = {r: _planner(args, r) for r in (1, 2)}
    predicted = lambda r, L: planner.predict(*models[r], args.policy, L)["peak"]  # noqa: E731
    cells = {}

    def measure(ranks, L):
        if (ranks, L) not in cells:
            started = time.perf_counter()
            rows = run_cell(args, L, ranks, updates=1, sequences=1, **({"context_parallel": True} if ranks > 1 else {}))
            cells[(ranks, L)] = rows
            peak = max(r["peak_bytes"] for r in rows) if rows else None
            shown = f"{peak / 1e9:.3f} GB" if peak else "failed"
            print(f"  ranks {ranks} L {L:>6,}: peak per rank {shown} (planner {predicted(ranks, L) / 1e9:.3f} GB) "
                  f"in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
        rows = cells[(ranks, L)]
        return max(r["peak_bytes"] for r in rows) if rows else None

    longest = {}
    if budget and args.step:  # start at the planner's answer, walk by --step until the boundary is bracketed
        for ranks in (1, 2):
            planned = planner.max_seq_len(*models[ranks], args.policy, budget, args.step)

            def fits(n, ranks=ranks):
                return (measure(ranks, n) or budget + 1) <= budget

            L = max(args.step, planned)
            if fits(L):
                while fits(L + args.step):
                    L += args.step
            else:
                while L > args.step and not fits(L):
                    L -= args.step
            longest[ranks] = {"measured": L if fits(L) else 0, "planner": planned}
    for L in args.lens:
        measure(1, L)
    for L in [n for n in args.cp_lens or args.lens if n > 0]:  # --cp-lens 0: none
        measure(2, L)
    if budget and not args.step:  # the longest of the given lengths that fits, for each
        for ranks in (1, 2):
            within = [L for (r, L), rows in cells.items() if r == ranks and rows and measure(r, L) <= budget]
            planned = planner.max_seq_len(*models[ranks], args.policy, budget, 256)
            longest[ranks] = {"measured": max(within, default=0), "planner": planned}

    print(f"\n{args.model}, policy {args.policy}, one update, batch 1" + (f", budget {args.budget}" if budget else ""))
    print(f"{'L':>7}  {'one process GB':>15} {'(planner)':>9}  {'per rank, 2 ranks GB':>20} {'(planner)':>9}")
    for L in sorted({L for _, L in cells}):
        one, two = cells.get((1, L)), cells.get((2, L))
        fmt = lambda rows: f"{max(r['peak_bytes'] for r in rows) / 1e9:.3f}" if rows else "-"  # noqa: E731
        print(f"{L:>7,}  {fmt(one):>15} {predicted(1, L) / 1e9:>9.3f}  {fmt(two):>20} {predicted(2, L) / 1e9:>9.3f}")
    if longest:
        m1, m2 = longest[1], longest[2]
        ratio = m2["measured"] / m1["measured"] if m1["measured"] else float("nan")
        print(f"longest L within {args.budget} (step {args.step}): one process {m1['measured']:,} (planner "
              f"{m1['planner']:,}), 2 context-parallel ranks {m2['measured']:,} (planner {m2['planner']:,}): "
              f"{ratio:.2f}x (planner {m2['planner'] / max(m1['planner'], 1):.2f}x)")  # fmt: skip
    if args.json:
        doc = {"model": args.model, "policy": args.policy, "budget": args.budget, "longest": longest,
               "cells": [{"ranks": r, "L": L, "rows": rows, "predicted_peak": predicted(r, L)}
                         for (r, L), rows in sorted(cells.items())]}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1))


def balance(args) -> None:
    """Zig-zag vs contiguous slices: each rank's attention work and the step time, at each length."""
    print(f"{'L':>7}  {'split':<10} {'work rank0/rank1':>17} {'step s':>8}")
    for L in args.lens:
        for contiguous in (False, True):
            rows = run_cell(args, L, 2, updates=args.updates, sequences=1, context_parallel=True,
                            **({"contiguous": True} if contiguous else {}))  # fmt: skip
            if rows:
                w = rows[0]["attention_work"]
                step = min(rows[0]["step_s"])
                name = "contiguous" if contiguous else "zig-zag"
                print(f"{L:>7,}  {name:<10} {w[0] / w[1]:>17.2f} {step:>8.1f}", flush=True)


def dp(args) -> None:
    one = run_cell(args, args.seq_len, 1, updates=args.updates, sequences=args.sequences)
    two = run_cell(args, args.seq_len, 2, updates=args.updates, sequences=args.sequences)
    if not (one and two):
        raise SystemExit("a cell failed")
    a, b = one[0], two[0]
    reduce_s = sorted(s for r in two for s in r["all_reduce_s"][1:] or r["all_reduce_s"])
    wait_s = sorted(s for r in two for s in r["wait_s"][1:] or r["wait_s"])
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(f"{args.model}, policy {args.policy}, {args.sequences} sequences of {args.seq_len} per update, "
          f"{args.updates} updates (the first not timed), OPENBLAS_NUM_THREADS {blas}")  # fmt: skip
    print(f"  one process:          {a['tokens_per_s']:8.1f} tokens/s, loss {a['loss']:.6f}")
    print(f"  2 data-parallel ranks: {b['tokens_per_s']:8.1f} tokens/s, loss {b['loss']:.6f}: "
          f"{b['tokens_per_s'] / a['tokens_per_s']:.2f}x; all-reduce {reduce_s[len(reduce_s) // 2] * 1000:.1f} ms "
          f"per update, waiting for the other rank {wait_s[len(wait_s) // 2] * 1000:.1f} ms "
          f"(medians over ranks and updates)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"one": one, "two": two}, indent=1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["cp", "dp", "balance", "child"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policy", default="engine")
    parser.add_argument("--budget", default=None, help="cp: search the longest L within this per-rank budget")
    parser.add_argument("--step", type=int, default=256, help="cp: the search's granularity (0: no search)")
    parser.add_argument("--lens", type=lambda s: [int(x) for x in s.split(",")], default=[])
    parser.add_argument("--cp-lens", type=lambda s: [int(x) for x in s.split(",")], default=[],
                        help="cp: lengths for the 2 ranks [default: --lens; 0: none]")  # fmt: skip
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sequences", type=int, default=4, help="sequences per update (one per micro-batch)")
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--context-parallel", action="store_true")
    parser.add_argument("--contiguous", action="store_true", help="context parallel without the zig-zag")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from mlx_ltc.hardware import ensure_fast_blas

    ensure_fast_blas(script=__file__)  # children, and mlx.launch's ranks, inherit the preload
    {"cp": cp, "dp": dp, "balance": balance, "child": child}[args.mode](args)


if __name__ == "__main__":
    main()
