"""A built dataset's metadata.json, as the record `build` hands to training and evaluation."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from mlx_ltc.errors import UserError
from mlx_ltc.records import Record


@dataclass(frozen=True)
class Difficulty(Record):
    mean: float
    p10: float
    p90: float


@dataclass(frozen=True)
class SplitStats(Record):
    sequences: int
    tokens: int
    useful_tokens: int
    pad_tokens: int
    packing_efficiency: float
    documents: int
    files: int
    difficulty: Difficulty


@dataclass(frozen=True)
class MarkerUse(Record):
    """The tokenizer's repo-level markup: the repo and file headers, and whether it has FIM and commit tokens."""

    repo: str | None
    file: str | None
    eos: str | None
    fim: bool
    commit: bool


@dataclass(frozen=True)
class Dedup(Record):
    exact: int = 0
    near: int = 0
    low_entropy: int = 0
    near_pairs: list = field(default_factory=list)  # [path, twin] pairs, the first 100


@dataclass(frozen=True)
class Fim(Record):
    rate: float = 0.0
    documents: int = 0


@dataclass(frozen=True)
class Chains(Record):
    """Commit-evolution chains: counts when built, else only why not (`note`)."""

    chains: int = 0
    note: str | None = None
    versions: int = 0
    commits: int = 0
    shallow: bool = False
    skipped: dict = field(default_factory=dict)
    share: float = 1.0
    dropped_for_share: int = 0


@dataclass(frozen=True)
class QASplit(Record):
    probes: int
    by_kind: dict
    by_bucket: dict  # distance bucket (as a string) -> probes


@dataclass(frozen=True)
class QA(Record):
    """The QA probes: empty when the build made none (`data.qa: false`)."""

    max_len: int = 0
    buckets: list[int] = field(default_factory=list)
    val: QASplit | None = None
    test: QASplit | None = None


@dataclass(frozen=True)
class CacheUse(Record):
    processed: int = 0
    cached: int = 0


@dataclass(frozen=True)
class DatasetMeta(Record):
    seq_len: int
    dtype: str
    tokenizer_hash: str
    splits: dict[str, SplitStats]
    files_by_split: dict[str, list[str]]
    format_version: int = 1
    repo: str = ""
    repo_name: str = ""
    listing: str = ""
    tokenizer: str = ""
    vocab_size: int = 0
    markers: MarkerUse | None = None
    config: dict = field(default_factory=dict)  # the DataConfig it was built with, as written then
    packing_efficiency: float = 0.0
    blobs: dict[str, str] = field(default_factory=dict)  # path -> blob hash of the text it was built from
    files: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> files
    skipped_files: list = field(default_factory=list)  # {path, reason}
    dedup: Dedup = field(default_factory=Dedup)
    documents: dict[str, int] = field(default_factory=dict)  # kind -> documents
    mix: dict[str, dict[str, int]] | None = None  # split -> kind -> tokens
    segmented_files: int = 0
    fim: Fim = field(default_factory=Fim)
    augmented_files: int = 0
    chains: Chains = field(default_factory=Chains)
    qa: QA | None = None  # None: built without probes (`data.qa: false`)
    roles: dict[str, int] = field(default_factory=dict)
    role_weights: dict[str, float] = field(default_factory=dict)
    cache: CacheUse = field(default_factory=CacheUse)
    timing: dict[str, float] = field(default_factory=dict)

    def save(self, data_dir: Path) -> None:
        from mlx_ltc import atomic

        atomic.write_json(Path(data_dir) / "metadata.json", self.to_json())


def load_metadata(data_dir: Path) -> DatasetMeta:
    path = Path(data_dir) / "metadata.json"
    if not path.is_file():
        raise UserError(f"{data_dir} is not an mlx-ltc dataset (no metadata.json); run `mlx-ltc build` first")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged: {e}") from None
    return DatasetMeta.from_json(raw, str(path))
