"""Data: a repository's files -> repo-level token streams -> fixed windows, split by file.

Each split is one stream in the model's native repo format
    <repo_name>NAME<file_sep>path/a.py\\n...<file_sep>path/b.py\\n...<|endoftext|>
(`<reponame>`/`<filename>` for StarCoder1-style vocabularies, plain `### path` headers otherwise),
cut into windows of seq_len + 1 tokens with stride seq_len, so every token after the first is
predicted exactly once. Only the last window of a split can be short; it is padded at batch time and
the padding is masked out of the loss.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_ltc import atomic
from mlx_ltc.data.sources import RepoScan, scan
from mlx_ltc.errors import UserError

__all__ = ["Dataset", "RepoScan", "Windows", "build", "scan", "tokenizer_hash"]


@dataclass
class Windows:
    rows: list  # list[np.ndarray int32], each of length <= seq_len + 1

    @property
    def predicted_tokens(self) -> int:
        return sum(len(r) - 1 for r in self.rows)

    def __len__(self):
        return len(self.rows)


@dataclass
class Dataset:
    train: Windows
    val: Windows
    meta: dict = field(default_factory=dict)

    def save(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        for split in ("train", "val"):
            rows = ({"tokens": r.tolist()} for r in getattr(self, split).rows)
            atomic.write_jsonl(out_dir / f"{split}.jsonl", rows)
        atomic.write_json(out_dir / "metadata.json", self.meta)

    @classmethod
    def load(cls, data_dir: Path) -> "Dataset":
        data_dir = Path(data_dir)

        def read(split):
            with open(data_dir / f"{split}.jsonl", encoding="utf-8") as f:
                return Windows([np.array(json.loads(line)["tokens"], dtype=np.int32) for line in f])

        meta = json.loads((data_dir / "metadata.json").read_text())
        return cls(read("train"), read("val"), meta)


def tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def repo_format(tokenizer) -> dict:
    """The model's own repo-level markers when its vocabulary has them."""
    vocab = tokenizer.get_vocab()
    eos = tokenizer.eos_token if tokenizer.eos_token in vocab else None
    if "<|endoftext|>" in vocab:  # code models' end-of-document token (eos may be a chat token)
        eos = "<|endoftext|>"
    for repo, file in (("<repo_name>", "<file_sep>"), ("<reponame>", "<filename>")):
        if repo in vocab and file in vocab:
            return {"repo": repo, "file": file, "eos": eos}
    return {"repo": None, "file": None, "eos": eos}


def _split_files(paths, tokens_per_file, val_fraction, seed):
    """Hold out whole files for validation: files in a seeded hash order are added to val while
    they fit under val_fraction of all tokens (overshooting by at most 50%)."""
    total = sum(tokens_per_file)
    target = val_fraction * total
    order = sorted(range(len(paths)), key=lambda i: hashlib.sha256(f"{seed}:{paths[i]}".encode()).hexdigest())
    val, val_tokens = set(), 0
    for i in order:
        if val_tokens >= target:
            break
        if val_tokens + tokens_per_file[i] <= 1.5 * target:
            val.add(i)
            val_tokens += tokens_per_file[i]
    if not val:  # every file is bigger than the budget: take the smallest
        val.add(min(range(len(paths)), key=lambda i: tokens_per_file[i]))
    return val


def _windows(stream: np.ndarray, seq_len: int) -> Windows:
    rows = [stream[s : s + seq_len + 1] for s in range(0, max(len(stream) - 1, 1), seq_len)]
    return Windows([r for r in rows if len(r) >= 2])


def build(repo: RepoScan, tokenizer, seq_len: int, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    if len(repo.files) < 2:
        raise UserError(
            f"repo {repo.root} has {len(repo.files)} usable text file; at least 2 are needed "
            "to hold out validation files"
        )
    fmt = repo_format(tokenizer)
    if fmt["file"]:
        headers = [f"{fmt['file']}{f.path}\n" for f in repo.files]
        repo_header = f"{fmt['repo']}{repo.name}"
    else:
        headers = [f"### {f.path}\n" for f in repo.files]
        repo_header = f"### repository: {repo.name}\n"
    encode = lambda texts: tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    segments = encode([h + f.text + ("" if fmt["file"] else "\n") for h, f in zip(headers, repo.files)])
    head = encode([repo_header])[0]
    tail = [tokenizer.convert_tokens_to_ids(fmt["eos"])] if fmt["eos"] else []
    lengths = [len(s) for s in segments]
    val_idx = _split_files([f.path for f in repo.files], lengths, val_fraction, seed)

    def stream(indices):
        parts = [head] + [segments[i] for i in indices] + [tail]
        return np.array([t for p in parts for t in p], dtype=np.int32)

    train_idx = [i for i in range(len(repo.files)) if i not in val_idx]
    train, val = _windows(stream(train_idx), seq_len), _windows(stream(sorted(val_idx)), seq_len)
    meta = {
        "repo": str(repo.root),
        "repo_name": repo.name,
        "listing": repo.listing,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "format": fmt,
        "seq_len": seq_len,
        "val_fraction": val_fraction,
        "seed": seed,
        "files": {
            split: [{"path": repo.files[i].path, "tokens": lengths[i]} for i in idx]
            for split, idx in (("train", train_idx), ("val", sorted(val_idx)))
        },
        "windows": {"train": len(train), "val": len(val)},
        "tokens": {"train": train.predicted_tokens, "val": val.predicted_tokens},
        "skipped": [{"path": p, "reason": r} for p, r in repo.skipped],
        "skipped_counts": repo.skip_counts(),
    }
    return Dataset(train, val, meta)
