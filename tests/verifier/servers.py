"""Verifier services for the tests: in a thread of the test process, or a `cima verifier serve`.

:class:`ThreadedVerifier` runs a real uvicorn server (real sockets, real
HTTP) on a free port of 127.0.0.1 for one :class:`~cima.verifier.service.VerifierService`.
:class:`VerifierProcess` runs ``python -m cima.cli.verifier serve`` (the
command ``cima verifier serve`` runs) in a child process, as a deployment
does; several of them on one PostgreSQL database form a cluster.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

import httpx
import uvicorn

from cima.verifier.service import VerifierService, create_app

SRC = Path(__file__).resolve().parents[2] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadedVerifier:
    """A uvicorn server for ``service`` in a background thread (a context manager)."""

    def __init__(self, service: VerifierService) -> None:
        self.service = service
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
        return httpx.Client(base_url=self.base, timeout=60)


class VerifierProcess:
    """``python -m cima.cli.verifier serve --store URL ...`` in a child process."""

    def __init__(self, store_url: str, *args: str, jwt_key: Path | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
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
            *args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> VerifierProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            self.args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"cima verifier serve exited {self.proc.returncode}: {err}")
            try:
                if httpx.get(self.base + "/healthz", timeout=2).status_code == 200:
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
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=60)
