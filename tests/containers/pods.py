"""Pods and containers made the way kubelet makes them, and runc containers made directly.

kubelet (``pkg/kubelet/kuberuntime``) creates a pod as a CRI pod sandbox:
``RunPodSandbox`` with metadata (name, namespace, uid, attempt), the labels
``io.kubernetes.pod.name``, ``io.kubernetes.pod.namespace`` and
``io.kubernetes.pod.uid``, a log directory ``<logs>/<namespace>_<name>_<uid>``
and, on Linux, a cgroup parent ``/kubepods/<qos>/pod<uid>`` (cgroupfs driver)
and namespace options. Pods here are BestEffort and use the host network
(``network: NODE``, and so no hostname: the runtime refuses one without a
private UTS namespace), so no CNI plugin is needed. Each container is
``CreateContainer`` (metadata name, image, command, args, working directory,
envs, mounts, the pod labels plus ``io.kubernetes.container.name``, a log path
``<name>/<attempt>.log``, its own PID namespace) then ``StartContainer``.

:class:`RuncFactory` runs OCI bundles with ``runc`` alone (no containerd), as
a runtime outside CRI would: ``runc run -d`` with a ``cgroupsPath``.

Host commands in containers: :meth:`PodFactory.host_command_container` and
:meth:`RuncFactory.run_host_command` run a host command line in a busybox root
file system with host directories bound in read-only (the Python interpreter,
the virtual environment, the project's sources; :func:`python_binds`) and,
optionally, a socket's directory (a directory, never the socket file: a file
bind keeps the old inode when the server re-creates its socket).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cima._proto.cri import api_pb2 as pb
from cima.agent.cri import (
    LABEL_CONTAINER_NAME,
    LABEL_POD_NAME,
    LABEL_POD_NAMESPACE,
    LABEL_POD_UID,
    ContainerStatus,
    CRIClient,
    CRIError,
)
from tests.containers.containerd import RUNC, Containerd, remove_cgroup
from tests.containers.oci import Image

#: Where a socket directory is mounted inside a container by default.
SOCKET_TARGET = "/run/cima"


@dataclass(frozen=True, slots=True)
class Images:
    """The images imported into the test containerd, and the busybox root file system."""

    busybox: Image
    pause: Image
    rootfs: Path


@dataclass
class Pod:
    name: str
    namespace: str
    uid: str
    sandbox_id: str
    config: Any  # runtime.v1.PodSandboxConfig
    log_directory: Path
    containers: list[Container] = field(default_factory=list)

    @property
    def cgroup_parent(self) -> str:
        return f"/kubepods/besteffort/pod{self.uid}"


@dataclass
class Container:
    id: str
    pod: Pod
    name: str
    image: str
    command: list[str]
    args: list[str]
    envs: dict[str, str]
    mounts: list[tuple[str, str, bool]]  # (host path, container path, read-only)
    working_dir: str
    log_path: Path

    def logs(self) -> str:
        """The container's output: the CRI log format is ``<time> <stream> <P|F> <text>``."""
        try:
            raw = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        out: list[str] = []
        for line in raw.splitlines():
            parts = line.split(" ", 3)
            if len(parts) == 4:
                out.append(parts[3] + ("\n" if parts[2] == "F" else ""))
        return "".join(out)


def python_binds() -> list[Path]:
    """Host directories a container needs to run this interpreter and import cima from here.

    The interpreter's prefix (it may live outside /usr, as with pyenv), the virtual
    environment, the directories on ``sys.path`` (the source tree: the editable
    install may point elsewhere, so the sources are also put on PYTHONPATH by
    :func:`python_env`) and ``/usr`` for the C library and the dynamic loader
    (the busybox image's ``/lib`` and ``/lib64`` point into ``/usr``).
    """
    import cima

    candidates = [
        Path("/usr"),
        Path(sys.base_prefix),
        Path(sys.prefix),
        Path(cima.__file__).resolve().parent.parent,
        *(Path(p) for p in sys.path if p),
    ]
    real: list[Path] = []
    for c in candidates:
        try:
            r = c.resolve(strict=True)
        except OSError:
            continue
        if r.is_dir() and r != Path("/") and r not in real:
            real.append(r)
    # Drop directories inside another one of the list.
    return sorted(p for p in real if not any(q != p and q in p.parents for q in real))


def python_env() -> dict[str, str]:
    """Environment for a host Python in a container: cima's sources first on the path."""
    import cima

    return {
        "PYTHONPATH": str(Path(cima.__file__).resolve().parent.parent),
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": "/tmp",
    }


def python_argv(code: str) -> list[str]:
    return [sys.executable, "-c", code]


class PodFactory:
    """Creates pods and containers through CRI as kubelet does; removes them at :meth:`cleanup`."""

    def __init__(self, containerd: Containerd, images: Images) -> None:
        self.containerd = containerd
        self.images = images
        self.logs = containerd.base / "pods"
        self.pods: list[Pod] = []
        self.timings: dict[str, list[float]] = {}

    @property
    def cri(self) -> CRIClient:
        return self.containerd.cri

    def _time(self, what: str, t0: float) -> None:
        self.timings.setdefault(what, []).append(time.monotonic() - t0)

    def pod(
        self,
        name: str,
        namespace: str = "default",
        *,
        uid: str | None = None,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Pod:
        """``RunPodSandbox`` for a BestEffort host-network pod."""
        uid = uid or str(uuid.uuid4())
        log_dir = self.logs / f"{namespace}_{name}_{uid}"
        log_dir.mkdir(parents=True, exist_ok=True)
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace=namespace, uid=uid, attempt=0),
            log_directory=str(log_dir),
            labels={
                LABEL_POD_NAME: name,
                LABEL_POD_NAMESPACE: namespace,
                LABEL_POD_UID: uid,
                **(labels or {}),
            },
            annotations={"kubernetes.io/config.source": "api", **(annotations or {})},
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=f"/kubepods/besteffort/pod{uid}",
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=pb.NamespaceOption(network=pb.NODE, pid=pb.CONTAINER)
                ),
            ),
        )
        self.containerd.track_cgroup(f"kubepods/besteffort/pod{uid}")
        t0 = time.monotonic()
        sandbox_id = self.cri.run_pod_sandbox(config)
        self._time("RunPodSandbox", t0)
        pod = Pod(name, namespace, uid, sandbox_id, config, log_dir)
        self.pods.append(pod)
        return pod

    def container(
        self,
        pod: Pod,
        name: str,
        *,
        image: str | None = None,
        command: Sequence[str] = (),
        args: Sequence[str] = (),
        envs: Mapping[str, str] | None = None,
        mounts: Sequence[tuple[str | Path, str, bool]] = (),
        working_dir: str = "",
        start: bool = True,
    ) -> Container:
        """``CreateContainer`` (and ``StartContainer``) in ``pod``."""
        image = image or self.images.busybox.ref
        envs = dict(envs or {})
        attempt = sum(1 for c in pod.containers if c.name == name)
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=attempt),
            image=pb.ImageSpec(image=image),
            command=list(command),
            args=list(args),
            working_dir=working_dir,
            envs=[pb.KeyValue(key=k, value=v) for k, v in envs.items()],
            mounts=[
                pb.Mount(container_path=dst, host_path=str(src), readonly=ro)
                for src, dst, ro in mounts
            ],
            labels={
                LABEL_CONTAINER_NAME: name,
                LABEL_POD_NAME: pod.name,
                LABEL_POD_NAMESPACE: pod.namespace,
                LABEL_POD_UID: pod.uid,
            },
            annotations={"io.kubernetes.container.restartCount": str(attempt)},
            log_path=f"{name}/{attempt}.log",
            linux=pb.LinuxContainerConfig(
                security_context=pb.LinuxContainerSecurityContext(
                    namespace_options=pb.NamespaceOption(network=pb.NODE, pid=pb.CONTAINER)
                )
            ),
        )
        (pod.log_directory / name).mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        cid = self.cri.create_container(pod.sandbox_id, config, pod.config)
        self._time("CreateContainer", t0)
        c = Container(
            cid,
            pod,
            name,
            image,
            list(command),
            list(args),
            envs,
            [(str(s), d, ro) for s, d, ro in mounts],
            working_dir,
            pod.log_directory / name / f"{attempt}.log",
        )
        pod.containers.append(c)
        if start:
            t0 = time.monotonic()
            self.cri.start_container(cid)
            self._time("StartContainer", t0)
        return c

    def host_command_container(
        self,
        pod: Pod,
        name: str,
        argv: Sequence[str],
        *,
        binds: Sequence[Path] | None = None,
        socket_dir: Path | None = None,
        socket_target: str = SOCKET_TARGET,
        envs: Mapping[str, str] | None = None,
    ) -> Container:
        """A container whose process is a host command line (busybox image + host binds).

        ``binds`` (default :func:`python_binds`) are mounted read-only at their own
        paths; ``socket_dir`` (a directory) is mounted read-only at ``socket_target``.
        """
        mounts: list[tuple[str | Path, str, bool]] = [
            (p, str(p), True) for p in (python_binds() if binds is None else binds)
        ]
        if socket_dir is not None:
            if not socket_dir.is_dir():
                raise ValueError(f"{socket_dir} is not a directory: bind the socket's directory")
            mounts.append((socket_dir, socket_target, True))
        env = {**python_env(), **(envs or {})}
        return self.container(pod, name, command=list(argv), envs=env, mounts=mounts)

    def status(self, c: Container) -> ContainerStatus:
        return self.cri.container_status(c.id, verbose=True)

    def wait_exited(self, c: Container, timeout: float = 30.0) -> ContainerStatus:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(c)
            if st.state == "exited":
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"container {c.name} still {st.state} after {timeout} s")
            time.sleep(0.05)

    def stop_container(self, c: Container, *, timeout: int = 0) -> None:
        t0 = time.monotonic()
        self.cri.stop_container(c.id, timeout=timeout)
        self._time("StopContainer", t0)

    def remove_pod(self, pod: Pod) -> None:
        """Stop and remove the pod's containers, then the sandbox, then its cgroup."""
        for c in pod.containers:
            with contextlib.suppress(CRIError):
                self.cri.stop_container(c.id, timeout=0)
            with contextlib.suppress(CRIError):
                self.cri.remove_container(c.id)
        with contextlib.suppress(CRIError):
            self.cri.stop_pod_sandbox(pod.sandbox_id)
        with contextlib.suppress(CRIError):
            self.cri.remove_pod_sandbox(pod.sandbox_id)
        remove_cgroup(pod.cgroup_parent)
        if pod in self.pods:
            self.pods.remove(pod)

    def cleanup(self) -> None:
        for pod in list(self.pods):
            self.remove_pod(pod)


# -- runc alone ------------------------------------------------------------------------------------


@dataclass
class RuncContainer:
    id: str
    root: Path
    bundle: Path
    cgroups_path: str
    args: list[str]
    env: list[str]
    cwd: str
    binds: list[tuple[str, str, bool]]  # (host path, container path, read-only)
    output: Path

    def state(self) -> dict[str, Any]:
        r = subprocess.run(
            [RUNC, "--root", str(self.root), "state", self.id],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        doc = json.loads(r.stdout)
        assert isinstance(doc, dict)
        return doc

    @property
    def pid(self) -> int:
        return int(self.state()["pid"])

    @property
    def config_bytes(self) -> bytes:
        return (self.bundle / "config.json").read_bytes()


class RuncFactory:
    """OCI bundles run by ``runc`` directly under their own runc root."""

    def __init__(self, base: Path, rootfs: Path) -> None:
        self.base = base
        self.root = base / "runc-root"
        self.rootfs = rootfs
        self.containers: list[RuncContainer] = []
        self.root.mkdir(parents=True, exist_ok=True)

    def bundle(
        self,
        cid: str,
        args: Sequence[str],
        *,
        cgroups_path: str,
        env: Sequence[str] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",),
        cwd: str = "/",
        binds: Sequence[tuple[str | Path, str, bool]] = (),
    ) -> tuple[Path, list[tuple[str, str, bool]]]:
        """A bundle: ``runc spec`` edited (no terminal, the command, binds, cgroupsPath)."""
        bundle = self.base / "bundles" / cid
        bundle.mkdir(parents=True)
        shutil.copytree(self.rootfs, bundle / "rootfs", symlinks=True)
        subprocess.run([RUNC, "spec", "--bundle", str(bundle)], check=True, timeout=30)
        spec = json.loads((bundle / "config.json").read_text())
        spec["process"]["terminal"] = False
        spec["process"]["args"] = list(args)
        spec["process"]["env"] = list(env)
        spec["process"]["cwd"] = cwd
        spec["hostname"] = cid[:12]
        normalized = [(str(s), d, ro) for s, d, ro in binds]
        for src, dst, ro in normalized:
            spec["mounts"].append(
                {
                    "destination": dst,
                    "type": "bind",
                    "source": src,
                    "options": ["rbind", "rprivate", "ro" if ro else "rw"],
                }
            )
        spec["linux"]["cgroupsPath"] = cgroups_path
        # The host network namespace: no network set-up needed, as for the CRI pods.
        spec["linux"]["namespaces"] = [
            ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"
        ]
        (bundle / "config.json").write_text(json.dumps(spec, indent=2))
        return bundle, normalized

    def run_detached(
        self,
        cid: str,
        args: Sequence[str],
        *,
        cgroups_path: str | None = None,
        env: Sequence[str] | None = None,
        cwd: str = "/",
        binds: Sequence[tuple[str | Path, str, bool]] = (),
    ) -> RuncContainer:
        """``runc run -d``: the container runs on after runc returns."""
        cgroups_path = cgroups_path or f"/cima-test/{cid}"
        env_list = list(env) if env is not None else ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
        bundle, normalized = self.bundle(
            cid, args, cgroups_path=cgroups_path, env=env_list, cwd=cwd, binds=binds
        )
        output = bundle / "output.log"
        with output.open("wb") as out:
            subprocess.run(
                [RUNC, "--root", str(self.root), "run", "-d", "--bundle", str(bundle), cid],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                check=True,
                timeout=60,
            )
        c = RuncContainer(
            cid, self.root, bundle, cgroups_path, list(args), env_list, cwd, normalized, output
        )
        self.containers.append(c)
        return c

    def run_host_command(
        self,
        cid: str,
        argv: Sequence[str],
        *,
        binds: Sequence[Path] | None = None,
        socket_dir: Path | None = None,
        socket_target: str = SOCKET_TARGET,
        env: Mapping[str, str] | None = None,
        cgroups_path: str | None = None,
    ) -> RuncContainer:
        """A detached runc container running a host command line (as
        :meth:`PodFactory.host_command_container`); its output goes to ``.output``."""
        mounts: list[tuple[str | Path, str, bool]] = [
            (p, str(p), True) for p in (python_binds() if binds is None else binds)
        ]
        if socket_dir is not None:
            if not socket_dir.is_dir():
                raise ValueError(f"{socket_dir} is not a directory: bind the socket's directory")
            mounts.append((socket_dir, socket_target, True))
        variables = {"PATH": "/usr/bin:/bin", **python_env(), **(env or {})}
        return self.run_detached(
            cid,
            argv,
            cgroups_path=cgroups_path,
            env=[f"{k}={v}" for k, v in variables.items()],
            binds=mounts,
        )

    def wait_exited(self, c: RuncContainer, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while c.state().get("status") != "stopped":
            if time.monotonic() > deadline:
                raise TimeoutError(f"runc container {c.id} still running after {timeout} s")
            time.sleep(0.05)

    def delete(self, c: RuncContainer) -> None:
        subprocess.run(
            [RUNC, "--root", str(self.root), "delete", "--force", c.id],
            capture_output=True,
            check=False,
            timeout=30,
        )
        remove_cgroup(c.cgroups_path, {str(Path(c.cgroups_path).parent).strip("/")} - {""})
        if c in self.containers:
            self.containers.remove(c)

    def cleanup(self) -> None:
        for c in list(self.containers):
            self.delete(c)


def hex_id() -> str:
    """A fresh 64-hex container id, as containerd makes them."""
    return os.urandom(32).hex()


@contextlib.contextmanager
def removed_after(factory: PodFactory, pod: Pod) -> Iterator[Pod]:
    """Remove ``pod`` when the block ends."""
    try:
        yield pod
    finally:
        factory.remove_pod(pod)
