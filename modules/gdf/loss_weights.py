"""Loss weights: a per-sample factor on the diffusion loss, as a function of logSNR."""
import math

import torch

from .buckets import ema_per_bucket


class BaseLossWeight:
    """`weight(logSNR)`, after undoing a `shift` (so a shifted training schedule keeps the weighting of the
    unshifted one) and clamping to `clamp_range` (None: no clamp)."""

    def weight(self, logSNR):
        raise NotImplementedError("a loss weight defines weight()")

    def __call__(self, logSNR, *args, shift=1, clamp_range=None, **kwargs):
        if shift != 1:
            logSNR = logSNR + 2 * math.log(shift)
        weight = self.weight(logSNR, *args, **kwargs)
        return weight if clamp_range is None else weight.clamp(*clamp_range)


class ComposedLossWeight(BaseLossWeight):
    """Product of the `mul` weights over the product of the `div` weights (each one weight or a list)."""

    def __init__(self, div, mul):
        self.mul = [mul] if isinstance(mul, BaseLossWeight) else mul
        self.div = [div] if isinstance(div, BaseLossWeight) else div

    def weight(self, logSNR):
        prod, div = 1, 1
        for m in self.mul:
            prod = prod * m.weight(logSNR)
        for d in self.div:
            div = div * d.weight(logSNR)
        return prod / div


class ConstantLossWeight(BaseLossWeight):
    """`v` everywhere."""

    def __init__(self, v=1):
        self.v = v

    def weight(self, logSNR):
        return torch.ones_like(logSNR) * self.v


class SNRLossWeight(BaseLossWeight):
    """SNR: turns an eps-MSE into an x0-MSE (Kingma et al. 2021)."""

    def weight(self, logSNR):
        return logSNR.exp()


class P2LossWeight(BaseLossWeight):
    """Perception-prioritised weight (Choi et al. 2022, Eq. 8): 1 / (k + SNR^s)^gamma; the defaults give
    sigmoid(-logSNR)."""

    def __init__(self, k=1.0, gamma=1.0, s=1.0):
        self.k, self.gamma, self.s = k, gamma, s

    def weight(self, logSNR):
        return (self.k + (logSNR * self.s).exp()) ** -self.gamma


class SNRPlusOneLossWeight(BaseLossWeight):
    """SNR + 1: turns an eps-MSE into a v-MSE (Salimans & Ho 2022)."""

    def weight(self, logSNR):
        return logSNR.exp() + 1


class MinSNRLossWeight(BaseLossWeight):
    """min(SNR, max_snr) (Hang et al. 2023, "Min-SNR weighting")."""

    def __init__(self, max_snr=5):
        self.max_snr = max_snr

    def weight(self, logSNR):
        return logSNR.exp().clamp(max=self.max_snr)


class MinSNRPlusOneLossWeight(BaseLossWeight):
    """min(SNR + 1, max_snr)."""

    def __init__(self, max_snr=5):
        self.max_snr = max_snr

    def weight(self, logSNR):
        return (logSNR.exp() + 1).clamp(max=self.max_snr)


class TruncatedSNRLossWeight(BaseLossWeight):
    """max(SNR, min_snr) (Salimans & Ho 2022, "truncated SNR")."""

    def __init__(self, min_snr=1):
        self.min_snr = min_snr

    def weight(self, logSNR):
        return logSNR.exp().clamp(min=self.min_snr)


class SechLossWeight(BaseLossWeight):
    """sech(logSNR / div), a bell over logSNR (Kingma & Gao 2023, "Understanding Diffusion Objectives")."""

    def __init__(self, div=2):
        self.div = div

    def weight(self, logSNR):
        return 1 / (logSNR / self.div).cosh()


class DebiasedLossWeight(BaseLossWeight):
    """1 / sqrt(SNR) (Yu et al. 2023, "Debias the Training of Diffusion Models")."""

    def weight(self, logSNR):
        return 1 / logSNR.exp().sqrt()


class SigmoidLossWeight(BaseLossWeight):
    """sigmoid(s·logSNR) (Kingma & Gao 2023)."""

    def __init__(self, s=1):
        self.s = s

    def weight(self, logSNR):
        return (logSNR * self.s).sigmoid()


class AdaptiveLossWeight(BaseLossWeight):
    """1 / (EMA of the loss in the sample's logSNR bucket), so every noise level adds about the same to the
    loss. `buckets` buckets split `logsnr_range` evenly (the outer two reach to infinity); the bucket losses
    belong to a training checkpoint (`state_dict`/`load_state_dict`, keys as upstream's saved info)."""

    def __init__(self, logsnr_range=(-10, 10), buckets=300, weight_range=(1e-7, 1e7)):
        self.bucket_ranges = torch.linspace(logsnr_range[0], logsnr_range[1], buckets - 1)  # inner edges
        self.bucket_losses = torch.ones(buckets)
        self.weight_range = weight_range

    def bucket(self, logSNR):
        """Index of the bucket holding each logSNR (edges belong to the lower bucket)."""
        return torch.searchsorted(self.bucket_ranges.to(logSNR.device), logSNR.float())

    def weight(self, logSNR):
        losses = self.bucket_losses.to(logSNR.device)[self.bucket(logSNR)]
        return (1 / losses).clamp(*self.weight_range)

    def update_buckets(self, logSNR, loss, beta=0.99):
        """One EMA step per bucket hit, towards the mean loss of the batch's samples in it."""
        self.bucket_losses = ema_per_bucket(self.bucket_losses, self.bucket(logSNR.detach()).cpu(), loss, beta)

    def state_dict(self):
        return {"bucket_ranges": self.bucket_ranges.clone(), "bucket_losses": self.bucket_losses.clone()}

    def load_state_dict(self, state):
        self.bucket_ranges = torch.as_tensor(state["bucket_ranges"], dtype=torch.float32)
        self.bucket_losses = torch.as_tensor(state["bucket_losses"], dtype=torch.float32)
