"""Hash algorithms: TPM_ALG_ID <-> name <-> digest size <-> hashlib.

Names are the lowercase ones the TCG and the kernel use: ``sha1``, ``sha256``,
``sha384``, ``sha512``, ``sm3_256``. SM3 is decoded everywhere (its sizes are
known) but can only be computed where the local OpenSSL provides it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cima.errors import AlgorithmError


@dataclass(frozen=True, slots=True)
class HashAlgorithm:
    """One hash algorithm as the TCG specifications number it."""

    name: str
    alg_id: int
    digest_size: int
    hashlib_name: str

    def new(self, data: bytes = b"") -> Any:
        """A fresh hashlib object for this algorithm."""
        try:
            return hashlib.new(self.hashlib_name, data)
        except ValueError as e:
            raise AlgorithmError(f"{self.name} is not available in this Python's OpenSSL") from e

    def hash(self, data: bytes) -> bytes:
        """Digest of ``data``."""
        return bytes(self.new(data).digest())

    def constructor(self) -> Callable[[bytes], Any]:
        """The fastest callable that returns a hash object, for hot loops."""
        ctor = getattr(hashlib, self.hashlib_name, None)
        if ctor is not None:
            return ctor  # type: ignore[no-any-return]
        name = self.hashlib_name
        self.new()  # raises AlgorithmError if unavailable

        def ctor_new(data: bytes = b"") -> Any:
            return hashlib.new(name, data)

        return ctor_new

    @property
    def zero(self) -> bytes:
        """The reset value of a register in this bank."""
        return bytes(self.digest_size)


SHA1 = HashAlgorithm("sha1", 0x0004, 20, "sha1")
SHA256 = HashAlgorithm("sha256", 0x000B, 32, "sha256")
SHA384 = HashAlgorithm("sha384", 0x000C, 48, "sha384")
SHA512 = HashAlgorithm("sha512", 0x000D, 64, "sha512")
SM3_256 = HashAlgorithm("sm3_256", 0x0012, 32, "sm3")

ALGORITHMS: tuple[HashAlgorithm, ...] = (SHA1, SHA256, SHA384, SHA512, SM3_256)

_BY_NAME = {a.name: a for a in ALGORITHMS}
_BY_ID = {a.alg_id: a for a in ALGORITHMS}
# Spellings seen in the wild (tpm2-tools, the kernel's IMA, CEL-JSON).
_ALIASES = {
    "sha-1": "sha1",
    "sha-256": "sha256",
    "sha-384": "sha384",
    "sha-512": "sha512",
    "sm3": "sm3_256",
}


def by_name(name: str) -> HashAlgorithm:
    """The algorithm called ``name`` (case-insensitive; ``sha-256`` and ``sha256`` alike)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return _BY_NAME[key]
    except KeyError:
        known = ", ".join(_BY_NAME)
        raise AlgorithmError(f"unknown hash algorithm {name!r} (known: {known})") from None


def by_id(alg_id: int) -> HashAlgorithm:
    """The algorithm whose TPM_ALG_ID is ``alg_id``."""
    try:
        return _BY_ID[alg_id]
    except KeyError:
        raise AlgorithmError(f"unknown TPM_ALG_ID 0x{alg_id:04x}") from None


def is_known_id(alg_id: int) -> bool:
    return alg_id in _BY_ID
