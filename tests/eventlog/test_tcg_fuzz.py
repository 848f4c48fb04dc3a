"""Hypothesis: random and mutated logs give a value or a ParseError, never another exception.

Whatever parses must also re-encode to the very same bytes and render to JSON.
Hostile length fields must be rejected before anything is allocated.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cima.errors import ParseError
from cima.eventlog import ccel, tcg, uefi
from tests.eventlog.test_tcg import GOOD, HEADER, spec_id_header
from tests.vectors import path

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TCG_SEEDS = [
    path("tcg", "tpm2-tools/event-sd-boot-fedora37.bin").read_bytes(),
    path("tcg", "tpm2-tools/event-uefivar.bin").read_bytes(),
    path("tcg", "tpm2-tools/specid-vendordata.bin").read_bytes(),
    path("tcg", "tpm2-tools/event-uefi-sha1-log.bin").read_bytes()[:3000],
    path("tcg", "tpm2-tools/event-bootorder.bin").read_bytes()[:4000],
]
_OVMF = path("ccel", "trustee/CCEL_data_ovmf").read_bytes()
CCEL_SEEDS = [
    _OVMF[:2200],
    path("ccel", "trustee/CCEL_data_csv").read_bytes()[:2000],
    path("ccel", "trustee/CCEL_data").read_bytes()[:10000],
]
TABLE = path("ccel", "go-tdx-guest/ccel_table.dat").read_bytes()


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with a few bytes flipped, inserted or deleted."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return bytes(data)


def _parses_or_refuses(parse: Callable[[bytes], Any], data: bytes) -> None:
    try:
        log = parse(data)
    except ParseError as e:
        assert e.offset is not None
        assert 0 <= e.offset <= len(data)
        return
    assert log.to_bytes() == data
    json.dumps(log.to_dict())


@FUZZ
@given(st.binary(max_size=512))
def test_tcg_random_bytes(data: bytes) -> None:
    _parses_or_refuses(tcg.parse, data)


@FUZZ
@given(st.binary(max_size=512))
def test_tcg_random_records_after_a_valid_header(data: bytes) -> None:
    _parses_or_refuses(tcg.parse, HEADER + data)


@FUZZ
@given(mutated(TCG_SEEDS))
def test_tcg_mutated_real_logs(data: bytes) -> None:
    _parses_or_refuses(tcg.parse, data)


@FUZZ
@given(mutated(CCEL_SEEDS))
def test_ccel_mutated_real_logs(data: bytes) -> None:
    _parses_or_refuses(ccel.parse, data)


@FUZZ
@given(st.binary(max_size=512))
def test_ccel_random_bytes(data: bytes) -> None:
    _parses_or_refuses(ccel.parse, data)


@FUZZ
@given(st.one_of(st.binary(max_size=80), mutated([TABLE])))
def test_ccel_table_random_and_mutated(data: bytes) -> None:
    _parses_or_refuses(ccel.CCELTable.from_bytes, data)


EVENT_TYPES = [int(t) for t in uefi.EventType]
_REAL_EVENTS = [
    (e.event_type, e.data)
    for seed in (
        path("tcg", "tpm2-tools/event-gce-ubuntu-2104-log.bin").read_bytes(),
        path("tcg", "tpm2-tools/event-arch-linux.bin").read_bytes(),
    )
    for e in tcg.parse(seed).events
]


@st.composite
def mutated_event(draw: st.DrawFn) -> tuple[int, bytes]:
    event_type, data = draw(st.sampled_from(_REAL_EVENTS))
    return event_type, draw(mutated([data])) if data else data


@FUZZ
@given(
    st.one_of(
        st.tuples(st.sampled_from(EVENT_TYPES), st.binary(max_size=300)),
        st.tuples(st.integers(0, 0xFFFFFFFF), st.binary(max_size=64)),
        mutated_event(),
    )
)
def test_uefi_decode_never_raises(case: tuple[int, bytes]) -> None:
    event_type, data = case
    decoded = uefi.decode(event_type, data)
    assert isinstance(decoded, dict)
    json.dumps(decoded)


# -- memory: hostile lengths are refused before allocating ------------------------------


def _peak_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        try:
            fn()
        except ParseError:
            pass
        else:  # pragma: no cover - the input is invalid by construction
            raise AssertionError("a 4 GB event size was accepted")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _pad_to_1k(data: bytes) -> bytes:
    return data + b"\x5a" * (1024 - len(data))


HUGE_AGILE = _pad_to_1k(
    HEADER
    + GOOD
    + struct.pack("<III", 4, 0x80000007, 1)
    + struct.pack("<H", 0x0B)
    + bytes(32)
    + struct.pack("<I", 0xFFFFFFFF)
)
HUGE_LEGACY = _pad_to_1k(struct.pack("<II20sI", 0, 8, bytes(20), 0xFFFFFFFF))
HUGE_CCEL = _pad_to_1k(
    spec_id_header([(0x0C, 48)])
    + struct.pack("<III", 2, 0x80000007, 1)
    + struct.pack("<H", 0x0C)
    + bytes(48)
    + struct.pack("<I", 0xFFFFFFFF)
)


def test_four_gigabyte_event_size_in_1k_allocates_nothing_big() -> None:
    for parse, data in ((tcg.parse, HUGE_AGILE), (tcg.parse, HUGE_LEGACY), (ccel.parse, HUGE_CCEL)):
        assert len(data) == 1024
        peak = _peak_bytes(lambda parse=parse, data=data: parse(data))
        assert peak < 1_000_000, f"peak {peak} bytes"


def test_huge_counts_in_event_data_allocate_nothing_big() -> None:
    cases = [
        (
            0x80000006,
            b"EFI PART" + bytes(76) + struct.pack("<II", 128, 0) + struct.pack("<Q", 1 << 62),
        ),
        (0x80000009, struct.pack("<Q", 1 << 62)),
        (0x80000001, bytes(16) + struct.pack("<QQ", 1 << 62, 1 << 62)),
    ]
    for event_type, data in cases:
        tracemalloc.start()
        try:
            decoded = uefi.decode(event_type, data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert "error" in decoded
        assert peak < 1_000_000, f"peak {peak} bytes"
