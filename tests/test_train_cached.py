"""Training from cached encoder outputs (`--write-cache`, `cached_webdataset_path`) and Stage B training the
EfficientNet mapper: what the demo model's build relies on."""
import os
import subprocess
import sys

import pytest
import torch

from core.conditioning import encode_text
from core.config import ConfigError
from core.data import build_cached_dataloader, build_dataloader
from core.distributed import DistEnv
from core.weights import load_model, load_state_dict_file
from tests.test_train_stages import ROOT, TINY_B, TINY_C, assets, settings  # noqa: F401 (fixture)
from train import WurstCoreB, WurstCoreC


def _first(loader):
    return next(iter(loader.iter_epoch()))


def test_cached_batches_train_exactly_like_image_batches(assets, tmp_path):  # noqa: F811
    overrides = settings(assets, tmp_path, caption_dropout=0.0, clip_image_p=0.5, batch_size=8)
    core = WurstCoreC(config_file_path=TINY_C, overrides=overrides)
    shards = core.write_cache(str(tmp_path / "cache"))
    assert len(shards) == 1
    torch.manual_seed(0)
    extras = core.setup_extras_pre()
    models = core.setup_models(extras)
    cached = _first(build_cached_dataloader(shards, 8, tensors=core.CACHED_TENSORS, shuffle_buffer=0,
                                            drop_last=False, num_workers=0))
    by_key = {}  # every sample of the image shards, to put together the same batch from images
    for batch in build_dataloader(assets.data, 8, image_size=64, shuffle_buffer=0, drop_last=False,
                                  num_workers=0).iter_epoch():
        by_key.update({k: (image, caption) for k, image, caption in zip(batch["keys"], batch["images"],
                                                                         batch["captions"])})
    assert len(by_key) == 32
    images = {"keys": cached["keys"], "images": torch.stack([by_key[k][0] for k in cached["keys"]]),
              "captions": [by_key[k][1] for k in cached["keys"]]}
    assert cached["captions"] == images["captions"]
    assert "images" not in cached
    # the cache holds what the encoders make of these images ...
    torch.testing.assert_close(cached["latents"], core.encode_latents(images, models, extras))
    text = encode_text(models.text_model, models.tokenizer, images["captions"])
    torch.testing.assert_close(cached["clip_text"], text["clip_text"])
    # ... so a training step gives the same per-sample losses from either batch (same noise, t and clip_img draws)
    losses = []
    for batch in (images, cached):
        core.info.iter = 7
        with torch.no_grad():
            losses.append(core.forward_pass(batch, extras, models)[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_write_cache_writes_the_folder_whole_or_not_at_all(assets, tmp_path, monkeypatch):  # noqa: F811
    core = WurstCoreC(config_file_path=TINY_C, overrides=settings(assets, tmp_path, batch_size=8))
    cache, partial = tmp_path / "cache", tmp_path / "cache.incomplete"
    encode, batches = WurstCoreC.cache_tensors, []

    def killed_at_the_third_batch(self, batch, models):
        batches.append(len(batch["captions"]))
        if len(batches) == 3:
            raise RuntimeError("killed")
        return encode(self, batch, models)
    monkeypatch.setattr(WurstCoreC, "cache_tensors", killed_at_the_third_batch)
    with pytest.raises(RuntimeError, match="killed"):
        core.write_cache(str(cache), maxcount=8)
    assert not cache.exists()  # nothing that training could read as a complete cache
    assert len(os.listdir(partial)) == 2  # the shards of the two finished batches, under the temporary name
    monkeypatch.undo()

    shards = core.write_cache(str(cache), maxcount=8)  # a rerun starts over and completes
    assert not partial.exists()
    assert [os.path.basename(p) for p in shards] == sorted(os.listdir(cache)) and len(shards) == 4
    assert all(os.path.dirname(p) == str(cache) for p in shards)
    with pytest.raises(ConfigError, match="already holds files"):  # a cache is never added to
        core.write_cache(str(cache))

    script = os.path.join(ROOT, "train", "train_c.py")  # the command line says so in one line
    done = subprocess.run([sys.executable, script, TINY_C, *settings(assets, tmp_path), "--write-cache", str(cache)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    assert "already holds files" in done.stderr and "Traceback" not in done.stderr


def test_cached_caption_dropout_gives_the_empty_caption_embedding(assets, tmp_path):  # noqa: F811
    core = WurstCoreC(config_file_path=TINY_C, overrides=settings(assets, tmp_path, caption_dropout=1.0,
                                                                  batch_size=8))
    shards = core.write_cache(str(tmp_path / "cache"))
    models = core.setup_models(core.setup_extras_pre())
    batch = _first(build_cached_dataloader(shards, 8, tensors=core.CACHED_TENSORS, shuffle_buffer=0,
                                           num_workers=0))
    conditions = core.text_conditions(batch, models, generators=core.sample_generators(8))
    empty = encode_text(models.text_model, models.tokenizer, [""] * 8)
    for name in ("clip_text", "clip_text_pooled"):
        torch.testing.assert_close(conditions[name], empty[name])
    # without generators (evaluation) nothing is dropped
    kept = core.text_conditions(batch, models)
    torch.testing.assert_close(kept["clip_text"], batch["clip_text"])


def test_training_from_the_cache_runs_from_the_command_line(assets, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    common = settings(assets, tmp_path, updates=4, save_every=4, batch_size=8)
    script = os.path.join(ROOT, "train", "train_c.py")
    subprocess.run([sys.executable, script, TINY_C, *common, "--write-cache", str(cache)], check=True, cwd=ROOT)
    subprocess.run([sys.executable, script, TINY_C, *common, f"cached_webdataset_path={cache}/shard-000000.tar"],
                   check=True, cwd=ROOT)
    weights = load_state_dict_file(tmp_path / "ck" / "tiny_c" / "step_00000004" / "generator.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_stage_b_trains_the_effnet_mapper_and_saves_it(assets, tmp_path):  # noqa: F811
    overrides = settings(assets, tmp_path, updates=3, save_every=3, lr=1e-2, train_effnet_mapper="true",
                         effnet_dropout=0.0)
    WurstCoreB(config_file_path=TINY_B, overrides=overrides)()
    before = load_model(assets.effnet)
    after = load_model(tmp_path / "ck" / "tiny_b" / "step_00000003" / "effnet.safetensors")
    old, new = before.state_dict(), after.state_dict()
    assert not torch.equal(old["mapper.0.weight"], new["mapper.0.weight"])  # the mapper learned
    assert not torch.equal(old["mapper.1.running_mean"], new["mapper.1.running_mean"])  # its BatchNorm too
    frozen = [k for k in old if k.startswith("backbone.")]
    assert frozen and all(torch.equal(old[k], new[k]) for k in frozen)  # the backbone did not move


def test_stage_b_trains_the_mapper_in_one_process_only(assets, tmp_path):  # noqa: F811
    core = WurstCoreB(config_file_path=TINY_B, overrides=settings(assets, tmp_path, train_effnet_mapper="true"))
    models = core.setup_models(core.setup_extras_pre())
    assert models.effnet.mapper[0].weight.requires_grad and not any(
        p.requires_grad for n, p in models.effnet.named_parameters() if not n.startswith("mapper."))
    core.env = DistEnv(rank=0, world_size=2)
    with pytest.raises(ConfigError, match="train_effnet_mapper runs in one process"):
        core.setup_models(core.setup_extras_pre())


def test_stage_b_cached_features_train_exactly_like_image_batches(assets, tmp_path):  # noqa: F811
    """With a training mapper the cache holds the backbone's features (fp16); the mapper runs on them each step."""
    overrides = settings(assets, tmp_path, caption_dropout=0.0, batch_size=8, train_effnet_mapper="true",
                         effnet_scale_range="[0.5, 0.5]")
    core = WurstCoreB(config_file_path=TINY_B, overrides=overrides)
    shards = core.write_cache(str(tmp_path / "cache"))
    torch.manual_seed(0)
    extras = core.setup_extras_pre()
    models = core.setup_models(extras)
    with torch.no_grad():  # a fresh Stage B's zero output layer would pass no gradient to the mapper
        for p in models.generator.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    cached = _first(build_cached_dataloader(shards, 8, tensors=core.CACHED_TENSORS, shuffle_buffer=0,
                                            drop_last=False, num_workers=0))
    assert cached["effnet_features"].dtype == torch.float16 and cached["effnet_features"].shape[1] == 1280
    by_key = {}
    for batch in build_dataloader(assets.data, 8, image_size=64, shuffle_buffer=0, drop_last=False,
                                  num_workers=0).iter_epoch():
        by_key.update({k: (image, caption) for k, image, caption in zip(batch["keys"], batch["images"],
                                                                         batch["captions"])})
    images = {"keys": cached["keys"], "images": torch.stack([by_key[k][0] for k in cached["keys"]]),
              "captions": [by_key[k][1] for k in cached["keys"]]}
    losses = []
    for batch in (images, cached):
        core.info.iter = 3
        models.effnet.mapper.zero_grad()
        losses.append(core.forward_pass(batch, extras, models)[1])
        losses[-1].backward()
        losses.append(models.effnet.mapper[0].weight.grad.clone())  # the mapper learns the same from both
    # fp16 features: equal to about 1e-3 relative
    torch.testing.assert_close(losses[2], losses[0], rtol=2e-3, atol=1e-5)
    assert losses[1].abs().sum() > 0
    torch.testing.assert_close(losses[3], losses[1], rtol=2e-2, atol=1e-6)


def test_stage_b_noise_is_pyramid_noise_unless_switched_off(assets, tmp_path):  # noqa: F811
    from modules.gdf.noise import randn
    from train.train_b import pyramid_noise
    latents = torch.zeros(2, 4, 32, 32)

    def generators():
        return [torch.Generator().manual_seed(i) for i in range(2)]

    for flag, expected in (("true", lambda: pyramid_noise(latents.shape, generators(), "cpu")),
                           ("false", lambda: randn(latents.shape, generators(), "cpu", torch.float32))):
        core = WurstCoreB(config_file_path=TINY_B, overrides=settings(assets, tmp_path, pyramid_noise=flag),
                          training=False)
        torch.testing.assert_close(core.noise(latents, generators()), expected(), rtol=0, atol=0)


def test_loss_weight_is_chosen_by_config(assets, tmp_path):  # noqa: F811
    from core.config import ConfigError
    from modules.gdf import ConstantLossWeight, P2LossWeight, VTarget
    core = WurstCoreB(config_file_path=TINY_B, training=False, overrides=settings(
        assets, tmp_path, gdf_target="v", loss_weight="constant"))
    gdf = core.setup_extras_pre().gdf
    assert isinstance(gdf.loss_weight, ConstantLossWeight) and isinstance(gdf.target, VTarget)
    core = WurstCoreB(config_file_path=TINY_B, training=False, overrides=settings(assets, tmp_path))
    assert isinstance(core.setup_extras_pre().gdf.loss_weight, P2LossWeight)  # upstream's
    with pytest.raises(ConfigError, match="loss_weight"):
        WurstCoreB(config_file_path=TINY_B, training=False, overrides=settings(assets, tmp_path, loss_weight="p3"))
