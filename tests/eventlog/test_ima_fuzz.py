"""IMA lists under hostile input: random and mutated lists give a value or a ParseError.

The streaming replays must also agree with the object parsers on every input:
the same error at the same offset or line, or the same registers and the same
template hash mismatches. Memory stays bounded when a length field lies.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cima.errors import ParseError, ReplayError
from cima.eventlog import ima
from tests.eventlog.test_ima import ASCII, BINARY
from tests.vectors import path

U32 = struct.Struct("<I").pack
BANKS = ["sha1", "sha256"]
SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_KEYLIME = path("ima", "keylime-perf-tests/ima_log.txt").read_bytes()
REAL_ASCII = b"".join(_KEYLIME.splitlines(keepends=True)[:25]) + ASCII
REAL_BINARY = ima.parse_ascii(b"".join(_KEYLIME.splitlines(keepends=True)[:25])).to_bytes()
REAL_BINARY += BINARY


def _binary_outcome(data: bytes) -> tuple[Any, ...]:
    try:
        log = ima.parse_binary(data)
    except ParseError as e:
        return ("error", type(e).__name__, e.offset)
    mismatches = [e.index for e in log.template_hash_mismatches()]
    return ("ok", log.replay(BANKS).to_list(), mismatches, len(log.violations()), len(log))


def _replay_binary_outcome(data: bytes, chunk: int) -> tuple[Any, ...]:
    try:
        r = ima.replay_binary(io.BytesIO(data), BANKS, chunk_size=chunk)
    except ParseError as e:
        return ("error", type(e).__name__, e.offset)
    return ("ok", r.bank.to_list(), r.template_hash_mismatches, r.violations, r.entries)


def _check_binary(data: bytes, chunk: int = 1 << 20) -> None:
    want = _binary_outcome(data)
    assert _replay_binary_outcome(data, chunk) == want
    if want[0] == "ok":
        assert ima.parse_binary(data).to_bytes() == data


def _check_ascii(data: bytes, chunk_lines: int = 0) -> None:
    try:
        log = ima.parse_ascii(data)
    except ParseError as e:
        try:
            ima.replay_ascii(io.BytesIO(data), BANKS)
        except ReplayError:
            return  # an unknown template before the bad line: the replay stops there first
        except ParseError as e2:
            assert e2.line == e.line
            return
        raise AssertionError("replay_ascii accepted what parse_ascii refused") from e
    try:
        bank = log.replay(BANKS)
    except ReplayError:
        with pytest.raises(ReplayError):
            ima.replay_ascii(io.BytesIO(data), BANKS)
        return
    r = ima.replay_ascii(io.BytesIO(data), BANKS)
    assert r.bank.to_list() == bank.to_list()
    assert r.template_hash_mismatches == [e.index for e in log.template_hash_mismatches()]
    assert (r.entries, r.violations) == (len(log), len(log.violations()))
    # whatever parses prints back and parses to the same entries
    again = ima.parse_ascii(log.to_ascii())
    assert [(e.pcr, e.template_hash, e.template_name, e.template_data) for e in again] == [
        (e.pcr, e.template_hash, e.template_name, e.template_data) for e in log
    ]


@SETTINGS
@given(st.binary(max_size=400))
def test_random_bytes_binary(data: bytes) -> None:
    _check_binary(data)


@SETTINGS
@given(st.binary(max_size=400))
def test_random_bytes_ascii(data: bytes) -> None:
    _check_ascii(data)


_ASCII_ALPHABET = b" \n:0123456789abcdefgz-|\x00\xff"


@SETTINGS
@given(st.lists(st.sampled_from(list(_ASCII_ALPHABET)), max_size=300))
def test_random_text_ascii(chars: list[int]) -> None:
    _check_ascii(b"10 " + bytes(chars))


@st.composite
def _mutated(draw: Any, base: bytes, alphabet: bytes | None = None) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "truncate", "dup"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            if alphabet is None:
                data[at] = draw(st.integers(0, 255))
            else:
                data[at] = draw(st.sampled_from(list(alphabet)))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 40))]
        elif kind == "insert":
            extra = draw(st.binary(min_size=1, max_size=8))
            data[at:at] = extra
        elif kind == "truncate":
            del data[at:]
        elif kind == "dup":
            data[at:at] = data[at : at + draw(st.integers(1, 60))]
    return bytes(data)


@SETTINGS
@given(_mutated(REAL_BINARY), st.sampled_from([1 << 20, 97]))
def test_mutated_binary_list(data: bytes, chunk: int) -> None:
    _check_binary(data, chunk)


@SETTINGS
@given(_mutated(REAL_ASCII, _ASCII_ALPHABET))
def test_mutated_ascii_list(data: bytes) -> None:
    _check_ascii(data)


@SETTINGS
@given(_mutated(REAL_BINARY))
def test_mutated_binary_list_decodes_fields_or_says_why(data: bytes) -> None:
    try:
        log = ima.parse_binary(data)
    except ParseError:
        return
    for e in log:
        try:
            e.to_dict()
            e.to_ascii()
        except ParseError:
            pass


# -- memory stays bounded when a length lies ----------------------------------------------


def _peak(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_huge_template_data_length_allocates_nothing() -> None:
    first = ima.parse_binary(REAL_BINARY).entries[0].to_bytes()
    hostile = first + U32(10) + bytes(20) + U32(6) + b"ima-ng" + U32(0xFFFFFFF0) + b"x" * 1024

    def parse() -> None:
        with pytest.raises(ParseError):
            ima.parse_binary(hostile)
        with pytest.raises(ParseError):
            ima.replay_binary(io.BytesIO(hostile), BANKS)

    assert _peak(parse) < 256 * 1024


class _Endless(io.RawIOBase):
    """A stream that never ends: ``head`` then ``fill`` forever; counts what was read."""

    def __init__(self, head: bytes, fill: bytes) -> None:
        self.head = head
        self.fill = fill
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = 1 << 16 if size < 0 else size
        if self.head:
            out, self.head = self.head[:size], self.head[size:]
        else:
            out = (self.fill * (size // len(self.fill) + 1))[:size]
        self.read_bytes += len(out)
        return out


def test_lying_length_on_an_endless_stream_stops_at_once() -> None:
    head = U32(10) + bytes(20) + U32(6) + b"ima-ng" + U32(0xFFFFFFFF)
    stream = _Endless(head, b"\x00")

    def run() -> None:
        with pytest.raises(ParseError) as info:
            ima.replay_binary(stream, BANKS)
        assert info.value.offset == 34

    assert _peak(run) < 4 * 1024 * 1024
    assert stream.read_bytes <= ima.CHUNK_SIZE


def test_endless_ascii_line_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ima, "MAX_LINE_LEN", 1 << 20)

    def run() -> None:
        with pytest.raises(ParseError, match="line 1"):
            ima.replay_ascii(_Endless(b"10 ", b"a"), BANKS)
        with pytest.raises(ParseError, match="line 1"):
            list(ima.iter_ascii(_Endless(b"10 ", b"a")))

    assert _peak(run) < 16 * 1024 * 1024
