"""`mlx-ltc plan`: the peak memory of a LoRA training step for every memory policy, from config.json alone.

No weights are loaded. The peak is a sum of priced terms:
- fixed: the weights (quantized: packed bits plus a scale and a bias per group) and the LoRA state
  (parameters, gradients, AdamW's two moments, fp32);
- activations, per policy (`train.policies`), in units the model's config gives: a layer's input
  (B x L x hidden), its MLP width (B x L x intermediate), MLX's L x L attention scores where the
  backend's attention VJP materialises them, fp32 logits (B x L x vocab), the head's weight (which MLX
  copies for an unquantized head's backward), and the engine's working blocks (`memory.block_mb`).
Layer inputs kept as checkpoints are counted exactly (one per layer, or per stage). How many of the other
units are alive at the peak is a measured constant per policy (`COEFFICIENTS`), fitted on this
machine's `scripts/validate_planner.py` measurements; each prediction's error against MLX's measured
peak is in docs/bench/planner-validation.md.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlx_ltc.errors import UserError
from mlx_ltc.train.policies import NAMES, POLICIES, Policy

__all__ = ["Plan", "Row", "Setup", "Shape", "choose", "plan", "predict"]

ARCHITECTURES = {"llama": 3, "starcoder2": 2, "mistral": 3, "qwen2": 3}  # model_type -> MLP matrices
_DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2}
# mlx-lm names in config.json: the ones without a default must be there
_REQUIRED = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")

# Fitted by `scripts/validate_planner.py --fit` on CPU (MLX 0.32.4) measurements at 1K-8K tokens of
# tiny-starcoder2, smollm2-135m and the StarCoder2-3B shape (1 and 2 layers), fp32 (bf16: below)
# (docs/bench/planner-validation.{json,md}): per policy, its phases (the loss; a layer's backward), each
# the number of each unit alive at that phase's peak; the step's peak is the larger phase. `fused` was
# not measured (no backend here runs MLX's fused attention backward): the engine's terms, and chunked's
# L x L scores where the backend's VJP materialises them.
COEFFICIENTS = {
    "plain": [{"layer_all": 12.5889, "mlp_all": 2.4041, "scores_all": 1.0769, "head": 0.4264, "logits": 3.0327},
              {"layer_all": 33.7854, "mlp_all": 0.0, "scores_all": 0.0, "head": 0.7092, "scores": 3.6275}],
    "stock": [{"layer": 0.0, "head": 0.0, "logits": 4.2912},
              {"layer": 0.0, "head": 0.6627, "logits": 1.8045, "mlp": 0.0, "scores": 4.2429}],
    "chunked": [{"layer": 0.0, "head": 0.0, "loss_block": 2.3882},
                {"layer": 0.0, "head": 0.6528, "mlp": 2.645, "scores": 4.3233}],
    "efficient": [{"layer": 58.8899, "head": 0.0, "loss_block": 0.7519},
                  {"layer": 0.0, "mlp": 0.0, "attn_block": 2.3167}],
    "fused": [{"layer": 21.4773, "head": 0.0, "loss_block": 1.7204},
              {"layer": 16.2375, "mlp_block": 0.0, "scores": 4.3233}],
    "engine": [{"layer": 21.4773, "head": 0.0, "loss_block": 1.7204},
               {"layer": 16.2375, "mlp_block": 0.0, "attn_block": 2.1613}],
    "engine_sqrt": [{"layer": 21.5174, "head": 0.0, "loss_block": 1.6883},
                    {"layer": 0.0, "mlp_block": 0.0, "attn_block": 2.2364}],
}  # fmt: skip
# bf16/fp16: the loss side's units (logits, loss blocks, head) times this factor, the rest at 2 bytes per element;
# fitted on the tiny model in bf16 (its activations are nearly all loss side), with the fp32 coefficients fixed
LOW_PRECISION_LOSS = {"plain": 1.35, "stock": 0.5, "chunked": 1.25, "efficient": 3.7, "fused": 1.6, "engine": 1.6,
                      "engine_sqrt": 1.65}  # fmt: skip
MARGIN = {name: 1.0 for name in COEFFICIENTS}  # per policy, the smallest factor leaving no cell > 4% under
# fastest first, measured by scripts/bench_step.py (smollm2-135m, 512 tokens, LoRA rank 8; `fused` not
# measured, placed before the engine); other backends use cpu's order
SPEED_ORDER = {"cpu": ("plain", "chunked", "stock", "efficient", "fused", "engine", "engine_sqrt")}


@dataclass(frozen=True)
class Shape:
    """What a model's config.json says about the sizes a training step allocates."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    tied: bool
    window: int | None  # sliding-window attention span, None: full causal
    mlp_matrices: int  # 3 for gated (llama), 2 for starcoder2
    bias: bool
    quantization: dict | None  # config.json's {"bits", "group_size"} for an mlx-lm quantized model

    @classmethod
    def from_config(cls, config: dict, name: str) -> "Shape":
        kind = config.get("model_type")
        if kind not in ARCHITECTURES:
            raise UserError(
                f"{name}: model_type {kind!r} can't be priced: the planner knows the layers of "
                f"{', '.join(ARCHITECTURES)} (attention, MLP and norms); it does not guess others'"
            )
        missing = [k for k in _REQUIRED if not isinstance(config.get(k), int) or config[k] <= 0]
        if missing:
            raise UserError(f"{name}: config.json has no positive integer {', '.join(missing)}")
        heads = config["num_attention_heads"]
        window = config.get("sliding_window") if kind == "starcoder2" else None
        return cls(
            name=name,
            model_type=kind,
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            mlp=config["intermediate_size"],
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", kind == "starcoder2")),
            window=window if isinstance(window, int) and window > 0 else None,
            mlp_matrices=ARCHITECTURES[kind],
            bias=bool(config.get("use_bias", kind == "starcoder2") or config.get("attention_bias", False)),
            quantization=config.get("quantization"),
        )

    @classmethod
    def read(cls, path: Path) -> "Shape":
        path = Path(path)
        return cls.from_config(_read_json(path / "config.json" if path.is_dir() else path), str(path))

    def linears(self) -> list[tuple[str, int, int]]:
        """(module, in, out) of one layer's linear layers."""
        d, kv = self.hidden, self.kv_heads * self.head_dim
        attn = [("self_attn.q_proj", d, self.heads * self.head_dim), ("self_attn.k_proj", d, kv),
                ("self_attn.v_proj", d, kv), ("self_attn.o_proj", self.heads * self.head_dim, d)]  # fmt: skip
        if self.mlp_matrices == 3:
            mlp = [("mlp.gate_proj", d, self.mlp), ("mlp.up_proj", d, self.mlp), ("mlp.down_proj", self.mlp, d)]
        else:
            mlp = [("mlp.c_fc", d, self.mlp), ("mlp.c_proj", self.mlp, d)]
        return attn + mlp


@dataclass(frozen=True)
class Setup:
    """How the model is trained: what config.json doesn't say."""

    dtype: str = "fp32"  # activations and unquantized weights
    bits: int = 0  # 0: dequantized (mlx-ltc on a CPU), else the weights' quantization
    group_size: int = 64
    embed_bits: int | None = None  # the embedding's quantization when it differs (mlx-lm per-module settings)
    lora_rank: int = 8
    lora_targets: tuple = ("self_attn", "mlp")
    lora_layers: int = -1
    batch: int = 1
    block_mb: int = 64
    backend: str = "cpu"
    context_ranks: int = 1  # memory.context_parallel over this many ranks: the peak is one rank's

    @property
    def act(self) -> int:
        return _DTYPES[self.dtype]


PACKAGED = {  # config.json of models a Mac trains, for planning on any machine without the Hub
    "starcoder2-3b": "starcoder2-3b",
    "bigcode/starcoder2-3b": "starcoder2-3b",
    "mlx-community/starcoder2-3b-4bit": "starcoder2-3b",
}


def model_config(name: str, cache_dir: Path) -> tuple[dict, str]:
    """(config.json, where it was found) of a model, without loading or downloading weights: a path (a model
    directory or its config.json), a built-in model, a config shipped with mlx-ltc, or the Hugging Face cache."""
    path = Path(name).expanduser()
    if path.exists() or name.endswith(".json"):
        shape_source = path / "config.json" if path.is_dir() else path
        return _read_json(shape_source), str(shape_source)
    from mlx_ltc import models

    if name in models.BUILTIN:
        source = models.resolve(name, cache_dir) / "config.json"
        return _read_json(source), str(source)
    if name in PACKAGED:
        source = Path(__file__).parent.parent / "models" / "configs" / f"{PACKAGED[name]}.json"
        return _read_json(source), f"{source.name} shipped with mlx-ltc"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a repo id, or no cache: same answer
        cached = None
    if isinstance(cached, str):
        return _read_json(Path(cached)), cached
    raise UserError(
        f"--model {name}: no config.json found (not a path, a built-in model, a config shipped with mlx-ltc "
        f"({', '.join(sorted(PACKAGED))}) or in the Hugging Face cache); give the path of its config.json"
    )


def _read_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such config.json") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not a readable config.json ({e.__class__.__name__}: {e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a config.json object")
    return config


def _matrix_bytes(n_in: int, n_out: int, s: Setup, bits: int | None = None) -> int:
    bits = s.bits if bits is None else bits
    if not bits:
        return n_in * n_out * s.act
    return n_in * n_out * bits // 8 + 2 * n_out * math.ceil(n_in / s.group_size) * s.act


def weights_bytes(shape: Shape, s: Setup) -> int:
    layer = sum(_matrix_bytes(i, o, s) for _, i, o in shape.linears())
    layer += 2 * shape.hidden * s.act * (2 if shape.model_type == "starcoder2" else 1)  # norms (and biases)
    if shape.bias:
        layer += sum(o for _, _, o in shape.linears()) * s.act
    embed = _matrix_bytes(shape.hidden, shape.vocab, s, s.embed_bits if s.bits else 0)
    head = 0 if shape.tied else embed
    return shape.layers * layer + embed + head + shape.hidden * s.act


def lora_bytes(shape: Shape, s: Setup) -> int:
    """LoRA parameters, their gradients and AdamW's two moments, fp32."""
    per_layer = sum(
        s.lora_rank * (i + o) for name, i, o in shape.linears() if any(name.startswith(t) for t in s.lora_targets)
    )
    layers = shape.layers if s.lora_layers < 0 else min(s.lora_layers, shape.layers)
    return 4 * 4 * per_layer * layers


def units(shape: Shape, s: Setup, L: int) -> dict:
    """The sizes the activation terms are counted in, bytes."""
    B, a = s.batch, s.act
    # MLX's unfused attention builds L x L scores even under a sliding window (the window is a mask)
    layer, mlp, scores = B * L * shape.hidden * a, B * L * shape.mlp * a, B * shape.heads * L * L * a
    logits, block = B * L * shape.vocab * 4, s.block_mb << 20
    # the engine's working blocks: four fp32 (rows x width) arrays, rows as numerics.attention.query_block,
    # train.engine._spans and train.engine.loss_chunk choose them (a floor on rows makes long L outgrow block_mb)
    q_rows = min(L, max(16, min(1024, block // (16 * B * shape.heads * L) // 16 * 16)))
    mlp_rows = min(L, max(128, block // (16 * B * shape.mlp) // 128 * 128))
    loss_rows = min(L, max(16, block // (16 * B * shape.vocab) // 16 * 16))
    keys = min(L, shape.window + q_rows) if shape.window else L  # a block's queries reach this many keys
    n = shape.layers
    # the head's (vocab x hidden) weight, which MLX copies (transposed) for an unquantized tied head's backward
    head = 0 if s.bits else shape.vocab * shape.hidden * a
    return {"layer": layer, "mlp": mlp, "scores": scores, "logits": logits, "head": head,
            "attn_block": 16 * B * shape.heads * q_rows * keys, "mlp_block": 16 * B * shape.mlp * mlp_rows,
            "loss_block": 16 * B * shape.vocab * loss_rows,
            "layer_all": n * layer, "mlp_all": n * mlp, "scores_all": n * scores}  # fmt: skip


# copies of one layer's gathered (B, Hkv, L, 2D) keys and values alive at once under context parallelism: a
# count from the code, not fitted (the planner came out 3-6% high against the measured cells, bench_distributed.py)
GATHERED_KV = 4


def kept_checkpoints(policy: Policy, shape: Shape) -> int:
    """Layer inputs alive at the backward's start: one per layer (or per stage, plus a stage's recomputed ones)."""
    if policy.name == "plain":
        return 0
    if not policy.staged:
        return shape.layers
    k = policy.layers_per_stage(shape.layers)
    return math.ceil(shape.layers / k) + (k - 1)


def fused_vjp(shape: Shape, s: Setup, L: int | None = None) -> tuple[bool, str]:
    """Whether MLX's own attention trains without L x L scores here (a sliding window longer than L is a mask array)."""
    from mlx_ltc.hardware.attention_paths import fused_vjp as backend_fused_vjp

    mask = "array" if shape.window and L is not None and L > shape.window else "causal"
    return backend_fused_vjp(s.backend, shape.head_dim, s.dtype, mask, seq_len=L)


def predict(shape: Shape, s: Setup, policy: str, L: int) -> dict:
    """{"peak": bytes, "terms": {term: bytes}} of one training step at L tokens (one rank's, with context
    parallelism: its share of the positions, attention blocks over all the keys, the gathered K/V)."""
    p = POLICIES[policy]
    ranks = s.context_ranks if p.staged and p.attention == "efficient" else 1
    u = units(shape, s, -(-L // (2 * ranks)) * 2 if ranks > 1 else L)
    if ranks > 1:
        u = u | {"attn_block": units(shape, s, L)["attn_block"]}
    if p.attention == "stock" and fused_vjp(shape, s, L)[0]:  # MLX's fused backward: no L x L scores
        u = u | {"scores": 0, "scores_all": 0}
    coefficients = COEFFICIENTS[policy]
    terms = {"weights": weights_bytes(shape, s), "lora": lora_bytes(shape, s),
             "checkpoints": kept_checkpoints(p, shape) * u["layer"]}  # fmt: skip
    if ranks > 1:  # every rank's K|V of a layer, gathered, and their summed gradient in the backward
        terms["gathered_kv"] = GATHERED_KV * s.batch * shape.kv_heads * L * 2 * shape.head_dim * s.act
    if s.dtype != "fp32":  # the head's output and its fp32 copy differ below fp32: the loss side's own factor
        u = u | {k: u[k] * LOW_PRECISION_LOSS[policy] for k in ("logits", "loss_block", "head")}
    phases = [{unit: round(c * u[unit]) for unit, c in phase.items() if c} for phase in coefficients]
    terms |= max(phases, key=lambda t: sum(t.values()))
    return {"peak": round(sum(terms.values()) * MARGIN[policy]), "terms": terms}


def max_seq_len(shape: Shape, s: Setup, policy: str, budget: int, granularity: int = 256, cap: int = 1 << 22) -> int:
    """The longest L (a multiple of granularity, at most cap) whose predicted peak fits; 0 when none does."""
    fits = lambda n: predict(shape, s, policy, n)["peak"] <= budget  # noqa: E731
    if not fits(granularity):
        return 0
    lo, hi = granularity, granularity
    while hi < cap and fits(min(hi * 2, cap)):
        lo = hi = min(hi * 2, cap)
    if hi >= cap:
        return cap
    hi = min(hi * 2, cap)
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@dataclass(frozen=True)
class Row:
    policy: str
    seq_len: int
    peak_bytes: int
    fits: bool
    max_seq_len: int
    available: bool = True  # the backend can run it as priced
    note: str = ""
    terms: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    model: str
    budget_bytes: int
    seq_len: int
    setup: Setup
    policies: list[Row]
    auto: str | None  # the fastest policy that fits with the margin; None: none does
    why: str

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["setup"] = asdict(self.setup)
        return doc


def available(shape: Shape, s: Setup, policy: str) -> tuple[bool, str]:
    if POLICIES[policy].fused:
        return fused_vjp(shape, s)
    return True, ""


def choose(rows: list[Row], backend: str, budget: int, reserve: float = 0.1, where: str = "the budget") -> tuple:
    """(policy or None, why): the fastest available policy whose predicted peak fits budget x (1 - reserve), in
    the speed order measured on this backend (cpu's where no other was measured)."""
    order = SPEED_ORDER.get(backend, SPEED_ORDER["cpu"])
    measured = "" if backend in SPEED_ORDER else f"; speed order measured on cpu, not {backend}"
    by = {r.policy: r for r in rows if r.available}
    limit = budget * (1 - reserve)
    room = f"{limit / 1e9:.2f} GB ({where} less {reserve:.0%})"
    for name in [n for n in order if n in by]:
        if by[name].peak_bytes <= limit:
            faster = [n for n in order[: order.index(name)] if n in by]
            why = f"{name}, the fastest policy, fits" if not faster else f"{name} is the fastest that fits"
            over = f"; {', '.join(faster)} would not" if faster else ""
            return name, f"{why} {room}: predicted peak {by[name].peak_bytes / 1e9:.2f} GB{over}{measured}"
    seq = rows[0].seq_len if rows else 0
    return None, f"no policy fits {room} at {seq:,} tokens"


def setup_from_config(config: dict, cfg, backend: str, batch: int, dtype=None, bits=None) -> Setup:
    """How mlx-ltc would train this config.json's model on `backend`: dequantized to fp32 on a CPU, else
    quantized (the config's own quantization, or model.bits) with the config's float dtype."""
    quantization = config.get("quantization") or {}
    if bits is None:
        bits = 0 if backend == "cpu" else int(quantization.get("bits", cfg.model.bits))
    if dtype is None:
        torch_dtype = str(config.get("torch_dtype", "bfloat16"))
        dtype = "fp32" if backend == "cpu" else {"float16": "fp16", "float32": "fp32"}.get(torch_dtype, "bf16")
    return _setup(cfg, quantization, dtype, bits, batch, backend)


def setup_for(loaded, cfg, batch: int, backend: str) -> Setup:
    """The Setup of a loaded model (models.LoadedModel) trained with this config on `backend`."""
    quantization = (getattr(loaded, "config", None) or {}).get("quantization") or {}
    dequantized = getattr(loaded, "dequantized", True) or not quantization
    dtype = str(getattr(loaded, "dtype", "float32"))
    act = "fp32" if dequantized or "float32" in dtype.split(",") else "fp16" if "float16" in dtype else "bf16"
    bits = 0 if dequantized else int(quantization.get("bits", cfg.model.bits))
    return _setup(cfg, quantization, act, bits, batch, backend)


def _setup(cfg, quantization: dict, dtype: str, bits: int, batch: int, backend: str) -> Setup:
    embed = quantization.get("model.embed_tokens")  # mlx-lm's per-module quantization
    return Setup(
        dtype=dtype,
        bits=bits,
        group_size=int(quantization.get("group_size", cfg.model.group_size)),
        embed_bits=embed.get("bits") if isinstance(embed, dict) and bits else None,
        lora_rank=cfg.lora.rank or 8,
        lora_targets=tuple(cfg.lora.targets),
        lora_layers=cfg.lora.layers,
        batch=batch,
        block_mb=cfg.memory.block_mb,
        backend=backend,
    )


def plan(
    shape: Shape, s: Setup, budget: int, L: int, reserve: float = 0.1, policies=NAMES, where: str = "the budget"
) -> Plan:
    fixed = weights_bytes(shape, s) + lora_bytes(shape, s)
    if fixed >= budget:
        raise UserError(
            f"memory budget {budget / 1e9:.2f} GB is below {shape.name}'s weights and LoRA state "
            f"({fixed / 1e9:.2f} GB); give at least {fixed * 1.2 / 1e9:.2f} GB"
        )
    rows = []
    for name in policies:
        ok, note = available(shape, s, name)
        pred = predict(shape, s, name, L)
        fits = ok and pred["peak"] <= budget  # a policy this backend can't run as priced fits nothing
        rows.append(Row(name, L, pred["peak"], fits, max_seq_len(shape, s, name, budget) if ok else 0,
                        ok, note, pred["terms"]))  # fmt: skip
    auto, why = choose(rows, s.backend, budget, reserve, where)
    return Plan(shape.name, budget, L, s, rows, auto, why)


def describe(p: Plan) -> str:
    s = p.setup
    weights = "dequantized" if not s.bits else f"{s.bits}-bit (group {s.group_size})"
    head = (
        f"{p.model}: {p.seq_len:,} tokens x batch {s.batch}, {s.dtype} activations, {weights} weights, LoRA rank "
        f"{s.lora_rank}, {s.backend} backend, budget {p.budget_bytes / 1e9:.2f} GB"
        + (f" per rank, context parallel over {s.context_ranks} ranks (engine policies)" if s.context_ranks > 1 else "")
    )
    lines = [head, f"  {'policy':<12} {'peak GB':>8}  {'fits':<4} {'longest L':>10}  note"]
    for r in p.policies:
        note = r.note if not r.available else POLICIES[r.policy].about
        fits = ("yes" if r.fits else "no") if r.available else "n/a"
        lines.append(f"  {r.policy:<12} {r.peak_bytes / 1e9:>8.2f}  {fits:<4} {r.max_seq_len:>10,}  {note}")
    lines.append(f"auto: {p.why}")
    return "\n".join(lines) + "\n"
