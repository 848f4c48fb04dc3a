"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vectors import VECTORS


@pytest.fixture(scope="session")
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.fail(f"the shared vectors are missing: expected them at {VECTORS}")
    return VECTORS
