"""Shared fixtures: the vectors, and swtpm (one manufactured TPM per session, a server per test)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.platform.swtpm import SWTPM, ManufacturedTPM, available
from tests.vectors import VECTORS


@pytest.fixture(scope="session")
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.fail(f"the shared vectors are missing: expected them at {VECTORS}")
    return VECTORS


@pytest.fixture(scope="session")
def swtpm_manufactured(tmp_path_factory: pytest.TempPathFactory) -> ManufacturedTPM:
    """A TPM state with sha1, sha256 and sha384 banks, EKs and EK certificates (once)."""
    reason = available()
    if reason:
        pytest.skip(reason)
    return SWTPM.manufacture(tmp_path_factory.mktemp("swtpm-manufactured"))


@pytest.fixture
def swtpm(swtpm_manufactured: ManufacturedTPM, tmp_path: Path) -> Iterator[SWTPM]:
    """A running swtpm on a private copy of the manufactured state, stopped after the test."""
    with SWTPM(swtpm_manufactured, tmp_path / "swtpm") as server:
        yield server


@pytest.fixture(scope="module")
def swtpm_module(
    swtpm_manufactured: ManufacturedTPM, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SWTPM]:
    """One swtpm shared by a module's tests (state carries over between them)."""
    with SWTPM(swtpm_manufactured, tmp_path_factory.mktemp("swtpm-module")) as server:
        yield server
