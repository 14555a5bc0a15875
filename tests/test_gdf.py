"""GDF parts against upstream's stored values and their closed forms."""
import json
import math
import os

import pytest
import torch

from modules.gdf import (GDF, AdaptiveLossWeight, AdaptiveTrainSchedule, ComposedLossWeight, ConstantLossWeight,
                         CosineSchedule, CosineSchedule2, CosineTNoiseCond, DebiasedLossWeight, DiscreteNoiseCond,
                         EDMNoiseCond, EDMSampleSchedule, EDMSigmaNoiseCond, EDMTrainSchedule, EpsilonTarget,
                         InterpolatedSchedule, LERPScaler, LinearSchedule, LogSNRNoiseCond, MinSNRLossWeight,
                         MinSNRPlusOneLossWeight, P2LossWeight, RectifiedFlowsNoiseCond, RectifiedFlowsSchedule,
                         RectifiedFlowsTarget, SechLossWeight, SigmoidLossWeight, SigmoidNoiseCond, SNRLossWeight,
                         SNRPlusOneLossWeight, SqrtSchedule, StableDiffusionNoiseCond, StableDiffusionSchedule,
                         TruncatedSNRLossWeight, VPScaler, VTarget, X0Target)


def released_gdf(**kwargs):
    return GDF(CosineSchedule(clamp_range=[0.0001, 0.9999]), VPScaler(), EpsilonTarget(), CosineTNoiseCond(),
               P2LossWeight(), **kwargs)


T = torch.linspace(0, 1, 21)
LOGSNR = torch.linspace(-12, 12, 97, dtype=torch.float64)


# --- upstream's values ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1, 2])
def test_golden_values(reference_dir, shift):
    with open(os.path.join(reference_dir, "gdf_golden.json")) as f:
        golden = json.load(f)
    gdf = released_gdf()
    t = torch.tensor(golden["t"])
    logSNR = gdf.schedule(t, shift=shift)
    a, b = gdf.input_scaler(logSNR)
    ours = {"logSNR": logSNR, "a": a, "b": b,
            "noise_cond": gdf.noise_cond(logSNR), "p2_weight": gdf.loss_weight(logSNR)}
    for key, value in ours.items():
        torch.testing.assert_close(value, torch.tensor(golden[f"shift{shift}"][key]), rtol=0, atol=1e-5, msg=key)


# --- schedules -----------------------------------------------------------------------------------------------

def test_cosine_schedule_formula_and_limits():
    schedule = CosineSchedule()
    s = 0.008
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    var = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    torch.testing.assert_close(schedule(t.float()).double(), (var / (1 - var)).log(), rtol=0, atol=1e-5)
    logit = math.log(0.9999 / 0.0001)  # the variance clamp gives logSNR in [-9.21, 9.21]
    assert schedule.limits == pytest.approx([-logit, logit], abs=1e-3)


@pytest.mark.parametrize("shift", [0.5, 2, 4])
def test_shift_adds_2log_inverse_then_clamps_to_unshifted_limits(shift):
    schedule = CosineSchedule()
    expected = (schedule(T) + 2 * math.log(1 / shift)).clamp(*schedule.limits)
    shifted = schedule(T, shift=shift)
    torch.testing.assert_close(shifted, expected)
    assert ((shifted == schedule.limits[0]) | (shifted == schedule.limits[1])).sum() == 1  # one end is clamped


def test_schedule_own_shift_moves_its_limits_and_multiplies_call_shift():
    own = CosineSchedule(shift=2)
    torch.testing.assert_close(own(T), CosineSchedule()(T) - 2 * math.log(2))  # limits were measured shifted
    torch.testing.assert_close(own(T, shift=2), (CosineSchedule()(T) - 2 * math.log(4)).clamp(*own.limits))


def test_random_times_for_training_stay_within_limits():
    logSNR = CosineSchedule()(1000)
    assert logSNR.shape == (1000,)
    assert logSNR.min() >= -9.22 and logSNR.max() <= 9.22 and logSNR.std() > 1


def test_discrete_steps_round_t():
    schedule = CosineSchedule(discrete_steps=11)
    torch.testing.assert_close(schedule(torch.tensor([0.33, 0.71])), CosineSchedule()(torch.tensor([0.3, 0.7])))


T_MIN, T_MAX = math.atan(math.exp(-7.5)), math.atan(math.exp(7.5))  # CosineSchedule2's logSNR 15 and -15


@pytest.mark.parametrize("schedule, formula", [
    (CosineSchedule2(), lambda t: -2 * torch.tan(T_MIN + t * (T_MAX - T_MIN)).log()),
    (SqrtSchedule(), lambda t: (lambda v: (v / (1 - v)).log())((1 - (t + 1e-4).sqrt()).clamp(0.0001, 0.9999))),
    (RectifiedFlowsSchedule(), lambda t: ((1 - t) ** 2 / t ** 2).log().clamp(-15, 15)),
    (EDMSampleSchedule(), lambda t: -2 * (80 ** (1 / 7) + (1 - t) * (0.002 ** (1 / 7) - 80 ** (1 / 7))).pow(7).log()),
    (LinearSchedule(), lambda t: 10 - 20 * t),
])
def test_schedule_closed_forms(schedule, formula):
    t = torch.linspace(0.01, 0.99, 25, dtype=torch.float64)
    torch.testing.assert_close(schedule(t.float()).double(), formula(t), rtol=1e-5, atol=1e-4)


def test_cosine_schedule2_and_edm_ends():
    assert CosineSchedule2().limits == pytest.approx([-15, 15], abs=1e-3)
    assert EDMSampleSchedule().limits == pytest.approx([-2 * math.log(80), -2 * math.log(0.002)], abs=1e-3)


def test_stable_diffusion_schedule_hits_cumulative_alphas_at_knots():
    schedule = StableDiffusionSchedule()
    steps = torch.tensor([0, 1, 500, 999, 1000])
    betas = (0.00085 ** 0.5 * (1 - torch.arange(1001) / 1000) + 0.012 ** 0.5 * torch.arange(1001) / 1000) ** 2
    alphas_cumprod = (1 - betas.double()).cumprod(0)[steps]
    torch.testing.assert_close(schedule(steps / 1000).double(), (alphas_cumprod / (1 - alphas_cumprod)).log(),
                               rtol=0, atol=1e-4)


def test_interpolated_schedule_blends_by_t():
    low, high = LinearSchedule(), CosineSchedule()
    schedule = InterpolatedSchedule(low, high, shifts=[1.0, 2.0])
    t = torch.linspace(0, 1, 11)
    tc = t.clamp(1e-7, 1 - 1e-7)
    torch.testing.assert_close(schedule(t), low(tc) * tc + high(tc, shift=2.0) * (1 - tc))


def test_train_only_schedules_refuse_t():
    assert EDMTrainSchedule().limits is None
    assert EDMTrainSchedule()(8).shape == (8,)
    with pytest.raises(ValueError):
        EDMTrainSchedule()(torch.tensor([0.5]))


# --- scalers and targets -------------------------------------------------------------------------------------

def test_vp_scaler_preserves_variance():
    a, b = VPScaler()(LOGSNR)
    torch.testing.assert_close(a ** 2 + b ** 2, torch.ones_like(LOGSNR))
    torch.testing.assert_close(2 * (a / b).log(), LOGSNR)


def test_lerp_scaler_closed_form_and_upstream_quadratic():
    a, b = LERPScaler()(LOGSNR)
    torch.testing.assert_close(a + b, torch.ones_like(LOGSNR))
    torch.testing.assert_close(2 * (a / b).log(), LOGSNR)
    away = LOGSNR != 0  # upstream: a = 1 + (2 - sqrt(4 + 4(SNR-1))) / (2(SNR-1)), undefined at SNR = 1
    snr_minus_1 = LOGSNR[away].exp() - 1
    torch.testing.assert_close(a[away], 1 + (2 - (4 + 4 * snr_minus_1).sqrt()) / (2 * snr_minus_1))


def test_setup_limits_stretches_ends_exactly_and_is_idempotent():
    gdf = released_gdf()
    limits = gdf.setup_limits()
    assert gdf.setup_limits() == limits
    a, b = gdf.input_scaler(gdf.schedule(torch.tensor([1.0, 0.0])))
    torch.testing.assert_close(a, torch.tensor([0.0, 1.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(b, torch.tensor([1.0, 0.0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scaler", [VPScaler, LERPScaler])
@pytest.mark.parametrize("target", [EpsilonTarget, X0Target, VTarget, RectifiedFlowsTarget])
def test_undiffuse_inverts_diffuse(scaler, target):
    gdf = GDF(CosineSchedule(), scaler(), target(), CosineTNoiseCond(), P2LossWeight())
    x0, epsilon = torch.randn(2, 6, 4, 3, 8, 8).unbind(0)
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.9, 0.95])
    noised, eps, target_value, logSNR, _, _ = gdf.diffuse(x0, epsilon, t=t)
    assert eps is epsilon
    x0_back, eps_back = gdf.undiffuse(noised, logSNR, target_value)
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-4)
    torch.testing.assert_close(eps_back, epsilon, rtol=0, atol=1e-4)


def test_diffuse_mixes_with_scalers_and_returns_per_sample_terms():
    gdf = released_gdf()
    x0, epsilon = torch.randn(2, 4, 3, 8, 8).unbind(0)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    noised, _, target, logSNR, noise_cond, loss_weight = gdf.diffuse(x0, epsilon, t=t, shift=2, loss_shift=2)
    a, b = VPScaler()(CosineSchedule()(t, shift=2))
    torch.testing.assert_close(noised, a.view(-1, 1, 1, 1) * x0 + b.view(-1, 1, 1, 1) * epsilon)
    assert torch.equal(target, epsilon)
    torch.testing.assert_close(noise_cond, CosineTNoiseCond()(logSNR))
    torch.testing.assert_close(loss_weight, (-(logSNR + 2 * math.log(2))).sigmoid())  # loss_shift undoes shift


def test_diffuse_offset_noise_adds_per_channel_constant():
    gdf = released_gdf(offset_noise=0.1)
    x0, epsilon = torch.randn(2, 2, 3, 4, 4).unbind(0)
    offset = torch.randn(2, 3, 1, 1)
    _, eps, *_ = gdf.diffuse(x0, epsilon, t=torch.tensor([0.5, 0.5]), offset=offset)
    torch.testing.assert_close(eps, epsilon + 0.1 * offset)
    _, eps, *_ = gdf.diffuse(x0, epsilon, t=torch.tensor([0.5, 0.5]))
    shift = eps - epsilon
    assert (shift.flatten(2).std(2) < 1e-6).all() and shift.abs().min() > 0


def test_diffuse_generators_fix_the_noise_per_sample():
    gdf = released_gdf(offset_noise=0.1)
    x0, t = torch.zeros(3, 4, 8, 8), torch.full((3,), 0.5)
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = gdf.diffuse(x0, t=t, generator=gens(1, 2, 3))[0]
    assert torch.equal(batch, gdf.diffuse(x0, t=t, generator=gens(1, 2, 3))[0])
    for i, seed in enumerate([1, 2, 3]):
        alone = gdf.diffuse(x0[:1], t=t[:1], generator=torch.Generator().manual_seed(seed))[0]
        assert torch.equal(batch[i:i + 1], alone)
    assert not torch.allclose(batch[0], batch[1])
    with pytest.raises(ValueError):
        gdf.diffuse(x0, t=t, generator=gens(1, 2))


# --- noise conditions ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1, 2])
def test_cosine_t_noise_cond_inverts_cosine_schedule(shift):
    t = torch.linspace(0.02, 0.98, 49)
    logSNR = CosineSchedule(clamp_range=[1e-6, 1 - 1e-6])(t, shift=shift)
    torch.testing.assert_close(CosineTNoiseCond(shift=shift)(logSNR), t, rtol=0, atol=2e-5)


def test_stable_diffusion_noise_cond_inverts_its_schedule_between_knots():
    t = torch.tensor([0.0, 0.0004, 0.1237, 0.5, 0.77777, 0.9995, 1.0])
    torch.testing.assert_close(StableDiffusionNoiseCond()(StableDiffusionSchedule()(t)), t, rtol=0, atol=2e-5)


@pytest.mark.parametrize("cond, formula", [
    (EDMNoiseCond(), lambda l: -l / 8),
    (SigmoidNoiseCond(), lambda l: (-l).sigmoid()),
    (LogSNRNoiseCond(), lambda l: l),
    (EDMSigmaNoiseCond(sigma_data=0.5), lambda l: 0.5 * (-l / 2).exp()),
    (RectifiedFlowsNoiseCond(), lambda l: 1 / (1 + (-l / 2).exp())),
    (LogSNRNoiseCond(shift=2, clamp_range=[-3, 5]), lambda l: (l + 2 * math.log(2)).clamp(-3, 5)),
])
def test_noise_cond_closed_forms(cond, formula):
    torch.testing.assert_close(cond(LOGSNR), formula(LOGSNR))


def test_discrete_noise_cond_counts_steps():
    cond = DiscreteNoiseCond(SigmoidNoiseCond(), steps=1000, continuous_range=[0, 0.5])
    logSNR = torch.tensor([10.0, 2.0, 0.0])
    expected = ((-logSNR).sigmoid() / 0.5 * 1000).long()
    assert torch.equal(cond(logSNR), expected) and cond(logSNR).dtype == torch.long


# --- loss weights --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight, formula", [
    (P2LossWeight(), lambda l: (-l).sigmoid()),
    (P2LossWeight(k=2.0, gamma=0.5, s=0.7), lambda l: (2 + (0.7 * l).exp()) ** -0.5),
    (ConstantLossWeight(3), lambda l: torch.full_like(l, 3)),
    (SNRLossWeight(), lambda l: l.exp()),
    (SNRPlusOneLossWeight(), lambda l: l.exp() + 1),
    (MinSNRLossWeight(max_snr=5), lambda l: torch.minimum(l.exp(), torch.tensor(5.0, dtype=l.dtype))),
    (MinSNRPlusOneLossWeight(max_snr=5), lambda l: torch.minimum(l.exp() + 1, torch.tensor(5.0, dtype=l.dtype))),
    (TruncatedSNRLossWeight(min_snr=1), lambda l: torch.maximum(l.exp(), torch.tensor(1.0, dtype=l.dtype))),
    (SechLossWeight(div=2), lambda l: 2 / ((l / 2).exp() + (-l / 2).exp())),
    (DebiasedLossWeight(), lambda l: (-l / 2).exp()),
    (SigmoidLossWeight(s=2), lambda l: 1 / (1 + (-2 * l).exp())),
    (ComposedLossWeight(div=[SNRPlusOneLossWeight()], mul=SNRLossWeight()), lambda l: l.sigmoid()),
])
def test_loss_weight_formulas(weight, formula):
    torch.testing.assert_close(weight(LOGSNR), formula(LOGSNR))


def test_loss_weight_shift_and_clamp():
    weight = SNRLossWeight()
    torch.testing.assert_close(weight(LOGSNR, shift=2, clamp_range=[0.1, 10]), (LOGSNR.exp() * 4).clamp(0.1, 10))


def test_adaptive_loss_weight_buckets_and_ema():
    weight = AdaptiveLossWeight()
    assert weight.bucket_losses.shape == (300,)
    logSNR = torch.tensor([-20.0, -10.0, 0.0, 0.01, 9.99, 20.0])
    torch.testing.assert_close(weight(logSNR), torch.ones(6))  # all buckets start at loss 1
    edges = torch.linspace(-10, 10, 299)
    assert weight.bucket(logSNR).tolist() == [0, 0, 149, 150, 298, 299]  # inner edges -10, ..., 0, ..., 10
    assert weight.bucket(edges[100:101] + 1e-4).item() == 101

    # two samples in bucket 149, one in 0: EMA towards each bucket's mean loss
    weight.update_buckets(torch.tensor([0.0, -0.02, -15.0]), torch.tensor([3.0, 5.0, 0.5]))
    assert weight.bucket_losses[149].item() == pytest.approx(0.99 + 0.01 * 4.0)
    assert weight.bucket_losses[0].item() == pytest.approx(0.99 + 0.01 * 0.5)
    assert (weight.bucket_losses[1:149] == 1).all() and (weight.bucket_losses[150:] == 1).all()
    assert weight(torch.tensor([0.0])).item() == pytest.approx(1 / (0.99 + 0.04))
    assert weight(torch.tensor([0.0]), shift=2).item() == pytest.approx(1.0)  # logSNR 0 + 2·log 2 is elsewhere


def test_adaptive_loss_weight_state_round_trip():
    weight = AdaptiveLossWeight()
    weight.update_buckets(torch.linspace(-9, 9, 64), torch.rand(64) * 3)
    restored = AdaptiveLossWeight()
    restored.load_state_dict(weight.state_dict())
    torch.testing.assert_close(restored(LOGSNR.float()), weight(LOGSNR.float()))
    assert not torch.allclose(restored(LOGSNR.float()), AdaptiveLossWeight()(LOGSNR.float()))
    from_lists = AdaptiveLossWeight()  # upstream saved the state as lists in its training info
    from_lists.load_state_dict({k: v.tolist() for k, v in weight.state_dict().items()})
    torch.testing.assert_close(from_lists(LOGSNR.float()), weight(LOGSNR.float()))


def test_adaptive_train_schedule_follows_bucket_losses_and_restores():
    schedule = AdaptiveTrainSchedule()
    assert schedule.limits is None
    schedule.update_buckets(torch.tensor([-9.95, 3.1, 3.15, 25.0]), torch.tensor([2.0, 1.0, 3.0, 4.0]))
    assert schedule.bucket_probs[0].item() == pytest.approx(0.99 + 0.02)
    assert schedule.bucket_probs[65].item() == pytest.approx(0.99 + 0.02)  # [3.0, 3.2): mean of 1 and 3
    assert schedule.bucket_probs[99].item() == pytest.approx(0.99 + 0.04)  # beyond the range: end bucket
    assert (schedule.bucket_probs[1:65] == 1).all()

    schedule.bucket_probs = torch.zeros(100)
    schedule.bucket_probs[65] = 1.0
    logSNR = schedule(256)
    assert ((logSNR >= 3.0) & (logSNR < 3.2)).all()

    restored = AdaptiveTrainSchedule()
    restored.load_state_dict(schedule.state_dict())
    assert torch.equal(restored.bucket_probs, schedule.bucket_probs)
    assert torch.equal(restored.bucket_ranges, schedule.bucket_ranges)
    with pytest.raises(ValueError):
        restored(torch.tensor([0.5]))
