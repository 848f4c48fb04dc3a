"""Appraisal of an evidence bundle against reference values (DESIGN.md section 9).

:func:`appraise` runs the six steps in order and returns an
:class:`~cima.verifier.result.AttestationResult`; it never returns a bare bool
and never stops at the first doubt after the report is trusted: every failure
found is recorded with the step, the specific error class, the register, the
log and the event that caused it.

Steps:

(1) parse the report: the TPMS_ATTEST and TPMT_SIGNATURE (TPM, software
    platform) or the TDX quote, exactly as received; the quoted PCR values
    cover the quote's selection; the AK PEM is the canonical encoding of its
    key; nothing but zero padding follows a TDX quote. (:class:`ReportFormatError`)
(2) the signature chain: TPM and software platform: the AK is trusted by
    registration (its public key or its TPM name is in the reference values'
    ``trusted_keys``) or by EK certificate (its TPM name is one of the caller's
    ``enrolled_keys``: the verifier service's enrollment checked the EK
    certificate up to a TPM manufacturer's root and the TPM activated a
    credential bound to the AK's name), its signature covers the attest bytes
    and the pcrDigest covers the PCR values; TDX: the quote verifies offline up
    to the Intel SGX Root CA (or a root the reference values add). An EK
    certificate in the bundle is not a trust path by itself: tying an AK to an
    EK takes credential activation, which enrollment does. The details say
    which path trusted the key (``attestation_key_trust``: ``registration`` or
    ``ek-certificate``). (:class:`UntrustedKeyError`,
    :class:`~cima.errors.SignatureError`)
(3) freshness: the report binds the expected nonce and user data (DESIGN.md
    section 4): the bundle's binding is the one the nonce, user data and, for a
    container scope, the container's register give; a batch's Merkle proof
    leads from it to the root the report binds. A legacy verifier's exact
    ``report_data`` (TPM extraData, TDX REPORTDATA) can be checked instead.
    A nonce used twice is the caller's business (the service's store).
    (:class:`~cima.errors.FreshnessError`)
(4) replay every log and compare with the quoted registers: the boot log (TCG
    or CCEL records), then the IMA log (it may run ahead of the quote: the
    shortest matching prefix counts, the rest is reported unverified), then the
    runtime journal into the runtime register. IMA template hashes are
    recomputed on the way. (:class:`~cima.errors.ReplayMismatchError`)
(5) appraise the events against the reference values: the boot registers and
    the boot events that explain them, event by event (type, digests, data);
    the TD's identity; the kernel, command line and initrd; IMA file digests
    by path, signatures with trusted keys, the boot aggregate; every journal
    event's content against its digest, system processes, the agent's code
    and policy, pods and container images. (:class:`ReferenceMismatchError`)
(6) the result: a status per submodule and each failure with its cause, the
    reconstructed environment, and the state for an incremental appraisal.

Incremental appraisal: with ``state`` from an earlier result, only the IMA
entries after those appraised before are hashed and appraised, when the boot is
the same (TPM: the AK and the quote's resetCount and restartCount; TDX: MRTD,
RTMR0 and RTMR1), the reference values are the same, and the stored IMA
register values at the end of the earlier prefix lead to the quoted values.
Anything else starts over, and the result says why.

What a boot log says by itself (its replay, the registers it extends, the
kernel and boot applications it names, its events as references list them)
is kept for the boot logs seen last, by the log's canonical digest
(:data:`BOOT_FACTS`): a node sends the same boot log until it reboots. Only a
byte-identical log is served from it, and every appraisal still compares the
replay with the registers of its own quote and the events with the reference
values.

What the runtime journal's events are expected to carry (their ``data``):
``process``: ``exe_digest`` (``alg:hex``) and, with parameters, ``cmdline``
(a list); ``agent``: ``code_digest``; ``policy``: ``policy_digest`` and
``file_digest``; ``pod``: ``name`` and ``namespace`` (else the subject
``namespace/name``), ``uid``; ``container``: its image as ``image_digest``,
``image_id``, ``image_ref``, ``image`` or ``repo_digests``, and its pod as
``pod_uid``, ``pod``, ``pod_name`` or ``sandbox_id``. A pod matches a reference
entry of its name, or of its name's prefix before ``-<node>`` (static pods).
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cima.digests import by_id, by_name, is_known_id
from cima.errors import (
    CimaError,
    FreshnessError,
    ParseError,
    ReplayMismatchError,
    SignatureError,
)
from cima.eventlog import uefi
from cima.eventlog.cel import CIMA, IMA_TEMPLATE, PCCLIENT_STD, CELRecord, log_digest
from cima.eventlog.replay import Replayer
from cima.evidence.bundle import EvidenceBundle, TDXQuoteReport, TPMQuoteReport
from cima.registers import PCR_TO_TD, RegisterBank, sort_key
from cima.verifier.reference import (
    CompiledBoot,
    CompiledReferences,
    ReferenceValues,
    refs_digest,
)
from cima.verifier.result import (
    AFFIRMING,
    CONTRAINDICATED,
    NONE,
    SUBMODULES,
    VERIFIER_ID,
    WARNING,
    AttestationResult,
    Failure,
    Part,
    Status,
    Submodule,
    status_of,
    worst,
)

__all__ = [
    "AppraisalState",
    "EvidenceView",
    "KernelFacts",
    "LogFormatError",
    "ReferenceMismatchError",
    "ReportFormatError",
    "UntrustedKeyError",
    "appraise",
    "boot_config",
    "container_images",
    "ima_file_digests",
    "kernel_facts",
    "pod_name",
]

STATE_VERSION = 1
#: Failures kept per submodule and code; the rest are counted in the submodule's details.
MAX_FAILURES_PER_CODE = 50
_TDX_ALG = "sha384"
_LINUX_LOAD_OPTIONS = 0x8F3B22ED
_LINUX_INITRD = 0x8F3B22EC
_BOOT_APPS = (
    int(uefi.EventType.EV_EFI_BOOT_SERVICES_APPLICATION),
    int(uefi.EventType.EV_EFI_BOOT_SERVICES_DRIVER),
    int(uefi.EventType.EV_EFI_RUNTIME_SERVICES_DRIVER),
)
_EV_IPL = int(uefi.EventType.EV_IPL)
_EV_EVENT_TAG = int(uefi.EventType.EV_EVENT_TAG)
_EV_S_CRTM_VERSION = int(uefi.EventType.EV_S_CRTM_VERSION)
_EV_NO_ACTION = int(uefi.EventType.EV_NO_ACTION)


# -- errors -----------------------------------------------------------------------------------


class ReportFormatError(ParseError):
    """Step 1: the report does not decode, or its parts do not fit together."""


class UntrustedKeyError(SignatureError):
    """Step 2: the attestation key is not one the reference values trust."""


class LogFormatError(ParseError):
    """Step 4: a log's records cannot be replayed (wrong content type, register, digests)."""


class ReferenceMismatchError(CimaError):
    """Step 5: an event differs from the reference values."""


class TemplateHashError(ReplayMismatchError):
    """Step 4: an IMA entry's template hash is not the hash of its template data."""


# -- the evidence, decoded --------------------------------------------------------------------

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(slots=True)
class EvidenceView:
    """A bundle with its report decoded (step 1) and its logs split by kind."""

    bundle: EvidenceBundle
    platform: str
    quoted: dict[tuple[str, str], bytes]
    boot_records: tuple[CELRecord, ...]
    ima_records: tuple[CELRecord, ...]
    runtime_records: tuple[CELRecord, ...]
    tpm_quote: Any = None
    tpm_signature: Any = None
    ak_key: PublicKey | None = None
    ak_pem: str | None = None
    hash_algorithm: str | None = None
    tdx_quote: Any = None
    _ima_regs: frozenset[str] | None = None

    @classmethod
    def of(cls, bundle: EvidenceBundle) -> EvidenceView:
        """Decode ``bundle``'s report; raise :class:`ReportFormatError` naming what is wrong."""
        report = bundle.report
        view = cls(
            bundle=bundle,
            platform=bundle.platform,
            quoted={},
            boot_records=tuple(bundle.boot_log or ()),
            ima_records=tuple(bundle.ima_log or ()),
            runtime_records=tuple(bundle.runtime_log),
        )
        if isinstance(report, TPMQuoteReport):
            view._decode_tpm(report)
        elif isinstance(report, TDXQuoteReport):
            view._decode_tdx(report)
        else:  # pragma: no cover - the bundle codec admits only these two
            raise ReportFormatError(f"report type {report.type!r} is not appraised")
        return view

    def _decode_tpm(self, report: TPMQuoteReport) -> None:
        from cima.evidence.tpm import Quote, Signature

        try:
            quote = Quote.from_bytes(report.attest)
        except ParseError as e:
            raise ReportFormatError(f"report.attest: {e.reason}", offset=e.offset) from None
        if not quote.is_quote:
            raise ReportFormatError(
                f"report.attest: attestation type {quote.type_name} is not a quote", offset=4
            )
        try:
            sig = Signature.from_bytes(report.signature)
        except ParseError as e:
            raise ReportFormatError(f"report.signature: {e.reason}", offset=e.offset) from None
        sig_alg = by_id(sig.hash_alg).name if is_known_id(sig.hash_alg) else None
        if sig_alg != report.hash_algorithm:
            raise ReportFormatError(
                f"report.hash_algorithm is {report.hash_algorithm}, the signature's hash is "
                f"{sig_alg or f'0x{sig.hash_alg:04x}'}"
            )
        try:
            key = serialization.load_pem_public_key(report.ak_pem.encode())
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise ReportFormatError(f"report.ak_pem: not a PEM public key: {e}") from None
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise ReportFormatError(f"report.ak_pem: a {type(key).__name__}, not RSA or EC")
        canonical = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        if canonical.strip() != report.ak_pem.strip():
            raise ReportFormatError("report.ak_pem: not the canonical PEM encoding of its key")
        selected = quote.selected()
        given = [(v.register, v.algorithm) for v in report.pcrs]
        if len(set(given)) != len(given):
            raise ReportFormatError("report.pcrs: a register is listed twice")
        if set(given) != set(selected):
            missing = sorted(set(selected) - set(given), key=lambda k: (k[1], sort_key(k[0])))
            extra = sorted(set(given) - set(selected), key=lambda k: (k[1], sort_key(k[0])))
            parts = []
            if missing:
                parts.append("missing " + ", ".join(f"{r}/{a}" for r, a in missing))
            if extra:
                parts.append(
                    "not selected by the quote: " + ", ".join(f"{r}/{a}" for r, a in extra)
                )
            raise ReportFormatError(
                f"report.pcrs do not match the quote's selection: {'; '.join(parts)}"
            )
        self.tpm_quote = quote
        self.tpm_signature = sig
        self.ak_key = key
        self.ak_pem = canonical
        self.hash_algorithm = report.hash_algorithm
        self.quoted = {(v.register, v.algorithm): v.digest for v in report.pcrs}

    def _decode_tdx(self, report: TDXQuoteReport) -> None:
        from cima.evidence.tdx import TDXQuote

        try:
            quote = TDXQuote.from_bytes(report.quote)
        except ParseError as e:
            raise ReportFormatError(f"report.quote: {e.reason}", offset=e.offset) from None
        if quote.trailing.strip(b"\x00"):
            at = quote.size + next(i for i, b in enumerate(quote.trailing) if b)
            raise ReportFormatError(
                f"report.quote: {len(quote.trailing)} bytes follow the quote and they are not "
                "zero padding",
                offset=at,
            )
        self.tdx_quote = quote
        self.quoted = {(name, _TDX_ALG): value for name, value in quote.registers().items()}

    # -- facts about the report ---------------------------------------------------------------
    @property
    def is_tdx(self) -> bool:
        return self.tdx_quote is not None

    def ak_tpm_name(self) -> bytes | None:
        """The AK's TPM name, for an AK made with the standard restricted-signing template."""
        if self.ak_key is None or self.hash_algorithm is None:
            return None
        from cima.evidence.tpm import PublicArea

        try:
            return PublicArea.from_public_key(self.ak_key, algorithm=self.hash_algorithm).name
        except CimaError:
            return None

    def tdx_fields(self) -> dict[str, bytes]:
        """The TD identity fields reference values may pin (empty for a TPM)."""
        if self.tdx_quote is None:
            return {}
        b = self.tdx_quote.body
        return {
            "mrseam": b.mrseam,
            "mrsignerseam": b.mrsignerseam,
            "td_attributes": b.td_attributes,
            "xfam": b.xfam,
            "mrconfigid": b.mrconfigid,
            "mrowner": b.mrowner,
            "mrownerconfig": b.mrownerconfig,
        }

    def ima_register(self, record: CELRecord) -> str:
        """The register an IMA record extends (a PCR index maps to its TD register in a TD)."""
        return self.map_ima_register(record.register)

    def map_ima_register(self, reg: str) -> str:
        if self.is_tdx and reg.startswith("pcr"):
            index = int(reg[3:])
            return f"rtmr{index}" if index <= 3 else PCR_TO_TD.get(reg, reg)
        return reg

    def ima_registers(self) -> frozenset[str]:
        """Every register the IMA log extends."""
        if self._ima_regs is None:
            self._ima_regs = frozenset(
                self.map_ima_register(reg) for reg in {r.register for r in self.ima_records}
            )
        return self._ima_regs

    def runtime_events(self) -> list[Any]:
        """The runtime journal's records as :class:`cima.agent.events.RuntimeEvent`."""
        from cima.agent.events import RuntimeEvent

        out = []
        for r in self.runtime_records:
            if r.content_type != CIMA or len(r.digests) != 1:
                continue
            out.append(RuntimeEvent.from_cel(r))
        return out


# -- boot log facts (shared with reference creation) ---------------------------------------------


def _event_type(r: CELRecord) -> int:
    """A boot event's type (-1 for a record of another kind: its content is not a boot event's)."""
    if r.content_type != PCCLIENT_STD:
        return -1
    return int(r.content.get("event_type", -1))


def _event_data(r: CELRecord) -> bytes:
    if r.content_type != PCCLIENT_STD:
        return b""
    data = r.content.get("event_data", b"")
    return data if isinstance(data, bytes) else b""


def _note(event_type: int, data: bytes) -> str | None:
    """A short text saying what a boot event is about (for people reading references)."""
    d = uefi.decode(event_type, data)
    for key in ("variable_name", "description", "device_path", "string", "signature"):
        value = d.get(key)
        if isinstance(value, str) and value:
            text = " ".join(value.split())
            return text if len(text) <= 100 else text[:97] + "..."
    return None


def _replay_boot(records: Sequence[CELRecord]) -> RegisterBank:
    r = Replayer()
    r.feed_all(records)
    return r.bank


def boot_config(view: EvidenceView, *, name: str = "") -> dict[str, Any]:
    """A reference ``boot`` entry (the YAML form) for the boot of ``view``."""
    bank = _replay_boot(view.boot_records)
    owned = view.ima_registers() | {view.bundle.runtime_register}
    touched = {r.register for r in view.boot_records if r.extends}
    registers: dict[str, dict[str, str]] = {}
    for v in bank:
        registers.setdefault(v.register, {})[v.algorithm] = v.digest.hex()
    for (reg, alg), value in view.quoted.items():
        if reg in touched or reg in owned:
            continue
        registers.setdefault(reg, {})[alg] = value.hex()
    events = []
    for r in view.boot_records:
        et = _event_type(r)
        data = _event_data(r)
        entry: dict[str, Any] = {
            "register": r.register,
            "type": uefi.event_type_name(et),
            "digests": {alg: d.hex() for alg, d in r.digests},
            "data": "sha256:" + hashlib.sha256(data).hexdigest(),
        }
        note = _note(et, data)
        if note:
            entry["note"] = note
        events.append(entry)
    return {
        "name": name,
        "registers": {reg: registers[reg] for reg in sorted(registers, key=sort_key)},
        "events": events,
    }


@dataclass(frozen=True, slots=True)
class Measured:
    """Something the boot log measured: its name, its digests, the event that says so."""

    name: str
    digests: tuple[tuple[str, bytes], ...]
    index: int


@dataclass(frozen=True, slots=True)
class CommandLine:
    text: str
    index: int


@dataclass(frozen=True, slots=True)
class KernelFacts:
    """The kernel, command line and initrd as the boot log names them."""

    images: tuple[Measured, ...] = ()
    cmdlines: tuple[CommandLine, ...] = ()
    initrds: tuple[Measured, ...] = ()
    load_options: tuple[Measured, ...] = ()


def _ipl_text(data: bytes) -> str | None:
    """EV_IPL text (GRUB and shim write ASCII, NUL-terminated); None when it is not text."""
    raw = data.rstrip(b"\x00")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        text = None
    if text is not None and not text.translate(_TEXT_CHARS):
        return text
    decoded = uefi.text_of(data)
    return None if decoded is None else decoded.rstrip("\x00")


#: Deletes printable ASCII and white space: what is left is not text.
_TEXT_CHARS = dict.fromkeys([*range(0x20, 0x7F), 0x09, 0x0A, 0x0D])


def _path_of(arg: str) -> str:
    """A GRUB file argument without its device: ``(hd0,gpt2)/vmlinuz`` -> ``/vmlinuz``."""
    if arg.startswith("(") and ")" in arg:
        arg = arg[arg.index(")") + 1 :]
    return arg


def kernel_facts(view: EvidenceView) -> KernelFacts:
    """Find the kernel, its command line and initrd in the boot log.

    GRUB logs ``grub_cmd: linux PATH ARGS`` and ``grub_cmd: initrd PATH`` (EV_IPL),
    then measures each file it reads with its path as the event data (pcr9, or
    the TD register that stands for it), and the command line as
    ``kernel_cmdline: PATH ARGS``. The Linux EFI stub tags its load options
    (0x8F3B22ED) and initrd (0x8F3B22EC) with EV_EVENT_TAG. A kernel started as
    an EFI application (systemd-boot, a UKI) with no GRUB record is the last
    boot services application.
    """
    return _kernel_facts(view.boot_records)


def _kernel_facts(records: Sequence[CELRecord]) -> KernelFacts:
    kernels: list[str] = []
    initrd_paths: list[str] = []
    images: list[Measured] = []
    initrds: list[Measured] = []
    cmdlines: list[CommandLine] = []
    load_options: list[Measured] = []
    apps: list[Measured] = []
    for i, r in enumerate(records):
        if r.content_type != PCCLIENT_STD:
            continue
        et = _event_type(r)
        data = _event_data(r)
        if et == _EV_IPL:
            text = _ipl_text(data)
            if text is None:
                continue
            if text.startswith("grub_cmd: "):
                words = text[len("grub_cmd: ") :].split()
                if len(words) >= 2 and words[0] in ("linux", "linuxefi", "linux16"):
                    kernels.append(_path_of(words[1]))
                elif len(words) >= 2 and words[0] in ("initrd", "initrdefi", "initrd16"):
                    initrd_paths.extend(_path_of(w) for w in words[1:])
            elif text.startswith("kernel_cmdline: "):
                cmdlines.append(CommandLine(" ".join(text[len("kernel_cmdline: ") :].split()), i))
            elif text.startswith("grub_kernel_cmdline "):
                cmdlines.append(
                    CommandLine(" ".join(text[len("grub_kernel_cmdline ") :].split()), i)
                )
            else:
                path = _path_of(text)
                if path in kernels and not any(m.index == i for m in images):
                    images.append(Measured(path, tuple(r.digests), i))
                elif path in initrd_paths:
                    initrds.append(Measured(path, tuple(r.digests), i))
        elif et == _EV_EVENT_TAG and len(data) >= 8:
            tag = int.from_bytes(data[:4], "little")
            if tag == _LINUX_LOAD_OPTIONS:
                load_options.append(Measured("linux load options", tuple(r.digests), i))
            elif tag == _LINUX_INITRD and not initrds:
                initrds.append(Measured("initrd (EFI stub)", tuple(r.digests), i))
        elif et in _BOOT_APPS[:1]:
            d = uefi.decode(et, data)
            apps.append(
                Measured(str(d.get("device_path") or "boot application"), tuple(r.digests), i)
            )
    if not images and not kernels and apps and load_options:
        images.append(apps[-1])
    return KernelFacts(tuple(images), tuple(cmdlines), tuple(initrds), tuple(load_options))


# -- what a boot log says by itself (memoised by the log's digest) ------------------------------


@dataclass(slots=True)
class BootFacts:
    """What the appraisal derives from a boot log alone: a function of its records only.

    Nothing here depends on the quote, the nonce or the reference values, so it
    can be kept for a byte-identical boot log (:data:`BOOT_FACTS`, by the
    log's canonical digest): the replayed values are still compared with the
    quoted registers of every report, and the events with the reference values.
    """

    values: dict[tuple[str, str], bytes]
    """The boot log's replay: (register, bank) -> value."""
    replay_error: str | None
    """Why the log cannot be replayed (``values`` is then empty)."""
    touched: frozenset[str]
    """The registers the log's events extend."""
    kernel: KernelFacts
    crtm_version: str | None
    """The firmware version (EV_S_CRTM_VERSION), as shown."""
    applications: tuple[tuple[int, int, str, str, tuple[str, bytes] | None], ...]
    """Boot applications and drivers: (event, type, name, register, first digest)."""
    event_keys: dict[str, tuple[tuple[Any, ...], ...]] = field(default_factory=dict)
    """Each event as boot references list it, by the algorithm of their data digests."""

    @classmethod
    def of(cls, records: Sequence[CELRecord]) -> BootFacts:
        values: dict[tuple[str, str], bytes] = {}
        error = None
        try:
            values = {(v.register, v.algorithm): v.digest for v in _replay_boot(records)}
        except (CimaError, KeyError, ValueError, TypeError) as e:
            error = f"the boot log cannot be replayed: {e}"
        touched = frozenset(
            r.register for r in records if r.content_type == PCCLIENT_STD and r.extends
        )
        crtm: str | None = None
        apps = []
        for i, r in enumerate(records):
            et = _event_type(r)
            if et == _EV_S_CRTM_VERSION:
                crtm = _ipl_text(_event_data(r)) or _event_data(r).hex()
            elif et in _BOOT_APPS:
                d = uefi.decode(et, _event_data(r))
                name = str(d.get("device_path") or uefi.event_type_name(et))
                apps.append((i, et, name, r.register, r.digests[0] if r.digests else None))
        return cls(values, error, touched, _kernel_facts(records), crtm, tuple(apps))

    def bank(self) -> RegisterBank:
        """The replay as a register bank of its own."""
        bank = RegisterBank()
        for (reg, alg), value in self.values.items():
            bank.set(reg, alg, value)
        return bank

    def keys(self, records: Sequence[CELRecord], algorithm: str) -> tuple[tuple[Any, ...], ...]:
        """(register, type, sorted digests, (algorithm, digest of the data)) of each event."""
        found = self.event_keys.get(algorithm)
        if found is None:
            found = tuple(
                (
                    r.register,
                    _event_type(r),
                    tuple(sorted(r.digests)),
                    (algorithm, hashlib.new(algorithm, _event_data(r)).digest()),
                )
                for r in records
            )
            self.event_keys[algorithm] = found
        return found


class BootFactsMemo:
    """The :class:`BootFacts` of the boot logs seen last, by canonical digest (bounded)."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._facts: OrderedDict[bytes, BootFacts] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def of(self, records: Sequence[CELRecord]) -> BootFacts:
        digest = log_digest(records) if records else None
        if digest is None:
            return BootFacts.of(records)
        with self._lock:
            found = self._facts.get(digest)
            if found is not None:
                self._facts.move_to_end(digest)
                self.hits += 1
                return found
        facts = BootFacts.of(records)
        with self._lock:
            self.misses += 1
            self._facts[digest] = facts
            while len(self._facts) > self.size:
                self._facts.popitem(last=False)
        return facts

    def clear(self) -> None:
        with self._lock:
            self._facts.clear()


#: The process's memo of boot facts: a node that attests again in the same boot sends the
#: same boot log, and a fleet boots the same firmware and kernel.
BOOT_FACTS = BootFactsMemo()


# -- IMA entries (shared with reference creation) --------------------------------------------------

_U32 = int.from_bytes


def _split_fields(data: bytes) -> list[bytes] | None:
    out = []
    p = 0
    n = len(data)
    while p < n:
        if n - p < 4:
            return None
        ln = _U32(data[p : p + 4], "little")
        p += 4
        if ln > n - p:
            return None
        out.append(data[p : p + ln])
        p += ln
    return out


class IMAFacts(NamedTuple):
    """What appraisal needs from one IMA entry's template data."""

    name: str
    algorithm: str | None
    digest: bytes | None
    signature: bytes | None
    buffer: bytes | None
    #: A ``d-ngv2`` digest's type (``ima`` or ``verity``); None for other digest fields.
    digest_type: str | None = None
    #: ``ima-modsig``: the appended PKCS#7 signature and the digest it covers (``d-modsig``).
    modsig: bytes | None = None
    modsig_algorithm: str | None = None
    modsig_digest: bytes | None = None


#: A file signature's verdict, kept per distinct signature and digest: None when
#: it verifies, "" when no trusted key answers (the digest decides), else why not
#: and the error's class.
_SigOutcome = tuple[str, type[Exception]] | str | None


def _signature_outcome(
    cache: dict[tuple[bytes, bytes, str | None], _SigOutcome],
    key: tuple[bytes, bytes, str | None],
    verify: Callable[[], object],
) -> _SigOutcome:
    """What ``verify`` says of one signature over one digest, worked out once per ``key``."""
    from cima.verifier.imasig import (
        IMASignatureError,
        IMASignatureParseError,
        IMASignatureUnsupportedError,
        UnknownKeyError,
    )

    if key not in cache:
        try:
            verify()
        except (UnknownKeyError, IMASignatureUnsupportedError):
            cache[key] = ""
        except (IMASignatureError, IMASignatureParseError) as e:
            cache[key] = (str(e), type(e))
        else:
            cache[key] = None
    return cache[key]


_unpack_u32 = struct.Struct("<I").unpack_from
_TEMPLATE_IDS: dict[str, tuple[str, ...] | None] = {}
_ALGORITHM_TEXT: dict[bytes, str] = {}
_NG = ("d-ng", "n-ng")
_SIG = ("d-ng", "n-ng", "sig")


def _template_ids(template: str) -> tuple[str, ...] | None:
    try:
        return _TEMPLATE_IDS[template]
    except KeyError:
        from cima.eventlog.ima import template_fields

        ids = template_fields(template)
        if len(_TEMPLATE_IDS) < 256:
            _TEMPLATE_IDS[template] = ids
        return ids


def _ima_facts(template: str, data: bytes) -> IMAFacts | str:
    """Decode an entry's fields; a string says why they do not decode."""
    ids = _template_ids(template)
    if ids in (_NG, _SIG):
        # The common templates, ima-ng and ima-sig: d-ng, n-ng (, sig).
        n = len(data)
        e1 = e2 = e3 = -1
        try:
            e1 = 4 + _unpack_u32(data, 0)[0]
            e2 = e1 + 4 + _unpack_u32(data, e1)[0]
            e3 = e2 + 4 + _unpack_u32(data, e2)[0] if len(ids) == 3 else e2
        except struct.error:
            e3 = -1
        if 0 < e1 <= e2 <= e3 == n:
            d = data[4:e1]
            nul = d.find(b"\x00")
            if nul >= 1 and d[nul - 1] == 0x3A:
                raw_alg = d[: nul - 1]
                alg = _ALGORITHM_TEXT.get(raw_alg)
                if alg is None:
                    alg = raw_alg.decode("ascii", "backslashreplace")
                    if len(_ALGORITHM_TEXT) < 64:
                        _ALGORITHM_TEXT[raw_alg] = alg
                raw_name = data[e1 + 4 : e2]
                if raw_name[-1:] == b"\x00":
                    raw_name = raw_name[:-1]
                elif b"\x00" in raw_name:
                    raw_name = raw_name[: raw_name.find(b"\x00")]
                sig = data[e2 + 4 : e3] if e3 > e2 + 4 else None
                return IMAFacts(
                    raw_name.decode("utf-8", "backslashreplace"), alg, d[nul + 1 :], sig, None
                )
        # Anything else takes the careful path below, which says what is wrong.
    if template == "ima":
        if len(data) < 24:
            return "template data of the 'ima' template is shorter than 24 bytes"
        nlen = _U32(data[20:24], "little")
        if 24 + nlen != len(data):
            return "template data of the 'ima' template does not end after its name"
        return IMAFacts(
            data[24:].decode("utf-8", "backslashreplace"), "sha1", data[:20], None, None
        )
    if ids is None:
        return f"template {template!r} is unknown: its fields cannot be appraised"
    parts = _split_fields(data)
    if parts is None or len(parts) != len(ids):
        return f"template data does not hold the {len(ids)} fields of {template!r}"
    name = None
    alg = dtype = None
    digest = sig = buf = None
    modsig = modsig_alg = modsig_digest = None
    for fid, value in zip(ids, parts, strict=True):
        if fid in ("d-ng", "d-ngv2", "d"):
            if fid == "d":
                alg, digest = "sha1", value
                continue
            nul = value.find(b"\x00")
            if nul < 1 or value[nul - 1] != 0x3A:
                return f"field {fid} is not 'ALGORITHM:' NUL DIGEST"
            prefix = value[: nul - 1].decode("ascii", "backslashreplace")
            if fid == "d-ngv2":
                # "ima:sha256" or "verity:sha256" (the digest's type, then its algorithm).
                dtype, _, alg = prefix.rpartition(":")
                dtype = dtype or None
            else:
                alg = prefix
            digest = value[nul + 1 :]
        elif fid == "d-modsig":
            if not value:
                continue  # no appended signature: the kernel leaves the field empty
            nul = value.find(b"\x00")
            if nul < 1 or value[nul - 1] != 0x3A:
                return "field d-modsig is not 'ALGORITHM:' NUL DIGEST"
            modsig_alg = value[: nul - 1].decode("ascii", "backslashreplace")
            modsig_digest = value[nul + 1 :]
        elif fid == "modsig":
            modsig = value or None
        elif fid in ("n-ng", "n"):
            nul = value.find(b"\x00")
            raw = value if nul < 0 else value[:nul]
            name = raw.decode("utf-8", "backslashreplace")
        elif fid == "sig":
            sig = value or None
        elif fid == "buf":
            buf = value
    if (modsig is None) != (modsig_digest is None):
        return "fields d-modsig and modsig must both be empty or both be present"
    return IMAFacts(name or "", alg, digest, sig, buf, dtype, modsig, modsig_alg, modsig_digest)


def ima_file_digests(view: EvidenceView) -> Iterator[tuple[str, str, bytes]]:
    """(path, algorithm, digest) of every IMA entry that is not a violation."""
    for r in view.ima_records:
        if r.content_type != IMA_TEMPLATE or not r.digests:
            continue
        if not r.digests[0][1].strip(b"\x00"):
            continue
        facts = _ima_facts(str(r.content.get("template_name")), r.content.get("template_data", b""))
        if isinstance(facts, IMAFacts) and facts.digest is not None and facts.algorithm:
            yield facts.name, facts.algorithm, facts.digest


# -- runtime facts (shared with reference creation) ------------------------------------------------


def pod_name(subject: str, data: Mapping[str, Any]) -> str:
    """The name a reference lists a pod by: its name without namespace."""
    name = data.get("name")
    if isinstance(name, str) and name:
        return name
    return subject.rsplit("/", 1)[-1]


def container_images(data: Mapping[str, Any]) -> list[str]:
    """The image identifiers a container event carries, most specific first."""
    out: list[str] = []
    for key in ("image_digest", "image_id", "image_ref", "image"):
        value = data.get(key)
        if isinstance(value, str) and value and value not in out:
            out.append(value)
    for key in ("repo_digests",):
        value = data.get(key)
        if isinstance(value, list):
            out.extend(v for v in value if isinstance(v, str) and v not in out)
    return out


def _pod_matches(ref_name: str, ref: Any, subject: str, data: Mapping[str, Any]) -> bool:
    name = pod_name(subject, data)
    namespace = data.get("namespace")
    if not isinstance(namespace, str) and "/" in subject:
        namespace = subject.split("/", 1)[0]
    if ref.namespace is not None and namespace is not None and ref.namespace != namespace:
        return False
    return name == ref_name or name.startswith(ref_name + "-") or subject == ref_name


# -- the incremental state ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AppraisalState:
    """What an appraisal leaves for the next one of the same node (JSON-able with to_dict)."""

    platform: str
    identity: dict[str, str]
    references: str
    ima_entries: int
    ima_values: dict[str, dict[str, str]]
    boot_values: dict[str, dict[str, str]]
    ima_form: str
    ima_failures: tuple[Failure, ...] = ()
    ima_counts: dict[str, int] = field(default_factory=dict)
    version: int = STATE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "platform": self.platform,
            "identity": dict(self.identity),
            "references": self.references,
            "ima_entries": self.ima_entries,
            "ima_values": self.ima_values,
            "boot_values": self.boot_values,
            "ima_form": self.ima_form,
            "ima_failures": [f.to_dict() for f in self.ima_failures],
            "ima_counts": dict(self.ima_counts),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AppraisalState:
        if d.get("version") != STATE_VERSION:
            raise ParseError(f"appraisal state version {d.get('version')!r} is not {STATE_VERSION}")
        try:
            return cls(
                platform=str(d["platform"]),
                identity={str(k): str(v) for k, v in d["identity"].items()},
                references=str(d["references"]),
                ima_entries=int(d["ima_entries"]),
                ima_values={
                    str(r): {str(a): str(v) for a, v in banks.items()}
                    for r, banks in d["ima_values"].items()
                },
                boot_values={
                    str(r): {str(a): str(v) for a, v in banks.items()}
                    for r, banks in d["boot_values"].items()
                },
                ima_form=str(d["ima_form"]),
                ima_failures=tuple(Failure.from_dict(f) for f in d.get("ima_failures", ())),
                ima_counts={str(k): int(v) for k, v in d.get("ima_counts", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ParseError(f"appraisal state: {e}") from None


def _identity(view: EvidenceView) -> dict[str, str]:
    if view.tdx_quote is not None:
        regs = view.tdx_quote.registers()
        return {k: regs[k].hex() for k in ("mrtd", "rtmr0", "rtmr1")}
    assert view.ak_key is not None and view.tpm_quote is not None
    spki = view.ak_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "ak": hashlib.sha256(spki).hexdigest(),
        "reset_count": str(view.tpm_quote.reset_count),
        "restart_count": str(view.tpm_quote.restart_count),
    }


# -- the appraisal ------------------------------------------------------------------------------


def appraise(
    bundle: EvidenceBundle | str | bytes,
    references: ReferenceValues,
    *,
    nonce: bytes | None = None,
    user_data: bytes | None = None,
    report_data: bytes | None = None,
    state: AppraisalState | Mapping[str, Any] | None = None,
    now: datetime | None = None,
    verifier_id: str | None = None,
    enrolled_keys: Mapping[bytes, str] | None = None,
) -> AttestationResult:
    """Appraise ``bundle`` against ``references``; see the module docstring for the steps.

    ``nonce`` and ``user_data`` are what the caller expects the report to bind
    (``user_data`` None: whatever the bundle carries); without a nonce the
    report's freshness is not established and the evidence submodule is only
    a warning. ``report_data`` is the exact value a legacy verifier expects in
    the report (TPM extraData, TDX REPORTDATA), checked instead of the bundle's
    binding. ``state`` is the ``result.state`` of an earlier appraisal of the
    same node. ``now`` is the time certificates are checked at.
    ``enrolled_keys`` maps the TPM names of attestation keys enrolled by EK
    certificate to how they were (``"enrolled by EK certificate (<EK
    subject>, <date>)"``): step 2 trusts such a key when the reference values
    do not list it.
    """
    return _Appraisal(
        bundle,
        references=references,
        nonce=nonce,
        user_data=user_data,
        report_data=report_data,
        state=state,
        now=now,
        verifier_id=verifier_id,
        enrolled_keys=enrolled_keys,
    ).run()


class _Fatal(Exception):
    """Steps 1-3 failed: the rest of the evidence cannot be trusted."""


@dataclass(slots=True)
class _RegisterRun:
    """A register's replay through the IMA log, in every quoted bank."""

    register: str
    banks: list[tuple[str, Callable[[bytes], Any], bytes]]  # (name, ctor, all-ones)
    values: list[bytes]
    quoted: list[bytes | None]


@dataclass(slots=True)
class _IMAOutcome:
    matched: int | None  # entries in the matched prefix (None: no prefix matches)
    values: dict[str, list[bytes]]  # register -> values at the prefix end (or at the end)
    final: dict[str, list[bytes]]
    banks: dict[str, list[str]]
    form: str
    template_mismatches: list[int]
    malformed: list[tuple[int, str]]
    violations: list[int]
    uncovered: dict[str, int]  # registers no quote covers -> entries


class _Appraisal:
    def __init__(
        self,
        bundle: EvidenceBundle | str | bytes,
        *,
        references: ReferenceValues,
        nonce: bytes | None,
        user_data: bytes | None,
        report_data: bytes | None,
        state: AppraisalState | Mapping[str, Any] | None,
        now: datetime | None,
        verifier_id: str | None,
        enrolled_keys: Mapping[bytes, str] | None = None,
    ) -> None:
        self.raw_bundle = bundle
        self.enrolled_keys = enrolled_keys
        self.refs_model = references
        self.nonce = nonce
        self.user_data = user_data
        self.report_data = report_data
        self.state_in = state
        self.now = now
        self.subs = {name: Submodule(name) for name in SUBMODULES}
        self.appraised: set[str] = set()
        self.counts: dict[tuple[str, str], int] = {}
        self.env = Part("node", "node")
        self.timings: dict[str, float] = {}
        self.mode = "full"
        self.mode_reason = ""
        self.state_out: AppraisalState | None = None
        self.verifier_id = verifier_id
        self.view: EvidenceView | None = None
        self.refs: CompiledReferences | None = None
        self.boot_bank = RegisterBank()
        self.boot_touched: set[str] = set()
        self.boot_facts: BootFacts | None = None
        self.bad_registers: set[str] = set()
        self.state_used: AppraisalState | None = None
        self.state_form = "per-bank"
        self.ima_first = 0
        self.kernel = KernelFacts()
        self.ima_bad_files: list[tuple[int, str, Status]] = []
        self.ima_counts_at_end: dict[str, int] = {}
        self.runtime_parts: list[tuple[str, Any, Status]] = []
        self.boot_failed_events: dict[int, Status] = {}

    # -- recording ------------------------------------------------------------------------------
    def fail(
        self,
        submodule: str,
        step: int,
        code: str,
        reason: str,
        error: type[BaseException] | str,
        *,
        severity: Status = CONTRAINDICATED,
        register: str | None = None,
        log: str | None = None,
        event: int | None = None,
        subject: str | None = None,
    ) -> None:
        key = (submodule, code)
        n = self.counts.get(key, 0)
        self.counts[key] = n + 1
        if n >= MAX_FAILURES_PER_CODE:
            return
        name = error if isinstance(error, str) else error.__name__
        self.subs[submodule].failures.append(
            Failure(submodule, step, code, reason, name, severity, register, log, event, subject)
        )

    def _time(self, name: str, t0: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    # -- the steps ------------------------------------------------------------------------------
    def run(self) -> AttestationResult:
        # Steps (DESIGN.md section 9; the module docstring says what each checks):
        # (1) parse the report; (2) verify its signature chain; (3) freshness: the
        # report binds the expected nonce and user data; (4) replay every log and
        # compare with the quoted registers; (5) appraise the events against the
        # reference values; (6) the attestation result. Steps 1-3 stop the appraisal
        # when they fail (nothing the report says can be trusted); steps 4 and 5
        # record every failure and go on.
        t_all = time.perf_counter()
        try:
            # (1) parse the report
            t0 = time.perf_counter()
            view = self.step1_parse()
            self._time("parse", t0)
            # (2) the signature chain
            t0 = time.perf_counter()
            self.step2_signature(view)
            self._time("signature", t0)
            # (3) freshness
            t0 = time.perf_counter()
            self.step3_freshness(view)
            self._time("freshness", t0)
        except _Fatal:
            self._time("total", t_all)
            return self.step6_result(fatal=True)
        refs = self.refs
        assert refs is not None
        # (4) replay every log and compare with the quoted registers
        t0 = time.perf_counter()
        ima = self.step4_replay(view)
        self._time("replay", t0)
        # (5) appraise the events against the reference values
        t0 = time.perf_counter()
        self.step5_appraise(view, refs, ima)
        self._time("appraise", t0)
        self._time("total", t_all)
        # (6) the attestation result
        return self.step6_result(fatal=False)

    # (1) --------------------------------------------------------------------------------------
    def step1_parse(self) -> EvidenceView:
        bundle = self.raw_bundle
        self.appraised.add("evidence")
        if not isinstance(bundle, EvidenceBundle):
            try:
                bundle = EvidenceBundle.from_json(bundle)
            except ParseError as e:
                self.fail("evidence", 1, "bundle-format", str(e), type(e))
                raise _Fatal from None
        try:
            view = EvidenceView.of(bundle)
        except ParseError as e:
            self.fail("evidence", 1, "report-format", str(e), type(e))
            raise _Fatal from None
        self.view = view
        self.env = Part("node", _platform_title(view))
        try:
            self.refs = self.refs_model.compiled()
        except CimaError as e:
            self.fail("evidence", 1, "reference-values", str(e), type(e))
            raise _Fatal from None
        return view

    # (2) --------------------------------------------------------------------------------------
    def step2_signature(self, view: EvidenceView) -> None:
        refs = self.refs
        assert refs is not None
        if view.tdx_quote is not None:
            self._verify_tdx(view, refs)
            return
        from cima.evidence.tpm import verify_quote

        assert view.ak_key is not None
        spki = view.ak_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        trust = "registration"
        trusted_as = refs.trusted_spki.get(spki)
        if trusted_as is None and (refs.trusted_tpm_names or self.enrolled_keys):
            name = view.ak_tpm_name()
            if name is not None:
                trusted_as = refs.trusted_tpm_names.get(name)
                if trusted_as is None and self.enrolled_keys:
                    trusted_as = self.enrolled_keys.get(name)
                    trust = "ek-certificate"
        if trusted_as is None:
            why = (
                "the reference values trust no attestation key"
                if not refs.trusted_spki and not refs.trusted_tpm_names
                else "the attestation key is not one the reference values trust"
            )
            if self.enrolled_keys is not None:
                why += " and it is not enrolled by EK certificate"
            why += f" (SPKI SHA-256 {hashlib.sha256(spki).hexdigest()})"
            self.fail("evidence", 2, "untrusted-key", why, UntrustedKeyError)
            raise _Fatal
        try:
            verify_quote(
                view.tpm_quote,
                view.tpm_signature,
                view.ak_key,
                pcr_values=view.quoted,
                skip_freshness=True,
            )
        except (SignatureError, ReplayMismatchError, ParseError) as e:
            self.fail("evidence", 2, "signature", str(e), type(e))
            raise _Fatal from None
        self.subs["evidence"].details.update(
            {
                "attestation_key": trusted_as,
                "attestation_key_trust": trust,
                "quote": "signature verified",
            }
        )

    def _verify_tdx(self, view: EvidenceView, refs: CompiledReferences) -> None:
        from cima.evidence import tdx

        roots = [None, *refs.tdx_roots]
        last: SignatureError | None = None
        for root in roots:
            try:
                result = tdx.verify(view.tdx_quote, trusted_root=root, now=self.now)
            except tdx.RootOfTrustError as e:
                last = e
                continue
            except SignatureError as e:
                last = e
                break
            except ParseError as e:
                self.fail("evidence", 2, "signature", str(e), type(e))
                raise _Fatal from None
            self.subs["evidence"].details.update(
                {
                    "quote": "signature chain verified",
                    "root": "Intel SGX Root CA" if root is None else root.subject.rfc4514_string(),
                    "not_checked": ", ".join(result.not_checked),
                }
            )
            return
        assert last is not None
        self.fail("evidence", 2, getattr(last, "step", "signature"), str(last), type(last))
        raise _Fatal

    # (3) --------------------------------------------------------------------------------------
    def step3_freshness(self, view: EvidenceView) -> None:
        bundle = view.bundle
        details = self.subs["evidence"].details
        try:
            if self.nonce is not None and not hmac.compare_digest(bundle.nonce, self.nonce):
                raise FreshnessError(
                    f"the bundle carries nonce {bundle.nonce.hex()}, not the expected "
                    f"{self.nonce.hex()}"
                )
            if self.user_data is not None and not hmac.compare_digest(
                bundle.user_data, self.user_data
            ):
                raise FreshnessError("the bundle's user data is not the expected user data")
            if self.report_data is not None:
                self._check_report_data(view, self.report_data)
                details["freshness"] = "report data"
            else:
                bundle.verify_binding()
                details["freshness"] = "nonce" if self.nonce is not None else "binding only"
                if bundle.batch is not None:
                    details["batch"] = f"leaf {bundle.batch.leaf_index} of {bundle.batch.tree_size}"
            not_checked = details.get("not_checked")
            if isinstance(not_checked, str):
                details["not_checked"] = ", ".join(
                    x for x in not_checked.split(", ") if x != "report_data_binding"
                )
        except (FreshnessError, ParseError) as e:
            self.fail("evidence", 3, "freshness", str(e), type(e))
            raise _Fatal from None
        if self.nonce is None and self.report_data is None:
            self.fail(
                "evidence",
                3,
                "no-nonce",
                "no expected nonce was given: the report binds the bundle's own nonce, but "
                "its freshness is not established",
                FreshnessError,
                severity=WARNING,
            )

    @staticmethod
    def _check_report_data(view: EvidenceView, expected: bytes) -> None:
        if view.tdx_quote is not None:
            got = view.tdx_quote.report_data
            want = expected + bytes(max(0, 64 - len(expected)))
            what = "REPORTDATA"
        else:
            got = view.tpm_quote.extra_data
            want = expected
            what = "extraData"
        if not hmac.compare_digest(got, want):
            raise FreshnessError(
                f"the report's {what} {got.hex()} is not the expected {want.hex()}"
            )

    # (4) --------------------------------------------------------------------------------------
    def step4_replay(self, view: EvidenceView) -> _IMAOutcome | None:
        quoted = view.quoted
        banks = sorted({alg for _, alg in quoted})
        # The boot log: its replay (kept for a byte-identical log), compared with this quote below.
        facts = self.boot_facts = BOOT_FACTS.of(view.boot_records)
        if facts.replay_error is not None:
            self.fail("boot", 4, "log-malformed", facts.replay_error, LogFormatError, log="boot")
        self.boot_bank = facts.bank()
        self.boot_touched = set(facts.touched)
        # Where the IMA log is to be replayed from (an incremental appraisal skips what it saw).
        start, stored = self._ima_start(view, banks) if view.ima_records else (0, None)
        if start:
            view._ima_regs = frozenset(stored or ()) | frozenset(
                view.map_ima_register(reg) for reg in {r.register for r in view.ima_records[start:]}
            )
        self._check_log_kinds(view, start)
        ima_regs = view.ima_registers()
        runtime_reg = view.bundle.runtime_register
        for reg in sorted(self.boot_touched - ima_regs - {runtime_reg}, key=sort_key):
            for alg in banks:
                want = quoted.get((reg, alg))
                if want is None:
                    continue
                got = self.boot_bank.get(reg, alg)
                if not hmac.compare_digest(got, want):
                    self.bad_registers.add(reg)
                    self.fail(
                        "boot",
                        4,
                        "replay-mismatch",
                        f"{reg}/{alg}: the boot log replays to {got.hex()}, the quote has "
                        f"{want.hex()}",
                        ReplayMismatchError,
                        register=reg,
                        log="boot",
                    )
        # The IMA log.
        ima = self._replay_ima(view, banks, start, stored) if view.ima_records else None
        # The runtime journal.
        self._replay_runtime(view)
        return ima

    def _check_log_kinds(self, view: EvidenceView, ima_start: int) -> None:
        self._check_records(view.boot_records, PCCLIENT_STD, "boot", "boot")
        self._check_records(view.ima_records, IMA_TEMPLATE, "ima", "ima", first=ima_start)
        self._check_records(view.runtime_records, CIMA, "runtime", "system")

    def _check_records(
        self,
        records: Sequence[CELRecord],
        kind: str,
        log: str,
        sub: str,
        *,
        first: int = 0,
        last: int | None = None,
    ) -> None:
        """Each record of ``log`` has the log's content type and its position as its number."""
        for i in range(first, len(records) if last is None else last):
            r = records[i]
            if r.content_type != kind:
                self.fail(
                    sub,
                    4,
                    "log-malformed",
                    f"a {r.content_type} record in the {log} log",
                    LogFormatError,
                    log=log,
                    event=i,
                )
            if r.recnum != i:
                self.fail(
                    sub,
                    4,
                    "log-order",
                    f"record number {r.recnum} at position {i}: the {log} log is out of order",
                    LogFormatError,
                    log=log,
                    event=i,
                )

    def _ima_start(
        self, view: EvidenceView, banks: Sequence[str]
    ) -> tuple[int, dict[str, list[bytes]] | None]:
        """Where IMA replay starts: (entries already appraised, stored values) or (0, None)."""
        st = self.state_in
        if st is None:
            self.mode_reason = "no earlier appraisal of this node"
            return 0, None
        if not isinstance(st, AppraisalState):
            try:
                st = AppraisalState.from_dict(st)
            except ParseError as e:
                self.mode_reason = f"the earlier state does not decode ({e}): full appraisal"
                return 0, None
        assert self.refs is not None
        identity = _identity(view)
        why = None
        if st.platform != view.platform:
            why = f"the earlier state is of a {st.platform} platform"
        elif st.references != self.refs.digest:
            why = "the reference values changed"
        elif st.identity != identity:
            changed = [k for k in identity if st.identity.get(k) != identity[k]]
            if "ak" in changed:
                why = "another attestation key"
            else:
                what = ", ".join(
                    f"{k} {st.identity.get(k)} -> {identity[k]}"
                    for k in changed
                    if k.endswith("count")
                )
                why = f"a new boot ({what or ', '.join(changed) + ' changed'})"
        elif st.ima_entries > len(view.ima_records):
            why = (
                f"the IMA log has {len(view.ima_records)} entries, fewer than the "
                f"{st.ima_entries} appraised before"
            )
        else:
            for reg, vals in st.boot_values.items():
                for alg, hexv in vals.items():
                    if self.boot_bank.get(reg, alg).hex() != hexv:
                        why = f"the boot log's part of {reg} differs from the earlier appraisal's"
        if why is not None:
            self.mode_reason = f"{why}: full appraisal"
            return 0, None
        values: dict[str, list[bytes]] = {}
        for reg, vals in st.ima_values.items():
            if any(alg not in vals for alg in banks if (reg, alg) in view.quoted):
                self.mode_reason = "the earlier state lacks a quoted bank: full appraisal"
                return 0, None
            values[reg] = [bytes.fromhex(vals[alg]) for alg in banks if (reg, alg) in view.quoted]
        self.state_used = st
        self.state_form = st.ima_form
        return st.ima_entries, values

    def _replay_ima(
        self,
        view: EvidenceView,
        banks: Sequence[str],
        start: int,
        stored: dict[str, list[bytes]] | None,
    ) -> _IMAOutcome:
        padded_first = bool(start) and self.state_form == "padded"
        outcome = self._ima_pass(view, banks, start, stored, padded=padded_first)
        if start and outcome.matched is None:
            self.mode_reason = (
                f"the IMA register values stored at entry {start} do not lead to the quoted "
                "values (the earlier entries are not a prefix of this log): full appraisal"
            )
            self._check_records(view.ima_records, IMA_TEMPLATE, "ima", "ima", last=start)
            start = 0
            stored = None
            view._ima_regs = None
            outcome = self._ima_pass(view, banks, 0, None, padded=False)
        if outcome.matched is None and outcome.form == "per-bank":
            alt = self._ima_pass(view, banks, start, stored, padded=True)
            if alt.matched is not None:
                outcome = alt
        if start:
            self.mode = "incremental"
            self.mode_reason = f"same boot: {start} IMA entries were appraised before"
        outcome_start = start
        self.ima_first = outcome_start
        # Record what replay found.
        for i in outcome.template_mismatches:
            r = view.ima_records[i]
            self.fail(
                "ima",
                4,
                "template-hash",
                f"IMA entry {i}: the logged {r.digests[0][0]} template hash is not the hash of "
                "its template data",
                TemplateHashError,
                register=view.ima_register(r),
                log="ima",
                event=i,
            )
        for i, why in outcome.malformed:
            self.fail(
                "ima",
                4,
                "log-malformed",
                f"IMA entry {i}: {why}",
                LogFormatError,
                log="ima",
                event=i,
            )
        for reg, count in outcome.uncovered.items():
            self.fail(
                "ima",
                4,
                "not-quoted",
                f"{count} IMA entries extend {reg}, which the quote does not cover: they are "
                "unverified",
                ReplayMismatchError,
                severity=WARNING,
                register=reg,
                log="ima",
            )
        n = len(view.ima_records)
        details = self.subs["ima"].details
        details["entries"] = n
        details["bank_form"] = outcome.form
        if outcome.matched is None:
            for reg, finals in outcome.final.items():
                for alg, got in zip(outcome.banks[reg], finals, strict=True):
                    want = view.quoted.get((reg, alg))
                    if want is None:
                        continue
                    if not hmac.compare_digest(got, want):
                        self.bad_registers.add(reg)
                        self.fail(
                            "ima",
                            4,
                            "replay-mismatch",
                            f"{reg}/{alg}: no prefix of the IMA log ({n} entries, from entry "
                            f"{outcome_start}) replays to the quoted {want.hex()}; the whole log "
                            f"gives {got.hex()}",
                            ReplayMismatchError,
                            register=reg,
                            log="ima",
                        )
            details["verified_entries"] = 0
        else:
            beyond = n - outcome.matched
            details["verified_entries"] = outcome.matched
            if beyond:
                self.fail(
                    "ima",
                    4,
                    "unverified",
                    f"{beyond} IMA entries after entry {outcome.matched - 1} are not covered by "
                    "the quote (logged after it was taken): they are unverified",
                    ReplayMismatchError,
                    severity=WARNING,
                    log="ima",
                    event=outcome.matched,
                )
            details["unverified_entries"] = beyond
        return outcome

    def _ima_pass(
        self,
        view: EvidenceView,
        banks: Sequence[str],
        start: int,
        stored: dict[str, list[bytes]] | None,
        *,
        padded: bool,
    ) -> _IMAOutcome:
        """Replay IMA entries ``start..`` into the quoted banks; find the shortest match."""
        records = view.ima_records
        quoted = view.quoted
        runs: dict[str, _RegisterRun] = {}
        uncovered: dict[str, int] = {}
        ctors = {b: by_name(b).constructor() for b in banks}
        sizes = {b: by_name(b).digest_size for b in banks}
        ima_regs = sorted(view.ima_registers(), key=sort_key)
        for reg in ima_regs:
            bl = [b for b in banks if (reg, b) in quoted]
            if not bl:
                continue
            if stored is not None and reg in stored:
                vals = list(stored[reg])
            else:
                vals = [self.boot_bank.get(reg, b) for b in bl]
            runs[reg] = _RegisterRun(
                reg,
                [(b, ctors[b], b"\xff" * sizes[b]) for b in bl],
                vals,
                [quoted.get((reg, b)) for b in bl],
            )
        run_list = list(runs.values())

        def all_match() -> bool:
            for rr in run_list:
                for v, q in zip(rr.values, rr.quoted, strict=True):
                    if q is None or not hmac.compare_digest(v, q):
                        return False
            return True

        matched: int | None = start if run_list and all_match() else None
        at_match: dict[str, list[bytes]] = (
            {rr.register: list(rr.values) for rr in run_list} if matched is not None else {}
        )
        mismatches: list[int] = []
        malformed: list[tuple[int, str]] = []
        violations: list[int] = []
        lctors: dict[str, Callable[[bytes], Any]] = {}
        zeros = {20: bytes(20), 32: bytes(32), 48: bytes(48), 64: bytes(64)}
        compare = hmac.compare_digest
        # Registers as the records name them -> their run (None: not quoted).
        by_name_reg: dict[str, _RegisterRun | None] = {}
        for raw in {r.register for r in records[start:]}:
            by_name_reg[raw] = runs.get(view.map_ima_register(raw))
        single = run_list[0] if len(run_list) == 1 else None
        for i in range(start, len(records)):
            r = records[i]
            content = r.content
            data = content.get("template_data")
            tname = content.get("template_name")
            digests = r.digests
            if data.__class__ is not bytes or tname.__class__ is not str or len(digests) != 1:
                malformed.append((i, "not an IMA record with one template hash and template data"))
                continue
            lalg, th = digests[0]
            if tname == "ima":
                from cima.eventlog.ima import IMAEntry

                hin = IMAEntry(i, 10, th, tname, data).hash_input() or data
            else:
                hin = data
            viol = th == zeros.get(len(th))
            if viol:
                violations.append(i)
            else:
                lctor = lctors.get(lalg)
                if lctor is None:
                    lctor = lctors[lalg] = by_name(lalg).constructor()
                if not compare(lctor(hin).digest(), th):
                    mismatches.append(i)
            rr = by_name_reg.get(r.register)
            if rr is None:
                reg = view.map_ima_register(r.register)
                uncovered[reg] = uncovered.get(reg, 0) + 1
                continue
            vals = rr.values
            for k, (bname, ctor, ones) in enumerate(rr.banks):
                if viol:
                    d = ones
                elif bname == lalg:
                    d = th
                elif padded:
                    size = len(ones)
                    d = th[:size] if len(th) > size else th + bytes(size - len(th))
                else:
                    d = ctor(hin).digest()
                vals[k] = ctor(vals[k] + d).digest()
            if matched is None:
                ok = True
                for v, x in zip(vals, rr.quoted, strict=True):
                    if x is None or not compare(v, x):
                        ok = False
                        break
                if ok and (rr is single or all_match()):
                    matched = i + 1
                    at_match = {x.register: list(x.values) for x in run_list}
        final = {rr.register: list(rr.values) for rr in run_list}
        return _IMAOutcome(
            matched=matched,
            values=at_match if matched is not None else final,
            final=final,
            banks={rr.register: [b[0] for b in rr.banks] for rr in run_list},
            form="padded" if padded else "per-bank",
            template_mismatches=mismatches,
            malformed=malformed,
            violations=violations,
            uncovered=uncovered,
        )

    def _replay_runtime(self, view: EvidenceView) -> None:
        bundle = view.bundle
        reg = bundle.runtime_register
        alg = by_name(bundle.runtime_algorithm)
        records = view.runtime_records
        value = bundle.runtime_start
        details = self.subs["system"].details
        details["runtime_register"] = f"{reg}/{alg.name}"
        details["runtime_events"] = len(records)
        want = view.quoted.get((reg, alg.name))
        if bundle.runtime_start != alg.zero:
            self.fail(
                "system",
                4,
                "runtime-start",
                f"the runtime journal starts {reg} at {bundle.runtime_start.hex()}, not its reset "
                "value: what extended it before is not in a log",
                ReplayMismatchError,
                severity=WARNING,
                register=reg,
                log="runtime",
            )
        matched: int | None = None
        if want is not None and hmac.compare_digest(value, want):
            matched = 0
        ok_records = True
        for i, r in enumerate(records):
            if r.register != reg or len(r.digests) != 1 or r.digests[0][0] != alg.name:
                ok_records = False
                self.fail(
                    "system",
                    4,
                    "log-malformed",
                    f"runtime event {i} is not one {alg.name} digest extended into {reg}",
                    LogFormatError,
                    register=reg,
                    log="runtime",
                    event=i,
                )
                continue
            value = alg.hash(value + r.digests[0][1])
            if matched is None and want is not None and hmac.compare_digest(value, want):
                matched = i + 1
        if want is None:
            if records:
                self.fail(
                    "system",
                    4,
                    "not-quoted",
                    f"the runtime register {reg}/{alg.name} is not quoted: the journal is "
                    "unverified",
                    ReplayMismatchError,
                    register=reg,
                    log="runtime",
                )
                self.bad_registers.add(reg)
            return
        if matched is None or not ok_records:
            self.bad_registers.add(reg)
            for sub in ("system", "kubernetes", "container"):
                self.fail(
                    sub,
                    4,
                    "replay-mismatch",
                    f"{reg}/{alg.name}: the runtime journal ({len(records)} events) replays to "
                    f"{value.hex()}, the quote has {want.hex()}",
                    ReplayMismatchError,
                    register=reg,
                    log="runtime",
                )
            return
        beyond = len(records) - matched
        if beyond:
            self.fail(
                "system",
                4,
                "unverified",
                f"{beyond} runtime events after event {matched - 1} are not covered by the quote",
                ReplayMismatchError,
                severity=WARNING,
                register=reg,
                log="runtime",
                event=matched,
            )

    # (5) --------------------------------------------------------------------------------------
    def step5_appraise(
        self, view: EvidenceView, refs: CompiledReferences, ima: _IMAOutcome | None
    ) -> None:
        self._appraise_boot(view, refs)
        self._appraise_kernel(view, refs)
        self._appraise_ima(view, refs, ima)
        self._appraise_runtime(view, refs)

    # boot -------------------------------------------------------------------------------------
    def _boot_actual(self, view: EvidenceView) -> dict[tuple[str, str], bytes]:
        """The values boot references describe: boot-log replay, or the quote for the rest."""
        owned = view.ima_registers() | {view.bundle.runtime_register}
        actual: dict[tuple[str, str], bytes] = {}
        for v in self.boot_bank:
            actual[(v.register, v.algorithm)] = v.digest
        for (reg, alg), value in view.quoted.items():
            if reg in self.boot_touched or reg in owned:
                continue
            actual[(reg, alg)] = value
        return actual

    def _appraise_boot(self, view: EvidenceView, refs: CompiledReferences) -> None:
        sub = self.subs["boot"]
        sub.details["events"] = len(view.boot_records)
        self._check_tdx_identity(view, refs)
        if not refs.boot:
            sub.details["reference"] = "none (no boot reference values)"
            return
        self.appraised.add("boot")
        actual = self._boot_actual(view)
        best: tuple[int, CompiledBoot, list[tuple[str, str, bytes | None, bytes]]] | None = None
        for config in refs.boot:
            diffs = []
            for (reg, alg), want in config.registers.items():
                got = actual.get((reg, alg))
                if got is None or not hmac.compare_digest(got, want):
                    diffs.append((reg, alg, got, want))
            ref_regs = {reg for reg, _ in config.registers}
            for reg, alg in actual:
                if reg not in ref_regs and (reg in self.boot_touched or any(actual[(reg, alg)])):
                    diffs.append((reg, alg, actual[(reg, alg)], b""))
            if best is None or len(diffs) < best[0]:
                best = (len(diffs), config, diffs)
            if not diffs:
                break
        assert best is not None
        _, config, diffs = best
        sub.details["reference"] = config.name or "boot 0"
        for reg, alg, got, want in sorted(diffs, key=lambda d: (sort_key(d[0]), d[1])):
            if not want:
                shown = got.hex() if got else "?"
                reason = f"{reg}/{alg} is {shown} but the reference has no value for it"
            elif got is None:
                reason = (
                    f"{reg}/{alg}: the reference expects {want.hex()}, the evidence has no value"
                )
            else:
                source = "the boot log replays to" if reg in self.boot_touched else "the quote has"
                reason = f"{reg}/{alg}: {source} {got.hex()}, the reference expects {want.hex()}"
            self.fail(
                "boot",
                5,
                "register",
                reason,
                ReferenceMismatchError,
                register=reg,
                log="boot" if reg in self.boot_touched else None,
            )
        self._compare_boot_events(view, config)

    def _compare_boot_events(self, view: EvidenceView, config: CompiledBoot) -> None:
        records = view.boot_records
        ref = config.events
        facts = self.boot_facts or BootFacts.of(records)
        mine = list(facts.keys(records, ref[0].data[0] if ref else "sha256"))
        theirs = [(e.register, e.event_type, e.digests, e.data) for e in ref]
        if mine == theirs:
            return
        sm = difflib.SequenceMatcher(a=theirs, b=mine, autojunk=False)
        for op, a0, a1, b0, b1 in sm.get_opcodes():
            if op == "equal":
                continue
            if op == "replace" and a1 - a0 == b1 - b0:
                for k in range(a1 - a0):
                    self._event_diff(view, b0 + k, ref[a0 + k], mine[b0 + k])
                continue
            for k in range(a0, a1):
                e = ref[k]
                self.fail(
                    "boot",
                    5,
                    "boot-event-missing",
                    f"reference boot event {k} ({e.register}, {uefi.event_type_name(e.event_type)}"
                    f"{', ' + e.note if e.note else ''}) is not in the boot log",
                    ReferenceMismatchError,
                    register=e.register,
                    log="boot",
                    event=b0,
                )
            for k in range(b0, b1):
                r = records[k]
                self.boot_failed_events[k] = CONTRAINDICATED
                self.fail(
                    "boot",
                    5,
                    "boot-event-extra",
                    f"boot event {k} ({r.register}, {uefi.event_type_name(_event_type(r))}) is "
                    "not in the reference's boot log",
                    ReferenceMismatchError,
                    register=r.register,
                    log="boot",
                    event=k,
                )

    def _event_diff(self, view: EvidenceView, i: int, ref: Any, mine: tuple[Any, ...]) -> None:
        r = view.boot_records[i]
        what = []
        if mine[0] != ref.register:
            what.append(f"its register is {mine[0]}, the reference's {ref.register}")
        if mine[1] != ref.event_type:
            what.append(
                f"its type is {uefi.event_type_name(mine[1])}, the reference's "
                f"{uefi.event_type_name(ref.event_type)}"
            )
        if mine[2] != ref.digests:
            mine_d, ref_d = dict(mine[2]), dict(ref.digests)
            banks = sorted(set(mine_d) | set(ref_d))
            differ = [b for b in banks if mine_d.get(b) != ref_d.get(b)]
            what.append(
                f"its {', '.join(differ)} digest{'s differ' if len(differ) > 1 else ' differs'}"
            )
        if mine[3] != ref.data:
            what.append("its data differs" + (f" (reference: {ref.note})" if ref.note else ""))
        self.boot_failed_events[i] = CONTRAINDICATED
        self.fail(
            "boot",
            5,
            "boot-event",
            f"boot event {i} ({r.register}, {uefi.event_type_name(_event_type(r))}): "
            + "; ".join(what),
            ReferenceMismatchError,
            register=r.register,
            log="boot",
            event=i,
        )

    def _check_tdx_identity(self, view: EvidenceView, refs: CompiledReferences) -> None:
        if view.tdx_quote is None:
            return
        body = view.tdx_quote.body
        allow_debug = refs.tdx.allow_debug if refs.tdx is not None else False
        if body.debug and not allow_debug:
            self.appraised.add("boot")
            self.fail(
                "boot",
                5,
                "td-debug",
                "the TD runs in debug mode (TDATTRIBUTES.DEBUG): its memory is not confidential",
                ReferenceMismatchError,
            )
        fields = view.tdx_fields()
        for name, allowed in refs.tdx_fields.items():
            self.appraised.add("boot")
            if fields[name] not in allowed:
                self.fail(
                    "boot",
                    5,
                    "td-identity",
                    f"the TD's {name.upper()} {fields[name].hex()} is not among the {len(allowed)} "
                    "allowed",
                    ReferenceMismatchError,
                )

    # kernel -----------------------------------------------------------------------------------
    def _appraise_kernel(self, view: EvidenceView, refs: CompiledReferences) -> None:
        facts = self.boot_facts.kernel if self.boot_facts is not None else kernel_facts(view)
        self.kernel = facts
        sub = self.subs["kernel"]
        sub.details.update(
            {
                "images": len(facts.images),
                "cmdlines": len(facts.cmdlines),
                "initrds": len(facts.initrds),
                "load_options": len(facts.load_options),
            }
        )
        if refs.kernel is None:
            return
        self.appraised.add("kernel")
        k = refs.kernel
        for what, measured, allowed, listed in (
            ("kernel image", facts.images, refs.kernel_images, k.images),
            ("initrd", facts.initrds, refs.kernel_initrds, k.initrds),
            ("load options", facts.load_options, refs.kernel_load_options, k.load_options),
        ):
            if not listed:
                continue
            if not measured:
                self.fail(
                    "kernel",
                    5,
                    f"no-{what.split()[0]}",
                    f"the boot log measures no {what}",
                    ReferenceMismatchError,
                    log="boot",
                )
            for m in measured:
                if not any(d in allowed for d in m.digests):
                    shown = ", ".join(f"{a}:{d.hex()}" for a, d in m.digests)
                    self.fail(
                        "kernel",
                        5,
                        what.replace(" ", "-"),
                        f"{what} {m.name} ({shown}) is not among the {len(listed)} allowed",
                        ReferenceMismatchError,
                        register=view.boot_records[m.index].register,
                        log="boot",
                        event=m.index,
                    )
        if k.cmdlines:
            if not facts.cmdlines:
                self.fail(
                    "kernel",
                    5,
                    "no-cmdline",
                    "the boot log records no kernel command line",
                    ReferenceMismatchError,
                    log="boot",
                )
            for c in facts.cmdlines:
                if c.text not in refs.kernel_cmdlines:
                    self.fail(
                        "kernel",
                        5,
                        "cmdline",
                        f"kernel command line {c.text!r} is not among the {len(k.cmdlines)} "
                        "allowed",
                        ReferenceMismatchError,
                        register=view.boot_records[c.index].register,
                        log="boot",
                        event=c.index,
                    )

    # ima --------------------------------------------------------------------------------------
    def _appraise_ima(
        self, view: EvidenceView, refs: CompiledReferences, outcome: _IMAOutcome | None
    ) -> None:
        sub = self.subs["ima"]
        records = view.ima_records
        start = self.ima_first
        prior = self.state_used if start else None
        counts = {
            "files_known": 0,
            "files_signed": 0,
            "files_unknown": 0,
            "files_bad_digest": 0,
            "excluded": 0,
            "violations": 0,
            "buffers": 0,
        }
        if prior is not None:
            for k, v in prior.ima_counts.items():
                counts[k] = counts.get(k, 0) + v
            for f in prior.ima_failures:
                self.fail(
                    f.submodule,
                    f.step,
                    f.code,
                    f.reason,
                    f.error,
                    severity=f.severity,
                    register=f.register,
                    log=f.log,
                    event=f.event,
                    subject=f.subject,
                )
        if (records or view.bundle.ima_log is not None) and (
            refs.ima is not None or self.subs["ima"].failures
        ):
            self.appraised.add("ima")
        if outcome is None:
            sub.details.update(counts)
            self._ima_state(view, refs, outcome, counts, start)
            return
        ima_refs = refs.ima
        files = refs.ima_files
        keys = refs.ima_keys
        exclude = refs.ima_exclude
        unknown_sev: Status = ima_refs.unknown if ima_refs is not None else WARNING
        violation_sev: Status | None = WARNING
        if ima_refs is not None:
            violation_sev = None if ima_refs.violations == "ignore" else ima_refs.violations
        sig_cache: dict[tuple[bytes, bytes, str | None], _SigOutcome] = {}
        bad_files: list[tuple[int, str, Status]] = []
        zeros = {20: bytes(20), 32: bytes(32), 48: bytes(48), 64: bytes(64)}
        facts_of = _ima_facts
        end = outcome.matched if outcome.matched is not None else -1
        self.ima_counts_at_end = dict(counts)
        for i in range(start, len(records)):
            if i == end:
                self.ima_counts_at_end = dict(counts)
            r = records[i]
            content = r.content
            data = content.get("template_data")
            tname = content.get("template_name")
            if data.__class__ is not bytes or tname.__class__ is not str or not r.digests:
                continue
            th = r.digests[0][1]
            if th == zeros.get(len(th)):
                counts["violations"] += 1
                if violation_sev is not None:
                    facts = _ima_facts(tname, data)
                    name = facts.name if isinstance(facts, IMAFacts) else "?"
                    self.fail(
                        "ima",
                        5,
                        "violation",
                        f"IMA entry {i}: measurement violation for {name} (the file was open for "
                        "writing, or changed while measured)",
                        ReferenceMismatchError,
                        severity=violation_sev,
                        register=view.ima_register(r),
                        log="ima",
                        event=i,
                        subject=name,
                    )
                continue
            facts = facts_of(tname, data)
            if isinstance(facts, str):
                self.fail(
                    "ima",
                    5,
                    "template-fields",
                    f"IMA entry {i}: {facts}",
                    LogFormatError,
                    register=view.ima_register(r),
                    log="ima",
                    event=i,
                )
                bad_files.append((i, "?", CONTRAINDICATED))
                continue
            name = facts.name
            if facts.buffer is not None:
                counts["buffers"] += 1
                if facts.algorithm and facts.digest is not None:
                    try:
                        h = hashlib.new(facts.algorithm.replace("_256", ""), facts.buffer).digest()
                    except ValueError:
                        h = None
                    if h is not None and not hmac.compare_digest(h, facts.digest):
                        self.fail(
                            "ima",
                            5,
                            "buffer-digest",
                            f"IMA entry {i}: the digest of buffer {name!r} is not the hash "
                            "of the buffer",
                            ReferenceMismatchError,
                            register=view.ima_register(r),
                            log="ima",
                            event=i,
                            subject=name,
                        )
                        bad_files.append((i, name, CONTRAINDICATED))
                        continue
            if name == "boot_aggregate":
                self._boot_aggregate(view, i, facts)
                continue
            if ima_refs is None:
                continue
            if exclude is not None and exclude.match(name):
                counts["excluded"] += 1
                continue
            if keys and (facts.signature is not None or facts.modsig is not None):
                # As the kernel appraises: the xattr signature first; the appended
                # signature when there is no xattr signature or no key answers to it.
                verdict = "unknown"
                if facts.signature is not None:
                    verdict = self._ima_signature(i, r, facts, keys, sig_cache)
                if verdict == "unknown" and facts.modsig is not None:
                    verdict = self._ima_modsig(i, r, facts, keys, sig_cache)
                if verdict == "good":
                    counts["files_signed"] += 1
                    continue
                if verdict == "bad":
                    bad_files.append((i, name, CONTRAINDICATED))
                    continue
            allowed = files.get(name)
            if allowed is None:
                counts["files_unknown"] += 1
                self.fail(
                    "ima",
                    5,
                    "unknown-file",
                    f"IMA entry {i}: {name} has no reference digest and no trusted signature",
                    ReferenceMismatchError,
                    severity=unknown_sev,
                    register=view.ima_register(r),
                    log="ima",
                    event=i,
                    subject=name,
                )
                bad_files.append((i, name, unknown_sev))
                continue
            if (
                facts.algorithm is None
                or facts.digest is None
                or (facts.algorithm, facts.digest) not in allowed
            ):
                counts["files_bad_digest"] += 1
                shown = (
                    f"{facts.algorithm}:{facts.digest.hex()}"
                    if facts.digest is not None
                    else "no digest"
                )
                self.fail(
                    "ima",
                    5,
                    "file-digest",
                    f"IMA entry {i}: {name} has digest {shown}, not among the {len(allowed)} "
                    "allowed for its path",
                    ReferenceMismatchError,
                    register=view.ima_register(r),
                    log="ima",
                    event=i,
                    subject=name,
                )
                bad_files.append((i, name, CONTRAINDICATED))
                continue
            counts["files_known"] += 1
        sub.details.update(counts)
        if end == len(records):
            self.ima_counts_at_end = dict(counts)
        self.ima_bad_files = bad_files
        self._ima_state(view, refs, outcome, counts, start)

    def _ima_signature(
        self,
        i: int,
        r: CELRecord,
        facts: IMAFacts,
        keys: Any,
        cache: dict[tuple[bytes, bytes, str | None], _SigOutcome],
    ) -> str:
        """``good``, ``bad`` (recorded), or ``unknown`` (no trusted key answers: use the digest)."""
        assert facts.signature is not None
        sig, digest = facts.signature, facts.digest if facts.digest is not None else b""
        outcome = _signature_outcome(
            cache,
            (sig, digest, facts.digest_type),
            lambda: keys.verify(sig, digest, facts.algorithm, digest_type=facts.digest_type),
        )
        return self._signature_verdict(i, r, facts, outcome, "file-signature")

    def _ima_modsig(
        self,
        i: int,
        r: CELRecord,
        facts: IMAFacts,
        keys: Any,
        cache: dict[tuple[bytes, bytes, str | None], _SigOutcome],
    ) -> str:
        """The appended signature's verdict, as :meth:`_ima_signature`'s."""
        from cima.verifier.modsig import verify_modsig

        assert facts.modsig is not None
        sig, digest = facts.modsig, facts.modsig_digest if facts.modsig_digest is not None else b""
        outcome = _signature_outcome(
            cache,
            (sig, digest, f"modsig:{facts.modsig_algorithm}"),
            lambda: verify_modsig(sig, facts.modsig_algorithm or "", digest, keys),
        )
        return self._signature_verdict(i, r, facts, outcome, "file-modsig")

    def _signature_verdict(
        self, i: int, r: CELRecord, facts: IMAFacts, outcome: _SigOutcome, check: str
    ) -> str:
        """None: ``good``; "": ``unknown``; (reason, error): ``bad``, recorded as a failure."""
        if outcome is None:
            return "good"
        if isinstance(outcome, str):
            return "unknown"
        reason, error = outcome
        self.fail(
            "ima",
            5,
            check,
            f"IMA entry {i}: {facts.name}: {reason}",
            error,
            register=r.register,
            log="ima",
            event=i,
            subject=facts.name,
        )
        return "bad"

    def _boot_aggregate(self, view: EvidenceView, i: int, facts: IMAFacts) -> None:
        details = self.subs["ima"].details
        if view.is_tdx or facts.algorithm is None or facts.digest is None:
            details["boot_aggregate"] = "not checked"
            return
        alg = facts.algorithm
        last = 7 if alg == "sha1" else 9
        try:
            values = [view.quoted[(f"pcr{k}", alg)] for k in range(last + 1)]
        except KeyError:
            details["boot_aggregate"] = f"not checked (pcr0-{last} not quoted in {alg})"
            return
        expected = hashlib.new(alg, b"".join(values)).digest()
        if hmac.compare_digest(expected, facts.digest):
            details["boot_aggregate"] = f"matches pcr0-{last}"
            return
        self.fail(
            "ima",
            5,
            "boot-aggregate",
            f"IMA entry {i}: boot_aggregate {facts.digest.hex()} is not {alg}(pcr0..pcr{last}) = "
            f"{expected.hex()} of the quote",
            ReferenceMismatchError,
            register="pcr10",
            log="ima",
            event=i,
        )

    def _ima_state(
        self,
        view: EvidenceView,
        refs: CompiledReferences,
        outcome: _IMAOutcome | None,
        counts: dict[str, int],
        start: int,
    ) -> None:
        """The state an incremental appraisal of the same boot continues from."""
        if outcome is None or outcome.matched is None:
            self.state_out = None
            return
        end = outcome.matched
        values = {
            reg: {alg: v.hex() for alg, v in zip(outcome.banks[reg], vals, strict=True)}
            for reg, vals in outcome.values.items()
        }
        boot_values = {
            reg: {alg: self.boot_bank.get(reg, alg).hex() for alg in outcome.banks[reg]}
            for reg in outcome.values
            if reg in self.boot_touched
        }
        # Only what entries before the prefix end found is carried over.
        kept = [
            f
            for f in self.subs["ima"].failures
            if f.log == "ima"
            and f.event is not None
            and f.event < end
            and f.step in (4, 5)
            and f.code not in ("unverified", "replay-mismatch")
        ]
        self.state_out = AppraisalState(
            platform=view.platform,
            identity=_identity(view),
            references=refs.digest,
            ima_entries=end,
            ima_values=values,
            boot_values=boot_values,
            ima_form=outcome.form,
            ima_failures=tuple(kept),
            ima_counts=self.ima_counts_at_end,
        )

    # runtime ----------------------------------------------------------------------------------
    def _appraise_runtime(self, view: EvidenceView, refs: CompiledReferences) -> None:
        from cima.agent.events import RuntimeEvent

        records = view.runtime_records
        self.runtime_parts = []
        for i, r in enumerate(records):
            if r.content_type != CIMA or len(r.digests) != 1:
                continue
            try:
                ev = RuntimeEvent.from_cel(r)
            except (ValueError, KeyError, TypeError, CimaError) as e:
                self.fail(
                    "system",
                    5,
                    "event-format",
                    f"runtime event {i}: {e}",
                    LogFormatError,
                    log="runtime",
                    event=i,
                )
                continue
            if ev.content is None:
                self.runtime_parts.append(("redacted", ev, NONE))
                self.subs["container"].details["redacted"] = (
                    self.subs["container"].details.get("redacted", 0) + 1
                )
                continue
            content = ev.content
            if set(content) != {"kind", "scope", "subject", "data"} or not isinstance(
                content.get("data"), dict
            ):
                self.fail(
                    "system",
                    5,
                    "event-format",
                    f"runtime event {i}: its content is not {{kind, scope, subject, data}}",
                    LogFormatError,
                    log="runtime",
                    event=i,
                )
                continue
            kind = ev.kind
            sub = {"pod": "kubernetes", "container": "container"}.get(str(kind), "system")
            if not ev.content_matches_digest():
                self.fail(
                    sub,
                    5,
                    "event-content",
                    f"runtime event {i} ({kind} {ev.subject}): its content does not hash to "
                    "its digest",
                    ReferenceMismatchError,
                    register=r.register,
                    log="runtime",
                    event=i,
                    subject=ev.subject,
                )
                self.appraised.add(sub)
                self.runtime_parts.append((sub, ev, CONTRAINDICATED))
                continue
            status = self._runtime_event(i, r, ev, refs)
            self.runtime_parts.append((sub, ev, status))

    def _runtime_event(self, i: int, r: CELRecord, ev: Any, refs: CompiledReferences) -> Status:
        kind, subject, data = ev.kind, ev.subject or "", ev.data
        before = self._failure_count()

        def bad(sub: str, code: str, reason: str, severity: Status = CONTRAINDICATED) -> None:
            self.fail(
                sub,
                5,
                code,
                f"runtime event {i}: {reason}",
                ReferenceMismatchError,
                severity=severity,
                register=r.register,
                log="runtime",
                event=i,
                subject=subject,
            )

        if kind == "process":
            if refs.system is None:
                return NONE
            self.appraised.add("system")
            ref = refs.processes.get(subject)
            if ref is None:
                bad(
                    "system",
                    "unknown-process",
                    f"process {subject} is not in the reference values",
                    refs.system.unknown,
                )
            else:
                digests, cmdlines = ref
                exe = data.get("exe_digest")
                if digests and (not isinstance(exe, str) or refs_digest(exe) not in digests):
                    bad(
                        "system",
                        "process-digest",
                        f"process {subject} runs an executable with digest {exe}, not among "
                        f"the {len(digests)} allowed",
                    )
                cmd = data.get("cmdline")
                if (
                    cmdlines is not None
                    and isinstance(cmd, list)
                    and tuple(str(x) for x in cmd) not in cmdlines
                ):
                    bad(
                        "system",
                        "process-cmdline",
                        f"process {subject} runs with command line "
                        f"{' '.join(map(str, cmd))!r}, not an allowed one",
                    )
        elif kind == "agent":
            if refs.agent is None or not refs.agent_code:
                return NONE
            self.appraised.add("system")
            code = data.get("code_digest")
            if not isinstance(code, str) or refs_digest(code) not in refs.agent_code:
                bad(
                    "system",
                    "agent-code",
                    f"the agent's code digest {code} is not among the allowed",
                )
        elif kind == "policy":
            if refs.agent is None or not refs.agent_policy:
                return NONE
            self.appraised.add("system")
            seen = {refs_digest(str(data.get(k))) for k in ("policy_digest", "file_digest")}
            if not seen & refs.agent_policy:
                bad(
                    "system",
                    "agent-policy",
                    f"the agent's policy digest {data.get('policy_digest')} is not among the "
                    "allowed",
                )
        elif kind == "pod":
            if refs.kubernetes is None:
                return NONE
            self.appraised.add("kubernetes")
            match = next(
                (
                    ref
                    for name, ref in refs.kubernetes.pods.items()
                    if _pod_matches(name, ref, subject, data)
                ),
                None,
            )
            if match is None:
                bad(
                    "kubernetes",
                    "unknown-pod",
                    f"pod {subject} is not in the reference values",
                    refs.kubernetes.unknown,
                )
            elif match.images is not None:
                imgs = container_images(data)
                if imgs and not set(imgs) & set(match.images):
                    bad(
                        "kubernetes",
                        "pod-image",
                        f"pod {subject} runs image {imgs[0]}, not an allowed one",
                    )
        elif kind == "container":
            if refs.containers is None:
                return NONE
            self.appraised.add("container")
            imgs = container_images(data)
            if not imgs:
                bad("container", "container-image", f"container {subject} names no image", WARNING)
            elif not set(imgs) & refs.container_images:
                bad(
                    "container",
                    "container-image",
                    f"container {subject} runs image {imgs[0]}, not among the "
                    f"{len(refs.container_images)} allowed",
                    refs.containers.unknown,
                )
        elif kind == "marker":
            return AFFIRMING
        else:
            bad("system", "unknown-kind", f"an event of unknown kind {kind!r}", WARNING)
        new = self._failures_since(before)
        return status_of(new, True)

    def _failure_count(self) -> int:
        return sum(len(s.failures) for s in self.subs.values())

    def _failures_since(self, before: int) -> list[Failure]:
        allf = [f for s in self.subs.values() for f in s.failures]
        return allf[before:] if len(allf) >= before else []

    # (6) --------------------------------------------------------------------------------------
    def step6_result(self, *, fatal: bool) -> AttestationResult:
        for (sub, _code), n in self.counts.items():
            if n > MAX_FAILURES_PER_CODE:
                self.subs[sub].details[f"more_{_code}"] = n - MAX_FAILURES_PER_CODE
        for name, submodule in self.subs.items():
            if fatal and name != "evidence":
                submodule.status = NONE
                continue
            submodule.status = status_of(submodule.failures, name in self.appraised)
        view = self.view
        if not fatal and view is not None:
            self._reconstruct(view)
        else:
            self.env.status = worst(s.status for s in self.subs.values())
        return AttestationResult(
            submods=self.subs,
            environment=self.env,
            platform=view.platform if view is not None else "unknown",
            mode=self.mode,
            mode_reason=self.mode_reason,
            verifier_id=self.verifier_id or VERIFIER_ID,
            nonce=self.nonce,
            state=None if fatal else self.state_out,
            timings=self.timings,
        )

    # -- the environment -----------------------------------------------------------------------
    def _reconstruct(self, view: EvidenceView) -> None:
        env = self.env
        env.status = worst(s.status for s in self.subs.values())
        subs = self.subs
        ev = subs["evidence"]
        env.add(
            Part(
                "evidence",
                "signed report",
                ev.status,
                {k: v for k, v in ev.details.items() if isinstance(v, str)},
            )
        )
        boot_status = subs["boot"].status
        td = view.tdx_quote is not None
        firmware_regs = {"mrtd", "rtmr0"} if td else {f"pcr{i}" for i in (0, 1, 2, 3, 5, 6, 7)}
        loader_regs = {"rtmr1"} if td else {"pcr4"}
        fw = env.add(Part("firmware", "firmware", self._regs_status(firmware_regs, boot_status)))
        if td:
            fw.details["mrtd"] = view.tdx_quote.registers()["mrtd"].hex()
            fw.details["debug"] = view.tdx_quote.body.debug
        loader = env.add(
            Part("bootloader", "boot loader", self._regs_status(loader_regs, boot_status))
        )
        facts = self.boot_facts or BootFacts.of(view.boot_records)
        if facts.crtm_version is not None:
            fw.details["version"] = facts.crtm_version
        for i, et, name, register, digest in facts.applications:
            part = Part(
                "boot-application" if et == _BOOT_APPS[0] else "driver",
                name,
                self.boot_failed_events.get(i, boot_status if boot_status != NONE else NONE),
                {"event": i, "register": register}
                | ({"digest": f"{digest[0]}:{digest[1].hex()}"} if digest else {}),
            )
            (loader if et == _BOOT_APPS[0] else fw).add(part)
        kfacts = self.kernel
        kstatus = worst([subs["kernel"].status, self._regs_status(set(), NONE)])
        kname = kfacts.images[0].name if kfacts.images else "kernel"
        kpart = env.add(Part("kernel", kname, kstatus))
        for m in kfacts.images:
            kpart.details["digests"] = ", ".join(f"{a}:{d.hex()}" for a, d in m.digests)
            kpart.details["event"] = m.index
        for c in kfacts.cmdlines:
            kpart.add(
                Part("cmdline", c.text, self._kernel_status("cmdline", c.index), {"event": c.index})
            )
        for m in kfacts.initrds:
            kpart.add(
                Part(
                    "initrd",
                    m.name,
                    self._kernel_status("initrd", m.index),
                    {
                        "event": m.index,
                        "digests": ", ".join(f"{a}:{d.hex()}" for a, d in m.digests),
                    },
                )
            )
        ima = subs["ima"]
        if view.bundle.ima_log is not None:
            ipart = kpart.add(
                Part(
                    "ima",
                    "IMA measurements",
                    ima.status,
                    {k: v for k, v in ima.details.items() if isinstance(v, int | str)},
                )
            )
            for i, name, status in self.ima_bad_files[:20]:
                ipart.add(Part("file", name, status, {"event": i}))
        system = env.add(Part("system", "system processes", subs["system"].status))
        pods = env.add(Part("kubernetes", "pods", subs["kubernetes"].status))
        containers = env.add(Part("containers", "containers", subs["container"].status))
        pod_parts: dict[str, Part] = {}
        for sub, ev_, status in self.runtime_parts:
            if sub == "redacted":
                containers.add(
                    Part(
                        "redacted",
                        f"event {ev_.seq} (another container's)",
                        NONE,
                        {"digest": ev_.digest.hex()},
                    )
                )
                continue
            kind = ev_.kind
            data = ev_.data
            if kind == "process":
                details = {k: data[k] for k in ("pid", "exe", "exe_digest", "cmdline") if k in data}
                system.add(Part("process", ev_.subject or "?", status, details))
            elif kind in ("agent", "policy"):
                details = {
                    k: v for k, v in data.items() if isinstance(v, str | int) and k != "policy"
                }
                system.add(Part(kind, ev_.subject or kind, status, details))
            elif kind == "pod":
                p = pods.add(
                    Part(
                        "pod",
                        ev_.subject or "?",
                        status,
                        {k: v for k, v in data.items() if isinstance(v, str | int)},
                    )
                )
                pod_parts[ev_.subject or ""] = p
                for key in ("uid", "pod_uid", "name"):
                    if isinstance(data.get(key), str):
                        pod_parts[data[key]] = p
            elif kind == "container":
                details = {k: v for k, v in data.items() if isinstance(v, str | int)}
                imgs = container_images(data)
                part = Part("container", ev_.subject or "?", status, details)
                if imgs:
                    part.add(Part("image", imgs[0], status))
                owner = None
                pod = data.get("pod")
                if isinstance(pod, dict) and isinstance(pod.get("uid"), str):
                    owner = pod_parts.get(pod["uid"])  # the container collector's pod record
                for key in ("pod_uid", "pod", "pod_name", "sandbox_id"):
                    if owner is None and isinstance(data.get(key), str) and data[key] in pod_parts:
                        owner = pod_parts[data[key]]
                        break
                (owner or containers).add(part)

    def _regs_status(self, registers: set[str], default: Status) -> Status:
        found = [
            f.severity
            for f in self.subs["boot"].failures
            if f.register in registers
            or (f.register is None and f.code.startswith("td-") and "mrtd" in registers)
        ]
        return worst(found) if found else default

    def _kernel_status(self, code: str, index: int) -> Status:
        found = [f.severity for f in self.subs["kernel"].failures if f.event == index]
        if found:
            return worst(found)
        return AFFIRMING if "kernel" in self.appraised else NONE


def _platform_title(view: EvidenceView) -> str:
    b = view.bundle
    scope = "node" if b.scope == "node" else b.scope
    return f"{view.platform} {scope}"
