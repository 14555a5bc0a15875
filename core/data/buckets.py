"""Multi-aspect-ratio buckets (upstream's Bucketeer): each image goes to the ratio closest to its own, and
every ratio has one size of about `image_size`² pixels whose sides are multiples of `multiple`."""
import math
import random
from dataclasses import dataclass
from fractions import Fraction

# width/height ratios of upstream's configs/training/finetune_c_3b.yaml; their reciprocals are added
UPSTREAM_RATIOS = ("1/1", "1/2", "1/3", "2/3", "3/4", "1/5", "2/5", "3/5", "4/5", "1/6", "5/6", "9/16")


@dataclass(frozen=True)
class Buckets:
    ratios: tuple  # width / height, as floats
    sizes: tuple  # (height, width) per ratio

    @classmethod
    def build(cls, image_size: int, ratios=None, multiple: int = 32) -> "Buckets":
        """`ratios` as numbers or 'a/b' strings (None → square only); each ratio's reciprocal is added."""
        given = [Fraction(str(r)) for r in (ratios or ["1/1"])]
        if any(r <= 0 for r in given):
            raise ValueError(f"aspect ratios must be positive, got {ratios!r}")
        unique = list(dict.fromkeys(given + [1 / r for r in given]))
        area = image_size ** 2
        sizes = tuple((int(math.sqrt(area / r) // multiple) * multiple, int(math.sqrt(area * r) // multiple) * multiple)
                      for r in unique)
        if any(0 in size for size in sizes):
            raise ValueError(f"image_size {image_size} is too small for ratios {ratios!r} at multiples of {multiple}")
        return cls(tuple(float(r) for r in unique), sizes)

    def closest(self, height: int, width: int) -> tuple:
        ratio = width / height
        best = min(range(len(self.ratios)), key=lambda i: abs(ratio - self.ratios[i]))
        return self.sizes[best]

    def random(self, rng: random.Random) -> tuple:
        return self.sizes[rng.randrange(len(self.sizes))]
