"""Enrollment of an attestation key by EK certificate: store, service, `cima client enroll`.

Real peers: swtpm (its EK certificate signed by the local CA ``swtpm_setup``
made, a root and an issuing CA), the agent's server on a Unix socket with a
:class:`~cima.platform.tpm.TPMPlatform` on that swtpm (it answers GetEnrollment
and activates credentials with TPM2_ActivateCredential), the verifier service
on a real socket (:class:`ThreadedVerifier`, and ``cima verifier serve --ek-ca``
in a child process), SQLite and PostgreSQL stores. The verifier trusts the
swtpm root (``--ek-ca``); the node sends the issuing CA with its request
(``--ek-intermediate``), as a TPM manufacturer's intermediate CAs are.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import text

from cima.agent.engine import Engine
from cima.agent.journal import Journal
from cima.agent.policy import parse_policy
from cima.agent.server import AgentServer
from cima.cli.main import main as cima_main
from cima.client import CimaClient, Enrollment
from cima.evidence.tpm import AK_ATTRIBUTES, TPMA_USERWITHAUTH, PublicArea
from cima.platform.base import Platform
from cima.verifier.reference import create_references
from cima.verifier.service import (
    ServiceConfig,
    VerifierService,
    load_ek_roots,
    openapi_document,
)
from cima.verifier.store import (
    EnrolledKey,
    EnrollmentError,
    Store,
    enrolled_keys_table,
    enrollments_table,
)
from tests.agent.test_server import Identities
from tests.platform.swtpm import SWTPM, ManufacturedTPM
from tests.verifier.postgres import postgres_cluster, postgres_url  # noqa: F401
from tests.verifier.servers import OPERATOR_DIGESTS, SRC, ThreadedVerifier, VerifierProcess
from tests.verifier.test_service import PKI, _issue

pytestmark = pytest.mark.peer
pytest.importorskip("tpm2_pytss")

#: The agent's policy: no IMA, no containers (the node's evidence is its own runtime journal).
POLICY = """\
backend: none
hashAlgorithm: sha384
"""


# -- the node: an agent on swtpm ------------------------------------------------------------------


@dataclass
class Node:
    """An agent serving a TPM platform on swtpm, and what its TPM's CA issued."""

    socket: Path
    platform: Platform
    manufactured: ManufacturedTPM
    server: AgentServer
    journal: Journal

    def client(self) -> CimaClient:
        return CimaClient(self.socket)

    def enrollment(self) -> Enrollment:
        with self.client() as c:
            return c.get_enrollment()

    def activate(self, blob: bytes, encrypted: bytes) -> bytes:
        with self.client() as c:
            return c.activate_credential(blob, encrypted)

    def evidence(self, nonce: bytes) -> bytes:
        with self.client() as c:
            return c.get_evidence_json(nonce)


@pytest.fixture(scope="module")
def node(
    swtpm_manufactured: ManufacturedTPM,
    swtpm_module: SWTPM,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Node]:
    from cima.platform.tpm import TPMPlatform

    directory = tmp_path_factory.mktemp("enrollment-node")
    platform = TPMPlatform(swtpm_module.tcti)
    journal = Journal.open(
        directory / "journal", platform=platform, register="pcr14", algorithm="sha384"
    )
    engine = Engine(parse_policy(POLICY), platform, journal, collectors=[], ima=None)
    engine.measure_self()
    engine.poll()
    server = AgentServer(engine, socket_path=directory / "cima.sock", identify=Identities())
    server.start()
    try:
        yield Node(directory / "cima.sock", platform, swtpm_manufactured, server, journal)
    finally:
        server.stop()
        journal.close()
        platform.close()


def _pem(path: Path) -> str:
    return path.read_text()


def _request(node: Node, **changes: Any) -> dict[str, Any]:
    """The body of POST /v1/enrollments for the node (with the issuing CA), changed."""
    e = node.enrollment()
    assert e.ek_certificate is not None
    cert = x509.load_der_x509_certificate(e.ek_certificate)
    body: dict[str, Any] = {
        "ek_public": e.ek_public.hex(),
        "ek_certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "ak_public": e.ak_public.hex(),
        "intermediates": [_pem(node.manufactured.issuer_ca_pem)],
    }
    body.update(changes)
    return body


# -- the verifier ---------------------------------------------------------------------------------


@dataclass
class Verifier:
    server: ThreadedVerifier
    http: httpx.Client
    store: Store

    @property
    def base(self) -> str:
        return self.server.base

    def enroll(self, body: dict[str, Any]) -> httpx.Response:
        return self.http.post("/v1/enrollments", json=body)

    def activate(self, enrollment_id: str, secret: bytes | str) -> httpx.Response:
        value = secret.hex() if isinstance(secret, bytes) else secret
        return self.http.post(f"/v1/enrollments/{enrollment_id}/activate", json={"secret": value})

    def attest(self, node: Node) -> dict[str, Any]:
        """One attestation of the node's evidence (stored, whatever its status)."""
        ch = self.http.post("/v1/challenge", json={}).json()
        raw = node.evidence(bytes.fromhex(ch["nonce"]))
        r = self.http.post(
            "/v1/attest",
            content=raw,
            params={"session": ch["session"]},
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def rows(self, table: Any) -> list[dict[str, Any]]:
        with self.store.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(table.select())]


def _verifier(tmp_path: Path, roots: tuple[x509.Certificate, ...]) -> Iterator[Verifier]:
    store = Store(f"sqlite:///{tmp_path / 'verifier.db'}", instance="test")
    config = ServiceConfig(ek_roots=roots, operator_tokens=OPERATOR_DIGESTS)
    with ThreadedVerifier(VerifierService(store, config)) as server, server.client() as http:
        yield Verifier(server, http, store)
    store.close()


@pytest.fixture
def verifier(tmp_path: Path, swtpm_manufactured: ManufacturedTPM) -> Iterator[Verifier]:
    """A verifier whose EK root is swtpm's local root CA."""
    yield from _verifier(tmp_path, load_ek_roots([swtpm_manufactured.root_ca_pem]))


def _enroll_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cima_main(["client", "enroll", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _step2(result: dict[str, Any]) -> dict[str, Any]:
    evidence: dict[str, Any] = result["result"]["submods"]["evidence"]
    return evidence


# -- end to end -----------------------------------------------------------------------------------


def test_an_enrolled_key_is_trusted_by_ek_certificate(
    verifier: Verifier, node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    # Reference values from the node's own evidence, without its key: nothing trusts the AK.
    with node.client() as c:
        refs = create_references([c.get_evidence(os.urandom(32))]).to_dict()
    assert refs.pop("trusted_keys")
    r = verifier.http.put("/v1/references/default", json=refs)
    assert r.status_code == 201, r.text

    before = verifier.attest(node)
    assert before["status"] == "contraindicated"
    failures = _step2(before)["failures"]
    assert [(f["step"], f["code"]) for f in failures] == [(2, "untrusted-key")], failures
    assert "not enrolled by EK certificate" in failures[0]["reason"]

    code, out, err = _enroll_cli(
        capsys,
        "--verifier",
        verifier.base,
        "--socket",
        str(node.socket),
        "--ek-intermediate",
        str(node.manufactured.issuer_ca_pem),
        "--json",
    )
    assert code == 0, err
    done = json.loads(out)  # exactly one JSON document
    e = node.enrollment()
    ek_cert = x509.load_der_x509_certificate(e.ek_certificate or b"")
    assert done["status"] == "enrolled"
    assert done["ak_name"] == e.ak_name.hex()
    assert done["ek_subject"] == ek_cert.subject.rfc4514_string()
    spki = (
        PublicArea.from_bytes(e.ak_public)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    # The node an attestation that names none is stored under: the same key-<hex>.
    assert done["node_id"] == f"key-{hashlib.sha256(spki).hexdigest()[:32]}"

    keys = verifier.http.get("/v1/enrollments/keys").json()["keys"]
    assert [(k["ak_name"], k["node_id"], k["enrollment"]) for k in keys] == [
        (e.ak_name.hex(), done["node_id"], done["enrollment"])
    ]
    assert (
        keys[0]["ek_certificate_sha256"]
        == hashlib.sha256(ek_cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    )
    assert verifier.http.get("/v1/enrollments/keys", params={"node": "other"}).json() == {
        "keys": []
    }

    after = verifier.attest(node)
    assert after["status"] == "affirming", after["result"]
    assert after["node_id"] == done["node_id"]
    details = _step2(after)["details"]
    assert details["attestation_key_trust"] == "ek-certificate"
    assert details["attestation_key"].startswith(
        f"enrolled by EK certificate ({ek_cert.subject.rfc4514_string()}, "
    )
    assert details["quote"] == "signature verified"

    # The enrolled key speaks for its node only: an attestation naming another is refused.
    ch = verifier.http.post("/v1/challenge", json={}).json()
    raw = node.evidence(bytes.fromhex(ch["nonce"]))
    impostor = verifier.http.post(
        "/v1/attest",
        content=raw,
        params={"session": ch["session"], "node": "impostor"},
        headers={"content-type": "application/json"},
    )
    assert impostor.status_code == 400, impostor.text
    assert impostor.json()["error"] == "node-mismatch"
    assert done["node_id"] in impostor.json()["detail"]
    named = verifier.http.post(  # the nonce was left usable by the refusal
        "/v1/attest",
        content=raw,
        params={"session": ch["session"], "node": done["node_id"]},
        headers={"content-type": "application/json"},
    )
    assert named.status_code == 200 and named.json()["status"] == "affirming", named.text

    # Revocation is an operator's: without the token it is refused and changes nothing.
    path = f"/v1/enrollments/keys/{e.ak_name.hex()}"
    with httpx.Client(base_url=verifier.base, timeout=60) as anonymous:
        refused = anonymous.delete(path)
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    assert verifier.attest(node)["status"] == "affirming"
    revoked = verifier.http.delete(path)
    assert revoked.status_code == 200, revoked.text
    assert (revoked.json()["ak_name"], revoked.json()["node_id"]) == (
        e.ak_name.hex(),
        done["node_id"],
    )
    assert verifier.http.get("/v1/enrollments/keys").json() == {"keys": []}
    assert verifier.http.delete(path).status_code == 404
    # From then on the key is untrusted again.
    again = verifier.attest(node)
    assert again["status"] == "contraindicated"
    assert [f["code"] for f in _step2(again)["failures"]] == ["untrusted-key"]


def test_a_key_the_reference_values_list_is_trusted_by_registration(
    verifier: Verifier, node: Node
) -> None:
    with node.client() as c:
        refs = create_references([c.get_evidence(os.urandom(32))], sources=["swtpm AK"])
    r = verifier.http.put("/v1/references/default", json=refs.to_dict())
    assert r.status_code == 201, r.text
    details = _step2(verifier.attest(node))["details"]
    assert (details["attestation_key"], details["attestation_key_trust"]) == (
        "swtpm AK",
        "registration",
    )


def test_cima_verifier_serve_ek_ca_over_mutual_tls(
    tmp_path: Path, node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--ek-ca`` (the root's file) read by worker processes; the CLI over mutual TLS."""
    pki = make_pki(tmp_path)
    with VerifierProcess(
        f"sqlite:///{tmp_path / 'v.db'}",
        "--workers",
        "2",
        "--ek-ca",
        str(node.manufactured.root_ca_pem),
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--client-ca",
        str(pki.ca),
        tls=pki.context(pki.client),
    ) as v:
        tls = ["--cacert", str(pki.ca), "--cert", str(pki.client[0]), "--key", str(pki.client[1])]
        args = ["--verifier", v.base, "--socket", str(node.socket), "--node", "node-7", *tls]
        code, _, err = _enroll_cli(capsys, *args, "--json")
        assert code == 1  # the issuing CA is neither a root nor sent
        assert err.startswith("cima: verification failed: the verifier refused: ek-certificate:")
        assert "(untrusted_endorsement)" in err and len(err.splitlines()) == 1
        issuer = ["--ek-intermediate", str(node.manufactured.issuer_ca_pem)]
        code, out, err = _enroll_cli(capsys, *args, *issuer)
        assert code == 0, err
        assert "enrolled" in out and "node-7" in out
        with v.client() as http:
            keys = http.get("/v1/enrollments/keys", params={"node": "node-7"}).json()["keys"]
        assert [k["ak_name"] for k in keys] == [node.enrollment().ak_name.hex()]
        # Without a client certificate the TLS handshake fails: a connection error.
        code, _, err = _enroll_cli(capsys, *args[:4], "--cacert", str(pki.ca), *issuer)
        assert code == 2 and "cannot reach the verifier" in err, err


def make_pki(directory: Path) -> PKI:
    """A CA, its server certificate for 127.0.0.1 and a client certificate."""
    ca_cert, ca_key, ca_path, _ = _issue(directory, "ca", ca=True)
    _, _, server_cert, server_key = _issue(
        directory, "server", issuer=(ca_cert, ca_key), server=True
    )
    client = _issue(directory, "client", issuer=(ca_cert, ca_key))[2:]
    return PKI(ca_path, server_cert, server_key, client, client)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: ["--ek-ca", str(d / "missing.pem")], "--ek-ca {d}/missing.pem: no such file"),
        (
            lambda d: ["--ek-ca", str(_write(d / "garbage.pem", "not a certificate\n"))],
            "--ek-ca {d}/garbage.pem: not PEM certificates",
        ),
        (lambda d: ["--ek-ca", str(d)], "--ek-ca {d}: is a directory"),
        (lambda d: ["--enrollment-ttl", "0"], "--enrollment-ttl 0.0: must be positive"),
    ],
    ids=["missing", "not PEM", "directory", "ttl"],
)
def test_cima_verifier_serve_refuses_bad_enrollment_options(
    tmp_path: Path, make: Any, match: str
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cima.cli.verifier",
            "serve",
            "--store",
            f"sqlite:///{tmp_path / 'v.db'}",
            "--listen",
            "127.0.0.1:0",
            *make(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"cima: error: {match.format(d=tmp_path)}"), done.stderr
    assert len(done.stderr.splitlines()) == 1


def _write(path: Path, content: str) -> Path:
    path.write_text(content)
    return path


# -- refusals ------------------------------------------------------------------------------------


def test_an_instance_without_ek_roots_enrolls_no_key(
    tmp_path: Path, node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    for v in _verifier(tmp_path, ()):
        r = v.enroll(_request(node))
        assert (r.status_code, r.json()["error"]) == (403, "no_ek_roots"), r.text
        assert "--ek-ca" in r.json()["detail"]
        code, out, err = _enroll_cli(
            capsys, "--verifier", v.base, "--socket", str(node.socket), "--json"
        )
        assert (code, out) == (1, "")
        assert "(no_ek_roots)" in err
        assert v.rows(enrollments_table) == []


def _other_root(name: x509.Name) -> x509.Certificate:
    """A root CA named ``name``, of a key of its own."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def test_an_ek_certificate_of_another_root_is_refused(tmp_path: Path, node: Node) -> None:
    # A root of the same name as swtpm's: only its signature tells them apart.
    (real,) = load_ek_roots([node.manufactured.root_ca_pem])
    for v in _verifier(tmp_path, (_other_root(real.subject),)):
        r = v.enroll(_request(node))
        assert (r.status_code, r.json()["error"]) == (403, "untrusted_endorsement"), r.text
        assert r.json()["detail"].startswith("ek-certificate: ")
        assert "is not signed by" in r.json()["detail"]
        assert v.rows(enrollments_table) == []


def test_public_areas_that_do_not_hold_are_refused(verifier: Verifier, node: Node) -> None:
    e = node.enrollment()
    ak = PublicArea.from_bytes(e.ak_public)
    # Same key, attributes other than the standard AK template's (no userWithAuth): a
    # restricted signing key, but not the one a quote's ak_pem names.
    other_template = PublicArea.from_public_key(
        ak.public_key(), object_attributes=AK_ATTRIBUTES & ~TPMA_USERWITHAUTH
    )
    cases: list[tuple[dict[str, Any], str, str]] = [
        # The AK where the EK goes: not the certificate's key.
        ({"ek_public": e.ak_public.hex()}, "ek-public: ", "does not hold the key"),
        # The EK where the AK goes: a decryption key, not a restricted signing key.
        ({"ak_public": e.ek_public.hex()}, "ak-public: ", "not a restricted signing key"),
        ({"ak_public": other_template.to_bytes().hex()}, "ak-public: ", "standard attestation"),
        # No intermediate: no chain to the root.
        ({"intermediates": []}, "ek-certificate: ", "no issuer found"),
    ]
    for changes, step, reason in cases:
        r = verifier.enroll(_request(node, **changes))
        assert (r.status_code, r.json()["error"]) == (403, "untrusted_endorsement"), r.text
        assert r.json()["detail"].startswith(step) and reason in r.json()["detail"], r.text
    assert verifier.rows(enrollments_table) == []


def test_malformed_requests_are_422_naming_the_field(verifier: Verifier, node: Node) -> None:
    good = _request(node)
    cases: list[tuple[dict[str, Any], str]] = [
        ({**good, "ek_public": "zz"}, "ek_public: not a hex string"),
        ({**good, "ak_public": "0004deadbeef"}, "ak_public: not a TPM2B_PUBLIC"),
        ({**good, "ek_certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n"}, "ek_certificate:"),
        ({**good, "ek_certificate": good["ek_certificate"] * 2}, "ek_certificate: one PEM"),
        ({**good, "intermediates": [good["intermediates"][0], "x"]}, "intermediates[1]:"),
        ({**good, "node_id": "a b"}, "node id 'a b'"),
        ({k: v for k, v in good.items() if k != "ak_public"}, "ak_public: Field required"),
        ({**good, "extra": 1}, "extra: unknown field"),
    ]
    for body, detail in cases:
        r = verifier.enroll(body)
        assert r.status_code == 422, (body, r.text)
        assert detail in r.json()["detail"], (detail, r.text)
    r = verifier.activate("whatever", "not hex")
    assert r.status_code == 422 and "secret: not a hex string" in r.json()["detail"], r.text
    assert verifier.rows(enrollments_table) == []


def test_a_wrong_secret_spends_the_enrollment(verifier: Verifier, node: Node) -> None:
    r = verifier.enroll(_request(node))
    assert r.status_code == 201, r.text
    issued = r.json()
    secret = node.activate(
        bytes.fromhex(issued["credential_blob"]), bytes.fromhex(issued["encrypted_secret"])
    )
    assert len(secret) == 32
    wrong = bytes(b ^ 1 for b in secret)
    r = verifier.activate(issued["id"], wrong)
    assert (r.status_code, r.json()["error"]) == (403, "wrong_secret"), r.text
    r = verifier.activate(issued["id"], secret)  # the right one, too late
    assert (r.status_code, r.json()["error"]) == (409, "enrollment_spent"), r.text
    assert "already activated" in r.json()["detail"] and "(refused)" in r.json()["detail"]
    assert [row["state"] for row in verifier.rows(enrollments_table)] == ["refused"]
    assert verifier.rows(enrolled_keys_table) == []
    assert verifier.http.get("/v1/enrollments/keys").json() == {"keys": []}


def test_an_enrollment_is_activated_once(verifier: Verifier, node: Node) -> None:
    issued = verifier.enroll(_request(node, node_id="node-1")).json()
    secret = node.activate(
        bytes.fromhex(issued["credential_blob"]), bytes.fromhex(issued["encrypted_secret"])
    )
    r = verifier.activate(issued["id"], secret)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "status": "enrolled",
        "node_id": "node-1",
        "ak_name": node.enrollment().ak_name.hex(),
        "ek_subject": "CN=unknown",
    }
    r = verifier.activate(issued["id"], secret)
    assert (r.status_code, r.json()["error"]) == (409, "enrollment_spent"), r.text


def test_expired_and_unknown_enrollments(verifier: Verifier, node: Node) -> None:
    issued = verifier.enroll(_request(node)).json()
    secret = node.activate(
        bytes.fromhex(issued["credential_blob"]), bytes.fromhex(issued["encrypted_secret"])
    )
    with verifier.store.engine.begin() as conn:
        conn.execute(
            enrollments_table.update().values(expires=datetime.now(UTC) - timedelta(seconds=1))
        )
    r = verifier.activate(issued["id"], secret)
    assert (r.status_code, r.json()["error"]) == (410, "enrollment_expired"), r.text
    assert [row["state"] for row in verifier.rows(enrollments_table)] == ["pending"]
    r = verifier.activate("no-such-enrollment", secret)
    assert (r.status_code, r.json()["error"]) == (404, "not-found"), r.text
    assert verifier.rows(enrolled_keys_table) == []


def test_the_secret_is_never_stored(verifier: Verifier, node: Node, tmp_path: Path) -> None:
    issued = verifier.enroll(_request(node)).json()
    secret = node.activate(
        bytes.fromhex(issued["credential_blob"]), bytes.fromhex(issued["encrypted_secret"])
    )
    assert verifier.activate(issued["id"], secret).status_code == 200
    (row,) = verifier.rows(enrollments_table)
    assert row["secret_sha256"] == hashlib.sha256(secret).hexdigest()
    assert row["state"] == "enrolled" and row["spent"] is not None
    stored = json.dumps(
        [verifier.rows(enrollments_table), verifier.rows(enrolled_keys_table)], default=str
    )
    assert secret.hex() not in stored.lower()
    assert "credential" not in stored  # neither the blob nor the encrypted secret
    for f in tmp_path.glob("verifier.db*"):  # the database's files, WAL included
        data = f.read_bytes()
        assert secret not in data and secret.hex().encode() not in data.lower(), f


def test_the_cli_reports_what_it_cannot_do(
    tmp_path: Path, node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = ["--socket", str(node.socket)]
    unreachable = ["--verifier", "http://127.0.0.1:9", *sock]
    code, _, err = _enroll_cli(capsys, *unreachable)
    assert code == 2 and "cannot reach the verifier" in err, err
    code, _, err = _enroll_cli(capsys, "--verifier", "ftp://x", *sock)
    assert code == 2 and "expected http(s)://HOST:PORT" in err, err
    code, _, err = _enroll_cli(capsys, *unreachable[:2], "--cert", "c.pem", *sock)
    assert code == 2 and "--cert and --key go together" in err, err
    code, _, err = _enroll_cli(capsys, "--verifier", "https://127.0.0.1:9", "--cacert", "no.pem")
    assert code == 2 and "--cacert no.pem: no such file" in err, err
    code, _, err = _enroll_cli(capsys, "--verifier", "http://x", "--socket", str(tmp_path / "s"))
    assert code == 2 and "no agent socket" in err, err


def test_the_api_description_has_the_enrollment_routes() -> None:
    doc = openapi_document()
    assert {"/v1/enrollments", "/v1/enrollments/{enrollment_id}/activate"} <= set(doc["paths"])
    assert "/v1/enrollments/keys" in doc["paths"]
    activate = doc["paths"]["/v1/enrollments/{enrollment_id}/activate"]["post"]["responses"]
    assert {"200", "403", "404", "409", "410", "422"} <= set(activate)


# -- the store, on SQLite and PostgreSQL ----------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'verifier.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def _pending(store: Store, secret: bytes, name: bytes = b"\x00\x0b" + bytes(32)) -> str:
    return store.create_enrollment(
        node_id="node-1",
        ak_name=name,
        ak_public=b"\x00\x01",
        ek_certificate_sha256="00" * 32,
        ek_subject="CN=ek",
        secret_sha256=hashlib.sha256(secret).digest(),
    ).id


def test_two_instances_activate_an_enrollment_once(store_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    stores = [Store(store_url, instance=f"i{i}") for i in range(2)]
    try:
        secret = os.urandom(32)
        enrollment = _pending(stores[0], secret)
        barrier = Barrier(8)

        def attempt(i: int) -> EnrolledKey | Exception:
            barrier.wait()
            try:
                return stores[i % 2].activate_enrollment(enrollment, secret)
            except Exception as e:
                return e

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(attempt, range(8)))
        won = [o for o in outcomes if isinstance(o, EnrolledKey)]
        lost = [o for o in outcomes if not isinstance(o, EnrolledKey)]
        assert len(won) == 1
        assert all(isinstance(o, EnrollmentError) and o.reason == "used" for o in lost), lost
        for s in stores:
            assert s.enrolled_key(won[0].ak_name) == won[0]
            assert s.enrolled_keys(node="node-1") == [won[0]]
        # A wrong secret spends an enrollment for every instance.
        other = _pending(stores[1], secret, b"\x00\x0b" + bytes([1]) * 32)
        with pytest.raises(EnrollmentError) as e:
            stores[0].activate_enrollment(other, b"wrong")
        assert e.value.reason == "wrong-secret"
        with pytest.raises(EnrollmentError) as e:
            stores[1].activate_enrollment(other, secret)
        assert e.value.reason == "used"
        with pytest.raises(EnrollmentError) as e:
            stores[1].activate_enrollment("unknown", secret)
        assert e.value.reason == "unknown"
    finally:
        for s in stores:
            s.close()


def test_the_enrollment_tables_are_added_to_an_existing_store(store_url: str) -> None:
    with Store(store_url) as s, s.engine.begin() as conn:
        conn.execute(text("DROP TABLE cima_enrolled_keys"))
        conn.execute(text("DROP TABLE cima_enrollments"))
    with Store(store_url) as s:  # a store written before enrollment existed
        secret = os.urandom(32)
        key = s.activate_enrollment(_pending(s, secret), secret)
        assert s.enrolled_keys() == [key]
        assert s.schema_version() == 1
