"""ControlNet training on the tiny configs: the ControlNet learns, Stage C stays frozen and in eval mode, the backbone's
BatchNorm statistics do not move, and checkpoints hold the ControlNet alone."""
import json
import os
import types

import numpy as np
import PIL.Image
import pytest
import torch

from core.conditioning import effnet_preprocess
from core.config import ConfigError
from core.data import ShardWriter
from core.weights import load_model, load_state_dict_file, save_model
from modules.controlnet_filters import FILTERS
from modules.presets import build_model
from train.train_c_controlnet import ControlNetCore, build_controlnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "training", "controlnet_tiny.yaml")


def split_images(n, size=64):
    """Two-colour images split at a random column (a Canny edge there), captions naming the split."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        colours, cut = rng.integers(0, 256, size=(2, 3)), int(rng.integers(8, size - 8))
        image = np.empty((size, size, 3), dtype=np.uint8)
        image[:, :cut], image[:, cut:] = colours[0], colours[1]
        out.append((image, f"a split at {cut}"))
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("controlnet_assets")
    images = split_images(8)
    with ShardWriter(str(d / "%06d.tar"), maxcount=8) as writer:
        for i, (image, caption) in enumerate(images):
            writer.write({"__key__": f"{i:05d}", "txt": caption, "jpg": PIL.Image.fromarray(image)})
    torch.manual_seed(0)
    # EfficientNet encoder with BatchNorm statistics of these images: O(1) latents, and a backbone to start from
    effnet = build_model("effnet", "tiny").eval()
    for bn in (m for m in effnet.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        effnet(effnet_preprocess(torch.stack([torch.from_numpy(i).permute(2, 0, 1) / 255 for i, _ in images])))
    save_model(effnet.eval(), d / "effnet.safetensors")
    # a Stage C whose zero-initialised layers are not zero, so residuals reach its output
    stage_c = build_model("stage_c", "tiny")
    with torch.no_grad():
        for p in stage_c.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    save_model(stage_c, d / "stage_c.safetensors")
    return types.SimpleNamespace(dir=d, data=str(d / "000000.tar"), effnet=str(d / "effnet.safetensors"),
                                 stage_c=str(d / "stage_c.safetensors"))


def overrides(assets, tmp_path, **changes):
    base = {"webdataset_path": assets.data, "effnet_checkpoint_path": assets.effnet,
            "generator_checkpoint_path": assets.stage_c, "checkpoint_path": str(tmp_path / "ck"),
            "output_path": str(tmp_path / "out"), "num_workers": 0, "sample_every": 0, "batch_size": 2}
    return [f"{k}={v}" for k, v in {**base, **changes}.items()]


def test_controlnet_training_touches_nothing_but_the_controlnet(assets, tmp_path):
    core = ControlNetCore(config_file_path=TINY, overrides=overrides(
        assets, tmp_path, updates=1, save_every=1, warmup_updates=0, sample_every=1))
    seen = {}
    setup_models = core.setup_models

    def spy(extras):  # keep the models the run trains, and their state before training
        models = setup_models(extras)
        seen.update(models=models, controlnet={k: v.clone() for k, v in models.controlnet.state_dict().items()},
                    stats={k: v.clone() for k, v in models.controlnet.backbone.state_dict().items()
                           if "running" in k or "num_batches" in k}, modes=[])
        models.controlnet.backbone.register_forward_pre_hook(
            lambda module, args: seen["modes"].append((models.controlnet.training, module.training)))
        return models

    core.setup_models = spy
    core()
    models = seen["models"]
    generator = models.generator
    assert not generator.training and not any(p.requires_grad for p in generator.parameters())
    for name, value in load_state_dict_file(assets.stage_c).items():
        assert torch.equal(generator.state_dict()[name], value), name  # bit for bit
    backbone = models.controlnet.backbone
    # every training forward: the ControlNet in train mode, its backbone in eval mode (samples: both in eval)
    assert (True, False) in seen["modes"] and all(not backbone_mode for _, backbone_mode in seen["modes"])
    assert len(seen["stats"]) > 100
    for name, value in seen["stats"].items():
        assert torch.equal(backbone.state_dict()[name], value), name  # eval mode: statistics untouched
    trained = models.controlnet.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in seen["controlnet"].items() if "projections" in k)
    assert any(not torch.equal(trained[k], v) for k, v in seen["controlnet"].items() if "backbone" in k)

    step = tmp_path / "ck" / "controlnet_tiny" / "step_00000001"
    assert sorted(p.name for p in step.glob("*.safetensors")) == ["controlnet.safetensors"]
    saved = load_state_dict_file(step / "controlnet.safetensors")
    assert set(saved) == set(trained)
    state = torch.load(step / "training_state.pt", weights_only=True)
    assert list(state["optimizers"]) == ["controlnet"]
    reloaded = load_model(step / "controlnet.safetensors")  # rebuilt from the file's own record
    assert reloaded.projections[0][-1].out_channels == 64 and reloaded.proj_blocks == [0, 3]
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, trained[name]), name
    grid = PIL.Image.open(tmp_path / "out" / "controlnet_tiny" / "000001.jpg")
    # rows: images, their Canny edges, noised, one-step predictions, samples; 2 images of 16 px
    assert grid.size == (2 * 16, 5 * 16)


def test_controlnet_alone_drives_the_loss_down_on_a_fixed_batch(assets, tmp_path):
    """Overfit one batch (fixed noise and noise levels) through the trainer's own forward pass and optimizer; a
    super-resolution ControlNet with the small 'simple' bottleneck, its filter sharing the trainer's encoder. The
    batch is fixed, so its latents and control input are computed once (the encoder dominates the CPU time)."""
    core = ControlNetCore(config_file_path=TINY, overrides=overrides(
        assets, tmp_path, lr=5e-3, controlnet_filter="SREffnetFilter", controlnet_filter_params="{}",
        controlnet_bottleneck_mode="simple"))
    torch.manual_seed(core.config.seed)
    extras = core.setup_extras_pre()
    models = core.setup_models(extras)
    optimizer = core.setup_optimizers(extras, models).controlnet
    batch = next(iter(core.setup_data(extras).dataloader))
    models.controlnet.train()
    losses = []
    assert extras.controlnet_filter.effnet is models.effnet
    latents, control = core.encode_latents(batch, models, extras), extras.controlnet_filter(batch["images"])
    core.encode_latents = lambda *args: latents
    extras.controlnet_filter = lambda images: control
    for _ in range(20):
        core.info.iter = 0  # the same noise and noise levels every step
        loss, loss_adjusted = core.forward_pass(batch, extras, models)
        loss_adjusted.backward()
        torch.nn.utils.clip_grad_norm_(models.controlnet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.mean().item())
    assert losses[-1] < 0.75 * losses[0] and all(np.isfinite(losses)), losses
    assert all(p.grad is None for p in models.generator.parameters())


@pytest.mark.parametrize("name,layout", [("canny", "controlnet_canny"), ("inpainting", "controlnet_inpainting"),
                                         ("sr", "controlnet_super_resolution"), ("identity", "controlnet_identity")])
def test_training_configs_build_the_released_layouts(reference_dir, name, layout):
    config = ControlNetCore.Config.load(os.path.join(ROOT, "configs", "training", f"controlnet_c_3b_{name}.yaml"))
    with open(os.path.join(reference_dir, "checkpoint-layouts", f"{layout}.json")) as f:
        expected = json.load(f)["state_dict"]
    control_filter = FILTERS[config.controlnet_filter]
    with torch.device("meta"):
        controlnet = build_controlnet(config, build_model("stage_c", config.model_version),
                                      types.SimpleNamespace(num_channels=lambda: control_filter.num_channels(None)),
                                      device="meta")
    assert {k: list(v.shape) for k, v in controlnet.state_dict().items()} == expected


def test_controlnet_width_follows_stage_c_and_blocks_are_checked():
    config = types.SimpleNamespace(controlnet_blocks=[0, 4, 8, 12, 27, 31], controlnet_bottleneck_mode="simple",
                                   controlnet_checkpoint_path=None)
    canny = types.SimpleNamespace(num_channels=lambda: 1)
    with torch.device("meta"):
        lite = build_model("stage_c", "1B")  # 32 ResBlocks of width 1536
        controlnet = build_controlnet(config, lite, canny, device="meta")
    assert controlnet.projections[0][-1].out_channels == 1536 and controlnet.backbone[0].in_channels == 1
    config.controlnet_blocks = [0, 32]
    with pytest.raises(ConfigError, match=r"controlnet_blocks \[0, 32\] must lie in 0..31"):
        build_controlnet(config, lite, canny, device="meta")


def test_upstream_notebook_api(assets):
    """As upstream's ControlNet notebook: a core built with training=False, then get_cnet with a user's mask."""
    config = {"model_version": "tiny", "effnet_checkpoint_path": assets.effnet, "previewer_checkpoint_path": None,
              "generator_checkpoint_path": assets.stage_c, "clip_text_model_name": "tiny",
              "clip_image_model_name": "tiny", "controlnet_blocks": [0, 3], "controlnet_filter": "InpaintFilter",
              "controlnet_filter_params": {"thresold": [0.04, 0.4], "p_outpaint": 0.4},
              "controlnet_bottleneck_mode": "simple", "offset_noise": 0.1}
    core = ControlNetCore(config_dict=config, device="cpu", training=False)
    extras = core.setup_extras_pre()
    assert extras.gdf.offset_noise == 0.1  # upstream's key reaches GDF's training noise
    models = core.setup_models(extras)
    assert not models.controlnet.training and not any(p.requires_grad for p in models.controlnet.parameters())
    with torch.no_grad():
        for projection in models.controlnet.projections:  # as if trained: residuals that are not zero
            projection[-1].weight.normal_()
    batch = {"captions": ["a cat"], "images": torch.rand(1, 3, 64, 64)}
    mask = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    mask[..., 16:48, 16:48] = True
    cnet, cnet_input = core.get_cnet(batch, models, extras, mask=mask, outpaint=True)
    assert torch.equal(cnet_input[:, 3:].bool(), ~mask) and len(cnet) == 4 and cnet[1] is None
    with pytest.warns(UserWarning, match="random brush and box masks"):
        conditions = core.get_conditions(batch, models, extras, is_eval=True)
        unconditions = core.get_conditions(batch, models, extras, is_eval=True, is_unconditional=True)
    assert conditions["cnet"][0].abs().sum() > 0 and not torch.equal(conditions["cnet"][0], cnet[0])
    for c, u in zip(conditions["cnet"], unconditions["cnet"]):  # random masks, yet the same in both branches
        assert (c is None and u is None) or torch.equal(c, u)


def test_controlnet_blocks_must_share_one_width_on_a_stage_c_whose_levels_differ():
    """The demo Stage C's levels are 96 and 192 wide: blocks of the first level get a 96-wide ControlNet (the
    demo's), a mix of levels is refused by name."""
    stage_c = build_model("stage_c", "demo", device="meta")
    canny = types.SimpleNamespace(num_channels=lambda: 1)

    def config(blocks):
        return types.SimpleNamespace(controlnet_blocks=blocks, controlnet_bottleneck_mode="conv16",
                                     controlnet_checkpoint_path=None)
    controlnet = build_controlnet(config([0, 9]), stage_c, canny, device="meta")
    assert controlnet.proj_blocks == [0, 9]
    assert [projection[-1].out_channels for projection in controlnet.projections] == [96, 96]
    with pytest.raises(ConfigError, match=r"controlnet_blocks \[0, 2, 9\] are ResBlocks of widths \[96, 192\]"):
        build_controlnet(config([0, 2, 9]), stage_c, canny, device="meta")


@pytest.mark.parametrize("trainer", ["controlnet", "lora"])
def test_a_frozen_stage_c_is_trained_against_with_its_own_objective(assets, tmp_path, trainer):
    """A ControlNet or LoRA trained with another objective than its frozen Stage C predicts learns to turn that
    prediction into another target, and ruins every sample it is used for: the trainer refuses it by name."""
    from train.train_c_lora import LoraCore
    v_stage_c = tmp_path / "stage_c_v.safetensors"
    save_model(load_model(assets.stage_c), v_stage_c, metadata={"gdf_target": "v"})
    core_class, config = {"controlnet": (ControlNetCore, TINY),
                          "lora": (LoraCore, os.path.join(ROOT, "configs", "training", "tiny_c_lora.yaml"))}[trainer]
    for target in ("epsilon", "v"):
        core = core_class(config_file_path=config, overrides=overrides(
            assets, tmp_path, generator_checkpoint_path=str(v_stage_c), gdf_target=target))
        extras = core.setup_extras_pre()
        if target == "epsilon":
            with pytest.raises(ConfigError, match=r"stage_c_v.safetensors predicts v, but gdf_target is epsilon: "
                                                  r".* so set gdf_target: v"):
                core.setup_models(extras)
        else:
            models = core.setup_models(extras)
            adapters = {id(p) for p in models.lora.parameters()} if trainer == "lora" else set()
            assert not any(p.requires_grad for p in models.generator.parameters() if id(p) not in adapters)
