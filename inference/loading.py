"""Builds a `StableCascadePipeline` from a pipeline config: the released weights, or random tiny ones for tests."""
import warnings

import torch

from core.conditioning import (build_tokenizer, load_text_encoder, load_vision_encoder, random_text_encoder,
                               random_vision_encoder, tiny_text_config, tiny_vision_config)
from inference.config import PipelineConfig, load_pipeline_config
from inference.pipeline import PipelineError, StableCascadePipeline

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device=None):
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(explicit, config: PipelineConfig, device):
    """An explicit argument wins, then the config's `dtype`, then the device default (bf16 on CUDA, fp32 on CPU)."""
    name = explicit or config.dtype or config.stage_c.dtype
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(name, torch.dtype):
        dtype = name
    elif str(name) in DTYPES:
        dtype = DTYPES[str(name)]
    else:
        raise PipelineError(f"unknown dtype '{name}'; use one of {sorted(DTYPES)}")
    if device.type == "cpu" and dtype != torch.float32:
        warnings.warn(f"{dtype} on the CPU works but is slower than float32 here; pass --dtype float32 for speed",
                      stacklevel=2)
    return dtype


def _model(kind, preset, path, random_ok, dtype, what):
    """Loads `kind` from its checkpoint; without one, random weights only when the config allows it."""
    from core.weights import load_model, recorded_target
    from modules.presets import build_model
    if path:
        model = load_model(path, kind=kind, preset=preset, dtype=dtype, device="cpu")
        # what a generator trained here predicts (train/base.py records it); released files: epsilon
        model.gdf_target = recorded_target(path)
        return model
    if not random_ok:
        raise PipelineError(f"no checkpoint path for the {what} in the config; download the weights with "
                            "'bash models/download_models.sh essential big-big bfloat16' and set the path")
    return _break_zero_init(build_model(kind, preset, dtype=dtype))


@torch.no_grad()
def _break_zero_init(model, std=0.02):
    """Random-weight models: upstream zero-initialises output layers and gates, so an untrained model would ignore
    its conditions; small random values there make every input matter (what tests and smoke runs need)."""
    for p in model.parameters():
        if not p.any():
            p.normal_(0, std)
    return model


def _effnet_kind(path):
    """The encoder kind the file records (the demo's 'effnet_lite0', say); the released file records none."""
    from core.weights import recorded_kind
    return recorded_kind(path, "effnet") if path else "effnet"


def _preset(kind, version):
    """Upstream names Stage C '3.6B'/'3B' interchangeably in places; presets use the released sizes."""
    if kind == "stage_c" and version == "3B":
        return "3.6B"
    return version


def load_pipeline(config, device=None, dtype=None, offload=False, seed=0):
    """A ready pipeline from a config file/dict. `seed` fixes random weights when the config asks for them."""
    cfg = config if isinstance(config, PipelineConfig) else load_pipeline_config(config)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, cfg, device)
    rnd = cfg.random_weights
    aux = "tiny" if cfg.stage_c.model_version == "tiny" else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        c, b = cfg.stage_c, cfg.stage_b
        stage_c = _model("stage_c", _preset("stage_c", c.model_version), c.generator_checkpoint_path, rnd, dtype,
                         "Stage C generator")
        effnet_path = c.effnet_checkpoint_path or b.effnet_checkpoint_path
        effnet_kind = _effnet_kind(effnet_path)
        effnet = _model(effnet_kind, aux if effnet_kind == "effnet" else None, effnet_path, rnd, dtype,
                        "EfficientNet encoder")
        previewer = None
        if c.previewer_checkpoint_path or rnd:
            previewer = _model("previewer", aux, c.previewer_checkpoint_path, rnd, dtype, "Previewer")
        stage_b = _model("stage_b", b.model_version, b.generator_checkpoint_path, rnd, dtype, "Stage B generator")
        stage_a = _model("stage_a", aux, b.stage_a_checkpoint_path, rnd, dtype, "Stage A")
    if rnd and not cfg.text_encoder_path:
        from modules.presets import TINY_CLIP_IMAGE_DIM, TINY_CLIP_TEXT_DIM, TINY_CLIP_TEXT_POOLED_DIM
        text_model = random_text_encoder(tiny_text_config(hidden=TINY_CLIP_TEXT_DIM,
                                                          projection=TINY_CLIP_TEXT_POOLED_DIM), seed=seed)
        text_model.to(dtype)
        vision_loader = lambda: random_vision_encoder(  # noqa: E731
            tiny_vision_config(projection=TINY_CLIP_IMAGE_DIM), seed=seed).to(dtype)
        tokenizer = build_tokenizer(cfg.tokenizer_path)
    else:
        text_model = load_text_encoder(cfg.text_encoder_path, dtype=dtype)
        tokenizer = build_tokenizer(cfg.tokenizer_path or cfg.text_encoder_path)
        image_path = cfg.image_encoder_path
        vision_loader = (lambda: load_vision_encoder(image_path, dtype=dtype)) if image_path else None
    pipe = StableCascadePipeline(stage_c, stage_b, stage_a, effnet, text_model, tokenizer, previewer=previewer,
                                 device=device, dtype=dtype, offload=offload,
                                 stage_c_compression=cfg.stage_c_compression)
    pipe.vision_loader = vision_loader
    return pipe
