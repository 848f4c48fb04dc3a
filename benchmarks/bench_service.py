"""The HTTP verifier's throughput: attestations per second with 32 concurrent clients.

One verifier instance (``python -m cima.cli.verifier serve``, what ``cima
verifier serve`` runs, every result signed as a JWT) runs in its own process
over a store: SQLite (a file in a temporary directory, ``synchronous=FULL``)
and PostgreSQL (a throwaway cluster, :mod:`tests.verifier.postgres`; skipped
when the server binaries or psycopg are missing). The default instance is what
``serve`` runs without options: one worker process per CPU (2 on the
development machine), each listening on its own ``SO_REUSEPORT`` socket, each
running decoding, appraisal and the store's work on its event loop
(``--threads 0``). The load comes from this process: ``concurrency`` clients
on asyncio, one keep-alive HTTP/1.1 connection each (a minimal client, so that
the load generator takes little CPU from the machine it shares with the
server), each client a node of its own
(:class:`tests.verifier.nodes.SoftwareNode`: the GCE boot log of 112 events,
``ima_entries`` entries of a real IMA list, 3 agent events, a P-256 key),
looping over one attestation: ``POST /v1/challenge`` for a nonce, a new quote
binding it, ``POST /v1/attest`` with the 107 KiB bundle. Every result must
come back affirming. Each node attests twice before the clock starts, so the
measured appraisals are the steady state of a node that attests periodically
(incremental appraisal from the node's stored state, its boot and IMA logs
already seen by the worker).

Rows: ``entries`` attestations in ``seconds`` (``entries_per_s``), ``p50_ms``
and ``p99_ms`` the latency of one iteration (challenge + attest) as a client
sees it, and the CPU it took per attestation: ``server_cpu_ms`` (the instance,
all its processes), ``database_cpu_ms`` (the PostgreSQL server) and
``load_cpu_ms`` (this process), read from ``/proc``; ``machine_busy_pct`` and
``other_cpu_pct``, the CPU that other programs took meanwhile (a measurement
with much of it was disturbed: repeat it). The machine's speed varies by some
15 % from run to run (``load_cpu_ms``, the same work every run, shows it). Four
in-process rows say what the evidence itself costs on one core: decoding the
bundle and appraising it, with its logs seen before and seen for the first
time.

Figures on the 2-core development machine (several runs each, undisturbed):
the default instance does 330-440 attestations/s on SQLite and 300-390 on
PostgreSQL, at 3.0-3.6 ms of server CPU per attestation (PostgreSQL itself
0.55-0.7 ms, the load 0.55-0.7 ms); one worker process 260-320 (SQLite) and
190-265 (PostgreSQL). Before the changes these figures measure, one process
took 9-11 ms per attestation (about 110/s; two worker processes on one shared
socket, about 130/s). Where a worker's CPU goes, per attestation (thread CPU,
in process): the challenge 0.25-0.3 ms (one INSERT); decoding the bundle
0.5 ms (the JSON parse, orjson, 0.22-0.35 ms; a boot or IMA log byte-identical
to one seen before is not decoded again, :data:`cima.eventlog.cel.DECODED_LOGS`);
the store's read 0.25-0.35 ms (one statement); the appraisal 0.65 ms and the
JWT 0.13 ms (what a boot log says by itself, its replay included, is kept by
the log's digest, :data:`cima.verifier.appraise.BOOT_FACTS`; the replay is
still compared with every quote); the store's write 0.35-0.4 ms (one
transaction; one statement on PostgreSQL; a state that did not change is not
written); HTTP for both requests (uvicorn, FastAPI, asyncio) about 0.9 ms. A
bundle whose logs are new to the worker costs about 2 ms more (decoding
1.4 ms, appraisal 2 ms). The rest of the machine's CPU goes to the database
and the load; the machine is 80-90 % busy, the workers waiting on the store's
commits the rest of the time.

Usage: ``python benchmarks/bench_service.py [--attestations N] [--config B:W] [--json]``
(``--config sqlite:1``, ``postgresql:0`` (the default workers),
``'sqlite?synchronous=normal:1'``; ``--serve-arg=--threads=2`` passes an
option to ``serve``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "src"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

DEFAULT_ATTESTATIONS = 2000
DEFAULT_CONCURRENCY = 32
DEFAULT_IMA_ENTRIES = 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_seconds(pid: int) -> float:
    """CPU time so far of a process and its descendants (the server and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(stat[1]), []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += _cpu_seconds(p)
        todo.extend(children.get(p, ()))
    return total


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, over every core."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


class _CPUMeter:
    """CPU time over a measured interval: the server, the database, this process, the machine."""

    def __init__(self, server_pid: int, database_pid: int | None) -> None:
        self.server_pid = server_pid
        self.database_pid = database_pid
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, float, float]:
        busy, total = _machine_cpu()
        database = _tree_cpu_seconds(self.database_pid) if self.database_pid else 0.0
        return (_tree_cpu_seconds(self.server_pid), database, time.process_time(), busy, total)

    def stop(self, attestations: int) -> dict[str, float]:
        """Milliseconds of CPU per attestation, and the machine's use (percent of all cores)."""
        server, database, load, busy, total = (
            b - a for a, b in zip(self._start, self._read(), strict=True)
        )
        n = max(1, attestations)
        out = {
            "server_cpu_ms": 1000 * server / n,
            "load_cpu_ms": 1000 * load / n,
            "machine_busy_pct": 100 * busy / total if total else 0.0,
            # CPU that neither the verifier, its database nor the load took: other programs
            # on the machine (a measurement with much of it was disturbed).
            "other_cpu_pct": 100 * max(0.0, busy - server - database - load) / total
            if total
            else 0.0,
        }
        if self.database_pid:
            out["database_cpu_ms"] = 1000 * database / n
        return out


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


class _Server:
    """``cima verifier serve`` in a child process."""

    def __init__(
        self,
        store_url: str,
        key_path: Path,
        token_path: Path,
        workers: int = 0,
        extra: Sequence[str] = (),
    ) -> None:
        """``workers`` 0: the default (one per CPU); ``token_path``: its operator token file."""
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cima.cli.verifier",
                "serve",
                "--store",
                store_url,
                "--listen",
                f"127.0.0.1:{self.port}",
                "--jwt-key",
                str(key_path),
                "--operator-token-file",
                str(token_path),
                "--log-level",
                "error",
                *(["--workers", str(workers)] if workers else []),
                *extra,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"the verifier exited: {err.strip()}")
            try:
                if httpx.get(self.base + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the verifier did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Connection:
    """A minimal HTTP/1.1 keep-alive client (the load generator must cost the server little).

    It sends a request with a Content-Length and reads one response with a
    Content-Length, which is all the verifier sends.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def _load(
    port: int,
    bundlers: Sequence[Any],
    per_client: int,
    warmup: int,
    meter: Callable[[], _CPUMeter],
) -> tuple[float, list[float], dict[str, float]]:
    """(seconds, latencies, CPU use) of ``per_client`` rounds per client, after ``warmup``."""
    latencies: list[float] = []

    async def client(i: int, n: int, record: bool) -> None:
        challenge = json.dumps({"node_id": f"bench-node-{i}"}).encode()
        bundler = bundlers[i]
        conn = await _Connection.open(port)
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                status, body = await conn.post("/v1/challenge", challenge)
                if status != 200:
                    raise RuntimeError(f"challenge failed: {status} {body[:500]!r}")
                nonce = bytes.fromhex(json.loads(body)["nonce"])
                status, body = await conn.post("/v1/attest", bundler.bundle_json(nonce))
                if status != 200 or json.loads(body)["status"] != "affirming":
                    raise RuntimeError(f"attestation failed: {status} {body[:500]!r}")
                if record:
                    latencies.append(time.perf_counter() - t0)
        finally:
            conn.close()

    await asyncio.gather(*(client(i, warmup, False) for i in range(len(bundlers))))
    cpu = meter()
    t0 = time.perf_counter()
    await asyncio.gather(*(client(i, per_client, True) for i in range(len(bundlers))))
    seconds = time.perf_counter() - t0
    return seconds, latencies, cpu.stop(len(latencies))


def _nodes(concurrency: int, ima_entries: int) -> tuple[list[Any], str]:
    """``concurrency`` nodes with bundlers, and the reference values (YAML) that trust them."""
    from tests.verifier.nodes import FastBundler, SoftwareNode

    from cima.verifier.reference import create_references

    nodes = [SoftwareNode(ima_entries=ima_entries) for _ in range(concurrency)]
    refs = create_references([n.bundle(os.urandom(32)) for n in nodes], name="bench")
    return [FastBundler(n) for n in nodes], refs.to_yaml()


def _in_process_rows(bundler: Any, references_yaml: str, repeat: int = 200) -> list[dict[str, Any]]:
    """Where one attestation's server time goes: decode, appraise (incremental), on one core.

    Each twice: with the logs seen before (a node that attests again: its boot
    and IMA logs decoded and its boot log's facts kept), and seen for the
    first time (both memos emptied before each bundle is decoded).
    """
    from cima.eventlog.cel import DECODED_LOGS
    from cima.evidence.bundle import EvidenceBundle
    from cima.verifier.appraise import BOOT_FACTS, appraise
    from cima.verifier.reference import load_references

    refs = load_references(references_yaml)
    nonce = os.urandom(32)
    body = bundler.bundle_json(nonce)
    state = appraise(EvidenceBundle.from_json(body), refs, nonce=nonce).state
    rows = []
    for seen in (True, False):
        decode = appraisal = 0.0
        for _ in range(repeat):
            if not seen:
                DECODED_LOGS.clear()
                BOOT_FACTS.clear()
            t0 = time.perf_counter()
            bundle = EvidenceBundle.from_json(body)
            decode += time.perf_counter() - t0
            t0 = time.perf_counter()
            result = appraise(bundle, refs, nonce=nonce, state=state)
            appraisal += time.perf_counter() - t0
        assert result.status == "affirming", result.failures
        how = "logs seen before" if seen else "logs new"
        rows += [
            {
                "name": f"decode one bundle ({len(body) // 1024} KiB, {how}, in-process)",
                "entries": repeat,
                "seconds": decode,
                "entries_per_s": repeat / decode,
            },
            {
                "name": f"appraise one bundle ({result.mode}, {how}, in-process)",
                "entries": repeat,
                "seconds": appraisal,
                "entries_per_s": repeat / appraisal,
            },
        ]
    return rows


#: (store backend, worker processes; 0: the default, one per CPU) measured by default.
CONFIGURATIONS: tuple[tuple[str, int], ...] = (
    ("sqlite", 0),
    ("postgresql", 0),
    ("sqlite", 1),
    ("postgresql", 1),
)


def run(
    attestations: int | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    ima_entries: int = DEFAULT_IMA_ENTRIES,
    configurations: Sequence[tuple[str, int]] = CONFIGURATIONS,
    serve_args: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Attestations per second through one verifier instance, per store and worker count."""
    import secrets

    import httpx
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from cima.cli.verifier import default_workers

    total = attestations or DEFAULT_ATTESTATIONS
    per_client = max(1, total // concurrency)
    bundlers, references_yaml = _nodes(concurrency, ima_entries)
    rows = _in_process_rows(bundlers[0], references_yaml)
    with tempfile.TemporaryDirectory(prefix="cima-bench-service-") as tmp:
        key_path = Path(tmp) / "jwt.pem"
        key_path.write_bytes(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        # The operator token that stores the reference values (PUT /v1/references/default).
        token = secrets.token_urlsafe(32)
        token_path = Path(tmp) / "operator-tokens"
        token_path.write_text(token + "\n")
        token_path.chmod(0o600)
        for n, (backend, workers) in enumerate(configurations):
            n_workers = workers or default_workers()
            label = f"{backend}, {n_workers} worker{'s' if n_workers > 1 else ''}" + (
                " (default)" if not workers else ""
            )
            cluster = None
            if backend.startswith("sqlite"):
                options = backend.partition("?")[2]
                url = f"sqlite:///{Path(tmp) / f'verifier-{n}.db'}" + (
                    f"?{options}" if options else ""
                )
            else:
                from tests.verifier.postgres import PostgresCluster, available

                reason = available()
                if reason:
                    rows.append({"name": f"challenge + attest, {label}: skipped ({reason})"})
                    continue
                cluster = PostgresCluster().start()
                url = cluster.create_database()
            server = _Server(url, key_path, token_path, workers, serve_args)
            try:
                server.wait_ready()
                r = httpx.put(
                    server.base + "/v1/references/default",
                    content=references_yaml.encode(),
                    headers={
                        "content-type": "application/yaml",
                        "authorization": f"Bearer {token}",
                    },
                    timeout=60,
                )
                r.raise_for_status()
                database_pid = cluster.postmaster_pid() if cluster is not None else None
                seconds, latencies, cpu = asyncio.run(
                    _load(
                        server.port,
                        bundlers,
                        per_client,
                        warmup=2,
                        meter=functools.partial(_CPUMeter, server.proc.pid, database_pid),
                    )
                )
            finally:
                server.stop()
                if cluster is not None:
                    cluster.stop()
            latencies.sort()
            rows.append(
                {
                    "name": f"challenge + attest, {label}, {concurrency} clients",
                    "entries": len(latencies),
                    "seconds": seconds,
                    "entries_per_s": len(latencies) / seconds,
                    "p50_ms": 1000 * _percentile(latencies, 0.50),
                    "p99_ms": 1000 * _percentile(latencies, 0.99),
                    **{k: round(v, 3) for k, v in cpu.items()},
                }
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attestations", type=int, help="attestations measured per configuration")
    ap.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    ap.add_argument("--ima-entries", type=int, default=DEFAULT_IMA_ENTRIES)
    ap.add_argument(
        "--config",
        metavar="BACKEND:WORKERS",
        action="append",
        help="e.g. sqlite:1, postgresql:2 (0 workers: the default), 'sqlite?synchronous=normal:1'",
    )
    ap.add_argument(
        "--serve-arg",
        metavar="ARG",
        action="append",
        default=[],
        help="an extra argument for cima verifier serve, e.g. --serve-arg=--threads=2 (repeatable)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = run(
        args.attestations,
        concurrency=args.concurrency,
        ima_entries=args.ima_entries,
        configurations=[(c.rpartition(":")[0], int(c.rpartition(":")[2])) for c in args.config]
        if args.config
        else CONFIGURATIONS,
        serve_args=args.serve_arg,
    )
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            extra = ""
            if "p50_ms" in r:
                extra = (
                    f"  p50 {r['p50_ms']:.0f} ms  p99 {r['p99_ms']:.0f} ms"
                    f"  CPU ms/attestation: server {r['server_cpu_ms']:.2f}"
                    + (f" database {r['database_cpu_ms']:.2f}" if "database_cpu_ms" in r else "")
                    + f" load {r['load_cpu_ms']:.2f}"
                    f"  (machine {r['machine_busy_pct']:.0f}% busy, others"
                    f" {r['other_cpu_pct']:.0f}%)"
                )
            rate = f"{r['entries_per_s']:,.0f}/s" if "entries_per_s" in r else ""
            print(f"{r['name']:<60} {rate:>10}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
