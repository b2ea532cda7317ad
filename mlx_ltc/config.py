"""Run configuration: frozen dataclasses, merged from defaults <- YAML file <- command-line flags.

Every key and type is checked; a mistake is a UserError that names the key.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mlx_ltc.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m"  # built-in name, local mlx-lm/HF directory, or Hugging Face id
    bits: int = 4  # used when the model is not already quantized
    group_size: int = 64
    dequantize: str = "auto"  # auto: dequantize to float32 on the CPU backend | always | never


@dataclass(frozen=True)
class DataConfig:
    seq_len: int | None = None  # None: derived by `analyze` (p95 rule), capped by the memory profile
    split: str = "85/10/5"  # train/val/test shares, assigned per file from a stable hash of its path
    split_by: str = "file"  # file | directory (all files of a directory share a split)
    max_file_bytes: int = 1_000_000
    min_entropy: float = 0.1  # drop files (>= 64 tokens) below this normalised token entropy
    near_duplicate: float = 0.85  # MinHash Jaccard of token 5-grams at which a file is a near duplicate
    fim_rate: float = 0.5  # share of train documents in fill-in-the-middle form, when the tokenizer has FIM tokens
    chains: bool = True  # commit-evolution chains from git history
    chain_versions: int = 6  # newest versions per chain
    chain_share: float = 0.25  # most of a split's tokens chains may take (whole chains dropped at random); 1: no cap
    qa: bool = True  # long-context QA probes for val/test
    qa_per_bucket: int = 8  # probes per distance bucket and split
    qa_max_len: int = 0  # longest probe prompt; 0 = seq_len
    augment: float = 0.0  # share of train files replaced by a variant (locals renamed, comments stripped)
    core_paths: list = field(default_factory=list)  # globs of core files; empty: the most-imported files
    weight_core: float = 3.0  # loss weights by file role
    weight_test: float = 0.3
    weight_doc: float = 1.0
    weight_other: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class LoraConfig:
    rank: int | None = None  # None: derived by `analyze` (8 * sqrt(seq_len / 512) * ln(files + 1), a power of two)
    scale: float = 2.0  # mlx-lm's convention: the update is scale * x @ A @ B
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["self_attn", "mlp"])  # module-path prefixes in each layer
    layers: int = -1  # adapt the last N transformer layers; -1 = all


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int | None = None  # None: run `epochs` over the training sequences
    epochs: float = 1.0
    batch_size: int | None = None  # None: from the memory profile when seq_len is below its maximum, else 1
    grad_accum: int = 1
    lr: float = 5e-4  # measured against 2e-4 on the embedded model (README, "Learning rate")
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    grad_checkpoint: bool = False  # per-layer mx.checkpoint; only used when memory.staged is false
    eval_batch_size: int = 4
    seed: int = 0
    backend: str = "mlx"  # mlx | torch (the reference: transformers on torch CPU, small models, no memory engine)


@dataclass(frozen=True)
class MemoryConfig:
    attention: str = "efficient"  # efficient: O(L)-memory custom backward | stock: MLX's scaled_dot_product_attention
    loss: str = "chunked"  # chunked: never materialise L x V logits | full
    staged: bool = True  # layer-by-layer forward and backward with explicit evaluation boundaries
    layers_per_stage: int = 0  # keep a checkpoint every k layers; 0 = from the memory profile, else 1
    loss_chunk: int = 0  # positions per loss chunk; 0 = as many as fit block_mb (4 fp32 rows of V logits each)
    block_mb: int = 64  # working-set target of one attention block or MLP chunk, MiB


@dataclass(frozen=True)
class CurriculumConfig:
    """Phases of growing sequence length. The lists are a template for n phases (n from `phases`, or the
    analysis' derived constant when 0): the last n lengths, shares and bands, the first n LR multipliers."""

    phases: int = 1  # 1: one phase at seq_len (measured: README "Curriculum"); 0: derived by `analyze` (1-3)
    lengths: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])  # of data.seq_len
    lr_mults: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.1])
    shares: list[float] = field(default_factory=lambda: [0.4, 0.35, 0.25])  # of the run's optimizer updates
    bands: list[float] = field(default_factory=lambda: [0.6, 0.85, 1.0])  # easiest share of sequences (difficulty)


@dataclass(frozen=True)
class OrchestratorConfig:
    """Rules applied at each validation eval (mlx_ltc/train/orchestrator.py)."""

    eval_every: int = 0  # optimizer steps between evals; 0: ~8 per phase
    eval_sequences: int = 8  # full-length val sequences per eval (cut to the phase's length)
    smoothing: float = 0.5  # EMA weight of the newest val loss
    converge_evals: int = 3  # advance when the smoothed val loss improved < converge_tol over this many evals
    converge_tol: float = 0.01
    min_phase_share: float = 0.5  # no convergence decision before this share of the phase's budget is spent
    context_tol: float = 0.01  # the window's last quarter must be this much (relative) below its second quarter
    plateau_evals: int = 3  # evals without a new best before the LR is reduced
    lr_factor: float = 0.5
    cooldown_evals: int = 2
    min_lr_factor: float = 0.0625
    diverge_rise: float = 0.05  # smoothed val this far above the phase's best: reduce the LR
    overfit_gap: float = 0.15  # train this far below val, with val rising twice: overfitting
    overfit_action: str = "stop"  # stop | regularize (restore the best, halve the LR, double weight decay)
    report_to: str = "none"  # none | wandb


@dataclass(frozen=True)
class StabilityConfig:
    spike_factor: float = 2.0  # a loss above this times the running median is a spike
    spike_window: int = 20  # steps in the running median
    spike_limit: int = 3  # spikes in a row: roll back to the last good checkpoint and lower the LR
    nan_limit: int = 3  # skipped non-finite updates in a row before a rollback
    max_rollbacks: int = 5  # then the run stops with an error
    inject_nan: list[int] = field(default_factory=list)  # fault injection: update attempts whose gradients are NaN
    inject_spike: list[int] = field(default_factory=list)  # attempts whose loss and gradients are scaled by 8


@dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = 0  # optimizer steps; 0: only at phase ends, new bests, Ctrl-C and the end
    keep_last: int = 3  # plus the best of the current phase


@dataclass(frozen=True)
class EvalConfig:
    """What train's final report measures besides validation perplexity (`mlx-ltc eval` measures more)."""

    completion_targets: int = 32  # held-out lines completed by the base and the adapted model (0: none)
    completion_modes: list = field(default_factory=lambda: ["in_file", "cross_file"])  # at the trained length
    forgetting_tokens: int = 8192  # standard-library tokens scored by both models (0: no forgetting check)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "model.dequantize": ("auto", "always", "never"),
    "model.bits": (2, 3, 4, 5, 6, 8),
    "model.group_size": (32, 64, 128),
    "memory.attention": ("efficient", "stock"),
    "memory.loss": ("chunked", "full"),
    "data.split_by": ("file", "directory"),
    "train.backend": ("mlx", "torch"),
    "orchestrator.overfit_action": ("stop", "regularize"),
    "orchestrator.report_to": ("none", "wandb"),
}
_POSITIVE = {
    "data.seq_len",
    "data.max_file_bytes",
    "lora.rank",
    "data.chain_versions",
    "data.qa_per_bucket",
    "train.batch_size",
    "train.grad_accum",
    "train.eval_batch_size",
    "train.max_steps",
    "memory.block_mb",
    "orchestrator.eval_sequences",
    "orchestrator.converge_evals",
    "orchestrator.plateau_evals",
    "stability.spike_window",
    "stability.spike_limit",
    "stability.nan_limit",
    "checkpoint.keep_last",
}


def _check_type(key, value, hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # int | None
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is list or typing.get_origin(hint) is list:
        item = (typing.get_args(hint) or (str,))[0]
        if isinstance(value, list):
            try:
                return [_check_type(key, v, item) for v in value]
            except UserError:
                pass
        kind = {str: "strings", float: "numbers", int: "integers"}[item]
        raise UserError(f"config: {key} must be a list of {kind}, got {value!r}")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserError(f"config: {key} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def merge(config: Config, updates: dict, source: str = "") -> Config:
    """A new Config with a nested dict of overrides applied, rejecting unknown keys and wrong types."""
    where = f" (in {source})" if source else ""
    if not isinstance(updates, dict):
        raise UserError(f"config{where}: expected a mapping of sections, got {type(updates).__name__}")
    sections = {}
    for section, values in updates.items():
        if section not in {f.name for f in dataclasses.fields(config)}:
            raise UserError(f"config{where}: unknown section {section!r}")
        if values is None:
            continue
        target = getattr(config, section)
        if not isinstance(values, dict):
            raise UserError(f"config{where}: section {section!r} must be a mapping")
        hints = typing.get_type_hints(type(target))
        for key in values:
            if key not in hints:
                raise UserError(f"config{where}: unknown key {section}.{key}")
        checked = {key: _check_type(f"{section}.{key}", value, hints[key]) for key, value in values.items()}
        sections[section] = dataclasses.replace(sections.get(section, target), **checked)
    config = dataclasses.replace(config, **sections)
    validate(config)
    return config


def validate(config: Config) -> None:
    for section in dataclasses.fields(config):
        for f in dataclasses.fields(getattr(config, section.name)):
            key, value = f"{section.name}.{f.name}", getattr(getattr(config, section.name), f.name)
            if key in _CHOICES and value not in _CHOICES[key]:
                raise UserError(f"config: {key} must be one of {', '.join(map(str, _CHOICES[key]))}; got {value!r}")
            if key in _POSITIVE and value is not None and value < 1:
                raise UserError(f"config: {key} must be at least 1, got {value}")
    if config.memory.layers_per_stage < 0 or config.memory.loss_chunk < 0:
        raise UserError("config: memory.layers_per_stage and memory.loss_chunk must be 0 (auto) or more")
    if config.memory.staged and config.lora.dropout > 0:
        raise UserError("config: lora.dropout > 0 needs memory.staged: false (recomputation must be deterministic)")
    if config.data.seq_len is not None and config.data.seq_len < 16:
        raise UserError(f"config: data.seq_len must be at least 16, got {config.data.seq_len}")
    d = config.data
    try:
        shares = [float(x) for x in d.split.split("/")]
    except ValueError:
        shares = []
    if len(shares) != 3 or min(shares) < 0 or shares[0] <= 0 or shares[1] <= 0:
        raise UserError(f"config: data.split must be train/val/test shares like 85/10/5, got {d.split!r}")
    if not (
        0 <= d.fim_rate <= 1
        and 0 <= d.augment <= 1
        and 0 < d.near_duplicate <= 1
        and 0 <= d.min_entropy < 1
        and 0 <= d.chain_share <= 1
    ):
        raise UserError(
            "config: data.fim_rate, data.augment, data.min_entropy, data.chain_share must be in [0, 1], "
            "near_duplicate in (0, 1]"
        )
    if min(d.weight_core, d.weight_test, d.weight_doc, d.weight_other) < 0:
        raise UserError("config: data.weight_* must be 0 or more")
    if config.train.lr <= 0 or config.train.epochs <= 0:
        raise UserError("config: train.lr and train.epochs must be positive")
    c = config.curriculum
    if min(len(c.lengths), len(c.lr_mults), len(c.shares), len(c.bands)) < max(c.phases, 1) or c.phases < 0:
        raise UserError("config: curriculum.lengths, lr_mults, shares and bands need an entry for each phase")
    if not all(0 < x <= 1 for x in c.lengths + c.bands) or min(c.lr_mults + c.shares) <= 0:
        raise UserError("config: curriculum.lengths and bands must be in (0, 1], lr_mults and shares positive")
    o, st = config.orchestrator, config.stability
    if not (0 < o.smoothing <= 1 and 0 < o.lr_factor < 1 and 0 < o.min_lr_factor <= 1) or o.eval_every < 0:
        raise UserError("config: orchestrator.smoothing and min_lr_factor must be in (0, 1], lr_factor in (0, 1)")
    if st.spike_factor <= 1 or config.checkpoint.save_every < 0:
        raise UserError("config: stability.spike_factor must be above 1 and checkpoint.save_every 0 or more")
    if not config.lora.targets:
        raise UserError("config: lora.targets must name at least one module")
    e = config.eval
    if e.completion_targets < 0 or e.forgetting_tokens < 0 or e.completion_targets == 1:
        raise UserError("config: eval.completion_targets must be 0 or at least 2, eval.forgetting_tokens 0 or more")
    bad = [m for m in e.completion_modes if m not in ("in_file", "cross_file", "fim")]
    if bad or (e.completion_targets and not e.completion_modes):
        raise UserError(f"config: eval.completion_modes must be in_file, cross_file or fim, got {e.completion_modes}")


def load_file(path) -> dict:
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"config file {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return data or {}


def build(config_file=None, overrides: dict | None = None) -> Config:
    return build_given(config_file, overrides)[0]


def build_given(config_file=None, overrides: dict | None = None) -> tuple[Config, dict]:
    """The config, and where the user set each value: {"section.key": "flag" | "file"} (flags win)."""
    from_file = load_file(config_file) if config_file is not None else {}
    config = merge(Config(), from_file, source=str(config_file)) if from_file else Config()
    config = merge(config, overrides or {}, source="command line")
    given = {f"{s}.{k}": "file" for s, values in from_file.items() for k in (values or {})}
    given |= {f"{s}.{k}": "flag" for s, values in (overrides or {}).items() for k in (values or {})}
    return config, given
