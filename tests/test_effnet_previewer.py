"""EfficientNet encoder and Previewer: released layouts, shapes, numerics against functional oracles, bf16."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import REFERENCE

from modules.effnet import EfficientNetEncoder
from modules.previewer import Previewer


def _layout(name):
    with open(os.path.join(REFERENCE, "checkpoint-layouts", f"{name}.json")) as f:
        return json.load(f)


def _randomise_norm_stats(model):
    """BatchNorm running statistics and affine terms away from their identity defaults."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("cls,name", [(EfficientNetEncoder, "effnet_encoder"), (Previewer, "previewer")])
def test_layout_matches_released_file(cls, name):
    ref = _layout(name)
    with torch.device("meta"):
        model = cls(**ref["kwargs"])
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == list(ref["state_dict"].items())
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]


def test_meta_shapes():
    with torch.device("meta"):
        latent = EfficientNetEncoder()(torch.empty(1, 3, 768, 768))
        preview = Previewer()(torch.empty(1, 16, 24, 24))
    assert latent.shape == (1, 16, 24, 24)
    assert preview.shape == (1, 3, 192, 192)


def test_effnet_is_torchvision_features_then_mapper():
    model = _randomise_norm_stats(EfficientNetEncoder())
    features = torchvision.models.efficientnet_v2_s(weights=None).features.eval()
    features.load_state_dict(model.backbone.state_dict())
    bn = model.mapper[1]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        f = features(x)  # 1, 1280, 2, 2
        y = torch.einsum("oc,bchw->bohw", model.mapper[0].weight[:, :, 0, 0], f)
        expected = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        torch.testing.assert_close(model(x), expected)


def test_previewer_matches_functional_oracle():
    c_hidden = 32
    model = _randomise_norm_stats(Previewer(c_hidden=c_hidden))
    sd = model.state_dict()
    x = torch.randn(2, 16, 3, 3)

    # the released structure: (conv, GELU, BatchNorm) × 8, then a 1×1 conv; upsampling convs at 6, 12, 18
    h = x
    for i in range(0, 24, 3):
        w, b = sd[f"blocks.{i}.weight"], sd[f"blocks.{i}.bias"]
        if i in (6, 12, 18):
            h = F.conv_transpose2d(h, w, b, stride=2)
        else:
            h = F.conv2d(h, w, b, padding=w.shape[-1] // 2)
        n = f"blocks.{i + 2}."
        h = F.batch_norm(F.gelu(h), sd[n + "running_mean"], sd[n + "running_var"], sd[n + "weight"], sd[n + "bias"])
    expected = F.conv2d(h, sd["blocks.24.weight"], sd["blocks.24.bias"])
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 3, 24, 24)
    torch.testing.assert_close(out, expected)


def test_bf16_with_and_without_autocast():
    effnet = _randomise_norm_stats(EfficientNetEncoder())
    previewer = _randomise_norm_stats(Previewer(c_hidden=64))
    x = torch.randn(1, 3, 64, 64)
    z = torch.randn(1, 16, 4, 4)

    def run(autocast, dtype):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return effnet(x.to(dtype)), previewer(z.to(dtype))

    refs = run(False, torch.float32)
    results = [run(True, torch.float32)]  # fp32 weights under autocast
    effnet.to(torch.bfloat16), previewer.to(torch.bfloat16)
    bf16_plain = run(False, torch.bfloat16)
    assert all(out.dtype == torch.bfloat16 for out in bf16_plain)
    results += [bf16_plain, run(True, torch.bfloat16)]
    for outs in results:
        for out, ref in zip(outs, refs):
            assert (out.float() - ref).abs().max() <= 0.1 * ref.abs().max()
