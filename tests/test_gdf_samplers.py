"""Samplers against closed forms and diffusers' DDPMWuerstchenScheduler (same clamped cosine schedule)."""
import pytest
import torch
from diffusers import DDPMWuerstchenScheduler

from modules.gdf import (GDF, CosineSchedule, CosineTNoiseCond, DDIMSampler, DDPMSampler, EpsilonTarget, LCMSampler,
                         LogSNRNoiseCond, P2LossWeight, VPScaler, VTarget)


def released_gdf():
    return GDF(CosineSchedule(clamp_range=[0.0001, 0.9999]), VPScaler(), EpsilonTarget(), CosineTNoiseCond(),
               P2LossWeight())


def seeded(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("target", [EpsilonTarget, VTarget])
def test_ddim_with_the_true_noise_recovers_x0(target):
    # the model is told logSNR itself and answers with the exact target for a fixed x0
    gdf = GDF(CosineSchedule(), VPScaler(), target(), LogSNRNoiseCond(), P2LossWeight())
    x0, x_init = torch.randn(2, 2, 4, 8, 8).unbind(0)

    def model(x, logSNR):
        a, b = gdf.input_scalers(logSNR, x.dim())
        return gdf.target(x0, (x - a * x0) / b, logSNR, a, b)

    steps = list(gdf.sample(model, {}, x0.shape, x_init=x_init, sampler=DDIMSampler(gdf), timesteps=10, cfg=None))
    assert len(steps) == 10
    last_x0, last_x, _ = steps[-1]
    torch.testing.assert_close(last_x0, x0, rtol=0, atol=1e-4)
    # eta = 0 keeps the noise of x_init all the way: x(t=0) = a(0)·x0 + b(0)·eps, eps = (x_init - a(1)·x0) / b(1)
    a1, b1 = gdf.input_scaler(gdf.schedule(torch.ones(1)))
    a0, b0 = gdf.input_scaler(gdf.schedule(torch.zeros(1)))
    torch.testing.assert_close(last_x, a0 * x0 + b0 * (x_init - a1 * x0) / b1, rtol=0, atol=1e-4)


@pytest.mark.parametrize("t, t_prev", [(1.0, 0.95), (0.6, 0.5), (0.1, 0.0)])
def test_one_ddpm_step_has_the_posterior_mean_and_variance(t, t_prev):
    """Ho et al. 2020, Eq. 7: mean = sqrt(ab_prev)·beta/(1-ab)·x0 + sqrt(alpha)·(1-ab_prev)/(1-ab)·x_t,
    variance = (1-ab_prev)/(1-ab)·beta, with ab = a², alpha = ab/ab_prev, beta = 1 - alpha."""
    gdf, n = released_gdf(), 200_000
    x0, epsilon = torch.randn(2, 1, n, dtype=torch.float64).unbind(0)
    logSNR, logSNR_prev = gdf.schedule(torch.tensor([t])).double(), gdf.schedule(torch.tensor([t_prev])).double()
    ab, ab_prev = logSNR.sigmoid(), logSNR_prev.sigmoid()
    x = ab.sqrt() * x0 + (1 - ab).sqrt() * epsilon
    out = DDPMSampler(gdf)(x, x0, epsilon, logSNR, logSNR_prev)

    alpha = ab / ab_prev
    mean = ab_prev.sqrt() * (1 - alpha) / (1 - ab) * x0 + alpha.sqrt() * (1 - ab_prev) / (1 - ab) * x
    z = (out - mean) / ((1 - ab_prev) / (1 - ab) * (1 - alpha)).sqrt()  # should be the step's N(0, 1) draw
    bound = 5 / n ** 0.5
    assert abs(z.mean()) < bound and abs(z.var() - 1) < 2 ** 0.5 * bound
    for signal in (x0, epsilon):
        assert abs(torch.corrcoef(torch.cat([z, signal]))[0, 1]) < bound


def test_ddpm_trajectory_matches_diffusers_wuerstchen_scheduler():
    gdf, steps = released_gdf(), 10
    x_init = torch.randn(2, 4, 8, 8)
    weight = torch.randn(4, 4, 3, 3) * 0.3

    def model(x, r):
        return torch.tanh(torch.nn.functional.conv2d(x, weight, padding=1) + r.view(-1, 1, 1, 1))

    ours = [x for _, x, _ in gdf.sample(model, {}, x_init.shape, x_init=x_init, timesteps=steps, cfg=None,
                                         generator=seeded(7, 8))]
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(steps)
    generator, x = seeded(7, 8), x_init
    for i, t in enumerate(scheduler.timesteps[:-2]):  # diffusers adds no noise on its last step; GDF does
        r = gdf.noise_cond(gdf.schedule(t[None])).expand(2)  # the model sees the same input in both loops
        x = scheduler.step(model(x, r), t.expand(2), x, generator=generator).prev_sample
        torch.testing.assert_close(ours[i], x, rtol=1e-5, atol=1e-5, msg=f"step {i}")


def test_ddim_eta_one_is_ddpm_and_sampler_params_reach_the_sampler():
    gdf = released_gdf()
    x0, epsilon, x = torch.randn(3, 2, 4, 8, 8).unbind(0)
    logSNR, logSNR_prev = gdf.schedule(torch.full((2,), 0.7)), gdf.schedule(torch.full((2,), 0.6))
    torch.testing.assert_close(DDIMSampler(gdf)(x, x0, epsilon, logSNR, logSNR_prev, eta=1, generator=seeded(3, 4)),
                               DDPMSampler(gdf)(x, x0, epsilon, logSNR, logSNR_prev, generator=seeded(3, 4)))

    def model(x, r):
        return torch.tanh(x)

    def final(seed, **kwargs):
        *_, (x0, _, _) = gdf.sample(model, {}, (2, 4, 8, 8), x_init=x, timesteps=5, cfg=None,
                                    generator=torch.Generator().manual_seed(seed), **kwargs)
        return x0

    assert not torch.equal(final(1), final(2))  # DDPM draws noise every step
    assert torch.equal(final(1, sampler_params={"eta": 0}), final(2, sampler_params={"eta": 0}))


def test_lcm_step_renoises_x0():
    gdf = released_gdf()
    x0, epsilon, x = torch.randn(3, 2, 4, 8, 8).unbind(0)
    logSNR, logSNR_prev = gdf.schedule(torch.tensor([0.7, 0.7])), gdf.schedule(torch.tensor([0.4, 0.3]))
    out = LCMSampler(gdf)(x, x0, epsilon, logSNR, logSNR_prev, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    a_prev, b_prev = (v.view(-1, 1, 1, 1) for v in VPScaler()(logSNR_prev))
    torch.testing.assert_close(out, a_prev * x0 + b_prev * noise)


def test_sampling_keeps_the_dtype_and_device_it_starts_in():
    gdf = released_gdf()

    def model(x, r):
        return x * 0.5

    *_, (x0, x, _) = gdf.sample(model, {}, (1, 4, 8, 8), timesteps=3, cfg=None, device="cpu")
    assert x.dtype == torch.float32 and x.device.type == "cpu"
    x_init = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    *_, (x0, x, _) = gdf.sample(model, {}, x_init.shape, x_init=x_init, timesteps=3, cfg=None)
    assert x.dtype == torch.bfloat16
