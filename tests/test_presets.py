"""Model presets: the full-size ones build the released layouts, the tiny ones run and fit together."""
import json
import os

import pytest
import torch

from modules import presets
from modules.presets import (TINY_CLIP_IMAGE_DIM, TINY_CLIP_TEXT_DIM, TINY_CLIP_TEXT_POOLED_DIM, build_model,
                             preset_kwargs)

RELEASED = [  # kind, preset (upstream's model_version where it has one), layout file
    ("stage_c", "3.6B", "stage_c_3.6b"), ("stage_c", "1B", "stage_c_1b"),
    ("stage_b", "3B", "stage_b_3b"), ("stage_b", "700M", "stage_b_700m"),
    ("stage_a", "default", "stage_a"), ("effnet", "default", "effnet_encoder"), ("previewer", "default", "previewer"),
    ("controlnet", "canny", "controlnet_canny"), ("controlnet", "inpainting", "controlnet_inpainting"),
    ("controlnet", "super_resolution", "controlnet_super_resolution"),
    ("controlnet", "identity", "controlnet_identity"),
]


@pytest.mark.parametrize("kind,preset,layout", RELEASED, ids=[r[2] for r in RELEASED])
def test_full_size_presets_build_the_released_layouts(reference_dir, kind, preset, layout):
    with open(os.path.join(reference_dir, "checkpoint-layouts", f"{layout}.json")) as f:
        expected = json.load(f)
    assert preset_kwargs(kind, preset) == expected["kwargs"]
    model = build_model(kind, preset, device="meta")
    assert sum(p.numel() for p in model.parameters()) == expected["num_parameters"]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected["state_dict"]


def test_unknown_kind_or_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model kind 'stage_d'; known kinds: stage_a, stage_b, stage_c, "
                                         "effnet, effnet_lite0, previewer, controlnet"):
        build_model("stage_d")
    with pytest.raises(ValueError, match=r"unknown preset '3\.6b' for stage_c; known presets: 3\.6B, 1B, tiny, demo"):
        preset_kwargs("stage_c", "3.6b")


def test_preset_kwargs_are_a_copy():
    preset_kwargs("stage_c", "1B")["c_hidden"].append(1)
    assert preset_kwargs("stage_c", "1B")["c_hidden"] == [1536, 1536]


def test_overrides_dtype_and_build_record():
    model = build_model("previewer", "tiny", dtype=torch.bfloat16, c_out=4)
    assert model.blocks[-1].weight.shape[:2] == (4, 8)  # c_out overridden, c_hidden // 4 from the preset
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.build_spec == {"kind": "previewer", "preset": "tiny", "kwargs": {"c_out": 4}}
    assert build_model("previewer").blocks[0].weight.shape == (512, 16, 1, 1)  # no preset: the class defaults


def test_tiny_presets_are_tiny():
    # every kind has one, but for the demo's EfficientNet-Lite0, whose size is its pretrained backbone's
    assert [k for k in presets.MODEL_CLASSES if "tiny" not in presets.PRESETS[k]] == ["effnet_lite0"]
    sizes = {kind: sum(p.numel() for p in build_model(kind, "tiny", device="meta").parameters())
             for kind in presets.MODEL_CLASSES if kind != "effnet_lite0"}
    # EfficientNetV2-S has no size knobs (20M parameters), but at 64 px it is quick.
    assert all(n < 3_000_000 for kind, n in sizes.items() if kind != "effnet"), sizes


def _trained_looking(model):
    """Fresh Stage B/C output layers and ControlNet projections are zero, which would hide wiring mistakes."""
    for p in model.parameters():
        p.add_(torch.randn_like(p), alpha=0.05)
    return model.eval()


@torch.no_grad()
def test_tiny_models_run_together_with_tiny_clip_widths():
    """The tiny cascade, wired as inference wires it: CLIP widths, latent channels and ControlNet residuals fit."""
    b = 2
    stage_c, stage_b, controlnet = (_trained_looking(build_model(k, "tiny"))
                                    for k in ("stage_c", "stage_b", "controlnet"))
    stage_a, effnet, previewer = (build_model(k, "tiny").eval() for k in ("stage_a", "effnet", "previewer"))
    image = torch.rand(b, 3, 64, 64)
    clip_text, clip_pooled = torch.randn(b, 77, TINY_CLIP_TEXT_DIM), torch.randn(b, 1, TINY_CLIP_TEXT_POOLED_DIM)
    clip_img, r = torch.randn(b, 1, TINY_CLIP_IMAGE_DIM), torch.rand(b)
    latents_c = effnet(image)  # B, 16, 2, 2
    assert latents_c.shape == (b, 16, 2, 2)
    noisy = torch.randn(b, 16, 8, 8)
    pred_c = stage_c(noisy, r, clip_text, clip_pooled, clip_img)
    cnet = controlnet(image)
    pred_controlled = stage_c(noisy, r, clip_text, clip_pooled, clip_img, cnet=cnet)
    assert pred_c.shape == pred_controlled.shape == noisy.shape and not torch.allclose(pred_c, pred_controlled)
    assert previewer(pred_c).shape == (b, 3, 64, 64)
    latents_a = stage_a.encode(image)[0]  # B, 4, 16, 16
    pred_b = stage_b(torch.randn_like(latents_a), r, latents_c, clip_pooled)
    assert pred_b.shape == latents_a.shape == (b, 4, 16, 16)
    assert stage_a.decode(pred_b).shape == image.shape
