"""ControlNet for Stage C: a backbone turns a control image (the output of a filter) into features, and one
projection per listed ResBlock turns them into residuals that StageC adds before those blocks.

Filters live elsewhere: importing this module must not pull in OpenCV, kornia or insightface.
"""
import torch
from torch import nn
from torchvision.models import efficientnet_v2_s

from .common import LayerNorm2d


class CNetResBlock(nn.Module):
    """Pre-norm residual block of two 3×3 convs (the 'large' bottleneck)."""

    def __init__(self, c):
        super().__init__()
        self.blocks = nn.Sequential(
            LayerNorm2d(c),
            nn.GELU(),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
            LayerNorm2d(c),
            nn.GELU(),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
        )

    def forward(self, x):
        return x + self.blocks(x)


def _effnet_backbone(c_in):
    """EfficientNetV2-S features (random init: released ControlNets carry their own backbone weights), eval mode
    as upstream. For c_in != 3 the stem is a 3×3 stride-2 conv without padding (the released canny and
    inpainting weights expect its output size), started from the original stem's first channels."""
    backbone = efficientnet_v2_s(weights=None).features.eval()
    if c_in != 3:
        old = backbone[0][0].weight  # 24, 3, 3, 3
        stem = nn.Conv2d(c_in, 24, kernel_size=3, stride=2, bias=False).to(old.device)
        with torch.no_grad():
            stem.weight.zero_()
            stem.weight[:, :min(c_in, 3)] = old[:, :min(c_in, 3)]
        backbone[0][0] = stem
    return backbone, 1280


def _simple_backbone(c_in):
    return nn.Sequential(
        nn.Conv2d(c_in, c_in * 4, kernel_size=3, padding=1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(c_in * 4, c_in, kernel_size=3, padding=1),
    ), c_in


def _large_backbone(c_in):
    return nn.Sequential(
        nn.Conv2d(c_in, 4096 * 4, kernel_size=1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(4096 * 4, 1024, kernel_size=1),
        *[CNetResBlock(1024) for _ in range(8)],
        nn.Conv2d(1024, 1280, kernel_size=1),
    ), 1280


def _conv_backbone(c_in, widths=(16, 32, 64, 128, 128)):
    """Stride-2 3×3 convs, one per width: five give stride 32 like the EfficientNet's, for small Stage Cs that an
    EfficientNetV2-S backbone would outweigh many times over ('conv16': four, for the demo Stage C's 8×8 tokens)."""
    layers, c = [], c_in
    for width in widths:
        layers += [nn.Conv2d(c, width, kernel_size=3, stride=2, padding=1), nn.GELU()]
        c = width
    return nn.Sequential(*layers[:-1]), c


_BACKBONES = {"effnet": _effnet_backbone, "simple": _simple_backbone, "large": _large_backbone,
              "conv": _conv_backbone, "conv16": lambda c_in: _conv_backbone(c_in, widths=(16, 32, 64, 128))}


class ControlNet(nn.Module):
    """`proj_blocks` lists the StageC ResBlocks (in execution order) that receive a residual; `bottleneck_mode`
    picks the backbone: 'effnet' (default), 'simple' (two 3×3 convs at c_in), 'large' (1×1 MLP + 8 res blocks) or
    'conv' (five strided convs, for small Stage Cs)."""

    def __init__(self, c_in=3, c_proj=2048, proj_blocks=None, bottleneck_mode=None):
        super().__init__()
        if not proj_blocks:
            raise ValueError("proj_blocks must list the ResBlock indices that receive a residual, "
                             "e.g. [0, 4, 8, 12, 51, 55, 59, 63]")
        mode = bottleneck_mode or "effnet"
        if mode not in _BACKBONES:
            raise ValueError(f"unknown bottleneck_mode {bottleneck_mode!r} (use one of {sorted(_BACKBONES)})")
        self.proj_blocks = list(proj_blocks)
        self.backbone, c_embed = _BACKBONES[mode](c_in)
        self.projections = nn.ModuleList(nn.Sequential(
            nn.Conv2d(c_embed, c_embed, kernel_size=1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(c_embed, c_proj, kernel_size=1, bias=False),
        ) for _ in self.proj_blocks)
        for projection in self.projections:  # a new ControlNet starts as a no-op
            nn.init.zeros_(projection[-1].weight)

    def forward(self, x):
        """x: B, c_in, H, W control image -> list over ResBlocks 0..max(proj_blocks): B, c_proj, h, w or None."""
        x = self.backbone(x)  # B, c_embed, h, w
        residuals = [None] * (max(self.proj_blocks) + 1)
        for idx, projection in zip(self.proj_blocks, self.projections):
            residuals[idx] = projection(x)
        return residuals
