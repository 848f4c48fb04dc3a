"""EK-based trust in an attestation key: KDFs, TPM2_MakeCredential in software, EK checks.

The credential made by cima is activated by a real TPM (swtpm driven by tpm2-tools:
tpm2_createek / tpm2_createak / tpm2_activatecredential), for an RSA-2048 EK and a
NIST P-256 EK from the low-range templates, and the NIST P-384 EK of the high range
(SHA-384 names, AES-256) that swtpm_setup certifies. Decryption with a software EK
private key is written here from the specification, independently of the module.

swtpm has no resource manager: every tool run that loads contexts is followed by
``tpm2_flushcontext -t`` so that the next one does not hit TPM_RC_OBJECT_MEMORY.
"""

from __future__ import annotations

import hashlib
import hmac
import random as pyrandom
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode
from cryptography.x509.oid import NameOID

from cima.errors import AlgorithmError, ParseError, SignatureError
from cima.evidence.credential import (
    EK_ATTRIBUTES,
    MAX_CHAIN_LENGTH,
    CredentialError,
    EndorsementError,
    check_ak_public,
    check_ek_certificate,
    check_ek_public,
    kdfa,
    kdfe,
    make_credential,
)
from cima.evidence.tpm import AK_ATTRIBUTES, PublicArea
from tests.platform.swtpm import SWTPM, ManufacturedTPM

try:
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # cryptography before CFB moved to the decrepit package
    from cryptography.hazmat.primitives.ciphers.modes import CFB  # type: ignore[assignment,unused-ignore]

TOOLS = (
    "tpm2_createek",
    "tpm2_createak",
    "tpm2_createprimary",
    "tpm2_create",
    "tpm2_load",
    "tpm2_readpublic",
    "tpm2_makecredential",
    "tpm2_activatecredential",
    "tpm2_startauthsession",
    "tpm2_policysecret",
    "tpm2_flushcontext",
    "tpm2_nvread",
)
_MISSING = [t for t in TOOLS if shutil.which(t) is None]
HASHES = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha384": hashlib.sha384}
SIZES = {"sha256": 32, "sha384": 48, "sha512": 64}
ALG_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}

# TPM_ALG_ID, TPMA_OBJECT and TPM_ECC_CURVE values (TPM 2.0 Part 2, 6.3, 8.3, 6.4).
TPM_ALG_RSA, TPM_ALG_ECC, TPM_ALG_AES, TPM_ALG_CFB, TPM_ALG_NULL = 0x1, 0x23, 0x6, 0x43, 0x10
TPM_ALG_ECDSA, TPM_ALG_OAEP = 0x18, 0x17
TPMA_USERWITHAUTH, TPMA_DECRYPT, TPMA_SIGN, TPMA_FIXEDTPM = 0x40, 0x20000, 0x40000, 0x2
CURVES = {"p256": (0x0003, ec.SECP256R1(), 32), "p384": (0x0004, ec.SECP384R1(), 48)}

#: authPolicy of the EK templates: PolicySecret(TPM_RH_ENDORSEMENT) for the low range
#: (TCG EK Credential Profile, PolicyA) and PolicyB/SHA-384 for the high range.
POLICY_A_SHA256 = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
POLICY_B_SHA384 = bytes.fromhex(
    "b26e7d28d11a50bc53d882bcf5fd3a1a074148bb35d3b4e4cb1c0ad9bde419ca"
    "cb47ba09699646150f9fc000f3f80e12"
)
HIGH_EK_ATTRIBUTES = (
    "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|adminwithpolicy|restricted|decrypt"
)
TOOLS_MAGIC = struct.pack(">II", 0xBADCC0DE, 1)


# --- independent references ------------------------------------------------------------


def ref_kdfa(hash_name: str, key: bytes, label: bytes, u: bytes, v: bytes, bits: int) -> bytes:
    """SP800-108 5.1 (counter mode, r = 32, PRF HMAC) with the TPM's fixed input data
    Label || 0x00 || Context || [L]32 and Context = contextU || contextV."""
    out = b""
    i = 1
    while len(out) * 8 < bits:
        data = i.to_bytes(4, "big") + label + b"\x00" + u + v + bits.to_bytes(4, "big")
        out += hmac.new(key, data, HASHES[hash_name]).digest()
        i += 1
    return out[: bits // 8]


def ref_kdfe(hash_name: str, z: bytes, use: bytes, u: bytes, v: bytes, bits: int) -> bytes:
    """SP800-56A 5.8.1 (concatenation KDF) with OtherInfo = Use || 0x00 || PartyU || PartyV."""
    out = b""
    i = 1
    while len(out) * 8 < bits:
        out += HASHES[hash_name](i.to_bytes(4, "big") + z + use + b"\x00" + u + v).digest()
        i += 1
    return out[: bits // 8]


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def split_tpm2b(data: bytes, at: int = 0) -> tuple[bytes, int]:
    (size,) = struct.unpack_from(">H", data, at)
    assert at + 2 + size <= len(data), "TPM2B runs past the end"
    return data[at + 2 : at + 2 + size], at + 2 + size


def ek_area(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    *,
    name_alg: str = "sha256",
    sym: tuple[int, int, int] = (TPM_ALG_AES, 128, TPM_ALG_CFB),
    attributes: int = EK_ATTRIBUTES,
    scheme: tuple[int, ...] = (TPM_ALG_NULL,),
    curve_id: int | None = None,
    x: bytes | None = None,
) -> PublicArea:
    """A TPMT_PUBLIC marshalled here from Part 2, 12.2.4, for a software key."""
    pub = key.public_key()
    is_rsa = isinstance(pub, rsa.RSAPublicKey)
    out = struct.pack(">HHI", TPM_ALG_RSA if is_rsa else TPM_ALG_ECC, ALG_IDS[name_alg], attributes)
    out += tpm2b(POLICY_A_SHA256)
    out += struct.pack(">H", sym[0]) + (
        struct.pack(">HH", *sym[1:]) if sym[0] != TPM_ALG_NULL else b""
    )
    out += struct.pack(f">{len(scheme)}H", *scheme)
    if isinstance(pub, rsa.RSAPublicKey):
        n = pub.public_numbers().n
        out += struct.pack(">HI", pub.key_size, 0) + tpm2b(n.to_bytes(pub.key_size // 8, "big"))
    else:
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        cid, _, size = CURVES["p256" if pub.curve.name == "secp256r1" else "p384"]
        point = pub.public_numbers()
        xb = x if x is not None else point.x.to_bytes(size, "big")
        out += struct.pack(">HH", curve_id or cid, TPM_ALG_NULL)
        out += tpm2b(xb) + tpm2b(point.y.to_bytes(size, "big"))
    return PublicArea.from_bytes(tpm2b(out))


def stream(tag: bytes) -> Callable[[int], bytes]:
    """A deterministic ``random``: SHA-256 in counter mode over a tag."""
    state = {"counter": 0}

    def draw(n: int) -> bytes:
        out = b""
        while len(out) < n:
            state["counter"] += 1
            out += hashlib.sha256(tag + state["counter"].to_bytes(4, "big")).digest()
        return out[:n]

    return draw


def activate_in_software(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    ek: PublicArea,
    name: bytes,
    id_object: bytes,
    secret: bytes,
    name_alg: str,
    sym_bits: int,
) -> bytes:
    """TPM2_ActivateCredential (Part 3, 12.5) written from Part 1, 24 and Annexes B/C."""
    h = getattr(hashes, name_alg.upper())()
    digest_size = SIZES[name_alg]
    encrypted, end = split_tpm2b(secret)
    assert end == len(secret)
    if isinstance(key, rsa.RSAPrivateKey):
        assert len(encrypted) == key.key_size // 8
        seed = key.decrypt(encrypted, padding.OAEP(padding.MGF1(h), h, b"IDENTITY\x00"))
    else:
        x, at = split_tpm2b(encrypted)
        y, at = split_tpm2b(encrypted, at)
        assert at == len(encrypted)
        qe = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, b"\x04" + x + y)
        z = key.exchange(ec.ECDH(), qe)
        seed = ref_kdfe(name_alg, z, b"IDENTITY", x, ek.unique[0], digest_size * 8)
    assert len(seed) == digest_size
    blob, end = split_tpm2b(id_object)
    assert end == len(id_object)
    outer_hmac, at = split_tpm2b(blob)
    enc_identity = blob[at:]
    hmac_key = ref_kdfa(name_alg, seed, b"INTEGRITY", b"", b"", digest_size * 8)
    expected = hmac.new(hmac_key, enc_identity + name, HASHES[name_alg]).digest()
    if not hmac.compare_digest(outer_hmac, expected):
        raise ValueError("integrity check failed")
    sym_key = ref_kdfa(name_alg, seed, b"STORAGE", name, b"", sym_bits)
    decryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).decryptor()
    plain = decryptor.update(enc_identity) + decryptor.finalize()
    credential, end = split_tpm2b(plain)
    assert end == len(plain)
    return credential


# --- KDFa / KDFe -------------------------------------------------------------------------


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha384"])
@pytest.mark.parametrize("bits", [8, 128, 256, 264, 1024])
def test_kdfa_is_sp800_108_counter_mode(hash_name: str, bits: int) -> None:
    key, u, v = b"k" * 20, b"context-u", b"context-v"
    got = kdfa(hash_name, key, b"STORAGE", u, v, bits)
    assert got == ref_kdfa(hash_name, key, b"STORAGE", u, v, bits)
    assert len(got) == bits // 8
    kbkdf = KBKDFHMAC(
        algorithm=getattr(hashes, hash_name.upper())(),
        mode=Mode.CounterMode,
        length=bits // 8,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=b"STORAGE",
        context=u + v,
        fixed=None,
    )
    assert got == kbkdf.derive(key)


def test_kdfa_byte_layout() -> None:
    key, u, v = bytes(range(32)), b"\xaa" * 3, b"\xbb" * 2
    # [i]32 || label || 0x00 || contextU || contextV || [L]32, here with L = 384 (two blocks)
    first = bytes.fromhex("00000001") + b"INTEGRITY" + b"\x00" + u + v + bytes.fromhex("00000180")
    second = bytes.fromhex("00000002") + first[4:]
    expected = hmac.new(key, first, hashlib.sha256).digest()
    expected += hmac.new(key, second, hashlib.sha256).digest()[:16]
    assert kdfa("sha256", key, b"INTEGRITY", u, v, 384) == expected
    # The NUL is added once: a label that already ends in one is hashed as is.
    assert kdfa("sha256", key, b"INTEGRITY\x00", u, v, 384) == expected
    # No label: the NUL alone.
    empty = hmac.new(key, bytes.fromhex("00000001") + b"\x00" + bytes.fromhex("00000080"), "sha256")
    assert kdfa("sha256", key, b"", b"", b"", 128) == empty.digest()[:16]


def test_kdfa_known_answers() -> None:
    # TPM 2.0 Part 1, KDFa example (label "KDFSELFTESTLABEL", SHA-1, 521 bits: the
    # unused high bits of the first byte are clear), as reproduced in go-tpm's tests.
    got = kdfa(
        "sha1",
        bytes.fromhex("271fa08bbdc5060ec3dfa928ff9b73123a12da0c"),
        b"KDFSELFTESTLABEL",
        bytes.fromhex("ce244f395dca7391"),
        bytes.fromhex("da504031ddf12e83"),
        521,
    )
    assert got == bytes.fromhex(
        "01714e865072c1e4c40b3670281112632fc9ecba25e66af68d18a2b62de9cbb4"
        "4521da2bc9a496862eb3f306949f9efe8a9e1ccbce3b4d668ffd75c9394ba594"
        "58fe"
    )
    got = kdfa("sha256", b"yolo\x00", b"IDENTITY", b"kek\x00", b"yoyo\x00", 128)
    assert got == bytes.fromhex("d2d72cc7a8a5eb09e8c79012e2da9f22")


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha384"])
@pytest.mark.parametrize("bits", [8, 160, 256, 384, 1000])
def test_kdfe_is_sp800_56a_concatenation(hash_name: str, bits: int) -> None:
    z, u, v = b"\x01" * 32, b"party-u", b"party-v"
    got = kdfe(hash_name, z, b"IDENTITY", u, v, bits)
    assert got == ref_kdfe(hash_name, z, b"IDENTITY", u, v, bits)
    concat = ConcatKDFHash(
        algorithm=getattr(hashes, hash_name.upper())(),
        length=bits // 8,
        otherinfo=b"IDENTITY\x00" + u + v,
    )
    assert got == concat.derive(z)


def test_kdfe_byte_layout() -> None:
    z, u, v = b"\x11" * 32, b"\x22" * 32, b"\x33" * 32
    # H([i]32 || Z || Use || 0x00 || PartyUInfo || PartyVInfo); the bit count is not hashed.

    def block(i: int) -> bytes:
        return hashlib.sha256(i.to_bytes(4, "big") + z + b"IDENTITY\x00" + u + v).digest()

    assert kdfe("sha256", z, b"IDENTITY", u, v, 256) == block(1)
    assert kdfe("sha256", z, b"IDENTITY", u, v, 128) == block(1)[:16]
    assert kdfe("sha256", z, b"IDENTITY", u, v, 320) == block(1) + block(2)[:8]
    assert kdfe("sha256", z, b"IDENTITY\x00", u, v, 256) == block(1)
    # Masking: 12 bits are two bytes with the top four bits clear.
    assert kdfe("sha256", z, b"IDENTITY", u, v, 12) == bytes([block(1)[0] & 0x0F]) + block(1)[1:2]


@pytest.mark.parametrize(
    ("hash_name", "z", "u", "v", "expected"),
    [
        (
            "sha256",
            "69fd74d052a5cd9d6addf4ea791f4737eb297246dce604f6385c1392e0fb56b9",
            "c29f8cff1ce054ed5945abd393ee2eed3f67437d9db07b932156c65d32921373",
            "107937dc44e5bb5094d3d30a55efac77b6db3253ba42dabc804446b93864e055",
            "b15267e3f960f8f8f3b94ff3fc64119f6876974f984f82d50bd54abc7a6406e8",
        ),
        (
            "sha256",
            "bb3a3f26d6810bff2967634995fd579f806fa68f0d9db5bd62d10c305ceaa9da"
            "8eec673ee08951bc63ae9c6fb5fe98b1",
            "20f0f40cf185ca07a45699f74a0719c621843e9d071e4f6be8c37abda838ee1a"
            "2a09824d226b36a7ae5018aa0997d617",
            "cb677d1274259f552aa45260d96546c53fe1a04af78a0c0cbbb4f43b327163c5"
            "0d7608bc2cf64c1f2cbe799aaa9fbe6d",
            "9454b72eb50f0b2566246976a7445da1a1ebfa82c914c465ac754e941de0faaa",
        ),
    ],
    ids=["p256", "p384"],
)
def test_kdfe_known_answers(hash_name: str, z: str, u: str, v: str, expected: str) -> None:
    # Values computed by the Microsoft reference TPM simulator (label "DUPLICATE"),
    # as recorded in go-tpm's KDFe tests.
    got = kdfe(hash_name, bytes.fromhex(z), b"DUPLICATE", bytes.fromhex(u), bytes.fromhex(v), 256)
    assert got == bytes.fromhex(expected)


def test_kdf_argument_errors() -> None:
    for bits in (0, -8):
        with pytest.raises(CredentialError, match="positive"):
            kdfa("sha256", b"k", b"L", b"", b"", bits)
        with pytest.raises(CredentialError, match="positive"):
            kdfe("sha256", b"z", b"L", b"", b"", bits)
    with pytest.raises(CredentialError, match="32-bit"):
        kdfa("sha256", b"k", b"L", b"", b"", 1 << 32)
    with pytest.raises(AlgorithmError):
        kdfa("md5", b"k", b"L", b"", b"", 128)
    with pytest.raises(AlgorithmError):
        kdfe("sha3", b"z", b"L", b"", b"", 128)


def test_curve_orders() -> None:
    # The group orders make_credential reduces ephemeral keys with: (n - 1) * G = -G.
    from cima.evidence import credential

    for curve_id, curve, size in CURVES.values():
        order = credential._CURVES[curve_id].order
        g = ec.derive_private_key(1, curve).public_key().public_numbers()
        minus_g = ec.derive_private_key(order - 1, curve).public_key().public_numbers()
        assert (minus_g.x, minus_g.y != g.y) == (g.x, True)
        assert credential._CURVES[curve_id].size == size
        with pytest.raises(ValueError):
            ec.derive_private_key(order, curve)  # = the point at infinity


# --- make_credential with software EKs ----------------------------------------------------


@dataclass(frozen=True)
class SoftwareEK:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    area: PublicArea
    name_alg: str
    sym_bits: int


@pytest.fixture(scope="module")
def software_eks() -> dict[str, SoftwareEK]:
    rsa2048 = rsa.generate_private_key(65537, 2048)
    rsa3072 = rsa.generate_private_key(65537, 3072)
    p256 = ec.derive_private_key(0x1234567890ABCDEF << 64 | 0x42, ec.SECP256R1())
    p384 = ec.derive_private_key(0xFEDCBA9876543210 << 128 | 0x99, ec.SECP384R1())
    out = {}
    for kind, key, name_alg, bits in (
        ("rsa2048", rsa2048, "sha256", 128),
        ("rsa3072", rsa3072, "sha384", 256),
        ("p256", p256, "sha256", 128),
        ("p384", p384, "sha384", 256),
    ):
        area = ek_area(key, name_alg=name_alg, sym=(TPM_ALG_AES, bits, TPM_ALG_CFB))
        out[kind] = SoftwareEK(key, area, name_alg, bits)
    return out


AK_NAME = bytes.fromhex("000b") + hashlib.sha256(b"an attestation key").digest()


@pytest.mark.parametrize("kind", ["rsa2048", "rsa3072", "p256", "p384"])
def test_make_credential_is_deterministic_and_activates(
    software_eks: dict[str, SoftwareEK], kind: str
) -> None:
    ek = software_eks[kind]
    secret = b"\x5a" * SIZES[ek.name_alg]  # the largest credential allowed
    first = make_credential(ek.area, AK_NAME, secret, random=stream(b"fixed"))
    again = make_credential(ek.area.to_bytes(), AK_NAME, secret, random=stream(b"fixed"))
    other = make_credential(ek.area, AK_NAME, secret, random=stream(b"other"))
    assert first == again
    assert first[0] != other[0] and first[1] != other[1]
    for id_object, encrypted in (first, other):
        got = activate_in_software(
            ek.key, ek.area, AK_NAME, id_object, encrypted, ek.name_alg, ek.sym_bits
        )
        assert got == secret
    # Layout: TPM2B_ID_OBJECT = size || TPM2B_DIGEST outerHMAC || encIdentity.
    id_object, encrypted = first
    digest = SIZES[ek.name_alg]
    assert struct.unpack_from(">HH", id_object) == (len(id_object) - 2, digest)
    assert len(id_object) == 2 + 2 + digest + 2 + len(secret)
    if kind.startswith("rsa"):
        assert len(encrypted) == 2 + ek.key.key_size // 8
    else:
        size = CURVES[kind][2]
        assert encrypted[:4] == struct.pack(">HH", 2 + size + 2 + size, size)
    # A different name or a flipped bit fails the integrity check.
    with pytest.raises(ValueError, match="integrity"):
        activate_in_software(
            ek.key, ek.area, AK_NAME[:-1] + b"\x00", id_object, encrypted, ek.name_alg, ek.sym_bits
        )
    flipped = bytearray(id_object)
    flipped[-1] ^= 1
    with pytest.raises(ValueError, match="integrity"):
        activate_in_software(
            ek.key, ek.area, AK_NAME, bytes(flipped), encrypted, ek.name_alg, ek.sym_bits
        )


def test_make_credential_draws_random_bytes_in_the_documented_order(
    software_eks: dict[str, SoftwareEK],
) -> None:
    for kind, expected in (
        ("rsa2048", [32, 32]),
        ("rsa3072", [48, 48]),
        ("p256", [40]),
        ("p384", [56]),
    ):
        recorder = Recorder(stream(kind.encode()))
        make_credential(software_eks[kind].area, AK_NAME, b"s", random=recorder)
        assert recorder.asked == expected, kind


class Recorder:
    """A ``random`` that records the sizes asked for."""

    def __init__(self, source: Callable[[int], bytes]) -> None:
        self.source = source
        self.asked: list[int] = []

    def __call__(self, n: int) -> bytes:
        self.asked.append(n)
        return self.source(n)


def test_make_credential_ecc_ephemeral_key_comes_from_random(
    software_eks: dict[str, SoftwareEK],
) -> None:
    ek = software_eks["p256"]
    draw = bytes(31) + b"\x06" + bytes(8)  # the integer 6 << 64, reduced mod n - 1, plus 1
    _, encrypted = make_credential(ek.area, AK_NAME, b"s", random=lambda n: draw[:n])
    expected = ec.derive_private_key((6 << 64) + 1, ec.SECP256R1()).public_key().public_numbers()
    x, at = split_tpm2b(encrypted[2:])
    y, _ = split_tpm2b(encrypted[2:], at)
    assert (int.from_bytes(x, "big"), int.from_bytes(y, "big")) == (expected.x, expected.y)


def test_make_credential_regression_vector() -> None:
    # Pinned output for a fixed P-256 key and random stream. It guards the byte layout and
    # the order random bytes are drawn in; correctness is shown by the activation tests.
    key = ec.derive_private_key(0xC0FFEE, ec.SECP256R1())
    ek = ek_area(key)
    id_object, encrypted = make_credential(ek, AK_NAME, b"pinned", random=stream(b"pinned"))
    assert id_object == bytes.fromhex(
        "002a"  # TPM2B_ID_OBJECT size
        "0020"  # outerHMAC size, then the HMAC
        "40ae067467835889dd0512a8fc6fe290bc6a559058c5f4213909b6048adedf1e"
        "e65b2db855a17ee2"  # encIdentity: AES-CFB of 0006 || "pinned"
    )
    assert encrypted == bytes.fromhex(
        "0044"  # TPM2B_ENCRYPTED_SECRET size: a TPMS_ECC_POINT follows
        "0020"
        "51a58b352d8db02374dfd9854516136d4fd1bed5e7feb6560b87156ce7085b81"
        "0020"
        "4a1616a06b8b419b743e96937d49e598523eb2cdc87f9d62cde66a8e627613ba"
    )
    assert activate_in_software(key, ek, AK_NAME, id_object, encrypted, "sha256", 128) == b"pinned"


# --- hostile inputs -------------------------------------------------------------------------


def test_make_credential_rejects_bad_names_and_credentials(
    software_eks: dict[str, SoftwareEK],
) -> None:
    ek = software_eks["p256"].area
    for name, match in (
        (b"", "2 or more"),
        (b"\x00", "2 or more"),
        (AK_NAME[:-1], "a sha256 name has 34"),
        (AK_NAME + b"\x00", "a sha256 name has 34"),
        (bytes.fromhex("000c") + bytes(32), "a sha384 name has 50"),
        (bytes.fromhex("1234") + bytes(32), "not a known hash"),
        (bytes.fromhex("0001") + bytes(32), "not a known hash"),  # TPM_ALG_RSA is no hash
        ("000b" + "00" * 32, "not bytes"),
    ):
        with pytest.raises(CredentialError, match=match):
            make_credential(ek, name, b"secret")  # type: ignore[arg-type]
    with pytest.raises(CredentialError, match="at most 32"):
        make_credential(ek, AK_NAME, bytes(33))
    with pytest.raises(CredentialError, match="at most 48"):
        make_credential(software_eks["p384"].area, AK_NAME, bytes(49))
    make_credential(software_eks["p384"].area, AK_NAME, bytes(48))  # SHA-384 EK: 48 is fine
    make_credential(ek, bytes.fromhex("0004") + bytes(20), b"")  # a SHA-1 name, empty secret
    with pytest.raises(CredentialError, match="not bytes"):
        make_credential(ek, AK_NAME, "secret")  # type: ignore[arg-type]
    with pytest.raises(CredentialError, match="returned 3, not 40"):
        make_credential(ek, AK_NAME, b"s", random=lambda n: b"abc")
    with pytest.raises(CredentialError, match="returned 16, not 32"):
        make_credential(software_eks["rsa2048"].area, AK_NAME, b"s", random=lambda n: bytes(16))


def test_make_credential_rejects_unsupported_eks() -> None:
    p256 = ec.derive_private_key(7, ec.SECP256R1())
    rsa1024 = rsa.generate_private_key(65537, 1024)
    p521 = ec.generate_private_key(ec.SECP521R1())
    cases: list[tuple[PublicArea | bytes, str]] = [
        (ek_area(p256, attributes=EK_ATTRIBUTES & ~TPMA_DECRYPT | TPMA_SIGN), "not a restricted"),
        (PublicArea.from_public_key(p256.public_key()), "not a restricted"),
        (ek_area(p256, sym=(TPM_ALG_NULL, 0, 0)), "symmetric algorithm NULL"),
        (ek_area(p256, sym=(TPM_ALG_AES, 192, TPM_ALG_CFB)), "AES-192 CFB"),
        (ek_area(p256, sym=(TPM_ALG_AES, 128, 0x0044)), "AES-128 mode 0x0044"),  # OFB
        (ek_area(p256, sym=(0x0026, 128, TPM_ALG_CFB)), "0x0026"),  # Camellia
        (ek_area(p256, name_alg="sha1"), "nameAlg 0x0004"),
        (ek_area(rsa1024), "RSA-1024"),
        (ek_area(p256, curve_id=0x0010), "bn-p256"),  # BN P-256: not supported
        (ek_area(p256, x=bytes(32)), "usable key"),  # a point off the curve
        (b"\x00\x02\x00\x08", "type 0x0008"),  # a keyedhash object
        (b"not bytes", "TPM2B_PUBLIC"),
    ]
    # A P-521 EK: PublicArea knows the curve, make_credential does not support it.
    p521_area = ek_area(
        p256, curve_id=0x0005, x=p521.public_key().public_numbers().x.to_bytes(66, "big")
    )
    cases.append((p521_area, "nist-p521"))
    for ek, match in cases:
        with pytest.raises((CredentialError, ParseError), match=match):
            make_credential(ek, AK_NAME, b"secret")
    with pytest.raises(CredentialError, match="not a public area or bytes"):
        make_credential("ek.pub", AK_NAME, b"secret")  # type: ignore[arg-type]


def test_make_credential_on_truncated_and_mutated_eks(software_eks: dict[str, SoftwareEK]) -> None:
    rng = pyrandom.Random(20240601)
    for kind in ("rsa2048", "p256", "p384"):
        good = software_eks[kind].area.to_bytes()
        for cut in range(len(good)):
            with pytest.raises(ParseError):
                make_credential(good[:cut], AK_NAME, b"secret")
        for _ in range(300):
            data = bytearray(good)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            try:
                id_object, secret = make_credential(bytes(data), AK_NAME, b"secret")
            except (CredentialError, ParseError):
                continue
            assert id_object[:2] == struct.pack(">H", len(id_object) - 2)
            assert secret[:2] == struct.pack(">H", len(secret) - 2)
        for _ in range(100):
            garbage = rng.randbytes(rng.randrange(0, 400))
            with pytest.raises((CredentialError, ParseError)):
                make_credential(garbage, AK_NAME, b"secret")


# --- EK certificate chains in software ----------------------------------------------------

NOW = datetime(2030, 6, 1, tzinfo=UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])


def issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey] | None = None,
    *,
    public_key: object | None = None,
    ca: bool | None = True,
    path_length: int | None = None,
    key_cert_sign: bool | None = True,
    not_before: datetime = NOW - timedelta(days=365),
    not_after: datetime = NOW + timedelta(days=365),
) -> x509.Certificate:
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(public_key or key.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca, path_length), critical=True)
    if key_cert_sign is not None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=not key_cert_sign,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=key_cert_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def ca_keys() -> list[ec.EllipticCurvePrivateKey]:
    return [ec.generate_private_key(ec.SECP256R1()) for _ in range(12)]


def test_chain_in_software(ca_keys: list[ec.EllipticCurvePrivateKey]) -> None:
    root_key, inter_key, ek_key, other_key = ca_keys[:4]
    root = issue("Root", root_key)
    inter = issue("Intermediate", inter_key, ("Root", root_key))
    ek = issue("", ek_key, ("Intermediate", inter_key), ca=False, key_cert_sign=None)
    assert check_ek_certificate(ek, [root], [inter], at=NOW) == [ek, inter, root]
    # A naive datetime is UTC; the default is now (the certificates are valid now).
    assert check_ek_certificate(ek, [root], [inter], at=NOW.replace(tzinfo=None))[-1] == root
    # An intermediate can itself be trusted as the anchor.
    assert check_ek_certificate(ek, [inter], at=NOW) == [ek, inter]

    def fails(reason: str, match: str, *args: object, **kwargs: object) -> EndorsementError:
        with pytest.raises(EndorsementError, match=match) as info:
            check_ek_certificate(*args, **kwargs)  # type: ignore[arg-type]
        assert info.value.step == "ek-certificate"
        assert info.value.reason == reason
        assert isinstance(info.value, SignatureError)
        assert str(info.value).startswith("ek-certificate: ")
        return info.value

    fails("no-issuer", "no issuer found for certificate with an empty subject", ek, [root], at=NOW)
    fails(
        "expired", "'CN=Intermediate'.* expired", ek, [root], [inter], at=NOW + timedelta(days=400)
    )
    fails("not-yet-valid", "not valid before", ek, [root], [inter], at=NOW - timedelta(days=400))
    root_expired = issue("Root", root_key, not_after=NOW - timedelta(days=1))
    fails("expired", "'CN=Root'", ek, [root_expired], [inter], at=NOW)
    # A root of the same name but another key: the signature does not verify.
    impostor = issue("Root", other_key)
    fails(
        "signature",
        "'CN=Intermediate'.* is not signed by certificate 'CN=Root'",
        ek,
        [impostor],
        [inter],
        at=NOW,
    )
    # Issuers that may not issue.
    not_ca = issue("Intermediate", inter_key, ("Root", root_key), ca=False)
    fails("not-ca", "'CN=Intermediate'.* is not a CA", ek, [root], [not_ca], at=NOW)
    no_bc = issue("Intermediate", inter_key, ("Root", root_key), ca=None)
    fails("not-ca", "is not a CA", ek, [root], [no_bc], at=NOW)
    no_sign = issue("Intermediate", inter_key, ("Root", root_key), key_cert_sign=False)
    fails("key-usage", "no keyCertSign", ek, [root], [no_sign], at=NOW)
    no_ku = issue("Intermediate", inter_key, ("Root", root_key), key_cert_sign=None)
    fails("key-usage", "no keyCertSign", ek, [root], [no_ku], at=NOW)
    # pathLenConstraint 0 on the root forbids the intermediate CA below it.
    root_pl0 = issue("Root", root_key, path_length=0)
    fails("path-length", "allows 0 intermediate CAs", ek, [root_pl0], [inter], at=NOW)
    root_pl1 = issue("Root", root_key, path_length=1)
    assert len(check_ek_certificate(ek, [root_pl1], [inter], at=NOW)) == 3
    # With a good and a bad candidate of the same name, the good one is found.
    assert check_ek_certificate(ek, [impostor, root], [not_ca, inter], at=NOW)[1:] == [inter, root]


def test_chain_length_limit(ca_keys: list[ec.EllipticCurvePrivateKey]) -> None:
    keys = ca_keys[:10]
    certs = [issue("CA0", keys[0])]
    for i in range(1, 10):
        certs.append(issue(f"CA{i}", keys[i], (f"CA{i - 1}", keys[i - 1])))
    leaf_key = ca_keys[10]

    def leaf_under(i: int) -> x509.Certificate:
        return issue("EK", leaf_key, (f"CA{i}", keys[i]), ca=False, key_cert_sign=None)

    # EK + 6 intermediates + root = 8 certificates: accepted; one intermediate more is not.
    chain = check_ek_certificate(leaf_under(6), [certs[0]], certs[1:], at=NOW)
    assert len(chain) == MAX_CHAIN_LENGTH == 8
    with pytest.raises(EndorsementError, match="within 8 certificates") as info:
        check_ek_certificate(leaf_under(7), [certs[0]], certs[1:], at=NOW)
    assert info.value.reason == "too-long"


# --- swtpm and tpm2-tools -------------------------------------------------------------------


@dataclass(frozen=True)
class TPMKeys:
    """Keys made in swtpm by tpm2-tools, in ``directory``; names of files there."""

    ek_ctx: str
    ek_pub: str
    ak_ctx: str
    ak_name: str
    ak_pub: str
    policy: bool  # the EK needs PolicySecret(endorsement); high-range EKs take a password


@dataclass
class TPM:
    swtpm: SWTPM
    directory: Path
    keys: dict[str, TPMKeys]

    def run(
        self, *args: str, check: bool = True, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            list(args),
            cwd=cwd or self.directory,
            env=self.swtpm.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done

    def flush(self) -> None:
        self.run("tpm2_flushcontext", "-t")

    def read(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def ek(self, kind: str) -> PublicArea:
        return PublicArea.from_bytes(self.read(self.keys[kind].ek_pub))

    def ak(self, kind: str) -> PublicArea:
        return PublicArea.from_bytes(self.read(self.keys[kind].ak_pub))

    def activate(self, kind: str, blob: bytes, workdir: Path) -> subprocess.CompletedProcess[str]:
        """tpm2_activatecredential on a tpm2-tools credential file; the secret in secret.out."""
        keys = self.keys[kind]
        (workdir / "cred.bin").write_bytes(blob)
        auth: list[str] = []
        try:
            if keys.policy:
                self.run(
                    "tpm2_startauthsession", "--policy-session", "-S", str(workdir / "session.ctx")
                )
                self.run("tpm2_policysecret", "-S", str(workdir / "session.ctx"), "-c", "e")
                auth = ["-P", f"session:{workdir / 'session.ctx'}"]
            return self.run(
                "tpm2_activatecredential",
                "-c", keys.ak_ctx,
                "-C", keys.ek_ctx,
                "-i", str(workdir / "cred.bin"),
                "-o", str(workdir / "secret.out"),
                *auth,
                check=False,
            )  # fmt: skip
        finally:
            if keys.policy:
                self.run("tpm2_flushcontext", str(workdir / "session.ctx"), check=False)
            self.flush()

    def nv_certificate(self, index: int) -> x509.Certificate:
        out = self.directory / f"nv-{index:08x}.der"
        self.run("tpm2_nvread", f"0x{index:08x}", "-C", "o", "-o", str(out))
        raw = out.read_bytes()
        # The NV index may hold padding after the DER certificate.
        assert raw[0] == 0x30 and raw[1] == 0x82
        return x509.load_der_x509_certificate(raw[: 4 + int.from_bytes(raw[2:4], "big")])


EK_KINDS = ["rsa", "ecc", "ecc384"]
NV_RSA_EK_CERT, NV_HIGH_ECC384_EK_CERT = 0x01C00002, 0x01C00016


@pytest.fixture(scope="module")
def tpm(swtpm_module: SWTPM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TPM]:
    if _MISSING:
        pytest.skip(f"tpm2-tools is not installed (missing {', '.join(_MISSING)})")
    directory = tmp_path_factory.mktemp("credential-keys")
    t = TPM(swtpm_module, directory, {})
    # Low range: the RSA-2048 (L-1) and NIST P-256 (L-2) EKs of tpm2_createek, an ECC AK
    # under the RSA EK and an RSA AK under the ECC EK.
    for kind, ak_alg in (("rsa", "ecc"), ("ecc", "rsa")):
        t.run("tpm2_createek", "-c", f"ek-{kind}.ctx", "-G", kind, "-u", f"ek-{kind}.pub")
        t.run(
            "tpm2_createak", "-C", f"ek-{kind}.ctx", "-c", f"ak-{kind}.ctx", "-G", ak_alg,
            "-n", f"ak-{kind}.name", "-u", f"ak-{kind}.pub",
        )  # fmt: skip
        t.flush()
        t.keys[kind] = TPMKeys(
            f"ek-{kind}.ctx", f"ek-{kind}.pub", f"ak-{kind}.ctx", f"ak-{kind}.name",
            f"ak-{kind}.pub", policy=True,
        )  # fmt: skip
    # High range: the NIST P-384 EK (template H-3: SHA-384, AES-256, userWithAuth) whose
    # certificate swtpm_setup wrote at 0x01c00016, with an ECDSA AK created under it.
    (directory / "policy-b-sha384").write_bytes(POLICY_B_SHA384)
    t.run(
        "tpm2_createprimary", "-C", "e", "-g", "sha384", "-G", "ecc384:null:aes256cfb",
        "-a", HIGH_EK_ATTRIBUTES, "-L", "policy-b-sha384", "-c", "ek-ecc384.ctx",
    )  # fmt: skip
    t.flush()
    t.run("tpm2_readpublic", "-c", "ek-ecc384.ctx", "-o", "ek-ecc384.pub", "-f", "tss")
    t.flush()
    t.run(
        "tpm2_create", "-C", "ek-ecc384.ctx", "-G", "ecc256:ecdsa-sha256:null", "-g", "sha256",
        "-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign",
        "-u", "ak-ecc384.pub", "-r", "ak-ecc384.priv",
    )  # fmt: skip
    t.flush()
    t.run(
        "tpm2_load", "-C", "ek-ecc384.ctx", "-u", "ak-ecc384.pub", "-r", "ak-ecc384.priv",
        "-c", "ak-ecc384.ctx", "-n", "ak-ecc384.name",
    )  # fmt: skip
    t.flush()
    t.keys["ecc384"] = TPMKeys(
        "ek-ecc384.ctx", "ek-ecc384.pub", "ak-ecc384.ctx", "ak-ecc384.name", "ak-ecc384.pub",
        policy=False,
    )  # fmt: skip
    yield t


@pytest.mark.peer
@pytest.mark.parametrize("kind", EK_KINDS)
def test_tpm_activates_our_credential(tpm: TPM, tmp_path: Path, kind: str) -> None:
    ek = tpm.ek(kind)
    name = tpm.read(tpm.keys[kind].ak_name)
    assert name == tpm.ak(kind).name  # tpm2-tools' name is the one cima computes
    secret = hashlib.new(ek.to_dict()["name_alg"], kind.encode()).digest()  # full size
    id_object, encrypted = make_credential(ek, name, secret)
    done = tpm.activate(kind, TOOLS_MAGIC + id_object + encrypted, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "secret.out").read_bytes() == secret


@pytest.mark.peer
@pytest.mark.parametrize("kind", EK_KINDS)
def test_tpm_refuses_a_credential_for_another_name(tpm: TPM, tmp_path: Path, kind: str) -> None:
    other = "ecc" if kind == "rsa" else "rsa"
    other_name = tpm.read(tpm.keys[other].ak_name)
    ek_bytes = tpm.read(tpm.keys[kind].ek_pub)  # the TPM2B_PUBLIC bytes tpm2-tools wrote
    id_object, encrypted = make_credential(ek_bytes, other_name, b"not for this AK")
    done = tpm.activate(kind, TOOLS_MAGIC + id_object + encrypted, tmp_path)
    assert done.returncode != 0
    assert "integrity check failed" in done.stderr  # TPM_RC_INTEGRITY
    assert not (tmp_path / "secret.out").exists()


@pytest.mark.peer
@pytest.mark.parametrize("kind", EK_KINDS)
def test_tpm_refuses_a_flipped_bit(tpm: TPM, tmp_path: Path, kind: str) -> None:
    name = tpm.read(tpm.keys[kind].ak_name)
    id_object, encrypted = make_credential(tpm.ek(kind), name, b"integrity")
    # In the outer HMAC and in encIdentity: the TPM's integrity check fails.
    for blob in (
        TOOLS_MAGIC + flip(id_object, 5) + encrypted,
        TOOLS_MAGIC + flip(id_object, len(id_object) - 1) + encrypted,
    ):
        done = tpm.activate(kind, blob, tmp_path)
        assert done.returncode != 0
        assert "integrity check failed" in done.stderr
    # In the encrypted seed: an RSA-OAEP decryption error, or for ECC a point off the curve.
    for blob in (
        TOOLS_MAGIC + id_object + flip(encrypted, len(encrypted) - 1),
        TOOLS_MAGIC + id_object + flip(encrypted, 4),
    ):
        done = tpm.activate(kind, blob, tmp_path)
        assert done.returncode != 0
        if kind != "rsa":
            assert "point is not on the required curve" in done.stderr
    assert tpm.activate(kind, TOOLS_MAGIC + id_object + encrypted, tmp_path).returncode == 0


def flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


@pytest.mark.peer
@pytest.mark.parametrize("kind", EK_KINDS)
def test_tpm2_makecredential_layout_is_ours(tpm: TPM, tmp_path: Path, kind: str) -> None:
    """tpm2_makecredential -T none: magic, version, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET."""
    keys = tpm.keys[kind]
    ek = tpm.ek(kind)
    name = tpm.read(keys.ak_name)
    (tmp_path / "secret.bin").write_bytes(b"tools secret")
    tpm.run(
        "tpm2_makecredential", "-T", "none", "-e", str(tpm.directory / keys.ek_pub),
        "-s", "secret.bin", "-n", name.hex(), "-o", "tools.cred", cwd=tmp_path,
    )  # fmt: skip
    blob = (tmp_path / "tools.cred").read_bytes()
    assert blob[:8] == TOOLS_MAGIC
    id_object, at = split_tpm2b(blob, 8)
    encrypted, end = split_tpm2b(blob, at)
    assert end == len(blob)
    ours_id, ours_secret = make_credential(ek, name, b"tools secret")
    assert len(ours_id) == 2 + len(id_object)
    assert len(ours_secret) == 2 + len(encrypted)
    digest = {0x000B: 32, 0x000C: 48}[ek.name_alg]
    outer_hmac, at = split_tpm2b(id_object)
    assert len(outer_hmac) == digest
    assert len(id_object) - at == 2 + len(b"tools secret")  # encIdentity: TPM2B_DIGEST
    if ek.key_type == "rsa":
        assert len(encrypted) == ek.key_bits // 8
    else:
        curve, size = {0x0003: (ec.SECP256R1(), 32), 0x0004: (ec.SECP384R1(), 48)}[ek.curve]
        for point in (encrypted, split_tpm2b(ours_secret)[0]):
            x, at = split_tpm2b(point)
            y, at = split_tpm2b(point, at)
            assert at == len(point) and len(x) == len(y) == size
            ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + x + y)  # on the curve
    # And the TPM activates the tool's credential through the same path as ours.
    done = tpm.activate(kind, blob, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "secret.out").read_bytes() == b"tools secret"


# --- EK certificates and public areas from swtpm ---------------------------------------------


@pytest.fixture(scope="module")
def local_ca(swtpm_manufactured: ManufacturedTPM) -> tuple[x509.Certificate, x509.Certificate]:
    root = x509.load_pem_x509_certificate(swtpm_manufactured.root_ca_pem.read_bytes())
    issuer = x509.load_pem_x509_certificate(swtpm_manufactured.issuer_ca_pem.read_bytes())
    return root, issuer


@pytest.mark.peer
@pytest.mark.parametrize(
    ("kind", "index"), [("rsa", NV_RSA_EK_CERT), ("ecc384", NV_HIGH_ECC384_EK_CERT)]
)
def test_swtpm_ek_certificate_chain_and_key(
    tpm: TPM, local_ca: tuple[x509.Certificate, x509.Certificate], kind: str, index: int
) -> None:
    root, issuer = local_ca
    cert = tpm.nv_certificate(index)
    assert check_ek_certificate(cert, [root], [issuer]) == [cert, issuer, root]
    check_ek_public(tpm.ek(kind), cert)
    check_ak_public(tpm.ak(kind))


@pytest.mark.peer
def test_swtpm_ek_certificate_failures(
    tpm: TPM,
    local_ca: tuple[x509.Certificate, x509.Certificate],
    swtpm_manufactured: ManufacturedTPM,
    ca_keys: list[ec.EllipticCurvePrivateKey],
) -> None:
    root, issuer = local_ca
    cert = tpm.nv_certificate(NV_RSA_EK_CERT)

    def fails(reason: str, match: str, *args: object, **kwargs: object) -> None:
        with pytest.raises(EndorsementError, match=match) as info:
            check_ek_certificate(*args, **kwargs)  # type: ignore[arg-type]
        assert (info.value.step, info.value.reason) == ("ek-certificate", reason)

    # Another root: of another name, or of the same name with another key.
    other_root = issue("Another TPM Manufacturer Root", ca_keys[0])
    fails(
        "no-issuer",
        "no issuer found for certificate 'CN=swtpm-localca'",
        cert,
        [other_root],
        [issuer],
    )
    same_name = issue("swtpm-localca-rootca", ca_keys[1])
    fails(
        "signature",
        "'CN=swtpm-localca'.*not signed by.*'CN=swtpm-localca-rootca'",
        cert,
        [same_name],
        [issuer],
    )
    # The intermediate missing.
    fails("no-issuer", "no issuer found for certificate 'CN=unknown'", cert, [root])
    # Outside the validity: before the certificates were issued.
    before = cert.not_valid_before_utc - timedelta(days=1)
    fails("not-yet-valid", "'CN=unknown'.* is not valid before", cert, [root], [issuer], at=before)
    # A certificate for the same EK signed by a non-CA that the real issuer certified.
    issuer_key = serialization.load_pem_private_key(
        (swtpm_manufactured.ca_dir / "signkey.pem").read_bytes(), None
    )
    assert isinstance(issuer_key, rsa.RSAPrivateKey)
    now = datetime.now(UTC)
    start, end = now - timedelta(days=1), now + timedelta(days=1)
    not_ca = issue(
        "not a CA",
        ca_keys[2],
        ("swtpm-localca", issuer_key),
        ca=False,
        key_cert_sign=False,
        not_before=start,
        not_after=end,
    )
    forged = issue(
        "unknown",
        ca_keys[3],
        ("not a CA", ca_keys[2]),
        public_key=cert.public_key(),
        not_before=start,
        not_after=end,
        ca=False,
        key_cert_sign=None,
    )
    fails("not-ca", "certificate 'CN=not a CA'.* is not a CA", forged, [root], [issuer, not_ca])
    check_ek_public(tpm.ek("rsa"), forged)  # the key matches: only the chain is wrong


@pytest.mark.peer
def test_swtpm_check_ek_public_failures(
    tpm: TPM, ca_keys: list[ec.EllipticCurvePrivateKey]
) -> None:
    rsa_cert = tpm.nv_certificate(NV_RSA_EK_CERT)
    ecc_cert = tpm.nv_certificate(NV_HIGH_ECC384_EK_CERT)

    def fails(reason: str, match: str, ek: PublicArea, cert: x509.Certificate) -> None:
        with pytest.raises(EndorsementError, match=match) as info:
            check_ek_public(ek, cert)
        assert (info.value.step, info.value.reason) == ("ek-public", reason)

    # The AK given as the EK: another key, and not a decryption key even with its own cert.
    ak = tpm.ak("rsa")
    fails("key", "does not hold the key of certificate 'CN=unknown'", ak, rsa_cert)
    ak_cert = issue("ak", ca_keys[0], public_key=ak.public_key(), ca=False, key_cert_sign=None)
    fails("attributes", "lacks adminWithPolicy, decrypt and has sign set", ak, ak_cert)
    # Certificates of other keys: the ECC certificate for the RSA EK, the P-384 certificate
    # for the P-256 EK, a certificate of a software key.
    fails("key", "ek-public: the EK public area \\(rsa\\) does not hold", tpm.ek("rsa"), ecc_cert)
    fails("key", "does not hold the key", tpm.ek("ecc"), ecc_cert)
    software = issue("x", ca_keys[1], ca=False, key_cert_sign=None)
    fails("key", "does not hold the key", tpm.ek("ecc384"), software)


@pytest.mark.peer
def test_swtpm_check_ak_public(tpm: TPM) -> None:
    for kind in EK_KINDS:
        check_ak_public(tpm.ak(kind))
        with pytest.raises(EndorsementError, match="lacks sign and has decrypt set") as info:
            check_ak_public(tpm.ek(kind))
        assert (info.value.step, info.value.reason) == ("ak-public", "attributes")


# --- EK and AK public areas in software ---------------------------------------------------


def test_check_ek_public_shapes() -> None:
    key = ec.derive_private_key(99, ec.SECP256R1())
    cert = issue("ek", key, ca=False, key_cert_sign=None)
    check_ek_public(ek_area(key), cert)
    # userWithAuth (the high-range templates) is allowed.
    check_ek_public(ek_area(key, attributes=EK_ATTRIBUTES | TPMA_USERWITHAUTH), cert)
    for area, reason, match in (
        (ek_area(key, attributes=EK_ATTRIBUTES & ~TPMA_FIXEDTPM), "attributes", "lacks fixedTPM"),
        (ek_area(key, attributes=EK_ATTRIBUTES | TPMA_SIGN), "attributes", "has sign set"),
        (ek_area(key, sym=(TPM_ALG_NULL, 0, 0)), "symmetric", "is NULL, not AES"),
        (ek_area(key, sym=(TPM_ALG_AES, 128, 0x0044)), "symmetric", "mode 0x0044"),
        (ek_area(key, scheme=(TPM_ALG_ECDSA, 0x000B)), "scheme", "scheme 0x0018"),
    ):
        with pytest.raises(EndorsementError, match=match) as info:
            check_ek_public(area, cert)
        assert (info.value.step, info.value.reason) == ("ek-public", reason)


def test_check_ak_public_shapes() -> None:
    key = ec.derive_private_key(101, ec.SECP256R1())
    check_ak_public(PublicArea.from_public_key(key.public_key()))
    rsa_key = rsa.generate_private_key(65537, 2048)
    check_ak_public(PublicArea.from_public_key(rsa_key.public_key(), algorithm="sha384"))
    for attributes, match in (
        (AK_ATTRIBUTES & ~TPMA_FIXEDTPM, "lacks fixedTPM"),
        (AK_ATTRIBUTES | TPMA_DECRYPT, "has decrypt set"),
        (AK_ATTRIBUTES & ~0x10000, "lacks restricted"),
    ):
        area = PublicArea.from_public_key(key.public_key(), object_attributes=attributes)
        with pytest.raises(EndorsementError, match=match) as info:
            check_ak_public(area)
        assert (info.value.step, info.value.reason) == ("ak-public", "attributes")
    # A restricted signing key without a scheme, and an RSA key with an encryption scheme.
    no_scheme = ek_area(key, attributes=AK_ATTRIBUTES, sym=(TPM_ALG_NULL, 0, 0))
    with pytest.raises(EndorsementError, match="scheme NULL") as info:
        check_ak_public(no_scheme)
    assert info.value.reason == "scheme"
    oaep = ek_area(
        rsa_key, attributes=AK_ATTRIBUTES, sym=(TPM_ALG_NULL, 0, 0), scheme=(TPM_ALG_OAEP, 0x000B)
    )
    with pytest.raises(EndorsementError, match="scheme 0x0017"):
        check_ak_public(oaep)
    off_curve = ek_area(
        key,
        attributes=AK_ATTRIBUTES,
        sym=(TPM_ALG_NULL, 0, 0),
        scheme=(TPM_ALG_ECDSA, 0x000B),
        x=bytes(32),
    )
    with pytest.raises(EndorsementError, match="usable key") as info:
        check_ak_public(off_curve)
    assert info.value.reason == "key"
