"""The agent's unary calls at the HTTP/2 level: framing, flow control, resets, refusals.

A raw h2 client on the agent's Unix socket sends what gRPC libraries never
send (compressed flags, two messages, a message cut short, tiny flow-control
windows, resets mid-call) and reads each answer's headers, message and
trailers itself.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from cima._proto.cima import agent_pb2
from cima.agent.rpc import Serialized
from cima.agent.server import MAX_REQUEST
from cima.evidence.bundle import EvidenceBundle
from tests.agent.test_server import Agent, assert_serving, booted_software_platform, start_agent

GRPC_HEADERS = [("content-type", "application/grpc"), ("te", "trailers")]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = start_agent(tmp_path / "agent", booted_software_platform())
    yield a
    a.stop()


@dataclass
class Answer:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    trailers: dict[str, str] = field(default_factory=dict)
    ended: bool = False
    reset: bool = False

    @property
    def status(self) -> int:
        return int((self.trailers or self.headers)["grpc-status"])

    @property
    def message(self) -> bytes:
        """The one response message, checked against its 5-byte header."""
        compressed, length = struct.unpack_from(">?I", self.data)
        assert not compressed
        assert len(self.data) == 5 + length
        return bytes(self.data[5:])


class RawClient:
    """An HTTP/2 client that sends gRPC frames as it is told to."""

    def __init__(self, path: Path, *, window: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.h2.initiate_connection()
        if window is not None:
            self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.auto_ack = window is None
        self.answers: dict[int, Answer] = {}
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def open(self, method: str, headers: list[tuple[str, str]] | None = None) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", "localhost"),
                (":path", method),
                *(GRPC_HEADERS if headers is None else headers),
            ],
        )
        self.answers[sid] = Answer()
        self.flush()
        return sid

    def send(self, sid: int, data: bytes, *, end: bool = True) -> None:
        self.h2.send_data(sid, data, end_stream=end)
        self.flush()

    def call(self, method: str, data: bytes, **kw: list[tuple[str, str]]) -> Answer:
        sid = self.open(method, kw.get("headers"))
        self.send(sid, data)
        return self.wait(sid)

    def pump(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the agent closed the connection")
        for event in self.h2.receive_data(chunk):
            answer = self.answers.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.ResponseReceived) and answer is not None:
                answer.headers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived) and answer is not None:
                answer.data += event.data
                if self.auto_ack:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived) and answer is not None:
                answer.trailers = dict(event.headers)
            elif isinstance(event, h2.events.StreamEnded) and answer is not None:
                answer.ended = True
            elif isinstance(event, h2.events.StreamReset) and answer is not None:
                answer.reset = True
        self.flush()

    def wait(self, sid: int) -> Answer:
        answer = self.answers[sid]
        while not (answer.ended or answer.reset):
            self.pump()
        return answer

    def close(self) -> None:
        self.sock.close()


def grpc_message(payload: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    return struct.pack(">?I", compressed, len(payload) if length is None else length) + payload


MEASUREMENT = "/cima.v1.Agent/GetMeasurement"
PCR13 = agent_pb2.GetMeasurementRequest(register="pcr13").SerializeToString()


@pytest.fixture
def raw(agent: Agent) -> Iterator[RawClient]:
    client = RawClient(agent.socket)
    yield client
    client.close()


def test_a_call_is_answered_with_headers_one_message_and_trailers(
    agent: Agent, raw: RawClient
) -> None:
    answer = raw.call(MEASUREMENT, grpc_message(PCR13))
    assert answer.headers[":status"] == "200"
    assert answer.headers["content-type"].startswith("application/grpc")
    assert answer.status == 0
    reply = agent_pb2.GetMeasurementResponse.FromString(answer.message)
    platform = agent.platform
    assert reply.measurement.digest == platform.read("pcr13", platform.default_algorithm())


def test_many_calls_in_flight_on_one_connection_each_get_their_answer(
    agent: Agent, raw: RawClient
) -> None:
    registers = [f"pcr{i}" for i in range(16)]
    streams = {}
    for register in registers:  # every request open before any ends
        streams[register] = raw.open(MEASUREMENT)
    for register in reversed(registers):
        body = agent_pb2.GetMeasurementRequest(register=register).SerializeToString()
        raw.send(streams[register], grpc_message(body))
    platform = agent.platform
    for register, sid in streams.items():
        answer = raw.wait(sid)
        reply = agent_pb2.GetMeasurementResponse.FromString(answer.message)
        assert reply.measurement.register == register
        assert reply.measurement.digest == platform.read(register, platform.default_algorithm())


def test_a_message_split_over_many_frames_is_put_together(raw: RawClient) -> None:
    message = grpc_message(PCR13)
    sid = raw.open(MEASUREMENT)
    for i in range(len(message)):
        raw.send(sid, message[i : i + 1], end=False)
    raw.send(sid, b"")
    assert raw.wait(sid).status == 0


BAD_FRAMES = {
    "no message at all": (b"", "no request message"),
    "a message header cut short": (b"\x00\x00\x00", "no request message"),
    "a message cut short": (grpc_message(PCR13, length=len(PCR13) + 10), "cut short"),
    "two messages": (grpc_message(PCR13) * 2, "more than one request message"),
    "a compressed message": (grpc_message(PCR13, compressed=True), "compressed"),
    "a declared length past the limit": (
        grpc_message(b"", length=MAX_REQUEST + 1),
        f"at most {MAX_REQUEST}",
    ),
    "not protobuf": (grpc_message(b"\xff\xff\xff\xff"), "malformed request message"),
}


@pytest.mark.parametrize("name", BAD_FRAMES)
def test_bad_framing_is_invalid_argument_and_the_connection_serves_on(
    agent: Agent, raw: RawClient, name: str
) -> None:
    data, reason = BAD_FRAMES[name]
    answer = raw.call(MEASUREMENT, data)
    assert answer.status == 3  # INVALID_ARGUMENT
    assert reason in answer.headers["grpc-message"].replace("%20", " ")
    assert raw.call(MEASUREMENT, grpc_message(PCR13)).status == 0
    assert agent.server.answered["INVALID_ARGUMENT"] >= 1
    assert_serving(agent)


def test_an_oversized_request_is_refused_from_its_header_without_reading_it(
    agent: Agent, raw: RawClient
) -> None:
    """The refusal is decided on the 5-byte header; what follows is dropped, not kept."""
    sid = raw.open(MEASUREMENT)
    raw.send(sid, grpc_message(b"", length=1 << 30), end=False)
    for _ in range(64):  # 1 MB in all, past the initial windows: the agent acknowledges it
        while raw.h2.local_flow_control_window(sid) < 16_000:
            raw.pump()
        raw.send(sid, bytes(16_000), end=False)
    raw.send(sid, b"")
    answer = raw.wait(sid)
    assert answer.status == 3
    assert "at most" in answer.headers["grpc-message"].replace("%20", " ")
    assert raw.call(MEASUREMENT, grpc_message(PCR13)).status == 0


@pytest.mark.parametrize(
    ("headers", "what"),
    [
        ([("content-type", "text/plain"), ("te", "trailers")], "another content type"),
        ([("content-type", "application/grpc")], "no te: trailers"),
    ],
)
def test_requests_the_fast_path_does_not_take_are_refused_by_grpclib(
    agent: Agent, raw: RawClient, headers: list[tuple[str, str]], what: str
) -> None:
    answer = raw.call(MEASUREMENT, grpc_message(PCR13), headers=headers)
    status = answer.headers[":status"]
    assert status != "200" or int((answer.trailers or answer.headers)["grpc-status"]) != 0, what
    assert raw.call(MEASUREMENT, grpc_message(PCR13)).status == 0


def test_an_uncompressed_message_is_served_whatever_the_encoding_header(raw: RawClient) -> None:
    headers = [*GRPC_HEADERS, ("grpc-encoding", "gzip"), ("grpc-accept-encoding", "gzip")]
    assert raw.call(MEASUREMENT, grpc_message(PCR13), headers=headers).status == 0


def test_an_unknown_method_is_unimplemented(raw: RawClient) -> None:
    assert raw.call("/cima.v1.Agent/Reboot", grpc_message(b"")).status == 12


def _whole_runtime_log() -> bytes:
    request = agent_pb2.GetEventLogRequest(log="ima", format="cel-json", start=0, count=1000)
    return grpc_message(request.SerializeToString())


def test_a_large_answer_waits_for_the_clients_flow_control_window(agent: Agent) -> None:
    """With a 1,000-byte window the answer comes in window-sized pieces as the client opens it."""
    reference = RawClient(agent.socket)
    try:
        expected = reference.call("/cima.v1.Agent/GetEventLog", _whole_runtime_log())
    finally:
        reference.close()
    assert expected.status == 0 and len(expected.data) > 5_000

    client = RawClient(agent.socket, window=1000)
    try:
        sid = client.open("/cima.v1.Agent/GetEventLog")
        client.send(sid, _whole_runtime_log())
        answer = client.answers[sid]
        pieces = 0
        while not answer.ended:
            before = len(answer.data)
            client.pump()
            got = len(answer.data) - before
            assert got <= 1000
            if got:
                pieces += 1
                client.h2.acknowledge_received_data(got, sid)
                client.flush()
        assert pieces >= len(expected.data) // 1000
        assert answer.status == 0
        assert answer.message == expected.message
    finally:
        client.close()


def test_a_reset_while_the_answer_waits_for_the_window_frees_the_call(agent: Agent) -> None:
    client = RawClient(agent.socket, window=1000)
    try:
        sid = client.open("/cima.v1.Agent/GetEventLog")
        client.send(sid, _whole_runtime_log())
        while not client.answers[sid].data:
            client.pump()
        client.h2.reset_stream(sid)
        client.flush()
        # The same connection serves on; its own window is untouched by the reset call.
        client.auto_ack = True
        assert client.call(MEASUREMENT, grpc_message(PCR13)).status == 0
    finally:
        client.close()
    assert_serving(agent)


def test_a_reset_before_the_request_ends_drops_the_call(agent: Agent, raw: RawClient) -> None:
    sid = raw.open(MEASUREMENT)
    raw.send(sid, grpc_message(PCR13)[:3], end=False)
    raw.h2.reset_stream(sid)
    raw.flush()
    assert raw.call(MEASUREMENT, grpc_message(PCR13)).status == 0
    assert_serving(agent)


def test_the_server_counts_answers_by_status(agent: Agent, raw: RawClient) -> None:
    before = dict(agent.server.answered)
    for _ in range(3):
        raw.call(MEASUREMENT, grpc_message(PCR13))
    raw.call(MEASUREMENT, grpc_message(b"\xff"))
    after = agent.server.answered
    assert after["OK"] - before.get("OK", 0) == 3
    assert after["INVALID_ARGUMENT"] - before.get("INVALID_ARGUMENT", 0) == 1


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16_384, 70_000])
def test_a_serialized_field_decodes_as_the_message(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    message = Serialized.field(agent_pb2.GetEvidenceResponse, 1, pieces)
    sent = b"".join(message.pieces)  # the pieces are an iterator: sent once
    assert message.size == len(sent)
    expected = agent_pb2.GetEvidenceResponse(bundle=data)
    assert agent_pb2.GetEvidenceResponse.FromString(sent) == expected
    if size:  # proto3 leaves an empty field out; the explicit empty one decodes the same
        assert sent == expected.SerializeToString()
    lazy = Serialized.field(agent_pb2.GetEvidenceResponse, 1, iter(pieces), size=len(data))
    assert lazy.size == message.size
    assert lazy.to_message() == expected


def _evidence(client: RawClient, nonce: bytes) -> Answer:
    request = agent_pb2.GetEvidenceRequest(nonce=nonce).SerializeToString()
    return client.call("/cima.v1.Agent/GetEvidence", grpc_message(request))


def test_an_evidence_bundle_made_as_it_is_sent_is_the_bundle(agent: Agent) -> None:
    """The bundle's JSON is encoded while it is framed, through 1,000-byte windows."""
    client = RawClient(agent.socket, window=1000)
    try:
        sid = client.open("/cima.v1.Agent/GetEvidence")
        client.send(sid, grpc_message(agent_pb2.GetEvidenceRequest(nonce=b"n").SerializeToString()))
        answer = client.answers[sid]
        while not answer.ended:
            before = len(answer.data)
            client.pump()
            if len(answer.data) > before:
                client.h2.acknowledge_received_data(len(answer.data) - before, sid)
                client.flush()
        assert answer.status == 0
        bundle = EvidenceBundle.from_json(
            agent_pb2.GetEvidenceResponse.FromString(answer.message).bundle
        )
    finally:
        client.close()
    assert bundle.nonce == b"n"
    assert bundle.ima_log is not None and len(bundle.ima_log) == len(agent.ima)
    bundle.verify_binding()


def test_pieces_that_do_not_add_up_reset_the_call(
    agent: Agent, raw: RawClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle whose second encoding differs from the first is never sent as a message."""
    from cima.agent import server as server_module

    real = server_module._Core.bundle_json

    def one_byte_short(self: Any, attested: Any) -> Any:
        size, pieces = real(self, attested)
        return size + 1, pieces

    monkeypatch.setattr(server_module._Core, "bundle_json", one_byte_short)
    answer = _evidence(raw, b"n")
    assert answer.reset and not answer.trailers
    assert agent.server.answered["INTERNAL"] >= 1
    monkeypatch.undo()
    assert _evidence(raw, b"n").status == 0


# -- handlers run eagerly, then resumed ------------------------------------------------------------


def _eager(coro: Any) -> Any:
    """Run ``coro`` up to its first suspension, as the processor does, and resume it in a task."""
    from cima.agent.rpc import _resume

    first = coro.send(None)

    async def finish() -> Any:
        return await _resume(coro, first)

    return asyncio.get_running_loop().create_task(finish())


def test_an_error_of_the_first_awaited_future_reaches_the_handler() -> None:
    """The handler's own ``try`` around its first await sees the future's exception."""

    def boom() -> None:
        raise ValueError("from the worker thread")

    async def handler() -> str:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, boom)
        except ValueError as e:
            await asyncio.sleep(0)  # and it may await again afterwards
            return f"handled: {e}"
        return "not raised"

    async def main() -> str:
        result: str = await _eager(handler())
        return result

    assert asyncio.run(main()) == "handled: from the worker thread"


def test_a_cancelled_call_cancels_the_handler_at_its_await() -> None:
    seen: list[str] = []

    async def handler() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("finally")

    async def main() -> None:
        task = _eager(handler())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen == ["cancelled", "finally"]
