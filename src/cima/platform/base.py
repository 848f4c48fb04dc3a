"""The platform interface: the CC Trusted API's operations on every platform.

A platform reads registers, the boot event log and the IMA log, extends a
register, and produces a report (a signed quote) bound to a nonce and user
data (DESIGN.md section 4). Implementations: :mod:`cima.platform.tpm`,
:mod:`cima.platform.tdx`, :mod:`cima.platform.software`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cima.eventlog.event import Measurement
from cima.registers import RegisterBank


@dataclass(frozen=True, slots=True)
class PlatformPaths:
    """Where the host's interfaces are; a container with host paths mounted elsewhere sets these."""

    securityfs: Path = Path("/sys/kernel/security")
    ccel_table: Path = Path("/sys/firmware/acpi/tables/CCEL")
    ccel_data: Path = Path("/sys/firmware/acpi/tables/data/CCEL")
    configfs_tsm: Path = Path("/sys/kernel/config/tsm/report")
    tdx_guest_device: Path = Path("/dev/tdx_guest")
    tdx_rtmr_sysfs: Path = Path("/sys/class/misc/tdx_guest/measurements")
    tpm_device: Path = Path("/dev/tpmrm0")

    @property
    def tpm_boot_log(self) -> Path:
        return self.securityfs / "tpm0" / "binary_bios_measurements"

    @property
    def ima_binary(self) -> Path:
        return self.securityfs / "ima" / "binary_runtime_measurements"

    @property
    def ima_ascii(self) -> Path:
        return self.securityfs / "ima" / "ascii_runtime_measurements"


@dataclass(frozen=True, slots=True)
class Report:
    """A signed report and what verifies it.

    ``kind`` is ``"tpm-quote"`` or ``"tdx-quote"``. For a TPM quote ``body`` is
    the TPMS_ATTEST bytes and ``signature`` the TPMT_SIGNATURE bytes; for a TDX
    quote ``body`` is the whole quote and ``signature`` is empty.
    ``verification`` holds what a verifier needs besides the report: the AK
    public key in PEM for a TPM (``ak_pem``), the quoted PCR values.
    """

    kind: str
    body: bytes
    signature: bytes
    nonce: bytes
    user_data: bytes
    verification: dict[str, Any] = field(default_factory=dict)


class Platform(abc.ABC):
    """One measurement platform."""

    #: ``"tpm"``, ``"tdx"`` or ``"software"``.
    name: str

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """What the platform is (vendor, version, banks, registers, key), JSON-able."""

    @abc.abstractmethod
    def default_algorithm(self) -> str:
        """The algorithm of the platform's main bank (``sha384`` on TDX)."""

    @abc.abstractmethod
    def algorithms(self) -> list[str]:
        """The banks the platform has."""

    @abc.abstractmethod
    def register_names(self) -> list[str]:
        """The registers the platform has, canonical names."""

    def measurement_count(self) -> int:
        """How many registers (the CC Trusted API's GetMeasurementCount)."""
        return len(self.register_names())

    @abc.abstractmethod
    def read(self, register: str, algorithm: str) -> bytes:
        """The current value of one register."""

    def read_all(self, algorithm: str | None = None) -> RegisterBank:
        """Every register in one bank (all banks when None)."""
        bank = RegisterBank()
        for alg in [algorithm] if algorithm else self.algorithms():
            for reg in self.register_names():
                bank.set(reg, alg, self.read(reg, alg))
        return bank

    @abc.abstractmethod
    def extend(self, register: str, algorithm: str, digest: bytes) -> None:
        """Extend one register with a digest."""

    @abc.abstractmethod
    def boot_log(self) -> list[Measurement] | None:
        """The firmware/boot event log's records, or None where the platform has none."""

    @abc.abstractmethod
    def report(
        self, nonce: bytes, user_data: bytes = b"", registers: list[str] | None = None
    ) -> Report:
        """A signed report that binds ``nonce`` and ``user_data`` (DESIGN.md section 4)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release handles and sessions."""

    def __enter__(self) -> Platform:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
