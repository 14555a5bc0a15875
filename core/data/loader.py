"""The trainer's entry point: an endless, resumable iterator of batches from webdataset shards.

Typical use in a trainer (batch_size is per rank and per accumulation step):

    loader = build_dataloader(config.webdataset_path, batch_size, image_size=config.image_size,
                              multi_aspect_ratio=config.multi_aspect_ratio, captions_getter=config.captions_getter,
                              dataset_filters=config.dataset_filters, rank=rank, world_size=world_size, seed=seed)
    loader.load_state_dict(saved["data"][rank])   # on resume, this rank's saved position
    for batch in loader: ...                      # batch['images'] B×3×h×w in [0, 1], batch['captions']
    state = loader.state_dict()                   # gather every rank's state when checkpointing
"""
from collections import Counter

import torch
from torch.utils.data import DataLoader

from .buckets import Buckets
from .cache import CachedDecoder
from .captions import parse_captions_getter
from .crop import make_crop
from .errors import EmptyDatasetError
from .filters import parse_filters
from .images import ImageDecoder
from .sources import resolve_shards
from .stream import ShardStream


class ResumableLoader:
    """Batches of one rank, epoch after epoch, with a position that survives a restart.

    The position is (epoch, batches consumed from each DataLoader worker this epoch). Because the order
    depends only on the seed, restoring it and iterating again gives the batches an uninterrupted run would
    have seen next: the consumed ones are replayed as placeholders (read and decoded, not resized or sent).
    """

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool = False):
        self.stream, self.pin_memory = stream, pin_memory
        # a worker without shards would only idle
        self.num_workers = min(num_workers, len(stream.rank_shards(0)))
        self.epoch = 0
        self.worker_batches = [0] * max(1, self.num_workers)
        self.stats = Counter()  # samples, filtered, corrupt, batches, ... summed over finished readers

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "worker_batches": list(self.worker_batches), "seed": self.stream.seed,
                "rank": self.stream.rank, "world_size": self.stream.world_size}

    def load_state_dict(self, state: dict):
        """Restore a position from `state_dict()` of the same rank; iterate anew afterwards."""
        mine = {"seed": self.stream.seed, "rank": self.stream.rank, "world_size": self.stream.world_size,
                "workers": len(self.worker_batches)}
        theirs = {"seed": state["seed"], "rank": state["rank"], "world_size": state["world_size"],
                  "workers": len(state["worker_batches"])}
        if mine != theirs:
            raise ValueError(f"data position saved with {theirs} cannot resume a loader with {mine}: "
                             "the sample order depends on all of these")
        self.epoch, self.worker_batches = state["epoch"], list(state["worker_batches"])

    def __iter__(self):
        while True:
            yield from self.iter_epoch()

    def iter_epoch(self):
        """The rest of the current epoch; the position moves with every batch handed out."""
        self.stream.epoch, self.stream.skip = self.epoch, tuple(self.worker_batches)
        to_skip, produced, epoch_stats = sum(self.worker_batches), 0, Counter()
        # its own generator, so that starting workers does not draw from the trainer's global RNG
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            generator=torch.Generator().manual_seed(self.stream.seed))
        for worker, kind, payload in loader:
            if kind == "stats":
                epoch_stats.update(payload)
                continue
            produced += 1
            if kind == "skipped":
                to_skip -= 1
                continue
            if to_skip > 0:
                raise RuntimeError("the data order differs from the saved position's (shards or settings changed?)")
            self.worker_batches[worker] += 1
            yield payload
        self.stats.update(epoch_stats)
        if produced == 0:
            raise EmptyDatasetError(
                f"epoch {self.epoch} of rank {self.stream.rank} gave no batch from {len(self.stream.shards)} shard(s): "
                f"{dict(epoch_stats)}; check webdataset_path and dataset_filters, and that there are at least "
                f"batch_size usable samples per bucket and DataLoader worker")
        self.epoch += 1
        self.worker_batches = [0] * len(self.worker_batches)


def build_dataloader(webdataset_path, batch_size: int, *, image_size: int, multi_aspect_ratio=None,
                     size_multiple: int = 32, captions_getter=None, dataset_filters=None,
                     caption_dropout: float = 0.0, p_random_ratio: float = 0.0, crop: str = "smart",
                     saliency_model=None, shuffle_buffer: int = 690, drop_last: bool = True,
                     num_workers: int = 2, pin_memory: bool = False, rank: int = 0, world_size: int = 1,
                     seed: int = 0) -> ResumableLoader:
    """Image batches {'images': B×3×h×w in [0, 1], 'captions': [str], 'keys': [str]}, all of one bucket.

    Config values go in as upstream spells them: `multi_aspect_ratio` (None → square `image_size` crops,
    upstream's list: buckets.UPSTREAM_RATIOS), `captions_getter` (`['txt', 'identity']`),
    `dataset_filters` (`[['width', 'lambda w: w >= 512'], ...]`). `p_random_ratio` is upstream's
    `bucketeer_random_ratio` (0.05 there); `caption_dropout` replaces captions by "" (upstream: 0.05,
    applied in get_conditions — apply it in one place only).
    """
    decoder = ImageDecoder(Buckets.build(image_size, multi_aspect_ratio, size_multiple),
                           parse_captions_getter(captions_getter), make_crop(crop, saliency_model),
                           caption_dropout=caption_dropout, p_random_ratio=p_random_ratio)
    return _loader(webdataset_path, decoder, batch_size, parse_filters(dataset_filters), shuffle_buffer, drop_last,
                   num_workers, pin_memory, rank, world_size, seed)


def build_cached_dataloader(webdataset_path, batch_size: int, *, tensors, caption_dropout: float = 0.0,
                            empty=None, shuffle_buffer: int = 690, drop_last: bool = True, num_workers: int = 2,
                            pin_memory: bool = False, rank: int = 0, world_size: int = 1,
                            seed: int = 0) -> ResumableLoader:
    """Batches of tensors cached by `cache.cache_to_shards`: {name: B×... for name in tensors, 'captions',
    'keys'}, grouped by tensor shapes. A dropped caption becomes "" and the tensors named in `empty`
    (name → tensor without batch dimension, e.g. the text encoder's output for "") are replaced."""
    decoder = CachedDecoder(tuple(tensors), caption_dropout, empty)
    return _loader(webdataset_path, decoder, batch_size, (), shuffle_buffer, drop_last,
                   num_workers, pin_memory, rank, world_size, seed)


def _loader(webdataset_path, decoder, batch_size, filters, shuffle_buffer, drop_last, num_workers, pin_memory,
            rank, world_size, seed):
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    shards = resolve_shards(webdataset_path)
    if len(shards) < world_size:
        raise ValueError(f"{len(shards)} shard(s) cannot be split between {world_size} ranks: every rank needs "
                         "at least one shard of its own (write more, smaller shards)")
    stream = ShardStream(shards, decoder, batch_size, filters=filters, rank=rank, world_size=world_size, seed=seed,
                         shuffle_buffer=shuffle_buffer, drop_last=drop_last)
    return ResumableLoader(stream, num_workers, pin_memory)
