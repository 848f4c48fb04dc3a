"""``cima platform`` and ``cima quote`` against swtpm and the software platform."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cima.cli.main import main
from cima.evidence import tpm
from tests.platform.swtpm import SWTPM


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


NONCE = "00112233445566778899aabbccddeeff"
USER = "cafe"


def test_info_and_measurement_on_swtpm(capsys: pytest.CaptureFixture[str], swtpm: SWTPM) -> None:
    code, out, _ = run(
        capsys, "platform", "info", "--platform", "tpm", "--tcti", swtpm.tcti, "--json"
    )
    assert code == 0
    info = json.loads(out)
    assert info["platform"] == "tpm"
    assert {"sha1", "sha256", "sha384"} <= set(info["algorithms"])
    code, out, _ = run(
        capsys,
        "platform",
        "measurement",
        "--platform",
        "tpm",
        "--tcti",
        swtpm.tcti,
        "--register",
        "pcr17",
        "--algorithm",
        "sha256",
        "--json",
    )
    assert code == 0
    # PCR17 (a dynamic-launch PCR) resets to all ones on a TPM started without a D-RTM
    assert json.loads(out)["registers"] == [
        {"register": "pcr17", "algorithm": "sha256", "digest": "ff" * 32}
    ]


def test_report_then_verify_on_swtpm(
    capsys: pytest.CaptureFixture[str], swtpm: SWTPM, tmp_path: Path
) -> None:
    out_dir = tmp_path / "report"
    code, out, _ = run(
        capsys,
        "platform",
        "report",
        "--platform",
        "tpm",
        "--tcti",
        swtpm.tcti,
        "--nonce",
        NONCE,
        "--user-data",
        USER,
        "-o",
        str(out_dir),
        "--json",
    )
    assert code == 0, out
    meta = json.loads(out)
    assert meta["kind"] == "tpm-quote"
    code, out, _ = run(
        capsys, "quote", "verify", str(out_dir), "--nonce", NONCE, "--user-data", USER, "--json"
    )
    assert code == 0
    result = json.loads(out)
    assert result["verified"] is True
    assert result["freshness"] == "nonce"
    assert result["pcrs_checked"] is True

    # the files written verify with tpm2-tools as they are
    checked = subprocess.run(
        [
            "tpm2_checkquote",
            "-u",
            str(out_dir / "ak.pem"),
            "-m",
            str(out_dir / "attest.bin"),
            "-s",
            str(out_dir / "signature.bin"),
            "-f",
            str(out_dir / "pcrs.bin"),
            "-g",
            meta["hash_algorithm"],
            "-q",
            meta["qualifying_data"],
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr

    # another nonce: verification fails at the freshness step, exit 1
    code, out, _ = run(capsys, "quote", "verify", str(out_dir), "--nonce", "00" * 16, "--json")
    assert code == 1
    failed = json.loads(out)
    assert failed["verified"] is False
    assert "fresh" in failed["step"].lower() or "fresh" in failed["error"].lower()

    code, out, _ = run(capsys, "quote", "show", str(out_dir / "attest.bin"), "--json")
    assert code == 0
    assert json.loads(out)["kind"] == "tpm-quote"


def test_software_platform_report_round_trip(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    out_dir = tmp_path / "report"
    code, _, err = run(
        capsys,
        "platform",
        "report",
        "--platform",
        "software",
        "--state-dir",
        str(state),
        "--nonce",
        NONCE,
        "-o",
        str(out_dir),
    )
    assert code == 0, err
    assert main(["quote", "verify", str(out_dir), "--nonce", NONCE]) == 0
    # a tampered PCR value in the report's pcrs file is caught at the PCR digest step
    values = tpm.PCRValues.from_bytes((out_dir / "pcrs.bin").read_bytes())
    quoted = {(v.register, v.algorithm): v.digest for v in values.items()}
    first = next(iter(quoted))
    quoted[first] = bytes([quoted[first][0] ^ 1]) + quoted[first][1:]
    (out_dir / "pcrs.bin").write_bytes(
        tpm.PCRValues.from_values(values.selections, quoted).to_bytes()
    )
    capsys.readouterr()
    code, out, _ = run(capsys, "quote", "verify", str(out_dir), "--nonce", NONCE, "--json")
    assert code == 1
    assert "pcr" in json.loads(out)["error"].lower()


def test_no_tpm_at_tcti_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "platform", "info", "--platform", "tpm", "--tcti", "swtpm:port=1")
    assert code == 2
    assert out == ""
    assert err.startswith("cima: error:")


def test_quote_verify_without_signature_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from tests.vectors import path

    code, _, err = run(capsys, "quote", "verify", str(path("tpm-quote", "trustee/attest.bin")))
    assert code == 2
    assert "--signature" in err


def test_quote_verify_trustee_vector(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.vectors import path

    d = "trustee/"
    code, out, _ = run(
        capsys,
        "quote",
        "verify",
        str(path("tpm-quote", d + "attest.bin")),
        "--signature",
        str(path("tpm-quote", d + "signature.tpmt.bin")),
        "--ak",
        str(path("tpm-quote", d + "ak.pem")),
        "--pcrs",
        str(path("tpm-quote", d + "pcrs.tpm2tools.bin")),
        "--qualifying-data",
        path("tpm-quote", d + "qualifying_data.bin").read_bytes().hex(),
        "--json",
    )
    assert code == 0
    assert json.loads(out)["freshness"] == "qualifying-data"


def test_report_over_several_banks(
    capsys: pytest.CaptureFixture[str], swtpm: SWTPM, tmp_path: Path
) -> None:
    out_dir = tmp_path / "report"
    code, out, err = run(
        capsys,
        "platform",
        "report",
        "--platform",
        "tpm",
        "--tcti",
        swtpm.tcti,
        "--nonce",
        NONCE,
        "--algorithm",
        "sha1",
        "--algorithm",
        "sha384",
        "-o",
        str(out_dir),
        "--json",
    )
    assert code == 0, err
    banks = {p["algorithm"] for p in json.loads(out)["pcrs"]}
    assert banks == {"sha1", "sha384"}
    assert main(["quote", "verify", str(out_dir), "--nonce", NONCE]) == 0
    capsys.readouterr()
    code, _, err = run(
        capsys, "platform", "report", "--platform", "tpm", "--tcti", swtpm.tcti,
        "--nonce", NONCE, "--algorithm", "md5", "-o", str(out_dir),
    )  # fmt: skip
    assert code == 2 and "md5" in err
