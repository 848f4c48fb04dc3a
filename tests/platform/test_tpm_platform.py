"""TPMPlatform against a real TPM 2.0 simulator (swtpm), through tpm2-pytss."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from cima.errors import PlatformError
from cima.evidence.tpm import (
    PCRDigestError,
    PublicArea,
    Quote,
    QuoteFreshnessError,
    Signature,
    verify_quote,
)
from cima.platform.base import PlatformPaths
from cima.platform.tpm import DEFAULT_AK_HANDLE, TPMPlatform, resolve_tcti
from cima.registers import RegisterBank, RegisterValue
from tests.platform.swtpm import SWTPM
from tests.vectors import manifest
from tests.vectors import path as vector_path

pytestmark = pytest.mark.peer
pytest.importorskip("tpm2_pytss")

BANKS = {"sha1": 20, "sha256": 32, "sha384": 48}


def bank_of(report_pcrs: list[dict[str, str]]) -> RegisterBank:
    return RegisterBank.from_values(
        RegisterValue(v["register"], v["algorithm"], bytes.fromhex(v["digest"]))
        for v in report_pcrs
    )


@pytest.fixture
def platform(swtpm: SWTPM) -> Iterator[TPMPlatform]:
    with TPMPlatform(swtpm.tcti) as p:
        yield p


def test_allocated_banks(platform: TPMPlatform) -> None:
    assert platform.algorithms() == list(BANKS)
    assert platform.default_algorithm() == "sha256"
    assert platform.register_names() == [f"pcr{i}" for i in range(24)]
    assert platform.measurement_count() == 24


def test_read_all_banks_after_startup(platform: TPMPlatform) -> None:
    bank = platform.read_all()
    assert len(bank) == 24 * len(BANKS)
    # TCG PC Client Platform TPM Profile: after TPM2_Startup(CLEAR) PCRs 0-16 and 23 are
    # zero and the D-RTM PCRs 17-22 are all ones (no D-RTM launch happened).
    for alg, size in BANKS.items():
        for i in range(24):
            expected = b"\xff" * size if 17 <= i <= 22 else bytes(size)
            assert bank.get(f"pcr{i}", alg) == expected, (i, alg)
            assert platform.read(f"pcr{i}", alg) == expected


@pytest.mark.parametrize(
    ("register", "alg"), [("pcr16", "sha256"), ("pcr23", "sha384"), ("pcr13", "sha1")]
)
def test_extend_matches_an_independent_computation(
    platform: TPMPlatform, register: str, alg: str
) -> None:
    before = platform.read_all()
    first = hashlib.new(alg, b"first").digest()
    second = hashlib.new(alg, b"second").digest()
    platform.extend(register, alg, first)
    platform.extend(register, alg, second)
    start = before.get(register, alg)
    expected = hashlib.new(alg, hashlib.new(alg, start + first).digest() + second).digest()
    assert platform.read(register, alg) == expected
    after = platform.read_all()
    # Only that register in that bank changed.
    changed = [
        (v.register, v.algorithm) for v in after if v.digest != before.get(v.register, v.algorithm)
    ]
    assert changed == [(register, alg)]


def test_extend_rejects_bad_input(platform: TPMPlatform) -> None:
    with pytest.raises(PlatformError, match="32 bytes"):
        platform.extend("pcr16", "sha256", b"\x00" * 20)
    with pytest.raises(PlatformError, match="no sha512 PCR bank"):
        platform.extend("pcr16", "sha512", b"\x00" * 64)
    with pytest.raises(PlatformError, match="PCRs only"):
        platform.extend("rtmr0", "sha256", b"\x00" * 32)


@pytest.mark.parametrize("ak_type", ["ecc", "rsa"])
def test_report_verifies(swtpm: SWTPM, ak_type: str) -> None:
    with TPMPlatform(swtpm.tcti, ak_type=ak_type) as p:
        p.extend("pcr16", "sha256", hashlib.sha256(b"event").digest())
        report = p.report(b"nonce-123", b"user data")
    assert report.kind == "tpm-quote"
    pcrs = bank_of(report.verification["pcrs"])
    result = verify_quote(
        report.body,
        report.signature,
        report.verification["ak_pem"],
        nonce=b"nonce-123",
        user_data=b"user data",
        pcr_values=pcrs,
    )
    assert result.freshness == "nonce"
    assert len(result.pcrs) == 24
    assert (
        pcrs.get("pcr16", "sha256")
        == hashlib.sha256(bytes(32) + hashlib.sha256(b"event").digest()).digest()
    )
    sig = Signature.from_bytes(report.signature)
    assert sig.scheme == ("ecdsa" if ak_type == "ecc" else "rsassa")
    key = PublicArea.from_bytes(bytes.fromhex(report.verification["ak_public"])).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey if ak_type == "ecc" else rsa.RSAPublicKey)
    # extraData = SHA-256(nonce || user_data), computed here independently.
    assert (
        Quote.from_bytes(report.body).extra_data == hashlib.sha256(b"nonce-123user data").digest()
    )
    with pytest.raises(QuoteFreshnessError):
        verify_quote(
            report.body,
            report.signature,
            report.verification["ak_pem"],
            nonce=b"nonce-124",
            user_data=b"user data",
        )


def test_rsa_report_signature_checks_with_cryptography_alone(swtpm: SWTPM) -> None:
    with TPMPlatform(swtpm.tcti, ak_type="rsa") as p:
        report = p.report(b"n")
        pem = p.ak_pem().encode()
    key = serialization.load_pem_public_key(pem)
    assert isinstance(key, rsa.RSAPublicKey)
    key.verify(
        Signature.from_bytes(report.signature).value,
        report.body,
        padding.PKCS1v15(),
        hashes.SHA256(),
    )


def test_report_over_several_banks_and_a_subset(platform: TPMPlatform) -> None:
    platform.extend("pcr10", "sha1", hashlib.sha1(b"x").digest())
    report = platform.report(
        b"n", registers=["pcr0", "pcr10", "pcr13"], algorithms=["sha1", "sha384"]
    )
    quote = Quote.from_bytes(report.body)
    assert quote.selected() == [
        ("pcr0", "sha1"),
        ("pcr10", "sha1"),
        ("pcr13", "sha1"),
        ("pcr0", "sha384"),
        ("pcr10", "sha384"),
        ("pcr13", "sha384"),
    ]
    pcrs = bank_of(report.verification["pcrs"])
    verify_quote(
        report.body, report.signature, report.verification["ak_pem"], nonce=b"n", pcr_values=pcrs
    )
    pcrs.set("pcr10", "sha1", bytes(20))
    with pytest.raises(PCRDigestError):
        verify_quote(
            report.body,
            report.signature,
            report.verification["ak_pem"],
            nonce=b"n",
            pcr_values=pcrs,
        )


def test_ak_persists_across_connections_and_restarts(swtpm: SWTPM) -> None:
    with TPMPlatform(swtpm.tcti) as first:
        pem = first.ak_pem()
        name = first.ak_public().name
        assert DEFAULT_AK_HANDLE in first.handles("persistent")
    with TPMPlatform(swtpm.tcti) as second:
        assert second.ak_pem() == pem
    swtpm.restart()
    with TPMPlatform(swtpm.tcti) as third:
        assert third.ak_pem() == pem
        assert third.ak_public().name == name
        report = third.report(b"after restart")
    verify_quote(report.body, report.signature, pem, nonce=b"after restart")


def test_ak_handle_holding_another_key_type_is_refused(swtpm: SWTPM) -> None:
    with TPMPlatform(swtpm.tcti, ak_type="ecc") as p:
        p.ak_pem()
    with (
        TPMPlatform(swtpm.tcti, ak_type="rsa") as p,
        pytest.raises(PlatformError, match="0x81010002 holds a key of type ecc"),
    ):
        p.report(b"n")


def test_ek_certificate_is_issued_by_the_manufacturer_ca(swtpm: SWTPM) -> None:
    with TPMPlatform(swtpm.tcti) as p:
        report = p.report(b"n")
        cert = p.ek_certificate()
    assert cert is not None
    pem_cert = x509.load_pem_x509_certificate(report.verification["ek_certificate_pem"].encode())
    assert pem_cert == cert
    issuer = x509.load_pem_x509_certificate(swtpm.manufactured.issuer_ca_pem.read_bytes())
    assert cert.issuer == issuer.subject
    cert.verify_directly_issued_by(issuer)
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)


def test_ecc_ek_certificate(swtpm: SWTPM) -> None:
    # swtpm_setup writes the ECC EK certificate for NIST P-384 in the high range.
    with TPMPlatform(swtpm.tcti, ek_type="ecc") as p:
        cert = p.ek_certificate()
        report = p.report(b"n")
    assert cert is not None
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp384r1"
    verify_quote(report.body, report.signature, report.verification["ak_pem"], nonce=b"n")


def test_no_transient_objects_or_sessions_leak(swtpm: SWTPM) -> None:
    with TPMPlatform(swtpm.tcti) as p:
        p.ak_pem()  # creates EK, two policy sessions, the AK; flushes them
        assert p.handles("transient") == []
        assert p.handles("sessions") == []
        for i in range(200):
            p.report(i.to_bytes(4, "big"))
        assert p.handles("transient") == []
        assert p.handles("sessions") == []


def test_bad_tcti_is_a_platform_error() -> None:
    with pytest.raises(PlatformError, match="nosuchtcti"):
        TPMPlatform("nosuchtcti:whatever")


def test_no_tpm_at_the_port_is_a_platform_error(swtpm: SWTPM) -> None:
    port = swtpm.port
    swtpm.stop()
    with pytest.raises(PlatformError, match=f"swtpm:port={port}"):
        TPMPlatform(f"swtpm:port={port}")


def test_missing_device_is_a_platform_error(tmp_path: Path) -> None:
    with pytest.raises(PlatformError, match="does not exist"):
        TPMPlatform(f"device:{tmp_path / 'tpmrm0'}")


def test_tcti_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TPM2TOOLS_TCTI", raising=False)
    monkeypatch.delenv("TCTI", raising=False)
    assert resolve_tcti(None) == "device:/dev/tpmrm0"
    assert resolve_tcti(None, PlatformPaths(tpm_device=Path("/dev/tpm0"))) == "device:/dev/tpm0"
    monkeypatch.setenv("TCTI", "mssim:port=2321")
    assert resolve_tcti(None) == "mssim:port=2321"
    monkeypatch.setenv("TPM2TOOLS_TCTI", "swtpm:port=2321")
    assert resolve_tcti(None) == "swtpm:port=2321"
    assert resolve_tcti("device:/dev/tpm0") == "device:/dev/tpm0"
    assert resolve_tcti("/dev/tpmrm0") == "device:/dev/tpmrm0"


def test_info(platform: TPMPlatform) -> None:
    info = platform.info()
    assert info["platform"] == "tpm"
    assert info["manufacturer"] == "IBM"  # swtpm reports TPM_PT_MANUFACTURER "IBM"
    assert info["algorithms"] == list(BANKS)
    assert info["ak_handle"] == "0x81010002"


def test_boot_log_from_securityfs(swtpm: SWTPM, tmp_path: Path) -> None:
    (tmp_path / "tpm0").mkdir()
    log = vector_path("tpm-quote", "keylime-perf-tests/uefi_log.bin")
    (tmp_path / "tpm0" / "binary_bios_measurements").symlink_to(log)
    with TPMPlatform(swtpm.tcti, paths=PlatformPaths(securityfs=tmp_path)) as p:
        events = p.boot_log()
    want = next(e for e in manifest("tpm-quote") if e["file"] == "keylime-perf-tests/uefi_log.bin")
    assert events is not None
    assert len(events) == want["expected"]["event_count_including_header"]


def test_no_boot_log(platform: TPMPlatform, tmp_path: Path) -> None:
    platform.paths = PlatformPaths(securityfs=tmp_path)
    assert platform.boot_log() is None
