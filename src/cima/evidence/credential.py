"""TPM credential activation, the verifier's side: trust an attestation key through the EK.

A verifier trusts an attestation key (AK) because the TPM that holds it also holds
an endorsement key (EK) whose certificate chains to a TPM manufacturer:

1. :func:`check_ek_certificate`: the EK certificate chains to a trusted root;
2. :func:`check_ek_public`: the EK public area holds the certificate's key and is a
   restricted decryption key as the TCG EK Credential Profile templates make it;
3. :func:`check_ak_public`: the AK is a restricted signing key that never leaves the TPM;
4. :func:`make_credential`: a secret is encrypted to the EK and bound to the AK's
   name (TPM2_MakeCredential, computed here without a TPM). Only a TPM that holds
   the EK's private key *and* has the AK loaded recovers the secret with
   TPM2_ActivateCredential; returning it proves the AK lives in that TPM.

Credential protection (TPM 2.0 Library, Part 1, 24 "Credential Protection")::

    seed         a random value shared with the EK's TPM (secret sharing, below)
    symKey       KDFa(nameAlg, seed, "STORAGE", Name, "", symmetric key bits)      (24.4)
    encIdentity  CFB_symKey(IV = 0, TPM2B_DIGEST credential)                          (24.4)
    HMACkey      KDFa(nameAlg, seed, "INTEGRITY", "", "", digest bits)            (24.5)
    outerHMAC    HMAC_nameAlg(HMACkey, encIdentity || Name)                       (24.5)

``nameAlg`` and the symmetric algorithm are the EK's, ``Name`` the AK's TPM name.
The outputs are a TPM2B_ID_OBJECT (Part 2, TPMS_ID_OBJECT: ``TPM2B_DIGEST outerHMAC ||
encIdentity``, the size of encIdentity encrypted with it) and a TPM2B_ENCRYPTED_SECRET
(Part 2) holding the seed:

* RSA EK (Part 1, Annex B.10.4): the seed, ``digest size`` random bytes, encrypted with
  RSAES-OAEP, hash and MGF1 hash ``nameAlg``, label ``"IDENTITY\\0"``;
* ECC EK (Part 1, Annex C.6.4): an ephemeral key pair (de, Qe) on the EK's curve,
  ``Z`` = the x coordinate of de * Q_EK, seed = KDFe(nameAlg, Z, "IDENTITY", Qe.x,
  Q_EK.x, digest bits); the encrypted secret is Qe as a TPMS_ECC_POINT.

Every structure is big-endian; a ``TPM2B_*`` is a 16-bit size followed by the bytes.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cima.digests import HashAlgorithm, by_id, by_name, is_known_id
from cima.errors import CimaError, ParseError, SignatureError
from cima.evidence.tpm import (
    SIGNATURE_SCHEMES,
    TPM_ALG_ECC,
    TPM_ALG_ECDAA,
    TPM_ALG_ECDSA,
    TPM_ALG_ECSCHNORR,
    TPM_ALG_NULL,
    TPM_ALG_RSA,
    TPM_ALG_RSAPSS,
    TPM_ALG_RSASSA,
    TPM_ALG_SM2,
    TPMA_DECRYPT,
    TPMA_FIXEDPARENT,
    TPMA_FIXEDTPM,
    TPMA_RESTRICTED,
    TPMA_SENSITIVEDATAORIGIN,
    TPMA_SIGN_ENCRYPT,
    PublicArea,
)

__all__ = [
    "EK_ATTRIBUTES",
    "MAX_CHAIN_LENGTH",
    "CredentialError",
    "EndorsementError",
    "EndorsementStep",
    "check_ak_public",
    "check_ek_certificate",
    "check_ek_public",
    "kdfa",
    "kdfe",
    "make_credential",
]

# --- constants (Part 2: 6.3 TPM_ALG_ID, 8.3 TPMA_OBJECT) --------------------------------------

TPM_ALG_AES = 0x0006
TPM_ALG_CFB = 0x0043
TPMA_ADMINWITHPOLICY = 0x00000080

#: objectAttributes every EK has (TCG EK Credential Profile, templates L-1.. and H-1..):
#: a restricted decryption key, created in and bound to its TPM, administered by policy.
#: The high-range templates also set userWithAuth, which is neither required nor refused.
EK_ATTRIBUTES = (
    TPMA_FIXEDTPM
    | TPMA_FIXEDPARENT
    | TPMA_SENSITIVEDATAORIGIN
    | TPMA_ADMINWITHPOLICY
    | TPMA_RESTRICTED
    | TPMA_DECRYPT
)

#: objectAttributes every AK has; userWithAuth and adminWithPolicy are the owner's choice.
_AK_REQUIRED = (
    TPMA_FIXEDTPM
    | TPMA_FIXEDPARENT
    | TPMA_SENSITIVEDATAORIGIN
    | TPMA_RESTRICTED
    | TPMA_SIGN_ENCRYPT
)

_ATTRIBUTE_NAMES = (
    (TPMA_FIXEDTPM, "fixedTPM"),
    (TPMA_FIXEDPARENT, "fixedParent"),
    (TPMA_SENSITIVEDATAORIGIN, "sensitiveDataOrigin"),
    (TPMA_ADMINWITHPOLICY, "adminWithPolicy"),
    (TPMA_RESTRICTED, "restricted"),
    (TPMA_DECRYPT, "decrypt"),
    (TPMA_SIGN_ENCRYPT, "sign"),
)

#: The longest EK certificate chain accepted, the EK certificate and the root included.
MAX_CHAIN_LENGTH = 8

#: Name algorithms of the EKs a credential is made for (the EK profile uses these).
_NAME_ALGS = frozenset({"sha256", "sha384", "sha512"})
_RSA_KEY_BITS = frozenset({2048, 3072})
_AES_KEY_BITS = frozenset({128, 256})
_RSA_SCHEMES = frozenset({TPM_ALG_RSASSA, TPM_ALG_RSAPSS})
_ECC_SCHEMES = frozenset({TPM_ALG_ECDSA, TPM_ALG_ECDAA, TPM_ALG_SM2, TPM_ALG_ECSCHNORR})

_LABEL_IDENTITY = b"IDENTITY"
_LABEL_STORAGE = b"STORAGE"
_LABEL_INTEGRITY = b"INTEGRITY"

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class _Curve:
    """A TPM_ECC_CURVE (Part 2, 6.4) make_credential supports."""

    name: str
    size: int  # bytes of a coordinate
    order: int  # n, the order of the base point (FIPS 186-4, D.1.2)
    curve: type[ec.EllipticCurve]


_CURVES: dict[int, _Curve] = {
    0x0003: _Curve(
        "nist-p256",
        32,
        0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
        ec.SECP256R1,
    ),
    0x0004: _Curve(
        "nist-p384",
        48,
        0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973,
        ec.SECP384R1,
    ),
}

# --- errors ------------------------------------------------------------------------------------


class CredentialError(CimaError, ValueError):
    """make_credential cannot make a credential from its inputs.

    For example an EK of a type, size, curve or symmetric algorithm that is not
    supported, an object name that is not a TPM name, or a credential larger than
    the EK's name digest.
    """


EndorsementStep = Literal["ek-certificate", "ek-public", "ak-public"]


class EndorsementError(SignatureError):
    """An EK certificate, EK or AK public area that cannot be trusted.

    ``step`` names the check that failed: ``"ek-certificate"``
    (:func:`check_ek_certificate`), ``"ek-public"`` (:func:`check_ek_public`) or
    ``"ak-public"`` (:func:`check_ak_public`). ``reason`` is a short keyword for the
    failure: ``no-issuer``, ``signature``, ``expired``, ``not-yet-valid``, ``not-ca``,
    ``key-usage``, ``path-length``, ``too-long``, ``malformed``, ``key``,
    ``attributes``, ``symmetric``, ``scheme``.
    """

    def __init__(self, message: str, *, step: EndorsementStep, reason: str | None = None) -> None:
        self.step: EndorsementStep = step
        self.reason = reason
        super().__init__(f"{step}: {message}")


# --- key derivation (Part 1, 11.4.10) ----------------------------------------------------------


def _hash(hash_name: str) -> HashAlgorithm:
    alg = by_name(hash_name)
    alg.new()  # AlgorithmError if this Python's OpenSSL does not have it
    return alg


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits <= 0:
        raise CredentialError(f"a key size of {bits!r} bits: must be a positive integer")
    if bits >= 1 << 32:
        raise CredentialError(f"a key size of {bits} bits does not fit the 32-bit field")
    return (bits + 7) // 8


def _truncate(stream: bytearray, bits: int) -> bytes:
    """The first ceil(bits / 8) bytes of the stream; when ``bits`` is not a multiple of 8,
    the unused high-order bits of the first byte are cleared (Part 1, 11.4.10.2 and its
    KDFa example, and the reference implementation's CryptKDFe)."""
    out = stream[: (bits + 7) // 8]
    if bits % 8:
        out[0] &= (1 << (bits % 8)) - 1
    return bytes(out)


def _terminated(label: bytes) -> bytes:
    """The label as the TPM hashes it: NUL-terminated, one NUL added only where missing."""
    label = bytes(label)
    return label if label.endswith(b"\x00") else label + b"\x00"


def kdfa(  # noqa: PLR0917 - the argument order of the specification's KDFa
    hash_name: str, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int
) -> bytes:
    """KDFa, TPM 2.0 Part 1, 11.4.10.2: SP800-108 KDF in counter mode with HMAC.

    ``K(i) = HMAC_hash(key, [i]32 || label || 0x00 || context_u || context_v || [bits]32)``
    for i = 1, 2, ...; the result is the first ceil(``bits`` / 8) bytes of
    K(1) || K(2) ..., with the unused high-order bits of the first byte cleared when
    ``bits`` is not a multiple of 8. ``label`` is given without its terminating NUL
    (``b"STORAGE"``); the NUL is added as the TPM adds it, only when the label does
    not already end in one. An unknown ``hash_name`` raises
    :class:`~cima.errors.AlgorithmError`, a ``bits`` that is not positive
    :class:`CredentialError`.
    """
    alg = _hash(hash_name)
    size = _check_bits(bits)
    fixed = _terminated(label) + bytes(context_u) + bytes(context_v) + _U32.pack(bits)
    out = bytearray()
    counter = 0
    while len(out) < size:
        counter += 1
        out += hmac.digest(bytes(key), _U32.pack(counter) + fixed, alg.hashlib_name)
    return _truncate(out, bits)


def kdfe(  # noqa: PLR0917 - the argument order of the specification's KDFe
    hash_name: str, z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int
) -> bytes:
    """KDFe, TPM 2.0 Part 1, 11.4.10.3: the SP800-56A concatenation KDF.

    ``H(i) = H_hash([i]32 || z || label || 0x00 || party_u || party_v)`` for i = 1, 2,
    ...; the result is the first ceil(``bits`` / 8) bytes of H(1) || H(2) ..., masked
    as in :func:`kdfa`. The bit count is not hashed. ``label`` is NUL-terminated as in
    :func:`kdfa`.
    """
    alg = _hash(hash_name)
    size = _check_bits(bits)
    other = _terminated(label) + bytes(party_u) + bytes(party_v)
    z = bytes(z)
    out = bytearray()
    counter = 0
    while len(out) < size:
        counter += 1
        out += alg.hash(_U32.pack(counter) + z + other)
    return _truncate(out, bits)


# --- TPM2_MakeCredential (Part 3, 12.6) --------------------------------------------------------


def _tpm2b(data: bytes) -> bytes:
    return _U16.pack(len(data)) + data


def _draw(random: Callable[[int], bytes], n: int, what: str) -> bytes:
    value = random(n)
    if not isinstance(value, bytes | bytearray) or len(value) != n:
        size = len(value) if isinstance(value, bytes | bytearray) else type(value).__name__
        raise CredentialError(f"random({n}) for the {what} returned {size}, not {n} bytes")
    return bytes(value)


def _mgf1(alg: HashAlgorithm, seed: bytes, length: int) -> bytes:
    """MGF1, RFC 8017 B.2.1."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += alg.hash(seed + _U32.pack(counter))
        counter += 1
    return bytes(out[:length])


def _oaep_encrypt(
    key: rsa.RSAPublicKey, alg: HashAlgorithm, label: bytes, message: bytes, seed: bytes
) -> bytes:
    """RSAES-OAEP-ENCRYPT, RFC 8017 7.1.1, with the OAEP seed given (from ``random``).

    The encoding is done here rather than by ``cryptography`` so that every random
    input of make_credential comes from its ``random`` argument.
    """
    numbers = key.public_numbers()
    k = (key.key_size + 7) // 8
    h_len = alg.digest_size
    if len(message) > k - 2 * h_len - 2:
        raise CredentialError(f"a {len(message)}-byte seed does not fit RSA-OAEP in {k} bytes")
    db = alg.hash(label) + bytes(k - len(message) - 2 * h_len - 2) + b"\x01" + message
    masked_db = bytes(a ^ b for a, b in zip(db, _mgf1(alg, seed, k - h_len - 1), strict=True))
    masked_seed = bytes(a ^ b for a, b in zip(seed, _mgf1(alg, masked_db, h_len), strict=True))
    encoded = int.from_bytes(b"\x00" + masked_seed + masked_db, "big")
    # The exponent is public: the modular exponentiation reveals nothing of the seed.
    return pow(encoded, numbers.e, numbers.n).to_bytes(k, "big")


def _rsa_seed(
    ek: PublicArea, alg: HashAlgorithm, random: Callable[[int], bytes]
) -> tuple[bytes, bytes]:
    """Part 1, Annex B.10.4: (seed, OAEP encryption of the seed to the EK)."""
    if ek.key_bits not in _RSA_KEY_BITS:
        raise CredentialError(
            f"an RSA-{ek.key_bits} EK: only RSA-2048 and RSA-3072 EKs are supported"
        )
    modulus = ek.unique[0]
    if len(modulus) != ek.key_bits // 8 or not modulus[0] & 0x80:
        raise CredentialError(
            f"the EK's modulus is {len(modulus)} bytes long, keyBits {ek.key_bits} says "
            f"{ek.key_bits // 8} with the top bit set"
        )
    key = _ek_key(ek)
    assert isinstance(key, rsa.RSAPublicKey)
    seed = _draw(random, alg.digest_size, "seed")
    oaep_seed = _draw(random, alg.digest_size, "OAEP seed")
    label = _terminated(_LABEL_IDENTITY)
    return seed, _oaep_encrypt(key, alg, label, seed, oaep_seed)


def _ecc_seed(
    ek: PublicArea, alg: HashAlgorithm, random: Callable[[int], bytes]
) -> tuple[bytes, bytes]:
    """Part 1, Annex C.6.4 (one-pass Diffie-Hellman): (seed, TPMS_ECC_POINT of Qe)."""
    curve = _CURVES.get(ek.curve)
    if curve is None:
        raise CredentialError(
            f"an ECC EK on curve {ek.curve_name}: only NIST P-256 and P-384 EKs are supported"
        )
    if ek.kdf != TPM_ALG_NULL:
        raise CredentialError(f"an ECC EK with KDF scheme 0x{ek.kdf:04x}: the EK profile has none")
    key = _ek_key(ek)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    # 64 extra random bits make the reduction mod n - 1 uniform enough (FIPS 186-4, B.4.1).
    scalar = int.from_bytes(_draw(random, curve.size + 8, "ephemeral key"), "big")
    ephemeral = ec.derive_private_key(scalar % (curve.order - 1) + 1, curve.curve())
    z = ephemeral.exchange(ec.ECDH(), key)
    point = ephemeral.public_key().public_numbers()
    qe_x = point.x.to_bytes(curve.size, "big")
    qe_y = point.y.to_bytes(curve.size, "big")
    seed = kdfe(alg.name, z, _LABEL_IDENTITY, qe_x, ek.unique[0], alg.digest_size * 8)
    return seed, _tpm2b(qe_x) + _tpm2b(qe_y)


def _ek_key(ek: PublicArea) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    try:
        return ek.public_key()
    except ParseError as e:
        raise CredentialError(f"the EK's public area does not hold a usable key: {e}") from e


def _check_name(object_name: bytes) -> bytes:
    if not isinstance(object_name, bytes | bytearray | memoryview):
        raise CredentialError(f"the object name is a {type(object_name).__name__}, not bytes")
    name = bytes(object_name)
    if len(name) < 2:
        raise CredentialError(f"an object name of {len(name)} bytes: a TPM name has 2 or more")
    (alg_id,) = _U16.unpack_from(name)
    if not is_known_id(alg_id):
        raise CredentialError(f"the object name's algorithm 0x{alg_id:04x} is not a known hash")
    digest = by_id(alg_id)
    if len(name) != 2 + digest.digest_size:
        raise CredentialError(
            f"an object name of {len(name)} bytes: a {digest.name} name has "
            f"{2 + digest.digest_size} (2-byte algorithm + {digest.digest_size}-byte digest)"
        )
    return name


def make_credential(
    ek: PublicArea | bytes,
    object_name: bytes,
    credential: bytes,
    *,
    random: Callable[[int], bytes] = os.urandom,
) -> tuple[bytes, bytes]:
    """(TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET), as TPM2_MakeCredential returns them.

    TPM 2.0 Library: Part 3, 12.6 TPM2_MakeCredential; Part 1, 24 Credential
    Protection; Part 1, Annex B.10.4 (RSA) and Annex C.6.4 (ECC) secret sharing. Both
    results are marshalled with their 16-bit size prefix, ready for
    TPM2_ActivateCredential.

    ``ek`` is the EK's public area (or its TPM2B_PUBLIC bytes): an RSA-2048/3072 or
    NIST P-256/P-384 restricted decryption key with AES-128 or AES-256 in CFB mode and
    nameAlg SHA-256, SHA-384 or SHA-512. ``object_name`` is the TPM name of the key the
    credential is bound to (the AK): nameAlg (2 bytes) || digest. ``credential`` is at
    most the size of the EK's nameAlg digest.

    ``random(n)`` supplies every random byte, in this order: RSA, the seed then the OAEP
    seed (each the nameAlg digest size); ECC, the ephemeral private key (coordinate size
    + 8 bytes, reduced into [1, n - 1]).

    Raises :class:`CredentialError` for inputs that make no valid credential, or the
    :class:`~cima.errors.ParseError` of :meth:`PublicArea.from_bytes` for EK bytes that
    do not decode.
    """
    if isinstance(ek, PublicArea):
        area = ek
    elif isinstance(ek, bytes | bytearray | memoryview):
        area = PublicArea.from_bytes(bytes(ek))
    else:
        raise CredentialError(f"the EK is a {type(ek).__name__}, not a public area or bytes")
    if not is_known_id(area.name_alg) or by_id(area.name_alg).name not in _NAME_ALGS:
        raise CredentialError(
            f"an EK with nameAlg 0x{area.name_alg:04x}: only SHA-256, SHA-384 and SHA-512 "
            "are supported"
        )
    alg = _hash(by_id(area.name_alg).name)
    # Part 3, 12.6.1: the key must be an asymmetric restricted decryption key.
    if area.object_attributes & (TPMA_RESTRICTED | TPMA_DECRYPT) != (
        TPMA_RESTRICTED | TPMA_DECRYPT
    ):
        raise CredentialError(
            f"the EK (objectAttributes 0x{area.object_attributes:08x}) is not a restricted "
            "decryption key"
        )
    sym_alg, sym_bits, sym_mode = area.symmetric
    if sym_alg != TPM_ALG_AES or sym_mode != TPM_ALG_CFB or sym_bits not in _AES_KEY_BITS:
        raise CredentialError(
            f"the EK's symmetric algorithm {_symmetric_name(area.symmetric)}: only AES-128 "
            "and AES-256 in CFB mode are supported"
        )
    name = _check_name(object_name)
    if not isinstance(credential, bytes | bytearray | memoryview):
        raise CredentialError(f"the credential is a {type(credential).__name__}, not bytes")
    secret = bytes(credential)
    if len(secret) > alg.digest_size:
        raise CredentialError(
            f"a credential of {len(secret)} bytes: at most {alg.digest_size} "
            f"(the {alg.name} digest size of the EK's nameAlg)"
        )

    if area.type == TPM_ALG_RSA:
        seed, encrypted_secret = _rsa_seed(area, alg, random)
    elif area.type == TPM_ALG_ECC:
        seed, encrypted_secret = _ecc_seed(area, alg, random)
    else:  # PublicArea decodes RSA and ECC keys only
        raise CredentialError(f"an EK of type 0x{area.type:04x}")

    # Part 1, 24.4: the credential as a TPM2B_DIGEST, encrypted with AES-CFB and IV zero.
    sym_key = kdfa(alg.name, seed, _LABEL_STORAGE, name, b"", sym_bits)
    enc_identity = _aes_cfb_encrypt(sym_key, _tpm2b(secret))
    # Part 1, 24.5: the outer HMAC over encIdentity and the name.
    hmac_key = kdfa(alg.name, seed, _LABEL_INTEGRITY, b"", b"", alg.digest_size * 8)
    outer_hmac = hmac.digest(hmac_key, enc_identity + name, alg.hashlib_name)
    id_object = _tpm2b(_tpm2b(outer_hmac) + enc_identity)
    return id_object, _tpm2b(encrypted_secret)


def _aes_cfb_encrypt(key: bytes, plaintext: bytes) -> bytes:
    """AES in CFB mode with 128-bit feedback and IV zero (Part 1, 24.4).

    Built on the AES block function: ``C_i = P_i XOR AES_key(C_{i-1})`` with ``C_0`` the
    IV; a final partial block uses the leading bytes of the key stream.
    """
    # ECB here is the raw block function of CFB, applied to the feedback only.
    block = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305
    feedback = bytes(16)
    out = bytearray()
    for start in range(0, len(plaintext), 16):
        stream = block.update(feedback)
        chunk = bytes(p ^ k for p, k in zip(plaintext[start : start + 16], stream, strict=False))
        out += chunk
        feedback = chunk
    return bytes(out)


def _symmetric_name(symmetric: tuple[int, int, int]) -> str:
    alg, bits, mode = symmetric
    if alg == TPM_ALG_NULL:
        return "NULL"
    alg_name = "AES" if alg == TPM_ALG_AES else f"0x{alg:04x}"
    mode_name = "CFB" if mode == TPM_ALG_CFB else f"mode 0x{mode:04x}"
    return f"{alg_name}-{bits} {mode_name}"


# --- EK certificate chain ----------------------------------------------------------------------


def _rfc4514(name: x509.Name) -> str:
    try:
        return name.rfc4514_string()
    except (ValueError, TypeError):
        return "an undecodable name"


def _describe(cert: x509.Certificate) -> str:
    """How a message names a certificate: its subject and serial number."""
    try:
        subject = _rfc4514(cert.subject)
        issuer = _rfc4514(cert.issuer)
    except (ValueError, TypeError):
        subject = issuer = "an undecodable name"
    serial = f"serial 0x{cert.serial_number:x}"
    if subject:
        return f"certificate '{subject}' ({serial})"
    return f"certificate with an empty subject ({serial}, issued by '{issuer}')"


def _utc(at: datetime | None) -> datetime:
    if at is None:
        return datetime.now(UTC)
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _validity_problem(cert: x509.Certificate, at: datetime) -> tuple[str, str] | None:
    if at < cert.not_valid_before_utc:
        return "not-yet-valid", (
            f"{_describe(cert)} is not valid before {cert.not_valid_before_utc.isoformat()} "
            f"(checked at {at.isoformat()})"
        )
    if at > cert.not_valid_after_utc:
        return "expired", (
            f"{_describe(cert)} expired at {cert.not_valid_after_utc.isoformat()} "
            f"(checked at {at.isoformat()})"
        )
    return None


def _issuer_problem(issuer: x509.Certificate, below: int) -> tuple[str, str] | None:
    """Why ``issuer`` may not issue certificates with ``below`` CAs under it (RFC 5280 4.2)."""
    try:
        basic = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    except (ValueError, TypeError, x509.DuplicateExtension) as e:
        return "malformed", f"{_describe(issuer)} has malformed extensions: {e}"
    if basic is None or not basic.ca:
        return "not-ca", f"{_describe(issuer)} is not a CA (basicConstraints cA is not true)"
    if basic.path_length is not None and basic.path_length < below:
        return "path-length", (
            f"{_describe(issuer)} allows {basic.path_length} intermediate CAs below it, "
            f"the chain has {below}"
        )
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    except (ValueError, TypeError, x509.DuplicateExtension) as e:
        return "malformed", f"{_describe(issuer)} has malformed extensions: {e}"
    if usage is None or not usage.key_cert_sign:
        return "key-usage", f"{_describe(issuer)} may not sign certificates (no keyCertSign)"
    return None


def check_ek_certificate(
    cert: x509.Certificate,
    roots: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    *,
    at: datetime | None = None,
) -> list[x509.Certificate]:
    """The chain from the EK certificate ``cert`` to one of ``roots``, ``cert`` first.

    TCG EK Credential Profile for TPM Family 2.0: the EK certificate is issued by the
    TPM manufacturer's CA, possibly through intermediate CAs. The chain is
    built through ``intermediates`` by issuer name, and every link is checked
    (RFC 5280, 6.1): the signature (``verify_directly_issued_by``); every certificate,
    the root included, valid at ``at`` (default: now; a naive datetime is UTC); every
    issuer a CA (basicConstraints cA true, pathLenConstraint respected) with the
    keyCertSign key usage; at most :data:`MAX_CHAIN_LENGTH` certificates.

    Raises :class:`EndorsementError` (``step="ek-certificate"``) naming the certificate
    and the reason when no chain passes; with several candidate chains, the failure of
    the one that went furthest is reported.
    """
    when = _utc(at)
    trusted = list(roots)
    pool = [*trusted, *intermediates]
    best: tuple[int, str, str] | None = None

    def fail(depth: int, reason: str, message: str) -> None:
        nonlocal best
        if best is None or depth > best[0]:
            best = (depth, reason, message)

    def extend(chain: list[x509.Certificate]) -> list[x509.Certificate] | None:
        current = chain[-1]
        depth = len(chain)
        problem = _validity_problem(current, when)
        if problem is not None:
            fail(depth, *problem)
            return None
        if current in trusted:
            return chain
        if depth >= MAX_CHAIN_LENGTH:
            fail(
                depth,
                "too-long",
                f"no trusted root within {MAX_CHAIN_LENGTH} certificates "
                f"(the chain reached {_describe(current)})",
            )
            return None
        candidates = [c for c in pool if c.subject == current.issuer and c not in chain]
        if not candidates:
            fail(
                depth,
                "no-issuer",
                f"no issuer found for {_describe(current)} among the trusted roots and "
                f"intermediates (issuer '{_rfc4514(current.issuer)}')",
            )
            return None
        for candidate in candidates:
            try:
                current.verify_directly_issued_by(candidate)
            except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as e:
                detail = str(e) or "the signature does not verify"
                fail(
                    depth,
                    "signature",
                    f"{_describe(current)} is not signed by {_describe(candidate)}: {detail}",
                )
                continue
            problem = _issuer_problem(candidate, depth - 1)
            if problem is not None:
                fail(depth + 1, *problem)
                continue
            found = extend([*chain, candidate])
            if found is not None:
                return found
        return None

    try:
        chain = extend([cert])
    except (ValueError, TypeError) as e:  # a name or validity field that does not decode
        raise EndorsementError(
            f"a certificate of the chain does not decode: {e}",
            step="ek-certificate",
            reason="malformed",
        ) from e
    if chain is not None:
        return chain
    assert best is not None
    _, reason, message = best
    raise EndorsementError(message, step="ek-certificate", reason=reason)


# --- EK and AK public areas --------------------------------------------------------------------


def _attribute_names(bits: int) -> str:
    return ", ".join(name for bit, name in _ATTRIBUTE_NAMES if bits & bit)


def _spki(key: object) -> bytes | None:
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return None
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_ek_public(ek: PublicArea, cert: x509.Certificate) -> None:
    """Check that ``ek`` is the key of the EK certificate ``cert`` and is shaped as an EK.

    TCG EK Credential Profile for TPM Family 2.0 (the EK templates) and TPM 2.0
    Part 2, 8.3 (TPMA_OBJECT): the public area holds the certificate's public key; its
    objectAttributes have restricted, decrypt, fixedTPM, fixedParent,
    sensitiveDataOrigin and adminWithPolicy set and sign clear; its symmetric
    algorithm is AES-128 or AES-256 in CFB mode; its scheme is NULL (Part 2,
    TPMS_RSA_PARMS and TPMS_ECC_PARMS: a restricted decryption key has none).

    Raises :class:`EndorsementError` with ``step="ek-public"``.
    """
    try:
        ek_key = ek.public_key()
    except ParseError as e:
        raise EndorsementError(
            f"the EK public area does not hold a usable key: {e}", step="ek-public", reason="key"
        ) from e
    try:
        cert_key = _spki(cert.public_key())
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise EndorsementError(
            f"the key of {_describe(cert)} does not load: {e}", step="ek-public", reason="key"
        ) from e
    if cert_key is None or not hmac.compare_digest(cert_key, _spki(ek_key) or b""):
        raise EndorsementError(
            f"the EK public area ({ek.key_type}) does not hold the key of {_describe(cert)}",
            step="ek-public",
            reason="key",
        )
    attributes = ek.object_attributes
    missing = EK_ATTRIBUTES & ~attributes
    if missing or attributes & TPMA_SIGN_ENCRYPT:
        parts = []
        if missing:
            parts.append(f"lacks {_attribute_names(missing)}")
        if attributes & TPMA_SIGN_ENCRYPT:
            parts.append("has sign set")
        raise EndorsementError(
            f"the EK (objectAttributes 0x{attributes:08x}) is not a restricted decryption "
            f"key of the EK profile: it {' and '.join(parts)}",
            step="ek-public",
            reason="attributes",
        )
    sym_alg, sym_bits, sym_mode = ek.symmetric
    if sym_alg != TPM_ALG_AES or sym_mode != TPM_ALG_CFB or sym_bits not in _AES_KEY_BITS:
        raise EndorsementError(
            f"the EK's symmetric algorithm is {_symmetric_name(ek.symmetric)}, not AES-128 "
            "or AES-256 in CFB mode",
            step="ek-public",
            reason="symmetric",
        )
    if ek.scheme != TPM_ALG_NULL:
        raise EndorsementError(
            f"the EK has scheme 0x{ek.scheme:04x}; a restricted decryption key has NULL",
            step="ek-public",
            reason="scheme",
        )


def check_ak_public(ak: PublicArea) -> None:
    """Check that ``ak`` is an attestation key: a restricted signing key bound to its TPM.

    TPM 2.0 Part 1 (restricted signing keys) and Part 2, 8.3 (TPMA_OBJECT): restricted,
    sign, fixedTPM, fixedParent and sensitiveDataOrigin set, decrypt clear (a
    restricted signing key refuses to sign external data that starts with
    TPM_GENERATED_VALUE, so it cannot be made to sign a forged quote); a signing
    scheme of the key's type (RSASSA or RSAPSS; ECDSA, ECDAA, SM2 or ECSchnorr) with a
    known hash; a nameAlg cima knows (the AK's name binds the credential); a public key
    that loads.

    Raises :class:`EndorsementError` with ``step="ak-public"``.
    """
    attributes = ak.object_attributes
    missing = _AK_REQUIRED & ~attributes
    if missing or attributes & TPMA_DECRYPT:
        parts = []
        if missing:
            parts.append(f"lacks {_attribute_names(missing)}")
        if attributes & TPMA_DECRYPT:
            parts.append("has decrypt set")
        raise EndorsementError(
            f"the AK (objectAttributes 0x{attributes:08x}) is not a restricted signing key "
            f"bound to its TPM: it {' and '.join(parts)}",
            step="ak-public",
            reason="attributes",
        )
    schemes = _RSA_SCHEMES if ak.type == TPM_ALG_RSA else _ECC_SCHEMES
    if ak.scheme not in schemes:
        scheme = "NULL" if ak.scheme == TPM_ALG_NULL else SIGNATURE_SCHEMES.get(ak.scheme)
        raise EndorsementError(
            f"the {ak.key_type} AK has scheme {scheme or f'0x{ak.scheme:04x}'}, not a "
            f"signing scheme for {ak.key_type} keys",
            step="ak-public",
            reason="scheme",
        )
    if not is_known_id(ak.scheme_hash):
        raise EndorsementError(
            f"the AK's signing hash 0x{ak.scheme_hash:04x} is not a known hash",
            step="ak-public",
            reason="scheme",
        )
    if not is_known_id(ak.name_alg):
        raise EndorsementError(
            f"the AK's nameAlg 0x{ak.name_alg:04x} is not a known hash",
            step="ak-public",
            reason="attributes",
        )
    try:
        ak.public_key()
    except ParseError as e:
        raise EndorsementError(
            f"the AK public area does not hold a usable key: {e}", step="ak-public", reason="key"
        ) from e
