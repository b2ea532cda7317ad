"""The guards every update passes, as plain functions over a state the trainer keeps in its checkpoints:
a non-finite loss or gradient norm skips the update; a loss above `spike_factor` x the running median
is a spike; `nan_limit` skips or `spike_limit` spikes in a row are "unstable" (the trainer rolls back).
The counts survive rollbacks; the median's window is the checkpoint's."""

import math
from dataclasses import dataclass, field

import numpy as np

from mlx_ltc.config import StabilityConfig
from mlx_ltc.records import Record
from mlx_ltc.runtime.events import Event


@dataclass
class GradStats(Record):
    """Welford running mean/variance with min/max, of the pre-clip gradient norm at one length."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = math.inf
    max: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)
        self.min, self.max = min(self.min, x), max(self.max, x)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0


@dataclass
class LengthCounts(Record):
    grad: GradStats = field(default_factory=GradStats)
    spikes: int = 0
    skipped: int = 0


@dataclass
class StabilityState(Record):
    recent: list = field(default_factory=list)  # the last spike_window accepted losses (restored on rollback)
    spike_streak: int = 0
    nan_streak: int = 0
    # below: counts of everything that happened, kept across rollbacks
    spikes: int = 0
    skipped: int = 0
    rollbacks: int = 0
    by_length: dict[str, LengthCounts] = field(default_factory=dict)  # str(seq_len) -> counts

    @property
    def good(self) -> bool:
        """No spike or skipped update pending: a checkpoint a rollback may return to."""
        return self.spike_streak == 0 and self.nan_streak == 0


def check(state: StabilityState, rules: StabilityConfig, step: int, loss: float, grad_norm: float, seq_len: int):
    """(apply the update?, events); an event of kind "unstable" asks for a rollback. Updates `state`."""
    length = state.by_length.setdefault(str(seq_len), LengthCounts())
    inputs = {"loss": loss, "grad_norm": grad_norm, "seq_len": seq_len}
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        state.nan_streak += 1
        state.skipped += 1
        length.skipped += 1
        events = [Event(step, "skip", f"non-finite loss {loss} or grad norm {grad_norm}; update skipped", inputs)]
        if state.nan_streak >= rules.nan_limit:
            events.append(Event(step, "unstable", f"{state.nan_streak} non-finite updates in a row", inputs))
        return False, events
    state.nan_streak = 0
    length.grad.add(grad_norm)
    if len(state.recent) >= 5:
        median = float(np.median(state.recent))
        inputs["median"] = median
        if loss > rules.spike_factor * median:
            state.spike_streak += 1
            state.spikes += 1
            length.spikes += 1
            events = [Event(step, "spike", f"loss {loss:.4f} > {rules.spike_factor:g} x median {median:.4f}", inputs)]
            if state.spike_streak >= rules.spike_limit:
                events.append(Event(step, "unstable", f"{state.spike_streak} spikes in a row", inputs))
            return True, events
    state.spike_streak = 0
    state.recent = (state.recent + [loss])[-rules.spike_window :]
    return True, []


def rolled_back(state: StabilityState, restored: StabilityState) -> None:
    """Take the loss window of the checkpoint rolled back to; keep the counts."""
    state.recent = list(restored.recent)
    state.spike_streak = state.nan_streak = 0
    state.rollbacks += 1
