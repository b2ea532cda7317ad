"""Issue 8: the BK model vs a llama transformer vs Mamba (mlx-lm's), same data, parameter count and lengths,
side by side in one run; and time and memory per token vs length, the O(N) claim measured.

    python scripts/bench_bk.py --compare [--lens 128,512,2048] [--steps 20] [--tokens-per-step 4096]
        [--d-model 256] [--layers 4] [--corpus DIR] [--max-tokens 2000000] [--json OUT]
    python scripts/bench_bk.py --scaling [--model bk|transformer|mamba] [--max-len 131072] [--eval-max 1048576]
        [--lens 1024,...] [--chunk 4096] [--train-chunk 8192] [--memory-limit-gb N] [--max-seconds 300]
        [--grad-checkpoint] [--no-head] [--json OUT]

--compare trains each model through the lengths exactly as `mlx-ltc bk train` does (its `LengthRun`: the same
windows of the same token stream, AdamW with warmup + cosine per length, clipping, the chunked tied-head
loss) and prints, as each finishes, per model and length: train loss (mean of the last 10% of steps), val
loss, tokens/s and peak memory, with ratios to BK. The corpus (default: this interpreter's standard library)
goes through `mlx_ltc.research.bk.data`, the embedded tokenizer's 49,152 entries. The transformer and Mamba keep BK's
width, so the tied 49,152 x d embedding, most of the parameters, is the same; their layers and intermediate
size are searched to match BK's total count (BK's MoE counts all experts, though only top-k run per token).

--scaling, for one model: one training step (forward + backward, batch 1) at lengths doubling from 1K (or
--lens) to --max-len (BK: `bk train`'s step, which takes sequences over --train-chunk positions a chunk at a
time through the carried state), then one stream of random tokens fed --chunk at a time with the carried
state (BK: its LayerState; transformer: mlx-lm's KV cache; Mamba: its conv/SSM cache) to --eval-max. Per
length: time/token and memory; then longest/shortest ratios (1.0: linear time, linear activation memory,
constant stream memory). A length whose time or peak, extrapolated from the lengths before it (at least
linearly), would pass --max-seconds or --memory-limit-gb is reported as skipped, with every length after it.
--no-head trains on the sum of the hidden states instead: the model alone, without the 49K-entry head,
whose chunked logits add a constant (~1 GB at width 256: the few 512 x 49,152 blocks MLX keeps in flight)
to every step's peak.

Honest notes: mlx-lm's transformer attends with mx.fast.scaled_dot_product_attention, quadratic in time (and,
on CPU, in memory: the scores are materialised). mlx-lm's Mamba runs its selective scan as a Python loop over
positions (`MambaBlock.ssm_step`), in training as well: linear, but with a graph of O(N x layers) small ops, so
its numbers measure that implementation, not a parallel (or fused) scan.
"""

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama, mamba
from mlx_lm.models.cache import make_prompt_cache

from mlx_ltc.research.bk import BKConfig, BKModel, data
from mlx_ltc.research.bk.evaluate import chunk_nll
from mlx_ltc.research.bk import chunked
from mlx_ltc.research.bk.chunked import mean_nll
from mlx_ltc.research.bk.train import LengthRun, check_corpus, length_phases  # `bk train`'s own steps
from mlx_ltc.config import BkTrainConfig
from mlx_ltc.train.update import enable_grad_checkpoint

MODELS = ("bk", "transformer", "mamba")


def n_params(model) -> int:
    """Parameter count; the arrays stay lazy (nothing is allocated)."""
    return sum(p.size for _, p in tree_flatten(model.parameters()))


def llama_args(width, layers, inter, vocab):
    return llama.ModelArgs(model_type="llama", hidden_size=width, num_hidden_layers=layers, intermediate_size=inter,
                           num_attention_heads=max(1, width // 64), rms_norm_eps=1e-5, vocab_size=vocab,
                           tie_word_embeddings=True)  # fmt: skip


def mamba_args(width, layers, inter, vocab):
    return mamba.ModelArgs(model_type="mamba", vocab_size=vocab, hidden_size=width, intermediate_size=inter,
                           state_size=16, num_hidden_layers=layers, conv_kernel=4, use_bias=False,
                           use_conv_bias=True, time_step_rank="auto", tie_word_embeddings=True)  # fmt: skip


# module, ModelArgs maker, the family's usual intermediate / width (SwiGLU 8/3, Mamba's expand 2)
FAMILIES = {"transformer": (llama, llama_args, 8 / 3), "mamba": (mamba, mamba_args, 2.0)}


def match(kind: str, target: int, width: int, vocab: int, layers: int = 0):
    """ModelArgs of `kind` at this width with about `target` parameters: for each layer count (or the given
    one), the intermediate size (a multiple of 8) that comes nearest; the count whose size is nearest the
    family's usual ratio to the width wins. The count is linear in layers and in the intermediate size."""
    module, make, ratio = FAMILIES[kind]
    count = {(n, i): n_params(module.Model(make(width, n, i, vocab))) for n in (1, 2) for i in (8, 16)}
    per_layer, per_unit = count[2, 8] - count[1, 8], (count[1, 16] - count[1, 8]) / 8
    best = None
    for n in [layers] if layers else range(1, 257):
        inter = max(8, 8 * round((8 + ((target - count[1, 8] + per_layer) / n - per_layer) / per_unit) / 8))
        if best is None or abs(math.log(inter / (ratio * width))) < best[0]:
            best = (abs(math.log(inter / (ratio * width))), n, inter)
        if inter == 8:  # deeper only gets narrower
            break
    return make(width, best[1], best[2], vocab)


class MlxLm(nn.Module):
    """An mlx-lm model as `bk.train` and `bk.evaluate` see BKModel: hidden(tokens, state) -> (normed hidden,
    state) and the tied head `embed`. In eval mode it runs through mlx-lm's cache (a fresh one for state=None),
    so streams carry their KV / SSM state from chunk to chunk."""

    def __init__(self, model):
        super().__init__()
        self.lm = model

    @property
    def body(self):
        return self.lm.backbone if "backbone" in self.lm else self.lm.model

    @property
    def embed(self):
        return self.body.embeddings if "embeddings" in self.body else self.body.embed_tokens

    def hidden(self, tokens: mx.array, state=None):
        if self.training:
            return self.body(tokens, None), None
        state = make_prompt_cache(self.lm) if state is None else state
        hidden = self.body(tokens, state)
        mx.eval(hidden, [c.state for c in state])
        return hidden, state


def build(kind: str, bk: BKConfig, layers: int = 0):
    """(model, its config as a dict): BK, or the family matched to BK's parameter count."""
    if kind == "bk":
        return BKModel(bk), asdict(bk)
    args = match(kind, n_params(BKModel(bk)), bk.d_model, bk.vocab_size, layers)
    return MlxLm(FAMILIES[kind][0].Model(args)), asdict(args)


def describe(kind, model, cfg) -> str:
    width, layers = cfg.get("d_model") or cfg["hidden_size"], cfg.get("n_layers") or cfg["num_hidden_layers"]
    inter = f", intermediate {cfg['intermediate_size']}" if "intermediate_size" in cfg else ""
    return f"{kind:<12}{n_params(model):>13,} parameters, width {width}, {layers} layers{inter}"


def row_line(r: dict, rows: list) -> str:
    """A --compare table row, with ratios to BK's row at the same length (when there is one)."""
    base = next((b for b in rows if b["seq_len"] == r["seq_len"] and b["model"] == "bk"), {})
    ratios = [
        f"{r[k] / base[k]:.2f}" if r[k] and base.get(k) else "-" for k in ("val_loss", "tokens_per_s", "peak_bytes")
    ]
    return (
        f"{r['seq_len']:>7,} {r['model']:<12} {r['final_train_loss'] or math.nan:>10.4f} "
        f"{r['val_loss'] or math.nan:>9.4f} {r['tokens_per_s']:>9,.0f} {r['peak_bytes'] / 2**20:>8.1f} "
        f"{ratios[0]:>7} {ratios[1]:>8} {ratios[2]:>7}"
    )


# --- --compare ------------------------------------------------------------------------------------------


def compare(args, bk_cfg: BKConfig) -> dict:
    corpus = data.tokenize(args.corpus, data.load_tokenizer(), args.val_share, args.max_tokens)
    bk_cfg.vocab_size = corpus.info["vocab_size"]
    check_corpus(corpus, args.lens)
    opts = BkTrainConfig(seq_lens=args.lens, steps_per_length=args.steps, tokens_per_step=args.tokens_per_step,
                         lr=args.lr, warmup_steps=args.steps // 5 if args.warmup is None else args.warmup,
                         val_tokens=args.val_tokens, seed=args.seed)  # fmt: skip
    rows, configs = [], {}
    header = (
        f"{'length':>7} {'model':<12} {'train loss':>10} {'val loss':>9} {'tokens/s':>9} {'peak MB':>8} "
        f"{'val/BK':>7} {'tok/s/BK':>8} {'mem/BK':>7}"
    )
    print(header, flush=True)
    for kind in args.models:
        mx.random.seed(args.seed)
        net, cfg = build(kind, bk_cfg, getattr(args, f"{kind}_layers", 0))
        mx.eval(net.parameters())
        configs[kind] = {"params": n_params(net), "config": cfg}
        print(describe(kind, net, cfg), flush=True)
        run = LengthRun(net, corpus, opts, Path("."), progress=not args.quiet)
        net.train()
        for phase in length_phases(opts):
            rows.append({"model": kind, **run.length(phase)})
            print(row_line(rows[-1], rows), flush=True)
        del net, run
        mx.clear_cache()
    print(f"\n{args.steps} steps per length, {args.tokens_per_step:,} tokens per step; ratios: model / BK\n{header}")
    for n in args.lens:
        print("\n".join(row_line(r, rows) for r in rows if r["seq_len"] == n))
    return {"models": configs, "corpus": corpus.info, "options": asdict(opts), "rows": rows}


# --- --scaling ------------------------------------------------------------------------------------------


def predict(points, n, key):
    """points[-1][key] extrapolated to length n along the last two points' power law, at least linearly."""
    last = points[-1]
    power = 1.0
    if len(points) > 1 and points[-2][key] > 0 and last[key] > 0:
        power = max(1.0, math.log(last[key] / points[-2][key]) / math.log(last["len"] / points[-2]["len"]))
    return last[key] * (n / last["len"]) ** power


def too_big(points, n, args, repeats=1) -> str | None:
    if not points:
        return None
    seconds, peak = predict(points, n, "seconds") * repeats, predict(points, n, "peak_bytes")
    if seconds > args.max_seconds or peak > args.memory_limit_gb * 2**30:
        return f"OOM/too slow, skipped (est. {seconds:,.0f} s, {peak / 2**30:,.1f} GB)"
    return None


def hidden_sum(model, batch):
    """--no-head's loss: the model alone, without the vocabulary-sized head."""
    return model.hidden(batch[:, :-1])[0].sum()


def train_points(net, lens, vocab, args, rng) -> list:
    if args.no_head:
        loss_and_grad = nn.value_and_grad(net, hidden_sum)
    elif isinstance(net, BKModel):
        loss_and_grad = chunked.value_and_grad(net, args.train_chunk)  # bk train's step
    else:
        loss_and_grad = nn.value_and_grad(net, mean_nll)
    grad_bytes = sum(p.nbytes for _, p in tree_flatten(net.trainable_parameters()))
    points = []
    for n in lens:
        if reason := too_big(points, n, args, args.repeats):
            print(f"  train {n:>9,}: {reason}", flush=True)
            points.append({"len": n, "skipped": reason})
            break
        batch = mx.array(rng.integers(0, vocab, (1, n + 1), dtype=np.int32))
        mx.synchronize()
        mx.clear_cache()
        resident = mx.get_active_memory()
        mx.reset_peak_memory()
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            mx.eval(loss_and_grad(net, batch))
            times.append(time.perf_counter() - began)
        peak = mx.get_peak_memory()
        act = max(0, peak - resident - grad_bytes)  # what grows with n: activations, not params or grads
        points.append({"len": n, "seconds": min(times), "peak_bytes": peak, "act_bytes": act})
        print(
            f"  train {n:>9,}: {min(times):8.2f} s  {min(times) / n * 1e6:9.2f} us/token  peak "
            f"{peak / 2**20:9.1f} MB  {act / n:9.0f} activation B/token",
            flush=True,
        )
    return points


def eval_points(net, marks, vocab, args, rng) -> list:
    tokens = rng.integers(0, vocab, marks[-1] + 1, dtype=np.int32)
    chunk, points, pending, count = min(args.chunk, marks[0]), [], list(marks), 0
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    began, slow = time.perf_counter(), None
    for nll in chunk_nll(net, tokens, chunk):
        count += len(nll)
        seconds = time.perf_counter() - began
        if pending and count >= pending[0]:
            pending.pop(0)
            points.append({"len": count, "seconds": seconds, "peak_bytes": mx.get_peak_memory()})
            print(
                f"  eval  {count:>9,}: {seconds:8.2f} s  {seconds / count * 1e6:9.2f} us/token  peak "
                f"{points[-1]['peak_bytes'] / 2**20:9.1f} MB  nll {float(nll.mean()):.3f}",
                flush=True,
            )
            slow = pending and too_big(points, pending[0], args)  # the stream up to the next mark, estimated
        elif seconds > args.max_seconds:
            slow = f"too slow, skipped (over {args.max_seconds:,.0f} s before reaching it)"
        if slow and pending:
            print(f"  eval  {pending[0]:>9,}: {slow}", flush=True)
            points.append({"len": pending[0], "skipped": slow})
            break
    return points


def doubling(first, last):
    return [first << k for k in range(max(0, (last // first).bit_length()))]


def summary(points, what, per_token_memory: bool) -> dict:
    done = [p for p in points if "skipped" not in p]
    if len(done) < 2:
        return {}
    lo, hi = done[0], done[-1]
    time_ratio = (hi["seconds"] / hi["len"]) / (lo["seconds"] / lo["len"])
    key = "act_bytes" if per_token_memory else "peak_bytes"
    mem_lo, mem_hi = (p[key] / (p["len"] if per_token_memory else 1) for p in (lo, hi))
    mem_ratio = mem_hi / mem_lo if mem_lo else math.nan
    label = "activation bytes/token" if per_token_memory else "peak memory"
    print(f"  {what} {hi['len']:,} vs {lo['len']:,}: time/token x{time_ratio:.2f}, {label} x{mem_ratio:.2f}")
    return {"time_per_token_ratio": time_ratio, "memory_ratio": mem_ratio}


def scaling(args, bk_cfg: BKConfig) -> dict:
    bk_cfg.vocab_size = len(data.load_tokenizer())
    mx.random.seed(args.seed)
    net, cfg = build(args.model, bk_cfg, getattr(args, f"{args.model}_layers", 0))
    if args.grad_checkpoint:
        enable_grad_checkpoint(net.lm if isinstance(net, MlxLm) else net)
    mx.eval(net.parameters())
    print(describe(args.model, net, cfg), flush=True)
    rng = np.random.default_rng(args.seed)
    lens = args.lens or doubling(1024, args.max_len)
    net.train()
    mx.eval(nn.value_and_grad(net, mean_nll)(net, mx.zeros((1, min(lens[0], 256) + 1), dtype=mx.int32)))  # warm-up
    print(f"training step, batch 1, {'no head' if args.no_head else 'with the head'} (best of {args.repeats}):")
    train = train_points(net, lens, bk_cfg.vocab_size, args, rng)
    train_ratio = summary(train, "train", per_token_memory=True)
    stream = []
    if args.eval_max:
        print(f"stream of random tokens, chunks of {min(args.chunk, lens[0]):,}, carried state:")
        stream = eval_points(net, doubling(lens[0], args.eval_max), bk_cfg.vocab_size, args, rng)
    eval_ratio = summary(stream, "eval ", per_token_memory=False)
    return {"model": args.model, "params": n_params(net), "config": cfg, "train": train, "eval": stream,
            "train_ratios": train_ratio, "eval_ratios": eval_ratio}  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--compare", action="store_true", help="BK vs transformer vs Mamba: loss, speed, memory")
    mode.add_argument("--scaling", action="store_true", help="one model's time and memory per token vs length")
    p.add_argument("--lens", default=None, help="comma-separated lengths [compare: 128,512,2048; scaling: 1K x 2^k]")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4, help="BK layers")
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=512)
    p.add_argument("--transformer-layers", type=int, default=0, help="fix them (0: search)")
    p.add_argument("--mamba-layers", type=int, default=0, help="fix them (0: search)")
    p.add_argument("--models", default=",".join(MODELS), help="--compare: which, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="--compare: updates per length")
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=None, help="warmup updates per length [steps // 5]")
    p.add_argument("--val-tokens", type=int, default=8192)
    p.add_argument("--corpus", type=Path, default=data.default_corpus())
    p.add_argument("--max-tokens", type=int, default=2_000_000, help="tokenize files until this many (0: all)")
    p.add_argument("--val-share", type=float, default=0.05)
    p.add_argument("--model", choices=MODELS, default="bk", help="--scaling: which model")
    p.add_argument("--max-len", type=int, default=131_072, help="--scaling: longest training step")
    p.add_argument("--eval-max", type=int, default=1 << 20, help="--scaling: stream length (0: no stream)")
    p.add_argument("--chunk", type=int, default=4096, help="--scaling: stream chunk")
    p.add_argument("--repeats", type=int, default=2, help="--scaling: training steps per length (best counts)")
    p.add_argument("--grad-checkpoint", action="store_true", help="--scaling: recompute each block in the backward")
    p.add_argument(
        "--train-chunk",
        type=int,
        default=8192,
        help="--scaling, bk: longer steps go a chunk at a time through the carried state (0: one graph)",
    )
    p.add_argument("--no-head", action="store_true", help="--scaling: train steps without the head and loss")
    p.add_argument("--memory-limit-gb", type=float, default=None, help="skip beyond this estimate [60%% of RAM]")
    p.add_argument("--max-seconds", type=float, default=300.0, help="skip a length estimated to take longer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args()

    from mlx_ltc import hardware

    hardware.ensure_fast_blas(script=__file__)
    machine = hardware.describe()
    args.memory_limit_gb = args.memory_limit_gb or 0.6 * machine["memory_gb"]
    args.models = [m.strip() for m in args.models.split(",")]
    if args.lens:
        args.lens = sorted({int(x.replace("_", "")) for x in args.lens.split(",")})
    elif args.compare:
        args.lens = [128, 512, 2048]
    bk_cfg = BKConfig(vocab_size=0, d_model=args.d_model, n_layers=args.layers, channels=args.channels,
                      n_experts=args.experts, top_k=args.top_k, expert_hidden=args.expert_hidden)  # fmt: skip
    print(
        f"{machine['platform']} ({machine['device']}, {machine['cpu_cores']} cores, {machine['memory_gb']} GB), "
        f"MLX {machine['mlx_version']}"
    )
    result = compare(args, bk_cfg) if args.compare else scaling(args, bk_cfg)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, **result}, indent=1, default=str))
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
