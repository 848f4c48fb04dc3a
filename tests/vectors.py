"""Access to the real-machine vectors in ../shared/vectors (read-only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT.parent / "shared" / "vectors"


def manifest(category: str) -> list[dict[str, Any]]:
    """Entries of ``<category>/MANIFEST.json`` that carry expected values."""
    data = json.loads((VECTORS / category / "MANIFEST.json").read_text())
    return [e for e in data["files"] if e.get("expected")]


def path(category: str, file: str) -> Path:
    return VECTORS / category / file
