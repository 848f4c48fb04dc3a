"""Local attestation between workloads of one node: cima.verifier.local, ``attest-peer``.

Real peers: the in-process agent on swtpm of ``test_agent_mutations`` (it
measures real processes and journals a pod and three containers), workloads A
and B as two container identities of the harness, each with its own path to
the agent's socket. A gives B a nonce; B asks the agent for its own evidence
bound to it; A appraises it with :func:`attest_peer` (the library) or
``cima client attest-peer`` (the command line), and asks its own agent
whether the evidence is of this node. A second node (another swtpm, another
AK) gives the evidence that is not local.

The TD identity (MRTD, RTMR0-2, RTMR2 moving on with IMA) is checked with the
evidence-api TDX vector (its quote, CCEL and IMA list in RTMR2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from cima.agent.events import container_scope
from cima.cli.main import main
from cima.client import CimaClient
from cima.evidence.bundle import EvidenceBundle, TPMQuoteReport
from cima.verifier.appraise import appraise
from cima.verifier.local import (
    LocalAttestationError,
    NodeIdentity,
    NotLocalError,
    OwnEvidenceError,
    attest_peer,
    check_same_node,
    node_identity,
)
from cima.verifier.reference import ReferenceValues, create_references
from cima.verifier.result import CONTRAINDICATED, AttestationResult
from tests.verifier import evidence_sets as es
from tests.verifier.test_agent_mutations import CONTAINERS, MeasuredNode, start_measured_node

A, _, IMAGE_A = CONTAINERS[0]
B, _, IMAGE_B = CONTAINERS[1]


@dataclass
class Node:
    """A measured node and its workloads: A and B (containers) and a host process."""

    measured: MeasuredNode
    a: CimaClient
    b: CimaClient
    host: CimaClient

    @contextmanager
    def acting_as(self, container_id: str) -> Iterator[Path]:
        """A socket path of the command line's own on which calls come from ``container_id``."""
        agent = self.measured.agent
        path = agent.socket.parent / f"cli-{container_id[:8]}.sock"
        if not path.exists():
            path.symlink_to(agent.socket.name)
        agent.as_container(container_id)
        try:
            yield path
        finally:
            agent.as_host()


def _start(directory: Path, tcti: str) -> tuple[Node, Any]:
    from cima.platform.tpm import TPMPlatform

    platform = TPMPlatform(tcti)
    measured = start_measured_node(directory, platform)
    node = Node(
        measured,
        a=measured.client("workload-a", A),
        b=measured.client("workload-b", B),
        host=measured.client("host"),
    )
    return node, platform


@pytest.fixture(scope="module")
def node(swtpm_module: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n, platform = _start(tmp_path_factory.mktemp("node-1"), swtpm_module.tcti)
    try:
        yield n
    finally:
        n.measured.stop()
        platform.close()


@pytest.fixture(scope="module")
def refs_b(node: Node) -> ReferenceValues:
    """Reference values from an earlier bundle of workload B."""
    return create_references([node.b.get_evidence(os.urandom(32))])


def _failure(result: AttestationResult, code: str) -> Any:
    assert result.status == CONTRAINDICATED
    found = [f for f in result.failures if f.code == code]
    assert found, [f.describe() for f in result.failures]
    return found[0]


def _spki_sha256(bundle: EvidenceBundle) -> str:
    report = bundle.report
    assert isinstance(report, TPMQuoteReport)
    der = serialization.load_pem_public_key(report.ak_pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


# -- the library ----------------------------------------------------------------------------


@pytest.mark.peer
def test_a_peer_on_the_same_node_is_affirmed(node: Node, refs_b: ReferenceValues) -> None:
    nonce = os.urandom(32)  # A's, handed to B
    bundle = node.b.get_evidence(nonce)
    assert bundle.scope == container_scope(B)
    result = attest_peer(
        bundle,
        nonce=nonce,
        references=refs_b,
        client=node.a,
        expect_container=B,
        expect_image=IMAGE_B,
    )
    assert result.affirming, [f.describe() for f in result.failures]
    details = result.submodule("evidence").details
    assert details["peer"] == container_scope(B)
    assert _spki_sha256(bundle) in details["local"]
    # The JSON form of the bundle (what B hands A as a file) is the same evidence.
    again = attest_peer(bundle.to_json_bytes(), nonce=nonce, references=refs_b, client=node.a)
    assert again.affirming


@pytest.mark.peer
def test_the_workloads_attest_each_other(node: Node, refs_b: ReferenceValues) -> None:
    refs_a = create_references([node.a.get_evidence(os.urandom(32))])
    for attester, peer, peer_id, refs in ((node.a, node.b, B, refs_b), (node.b, node.a, A, refs_a)):
        nonce = os.urandom(32)
        result = attest_peer(
            peer.get_evidence(nonce),
            nonce=nonce,
            references=refs,
            client=attester,
            expect_container=peer_id,
        )
        assert result.affirming, [f.describe() for f in result.failures]


@pytest.mark.peer
def test_the_appraisal_is_that_of_remote_attestation(node: Node, refs_b: ReferenceValues) -> None:
    # References that know neither B's image nor its events: remote and local appraisal
    # find the same failures, and local attestation adds nothing when the peer is local.
    refs = create_references([node.a.get_evidence(os.urandom(32))])
    nonce = os.urandom(32)
    bundle = node.b.get_evidence(nonce)
    remote = appraise(bundle, refs, nonce=nonce)
    local = attest_peer(bundle, nonce=nonce, references=refs, client=node.a)
    assert not remote.affirming
    assert [f.to_dict() for f in local.failures] == [f.to_dict() for f in remote.failures]
    assert {n: s.status for n, s in local.submods.items()} == {
        n: s.status for n, s in remote.submods.items()
    }
    assert any(f.code == "container-image" for f in local.failures)


@pytest.mark.peer
def test_a_bundle_bound_to_another_nonce_is_refused(node: Node, refs_b: ReferenceValues) -> None:
    mine, theirs = os.urandom(32), os.urandom(32)
    bundle = node.b.get_evidence(theirs)
    result = attest_peer(bundle, nonce=mine, references=refs_b, client=node.a)
    failure = _failure(result, "freshness")
    assert (failure.submodule, failure.step) == ("evidence", 3)
    assert mine.hex() in failure.reason
    # The nonce rewritten in the bundle: the report still binds the other one.
    forged = dataclasses.replace(bundle, nonce=mine)
    _failure(attest_peer(forged, nonce=mine, references=refs_b, client=node.a), "freshness")


@pytest.mark.peer
def test_a_node_scope_bundle_is_refused(node: Node) -> None:
    refs = create_references([node.host.get_evidence(os.urandom(32))])
    nonce = os.urandom(32)
    bundle = node.host.get_evidence(nonce)
    assert bundle.scope == "node"
    assert appraise(bundle, refs, nonce=nonce).affirming
    result = attest_peer(bundle, nonce=nonce, references=refs, client=node.a)
    failure = _failure(result, "peer-scope")
    assert (failure.submodule, failure.error) == ("evidence", "PeerScopeError")
    assert len(result.failures) == 1


@pytest.mark.peer
def test_another_container_or_image_is_refused(node: Node, refs_b: ReferenceValues) -> None:
    nonce = os.urandom(32)
    bundle = node.b.get_evidence(nonce)
    result = attest_peer(bundle, nonce=nonce, references=refs_b, client=node.a, expect_container=A)
    failure = _failure(result, "peer-container")
    assert B in failure.reason and A in failure.reason
    result = attest_peer(
        bundle, nonce=nonce, references=refs_b, client=node.a, expect_image=IMAGE_A
    )
    failure = _failure(result, "peer-image")
    assert failure.submodule == "container"
    assert IMAGE_A in failure.reason and IMAGE_B in failure.reason


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nonce": b""}, "nonce"),
        ({"expect_container": "container-b"}, "64 hex"),
    ],
)
@pytest.mark.peer
def test_bad_arguments_raise(
    node: Node, refs_b: ReferenceValues, kwargs: dict[str, Any], match: str
) -> None:
    bundle = node.b.get_evidence(b"n")
    args: dict[str, Any] = {"nonce": b"n", "references": refs_b, "client": node.a, **kwargs}
    with pytest.raises(LocalAttestationError, match=match):
        attest_peer(bundle, **args)


@pytest.mark.peer
def test_a_bundle_from_another_node_is_refused(
    node: Node, refs_b: ReferenceValues, swtpm: Any, tmp_path: Path
) -> None:
    other, platform = _start(tmp_path / "node-2", swtpm.tcti)
    try:
        earlier = other.b.get_evidence(os.urandom(32))
        nonce = os.urandom(32)
        bundle = other.b.get_evidence(nonce)
        mine = node.a.get_evidence(os.urandom(32))
        assert _spki_sha256(bundle) != _spki_sha256(mine), "the two swtpms share an AK"
        # References trusting both nodes: as remote attestation, the evidence is good.
        refs = create_references([node.b.get_evidence(os.urandom(32)), earlier])
        assert appraise(bundle, refs, nonce=nonce).affirming
        result = attest_peer(
            bundle, nonce=nonce, references=refs, client=node.a, expect_container=B
        )
        failure = _failure(result, "not-local")
        assert (failure.submodule, failure.step, failure.error) == ("evidence", 2, "NotLocalError")
        assert _spki_sha256(bundle) in failure.reason
        assert _spki_sha256(mine) in failure.reason
        assert len(result.failures) == 1
        # The same evidence appraised on its own node is local.
        assert attest_peer(bundle, nonce=nonce, references=refs, client=other.a).affirming
    finally:
        other.measured.stop()
        platform.close()


class StaleAgent:
    """An agent that answers with evidence it made earlier, whatever the nonce asked for."""

    def __init__(self, bundle: EvidenceBundle, *, relabel: bool) -> None:
        self.bundle = bundle
        self.relabel = relabel

    def get_evidence(self, nonce: bytes = b"", user_data: bytes = b"") -> EvidenceBundle:
        return dataclasses.replace(self.bundle, nonce=nonce) if self.relabel else self.bundle


@pytest.mark.parametrize("relabel", [False, True], ids=["old nonce", "nonce relabelled"])
@pytest.mark.peer
def test_own_evidence_that_is_not_fresh_is_an_error(
    node: Node, refs_b: ReferenceValues, relabel: bool
) -> None:
    nonce = os.urandom(32)
    bundle = node.b.get_evidence(nonce)
    stale = StaleAgent(node.a.get_evidence(os.urandom(32)), relabel=relabel)
    with pytest.raises(OwnEvidenceError, match="own evidence does not verify"):
        attest_peer(bundle, nonce=nonce, references=refs_b, client=stale)


# -- the TD identity ------------------------------------------------------------------------


def test_td_identity_allows_rtmr2_to_move_on() -> None:
    vb = es.evidence_api()
    own = node_identity(vb.bundle, with_history=True)
    peer = node_identity(vb.bundle)
    assert set(own.td) == {"mrtd", "rtmr0", "rtmr1", "rtmr2"}
    assert own.td["rtmr2"] in own.history and len(own.history) > 2
    check_same_node(peer, own)
    # The peer's report was taken earlier: its RTMR2 is one the node's logs passed through.
    at = own.history.index(own.td["rtmr2"])
    check_same_node(_with_td(peer, rtmr2=own.history[at - 1]), own)
    check_same_node(_with_td(peer, rtmr2=own.history[0]), own)
    for name, value in (
        ("rtmr2", hashlib.sha384(b"another TD").digest()),
        ("rtmr1", hashlib.sha384(b"another kernel").digest()),
        ("mrtd", hashlib.sha384(b"another firmware").digest()),
    ):
        with pytest.raises(NotLocalError, match=name):
            check_same_node(_with_td(peer, **{name: value}), own)
    if at + 1 < len(own.history):  # a value after the node's own: not an earlier report
        with pytest.raises(NotLocalError, match="rtmr2"):
            check_same_node(_with_td(peer, rtmr2=own.history[at + 1]), own)


def test_platforms_differ_is_not_local() -> None:
    td = node_identity(es.evidence_api().bundle)
    tpm = node_identity(es.keylime().bundle)
    assert tpm.attestation_key is not None
    for peer, own in ((td, tpm), (tpm, td)):
        with pytest.raises(NotLocalError, match="platform"):
            check_same_node(peer, own)


def _with_td(identity: NodeIdentity, **changes: bytes) -> NodeIdentity:
    return dataclasses.replace(identity, td={**identity.td, **changes})


# -- the command line -------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def peer_files(
    node: Node, refs_b: ReferenceValues, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[str, Path, Path]:
    """A's nonce, B's evidence bound to it (written by B's ``cima client evidence``), refs."""
    nonce = os.urandom(32).hex()
    bundle = tmp_path / "B.json"
    with node.acting_as(B) as sock:
        code, _, err = run(
            capsys, "client", "evidence", "--socket", str(sock), "--nonce", nonce, "-o", str(bundle)
        )
    assert code == 0, err
    refs = tmp_path / "refs.yaml"
    refs.write_text(refs_b.to_yaml())
    return nonce, bundle, refs


def attest(node: Node, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with node.acting_as(A) as sock:
        return run(capsys, "client", "attest-peer", "--socket", str(sock), *argv)


@pytest.mark.peer
def test_cli_affirming(
    node: Node, peer_files: tuple[str, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    nonce, bundle, refs = peer_files
    code, out, err = attest(
        node,
        capsys,
        str(bundle),
        "--nonce",
        nonce,
        "--reference",
        str(refs),
        "--expect-container",
        B,
        "--expect-image",
        IMAGE_B,
        "--json",
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["status"] == "affirming"
    assert doc["peer"] == container_scope(B)
    assert doc["submods"]["evidence"]["details"]["peer"] == container_scope(B)
    assert "local" in doc["submods"]["evidence"]["details"]
    # Without --json: the environment and the verdicts, and exit 0.
    code, out, _ = attest(node, capsys, str(bundle), "--nonce", nonce, "--reference", str(refs))
    assert code == 0
    assert "evidence" in out


@pytest.mark.parametrize(
    ("extra", "code_name"),
    [
        (("--nonce", "00" * 32), "freshness"),
        (("--expect-container", "c" * 64), "peer-container"),
        (("--expect-image", IMAGE_A), "peer-image"),
    ],
)
@pytest.mark.peer
def test_cli_not_affirming(
    node: Node,
    peer_files: tuple[str, Path, Path],
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    code_name: str,
) -> None:
    nonce, bundle, refs = peer_files
    args = [str(bundle), "--reference", str(refs), "--json"]
    if "--nonce" not in extra:
        args += ["--nonce", nonce]
    code, out, err = attest(node, capsys, *args, *extra)
    assert code == 1
    doc = json.loads(out)
    assert doc["status"] == "contraindicated"
    assert code_name in {f["code"] for f in doc["failures"]}
    assert len(err.strip().splitlines()) == 1 and "local attestation" in err


@pytest.mark.peer
def test_cli_bad_input(
    node: Node,
    peer_files: tuple[str, Path, Path],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    nonce, bundle, refs = peer_files
    not_json = tmp_path / "not.json"
    not_json.write_text("{ not json")
    no_bundle = tmp_path / "other.json"
    no_bundle.write_text(json.dumps({"version": 1}))
    cases = [
        ([str(tmp_path / "missing.json"), "--nonce", nonce, "--reference", str(refs)], "missing"),
        ([str(not_json), "--nonce", nonce, "--reference", str(refs)], "not.json"),
        ([str(no_bundle), "--nonce", nonce, "--reference", str(refs)], "other.json"),
        ([str(bundle), "--nonce", nonce, "--reference", str(bundle)], "B.json"),
        ([str(bundle), "--nonce", "", "--reference", str(refs)], "--nonce"),
    ]
    for argv, named in cases:
        code, out, err = attest(node, capsys, *argv)
        assert code == 2, (argv, err)
        assert out == ""
        assert named in err, err
    # Arguments argparse refuses: a nonce that is not hex, a container that is not an id.
    for argv in (
        [str(bundle), "--nonce", "xyz", "--reference", str(refs)],
        [str(bundle), "--nonce", nonce, "--reference", str(refs), "--expect-container", "b"],
    ):
        with pytest.raises(SystemExit) as info:
            attest(node, capsys, *argv)
        assert info.value.code == 2
    # No agent to ask whether the peer is local.
    code, _, err = run(
        capsys,
        "client",
        "attest-peer",
        str(bundle),
        "--nonce",
        nonce,
        "--reference",
        str(refs),
        "--socket",
        str(tmp_path / "no-agent.sock"),
        "--timeout",
        "5",
    )
    assert code == 2
    assert "no-agent.sock" in err
