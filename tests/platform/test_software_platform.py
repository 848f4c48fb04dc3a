"""The software platform: TPM-format quotes from software registers and a software key."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cima.errors import PlatformError
from cima.evidence.tpm import (
    PCRDigestError,
    PublicArea,
    Quote,
    QuoteFreshnessError,
    QuoteSignatureError,
    Signature,
    verify_quote,
)
from cima.platform.software import KEY_FILE, STATE_FILE, SoftwarePlatform
from cima.registers import RegisterBank, RegisterValue


def bank_of(pcrs: list[dict[str, str]]) -> RegisterBank:
    return RegisterBank.from_values(
        RegisterValue(v["register"], v["algorithm"], bytes.fromhex(v["digest"])) for v in pcrs
    )


@pytest.mark.parametrize("key_type", ["ecc", "rsa"])
def test_quote_verifies_with_verify_quote(key_type: str) -> None:
    p = SoftwarePlatform(key_type=key_type)
    p.extend("pcr13", "sha256", hashlib.sha256(b"container").digest())
    report = p.report(b"nonce", b"user data")
    result = verify_quote(
        report.body,
        report.signature,
        report.verification["ak_pem"],
        nonce=b"nonce",
        user_data=b"user data",
        pcr_values=bank_of(report.verification["pcrs"]),
    )
    assert result.freshness == "nonce"
    assert len(result.pcrs) == 24
    quote = Quote.from_bytes(report.body)
    assert quote.magic == 0xFF544347
    assert quote.type == 0x8018
    assert quote.extra_data == hashlib.sha256(b"nonceuser data").digest()
    assert (
        quote.qualified_signer
        == PublicArea.from_bytes(bytes.fromhex(report.verification["ak_public"])).name
    )
    sig = Signature.from_bytes(report.signature)
    assert sig.scheme == ("ecdsa" if key_type == "ecc" else "rsassa")
    key = p.ak_public().public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey if key_type == "ecc" else rsa.RSAPublicKey)


def test_registers_extend_like_a_tpm() -> None:
    p = SoftwarePlatform(algorithms=("sha256", "sha384"))
    assert p.algorithms() == ["sha256", "sha384"]
    assert p.read("pcr10", "sha384") == bytes(48)
    d = hashlib.sha384(b"x").digest()
    p.extend("pcr10", "sha384", d)
    assert p.read("pcr10", "sha384") == hashlib.sha384(bytes(48) + d).digest()
    assert p.read("pcr10", "sha256") == bytes(32)
    with pytest.raises(PlatformError, match="48 bytes"):
        p.extend("pcr10", "sha384", bytes(32))
    with pytest.raises(PlatformError, match="no sha1 bank"):
        p.read("pcr0", "sha1")
    with pytest.raises(PlatformError, match=r"pcr0\.\.pcr23"):
        p.extend("rtmr0", "sha256", bytes(32))


def test_state_persists_across_instances(tmp_path: Path) -> None:
    first = SoftwarePlatform(tmp_path)
    d = hashlib.sha256(b"event").digest()
    first.extend("pcr13", "sha256", d)
    pem = first.ak_pem()
    second = SoftwarePlatform(tmp_path)
    assert second.ak_pem() == pem
    assert second.read("pcr13", "sha256") == hashlib.sha256(bytes(32) + d).digest()
    report = second.report(b"n")
    verify_quote(report.body, report.signature, pem, nonce=b"n", pcr_values=second.read_all())
    # Each instance on the same state counts one restart.
    assert Quote.from_bytes(report.body).restart_count == 1
    mode = stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode)
    assert mode == 0o600
    assert not list(tmp_path.glob(".*.tmp"))


def test_state_with_other_banks_is_refused(tmp_path: Path) -> None:
    SoftwarePlatform(tmp_path, algorithms=("sha256",))
    with pytest.raises(PlatformError, match="banks"):
        SoftwarePlatform(tmp_path, algorithms=("sha384",))


def test_damaged_state_is_a_platform_error(tmp_path: Path) -> None:
    SoftwarePlatform(tmp_path)
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(PlatformError, match="damaged"):
        SoftwarePlatform(tmp_path)


def test_key_of_another_type_is_refused(tmp_path: Path) -> None:
    SoftwarePlatform(tmp_path, key_type="ecc")
    with pytest.raises(PlatformError, match="another type"):
        SoftwarePlatform(tmp_path, key_type="rsa")


def test_nonce_binding_is_checked() -> None:
    p = SoftwarePlatform()
    report = p.report(b"nonce-1", b"ud")
    with pytest.raises(QuoteFreshnessError):
        verify_quote(report.body, report.signature, p.ak_pem(), nonce=b"nonce-2", user_data=b"ud")
    with pytest.raises(QuoteFreshnessError):
        verify_quote(report.body, report.signature, p.ak_pem(), nonce=b"nonce-1", user_data=b"x")


def test_another_instance_key_does_not_verify() -> None:
    report = SoftwarePlatform().report(b"n")
    with pytest.raises(QuoteSignatureError):
        verify_quote(report.body, report.signature, SoftwarePlatform().ak_pem(), nonce=b"n")


def test_tampered_state_is_detected_at_the_pcr_digest(tmp_path: Path) -> None:
    p = SoftwarePlatform(tmp_path)
    p.extend("pcr13", "sha256", hashlib.sha256(b"suspicious container").digest())
    report = p.report(b"n", registers=["pcr10", "pcr13"])
    # Someone rewrites the state to hide the extend; values read back from it no longer
    # match what the signed quote covers.
    doc = json.loads((tmp_path / STATE_FILE).read_text())
    doc["registers"]["sha256"]["pcr13"] = "00" * 32
    (tmp_path / STATE_FILE).write_text(json.dumps(doc))
    tampered = SoftwarePlatform(tmp_path)
    assert tampered.read("pcr13", "sha256") == bytes(32)
    with pytest.raises(PCRDigestError, match=r"step \(4\)"):
        verify_quote(
            report.body, report.signature, p.ak_pem(), nonce=b"n", pcr_values=tampered.read_all()
        )
    # And the values reported with the quote, changed after the fact, fail the same way.
    claimed = bank_of(report.verification["pcrs"])
    claimed.set("pcr10", "sha256", b"\x01" * 32)
    with pytest.raises(PCRDigestError):
        verify_quote(report.body, report.signature, p.ak_pem(), nonce=b"n", pcr_values=claimed)


def test_report_in_another_bank() -> None:
    p = SoftwarePlatform(algorithms=("sha256", "sha384"))
    report = p.report(b"n", registers=["pcr0"], algorithms=["sha384"])
    quote = Quote.from_bytes(report.body)
    assert quote.selected() == [("pcr0", "sha384")]
    verify_quote(
        report.body,
        report.signature,
        p.ak_pem(),
        nonce=b"n",
        pcr_values={("pcr0", "sha384"): bytes(48)},
    )


def test_info_and_no_boot_log() -> None:
    p = SoftwarePlatform()
    info = p.info()
    assert info["platform"] == "software"
    assert info["default_algorithm"] == "sha256"
    assert p.boot_log() is None
    assert p.name == "software"
