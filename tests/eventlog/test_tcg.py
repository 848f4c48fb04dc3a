"""TCG PC Client event logs: the real vectors, StartupLocality, bad input.

Expected values come from tcg/MANIFEST.json (tpm2-tools' own expected output,
re-derived with three tools) and tpm-quote/MANIFEST.json (the signed quote's
PCRs for the keylime UEFI log). The logs built here are encoded with plain
``struct`` calls following PFP section 10, not with the codec under test.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from typing import Any

import pytest

from cima.errors import ParseError, TruncatedError
from cima.eventlog import replay, tcg
from tests.vectors import manifest, path

EV_NO_ACTION = 0x03
EV_POST_CODE = 0x01
EV_SEPARATOR = 0x04
EV_EFI_ACTION = 0x80000007
SHA1, SHA256, SM3 = 0x0004, 0x000B, 0x0012

TCG_VECTORS = manifest("tcg")
TCG_IDS = [e["file"] for e in TCG_VECTORS]


# -- independent encoders (PFP section 10.2) ----------------------------------------


def spec_id_header(
    algs: list[tuple[int, int]], vendor: bytes = b"", *, declared: int | None = None
) -> bytes:
    """A TCG_PCR_EVENT holding a TCG_EfiSpecIDEvent (Spec ID Event03)."""
    body = b"Spec ID Event03\x00" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algs))
    body += b"".join(struct.pack("<HH", a, s) for a, s in algs)
    body += bytes([len(vendor)]) + vendor
    size = len(body) if declared is None else declared
    return struct.pack("<II20sI", 0, EV_NO_ACTION, bytes(20), size) + body


def event2(
    pcr: int,
    event_type: int,
    digests: list[tuple[int, bytes]],
    data: bytes,
    *,
    count: int | None = None,
    size: int | None = None,
) -> bytes:
    """A TCG_PCR_EVENT2 record."""
    out = struct.pack("<III", pcr, event_type, len(digests) if count is None else count)
    out += b"".join(struct.pack("<H", a) + d for a, d in digests)
    return out + struct.pack("<I", len(data) if size is None else size) + data


def pcr_event(pcr: int, event_type: int, digest: bytes, data: bytes) -> bytes:
    """A TCG_PCR_EVENT (SHA1 legacy) record."""
    return struct.pack("<II20sI", pcr, event_type, digest, len(data)) + data


def measured(pcr: int, data: bytes, event_type: int = EV_EFI_ACTION) -> bytes:
    return event2(
        pcr,
        event_type,
        [(SHA1, hashlib.sha1(data).digest()), (SHA256, hashlib.sha256(data).digest())],
        data,
    )


HEADER = spec_id_header([(SHA1, 20), (SHA256, 32)])
GOOD = measured(4, b"Calling EFI Application from Boot Option")


def startup_locality_log(locality: int, data: bytes = b"firmware") -> bytes:
    """Spec ID header, StartupLocality in pcr0, then one measurement of ``data`` into pcr0."""
    return (
        HEADER
        + event2(
            0,
            EV_NO_ACTION,
            [(SHA1, bytes(20)), (SHA256, bytes(32))],
            b"StartupLocality\x00" + bytes([locality]),
        )
        + measured(0, data, EV_POST_CODE)
    )


# -- the real vectors ------------------------------------------------------------------


def expected_pcrs(entry: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {
        (f"pcr{k}", alg): v
        for alg, regs in entry["expected"]["pcrs"].items()
        for k, v in regs.items()
    }


@pytest.mark.parametrize("entry", TCG_VECTORS, ids=TCG_IDS)
def test_vector_format_banks_and_count(entry: dict[str, Any]) -> None:
    exp = entry["expected"]
    log = tcg.parse(path("tcg", entry["file"]).read_bytes())
    assert log.format == exp["format"]
    assert list(log.algorithms()) == exp["digest_algorithms"]
    assert len(log.events) == exp["event_count_including_header"]
    assert [e.index for e in log.events] == list(range(len(log.events)))


@pytest.mark.parametrize("entry", TCG_VECTORS, ids=TCG_IDS)
def test_vector_replays_to_expected_pcrs(entry: dict[str, Any]) -> None:
    log = tcg.parse(path("tcg", entry["file"]).read_bytes())
    bank = replay.replay(log.events)
    want = expected_pcrs(entry)
    got = {(v.register, v.algorithm): v.digest.hex() for v in bank}
    assert got == want


@pytest.mark.parametrize("entry", TCG_VECTORS, ids=TCG_IDS)
def test_vector_round_trips_exactly(entry: dict[str, Any]) -> None:
    data = path("tcg", entry["file"]).read_bytes()
    log = tcg.parse(data)
    assert log.to_bytes() == data
    assert b"".join(e.to_bytes() for e in log.events) == data[: log.log_bytes]
    assert log.tail == data[log.log_bytes :]
    json.dumps(log.to_dict())  # JSON-able, decoding included


def test_spec_id_vendor_info_after_declared_size() -> None:
    """specid-vendordata.bin: eventSize 37 leaves out the 4 vendorInfo bytes that follow it."""
    (entry,) = [e for e in TCG_VECTORS if e["file"].endswith("specid-vendordata.bin")]
    exp = entry["expected"]
    data = path("tcg", entry["file"]).read_bytes()
    log = tcg.parse(data)
    assert log.spec_id is not None
    assert log.spec_id.vendor_info.hex() == exp["spec_id_vendor_info_hex"]
    header = log.events[0]
    assert header.declared_size == exp["declared_header_event_size"]
    assert struct.unpack_from("<I", header.to_bytes(), 28)[0] == exp["declared_header_event_size"]
    assert log.log_bytes == len(data) and log.tail == b""
    assert log.to_bytes() == data
    assert header.decoded()["vendor_info"] == exp["spec_id_vendor_info_hex"]


def test_keylime_uefi_log_replays_to_the_quoted_pcrs() -> None:
    (entry,) = [e for e in manifest("tpm-quote") if e["file"].endswith("uefi_log.bin")]
    exp = entry["expected"]
    log = tcg.parse(path("tpm-quote", entry["file"]).read_bytes())
    assert log.format == exp["format"]
    assert len(log.events) == exp["event_count_including_header"]
    bank = replay.replay(log.events)
    got = {(v.register, v.algorithm): v.digest.hex() for v in bank}
    assert got == expected_pcrs(entry)


def test_header_and_no_action_records_never_extend() -> None:
    log = tcg.parse(startup_locality_log(3))
    assert [e.extends for e in log.events] == [False, False, True]
    assert log.events[0].event_type_name == "EV_NO_ACTION"


def test_legacy_log_is_sha1_records() -> None:
    (entry,) = [e for e in TCG_VECTORS if e["expected"]["format"] == "sha1-legacy"]
    log = tcg.parse(path("tcg", entry["file"]).read_bytes())
    assert log.spec_id is None
    assert all(e.legacy and [n for n, _ in e.digests] == ["sha1"] for e in log.events)
    # The first record is a measurement, not a header: it extends.
    assert log.events[0].extends and log.events[0].event_type_name == "EV_S_CRTM_VERSION"


def test_legacy_spec_id_event02_header_means_legacy_format() -> None:
    """A TCG 1.2 style header ("Spec ID Event02") keeps the whole log in TCG_PCR_EVENT form."""
    header = b"Spec ID Event02\x00" + struct.pack("<IBBBBB", 0, 2, 1, 2, 2, 0)
    d = hashlib.sha1(b"x").digest()
    data = pcr_event(0, EV_NO_ACTION, bytes(20), header) + pcr_event(4, EV_POST_CODE, d, b"x")
    log = tcg.parse(data)
    assert log.format == "sha1-legacy"
    assert len(log.events) == 2
    assert log.events[0].decoded()["signature"] == "Spec ID Event02"
    bank = replay.replay(log.events)
    assert bank.get("pcr4", "sha1") == hashlib.sha1(bytes(20) + d).digest()
    assert log.to_bytes() == data


# -- StartupLocality (PFP 10.4.5.3) ----------------------------------------------------


@pytest.mark.parametrize("locality", [0, 3, 4])
def test_startup_locality_sets_pcr0_start_value(locality: int) -> None:
    data = startup_locality_log(locality)
    log = tcg.parse(data)
    assert log.startup_locality == locality
    assert log.events[1].startup_locality == locality
    assert log.events[1].extends is False
    bank = replay.replay(log.events)
    for name, h in (("sha1", hashlib.sha1), ("sha256", hashlib.sha256)):
        size = h().digest_size
        start = bytes(size - 1) + bytes([locality])
        assert bank.get("pcr0", name) == h(start + h(b"firmware").digest()).digest()
    assert log.to_bytes() == data


def test_startup_locality_only_in_pcr0() -> None:
    data = HEADER + event2(3, EV_NO_ACTION, [(SHA256, bytes(32))], b"StartupLocality\x00\x03")
    log = tcg.parse(data)
    assert log.events[1].startup_locality is None
    assert log.startup_locality is None


# -- digests and algorithms from the Spec ID header ----------------------------------------


def test_unknown_algorithm_declared_in_header_is_kept_raw() -> None:
    odd = bytes(range(24))
    data = spec_id_header([(SHA256, 32), (0x0777, 24)]) + event2(
        5, EV_EFI_ACTION, [(SHA256, bytes(32)), (0x0777, odd)], b"x"
    )
    log = tcg.parse(data)
    ev = log.events[1]
    assert ev.digests == (("sha256", bytes(32)), ("alg_0x0777", odd))
    assert ev.algorithms() == ("sha256",)
    assert ev.replay_digest("alg_0x0777") == odd
    assert log.spec_id is not None and log.spec_id.algorithms[1] == ("alg_0x0777", 0x0777, 24)
    assert log.algorithms() == ("sha256",)
    assert log.to_bytes() == data
    # Replay uses the banks it knows and ignores the raw id.
    bank = replay.replay(log.events)
    assert bank.algorithms() == ["sha256"]


def test_digest_sizes_come_from_the_header() -> None:
    """A record's digests are read with the sizes the header declares, in any order."""
    d1, d2 = hashlib.sha1(b"a").digest(), hashlib.sha256(b"a").digest()
    data = HEADER + event2(7, EV_EFI_ACTION, [(SHA256, d2), (SHA1, d1)], b"a")
    ev = tcg.parse(data).events[1]
    assert ev.digests == (("sha256", d2), ("sha1", d1))
    assert ev.replay_digest("sha1") == d1
    assert ev.replay_digest("SHA-256") == d2
    assert ev.replay_digest("sha384") is None


def test_record_fields_and_dict() -> None:
    data = HEADER + GOOD
    log = tcg.parse(data)
    ev = log.events[1]
    assert (ev.index, ev.offset, ev.pcr_index, ev.register) == (1, len(HEADER), 4, "pcr4")
    assert ev.event_type_name == "EV_EFI_ACTION"
    d = ev.to_dict()
    assert d["digests"]["sha256"] == hashlib.sha256(ev.data).hexdigest()
    assert d["decoded"] == {"string": "Calling EFI Application from Boot Option"}
    assert d["event_type"] == EV_EFI_ACTION and d["register"] == "pcr4"
    assert tcg.parse(data, source="x.bin").to_dict()["events"][1] == d


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (0x00000003, "EV_NO_ACTION"),
        (0x00000006, "EV_EVENT_TAG"),
        (0x80000001, "EV_EFI_VARIABLE_DRIVER_CONFIG"),
        (0x8000000C, "EV_EFI_VARIABLE_BOOT2"),
        (0x800000E0, "EV_EFI_VARIABLE_AUTHORITY"),
        (0x0000ABCD, "EV_UNKNOWN_0x0000abcd"),
    ],
)
def test_event_type_names(value: int, name: str) -> None:
    assert tcg.event_type_name(value) == name


# -- the end of the log area ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("pad", "byte"),
    [(b"\xff" * 4096, 0xFF), (b"\x00" * 4096, 0x00), (b"\xff" * 5, 0xFF), (b"", None)],
    ids=["ff-area", "zero-area", "short-ff", "none"],
)
def test_padding_ends_the_log_and_is_kept(pad: bytes, byte: int | None) -> None:
    data = HEADER + GOOD + pad
    log = tcg.parse(data)
    assert len(log.events) == 2
    assert log.log_bytes == len(HEADER + GOOD)
    assert log.tail == pad and log.padding == byte
    assert log.to_bytes() == data


def test_ff_record_ends_the_log_even_with_data_after_it() -> None:
    data = HEADER + GOOD + b"\xff" * 8 + b"leftover"
    log = tcg.parse(data)
    assert len(log.events) == 2 and log.tail == b"\xff" * 8 + b"leftover"
    assert log.padding is None
    assert log.to_bytes() == data


def test_zero_pcr_record_is_not_mistaken_for_padding() -> None:
    """pcr0 / EV_PREBOOT_CERT (zero header fields) is a record when non-zero bytes follow."""
    data = HEADER + event2(0, 0, [(SHA256, bytes(32))], b"") + GOOD
    log = tcg.parse(data)
    assert len(log.events) == 3 and log.tail == b""


# -- bad input: one assertion each -------------------------------------------------------

H = len(HEADER)
G = len(GOOD)


def _cut(n: int) -> bytes:
    return (HEADER + GOOD + GOOD)[: H + G + n]


BAD_INPUTS: list[tuple[str, bytes, type[ParseError], int]] = [
    ("empty-file", b"", TruncatedError, 0),
    ("header-truncated-in-fixed-part", HEADER[:20], TruncatedError, 0),
    ("header-truncated-in-spec-id", HEADER[:50], TruncatedError, 0),
    (
        "header-truncated-in-vendor-info",
        spec_id_header([(SHA1, 20)], b"abcd")[:-2],
        TruncatedError,
        0,
    ),
    ("record-truncated-in-header", _cut(6), TruncatedError, H + G),
    ("record-truncated-in-digest", _cut(12 + 2 + 10), TruncatedError, H + G),
    ("record-truncated-in-event-size", _cut(12 + 22 + 34 + 2), TruncatedError, H + G),
    ("record-truncated-in-event-data", _cut(G - 3), TruncatedError, H + G),
    (
        "event-size-0xfffffff0",
        HEADER + GOOD + event2(4, EV_EFI_ACTION, [(SHA256, bytes(32))], b"xyz", size=0xFFFFFFF0),
        ParseError,
        H + G,
    ),
    (
        "digest-count-huge",
        HEADER + GOOD + struct.pack("<III", 4, EV_EFI_ACTION, 0xFFFFFFFF) + bytes(64),
        ParseError,
        H + G,
    ),
    (
        "digest-count-over-limit",
        HEADER + GOOD + event2(4, EV_EFI_ACTION, [(SHA1, bytes(20))] * 17, b""),
        ParseError,
        H + G,
    ),
    (
        "algorithm-not-declared-in-header",
        HEADER + GOOD + event2(4, EV_EFI_ACTION, [(SM3, bytes(32))], b"x"),
        ParseError,
        H + G,
    ),
    (
        "same-algorithm-twice",
        HEADER + GOOD + event2(4, EV_EFI_ACTION, [(SHA1, bytes(20)), (SHA1, bytes(20))], b""),
        ParseError,
        H + G,
    ),
    ("spec-id-zero-algorithms", spec_id_header([]) + GOOD, ParseError, 0),
    ("spec-id-wrong-digest-size", spec_id_header([(SHA256, 20)]) + GOOD, ParseError, 0),
    (
        "spec-id-algorithm-count-huge",
        spec_id_header([(SHA1, 20)])[:48] + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 0x10000000),
        ParseError,
        0,
    ),
    (
        "pcr-index-out-of-range",
        HEADER + GOOD + event2(24, EV_EFI_ACTION, [(SHA1, bytes(20))], b""),
        ParseError,
        H + G,
    ),
    (
        "legacy-record-truncated",
        pcr_event(0, 8, bytes(20), b"ab") + pcr_event(1, 8, bytes(20), b"abcd")[:-1],
        TruncatedError,
        34,
    ),
    (
        "legacy-event-size-huge",
        pcr_event(0, 8, bytes(20), b"ab") + struct.pack("<II20sI", 1, 8, bytes(20), 0xFFFFFFFF),
        TruncatedError,
        34,
    ),
    ("all-padding", b"\xff" * 64, ParseError, 0),
]


@pytest.mark.parametrize(
    ("data", "error", "offset"),
    [pytest.param(d, e, o, id=i) for i, d, e, o in BAD_INPUTS],
)
def test_bad_input_is_a_parse_error_at_the_record(
    data: bytes, error: type[ParseError], offset: int
) -> None:
    with pytest.raises(error) as info:
        tcg.parse(data)
    assert info.value.offset == offset


def test_bad_input_error_names_the_source() -> None:
    with pytest.raises(TruncatedError) as info:
        tcg.parse(_cut(6), source="binary_bios_measurements")
    assert info.value.source == "binary_bios_measurements"
    assert str(info.value).startswith(f"binary_bios_measurements, offset {H + G}:")


def test_no_action_record_may_name_any_index() -> None:
    """An EV_NO_ACTION record is never extended, so an index beyond pcr23 is kept."""
    data = HEADER + event2(0xFFFF, EV_NO_ACTION, [(SHA1, bytes(20))], b"vendor note") + GOOD
    log = tcg.parse(data)
    assert log.events[1].pcr_index == 0xFFFF and not log.events[1].extends
    assert log.to_bytes() == data


# -- sniffing and speed ------------------------------------------------------------------------


@pytest.mark.parametrize("entry", TCG_VECTORS, ids=TCG_IDS)
def test_looks_like_the_vectors(entry: dict[str, Any]) -> None:
    assert tcg.looks_like(path("tcg", entry["file"]).read_bytes())


@pytest.mark.parametrize(
    "data",
    [b"", b"10 a5c3 ima-ng sha1:00 boot_aggregate\n", b"[{}]", b"\xff" * 100, b"CCEL" + bytes(52)],
    ids=["empty", "ima-ascii", "json", "ff", "acpi-table"],
)
def test_looks_like_rejects_other_formats(data: bytes) -> None:
    assert not tcg.looks_like(data)


def test_parses_a_100k_log_quickly() -> None:
    body = b"".join(measured(i % 24, b"event %d" % i + bytes(100)) for i in range(700))
    data = HEADER + body
    assert len(data) > 100_000
    best = min(_timed(data) for _ in range(3))
    assert best < 0.05, f"{len(data)} bytes took {best * 1000:.1f} ms"


def _timed(data: bytes) -> float:
    t = time.perf_counter()
    log = tcg.parse(data)
    elapsed = time.perf_counter() - t
    assert len(log.events) == 701
    return elapsed
