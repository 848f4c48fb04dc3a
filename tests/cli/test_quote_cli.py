"""``cima quote show|verify`` on the real TDX and TPM quotes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cima.cli.main import main
from tests.vectors import manifest, path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


PROD = path("tdx-quote", "go-tdx-guest/tdx_prod_quote_SPR_E4.dat")


def test_show_tdx_quote_fields(capsys: pytest.CaptureFixture[str]) -> None:
    entry = next(e for e in manifest("tdx-quote") if e["file"].endswith("SPR_E4.dat"))
    code, out, _ = run(capsys, "quote", "show", str(PROD), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["kind"] == "tdx-quote"
    assert doc["body"]["mrtd"] == entry["expected"]["body"]["mrtd"]
    assert doc["header"]["version"] == entry["expected"]["header"]["version"]


def test_verify_production_tdx_quote(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "quote", "verify", str(PROD), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["verified"] is True
    assert "tcb_status" in doc["not_checked"]


def test_verify_binds_nonce_raw(capsys: pytest.CaptureFixture[str]) -> None:
    quote = path("ccel", "go-tdx-guest/cos-113-tdx-quote.dat")
    nonce = path("ccel", "go-tdx-guest/nonce.dat").read_bytes().hex()
    code, _, _ = run(capsys, "quote", "verify", str(quote), "--nonce", nonce, "--binding", "raw")
    assert code == 0
    code, out, _ = run(capsys, "quote", "verify", str(quote), "--nonce", nonce, "--json")
    assert code == 1
    assert json.loads(out)["step"] == "report-data"


def test_preproduction_chain_fails_at_root_of_trust(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "quote", "verify", str(path("tdx-quote", "evidence-api/quote.bin")), "--json"
    )
    assert code == 1
    assert json.loads(out)["step"] == "root-of-trust"


def test_flipped_bit_fails_with_step(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = bytearray(PROD.read_bytes())
    data[100] ^= 0x01  # inside the TD report body
    bad = tmp_path / "flipped.dat"
    bad.write_bytes(bytes(data))
    code, out, _ = run(capsys, "quote", "verify", str(bad), "--json")
    assert code == 1
    assert json.loads(out)["step"] == "quote-signature"


def test_truncated_quote_exits_2_with_offset(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "short.dat"
    bad.write_bytes(PROD.read_bytes()[:700])
    code, out, err = run(capsys, "quote", "verify", str(bad))
    assert code == 2
    assert out == ""
    assert str(bad) in err and "offset" in err


def test_not_a_quote_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello")
    code, _, err = run(capsys, "quote", "show", str(junk))
    assert code == 2
    assert "not a TPM quote" in err
