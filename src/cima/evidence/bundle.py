"""The evidence bundle: one JSON document with a signed report and the logs that explain it.

An :class:`EvidenceBundle` is what the agent hands a caller that asks for
evidence (DESIGN.md section 1): the platform's signed report, the nonce and
user data it binds, the caller's scope, how the report binds them (the binding
and, for a batched report, the inclusion proof), and the logs a verifier
replays against the quoted registers, each as TCG Canonical Event Log records
in the CEL-JSON encoding, in the caller's view (another container's events
redacted to their digests).

Version 1, every key always present (``null`` where it does not apply)::

    {
      "version": 1,
      "agent_version": "0.1.0",
      "created": "2025-01-01T12:00:00.000000Z",        RFC 3339, UTC
      "platform": "tpm",                                tpm | tdx | software
      "scope": "node",                                  node | container:<64 hex>
      "nonce": "<hex>",                                 at most 64 bytes
      "user_data": "<hex>",                             at most 1024 bytes
      "binding": "<hex>",                               what this request binds
      "container_register": "<hex>" | null,             container scope only
      "runtime_register": {"register": "pcr13", "algorithm": "sha384",
                           "start": "<hex>"},           the agent's register
      "batch": null | {"algorithm": "sha256", "leaf_index": 3,
                       "tree_size": 7, "path": ["<hex>", ...], "root": "<hex>"},
      "report": {"type": "tpm-quote", "attest": "<base64>", "signature": "<base64>",
                 "ak_pem": "...", "hash_algorithm": "sha256",
                 "pcrs": [{"register": "pcr0", "algorithm": "sha256", "digest": "<hex>"}],
                 "ek_certificate_pem": null}
              | {"type": "tdx-quote", "quote": "<base64>"},
      "logs": {"boot": [CEL records] | null, "ima": [CEL records] | null,
               "runtime": [CEL records]}
    }

The binding (DESIGN.md section 4):

- node scope: ``nonce || user_data``;
- container scope: ``H(container_register || nonce || user_data)``, H the
  runtime register's algorithm, where ``container_register`` is the replay,
  from zeros, of the container's own runtime events (the records of the runtime
  log whose scope is the bundle's scope), in that algorithm: a register of the
  container's own, bound in every container-scoped report. It is the value
  when the request was bound; the runtime log is read after the quote and may
  hold more of the container's events, so the recorded value must be the
  replay of the container's events in some prefix of the log (as the quoted
  registers are matched by a prefix of their logs).

The report binds ``report_nonce`` with no user data, in the platform's own
convention (TPM qualifyingData = H_sig(report_nonce), TDX REPORTDATA =
SHA-512(report_nonce)): without a batch ``report_nonce`` is the binding (for
the node scope the report was taken with the nonce and user data themselves,
which binds the same bytes), with a batch it is the root of the batch's Merkle
tree (:mod:`cima.evidence.batch`). :meth:`EvidenceBundle.verify_binding`
checks all of it except the report's signature, which
:func:`cima.evidence.tpm.verify_quote` (with ``report_nonce``) or the TDX
verifier checks.

Decoding is strict: an unknown version is an
:class:`~cima.errors.UnsupportedFormatError` naming it; a missing, unknown or
ill-typed field is a :class:`~cima.errors.ParseError` naming the field
(``report.attest``, ``logs.runtime[3].digests``). The JSON Schema of the same
document is ``bundle.schema.json`` beside this module.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from cima.digests import by_name
from cima.errors import (
    AlgorithmError,
    FreshnessError,
    ParseError,
    RegisterError,
    UnsupportedFormatError,
)
from cima.eventlog.cel import CIMA, DECODED_LOGS, CELRecord
from cima.evidence.batch import InclusionProof, verify_inclusion
from cima.evidence.reportdata import (
    MAX_NONCE,
    MAX_USER_DATA,
    SCOPED_BINDING_TAG,
    container_binding,
    is_reserved,
    tdx_report_data,
    tpm_qualifying_data,
)
from cima.registers import RegisterValue, check_name

__all__ = [
    "BUNDLE_VERSION",
    "MAX_BUNDLE_SIZE",
    "PLATFORMS",
    "SCHEMA_PATH",
    "EvidenceBundle",
    "TDXQuoteReport",
    "TPMQuoteReport",
    "container_register",
    "container_register_values",
    "loads",
    "node_binding",
    "utc_now",
]

BUNDLE_VERSION = 1
#: The JSON Schema of a version 1 bundle.
SCHEMA_PATH = Path(__file__).with_name("bundle.schema.json")
#: A bundle larger than this is refused before it is parsed (a 100,000-entry IMA log is ~50 MB).
MAX_BUNDLE_SIZE = 512 * 1024 * 1024
PLATFORMS = ("tpm", "tdx", "software")
NODE = "node"
_CONTAINER_SCOPE = re.compile(r"container:[0-9a-f]{64}")
_KEYS = (
    "version",
    "agent_version",
    "created",
    "platform",
    "scope",
    "nonce",
    "user_data",
    "binding",
    "container_register",
    "runtime_register",
    "batch",
    "report",
    "logs",
)
_LOGS = ("boot", "ima", "runtime")
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def loads(text: str | bytes) -> Any:
    """Parse JSON as bundles are read: strict UTF-8, no NaN or Infinity, integers of 64 bits.

    Raises :class:`json.JSONDecodeError` (with the line, column and offset).
    """
    return orjson.loads(text)


def node_binding(nonce: bytes, user_data: bytes) -> bytes:
    """What a node-scoped report binds: ``nonce || user_data`` (sizes checked)."""
    if len(nonce) > MAX_NONCE:
        raise FreshnessError(f"nonce is {len(nonce)} bytes, at most {MAX_NONCE} allowed")
    if len(user_data) > MAX_USER_DATA:
        raise FreshnessError(
            f"user data is {len(user_data)} bytes, at most {MAX_USER_DATA} allowed"
        )
    return bytes(nonce) + bytes(user_data)


def container_register_values(records: Iterable[Any], scope: str, algorithm: str) -> list[bytes]:
    """The container register after each of the container's events: zeros, then each extend.

    ``records`` are runtime events (:class:`cima.agent.events.RuntimeEvent`) or
    their CEL records; redacted ones (another container's) carry no scope and
    are skipped, as are events of other scopes.
    """
    alg = by_name(algorithm)
    value = alg.zero
    values = [value]
    for r in records:
        content = r.content
        if not isinstance(content, Mapping) or content.get("scope") != scope:
            continue
        digest = r.replay_digest(alg.name)
        if digest is None:
            continue
        value = alg.hash(value + digest)
        values.append(value)
    return values


def container_register(records: Iterable[Any], scope: str, algorithm: str) -> bytes:
    """The container register: the replay from zeros of the events of ``scope`` in ``records``."""
    return container_register_values(records, scope, algorithm)[-1]


# -- reports ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TPMQuoteReport:
    """A TPM quote (or the software platform's quote in the same format)."""

    attest: bytes
    """The TPMS_ATTEST bytes, exactly as signed."""
    signature: bytes
    """The TPMT_SIGNATURE bytes."""
    ak_pem: str
    """The attestation key's public key (SubjectPublicKeyInfo PEM)."""
    hash_algorithm: str
    """The AK's signing hash: qualifyingData and pcrDigest use it."""
    pcrs: tuple[RegisterValue, ...]
    """The quoted PCR values, in the quote's selection order."""
    ek_certificate_pem: str | None = None

    type = "tpm-quote"

    @property
    def extra_data(self) -> bytes:
        """The quote's qualifyingData (extraData), as signed."""
        from cima.evidence.tpm import Quote

        return Quote.from_bytes(self.attest).extra_data

    def binds(self, report_nonce: bytes, user_data: bytes = b"") -> None:
        """Raise :class:`FreshnessError` unless extraData = H_sig(report_nonce || user_data)."""
        expected = tpm_qualifying_data(report_nonce, user_data, self.hash_algorithm)
        if not hmac.compare_digest(self.extra_data, expected):
            raise FreshnessError(
                f"the TPM quote's extraData {self.extra_data.hex()} does not bind "
                f"{report_nonce.hex()} (expected {expected.hex()})"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "attest": _b64(self.attest),
            "signature": _b64(self.signature),
            "ak_pem": self.ak_pem,
            "hash_algorithm": self.hash_algorithm,
            "pcrs": [v.to_dict() for v in self.pcrs],
            "ek_certificate_pem": self.ek_certificate_pem,
        }


@dataclass(frozen=True, slots=True)
class TDXQuoteReport:
    """A TDX quote (version 4 or 5)."""

    quote: bytes

    type = "tdx-quote"

    def binds(self, report_nonce: bytes, user_data: bytes = b"") -> None:
        """Raise :class:`FreshnessError` unless REPORTDATA = SHA-512(report_nonce || user_data)."""
        from cima.evidence.tdx import TDXQuote

        got = TDXQuote.from_bytes(self.quote).report_data
        expected = tdx_report_data(report_nonce, user_data)
        if not hmac.compare_digest(got, expected):
            raise FreshnessError(
                f"the TDX quote's REPORTDATA {got.hex()} does not bind {report_nonce.hex()} "
                f"(expected {expected.hex()})"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "quote": _b64(self.quote)}


Report = TPMQuoteReport | TDXQuoteReport


# -- the bundle ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EvidenceBundle:
    """Evidence for one caller's request (see the module docstring for the JSON form)."""

    platform: str
    report: Report
    nonce: bytes
    user_data: bytes
    scope: str
    binding: bytes
    runtime_register: str
    runtime_algorithm: str
    runtime_start: bytes
    runtime_log: tuple[CELRecord, ...]
    boot_log: tuple[CELRecord, ...] | None = None
    ima_log: tuple[CELRecord, ...] | None = None
    container_register: bytes | None = None
    batch: InclusionProof | None = None
    batch_root: bytes | None = None
    """The root of the batch's tree (what the report binds), with ``batch``."""
    created: str = ""
    agent_version: str = ""
    version: int = BUNDLE_VERSION

    @property
    def report_type(self) -> str:
        return self.report.type

    @property
    def container_id(self) -> str | None:
        """The container id of a container scope, None for the node scope."""
        return self.scope.split(":", 1)[1] if self.scope != NODE else None

    # -- binding ---------------------------------------------------------------------------------
    def expected_binding(self) -> bytes:
        """The binding the nonce, the user data and (container) the container register give."""
        if self.scope == NODE:
            return node_binding(self.nonce, self.user_data)
        if self.container_register is None:
            raise FreshnessError("a container-scoped bundle without its container register")
        return container_binding(
            self.container_register, self.nonce, self.user_data, self.runtime_algorithm
        )

    def report_nonce(self) -> bytes:
        """What the report binds as its nonce: the batch root, else the request's own values."""
        if self.batch is None:
            return self.nonce if self.scope == NODE else self.binding
        if self.batch_root is None:
            raise FreshnessError("a batched bundle without its batch root")
        return self.batch_root

    def report_user_data(self) -> bytes:
        """What the report binds as its user data (see :data:`SCOPED_BINDING_TAG`)."""
        if self.batch is None and self.scope == NODE:
            return self.user_data
        return SCOPED_BINDING_TAG

    def verify_binding(self) -> None:
        """Raise :class:`FreshnessError` unless the report binds this request.

        Steps:
        (1) container scope: the recorded container register is the replay of
            the container's own events in the runtime log;
        (2) the binding is the one the nonce, user data (and container register) give;
        (3) with a batch, the inclusion proof leads from the binding to the batch root;
        (4) the report binds that root (batch) or the binding (no batch).
        The report's signature is not checked here.
        """
        # (1) container register
        if self.scope != NODE:
            if self.container_register is None:
                raise FreshnessError("a container-scoped bundle without its container register")
            values = container_register_values(self.runtime_log, self.scope, self.runtime_algorithm)
            if not any(hmac.compare_digest(v, self.container_register) for v in values):
                raise FreshnessError(
                    f"the container register {self.container_register.hex()} is not the replay "
                    f"of the container's events in any prefix of the runtime log"
                )
        # (2) binding; a node-scoped request may not use the scoped requests' tag
        if self.scope == NODE and is_reserved(self.nonce, self.user_data):
            raise FreshnessError(
                "a node-scoped bundle whose nonce and user data end with the tag reserved "
                "for container-scoped and batched reports"
            )
        expected = self.expected_binding()
        if not hmac.compare_digest(expected, self.binding):
            raise FreshnessError(
                f"the bundle's binding {self.binding.hex()} is not the one its nonce and user "
                f"data give ({expected.hex()})"
            )
        # (3) batch proof
        nonce = self.report_nonce()
        if self.batch is not None:
            verify_inclusion(self.binding, self.batch, nonce)
        # (4) the report
        try:
            self.report.binds(nonce, self.report_user_data())
        except ParseError as e:
            raise FreshnessError(f"the report does not decode: {e}") from e

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self, *, logs: bool = True) -> dict[str, Any]:
        def records(log: Sequence[CELRecord] | None) -> list[dict[str, Any]] | None:
            return None if log is None else [r.to_dict() for r in log]

        out: dict[str, Any] = {
            "version": self.version,
            "agent_version": self.agent_version,
            "created": self.created,
            "platform": self.platform,
            "scope": self.scope,
            "nonce": self.nonce.hex(),
            "user_data": self.user_data.hex(),
            "binding": self.binding.hex(),
            "container_register": (
                None if self.container_register is None else self.container_register.hex()
            ),
            "runtime_register": {
                "register": self.runtime_register,
                "algorithm": self.runtime_algorithm,
                "start": self.runtime_start.hex(),
            },
            "batch": None
            if self.batch is None
            else {**self.batch.to_dict(), "root": (self.batch_root or b"").hex()},
            "report": self.report.to_dict(),
        }
        if logs:
            out["logs"] = {
                "boot": records(self.boot_log),
                "ima": records(self.ima_log),
                "runtime": records(self.runtime_log),
            }
        return out

    def to_json(self, *, indent: int | None = None) -> str:
        """The bundle as JSON text (compact unless ``indent`` is given)."""
        if indent:
            return json.dumps(self.to_dict(), indent=indent)
        return self.to_json_bytes().decode("ascii")

    def to_json_bytes(self) -> bytes:
        """The compact JSON, as UTF-8 (ASCII) bytes: ``json.dumps(to_dict())`` exactly.

        The logs are encoded one record at a time, so that a long IMA log is
        never held as a tree of dictionaries and as text at once.
        """
        return b"".join(self.json_pieces())

    def json_pieces(self, ima_log: Iterable[CELRecord] | None = None) -> Iterator[bytes]:
        """:meth:`to_json_bytes` in pieces (each record a piece), made as they are asked for.

        ``ima_log`` stands for the bundle's IMA log where it is given, so that a
        long log can be encoded from an iterator without being held whole.
        """
        encode = _COMPACT.encode
        yield encode(self.to_dict(logs=False))[:-1].encode("ascii")
        yield b',"logs":{'
        logs = (
            ("boot", self.boot_log),
            ("ima", self.ima_log if ima_log is None else ima_log),
            ("runtime", self.runtime_log),
        )
        for i, (name, log) in enumerate(logs):
            yield b'%s"%s":' % (b"," if i else b"", name.encode())
            if log is None:
                yield b"null"
                continue
            sep = b"["
            for record in log:
                yield sep + encode(record.to_dict()).encode("ascii")
                sep = b","
            yield b"]" if sep == b"," else b"[]"
        yield b"}}"

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str | None = None) -> EvidenceBundle:
        """Decode and validate a bundle (see the module docstring)."""
        if len(text) > MAX_BUNDLE_SIZE:
            raise ParseError(f"larger than {MAX_BUNDLE_SIZE} bytes", source=source)
        try:
            doc = loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ParseError(
                f"not JSON: {e}", line=getattr(e, "lineno", None), source=source
            ) from e
        except RecursionError:
            raise ParseError("JSON nested too deeply", source=source) from None
        try:
            return cls.from_dict(doc, parsed=True)
        except ParseError as e:
            raise (e.with_source(source) if source else e) from None

    @classmethod
    def from_dict(cls, doc: object, *, parsed: bool = False) -> EvidenceBundle:
        """Decode and validate a bundle's JSON document.

        ``parsed``: ``doc`` is what :func:`loads` returned, unchanged; a boot or
        IMA log byte-identical to one decoded before is then taken from
        :data:`cima.eventlog.cel.DECODED_LOGS` instead of being decoded again.
        """
        if not isinstance(doc, Mapping):
            raise ParseError("an evidence bundle is a JSON object")
        if "version" not in doc:
            raise ParseError("version: missing")
        version = doc["version"]
        if not isinstance(version, int) or isinstance(version, bool):
            raise ParseError(f"version: must be an integer, not {_type(version)}")
        if version != BUNDLE_VERSION:
            raise UnsupportedFormatError(
                f"evidence bundle version {version} is not supported (this cima reads "
                f"version {BUNDLE_VERSION})"
            )
        _exact_keys(doc, _KEYS, "")
        agent_version = _str(doc, "agent_version")
        created = _str(doc, "created")
        try:
            datetime.fromisoformat(created)
        except ValueError:
            raise ParseError(f"created: not an RFC 3339 time: {created!r}") from None
        platform = _str(doc, "platform")
        if platform not in PLATFORMS:
            raise ParseError(f"platform: must be one of {', '.join(PLATFORMS)}, not {platform!r}")
        scope = _str(doc, "scope")
        if scope != NODE and not _CONTAINER_SCOPE.fullmatch(scope):
            raise ParseError(f"scope: must be 'node' or 'container:<64 hex>', not {scope!r}")
        nonce = _hex(doc, "nonce", max_size=MAX_NONCE)
        user_data = _hex(doc, "user_data", max_size=MAX_USER_DATA)
        binding = _hex(doc, "binding", max_size=MAX_NONCE + MAX_USER_DATA)
        container_reg = (
            None
            if doc["container_register"] is None
            else _hex(doc, "container_register", max_size=64)
        )
        if scope != NODE and container_reg is None:
            raise ParseError("container_register: required for a container scope")
        runtime = _object(doc, "runtime_register")
        _exact_keys(runtime, ("register", "algorithm", "start"), "runtime_register.")
        runtime_register = _str(runtime, "register", "runtime_register.")
        try:
            check_name(runtime_register)
        except RegisterError as e:
            raise ParseError(f"runtime_register.register: {e}") from None
        runtime_algorithm = _algorithm(runtime, "algorithm", "runtime_register.")
        runtime_start = _hex(runtime, "start", "runtime_register.", max_size=64)
        if len(runtime_start) != by_name(runtime_algorithm).digest_size:
            raise ParseError(
                f"runtime_register.start: {len(runtime_start)} bytes, {runtime_algorithm} "
                f"needs {by_name(runtime_algorithm).digest_size}"
            )
        batch, batch_root = _batch(doc["batch"])
        report = _report(doc["report"])
        if platform == "tdx" and report.type != "tdx-quote":
            raise ParseError(f"report.type: a tdx platform gives a tdx-quote, not {report.type}")
        if platform != "tdx" and report.type != "tpm-quote":
            raise ParseError(f"report.type: a {platform} platform gives a tpm-quote")
        logs = _object(doc, "logs")
        _exact_keys(logs, _LOGS, "logs.")
        boot_log = _records(logs, "boot", nullable=True, memo=parsed)
        ima_log = _records(logs, "ima", nullable=True, memo=parsed)
        runtime_log = _records(logs, "runtime", nullable=False)
        assert runtime_log is not None
        return cls(
            platform=platform,
            report=report,
            nonce=nonce,
            user_data=user_data,
            scope=scope,
            binding=binding,
            runtime_register=runtime_register,
            runtime_algorithm=runtime_algorithm,
            runtime_start=runtime_start,
            runtime_log=runtime_log,
            boot_log=boot_log,
            ima_log=ima_log,
            container_register=container_reg,
            batch=batch,
            batch_root=batch_root,
            created=created,
            agent_version=agent_version,
            version=version,
        )


def utc_now() -> str:
    """The current time as the bundles write it (RFC 3339, UTC, microseconds)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- field readers (every error names its field) ------------------------------------------------


def _type(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), "an array" if isinstance(value, list) else "an object"
    )


def _exact_keys(obj: Mapping[str, Any], keys: Sequence[str], prefix: str) -> None:
    for key in obj:
        if key not in keys:
            raise ParseError(f"{prefix}{key}: unknown field")
    for key in keys:
        if key not in obj:
            raise ParseError(f"{prefix}{key}: missing")


def _str(obj: Mapping[str, Any], key: str, prefix: str = "") -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ParseError(f"{prefix}{key}: must be a string, not {_type(value)}")
    return value


def _object(obj: Mapping[str, Any], key: str, prefix: str = "") -> Mapping[str, Any]:
    value = obj[key]
    if not isinstance(value, Mapping):
        raise ParseError(f"{prefix}{key}: must be an object, not {_type(value)}")
    return value


def _hex(obj: Mapping[str, Any], key: str, prefix: str = "", *, max_size: int) -> bytes:
    text = _str(obj, key, prefix)
    if len(text) > 2 * max_size:
        raise ParseError(f"{prefix}{key}: more than {max_size} bytes")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ParseError(f"{prefix}{key}: not a hex string") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(obj: Mapping[str, Any], key: str, prefix: str) -> bytes:
    text = _str(obj, key, prefix)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ParseError(f"{prefix}{key}: not base64") from None


def _algorithm(obj: Mapping[str, Any], key: str, prefix: str) -> str:
    text = _str(obj, key, prefix)
    try:
        return by_name(text).name
    except AlgorithmError as e:
        raise ParseError(f"{prefix}{key}: {e}") from None


def _batch(raw: object) -> tuple[InclusionProof | None, bytes | None]:
    if raw is None:
        return None, None
    if not isinstance(raw, Mapping):
        raise ParseError(f"batch: must be an object or null, not {_type(raw)}")
    if "root" not in raw:
        raise ParseError("batch.root: missing")
    proof = InclusionProof.from_dict({k: v for k, v in raw.items() if k != "root"})
    root = _hex(raw, "root", "batch.", max_size=64)
    if len(root) != by_name(proof.algorithm).digest_size:
        raise ParseError(
            f"batch.root: {len(root)} bytes, {proof.algorithm} needs "
            f"{by_name(proof.algorithm).digest_size}"
        )
    return proof, root


def _report(raw: object) -> Report:
    if not isinstance(raw, Mapping):
        raise ParseError(f"report: must be an object, not {_type(raw)}")
    if "type" not in raw:
        raise ParseError("report.type: missing")
    kind = raw["type"]
    if kind == "tdx-quote":
        _exact_keys(raw, ("type", "quote"), "report.")
        return TDXQuoteReport(_unb64(raw, "quote", "report."))
    if kind != "tpm-quote":
        raise ParseError(f"report.type: must be tpm-quote or tdx-quote, not {kind!r}")
    _exact_keys(
        raw,
        ("type", "attest", "signature", "ak_pem", "hash_algorithm", "pcrs", "ek_certificate_pem"),
        "report.",
    )
    pcrs_raw = raw["pcrs"]
    if not isinstance(pcrs_raw, list):
        raise ParseError(f"report.pcrs: must be an array, not {_type(pcrs_raw)}")
    pcrs: list[RegisterValue] = []
    for i, item in enumerate(pcrs_raw):
        where = f"report.pcrs[{i}]."
        if not isinstance(item, Mapping):
            raise ParseError(f"report.pcrs[{i}]: must be an object, not {_type(item)}")
        _exact_keys(item, ("register", "algorithm", "digest"), where)
        register = _str(item, "register", where)
        try:
            check_name(register)
        except RegisterError as e:
            raise ParseError(f"{where}register: {e}") from None
        algorithm = _algorithm(item, "algorithm", where)
        digest = _hex(item, "digest", where, max_size=64)
        if len(digest) != by_name(algorithm).digest_size:
            raise ParseError(
                f"{where}digest: {len(digest)} bytes, {algorithm} needs "
                f"{by_name(algorithm).digest_size}"
            )
        pcrs.append(RegisterValue(register, algorithm, digest))
    ek = raw["ek_certificate_pem"]
    if ek is not None and not isinstance(ek, str):
        raise ParseError(f"report.ek_certificate_pem: must be a string or null, not {_type(ek)}")
    return TPMQuoteReport(
        attest=_unb64(raw, "attest", "report."),
        signature=_unb64(raw, "signature", "report."),
        ak_pem=_str(raw, "ak_pem", "report."),
        hash_algorithm=_algorithm(raw, "hash_algorithm", "report."),
        pcrs=tuple(pcrs),
        ek_certificate_pem=ek,
    )


def _records(
    logs: Mapping[str, Any], key: str, *, nullable: bool, memo: bool = False
) -> tuple[CELRecord, ...] | None:
    raw = logs[key]
    if raw is None and nullable:
        return None
    if not isinstance(raw, list):
        what = "an array or null" if nullable else "an array"
        raise ParseError(f"logs.{key}: must be {what}, not {_type(raw)}")
    if memo:
        # A value orjson parsed serialises back to one text per value (no NaN, no big
        # integers, floats in their shortest form): equal texts, equal logs.
        return DECODED_LOGS.decode(orjson.dumps(raw), len(raw), lambda: _decode_records(raw, key))
    return _decode_records(raw, key)


def _decode_records(raw: list[Any], key: str) -> tuple[CELRecord, ...]:
    out: list[CELRecord] = []
    for i, item in enumerate(raw):
        try:
            out.append(CELRecord.from_dict(item, position=i))
        except ParseError as e:
            raise ParseError(f"logs.{key}[{i}]: {e.reason}") from None
        if key == "runtime" and out[-1].content_type != CIMA:
            raise ParseError(f"logs.runtime[{i}].content_type: must be {CIMA}")
    return tuple(out)
