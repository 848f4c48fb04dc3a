"""A small typed client for the Kubernetes CRI v1 API and containerd's Events API.

The Container Runtime Interface (kubernetes/cri-api, ``pkg/apis/runtime/v1/api.proto``,
package ``runtime.v1``) is the gRPC API kubelet drives a container runtime with:
pod sandboxes (``RunPodSandbox``, ``ListPodSandbox``), containers
(``CreateContainer``, ``ListContainers``, ``ContainerStatus``) and images. The
agent reads it to find pods and containers; the same client creates them in
the tests, the way kubelet does.

``ContainerStatus`` with ``verbose=true`` carries an ``info`` map whose
``"info"`` entry is a JSON document (containerd's CRI plugin,
``pkg/cri/server/container_status.go``): ``pid``, ``sandboxID``, the CRI
``config`` the container was created with and its OCI ``runtimeSpec``
(``process.args``, ``process.cwd``, ``process.env``, ``mounts``, ...).

containerd's Events API (``containerd.services.events.v1.Events/Subscribe``)
streams envelopes ``{timestamp, namespace, topic, event: Any}``; the topic
``/tasks/start`` carries ``containerd.events.TaskStart {container_id, pid}``.
It serves as a prompt wake-up when a container starts (CRI's own
``GetContainerEvents`` is not implemented by every runtime).

Both APIs are served on the runtime's Unix socket (``unix://`` gRPC). Every
gRPC failure is raised as :class:`CRIError` with the status code.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from cima.errors import CimaError

__all__ = [
    "DEFAULT_TIMEOUT",
    "CRIClient",
    "CRIError",
    "ContainerInfo",
    "ContainerStatus",
    "EventStream",
    "ImageInfo",
    "MountInfo",
    "PodSandboxInfo",
    "TaskEvent",
    "LABEL_CONTAINER_NAME",
    "LABEL_POD_NAME",
    "LABEL_POD_NAMESPACE",
    "LABEL_POD_UID",
]

#: Seconds an RPC may take before it fails with DEADLINE_EXCEEDED.
DEFAULT_TIMEOUT = 10.0

# Labels kubelet sets on pod sandboxes and containers (kubelet ``pkg/kubelet/types/labels.go``).
LABEL_POD_NAME = "io.kubernetes.pod.name"
LABEL_POD_NAMESPACE = "io.kubernetes.pod.namespace"
LABEL_POD_UID = "io.kubernetes.pod.uid"
LABEL_CONTAINER_NAME = "io.kubernetes.container.name"

# CRI enum values (api.proto ``PodSandboxState``, ``ContainerState``, ``MountPropagation``).
_SANDBOX_STATES = {0: "ready", 1: "notready"}
_CONTAINER_STATES = {0: "created", 1: "running", 2: "exited", 3: "unknown"}
_PROPAGATION = {0: "private", 1: "rslave", 2: "rshared"}


class CRIError(CimaError):
    """A CRI or containerd RPC failed; ``code`` is the gRPC status code name."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        self.code = code
        super().__init__(message if code is None else f"{message} ({code})")


@dataclass(frozen=True, slots=True)
class PodSandboxInfo:
    """A pod sandbox as ``ListPodSandbox`` reports it."""

    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    state: str  # "ready" | "notready"
    created_at: int  # nanoseconds
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    """A container as ``ListContainers`` reports it."""

    id: str
    sandbox_id: str
    name: str
    attempt: int
    image: str  # the image as requested (a reference)
    image_ref: str  # the runtime's image reference (an image id or a repo digest)
    state: str  # "created" | "running" | "exited" | "unknown"
    created_at: int
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MountInfo:
    """A CRI mount: a host path bound into the container."""

    container_path: str
    host_path: str
    readonly: bool
    propagation: str  # "private" | "rslave" | "rshared"


@dataclass(frozen=True, slots=True)
class ContainerStatus:
    """``ContainerStatus`` (verbose): the status and the runtime's ``info`` document."""

    id: str
    name: str
    attempt: int
    state: str
    image: str
    image_ref: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    mounts: tuple[MountInfo, ...]
    log_path: str
    started_at: int
    exit_code: int  # meaningful once the container has exited
    info: Mapping[str, Any]  # the decoded verbose "info" JSON, {} when absent

    @property
    def pid(self) -> int | None:
        """The container's init process on the host (verbose info), if running."""
        pid = self.info.get("pid")
        return pid if isinstance(pid, int) and pid > 0 else None

    @property
    def sandbox_id(self) -> str | None:
        sid = self.info.get("sandboxID")
        return sid if isinstance(sid, str) else None

    @property
    def runtime_spec(self) -> Mapping[str, Any] | None:
        """The container's OCI runtime spec (verbose info), if the runtime reports it."""
        spec = self.info.get("runtimeSpec")
        return spec if isinstance(spec, Mapping) else None


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """An image as ``ImageStatus`` reports it."""

    id: str  # the image id: the digest of its config ("sha256:<hex>")
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]  # "repository@sha256:<manifest digest>"
    size: int


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """A containerd task event (``/tasks/start``, ``/tasks/exit``, ...)."""

    topic: str
    namespace: str
    container_id: str
    pid: int | None


def _target(socket: Path | str) -> str:
    s = str(socket)
    return s if s.startswith("unix:") else f"unix://{Path(s).absolute()}"


def _rpc_error(what: str, e: grpc.RpcError) -> CRIError:
    code = e.code() if isinstance(e, grpc.Call) else None
    details = e.details() if isinstance(e, grpc.Call) else None
    return CRIError(f"{what}: {details or e}", code=code.name if code is not None else None)


def _sandbox(item: Any) -> PodSandboxInfo:
    md = item.metadata
    return PodSandboxInfo(
        id=item.id,
        name=md.name,
        namespace=md.namespace,
        uid=md.uid,
        attempt=md.attempt,
        state=_SANDBOX_STATES.get(item.state, "unknown"),
        created_at=item.created_at,
        labels=dict(item.labels),
        annotations=dict(item.annotations),
    )


def _container(item: Any) -> ContainerInfo:
    return ContainerInfo(
        id=item.id,
        sandbox_id=item.pod_sandbox_id,
        name=item.metadata.name,
        attempt=item.metadata.attempt,
        image=item.image.image,
        image_ref=item.image_ref,
        state=_CONTAINER_STATES.get(item.state, "unknown"),
        created_at=item.created_at,
        labels=dict(item.labels),
        annotations=dict(item.annotations),
    )


def _decode_info(info: Mapping[str, str]) -> dict[str, Any]:
    raw = info.get("info")
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise CRIError(f"ContainerStatus info is not JSON: {e}") from e
    return doc if isinstance(doc, dict) else {}


class CRIClient:
    """The CRI v1 runtime and image services on a Unix socket (containerd, CRI-O).

    The channel is opened lazily and reconnects by itself; :meth:`close` ends it.
    """

    def __init__(self, socket: Path | str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket = socket
        self.timeout = timeout
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._runtime: Any = None
        self._images: Any = None

    def __enter__(self) -> CRIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._runtime = self._images = None

    def _stubs(self) -> tuple[Any, Any]:
        with self._lock:
            if self._channel is None:
                from cima._proto.cri import api_pb2_grpc

                self._channel = grpc.insecure_channel(_target(self.socket))
                self._runtime = api_pb2_grpc.RuntimeServiceStub(self._channel)
                self._images = api_pb2_grpc.ImageServiceStub(self._channel)
            return self._runtime, self._images

    def _call(self, service: str, method: str, request: Any, timeout: float | None = None) -> Any:
        runtime, images = self._stubs()
        stub = runtime if service == "runtime" else images
        try:
            return getattr(stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise _rpc_error(method, e) from e

    @staticmethod
    def _pb() -> Any:
        from cima._proto.cri import api_pb2

        return api_pb2

    # -- reading --------------------------------------------------------------------------------
    def version(self) -> dict[str, str]:
        """``Version``: runtime name and version, and the CRI API version."""
        r = self._call("runtime", "Version", self._pb().VersionRequest(version="v1"))
        return {
            "runtime_name": r.runtime_name,
            "runtime_version": r.runtime_version,
            "runtime_api_version": r.runtime_api_version,
        }

    def list_pod_sandboxes(self, *, ready_only: bool = False) -> list[PodSandboxInfo]:
        pb = self._pb()
        flt = pb.PodSandboxFilter()
        if ready_only:
            flt.state.state = pb.SANDBOX_READY
        r = self._call("runtime", "ListPodSandbox", pb.ListPodSandboxRequest(filter=flt))
        return [_sandbox(item) for item in r.items]

    def list_containers(
        self, *, running_only: bool = False, sandbox_id: str | None = None
    ) -> list[ContainerInfo]:
        pb = self._pb()
        flt = pb.ContainerFilter()
        if running_only:
            flt.state.state = pb.CONTAINER_RUNNING
        if sandbox_id:
            flt.pod_sandbox_id = sandbox_id
        r = self._call("runtime", "ListContainers", pb.ListContainersRequest(filter=flt))
        return [_container(c) for c in r.containers]

    def container_status(self, container_id: str, *, verbose: bool = True) -> ContainerStatus:
        pb = self._pb()
        r = self._call(
            "runtime",
            "ContainerStatus",
            pb.ContainerStatusRequest(container_id=container_id, verbose=verbose),
        )
        s = r.status
        return ContainerStatus(
            id=s.id,
            name=s.metadata.name,
            attempt=s.metadata.attempt,
            state=_CONTAINER_STATES.get(s.state, "unknown"),
            image=s.image.image,
            image_ref=s.image_ref,
            labels=dict(s.labels),
            annotations=dict(s.annotations),
            mounts=tuple(
                MountInfo(
                    m.container_path,
                    m.host_path,
                    m.readonly,
                    _PROPAGATION.get(m.propagation, "private"),
                )
                for m in s.mounts
            ),
            log_path=s.log_path,
            started_at=s.started_at,
            exit_code=s.exit_code,
            info=_decode_info(r.info),
        )

    def image_status(self, image: str) -> ImageInfo | None:
        """``ImageStatus`` of an image reference or id; None when the runtime lacks it."""
        pb = self._pb()
        r = self._call(
            "image", "ImageStatus", pb.ImageStatusRequest(image=pb.ImageSpec(image=image))
        )
        if not r.HasField("image"):
            return None
        i = r.image
        return ImageInfo(i.id, tuple(i.repo_tags), tuple(i.repo_digests), i.size)

    # -- lifecycle (what kubelet does) --------------------------------------------------------
    def run_pod_sandbox(self, config: Any, *, runtime_handler: str = "") -> str:
        """``RunPodSandbox`` with a ``runtime.v1.PodSandboxConfig``; returns the sandbox id."""
        pb = self._pb()
        r = self._call(
            "runtime",
            "RunPodSandbox",
            pb.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler),
            timeout=max(self.timeout, 60.0),
        )
        return str(r.pod_sandbox_id)

    def stop_pod_sandbox(self, sandbox_id: str) -> None:
        pb = self._pb()
        self._call(
            "runtime",
            "StopPodSandbox",
            pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id),
            timeout=max(self.timeout, 60.0),
        )

    def remove_pod_sandbox(self, sandbox_id: str) -> None:
        pb = self._pb()
        self._call(
            "runtime",
            "RemovePodSandbox",
            pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
            timeout=max(self.timeout, 60.0),
        )

    def create_container(self, sandbox_id: str, config: Any, sandbox_config: Any) -> str:
        """``CreateContainer`` with a ``runtime.v1.ContainerConfig``; returns the container id."""
        pb = self._pb()
        r = self._call(
            "runtime",
            "CreateContainer",
            pb.CreateContainerRequest(
                pod_sandbox_id=sandbox_id, config=config, sandbox_config=sandbox_config
            ),
            timeout=max(self.timeout, 60.0),
        )
        return str(r.container_id)

    def start_container(self, container_id: str) -> None:
        pb = self._pb()
        self._call(
            "runtime",
            "StartContainer",
            pb.StartContainerRequest(container_id=container_id),
            timeout=max(self.timeout, 60.0),
        )

    def stop_container(self, container_id: str, *, timeout: int = 0) -> None:
        """``StopContainer``: SIGTERM, then SIGKILL after ``timeout`` seconds (0: at once)."""
        pb = self._pb()
        self._call(
            "runtime",
            "StopContainer",
            pb.StopContainerRequest(container_id=container_id, timeout=timeout),
            timeout=self.timeout + timeout,
        )

    def remove_container(self, container_id: str) -> None:
        pb = self._pb()
        self._call(
            "runtime", "RemoveContainer", pb.RemoveContainerRequest(container_id=container_id)
        )


class EventStream:
    """containerd's event stream (``Events/Subscribe``), as :class:`TaskEvent` values.

    ``filters`` are containerd filter expressions (``topic=="/tasks/start"``,
    ``namespace==k8s.io``); an event matching any one is delivered. Iterating
    blocks until an event arrives; :meth:`cancel` (from another thread) ends
    the iteration.
    """

    def __init__(
        self,
        socket: Path | str,
        *,
        filters: Sequence[str] = ('topic~="/tasks/"',),
    ) -> None:
        self.socket = socket
        self.filters = tuple(filters)
        self._channel: grpc.Channel | None = None
        self._call: Any = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()
        call, channel = self._call, self._channel
        if call is not None:
            call.cancel()
        if channel is not None:
            channel.close()

    def __iter__(self) -> Iterator[TaskEvent]:
        from cima._proto.containerd import events_pb2, events_pb2_grpc, task_pb2

        if self._cancelled.is_set():
            return
        self._channel = grpc.insecure_channel(_target(self.socket))
        stub = events_pb2_grpc.EventsStub(self._channel)
        self._call = stub.Subscribe(events_pb2.SubscribeRequest(filters=list(self.filters)))
        kinds: dict[str, Any] = {
            "/tasks/start": task_pb2.TaskStart,
            "/tasks/exit": task_pb2.TaskExit,
            "/tasks/create": task_pb2.TaskCreate,
            "/tasks/delete": task_pb2.TaskDelete,
        }
        try:
            for envelope in self._call:
                kind = kinds.get(envelope.topic)
                container_id, pid = "", None
                # containerd's type URLs have no "host/" part ("containerd.events.TaskStart"),
                # which Any.Is() and Any.Unpack() refuse: compare the name and decode here.
                type_name = envelope.event.type_url.rsplit("/", 1)[-1]
                if kind is not None and type_name == kind.DESCRIPTOR.full_name:
                    msg = kind()
                    try:
                        msg.ParseFromString(envelope.event.value)
                    except DecodeError:
                        pass
                    else:
                        container_id = msg.container_id
                        pid = int(msg.pid) or None
                yield TaskEvent(envelope.topic, envelope.namespace, container_id, pid)
        except grpc.RpcError as e:
            if self._cancelled.is_set():
                return
            raise _rpc_error("Events/Subscribe", e) from e
        finally:
            if self._channel is not None:
                self._channel.close()
