"""Trainers, under upstream's notebook names: `from train import WurstCoreC, WurstCoreB, LoraCore`."""
from .train_b import WurstCoreB
from .train_c import WurstCoreC
from .train_c_lora import LoraCore

__all__ = ["WurstCoreB", "WurstCoreC", "LoraCore"]
