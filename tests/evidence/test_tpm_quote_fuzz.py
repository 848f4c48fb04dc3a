"""Random and mutated inputs to the TPM codecs: a value or a ParseError, never another exception."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cima.errors import ParseError
from cima.evidence.tpm import (
    PCRValues,
    PublicArea,
    Quote,
    QuoteError,
    Signature,
    looks_like,
    verify_quote,
)
from tests.vectors import path

CATEGORY = "tpm-quote"


def vector(name: str) -> bytes:
    return path(CATEGORY, name).read_bytes()


ATTESTS = [vector("keylime-perf-tests/attest.bin"), vector("trustee/attest.bin")]
SIGNATURES = [vector("keylime-perf-tests/signature.tpmt.bin"), vector("trustee/signature.tpmt.bin")]
PUBLICS = [vector("keylime-perf-tests/ak.tpm2b_public.bin")]
PCR_FILES = [vector("keylime-perf-tests/pcrs.tpm2tools.bin"), vector("trustee/pcrs.tpm2tools.bin")]

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A real input with a few bytes flipped, inserted, deleted, or cut short."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


def decodes_or_parse_error(decode: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return decode(data)
    except ParseError as e:
        assert e.offset is None or 0 <= e.offset <= len(data) + 2
        return None


@FUZZ
@given(st.binary(max_size=300) | mutated(ATTESTS))
def test_quote_from_bytes(data: bytes) -> None:
    quote = decodes_or_parse_error(Quote.from_bytes, data)
    if quote is not None:
        assert looks_like(data)
        assert quote.to_bytes() == data
        quote.to_dict()


@FUZZ
@given(st.binary(max_size=300) | mutated(SIGNATURES))
def test_signature_from_bytes(data: bytes) -> None:
    sig = decodes_or_parse_error(Signature.from_bytes, data)
    if sig is not None:
        assert sig.to_bytes() == data
        sig.to_dict()


@FUZZ
@given(st.binary(max_size=400) | mutated(PUBLICS))
def test_public_area_from_bytes(data: bytes) -> None:
    area = decodes_or_parse_error(PublicArea.from_bytes, data)
    if area is not None:
        assert area.to_bytes() == data
        area.to_dict()
        # Turning it into a key may still fail (a point off the curve): as a ParseError only.
        decodes_or_parse_error(lambda _: area.public_key(), data)


@FUZZ
@given(st.binary(max_size=2000) | mutated(PCR_FILES))
def test_pcr_file_from_bytes(data: bytes) -> None:
    values = decodes_or_parse_error(PCRValues.from_bytes, data)
    if values is not None:
        values.to_dict()
        assert PCRValues.from_bytes(values.to_bytes()) == values


@FUZZ
@given(mutated(ATTESTS), mutated(SIGNATURES))
def test_verify_quote_raises_only_quote_errors(attest: bytes, signature: bytes) -> None:
    ak = vector("keylime-perf-tests/ak.pem")
    with contextlib.suppress(QuoteError):
        verify_quote(attest, signature, ak, skip_freshness=True)
