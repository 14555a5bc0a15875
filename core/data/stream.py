"""One rank's batches for one epoch, in an order that depends only on (seed, epoch, rank, worker).

Shards are shuffled per epoch with the seed, split between ranks (`rank::world_size`) and then between
DataLoader workers, so every shard is read by exactly one reader. Each reader shuffles samples in a seeded
buffer, and every random choice about a sample (caption dropout, bucket, crop) comes from a generator seeded
by the sample's identity, never from global state. A reader can therefore replay its first N batches as
placeholders without resizing or cropping them, which is how `ResumableLoader` resumes mid-epoch.
"""
import hashlib
import json
import random
import warnings
from collections import Counter

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from .errors import CorruptSample, CorruptSampleWarning


def derive_seed(*parts) -> int:
    """A seed from any parts, equal in every process (Python's `hash` is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def shuffled(items, size: int, rng: random.Random):
    """Stream shuffle: each incoming item replaces a random one of `size` buffered items, which is yielded."""
    if size < 1:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def read_shard(url: str, on_error):
    """The samples of one tar shard (any URL webdataset's gopen opens); the stream is closed even when the
    reader stops early. Read errors go to `on_error`, which returns True to carry on, as webdataset's handlers."""
    try:
        stream = gopen(url)
    except (OSError, ValueError) as error:
        on_error(error)
        return
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=on_error),
                                 handler=on_error)
    finally:
        try:
            stream.close()
        except OSError as error:  # a `pipe:` command that failed
            on_error(error)


def collate(samples: list) -> dict:
    """Stack tensors, keep everything else as lists."""
    return {k: torch.stack([s[k] for s in samples]) if torch.is_tensor(samples[0][k]) else [s[k] for s in samples]
            for k in samples[0]}


class ShardStream(IterableDataset):
    """Yields `(worker, kind, payload)`: kind 'batch' (a collated dict), 'skipped' (a replayed batch, None)
    or, last, 'stats' (this reader's counters for the epoch)."""

    def __init__(self, shards, decoder, batch_size, *, filters=(), rank=0, world_size=1, seed=0,
                 shuffle_buffer=690, drop_last=True):
        self.shards, self.decoder, self.batch_size = list(shards), decoder, batch_size
        self.filters, self.rank, self.world_size, self.seed = tuple(filters), rank, world_size, seed
        self.shuffle_buffer, self.drop_last = shuffle_buffer, drop_last
        self.epoch = 0
        self.skip = ()  # per worker: how many leading batches to replay as placeholders

    def rank_shards(self, epoch: int) -> list:
        """Indices into `shards` that this rank reads in `epoch`."""
        order = list(range(len(self.shards)))
        random.Random(derive_seed(self.seed, epoch, "shards")).shuffle(order)
        return order[self.rank::self.world_size]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stats = Counter()
        skip = self.skip[worker] if self.skip else 0
        shards = self.rank_shards(self.epoch)[worker::workers]
        for index, (size, members) in enumerate(self._groups(shards, worker, stats)):
            stats["batches"] += 1
            if index < skip:
                yield worker, "skipped", None
            else:
                yield worker, "batch", collate([self.decoder.finish(item, size, rng) for rng, item in members])
        yield worker, "stats", dict(stats)

    def _groups(self, shards, worker, stats):
        """Planned samples gathered into full groups of one bucket; leftovers are dropped unless not drop_last."""
        pending = {}
        for group, rng, item in self._planned(shards, worker, stats):
            members = pending.setdefault(group, [])
            members.append((rng, item))
            if len(members) == self.batch_size:
                yield group, pending.pop(group)
        for group, members in pending.items():
            if self.drop_last:
                stats["leftover"] += len(members)
            else:
                yield group, members

    def _planned(self, shards, worker, stats):
        order = random.Random(derive_seed(self.seed, self.epoch, self.rank, worker, "samples"))
        for sample in shuffled(self._samples(shards, stats), self.shuffle_buffer, order):
            # the shard's index, not its URL, so that moving the data keeps every random choice
            rng = random.Random(derive_seed(self.seed, self.epoch, sample["__shard__"], sample["__key__"]))
            try:
                group, item = self.decoder.plan(sample, rng)
            except CorruptSample as error:
                self._corrupt(sample, error, stats)
                continue
            yield group, rng, item

    def _samples(self, shards, stats):
        """Raw samples of the shards with their JSON parsed, after the dataset filters."""
        def on_tar_error(error):
            stats["tar_errors"] += 1
            warnings.warn(f"skipping unreadable shard data: {error!r}", CorruptSampleWarning, stacklevel=2)
            return True

        for index in shards:
            for sample in read_shard(self.shards[index], on_tar_error):
                sample["__shard__"] = index
                stats["samples"] += 1
                try:
                    sample["json"] = json.loads(sample["json"]) if "json" in sample else {}
                except ValueError as error:
                    self._corrupt(sample, CorruptSample(f"bad json: {error}"), stats)
                    continue
                if not all(keep(sample["json"]) for keep in self.filters):
                    stats["filtered"] += 1
                    continue
                yield sample

    def _corrupt(self, sample, error, stats):
        stats["corrupt"] += 1
        warnings.warn(f"skipped corrupt sample {sample['__key__']!r} of {sample['__url__']}: {error} "
                      f"({stats['corrupt']} corrupt samples skipped so far in epoch {self.epoch} by this reader)",
                      CorruptSampleWarning, stacklevel=2)
