"""The workload SDK: ask the node's cima agent for measurements, logs, reports and evidence.

A workload (a container with the agent's socket mounted, or a host process)
talks to the agent over its Unix socket (default ``/run/cima/cima.sock``, or
``$CIMA_SOCKET``). The method names are those of the CC Trusted API::

    from cima.client import CimaClient

    with CimaClient() as agent:
        alg = agent.get_default_algorithm()                  # HashAlgorithm
        value = agent.get_cc_measurement("pcr13", "sha384")  # RegisterValue
        events = agent.get_cc_eventlog()                     # list[CELRecord]
        bank = agent.replay_cc_eventlog(events)              # RegisterBank
        report = agent.get_cc_report(nonce, user_data)       # AgentReport
        bundle = agent.get_evidence(nonce, user_data)        # EvidenceBundle

On a TPM, a host process (the node view) enrolls the node with a verifier: the
verifier trusts the attestation key through the endorsement key's certificate, and
makes a credential (TPM2_MakeCredential) for the AK's name, encrypted to the EK, whose
secret only this TPM recovers::

        enrollment = agent.get_enrollment()                  # Enrollment
        secret = agent.activate_credential(blob, encrypted_secret)

The agent decides what the caller may see from the kernel's account of who is
connecting, never from anything the client sends: a container gets its own
view (other containers' events redacted to their digests). Registers are named
(``pcr13``, ``rtmr3``); an integer register is read as the CC Trusted API's
index (on TDX 0 = mrtd, 1..4 = rtmr0..3; on a TPM the PCR index).

The client is synchronous and thread-safe (one gRPC channel, grpcio). Every
failure the agent reports is an :class:`AgentError` carrying the gRPC status
name (``INVALID_ARGUMENT``, ``PERMISSION_DENIED``, ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from cima.digests import HashAlgorithm, by_id, by_name
from cima.errors import CimaError, ParseError
from cima.eventlog import cel
from cima.eventlog.cel import CELRecord
from cima.eventlog.event import Measurement
from cima.eventlog.replay import replay
from cima.evidence.batch import InclusionProof
from cima.evidence.bundle import EvidenceBundle
from cima.evidence.reportdata import SCOPED_BINDING_TAG
from cima.registers import RegisterBank, RegisterValue, cc_name, pcr_name

if TYPE_CHECKING:
    from cima.evidence.tpm import PublicArea

__all__ = [
    "DEFAULT_SOCKET",
    "LOGS",
    "AgentError",
    "AgentReport",
    "CimaClient",
    "Enrollment",
    "EventLogPage",
    "default_socket",
]

DEFAULT_SOCKET = Path("/run/cima/cima.sock")
SOCKET_ENV = "CIMA_SOCKET"
#: The logs the agent serves, in the order :meth:`CimaClient.get_cc_eventlog` joins them.
LOGS = ("boot", "ima", "runtime")
#: Responses can be large (an evidence bundle with a long IMA log).
MAX_RESPONSE = 1024 * 1024 * 1024
DEFAULT_TIMEOUT = 60.0


def default_socket() -> Path:
    """``$CIMA_SOCKET``, else ``/run/cima/cima.sock``."""
    env = os.environ.get(SOCKET_ENV, "").strip()
    return Path(env) if env else DEFAULT_SOCKET


class AgentError(CimaError):
    """The agent refused or failed a request; ``code`` is the gRPC status name."""

    def __init__(self, code: str, details: str, *, method: str) -> None:
        self.code = code
        self.details = details
        self.method = method
        super().__init__(f"{method}: {code}: {details}")


@dataclass(frozen=True, slots=True)
class AgentReport:
    """A signed report from the agent and how it binds the request.

    ``kind`` is ``tpm-quote`` (``body`` the TPMS_ATTEST, ``signature`` the
    TPMT_SIGNATURE) or ``tdx-quote`` (``body`` the quote). ``binding`` is what
    the request binds (DESIGN.md section 4); with ``batch`` the report binds
    the batch's root, which ``batch.root_from(binding)`` gives, else the
    binding itself. :attr:`report_nonce` and :attr:`report_user_data` are what
    the report binds: the binding (node scope: the nonce and user data
    concatenated, with no user data) or, for a container scope or a batch, the
    binding or the root with :data:`~cima.evidence.reportdata.SCOPED_BINDING_TAG`.
    """

    platform: str
    kind: str
    body: bytes
    signature: bytes
    verification: dict[str, Any]
    scope: str
    binding: bytes
    batch: InclusionProof | None = None

    @property
    def report_nonce(self) -> bytes:
        return self.binding if self.batch is None else self.batch.root_from(self.binding)

    @property
    def report_user_data(self) -> bytes:
        if self.batch is None and self.scope == "node":
            return b""
        return SCOPED_BINDING_TAG


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What a verifier enrolls a TPM node with (the agent's GetEnrollment).

    ``ek_public`` and ``ak_public`` are TPM2B_PUBLIC as the TPM marshals them,
    ``ak_name`` the AK's TPM name (what a credential is made for),
    ``ek_certificate`` the EK certificate in DER (None when the TPM has none).
    """

    platform: str
    ek_public: bytes
    ek_certificate: bytes | None
    ak_public: bytes
    ak_name: bytes

    @property
    def ek(self) -> PublicArea:
        """The EK's public area, decoded."""
        from cima.evidence.tpm import PublicArea

        return PublicArea.from_bytes(self.ek_public)

    @property
    def ak(self) -> PublicArea:
        """The AK's public area, decoded."""
        from cima.evidence.tpm import PublicArea

        return PublicArea.from_bytes(self.ak_public)


@dataclass(frozen=True, slots=True)
class EventLogPage:
    """One page of one of the agent's logs."""

    log: str
    start: int
    total: int
    records: list[CELRecord] = field(default_factory=list)

    @property
    def next_start(self) -> int:
        return self.start + len(self.records)

    @property
    def done(self) -> bool:
        return self.next_start >= self.total


class CimaClient:
    """A connection to the cima agent's socket (see the module docstring)."""

    def __init__(
        self, socket_path: Path | str | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        from cima._proto.cima import agent_pb2, agent_pb2_grpc, cima_server_pb2_grpc

        self.socket_path = Path(socket_path) if socket_path is not None else default_socket()
        self.timeout = timeout
        self._pb = agent_pb2
        self._channel = grpc.insecure_channel(
            f"unix:{self.socket_path}",
            options=[
                ("grpc.max_receive_message_length", MAX_RESPONSE),
                ("grpc.default_authority", "localhost"),
                # A connection of its own: the agent identifies the caller per
                # connection, when it accepts it.
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        self._agent = agent_pb2_grpc.AgentStub(self._channel)
        self._compat = cima_server_pb2_grpc.cimaStub(self._channel)
        self._info: dict[str, Any] | None = None

    # -- plumbing -----------------------------------------------------------------------------
    def _call(self, method: str, stub: Any, request: Any) -> Any:
        try:
            return getattr(stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            name = code.name if code is not None else "UNKNOWN"
            details = e.details() if hasattr(e, "details") else str(e)
            if name == "UNAVAILABLE" and not self.socket_path.exists():
                details = f"no agent socket at {self.socket_path}"
            raise AgentError(name, str(details or ""), method=method) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CimaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the agent is --------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The platform, the runtime register, and the caller's scope as the agent sees it."""
        r = self._call("Info", self._agent, self._pb.InfoRequest())
        info = {
            "platform": r.platform,
            "agent_version": r.agent_version,
            "default_algorithm": r.default_algorithm,
            "algorithms": list(r.algorithms),
            "registers": list(r.registers),
            "runtime_register": r.runtime_register,
            "runtime_algorithm": r.runtime_algorithm,
            "scope": r.scope,
            "isolated": r.isolated,
            "container_id": r.container_id or None,
            "pod_uid": r.pod_uid or None,
            "pid": r.pid,
            "uid": r.uid,
        }
        self._info = info
        return info

    def _platform(self) -> str:
        info = self._info if self._info is not None else self.info()
        return str(info["platform"])

    # -- the CC Trusted API ---------------------------------------------------------------------
    def get_default_algorithm(self) -> HashAlgorithm:
        """The platform's main bank (``sha384`` on TDX, the TPM's first PCR bank)."""
        from cima._proto.cima import cima_server_pb2

        r = self._call(
            "GetDefaultAlgorithm", self._compat, cima_server_pb2.GetDefaultAlgorithmRequest()
        )
        return by_id(int(r.algo_id))

    def get_measurement_count(self) -> int:
        """How many measurement registers the platform has."""
        from cima._proto.cima import cima_server_pb2

        r = self._call(
            "GetMeasurementCount", self._compat, cima_server_pb2.GetMeasurementCountRequest()
        )
        return int(r.count)

    def get_cc_measurement(
        self, register: str | int, algorithm: str | int | None = None
    ) -> RegisterValue:
        """One register's value; ``register`` a name or a CC Trusted API index."""
        if isinstance(register, int):
            name = cc_name(register) if self._platform() == "tdx" else pcr_name(register)
        else:
            name = register
        if isinstance(algorithm, int):
            algorithm = by_id(algorithm).name
        request = self._pb.GetMeasurementRequest(register=name, algorithm=algorithm or "")
        r = self._call("GetMeasurement", self._agent, request).measurement
        return RegisterValue(r.register, r.algorithm, bytes(r.digest))

    def list_measurements(self, algorithm: str | None = None) -> list[RegisterValue]:
        """Every register of one bank (every bank by default)."""
        request = self._pb.ListMeasurementsRequest(algorithm=algorithm or "")
        r = self._call("ListMeasurements", self._agent, request)
        return [RegisterValue(m.register, m.algorithm, bytes(m.digest)) for m in r.measurements]

    def get_eventlog_page(self, log: str, start: int = 0, count: int = 0) -> EventLogPage:
        """One page of ``log`` (``boot``, ``ima`` or ``runtime``); ``count`` 0: the agent's page."""
        request = self._pb.GetEventLogRequest(log=log, start=start, count=count, format="cel-json")
        r = self._call("GetEventLog", self._agent, request)
        records = cel.from_json(bytes(r.records), source=f"agent {log} log") if r.records else []
        return EventLogPage(r.log, int(r.start), int(r.total), records)

    def get_eventlog(self, log: str, start: int = 0, count: int | None = None) -> list[CELRecord]:
        """Records ``start`` .. ``start + count`` (to the end by default) of one log."""
        out: list[CELRecord] = []
        while count is None or len(out) < count:
            want = 0 if count is None else count - len(out)
            page = self.get_eventlog_page(log, start + len(out), want)
            out.extend(page.records)
            if page.done or not page.records:
                break
        return out

    def get_cc_eventlog(self, start: int = 0, count: int | None = None) -> list[CELRecord]:
        """The caller's view of the boot log, then the IMA list, then the runtime log.

        ``start`` and ``count`` number the records of the three logs joined.
        """
        out: list[CELRecord] = []
        skip = start
        for log in LOGS:
            if count is not None and len(out) >= count:
                break
            first = self.get_eventlog_page(log, 0, 1)
            if skip >= first.total:
                skip -= first.total
                continue
            want = None if count is None else count - len(out)
            out.extend(self.get_eventlog(log, skip, want))
            skip = 0
        return out

    @staticmethod
    def replay_cc_eventlog(
        events: Iterable[Measurement], algorithms: Sequence[str] | None = None
    ) -> RegisterBank:
        """Replay event log records into registers.

        By default into every bank any record carries a digest for: an IMA
        record, which logs one template hash, extends each of those banks with
        its template data hashed by the bank's algorithm, as Linux does.
        """
        records = list(events)
        if algorithms is None:
            algorithms = sorted({a for r in records for a in r.algorithms()})
        return replay(records, algorithms=algorithms)

    def get_cc_report(self, nonce: bytes = b"", user_data: bytes = b"") -> AgentReport:
        """A report bound to ``nonce`` and ``user_data`` (in a container, to its register too)."""
        request = self._pb.GetReportRequest(nonce=nonce, user_data=user_data)
        r = self._call("GetReport", self._agent, request)
        batch = None
        if r.HasField("batch"):
            try:
                batch = InclusionProof(
                    r.batch.algorithm,
                    int(r.batch.leaf_index),
                    int(r.batch.tree_size),
                    tuple(bytes(p) for p in r.batch.path),
                )
            except ValueError as e:
                raise ParseError(f"the agent's batch proof is malformed: {e}") from None
        try:
            verification = json.loads(r.verification_json) if r.verification_json else {}
        except ValueError as e:
            raise ParseError(f"the agent's verification data is not JSON: {e}") from None
        return AgentReport(
            platform=r.platform,
            kind=r.kind,
            body=bytes(r.report),
            signature=bytes(r.signature),
            verification=verification,
            scope=r.scope,
            binding=bytes(r.binding),
            batch=batch,
        )

    def get_evidence(self, nonce: bytes = b"", user_data: bytes = b"") -> EvidenceBundle:
        """A whole evidence bundle: the report and the logs in the caller's view."""
        request = self._pb.GetEvidenceRequest(nonce=nonce, user_data=user_data)
        r = self._call("GetEvidence", self._agent, request)
        return EvidenceBundle.from_json(bytes(r.bundle), source="the agent's evidence bundle")

    def get_evidence_json(self, nonce: bytes = b"", user_data: bytes = b"") -> bytes:
        """The evidence bundle exactly as the agent sent it (JSON bytes)."""
        request = self._pb.GetEvidenceRequest(nonce=nonce, user_data=user_data)
        return bytes(self._call("GetEvidence", self._agent, request).bundle)

    # -- enrollment (a TPM node, host processes only) -------------------------------------------
    def get_enrollment(self) -> Enrollment:
        """The TPM's endorsement key and certificate, and the attestation key and its name."""
        r = self._call("GetEnrollment", self._agent, self._pb.GetEnrollmentRequest())
        return Enrollment(
            platform=r.platform,
            ek_public=bytes(r.ek_public),
            ek_certificate=bytes(r.ek_certificate) or None,
            ak_public=bytes(r.ak_public),
            ak_name=bytes(r.ak_name),
        )

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """The secret of a credential made for the AK's name and encrypted to the EK.

        ``credential_blob`` (TPM2B_ID_OBJECT) and ``encrypted_secret``
        (TPM2B_ENCRYPTED_SECRET) are TPM2_MakeCredential's outputs, marshalled with
        their size prefix. A credential this TPM does not activate is an
        :class:`AgentError` with code ``FAILED_PRECONDITION``.
        """
        request = self._pb.ActivateCredentialRequest(
            credential_blob=credential_blob, encrypted_secret=encrypted_secret
        )
        return bytes(self._call("ActivateCredential", self._agent, request).secret)


def algorithm_name(value: str | int) -> str:
    """A bank's name from a name or a TPM_ALG_ID."""
    return by_id(value).name if isinstance(value, int) else by_name(value).name


def registers_of(values: Sequence[RegisterValue]) -> dict[str, dict[str, str]]:
    """``{algorithm: {register: hex}}``, for display."""
    out: dict[str, dict[str, str]] = {}
    for v in values:
        out.setdefault(v.algorithm, {})[v.register] = v.digest.hex()
    return out
