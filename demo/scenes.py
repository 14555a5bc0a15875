"""Procedural captioned scenes for the embedded demo model: one shape of a named colour, size and position on a
named, lightly textured background.

A scene is its attributes plus a `variant` number that seeds everything else (exact size and place within the
attribute's range, background texture, caption template), so a dataset is a pure function of its seed, and a
scene renders the same picture at any resolution.

Held-out rule (for compositional evaluation): of all (shape, colour, background) triples, the quarter with the
smallest SHA-256 of "shape/colour/background" is never used for training. Size and position are free.
"""
import hashlib
import math
import re
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import PIL.Image
import PIL.ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "heart")
ZORB = "zorb"  # a crescent reserved for the LoRA new-token experiment: never in base training or held-out scenes
ZORB_TOKEN = "[zorb]"  # how captions name it
# far apart in RGB (nearest pairs ~100 apart), so that a detector can name a colour by its nearest entry
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220), "yellow": (240, 220, 40),
           "purple": (140, 50, 170), "orange": (250, 125, 10), "white": (245, 245, 245), "black": (20, 20, 20)}
# the bounding box's longer side as a fraction of the image side, drawn uniformly from the range. Even a small
# shape spans 4-5 cells of the demo's 16×16 latents: at 3 cells (0.18-0.21) its Stage B redrew it right only 41% of
# the time, and a 128² image has no room for finer detail anyway
SIZES = {"small": (0.27, 0.30), "medium": (0.34, 0.37), "large": (0.41, 0.45)}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
CELL_CENTRES = (0.25, 0.5, 0.75)  # bounding-box centre per row/column, as image fractions; a large shape fits
JITTER = 0.015  # ± around the cell centre
TEXTURES = ("plain", "gradient", "noise")  # background brightness varies by at most ±15 levels
SUPERSAMPLE = 4  # shapes are drawn at 4× and box-filtered down: anti-aliased edges
HELD_OUT_FRACTION = 0.25

WHERE = {"top left": "in the top left", "top": "at the top", "top right": "in the top right", "left": "on the left",
         "center": "in the center", "right": "on the right", "bottom left": "in the bottom left",
         "bottom": "at the bottom", "bottom right": "in the bottom right"}
# {place} is the position hyphenated ("top-left"); every template names the background as "<colour> background"
TEMPLATES = ("a {size} {colour} {shape} {where} on a {background} background",
             "{background} background with a {size} {colour} {shape}, {place}",
             "{background} background with a {colour} {shape}, {place}, {size}",
             "a {colour} {shape}, {size}, {where}, {background} background",
             "{size} {colour} {shape} {where}, {background} background",
             "a picture of a {size} {colour} {shape} {where} against a {background} background")


def _unit(points) -> np.ndarray:
    """Centre an outline's bounding box on 0 and scale its longer side to 1."""
    points = np.asarray(points, dtype=np.float64)
    low, high = points.min(0), points.max(0)
    return (points - (low + high) / 2) / (high - low).max()


def _ring(radii, count, start):
    """Vertices at equal angles from `start` (degrees; -90 is up, y grows downwards), radii cycling."""
    angles = np.radians(start) + 2 * np.pi * np.arange(count) / count
    radii = np.resize(np.asarray(radii, dtype=np.float64), count)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


def _heart():
    t = np.linspace(0, 2 * np.pi, 256, endpoint=False)
    return np.stack([16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1)


def _crescent(offset=0.5, inner=0.84):
    """A unit disc minus a disc of radius `inner` shifted right by `offset`: horns point right."""
    x = (1 - inner ** 2 + offset ** 2) / (2 * offset)  # where the two circles cross
    y = math.sqrt(1 - x ** 2)
    outer_from, inner_from = math.atan2(y, x), math.atan2(y, x - offset)
    outer = np.linspace(outer_from, 2 * np.pi - outer_from, 128)
    back = np.linspace(2 * np.pi - inner_from, inner_from, 128)
    return np.concatenate([np.stack([np.cos(outer), np.sin(outer)], 1),
                           np.stack([offset + inner * np.cos(back), inner * np.sin(back)], 1)])


def _cross(arm=0.34):
    a = arm
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


# outlines in image coordinates (y down), bounding box centred on 0 with longer side 1; all upright
OUTLINES = {name: _unit(points) for name, points in {
    "circle": _ring(1, 256, 0),
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": _ring(1, 3, -90),
    "star": _ring((1, 0.45), 10, -90),
    "diamond": [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)],
    "hexagon": _ring(1, 6, 0),
    "cross": _cross(),
    "heart": _heart(),
    ZORB: _crescent(),
}.items()}


def shape_alpha(shape: str, centre, side: float, image_size: int) -> np.ndarray:
    """Coverage in [0, 1] (image_size²) of `shape` with bounding box of longer side `side` pixels centred at
    `centre` = (x, y) pixels (pixel k spans [k, k+1)), drawn at 4× and box-filtered."""
    hi = image_size * SUPERSAMPLE
    points = (OUTLINES[shape] * side + np.asarray(centre, dtype=np.float64)) * SUPERSAMPLE - 0.5  # PIL: centres
    mask = PIL.Image.new("L", (hi, hi), 0)
    PIL.ImageDraw.Draw(mask).polygon([tuple(p) for p in points.tolist()], fill=255)
    return np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float32) / 255


def background_image(name: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """image_size²×3 floats: the named colour, plain or with a gentle gradient or blotchy brightness noise."""
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    centres = (np.arange(image_size) + 0.5) / image_size * 2 - 1  # pixel centres in [-1, 1]
    if texture == "gradient":
        angle, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(6, 15)
        offset = amplitude * (np.cos(angle) * centres[None, :] + np.sin(angle) * centres[:, None]) / math.sqrt(2)
    elif texture == "noise":
        grid, amplitude = rng.uniform(-1, 1, (6, 6)), rng.uniform(6, 12)
        offset = amplitude * cv2.resize(grid, (image_size, image_size), interpolation=cv2.INTER_CUBIC)
    else:
        offset = np.zeros((image_size, image_size))
    return np.clip(np.asarray(COLOURS[name], dtype=np.float64) + offset[..., None], 0, 255)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    variant: int = 0  # seeds exact size, place, texture and caption template

    def __post_init__(self):
        checks = {"shape": (SHAPES + (ZORB,)), "colour": COLOURS, "size": SIZES, "position": POSITIONS,
                  "background": COLOURS}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {list(allowed)}")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} shape on a {self.background} background would be invisible")

    def attributes(self) -> dict:
        """The five named attributes (what captions state and the detector reads back)."""
        attributes = asdict(self)
        del attributes["variant"]
        return attributes

    def layout(self, image_size: int) -> tuple:
        """((x, y) centre, longer side) of the shape's bounding box in pixels."""
        rng = np.random.default_rng([self.variant, 0])
        side = rng.uniform(*SIZES[self.size]) * image_size
        row, column = divmod(POSITIONS.index(self.position), 3)
        x, y = (CELL_CENTRES[i] + rng.uniform(-JITTER, JITTER) for i in (column, row))
        return (x * image_size, y * image_size), side

    def render(self, image_size: int = 256) -> PIL.Image.Image:
        centre, side = self.layout(image_size)
        alpha = shape_alpha(self.shape, centre, side, image_size)[..., None]
        background = background_image(self.background, image_size, np.random.default_rng([self.variant, 1]))
        pixels = background * (1 - alpha) + np.asarray(COLOURS[self.colour], dtype=np.float64) * alpha
        return PIL.Image.fromarray(np.round(pixels).astype(np.uint8))

    def caption(self, template: int = None) -> str:
        """The caption from `TEMPLATES[template]`, or from the template the variant picks."""
        if template is None:
            template = int(np.random.default_rng([self.variant, 2]).integers(len(TEMPLATES)))
        text = TEMPLATES[template].format(size=self.size, colour=self.colour, background=self.background,
                                          shape=ZORB_TOKEN if self.shape == ZORB else self.shape,
                                          where=WHERE[self.position], place=self.position.replace(" ", "-"))
        return re.sub(r"\ba (?=[aeiou])", "an ", text)


def parse_caption(caption: str) -> dict:
    """A caption's five attributes (inverse of `Scene.caption` for every template); ValueError if any is
    missing or ambiguous."""
    text = " " + caption.lower().replace("-", " ") + " "
    backgrounds = re.findall(r"\b(\w+) background\b", text)
    rest = re.sub(r"\b\w+ background\b", " ", text)

    def one(name, values, found):
        if len(found) != 1:
            raise ValueError(f"caption {caption!r} names {len(found)} {name}s {found} (expected one of {values})")
        return found[0]

    def words(values):
        return [v for v in values if re.search(rf"(?<![\w\[]){re.escape(v)}(?![\w\]])", rest)]

    positions = []
    for position in sorted(POSITIONS, key=len, reverse=True):  # "top left" before "top" and "left"
        rest, count = re.subn(rf"\b{position}\b", " ", rest)
        positions += [position] if count else []
    shapes = words(SHAPES) + ([ZORB] if ZORB_TOKEN in rest else [])
    return {"shape": one("shape", SHAPES + (ZORB_TOKEN,), shapes),
            "colour": one("colour", tuple(COLOURS), words(COLOURS)),
            "size": one("size", tuple(SIZES), words(SIZES)),
            "position": one("position", POSITIONS, positions),
            "background": one("background", tuple(COLOURS), [b for b in backgrounds if b in COLOURS])}


def triples(shapes=SHAPES) -> list:
    """Every (shape, colour, background) with background ≠ colour."""
    return [(s, c, b) for s in shapes for c in COLOURS for b in COLOURS if b != c]


def _hash_rank(triple) -> int:
    return int.from_bytes(hashlib.sha256("/".join(triple).encode()).digest()[:8], "big")


HELD_OUT = frozenset(sorted(triples(), key=_hash_rank)[:math.ceil(HELD_OUT_FRACTION * len(triples()))])
TRAIN_TRIPLES = tuple(t for t in triples() if t not in HELD_OUT)
HELD_OUT_TRIPLES = tuple(t for t in triples() if t in HELD_OUT)


def is_held_out(shape: str, colour: str, background: str) -> bool:
    return (shape, colour, background) in HELD_OUT


def _sample(pool, n: int, seed) -> list:
    """n scenes of uniformly drawn triples from `pool`, sizes and positions; `seed`: any numpy seed."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        shape, colour, background = pool[rng.integers(len(pool))]
        size, position = tuple(SIZES)[rng.integers(len(SIZES))], POSITIONS[rng.integers(len(POSITIONS))]
        scenes.append(Scene(shape, colour, size, position, background, int(rng.integers(2 ** 31))))
    return scenes


def sample_train_scenes(n: int, seed) -> list:
    return _sample(TRAIN_TRIPLES, n, seed)


def sample_heldout_scenes(n: int, seed) -> list:
    return _sample(HELD_OUT_TRIPLES, n, seed)


def sample_zorb_scenes(n: int, seed) -> list:
    """Scenes of the reserved zorb shape (any colour on any other background), captioned with '[zorb]'."""
    return _sample(triples((ZORB,)), n, seed)


def prompt_records(scenes, first_seed: int = 0) -> list:
    """[{'prompt', 'seed', 'attributes'}] for evaluation: scene i is asked for with generator seed first_seed+i."""
    return [{"prompt": s.caption(), "seed": first_seed + i, "attributes": s.attributes()}
            for i, s in enumerate(scenes)]
