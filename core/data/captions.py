"""Named caption getters for `captions_getter: [entry, name]`.

Upstream's YAML gave the getter as Python to `eval` (`['txt', identity]`, `['json', captions_getter]`);
here the name picks one of the functions below. A getter receives the sample's entry (bytes, or the parsed
dict for `json`) and the sample's random generator, and returns the caption.
"""
import json
import random
from dataclasses import dataclass

from .errors import CorruptSample

# upstream's `captions_getter` shows the original caption instead of the (recaptioned) `caption` this often
P_ORIGINAL_CAPTION = 0.05


def identity(value, rng: random.Random) -> str:
    """The entry's text, e.g. a `.txt` caption."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {type(value).__name__}")
    return value.strip()


def json_caption(value: dict, rng: random.Random) -> str:
    """The `caption` field of the sample's JSON (img2dataset's layout)."""
    return identity(value["caption"], rng)


def captions_getter(value: dict, rng: random.Random) -> str:
    """Upstream's `captions_getter`: JSON `caption`, or with p=0.05 the non-empty `og_caption` stored as JSON
    text in `old_caption`."""
    if "old_caption" in value and rng.random() < P_ORIGINAL_CAPTION:
        original = identity(json.loads(value["old_caption"])["og_caption"], rng)
        if original:
            return original
    return json_caption(value, rng)


CAPTION_GETTERS = {"identity": identity, "json_caption": json_caption, "captions_getter": captions_getter}


@dataclass(frozen=True)
class CaptionGetter:
    """Reads the caption from the sample entry `entry` with the getter `name`."""
    entry: str = "txt"
    name: str = "identity"

    def __call__(self, sample: dict, rng: random.Random) -> str:
        if self.entry not in sample:
            raise CorruptSample(f"no '{self.entry}' entry for the caption")
        try:
            return CAPTION_GETTERS[self.name](sample[self.entry], rng)
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptSample(f"caption getter {self.name!r} failed on '{self.entry}': {error!r}") from error


def parse_captions_getter(spec) -> CaptionGetter:
    """`captions_getter` config (None → `['txt', 'identity']`) → a `CaptionGetter`."""
    if spec is None:
        return CaptionGetter()
    if not (isinstance(spec, (list, tuple)) and len(spec) == 2 and all(isinstance(s, str) for s in spec)):
        raise ValueError(f"captions_getter {spec!r}: expected [entry, getter name], e.g. ['txt', 'identity']")
    entry, name = spec
    if name not in CAPTION_GETTERS:
        raise ValueError(f"captions_getter {spec!r}: unknown getter {name!r}; known: {sorted(CAPTION_GETTERS)}")
    return CaptionGetter(entry, name)
