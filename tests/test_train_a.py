"""Stage A trainer on demo scenes: it learns, saves a Stage A that load_model rebuilds with a calibrated latent scale,
resumes exactly with the discriminator on, mixes quantized and unquantized decoding per sample, and rejects
unknown config keys."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import PIL.Image
import pytest
import torch

from core.config import ConfigError
from core.metrics import read_log
from core.weights import load_model, load_state_dict_file, read_metadata
from demo.make_dataset import write_shards
from demo.scenes import sample_train_scenes
from modules.presets import build_model
from train import WurstCoreA
from train.train_a import quantizer_tap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_A = os.path.join(ROOT, "configs", "training", "tiny_a.yaml")
SIZE = 64
SCENES = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four shards of 64 px demo scenes, and the same scenes as a tensor (the training images)."""
    folder = tmp_path_factory.mktemp("stage_a_data")
    scenes = sample_train_scenes(SCENES, [0, 0])
    write_shards(scenes, str(folder / "%06d.tar"), SIZE, maxcount=SCENES // 4)
    images = torch.stack([torch.from_numpy(np.array(s.render(SIZE))).permute(2, 0, 1) / 255 for s in scenes])
    return types.SimpleNamespace(shards=str(folder / "{000000..000003}.tar"), images=images)


def settings(data, tmp_path, **changes):
    base = {"webdataset_path": data.shards, "checkpoint_path": str(tmp_path / "ck"),
            "output_path": str(tmp_path / "out"), "num_workers": 0, "sample_every": 0}
    return [f"{k}={v}" for k, v in {**base, **changes}.items()]


def final_checkpoint(tmp_path):
    folder = tmp_path / "ck" / "tiny_a"
    return folder / sorted(os.listdir(folder))[-1]


class KeepModels(WurstCoreA):
    """Keeps the models it trains, to compare them with what it saved."""

    def setup_models(self, extras):
        self.models = super().setup_models(extras)
        return self.models


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """60 updates of the tiny Stage A (with EMA and train-mode BatchNorm, upstream's), and its initial weights."""
    tmp_path = tmp_path_factory.mktemp("stage_a_run")
    overrides = settings(data, tmp_path, updates=60, save_every=60, batch_size=8, lr=3e-3, warmup_updates=5,
                         ema_start_iters=10, ema_iters=1, ema_beta=0.9, sample_every=60)
    core = KeepModels(config_file_path=TINY_A, overrides=overrides)
    torch.manual_seed(core.config.seed)  # the initial weights the run starts from
    initial = core.setup_models(core.setup_extras_pre()).generator
    core()
    return types.SimpleNamespace(core=core, initial=initial.eval(), path=tmp_path,
                                 checkpoint=final_checkpoint(tmp_path))


@torch.no_grad()
def reconstruction_mse(model, images, quantize=True):
    return (model(images, quantize=quantize)[0].clamp(0, 1) - images).square().mean().item()


def test_training_lowers_the_error_and_the_saved_model_reproduces_the_trainers(data, trained):
    saved = load_model(trained.checkpoint / "generator.safetensors")
    for quantize in (True, False):
        before = reconstruction_mse(trained.initial, data.images, quantize)
        after = reconstruction_mse(saved, data.images, quantize)
        assert after < 0.25 * before, (quantize, before, after)
    ema = load_model(trained.checkpoint / "generator_ema.safetensors")
    for mine, theirs in ((saved, trained.core.models.generator), (ema, trained.core.models.generator_ema)):
        theirs.eval()
        assert mine.scale_factor != theirs.scale_factor  # calibrated, yet the reconstructions are the trainer's
        with torch.no_grad():
            for quantize in (True, False):
                torch.testing.assert_close(mine(data.images, quantize=quantize)[0],
                                           theirs(data.images, quantize=quantize)[0], rtol=1e-4, atol=1e-5)
    log = read_log(trained.path / "out" / "tiny_a" / "log.txt")
    assert log[60]["psnr"] > log[1]["psnr"] + 5 and 0 < log[60]["codebook_usage"] <= 1
    assert {"mse", "l1", "vq_loss", "latent_std"} <= set(log[60]) and "disc_loss" not in log[60]
    grid = PIL.Image.open(trained.path / "out" / "tiny_a" / "000060.jpg")
    assert grid.size == (2 * SIZE, 5 * SIZE)  # inputs; code and no-code reconstructions of model and EMA


def test_saved_scale_factor_gives_unit_std_latents(data, trained):
    path = trained.checkpoint / "generator.safetensors"
    scale = json.loads(read_metadata(path)["kwargs"])["scale_factor"]
    model = load_model(path)
    assert model.scale_factor == pytest.approx(scale)
    with torch.no_grad():
        latents = model.encode(data.images)[0]
    assert 0.8 <= latents.std().item() <= 1.25, latents.std()
    preset = build_model("stage_a", "tiny").scale_factor  # what the file would hold without calibration
    assert not 0.8 <= latents.std().item() * scale / preset <= 1.25


def test_resume_with_the_discriminator_on_equals_the_uninterrupted_run(data, tmp_path):
    common = dict(updates=6, save_every=3, batch_size=4, grad_accum_steps=2, adversarial_weight=0.5,
                  adversarial_start=2, ema_start_iters=2, ema_iters=2, ema_beta=0.9, l1_weight=0.5)
    WurstCoreA(config_file_path=TINY_A, overrides=settings(data, tmp_path / "straight", **common))()
    WurstCoreA(config_file_path=TINY_A, overrides=settings(data, tmp_path / "resumed", **{**common, "updates": 3}))()
    WurstCoreA(config_file_path=TINY_A, overrides=settings(data, tmp_path / "resumed", **common))()
    straight, resumed = final_checkpoint(tmp_path / "straight"), final_checkpoint(tmp_path / "resumed")
    assert straight.name == resumed.name == "step_00000006"
    for name in ("generator", "generator_ema", "discriminator"):
        a, b = (load_state_dict_file(c / f"{name}.safetensors") for c in (straight, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert read_metadata(straight / "generator.safetensors") == read_metadata(resumed / "generator.safetensors")
    log_a, log_b = (read_log(tmp_path / d / "out" / "tiny_a" / "log.txt") for d in ("straight", "resumed"))
    assert "resumed from" in (tmp_path / "resumed" / "out" / "tiny_a" / "log.txt").read_text()
    for step in range(1, 7):
        for key in ("loss", "mse", "latent_std"):
            assert log_b[step][key] == log_a[step][key], (step, key)
    assert "disc_loss" not in log_a[2] and log_a[3]["disc_loss"] == log_b[3]["disc_loss"] > 0  # on from update 3


def test_per_sample_choice_between_code_and_encoder_output():
    model = build_model("stage_a", "tiny").eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        coded, direct = model(images, quantize=True)[0], model(images, quantize=False)[0]
        with quantizer_tap(model, torch.tensor([True, False, True])) as tap:
            mixed = model(images, quantize=True)[0]
    torch.testing.assert_close(mixed[[0, 2]], coded[[0, 2]])
    torch.testing.assert_close(mixed[1], direct[1])
    assert not torch.allclose(coded[1], direct[1])
    assert tap.latents.shape == (3, 4, 8, 8) and tap.indices.shape == (3, 8, 8)
    torch.testing.assert_close(tap.latents / model.scale_factor, model.encode(images)[0])


def test_unknown_config_keys_are_named(data, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train", "train_a.py"), TINY_A,
                           *settings(data, tmp_path, adversarial_wieght=0.1)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "'adversarial_wieght': did you mean 'adversarial_weight'?" in done.stderr
    with pytest.raises(ConfigError, match="'clip_text_model_name'"):  # Stage A has no text encoder to name
        WurstCoreA(config_file_path=TINY_A, overrides=settings(data, tmp_path, clip_text_model_name="tiny"))
