"""Which measurement platform this machine offers.

``auto`` looks, in order, for:

1. TDX: configfs-tsm (``PlatformPaths.configfs_tsm``) whose provider is
   ``tdx_guest``, or the ``/dev/tdx_guest`` device;
2. a TPM: the TCTI given by the caller, else the ``TPM2TOOLS_TCTI``
   environment variable (the tpm2-tools convention), else the kernel's
   resource manager device ``/dev/tpmrm0``.

Nothing found is a :class:`~cima.errors.PlatformError` that lists every place
looked at and what was there. ``prefer`` forces one platform: ``tdx``,
``tpm`` or ``software`` (its state directory keeps registers and key across
runs; without one they live only as long as the object). The software
platform is never picked automatically: it proves nothing about the machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cima.errors import PlatformError
from cima.platform.base import Platform, PlatformPaths
from cima.platform.tdx import TDX_PROVIDER, ConfigfsItems, TDXPlatform, configfs_provider

__all__ = ["PLATFORMS", "Probe", "detect", "probe"]

PLATFORMS = ("auto", "tdx", "tpm", "software")
TCTI_ENV = "TPM2TOOLS_TCTI"


@dataclass(frozen=True, slots=True)
class Probe:
    """What detection found: the platform it picks (None: nothing) and everything it looked at."""

    platform: str | None
    tcti: str | None
    reason: str
    looked: tuple[str, ...]


def _probe_tdx(
    paths: PlatformPaths, configfs: ConfigfsItems | None
) -> tuple[str | None, list[str]]:
    looked: list[str] = []
    root = paths.configfs_tsm
    if root.is_dir():
        try:
            provider = configfs_provider(root, configfs)
        except PlatformError as e:
            looked.append(f"configfs-tsm {root}: present, no provider ({e})")
        else:
            if provider == TDX_PROVIDER:
                return f"configfs-tsm {root} with provider {provider}", looked
            looked.append(f"configfs-tsm {root}: provider {provider!r}, not {TDX_PROVIDER}")
    else:
        looked.append(f"configfs-tsm {root}: missing")
    device = paths.tdx_guest_device
    if device.exists():
        return f"TDX guest device {device}", looked
    looked.append(f"TDX guest device {device}: missing")
    return None, looked


def _probe_tpm(
    paths: PlatformPaths, tcti: str | None, environ: Mapping[str, str]
) -> tuple[str | None, str | None, list[str]]:
    looked: list[str] = []
    if tcti:
        return tcti, f"TCTI {tcti} (given)", looked
    looked.append("TCTI: none given")
    env = environ.get(TCTI_ENV, "").strip()
    if env:
        return env, f"TCTI {env} (from {TCTI_ENV})", looked
    looked.append(f"{TCTI_ENV}: unset")
    device = paths.tpm_device
    if device.exists():
        return f"device:{device}", f"TPM device {device}", looked
    looked.append(f"TPM device {device}: missing")
    return None, None, looked


def probe(
    paths: PlatformPaths = PlatformPaths(),  # noqa: B008 - frozen, immutable default
    *,
    tcti: str | None = None,
    environ: Mapping[str, str] | None = None,
    configfs: ConfigfsItems | None = None,
) -> Probe:
    """Look for TDX, then for a TPM; say which was found and what was looked at."""
    env = os.environ if environ is None else environ
    tdx_reason, looked = _probe_tdx(paths, configfs)
    if tdx_reason is not None:
        return Probe("tdx", None, tdx_reason, tuple(looked))
    found_tcti, tpm_reason, tpm_looked = _probe_tpm(paths, tcti, env)
    looked += tpm_looked
    if found_tcti is not None and tpm_reason is not None:
        return Probe("tpm", found_tcti, tpm_reason, tuple(looked))
    return Probe(None, None, "no TDX and no TPM interface found", tuple(looked))


def _tpm(tcti: str, paths: PlatformPaths) -> Platform:
    from cima.platform.tpm import TPMPlatform

    return TPMPlatform(tcti, paths=paths)


def detect(
    paths: PlatformPaths = PlatformPaths(),  # noqa: B008 - frozen, immutable default
    *,
    tcti: str | None = None,
    prefer: str = "auto",
    state_dir: Path | str | None = None,
    configfs: ConfigfsItems | None = None,
    environ: Mapping[str, str] | None = None,
) -> Platform:
    """The platform to use: the one ``prefer`` names, or the one found (see the module doc).

    ``state_dir`` is the software platform's state directory; ``configfs``
    and ``environ`` replace the configfs entry operations and the process
    environment (for tests and for containers with host paths elsewhere).
    """
    choice = prefer.strip().lower()
    if choice not in PLATFORMS:
        raise PlatformError(f"unknown platform {prefer!r} (expected one of {', '.join(PLATFORMS)})")
    if choice == "software":
        from cima.platform.software import SoftwarePlatform

        return SoftwarePlatform(None if state_dir is None else Path(state_dir))
    if choice == "tdx":
        return TDXPlatform(paths, configfs=configfs)
    if choice == "tpm":
        env = os.environ if environ is None else environ
        found, _, _ = _probe_tpm(paths, tcti, env)
        return _tpm(found or f"device:{paths.tpm_device}", paths)
    result = probe(paths, tcti=tcti, environ=environ, configfs=configfs)
    if result.platform == "tdx":
        return TDXPlatform(paths, configfs=configfs)
    if result.platform == "tpm" and result.tcti is not None:
        return _tpm(result.tcti, paths)
    raise PlatformError(
        "no attestation platform found (use --platform software for a demonstration): "
        + "; ".join(result.looked)
    )
