"""Platform detection with every interface path in a temporary directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cima.errors import PlatformError
from cima.platform.base import PlatformPaths
from cima.platform.detect import detect, probe
from cima.platform.tdx import TDXPlatform
from tests import vectors
from tests.platform.fake_tsm import FakeTSM, tmp_platform_paths
from tests.platform.swtpm import SWTPM

NO_ENV: dict[str, str] = {}


@pytest.fixture
def paths(tmp_path: Path) -> PlatformPaths:
    return tmp_platform_paths(tmp_path)


def _template() -> bytes:
    return vectors.path("tdx-quote", "go-tdx-guest/tdx_prod_quote_SPR_E4.dat").read_bytes()


@pytest.fixture
def tdx_tsm(paths: PlatformPaths) -> Iterator[FakeTSM]:
    with FakeTSM(paths.configfs_tsm, _template()) as fake:
        yield fake


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_configfs_tsm_with_the_tdx_provider_is_tdx(paths: PlatformPaths, tdx_tsm: FakeTSM) -> None:
    _touch(paths.tpm_device)  # TDX is preferred over a TPM (a vTPM) on the same machine
    result = probe(paths, environ=NO_ENV, configfs=tdx_tsm)
    assert (result.platform, result.tcti) == ("tdx", None)
    assert str(paths.configfs_tsm) in result.reason
    platform = detect(paths, environ=NO_ENV, configfs=tdx_tsm)
    assert isinstance(platform, TDXPlatform)
    assert platform.paths == paths
    assert list(paths.configfs_tsm.iterdir()) == []  # the probe's entry is gone


def test_the_legacy_device_alone_is_tdx(paths: PlatformPaths) -> None:
    _touch(paths.tdx_guest_device)
    result = probe(paths, environ=NO_ENV)
    assert result.platform == "tdx"
    assert str(paths.tdx_guest_device) in result.reason
    assert f"configfs-tsm {paths.configfs_tsm}: missing" in result.looked


def test_another_provider_falls_through_to_the_tpm(paths: PlatformPaths) -> None:
    _touch(paths.tpm_device)
    with FakeTSM(paths.configfs_tsm, _template(), provider="sev_guest") as fake:
        result = probe(paths, environ=NO_ENV, configfs=fake)
    assert (result.platform, result.tcti) == ("tpm", f"device:{paths.tpm_device}")
    assert any("'sev_guest'" in line for line in result.looked)


def test_configfs_without_a_provider_is_reported(paths: PlatformPaths) -> None:
    with FakeTSM(paths.configfs_tsm, _template(), provider=None) as fake:
        result = probe(paths, environ=NO_ENV, configfs=fake)
    assert result.platform is None
    assert any("no provider" in line and "ENXIO" in line for line in result.looked)


def test_an_explicit_tcti_comes_first_among_tpms(paths: PlatformPaths) -> None:
    _touch(paths.tpm_device)
    env = {"TPM2TOOLS_TCTI": "mssim:port=1"}
    result = probe(paths, tcti="swtpm:port=2321", environ=env)
    assert (result.platform, result.tcti) == ("tpm", "swtpm:port=2321")


def test_the_tcti_environment_variable_comes_before_the_device(paths: PlatformPaths) -> None:
    _touch(paths.tpm_device)
    result = probe(paths, environ={"TPM2TOOLS_TCTI": "swtpm:port=2321"})
    assert (result.platform, result.tcti) == ("tpm", "swtpm:port=2321")
    assert "TPM2TOOLS_TCTI" in result.reason


def test_the_tpm_device(paths: PlatformPaths) -> None:
    _touch(paths.tpm_device)
    result = probe(paths, environ={"TPM2TOOLS_TCTI": "  "})
    assert (result.platform, result.tcti) == ("tpm", f"device:{paths.tpm_device}")


def test_nothing_found_names_every_place_looked_at(paths: PlatformPaths) -> None:
    with pytest.raises(PlatformError) as err:
        detect(paths, environ=NO_ENV)
    message = str(err.value)
    for expected in (
        f"configfs-tsm {paths.configfs_tsm}: missing",
        f"TDX guest device {paths.tdx_guest_device}: missing",
        "TCTI: none given",
        "TPM2TOOLS_TCTI: unset",
        f"TPM device {paths.tpm_device}: missing",
    ):
        assert expected in message


def test_prefer_forces_tdx(paths: PlatformPaths) -> None:
    platform = detect(paths, prefer="tdx", environ=NO_ENV)
    assert isinstance(platform, TDXPlatform)


def test_prefer_software_uses_the_state_directory(tmp_path: Path, paths: PlatformPaths) -> None:
    from cima.platform.software import SoftwarePlatform

    platform = detect(paths, prefer="software", state_dir=tmp_path / "state")
    assert isinstance(platform, SoftwarePlatform)
    assert platform.state_dir == tmp_path / "state"
    platform.close()


def test_an_unknown_preference_is_refused(paths: PlatformPaths) -> None:
    with pytest.raises(PlatformError, match="unknown platform 'sgx'"):
        detect(paths, prefer="sgx")


def test_auto_reaches_a_tpm_through_the_given_tcti(paths: PlatformPaths, swtpm: SWTPM) -> None:
    platform = detect(paths, tcti=swtpm.tcti, environ=NO_ENV)
    try:
        assert platform.name == "tpm"
        assert "sha256" in platform.algorithms()
    finally:
        platform.close()


def test_prefer_tpm_takes_the_tcti_from_the_environment(paths: PlatformPaths, swtpm: SWTPM) -> None:
    platform = detect(paths, prefer="tpm", environ={"TPM2TOOLS_TCTI": swtpm.tcti})
    try:
        assert platform.name == "tpm"
    finally:
        platform.close()
