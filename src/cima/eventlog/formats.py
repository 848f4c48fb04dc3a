"""Format detection and one entry point to decode any supported log.

Formats: ``tcg`` (TCG PC Client, crypto-agile or SHA1 legacy), ``ccel`` (TDX CC
event log: the same records, indexed by CC measurement register), ``ima-ascii``,
``ima-binary`` and ``cel`` (CEL-JSON).

Detection works on the bytes. A crypto-agile log is taken as CCEL when every
digest is SHA-384 or SM3 and every record's index is a CC measurement-register
index (0..4): firmware that logs for a TPM measures pcr7 and beyond, which a
CC log cannot name. ``--format`` overrides detection.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cima.errors import ParseError, UnsupportedFormatError
from cima.eventlog.event import Measurement
from cima.registers import td_register_for_pcr

FORMATS = ("tcg", "ccel", "ima-ascii", "ima-binary", "cel")
_TD_LOG_FORMATS = ("ccel",)


@dataclass(frozen=True, slots=True)
class LoadedLog:
    """A decoded log: its format, its records (all satisfy Measurement) and the native object."""

    format: str
    source: str | None
    events: Sequence[Any]
    native: Any

    def measurements(self) -> Sequence[Measurement]:
        return self.events

    def to_dict(self) -> dict[str, Any]:
        native = self.native
        if hasattr(native, "to_dict"):
            body: dict[str, Any] = native.to_dict()
        else:
            body = {"events": [e.to_dict() for e in self.events]}
        if "format" in body:
            body["layout"] = body.pop("format")
        return {"format": self.format, "source": self.source, **body}

    @property
    def is_td_log(self) -> bool:
        return self.format in _TD_LOG_FORMATS


def detect(data: bytes) -> str:
    """Name the format of ``data`` or raise :class:`UnsupportedFormatError`."""
    from cima.eventlog import cel, ima, tcg

    if cel.looks_like(data):
        return "cel"
    if ima.looks_like_ascii(data):
        return "ima-ascii"
    if ima.looks_like_binary(data):
        return "ima-binary"
    if tcg.looks_like(data):
        try:
            log = tcg.parse(data)
        except ParseError:
            return "tcg"
        if _looks_like_cc_log(log):
            return "ccel"
        return "tcg"
    raise UnsupportedFormatError(
        "not a recognised log (expected a TCG or CCEL event log, an IMA list or CEL-JSON)",
        offset=0,
    )


def _looks_like_cc_log(log: Any) -> bool:
    if log.format != "crypto-agile" or len(log.events) < 2:
        return False
    algs = set(log.algorithms())
    if not algs or not algs <= {"sha384", "sm3_256"}:
        return False
    return all(0 <= e.pcr_index <= 4 for e in log.events)


def load(data: bytes, fmt: str = "auto", *, source: str | None = None) -> LoadedLog:
    """Decode ``data`` as ``fmt`` (``auto`` detects it)."""
    try:
        if fmt == "auto":
            fmt = detect(data)
    except ParseError as e:
        raise e.with_source(source) if source else e from None
    if fmt == "tcg":
        from cima.eventlog import tcg

        log = tcg.parse(data, source=source)
        return LoadedLog(fmt, source, log.events, log)
    if fmt == "ccel":
        from cima.eventlog import ccel

        clog = ccel.parse(data, source=source)
        return LoadedLog(fmt, source, clog.events, clog)
    if fmt == "ima-ascii":
        from cima.eventlog import ima

        ilog = ima.parse_ascii(data, source=source)
        return LoadedLog(fmt, source, ilog.entries, ilog)
    if fmt == "ima-binary":
        from cima.eventlog import ima

        ilog = ima.parse_binary(data, source=source)
        return LoadedLog(fmt, source, ilog.entries, ilog)
    if fmt == "cel":
        from cima.eventlog import cel

        records = cel.from_json(data, source=source)
        return LoadedLog(fmt, source, records, None)
    raise UnsupportedFormatError(f"unknown format {fmt!r} (known: auto, {', '.join(FORMATS)})")


@dataclass(frozen=True, slots=True)
class OnRegister:
    """A record replayed into another register than the one it names.

    Used when an IMA list is replayed together with a TD's CCEL: the kernel
    measures into the TD register that stands for the PCR.
    """

    event: Any
    register: str

    @property
    def extends(self) -> bool:
        return bool(self.event.extends)

    @property
    def startup_locality(self) -> int | None:
        return None

    def algorithms(self) -> tuple[str, ...]:
        return tuple(self.event.algorithms())

    def replay_digest(self, algorithm: str) -> bytes | None:
        digest: bytes | None = self.event.replay_digest(algorithm)
        return digest


def td_register_for_ima(pcr: int) -> str:
    """The TD register an IMA entry's index stands for in a TD.

    Indices 0..3 are the CC Trusted API's IMR numbering (IMR n = rtmr n); a
    PCR index beyond that maps through the TDX firmware's PCR mapping
    (pcr10 -> rtmr2).
    """
    if 0 <= pcr <= 3:
        return f"rtmr{pcr}"
    return td_register_for_pcr(f"pcr{pcr}")


def combined(logs: Sequence[LoadedLog]) -> Iterator[Any]:
    """The records of several logs in order, IMA entries mapped to TD registers next to a CCEL."""
    td = any(log.is_td_log for log in logs)
    for log in logs:
        if td and log.format in ("ima-ascii", "ima-binary"):
            for e in log.events:
                yield OnRegister(e, td_register_for_ima(e.pcr))
        else:
            yield from log.events
