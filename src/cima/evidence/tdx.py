"""Intel TDX quotes (DCAP quote format v4 and v5): codec and offline verification.

Layout, from the Intel TDX DCAP Quoting Library API (appendix "Quote Format"); every
integer is little-endian, every hash, key and signature a plain byte string::

    Quote header (48 bytes)
      0  version                u16   4 or 5
      2  attestation key type   u16   2 = ECDSA-256-with-P-256
      4  TEE type               u32   0x00000081 = TDX (0x00000000 is SGX)
      8  reserved (QE SVN)      2
     10  reserved (PCE SVN)     2
     12  QE vendor ID           16    939a7233-f79c-4ca9-940a-0db3957f0607 for Intel's QE
     28  user data              20    first 16 bytes: the platform's QE identifier
    v5 only: body descriptor (6 bytes)
     48  body type              u16   2 = TDX 1.0 report body (584), 3 = TDX 1.5 (648)
     50  body size              u32
    TD report body (584 bytes, TDX 1.0; TDX 1.5 appends 64)
          TEE_TCB_SVN 16, MRSEAM 48, MRSIGNERSEAM 48, SEAMATTRIBUTES 8, TDATTRIBUTES 8,
          XFAM 8, MRTD 48, MRCONFIGID 48, MROWNER 48, MROWNERCONFIG 48,
          RTMR0..RTMR3 48 each, REPORTDATA 64; TDX 1.5: TEE_TCB_SVN2 16, MRSERVICETD 48
    Signature data length      u32
    Quote signature data (ECDSA 256-bit)
          signature 64 (r || s, big-endian), attestation public key 64 (x || y, big-endian),
          certification data: type u16, size u32, data
    Certification data type 6 (QE report certification data)
          QE report 384 (an SGX report body), QE report signature 64 (r || s),
          QE authentication data: size u16, data;
          certification data: type u16 (5 = PCK certificate chain, PEM), size u32, data

The attestation key signs header || [body descriptor] || body. The quoting enclave
(QE) vouches for the attestation key: its report data holds SHA-256(attestation key ||
QE authentication data) followed by 32 zero bytes, and the QE report is signed by the
platform's PCK key, whose certificate chains to the Intel SGX Root CA.

:func:`verify` checks all of that offline (DESIGN.md section 9, steps 2 and 3). TCB
status, QE identity and TDX module identity need Intel's collateral (a network
service): they are listed in :attr:`TDXVerification.not_checked`, never reported as
passed.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import itertools
import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cima.errors import (
    FreshnessError,
    ParseError,
    SignatureError,
    TruncatedError,
    UnsupportedFormatError,
)
from cima.evidence.reportdata import BindingMode, check_tdx_binding

__all__ = [
    "INTEL_QE_VENDOR_ID",
    "INTEL_SGX_ROOT_CA_PEM",
    "INTEL_SGX_ROOT_CA_SHA256",
    "NOT_CHECKED_OFFLINE",
    "STEPS",
    "BodyDescriptor",
    "CertificateChainError",
    "PCKExtensions",
    "QEReport",
    "QEReportDataError",
    "QEReportSignatureError",
    "QuoteHeader",
    "QuoteSignatureData",
    "QuoteSignatureError",
    "ReportDataBindingError",
    "RootOfTrustError",
    "TDReportBody",
    "TDXQuote",
    "TDXVerification",
    "TDXVerificationError",
    "clear_caches",
    "intel_sgx_root_ca",
    "looks_like",
    "pck_extensions",
    "verify",
]

# --- constants -------------------------------------------------------------------------

TEE_TYPE_TDX = 0x00000081
TEE_TYPE_SGX = 0x00000000
ATTESTATION_KEY_ECDSA_P256 = 2
SUPPORTED_VERSIONS = (4, 5)
CERT_DATA_QE_REPORT = 6
CERT_DATA_PCK_CHAIN = 5
BODY_TYPE_TDX10 = 2
BODY_TYPE_TDX15 = 3

INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

#: The verification steps, in the order :func:`verify` runs them; each error names one.
STEPS: tuple[str, ...] = (
    "quote-signature",
    "pck-chain",
    "root-of-trust",
    "qe-report-signature",
    "qe-report-data",
    "report-data",
)

#: What an offline verification cannot establish (it needs Intel's collateral service).
NOT_CHECKED_OFFLINE: tuple[str, ...] = ("tcb_status", "qe_identity", "tdx_module_identity")

#: The Intel SGX Root CA (production), the anchor of every PCK certificate chain, as
#: Intel publishes it on certificates.trustedservices.intel.com (its CRL is
#: IntelSGXRootCA.der there); go-tdx-guest pins the same certificate.
INTEL_SGX_ROOT_CA_PEM = b"""-----BEGIN CERTIFICATE-----
MIICjzCCAjSgAwIBAgIUImUM1lqdNInzg7SVUr9QGzknBqwwCgYIKoZIzj0EAwIw
aDEaMBgGA1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENv
cnBvcmF0aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJ
BgNVBAYTAlVTMB4XDTE4MDUyMTEwNDUxMFoXDTQ5MTIzMTIzNTk1OVowaDEaMBgG
A1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENvcnBvcmF0
aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJBgNVBAYT
AlVTMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC6nEwMDIYZOj/iPWsCzaEKi7
1OiOSLRFhWGjbnBVJfVnkY4u3IjkDYYL0MxO4mqsyYjlBalTVYxFP2sJBK5zlKOB
uzCBuDAfBgNVHSMEGDAWgBQiZQzWWp00ifODtJVSv1AbOScGrDBSBgNVHR8ESzBJ
MEegRaBDhkFodHRwczovL2NlcnRpZmljYXRlcy50cnVzdGVkc2VydmljZXMuaW50
ZWwuY29tL0ludGVsU0dYUm9vdENBLmRlcjAdBgNVHQ4EFgQUImUM1lqdNInzg7SV
Ur9QGzknBqwwDgYDVR0PAQH/BAQDAgEGMBIGA1UdEwEB/wQIMAYBAf8CAQEwCgYI
KoZIzj0EAwIDSQAwRgIhAOW/5QkR+S9CiSDcNoowLuPRLsWGf/Yi7GSX94BgwTwg
AiEA4J0lrHoMs+Xo5o/sX6O9QWxHRAvZUGOdRQ7cvqRXaqI=
-----END CERTIFICATE-----
"""

#: SHA-256 of the DER encoding of :data:`INTEL_SGX_ROOT_CA_PEM`, checked when it is loaded.
INTEL_SGX_ROOT_CA_SHA256 = bytes.fromhex(
    "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
)

_HEADER = struct.Struct("<HHI2s2s16s20s")
_DESCRIPTOR = struct.Struct("<HI")
_BODY_TDX10 = struct.Struct("<16s48s48s8s8s8s48s48s48s48s48s48s48s48s64s")
_BODY_TDX15_EXTRA = struct.Struct("<16s48s")
_QE_REPORT = struct.Struct("<16sI12s16s16s32s32s32s32s64sHHH42s16s64s")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_CERT_DATA_HEADER = struct.Struct("<HI")

HEADER_SIZE = _HEADER.size  # 48
TDX10_BODY_SIZE = _BODY_TDX10.size  # 584
TDX15_BODY_SIZE = TDX10_BODY_SIZE + _BODY_TDX15_EXTRA.size  # 648
QE_REPORT_SIZE = _QE_REPORT.size  # 384
ECDSA_SIGNATURE_SIZE = 64
ATTESTATION_KEY_SIZE = 64
_BODY_SIZES = {BODY_TYPE_TDX10: TDX10_BODY_SIZE, BODY_TYPE_TDX15: TDX15_BODY_SIZE}
_QE_REPORT_DATA_OFFSET = 320
_MAX_CHAIN_LENGTH = 8

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


# --- errors ------------------------------------------------------------------------------


class TDXVerificationError(SignatureError):
    """A TDX quote does not verify; ``step`` names the step that failed (see :data:`STEPS`)."""

    step: ClassVar[str] = "quote-signature"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        self.reason = reason
        super().__init__(f"{self.step}: {message}")


class QuoteSignatureError(TDXVerificationError):
    """The attestation key's signature over header and body does not verify."""

    step = "quote-signature"


class CertificateChainError(TDXVerificationError):
    """The PCK certificate chain is malformed, badly signed, expired or revoked.

    ``reason`` is one of ``malformed``, ``signature``, ``constraints``, ``key``,
    ``expired``, ``not-yet-valid``, ``crl-signature``, ``crl-expired``, ``revoked``,
    ``untrusted-root``.
    """

    step = "pck-chain"


class RootOfTrustError(CertificateChainError):
    """The PCK chain does not end in the trusted root (by default the Intel SGX Root CA)."""

    step = "root-of-trust"


class QEReportSignatureError(TDXVerificationError):
    """The QE report is not signed by the PCK leaf certificate's key."""

    step = "qe-report-signature"


class QEReportDataError(TDXVerificationError):
    """The QE report data does not bind the attestation key and QE authentication data."""

    step = "qe-report-data"


class ReportDataBindingError(FreshnessError):
    """REPORTDATA does not bind the expected nonce and user data (DESIGN.md section 4)."""

    step: ClassVar[str] = "report-data"


# --- decoding helpers ----------------------------------------------------------------------


class _Reader:
    """A bounded cursor over the input; every read checks the bytes left first."""

    __slots__ = ("data", "end", "pos", "source")

    def __init__(self, data: bytes, pos: int, end: int, source: str | None) -> None:
        self.data = data
        self.pos = pos
        self.end = end
        self.source = source

    @property
    def left(self) -> int:
        return self.end - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            raise TruncatedError(
                f"{what} needs {n} bytes, {self.left} left", offset=self.pos, source=self.source
            )

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        start = self.pos
        self.pos += n
        return self.data[start : self.pos]

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[Any, ...]:
        self.need(fmt.size, what)
        values = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return values

    def sub(self, n: int, what: str, length_offset: int) -> _Reader:
        """A reader over the next ``n`` bytes, whose length field was at ``length_offset``."""
        if n > self.left:
            raise TruncatedError(
                f"{what} length {n} exceeds the {self.left} bytes left",
                offset=length_offset,
                source=self.source,
            )
        sub = _Reader(self.data, self.pos, self.pos + n, self.source)
        self.pos += n
        return sub

    def done(self, what: str) -> None:
        if self.pos != self.end:
            raise ParseError(
                f"{self.end - self.pos} unexpected bytes after the {what}",
                offset=self.pos,
                source=self.source,
            )


_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"
_NOT_PEM_BASE64 = re.compile(rb"[^A-Za-z0-9+/=\r\n]")


def _eol(data: bytes, pos: int, end: int) -> int | None:
    """Position after a line ending (LF or CRLF) at ``pos``, or None."""
    if pos < end and data[pos] == 0x0A:
        return pos + 1
    if pos + 1 < end and data[pos] == 0x0D and data[pos + 1] == 0x0A:
        return pos + 2
    return None


def _parse_pem_chain(data: bytes, start: int, end: int, source: str | None) -> tuple[bytes, ...]:
    """Decode the PEM certificates in ``data[start:end]`` to DER, strictly.

    Accepted: one or more ``CERTIFICATE`` blocks, lines ending in LF or CRLF, the last
    line ending optional, then NUL padding (Intel's quoting library ends the chain with
    a NUL). The base64 must be canonical (what re-encoding the DER gives), so that any
    change to these bytes changes the certificates they carry.
    """
    text_end = end
    while text_end > start and data[text_end - 1] == 0:
        text_end -= 1
    if text_end == start:
        raise ParseError("the PCK certificate chain is empty", offset=start, source=source)
    ders: list[bytes] = []
    pos = start
    while pos < text_end:
        if len(ders) == _MAX_CHAIN_LENGTH:
            raise ParseError(
                f"more than {_MAX_CHAIN_LENGTH} certificates in the PCK chain",
                offset=pos,
                source=source,
            )
        block = pos
        if not data.startswith(_PEM_BEGIN, pos, text_end):
            raise ParseError(
                "expected '-----BEGIN CERTIFICATE-----' in the PCK certificate chain",
                offset=pos,
                source=source,
            )
        body = _eol(data, pos + len(_PEM_BEGIN), text_end)
        if body is None:
            raise ParseError(
                "expected a line ending after the PEM BEGIN line",
                offset=pos + len(_PEM_BEGIN),
                source=source,
            )
        stop = data.find(_PEM_END, body, text_end)
        if stop < 0 or stop == body or data[stop - 1] != 0x0A:
            raise ParseError(
                "PEM block has no '-----END CERTIFICATE-----' line", offset=body, source=source
            )
        b64 = data[body:stop].replace(b"\r\n", b"\n").replace(b"\n", b"")
        try:
            der = base64.b64decode(b64, validate=True)
        except binascii.Error as e:
            bad = _NOT_PEM_BASE64.search(data, body, stop)
            raise ParseError(
                f"PEM certificate body is not valid base64 ({e})",
                offset=block if bad is None else bad.start(),
                source=source,
            ) from e
        if not der or base64.b64encode(der) != b64:
            raise ParseError(
                "PEM certificate body is not canonical base64", offset=block, source=source
            )
        ders.append(der)
        pos = stop + len(_PEM_END)
        if pos < text_end:
            nxt = _eol(data, pos, text_end)
            if nxt is None:
                raise ParseError(
                    "expected a line ending after the PEM END line", offset=pos, source=source
                )
            pos = nxt
    return tuple(ders)


def _pem(der: bytes) -> str:
    b64 = base64.b64encode(der).decode("ascii")
    lines = "\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"


_TAG_INTEGER, _TAG_BIT_STRING, _TAG_OCTETS, _TAG_OID = 0x02, 0x03, 0x04, 0x06
_TAG_ENUM, _TAG_SEQUENCE = 0x0A, 0x30

#: What cryptography raises for a malformed certificate (beyond ValueError).
_X509_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    UnsupportedAlgorithm,
)
_X509_SIGNATURE_ERRORS: tuple[type[Exception], ...] = (*_X509_ERRORS, InvalidSignature)


def _decode_certificate(der: bytes) -> x509.Certificate:
    """Decode one DER certificate strictly, or raise :class:`ParseError`.

    cryptography decodes lazily and only warns about some RFC 5280 violations (a
    non-positive serial number, a wrong-sized attribute): every field the checks read
    is decoded here, and a warning about this certificate is an error.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cert = x509.load_der_x509_certificate(der)
            _ = (cert.subject, cert.issuer)
            _ = (cert.not_valid_before_utc, cert.not_valid_after_utc, cert.serial_number)
            _ = (list(cert.extensions), cert.signature_hash_algorithm)
        except _X509_ERRORS as e:
            raise ParseError(f"malformed certificate: {e}") from e
    # The signature BIT STRING is outside the signed TBSCertificate: insist on the one
    # DER encoding of an ECDSA signature value (no unused bits), so that no other
    # encoding of the same certificate passes.
    outer = _der_items(der)
    parts = _der_items(outer[0][1]) if len(outer) == 1 and outer[0][0] == _TAG_SEQUENCE else []
    if len(parts) != 3 or parts[2][0] != _TAG_BIT_STRING or parts[2][1][:1] != b"\x00":
        raise ParseError("certificate signature is not an octet-aligned BIT STRING")
    ours = [w for w in caught if w.filename == __file__]
    if ours:
        raise ParseError(f"malformed certificate: {ours[0].message}")
    for w in caught:
        if w.filename != __file__:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return cert


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuoteHeader:
    """The 48-byte quote header."""

    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: bytes
    """Reserved in TDX quotes (the SGX quote v3 layout puts the QE SVN here)."""
    pce_svn: bytes
    """Reserved in TDX quotes (the SGX quote v3 layout puts the PCE SVN here)."""
    qe_vendor_id: bytes
    user_data: bytes

    SIZE: ClassVar[int] = HEADER_SIZE

    def to_bytes(self) -> bytes:
        return _HEADER.pack(
            self.version,
            self.attestation_key_type,
            self.tee_type,
            self.qe_svn,
            self.pce_svn,
            self.qe_vendor_id,
            self.user_data,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "attestation_key_type": self.attestation_key_type,
            "tee_type": f"0x{self.tee_type:08x}",
            "qe_svn": self.qe_svn.hex(),
            "pce_svn": self.pce_svn.hex(),
            "qe_vendor_id": self.qe_vendor_id.hex(),
            "user_data": self.user_data.hex(),
        }


@dataclass(frozen=True, slots=True)
class BodyDescriptor:
    """The v5 body descriptor: which report body follows, and its size."""

    body_type: int
    size: int

    SIZE: ClassVar[int] = _DESCRIPTOR.size

    def to_bytes(self) -> bytes:
        return _DESCRIPTOR.pack(self.body_type, self.size)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.body_type, "size": self.size}


#: Named TDATTRIBUTES bits (Intel TDX module ABI, TDINFO_STRUCT.ATTRIBUTES).
TD_ATTRIBUTE_BITS: dict[str, int] = {
    "debug": 0,
    "septve_disable": 28,
    "protection_keys": 30,
    "key_locker": 31,
    "perfmon": 63,
}


@dataclass(frozen=True, slots=True)
class TDReportBody:
    """The TD report body: the TD's measurements and REPORTDATA (raw bytes as quoted).

    TDX 1.0 bodies (584 bytes) leave ``tee_tcb_svn2`` and ``mrservicetd`` None;
    TDX 1.5 bodies (648 bytes, v5 body type 3) carry both.
    """

    tee_tcb_svn: bytes
    mrseam: bytes
    mrsignerseam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mrservicetd: bytes | None = None

    @classmethod
    def _decode(cls, data: bytes, offset: int, size: int) -> TDReportBody:
        fields = _BODY_TDX10.unpack_from(data, offset)
        if size == TDX15_BODY_SIZE:
            extra = _BODY_TDX15_EXTRA.unpack_from(data, offset + TDX10_BODY_SIZE)
            return cls(*fields, *extra)
        return cls(*fields)

    @property
    def size(self) -> int:
        return TDX10_BODY_SIZE if self.tee_tcb_svn2 is None else TDX15_BODY_SIZE

    @property
    def tdx_version(self) -> str:
        """``"1.0"`` or ``"1.5"``: the TD report body layout."""
        return "1.0" if self.tee_tcb_svn2 is None else "1.5"

    def td_attribute(self, name: str) -> bool:
        """One named TDATTRIBUTES bit (see :data:`TD_ATTRIBUTE_BITS`)."""
        bit = TD_ATTRIBUTE_BITS[name]
        return bool(int.from_bytes(self.td_attributes, "little") >> bit & 1)

    def td_attribute_flags(self) -> dict[str, bool]:
        value = int.from_bytes(self.td_attributes, "little")
        return {name: bool(value >> bit & 1) for name, bit in TD_ATTRIBUTE_BITS.items()}

    @property
    def debug(self) -> bool:
        """TDATTRIBUTES bit 0: the TD is debuggable (its memory and state are not private)."""
        return bool(self.td_attributes[0] & 1)

    def rtmr(self, index: int) -> bytes:
        """RTMR ``index`` (0..3)."""
        if not 0 <= index <= 3:
            raise IndexError(f"RTMR index {index} out of range 0..3")
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)[index]

    def registers(self) -> dict[str, bytes]:
        """The TD measurement registers by canonical name: ``mrtd``, ``rtmr0``..``rtmr3``."""
        return {
            "mrtd": self.mrtd,
            "rtmr0": self.rtmr0,
            "rtmr1": self.rtmr1,
            "rtmr2": self.rtmr2,
            "rtmr3": self.rtmr3,
        }

    def to_bytes(self) -> bytes:
        base = _BODY_TDX10.pack(
            self.tee_tcb_svn,
            self.mrseam,
            self.mrsignerseam,
            self.seam_attributes,
            self.td_attributes,
            self.xfam,
            self.mrtd,
            self.mrconfigid,
            self.mrowner,
            self.mrownerconfig,
            self.rtmr0,
            self.rtmr1,
            self.rtmr2,
            self.rtmr3,
            self.report_data,
        )
        if self.tee_tcb_svn2 is None or self.mrservicetd is None:
            return base
        return base + _BODY_TDX15_EXTRA.pack(self.tee_tcb_svn2, self.mrservicetd)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tee_tcb_svn": self.tee_tcb_svn.hex(),
            "mrseam": self.mrseam.hex(),
            "mrsignerseam": self.mrsignerseam.hex(),
            "seam_attributes": self.seam_attributes.hex(),
            "td_attributes": self.td_attributes.hex(),
            "xfam": self.xfam.hex(),
            "mrtd": self.mrtd.hex(),
            "mrconfigid": self.mrconfigid.hex(),
            "mrowner": self.mrowner.hex(),
            "mrownerconfig": self.mrownerconfig.hex(),
            "rtmr0": self.rtmr0.hex(),
            "rtmr1": self.rtmr1.hex(),
            "rtmr2": self.rtmr2.hex(),
            "rtmr3": self.rtmr3.hex(),
            "report_data": self.report_data.hex(),
        }
        if self.tee_tcb_svn2 is not None and self.mrservicetd is not None:
            out["tee_tcb_svn2"] = self.tee_tcb_svn2.hex()
            out["mrservicetd"] = self.mrservicetd.hex()
        return out


@dataclass(frozen=True, slots=True)
class QEReport:
    """The quoting enclave's report: an SGX REPORT body (384 bytes, Intel SDM SGX chapter)."""

    cpu_svn: bytes
    misc_select: int
    reserved1: bytes
    isv_ext_prod_id: bytes
    attributes: bytes
    mrenclave: bytes
    reserved2: bytes
    mrsigner: bytes
    reserved3: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    reserved4: bytes
    isv_family_id: bytes
    report_data: bytes

    SIZE: ClassVar[int] = QE_REPORT_SIZE

    @classmethod
    def from_bytes(cls, data: bytes) -> QEReport:
        if len(data) != QE_REPORT_SIZE:
            raise TruncatedError(
                f"a QE report is {QE_REPORT_SIZE} bytes, got {len(data)}", offset=0
            )
        return cls(*_QE_REPORT.unpack(data))

    def to_bytes(self) -> bytes:
        return _QE_REPORT.pack(
            self.cpu_svn,
            self.misc_select,
            self.reserved1,
            self.isv_ext_prod_id,
            self.attributes,
            self.mrenclave,
            self.reserved2,
            self.mrsigner,
            self.reserved3,
            self.config_id,
            self.isv_prod_id,
            self.isv_svn,
            self.config_svn,
            self.reserved4,
            self.isv_family_id,
            self.report_data,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu_svn": self.cpu_svn.hex(),
            "misc_select": self.misc_select,
            "attributes": self.attributes.hex(),
            "mrenclave": self.mrenclave.hex(),
            "mrsigner": self.mrsigner.hex(),
            "config_id": self.config_id.hex(),
            "isv_prod_id": self.isv_prod_id,
            "isv_svn": self.isv_svn,
            "config_svn": self.config_svn,
            "isv_family_id": self.isv_family_id.hex(),
            "report_data": self.report_data.hex(),
        }


@dataclass(frozen=True, slots=True)
class QuoteSignatureData:
    """ECDSA-256 quote signature data with QE report certification data (type 6).

    ``qe_report_bytes`` are the QE report as received (what the PCK key signed);
    :attr:`qe_report` decodes them. ``pck_chain_pem`` is the PCK certification data
    as received; ``pck_chain`` holds the DER certificates it carries, leaf first.
    """

    signature: bytes
    attestation_key: bytes
    qe_report_bytes: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes
    pck_chain: tuple[bytes, ...]
    certification_data_type: int = CERT_DATA_QE_REPORT
    pck_certification_data_type: int = CERT_DATA_PCK_CHAIN

    @property
    def qe_report(self) -> QEReport:
        return QEReport.from_bytes(self.qe_report_bytes)

    def pem_certificates(self) -> list[str]:
        """Each PCK chain certificate as PEM text, leaf first."""
        return [_pem(der) for der in self.pck_chain]

    def certificates(self) -> list[x509.Certificate]:
        """The PCK chain as certificate objects, leaf first (ParseError if one does not decode)."""
        out = []
        for i, der in enumerate(self.pck_chain):
            try:
                out.append(_decode_certificate(der))
            except ParseError as e:
                raise ParseError(f"PCK chain certificate {i + 1} does not decode: {e}") from e
        return out

    def to_bytes(self) -> bytes:
        inner = _CERT_DATA_HEADER.pack(self.pck_certification_data_type, len(self.pck_chain_pem))
        qe_cert_data = b"".join(
            (
                self.qe_report_bytes,
                self.qe_report_signature,
                _U16.pack(len(self.qe_auth_data)),
                self.qe_auth_data,
                inner,
                self.pck_chain_pem,
            )
        )
        return b"".join(
            (
                self.signature,
                self.attestation_key,
                _CERT_DATA_HEADER.pack(self.certification_data_type, len(qe_cert_data)),
                qe_cert_data,
            )
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "signature": self.signature.hex(),
            "attestation_public_key": self.attestation_key.hex(),
            "certification_data_type": self.certification_data_type,
            "qe_report": self.qe_report.to_dict(),
            "qe_report_signature": self.qe_report_signature.hex(),
            "qe_auth_data": self.qe_auth_data.hex(),
            "pck_certification_data_type": self.pck_certification_data_type,
            "pck_chain": self.pem_certificates(),
        }


@dataclass(frozen=True, slots=True)
class TDXQuote:
    """A decoded TDX quote (v4 or v5).

    ``signed_bytes`` are header || [body descriptor] || body exactly as received: the
    bytes the attestation key signed. ``trailing`` holds whatever followed the quote in
    the input (quote buffers are often zero-padded); it is not part of the quote.
    """

    header: QuoteHeader
    body_descriptor: BodyDescriptor | None
    body: TDReportBody
    signature_data: QuoteSignatureData
    signed_bytes: bytes
    trailing: bytes = b""

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, *, source: str | None = None
    ) -> TDXQuote:
        """Decode a quote, or raise :class:`~cima.errors.ParseError` naming the offset."""
        buf = bytes(data)
        r = _Reader(buf, 0, len(buf), source)

        # Header.
        if r.left >= 2:
            (version,) = _U16.unpack_from(buf, 0)
            if version not in SUPPORTED_VERSIONS:
                raise UnsupportedFormatError(
                    f"quote version {version} is not supported (expected 4 or 5)",
                    offset=0,
                    source=source,
                )
        version, key_type, tee_type, qe_svn, pce_svn, vendor, user_data = r.unpack(
            _HEADER, "quote header"
        )
        if tee_type != TEE_TYPE_TDX:
            raise UnsupportedFormatError(
                f"TEE type 0x{tee_type:08x} is not TDX (0x{TEE_TYPE_TDX:08x})",
                offset=4,
                source=source,
            )
        if key_type != ATTESTATION_KEY_ECDSA_P256:
            raise UnsupportedFormatError(
                f"attestation key type {key_type} is not supported "
                f"(expected {ATTESTATION_KEY_ECDSA_P256}, ECDSA-256-with-P-256)",
                offset=2,
                source=source,
            )
        header = QuoteHeader(version, key_type, tee_type, qe_svn, pce_svn, vendor, user_data)

        # Body descriptor (v5) and body.
        descriptor: BodyDescriptor | None = None
        body_size = TDX10_BODY_SIZE
        if version == 5:
            at = r.pos
            body_type, body_size = r.unpack(_DESCRIPTOR, "body descriptor")
            expected = _BODY_SIZES.get(body_type)
            if expected is None:
                raise UnsupportedFormatError(
                    f"body type {body_type} is not a TD report body "
                    f"(expected {BODY_TYPE_TDX10} for TDX 1.0 or {BODY_TYPE_TDX15} for TDX 1.5)",
                    offset=at,
                    source=source,
                )
            if body_size != expected:
                raise ParseError(
                    f"body type {body_type} is {expected} bytes, the descriptor says {body_size}",
                    offset=at + 2,
                    source=source,
                )
            descriptor = BodyDescriptor(body_type, body_size)
        r.need(body_size, "TD report body")
        body = TDReportBody._decode(buf, r.pos, body_size)
        r.pos += body_size
        signed_bytes = buf[: r.pos]

        # Signature data.
        at = r.pos
        (sig_len,) = r.unpack(_U32, "signature data length")
        s = r.sub(sig_len, "signature data", at)
        signature = s.take(ECDSA_SIGNATURE_SIZE, "quote signature")
        attestation_key = s.take(ATTESTATION_KEY_SIZE, "attestation key")
        at = s.pos
        cert_type, cert_size = s.unpack(_CERT_DATA_HEADER, "certification data header")
        if cert_type != CERT_DATA_QE_REPORT:
            raise UnsupportedFormatError(
                f"certification data type {cert_type} is not supported "
                f"(expected {CERT_DATA_QE_REPORT}, QE report certification data)",
                offset=at,
                source=source,
            )
        c = s.sub(cert_size, "certification data", at + 2)
        s.done("certification data")
        qe_report = c.take(QE_REPORT_SIZE, "QE report")
        qe_report_signature = c.take(ECDSA_SIGNATURE_SIZE, "QE report signature")
        at = c.pos
        (auth_len,) = c.unpack(_U16, "QE authentication data size")
        auth = c.sub(auth_len, "QE authentication data", at)
        qe_auth_data = buf[auth.pos : auth.end]
        at = c.pos
        inner_type, inner_size = c.unpack(_CERT_DATA_HEADER, "PCK certification data header")
        if inner_type != CERT_DATA_PCK_CHAIN:
            raise UnsupportedFormatError(
                f"PCK certification data type {inner_type} is not supported "
                f"(expected {CERT_DATA_PCK_CHAIN}, a PEM PCK certificate chain)",
                offset=at,
                source=source,
            )
        p = c.sub(inner_size, "PCK certification data", at + 2)
        c.done("PCK certification data")
        pem = buf[p.pos : p.end]
        chain = _parse_pem_chain(buf, p.pos, p.end, source)

        sig_data = QuoteSignatureData(
            signature=signature,
            attestation_key=attestation_key,
            qe_report_bytes=qe_report,
            qe_report_signature=qe_report_signature,
            qe_auth_data=qe_auth_data,
            pck_chain_pem=pem,
            pck_chain=chain,
        )
        return cls(header, descriptor, body, sig_data, signed_bytes, buf[r.pos :])

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def report_data(self) -> bytes:
        return self.body.report_data

    def registers(self) -> dict[str, bytes]:
        """``mrtd`` and ``rtmr0``..``rtmr3`` by name."""
        return self.body.registers()

    @property
    def size(self) -> int:
        """Length of the quote itself, without trailing bytes."""
        return len(self.signed_bytes) + 4 + len(self._signature_data_bytes())

    def _signature_data_bytes(self) -> bytes:
        return self.signature_data.to_bytes()

    def to_bytes(self, *, trailing: bool = True) -> bytes:
        """Encode the quote; with ``trailing`` (default) the bytes that followed it too."""
        parts = [self.header.to_bytes()]
        if self.body_descriptor is not None:
            parts.append(self.body_descriptor.to_bytes())
        parts.append(self.body.to_bytes())
        sig = self._signature_data_bytes()
        parts += [_U32.pack(len(sig)), sig]
        if trailing:
            parts.append(self.trailing)
        return b"".join(parts)

    def to_dict(self) -> dict[str, Any]:
        sig = self._signature_data_bytes()
        out: dict[str, Any] = {"header": self.header.to_dict()}
        if self.body_descriptor is not None:
            out["body_descriptor"] = self.body_descriptor.to_dict()
        out["body"] = self.body.to_dict()
        out["signature_data_len"] = len(sig)
        out["signature_data"] = self.signature_data.to_dict()
        out["quote_bytes"] = len(self.signed_bytes) + 4 + len(sig)
        out["trailing_bytes"] = len(self.trailing)
        out["trailing_all_zero"] = not any(self.trailing)
        return out


def looks_like(data: bytes | bytearray | memoryview) -> bool:
    """True if ``data`` starts like a TDX quote (version 4 or 5, TEE type TDX)."""
    if len(data) < 8:
        return False
    version, _, tee_type = struct.unpack_from("<HHI", data, 0)
    return version in SUPPORTED_VERSIONS and tee_type == TEE_TYPE_TDX


# --- PCK certificate extensions ------------------------------------------------------------


def _oid_content(dotted: str) -> bytes:
    """DER content octets of an OBJECT IDENTIFIER."""
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


_SGX_EXTENSIONS_OID = "1.2.840.113741.1.13.1"
_SGX = _oid_content(_SGX_EXTENSIONS_OID)
_SGX_EXTENSIONS = x509.ObjectIdentifier(_SGX_EXTENSIONS_OID)


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """(tag, content) of each DER element in ``data`` (definite lengths, one-byte tags)."""
    items: list[tuple[int, bytes]] = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 2:
            raise ParseError("truncated DER element", offset=pos)
        tag, length = data[pos], data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4 or n > end - pos:
                raise ParseError("bad DER length", offset=pos - 1)
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        if length > end - pos:
            raise ParseError("DER element longer than its container", offset=pos)
        items.append((tag, data[pos : pos + length]))
        pos += length
    return items


def _der_pairs(data: bytes) -> dict[bytes, tuple[int, bytes]]:
    """A SEQUENCE OF SEQUENCE { OID, value } as {oid content: (value tag, value content)}."""
    out: dict[bytes, tuple[int, bytes]] = {}
    for tag, content in _der_items(data):
        items = _der_items(content) if tag == _TAG_SEQUENCE else []
        if len(items) != 2 or items[0][0] != _TAG_OID:
            raise ParseError("SGX extension entry is not SEQUENCE { OID, value }")
        out[items[0][1]] = items[1]
    return out


def _der_int(value: tuple[int, bytes], what: str) -> int:
    tag, content = value
    if tag not in (_TAG_INTEGER, _TAG_ENUM) or not content:
        raise ParseError(f"SGX extension {what} is not an INTEGER")
    return int.from_bytes(content, "big", signed=True)


def _der_octets(value: tuple[int, bytes], what: str, size: int) -> bytes:
    tag, content = value
    if tag != _TAG_OCTETS or len(content) != size:
        raise ParseError(f"SGX extension {what} is not an OCTET STRING of {size} bytes")
    return content


@dataclass(frozen=True, slots=True)
class PCKExtensions:
    """The Intel SGX extensions of a PCK certificate (OID 1.2.840.113741.1.13.1).

    These identify the platform and its TCB level, as Intel's collateral service needs
    them (FMSPC, PCE ID) to look up the TCB status; they are reported, not judged.
    """

    ppid: bytes
    cpu_svn: bytes
    tcb_components: tuple[int, ...]
    pce_svn: int
    pce_id: bytes
    fmspc: bytes
    sgx_type: int
    platform_instance_id: bytes | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ppid": self.ppid.hex(),
            "cpu_svn": self.cpu_svn.hex(),
            "tcb_components": list(self.tcb_components),
            "pce_svn": self.pce_svn,
            "pce_id": self.pce_id.hex(),
            "fmspc": self.fmspc.hex(),
            "sgx_type": self.sgx_type,
            "platform_instance_id": (
                None if self.platform_instance_id is None else self.platform_instance_id.hex()
            ),
        }


def pck_extensions(cert: x509.Certificate) -> PCKExtensions | None:
    """The SGX extensions of a PCK certificate, or None if it has none (ParseError if malformed)."""
    try:
        ext = cert.extensions.get_extension_for_oid(_SGX_EXTENSIONS)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise ParseError("SGX extension is not an opaque extension")
    top = _der_items(value.value)
    if len(top) != 1 or top[0][0] != _TAG_SEQUENCE:
        raise ParseError("SGX extension is not one SEQUENCE")
    fields = _der_pairs(top[0][1])

    def get(arc: int, what: str) -> tuple[int, bytes]:
        try:
            return fields[_SGX + bytes([arc])]
        except KeyError:
            raise ParseError(f"SGX extension has no {what}") from None

    tcb_tag, tcb_content = get(2, "TCB")
    if tcb_tag != _TAG_SEQUENCE:
        raise ParseError("SGX extension TCB is not a SEQUENCE")
    tcb = _der_pairs(tcb_content)
    tcb_base = _SGX + bytes([2])

    def tcb_get(arc: int, what: str) -> tuple[int, bytes]:
        try:
            return tcb[tcb_base + bytes([arc])]
        except KeyError:
            raise ParseError(f"SGX extension TCB has no {what}") from None

    components = tuple(
        _der_int(tcb_get(i, f"component {i}"), f"TCB component {i}") for i in range(1, 17)
    )
    instance = fields.get(_SGX + bytes([6]))
    return PCKExtensions(
        ppid=_der_octets(get(1, "PPID"), "PPID", 16),
        cpu_svn=_der_octets(tcb_get(18, "CPUSVN"), "CPUSVN", 16),
        tcb_components=components,
        pce_svn=_der_int(tcb_get(17, "PCESVN"), "PCESVN"),
        pce_id=_der_octets(get(3, "PCE-ID"), "PCE-ID", 2),
        fmspc=_der_octets(get(4, "FMSPC"), "FMSPC", 6),
        sgx_type=_der_int(get(5, "SGX type"), "SGX type"),
        platform_instance_id=(
            None if instance is None else _der_octets(instance, "platform instance ID", 16)
        ),
    )


# --- verification --------------------------------------------------------------------------


@functools.cache
def intel_sgx_root_ca() -> x509.Certificate:
    """The pinned Intel SGX Root CA; its SHA-256 fingerprint is checked on load."""
    cert = x509.load_pem_x509_certificate(INTEL_SGX_ROOT_CA_PEM)
    if not hmac.compare_digest(cert.fingerprint(hashes.SHA256()), INTEL_SGX_ROOT_CA_SHA256):
        raise RootOfTrustError(
            "the embedded Intel SGX Root CA does not match its pinned fingerprint",
            reason="untrusted-root",
        )
    return cert


@dataclass(frozen=True, slots=True)
class TDXVerification:
    """The outcome of a successful :func:`verify`: what was checked, and what was not."""

    quote: TDXQuote
    checked: tuple[str, ...]
    not_checked: tuple[str, ...]
    trusted_root_sha256: bytes
    pck_chain_subjects: tuple[str, ...]
    pck_leaf_not_after: datetime
    pck: PCKExtensions | None
    crl_issuers: tuple[str, ...]
    binding: str | None
    verified_at: datetime

    def registers(self) -> dict[str, bytes]:
        return self.quote.registers()

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": list(self.checked),
            "not_checked": list(self.not_checked),
            "trusted_root_sha256": self.trusted_root_sha256.hex(),
            "pck_chain_subjects": list(self.pck_chain_subjects),
            "pck_leaf_not_after": self.pck_leaf_not_after.isoformat(),
            "pck": None if self.pck is None else self.pck.to_dict(),
            "crl_issuers": list(self.crl_issuers),
            "binding": self.binding,
            "verified_at": self.verified_at.isoformat(),
            "registers": {k: v.hex() for k, v in self.registers().items()},
            "report_data": self.quote.report_data.hex(),
        }


@dataclass(frozen=True, slots=True)
class _Chain:
    """A PCK chain whose signatures, constraints and anchor have been checked."""

    certificates: tuple[x509.Certificate, ...]
    """Leaf first, ending with the trusted root (appended if the quote omits it)."""
    leaf_key: ec.EllipticCurvePublicKey
    names: tuple[str, ...]
    """Subject of each of :attr:`certificates`."""
    validity: tuple[tuple[datetime, datetime, str], ...]
    subjects: tuple[str, ...]
    """Subject of each certificate the quote carries."""
    pck: PCKExtensions | None


_ALLOWED_CRITICAL = frozenset({x509.BasicConstraints.oid, x509.KeyUsage.oid})


@functools.lru_cache(maxsize=512)
def _name(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except (ValueError, TypeError):
        return "a certificate with an undecodable subject"


def _check_extensions(cert: x509.Certificate, role: str, below: int) -> None:
    """Constraints of a certificate at a position in the chain (RFC 5280 section 4.2)."""
    try:
        exts = cert.extensions
        basic: x509.BasicConstraints | None = None
        usage: x509.KeyUsage | None = None
        for ext in exts:
            if ext.critical and ext.oid not in _ALLOWED_CRITICAL:
                raise CertificateChainError(
                    f"{role} {_name(cert)} has an unknown critical extension "
                    f"{ext.oid.dotted_string}",
                    reason="constraints",
                )
            if isinstance(ext.value, x509.BasicConstraints):
                basic = ext.value
            elif isinstance(ext.value, x509.KeyUsage):
                usage = ext.value
    except _X509_ERRORS as e:
        raise CertificateChainError(
            f"{role} has malformed extensions: {e}", reason="malformed"
        ) from e
    if role == "PCK leaf":
        if basic is not None and basic.ca:
            raise CertificateChainError(
                f"PCK leaf {_name(cert)} is a CA certificate", reason="constraints"
            )
        if usage is not None and not usage.digital_signature:
            raise CertificateChainError(
                f"PCK leaf {_name(cert)} may not sign (no digitalSignature key usage)",
                reason="constraints",
            )
        return
    if basic is None or not basic.ca:
        raise CertificateChainError(
            f"{role} {_name(cert)} is not a CA certificate", reason="constraints"
        )
    if basic.path_length is not None and basic.path_length < below:
        raise CertificateChainError(
            f"{role} {_name(cert)} allows {basic.path_length} intermediate CAs below it, "
            f"the chain has {below}",
            reason="constraints",
        )
    if usage is not None and not usage.key_cert_sign:
        raise CertificateChainError(
            f"{role} {_name(cert)} may not sign certificates (no keyCertSign key usage)",
            reason="constraints",
        )


def _check_issued(
    child: x509.Certificate, parent: x509.Certificate, error: type[CertificateChainError]
) -> None:
    detail = _issuance_error(child, parent)
    if detail is not None:
        raise error(
            f"{_name(child)} is not issued by {_name(parent)}: {detail}",
            reason="untrusted-root" if error is RootOfTrustError else "signature",
        )


# Caches. A verifier sees many platforms whose PCK chains share the CA certificates:
# decoded certificates and verified issuance are cached per certificate, whole chains
# per chain and trusted root, attestation keys per key.


@functools.lru_cache(maxsize=512)
def _certificate(der: bytes) -> x509.Certificate:
    return _decode_certificate(der)


@functools.lru_cache(maxsize=512)
def _issuance_error(child: x509.Certificate, parent: x509.Certificate) -> str | None:
    """None if ``parent`` issued ``child`` (name and signature), else why not."""
    try:
        child.verify_directly_issued_by(parent)
    except _X509_SIGNATURE_ERRORS as e:
        return str(e) or "the signature does not verify"
    return None


@functools.lru_cache(maxsize=1024)
def _attestation_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)


@functools.lru_cache(maxsize=64)
def _fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


@functools.lru_cache(maxsize=256)
def _verified_chain(ders: tuple[bytes, ...], root: x509.Certificate) -> _Chain:
    """Steps (2) and (3) for one chain and root: everything that does not depend on time."""
    if not ders:
        raise CertificateChainError("the PCK certificate chain is empty", reason="malformed")
    certs: list[x509.Certificate] = []
    for i, der in enumerate(ders):
        try:
            certs.append(_certificate(der))
        except ParseError as e:
            raise CertificateChainError(
                f"certificate {i + 1} of {len(ders)} in the PCK chain does not decode: {e}",
                reason="malformed",
            ) from e
    # (2) each certificate is issued by the next, with CA constraints.
    for child, parent in itertools.pairwise(certs):
        _check_issued(child, parent, CertificateChainError)
    _check_extensions(certs[0], "PCK leaf", 0)
    for i, cert in enumerate(certs[1:], start=1):
        _check_extensions(cert, "CA", i - 1)
    try:
        leaf_key = certs[0].public_key()
    except _X509_ERRORS as e:
        raise CertificateChainError(f"PCK leaf key does not decode: {e}", reason="key") from e
    if not isinstance(leaf_key, ec.EllipticCurvePublicKey) or not isinstance(
        leaf_key.curve, ec.SECP256R1
    ):
        raise CertificateChainError("PCK leaf key is not an ECDSA P-256 key", reason="key")
    # (3) the chain ends in the trusted root: either it is the top certificate
    # (compared by fingerprint), or the top certificate is issued by it.
    top = certs[-1]
    root_fp = _fingerprint(root)
    if top.subject == top.issuer:
        if not hmac.compare_digest(_fingerprint(top), root_fp):
            raise RootOfTrustError(
                f"the PCK chain ends in {_name(top)} with SHA-256 fingerprint "
                f"{_fingerprint(top).hex()}, not the trusted root {root_fp.hex()}",
                reason="untrusted-root",
            )
        anchored = tuple(certs)
    else:
        _check_issued(top, root, RootOfTrustError)
        _check_extensions(root, "trusted root", len(certs) - 1)
        anchored = (*certs, root)
    try:
        pck = pck_extensions(certs[0])
    except ParseError as e:
        raise CertificateChainError(
            f"PCK leaf SGX extension is malformed: {e}", reason="malformed"
        ) from e
    names = tuple(_name(c) for c in anchored)
    return _Chain(
        certificates=anchored,
        leaf_key=leaf_key,
        names=names,
        validity=tuple(
            (c.not_valid_before_utc, c.not_valid_after_utc, name)
            for c, name in zip(anchored, names, strict=True)
        ),
        subjects=names[: len(certs)],
        pck=pck,
    )


def _check_time_and_revocation(
    chain: _Chain, now: datetime, crls: Sequence[x509.CertificateRevocationList]
) -> tuple[str, ...]:
    """Step (4): validity at ``now`` and CRLs. Returns the issuers whose CRLs applied."""
    for not_before, not_after, name in chain.validity:
        if now < not_before:
            raise CertificateChainError(
                f"{name} is not yet valid: notBefore {not_before.isoformat()}, "
                f"now {now.isoformat()}",
                reason="not-yet-valid",
            )
        if now > not_after:
            raise CertificateChainError(
                f"{name} expired: notAfter {not_after.isoformat()}, now {now.isoformat()}",
                reason="expired",
            )
    applied: list[str] = []
    certs = chain.certificates
    for crl in crls:
        for i, (cert, issuer) in enumerate(itertools.pairwise(certs)):
            if crl.issuer != issuer.subject:
                continue
            issuer_name = chain.names[i + 1]
            try:
                valid = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
            except (ValueError, TypeError, UnsupportedAlgorithm):
                valid = False
            if not valid:
                raise CertificateChainError(
                    f"the CRL from {issuer_name} is not signed by its key",
                    reason="crl-signature",
                )
            next_update = crl.next_update_utc
            if next_update is not None and now > next_update:
                raise CertificateChainError(
                    f"the CRL from {issuer_name} expired: nextUpdate {next_update.isoformat()}",
                    reason="crl-expired",
                )
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                raise CertificateChainError(
                    f"{_name(cert)} (serial {cert.serial_number:x}) is revoked by {issuer_name}",
                    reason="revoked",
                )
            if issuer_name not in applied:
                applied.append(issuer_name)
    return tuple(applied)


def _raw_to_der_signature(raw: bytes) -> bytes:
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


def verify(
    quote: TDXQuote,
    *,
    trusted_root: x509.Certificate | None = None,
    now: datetime | None = None,
    crls: Sequence[x509.CertificateRevocationList] = (),
    nonce: bytes | None = None,
    user_data: bytes = b"",
    binding: BindingMode = "hash",
) -> TDXVerification:
    """Verify a TDX quote offline; raise a :class:`TDXVerificationError` naming the failed step.

    Steps (DESIGN.md section 9, steps 2 and 3):

    1. ``quote-signature``: the attestation key's ECDSA P-256 signature over
       header || [body descriptor] || body;
    2. ``pck-chain``: every PCK chain certificate decodes and is signed by the next,
       CA certificates are CAs (path length, key usage), the leaf is not;
    3. ``root-of-trust``: the chain ends in ``trusted_root`` (default: the pinned Intel
       SGX Root CA, compared by SHA-256 fingerprint);
    4. ``pck-chain``: every certificate is valid at ``now`` (default: the current time;
       a naive datetime is taken as UTC), and none is revoked by ``crls``;
    5. ``qe-report-signature``: the PCK leaf key signs the QE report;
    6. ``qe-report-data``: QE report data = SHA-256(attestation key || QE authentication
       data) || 32 zero bytes;
    7. ``report-data`` (only with ``nonce`` or ``user_data``): REPORTDATA binds them
       (``binding`` ``"hash"``: SHA-512(nonce || user_data); ``"raw"``: zero-padded);
       raises :class:`ReportDataBindingError`, a :class:`~cima.errors.FreshnessError`.
    """
    sd = quote.signature_data
    root = intel_sgx_root_ca() if trusted_root is None else trusted_root
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    checked: list[str] = []

    # (1) quote signature by the attestation key.
    try:
        att_key = _attestation_key(sd.attestation_key)
    except ValueError as e:
        raise QuoteSignatureError(
            "the attestation key is not a point on P-256", reason="key"
        ) from e
    try:
        att_key.verify(_raw_to_der_signature(sd.signature), quote.signed_bytes, _ECDSA_SHA256)
    except InvalidSignature as e:
        raise QuoteSignatureError(
            "the attestation key's signature over the quote header and body does not verify",
            reason="signature",
        ) from e
    checked.append("quote-signature")

    # (2), (3) chain signatures, constraints and anchor (cached per chain and root).
    chain = _verified_chain(sd.pck_chain, root)
    # (4) validity and revocation at `now`.
    crl_issuers = _check_time_and_revocation(chain, now, crls)
    checked += ["pck-chain", "root-of-trust"]

    # (5) QE report signed by the PCK leaf key.
    try:
        chain.leaf_key.verify(
            _raw_to_der_signature(sd.qe_report_signature), sd.qe_report_bytes, _ECDSA_SHA256
        )
    except InvalidSignature as e:
        raise QEReportSignatureError(
            "the QE report signature does not verify with the PCK leaf key", reason="signature"
        ) from e
    checked.append("qe-report-signature")

    # (6) QE report data binds the attestation key.
    qe_data = sd.qe_report_bytes[_QE_REPORT_DATA_OFFSET : _QE_REPORT_DATA_OFFSET + 64]
    expected = hashlib.sha256(sd.attestation_key + sd.qe_auth_data).digest()
    if not hmac.compare_digest(qe_data[:32], expected):
        raise QEReportDataError(
            "QE report data is not SHA-256(attestation key || QE authentication data): "
            f"expected {expected.hex()}, got {qe_data[:32].hex()}",
            reason="binding",
        )
    if any(qe_data[32:]):
        raise QEReportDataError(
            "the upper 32 bytes of the QE report data are not zero", reason="binding"
        )
    checked.append("qe-report-data")

    # (7) optional nonce and user-data binding.
    bound: str | None = None
    if nonce is not None or user_data:
        try:
            check_tdx_binding(quote.body.report_data, nonce or b"", user_data, binding)
        except FreshnessError as e:
            raise ReportDataBindingError(f"report-data: {e}") from e
        checked.append("report-data")
        bound = binding

    not_checked = list(NOT_CHECKED_OFFLINE)
    leaf_issuer = chain.names[1] if len(chain.names) > 1 else None
    if leaf_issuer is None or leaf_issuer not in crl_issuers:
        not_checked.append("pck_revocation")
    if bound is None:
        not_checked.append("report_data_binding")
    return TDXVerification(
        quote=quote,
        checked=tuple(checked),
        not_checked=tuple(not_checked),
        trusted_root_sha256=_fingerprint(root),
        pck_chain_subjects=chain.subjects,
        pck_leaf_not_after=chain.validity[0][1],
        pck=chain.pck,
        crl_issuers=crl_issuers,
        binding=bound,
        verified_at=now,
    )


def clear_caches() -> None:
    """Forget cached keys and verified chains (for benchmarks measuring a cold start)."""
    _attestation_key.cache_clear()
    _verified_chain.cache_clear()
    _fingerprint.cache_clear()
    _certificate.cache_clear()
    _issuance_error.cache_clear()
    _name.cache_clear()
