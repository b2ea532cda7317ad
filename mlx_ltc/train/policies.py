"""Memory policies: the named ways a training step can spend memory, from plain mlx-lm to the full engine.

Each is a setting of the memory engine's parts (`config.MemoryConfig`) plus whether one lazy graph
recomputes every layer in its backward (mlx-lm's `--grad-checkpoint`). `hardware.planner` prices each
one from a model's config; `memory.policy: auto` trains with the fastest one that fits.
"""

import dataclasses
import math
from dataclasses import dataclass

from mlx_ltc.config import MemoryConfig

__all__ = ["NAMES", "POLICIES", "Policy"]


@dataclass(frozen=True)
class Policy:
    name: str
    attention: str  # efficient: our O(L) kernel | stock: MLX's scaled_dot_product_attention
    loss: str  # chunked | full
    staged: bool  # layer-by-layer forward and backward with evaluation boundaries
    checkpoint: bool  # one graph, each layer recomputed in the backward (mx.checkpoint)
    stage_sqrt: bool = False  # staged: a checkpoint every ceil(sqrt(layers)) layers instead of every layer
    fused: bool = False  # relies on the backend's memory-efficient attention VJP (not every backend has one)
    about: str = ""

    def layers_per_stage(self, n_layers: int) -> int:
        if not self.staged:
            return 0
        return max(1, math.ceil(math.sqrt(n_layers))) if self.stage_sqrt else 1

    def memory(self, base: MemoryConfig, n_layers: int) -> MemoryConfig:
        """The memory settings this policy trains with; the rest (block size, loss chunk) from `base`."""
        return dataclasses.replace(
            base,
            policy=self.name,
            attention=self.attention,
            loss=self.loss,
            staged=self.staged,
            layers_per_stage=self.layers_per_stage(n_layers),
        )


POLICIES = {
    p.name: p
    for p in (
        Policy("plain", "stock", "full", False, False, about="mlx-lm's step: full logits, every activation kept"),
        Policy("stock", "stock", "full", False, True, about="mlx-lm with --grad-checkpoint: layer inputs kept"),
        Policy("chunked", "stock", "chunked", False, True, about="stock + the loss over chunks of positions"),
        Policy("efficient", "efficient", "chunked", False, True, about="chunked + our O(L) attention"),
        Policy("fused", "stock", "chunked", True, False, fused=True,
               about="staged, with MLX's fused attention and its memory-efficient VJP"),
        Policy("engine", "efficient", "chunked", True, False, about="staged, O(L) attention, a checkpoint per layer"),
        Policy("engine_sqrt", "efficient", "chunked", True, False, stage_sqrt=True,
               about="staged, a checkpoint every sqrt(layers) layers"),
    )
}  # fmt: skip
NAMES = tuple(POLICIES)
