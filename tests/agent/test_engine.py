"""The engine: self-measurement first, change detection, restart memory, reload, bank checks.

Digests are recomputed here from the rules written in cima.agent.selfmeasure and
cima.agent.events (hashlib and json only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import cima
from cima.agent.engine import (
    Collector,
    Engine,
    Observation,
    default_runtime_register,
)
from cima.agent.journal import Journal, JournalMismatchError
from cima.agent.policy import (
    DEFAULT_POLICY_TEXT,
    Policy,
    PolicyFileError,
    load_policy,
    parse_policy,
)
from cima.platform.ima import IMAReader
from cima.platform.software import SoftwarePlatform
from cima.platform.tdx import TDXPlatform
from cima.platform.tpm import TPMPlatform
from tests.platform.swtpm import SWTPM
from tests.vectors import manifest, path

POLICY_256 = "backend: none\nhashAlgorithm: sha256\n"


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain(alg: str, start: bytes, digests: list[bytes]) -> bytes:
    value = start
    for d in digests:
        value = hashlib.new(alg, value + d).digest()
    return value


class FakeCollector:
    """Yields whatever the test puts in ``current``."""

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.current: list[Observation] = []
        self.policies: list[Policy] = []

    def collect(self) -> Iterable[Observation]:
        return list(self.current)

    def update_policy(self, policy: Policy) -> None:
        self.policies.append(policy)


class BrokenCollector:
    name = "broken"

    def collect(self) -> Iterable[Observation]:
        raise OSError("the runtime is down")


def obs(key: str, **data: Any) -> Observation:
    return Observation("container", "container:" + "a" * 64, "a" * 64, data, key)


@pytest.fixture
def platform() -> SoftwarePlatform:
    return SoftwarePlatform(algorithms=("sha256", "sha384"))


@pytest.fixture
def journal_dir(tmp_path: Path) -> Path:
    return tmp_path / "journal"


def open_journal(directory: Path, platform: SoftwarePlatform, alg: str = "sha256") -> Journal:
    return Journal.open(directory, platform=platform, register="pcr13", algorithm=alg)


@pytest.fixture
def journal(journal_dir: Path, platform: SoftwarePlatform) -> Iterator[Journal]:
    j = open_journal(journal_dir, platform)
    yield j
    j.close()


# -- the runtime register ----------------------------------------------------------------------


def test_default_runtime_register(swtpm: SWTPM) -> None:
    assert default_runtime_register(SoftwarePlatform()) == "pcr13"
    assert default_runtime_register(TDXPlatform()) == "rtmr3"
    tpm = TPMPlatform(swtpm.tcti)
    try:
        assert default_runtime_register(tpm) == "pcr13"
    finally:
        tpm.close()


def test_protocol() -> None:
    assert isinstance(FakeCollector(), Collector)


# -- bank checks -------------------------------------------------------------------------------


def test_policy_algorithm_missing_from_the_platform(journal: Journal) -> None:
    platform = SoftwarePlatform(algorithms=("sha256",))
    policy = parse_policy("backend: none\nhashAlgorithm: sha384\n", source="p.yaml")
    with pytest.raises(PolicyFileError) as info:
        Engine(policy, platform, journal)
    e = info.value
    assert (e.code, e.key, e.line) == ("bank", "hashAlgorithm", 2)
    assert "pcr13" in str(e) and "sha256" in str(e)


def test_policy_algorithm_against_swtpm_banks(swtpm: SWTPM, tmp_path: Path) -> None:
    tpm = TPMPlatform(swtpm.tcti)
    try:
        with Journal.open(tmp_path, platform=tpm, register="pcr13", algorithm="sha256") as j:
            policy = parse_policy("backend: none\nhashAlgorithm: sha512\n")
            with pytest.raises(PolicyFileError, match=r"its banks: sha1, sha256, sha384"):
                Engine(policy, tpm, j)
    finally:
        tpm.close()


def test_policy_algorithm_against_tdx() -> None:
    policy = parse_policy(POLICY_256)
    with pytest.raises(PolicyFileError, match=r"its banks: sha384"):
        policy.check_bank(TDXPlatform().algorithms(), register="rtmr3")


def test_journal_in_another_bank(journal: Journal, platform: SoftwarePlatform) -> None:
    policy = parse_policy("backend: none\nhashAlgorithm: sha384\n")
    with pytest.raises(PolicyFileError, match="holds sha256 events"):
        Engine(policy, platform, journal)


# -- measuring itself --------------------------------------------------------------------------


def expected_code_digest(alg: str) -> str:
    """The rule of cima.agent.selfmeasure, written again."""
    root = Path(cima.__file__).resolve().parent
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if "__pycache__" in rel.parts or p.suffix in (".pyc", ".pyo") or not p.is_file():
            continue
        files.append([rel.as_posix(), hashlib.new(alg, p.read_bytes()).hexdigest()])
    files.sort()
    manifest_doc = {"name": "cima", "version": cima.__version__, "files": files}
    return f"{alg}:{hashlib.new(alg, canonical(manifest_doc)).hexdigest()}"


def test_measure_self_first(tmp_path: Path, journal: Journal, platform: SoftwarePlatform) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(DEFAULT_POLICY_TEXT.replace("sha384", "sha256"))
    policy = load_policy(policy_file)
    engine = Engine(policy, platform, journal)
    events = engine.measure_self(policy_file)
    assert [(e.seq, e.kind) for e in events] == [(0, "agent"), (1, "policy")]
    agent, pol = events
    assert agent.data["code_digest"] == expected_code_digest("sha256")
    assert agent.data["version"] == cima.__version__
    assert (
        pol.data["file_digest"] == "sha256:" + hashlib.sha256(policy_file.read_bytes()).hexdigest()
    )
    normalised = policy.to_dict()
    assert pol.data["policy"] == normalised
    assert (
        pol.data["policy_digest"] == "sha256:" + hashlib.sha256(canonical(normalised)).hexdigest()
    )
    assert pol.subject == str(policy_file)
    assert platform.read("pcr13", "sha256") == chain("sha256", bytes(32), journal.digests())
    # The same agent and policy again: nothing new to say.
    assert engine.measure_self(policy_file) == []


def test_measure_self_after_restart(journal_dir: Path, platform: SoftwarePlatform) -> None:
    policy = parse_policy(POLICY_256)
    with open_journal(journal_dir, platform) as j:
        assert len(Engine(policy, platform, j).measure_self()) == 2
    with open_journal(journal_dir, platform) as j:
        assert Engine(policy, platform, j).measure_self() == []
    changed = parse_policy(POLICY_256 + "measure:\n  container: {isolated: false}\n")
    with open_journal(journal_dir, platform) as j:
        events = Engine(changed, platform, j).measure_self()
        assert [e.kind for e in events] == ["policy"]
        assert events[0].data["policy"]["measure"]["container"]["isolated"] is False


# -- change detection --------------------------------------------------------------------------


def test_poll_journals_new_and_changed(journal: Journal, platform: SoftwarePlatform) -> None:
    fake = FakeCollector()
    engine = Engine(parse_policy(POLICY_256), platform, journal, collectors=[fake])
    fake.current = [obs("c:1", image="busybox"), obs("c:2", image="alpine")]
    assert [e.data["image"] for e in engine.poll()] == ["busybox", "alpine"]
    assert engine.poll() == []
    fake.current = [obs("c:1", image="busybox"), obs("c:2", image="alpine:3")]
    changed = engine.poll()
    assert [e.data["image"] for e in changed] == ["alpine:3"]
    # Back to an earlier content under the same key: a change again.
    fake.current = [obs("c:2", image="alpine")]
    assert [e.data["image"] for e in engine.poll()] == ["alpine"]
    assert len(journal) == 4
    assert platform.read("pcr13", "sha256") == chain("sha256", bytes(32), journal.digests())
    want = {
        "kind": "container",
        "scope": "container:" + "a" * 64,
        "subject": "a" * 64,
        "data": {"image": "alpine"},
    }
    assert engine.remembered("c:2") == hashlib.sha256(canonical(want)).digest()


def test_restart_rebuilds_memory(journal_dir: Path, platform: SoftwarePlatform) -> None:
    fake = FakeCollector()
    fake.current = [obs("c:1", image="busybox"), obs("c:2", image="alpine")]
    policy = parse_policy(POLICY_256)
    with open_journal(journal_dir, platform) as j:
        assert len(Engine(policy, platform, j, collectors=[fake]).poll()) == 2
    with open_journal(journal_dir, platform) as j:
        engine = Engine(policy, platform, j, collectors=[fake])
        assert engine.poll() == []
        fake.current.append(obs("c:3", image="debian"))
        assert [e.subject for e in engine.poll()] == ["a" * 64]
        assert len(j) == 3


def test_failing_collector_does_not_stop_others(
    journal: Journal, platform: SoftwarePlatform, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCollector()
    fake.current = [obs("c:1", image="busybox")]
    engine = Engine(
        parse_policy(POLICY_256), platform, journal, collectors=[BrokenCollector(), fake]
    )
    with caplog.at_level(logging.WARNING, logger="cima.agent.engine"):
        assert len(engine.poll()) == 1
    assert "broken" in caplog.text and "the runtime is down" in caplog.text


# -- reload ------------------------------------------------------------------------------------


def test_reload(journal: Journal, platform: SoftwarePlatform) -> None:
    fake = FakeCollector()
    engine = Engine(parse_policy(POLICY_256), platform, journal, collectors=[fake])
    engine.measure_self()
    new = parse_policy(POLICY_256 + "measure:\n  system:\n    processes: [/usr/bin/kubelet]\n")
    events = engine.reload(new)
    assert [e.kind for e in events] == ["policy"]
    assert events[0].data["policy"]["measure"]["system"]["processes"] == ["/usr/bin/kubelet"]
    assert engine.policy is new and fake.policies == [new]
    assert len(journal) == 3  # agent, policy, reloaded policy: the journal goes on
    assert engine.reload(new) == []


def test_reload_cannot_change_the_algorithm(journal: Journal, platform: SoftwarePlatform) -> None:
    engine = Engine(parse_policy(POLICY_256), platform, journal)
    with pytest.raises(PolicyFileError) as info:
        engine.reload(parse_policy("backend: none\nhashAlgorithm: sha384\n"))
    assert (info.value.code, info.value.key) == ("reload", "hashAlgorithm")
    assert engine.policy.hash_algorithm == "sha256"


# -- running -----------------------------------------------------------------------------------


def test_run_stops_on_tampering(journal: Journal, platform: SoftwarePlatform) -> None:
    fake = FakeCollector()
    fake.current = [obs("c:1", image="busybox")]
    engine = Engine(parse_policy(POLICY_256), platform, journal, collectors=[fake])
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            engine.run(stop, interval=0.01)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=target)
    t.start()
    try:
        for _ in range(500):
            if len(journal) == 1:
                break
            threading.Event().wait(0.01)
        platform.extend("pcr13", "sha256", bytes(32))
        t.join(timeout=10)
    finally:
        stop.set()
        t.join(timeout=10)
    assert len(errors) == 1 and isinstance(errors[0], JournalMismatchError)


def test_run_stops_when_asked(journal: Journal, platform: SoftwarePlatform) -> None:
    engine = Engine(parse_policy(POLICY_256), platform, journal)
    stop = threading.Event()
    stop.set()
    engine.run(stop, interval=0.01)


# -- IMA ---------------------------------------------------------------------------------------


def test_ima_entries_read_incrementally(journal: Journal, platform: SoftwarePlatform) -> None:
    entry = next(e for e in manifest("ima") if e["expected"].get("entries"))
    reader = IMAReader(path("ima", entry["file"]))
    policy = parse_policy("backend: ima\nhashAlgorithm: sha256\n")
    engine = Engine(policy, platform, journal, ima=reader)
    assert engine.ima_entries() == []
    engine.poll()
    assert len(engine.ima_entries()) == entry["expected"]["entries"]
    engine.poll()
    assert len(engine.ima_entries()) == entry["expected"]["entries"]
    reader.close()


def test_backend_none_reads_no_ima(journal: Journal, platform: SoftwarePlatform) -> None:
    entry = next(e for e in manifest("ima") if e["expected"].get("entries"))
    reader = IMAReader(path("ima", entry["file"]))
    engine = Engine(parse_policy(POLICY_256), platform, journal, ima=reader)
    engine.poll()
    assert engine.ima_entries() == []
    reader.close()


def test_poll_is_serialised_with_appends(journal: Journal, platform: SoftwarePlatform) -> None:
    fake = FakeCollector()
    engine = Engine(parse_policy(POLICY_256), platform, journal, collectors=[fake])
    fake.current = [obs(f"c:{i}", n=i) for i in range(50)]
    threads = [threading.Thread(target=engine.poll) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(journal) == 50
    assert platform.read("pcr13", "sha256") == chain("sha256", bytes(32), journal.digests())
