"""Mutation campaign: appraisal detects every change to a bundle, and says why.

Each campaign takes a bundle that appraises as affirming against reference
values made from it, then changes it in one way at a time and appraises again:

- every single byte of the report (sampled when the report is large, but at
  least 2,000 mutations per bundle): the TPMS_ATTEST, the TPMT_SIGNATURE, the
  quoted PCR values and the AK PEM of a TPM report; the whole TDX quote buffer,
  its zero padding included;
- the decoded records of each log, one byte at a time: a boot event's data and
  each of its digests, an IMA entry's template data and template hash, a
  journal event's digest and the values of its content;
- every dropped, duplicated and reordered (swapped with the next) event of each
  log; the IMA logs are sampled (every few entries) to keep the test quick.

A mutation is detected when the result is not affirming and names at least one
failure. 100% must be detected. The bundles: the keylime TPM vector (real
quote, UEFI log, IMA list), the COS 113 TDX vector (real quote and CCEL), and a
software-platform bundle with runtime journal events (the vectors have none).

The helpers (:func:`report_mutants`, :func:`record_mutants`,
:func:`structural_mutants`, :func:`campaign`) are for a wider campaign too.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from cima.eventlog.cel import CELRecord
from cima.evidence.bundle import EvidenceBundle, TDXQuoteReport, TPMQuoteReport
from cima.registers import RegisterValue
from cima.verifier.appraise import appraise
from cima.verifier.reference import ReferenceValues, create_references
from tests.verifier import evidence_sets as es

MIN_REPORT_MUTATIONS = 2000


@dataclass(frozen=True)
class Mutant:
    kind: str
    where: str
    bundle: EvidenceBundle


@dataclass
class CampaignResult:
    name: str
    counts: dict[str, int] = field(default_factory=dict)
    missed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        return (
            f"{self.name}: {self.total} mutations ({kinds}), {self.total - len(self.missed)} "
            f"detected, {len(self.missed)} missed, {self.seconds:.1f} s"
        )


def _flip(data: bytes, at: int, mask: int) -> bytes:
    b = bytearray(data)
    b[at] ^= mask
    return bytes(b)


# -- the report --------------------------------------------------------------------------------


def report_mutants(
    bundle: EvidenceBundle, *, minimum: int = MIN_REPORT_MUTATIONS, seed: int = 1
) -> Iterator[Mutant]:
    """Single-byte changes of the report: every byte where it is small, sampled where it is not."""
    rng = random.Random(seed)
    report = bundle.report
    if isinstance(report, TPMQuoteReport):
        parts: list[tuple[str, bytes]] = [
            ("attest", report.attest),
            ("signature", report.signature),
            ("ak_pem", report.ak_pem.encode()),
            *((f"pcrs[{i}]", v.digest) for i, v in enumerate(report.pcrs)),
        ]
        size = sum(len(p) for _, p in parts)
        rounds = max(1, -(-minimum // size))
        for r in range(rounds):
            for name, data in parts:
                for at in range(len(data)):
                    mask = rng.randrange(1, 256) if r else 0x01 << (at % 8)
                    changed = _flip(data, at, mask)
                    yield Mutant(
                        "report", f"{name}[{at}]^{mask:02x}", _tpm_with(bundle, name, changed)
                    )
        return
    assert isinstance(report, TDXQuoteReport)
    quote = report.quote
    positions = list(range(len(quote)))
    if len(positions) > minimum:
        # Every byte of the signed header and body, then a sample of the rest (signature data,
        # certification data, PCK chain, zero padding).
        head = positions[:632]
        rest = rng.sample(positions[632:], minimum - len(head))
        positions = sorted(head + rest)
    for at in positions:
        mask = rng.randrange(1, 256)
        yield Mutant(
            "report",
            f"quote[{at}]^{mask:02x}",
            dataclasses.replace(bundle, report=TDXQuoteReport(_flip(quote, at, mask))),
        )


def _tpm_with(bundle: EvidenceBundle, name: str, data: bytes) -> EvidenceBundle:
    report = bundle.report
    assert isinstance(report, TPMQuoteReport)
    if name == "attest":
        new = dataclasses.replace(report, attest=data)
    elif name == "signature":
        new = dataclasses.replace(report, signature=data)
    elif name == "ak_pem":
        new = dataclasses.replace(report, ak_pem=data.decode("latin-1"))
    else:
        i = int(name[5:-1])
        pcrs = list(report.pcrs)
        pcrs[i] = RegisterValue(pcrs[i].register, pcrs[i].algorithm, data)
        new = dataclasses.replace(report, pcrs=tuple(pcrs))
    return dataclasses.replace(bundle, report=new)


# -- the logs' records -------------------------------------------------------------------------


def _logs(bundle: EvidenceBundle) -> list[tuple[str, tuple[CELRecord, ...]]]:
    out = []
    if bundle.boot_log:
        out.append(("boot_log", bundle.boot_log))
    if bundle.ima_log:
        out.append(("ima_log", bundle.ima_log))
    if bundle.runtime_log:
        out.append(("runtime_log", bundle.runtime_log))
    return out


def _with_record(bundle: EvidenceBundle, log: str, i: int, record: CELRecord) -> EvidenceBundle:
    records = list(getattr(bundle, log))
    records[i] = record
    return dataclasses.replace(bundle, **{log: tuple(records)})


def _content_leaves(
    value: Any, path: tuple[Any, ...] = ()
) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _content_leaves(v, (*path, k))
    elif isinstance(value, list):
        for k, v in enumerate(value):
            yield from _content_leaves(v, (*path, k))
    else:
        yield path, value


def _set_leaf(value: Any, path: tuple[Any, ...], leaf: Any) -> Any:
    if not path:
        return leaf
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _set_leaf(value[path[0]], path[1:], leaf)
    return copy


def _changed_leaf(leaf: Any, rng: random.Random) -> Any:
    if isinstance(leaf, bool):
        return not leaf
    if isinstance(leaf, int):
        return leaf ^ (1 << rng.randrange(8))
    if isinstance(leaf, str) and leaf:
        raw = bytearray(leaf.encode())
        at = rng.randrange(len(raw))
        raw[at] = raw[at] ^ 0x01 if raw[at] < 0x7F else 0x41
        return raw.decode("utf-8", "replace")
    return "x"


def record_mutants(
    bundle: EvidenceBundle, *, per_field: int = 1, seed: int = 2, alternate: Sequence[str] = ()
) -> Iterator[Mutant]:
    """One-byte changes of each record's data and digests (``per_field`` positions each).

    In the logs named in ``alternate`` each record gets one change, of its data
    (even records) or of its digest (odd records): every record is still changed.
    """
    rng = random.Random(seed)
    for log, records in _logs(bundle):
        for i, r in enumerate(records):
            only = None if log not in alternate else ("data" if i % 2 == 0 else "digest")
            # digests
            for k, (alg, digest) in enumerate(r.digests if only != "data" else ()):
                for _ in range(per_field):
                    at = rng.randrange(len(digest))
                    digests = list(r.digests)
                    digests[k] = (alg, _flip(digest, at, rng.randrange(1, 256)))
                    rec = dataclasses.replace(r, digests=tuple(digests))
                    yield Mutant(
                        log.split("_")[0],
                        f"{log}[{i}].digests[{alg}][{at}]",
                        _with_record(bundle, log, i, rec),
                    )
            # data
            content = r.content
            if only == "digest":
                continue
            if "event_data" in content or "template_data" in content:
                key = "event_data" if "event_data" in content else "template_data"
                data = content[key]
                for _ in range(per_field if data else 0):
                    at = rng.randrange(len(data))
                    rec = dataclasses.replace(
                        r, content={**content, key: _flip(data, at, rng.randrange(1, 256))}
                    )
                    yield Mutant(
                        log.split("_")[0],
                        f"{log}[{i}].{key}[{at}]",
                        _with_record(bundle, log, i, rec),
                    )
            elif not content.get("redacted"):
                for path, leaf in _content_leaves(content):
                    rec = dataclasses.replace(
                        r, content=_set_leaf(content, path, _changed_leaf(leaf, rng))
                    )
                    if rec.content == content:
                        continue
                    yield Mutant(
                        log.split("_")[0],
                        f"{log}[{i}].content{list(path)}",
                        _with_record(bundle, log, i, rec),
                    )


def _renumber(records: Sequence[CELRecord]) -> tuple[CELRecord, ...]:
    return tuple(
        r if r.recnum == n else dataclasses.replace(r, recnum=n) for n, r in enumerate(records)
    )


def structural_mutants(bundle: EvidenceBundle, *, ima_stride: int = 1) -> Iterator[Mutant]:
    """Each event dropped, duplicated, and swapped with the next (records renumbered)."""
    for log, records in _logs(bundle):
        stride = ima_stride if log == "ima_log" else 1
        n = len(records)
        for i in range(0, n, stride):
            rest = list(records)
            del rest[i]
            yield Mutant(
                "structure",
                f"{log}: drop {i}",
                dataclasses.replace(bundle, **{log: _renumber(rest)}),
            )
            dup = list(records)
            dup.insert(i + 1, records[i])
            yield Mutant(
                "structure",
                f"{log}: duplicate {i}",
                dataclasses.replace(bundle, **{log: _renumber(dup)}),
            )
            if i + 1 < n:
                a, b = records[i], records[i + 1]
                if (a.register, a.digests, a.content) == (b.register, b.digests, b.content):
                    continue  # swapping two identical records changes nothing
                swapped = list(records)
                swapped[i], swapped[i + 1] = b, a
                yield Mutant(
                    "structure",
                    f"{log}: swap {i} and {i + 1}",
                    dataclasses.replace(bundle, **{log: _renumber(swapped)}),
                )
        if n and stride > 1 and (n - 1) % stride:
            # The last entry always: dropping or repeating it is the edge of prefix matching.
            last = list(records)
            del last[-1]
            yield Mutant(
                "structure",
                f"{log}: drop last",
                dataclasses.replace(bundle, **{log: _renumber(last)}),
            )
            dup = [*records, records[-1]]
            yield Mutant(
                "structure",
                f"{log}: duplicate last",
                dataclasses.replace(bundle, **{log: _renumber(dup)}),
            )


def campaign(
    name: str,
    bundle: EvidenceBundle,
    refs: ReferenceValues,
    mutants: Iterator[Mutant],
    **kwargs: Any,
) -> CampaignResult:
    """Appraise every mutant; those that come out affirming (or with no reason) are missed."""
    out = CampaignResult(name)
    t0 = time.perf_counter()
    for m in mutants:
        out.counts[m.kind] = out.counts.get(m.kind, 0) + 1
        result = appraise(m.bundle, refs, **kwargs)
        if result.affirming or not result.failures:
            out.missed.append(f"{m.kind}: {m.where}")
    out.seconds = time.perf_counter() - t0
    return out


def _all_mutants(
    bundle: EvidenceBundle, ima_stride: int, alternate: Sequence[str] = ()
) -> Iterator[Mutant]:
    yield from report_mutants(bundle)
    yield from record_mutants(bundle, alternate=alternate)
    yield from structural_mutants(bundle, ima_stride=ima_stride)


# -- the campaigns -----------------------------------------------------------------------------


def _refs(bundle: EvidenceBundle) -> ReferenceValues:
    return create_references([bundle])


def test_keylime_tpm_campaign(capsys: pytest.CaptureFixture[str]) -> None:
    vb = es.keylime()
    refs = _refs(vb.bundle)
    assert appraise(vb.bundle, refs, **vb.appraise_kwargs()).affirming
    result = campaign(
        "keylime TPM",
        vb.bundle,
        refs,
        _all_mutants(vb.bundle, ima_stride=4, alternate=("ima_log",)),
        **vb.appraise_kwargs(),
    )
    with capsys.disabled():
        print("\n" + result.line())
    assert result.counts["report"] >= MIN_REPORT_MUTATIONS
    assert result.counts["boot"] > 0 and result.counts["ima"] > 0 and result.counts["structure"] > 0
    assert not result.missed, result.missed[:20]


def test_cos113_tdx_campaign(capsys: pytest.CaptureFixture[str]) -> None:
    vb = es.cos113()
    refs = _refs(vb.bundle)
    assert appraise(vb.bundle, refs, **vb.appraise_kwargs()).affirming
    result = campaign(
        "COS 113 TDX",
        vb.bundle,
        refs,
        _all_mutants(vb.bundle, ima_stride=1),
        **vb.appraise_kwargs(),
    )
    with capsys.disabled():
        print("\n" + result.line())
    assert result.counts["report"] >= MIN_REPORT_MUTATIONS
    assert not result.missed, result.missed[:20]


def test_software_bundle_with_journal_campaign(capsys: pytest.CaptureFixture[str]) -> None:
    node = es.SoftwareNode.new()
    bundle = node.bundle(
        boot=es.synthetic_boot(), ima_log=es.ima_entries(40), runtime=es.runtime_events()
    )
    refs = _refs(bundle)
    nonce = bundle.nonce
    assert appraise(bundle, refs, nonce=nonce).affirming
    result = campaign(
        "software + journal", bundle, refs, _all_mutants(bundle, ima_stride=1), nonce=nonce
    )
    with capsys.disabled():
        print("\n" + result.line())
    assert result.counts["runtime"] > 0
    assert not result.missed, result.missed[:20]


def test_mutants_really_change_the_bundle() -> None:
    """A campaign that changed nothing would detect nothing and prove nothing."""
    vb = es.cos113()
    original = json.loads(vb.bundle.to_json())
    for m in list(record_mutants(vb.bundle))[:50] + list(structural_mutants(vb.bundle))[:50]:
        assert json.loads(m.bundle.to_json()) != original, m.where
