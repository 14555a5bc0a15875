"""Schedules: map t in [0, 1] (1 = pure noise) to logSNR, or draw random logSNRs for training.

GDF expresses every schedule in logSNR = log(a^2 / b^2) (Kingma et al. 2021, "Variational Diffusion Models"),
so schedules, scalers and targets can be mixed freely.
"""
import math

import torch

from .buckets import ema_per_bucket


class BaseSchedule:
    """`schedule(t, batch_size)` gives logSNR; `__call__` adds discretisation, the resolution shift and limits.

    `shift` moves logSNR by 2·log(1/shift) (Hoogeboom et al. 2023, "simple diffusion", Sec. 3.1: an image
    s times larger keeps the SNR of a smaller one at log-SNR - 2·log(s)); the result is then clamped to the
    unshifted limits so that t=0 and t=1 stay inside the range the model was trained on.
    """
    takes_t = True  # False for train-only schedules that can only draw random logSNRs

    def __init__(self, *args, force_limits=True, discrete_steps=None, shift=1, **kwargs):
        self.setup(*args, **kwargs)
        self.limits = None
        self.discrete_steps = discrete_steps
        self.shift = shift
        if force_limits:
            self.reset_limits()

    def reset_limits(self, shift=1, disable=False):
        """Store [logSNR(t=1), logSNR(t=0)] as the clamp range (None if disabled or the schedule takes no t)."""
        self.limits = None
        if not disable and self.takes_t:
            self.limits = self(torch.tensor([1.0, 0.0]), shift=shift).tolist()
        return self.limits

    def setup(self, *args, **kwargs):
        raise NotImplementedError("a schedule defines setup()")

    def schedule(self, t, batch_size):
        raise NotImplementedError("a schedule defines schedule()")

    def __call__(self, t, shift=1):
        """`t` a tensor of times, or an int: that many random times (training)."""
        if isinstance(t, torch.Tensor):
            if not self.takes_t:
                raise ValueError(f"{type(self).__name__} only draws random logSNRs: pass a batch size, not t")
            if self.discrete_steps is not None:
                if t.dtype != torch.long:
                    t = (t * (self.discrete_steps - 1)).round().long()
                t = t / (self.discrete_steps - 1)
            logSNR = self.schedule(t.clamp(0, 1), None)
        else:
            logSNR = self.schedule(None, t)
        if shift * self.shift != 1:
            logSNR = logSNR + 2 * math.log(1 / (shift * self.shift))
        if self.limits is not None:
            logSNR = logSNR.clamp(*self.limits)
        return logSNR


def _random_t(batch_size):
    """Uniform t in (0, 1] for training."""
    return 1 - torch.rand(batch_size)


def _logit(var):
    """logSNR of a VP process whose signal variance is `var`."""
    return (var / (1 - var)).log()


class CosineSchedule(BaseSchedule):
    """Improved DDPM cosine schedule (Nichol & Dhariwal 2021, Eq. 17), signal variance clamped to `clamp_range`.

    `norm_instead` rescales the variance into the range instead of clamping it.
    """

    def setup(self, s=0.008, clamp_range=(0.0001, 0.9999), norm_instead=False):
        self.s = torch.tensor([s])
        self.clamp_range = clamp_range
        self.norm_instead = norm_instead
        self.min_var = torch.cos(self.s / (1 + self.s) * torch.pi * 0.5) ** 2

    def schedule(self, t, batch_size):
        if t is None:
            t = (1 - torch.rand(batch_size)).add(0.001).clamp(0.001, 1.0)
        s, min_var = self.s.to(t.device), self.min_var.to(t.device)
        var = torch.cos((s + t) / (1 + s) * torch.pi * 0.5).clamp(0, 1) ** 2 / min_var
        if self.norm_instead:
            var = var * (self.clamp_range[1] - self.clamp_range[0]) + self.clamp_range[0]
        else:
            var = var.clamp(*self.clamp_range)
        return _logit(var)


class CosineSchedule2(BaseSchedule):
    """Cosine schedule written in logSNR, -2·log tan(...), truncated to `logsnr_range` (simple diffusion, Eq. 4)."""

    def setup(self, logsnr_range=(-15, 15)):
        self.t_min = math.atan(math.exp(-0.5 * logsnr_range[1]))
        self.t_max = math.atan(math.exp(-0.5 * logsnr_range[0]))

    def schedule(self, t, batch_size):
        if t is None:
            t = _random_t(batch_size)
        return -2 * (self.t_min + t * (self.t_max - self.t_min)).tan().log()


class SqrtSchedule(BaseSchedule):
    """Signal variance 1 - sqrt(t + s) (Li et al. 2022, "Diffusion-LM", Sec. 4.4)."""

    def setup(self, s=1e-4, clamp_range=(0.0001, 0.9999), norm_instead=False):
        self.s = s
        self.clamp_range = clamp_range
        self.norm_instead = norm_instead

    def schedule(self, t, batch_size):
        if t is None:
            t = _random_t(batch_size)
        var = 1 - (t + self.s) ** 0.5
        if self.norm_instead:
            var = var * (self.clamp_range[1] - self.clamp_range[0]) + self.clamp_range[0]
        else:
            var = var.clamp(*self.clamp_range)
        return _logit(var)


class RectifiedFlowsSchedule(BaseSchedule):
    """x_t = (1-t)·x0 + t·eps (Liu et al. 2022), so SNR = (1-t)^2 / t^2."""

    def setup(self, logsnr_range=(-15, 15)):
        self.logsnr_range = logsnr_range

    def schedule(self, t, batch_size):
        if t is None:
            t = _random_t(batch_size)
        return (((1 - t) ** 2) / (t ** 2)).log().clamp(*self.logsnr_range)


class EDMSampleSchedule(BaseSchedule):
    """Karras et al. 2022 ("EDM", Eq. 5) sampling sigmas, rho = `p`; t=1 gives sigma_max."""

    def setup(self, sigma_range=(0.002, 80), p=7):
        self.sigma_range = sigma_range
        self.p = p

    def schedule(self, t, batch_size):
        if t is None:
            t = _random_t(batch_size)
        smin, smax, p = *self.sigma_range, self.p
        sigma = (smax ** (1 / p) + (1 - t) * (smin ** (1 / p) - smax ** (1 / p))) ** p
        return (1 / sigma ** 2).log()


class EDMTrainSchedule(BaseSchedule):
    """EDM training distribution: ln(sigma) ~ N(mu, std) (Karras et al. 2022, Table 1, P_mean / P_std)."""
    takes_t = False

    def setup(self, mu=-1.2, std=1.2):
        self.mu = mu
        self.std = std

    def schedule(self, t, batch_size):
        return -2 * (torch.randn(batch_size) * self.std - self.mu)


class LinearSchedule(BaseSchedule):
    """logSNR linear in t from logsnr_range[1] (t=0) to logsnr_range[0] (t=1)."""

    def setup(self, logsnr_range=(-10, 10)):
        self.logsnr_range = logsnr_range

    def schedule(self, t, batch_size):
        if t is None:
            t = _random_t(batch_size)
        return t * (self.logsnr_range[0] - self.logsnr_range[1]) + self.logsnr_range[1]


class PiecewiseLinearSchedule(BaseSchedule):
    """Signal variance linearly interpolated through the knots (`self.x`: increasing t, `self.y`: variance).

    For schedules only known at discrete steps; subclasses set `x` and `y` in `setup`.
    """

    def setup(self):
        raise NotImplementedError("a piecewise-linear schedule sets self.x and self.y in setup()")

    def schedule(self, t, batch_size):
        if t is None:
            t = _random_t(batch_size)
        xs, ys = self.x.to(t.device), self.y.to(t.device)
        i = (torch.searchsorted(xs, t) - 1).clamp(0, len(xs) - 2)  # knot i <= t <= knot i+1
        var = ys[i] + (ys[i + 1] - ys[i]) * (t - xs[i]) / (xs[i + 1] - xs[i])
        return _logit(var)


class StableDiffusionSchedule(PiecewiseLinearSchedule):
    """Stable Diffusion's "scaled linear" betas (sqrt-linear over `total_steps`), as cumulative alphas."""

    def setup(self, linear_range=(0.00085, 0.012), total_steps=1000):
        self.x, self.y = stable_diffusion_alphas_cumprod(linear_range, total_steps)


def stable_diffusion_alphas_cumprod(linear_range, total_steps):
    """Knots (t, cumulative alpha) of Stable Diffusion's betas, linear in sqrt(beta) over `linear_range`."""
    lo, hi = (r ** 0.5 for r in linear_range)
    t = torch.linspace(0, 1, total_steps + 1)
    return t, (1 - (lo * (1 - t) + hi * t) ** 2).cumprod(dim=-1)


class AdaptiveTrainSchedule(BaseSchedule):
    """Draws logSNR from buckets in proportion to an EMA of each bucket's loss, so training visits hard noise
    levels more often. The bucket state belongs to a training checkpoint (`state_dict`/`load_state_dict`)."""
    takes_t = False

    def setup(self, logsnr_range=(-10, 10), buckets=100, min_probs=0.0):
        edges = torch.linspace(logsnr_range[0], logsnr_range[1], buckets + 1)
        self.bucket_ranges = torch.stack([edges[:-1], edges[1:]], dim=1)  # buckets x (low, high)
        self.bucket_probs = torch.ones(buckets)
        self.min_probs = min_probs

    def schedule(self, t, batch_size):
        weights = self.bucket_probs + self.min_probs
        buckets = torch.multinomial(weights / weights.sum(), batch_size, replacement=True)
        low, high = self.bucket_ranges[buckets].unbind(dim=1)
        return torch.rand(batch_size) * (high - low) + low

    def update_buckets(self, logSNR, loss, beta=0.99):
        """One EMA step per bucket hit, towards the mean loss of the batch's samples in it.

        logSNRs outside the range count for the nearest end bucket.
        """
        edges = self.bucket_ranges[1:, 0].contiguous()
        index = torch.bucketize(logSNR.detach().float().cpu(), edges, right=True)
        self.bucket_probs = ema_per_bucket(self.bucket_probs, index, loss, beta)

    def state_dict(self):
        return {"bucket_ranges": self.bucket_ranges.clone(), "bucket_probs": self.bucket_probs.clone()}

    def load_state_dict(self, state):
        self.bucket_ranges = torch.as_tensor(state["bucket_ranges"], dtype=torch.float32)
        self.bucket_probs = torch.as_tensor(state["bucket_probs"], dtype=torch.float32)


class InterpolatedSchedule(BaseSchedule):
    """Blends two schedules over t: `scheduler2` near t=0, `scheduler1` near t=1, each at its own shift."""

    def setup(self, scheduler1, scheduler2, shifts=(1.0, 1.0)):
        self.scheduler1 = scheduler1
        self.scheduler2 = scheduler2
        self.shifts = shifts

    def schedule(self, t, batch_size):
        if t is None:
            t = _random_t(batch_size)
        t = t.clamp(1e-7, 1 - 1e-7)  # an infinite logSNR times a zero weight would give nan
        low_logSNR = self.scheduler1(t, shift=self.shifts[0])
        high_logSNR = self.scheduler2(t, shift=self.shifts[1])
        return low_logSNR * t + high_logSNR * (1 - t)
