"""TPM 2.0 quotes: the TPMS_ATTEST / TPMT_SIGNATURE / TPMT_PUBLIC codec and quote verification.

Structures follow the TPM 2.0 Library specification, Part 2: Structures. Every
TPM structure is big-endian; a ``TPM2B_*`` is a 16-bit size followed by that
many bytes.

``TPMS_ATTEST`` (10.12.12), what ``TPM2_Quote`` signs::

    magic            UINT32    TPM_GENERATED_VALUE, 0xff544347
    type             UINT16    TPM_ST_ATTEST_QUOTE (0x8018) for a quote
    qualifiedSigner  TPM2B_NAME
    extraData        TPM2B_DATA     the caller's qualifying data
    clockInfo        TPMS_CLOCK_INFO: clock UINT64, resetCount UINT32,
                                      restartCount UINT32, safe BYTE (TPMI_YES_NO)
    firmwareVersion  UINT64
    attested         TPMU_ATTEST    for a quote, TPMS_QUOTE_INFO:
        pcrSelect    TPML_PCR_SELECTION: count UINT32, then per bank
                     hash UINT16, sizeofSelect BYTE, pcrSelect[sizeofSelect]
                     (bit i of octet i/8 selects PCR i)
        pcrDigest    TPM2B_DIGEST   H(selected PCR values, bank by bank, ascending index)

``TPMT_SIGNATURE`` (11.3.4): sigAlg UINT16, then for RSASSA (0x0014) and RSAPSS
(0x0016) hash UINT16 + TPM2B_PUBLIC_KEY_RSA; for ECDSA (0x0018) and the other
ECC schemes hash UINT16 + TPM2B r + TPM2B s.

``TPMT_PUBLIC`` (12.2.4) for RSA and ECC keys; a key's TPM name is
``nameAlg || H_nameAlg(TPMT_PUBLIC)`` (Part 1, 16 Names).

tpm2-tools' PCR file (``tpm2_quote -o``, "serialized" format) is not a TPM
structure but the C structs written with ``fwrite`` in little-endian order:
``TPML_PCR_SELECTION`` (132 bytes: count UINT32 + 16 x TPMS_PCR_SELECTION of
hash UINT16, sizeofSelect BYTE, pcrSelect[4], one padding byte), a UINT32
count, then that many ``TPML_DIGEST`` (532 bytes: count UINT32 + 8 x
TPM2B_DIGEST of size UINT16 + buffer[64]). See :class:`PCRValues`.

Quote verification (:func:`verify_quote`) is the four steps of DESIGN.md
section 9 for a TPM: (1) parse, (2) the AK's signature over the attest bytes
exactly as received, (3) freshness: extraData binds the expected qualifying
data, (4) pcrDigest equals the digest of the claimed PCR values.
"""

from __future__ import annotations

import functools
import hmac
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from cima.digests import HashAlgorithm, by_id, by_name, is_known_id
from cima.errors import (
    AlgorithmError,
    CimaError,
    FreshnessError,
    ParseError,
    RegisterError,
    ReplayMismatchError,
    SignatureError,
    TruncatedError,
    UnsupportedFormatError,
)
from cima.evidence.reportdata import check_tpm_binding
from cima.registers import PCR_COUNT, RegisterBank, RegisterValue, pcr_index, pcr_name

__all__ = [
    "AK_ATTRIBUTES",
    "PCRDigestError",
    "PCRSelection",
    "PCRValues",
    "PublicArea",
    "Quote",
    "QuoteError",
    "QuoteFreshnessError",
    "QuoteParseError",
    "QuoteSignatureError",
    "QuoteTypeError",
    "QuoteVerification",
    "Signature",
    "decode_selection_list",
    "encode_selection_list",
    "looks_like",
    "pcr_digest",
    "verify_quote",
]

# --- TCG constants (Part 2, 6.2 TPM_GENERATED, 6.3 TPM_ALG_ID, 6.9 TPM_ST) -------------------

TPM_GENERATED_VALUE = 0xFF544347

TPM_ST_ATTEST_NV = 0x8014
TPM_ST_ATTEST_COMMAND_AUDIT = 0x8015
TPM_ST_ATTEST_SESSION_AUDIT = 0x8016
TPM_ST_ATTEST_CERTIFY = 0x8017
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ST_ATTEST_TIME = 0x8019
TPM_ST_ATTEST_CREATION = 0x801A
TPM_ST_ATTEST_NV_DIGEST = 0x801C

ATTEST_TYPES: Mapping[int, str] = {
    TPM_ST_ATTEST_NV: "nv",
    TPM_ST_ATTEST_COMMAND_AUDIT: "command-audit",
    TPM_ST_ATTEST_SESSION_AUDIT: "session-audit",
    TPM_ST_ATTEST_CERTIFY: "certify",
    TPM_ST_ATTEST_QUOTE: "quote",
    TPM_ST_ATTEST_TIME: "time",
    TPM_ST_ATTEST_CREATION: "creation",
    TPM_ST_ATTEST_NV_DIGEST: "nv-digest",
}

TPM_ALG_RSA = 0x0001
TPM_ALG_HMAC = 0x0005
TPM_ALG_MGF1 = 0x0007
TPM_ALG_KEYEDHASH = 0x0008
TPM_ALG_NULL = 0x0010
TPM_ALG_RSASSA = 0x0014
TPM_ALG_RSAES = 0x0015
TPM_ALG_RSAPSS = 0x0016
TPM_ALG_OAEP = 0x0017
TPM_ALG_ECDSA = 0x0018
TPM_ALG_ECDH = 0x0019
TPM_ALG_ECDAA = 0x001A
TPM_ALG_SM2 = 0x001B
TPM_ALG_ECSCHNORR = 0x001C
TPM_ALG_ECMQV = 0x001D
TPM_ALG_KDF1_SP800_56A = 0x0020
TPM_ALG_KDF2 = 0x0021
TPM_ALG_KDF1_SP800_108 = 0x0022
TPM_ALG_ECC = 0x0023
TPM_ALG_SYMCIPHER = 0x0025

SIGNATURE_SCHEMES: Mapping[int, str] = {
    TPM_ALG_RSASSA: "rsassa",
    TPM_ALG_RSAPSS: "rsapss",
    TPM_ALG_ECDSA: "ecdsa",
    TPM_ALG_ECDAA: "ecdaa",
    TPM_ALG_SM2: "sm2",
    TPM_ALG_ECSCHNORR: "ecschnorr",
}
_RSA_SIG = frozenset({TPM_ALG_RSASSA, TPM_ALG_RSAPSS})
_ECC_SIG = frozenset({TPM_ALG_ECDSA, TPM_ALG_ECDAA, TPM_ALG_SM2, TPM_ALG_ECSCHNORR})

# TPM_ECC_CURVE (6.4) -> (name, coordinate size, cryptography curve class)
_CURVES: Mapping[int, tuple[str, int, type[ec.EllipticCurve] | None]] = {
    0x0001: ("nist-p192", 24, ec.SECP192R1),
    0x0002: ("nist-p224", 28, ec.SECP224R1),
    0x0003: ("nist-p256", 32, ec.SECP256R1),
    0x0004: ("nist-p384", 48, ec.SECP384R1),
    0x0005: ("nist-p521", 66, ec.SECP521R1),
    0x0010: ("bn-p256", 32, None),
    0x0011: ("bn-p638", 80, None),
    0x0020: ("sm2-p256", 32, None),
}
_CURVE_BY_CRYPTOGRAPHY_NAME = {"secp256r1": 0x0003, "secp384r1": 0x0004, "secp521r1": 0x0005}

# TPMA_OBJECT bits (8.3)
TPMA_FIXEDTPM = 0x00000002
TPMA_FIXEDPARENT = 0x00000010
TPMA_SENSITIVEDATAORIGIN = 0x00000020
TPMA_USERWITHAUTH = 0x00000040
TPMA_RESTRICTED = 0x00010000
TPMA_DECRYPT = 0x00020000
TPMA_SIGN_ENCRYPT = 0x00040000

#: objectAttributes of an attestation key: a restricted signing key that never leaves the TPM.
AK_ATTRIBUTES = (
    TPMA_FIXEDTPM
    | TPMA_FIXEDPARENT
    | TPMA_SENSITIVEDATAORIGIN
    | TPMA_USERWITHAUTH
    | TPMA_RESTRICTED
    | TPMA_SIGN_ENCRYPT
)

#: Bounds from Part 2: HASH_COUNT banks in a TPML_PCR_SELECTION, a TPM2B_DIGEST of at
#: most sizeof(TPMU_HA) = 64 bytes, a TPML_DIGEST of at most 8 digests.
MAX_PCR_BANKS = 16
MAX_DIGEST_SIZE = 64
MAX_DIGESTS_PER_LIST = 8

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_CLOCK_INFO = struct.Struct(">QIIB")
_HEADER = struct.Struct(">IH")


# --- errors ------------------------------------------------------------------------------------


class QuoteError(CimaError):
    """A TPM quote failed one of the numbered steps of :func:`verify_quote`."""

    step: ClassVar[int] = 0
    step_name: ClassVar[str] = ""


class QuoteParseError(ParseError, QuoteError):
    """Step (1): the attest or signature bytes do not decode."""

    step = 1
    step_name = "parse"


class QuoteTypeError(UnsupportedFormatError, QuoteParseError):
    """Step (1): a well-formed TPMS_ATTEST of another type (certify, time, ...) than a quote."""


class QuoteSignatureError(SignatureError, QuoteError):
    """Step (2): the signature does not verify with the attestation key."""

    step = 2
    step_name = "signature"


class QuoteFreshnessError(FreshnessError, QuoteError):
    """Step (3): extraData does not bind the expected nonce, user data or qualifying data."""

    step = 3
    step_name = "freshness"


class PCRDigestError(ReplayMismatchError, QuoteError):
    """Step (4): the claimed PCR values do not produce the quoted pcrDigest, or one is missing."""

    step = 4
    step_name = "pcr-digest"


def _step(cls: type[QuoteError], detail: str) -> str:
    return f"quote verification step ({cls.step}) {cls.step_name}: {detail}"


# --- reading -----------------------------------------------------------------------------------


class _Reader:
    """Big-endian cursor over bytes; every read checks the bytes left first."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def left(self) -> int:
        return len(self.data) - self.pos

    def need(self, n: int, what: str) -> None:
        if n > len(self.data) - self.pos:
            raise TruncatedError(
                f"{what}: needs {n} bytes, {len(self.data) - self.pos} left", offset=self.pos
            )

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        start = self.pos
        self.pos = start + n
        return self.data[start : self.pos]

    def u8(self, what: str) -> int:
        self.need(1, what)
        v = self.data[self.pos]
        self.pos += 1
        return v

    def u16(self, what: str) -> int:
        self.need(2, what)
        (v,) = _U16.unpack_from(self.data, self.pos)
        self.pos += 2
        return int(v)

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(v)

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.data, self.pos)
        self.pos += 8
        return int(v)

    def tpm2b(self, what: str, max_size: int | None = None) -> bytes:
        at = self.pos
        size = self.u16(f"{what} size")
        if max_size is not None and size > max_size:
            raise ParseError(f"{what} is {size} bytes, at most {max_size} allowed", offset=at)
        return self.take(size, what)

    def end(self, what: str) -> None:
        if self.pos != len(self.data):
            raise ParseError(
                f"{len(self.data) - self.pos} unexpected bytes after {what}", offset=self.pos
            )


def _tpm2b(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError(f"a TPM2B holds at most 65535 bytes, got {len(data)}")
    return _U16.pack(len(data)) + data


def _alg_name(alg_id: int) -> str:
    """Name of a hash TPM_ALG_ID, or ``0xNNNN`` when cima does not know it."""
    return by_id(alg_id).name if is_known_id(alg_id) else f"0x{alg_id:04x}"


# --- PCR selection -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PCRSelection:
    """One bank of a TPML_PCR_SELECTION: a hash algorithm and a bitmap of PCR indices.

    ``select`` is the pcrSelect octets as encoded (``sizeofSelect`` of them);
    bit ``i % 8`` of octet ``i // 8`` selects PCR ``i``.
    """

    hash_alg: int
    select: bytes

    @classmethod
    def of(cls, algorithm: str, registers: Iterable[str | int], size: int = 3) -> PCRSelection:
        """A selection of ``registers`` (``pcrN`` names or indices) in bank ``algorithm``."""
        bitmap = bytearray(size)
        for reg in registers:
            index = reg if isinstance(reg, int) else pcr_index(reg)
            if not 0 <= index < size * 8:
                raise RegisterError(f"PCR index {index} does not fit a {size}-octet selection")
            bitmap[index // 8] |= 1 << (index % 8)
        return cls(by_name(algorithm).alg_id, bytes(bitmap))

    @property
    def algorithm(self) -> str:
        """The bank's hash name (``sha256``), or ``0xNNNN`` for an algorithm cima does not know."""
        return _alg_name(self.hash_alg)

    @property
    def indices(self) -> tuple[int, ...]:
        """Selected PCR indices, ascending."""
        return tuple(i for i in range(len(self.select) * 8) if self.select[i // 8] & (1 << (i % 8)))

    @property
    def registers(self) -> tuple[str, ...]:
        """Selected PCRs as register names (raises RegisterError for an index beyond pcr23)."""
        return tuple(pcr_name(i) for i in self.indices)

    def to_bytes(self) -> bytes:
        """TPMS_PCR_SELECTION: hash, sizeofSelect, pcrSelect."""
        return _U16.pack(self.hash_alg) + _U8.pack(len(self.select)) + self.select


def _read_selection_list(r: _Reader) -> tuple[PCRSelection, ...]:
    at = r.pos
    count = r.u32("TPML_PCR_SELECTION count")
    if count > MAX_PCR_BANKS:
        raise ParseError(
            f"TPML_PCR_SELECTION count {count} exceeds the {MAX_PCR_BANKS} banks a TPM can have",
            offset=at,
        )
    r.need(3 * count, "TPML_PCR_SELECTION entries")
    out: list[PCRSelection] = []
    for _ in range(count):
        hash_alg = r.u16("TPMS_PCR_SELECTION hash")
        size = r.u8("TPMS_PCR_SELECTION sizeofSelect")
        out.append(PCRSelection(hash_alg, r.take(size, "TPMS_PCR_SELECTION pcrSelect")))
    return tuple(out)


def _selection_list_bytes(selections: Sequence[PCRSelection]) -> bytes:
    return _U32.pack(len(selections)) + b"".join(s.to_bytes() for s in selections)


def decode_selection_list(data: bytes) -> tuple[PCRSelection, ...]:
    """Decode a TPML_PCR_SELECTION that fills ``data`` exactly."""
    r = _Reader(bytes(data))
    out = _read_selection_list(r)
    r.end("TPML_PCR_SELECTION")
    return out


def encode_selection_list(selections: Sequence[PCRSelection]) -> bytes:
    """Encode a TPML_PCR_SELECTION."""
    if len(selections) > MAX_PCR_BANKS:
        raise ValueError(f"a TPML_PCR_SELECTION holds at most {MAX_PCR_BANKS} banks")
    return _selection_list_bytes(selections)


def _selection_dict(selections: Sequence[PCRSelection]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for sel in selections:
        out.setdefault(sel.algorithm, []).extend(sel.indices)
    return out


# --- TPMS_ATTEST -------------------------------------------------------------------------------


def looks_like(data: bytes) -> bool:
    """True if ``data`` starts like a TPMS_ATTEST (TPM_GENERATED_VALUE and a known type)."""
    if len(data) < _HEADER.size:
        return False
    magic, st = _HEADER.unpack_from(data, 0)
    return bool(magic == TPM_GENERATED_VALUE and st in ATTEST_TYPES)


@dataclass(frozen=True, slots=True)
class Quote:
    """A decoded TPMS_ATTEST. ``raw`` is the bytes as received: the signature covers those.

    For an attestation of another type than a quote (certify, time, ...) the common
    part is decoded, ``attested`` holds the undecoded TPMU_ATTEST, and the PCR
    fields are empty; :func:`verify_quote` rejects it.
    """

    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_selection: tuple[PCRSelection, ...]
    pcr_digest: bytes
    attested: bytes = field(repr=False)
    raw: bytes = field(repr=False)
    magic: int = TPM_GENERATED_VALUE

    @classmethod
    def from_bytes(cls, data: bytes) -> Quote:
        """Decode a TPMS_ATTEST; a quote must end exactly after its pcrDigest."""
        data = bytes(data)
        r = _Reader(data)
        magic = r.u32("TPMS_ATTEST magic")
        if magic != TPM_GENERATED_VALUE:
            raise ParseError(
                f"magic 0x{magic:08x} is not TPM_GENERATED_VALUE (0xff544347): "
                "not a TPM-generated attestation",
                offset=0,
            )
        st = r.u16("TPMS_ATTEST type")
        if st not in ATTEST_TYPES:
            raise UnsupportedFormatError(f"unknown attestation type 0x{st:04x}", offset=4)
        signer = r.tpm2b("qualifiedSigner")
        extra = r.tpm2b("extraData")
        r.need(_CLOCK_INFO.size, "clockInfo")
        clock, reset, restart, safe = _CLOCK_INFO.unpack_from(data, r.pos)
        if safe > 1:
            raise ParseError(f"clockInfo.safe is {safe}, must be 0 or 1", offset=r.pos + 16)
        r.pos += _CLOCK_INFO.size
        firmware = r.u64("firmwareVersion")
        attested_at = r.pos
        selection: tuple[PCRSelection, ...] = ()
        digest = b""
        if st == TPM_ST_ATTEST_QUOTE:
            selection = _read_selection_list(r)
            digest = r.tpm2b("pcrDigest", MAX_DIGEST_SIZE)
            r.end("TPMS_QUOTE_INFO")
        else:
            r.pos = len(data)
        return cls(
            type=st,
            qualified_signer=signer,
            extra_data=extra,
            clock=clock,
            reset_count=reset,
            restart_count=restart,
            safe=bool(safe),
            firmware_version=firmware,
            pcr_selection=selection,
            pcr_digest=digest,
            attested=data[attested_at:],
            raw=data,
            magic=magic,
        )

    @classmethod
    def new(
        cls,
        *,
        extra_data: bytes,
        pcr_selection: Sequence[PCRSelection],
        pcr_digest: bytes,
        qualified_signer: bytes = b"",
        clock: int = 0,
        reset_count: int = 0,
        restart_count: int = 0,
        safe: bool = True,
        firmware_version: int = 0,
    ) -> Quote:
        """A quote built from its fields (what a software platform signs)."""
        attested = _selection_list_bytes(pcr_selection) + _tpm2b(pcr_digest)
        raw = (
            _HEADER.pack(TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE)
            + _tpm2b(qualified_signer)
            + _tpm2b(extra_data)
            + _CLOCK_INFO.pack(clock, reset_count, restart_count, int(safe))
            + _U64.pack(firmware_version)
            + attested
        )
        return cls.from_bytes(raw)

    def to_bytes(self) -> bytes:
        """Encode the fields again; for a decoded quote this equals :attr:`raw`."""
        attested = (
            _selection_list_bytes(self.pcr_selection) + _tpm2b(self.pcr_digest)
            if self.type == TPM_ST_ATTEST_QUOTE
            else self.attested
        )
        return (
            _HEADER.pack(self.magic, self.type)
            + _tpm2b(self.qualified_signer)
            + _tpm2b(self.extra_data)
            + _CLOCK_INFO.pack(self.clock, self.reset_count, self.restart_count, int(self.safe))
            + _U64.pack(self.firmware_version)
            + attested
        )

    @property
    def is_quote(self) -> bool:
        return self.type == TPM_ST_ATTEST_QUOTE

    @property
    def type_name(self) -> str:
        return ATTEST_TYPES.get(self.type, f"0x{self.type:04x}")

    def selected(self) -> list[tuple[str, str]]:
        """The quoted (register, bank) pairs, in pcrDigest order."""
        return [(reg, sel.algorithm) for sel in self.pcr_selection for reg in sel.registers]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "magic": f"{self.magic:08x}",
            "type": self.type_name,
            "type_id": f"0x{self.type:04x}",
            "qualified_signer": self.qualified_signer.hex(),
            "extra_data": self.extra_data.hex(),
            "clock": self.clock,
            "reset_count": self.reset_count,
            "restart_count": self.restart_count,
            "safe": self.safe,
            "firmware_version": f"{self.firmware_version:016x}",
        }
        if self.is_quote:
            out["pcr_selection"] = _selection_dict(self.pcr_selection)
            out["pcr_digest"] = self.pcr_digest.hex()
        else:
            out["attested"] = self.attested.hex()
        return out


# --- TPMT_SIGNATURE ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signature:
    """A TPMT_SIGNATURE. RSA schemes carry ``value``; ECC schemes carry ``r`` and ``s``."""

    sig_alg: int
    hash_alg: int
    value: bytes = b""
    r: bytes = b""
    s: bytes = b""

    @classmethod
    def rsassa(cls, algorithm: str, value: bytes) -> Signature:
        return cls(TPM_ALG_RSASSA, by_name(algorithm).alg_id, value=value)

    @classmethod
    def rsapss(cls, algorithm: str, value: bytes) -> Signature:
        return cls(TPM_ALG_RSAPSS, by_name(algorithm).alg_id, value=value)

    @classmethod
    def ecdsa(cls, algorithm: str, r: bytes, s: bytes) -> Signature:
        return cls(TPM_ALG_ECDSA, by_name(algorithm).alg_id, r=r, s=s)

    @classmethod
    def ecdsa_from_der(cls, algorithm: str, der: bytes, coordinate_size: int) -> Signature:
        """From an X9.62 DER ECDSA signature, r and s as fixed-size big-endian octets."""
        r, s = decode_dss_signature(der)
        return cls.ecdsa(
            algorithm,
            r.to_bytes(coordinate_size, "big"),
            s.to_bytes(coordinate_size, "big"),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Signature:
        """Decode a TPMT_SIGNATURE that fills ``data`` exactly."""
        data = bytes(data)
        sig, end = cls.unmarshal(data)
        if end != len(data):
            raise ParseError(f"{len(data) - end} unexpected bytes after TPMT_SIGNATURE", offset=end)
        return sig

    @classmethod
    def unmarshal(cls, data: bytes, offset: int = 0) -> tuple[Signature, int]:
        """Decode a TPMT_SIGNATURE at ``offset``; return it and the offset after it."""
        r = _Reader(bytes(data), offset)
        sig_alg = r.u16("TPMT_SIGNATURE sigAlg")
        if sig_alg in _RSA_SIG:
            hash_alg = r.u16("signature hash")
            value = r.tpm2b("RSA signature")
            return cls(sig_alg, hash_alg, value=value), r.pos
        if sig_alg in _ECC_SIG:
            hash_alg = r.u16("signature hash")
            sig_r = r.tpm2b("ECC signature r")
            sig_s = r.tpm2b("ECC signature s")
            return cls(sig_alg, hash_alg, r=sig_r, s=sig_s), r.pos
        raise UnsupportedFormatError(
            f"signature algorithm 0x{sig_alg:04x} is not an RSA or ECC signature scheme",
            offset=offset,
        )

    def to_bytes(self) -> bytes:
        head = _U16.pack(self.sig_alg) + _U16.pack(self.hash_alg)
        if self.sig_alg in _RSA_SIG:
            return head + _tpm2b(self.value)
        if self.sig_alg in _ECC_SIG:
            return head + _tpm2b(self.r) + _tpm2b(self.s)
        raise ValueError(f"cannot encode signature algorithm 0x{self.sig_alg:04x}")

    @property
    def scheme(self) -> str:
        return SIGNATURE_SCHEMES.get(self.sig_alg, f"0x{self.sig_alg:04x}")

    @property
    def algorithm(self) -> str:
        """The hash algorithm's name (``0xNNNN`` if unknown)."""
        return _alg_name(self.hash_alg)

    def to_der(self) -> bytes:
        """An ECC signature as X9.62 DER (what ``cryptography`` verifies)."""
        if self.sig_alg not in _ECC_SIG:
            raise ValueError(f"{self.scheme} is not an ECC signature")
        return encode_dss_signature(int.from_bytes(self.r, "big"), int.from_bytes(self.s, "big"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sig_alg": self.scheme, "hash": self.algorithm}
        if self.sig_alg in _RSA_SIG:
            out["signature"] = self.value.hex()
        else:
            out["r"] = self.r.hex()
            out["s"] = self.s.hex()
        return out


# --- TPMT_PUBLIC -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublicArea:
    """A TPMT_PUBLIC of an RSA or ECC key, decoded. ``raw`` is the TPMT_PUBLIC as received.

    ``symmetric`` is (algorithm, keyBits, mode) of TPMT_SYM_DEF_OBJECT, ``scheme`` and
    ``scheme_hash`` the signing/encryption scheme (``scheme_count`` for ECDAA),
    ``exponent`` the RSA exponent field as stored (0 means 65537), ``unique`` the
    RSA modulus or the ECC point as (x, y).
    """

    type: int
    name_alg: int
    object_attributes: int
    auth_policy: bytes
    symmetric: tuple[int, int, int]
    scheme: int
    scheme_hash: int
    scheme_count: int
    key_bits: int
    exponent: int
    curve: int
    kdf: int
    kdf_hash: int
    unique: tuple[bytes, ...]
    raw: bytes = field(repr=False)

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicArea:
        """Decode a TPM2B_PUBLIC (size-prefixed TPMT_PUBLIC) that fills ``data`` exactly."""
        data = bytes(data)
        r = _Reader(data)
        inner = r.tpm2b("TPM2B_PUBLIC")
        r.end("TPM2B_PUBLIC")
        try:
            return cls.from_tpmt_bytes(inner)
        except ParseError as e:
            raise type(e)(e.reason, offset=None if e.offset is None else e.offset + 2) from None

    @classmethod
    def from_tpmt_bytes(cls, data: bytes) -> PublicArea:
        """Decode a TPMT_PUBLIC that fills ``data`` exactly."""
        data = bytes(data)
        r = _Reader(data)
        key_type = r.u16("TPMT_PUBLIC type")
        if key_type not in (TPM_ALG_RSA, TPM_ALG_ECC):
            raise UnsupportedFormatError(
                f"public area of type 0x{key_type:04x}: only RSA and ECC keys are handled",
                offset=0,
            )
        name_alg = r.u16("nameAlg")
        attributes = r.u32("objectAttributes")
        policy = r.tpm2b("authPolicy", MAX_DIGEST_SIZE)
        sym_alg = r.u16("symmetric algorithm")
        sym = (sym_alg, 0, 0)
        if sym_alg != TPM_ALG_NULL:
            sym = (sym_alg, r.u16("symmetric keyBits"), r.u16("symmetric mode"))
        at = r.pos
        scheme = r.u16("scheme")
        scheme_hash = scheme_count = 0
        key_bits = exponent = curve = 0
        kdf = kdf_hash = TPM_ALG_NULL
        if key_type == TPM_ALG_RSA:
            if scheme in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS, TPM_ALG_OAEP):
                scheme_hash = r.u16("scheme hash")
            elif scheme not in (TPM_ALG_NULL, TPM_ALG_RSAES):
                raise UnsupportedFormatError(f"RSA scheme 0x{scheme:04x}", offset=at)
            key_bits = r.u16("keyBits")
            exponent = r.u32("exponent")
            unique: tuple[bytes, ...] = (r.tpm2b("RSA modulus"),)
        else:
            if scheme in (
                TPM_ALG_ECDSA,
                TPM_ALG_ECDH,
                TPM_ALG_SM2,
                TPM_ALG_ECSCHNORR,
                TPM_ALG_ECMQV,
            ):
                scheme_hash = r.u16("scheme hash")
            elif scheme == TPM_ALG_ECDAA:
                scheme_hash = r.u16("scheme hash")
                scheme_count = r.u16("ECDAA count")
            elif scheme != TPM_ALG_NULL:
                raise UnsupportedFormatError(f"ECC scheme 0x{scheme:04x}", offset=at)
            curve = r.u16("curveID")
            at = r.pos
            kdf = r.u16("kdf scheme")
            if kdf in (
                TPM_ALG_MGF1,
                TPM_ALG_KDF1_SP800_56A,
                TPM_ALG_KDF2,
                TPM_ALG_KDF1_SP800_108,
            ):
                kdf_hash = r.u16("kdf hash")
            elif kdf != TPM_ALG_NULL:
                raise UnsupportedFormatError(f"KDF scheme 0x{kdf:04x}", offset=at)
            unique = (r.tpm2b("ECC point x"), r.tpm2b("ECC point y"))
        r.end("TPMT_PUBLIC")
        return cls(
            type=key_type,
            name_alg=name_alg,
            object_attributes=attributes,
            auth_policy=policy,
            symmetric=sym,
            scheme=scheme,
            scheme_hash=scheme_hash,
            scheme_count=scheme_count,
            key_bits=key_bits,
            exponent=exponent,
            curve=curve,
            kdf=kdf,
            kdf_hash=kdf_hash,
            unique=unique,
            raw=data,
        )

    @classmethod
    def from_public_key(
        cls,
        key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
        *,
        algorithm: str = "sha256",
        name_alg: str = "sha256",
        object_attributes: int = AK_ATTRIBUTES,
    ) -> PublicArea:
        """The public area of a restricted signing key (RSASSA or ECDSA with ``algorithm``)."""
        hash_id = by_name(algorithm).alg_id
        name_id = by_name(name_alg).alg_id
        head = _U16.pack(TPM_ALG_RSA if isinstance(key, rsa.RSAPublicKey) else TPM_ALG_ECC)
        head += _U16.pack(name_id) + _U32.pack(object_attributes) + _tpm2b(b"")
        head += _U16.pack(TPM_ALG_NULL)  # symmetric
        if isinstance(key, rsa.RSAPublicKey):
            numbers = key.public_numbers()
            exponent = 0 if numbers.e == 65537 else numbers.e
            body = _U16.pack(TPM_ALG_RSASSA) + _U16.pack(hash_id)
            body += _U16.pack(key.key_size) + _U32.pack(exponent)
            body += _tpm2b(numbers.n.to_bytes((key.key_size + 7) // 8, "big"))
        else:
            curve = _CURVE_BY_CRYPTOGRAPHY_NAME.get(key.curve.name)
            if curve is None:
                raise AlgorithmError(f"curve {key.curve.name} has no TPM curve ID here")
            size = _CURVES[curve][1]
            point = key.public_numbers()
            body = _U16.pack(TPM_ALG_ECDSA) + _U16.pack(hash_id)
            body += _U16.pack(curve) + _U16.pack(TPM_ALG_NULL)
            body += _tpm2b(point.x.to_bytes(size, "big")) + _tpm2b(point.y.to_bytes(size, "big"))
        return cls.from_tpmt_bytes(head + body)

    def to_tpmt_bytes(self) -> bytes:
        """Encode the TPMT_PUBLIC again; for a decoded area this equals :attr:`raw`."""
        out = _U16.pack(self.type) + _U16.pack(self.name_alg) + _U32.pack(self.object_attributes)
        out += _tpm2b(self.auth_policy) + _U16.pack(self.symmetric[0])
        if self.symmetric[0] != TPM_ALG_NULL:
            out += _U16.pack(self.symmetric[1]) + _U16.pack(self.symmetric[2])
        out += _U16.pack(self.scheme)
        if self.scheme != TPM_ALG_NULL and not (
            self.type == TPM_ALG_RSA and self.scheme == TPM_ALG_RSAES
        ):
            out += _U16.pack(self.scheme_hash)
            if self.scheme == TPM_ALG_ECDAA:
                out += _U16.pack(self.scheme_count)
        if self.type == TPM_ALG_RSA:
            out += _U16.pack(self.key_bits) + _U32.pack(self.exponent) + _tpm2b(self.unique[0])
        else:
            out += _U16.pack(self.curve) + _U16.pack(self.kdf)
            if self.kdf != TPM_ALG_NULL:
                out += _U16.pack(self.kdf_hash)
            out += _tpm2b(self.unique[0]) + _tpm2b(self.unique[1])
        return out

    def to_bytes(self) -> bytes:
        """TPM2B_PUBLIC: the TPMT_PUBLIC with its size."""
        return _tpm2b(self.to_tpmt_bytes())

    @property
    def key_type(self) -> str:
        return "rsa" if self.type == TPM_ALG_RSA else "ecc"

    @property
    def curve_name(self) -> str | None:
        if self.type != TPM_ALG_ECC:
            return None
        return _CURVES[self.curve][0] if self.curve in _CURVES else f"0x{self.curve:04x}"

    @property
    def is_restricted_signing_key(self) -> bool:
        mask = TPMA_RESTRICTED | TPMA_SIGN_ENCRYPT | TPMA_DECRYPT
        return self.object_attributes & mask == TPMA_RESTRICTED | TPMA_SIGN_ENCRYPT

    @property
    def name(self) -> bytes:
        """The TPM name: nameAlg || H_nameAlg(TPMT_PUBLIC as received)."""
        if not is_known_id(self.name_alg):
            raise UnsupportedFormatError(
                f"nameAlg 0x{self.name_alg:04x} is not a hash algorithm cima knows"
            )
        return _U16.pack(self.name_alg) + by_id(self.name_alg).hash(self.raw)

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        """The key as a ``cryptography`` public key."""
        return _public_key_of(self.raw)

    def to_pem(self) -> bytes:
        return self.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.key_type,
            "name_alg": _alg_name(self.name_alg),
            "object_attributes": f"0x{self.object_attributes:08x}",
            "scheme": SIGNATURE_SCHEMES.get(self.scheme, f"0x{self.scheme:04x}"),
            "scheme_hash": _alg_name(self.scheme_hash) if self.scheme_hash else None,
        }
        if self.type == TPM_ALG_RSA:
            out["key_bits"] = self.key_bits
            out["exponent"] = self.exponent or 65537
        else:
            out["curve"] = self.curve_name
        try:
            out["name"] = self.name.hex()
        except UnsupportedFormatError:
            out["name"] = None
        return out


@functools.lru_cache(maxsize=256)
def _public_key_of(tpmt_public: bytes) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    area = PublicArea.from_tpmt_bytes(tpmt_public)
    try:
        if area.type == TPM_ALG_RSA:
            modulus = int.from_bytes(area.unique[0], "big")
            if modulus == 0:
                raise ParseError("RSA public area has an empty modulus")
            return rsa.RSAPublicNumbers(area.exponent or 65537, modulus).public_key()
        info = _CURVES.get(area.curve)
        if info is None or info[2] is None:
            raise UnsupportedFormatError(f"ECC curve {area.curve_name} is not supported")
        x, y = area.unique
        size = info[1]
        if len(x) > size or len(y) > size:
            raise ParseError(f"ECC point coordinate longer than {size} bytes for {info[0]}")
        point = b"\x04" + x.rjust(size, b"\x00") + y.rjust(size, b"\x00")
        return ec.EllipticCurvePublicKey.from_encoded_point(info[2](), point)
    except (ValueError, UnsupportedAlgorithm) as e:
        if isinstance(e, ParseError):
            raise
        raise ParseError(f"public area does not hold a valid key: {e}") from e


# --- tpm2-tools PCR file -----------------------------------------------------------------------

# Little-endian C layouts as tpm2-tools writes them (tss2_tpm2_types.h: TPM2_NUM_PCR_BANKS 16,
# TPM2_PCR_SELECT_MAX 4, sizeof(TPMU_HA) 64, TPML_DIGEST holds 8).
_TOOLS_SELECT_MAX = 4
_TOOLS_SELECTION = struct.Struct("<HB4sx")  # TPMS_PCR_SELECTION, padded to 8
_TOOLS_SELECTION_LIST_SIZE = 4 + MAX_PCR_BANKS * _TOOLS_SELECTION.size  # 132
_TOOLS_DIGEST = struct.Struct("<H64s")  # TPM2B_DIGEST, 66
_TOOLS_DIGEST_LIST_SIZE = 4 + MAX_DIGESTS_PER_LIST * _TOOLS_DIGEST.size  # 532
#: tpm2-tools' tpm2_pcrs holds at most TPM2_MAX_PCRS (32) TPML_DIGEST.
_TOOLS_MAX_LISTS = 32
_LE32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class PCRValues:
    """PCR values with their selection, as in tpm2-tools' PCR file (``tpm2_quote -o``).

    ``digests`` follow the selection: bank by bank, ascending PCR index within a bank,
    the order pcrDigest is computed in.
    """

    selections: tuple[PCRSelection, ...]
    digests: tuple[bytes, ...]

    @classmethod
    def from_values(
        cls,
        selections: Sequence[PCRSelection],
        values: Mapping[tuple[str, str], bytes] | RegisterBank,
    ) -> PCRValues:
        """Pick the selected registers' values out of ``values`` (a missing one is an error)."""
        digests = _ValueLookup(values).selected(selections, PCRDigestError)
        return cls(tuple(selections), tuple(digests))

    @classmethod
    def from_bytes(cls, data: bytes) -> PCRValues:
        """Decode tpm2-tools' "serialized" PCR file."""
        data = bytes(data)
        if len(data) < _TOOLS_SELECTION_LIST_SIZE + 4:
            raise TruncatedError(
                f"tpm2-tools PCR file is {len(data)} bytes, at least "
                f"{_TOOLS_SELECTION_LIST_SIZE + 4} expected",
                offset=len(data),
            )
        (count,) = _LE32.unpack_from(data, 0)
        if count > MAX_PCR_BANKS:
            raise ParseError(f"PCR selection count {count} exceeds {MAX_PCR_BANKS}", offset=0)
        selections: list[PCRSelection] = []
        sizes: list[int] = []
        for i in range(count):
            at = 4 + i * _TOOLS_SELECTION.size
            hash_alg, size, bitmap = _TOOLS_SELECTION.unpack_from(data, at)
            if size > _TOOLS_SELECT_MAX:
                raise ParseError(f"sizeofSelect {size} exceeds {_TOOLS_SELECT_MAX}", offset=at + 2)
            if not is_known_id(hash_alg):
                raise UnsupportedFormatError(
                    f"PCR bank with unknown hash algorithm 0x{hash_alg:04x}", offset=at
                )
            sel = PCRSelection(hash_alg, bitmap[:size])
            if sel.indices and sel.indices[-1] >= PCR_COUNT:
                raise ParseError(f"PCR index {sel.indices[-1]} beyond pcr23", offset=at + 3)
            selections.append(sel)
            sizes.extend([by_id(hash_alg).digest_size] * len(sel.indices))
        at = _TOOLS_SELECTION_LIST_SIZE
        (lists,) = _LE32.unpack_from(data, at)
        if lists > _TOOLS_MAX_LISTS:
            raise ParseError(
                f"TPML_DIGEST count {lists} exceeds tpm2-tools' {_TOOLS_MAX_LISTS}", offset=at
            )
        expected = at + 4 + lists * _TOOLS_DIGEST_LIST_SIZE
        if len(data) != expected:
            cls_err = TruncatedError if len(data) < expected else ParseError
            raise cls_err(
                f"tpm2-tools PCR file with {lists} digest lists is {expected} bytes, "
                f"got {len(data)}",
                offset=min(len(data), expected),
            )
        digests: list[bytes] = []
        for j in range(lists):
            at = _TOOLS_SELECTION_LIST_SIZE + 4 + j * _TOOLS_DIGEST_LIST_SIZE
            (n,) = _LE32.unpack_from(data, at)
            if n > MAX_DIGESTS_PER_LIST:
                raise ParseError(f"TPML_DIGEST count {n} exceeds {MAX_DIGESTS_PER_LIST}", offset=at)
            for k in range(n):
                d_at = at + 4 + k * _TOOLS_DIGEST.size
                size, buf = _TOOLS_DIGEST.unpack_from(data, d_at)
                index = len(digests)
                if index >= len(sizes):
                    raise ParseError(
                        f"more digests than the {len(sizes)} selected PCRs", offset=d_at
                    )
                if size != sizes[index]:
                    raise ParseError(
                        f"digest {index} is {size} bytes, its bank needs {sizes[index]}",
                        offset=d_at,
                    )
                digests.append(buf[:size])
        if len(digests) != len(sizes):
            raise ParseError(
                f"{len(digests)} digests for {len(sizes)} selected PCRs", offset=len(data)
            )
        return cls(tuple(selections), tuple(digests))

    def to_bytes(self) -> bytes:
        """Encode as tpm2-tools' "serialized" PCR file (what ``tpm2_checkquote -f`` reads)."""
        if len(self.selections) > MAX_PCR_BANKS:
            raise ValueError(f"at most {MAX_PCR_BANKS} banks fit a tpm2-tools PCR file")
        out = bytearray(_LE32.pack(len(self.selections)))
        for sel in self.selections:
            if len(sel.select) > _TOOLS_SELECT_MAX:
                raise ValueError(f"sizeofSelect {len(sel.select)} exceeds {_TOOLS_SELECT_MAX}")
            out += _TOOLS_SELECTION.pack(sel.hash_alg, len(sel.select), sel.select)
        out += bytes(_TOOLS_SELECTION_LIST_SIZE - len(out))
        chunks = [
            self.digests[i : i + MAX_DIGESTS_PER_LIST]
            for i in range(0, len(self.digests), MAX_DIGESTS_PER_LIST)
        ]
        if len(chunks) > _TOOLS_MAX_LISTS:
            raise ValueError("too many digests for a tpm2-tools PCR file")
        out += _LE32.pack(len(chunks))
        for chunk in chunks:
            block = bytearray(_LE32.pack(len(chunk)))
            for d in chunk:
                if len(d) > MAX_DIGEST_SIZE:
                    raise ValueError(f"a digest of {len(d)} bytes does not fit TPM2B_DIGEST")
                block += _TOOLS_DIGEST.pack(len(d), d)
            block += bytes(_TOOLS_DIGEST_LIST_SIZE - len(block))
            out += block
        return bytes(out)

    def items(self) -> list[RegisterValue]:
        """Each value with its register and bank, in selection order."""
        pairs = [(reg, sel.algorithm) for sel in self.selections for reg in sel.registers]
        if len(pairs) != len(self.digests):
            raise ValueError(f"{len(self.digests)} digests for {len(pairs)} selected PCRs")
        return [
            RegisterValue(reg, alg, d) for (reg, alg), d in zip(pairs, self.digests, strict=True)
        ]

    def to_bank(self) -> RegisterBank:
        return RegisterBank.from_values(self.items())

    def to_dict(self) -> dict[str, dict[str, str]]:
        """``{"sha256": {"0": "<hex>", ...}}``, the layout of the vectors' manifests."""
        out: dict[str, dict[str, str]] = {}
        for v in self.items():
            out.setdefault(v.algorithm, {})[str(pcr_index(v.register))] = v.digest.hex()
        return out


# --- verification ------------------------------------------------------------------------------


class _ValueLookup:
    """PCR values by (register, bank), from a mapping or a RegisterBank; no default zeros."""

    __slots__ = ("_bank", "_map")

    def __init__(self, values: Mapping[tuple[str, str], bytes] | RegisterBank) -> None:
        self._bank: RegisterBank | None = None
        self._map: dict[tuple[str, str], bytes] = {}
        if isinstance(values, RegisterBank):
            self._bank = values
            return
        for (reg, alg), value in values.items():
            self._map[(reg, by_name(alg).name)] = bytes(value)

    def selected(self, selections: Sequence[PCRSelection], error: type[CimaError]) -> list[bytes]:
        """The value of every selected register, in selection order."""
        out: list[bytes] = []
        bank = self._bank
        for sel in selections:
            if not is_known_id(sel.hash_alg):
                raise error(f"the quote selects bank {sel.algorithm}, which cima does not know")
            alg = by_id(sel.hash_alg)
            name, size = alg.name, alg.digest_size
            for register in _selection_registers(sel, error):
                value: bytes | None
                if bank is not None:
                    value = bank.get(register, name) if (register, name) in bank else None
                else:
                    value = self._map.get((register, name))
                if value is None:
                    raise error(f"{register}/{name} is selected by the quote but no value is given")
                if len(value) != size:
                    raise error(f"{register}/{name} value is {len(value)} bytes, expected {size}")
                out.append(value)
        return out


def _selection_registers(sel: PCRSelection, error: type[CimaError]) -> tuple[str, ...]:
    try:
        return sel.registers
    except RegisterError as e:
        raise error(f"bank {sel.algorithm}: {e}") from e


def pcr_digest(
    selections: Sequence[PCRSelection],
    values: Mapping[tuple[str, str], bytes] | RegisterBank,
    algorithm: str,
) -> bytes:
    """H_algorithm of the selected PCR values concatenated in selection order.

    This is the quote's pcrDigest (Part 3, TPM2_Quote): ``algorithm`` is the hash of
    the signing scheme. A selected register without a value raises :class:`PCRDigestError`.
    """
    h = by_name(algorithm).new()
    for value in _ValueLookup(values).selected(selections, PCRDigestError):
        h.update(value)
    return bytes(h.digest())


@dataclass(frozen=True, slots=True)
class QuoteVerification:
    """What :func:`verify_quote` established.

    ``freshness`` is ``"qualifying-data"`` (extraData equals the given bytes),
    ``"nonce"`` (extraData = H(nonce || user_data)) or ``"skipped"``; ``pcrs`` the
    values the pcrDigest was checked against, empty when none were given.
    """

    quote: Quote
    signature: Signature
    hash_algorithm: str
    freshness: str
    pcrs: tuple[RegisterValue, ...]

    @property
    def pcrs_checked(self) -> bool:
        return bool(self.pcrs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quote": self.quote.to_dict(),
            "signature": self.signature.to_dict(),
            "hash_algorithm": self.hash_algorithm,
            "freshness": self.freshness,
            "pcrs": [v.to_dict() for v in self.pcrs],
        }


PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@functools.lru_cache(maxsize=256)
def _load_key_bytes(data: bytes) -> PublicKey:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise QuoteSignatureError(
            _step(QuoteSignatureError, f"the attestation key does not load: {e}")
        ) from e
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise QuoteSignatureError(
            _step(QuoteSignatureError, f"the attestation key is a {type(key).__name__}")
        )
    return key


def _load_ak(ak: PublicKey | PublicArea | bytes | str) -> PublicKey:
    if isinstance(ak, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return ak
    if isinstance(ak, PublicArea):
        try:
            return ak.public_key()
        except ParseError as e:
            raise QuoteSignatureError(
                _step(QuoteSignatureError, f"the attestation key's public area: {e}")
            ) from e
    if isinstance(ak, str):
        ak = ak.encode()
    return _load_key_bytes(bytes(ak))


_HASHES: Mapping[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
    "sm3_256": hashes.SM3,
}


def _check_signature(message: bytes, sig: Signature, key: PublicKey) -> HashAlgorithm:
    if not is_known_id(sig.hash_alg) or by_id(sig.hash_alg).name not in _HASHES:
        raise QuoteSignatureError(
            _step(QuoteSignatureError, f"unsupported signature hash {sig.algorithm}")
        )
    alg = by_id(sig.hash_alg)
    hash_obj = _HASHES[alg.name]()
    try:
        if sig.sig_alg in _RSA_SIG:
            if not isinstance(key, rsa.RSAPublicKey):
                raise QuoteSignatureError(
                    _step(QuoteSignatureError, f"{sig.scheme} signature but the AK is not RSA")
                )
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if sig.sig_alg == TPM_ALG_RSASSA
                else padding.PSS(mgf=padding.MGF1(hash_obj), salt_length=padding.PSS.AUTO)
            )
            key.verify(sig.value, message, pad, hash_obj)
        elif sig.sig_alg == TPM_ALG_ECDSA:
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise QuoteSignatureError(
                    _step(QuoteSignatureError, "ECDSA signature but the AK is not an EC key")
                )
            key.verify(sig.to_der(), message, ec.ECDSA(hash_obj))
        else:
            raise QuoteSignatureError(
                _step(QuoteSignatureError, f"signature scheme {sig.scheme} is not supported")
            )
    except InvalidSignature:
        raise QuoteSignatureError(
            _step(
                QuoteSignatureError,
                f"{sig.scheme}/{alg.name} signature does not verify over the attest bytes "
                "with the attestation key",
            )
        ) from None
    except UnsupportedAlgorithm as e:
        raise QuoteSignatureError(_step(QuoteSignatureError, str(e))) from e
    return alg


def verify_quote(
    attest: bytes | Quote,
    signature: bytes | Signature,
    ak: PublicKey | PublicArea | bytes | str,
    *,
    pcr_values: Mapping[tuple[str, str], bytes] | RegisterBank | None = None,
    nonce: bytes | None = None,
    user_data: bytes | None = None,
    qualifying_data: bytes | None = None,
    skip_freshness: bool = False,
) -> QuoteVerification:
    """Verify a TPM quote; raise at the first step that fails.

    ``ak`` is the attestation key: a ``cryptography`` public key, PEM or DER
    SubjectPublicKeyInfo bytes, or a :class:`PublicArea`. Freshness is checked
    against ``qualifying_data`` (the raw extraData, as ``tpm2_checkquote -q``) or
    against ``nonce`` and ``user_data`` (extraData = H(nonce || user_data) with the
    signature's hash, DESIGN.md section 4); with neither, ``skip_freshness=True``
    must say so. ``pcr_values`` maps (``pcrN``, bank) to the claimed values.

    Steps:
    (1) parse the TPMS_ATTEST and the TPMT_SIGNATURE; the attestation must be a quote;
    (2) the signature verifies over the attest bytes as received, with the AK;
    (3) extraData equals the expected qualifying data;
    (4) pcrDigest equals H(selected PCR values in selection order), when values are given.
    """
    # (1) parse
    try:
        quote = attest if isinstance(attest, Quote) else Quote.from_bytes(attest)
        sig = signature if isinstance(signature, Signature) else Signature.from_bytes(signature)
    except ParseError as e:
        raise QuoteParseError(_step(QuoteParseError, e.reason), offset=e.offset) from e
    if not quote.is_quote:
        raise QuoteTypeError(
            _step(
                QuoteTypeError,
                f"attestation type {quote.type_name} (0x{quote.type:04x}) is not a quote",
            ),
            offset=4,
        )

    # (2) signature over the exact received bytes
    key = _load_ak(ak)
    alg = _check_signature(quote.raw, sig, key)

    # (3) freshness
    if qualifying_data is not None:
        if nonce is not None or user_data is not None:
            raise ValueError("give qualifying_data or nonce/user_data, not both")
        if not hmac.compare_digest(quote.extra_data, bytes(qualifying_data)):
            raise QuoteFreshnessError(
                _step(
                    QuoteFreshnessError,
                    f"extraData {quote.extra_data.hex()} is not the expected qualifying data "
                    f"{bytes(qualifying_data).hex()}",
                )
            )
        freshness = "qualifying-data"
    elif nonce is not None or user_data is not None:
        try:
            check_tpm_binding(quote.extra_data, nonce or b"", user_data or b"", alg.name)
        except (FreshnessError, AlgorithmError) as e:
            raise QuoteFreshnessError(_step(QuoteFreshnessError, str(e))) from e
        freshness = "nonce"
    elif skip_freshness:
        freshness = "skipped"
    else:
        raise QuoteFreshnessError(
            _step(
                QuoteFreshnessError,
                "no nonce or qualifying data to check extraData against "
                "(pass skip_freshness=True to accept a quote of unknown freshness)",
            )
        )

    # (4) PCR digest
    checked: tuple[RegisterValue, ...] = ()
    if pcr_values is not None:
        try:
            values = PCRValues.from_values(quote.pcr_selection, pcr_values)
        except PCRDigestError as e:
            raise PCRDigestError(_step(PCRDigestError, str(e))) from None
        h = alg.new()
        for d in values.digests:
            h.update(d)
        computed = bytes(h.digest())
        if not hmac.compare_digest(computed, quote.pcr_digest):
            raise PCRDigestError(
                _step(
                    PCRDigestError,
                    f"the given PCR values hash to {computed.hex()} ({alg.name}), "
                    f"the quote's pcrDigest is {quote.pcr_digest.hex()}",
                )
            )
        checked = tuple(values.items())

    return QuoteVerification(quote, sig, alg.name, freshness, checked)
