"""Batched reports: a Merkle tree over the bindings of concurrent report requests.

A hardware quote is slow (tens of milliseconds on a TPM) and serialised. When
several callers ask for a report at once, the agent takes one quote for all of
them (DESIGN.md section 4): each request's *binding* (the bytes its report must
bind: ``nonce || user_data`` for the node scope,
``H(container_register || nonce || user_data)`` for a container) is a leaf of a
Merkle tree, the quote binds the tree's root, and each caller receives the
quote with its *inclusion proof*, the audit path from its leaf to the root.

The tree is the Merkle Hash Tree of RFC 6962 (Certificate Transparency),
section 2.1, with hash H the quote's hash algorithm:

- leaf hash:  ``H(0x00 || leaf)``, the leaf being the binding bytes;
- node hash:  ``H(0x01 || left || right)``;
- a tree of n > 1 leaves splits at k, the largest power of two below n:
  ``MTH(D[0:n]) = H(0x01 || MTH(D[0:k]) || MTH(D[k:n]))``.

The one-byte prefixes separate the two domains, so that no leaf can be taken
for an inner node (second-preimage attacks on the tree). The audit path is that
of RFC 6962 section 2.1.1, from the leaf's sibling up to the root's child, and
it is verified as RFC 9162 section 2.1.3.2 describes.

How the quote binds the root: the report is requested with the root as its
nonce and no user data, so each platform's own convention applies unchanged
(:mod:`cima.evidence.reportdata`): a TPM quote's qualifyingData is
``H_sig(root)`` (H_sig the AK's signing hash) and a TDX quote's REPORTDATA is
``SHA-512(root)``. A verifier thus checks, in order: the leaf is the binding it
expects; the proof leads from the leaf to the root; the report binds the root.

Nothing here does I/O; :func:`verify_inclusion` raises, it never returns a bool.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cima.digests import HashAlgorithm, by_name
from cima.errors import AlgorithmError, FreshnessError, ParseError

__all__ = [
    "LEAF_PREFIX",
    "MAX_LEAVES",
    "NODE_PREFIX",
    "InclusionProof",
    "InclusionProofError",
    "MerkleTree",
    "leaf_hash",
    "merkle_root",
    "node_hash",
    "verify_inclusion",
]

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
#: Largest tree a proof may describe (a batch never comes near it; it bounds hostile input).
MAX_LEAVES = 1 << 32
#: A proof of a tree of at most MAX_LEAVES leaves has at most this many hashes.
MAX_PATH = 32


class InclusionProofError(FreshnessError):
    """An inclusion proof does not lead from the leaf to the root the report binds."""


def _alg(algorithm: str | HashAlgorithm) -> HashAlgorithm:
    return algorithm if isinstance(algorithm, HashAlgorithm) else by_name(algorithm)


def leaf_hash(leaf: bytes, algorithm: str | HashAlgorithm) -> bytes:
    """``H(0x00 || leaf)``."""
    return _alg(algorithm).hash(LEAF_PREFIX + bytes(leaf))


def node_hash(left: bytes, right: bytes, algorithm: str | HashAlgorithm) -> bytes:
    """``H(0x01 || left || right)``."""
    return _alg(algorithm).hash(NODE_PREFIX + bytes(left) + bytes(right))


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def _subtree(hashes: Sequence[bytes], alg: HashAlgorithm) -> bytes:
    n = len(hashes)
    if n == 1:
        return hashes[0]
    k = _split(n)
    return node_hash(_subtree(hashes[:k], alg), _subtree(hashes[k:], alg), alg)


def merkle_root(leaves: Sequence[bytes], algorithm: str | HashAlgorithm) -> bytes:
    """The root of the tree over ``leaves`` (at least one)."""
    return MerkleTree(leaves, algorithm).root


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """Where one leaf sits in a tree and the hashes that lead from it to the root."""

    algorithm: str
    leaf_index: int
    tree_size: int
    path: tuple[bytes, ...]

    def __post_init__(self) -> None:
        size = by_name(self.algorithm).digest_size
        if not 0 < self.tree_size <= MAX_LEAVES:
            raise ValueError(f"tree size {self.tree_size} out of range 1..{MAX_LEAVES}")
        if not 0 <= self.leaf_index < self.tree_size:
            raise ValueError(f"leaf index {self.leaf_index} outside a tree of {self.tree_size}")
        if len(self.path) > MAX_PATH:
            raise ValueError(f"a path of {len(self.path)} hashes is longer than any tree's")
        for i, h in enumerate(self.path):
            if len(h) != size:
                raise ValueError(f"path[{i}] is {len(h)} bytes, {self.algorithm} needs {size}")

    def root_from(self, leaf: bytes) -> bytes:
        """The root this proof leads to from ``leaf`` (RFC 9162 section 2.1.3.2).

        Raises :class:`InclusionProofError` when the path's length does not fit
        the leaf's position in a tree of ``tree_size`` leaves.
        """
        alg = by_name(self.algorithm)
        fn, sn = self.leaf_index, self.tree_size - 1
        r = leaf_hash(leaf, alg)
        for p in self.path:
            if sn == 0:
                raise InclusionProofError(
                    f"inclusion proof: {len(self.path)} hashes is too many for leaf "
                    f"{self.leaf_index} of a tree of {self.tree_size}"
                )
            if fn & 1 or fn == sn:
                r = node_hash(p, r, alg)
                if not fn & 1:
                    while fn and not fn & 1:
                        fn >>= 1
                        sn >>= 1
            else:
                r = node_hash(r, p, alg)
            fn >>= 1
            sn >>= 1
        if sn != 0:
            raise InclusionProofError(
                f"inclusion proof: {len(self.path)} hashes is too few for leaf "
                f"{self.leaf_index} of a tree of {self.tree_size}"
            )
        return r

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "leaf_index": self.leaf_index,
            "tree_size": self.tree_size,
            "path": [h.hex() for h in self.path],
        }

    @classmethod
    def from_dict(cls, obj: object, *, where: str = "batch") -> InclusionProof:
        """Decode :meth:`to_dict`'s form; a :class:`ParseError` names the bad field."""
        if not isinstance(obj, Mapping):
            raise ParseError(f"{where}: must be an object")
        expected = {"algorithm", "leaf_index", "tree_size", "path"}
        for key in obj:
            if key not in expected:
                raise ParseError(f"{where}.{key}: unknown field")
        for key in sorted(expected):
            if key not in obj:
                raise ParseError(f"{where}.{key}: missing")
        algorithm = obj["algorithm"]
        if not isinstance(algorithm, str):
            raise ParseError(f"{where}.algorithm: must be a string")
        try:
            alg = by_name(algorithm)
        except AlgorithmError as e:
            raise ParseError(f"{where}.algorithm: {e}") from None
        ints: dict[str, int] = {}
        for key in ("leaf_index", "tree_size"):
            value = obj[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ParseError(f"{where}.{key}: must be a non-negative integer")
            ints[key] = value
        raw_path = obj["path"]
        if not isinstance(raw_path, list):
            raise ParseError(f"{where}.path: must be a list of hex strings")
        if len(raw_path) > MAX_PATH:
            raise ParseError(f"{where}.path: {len(raw_path)} hashes, at most {MAX_PATH}")
        path: list[bytes] = []
        for i, h in enumerate(raw_path):
            if not isinstance(h, str):
                raise ParseError(f"{where}.path[{i}]: must be a hex string")
            try:
                value = bytes.fromhex(h)
            except ValueError:
                raise ParseError(f"{where}.path[{i}]: not hex") from None
            if len(value) != alg.digest_size:
                raise ParseError(
                    f"{where}.path[{i}]: {len(value)} bytes, {alg.name} needs {alg.digest_size}"
                )
            path.append(value)
        try:
            return cls(alg.name, ints["leaf_index"], ints["tree_size"], tuple(path))
        except ValueError as e:
            raise ParseError(f"{where}: {e}") from None


def verify_inclusion(leaf: bytes, proof: InclusionProof, root: bytes) -> None:
    """Raise :class:`InclusionProofError` unless ``proof`` leads from ``leaf`` to ``root``."""
    computed = proof.root_from(leaf)
    if not hmac.compare_digest(computed, bytes(root)):
        raise InclusionProofError(
            f"inclusion proof: leaf {proof.leaf_index} of {proof.tree_size} leads to root "
            f"{computed.hex()}, not {bytes(root).hex()}"
        )


class MerkleTree:
    """The tree over ``leaves`` (the bindings, in the order the requests were taken)."""

    def __init__(self, leaves: Sequence[bytes], algorithm: str | HashAlgorithm) -> None:
        if not leaves:
            raise ValueError("a batch tree needs at least one leaf")
        if len(leaves) > MAX_LEAVES:
            raise ValueError(f"a batch tree holds at most {MAX_LEAVES} leaves")
        self.algorithm = _alg(algorithm)
        self.leaves = tuple(bytes(x) for x in leaves)
        # levels[0] = leaf hashes; each level above pairs neighbours, carrying a
        # lone last node up unchanged. That is exactly RFC 6962's split at the
        # largest power of two (the left subtrees are always complete).
        level = [leaf_hash(x, self.algorithm) for x in self.leaves]
        self._levels: list[list[bytes]] = [level]
        while len(level) > 1:
            nxt = [
                node_hash(level[i], level[i + 1], self.algorithm)
                for i in range(0, len(level) - 1, 2)
            ]
            if len(level) % 2:
                nxt.append(level[-1])
            self._levels.append(nxt)
            level = nxt

    def __len__(self) -> int:
        return len(self.leaves)

    @property
    def root(self) -> bytes:
        return self._levels[-1][0]

    def proof(self, index: int) -> InclusionProof:
        """The audit path of leaf ``index`` (RFC 6962 section 2.1.1)."""
        n = len(self.leaves)
        if not 0 <= index < n:
            raise IndexError(f"leaf {index} outside a tree of {n}")
        path: list[bytes] = []
        i = index
        for level in self._levels[:-1]:
            sibling = i ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            i >>= 1
        return InclusionProof(self.algorithm.name, index, n, tuple(path))
