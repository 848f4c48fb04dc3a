"""Interop with tpm2-tools against swtpm, both ways.

(1) A quote made by tpm2-tools (tpm2_createek, tpm2_createak, tpm2_quote) verifies with
    cima's verify_quote, reading tpm2-tools' own output files: the attest message, the
    TPMT_SIGNATURE (tpm2_quote -s writes that by default) and the "serialized" PCR file.
(2) A quote made by cima's TPMPlatform verifies with tpm2_checkquote, from files cima
    writes in the formats tpm2_checkquote reads.

swtpm has no resource manager: every flow flushes transient objects
(tpm2_flushcontext -t) so that the next tool does not hit TPM_RC_OBJECT_MEMORY.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from cima.evidence.reportdata import tpm_qualifying_data
from cima.evidence.tpm import (
    PCRValues,
    PublicArea,
    Quote,
    QuoteFreshnessError,
    QuoteSignatureError,
    Signature,
    verify_quote,
)
from cima.platform.tpm import TPMPlatform
from cima.registers import RegisterBank, RegisterValue
from tests.platform.swtpm import SWTPM

pytestmark = pytest.mark.peer

if shutil.which("tpm2_quote") is None or shutil.which("tpm2_checkquote") is None:
    pytest.skip("tpm2-tools is not installed (Debian package tpm2-tools)", allow_module_level=True)
pytest.importorskip("tpm2_pytss")

AK_KINDS = {
    "ecc": ["-G", "ecc", "-g", "sha256", "-s", "ecdsa"],
    "rsa": ["-G", "rsa", "-g", "sha256", "-s", "rsassa"],
}


def tools(
    swtpm: SWTPM, cwd: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(args),
        cwd=cwd,
        env=swtpm.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done


def make_tools_ak(swtpm: SWTPM, cwd: Path, kind: str) -> None:
    tools(swtpm, cwd, "tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
    tools(
        swtpm,
        cwd,
        "tpm2_createak",
        "-C",
        "ek.ctx",
        "-c",
        "ak.ctx",
        *AK_KINDS[kind],
        "-u",
        "ak.pem",
        "-f",
        "pem",
        "-n",
        "ak.name",
        "-r",
        "ak.priv",
    )
    tools(swtpm, cwd, "tpm2_flushcontext", "-t")
    tools(swtpm, cwd, "tpm2_readpublic", "-c", "ak.ctx", "-o", "ak.tpm2b", "-f", "tss")
    tools(swtpm, cwd, "tpm2_flushcontext", "-t")


@pytest.mark.parametrize("kind", sorted(AK_KINDS))
def test_tpm2_tools_quote_verifies_with_cima(swtpm: SWTPM, tmp_path: Path, kind: str) -> None:
    make_tools_ak(swtpm, tmp_path, kind)
    tools(swtpm, tmp_path, "tpm2_pcrextend", f"16:sha256={hashlib.sha256(b'interop').hexdigest()}")
    nonce, user_data = b"nonce from the verifier", b"user data"
    qualifying = tpm_qualifying_data(nonce, user_data, "sha256")
    tools(
        swtpm,
        tmp_path,
        "tpm2_quote",
        "-c",
        "ak.ctx",
        "-l",
        "sha256:0,1,2,16,17+sha1:16",
        "-q",
        qualifying.hex(),
        "-m",
        "attest.bin",
        "-s",
        "sig.bin",
        "-o",
        "pcrs.bin",
        "-g",
        "sha256",
    )
    tools(swtpm, tmp_path, "tpm2_flushcontext", "-t")
    attest = (tmp_path / "attest.bin").read_bytes()
    sig = (tmp_path / "sig.bin").read_bytes()
    pcrs = PCRValues.from_bytes((tmp_path / "pcrs.bin").read_bytes())
    ak_pem = (tmp_path / "ak.pem").read_bytes()

    result = verify_quote(
        attest, sig, ak_pem, nonce=nonce, user_data=user_data, pcr_values=pcrs.to_bank()
    )
    assert result.quote.selected() == [
        ("pcr0", "sha256"),
        ("pcr1", "sha256"),
        ("pcr2", "sha256"),
        ("pcr16", "sha256"),
        ("pcr17", "sha256"),
        ("pcr16", "sha1"),
    ]
    assert Signature.from_bytes(sig).scheme == ("ecdsa" if kind == "ecc" else "rsassa")
    bank = pcrs.to_bank()
    assert (
        bank.get("pcr16", "sha256")
        == hashlib.sha256(bytes(32) + hashlib.sha256(b"interop").digest()).digest()
    )
    assert bank.get("pcr17", "sha256") == b"\xff" * 32
    verify_quote(attest, sig, ak_pem, qualifying_data=qualifying)
    # The AK's TPM2B_PUBLIC as tpm2_readpublic writes it: cima's name equals the tool's.
    area = PublicArea.from_bytes((tmp_path / "ak.tpm2b").read_bytes())
    assert area.name == (tmp_path / "ak.name").read_bytes()
    assert area.to_pem() == ak_pem
    verify_quote(attest, sig, area, qualifying_data=qualifying)
    # The quote's PCR file round-trips byte for byte.
    assert pcrs.to_bytes() == (tmp_path / "pcrs.bin").read_bytes()
    with pytest.raises(QuoteFreshnessError):
        verify_quote(attest, sig, ak_pem, nonce=b"another nonce", user_data=user_data)


def test_tpm2_tools_quote_with_another_ak_fails(swtpm: SWTPM, tmp_path: Path) -> None:
    make_tools_ak(swtpm, tmp_path, "ecc")
    tools(
        swtpm, tmp_path, "tpm2_quote", "-c", "ak.ctx", "-l", "sha256:0", "-q", "00",
        "-m", "attest.bin", "-s", "sig.bin", "-g", "sha256",
    )  # fmt: skip
    tools(swtpm, tmp_path, "tpm2_flushcontext", "-t")
    with TPMPlatform(swtpm.tcti) as p:
        cima_ak = p.ak_pem()
    with pytest.raises(QuoteSignatureError):
        verify_quote(
            (tmp_path / "attest.bin").read_bytes(),
            (tmp_path / "sig.bin").read_bytes(),
            cima_ak,
            qualifying_data=b"\x00",
        )


def write_checkquote_files(directory: Path, report_body: bytes, report: dict[str, object]) -> None:
    quote = Quote.from_bytes(report_body)
    pcrs = report["pcrs"]
    assert isinstance(pcrs, list)
    bank = RegisterBank.from_values(
        RegisterValue(v["register"], v["algorithm"], bytes.fromhex(v["digest"])) for v in pcrs
    )
    (directory / "pcrs.bin").write_bytes(
        PCRValues.from_values(quote.pcr_selection, bank).to_bytes()
    )
    (directory / "ak.pem").write_text(str(report["ak_pem"]))
    (directory / "attest.bin").write_bytes(report_body)


@pytest.mark.parametrize("kind", ["ecc", "rsa"])
def test_cima_quote_verifies_with_tpm2_checkquote(swtpm: SWTPM, tmp_path: Path, kind: str) -> None:
    with TPMPlatform(swtpm.tcti, ak_type=kind) as p:
        p.extend("pcr16", "sha256", hashlib.sha256(b"cima").digest())
        report = p.report(b"the nonce", b"the user data", algorithms=["sha256", "sha1"])
    write_checkquote_files(tmp_path, report.body, report.verification)
    (tmp_path / "sig.bin").write_bytes(report.signature)
    qualifying = tpm_qualifying_data(b"the nonce", b"the user data", "sha256")
    args = [
        "tpm2_checkquote", "-u", "ak.pem", "-m", "attest.bin", "-s", "sig.bin",
        "-f", "pcrs.bin", "-g", "sha256",
    ]  # fmt: skip
    done = tools(swtpm, tmp_path, *args, "-q", qualifying.hex())
    assert "pcrs:" in done.stdout
    # tpm2_checkquote really checks: wrong qualifying data, signature or PCR values fail.
    assert tools(swtpm, tmp_path, *args, "-q", bytes(32).hex(), check=False).returncode != 0
    bad_sig = bytearray(report.signature)
    bad_sig[-1] ^= 1
    (tmp_path / "sig.bin").write_bytes(bytes(bad_sig))
    assert tools(swtpm, tmp_path, *args, "-q", qualifying.hex(), check=False).returncode != 0
    (tmp_path / "sig.bin").write_bytes(report.signature)
    pcrs = PCRValues.from_bytes((tmp_path / "pcrs.bin").read_bytes())
    digests = list(pcrs.digests)
    digests[0] = b"\x01" * len(digests[0])
    (tmp_path / "pcrs.bin").write_bytes(PCRValues(pcrs.selections, tuple(digests)).to_bytes())
    assert tools(swtpm, tmp_path, *args, "-q", qualifying.hex(), check=False).returncode != 0


def test_tools_and_cima_agree_on_pcr_values(swtpm: SWTPM, tmp_path: Path) -> None:
    with TPMPlatform(swtpm.tcti) as p:
        p.extend("pcr13", "sha384", hashlib.sha384(b"runtime").digest())
        ours = p.read_all()
    tools(
        swtpm,
        tmp_path,
        "tpm2_pcrread",
        "sha1:all+sha256:all+sha384:all",
        "-F",
        "serialized",
        "-o",
        "pcrs.bin",
    )
    theirs = PCRValues.from_bytes((tmp_path / "pcrs.bin").read_bytes()).to_bank()
    assert list(theirs) == list(ours)


def test_leak_check_sees_objects_others_leave(swtpm: SWTPM, tmp_path: Path) -> None:
    # Without a resource manager, tpm2-tools leave the objects they load; the handle listing
    # the leak test relies on must see them (else "no leak" would prove nothing).
    tools(swtpm, tmp_path, "tpm2_createprimary", "-C", "o", "-c", "primary.ctx")
    with TPMPlatform(swtpm.tcti) as p:
        assert len(p.handles("transient")) == 1
    tools(swtpm, tmp_path, "tpm2_flushcontext", "-t")
    with TPMPlatform(swtpm.tcti) as p:
        assert p.handles("transient") == []
