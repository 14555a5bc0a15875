"""Trainers, under upstream's notebook names: `from train import WurstCoreC, WurstCoreB, ControlNetCore, LoraCore`."""
from .train_b import WurstCoreB
from .train_c import WurstCoreC
from .train_c_controlnet import ControlNetCore
from .train_c_lora import LoraCore

__all__ = ["WurstCoreB", "WurstCoreC", "ControlNetCore", "LoraCore"]
