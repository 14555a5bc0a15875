"""Classifier-free guidance (Ho & Salimans 2022) for `GDF.sample`: batching cond with uncond, and the guided
prediction with its std rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
Flawed", Sec. 3.4)."""
import math

import torch


def pair_inputs(cond, uncond):
    """One batch holding `cond` then `uncond`, matched by key (dicts, nested) or position (lists, tuples).

    A tensor whose unconditional value is missing or None is paired with zeros (upstream's default
    unconditional inputs); None entries (ControlNet blocks without residual) and non-tensor values keep the
    conditional value.
    """
    if isinstance(cond, torch.Tensor):
        return torch.cat([cond, torch.zeros_like(cond) if uncond is None else uncond])
    if isinstance(cond, dict):
        uncond = {} if uncond is None else uncond
        return {key: pair_inputs(value, uncond.get(key)) for key, value in cond.items()}
    if isinstance(cond, (list, tuple)):
        uncond = [None] * len(cond) if uncond is None else uncond
        if len(uncond) != len(cond):
            raise ValueError(f"conditional and unconditional lists differ in length: {len(cond)} vs {len(uncond)}")
        return type(cond)(pair_inputs(c, u) for c, u in zip(cond, uncond))
    return cond


def guidance_scale(cfg, t):
    """`cfg` is a number, or a pair (scale at t=1, scale at t=0) interpolated linearly in t."""
    if isinstance(cfg, (list, tuple)):
        if len(cfg) != 2:
            raise ValueError(f"cfg must be a number or a pair, got {cfg!r}")
        return cfg[0] * t + cfg[1] * (1 - t)
    return cfg


def guide(pred, pred_uncond, cfg, rho):
    """lerp(uncond, cond, cfg), then blend with its rescale to the conditional std by `rho`.

    The std is taken per sample (upstream takes it over the whole batch), so an image does not depend on its
    batch-mates.
    """
    pred_cfg = torch.lerp(pred_uncond, pred, cfg)
    if rho <= 0:
        return pred_cfg
    both = torch.stack([pred, pred_cfg])
    dims = tuple(range(2, both.dim()))
    # The two stds as norms of the centred samples, one reduction for both: torch.std's kernel is 4-5× slower on
    # CPU at latent sizes. std = norm / sqrt(n - 1), and that factor cancels in the ratio std_pos / std_cfg.
    norm_pos, norm_cfg = torch.linalg.vector_norm(both - both.mean(dims, keepdim=True), dim=dims, keepdim=True)
    eps = 1e-9 * math.sqrt(max(pred[0].numel() - 1, 0))  # upstream's 1e-9, added to the std
    # rho·(pred_cfg·std_pos/std_cfg) + (1 − rho)·pred_cfg, as one per-sample factor: one latent-sized multiply
    return pred_cfg.mul_(norm_pos.div_(norm_cfg.add_(eps)).mul_(rho).add_(1 - rho))
