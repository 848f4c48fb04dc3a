"""Boot the guest with OVMF, swtpm and IMA; talk to it; stop it.

One :class:`VirtualMachine` is one boot::

    swtpm (TPM 2.0, state directory)  <-- unix socket -->  qemu tpm-tis/tpm-crb
    qemu -machine q35 -accel tcg, OVMF flash (code read-only, a fresh copy of the variables)
         -kernel vmlinuz -initrd initrd.img -append "console=ttyS0 ima_policy=tcb ..."
         virtio-blk: root (read-only), code (read-only), payload (read-only),
                     state (read-write, optional: the machine's persistent storage)
         virtio-serial port "org.cima.control"  <-- unix socket -->  GuestSession
         virtio-net, user-mode networking (restrict=on), forwards on 127.0.0.1 only
         serial console -> console.log; QMP -> qmp.sock

OVMF measures itself and the directly loaded kernel into pcr0-7 (the kernel image into
pcr4); the kernel's EFI stub measures its command line (``linux_load_options``: the load
options in UTF-16 with their NUL, ``initrd=initrd`` appended by OVMF) and the initrd
(``linux_initrd``) into pcr9 as EV_EVENT_TAG records; IMA extends pcr10. A swtpm state
directory that outlives one boot is a machine that reboots: NV and persistent keys stay,
PCRs start over at every boot.

Unix sockets live in a short private directory (the 108-byte limit of ``sun_path``); logs,
the variable store and the sockets are removed by :meth:`VirtualMachine.stop` except the
logs, which stay in ``workdir`` (the console log is what to read when a boot fails).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.platform.swtpm import SWTPM, ManufacturedTPM
from tests.vm import build

BOOT_TIMEOUT = float(os.environ.get("CIMA_VM_BOOT_TIMEOUT", "300"))
COMMAND_TIMEOUT = 180.0


# Run in the guest by GuestSession.forward_unix: TCP connections on a port, piped to a socket.
UNIX_BRIDGE = """
import asyncio, sys

path, port = sys.argv[1], int(sys.argv[2])


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def handle(reader, writer):
    unix_reader, unix_writer = await asyncio.open_unix_connection(path)
    await asyncio.gather(pipe(reader, unix_writer), pipe(unix_reader, writer))


async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", port)
    async with server:
        await server.serve_forever()


asyncio.run(main())
"""


class GuestError(RuntimeError):
    """The guest did not boot, did not answer, or a command in it failed."""


@dataclass(frozen=True)
class BootConfig:
    """How the guest boots: IMA's parameters on the kernel command line, memory, TPM device."""

    ima_policy: str = "tcb"
    ima_hash: str = "sha256"
    ima_template: str = "ima-ng"
    cmdline_extra: tuple[str, ...] = ()
    memory_mb: int = 1024
    tpm_device: str = "tpm-tis"

    def cmdline(self) -> str:
        parts = [
            "console=ttyS0,115200",
            "loglevel=4",
            "panic=-1",
            "rdinit=/init",
            f"ima_policy={self.ima_policy}",
            f"ima_hash={self.ima_hash}",
            f"ima_template={self.ima_template}",
            *self.cmdline_extra,
        ]
        return " ".join(parts)


@dataclass
class GuestResult:
    """What a command in the guest did."""

    argv: list[str]
    rc: int | None
    stdout: bytes
    stderr: bytes
    seconds: float
    timed_out: bool = False

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")

    def check(self) -> GuestResult:
        if self.rc != 0:
            raise GuestError(
                f"in the guest, {' '.join(self.argv)} "
                + ("timed out" if self.timed_out else f"exited {self.rc}")
                + f" after {self.seconds:.1f} s"
                f"\nstdout: {self.stdout.decode(errors='replace')[-3000:]}"
                f"\nstderr: {self.stderr.decode(errors='replace')[-3000:]}"
            )
        return self

    def json(self) -> Any:
        return json.loads(self.check().stdout)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} not written)"
    return "\n".join(text.splitlines()[-lines:])


class _LineChannel:
    """Newline-delimited JSON over a connected stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def send(self, message: Mapping[str, Any]) -> None:
        self.sock.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def receive(
        self, deadline: float, alive: Any = None, closed: Any = None
    ) -> dict[str, Any] | None:
        """The next message, or None at ``deadline``; ``alive()`` is checked while waiting,
        ``closed()`` makes the error raised when the other end goes away."""
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.sock], [], [], min(left, 0.5))
            if not ready:
                if alive is not None:
                    alive()
                continue
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                if closed is not None:
                    raise closed()
                raise GuestError("the guest's control channel closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            message: dict[str, Any] = json.loads(line)
        except ValueError as e:
            raise GuestError(f"the guest sent a line that is not JSON: {line[:200]!r}") from e
        return message


@dataclass
class GuestProcess:
    """A long-running process started in the guest with :meth:`GuestSession.spawn`."""

    session: GuestSession
    pid: int
    argv: list[str]
    log: str | None

    def running(self) -> bool:
        return bool(self.session.request("poll", pid=self.pid)["running"])

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.session.request("signal", pid=self.pid, signal=int(signum))

    def output(self) -> bytes:
        return self.session.read_file(self.log) if self.log else b""


class GuestSession:
    """Commands, files and ports of a running guest (one request at a time)."""

    def __init__(self, vm: VirtualMachine, channel: _LineChannel, ready: dict[str, Any]) -> None:
        self.vm = vm
        self.channel = channel
        self.ready = ready
        self._next = 1

    @property
    def cmdline(self) -> str:
        return str(self.ready.get("cmdline", ""))

    def request(self, op: str, *, wait: float = COMMAND_TIMEOUT, **fields: Any) -> dict[str, Any]:
        """Send one request and wait up to ``wait`` seconds for its answer."""
        rid = self._next
        self._next += 1
        self.channel.send({"id": rid, "op": op, **fields})
        deadline = time.monotonic() + wait
        while True:
            msg = self.channel.receive(deadline, self.vm.check_alive, self.vm.channel_closed)
            if msg is None:
                raise self.vm.failure(f"the guest did not answer {op} within {wait:.0f} s")
            if msg.get("id") != rid:
                continue  # an event, or an answer to a request given up on
            if "error" in msg:
                raise GuestError(f"guest {op} failed: {msg['error']}")
            return msg

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> GuestResult:
        """Run a command in the guest and wait for it (killed at ``timeout``)."""
        fields: dict[str, Any] = {"argv": list(argv), "timeout": timeout}
        if env:
            fields["env"] = dict(env)
        if cwd:
            fields["cwd"] = cwd
        if stdin:
            fields["stdin"] = base64.b64encode(stdin).decode()
        msg = self.request("run", wait=timeout + 30, **fields)
        return GuestResult(
            list(argv),
            msg["rc"],
            base64.b64decode(msg["stdout"]),
            base64.b64decode(msg["stderr"]),
            float(msg["seconds"]),
            bool(msg.get("timed_out")),
        )

    def cima(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> GuestResult:
        """``cima ARGS`` in the guest (the code disk's ``src/cima`` on the guest's Python)."""
        return self.run([build.GUEST_PYTHON, "-m", "cima.cli.main", *args], timeout=timeout)

    def read_file(self, path: str) -> bytes:
        return base64.b64decode(self.request("read", path=path)["data"])

    def fetch(self, path: str, dest: Path) -> Path:
        """Copy a guest file to ``dest`` on the host."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.read_file(path))
        return dest

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.request("write", path=path, data=base64.b64encode(data).decode(), mode=mode)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        log: str | None = None,
    ) -> GuestProcess:
        """Start a long-running process (an agent, a server); output goes to ``log``."""
        fields: dict[str, Any] = {"argv": list(argv)}
        if env:
            fields["env"] = dict(env)
        if cwd:
            fields["cwd"] = cwd
        fields["log"] = log or f"/tmp/spawn-{int(time.time() * 1000)}.log"
        msg = self.request("spawn", **fields)
        return GuestProcess(self, int(msg["pid"]), list(argv), fields["log"])

    def forward_tcp(self, guest_port: int, host_port: int | None = None) -> int:
        """Forward ``127.0.0.1:host_port`` on the host to the guest's ``guest_port``.

        Added at run time through QEMU's monitor (``hostfwd_add``); the host side binds to
        the loopback address only. Returns the host port.
        """
        port = host_port or _free_port()
        answer = self.vm.qmp(
            "human-monitor-command",
            {"command-line": f"hostfwd_add net0 tcp:127.0.0.1:{port}-10.0.2.15:{guest_port}"},
        )
        if str(answer).strip():
            raise GuestError(f"hostfwd_add {port} -> {guest_port}: {answer}")
        return port

    def forward_unix(self, guest_socket: str, guest_port: int = 9000) -> tuple[GuestProcess, int]:
        """Make a Unix socket in the guest (an agent's API) reachable from the host.

        Starts a small TCP-to-Unix bridge in the guest on ``guest_port`` and forwards a host
        port on 127.0.0.1 to it. Returns the bridge process and the host port.
        """
        bridge = self.spawn(
            [build.GUEST_PYTHON, "-c", UNIX_BRIDGE, guest_socket, str(guest_port)],
            log=f"/tmp/bridge-{guest_port}.log",
        )
        return bridge, self.forward_tcp(guest_port)

    def poweroff(self) -> None:
        with contextlib.suppress(GuestError, OSError):
            self.request("poweroff", wait=10)


@dataclass(frozen=True)
class ProvisionedTPM:
    """A guest's TPM: its swtpm state directory and the attestation key registered for it."""

    state: Path
    ak_pem: str


def provision_tpm(manufactured: ManufacturedTPM, workdir: Path) -> ProvisionedTPM:
    """A copy of a manufactured TPM whose AK is created before the first boot.

    The key is made by cima's TPM platform (persisted at its handle) through swtpm's TCP
    interface, as a registration step would: every boot then runs the same code (no boot
    creates a key) and a verifier knows the AK in advance.
    """
    from cima.platform.tpm import TPMPlatform

    server = SWTPM(manufactured, workdir)
    with server, TPMPlatform(server.tcti) as platform:
        ak_pem = platform.ak_pem()
    return ProvisionedTPM(server.state, ak_pem)


@dataclass
class VirtualMachine:
    """One boot of the guest. Use as a context manager; :meth:`start` returns the session."""

    images: build.GuestImages
    tpm_state: Path
    workdir: Path
    config: BootConfig = field(default_factory=BootConfig)
    payload: Path | None = None
    boot_seconds: float | None = None
    #: A writable disk (:func:`build.state_image`) that outlives the boot, or None.
    state: Path | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_log = self.workdir / "console.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.swtpm_log = self.workdir / "swtpm.log"
        self._run = Path("/nonexistent")  # sockets' folder, made by start()
        self._swtpm: subprocess.Popen[bytes] | None = None
        self._qemu: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._qmp: socket.socket | None = None
        self._qmp_buffer = b""
        self.session: GuestSession | None = None

    # -- processes ----------------------------------------------------------------------------
    def _start_swtpm(self) -> Path:
        sock = self._run / "tpm.sock"
        cmd = [
            "swtpm", "socket", "--tpm2",
            "--tpmstate", f"dir={self.tpm_state}",
            "--ctrl", f"type=unixio,path={sock}",
            "--log", f"file={self.swtpm_log},level=1",
            "--terminate",
        ]  # fmt: skip
        self._swtpm = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self._swtpm.poll() is not None or time.monotonic() > deadline:
                raise GuestError(f"swtpm did not start: {_tail(self.swtpm_log)}")
            time.sleep(0.02)
        return sock

    def _qemu_command(self, tpm_sock: Path, vars_file: Path, payload: Path) -> list[str]:
        ovmf = build.ovmf_code()
        assert ovmf is not None
        im = self.images

        def disk(name: str, path: Path, serial: str) -> list[str]:
            return [
                "-drive", f"file={path},format=raw,if=none,id={name},readonly=on",
                "-device", f"virtio-blk-pci,drive={name},serial={serial}",
            ]  # fmt: skip

        return [
            "qemu-system-x86_64",
            "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "1",
            "-m", str(self.config.memory_mb),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={ovmf[0]}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}",
            "-chardev", f"socket,id=chrtpm,path={tpm_sock}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", f"{self.config.tpm_device},tpmdev=tpm0",
            "-kernel", str(im.kernel), "-initrd", str(im.initrd),
            "-append", self.config.cmdline(),
            *disk("root", im.rootfs, build.DISK_ROOT),
            *disk("code", im.code, build.DISK_CODE),
            *disk("payload", payload, build.DISK_PAYLOAD),
            *(
                [
                    "-drive", f"file={self.state},format=raw,if=none,id=state",
                    "-device", f"virtio-blk-pci,drive=state,serial={build.DISK_STATE}",
                ]
                if self.state is not None
                else []
            ),
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=control,path={self._run / 'control.sock'},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=control,name={build.CONTROL_PORT}",
            "-device", "virtio-rng-pci",
            "-netdev", "user,id=net0,restrict=on,net=10.0.2.0/24,host=10.0.2.2",
            "-device", "virtio-net-pci,netdev=net0,romfile=",
            "-serial", f"file:{self.console_log}",
            "-qmp", f"unix:{self._run / 'qmp.sock'},server=on,wait=off",
        ]  # fmt: skip

    def check_alive(self) -> None:
        """Raise if qemu or swtpm is gone (with what the console showed)."""
        for name, proc in (("qemu", self._qemu), ("swtpm", self._swtpm)):
            if proc is not None and proc.poll() is not None:
                raise self.failure(f"{name} exited with status {proc.returncode}")

    def failure(self, what: str) -> GuestError:
        """An error saying ``what`` happened, with the end of qemu's and the console's logs."""
        return GuestError(
            f"{what}\nqemu ({self.qemu_log}):\n{_tail(self.qemu_log, 10)}\n"
            f"console ({self.console_log}):\n{_tail(self.console_log)}"
        )

    def channel_closed(self) -> GuestError:
        """The control channel ended: say why, once qemu has had a moment to exit."""
        if self._qemu is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._qemu.wait(timeout=5)
        state = (
            "running"
            if self._qemu is None or self._qemu.poll() is None
            else (f"exited with status {self._qemu.returncode}")
        )
        return self.failure(f"the guest's control channel closed (qemu {state})")

    def _connect(self, path: Path, deadline: float) -> socket.socket:
        while True:
            self.check_alive()
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(path))
                return s
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise self.failure(f"qemu did not open {path}") from None
                time.sleep(0.05)

    def start(self, timeout: float = BOOT_TIMEOUT) -> GuestSession:
        """Boot and wait until the guest's control server says it is ready."""
        if build.ovmf_code() is None:
            raise GuestError("OVMF is not installed (Debian package ovmf)")
        started = time.monotonic()
        self._run = Path(tempfile.mkdtemp(prefix="cima-vm-"))
        try:
            tpm_sock = self._start_swtpm()
            vars_file = self.workdir / "OVMF_VARS.fd"
            shutil.copyfile(build.ovmf_code()[1], vars_file)  # type: ignore[index]
            payload = self.payload
            if payload is None:
                empty = self.workdir / "payload-empty"
                empty.mkdir(exist_ok=True)
                payload = build.payload_image(empty, self.workdir / "payload.ext4")
            cmd = self._qemu_command(tpm_sock, vars_file, payload)
            (self.workdir / "qemu.cmd").write_text(" ".join(cmd) + "\n")
            with open(self.qemu_log, "wb") as qlog:
                self._qemu = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT
                )
            deadline = started + timeout
            self._control = self._connect(self._run / "control.sock", started + 30)
            channel = _LineChannel(self._control)
            while True:
                msg = channel.receive(deadline, self.check_alive, self.channel_closed)
                if msg is None:
                    raise self.failure(f"the guest was not ready within {timeout:.0f} s")
                if msg.get("event") == "ready":
                    break
            self.boot_seconds = time.monotonic() - started
            self.session = GuestSession(self, channel, msg)
            return self.session
        except BaseException:
            self.stop()
            raise

    def qmp(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one QMP command and return its ``return`` value."""
        if self._qmp is None:
            self._qmp = self._connect(self._run / "qmp.sock", time.monotonic() + 10)
            self._qmp_read()  # greeting
            self._qmp_call("qmp_capabilities", None)
        return self._qmp_call(command, arguments)

    def _qmp_read(self) -> dict[str, Any]:
        assert self._qmp is not None
        deadline = time.monotonic() + 30
        while b"\n" not in self._qmp_buffer:
            self._qmp.settimeout(max(deadline - time.monotonic(), 0.1))
            chunk = self._qmp.recv(65536)
            if not chunk:
                raise GuestError("QMP connection closed")
            self._qmp_buffer += chunk
        line, self._qmp_buffer = self._qmp_buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def _qmp_call(self, command: str, arguments: Mapping[str, Any] | None) -> Any:
        assert self._qmp is not None
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = dict(arguments)
        self._qmp.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._qmp_read()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise GuestError(f"QMP {command}: {msg['error']}")

    def stop(self) -> None:
        """Power the guest off (killed after 10 s), stop swtpm, remove the sockets."""
        grace = 0.0
        if self.session is not None and self._qemu is not None and self._qemu.poll() is None:
            self.session.poweroff()
            grace = 10.0
        for proc, wait in ((self._qemu, grace), (self._swtpm, 5.0)):
            if proc is None:
                continue
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        for s in (self._control, self._qmp):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        self._control = self._qmp = None
        self.session = None
        if self._run.name.startswith("cima-vm-"):
            shutil.rmtree(self._run, ignore_errors=True)
        (self.workdir / "OVMF_VARS.fd").unlink(missing_ok=True)

    def __enter__(self) -> VirtualMachine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
