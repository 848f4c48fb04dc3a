"""Appraisal step by step, on bundles a software-platform node signs in the test.

Each test changes one thing and checks the step, the code, the error class and
where (register, log, event) the failure is recorded. The real vectors are
appraised in test_vectors_appraisal.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest

from cima.agent.events import RuntimeEvent
from cima.eventlog.cel import CELRecord
from cima.evidence.bundle import EvidenceBundle, TPMQuoteReport
from cima.verifier.appraise import AppraisalState, appraise
from cima.verifier.reference import ReferenceValues, create_references
from cima.verifier.result import AppraisalFailedError, AttestationResult
from tests.verifier import evidence_sets as es

NONCE = b"n" * 16


@pytest.fixture(scope="module")
def node() -> es.SoftwareNode:
    return es.SoftwareNode.new()


@pytest.fixture(scope="module")
def bundle(node: es.SoftwareNode) -> EvidenceBundle:
    return node.bundle(
        boot=es.synthetic_boot(), ima_log=es.ima_entries(40), runtime=es.runtime_events()
    )


@pytest.fixture(scope="module")
def refs(bundle: EvidenceBundle) -> ReferenceValues:
    return create_references([bundle], name="test node")


def run(bundle: EvidenceBundle, refs: ReferenceValues, **kw: Any) -> AttestationResult:
    kw.setdefault("nonce", NONCE)
    return appraise(bundle, refs, **kw)


def edit(refs: ReferenceValues, change: Any) -> ReferenceValues:
    doc = refs.to_dict()
    change(doc)
    return ReferenceValues.model_validate(doc)


def codes(result: AttestationResult) -> list[str]:
    return [f.code for f in result.failures]


def only(result: AttestationResult, code: str) -> Any:
    found = [f for f in result.failures if f.code == code]
    assert len(found) == 1, [f.describe() for f in result.failures]
    return found[0]


def test_known_good_bundle_is_affirming(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    result = run(bundle, refs)
    assert result.status == "affirming", [f.describe() for f in result.failures]
    assert {k: s.status for k, s in result.submods.items()} == {
        "evidence": "affirming",
        "boot": "affirming",
        "kernel": "affirming",
        "ima": "affirming",
        "system": "affirming",
        "kubernetes": "affirming",
        "container": "affirming",
    }
    result.raise_for_status()
    assert isinstance(result.state, AppraisalState)
    assert result.state.ima_entries == 40


def test_environment_is_reconstructed(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    env = run(bundle, refs).environment
    kinds = {p.kind for p in env.walk()}
    assert {
        "firmware",
        "bootloader",
        "kernel",
        "cmdline",
        "ima",
        "process",
        "pod",
        "container",
        "image",
    } <= kinds
    assert all(p.status in ("affirming", "none") for p in env.walk())
    kernel = env.find("kernel")
    assert kernel is not None and kernel.name == "/vmlinuz-6.1"
    pod = env.find("pod")
    assert pod is not None and pod.find("container") is not None  # the container sits in its pod
    image = env.find("image")
    assert image is not None and image.name == "sha256:" + "55" * 32


def test_bundle_json_text_is_accepted(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    assert run(bundle.to_json(), refs).affirming


# -- (1) parse ---------------------------------------------------------------------------------


def _report(bundle: EvidenceBundle, **changes: Any) -> EvidenceBundle:
    assert isinstance(bundle.report, TPMQuoteReport)
    return dataclasses.replace(bundle, report=dataclasses.replace(bundle.report, **changes))


def test_step1_pcr_values_must_cover_the_selection(
    bundle: EvidenceBundle, refs: ReferenceValues
) -> None:
    assert isinstance(bundle.report, TPMQuoteReport)
    result = run(_report(bundle, pcrs=bundle.report.pcrs[:-1]), refs)
    f = only(result, "report-format")
    assert (f.step, f.error, f.submodule) == (1, "ReportFormatError", "evidence")
    assert "missing pcr16/sha256" in f.reason
    assert result.status == "contraindicated"
    assert all(s.status == "none" for k, s in result.submods.items() if k != "evidence")


def test_step1_ak_pem_must_be_canonical(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    assert isinstance(bundle.report, TPMQuoteReport)
    pem = bundle.report.ak_pem.replace("\n", "\r\n")
    assert "canonical" in only(run(_report(bundle, ak_pem=pem), refs), "report-format").reason


def test_step1_bundle_that_does_not_decode(refs: ReferenceValues) -> None:
    f = only(run('{"version": 7}', refs), "bundle-format")
    assert f.error == "UnsupportedFormatError"


def test_step1_truncated_attest(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    assert isinstance(bundle.report, TPMQuoteReport)
    f = only(run(_report(bundle, attest=bundle.report.attest[:-1]), refs), "report-format")
    assert "report.attest: pcrDigest" in f.reason


# -- (2) signature chain -----------------------------------------------------------------------


def test_step2_untrusted_key(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    other = es.SoftwareNode.new().bundle(
        boot=es.synthetic_boot(), ima_log=es.ima_entries(40), runtime=es.runtime_events()
    )
    f = only(run(other, refs), "untrusted-key")
    assert (f.step, f.error) == (2, "UntrustedKeyError")


def test_step2_no_trusted_keys(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    bare = edit(refs, lambda d: d.pop("trusted_keys"))
    assert "trust no attestation key" in only(run(bundle, bare), "untrusted-key").reason


def test_step2_trusted_by_tpm_name_alone(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    by_name = edit(refs, lambda d: d["trusted_keys"][0].pop("public_key"))
    assert run(bundle, by_name).affirming


def test_step2_signature_over_other_bytes(
    node: es.SoftwareNode, bundle: EvidenceBundle, refs: ReferenceValues
) -> None:
    other = node.bundle(
        boot=es.synthetic_boot()[:-1], ima_log=es.ima_entries(40), runtime=es.runtime_events()
    )
    assert isinstance(other.report, TPMQuoteReport)
    f = only(run(_report(bundle, signature=other.report.signature), refs), "signature")
    assert (f.step, f.error) == (2, "QuoteSignatureError")


def test_step2_pcr_value_not_in_the_digest(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    assert isinstance(bundle.report, TPMQuoteReport)
    pcrs = list(bundle.report.pcrs)
    pcrs[3] = dataclasses.replace(pcrs[3], digest=b"\x01" * 32)
    f = only(run(_report(bundle, pcrs=tuple(pcrs)), refs), "signature")
    assert f.error == "PCRDigestError"


# -- (3) freshness -----------------------------------------------------------------------------


def test_step3_wrong_nonce(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    f = only(run(bundle, refs, nonce=b"m" * 16), "freshness")
    assert (f.step, f.error) == (3, "FreshnessError")


def test_step3_nonce_in_the_bundle_not_bound(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    forged = dataclasses.replace(bundle, nonce=b"m" * 16, binding=b"m" * 16)
    f = only(run(forged, refs, nonce=b"m" * 16), "freshness")
    assert "does not bind" in f.reason


def test_step3_user_data(node: es.SoftwareNode, refs: ReferenceValues) -> None:
    b = node.bundle(
        boot=es.synthetic_boot(),
        ima_log=es.ima_entries(40),
        runtime=es.runtime_events(),
        user_data=b"key-hash",
    )
    assert run(b, refs, user_data=b"key-hash").affirming
    assert codes(run(b, refs, user_data=b"other")) == ["freshness"]


def test_step3_without_a_nonce_freshness_is_a_warning(
    bundle: EvidenceBundle, refs: ReferenceValues
) -> None:
    result = appraise(bundle, refs)
    assert result.status == "warning"
    f = only(result, "no-nonce")
    assert (f.severity, f.step) == ("warning", 3)


def test_step3_report_data_as_a_legacy_verifier_expects(
    bundle: EvidenceBundle, refs: ReferenceValues
) -> None:
    assert isinstance(bundle.report, TPMQuoteReport)
    assert run(bundle, refs, report_data=bundle.report.extra_data).affirming
    assert codes(run(bundle, refs, report_data=b"x" * 32)) == ["freshness"]


def test_step3_container_scope(node: es.SoftwareNode, refs: ReferenceValues) -> None:
    scope = "container:" + "ab" * 32
    b = node.bundle(
        boot=es.synthetic_boot(),
        ima_log=es.ima_entries(40),
        runtime=es.runtime_events(),
        scope=scope,
    )
    assert run(b, refs).affirming
    forged = dataclasses.replace(b, container_register=b"\x01" * 32)
    assert "container register" in only(run(forged, refs), "freshness").reason


def test_step3_batched_quote(node: es.SoftwareNode, refs: ReferenceValues) -> None:
    others = [b"a" * 16, b"b" * 16, b"c" * 20]
    b = node.bundle(
        boot=es.synthetic_boot(),
        ima_log=es.ima_entries(40),
        runtime=es.runtime_events(),
        batch_with=others,
    )
    result = run(b, refs)
    assert result.affirming
    assert result.submodule("evidence").details["batch"] == "leaf 3 of 4"
    assert b.batch is not None
    bad_path = dataclasses.replace(b.batch, path=(b"\x00" * 32, *b.batch.path[1:]))
    f = only(run(dataclasses.replace(b, batch=bad_path), refs), "freshness")
    assert f.step == 3


# -- (4) replay --------------------------------------------------------------------------------


def _with_record(b: EvidenceBundle, log: str, i: int, **changes: Any) -> EvidenceBundle:
    records = list(getattr(b, log))
    records[i] = dataclasses.replace(records[i], **changes)
    return dataclasses.replace(b, **{log: tuple(records)})


def test_step4_boot_digest_changed(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    assert bundle.boot_log is not None
    r = bundle.boot_log[5]
    result = run(_with_record(bundle, "boot_log", 5, digests=(("sha256", b"\x07" * 32),)), refs)
    f = only(result, "replay-mismatch")
    assert (f.step, f.register, f.log, f.error) == (4, r.register, "boot", "ReplayMismatchError")
    event = only(result, "boot-event")
    assert (event.step, event.event, event.register) == (5, 5, r.register)
    assert "sha256 digest differs" in event.reason


def test_step4_ima_log_may_run_ahead(node: es.SoftwareNode, refs: ReferenceValues) -> None:
    b = node.bundle(
        boot=es.synthetic_boot(),
        ima_log=es.ima_entries(40),
        runtime=es.runtime_events(),
        quote_ima=30,
    )
    result = run(b, refs)
    assert result.status == "warning"
    f = only(result, "unverified")
    assert (f.severity, f.event, f.log) == ("warning", 30, "ima")
    assert result.submodule("ima").details["verified_entries"] == 30
    assert result.state is not None and result.state.ima_entries == 30


def test_step4_ima_log_behind_the_quote(
    node: es.SoftwareNode, bundle: EvidenceBundle, refs: ReferenceValues
) -> None:
    assert bundle.ima_log is not None
    short = dataclasses.replace(bundle, ima_log=bundle.ima_log[:-1])
    f = only(run(short, refs), "replay-mismatch")
    assert (f.register, f.log, f.submodule) == ("pcr10", "ima", "ima")


def test_step4_template_hash_recomputed(node: es.SoftwareNode, refs: ReferenceValues) -> None:
    entries = es.ima_entries(40)
    entries[7] = dataclasses.replace(entries[7], digests=(("sha1", b"\x01" * 20),))
    b = node.bundle(boot=es.synthetic_boot(), ima_log=entries, runtime=es.runtime_events())
    result = run(b, refs)
    f = only(result, "template-hash")
    assert (f.step, f.event, f.error, f.register) == (4, 7, "TemplateHashError", "pcr10")
    assert result.submodule("ima").status == "contraindicated"


def test_step4_runtime_journal_replay(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    dropped = dataclasses.replace(bundle, runtime_log=bundle.runtime_log[:-1])
    result = run(dropped, refs)
    for sub in ("system", "kubernetes", "container"):
        assert result.submodule(sub).status == "contraindicated"
    assert {f.register for f in result.failures if f.code == "replay-mismatch"} == {"pcr13"}


# -- (5) reference values ----------------------------------------------------------------------


def test_step5_boot_event_data_change_is_named(
    bundle: EvidenceBundle, refs: ReferenceValues
) -> None:
    """A data change replay cannot see (the digest is not of the data) is found by the reference."""
    assert bundle.boot_log is not None
    data = bytearray(bundle.boot_log[3].content["event_data"])
    data[0] ^= 1
    content = {**bundle.boot_log[3].content, "event_data": bytes(data)}
    result = run(_with_record(bundle, "boot_log", 3, content=content), refs)
    f = only(result, "boot-event")
    assert (f.event, f.step, f.log) == (3, 5, "boot")
    assert "its data differs" in f.reason
    assert result.submodule("boot").status == "contraindicated"


def test_step5_boot_event_reordered(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    assert bundle.boot_log is not None
    log = list(bundle.boot_log)
    log[1], log[2] = log[2], log[1]  # different registers: replay cannot see it
    log = [dataclasses.replace(r, recnum=n) for n, r in enumerate(log)]
    result = run(dataclasses.replace(bundle, boot_log=tuple(log)), refs)
    assert result.status == "contraindicated"
    assert {f.event for f in result.failures if f.log == "boot"} & {1, 2}


def test_step5_kernel_cmdline(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    other = edit(refs, lambda d: d["kernel"].update(cmdlines=["/vmlinuz-6.1 root=/dev/sdb1 ro"]))
    f = only(run(bundle, other), "cmdline")
    assert (f.submodule, f.log) == ("kernel", "boot")
    assert f.event is not None


def test_step5_ima_unknown_file_and_digest(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    def change(d: dict[str, Any]) -> None:
        files = d["ima"]["files"]
        del files["/usr/lib/file-3"]
        files["/usr/lib/file-4"] = ["sha256:" + "00" * 32]

    result = run(bundle, edit(refs, change))
    unknown = only(result, "unknown-file")
    assert (unknown.event, unknown.subject, unknown.register) == (3, "/usr/lib/file-3", "pcr10")
    digest = only(result, "file-digest")
    assert (digest.event, digest.subject) == (4, "/usr/lib/file-4")
    assert result.submodule("ima").details["files_unknown"] == 1


def test_step5_several_digests_per_path(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    def change(d: dict[str, Any]) -> None:
        d["ima"]["files"]["/usr/lib/file-4"].insert(0, "sha256:" + "00" * 32)

    assert run(bundle, edit(refs, change)).affirming


def test_step5_unknown_file_as_a_warning_and_exclusions(
    bundle: EvidenceBundle, refs: ReferenceValues
) -> None:
    def change(d: dict[str, Any]) -> None:
        del d["ima"]["files"]["/usr/lib/file-3"]
        d["ima"]["unknown"] = "warning"

    assert run(bundle, edit(refs, change)).status == "warning"

    def exclude(d: dict[str, Any]) -> None:
        d["ima"]["files"] = {}
        d["ima"]["exclude"] = ["/usr/lib/*"]

    result = run(bundle, edit(refs, exclude))
    assert result.affirming
    assert result.submodule("ima").details["excluded"] == 40


def test_step5_violation_is_a_warning(node: es.SoftwareNode, refs: ReferenceValues) -> None:
    entries = es.ima_entries(40)
    entries[5] = dataclasses.replace(entries[5], digests=(("sha1", bytes(20)),))
    b = node.bundle(boot=es.synthetic_boot(), ima_log=entries, runtime=es.runtime_events())
    result = run(b, refs)
    f = only(result, "violation")
    assert (f.severity, f.event) == ("warning", 5)
    assert result.status == "warning"


def test_step5_boot_aggregate(node: es.SoftwareNode) -> None:
    boot = es.synthetic_boot()
    plain = node.bundle(boot=boot, ima_log=None)
    assert isinstance(plain.report, TPMQuoteReport)
    pcrs = {v.register: v.digest for v in plain.report.pcrs}
    good = hashlib.sha256(b"".join(pcrs[f"pcr{i}"] for i in range(10))).digest()
    for digest, ok in ((good, True), (b"\x02" * 32, False)):
        entries = [es.ima_ng_entry(0, b"boot_aggregate", digest), *es.ima_entries(3, start=1)]
        b = node.bundle(boot=boot, ima_log=entries)
        result = run(b, create_references([b]))
        if ok:
            assert result.affirming
            assert result.submodule("ima").details["boot_aggregate"] == "matches pcr0-9"
        else:
            f = only(result, "boot-aggregate")
            assert (f.event, f.register) == (0, "pcr10")


def _runtime(node: es.SoftwareNode, events: list[RuntimeEvent]) -> EvidenceBundle:
    return node.bundle(boot=es.synthetic_boot(), ima_log=es.ima_entries(40), runtime=events)


def test_step5_journal_content_must_hash_to_its_digest(
    node: es.SoftwareNode, bundle: EvidenceBundle, refs: ReferenceValues
) -> None:
    r = bundle.runtime_log[2]
    content = json.loads(json.dumps(r.content))
    content["data"]["exe_digest"] = "sha256:" + "99" * 32
    result = run(_with_record(bundle, "runtime_log", 2, content=content), refs)
    f = only(result, "event-content")
    assert (f.event, f.submodule, f.log, f.register) == (2, "system", "runtime", "pcr13")


def test_step5_redacted_events_are_accepted(node: es.SoftwareNode, refs: ReferenceValues) -> None:
    events = es.runtime_events()
    events[4] = events[4].redacted()
    result = run(_runtime(node, events), refs)
    assert result.affirming
    assert result.submodule("container").details["redacted"] == 1
    assert any(p.kind == "redacted" for p in result.environment.walk())


def _event(
    n: int, kind: str, subject: str, data: dict[str, Any], scope: str = "node"
) -> RuntimeEvent:
    return RuntimeEvent.create(
        n, "pcr13", "sha256", kind=kind, scope=scope, subject=subject, data=data
    )


@pytest.mark.parametrize(
    ("kind", "subject", "data", "code", "submodule"),
    [
        (
            "process",
            "/usr/bin/evil",
            {"exe_digest": "sha256:" + "44" * 32},
            "unknown-process",
            "system",
        ),
        (
            "process",
            "/usr/bin/containerd",
            {"exe_digest": "sha256:" + "45" * 32, "cmdline": ["/usr/bin/containerd"]},
            "process-digest",
            "system",
        ),
        (
            "process",
            "/usr/bin/containerd",
            {"exe_digest": "sha256:" + "44" * 32, "cmdline": ["/usr/bin/containerd", "-x"]},
            "process-cmdline",
            "system",
        ),
        ("agent", "cima", {"code_digest": "sha256:" + "12" * 32}, "agent-code", "system"),
        (
            "policy",
            "/etc/cima/policy.yaml",
            {"policy_digest": "sha256:" + "34" * 32},
            "agent-policy",
            "system",
        ),
        (
            "pod",
            "kube-system/etcd-node1",
            {"name": "etcd-node1", "namespace": "kube-system"},
            "unknown-pod",
            "kubernetes",
        ),
        (
            "container",
            "cd" * 32,
            {"image_id": "sha256:" + "56" * 32},
            "container-image",
            "container",
        ),
    ],
)
def test_step5_runtime_events_against_references(
    node: es.SoftwareNode,
    refs: ReferenceValues,
    kind: str,
    subject: str,
    data: dict[str, Any],
    code: str,
    submodule: str,
) -> None:
    events = [*es.runtime_events(), _event(5, kind, subject, data)]
    result = run(_runtime(node, events), refs)
    f = only(result, code)
    assert (f.submodule, f.event, f.step, f.error, f.subject) == (
        submodule,
        5,
        5,
        "ReferenceMismatchError",
        subject,
    )
    assert result.submodule(submodule).status == "contraindicated"
    others = {k for k, s in result.submods.items() if s.status != "affirming"}
    assert others == {submodule}


def test_step5_unknown_event_kind_is_a_warning(
    node: es.SoftwareNode, refs: ReferenceValues
) -> None:
    result = run(_runtime(node, [*es.runtime_events(), _event(5, "gadget", "x", {})]), refs)
    assert only(result, "unknown-kind").severity == "warning"


# -- incremental -------------------------------------------------------------------------------


@pytest.fixture
def growing(node: es.SoftwareNode) -> tuple[list[CELRecord], ReferenceValues]:
    entries = es.ima_entries(300)
    full = node.bundle(boot=es.synthetic_boot(), ima_log=entries, runtime=es.runtime_events())
    return entries, create_references([full])


def test_incremental_same_boot(
    node: es.SoftwareNode, growing: tuple[list[CELRecord], ReferenceValues]
) -> None:
    entries, refs = growing
    first = run(
        node.bundle(boot=es.synthetic_boot(), ima_log=entries[:100], runtime=es.runtime_events()),
        refs,
    )
    assert first.mode == "full" and first.state is not None
    second = run(
        node.bundle(boot=es.synthetic_boot(), ima_log=entries[:200], runtime=es.runtime_events()),
        refs,
        state=first.state,
    )
    assert second.affirming
    assert second.mode == "incremental"
    assert "100 IMA entries were appraised before" in second.mode_reason
    assert second.state is not None and second.state.ima_entries == 200
    assert second.submodule("ima").details["files_known"] == 200  # 100 before, 100 now
    # the state survives JSON (a store keeps it)
    stored = json.loads(json.dumps(second.state.to_dict()))
    third = run(
        node.bundle(boot=es.synthetic_boot(), ima_log=entries, runtime=es.runtime_events()),
        refs,
        state=stored,
    )
    assert third.mode == "incremental" and third.affirming


def test_incremental_keeps_earlier_failures(
    node: es.SoftwareNode, growing: tuple[list[CELRecord], ReferenceValues]
) -> None:
    entries, refs = growing
    fewer = edit(refs, lambda d: d["ima"]["files"].pop("/usr/lib/file-10"))
    first = run(node.bundle(boot=es.synthetic_boot(), ima_log=entries[:100]), fewer)
    assert codes(first) == ["unknown-file"]
    second = run(
        node.bundle(boot=es.synthetic_boot(), ima_log=entries[:150]), fewer, state=first.state
    )
    assert second.mode == "incremental"
    assert only(second, "unknown-file").event == 10


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("reset", "a new boot (reset_count 1 -> 2)"),
        ("restart", "a new boot (restart_count 0 -> 1)"),
        ("references", "the reference values changed"),
        ("not-a-prefix", "not a prefix of this log"),
        ("shorter", "fewer than the 100 appraised before"),
    ],
)
def test_incremental_starts_over(
    node: es.SoftwareNode,
    growing: tuple[list[CELRecord], ReferenceValues],
    change: str,
    reason: str,
) -> None:
    entries, refs = growing
    node = es.SoftwareNode(node.key)  # the trusted key, counters of its own
    first = run(node.bundle(boot=es.synthetic_boot(), ima_log=entries[:100]), refs)
    log = entries[:200]
    if change == "reset":
        node.reset_count += 1
    elif change == "restart":
        node.restart_count += 1
    elif change == "references":
        refs = edit(
            refs, lambda d: d["ima"]["files"]["/usr/lib/file-0"].append("sha256:" + "00" * 32)
        )
    elif change == "not-a-prefix":
        log = [*entries[1:2], *entries[:1], *entries[2:200]]
        log = [dataclasses.replace(r, recnum=n) for n, r in enumerate(log)]
    elif change == "shorter":
        log = entries[:50]
    second = run(node.bundle(boot=es.synthetic_boot(), ima_log=log), refs, state=first.state)
    assert second.mode == "full"
    assert reason in second.mode_reason
    assert second.affirming, [f.describe() for f in second.failures]


def test_incremental_on_a_td() -> None:
    vb = es.evidence_api()
    doc = create_references([vb.bundle]).to_dict()
    doc["tdx"]["trusted_roots"] = list(vb.trusted_roots)
    refs = ReferenceValues.model_validate(doc)
    first = appraise(vb.bundle, refs, **vb.appraise_kwargs())
    assert first.affirming and first.state is not None
    assert set(first.state.identity) == {"mrtd", "rtmr0", "rtmr1"}
    assert "rtmr2" in first.state.boot_values  # the boot log's part of the shared register
    second = appraise(vb.bundle, refs, state=first.state, **vb.appraise_kwargs())
    assert second.mode == "incremental" and second.affirming


def test_raise_for_status(bundle: EvidenceBundle, refs: ReferenceValues) -> None:
    result = run(bundle, refs, nonce=b"x")
    with pytest.raises(AppraisalFailedError, match="contraindicated: evidence: step 3"):
        result.raise_for_status()


def test_a_record_of_another_kind_in_the_boot_log_is_malformed_not_fatal(
    bundle: EvidenceBundle, refs: ReferenceValues
) -> None:
    """A journal record whose content looks like a boot event's: named, and nothing breaks."""
    assert bundle.boot_log is not None
    odd = CELRecord(3, "pcr4", (), "cima", {"event_type": "x", "event_data": "y"})
    log = (*bundle.boot_log[:3], odd, *bundle.boot_log[4:])
    result = run(dataclasses.replace(bundle, boot_log=log), refs)
    assert result.status == "contraindicated"
    malformed = only(result, "log-malformed")
    assert (malformed.event, malformed.log, malformed.submodule) == (3, "boot", "boot")
