"""Turn a folder of images with same-named `.txt` captions into webdataset shards (scripts/make_shards.py)."""
import io
import os
import warnings
from dataclasses import dataclass, field

import PIL.Image

from .writer import ShardWriter

EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclass
class FolderReport:
    paths: list = field(default_factory=list)  # shards written
    written: int = 0
    corrupt: list = field(default_factory=list)  # image files that could not be decoded (not written)
    uncaptioned: list = field(default_factory=list)  # images written with an empty caption (no .txt)


def folder_to_shards(folder: str, pattern: str, maxcount: int = 1000) -> FolderReport:
    """Write every image under `folder` (sorted, recursive) with the caption of its `.txt` twin.

    The image bytes are stored unchanged; keys are running numbers and the JSON holds `width`, `height` (so
    upstream's size filters work) and the image's `path` relative to `folder`.
    """
    report = FolderReport()
    with ShardWriter(pattern, maxcount) as writer:
        for path in _images(folder):
            with open(path, "rb") as file:
                data = file.read()
            try:
                with PIL.Image.open(io.BytesIO(data)) as image:
                    image.load()
                    width, height = image.size
            except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as error:
                report.corrupt.append(path)
                warnings.warn(f"skipping {path}: {error}")
                continue
            caption_path = os.path.splitext(path)[0] + ".txt"
            if os.path.exists(caption_path):
                with open(caption_path, encoding="utf-8") as file:
                    caption = file.read().strip()
            else:
                caption = ""
                report.uncaptioned.append(path)
            extension = EXTENSIONS[os.path.splitext(path)[1].lower()]
            writer.write({"__key__": f"{report.written:09d}", extension: data, "txt": caption,
                          "json": {"width": width, "height": height, "path": os.path.relpath(path, folder)}})
            report.written += 1
    report.paths = writer.paths
    if not report.paths:
        raise ValueError(f"no readable images ({', '.join(sorted(EXTENSIONS))}) under {folder!r}")
    return report


def _images(folder):
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in EXTENSIONS:
                yield os.path.join(root, name)
