"""A throwaway containerd with the CRI plugin, for the tests (REAL-COMPONENTS.md's recipe).

Everything lives under one directory: the configuration, root, state, the gRPC
and ttrpc sockets, runc's state (``runc/<namespace>/<id>``) and the CRI
plugin's CNI directories (empty: pods use the host network, so no CNI runs).
The native snapshotter needs no kernel overlay support; cgroups use the
cgroupfs driver (there is no systemd), with kubelet-like parents
``/kubepods/besteffort/pod<uid>``.

:meth:`Containerd.stop` cleans up what the daemon and the tests made: CRI
containers and pods, tasks left in any namespace, the daemon, its shims,
mounts under the directory, and the cgroup directories that were created
(RemovePodSandbox leaves the pod cgroups behind; kubelet removes them normally).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from cima.agent.cri import CRIClient, CRIError

CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
CTR = shutil.which("ctr") or "/usr/bin/ctr"
RUNC = shutil.which("runc") or "/usr/sbin/runc"
NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin uses

CONFIG = """\
version = 2
root  = "{base}/root"
state = "{base}/state"
[grpc]
  address = "{base}/containerd.sock"
[ttrpc]
  address = "{base}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
      Root = "{base}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir  = "{base}/cni/bin"
    conf_dir = "{base}/cni/net.d"
"""


def missing() -> str | None:
    """Why containerd tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "containerd and runc need root"
    for tool in (CONTAINERD, CTR, RUNC, "/bin/busybox"):
        if not Path(tool).exists():
            return f"{tool} is missing (Debian packages containerd, runc, busybox-static)"
    if not cgroup_mounts():
        return "no cgroup file system is mounted"
    return None


def cgroup_mounts() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 controllers and the v2 unified one)."""
    out: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] in {"cgroup", "cgroup2"}:
                out.append(Path(left.split()[4]))
    return out


def mounts_under(base: Path) -> list[Path]:
    """Mount points at or below ``base``, deepest first."""
    prefix = str(base.resolve())
    found: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_cgroup(relative: str, created_parents: set[str] | None = None) -> None:
    """rmdir a cgroup (and its empty children) in every hierarchy, then the parents we made."""
    rel = relative.strip("/")
    for mount in cgroup_mounts():
        target = mount / rel
        if target.is_dir():
            for dirpath, _dirs, _files in sorted(
                os.walk(target), key=lambda t: len(Path(t[0]).parts), reverse=True
            ):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
        for parent in sorted(created_parents or (), key=len, reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(mount / parent.strip("/"))


class Containerd:
    """A containerd daemon of its own under ``base`` (see the module docstring)."""

    def __init__(self, base: Path, *, sandbox_image: str = "localhost/test/pause:1") -> None:
        self.base = base.resolve()
        self.sandbox_image = sandbox_image
        self.config = self.base / "config.toml"
        self.socket = self.base / "containerd.sock"
        self.log = self.base / "containerd.log"
        self.runc_root = self.base / "runc"  # the shim's runc root; per namespace below it
        self.process: subprocess.Popen[bytes] | None = None
        self.started_in: float | None = None
        self._cri: CRIClient | None = None
        self._cgroups: set[str] = set()
        self._preexisting_parents = {
            p for p in ("kubepods/besteffort", "kubepods") if self._cgroup_exists(p)
        }

    @staticmethod
    def _cgroup_exists(rel: str) -> bool:
        return any((m / rel).is_dir() for m in cgroup_mounts())

    @property
    def namespace_runc_root(self) -> Path:
        """runc's state directory for the CRI namespace (``<runc root>/k8s.io``)."""
        return self.runc_root / NAMESPACE

    @property
    def cri(self) -> CRIClient:
        if self._cri is None:
            self._cri = CRIClient(self.socket, timeout=30.0)
        return self._cri

    def track_cgroup(self, relative: str) -> None:
        """Remember a cgroup (relative to each hierarchy) to remove at :meth:`stop`."""
        self._cgroups.add(relative)

    # -- life --------------------------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> None:
        for d in ("root", "state", "opt", "cni/bin", "cni/net.d"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            CONFIG.format(base=self.base, sandbox_image=self.sandbox_image), encoding="utf-8"
        )
        t0 = time.monotonic()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [CONTAINERD, "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = t0 + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"containerd exited with {self.process.returncode}: {self.tail_log()}"
                )
            if self.socket.exists():
                try:
                    self.cri.version()
                    break
                except CRIError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not answer in {timeout} s: {self.tail_log()}")
            time.sleep(0.02)
        self.started_in = time.monotonic() - t0

    def tail_log(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CTR, "-a", str(self.socket), "-n", NAMESPACE, *args],
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def import_image(self, archive: Path) -> None:
        """``ctr images import --snapshotter native`` into the CRI namespace."""
        self.ctr("images", "import", "--snapshotter", "native", str(archive))

    def _remove_cri_objects(self) -> None:
        cri = self.cri
        with contextlib.suppress(CRIError):
            for c in cri.list_containers():
                with contextlib.suppress(CRIError):
                    cri.stop_container(c.id, timeout=0)
                with contextlib.suppress(CRIError):
                    cri.remove_container(c.id)
        with contextlib.suppress(CRIError):
            for s in cri.list_pod_sandboxes():
                self.track_cgroup(f"kubepods/besteffort/pod{s.uid}")
                with contextlib.suppress(CRIError):
                    cri.stop_pod_sandbox(s.id)
                with contextlib.suppress(CRIError):
                    cri.remove_pod_sandbox(s.id)

    def _remove_tasks(self) -> None:
        r = self.ctr("tasks", "list", "-q", check=False)
        for task in r.stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
            self.ctr("tasks", "delete", "-f", task, check=False)
        r = self.ctr("containers", "list", "-q", check=False)
        for container in r.stdout.split():
            self.ctr("containers", "delete", container, check=False)

    def _kill_own_shims(self) -> None:
        """SIGKILL shims still serving this daemon (their command line names our socket)."""
        needle = str(self.socket).encode()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and needle in cmdline.split(b"\x00"):
                with contextlib.suppress(OSError):
                    os.kill(int(entry.name), signal.SIGKILL)

    def _remove_runc_leftovers(self) -> None:
        for root in (self.namespace_runc_root,):
            if not root.is_dir():
                continue
            for entry in root.iterdir():
                subprocess.run(
                    [RUNC, "--root", str(root), "delete", "--force", entry.name],
                    capture_output=True,
                    check=False,
                    timeout=30,
                )

    def stop(self) -> None:
        """Stop everything and clean up (idempotent)."""
        if self.process is not None and self.process.poll() is None:
            self._remove_cri_objects()
            self._remove_tasks()
        if self._cri is not None:
            self._cri.close()
            self._cri = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(10)
            self.process = None
        self._kill_own_shims()
        self._remove_runc_leftovers()
        for point in mounts_under(self.base):
            subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)
        created = {"kubepods/besteffort", "kubepods"} - self._preexisting_parents
        for cg in sorted(self._cgroups):
            remove_cgroup(cg, created)
        self._cgroups.clear()
