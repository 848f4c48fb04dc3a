"""cima's agent in the guest, asked for evidence from the host.

After a boot's evidence is collected (:mod:`tests.vm.evidence`), :func:`run_agent` runs, in
this order (the same at every boot, so that what the agent measures is the same):

1. a system service: busybox ``syslogd`` in the foreground, writing to ``/run`` (tmpfs);
2. a container: ``crun run --detach`` of the guest's OCI bundle (:func:`build.container_spec`),
   its process in the cgroup ``/cima-vm/<id>`` of the unified hierarchy;
3. the bridge that makes the agent's Unix socket reachable from the host
   (:meth:`GuestSession.forward_unix`), and a host-side Unix socket that relays to it
   (:class:`UnixRelay`), so that :class:`cima.client.CimaClient` talks to the agent as a
   workload would;
4. ``cima agent`` with :data:`POLICY`, the guest's TPM (``/dev/tpmrm0``, the AK persisted at
   its handle before the first boot), its journal on the state disk (it outlives the boot),
   ``--runc-root /run/crun``. crun keeps its state as ``/run/crun/<id>/status``, not runc's
   ``state.json``: the agent finds the container through its cgroup (the 64-hex id in the
   path), and knows no image for it;
5. with the agent serving, the evidence bundle for the host's nonce, written to
   ``agent-bundle.json``, and the journal folder's listing.

Started in that order, everything the policy names runs before the agent's first poll: the
runtime log of every boot holds the same processes with the same command lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from cima.client import CimaClient
from cima.evidence.bundle import EvidenceBundle
from cima.verifier.reference import ReferenceValues
from tests.vm import build
from tests.vm.guest import GuestError, GuestProcess, GuestSession

AGENT_SOCKET = "/run/cima/cima.sock"
POLICY_FILE = "/run/cima/policy.yaml"
AGENT_LOG = "/run/cima/agent.log"
JOURNAL = f"{build.GUEST_STATE}/journal"
CRUN_ROOT = "/run/crun"
#: The guest port of the bridge to the agent's socket.
BRIDGE_PORT = 9000
#: A system service the policy measures (busybox's syslogd: argv[0] names it).
SERVICE = ("/usr/sbin/syslogd", "-n", "-O", "/run/messages")
#: The agent's policy: the guest's Python processes (its init, the bridge, the agent), the
#: service, containers, and IMA as the runtime backend.
POLICY = f"""\
backend: ima
hashAlgorithm: sha384
measure:
  system:
    withParameter: true
    processes:
      - {build.GUEST_PYTHON}
      - {SERVICE[0]}
  container:
    isolated: true
"""
AGENT_ARGS = (
    build.GUEST_PYTHON, "-m", "cima.cli.main", "agent",
    "--policy", POLICY_FILE,
    "--platform", "tpm",
    "--journal", JOURNAL,
    "--socket", AGENT_SOCKET,
    "--socket-mode", "0666",
    "--runc-root", CRUN_ROOT,
    "--interval", "1",
)  # fmt: skip
AGENT_START_TIMEOUT = 180.0
#: What the agent logs once its socket serves (``cima agent``, step 5).
READY = "agent ready:"


class UnixRelay:
    """A Unix socket on the host whose connections are piped to ``127.0.0.1:port``.

    :class:`cima.client.CimaClient` speaks to a Unix socket; the agent's socket reaches the
    host as a forwarded TCP port. Use as a context manager; :attr:`path` is the socket.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self._dir = tempfile.mkdtemp(prefix="cima-relay-")
        self.path = Path(self._dir) / "agent.sock"
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.path))
        self._server.listen(16)
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="cima-vm-relay", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(timeout=5)
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()
            self._sockets.clear()
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)

    def __enter__(self) -> UnixRelay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass
class AgentEvidence:
    """What the agent of one boot served, and what it left behind."""

    name: str
    folder: Path
    nonce: bytes
    bundle: EvidenceBundle
    info: dict[str, Any]
    #: The journal folder's files after the bundle was served (``ls -a``).
    journal_files: list[str]
    agent_log: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def bundle_file(self) -> Path:
        return self.folder / "agent-bundle.json"

    def runtime_events(self) -> list[dict[str, Any]]:
        """The runtime log's contents (``kind``, ``scope``, ``subject``, ``data``) in order."""
        return [dict(r.content) for r in self.bundle.runtime_log]


def _timed(timings: dict[str, float], key: str, start: float) -> None:
    timings[key] = round(time.monotonic() - start, 2)


def start_container(session: GuestSession) -> None:
    """``crun run --detach`` of the guest's bundle; its output goes to ``/run/crun.log``.

    Through ``sh`` so that the container's standard streams are a file, not the pipes of
    the command that starts it (which would then never reach end-of-file).
    """
    script = (
        f"exec crun run --detach --bundle {build.GUEST_CONTAINER} {build.CONTAINER_ID} "
        "</dev/null >/run/crun.log 2>&1"
    )
    done = session.run(["sh", "-c", script])
    if done.rc != 0:
        log = session.read_file("/run/crun.log").decode(errors="replace")
        raise GuestError(f"crun run exited {done.rc}: {log[-2000:]}")


def _wait_for_agent(agent: GuestProcess, timeout: float) -> None:
    """Until the agent logs that it serves (its log is read by the control server itself:
    no process is started in the guest while the agent takes its first measurements)."""
    deadline = time.monotonic() + timeout
    while True:
        log = agent.output().decode(errors="replace")
        if READY in log:
            return
        if not agent.running():
            raise GuestError(f"cima agent exited in the guest:\n{log[-3000:]}")
        if time.monotonic() > deadline:
            raise GuestError(f"cima agent did not serve within {timeout:.0f} s:\n{log[-3000:]}")
        time.sleep(0.5)


def run_agent(
    session: GuestSession, folder: Path, *, name: str, nonce: bytes | None = None
) -> AgentEvidence:
    """Steps 1-5 of the module docstring; the bundle is fetched into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    nonce = nonce if nonce is not None else os.urandom(32)
    t = time.monotonic()
    session.write_file(POLICY_FILE, POLICY.encode())
    session.spawn(list(SERVICE), log="/run/syslogd.log")
    start_container(session)
    _timed(timings, "service and container", t)
    t = time.monotonic()
    _bridge, port = session.forward_unix(AGENT_SOCKET, BRIDGE_PORT)
    agent = session.spawn(list(AGENT_ARGS), log=AGENT_LOG)
    _wait_for_agent(agent, AGENT_START_TIMEOUT)
    _timed(timings, "agent start", t)
    with UnixRelay(port) as relay, CimaClient(relay.path, timeout=120) as client:
        info = client.info()
        t = time.monotonic()
        raw = client.get_evidence_json(nonce)
        _timed(timings, "evidence", t)
    (folder / "agent-bundle.json").write_bytes(raw)
    bundle = EvidenceBundle.from_json(raw, source=str(folder / "agent-bundle.json"))
    listing = session.run(["ls", "-a", JOURNAL]).check().text.split()
    agent_log = agent.output().decode(errors="replace")
    (folder / "agent.log").write_text(agent_log)
    (folder / "agent.json").write_text(
        json.dumps(
            {"name": name, "nonce": nonce.hex(), "info": info, "journal": listing, **timings},
            indent=2,
        )
        + "\n"
    )
    return AgentEvidence(
        name=name,
        folder=folder,
        nonce=nonce,
        bundle=bundle,
        info=info,
        journal_files=sorted(f for f in listing if f not in (".", "..")),
        agent_log=agent_log,
        timings=timings,
    )


def reviewed_references(
    refs: ReferenceValues, approve: dict[str, bytes] | None = None
) -> ReferenceValues:
    """Reference values made from this guest's bundles, reviewed as a person would.

    - ``ima.exclude`` gets the agent's journal files on the state disk. IMA measures them
      when the agent opens them (root reads a file on ext4: ``ima_policy=tcb``), and their
      content differs at every boot by design (the boot id, the time, the events, a new
      epoch after a reboot). What they hold is not trusted through IMA: it is the runtime
      log, replayed into pcr13 and appraised event by event.
    - The ``containers`` section goes: cima appraises containers by image, and the container
      crun runs from a bundle has none (its event says ``image: null``; against an image
      list it is a warning, "names no image"). Without the section the container's event is
      still replayed into pcr13 and its content checked against its digest.
    - ``approve`` adds a file's new content (path -> content) to the digests allowed for its
      path, in the algorithms of the digests already listed there.
    """
    doc = refs.to_dict()
    if "ima" not in doc or "containers" not in doc:
        raise ValueError("reference values of this guest have an ima and a containers section")
    doc["ima"]["exclude"] = [f"{JOURNAL}/journal*.cima"]
    del doc["containers"]
    for path, content in (approve or {}).items():
        allowed = doc["ima"]["files"][path]
        algs = sorted({d.split(":", 1)[0] for d in allowed})
        allowed += [f"{alg}:{hashlib.new(alg, content).hexdigest()}" for alg in algs]
    return ReferenceValues.model_validate(doc)
