"""The small saliency network whose thresholded output picks the regions the inpainting ControlNet learns to fill.

Upstream trains the inpainting ControlNet on masks cut from this network's saliency map; its weights live in
upstream's git repository as a pickled `.pt` (`bash models/download_models.sh controlnet saliency`). The module
names and nesting below reproduce that file's state-dict layout, so it loads with strict=True.
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

SALIENCY_PATH = "models/controlnet/saliency_model.pt"


def _conv_norm(c_in, c_out, kernel_size, stride=1, relu=True):
    """Reflection pad, conv, affine InstanceNorm (and ReLU): the unit every stage of the network is built from."""
    layers = [nn.ReflectionPad2d(kernel_size // 2), nn.Conv2d(c_in, c_out, kernel_size, stride=stride),
              nn.InstanceNorm2d(c_out, affine=True)]
    return layers + [nn.ReLU()] if relu else layers


class SaliencyResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.resblock = nn.Sequential(*_conv_norm(c, c, 3), *_conv_norm(c, c, 3, relu=False))

    def forward(self, x):
        return x + self.resblock(x)


class _Upsample(nn.Module):
    """×2 nearest; a module so that the segmentator's layer indices (and the file's keys) stay upstream's."""

    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="nearest")


class SaliencyNet(nn.Module):
    """[0,1] RGB B×3×H×W → saliency B×1×H/8×W/8 in (0, 1): a 16× strided encoder, two residual blocks, a ×2
    decoder."""

    def __init__(self):
        super().__init__()
        self.downsampler = nn.Sequential(*_conv_norm(3, 8, 9, stride=4), *_conv_norm(8, 16, 3, stride=2),
                                         *_conv_norm(16, 32, 3, stride=2))
        self.residual = nn.Sequential(SaliencyResBlock(32), nn.Conv2d(32, 64, kernel_size=1, bias=False, groups=32),
                                      SaliencyResBlock(64))
        self.segmentator = nn.Sequential(*_conv_norm(64, 16, 3), _Upsample(), nn.ReflectionPad2d(4),
                                         nn.Conv2d(16, 1, kernel_size=9), nn.Sigmoid())

    def forward(self, x):
        return self.segmentator(self.residual(self.downsampler(x)))


def load_saliency_net(path=SALIENCY_PATH, device="cpu"):
    """The saliency network with upstream's weights, in eval mode and frozen.

    Upstream's file is a legacy (pre-zip) pickle, which the memory-mapped loader in core.weights cannot open; it
    is read here with torch.load(weights_only=True), which refuses anything but tensors and plain containers.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"saliency weights not found at {path}; get them with "
                                "`bash models/download_models.sh controlnet saliency`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read the saliency weights ({type(e).__name__}: {e})") from None
    net = SaliencyNet()
    net.load_state_dict(state, strict=True)
    return net.to(device).eval().requires_grad_(False)
