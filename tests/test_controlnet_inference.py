"""ControlNets in Stage C and the inference pipeline: a fresh ControlNet changes nothing, a trained one acts only
through its listed ResBlocks, both CFG branches get the same residuals, super resolution doubles the size, and the
CLI runs canny, inpainting (with a mask file) and super resolution end to end."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from inference.controlnet import controlnet_config_path, load_controlnet
from inference.loading import _break_zero_init, load_pipeline
from inference.pipeline import PipelineError, StageSampling
from inference.utils import calculate_latent_sizes
from modules.common import ResBlock, resize
from modules.presets import build_model
from train.train_c_controlnet import build_controlnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "inference", "tiny.yaml")
FAST_C = StageSampling(steps=2, cfg=4.0, shift=2.0)
FAST_B = StageSampling(steps=1, cfg=1.1, shift=1.0)


def stage_c_inputs(batch=2, size=6):
    from modules.presets import TINY_CLIP_IMAGE_DIM, TINY_CLIP_TEXT_DIM, TINY_CLIP_TEXT_POOLED_DIM
    return dict(x=torch.randn(batch, 16, size, size), r=torch.rand(batch),
                clip_text=torch.randn(batch, 77, TINY_CLIP_TEXT_DIM),
                clip_text_pooled=torch.randn(batch, 1, TINY_CLIP_TEXT_POOLED_DIM),
                clip_img=torch.randn(batch, 1, TINY_CLIP_IMAGE_DIM))


@pytest.fixture(scope="module")
def stage_c():
    torch.manual_seed(0)
    return _break_zero_init(build_model("stage_c", "tiny")).eval()


def controlnet_for(stage_c, blocks, c_in=3):
    config = types.SimpleNamespace(controlnet_blocks=blocks, controlnet_bottleneck_mode="simple",
                                   controlnet_checkpoint_path=None)
    return build_controlnet(config, stage_c, types.SimpleNamespace(num_channels=lambda: c_in)).eval()


class ResBlockSpy:
    """The input of every ResBlock, in execution order; `add` optionally adds a tensor to some of them."""

    def __init__(self, model, add=None):
        self.inputs, self.add = [], add or {}
        self.handles = [m.register_forward_pre_hook(self.hook) for m in model.modules() if isinstance(m, ResBlock)]

    def hook(self, module, args):
        x = args[0]
        k = len(self.inputs)
        if k in self.add:
            x = x + resize(self.add[k], x.shape[-2:])
        self.inputs.append(x)
        return (x, *args[1:]) if k in self.add else None

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def test_a_fresh_controlnet_leaves_stage_c_unchanged(stage_c):
    inputs = stage_c_inputs()
    controlnet = controlnet_for(stage_c, [0, 1, 2, 3])
    cnet = controlnet(torch.rand(2, 3, 48, 48))
    assert len(cnet) == 4 and all(r.shape == (2, 64, 48, 48) and r.count_nonzero() == 0 for r in cnet)
    assert torch.equal(stage_c(**inputs, cnet=cnet), stage_c(**inputs))


@torch.no_grad()
def test_a_trained_controlnet_acts_only_through_its_listed_blocks(stage_c):
    inputs = stage_c_inputs()
    torch.manual_seed(1)
    controlnet = _break_zero_init(controlnet_for(stage_c, [1, 2]))
    cnet = controlnet(torch.rand(2, 3, 40, 40))
    assert cnet[0] is None and cnet[1] is not None and cnet[1].abs().min() > 0 and len(cnet) == 3
    plain_spy = ResBlockSpy(stage_c)
    plain = stage_c(**inputs)
    plain_spy.close()
    cnet_spy = ResBlockSpy(stage_c)
    controlled = stage_c(**inputs, cnet=cnet)
    cnet_spy.close()
    assert len(cnet_spy.inputs) == 4 and not torch.allclose(controlled, plain)
    assert torch.equal(cnet_spy.inputs[0], plain_spy.inputs[0])  # before the first listed block: untouched
    assert not torch.allclose(cnet_spy.inputs[1], plain_spy.inputs[1])
    # the same change made by hand, as an addition (resized bilinearly) to the listed blocks' inputs only
    hand_spy = ResBlockSpy(stage_c, add={1: cnet[1], 2: cnet[2]})
    by_hand = stage_c(**inputs)
    hand_spy.close()
    for k in range(4):
        torch.testing.assert_close(cnet_spy.inputs[k], hand_spy.inputs[k], rtol=0, atol=0)
    torch.testing.assert_close(controlled, by_hand, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(TINY, device="cpu")


def run(pipe, **kw):
    kw.setdefault("height", 128)
    kw.setdefault("width", 128)
    return pipe.generate(prompt="a red square", seed=3, stage_c=FAST_C, stage_b=FAST_B, **kw)


def test_both_cfg_branches_get_the_same_residuals_scaled_by_strength(pipe):
    canny = load_controlnet(pipe, "canny")
    assert canny.model.projections[0][-1].out_channels == 64 and canny.model.backbone[0].in_channels == 1
    image = torch.rand(1, 3, 100, 90)
    calls = []
    handle = pipe.stage_c.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["cnet"]), with_kwargs=True)
    try:
        out = run(pipe, controlnet=canny, control_image=image, num_images=2)
    finally:
        handle.remove()
    assert len(calls) == FAST_C.steps
    cnet = calls[0]
    assert [r is None for r in cnet] == [False, True, True, False]
    for r in (cnet[0], cnet[3]):
        assert r.shape[0] == 4 and torch.equal(r[:2], r[2:])  # cond (2 images), then uncond: the same
        assert torch.equal(r[0], r[1])  # one control image for both images
    assert out.control.shape == (2, 3, 96, 96)  # the filter's view: 32× the 3×3 latents
    assert out.settings["controlnet"] == "canny" and out.settings["control_strength"] == 1.0
    plain = run(pipe)
    assert (out.images[0] - plain.images[0]).abs().max() > 1e-4  # the ControlNet acts
    off = run(pipe, controlnet=canny, control_image=image, control_strength=0.0)
    assert torch.equal(off.latents_c, plain.latents_c)  # strength 0: no residual at all


def test_super_resolution_doubles_the_control_images_size(pipe):
    sr = load_controlnet(pipe, "sr")
    assert sr.output_scale == 2 and sr.filter.effnet is pipe.effnet  # the pipeline's encoder, not a second one
    image = torch.rand(1, 3, 128, 96)
    out = run(pipe, controlnet=sr, control_image=image, height=256, width=192)
    assert out.images.shape == (1, 3, 256, 192)
    assert out.latents_c.shape == calculate_latent_sizes(256, 192, 1)[0]
    with pytest.raises(PipelineError, match=r"2× the control image \(128×96\): pass height=256, width=192"):
        run(pipe, controlnet=sr, control_image=image)


def test_inpainting_takes_a_mask_and_outpaints(pipe):
    inpaint = load_controlnet(pipe, "inpainting")
    image = torch.rand(1, 3, 128, 128) * 0.5
    mask = torch.zeros(128, 128, dtype=torch.bool)
    mask[32:96, 64:] = True
    out = run(pipe, controlnet=inpaint, control_image=image, control_mask=mask)
    picture = out.control[0]  # the masked image at 96×96: white (1) where the mask is
    assert torch.equal(picture[:, 24:72, 48:] == 1, torch.ones(3, 48, 48, dtype=torch.bool))
    assert picture[:, :24].max() <= 0.5 and picture[:, :, :48].max() <= 0.5
    outpainted = run(pipe, controlnet=inpaint, control_image=image, control_mask=mask, outpaint=True).control[0]
    assert (outpainted[:, :24] == 1).all() and outpainted[:, 24:72, 48:].max() <= 0.5
    with pytest.raises(PipelineError, match="saliency weights"):
        run(pipe, controlnet=inpaint, control_image=image)  # no mask, and no saliency weights on this machine
    with pytest.raises(PipelineError, match="not canny"):
        run(pipe, controlnet=load_controlnet(pipe, "canny"), control_image=image, control_mask=mask)


def test_controlnet_configs_name_the_fix_when_something_is_missing(pipe, tmp_path):
    with pytest.raises(PipelineError, match="no ControlNet config for the 1B Stage C"):
        controlnet_config_path("canny", "1B")
    assert controlnet_config_path("canny", "3.6B").endswith("configs/inference/controlnet_c_3b_canny.yaml")
    with pytest.raises(PipelineError, match="unknown ControlNet 'depth'"):
        controlnet_config_path("depth", "tiny")
    big = types.SimpleNamespace(stage_c=types.SimpleNamespace(build_spec={"preset": "3.6B"}))
    with pytest.raises(PipelineError, match="download_models.sh controlnet canny"):
        load_controlnet(big, "canny")  # the released weights are not on this machine
    with pytest.raises(PipelineError, match="identity ControlNet was never released"):
        load_controlnet(big, "identity")
    with pytest.raises(PipelineError, match="for the tiny Stage C, but the pipeline's is 3.6B"):
        load_controlnet(big, os.path.join(ROOT, "configs", "inference", "controlnet_tiny_canny.yaml"))
    with pytest.raises(PipelineError, match="for the 3.6B Stage C, but the pipeline's is tiny"):
        load_controlnet(pipe, os.path.join(ROOT, "configs", "inference", "controlnet_c_3b_canny.yaml"))


# -------------------------------------------------------------------------------------------------------- CLI
def cli(tmp_path, *args):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "inference.generate", "--config", TINY, "--prompt", "a house", "--seed", "5",
         "--steps-c", "1", "--steps-b", "1", "--out", str(out), "--quiet", *args],
        cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    return proc, out


def _png(path, size, mode="RGB"):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), mode).save(path)
    return str(path)


def test_cli_canny_and_inpainting_with_a_mask_file(tmp_path):
    control = _png(tmp_path / "in.png", (160, 128))
    proc, out = cli(tmp_path, "--controlnet", "canny", "--control-image", control, "--height", "128",
                    "--width", "160", "--control-strength", "0.5")
    assert proc.returncode == 0, proc.stderr
    (image,) = [p for p in out.glob("*.png") if not p.name.endswith("_control.png")]
    with Image.open(image) as im:
        assert im.size == (160, 128)
        meta = json.loads(im.text["parameters"])
    assert meta["controlnet"] == "canny" and meta["control_strength"] == 0.5
    with Image.open(str(image)[:-4] + "_control.png") as edges:
        pixels = np.asarray(edges)
        assert edges.size == (128, 96) and pixels.max() > 128 and (pixels == 0).mean() > 0.2  # edges, grey

    mask = np.zeros((128, 160), np.uint8)
    mask[:, 80:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    proc, out = cli(tmp_path / "inpaint", "--controlnet", "inpainting", "--control-image", control,
                    "--mask", str(tmp_path / "mask.png"), "--height", "128", "--width", "160")
    assert proc.returncode == 0, proc.stderr
    (picture,) = out.glob("*_control.png")
    with Image.open(picture) as im:
        masked = np.asarray(im)
    assert masked.shape == (96, 128, 3) and (masked[:, 64:] == 255).all() and not (masked[:, :64] == 255).all()


def test_cli_super_resolution_doubles_the_input(tmp_path):
    control = _png(tmp_path / "small.png", (96, 128))
    proc, out = cli(tmp_path, "--controlnet", "sr", "--control-image", control)
    assert proc.returncode == 0, proc.stderr
    (image,) = [p for p in out.glob("*.png") if not p.name.endswith("_control.png")]
    with Image.open(image) as im:
        assert im.size == (192, 256)
    bad, _ = cli(tmp_path, "--controlnet", "canny")
    assert bad.returncode == 2 and "--control-image" in bad.stderr and "Traceback" not in bad.stderr


def test_a_controlnet_trained_against_another_objective_is_refused(pipe, tmp_path):
    """A ControlNet file written here records the objective of the Stage C it was trained on; the tiny pipeline's
    Stage C predicts epsilon."""
    import yaml
    from core.weights import save_model
    config = yaml.safe_load(open(os.path.join(ROOT, "configs", "inference", "controlnet_tiny_canny.yaml")))
    model = load_controlnet(pipe, "canny").model
    for target in ("v", "epsilon"):
        save_model(model, tmp_path / f"{target}.safetensors", metadata={"gdf_target": target})
        with open(tmp_path / f"{target}.yaml", "w") as f:
            yaml.safe_dump({**config, "controlnet_checkpoint_path": str(tmp_path / f"{target}.safetensors")}, f)
    with pytest.raises(PipelineError, match="v.safetensors was trained against a Stage C that predicts v, but this "
                                            "Stage C predicts epsilon: retrain it on this Stage C with gdf_target: "
                                            "epsilon"):
        load_controlnet(pipe, str(tmp_path / "v.yaml"))
    loaded = load_controlnet(pipe, str(tmp_path / "epsilon.yaml"))
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name


def test_a_controlnet_config_sets_its_own_sampling_over_the_pipelines(pipe, tmp_path):
    """The demo's Canny ControlNet samples Stage C at CFG 2: a ControlNet config's `sampling` overrides the
    pipeline config's for the stages it names (the CLI's flags still override both, as for a pipeline config)."""
    import yaml
    from inference.config import ConfigError, default_sampling
    config = yaml.safe_load(open(os.path.join(ROOT, "configs", "inference", "controlnet_tiny_canny.yaml")))
    with open(tmp_path / "cn.yaml", "w") as f:
        yaml.safe_dump({**config, "sampling": {"stage_c": {"cfg": 2.5, "shift": 3.0}}}, f)
    controlnet = load_controlnet(pipe, str(tmp_path / "cn.yaml"))
    plain_c, plain_b = default_sampling(TINY)
    stage_c, stage_b = default_sampling(TINY, controlnet)
    assert (stage_c.cfg, stage_c.shift, stage_c.steps) == (2.5, 3.0, plain_c.steps) and stage_b == plain_b
    assert default_sampling(TINY, load_controlnet(pipe, "canny")) == (plain_c, plain_b)  # none given: unchanged
    demo_c, _ = default_sampling(os.path.join(ROOT, "configs", "inference", "demo.yaml"),
                                 types.SimpleNamespace(sampling=yaml.safe_load(open(os.path.join(
                                     ROOT, "configs", "inference", "controlnet_demo_canny.yaml")))["sampling"]))
    assert (demo_c.cfg, demo_c.steps, demo_c.shift) == (2.0, 20, 2.0)
    with open(tmp_path / "bad.yaml", "w") as f:
        yaml.safe_dump({**config, "sampling": {"stage_c": {"guidance": 2.5}}}, f)
    with pytest.raises(ConfigError, match=r"sampling.stage_c: unknown key\(s\) \['guidance'\]"):
        load_controlnet(pipe, str(tmp_path / "bad.yaml"))
