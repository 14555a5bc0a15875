"""Model kinds and named size presets, so configs, checkpoints and tests name a model instead of spelling out kwargs.

A preset is a set of constructor kwargs on top of the class defaults. The full-size presets reproduce the released
checkpoint layouts (shared/reference/checkpoint-layouts); upstream's `model_version` strings ('3.6B', '1B', '3B',
'700M') are preset names. `tiny` presets exist for every kind so that tests and the tiny configs run a forward on
a CPU in a fraction of a second.
"""
import contextlib
import copy
import importlib

import torch

# Classes by dotted path, imported only when built: importing this registry must not import every model (nor
# OpenCV/torchvision through them).
MODEL_CLASSES = {
    "stage_a": "modules.stage_a.StageA",
    "stage_b": "modules.stage_b.StageB",
    "stage_c": "modules.stage_c.StageC",
    "effnet": "modules.effnet.EfficientNetEncoder",
    "effnet_lite0": "modules.effnet_lite.EfficientNetLite0Encoder",  # the demo model's semantic compressor
    "previewer": "modules.previewer.Previewer",
    "controlnet": "modules.controlnet.ControlNet",
}

# Widths of the tiny CLIP encoders. The tiny text/vision encoders (configs/inference/tiny.yaml and the tests) must
# be built with these, or their embeddings will not fit the tiny Stage B/C. Distinct on purpose: passing
# `clip_text` where `clip_text_pooled` belongs then fails loudly instead of running.
TINY_CLIP_TEXT_DIM = 32  # text encoder hidden size -> Stage C `clip_text`
TINY_CLIP_TEXT_POOLED_DIM = 24  # text projection size -> Stage C `clip_text_pooled`, Stage B `clip`
TINY_CLIP_IMAGE_DIM = 16  # vision projection size -> Stage C `clip_img`
TINY_STAGE_C_WIDTH = 64  # tiny Stage C c_hidden, which the tiny ControlNet projects to
# The demo cascade (models/demo): all-MiniLM-L6-v2 text (384) and EfficientNet-Lite0 image embeddings (1280)
DEMO_TEXT_DIM = 384
DEMO_IMAGE_DIM = 1280
DEMO_STAGE_C_WIDTHS = [96, 192]  # the demo Stage C's levels: 8×8 and 4×4 tokens (2×2 patches of its 16×16 latents)

_PROJ_BLOCKS = [0, 4, 8, 12, 51, 55, 59, 63]  # the 3.6B Stage C ResBlocks the released ControlNets feed

PRESETS = {
    "stage_c": {
        "3.6B": {},
        "1B": dict(c_cond=1536, c_hidden=[1536, 1536], nhead=[24, 24], blocks=[[4, 12], [12, 4]]),
        "tiny": dict(c_cond=64, c_hidden=[TINY_STAGE_C_WIDTH, TINY_STAGE_C_WIDTH], nhead=[2, 2],
                     blocks=[[1, 1], [1, 1]], c_clip_text=TINY_CLIP_TEXT_DIM,
                     c_clip_text_pooled=TINY_CLIP_TEXT_POOLED_DIM, c_clip_img=TINY_CLIP_IMAGE_DIM),
        # 16×16 latents for 128² images, small enough to train on a 2-core CPU in minutes: 2×2 patches (8×8 tokens),
        # then 4×4, text attention at both levels (upstream's layout), and a layout attention whose queries are the
        # places alone. Position is learnt from the text only at the top of the noise schedule: the demo config
        # trains a quarter of its samples there (top_noise_share; demo/README.md).
        "demo": dict(c_cond=128, c_hidden=DEMO_STAGE_C_WIDTHS, nhead=[4, 4], blocks=[[2, 3], [3, 2]],
                     block_repeat=[[1, 1], [1, 1]], dropout=[0, 0], level_config=["CTA", "CTA"],
                     switch_level=[True], patch_size=2, layout_attention=4, c_clip_text=DEMO_TEXT_DIM,
                     c_clip_text_pooled=DEMO_TEXT_DIM, c_clip_img=DEMO_IMAGE_DIM),
    },
    "stage_b": {
        "3B": dict(c_hidden=[320, 640, 1280, 1280], nhead=[-1, -1, 20, 20], blocks=[[2, 6, 28, 6], [6, 28, 6, 2]],
                   block_repeat=[[1, 1, 1, 1], [3, 3, 2, 2]]),
        "700M": dict(c_hidden=[320, 576, 1152, 1152], nhead=[-1, 9, 18, 18], blocks=[[2, 4, 14, 4], [4, 14, 4, 2]],
                     block_repeat=[[1, 1, 1, 1], [2, 2, 2, 2]]),
        # Two levels instead of four; the repeat mappers stay exercised.
        "tiny": dict(c_cond=64, c_hidden=[32, 64], nhead=[-1, 2], blocks=[[1, 1], [1, 1]],
                     block_repeat=[[1, 1], [2, 2]], level_config=["CT", "CTA"], dropout=[0, 0],
                     c_clip=TINY_CLIP_TEXT_POOLED_DIM),
        # 32×32×4 Stage A latents of 128² images: 16×16 then 8×8 tokens
        "demo": dict(c_cond=128, c_hidden=[64, 128], nhead=[-1, 4], blocks=[[2, 4], [4, 2]],
                     block_repeat=[[1, 1], [1, 1]], level_config=["CT", "CTA"], dropout=[0, 0], c_clip=DEMO_TEXT_DIM),
    },
    "stage_a": {
        "default": {},
        "tiny": dict(bottleneck_blocks=1, c_hidden=32, codebook_size=64),
        # The demo model's (52k parameters): 128 px procedural scenes (demo/scenes.py), trained by
        # configs/training/demo_a.yaml to ~30 dB in minutes on 2 CPU cores; c_hidden 64 costs twice the time per update.
        "demo": dict(levels=2, c_hidden=32, bottleneck_blocks=2, c_latent=4, codebook_size=1024),
    },
    # EfficientNetV2-S has no width knobs; at 64 px it already runs in a fraction of a second.
    "effnet": {"default": {}, "tiny": {}},
    # The demo's encoder reads Lite0's stride-8 features: 16×16×16 latents for its 128² scenes (modules/effnet_lite.py).
    # From the stride-16 ones (8×8×16, `demo_stride16`) even a decoder trained for the purpose redraws the right shape
    # for under a third of the scenes; from stride 8, for 85% (demo/README.md).
    "effnet_lite0": {"default": {}, "demo": dict(feature_stride=8), "demo_stride16": dict(feature_stride=16)},
    "previewer": {
        "default": {},
        "tiny": dict(c_hidden=32),
        # The demo's (train/train_previewer.py, configs/training/demo_previewer.yaml): 128² previews of its 16×16
        # latents, trained with the encoder's mapper as the decoder that shapes the latent space (wide enough to
        # redraw the scene's shape; still negligible next to the EfficientNet-Lite0 on a CPU).
        "demo": dict(c_hidden=128),
    },
    "controlnet": {
        "canny": dict(c_in=1, proj_blocks=_PROJ_BLOCKS, bottleneck_mode="effnet"),
        "inpainting": dict(c_in=4, proj_blocks=_PROJ_BLOCKS, bottleneck_mode="effnet"),
        "super_resolution": dict(c_in=16, proj_blocks=_PROJ_BLOCKS, bottleneck_mode="large"),
        "identity": dict(c_in=512, proj_blocks=list(range(64)), bottleneck_mode="simple"),
        # Feeds the first and last ResBlock of the tiny Stage C (which has four).
        "tiny": dict(c_in=3, c_proj=TINY_STAGE_C_WIDTH, proj_blocks=[0, 3], bottleneck_mode="simple"),
        # the demo Stage C's first and last ResBlocks (of ten), both on its first level (8×8 tokens: stride 16)
        "demo_canny": dict(c_in=1, c_proj=DEMO_STAGE_C_WIDTHS[0], proj_blocks=[0, 9], bottleneck_mode="conv16"),
    },
}


def _check_kind(kind):
    if kind not in MODEL_CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; known kinds: {', '.join(MODEL_CLASSES)}")


def model_class(kind):
    """The class registered for `kind`, imported on first use."""
    _check_kind(kind)
    module_name, _, class_name = MODEL_CLASSES[kind].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def preset_kwargs(kind, preset):
    """Constructor kwargs of a preset (a copy: callers may change it); preset None means the class defaults."""
    _check_kind(kind)
    if preset is None:
        return {}
    presets = PRESETS.get(kind, {})
    if preset not in presets:
        known = ", ".join(presets) or "none"
        raise ValueError(f"unknown preset {preset!r} for {kind}; known presets: {known}")
    return copy.deepcopy(presets[preset])


def build_model(kind, preset=None, device=None, dtype=None, **overrides):
    """Builds `kind` from a preset plus kwarg overrides; device='meta' allocates nothing (shapes only).

    The model remembers how it was built (`model.build_spec`), so core.weights.save_model can record it and
    load_model can rebuild the model from the checkpoint alone.
    """
    kwargs = {**preset_kwargs(kind, preset), **overrides}
    cls = model_class(kind)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = cls(**kwargs)
    if dtype is not None:
        model.to(dtype)
    model.build_spec = {"kind": kind, "preset": preset, "kwargs": copy.deepcopy(overrides)}
    return model
