"""The agent policy (DESIGN.md section 5): validation with key paths and file lines, and the CLI.

Expected values come from the policy format of DESIGN.md section 5 and from the
lines of the texts written here; nothing is copied from the code's output.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cima.agent.policy import (
    DEFAULT_POLICY_TEXT,
    MAX_POLICY_SIZE,
    Policy,
    PolicyFileError,
    load_policy,
    parse_policy,
)
from cima.cli import policy as policy_cli
from cima.errors import PolicyError

CODES = {
    "unreadable",
    "syntax",
    "not-mapping",
    "duplicate-key",
    "unknown-key",
    "missing-key",
    "type",
    "value",
    "algorithm",
    "empty",
}
HEAD = "backend: ima\nhashAlgorithm: sha256\n"

# The example published with the CIMA agent lists kube-scheduler twice.
PUBLISHED_EXAMPLE = """\
backend: ima
hashAlgorithm: sha384
measure:
  system:
    withParameter: true
    processes:
      - /usr/bin/containerd
      - /usr/bin/kubelet
  container:
    isolated: true
  kubernetes:
    withParameter: true
    pods:
      - kube-apiserver
      - kube-scheduler
      - kube-proxy
      - kube-scheduler
"""

# (name, text, code, key, line): one invalid policy each, and where the error must point.
BAD_POLICIES = [
    ("unknown-top-key", HEAD + "extra: 1\n", "unknown-key", "extra", 3),
    (
        "unknown-nested-key",
        HEAD + "measure:\n  system:\n    withParams: true\n    processes: [/a]\n",
        "unknown-key",
        "measure.system.withParams",
        5,
    ),
    (
        "unknown-container-key",
        HEAD + "measure:\n  container:\n    isolate: true\n",
        "unknown-key",
        "measure.container.isolate",
        5,
    ),
    (
        "unknown-section",
        HEAD + "measure:\n  files: {}\n",
        "unknown-key",
        "measure.files",
        4,
    ),
    (
        "snake-case-key",
        HEAD + "measure:\n  system:\n    with_parameter: true\n    processes: [/a]\n",
        "unknown-key",
        "measure.system.with_parameter",
        5,
    ),
    (
        "bool-as-string",
        HEAD + 'measure:\n  system:\n    withParameter: "true"\n    processes: [/a]\n',
        "type",
        "measure.system.withParameter",
        5,
    ),
    (
        "bool-as-number",
        HEAD + "measure:\n  container:\n    isolated: 1\n",
        "type",
        "measure.container.isolated",
        5,
    ),
    (
        "env-values-not-bool",
        HEAD + "measure:\n  container:\n    withEnvValues: sometimes\n",
        "type",
        "measure.container.withEnvValues",
        5,
    ),
    (
        "processes-not-a-list",
        HEAD + "measure:\n  system:\n    processes: /usr/bin/containerd\n",
        "type",
        "measure.system.processes",
        5,
    ),
    (
        "process-not-a-string",
        HEAD + "measure:\n  system:\n    processes:\n      - /a\n      - 42\n",
        "type",
        "measure.system.processes[1]",
        7,
    ),
    (
        "process-relative",
        HEAD + "measure:\n  system:\n    processes:\n      - containerd\n",
        "value",
        "measure.system.processes[0]",
        6,
    ),
    (
        "process-index-after-duplicate",
        HEAD + "measure:\n  system:\n    processes:\n      - /a\n      - /a\n      - 7\n",
        "type",
        "measure.system.processes[2]",
        8,
    ),
    (
        "pod-empty-string",
        HEAD + 'measure:\n  kubernetes:\n    pods:\n      - kube-proxy\n      - ""\n',
        "value",
        "measure.kubernetes.pods[1]",
        7,
    ),
    (
        "measure-not-a-mapping",
        HEAD + "measure:\n  - system\n",
        "type",
        "measure",
        3,
    ),
    (
        "system-not-a-mapping",
        HEAD + "measure:\n  system: yes\n",
        "type",
        "measure.system",
        4,
    ),
    ("unknown-algorithm", "backend: ima\nhashAlgorithm: md5\n", "algorithm", "hashAlgorithm", 2),
    ("sha1-not-allowed", "backend: ima\nhashAlgorithm: sha1\n", "algorithm", "hashAlgorithm", 2),
    ("algorithm-number", "backend: ima\nhashAlgorithm: 256\n", "algorithm", "hashAlgorithm", 2),
    ("algorithm-list", "backend: ima\nhashAlgorithm: [sha256]\n", "algorithm", "hashAlgorithm", 2),
    ("unknown-backend", "backend: kernel\nhashAlgorithm: sha256\n", "value", "backend", 1),
    ("missing-backend", "hashAlgorithm: sha256\n", "missing-key", "backend", 1),
    ("missing-algorithm", "\n\nbackend: none\n", "missing-key", "hashAlgorithm", 3),
    (
        "missing-processes",
        HEAD + "measure:\n  system:\n    withParameter: true\n",
        "missing-key",
        "measure.system.processes",
        4,
    ),
    (
        "missing-pods",
        HEAD + "measure:\n  kubernetes:\n    withParameter: false\n",
        "missing-key",
        "measure.kubernetes.pods",
        4,
    ),
    (
        "empty-processes",
        HEAD + "measure:\n  system:\n    withParameter: true\n    processes: []\n",
        "empty",
        "measure.system.processes",
        6,
    ),
    (
        "empty-pods",
        HEAD + "measure:\n  kubernetes:\n    pods: []\n",
        "empty",
        "measure.kubernetes.pods",
        5,
    ),
    (
        "duplicate-key",
        "backend: ima\nhashAlgorithm: sha256\nbackend: none\n",
        "duplicate-key",
        "backend",
        3,
    ),
    (
        "duplicate-nested-key",
        HEAD + "measure:\n  system:\n    processes: [/a]\n  system:\n    processes: [/b]\n",
        "duplicate-key",
        "measure.system",
        6,
    ),
    ("not-yaml-unclosed", HEAD + "measure: [system\n", "syntax", None, 4),
    ("not-yaml-tab", HEAD + "measure:\n\tsystem: {}\n", "syntax", None, 4),
    ("not-yaml-control-character", HEAD + "measure: \x07\n", "syntax", None, 3),
    ("not-yaml-two-documents", HEAD + "---\nbackend: none\n", "syntax", None, 3),
    ("yaml-list", "- backend\n- ima\n", "not-mapping", None, 1),
    ("yaml-scalar", "\njust some text\n", "not-mapping", None, 2),
    ("yaml-empty", "", "not-mapping", None, 1),
    ("yaml-only-comment", "# nothing here\n", "not-mapping", None, 1),
]


@pytest.mark.parametrize(
    ("text", "where"),
    [pytest.param(t, (c, k, ln), id=name) for name, t, c, k, ln in BAD_POLICIES],
)
def test_bad_policy(text: str, where: tuple[str, str | None, int]) -> None:
    with pytest.raises(PolicyFileError) as info:
        parse_policy(text, source="bad.yaml")
    e = info.value
    assert (e.code, e.key, e.line) == where


def test_error_message_names_file_line_and_key() -> None:
    with pytest.raises(PolicyError, match=r"^p\.yaml, line 3, extra: unknown key 'extra'"):
        parse_policy(HEAD + "extra: 1\n", source="p.yaml")


def test_every_error_is_reported() -> None:
    text = "hashAlgorithm: md5\nmeasure:\n  system:\n    processes: []\n  bogus: 1\n"
    with pytest.raises(PolicyFileError) as info:
        parse_policy(text, source="p.yaml")
    found = [(e.code, e.key, e.line) for e in (info.value, *info.value.others)]
    assert found == [
        ("missing-key", "backend", 1),
        ("algorithm", "hashAlgorithm", 1),
        ("empty", "measure.system.processes", 4),
        ("unknown-key", "measure.bogus", 5),
    ]
    assert str(info.value).endswith("(and 3 more)")


def test_design_example() -> None:
    p = parse_policy(DEFAULT_POLICY_TEXT)
    assert p.backend == "ima"
    assert p.hash_algorithm == "sha384"
    assert p.measure.system is not None and p.measure.system.with_parameter is True
    assert p.measure.system.processes == (
        "/usr/bin/containerd",
        "/usr/bin/kubelet",
        "/usr/bin/containerd-shim-runc-v2",
    )
    assert p.measure.container is not None and p.measure.container.isolated is True
    assert p.measure.container.with_env_values is False
    assert p.measure.kubernetes is not None and p.measure.kubernetes.with_parameter is True
    assert p.measure.kubernetes.pods == (
        "kube-apiserver",
        "kube-scheduler",
        "kube-proxy",
        "kube-controller-manager",
    )
    assert p.warnings == ()


def test_duplicate_entry_accepted_once_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cima.agent.policy"):
        p = parse_policy(PUBLISHED_EXAMPLE, source="cima.yaml")
    assert p.measure.kubernetes is not None
    assert p.measure.kubernetes.pods == ("kube-apiserver", "kube-scheduler", "kube-proxy")
    # The second kube-scheduler is on line 17, the first on line 15.
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "line 17" in message and "kube-scheduler" in message and "line 15" in message
    assert p.warnings == (message,)


def test_sections_are_optional() -> None:
    p = parse_policy("backend: none\nhashAlgorithm: sha512\n")
    assert (p.measure.system, p.measure.container, p.measure.kubernetes) == (None, None, None)
    assert p.isolated is True  # no container section: isolation stays on
    q = parse_policy(HEAD + "measure:\n  system: null\n  container: {isolated: false}\n")
    assert q.measure.system is None and q.isolated is False


@pytest.mark.parametrize("spelling", ["SHA384", "sha-384", "Sha384"])
def test_algorithm_spellings(spelling: str) -> None:
    assert parse_policy(f"backend: ima\nhashAlgorithm: {spelling}\n").hash_algorithm == "sha384"


def test_lines_of_keys() -> None:
    p = parse_policy(DEFAULT_POLICY_TEXT)
    assert p.line_of("hashAlgorithm") == 2
    assert p.line_of("measure.system.processes[1]") == 8
    assert p.line_of("measure.kubernetes.pods[3]") == 18
    assert p.line_of("measure.nothing") is None


def test_normalised_round_trip() -> None:
    p = parse_policy(PUBLISHED_EXAMPLE)
    d = p.to_dict()
    assert d["measure"]["kubernetes"]["pods"] == ["kube-apiserver", "kube-scheduler", "kube-proxy"]
    assert d["measure"]["container"] == {"isolated": True, "withEnvValues": False}
    again = parse_policy(yaml.safe_dump(d))
    assert again.to_dict() == d
    assert again.canonical_bytes() == p.canonical_bytes()


def test_frozen() -> None:
    p = parse_policy(DEFAULT_POLICY_TEXT)
    with pytest.raises(ValidationError):
        p.backend = "none"  # type: ignore[misc]


def test_check_bank() -> None:
    p = parse_policy("backend: ima\nhashAlgorithm: sha512\n", source="p.yaml")
    p.check_bank(["sha256", "sha512"])
    with pytest.raises(PolicyFileError) as info:
        p.check_bank(["sha1", "sha256", "sha384"], register="pcr13")
    e = info.value
    assert (e.code, e.key, e.line) == ("bank", "hashAlgorithm", 2)
    assert "pcr13" in str(e) and "sha1, sha256, sha384" in str(e)


def test_alias_bomb_is_quick() -> None:
    # Nine levels of nine references: a value of 9**9 strings if it were expanded.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    text = HEAD + "\n".join(lines) + "\nmeasure:\n  system:\n    processes: *a9\n"
    start = time.monotonic()
    with pytest.raises(PolicyFileError) as info:
        parse_policy(text)
    assert time.monotonic() - start < 5
    assert info.value.code == "unknown-key"


# -- files -------------------------------------------------------------------------------------


def test_load_file(tmp_path: Path) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text(DEFAULT_POLICY_TEXT)
    p = load_policy(f)
    assert p.source == str(f)
    assert p.raw == f.read_bytes()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError) as info:
        load_policy(tmp_path / "absent.yaml")
    assert (info.value.code, info.value.source) == ("unreadable", str(tmp_path / "absent.yaml"))


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError) as info:
        load_policy(tmp_path)
    assert info.value.code == "unreadable"


def test_oversized_file(tmp_path: Path) -> None:
    f = tmp_path / "big.yaml"
    f.write_bytes(b"#" * (MAX_POLICY_SIZE + 1))
    with pytest.raises(PolicyFileError) as info:
        load_policy(f)
    assert info.value.code == "unreadable"


def test_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "latin1.yaml"
    f.write_bytes(HEAD.encode() + b"# caf\xe9\n")
    with pytest.raises(PolicyFileError) as info:
        load_policy(f)
    assert (info.value.code, info.value.line) == ("syntax", 3)


# -- robustness --------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_random_text_gives_policy_or_policy_error(text: str) -> None:
    try:
        p = parse_policy(text)
    except PolicyFileError as e:
        assert e.code in CODES
    else:
        assert p.hash_algorithm in ("sha256", "sha384", "sha512")


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_mutated_example_gives_policy_or_policy_error(data: st.DataObject) -> None:
    text = DEFAULT_POLICY_TEXT
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 8)))
        text = text[:i] + data.draw(st.text(max_size=6)) + text[j:]
    try:
        p = parse_policy(text)
    except PolicyFileError as e:
        assert e.line is None or 1 <= e.line <= text.count("\n") + 2
    else:
        assert isinstance(p, Policy)


# -- the command -------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cima")
    sub = parser.add_subparsers(dest="command")
    policy_cli.register(sub)
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result


def test_cli_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text(DEFAULT_POLICY_TEXT)
    assert _cli(["policy", "check", str(f)]) == 0
    assert str(f) in capsys.readouterr().out


def test_cli_check_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text(PUBLISHED_EXAMPLE)
    assert _cli(["policy", "check", "--json", str(f)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {
        "backend": "ima",
        "hashAlgorithm": "sha384",
        "measure": {
            "system": {
                "withParameter": True,
                "processes": ["/usr/bin/containerd", "/usr/bin/kubelet"],
            },
            "container": {"isolated": True, "withEnvValues": False},
            "kubernetes": {
                "withParameter": True,
                "pods": ["kube-apiserver", "kube-scheduler", "kube-proxy"],
            },
        },
    }


def test_cli_check_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text(HEAD + "measure:\n  system:\n    processes: []\n")
    assert _cli(["policy", "check", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(f) in err[0] and "line 5" in err[0] and "measure.system.processes" in err[0]


def test_cli_check_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["policy", "check", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
