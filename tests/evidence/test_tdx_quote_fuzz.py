"""Random and mutated input for the TDX quote codec: a value or a ParseError, nothing else.

Mutations start from the real quotes in ../shared/vectors/tdx-quote; whatever still
decodes must re-encode to the same bytes, and verifying it may only raise cima errors.
"""

from __future__ import annotations

import contextlib
import struct
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cima.errors import CimaError, ParseError
from cima.evidence import tdx
from cima.evidence.tdx import TDXQuote, verify
from tests.vectors import manifest, path

NOW = datetime(2026, 6, 1, tzinfo=UTC)  # inside every vector certificate's validity

QUOTES = [
    path("tdx-quote", e["file"]).read_bytes()
    for e in manifest("tdx-quote")
    if "header" in e["expected"]
]

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _decode(data: bytes) -> TDXQuote | None:
    try:
        q = TDXQuote.from_bytes(data)
    except ParseError:
        return None
    assert q.to_bytes() == data
    return q


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    _decode(data)
    tdx.looks_like(data)


@FUZZ
@given(
    version=st.sampled_from([4, 5]),
    body_type=st.integers(0, 4),
    rest=st.binary(max_size=2048),
)
def test_random_bytes_after_a_plausible_header(version: int, body_type: int, rest: bytes) -> None:
    header = struct.pack("<HHI", version, 2, 0x81) + bytes(40)
    descriptor = struct.pack("<HI", body_type, 648 if body_type == 3 else 584)
    data = header + (descriptor if version == 5 else b"") + rest
    assert tdx.looks_like(data)
    _decode(data)


@st.composite
def mutated_quotes(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(QUOTES)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "byte", "cut", "insert", "delete"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at : at + draw(st.integers(1, 8))]
        if not data:
            break
    return bytes(data)


@FUZZ
@given(mutated_quotes())
def test_mutated_quotes_decode_or_fail_cleanly(data: bytes) -> None:
    _decode(data)


@settings(FUZZ, max_examples=100)
@given(mutated_quotes())
def test_verifying_mutated_quotes_raises_only_cima_errors(data: bytes) -> None:
    q = _decode(data)
    if q is None:
        return
    with contextlib.suppress(CimaError):
        verify(q, now=NOW, nonce=b"\x00" * 32)


@st.composite
def pem_mutations(draw: st.DrawFn) -> bytes:
    """Mutations aimed at the PEM certificate chain, the largest free-form region."""
    data = bytearray(draw(st.sampled_from(QUOTES)))
    start = data.index(b"-----BEGIN CERTIFICATE-----")
    end = data.rindex(b"-----END CERTIFICATE-----") + 26
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(start, end - 1))
        data[at] = draw(st.sampled_from(b"\x00\n\r =-+/AZaz09\xff")) ^ draw(st.integers(0, 1))
    return bytes(data)


@settings(FUZZ, max_examples=100)
@given(pem_mutations())
def test_pem_mutations_fail_at_parse_or_chain(data: bytes) -> None:
    q = _decode(data)
    if q is None:
        return
    with contextlib.suppress(tdx.CertificateChainError):
        verify(q, now=NOW)
