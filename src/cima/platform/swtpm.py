"""A swtpm TPM 2.0 simulator for the demo and the tests: manufacture a TPM state once, serve copies.

Manufacturing (``swtpm_setup``) allocates the PCR banks, creates the EKs and writes
EK and platform certificates signed by a throwaway local CA; it takes about a
second, so a test session does it once (:meth:`SWTPM.manufacture`) and every
server starts from a copy of that state (:class:`SWTPM`, about 50 ms).

``swtpm_setup --config /dev/null`` cannot create certificates (it finds no
certificate tool), so a configuration naming ``swtpm_localca`` with its own CA
directory is written next to the state.

The server listens on 127.0.0.1: the command port ``port`` and the control port
``port + 1``, the layout the ``swtpm`` TCTI expects (``swtpm:port=P``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cima.errors import PlatformError

DEFAULT_BANKS = ("sha1", "sha256", "sha384")


def available() -> str | None:
    """None if swtpm and swtpm_setup are installed, else the reason they cannot be used."""
    missing = [tool for tool in ("swtpm", "swtpm_setup") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian packages swtpm, swtpm-tools)"
    return None


@dataclass(frozen=True)
class ManufacturedTPM:
    """A manufactured TPM state directory and the local CA that signed its certificates."""

    state: Path
    ca_dir: Path
    banks: tuple[str, ...]

    @property
    def root_ca_pem(self) -> Path:
        return self.ca_dir / "swtpm-localca-rootca-cert.pem"

    @property
    def issuer_ca_pem(self) -> Path:
        return self.ca_dir / "issuercert.pem"


def _free_port_pair() -> int:
    """A port P with P and P + 1 both free on 127.0.0.1 (best effort; callers retry)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as a:
                a.bind(("127.0.0.1", port))
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as b:
                    b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise PlatformError("no free pair of TCP ports on 127.0.0.1")


class SWTPM:
    """One running swtpm server on a private copy of a manufactured state.

    Use as a context manager; :attr:`tcti` is the TCTI string for tpm2-pytss and
    tpm2-tools (``swtpm:port=P``), :meth:`env` the environment for tpm2-tools.
    """

    def __init__(self, manufactured: ManufacturedTPM, workdir: Path) -> None:
        self.manufactured = manufactured
        self.workdir = workdir
        self.state = workdir / "state"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = workdir / "swtpm.log"

    # -- manufacturing ----------------------------------------------------------------------
    @staticmethod
    def manufacture(directory: Path, banks: tuple[str, ...] = DEFAULT_BANKS) -> ManufacturedTPM:
        """Create a TPM state with ``banks`` allocated, EKs and EK/platform certificates."""
        reason = available()
        if reason:
            raise PlatformError(reason)
        state = directory / "state"
        ca_dir = directory / "ca"
        state.mkdir(parents=True, exist_ok=True)
        ca_dir.mkdir(parents=True, exist_ok=True)
        localca_conf = directory / "swtpm-localca.conf"
        localca_conf.write_text(
            f"statedir = {ca_dir}\n"
            f"signingkey = {ca_dir}/signkey.pem\n"
            f"issuercert = {ca_dir}/issuercert.pem\n"
            f"certserial = {ca_dir}/certserial\n"
        )
        localca_options = directory / "swtpm-localca.options"
        localca_options.write_text(
            "--platform-manufacturer cima\n--platform-version 1.0\n--platform-model swtpm\n"
        )
        setup_conf = directory / "swtpm_setup.conf"
        setup_conf.write_text(
            f"create_certs_tool = {shutil.which('swtpm_localca') or '/usr/bin/swtpm_localca'}\n"
            f"create_certs_tool_config = {localca_conf}\n"
            f"create_certs_tool_options = {localca_options}\n"
        )
        cmd = [
            "swtpm_setup",
            "--tpm2",
            "--tpmstate",
            str(state),
            "--pcr-banks",
            ",".join(banks),
            "--create-ek-cert",
            "--create-platform-cert",
            "--overwrite",
            "--config",
            str(setup_conf),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise PlatformError(
                f"swtpm_setup failed ({done.returncode}): {done.stdout}\n{done.stderr}"
            )
        return ManufacturedTPM(state=state, ca_dir=ca_dir, banks=tuple(banks))

    # -- server -------------------------------------------------------------------------------
    @property
    def tcti(self) -> str:
        return f"swtpm:port={self.port}"

    def env(self) -> dict[str, str]:
        """The environment for tpm2-tools commands against this server."""
        env = dict(os.environ)
        env["TPM2TOOLS_TCTI"] = self.tcti
        env.pop("TCTI", None)
        return env

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> SWTPM:
        if self.running:
            return self
        if not self.state.exists():
            shutil.copytree(self.manufactured.state, self.state)
        last = ""
        for _ in range(5):
            self.port = _free_port_pair()
            if self._spawn():
                return self
            last = self._log.read_text(errors="replace") if self._log.exists() else ""
        raise PlatformError(f"swtpm did not start: {last}")

    def _spawn(self) -> bool:
        cmd = [
            "swtpm",
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={self.state}",
            "--server",
            f"type=tcp,port={self.port},bindaddr=127.0.0.1",
            "--ctrl",
            f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
            "--flags",
            "not-need-init,startup-clear",
            "--log",
            f"file={self._log},level=1",
        ]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            try:
                # The control channel answers once the TPM is initialised.
                with socket.create_connection(("127.0.0.1", self.port + 1), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.01)
        self.stop()
        return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def restart(self) -> SWTPM:
        """Stop and start again on the same state: PCRs reset, NV and persistent keys stay."""
        self.stop()
        return self.start()

    def __enter__(self) -> SWTPM:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
