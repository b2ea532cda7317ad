"""`mlx-ltc profile`: measure the machine, then find the longest sequence a real training step fits.

The search runs real LoRA training steps (forward, backward, AdamW update) of the configured model
and memory engine, doubling L until a step no longer fits the budget, then bisecting. A step "fits"
when MLX's peak memory (weights included) stays within the budget; a step that goes over is
stopped at the next evaluation boundary, and an allocation failure counts as "does not fit".
"""

import dataclasses
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_ltc import atomic
from mlx_ltc.errors import UserError
from mlx_ltc.records import Record

__all__ = ["Machine", "Probe", "Profile", "cached", "format_size", "machine", "parse_size", "run_profile", "search"]

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """'5.3GB' (decimal), '5GiB' (binary), '800MB', '1500000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise UserError(f"memory size {text!r} not understood; use e.g. 5.3GB, 1500MB or 4GiB")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise UserError(f"memory size {text!r} must be positive")
    return int(value)


def format_size(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def backend() -> str:
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "cpu"


@dataclass(frozen=True)
class Machine(Record):
    backend: str
    device_name: str
    total_memory: int
    available_memory: int
    cores: int
    physical_cores: int | None
    mlx_version: str
    gpu_memory: int | None = None
    gpu_working_set: int | None = None

    def to_json(self) -> dict:  # a CPU has no GPU keys
        return {k: v for k, v in super().to_json().items() if v is not None or not k.startswith("gpu_")}


def machine() -> Machine:
    import psutil

    vm = psutil.virtual_memory()
    kind = backend()
    gpu = mx.device_info() if kind != "cpu" else {}
    return Machine(
        backend=kind,
        device_name=str(mx.device_info().get("device_name", "")),
        total_memory=vm.total,
        available_memory=vm.available,
        cores=os.cpu_count(),
        physical_cores=psutil.cpu_count(logical=False),
        mlx_version=mx.__version__,
        gpu_memory=gpu.get("memory_size"),
        gpu_working_set=gpu.get("max_recommended_working_set_size"),
    )


def default_budget(info: Machine) -> int:
    """What this machine lets MLX use: Metal's recommended working set, else 80% of available RAM."""
    return int(info.gpu_working_set or (info.gpu_memory or info.available_memory) * 0.8)


def matmul_gflops(kind: str, n: int, repeats: int = 3) -> float:
    """Throughput of an (n x n) @ (n x n) matmul: fp32, bf16, or 4-bit weights (group 64)."""
    x = mx.random.normal((n, n)).astype(mx.bfloat16 if kind == "bf16" else mx.float32)
    w = mx.random.normal((n, n)).astype(x.dtype)
    if kind == "q4":
        wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
        op = lambda: mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=4)
    else:
        op = lambda: x @ w
    mx.eval(op())
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(op())
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def bf16_supported() -> bool:
    try:
        mx.eval(mx.ones((4, 4), dtype=mx.bfloat16) @ mx.ones((4, 4), dtype=mx.bfloat16))
        return True
    except (RuntimeError, ValueError):
        return False


@dataclass(frozen=True)
class Probe(Record):
    seq_len: int
    fits: bool
    peak_bytes: int | None  # None: stopped early (over budget) or failed to allocate
    step_s: float | None
    tokens_per_s: float | None
    layers_per_stage: int
    note: str = ""


@dataclass(frozen=True)
class Profile(Record):
    """The longest training step that fits this machine's budget, with how it was found."""

    model: str
    backend: str
    device_name: str
    memory_budget: int
    weights_bytes: int
    max_seq_len: int
    tokens_per_s: float
    layers_per_stage: int
    batch_size: int
    settings: dict  # what was searched: memory engine, LoRA, batch, max_len, granularity (the cache's key)
    machine: Machine
    matmul_gflops: dict[str, float]
    bf16: bool
    probes: list[Probe] = field(default_factory=list)
    created: str = ""
    max_len_reached: bool = False  # the search stopped at its --max-len: longer may fit
    policy: str = ""  # the memory policy searched (train.policies), custom when no policy matches the settings
    planned_max_seq_len: int | None = None  # the planner's longest L in the budget, where the search started
    planned_peak_bytes: int | None = None  # the planner's peak at the measured longest L


class _OverBudget(Exception):
    pass


def _is_oom(e: Exception) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or any(s in text for s in ("allocate", "out of memory", "malloc"))


def probe(model, memory_cfg, seq_len: int, budget: int | None, batch_size: int = 1, seed: int = 0) -> Probe:
    """One real training step at seq_len: forward, backward, AdamW update. Model already has LoRA."""
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_ltc.train import engine
    from mlx_ltc.train.update import accumulate_gradients

    def check():
        if budget is not None and mx.get_peak_memory() > budget:
            raise _OverBudget

    vocab = model.args.vocab_size
    tokens = mx.array(np.random.default_rng(seed).integers(0, vocab, (batch_size, seq_len + 1), dtype=np.int32))
    lengths = mx.array([seq_len + 1] * batch_size)
    saved = tree_flatten(model.trainable_parameters())
    step_fn = engine.loss_and_grad(model, memory_cfg, on_stage=check)
    optimizer = optim.AdamW(learning_rate=1e-5)
    k = memory_cfg.layers_per_stage or 1
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    try:
        grads, _, _, _ = accumulate_gradients(step_fn, model, [(tokens, lengths, 0)])
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state)
        check()
    except _OverBudget:
        return Probe(seq_len, False, None, None, None, k, "over budget")
    except (RuntimeError, MemoryError) as e:
        if not _is_oom(e):
            raise
        return Probe(seq_len, False, None, None, None, k, f"allocation failed: {str(e).splitlines()[0][:120]}")
    finally:
        grads = optimizer = None
        model.update(tree_unflatten(saved))  # probes leave the adapters as they were
        mx.clear_cache()
    step_s = time.perf_counter() - start
    peak = mx.get_peak_memory()
    return Probe(seq_len, True, peak, step_s, batch_size * seq_len / step_s, k)


def search(try_len, start: int, max_len: int, granularity: int, log=print, floor: int | None = None) -> tuple:
    """Largest L in [floor, max_len] (multiple of granularity) with try_len(L).fits: from `start`, doubling while
    it fits, halving (down to floor, default start) while it doesn't, then bisection. Returns (best probe or
    None, all probes)."""
    probes, best = [], None

    def attempt(n):
        nonlocal best
        p = try_len(n)
        probes.append(p)
        verdict = f"fits, peak {format_size(p.peak_bytes)}, {p.tokens_per_s:,.0f} tok/s" if p.fits else None
        log(f"  L={n:>7,}: " + (verdict or f"does not fit ({p.note})"))
        if p.fits and (best is None or n > best.seq_len):
            best = p
        return p.fits

    lo, hi, n = None, None, start
    while n <= max_len:
        if not attempt(n):
            hi = n
            break
        lo, n = n, n * 2
    floor = start if floor is None else floor
    n = hi
    while lo is None and n is not None and n // 2 >= floor:  # the first guess was too long: halve
        n = max(floor, n // 2 // granularity * granularity)
        if attempt(n):
            lo = n
        else:
            hi = n
            if n == floor:
                break
    if lo is None:
        return None, probes
    if hi is None:
        if lo < max_len and attempt(max_len):
            return best, probes
        hi = max_len if lo < max_len else None
    while hi is not None and hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo:
            break
        lo, hi = (mid, hi) if attempt(mid) else (lo, mid)
    return best, probes


def _key(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "model"


def _engine_key(memory: dict) -> str:
    """Profiles are kept per memory-engine setting; the checkpoint policy is an output, not a key."""
    import hashlib
    import json

    memory = {k: v for k, v in memory.items() if k != "policy"}  # the parts are the setting
    settings = json.dumps({**memory, "layers_per_stage": 0}, sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()[:10]


def cache_path(cache_dir: Path, model: str, backend_name: str, memory: dict) -> Path:
    return Path(cache_dir) / "profiles" / f"{_key(model)}__{backend_name}__{_engine_key(memory)}.json"


def cached(cache_dir: Path, model: str, memory: dict, settings: dict | None = None, budget: int | None = None):
    """The last profile of this model on this backend with this memory engine setting (and these
    search settings and budget, when given), or None."""
    import json

    path = cache_path(cache_dir, model, backend(), memory)
    try:
        found = Profile.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, UserError):  # none, or unreadable: measure again
        return None
    if settings is not None and found.settings != settings:
        return None
    if budget is not None and found.memory_budget != budget:
        return None
    return found


def run_profile(cfg, cache_dir: Path, force: bool = False, log=print) -> Profile:
    """Measure the machine and search the longest L; cached per model and backend."""
    from mlx_ltc import models
    from mlx_ltc.train.lora import apply_lora
    from mlx_ltc.train.update import enable_grad_checkpoint

    from mlx_ltc.train.policies import POLICIES

    if cfg.memory.policy in POLICIES:  # a named policy: profile its settings (auto and custom: the parts as set)
        import json

        p = POLICIES[cfg.memory.policy]
        model_dir = models.resolve(cfg.model.name, cache_dir, cfg.model.bits, cfg.model.group_size)
        n_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
        train = dataclasses.replace(cfg.train, grad_checkpoint=p.checkpoint)
        cfg = dataclasses.replace(cfg, memory=p.memory(cfg.memory, n_layers), train=train)
    asked, info = cfg.profile, machine()
    budget = parse_size(asked.memory_budget) if asked.memory_budget else default_budget(info)
    max_len = asked.max_len or (8192 if info.backend == "cpu" else 131072)
    granularity, start, batch_size = asked.granularity, asked.start, asked.batch_size
    settings = {"memory": asdict(cfg.memory), "lora": asdict(cfg.lora), "batch_size": batch_size, "max_len": max_len,
                "granularity": granularity, "dequantize": cfg.model.dequantize,
                "grad_checkpoint": cfg.train.grad_checkpoint}  # fmt: skip
    hit = None if force else cached(cache_dir, cfg.model.name, settings["memory"], settings, budget)
    if hit:
        log(f"profile: cached result from {hit.created} (--force to measure again)")
        return hit

    log(
        f"profile: {info.backend} ({info.device_name}), {info.cores} cores, "
        f"{format_size(info.total_memory)} RAM, budget {format_size(budget)}"
    )
    small = 256 if info.backend == "cpu" else 1024
    gflops = {
        k: round(matmul_gflops(k, small if k != "fp32" and info.backend == "cpu" else 1024), 1)
        for k in ("fp32", "bf16", "q4")
    }
    log(f"profile: matmul GFLOP/s {gflops}")

    model_dir = models.resolve(cfg.model.name, cache_dir, cfg.model.bits, cfg.model.group_size)
    loaded = models.load(model_dir, cfg.model.dequantize)
    apply_lora(loaded.model, cfg.lora, seed=0)
    if cfg.train.grad_checkpoint and not cfg.memory.staged:
        enable_grad_checkpoint(loaded.model)
    mx.eval(loaded.model.parameters())
    mx.clear_cache()
    weights = mx.get_active_memory()
    smallest = probe(loaded.model, cfg.memory, 128, None, batch_size)
    if weights >= budget or smallest.peak_bytes > budget:
        raise UserError(
            f"memory budget {format_size(budget)} is below what {cfg.model.name} needs: weights "
            f"{format_size(weights)}, and a training step at 128 tokens peaks at {format_size(smallest.peak_bytes)}; "
            f"give at least {format_size(smallest.peak_bytes)}"
        )

    n_layers = len(loaded.model.layers)
    plans = [cfg.memory.layers_per_stage] if cfg.memory.layers_per_stage else [1, math.ceil(math.sqrt(n_layers))]
    if not cfg.memory.staged:
        plans = [0]

    def try_len(n):
        last = None
        for k in plans:
            last = probe(loaded.model, dataclasses.replace(cfg.memory, layers_per_stage=k), n, budget, batch_size)
            if last.fits:
                break
        return last

    planned = _planned(cfg, loaded, batch_size, budget, granularity)
    first = start
    if planned:
        first = min(max_len, max(start, planned["max_seq_len"] // granularity * granularity))
        expected = f"{planned['max_seq_len']:,} tokens"
        log(f"profile: the planner ({planned['policy']}) expects up to {expected}: trying that first")
    log(f"profile: searching the longest sequence (real training steps of {cfg.model.name}, batch {batch_size})")
    best, probes = search(try_len, first, max_len, granularity, log, floor=start)
    if best is None:
        raise UserError(
            f"no sequence length from {start} fits in {format_size(budget)} (a 128-token step peaks at "
            f"{format_size(smallest.peak_bytes)})"
        )
    profile = Profile(
        model=cfg.model.name,
        backend=info.backend,
        device_name=info.device_name,
        memory_budget=budget,
        weights_bytes=weights,
        max_seq_len=best.seq_len,
        tokens_per_s=best.tokens_per_s,
        layers_per_stage=best.layers_per_stage,
        batch_size=batch_size,
        settings=settings,
        machine=info,
        matmul_gflops=gflops,
        bf16=bf16_supported(),
        probes=probes,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        max_len_reached=best.seq_len >= max_len,
        policy=planned["policy"] if planned else "custom",
        planned_max_seq_len=planned["max_seq_len"] if planned else None,
        planned_peak_bytes=planned["peak"](best.seq_len) if planned else None,
    )
    atomic.write_json(cache_path(cache_dir, cfg.model.name, info.backend, settings["memory"]), profile.to_json())
    return profile


def _planned(cfg, loaded, batch_size: int, budget: int, granularity: int) -> dict | None:
    """The planner's answer for the policy these memory settings are; None when none is or it can't price the model."""
    from mlx_ltc.hardware import planner
    from mlx_ltc.train.policies import POLICIES

    m, staged_k = cfg.memory, cfg.memory.layers_per_stage
    n_layers = len(loaded.model.layers)
    for p in POLICIES.values():
        same = (p.attention, p.loss, p.staged) == (m.attention, m.loss, m.staged)
        same = same and (p.checkpoint == (cfg.train.grad_checkpoint and not m.staged))
        if same and (not staged_k or p.layers_per_stage(n_layers) == staged_k) and not p.fused:
            break
    else:
        return None
    try:
        shape = planner.Shape.from_config(loaded.config, cfg.model.name)
    except UserError:
        return None
    setup = planner.setup_for(loaded, cfg, batch_size, backend())
    longest = planner.max_seq_len(shape, setup, p.name, budget, granularity)
    peak = lambda n: planner.predict(shape, setup, p.name, n)["peak"]  # noqa: E731
    return {"policy": p.name, "max_seq_len": longest, "peak": peak}


def summary(p: Profile) -> str:
    capped = " (the search's --max-len; more may fit)" if p.max_len_reached else ""
    staged = p.settings["memory"]["staged"]
    plan = f"staged, a checkpoint every {p.layers_per_stage} layer(s)" if staged else "one lazy graph per step"
    return (
        f"{p.model} on {p.backend} ({p.device_name}), budget {format_size(p.memory_budget)}, "
        f"weights {format_size(p.weights_bytes)}\n"
        f"  matmul GFLOP/s: " + ", ".join(f"{k} {v}" for k, v in p.matmul_gflops.items()) + f"; bf16 {p.bf16}\n"
        f"  longest training sequence: {p.max_seq_len:,} tokens{capped} at {p.tokens_per_s:,.0f} tokens/s "
        f"({plan}, batch {p.batch_size})\n"
    ) + (
        f"  planned ({p.policy}): longest {p.planned_max_seq_len:,} tokens; at {p.max_seq_len:,} a peak of "
        f"{format_size(p.planned_peak_bytes)}, measured {format_size(_peak_at(p))}\n"
        if p.planned_max_seq_len is not None
        else ""
    )


def _peak_at(p: Profile) -> int:
    return next((x.peak_bytes for x in p.probes if x.seq_len == p.max_seq_len and x.fits), 0)
