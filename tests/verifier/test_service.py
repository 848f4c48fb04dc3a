"""The HTTP verifier service on SQLite: real servers, real bundles, real appraisal.

Each test talks HTTP to a uvicorn server on a free port (:class:`ThreadedVerifier`)
over a store in the test's temporary directory. The evidence comes from
:class:`tests.verifier.nodes.SoftwareNode` (the software platform with a real
machine's boot log and IMA list, quoted with a P-256 key), appraised by
:func:`cima.verifier.appraise.appraise` against reference values made from a
known-good bundle of the same node (:func:`cima.verifier.reference.create_references`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cima.verifier.reference import create_references
from cima.verifier.result import verify_jwt
from cima.verifier.service import ServiceConfig, VerifierService, openapi_document
from cima.verifier.store import Store
from tests.verifier.nodes import SoftwareNode
from tests.verifier.servers import SRC, ThreadedVerifier, VerifierProcess

ROOT = Path(__file__).resolve().parents[2]
OPENAPI = ROOT / "docs" / "verifier-openapi.json"
MAX_BODY = 2 * 1024 * 1024
JSON_HEADERS = {"content-type": "application/json"}


@dataclass
class Verifier:
    server: ThreadedVerifier
    http: httpx.Client
    store: Store
    service: VerifierService
    key: ec.EllipticCurvePrivateKey

    def challenge(self, node_id: str | None = None) -> dict[str, Any]:
        r = self.http.post("/v1/challenge", json={} if node_id is None else {"node_id": node_id})
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def attest(self, body: bytes, **params: str) -> httpx.Response:
        return self.http.post(
            "/v1/attest",
            content=body,
            params=params,
            headers={"content-type": "application/json"},
        )

    def put_references(self, node: SoftwareNode, name: str = "default") -> dict[str, Any]:
        refs = create_references([node.bundle(os.urandom(32))], name=f"{name} known good")
        r = self.http.put(
            f"/v1/references/{name}",
            content=refs.to_yaml().encode(),
            headers={"content-type": "application/yaml"},
        )
        assert r.status_code in (200, 201), r.text
        out: dict[str, Any] = r.json()
        return out

    def attested(self, node: SoftwareNode, node_id: str | None = None) -> dict[str, Any]:
        """One whole attestation that must succeed; its response."""
        ch = self.challenge(node_id)
        r = self.attest(node.bundle_json(bytes.fromhex(ch["nonce"])), session=ch["session"])
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out


@pytest.fixture
def verifier(tmp_path: Path) -> Iterator[Verifier]:
    key = ec.generate_private_key(ec.SECP256R1())
    store = Store(f"sqlite:///{tmp_path / 'verifier.db'}", instance="test")
    service = VerifierService(store, ServiceConfig(max_body=MAX_BODY, jwt_key=key))
    with ThreadedVerifier(service) as server, server.client() as http:
        yield Verifier(server, http, store, service, key)
    store.close()


@pytest.fixture
def node() -> SoftwareNode:
    return SoftwareNode(ima_entries=60)


@pytest.fixture
def ready(verifier: Verifier, node: SoftwareNode) -> Verifier:
    """A verifier with reference values that accept ``node``."""
    verifier.put_references(node)
    return verifier


# -- the API description --------------------------------------------------------------------------


def test_committed_openapi_document_is_the_generated_one(verifier: Verifier) -> None:
    committed = json.loads(OPENAPI.read_text())
    assert committed == openapi_document(), (
        "docs/verifier-openapi.json is stale: regenerate it with "
        "`python -m cima.cli.verifier openapi -o docs/verifier-openapi.json`"
    )
    assert verifier.http.get("/openapi.json").json() == committed


def test_openapi_describes_every_route_and_the_bundle() -> None:
    doc = openapi_document()
    assert set(doc["paths"]) >= {
        "/v1/challenge",
        "/v1/attest",
        "/v1/references/{name}",
        "/v1/results",
        "/v1/nodes/{node}/results/latest",
        "/healthz",
    }
    body = doc["paths"]["/v1/attest"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/EvidenceBundle"}
    bundle = doc["components"]["schemas"]["EvidenceBundle"]
    assert "nonce" in bundle["required"]
    refs = json.dumps(doc)
    for ref in set(_refs(doc)):
        assert ref.removeprefix("#/components/schemas/") in doc["components"]["schemas"], ref
    assert "#/$defs/" not in refs


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


# -- attestation ----------------------------------------------------------------------------------


def test_an_attestation_is_appraised_stored_and_signed(ready: Verifier, node: SoftwareNode) -> None:
    ch = ready.challenge("worker-1")
    assert len(bytes.fromhex(ch["nonce"])) == 32 and ch["node_id"] == "worker-1"
    r = ready.attest(node.bundle_json(bytes.fromhex(ch["nonce"])), session=ch["session"])
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["status"] == "affirming", out["result"]["failures"]
    assert out["node_id"] == "worker-1"
    assert out["reference"] == {"name": "default", "version": 1}
    assert out["result"]["nonce"] == ch["nonce"]
    assert {"evidence", "boot", "ima", "system"} <= set(out["result"]["submods"])
    # The token: EAR claims, ES256, the key the service publishes.
    public_pem = ready.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = verify_jwt(out["token"], public_pem)
    assert claims["cima.node"] == "worker-1"
    assert out["key_id"].startswith("sha256:") and claims["cima.key"] == out["key_id"]
    assert claims["cima.status"] == "affirming"
    assert (
        claims["eat_nonce"]
        == base64.urlsafe_b64encode(bytes.fromhex(ch["nonce"])).rstrip(b"=").decode()
    )
    jwks = ready.http.get("/v1/keys").json()["keys"]
    assert [k["kid"] for k in jwks] == [jwt.get_unverified_header(out["token"])["kid"]]
    assert jwt.decode(out["token"], jwt.PyJWK(jwks[0]).key, algorithms=["ES256"]) == claims
    # Stored: by id, per node, latest.
    assert ready.http.get(f"/v1/results/{out['id']}").json() == out
    assert ready.http.get("/v1/nodes/worker-1/results/latest").json() == out
    assert [x["id"] for x in ready.http.get("/v1/results?node=worker-1").json()["results"]] == [
        out["id"]
    ]


def test_a_replayed_nonce_is_refused(ready: Verifier, node: SoftwareNode) -> None:
    ch = ready.challenge()
    body = node.bundle_json(bytes.fromhex(ch["nonce"]))
    assert ready.attest(body).status_code == 200
    again = ready.attest(body)
    assert again.status_code == 409
    assert again.json()["error"] == "nonce-used" and "already used" in again.json()["detail"]
    assert ready.store.count_results() == 1


def test_a_nonce_the_verifier_never_issued_is_refused(ready: Verifier, node: SoftwareNode) -> None:
    r = ready.attest(node.bundle_json(os.urandom(32)))
    assert r.status_code == 403
    assert r.json()["error"] == "nonce-unknown"
    assert "not issued by this verifier" in r.json()["detail"]


def test_an_expired_nonce_is_refused(ready: Verifier, node: SoftwareNode) -> None:
    old = ready.store.create_challenge(
        ttl=timedelta(seconds=60), now=datetime.now(UTC) - timedelta(minutes=2)
    )
    r = ready.attest(node.bundle_json(old.nonce))
    assert r.status_code == 403
    assert r.json()["error"] == "nonce-expired"


def test_a_nonce_of_another_session_is_refused_and_stays_usable(
    ready: Verifier, node: SoftwareNode
) -> None:
    ch = ready.challenge()
    body = node.bundle_json(bytes.fromhex(ch["nonce"]))
    r = ready.attest(body, session="not-the-session")
    assert r.status_code == 403 and r.json()["error"] == "nonce-session"
    assert ready.attest(body, session=ch["session"]).status_code == 200


def test_the_node_comes_from_the_challenge_the_request_or_the_key(
    ready: Verifier, node: SoftwareNode
) -> None:
    ch = ready.challenge()
    by_key = ready.attest(node.bundle_json(bytes.fromhex(ch["nonce"])))
    assert by_key.json()["node_id"].startswith("key-")
    ch = ready.challenge()
    named = ready.attest(node.bundle_json(bytes.fromhex(ch["nonce"])), node="worker-7")
    assert named.json()["node_id"] == "worker-7"
    ch = ready.challenge("worker-8")
    body = node.bundle_json(bytes.fromhex(ch["nonce"]))
    other = ready.attest(body, node="worker-9")
    assert other.status_code == 400 and other.json()["error"] == "node-mismatch"
    assert ready.attest(body).json()["node_id"] == "worker-8"  # the nonce was not spent


def test_without_reference_values_the_attestation_waits(
    verifier: Verifier, node: SoftwareNode
) -> None:
    ch = verifier.challenge()
    body = node.bundle_json(bytes.fromhex(ch["nonce"]))
    r = verifier.attest(body)
    assert r.status_code == 404 and "PUT /v1/references/default" in r.json()["detail"]
    verifier.put_references(node)
    assert verifier.attest(body).json()["status"] == "affirming"


def test_named_reference_sets(verifier: Verifier, node: SoftwareNode) -> None:
    verifier.put_references(node, name="gce-workers")
    ch = verifier.challenge()
    r = verifier.attest(node.bundle_json(bytes.fromhex(ch["nonce"])), reference="gce-workers")
    assert r.json()["reference"] == {"name": "gce-workers", "version": 1}


def test_bad_evidence_is_a_stored_contraindicated_result(
    ready: Verifier, node: SoftwareNode
) -> None:
    # Another node, whose key the reference values do not trust.
    stranger = SoftwareNode(ima_entries=60)
    ch = ready.challenge("stranger")
    r = ready.attest(stranger.bundle_json(bytes.fromhex(ch["nonce"])))
    assert r.status_code == 200 and r.json()["status"] == "contraindicated"
    assert any(f["step"] == 2 for f in r.json()["result"]["failures"])
    # A quoted PCR that the logs do not explain.
    ch = ready.challenge("tampered")
    doc = json.loads(node.bundle_json(bytes.fromhex(ch["nonce"])))
    doc["report"]["pcrs"][4]["digest"] = "00" * 32
    r = ready.attest(json.dumps(doc).encode())
    assert r.status_code == 200 and r.json()["status"] == "contraindicated"
    assert ready.http.get("/v1/nodes/tampered/results/latest").json()["status"] == (
        "contraindicated"
    )


def test_appraisal_is_incremental_across_attestations(ready: Verifier, node: SoftwareNode) -> None:
    first = ready.attested(node, "worker-1")
    assert first["result"]["mode"] == "full"
    node.measure_ima(40)  # new files measured since (unknown to the references: contraindicated)
    second = ready.attested(node, "worker-1")
    assert second["result"]["mode"] == "incremental", second["result"]["mode_reason"]
    assert second["result"]["submods"]["ima"]["status"] == "contraindicated"
    state = ready.store.node_state("worker-1")
    assert state.version == 2 and state.state is not None
    assert state.state["ima_entries"] == 100


def test_a_changed_boot_log_is_appraised_again(ready: Verifier, node: SoftwareNode) -> None:
    """The service keeps what a boot log decodes and appraises to; a changed log is found."""
    assert ready.attested(node, "worker-1")["status"] == "affirming"
    second = ready.attested(node, "worker-1")
    assert second["status"] == "affirming" and second["result"]["mode"] == "incremental"
    good = node.boot
    i = next(n for n, r in enumerate(good) if r.event_type == 0x0D and r.extends)  # EV_IPL
    # Its data is not what its digest covers: the quote still matches the log's replay.
    evil = {"event_type": 0x0D, "event_data": b"grub_cmd: linux /vmlinuz-evil\x00"}
    node.boot = (*good[:i], dataclasses.replace(good[i], content=evil), *good[i + 1 :])
    try:
        changed = ready.attested(node, "worker-1")
    finally:
        node.boot = good
    assert changed["status"] == "contraindicated"
    failures = changed["result"]["failures"]
    assert [(f["code"], f["event"]) for f in failures if f["submodule"] == "boot"] == [
        ("boot-event", i)
    ]
    assert ready.attested(node, "worker-1")["status"] == "affirming"


# -- reference values -----------------------------------------------------------------------------


def test_reference_values_are_versioned_yaml_or_json(
    verifier: Verifier, node: SoftwareNode
) -> None:
    refs = create_references([node.bundle(os.urandom(32))], name="workers")
    yaml_text = refs.to_yaml().encode()
    put = verifier.http.put(
        "/v1/references/workers", content=yaml_text, headers={"content-type": "application/yaml"}
    )
    assert put.status_code == 201 and put.json()["version"] == 1
    same = verifier.http.put(
        "/v1/references/workers",
        content=json.dumps(refs.to_dict()).encode(),
        headers={"content-type": "application/json"},
    )
    assert same.status_code == 200 and same.json()["version"] == 1
    changed = dict(refs.to_dict(), name="workers, second take")
    put2 = verifier.http.put("/v1/references/workers", json=changed)
    assert put2.status_code == 201 and put2.json()["version"] == 2
    latest = verifier.http.get("/v1/references/workers").json()
    assert latest["version"] == 2 and latest["document"]["name"] == "workers, second take"
    first = verifier.http.get("/v1/references/workers", params={"version": 1}).json()
    assert first["document"] == refs.to_dict()
    assert verifier.http.get("/v1/references").json()["references"][0]["version"] == 2


BAD_REFERENCES: list[tuple[str, bytes, str, int, str]] = [
    ("unknown key", b"version: 1\nbogus: 1\n", "application/yaml", 422, "bogus"),
    ("wrong version", b"version: 9\n", "application/yaml", 422, "version 9"),
    ("not a mapping", b"- 1\n- 2\n", "application/yaml", 422, "mapping"),
    ("not YAML", b"version: [1\n", "application/yaml", 400, "not YAML"),
    ("YAML aliases", b"a: &x [1]\nb: *x\nversion: 1\n", "application/yaml", 400, "aliases"),
    ("not JSON", b"{version: 1", "application/json", 400, "not JSON"),
    ("not UTF-8", b"version: 1\nname: \xff\n", "application/yaml", 400, "UTF-8"),
    ("media type", b"version: 1\n", "image/png", 415, "image/png"),
]


@pytest.mark.parametrize(
    ("body", "media", "status", "words"),
    [b[1:] for b in BAD_REFERENCES],
    ids=[b[0] for b in BAD_REFERENCES],
)
def test_bad_reference_values_are_refused(
    verifier: Verifier, body: bytes, media: str, status: int, words: str
) -> None:
    r = verifier.http.put("/v1/references/x", content=body, headers={"content-type": media})
    assert (r.status_code, words in r.json()["detail"]) == (status, True), r.text
    assert verifier.http.get("/v1/references/x").status_code == 404


# -- bad input: a named dataset, one assertion each; then nothing stored is lost ------------------


def _bundle_doc(node: SoftwareNode, ready: Verifier) -> dict[str, Any]:
    ch = ready.challenge()
    doc: dict[str, Any] = json.loads(node.bundle_json(bytes.fromhex(ch["nonce"])))
    return doc


def _without(key: str) -> Callable[[dict[str, Any]], Any]:
    def edit(doc: dict[str, Any]) -> Any:
        del doc[key]
        return doc

    return edit


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    def edit(doc: dict[str, Any]) -> Any:
        *parents, last = path.split(".")
        target = doc
        for p in parents:
            target = target[p]
        target[last] = value
        return doc

    return edit


@dataclass(frozen=True)
class BadRequest:
    name: str
    method: str
    path: str
    status: int
    words: str
    edit: Callable[[dict[str, Any]], Any] | None = None
    raw: bytes | None = None
    headers: dict[str, str] | None = None
    params: dict[str, str] | None = None
    chunked: bool = False


BAD_REQUESTS = [
    BadRequest("not JSON", "POST", "/v1/attest", 400, "not JSON", raw=b'{"version": 1,'),
    BadRequest("empty body", "POST", "/v1/attest", 400, "not JSON", raw=b""),
    BadRequest("nested too deep", "POST", "/v1/attest", 400, "JSON", raw=b"[" * 100_000),
    BadRequest("an array", "POST", "/v1/attest", 422, "JSON object", edit=lambda d: [d]),
    BadRequest("missing logs", "POST", "/v1/attest", 422, "logs: missing", edit=_without("logs")),
    BadRequest(
        "missing nonce", "POST", "/v1/attest", 422, "nonce: missing", edit=_without("nonce")
    ),
    BadRequest(
        "nonce not a string",
        "POST",
        "/v1/attest",
        422,
        "nonce: must be a string",
        edit=_set("nonce", 5),
    ),
    BadRequest(
        "nonce not hex", "POST", "/v1/attest", 422, "nonce: not a hex", edit=_set("nonce", "zz")
    ),
    BadRequest(
        "report not an object",
        "POST",
        "/v1/attest",
        422,
        "report: must be an object",
        edit=_set("report", "x"),
    ),
    BadRequest(
        "signature not base64",
        "POST",
        "/v1/attest",
        422,
        "report.signature: not base64",
        edit=_set("report.signature", "!!"),
    ),
    BadRequest(
        "boot log not a list",
        "POST",
        "/v1/attest",
        422,
        "logs.boot",
        edit=_set("logs.boot", {"a": 1}),
    ),
    BadRequest(
        "unknown field",
        "POST",
        "/v1/attest",
        422,
        "surprise: unknown field",
        edit=_set("surprise", 1),
    ),
    BadRequest(
        "unknown version",
        "POST",
        "/v1/attest",
        422,
        "version 2 is not supported",
        edit=_set("version", 2),
    ),
    BadRequest(
        "version a string",
        "POST",
        "/v1/attest",
        422,
        "version: must be an integer",
        edit=_set("version", "1"),
    ),
    BadRequest(
        "too large (declared)",
        "POST",
        "/v1/attest",
        413,
        "at most",
        raw=b" " * (MAX_BODY + 1),
    ),
    BadRequest(
        "too large (chunked)",
        "POST",
        "/v1/attest",
        413,
        "over",
        raw=b" " * (MAX_BODY + 1),
        chunked=True,
    ),
    BadRequest(
        "media type",
        "POST",
        "/v1/attest",
        415,
        "text/plain",
        raw=b"{}",
        headers={"content-type": "text/plain"},
    ),
    BadRequest(
        "node id",
        "POST",
        "/v1/attest",
        422,
        "node id",
        edit=lambda d: d,
        params={"node": "a b"},
    ),
    BadRequest(
        "reference name",
        "POST",
        "/v1/attest",
        422,
        "reference set name",
        edit=lambda d: d,
        params={"reference": "../etc"},
    ),
    BadRequest(
        "challenge field type",
        "POST",
        "/v1/challenge",
        422,
        "node_id",
        raw=b'{"node_id": 5}',
    ),
    BadRequest(
        "challenge unknown field",
        "POST",
        "/v1/challenge",
        422,
        "nonce: unknown field",
        raw=b'{"nonce": "00"}',
    ),
    BadRequest(
        "challenge bad node",
        "POST",
        "/v1/challenge",
        422,
        "node id",
        raw=b'{"node_id": "-x"}',
    ),
    BadRequest("challenge not JSON", "POST", "/v1/challenge", 422, "JSON", raw=b"{"),
    BadRequest(
        "challenge too large",
        "POST",
        "/v1/challenge",
        413,
        "at most",
        raw=b" " * (MAX_BODY + 1),
    ),
    BadRequest(
        "references too large",
        "PUT",
        "/v1/references/default",
        413,
        "over",
        raw=b" " * (MAX_BODY + 1),
        chunked=True,
    ),
    BadRequest("results limit", "GET", "/v1/results", 422, "limit", params={"limit": "0"}),
    BadRequest("result id", "GET", "/v1/results/x", 422, "result_id"),
    BadRequest("no such result", "GET", "/v1/results/999999", 404, "not found"),
    BadRequest("no such node", "GET", "/v1/nodes/nobody/results/latest", 404, "no results"),
    BadRequest("no such reference", "GET", "/v1/references/none", 404, "not found"),
    BadRequest(
        "reference version",
        "GET",
        "/v1/references/default",
        422,
        "version",
        params={"version": "0"},
    ),
]


def _send(ready: Verifier, node: SoftwareNode, bad: BadRequest) -> httpx.Response:
    body = bad.raw
    if body is None and bad.edit is not None:
        body = json.dumps(bad.edit(_bundle_doc(node, ready))).encode()
    headers = bad.headers or ({"content-type": "application/json"} if bad.method != "GET" else {})
    content: Any = body
    if bad.chunked:
        content = iter([body[i : i + 65536] for i in range(0, len(body), 65536)])
    return ready.http.request(
        bad.method,
        bad.path,
        content=content if bad.method != "GET" else None,
        headers=headers,
        params=bad.params,
    )


@pytest.mark.parametrize("bad", BAD_REQUESTS, ids=[b.name for b in BAD_REQUESTS])
def test_bad_request(ready: Verifier, node: SoftwareNode, bad: BadRequest) -> None:
    r = _send(ready, node, bad)
    assert (r.status_code, bad.words in r.json()["detail"]) == (bad.status, True), r.text


def test_after_a_run_of_bad_requests_nothing_stored_is_lost(
    ready: Verifier, node: SoftwareNode
) -> None:
    before = [ready.attested(node, f"worker-{i}") for i in range(3)]
    references = ready.http.get("/v1/references/default").json()
    for bad in BAD_REQUESTS:
        assert _send(ready, node, bad).status_code == bad.status, bad.name
    assert ready.http.get("/healthz").json()["status"] == "ok"
    assert ready.http.get("/v1/references/default").json() == references
    stored = ready.http.get("/v1/results").json()["results"]
    assert [r["id"] for r in stored] == [r["id"] for r in reversed(before)]
    for r in before:
        assert ready.http.get(f"/v1/results/{r['id']}").json() == r
    assert ready.attested(node, "worker-0")["status"] == "affirming"


# -- concurrency ----------------------------------------------------------------------------------


def _together(n: int, fn: Callable[[int], httpx.Response]) -> list[httpx.Response]:
    barrier = threading.Barrier(n)

    def one(i: int) -> httpx.Response:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_thirty_two_concurrent_attestations_all_succeed(
    ready: Verifier, node: SoftwareNode
) -> None:
    challenges = [ready.challenge(f"worker-{i % 4}") for i in range(32)]
    bodies = [node.bundle_json(bytes.fromhex(c["nonce"])) for c in challenges]

    def attest(i: int) -> httpx.Response:
        with ready.server.client() as http:
            return http.post(
                "/v1/attest", content=bodies[i], headers={"content-type": "application/json"}
            )

    responses = _together(32, attest)
    assert [r.status_code for r in responses] == [200] * 32
    assert {r.json()["status"] for r in responses} == {"affirming"}
    assert ready.store.count_results() == 32


def test_eight_concurrent_uses_of_one_nonce_exactly_one_succeeds(
    ready: Verifier, node: SoftwareNode
) -> None:
    ch = ready.challenge()
    body = node.bundle_json(bytes.fromhex(ch["nonce"]))

    def attest(_: int) -> httpx.Response:
        with ready.server.client() as http:
            return http.post(
                "/v1/attest", content=body, headers={"content-type": "application/json"}
            )

    codes = sorted(r.status_code for r in _together(8, attest))
    assert codes == [200] + [409] * 7
    assert ready.store.count_results() == 1


# -- the command ----------------------------------------------------------------------------------


def test_cima_verifier_serve(tmp_path: Path, node: SoftwareNode) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "jwt.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    url = f"sqlite:///{tmp_path / 'v.db'}"
    with VerifierProcess(url, jwt_key=pem) as v, v.client() as http:
        refs = create_references([node.bundle(os.urandom(32))])
        assert http.put("/v1/references/default", content=refs.to_yaml()).status_code == 201
        ch = http.post("/v1/challenge", json={"node_id": "n1"}).json()
        r = http.post("/v1/attest", content=node.bundle_json(bytes.fromhex(ch["nonce"])))
        assert r.json()["status"] == "affirming"
        assert http.get("/v1/keys").json()["keys"][0]["alg"] == "ES256"
    # Everything is in the store when the process is gone.
    with Store(url) as store:
        latest = store.latest_result("n1")
        assert latest is not None and latest.token is not None


def test_worker_processes_share_one_sqlite_store(tmp_path: Path, node: SoftwareNode) -> None:
    """``--workers 2``: each worker listens itself, both serve, a nonce is accepted once."""
    url = f"sqlite:///{tmp_path / 'v.db'}"
    with VerifierProcess(url, "--workers", "2") as v, v.client() as http:
        seen: set[str] = set()
        for _ in range(200):  # new connections until both workers have answered
            seen.add(httpx.get(v.base + "/healthz", timeout=10).json()["instance"])
            if len(seen) == 2:
                break
        assert len(seen) == 2, seen
        refs = create_references([node.bundle(os.urandom(32))])
        assert http.put("/v1/references/default", content=refs.to_yaml()).status_code == 201
        bodies = [
            node.bundle_json(bytes.fromhex(http.post("/v1/challenge", json={}).json()["nonce"]))
            for _ in range(24)
        ]

        def attest(i: int) -> httpx.Response:
            with v.client() as own:  # a connection of its own: the kernel picks the worker
                return own.post("/v1/attest", content=bodies[i], headers=JSON_HEADERS)

        assert {r.status_code for r in _together(24, attest)} == {200}
        assert {r.status_code for r in _together(8, lambda _: attest(0))} == {409}
        once = node.bundle_json(bytes.fromhex(http.post("/v1/challenge", json={}).json()["nonce"]))

        def again(_: int) -> httpx.Response:
            with v.client() as own:
                return own.post("/v1/attest", content=once, headers=JSON_HEADERS)

        assert sorted(r.status_code for r in _together(8, again)) == [200] + [409] * 7
    with Store(url) as store, store.engine.connect() as conn:
        assert store.count_results() == 25
        instances = conn.exec_driver_sql("SELECT DISTINCT instance FROM cima_results").all()
        assert len(instances) == 2, instances  # both workers stored results


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_address_in_use_is_refused(tmp_path: Path, workers: str) -> None:
    with VerifierProcess(f"sqlite:///{tmp_path / 'a.db'}", "--workers", "2") as v:
        done = _cli(
            "serve",
            "--store",
            f"sqlite:///{tmp_path / 'b.db'}",
            "--listen",
            f"127.0.0.1:{v.port}",
            "--workers",
            workers,
        )
        assert done.returncode == 2 and "in use" in done.stderr, done.stderr
        with v.client() as http:
            assert http.get("/healthz").status_code == 200


def test_a_tls_key_that_does_not_load_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    done = _cli(
        "serve",
        "--store",
        f"sqlite:///{tmp_path / 'v.db'}",
        "--tls-cert",
        str(tmp_path / "cert.pem"),
        "--tls-key",
        str(tmp_path / "cert.pem"),
    )
    assert done.returncode == 2 and "--tls-cert" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_store_work_on_threads(tmp_path: Path, node: SoftwareNode) -> None:
    """``threads`` > 0: the store's work on threads; every rule holds as on the event loop."""
    store = Store(f"sqlite:///{tmp_path / 'v.db'}", instance="threads")
    service = VerifierService(store, ServiceConfig(threads=3))
    try:
        with ThreadedVerifier(service) as server, server.client() as http:
            refs = create_references([node.bundle(os.urandom(32))])
            assert http.put("/v1/references/default", content=refs.to_yaml()).status_code == 201
            bodies = [
                node.bundle_json(bytes.fromhex(http.post("/v1/challenge", json={}).json()["nonce"]))
                for _ in range(12)
            ]

            def attest(i: int) -> httpx.Response:
                with server.client() as own:
                    return own.post("/v1/attest", content=bodies[i % 12], headers=JSON_HEADERS)

            responses = _together(24, attest)  # each body twice: one 200, one 409
            assert sorted(r.status_code for r in responses) == [200] * 12 + [409] * 12
            assert {r.json()["status"] for r in responses if r.status_code == 200} == {"affirming"}
        assert store.count_results() == 12
    finally:
        store.close()


def test_a_server_process_tunes_its_garbage_collector() -> None:
    code = (
        "import gc; from cima.verifier.service import tune_gc; tune_gc(); "
        "print(gc.get_threshold()[0], gc.get_freeze_count() > 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(SRC)),
        check=True,
    )
    assert done.stdout.split() == ["20000", "True"]


def test_workers_stop_when_the_instance_process_is_killed(tmp_path: Path) -> None:
    import signal
    import time

    v = VerifierProcess(f"sqlite:///{tmp_path / 'v.db'}", "--workers", "2")
    with v:
        assert v.proc is not None
        os.kill(v.proc.pid, signal.SIGKILL)  # no chance to stop its workers itself
        v.proc.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                httpx.get(v.base + "/healthz", timeout=1)
            except httpx.HTTPError:
                break  # nobody listens any more
            time.sleep(0.2)
        else:
            raise AssertionError("the workers went on serving without their instance")


def test_accepted_connections_do_not_wait_for_nagle() -> None:
    """A response written in two parts goes out at once (TCP_NODELAY on accepted sockets)."""
    import asyncio
    import socket

    from cima.verifier.service import listening_socket

    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    found: list[int] = []

    async def main() -> None:
        async def handle(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            found.append(
                w.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            )
            w.close()

        server = await asyncio.start_server(handle, sock=sock)
        async with server:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(100):
                if found:
                    break
                await asyncio.sleep(0.01)
            w.close()

    asyncio.run(main())
    assert found and found[0] != 0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    return subprocess.run(
        [sys.executable, "-m", "cima.cli.verifier", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_cima_verifier_openapi_writes_the_committed_document(tmp_path: Path) -> None:
    done = _cli("openapi", "-o", str(tmp_path / "api.json"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "api.json").read_text() == OPENAPI.read_text()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--jwt-key", "/nonexistent.pem"], "no such file"),
        (["--listen", "nowhere"], "HOST:PORT"),
        (["--store", "mysql://x/y"], "supported are sqlite"),
        (["--challenge-ttl", "0"], "must be positive"),
        (["--workers", "0"], "--workers 0: must be at least 1"),
        (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "no such file"),
        (["--threads", "-1"], "--threads -1: must be 0 or more"),
    ],
)
def test_cima_verifier_serve_refuses_bad_arguments(
    tmp_path: Path, args: list[str], words: str
) -> None:
    done = _cli("serve", "--store", f"sqlite:///{tmp_path / 'v.db'}", *args)
    assert done.returncode == 2 and words in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_rsa_jwt_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = tmp_path / "rsa.pem"
    pem.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    done = _cli("serve", "--store", f"sqlite:///{tmp_path / 'v.db'}", "--jwt-key", str(pem))
    assert done.returncode == 2 and "EC P-256" in done.stderr
