"""Every container on the node (``measure.container``): CRI, runc state, cgroups.

Three sources, read in this order each round (so that a container that
starts during the round is attributed to the most precise source):

1. cgroups: every process's ``/proc/<pid>/cgroup`` names its container
   (:mod:`cima.agent.identity`); this finds containers of runtimes the agent
   has no API for (Docker, CRI-O without a socket, a second containerd).
2. runc's state directories (``<root>/<id>/state.json``, runc
   ``libcontainer/container_linux.go``): containers started with ``runc run``
   directly, with the OCI spec (``config.json``) of their bundle.
3. The CRI runtime (containerd's CRI plugin): ``ListContainers`` and, for each
   running container, ``ContainerStatus`` with ``verbose`` for the OCI runtime
   spec it runs with (once: a running container's spec does not change);
   ``ListPodSandbox`` for its pod.

A container seen by several sources is reported once, by the most precise:
CRI, then runc, then cgroups. While a configured CRI runtime does not answer,
containers it made (runc state labelled ``io.kubernetes.cri.container-type``)
and containers seen only in cgroups are not reported: they wait for the
runtime, rather than be measured twice with different data. Pod sandboxes
(pause containers) are pods, not containers: they are left to
:mod:`cima.agent.collectors.kubernetes`.

Each running container is one observation: kind ``container``, scope
``container:<id>``, subject the id, key ``container:<id>`` (a restarted
container has a new id and is a new observation), and data:

``name``          CRI container name; the runc id otherwise
``image``         the image reference the container was created from (CRI), else None
``image_id``      the image id: the digest of the image config (``sha256:<hex>``), or None
``image_digest``  the manifest digest (from a repo digest ``name@sha256:<hex>``), or None
                  when the runtime knows none (an image imported, not pulled)
``pod``           ``{"name", "namespace", "uid"}`` of its pod (name and namespace None when
                  only the cgroup names the pod), or None
``args``          the process arguments (OCI ``process.args``; ``/proc/<pid>/cmdline`` for
                  containers found only through cgroups)
``cwd``           the working directory (OCI ``process.cwd``), or None
``mounts``        host paths bound in: ``{"destination", "source", "readonly",
                  "propagation"}``; CRI's requested mounts, or the OCI spec's bind mounts
``env_names``     the names of the environment variables, in the spec's order
``env``           ``{name: value}``, only with ``withEnvValues`` (values may be secrets)
``runtime``       ``"cri"``, ``"runc"`` or ``"cgroup"``
``bundle``, ``spec_digest``  (runc only) the bundle directory and ``"alg:hex"`` of its
                  ``config.json`` as read

Environment values never enter the data without ``withEnvValues``: the CRI
verbose info also carries them (in its ``config``) and is not copied.

:meth:`ContainerCollector.watch` subscribes to containerd's events
(``/tasks/start``) and calls back at once, so the engine can poll without
waiting for its interval; it is a best-effort wake-up, polling stays the truth.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cima.agent.cri import (
    LABEL_POD_NAME,
    LABEL_POD_NAMESPACE,
    LABEL_POD_UID,
    ContainerStatus,
    CRIClient,
    CRIError,
    EventStream,
    ImageInfo,
    PodSandboxInfo,
    TaskEvent,
)
from cima.agent.engine import Observation
from cima.agent.events import container_scope
from cima.agent.identity import (
    IdentityError,
    container_id_from_path,
    parse_cgroup,
    pod_uid_from_path,
)
from cima.agent.policy import ContainerPolicy, Policy
from cima.digests import by_name

__all__ = ["MAX_SPEC_SIZE", "ContainerCollector", "oci_bind_mounts"]

log = logging.getLogger(__name__)

#: An OCI config.json or runc state.json larger than this is not read.
MAX_SPEC_SIZE = 16 * 1024 * 1024
_MAX_PROC_FILE = 1 << 20
#: How many image references' ids and digests are remembered.
_IMAGE_CACHE = 1024
# containerd's CRI plugin annotates what it makes; runc keeps annotations as labels.
_CRI_TYPE_LABEL = "io.kubernetes.cri.container-type="
_CRI_SANDBOX_TYPE = _CRI_TYPE_LABEL + "sandbox"


def _read_limited(path: Path, limit: int) -> bytes | None:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return None
    return None if len(data) > limit else data


def _split_nul(raw: bytes) -> list[str]:
    parts = raw.split(b"\x00")
    if parts and parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def _env_names(env: Iterable[str]) -> list[str]:
    return [e.split("=", 1)[0] for e in env]


def _env_values(env: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for e in env:
        name, _, value = e.partition("=")
        out[name] = value
    return out


def _str_list(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def oci_bind_mounts(mounts: object) -> list[dict[str, Any]]:
    """The bind mounts of an OCI spec's ``mounts`` (host paths), in the shape of CRI mounts."""
    out: list[dict[str, Any]] = []
    if not isinstance(mounts, list):
        return out
    for m in mounts:
        if not isinstance(m, Mapping):
            continue
        options = _str_list(m.get("options"))
        if m.get("type") != "bind" and "bind" not in options and "rbind" not in options:
            continue
        propagation = "private"
        for o in options:
            if o in {"slave", "rslave"}:
                propagation = "rslave"
            elif o in {"shared", "rshared"}:
                propagation = "rshared"
        out.append(
            {
                "destination": str(m.get("destination", "")),
                "source": str(m.get("source", "")),
                "readonly": "ro" in options,
                "propagation": propagation,
            }
        )
    return out


def _digest_of_ref(ref: str) -> str | None:
    _, at, digest = ref.partition("@")
    return digest if at and ":" in digest else None


class ContainerCollector:
    """Observations of every running container (see the module docstring)."""

    name = "containers"

    def __init__(
        self,
        container_policy: ContainerPolicy | None,
        *,
        cri_socket: Path | None,
        runc_roots: Sequence[Path] = (),
        proc_root: Path = Path("/proc"),
        algorithm: str,
        discover_cgroups: bool = True,
        cri: CRIClient | None = None,
    ) -> None:
        self._policy = container_policy
        self.cri_socket = cri_socket
        self.runc_roots = tuple(Path(r) for r in runc_roots)
        self.proc_root = Path(proc_root)
        self._alg = by_name(algorithm)
        self.discover_cgroups = discover_cgroups
        self._cri = cri if cri is not None else (CRIClient(cri_socket) if cri_socket else None)
        self._images: dict[str, ImageInfo | None] = {}
        # A running container's spec, image and pod do not change: its data is kept by id
        # while it runs (and dropped on a policy change, which may change what is shown).
        self._cri_seen: dict[str, dict[str, Any]] = {}
        self.last_error: str | None = None
        """Why the CRI runtime could not be read in the last round (None when it could)."""

    # -- policy ---------------------------------------------------------------------------------
    def update_policy(self, policy: Policy) -> None:
        """Follow a reloaded policy (its ``measure.container`` section)."""
        self._policy = policy.measure.container
        self._cri_seen.clear()

    @property
    def with_env_values(self) -> bool:
        return bool(self._policy and self._policy.with_env_values)

    def close(self) -> None:
        if self._cri is not None:
            self._cri.close()

    # -- the collector --------------------------------------------------------------------------
    def collect(self) -> list[Observation]:
        """One observation per running container (CRI, then runc, then cgroups)."""
        if self._policy is None:
            return []
        by_cgroup = self._scan_cgroups() if self.discover_cgroups else {}
        runc = self._runc_containers()
        found: dict[str, dict[str, Any]] = {}
        skip: set[str] = set()
        cri_ok = True
        if self._cri is not None:
            try:
                cri_found, sandboxes = self._cri_containers()
            except CRIError as e:
                if self.last_error is None:
                    log.warning("the CRI runtime at %s cannot be read: %s", self.cri_socket, e)
                self.last_error = str(e)
                cri_ok = False
            else:
                if self.last_error is not None:
                    log.info("the CRI runtime at %s answers again", self.cri_socket)
                self.last_error = None
                found.update(cri_found)
                skip.update(sandboxes)
        for cid, (data, cri_managed) in runc.items():
            # A container the CRI runtime made is the runtime's to report, even while it
            # does not answer (it is measured, as "cri", when it does).
            if cid not in found and cid not in skip and not (cri_managed and self._cri):
                found[cid] = data
        if cri_ok:
            # Without the CRI runtime's answer, a container seen only in its cgroup may be
            # one of CRI's: wait for the runtime rather than measure it twice.
            for cid, (pid, pod_uid) in by_cgroup.items():
                if cid not in found and cid not in skip:
                    seen = self._cgroup_container(cid, pid, pod_uid)
                    if seen is not None:
                        found[cid] = seen
        return [
            Observation("container", container_scope(cid), cid, data, f"container:{cid}")
            for cid, data in sorted(found.items())
        ]

    # -- CRI -------------------------------------------------------------------------------------
    def _image(self, ref: str) -> ImageInfo | None:
        if ref in self._images:
            return self._images[ref]
        assert self._cri is not None
        try:
            info = self._cri.image_status(ref)
        except CRIError:
            return None  # not cached: ask again next round
        if len(self._images) >= _IMAGE_CACHE:
            self._images.clear()
        self._images[ref] = info
        return info

    def _image_fields(self, image: str, image_ref: str) -> dict[str, str | None]:
        image_id: str | None = image_ref if image_ref.startswith("sha256:") else None
        digest = _digest_of_ref(image_ref)
        if image_id is None or digest is None:
            info = self._image(image_ref or image)
            if info is not None:
                image_id = image_id or info.id or None
                if digest is None:
                    repository = image.rsplit("@", 1)[0]
                    tail = repository.rsplit("/", 1)[-1]
                    if ":" in tail:
                        repository = repository.rsplit(":", 1)[0]
                    same = [d for d in info.repo_digests if d.split("@", 1)[0] == repository]
                    for candidate in same or list(info.repo_digests):
                        digest = _digest_of_ref(candidate)
                        if digest:
                            break
        return {"image_id": image_id, "image_digest": digest}

    def _cri_data(self, status: ContainerStatus, sandbox: PodSandboxInfo | None) -> dict[str, Any]:
        spec = status.runtime_spec or {}
        process = spec.get("process") if isinstance(spec.get("process"), Mapping) else None
        config = status.info.get("config")
        config = config if isinstance(config, Mapping) else {}
        if process is not None:
            args = _str_list(process.get("args"))
            cwd = process.get("cwd")
            env = _str_list(process.get("env"))
        else:  # a runtime without the OCI spec in its verbose info: the CRI config
            args = _str_list(config.get("command")) + _str_list(config.get("args"))
            cwd = config.get("working_dir") or None
            env = [
                f"{kv.get('key', '')}={kv.get('value', '')}"
                for kv in config.get("envs", [])
                if isinstance(kv, Mapping)
            ]
        if sandbox is not None:
            pod: dict[str, Any] | None = {
                "name": sandbox.name,
                "namespace": sandbox.namespace,
                "uid": sandbox.uid,
            }
        elif LABEL_POD_UID in status.labels:
            pod = {
                "name": status.labels.get(LABEL_POD_NAME),
                "namespace": status.labels.get(LABEL_POD_NAMESPACE),
                "uid": status.labels[LABEL_POD_UID],
            }
        else:
            pod = None
        data: dict[str, Any] = {
            "name": status.name,
            "image": status.image,
            **self._image_fields(status.image, status.image_ref),
            "pod": pod,
            "args": args,
            "cwd": str(cwd) if cwd else None,
            "mounts": [
                {
                    "destination": m.container_path,
                    "source": m.host_path,
                    "readonly": m.readonly,
                    "propagation": m.propagation,
                }
                for m in status.mounts
            ],
            "env_names": _env_names(env),
            "runtime": "cri",
        }
        if self.with_env_values:
            data["env"] = _env_values(env)
        return data

    def _cri_containers(self) -> tuple[dict[str, dict[str, Any]], set[str]]:
        """Running CRI containers' data, and every id CRI knows (sandboxes, exited ones)."""
        assert self._cri is not None
        sandboxes = {s.id: s for s in self._cri.list_pod_sandboxes()}
        found: dict[str, dict[str, Any]] = {}
        known_ids = set(sandboxes)
        for c in self._cri.list_containers():
            known_ids.add(c.id)
            if c.state != "running":
                continue
            known = self._cri_seen.get(c.id)
            if known is not None:
                found[c.id] = known
                continue
            try:
                status = self._cri.container_status(c.id, verbose=True)
            except CRIError as e:
                if e.code == "NOT_FOUND":
                    continue  # removed since it was listed
                raise
            if status.state != "running":
                continue
            found[c.id] = self._cri_data(status, sandboxes.get(c.sandbox_id))
            if status.runtime_spec is not None:
                self._cri_seen[c.id] = found[c.id]
        for gone in set(self._cri_seen) - set(found):
            del self._cri_seen[gone]
        return found, known_ids

    # -- runc --------------------------------------------------------------------------------------
    def _start_time(self, pid: int) -> int | None:
        raw = _read_limited(self.proc_root / str(pid) / "stat", 4096)
        if raw is None:
            return None
        # "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
        fields = raw[raw.rfind(b")") + 2 :].split()
        try:
            return int(fields[19])  # field 22, starttime
        except (IndexError, ValueError):
            return None

    def _runc_running(self, state_dir: Path, state: Mapping[str, Any]) -> bool:
        pid = state.get("init_process_pid")
        start = state.get("init_process_start")
        if not isinstance(pid, int) or pid <= 0:
            return False
        if (state_dir / "exec.fifo").exists():
            return False  # created, not started
        now = self._start_time(pid)
        return now is not None and (not isinstance(start, int) or now == start)

    def _runc_data(self, cid: str, state: Mapping[str, Any]) -> dict[str, Any]:
        config = state.get("config")
        config = config if isinstance(config, Mapping) else {}
        labels = _str_list(config.get("labels"))
        bundle = next((x.split("=", 1)[1] for x in labels if x.startswith("bundle=")), None)
        spec: Mapping[str, Any] | None = None
        spec_digest = None
        if bundle:
            raw = _read_limited(Path(bundle) / "config.json", MAX_SPEC_SIZE)
            if raw is not None:
                try:
                    doc = json.loads(raw)
                except ValueError:
                    doc = None
                if isinstance(doc, Mapping):
                    spec = doc
                    spec_digest = f"{self._alg.name}:{self._alg.hash(raw).hex()}"
        pid = int(state.get("init_process_pid") or 0)
        process = spec.get("process") if spec is not None else None
        if isinstance(process, Mapping):
            args = _str_list(process.get("args"))
            cwd = process.get("cwd")
            env = _str_list(process.get("env"))
            mounts = oci_bind_mounts(spec.get("mounts") if spec else None)
        else:  # the bundle is gone or unreadable: what the running process shows
            args = self._cmdline(pid) or []
            cwd = None
            env = self._environ(pid)
            mounts = []
        data: dict[str, Any] = {
            "name": cid,
            "image": None,
            "image_id": None,
            "image_digest": None,
            "pod": None,
            "args": args,
            "cwd": str(cwd) if cwd else None,
            "mounts": mounts,
            "env_names": _env_names(env),
            "runtime": "runc",
            "bundle": bundle,
            "spec_digest": spec_digest,
        }
        if self.with_env_values:
            data["env"] = _env_values(env)
        return data

    def _runc_containers(self) -> dict[str, tuple[dict[str, Any], bool]]:
        """Running runc containers: id -> (data, whether a CRI runtime made it)."""
        found: dict[str, tuple[dict[str, Any], bool]] = {}
        for root in self.runc_roots:
            try:
                entries = sorted(os.scandir(root), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                state_dir = Path(entry.path)
                raw = _read_limited(state_dir / "state.json", MAX_SPEC_SIZE)
                if raw is None:
                    continue
                try:
                    state = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(state, dict):
                    continue
                cid = str(state.get("id") or entry.name)
                config = state.get("config")
                labels = _str_list(config.get("labels")) if isinstance(config, dict) else []
                if _CRI_SANDBOX_TYPE in labels or cid in found:
                    continue
                if self._runc_running(state_dir, state):
                    cri_managed = any(x.startswith(_CRI_TYPE_LABEL) for x in labels)
                    found[cid] = (self._runc_data(cid, state), cri_managed)
        return found

    # -- cgroups -----------------------------------------------------------------------------------
    def _cmdline(self, pid: int) -> list[str] | None:
        raw = _read_limited(self.proc_root / str(pid) / "cmdline", _MAX_PROC_FILE)
        return None if raw is None else _split_nul(raw)

    def _environ(self, pid: int) -> list[str]:
        raw = _read_limited(self.proc_root / str(pid) / "environ", _MAX_PROC_FILE)
        return [] if raw is None else [e for e in _split_nul(raw) if e]

    def _scan_cgroups(self) -> dict[str, tuple[int, str | None]]:
        """Container id -> (its first process, pod uid) for every process in a container."""
        try:
            pids = sorted(int(e.name) for e in os.scandir(self.proc_root) if e.name.isdigit())
        except OSError:
            return {}
        found: dict[str, tuple[int, str | None]] = {}
        for pid in pids:
            raw = _read_limited(self.proc_root / str(pid) / "cgroup", 64 * 1024)
            if raw is None:
                continue
            try:
                lines = parse_cgroup(raw.decode("utf-8", "surrogateescape"))
            except IdentityError:
                continue
            ids = {c for c in (container_id_from_path(line.path) for line in lines) if c}
            if len(ids) != 1:
                continue  # the host, or contradictory cgroups
            (cid,) = ids
            if cid in found:
                continue  # the lowest pid stands for the container (its init, as a rule)
            pods = {p for p in (pod_uid_from_path(line.path) for line in lines) if p}
            found[cid] = (pid, next(iter(pods)) if len(pods) == 1 else None)
        return found

    def _cgroup_container(self, cid: str, pid: int, pod_uid: str | None) -> dict[str, Any] | None:
        args = self._cmdline(pid)
        if args is None:
            return None  # gone
        env = self._environ(pid)
        data: dict[str, Any] = {
            "name": cid,
            "image": None,
            "image_id": None,
            "image_digest": None,
            "pod": None if pod_uid is None else {"name": None, "namespace": None, "uid": pod_uid},
            "args": args,
            "cwd": None,
            "mounts": [],
            "env_names": _env_names(env),
            "runtime": "cgroup",
        }
        if self.with_env_values:
            data["env"] = _env_values(env)
        return data

    # -- wake-ups ----------------------------------------------------------------------------------
    def watch(
        self,
        callback: Callable[[TaskEvent], None],
        stop: threading.Event,
        *,
        topics: Sequence[str] = ("/tasks/start",),
    ) -> threading.Thread | None:
        """Call ``callback`` for each containerd task event (``/tasks/start``) until ``stop``.

        Runs in a daemon thread (returned; None without a runtime socket). The
        subscription is re-made after an error, with a growing pause; a runtime
        without containerd's Events API (UNIMPLEMENTED) ends the thread. Best
        effort: a missed event only delays measurement to the next poll.
        """
        socket = self.cri_socket
        if socket is None:
            return None
        filters = tuple(f'topic=="{t}"' for t in topics)
        current: list[EventStream] = []
        lock = threading.Lock()

        def cancel_on_stop() -> None:
            stop.wait()
            with lock:
                for s in current:
                    s.cancel()

        def run() -> None:
            pause = 0.5
            while not stop.is_set():
                stream = EventStream(socket, filters=filters)
                with lock:
                    current[:] = [stream]
                if stop.is_set():
                    break
                try:
                    for event in stream:
                        pause = 0.5
                        try:
                            callback(event)
                        except Exception:
                            log.exception("a container event callback failed")
                        if stop.is_set():
                            break
                except CRIError as e:
                    if e.code == "UNIMPLEMENTED":
                        log.info("%s has no containerd Events API; polling only", socket)
                        return
                    log.debug("containerd event stream at %s ended: %s", socket, e)
                if stop.wait(pause):
                    break
                pause = min(pause * 2, 30.0)

        threading.Thread(target=cancel_on_stop, name="cima-events-stop", daemon=True).start()
        thread = threading.Thread(target=run, name="cima-container-events", daemon=True)
        thread.start()
        return thread
