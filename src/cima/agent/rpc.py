"""Unary gRPC calls answered straight from the HTTP/2 events of a connection.

Every RPC of the agent is unary: one small request message, one response
message. grpclib serves a call with a task, a stream object, a deadline
wrapper, dispatch hooks and three awaited writes; for a request of a hundred
bytes that machinery costs more than the answer. :class:`UnaryProcessor`
replaces grpclib's events processor on the agent's connections: a call to one
of the agent's methods is collected from its HEADERS and DATA frames, and when
the client ends its stream the handler runs at once; the response (headers,
the message, the trailers) goes to the h2 connection in the same turn of the
event loop, so one system call carries it (the connection's transport
gathers the writes of a turn).

A handler is a coroutine function. It is run eagerly: up to its first
suspension in the event processor itself, so that a handler that never waits
(a software register read, an info request) costs no task at all; one that
waits (a TPM read in a worker thread, a batched quote) goes on in a task from
where it stopped. A response larger than the peer's flow-control window is
sent as the window opens. A client that resets its stream cancels its call.

What the fast path does not take goes to grpclib unchanged: another method,
another content type, a missing ``te: trailers``: grpclib answers those with
its own errors. A message with the compressed flag is refused
(INVALID_ARGUMENT); a ``grpc-encoding`` header alone changes nothing, since
each message says whether it is compressed. Request messages are limited to
``max_request`` bytes, read from the 5-byte gRPC message header before any
buffering (INVALID_ARGUMENT).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
import types
from collections.abc import Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from google.protobuf.message import DecodeError, Message
from grpclib.const import Status
from grpclib.metadata import encode_grpc_message
from grpclib.protocol import AbstractHandler, Connection, EventsProcessor
from h2.errors import ErrorCodes
from h2.events import DataReceived, RequestReceived, StreamEnded, StreamReset, WindowUpdated
from h2.exceptions import FlowControlError, ProtocolError, StreamClosedError

__all__ = ["Serialized", "UnaryMethod", "UnaryProcessor"]

log = logging.getLogger(__name__)

_CONTENT_TYPE = "application/grpc+proto"
_ACCEPTED_TYPES = frozenset({"application/grpc", _CONTENT_TYPE})
_RESPONSE_HEADERS = ((":status", "200"), ("content-type", _CONTENT_TYPE))
_OK_TRAILERS = (("grpc-status", "0"),)
_MESSAGE_HEADER = struct.Struct(">?I")
_R = TypeVar("_R")

#: A handler: (the connection's identity, the request) -> the response.
Handler = Callable[[Any, Any], Coroutine[Any, Any, "Message | Serialized"]]
#: An exception -> (gRPC status, message).
StatusOf = Callable[[BaseException], tuple[Status, str]]


#: How much of a large answer is framed before the event loop writes it.
_WRITE_CHUNK = 256 * 1024
#: The largest DATA frame sent, whatever larger frames and windows the peer allows:
#: a large answer goes out in frames of this size, each written as it is made.
_MAX_FRAME = 64 * 1024


@dataclass(frozen=True, slots=True)
class Serialized:
    """A response message already serialised, in pieces that are sent as they come.

    For answers of many megabytes (an evidence bundle with a long IMA log): the
    pieces are framed one after another, never joined into one buffer, and may
    be made as they are sent (an iterator). ``size`` is their total length,
    known beforehand (the gRPC message header says it first); pieces that add
    up to another length end the call with a reset, never a wrong message.
    ``message_type`` decodes the whole where a ``Message`` is needed.
    """

    message_type: type[Message]
    pieces: Iterable[bytes]
    size: int

    @classmethod
    def field(
        cls,
        message_type: type[Message],
        number: int,
        pieces: Iterable[bytes],
        *,
        size: int | None = None,
    ) -> Serialized:
        """A message whose only field is the bytes field ``number``, made of ``pieces``.

        ``size``: the pieces' total length, when they are an iterator made as
        they are sent.
        """
        if size is None:
            pieces = tuple(pieces)
            size = sum(len(p) for p in pieces)
        head = _varint((number << 3) | 2) + _varint(size)
        return cls(message_type, itertools.chain((head,), pieces), len(head) + size)

    def to_message(self) -> Message:
        return self.message_type.FromString(b"".join(self.pieces))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@dataclass(frozen=True, slots=True)
class UnaryMethod:
    """One unary RPC: its request message type and its handler."""

    request_type: type[Message]
    handler: Handler


@dataclass(slots=True)
class _Call:
    method: UnaryMethod
    data: bytearray = field(default_factory=bytearray)
    declared: int | None = None
    refused: str | None = None
    task: asyncio.Task[None] | None = None


@types.coroutine
def _resume(coro: Coroutine[Any, Any, _R], first: Any) -> Generator[Any, Any, _R]:
    """Go on with a coroutine that ran up to its first suspension (which yielded ``first``).

    The task that runs this generator sees ``first`` as if the coroutine had
    yielded it to the task itself; then the coroutine is delegated to. What the
    task throws in while ``first`` is pending (the awaited future's exception, a
    cancellation) is thrown into the coroutine at its await, as asyncio does, so
    the handler's own ``try`` sees it.
    """
    value = first
    while True:
        try:
            yield value
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:
            try:
                value = coro.throw(e)
            except StopIteration as done:
                return cast(_R, done.value)
            continue
        return (yield from coro.__await__())


class UnaryProcessor(EventsProcessor):
    """grpclib's events processor, with the unary methods of ``methods`` answered directly."""

    def __init__(
        self,
        handler: AbstractHandler,
        connection: Connection,
        *,
        methods: dict[str, UnaryMethod],
        identity: Any,
        status_of: StatusOf,
        max_request: int,
        answered: dict[int, int],
    ) -> None:
        super().__init__(handler, connection)
        self._methods = methods
        self._identity = identity
        self._status_of = status_of
        self._max_request = max_request
        self._calls: dict[int, _Call] = {}
        self._h2 = connection._connection
        self._window_open: dict[int, asyncio.Event] = {}
        #: Calls answered, by status code (shared by a server's connections).
        self.answered = answered

    # -- events ------------------------------------------------------------------------------
    def process_request_received(self, event: RequestReceived) -> None:
        method = self._accept(event.headers)
        if method is None:
            super().process_request_received(event)
            return
        self._calls[event.stream_id] = _Call(method)

    def process_data_received(self, event: DataReceived) -> None:
        call = self._calls.get(event.stream_id)
        if call is None:
            super().process_data_received(event)
            return
        if event.flow_controlled_length:
            with contextlib.suppress(StreamClosedError, ProtocolError):
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        if call.refused is not None:
            return
        call.data += event.data
        if call.declared is None and len(call.data) >= 5:
            compressed, length = _MESSAGE_HEADER.unpack_from(call.data)
            if compressed:
                call.refused = "compressed requests are not accepted"
            elif length > self._max_request:
                call.refused = f"request message of {length} bytes, at most {self._max_request}"
            call.declared = length
        if (
            call.refused is None
            and call.declared is not None
            and len(call.data) > 5 + call.declared
        ):
            call.refused = "more than one request message in a unary call"
        if call.refused is not None:
            call.data = bytearray()

    def process_stream_ended(self, event: StreamEnded) -> None:
        call = self._calls.get(event.stream_id)
        if call is None:
            super().process_stream_ended(event)
            return
        self.connection.streams_succeeded += 1
        self._run(event.stream_id, call)

    def process_stream_reset(self, event: StreamReset) -> None:
        call = self._calls.pop(event.stream_id, None)
        if call is None:
            super().process_stream_reset(event)
            return
        self._window_open.pop(event.stream_id, None)
        if call.task is not None:
            call.task.cancel()
        self.connection.streams_failed += 1

    def process_window_updated(self, event: WindowUpdated) -> None:
        super().process_window_updated(event)
        if event.stream_id == 0:
            for opened in self._window_open.values():
                opened.set()
        else:
            waiting = self._window_open.get(event.stream_id)
            if waiting is not None:
                waiting.set()

    def close(self, reason: str = "Connection closed") -> None:
        calls, self._calls = self._calls, {}
        for call in calls.values():
            if call.task is not None:
                call.task.cancel()
        super().close(reason)

    # -- a call ----------------------------------------------------------------------------------
    def _accept(self, headers: Any) -> UnaryMethod | None:
        """The method of a request the fast path serves, else None (grpclib's then)."""
        path = method = content_type = te = None
        for name, value in headers:
            if name == ":path":
                path = value
            elif name == ":method":
                method = value
            elif name == "content-type":
                content_type = value
            elif name == "te":
                te = value
        if method != "POST" or te != "trailers" or content_type not in _ACCEPTED_TYPES:
            return None
        return self._methods.get(path) if path is not None else None

    def _run(self, stream_id: int, call: _Call) -> None:
        if call.refused is not None:
            self._fail(stream_id, Status.INVALID_ARGUMENT, call.refused)
            return
        data = call.data
        if call.declared is None:
            self._fail(stream_id, Status.INVALID_ARGUMENT, "no request message")
            return
        if len(data) != 5 + call.declared:
            self._fail(stream_id, Status.INVALID_ARGUMENT, "request message cut short")
            return
        try:
            request = call.method.request_type.FromString(bytes(data[5:]))
        except DecodeError as e:
            self._fail(stream_id, Status.INVALID_ARGUMENT, f"malformed request message: {e}")
            return
        coro = call.method.handler(self._identity, request)
        try:
            first = coro.send(None)
        except StopIteration as done:
            self._answer(stream_id, done.value)
        except Exception as e:
            self._fail(stream_id, *self._status_of(e))
        else:
            call.task = asyncio.get_running_loop().create_task(
                self._finish(stream_id, _resume(coro, first))
            )

    async def _finish(self, stream_id: int, rest: Any) -> None:
        try:
            response = await rest
        except asyncio.CancelledError:
            return
        except Exception as e:
            self._fail(stream_id, *self._status_of(e))
        else:
            if stream_id in self._calls:
                self._answer(stream_id, response)
        self.connection.flush()

    def _answer(self, stream_id: int, response: Message | Serialized) -> None:
        pieces: Iterable[bytes]
        if isinstance(response, Serialized):
            pieces, size = response.pieces, response.size
        else:
            payload = response.SerializeToString()
            pieces, size = (payload,), len(payload)
        head = _MESSAGE_HEADER.pack(False, size)
        h2 = self._h2
        if size + 5 <= self._room(stream_id):
            message = b"".join((head, *pieces))
            if len(message) != size + 5:
                self._broken(stream_id, size, len(message) - 5)
                return
            try:
                h2.send_headers(stream_id, _RESPONSE_HEADERS)
                h2.send_data(stream_id, message)
                h2.send_headers(stream_id, _OK_TRAILERS, end_stream=True)
            except (StreamClosedError, ProtocolError, FlowControlError) as e:
                log.debug("stream %d: the answer is not sent: %s", stream_id, e)
            self._done(stream_id, Status.OK)
            return
        task = asyncio.get_running_loop().create_task(
            self._send_large(stream_id, itertools.chain((head,), pieces), size + 5)
        )
        call = self._calls.get(stream_id)
        if call is not None:
            call.task = task

    async def _send_large(self, stream_id: int, pieces: Iterable[bytes], size: int) -> None:
        """Send a response in frames as the peer's flow-control windows allow.

        Every :data:`_WRITE_CHUNK` bytes the event loop writes what was framed
        and waits while the socket's buffer is full, so that a large answer is
        never copied whole into the connection's buffers.
        """
        h2 = self._h2
        opened = self._window_open.setdefault(stream_id, asyncio.Event())
        frame = bytearray()
        written = total = 0
        try:
            h2.send_headers(stream_id, _RESPONSE_HEADERS)
            for piece in pieces:
                total += len(piece)
                if total > size:
                    break
                view = memoryview(piece)
                while view:
                    room = self._room(stream_id)
                    if room <= len(frame):
                        if frame:
                            h2.send_data(stream_id, bytes(frame))
                            written += len(frame)
                            frame.clear()
                            continue
                        await self._wait_window(opened)
                        continue
                    take = room - len(frame)
                    frame += view[:take]
                    view = view[take:]
                    if len(frame) == room:
                        h2.send_data(stream_id, bytes(frame))
                        written += len(frame)
                        frame.clear()
                    if written >= _WRITE_CHUNK:
                        written = 0
                        self.connection.flush()
                        await asyncio.sleep(0)  # the gathered writes go to the socket
                        await self.connection.write_ready.wait()
            if total != size:
                self._broken(stream_id, size - 5, total - 5)
                return
            while frame:
                room = self._room(stream_id)
                if room <= 0:
                    await self._wait_window(opened)
                    continue
                h2.send_data(stream_id, bytes(frame[:room]))
                del frame[:room]
            h2.send_headers(stream_id, _OK_TRAILERS, end_stream=True)
        except (StreamClosedError, ProtocolError, FlowControlError) as e:
            log.debug("stream %d: the answer is not sent: %s", stream_id, e)
        except asyncio.CancelledError:
            return
        finally:
            self._window_open.pop(stream_id, None)
        self._done(stream_id, Status.OK)
        self.connection.flush()

    async def _wait_window(self, opened: asyncio.Event) -> None:
        """Send what is framed, then wait until the peer opens the stream's window."""
        self.connection.flush()
        opened.clear()
        await opened.wait()

    def _room(self, stream_id: int) -> int:
        """The largest DATA frame the stream may take now (never above :data:`_MAX_FRAME`)."""
        h2 = self._h2
        return min(h2.local_flow_control_window(stream_id), h2.max_outbound_frame_size, _MAX_FRAME)

    def _broken(self, stream_id: int, declared: int, made: int) -> None:
        """An answer whose pieces do not add up to its declared size: reset, never sent wrong."""
        log.error(
            "stream %d: the answer's pieces make %d bytes, %d were declared: reset",
            stream_id,
            made,
            declared,
        )
        with contextlib.suppress(StreamClosedError, ProtocolError):
            self._h2.reset_stream(stream_id, ErrorCodes.INTERNAL_ERROR)
        self.connection.flush()
        self._done(stream_id, Status.INTERNAL)

    def _fail(self, stream_id: int, status: Status, message: str) -> None:
        headers = [*_RESPONSE_HEADERS, ("grpc-status", str(status.value))]
        if message:
            headers.append(("grpc-message", encode_grpc_message(message)))
        try:
            self._h2.send_headers(stream_id, headers, end_stream=True)
        except (StreamClosedError, ProtocolError) as e:
            log.debug("stream %d: the error is not sent: %s", stream_id, e)
        self._done(stream_id, status)

    def _done(self, stream_id: int, status: Status) -> None:
        self._calls.pop(stream_id, None)
        self.answered[status.value] = self.answered.get(status.value, 0) + 1
