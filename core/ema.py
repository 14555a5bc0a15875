"""Exponential moving average of a trained model's weights (upstream's `ema_start_iters`/`ema_iters`/`ema_beta`)."""
import dataclasses
from typing import Optional

import torch
from torch import nn

from .config import Config, ConfigError


@dataclasses.dataclass(frozen=True)
class EMAConfig(Config):
    ema_start_iters: Optional[int] = None  # None: no EMA model; before this iteration the EMA copies the weights
    ema_iters: Optional[int] = None  # update the EMA every this many iterations (micro-batches, as upstream)
    ema_beta: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        if self.ema_start_iters is not None and (self.ema_iters is None or self.ema_beta is None):
            raise ConfigError("ema_start_iters is set: ema_iters and ema_beta must be set too")

    @property
    def use_ema(self) -> bool:
        return self.ema_start_iters is not None

    def ema_beta_at(self, iteration: int) -> Optional[float]:
        """The EMA decay to apply after `iteration`, or None when this iteration does not update the EMA."""
        if not self.use_ema or iteration % self.ema_iters != 0:
            return None
        return self.ema_beta if iteration > self.ema_start_iters else 0.0


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, beta: float):
    """ema = beta * ema + (1 - beta) * model for parameters and floating buffers; beta 0 (and other buffers) copy."""
    pairs = zip([*ema_model.parameters(), *ema_model.buffers()], [*model.parameters(), *model.buffers()])
    for ema, current in pairs:
        if beta == 0 or not ema.is_floating_point():
            ema.copy_(current)
        else:
            ema.lerp_(current.to(ema.dtype), 1 - beta)
