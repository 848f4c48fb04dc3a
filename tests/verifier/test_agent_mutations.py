"""Mutation campaign on evidence bundles from the real agent on swtpm.

The agent runs in-process (journal, engine, server on a Unix socket, the harness
of ``tests/agent/test_server.py``) on swtpm, with a policy that measures real
processes: copies of ``/bin/sleep`` started with arguments under a temporary
directory, listed with ``withParameter: true``. Its journal holds the agent's
code and policy, those processes, a pod and the events of three containers.
Bundles are asked for with fresh nonces through :class:`cima.client.CimaClient`,
as a workload asks: the node's view (a host process) and a container's view
(another container's events redacted). Reference values are created from one
bundle of each view, and a second bundle of the same view must appraise
affirming against them.

Then the second bundle is changed in one way at a time, re-encoded as JSON and
decoded and appraised again:

- report: each byte of the TPMS_ATTEST and of the TPMT_SIGNATURE, XORed with a
  few masks, and each byte of the quoted PCR values;
- ak: each byte of the AK's SubjectPublicKeyInfo (DER), re-encoded as PEM;
- content: each byte of each journal event's content as it is hashed (its
  canonical JSON), XORed with a few masks, spliced into the bundle's JSON;
- digest: each byte of each journal event's digest, XORed with a few masks;
- structure: each journal event dropped, duplicated and swapped with the next;
- nonce: each byte of the nonce changed in the bundle, in what the verifier
  expects, and in the bundle with its binding rewritten to match;
- binding: each byte of a container bundle's container register and binding.

A mutation is detected when the bundle is refused as it is decoded (a
:class:`~cima.errors.ParseError` with a message, from the bundle codec), or when
appraisal is not affirming and every failure it records names a reason. 100%
must be detected, with at least 10,000 mutations in all.

Besides: a nonce is accepted once by the verifier service's store; a quote
re-signed by another AK is refused as untrusted (the key named), and the
trusted AK with another key's signature is refused as a bad signature.

:func:`start_measured_node` is the harness the local attestation tests use too.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cima.agent.collectors.procfs import ProcessCollector
from cima.agent.engine import Engine
from cima.agent.events import canonical, container_scope
from cima.agent.journal import Journal
from cima.agent.policy import parse_policy
from cima.agent.server import AgentServer
from cima.client import CimaClient
from cima.errors import ParseError
from cima.eventlog.cel import CELRecord
from cima.evidence.bundle import EvidenceBundle, TPMQuoteReport, node_binding
from cima.evidence.reportdata import container_binding
from cima.evidence.tpm import Signature, verify_quote
from cima.platform.base import Platform
from cima.registers import RegisterValue
from cima.verifier.appraise import appraise
from cima.verifier.reference import ReferenceValues, create_references
from cima.verifier.result import CONTRAINDICATED, AttestationResult
from tests.agent.test_server import Agent, Identities

pytestmark = pytest.mark.peer

#: Containers the agent has journaled events of (id, name, image).
CONTAINERS = (
    ("a" * 64, "alpha", "registry.example/alpha@sha256:" + "1a" * 32),
    ("b" * 64, "bravo", "registry.example/bravo@sha256:" + "2b" * 32),
    ("c" * 64, "charlie", "registry.example/charlie@sha256:" + "3c" * 32),
)
POD_UID = "0b6a8f6e-1d2c-4e5f-8a9b-0c1d2e3f4a5b"
#: Arguments of the measured processes (sleep adds its intervals up: each runs ~1000 s).
SLEEPERS = (("1000", "0.5"), ("999", "1", "0.25"))
RUNTIME_REGISTER = "pcr13"
ALGORITHM = "sha384"
MIN_MUTATIONS = 10_000
#: XOR masks for the report's bytes, the AK, digests, nonces and bindings.
MASKS = (0x01, 0x10, 0x80, 0xFF)
#: XOR masks for the canonical JSON of journal events (0x20 toggles case and makes spaces).
CONTENT_MASKS = (0x01, 0x02, 0x20)
DECODE = "refused as it was decoded"


# -- the harness: an agent on swtpm that measures real processes ------------------------------


def measuring_policy(executable: Path) -> str:
    return f"""\
backend: none
hashAlgorithm: {ALGORITHM}
measure:
  system:
    withParameter: true
    processes:
      - {executable}
  container:
    isolated: true
"""


@dataclass
class MeasuredNode:
    """An agent (the harness's :class:`Agent`) that measures processes it started."""

    agent: Agent
    platform: Platform
    executable: Path
    processes: list[subprocess.Popen[bytes]]
    clients: list[CimaClient] = field(default_factory=list)

    def client(self, name: str, container_id: str | None = None) -> CimaClient:
        """A workload's client: its own path to the agent's socket, identified once.

        The agent identifies a connection when it accepts it, and grpcio shares a
        connection between the channels of one process that name the same
        socket path: each workload gets a path of its own (as each pod mounts
        the socket), and connects while the harness says who it is.
        """
        path = self.agent.socket.parent / f"{name}.sock"
        if not path.exists():
            path.symlink_to(self.agent.socket.name)
        if container_id is None:
            self.agent.as_host()
        else:
            self.agent.as_container(container_id, POD_UID)
        client = CimaClient(path, timeout=30)
        self.clients.append(client)
        scope = client.info()["scope"]  # connects: the identity is fixed from now on
        self.agent.as_host()
        expected = "node" if container_id is None else container_scope(container_id)
        assert scope == expected, f"{name}: the agent sees {scope}, not {expected}"
        return client

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        self.agent.stop()
        for p in self.processes:
            p.kill()
            p.wait(timeout=10)


def start_measured_node(directory: Path, platform: Platform) -> MeasuredNode:
    """Start the processes, journal the agent, its policy, them, a pod and three containers."""
    directory.mkdir(parents=True, exist_ok=True)
    bindir = directory / "bin"
    bindir.mkdir(exist_ok=True)
    executable = bindir / "sleep"
    shutil.copy2("/bin/sleep", executable)
    processes = [subprocess.Popen([str(executable), *args]) for args in SLEEPERS]
    policy = parse_policy(measuring_policy(executable), source=str(directory / "policy.yaml"))
    journal = Journal.open(
        directory / "journal",
        platform=platform,
        register=RUNTIME_REGISTER,
        algorithm=ALGORITHM,
        adopt=True,
    )
    collector = ProcessCollector(policy.measure.system, algorithm=ALGORITHM)
    engine = Engine(policy, platform, journal, collectors=[collector])
    engine.measure_self()
    # A process is measured once it shows its arguments (after execve): poll until each is.
    deadline = time.monotonic() + 20
    measured: set[int] = set()
    while len(measured) < len(processes):
        for event in engine.poll():
            if event.kind == "process":
                measured.add(int(event.data["pid"]))
        if time.monotonic() > deadline:
            for p in processes:
                p.kill()
            raise AssertionError(f"the agent measured {sorted(measured)} of {len(processes)}")
        time.sleep(0.02)
    journal.append(
        kind="pod",
        scope="node",
        subject="default/web-0",
        data={"name": "web-0", "namespace": "default", "uid": POD_UID},
    )
    for cid, name, image in CONTAINERS:
        journal.append(
            kind="container",
            scope=container_scope(cid),
            subject=cid,
            data={"name": name, "image": image, "pod_uid": POD_UID},
        )
    # A second event of container alpha: its register has two extends.
    cid, name, image = CONTAINERS[0]
    journal.append(
        kind="container",
        scope=container_scope(cid),
        subject=cid,
        data={"name": name, "image": image, "pod_uid": POD_UID, "state": "running"},
    )
    identities = Identities()
    sock = directory / "cima.sock"
    server = AgentServer(engine, socket_path=sock, identify=identities, batching=False)
    server.start()
    agent = Agent(server, engine, platform, journal, sock, identities, [])
    return MeasuredNode(agent, platform, executable, processes)


@dataclass
class Evidence:
    """A node's bundles: a first one to make references from, a second one to appraise."""

    node: MeasuredNode
    host: CimaClient
    node_refs: ReferenceValues
    node_bundle: EvidenceBundle
    container_refs: ReferenceValues
    container_bundle: EvidenceBundle


@pytest.fixture(scope="module")
def evidence(swtpm_module: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Evidence]:
    from cima.platform.tpm import TPMPlatform

    platform = TPMPlatform(swtpm_module.tcti)
    node = start_measured_node(tmp_path_factory.mktemp("measured-node"), platform)
    try:
        host = node.client("host")
        alpha = node.client("alpha", CONTAINERS[0][0])
        node_first = host.get_evidence(os.urandom(32))
        node_second = host.get_evidence(os.urandom(32))
        container_first = alpha.get_evidence(os.urandom(32))
        container_second = alpha.get_evidence(os.urandom(32), b"workload data")
        yield Evidence(
            node,
            host,
            create_references([node_first]),
            node_second,
            create_references([container_first]),
            container_second,
        )
    finally:
        node.stop()
        platform.close()


# -- the evidence is what the agent measured -----------------------------------------------------


def test_the_agent_bundles_appraise_affirming(evidence: Evidence) -> None:
    node = evidence.node
    for bundle, refs in (
        (evidence.node_bundle, evidence.node_refs),
        (evidence.container_bundle, evidence.container_refs),
    ):
        result = appraise(bundle, refs, nonce=bundle.nonce)
        assert result.affirming, [f.describe() for f in result.failures]
        for sub in ("evidence", "system", "container"):
            assert result.submodule(sub).status == "affirming", sub
    bundle = evidence.node_bundle
    assert bundle.platform == "tpm" and bundle.scope == "node"
    kinds = [r.content.get("kind") for r in bundle.runtime_log]
    assert kinds[:2] == ["agent", "policy"]
    assert kinds.count("process") == len(SLEEPERS)
    assert kinds.count("container") == len(CONTAINERS) + 1
    assert "pod" in kinds
    # Each event's digest is the hash of its content's canonical JSON.
    for r in bundle.runtime_log:
        ((alg, digest),) = r.digests
        assert hashlib.new(alg, canonical(r.content)).digest() == digest
    # The processes are the copies of sleep, measured with their arguments.
    exe = f"{ALGORITHM}:" + hashlib.new(ALGORITHM, node.executable.read_bytes()).hexdigest()
    procs = evidence.node_refs.system
    assert procs is not None
    ref = procs.processes[str(node.executable)]
    assert ref.exe_digests == [exe]
    assert sorted(map(tuple, ref.cmdlines or [])) == sorted(
        (str(node.executable), *args) for args in SLEEPERS
    )
    # The container's view: its own events in full, the other containers' redacted.
    alpha = evidence.container_bundle
    assert alpha.scope == container_scope(CONTAINERS[0][0])
    shown = [r.content for r in alpha.runtime_log]
    assert sum(1 for c in shown if c.get("redacted")) == len(CONTAINERS) - 1
    assert [c["subject"] for c in shown if c.get("kind") == "container"] == [CONTAINERS[0][0]] * 2


# -- mutants ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutant:
    """A changed bundle (its JSON) and the nonce the verifier expects."""

    kind: str
    where: str
    raw: bytes
    nonce: bytes


def _flip(data: bytes, at: int, mask: int) -> bytes:
    b = bytearray(data)
    b[at] ^= mask
    return bytes(b)


def _with_report(bundle: EvidenceBundle, **changes: Any) -> EvidenceBundle:
    report = bundle.report
    assert isinstance(report, TPMQuoteReport)
    return dataclasses.replace(bundle, report=dataclasses.replace(report, **changes))


def report_mutants(bundle: EvidenceBundle, nonce: bytes) -> Iterator[Mutant]:
    """Every byte of the TPMS_ATTEST and TPMT_SIGNATURE (each mask), of the PCR values (one)."""
    report = bundle.report
    assert isinstance(report, TPMQuoteReport)
    for name in ("attest", "signature"):
        data: bytes = getattr(report, name)
        for at in range(len(data)):
            for mask in MASKS:
                changed = _with_report(bundle, **{name: _flip(data, at, mask)})
                yield Mutant("report", f"{name}[{at}]^{mask:02x}", changed.to_json_bytes(), nonce)
    for i, v in enumerate(report.pcrs):
        for at in range(len(v.digest)):
            pcrs = list(report.pcrs)
            pcrs[i] = RegisterValue(v.register, v.algorithm, _flip(v.digest, at, 0x01))
            changed = _with_report(bundle, pcrs=tuple(pcrs))
            yield Mutant(
                "report",
                f"pcrs[{v.register}/{v.algorithm}][{at}]",
                changed.to_json_bytes(),
                nonce,
            )


def ak_mutants(bundle: EvidenceBundle, nonce: bytes) -> Iterator[Mutant]:
    """Every byte of the AK's SubjectPublicKeyInfo, re-encoded as PEM."""
    report = bundle.report
    assert isinstance(report, TPMQuoteReport)
    der = serialization.load_pem_public_key(report.ak_pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for at in range(len(der)):
        for mask in MASKS:
            pem = _pem(_flip(der, at, mask))
            changed = _with_report(bundle, ak_pem=pem)
            yield Mutant("ak", f"spki[{at}]^{mask:02x}", changed.to_json_bytes(), nonce)


def _pem(der: bytes) -> str:
    body = base64.b64encode(der).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----\n"


_HOLE = "\u0000content of the record under test\u0000"


def content_mutants(bundle: EvidenceBundle, nonce: bytes) -> Iterator[Mutant]:
    """Every byte of each journal event's canonical content, spliced into the bundle's JSON."""
    for i, r in enumerate(bundle.runtime_log):
        doc = bundle.to_dict()
        doc["logs"]["runtime"][i]["content"] = _HOLE
        text = json.dumps(doc, separators=(",", ":")).encode()
        head, tail = text.split(json.dumps(_HOLE).encode())
        content = canonical(r.content)
        for at in range(len(content)):
            for mask in CONTENT_MASKS:
                yield Mutant(
                    "content",
                    f"runtime[{i}].content[{at}]^{mask:02x}",
                    head + _flip(content, at, mask) + tail,
                    nonce,
                )


def digest_mutants(bundle: EvidenceBundle, nonce: bytes) -> Iterator[Mutant]:
    """Every byte of each journal event's digest."""
    for i, r in enumerate(bundle.runtime_log):
        ((alg, digest),) = r.digests
        for at in range(len(digest)):
            for mask in MASKS:
                record = dataclasses.replace(r, digests=((alg, _flip(digest, at, mask)),))
                yield Mutant(
                    "digest",
                    f"runtime[{i}].digest[{at}]^{mask:02x}",
                    _with_runtime(
                        bundle, (*bundle.runtime_log[:i], record, *bundle.runtime_log[i + 1 :])
                    ),
                    nonce,
                )


def _with_runtime(bundle: EvidenceBundle, records: Sequence[CELRecord]) -> bytes:
    renumbered = tuple(
        r if r.recnum == n else dataclasses.replace(r, recnum=n) for n, r in enumerate(records)
    )
    return dataclasses.replace(bundle, runtime_log=renumbered).to_json_bytes()


def structural_mutants(bundle: EvidenceBundle, nonce: bytes) -> Iterator[Mutant]:
    """Each journal event dropped, duplicated, and swapped with the next (records renumbered)."""
    records = bundle.runtime_log
    for i in range(len(records)):
        rest = list(records)
        del rest[i]
        yield Mutant("structure", f"drop {i}", _with_runtime(bundle, rest), nonce)
        dup = list(records)
        dup.insert(i + 1, records[i])
        yield Mutant("structure", f"duplicate {i}", _with_runtime(bundle, dup), nonce)
        if i + 1 < len(records):
            swapped = list(records)
            swapped[i], swapped[i + 1] = records[i + 1], records[i]
            yield Mutant(
                "structure", f"swap {i} and {i + 1}", _with_runtime(bundle, swapped), nonce
            )


def _binding_of(bundle: EvidenceBundle, nonce: bytes) -> bytes:
    if bundle.scope == "node":
        return node_binding(nonce, bundle.user_data)
    assert bundle.container_register is not None
    return container_binding(
        bundle.container_register, nonce, bundle.user_data, bundle.runtime_algorithm
    )


def nonce_mutants(bundle: EvidenceBundle, nonce: bytes) -> Iterator[Mutant]:
    """The nonce changed in the bundle, in what is expected, and in the bundle with its binding."""
    raw = bundle.to_json_bytes()
    for at in range(len(nonce)):
        for mask in MASKS:
            other = _flip(nonce, at, mask)
            changed = dataclasses.replace(bundle, nonce=other)
            yield Mutant("nonce", f"bundle nonce[{at}]^{mask:02x}", changed.to_json_bytes(), nonce)
            yield Mutant("nonce", f"expected nonce[{at}]^{mask:02x}", raw, other)
            rebound = dataclasses.replace(changed, binding=_binding_of(bundle, other))
            yield Mutant(
                "nonce", f"nonce and binding[{at}]^{mask:02x}", rebound.to_json_bytes(), other
            )


def binding_mutants(bundle: EvidenceBundle, nonce: bytes) -> Iterator[Mutant]:
    """Every byte of a container bundle's container register and binding."""
    assert bundle.container_register is not None
    for name, data in (
        ("container_register", bundle.container_register),
        ("binding", bundle.binding),
    ):
        for at in range(len(data)):
            for mask in MASKS:
                value = _flip(data, at, mask)
                changed = (
                    dataclasses.replace(bundle, container_register=value)
                    if name == "container_register"
                    else dataclasses.replace(bundle, binding=value)
                )
                yield Mutant("binding", f"{name}[{at}]^{mask:02x}", changed.to_json_bytes(), nonce)


# -- the campaign -----------------------------------------------------------------------------


@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    causes: dict[str, Counter[str]] = field(default_factory=dict)
    missed: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self) -> list[str]:
        out = []
        for kind in sorted(self.counts):
            n = self.counts[kind]
            decoded = self.refused.get(kind, 0)
            top = self.causes.get(kind, Counter()).most_common(4)
            causes = ", ".join(f"{code} {count}" for code, count in top)
            out.append(
                f"  {kind:<10} {n:>6} mutations: {decoded} refused as they were decoded, "
                f"{n - decoded} appraised not affirming ({causes}); {self.seconds[kind]:.1f} s"
            )
        return out


def detected(m: Mutant, original: EvidenceBundle, refs: ReferenceValues) -> str | None:
    """Why ``m`` was detected ("decode", or the code of appraisal's first failure), or None."""
    try:
        bundle = EvidenceBundle.from_json(m.raw)
    except ParseError as e:
        return DECODE if str(e) else None
    if bundle == original and m.nonce == original.nonce:
        raise AssertionError(f"{m.kind} {m.where}: the mutant decodes to the original bundle")
    result = appraise(bundle, refs, nonce=m.nonce)
    if result.affirming or not result.failures:
        return None
    if not all(f.reason for f in result.failures):
        return None
    return result.failures[0].code


def run_campaign(
    tally: Tally, bundle: EvidenceBundle, refs: ReferenceValues, mutants: Iterator[Mutant]
) -> None:
    for m in mutants:
        t0 = time.perf_counter()
        how = detected(m, bundle, refs)
        tally.seconds[m.kind] = tally.seconds.get(m.kind, 0.0) + time.perf_counter() - t0
        tally.counts[m.kind] = tally.counts.get(m.kind, 0) + 1
        if how is None:
            tally.missed.append(f"{m.kind}: {m.where}")
        elif how == DECODE:
            tally.refused[m.kind] = tally.refused.get(m.kind, 0) + 1
        else:
            tally.causes.setdefault(m.kind, Counter())[how] += 1


@pytest.mark.slow
def test_every_mutation_of_agent_evidence_is_detected(
    evidence: Evidence, capsys: pytest.CaptureFixture[str]
) -> None:
    tally = Tally()
    t0 = time.perf_counter()
    node, node_refs = evidence.node_bundle, evidence.node_refs
    nonce = node.nonce
    for make in (
        report_mutants,
        ak_mutants,
        content_mutants,
        digest_mutants,
        structural_mutants,
        nonce_mutants,
    ):
        run_campaign(tally, node, node_refs, make(node, nonce))
    ctr, ctr_refs = evidence.container_bundle, evidence.container_refs
    for make in (
        content_mutants,
        digest_mutants,
        structural_mutants,
        nonce_mutants,
        binding_mutants,
    ):
        run_campaign(tally, ctr, ctr_refs, make(ctr, ctr.nonce))
    elapsed = time.perf_counter() - t0
    with capsys.disabled():
        print(
            f"\nagent evidence on swtpm: {tally.total} mutations, "
            f"{tally.total - len(tally.missed)} detected, {len(tally.missed)} missed, "
            f"{elapsed:.1f} s"
        )
        print("\n".join(tally.lines()))
    assert not tally.missed, tally.missed[:20]
    assert set(tally.counts) == {
        "report",
        "ak",
        "content",
        "digest",
        "structure",
        "nonce",
        "binding",
    }
    assert tally.total >= MIN_MUTATIONS


# -- nonces -----------------------------------------------------------------------------------


def test_a_reused_nonce_is_refused_by_the_verifier_service(
    evidence: Evidence, tmp_path: Path
) -> None:
    service_module = pytest.importorskip("cima.verifier.service")
    from cima.verifier.store import Store

    with Store(f"sqlite:///{tmp_path / 'verifier.db'}", instance="test") as store:
        service = service_module.VerifierService(store)
        service.put_reference("default", evidence.node_refs.to_yaml().encode(), "application/yaml")
        host = evidence.host
        challenge = service.challenge()
        raw = host.get_evidence_json(challenge.nonce)
        first = service.attest(raw)
        assert first.status == "affirming"
        # The same evidence again, and new evidence from the agent bound to the spent nonce.
        for again in (raw, host.get_evidence_json(challenge.nonce)):
            with pytest.raises(service_module.ServiceError) as info:
                service.attest(again)
            assert (info.value.status, info.value.code) == (409, "nonce-used")
            assert str(info.value)
        # A nonce the verifier never handed out.
        with pytest.raises(service_module.ServiceError) as info:
            service.attest(host.get_evidence_json(os.urandom(32)))
        assert (info.value.status, info.value.code) == (403, "nonce-unknown")


def test_evidence_for_another_challenge_is_not_fresh(evidence: Evidence) -> None:
    host = evidence.host
    mine, theirs = os.urandom(32), os.urandom(32)
    bundle = host.get_evidence(theirs)
    result = appraise(bundle, evidence.node_refs, nonce=mine)
    assert result.status == CONTRAINDICATED
    (failure,) = result.failures
    assert (failure.step, failure.code, failure.error) == (3, "freshness", "FreshnessError")
    assert mine.hex() in failure.reason
    assert appraise(bundle, evidence.node_refs, nonce=theirs).affirming


# -- attestation keys -------------------------------------------------------------------------


def _resigned(bundle: EvidenceBundle, key: ec.EllipticCurvePrivateKey) -> tuple[bytes, str]:
    """The bundle's TPMS_ATTEST signed by ``key`` (TPMT_SIGNATURE), and the key's PEM."""
    report = bundle.report
    assert isinstance(report, TPMQuoteReport)
    der = key.sign(report.attest, ec.ECDSA(hashes.SHA256()))
    size = (key.curve.key_size + 7) // 8
    signature = Signature.ecdsa_from_der(report.hash_algorithm, der, size).to_bytes()
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return signature, pem


def _spki_sha256(pem: str) -> str:
    der = serialization.load_pem_public_key(pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _decoded(bundle: EvidenceBundle) -> EvidenceBundle:
    return EvidenceBundle.from_json(bundle.to_json_bytes())


def _only_failure(result: AttestationResult) -> Any:
    assert result.status == CONTRAINDICATED
    assert len(result.failures) == 1, [f.describe() for f in result.failures]
    return result.failures[0]


def test_a_quote_signed_by_another_ak_is_refused(evidence: Evidence) -> None:
    bundle, refs = evidence.node_bundle, evidence.node_refs
    report = bundle.report
    assert isinstance(report, TPMQuoteReport)
    assert report.hash_algorithm == "sha256"
    curve = serialization.load_pem_public_key(report.ak_pem.encode())
    assert isinstance(curve, ec.EllipticCurvePublicKey)
    other = ec.generate_private_key(curve.curve)
    signature, pem = _resigned(bundle, other)
    quoted = {(v.register, v.algorithm): v.digest for v in report.pcrs}
    # The re-signed quote is a good quote, of a key the references do not trust.
    verify_quote(report.attest, signature, pem, nonce=bundle.report_nonce(), pcr_values=quoted)
    swapped = _decoded(_with_report(bundle, signature=signature, ak_pem=pem))
    failure = _only_failure(appraise(swapped, refs, nonce=bundle.nonce))
    assert (failure.submodule, failure.step, failure.code) == ("evidence", 2, "untrusted-key")
    assert failure.error == "UntrustedKeyError"
    assert _spki_sha256(pem) in failure.reason
    # Trusted, the same key makes the same evidence affirming: the key was all that differed.
    doc = refs.to_dict()
    doc["trusted_keys"].append({"name": "other", "public_key": pem})
    trusting = ReferenceValues.model_validate(doc)
    assert appraise(swapped, trusting, nonce=bundle.nonce).affirming


def test_the_trusted_ak_with_another_signature_is_refused(evidence: Evidence) -> None:
    bundle, refs = evidence.node_bundle, evidence.node_refs
    report = bundle.report
    assert isinstance(report, TPMQuoteReport)
    signature, _ = _resigned(bundle, ec.generate_private_key(ec.SECP256R1()))
    forged = _decoded(_with_report(bundle, signature=signature))
    failure = _only_failure(appraise(forged, refs, nonce=bundle.nonce))
    assert (failure.submodule, failure.step, failure.code) == ("evidence", 2, "signature")
    assert "Signature" in failure.error
    # A signature over other bytes by the trusted TPM is no better: the attest of another quote.
    other_quote = evidence.host.get_evidence(os.urandom(32)).report
    assert isinstance(other_quote, TPMQuoteReport)
    mixed = _decoded(_with_report(bundle, signature=other_quote.signature))
    failure = _only_failure(appraise(mixed, refs, nonce=bundle.nonce))
    assert (failure.step, failure.code) == (2, "signature")
