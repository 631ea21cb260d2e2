"""Access to the shared real vectors in ``../shared/vectors`` (never copied into this repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("EECP_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
VECTORS = SHARED / "vectors"


def vector(relpath: str) -> Path:
    """Path of a shared vector, or skip the test with a clear reason when ../shared is absent."""
    path = VECTORS / relpath
    if not path.exists():
        pytest.skip(f"shared vector {relpath} not found under {VECTORS} (../shared absent)")
    return path
