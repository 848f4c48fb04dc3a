"""The agent's API on one Unix socket (DESIGN.md section 8): CIMA-compatible and native gRPC.

:class:`AgentServer` serves two gRPC services on one Unix socket (default
``/run/cima/cima.sock``), with grpclib on an asyncio event loop of its own
thread:

- ``cima_server_pb.cima``, wire-compatible with the CIMA SDKs
  (``cima/_proto/cima/cima_server.proto``): GetDefaultAlgorithm,
  GetMeasurementCount, GetCcMeasurement, GetCcEventlog, GetCcReport;
- ``cima.v1.Agent``, the native API (``cima/_proto/cima/agent.proto``): register
  names, paged CEL-JSON event logs, reports with their batching proof and whole
  evidence bundles; and, on a TPM, enrollment (GetEnrollment, ActivateCredential).

Enrollment
----------
A verifier trusts the node's attestation key (AK) through the TPM's endorsement key
(EK) certificate: GetEnrollment answers the EK's and the AK's public areas, the AK's
name and the EK certificate; the verifier makes a credential (TPM2_MakeCredential)
bound to the AK's name and encrypted to the EK, and ActivateCredential returns its
secret, which the TPM releases only when that AK is loaded in the same TPM as that EK
(:meth:`cima.platform.tpm.TPMPlatform.activate_credential`). Both are for host
processes with the node view only (a container, or a host process without the node
view, gets PERMISSION_DENIED). The credential blob and the encrypted secret are
marshalled TPM2B structures (size prefix included) of at most
:data:`MAX_CREDENTIAL_FIELD` bytes each. A platform without an EK (software, TDX)
answers FAILED_PRECONDITION, and so does a credential the TPM does not activate.

Who is calling
--------------
The caller is identified when its connection is accepted: the kernel's peer
credentials of the Unix socket (``SO_PEERCRED``: pid, uid) are read in the
protocol's ``connection_made``, and the pid is mapped to a container at once
(:func:`cima.agent.identity.caller_from_pid`), before a client that exits right
after connecting can take its pid away. A request field never identifies the
caller: the CIMA ``container_id`` field, when not empty, must name the caller's
own container (its id) or pod (its UID, ``-`` or ``_``), else the call fails
with PERMISSION_DENIED. What a caller sees is its view (:mod:`cima.agent.views`).

Index numbering of the CIMA-compatible service
----------------------------------------------
The only place where numbers stand for registers (:func:`compat_register`,
:func:`compat_index`): on TDX the CC measurement-register index of the UEFI
specification (2.10, section 38.4.1) and of CCEL logs, 0 = ``mrtd``,
1..4 = ``rtmr0``..``rtmr3``; on a TPM and on the software platform the PCR
index, N = ``pcrN``. ``algo_id`` is a TPM_ALG_ID, 0 meaning the platform's
default algorithm. The event log is the caller's view: the boot log's records,
then the IMA list's (event type ``0x14``, the CC Trusted API's
IMA_MEASUREMENT_EVENT; the event is the entry's ascii fields after the template
name, ``extra_info["template_name"]`` its template), then the agent's runtime
events (event type :data:`RUNTIME_EVENT_TYPE`; the event is the canonical JSON
content the digest hashes, ``extra_info["content_type"] = "cima"``). Redacted
records have an empty event and ``extra_info["redacted"] = "true"``.
``GetCcReport`` takes base64 ``nonce`` and ``user_data`` and answers
``cc_type`` 0 (TPM) or 1 (TDX), ``cc_report`` the TDX quote or, for a TPM, the
TPM2_Quote response parameters (TPM2B_ATTEST then TPMT_SIGNATURE).

Reports and batching (DESIGN.md section 4)
-------------------------------------------
A request's binding is ``nonce || user_data`` for the node view and
``H(container_register || nonce || user_data)`` for a container
(:mod:`cima.evidence.bundle`). Native report requests that arrive within
``batch_window`` seconds of each other, or while a quote is being taken, are
served by one quote: their bindings are the leaves of a Merkle tree
(:mod:`cima.evidence.batch`, hashed with the quote's hash: the AK's signing
hash on a TPM, SHA-384 on TDX) whose root the quote binds as its nonce with no
user data (TPM qualifyingData = H(root), TDX REPORTDATA = SHA-512(root)), and
each caller gets the quote and its inclusion proof. A request that finds no
company gets a quote of its own that binds its binding directly, with no proof:
for the node view that is exactly the platform's own binding of the nonce and
user data. The CIMA-compatible GetCcReport has no field for a proof, so it is
never batched.

After every quote the runtime register the quote carries is compared with the
journal's events (a quote must be explained by a prefix of the served log); a
journal that no longer proves the register serves no report, runtime log or
bundle (FAILED_PRECONDITION). A bundle's logs are read after its quote, so
that they reach at least as far as the quoted registers (the IMA list is read
anew first where the engine offers ``refresh_ima``).

Errors
------
Bad input is INVALID_ARGUMENT (unknown register, index, algorithm or log,
oversized nonce or user data, malformed or oversized request message),
OUT_OF_RANGE (an event log page starting past the end), PERMISSION_DENIED
(another container named, or enrollment asked for without the node view),
UNAUTHENTICATED (a caller the kernel could not identify), FAILED_PRECONDITION (an
unproven journal, enrollment on a platform without an endorsement key, a credential
that does not activate), UNAVAILABLE (the platform failed). One caller's bad
request never affects the others.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import errno
import grp
import inspect
import json
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

from google.protobuf.message import DecodeError, Message
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol, Peer
from grpclib.server import Server

import cima
from cima._proto.cima import agent_grpc, agent_pb2, cima_server_grpc, cima_server_pb2
from cima.agent.events import NODE, RuntimeEvent, canonical
from cima.agent.identity import Caller, caller_from_pid
from cima.agent.journal import Journal
from cima.agent.policy import Policy
from cima.agent.rpc import Serialized, UnaryMethod, UnaryProcessor
from cima.agent.views import (
    IMAAttribution,
    RedactedIMAEntry,
    View,
    ima_records,
    ima_view,
    iter_ima_records,
    iter_ima_view,
    runtime_view,
    view_of,
)
from cima.digests import by_id, by_name
from cima.errors import (
    AlgorithmError,
    CimaError,
    FreshnessError,
    JournalError,
    ParseError,
    PlatformError,
    RegisterError,
)
from cima.eventlog import cel
from cima.eventlog.cel import CELRecord
from cima.eventlog.ima import IMAEntry
from cima.evidence.batch import InclusionProof, MerkleTree
from cima.evidence.bundle import (
    EvidenceBundle,
    TDXQuoteReport,
    TPMQuoteReport,
    container_register,
    node_binding,
    utc_now,
)
from cima.evidence.reportdata import SCOPED_BINDING_TAG, container_binding, is_reserved
from cima.platform.base import Platform, Report
from cima.registers import RegisterBank, RegisterValue, cc_index, cc_name, pcr_index, pcr_name

if TYPE_CHECKING:
    from cryptography import x509

    from cima.evidence.tpm import PublicArea

__all__ = [
    "DEFAULT_SOCKET",
    "MAX_CREDENTIAL_FIELD",
    "RUNTIME_EVENT_TYPE",
    "AgentServer",
    "AgentSource",
    "ServerError",
    "SocketInUseError",
    "compat_index",
    "compat_register",
]

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/run/cima/cima.sock")
#: Records per event log page when the request does not say.
DEFAULT_PAGE = 1000
#: The largest page served; a request for more gets this many.
MAX_PAGE = 10_000
#: The largest request message read (requests are a few hundred bytes at most).
MAX_REQUEST = 16 * 1024
#: The largest credential blob, and the largest encrypted secret, ActivateCredential takes.
MAX_CREDENTIAL_FIELD = 1024
#: How long a report request waits for others to share its quote.
BATCH_WINDOW = 0.002
#: The most requests one quote serves.
MAX_BATCH = 256
#: The CC Trusted API's IMA_MEASUREMENT_EVENT.
IMA_EVENT_TYPE = 0x14
#: Event type of the agent's runtime events in the CIMA-compatible event log
#: (outside the TCG PC Client ranges: a cima record, not a firmware one).
RUNTIME_EVENT_TYPE = 0x00C1A001
#: The CC Trusted API's cc_type values.
CC_TYPE_TPM = 0
CC_TYPE_TDX = 1

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_LOGS = ("boot", "ima", "runtime")
_FORMATS = ("", "cel-json")


class ServerError(CimaError):
    """The server cannot start or serve (its socket, its group)."""


class SocketInUseError(ServerError):
    """Another agent already answers on the socket path."""


class AgentSource(Protocol):
    """What the server reads; :class:`cima.agent.engine.Engine` is one."""

    @property
    def policy(self) -> Policy: ...

    @property
    def journal(self) -> Journal: ...

    @property
    def platform(self) -> Platform: ...

    def ima_entries(self) -> Sequence[IMAEntry]: ...


@runtime_checkable
class _Endorsed(Protocol):
    """A platform with an endorsement key (:class:`cima.platform.tpm.TPMPlatform`)."""

    name: str

    def ek_public(self) -> PublicArea: ...

    def ek_certificate(self) -> x509.Certificate | None: ...

    def ak_public(self) -> PublicArea: ...

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes: ...


# -- index numbering of the CIMA-compatible service ----------------------------------------


def compat_register(platform_name: str, index: int) -> str:
    """The register a CIMA index names: CC MR index on TDX, PCR index elsewhere."""
    return cc_name(index) if platform_name == "tdx" else pcr_name(index)


def compat_index(platform_name: str, register: str) -> int:
    """The CIMA index of ``register`` (the inverse of :func:`compat_register`)."""
    if register.startswith("pcr"):
        return pcr_index(register)
    return cc_index(register)


# -- errors as gRPC statuses -------------------------------------------------------------------


class _Denied(CimaError):
    """The request names someone else."""


class _Unidentified(CimaError):
    """The kernel could not tell who the caller is."""


class _BadRequest(CimaError, ValueError):
    """A request field with a value the agent does not accept."""


class _OutOfRange(CimaError, ValueError):
    """A page that starts past the end of a log."""


class _Precondition(CimaError):
    """The node is not in a state that can serve the request (a platform without an EK)."""


def _status_of(e: BaseException) -> tuple[Status, str]:
    if isinstance(e, GRPCError):
        return e.status, e.message or ""
    if isinstance(e, _Denied):
        return Status.PERMISSION_DENIED, str(e)
    if isinstance(e, _Unidentified):
        return Status.UNAUTHENTICATED, str(e)
    if isinstance(e, _OutOfRange):
        return Status.OUT_OF_RANGE, str(e)
    if isinstance(
        e, _BadRequest | AlgorithmError | RegisterError | FreshnessError | ParseError | DecodeError
    ):
        return Status.INVALID_ARGUMENT, str(e)
    if isinstance(e, JournalError):
        return Status.FAILED_PRECONDITION, f"the runtime journal does not prove the register: {e}"
    if isinstance(e, _Precondition):
        return Status.FAILED_PRECONDITION, str(e)
    if isinstance(e, PlatformError):
        return Status.UNAVAILABLE, f"the platform failed: {e}"
    log.error("internal error serving a request", exc_info=e)
    return Status.INTERNAL, f"internal error: {type(e).__name__}"


# -- who is calling ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Identity:
    """The caller of one connection, as resolved when it was accepted."""

    caller: Caller | None
    error: str | None = None


class _CallerPeer(Peer):
    """grpclib's peer of a connection, with the caller resolved at accept time."""

    def __init__(self, transport: Any, identity: _Identity) -> None:
        super().__init__(transport)
        self.identity = identity


def _identify(transport: Any, identify: Callable[[int, int], Caller]) -> _Identity:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return _Identity(None, "the connection has no socket to read peer credentials from")
    try:
        pid, uid, _gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError as e:
        return _Identity(None, f"SO_PEERCRED failed: {e}")
    if pid <= 0:
        return _Identity(None, "the kernel gave no pid for the peer (another pid namespace?)")
    try:
        return _Identity(identify(pid, uid))
    except (CimaError, OSError, ValueError) as e:
        return _Identity(None, f"pid {pid} (uid {uid}) could not be identified: {e}")


class _CoalescingTransport(asyncio.Transport):
    """The connection's transport, with the writes of one event loop turn sent at once.

    grpclib writes a response as three HTTP/2 writes (headers, data, trailers),
    each a system call on its own; gathered, they are one.
    """

    def __init__(self, transport: Any) -> None:
        super().__init__()
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        if data and not self._transport.is_closing():
            self._transport.write(data)

    def is_closing(self) -> bool:
        return bool(self._transport.is_closing())

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


class _PeerProtocol(H2Protocol):
    """H2Protocol that resolves the peer's identity in ``connection_made``.

    Calls of the agent's methods are answered by :class:`UnaryProcessor`; what
    it does not take goes to grpclib's processing.
    """

    def __init__(self, base: Any, server: _Server) -> None:
        super().__init__(base.handler, base.config, base.h2_config)
        self._server = server

    def connection_made(self, transport: Any) -> None:
        server = self._server
        identity = _identify(transport, server.identify)
        super().connection_made(_CoalescingTransport(transport))
        peer = _CallerPeer(transport, identity)
        # grpclib builds each request's Stream.peer from the connection's get_peer().
        self.connection.get_peer = lambda: peer  # type: ignore[method-assign]
        self.processor = UnaryProcessor(
            self.handler,
            self.connection,
            methods=server.unary,
            identity=identity,
            status_of=_status_of,
            max_request=MAX_REQUEST,
            answered=server.answered,
        )


class _Server(Server):
    def __init__(
        self, handlers: Sequence[_Service], identify: Callable[[int, int], Caller]
    ) -> None:
        super().__init__(list(handlers))  # type: ignore[arg-type]
        self.identify = identify
        self.unary: dict[str, UnaryMethod] = {}
        for service in handlers:
            self.unary.update(service.unary_methods())
        #: Calls answered on the fast path, by gRPC status code.
        self.answered: dict[int, int] = {}

    def _protocol_factory(self) -> H2Protocol:
        return _PeerProtocol(super()._protocol_factory(), self)


def _identity_of(stream: Any) -> _Identity:
    peer = getattr(stream, "peer", None)
    identity = getattr(peer, "identity", None)
    if not isinstance(identity, _Identity):
        return _Identity(None, "the connection was not identified")
    return identity


M = TypeVar("M", bound=Message)


async def _receive(stream: Any, message_type: type[M]) -> M:
    """Read one request message of at most :data:`MAX_REQUEST` bytes.

    grpclib buffers a message of any declared length; the agent refuses a
    larger one from its 5-byte gRPC frame header before reading it.
    """
    raw = stream._stream  # grpclib.protocol.Stream: the HTTP/2 stream of this call
    head = await raw.recv_data(5)
    if len(head) < 5:
        raise GRPCError(Status.INVALID_ARGUMENT, "no request message")
    compressed, length = struct.unpack(">?I", head)
    if compressed:
        raise GRPCError(Status.UNIMPLEMENTED, "compressed requests are not accepted")
    if length > MAX_REQUEST:
        raise GRPCError(
            Status.INVALID_ARGUMENT, f"request message of {length} bytes, at most {MAX_REQUEST}"
        )
    data = await raw.recv_data(length)
    if len(data) != length:
        raise GRPCError(Status.INVALID_ARGUMENT, "request message cut short")
    try:
        return message_type.FromString(data)
    except DecodeError as e:
        raise GRPCError(Status.INVALID_ARGUMENT, f"malformed request message: {e}") from None


# -- what the server keeps ------------------------------------------------------------------


class _EventCache:
    """The journal's committed events, read once each (the journal only grows).

    It also remembers the register value after each event (and the start
    value), so that a quoted value is checked against every prefix of the log
    in one lookup.
    """

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._events: list[RuntimeEvent] = []
        self._lock = threading.Lock()
        self._hash = by_name(journal.algorithm).constructor()
        self._value = journal.start_value
        self._prefixes: dict[bytes, int] = {self._value: 0}

    def snapshot(self) -> list[RuntimeEvent]:
        with self._lock:
            n = len(self._journal)
            if n > len(self._events):
                new = self._journal.events(len(self._events), n - len(self._events))
                for event in new:
                    self._value = self._hash(self._value + event.digest).digest()
                    self._events.append(event)
                    self._prefixes.setdefault(self._value, len(self._events))
            return self._events[:n]

    def prefix_of(self, value: bytes) -> int | None:
        """How many events replay to ``value`` from the start value (None: no prefix does)."""
        self.snapshot()
        with self._lock:
            return self._prefixes.get(value)


@dataclass(frozen=True, slots=True)
class _Quote:
    """One hardware report, checked against the journal, as the callers it serves get it."""

    report: Report
    verification_json: str


@dataclass(frozen=True, slots=True)
class _Attested:
    """A report taken for one request, and what it binds."""

    view: View
    nonce: bytes
    user_data: bytes
    binding: bytes
    container_register: bytes | None
    quote: _Quote
    proof: InclusionProof | None

    @property
    def report(self) -> Report:
        return self.quote.report


@dataclass(slots=True)
class _Pending:
    leaf: bytes
    plain: tuple[bytes, bytes]
    future: asyncio.Future[tuple[_Quote, InclusionProof | None]]


class _Batcher:
    """Collects concurrent report requests into one quote (see the module docstring)."""

    def __init__(
        self,
        quote: Callable[[bytes, bytes], _Quote],
        executor: concurrent.futures.Executor,
        *,
        algorithm: str,
        window: float,
        max_batch: int,
        enabled: bool,
    ) -> None:
        self._quote = quote
        self._executor = executor
        self.algorithm = algorithm
        self._window = window
        self._max = max_batch
        self.enabled = enabled
        self._pending: list[_Pending] = []
        self._in_flight = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(
        self, leaf: bytes, plain: tuple[bytes, bytes]
    ) -> tuple[_Quote, InclusionProof | None]:
        loop = asyncio.get_running_loop()
        if not self.enabled:
            report = await loop.run_in_executor(self._executor, self._quote, *plain)
            return report, None
        future: asyncio.Future[tuple[_Quote, InclusionProof | None]] = loop.create_future()
        self._pending.append(_Pending(leaf, plain, future))
        if not self._in_flight:
            if len(self._pending) >= self._max:
                self._flush()
            elif self._timer is None:
                self._timer = loop.call_later(self._window, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._in_flight:
            return
        batch = [p for p in self._pending[: self._max] if not p.future.done()]
        del self._pending[: self._max]
        if not batch:
            if self._pending:
                self._flush()
            return
        self._in_flight = True
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        try:
            if len(batch) == 1:
                report = await loop.run_in_executor(self._executor, self._quote, *batch[0].plain)
                results: list[tuple[_Quote, InclusionProof | None]] = [(report, None)]
            else:
                tree = MerkleTree([p.leaf for p in batch], self.algorithm)
                report = await loop.run_in_executor(
                    self._executor, self._quote, tree.root, SCOPED_BINDING_TAG
                )
                results = [(report, tree.proof(i)) for i in range(len(batch))]
            for p, result in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(result)
        except Exception as e:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
        finally:
            self._in_flight = False
            if self._pending:
                self._flush()


def binding_algorithm(platform: Platform) -> str:
    """The hash of a platform's quotes: the batch trees use it.

    A TPM (and the software platform) signs with its AK's scheme hash; a TDX
    quote's binding convention is SHA-512, and its measurements are SHA-384:
    the tree uses SHA-384.
    """
    if platform.name == "tdx":
        return "sha384"
    ak_public = getattr(platform, "ak_public", None)
    if ak_public is not None:
        return by_id(int(ak_public().scheme_hash)).name
    return "sha256"


# -- the services -------------------------------------------------------------------------------


Handler = Callable[[_Identity, Any], Awaitable[Message | Serialized]]


class _Core:
    """State and operations shared by both services."""

    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self.source = server.source
        self.platform = server.source.platform
        journal = server.source.journal
        self.register = journal.register
        self.algorithm = journal.algorithm
        self.start_value = journal.start_value
        self.events = _EventCache(journal)
        self.attribution = IMAAttribution()
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=server.workers, thread_name_prefix="cima-agent"
        )
        # Software registers are in memory: read them inline. A TPM or TDX
        # read is I/O: a worker thread takes it off the event loop.
        self.inline_reads = self.platform.name == "software"
        self.banks = self._quote_banks()
        self.batcher = _Batcher(
            self.quote,
            self.executor,
            algorithm=binding_algorithm(self.platform),
            window=server.batch_window,
            max_batch=server.max_batch,
            enabled=server.batching,
        )
        self.boot_cel = self._boot_records()
        #: The engine's "read the IMA list now" (``Engine.refresh_ima``), where it has one.
        self.refresh_ima: Callable[[], object] | None = getattr(server.source, "refresh_ima", None)
        self.quotes = 0
        self._quote_lock = threading.Lock()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    # -- platform -----------------------------------------------------------------------------
    def _quote_banks(self) -> list[str] | None:
        try:
            params = inspect.signature(self.platform.report).parameters
        except (TypeError, ValueError):
            return None
        if "algorithms" not in params:
            return None
        banks = [self.platform.default_algorithm()]
        if self.algorithm not in banks and self.algorithm in self.platform.algorithms():
            banks.append(self.algorithm)
        return banks

    def quote(self, nonce: bytes, user_data: bytes) -> _Quote:
        """One hardware report, checked against the journal (blocking: a worker thread's)."""
        with self._quote_lock:
            self.quotes += 1
        report: Report
        if self.banks is not None:
            report = self.platform.report(  # type: ignore[call-arg]
                nonce, user_data, algorithms=self.banks
            )
        else:
            report = self.platform.report(nonce, user_data)
        self.check_quoted_runtime(report)
        return _Quote(report, json.dumps(report.verification, sort_keys=True))

    def _boot_records(self) -> list[CELRecord] | None:
        try:
            boot = self.platform.boot_log()
        except (CimaError, OSError) as e:
            log.warning("the boot event log cannot be read, none is served: %s", e)
            return None
        return None if boot is None else cel.from_measurements(boot)

    async def read(self, register: str, algorithm: str) -> bytes:
        if self.inline_reads:
            return self.platform.read(register, algorithm)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.platform.read, register, algorithm)

    async def read_bank(self, algorithm: str) -> RegisterBank:
        if self.inline_reads:
            return self.platform.read_all(algorithm)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.platform.read_all, algorithm)

    def check_register(self, register: str) -> str:
        if register not in self.platform.register_names():
            raise RegisterError(
                f"the {self.platform.name} platform has no register {register!r} (it has "
                f"{', '.join(self.platform.register_names())})"
            )
        return register

    def check_algorithm(self, algorithm: str) -> str:
        name = by_name(algorithm).name
        if name not in self.platform.algorithms():
            raise AlgorithmError(
                f"the {self.platform.name} platform has no {name} bank (it has "
                f"{', '.join(self.platform.algorithms())})"
            )
        return name

    # -- views --------------------------------------------------------------------------------
    def view(self, identity: _Identity) -> View:
        if identity.caller is None:
            raise _Unidentified(identity.error or "the caller could not be identified")
        return view_of(
            identity.caller,
            isolated=self.source.policy.isolated,
            node_view_allowed=self.server.node_view_allowed,
        )

    def proven(self) -> None:
        journal = self.source.journal
        if not journal.healthy:
            raise JournalError(f"{journal!r} is unusable; the agent must reopen it")

    def runtime_events(self, view: View) -> list[RuntimeEvent]:
        self.proven()
        return runtime_view(view, self.events.snapshot())

    def ima(self, view: View) -> list[IMAEntry | RedactedIMAEntry]:
        entries = self.source.ima_entries()
        owners = self.attribution.owners(entries)
        return ima_view(view, entries, owners, algorithms=self.platform.algorithms())

    # -- reports --------------------------------------------------------------------------------
    async def attest(self, view: View, nonce: bytes, user_data: bytes, *, batch: bool) -> _Attested:
        node_binding(nonce, user_data)  # sizes, before anything else
        self.proven()
        creg: bytes | None = None
        if view.scope == NODE:
            if is_reserved(nonce, user_data):
                raise _BadRequest(
                    "nonce and user data end with the tag reserved for container-scoped "
                    "and batched reports"
                )
            leaf = nonce + user_data
            plain = (nonce, user_data)
        else:
            creg = container_register(self.events.snapshot(), view.scope, self.algorithm)
            leaf = container_binding(creg, nonce, user_data, self.algorithm)
            plain = (leaf, SCOPED_BINDING_TAG)
        if batch:
            quote, proof = await self.batcher.submit(leaf, plain)
        else:
            loop = asyncio.get_running_loop()
            quote = await loop.run_in_executor(self.executor, self.quote, *plain)
            proof = None
        return _Attested(view, nonce, user_data, leaf, creg, quote, proof)

    def check_quoted_runtime(self, report: Report) -> None:
        """Refuse a report whose runtime register no prefix of the journal explains.

        The logs served with a report are read after it was taken, so they may
        hold more events than the quoted value covers, never fewer.
        """
        quoted = _quoted_value(report, self.register, self.algorithm)
        if quoted is None:
            return
        if self.events.prefix_of(quoted) is None:
            raise JournalError(
                f"the quoted {self.register}/{self.algorithm} ({quoted.hex()}) is not the replay "
                f"of any prefix of the journal's events"
            )

    def bundle_json(self, attested: _Attested) -> tuple[int, Callable[[], Iterator[bytes]]]:
        """The bundle's JSON as its size and a maker of its pieces (blocking).

        The IMA log is encoded from the list's compact store one record at a
        time, twice: once to count the bytes (the gRPC message says its length
        first), once as the answer is sent. No copy of the whole JSON is ever
        held, whatever the length of the list.
        """
        bundle, ima = self._bundle(attested)

        def pieces() -> Iterator[bytes]:
            return bundle.json_pieces(None if ima is None else ima())

        return sum(len(p) for p in pieces()), pieces

    def _bundle(
        self, attested: _Attested
    ) -> tuple[EvidenceBundle, Callable[[], Iterator[CELRecord]] | None]:
        """The bundle without its IMA log, and a maker of that log's records (None: no log)."""
        view = attested.view
        self.proven()
        events = runtime_view(view, self.events.snapshot())
        ima: Callable[[], Iterator[CELRecord]] | None = None
        if self.source.policy.backend == "ima":
            # The IMA log must reach at least as far as the quoted register: read
            # what the kernel appended since the engine's last poll.
            if self.refresh_ima is not None:
                self.refresh_ima()
            entries = self.source.ima_entries()  # a snapshot: later reads do not change it
            owners = self.attribution.owners(entries)
            banks = self.platform.algorithms()

            def ima() -> Iterator[CELRecord]:
                return iter_ima_records(iter_ima_view(view, entries, owners, algorithms=banks))

        bundle = EvidenceBundle(
            platform=self.platform.name,
            report=_bundle_report(attested.report),
            nonce=attested.nonce,
            user_data=attested.user_data,
            scope=view.scope,
            binding=attested.binding,
            runtime_register=self.register,
            runtime_algorithm=self.algorithm,
            runtime_start=self.start_value,
            runtime_log=tuple(e.to_cel() for e in events),
            boot_log=None if self.boot_cel is None else tuple(self.boot_cel),
            ima_log=None if ima is None else (),
            container_register=attested.container_register,
            batch=attested.proof,
            batch_root=None if attested.proof is None else attested.report.nonce,
            created=utc_now(),
            agent_version=cima.__version__,
        )
        return bundle, ima


def _quoted_value(report: Report, register: str, algorithm: str) -> bytes | None:
    if report.kind == "tdx-quote":
        from cima.evidence.tdx import TDXQuote

        value: bytes | None = TDXQuote.from_bytes(report.body).body.registers().get(register)
        return value if algorithm == "sha384" else None
    for item in report.verification.get("pcrs", ()):
        if item.get("register") == register and item.get("algorithm") == algorithm:
            return bytes.fromhex(str(item["digest"]))
    return None


def _bundle_report(report: Report) -> TPMQuoteReport | TDXQuoteReport:
    if report.kind == "tdx-quote":
        return TDXQuoteReport(report.body)
    v = report.verification
    return TPMQuoteReport(
        attest=report.body,
        signature=report.signature,
        ak_pem=str(v["ak_pem"]),
        hash_algorithm=str(v["hash_algorithm"]),
        pcrs=tuple(
            RegisterValue(str(p["register"]), str(p["algorithm"]), bytes.fromhex(str(p["digest"])))
            for p in v.get("pcrs", ())
        ),
        ek_certificate_pem=v.get("ek_certificate_pem"),
    )


def _page(total: int, start: int, count: int | None, *, page: int) -> tuple[int, int]:
    """(start, stop) of a page; a start past the end is OUT_OF_RANGE."""
    if start > total:
        raise _OutOfRange(f"start {start} is past the end of the log ({total} records)")
    want = page if count is None or count == 0 else min(count, MAX_PAGE)
    return start, min(total, start + want)


class _Service:
    """Runs one RPC: identify, read the request, compute, answer; errors become statuses."""

    #: RPC name -> the name of its handler method.
    HANDLERS: ClassVar[dict[str, str]] = {}

    def __init__(self, core: _Core) -> None:
        self.core = core

    def unary_methods(self) -> dict[str, UnaryMethod]:
        """Path -> request type and handler, for every RPC of the service."""
        out = {}
        for path, method in self.__mapping__().items():  # type: ignore[attr-defined]
            handler = getattr(self, self.HANDLERS[path.rsplit("/", 1)[1]])
            out[path] = UnaryMethod(method.request_type, handler)
        return out

    async def _serve(self, stream: Any, request_type: type[Message], handler: Handler) -> None:
        try:
            identity = _identity_of(stream)
            request = await _receive(stream, request_type)
            response = await handler(identity, request)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            status, message = _status_of(e)
            raise GRPCError(status, message) from None
        await stream.send_message(
            response if isinstance(response, Message) else response.to_message()
        )


# -- the CIMA-compatible service ----------------------------------------------------------------


class CompatService(_Service, cima_server_grpc.cimaBase):  # type: ignore[misc]
    """``cima_server_pb.cima`` (see the module docstring for its numbering)."""

    HANDLERS: ClassVar[dict[str, str]] = {
        "GetDefaultAlgorithm": "_algorithm",
        "GetMeasurementCount": "_count",
        "GetCcMeasurement": "_measurement",
        "GetCcEventlog": "_eventlog",
        "GetCcReport": "_report",
    }

    async def GetDefaultAlgorithm(self, stream: Any) -> None:
        await self._serve(stream, cima_server_pb2.GetDefaultAlgorithmRequest, self._algorithm)

    async def GetMeasurementCount(self, stream: Any) -> None:
        await self._serve(stream, cima_server_pb2.GetMeasurementCountRequest, self._count)

    async def GetCcMeasurement(self, stream: Any) -> None:
        await self._serve(stream, cima_server_pb2.GetCcMeasurementRequest, self._measurement)

    async def GetCcEventlog(self, stream: Any) -> None:
        await self._serve(stream, cima_server_pb2.GetCcEventlogRequest, self._eventlog)

    async def GetCcReport(self, stream: Any) -> None:
        await self._serve(stream, cima_server_pb2.GetCcReportRequest, self._report)

    def _view(self, identity: _Identity, container_id: str) -> View:
        view = self.core.view(identity)
        if container_id:
            caller = identity.caller
            assert caller is not None
            named = container_id.strip().lower()
            own = {caller.container_id}
            if caller.pod_uid is not None:
                own |= {caller.pod_uid.lower(), caller.pod_uid.lower().replace("-", "_")}
            if named not in own:
                raise _Denied(
                    "container_id names another container or pod: the caller is identified "
                    "by the kernel, and may only name its own"
                )
        return view

    async def _algorithm(self, identity: _Identity, request: Any) -> Message:
        self.core.view(identity)
        alg = by_name(self.core.platform.default_algorithm())
        return cima_server_pb2.GetDefaultAlgorithmResponse(algo_id=alg.alg_id)

    async def _count(self, identity: _Identity, request: Any) -> Message:
        self.core.view(identity)
        return cima_server_pb2.GetMeasurementCountResponse(
            count=self.core.platform.measurement_count()
        )

    async def _measurement(self, identity: _Identity, request: Any) -> Message:
        self._view(identity, request.container_id)
        core = self.core
        register = core.check_register(compat_register(core.platform.name, request.index))
        if request.algo_id == 0:
            algorithm = core.platform.default_algorithm()
        else:
            algorithm = core.check_algorithm(by_id(request.algo_id).name)
        value = await core.read(register, algorithm)
        return cima_server_pb2.GetCcMeasurementResponse(
            measurement=cima_server_pb2.TcgDigest(algo_id=by_name(algorithm).alg_id, hash=value)
        )

    async def _eventlog(self, identity: _Identity, request: Any) -> Message:
        view = self._view(identity, request.container_id)
        start = request.start if request.HasField("start") else 0
        count = request.count if request.HasField("count") else None
        if count == 0:
            raise _BadRequest("count must be larger than 0")
        loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(
            self.core.executor, self._tcg_records, view, start, count
        )
        return cima_server_pb2.GetCcEventlogResponse(event_logs=records)

    def _tcg_records(
        self, view: View, start: int, count: int | None
    ) -> list[cima_server_pb2.TcgEventlog]:
        core = self.core
        name = core.platform.name
        boot = core.boot_cel or []
        ima = core.ima(view) if core.source.policy.backend == "ima" else []
        runtime = core.runtime_events(view)
        total = len(boot) + len(ima) + len(runtime)
        if start > total:
            raise _OutOfRange(f"start {start} is past the end of the event log ({total} records)")
        stop = total if count is None else min(total, start + count)
        banks = core.platform.algorithms()
        out: list[cima_server_pb2.TcgEventlog] = []
        for n in range(start, stop):
            if n < len(boot):
                out.append(_tcg_boot(n, boot[n], name))
            elif n < len(boot) + len(ima):
                out.append(_tcg_ima(n, ima[n - len(boot)], name, banks))
            else:
                out.append(_tcg_runtime(n, runtime[n - len(boot) - len(ima)], name))
        return out

    async def _report(self, identity: _Identity, request: Any) -> Message:
        view = self._view(identity, request.container_id)
        nonce = _unbase64(request.nonce, "nonce") if request.HasField("nonce") else b""
        user_data = (
            _unbase64(request.user_data, "user_data") if request.HasField("user_data") else b""
        )
        attested = await self.core.attest(view, nonce, user_data, batch=False)
        report = attested.report
        if report.kind == "tdx-quote":
            return cima_server_pb2.GetCcReportResponse(cc_type=CC_TYPE_TDX, cc_report=report.body)
        body = struct.pack(">H", len(report.body)) + report.body + report.signature
        return cima_server_pb2.GetCcReportResponse(cc_type=CC_TYPE_TPM, cc_report=body)


def _unbase64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FreshnessError(f"{what} is not base64") from None


def _alg_id(name: str) -> int:
    if name.startswith("alg_0x"):
        return int(name[6:], 16)
    return by_name(name).alg_id


def _tcg_boot(n: int, record: CELRecord, platform: str) -> cima_server_pb2.TcgEventlog:
    data = record.event_data
    return cima_server_pb2.TcgEventlog(
        rec_num=n,
        imr_index=compat_index(platform, record.register),
        event_type=int(record.content["event_type"]),
        digests=[cima_server_pb2.TcgDigest(algo_id=_alg_id(a), hash=d) for a, d in record.digests],
        event_size=int(record.content.get("event_size", len(data))),
        event=data,
    )


def _ima_event(entry: IMAEntry) -> bytes:
    try:
        line = entry.to_ascii()
    except CimaError:
        return entry.template_data
    head = b"%2d %s %s " % (
        entry.pcr,
        binascii.hexlify(entry.template_hash),
        entry.template_name.encode("ascii"),
    )
    return line[len(head) :] if line.startswith(head) else line


def _tcg_ima(
    n: int, item: IMAEntry | RedactedIMAEntry, platform: str, banks: Sequence[str]
) -> cima_server_pb2.TcgEventlog:
    if isinstance(item, RedactedIMAEntry):
        digests = list(item.digests)
        event = b""
        extra = {"redacted": "true"}
    else:
        digests = [(item.template_hash_algorithm, item.template_hash)]
        for alg in banks:
            if alg != item.template_hash_algorithm:
                with contextlib.suppress(CimaError):
                    d = item.replay_digest(alg)
                    if d is not None:
                        digests.append((alg, d))
        event = _ima_event(item)
        extra = {"template_name": item.template_name}
    return cima_server_pb2.TcgEventlog(
        rec_num=n,
        imr_index=compat_index(platform, item.register),
        event_type=IMA_EVENT_TYPE,
        digests=[cima_server_pb2.TcgDigest(algo_id=by_name(a).alg_id, hash=d) for a, d in digests],
        event_size=len(event),
        event=event,
        extra_info=extra,
    )


def _tcg_runtime(n: int, event: RuntimeEvent, platform: str) -> cima_server_pb2.TcgEventlog:
    data = b"" if event.content is None else canonical(event.content)
    extra = {"content_type": "cima"}
    if event.content is None:
        extra["redacted"] = "true"
    return cima_server_pb2.TcgEventlog(
        rec_num=n,
        imr_index=compat_index(platform, event.register),
        event_type=RUNTIME_EVENT_TYPE,
        digests=[
            cima_server_pb2.TcgDigest(algo_id=by_name(event.algorithm).alg_id, hash=event.digest)
        ],
        event_size=len(data),
        event=data,
        extra_info=extra,
    )


# -- the native service -----------------------------------------------------------------------


class NativeService(_Service, agent_grpc.AgentBase):  # type: ignore[misc]
    """``cima.v1.Agent``."""

    HANDLERS: ClassVar[dict[str, str]] = {
        "Info": "_info",
        "GetMeasurement": "_measurement",
        "ListMeasurements": "_list",
        "GetEventLog": "_eventlog",
        "GetReport": "_report",
        "GetEvidence": "_evidence",
        "GetEnrollment": "_enrollment",
        "ActivateCredential": "_activate",
    }

    async def Info(self, stream: Any) -> None:
        await self._serve(stream, agent_pb2.InfoRequest, self._info)

    async def GetMeasurement(self, stream: Any) -> None:
        await self._serve(stream, agent_pb2.GetMeasurementRequest, self._measurement)

    async def ListMeasurements(self, stream: Any) -> None:
        await self._serve(stream, agent_pb2.ListMeasurementsRequest, self._list)

    async def GetEventLog(self, stream: Any) -> None:
        await self._serve(stream, agent_pb2.GetEventLogRequest, self._eventlog)

    async def GetReport(self, stream: Any) -> None:
        await self._serve(stream, agent_pb2.GetReportRequest, self._report)

    async def GetEvidence(self, stream: Any) -> None:
        await self._serve(stream, agent_pb2.GetEvidenceRequest, self._evidence)

    async def GetEnrollment(self, stream: Any) -> None:
        await self._serve(stream, agent_pb2.GetEnrollmentRequest, self._enrollment)

    async def ActivateCredential(self, stream: Any) -> None:
        await self._serve(stream, agent_pb2.ActivateCredentialRequest, self._activate)

    async def _info(self, identity: _Identity, request: Any) -> Message:
        core = self.core
        view = core.view(identity)
        caller = identity.caller
        assert caller is not None
        platform = core.platform
        return agent_pb2.InfoResponse(
            platform=platform.name,
            agent_version=cima.__version__,
            default_algorithm=platform.default_algorithm(),
            algorithms=platform.algorithms(),
            registers=platform.register_names(),
            runtime_register=core.register,
            runtime_algorithm=core.algorithm,
            scope=view.scope,
            isolated=core.source.policy.isolated,
            container_id=caller.container_id or "",
            pod_uid=caller.pod_uid or "",
            pid=caller.pid,
            uid=caller.uid,
        )

    async def _measurement(self, identity: _Identity, request: Any) -> Message:
        core = self.core
        core.view(identity)
        register = core.check_register(request.register)
        algorithm = core.check_algorithm(request.algorithm or core.platform.default_algorithm())
        value = await core.read(register, algorithm)
        return agent_pb2.GetMeasurementResponse(
            measurement=agent_pb2.Measurement(register=register, algorithm=algorithm, digest=value)
        )

    async def _list(self, identity: _Identity, request: Any) -> Message:
        core = self.core
        core.view(identity)
        banks = (
            [core.check_algorithm(request.algorithm)]
            if request.algorithm
            else core.platform.algorithms()
        )
        out: list[agent_pb2.Measurement] = []
        for alg in banks:
            bank = await core.read_bank(alg)
            out.extend(
                agent_pb2.Measurement(register=v.register, algorithm=v.algorithm, digest=v.digest)
                for v in bank
            )
        return agent_pb2.ListMeasurementsResponse(measurements=out)

    async def _eventlog(self, identity: _Identity, request: Any) -> Message:
        core = self.core
        view = core.view(identity)
        if request.log not in _LOGS:
            raise _BadRequest(f"log must be one of {', '.join(_LOGS)}, not {request.log!r}")
        if request.format not in _FORMATS:
            raise _BadRequest(f"format must be cel-json, not {request.format!r}")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            core.executor, self._page, view, request.log, request.start, request.count
        )

    def _page(self, view: View, which: str, start: int, count: int) -> Message:
        core = self.core
        records: Sequence[CELRecord]
        if which == "boot":
            boot = core.boot_cel or []
            lo, hi = _page(len(boot), start, count, page=core.server.page_size)
            records = boot[lo:hi]
            total = len(boot)
        elif which == "ima":
            entries = core.source.ima_entries() if core.source.policy.backend == "ima" else []
            total = len(entries)
            lo, hi = _page(total, start, count, page=core.server.page_size)
            owners = core.attribution.owners(entries)[lo:hi]
            items = ima_view(view, entries[lo:hi], owners, algorithms=core.platform.algorithms())
            records = ima_records(items)
        else:
            events = core.runtime_events(view)
            total = len(events)
            lo, hi = _page(total, start, count, page=core.server.page_size)
            records = [e.to_cel() for e in events[lo:hi]]
        return agent_pb2.GetEventLogResponse(
            log=which,
            format="cel-json",
            start=lo,
            count=hi - lo,
            total=total,
            records=json.dumps([r.to_dict() for r in records], separators=(",", ":")).encode(),
        )

    async def _report(self, identity: _Identity, request: Any) -> Message:
        core = self.core
        view = core.view(identity)
        attested = await core.attest(view, request.nonce, request.user_data, batch=True)
        report = attested.report
        proof = attested.proof
        batch = None
        if proof is not None:
            batch = agent_pb2.BatchProof(
                algorithm=proof.algorithm,
                leaf_index=proof.leaf_index,
                tree_size=proof.tree_size,
                path=list(proof.path),
                # A batch's quote binds the tree's root as its nonce.
                root=attested.report.nonce,
            )
        return agent_pb2.GetReportResponse(
            kind=report.kind,
            report=report.body,
            signature=report.signature,
            verification_json=attested.quote.verification_json,
            scope=view.scope,
            binding=attested.binding,
            batch=batch,
            platform=core.platform.name,
        )

    async def _evidence(self, identity: _Identity, request: Any) -> Serialized:
        core = self.core
        view = core.view(identity)
        attested = await core.attest(view, request.nonce, request.user_data, batch=True)
        loop = asyncio.get_running_loop()
        size, pieces = await loop.run_in_executor(core.executor, core.bundle_json, attested)
        # Field 1 (bundle) of GetEvidenceResponse, its pieces encoded as they are sent.
        return Serialized.field(agent_pb2.GetEvidenceResponse, 1, pieces(), size=size)

    # -- enrollment (see the module docstring) --------------------------------------------------
    def _endorsed(self, identity: _Identity, what: str) -> _Endorsed:
        """The platform, for a caller with the node view on a platform with an EK."""
        core = self.core
        view = core.view(identity)
        if view.scope != NODE:
            raise _Denied(f"{what} is for host processes with the node view, not for a container")
        if not view.full:
            raise _Denied(
                f"{what} is for host processes with the node view, which this agent "
                "does not give (node view not allowed)"
            )
        platform = core.platform
        if not isinstance(platform, _Endorsed):
            raise _Precondition(f"the {platform.name} platform has no endorsement key")
        return platform

    async def _enrollment(self, identity: _Identity, request: Any) -> Message:
        platform = self._endorsed(identity, "GetEnrollment")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.core.executor, _enrollment_of, platform)

    async def _activate(self, identity: _Identity, request: Any) -> Message:
        platform = self._endorsed(identity, "ActivateCredential")
        blob = _tpm2b_field(request.credential_blob, "credential_blob", "TPM2B_ID_OBJECT")
        secret = _tpm2b_field(
            request.encrypted_secret, "encrypted_secret", "TPM2B_ENCRYPTED_SECRET"
        )
        loop = asyncio.get_running_loop()
        credential = await loop.run_in_executor(
            self.core.executor, _activate_on, platform, blob, secret
        )
        return agent_pb2.ActivateCredentialResponse(secret=credential)


def _marshalled(area: PublicArea) -> bytes:
    """A public area as the TPM marshals it: TPM2B_PUBLIC (the TPMT_PUBLIC as received)."""
    return struct.pack(">H", len(area.raw)) + area.raw


def _enrollment_of(platform: _Endorsed) -> Message:
    """GetEnrollment's answer (blocking: the first call creates the EK and reads NV)."""
    from cryptography.hazmat.primitives import serialization

    ek = platform.ek_public()
    ak = platform.ak_public()
    cert = platform.ek_certificate()
    return agent_pb2.GetEnrollmentResponse(
        ek_public=_marshalled(ek),
        ek_certificate=b"" if cert is None else cert.public_bytes(serialization.Encoding.DER),
        ak_public=_marshalled(ak),
        ak_name=ak.name,
        platform=platform.name,
    )


def _activate_on(platform: _Endorsed, blob: bytes, secret: bytes) -> bytes:
    """ActivateCredential on the platform (blocking); a refused credential is a precondition.

    The error is turned into a status here, in the worker thread: a handler's
    coroutine does not see the exception of the first thing it awaits when that
    is answered on the fast path (:func:`cima.agent.rpc._resume`).
    """
    from cima.platform.tpm import CredentialError  # only a TPM activates credentials

    try:
        return platform.activate_credential(blob, secret)
    except CredentialError as e:
        raise _Precondition(str(e)) from None


def _tpm2b_field(value: bytes, field: str, kind: str) -> bytes:
    """A request field that must be one marshalled TPM2B (size prefix included), small."""
    if len(value) > MAX_CREDENTIAL_FIELD:
        raise _BadRequest(f"{field} is {len(value)} bytes, at most {MAX_CREDENTIAL_FIELD}")
    if len(value) < 2 or int.from_bytes(value[:2], "big") != len(value) - 2:
        raise _BadRequest(
            f"{field} is not a marshalled {kind} (a 2-byte size, then that many bytes)"
        )
    return bytes(value)


# -- the server ------------------------------------------------------------------------------


def _group_id(group: str | int | None) -> int | None:
    if group is None:
        return None
    if isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ServerError(f"socket group {group!r}: no such group") from None


def _clear_path(path: Path) -> None:
    """Make room for the socket: a stale one is removed, a live one or another file is an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerError(f"{path}: exists and is not a socket (remove it, or choose another path)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("%s: removing a stale socket (nothing answers there)", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        raise ServerError(f"{path}: cannot tell whether an agent serves there: {e}") from e
    finally:
        probe.close()
    raise SocketInUseError(f"{path}: already serving (another agent answers on this socket)")


def _bind(path: Path, mode: int, gid: int | None, backlog: int) -> tuple[socket.socket, int]:
    _clear_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as e:
        raise ServerError(f"{path.parent}: cannot create the socket directory: {e}") from e
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Mode and group are set before listen(): until then no one can connect.
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
        sock.listen(backlog)
        sock.setblocking(False)
        inode = os.stat(path).st_ino
    except OSError as e:
        sock.close()
        raise ServerError(f"{path}: cannot serve here: {e}") from e
    return sock, inode


class AgentServer:
    """The agent's gRPC services on a Unix socket (see the module docstring).

    ``source`` is the engine (or anything with its ``policy``, ``journal``,
    ``platform`` and ``ima_entries()``). :meth:`start` binds the socket and
    serves on a thread of its own; :meth:`stop` stops and removes the socket.
    ``identify`` maps the peer's pid and uid to a :class:`Caller`.
    """

    def __init__(
        self,
        source: AgentSource,
        *,
        socket_path: Path | str = DEFAULT_SOCKET,
        socket_mode: int = 0o660,
        socket_group: str | int | None = None,
        node_view_allowed: bool = True,
        batching: bool = True,
        batch_window: float = BATCH_WINDOW,
        max_batch: int = MAX_BATCH,
        page_size: int = DEFAULT_PAGE,
        workers: int = 4,
        backlog: int = 128,
        identify: Callable[[int, int], Caller] = caller_from_pid,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if not 0 < page_size <= MAX_PAGE:
            raise ValueError(f"page_size must be 1..{MAX_PAGE}")
        self.source = source
        self.socket_path = Path(socket_path)
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.node_view_allowed = node_view_allowed
        self.batching = batching
        self.batch_window = batch_window
        self.max_batch = max_batch
        self.page_size = page_size
        self.workers = workers
        self.backlog = backlog
        self.identify = identify
        self._core: _Core | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._inode: int | None = None
        self._answered: dict[int, int] = {}

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the socket and start serving; return once the socket accepts connections."""
        if self._thread is not None:
            raise ServerError("the server is already started")
        self._started.clear()
        gid = _group_id(self.socket_group)
        sock, self._inode = _bind(self.socket_path, self.socket_mode, gid, self.backlog)
        self._core = _Core(self)
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name="cima-agent-server", daemon=True
        )
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            error, self._error = self._error, None
            self._thread.join()
            self._thread = None
            self._cleanup()
            raise ServerError(f"the server did not start: {error}") from error
        log.info("serving on %s", self.socket_path)

    def _run(self, sock: socket.socket) -> None:
        try:
            asyncio.run(self._main(sock))
        except BaseException as e:  # reported to start() or logged
            if not self._started.is_set():
                self._error = e
                self._started.set()
            else:
                log.error("the server stopped on an error: %s", e, exc_info=e)

    async def _main(self, sock: socket.socket) -> None:
        assert self._core is not None
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = _Server([CompatService(self._core), NativeService(self._core)], self.identify)
        self._answered = server.answered
        await server.start(sock=sock)
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            await server.wait_closed()

    def stop(self) -> None:
        """Stop serving, finish the requests in flight, remove the socket."""
        thread = self._thread
        if thread is None:
            return
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        thread.join()
        self._thread = None
        self._cleanup()
        log.info("stopped serving on %s", self.socket_path)

    def _cleanup(self) -> None:
        if self._core is not None:
            self._core.close()
        try:
            if self._inode is not None and os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self._inode = None

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def quotes(self) -> int:
        """Hardware reports taken since start (a batch takes one for many requests)."""
        return 0 if self._core is None else self._core.quotes

    @property
    def answered(self) -> dict[str, int]:
        """Calls answered since start, by gRPC status name (OK, INVALID_ARGUMENT, ...)."""
        return {Status(code).name: n for code, n in sorted(dict(self._answered).items())}

    def __enter__(self) -> AgentServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
