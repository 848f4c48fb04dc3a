"""CC event logs (TDX CCEL, Hygon CSV) and the ACPI CCEL table, against ccel/MANIFEST.json.

Register values come from the MANIFEST (trustee's test_rtmr_integrity, the
signed TD quotes of go-tdx-guest and evidence-api); per-record data from
trustee's own ``*_out.json`` dumps.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from typing import Any

import pytest

from cima import digests
from cima.errors import ParseError, TruncatedError, UnsupportedFormatError
from cima.eventlog import ccel, replay, tcg
from cima.registers import cc_name
from tests.vectors import manifest, path

CCEL_ENTRIES = manifest("ccel")
LOGS = [e for e in CCEL_ENTRIES if "log_bytes" in e["expected"]]
LOG_IDS = [e["file"] for e in LOGS]
DUMPS = [e for e in LOGS if "expected_event_dump" in e["expected"]]
(TABLE,) = [e for e in CCEL_ENTRIES if e["file"].endswith("ccel_table.dat")]


def _sm3_available() -> bool:
    try:
        hashlib.new("sm3")
    except ValueError:
        return False
    return True


def _needs_sm3(entry: dict[str, Any]) -> Any:
    if "sm3_256" in entry["expected"]["digest_algorithms"] and not _sm3_available():
        return pytest.mark.skip(reason="this Python's OpenSSL has no sm3: cannot replay SM3 banks")
    return []


@pytest.mark.parametrize("entry", LOGS, ids=LOG_IDS)
def test_log_format_count_and_extent(entry: dict[str, Any]) -> None:
    exp = entry["expected"]
    data = path("ccel", entry["file"]).read_bytes()
    log = ccel.parse(data)
    assert isinstance(log, ccel.CCELog)
    assert log.format == exp["format"]
    assert list(log.algorithms()) == exp["digest_algorithms"]
    assert len(log.events) == exp["event_count_including_header"]
    assert log.log_bytes == exp["log_bytes"]
    assert log.padding == int(exp["padding_after_log"], 16)
    assert len(log.tail) == len(data) - exp["log_bytes"]


@pytest.mark.parametrize("entry", LOGS, ids=LOG_IDS)
def test_log_round_trips_exactly(entry: dict[str, Any]) -> None:
    data = path("ccel", entry["file"]).read_bytes()
    log = ccel.parse(data)
    assert log.to_bytes() == data
    json.dumps(log.to_dict())


@pytest.mark.parametrize(
    "entry", [pytest.param(e, id=e["file"], marks=_needs_sm3(e)) for e in LOGS]
)
def test_replay_gives_the_registers_by_log_index(entry: dict[str, Any]) -> None:
    exp = entry["expected"]
    log = ccel.parse(path("ccel", entry["file"]).read_bytes())
    bank = replay.replay(log.events)
    want = {
        (cc_name(int(idx)), alg): value
        for alg, regs in exp["registers_by_log_index"].items()
        for idx, value in regs.items()
    }
    got = {(v.register, v.algorithm): v.digest.hex() for v in bank}
    assert got == want


@pytest.mark.parametrize(
    "entry", [e for e in LOGS if "rtmr" in e["expected"]], ids=lambda e: e["file"]
)
def test_replay_gives_the_quoted_rtmrs(entry: dict[str, Any]) -> None:
    log = ccel.parse(path("ccel", entry["file"]).read_bytes())
    bank = replay.replay(log.events)
    for n, value in entry["expected"]["rtmr"].items():
        assert bank.get(f"rtmr{n}", "sha384").hex() == value


def test_evidence_api_log_plus_ima_entry_gives_the_quote() -> None:
    """ccel_data.bin replayed, then its single IMA line extended into rtmr2 (CCEL index 3)."""
    (entry,) = [e for e in LOGS if e["file"] == "evidence-api/ccel_data.bin"]
    (ima,) = [e for e in CCEL_ENTRIES if e["file"] == "evidence-api/ima_log.bin"]
    bank = replay.replay(ccel.parse(path("ccel", entry["file"]).read_bytes()).events)
    bank.extend("rtmr2", "sha384", bytes.fromhex(ima["expected"]["template_hash"]))
    for n, value in entry["expected"]["rtmr_after_appending_ima_log_bin"].items():
        assert bank.get(f"rtmr{n}", "sha384").hex() == value


def test_gke_sp800_155_records_are_not_extended() -> None:
    (entry,) = [e for e in LOGS if e["file"].endswith("CCEL_data_grub_gke")]
    log = ccel.parse(path("ccel", entry["file"]).read_bytes())
    for rec in entry["expected"]["no_action_records_not_extended"]:
        ev = log.events[rec["record"]]
        assert ev.pcr_index == rec["log_index"]
        assert ev.register == "mrtd"
        assert ev.event_type_name == "EV_NO_ACTION" and not ev.extends
        assert ev.data.startswith(rec["signature"].encode())
        assert ev.decoded()["signature"] == rec["signature"]
    bank = replay.replay(log.events)
    assert "mrtd" not in bank.registers()


@pytest.mark.parametrize("entry", DUMPS, ids=[e["file"] for e in DUMPS])
def test_records_match_trustee_dump(entry: dict[str, Any]) -> None:
    log = ccel.parse(path("ccel", entry["file"]).read_bytes())
    dump = json.loads(path("ccel", entry["expected"]["expected_event_dump"]).read_text())
    records = dump["uefi_event_logs"]
    assert len(records) == len(log.events) - 1  # trustee leaves out the Spec ID header
    for ev, rec in zip(log.events[1:], records, strict=True):
        assert ev.pcr_index == rec["index"]
        assert ev.register == cc_name(rec["index"])
        assert ev.event_type_name == rec["type_name"]
        assert ev.data == base64.b64decode(rec["event"])
        want = [(digests.by_name(d["alg"]).name, d["digest"]) for d in rec["digests"]]
        assert [(a, d.hex()) for a, d in ev.digests] == want


def test_csv_log_uses_sm3_and_cc_indices() -> None:
    (entry,) = [e for e in LOGS if e["file"].endswith("CCEL_data_csv")]
    log = ccel.parse(path("ccel", entry["file"]).read_bytes())
    assert {e.register for e in log.events[1:] if e.extends} <= {"rtmr0", "rtmr1", "rtmr2"}
    assert all(e.algorithms() == ("sm3_256",) for e in log.events[1:])


def test_every_log_is_detected_as_a_cc_log() -> None:
    for entry in LOGS:
        assert ccel.looks_like(path("ccel", entry["file"]).read_bytes()), entry["file"]
    tpm_log = path("tcg", "tpm2-tools/event-gce-ubuntu-2104-log.bin").read_bytes()
    assert not ccel.looks_like(tpm_log)


def test_a_tpm_log_with_a_pcr_beyond_4_is_not_a_cc_log() -> None:
    with pytest.raises(ParseError) as info:
        ccel.parse(path("tcg", "tpm2-tools/event-gce-ubuntu-2104-log.bin").read_bytes())
    assert "out of range" in info.value.reason


def test_legacy_layout_is_not_a_cc_log() -> None:
    data = path("tcg", "tpm2-tools/event-uefi-sha1-log.bin").read_bytes()
    with pytest.raises(ParseError) as info:
        ccel.parse(data, source="CCEL")
    assert info.value.offset == 0 and info.value.source == "CCEL"


# -- the ACPI table -----------------------------------------------------------------------------


def test_table_fields() -> None:
    exp = TABLE["expected"]
    data = path("ccel", TABLE["file"]).read_bytes()
    t = ccel.CCELTable.from_bytes(data)
    assert t.signature == exp["signature"]
    assert t.length == exp["length"]
    assert t.revision == exp["revision"]
    assert t.checksum == exp["checksum_byte"]
    assert t.checksum_valid is exp["checksum_valid"]
    assert t.oem_id == exp["oem_id"]
    assert t.oem_table_id == exp["oem_table_id"]
    assert t.oem_revision == exp["oem_revision"]
    assert t.creator_id.hex() == exp["creator_id_hex"]
    assert t.creator_revision == exp["creator_revision"]
    assert t.cc_type == exp["cc_type"]
    assert t.cc_subtype == exp["cc_subtype"]
    assert t.reserved.hex() == exp["reserved_hex"]
    assert t.log_area_minimum_length == exp["log_area_minimum_length"]
    assert t.log_area_start_address == int(exp["log_area_start_address"], 16)
    log_size = len(path("ccel", "go-tdx-guest/ccel_data.dat").read_bytes())
    assert (t.log_area_minimum_length == log_size) is exp["matches_ccel_data_dat_size"]
    assert t.to_bytes() == data
    assert json.loads(json.dumps(t.to_dict()))["cc_type_name"] == "Intel TDX"


def test_table_with_a_wrong_checksum_decodes_but_says_so() -> None:
    data = bytearray(path("ccel", TABLE["file"]).read_bytes())
    data[9] ^= 0x01
    t = ccel.CCELTable.from_bytes(bytes(data))
    assert t.checksum_valid is False
    assert t.to_bytes() == bytes(data)


def _table(length_field: int | None = None, size: int = 56, sig: bytes = b"CCEL") -> bytes:
    body = bytearray(path("ccel", TABLE["file"]).read_bytes())
    body[:4] = sig
    body = (body + bytes(size))[:size]
    struct.pack_into("<I", body, 4, size if length_field is None else length_field)
    return bytes(body)


BAD_TABLES: list[tuple[str, bytes, type[ParseError], int]] = [
    ("empty", b"", TruncatedError, 0),
    ("truncated-before-length", b"CCEL\x38", TruncatedError, 0),
    ("wrong-signature", _table(sig=b"TDEL"), ParseError, 0),
    ("length-field-larger-than-table", _table(length_field=56, size=40), ParseError, 4),
    ("length-field-smaller-than-table", _table(length_field=52, size=56), ParseError, 4),
    ("unsupported-length", _table(size=64), UnsupportedFormatError, 4),
]


@pytest.mark.parametrize(
    ("data", "error", "offset"), [pytest.param(d, e, o, id=i) for i, d, e, o in BAD_TABLES]
)
def test_bad_table(data: bytes, error: type[ParseError], offset: int) -> None:
    with pytest.raises(error) as info:
        ccel.CCELTable.from_bytes(data)
    assert info.value.offset == offset


def test_tcg_parse_of_a_cc_log_names_pcrs_and_ccel_parse_names_td_registers() -> None:
    data = path("ccel", "go-tdx-guest/ccel_data.dat").read_bytes()
    as_tcg = tcg.parse(data)
    as_cc = ccel.parse(data)
    assert [e.pcr_index for e in as_tcg.events] == [e.pcr_index for e in as_cc.events]
    assert {e.register for e in as_cc.events[1:]} <= {"mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"}
    assert as_cc.events[1].register == cc_name(as_cc.events[1].pcr_index)
    assert ccel.CCELog.from_bytes(data) == as_cc
