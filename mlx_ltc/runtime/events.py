"""A decision or incident of a run, with the inputs it was made from: events.jsonl and the metrics' lines."""

import math
from dataclasses import asdict, dataclass, field


@dataclass
class Event:
    step: int
    kind: str  # advance hold stop reduce_lr restore_best best phase spike skip unstable rollback checkpoint resume
    reason: str
    inputs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """As strict JSON allows: a non-finite input is written as its name ("nan", "inf")."""
        inputs = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in self.inputs.items()}
        return {**asdict(self), "inputs": inputs}

    def short(self) -> str:
        return f"{self.kind}: {self.reason}"
