"""Configs: typed fields, required and unknown keys, overrides, and upstream's training YAML files as they are."""
import dataclasses
import glob
import os
import warnings
from typing import Optional

import pytest
import yaml

from core.config import EXPECTED, EXPECTED_TRAIN, Config, ConfigError, ConfigWarning
from train import ControlNetCore, LoraCore, WurstCoreA, WurstCoreB, WurstCoreC, WurstCorePreviewer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "training")


@dataclasses.dataclass(frozen=True)
class Toy(Config):
    name: str = EXPECTED
    steps: int = EXPECTED_TRAIN
    lr: float = 0.1
    paths: Optional[list[str]] = None
    params: dict = dataclasses.field(default_factory=dict)

    RENAMED = {"params.thresold": "params.threshold"}


def test_fields_are_typed_and_overridable():
    cfg = Toy.from_dict({"name": "a", "steps": 3, "lr": "1e-4"}, overrides=["steps=7", "paths=[x, y]",
                                                                              "params.resize=224"])
    assert (cfg.steps, cfg.lr, cfg.paths, cfg.params) == (7, 1e-4, ["x", "y"], {"resize": 224})
    with pytest.raises(ConfigError, match="'steps' must be int"):
        Toy.from_dict({"name": "a", "steps": "many"})
    with pytest.raises(ConfigError, match="'lr' must not be null"):
        Toy.from_dict({"name": "a", "steps": 1, "lr": None})
    with pytest.raises(ConfigError, match="key=value"):
        Toy.from_dict({"name": "a", "steps": 1}, overrides=["steps"])


def test_unknown_and_missing_keys_are_named():
    with pytest.raises(ConfigError, match=r"'stpes': did you mean 'steps'\?"):
        Toy.from_dict({"name": "a", "steps": 1, "stpes": 2})
    with pytest.raises(ConfigError, match="missing required config key.*: name, steps"):
        Toy.from_dict({})
    # EXPECTED_TRAIN keys are only required for training (upstream's notebooks build cores with training=False)
    assert Toy.from_dict({"name": "a"}, training=False).steps == EXPECTED_TRAIN


def test_renamed_key_inside_a_mapping_is_read_with_a_warning():
    with pytest.warns(ConfigWarning, match="'params.thresold' is read as 'params.threshold'"):
        cfg = Toy.from_dict({"name": "a", "steps": 1, "params": {"thresold": [0.04, 0.4]}})
    assert cfg.params == {"threshold": [0.04, 0.4]}


def _load(core, name, **changes):
    with open(os.path.join(CONFIGS, name)) as f:
        values = {**yaml.safe_load(f), **changes}
    return core.Config.from_dict(values)


@pytest.mark.parametrize("name", ["finetune_c_3b.yaml", "finetune_c_1b.yaml", "finetune_c_3b_lowres.yaml",
                                  "finetune_c_3b_v.yaml"])
def test_upstream_stage_c_configs_load(name):
    cfg = _load(WurstCoreC, name)
    assert cfg.model_version in ("3.6B", "1B") and cfg.use_fsdp and cfg.webdataset_path[0].startswith("s3://")
    assert cfg.gdf_target == ("v" if name.endswith("_v.yaml") else "epsilon")


def test_lowres_filters_and_captions_getter_are_parsed_not_evaluated():
    cfg = _load(WurstCoreC, "finetune_c_3b_lowres.yaml", captions_getter=["json", "captions_getter"],
                dataset_filters=[["normalized_score", "lambda s: s > 9.0"],
                                 ["pgen_normalized_score", "lambda s: s > 3.0"]])
    assert cfg.captions_getter == ["json", "captions_getter"]
    with pytest.raises(ConfigError, match="__import__"):
        _load(WurstCoreC, "finetune_c_3b_lowres.yaml", dataset_filters=[["w", "lambda w: __import__('os')"]])
    with pytest.raises(ConfigError, match="unknown getter 'eval'"):
        _load(WurstCoreC, "finetune_c_3b_lowres.yaml", captions_getter=["txt", "eval"])


def test_upstream_v_config_key_points_to_the_real_one():
    with pytest.raises(ConfigError, match="'edm_objective'.*gdf_target: v"):
        _load(WurstCoreC, "finetune_c_3b.yaml", edm_objective=True)
    core = WurstCoreC(config_dict=_load(WurstCoreC, "finetune_c_3b_v.yaml").to_dict(), training=False)
    assert type(core.setup_extras_pre().gdf.target).__name__ == "VTarget"


@pytest.mark.parametrize("name", ["finetune_b_3b.yaml", "finetune_b_700m.yaml"])
def test_upstream_stage_b_configs_load_and_shift_is_ignored(name):
    with pytest.warns(ConfigWarning, match="'shift' is ignored"):
        cfg = _load(WurstCoreB, name)
    assert cfg.model_version in ("3B", "700M") and cfg.adaptive_loss_weight is True
    assert not hasattr(cfg, "shift")


TRAINERS = (("controlnet", ControlNetCore), ("_lora", LoraCore), ("finetune_b", WurstCoreB), ("tiny_b", WurstCoreB),
            ("finetune_c", WurstCoreC), ("tiny_c", WurstCoreC), ("demo_b", WurstCoreB), ("demo_c", WurstCoreC),
            ("_a.yaml", WurstCoreA), ("_previewer", WurstCorePreviewer))  # first match wins


def test_every_training_config_of_the_repo_loads():
    paths = sorted(p for p in glob.glob(os.path.join(CONFIGS, "*.yaml"))
                   if any(key in os.path.basename(p) for key, _ in TRAINERS))
    assert len(paths) == len(glob.glob(os.path.join(CONFIGS, "*.yaml"))) >= 15  # every file has its trainer
    for path in paths:
        core = next(core for key, core in TRAINERS if key in os.path.basename(path))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = core.Config.load(path)
        config_warnings = [w for w in caught if issubclass(w.category, ConfigWarning)]
        # Stage B's unused `shift` and upstream's misspelt `thresold` (inpainting) are the only warnings
        expect_warning = "finetune_b" in path or "inpainting" in path
        assert bool(config_warnings) == expect_warning, (path, [str(w.message) for w in caught])
        if "inpainting" in path:
            assert "thresold" in str(config_warnings[0].message)
            assert cfg.controlnet_filter_params["threshold"] == [0.04, 0.4]
            assert "thresold" not in cfg.controlnet_filter_params


def test_training_configs_check_their_fields():
    base = {"experiment_id": "x", "checkpoint_path": "c", "output_path": "o", "lr": 1e-4, "batch_size": 4,
            "grad_accum_steps": 1, "updates": 2, "warmup_updates": 1, "save_every": 1, "backup_every": 1,
            "webdataset_path": "d.tar", "image_size": 64, "model_version": "tiny", "effnet_checkpoint_path": None,
            "previewer_checkpoint_path": None}
    assert WurstCoreC.Config.from_dict(base).effnet_checkpoint_path is None
    with pytest.raises(ConfigError, match="missing required config key.*previewer_checkpoint_path"):
        WurstCoreC.Config.from_dict({k: v for k, v in base.items() if k != "previewer_checkpoint_path"})
    with pytest.raises(ConfigError, match="ema_iters and ema_beta"):
        WurstCoreC.Config.from_dict({**base, "ema_start_iters": 10})
    with pytest.raises(ConfigError, match="gdf_target' must be one of"):
        WurstCoreC.Config.from_dict({**base, "gdf_target": "eps"})
    with pytest.raises(ConfigError, match="wandb_project is not set"):
        WurstCoreC.Config.from_dict({**base, "wandb_mode": "offline"})
    with pytest.raises(ConfigError, match="batch_size 4 does not split"):
        WurstCoreC.Config.from_dict({**base, "grad_accum_steps": 3}).micro_batch_size(1)
