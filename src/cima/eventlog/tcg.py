"""TCG PC Client event logs: the SHA1 legacy format and the crypto-agile format.

TCG PC Client Platform Firmware Profile (PFP), section 10 "Event Logging".
All integers are little-endian.

A **SHA1 legacy** log (TCG 1.2 style) is a sequence of ``TCG_PCR_EVENT``::

    UINT32 pcrIndex; UINT32 eventType; BYTE digest[20]; UINT32 eventSize; BYTE event[eventSize]

A **crypto-agile** log starts with one ``TCG_PCR_EVENT`` of type EV_NO_ACTION
whose event is ``TCG_EfiSpecIDEvent`` with the signature ``"Spec ID Event03"``:
the platform class, the spec version, the size of UINTN, the list of
(algorithmId, digestSize) of the banks the log carries, and vendorInfo. (The
PFP puts this record in PCR 0 with a zero digest; TDX firmware logs it with
index 1. Neither is checked: the record never extends.) Every later record is a
``TCG_PCR_EVENT2``::

    UINT32 pcrIndex; UINT32 eventType;
    TPML_DIGEST_VALUES digests = UINT32 count, count x (UINT16 algId, BYTE digest[size(algId)]);
    UINT32 eventSize; BYTE event[eventSize]

where the digest size of each algId comes from the Spec ID header. A header
that starts "Spec ID Event00" or "Spec ID Event02" belongs to a legacy log.

The log ends with the data, or with the unused part of the firmware's log
area: a run of 0xFF (a record whose pcrIndex and eventType are 0xFFFFFFFF) or of
0x00 to the end. Those bytes are kept in :attr:`TCGEventLog.tail` so that
:meth:`TCGEventLog.to_bytes` gives back the input exactly.

A Spec ID header whose eventSize does not count the vendorInfo bytes that
follow it is read as tpm2-tools reads it: the record ends after vendorInfo
(its ``data`` holds the whole structure) and re-encodes with the declared size.
EV_NO_ACTION records are never extended; one in PCR 0 carrying
``StartupLocality`` gives the locality pcr0 is reset to (PFP 10.4.5.3), which
:mod:`cima.eventlog.replay` applies.

Every length is checked against the bytes left before anything is sliced; an
error is a :class:`~cima.errors.ParseError` (a :class:`~cima.errors.TruncatedError`
when the input ends inside a record) whose ``offset`` is where the bad record starts.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Self, TypeVar

from cima.digests import by_id, by_name, is_known_id
from cima.errors import AlgorithmError, ParseError, RegisterError, TruncatedError
from cima.eventlog import uefi
from cima.eventlog.uefi import EventType, event_type_name
from cima.registers import PCR_COUNT, PCR_NAMES

EV_NO_ACTION = int(EventType.EV_NO_ACTION)

FORMAT_CRYPTO_AGILE = "crypto-agile"
FORMAT_SHA1_LEGACY = "sha1-legacy"

SPEC_ID_EVENT03 = uefi.SPEC_ID_EVENT03
STARTUP_LOCALITY = uefi.STARTUP_LOCALITY

#: Upper bound on the digests of one TCG_PCR_EVENT2 (a TPM has a handful of banks).
MAX_DIGESTS = 16

_PCR_EVENT = struct.Struct("<II20sI")  # TCG_PCR_EVENT up to and including eventSize
_PCR_EVENT2_HEAD = struct.Struct("<III")  # pcrIndex, eventType, digests.count
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_SPEC_ID_FIXED = struct.Struct("<16sIBBBBI")  # TCG_EfiSpecIDEvent up to numberOfAlgorithms
_SPEC_ID_ALG = struct.Struct("<HH")

_ZERO_SHA1 = bytes(20)


def alg_name(alg_id: int) -> str:
    """cima's name of a TPM_ALG_ID: ``sha256`` etc., ``alg_0x%04x`` for an id cima does not know."""
    return by_id(alg_id).name if is_known_id(alg_id) else f"alg_0x{alg_id:04x}"


def alg_id(name: str) -> int:
    """The TPM_ALG_ID of a name given by :func:`alg_name`."""
    if name.startswith("alg_0x"):
        try:
            return int(name[6:], 16)
        except ValueError:
            raise AlgorithmError(f"bad algorithm name {name!r}") from None
    return by_name(name).alg_id


# -- the Spec ID header -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpecIdEvent:
    """TCG_EfiSpecIDEvent, the event data of a crypto-agile log's first record (PFP 10.4.5.1)."""

    platform_class: int
    spec_version_minor: int
    spec_version_major: int
    spec_errata: int
    uintn_size: int
    algorithms: tuple[tuple[str, int, int], ...]
    """(name, TPM_ALG_ID, digest size) of each bank, in header order."""
    vendor_info: bytes

    @property
    def size(self) -> int:
        """Bytes of the encoded structure (including vendorInfo)."""
        return _SPEC_ID_FIXED.size + 4 * len(self.algorithms) + 1 + len(self.vendor_info)

    @property
    def spec_version(self) -> str:
        """``major.minor`` errata ``n``, as the PFP writes it (for example ``2.0 errata 105``)."""
        return f"{self.spec_version_major}.{self.spec_version_minor} errata {self.spec_errata}"

    def digest_sizes(self) -> dict[int, tuple[str, int]]:
        """TPM_ALG_ID -> (name, digest size)."""
        return {aid: (name, size) for name, aid, size in self.algorithms}

    @classmethod
    def from_bytes(cls, data: bytes) -> SpecIdEvent:
        """Decode a TCG_EfiSpecIDEvent from the start of ``data`` (bytes after it are ignored).

        Offsets in errors are relative to ``data``.
        """
        data = bytes(data)
        if len(data) < _SPEC_ID_FIXED.size:
            raise TruncatedError(
                f"Spec ID event needs {_SPEC_ID_FIXED.size} bytes, {len(data)} given", offset=0
            )
        sig, pclass, minor, major, errata, uintn, count = _SPEC_ID_FIXED.unpack_from(data, 0)
        if sig != SPEC_ID_EVENT03:
            raise ParseError(
                f"Spec ID signature is {sig!r}, expected {SPEC_ID_EVENT03!r}", offset=0
            )
        if count == 0:
            raise ParseError("Spec ID event declares no algorithms", offset=24)
        pos = _SPEC_ID_FIXED.size
        if count > (len(data) - pos) // _SPEC_ID_ALG.size:
            raise TruncatedError(
                f"Spec ID event declares {count} algorithms, the data holds fewer", offset=24
            )
        algs: list[tuple[str, int, int]] = []
        seen: set[int] = set()
        for aid, size in _SPEC_ID_ALG.iter_unpack(data[pos : pos + 4 * count]):
            if aid in seen:
                raise ParseError(f"Spec ID event declares algorithm 0x{aid:04x} twice", offset=pos)
            seen.add(aid)
            if size == 0:
                raise ParseError(f"Spec ID digest size of 0x{aid:04x} is 0", offset=pos)
            if is_known_id(aid) and by_id(aid).digest_size != size:
                alg = by_id(aid)
                raise ParseError(
                    f"Spec ID digest size of {alg.name} is {size}, expected {alg.digest_size}",
                    offset=pos,
                )
            algs.append((alg_name(aid), aid, size))
            pos += _SPEC_ID_ALG.size
        if pos >= len(data):
            raise TruncatedError("Spec ID event ends before vendorInfoSize", offset=pos)
        vsize = data[pos]
        pos += 1
        if vsize > len(data) - pos:
            raise TruncatedError(
                f"Spec ID vendorInfoSize {vsize} exceeds the {len(data) - pos} bytes left",
                offset=pos - 1,
            )
        return cls(pclass, minor, major, errata, uintn, tuple(algs), data[pos : pos + vsize])

    def to_bytes(self) -> bytes:
        out = bytearray(
            _SPEC_ID_FIXED.pack(
                SPEC_ID_EVENT03,
                self.platform_class,
                self.spec_version_minor,
                self.spec_version_major,
                self.spec_errata,
                self.uintn_size,
                len(self.algorithms),
            )
        )
        for _, aid, size in self.algorithms:
            out += _SPEC_ID_ALG.pack(aid, size)
        out.append(len(self.vendor_info))
        out += self.vendor_info
        return bytes(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "signature": "Spec ID Event03",
            "platform_class": self.platform_class,
            "spec_version_major": self.spec_version_major,
            "spec_version_minor": self.spec_version_minor,
            "spec_errata": self.spec_errata,
            "uintn_size": self.uintn_size,
            "algorithms": [
                {"algorithm": name, "algorithm_id": aid, "digest_size": size}
                for name, aid, size in self.algorithms
            ],
            "vendor_info": self.vendor_info.hex(),
        }


# -- one record -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TCGEvent:
    """One record of a TCG PC Client (or CCEL) log. Satisfies :class:`Measurement`.

    ``legacy`` records are encoded as TCG_PCR_EVENT (the SHA1 layout: every
    record of a legacy log and the header of a crypto-agile one), the others as
    TCG_PCR_EVENT2. ``declared_size`` is the eventSize written in the record when
    it differs from ``len(data)`` (a Spec ID header whose vendorInfo follows its
    declared size); it is None otherwise.
    """

    index: int
    """Record number in the log; 0 is the first record (a crypto-agile log's Spec ID header)."""
    offset: int
    """Byte offset of the record in the log."""
    pcr_index: int
    """The register index as logged (a PCR number, or a CC measurement-register index in CCEL)."""
    event_type: int
    digests: tuple[tuple[str, bytes], ...]
    """(algorithm name, digest) in logged order; an unknown id is named ``alg_0x%04x``."""
    data: bytes
    register: str
    """Canonical register name (``pcr7``, ``rtmr1``)."""
    legacy: bool = False
    declared_size: int | None = None

    @property
    def extends(self) -> bool:
        """EV_NO_ACTION records are logged but never extended (PFP 10.4.1)."""
        return self.event_type != EV_NO_ACTION

    @property
    def startup_locality(self) -> int | None:
        """The locality of a ``StartupLocality`` EV_NO_ACTION record in pcr0 (PFP 10.4.5.3)."""
        if (
            self.event_type == EV_NO_ACTION
            and self.register == "pcr0"
            and len(self.data) == len(STARTUP_LOCALITY) + 1
            and self.data.startswith(STARTUP_LOCALITY)
        ):
            return self.data[-1]
        return None

    @property
    def event_type_name(self) -> str:
        return event_type_name(self.event_type)

    def algorithms(self) -> tuple[str, ...]:
        """The banks this record carries a digest for (ids cima does not know are left out)."""
        return tuple(name for name, _ in self.digests if not name.startswith("alg_0x"))

    def replay_digest(self, algorithm: str) -> bytes | None:
        """The logged digest for bank ``algorithm``, or None."""
        for name, digest in self.digests:
            if name == algorithm:
                return digest
        if algorithm.startswith("alg_0x"):
            return None
        try:
            canonical = by_name(algorithm).name
        except AlgorithmError:
            return None
        if canonical == algorithm:
            return None
        for name, digest in self.digests:
            if name == canonical:
                return digest
        return None

    def matches_digest(self, algorithm: str, digest: bytes) -> bool:
        """Constant-time comparison of the logged digest for ``algorithm`` with ``digest``."""
        logged = self.replay_digest(algorithm)
        return logged is not None and hmac.compare_digest(logged, digest)

    def decoded(self) -> dict[str, Any]:
        """The event data decoded for its event type (:func:`cima.eventlog.uefi.decode`)."""
        return uefi.decode(self.event_type, self.data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "offset": self.offset,
            "register": self.register,
            "event_type": self.event_type,
            "event_type_name": self.event_type_name,
            "digests": {name: digest.hex() for name, digest in self.digests},
            "data": self.data.hex(),
            "decoded": self.decoded(),
        }

    def to_bytes(self) -> bytes:
        """The record as encoded in the log."""
        size = len(self.data) if self.declared_size is None else self.declared_size
        if self.legacy:
            digest = self.digests[0][1] if self.digests else _ZERO_SHA1
            return _PCR_EVENT.pack(self.pcr_index, self.event_type, digest, size) + self.data
        parts = [_PCR_EVENT2_HEAD.pack(self.pcr_index, self.event_type, len(self.digests))]
        for name, digest in self.digests:
            parts.append(_U16.pack(alg_id(name)))
            parts.append(digest)
        parts.append(_U32.pack(size))
        parts.append(self.data)
        return b"".join(parts)


# -- the log ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TCGEventLog:
    """A decoded TCG PC Client event log."""

    format: str
    """``crypto-agile`` or ``sha1-legacy``."""
    spec_id: SpecIdEvent | None
    """The Spec ID header of a crypto-agile log; None for a legacy log."""
    events: tuple[TCGEvent, ...]
    """Every record, the header included."""
    log_bytes: int
    """Length of the records; the padding after them is :attr:`tail`."""
    tail: bytes
    """The unused log area after the last record (0xFF or 0x00 padding), kept for round trips."""

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str | None = None) -> Self:
        """Decode a TCG PC Client log; records name PCRs (``pcrN``)."""
        return with_source(
            source,
            lambda: decode_log(data, naming=_pcr_register, no_action_register="pcr0", log_type=cls),
        )

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[TCGEvent]:
        return iter(self.events)

    def algorithms(self) -> tuple[str, ...]:
        """The banks of the log: the Spec ID header's algorithms (known ones), or sha1."""
        if self.spec_id is None:
            return ("sha1",)
        return tuple(name for name, _, _ in self.spec_id.algorithms if not name.startswith("alg_"))

    @property
    def startup_locality(self) -> int | None:
        """The locality pcr0 starts at, from a StartupLocality record; None if the log has none."""
        for e in self.events:
            loc = e.startup_locality
            if loc is not None:
                return loc
        return None

    @property
    def padding(self) -> int | None:
        """The byte value of the padding after the log (0xFF or 0x00), or None without one."""
        if not self.tail:
            return None
        first = self.tail[0]
        return first if self.tail.count(first) == len(self.tail) else None

    def to_bytes(self) -> bytes:
        """The log as it was read, padding included."""
        return b"".join([e.to_bytes() for e in self.events]) + self.tail

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "spec_id": self.spec_id.to_dict() if self.spec_id is not None else None,
            "algorithms": list(self.algorithms()),
            "event_count": len(self.events),
            "log_bytes": self.log_bytes,
            "tail_bytes": len(self.tail),
            "padding": None if self.padding is None else f"0x{self.padding:02x}",
            "events": [e.to_dict() for e in self.events],
        }


# -- decoding --------------------------------------------------------------------------

L = TypeVar("L", bound=TCGEventLog)


def _pcr_register(index: int) -> str:
    if 0 <= index < PCR_COUNT:
        return PCR_NAMES[index]
    raise RegisterError(f"PCR index {index} out of range 0..{PCR_COUNT - 1}")


def _padding_at(data: bytes, pos: int) -> bool:
    """True when the log area's unused part starts at ``pos`` (0xFF record or zeros to the end)."""
    head = data[pos : pos + 8]
    first = head[0]
    if first == 0xFF:
        return head.count(0xFF) == len(head)
    if first == 0x00 and head.count(0) == len(head):
        return data.count(0, pos) == len(data) - pos
    return False


class _Records:
    """The record loop shared by TCG and CCEL logs."""

    __slots__ = ("data", "events", "naming", "no_action_register")

    def __init__(self, data: bytes, naming: Callable[[int], str], no_action_register: str) -> None:
        self.data = data
        self.naming = naming
        self.no_action_register = no_action_register
        self.events: list[TCGEvent] = []

    def register(self, index: int, event_type: int, offset: int) -> str:
        try:
            return self.naming(index)
        except RegisterError as e:
            if event_type == EV_NO_ACTION:
                return self.no_action_register
            raise ParseError(f"record {len(self.events)}: {e}", offset=offset) from None

    def legacy_record(self, pos: int) -> int:
        """Decode the TCG_PCR_EVENT at ``pos``; return the offset after it."""
        data = self.data
        left = len(data) - pos
        number = len(self.events)
        if left < _PCR_EVENT.size:
            raise TruncatedError(
                f"record {number}: TCG_PCR_EVENT needs {_PCR_EVENT.size} bytes, {left} left",
                offset=pos,
            )
        pcr, etype, digest, size = _PCR_EVENT.unpack_from(data, pos)
        start = pos + _PCR_EVENT.size
        if size > len(data) - start:
            raise TruncatedError(
                f"record {number}: eventSize {size} exceeds the {len(data) - start} bytes left",
                offset=pos,
            )
        end: int = start + size
        self.events.append(
            TCGEvent(
                number,
                pos,
                pcr,
                etype,
                (("sha1", digest),),
                data[start:end],
                self.register(pcr, etype, pos),
                legacy=True,
            )
        )
        return end

    def agile_record(self, pos: int, sizes: dict[int, tuple[str, int]]) -> int:
        """Decode the TCG_PCR_EVENT2 at ``pos``; return the offset after it."""
        data = self.data
        n = len(data)
        number = len(self.events)
        if n - pos < _PCR_EVENT2_HEAD.size:
            raise TruncatedError(
                f"record {number}: TCG_PCR_EVENT2 header needs 12 bytes, {n - pos} left",
                offset=pos,
            )
        pcr, etype, count = _PCR_EVENT2_HEAD.unpack_from(data, pos)
        if count > MAX_DIGESTS:
            raise ParseError(
                f"record {number}: digest count {count} exceeds the limit of {MAX_DIGESTS}",
                offset=pos,
            )
        p = pos + _PCR_EVENT2_HEAD.size
        digests: list[tuple[str, bytes]] = []
        for _ in range(count):
            if n - p < 2:
                raise TruncatedError(f"record {number}: ends inside its digests", offset=pos)
            (aid,) = _U16.unpack_from(data, p)
            known = sizes.get(aid)
            if known is None:
                raise ParseError(
                    f"record {number}: algorithm 0x{aid:04x} is not declared in the Spec ID header",
                    offset=pos,
                )
            name, dsize = known
            p += 2
            if n - p < dsize:
                raise TruncatedError(f"record {number}: ends inside its {name} digest", offset=pos)
            if any(name == seen for seen, _ in digests):
                raise ParseError(f"record {number}: two {name} digests", offset=pos)
            digests.append((name, data[p : p + dsize]))
            p += dsize
        if n - p < 4:
            raise TruncatedError(f"record {number}: ends before its eventSize", offset=pos)
        (size,) = _U32.unpack_from(data, p)
        p += 4
        if size > n - p:
            raise TruncatedError(
                f"record {number}: eventSize {size} exceeds the {n - p} bytes left", offset=pos
            )
        end: int = p + size
        self.events.append(
            TCGEvent(
                number,
                pos,
                pcr,
                etype,
                tuple(digests),
                data[p:end],
                self.register(pcr, etype, pos),
            )
        )
        return end

    def spec_id_header(self) -> tuple[SpecIdEvent, int]:
        """Decode the crypto-agile header record at offset 0; return it and the offset after it."""
        data = self.data
        pcr, etype, digest, size = _PCR_EVENT.unpack_from(data, 0)
        start = _PCR_EVENT.size
        # The PFP puts the header in PCR 0 with a zero digest; TDX firmware logs it
        # with index 1. Neither matters: the header is EV_NO_ACTION and never extended.
        try:
            spec = SpecIdEvent.from_bytes(data[start:])
        except ParseError as e:
            raise type(e)(f"record 0: {e.reason}", offset=0) from None
        if size >= spec.size:
            if size > len(data) - start:
                raise TruncatedError(
                    f"record 0: eventSize {size} exceeds the {len(data) - start} bytes left",
                    offset=0,
                )
            end, declared = start + size, None
        else:
            # eventSize does not count vendorInfo (tpm2-tools reads the header this way).
            end, declared = start + spec.size, size
        self.events.append(
            TCGEvent(
                0,
                0,
                pcr,
                etype,
                (("sha1", digest),),
                data[start:end],
                self.register(pcr, etype, 0),
                legacy=True,
                declared_size=declared,
            )
        )
        return spec, end


def _is_agile(data: bytes) -> bool:
    if len(data) < _PCR_EVENT.size + len(SPEC_ID_EVENT03):
        return False
    (etype,) = _U32.unpack_from(data, 4)
    return etype == EV_NO_ACTION and data[32:48] == SPEC_ID_EVENT03


def decode_log(
    data: bytes,
    *,
    naming: Callable[[int], str],
    no_action_register: str,
    log_type: type[L],
    agile_only: bool = False,
) -> L:
    """Decode a TCG-format log whose register indices are named by ``naming``.

    ``naming`` raises :class:`RegisterError` for an index it does not know: that is
    a ParseError, except on EV_NO_ACTION records, which never extend and are
    kept with register ``no_action_register``. Used by :func:`parse` (PCR
    numbers) and :func:`cima.eventlog.ccel.parse` (CC measurement-register indices).
    """
    data = bytes(data)
    if not data:
        raise TruncatedError("empty event log", offset=0)
    if len(data) < _PCR_EVENT.size:
        raise TruncatedError(
            f"record 0: TCG_PCR_EVENT needs {_PCR_EVENT.size} bytes, {len(data)} given", offset=0
        )
    records = _Records(data, naming, no_action_register)
    n = len(data)
    if _is_agile(data):
        spec, pos = records.spec_id_header()
        sizes = spec.digest_sizes()
        while pos < n and not _padding_at(data, pos):
            pos = records.agile_record(pos, sizes)
        fmt: str = FORMAT_CRYPTO_AGILE
        spec_id: SpecIdEvent | None = spec
    else:
        if agile_only:
            raise ParseError("not a crypto-agile log (no Spec ID Event03 header)", offset=0)
        if _padding_at(data, 0):
            raise ParseError("no records: the log area is all padding", offset=0)
        pos = 0
        while pos < n and not _padding_at(data, pos):
            pos = records.legacy_record(pos)
        fmt, spec_id = FORMAT_SHA1_LEGACY, None
    return log_type(fmt, spec_id, tuple(records.events), pos, data[pos:])


T = TypeVar("T")


def with_source(source: str | None, decode: Callable[[], T]) -> T:
    """Run ``decode``; a ParseError it raises names ``source`` when one is given."""
    try:
        return decode()
    except ParseError as e:
        if source is None:
            raise
        raise e.with_source(source) from None


def parse(data: bytes, *, source: str | None = None) -> TCGEventLog:
    """Decode a TCG PC Client event log (crypto-agile or SHA1 legacy)."""
    return TCGEventLog.from_bytes(data, source=source)


def looks_like(data: bytes) -> bool:
    """Cheap sniff: does ``data`` start like a crypto-agile or a SHA1 legacy TCG log?"""
    if _is_agile(data):
        return True
    if len(data) < _PCR_EVENT.size:
        return False
    pcr, etype, _, size = _PCR_EVENT.unpack_from(data, 0)
    return (
        pcr < PCR_COUNT
        and not event_type_name(etype).startswith("EV_UNKNOWN_")
        and etype != int(EventType.EV_EFI_EVENT_BASE)
        and size <= len(data) - _PCR_EVENT.size
    )


__all__ = [
    "FORMAT_CRYPTO_AGILE",
    "FORMAT_SHA1_LEGACY",
    "MAX_DIGESTS",
    "SpecIdEvent",
    "TCGEvent",
    "TCGEventLog",
    "alg_id",
    "alg_name",
    "decode_log",
    "event_type_name",
    "looks_like",
    "parse",
    "with_source",
]
