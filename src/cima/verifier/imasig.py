"""IMA file signatures: the ``security.ima`` digital signature, version 2, and its keys.

An ``ima-sig`` (or ``ima-modsig``) entry's ``sig`` field holds the file's
``security.ima`` extended attribute when that attribute is a signature
(Linux ``security/integrity/ima/ima_template_lib.c``, ``ima_eventsig_init``).
Its layout (``security/integrity/integrity.h``, ``struct signature_v2_hdr``, and
ima-evm-utils ``src/imaevm.h``), every integer big-endian::

    u8     type          0x03 EVM_IMA_XATTR_DIGSIG
    u8     version       2 (DIGSIG_VERSION_2)
    u8     hash_algo     the kernel's HASH_ALGO_* number (include/uapi/linux/hash_info.h)
    be32   keyid         the last 4 bytes of the signing key's identifier
    be16   sig_size      bytes of signature that follow
    u8[]   signature     RSA PKCS#1 v1.5 over the digest (DigestInfo), or a DER ECDSA-Sig-Value

The signature covers the file digest itself (``evmctl ima_sign`` signs the
digest it computed; the kernel verifies with ``asymmetric_verify`` over the
digest IMA collected), so a verifier checks it against the entry's ``d-ng``
digest, which must use the signature's hash algorithm.

Key identifiers. ``evmctl`` (``libimaevm.c``, ``calc_keyid_v2``) takes the SHA-1 of
the key's public-key bit string (the ``subjectPublicKey`` of its
SubjectPublicKeyInfo: the DER RSAPublicKey for RSA, the point for EC) and keeps
its last 4 bytes; ``evmctl --keyid-from-cert`` uses the last 4 bytes of the
certificate's Subject Key Identifier instead. The kernel finds the key with a
partial match (``crypto/asymmetric_keys/asymmetric_type.c``,
``asymmetric_key_id_partial``): the 4 bytes must equal the tail of one of the
certificate's key identifiers, ``id[0]`` = raw serial number || issuer Name DER
and ``id[1]`` = the Subject Key Identifier. A :class:`TrustedKey` answers to
each of those ids, and verification tries every key that answers.

Version 3 signatures (``security/integrity/ima/ima_appraise.c``, ``xattr_verify``
and ``calc_file_id_hash``) are fs-verity signatures: xattr type 0x06
``IMA_VERITY_DIGSIG``, version 3, over the hash of a ``struct ima_file_id``::

    u8     hash_type       0x06 IMA_VERITY_DIGSIG
    u8     hash_algorithm  the fs-verity digest's HASH_ALGO_* number
    u8[]   hash            the fs-verity digest (its length, not HASH_MAX_DIGESTSIZE)

hashed with the digest's own algorithm. Such a digest reaches the log only in
a ``d-ngv2`` field typed ``verity`` (templates ``ima-ngv2``, ``ima-sigv2``): a
version 3 signature beside any other digest does not verify, nor does a version
3 signature in a 0x03 xattr (the kernel's ``invalid-signature-version``).

When the file has no IMA signature, the kernel writes the file's EVM portable
signature (xattr type 0x05, ``EVM_XATTR_PORTABLE_DIGSIG``) in the ``sig`` field
instead (``ima_eventsig_init``). It signs the file's metadata (other xattrs,
owner, mode), which the log does not hold: it is reported as not verifiable
(:class:`IMASignatureUnsupportedError`), never as a bad signature.

The appended PKCS#7 signature of ``ima-modsig`` is :mod:`cima.verifier.modsig`'s.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from cima.errors import ParseError, SignatureError

__all__ = [
    "DIGSIG_VERSION_2",
    "DIGSIG_VERSION_3",
    "EVM_IMA_XATTR_DIGSIG",
    "EVM_XATTR_PORTABLE_DIGSIG",
    "IMA_VERITY_DIGSIG",
    "HASH_ALGO",
    "HASH_ALGO_BY_NAME",
    "IMASignature",
    "IMASignatureError",
    "IMASignatureParseError",
    "IMASignatureUnsupportedError",
    "KeyRing",
    "TrustedKey",
    "UnknownKeyError",
    "file_id_hash",
    "key_id_v2",
    "sign_digest",
]

EVM_IMA_XATTR_DIGSIG = 0x03
EVM_XATTR_PORTABLE_DIGSIG = 0x05
IMA_VERITY_DIGSIG = 0x06
DIGSIG_VERSION_2 = 2
DIGSIG_VERSION_3 = 3

#: The kernel's hash algorithm numbers (include/uapi/linux/hash_info.h).
HASH_ALGO: Mapping[int, str] = {
    0: "md4",
    1: "md5",
    2: "sha1",
    3: "rmd160",
    4: "sha256",
    5: "sha384",
    6: "sha512",
    7: "sha224",
    8: "rmd128",
    9: "rmd256",
    10: "rmd320",
    11: "wp256",
    12: "wp384",
    13: "wp512",
    14: "tgr128",
    15: "tgr160",
    16: "tgr192",
    17: "sm3_256",
    18: "streebog256",
    19: "streebog512",
    20: "sha3_256",
    21: "sha3_384",
    22: "sha3_512",
}
HASH_ALGO_BY_NAME: Mapping[str, int] = {v: k for k, v in HASH_ALGO.items()}

#: The kernel's own spellings (``hash_algo_name``, the ``d-ng`` prefix) of the names above.
_KERNEL_NAMES: Mapping[str, str] = {
    "sm3": "sm3_256",
    "sha3-256": "sha3_256",
    "sha3-384": "sha3_384",
    "sha3-512": "sha3_512",
}

#: The hashes a signature can be checked with (what ``cryptography`` offers).
_HASHES: Mapping[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
    "sha3_256": hashes.SHA3_256,
    "sha3_384": hashes.SHA3_384,
    "sha3_512": hashes.SHA3_512,
    "sm3_256": hashes.SM3,
}

_HEADER = struct.Struct(">BBB4sH")  # type, version, hash_algo, keyid, sig_size

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class IMASignatureError(SignatureError):
    """A file signature does not verify with any trusted key."""


class UnknownKeyError(IMASignatureError):
    """No trusted key answers to the signature's key id."""


class IMASignatureUnsupportedError(IMASignatureError):
    """A signature this module cannot verify (an EVM portable signature, an unknown hash)."""


class IMASignatureParseError(ParseError):
    """The ``sig`` field is not a well-formed IMA signature."""


@dataclass(frozen=True, slots=True)
class IMASignature:
    """A decoded ``security.ima`` signature (type 0x03 or 0x06, version 2 or 3)."""

    version: int
    hash_algo: int
    key_id: bytes
    signature: bytes
    type: int = EVM_IMA_XATTR_DIGSIG

    @property
    def hash_name(self) -> str:
        """The kernel's name of the hash (``sha256``), ``hash_algo_N`` for a number it lacks."""
        return HASH_ALGO.get(self.hash_algo, f"hash_algo_{self.hash_algo}")

    @property
    def key_id_hex(self) -> str:
        return self.key_id.hex()

    @classmethod
    def from_bytes(cls, data: bytes) -> IMASignature:
        """Decode the xattr value (type byte included); sig_size must account for every byte."""
        data = bytes(data)
        if len(data) < _HEADER.size:
            raise IMASignatureParseError(
                f"an IMA signature needs a {_HEADER.size}-byte header, {len(data)} bytes given",
                offset=0,
            )
        kind, version, algo, key_id, size = _HEADER.unpack_from(data, 0)
        if kind == EVM_XATTR_PORTABLE_DIGSIG:
            raise IMASignatureUnsupportedError(
                "an EVM portable signature (xattr type 0x05) signs the file's metadata, "
                "which the log does not carry: it cannot be verified from the log"
            )
        if kind not in (EVM_IMA_XATTR_DIGSIG, IMA_VERITY_DIGSIG):
            raise IMASignatureParseError(
                f"xattr type 0x{kind:02x} is not a digital signature "
                f"(EVM_IMA_XATTR_DIGSIG, 0x{EVM_IMA_XATTR_DIGSIG:02x}, or IMA_VERITY_DIGSIG, "
                f"0x{IMA_VERITY_DIGSIG:02x})",
                offset=0,
            )
        if version not in (DIGSIG_VERSION_2, DIGSIG_VERSION_3):
            raise IMASignatureParseError(
                f"signature version {version} is not 2 or 3 (version 1 is the obsolete "
                "RSA-only format)",
                offset=1,
            )
        left = len(data) - _HEADER.size
        if size != left:
            raise IMASignatureParseError(
                f"sig_size says {size} bytes of signature, {left} follow the header", offset=7
            )
        if size == 0:
            raise IMASignatureParseError("the signature is empty", offset=7)
        return cls(version, algo, key_id, data[_HEADER.size :], kind)

    def to_bytes(self) -> bytes:
        return (
            _HEADER.pack(self.type, self.version, self.hash_algo, self.key_id, len(self.signature))
            + self.signature
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "hash_algorithm": self.hash_name,
            "key_id": self.key_id_hex,
            "signature_size": len(self.signature),
        }


# -- keys -----------------------------------------------------------------------------------------


def _public_key_bits(key: PublicKey) -> bytes:
    """The subjectPublicKey BIT STRING content of ``key``'s SubjectPublicKeyInfo."""
    if isinstance(key, rsa.RSAPublicKey):
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def key_id_v2(key: PublicKey) -> bytes:
    """The 4-byte key id ``evmctl`` writes (``calc_keyid_v2``): SHA-1(public key bits)[16:20]."""
    return hashlib.sha1(_public_key_bits(key), usedforsecurity=False).digest()[16:20]


def _der_integer_content(value: int) -> bytes:
    """The content octets of a DER INTEGER (two's complement, minimal)."""
    if value >= 0:
        return value.to_bytes(value.bit_length() // 8 + 1, "big")
    size = (value + 1).bit_length() // 8 + 1
    return value.to_bytes(size, "big", signed=True)


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """A key trusted to sign files, with every 4-byte id a signature may name it by."""

    public_key: PublicKey
    key_ids: frozenset[bytes]
    name: str
    certificate: x509.Certificate | None = field(default=None, compare=False)

    @classmethod
    def from_public_key(cls, key: PublicKey, name: str = "") -> TrustedKey:
        kid = key_id_v2(key)
        return cls(key, frozenset({kid}), name or f"key {kid.hex()}")

    @classmethod
    def from_certificate(cls, cert: x509.Certificate, name: str = "") -> TrustedKey:
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise IMASignatureParseError(
                f"the certificate's key is a {type(key).__name__}, not RSA or EC"
            )
        ids = {key_id_v2(key)}
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            if len(ski.digest) >= 4:
                ids.add(ski.digest[-4:])
        except x509.ExtensionNotFound:
            pass
        # The kernel's id[0]: raw serial number || issuer Name (DER), matched by its tail.
        raw = _der_integer_content(cert.serial_number) + cert.issuer.public_bytes()
        ids.add(raw[-4:])
        subject = cert.subject.rfc4514_string() or "certificate"
        return cls(key, frozenset(ids), name or subject, cert)

    @classmethod
    def from_pem(cls, data: bytes | str, name: str = "") -> TrustedKey:
        """A PEM (or DER) X.509 certificate or SubjectPublicKeyInfo public key."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        stripped = raw.lstrip()
        try:
            if stripped.startswith(b"-----BEGIN CERTIFICATE-----"):
                return cls.from_certificate(x509.load_pem_x509_certificate(stripped), name)
            if stripped.startswith(b"-----BEGIN"):
                key = serialization.load_pem_public_key(stripped)
            else:
                try:
                    return cls.from_certificate(x509.load_der_x509_certificate(raw), name)
                except ValueError:
                    key = serialization.load_der_public_key(raw)
        except (ValueError, UnsupportedAlgorithm) as e:
            raise IMASignatureParseError(
                f"not a certificate or public key (PEM or DER): {e}"
            ) from None
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise IMASignatureParseError(f"the key is a {type(key).__name__}, not RSA or EC")
        return cls.from_public_key(key, name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "key_ids": sorted(k.hex() for k in self.key_ids)}


def _verify_with(
    key: PublicKey, sig: IMASignature, digest: bytes, alg: hashes.HashAlgorithm
) -> None:
    """Raise InvalidSignature unless ``sig`` is ``key``'s signature over ``digest``."""
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(sig.signature, digest, padding.PKCS1v15(), Prehashed(alg))
    else:
        key.verify(sig.signature, digest, ec.ECDSA(Prehashed(alg)))


class KeyRing:
    """Trusted file-signing keys, looked up by key id as the kernel does."""

    def __init__(self, keys: Iterable[TrustedKey] = ()) -> None:
        self._keys: list[TrustedKey] = []
        self._by_id: dict[bytes, list[TrustedKey]] = {}
        for k in keys:
            self.add(k)

    @classmethod
    def from_pems(cls, pems: Sequence[bytes | str]) -> KeyRing:
        return cls(TrustedKey.from_pem(p) for p in pems)

    def add(self, key: TrustedKey) -> None:
        self._keys.append(key)
        for kid in key.key_ids:
            self._by_id.setdefault(kid, []).append(key)

    def __len__(self) -> int:
        return len(self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    @property
    def keys(self) -> tuple[TrustedKey, ...]:
        return tuple(self._keys)

    def candidates(self, key_id: bytes) -> list[TrustedKey]:
        return list(self._by_id.get(bytes(key_id), ()))

    def verify(
        self,
        signature: IMASignature | bytes,
        digest: bytes,
        digest_algorithm: str | None = None,
        *,
        digest_type: str | None = None,
    ) -> TrustedKey:
        """Return the trusted key whose signature over ``digest`` this is; raise otherwise.

        ``digest_algorithm`` is the algorithm of the measured digest (the entry's
        ``d-ng`` prefix): it must be the signature's hash algorithm.
        ``digest_type`` is a ``d-ngv2`` digest's type (``ima`` or ``verity``; None
        for the other digest fields): a version 3 signature needs ``verity``.
        """
        sig = (
            signature if isinstance(signature, IMASignature) else IMASignature.from_bytes(signature)
        )
        if sig.type == IMA_VERITY_DIGSIG and sig.version != DIGSIG_VERSION_3:
            raise IMASignatureError(
                f"an fs-verity signature (xattr type 0x06) must be version 3, this one is "
                f"version {sig.version}"
            )
        if sig.type == EVM_IMA_XATTR_DIGSIG and sig.version != DIGSIG_VERSION_2:
            raise IMASignatureError(
                f"a version {sig.version} signature in an EVM_IMA_XATTR_DIGSIG (0x03) xattr: "
                "the kernel refuses it (invalid-signature-version)"
            )
        if sig.version == DIGSIG_VERSION_3 and digest_type != "verity":
            shown = f"a {digest_type!r} digest" if digest_type else "not typed as fs-verity"
            raise IMASignatureError(
                "a version 3 signature covers an fs-verity digest (a d-ngv2 field typed "
                f"'verity'); the measured digest is {shown}"
            )
        name = sig.hash_name
        hash_cls = _HASHES.get(name)
        if hash_cls is None:
            raise IMASignatureUnsupportedError(f"signature hash {name} cannot be verified here")
        alg = hash_cls()
        if digest_algorithm is not None:
            digest_algorithm = _KERNEL_NAMES.get(digest_algorithm, digest_algorithm)
        if digest_algorithm is not None and digest_algorithm != name:
            raise IMASignatureError(
                f"the signature is over a {name} digest but the measured digest is "
                f"{digest_algorithm}"
            )
        if len(digest) != alg.digest_size:
            raise IMASignatureError(
                f"a {name} digest is {alg.digest_size} bytes, the measured digest is {len(digest)}"
            )
        if sig.version == DIGSIG_VERSION_3:
            digest = file_id_hash(digest, name)
        keys = self.candidates(sig.key_id)
        if not keys:
            raise UnknownKeyError(f"no trusted key has key id {sig.key_id_hex}")
        for key in keys:
            try:
                _verify_with(key.public_key, sig, digest, alg)
            except (InvalidSignature, ValueError, UnsupportedAlgorithm):
                continue
            return key
        names = ", ".join(k.name for k in keys)
        raise IMASignatureError(
            f"the {name} signature with key id {sig.key_id_hex} does not verify with the "
            f"trusted key{'s' if len(keys) > 1 else ''} {names}"
        )


def file_id_hash(digest: bytes, hash_algorithm: str) -> bytes:
    """What a version 3 signature signs: the hash of the ``ima_file_id`` of an fs-verity digest.

    ``hash_type`` IMA_VERITY_DIGSIG, ``hash_algorithm`` the digest's HASH_ALGO_*
    number, then the digest, hashed with the digest's algorithm (the kernel's
    ``calc_file_id_hash``).
    """
    name = hash_algorithm.lower().replace("-", "")
    hash_cls = _HASHES.get(name)
    if hash_cls is None or name not in HASH_ALGO_BY_NAME:
        raise IMASignatureUnsupportedError(f"signature hash {hash_algorithm} cannot be used here")
    h = hashes.Hash(hash_cls())
    h.update(bytes((IMA_VERITY_DIGSIG, HASH_ALGO_BY_NAME[name])) + bytes(digest))
    return h.finalize()


def sign_digest(
    private_key: PrivateKey,
    digest: bytes,
    hash_algorithm: str,
    *,
    key_id: bytes | None = None,
    version: int = DIGSIG_VERSION_2,
) -> bytes:
    """The ``security.ima`` value ``evmctl`` writes for a file with ``digest``.

    Version 2 (``evmctl ima_sign``) signs the file digest; version 3 (an fs-verity
    signature, xattr type 0x06) signs :func:`file_id_hash` of the fs-verity
    digest. RSA keys sign with PKCS#1 v1.5, EC keys with ECDSA (DER); the key id
    is :func:`key_id_v2` of the public key unless ``key_id`` is given.
    """
    name = hash_algorithm.lower().replace("-", "")
    hash_cls = _HASHES.get(name)
    if hash_cls is None or name not in HASH_ALGO_BY_NAME:
        raise IMASignatureUnsupportedError(f"cannot sign with hash {hash_algorithm}")
    if version not in (DIGSIG_VERSION_2, DIGSIG_VERSION_3):
        raise ValueError(f"signature version {version} is not 2 or 3")
    alg = hash_cls()
    if len(digest) != alg.digest_size:
        raise ValueError(f"a {name} digest is {alg.digest_size} bytes, got {len(digest)}")
    signed = digest if version == DIGSIG_VERSION_2 else file_id_hash(digest, name)
    if isinstance(private_key, rsa.RSAPrivateKey):
        value = private_key.sign(signed, padding.PKCS1v15(), Prehashed(alg))
    else:
        value = private_key.sign(signed, ec.ECDSA(Prehashed(alg)))
    kid = key_id_v2(private_key.public_key()) if key_id is None else bytes(key_id)
    if len(kid) != 4:
        raise ValueError("a key id is 4 bytes")
    kind = EVM_IMA_XATTR_DIGSIG if version == DIGSIG_VERSION_2 else IMA_VERITY_DIGSIG
    return IMASignature(version, HASH_ALGO_BY_NAME[name], kid, value, kind).to_bytes()
