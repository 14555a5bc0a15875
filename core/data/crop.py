"""Resize an image to cover its bucket, then crop it to the bucket's size: centred, random or saliency-guided."""
import random

import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode


def resize_to_cover(image: torch.Tensor, size: tuple) -> torch.Tensor:
    """Scale a C×H×W image, keeping its aspect ratio, to the smallest size covering `size` = (h, w)
    (bilinear with antialiasing, as upstream)."""
    height, width = image.shape[-2:]
    scale = max(size[0] / height, size[1] / width)
    new = (max(size[0], round(height * scale)), max(size[1], round(width * scale)))
    if new == (height, width):
        return image
    return TF.resize(image, list(new), interpolation=InterpolationMode.BILINEAR, antialias=True)


def crop_at(image: torch.Tensor, size: tuple, top: int, left: int) -> torch.Tensor:
    return image[..., top:top + size[0], left:left + size[1]]


class CenterCrop:
    def __call__(self, image: torch.Tensor, size: tuple, rng: random.Random) -> torch.Tensor:
        height, width = image.shape[-2:]
        return crop_at(image, size, (height - size[0]) // 2, (width - size[1]) // 2)


class RandomCrop:
    def __call__(self, image: torch.Tensor, size: tuple, rng: random.Random) -> torch.Tensor:
        height, width = image.shape[-2:]
        return crop_at(image, size, rng.randint(0, height - size[0]), rng.randint(0, width - size[1]))


class SmartCrop:
    """Crop around the image's salient region, like torchtools' SmartCrop that upstream trains with.

    The saliency network is defined with the ControlNet work, so it is passed in: a callable mapping a
    1×3×h×w image in [0, 1] to a 1×1×h'×w' saliency map. Without one (None) the crop is centred.
    The map is sharpened with a softmax at `temperature`, cut at 0.75 of its peak, and the crop is centred on
    the centroid of what remains, shifted by U(-q, q) per axis with probability `randomize_p`.
    """

    def __init__(self, saliency_model=None, randomize_p=0.3, randomize_q=0.2, temperature=0.03, saliency_size=240):
        self.saliency_model = saliency_model
        self.randomize_p, self.randomize_q = randomize_p, randomize_q
        self.temperature, self.saliency_size = temperature, saliency_size

    def __call__(self, image: torch.Tensor, size: tuple, rng: random.Random) -> torch.Tensor:
        if self.saliency_model is None:
            return CenterCrop()(image, size, rng)
        y, x = self.salient_point(image)
        if rng.random() < self.randomize_p:
            y += rng.uniform(-self.randomize_q, self.randomize_q)
            x += rng.uniform(-self.randomize_q, self.randomize_q)
        height, width = image.shape[-2:]
        top = int(min(max(y * height - size[0] / 2, 0), height - size[0]))
        left = int(min(max(x * width - size[1] / 2, 0), width - size[1]))
        return crop_at(image, size, top, left)

    @torch.no_grad()
    def salient_point(self, image: torch.Tensor) -> tuple:
        """The centroid of the salient region as fractions (y, x) of the image's height and width."""
        small = TF.resize(image[None], self.saliency_size, antialias=True)
        heat = self.saliency_model(small)[0, 0].float()  # h', w'
        weights = (heat.flatten() / self.temperature).softmax(0).view_as(heat)
        mask = (weights > weights.max() * 0.75).float()
        ys, xs = torch.linspace(0, 1, mask.shape[0]), torch.linspace(0, 1, mask.shape[1])
        total = mask.sum()
        return float((mask.sum(1) * ys).sum() / total), float((mask.sum(0) * xs).sum() / total)


def make_crop(mode: str, saliency_model=None):
    """'smart' (saliency-guided when `saliency_model` is given, else centred), 'center' or 'random'."""
    if mode == "smart":
        return SmartCrop(saliency_model)
    if saliency_model is not None:
        raise ValueError(f"saliency_model is only used by crop='smart', not crop={mode!r}")
    crops = {"center": CenterCrop, "random": RandomCrop}
    if mode not in crops:
        raise ValueError(f"crop must be 'smart', 'center' or 'random', got {mode!r}")
    return crops[mode]()
