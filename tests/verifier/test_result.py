"""The attestation result: statuses, failures, the environment, and the JWT (EAR claims)."""

from __future__ import annotations

import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cima.verifier.appraise import appraise
from cima.verifier.reference import create_references
from cima.verifier.result import (
    EAR_PROFILE,
    AttestationResult,
    Failure,
    Part,
    ResultTokenError,
    Submodule,
    status_of,
    verify_jwt,
    worst,
)
from tests.verifier import evidence_sets as es


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def results() -> tuple[AttestationResult, AttestationResult]:
    vb = es.keylime()
    refs = create_references([vb.bundle])
    good = appraise(vb.bundle, refs, **vb.appraise_kwargs())
    doc = refs.to_dict()
    del doc["ima"]["files"]["/usr/bin/sqlite3"]
    from cima.verifier.reference import ReferenceValues

    bad = appraise(vb.bundle, ReferenceValues.model_validate(doc), **vb.appraise_kwargs())
    return good, bad


def _public_pem(k: ec.EllipticCurvePrivateKey) -> bytes:
    return k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_worst_and_status_of() -> None:
    assert worst([]) == "none"
    assert worst(["none", "affirming"]) == "affirming"
    assert worst(["affirming", "warning", "none"]) == "warning"
    assert worst(["warning", "contraindicated"]) == "contraindicated"
    f = Failure("ima", 5, "x", "why", "E", severity="warning")
    assert status_of([], appraised=False) == "none"
    assert status_of([], appraised=True) == "affirming"
    assert status_of([f], appraised=True) == "warning"


def test_failure_round_trip_and_description() -> None:
    f = Failure(
        "boot",
        5,
        "boot-event",
        "its data differs",
        "ReferenceMismatchError",
        register="pcr4",
        log="boot",
        event=62,
    )
    assert Failure.from_dict(f.to_dict()) == f
    assert f.describe() == "boot: step 5: [pcr4, boot event 62] its data differs"


def test_result_to_dict_is_json(results: tuple[AttestationResult, AttestationResult]) -> None:
    good, bad = results
    doc = json.loads(json.dumps(good.to_dict()))
    assert doc["status"] == "affirming"
    assert set(doc["submods"]) == {
        "evidence",
        "boot",
        "kernel",
        "ima",
        "system",
        "kubernetes",
        "container",
    }
    assert doc["environment"]["kind"] == "node"
    bad_doc = json.loads(json.dumps(bad.to_dict()))
    assert bad_doc["status"] == "contraindicated"
    (failure,) = bad_doc["failures"]
    assert failure == {
        "submodule": "ima",
        "step": 5,
        "code": "unknown-file",
        "severity": "contraindicated",
        "error": "ReferenceMismatchError",
        "reason": failure["reason"],
        "register": "pcr10",
        "log": "ima",
        "event": 779,
        "subject": "/usr/bin/sqlite3",
    }


def test_jwt_round_trip(
    key: ec.EllipticCurvePrivateKey, results: tuple[AttestationResult, AttestationResult]
) -> None:
    good, bad = results
    for result in (good, bad):
        token = result.to_jwt(key, kid="verifier-1")
        assert jwt.get_unverified_header(token)["alg"] == "ES256"
        assert jwt.get_unverified_header(token)["kid"] == "verifier-1"
        claims = verify_jwt(token, _public_pem(key))
        assert claims["eat_profile"] == EAR_PROFILE
        assert claims["iat"] == result.issued_at
        assert claims["ear.verifier-id"]["developer"] == "cima"
        assert claims["cima.status"] == result.status
        assert {k: v["ear.status"] for k, v in claims["submods"].items()} == {
            k: s.status for k, s in result.submods.items()
        }
    claims = verify_jwt(bad.to_jwt(key), key.public_key())
    (failure,) = claims["submods"]["ima"]["details"]["failures"]
    assert (failure["code"], failure["event"], failure["register"]) == (
        "unknown-file",
        779,
        "pcr10",
    )
    assert claims["submods"]["ima"]["details"]["summary"]["files_unknown"] == 1


def test_jwt_is_compact(key: ec.EllipticCurvePrivateKey) -> None:
    """A result with thousands of failures still makes a small token."""
    subs = {
        "ima": Submodule(
            "ima",
            "contraindicated",
            [Failure("ima", 5, "unknown-file", f"file {i}", "E", event=i) for i in range(5000)],
        )
    }
    result = AttestationResult(submods=subs, environment=Part("node", "n"), platform="tpm")
    token = result.to_jwt(key)
    assert len(token) < 4000
    claims = verify_jwt(token, _public_pem(key))
    assert claims["submods"]["ima"]["details"]["more_failures"] == 4990


def test_tampered_or_foreign_tokens_are_refused(
    key: ec.EllipticCurvePrivateKey, results: tuple[AttestationResult, AttestationResult]
) -> None:
    good, _ = results
    token = good.to_jwt(key)
    head, body, sig = token.split(".")
    claims = json.loads(jwt.utils.base64url_decode(body))
    claims["cima.status"] = "affirming"
    claims["submods"]["ima"]["ear.status"] = "affirming"
    forged_body = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
    if forged_body != body:
        with pytest.raises(ResultTokenError):
            verify_jwt(f"{head}.{forged_body}.{sig}", _public_pem(key))
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ResultTokenError):
        verify_jwt(token, _public_pem(other))
    hs = jwt.encode(
        {"eat_profile": EAR_PROFILE, "iat": 1, "submods": {}}, "s" * 32, algorithm="HS256"
    )
    with pytest.raises(ResultTokenError):
        verify_jwt(hs, _public_pem(key))
    not_ear = jwt.encode({"iat": 1, "eat_profile": "other"}, key, algorithm="ES256")
    with pytest.raises(ResultTokenError, match="not an EAR"):
        verify_jwt(not_ear, _public_pem(key))


def test_signing_key_must_be_p256(results: tuple[AttestationResult, AttestationResult]) -> None:
    good, _ = results
    with pytest.raises(ResultTokenError, match="P-256"):
        good.to_jwt(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ResultTokenError, match="P-256"):
        good.to_jwt(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    with pytest.raises(ResultTokenError, match="does not load"):
        good.to_jwt(b"not a key")


def test_environment_parts(results: tuple[AttestationResult, AttestationResult]) -> None:
    good, bad = results
    env = good.environment
    firmware = env.find("firmware")
    assert firmware is not None and firmware.details["version"] == "A55 v1.62 (05/22/2024)"
    apps = [p for p in env.walk() if p.kind == "boot-application"]
    assert [p.details["event"] for p in apps] == [62, 67]
    initrd = env.find("initrd")
    assert initrd is not None and initrd.name == "/initrd.img-6.8.0-51-generic"
    bad_file = bad.environment.find("file")
    assert bad_file is not None and bad_file.name == "/usr/bin/sqlite3"
    assert bad_file.status == "contraindicated"
    ima = bad.environment.find("ima")
    assert ima is not None and ima.status == "contraindicated"
