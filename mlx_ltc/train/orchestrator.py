"""The rules that steer a long unattended run. Plain Python over plain numbers, so each rule is unit-tested.

`Orchestrator.on_eval` runs after every validation eval of the current phase and returns its decisions,
each an Event with the inputs it was made from:
- overfitting: train loss more than `overfit_gap` below val while the smoothed val loss rose at two evals
  in a row above the phase's best -> restore the best checkpoint, then stop (or regularise);
- divergence: smoothed val more than `diverge_rise` above the phase's best -> LR x lr_factor;
- convergence: the smoothed val loss improved by less than `converge_tol` (relative) over the last
  `converge_evals` evals, with at least `min_phase_share` of the phase's budget spent -> advance,
  but to a longer context only when the model uses the context it has: the mean NLL of the window's
  last quarter is at least `context_tol` below its second quarter's (`context_gain`). Converged
  without that gain, the phase goes on to its budget (the plateau rule lowers the LR); converged in
  the last phase, the run ends;
- plateau: no new best for `plateau_evals` evals -> LR x lr_factor.
LR reductions wait `cooldown_evals` evals and stop at `min_lr_factor`. The factor multiplies the
phase's warmup + cosine rate (`phases.lr_at`), so the schedule never overwrites a reduction.

The stability guards that run on every update are in `runtime/stability.py`.
"""

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from mlx_ltc.config import OrchestratorConfig
from mlx_ltc.runtime.events import Event


@dataclass
class OrchestratorState:
    lr_factor: float = 1.0
    ema: list = field(default_factory=list)  # smoothed val loss after each eval of the phase
    best: float = math.inf  # the phase's best smoothed val loss
    best_step: int = -1
    since_best: int = 0
    since_reduce: int = 1_000_000  # evals since the last LR reduction
    rising: int = 0  # evals in a row with the smoothed val above the best and above the previous one
    regularized: int = 0


class Orchestrator:
    def __init__(self, cfg: OrchestratorConfig, state: OrchestratorState | None = None):
        self.cfg, self.state = cfg, state or OrchestratorState()

    def new_phase(self) -> None:
        self.state = OrchestratorState(regularized=self.state.regularized)

    def reduce_lr(self, step: int, reason: str, inputs: dict) -> list:
        s, c = self.state, self.cfg
        if s.since_reduce < c.cooldown_evals or s.lr_factor <= c.min_lr_factor:
            return []
        s.lr_factor = max(c.min_lr_factor, s.lr_factor * c.lr_factor)
        s.since_reduce, s.since_best = 0, 0
        return [Event(step, "reduce_lr", f"{reason}; LR factor now {s.lr_factor:g}", inputs)]

    def on_eval(
        self, step: int, val_loss: float, train_loss: float, context_gain: float, last_phase: bool, spent: float = 1.0
    ) -> list:
        """The decisions after an eval; `spent` is the share of the phase's budget used so far."""
        s, c = self.state, self.cfg
        previous = s.ema[-1] if s.ema else None
        smoothed = val_loss if previous is None else c.smoothing * val_loss + (1 - c.smoothing) * previous
        s.ema.append(smoothed)
        s.since_reduce += 1
        inputs = {"val_loss": val_loss, "smoothed": smoothed, "best": s.best, "train_loss": train_loss,
                  "context_gain": context_gain, "lr_factor": s.lr_factor, "spent": spent}  # fmt: skip
        if smoothed < s.best:
            s.best, s.best_step, s.since_best, s.rising = smoothed, step, 0, 0
            return self._converged(step, inputs, last_phase)
        s.since_best += 1
        s.rising = s.rising + 1 if previous is not None and smoothed > previous else 0
        if s.rising >= 2 and train_loss < (1 - c.overfit_gap) * val_loss:
            s.rising = 0
            reason = f"train {train_loss:.4f} << val {val_loss:.4f}, val rising above the best {s.best:.4f}"
            if c.overfit_action == "regularize" and s.regularized < 2:
                s.regularized += 1
                s.lr_factor = max(c.min_lr_factor, s.lr_factor * c.lr_factor)
                s.since_reduce, s.since_best = 0, 0
                return [Event(step, "restore_best", reason + "; regularize: LR x0.5, weight decay x2", inputs)]
            return [Event(step, "restore_best", reason + "; stop", inputs), Event(step, "stop", "overfitting", inputs)]
        if smoothed > s.best * (1 + c.diverge_rise):
            return self.reduce_lr(step, f"diverging: smoothed val {smoothed:.4f} > best {s.best:.4f}", inputs)
        if s.since_best >= c.plateau_evals:
            return self.reduce_lr(step, f"plateau: no new best in {s.since_best} evals", inputs)
        return self._converged(step, inputs, last_phase)

    def _converged(self, step: int, inputs: dict, last_phase: bool) -> list:
        s, c = self.state, self.cfg
        if len(s.ema) <= c.converge_evals or inputs["spent"] < c.min_phase_share:
            return []
        then = s.ema[-1 - c.converge_evals]
        improvement = (then - s.ema[-1]) / abs(then)
        inputs = {**inputs, "improvement": improvement, "evals": c.converge_evals}
        if improvement >= c.converge_tol:
            return []
        why = f"converged: smoothed val improved {improvement:.2%} over {c.converge_evals} evals"
        if last_phase:
            return [Event(step, "stop", why + " in the last phase", inputs)]
        if inputs["context_gain"] >= c.context_tol:
            return [
                Event(
                    step, "advance", f"{why}; the window's end is {inputs['context_gain']:.1%} below its middle", inputs
                )
            ]
        if s.since_best == 0:  # report a hold once per new best, not at every eval
            return [Event(step, "hold", f"{why}, but context gain {inputs['context_gain']:.2%} < "
                          f"{c.context_tol:.0%}: longer context waits for the schedule", inputs)]  # fmt: skip
        return []

    def to_dict(self) -> dict:
        return asdict(self.state)

    @classmethod
    def from_dict(cls, cfg, d: dict) -> "Orchestrator":
        return cls(cfg, OrchestratorState(**d))


def context_gain(nll_by_position: np.ndarray) -> float:
    """Relative drop of the mean NLL from the window's second quarter to its last quarter (positions
    along the window, averaged over sequences): > 0 when far context still lowers the loss."""
    n = len(nll_by_position)
    middle, end = nll_by_position[n // 4 : n // 2].mean(), nll_by_position[3 * n // 4 :].mean()
    return float((middle - end) / middle)
