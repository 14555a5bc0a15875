"""Read a demo scene's attributes back from an image by plain image analysis (no learning), to score generators.

Background: median of the border pixels. Shape pixels: the largest connected region far from it; their
coverage (alpha) is each pixel's projection on the background → shape-colour line, which undoes the
anti-aliased blend; the shape's colour is the median of its purest (farthest) pixels. Shapes are upright and
only scaled and moved, so the shape is the one whose canonical mask, normalised the same way (bounding box
padded to a square, resized to 32²), overlaps the observed alpha best (soft IoU); each shape has templates
drawn small and large, sharp and blurred, so that a generator's soft or small shapes still find their own.
Position is the cell of the bounding box's centre (alpha > 0.5); size comes from the area and the shape's
fill ratio, which blur changes less than the bounding box of a star.
"""
import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .scenes import COLOURS, OUTLINES, POSITIONS, SHAPES, SIZES, ZORB, shape_alpha

OBJECT_DISTANCE = 40.0  # RGB distance from the background colour that marks a shape pixel (texture: ≤ 26)
MIN_AREA = 0.002  # smallest shape region, as a fraction of the image (a small shape covers ≥ 0.02)
BORDER = 0.015  # border strip that gives the background colour, as a fraction of the side
TEMPLATE_SIZE = 32
# size class boundaries on the bounding box's longer side: midway between the ranges of `SIZES`
SIZE_LIMITS = tuple((a[1] + b[0]) / 2 for a, b in zip(list(SIZES.values()), list(SIZES.values())[1:]))
_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _PALETTE_NAMES], dtype=np.float64)


@dataclass(frozen=True)
class Detection:
    """Attributes read from an image; shape, colour, size and position are None when no shape was found."""
    shape: str
    colour: str
    size: str
    position: str
    background: str

    def attributes(self) -> dict:
        return asdict(self)


def nearest_colour(rgb) -> str:
    return _PALETTE_NAMES[int(np.linalg.norm(_PALETTE - np.asarray(rgb, dtype=np.float64), axis=1).argmin())]


def _largest_region(mask: np.ndarray):
    """The largest 8-connected region of a boolean mask, or None when it is below MIN_AREA."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count < 2:
        return None
    label = 1 + int(stats[1:, cv2.CC_STAT_AREA].argmax())
    if stats[label, cv2.CC_STAT_AREA] < MIN_AREA * mask.size:
        return None
    return labels == label


def _bounding_box(region: np.ndarray) -> tuple:
    """(top, bottom, left, right) pixel indices, inclusive."""
    rows, columns = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
    return rows[0], rows[-1], columns[0], columns[-1]


def normalised_mask(alpha: np.ndarray, region: np.ndarray) -> np.ndarray:
    """`alpha` near `region` (its anti-aliased rim kept), cropped to the region's bounding box, padded to a
    centred square and resized to TEMPLATE_SIZE²: what is left of a shape after removing position and scale."""
    near = cv2.dilate(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    top, bottom, left, right = _bounding_box(region)
    crop = np.where(near, alpha, 0)[top:bottom + 1, left:right + 1].astype(np.float32)
    side = max(crop.shape)
    square = np.zeros((side, side), np.float32)
    y, x = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[y:y + crop.shape[0], x:x + crop.shape[1]] = crop
    interpolation = cv2.INTER_AREA if side > TEMPLATE_SIZE else cv2.INTER_LINEAR
    return cv2.resize(square, (TEMPLATE_SIZE, TEMPLATE_SIZE), interpolation=interpolation)


def _template(shape: str, side: int, blur: float) -> np.ndarray:
    """The normalised mask of `shape` drawn with a `side`-pixel bounding box, blurred by σ = blur·side."""
    canvas = int(1.2 * side) + 8
    alpha = shape_alpha(shape, (canvas / 2, canvas / 2), side, canvas)
    if blur:
        alpha = cv2.GaussianBlur(alpha, (0, 0), blur * side)
    return normalised_mask(alpha, _largest_region(alpha > 0.5))


TEMPLATE_SIDES, TEMPLATE_BLURS = (20, 30, 80), (0.0, 0.06)
TEMPLATES = {shape: np.stack([_template(shape, side, blur) for side in TEMPLATE_SIDES for blur in TEMPLATE_BLURS])
             for shape in SHAPES + (ZORB,)}


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


FILL = {shape: _polygon_area(OUTLINES[shape]) for shape in TEMPLATES}  # area / (bounding box's longer side)²


def classify_shape(mask: np.ndarray) -> str:
    """The shape with the template of highest soft IoU (Σ min / Σ max) with a normalised mask."""
    scores = {shape: (np.minimum(mask, t).sum((1, 2)) / np.maximum(mask, t).sum((1, 2))).max()
              for shape, t in TEMPLATES.items()}
    return max(scores, key=scores.get)


def detect(image) -> Detection:
    """The attributes of the one shape in a PIL image (any size)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width = pixels.shape[:2]
    b = max(1, round(BORDER * min(height, width)))
    border = np.concatenate([pixels[:b].reshape(-1, 3), pixels[-b:].reshape(-1, 3),
                             pixels[:, :b].reshape(-1, 3), pixels[:, -b:].reshape(-1, 3)])
    background = np.median(border, 0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    far = _largest_region(distance > OBJECT_DISTANCE)
    if far is None:
        return Detection(None, None, None, None, nearest_colour(background))
    # blends lie on the line to the background, so the farthest quarter is the least mixed with it
    colour = np.median(pixels[far & (distance >= np.quantile(distance[far], 0.75))], 0)
    direction = colour - background
    alpha = np.clip((pixels - background) @ direction / (direction @ direction), 0, 1)
    region = _largest_region(alpha > 0.5)
    if region is None:
        return Detection(None, None, None, None, nearest_colour(background))
    top, bottom, left, right = _bounding_box(region)
    shape = classify_shape(normalised_mask(alpha, region))
    # the side from the area: blur erodes a star's tips, and with them its bounding box, far more than its area
    extent = math.sqrt(region.sum() / FILL[shape] / (height * width))
    row = min(int((top + bottom + 1) / 2 / height * 3), 2)
    column = min(int((left + right + 1) / 2 / width * 3), 2)
    return Detection(shape=shape, colour=nearest_colour(colour),
                     size=tuple(SIZES)[int(np.searchsorted(SIZE_LIMITS, extent))],
                     position=POSITIONS[3 * row + column], background=nearest_colour(background))
