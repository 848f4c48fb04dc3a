"""System processes from /proc, against real processes started here (a copy of sleep).

Expected digests are hashlib over the executable file; expected pids and command
lines are those of the processes the test starts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cima.agent.collectors.procfs import ProcessCollector
from cima.agent.engine import Engine
from cima.agent.journal import Journal
from cima.agent.policy import SystemPolicy, parse_policy
from cima.platform.software import SoftwarePlatform

SLEEP = shutil.which("sleep")


@pytest.fixture
def binary(tmp_path: Path) -> Path:
    if SLEEP is None:
        pytest.skip(reason="no sleep executable")
    target = tmp_path / "bin" / "cima-test-sleep"
    target.parent.mkdir()
    shutil.copy2(SLEEP, target)
    return target


class Processes:
    """Processes started by a test, stopped at its end."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv)
        self.running.append(p)
        # Wait until the process runs the executable with its arguments (after its exec).
        for _ in range(500):
            try:
                exe = os.readlink(f"/proc/{p.pid}/exe")
                cmdline = Path(f"/proc/{p.pid}/cmdline").read_bytes()
            except OSError:
                exe, cmdline = "", b""
            if exe.startswith(os.path.dirname(argv[0])) and cmdline.startswith(argv[0].encode()):
                break
            time.sleep(0.005)
        return p

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        p.kill()
        p.wait()

    def stop_all(self) -> None:
        for p in self.running:
            if p.poll() is None:
                self.stop(p)


@pytest.fixture
def processes() -> Iterator[Processes]:
    ps = Processes()
    yield ps
    ps.stop_all()


def system(*paths: str, with_parameter: bool = True) -> SystemPolicy:
    return SystemPolicy.model_validate({"withParameter": with_parameter, "processes": list(paths)})


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_measures_a_running_process(binary: Path, processes: Processes) -> None:
    p = processes.start([str(binary), "1000"])
    found = list(ProcessCollector(system(str(binary)), algorithm="sha256").collect())
    assert len(found) == 1
    o = found[0]
    assert (o.kind, o.scope, o.subject, o.key) == (
        "process",
        "node",
        str(binary),
        f"process:{binary}:{p.pid}",
    )
    assert o.data == {
        "pid": p.pid,
        "exe": str(binary),
        "exe_digest": sha256_file(binary),
        "cmdline": [str(binary), "1000"],
    }


def test_without_parameters_no_cmdline(binary: Path, processes: Processes) -> None:
    processes.start([str(binary), "1000"])
    (o,) = ProcessCollector(system(str(binary), with_parameter=False), algorithm="sha384").collect()
    assert "cmdline" not in o.data
    assert o.data["exe_digest"] == "sha384:" + hashlib.sha384(binary.read_bytes()).hexdigest()


def test_other_processes_are_not_reported(binary: Path, processes: Processes) -> None:
    processes.start([str(binary), "1000"])
    assert list(ProcessCollector(system("/nonexistent/x"), algorithm="sha256").collect()) == []
    assert list(ProcessCollector(None, algorithm="sha256").collect()) == []


def test_matched_by_argv0(binary: Path, processes: Processes, tmp_path: Path) -> None:
    link = tmp_path / "bin" / "link-to-sleep"
    link.symlink_to(binary)
    p = processes.start([str(link), "1000"])
    (o,) = ProcessCollector(system(str(link)), algorithm="sha256").collect()
    assert (o.subject, o.data["pid"], o.data["exe"]) == (str(link), p.pid, str(binary))


def test_replaced_executable(binary: Path, processes: Processes) -> None:
    digest = sha256_file(binary)
    p = processes.start([str(binary), "1000"])
    binary.unlink()
    (o,) = ProcessCollector(system(str(binary)), algorithm="sha256").collect()
    assert o.data["pid"] == p.pid
    assert o.data["exe"] == f"{binary} (deleted)"
    assert o.data["exe_digest"] == digest  # the file the process runs, not a path


def test_engine_measures_restarts_only(binary: Path, processes: Processes, tmp_path: Path) -> None:
    platform = SoftwarePlatform()
    policy = parse_policy(
        f"backend: none\nhashAlgorithm: sha256\nmeasure:\n  system:\n"
        f"    withParameter: true\n    processes: [{binary}]\n"
    )
    assert policy.measure.system is not None
    collector = ProcessCollector(policy.measure.system, algorithm="sha256")
    with Journal.open(
        tmp_path / "j", platform=platform, register="pcr13", algorithm="sha256"
    ) as journal:
        engine = Engine(policy, platform, journal, collectors=[collector])
        first = processes.start([str(binary), "1000"])
        (e,) = engine.poll()
        assert (e.kind, e.data["pid"], e.data["cmdline"]) == (
            "process",
            first.pid,
            [str(binary), "1000"],
        )
        assert engine.poll() == []  # unchanged: not measured again
        processes.stop(first)
        assert engine.poll() == []
        second = processes.start([str(binary), "999", "1"])
        (e,) = engine.poll()
        assert (e.data["pid"], e.data["cmdline"]) == (second.pid, [str(binary), "999", "1"])
        assert e.data["exe_digest"] == sha256_file(binary)
        assert engine.poll() == []
    # A restarted agent remembers what it measured.
    with Journal.open(
        tmp_path / "j", platform=platform, register="pcr13", algorithm="sha256"
    ) as journal:
        engine = Engine(policy, platform, journal, collectors=[collector])
        assert engine.poll() == []
        assert len(journal) == 2


# -- a proc root built by the test: the same pid changes its command line or executable --------


def fake_proc(root: Path, pid: int, exe: Path, argv: list[str]) -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    link = d / "exe"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(exe)
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\x00" for a in argv))


def test_same_pid_new_cmdline_or_binary(binary: Path, tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_proc(proc, 4242, binary, [str(binary), "1"])
    (proc / "self").mkdir()  # not a pid: ignored
    platform = SoftwarePlatform()
    policy = parse_policy(
        f"backend: none\nhashAlgorithm: sha256\nmeasure:\n  system:\n"
        f"    withParameter: true\n    processes: [{binary}]\n"
    )
    assert policy.measure.system is not None
    collector = ProcessCollector(policy.measure.system, proc_root=proc, algorithm="sha256")
    with Journal.open(tmp_path / "j", platform=platform, register="pcr13", algorithm="sha256") as j:
        engine = Engine(policy, platform, j, collectors=[collector])
        assert [e.data["cmdline"] for e in engine.poll()] == [[str(binary), "1"]]
        fake_proc(proc, 4242, binary, [str(binary), "2"])
        assert [e.data["cmdline"] for e in engine.poll()] == [[str(binary), "2"]]
        assert engine.poll() == []
        # The same path, new contents (an upgrade): a new digest, measured again.
        binary.write_bytes(b"#!/bin/sh\nexit 0\n")
        (e,) = engine.poll()
        assert e.data["exe_digest"] == sha256_file(binary)
        assert [x.key for x in j.entries()] == [f"process:{binary}:4242"] * 3


def test_unreadable_entries_are_skipped(binary: Path, tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "17").mkdir(parents=True)  # a kernel thread: no exe, empty cmdline
    (proc / "17" / "cmdline").write_bytes(b"")
    fake_proc(proc, 18, tmp_path / "vanished", ["/x/y"])  # dangling: the process is gone
    fake_proc(proc, 19, binary, [])  # inside execve: new executable, no arguments yet
    collector = ProcessCollector(system("/x/y", str(binary)), proc_root=proc, algorithm="sha256")
    assert list(collector.collect()) == []
    assert collector.skipped == 2


def test_host_proc_scan(binary: Path, processes: Processes) -> None:
    """The whole of this machine's /proc: kernel threads and all, only the named process."""
    p = processes.start([str(binary), "1000"])
    found = list(ProcessCollector(system(str(binary), "/sbin/none"), algorithm="sha256").collect())
    assert [o.data["pid"] for o in found] == [p.pid]


def test_update_policy(binary: Path, processes: Processes) -> None:
    processes.start([str(binary), "1000"])
    collector = ProcessCollector(system("/nonexistent"), algorithm="sha256")
    assert list(collector.collect()) == []
    collector.update_policy(
        parse_policy(
            "backend: none\nhashAlgorithm: sha256\n"
            f"measure:\n  system:\n    processes: [{binary}]\n"
        )
    )
    assert len(list(collector.collect())) == 1
