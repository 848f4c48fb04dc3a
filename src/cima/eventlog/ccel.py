"""The ACPI CCEL table and the confidential-computing event log it locates.

A TD's firmware (Intel TDX; Hygon CSV uses the same layout) measures into the
TD's measurement registers and logs what it measured in the CC event log. The
ACPI ``CCEL`` table (ACPI 6.5 section 5.2.34, "CC Event Log ACPI Table") tells
the OS where the log area is::

    ACPI header (36 bytes): Signature "CCEL", Length u32, Revision u8, Checksum u8,
        OEMID[6], OEM Table ID[8], OEM Revision u32, Creator ID[4], Creator Revision u32
    CC Type u8 (1 = AMD SEV, 2 = Intel TDX), CC Subtype u8, Reserved u16,
    Log Area Minimum Length (LAML) u64, Log Area Start Address (LASA) u64

Linux exposes the table as ``/sys/firmware/acpi/tables/CCEL`` and the log
area as ``/sys/firmware/acpi/tables/data/CCEL``.

The log has the crypto-agile TCG PC Client layout (:mod:`cima.eventlog.tcg`:
a Spec ID Event03 header, then TCG_PCR_EVENT2 records) with one difference:
a record's index is a CC measurement-register index (UEFI CC measurement
protocol: 0 = MRTD, 1..4 = RTMR0..RTMR3), named here by
:func:`cima.registers.cc_name`. The unused part of the log area after the last
record is 0xFF (or 0x00); it is kept so that the log re-encodes exactly.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Self

from cima.errors import ParseError, TruncatedError, UnsupportedFormatError
from cima.eventlog import tcg
from cima.eventlog.tcg import TCGEventLog
from cima.registers import cc_name

CCEL_SIGNATURE = b"CCEL"
CCEL_TABLE_LENGTH = 56

#: CC Type values of the CCEL table.
CC_TYPES = {1: "AMD SEV", 2: "Intel TDX"}

_TABLE = struct.Struct("<4sIBB6s8sI4sIBBHQQ")


@dataclass(frozen=True, slots=True)
class CCELTable:
    """The ACPI CCEL table (56 bytes, revision 1)."""

    signature: str
    length: int
    revision: int
    checksum: int
    oem_id: str
    oem_table_id: str
    oem_revision: int
    creator_id: bytes
    creator_revision: int
    cc_type: int
    cc_subtype: int
    reserved: bytes
    log_area_minimum_length: int
    log_area_start_address: int

    @property
    def checksum_valid(self) -> bool:
        """ACPI rule: all bytes of the table, the checksum included, sum to 0 mod 256."""
        return sum(self.to_bytes()) % 256 == 0

    @property
    def cc_type_name(self) -> str | None:
        return CC_TYPES.get(self.cc_type)

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str | None = None) -> Self:
        """Decode the table; its signature must be CCEL and its length 56 bytes."""
        return tcg.with_source(source, lambda: cls._decode(bytes(data)))

    @classmethod
    def _decode(cls, data: bytes) -> Self:
        if len(data) < 8:
            raise TruncatedError(
                f"CCEL table needs {CCEL_TABLE_LENGTH} bytes, {len(data)} given", offset=0
            )
        if data[:4] != CCEL_SIGNATURE:
            raise ParseError(f"ACPI table signature is {data[:4]!r}, expected b'CCEL'", offset=0)
        (length,) = struct.unpack_from("<I", data, 4)
        if length != len(data):
            raise ParseError(
                f"CCEL table length field is {length}, the table is {len(data)} bytes", offset=4
            )
        if length != CCEL_TABLE_LENGTH:
            raise UnsupportedFormatError(
                f"CCEL table length {length}, expected {CCEL_TABLE_LENGTH}", offset=4
            )
        (
            sig,
            length,
            revision,
            checksum,
            oem_id,
            oem_table_id,
            oem_revision,
            creator_id,
            creator_revision,
            cc_type,
            cc_subtype,
            reserved,
            laml,
            lasa,
        ) = _TABLE.unpack(data)
        return cls(
            sig.decode("latin-1"),
            length,
            revision,
            checksum,
            oem_id.decode("latin-1"),
            oem_table_id.decode("latin-1"),
            oem_revision,
            creator_id,
            creator_revision,
            cc_type,
            cc_subtype,
            struct.pack("<H", reserved),
            laml,
            lasa,
        )

    def to_bytes(self) -> bytes:
        (reserved,) = struct.unpack("<H", self.reserved)
        return _TABLE.pack(
            self.signature.encode("latin-1"),
            self.length,
            self.revision,
            self.checksum,
            self.oem_id.encode("latin-1"),
            self.oem_table_id.encode("latin-1"),
            self.oem_revision,
            self.creator_id,
            self.creator_revision,
            self.cc_type,
            self.cc_subtype,
            reserved,
            self.log_area_minimum_length,
            self.log_area_start_address,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "signature": self.signature,
            "length": self.length,
            "revision": self.revision,
            "checksum": self.checksum,
            "checksum_valid": self.checksum_valid,
            "oem_id": self.oem_id,
            "oem_table_id": self.oem_table_id,
            "oem_revision": self.oem_revision,
            "creator_id": self.creator_id.hex(),
            "creator_revision": self.creator_revision,
            "cc_type": self.cc_type,
            "cc_type_name": self.cc_type_name,
            "cc_subtype": self.cc_subtype,
            "reserved": self.reserved.hex(),
            "log_area_minimum_length": self.log_area_minimum_length,
            "log_area_start_address": f"0x{self.log_area_start_address:x}",
        }


@dataclass(frozen=True, slots=True)
class CCELog(TCGEventLog):
    """A CC event log: a crypto-agile TCG log whose records name TD registers."""

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str | None = None) -> Self:
        """Decode a CC event log; records name TD registers (``mrtd``, ``rtmr0``..``rtmr3``)."""
        return tcg.with_source(
            source,
            lambda: tcg.decode_log(
                data, naming=cc_name, no_action_register="mrtd", log_type=cls, agile_only=True
            ),
        )


def parse(data: bytes, *, source: str | None = None) -> CCELog:
    """Decode a CC event log (the contents of the CCEL log area, padding included)."""
    return CCELog.from_bytes(data, source=source)


def looks_like(data: bytes) -> bool:
    """Cheap sniff: a crypto-agile header whose only bank is SHA-384 (TDX) or SM3 (CSV)."""
    if not tcg.looks_like(data) or len(data) < 48:
        return False
    try:
        spec = tcg.SpecIdEvent.from_bytes(data[32:])
    except ParseError:
        return False
    return len(spec.algorithms) == 1 and spec.algorithms[0][0] in ("sha384", "sm3_256")


__all__ = ["CCELTable", "CCELog", "CCEL_SIGNATURE", "CC_TYPES", "looks_like", "parse"]
