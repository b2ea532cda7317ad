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
    policy: str = "auto"  # auto: the fastest policy that fits (hardware.planner) | a name in train.policies | custom
    attention: str = "efficient"  # efficient: O(L)-memory custom backward | stock: MLX's scaled_dot_product_attention
    loss: str = "chunked"  # chunked: never materialise L x V logits | full
    staged: bool = True  # layer-by-layer forward and backward with explicit evaluation boundaries
    layers_per_stage: int = 0  # keep a checkpoint every k layers; 0 = from the memory profile, else 1
    loss_chunk: int = 0  # positions per loss chunk; 0 = as many as fit block_mb (4 fp32 rows of V logits each)
    block_mb: int = 64  # working-set target of one attention block or MLP chunk, MiB
    context_parallel: bool = False  # under mlx.launch: the ranks share each sequence's positions (engine policies)


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
class CompletionConfig:
    """The repo code-completion benchmark (`mlx-ltc eval --completion`)."""

    targets: int = 200  # held-out lines in all, half cross-file, half random
    budgets: list[int] = field(default_factory=list)  # prompt budgets in tokens; empty: 512 and the trained length
    modes: list[str] = field(default_factory=list)  # in_file | cross_file | fim; empty: in_file, cross_file (+ fim)
    max_tokens: int = 64  # generated tokens per target at most
    per_file: int = 0  # targets per file and kind at most; 0: max(4, 2 x targets / files)
    seed: int = 0
    resamples: int = 1000  # bootstrap resamples


@dataclass(frozen=True)
class EvaluateConfig:
    """The `mlx-ltc eval RUN` command (not `eval`, which is what train's own final report measures)."""

    base: bool = False  # also evaluate the base model, side by side
    lengths: list[int] = field(default_factory=list)  # evaluation lengths; empty: 512 ... 2 x the trained length
    context_tokens: int = 16_384  # test-split tokens scored at every evaluation length
    windows: list[int] = field(default_factory=list)  # streaming KV windows; empty: 1/2, 1, 2 x the trained length
    stream_tokens: int = 32_768  # tokens in the streaming evaluation; 0: the whole source
    stream_corpus: str | None = None  # stream this directory's source files; None: the test split
    chunk: int = 512  # streaming prefill chunk
    qa_split: str = "test"  # test | val: whose QA probes are asked
    splits: list[str] = field(default_factory=lambda: ["val", "test"])  # perplexity on these
    forgetting_tokens: int = 16_384  # standard-library tokens for the forgetting check; 0: none
    completion: CompletionConfig = field(default_factory=CompletionConfig)


@dataclass(frozen=True)
class ProfileConfig:
    """`mlx-ltc profile`: the search for the longest training step that fits (the step's model, LoRA and memory
    engine are their own sections')."""

    memory_budget: str | None = None  # e.g. 5.3GB (an 8 GB Mac); None: what this machine allows
    max_len: int | None = None  # the longest length tried; None: 8192 on a CPU, 131072 on a GPU
    granularity: int = 256  # the bisection stops at this resolution
    start: int = 256  # the first length tried (then doubled)
    batch_size: int = 1  # sequences per step


@dataclass(frozen=True)
class CompleteConfig:
    """`mlx-ltc complete`: sampling as mlx-lm has it (temp 0: greedy)."""

    max_tokens: int = 64  # tokens generated at most
    temp: float = 0.0
    top_p: float = 1.0  # 1: off


@dataclass(frozen=True)
class ServeConfig:
    """`mlx-ltc serve`: where it listens and what one request may ask for."""

    host: str = "127.0.0.1"  # this machine only; 0.0.0.0 lets the network in
    port: int = 8080  # 0: any free port (printed)
    context: int | None = None  # prompt + completion tokens [default: the length the run trained at]
    max_tokens: int = 64  # a request's max_tokens when it gives none
    max_body: int = 1_000_000  # bytes of a request body
    queue: int = 8  # requests waiting for the model at most (more: 503)


@dataclass(frozen=True)
class CompareConfig:
    """`mlx-ltc compare`: MLX against the torch reference (the MLX side's memory engine: the `memory` section)."""

    model: str = "tiny-starcoder2"
    steps: int = 5  # optimizer steps on both sides
    seq_len: int = 128
    batch_size: int = 2
    source: str | None = None  # directory of Python files the batches are made from; None: mlx_ltc's own source
    reference_dtype: str = "float32"  # float32 | float64 (tells MLX's own rounding apart)


@dataclass(frozen=True)
class BkModelConfig:
    """The BK model's size (research/bk/model.py's BKConfig takes its defaults from here)."""

    d_model: int = 256
    n_layers: int = 4
    channels: int | None = None  # BK channels per layer; None: d_model
    n_experts: int = 4
    top_k: int = 2  # experts per token (learned router)
    expert_hidden: int = 512
    router: str = "learned"  # learned | scattering: parameter-free, top-1 by the phase of the Green's function


@dataclass(frozen=True)
class BkTrainConfig:
    seq_lens: list[int] = field(default_factory=lambda: [128, 512, 2048, 8192, 32768, 131072])  # shortest first
    steps_per_length: int = 200
    tokens_per_step: int = 32768  # batch = max(1, this // length): a longer length trains one sequence per update
    lr: float = 1e-3  # peak of each length's warmup + cosine
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20  # per length, at most a fifth of its steps after the first
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    val_tokens: int = 65536  # per length, at least one window
    seed: int = 0  # the initialisation and the data order
    grad_checkpoint: bool = False  # recompute each block in the backward: less memory at long lengths
    train_chunk: int = 8192  # longer sequences go through forward/backward a chunk at a time; 0: never
    inject_nan: list[int] = field(default_factory=list)  # fault injection: update attempts whose gradients are NaN


@dataclass(frozen=True)
class BkCorpusConfig:
    root: str | None = None  # directory whose source files are tokenized; None: this Python's standard library
    val_share: float = 0.05  # share of files held out for val
    max_tokens: int = 0  # tokenize files until this many tokens; 0: all


@dataclass(frozen=True)
class BkEvalConfig:
    stream_tokens: int = 1 << 20  # 0: the whole source
    corpus: str | None = None  # stream this directory's source files; None: the run's val slice
    chunk: int = 4096  # tokens per forward
    seq_len: int | None = None  # the checkpoint of this training length; None: the longest finished


@dataclass(frozen=True)
class BkSection:
    """[research] `bk train` (model, train, corpus) and `bk eval`."""

    model: BkModelConfig = field(default_factory=BkModelConfig)
    train: BkTrainConfig = field(default_factory=BkTrainConfig)
    corpus: BkCorpusConfig = field(default_factory=BkCorpusConfig)
    eval: BkEvalConfig = field(default_factory=BkEvalConfig)


@dataclass(frozen=True)
class McTrainConfig:
    model: str = ModelConfig.name  # the frozen base
    split: str = DataConfig.split  # the dataset builder's train/val/test shares
    cycles: int = 2  # gist encoder -> LensNet -> LoRA
    max_steps: int = 60  # updates per phase per cycle (each encoder, LensNet, LoRA)
    lens_contexts: int = 6  # contexts given counterfactual labels per cycle
    lens_candidates: int = 12  # entries labelled per context
    budget: int = 512  # working-context budget (positions) of the LensNet and LoRA phases
    horizon: int = 64  # tokens scored per sample
    blocks: int = 8  # GistNet windows: `blocks` blocks (all but `keep` gisted) + horizon
    keep: int = 2
    batch: int = 2
    lr: float = 1e-3
    contrast: float = 1.0  # weight of the own-vs-other-gists hinge (both encoders); 0: none
    l2_steps: int = 0  # GistNet updates at level 2 per cycle, after the L1 ones; 0: an L2 gist is its last L1 gist
    lora_rank: int = 4
    lora_layers: int = 4
    lora_lr: float = 2e-4
    seed: int = 0  # the initialisation and the data order
    encoder: str = "base-lora"  # the gists' writer: base-lora (the base + its own LoRA), gistnet, or both
    encoder_rank: int = 8  # the base-lora encoder's LoRA (attention and MLP, every layer)
    encoder_lr: float = 3e-4
    autoencode_steps: int = 20  # base-lora: first updates on autoencoding alone (of max_steps)
    autoencode: float = 1.0  # weights of the base-lora encoder's objectives
    continuation: float = 1.0
    reading_lora: bool = True  # base-lora: train the decoder's LoRA jointly with the encoder


@dataclass(frozen=True)
class McEvalConfig:
    budgets: list[int] = field(default_factory=lambda: [256, 512, 1024])  # working-context budgets (positions)
    horizon: int = 128  # scored tokens per file
    min_tokens: int = 3000  # shortest held-out file scored
    max_tokens: int = 6000  # longest held-out file scored
    max_files: int = 0  # score at most this many files; 0: all
    base: bool = False  # leave the reading LoRA out: every condition read by the frozen base


@dataclass(frozen=True)
class McSection:
    """[research] MegaContext: `mc train` and `mc eval`."""

    train: McTrainConfig = field(default_factory=McTrainConfig)
    eval: McEvalConfig = field(default_factory=McEvalConfig)


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
    # the other commands' options; `evaluate` is `mlx-ltc eval`'s, `eval` above is train's final report
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    complete: CompleteConfig = field(default_factory=CompleteConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    bk: BkSection = field(default_factory=BkSection)
    mc: McSection = field(default_factory=McSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "model.dequantize": ("auto", "always", "never"),
    "model.bits": (2, 3, 4, 5, 6, 8),
    "model.group_size": (32, 64, 128),
    "memory.policy": ("auto", "custom", "plain", "stock", "chunked", "efficient", "fused", "engine", "engine_sqrt"),
    "memory.attention": ("efficient", "stock"),
    "memory.loss": ("chunked", "full"),
    "data.split_by": ("file", "directory"),
    "train.backend": ("mlx", "torch"),
    "orchestrator.overfit_action": ("stop", "regularize"),
    "orchestrator.report_to": ("none", "wandb"),
    "evaluate.qa_split": ("test", "val"),
    "evaluate.splits": ("val", "test"),  # each item
    "evaluate.completion.modes": ("in_file", "cross_file", "fim"),  # each item
    "compare.reference_dtype": ("float32", "float64"),
    "bk.model.router": ("learned", "scattering"),
    "mc.train.encoder": ("base-lora", "gistnet", "both"),
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
# every key's lower bound (a list's holds for each item)
_AT_LEAST = dict.fromkeys(_POSITIVE, 1) | {
    "evaluate.context_tokens": 1, "evaluate.chunk": 1, "evaluate.lengths": 1, "evaluate.windows": 1,
    "evaluate.stream_tokens": 0, "evaluate.forgetting_tokens": 0,
    "evaluate.completion.targets": 2, "evaluate.completion.budgets": 1, "evaluate.completion.max_tokens": 1,
    "evaluate.completion.per_file": 0, "evaluate.completion.resamples": 1,
    "compare.steps": 1, "compare.seq_len": 1, "compare.batch_size": 1,
    "profile.max_len": 1, "profile.granularity": 1, "profile.start": 1, "profile.batch_size": 1,
    "complete.max_tokens": 1,
    "serve.port": 0, "serve.context": 1, "serve.max_tokens": 1, "serve.max_body": 1024, "serve.queue": 1,
    "bk.model.d_model": 1, "bk.model.n_layers": 1, "bk.model.channels": 1, "bk.model.n_experts": 1,
    "bk.model.top_k": 1, "bk.model.expert_hidden": 1,
    "bk.train.steps_per_length": 1, "bk.train.tokens_per_step": 1, "bk.train.val_tokens": 1,
    "bk.train.warmup_steps": 0, "bk.train.train_chunk": 0, "bk.train.inject_nan": 1, "bk.corpus.max_tokens": 0,
    "bk.eval.stream_tokens": 0, "bk.eval.chunk": 1, "bk.eval.seq_len": 2,
    "mc.train.cycles": 1, "mc.train.max_steps": 1, "mc.train.lens_contexts": 1, "mc.train.lens_candidates": 1,
    "mc.train.budget": 64, "mc.train.horizon": 2, "mc.train.blocks": 1, "mc.train.keep": 0, "mc.train.batch": 1,
    "mc.train.l2_steps": 0, "mc.train.lora_rank": 1, "mc.train.lora_layers": 1, "mc.train.encoder_rank": 1,
    "mc.train.autoencode_steps": 0,
    "mc.eval.budgets": 1, "mc.eval.horizon": 2, "mc.eval.min_tokens": 0, "mc.eval.max_files": 0,
}  # fmt: skip
_ABOVE_ZERO = {"bk.train.lr", "bk.train.max_grad_norm", "mc.train.lr", "mc.train.lora_lr", "mc.train.encoder_lr"}
_AT_LEAST_ZERO = {"bk.train.weight_decay", "mc.train.contrast", "mc.train.autoencode", "mc.train.continuation"}


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


def _unknown(name: str, where: str) -> UserError:
    hint = ""
    if name.startswith("eval.") and name[5:] in {f.name for f in dataclasses.fields(EvaluateConfig)}:
        hint = " (the `mlx-ltc eval` command's options are in the `evaluate` section)"
    return UserError(f"config{where}: unknown key {name}{hint}")


def _merged(section, updates: dict, prefix: str, where: str):
    """A copy of the section dataclass with the nested dict of updates applied."""
    hints = typing.get_type_hints(type(section))
    changes = {}
    for key, value in updates.items():
        name = f"{prefix}.{key}" if prefix else key
        if key not in hints and not prefix:
            raise UserError(f"config{where}: unknown section {key!r}")
        if key not in hints:
            raise _unknown(name, where)
        if not dataclasses.is_dataclass(hints[key]):
            changes[key] = _check_type(name, value, hints[key])
        elif value is not None:  # an empty section in YAML
            if not isinstance(value, dict):
                raise UserError(f"config{where}: section {name!r} must be a mapping")
            changes[key] = _merged(getattr(section, key), value, name, where)
    return dataclasses.replace(section, **changes)


def merge(config: Config, updates: dict, source: str = "") -> Config:
    """A new Config with a nested dict of overrides applied, rejecting unknown keys and wrong types."""
    where = f" (in {source})" if source else ""
    if not isinstance(updates, dict):
        raise UserError(f"config{where}: expected a mapping of sections, got {type(updates).__name__}")
    config = _merged(config, updates, "", where)
    validate(config)
    return config


def _leaves(section, prefix: str = "") -> typing.Iterator[tuple[str, object]]:
    """(dotted key, value) of every setting under a section dataclass, nested sections included."""
    for f in dataclasses.fields(section):
        key, value = f"{prefix}{f.name}", getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, key + ".")
        else:
            yield key, value


def default(key: str):
    """The built-in default of a dotted key, e.g. default("bk.train.lr")."""
    value = Config()
    for name in key.split("."):
        value = getattr(value, name)
    return value


def _check_split(key: str, split: str) -> None:
    try:
        shares = [float(x) for x in split.split("/")]
    except ValueError:
        shares = []
    if len(shares) != 3 or min(shares) < 0 or shares[0] <= 0 or shares[1] <= 0:
        raise UserError(f"config: {key} must be train/val/test shares like 85/10/5, got {split!r}")


def _check_bounds(key: str, value) -> None:
    items = value if isinstance(value, list) else [value]
    if key in _CHOICES and any(v not in _CHOICES[key] for v in items):
        choices = ", ".join(map(str, _CHOICES[key]))
        if isinstance(value, list):
            unknown = ", ".join(str(v) for v in items if v not in _CHOICES[key])
            raise UserError(f"config: {key}: unknown {unknown} (choose from {choices})")
        raise UserError(f"config: {key} must be one of {choices}; got {value!r}")
    if key in _AT_LEAST and any(v is not None and v < _AT_LEAST[key] for v in items):
        raise UserError(f"config: {key} must be at least {_AT_LEAST[key]}, got {value}")
    if key in _ABOVE_ZERO and not value > 0:
        raise UserError(f"config: {key} must be positive, got {value}")
    if key in _AT_LEAST_ZERO and value < 0:
        raise UserError(f"config: {key} must be 0 or more, got {value}")


def validate(config: Config) -> None:
    for key, value in _leaves(config):
        _check_bounds(key, value)
    if config.memory.layers_per_stage < 0 or config.memory.loss_chunk < 0:
        raise UserError("config: memory.layers_per_stage and memory.loss_chunk must be 0 (auto) or more")
    staged = {"custom": config.memory.staged, "engine": True, "engine_sqrt": True, "fused": True}
    if staged.get(config.memory.policy, False) and config.lora.dropout > 0:  # auto leaves staged policies out
        raise UserError(
            "config: lora.dropout > 0 needs a memory policy that is not staged (recomputation must be "
            "deterministic): memory.policy auto, plain, stock, chunked or efficient"
        )
    if config.data.seq_len is not None and config.data.seq_len < 16:
        raise UserError(f"config: data.seq_len must be at least 16, got {config.data.seq_len}")
    d = config.data
    _check_split("data.split", d.split)
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
    _validate_commands(config)


def _validate_commands(config: Config) -> None:
    """The checks of the other commands' sections that are more than a bound or a choice per key."""
    if not config.evaluate.splits:
        raise UserError("config: evaluate.splits must name val, test or both")
    sampling = config.complete
    if sampling.temp < 0 or not 0 < sampling.top_p <= 1:
        raise UserError("config: complete.temp must be 0 or more and complete.top_p in (0, 1]")
    if config.serve.port > 65535:
        raise UserError(f"config: serve.port must be a port number (0 to 65535), got {config.serve.port}")
    search = config.profile
    if search.max_len is not None and search.max_len < search.start:
        raise UserError(f"config: profile.max_len ({search.max_len}) must be at least profile.start ({search.start})")
    bk = config.bk
    if bk.model.top_k > bk.model.n_experts:
        raise UserError(f"config: bk.model.top_k ({bk.model.top_k}) must be at most bk.model.n_experts")
    lens = bk.train.seq_lens
    if not lens or min(lens) < 2 or lens != sorted(set(lens)):
        raise UserError(f"config: bk.train.seq_lens must be increasing lengths of at least 2 tokens, got {lens}")
    if not 0 <= bk.train.min_lr_ratio <= 1:
        raise UserError(f"config: bk.train.min_lr_ratio must be in [0, 1], got {bk.train.min_lr_ratio}")
    if not 0 < bk.corpus.val_share < 1:
        raise UserError(f"config: bk.corpus.val_share must be between 0 and 1, got {bk.corpus.val_share}")
    mc = config.mc
    _check_split("mc.train.split", mc.train.split)
    if not mc.eval.budgets:
        raise UserError("config: mc.eval.budgets must give at least one budget")
    if mc.eval.max_tokens < mc.eval.min_tokens:
        raise UserError(f"config: mc.eval.max_tokens must be at least mc.eval.min_tokens ({mc.eval.min_tokens})")


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
    given = dict.fromkeys(_keys(from_file), "file") | dict.fromkeys(_keys(overrides or {}), "flag")
    return config, given


def _keys(updates: dict, prefix: str = "") -> list:
    """The dotted keys a nested dict of updates sets."""
    keys = []
    for name, value in updates.items():
        if isinstance(value, dict):
            keys += _keys(value, f"{prefix}{name}.")
        elif prefix:
            keys.append(prefix + name)
    return keys
