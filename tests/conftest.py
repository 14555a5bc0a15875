"""Test-wide settings: offline, deterministic, repo root importable (code runs from the repo root, like upstream)."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared")
REFERENCE = os.path.join(SHARED, "reference")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def reference_dir():
    if not os.path.isdir(REFERENCE):
        pytest.fail(f"reference data not found at {REFERENCE}: the project's shared/ must sit beside the checkout")
    return REFERENCE
