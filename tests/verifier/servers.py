"""Verifier services for the tests: in a thread of the test process, or a `cima verifier serve`.

:class:`ThreadedVerifier` runs a real uvicorn server (real sockets, real
HTTP) on a free port of 127.0.0.1 for one :class:`~cima.verifier.service.VerifierService`.
:class:`VerifierProcess` runs ``python -m cima.cli.verifier serve`` (the
command ``cima verifier serve`` runs) in a child process, as a deployment
does; several of them on one PostgreSQL database form a cluster.

Both take reference values from :data:`OPERATOR_TOKEN` by default (the
service config's digest of it, ``--operator-token-file``), and their
``client()`` sends it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

import httpx
import uvicorn

from cima.verifier.service import VerifierService, create_app, operator_token_digest

SRC = Path(__file__).resolve().parents[2] / "src"

#: The operator token of the test verifiers (new each test session).
OPERATOR_TOKEN = secrets.token_urlsafe(32)
#: What a :class:`~cima.verifier.service.ServiceConfig` keeps of it (``operator_tokens``).
OPERATOR_DIGESTS = (operator_token_digest(OPERATOR_TOKEN),)


def bearer(token: str) -> dict[str, str]:
    """The header that authorizes a reference write with ``token``."""
    return {"authorization": f"Bearer {token}"}


def write_token_file(path: Path, *lines: str, mode: int = 0o600) -> Path:
    """A token file of ``lines`` (one a line), with permissions ``mode``."""
    path.write_text("".join(f"{line}\n" for line in lines))
    path.chmod(mode)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadedVerifier:
    """A uvicorn server for ``service`` in a background thread (a context manager).

    ``token``: what ``client()`` sends as its operator token (None: nothing).
    """

    def __init__(self, service: VerifierService, token: str | None = OPERATOR_TOKEN) -> None:
        self.service = service
        self.token = token
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(service), host="127.0.0.1", port=self.port, log_level="error"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedVerifier:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the verifier did not start")
            time.sleep(0.01)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    def client(self) -> httpx.Client:
        headers = bearer(self.token) if self.token else None
        return httpx.Client(base_url=self.base, timeout=60, headers=headers)


class VerifierProcess:
    """``python -m cima.cli.verifier serve --store URL ...`` in a child process.

    ``operator_token``: written to a token file (mode 0600) that the process
    is given (``--operator-token-file``), and sent by ``client()``; None:
    neither. ``tls``: the process serves HTTPS (its ``args`` name the
    certificate), reached with this client context (CA, client certificate).
    What it writes (stdout and stderr) is kept in a file (:meth:`output`).
    """

    def __init__(
        self,
        store_url: str,
        *args: str,
        jwt_key: Path | None = None,
        operator_token: str | None = OPERATOR_TOKEN,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.port = free_port()
        self.tls = tls
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.token = operator_token
        self.directory = Path(tempfile.mkdtemp(prefix="cima-verifier-process-"))
        self.output_path = self.directory / "output"
        token_args: list[str] = []
        if operator_token is not None:
            tokens = write_token_file(self.directory / "operator-tokens", operator_token)
            token_args = ["--operator-token-file", str(tokens)]
        self.args = [
            sys.executable,
            "-m",
            "cima.cli.verifier",
            "serve",
            "--store",
            store_url,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--log-level",
            "error",
            *(["--jwt-key", str(jwt_key)] if jwt_key else []),
            *token_args,
            *args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self._output: str | None = None

    def __enter__(self) -> VerifierProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
        with self.output_path.open("wb") as out:
            self.proc = subprocess.Popen(self.args, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"cima verifier serve exited {self.proc.returncode}: {self.output()}"
                )
            try:
                verify: ssl.SSLContext | bool = self.tls or True
                if httpx.get(self.base + "/healthz", timeout=2, verify=verify).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("cima verifier serve did not become ready")
            time.sleep(0.05)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._output = self.output()
        shutil.rmtree(self.directory, ignore_errors=True)

    def output(self) -> str:
        """What the process wrote so far (all of it, once it has stopped)."""
        if self._output is not None:
            return self._output
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def client(self) -> httpx.Client:
        headers = bearer(self.token) if self.token else None
        return httpx.Client(
            base_url=self.base, timeout=60, headers=headers, verify=self.tls or True
        )
