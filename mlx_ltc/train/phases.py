"""The curriculum: phases of growing sequence length over the one packed dataset.

A phase trains on the easiest `band` share of the training sequences (the dataset's difficulty score),
each cut into pieces of the phase's length, at `lr_mult` times the base LR. Tokens per update stay
constant: a phase at 1/4 of the full length takes 4x the sequences per micro-batch, which keeps the
micro-batch's tokens (and, with the O(L) engine, its memory) at the full-length step's.
"""

import math
from dataclasses import asdict, dataclass

import numpy as np

from mlx_ltc.config import Config, TrainConfig
from mlx_ltc.runtime.schedule import warmup_cosine
from mlx_ltc.data import Split


@dataclass
class Phase:
    index: int
    seq_len: int
    lr_mult: float
    band: float  # the easiest share of train sequences it sees
    steps: int  # budget in optimizer updates (it may end earlier, on convergence)
    micro_batch: int
    grad_accum: int
    warmup: int

    def to_dict(self) -> dict:
        return asdict(self)


def total_steps(cfg: Config, n_sequences: int) -> int:
    t = cfg.train
    return t.max_steps or max(1, math.ceil(t.epochs * n_sequences / ((t.batch_size or 1) * t.grad_accum)))


def plan(cfg: Config, steps: int) -> list:
    """The phases of a run of `steps` optimizer updates at cfg.data.seq_len (cfg.curriculum.phases > 0)."""
    c, t, full = cfg.curriculum, cfg.train, cfg.data.seq_len
    n = max(1, min(c.phases, steps))
    shares = np.array(c.shares[-n:], dtype=np.float64)
    budgets = np.maximum(1, np.floor(steps * shares / shares.sum())).astype(int)
    budgets[-1] = max(1, steps - budgets[:-1].sum())
    phases = []
    # the last n lengths and bands end at the full length and all the data; the first n LR multipliers start at x1
    for i, (length, mult, band, budget) in enumerate(zip(c.lengths[-n:], c.lr_mults[:n], c.bands[-n:], budgets)):
        pieces = max(1, round(1 / length))  # the phase length divides the packed length exactly
        phases.append(
            Phase(
                index=i,
                seq_len=full // pieces,
                lr_mult=mult,
                band=band,
                steps=int(budget),
                micro_batch=(t.batch_size or 1) * pieces,
                grad_accum=t.grad_accum,
                warmup=min(t.warmup_steps, int(budget) // 5 if i else max(int(budget) - 1, 0)),
            )
        )
    return phases


def lr_schedule(t: TrainConfig, total_steps: int):
    """step (0-based) -> rate of a single-phase run of total_steps updates."""
    phase = Phase(0, 0, 1.0, 1.0, total_steps, 1, 1, min(t.warmup_steps, max(total_steps - 1, 0)))
    return lambda step: lr_at(t, phase, step)


def view(split: Split, seq_len: int, band: float = 1.0) -> Split:
    """The easiest `band` share of the sequences, each cut into len // seq_len pieces of seq_len tokens.

    A piece's targets are the ones inside it: the target that crossed a cut is dropped."""
    if band < 1 and split.difficulty is not None and len(split):
        keep = split.difficulty <= np.quantile(split.difficulty, band)
        split = split.rows(keep)
    n, full = split.tokens.shape
    pieces = full // seq_len
    if pieces <= 1:
        return split
    used = pieces * seq_len

    def cut(per_target):  # (N, full - 1) -> (N * pieces, seq_len - 1)
        padded = np.concatenate([per_target, np.zeros((n, 1), per_target.dtype)], axis=1)[:, :used]
        return padded.reshape(n * pieces, seq_len)[:, : seq_len - 1]

    difficulty = None if split.difficulty is None else np.repeat(split.difficulty, pieces)
    tokens = split.tokens[:, :used].reshape(n * pieces, seq_len)
    kind = None if split.kind is None else cut(split.kind)
    return Split(tokens, cut(split.weights), cut(split.real), difficulty, kind)


def lr_at(t: TrainConfig, phase: Phase, phase_step: int, factor: float = 1.0) -> float:
    """The rate of the phase's update number `phase_step` (0-based): linear warmup, then cosine to
    min_lr_ratio at the phase's last update, times the phase multiplier and the orchestrator's factor."""
    return warmup_cosine(phase_step, t.lr * phase.lr_mult * factor, phase.warmup, phase.steps, t.min_lr_ratio)
