"""Samplers: one reverse step from logSNR to logSNR_prev, given the model's x0 and eps estimates.

Every random draw goes through `noise.randn` with the caller's generator(s), so a seed fixes the image.
`scalers`, when given, are the step's ((a, b), (a_prev, b_prev)), computed for the whole schedule before the loop
(`GDF.sample` does, as plain numbers: every sample shares the step's t). Step formulas work on tensors and numbers
alike, so with numbers their scalar arithmetic is Python's and only the latent-sized work dispatches torch ops.
"""
import inspect
import math

import torch

from .noise import randn
from .targets import combine


def _sqrt(v, clamp=False):
    """sqrt of a tensor or a number (of max(v, 0) with `clamp`)."""
    if torch.is_tensor(v):
        return (v.clamp(min=0) if clamp else v).sqrt()
    return math.sqrt(max(v, 0.0) if clamp else v)


class SimpleSampler:
    """Subclasses define `step(x, x0, epsilon, logSNR, logSNR_prev, ..., generator=None)`; GDF calls the sampler."""

    def __init__(self, gdf):
        self.gdf = gdf

    def __call__(self, *args, **kwargs):
        return self.step(*args, **kwargs)

    def init_x(self, shape, generator=None, device=None, dtype=torch.float32):
        """The latent sampling starts from: pure noise."""
        return randn(shape, generator, device, dtype)

    def step(self, x, x0, epsilon, logSNR, logSNR_prev, generator=None, scalers=None):
        raise NotImplementedError("a sampler defines step()")

    def scalers(self, logSNR, logSNR_prev, ndim, scalers=None):
        """((a, b), (a_prev, b_prev)): the precomputed ones, else from the GDF's input scaler."""
        if scalers is not None:
            return scalers
        return self.gdf.input_scalers(logSNR, ndim), self.gdf.input_scalers(logSNR_prev, ndim)


def takes_scalers(sampler) -> bool:
    """Whether `sampler.step` accepts precomputed `scalers` (a sampler written before it existed may not)."""
    step = getattr(sampler, "step", sampler)
    try:
        return "scalers" in inspect.signature(step).parameters
    except (TypeError, ValueError):
        return False


class DDIMSampler(SimpleSampler):
    """DDIM (Song et al. 2021, Eq. 12): x_prev = a_prev·x0 + sqrt(b_prev² - σ²)·eps + σ·z, with
    σ = eta·(b_prev/b)·sqrt(1 - a²/a_prev²) (Eq. 16); eta 0 is deterministic, eta 1 is DDPM's posterior."""

    def step(self, x, x0, epsilon, logSNR, logSNR_prev, eta=0, generator=None, scalers=None):
        (a, b), (a_prev, b_prev) = self.scalers(logSNR, logSNR_prev, x0.dim(), scalers)
        if eta <= 0:
            return combine(x0, a_prev, epsilon, b_prev)
        sigma = eta * (b_prev / b) * _sqrt(1 - a ** 2 / a_prev ** 2)
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
        # clamp: round-off can push b_prev² - σ² a hair below zero when eta = 1 and the step is tiny
        x = combine(x0, a_prev, epsilon, _sqrt(b_prev ** 2 - sigma ** 2, clamp=True))
        return x.add_(noise, alpha=sigma) if isinstance(sigma, float) else x + sigma * noise


class DDPMSampler(DDIMSampler):
    """Ancestral DDPM sampling (Ho et al. 2020, Eq. 7), i.e. DDIM with eta = 1."""

    def step(self, x, x0, epsilon, logSNR, logSNR_prev, eta=1, generator=None, scalers=None):
        return super().step(x, x0, epsilon, logSNR, logSNR_prev, eta=eta, generator=generator, scalers=scalers)


class LCMSampler(SimpleSampler):
    """Consistency-model multistep sampling (Song et al. 2023, Alg. 1; Luo et al. 2023, "LCM"): re-noise the
    x0 estimate with fresh noise, x_prev = a_prev·x0 + b_prev·z."""

    def step(self, x, x0, epsilon, logSNR, logSNR_prev, generator=None, scalers=None):
        _, (a_prev, b_prev) = self.scalers(logSNR, logSNR_prev, x0.dim(), scalers)
        return combine(x0, a_prev, randn(x0.shape, generator, x0.device, x0.dtype), b_prev)
