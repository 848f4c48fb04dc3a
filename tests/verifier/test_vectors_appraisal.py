"""The real vectors appraised: each against reference values made from it, and from another.

How each vector becomes a bundle, and how its freshness is checked, is in
evidence_sets.py. The evidence-api TDX quote chains to Intel's pre-production
SGX root: it verifies only when the reference values name that root in
``tdx.trusted_roots``, which is how a test or a lab deployment trusts a
non-production PKI; production reference values never list it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from cima.errors import ParseError, UnsupportedFormatError
from cima.evidence.bundle import EvidenceBundle
from cima.verifier.appraise import appraise
from cima.verifier.reference import ReferenceValues, create_references, load_references
from cima.verifier.result import AttestationResult
from tests.verifier import evidence_sets as es


def refs_for(vb: es.VectorBundle) -> ReferenceValues:
    """Reference values from the vector itself, through the YAML file."""
    doc = create_references([vb.bundle], name=vb.name).to_dict()
    if vb.trusted_roots:
        doc.setdefault("tdx", {})["trusted_roots"] = list(vb.trusted_roots)
    return load_references(ReferenceValues.model_validate(doc).to_yaml(), source=vb.name)


VECTORS = {"keylime": es.keylime, "cos113": es.cos113, "evidence-api": es.evidence_api}


@pytest.fixture(scope="module")
def vectors() -> dict[str, es.VectorBundle]:
    return {name: make() for name, make in VECTORS.items()}


@pytest.fixture(scope="module")
def references(vectors: dict[str, es.VectorBundle]) -> dict[str, ReferenceValues]:
    return {name: refs_for(vb) for name, vb in vectors.items()}


def named_registers(result: AttestationResult, code: str = "register") -> set[str]:
    return {f.register for f in result.failures if f.code == code and f.register}


@pytest.mark.parametrize("name", VECTORS)
def test_vector_against_its_own_references_is_affirming(
    name: str, vectors: dict[str, es.VectorBundle], references: dict[str, ReferenceValues]
) -> None:
    vb = vectors[name]
    result = appraise(vb.bundle, references[name], **vb.appraise_kwargs())
    assert result.status == "affirming", [f.describe() for f in result.failures]
    assert result.submodule("evidence").status == "affirming"
    assert result.submodule("boot").status == "affirming"
    assert result.submodule("kernel").status == "affirming"


def test_keylime_details(
    vectors: dict[str, es.VectorBundle], references: dict[str, ReferenceValues]
) -> None:
    vb = vectors["keylime"]
    result = appraise(vb.bundle, references["keylime"], **vb.appraise_kwargs())
    ima = result.submodule("ima").details
    assert ima["verified_entries"] == 780 and ima["unverified_entries"] == 0
    assert ima["boot_aggregate"] == "matches pcr0-9"
    assert ima["files_known"] == 779
    assert result.state is not None and result.state.identity["reset_count"] == "43"


def test_keylime_against_another_vectors_references(
    vectors: dict[str, es.VectorBundle], references: dict[str, ReferenceValues]
) -> None:
    vb = vectors["keylime"]
    doc = references["cos113"].to_dict()
    doc["trusted_keys"] = references["keylime"].to_dict()["trusted_keys"]  # trust the AK
    result = appraise(vb.bundle, ReferenceValues.model_validate(doc), **vb.appraise_kwargs())
    assert result.status == "contraindicated"
    # every boot register of the TPM differs, and the TD registers the reference expects are missing
    boot_regs = {f"pcr{i}" for i in (*range(10), 14, 16)}
    assert boot_regs | {"mrtd", "rtmr0", "rtmr1", "rtmr2"} == named_registers(result)
    assert result.submodule("kernel").status == "contraindicated"


def test_cos113_against_evidence_api_references(
    vectors: dict[str, es.VectorBundle], references: dict[str, ReferenceValues]
) -> None:
    vb = vectors["cos113"]
    result = appraise(vb.bundle, references["evidence-api"], **vb.appraise_kwargs())
    assert result.status == "contraindicated"
    assert named_registers(result) == {"mrtd", "rtmr0", "rtmr1", "rtmr2"}
    assert {"td-identity", "boot-event"} <= {f.code for f in result.failures}
    assert result.submodule("evidence").status == "affirming"  # a real, fresh quote: the wrong TD


def test_evidence_api_needs_its_preproduction_root(
    vectors: dict[str, es.VectorBundle], references: dict[str, ReferenceValues]
) -> None:
    vb = vectors["evidence-api"]
    doc = references["evidence-api"].to_dict()
    del doc["tdx"]["trusted_roots"]
    result = appraise(vb.bundle, ReferenceValues.model_validate(doc), **vb.appraise_kwargs())
    (f,) = result.failures
    assert (f.step, f.code, f.error) == (2, "root-of-trust", "RootOfTrustError")
    # against the COS 113 references (production root only) it fails the same way
    assert appraise(vb.bundle, references["cos113"], **vb.appraise_kwargs()).failures[0].code == (
        "root-of-trust"
    )


def test_keylime_freshness(
    vectors: dict[str, es.VectorBundle], references: dict[str, ReferenceValues]
) -> None:
    vb = vectors["keylime"]
    wrong = appraise(vb.bundle, references["keylime"], report_data=b"x" * 20)
    assert [f.code for f in wrong.failures] == ["freshness"]
    # keylime binds base64(nonce), not H(nonce): the bundle convention does not apply
    nonce_only = appraise(vb.bundle, references["keylime"], nonce=vb.bundle.nonce)
    assert [f.code for f in nonce_only.failures] == ["freshness"]


def test_cos113_raw_nonce(
    vectors: dict[str, es.VectorBundle], references: dict[str, ReferenceValues]
) -> None:
    vb = vectors["cos113"]
    assert appraise(vb.bundle, references["cos113"], report_data=b"\x00" * 64).affirming
    result = appraise(vb.bundle, references["cos113"], report_data=b"\x01" * 64)
    assert result.failures[0].code == "freshness"


def _change_event_data(bundle: EvidenceBundle, index: int, at: int) -> EvidenceBundle:
    assert bundle.boot_log is not None
    records = list(bundle.boot_log)
    data = bytearray(records[index].content["event_data"])
    data[at] ^= 0x20
    records[index] = dataclasses.replace(
        records[index], content={**records[index].content, "event_data": bytes(data)}
    )
    return dataclasses.replace(bundle, boot_log=tuple(records))


def test_one_byte_of_a_boot_application_path_is_named(
    vectors: dict[str, es.VectorBundle], references: dict[str, ReferenceValues]
) -> None:
    """The device path of grub's image load event: its digest is of the image, not the path."""
    vb = vectors["keylime"]
    changed = _change_event_data(vb.bundle, 67, 70)
    result = appraise(changed, references["keylime"], **vb.appraise_kwargs())
    (f,) = result.failures
    assert (f.step, f.code, f.event, f.register, f.log) == (5, "boot-event", 67, "pcr4", "boot")
    assert "its data differs" in f.reason and "grubx64.efi" in f.reason
    loader = result.environment.find("bootloader")
    assert loader is not None and loader.status == "contraindicated"


def test_one_byte_of_the_kernel_command_line_is_named(
    vectors: dict[str, es.VectorBundle], references: dict[str, ReferenceValues]
) -> None:
    vb = vectors["cos113"]
    assert vb.bundle.boot_log is not None
    index = next(
        i
        for i, r in enumerate(vb.bundle.boot_log)
        if r.content["event_data"].startswith(b"kernel_cmdline: ")
    )
    changed = _change_event_data(vb.bundle, index, 30)
    result = appraise(changed, references["cos113"], **vb.appraise_kwargs())
    by_code = {f.code: f for f in result.failures}
    assert by_code["cmdline"].event == index and by_code["cmdline"].submodule == "kernel"
    assert by_code["boot-event"].event == index
    # the CCEL digest of a GRUB string is its hash: replay sees nothing, the reference does
    assert "replay-mismatch" not in by_code


# -- bad bundles -------------------------------------------------------------------------------


def _bundle_doc() -> dict[str, Any]:
    return json.loads(es.cos113().bundle.to_json())


BAD_BUNDLES: dict[str, tuple[Any, type[Exception], str]] = {
    "unknown version": (lambda d: d.update(version=2), UnsupportedFormatError, "version 2"),
    "version is a string": (lambda d: d.update(version="1"), ParseError, "version"),
    "missing report": (lambda d: d.pop("report"), ParseError, "report: missing"),
    "missing nonce": (lambda d: d.pop("nonce"), ParseError, "nonce: missing"),
    "unknown field": (lambda d: d.update(extra=1), ParseError, "extra: unknown field"),
    "nonce not hex": (lambda d: d.update(nonce="zz"), ParseError, "nonce"),
    "platform unknown": (lambda d: d.update(platform="sev"), ParseError, "platform"),
    "report type": (lambda d: d["report"].update(type="sev-report"), ParseError, "report.type"),
    "quote not base64": (lambda d: d["report"].update(quote="***"), ParseError, "report.quote"),
    "logs not an object": (lambda d: d.update(logs=[]), ParseError, "logs"),
    "boot record without digests": (
        lambda d: d["logs"]["boot"][1].pop("digests"),
        ParseError,
        "logs.boot[1]",
    ),
    "runtime log null": (lambda d: d["logs"].update(runtime=None), ParseError, "logs.runtime"),
}


@pytest.mark.parametrize("name", BAD_BUNDLES)
def test_bad_bundles_are_named(name: str) -> None:
    change, error, where = BAD_BUNDLES[name]
    doc = _bundle_doc()
    change(doc)
    text = json.dumps(doc)
    with pytest.raises(error) as info:
        EvidenceBundle.from_json(text, source="bundle.json")
    assert where in str(info.value)
    # appraise() given the text records the same error as a step-1 failure
    result = appraise(text, ReferenceValues.model_validate({"version": 1}))
    (f,) = result.failures
    assert (f.step, f.code, f.error) == (1, "bundle-format", type(info.value).__name__)
