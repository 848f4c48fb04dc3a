"""Local attestation: a workload appraises a peer workload of the same node.

Two workloads on one node attest each other through the node's agent, each
seeing only its own view (DESIGN.md section 7). Workload A makes a fresh nonce
and hands it to its peer B; B asks the agent for its own evidence bound to it
(``cima client evidence --nonce HEX -o B.json``) and hands the bundle back; A
appraises it::

    from cima.client import CimaClient
    from cima.verifier.local import attest_peer

    with CimaClient() as agent:
        result = attest_peer(bundle, nonce=nonce, references=refs, client=agent)
    result.raise_for_status()

:func:`attest_peer` is remote attestation's appraisal
(:func:`cima.verifier.appraise.appraise`, the same code) plus what makes it
local. Steps:

(1) appraise the bundle against the reference values with the expected nonce:
    the report, its signature chain, its freshness, the logs' replay and the
    events against the reference values (DESIGN.md section 9);
(2) the bundle is a container's evidence (its scope is ``container:<id>``,
    whose register the report binds), of the expected container when one is
    named, running the expected image when one is named (the container's own
    events, which step 1 checked against their digests and the quote);
(3) the report is from this node: A asks its own agent for its own evidence
    with a fresh nonce, checks that it binds that nonce and that its report
    verifies, and compares the node's identity with the peer's report: on a
    TPM (and the software platform) the attestation key's public key; in a TD
    MRTD and RTMR0-2, where the peer's RTMR2 may be an earlier value of the
    node's RTMR2 (IMA extends it as files are measured) that the node's boot
    and IMA logs pass through.

Failures of steps 2 and 3 are added to the result (the ``evidence`` submodule;
an image that differs to the ``container`` submodule), each naming its cause.
A node whose own evidence does not verify is an error
(:class:`OwnEvidenceError`): nothing can be concluded about locality then.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from cima.digests import by_name
from cima.errors import CimaError, FreshnessError, ParseError, SignatureError
from cima.evidence.bundle import EvidenceBundle, TDXQuoteReport, TPMQuoteReport
from cima.verifier.appraise import EvidenceView, ReferenceMismatchError, appraise, container_images
from cima.verifier.reference import ReferenceValues
from cima.verifier.result import CONTRAINDICATED, AttestationResult, Failure, worst

__all__ = [
    "TD_IDENTITY",
    "EvidenceSource",
    "LocalAttestationError",
    "NodeIdentity",
    "NotLocalError",
    "OwnEvidenceError",
    "PeerScopeError",
    "attest_peer",
    "check_same_node",
    "node_identity",
    "own_identity",
]

#: The TD registers that identify a TD's node (RTMR3 is the agent's runtime register).
TD_IDENTITY = ("mrtd", "rtmr0", "rtmr1", "rtmr2")
#: The TD register IMA extends, which may move on between two reports of one TD.
TD_GROWING = "rtmr2"
_TD_ALGORITHM = "sha384"
_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")
_OWN_NONCE_SIZE = 32


class LocalAttestationError(CimaError):
    """Local attestation cannot be done as asked."""


class NotLocalError(LocalAttestationError, SignatureError):
    """The peer's report is not from this node (another key, another TD)."""


class PeerScopeError(LocalAttestationError):
    """The peer's evidence is not of the expected container (or of no container at all)."""


class OwnEvidenceError(LocalAttestationError):
    """This node's own evidence, from its agent, does not verify."""


class EvidenceSource(Protocol):
    """What local attestation needs of the agent: this workload's own evidence."""

    def get_evidence(self, nonce: bytes = b"", user_data: bytes = b"") -> EvidenceBundle: ...


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """What identifies the node a report comes from.

    ``platform`` is the bundle's platform (``tpm``, ``software``, ``tdx``).
    ``attestation_key`` is the DER SubjectPublicKeyInfo of a TPM-format
    report's AK; ``td`` holds a TD's MRTD and RTMR0-2. ``history`` holds, for
    this node's own identity only, the values RTMR2 took as its logs replay
    (oldest first): a peer's report taken earlier may hold any of them.
    """

    platform: str
    attestation_key: bytes | None = None
    td: Mapping[str, bytes] = field(default_factory=dict)
    history: tuple[bytes, ...] = ()

    def describe(self) -> str:
        if self.attestation_key is not None:
            return (
                f"{self.platform} attestation key SPKI SHA-256 "
                f"{hashlib.sha256(self.attestation_key).hexdigest()}"
            )
        regs = ", ".join(f"{k} {v.hex()[:16]}..." for k, v in self.td.items())
        return f"{self.platform} TD ({regs})"


def node_identity(bundle: EvidenceBundle, *, with_history: bool = False) -> NodeIdentity:
    """The identity of the node that signed ``bundle``'s report (raise :class:`ParseError`).

    ``with_history``: in a TD, also the values RTMR2 takes as the bundle's boot and
    IMA logs replay (for this node's own evidence, whose logs the agent served).
    """
    report = bundle.report
    if isinstance(report, TPMQuoteReport):
        try:
            key = serialization.load_pem_public_key(report.ak_pem.encode())
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise ParseError(f"report.ak_pem: not a PEM public key: {e}") from None
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return NodeIdentity(bundle.platform, attestation_key=der)
    assert isinstance(report, TDXQuoteReport)
    from cima.evidence.tdx import TDXQuote

    registers = TDXQuote.from_bytes(report.quote).registers()
    history = _register_history(bundle, TD_GROWING) if with_history else ()
    return NodeIdentity(
        bundle.platform, td={name: registers[name] for name in TD_IDENTITY}, history=history
    )


def _register_history(bundle: EvidenceBundle, register: str) -> tuple[bytes, ...]:
    """The values ``register`` takes as the bundle's boot and IMA logs replay, from zeros."""
    view = EvidenceView.of(bundle)
    alg = by_name(_TD_ALGORITHM)
    value = alg.zero
    values = [value]
    records = [(r, r.register) for r in view.boot_records]
    records += [(r, view.ima_register(r)) for r in view.ima_records]
    for r, reg in records:
        if reg != register or not r.extends:
            continue
        digest = r.replay_digest(alg.name)
        if digest is None:
            continue
        value = alg.hash(value + digest)
        values.append(value)
    return tuple(values)


def check_same_node(peer: NodeIdentity, own: NodeIdentity) -> None:
    """Raise :class:`NotLocalError` unless ``peer`` is the node ``own`` describes."""
    if peer.platform != own.platform:
        raise NotLocalError(
            f"the peer's report is from a {peer.platform} platform, this node is {own.platform}"
        )
    if own.attestation_key is not None or peer.attestation_key is not None:
        if (
            own.attestation_key is None
            or peer.attestation_key is None
            or not hmac.compare_digest(own.attestation_key, peer.attestation_key)
        ):
            raise NotLocalError(
                f"the peer's report is signed by the {peer.describe()}, not by this node's "
                f"{own.describe()}"
            )
        return
    for name in TD_IDENTITY:
        mine, theirs = own.td.get(name), peer.td.get(name)
        if mine is None or theirs is None:
            raise NotLocalError(f"{name}: missing from a report")
        if hmac.compare_digest(mine, theirs):
            continue
        if name == TD_GROWING and _earlier(theirs, mine, own.history):
            continue
        raise NotLocalError(
            f"the peer's {name} is {theirs.hex()}, this node's is {mine.hex()}"
            + (
                f" and its logs never held {theirs.hex()[:16]}... before it"
                if name == TD_GROWING
                else ""
            )
        )


def _earlier(theirs: bytes, mine: bytes, history: tuple[bytes, ...]) -> bool:
    """True when ``theirs`` comes before ``mine`` in ``history``."""
    last = None
    for i, v in enumerate(history):
        if hmac.compare_digest(v, mine):
            last = i
    if last is None:
        return False
    return any(hmac.compare_digest(v, theirs) for v in history[:last])


def own_identity(client: EvidenceSource, references: ReferenceValues | None = None) -> NodeIdentity:
    """This node's identity, from this workload's own evidence with a fresh nonce.

    Steps: (1) ask the agent for evidence bound to a fresh nonce; (2) it binds
    that nonce (:meth:`EvidenceBundle.verify_binding`); (3) its report verifies:
    a TPM quote with its AK, a TD quote up to the Intel SGX Root CA (or a root
    ``references`` add); (4) the identity, with RTMR2's history in a TD.
    Raises :class:`OwnEvidenceError` when it does not verify.
    """
    # (1) own evidence
    nonce = secrets.token_bytes(_OWN_NONCE_SIZE)
    bundle = client.get_evidence(nonce)
    try:
        # (2) freshness
        if not hmac.compare_digest(bundle.nonce, nonce):
            raise FreshnessError(f"the agent's bundle carries nonce {bundle.nonce.hex()}")
        bundle.verify_binding()
        # (3) the report
        report = bundle.report
        if isinstance(report, TPMQuoteReport):
            from cima.evidence.tpm import verify_quote

            verify_quote(
                report.attest,
                report.signature,
                report.ak_pem,
                nonce=bundle.report_nonce(),
                user_data=bundle.report_user_data(),
                pcr_values={(v.register, v.algorithm): v.digest for v in report.pcrs},
            )
            # (4) the identity
            return node_identity(bundle)
        from cima.evidence import tdx

        quote = tdx.TDXQuote.from_bytes(report.quote)
        roots = [] if references is None else references.compiled().tdx_roots
        last: CimaError | None = None
        for root in [None, *roots]:
            try:
                tdx.verify(quote, trusted_root=root)
            except tdx.RootOfTrustError as e:
                last = e
                continue
            last = None
            break
        if last is not None:
            raise last
        # (4) the identity
        return node_identity(bundle, with_history=True)
    except CimaError as e:
        raise OwnEvidenceError(f"this node's own evidence does not verify: {e}") from e


def _add(result: AttestationResult, failure: Failure) -> None:
    sub = result.submods[failure.submodule]
    sub.failures.append(failure)
    sub.status = worst([sub.status, failure.severity])
    result.environment.status = worst([result.environment.status, failure.severity])


def _fail(
    result: AttestationResult,
    submodule: str,
    step: int,
    code: str,
    reason: str,
    *,
    error: type[BaseException],
    subject: str | None = None,
) -> None:
    _add(
        result,
        Failure(
            submodule,
            step,
            code,
            reason,
            error.__name__,
            CONTRAINDICATED,
            log="runtime" if submodule == "container" else None,
            subject=subject,
        ),
    )


def attest_peer(
    bundle: EvidenceBundle | str | bytes,
    *,
    nonce: bytes,
    references: ReferenceValues,
    client: EvidenceSource,
    expect_container: str | None = None,
    expect_image: str | None = None,
) -> AttestationResult:
    """Appraise a peer workload's evidence as local attestation (see the module docstring).

    ``nonce`` is the one this workload gave its peer; ``client`` reaches this
    node's agent (a :class:`cima.client.CimaClient`). ``expect_container`` is
    the peer's container id (64 hex digits), ``expect_image`` an image
    identifier its container events must name. Raises :class:`ParseError` for
    a bundle that does not decode, :class:`LocalAttestationError` for a bad
    argument or this node's own evidence not verifying.
    """
    if not nonce:
        raise LocalAttestationError("local attestation needs the nonce given to the peer")
    if expect_container is not None and not _CONTAINER_ID.fullmatch(expect_container):
        raise LocalAttestationError(
            f"expected container {expect_container!r} is not a container id (64 hex digits)"
        )
    if isinstance(bundle, str | bytes):
        bundle = EvidenceBundle.from_json(bundle, source="the peer's evidence bundle")
    # (1) appraisal, as for remote attestation
    result = appraise(bundle, references, nonce=nonce)
    evidence = result.submods["evidence"].details
    # (2) whose evidence
    peer_id = bundle.container_id
    if peer_id is None:
        _fail(
            result,
            "evidence",
            3,
            "peer-scope",
            "the peer's evidence is of the node, not of a container: a workload attests "
            "its peer with the peer container's own evidence",
            error=PeerScopeError,
        )
    elif expect_container is not None and peer_id != expect_container:
        _fail(
            result,
            "evidence",
            3,
            "peer-container",
            f"the evidence is of container {peer_id}, not of the expected {expect_container}",
            error=PeerScopeError,
            subject=peer_id,
        )
    else:
        evidence["peer"] = bundle.scope
    if expect_image is not None and peer_id is not None:
        images = [
            image
            for r in bundle.runtime_log
            if r.content.get("scope") == bundle.scope and r.content.get("kind") == "container"
            for image in container_images(r.content.get("data") or {})
        ]
        if expect_image not in images:
            named = ", ".join(dict.fromkeys(images)) or "no image"
            _fail(
                result,
                "container",
                5,
                "peer-image",
                f"container {peer_id} runs {named}, not the expected {expect_image}",
                error=ReferenceMismatchError,
                subject=peer_id,
            )
    # (3) the same node
    try:
        peer = node_identity(bundle)
    except ParseError as e:  # step 1 has recorded why the report does not decode
        _fail(
            result,
            "evidence",
            2,
            "not-local",
            f"the peer's node is unknown: {e}",
            error=NotLocalError,
        )
        return result
    own = own_identity(client, references)
    try:
        check_same_node(peer, own)
    except NotLocalError as e:
        _fail(result, "evidence", 2, "not-local", str(e), error=NotLocalError)
    else:
        evidence["local"] = f"the same node: {own.describe()}"
    return result
