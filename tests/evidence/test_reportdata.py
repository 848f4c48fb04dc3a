from __future__ import annotations

import hashlib

import pytest

from cima.errors import FreshnessError
from cima.evidence import reportdata


def test_tdx_hash_binding_is_sha512_of_nonce_and_user_data() -> None:
    rd = reportdata.tdx_report_data(b"n" * 32, b"user")
    assert rd == hashlib.sha512(b"n" * 32 + b"user").digest()
    reportdata.check_tdx_binding(rd, b"n" * 32, b"user")
    with pytest.raises(FreshnessError, match="does not bind"):
        reportdata.check_tdx_binding(rd, b"n" * 32, b"other")


def test_tdx_raw_binding_pads_to_64() -> None:
    rd = reportdata.tdx_report_data(b"\x01" * 32, mode="raw")
    assert rd == b"\x01" * 32 + bytes(32)
    with pytest.raises(FreshnessError, match="at most 64"):
        reportdata.tdx_report_data(b"\x01" * 40, b"\x02" * 40, mode="raw")


def test_tpm_binding_uses_quote_hash() -> None:
    q = reportdata.tpm_qualifying_data(b"nonce", b"ud", "sha384")
    assert q == hashlib.sha384(b"nonceud").digest()
    reportdata.check_tpm_binding(q, b"nonce", b"ud", "sha384")
    with pytest.raises(FreshnessError):
        reportdata.check_tpm_binding(q, b"nonce", b"ud", "sha256")


def test_container_binding_includes_register() -> None:
    a = reportdata.container_binding(b"\x00" * 48, b"n", b"u", "sha384")
    b = reportdata.container_binding(b"\x01" * 48, b"n", b"u", "sha384")
    assert a != b
    assert a == hashlib.sha384(b"\x00" * 48 + b"nu").digest()


@pytest.mark.parametrize(
    ("nonce", "user_data", "what"),
    [(b"x" * 65, b"", "nonce"), (b"x", b"y" * 1025, "user data")],
    ids=["oversized-nonce", "oversized-user-data"],
)
def test_oversized_inputs_refused(nonce: bytes, user_data: bytes, what: str) -> None:
    with pytest.raises(FreshnessError, match=what):
        reportdata.tdx_report_data(nonce, user_data)


def test_reserved_tag_is_found_across_the_nonce_and_user_data_boundary() -> None:
    tag = reportdata.SCOPED_BINDING_TAG
    assert reportdata.is_reserved(b"n", tag)
    assert reportdata.is_reserved(b"n" + tag[:4], tag[4:])
    assert reportdata.is_reserved(b"n" + tag, b"")
    assert not reportdata.is_reserved(b"n", tag[:-1])
    assert not reportdata.is_reserved(tag, b"x")
