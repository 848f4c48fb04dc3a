"""The evidence bundle (cima.evidence.bundle): JSON form, strict decoding, schema, binding."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cima.agent.events import NODE, RuntimeEvent, container_scope
from cima.errors import FreshnessError, ParseError, UnsupportedFormatError
from cima.eventlog import cel
from cima.evidence.batch import InclusionProofError, MerkleTree
from cima.evidence.bundle import (
    SCHEMA_PATH,
    EvidenceBundle,
    TDXQuoteReport,
    TPMQuoteReport,
    utc_now,
)
from cima.evidence.reportdata import SCOPED_BINDING_TAG, container_binding
from cima.evidence.tpm import verify_quote
from cima.platform.base import Report
from cima.platform.software import SoftwarePlatform
from cima.registers import RegisterValue

A = "a" * 64
B = "b" * 64


def _events() -> list[RuntimeEvent]:
    specs = [
        ("agent", NODE, "cima", {"code_digest": "sha384:00"}),
        ("container", container_scope(A), A, {"name": "a", "image": "a:1"}),
        ("container", container_scope(B), B, {"name": "b", "image": "b:1"}),
        ("container", container_scope(A), A, {"name": "a", "image": "a:2"}),
    ]
    return [
        RuntimeEvent.create(i, "pcr13", "sha384", kind=k, scope=s, subject=sub, data=d)
        for i, (k, s, sub, d) in enumerate(specs)
    ]


def _tpm_report(report: Report) -> TPMQuoteReport:
    v = report.verification
    return TPMQuoteReport(
        attest=report.body,
        signature=report.signature,
        ak_pem=v["ak_pem"],
        hash_algorithm=v["hash_algorithm"],
        pcrs=tuple(
            RegisterValue(p["register"], p["algorithm"], bytes.fromhex(p["digest"]))
            for p in v["pcrs"]
        ),
    )


class Node:
    """A software platform whose pcr13 holds the events, and bundles made on it."""

    def __init__(self) -> None:
        self.platform = SoftwarePlatform(None)
        self.events = _events()
        for e in self.events:
            self.platform.extend("pcr13", "sha384", e.digest)

    def bundle(
        self,
        scope: str,
        nonce: bytes,
        user_data: bytes,
        *,
        batch_with: list[bytes] | None = None,
        events: list[RuntimeEvent] | None = None,
    ) -> EvidenceBundle:
        events = self.events if events is None else events
        visible = [e if e.scope in (NODE, scope) else e.redacted() for e in events]
        creg = None
        if scope == NODE:
            binding = nonce + user_data
            plain = (nonce, user_data)
        else:
            creg = bytes(48)
            for e in events:
                if e.scope == scope:
                    creg = hashlib.sha384(creg + e.digest).digest()
            binding = container_binding(creg, nonce, user_data, "sha384")
            plain = (binding, SCOPED_BINDING_TAG)
        proof = root = None
        if batch_with is not None:
            leaves = [*batch_with[:2], binding, *batch_with[2:]]
            tree = MerkleTree(leaves, "sha256")
            proof, root = tree.proof(2), tree.root
            report = self.platform.report(
                tree.root, SCOPED_BINDING_TAG, algorithms=["sha256", "sha384"]
            )
        else:
            report = self.platform.report(*plain, algorithms=["sha256", "sha384"])
        return EvidenceBundle(
            platform="software",
            report=_tpm_report(report),
            nonce=nonce,
            user_data=user_data,
            scope=scope,
            binding=binding,
            runtime_register="pcr13",
            runtime_algorithm="sha384",
            runtime_start=bytes(48),
            runtime_log=tuple(e.to_cel() for e in visible),
            boot_log=None,
            ima_log=(),
            container_register=creg,
            batch=proof,
            batch_root=root,
            created=utc_now(),
            agent_version="0.1.0",
        )


NODE_ = Node()
NONCE = bytes(range(32))
USER = b"user data"
BUNDLES = {
    "node": NODE_.bundle(NODE, NONCE, USER),
    "node, empty nonce": NODE_.bundle(NODE, b"", b""),
    "container": NODE_.bundle(container_scope(A), NONCE, USER),
    "node, batched": NODE_.bundle(NODE, NONCE, USER, batch_with=[b"x", b"y", b"z"]),
    "container, batched": NODE_.bundle(
        container_scope(A), NONCE, USER, batch_with=[b"1", b"2", b"3", b"4"]
    ),
}


@pytest.mark.parametrize("name", BUNDLES)
def test_round_trip(name: str) -> None:
    bundle = BUNDLES[name]
    text = bundle.to_json()
    again = EvidenceBundle.from_json(text)
    assert again == bundle
    assert again.to_json() == text
    assert EvidenceBundle.from_json(bundle.to_json(indent=2)) == bundle


@pytest.mark.parametrize("name", BUNDLES)
def test_binding_and_quote_verify(name: str) -> None:
    bundle = EvidenceBundle.from_json(BUNDLES[name].to_json())
    bundle.verify_binding()
    report = bundle.report
    assert isinstance(report, TPMQuoteReport)
    verify_quote(
        report.attest,
        report.signature,
        report.ak_pem,
        nonce=bundle.report_nonce(),
        user_data=bundle.report_user_data(),
        pcr_values={(v.register, v.algorithm): v.digest for v in report.pcrs},
    )
    # The runtime log replays to the quoted runtime register.
    from cima.eventlog.replay import replay

    quoted = {(v.register, v.algorithm): v.digest for v in report.pcrs}
    assert replay(bundle.runtime_log).get("pcr13", "sha384") == quoted[("pcr13", "sha384")]


def test_node_binding_is_what_the_platform_binds() -> None:
    # Without a batch, a node-scoped report binds nonce || user data, as the
    # platform's own report(nonce, user_data) does.
    bundle = BUNDLES["node"]
    assert bundle.binding == NONCE + USER
    assert isinstance(bundle.report, TPMQuoteReport)
    assert bundle.report.extra_data == hashlib.sha256(NONCE + USER).digest()


def test_batched_report_binds_the_root() -> None:
    bundle = BUNDLES["node, batched"]
    assert bundle.batch is not None
    root = bundle.batch.root_from(bundle.binding)
    assert root == bundle.batch_root == bundle.report_nonce()
    assert isinstance(bundle.report, TPMQuoteReport)
    assert bundle.report.extra_data == hashlib.sha256(root + SCOPED_BINDING_TAG).digest()


def test_node_request_cannot_read_as_a_container_or_a_batch() -> None:
    # A node-scope caller asking for a report bound to the agent's scoped tag
    # could relabel it as a container's or a batch's: the verifier refuses it.
    bundle = BUNDLES["node"]
    forged = dataclasses.replace(
        bundle, nonce=b"x" * 8, user_data=SCOPED_BINDING_TAG, binding=b"x" * 8 + SCOPED_BINDING_TAG
    )
    with pytest.raises(FreshnessError, match="reserved"):
        forged.verify_binding()


def test_container_register_may_lag_the_log() -> None:
    # The binding was made before a later event of the same container was logged.
    node = Node()
    early = node.bundle(container_scope(A), NONCE, USER, events=node.events[:2])
    later = RuntimeEvent.create(
        4, "pcr13", "sha384", kind="container", scope=container_scope(A), subject=A, data={"x": 1}
    )
    node.platform.extend("pcr13", "sha384", later.digest)
    log = (*early.runtime_log, *(e.to_cel() for e in node.events[2:]), later.to_cel())
    bundle = EvidenceBundle.from_dict({**early.to_dict(), "logs": {
        "boot": None, "ima": [], "runtime": [r.to_dict() for r in log]}})  # fmt: skip
    bundle.verify_binding()


def _tampered(name: str, change: dict[str, Any]) -> EvidenceBundle:
    doc = copy.deepcopy(BUNDLES[name].to_dict())
    doc.update(change)
    return EvidenceBundle.from_dict(doc)


TAMPERED = {
    "other nonce": ("node", {"nonce": "00" * 32}),
    "other user data": ("node", {"user_data": "00"}),
    "other binding": ("node", {"binding": "00" * 41}),
    "container register not in the log": ("container", {"container_register": "11" * 48}),
    "container events removed": ("container", {"logs": {"boot": None, "ima": [], "runtime": []}}),
    "batched nonce changed": ("node, batched", {"nonce": "ff" * 32}),
    "proof of another leaf": (
        "node, batched",
        {"batch": {**BUNDLES["node, batched"].to_dict()["batch"], "leaf_index": 1}},
    ),
    "root altered": (
        "node, batched",
        {"batch": {**BUNDLES["node, batched"].to_dict()["batch"], "root": "00" * 32}},
    ),
    "proof path altered": (
        "container, batched",
        {
            "batch": {
                **BUNDLES["container, batched"].to_dict()["batch"],
                "path": ["00" * 32] * 3,
            }
        },
    ),
    "batch removed": ("node, batched", {"batch": None}),
    "report of another bundle": (
        "node",
        {"report": BUNDLES["node, empty nonce"].to_dict()["report"]},
    ),
}


@pytest.mark.parametrize("name", TAMPERED)
def test_tampered_binding_is_refused(name: str) -> None:
    base, change = TAMPERED[name]
    bundle = _tampered(base, change)
    with pytest.raises(FreshnessError):
        bundle.verify_binding()


def test_a_bad_proof_is_an_inclusion_proof_error() -> None:
    bundle = _tampered(*TAMPERED["proof path altered"])
    with pytest.raises(InclusionProofError):
        bundle.verify_binding()


# -- strict decoding ---------------------------------------------------------------------------


def _doc() -> dict[str, Any]:
    return copy.deepcopy(BUNDLES["container"].to_dict())


def _set(path: str, value: Any) -> dict[str, Any]:
    doc = _doc()
    target: Any = doc
    keys = path.split(".")
    for k in keys[:-1]:
        target = target[int(k)] if isinstance(target, list) else target[k]
    last = keys[-1]
    if value is _DELETE:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return doc


_DELETE = object()

#: (document, the field the error must name)
BAD_DOCUMENTS = {
    "missing version": (_set("version", _DELETE), "version"),
    "version is a string": (_set("version", "1"), "version"),
    "missing scope": (_set("scope", _DELETE), "scope"),
    "unknown top-level key": (_set("extra", 1), "extra"),
    "created not a time": (_set("created", "yesterday"), "created"),
    "created a number": (_set("created", 0), "created"),
    "unknown platform": (_set("platform", "sev"), "platform"),
    "scope not a container id": (_set("scope", "container:abc"), "scope"),
    "nonce not hex": (_set("nonce", "xyz"), "nonce"),
    "nonce too long": (_set("nonce", "00" * 65), "nonce"),
    "user data too long": (_set("user_data", "00" * 1025), "user_data"),
    "binding a list": (_set("binding", []), "binding"),
    "container scope without register": (_set("container_register", None), "container_register"),
    "runtime register unknown": (
        _set("runtime_register.register", "pcr99"), "runtime_register.register"),
    "runtime algorithm unknown": (
        _set("runtime_register.algorithm", "md5"), "runtime_register.algorithm"),
    "runtime start short": (_set("runtime_register.start", "00"), "runtime_register.start"),
    "runtime register extra key": (_set("runtime_register.x", 1), "runtime_register.x"),
    "batch not an object": (_set("batch", 3), "batch"),
    "report missing": (_set("report", _DELETE), "report"),
    "report type unknown": (_set("report.type", "sev-report"), "report.type"),
    "report attest not base64": (_set("report.attest", "***"), "report.attest"),
    "report signature a number": (_set("report.signature", 1), "report.signature"),
    "report without ak": (_set("report.ak_pem", _DELETE), "report.ak_pem"),
    "report pcrs an object": (_set("report.pcrs", {}), "report.pcrs"),
    "report pcr digest short": (_set("report.pcrs.0.digest", "00"), "report.pcrs[0].digest"),
    "report pcr register unknown": (
        _set("report.pcrs.0.register", "pcr24"), "report.pcrs[0].register"),
    "tdx quote on a software platform": (
        _set("report", {"type": "tdx-quote", "quote": ""}), "report.type"),
    "logs missing runtime": (_set("logs.runtime", _DELETE), "logs.runtime"),
    "runtime log null": (_set("logs.runtime", None), "logs.runtime"),
    "boot log an object": (_set("logs.boot", {}), "logs.boot"),
    "runtime record without digests": (_set("logs.runtime.0.digests", _DELETE), "logs.runtime[0]"),
    "runtime record of another content type": (
        _set("logs.runtime.0.content_type", "ima_template"), "logs.runtime[0]"),
    "batch without root": (_set("batch", {"algorithm": "sha256", "leaf_index": 0,
                                          "tree_size": 1, "path": []}), "batch.root"),
}  # fmt: skip


@pytest.mark.parametrize("name", BAD_DOCUMENTS)
def test_bad_document_is_a_parse_error_naming_the_field(name: str) -> None:
    doc, field = BAD_DOCUMENTS[name]
    with pytest.raises(ParseError) as info:
        EvidenceBundle.from_json(json.dumps(doc))
    assert field in str(info.value)


def test_unknown_version_is_named() -> None:
    doc = _doc()
    doc["version"] = 7
    with pytest.raises(UnsupportedFormatError, match="version 7"):
        EvidenceBundle.from_json(json.dumps(doc))


@pytest.mark.parametrize("text", [b"", b"{", b"[]", b"null", b"\xff\xfe", b"[" * 100_000])
def test_not_a_bundle(text: bytes) -> None:
    with pytest.raises(ParseError):
        EvidenceBundle.from_json(text)


def test_tdx_report_round_trip() -> None:
    quote = TDXQuoteReport(b"\x04\x00" + bytes(100))
    doc = _set("platform", "tdx")
    doc["report"] = quote.to_dict()
    assert EvidenceBundle.from_dict(doc).report == quote


# -- the JSON Schema -----------------------------------------------------------------------------


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return schema


def test_schema_required_fields_match_the_model() -> None:
    schema = _schema()
    doc = BUNDLES["container, batched"].to_dict()
    assert set(schema["required"]) == set(doc) == set(schema["properties"])
    props = schema["properties"]
    assert set(props["runtime_register"]["required"]) == set(doc["runtime_register"])
    assert set(props["logs"]["required"]) == set(doc["logs"])
    tpm, tdx = props["report"]["oneOf"]
    assert set(tpm["required"]) == set(doc["report"])
    assert set(tdx["required"]) == set(TDXQuoteReport(b"").to_dict())
    batch = props["batch"]["oneOf"][1]
    assert set(batch["required"]) == set(doc["batch"])


def _validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = _schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("name", BUNDLES)
def test_bundles_validate_against_the_schema(name: str) -> None:
    _validator().validate(json.loads(BUNDLES[name].to_json()))


#: Documents the schema can judge on its own (structure, not semantics).
SCHEMA_REJECTS = [
    "missing version",
    "missing scope",
    "unknown top-level key",
    "unknown platform",
    "scope not a container id",
    "nonce not hex",
    "nonce too long",
    "user data too long",
    "runtime register unknown",
    "runtime algorithm unknown",
    "runtime register extra key",
    "batch not an object",
    "report missing",
    "report type unknown",
    "report signature a number",
    "report without ak",
    "report pcrs an object",
    "report pcr register unknown",
    "logs missing runtime",
    "runtime log null",
    "boot log an object",
    "runtime record without digests",
]


@pytest.mark.parametrize("name", SCHEMA_REJECTS)
def test_the_schema_rejects_what_the_model_rejects(name: str) -> None:
    validator = _validator()
    doc, _ = BAD_DOCUMENTS[name]
    assert not validator.is_valid(doc)


# -- fuzz ---------------------------------------------------------------------------------------

_TEXT = BUNDLES["container, batched"].to_json().encode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_bundles_give_a_bundle_or_a_parse_error(data: st.DataObject) -> None:
    raw = bytearray(_TEXT)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ParseError):
        EvidenceBundle.from_json(bytes(raw))


@settings(max_examples=100, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
        max_leaves=20,
    )
)
def test_random_json_gives_a_parse_error(doc: object) -> None:
    with pytest.raises(ParseError):
        EvidenceBundle.from_json(json.dumps(doc))


def test_cel_logs_in_the_bundle_are_cel_json() -> None:
    doc = BUNDLES["container"].to_dict()
    records = cel.from_json(json.dumps(doc["logs"]["runtime"]))
    assert [r.recnum for r in records] == [0, 1, 2, 3]
    assert records[2].content == {"redacted": True}


@pytest.mark.parametrize("name", BUNDLES)
def test_streamed_json_is_the_json_of_the_dict(name: str) -> None:
    bundle = BUNDLES[name]
    expected = json.dumps(bundle.to_dict(), separators=(",", ":")).encode()
    assert bundle.to_json_bytes() == expected
    assert bundle.to_json() == expected.decode()
