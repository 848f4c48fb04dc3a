"""Shared fixtures: where the real-machine vectors lie, and their manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT.parent / "shared" / "vectors"


def manifest(category: str) -> list[dict[str, Any]]:
    """The entries of ``shared/vectors/<category>/MANIFEST.json`` that carry expected values."""
    data = json.loads((VECTORS / category / "MANIFEST.json").read_text())
    return [e for e in data["files"] if e.get("expected")]


@pytest.fixture(scope="session")
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.fail(f"the shared vectors are missing: expected them at {VECTORS}")
    return VECTORS
