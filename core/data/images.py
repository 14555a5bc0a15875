"""How a raw webdataset sample becomes a training image.

Decoding is split in two so that resuming can replay an epoch cheaply: `plan` decodes the image (a corrupt
one is found here), reads and drops the caption and picks the bucket; `finish` does the resize and crop,
and is skipped for the batches a resumed run has already trained on.
"""
import io
import random
from dataclasses import dataclass

import PIL.Image
import torchvision.transforms.functional as TF

from .buckets import Buckets
from .captions import CaptionGetter
from .crop import resize_to_cover
from .errors import CorruptSample

IMAGE_ENTRIES = ("jpg", "jpeg", "png", "webp")


def decode_image(sample: dict) -> PIL.Image.Image:
    entry = next((e for e in IMAGE_ENTRIES if e in sample), None)
    if entry is None:
        raise CorruptSample(f"no image entry (one of {', '.join(IMAGE_ENTRIES)})")
    try:
        with PIL.Image.open(io.BytesIO(sample[entry])) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as error:
        raise CorruptSample(f"cannot decode '{entry}': {error}") from error


@dataclass(frozen=True)
class ImageDecoder:
    """Samples → {'images': 3×h×w float in [0, 1], 'captions': str, 'keys': str}, grouped by bucket size."""
    buckets: Buckets
    captions: CaptionGetter
    crop: object  # a crop from crop.make_crop
    caption_dropout: float = 0.0  # probability of replacing the caption by "" (the unconditional input)
    p_random_ratio: float = 0.0  # probability of a random bucket instead of the closest (upstream: 0.05)

    def plan(self, sample: dict, rng: random.Random):
        image = decode_image(sample)
        caption = self.captions(sample, rng)
        if rng.random() < self.caption_dropout:
            caption = ""
        if rng.random() < self.p_random_ratio:
            size = self.buckets.random(rng)
        else:
            size = self.buckets.closest(image.height, image.width)
        return size, {"image": image, "caption": caption, "key": sample["__key__"]}

    def finish(self, item: dict, size: tuple, rng: random.Random) -> dict:
        image = resize_to_cover(TF.to_tensor(item["image"]), size)
        return {"images": self.crop(image, size, rng), "captions": item["caption"], "keys": item["key"]}
