"""report.json as records: train's report (`TrainReport`) and `mlx-ltc eval`'s section (`Evaluation`),
with what they are made of. `to_json` gives the file's mapping; `from_json` reads one back, reports
written before a key existed included: such a key is None here and left out of `to_json` again."""

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from mlx_ltc.eval import Perplexity
from mlx_ltc.eval.context import ContextCurve
from mlx_ltc.eval.qa import ProbeScore
from mlx_ltc.eval.stream import StreamPoint
from mlx_ltc.records import Record
from mlx_ltc.train.result import TrainResult


class NewerKeys(Record):
    """A record whose NEWER fields are left out of to_json when None: the keys older reports lack."""

    NEWER: tuple = ()

    def to_json(self) -> dict:
        return {k: v for k, v in super().to_json().items() if not (v is None and k in self.NEWER)}


@dataclass
class ValNumbers(Record):
    """report["base"] / report["adapted"]: validation perplexity, overall and of held-out files and commit
    chains alone (file_tokens None: a report from before perplexity was split by document kind)."""

    val_loss: float
    val_ppl: float
    val_tokens: int
    file_ppl: float | None = None
    file_tokens: int | None = None
    chain_ppl: float | None = None
    chain_tokens: int | None = None

    @classmethod
    def of(cls, p: Perplexity) -> "ValNumbers":
        (file_ppl, file_tokens), (chain_ppl, chain_tokens) = p.of("file"), p.of("chain")
        return cls(p.loss, p.ppl, p.tokens, file_ppl, file_tokens, chain_ppl, chain_tokens)

    def to_json(self) -> dict:
        out = super().to_json()
        return out if self.file_tokens is not None else {k: out[k] for k in ("val_loss", "val_ppl", "val_tokens")}


@dataclass
class DataSummary(NewerKeys):
    """report["data"]: the dataset the run trained on."""

    NEWER = ("mix",)
    seq_len: int
    sequences: dict[str, int]  # split -> sequences
    packing_efficiency: float
    skipped: dict[str, int]  # reason -> files
    files: dict[str, int]  # split -> files
    mix: dict[str, dict[str, int]] | None = None  # split -> document kind -> tokens


@dataclass(kw_only=True)
class Forgetting(NewerKeys):
    """Perplexity of code the fine-tune never saw (the standard library), per model measured."""

    NEWER = ("base", "adapted")
    source: str
    root: str
    files: int
    tokens: int
    seq_len: int
    base: Perplexity | None = None
    adapted: Perplexity | None = None

    def of(self, model: str) -> Perplexity:
        return {"base": self.base, "adapted": self.adapted}[model]


@dataclass(kw_only=True)
class CompletionRow(NewerKeys):
    """One (model, mode, budget, kind) of the completion benchmark: each metric's mean and 95% CI."""

    NEWER = ("with_context",)
    model: str
    mode: str
    budget: int
    kind: str
    targets: int
    em: float
    em_ci: list
    es: float
    es_ci: list
    id_em: float
    id_em_ci: list
    id_f1: float
    id_f1_ci: list
    with_context: int | None = None  # targets whose cross-file prompt had other files in it
    in_file_tokens: float
    cross_file_tokens: float


@dataclass(kw_only=True)
class PairedRow(NewerKeys):
    """A paired difference on the same lines: `compare` ("adapted - base" at a mode, "MODE - in_file" of
    a model), or run B - A at a mode (`eval --compare`, no `compare`)."""

    NEWER = ("compare", "mode", "model")
    compare: str | None = None
    mode: str | None = None
    model: str | None = None
    budget: int
    kind: str
    targets: int
    em: float
    em_ci: list
    es: float
    es_ci: list
    id_em: float
    id_em_ci: list
    id_f1: float
    id_f1_ci: list


@dataclass(kw_only=True)
class CompletionInfo(Record):
    """What the completion benchmark measured: its models, modes, budgets and targets."""

    models: list
    modes: list
    budgets: list
    splits: list
    files: int  # held-out files read
    target_files: int  # files the targets came from
    targets: dict[str, int]  # kind -> targets
    candidates: dict[str, int]
    max_tokens: int
    seed: int
    notes: list = field(default_factory=list)
    wall_s: float


@dataclass(kw_only=True)
class StreamSource(NewerKeys):
    NEWER = ("files",)
    kind: str  # "test split" or "corpus"
    path: str
    files: int | None = None  # a corpus's files read
    tokens: int


@dataclass
class RepoQA(NewerKeys):
    """One model's repo QA: per distance bucket, per probe, and overall (None without probes)."""

    NEWER = ("accuracy",)
    buckets: list  # qa.by_bucket's {"distance", "probes", "accuracy", "answer_nll", "mrr", "chance"}
    probes: list[ProbeScore]
    accuracy: float | None = None


@dataclass(kw_only=True)
class StreamRow(StreamPoint):
    """A StreamPoint of one model, as report.json["eval"]["streaming"] lists them."""

    model: str

    def to_json(self) -> dict:
        return {"model": self.model, **super().to_json()}


CLASSIC = ("models", "seq_len", "stream_source", "windows", "lengths", "qa_split", "perplexity", "context", "qa",
           "streaming", "forgetting", "wall_s")  # fmt: skip
COMPLETION = ("completion", "completion_paired", "completion_info")


@dataclass
class Evaluation(NewerKeys):
    """report["eval"]: the measurements of `mlx-ltc eval` (perplexity, context, QA, streaming, forgetting;
    `perplexity` set) and of `mlx-ltc eval --completion` (`completion` set), each kept when the other is
    rerun. Per-model entries are keyed by the model's name ("base", "adapted")."""

    NEWER = CLASSIC + COMPLETION
    models: list | None = None
    seq_len: int | None = None
    stream_source: StreamSource | None = None
    windows: list | None = None
    lengths: list | None = None
    qa_split: str | None = None
    perplexity: dict[str, dict[str, Perplexity]] | None = None  # model -> split -> perplexity
    context: dict[str, ContextCurve] | None = None
    qa: dict[str, RepoQA] | None = None
    streaming: list[StreamRow] | None = None
    forgetting: Forgetting | None = None
    wall_s: float | None = None
    completion: list[CompletionRow] | None = None
    completion_paired: list[PairedRow] | None = None
    completion_info: CompletionInfo | None = None

    def merged(self, new: "Evaluation") -> "Evaluation":
        """`new`'s entries over these; a new measurement of perplexity and the rest replaces all of the old one."""
        old = self if new.perplexity is None else replace(self, **dict.fromkeys(CLASSIC))
        return replace(old, **{f.name: getattr(new, f.name) for f in fields(new) if getattr(new, f.name) is not None})


@dataclass(kw_only=True)
class TrainReport(NewerKeys):
    """Train's report.json (without the `eval` section)."""

    NEWER = ("forgetting", "completion", "completion_paired", "completion_info", "notes")
    mlx_ltc_version: str
    model: str
    model_dir: str
    adapter_dir: str
    repo: str
    compute: dict  # hardware.describe() and how the model was loaded
    data: DataSummary
    base: ValNumbers
    adapted: ValNumbers
    train: TrainResult
    forgetting: Forgetting | None = None
    completion: list[CompletionRow] | None = None
    completion_paired: list[PairedRow] | None = None
    completion_info: CompletionInfo | None = None
    notes: list | None = None  # what the final measures left out, and why
    wall_s: float
    resumed: bool


@dataclass
class Report:
    """A run's report.json: train's report (None when train wrote none) and `eval`'s section (None before
    any evaluation)."""

    training: TrainReport | None = None
    evaluation: Evaluation | None = None

    def to_json(self) -> dict:
        out = self.training.to_json() if self.training else {}
        return out | ({"eval": self.evaluation.to_json()} if self.evaluation else {})

    @classmethod
    def from_json(cls, data: dict, source: str = "report.json") -> "Report":
        train = {k: v for k, v in data.items() if k != "eval"}
        return cls(
            TrainReport.from_json(train, source) if train else None,
            Evaluation.from_json(data["eval"], source) if "eval" in data else None,
        )

    @classmethod
    def read(cls, path: Path) -> "Report":
        """The report at `path`, or an empty one when there is none yet."""
        path = Path(path)
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")), str(path)) if path.is_file() else cls()
