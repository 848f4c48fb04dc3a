"""``cima agent`` and ``cima client``: the daemon's life cycle and the client commands.

The agent runs as a real process on the software platform, measuring this
machine's processes (the test's own Python), with its journal and socket in a
temporary directory; it is driven with signals as a DaemonSet's runtime does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from cima.cli import _util
from cima.client import CimaClient
from cima.errors import CimaError
from cima.evidence.bundle import EvidenceBundle
from cima.platform.software import SoftwarePlatform
from tests.agent.test_server import Agent, start_agent

PYTHON = os.path.realpath(sys.executable)

POLICY = f"""\
backend: none
hashAlgorithm: sha384
measure:
  system:
    withParameter: true
    processes:
      - {PYTHON}
  container:
    isolated: true
"""

# The agent and client commands through their modules' register(), with the
# error handling of cima's main (CimaError: one line, exit 2).
CLI = """
import argparse, sys
from cima.cli import _util, agent, client
from cima.errors import CimaError
parser = argparse.ArgumentParser(prog="cima")
parser.add_argument("-v", "--verbose", action="store_true")
sub = parser.add_subparsers(dest="command", required=True)
agent.register(sub)
client.register(sub)
args = parser.parse_args(sys.argv[1:])
try:
    sys.exit(args.handler(args))
except CimaError as e:
    _util.fail_line(f"cima: error: {e}")
    sys.exit(2)
"""


def _main_has(command: str) -> bool:
    from cima.cli.main import build_parser

    with contextlib.redirect_stderr(io.StringIO()):
        try:
            build_parser().parse_args([command, "--help"])
        except SystemExit as e:
            return e.code == 0
    return False


def cima_argv() -> list[str]:
    """How to run ``cima``: its main when it knows the agent, else the modules directly."""
    if _main_has("agent") and _main_has("client"):
        return [sys.executable, "-m", "cima.cli.main"]
    return [sys.executable, "-c", CLI]


def run_cli(argv: Sequence[str]) -> int:
    """``cima client ...`` in this process."""
    from cima.cli import agent, client

    parser = argparse.ArgumentParser(prog="cima")
    sub = parser.add_subparsers(dest="command", required=True)
    agent.register(sub)
    client.register(sub)
    args = parser.parse_args(list(argv))
    try:
        code: int = args.handler(args)
    except CimaError as e:
        _util.fail_line(f"cima: error: {e}")
        return 2
    return code


class Daemon:
    """A ``cima agent`` process on the software platform."""

    def __init__(self, directory: Path, policy: str = POLICY, *extra: str) -> None:
        self.directory = directory
        self.policy = directory / "policy.yaml"
        if not self.policy.exists():
            self.policy.write_text(policy)
        self.socket = directory / "run" / "cima.sock"
        self.state = directory / "state"
        self.journal = directory / "journal"
        self.argv = [
            *cima_argv(),
            "agent",
            "--policy",
            str(self.policy),
            "--platform",
            "software",
            "--state-dir",
            str(self.state),
            "--journal",
            str(self.journal),
            "--socket",
            str(self.socket),
            "--interval",
            "0.2",
            *extra,
        ]
        self.process: subprocess.Popen[str] | None = None
        self.stderr = ""

    def start(self) -> Daemon:
        self.process = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                _, self.stderr = self.process.communicate()
                raise AssertionError(f"the agent exited {self.process.returncode}: {self.stderr}")
            if self.socket.exists():
                with contextlib.suppress(CimaError), CimaClient(self.socket, timeout=2) as c:
                    c.info()
                    return
            time.sleep(0.05)
        raise AssertionError("the agent did not start serving")

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        _, self.stderr = self.process.communicate(timeout=timeout)
        return self.process.returncode

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.communicate()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path).start()
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


def _runtime(socket: Path) -> list[Any]:
    with CimaClient(socket) as c:
        return c.get_eventlog("runtime")


def _wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


def test_the_agent_measures_and_serves(daemon: Daemon) -> None:
    records = _runtime(daemon.socket)
    kinds = [r.content["kind"] for r in records]
    assert kinds[:2] == ["agent", "policy"]
    processes = [r.content for r in records if r.content["kind"] == "process"]
    assert processes and all(p["subject"] == PYTHON for p in processes)
    assert any(p["data"]["pid"] == daemon.process.pid for p in processes)  # type: ignore[union-attr]
    with CimaClient(daemon.socket) as c:
        assert c.info()["platform"] == "software"
        bundle = c.get_evidence(b"nonce")
    bundle.verify_binding()
    register = SoftwarePlatform(daemon.state).read("pcr13", "sha384")
    assert c.replay_cc_eventlog(bundle.runtime_log).get("pcr13", "sha384") == register


def test_sighup_reloads_the_policy_and_keeps_the_journal(daemon: Daemon) -> None:
    before = _runtime(daemon.socket)
    daemon.policy.write_text(POLICY.replace("withParameter: true", "withParameter: false"))
    daemon.signal(signal.SIGHUP)
    _wait_for(lambda: [r.content["kind"] for r in _runtime(daemon.socket)].count("policy") == 2)
    after = _runtime(daemon.socket)
    assert [r.to_dict() for r in after[: len(before)]] == [r.to_dict() for r in before]
    policy = [r.content for r in after if r.content["kind"] == "policy"][-1]
    assert policy["data"]["policy"]["measure"]["system"]["withParameter"] is False
    # An invalid policy on SIGHUP is reported; the agent keeps serving with the old one.
    daemon.policy.write_text("backend: ima\nhashAlgorithm: md5\n")
    daemon.signal(signal.SIGHUP)
    time.sleep(0.5)
    assert [r.content["kind"] for r in _runtime(daemon.socket)].count("policy") == 2


def test_sigterm_stops_cleanly_and_a_restart_reconciles(tmp_path: Path) -> None:
    first = Daemon(tmp_path).start()
    first.wait_ready()
    records = _runtime(first.socket)
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    assert not first.socket.exists()
    assert "agent stopped" in first.stderr

    second = Daemon(tmp_path).start()
    try:
        second.wait_ready()
        again = _runtime(second.socket)
        assert [r.to_dict() for r in again[: len(records)]] == [r.to_dict() for r in records]
        # The same code and policy are not measured twice.
        assert [r.content["kind"] for r in again].count("agent") == 1
        assert [r.content["kind"] for r in again].count("policy") == 1
    finally:
        second.stop()


def test_an_invalid_policy_names_the_key_and_line(tmp_path: Path) -> None:
    d = Daemon(tmp_path, "backend: ima\nhashAlgorithm: md5\n").start()
    assert d.wait() == 2
    assert "hashAlgorithm" in d.stderr and "line 2" in d.stderr
    assert not d.socket.exists()


def test_a_journal_that_cannot_be_reconciled_is_a_loud_error(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    d.wait_ready()
    d.stop()
    # Something else extends the runtime register while the agent is down.
    SoftwarePlatform(d.state).extend("pcr13", "sha384", bytes(48))
    again = Daemon(tmp_path).start()
    assert again.wait() == 2
    assert "journal" in again.stderr.lower()
    assert not again.socket.exists()


def test_a_second_agent_on_the_socket_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    second = Daemon(other)
    second.argv[second.argv.index("--socket") + 1] = str(daemon.socket)
    second.start()
    assert second.wait() == 2
    assert "already serving" in second.stderr
    with CimaClient(daemon.socket) as c:
        assert c.info()["platform"] == "software"


def test_a_socket_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    d.socket.parent.mkdir()
    d.socket.write_text("")
    d.start()
    assert d.wait() == 2
    assert "not a socket" in d.stderr


# -- cima client --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = start_agent(tmp_path_factory.mktemp("cli-client"), SoftwarePlatform(None))
    yield a
    a.stop()


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    assert run_cli(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_client_measurement(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    sock = str(agent.socket)
    doc = _json(capsys, ["client", "measurement", "--socket", sock, "--json"])
    values = {(r["register"], r["algorithm"]): r["digest"] for r in doc["registers"]}
    assert len(values) == 24
    assert values[("pcr10", "sha256")] == agent.platform.read("pcr10", "sha256").hex()
    argv = ["client", "measurement", "--register", "pcr13", "--algorithm", "sha384", "--json"]
    doc = _json(capsys, [*argv, "--socket", sock])
    assert doc["registers"] == [
        {
            "register": "pcr13",
            "algorithm": "sha384",
            "digest": agent.platform.read("pcr13", "sha384").hex(),
        }
    ]


def test_client_eventlog(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    sock = str(agent.socket)
    runtime = _json(capsys, ["client", "eventlog", "--log", "runtime", "--socket", sock, "--json"])
    assert len(runtime) == len(agent.journal)
    everything = _json(capsys, ["client", "eventlog", "--socket", sock, "--json"])
    assert len(everything) == len(agent.ima) + len(agent.journal)
    page = _json(
        capsys, ["client", "eventlog", "--start", "2", "--count", "3", "--socket", sock, "--json"]
    )
    assert page == everything[2:5]
    assert run_cli(["client", "eventlog", "--socket", sock]) == 0
    assert "agent" in capsys.readouterr().out


def test_client_report_and_evidence(
    agent: Agent, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    sock = str(agent.socket)
    argv = ["client", "report", "--nonce", "0011", "--user-data", "ff", "--socket", sock]
    doc = _json(capsys, [*argv, "--json"])
    assert doc["binding"] == "0011ff" and doc["scope"] == "node" and doc["kind"] == "tpm-quote"
    out = tmp_path / "bundle.json"
    argv = ["client", "evidence", "--nonce", "abcd", "-o", str(out), "--socket", sock, "--json"]
    doc = _json(capsys, argv)
    bundle = EvidenceBundle.from_json(out.read_bytes())
    assert bundle.to_dict() == doc
    assert bundle.nonce == bytes.fromhex("abcd")
    bundle.verify_binding()


def test_client_errors(agent: Agent, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_cli(["client", "info", "--socket", str(tmp_path / "none.sock")]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err
    argv = ["client", "measurement", "--register", "pcr99", "--socket", str(agent.socket)]
    assert run_cli(argv) == 2
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
