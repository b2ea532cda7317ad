"""Reading a built dataset: each split's packed sequences with their per-target loss weights."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_ltc.errors import UserError


@dataclass
class Split:
    """Sequences of one split. tokens: (N, L); weights: (N, L-1), the loss weight of each next-token
    target (role weight of its document; 0 on padding and on the repo prefix); real: (N, L-1) bool,
    the targets that count for perplexity (not padding, not the prefix)."""

    tokens: np.ndarray
    weights: np.ndarray
    real: np.ndarray
    difficulty: np.ndarray | None = None

    def __len__(self):
        return len(self.tokens)

    @property
    def predicted_tokens(self) -> int:
        return int(self.real.sum())

    @classmethod
    def from_rows(cls, rows) -> "Split":
        """Variable-length rows, right-padded with zeros; padding never counts."""
        width = max(len(r) for r in rows)
        tokens = np.zeros((len(rows), width), dtype=np.int32)
        real = np.zeros((len(rows), width - 1), dtype=bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
            real[i, : len(r) - 1] = True
        return cls(tokens, real.astype(np.float32), real)


def load_split(data_dir: Path, name: str) -> Split:
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "metadata.json").read_text())
    seq_len = meta["seq_len"]
    weight_of = {}
    with open(data_dir / "documents.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            weight_of[d["id"]] = d["weight"]
    raw = np.fromfile(data_dir / f"{name}.bin", dtype=np.dtype(meta["dtype"]))
    if raw.size % seq_len:
        raise UserError(f"{data_dir / (name + '.bin')} is truncated: {raw.size} tokens, not a multiple of {seq_len}")
    tokens = raw.reshape(-1, seq_len).astype(np.int32)
    per_token = np.zeros(tokens.shape, dtype=np.float32)
    real_tok = np.zeros(tokens.shape, dtype=bool)
    difficulty = []
    with open(data_dir / f"{name}.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            difficulty.append(row["difficulty"])
            for start, length, doc, _, _ in row["spans"]:
                per_token[i, start : start + length] = weight_of[doc]
                real_tok[i, start : start + length] = True
    if len(difficulty) != len(tokens):
        raise UserError(f"{data_dir}: {name}.jsonl has {len(difficulty)} rows for {len(tokens)} sequences")
    # target t+1 is predicted at position t: it carries the weight of the token it predicts
    return Split(tokens, per_token[:, 1:], real_tok[:, 1:], np.array(difficulty, dtype=np.float32))


def load_metadata(data_dir: Path) -> dict:
    path = Path(data_dir) / "metadata.json"
    if not path.is_file():
        raise UserError(f"{data_dir} is not an mlx-ltc dataset (no metadata.json); run `mlx-ltc build` first")
    return json.loads(path.read_text())
