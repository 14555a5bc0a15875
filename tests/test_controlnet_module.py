"""ControlNet module: released layouts (meta device), residual list, stem without padding, import hygiene."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REFERENCE, ROOT
from modules.controlnet import ControlNet
from modules.stage_c import StageC

LAYOUTS = ["controlnet_canny", "controlnet_inpainting", "controlnet_super_resolution", "controlnet_identity"]


def layout(name):
    with open(os.path.join(REFERENCE, "checkpoint-layouts", f"{name}.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", LAYOUTS)
def test_matches_released_layout_and_gives_one_residual_per_listed_block(name):
    ref = layout(name)
    with torch.device("meta"):
        model = ControlNet(**ref["kwargs"])
    sd = model.state_dict()
    assert list(sd) == list(ref["state_dict"])
    assert {k: list(v.shape) for k, v in sd.items()} == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]

    # control images as the filters make them for a 1024² picture: pixels (effnet mode, stride 32) or 32² maps
    c_in, mode = ref["kwargs"]["c_in"], ref["kwargs"]["bottleneck_mode"]
    size = 1024 if mode == "effnet" else 32
    out = model(torch.empty(2, c_in, size, size, device="meta"))
    blocks = ref["kwargs"]["proj_blocks"]
    assert len(out) == max(blocks) + 1
    for i, residual in enumerate(out):
        if i in blocks:
            assert residual.shape == (2, 2048, 32, 32)
        else:
            assert residual is None


@pytest.mark.parametrize("c_in", [1, 4])
def test_stem_for_other_channel_counts_has_no_padding(c_in):
    """Canny (1 ch) and inpainting (4 ch) weights were trained with a 3×3 stride-2 stem without padding."""
    model = ControlNet(c_in=c_in, c_proj=8, proj_blocks=[0], bottleneck_mode="effnet")
    stem = model.backbone[0][0]
    assert (stem.kernel_size, stem.stride, stem.padding, stem.bias) == ((3, 3), (2, 2), (0, 0), None)
    assert torch.count_nonzero(stem.weight[:, 3:]) == 0  # extra channels start at zero (upstream's init)
    with torch.no_grad():
        assert model.backbone[0](torch.randn(1, c_in, 64, 64)).shape[-1] == 31  # (64 - 3) // 2 + 1
    rgb = ControlNet(c_in=3, c_proj=8, proj_blocks=[0]).backbone[0][0]  # torchvision's own stem stays
    assert rgb.padding == (1, 1)


def test_new_controlnet_is_a_no_op_that_stage_c_accepts():
    cnet = ControlNet(c_in=4, c_proj=16, proj_blocks=[1, 3], bottleneck_mode="simple").eval()
    with torch.no_grad():
        residuals = cnet(torch.randn(2, 4, 6, 6))
    assert residuals[0] is None and residuals[2] is None
    assert all(torch.equal(residuals[i], torch.zeros(2, 16, 6, 6)) for i in (1, 3))

    model = StageC(c_hidden=[16, 16], nhead=[2, 2], c_cond=8, blocks=[[1, 1], [1, 1]], c_clip_text=8,
                   c_clip_text_pooled=8, c_clip_img=8).eval()
    inputs = (torch.randn(2, 16, 4, 4), torch.rand(2), torch.randn(2, 77, 8), torch.randn(2, 8), torch.randn(2, 8))
    with torch.no_grad():
        torch.nn.init.normal_(model.clf[1].weight)
        base = model(*inputs)
        assert torch.equal(model(*inputs, cnet=residuals), base)
        torch.nn.init.normal_(cnet.projections[0][-1].weight)
        assert not torch.allclose(model(*inputs, cnet=cnet(torch.randn(2, 4, 6, 6))), base)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="proj_blocks"):
        ControlNet()
    with pytest.raises(ValueError, match="bottleneck_mode"):
        ControlNet(proj_blocks=[0], bottleneck_mode="huge")


def test_importing_stage_c_and_controlnet_pulls_no_optional_dependencies():
    code = ("import sys, modules.stage_c, modules.controlnet; "
            "print(sorted(m for m in ('cv2', 'kornia', 'insightface') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
