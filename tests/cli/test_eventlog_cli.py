"""The ``cima eventlog`` commands, called as a user calls them (``main([...])``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cima.cli.main import main
from cima.registers import cc_name
from tests.vectors import manifest, path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _expected_pcrs(entry: dict) -> dict[tuple[str, str], str]:
    return {
        (f"pcr{idx}", alg): value
        for alg, regs in entry["expected"]["pcrs"].items()
        for idx, value in regs.items()
    }


@pytest.mark.parametrize("entry", manifest("tcg"), ids=lambda e: e["file"])
def test_replay_json_contract_on_tcg_vectors(
    capsys: pytest.CaptureFixture[str], entry: dict
) -> None:
    code, out, _ = run(capsys, "eventlog", "replay", str(path("tcg", entry["file"])), "--json")
    assert code == 0
    doc = json.loads(out)
    assert set(doc) == {"registers", "events"}
    assert doc["events"] == entry["expected"]["event_count_including_header"]
    for r in doc["registers"]:
        assert set(r) == {"register", "algorithm", "digest"}
    got = {(r["register"], r["algorithm"]): r["digest"] for r in doc["registers"]}
    assert got == _expected_pcrs(entry)


def test_replay_ccel_and_ima_together(capsys: pytest.CaptureFixture[str]) -> None:
    entry = next(e for e in manifest("ccel") if e["file"] == "evidence-api/ccel_data.bin")
    code, out, _ = run(
        capsys,
        "eventlog",
        "replay",
        str(path("ccel", "evidence-api/ccel_data.bin")),
        str(path("ccel", "evidence-api/ima_log.bin")),
        "--json",
    )
    assert code == 0
    got = {r["register"]: r["digest"] for r in json.loads(out)["registers"]}
    for idx, value in entry["expected"]["rtmr_after_appending_ima_log_bin"].items():
        if int(idx) < 3:
            assert got[f"rtmr{idx}"] == value


def test_replay_ima_into_another_bank(capsys: pytest.CaptureFixture[str]) -> None:
    entry = next(
        e for e in manifest("ima") if e["file"] == "rust-keylime/ascii_runtime_measurements"
    )
    code, out, _ = run(
        capsys,
        "eventlog",
        "replay",
        str(path("ima", entry["file"])),
        "--bank",
        "sha256",
        "--json",
    )
    assert code == 0
    (reg,) = json.loads(out)["registers"]
    assert reg == {
        "register": "pcr10",
        "algorithm": "sha256",
        "digest": entry["expected"]["pcr10_sha256_per_bank_template_hash"],
    }


def test_ccel_detected_and_named_by_td_registers(capsys: pytest.CaptureFixture[str]) -> None:
    entry = next(e for e in manifest("ccel") if e["file"] == "go-tdx-guest/ccel_data.dat")
    code, out, _ = run(capsys, "eventlog", "replay", str(path("ccel", entry["file"])), "--json")
    assert code == 0
    got = {r["register"]: r["digest"] for r in json.loads(out)["registers"]}
    want = {
        cc_name(int(i)): v for i, v in entry["expected"]["registers_by_log_index"]["sha384"].items()
    }
    assert got == want


def test_show_json_lists_every_event(capsys: pytest.CaptureFixture[str]) -> None:
    entry = next(e for e in manifest("tcg") if e["file"] == "tpm2-tools/event-bootorder.bin")
    code, out, _ = run(capsys, "eventlog", "show", str(path("tcg", entry["file"])), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["format"] == "tcg"
    assert len(doc["events"]) == entry["expected"]["event_count_including_header"]


def test_show_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "eventlog", "show", str(path("tcg", "tpm2-tools/event-uefivar.bin")))
    assert code == 0
    assert "EV_EFI_VARIABLE_DRIVER_CONFIG" in out


def test_convert_to_cel_and_back(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = path("tcg", "tpm2-tools/event-arch-linux.bin")
    cel_file = tmp_path / "log.cel.json"
    assert main(["eventlog", "convert", str(src), "--to", "cel-json", "-o", str(cel_file)]) == 0
    back = tmp_path / "log.bin"
    assert main(["eventlog", "convert", str(cel_file), "--to", "tcg", "-o", str(back)]) == 0
    capsys.readouterr()
    a = run(capsys, "eventlog", "replay", str(src), "--json")[1]
    b = run(capsys, "eventlog", "replay", str(cel_file), "--json")[1]
    c = run(capsys, "eventlog", "replay", str(back), "--json")[1]
    assert json.loads(a)["registers"] == json.loads(b)["registers"] == json.loads(c)["registers"]


def test_truncated_log_exits_2_naming_file_and_offset(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = path("tcg", "tpm2-tools/event-bootorder.bin").read_bytes()
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(data[: len(data) // 2])
    code, out, err = run(capsys, "eventlog", "replay", str(bad), "--format", "tcg", "--json")
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert str(bad) in lines[0] and "offset" in lines[0]


def test_missing_file_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "eventlog", "show", str(tmp_path / "nope"))
    assert code == 2
    assert "no such file" in err


def test_unknown_format_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x01\x02 this is not a log")
    code, _, err = run(capsys, "eventlog", "replay", str(junk))
    assert code == 2
    assert str(junk) in err and "not a recognised log" in err


def test_unknown_bank_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "eventlog", "replay", str(path("tcg", "tpm2-tools/event.bin")), "--bank", "md5"
    )
    assert code == 2
    assert "md5" in err


def test_ima_binary_streams_like_ascii(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    entry = next(e for e in manifest("ima") if e["file"] == "keylime-perf-tests/ima_log.txt")
    src = path("ima", entry["file"])
    binary = tmp_path / "binary_runtime_measurements"
    assert main(["eventlog", "convert", str(src), "--to", "ima-binary", "-o", str(binary)]) == 0
    capsys.readouterr()
    for f in (src, binary):
        code, out, _ = run(
            capsys, "eventlog", "replay", str(f), "--bank", "sha1", "--bank", "sha256", "--json"
        )
        assert code == 0
        doc = json.loads(out)
        assert doc["events"] == entry["expected"]["entries"]
        got = {r["algorithm"]: r["digest"] for r in doc["registers"]}
        assert got == entry["expected"]["pcr10"]
    # a list cut inside an entry is an input error naming the file and the offset
    cut = tmp_path / "cut"
    cut.write_bytes(binary.read_bytes()[:-7])
    code, out, err = run(capsys, "eventlog", "replay", str(cut), "--format", "ima-binary")
    assert code == 2 and out == ""
    assert str(cut) in err and "offset" in err
