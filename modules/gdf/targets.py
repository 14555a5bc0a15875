"""Targets: what the model predicts, and how to turn a prediction back into x0 and eps.

`__call__(x0, epsilon, logSNR, a, b)` gives the training target for x_t = a·x0 + b·eps; `x0` and `epsilon`
invert it from (x_t, pred). The inverses use only x_t = a·x0 + b·eps, so every target works with every scaler.
a and b are tensors (training: one per sample) or numbers (`GDF.sample`: one per step).
"""
import torch


def _numbers(*values):
    return all(isinstance(v, float) for v in values)


def combine(x, cx, y, cy):
    """cx·x + cy·y. With numbers (the sampling loop's) it is one multiply and one fused add: two tensor ops."""
    if _numbers(cx, cy):
        return torch.add(x * cx, y, alpha=cy)
    return cx * x + cy * y


class EpsilonTarget:
    """Predict the noise (Ho et al. 2020)."""

    def __call__(self, x0, epsilon, logSNR, a, b):
        return epsilon

    def x0(self, noised, pred, logSNR, a, b):
        if _numbers(a, b) and a != 0:
            return combine(noised, 1 / a, pred, -b / a)
        return (noised - pred * b) / a

    def epsilon(self, noised, pred, logSNR, a, b):
        return pred


class X0Target:
    """Predict the clean sample."""

    def __call__(self, x0, epsilon, logSNR, a, b):
        return x0

    def x0(self, noised, pred, logSNR, a, b):
        return pred

    def epsilon(self, noised, pred, logSNR, a, b):
        if _numbers(a, b) and b != 0:
            return combine(noised, 1 / b, pred, -a / b)
        return (noised - pred * a) / b


class VTarget:
    """v = a·eps - b·x0 (Salimans & Ho 2022, "Progressive Distillation", Sec. 4); the inverse divides by
    a^2 + b^2, which is 1 only for VP."""

    def __call__(self, x0, epsilon, logSNR, a, b):
        return a * epsilon - b * x0

    def x0(self, noised, pred, logSNR, a, b):
        squared_sum = a ** 2 + b ** 2
        return combine(noised, a / squared_sum, pred, -b / squared_sum)

    def epsilon(self, noised, pred, logSNR, a, b):
        squared_sum = a ** 2 + b ** 2
        return combine(noised, b / squared_sum, pred, a / squared_sum)


class RectifiedFlowsTarget:
    """The flow velocity eps - x0 (Liu et al. 2022). The inverse divides by a + b, which is 1 for LERP (where it
    equals upstream's); with VP upstream's inverse would be wrong."""

    def __call__(self, x0, epsilon, logSNR, a, b):
        return epsilon - x0

    def x0(self, noised, pred, logSNR, a, b):
        return (noised - pred * b) / (a + b)

    def epsilon(self, noised, pred, logSNR, a, b):
        return (noised + pred * a) / (a + b)
