"""Stock mlx-lm LoRA step vs mlx-ltc's memory engine, side by side on the same backend and model.

Stock = mlx-lm's own recipe: `mlx_lm.tuner.trainer.default_loss` (full logits) with
`grad_checkpoint` on every layer. Ours = `mlx_ltc.train.engine` with its default settings. Each
(impl, L) cell runs in a fresh process (a clean peak, and an out-of-memory kill is "did not fit"),
doing real training steps: forward, backward, AdamW update. Where both fit, the first step's loss
and LoRA gradients are compared.

    python scripts/bench_memory.py --model smollm2-135m --lens 1024,2048,4096,8192 --json bench.json

Writes the JSON list the issue asks for, a table on stdout and a PNG of peak memory vs L.
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _text_tokens(tokenizer, n: int):
    """n tokens of real code: the Python standard library's sources, in a fixed order."""
    import numpy as np

    ids = []
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        ids.extend(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")))
        if len(ids) >= n:
            return np.array(ids[:n], dtype=np.int32)
    raise SystemExit(f"not enough standard-library text for {n} tokens")


SHAPES = {  # random weights at a real model's shape: enough for memory and speed
    "starcoder2-3b": dict(model_type="starcoder2", hidden_size=3072, num_hidden_layers=30, intermediate_size=12288,
                          num_attention_heads=24, num_key_value_heads=2, vocab_size=49152, rope_theta=999999.44,
                          norm_epsilon=1e-5, tie_word_embeddings=True),
}  # fmt: skip


def _shape_model(name: str, layers: int | None, dtype: str = "bf16", bits: int = 4):
    """A model of the named shape in bf16 or fp32, 4-bit (group 64) or not (bits 0), built layer by layer."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import starcoder2

    config = dict(SHAPES[name], num_hidden_layers=layers or SHAPES[name]["num_hidden_layers"])
    model = starcoder2.Model(starcoder2.ModelArgs(**config))
    model.set_dtype(mx.bfloat16 if dtype == "bf16" else mx.float32)
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
    for module in [model.model.embed_tokens, model.model.norm, *model.layers]:
        mx.eval(module.parameters())
    return model


def child(args) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_ltc import models
    from mlx_ltc.train.lora import apply_lora
    from mlx_ltc.config import LoraConfig, MemoryConfig
    from mlx_ltc.train import engine
    from mlx_ltc.train.policies import POLICIES
    from mlx_ltc.train.update import enable_grad_checkpoint

    if args.host_limit:
        resource.setrlimit(resource.RLIMIT_DATA, (args.host_limit, args.host_limit))
    if args.model.startswith("shape:"):
        model, tokenizer = _shape_model(args.model.split(":", 1)[1], args.layers, args.dtype or "bf16", args.bits), None
    else:
        loaded = models.load(models.resolve(args.model, models.default_cache_dir()))
        model, tokenizer = loaded.model, loaded.tokenizer
        if args.dtype == "bf16":  # the loaded (dequantized) weights cast: bf16 activations
            model.set_dtype(mx.bfloat16)
    apply_lora(model, LoraConfig(rank=args.rank), seed=0)
    # non-zero B so that every LoRA gradient (not only dB) is compared
    mx.random.seed(1)
    flat = tree_flatten(model.trainable_parameters())
    flat = [(k, mx.random.normal(v.shape) * 0.01 if k.endswith("lora_b") else v) for k, v in flat]
    model.update(tree_unflatten(flat))
    mx.eval(model.parameters())
    L, B = args.length, args.batch
    if tokenizer is None:
        stream = np.random.default_rng(0).integers(0, model.args.vocab_size, args.steps * B * (L + 1), dtype=np.int32)
    else:
        stream = _text_tokens(tokenizer, args.steps * B * (L + 1))

    if args.impl == "stock":
        from mlx_lm.tuner.trainer import default_loss, grad_checkpoint

        grad_checkpoint(model.layers[0])
        value_and_grad = nn.value_and_grad(model, default_loss)

        def step(tokens):
            (loss, n), grads = value_and_grad(model, tokens, mx.array([[0, L]] * B))
            return loss, grads
    else:  # "ours" is the default engine; any other name one of train.policies
        policy = POLICIES["engine" if args.impl == "ours" else args.impl]
        if policy.checkpoint:
            enable_grad_checkpoint(model)
        value_and_grad = engine.loss_and_grad(model, policy.memory(MemoryConfig(), len(model.layers)))

        def step(tokens):
            (total, n), grads = value_and_grad(model, tokens, mx.array([L + 1] * B))
            return total / n, tree_unflatten([(k, g / n) for k, g in tree_flatten(grads)])  # mean, as stock

    optimizer = optim.AdamW(learning_rate=1e-5)
    mx.clear_cache()
    weights = mx.get_active_memory()
    mx.reset_peak_memory()
    quantized = any(k.endswith(".scales") for k, _ in tree_flatten(model.parameters()))
    result = {
        "impl": args.impl,
        "model": args.model,
        "L": L,
        "batch": B,
        "bits": args.bits if quantized else 0,
        "layers": len(model.layers),
        "dtype": {mx.float32: "fp32", mx.bfloat16: "bf16", mx.float16: "fp16"}[model.model.norm.weight.dtype],
    }
    times = []
    for i in range(args.steps):
        tokens = mx.array(stream[i * B * (L + 1) : (i + 1) * B * (L + 1)].reshape(B, L + 1))
        start = time.perf_counter()
        loss, grads = step(tokens)
        mx.eval(loss, grads)
        if i == 0:
            result["loss"] = loss.item()
            if args.grads:
                np.savez(args.grads, **{k: np.array(v) for k, v in tree_flatten(grads)})
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state)
        times.append(time.perf_counter() - start)
    result["peak_bytes"] = mx.get_peak_memory()
    result["step_s"] = times[-1]
    result["tokens_per_s"] = B * L / times[-1]
    result["weights_bytes"] = weights
    return result


def run_cell(args, impl, L, grads_path) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, str(L), "--model", args.model, "--rank", str(args.rank),
           "--steps", str(args.steps), "--grads", str(grads_path), "--host-limit", str(args.host_limit),
           "--batch", str(args.batch), "--bits", str(args.bits)]  # fmt: skip
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "L": L, "peak_bytes": None, "tokens_per_s": None, "loss": None, "note": "timed out"}
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}, no message (over --host-limit?)"])[-1]
    note = "killed (out of memory)" if proc.returncode in (-9, 137) else tail[:160]
    return {"impl": impl, "L": L, "peak_bytes": None, "tokens_per_s": None, "loss": None, "note": note}


def agreement(stock_npz, ours_npz) -> tuple:
    """(relative L2 error of all LoRA gradients together, worst per-tensor max|diff| / max|stock|)."""
    import numpy as np

    a, b = np.load(stock_npz), np.load(ours_npz)
    assert set(a.files) == set(b.files), "different parameter sets"
    diff = math.sqrt(sum(float(((b[k] - a[k]).astype(np.float64) ** 2).sum()) for k in a.files))
    norm = math.sqrt(sum(float((a[k].astype(np.float64) ** 2).sum()) for k in a.files))
    worst = max(float(np.abs(b[k] - a[k]).max() / max(np.abs(a[k]).max(), 1e-30)) for k in a.files)
    return diff / norm, worst


def gb(x):
    return "—" if x is None else f"{x / 1e9:.2f}"


def ratio(a, b):
    return "—" if a is None or b is None else f"{a / b:.2f}"


def main():
    from mlx_ltc.hardware import ensure_fast_blas

    ensure_fast_blas(script=__file__)  # children inherit the preload
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="mlx-ltc --model, or shape:starcoder2-3b (random weights)")
    p.add_argument("--layers", type=int, default=None, help="with shape:, keep only this many layers")
    p.add_argument("--lens", default="1024,2048,4096,8192")
    p.add_argument("--impls", default="stock,ours", help="stock (mlx-lm's recipe), ours (the engine), or policies")
    p.add_argument(
        "--dtype",
        default=None,
        choices=("bf16", "fp32"),
        help="the model's dtype [default: bf16 for shape:, as loaded for a model (fp32 on a CPU)]",
    )
    p.add_argument("--bits", type=int, default=4, help="with shape:, weight bits (0: unquantized)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=1, help="steps per cell; tokens/s is the last step's")
    p.add_argument("--json", type=Path, default=Path("bench_memory.json"))
    p.add_argument("--png", type=Path, default=None, help="default: next to --json")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per cell")
    p.add_argument("--host-limit", type=int, default=None, help="bytes of host memory a cell may use")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "L"), help=argparse.SUPPRESS)
    p.add_argument("--grads", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.impl, args.length = args.child[0], int(args.child[1])
        print(json.dumps(child(args)))
        return
    if args.host_limit is None:
        import psutil

        args.host_limit = int(psutil.virtual_memory().total * 0.85)
    lens = [int(x) for x in args.lens.split(",")]
    impls = args.impls.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for L in lens:
            cells = {}
            for impl in impls:
                cells[impl] = run_cell(args, impl, L, Path(tmp) / f"{impl}-{L}.npz")
                print(f"{impl:>5} L={L:>6}: {json.dumps(cells[impl])}", file=sys.stderr, flush=True)
            if all(c.get("loss") is not None for c in cells.values()) and set(cells) == {"stock", "ours"}:
                ours = cells["ours"]
                ours["loss_rel_diff"] = abs(ours["loss"] - cells["stock"]["loss"]) / abs(cells["stock"]["loss"])
                npz = [Path(tmp) / f"{impl}-{L}.npz" for impl in ("stock", "ours")]
                ours["grad_rel_diff"], ours["grad_max_rel_diff"] = agreement(*npz)
            rows.extend(cells.values())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")

    import mlx.core as mx

    from mlx_ltc.hardware.profile import backend

    print(f"model {args.model}, backend {backend()} (MLX {mx.__version__}), LoRA rank {args.rank}, batch 1")
    header = (
        "| L | stock peak GB | ours peak GB | ours/stock | stock tok/s | ours tok/s | ours/stock "
        "| loss rel diff | grad rel diff (L2) | worst tensor |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    by = {(r["impl"], r["L"]): r for r in rows}
    for L in lens:
        s, o = by.get(("stock", L), {}), by.get(("ours", L), {})
        tps = lambda r: "—" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:.0f}"
        diff = lambda k, o=o: "—" if o.get(k) is None else f"{o[k]:.1e}"
        cells = [gb(s.get("peak_bytes")), gb(o.get("peak_bytes")), ratio(o.get("peak_bytes"), s.get("peak_bytes"))]
        cells += [tps(s), tps(o), ratio(o.get("tokens_per_s"), s.get("tokens_per_s"))]
        cells += [diff("loss_rel_diff"), diff("grad_rel_diff"), diff("grad_max_rel_diff")]
        print(f"| {L} | " + " | ".join(cells) + " |")
    png = args.png or args.json.with_suffix(".png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in impls:
        pts = [(r["L"], r["peak_bytes"] / 1e9) for r in rows if r["impl"] == impl and r["peak_bytes"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L (tokens)")
    ax.set_ylabel("peak memory (GB)")
    ax.set_title(f"one LoRA training step, {args.model} ({backend()})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"plot: {png}; json: {args.json}")


if __name__ == "__main__":
    main()
