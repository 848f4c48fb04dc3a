"""Appended PKCS#7 signatures ("modsig") of kernel modules and kexec images, as IMA records them.

A signed kernel module (or kexec kernel or initramfs) ends with its signature
(``scripts/sign-file.c``; ``include/linux/module_signature.h``)::

    content || PKCS#7 DER || struct module_signature || "~Module signature appended~\\n"

    struct module_signature {   12 bytes
        u8      algo;           0
        u8      hash;           0
        u8      id_type;        2 (PKEY_ID_PKCS7)
        u8      signer_len;     0
        u8      key_id_len;     0
        u8      __pad[3];       0
        __be32  sig_len;        bytes of PKCS#7 DER before the struct
    };

IMA reads it with ``ima_read_modsig`` (``security/integrity/ima/ima_modsig.c``) and
``mod_check_sig`` (``kernel/module_signature.c``); :func:`split_appended_signature`
applies the same checks. An ``ima-modsig`` entry (``d-ng|n-ng|sig|d-modsig|modsig``)
then carries the raw PKCS#7 message in ``modsig`` and, in ``d-modsig``, the digest
of the content (the file without its appended signature) computed with the first
signer's digest algorithm (``ima_collect_modsig``, ``pkcs7_get_digest``).

The message is a CMS ContentInfo of type signedData whose content is detached
(no eContent; ``sign-file`` signs with ``CMS_DETACHED | CMS_NOCERTS``). The
parser (``crypto/asymmetric_keys/pkcs7_parser.c``) accepts SignedData version 1
with version 1 SignerInfos naming their signer by issuerAndSerialNumber, and
version 3 with version 3 SignerInfos naming it by subjectKeyIdentifier (``[0]``,
``sign-file -k``); authenticated attributes are present in every SignerInfo or in
none, each of contentType, signingTime and messageDigest at most once with one
value, and contentType and messageDigest both present when any is.

Verification follows ``pkcs7_verify`` and ``pkcs7_validate_trust``
(``pkcs7_verify.c``, ``pkcs7_trust.c``). For each SignerInfo the content is
digested with its digest algorithm; with authenticated attributes the
messageDigest attribute must equal that digest (a mismatch fails the whole
message, whoever signed) and the signature covers the digest of the attributes'
DER re-tagged from ``[0] IMPLICIT`` to ``SET OF`` (0x31); without them it covers
the content digest itself: RSA PKCS#1 v1.5 over a DigestInfo, or a DER
ECDSA-Sig-Value. A signer answers to a trusted key whose certificate has the same
issuer Name and serial number, or whose Subject Key Identifier is the signer's;
signers no trusted key answers to are skipped, a signer that answers to a trusted
key but does not verify fails the message, and one verified signer suffices.

Where this module parts from the kernel:

* None, by default, on authenticated attributes: the kernel's module-signature
  check (``VERIFYING_MODULE_SIGNATURE``) refuses a message that has them, before
  any trust decision (recent kernels waive that for ML-DSA only), and so does
  :func:`verify_modsig` unless told ``authenticated_attributes=True``; then such a
  signature is verified as a CMS signature over the content (its messageDigest
  binds the content).
* Only the signer's own key is looked for: certificates carried in the message,
  and chains from them to a trusted key, are not used (``sign-file`` never
  includes any).
* A bare public key (no certificate) answers to a subjectKeyIdentifier equal to
  the SHA-1 of its subjectPublicKey bits (RFC 5280, section 4.2.1.2, method 1: what
  ``openssl``'s ``subjectKeyIdentifier=hash`` writes), never to an issuer and
  serial number.
* The log holds one digest, made with the first signer's algorithm: a further
  signer using another digest algorithm cannot be checked; it counts as
  unsupported when a trusted key answers to it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from asn1crypto import cms, core, parser  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from cima.verifier.imasig import (  # _HASHES: the digests a signature is checked with
    _HASHES,
    IMASignatureError,
    IMASignatureParseError,
    IMASignatureUnsupportedError,
    KeyRing,
    TrustedKey,
    UnknownKeyError,
    _public_key_bits,
)

__all__ = [
    "MODULE_SIG_STRING",
    "PKEY_ID_PKCS7",
    "ModuleSignature",
    "modsig_digest",
    "split_appended_signature",
    "verify_modsig",
]

#: The marker that ends a file with an appended signature (``MODULE_SIG_STRING``).
MODULE_SIG_STRING: Final = b"~Module signature appended~\n"
#: ``struct module_signature``'s ``id_type`` of a PKCS#7 signature.
PKEY_ID_PKCS7: Final = 2

# algo, hash, id_type, signer_len, key_id_len, __pad[3], sig_len (big-endian)
_MODULE_SIGNATURE: Final = struct.Struct(">BBBBB3sI")

_OID_DATA: Final = "1.2.840.113549.1.7.1"
_OID_SIGNED_DATA: Final = "1.2.840.113549.1.7.2"
_OID_CONTENT_TYPE: Final = "1.2.840.113549.1.9.3"
_OID_MESSAGE_DIGEST: Final = "1.2.840.113549.1.9.4"
_OID_SIGNING_TIME: Final = "1.2.840.113549.1.9.5"
_OID_MGF1: Final = "1.2.840.113549.1.1.8"
#: Authenticated attributes the kernel allows once, with a single value.
_SINGLE_ATTRIBUTES: Final = {
    _OID_CONTENT_TYPE: "contentType",
    _OID_MESSAGE_DIGEST: "messageDigest",
    _OID_SIGNING_TIME: "signingTime",
}

#: Digest algorithms by OID, named as the kernel names them in IMA (``sha3_256`` style).
_DIGEST_BY_OID: Final[Mapping[str, str]] = {
    "1.2.840.113549.2.4": "md4",
    "1.2.840.113549.2.5": "md5",
    "1.3.14.3.2.26": "sha1",
    "2.16.840.1.101.3.4.2.4": "sha224",
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
    "2.16.840.1.101.3.4.2.8": "sha3_256",
    "2.16.840.1.101.3.4.2.9": "sha3_384",
    "2.16.840.1.101.3.4.2.10": "sha3_512",
    "1.2.156.10197.1.401": "sm3_256",
    "1.2.643.7.1.1.2.2": "streebog256",
    "1.2.643.7.1.1.2.3": "streebog512",
}


#: hashlib's names of the digests :func:`modsig_digest` computes.
_HASHLIB: Final[Mapping[str, str]] = {
    "md4": "md4",
    "md5": "md5",
    "sha1": "sha1",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "sha3_256": "sha3_256",
    "sha3_384": "sha3_384",
    "sha3_512": "sha3_512",
    "sm3_256": "sm3",
}

_RSA: Final = "rsa"
_RSA_PSS: Final = "rsa-pss"
_ECDSA: Final = "ecdsa"

#: Signature algorithms by OID: (kind, name); kind None for those not verified here.
_SIGNATURE_BY_OID: Final[Mapping[str, tuple[str | None, str]]] = {
    "1.2.840.113549.1.1.1": (_RSA, "rsaEncryption"),
    "1.2.840.113549.1.1.5": (_RSA, "sha1WithRSAEncryption"),
    "1.2.840.113549.1.1.14": (_RSA, "sha224WithRSAEncryption"),
    "1.2.840.113549.1.1.11": (_RSA, "sha256WithRSAEncryption"),
    "1.2.840.113549.1.1.12": (_RSA, "sha384WithRSAEncryption"),
    "1.2.840.113549.1.1.13": (_RSA, "sha512WithRSAEncryption"),
    "2.16.840.1.101.3.4.3.14": (_RSA, "id-rsassa-pkcs1-v1_5-with-sha3-256"),
    "2.16.840.1.101.3.4.3.15": (_RSA, "id-rsassa-pkcs1-v1_5-with-sha3-384"),
    "2.16.840.1.101.3.4.3.16": (_RSA, "id-rsassa-pkcs1-v1_5-with-sha3-512"),
    "1.2.840.113549.1.1.10": (_RSA_PSS, "RSASSA-PSS"),
    "1.2.840.10045.2.1": (_ECDSA, "id-ecPublicKey"),
    "1.2.840.10045.4.1": (_ECDSA, "ecdsa-with-SHA1"),
    "1.2.840.10045.4.3.1": (_ECDSA, "ecdsa-with-SHA224"),
    "1.2.840.10045.4.3.2": (_ECDSA, "ecdsa-with-SHA256"),
    "1.2.840.10045.4.3.3": (_ECDSA, "ecdsa-with-SHA384"),
    "1.2.840.10045.4.3.4": (_ECDSA, "ecdsa-with-SHA512"),
    "2.16.840.1.101.3.4.3.10": (_ECDSA, "ecdsa-with-SHA3-256"),
    "2.16.840.1.101.3.4.3.11": (_ECDSA, "ecdsa-with-SHA3-384"),
    "2.16.840.1.101.3.4.3.12": (_ECDSA, "ecdsa-with-SHA3-512"),
    "1.2.156.10197.1.501": (None, "SM2-with-SM3"),
    "1.2.643.7.1.1.1.1": (None, "GOST R 34.10-2012 (256 bits)"),
    "1.2.643.7.1.1.1.2": (None, "GOST R 34.10-2012 (512 bits)"),
    "2.16.840.1.101.3.4.3.17": (None, "ML-DSA-44"),
    "2.16.840.1.101.3.4.3.18": (None, "ML-DSA-65"),
    "2.16.840.1.101.3.4.3.19": (None, "ML-DSA-87"),
}

#: Short names of the attribute types an issuer Name is shown with (RFC 4514 and common use).
_NAME_KEYS: Final[Mapping[str, str]] = {
    "2.5.4.3": "CN",
    "2.5.4.5": "serialNumber",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.9": "STREET",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "0.9.2342.19200300.100.1.1": "UID",
    "0.9.2342.19200300.100.1.25": "DC",
    "1.2.840.113549.1.9.1": "emailAddress",
}

#: What asn1crypto raises, eagerly or lazily, on malformed input.
_ASN1_ERRORS: Final = (
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    OverflowError,
    RecursionError,
)

_MAX_SHOWN: Final = 200  # longest signer description


@dataclass(frozen=True, slots=True)
class _Signer:
    """What verification needs of one SignerInfo, read out of the DER once."""

    index: int
    description: str
    offset: int | None
    issuer: bytes | None  # the issuer Name's DER (issuerAndSerialNumber)
    serial: int | None
    skid: bytes | None  # subjectKeyIdentifier
    digest_algorithm: str  # a kernel name, or the dotted OID of an unknown one
    signature_kind: str | None  # _RSA, _RSA_PSS, _ECDSA; None: not verifiable here
    signature_name: str
    pss: tuple[str, str, int] | None  # RSASSA-PSS: hash, MGF1 hash, salt length
    pss_problem: str | None  # why RSASSA-PSS parameters cannot be used
    signature: bytes
    signed_attributes: bytes | None  # the attributes re-tagged as a SET OF (0x31)
    message_digest: bytes | None


@dataclass(frozen=True, slots=True)
class ModuleSignature:
    """A parsed appended signature: the ``modsig`` field of an ``ima-modsig`` entry.

    ``digest_algorithm`` is the first signer's digest algorithm, the one the
    kernel's ``pkcs7_get_digest`` computes the ``d-modsig`` digest with, in the
    kernel's names (``sha256``, ``sha3_256``; the dotted OID of an algorithm it
    does not know). ``signers`` names each SignerInfo's signer, as
    ``issuer <Name>, serial 0x<hex>`` or ``skid <hex>``.
    """

    pkcs7: bytes
    digest_algorithm: str
    signers: tuple[str, ...]
    _signer_infos: tuple[_Signer, ...] = field(default=(), init=False, repr=False, compare=False)

    @classmethod
    def from_der(cls, data: bytes) -> ModuleSignature:
        """Parse the PKCS#7 message as the kernel's ``pkcs7_parse_message`` would accept it.

        A ContentInfo of type signedData (the whole input, nothing after it),
        SignedData version 1 or 3, encapsulated content of type data and
        detached, at least one SignerInfo, each of version 1 with an
        issuerAndSerialNumber or version 3 with a subjectKeyIdentifier (the
        SignedData's version), authenticated attributes in all SignerInfos or in
        none, with one contentType (data) and one messageDigest. Raises
        :class:`IMASignatureParseError` otherwise; unknown digest or signature
        algorithms are recorded and refused only by :func:`verify_modsig`.
        """
        raw = bytes(data)
        signer_infos = _parse(raw)
        sig = cls(raw, signer_infos[0].digest_algorithm, tuple(s.description for s in signer_infos))
        object.__setattr__(sig, "_signer_infos", signer_infos)
        return sig

    def to_dict(self) -> dict[str, Any]:
        return {
            "digest_algorithm": self.digest_algorithm,
            "signers": list(self.signers),
            "size": len(self.pkcs7),
        }


# -- parsing --------------------------------------------------------------------------------------


def _offset_of(data: bytes, value: Any) -> int | None:
    """Where ``value`` (a parsed, unmodified asn1crypto value) starts in ``data``."""
    try:
        encoded = value.dump()
    except _ASN1_ERRORS:
        return None
    if not isinstance(encoded, bytes) or not encoded:
        return None
    at = data.find(encoded)
    return at if at >= 0 else None


def _der_length_end(data: bytes) -> int | None:
    """The end of the first DER/BER element of ``data``, None when its header is malformed."""
    try:
        end = parser.peek(data)
    except _ASN1_ERRORS:
        return None
    return end if isinstance(end, int) else None


def _escape_rdn_value(text: str) -> str:
    out = []
    for i, ch in enumerate(text):
        if ch in ',+"\\<>;' or (i == 0 and ch in "# ") or (i == len(text) - 1 and ch == " "):
            out.append("\\" + ch)
        elif ord(ch) < 0x20:
            out.append(f"\\{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _name_text(name: Any) -> str:
    """An RFC 4514 string of an asn1crypto Name (last RDN first), as cryptography writes it."""
    rdns: list[str] = []
    for rdn in name.chosen:
        parts: list[str] = []
        for atv in rdn:
            oid = str(atv["type"].dotted)
            key = _NAME_KEYS.get(oid, oid)
            value = atv["value"].native
            if isinstance(value, str):
                shown = _escape_rdn_value(value)
            else:
                shown = "#" + bytes(atv["value"].dump()).hex()
            parts.append(f"{key}={shown}")
        rdns.append("+".join(parts))
    return ",".join(reversed(rdns))


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _digest_name(algorithm: Any) -> str:
    oid = str(algorithm["algorithm"].dotted)
    return _DIGEST_BY_OID.get(oid, oid)


def _pss_parameters(params: Any) -> tuple[tuple[str, str, int] | None, str | None]:
    """(hash, MGF1 hash, salt length) of RSASSA-PSS-params, or why they cannot be used."""
    if isinstance(params, core.Void):
        return None, "RSASSA-PSS without parameters"
    hash_name = _digest_name(params["hash_algorithm"])
    mgf = params["mask_gen_algorithm"]
    if str(mgf["algorithm"].dotted) != _OID_MGF1:
        return None, f"RSASSA-PSS mask generation {mgf['algorithm'].dotted} (not MGF1)"
    mgf_hash = _digest_name(mgf["parameters"])
    salt = params["salt_length"].native
    trailer = int(params["trailer_field"])
    if trailer != 1:
        return None, f"RSASSA-PSS trailer field {trailer} (not 1)"
    if not isinstance(salt, int) or salt < 0:
        return None, f"RSASSA-PSS salt length {salt!r}"
    return (hash_name, mgf_hash, salt), None


def _signed_attributes(
    data: bytes, index: int, attrs: Any, offset: int | None
) -> tuple[bytes, bytes]:
    """(the attributes' DER re-tagged as SET OF, messageDigest) as ``pkcs7_parser.c`` reads them."""
    seen: set[str] = set()
    content_type: str | None = None
    message_digest: bytes | None = None
    for attr in attrs:
        oid = str(attr["type"].dotted)
        name = _SINGLE_ATTRIBUTES.get(oid)
        if name is None:
            continue
        where = _offset_of(data, attr)
        values = attr["values"]
        if oid in seen or len(values) != 1:
            raise IMASignatureParseError(
                f"signer {index}: authenticated attribute {name} appears more than once or "
                "with more than one value",
                offset=where,
            )
        seen.add(oid)
        value = values[0]
        if oid == _OID_CONTENT_TYPE:
            content_type = str(value.dotted)
        elif oid == _OID_MESSAGE_DIGEST:
            if not isinstance(value, core.OctetString):
                raise IMASignatureParseError(
                    f"signer {index}: the messageDigest attribute is not an OCTET STRING",
                    offset=where,
                )
            message_digest = bytes(value.native)
        else:
            _ = value.native  # a signingTime must at least decode
    if content_type is None or message_digest is None:
        raise IMASignatureParseError(
            f"signer {index}: authenticated attributes without a contentType and a messageDigest",
            offset=offset,
        )
    if content_type != _OID_DATA:
        raise IMASignatureParseError(
            f"signer {index}: the contentType attribute is {content_type}, not data",
            offset=offset,
        )
    encoded = bytes(attrs.dump())
    if not encoded or encoded[0] != 0xA0:
        raise IMASignatureParseError(
            f"signer {index}: the authenticated attributes are not tagged [0]", offset=offset
        )
    return b"\x31" + encoded[1:], message_digest


def _signer(data: bytes, index: int, info: Any, version: int) -> _Signer:
    offset = _offset_of(data, info)
    signer_version = int(info["version"])
    sid = info["sid"]
    choice = str(sid.name)
    issuer = serial = skid = None
    if signer_version == 1 and choice == "issuer_and_serial_number":
        if version != 1:
            raise IMASignatureParseError(
                f"signer {index}: a version 1 SignerInfo in a version {version} SignedData",
                offset=offset,
            )
        ias = sid.chosen
        issuer = bytes(ias["issuer"].dump())
        serial = int(ias["serial_number"].native)
        try:
            issuer_text = _name_text(ias["issuer"])
        except _ASN1_ERRORS:
            issuer_text = "#" + issuer.hex()
        description = f"issuer {issuer_text}, serial {serial:#x}"
    elif signer_version == 3 and choice == "subject_key_identifier":
        if version != 3:
            raise IMASignatureParseError(
                f"signer {index}: a version 3 SignerInfo in a version {version} SignedData",
                offset=offset,
            )
        skid = bytes(sid.chosen.native)
        description = f"skid {skid.hex()}"
    else:
        shown = "issuerAndSerialNumber" if choice == "issuer_and_serial_number" else "a SKID"
        raise IMASignatureParseError(
            f"signer {index}: SignerInfo version {signer_version} with {shown} (the kernel "
            "takes version 1 with issuerAndSerialNumber or version 3 with a "
            "subjectKeyIdentifier)",
            offset=offset,
        )
    digest_algorithm = _digest_name(info["digest_algorithm"])
    sig_alg = info["signature_algorithm"]
    sig_oid = str(sig_alg["algorithm"].dotted)
    kind, sig_name = _SIGNATURE_BY_OID.get(sig_oid, (None, sig_oid))
    pss = pss_problem = None
    if kind == _RSA_PSS:
        pss, pss_problem = _pss_parameters(sig_alg["parameters"])
    signature = bytes(info["signature"].native)
    attrs = info["signed_attrs"]
    signed = message_digest = None
    if not isinstance(attrs, core.Void):
        signed, message_digest = _signed_attributes(data, index, attrs, offset)
    return _Signer(
        index=index,
        description=_shorten(description),
        offset=offset,
        issuer=issuer,
        serial=serial,
        skid=skid,
        digest_algorithm=digest_algorithm,
        signature_kind=kind,
        signature_name=sig_name,
        pss=pss,
        pss_problem=pss_problem,
        signature=signature,
        signed_attributes=signed,
        message_digest=message_digest,
    )


def _parse(data: bytes) -> tuple[_Signer, ...]:
    if not data:
        raise IMASignatureParseError("the appended signature is empty", offset=0)
    end = _der_length_end(data)
    if end is None or end > len(data):
        raise IMASignatureParseError(
            "the appended signature does not start with a complete DER element", offset=0
        )
    if end < len(data):
        raise IMASignatureParseError(
            f"{len(data) - end} bytes follow the PKCS#7 message", offset=end
        )
    try:
        info = cms.ContentInfo.load(data, strict=True)
        content_type = str(info["content_type"].dotted)
        if content_type != _OID_SIGNED_DATA:
            raise IMASignatureParseError(
                f"the PKCS#7 content type is {content_type}, not signedData",
                offset=_offset_of(data, info["content_type"]),
            )
        signed = info["content"]
        if isinstance(signed, core.Void):
            raise IMASignatureParseError("the PKCS#7 signedData has no content", offset=0)
        version = int(signed["version"])
        if version not in (1, 3):
            raise IMASignatureParseError(
                f"SignedData version {version} (the kernel takes 1 or 3)",
                offset=_offset_of(data, signed["version"]),
            )
        encap = signed["encap_content_info"]
        encap_type = str(encap["content_type"].dotted)
        if encap_type != _OID_DATA:
            raise IMASignatureParseError(
                f"the signed content type is {encap_type}, not data (a module signature "
                "signs data)",
                offset=_offset_of(data, encap),
            )
        if not isinstance(encap["content"], core.Void):
            raise IMASignatureParseError(
                "the PKCS#7 message carries its content: an appended signature is detached",
                offset=_offset_of(data, encap),
            )
        infos = signed["signer_infos"]
        count = len(infos)
        if count == 0:
            raise IMASignatureParseError(
                "the PKCS#7 message has no SignerInfo", offset=_offset_of(data, infos)
            )
        signers = tuple(_signer(data, i, infos[i], version) for i in range(count))
    except IMASignatureParseError:
        raise
    except _ASN1_ERRORS as e:
        raise IMASignatureParseError(
            f"the appended signature is not a well-formed PKCS#7 SignedData: {_reason(e)}"
        ) from None
    with_attrs = {s.signed_attributes is not None for s in signers}
    if len(with_attrs) > 1:
        raise IMASignatureParseError(
            "authenticated attributes are in some SignerInfos only (the kernel wants all or none)",
            offset=signers[0].offset,
        )
    return signers


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    return _shorten(first)


# -- verification ---------------------------------------------------------------------------------


def _normalize(algorithm: str) -> str:
    """The kernel's name of a digest algorithm: ``sha3-256`` and ``sha3_256`` both ``sha3_256``."""
    name = algorithm.strip().lower().replace("-", "_")
    return "sm3_256" if name == "sm3" else name


def _answers(key: TrustedKey, signer: _Signer) -> bool:
    """Whether ``signer`` names ``key``: issuer and serial, or subject key identifier."""
    cert = key.certificate
    if signer.skid is not None:
        if cert is None:
            bits = _public_key_bits(key.public_key)
            return hmac.compare_digest(
                hashlib.sha1(bits, usedforsecurity=False).digest(), signer.skid
            )
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
            return False
        return bool(ski.digest == signer.skid)
    if cert is None or signer.serial is None or cert.serial_number != signer.serial:
        return False
    return cert.issuer.public_bytes() == signer.issuer


def _candidates(keys: KeyRing, signer: _Signer) -> Iterator[TrustedKey]:
    for key in keys.keys:
        try:
            if _answers(key, signer):
                yield key
        except (ValueError, UnsupportedAlgorithm):
            continue


def _check(
    key: TrustedKey, signer: _Signer, signed: bytes, alg: hashes.HashAlgorithm
) -> str | None:
    """None when ``signer``'s signature over the digest ``signed`` verifies with ``key``."""
    public = key.public_key
    kind = signer.signature_kind
    try:
        if kind in (_RSA, _RSA_PSS):
            if not isinstance(public, rsa.RSAPublicKey):
                return f"an RSA signature, and the key of {key.name} is not RSA"
            if kind == _RSA:
                public.verify(signer.signature, signed, padding.PKCS1v15(), Prehashed(alg))
            else:
                assert signer.pss is not None
                mgf_hash = _HASHES[signer.pss[1]]()
                pad = padding.PSS(padding.MGF1(mgf_hash), signer.pss[2])
                public.verify(signer.signature, signed, pad, Prehashed(alg))
        else:
            if not isinstance(public, ec.EllipticCurvePublicKey):
                return f"an ECDSA signature, and the key of {key.name} is not EC"
            public.verify(signer.signature, signed, ec.ECDSA(Prehashed(alg)))
    except InvalidSignature:
        return f"the signature does not verify with {key.name}"
    except (ValueError, UnsupportedAlgorithm) as e:
        return f"the signature does not verify with {key.name} ({_reason(e)})"
    return None


def _unsupported(signer: _Signer, digest_algorithm: str) -> str | None:
    """Why ``signer`` cannot be checked here, None when it can."""
    if signer.digest_algorithm != digest_algorithm:
        return (
            f"signer {signer.index} uses digest {signer.digest_algorithm}, the log holds "
            f"only a {digest_algorithm} digest"
        )
    if signer.signature_kind is None:
        return f"signer {signer.index}: signature algorithm {signer.signature_name}"
    if signer.signature_kind == _RSA_PSS:
        if signer.pss is None:
            return f"signer {signer.index}: {signer.pss_problem}"
        pss_hash, mgf_hash, _ = signer.pss
        if pss_hash != digest_algorithm or mgf_hash not in _HASHES:
            return (
                f"signer {signer.index}: RSASSA-PSS with hash {pss_hash} and MGF1 {mgf_hash} "
                f"over a {digest_algorithm} digest"
            )
    return None


def verify_modsig(
    pkcs7: bytes | ModuleSignature,
    digest_algorithm: str,
    digest: bytes,
    keys: KeyRing,
    *,
    authenticated_attributes: bool = False,
) -> TrustedKey:
    """Return the trusted key whose signature this is; raise otherwise.

    ``digest_algorithm`` and ``digest`` are the entry's ``d-modsig`` field: the
    content digest the kernel computed with the first signer's algorithm
    (``pkcs7_get_digest``). As ``pkcs7_verify`` and ``pkcs7_validate_trust`` do:
    every SignerInfo's messageDigest attribute, when it has attributes, must be
    that digest; signers no trusted key answers to are passed over; a signer that
    answers to a trusted key must verify with it; one verified signer suffices.

    Raises :class:`IMASignatureParseError` for a malformed message,
    :class:`IMASignatureError` when the digest algorithm or a messageDigest
    disagrees with ``d-modsig`` or a trusted signer does not verify,
    With authenticated attributes the message is refused (:class:`IMASignatureError`),
    as the kernel refuses it, unless ``authenticated_attributes`` is true.

    :class:`IMASignatureUnsupportedError` when the only trusted signers use
    algorithms that cannot be checked here, and :class:`UnknownKeyError` when no
    trusted key answers to any signer.
    """
    sig = pkcs7 if isinstance(pkcs7, ModuleSignature) else ModuleSignature.from_der(pkcs7)
    signers = sig._signer_infos or ModuleSignature.from_der(sig.pkcs7)._signer_infos
    name = _normalize(digest_algorithm)
    first = signers[0].digest_algorithm
    if first != name:
        raise IMASignatureError(
            f"the appended signature's digest algorithm is {first}, the d-modsig digest is "
            f"{digest_algorithm or 'unnamed'}"
        )
    hash_cls = _HASHES.get(name)
    if hash_cls is None:
        raise IMASignatureUnsupportedError(
            f"an appended signature over a {name} digest cannot be verified here"
        )
    alg = hash_cls()
    digest = bytes(digest)
    if len(digest) != alg.digest_size:
        raise IMASignatureError(
            f"a {name} digest is {alg.digest_size} bytes, the d-modsig digest is {len(digest)}"
        )
    for s in signers:
        if (
            s.message_digest is not None
            and s.digest_algorithm == name
            and not hmac.compare_digest(s.message_digest, digest)
        ):
            raise IMASignatureError(
                f"signer {s.index} ({s.description}): the messageDigest attribute is not the "
                f"d-modsig digest {name}:{digest.hex()}"
            )
    if not authenticated_attributes and signers[0].signed_attributes is not None:
        # All signers have them or none do (the parser's rule).
        raise IMASignatureError(
            "the appended signature has authenticated attributes, which the kernel refuses in "
            "a module signature (pkcs7_verify: 'Invalid module sig (has authattrs)')"
        )
    trusted: TrustedKey | None = None
    unsupported: list[str] = []
    for s in signers:
        candidates = list(_candidates(keys, s))
        if not candidates:
            continue
        why = _unsupported(s, name)
        if why is not None:
            unsupported.append(why)
            continue
        if s.signed_attributes is not None:
            h = hashes.Hash(hash_cls())
            h.update(s.signed_attributes)
            signed = h.finalize()
        else:
            signed = digest
        failures = []
        for key in candidates:
            failure = _check(key, s, signed, alg)
            if failure is None:
                if trusted is None:
                    trusted = key
                break
            failures.append(failure)
        else:
            raise IMASignatureError(
                f"signer {s.index} ({s.description}), a {s.signature_name} signature over a "
                f"{name} digest: {'; '.join(failures)}"
            )
    if trusted is not None:
        return trusted
    if unsupported:
        raise IMASignatureUnsupportedError(
            "the appended signature cannot be verified here: " + "; ".join(unsupported)
        )
    raise UnknownKeyError(
        "no trusted key answers to the appended signature's signers: " + "; ".join(sig.signers)
    )


# -- files with an appended signature -------------------------------------------------------------


def split_appended_signature(data: bytes) -> tuple[bytes, bytes]:
    """(content, pkcs7) of a file with an appended signature, as ``mod_check_sig`` reads it.

    As ``ima_read_modsig`` and ``mod_check_sig``: the file must be longer than the
    marker and ``struct module_signature`` and end with the marker; ``sig_len``
    must be less than the bytes before the struct (so at least one byte of
    content remains); ``id_type`` must be PKEY_ID_PKCS7 and ``algo``, ``hash``,
    ``signer_len``, ``key_id_len`` and the padding zero. Raises
    :class:`IMASignatureParseError` naming the offending offset otherwise.
    """
    size = len(data)
    marker = len(MODULE_SIG_STRING)
    tail = marker + _MODULE_SIGNATURE.size
    if size <= tail:
        raise IMASignatureParseError(
            f"a file with an appended signature is longer than {tail} bytes; this one is {size}",
            offset=0,
        )
    if bytes(data[size - marker :]) != MODULE_SIG_STRING:
        raise IMASignatureParseError(
            "the file does not end with the marker '~Module signature appended~\\n'",
            offset=size - marker,
        )
    at = size - tail
    algo, hash_algo, id_type, signer_len, key_id_len, pad, sig_len = _MODULE_SIGNATURE.unpack_from(
        data, at
    )
    if sig_len >= at:
        raise IMASignatureParseError(
            f"struct module_signature says {sig_len} bytes of signature, the file has {at} "
            "bytes before it (the signature must leave some content)",
            offset=at + 8,
        )
    if id_type != PKEY_ID_PKCS7:
        raise IMASignatureParseError(
            f"struct module_signature id_type is {id_type}, not {PKEY_ID_PKCS7} (PKEY_ID_PKCS7)",
            offset=at + 2,
        )
    fields = (
        ("algo", 0, algo),
        ("hash", 1, hash_algo),
        ("signer_len", 3, signer_len),
        ("key_id_len", 4, key_id_len),
    )
    for fname, delta, value in fields:
        if value != 0:
            raise IMASignatureParseError(
                f"struct module_signature {fname} is {value}, not 0", offset=at + delta
            )
    for i, byte in enumerate(pad):
        if byte != 0:
            raise IMASignatureParseError(
                f"struct module_signature padding byte {i} is 0x{byte:02x}, not 0",
                offset=at + 5 + i,
            )
    start = at - sig_len
    return bytes(data[:start]), bytes(data[start:at])


def modsig_digest(content: bytes, digest_algorithm: str) -> bytes:
    """The ``d-modsig`` digest of ``content`` (the file without its appended signature).

    ``digest_algorithm`` in the kernel's names (``sha256``, ``sha3-256`` or
    ``sha3_256``); :class:`IMASignatureUnsupportedError` for one hashlib lacks.
    """
    name = _normalize(digest_algorithm)
    lib = _HASHLIB.get(name)
    if lib is None:
        raise IMASignatureUnsupportedError(f"cannot compute a {digest_algorithm} digest")
    try:
        h = hashlib.new(lib, usedforsecurity=False)
    except ValueError:
        raise IMASignatureUnsupportedError(
            f"this Python's hashlib cannot compute a {digest_algorithm} digest"
        ) from None
    h.update(content)
    return h.digest()
