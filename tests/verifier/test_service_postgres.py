"""Two verifier instances on one PostgreSQL database serve the same nodes.

Instances A and B are two ``cima verifier serve`` processes
(:class:`tests.verifier.servers.VerifierProcess`) on free ports of 127.0.0.1,
sharing a fresh database of the session's throwaway PostgreSQL cluster
(:mod:`tests.verifier.postgres`). Everything they share goes through the
database: challenges, reference values, results and the nodes' appraisal state.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cima.verifier.reference import create_references
from cima.verifier.store import Store
from tests.verifier.nodes import SoftwareNode
from tests.verifier.postgres import postgres_cluster, postgres_url  # noqa: F401
from tests.verifier.servers import VerifierProcess

JSON = {"content-type": "application/json"}


@dataclass
class Cluster:
    a: httpx.Client
    b: httpx.Client
    url: str

    def challenge(self, at: httpx.Client, node_id: str | None = None) -> bytes:
        r = at.post("/v1/challenge", json={"node_id": node_id} if node_id else {})
        assert r.status_code == 200, r.text
        return bytes.fromhex(r.json()["nonce"])


@pytest.fixture
def cluster(postgres_url: str, tmp_path: Path) -> Iterator[Cluster]:  # noqa: F811
    pem = tmp_path / "jwt.pem"
    pem.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with (
        VerifierProcess(postgres_url, "--instance", "A", jwt_key=pem) as a,
        VerifierProcess(postgres_url, "--instance", "B", jwt_key=pem) as b,
        a.client() as ca,
        b.client() as cb,
    ):
        yield Cluster(ca, cb, postgres_url)


@pytest.fixture
def node() -> SoftwareNode:
    return SoftwareNode(ima_entries=60)


def _put_references(at: httpx.Client, *nodes: SoftwareNode) -> dict[str, Any]:
    refs = create_references([n.bundle(os.urandom(32)) for n in nodes], name="cluster")
    r = at.put(
        "/v1/references/default",
        content=refs.to_yaml().encode(),
        headers={"content-type": "application/yaml"},
    )
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def _together(n: int, fn: Callable[[int], httpx.Response]) -> list[httpx.Response]:
    barrier = threading.Barrier(n)

    def one(i: int) -> httpx.Response:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_references_stored_through_a_are_used_by_b(cluster: Cluster, node: SoftwareNode) -> None:
    put = _put_references(cluster.a, node)
    seen = cluster.b.get("/v1/references/default").json()
    assert (seen["version"], seen["digest"]) == (put["version"], put["digest"])
    nonce = cluster.challenge(cluster.b)
    r = cluster.b.post("/v1/attest", content=node.bundle_json(nonce), headers=JSON)
    assert r.json()["status"] == "affirming"
    assert r.json()["reference"] == {"name": "default", "version": 1}


def test_a_challenge_from_a_is_accepted_at_b_once(cluster: Cluster, node: SoftwareNode) -> None:
    _put_references(cluster.a, node)
    nonce = cluster.challenge(cluster.a, "worker-1")
    body = node.bundle_json(nonce)
    r = cluster.b.post("/v1/attest", content=body, headers=JSON)
    assert r.status_code == 200 and r.json()["node_id"] == "worker-1"
    for again in (cluster.a, cluster.b):
        replay = again.post("/v1/attest", content=body, headers=JSON)
        assert replay.status_code == 409 and replay.json()["error"] == "nonce-used"
    # The result B stored is what A serves.
    assert cluster.a.get("/v1/nodes/worker-1/results/latest").json() == r.json()


def test_incremental_state_written_by_a_is_used_by_b(cluster: Cluster, node: SoftwareNode) -> None:
    _put_references(cluster.a, node)
    first = cluster.a.post(
        "/v1/attest", content=node.bundle_json(cluster.challenge(cluster.a, "w")), headers=JSON
    ).json()
    assert first["result"]["mode"] == "full"
    node.measure_ima(20)
    second = cluster.b.post(
        "/v1/attest", content=node.bundle_json(cluster.challenge(cluster.b, "w")), headers=JSON
    ).json()
    assert second["result"]["mode"] == "incremental", second["result"]["mode_reason"]
    assert "60 IMA entries were appraised before" in second["result"]["mode_reason"]
    with Store(cluster.url) as store:
        state = store.node_state("w")
    assert state.version == 2 and state.state is not None and state.state["ima_entries"] == 80


def test_thirty_two_concurrent_attestations_across_instances_all_succeed(
    cluster: Cluster,
) -> None:
    nodes = [SoftwareNode(ima_entries=30) for _ in range(8)]
    _put_references(cluster.a, *nodes)
    sides = (cluster.a, cluster.b)
    nonces = [cluster.challenge(sides[i % 2], f"worker-{i % 8}") for i in range(32)]
    bodies = [nodes[i % 8].bundle_json(nonces[i]) for i in range(32)]

    def attest(i: int) -> httpx.Response:
        # Challenged at one instance, attested at the other.
        with httpx.Client(base_url=str(sides[(i + 1) % 2].base_url), timeout=120) as http:
            return http.post("/v1/attest", content=bodies[i], headers=JSON)

    responses = _together(32, attest)
    assert [r.status_code for r in responses] == [200] * 32
    assert {r.json()["status"] for r in responses} == {"affirming"}
    assert len(cluster.b.get("/v1/results", params={"limit": 100}).json()["results"]) == 32


def test_eight_concurrent_uses_of_one_nonce_at_both_instances_exactly_one_succeeds(
    cluster: Cluster, node: SoftwareNode
) -> None:
    _put_references(cluster.a, node)
    body = node.bundle_json(cluster.challenge(cluster.a))
    sides = (cluster.a, cluster.b)

    def attest(i: int) -> httpx.Response:
        with httpx.Client(base_url=str(sides[i % 2].base_url), timeout=120) as http:
            return http.post("/v1/attest", content=body, headers=JSON)

    codes = sorted(r.status_code for r in _together(8, attest))
    assert codes == [200] + [409] * 7
    assert len(cluster.a.get("/v1/results").json()["results"]) == 1


def test_two_worker_processes_form_one_instance(
    postgres_url: str,  # noqa: F811
    node: SoftwareNode,
) -> None:
    with VerifierProcess(postgres_url, "--workers", "2") as v, v.client() as http:
        _put_references(http, node)
        for _ in range(4):
            nonce = bytes.fromhex(http.post("/v1/challenge", json={}).json()["nonce"])
            r = http.post("/v1/attest", content=node.bundle_json(nonce), headers=JSON)
            assert r.status_code == 200, r.text
            assert (
                http.post("/v1/attest", content=node.bundle_json(nonce), headers=JSON).status_code
                == 409
            )
        assert len(http.get("/v1/results").json()["results"]) == 4
