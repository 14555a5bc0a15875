"""Previewer: a small convolutional decoder that shows Stage C latents as RGB without running Stages B and A."""
from torch import nn


def _conv_gelu_bn(conv):
    return [conv, nn.GELU(), nn.BatchNorm2d(conv.out_channels)]


class Previewer(nn.Module):
    """Stage C latent B, c_in, h, w → RGB B, c_out, 8h, 8w (three 2× transposed convs): 16×24×24 → 3×192×192.

    One flat `blocks` Sequential, so the state-dict keys match the released previewer file.
    """

    def __init__(self, c_in=16, c_hidden=512, c_out=3):
        super().__init__()
        c2, c4 = c_hidden // 2, c_hidden // 4
        self.blocks = nn.Sequential(
            *_conv_gelu_bn(nn.Conv2d(c_in, c_hidden, kernel_size=1)),
            *_conv_gelu_bn(nn.Conv2d(c_hidden, c_hidden, kernel_size=3, padding=1)),
            *_conv_gelu_bn(nn.ConvTranspose2d(c_hidden, c2, kernel_size=2, stride=2)),  # h → 2h
            *_conv_gelu_bn(nn.Conv2d(c2, c2, kernel_size=3, padding=1)),
            *_conv_gelu_bn(nn.ConvTranspose2d(c2, c4, kernel_size=2, stride=2)),  # 2h → 4h
            *_conv_gelu_bn(nn.Conv2d(c4, c4, kernel_size=3, padding=1)),
            *_conv_gelu_bn(nn.ConvTranspose2d(c4, c4, kernel_size=2, stride=2)),  # 4h → 8h
            *_conv_gelu_bn(nn.Conv2d(c4, c4, kernel_size=3, padding=1)),
            nn.Conv2d(c4, c_out, kernel_size=1),
        )

    def forward(self, x):
        return self.blocks(x)
