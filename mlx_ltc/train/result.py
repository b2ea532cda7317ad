"""What a training run returns, whichever backend ran it."""

from dataclasses import dataclass

from mlx_ltc.records import Record


@dataclass
class TrainResult(Record):
    steps: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    peak_memory_gb: float
    final_loss: float
    trainable_params: int
    curriculum: dict | None = None  # phases, per-phase/per-length summaries, stability counts
