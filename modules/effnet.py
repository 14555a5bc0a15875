"""EfficientNet encoder: the image → 16-channel latent map that Stage C generates and Stage B is conditioned on."""
import torchvision
from torch import nn


class EfficientNetEncoder(nn.Module):
    """EfficientNetV2-S features (B, 1280, H/32, W/32), a 1×1 conv to `c_latent` and a non-affine BatchNorm.

    Input: the [0, 1] image normalised with ImageNet mean/std; a 768² image gives 16×24×24. The backbone is
    built without pretrained weights: the released effnet_encoder file carries all of them.
    """

    def __init__(self, c_latent=16):
        super().__init__()
        self.backbone = torchvision.models.efficientnet_v2_s(weights=None).features
        self.mapper = nn.Sequential(
            nn.Conv2d(1280, c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_latent, affine=False),  # standardises the latents Stage C learns to generate
        )

    def features(self, x):  # B, 3, H, W → B, 1280, H/32, W/32: what the mapper maps (cached when it trains)
        return self.backbone(x)

    def forward(self, x):  # B, 3, H, W → B, c_latent, H/32, W/32
        return self.mapper(self.features(x))
