"""Previewer trainer on demo scenes: it learns to show EfficientNet-Lite0 latents as images, saves a Previewer that
load_model rebuilds with the trainer's previews, and rejects unknown config keys by name."""
import os
import subprocess
import sys
import types

import numpy as np
import PIL.Image
import pytest
import torch

from core.conditioning import effnet_preprocess
from core.config import ConfigError
from core.distributed import DistEnv
from core.metrics import read_log
from core.weights import load_model, read_metadata, save_model
from demo.make_dataset import write_shards
from demo.scenes import sample_train_scenes
from modules.effnet_lite import _tensors
from modules.presets import build_model, preset_kwargs
from train import WurstCorePreviewer
from train.train_previewer import effnet_input_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "training", "demo_previewer.yaml")
SIZE = 64  # at effnet_scale 1: 2×2 latents, 16² previews
SCENES = 32
UPDATES = 100


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four shards of 64 px demo scenes, the same scenes as a tensor, and a Lite0 encoder whose mapper's BatchNorm
    holds these images' statistics (a trained mapper's latents are standardised too; the random one's are not)."""
    folder = tmp_path_factory.mktemp("previewer_data")
    scenes = sample_train_scenes(SCENES, [0, 0])
    write_shards(scenes, str(folder / "%06d.tar"), SIZE, maxcount=SCENES // 4)
    images = torch.stack([torch.from_numpy(np.array(s.render(SIZE))).permute(2, 0, 1) / 255 for s in scenes])
    torch.manual_seed(0)
    effnet = build_model("effnet_lite0").eval()
    effnet.mapper[1].momentum = None  # the plain average over the calibration batch
    effnet.mapper[1].train()
    with torch.no_grad():
        effnet(effnet_preprocess(images))
    save_model(effnet.eval(), folder / "effnet.safetensors")
    return types.SimpleNamespace(shards=str(folder / "{000000..000003}.tar"), images=images,
                                 effnet=str(folder / "effnet.safetensors"))


def settings(data, tmp_path, **changes):
    base = {"webdataset_path": data.shards, "effnet_checkpoint_path": data.effnet, "train_effnet_mapper": False,
            "image_size": SIZE, "effnet_scale": 1.0, "checkpoint_path": str(tmp_path / "ck"),
            "output_path": str(tmp_path / "out"), "num_workers": 0, "sample_every": 0}
    return [f"{k}={v}" for k, v in {**base, **changes}.items()]


class KeepModels(WurstCorePreviewer):
    """Keeps the models it trains, to compare them with what it saved."""

    def setup_models(self, extras):
        self.models = super().setup_models(extras)
        return self.models


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """UPDATES updates of the demo Previewer (MSE + 0.1 L1, with an EMA), and its initial weights."""
    tmp_path = tmp_path_factory.mktemp("previewer_run")
    overrides = settings(data, tmp_path, updates=UPDATES, save_every=UPDATES, sample_every=UPDATES, batch_size=8,
                         lr=3e-3, l1_weight=0.1, warmup_updates=5, ema_start_iters=20, ema_iters=1, ema_beta=0.9)
    core = KeepModels(config_file_path=DEMO, overrides=overrides)
    torch.manual_seed(core.config.seed)  # the initial weights the run starts from
    initial = core.setup_models(core.setup_extras_pre()).generator.eval()
    core()
    folder = tmp_path / "ck" / "demo_previewer"
    checkpoint = folder / sorted(os.listdir(folder))[-1]
    return types.SimpleNamespace(core=core, initial=initial, path=tmp_path, checkpoint=checkpoint)


def preview_mse(core, images, generator):
    targets, previews = core.previews(images, core.models, generator)
    return (previews - targets).square().mean().item()


def test_training_lowers_the_preview_error(data, trained):
    saved = load_model(trained.checkpoint / "generator.safetensors")
    before = preview_mse(trained.core, data.images, trained.initial)
    after = preview_mse(trained.core, data.images, saved)
    assert after < 0.3 * before, (before, after)
    log = read_log(trained.path / "out" / "demo_previewer" / "log.txt")
    assert log[UPDATES]["psnr"] > log[1]["psnr"] + 4, (log[1], log[UPDATES])
    last = log[UPDATES]
    assert last["loss"] == pytest.approx(last["mse"] + 0.1 * last["l1"], rel=1e-5)
    grid = PIL.Image.open(trained.path / "out" / "demo_previewer" / f"{UPDATES:06d}.jpg")
    assert grid.size == (8 * SIZE // 4, 3 * SIZE // 4)  # 2×2 latents → 16² previews; inputs, model, EMA


def test_saved_previewer_reproduces_the_trainers_previews(data, trained):
    core = trained.core
    for name in ("generator", "generator_ema"):
        path = trained.checkpoint / f"{name}.safetensors"
        meta = read_metadata(path)
        assert (meta["kind"], meta["preset"]) == ("previewer", "demo")
        saved, theirs = load_model(path), getattr(core.models, name).eval()
        assert saved.blocks[0].out_channels == preset_kwargs("previewer", "demo")["c_hidden"]  # the demo preset's
        mine = core.previews(data.images, core.models, saved)[1]
        torch.testing.assert_close(mine, core.previews(data.images, core.models, theirs)[1], rtol=1e-5, atol=1e-6)
    # the encoder stayed frozen: it is the file's, in eval mode
    effnet = core.models.effnet
    assert not effnet.training and not any(p.requires_grad for p in effnet.parameters())
    assert torch.equal(effnet.mapper[1].running_mean, load_model(data.effnet).mapper[1].running_mean)


def test_effnet_input_is_the_scaled_image_in_multiples_of_32():
    assert effnet_input_size((128, 128), 0.75) == [96, 96]  # the demo: 3×3 latents, 24² previews
    assert effnet_input_size((64, 200), 0.75) == [32, 128]
    assert effnet_input_size((40, 40), 0.5) == [32, 32]  # never below one latent


def test_training_the_mapper_with_the_previewer_saves_both(data, tmp_path):
    """The demo's set-up: a new stride-8 mapper on the package backbone learns with the Previewer; the saved
    mapper file rebuilds the trainer's latents, and the backbone never moves."""
    overrides = settings(data, tmp_path, effnet_checkpoint_path="null", train_effnet_mapper=True,
                         effnet_preset="demo", updates=30, save_every=30, batch_size=8, lr=3e-3, warmup_updates=0)
    core = KeepModels(config_file_path=DEMO, overrides=overrides)
    torch.manual_seed(core.config.seed)
    initial_mapper = core.setup_models(core.setup_extras_pre()).effnet.mapper[0].weight.detach().clone()
    core()
    step = tmp_path / "ck" / "demo_previewer" / "step_00000030"
    meta = read_metadata(step / "effnet.safetensors")
    assert (meta["kind"], meta["preset"]) == ("effnet_lite0", "demo")
    saved = load_model(step / "effnet.safetensors")
    trained = core.models.effnet.eval()
    assert saved.feature_stride == 8 and not torch.equal(saved.mapper[0].weight, initial_mapper)
    x = effnet_preprocess(data.images[:4])
    with torch.no_grad():
        latents = saved(x)
        torch.testing.assert_close(latents, trained(x), rtol=1e-5, atol=1e-5)
    assert latents.shape == (4, 16, SIZE // 8, SIZE // 8)
    fresh = build_model("effnet_lite0", "demo")  # the package's backbone, untouched by training
    ours, package = _tensors(trained.backbone), _tensors(fresh.backbone)  # (state_dict() leaves the backbone out)
    assert len(ours) > 100 and ours.keys() == package.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, package[name]), name
    log = read_log(tmp_path / "out" / "demo_previewer" / "log.txt")
    assert log[30]["mse"] < log[1]["mse"]


def test_a_mapper_trains_in_one_process_only(data, tmp_path):
    """Nothing synchronises the mapper across ranks: with several processes, setting up the models refuses."""
    core = WurstCorePreviewer(config_file_path=DEMO, overrides=settings(data, tmp_path, train_effnet_mapper=True))
    assert core.setup_models(core.setup_extras_pre()).effnet.mapper[0].weight.requires_grad
    core.env = DistEnv(rank=0, world_size=2)
    with pytest.raises(ConfigError, match="train_effnet_mapper runs in one process"):
        core.setup_models(core.setup_extras_pre())


def test_config_checks(data, tmp_path):
    with pytest.raises(ConfigError, match="train_effnet_mapper"):
        WurstCorePreviewer(config_file_path=DEMO, overrides=settings(data, tmp_path, effnet_checkpoint_path="null"))
    with pytest.raises(ConfigError, match="cached_webdataset_path"):
        WurstCorePreviewer(config_file_path=DEMO, overrides=settings(data, tmp_path, cached_webdataset_path="x"))
    with pytest.raises(ConfigError, match="effnet_scale must be positive"):
        WurstCorePreviewer(config_file_path=DEMO, overrides=settings(data, tmp_path, effnet_scale=0))


def test_unknown_config_keys_are_named(data, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train", "train_previewer.py"), DEMO,
                           *settings(data, tmp_path, effnet_scael=0.5)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "'effnet_scael': did you mean 'effnet_scale'?" in done.stderr
