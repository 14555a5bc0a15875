"""Trainers, under upstream's notebook names: `from train import WurstCoreC, WurstCoreB, ControlNetCore, LoraCore`
(and `WurstCoreA` and `WurstCorePreviewer`, the Stage A and Previewer trainers upstream never released)."""
from .train_a import WurstCoreA
from .train_b import WurstCoreB
from .train_c import WurstCoreC
from .train_c_controlnet import ControlNetCore
from .train_c_lora import LoraCore
from .train_previewer import WurstCorePreviewer

__all__ = ["WurstCoreA", "WurstCoreB", "WurstCoreC", "ControlNetCore", "LoraCore", "WurstCorePreviewer"]
