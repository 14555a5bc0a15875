"""Shared infrastructure: training (WarpCore and its parts), conditioning, weights and data.

`from core import WarpCore` works as in upstream; WarpCore is imported on first use, so that `import core.weights`
or `import core.data` does not load the training machinery.
"""


def __getattr__(name):
    if name == "WarpCore":
        from .warpcore import WarpCore
        return WarpCore
    raise AttributeError(f"module 'core' has no attribute {name!r}")
