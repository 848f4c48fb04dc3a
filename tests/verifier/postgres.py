"""A throwaway PostgreSQL cluster for tests and benchmarks.

:class:`PostgresCluster` runs Debian's PostgreSQL server binaries: ``initdb``
into a fresh temporary directory, ``pg_ctl start`` listening on a free TCP
port on 127.0.0.1 only (its Unix socket inside the same directory), trust
authentication for local TCP connections (nothing else can reach the port's
address from outside the machine), and ``pg_ctl stop`` plus removal of the
directory at the end.

PostgreSQL refuses to run as root. When the tests run as root, the cluster's
processes run as the system user ``cima-pg``, created on first use with
``useradd --system`` (no home, no login shell); if it cannot be created,
``nobody`` is used. The temporary directory is made under ``/tmp`` (not under
pytest's per-user directory, which is private to root) and owned by that user.
Run as any other user, the cluster runs as that user.

Without the server binaries (Debian package ``postgresql``) or the ``psycopg``
driver (``pip install cima[postgresql]``), :func:`available` gives the reason
and the fixtures skip with it.

Fixtures: ``postgres_cluster`` (one per test session) and ``postgres_url`` (a
fresh database in it for each test). Import both into a test module.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

#: The system user the cluster runs as when the tests run as root.
PG_USER = "cima-pg"
SUPERUSER = "postgres"


def bin_dir() -> Path | None:
    """The directory of ``initdb``, ``pg_ctl`` and ``postgres`` (Debian keeps them off PATH)."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(os.path.realpath(on_path)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2] or 0)
    )
    for c in reversed(candidates):
        if (Path(c) / "pg_ctl").exists() and (Path(c) / "initdb").exists():
            return Path(c)
    return None


def available() -> str | None:
    """None if a cluster can be started here, else why not."""
    if bin_dir() is None:
        return "PostgreSQL server binaries not installed (Debian package postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed (pip install 'cima[postgresql]')"
    return None


def _run_as() -> str | None:
    """The user to run the server as: None for the current user, else a system user's name."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_USER)
        return PG_USER
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    made = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
        capture_output=True,
        check=False,
    )
    if made.returncode == 0 or _user_exists(PG_USER):
        return PG_USER
    return "nobody"


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresCluster:
    """One running PostgreSQL server in a temporary directory (see the module docstring).

    ``settings`` are extra server settings (``-c name=value``), e.g.
    ``{"max_connections": "200"}``.
    """

    def __init__(self, settings: Mapping[str, str] | None = None) -> None:
        reason = available()
        if reason:
            raise RuntimeError(reason)
        found = bin_dir()
        assert found is not None
        self.bin = found
        self.settings = {"max_connections": "200", **(settings or {})}
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="cima-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self._running = False
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chmod(self.root, 0o700)

    # -- processes ---------------------------------------------------------------------------
    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        env = {"PATH": f"{self.bin}:/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": str(self.root)}
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )

    def start(self) -> PostgresCluster:
        done = self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
        last = ""
        for _ in range(5):  # a port taken between choosing and binding: try another
            self.port = free_port()
            options = [
                "-c listen_addresses=127.0.0.1",
                f"-c port={self.port}",
                f"-c unix_socket_directories={self.root}",
            ] + [f"-c {k}={v}" for k, v in self.settings.items()]
            done = self._run(
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                "60",
                "-o",
                " ".join(options),
                "start",
            )
            if done.returncode == 0:
                self._running = True
                self._wait_ready()
                return self
            last = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()} {last}")

    def _wait_ready(self, timeout: float = 30.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=5):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def postmaster_pid(self) -> int | None:
        """The server's main process (its children are the connections' backends)."""
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        if self._running:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
            self._running = False
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------------------
    def dsn(self, database: str = "postgres") -> str:
        """A libpq connection string."""
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={database}"

    def url(self, database: str = "postgres") -> str:
        """An SQLAlchemy URL (psycopg 3 driver)."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """Create a database (a random name by default) and return its SQLAlchemy URL."""
        import psycopg
        from psycopg import sql

        name = name or f"cima_{secrets.token_hex(6)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One PostgreSQL server for the test session, removed at the end."""
    reason = available()
    if reason:
        pytest.skip(reason)
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """A fresh, empty database for one test (SQLAlchemy URL)."""
    url = postgres_cluster.create_database()
    yield url
    with contextlib.suppress(Exception):
        import psycopg
        from psycopg import sql

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(postgres_cluster.dsn(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
