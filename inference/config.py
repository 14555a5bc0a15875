"""Inference configs: upstream's per-stage YAML files, combined by a small pipeline YAML.

A pipeline file names a Stage C and a Stage B config (a path to an upstream-style file, or the same keys
inline) and where the CLIP encoders live, or names packaged encoders instead (`text_encoder_path: minilm`,
`image_encoder_path: effnet_lite0`, the demo model's). Unknown keys are errors that name the key.
"""
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

import yaml


class ConfigError(ValueError):
    """A config file that cannot be used as written; the message names the file and the key."""


# Keys upstream's inference YAMLs carry for their notebooks' data loading; accepted and not used here.
_NOTEBOOK_ONLY_KEYS = {"webdataset_path", "batch_size", "image_size", "grad_accum_steps"}


@dataclass
class StageConfig:
    """One stage's generator and its helpers, with upstream's key names."""
    model_version: str
    dtype: Optional[str] = None
    generator_checkpoint_path: Optional[str] = None
    effnet_checkpoint_path: Optional[str] = None
    previewer_checkpoint_path: Optional[str] = None  # Stage C only
    stage_a_checkpoint_path: Optional[str] = None  # Stage B only


@dataclass
class PipelineConfig:
    stage_c: StageConfig
    stage_b: StageConfig
    dtype: Optional[str] = None
    text_encoder_path: Optional[str] = "models/text_encoder"
    image_encoder_path: Optional[str] = "models/image_encoder"
    tokenizer_path: Optional[str] = None  # default: the text encoder's folder, else open_clip's vocabulary
    # Random weights made on the fly (tiny CLIP encoders, models without checkpoints): for tests and demos only.
    random_weights: bool = False
    # The side the CLI and the app default to: upstream's 1024 when unset; the demo model draws 128² scenes.
    image_size: Optional[int] = None
    # Output pixels per Stage C latent, a side: upstream's 42.67 (1024² → 24×24); the demo's Stage C makes the
    # 16×16 latents of its 128² images, from EfficientNet-Lite0's stride-8 features (8).
    stage_c_compression: float = 42.67
    # The CLI's and the app's sampling settings when none are given, per stage ({stage_c: {steps, cfg, shift},
    # stage_b: {...}}; unset keys keep upstream's): the demo's Stage B draws crisper outlines at CFG 2.
    sampling: Optional[dict] = None
    source: str = field(default="<dict>", repr=False)


def _check_keys(cls, values, where, ignore=()):
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(values) - names - set(ignore))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(names)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in values]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")


def _read_yaml(path):
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(values).__name__}")
    return values


def _stage(value, where, base_dir):
    if isinstance(value, str):
        path = value if os.path.isabs(value) or os.path.exists(value) else os.path.join(base_dir, value)
        values, where = _read_yaml(path), path
    elif isinstance(value, dict):
        values = value
    else:
        raise ConfigError(f"{where}: expected a path to a stage config or a mapping, got {value!r}")
    _check_keys(StageConfig, values, where, ignore=_NOTEBOOK_ONLY_KEYS)
    kept = {k: v for k, v in values.items() if k not in _NOTEBOOK_ONLY_KEYS}
    kept["model_version"] = str(kept["model_version"])
    return StageConfig(**kept)


def load_pipeline_config(path_or_dict, overrides=None):
    """Read a pipeline YAML (or dict) into a `PipelineConfig`; `overrides` are top-level `key: value` pairs."""
    if isinstance(path_or_dict, dict):
        values, where, base_dir = dict(path_or_dict), "<dict>", os.getcwd()
    else:
        values, where = _read_yaml(path_or_dict), str(path_or_dict)
        base_dir = os.path.dirname(os.path.abspath(path_or_dict))
    values.update(overrides or {})
    _check_keys(PipelineConfig, values, where)
    values["stage_c"] = _stage(values["stage_c"], f"{where}: stage_c", base_dir)
    values["stage_b"] = _stage(values["stage_b"], f"{where}: stage_b", base_dir)
    check_sampling(values.get("sampling"), where)
    return PipelineConfig(**values, source=where)


_SAMPLING_KEYS = ("steps", "cfg", "shift")


def check_sampling(sampling, where):
    """A config's `sampling` (pipeline or ControlNet): stage_c and/or stage_b, each with steps, cfg and shift."""
    if sampling is None:
        return
    if not isinstance(sampling, dict) or set(sampling) - {"stage_c", "stage_b"}:
        raise ConfigError(f"{where}: sampling maps stage_c and/or stage_b to their settings, got {sampling!r}")
    for stage, settings in sampling.items():
        unknown = sorted(set(settings or {}) - set(_SAMPLING_KEYS))
        if unknown:
            raise ConfigError(f"{where}: sampling.{stage}: unknown key(s) {unknown}; known keys are "
                              f"{list(_SAMPLING_KEYS)}")


def default_sampling(path_or_config, controlnet=None):
    """(Stage C, Stage B) StageSampling a pipeline config samples with when the user gives none: its `sampling`
    over upstream's defaults, and a ControlNet's own `sampling` (a loaded one's, or the dict itself) over both."""
    from inference.pipeline import STAGE_B_DEFAULTS, STAGE_C_DEFAULTS
    cfg = path_or_config if isinstance(path_or_config, PipelineConfig) else load_pipeline_config(path_or_config)
    extra = controlnet if isinstance(controlnet, dict) else getattr(controlnet, "sampling", None)
    given, extra = cfg.sampling or {}, extra or {}
    return tuple(dataclasses.replace(default, **{**(given.get(stage) or {}), **(extra.get(stage) or {})})
                 for stage, default in (("stage_c", STAGE_C_DEFAULTS), ("stage_b", STAGE_B_DEFAULTS)))


def weights_present(cfg: PipelineConfig):
    """True when every file the config names is on disk, named encoders installed (or it asks for random weights)."""
    from core.conditioning import named_encoder_present
    files = [cfg.text_encoder_path, cfg.stage_c.generator_checkpoint_path, cfg.stage_c.effnet_checkpoint_path,
             cfg.stage_b.generator_checkpoint_path, cfg.stage_b.stage_a_checkpoint_path]
    return cfg.random_weights or all(f and (named_encoder_present(f) or os.path.exists(f)) for f in files)


def default_image_size(path_or_config) -> int:
    """The square side a pipeline config generates by default (its `image_size`, else 1024)."""
    cfg = path_or_config if isinstance(path_or_config, PipelineConfig) else load_pipeline_config(path_or_config)
    return cfg.image_size or 1024
