"""``cima agent``: measure this node per a policy and serve it on a Unix socket.

Start-up, in order, each failure a one-line error naming what is wrong (exit 2):

1. the policy is validated (an error names the key and the line);
2. the platform is opened (``--platform``: auto, tpm, tdx or software);
3. the journal is opened and reconciled with the runtime register
   (``--register``, default ``rtmr3`` on TDX, ``pcr13`` elsewhere); a journal
   that cannot prove the register is a loud error and nothing is served;
4. the engine measures the agent itself and its policy, then runs the
   collectors once: system processes from ``/proc`` always; containers and
   pods when a CRI socket is given (``--cri-socket``) or found at containerd's
   default path; the IMA list when the policy's backend is ``ima``;
5. the server listens (``--socket``, ``--socket-mode``, ``--socket-group``).

Then every ``--interval`` seconds the collectors run and the register is
checked against the journal. SIGHUP reloads the policy (the journal stays; an
invalid new policy is reported and the old one kept); SIGTERM and SIGINT stop
cleanly. A journal that stops proving the register ends the agent (exit 2).
Logs go to stderr.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from cima.cli._util import UsageError
from cima.errors import CimaError, JournalError, PolicyError

log = logging.getLogger("cima.agent")

DEFAULT_JOURNAL = Path("/var/lib/cima/journal")
DEFAULT_CRI_SOCKET = Path("/run/containerd/containerd.sock")
DEFAULT_RUNC_ROOTS = (Path("/run/runc"), Path("/run/containerd/runc/k8s.io"))


def _mode(value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {value!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {value} is out of range 0..0777")
    return mode


def _positive(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return v


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from cima.agent.server import BATCH_WINDOW, DEFAULT_SOCKET
    from cima.cli.platform import default_state_dir

    p = sub.add_parser(
        "agent",
        help="measure this node per a policy and serve it on a Unix socket",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
    )
    p.add_argument("--policy", required=True, metavar="FILE", help="the policy (YAML)")
    p.add_argument("--socket", default=str(DEFAULT_SOCKET), metavar="PATH")
    p.add_argument(
        "--socket-mode", type=_mode, default=0o660, metavar="MODE", help="octal (default 0660)"
    )
    p.add_argument("--socket-group", metavar="NAME", help="group of the socket (name or gid)")
    p.add_argument("--platform", choices=("auto", "tpm", "tdx", "software"), default="auto")
    p.add_argument("--tcti", metavar="TCTI", help="TPM connection (swtpm:port=P)")
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help=f"software platform state (default {default_state_dir()})",
    )
    p.add_argument("--journal", default=str(DEFAULT_JOURNAL), metavar="DIR")
    p.add_argument(
        "--register", metavar="NAME", help="the runtime register (default rtmr3 / pcr13)"
    )
    p.add_argument("--interval", type=_positive, default=2.0, metavar="S", help="poll period")
    p.add_argument(
        "--cri-socket",
        metavar="PATH",
        help=f"the CRI runtime's socket (default {DEFAULT_CRI_SOCKET} when it exists)",
    )
    p.add_argument(
        "--runc-root",
        action="append",
        metavar="DIR",
        help="a runc state directory (repeatable; default: the usual ones that exist)",
    )
    p.add_argument("--proc", default="/proc", metavar="DIR", help="the host's /proc")
    p.add_argument("--securityfs", default="/sys/kernel/security", metavar="DIR")
    p.add_argument(
        "--no-host-node-view",
        action="store_true",
        help="host processes get a container's view, not the whole node's",
    )
    p.add_argument(
        "--no-batching", action="store_true", help="one hardware quote per report request"
    )
    p.add_argument(
        "--batch-window",
        type=_positive,
        default=BATCH_WINDOW,
        metavar="S",
        help=f"how long a report request waits for others to share its quote "
        f"(default {BATCH_WINDOW})",
    )
    p.set_defaults(handler=cmd_agent)


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)


class _Signals:
    """SIGHUP, SIGTERM and SIGINT as flags the main loop reads."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.wake = threading.Event()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reload.set()
        else:
            self.stop.set()
        self.wake.set()


def cmd_agent(args: argparse.Namespace) -> int:
    from cima.agent.policy import load_policy

    _setup_logging()
    policy_path = Path(args.policy)
    # (1) the policy, before anything starts
    policy = load_policy(policy_path)
    for warning in policy.warnings:
        log.warning("%s", warning)

    from cima.agent.engine import Engine, default_runtime_register
    from cima.agent.identity import caller_from_pid
    from cima.agent.journal import Journal
    from cima.agent.server import AgentServer
    from cima.platform.base import PlatformPaths
    from cima.platform.detect import detect

    # (2) the platform
    paths = PlatformPaths(securityfs=Path(args.securityfs))
    state_dir = args.state_dir
    if args.platform == "software" and state_dir is None:
        from cima.cli.platform import default_state_dir

        state_dir = default_state_dir()
    platform = detect(paths, tcti=args.tcti, prefer=args.platform, state_dir=state_dir)
    journal = None
    server = None
    collectors: list[Any] = []
    try:
        register_name = args.register or default_runtime_register(platform)
        policy.check_bank(platform.algorithms(), register=register_name)
        # (3) the journal
        journal = Journal.open(
            Path(args.journal),
            platform=platform,
            register=register_name,
            algorithm=policy.hash_algorithm,
        )
        recovery = journal.recovery
        for note in recovery.notes:
            # A new journal is news; anything repaired at reconcile is a warning.
            level = logging.INFO if recovery.created and not recovery.new_epoch else logging.WARNING
            log.log(level, "journal: %s", note)
        # (4) the engine
        collectors, runc_roots = _collectors(args, policy)
        ima = _ima_reader(paths) if policy.backend == "ima" else None
        engine = Engine(policy, platform, journal, collectors=collectors, ima=ima)
        for event in engine.measure_self(policy_path):
            log.info("measured %s %s", event.kind, event.subject)
        _log_events(engine.poll())
        # (5) the server
        server = AgentServer(
            engine,
            socket_path=args.socket,
            socket_mode=args.socket_mode,
            socket_group=args.socket_group,
            node_view_allowed=not args.no_host_node_view,
            batching=not args.no_batching,
            batch_window=args.batch_window,
            identify=functools.partial(
                caller_from_pid, proc_root=Path(args.proc), runc_roots=runc_roots
            ),
        )
        signals = _Signals()
        signals.install()
        try:
            server.start()
            log.info(
                "agent ready: %s, runtime register %s/%s, %d events, socket %s",
                platform.name,
                journal.register,
                journal.algorithm,
                len(journal),
                args.socket,
            )
            _loop(engine, policy_path, signals, args.interval)
        finally:
            signals.restore()
    finally:
        if server is not None:
            server.stop()
        for c in collectors:
            close = getattr(c, "close", None)
            if close is not None:
                close()
        if journal is not None:
            journal.close()
        platform.close()
    log.info("agent stopped")
    return 0


def _loop(engine: Any, policy_path: Path, signals: _Signals, interval: float) -> None:
    from cima.agent.policy import load_policy

    while not signals.stop.is_set():
        if signals.reload.is_set():
            signals.reload.clear()
            try:
                new = load_policy(policy_path)
                _log_events(engine.reload(new, policy_path))
                log.info("policy reloaded from %s", policy_path)
            except PolicyError as e:
                log.error("policy not reloaded, the previous one stays: %s", e)
        try:
            _log_events(engine.poll())
            engine.journal.check()
        except JournalError as e:
            log.critical("the runtime journal no longer proves the register: %s", e)
            raise
        signals.wake.wait(interval)
        signals.wake.clear()


def _log_events(events: list[Any]) -> None:
    for event in events:
        log.info("measured %s %s (seq %d)", event.kind, event.subject, event.seq)


def _collectors(args: argparse.Namespace, policy: Any) -> tuple[list[Any], tuple[Path, ...]]:
    from cima.agent.collectors.procfs import ProcessCollector

    proc = Path(args.proc)
    alg = policy.hash_algorithm
    out: list[Any] = [ProcessCollector(policy.measure.system, proc_root=proc, algorithm=alg)]
    runc_roots = tuple(
        Path(r) for r in (args.runc_root or [str(p) for p in DEFAULT_RUNC_ROOTS if p.is_dir()])
    )
    cri: Path | None = None
    if args.cri_socket:
        cri = Path(args.cri_socket)
        if not cri.exists():
            raise UsageError(f"--cri-socket {cri}: no such socket")
    elif DEFAULT_CRI_SOCKET.exists():
        cri = DEFAULT_CRI_SOCKET
    # Without a CRI socket or a runc state directory, containers are still found
    # through their cgroups (a container started by another runtime, e.g. crun).
    if cri is not None or runc_roots or policy.measure.container is not None:
        from cima.agent.collectors.containers import ContainerCollector

        out.append(
            ContainerCollector(
                policy.measure.container,
                cri_socket=cri,
                runc_roots=runc_roots,
                proc_root=proc,
                algorithm=alg,
            )
        )
    if cri is not None:
        from cima.agent.collectors.kubernetes import PodCollector

        out.append(PodCollector(policy.measure.kubernetes, cri_socket=cri))
        log.info("containers and pods are read through %s", cri)
    else:
        log.info("no CRI socket: containers come from runc state and cgroups only")
    return out, runc_roots


def _ima_reader(paths: Any) -> Any:
    from cima.platform.ima import IMAReader

    path = paths.ima_binary
    if not path.exists():
        log.warning("the policy's backend is ima, but %s does not exist: no IMA list", path)
        return None
    try:
        return IMAReader(path)
    except CimaError as e:
        log.warning("the IMA list cannot be read: %s", e)
        return None
