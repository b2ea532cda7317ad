"""Repo QA: the dataset's long-context probes (`data/qa/`), scored exactly. Each prompt goes through
the model once; the answer and every distractor continue it from a copy of the same KV cache. A
probe is answered when the correct answer has the lowest total NLL of all choices (lm-eval's `acc`)."""

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from mlx_ltc.data.metadata import load_metadata
from mlx_ltc.errors import UserError
from mlx_ltc.numerics.loss import token_nll
from mlx_ltc.records import Record

PREFILL_CHUNK = 512


@dataclass
class ProbeScore(Record):
    id: int
    kind: str
    distance: int  # tokens from the evidence to the question
    bucket: int  # the distance bucket the probe was built for
    answer_nll: float  # mean NLL per answer token
    rank: int  # 1: the answer scored best among the choices
    choices: int


def load_probes(data_dir: Path, split: str) -> tuple:
    """(rows of data/qa/SPLIT.jsonl, their prompts' tokens, the distance buckets)."""
    qa = Path(data_dir) / "qa"
    if not (qa / f"{split}.jsonl").is_file():
        raise UserError(f"{data_dir} has no QA probes for the {split} split (data/qa/{split}.jsonl)")
    rows = [json.loads(line) for line in (qa / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if line]
    tokens = np.fromfile(qa / f"{split}.bin", dtype=np.int32)
    if sum(r["length"] for r in rows) != len(tokens):
        raise UserError(f"{qa / (split + '.bin')} does not match {split}.jsonl: truncated or from another build")
    return rows, tokens, load_metadata(data_dir).qa.buckets


def continuation_nll(model, prompt: np.ndarray, continuations: list) -> list:
    """Total NLL of each continuation (token list) after `prompt`, from one pass over the prompt."""
    cache = [KVCache() for _ in model.layers]
    for s in range(0, len(prompt) - 1, PREFILL_CHUNK):
        model(mx.array(prompt[None, s : min(s + PREFILL_CHUNK, len(prompt) - 1)], dtype=mx.int32), cache=cache)
        mx.eval([c.state for c in cache])
    out = []
    for cont in continuations:
        x = mx.array([[int(prompt[-1]), *cont[:-1]]], dtype=mx.int32)
        nll = token_nll(model(x, cache=cache).astype(mx.float32), mx.array([cont], dtype=mx.int32)).sum()
        out.append(float(nll.item()))
        for c in cache:
            c.trim(len(cont))
    return out


def score(model, rows: list, tokens: np.ndarray, buckets: list, progress=None) -> list:
    model.eval()
    scores = []
    for row in rows:
        prompt = tokens[row["offset"] : row["offset"] + row["length"]]
        choices = [row["answer_tokens"], *row["distractor_tokens"]]
        nll = continuation_nll(model, prompt, choices)
        scores.append(
            ProbeScore(
                id=row["id"],
                kind=row["kind"],
                distance=row["distance"],
                bucket=max((b for b in buckets if b <= row["distance"]), default=row["distance"]),
                answer_nll=nll[0] / len(choices[0]),
                rank=1 + sum(x < nll[0] for x in nll[1:]),
                choices=len(choices),
            )
        )
        if progress is not None:
            progress.update(1)
    return scores


def by_bucket(scores: list) -> list:
    """Accuracy, mean answer NLL and mean reciprocal rank per distance bucket."""
    out = []
    for b in sorted({s.bucket for s in scores}):
        mine = [s for s in scores if s.bucket == b]
        out.append(
            {
                "distance": b,
                "probes": len(mine),
                "accuracy": sum(s.rank == 1 for s in mine) / len(mine),
                "answer_nll": float(np.mean([s.answer_nll for s in mine])),
                "mrr": float(np.mean([1 / s.rank for s in mine])),
                "chance": float(np.mean([1 / s.choices for s in mine])),
            }
        )
    return out
