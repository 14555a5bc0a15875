"""Errors and warnings of the data pipeline, shared by the sample decoders, the stream and the loader."""


class CorruptSample(Exception):
    """A sample that cannot be decoded: the stream skips and counts it rather than stopping a long run."""


class CorruptSampleWarning(UserWarning):
    """Issued for every skipped sample with the running count, so that a rotten shard shows in the logs."""


class EmptyDatasetError(RuntimeError):
    """A whole epoch gave no batch: a wrong path, filters that reject everything, or fewer samples than a batch."""
