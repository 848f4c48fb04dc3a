"""The batch Merkle tree (cima.evidence.batch) against RFC 6962 and its reference vectors."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cima.errors import FreshnessError, ParseError
from cima.evidence.batch import (
    InclusionProof,
    InclusionProofError,
    MerkleTree,
    leaf_hash,
    merkle_root,
    node_hash,
    verify_inclusion,
)

# The test inputs and expected values of the Certificate Transparency reference
# implementation (certificate-transparency, cpp/merkletree/merkle_tree_test.cc;
# the same constants are in google/trillian's testonly/constants.go): SHA-256.
CT_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_PATHS = [
    (0, 8, [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]),
    (5, 8, [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (0, 1, []),
]  # fmt: skip


# -- an independent RFC 6962 (section 2.1) implementation, recursive as the text ---------------


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def ref_mth(d: list[bytes]) -> bytes:
    if len(d) == 1:
        return _h(b"\x00" + d[0])
    k = 1
    while k * 2 < len(d):
        k *= 2
    return _h(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:]))


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = 1
    while k * 2 < len(d):
        k *= 2
    if m < k:
        return [*ref_path(m, d[:k]), ref_mth(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_mth(d[:k])]


@pytest.mark.parametrize("size", range(1, 9))
def test_roots_are_the_ct_reference_roots(size: int) -> None:
    assert merkle_root(CT_LEAVES[:size], "sha256").hex() == CT_ROOTS[size - 1]


@pytest.mark.parametrize(("index", "size", "path"), CT_PATHS)
def test_audit_paths_are_the_ct_reference_paths(index: int, size: int, path: list[str]) -> None:
    tree = MerkleTree(CT_LEAVES[:size], "sha256")
    proof = tree.proof(index)
    assert [p.hex() for p in proof.path] == path
    verify_inclusion(CT_LEAVES[index], proof, bytes.fromhex(CT_ROOTS[size - 1]))


def test_every_leaf_of_every_small_tree_matches_the_recursive_definition() -> None:
    for n in range(1, 41):
        leaves = [bytes([i]) * (i % 5) + i.to_bytes(2, "big") for i in range(n)]
        tree = MerkleTree(leaves, "sha256")
        assert tree.root == ref_mth(leaves)
        for m in range(n):
            proof = tree.proof(m)
            assert list(proof.path) == ref_path(m, leaves), (n, m)
            verify_inclusion(leaves[m], proof, tree.root)


def test_domain_separation() -> None:
    # A leaf is H(0x00 || data), an inner node H(0x01 || l || r): an inner node's
    # children, concatenated, are not a leaf with the same hash.
    a, b = leaf_hash(b"a", "sha256"), leaf_hash(b"b", "sha256")
    assert node_hash(a, b, "sha256") == _h(b"\x01" + a + b)
    assert leaf_hash(a + b, "sha256") != node_hash(a, b, "sha256")
    tree = MerkleTree([b"a", b"b"], "sha256")
    fake = InclusionProof("sha256", 0, 1, ())
    with pytest.raises(InclusionProofError):
        verify_inclusion(a + b, fake, tree.root)


@pytest.mark.parametrize("algorithm", ["sha256", "sha384", "sha512"])
def test_the_tree_uses_the_quote_hash(algorithm: str) -> None:
    tree = MerkleTree([b"x", b"y", b"z"], algorithm)
    assert len(tree.root) == hashlib.new(algorithm).digest_size
    h = lambda data: hashlib.new(algorithm, data).digest()  # noqa: E731
    left = h(b"\x01" + h(b"\x00x") + h(b"\x00y"))
    assert tree.root == h(b"\x01" + left + h(b"\x00z"))
    verify_inclusion(b"z", tree.proof(2), tree.root)


# -- bad proofs: one assertion each ------------------------------------------------------------

TREE = MerkleTree(CT_LEAVES[:7], "sha256")
GOOD = TREE.proof(3)


def _with(**changes: object) -> InclusionProof:
    fields = {
        "algorithm": GOOD.algorithm,
        "leaf_index": GOOD.leaf_index,
        "tree_size": GOOD.tree_size,
        "path": GOOD.path,
    }
    fields.update(changes)
    return InclusionProof(**fields)  # type: ignore[arg-type]


BAD_PROOFS = {
    "other leaf": (CT_LEAVES[4], GOOD),
    "other index": (CT_LEAVES[3], _with(leaf_index=2)),
    "smaller tree": (CT_LEAVES[3], _with(tree_size=4)),
    "larger tree": (CT_LEAVES[3], _with(tree_size=9)),
    "path too short": (CT_LEAVES[3], _with(path=GOOD.path[:-1])),
    "path too long": (CT_LEAVES[3], _with(path=(*GOOD.path, GOOD.path[0]))),
    "path reordered": (CT_LEAVES[3], _with(path=tuple(reversed(GOOD.path)))),
    "path hash flipped": (CT_LEAVES[3], _with(path=(bytes(32), *GOOD.path[1:]))),
}


@pytest.mark.parametrize("name", BAD_PROOFS)
def test_bad_proof_is_refused(name: str) -> None:
    leaf, proof = BAD_PROOFS[name]
    with pytest.raises(InclusionProofError):
        verify_inclusion(leaf, proof, TREE.root)


def test_wrong_root_is_refused_as_a_freshness_error() -> None:
    with pytest.raises(FreshnessError):
        verify_inclusion(CT_LEAVES[3], GOOD, bytes(32))


def test_proof_json_round_trip() -> None:
    for i in range(7):
        proof = TREE.proof(i)
        assert InclusionProof.from_dict(proof.to_dict()) == proof


BAD_PROOF_JSON = {
    "not an object": [],
    "unknown key": {**GOOD.to_dict(), "root": "00"},
    "missing path": {k: v for k, v in GOOD.to_dict().items() if k != "path"},
    "unknown algorithm": {**GOOD.to_dict(), "algorithm": "md5"},
    "index is a string": {**GOOD.to_dict(), "leaf_index": "3"},
    "index is a bool": {**GOOD.to_dict(), "leaf_index": True},
    "negative size": {**GOOD.to_dict(), "tree_size": -1},
    "index outside the tree": {**GOOD.to_dict(), "leaf_index": 7},
    "path is a string": {**GOOD.to_dict(), "path": "00"},
    "path item not hex": {**GOOD.to_dict(), "path": ["zz"]},
    "path item short": {**GOOD.to_dict(), "path": ["00" * 31]},
    "path too long for any tree": {**GOOD.to_dict(), "path": ["00" * 32] * 33},
}


@pytest.mark.parametrize("name", BAD_PROOF_JSON)
def test_bad_proof_json_is_a_parse_error(name: str) -> None:
    with pytest.raises(ParseError):
        InclusionProof.from_dict(BAD_PROOF_JSON[name])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=70), st.data())
def test_any_tree_any_leaf(leaves: list[bytes], data: st.DataObject) -> None:
    tree = MerkleTree(leaves, "sha256")
    assert tree.root == ref_mth(leaves)
    m = data.draw(st.integers(0, len(leaves) - 1))
    verify_inclusion(leaves[m], tree.proof(m), tree.root)
    other = data.draw(st.binary(max_size=40))
    if other != leaves[m]:
        with pytest.raises(InclusionProofError):
            verify_inclusion(other, tree.proof(m), tree.root)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 300), st.integers(0, 299), st.lists(st.binary(min_size=32, max_size=32)))
def test_random_proofs_never_crash(size: int, index: int, path: list[bytes]) -> None:
    if index >= size or len(path) > 32:
        return
    proof = InclusionProof("sha256", index, size, tuple(path))
    with contextlib.suppress(InclusionProofError):
        verify_inclusion(b"leaf", proof, bytes(32))
