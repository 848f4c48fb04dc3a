"""System processes named by the policy, found in /proc (``measure.system``).

The agent runs in the host's PID namespace (a DaemonSet with ``hostPID``), so
``/proc`` lists the host's processes. A process is measured when its
executable's path is in the policy's ``processes``:

- ``/proc/PID/exe`` (readlink: the path of the executable the process runs,
  with `` (deleted)`` appended by the kernel when that file was unlinked or
  replaced since; the suffix is ignored for matching and kept in the data),
- or, failing that, ``argv[0]`` from ``/proc/PID/cmdline`` (a path the process
  was started by, for example through a symbolic link).

The executable's digest is taken over ``/proc/PID/exe`` opened as a file: the
very file the process runs, even when its path was replaced or lives in another
mount namespace. Digests are cached by (device, inode, modification time,
size) of that file, so a poll does not hash the same binary again.

Each match is one observation: kind ``process``, scope ``node``, subject the
policy's path, data ``{"pid", "exe", "exe_digest": "alg:hex"}`` and, with
``withParameter``, ``"cmdline"`` (the argument list). Its key is
``process:<path>:<pid>``: a process measured once is measured again only when
that pid shows another executable or command line, and a restarted process (a
new pid) is a new observation.

Processes that vanish while they are read, kernel threads (no executable),
processes the agent may not inspect and, with ``withParameter``, processes
whose command line reads empty (inside ``execve``, the kernel shows the new
executable before the new arguments) are skipped for the round.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cima.agent.engine import Observation
from cima.agent.events import NODE
from cima.agent.policy import Policy, SystemPolicy
from cima.digests import by_name

__all__ = ["DELETED_SUFFIX", "ProcessCollector"]

DELETED_SUFFIX = " (deleted)"
#: Command lines are read up to this size (the kernel's limit on arguments is larger).
MAX_CMDLINE = 1 << 20
#: How many executables' digests are remembered.
CACHE_SIZE = 4096
_CHUNK = 1 << 20

_FileKey = tuple[int, int, int, int]


class ProcessCollector:
    """Observations of the host processes the policy names (see the module docstring)."""

    name = "procfs"

    def __init__(
        self,
        system_policy: SystemPolicy | None,
        *,
        proc_root: Path = Path("/proc"),
        algorithm: str,
    ) -> None:
        self.proc_root = Path(proc_root)
        self._alg = by_name(algorithm)
        self._policy = system_policy
        self._paths = frozenset(system_policy.processes) if system_policy else frozenset()
        self._cache: dict[_FileKey, str] = {}
        self.skipped = 0
        """Processes that could not be inspected in the last round."""

    def update_policy(self, policy: Policy) -> None:
        """Follow a reloaded policy (its ``measure.system`` section)."""
        system = policy.measure.system
        self._policy = system
        self._paths = frozenset(system.processes) if system else frozenset()

    # -- reading /proc --------------------------------------------------------------------------
    def _readlink_exe(self, pid_dir: Path) -> str | None:
        try:
            return os.readlink(pid_dir / "exe")
        except OSError:
            return None

    def _cmdline(self, pid_dir: Path) -> list[str] | None:
        try:
            with (pid_dir / "cmdline").open("rb") as f:
                raw = f.read(MAX_CMDLINE)
        except OSError:
            return None
        if not raw:
            return []
        parts = raw.split(b"\x00")
        if parts and parts[-1] == b"":
            parts.pop()
        return [p.decode("utf-8", "surrogateescape") for p in parts]

    def _exe_digest(self, pid_dir: Path) -> str | None:
        try:
            fd = os.open(pid_dir / "exe", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._cache.get(key)
            if cached is not None:
                return cached
            h = self._alg.new()
            while chunk := os.read(fd, _CHUNK):
                h.update(chunk)
        except OSError:
            return None
        finally:
            os.close(fd)
        digest = f"{self._alg.name}:{h.hexdigest()}"
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = digest
        return digest

    def _match(self, exe: str | None, argv: list[str] | None) -> str | None:
        if exe is not None and exe.removesuffix(DELETED_SUFFIX) in self._paths:
            return exe.removesuffix(DELETED_SUFFIX)
        if argv and argv[0] in self._paths:
            return argv[0]
        return None

    def collect(self) -> Iterable[Observation]:
        """One observation per running process the policy names."""
        policy = self._policy
        if policy is None or not self._paths:
            return []
        try:
            names = [e.name for e in os.scandir(self.proc_root) if e.name.isdigit()]
        except OSError:
            return []
        out: list[Observation] = []
        skipped = 0
        for name in sorted(names, key=int):
            pid_dir = self.proc_root / name
            exe = self._readlink_exe(pid_dir)
            argv = None
            subject = self._match(exe, None)
            if subject is None:
                argv = self._cmdline(pid_dir)
                subject = self._match(None, argv)
                if subject is None:
                    continue
            digest = self._exe_digest(pid_dir)
            if digest is None:
                skipped += 1
                continue
            data: dict[str, object] = {
                "pid": int(name),
                "exe": exe if exe is not None else subject,
                "exe_digest": digest,
            }
            if policy.with_parameter:
                if argv is None:
                    argv = self._cmdline(pid_dir)
                if not argv:
                    # Unreadable, or empty: a process in the middle of execve() shows its
                    # new executable before its new arguments. Measured next round.
                    skipped += 1
                    continue
                data["cmdline"] = argv
            out.append(Observation("process", NODE, subject, data, f"process:{subject}:{name}"))
        self.skipped = skipped
        return out
