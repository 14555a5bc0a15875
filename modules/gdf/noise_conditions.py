"""Noise conditions: the scalar the model is told about the noise level, computed from logSNR.

Released Stable Cascade models take `r` = the cosine schedule's t (`CosineTNoiseCond`).
"""
import math

import torch

from .schedulers import stable_diffusion_alphas_cumprod


class BaseNoiseCond:
    """`cond(logSNR)`, after undoing a resolution `shift` (so a shifted schedule still tells the model the
    time it was trained with) and clamping to `clamp_range` (None: the class default, often no clamp)."""
    default_clamp_range = None

    def __init__(self, *args, shift=1, clamp_range=None, **kwargs):
        self.shift = shift
        self.clamp_range = self.default_clamp_range if clamp_range is None else clamp_range
        self.setup(*args, **kwargs)

    def setup(self):
        """Optional: store a subclass's parameters."""

    def cond(self, logSNR):
        raise NotImplementedError("a noise condition defines cond()")

    def __call__(self, logSNR):
        if self.shift != 1:
            logSNR = logSNR + 2 * math.log(self.shift)
        cond = self.cond(logSNR)
        return cond if self.clamp_range is None else cond.clamp(*self.clamp_range)


class CosineTNoiseCond(BaseNoiseCond):
    """t of the improved-DDPM cosine schedule (Nichol & Dhariwal 2021, Eq. 17), solved for t:
    t = acos(sqrt(sigmoid(logSNR)·f(0)))·(1+s)·2/pi - s, with f(0) = cos(s/(1+s)·pi/2)^2."""
    default_clamp_range = (0, 1)

    def setup(self, s=0.008):
        self.s = torch.tensor([s])
        self.min_var = torch.cos(self.s / (1 + self.s) * torch.pi * 0.5) ** 2

    def cond(self, logSNR):
        s, min_var = self.s.to(logSNR.device), self.min_var.to(logSNR.device)
        return ((logSNR.sigmoid() * min_var) ** 0.5).acos() / (torch.pi * 0.5) * (1 + s) - s


class EDMNoiseCond(BaseNoiseCond):
    """-logSNR/8 = ln(sigma)/4, EDM's c_noise (Karras et al. 2022, Table 1)."""

    def cond(self, logSNR):
        return -logSNR / 8


class SigmoidNoiseCond(BaseNoiseCond):
    """The noise variance of a VP process, sigmoid(-logSNR)."""

    def cond(self, logSNR):
        return (-logSNR).sigmoid()


class LogSNRNoiseCond(BaseNoiseCond):
    """logSNR itself."""

    def cond(self, logSNR):
        return logSNR


class EDMSigmaNoiseCond(BaseNoiseCond):
    """EDM's sigma = exp(-logSNR/2), times `sigma_data`."""

    def setup(self, sigma_data=1):
        self.sigma_data = sigma_data

    def cond(self, logSNR):
        return torch.exp(-logSNR / 2) * self.sigma_data


class RectifiedFlowsNoiseCond(BaseNoiseCond):
    """The signal weight a = sigmoid(logSNR/2) of x_t = a·x0 + (1-a)·eps (1 - t of rectified flows)."""

    def cond(self, logSNR):
        return (logSNR / 2).sigmoid()


class PiecewiseLinearNoiseCond(BaseNoiseCond):
    """Inverts a piecewise-linear schedule: knots `self.x` (increasing t) and `self.y` (decreasing signal
    variance), set by subclasses in `setup`. Interpolates inside the segment that holds the variance (upstream
    picks the neighbouring segment and extrapolates)."""

    def setup(self):
        raise NotImplementedError("a piecewise-linear noise condition sets self.x and self.y in setup()")

    def cond(self, logSNR):
        var = logSNR.sigmoid()
        xs, ys = self.x.to(var.device).flip(0), self.y.to(var.device).flip(0)  # variance increasing
        j = torch.searchsorted(ys, var).clamp(1, len(ys) - 1)  # ys[j-1] < var <= ys[j]
        return xs[j - 1] + (xs[j] - xs[j - 1]) * (var - ys[j - 1]) / (ys[j] - ys[j - 1])


class StableDiffusionNoiseCond(PiecewiseLinearNoiseCond):
    """t of `StableDiffusionSchedule`."""
    default_clamp_range = (0, 1)

    def setup(self, linear_range=(0.00085, 0.012), total_steps=1000):
        self.total_steps = total_steps
        self.x, self.y = stable_diffusion_alphas_cumprod(linear_range, total_steps)


class DiscreteNoiseCond(BaseNoiseCond):
    """Another noise condition, mapped from `continuous_range` to integer steps 0..`steps` (for models trained
    on discrete timesteps)."""

    def setup(self, noise_cond, steps=1000, continuous_range=(0, 1)):
        self.noise_cond = noise_cond
        self.steps = steps
        self.continuous_range = continuous_range

    def cond(self, logSNR):
        low, high = self.continuous_range
        return ((self.noise_cond(logSNR) - low) / (high - low)).mul(self.steps).long()
