"""Reading a built dataset: each split's packed sequences with their per-target loss weights."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_ltc.data.metadata import load_metadata
from mlx_ltc.errors import UserError


KINDS = ("file", "fim", "chain")  # document kinds; a target's kind code is its index + 1 (0: not a real target)


@dataclass
class Split:
    """Sequences of one split. tokens: (N, L); weights: (N, L-1), the loss weight of each next-token
    target (role weight of its document; 0 on padding and on the repo prefix); real: (N, L-1) bool,
    the targets that count for perplexity (not padding, not the prefix); kind: (N, L-1) uint8, the
    kind code of each target's document (KINDS; None: every real target is a file's)."""

    tokens: np.ndarray
    weights: np.ndarray
    real: np.ndarray
    difficulty: np.ndarray | None = None
    kind: np.ndarray | None = None

    def kinds(self) -> np.ndarray:
        return self.kind if self.kind is not None else self.real.astype(np.uint8)

    def rows(self, index) -> "Split":
        """The sequences at `index` (a slice, an index array or a mask)."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return Split(self.tokens[index], self.weights[index], self.real[index], pick(self.difficulty), pick(self.kind))

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
    meta = load_metadata(data_dir)
    seq_len = meta.seq_len
    weight_of, kind_of = {}, {}
    with open(data_dir / "documents.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            weight_of[d["id"]] = d["weight"]
            kind_of[d["id"]] = KINDS.index(d["kind"]) + 1
    raw = np.fromfile(data_dir / f"{name}.bin", dtype=np.dtype(meta.dtype))
    if raw.size % seq_len:
        raise UserError(f"{data_dir / (name + '.bin')} is truncated: {raw.size} tokens, not a multiple of {seq_len}")
    tokens = raw.reshape(-1, seq_len).astype(np.int32)
    per_token = np.zeros(tokens.shape, dtype=np.float32)
    kind_tok = np.zeros(tokens.shape, dtype=np.uint8)
    difficulty = []
    with open(data_dir / f"{name}.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            difficulty.append(row["difficulty"])
            for start, length, doc, _, _ in row["spans"]:
                per_token[i, start : start + length] = weight_of[doc]
                kind_tok[i, start : start + length] = kind_of[doc]
    if len(difficulty) != len(tokens):
        raise UserError(f"{data_dir}: {name}.jsonl has {len(difficulty)} rows for {len(tokens)} sequences")
    # target t+1 is predicted at position t: it carries the weight of the token it predicts
    kind = kind_tok[:, 1:]
    return Split(tokens, per_token[:, 1:], kind > 0, np.array(difficulty, dtype=np.float32), kind)
