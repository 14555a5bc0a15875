"""Samplers: one reverse step from logSNR to logSNR_prev, given the model's x0 and eps estimates.

Every random draw goes through `noise.randn` with the caller's generator(s), so a seed fixes the image.
"""
import torch

from .noise import randn


class SimpleSampler:
    """Subclasses define `step(x, x0, epsilon, logSNR, logSNR_prev, ..., generator=None)`; GDF calls the sampler."""

    def __init__(self, gdf):
        self.gdf = gdf

    def __call__(self, *args, **kwargs):
        return self.step(*args, **kwargs)

    def init_x(self, shape, generator=None, device=None, dtype=torch.float32):
        """The latent sampling starts from: pure noise."""
        return randn(shape, generator, device, dtype)

    def step(self, x, x0, epsilon, logSNR, logSNR_prev, generator=None):
        raise NotImplementedError("a sampler defines step()")


class DDIMSampler(SimpleSampler):
    """DDIM (Song et al. 2021, Eq. 12): x_prev = a_prev·x0 + sqrt(b_prev² - σ²)·eps + σ·z, with
    σ = eta·(b_prev/b)·sqrt(1 - a²/a_prev²) (Eq. 16); eta 0 is deterministic, eta 1 is DDPM's posterior."""

    def step(self, x, x0, epsilon, logSNR, logSNR_prev, eta=0, generator=None):
        a, b = self.gdf.input_scalers(logSNR, x0.dim())
        a_prev, b_prev = self.gdf.input_scalers(logSNR_prev, x0.dim())
        if eta <= 0:
            return a_prev * x0 + b_prev * epsilon
        sigma = eta * (b_prev / b) * (1 - a ** 2 / a_prev ** 2).sqrt()
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
        # clamp: round-off can push b_prev² - σ² a hair below zero when eta = 1 and the step is tiny
        return a_prev * x0 + (b_prev ** 2 - sigma ** 2).clamp(min=0).sqrt() * epsilon + sigma * noise


class DDPMSampler(DDIMSampler):
    """Ancestral DDPM sampling (Ho et al. 2020, Eq. 7), i.e. DDIM with eta = 1."""

    def step(self, x, x0, epsilon, logSNR, logSNR_prev, eta=1, generator=None):
        return super().step(x, x0, epsilon, logSNR, logSNR_prev, eta=eta, generator=generator)


class LCMSampler(SimpleSampler):
    """Consistency-model multistep sampling (Song et al. 2023, Alg. 1; Luo et al. 2023, "LCM"): re-noise the
    x0 estimate with fresh noise, x_prev = a_prev·x0 + b_prev·z."""

    def step(self, x, x0, epsilon, logSNR, logSNR_prev, generator=None):
        a_prev, b_prev = self.gdf.input_scalers(logSNR_prev, x0.dim())
        return x0 * a_prev + randn(x0.shape, generator, x0.device, x0.dtype) * b_prev
