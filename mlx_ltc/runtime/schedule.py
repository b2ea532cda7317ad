"""The learning-rate schedule every trainer uses: linear warmup, then cosine decay to a floor."""

import math


def warmup_cosine(step: int, peak: float, warmup: int, steps: int, min_ratio: float) -> float:
    """The rate of update `step` (0-based) of `steps`: linear warmup over `warmup` updates to `peak`, then
    cosine to peak * min_ratio at the last update."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(steps - warmup - 1, 1))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
