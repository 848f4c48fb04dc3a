"""What the verifier keeps between attestations, and that keeping it changes no result.

A node sends the same boot log (and often the same IMA log) with every
attestation until it reboots. The decoder keeps the records of a log whose
JSON is byte-identical to one it decoded (:data:`cima.eventlog.cel.DECODED_LOGS`),
and the appraisal keeps what a boot log says by itself, its replay included
(:data:`cima.verifier.appraise.BOOT_FACTS`, by the log's canonical digest).
These tests show that a kept log is only used for that very log: a changed
boot log is decoded and appraised again and found out, and a kept replay is
still compared with the registers of each new quote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from cima.errors import ParseError
from cima.eventlog import cel
from cima.eventlog.cel import DECODED_LOGS, CELRecord, LogMemo, log_digest
from cima.evidence.bundle import EvidenceBundle
from cima.verifier.appraise import BOOT_FACTS, AppraisalState, BootFacts, appraise
from cima.verifier.reference import ReferenceValues, create_references
from cima.verifier.result import AttestationResult
from tests.verifier.nodes import SoftwareNode

NONCE = bytes(range(32))


@pytest.fixture(autouse=True)
def empty_memos() -> Iterator[None]:
    DECODED_LOGS.clear()
    BOOT_FACTS.clear()
    yield
    DECODED_LOGS.clear()
    BOOT_FACTS.clear()


@pytest.fixture(scope="module")
def node() -> SoftwareNode:
    return SoftwareNode(ima_entries=20)


@pytest.fixture(scope="module")
def refs(node: SoftwareNode) -> ReferenceValues:
    return create_references([node.bundle(os.urandom(32))], name="known good")


def _json(bundle: EvidenceBundle) -> bytes:
    return bundle.to_json().encode()


def _with_boot(bundle: EvidenceBundle, i: int, **change: Any) -> EvidenceBundle:
    """The bundle with boot record ``i`` changed (``content`` or ``digests``)."""
    assert bundle.boot_log is not None
    log = list(bundle.boot_log)
    log[i] = dataclasses.replace(log[i], **change)
    return dataclasses.replace(bundle, boot_log=tuple(log))


def _ipl_event(bundle: EvidenceBundle) -> int:
    """A boot event whose data its digest does not cover (an EV_IPL string)."""
    assert bundle.boot_log is not None
    for i, r in enumerate(bundle.boot_log):
        if r.event_type == 0x0D and r.extends:
            return i
    raise AssertionError("the boot log has no EV_IPL event")


def _document(result: AttestationResult) -> dict[str, Any]:
    """The result without what differs between two appraisals of the same evidence: how
    long each step took, and the second at which the result was issued."""
    doc = result.to_dict()
    doc.pop("timings_ms", None)
    doc.pop("issued_at", None)
    return doc


def _fresh(body: bytes, refs: ReferenceValues, **kw: Any) -> AttestationResult:
    """The appraisal of ``body`` with nothing kept from before."""
    DECODED_LOGS.clear()
    BOOT_FACTS.clear()
    return appraise(EvidenceBundle.from_json(body), refs, nonce=NONCE, **kw)


# -- decoding -------------------------------------------------------------------------------------


def test_a_byte_identical_log_is_decoded_once(node: SoftwareNode) -> None:
    body = _json(node.bundle(NONCE))
    first = EvidenceBundle.from_json(body)
    second = EvidenceBundle.from_json(body)
    assert first.boot_log is not None and first.ima_log is not None
    assert second.boot_log is first.boot_log and second.ima_log is first.ima_log
    # The records are those the log decodes to, and the digest that of all their fields.
    assert first.boot_log == node.boot
    canonical = hashlib.sha256(cel.canonical_bytes(node.boot)).digest()
    assert DECODED_LOGS.digest_of(first.boot_log) == canonical
    assert log_digest(first.boot_log) == log_digest(node.boot) == canonical
    # The runtime journal changes with every request: never kept.
    assert second.runtime_log is not first.runtime_log


def test_a_changed_log_is_decoded_again(node: SoftwareNode) -> None:
    bundle = node.bundle(NONCE)
    i = _ipl_event(bundle)
    kept = EvidenceBundle.from_json(_json(bundle)).boot_log
    data = b"grub_cmd: linux /vmlinuz-evil root=/dev/sda1\x00"
    changed = EvidenceBundle.from_json(
        _json(_with_boot(bundle, i, content={"event_type": 0x0D, "event_data": data}))
    ).boot_log
    assert kept is not None and changed is not None and changed is not kept
    assert changed[i].content["event_data"] == data and kept[i].content["event_data"] != data
    assert log_digest(changed) != log_digest(kept)


def test_an_invalid_log_is_refused_every_time(node: SoftwareNode) -> None:
    doc = json.loads(_json(node.bundle(NONCE)))
    doc["logs"]["boot"][5]["digests"][0]["digest"] = "zz"
    body = json.dumps(doc).encode()
    for _ in range(2):
        with pytest.raises(ParseError, match=r"logs\.boot\[5\].*'digests\[0\]' is invalid"):
            EvidenceBundle.from_json(body)


def test_a_bundle_made_in_memory_is_not_taken_from_the_memo(node: SoftwareNode) -> None:
    """Only decoded JSON is keyed: a document built in Python may hold what JSON cannot."""
    doc = json.loads(_json(node.bundle(NONCE)))
    first = EvidenceBundle.from_dict(doc)
    second = EvidenceBundle.from_dict(doc)
    assert first.boot_log == second.boot_log and first.boot_log is not second.boot_log


def test_the_memo_is_bounded_and_forgets_the_digests_of_what_it_drops() -> None:
    memo = LogMemo(max_records=5)

    def records(n: int, tag: int) -> tuple[CELRecord, ...]:
        return tuple(
            CELRecord(i, "pcr10", (("sha256", bytes([tag]) * 32),), "cima", {"n": i})
            for i in range(n)
        )

    a = memo.decode(b"a", 3, lambda: records(3, 1))
    assert memo.decode(b"a", 3, lambda: records(3, 9)) is a  # kept: not decoded again
    assert memo.digest_of(a) == hashlib.sha256(cel.canonical_bytes(a)).digest()
    b = memo.decode(b"b", 3, lambda: records(3, 2))  # 6 records: a goes
    assert memo.digest_of(a) is None and memo.digest_of(b) is not None
    assert memo.decode(b"a", 3, lambda: records(3, 1)) is not a
    assert memo.digest_of(records(3, 1)) is None  # an equal log it never returned


def test_log_digest_of_records_made_in_memory() -> None:
    record = CELRecord(0, "pcr4", (("sha256", b"\x01" * 32),), "pcclient_std", {})
    good = dataclasses.replace(record, content={"event_type": 13, "event_data": b"grub"})
    assert log_digest([good]) == hashlib.sha256(cel.canonical_bytes([good])).digest()
    # Content that is not what a decoded record holds: no digest (nothing is kept for it).
    odd = dataclasses.replace(record, content={"event_type": 13, "event_data": bytearray(b"g")})
    extra = dataclasses.replace(
        record, content={"event_type": 13, "event_data": b"grub", "note": "x"}
    )
    assert log_digest([odd]) is None and log_digest([extra]) is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"event_type": 13, "event_data": b"ab"}, {"event_type": 13, "event_data": b"ab\x00"}),
        ({"event_type": 13, "event_data": b"ab"}, {"event_type": 14, "event_data": b"ab"}),
        (
            {"event_type": 13, "event_data": b"ab"},
            {"event_type": 13, "event_data": b"ab", "event_size": 2},
        ),
    ],
)
def test_logs_that_differ_in_any_field_have_other_digests(
    a: dict[str, Any], b: dict[str, Any]
) -> None:
    record = CELRecord(0, "pcr4", (("sha256", b"\x01" * 32),), "pcclient_std", a)
    other = dataclasses.replace(record, content=b)
    assert log_digest([record]) != log_digest([other])
    for change in (
        {"recnum": 1},
        {"register": "pcr5"},
        {"digests": (("sha256", b"\x02" * 32),)},
        {"digests": (("sha384", b"\x01" * 48),)},
    ):
        assert log_digest([record]) != log_digest([dataclasses.replace(record, **change)])
    journal = CELRecord(0, "pcr13", (), "cima", {"x": float("nan")})
    assert log_digest([journal]) != log_digest([dataclasses.replace(journal, content={"x": None})])


# -- appraisal ------------------------------------------------------------------------------------


def test_the_kept_boot_facts_are_those_of_the_log(node: SoftwareNode) -> None:
    bundle = node.bundle(NONCE)
    assert bundle.boot_log is not None
    kept = BOOT_FACTS.of(bundle.boot_log)
    assert BOOT_FACTS.of(tuple(bundle.boot_log)) is kept  # an equal log, made again
    fresh = BootFacts.of(bundle.boot_log)
    assert (kept.values, kept.touched, kept.kernel) == (fresh.values, fresh.touched, fresh.kernel)
    changed = _with_boot(bundle, 3, digests=(("sha256", b"\x07" * 32),)).boot_log
    assert changed is not None and BOOT_FACTS.of(changed) is not kept


def test_appraisals_with_and_without_the_memos_agree(
    node: SoftwareNode, refs: ReferenceValues
) -> None:
    """Good, tampered and re-quoted evidence: the same result, kept facts or not."""
    good = node.bundle(NONCE)
    i = _ipl_event(good)
    cases = [
        good,
        _with_boot(good, i, content={"event_type": 0x0D, "event_data": b"grub_cmd: evil\x00"}),
        _with_boot(good, 2, digests=(("sha256", b"\x07" * 32), ("sha384", b"\x07" * 48))),
        good,
    ]
    for bundle in cases:
        body = _json(bundle)
        expected = _document(_fresh(body, refs))
        for _ in range(2):  # the second time from what the first one kept
            got = appraise(EvidenceBundle.from_json(body), refs, nonce=NONCE)
            assert _document(got) == expected
    assert BOOT_FACTS.hits > 0 and DECODED_LOGS.hits > 0


def test_a_changed_boot_log_of_the_same_node_is_appraised_again(
    node: SoftwareNode, refs: ReferenceValues
) -> None:
    """Same node, same boot (same key and counters), incremental state: a changed event is found."""
    good = node.bundle(NONCE)
    first = appraise(EvidenceBundle.from_json(_json(good)), refs, nonce=NONCE)
    assert first.status == "affirming" and first.state is not None
    again = appraise(EvidenceBundle.from_json(_json(good)), refs, nonce=NONCE, state=first.state)
    assert again.status == "affirming" and again.mode == "incremental"
    hits = BOOT_FACTS.hits
    i = _ipl_event(good)
    # The data of an EV_IPL event is not what its digest covers: the quote still matches.
    evil = _with_boot(
        good, i, content={"event_type": 0x0D, "event_data": b"grub_cmd: linux /evil\x00"}
    )
    result = appraise(EvidenceBundle.from_json(_json(evil)), refs, nonce=NONCE, state=first.state)
    assert BOOT_FACTS.hits == hits  # not the kept log: appraised from its own records
    assert result.status == "contraindicated"
    failure = next(f for f in result.failures if f.code == "boot-event")
    assert (failure.event, failure.log) == (i, "boot") and "its data differs" in failure.reason
    assert _document(result) == _document(_fresh(_json(evil), refs, state=first.state))


def test_a_kept_replay_is_compared_with_each_new_quote() -> None:
    """The same boot log, but a boot register extended since without a logged event."""
    node = SoftwareNode(ima_entries=20)
    refs = create_references([node.bundle(os.urandom(32))])
    body = _json(node.bundle(NONCE))
    first = appraise(EvidenceBundle.from_json(body), refs, nonce=NONCE)
    assert first.status == "affirming"
    node.platform.extend("pcr4", "sha256", hashlib.sha256(b"unlogged").digest())
    hits = BOOT_FACTS.hits
    later = node.bundle(NONCE)
    assert later.boot_log == node.boot  # byte-identical log
    result = appraise(
        EvidenceBundle.from_json(_json(later)),
        refs,
        nonce=NONCE,
        state=AppraisalState.from_dict(first.state.to_dict()) if first.state else None,
    )
    assert BOOT_FACTS.hits == hits + 1  # the kept replay was used ...
    assert result.status == "contraindicated"  # ... and compared with this quote's pcr4
    mismatch = next(f for f in result.failures if f.code == "replay-mismatch")
    assert (mismatch.register, mismatch.log) == ("pcr4", "boot")
