"""GDF.sample: classifier-free guidance, `.send()` overrides and seeding, with a tiny deterministic model."""
import pytest
import torch
import torch.nn.functional as F

from modules.gdf import (GDF, CosineSchedule, CosineTNoiseCond, DDIMSampler, DDPMSampler, EpsilonTarget, LCMSampler,
                         P2LossWeight, VPScaler)
from modules.gdf.cfg import guidance_scale, guide, pair_inputs

B, SHAPE = 3, (3, 4, 8, 8)


def released_gdf():
    return GDF(CosineSchedule(clamp_range=[0.0001, 0.9999]), VPScaler(), EpsilonTarget(), CosineTNoiseCond(),
               P2LossWeight())


def seeded(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


class ToyModel:
    """Per-sample deterministic epsilon model taking Stage-C-like inputs; records the batch of every call and
    checks that every input is batched like x."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.randn(4, 4, 3, 3, generator=generator) * 0.2
        self.batches = []

    def __call__(self, x, r, clip, pooled, cnet=None, extra=None, flag="on"):
        n = x.size(0)
        self.batches.append(n)
        assert r.shape == (n,) and clip.size(0) == n and pooled.size(0) == n and flag == "on"
        h = F.conv2d(x, self.weight, padding=1) + r.view(-1, 1, 1, 1)
        h = h + clip.mean(dim=(1, 2)).view(-1, 1, 1, 1) - 2 * pooled.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if cnet is not None:
            assert cnet[1] is None and cnet[0].size(0) == n
            h = h + cnet[0]
        if extra is not None:
            h = h + extra["bias"].view(n, 4, 1, 1)
        return torch.tanh(h)


def conditions(n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    cond = {"clip": torch.randn(n, 5, 8, generator=g), "pooled": torch.randn(n, 1, 8, generator=g),
            "cnet": [torch.randn(n, 4, 8, 8, generator=g) * 0.1, None],
            "extra": {"bias": torch.randn(n, 4, generator=g)}, "flag": "on"}
    uncond = {"clip": torch.randn(n, 5, 8, generator=g), "pooled": torch.randn(n, 1, 8, generator=g),
              "cnet": cond["cnet"]}  # ControlNet residuals go to both branches; `extra` defaults to zeros
    return cond, uncond


def select(inputs, i):
    """Sample i of a (nested) batch of inputs."""
    if isinstance(inputs, torch.Tensor):
        return inputs[i:i + 1]
    if isinstance(inputs, dict):
        return {k: select(v, i) for k, v in inputs.items()}
    if isinstance(inputs, list):
        return [select(v, i) for v in inputs]
    return inputs


def final(model, cond, uncond, shape, **kwargs):
    *_, (x0, x, _) = released_gdf().sample(model, cond, shape, unconditional_inputs=uncond, **kwargs)
    return x0, x


def assert_close_relative(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


# --- building blocks -----------------------------------------------------------------------------------------

def test_pair_inputs_matches_by_key_and_keeps_structure():
    c, u = torch.ones(2, 3), torch.full((2, 3), 2.0)
    paired = pair_inputs({"a": c, "l": [c, None], "d": {"x": c, "y": c}, "s": "keep"},
                         {"d": {"y": u}, "l": [u, None], "a": u})
    assert torch.equal(paired["a"], torch.cat([c, u]))
    assert torch.equal(paired["l"][0], torch.cat([c, u])) and paired["l"][1] is None
    assert torch.equal(paired["d"]["x"], torch.cat([c, torch.zeros_like(c)]))  # missing: zeros
    assert torch.equal(paired["d"]["y"], torch.cat([c, u]))
    assert paired["s"] == "keep"
    with pytest.raises(ValueError):
        pair_inputs([c, c], [u])


def test_guide_rescales_each_sample_like_upstream_does_a_batch_of_one():
    pred, pred_uncond = torch.randn(2, 3, 4, 8, 8).unbind(0)
    pred[1] *= 5  # batch-mates with very different scales
    out = guide(pred, pred_uncond, 4.0, 0.7)
    for i in range(3):  # upstream's formula, whole-tensor std, on each sample alone
        p, pu = pred[i], pred_uncond[i]
        pred_cfg = torch.lerp(pu, p, 4.0)
        torch.testing.assert_close(out[i], 0.7 * (pred_cfg * p.std() / (pred_cfg.std() + 1e-9)) + 0.3 * pred_cfg)
    torch.testing.assert_close(guide(pred, pred_uncond, 4.0, 0), pred_uncond + 4 * (pred - pred_uncond))


def test_guidance_scale_is_a_number_or_a_pair_over_t():
    assert guidance_scale(4.0, 0.3) == 4.0
    assert guidance_scale((4.0, 1.0), 1.0) == 4.0 and guidance_scale((4.0, 1.0), 0.0) == 1.0
    assert guidance_scale([4.0, 1.0], 0.25) == pytest.approx(1.75)
    with pytest.raises(ValueError):
        guidance_scale((1.0, 2.0, 3.0), 0.5)


# --- CFG in the sampling loop --------------------------------------------------------------------------------

def test_batch_member_equals_the_sample_drawn_alone_with_its_generator():
    cond, uncond = conditions()
    model = ToyModel()
    x0, x = final(model, cond, uncond, SHAPE, timesteps=6, cfg=4.0, generator=seeded(10, 11, 12))
    assert model.batches == [2 * B] * 6
    for i, seed in enumerate([10, 11, 12]):
        x0_i, x_i = final(model, select(cond, i), select(uncond, i), (1, *SHAPE[1:]), timesteps=6, cfg=4.0,
                          generator=torch.Generator().manual_seed(seed))
        assert_close_relative(x0[i:i + 1], x0_i)
        assert_close_relative(x[i:i + 1], x_i)


def test_batch_member_equals_the_sample_drawn_alone_from_the_same_x_init_with_ddim():
    cond, uncond = conditions()
    model, x_init = ToyModel(), torch.randn(SHAPE)
    gdf = released_gdf()
    *_, (x0, _, _) = gdf.sample(model, cond, SHAPE, uncond, sampler=DDIMSampler(gdf), x_init=x_init, timesteps=6,
                                cfg=(5.0, 2.0))
    for i in range(B):
        *_, (x0_i, _, _) = gdf.sample(model, select(cond, i), None, select(uncond, i), sampler=DDIMSampler(gdf),
                                      x_init=x_init[i:i + 1], timesteps=6, cfg=(5.0, 2.0))
        assert_close_relative(x0[i:i + 1], x0_i)


def test_unconditional_key_order_does_not_matter():
    cond, uncond = conditions()
    reordered = dict(reversed(list(uncond.items())))
    assert list(reordered) != list(uncond)
    same = final(ToyModel(), cond, uncond, SHAPE, timesteps=4, generator=seeded(1, 2, 3))[0]
    assert torch.equal(same, final(ToyModel(), cond, reordered, SHAPE, timesteps=4, generator=seeded(1, 2, 3))[0])
    other = dict(uncond, clip=uncond["clip"] + 1)  # the unconditional inputs do reach the model
    assert not torch.allclose(same, final(ToyModel(), cond, other, SHAPE, timesteps=4, generator=seeded(1, 2, 3))[0])


def test_default_unconditional_inputs_are_zeros():
    cond, _ = conditions()
    zeros = {"clip": torch.zeros_like(cond["clip"]), "pooled": torch.zeros_like(cond["pooled"]),
             "cnet": [torch.zeros_like(cond["cnet"][0]), None]}
    assert torch.equal(final(ToyModel(), cond, None, SHAPE, timesteps=3, generator=seeded(1, 2, 3))[0],
                       final(ToyModel(), cond, zeros, SHAPE, timesteps=3, generator=seeded(1, 2, 3))[0])


def test_without_cfg_the_model_runs_once_per_step_on_the_plain_batch():
    cond, uncond = conditions()
    model = ToyModel()
    final(model, cond, uncond, SHAPE, timesteps=5, cfg=None)
    assert model.batches == [B] * 5


@pytest.mark.parametrize("window", [{"cfg_t_stop": 0.5}, {"cfg_t_start": 0.5}, {"cfg_t_stop": 0.3, "cfg_t_start": 0.7}])
def test_cfg_window_switches_to_undoubled_inputs(window):
    cond, uncond = conditions()
    model = ToyModel()
    final(model, cond, uncond, SHAPE, timesteps=10, **window)
    ts = torch.linspace(1, 0, 11)[:-1].tolist()
    on = [window.get("cfg_t_stop", 0) <= t <= window.get("cfg_t_start", 1) for t in ts]
    assert model.batches == [2 * B if o else B for o in on]
    assert 0 < sum(on) < 10


def test_send_overrides_apply_to_the_next_steps():
    cond, uncond = conditions()
    model, gdf = ToyModel(), released_gdf()
    run = gdf.sample(model, cond, SHAPE, uncond, timesteps=6, cfg=3.0, generator=seeded(1, 2, 3))
    next(run)
    run.send({"cfg": None})  # CFG off
    new_cond, _ = conditions(seed=5)
    run.send({"model_inputs": new_cond, "cfg": 2.0})  # new undoubled inputs, CFG back on
    x_new = torch.randn(SHAPE)
    _, _, pred = run.send({"x": x_new, "cfg": None})
    r = gdf.noise_cond(gdf.schedule(torch.linspace(1, 0, 7))).unsqueeze(1).expand(-1, B)
    assert torch.equal(pred, ToyModel()(x_new, r[3], **new_cond))  # step 3 started from the sent x, new inputs
    calls = []

    class Counting(DDIMSampler):
        def step(self, *args, **kwargs):
            calls.append(1)
            return super().step(*args, **kwargs)

    _, _, pred = run.send({"sampler": Counting(gdf), "x_init": x_new})  # upstream's name for x
    assert torch.equal(pred, ToyModel()(x_new, r[4], **new_cond))
    assert len(calls) == 1
    next(run)
    assert len(calls) == 2
    with pytest.raises(StopIteration):
        next(run)
    assert model.batches == [2 * B, B, 2 * B, B, B, B]


def test_send_cfg_rho_changes_the_result():
    cond, uncond = conditions()

    def run(rho_after_first):
        steps = released_gdf().sample(ToyModel(), cond, SHAPE, uncond, timesteps=4, generator=seeded(1, 2, 3))
        next(steps)
        steps.send({"cfg_rho": rho_after_first})
        *_, (x0, _, _) = steps
        return x0

    assert torch.equal(run(0.7), final(ToyModel(), cond, uncond, SHAPE, timesteps=4, generator=seeded(1, 2, 3))[0])
    assert not torch.allclose(run(0.0), run(0.7))


# --- seeding -------------------------------------------------------------------------------------------------

def test_same_seed_same_image_different_seed_different_image():
    cond, uncond = conditions(n=1)
    shape = (1, *SHAPE[1:])

    def image(seed):
        return final(ToyModel(), cond, uncond, shape, timesteps=5, generator=torch.Generator().manual_seed(seed))[0]

    assert torch.equal(image(42), image(42))
    assert not torch.allclose(image(42), image(43))
    torch.manual_seed(7)  # without a generator, the global RNG decides
    first = final(ToyModel(), cond, uncond, shape, timesteps=5)[0]
    torch.manual_seed(7)
    assert torch.equal(first, final(ToyModel(), cond, uncond, shape, timesteps=5)[0])


class _OldStyleDDPM(DDPMSampler):
    """A sampler written against the older step signature (no `scalers`): recomputes a and b itself."""

    def step(self, x, x0, epsilon, logSNR, logSNR_prev, eta=1, generator=None):
        assert self.gdf is not None
        return super().step(x, x0, epsilon, logSNR, logSNR_prev, eta=eta, generator=generator)


@pytest.mark.parametrize("sampler", [DDPMSampler, DDIMSampler, LCMSampler])
def test_precomputed_scalers_give_the_same_samples_as_recomputing_them(sampler):
    """GDF.sample hands each step the schedule's precomputed (a, b) as numbers: the same samples, to float32
    round-off, as a sampler computing them as tensors."""
    cond, uncond = conditions()
    gdf = released_gdf()
    fast = list(gdf.sample(ToyModel(), cond, SHAPE, unconditional_inputs=uncond, timesteps=5, cfg=3.0,
                           sampler=sampler(gdf), generator=seeded(1, 2, 3)))

    class Recomputing(sampler):
        def step(self, x, x0, epsilon, logSNR, logSNR_prev, generator=None, scalers=None):
            return super().step(x, x0, epsilon, logSNR, logSNR_prev, generator=generator)

    slow = list(gdf.sample(ToyModel(), cond, SHAPE, unconditional_inputs=uncond, timesteps=5, cfg=3.0,
                           sampler=Recomputing(gdf), generator=seeded(1, 2, 3)))
    for (x0_f, x_f, _), (x0_s, x_s, _) in zip(fast, slow):
        torch.testing.assert_close(x0_f, x0_s, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_f, x_s, rtol=1e-5, atol=1e-5)


def test_a_sampler_without_the_scalers_argument_still_works():
    cond, uncond = conditions()
    gdf = released_gdf()
    old = final(ToyModel(), cond, uncond, SHAPE, timesteps=4, cfg=2.0, sampler=_OldStyleDDPM(gdf),
                generator=seeded(4, 5, 6))
    new = final(ToyModel(), cond, uncond, SHAPE, timesteps=4, cfg=2.0, sampler=DDPMSampler(gdf),
                generator=seeded(4, 5, 6))
    for a, b in zip(old, new):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
