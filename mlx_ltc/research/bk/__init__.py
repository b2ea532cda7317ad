"""A causal Birman-Schwinger (BK) core language model: token mixing by a Green's function recurrence."""

from mlx_ltc.research.bk.model import BKConfig, BKModel

__all__ = ["BKConfig", "BKModel"]
