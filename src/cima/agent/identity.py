"""Who is calling: a process id (from SO_PEERCRED) to a container and a pod.

The kernel tells the agent the caller's pid and uid (``SO_PEERCRED`` on the
Unix socket, read at accept time). ``/proc/<pid>/cgroup`` then names the
cgroups the process is in, one line per hierarchy (``cgroups(7)``)::

    hierarchy-ID:controller-list:cgroup-path     # cgroup v1, one line per hierarchy
    0::cgroup-path                               # cgroup v2 (the unified hierarchy)

Container runtimes put each container in a cgroup named after its id (64
lowercase hex digits), so the path names the container. The layouts:

===========================  =================================================================
runtime / cgroup driver      cgroup path of a container's process
===========================  =================================================================
containerd CRI, cgroupfs     ``/kubepods/besteffort/pod<uid>/<id>`` (``/kubepods/pod<uid>/<id>``
                             for Guaranteed pods, ``burstable`` likewise)
containerd CRI, systemd      ``/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-``
                             ``pod<uid, - as _>.slice/cri-containerd-<id>.scope``
CRI-O, systemd               ``.../kubepods-burstable-pod<uid>.slice/crio-<id>.scope``
CRI-O, cgroupfs              ``/kubepods/burstable/pod<uid>/crio-<id>``
Docker, cgroupfs             ``/docker/<id>``
Docker, systemd              ``/system.slice/docker-<id>.scope``
Podman                       ``/machine.slice/libpod-<id>.scope``
containerd (ctr), systemd    ``/system.slice/containerd-<id>.scope`` (``<slice>:containerd:<id>``)
runc run (``cgroupsPath``)   whatever the spec says, for example ``/mygroup/<name>``
===========================  =================================================================

An agent in its own cgroup namespace sees paths relative to its namespace
root (``/../../kubepods/...``); ``..`` components are ignored. Rule 5 below
compares whole paths, so it needs the host's cgroup namespace (a DaemonSet
with ``hostPID`` and the host's cgroupns).

Rules (each is a line of the tests' named dataset):

1. A path component that is a 64-hex id, alone or as ``<prefix>-<id>`` with an
   optional ``.scope`` suffix where prefix is one of ``cri-containerd``,
   ``crio``, ``docker``, ``libpod``, ``containerd``, names a container. CRI-O's
   monitor (``crio-conmon-<id>.scope``) is a host process, not the container.
2. In a path with several such components (a container nested in another) the
   innermost (last) names the caller: a nested workload gets the narrower view.
3. Every line that names a container must name the same one. Lines that name
   different containers (a process moved between cgroups of different
   containers in different hierarchies) are an :class:`IdentityError`, never
   "no container", since "no container" is the host and may see more.
4. No line naming a container: the process is on the host (``None``), unless
   rule 5 applies.
5. runc run directly, with a ``cgroupsPath`` that is no 64-hex name: the
   process's cgroup is compared with the cgroups of the containers in the
   runc state directories the agent is told about (``<root>/<id>/state.json``,
   ``config.cgroups.path``, and ``cgroup_paths`` per hierarchy); a match gives
   that runc container's id. A cgroup that no known container owns stays a
   host cgroup: naming a cgroup is not enough to be a container.

The pod uid comes from the ``pod<uid>`` component under a ``kubepods`` tree
(cgroupfs: ``pod0b6a...-...``; systemd: ``kubepods-<qos>-pod0b6a..._...slice``,
``_`` turned back into ``-``). Static pods' uids are 32 hex digits without
dashes (a hash of the manifest); both forms are accepted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cima.errors import CimaError

__all__ = [
    "Caller",
    "CgroupLine",
    "IdentityError",
    "MAX_CGROUP_FILE",
    "caller_from_pid",
    "container_id_from_cgroup",
    "container_id_from_path",
    "parse_cgroup",
    "pod_uid_from_cgroup",
    "pod_uid_from_path",
    "runc_container_for_cgroup",
]

#: /proc/<pid>/cgroup is read up to this size (a few hundred bytes in practice).
MAX_CGROUP_FILE = 64 * 1024

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTAINER_COMPONENT = re.compile(
    r"(?:(?:cri-containerd|crio|docker|libpod|containerd)-)?([0-9a-f]{64})(?:\.scope)?"
)
_UUID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
_POD_COMPONENT = re.compile(
    rf"(?:kubepods-(?:(?:besteffort|burstable|guaranteed)-)?)?pod({_UUID}|[0-9a-f]{{32}})(?:\.slice)?"
)
_KUBEPODS = re.compile(r"kubepods(?:[-.].*)?")
# A runc container id (runc ``libcontainer/container_linux.go`` idRegex).
_RUNC_ID = re.compile(r"[\w+\-.]+")


class IdentityError(CimaError):
    """The caller cannot be identified (gone, unreadable, or contradictory cgroups)."""


@dataclass(frozen=True, slots=True)
class CgroupLine:
    """One line of ``/proc/<pid>/cgroup``."""

    hierarchy: int
    controllers: tuple[str, ...]  # () for the v2 line
    path: str

    @property
    def unified(self) -> bool:
        return self.hierarchy == 0 and not self.controllers


@dataclass(frozen=True, slots=True)
class Caller:
    """A peer of the agent's socket: kernel-given pid and uid, and what its cgroups say."""

    pid: int
    uid: int
    container_id: str | None
    pod_uid: str | None

    @property
    def on_host(self) -> bool:
        return self.container_id is None


def parse_cgroup(text: str) -> list[CgroupLine]:
    """The lines of a ``/proc/<pid>/cgroup`` text; malformed lines raise :class:`IdentityError`."""
    out: list[CgroupLine] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit() or not parts[2].startswith("/"):
            raise IdentityError(f"line {n} of a cgroup file is malformed: {line[:80]!r}")
        controllers = tuple(c for c in parts[1].split(",") if c)
        out.append(CgroupLine(int(parts[0]), controllers, parts[2]))
    return out


def _components(path: str) -> list[str]:
    return [c for c in path.split("/") if c and c not in {".", ".."}]


def container_id_from_path(path: str) -> str | None:
    """The container one cgroup path names (rules 1 and 2), or None."""
    found = None
    for comp in _components(path):
        if comp.startswith("crio-conmon-"):
            continue
        m = _CONTAINER_COMPONENT.fullmatch(comp)
        if m:
            found = m.group(1)  # innermost wins (rule 2)
    return found


def pod_uid_from_path(path: str) -> str | None:
    """The pod uid one cgroup path names (a ``pod<uid>`` under ``kubepods``), or None."""
    in_kubepods = False
    found = None
    for comp in _components(path):
        if _KUBEPODS.fullmatch(comp):
            in_kubepods = True
        if not in_kubepods:
            continue
        m = _POD_COMPONENT.fullmatch(comp)
        if m:
            found = m.group(1).replace("_", "-")
    return found


def _agree(values: Iterable[str | None], what: str) -> str | None:
    named = {v for v in values if v is not None}
    if len(named) > 1:
        raise IdentityError(
            f"the cgroup hierarchies name different {what}s: {', '.join(sorted(named))}"
        )
    return next(iter(named), None)


def container_id_from_cgroup(text: str) -> str | None:
    """The container a ``/proc/<pid>/cgroup`` text names (rules 1-4), or None for the host."""
    return _agree((container_id_from_path(line.path) for line in parse_cgroup(text)), "container")


def pod_uid_from_cgroup(text: str) -> str | None:
    """The Kubernetes pod uid a ``/proc/<pid>/cgroup`` text names, or None."""
    return _agree((pod_uid_from_path(line.path) for line in parse_cgroup(text)), "pod")


_CGROUP_MOUNT = ("sys", "fs", "cgroup")


def _runc_owns(state: dict[str, object], line: CgroupLine) -> bool:
    """Whether a runc container (its ``state.json``) owns the cgroup of one cgroup line.

    ``config.cgroups.path`` is the ``cgroupsPath`` of the spec (cgroupfs driver), the
    same in every hierarchy. ``cgroup_paths`` maps a controller ("" for v2) to the
    directory under the hierarchy's mount: ``/sys/fs/cgroup/<controllers>/<path>``
    (v1), ``/sys/fs/cgroup/unified/<path>`` (hybrid v2) or ``/sys/fs/cgroup/<path>``.
    """
    want = _components(line.path)
    if not want:
        return False
    config = state.get("config")
    if isinstance(config, dict):
        cg = config.get("cgroups")
        if isinstance(cg, dict):
            path = cg.get("path")
            if isinstance(path, str) and _components(path) == want:
                return True
    paths = state.get("cgroup_paths")
    if not isinstance(paths, dict):
        return False
    for key, full in paths.items():
        if not isinstance(key, str) or not isinstance(full, str):
            continue
        parts = _components(full)
        if len(parts) <= len(want) or parts[len(parts) - len(want) :] != want:
            continue
        mount = parts[: len(parts) - len(want)]
        if tuple(mount[:3]) != _CGROUP_MOUNT or len(mount) > 4:
            continue
        if line.unified and key == "" and (len(mount) == 3 or mount[3] == "unified"):
            return True
        if not line.unified and key and len(mount) == 4:
            controller = key.removeprefix("name=")
            names = {c.removeprefix("name=") for c in line.controllers}
            if controller in names and controller in mount[3].split(","):
                return True
    return False


def runc_container_for_cgroup(
    lines: Sequence[CgroupLine], runc_roots: Iterable[Path]
) -> str | None:
    """The runc container (rule 5) whose cgroup holds a process with these cgroup lines."""
    if not any(_components(line.path) for line in lines):
        return None
    matches: set[str] = set()
    for root in runc_roots:
        try:
            entries = list(Path(root).iterdir())
        except OSError:
            continue
        for entry in entries:
            if not _RUNC_ID.fullmatch(entry.name):
                continue
            try:
                raw = (entry / "state.json").read_bytes()
                state = json.loads(raw)
            except (OSError, ValueError):
                continue
            if not isinstance(state, dict):
                continue
            if any(_runc_owns(state, line) for line in lines):
                matches.add(str(state.get("id") or entry.name))
    if len(matches) > 1:
        raise IdentityError(
            f"several runc containers own this cgroup: {', '.join(sorted(matches))}"
        )
    return next(iter(matches), None)


def caller_from_pid(
    pid: int,
    uid: int,
    *,
    proc_root: Path = Path("/proc"),
    runc_roots: Sequence[Path] = (),
) -> Caller:
    """Identify a caller from its pid (read ``/proc/<pid>/cgroup`` now: call it at accept time).

    Raises :class:`IdentityError` when the process is gone or unreadable, or
    when its cgroups contradict each other (never "host" by default).
    """
    if pid <= 0:
        raise IdentityError(f"no process id for the caller (pid {pid})")
    path = Path(proc_root) / str(pid) / "cgroup"
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CGROUP_FILE + 1)
    except FileNotFoundError as e:
        raise IdentityError(f"process {pid} exited before it could be identified") from e
    except OSError as e:
        raise IdentityError(f"cannot read {path}: {e.strerror or e}") from e
    if len(raw) > MAX_CGROUP_FILE:
        raise IdentityError(f"{path} is larger than {MAX_CGROUP_FILE} bytes")
    text = raw.decode("utf-8", "surrogateescape")
    lines = parse_cgroup(text)
    container = _agree((container_id_from_path(line.path) for line in lines), "container")
    if container is None and runc_roots:
        container = runc_container_for_cgroup(lines, runc_roots)
    pod = _agree((pod_uid_from_path(line.path) for line in lines), "pod")
    return Caller(pid=pid, uid=uid, container_id=container, pod_uid=pod)
