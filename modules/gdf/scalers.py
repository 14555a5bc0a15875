"""Input scalers: logSNR -> (a, b) with x_t = a·x0 + b·eps."""
import torch


class BaseScaler:
    """`scalers(logSNR)` gives (a, b); `setup_limits` can stretch them so the ends of a schedule are exact.

    Stretching maps a and b linearly so that a(t=1) = 0 and b(t=0) = 0 (and a(t=0) = b(t=1) = 1): the clamped
    cosine schedule otherwise never reaches pure noise or a clean image.
    """

    def __init__(self):
        self.stretched_limits = None

    def setup_limits(self, schedule, stretch_max=True, stretch_min=True, shift=1):
        """Measure (a, b) at t=1 and t=0 of `schedule`; store and return [min_a, max_a, min_b, max_b]."""
        at_noise, at_clean = (self.scalers(schedule(torch.tensor([t]), shift=shift)) for t in (1.0, 0.0))
        min_a, max_b = [v.item() for v in at_noise] if stretch_max else [0, 1]
        max_a, min_b = [v.item() for v in at_clean] if stretch_min else [1, 0]
        self.stretched_limits = [min_a, max_a, min_b, max_b]
        return self.stretched_limits

    def stretch_limits(self, a, b):
        min_a, max_a, min_b, max_b = self.stretched_limits
        return (a - min_a) / (max_a - min_a), (b - min_b) / (max_b - min_b)

    def scalers(self, logSNR):
        raise NotImplementedError("a scaler defines scalers()")

    def __call__(self, logSNR):
        a, b = self.scalers(logSNR)
        if self.stretched_limits is not None:
            a, b = self.stretch_limits(a, b)
        return a, b


class VPScaler(BaseScaler):
    """Variance preserving (Ho et al. 2020): a^2 = sigmoid(logSNR), a^2 + b^2 = 1."""

    def scalers(self, logSNR):
        a_squared = logSNR.sigmoid()
        return a_squared.sqrt(), (1 - a_squared).sqrt()


class LERPScaler(BaseScaler):
    """Linear interpolation (rectified flows, Liu et al. 2022): a + b = 1 and a/b = exp(logSNR/2), so
    a = sigmoid(logSNR/2). Upstream reaches the same value through a quadratic that divides by SNR - 1."""

    def scalers(self, logSNR):
        a = (logSNR / 2).sigmoid()
        return a, 1 - a
