"""IMA file signatures (``security.ima`` v2): layout, key ids, verification, evmctl interop.

Signatures are made in the test: by hand from the layout (``struct
signature_v2_hdr``), with :func:`cima.verifier.imasig.sign_digest`, and with
the real ``evmctl ima_sign`` (ima-evm-utils) on a real file, read back from its
``security.ima`` extended attribute (or the ``--sigfile`` file where the file
system has no extended attributes).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID

from cima.verifier.appraise import appraise
from cima.verifier.imasig import (
    HASH_ALGO_BY_NAME,
    IMASignature,
    IMASignatureError,
    IMASignatureParseError,
    IMASignatureUnsupportedError,
    KeyRing,
    TrustedKey,
    UnknownKeyError,
    key_id_v2,
    sign_digest,
)
from cima.verifier.reference import ReferenceValues, create_references
from cima.verifier.result import AttestationResult
from tests.verifier import evidence_sets as es


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, *, ski: bytes | None = None
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ima signing test")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(0x1234567890ABCDEF)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )
    value = (
        x509.SubjectKeyIdentifier(ski)
        if ski is not None
        else x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    )
    builder = builder.add_extension(value, critical=False)
    return builder.sign(key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _spki_bits_sha1(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    """SHA-1 of the subjectPublicKey BIT STRING, read out of the SPKI DER by hand."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    def header(at: int) -> tuple[int, int]:
        length = der[at + 1]
        if length < 0x80:
            return at + 2, length
        n = length & 0x7F
        return at + 2 + n, int.from_bytes(der[at + 2 : at + 2 + n], "big")

    body, _ = header(0)  # SEQUENCE
    alg_body, alg_len = header(body)  # AlgorithmIdentifier
    bits_body, bits_len = header(alg_body + alg_len)  # BIT STRING
    assert der[bits_body] == 0  # no unused bits
    return hashlib.sha1(der[bits_body + 1 : bits_body + bits_len]).digest()


# -- the layout --------------------------------------------------------------------------------


def test_header_built_from_the_layout_verifies(rsa_key: rsa.RSAPrivateKey) -> None:
    digest = hashlib.sha256(b"file contents").digest()
    sig = rsa_key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    keyid = _spki_bits_sha1(rsa_key.public_key())[16:20]
    xattr = struct.pack(">BBB4sH", 0x03, 2, 4, keyid, len(sig)) + sig  # 4 = HASH_ALGO_SHA256
    decoded = IMASignature.from_bytes(xattr)
    assert (decoded.version, decoded.hash_name, decoded.key_id) == (2, "sha256", keyid)
    assert decoded.to_bytes() == xattr
    ring = KeyRing([TrustedKey.from_public_key(rsa_key.public_key())])
    assert ring.verify(xattr, digest, "sha256").public_key.public_numbers() == (
        rsa_key.public_key().public_numbers()
    )


def test_sign_digest_matches_the_layout(ec_key: ec.EllipticCurvePrivateKey) -> None:
    digest = hashlib.sha512(b"x").digest()
    xattr = sign_digest(ec_key, digest, "sha512")
    assert xattr[:3] == bytes([0x03, 0x02, HASH_ALGO_BY_NAME["sha512"]])
    assert xattr[3:7] == key_id_v2(ec_key.public_key())
    assert struct.unpack(">H", xattr[7:9])[0] == len(xattr) - 9


def test_key_id_is_the_tail_of_the_sha1_of_the_key_bits(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    for key in (rsa_key.public_key(), ec_key.public_key()):
        assert key_id_v2(key) == _spki_bits_sha1(key)[16:20]


def test_certificate_answers_to_its_ski_and_its_serial_issuer_tail(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    cert = _certificate(rsa_key)
    tk = TrustedKey.from_pem(_pem(cert))
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert ski[-4:] in tk.key_ids
    assert key_id_v2(rsa_key.public_key()) in tk.key_ids
    # the kernel's id[0]: raw serial || issuer, matched by its last 4 bytes (the CN's tail)
    assert cert.issuer.public_bytes()[-4:] in tk.key_ids


@pytest.mark.parametrize("alg", ["sha1", "sha256", "sha384", "sha512"])
def test_rsa_and_ec_signatures_verify(
    alg: str, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    digest = hashlib.new(alg, b"payload").digest()
    ring = KeyRing.from_pems([_pem(_certificate(rsa_key)), _pem(_certificate(ec_key))])
    for key in (rsa_key, ec_key):
        assert ring.verify(sign_digest(key, digest, alg), digest, alg) is not None


def test_signature_over_another_digest_fails(rsa_key: rsa.RSAPrivateKey) -> None:
    ring = KeyRing([TrustedKey.from_public_key(rsa_key.public_key())])
    xattr = sign_digest(rsa_key, hashlib.sha256(b"a").digest(), "sha256")
    with pytest.raises(IMASignatureError, match="does not verify"):
        ring.verify(xattr, hashlib.sha256(b"b").digest(), "sha256")


def test_unknown_key_id(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    ring = KeyRing([TrustedKey.from_public_key(ec_key.public_key())])
    digest = hashlib.sha256(b"a").digest()
    with pytest.raises(UnknownKeyError, match="no trusted key has key id"):
        ring.verify(sign_digest(rsa_key, digest, "sha256"), digest, "sha256")


def test_same_key_id_other_key_fails(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """A signature naming a trusted key's id but made by another key does not verify."""
    ring = KeyRing([TrustedKey.from_public_key(rsa_key.public_key())])
    digest = hashlib.sha256(b"a").digest()
    forged = sign_digest(ec_key, digest, "sha256", key_id=key_id_v2(rsa_key.public_key()))
    with pytest.raises(IMASignatureError):
        ring.verify(forged, digest, "sha256")


def test_digest_algorithm_must_match(rsa_key: rsa.RSAPrivateKey) -> None:
    ring = KeyRing([TrustedKey.from_public_key(rsa_key.public_key())])
    digest = hashlib.sha256(b"a").digest()
    with pytest.raises(IMASignatureError, match="measured digest is sha384"):
        ring.verify(sign_digest(rsa_key, digest, "sha256"), digest, "sha384")


def test_kernel_spelling_of_sha3_is_the_signatures_hash(rsa_key: rsa.RSAPrivateKey) -> None:
    """The log names SHA3-256 ``sha3-256`` (the kernel's hash_algo_name); HASH_ALGO 20."""
    ring = KeyRing([TrustedKey.from_public_key(rsa_key.public_key())])
    digest = hashlib.sha3_256(b"a").digest()
    xattr = sign_digest(rsa_key, digest, "sha3_256")
    assert xattr[2] == 20
    assert ring.verify(xattr, digest, "sha3-256") is ring.keys[0]
    with pytest.raises(IMASignatureError, match="measured digest is sha256"):
        ring.verify(xattr, digest, "sha256")


@pytest.mark.parametrize("algorithm", ["sha256", "sha384", "sha512"])
def test_version_3_signs_the_file_id_of_an_fs_verity_digest(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey, algorithm: str
) -> None:
    ring = KeyRing(
        [
            TrustedKey.from_public_key(rsa_key.public_key(), "rsa"),
            TrustedKey.from_public_key(ec_key.public_key(), "ec"),
        ]
    )
    verity = hashlib.new(algorithm, b"fs-verity descriptor").digest()
    # struct ima_file_id: hash_type IMA_VERITY_DIGSIG (6), hash_algorithm (HASH_ALGO_*),
    # the digest; hashed with the digest's algorithm.
    number = {"sha256": 4, "sha384": 5, "sha512": 6}[algorithm]
    file_id = hashlib.new(algorithm, bytes([6, number]) + verity).digest()
    for key, name in ((rsa_key, "rsa"), (ec_key, "ec")):
        xattr = sign_digest(key, verity, algorithm, version=3)
        sig = IMASignature.from_bytes(xattr)
        assert (xattr[0], sig.version, sig.hash_name) == (0x06, 3, algorithm)
        assert ring.verify(xattr, verity, algorithm, digest_type="verity").name == name
        # What is signed is the file id's hash, not the digest.
        alg = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
        prehashed = Prehashed(alg[algorithm]())
        if name == "rsa":
            rsa_key.public_key().verify(sig.signature, file_id, padding.PKCS1v15(), prehashed)
        else:
            ec_key.public_key().verify(sig.signature, file_id, ec.ECDSA(prehashed))
        # Another digest of the same file does not verify.
        other = hashlib.new(algorithm, b"another descriptor").digest()
        with pytest.raises(IMASignatureError, match="does not verify"):
            ring.verify(xattr, other, algorithm, digest_type="verity")


def test_version_3_needs_an_fs_verity_digest(rsa_key: rsa.RSAPrivateKey) -> None:
    ring = KeyRing([TrustedKey.from_public_key(rsa_key.public_key())])
    digest = hashlib.sha256(b"a").digest()
    v3 = sign_digest(rsa_key, digest, "sha256", version=3)
    with pytest.raises(IMASignatureError, match=r"fs-verity digest.*'ima' digest"):
        ring.verify(v3, digest, "sha256", digest_type="ima")
    with pytest.raises(IMASignatureError, match="not typed as fs-verity"):
        ring.verify(v3, digest, "sha256")


def test_signature_versions_must_match_their_xattr_type(rsa_key: rsa.RSAPrivateKey) -> None:
    """The kernel refuses v3 in a 0x03 xattr and anything but v3 in a 0x06 one."""
    ring = KeyRing([TrustedKey.from_public_key(rsa_key.public_key())])
    digest = hashlib.sha256(b"a").digest()
    v2 = sign_digest(rsa_key, digest, "sha256")
    v3_in_digsig = v2[:1] + b"\x03" + v2[2:]
    with pytest.raises(IMASignatureError, match="invalid-signature-version"):
        ring.verify(v3_in_digsig, digest, "sha256", digest_type="verity")
    v3 = sign_digest(rsa_key, digest, "sha256", version=3)
    v2_in_verity = v3[:1] + b"\x02" + v3[2:]
    with pytest.raises(IMASignatureError, match="must be version 3"):
        ring.verify(v2_in_verity, digest, "sha256", digest_type="verity")


def test_evm_portable_signature_is_not_verifiable_from_the_log(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    """With no IMA signature the kernel logs the EVM portable one (type 0x05) in ``sig``."""
    ring = KeyRing([TrustedKey.from_public_key(rsa_key.public_key())])
    digest = hashlib.sha256(b"a").digest()
    evm = b"\x05" + sign_digest(rsa_key, digest, "sha256")[1:]
    with pytest.raises(IMASignatureUnsupportedError, match="EVM portable signature"):
        ring.verify(evm, digest, "sha256")


BAD_SIGNATURES = {
    "empty": b"",
    "short header": b"\x03\x02\x04\x00",
    "not a signature (digest xattr 0x04)": b"\x04\x02\x04" + bytes(4) + b"\x00\x01\x00",
    "version 1": b"\x03\x01\x04" + bytes(4) + b"\x00\x01\x00",
    "sig_size larger than the data": b"\x03\x02\x04" + bytes(4) + b"\x00\x10\x00",
    "sig_size smaller than the data": b"\x03\x02\x04" + bytes(4) + b"\x00\x01\x00\x00",
    "no signature bytes": b"\x03\x02\x04" + bytes(4) + b"\x00\x00",
}


@pytest.mark.parametrize("name", BAD_SIGNATURES)
def test_bad_signature_layouts(name: str) -> None:
    with pytest.raises(IMASignatureParseError):
        IMASignature.from_bytes(BAD_SIGNATURES[name])


def test_bad_key_material() -> None:
    with pytest.raises(IMASignatureParseError):
        TrustedKey.from_pem("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(IMASignatureParseError):
        TrustedKey.from_pem(b"not a key")


# -- in an appraisal ---------------------------------------------------------------------------


def _signed_ima(keys: list[tuple[bytes, bytes, bytes | None]]) -> list:
    return [es.ima_ng_entry(i, name, digest, sig=sig) for i, (name, digest, sig) in enumerate(keys)]


def test_signed_file_needs_no_digest_entry(rsa_key: rsa.RSAPrivateKey) -> None:
    node = es.SoftwareNode.new()
    digest = hashlib.sha256(b"signed binary").digest()
    sig = sign_digest(rsa_key, digest, "sha256")
    entries = _signed_ima(
        [
            (b"/usr/bin/signed", digest, sig),
            (b"/usr/bin/plain", hashlib.sha256(b"p").digest(), None),
        ]
    )
    bundle = node.bundle(boot=es.synthetic_boot(), ima_log=entries)
    doc = create_references([bundle]).to_dict()
    del doc["ima"]["files"]["/usr/bin/signed"]
    doc["ima"]["keys"] = [_pem(_certificate(rsa_key))]
    result = appraise(bundle, ReferenceValues.model_validate(doc), nonce=bundle.nonce)
    assert result.affirming, [f.describe() for f in result.failures]
    assert result.submodule("ima").details["files_signed"] == 1
    # without the key the same file is unknown
    doc["ima"]["keys"] = []
    result = appraise(bundle, ReferenceValues.model_validate(doc), nonce=bundle.nonce)
    assert [f.code for f in result.failures] == ["unknown-file"]
    assert result.failures[0].subject == "/usr/bin/signed"


def test_bad_signature_with_a_trusted_key_id_is_contraindicated(rsa_key: rsa.RSAPrivateKey) -> None:
    node = es.SoftwareNode.new()
    digest = hashlib.sha256(b"signed binary").digest()
    sig = sign_digest(rsa_key, hashlib.sha256(b"another file").digest(), "sha256")
    bundle = node.bundle(
        boot=es.synthetic_boot(), ima_log=_signed_ima([(b"/usr/bin/x", digest, sig)])
    )
    doc = create_references([bundle]).to_dict()
    doc["ima"]["keys"] = [_pem(_certificate(rsa_key))]
    result = appraise(bundle, ReferenceValues.model_validate(doc), nonce=bundle.nonce)
    assert result.status == "contraindicated"
    (f,) = result.failures
    assert (f.code, f.log, f.event, f.error) == ("file-signature", "ima", 0, "IMASignatureError")


def _appraise_signed(
    entries: list, keys: list[str], *, drop: tuple[str, ...] = ()
) -> AttestationResult:
    """Appraise a software node's bundle with ``entries``; ``drop`` paths leave the references."""
    node = es.SoftwareNode.new()
    bundle = node.bundle(boot=es.synthetic_boot(), ima_log=entries)
    doc = create_references([bundle]).to_dict()
    for path in drop:
        del doc["ima"]["files"][path]
    doc["ima"]["keys"] = keys
    return appraise(bundle, ReferenceValues.model_validate(doc), nonce=bundle.nonce)


def test_fs_verity_signature_in_an_ima_sigv2_entry(rsa_key: rsa.RSAPrivateKey) -> None:
    """``ima-sigv2``: d-ngv2 'verity:sha256:' digest and a version 3 signature."""
    verity = hashlib.sha256(b"fs-verity descriptor of /usr/bin/v").digest()
    sig = sign_digest(rsa_key, verity, "sha256", version=3)
    name = b"/usr/bin/v\x00"
    good = es.ima_template_entry(0, "ima-sigv2", [b"verity:sha256:\x00" + verity, name, sig])
    keys = [_pem(_certificate(rsa_key))]
    result = _appraise_signed([good], keys, drop=("/usr/bin/v",))
    assert result.affirming, [f.describe() for f in result.failures]
    assert result.submodule("ima").details["files_signed"] == 1
    # The same digest typed as a plain IMA digest: a v3 signature does not cover it.
    plain = es.ima_template_entry(0, "ima-sigv2", [b"ima:sha256:\x00" + verity, name, sig])
    result = _appraise_signed([plain], keys, drop=("/usr/bin/v",))
    (f,) = result.failures
    assert (f.code, f.error, f.subject) == ("file-signature", "IMASignatureError", "/usr/bin/v")
    assert "fs-verity" in f.reason


def test_evm_portable_signature_in_the_sig_field_falls_back_to_the_digest(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    """The kernel logs the EVM portable signature (0x05) when the file has no IMA one."""
    digest = hashlib.sha256(b"evm-signed file").digest()
    evm = b"\x05" + sign_digest(rsa_key, digest, "sha256")[1:]
    entries = _signed_ima([(b"/usr/bin/e", digest, evm)])
    keys = [_pem(_certificate(rsa_key))]
    result = _appraise_signed(entries, keys)
    assert result.affirming, [f.describe() for f in result.failures]
    assert result.submodule("ima").details["files_known"] == 1
    result = _appraise_signed(entries, keys, drop=("/usr/bin/e",))
    assert [f.code for f in result.failures] == ["unknown-file"]


# -- evmctl ------------------------------------------------------------------------------------


def _evmctl_sign(tmp_path: Path, key_pem: Path, target: Path, *extra: str) -> bytes:
    """Sign ``target`` with evmctl; return its security.ima value (xattr, else the .sig file)."""
    proc = subprocess.run(
        ["evmctl", "ima_sign", "--key", str(key_pem), "-a", "sha256", *extra, str(target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0 and "--sigfile" not in extra:
        # No extended attributes here (or no permission): the .sig file holds the same value.
        return _evmctl_sign(tmp_path, key_pem, target, *extra, "--sigfile")
    assert proc.returncode == 0, proc.stderr
    if "--sigfile" in extra:
        return Path(f"{target}.sig").read_bytes()
    try:
        return os.getxattr(target, "security.ima")
    except OSError:
        return _evmctl_sign(tmp_path, key_pem, target, *extra, "--sigfile")


needs_evmctl = pytest.mark.skipif(
    shutil.which("evmctl") is None, reason="evmctl (Debian ima-evm-utils) is not installed"
)


@needs_evmctl
@pytest.mark.peer
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_evmctl_signature_verifies(
    tmp_path: Path, kind: str, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    key = rsa_key if kind == "rsa" else ec_key
    key_pem = tmp_path / "key.pem"
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    target = tmp_path / "program"
    target.write_bytes(b"#!/bin/sh\necho measured\n" * 100)
    xattr = _evmctl_sign(tmp_path, key_pem, target)
    sig = IMASignature.from_bytes(xattr)
    assert sig.hash_name == "sha256"
    assert sig.key_id == key_id_v2(key.public_key())
    digest = hashlib.sha256(target.read_bytes()).digest()
    ring = KeyRing.from_pems([_pem(_certificate(key))])
    assert ring.verify(xattr, digest, "sha256").certificate is not None
    with pytest.raises(IMASignatureError):
        ring.verify(xattr, hashlib.sha256(b"other").digest(), "sha256")


@needs_evmctl
@pytest.mark.peer
def test_evmctl_keyid_from_certificate(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """evmctl --keyid-from-cert writes the SKI's tail, which the kernel (and we) match too.

    The certificate's SKI is not the SHA-1 of its key, so the two key ids differ.
    """
    key_pem = tmp_path / "key.pem"
    key_pem.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    cert = _certificate(rsa_key, ski=bytes(range(1, 21)))
    cert_pem = tmp_path / "cert.pem"
    cert_pem.write_text(_pem(cert))
    help_text = subprocess.run(
        ["evmctl", "--help"], capture_output=True, text=True, check=False
    ).stdout
    if "--keyid-from-cert" not in help_text:
        pytest.skip("this evmctl has no --keyid-from-cert")
    target = tmp_path / "file"
    target.write_bytes(b"data")
    xattr = _evmctl_sign(tmp_path, key_pem, target, "--keyid-from-cert", str(cert_pem))
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert IMASignature.from_bytes(xattr).key_id == ski[-4:] == bytes([17, 18, 19, 20])
    assert ski[-4:] != key_id_v2(rsa_key.public_key())
    KeyRing.from_pems([_pem(cert)]).verify(xattr, hashlib.sha256(b"data").digest(), "sha256")
