"""The CIMA-compatible service, called through a client generated from the repository's proto.

Every RPC of ``cima_server_pb.cima`` is called with grpcio stubs generated from
``src/cima/_proto/cima/cima_server.proto`` (the CIMA server's messages, field
numbers and types) over the agent's Unix socket, and each answer is checked
against the platform: a software platform serving a real firmware log, swtpm,
and a TDX platform whose registers and quotes are made in memory from a real
TDX quote and a real CCEL log (to check the CC measurement-register index
numbering: 0 = mrtd, 1..4 = rtmr0..rtmr3).
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cima._proto.cima import cima_server_pb2, cima_server_pb2_grpc
from cima.agent.events import canonical, container_scope
from cima.digests import by_id, by_name
from cima.errors import PlatformError
from cima.eventlog import ccel
from cima.evidence.reportdata import SCOPED_BINDING_TAG, container_binding, tdx_report_data
from cima.evidence.tdx import TDXQuote
from cima.evidence.tpm import Quote, Signature, verify_quote
from cima.platform.base import Platform, Report
from cima.registers import RegisterBank
from tests import vectors
from tests.agent.test_server import (
    POD_A,
    A,
    Agent,
    boot_log_vector,
    booted_software_platform,
    start_agent,
)
from tests.platform.fake_tsm import quote_with_report_data

EV_NO_ACTION = 3
CCEL_LOG = "go-tdx-guest/ccel_data.dat"
TDX_QUOTE = "go-tdx-guest/tdx_prod_quote_SPR_E4.dat"
#: TD report body offsets (Intel TDX DCAP quote v4: 48-byte header, then the body).
BODY = 48
MRTD_AT = BODY + 136
RTMR_AT = BODY + 328


class MemoryTDXPlatform(Platform):
    """A TD's registers in memory (from a real CCEL log) and quotes made from a real one.

    Each report is the template quote with mrtd, the RTMRs and REPORTDATA set
    to the current values (its signature does not verify).
    """

    name = "tdx"

    def __init__(self) -> None:
        self._template = vectors.path("tdx-quote", TDX_QUOTE).read_bytes()
        self._bank = RegisterBank()
        self._bank.initialise("mrtd", "sha384", self._template[MRTD_AT : MRTD_AT + 48])
        self._lock = threading.Lock()
        self._log = list(ccel.parse(vectors.path("ccel", CCEL_LOG).read_bytes()).events)
        for e in self._log:
            if e.extends:
                digest = e.replay_digest("sha384")
                assert digest is not None
                self.extend(e.register, "sha384", digest)

    def info(self) -> dict[str, Any]:
        return {"platform": self.name}

    def default_algorithm(self) -> str:
        return "sha384"

    def algorithms(self) -> list[str]:
        return ["sha384"]

    def register_names(self) -> list[str]:
        return ["mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"]

    def read(self, register: str, algorithm: str) -> bytes:
        if algorithm != "sha384" or register not in self.register_names():
            raise PlatformError(f"no {register}/{algorithm}")
        with self._lock:
            return self._bank.get(register, "sha384")

    def extend(self, register: str, algorithm: str, digest: bytes) -> None:
        if register == "mrtd" or algorithm != "sha384":
            raise PlatformError(f"{register}/{algorithm} cannot be extended")
        with self._lock:
            self._bank.extend(register, "sha384", digest)

    def boot_log(self) -> list[Any]:
        return list(self._log)

    def report(
        self, nonce: bytes, user_data: bytes = b"", registers: list[str] | None = None
    ) -> Report:
        quote = bytearray(quote_with_report_data(self._template, tdx_report_data(nonce, user_data)))
        with self._lock:
            for i in range(4):
                at = RTMR_AT + 48 * i
                quote[at : at + 48] = self._bank.get(f"rtmr{i}", "sha384")
        return Report("tdx-quote", bytes(quote), b"", nonce, user_data, {})


PLATFORMS = ["software", "swtpm", "tdx"]


@pytest.fixture(scope="module", params=PLATFORMS)
def agent(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Agent]:
    directory = tmp_path_factory.mktemp(f"compat-{request.param}")
    platform: Platform
    if request.param == "software":
        platform = booted_software_platform()
        a = start_agent(directory, platform)
    elif request.param == "swtpm":
        from cima.platform.tpm import TPMPlatform

        server = request.getfixturevalue("swtpm_module")
        platform = TPMPlatform(server.tcti)
        a = start_agent(directory, platform, register="pcr14")
    else:
        platform = MemoryTDXPlatform()
        a = start_agent(directory, platform, register="rtmr3", ima=False)
    yield a
    a.stop()
    platform.close()


def _stub(agent: Agent) -> cima_server_pb2_grpc.cimaStub:
    return cima_server_pb2_grpc.cimaStub(agent.channel())


def _register(platform: str, index: int) -> str:
    """The test's own reading of the CIMA index numbering (see the module docstring)."""
    if platform == "tdx":
        return ["mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"][index]
    return f"pcr{index}"


def _index(platform: str, register: str) -> int:
    if platform == "tdx":
        return ["mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"].index(register)
    return int(register[3:])


def assert_serving(agent: Agent) -> None:
    r = _stub(agent).GetMeasurementCount(cima_server_pb2.GetMeasurementCountRequest())
    assert r.count == agent.platform.measurement_count()


# -- every RPC, checked against the platform ---------------------------------------------------


def test_get_default_algorithm(agent: Agent) -> None:
    r = _stub(agent).GetDefaultAlgorithm(cima_server_pb2.GetDefaultAlgorithmRequest())
    assert r.algo_id == by_name(agent.platform.default_algorithm()).alg_id
    if agent.platform.name == "tdx":
        assert r.algo_id == 0x000C  # TPM_ALG_SHA384


def test_get_measurement_count(agent: Agent) -> None:
    r = _stub(agent).GetMeasurementCount(cima_server_pb2.GetMeasurementCountRequest())
    assert r.count == len(agent.platform.register_names())
    assert r.count == (5 if agent.platform.name == "tdx" else 24)


def test_get_cc_measurement(agent: Agent) -> None:
    stub = _stub(agent)
    p = agent.platform
    for index in range(p.measurement_count()):
        register = _register(p.name, index)
        for alg in p.algorithms():
            r = stub.GetCcMeasurement(
                cima_server_pb2.GetCcMeasurementRequest(index=index, algo_id=by_name(alg).alg_id)
            )
            assert r.measurement.algo_id == by_name(alg).alg_id
            assert r.measurement.hash == p.read(register, alg)
        default = stub.GetCcMeasurement(cima_server_pb2.GetCcMeasurementRequest(index=index))
        assert default.measurement.algo_id == by_name(p.default_algorithm()).alg_id


@pytest.mark.parametrize("agent", ["tdx"], indirect=True)
def test_tdx_indices_are_cc_measurement_register_indices(agent: Agent) -> None:
    entry = next(e for e in vectors.manifest("ccel") if e["file"] == CCEL_LOG)
    expected = entry["expected"]["registers_by_log_index"]["sha384"]
    stub = _stub(agent)
    for index, value in expected.items():
        if int(index) == 4:
            continue  # rtmr3 also holds the agent's runtime events
        r = stub.GetCcMeasurement(cima_server_pb2.GetCcMeasurementRequest(index=int(index)))
        assert r.measurement.hash.hex() == value


def _replay(events: list[Any], platform: str) -> dict[tuple[str, str], bytes]:
    values: dict[tuple[str, str], bytes] = {}
    for ev in events:
        if ev.event_type == EV_NO_ACTION:
            continue
        register = _register(platform, ev.imr_index)
        for d in ev.digests:
            alg = by_id(d.algo_id)
            old = values.get((register, alg.name), bytes(alg.digest_size))
            values[(register, alg.name)] = alg.hash(old + d.hash)
    return values


def test_get_cc_eventlog_replays_to_the_registers(agent: Agent) -> None:
    p = agent.platform
    r = _stub(agent).GetCcEventlog(cima_server_pb2.GetCcEventlogRequest())
    events = list(r.event_logs)
    assert [e.rec_num for e in events] == list(range(len(events)))
    boot = [e for e in events if e.event_type not in (0x14, 0x00C1A001)]
    ima = [e for e in events if e.event_type == 0x14]
    runtime = [e for e in events if e.event_type == 0x00C1A001]
    assert len(events) == len(boot) + len(ima) + len(runtime)
    assert len(runtime) == len(agent.journal)
    assert len(ima) == len(agent.ima)
    # The runtime events: the journal's content, replaying to the runtime register.
    values = _replay(runtime, p.name)
    reg = agent.journal.register
    assert values[(reg, "sha384")] == p.read(reg, "sha384")
    assert {e.imr_index for e in runtime} == {_index(p.name, reg)}
    assert all(e.extra_info["content_type"] == "cima" for e in runtime)
    assert [e.event for e in runtime] == [canonical(ev.content) for ev in agent.journal.events()]
    if ima:
        values = _replay(ima, p.name)
        for alg in p.algorithms():
            assert values[("pcr10", alg)] == p.read("pcr10", alg)
        assert ima[0].extra_info["template_name"] == "ima-ng"
        assert ima[0].event.endswith(b" boot_aggregate")
    values = _replay(boot, p.name)
    if p.name == "tdx":
        for i in (1, 2, 3):
            register = _register("tdx", i)
            assert values[(register, "sha384")] == p.read(register, "sha384")
        assert {e.imr_index for e in boot} <= {1, 2, 3, 4}
    elif p.name == "software":
        _, expected = boot_log_vector()
        for alg, pcrs in expected.items():
            for index, value in pcrs.items():
                if index != "0":  # pcr0 starts at the StartupLocality value, not zero
                    assert values[(f"pcr{index}", alg)].hex() == value


def test_get_cc_eventlog_paging(agent: Agent) -> None:
    stub = _stub(agent)
    whole = list(stub.GetCcEventlog(cima_server_pb2.GetCcEventlogRequest()).event_logs)
    got: list[Any] = []
    while len(got) < len(whole):
        page = stub.GetCcEventlog(cima_server_pb2.GetCcEventlogRequest(start=len(got), count=7))
        assert 0 < len(page.event_logs) <= 7
        got.extend(page.event_logs)
    assert got == whole
    end = stub.GetCcEventlog(cima_server_pb2.GetCcEventlogRequest(start=len(whole)))
    assert list(end.event_logs) == []


def _check_cc_report(agent: Agent, r: Any, report_nonce: bytes, report_user_data: bytes) -> None:
    if agent.platform.name == "tdx":
        assert r.cc_type == 1
        quote = TDXQuote.from_bytes(r.cc_report)
        assert quote.report_data == hashlib.sha512(report_nonce + report_user_data).digest()
        registers = quote.body.registers()
        assert registers["rtmr3"] == agent.platform.read("rtmr3", "sha384")
        return
    assert r.cc_type == 0
    # TPM2B_ATTEST then TPMT_SIGNATURE, as TPM2_Quote returns them.
    (size,) = struct.unpack_from(">H", r.cc_report)
    attest = r.cc_report[2 : 2 + size]
    signature, used = Signature.unmarshal(r.cc_report, 2 + size)
    assert used == len(r.cc_report)
    ak = agent.platform.ak_pem()  # type: ignore[attr-defined]
    verify_quote(attest, signature, ak, nonce=report_nonce, user_data=report_user_data)
    assert Quote.from_bytes(attest).is_quote


def test_get_cc_report_of_the_node(agent: Agent) -> None:
    nonce, user = os.urandom(32), os.urandom(100)
    r = _stub(agent).GetCcReport(
        cima_server_pb2.GetCcReportRequest(
            nonce=base64.b64encode(nonce).decode(), user_data=base64.b64encode(user).decode()
        )
    )
    _check_cc_report(agent, r, nonce, user)


def test_get_cc_report_without_nonce(agent: Agent) -> None:
    r = _stub(agent).GetCcReport(cima_server_pb2.GetCcReportRequest())
    _check_cc_report(agent, r, b"", b"")


def test_get_cc_report_of_a_container_binds_its_register(agent: Agent) -> None:
    agent.as_container(A, POD_A)
    try:
        nonce = os.urandom(16)
        r = _stub(agent).GetCcReport(
            cima_server_pb2.GetCcReportRequest(
                container_id=A, nonce=base64.b64encode(nonce).decode()
            )
        )
    finally:
        agent.as_host()
    register = bytes(48)
    for e in agent.journal.events():
        if e.scope == container_scope(A):
            register = hashlib.sha384(register + e.digest).digest()
    binding = container_binding(register, nonce, b"", "sha384")
    _check_cc_report(agent, r, binding, SCOPED_BINDING_TAG)


@pytest.mark.parametrize(
    "named", [A, A.upper(), POD_A, POD_A.replace("-", "_"), ""], ids=str.__len__
)
def test_a_container_may_name_itself(agent: Agent, named: str) -> None:
    agent.as_container(A, POD_A)
    try:
        stub = _stub(agent)
        r = stub.GetCcEventlog(cima_server_pb2.GetCcEventlogRequest(container_id=named))
        runtime = [e for e in r.event_logs if e.event_type == 0x00C1A001]
        redacted = [e for e in runtime if e.extra_info.get("redacted") == "true"]
        assert redacted and all(e.event == b"" for e in redacted)
        assert not any(b"bravo" in e.event for e in runtime)
    finally:
        agent.as_host()


@pytest.mark.parametrize("as_container", [True, False], ids=["container", "host"])
def test_naming_another_container_is_refused(agent: Agent, as_container: bool) -> None:
    if as_container:
        agent.as_container(A, POD_A)
    try:
        stub = _stub(agent)
        for call, request in (
            (stub.GetCcEventlog, cima_server_pb2.GetCcEventlogRequest(container_id="b" * 64)),
            (stub.GetCcMeasurement, cima_server_pb2.GetCcMeasurementRequest(container_id="b" * 64)),
            (stub.GetCcReport, cima_server_pb2.GetCcReportRequest(container_id="b" * 64)),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call(request)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert_serving(agent)
    finally:
        agent.as_host()


# -- bad input -----------------------------------------------------------------------------------

_B64 = base64.b64encode

BAD = {
    "index past the last register": (
        "GetCcMeasurement",
        lambda: cima_server_pb2.GetCcMeasurementRequest(index=24),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "huge index": (
        "GetCcMeasurement",
        lambda: cima_server_pb2.GetCcMeasurementRequest(index=2**32 - 1),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "unknown algorithm id": (
        "GetCcMeasurement",
        lambda: cima_server_pb2.GetCcMeasurementRequest(index=0, algo_id=0x0099),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "bank the platform lacks": (
        "GetCcMeasurement",
        lambda: cima_server_pb2.GetCcMeasurementRequest(index=0, algo_id=0x000D),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "nonce not base64": (
        "GetCcReport",
        lambda: cima_server_pb2.GetCcReportRequest(nonce="not base64!"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "nonce of 65 bytes": (
        "GetCcReport",
        lambda: cima_server_pb2.GetCcReportRequest(nonce=_B64(bytes(65)).decode()),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "user data of 1025 bytes": (
        "GetCcReport",
        lambda: cima_server_pb2.GetCcReportRequest(user_data=_B64(bytes(1025)).decode()),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "count of zero": (
        "GetCcEventlog",
        lambda: cima_server_pb2.GetCcEventlogRequest(count=0),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "start past the end": (
        "GetCcEventlog",
        lambda: cima_server_pb2.GetCcEventlogRequest(start=10**6),
        grpc.StatusCode.OUT_OF_RANGE,
    ),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_request_status(agent: Agent, name: str) -> None:
    method, request, code = BAD[name]
    with pytest.raises(grpc.RpcError) as info:
        getattr(_stub(agent), method)(request())
    assert info.value.code() == code
    assert_serving(agent)


@pytest.mark.parametrize(
    "raw", [b"\xff\xff", b"\x12\xff\xff\xff\xff\x0f", b"\x10" + b"\xff" * 11], ids=str
)
def test_malformed_request_message(agent: Agent, raw: bytes) -> None:
    call = agent.channel().unary_unary("/cima_server_pb.cima/GetCcMeasurement")
    with pytest.raises(grpc.RpcError) as info:
        call(raw, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_serving(agent)


def test_the_proto_is_the_cima_servers() -> None:
    """Package, service, methods, field numbers and types of the CIMA server's proto."""
    file = cima_server_pb2.DESCRIPTOR
    assert file.package == "cima_server_pb"
    service = file.services_by_name["cima"]
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == {
        "GetDefaultAlgorithm": ("GetDefaultAlgorithmRequest", "GetDefaultAlgorithmResponse"),
        "GetMeasurementCount": ("GetMeasurementCountRequest", "GetMeasurementCountResponse"),
        "GetCcReport": ("GetCcReportRequest", "GetCcReportResponse"),
        "GetCcMeasurement": ("GetCcMeasurementRequest", "GetCcMeasurementResponse"),
        "GetCcEventlog": ("GetCcEventlogRequest", "GetCcEventlogResponse"),
    }
    T = cima_server_pb2.TcgEventlog.DESCRIPTOR.fields_by_name["rec_num"].__class__
    fields = {
        (m.name, f.name): (f.number, f.type)
        for m in file.message_types_by_name.values()
        for f in m.fields
    }
    assert fields[("GetCcReportRequest", "container_id")] == (1, T.TYPE_STRING)
    assert fields[("GetCcReportRequest", "user_data")] == (2, T.TYPE_STRING)
    assert fields[("GetCcReportRequest", "nonce")] == (3, T.TYPE_STRING)
    assert fields[("GetCcReportResponse", "cc_type")] == (1, T.TYPE_INT32)
    assert fields[("GetCcReportResponse", "cc_report")] == (2, T.TYPE_BYTES)
    assert fields[("GetCcMeasurementRequest", "index")] == (2, T.TYPE_UINT32)
    assert fields[("GetCcMeasurementRequest", "algo_id")] == (3, T.TYPE_UINT32)
    assert fields[("GetCcEventlogRequest", "start")] == (2, T.TYPE_UINT32)
    assert fields[("GetCcEventlogRequest", "count")] == (3, T.TYPE_UINT32)
    assert fields[("TcgDigest", "algo_id")] == (1, T.TYPE_UINT32)
    assert fields[("TcgDigest", "hash")] == (2, T.TYPE_BYTES)
    assert fields[("TcgEventlog", "imr_index")] == (2, T.TYPE_UINT32)
    assert fields[("TcgEventlog", "digests")] == (4, T.TYPE_MESSAGE)
    assert fields[("TcgEventlog", "event")] == (6, T.TYPE_BYTES)
    assert fields[("TcgEventlog", "extra_info")] == (7, T.TYPE_MESSAGE)


def test_the_proto_source_is_committed_beside_its_code() -> None:
    proto = Path(cima_server_pb2.__file__).with_name("cima_server.proto").read_text()
    assert "package cima_server_pb;" in proto
    assert "service cima {" in proto
