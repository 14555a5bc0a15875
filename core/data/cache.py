"""Cached encoder outputs: a fine-tune can read the frozen encoders' tensors (EfficientNet latents, text
embeddings, ...) from shards instead of running the encoders on images every step.

Shard layout per sample: `<key>.<name>.npy` for each cached tensor (no batch dimension), `<key>.txt` with the
caption and `<key>.json` with the source sample's key.
"""
import io
import random
from dataclasses import dataclass

import numpy as np
import torch

from .captions import CaptionGetter
from .errors import CorruptSample
from .writer import ShardWriter


def cache_to_shards(batches, encode, pattern: str, maxcount: int = 1000) -> list:
    """Run `encode(batch) -> {name: B×... tensor}` (the trainer's frozen encoders) on every batch and write
    one sample per batch row; returns the shard paths. Feed one pass of an image loader, e.g.
    `build_dataloader(..., shuffle_buffer=0, drop_last=False).iter_epoch()`, without caption dropout."""
    with ShardWriter(pattern, maxcount) as writer:
        index = 0
        for batch in batches:
            with torch.no_grad():
                tensors = encode(batch)
            bad = [name for name in tensors if "." in name or "/" in name]
            if bad:
                raise ValueError(f"cached tensor names may not contain '.' or '/': {bad}")
            for row, (key, caption) in enumerate(zip(batch["keys"], batch["captions"])):
                sample = {"__key__": f"{index:09d}", "txt": caption, "json": {"key": key}}
                sample.update({f"{name}.npy": value[row] for name, value in tensors.items()})
                writer.write(sample)
                index += 1
    return writer.paths


@dataclass(frozen=True)
class CachedDecoder:
    """Cached samples → {name: tensor, 'captions': str, 'keys': str}, grouped by the tensors' shapes
    (the stream's `plan`/`finish` protocol; everything happens in `plan`)."""
    names: tuple
    caption_dropout: float = 0.0
    empty: dict = None  # name → tensor used when the caption is dropped

    def __post_init__(self):
        unknown = set(self.empty or {}) - set(self.names)
        if unknown:
            raise ValueError(f"empty embeddings given for {sorted(unknown)}, which are not read ({self.names})")

    def plan(self, sample: dict, rng: random.Random):
        item = {name: self._tensor(sample, name) for name in self.names}
        caption = CaptionGetter()(sample, rng)
        if rng.random() < self.caption_dropout:
            caption = ""
            item.update({name: torch.as_tensor(value) for name, value in (self.empty or {}).items()})
        item.update(captions=caption, keys=sample["json"].get("key", sample["__key__"]))
        return tuple(tuple(item[name].shape) for name in self.names), item

    def finish(self, item: dict, group: tuple, rng: random.Random) -> dict:
        return item

    @staticmethod
    def _tensor(sample, name):
        entry = f"{name}.npy"
        if entry not in sample:
            raise CorruptSample(f"no cached tensor '{entry}'")
        try:
            return torch.from_numpy(np.load(io.BytesIO(sample[entry]), allow_pickle=False))
        except ValueError as error:
            raise CorruptSample(f"cannot read '{entry}': {error}") from error
