"""Appended PKCS#7 signatures (``ima-modsig``'s ``modsig``): split, parse, verify.

The signatures come from real producers: the kernel's own ``scripts/sign-file``
(Debian ``linux-kbuild-*``), which appends ``PKCS#7 || struct module_signature ||
"~Module signature appended~\\n"`` to a file, and ``openssl cms -sign`` for
detached messages with and without authenticated attributes, with a subject
key identifier, with RSASSA-PSS and with two signers. Keys and self-signed
certificates are made once per module with ``openssl req -x509``.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cima.verifier.imasig import (
    IMASignatureError,
    IMASignatureParseError,
    IMASignatureUnsupportedError,
    KeyRing,
    TrustedKey,
    UnknownKeyError,
)
from cima.verifier.modsig import (
    MODULE_SIG_STRING,
    ModuleSignature,
    modsig_digest,
    split_appended_signature,
    verify_modsig,
)

DOCUMENTED = (IMASignatureError, IMASignatureParseError)


def _find_sign_file() -> str | None:
    found = shutil.which("sign-file")
    if found:
        return found
    for pattern in (
        "/usr/lib/linux-kbuild-*/scripts/sign-file",
        "/usr/src/linux-headers-*/scripts/sign-file",
    ):
        matches = sorted(glob.glob(pattern))
        if matches:
            return matches[-1]
    return None


SIGN_FILE = _find_sign_file()
OPENSSL = shutil.which("openssl")


@dataclass(frozen=True)
class Signer:
    """A key and its self-signed certificate, as files, and the parsed certificate."""

    key: Path
    cert_pem: Path
    cert_der: Path
    pub_pem: Path
    cert: x509.Certificate

    @property
    def issuer_serial(self) -> str:
        return f"issuer {self.cert.issuer.rfc4514_string()}, serial {self.cert.serial_number:#x}"

    @property
    def skid(self) -> bytes:
        ext = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return ext.value.digest

    def ring(self) -> KeyRing:
        return KeyRing.from_pems([self.cert_pem.read_bytes()])

    def bare_ring(self) -> KeyRing:
        return KeyRing.from_pems([self.pub_pem.read_bytes()])


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed: {done.stderr.decode(errors='replace')}")


def _make_signer(
    tools: dict[str, str], where: Path, name: str, newkey: list[str], *extra: str
) -> Signer:
    key, pem, der, pub = (where / f"{name}{ext}" for ext in (".key", ".pem", ".der", ".pub"))
    _run(
        tools["openssl"], "req", "-x509", *newkey, "-nodes", "-keyout", str(key),
        "-out", str(pem), "-subj", f"/CN={name}", "-days", "2",
        "-addext", "subjectKeyIdentifier=hash", *extra,
    )  # fmt: skip
    _run(tools["openssl"], "x509", "-in", str(pem), "-outform", "DER", "-out", str(der))
    _run(tools["openssl"], "x509", "-in", str(pem), "-pubkey", "-noout", "-out", str(pub))
    return Signer(key, pem, der, pub, x509.load_pem_x509_certificate(pem.read_bytes()))


RSA = ["-newkey", "rsa:2048"]
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]


@pytest.fixture(scope="module")
def tools() -> dict[str, str]:
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    if SIGN_FILE is None:
        pytest.skip(
            "the kernel's scripts/sign-file is not installed (Debian linux-kbuild-*, "
            "/usr/lib/linux-kbuild-*/scripts/sign-file)"
        )
    return {"openssl": OPENSSL, "sign-file": SIGN_FILE}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("modsig")


@pytest.fixture(scope="module")
def content(work: Path) -> Path:
    path = work / "module.ko"
    path.write_bytes(os.urandom(6000))
    return path


@pytest.fixture(scope="module")
def rsa_signer(tools: dict[str, str], work: Path) -> Signer:
    return _make_signer(tools, work, "modsig rsa", RSA)


@pytest.fixture(scope="module")
def ec_signer(tools: dict[str, str], work: Path) -> Signer:
    return _make_signer(tools, work, "modsig ec", EC)


@pytest.fixture(scope="module")
def stranger(tools: dict[str, str], work: Path) -> Signer:
    return _make_signer(tools, work, "stranger", EC)


@pytest.fixture(scope="module")
def forged_rsa(tools: dict[str, str], work: Path, rsa_signer: Signer) -> Signer:
    """Another RSA key whose certificate has the RSA signer's issuer and serial number."""
    serial = f"{rsa_signer.cert.serial_number:#x}"
    (work / "forged").mkdir(exist_ok=True)
    return _make_signer(tools, work / "forged", "modsig rsa", RSA, "-set_serial", serial)


@pytest.fixture(scope="module")
def forged_ec(tools: dict[str, str], work: Path, rsa_signer: Signer) -> Signer:
    """An EC key whose certificate has the RSA signer's issuer and serial number."""
    serial = f"{rsa_signer.cert.serial_number:#x}"
    (work / "forged-ec").mkdir(exist_ok=True)
    return _make_signer(tools, work / "forged-ec", "modsig rsa", EC, "-set_serial", serial)


def _sign_file(
    tools: dict[str, str],
    signer: Signer,
    hash_algo: str,
    source: Path,
    *,
    keyid: bool = False,
    der_cert: bool = False,
) -> bytes:
    dest = source.with_name(f"{source.name}.{os.urandom(4).hex()}.signed")
    cert = signer.cert_der if der_cert else signer.cert_pem
    flags = ["-k"] if keyid else []
    _run(tools["sign-file"], *flags, hash_algo, str(signer.key), str(cert), str(source), str(dest))
    return dest.read_bytes()


def _cms(tools: dict[str, str], signers: list[Signer], source: Path, *extra: str) -> bytes:
    out = source.with_name(f"{source.name}.{os.urandom(4).hex()}.p7")
    who = [a for s in signers for a in ("-signer", str(s.cert_pem), "-inkey", str(s.key))]
    _run(
        tools["openssl"], "cms", "-sign", "-binary", "-nocerts", "-outform", "DER",
        *who, "-in", str(source), "-out", str(out), *extra,
    )  # fmt: skip
    return out.read_bytes()


def _same_key(found: TrustedKey, signer: Signer) -> bool:
    return found.public_key.public_numbers() == signer.cert.public_key().public_numbers()


@pytest.fixture(scope="module")
def rsa_signed(tools: dict[str, str], rsa_signer: Signer, content: Path) -> bytes:
    return _sign_file(tools, rsa_signer, "sha256", content)


@pytest.fixture(scope="module")
def attr_signature(tools: dict[str, str], rsa_signer: Signer, content: Path) -> bytes:
    return _cms(tools, [rsa_signer], content, "-md", "sha256")


# -- sign-file ------------------------------------------------------------------------------------


@pytest.mark.parametrize("hash_algo", ["sha256", "sha512"])
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_sign_file_signature_verifies(
    tools: dict[str, str],
    content: Path,
    kind: str,
    hash_algo: str,
    request: pytest.FixtureRequest,
) -> None:
    signer: Signer = request.getfixturevalue(f"{kind}_signer")
    signed = _sign_file(tools, signer, hash_algo, content)
    body, pkcs7 = split_appended_signature(signed)
    assert body == content.read_bytes()
    assert signed == body + pkcs7 + signed[len(body) + len(pkcs7) :]
    sig = ModuleSignature.from_der(pkcs7)
    assert sig.digest_algorithm == hash_algo
    assert sig.signers == (signer.issuer_serial,)
    assert sig.to_dict() == {
        "digest_algorithm": hash_algo,
        "signers": [signer.issuer_serial],
        "size": len(pkcs7),
    }
    digest = modsig_digest(body, hash_algo)
    assert digest == hashlib.new(hash_algo, body).digest()
    for given_sig in (pkcs7, sig):
        found = verify_modsig(given_sig, hash_algo, digest, signer.ring())
        assert found.certificate == signer.cert
        assert _same_key(found, signer)


def test_sign_file_with_a_der_certificate(
    tools: dict[str, str], rsa_signer: Signer, content: Path
) -> None:
    body, pkcs7 = split_appended_signature(
        _sign_file(tools, rsa_signer, "sha256", content, der_cert=True)
    )
    found = verify_modsig(pkcs7, "sha256", modsig_digest(body, "sha256"), rsa_signer.ring())
    assert found.certificate == rsa_signer.cert


@pytest.mark.parametrize("name", ["sha3-256", "sha3_256"])
def test_sha3_takes_the_kernel_names(
    tools: dict[str, str], rsa_signer: Signer, content: Path, name: str
) -> None:
    body, pkcs7 = split_appended_signature(_sign_file(tools, rsa_signer, "sha3-256", content))
    assert ModuleSignature.from_der(pkcs7).digest_algorithm == "sha3_256"
    digest = modsig_digest(body, name)
    assert digest == hashlib.sha3_256(body).digest()
    assert _same_key(verify_modsig(pkcs7, name, digest, rsa_signer.ring()), rsa_signer)


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_sign_file_keyid_names_the_skid(
    tools: dict[str, str], content: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """``sign-file -k`` names the signer by its certificate's Subject Key Identifier."""
    signer: Signer = request.getfixturevalue(f"{kind}_signer")
    body, pkcs7 = split_appended_signature(_sign_file(tools, signer, "sha256", content, keyid=True))
    assert ModuleSignature.from_der(pkcs7).signers == (f"skid {signer.skid.hex()}",)
    digest = modsig_digest(body, "sha256")
    assert verify_modsig(pkcs7, "sha256", digest, signer.ring()).certificate == signer.cert
    # A bare public key answers to the SHA-1 of its key bits (openssl's subjectKeyIdentifier=hash).
    bare = verify_modsig(pkcs7, "sha256", digest, signer.bare_ring())
    assert bare.certificate is None
    assert _same_key(bare, signer)


def test_signer_issuer_is_shown_as_rfc4514(
    tools: dict[str, str], work: Path, content: Path
) -> None:
    """Special characters and a multi-valued RDN are shown as cryptography shows the Name."""
    folder = work / "odd"
    folder.mkdir(exist_ok=True)
    key, pem = folder / "odd.key", folder / "odd.pem"
    _run(
        tools["openssl"], "req", "-x509", *EC, "-nodes", "-keyout", str(key), "-out", str(pem),
        "-subj", "/C=DE/O=a, b+OU=x=y/CN= lead#", "-multivalue-rdn", "-days", "2",
    )  # fmt: skip
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    odd = Signer(key, pem, pem, pem, cert)
    sig = ModuleSignature.from_der(_cms(tools, [odd], content, "-noattr"))
    assert sig.signers == (odd.issuer_serial,)
    assert "+" in cert.issuer.rfc4514_string()
    digest = modsig_digest(content.read_bytes(), sig.digest_algorithm)
    assert verify_modsig(sig, sig.digest_algorithm, digest, odd.ring()).certificate == cert


def test_bare_key_does_not_answer_to_issuer_and_serial(
    rsa_signer: Signer, rsa_signed: bytes
) -> None:
    body, pkcs7 = split_appended_signature(rsa_signed)
    with pytest.raises(UnknownKeyError, match="no trusted key"):
        verify_modsig(pkcs7, "sha256", modsig_digest(body, "sha256"), rsa_signer.bare_ring())


def test_ring_with_several_keys_returns_the_signer(
    rsa_signer: Signer, ec_signer: Signer, stranger: Signer, rsa_signed: bytes
) -> None:
    ring = KeyRing.from_pems([s.cert_pem.read_bytes() for s in (stranger, ec_signer, rsa_signer)])
    body, pkcs7 = split_appended_signature(rsa_signed)
    assert verify_modsig(pkcs7, "sha256", modsig_digest(body, "sha256"), ring).certificate == (
        rsa_signer.cert
    )


# -- openssl cms ----------------------------------------------------------------------------------


@pytest.mark.parametrize("keyid", [False, True], ids=["issuer-serial", "skid"])
@pytest.mark.parametrize("attributes", [True, False], ids=["signed-attrs", "noattr"])
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_openssl_cms_signature_verifies(
    tools: dict[str, str],
    content: Path,
    kind: str,
    attributes: bool,
    keyid: bool,
    request: pytest.FixtureRequest,
) -> None:
    signer: Signer = request.getfixturevalue(f"{kind}_signer")
    extra = ["-md", "sha384"]
    extra += [] if attributes else ["-noattr"]
    extra += ["-keyid"] if keyid else []
    pkcs7 = _cms(tools, [signer], content, *extra)
    info = cms.ContentInfo.load(pkcs7)["content"]["signer_infos"][0]
    assert (info["signed_attrs"].native is not None) == attributes
    sig = ModuleSignature.from_der(pkcs7)
    assert sig.digest_algorithm == "sha384"
    assert sig.signers == ((f"skid {signer.skid.hex()}",) if keyid else (signer.issuer_serial,))
    digest = modsig_digest(content.read_bytes(), "sha384")
    if attributes:
        # The kernel refuses a module signature with authenticated attributes, and so do we
        # unless told otherwise: then it verifies as the CMS signature it is.
        with pytest.raises(IMASignatureError, match="has authattrs"):
            verify_modsig(sig, "sha384", digest, signer.ring())
    verified = verify_modsig(sig, "sha384", digest, signer.ring(), authenticated_attributes=True)
    assert verified.certificate == signer.cert


def test_message_digest_attribute_must_be_the_content_digest(
    rsa_signer: Signer, attr_signature: bytes, content: Path
) -> None:
    other = bytearray(content.read_bytes())
    other[0] ^= 1
    with pytest.raises(IMASignatureError, match="messageDigest"):
        verify_modsig(attr_signature, "sha256", modsig_digest(other, "sha256"), rsa_signer.ring())


def test_message_digest_is_checked_whoever_signed(
    stranger: Signer, attr_signature: bytes, content: Path
) -> None:
    """pkcs7_verify digests every signer before trust: a bad messageDigest fails the message."""
    digest = modsig_digest(content.read_bytes() + b"x", "sha256")
    with pytest.raises(IMASignatureError, match="messageDigest"):
        verify_modsig(attr_signature, "sha256", digest, stranger.ring())


@pytest.mark.parametrize("attributes", [True, False], ids=["signed-attrs", "noattr"])
def test_rsassa_pss(
    tools: dict[str, str],
    rsa_signer: Signer,
    forged_rsa: Signer,
    content: Path,
    attributes: bool,
) -> None:
    extra = ["-md", "sha256", "-keyopt", "rsa_padding_mode:pss"]
    pkcs7 = _cms(tools, [rsa_signer], content, *extra, *([] if attributes else ["-noattr"]))
    algorithm = cms.ContentInfo.load(pkcs7)["content"]["signer_infos"][0]["signature_algorithm"]
    assert algorithm["algorithm"].native == "rsassa_pss"
    digest = modsig_digest(content.read_bytes(), "sha256")
    opt = {"authenticated_attributes": attributes}
    assert _same_key(verify_modsig(pkcs7, "sha256", digest, rsa_signer.ring(), **opt), rsa_signer)
    with pytest.raises(IMASignatureError, match="does not verify"):
        verify_modsig(pkcs7, "sha256", digest, forged_rsa.ring(), **opt)


def test_two_signers_one_trusted(
    tools: dict[str, str], rsa_signer: Signer, ec_signer: Signer, content: Path
) -> None:
    pkcs7 = _cms(tools, [rsa_signer, ec_signer], content, "-md", "sha256", "-noattr")
    sig = ModuleSignature.from_der(pkcs7)
    assert sorted(sig.signers) == sorted([rsa_signer.issuer_serial, ec_signer.issuer_serial])
    digest = modsig_digest(content.read_bytes(), "sha256")
    for signer in (rsa_signer, ec_signer):
        assert verify_modsig(sig, "sha256", digest, signer.ring()).certificate == signer.cert


def test_a_trusted_signer_that_fails_fails_the_message(
    tools: dict[str, str],
    rsa_signer: Signer,
    ec_signer: Signer,
    forged_rsa: Signer,
    content: Path,
) -> None:
    """pkcs7_validate_trust: one good signer does not excuse a trusted one that fails."""
    pkcs7 = _cms(tools, [rsa_signer, ec_signer], content, "-md", "sha256", "-noattr")
    ring = KeyRing.from_pems([ec_signer.cert_pem.read_bytes(), forged_rsa.cert_pem.read_bytes()])
    with pytest.raises(IMASignatureError, match="does not verify"):
        verify_modsig(pkcs7, "sha256", modsig_digest(content.read_bytes(), "sha256"), ring)


def test_a_signer_with_another_digest_is_unsupported(
    tools: dict[str, str], rsa_signer: Signer, ec_signer: Signer, content: Path
) -> None:
    """The log holds the first signer's digest only; another signer's cannot be checked.

    The two-signer message joins the SignerInfos of two real messages (sha256 and
    sha512): ``openssl cms -resign`` cannot add a signer with another digest. DER
    sorts the SET OF SignerInfo, which decides the first signer.
    """
    made = {
        rsa_signer.issuer_serial: (
            rsa_signer,
            "sha256",
            _cms(tools, [rsa_signer], content, "-md", "sha256", "-noattr"),
        ),
        ec_signer.issuer_serial: (
            ec_signer,
            "sha512",
            _cms(tools, [ec_signer], content, "-md", "sha512", "-noattr"),
        ),
    }
    sig = ModuleSignature.from_der(_join(*(m[2] for m in made.values())))
    assert sorted(sig.signers) == sorted(made)
    lead, lead_alg, _ = made[sig.signers[0]]
    other = made[sig.signers[1]][0]
    assert sig.digest_algorithm == lead_alg
    digest = modsig_digest(content.read_bytes(), lead_alg)
    assert verify_modsig(sig, lead_alg, digest, lead.ring()).certificate == lead.cert
    with pytest.raises(IMASignatureUnsupportedError, match="digest"):
        verify_modsig(sig, lead_alg, digest, other.ring())
    both = KeyRing.from_pems([other.cert_pem.read_bytes(), lead.cert_pem.read_bytes()])
    assert verify_modsig(sig, lead_alg, digest, both).certificate == lead.cert


def _join(first: bytes, second: bytes) -> bytes:
    """``first`` with the SignerInfos (and digest algorithms) of ``second`` after its own."""
    extra = cms.ContentInfo.load(second)["content"]

    def join(signed: cms.SignedData) -> None:
        signed["digest_algorithms"] = cms.DigestAlgorithms(
            [*signed["digest_algorithms"], *extra["digest_algorithms"]]
        )
        signed["signer_infos"] = cms.SignerInfos([*signed["signer_infos"], *extra["signer_infos"]])

    return _edited(first, join)


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["sign-file", "cms-noattr", "cms-attrs"])
def test_flipped_content_byte_does_not_verify(
    tools: dict[str, str], rsa_signer: Signer, content: Path, source: str
) -> None:
    if source == "sign-file":
        body, pkcs7 = split_appended_signature(_sign_file(tools, rsa_signer, "sha256", content))
    else:
        extra = ["-noattr"] if source == "cms-noattr" else []
        body, pkcs7 = content.read_bytes(), _cms(tools, [rsa_signer], content, *extra)
    flipped = bytearray(body)
    flipped[len(flipped) // 2] ^= 0x40
    with pytest.raises(IMASignatureError) as e:
        verify_modsig(pkcs7, "sha256", modsig_digest(flipped, "sha256"), rsa_signer.ring())
    assert not isinstance(e.value, UnknownKeyError | IMASignatureUnsupportedError)


def test_digest_algorithm_must_be_the_signers(rsa_signer: Signer, rsa_signed: bytes) -> None:
    body, pkcs7 = split_appended_signature(rsa_signed)
    with pytest.raises(IMASignatureError, match="digest algorithm is sha256"):
        verify_modsig(pkcs7, "sha512", modsig_digest(body, "sha512"), rsa_signer.ring())
    with pytest.raises(IMASignatureError, match="32 bytes"):
        verify_modsig(pkcs7, "sha256", modsig_digest(body, "sha256")[:20], rsa_signer.ring())


def test_untrusted_signer_is_unknown(
    stranger: Signer, rsa_signed: bytes, attr_signature: bytes, content: Path
) -> None:
    body, pkcs7 = split_appended_signature(rsa_signed)
    digest = modsig_digest(body, "sha256")
    for ring in (stranger.ring(), stranger.bare_ring(), KeyRing()):
        with pytest.raises(UnknownKeyError, match="modsig rsa"):
            verify_modsig(pkcs7, "sha256", digest, ring)
        with pytest.raises(UnknownKeyError):
            verify_modsig(attr_signature, "sha256", digest, ring, authenticated_attributes=True)


def test_forged_issuer_and_serial_does_not_verify(
    rsa_signer: Signer, forged_rsa: Signer, forged_ec: Signer, rsa_signed: bytes
) -> None:
    assert forged_rsa.cert.issuer == rsa_signer.cert.issuer
    assert forged_rsa.cert.serial_number == rsa_signer.cert.serial_number
    body, pkcs7 = split_appended_signature(rsa_signed)
    digest = modsig_digest(body, "sha256")
    with pytest.raises(IMASignatureError, match="does not verify") as e:
        verify_modsig(pkcs7, "sha256", digest, forged_rsa.ring())
    assert not isinstance(e.value, UnknownKeyError)
    with pytest.raises(IMASignatureError, match="not RSA") as e:
        verify_modsig(pkcs7, "sha256", digest, forged_ec.ring())
    assert not isinstance(e.value, UnknownKeyError)
    # With the real certificate beside the forged one, the real one verifies.
    ring = KeyRing.from_pems([forged_rsa.cert_pem.read_bytes(), rsa_signer.cert_pem.read_bytes()])
    assert verify_modsig(pkcs7, "sha256", digest, ring).certificate == rsa_signer.cert


def test_modsig_digest_of_an_unknown_algorithm(content: Path) -> None:
    with pytest.raises(IMASignatureUnsupportedError):
        modsig_digest(content.read_bytes(), "streebog256")
    with pytest.raises(IMASignatureUnsupportedError):
        modsig_digest(content.read_bytes(), "no-such-hash")


# -- malformed messages ---------------------------------------------------------------------------


def _only_documented(call: Callable[[], object]) -> None:
    with contextlib.suppress(*DOCUMENTED):
        call()


def test_every_truncation_raises_only_documented_errors(
    rsa_signer: Signer, rsa_signed: bytes, attr_signature: bytes, content: Path
) -> None:
    body, pkcs7 = split_appended_signature(rsa_signed)
    digest = modsig_digest(body, "sha256")
    ring = rsa_signer.ring()
    for whole in (pkcs7, attr_signature):
        for n in range(len(whole)):
            with pytest.raises(IMASignatureParseError):
                ModuleSignature.from_der(whole[:n])
            with pytest.raises(IMASignatureParseError):
                verify_modsig(whole[:n], "sha256", digest, ring)


def test_every_byte_mutation_raises_only_documented_errors(
    rsa_signer: Signer, rsa_signed: bytes, attr_signature: bytes
) -> None:
    body, pkcs7 = split_appended_signature(rsa_signed)
    digest = modsig_digest(body, "sha256")
    ring = rsa_signer.ring()
    for whole in (pkcs7, attr_signature):
        for n in range(len(whole)):
            for value in (whole[n] ^ 0x01, whole[n] ^ 0x80, 0x00, 0xFF):
                mutated = whole[:n] + bytes([value]) + whole[n + 1 :]
                if mutated != whole:
                    _only_documented(lambda m=mutated: verify_modsig(m, "sha256", digest, ring))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=700))
def test_random_bytes_raise_only_documented_errors(data: bytes) -> None:
    ring = KeyRing()
    _only_documented(lambda: verify_modsig(data, "sha256", bytes(32), ring))
    _only_documented(lambda: split_appended_signature(data))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_edits_of_a_real_signature_raise_only_documented_errors(
    rsa_signer: Signer, attr_signature: bytes, data: st.DataObject
) -> None:
    whole = bytearray(attr_signature)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(whole) - 1))
        whole[at : at + data.draw(st.integers(0, 3))] = data.draw(st.binary(max_size=3))
        if not whole:
            break
    ring = rsa_signer.ring()
    _only_documented(lambda: verify_modsig(bytes(whole), "sha256", bytes(32), ring))


def test_trailing_garbage_is_refused_at_its_offset(attr_signature: bytes) -> None:
    with pytest.raises(IMASignatureParseError, match="follow") as e:
        ModuleSignature.from_der(attr_signature + b"\x00\x00")
    assert e.value.offset == len(attr_signature)


def test_not_signed_data(rsa_signer: Signer) -> None:
    with pytest.raises(IMASignatureParseError):
        ModuleSignature.from_der(rsa_signer.cert_der.read_bytes())
    data = cms.ContentInfo({"content_type": "data", "content": b"module"}).dump()
    with pytest.raises(IMASignatureParseError, match="not signedData") as e:
        ModuleSignature.from_der(data)
    assert e.value.offset is not None


def test_attached_content_is_refused(
    tools: dict[str, str], rsa_signer: Signer, content: Path
) -> None:
    pkcs7 = _cms(tools, [rsa_signer], content, "-nodetach", "-noattr")
    with pytest.raises(IMASignatureParseError, match="detached") as e:
        ModuleSignature.from_der(pkcs7)
    assert e.value.offset is not None


def _edited(pkcs7: bytes, edit: Callable[[cms.SignedData], None]) -> bytes:
    info = cms.ContentInfo.load(pkcs7)
    signed = info["content"]
    edit(signed)
    return cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump(force=True)


def test_no_signer_info(rsa_signed: bytes) -> None:
    _, pkcs7 = split_appended_signature(rsa_signed)

    def drop(signed: cms.SignedData) -> None:
        signed["signer_infos"] = cms.SignerInfos([])

    with pytest.raises(IMASignatureParseError, match="no SignerInfo"):
        ModuleSignature.from_der(_edited(pkcs7, drop))


def test_signer_info_version_must_match_its_identifier(rsa_signed: bytes) -> None:
    _, pkcs7 = split_appended_signature(rsa_signed)

    def v3(signed: cms.SignedData) -> None:
        signed["signer_infos"][0]["version"] = "v3"

    with pytest.raises(IMASignatureParseError, match="version 3"):
        ModuleSignature.from_der(_edited(pkcs7, v3))


def test_authenticated_attributes_in_some_signers_only(
    tools: dict[str, str], rsa_signer: Signer, ec_signer: Signer, content: Path
) -> None:
    pkcs7 = _cms(tools, [rsa_signer, ec_signer], content, "-md", "sha256")

    def strip_first(signed: cms.SignedData) -> None:
        first = signed["signer_infos"][0]
        first["signed_attrs"] = None
        signed["signer_infos"] = cms.SignerInfos([first, signed["signer_infos"][1]])

    with pytest.raises(IMASignatureParseError, match="some SignerInfos"):
        ModuleSignature.from_der(_edited(pkcs7, strip_first))


# -- split_appended_signature ---------------------------------------------------------------------

TAIL = 12 + len(MODULE_SIG_STRING)


def test_split_without_marker(rsa_signed: bytes) -> None:
    with pytest.raises(IMASignatureParseError, match="marker") as e:
        split_appended_signature(rsa_signed[:-1] + b"?")
    assert e.value.offset == len(rsa_signed) - len(MODULE_SIG_STRING)
    with pytest.raises(IMASignatureParseError) as e:
        split_appended_signature(rsa_signed[-TAIL:])
    assert e.value.offset == 0


@pytest.mark.parametrize("excess", [0, 1, 1 << 20])
def test_split_sig_len_too_large(rsa_signed: bytes, excess: int) -> None:
    """mod_check_sig: sig_len must be less than the bytes before the struct."""
    at = len(rsa_signed) - TAIL
    patched = bytearray(rsa_signed)
    struct.pack_into(">I", patched, at + 8, at + excess)
    with pytest.raises(IMASignatureParseError, match="bytes of signature") as e:
        split_appended_signature(bytes(patched))
    assert e.value.offset == at + 8
    struct.pack_into(">I", patched, at + 8, at - 1)  # one byte of content is enough
    content, pkcs7 = split_appended_signature(bytes(patched))
    assert (content, len(pkcs7)) == (rsa_signed[:1], at - 1)


@pytest.mark.parametrize(
    ("field", "delta", "value"),
    [
        ("algo", 0, 1),
        ("hash", 1, 4),
        ("id_type", 2, 1),
        ("signer_len", 3, 8),
        ("key_id_len", 4, 4),
        ("padding", 5, 1),
        ("padding", 6, 1),
        ("padding", 7, 1),
    ],
)
def test_split_refuses_non_pkcs7_struct(
    rsa_signed: bytes, field: str, delta: int, value: int
) -> None:
    at = len(rsa_signed) - TAIL
    patched = bytearray(rsa_signed)
    patched[at + delta] = value
    with pytest.raises(IMASignatureParseError, match=field) as e:
        split_appended_signature(bytes(patched))
    assert e.value.offset == at + delta


# -- in an appraisal ------------------------------------------------------------------------------


def _modsig_entry(index: int, path: bytes, signed: bytes, *, sig: bytes = b"") -> object:
    """The ima-modsig entry IMA writes for ``signed`` (d-ng|n-ng|sig|d-modsig|modsig).

    d-ng is the digest of the whole file; d-modsig that of the file without its
    appended signature, with the signer's algorithm (sha256 here).
    """
    from tests.verifier import evidence_sets as es

    body, pkcs7 = split_appended_signature(signed)
    return es.ima_template_entry(
        index,
        "ima-modsig",
        [
            b"sha256:\x00" + hashlib.sha256(signed).digest(),
            path + b"\x00",
            sig,
            b"sha256:\x00" + modsig_digest(body, "sha256"),
            pkcs7,
        ],
    )


def _appraise(entries: list[object], keys: list[str], drop: tuple[str, ...] = ()) -> object:
    from cima.verifier.appraise import appraise
    from cima.verifier.reference import ReferenceValues, create_references
    from tests.verifier import evidence_sets as es

    node = es.SoftwareNode.new()
    bundle = node.bundle(boot=es.synthetic_boot(), ima_log=entries)
    doc = create_references([bundle]).to_dict()
    for path in drop:
        del doc["ima"]["files"][path]
    doc["ima"]["keys"] = keys
    return appraise(bundle, ReferenceValues.model_validate(doc), nonce=bundle.nonce)


def test_signed_module_needs_no_digest_entry(
    rsa_signer: Signer, stranger: Signer, rsa_signed: bytes
) -> None:
    path = "/lib/modules/6.1/extra/m.ko"
    entries = [_modsig_entry(0, path.encode(), rsa_signed)]
    result: Any = _appraise(entries, [rsa_signer.cert_pem.read_text()], drop=(path,))
    assert result.affirming, [f.describe() for f in result.failures]
    assert result.submodule("ima").details["files_signed"] == 1
    # An untrusted signer: the digest decides (here: none, so the file is unknown).
    result = _appraise(entries, [stranger.cert_pem.read_text()], drop=(path,))
    assert [f.code for f in result.failures] == ["unknown-file"]
    result = _appraise(entries, [stranger.cert_pem.read_text()])
    assert result.affirming


def test_module_whose_content_is_not_what_was_signed_is_contraindicated(
    rsa_signer: Signer, rsa_signed: bytes
) -> None:
    path = "/lib/modules/6.1/extra/m.ko"
    body, _ = split_appended_signature(rsa_signed)
    tampered = bytearray(body)
    tampered[100] ^= 1
    forged = bytes(tampered) + rsa_signed[len(body) :]
    result: Any = _appraise(
        [_modsig_entry(0, path.encode(), forged)], [rsa_signer.cert_pem.read_text()]
    )
    (f,) = result.failures
    assert (f.code, f.error, f.subject, f.event) == ("file-modsig", "IMASignatureError", path, 0)


def test_xattr_signature_first_then_the_appended_one(
    rsa_signer: Signer, stranger: Signer, rsa_signed: bytes
) -> None:
    """As ima_appraise_measurement: the modsig is tried when no trusted key answers to the
    xattr signature, never when a trusted key's xattr signature fails."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from cima.verifier.imasig import sign_digest

    path = "/lib/modules/6.1/extra/m.ko"
    file_digest = hashlib.sha256(rsa_signed).digest()
    rsa_key = serialization.load_pem_private_key(rsa_signer.key.read_bytes(), None)
    stranger_key = serialization.load_pem_private_key(stranger.key.read_bytes(), None)
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert isinstance(stranger_key, ec.EllipticCurvePrivateKey)
    unknown = sign_digest(stranger_key, file_digest, "sha256")
    entry = _modsig_entry(0, path.encode(), rsa_signed, sig=unknown)
    result: Any = _appraise([entry], [rsa_signer.cert_pem.read_text()], drop=(path,))
    assert result.affirming, [f.describe() for f in result.failures]
    assert result.submodule("ima").details["files_signed"] == 1
    bad = sign_digest(rsa_key, hashlib.sha256(b"other").digest(), "sha256")
    entry = _modsig_entry(0, path.encode(), rsa_signed, sig=bad)
    result = _appraise([entry], [rsa_signer.cert_pem.read_text()], drop=(path,))
    assert [f.code for f in result.failures] == ["file-signature"]
