"""Enrollment through the agent (GetEnrollment, ActivateCredential) and the SDK.

A real agent on a Unix socket in front of swtpm; credentials are made by
tpm2-tools offline from what GetEnrollment answers, as a verifier would. The
EK certificate and the EK public area are read with tpm2-tools before the
agent starts, to compare with what the agent serves.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cima._proto.cima import agent_pb2
from cima.agent.server import MAX_CREDENTIAL_FIELD
from cima.client import AgentError, CimaClient, Enrollment
from cima.evidence.tpm import PublicArea, verify_quote
from cima.platform.tpm import TPMPlatform
from tests.agent.test_server import A, Agent, booted_software_platform, start_agent
from tests.platform.swtpm import SWTPM
from tests.platform.test_tpm_enrollment import make_credential, marshalled, run

pytestmark = pytest.mark.peer

if shutil.which("tpm2_makecredential") is None or shutil.which("tpm2_nvread") is None:
    pytest.skip("tpm2-tools is not installed (Debian package tpm2-tools)", allow_module_level=True)
pytest.importorskip("tpm2_pytss")

EK_RSA_CERT_INDEX = "0x01c00002"


@dataclass
class TPMAgent:
    agent: Agent
    platform: TPMPlatform
    swtpm: SWTPM
    nv_certificate: bytes  # the NV index's contents, as tpm2_nvread reads them
    tools_ek_public: bytes  # tpm2_createek -G rsa -u


def tools(swtpm: SWTPM, cwd: Path, *args: str) -> None:
    run(cwd, *args, env=swtpm.env())


@pytest.fixture(scope="module")
def tpm_agent(swtpm_module: SWTPM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TPMAgent]:
    work = tmp_path_factory.mktemp("enrollment-tools")
    tools(swtpm_module, work, "tpm2_nvread", EK_RSA_CERT_INDEX, "-C", "o", "-o", "ek.der")
    tools(swtpm_module, work, "tpm2_createek", "-G", "rsa", "-c", "ek.ctx", "-u", "ek.pub")
    tools(swtpm_module, work, "tpm2_flushcontext", "-t")
    platform = TPMPlatform(swtpm_module.tcti)
    agent = start_agent(
        tmp_path_factory.mktemp("enrollment-agent"), platform, register="pcr14", ima=False
    )
    try:
        yield TPMAgent(
            agent,
            platform,
            swtpm_module,
            (work / "ek.der").read_bytes(),
            (work / "ek.pub").read_bytes(),
        )
    finally:
        agent.stop()
        platform.close()


@pytest.fixture
def client(tpm_agent: TPMAgent) -> Iterator[CimaClient]:
    with CimaClient(tpm_agent.agent.socket) as c:
        yield c


@pytest.fixture
def credential(
    tpm_agent: TPMAgent, client: CimaClient, tmp_path: Path
) -> tuple[bytes, bytes, bytes]:
    """(secret, credential blob, encrypted secret) made from what GetEnrollment answers."""
    enrollment = client.get_enrollment()
    secret = b"the verifier's secret, 32 bytes"
    blob, encrypted = make_credential(tmp_path, enrollment.ek_public, enrollment.ak_name, secret)
    return secret, blob, encrypted


def assert_serving(tpm_agent: TPMAgent, client: CimaClient) -> None:
    value = client.get_cc_measurement("pcr14", "sha256")
    assert value.digest == tpm_agent.platform.read("pcr14", "sha256")


def test_get_enrollment_is_the_platforms_ek_and_ak(tpm_agent: TPMAgent, client: CimaClient) -> None:
    enrollment = client.get_enrollment()
    assert isinstance(enrollment, Enrollment)
    platform = tpm_agent.platform
    assert enrollment.platform == "tpm"
    # The EK: the platform's, and tpm2_createek's on the same TPM, as the TPM marshals it.
    assert enrollment.ek_public == marshalled(platform.ek_public()) == tpm_agent.tools_ek_public
    # The AK: its public area, and a name that is that public area's name.
    assert enrollment.ak_public == marshalled(platform.ak_public())
    assert enrollment.ak_name == PublicArea.from_bytes(enrollment.ak_public).name
    assert enrollment.ak_name == enrollment.ak.name == platform.ak_public().name
    assert enrollment.ak.is_restricted_signing_key
    # The EK certificate: the DER certificate in NV (without the index's padding, if any),
    # issued by swtpm's local CA for the EK's key.
    der = enrollment.ek_certificate
    assert der is not None
    nv = tpm_agent.nv_certificate
    assert nv[: len(der)] == der
    assert nv[len(der) :].strip(b"\x00\xff") == b""
    cert = x509.load_der_x509_certificate(der)
    issuer = x509.load_pem_x509_certificate(tpm_agent.swtpm.manufactured.issuer_ca_pem.read_bytes())
    cert.verify_directly_issued_by(issuer)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(serialization.Encoding.DER, spki) == (
        enrollment.ek.public_key().public_bytes(serialization.Encoding.DER, spki)
    )


def test_the_ak_enrolled_signs_the_agents_quotes(tpm_agent: TPMAgent, client: CimaClient) -> None:
    enrollment = client.get_enrollment()
    report = client.get_cc_report(b"enrolled")
    assert report.verification["ak_name"] == enrollment.ak_name.hex()
    ak_pem = enrollment.ak.to_pem().decode()
    verify_quote(report.body, report.signature, ak_pem, nonce=report.report_nonce)


def test_activate_credential_returns_the_secret(
    client: CimaClient, credential: tuple[bytes, bytes, bytes]
) -> None:
    secret, blob, encrypted = credential
    assert client.activate_credential(blob, encrypted) == secret


def test_the_raw_api(tpm_agent: TPMAgent, credential: tuple[bytes, bytes, bytes]) -> None:
    secret, blob, encrypted = credential
    stub = tpm_agent.agent.native()
    r = stub.GetEnrollment(agent_pb2.GetEnrollmentRequest())
    assert (r.platform, r.ak_name) == ("tpm", tpm_agent.platform.ak_public().name)
    r2 = stub.ActivateCredential(
        agent_pb2.ActivateCredentialRequest(credential_blob=blob, encrypted_secret=encrypted)
    )
    assert r2.secret == secret


def test_a_container_is_refused(
    tpm_agent: TPMAgent, credential: tuple[bytes, bytes, bytes]
) -> None:
    _, blob, encrypted = credential
    tpm_agent.agent.as_container(A)
    try:
        with CimaClient(tpm_agent.agent.socket) as c:
            assert c.info()["container_id"] == A
            for call in (c.get_enrollment, lambda: c.activate_credential(blob, encrypted)):
                with pytest.raises(AgentError) as info:
                    call()
                assert info.value.code == "PERMISSION_DENIED"
                assert "container" in info.value.details
                assert "\n" not in info.value.details
            # The container's other calls are served as before.
            assert c.get_cc_measurement("pcr14", "sha256").digest
    finally:
        tpm_agent.agent.as_host()


@pytest.mark.parametrize(
    ("blob_size", "secret_size", "field"),
    [
        (MAX_CREDENTIAL_FIELD + 1, 100, "credential_blob"),
        (100, MAX_CREDENTIAL_FIELD + 1, "encrypted_secret"),
        (100, 10_000, "encrypted_secret"),
    ],
)
def test_oversized_fields_are_invalid(
    tpm_agent: TPMAgent, client: CimaClient, blob_size: int, secret_size: int, field: str
) -> None:
    def tpm2b(n: int) -> bytes:
        return (n - 2).to_bytes(2, "big") + bytes(n - 2)

    with pytest.raises(AgentError) as info:
        client.activate_credential(tpm2b(blob_size), tpm2b(secret_size))
    assert info.value.code == "INVALID_ARGUMENT"
    assert field in info.value.details
    assert str(MAX_CREDENTIAL_FIELD) in info.value.details
    assert_serving(tpm_agent, client)


def test_fields_that_are_no_tpm2b_are_invalid(
    tpm_agent: TPMAgent, client: CimaClient, credential: tuple[bytes, bytes, bytes]
) -> None:
    _, blob, encrypted = credential
    for b, e, field in (
        (b"", encrypted, "credential_blob"),
        (blob[2:], encrypted, "credential_blob"),
        (blob, encrypted + b"\x00", "encrypted_secret"),
    ):
        with pytest.raises(AgentError) as info:
            client.activate_credential(b, e)
        assert info.value.code == "INVALID_ARGUMENT"
        assert field in info.value.details
    assert_serving(tpm_agent, client)


def test_a_bad_credential_fails_its_precondition(
    tpm_agent: TPMAgent,
    client: CimaClient,
    credential: tuple[bytes, bytes, bytes],
    tmp_path: Path,
) -> None:
    secret, blob, encrypted = credential
    enrollment = client.get_enrollment()
    # Made for the EK's own name, and altered: neither activates.
    other_blob, other_encrypted = make_credential(
        tmp_path, enrollment.ek_public, enrollment.ek.name, secret
    )
    altered = blob[:5] + bytes([blob[5] ^ 1]) + blob[6:]
    for b, e in ((other_blob, other_encrypted), (altered, encrypted)):
        with pytest.raises(AgentError) as info:
            client.activate_credential(b, e)
        assert info.value.code == "FAILED_PRECONDITION"
        assert "does not activate" in info.value.details
        assert "integrity" in info.value.details
        assert_serving(tpm_agent, client)
    assert client.activate_credential(blob, encrypted) == secret
    assert tpm_agent.platform.handles("transient") == []
    assert tpm_agent.platform.handles("sessions") == []


def test_concurrent_activations_and_reports(
    tpm_agent: TPMAgent, credential: tuple[bytes, bytes, bytes]
) -> None:
    secret, blob, encrypted = credential
    results: list[object] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with CimaClient(tpm_agent.agent.socket) as c:
                if i % 2:
                    results.append(c.activate_credential(blob, encrypted))
                else:
                    report = c.get_cc_report(i.to_bytes(4, "big"))
                    results.append(report.kind)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(map(repr, results)) == sorted([repr(secret)] * 6 + [repr("tpm-quote")] * 6)
    assert tpm_agent.platform.handles("transient") == []
    assert tpm_agent.platform.handles("sessions") == []


@pytest.fixture(scope="module")
def software_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = start_agent(tmp_path_factory.mktemp("enrollment-software"), booted_software_platform())
    yield a
    a.stop()


def test_the_software_platform_has_no_endorsement_key(software_agent: Agent) -> None:
    with CimaClient(software_agent.socket) as c:
        for call in (c.get_enrollment, lambda: c.activate_credential(b"\x00\x00", b"\x00\x00")):
            with pytest.raises(AgentError) as info:
                call()
            assert info.value.code == "FAILED_PRECONDITION"
            assert info.value.details == "the software platform has no endorsement key"
        assert c.get_measurement_count() == 24


def test_without_the_node_view_a_host_process_is_refused(tmp_path: Path) -> None:
    a = start_agent(tmp_path / "agent", booted_software_platform(), node_view_allowed=False)
    try:
        with CimaClient(a.socket) as c, pytest.raises(AgentError) as info:
            c.get_enrollment()
        assert info.value.code == "PERMISSION_DENIED"
        assert "node view" in info.value.details
        # The raw status too, for clients other than the SDK.
        with pytest.raises(grpc.RpcError) as raw:
            a.native().GetEnrollment(agent_pb2.GetEnrollmentRequest())
        assert raw.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        a.stop()
