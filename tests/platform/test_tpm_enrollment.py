"""TPMPlatform's endorsement key and credential activation, against swtpm and tpm2-tools.

The credentials are made by tpm2-tools offline (``tpm2_makecredential -T none``),
as a verifier would, from the EK public area the platform reports and the AK's
name; the platform recovers their secret with TPM2_ActivateCredential.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cima.errors import PlatformError
from cima.evidence.tpm import PublicArea, verify_quote
from cima.platform.tpm import CredentialError, TPMPlatform
from tests.platform.swtpm import SWTPM

pytestmark = pytest.mark.peer

if shutil.which("tpm2_makecredential") is None or shutil.which("tpm2_createek") is None:
    pytest.skip("tpm2-tools is not installed (Debian package tpm2-tools)", allow_module_level=True)
pytest.importorskip("tpm2_pytss")

#: tpm2_makecredential's output file (tpm2-tools 5): magic, version, then the
#: TPM2B_ID_OBJECT and the TPM2B_ENCRYPTED_SECRET.
CREDENTIAL_MAGIC = bytes.fromhex("badcc0de")
CREDENTIAL_VERSION = bytes.fromhex("00000001")

PAIRS = [("rsa", "ecc"), ("rsa", "rsa"), ("ecc", "ecc"), ("ecc", "rsa")]


def run(cwd: Path, *args: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(
        list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}")


def make_credential(cwd: Path, ek_public: bytes, name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """tpm2_makecredential offline: (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET), each marshalled."""
    (cwd / "ek-for-credential.pub").write_bytes(ek_public)
    (cwd / "secret.bin").write_bytes(secret)
    env = {k: v for k, v in os.environ.items() if k not in ("TPM2TOOLS_TCTI", "TCTI")}
    run(
        cwd,
        "tpm2_makecredential",
        "-T",
        "none",
        "-e",
        "ek-for-credential.pub",
        "-s",
        "secret.bin",
        "-n",
        name.hex(),
        "-o",
        "cred.out",
        env=env,
    )
    return split_credential_file((cwd / "cred.out").read_bytes())


def split_credential_file(raw: bytes) -> tuple[bytes, bytes]:
    assert raw[:4] == CREDENTIAL_MAGIC
    assert raw[4:8] == CREDENTIAL_VERSION
    size = int.from_bytes(raw[8:10], "big")
    blob, encrypted = raw[8 : 10 + size], raw[10 + size :]
    assert int.from_bytes(encrypted[:2], "big") == len(encrypted) - 2
    return blob, encrypted


def marshalled(area: PublicArea) -> bytes:
    return len(area.raw).to_bytes(2, "big") + area.raw


def spki(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.fixture
def platform(swtpm: SWTPM) -> Iterator[TPMPlatform]:
    with TPMPlatform(swtpm.tcti) as p:
        yield p


@pytest.mark.parametrize("ek_type", ["rsa", "ecc"])
def test_ek_public_is_tpm2_createeks_and_the_certificates_key(
    swtpm: SWTPM, tmp_path: Path, ek_type: str
) -> None:
    with TPMPlatform(swtpm.tcti, ek_type=ek_type) as p:
        ek = p.ek_public()
        cert = p.ek_certificate()
        assert p.ek_public() is ek  # kept
        assert p.handles("transient") == []
    assert cert is not None
    assert spki(ek.public_key()) == spki(cert.public_key())
    # tpm2-tools' EK of the same kind: the low-range RSA template; for ECC, swtpm
    # certifies a high-range NIST P-384 key (tpm2_createek -G ecc384), not a P-256 one.
    algorithm = {None: "rsa", "nist-p256": "ecc", "nist-p384": "ecc384"}[ek.curve_name]
    assert ek.key_type == ek_type
    run(
        tmp_path,
        "tpm2_createek",
        "-G",
        algorithm,
        "-c",
        "ek.ctx",
        "-u",
        "ek.pub",
        env=swtpm.env(),
    )
    run(tmp_path, "tpm2_flushcontext", "-t", env=swtpm.env())
    assert marshalled(ek) == (tmp_path / "ek.pub").read_bytes()


@pytest.mark.parametrize(("ek_type", "ak_type"), PAIRS)
def test_activate_credential_recovers_the_secret(
    swtpm: SWTPM, tmp_path: Path, ek_type: str, ak_type: str
) -> None:
    with TPMPlatform(swtpm.tcti, ek_type=ek_type, ak_type=ak_type) as p:
        secret = os.urandom(32)
        blob, encrypted = make_credential(
            tmp_path, marshalled(p.ek_public()), p.ak_public().name, secret
        )
        assert p.activate_credential(blob, encrypted) == secret
        assert p.handles("transient") == []
        assert p.handles("sessions") == []


@pytest.mark.parametrize(("ek_type", "ak_type"), PAIRS)
def test_a_credential_for_another_name_does_not_activate(
    swtpm: SWTPM, tmp_path: Path, ek_type: str, ak_type: str
) -> None:
    with TPMPlatform(swtpm.tcti, ek_type=ek_type, ak_type=ak_type) as p:
        ek = marshalled(p.ek_public())
        ak_name = p.ak_public().name
        for name in (p.ek_public().name, ak_name[:2] + os.urandom(len(ak_name) - 2)):
            blob, encrypted = make_credential(tmp_path, ek, name, b"not for this key")
            with pytest.raises(PlatformError, match="does not activate") as info:
                p.activate_credential(blob, encrypted)
            assert isinstance(info.value, CredentialError)
            assert "integrity" in str(info.value)  # the TPM's response code, as text
        assert p.handles("transient") == []
        assert p.handles("sessions") == []


def test_a_credential_encrypted_to_another_ek_does_not_activate(
    swtpm: SWTPM, tmp_path: Path
) -> None:
    with TPMPlatform(swtpm.tcti, ek_type="ecc") as other:
        ecc_ek = marshalled(other.ek_public())
    with TPMPlatform(swtpm.tcti, ek_type="rsa") as p:
        blob, encrypted = make_credential(tmp_path, ecc_ek, p.ak_public().name, b"s" * 32)
        with pytest.raises(CredentialError, match="does not activate"):
            p.activate_credential(blob, encrypted)


@pytest.mark.parametrize("ek_type", ["rsa", "ecc"])
def test_an_altered_credential_does_not_activate(
    swtpm: SWTPM, tmp_path: Path, ek_type: str
) -> None:
    with TPMPlatform(swtpm.tcti, ek_type=ek_type) as p:
        secret = os.urandom(32)
        blob, encrypted = make_credential(
            tmp_path, marshalled(p.ek_public()), p.ak_public().name, secret
        )
        altered = {
            "integrity HMAC": (flipped(blob, 5), encrypted),
            "encrypted credential": (flipped(blob, len(blob) - 1), encrypted),
            "encrypted seed": (blob, flipped(encrypted, len(encrypted) - 1)),
        }
        for b, e in altered.values():
            with pytest.raises(CredentialError, match="does not activate"):
                p.activate_credential(b, e)
        # Nothing of it stayed behind: the real credential still activates.
        assert p.activate_credential(blob, encrypted) == secret


def test_malformed_inputs_are_credential_errors(platform: TPMPlatform, tmp_path: Path) -> None:
    blob, encrypted = make_credential(
        tmp_path, marshalled(platform.ek_public()), platform.ak_public().name, b"s" * 16
    )
    for b, e in (
        (b"", encrypted),
        (blob[2:], encrypted),
        (blob + b"\x00", encrypted),
        (blob, encrypted[:-1]),
        (b"\x04\x00" + bytes(1024), encrypted),  # larger than any TPM2B_ID_OBJECT
    ):
        with pytest.raises(CredentialError, match=r"not a marshalled|bytes after"):
            platform.activate_credential(b, e)


def test_fifty_activations_leak_no_handle_or_session(platform: TPMPlatform, tmp_path: Path) -> None:
    ek = marshalled(platform.ek_public())
    name = platform.ak_public().name
    secret = os.urandom(32)
    blob, encrypted = make_credential(tmp_path, ek, name, secret)
    wrong, wrong_secret = make_credential(tmp_path, ek, platform.ek_public().name, secret)
    transient = platform.handles("transient")
    sessions = platform.handles("sessions")
    persistent = platform.handles("persistent")
    for i in range(50):
        assert platform.activate_credential(blob, encrypted) == secret
        if i % 10 == 0:
            with pytest.raises(CredentialError):
                platform.activate_credential(wrong, wrong_secret)
    assert platform.handles("transient") == transient == []
    assert platform.handles("sessions") == sessions == []
    assert platform.handles("persistent") == persistent
    report = platform.report(b"after activations")
    verify_quote(
        report.body, report.signature, report.verification["ak_pem"], nonce=b"after activations"
    )
