"""The agent's server (cima.agent.server): the native API, identity, views, batching, the socket.

Real peers: a software platform and swtpm behind a real journal and engine, the
server on a Unix socket in a temporary directory, grpcio clients generated
from the repository's protos. :func:`start_agent` is the harness the other
agent tests (and the end-to-end isolation tests) use.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from cima._proto.cima import agent_pb2, agent_pb2_grpc
from cima.agent.engine import Engine
from cima.agent.events import container_scope
from cima.agent.identity import Caller, IdentityError, caller_from_pid
from cima.agent.journal import Journal
from cima.agent.policy import parse_policy
from cima.agent.server import MAX_PAGE, MAX_REQUEST, AgentServer, ServerError, SocketInUseError
from cima.eventlog import cel, tcg
from cima.eventlog.ima import IMAEntry, parse_ascii
from cima.eventlog.replay import replay
from cima.evidence.batch import verify_inclusion
from cima.evidence.bundle import EvidenceBundle, TPMQuoteReport
from cima.evidence.reportdata import SCOPED_BINDING_TAG, tpm_qualifying_data
from cima.evidence.tpm import Quote, verify_quote
from cima.platform.base import Platform
from cima.platform.ima import IMAReader
from cima.platform.software import SoftwarePlatform
from cima.registers import RegisterBank
from tests import vectors

POLICY = """\
backend: ima
hashAlgorithm: sha384
measure:
  container:
    isolated: true
"""
A = "a" * 64
B = "b" * 64
POD_A = "0b6a8f6e-1d2c-4e5f-8a9b-0c1d2e3f4a5b"
IMA_LIST = "rust-keylime/ascii_runtime_measurements"
IMA_ENTRIES = 24
BOOT_LOG = "tpm2-tools/event-arch-linux.bin"


class BootedSoftwarePlatform(SoftwarePlatform):
    """A software platform that serves a real firmware event log as its boot log."""

    def __init__(self, *args: Any, boot: list[Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._boot = boot

    def boot_log(self) -> list[Any] | None:
        return list(self._boot)


def boot_log_vector() -> tuple[list[Any], dict[str, dict[str, str]]]:
    """The events of a real TCG log and the PCR values its MANIFEST expects."""
    entry = next(e for e in vectors.manifest("tcg") if e["file"] == BOOT_LOG)
    log = tcg.parse(vectors.path("tcg", BOOT_LOG).read_bytes())
    return list(log.events), entry["expected"]["pcrs"]


def booted_software_platform(state_dir: Path | None = None) -> BootedSoftwarePlatform:
    events, _ = boot_log_vector()
    return BootedSoftwarePlatform(state_dir, algorithms=("sha256", "sha384", "sha1"), boot=events)


class Identities:
    """``identify`` for the server: the kernel's answer, unless a test says a pid is a container."""

    def __init__(self) -> None:
        self.containers: dict[int, Caller] = {}
        self.calls: list[tuple[int, int]] = []
        self.fail: str | None = None

    def __call__(self, pid: int, uid: int) -> Caller:
        self.calls.append((pid, uid))
        if self.fail is not None:
            raise IdentityError(self.fail)
        known = self.containers.get(pid)
        if known is not None:
            return Caller(pid, uid, known.container_id, known.pod_uid)
        return caller_from_pid(pid, uid)


@dataclass
class Agent:
    """A running agent: its platform, journal, engine and server."""

    server: AgentServer
    engine: Engine
    platform: Platform
    journal: Journal
    socket: Path
    identities: Identities
    ima: list[IMAEntry]
    channels: list[grpc.Channel] = field(default_factory=list)

    def channel(self) -> grpc.Channel:
        # A private subchannel pool: each channel is a connection of its own (grpcio
        # otherwise shares one between channels), identified when it is accepted.
        ch = grpc.insecure_channel(
            f"unix:{self.socket}",
            options=[
                ("grpc.max_receive_message_length", 1 << 30),
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        self.channels.append(ch)
        return ch

    def native(self) -> agent_pb2_grpc.AgentStub:
        return agent_pb2_grpc.AgentStub(self.channel())

    def as_container(self, container_id: str, pod_uid: str | None = None) -> None:
        """Calls from this process are from that container from now on (new connections)."""
        self.identities.containers[os.getpid()] = Caller(os.getpid(), 0, container_id, pod_uid)

    def as_host(self) -> None:
        self.identities.containers.pop(os.getpid(), None)

    def stop(self) -> None:
        for ch in self.channels:
            ch.close()
        self.server.stop()
        self.journal.close()


def _ima_list(directory: Path, platform: Platform) -> tuple[Path, list[IMAEntry]]:
    """The first entries of a real IMA list, extended into pcr10 as the kernel does."""
    lines = vectors.path("ima", IMA_LIST).read_bytes().splitlines(keepends=True)[:IMA_ENTRIES]
    path = directory / "ascii_runtime_measurements"
    path.write_bytes(b"".join(lines))
    entries = list(parse_ascii(path.read_bytes()))
    for e in entries:
        for bank in platform.algorithms():
            digest = e.replay_digest(bank)
            assert digest is not None
            platform.extend("pcr10", bank, digest)
    return path, entries


def start_agent(
    directory: Path,
    platform: Platform,
    *,
    register: str = "pcr13",
    policy: str = POLICY,
    adopt: bool = False,
    ima: bool = True,
    **server_options: Any,
) -> Agent:
    """Journal, engine (self-measurement, two containers' events, an IMA list) and server.

    With ``ima`` the first entries of a real IMA list are extended into pcr10
    (as the kernel does) and read by the engine; without it the policy's
    backend is ``none``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    reader = None
    entries: list[IMAEntry] = []
    if ima:
        ima_path, entries = _ima_list(directory, platform)
        reader = IMAReader(ima_path)
    else:
        policy = policy.replace("backend: ima", "backend: none")
    journal = Journal.open(
        directory / "journal", platform=platform, register=register, algorithm="sha384", adopt=adopt
    )
    engine = Engine(parse_policy(policy), platform, journal, collectors=[], ima=reader)
    engine.measure_self()
    for cid, name in ((A, "alpha"), (B, "bravo"), (A, "alpha-2")):
        journal.append(
            kind="container", scope=container_scope(cid), subject=cid, data={"name": name}
        )
    engine.poll()
    identities = Identities()
    sock = directory / "cima.sock"
    server = AgentServer(engine, socket_path=sock, identify=identities, **server_options)
    server.start()
    return Agent(server, engine, platform, journal, sock, identities, entries)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = start_agent(tmp_path / "agent", booted_software_platform())
    yield a
    a.stop()


def assert_serving(agent: Agent) -> None:
    """A normal request succeeds: a bad one before it did not disturb the server."""
    r = agent.native().GetMeasurement(agent_pb2.GetMeasurementRequest(register="pcr13"))
    assert r.measurement.digest == agent.platform.read("pcr13", agent.platform.default_algorithm())


def _records(response: Any) -> list[cel.CELRecord]:
    return cel.from_json(bytes(response.records))


# -- the socket ---------------------------------------------------------------------------------


def _a_group() -> tuple[str, int]:
    """A group of this system other than ours, by name (the socket's group is given so)."""
    import grp

    for g in grp.getgrall():
        if g.gr_gid != os.getgid():
            return g.gr_name, g.gr_gid
    return grp.getgrgid(os.getgid()).gr_name, os.getgid()


def test_socket_mode_and_group(tmp_path: Path) -> None:
    name, gid = _a_group()
    a = start_agent(tmp_path, SoftwarePlatform(None), socket_mode=0o640, socket_group=name)
    try:
        st = os.stat(a.socket)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert st.st_gid == gid
    finally:
        a.stop()
    assert not a.socket.exists()


def test_a_live_socket_is_already_serving(agent: Agent) -> None:
    second = AgentServer(agent.engine, socket_path=agent.socket)
    with pytest.raises(SocketInUseError, match="already serving"):
        second.start()
    assert_serving(agent)


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "agent" / "cima.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nothing listens
    a = start_agent(tmp_path / "agent", SoftwarePlatform(None))
    try:
        assert_serving(a)
    finally:
        a.stop()


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_path_that_is_not_a_socket_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "cima.sock"
    if kind == "file":
        path.write_text("not a socket")
    else:
        path.mkdir()
    server = AgentServer(_FakeSource(), socket_path=path)
    with pytest.raises(ServerError, match="not a socket"):
        server.start()
    assert path.exists()


def test_unknown_group_is_refused(tmp_path: Path) -> None:
    server = AgentServer(_FakeSource(), socket_path=tmp_path / "s", socket_group="no-such-group-x")
    with pytest.raises(ServerError, match="no-such-group-x"):
        server.start()


class _FakeSource:
    """Never consulted: the server refuses before it reads its source."""

    policy: Any = None
    journal: Any = None
    platform: Any = None

    def ima_entries(self) -> list[IMAEntry]:
        return []


# -- who is calling ------------------------------------------------------------------------------


def test_the_caller_is_who_the_kernel_says(agent: Agent) -> None:
    info = agent.native().Info(agent_pb2.InfoRequest())
    assert info.pid == os.getpid()
    assert info.uid == os.getuid()
    assert info.scope == "node"


CHILD = """
import json, os, sys
import grpc
from cima._proto.cima import agent_pb2, agent_pb2_grpc
ch = grpc.insecure_channel("unix:" + sys.argv[1])
info = agent_pb2_grpc.AgentStub(ch).Info(agent_pb2.InfoRequest())
print(json.dumps({"pid": os.getpid(), "seen": info.pid, "scope": info.scope}))
"""


def test_another_process_is_seen_with_its_own_pid(agent: Agent) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(agent.socket)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    doc = json.loads(out.stdout)
    assert doc["seen"] == doc["pid"] != os.getpid()


def test_the_caller_is_identified_when_it_connects(agent: Agent) -> None:
    before = len(agent.identities.calls)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(agent.socket))
    try:
        deadline = time.monotonic() + 5
        while len(agent.identities.calls) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        # Identified at accept time, before a single byte of a request was sent.
        assert agent.identities.calls[before:] == [(os.getpid(), os.getuid())]
    finally:
        s.close()


def test_an_unidentified_caller_is_refused(agent: Agent) -> None:
    agent.identities.fail = "process 1234 exited before it could be identified"
    stub = agent.native()
    with pytest.raises(grpc.RpcError) as info:
        stub.GetMeasurement(agent_pb2.GetMeasurementRequest(register="pcr0"))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "exited" in (info.value.details() or "")
    agent.identities.fail = None
    assert_serving(agent)


# -- measurements ---------------------------------------------------------------------------------


def test_measurements_are_the_platform_registers(agent: Agent) -> None:
    stub = agent.native()
    p = agent.platform
    for alg in p.algorithms():
        for reg in p.register_names():
            r = stub.GetMeasurement(agent_pb2.GetMeasurementRequest(register=reg, algorithm=alg))
            assert (r.measurement.register, r.measurement.algorithm) == (reg, alg)
            assert r.measurement.digest == p.read(reg, alg)
    default = stub.GetMeasurement(agent_pb2.GetMeasurementRequest(register="pcr10"))
    assert default.measurement.algorithm == p.default_algorithm()
    listed = stub.ListMeasurements(agent_pb2.ListMeasurementsRequest())
    got = {(m.register, m.algorithm): m.digest for m in listed.measurements}
    assert got == {(v.register, v.algorithm): v.digest for v in p.read_all()}
    one = stub.ListMeasurements(agent_pb2.ListMeasurementsRequest(algorithm="sha384"))
    assert {m.algorithm for m in one.measurements} == {"sha384"}
    assert len(one.measurements) == 24


def test_info(agent: Agent) -> None:
    info = agent.native().Info(agent_pb2.InfoRequest())
    assert info.platform == "software"
    assert info.runtime_register == "pcr13"
    assert info.runtime_algorithm == "sha384"
    assert list(info.algorithms) == agent.platform.algorithms()
    assert info.isolated
    assert info.container_id == ""


# -- event logs ----------------------------------------------------------------------------------


def test_runtime_log_replays_to_the_register(agent: Agent) -> None:
    r = agent.native().GetEventLog(agent_pb2.GetEventLogRequest(log="runtime"))
    records = _records(r)
    assert r.total == len(agent.journal) == len(records) == r.count
    assert replay(records).get("pcr13", "sha384") == agent.platform.read("pcr13", "sha384")
    assert [rec.content["kind"] for rec in records][:2] == ["agent", "policy"]


def test_ima_log_replays_to_the_register(agent: Agent) -> None:
    r = agent.native().GetEventLog(agent_pb2.GetEventLogRequest(log="ima", format="cel-json"))
    records = _records(r)
    assert len(records) == IMA_ENTRIES == r.total
    for bank in agent.platform.algorithms():
        assert replay(records, algorithms=[bank]).get("pcr10", bank) == agent.platform.read(
            "pcr10", bank
        )


def test_boot_log_is_the_firmware_log(agent: Agent) -> None:
    r = agent.native().GetEventLog(agent_pb2.GetEventLogRequest(log="boot"))
    records = _records(r)
    _, expected = boot_log_vector()
    assert r.total == len(records) == len(boot_log_vector()[0])
    bank = replay(records)
    for alg, pcrs in expected.items():
        for index, value in pcrs.items():
            assert bank.get(f"pcr{index}", alg).hex() == value


def test_paging(agent: Agent) -> None:
    stub = agent.native()
    for log in ("boot", "ima", "runtime"):
        whole = _records(stub.GetEventLog(agent_pb2.GetEventLogRequest(log=log)))
        pages: list[cel.CELRecord] = []
        start = 0
        while True:
            r = stub.GetEventLog(agent_pb2.GetEventLogRequest(log=log, start=start, count=5))
            assert r.start == start and r.total == len(whole)
            got = _records(r)
            assert len(got) == r.count <= 5
            pages.extend(got)
            start += r.count
            if start >= r.total:
                break
        assert [p.to_dict() for p in pages] == [w.to_dict() for w in whole]
        end = stub.GetEventLog(agent_pb2.GetEventLogRequest(log=log, start=len(whole)))
        assert end.count == 0 and _records(end) == []


def test_page_size_is_bounded(tmp_path: Path) -> None:
    a = start_agent(tmp_path, SoftwarePlatform(None), page_size=7)
    try:
        stub = a.native()
        r = stub.GetEventLog(agent_pb2.GetEventLogRequest(log="ima"))
        assert (r.count, r.total) == (7, IMA_ENTRIES)
        r = stub.GetEventLog(agent_pb2.GetEventLogRequest(log="ima", count=MAX_PAGE * 10))
        assert r.count == IMA_ENTRIES
    finally:
        a.stop()


# -- bad input -----------------------------------------------------------------------------------


BAD_REQUESTS: dict[str, tuple[str, Any, grpc.StatusCode]] = {
    "unknown register": (
        "GetMeasurement",
        agent_pb2.GetMeasurementRequest(register="pcr24"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "register of another platform": (
        "GetMeasurement",
        agent_pb2.GetMeasurementRequest(register="rtmr3"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "empty register": (
        "GetMeasurement",
        agent_pb2.GetMeasurementRequest(register=""),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "unknown algorithm": (
        "GetMeasurement",
        agent_pb2.GetMeasurementRequest(register="pcr0", algorithm="md5"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "bank the platform lacks": (
        "GetMeasurement",
        agent_pb2.GetMeasurementRequest(register="pcr0", algorithm="sha512"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "list of an unknown bank": (
        "ListMeasurements",
        agent_pb2.ListMeasurementsRequest(algorithm="sha3"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "unknown log": (
        "GetEventLog",
        agent_pb2.GetEventLogRequest(log="kernel"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "unknown format": (
        "GetEventLog",
        agent_pb2.GetEventLogRequest(log="ima", format="cel-tlv"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "page past the end": (
        "GetEventLog",
        agent_pb2.GetEventLogRequest(log="ima", start=IMA_ENTRIES + 1),
        grpc.StatusCode.OUT_OF_RANGE,
    ),
    "nonce of 65 bytes": (
        "GetReport",
        agent_pb2.GetReportRequest(nonce=bytes(65)),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "user data of 1025 bytes": (
        "GetReport",
        agent_pb2.GetReportRequest(nonce=b"n", user_data=bytes(1025)),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "evidence with a nonce of 65 bytes": (
        "GetEvidence",
        agent_pb2.GetEvidenceRequest(nonce=bytes(65)),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_status(agent: Agent, name: str) -> None:
    method, request, code = BAD_REQUESTS[name]
    with pytest.raises(grpc.RpcError) as info:
        getattr(agent.native(), method)(request)
    assert info.value.code() == code
    assert info.value.details()
    assert_serving(agent)


RAW_REQUESTS = {
    "not protobuf": b"\xff\xff\xff\xff",
    "length past the end": b"\x0a\xff\xff\xff\xff\x0f",
    "wrong wire type": b"\x0d\x00",
    "larger than any request": b"\x0a" + b"\x80\x80\x01" + bytes(MAX_REQUEST + 10),
}


@pytest.mark.parametrize("name", RAW_REQUESTS)
def test_malformed_request_message(agent: Agent, name: str) -> None:
    call = agent.channel().unary_unary("/cima.v1.Agent/GetMeasurement")
    with pytest.raises(grpc.RpcError) as info:
        call(RAW_REQUESTS[name], timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_serving(agent)


def test_unknown_method(agent: Agent) -> None:
    call = agent.channel().unary_unary("/cima.v1.Agent/Reboot")
    with pytest.raises(grpc.RpcError) as info:
        call(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert_serving(agent)


def test_an_unproven_journal_serves_no_view(agent: Agent) -> None:
    # Something else extends the runtime register: the journal no longer explains it.
    agent.platform.extend("pcr13", "sha384", bytes(48))
    with pytest.raises(Exception, match="replay"):
        agent.journal.check()
    stub = agent.native()
    for call, request in (
        (stub.GetEventLog, agent_pb2.GetEventLogRequest(log="runtime")),
        (stub.GetReport, agent_pb2.GetReportRequest(nonce=b"n")),
        (stub.GetEvidence, agent_pb2.GetEvidenceRequest(nonce=b"n")),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call(request)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Registers are still the platform's: they prove nothing about the journal.
    assert_serving(agent)


# -- reports and evidence --------------------------------------------------------------------


def _check_report(agent: Agent, r: Any, nonce: bytes, user_data: bytes) -> None:
    verification = json.loads(r.verification_json)
    pcrs = {
        (p["register"], p["algorithm"]): bytes.fromhex(p["digest"]) for p in verification["pcrs"]
    }
    if r.HasField("batch"):
        verify_inclusion(
            r.binding,
            _proof(r.batch),
            r.batch.root,
        )
        report_nonce, report_user_data = r.batch.root, SCOPED_BINDING_TAG
    elif r.scope == "node":
        report_nonce, report_user_data = r.binding, b""
    else:
        report_nonce, report_user_data = r.binding, SCOPED_BINDING_TAG
    verify_quote(
        r.report,
        r.signature,
        verification["ak_pem"],
        nonce=report_nonce,
        user_data=report_user_data,
        pcr_values=pcrs,
    )
    for (reg, alg), value in pcrs.items():
        assert agent.platform.read(reg, alg) == value
    if r.scope == "node":
        assert r.binding == nonce + user_data


def _proof(batch: Any) -> Any:
    from cima.evidence.batch import InclusionProof

    return InclusionProof(
        batch.algorithm, batch.leaf_index, batch.tree_size, tuple(bytes(p) for p in batch.path)
    )


def test_report(agent: Agent) -> None:
    nonce, user = os.urandom(32), b"user data"
    r = agent.native().GetReport(agent_pb2.GetReportRequest(nonce=nonce, user_data=user))
    assert r.kind == "tpm-quote" and r.platform == "software" and r.scope == "node"
    assert not r.HasField("batch")
    _check_report(agent, r, nonce, user)
    # Alone, it binds nonce || user data exactly as the platform's own report does.
    assert Quote.from_bytes(r.report).extra_data == tpm_qualifying_data(nonce, user, "sha256")


def _check_bundle(agent: Agent, bundle: EvidenceBundle) -> None:
    bundle.verify_binding()
    report = bundle.report
    assert isinstance(report, TPMQuoteReport)
    quoted = {(v.register, v.algorithm): v.digest for v in report.pcrs}
    verify_quote(
        report.attest,
        report.signature,
        report.ak_pem,
        nonce=bundle.report_nonce(),
        user_data=bundle.report_user_data(),
        pcr_values=quoted,
    )
    assert replay(bundle.runtime_log).get("pcr13", "sha384") == quoted[("pcr13", "sha384")]
    assert bundle.ima_log is not None
    assert (
        replay(bundle.ima_log, algorithms=["sha256"]).get("pcr10", "sha256")
        == quoted[("pcr10", "sha256")]
    )


def test_evidence_of_the_node(agent: Agent) -> None:
    nonce = os.urandom(20)
    raw = agent.native().GetEvidence(agent_pb2.GetEvidenceRequest(nonce=nonce)).bundle
    bundle = EvidenceBundle.from_json(raw)
    assert (bundle.scope, bundle.nonce, bundle.platform) == ("node", nonce, "software")
    assert bundle.boot_log is not None and len(bundle.boot_log) == len(boot_log_vector()[0])
    assert all(not r.content.get("redacted") for r in bundle.runtime_log)
    _check_bundle(agent, bundle)


def test_evidence_of_a_container(agent: Agent) -> None:
    agent.as_container(A, POD_A)
    stub = agent.native()
    info = stub.Info(agent_pb2.InfoRequest())
    assert (info.scope, info.container_id, info.pod_uid) == (container_scope(A), A, POD_A)
    nonce = os.urandom(32)
    bundle = EvidenceBundle.from_json(
        stub.GetEvidence(agent_pb2.GetEvidenceRequest(nonce=nonce)).bundle
    )
    assert bundle.scope == container_scope(A)
    _check_bundle(agent, bundle)
    shown = [r.content for r in bundle.runtime_log]
    assert {"redacted": True} in shown
    assert not any(c.get("scope") == container_scope(B) for c in shown)
    assert "bravo" not in bundle.to_json()
    assert bundle.container_register is not None


def test_a_container_log_redacts_the_others(agent: Agent) -> None:
    agent.as_container(B)
    records = _records(agent.native().GetEventLog(agent_pb2.GetEventLogRequest(log="runtime")))
    assert [r.content.get("subject") for r in records if r.content.get("kind") == "container"] == [
        B
    ]
    assert replay(records).get("pcr13", "sha384") == agent.platform.read("pcr13", "sha384")


# -- batching ---------------------------------------------------------------------------------


def _count_reports(platform: Platform) -> list[bytes]:
    """Wrap the platform's report() to record each hardware quote's nonce."""
    calls: list[bytes] = []
    original = platform.report

    @functools.wraps(original)
    def report(nonce: bytes, *args: Any, **kwargs: Any) -> Any:
        calls.append(nonce)
        return original(nonce, *args, **kwargs)

    platform.report = report  # type: ignore[method-assign]
    return calls


def _concurrently(n: int, fn: Callable[[int], Any]) -> list[Any]:
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _batched_reports(a: Agent, n: int) -> list[tuple[bytes, Any]]:
    stubs = [a.native() for _ in range(n)]
    for s in stubs:  # connect first: the requests then arrive together
        s.Info(agent_pb2.InfoRequest())
    nonces = [os.urandom(32) for _ in range(n)]

    def ask(i: int) -> Any:
        return stubs[i].GetReport(agent_pb2.GetReportRequest(nonce=nonces[i], user_data=b"%d" % i))

    return list(zip(nonces, _concurrently(n, ask), strict=True))


@pytest.mark.peer
def test_concurrent_reports_share_quotes_on_swtpm(tmp_path: Path, swtpm: Any) -> None:
    from cima.platform.tpm import TPMPlatform

    platform = TPMPlatform(swtpm.tcti)
    a = start_agent(tmp_path, platform, register="pcr14", adopt=True, batch_window=0.02)
    quotes = _count_reports(platform)
    try:
        results = _batched_reports(a, 32)
        assert 1 <= len(quotes) < 32
        assert a.server.quotes == len(quotes)
        roots = set()
        for i, (nonce, r) in enumerate(results):
            _check_report(a, r, nonce, b"%d" % i)
            if r.HasField("batch"):
                roots.add(r.batch.root)
        # Every batched quote was taken with the root of its tree as its nonce.
        assert roots <= set(quotes)
    finally:
        a.stop()
        platform.close()


def test_concurrent_evidence_is_batched(agent: Agent) -> None:
    quotes = _count_reports(agent.platform)
    stubs = [agent.native() for _ in range(16)]
    for s in stubs:
        s.Info(agent_pb2.InfoRequest())
    nonces = [os.urandom(16) for _ in range(16)]
    raws = _concurrently(
        16, lambda i: stubs[i].GetEvidence(agent_pb2.GetEvidenceRequest(nonce=nonces[i])).bundle
    )
    assert len(quotes) < 16
    for nonce, raw in zip(nonces, raws, strict=True):
        bundle = EvidenceBundle.from_json(raw)
        assert bundle.nonce == nonce
        _check_bundle(agent, bundle)


def test_without_batching_every_request_takes_a_quote(tmp_path: Path) -> None:
    platform = SoftwarePlatform(None)
    a = start_agent(tmp_path, platform, batching=False)
    quotes = _count_reports(platform)
    try:
        results = _batched_reports(a, 8)
        assert len(quotes) == 8
        for i, (nonce, r) in enumerate(results):
            assert not r.HasField("batch")
            _check_report(a, r, nonce, b"%d" % i)
    finally:
        a.stop()


def test_stop_is_clean(tmp_path: Path) -> None:
    a = start_agent(tmp_path, SoftwarePlatform(None))
    assert a.server.serving
    a.stop()
    assert not a.server.serving
    assert not a.socket.exists()
    a.server.stop()  # twice is harmless


def test_evidence_reads_the_ima_list_after_the_quote(agent: Agent) -> None:
    # The kernel appends and extends after the engine's last poll.
    lines = vectors.path("ima", IMA_LIST).read_bytes().splitlines(keepends=True)
    more = lines[IMA_ENTRIES : IMA_ENTRIES + 5]
    ima_file = agent.socket.parent / "ascii_runtime_measurements"
    with ima_file.open("ab") as f:
        f.write(b"".join(more))
    for e in parse_ascii(b"".join(more)):
        for bank in agent.platform.algorithms():
            digest = e.replay_digest(bank)
            assert digest is not None
            agent.platform.extend("pcr10", bank, digest)
    raw = agent.native().GetEvidence(agent_pb2.GetEvidenceRequest(nonce=b"n")).bundle
    bundle = EvidenceBundle.from_json(raw)
    assert bundle.ima_log is not None and len(bundle.ima_log) == IMA_ENTRIES + 5
    _check_bundle(agent, bundle)


def test_a_stopped_server_starts_again(tmp_path: Path) -> None:
    a = start_agent(tmp_path, SoftwarePlatform(None))
    try:
        a.server.stop()
        a.server.start()
        assert_serving(a)
    finally:
        a.stop()


@pytest.mark.peer
def test_the_native_api_on_swtpm(tmp_path: Path, swtpm: Any) -> None:
    from cima.platform.tpm import TPMPlatform

    platform = TPMPlatform(swtpm.tcti)
    a = start_agent(tmp_path, platform, register="pcr14", adopt=True)
    try:
        stub = a.native()
        for alg in platform.algorithms():
            for reg in ("pcr0", "pcr10", "pcr14", "pcr23"):
                r = stub.GetMeasurement(
                    agent_pb2.GetMeasurementRequest(register=reg, algorithm=alg)
                )
                assert r.measurement.digest == platform.read(reg, alg)
        listed = stub.ListMeasurements(agent_pb2.ListMeasurementsRequest(algorithm="sha256"))
        assert {m.register: m.digest for m in listed.measurements} == {
            v.register: v.digest for v in platform.read_all("sha256")
        }
        runtime = _records(stub.GetEventLog(agent_pb2.GetEventLogRequest(log="runtime")))
        # The journal adopted the register: replay starts from its start value.
        bank = RegisterBank()
        bank.initialise("pcr14", "sha384", a.journal.start_value)
        assert replay(runtime, bank=bank).get("pcr14", "sha384") == platform.read("pcr14", "sha384")
        ima = _records(stub.GetEventLog(agent_pb2.GetEventLogRequest(log="ima", count=10)))
        assert [r.recnum for r in ima] == list(range(10))
        nonce = os.urandom(32)
        r = stub.GetReport(agent_pb2.GetReportRequest(nonce=nonce, user_data=b"tpm"))
        _check_report(a, r, nonce, b"tpm")
        bundle = EvidenceBundle.from_json(
            stub.GetEvidence(agent_pb2.GetEvidenceRequest(nonce=nonce)).bundle
        )
        bundle.verify_binding()
        assert bundle.runtime_start == a.journal.start_value
        report = bundle.report
        assert isinstance(report, TPMQuoteReport)
        quoted = {(v.register, v.algorithm): v.digest for v in report.pcrs}
        verify_quote(report.attest, report.signature, report.ak_pem, nonce=nonce, pcr_values=quoted)
        bank = RegisterBank()
        bank.initialise("pcr14", "sha384", bundle.runtime_start)
        assert (
            replay(bundle.runtime_log, bank=bank).get("pcr14", "sha384")
            == quoted[("pcr14", "sha384")]
        )
    finally:
        a.stop()
        platform.close()
