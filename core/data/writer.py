"""Write samples to numbered webdataset tar shards, encoding each entry by its extension."""
import io
import json
import os

import numpy as np
import PIL.Image
import torch
from webdataset.writer import TarWriter

PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def encode_entry(name: str, value) -> bytes:
    """bytes as they are; str as UTF-8; `json` entries from dicts/lists; `*.npy` from tensors or arrays (bf16
    is stored as float32, which numpy can hold); PIL images in the format their extension names."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if name == "json":
        return json.dumps(value).encode("utf-8")
    if name.endswith("npy"):
        if torch.is_tensor(value):
            value = value.detach().cpu()
            value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        stream = io.BytesIO()
        np.save(stream, np.asarray(value), allow_pickle=False)
        return stream.getvalue()
    if isinstance(value, PIL.Image.Image) and name in PIL_FORMATS:
        stream = io.BytesIO()
        value.save(stream, format=PIL_FORMATS[name])
        return stream.getvalue()
    raise TypeError(f"cannot encode entry {name!r} of type {type(value).__name__}")


class ShardWriter:
    """Writes sample dicts ({'__key__': ..., 'jpg': ..., 'txt': ..., 'json': ...}) to `pattern % index`
    (e.g. 'out/shard-%06d.tar'), starting a new shard every `maxcount` samples. Use as a context manager;
    `paths` lists the shards written."""

    def __init__(self, pattern: str, maxcount: int = 1000):
        try:
            distinct = pattern % 0 != pattern % 1
        except TypeError:
            distinct = False
        if not distinct:
            raise ValueError(f"shard pattern {pattern!r} needs a %d-style field for the shard index")
        self.pattern, self.maxcount = pattern, maxcount
        self.paths, self.count, self._tar = [], 0, None

    def write(self, sample: dict):
        if "__key__" not in sample or "." in sample["__key__"]:
            raise ValueError(f"a sample needs a '__key__' without dots, got {sample.get('__key__')!r}")
        if self._tar is None or self.count == self.maxcount:
            self._next_shard()
        self._tar.write({name: value if name == "__key__" else encode_entry(name, value)
                         for name, value in sample.items()})
        self.count += 1

    def _next_shard(self):
        self.close()
        path = self.pattern % len(self.paths)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._tar = TarWriter(path, encoder=False, mtime=0)  # fixed mtime: same samples, same bytes
        self.paths.append(path)
        self.count = 0

    def close(self):
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
