"""Trainers (upstream's notebook API: `from train import WurstCoreC, WurstCoreB`)."""
from .train_b import WurstCoreB
from .train_c import WurstCoreC

__all__ = ["WurstCoreB", "WurstCoreC"]
