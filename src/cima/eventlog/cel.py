"""TCG Canonical Event Log (CEL), JSON encoding: cima's interchange format for every log.

A CEL-JSON document is a JSON array of records (TCG Canonical Event Log Format,
version 1.0, the JSON encoding)::

    {"recnum": 0, "pcr": 4,
     "digests": [{"hashAlg": "sha256", "digest": "<hex>"}],
     "content_type": "pcclient_std",
     "content": {"event_type": 2147483651, "event_data": "<base64>"}}

Content types handled:

- ``pcclient_std``: a TCG PC Client record (``event_type``, ``event_data``);
- ``ima_template``: a Linux IMA record (``template_name``, ``template_data``);
- ``cima``: an event of cima's runtime journal (``content`` is its JSON object).

The register is ``"pcr": N`` for a TPM PCR. For a TD measurement register the
record carries ``"imr": N`` with the CC measurement-register index (0 = mrtd,
1..4 = rtmr0..rtmr3), as the CC Trusted API's CEL does. Every record also
carries ``"register"`` with cima's canonical name; readers accept any of the three.

Converting a TCG, CCEL or IMA log to CEL keeps what replay needs (register,
logged digests, event type and data, IMA template data for any bank), and
:func:`to_tcg_bytes` / :func:`to_ima_binary` rebuild the native records from it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from cima.digests import ALGORITHMS, HashAlgorithm, by_name
from cima.errors import AlgorithmError, ParseError, RegisterError
from cima.registers import (
    CC_INDEX_TO_NAME,
    PCR_NAMES,
    cc_index,
    cc_name,
    check_name,
    pcr_index,
    pcr_name,
)

PCCLIENT_STD = "pcclient_std"
IMA_TEMPLATE = "ima_template"
CIMA = "cima"
CONTENT_TYPES = (PCCLIENT_STD, IMA_TEMPLATE, CIMA)

EV_NO_ACTION = 0x00000003
_STARTUP_LOCALITY = b"StartupLocality\x00"
_SPEC_ID_03 = b"Spec ID Event03\x00"

_RECORD_KEYS = frozenset(
    {"recnum", "pcr", "imr", "nv_index", "register", "digests", "content_type", "content"}
)

# An IMA list measured into a TD register numbers it as the CC Trusted API's IMR.
_IMR_BY_NAME = {f"rtmr{i}": i for i in range(4)}

#: Upper bound on one CEL document's records, to bound memory on hostile input.
MAX_RECORDS = 10_000_000


@dataclass(frozen=True, slots=True)
class CELRecord:
    """One CEL record. Satisfies :class:`cima.eventlog.event.Measurement`."""

    recnum: int
    register: str
    digests: tuple[tuple[str, bytes], ...]
    content_type: str
    content: dict[str, Any] = field(hash=False, compare=True)

    # -- Measurement protocol -------------------------------------------------
    @property
    def event_type(self) -> int | None:
        if self.content_type == PCCLIENT_STD:
            return int(self.content["event_type"])
        return None

    @property
    def event_data(self) -> bytes:
        if self.content_type == PCCLIENT_STD:
            return bytes(self.content["event_data"])
        if self.content_type == IMA_TEMPLATE:
            return bytes(self.content["template_data"])
        return json.dumps(self.content, sort_keys=True, separators=(",", ":")).encode()

    @property
    def extends(self) -> bool:
        return self.event_type != EV_NO_ACTION

    @property
    def startup_locality(self) -> int | None:
        if self.event_type != EV_NO_ACTION or self.register not in ("pcr0",):
            return None
        data = self.event_data
        if data.startswith(_STARTUP_LOCALITY) and len(data) >= len(_STARTUP_LOCALITY) + 1:
            return data[len(_STARTUP_LOCALITY)]
        return None

    def algorithms(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.digests)

    def replay_digest(self, algorithm: str) -> bytes | None:
        bank = by_name(algorithm)
        if self.content_type == IMA_TEMPLATE:
            # The IMA codec knows each template's hash input (the ``ima`` template
            # pads its name), violations (all-ones) and per-bank template hashes.
            digest: bytes | None = self.ima_entry().replay_digest(bank.name)
            return digest
        return dict(self.digests).get(bank.name)

    def ima_entry(self) -> Any:
        """This ``ima_template`` record as an :class:`cima.eventlog.ima.IMAEntry`."""
        from cima.eventlog import ima

        if self.content_type != IMA_TEMPLATE or not self.digests:
            raise ParseError(f"CEL record {self.recnum}: not an IMA record with a template hash")
        _, logged = self.digests[0]
        index = (
            pcr_index(self.register)
            if self.register.startswith("pcr")
            else _IMR_BY_NAME[self.register]
        )
        return ima.IMAEntry(
            index=self.recnum,
            pcr=index,
            template_hash=logged,
            template_name=str(self.content["template_name"]),
            template_data=bytes(self.content["template_data"]),
        )

    # -- JSON -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"recnum": self.recnum}
        if self.register.startswith("pcr"):
            out["pcr"] = pcr_index(self.register)
        else:
            out["imr"] = cc_index(self.register)
        out["register"] = self.register
        out["digests"] = [{"hashAlg": a, "digest": d.hex()} for a, d in self.digests]
        out["content_type"] = self.content_type
        if self.content_type == PCCLIENT_STD:
            out["content"] = {
                "event_type": self.content["event_type"],
                "event_data": base64.b64encode(self.content["event_data"]).decode(),
            }
            if "event_size" in self.content:
                out["content"]["event_size"] = self.content["event_size"]
        elif self.content_type == IMA_TEMPLATE:
            out["content"] = {
                "template_name": self.content["template_name"],
                "template_data": base64.b64encode(self.content["template_data"]).decode(),
            }
        else:
            out["content"] = self.content
        return out

    @classmethod
    def from_dict(cls, obj: object, *, position: int = 0) -> CELRecord:
        """Decode one CEL-JSON record; errors name the record and the key.

        The common shapes (canonical algorithm names, a register with its
        matching index) take a fast path; anything else is checked by the
        general path, which gives the error.
        """
        if not isinstance(obj, dict):
            raise ParseError(f"CEL record {position}: expected an object, got {type(obj).__name__}")
        if not _RECORD_KEYS.issuperset(obj):
            for key in obj:
                if key not in _RECORD_KEYS:
                    raise _fail(position, key, "is not a CEL record key")
        recnum = obj.get("recnum")
        if not isinstance(recnum, int) or isinstance(recnum, bool) or recnum < 0:
            raise _fail(position, "recnum", "must be a non-negative integer")
        register = _fast_register(obj)
        if register is None:
            register = _register_of(obj, position)
        raw_digests = obj.get("digests")
        if not isinstance(raw_digests, list):
            raise _fail(position, "digests", "must be a list")
        digests: list[tuple[str, bytes]] = []
        for i, d in enumerate(raw_digests):
            digests.append(_digest_of(d, i, position))
        ctype = obj.get("content_type")
        if ctype not in CONTENT_TYPES:
            raise _fail(position, "content_type", f"must be one of {', '.join(CONTENT_TYPES)}")
        raw = obj.get("content")
        if not isinstance(raw, dict):
            raise _fail(position, "content", "must be an object")
        content: dict[str, Any]
        if ctype == PCCLIENT_STD:
            et = raw.get("event_type")
            if not isinstance(et, int) or isinstance(et, bool) or not 0 <= et <= 0xFFFFFFFF:
                raise _fail(position, "content.event_type", "must be a 32-bit unsigned integer")
            data = _b64(raw.get("event_data"), position, "event_data")
            content = {"event_type": et, "event_data": data}
            if "event_size" in raw:
                size = raw["event_size"]
                if (
                    not isinstance(size, int)
                    or isinstance(size, bool)
                    or not 0 <= size <= len(data)
                ):
                    raise _fail(
                        position,
                        "content.event_size",
                        "must be an integer up to the data's length",
                    )
                content["event_size"] = size
        elif ctype == IMA_TEMPLATE:
            name = raw.get("template_name")
            if not isinstance(name, str) or not name:
                raise _fail(position, "content.template_name", "must be a non-empty string")
            content = {
                "template_name": name,
                "template_data": _b64(raw.get("template_data"), position, "template_data"),
            }
        else:
            content = dict(raw)
        return cls(recnum, register, tuple(digests), str(ctype), content)


def _fail(position: int, key: str, why: str) -> ParseError:
    return ParseError(f"CEL record {position}: {key!r} {why}")


#: Canonical algorithm names (the fast path of a record's digests; other spellings go to by_name).
_CANONICAL_ALGS: dict[str, HashAlgorithm] = {a.name: a for a in ALGORITHMS}


def _digest_of(d: object, i: int, position: int) -> tuple[str, bytes]:
    """One entry of a record's ``digests``: (algorithm, digest)."""
    if type(d) is dict and len(d) == 2:
        name = d.get("hashAlg")
        text = d.get("digest")
        alg = _CANONICAL_ALGS.get(name) if type(name) is str else None
        if alg is not None and type(text) is str:
            try:
                value = bytes.fromhex(text)
            except ValueError:
                pass
            else:
                if len(value) == alg.digest_size:
                    return alg.name, value
    # The general path: it accepts the other spellings and names what is wrong.
    if not isinstance(d, dict) or set(d) != {"hashAlg", "digest"}:
        raise _fail(position, f"digests[{i}]", "must be an object with hashAlg and digest")
    try:
        alg = by_name(str(d["hashAlg"]))
        value = bytes.fromhex(str(d["digest"]))
    except (AlgorithmError, ValueError) as e:
        raise _fail(position, f"digests[{i}]", f"is invalid: {e}") from e
    if len(value) != alg.digest_size:
        raise _fail(
            position,
            f"digests[{i}]",
            f"has {len(value)} bytes, {alg.name} needs {alg.digest_size}",
        )
    return alg.name, value


def _fast_register(obj: dict[str, Any]) -> str | None:
    """The register of a record that names it with its matching index; None: ask _register_of."""
    register = obj.get("register")
    if "pcr" in obj:
        index = obj["pcr"]
        if type(index) is int and 0 <= index < len(PCR_NAMES) and PCR_NAMES[index] == register:
            return PCR_NAMES[index]
        return None
    index = obj.get("imr")
    if type(index) is int and index in CC_INDEX_TO_NAME and "nv_index" not in obj:
        name = CC_INDEX_TO_NAME[index]
        return name if name == register else None
    return None


def _register_of(obj: dict[str, Any], position: int) -> str:
    def fail(key: str, why: str) -> ParseError:
        return _fail(position, key, why)

    register = obj.get("register")
    if register is not None:
        if not isinstance(register, str):
            raise fail("register", "must be a string")
        try:
            check_name(register)
        except RegisterError as e:
            raise fail("register", str(e)) from e
    derived: str | None = None
    try:
        if "pcr" in obj:
            if not isinstance(obj["pcr"], int) or isinstance(obj["pcr"], bool):
                raise fail("pcr", "must be an integer")
            derived = pcr_name(obj["pcr"])
        elif "imr" in obj:
            if not isinstance(obj["imr"], int) or isinstance(obj["imr"], bool):
                raise fail("imr", "must be an integer")
            derived = cc_name(obj["imr"])
        elif "nv_index" in obj:
            raise fail("nv_index", "records in NV indices are not replayable registers")
    except RegisterError as e:
        raise fail("pcr" if "pcr" in obj else "imr", str(e)) from e
    if register is not None and derived is not None and register != derived:
        raise fail("register", f"is {register} but the record's index names {derived}")
    result = register or derived
    if result is None:
        raise fail("pcr", "is missing (a record needs pcr, imr or register)")
    return result


def _b64(value: object, position: int, key: str) -> bytes:
    if not isinstance(value, str):
        raise _fail(position, f"content.{key}", "must be a base64 string")
    try:
        # Strict mode accepts exactly the well-formed base64 that the check below accepts.
        return binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _fail(position, f"content.{key}", f"is not valid base64: {e}") from e


# -- digests of logs and a memo of decoded logs ---------------------------------


def canonical_bytes(records: Sequence[CELRecord]) -> bytes:
    """Every field of every record, in one unambiguous encoding: equal bytes, equal logs.

    A JSON array (orjson) of ``[recnum, register, content_type, [[alg, hex],
    ...], content]``, the content ``[event_type, hex data, event_size]``
    (``pcclient_std``), ``[template_name, hex data]`` (``ima_template``) or,
    for any other record, its JSON with sorted keys as a string (NaN kept
    apart from null). Raises TypeError or ValueError for content that is not
    what a decoded record holds (data that is not ``bytes``, keys beyond the
    record's form, values JSON cannot carry).
    """
    out: list[Any] = []
    for r in records:
        c = r.content
        if r.content_type == PCCLIENT_STD:
            data = c["event_data"]
            if type(data) is not bytes or not _PCCLIENT_KEYS.issuperset(c):
                raise TypeError(f"CEL record {r.recnum}: not a decoded record's content")
            form: Any = [c["event_type"], data.hex(), c.get("event_size")]
        elif r.content_type == IMA_TEMPLATE:
            data = c["template_data"]
            if type(data) is not bytes or len(c) != 2:
                raise TypeError(f"CEL record {r.recnum}: not a decoded record's content")
            form = [c["template_name"], data.hex()]
        else:
            form = json.dumps(c, sort_keys=True, separators=(",", ":"))
        out.append(
            [r.recnum, r.register, r.content_type, [[a, d.hex()] for a, d in r.digests], form]
        )
    return orjson.dumps(out)


_PCCLIENT_KEYS = frozenset({"event_type", "event_data", "event_size"})


def log_digest(records: Sequence[CELRecord]) -> bytes | None:
    """SHA-256 of :func:`canonical_bytes` of ``records``: equal logs have equal digests.

    Immediate the second time for a log that :data:`DECODED_LOGS` holds;
    computed otherwise. None for records whose content is not what a decoded
    record holds (made in memory).
    """
    known = DECODED_LOGS.digest_of(records)
    if known is not None:
        return known
    return _digest(records)


def _digest(records: Sequence[CELRecord]) -> bytes | None:
    try:
        return hashlib.sha256(canonical_bytes(records)).digest()
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


class LogMemo:
    """A bounded memo of decoded CEL logs, keyed by the SHA-256 of their JSON.

    A verifier receives the same logs again and again (a node's boot log does
    not change until it reboots, a fleet boots the same firmware and kernel):
    :meth:`decode` returns the records decoded before for a byte-identical
    JSON array (as the JSON parser gave it: ``key`` is its serialisation),
    and decodes and keeps anything else. What it returns is shared between
    callers and must not be changed. Only logs that decode are kept, so an
    invalid log is refused with the decoder's error every time.

    It also keeps the digest (:func:`log_digest`) of a log it holds once asked
    for it, by the identity of the tuple it returned; a tuple it holds cannot
    be garbage collected, so its identity cannot be reused while it is held.
    """

    def __init__(self, *, max_records: int = 20_000, max_log: int = 5_000) -> None:
        # 20,000 records are some 10 to 20 MB: a few dozen boot logs and IMA lists.
        self.max_records = max_records
        self.max_log = max_log
        self._logs: OrderedDict[bytes, tuple[CELRecord, ...]] = OrderedDict()
        self._digests: dict[int, list[Any]] = {}  # id -> [records, digest or None]
        self._records = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def decode(
        self, key: bytes, count: int, decode: Callable[[], tuple[CELRecord, ...]]
    ) -> tuple[CELRecord, ...]:
        """The records of a log of ``count`` records whose JSON is ``key`` (else ``decode()``)."""
        if count > self.max_log or count == 0:
            return decode()
        digest = hashlib.sha256(key).digest()
        with self._lock:
            hit = self._logs.get(digest)
            if hit is not None:
                self._logs.move_to_end(digest)
                self.hits += 1
                return hit
        records = decode()
        with self._lock:
            self.misses += 1
            if digest in self._logs:  # another thread decoded it meanwhile
                return self._logs[digest]
            self._logs[digest] = records
            self._digests[id(records)] = [records, None]
            self._records += len(records)
            while self._records > self.max_records and self._logs:
                _, old = self._logs.popitem(last=False)
                self._digests.pop(id(old), None)
                self._records -= len(old)
        return records

    def digest_of(self, records: Sequence[CELRecord]) -> bytes | None:
        """The digest (:func:`log_digest`) of a log this memo holds (None for any other)."""
        found = self._digests.get(id(records))
        if found is None or found[0] is not records:
            return None
        if found[1] is None:
            found[1] = _digest(records)
        digest: bytes | None = found[1]
        return digest

    def clear(self) -> None:
        with self._lock:
            self._logs.clear()
            self._digests.clear()
            self._records = 0


#: The process's memo of decoded logs (:meth:`cima.evidence.bundle.EvidenceBundle.from_json`).
DECODED_LOGS = LogMemo()


# -- conversion from native logs ------------------------------------------------


def from_measurements(events: Iterable[Any]) -> list[CELRecord]:
    """CEL records for TCG/CCEL records (``TCGEvent``) and IMA entries (``IMAEntry``)."""
    out: list[CELRecord] = []
    for n, ev in enumerate(events):
        if hasattr(ev, "template_data"):
            out.append(
                CELRecord(
                    n,
                    ev.register,
                    ((ev.template_hash_algorithm, bytes(ev.template_hash)),),
                    IMA_TEMPLATE,
                    {"template_name": ev.template_name, "template_data": bytes(ev.template_data)},
                )
            )
        elif hasattr(ev, "event_type") and hasattr(ev, "data"):
            out.append(
                CELRecord(
                    n,
                    ev.register,
                    tuple((a, bytes(d)) for a, d in ev.digests),
                    PCCLIENT_STD,
                    _pcclient_content(ev),
                )
            )
        elif isinstance(ev, CELRecord):
            out.append(ev if ev.recnum == n else CELRecord(n, *_fields(ev)))
        else:
            raise TypeError(f"cannot convert {type(ev).__name__} to CEL")
    return out


def _pcclient_content(ev: Any) -> dict[str, Any]:
    content: dict[str, Any] = {"event_type": int(ev.event_type), "event_data": bytes(ev.data)}
    declared = getattr(ev, "declared_size", None)
    if declared is not None and declared != len(ev.data):
        # A Spec ID header whose eventSize leaves out its vendorInfo bytes
        # (seen in the wild): keep the declared size so the bytes come back.
        content["event_size"] = int(declared)
    return content


def _fields(r: CELRecord) -> tuple[str, tuple[tuple[str, bytes], ...], str, dict[str, Any]]:
    return (r.register, r.digests, r.content_type, r.content)


def to_json(records: Sequence[CELRecord], *, indent: int | None = 1) -> str:
    """CEL-JSON text of ``records``."""
    return json.dumps([r.to_dict() for r in records], indent=indent)


def from_json(text: str | bytes, *, source: str | None = None) -> list[CELRecord]:
    """Decode a CEL-JSON document (an array of records; a single object is one record)."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        line = getattr(e, "lineno", None)
        raise ParseError(f"not JSON: {e}", line=line, source=source) from e
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise ParseError("a CEL-JSON document is an array of records", source=source)
    if len(doc) > MAX_RECORDS:
        raise ParseError(f"more than {MAX_RECORDS} records", source=source)
    records: list[CELRecord] = []
    for i, obj in enumerate(doc):
        try:
            records.append(CELRecord.from_dict(obj, position=i))
        except ParseError as e:
            raise e.with_source(source) if source else e from None
    return records


def looks_like(data: bytes) -> bool:
    """Cheap sniff: a JSON array or object that mentions a CEL key."""
    head = data[:4096].lstrip()
    return head[:1] in (b"[", b"{") and (b'"content_type"' in head or head.rstrip() == b"[]")


# -- conversion back to native logs ---------------------------------------------


def to_tcg_bytes(records: Sequence[CELRecord]) -> bytes:
    """Rebuild a TCG PC Client (or CCEL) log from ``pcclient_std`` records.

    The first record decides the layout: a Spec ID Event03 header means a
    crypto-agile log (header in the SHA1 TCG_PCR_EVENT form, the rest as
    TCG_PCR_EVENT2 with the algorithm ids of the header), else a SHA1 legacy log.
    """
    pcc = [r for r in records if r.content_type == PCCLIENT_STD]
    if not pcc:
        return b""
    first = pcc[0]
    agile = first.event_type == EV_NO_ACTION and first.event_data.startswith(_SPEC_ID_03)
    out = bytearray()
    for i, r in enumerate(pcc):
        index = _native_index(r.register)
        et = int(r.content["event_type"])
        data = r.event_data
        size = int(r.content.get("event_size", len(data)))
        if i == 0 or not agile:
            digest = dict(r.digests).get("sha1", bytes(20))
            out += struct.pack("<II", index, et) + digest + struct.pack("<I", size) + data
            continue
        out += struct.pack("<III", index, et, len(r.digests))
        for alg, digest in r.digests:
            out += struct.pack("<H", _alg_id(alg)) + digest
        out += struct.pack("<I", len(data)) + data
    return bytes(out)


def _alg_id(name: str) -> int:
    if name.startswith("alg_0x"):
        return int(name[6:], 16)
    return by_name(name).alg_id


def _native_index(register: str) -> int:
    if register.startswith("pcr"):
        return pcr_index(register)
    return cc_index(register)


def to_ima_binary(records: Sequence[CELRecord]) -> bytes:
    """Rebuild a Linux IMA binary measurement list (little-endian) from ``ima_template`` records."""
    return b"".join(r.ima_entry().to_bytes() for r in records if r.content_type == IMA_TEMPLATE)


__all__ = [
    "DECODED_LOGS",
    "CELRecord",
    "LogMemo",
    "canonical_bytes",
    "log_digest",
    "from_json",
    "from_measurements",
    "looks_like",
    "to_ima_binary",
    "to_json",
    "to_tcg_bytes",
]
