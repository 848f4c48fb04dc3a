"""The HTTP verifier's throughput: attestations per second with 32 concurrent clients.

One verifier instance (``python -m cima.cli.verifier serve``, what ``cima
verifier serve`` runs: uvicorn, one process unless a configuration asks for
more workers, every result signed as a JWT) runs in its own process over a
store: SQLite (a file in a temporary directory) and PostgreSQL (a throwaway
cluster, :mod:`tests.verifier.postgres`; skipped when the server binaries or
psycopg are missing). The load comes from this process: ``concurrency``
clients on asyncio, one keep-alive HTTP/1.1 connection each (a minimal client,
so that the load generator takes well under a millisecond of CPU per
attestation from the machine it shares with the server), each client a node of
its own (:class:`tests.verifier.nodes.SoftwareNode`: the GCE boot log of 112
events, ``ima_entries`` entries of a real IMA list, 3 agent events, a P-256
key), looping over one attestation: ``POST /v1/challenge`` for a nonce, a new
quote binding it, ``POST /v1/attest`` with the 107 KiB bundle. Every result
must come back affirming. Each node attests twice before the clock starts, so
the measured appraisals are the steady state of a node that attests
periodically (incremental appraisal from the node's stored state).

Rows: ``entries`` attestations in ``seconds`` (``entries_per_s``), ``p50_ms``
and ``p99_ms`` the latency of one iteration (challenge + attest) as a client
sees it. Two in-process rows say what the evidence itself costs on one core:
decoding the bundle and appraising it.

Where a server's time goes (measured on the 2-core development machine, one
process): about 9 ms of CPU per attestation, of which decoding the bundle
(~2 ms) and appraising it (~2 ms) are nearly half, the store ~1.5 ms (three
transactions: the challenge, one read before the appraisal, one write after),
HTTP for both requests ~0.7 ms, the JWT 0.2 ms, and the rest thread and
interpreter overhead. One process is therefore CPU-bound near 110
attestations per second; more throughput per instance takes worker processes
(``--workers``) on more cores, or cheaper decoding and appraisal.

Usage: ``python benchmarks/bench_service.py [--attestations N] [--config B:W] [--json]``
(``--config sqlite:1``, ``postgresql:2``, ``'sqlite?synchronous=normal:1'``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
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


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


class _Server:
    """``cima verifier serve`` in a child process."""

    def __init__(self, store_url: str, key_path: Path, workers: int = 1) -> None:
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
                "--log-level",
                "error",
                "--workers",
                str(workers),
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
    port: int, bundlers: Sequence[Any], per_client: int, warmup: int
) -> tuple[float, list[float]]:
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
    t0 = time.perf_counter()
    await asyncio.gather(*(client(i, per_client, True) for i in range(len(bundlers))))
    return time.perf_counter() - t0, latencies


def _nodes(concurrency: int, ima_entries: int) -> tuple[list[Any], str]:
    """``concurrency`` nodes with bundlers, and the reference values (YAML) that trust them."""
    from tests.verifier.nodes import FastBundler, SoftwareNode

    from cima.verifier.reference import create_references

    nodes = [SoftwareNode(ima_entries=ima_entries) for _ in range(concurrency)]
    refs = create_references([n.bundle(os.urandom(32)) for n in nodes], name="bench")
    return [FastBundler(n) for n in nodes], refs.to_yaml()


def _in_process_rows(bundler: Any, references_yaml: str, repeat: int = 200) -> list[dict[str, Any]]:
    """Where one attestation's server time goes: decode, appraise (incremental), on one core."""
    from cima.evidence.bundle import EvidenceBundle
    from cima.verifier.appraise import appraise
    from cima.verifier.reference import load_references

    refs = load_references(references_yaml)
    nonce = os.urandom(32)
    body = bundler.bundle_json(nonce)
    state = appraise(EvidenceBundle.from_json(body), refs, nonce=nonce).state
    t0 = time.perf_counter()
    for _ in range(repeat):
        bundle = EvidenceBundle.from_json(body)
    decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeat):
        result = appraise(bundle, refs, nonce=nonce, state=state)
    appraisal = time.perf_counter() - t0
    assert result.status == "affirming", result.failures
    return [
        {
            "name": f"decode one bundle ({len(body) // 1024} KiB, in-process)",
            "entries": repeat,
            "seconds": decode,
            "entries_per_s": repeat / decode,
        },
        {
            "name": f"appraise one bundle ({result.mode}, in-process)",
            "entries": repeat,
            "seconds": appraisal,
            "entries_per_s": repeat / appraisal,
        },
    ]


#: (store backend, worker processes) measured by default.
CONFIGURATIONS: tuple[tuple[str, int], ...] = (("sqlite", 1), ("postgresql", 1), ("postgresql", 2))


def run(
    attestations: int | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    ima_entries: int = DEFAULT_IMA_ENTRIES,
    configurations: Sequence[tuple[str, int]] = CONFIGURATIONS,
) -> list[dict[str, Any]]:
    """Attestations per second through one verifier instance, per store and worker count."""
    import httpx
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

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
        for n, (backend, workers) in enumerate(configurations):
            label = f"{backend}, {workers} worker{'s' if workers > 1 else ''}"
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
            server = _Server(url, key_path, workers)
            try:
                server.wait_ready()
                r = httpx.put(
                    server.base + "/v1/references/default",
                    content=references_yaml.encode(),
                    headers={"content-type": "application/yaml"},
                    timeout=60,
                )
                r.raise_for_status()
                seconds, latencies = asyncio.run(_load(server.port, bundlers, per_client, warmup=2))
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
        help="e.g. sqlite:1, postgresql:2, 'sqlite?synchronous=normal:1' (repeatable)",
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
    )
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            extra = f"  p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms" if "p50_ms" in r else ""
            rate = f"{r['entries_per_s']:,.0f}/s" if "entries_per_s" in r else ""
            print(f"{r['name']:<60} {rate:>10}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
