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
import secrets
import subprocess
import sys
import threading
import time
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
from cima.verifier.service import (
    ServiceConfig,
    VerifierService,
    openapi_document,
    operator_token_digest,
)
from cima.verifier.store import Store
from tests.verifier.nodes import SoftwareNode
from tests.verifier.servers import (
    OPERATOR_DIGESTS,
    OPERATOR_TOKEN,
    SRC,
    ThreadedVerifier,
    VerifierProcess,
    bearer,
    write_token_file,
)

ROOT = Path(__file__).resolve().parents[2]
OPENAPI = ROOT / "docs" / "verifier-openapi.json"
MAX_BODY = 2 * 1024 * 1024
JSON_HEADERS = {"content-type": "application/json"}
#: A second operator token of the `verifier` fixture (a token being rotated in).
SECOND_TOKEN = secrets.token_urlsafe(32)


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
    tokens = (*OPERATOR_DIGESTS, operator_token_digest(SECOND_TOKEN))
    config = ServiceConfig(max_body=MAX_BODY, jwt_key=key, operator_tokens=tokens)
    service = VerifierService(store, config)
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
    service = VerifierService(store, ServiceConfig(threads=3, operator_tokens=OPERATOR_DIGESTS))
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


# -- operator authorization: who may store reference values ----------------------------------------

UNAUTHORIZED = 'Bearer realm="cima-verifier"'


def _refs_yaml(node: SoftwareNode, name: str = "workers") -> bytes:
    return create_references([node.bundle(os.urandom(32))], name=name).to_yaml().encode()


def _assert_unauthorized(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == UNAUTHORIZED
    assert r.json()["error"] == "unauthorized" and "\n" not in r.json()["detail"]


def test_a_reference_write_takes_an_operator_token(verifier: Verifier, node: SoftwareNode) -> None:
    body = _refs_yaml(node)
    yaml_type = {"content-type": "application/yaml"}
    with httpx.Client(base_url=verifier.server.base, timeout=60) as anyone:
        refused = [
            {},
            {"authorization": "Basic " + base64.b64encode(b"operator:secret").decode()},
            {"authorization": f"Basic {OPERATOR_TOKEN}"},
            {"authorization": f"Bearer {secrets.token_urlsafe(32)}"},
            {"authorization": f"Bearer {OPERATOR_TOKEN}x"},
            {"authorization": "Bearer"},
        ]
        for headers in refused:
            r = anyone.put("/v1/references/workers", content=body, headers=yaml_type | headers)
            _assert_unauthorized(r)
            assert anyone.get("/v1/references/workers").status_code == 404
        assert anyone.get("/v1/references").json() == {"references": []}
        # The first token, then the second (both in the file: a token being rotated).
        first = anyone.put(
            "/v1/references/workers",
            content=body,
            headers=yaml_type | {"authorization": f"Bearer {OPERATOR_TOKEN}"},
        )
        assert first.status_code == 201 and first.json()["version"] == 1, first.text
        changed = _refs_yaml(node, "workers, second take")
        second = anyone.put(
            "/v1/references/workers",
            content=changed,
            headers=yaml_type | {"authorization": f"bearer {SECOND_TOKEN}"},  # any case
        )
        assert second.status_code == 201 and second.json()["version"] == 2, second.text
        stored = anyone.get("/v1/references/workers").json()
        for headers in refused:
            r = anyone.put(
                "/v1/references/workers", content=_refs_yaml(node, "evil"), headers=headers
            )
            _assert_unauthorized(r)
            assert anyone.get("/v1/references/workers").json() == stored
        assert stored["version"] == 2 and stored["document"]["name"] == "workers, second take"


def test_a_refused_write_is_refused_before_its_body_is_read(verifier: Verifier) -> None:
    """No token: 401 whatever the body (not 400 unreadable, not 413 too large, not 422)."""
    wrong = {"authorization": f"Bearer {secrets.token_urlsafe(32)}"}
    over = b" " * (MAX_BODY + 1)
    with httpx.Client(base_url=verifier.server.base, timeout=60, headers=wrong) as anyone:
        _assert_unauthorized(
            anyone.put("/v1/references/x", content=b"version: [1", headers=JSON_HEADERS)
        )
        _assert_unauthorized(
            anyone.put(
                "/v1/references/x",
                content=iter([over[i : i + 65536] for i in range(0, len(over), 65536)]),
            )
        )
        _assert_unauthorized(anyone.put("/v1/references/" + "n" * 300, content=b"version: 1\n"))
        _assert_unauthorized(anyone.put("/v1/references/x", content=b"\xff", headers={}))
        # The connection goes on serving after a refusal whose body was never read.
        assert anyone.get("/healthz").status_code == 200
        assert anyone.get("/v1/references").json() == {"references": []}
    # With the token, the same requests are judged on their bodies.
    assert verifier.http.put("/v1/references/x", content=b"version: [1").status_code == 400


def test_an_instance_without_operator_tokens_is_read_only(
    ready: Verifier, node: SoftwareNode, tmp_path: Path
) -> None:
    """It serves challenges, attestations and reads; reference values come from elsewhere."""
    store = Store(f"sqlite:///{tmp_path / 'verifier.db'}", instance="read-only")
    try:
        service = VerifierService(store, ServiceConfig(jwt_key=ready.key))
        with ThreadedVerifier(service) as server, server.client() as http:  # sends the token
            before = http.get("/v1/references/default").json()
            for headers in ({}, {"authorization": "Basic eDp5"}):
                r = http.put("/v1/references/default", content=_refs_yaml(node), headers=headers)
                assert r.status_code == 403, r.text
                assert r.json() == {
                    "error": "read_only",
                    "detail": "this instance takes no reference values: it was started "
                    "without --operator-token-file",
                }
                assert "www-authenticate" not in r.headers
            with httpx.Client(base_url=server.base, timeout=60) as anyone:
                r = anyone.put("/v1/references/new", content=b"version: 1\n")
                assert r.status_code == 403 and r.json()["error"] == "read_only"
            assert http.get("/v1/references/default").json() == before
            assert http.get("/v1/references/new").status_code == 404
            assert [x["name"] for x in http.get("/v1/references").json()["references"]] == [
                "default"
            ]
            ch = http.post("/v1/challenge", json={"node_id": "worker-1"}).json()
            r = http.post(
                "/v1/attest",
                content=node.bundle_json(bytes.fromhex(ch["nonce"])),
                params={"session": ch["session"]},
                headers=JSON_HEADERS,
            )
            assert r.status_code == 200 and r.json()["status"] == "affirming", r.text
            assert http.get(f"/v1/results/{r.json()['id']}").json() == r.json()
            assert http.get("/v1/nodes/worker-1/results/latest").json() == r.json()
            assert http.get("/v1/keys").json()["keys"][0]["alg"] == "ES256"
            assert http.get("/healthz").json()["status"] == "ok"
    finally:
        store.close()


def test_the_api_description_declares_the_operator_token() -> None:
    doc = openapi_document()
    assert doc["components"]["securitySchemes"]["operatorToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["operatorToken"]["description"],
    }
    put = doc["paths"]["/v1/references/{name}"]["put"]
    assert put["security"] == [{"operatorToken": []}]
    assert {"401", "403"} <= set(put["responses"])
    assert "WWW-Authenticate" in put["responses"]["401"]["headers"]
    secured = [
        (path, method)
        for path, operations in doc["paths"].items()
        for method, operation in operations.items()
        if "security" in operation
    ]
    assert sorted(secured) == [
        ("/v1/enrollments/keys/{ak_name}", "delete"),
        ("/v1/references/{name}", "put"),
    ]


def test_operator_token_files(tmp_path: Path) -> None:
    from cima.verifier.service import OperatorTokenError, load_operator_tokens

    first, second = secrets.token_urlsafe(32), "x" * 32
    good = tmp_path / "tokens"
    good.write_bytes(
        f"# operators\r\n\r\n  {first}  \r\n# rotating in:\n{second}\n{first}\n".encode()
    )
    good.chmod(0o640)  # the group may read it; others may not
    assert load_operator_tokens(good) == (
        operator_token_digest(first),
        operator_token_digest(second),
    )

    def refused(text: bytes, mode: int = 0o600) -> str:
        path = tmp_path / "bad"
        path.write_bytes(text)
        path.chmod(mode)
        with pytest.raises(OperatorTokenError) as e:
            load_operator_tokens(path)
        message = str(e.value)
        assert message.startswith(f"{path}: ") and "\n" not in message
        return message

    assert "line 2: a token is at least 32 characters, this one has 31" in refused(
        b"# x\n" + b"y" * 31 + b"\n"
    )
    assert "line 1: a token is printable ASCII without spaces" in refused(
        b"two words " + b"z" * 32 + b"\n"
    )
    assert "line 1: a token is printable ASCII" in refused("é".encode() * 40)
    assert "no operator token" in refused(b"")
    assert "no operator token" in refused(b"# only\n\n   \n")
    assert "readable by others (mode 0604)" in refused(first.encode(), mode=0o604)
    assert first not in refused(first.encode() + b"\nshort\n")
    with pytest.raises(OperatorTokenError, match="no such file"):
        load_operator_tokens(tmp_path / "missing")
    with pytest.raises(OperatorTokenError, match="not a regular file"):
        load_operator_tokens(tmp_path)


def test_an_unreadable_operator_token_file_is_refused(tmp_path: Path) -> None:
    from cima.verifier.service import OperatorTokenError, load_operator_tokens

    path = tmp_path / "tokens"
    path.write_text("t" * 40 + "\n")
    path.chmod(0o000)
    if os.geteuid() != 0:
        with pytest.raises(OperatorTokenError, match="cannot read"):
            load_operator_tokens(path)
        return
    # Root reads any file: the service's user here is nobody, in a child that gave up root.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            try:
                load_operator_tokens(path)
                message = "accepted"
            except OperatorTokenError as e:
                message = str(e)
            os.write(w, message.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    assert "cannot read" in message and str(path) in message, message


SHORT_TOKEN = "abcdefghij"


@pytest.mark.parametrize(
    ("lines", "mode", "words"),
    [
        (None, 0o600, "no such file"),
        ([], 0o600, "no operator token"),
        (["# operators", OPERATOR_TOKEN, SHORT_TOKEN], 0o600, "line 3: a token is at least 32"),
        ([OPERATOR_TOKEN], 0o644, "readable by others"),
    ],
    ids=["missing", "empty", "short token", "world-readable"],
)
def test_cima_verifier_serve_refuses_a_bad_operator_token_file(
    tmp_path: Path, lines: list[str] | None, mode: int, words: str
) -> None:
    path = tmp_path / "operator-tokens"
    if lines is not None:
        path.write_text("".join(f"{line}\n" for line in lines))
        path.chmod(mode)
    done = _cli(
        "serve",
        "--store",
        f"sqlite:///{tmp_path / 'v.db'}",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--operator-token-file",
        str(path),
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"--operator-token-file {path}: {words}" in done.stderr, done.stderr
    assert OPERATOR_TOKEN not in done.stderr and SHORT_TOKEN not in done.stderr
    assert not (tmp_path / "v.db").exists()  # refused before the store was opened


@dataclass
class OperatorProcess:
    process: VerifierProcess
    tokens: tuple[str, str]
    path: Path


@pytest.fixture(scope="module")
def operator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """``cima verifier serve --workers 2 --log-level debug`` with a file of two tokens."""
    tmp = tmp_path_factory.mktemp("operators")
    tokens = (secrets.token_urlsafe(32), secrets.token_hex(24))
    path = write_token_file(
        tmp / "tokens",
        "# the operators of this instance",
        "",
        tokens[0],
        "# rotated in:",
        tokens[1],
    )
    with VerifierProcess(
        f"sqlite:///{tmp / 'v.db'}",
        "--workers",
        "2",
        "--log-level",
        "debug",
        "--operator-token-file",
        str(path),
        operator_token=None,
    ) as process:
        yield OperatorProcess(process, tokens, path.resolve())


def _worker_environments(parent: int) -> list[str]:
    """The environment, as text, of each worker process (multiprocessing) of ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent
                and b"spawn_main" in (entry / "cmdline").read_bytes()
            ):
                found.append((entry / "environ").read_bytes().decode(errors="replace"))
        except OSError:
            continue
    return found


def test_worker_processes_read_the_operator_token_file(
    operator_process: OperatorProcess, node: SoftwareNode
) -> None:
    v = operator_process.process
    first, second = operator_process.tokens
    wrong = secrets.token_urlsafe(32)
    body = _refs_yaml(node)
    with httpx.Client(base_url=v.base, timeout=60) as anyone:
        for i in range(4):  # new connections: the kernel spreads them over both workers
            with httpx.Client(base_url=v.base, timeout=60) as own:
                _assert_unauthorized(
                    own.put(f"/v1/references/w{i}", content=body, headers=bearer(wrong))
                )
        _assert_unauthorized(anyone.put("/v1/references/w", content=body))
        r = anyone.put("/v1/references/w", content=body, headers=bearer(second))
        assert r.status_code == 201, r.text
        r = anyone.put("/v1/references/w", content=body, headers=bearer(first))
        assert r.status_code == 200 and r.json()["version"] == 1, r.text
    # The workers' settings (in their environment) name the file; no token is in them.
    assert v.proc is not None
    environments = _worker_environments(v.proc.pid)
    named = f'"operator_token_file": "{operator_process.path}"'
    assert len(environments) == 2
    for environment in environments:
        assert named in environment
        assert first not in environment and second not in environment


def test_no_operator_token_is_ever_written_to_the_output(
    operator_process: OperatorProcess, node: SoftwareNode
) -> None:
    v = operator_process.process
    first, second = operator_process.tokens
    wrong = secrets.token_urlsafe(32)
    with httpx.Client(base_url=v.base, timeout=60) as http:
        _assert_unauthorized(
            http.put("/v1/references/logged", content=b"version: 1\n", headers=bearer(wrong))
        )
        _assert_unauthorized(
            http.put(
                "/v1/references/logged",
                content=b"version: 1\n",
                headers={"authorization": f"Basic {first}"},
            )
        )
        r = http.put("/v1/references/logged", content=_refs_yaml(node), headers=bearer(first))
        assert r.status_code == 201, r.text
    access = '"PUT /v1/references/logged HTTP/1.1" 201'
    output = ""
    for _ in range(100):  # the workers write their log lines as they go
        output = v.output()
        if access in output:
            break
        time.sleep(0.05)
    assert "reference write to 'logged' from 127.0.0.1 refused" in output, output
    assert "reference write to 'logged' with operator token 1" in output, output
    assert access in output, output  # the access log (stdout)
    for token in (first, second, wrong):
        assert token not in output


# -- mutual TLS ----------------------------------------------------------------------------------


@dataclass
class PKI:
    """A CA, its server certificate for 127.0.0.1, its client, and a client of another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client: tuple[Path, Path]
    stranger: tuple[Path, Path]

    def context(self, client: tuple[Path, Path] | None) -> Any:
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.ca))
        if client is not None:
            ctx.load_cert_chain(*map(str, client))
        return ctx


def _issue(
    directory: Path,
    name: str,
    *,
    issuer: tuple[Any, ec.EllipticCurvePrivateKey] | None = None,
    ca: bool = False,
    server: bool = False,
) -> tuple[Any, ec.EllipticCurvePrivateKey, Path, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer if issuer is not None else (None, key)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert, key, cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key, ca_path, _ = _issue(d, "ca", ca=True)
    _, _, server_cert, server_key = _issue(d, "server", issuer=(ca_cert, ca_key), server=True)
    _, _, client_cert, client_key = _issue(d, "client", issuer=(ca_cert, ca_key))
    other_cert, other_key, _, _ = _issue(d, "other-ca", ca=True)
    _, _, stranger_cert, stranger_key = _issue(d, "stranger", issuer=(other_cert, other_key))
    return PKI(
        ca_path, server_cert, server_key, (client_cert, client_key), (stranger_cert, stranger_key)
    )


@pytest.fixture(scope="module", params=["1", "2"], ids=["1 worker", "2 workers"])
def mtls_verifier(
    request: pytest.FixtureRequest, pki: PKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VerifierProcess]:
    """``cima verifier serve --client-ca``: one process, and worker processes."""
    tmp = tmp_path_factory.mktemp("mtls")
    with VerifierProcess(
        f"sqlite:///{tmp / 'v.db'}",
        "--workers",
        request.param,
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--client-ca",
        str(pki.ca),
        tls=pki.context(pki.client),
    ) as v:
        yield v


def test_mutual_tls_takes_only_clients_of_the_ca(
    mtls_verifier: VerifierProcess, pki: PKI, node: SoftwareNode
) -> None:
    v = mtls_verifier
    assert v.base.startswith("https://")
    with httpx.Client(base_url=v.base, timeout=30, verify=pki.context(pki.client)) as http:
        assert http.get("/healthz").status_code == 200
        r = http.put(
            "/v1/references/default", content=_refs_yaml(node), headers=bearer(OPERATOR_TOKEN)
        )
        assert r.status_code in (200, 201), r.text
    for client in (None, pki.stranger):
        for _ in range(3):  # new connections (either worker)
            with (
                httpx.Client(base_url=v.base, timeout=30, verify=pki.context(client)) as http,
                pytest.raises(httpx.TransportError),
            ):
                http.get("/healthz")
    with (
        httpx.Client(base_url=v.base.replace("https", "http"), timeout=30) as plain,
        pytest.raises(httpx.TransportError),
    ):
        plain.get("/healthz")
    with v.client() as http:  # still serving
        assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("ca", "words"),
    [("missing.pem", "no such file"), ("garbage.pem", "not PEM CA certificates")],
)
def test_cima_verifier_serve_refuses_a_bad_client_ca(
    tmp_path: Path, pki: PKI, ca: str, words: str
) -> None:
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    done = _cli(
        "serve",
        "--store",
        f"sqlite:///{tmp_path / 'v.db'}",
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--client-ca",
        str(tmp_path / ca),
    )
    assert done.returncode == 2, done.stderr
    assert f"--client-ca {tmp_path / ca}: {words}" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1


def test_client_ca_needs_tls(tmp_path: Path, pki: PKI) -> None:
    done = _cli("serve", "--store", f"sqlite:///{tmp_path / 'v.db'}", "--client-ca", str(pki.ca))
    assert done.returncode == 2 and "--client-ca needs --tls-cert" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1
