"""``cima verify`` and ``cima reference create|check`` on real vector bundles.

The commands are run through a parser built from the modules' ``register()``
with the exit-status rules of ``cima.cli.main`` (0 ok, 1 verification failed,
2 bad input), so that the tests do not depend on the command being wired into
``cima.cli.main`` yet.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cima.cli import _util
from cima.cli import reference as reference_cli
from cima.cli import verify as verify_cli
from cima.errors import CimaError
from cima.verifier.result import verify_jwt
from tests.verifier import evidence_sets as es


def cima(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="cima")
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    verify_cli.register(sub)
    reference_cli.register(sub)
    args = parser.parse_args(list(argv))
    try:
        code: int = args.handler(args)
    except _util.VerificationFailed as e:
        _util.fail_line(f"cima: verification failed: {e}")
        return 1
    except CimaError as e:
        _util.fail_line(f"cima: error: {e}")
        return 2
    return code


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cima(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("verify-cli")
    out = {}
    for name, make in (("keylime", es.keylime), ("cos113", es.cos113)):
        vb = make()
        path = d / f"{name}.json"
        path.write_text(vb.bundle.to_json())
        out[name] = path
        out[f"{name}-report-data"] = d / f"{name}.rd"
        out[f"{name}-report-data"].write_text(vb.report_data.hex() if vb.report_data else "")
    key = ec.generate_private_key(ec.SECP256R1())
    out["key"] = d / "verifier.pem"
    out["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    out["pub"] = d / "verifier.pub"
    out["pub"].write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    out["dir"] = d
    return out


@pytest.fixture(scope="module")
def refs(files: dict[str, Path]) -> dict[str, Path]:
    out = {}
    for name in ("keylime", "cos113"):
        path = files["dir"] / f"{name}.yaml"
        assert cima(["reference", "create", str(files[name]), "-o", str(path)]) == 0
        out[name] = path
    return out


def _rd(files: dict[str, Path], name: str) -> str:
    return files[f"{name}-report-data"].read_text()


def test_create_and_check(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path], refs: dict[str, Path]
) -> None:
    code, out, _ = run(capsys, "reference", "check", str(refs["keylime"]), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["valid"] is True
    assert doc["trusted_keys"] == 1
    assert doc["ima"]["files"] == 779
    assert doc["boot"] == [{"name": "keylime.json", "registers": 15, "events": 153}]
    code, out, _ = run(capsys, "reference", "check", str(refs["cos113"]))
    assert code == 0 and "valid reference values" in out


def test_verify_affirming(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path], refs: dict[str, Path]
) -> None:
    code, out, _ = run(
        capsys,
        "verify",
        str(files["keylime"]),
        "--reference",
        str(refs["keylime"]),
        "--report-data",
        _rd(files, "keylime"),
    )
    assert code == 0
    for part in (
        "firmware",
        "bootloader",
        "kernel",
        "cmdline",
        "initrd",
        "ima",
        "result: affirming",
    ):
        assert part in out


def test_verify_json(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path], refs: dict[str, Path]
) -> None:
    code, out, _ = run(
        capsys,
        "verify",
        str(files["cos113"]),
        "-r",
        str(refs["cos113"]),
        "--report-data",
        _rd(files, "cos113"),
        "--json",
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["status"] == "affirming" and doc["platform"] == "tdx"
    assert doc["environment"]["children"][1]["kind"] == "firmware"


def test_verify_contraindicated_exits_1(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path], refs: dict[str, Path]
) -> None:
    code, out, _ = run(
        capsys,
        "verify",
        str(files["cos113"]),
        "-r",
        str(refs["keylime"]),
        "--report-data",
        _rd(files, "cos113"),
        "--json",
    )
    assert code == 1
    doc = json.loads(out)
    assert doc["status"] == "contraindicated"
    regs = {f["register"] for f in doc["failures"] if f.get("register")}
    assert {"mrtd", "rtmr0", "rtmr1", "rtmr2"} <= regs
    code, out, _ = run(
        capsys,
        "verify",
        str(files["cos113"]),
        "-r",
        str(refs["keylime"]),
        "--report-data",
        _rd(files, "cos113"),
    )
    assert code == 1 and "result: contraindicated" in out


def test_verify_without_nonce_is_a_warning(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path], refs: dict[str, Path]
) -> None:
    code, out, _ = run(
        capsys, "verify", str(files["keylime"]), "-r", str(refs["keylime"]), "--json"
    )
    assert code == 1
    assert json.loads(out)["failures"][0]["code"] == "freshness"  # keylime binds base64(nonce)


def test_verify_writes_a_jwt(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path], refs: dict[str, Path]
) -> None:
    token_path = files["dir"] / "result.jwt"
    code, _, _ = run(
        capsys,
        "verify",
        str(files["keylime"]),
        "-r",
        str(refs["keylime"]),
        "--report-data",
        _rd(files, "keylime"),
        "--jwt-key",
        str(files["key"]),
        "-o",
        str(token_path),
        "--json",
    )
    assert code == 0
    claims = verify_jwt(token_path.read_text().strip(), files["pub"].read_bytes())
    assert claims["cima.status"] == "affirming"
    assert claims["submods"]["ima"]["ear.status"] == "affirming"


BAD_INPUTS = {
    "bundle missing": (["verify", "{dir}/nope.json", "-r", "{keylime_refs}"], "no such file"),
    "bundle not JSON": (["verify", "{dir}/verifier.pem", "-r", "{keylime_refs}"], "not JSON"),
    "bundle of unknown version": (["verify", "{dir}/v9.json", "-r", "{keylime_refs}"], "version 9"),
    "reference with unknown key": (
        ["verify", "{keylime}", "-r", "{dir}/bad.yaml"],
        "bogus: unknown key",
    ),
    "reference with bad hex": (
        ["reference", "check", "{dir}/badhex.yaml"],
        "boot[0].registers.pcr0.sha256",
    ),
    "jwt key without output": (
        ["verify", "{keylime}", "-r", "{keylime_refs}", "--jwt-key", "{dir}/verifier.pem"],
        "go together",
    ),
    "jwt key that is not a key": (
        [
            "verify",
            "{keylime}",
            "-r",
            "{keylime_refs}",
            "--jwt-key",
            "{keylime_refs}",
            "-o",
            "{dir}/x.jwt",
            "--report-data",
            "00",
        ],
        "does not load",
    ),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(
    name: str, capsys: pytest.CaptureFixture[str], files: dict[str, Path], refs: dict[str, Path]
) -> None:
    d = files["dir"]
    (d / "bad.yaml").write_text("version: 1\nbogus: 1\n")
    (d / "badhex.yaml").write_text("version: 1\nboot:\n  - registers:\n      pcr0: {sha256: zz}\n")
    v9 = json.loads(files["keylime"].read_text())
    v9["version"] = 9
    (d / "v9.json").write_text(json.dumps(v9))
    argv, message = BAD_INPUTS[name]
    subst = {"dir": str(d), "keylime": str(files["keylime"]), "keylime_refs": str(refs["keylime"])}
    code, _, err = run(capsys, *[a.format(**subst) for a in argv])
    assert code == 2
    assert err.count("\n") == 1 and message in err
