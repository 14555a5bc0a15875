"""Training data: webdataset shards → resumable batches grouped by aspect-ratio bucket (see loader.py)."""
from .buckets import UPSTREAM_RATIOS, Buckets
from .cache import cache_to_shards
from .captions import CAPTION_GETTERS, parse_captions_getter
from .crop import SmartCrop
from .errors import CorruptSampleWarning, EmptyDatasetError
from .filters import parse_filters
from .folder import folder_to_shards
from .loader import ResumableLoader, build_cached_dataloader, build_dataloader
from .sources import resolve_shards
from .writer import ShardWriter

__all__ = ["UPSTREAM_RATIOS", "Buckets", "cache_to_shards", "CAPTION_GETTERS", "parse_captions_getter", "SmartCrop",
           "CorruptSampleWarning", "EmptyDatasetError", "parse_filters", "folder_to_shards", "ResumableLoader",
           "build_cached_dataloader", "build_dataloader", "resolve_shards", "ShardWriter"]
