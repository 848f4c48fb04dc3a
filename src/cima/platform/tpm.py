"""A TPM 2.0 as a cima platform, through tpm2-pytss (ESAPI).

The TPM is reached through a TCTI named as tpm2-tools names it: ``device:/dev/tpmrm0``,
``swtpm:port=2321``, ``mssim:host=localhost,port=2321``, ``tabrmd``. Resolution
order: the explicit argument, then ``TPM2TOOLS_TCTI``, then ``TCTI``, then the
kernel's resource manager device (``/dev/tpmrm0``).

Attestation key (AK). A restricted signing key, ECC NIST P-256 with ECDSA/SHA-256
or RSA-2048 with RSASSA/SHA-256, created as a child of the endorsement key: the
EK is created from the TCG EK Credential Profile template (the template and nonce
in NV are honoured, as tpm2-tools does), and because a low-range EK's policy is
PolicySecret(TPM_RH_ENDORSEMENT), creating and loading its child each go through
a fresh policy session satisfied with the endorsement hierarchy's authorisation
(empty on swtpm and on most machines). The AK is made persistent with
EvictControl at ``ak_handle`` (default ``0x81010002``, in the TCG registry's range
for endorsement-hierarchy keys, next to the EK's ``0x81010001``) so that it
survives restarts and a verifier can register it once. An existing key at that
handle is reused when it is a restricted signing key of the requested type;
anything else there is an error (it is never evicted).

Endorsement key (EK). Of the EK kinds of ``ek_type`` (RSA: the low-range RSA-2048
template, then the high-range one; ECC: low-range P-256, then high-range P-256 and
P-384), the platform uses the first whose certificate is in NV, or the low-range one
when the TPM has no certificate of that type: the EK is always the key of the
certificate :meth:`TPMPlatform.ek_certificate` returns (swtpm, for one, certifies a
high-range P-384 ECC EK and no low-range one). A low-range EK (userWithAuth clear)
is used through the PolicySecret session above; a high-range one has userWithAuth
set and is used with its (empty) authorisation value.

Credential activation (enrollment). A verifier that trusts the EK certificate makes a
credential (TPM2_MakeCredential) bound to the AK's name and encrypted to the EK;
:meth:`TPMPlatform.activate_credential` recovers its secret with
TPM2_ActivateCredential, which the TPM performs only when the key of that name is
loaded in the same TPM as the EK. A credential the TPM refuses (made for another key
or another EK, or altered) is a :class:`CredentialError`.

No transient objects are left behind: swtpm and ``/dev/tpm0`` have no resource
manager, and every created or loaded object and every session is flushed in a
``finally``. Quotes use the persistent AK and load nothing.

Reports are TPM2_Quote over PCRs of one bank (the default is sha256), with
qualifyingData = H(nonce || user_data) where H is the AK's signing hash
(DESIGN.md section 4). The PCR values are read before the quote and checked
against its pcrDigest; a change in between (another process extended a PCR)
retries the pair. A report's ``verification`` holds ``ak_pem``, ``ak_public``
(the AK's TPM2B_PUBLIC, hex), ``ak_name`` (hex), ``hash_algorithm``, ``pcrs``
(the quoted values as ``{"register", "algorithm", "digest"}`` dicts, in quote
order) and, when the TPM has one, ``ek_certificate_pem``.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cima.digests import by_id, by_name, is_known_id
from cima.errors import ParseError, PlatformError, RegisterError
from cima.eventlog.event import Measurement
from cima.evidence.reportdata import tpm_qualifying_data
from cima.evidence.tpm import (
    AK_ATTRIBUTES,
    TPM_ALG_ECC,
    TPM_ALG_ECDSA,
    TPM_ALG_NULL,
    TPM_ALG_RSA,
    TPM_ALG_RSASSA,
    PCRSelection,
    PCRValues,
    PublicArea,
    Quote,
    decode_selection_list,
    encode_selection_list,
    pcr_digest,
)
from cima.platform.base import Platform, PlatformPaths, Report
from cima.registers import PCR_COUNT, PCR_NAMES, RegisterBank, check_name, pcr_index

DEFAULT_AK_HANDLE = 0x81010002
DEFAULT_DEVICE = "/dev/tpmrm0"

#: EK certificate NV indices (TCG EK Credential Profile 2.0, 2.2.1.4): low range
#: RSA-2048 and ECC P-256, and the high range.
EK_CERT_INDICES: dict[str, int] = {
    "EK-RSA2048": 0x01C00002,
    "EK-ECC256": 0x01C0000A,
    "EK-HIGH-RSA2048": 0x01C00012,
    "EK-HIGH-ECC256": 0x01C00014,
    "EK-HIGH-ECC384": 0x01C00016,
}
_EK_CHOICES: dict[str, tuple[str, ...]] = {
    "rsa": ("EK-RSA2048", "EK-HIGH-RSA2048"),
    "ecc": ("EK-ECC256", "EK-HIGH-ECC256", "EK-HIGH-ECC384"),
}

_QUOTE_ATTEMPTS = 4
_PCR_READ_MAX_CALLS = 64
_TPM_HT_NV_INDEX = 0x01
_TPM_HT_LOADED_SESSION = 0x02
_TPM_HT_TRANSIENT = 0x80
_TPM_HT_PERSISTENT = 0x81
_TPM_PT_MANUFACTURER = 0x105
_TPM_PT_VENDOR_STRING_1 = 0x106
_TPM_PT_FIRMWARE_VERSION_1 = 0x10B
_TPM_PT_FIRMWARE_VERSION_2 = 0x10C
_TPM_PT_NV_BUFFER_MAX = 0x12C


class CredentialError(PlatformError):
    """A credential this TPM does not activate: made for another key or EK, altered, or
    not a marshalled TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET."""


def resolve_tcti(tcti: str | None = None, paths: PlatformPaths | None = None) -> str:
    """The TCTI to use: ``tcti``, else $TPM2TOOLS_TCTI, else $TCTI, else the device."""
    for candidate in (tcti, os.environ.get("TPM2TOOLS_TCTI"), os.environ.get("TCTI")):
        value = (candidate or "").strip()
        if value:
            return f"device:{value}" if value.startswith("/") else value
    device = (paths or PlatformPaths()).tpm_device
    return f"device:{device}"


def _tss() -> Any:
    try:
        import tpm2_pytss  # optional dependency, imported on use
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise PlatformError(
            "tpm2-pytss is not installed (pip install 'cima[tpm]'; it needs libtss2-dev)"
        ) from e
    return tpm2_pytss


def _ak_template(ak_type: str) -> bytes:
    """TPM2B_PUBLIC template of the AK (TPM 2.0 Part 2, 12.2.4; unique fields empty).

    ECC: NIST P-256, ECDSA with SHA-256, no KDF. RSA: 2048 bits, exponent 65537,
    RSASSA with SHA-256. Both: nameAlg SHA-256, no symmetric algorithm, empty
    authPolicy, attributes of a restricted signing key that never leaves the TPM.
    """

    def u16(v: int) -> bytes:
        return v.to_bytes(2, "big")

    sha256 = by_name("sha256").alg_id
    empty = u16(0)
    if ak_type == "ecc":
        head = u16(TPM_ALG_ECC)
        params = u16(TPM_ALG_ECDSA) + u16(sha256) + u16(0x0003) + u16(TPM_ALG_NULL)  # P-256
        unique = empty + empty
    else:
        head = u16(TPM_ALG_RSA)
        params = u16(TPM_ALG_RSASSA) + u16(sha256) + u16(2048) + (0).to_bytes(4, "big")
        unique = empty
    body = head + u16(sha256) + AK_ATTRIBUTES.to_bytes(4, "big") + empty + u16(TPM_ALG_NULL)
    body += params + unique
    return u16(len(body)) + body


class TPMPlatform(Platform):
    """A TPM 2.0 reached through a TCTI (see the module docstring for the AK's life cycle)."""

    name = "tpm"

    def __init__(
        self,
        tcti: str | None = None,
        *,
        ak_handle: int = DEFAULT_AK_HANDLE,
        ak_type: Literal["ecc", "rsa"] = "ecc",
        ek_type: Literal["rsa", "ecc"] = "rsa",
        paths: PlatformPaths | None = None,
    ) -> None:
        if ak_type not in ("ecc", "rsa"):
            raise PlatformError(f"ak_type must be 'ecc' or 'rsa', not {ak_type!r}")
        if ek_type not in _EK_CHOICES:
            raise PlatformError(f"ek_type must be 'rsa' or 'ecc', not {ek_type!r}")
        if not 0x81000000 <= ak_handle <= 0x817FFFFF:
            raise PlatformError(
                f"ak_handle 0x{ak_handle:08x} is not an owner-evictable persistent handle "
                "(0x81000000-0x817fffff)"
            )
        self.paths = paths or PlatformPaths()
        self.tcti = resolve_tcti(tcti, self.paths)
        self.ak_handle = ak_handle
        self.ak_type = ak_type
        self.ek_type = ek_type
        self._lock = threading.RLock()
        self._tss = _tss()
        self._tcti_ctx: Any = None
        self._esapi: Any = None
        self._ak_tr: Any = None
        self._ak_public: PublicArea | None = None
        self._ek_cert: tuple[bytes | None] | None = None
        self._ek_kind: str | None = None
        self._ek_public: PublicArea | None = None
        self._keys: tuple[PublicArea, dict[str, str]] | None = None
        self._banks: list[str] = []
        self._connect()

    # -- connection and errors ------------------------------------------------------------------
    def _connect(self) -> None:
        if self.tcti.startswith("device:"):
            device = Path(self.tcti.split(":", 1)[1] or DEFAULT_DEVICE)
            if not device.exists():
                raise PlatformError(
                    f"no TPM: {device} does not exist (set TPM2TOOLS_TCTI or pass a TCTI such "
                    "as swtpm:port=2321)"
                )
        tss = self._tss
        try:
            self._tcti_ctx = tss.TCTILdr.parse(self.tcti)
        except Exception as e:
            module = self.tcti.split(":", 1)[0]
            raise PlatformError(
                f"cannot open TCTI {self.tcti!r} ({e}): no TPM answers there, or the TCTI "
                f"module {module!r} is not installed"
            ) from e
        try:
            self._esapi = tss.ESAPI(self._tcti_ctx)
            self._banks = self._read_banks()
        except Exception as e:
            self.close()
            raise PlatformError(f"TPM not reachable through TCTI {self.tcti!r}: {e}") from e

    @contextmanager
    def _call(self, what: str) -> Iterator[Any]:
        """Serialise TPM access and turn TSS errors into PlatformError naming the operation."""
        if self._esapi is None:
            raise PlatformError(f"{what}: the TPM connection is closed")
        with self._lock:
            try:
                yield self._esapi
            except self._tss.TSS2_Exception as e:
                raise PlatformError(f"TPM {what} failed: {e} (rc 0x{int(e.rc):x})") from e

    def close(self) -> None:
        with self._lock:
            esapi, self._esapi = self._esapi, None
            tcti, self._tcti_ctx = self._tcti_ctx, None
            self._ak_tr = None
            # Closing a connection that already failed is not an error.
            if esapi is not None:
                with contextlib.suppress(Exception):
                    esapi.close()
            if tcti is not None:
                with contextlib.suppress(Exception):
                    tcti.close()

    def __enter__(self) -> TPMPlatform:
        return self

    # -- capabilities -----------------------------------------------------------------------------
    def _capability(self, cap: int, prop: int, count: int) -> list[Any]:
        """All entries of one capability, following the TPM's moreData."""
        tss = self._tss
        out: list[Any] = []
        with self._call("GetCapability") as e:
            while True:
                more, data = e.get_capability(tss.TPM2_CAP(cap), prop, count)
                items: list[Any]
                if cap == tss.TPM2_CAP.HANDLES:
                    items = [int(h) for h in data.data.handles]
                    out.extend(items)
                    if not more or not items:
                        break
                    prop = items[-1] + 1
                elif cap == tss.TPM2_CAP.TPM_PROPERTIES:
                    items = [(int(p.property), int(p.value)) for p in data.data.tpmProperties]
                    out.extend(items)
                    if not more or not items:
                        break
                    prop = items[-1][0] + 1
                else:
                    out.append(data.data)
                    break
        return out

    def _read_banks(self) -> list[str]:
        tss = self._tss
        (data,) = self._capability(int(tss.TPM2_CAP.PCRS), 0, 1)
        selections = decode_selection_list(bytes(data.assignedPCR.marshal()))
        banks = [
            by_id(s.hash_alg).name for s in selections if is_known_id(s.hash_alg) and s.indices
        ]
        if not banks:
            raise PlatformError("the TPM has no allocated PCR bank cima knows")
        return banks

    def handles(self, kind: Literal["transient", "persistent", "nv", "sessions"]) -> list[int]:
        """Handles the TPM holds now: loaded transient objects, persistent objects, NV
        indices or loaded sessions (GetCapability TPM_CAP_HANDLES)."""
        first = {
            "transient": _TPM_HT_TRANSIENT,
            "persistent": _TPM_HT_PERSISTENT,
            "nv": _TPM_HT_NV_INDEX,
            "sessions": _TPM_HT_LOADED_SESSION,
        }[kind]
        found = self._capability(int(self._tss.TPM2_CAP.HANDLES), first << 24, 64)
        # Loaded sessions are listed from TPM_HT_LOADED_SESSION (0x02): HMAC sessions
        # (0x02xxxxxx) and policy sessions (0x03xxxxxx) alike.
        types = (0x02, 0x03) if kind == "sessions" else (first,)
        return [h for h in found if h >> 24 in types]

    def _properties(self) -> dict[int, int]:
        props = self._capability(int(self._tss.TPM2_CAP.TPM_PROPERTIES), 0x100, 64)
        return dict(props)

    # -- Platform interface ---------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        props = self._properties()

        def text(*keys: int) -> str:
            raw = b"".join(props.get(k, 0).to_bytes(4, "big") for k in keys)
            return raw.replace(b"\x00", b"").decode("ascii", "replace").strip()

        fw1 = props.get(_TPM_PT_FIRMWARE_VERSION_1, 0)
        fw2 = props.get(_TPM_PT_FIRMWARE_VERSION_2, 0)
        out: dict[str, Any] = {
            "platform": self.name,
            "tcti": self.tcti,
            "manufacturer": text(_TPM_PT_MANUFACTURER),
            "vendor": text(*range(_TPM_PT_VENDOR_STRING_1, _TPM_PT_VENDOR_STRING_1 + 4)),
            "firmware_version": f"{fw1:08x}{fw2:08x}",
            "algorithms": self.algorithms(),
            "default_algorithm": self.default_algorithm(),
            "registers": self.register_names(),
            "ak_handle": f"0x{self.ak_handle:08x}",
            "ak_type": self.ak_type,
            "ak_present": self.ak_handle in self.handles("persistent"),
        }
        return out

    def default_algorithm(self) -> str:
        return "sha256" if "sha256" in self._banks else self._banks[0]

    def algorithms(self) -> list[str]:
        return list(self._banks)

    def register_names(self) -> list[str]:
        return list(PCR_NAMES)

    def _check_bank(self, algorithm: str) -> str:
        name = by_name(algorithm).name
        if name not in self._banks:
            raise PlatformError(
                f"the TPM has no {name} PCR bank (allocated: {', '.join(self._banks)})"
            )
        return name

    def _pcr_read(self, selections: Sequence[PCRSelection]) -> RegisterBank:
        """Read every selected PCR; TPM2_PCR_Read returns at most 8 per call."""
        tss = self._tss
        wanted = {(reg, sel.algorithm) for sel in selections for reg in sel.registers}
        bank = RegisterBank()
        pending = list(selections)
        with self._call("PCR_Read") as e:
            for _ in range(_PCR_READ_MAX_CALLS):
                if not pending:
                    break
                request, _ = tss.TPML_PCR_SELECTION.unmarshal(encode_selection_list(pending))
                _, sel_out, digests = e.pcr_read(request)
                got = decode_selection_list(bytes(sel_out.marshal()))
                values = _digest_list(bytes(digests.marshal()))
                pairs = [(reg, s.algorithm) for s in got for reg in s.registers]
                if not pairs or len(pairs) != len(values):
                    raise PlatformError(
                        f"TPM2_PCR_Read returned {len(values)} digests for {len(pairs)} PCRs"
                    )
                for (reg, alg), value in zip(pairs, values, strict=True):
                    bank.set(reg, alg, value)
                left = []
                for s in pending:
                    alg = s.algorithm
                    regs = [r for r in s.registers if (r, alg) not in bank]
                    if regs:
                        left.append(PCRSelection.of(alg, regs))
                pending = left
            if pending:
                raise PlatformError("TPM2_PCR_Read did not return every selected PCR")
        missing = [f"{r}/{a}" for r, a in sorted(wanted) if (r, a) not in bank]
        if missing:
            raise PlatformError(f"TPM2_PCR_Read did not return {', '.join(missing)}")
        return bank

    def read(self, register: str, algorithm: str) -> bytes:
        alg = self._check_bank(algorithm)
        return self._pcr_read([PCRSelection.of(alg, [check_name(register)])]).get(register, alg)

    def read_all(self, algorithm: str | None = None) -> RegisterBank:
        algs = [self._check_bank(algorithm)] if algorithm else self.algorithms()
        return self._pcr_read([PCRSelection.of(a, range(PCR_COUNT)) for a in algs])

    def extend(self, register: str, algorithm: str, digest: bytes) -> None:
        alg = by_name(self._check_bank(algorithm))
        try:
            index = pcr_index(register)
        except RegisterError as err:
            raise PlatformError(f"a TPM extends PCRs only: {err}") from err
        if len(digest) != alg.digest_size:
            raise PlatformError(
                f"a {alg.name} digest is {alg.digest_size} bytes, got {len(digest)}"
            )
        tss = self._tss
        # TPML_DIGEST_VALUES: count UINT32, then TPMT_HA (hashAlg UINT16, digest).
        encoded = (1).to_bytes(4, "big") + alg.alg_id.to_bytes(2, "big") + bytes(digest)
        values, _ = tss.TPML_DIGEST_VALUES.unmarshal(encoded)
        with self._call(f"PCR_Extend of {register}/{alg.name}") as e:
            e.pcr_extend(tss.ESYS_TR(index), values)

    def boot_log(self) -> list[Measurement] | None:
        path = self.paths.tpm_boot_log
        try:
            data = path.read_bytes()
        except OSError:
            return None
        from cima.eventlog import tcg  # decoded only when a log exists

        try:
            log = tcg.parse(data, source=str(path))
        except ParseError as e:
            raise e.with_source(str(path)) from None
        return list(log.events)

    # -- keys -------------------------------------------------------------------------------------
    def _flush(self, e: Any, *handles: Any) -> None:
        for h in handles:
            if h is None:
                continue
            try:
                e.flush_context(h)
            except self._tss.TSS2_Exception:
                continue

    def _nv_read(self, index: int) -> bytes | None:
        """The contents of NV index ``index`` (None if it is not defined)."""
        if index not in self.handles("nv"):
            return None
        props = self._properties()
        chunk = props.get(_TPM_PT_NV_BUFFER_MAX, 512) or 512
        with self._call(f"NV_Read of 0x{index:08x}") as e:
            nv = e.tr_from_tpmpublic(index)
            try:
                public, _ = e.nv_read_public(nv)
                size = int(public.nvPublic.dataSize)
                out = bytearray()
                while len(out) < size:
                    n = min(chunk, size - len(out))
                    out += bytes(e.nv_read(nv, n, len(out)))
                return bytes(out)
            finally:
                e.tr_close(nv)

    def ek_certificate(self) -> x509.Certificate | None:
        """The EK certificate from NV for the EK this platform uses, if the TPM has one."""
        der = self._ek_certificate_der()
        if der is None:
            return None
        return x509.load_der_x509_certificate(der)

    def _ek_certificate_der(self) -> bytes | None:
        if self._ek_cert is None:
            raw = self._nv_read(EK_CERT_INDICES[self._ek_choice()])
            self._ek_cert = (None if raw is None else _trim_der(raw),)
        return self._ek_cert[0]

    def _ek_choice(self) -> str:
        """The EK kind in use: the first of ``ek_type`` with a certificate, else the low range."""
        if self._ek_kind is None:
            choices = _EK_CHOICES[self.ek_type]
            defined = set(self.handles("nv"))
            self._ek_kind = next(
                (kind for kind in choices if EK_CERT_INDICES[kind] in defined), choices[0]
            )
        return self._ek_kind

    def _ek_template(self) -> Any:
        from tpm2_pytss.utils import NoSuchIndex, create_ek_template

        def nv_read(index: int) -> bytes:
            data = self._nv_read(int(index))
            if data is None:
                raise NoSuchIndex(int(index))
            return data

        kind = self._ek_choice()
        try:
            _, template = create_ek_template(kind, nv_read)
        except ValueError as e:  # a high-range EK whose certificate went away
            raise PlatformError(f"no usable {kind} EK template: {e}") from e
        return template

    def _ek_session(self, e: Any, template: Any) -> Any:
        """What authorises the use of the EK: a policy session (low range, to be flushed) or
        None, meaning its empty authorisation value (high range: userWithAuth set)."""
        attributes = int(template.publicArea.objectAttributes)
        if attributes & int(self._tss.TPMA_OBJECT.USERWITHAUTH):
            return None
        return self._policy_session(e)

    def _policy_session(self, e: Any) -> Any:
        """A policy session satisfying the EK's PolicySecret(TPM_RH_ENDORSEMENT)."""
        tss = self._tss
        session = e.start_auth_session(
            tss.ESYS_TR.NONE,
            tss.ESYS_TR.NONE,
            tss.TPM2_SE.POLICY,
            tss.TPMT_SYM_DEF(algorithm=tss.TPM2_ALG.NULL),
            tss.TPM2_ALG.SHA256,
        )
        try:
            e.policy_secret(tss.ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
        except BaseException:
            self._flush(e, session)
            raise
        return session

    def _create_ak(self) -> None:
        tss = self._tss
        template = self._ek_template()
        ak_public, _ = tss.TPM2B_PUBLIC.unmarshal(_ak_template(self.ak_type))
        with self._call("creating the attestation key") as e:
            ek = ak = session = None
            try:
                ek, *_ = e.create_primary(None, template, tss.ESYS_TR.ENDORSEMENT)
                session = self._ek_session(e, template)
                private, public, *_ = e.create(
                    ek, None, ak_public, session1=_or_password(tss, session)
                )
                self._flush(e, session)
                session = self._ek_session(e, template)
                ak = e.load(ek, private, public, session1=_or_password(tss, session))
                self._flush(e, session)
                session = None
                self._ak_tr = e.evict_control(tss.ESYS_TR.OWNER, ak, self.ak_handle)
            finally:
                self._flush(e, session, ak, ek)

    def _load_ak(self) -> Any:
        """The persistent AK's ESYS handle, creating and persisting the key the first time."""
        if self._ak_tr is not None:
            return self._ak_tr
        with self._lock:
            if self.ak_handle not in self.handles("persistent"):
                self._create_ak()
            else:
                with self._call(f"loading the AK at 0x{self.ak_handle:08x}") as e:
                    self._ak_tr = e.tr_from_tpmpublic(self.ak_handle)
            with self._call("ReadPublic of the AK") as e:
                public, name, _ = e.read_public(self._ak_tr)
            area = PublicArea.from_bytes(public.marshal())
            expected = "rsa" if self.ak_type == "rsa" else "ecc"
            if (
                area.key_type != expected
                or not area.is_restricted_signing_key
                or not is_known_id(area.scheme_hash)
            ):
                self._ak_tr = None
                raise PlatformError(
                    f"persistent handle 0x{self.ak_handle:08x} holds a key of type "
                    f"{area.key_type} with attributes 0x{area.object_attributes:08x}, not a "
                    f"restricted {expected} signing key with a signing scheme: choose another "
                    "ak_handle or evict that key"
                )
            if area.name != bytes(name):
                raise PlatformError("the TPM's name for the AK differs from its public area")
            self._ak_public = area
            return self._ak_tr

    def ak_public(self) -> PublicArea:
        """The AK's public area (the AK is created on first use)."""
        self._load_ak()
        assert self._ak_public is not None
        return self._ak_public

    def ak_pem(self) -> str:
        return self.ak_public().to_pem().decode()

    def ek_public(self) -> PublicArea:
        """The public area of the EK this platform uses (the key of :meth:`ek_certificate`).

        The EK is created from its template under the endorsement hierarchy (the TPM
        derives the same key every time), read, and flushed; the result is kept.
        """
        if self._ek_public is None:
            tss = self._tss
            template = self._ek_template()
            with self._call("creating the endorsement key") as e:
                ek = None
                try:
                    ek, public, *_ = e.create_primary(None, template, tss.ESYS_TR.ENDORSEMENT)
                finally:
                    self._flush(e, ek)
            self._ek_public = PublicArea.from_bytes(bytes(public.marshal()))
        return self._ek_public

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """The secret of a credential made for the AK and this TPM's EK (TPM2_ActivateCredential).

        ``credential_blob`` is a marshalled TPM2B_ID_OBJECT and ``encrypted_secret`` a
        marshalled TPM2B_ENCRYPTED_SECRET, both with their size prefix (the output of
        TPM2_MakeCredential). The TPM decrypts the seed with the EK and checks the
        credential's integrity against the name of the persistent AK: a credential
        made for another key or another EK, or altered, is a :class:`CredentialError`.
        """
        tss = self._tss
        blob = _unmarshal(tss.TPM2B_ID_OBJECT, credential_blob, "credential blob")
        secret = _unmarshal(tss.TPM2B_ENCRYPTED_SECRET, encrypted_secret, "encrypted secret")
        ak = self._load_ak()
        template = self._ek_template()
        with self._call("ActivateCredential") as e:
            ek = session = None
            try:
                ek, *_ = e.create_primary(None, template, tss.ESYS_TR.ENDORSEMENT)
                session = self._ek_session(e, template)
                try:
                    credential = e.activate_credential(
                        ak,
                        ek,
                        blob,
                        secret,
                        session1=tss.ESYS_TR.PASSWORD,
                        session2=_or_password(tss, session),
                    )
                except tss.TSS2_Exception as err:
                    if not _is_tpm_error(int(err.rc)):
                        raise
                    raise CredentialError(
                        "the credential does not activate on this TPM (it was made for another "
                        f"key or another endorsement key, or altered): {err} (rc 0x{int(err.rc):x})"
                    ) from err
            finally:
                self._flush(e, session, ek)
        return bytes(credential)

    # -- report -----------------------------------------------------------------------------------
    def _verification_keys(self, area: PublicArea) -> dict[str, str]:
        """The AK's public area, name and PEM, and the EK certificate: the same in every report."""
        if self._keys is None or self._keys[0] is not area:
            keys = {
                "ak_pem": area.to_pem().decode(),
                "ak_public": area.to_bytes().hex(),
                "ak_name": area.name.hex(),
            }
            cert = self._ek_certificate_der()
            if cert is not None:
                keys["ek_certificate_pem"] = (
                    x509.load_der_x509_certificate(cert)
                    .public_bytes(serialization.Encoding.PEM)
                    .decode()
                )
            self._keys = (area, keys)
        return self._keys[1]

    def report(
        self,
        nonce: bytes,
        user_data: bytes = b"",
        registers: list[str] | None = None,
        *,
        algorithms: Sequence[str] | None = None,
    ) -> Report:
        """TPM2_Quote over ``registers`` (all PCRs by default) in ``algorithms`` (the
        default bank by default), bound to ``nonce`` and ``user_data``."""
        regs = [check_name(r) for r in (registers or PCR_NAMES)]
        banks = [self._check_bank(a) for a in (algorithms or [self.default_algorithm()])]
        selections = [PCRSelection.of(b, regs) for b in banks]
        ak = self._load_ak()
        area = self.ak_public()
        sig_hash = by_id(area.scheme_hash).name
        qualifying = tpm_qualifying_data(nonce, user_data, sig_hash)
        tss = self._tss
        selection, _ = tss.TPML_PCR_SELECTION.unmarshal(encode_selection_list(selections))
        for _ in range(_QUOTE_ATTEMPTS):
            values = self._pcr_read(selections)
            with self._call("Quote") as e:
                attest, signature = e.quote(ak, selection, qualifying)
            body = bytes(attest.marshal())[2:]
            quote = Quote.from_bytes(body)
            if pcr_digest(quote.pcr_selection, values, sig_hash) == quote.pcr_digest:
                break
        else:
            raise PlatformError(
                f"PCRs kept changing between PCR_Read and Quote ({_QUOTE_ATTEMPTS} attempts)"
            )
        quoted = PCRValues.from_values(quote.pcr_selection, values)
        verification: dict[str, Any] = {
            **self._verification_keys(area),
            "hash_algorithm": sig_hash,
            "pcrs": [v.to_dict() for v in quoted.items()],
        }
        return Report(
            kind="tpm-quote",
            body=body,
            signature=bytes(signature.marshal()),
            nonce=bytes(nonce),
            user_data=bytes(user_data),
            verification=verification,
        )


def _or_password(tss: Any, session: Any) -> Any:
    """``session``, or the password session (empty authorisation value) when None."""
    return tss.ESYS_TR.PASSWORD if session is None else session


def _unmarshal(kind: Any, data: bytes, what: str) -> Any:
    """A size-prefixed TPM2B structure that fills ``data`` exactly, else CredentialError."""
    data = bytes(data)
    if len(data) < 2 or int.from_bytes(data[:2], "big") != len(data) - 2:
        raise CredentialError(
            f"the {what} is not a marshalled {kind.__name__} (a 2-byte size, then that many "
            f"bytes): {len(data)} bytes"
        )
    try:
        value, used = kind.unmarshal(data)
    except Exception as e:  # the TSS's marshalling checks (a size past the type's buffer)
        raise CredentialError(f"the {what} is not a marshalled {kind.__name__}: {e}") from e
    if used != len(data):
        raise CredentialError(f"the {what} has {len(data) - used} bytes after its {kind.__name__}")
    return value


def _is_tpm_error(rc: int) -> bool:
    """Whether a TSS2_RC is the TPM's own answer to a command, and not a warning.

    The TSS layer is in bits 16-23 (0: the TPM); a format-zero code with the warning
    bit (0x800) is a TPM warning (resources, retry), not a verdict on the input.
    """
    if rc >> 16 & 0xFF:
        return False
    return bool(rc & 0x080) or not rc & 0x800


def _digest_list(raw: bytes) -> list[bytes]:
    """The digests of a marshalled TPML_DIGEST (UINT32 count, then TPM2B_DIGESTs).

    Decoded from its bytes at once: walking the list through the TSS's Python
    objects costs more than the TPM command.
    """
    if len(raw) < 4:
        raise PlatformError("TPM2_PCR_Read returned a TPML_DIGEST cut short")
    (count,) = struct.unpack_from(">I", raw)
    out: list[bytes] = []
    at = 4
    for _ in range(count):
        if at + 2 > len(raw):
            raise PlatformError(f"TPM2_PCR_Read returned a TPML_DIGEST cut short at byte {at}")
        (size,) = struct.unpack_from(">H", raw, at)
        at += 2
        if at + size > len(raw):
            raise PlatformError(f"TPM2_PCR_Read returned a TPML_DIGEST cut short at byte {at}")
        out.append(raw[at : at + size])
        at += size
    return out


def _trim_der(raw: bytes) -> bytes:
    """A DER certificate without the padding an NV index may hold after it."""
    if len(raw) < 4 or raw[0] != 0x30:
        raise PlatformError("the EK certificate NV index does not hold a DER certificate")
    first = raw[1]
    if first < 0x80:
        return raw[: 2 + first]
    n = first & 0x7F
    if n == 0 or n > 4 or len(raw) < 2 + n:
        raise PlatformError("the EK certificate NV index holds a malformed DER length")
    length = int.from_bytes(raw[2 : 2 + n], "big")
    end = 2 + n + length
    if end > len(raw):
        raise PlatformError("the EK certificate in NV is truncated")
    return raw[:end]
