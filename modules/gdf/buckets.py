"""Per-bucket running losses, the state behind AdaptiveLossWeight and AdaptiveTrainSchedule."""
import torch


def ema_per_bucket(values, index, loss, beta):
    """Return `values` with values[k] <- beta·values[k] + (1-beta)·mean(loss[index == k]) for each bucket k hit.

    Averaging the samples that share a bucket makes the update independent of their order (upstream keeps an
    arbitrary one of them); with one sample per bucket both agree.
    """
    loss = loss.detach().float().cpu()
    total = torch.zeros_like(values).index_add_(0, index, loss)
    count = torch.zeros_like(values).index_add_(0, index, torch.ones_like(loss))
    hit = count > 0
    values = values.clone()
    values[hit] = values[hit] * beta + total[hit] / count[hit] * (1 - beta)
    return values
