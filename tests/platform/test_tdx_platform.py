"""TDXPlatform against a configfs-tsm stand-in, sysfs measurement files and real CCEL bytes.

The quotes the fake returns are the production quote go-tdx-guest/
tdx_prod_quote_SPR_E4.dat with REPORTDATA replaced (signature no longer valid);
the CCEL is go-tdx-guest/ccel_data.dat with its ACPI table, copied into a
temporary "sysfs" at test time. Expected register values come from the
MANIFEST.json files of those vectors.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cima.errors import (
    FreshnessError,
    ParseError,
    PlatformError,
    TruncatedError,
    UnsupportedFormatError,
)
from cima.evidence.tdx import TDXQuote
from cima.platform.base import PlatformPaths
from cima.platform.tdx import (
    QUOTE_BUFFER_SIZE,
    TDX_CMD_GET_QUOTE,
    TDX_CMD_GET_REPORT0,
    TDReport,
    TDXPlatform,
    decode_get_quote_response,
    encode_get_quote_request,
)
from tests import vectors
from tests.platform.fake_tsm import (
    FakeEntry,
    FakeTSM,
    quote_with_report_data,
    tmp_platform_paths,
    write_measurements,
)

TEMPLATE = "go-tdx-guest/tdx_prod_quote_SPR_E4.dat"
COS_QUOTE = "go-tdx-guest/cos-113-tdx-quote.dat"


def _expected(category: str, file: str) -> dict[str, object]:
    for entry in vectors.manifest(category):
        if entry["file"] == file:
            expected: dict[str, object] = entry["expected"]
            return expected
    raise AssertionError(f"{category}/{file} is not in the manifest")


def _body(category: str, file: str) -> dict[str, str]:
    body = _expected(category, file)["body"]
    assert isinstance(body, dict)
    return body


@pytest.fixture
def template() -> bytes:
    return vectors.path("tdx-quote", TEMPLATE).read_bytes()


@pytest.fixture
def paths(tmp_path: Path) -> PlatformPaths:
    return tmp_platform_paths(tmp_path)


@pytest.fixture
def fake(paths: PlatformPaths, template: bytes) -> Iterator[FakeTSM]:
    with FakeTSM(paths.configfs_tsm, template) as tsm:
        yield tsm


def _entries(fake: FakeTSM) -> list[str]:
    return [str(e[1]) for e in fake.events if e[0] == "mkdir"]


def _decode(quote: bytes) -> TDXQuote:
    return TDXQuote.from_bytes(quote)


# --------------------------------------------------------------------------- configfs-tsm


def test_report_takes_the_configfs_tsm_path_and_binds_nonce(
    paths: PlatformPaths, fake: FakeTSM
) -> None:
    platform = TDXPlatform(paths, configfs=fake)
    nonce, user_data = os.urandom(32), b"user data"

    report = platform.report(nonce, user_data)

    (entry,) = _entries(fake)
    assert fake.kinds(entry) == [
        "mkdir",
        "read provider",
        "read generation",
        "commit",
        "read outblob",
        "read generation",
        "rmdir",
    ]
    assert list(paths.configfs_tsm.iterdir()) == []  # the entry was removed
    assert (report.kind, report.signature, report.nonce, report.user_data) == (
        "tdx-quote",
        b"",
        nonce,
        user_data,
    )
    expected_rd = hashlib.sha512(nonce + user_data).digest()
    assert fake.commits == [(entry, 1, expected_rd)]
    quote = _decode(report.body)
    assert quote.body.report_data == expected_rd
    # The rest of the quote is the template's: its MRTD as the manifest gives it.
    assert quote.body.mrtd.hex() == _body("tdx-quote", TEMPLATE)["mrtd"]


def test_a_writer_between_our_write_and_read_is_detected_and_retried(
    paths: PlatformPaths, fake: FakeTSM
) -> None:
    intruder = b"\x5a" * 64
    fired: list[int] = []

    def second_writer(entry: FakeEntry, generation: int) -> None:
        if fired:
            return
        fired.append(generation)
        fd = os.open(entry.path / "inblob", os.O_WRONLY)
        os.write(fd, intruder)
        os.close(fd)

    fake.on_commit = second_writer
    nonce = b"n" * 32
    report = TDXPlatform(paths, configfs=fake).report(nonce)

    ours = hashlib.sha512(nonce).digest()
    (entry,) = _entries(fake)
    assert [(g, d) for _, g, d in fake.commits] == [(1, ours), (2, intruder), (3, ours)]
    assert _decode(report.body).body.report_data == ours
    assert fake.kinds(entry).count("read outblob") == 2


def test_a_racing_writer_of_the_same_bytes_is_caught_by_the_generation(
    paths: PlatformPaths, fake: FakeTSM
) -> None:
    """The outblob carries our REPORTDATA, yet the generation moved by two: retry."""
    nonce = b"same"
    ours = hashlib.sha512(nonce).digest()
    fired: list[int] = []

    def replayer(entry: FakeEntry, generation: int) -> None:
        if not fired:
            fired.append(generation)
            fd = os.open(entry.path / "inblob", os.O_WRONLY)
            os.write(fd, ours)
            os.close(fd)

    fake.on_commit = replayer
    TDXPlatform(paths, configfs=fake).report(nonce)
    assert [g for _, g, _ in fake.commits] == [1, 2, 3]


def test_a_writer_racing_every_attempt_fails_after_the_bound(
    paths: PlatformPaths, fake: FakeTSM
) -> None:
    ours = hashlib.sha512(b"x").digest()

    def always(entry: FakeEntry, generation: int) -> None:
        if entry.inblob == ours:
            fd = os.open(entry.path / "inblob", os.O_WRONLY)
            os.write(fd, bytes(64))
            os.close(fd)

    fake.on_commit = always
    with pytest.raises(PlatformError, match=r"another writer.*2 attempts.*generation went from"):
        TDXPlatform(paths, configfs=fake, max_attempts=2).report(b"x")
    assert sum(1 for _, _, d in fake.commits if d == ours) == 2
    assert list(paths.configfs_tsm.iterdir()) == []  # removed even on failure


def test_concurrent_reports_use_separate_entries(paths: PlatformPaths, fake: FakeTSM) -> None:
    platform = TDXPlatform(paths, configfs=fake)
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = platform.report(bytes([i]) * 16).body
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    for i, body in results.items():
        rd = _decode(body).body.report_data
        assert rd == hashlib.sha512(bytes([i]) * 16).digest()
    assert len(set(_entries(fake))) == 6
    assert list(paths.configfs_tsm.iterdir()) == []


def test_another_provider_is_refused(paths: PlatformPaths, template: bytes) -> None:
    with (
        FakeTSM(paths.configfs_tsm, template, provider="sev_guest") as fake,
        pytest.raises(PlatformError, match="provider is 'sev_guest'"),
    ):
        TDXPlatform(paths, configfs=fake).report(b"n")
        assert list(paths.configfs_tsm.iterdir()) == []


def test_no_provider_registered(paths: PlatformPaths, template: bytes) -> None:
    with (
        FakeTSM(paths.configfs_tsm, template, provider=None) as fake,
        pytest.raises(PlatformError, match=r"no attestation provider.*ENXIO"),
    ):
        TDXPlatform(paths, configfs=fake).report(b"n")


def test_an_empty_outblob_is_an_error(paths: PlatformPaths, template: bytes) -> None:
    with (
        FakeTSM(paths.configfs_tsm, template, make_quote=lambda rd: b"") as fake,
        pytest.raises(PlatformError, match="outblob: empty report"),
    ):
        TDXPlatform(paths, configfs=fake).report(b"n")


def test_a_quote_that_does_not_carry_our_report_data_is_refused(
    paths: PlatformPaths, template: bytes
) -> None:
    stale = quote_with_report_data(template, bytes(64))
    with (
        FakeTSM(paths.configfs_tsm, template, make_quote=lambda rd: stale) as fake,
        pytest.raises(PlatformError, match="carries REPORTDATA 0000"),
    ):
        TDXPlatform(paths, configfs=fake).report(b"n")


def test_an_outblob_that_is_no_quote_is_refused(paths: PlatformPaths, template: bytes) -> None:
    with (
        FakeTSM(paths.configfs_tsm, template, make_quote=lambda rd: b"\x04\x00junk") as fake,
        pytest.raises(PlatformError, match="does not decode as a TDX quote"),
    ):
        TDXPlatform(paths, configfs=fake).report(b"n")


def test_report_data_sizes_are_enforced(paths: PlatformPaths, fake: FakeTSM) -> None:
    platform = TDXPlatform(paths, configfs=fake)
    with pytest.raises(FreshnessError):
        platform.report(bytes(65))
    with pytest.raises(PlatformError, match="REPORTDATA is 64 bytes"):
        platform.quote(bytes(63))


def test_no_report_interface_names_what_is_missing(paths: PlatformPaths) -> None:
    with pytest.raises(PlatformError) as err:
        TDXPlatform(paths).report(b"n")
    assert str(paths.configfs_tsm) in str(err.value)
    assert str(paths.tdx_guest_device) in str(err.value)


# --------------------------------------------------------------------------- legacy device


def test_missing_legacy_device_is_a_clear_error(paths: PlatformPaths) -> None:
    with pytest.raises(PlatformError) as err:
        TDXPlatform(paths).td_report()
    message = str(err.value)
    assert str(paths.tdx_guest_device) in message
    assert "ENOENT" in message
    assert f"errno {errno.ENOENT}" in message


def test_a_device_node_without_the_ioctl_says_so(paths: PlatformPaths) -> None:
    """A real ioctl on something that is not the TDX driver fails with ENOTTY."""
    paths.tdx_guest_device.parent.mkdir(parents=True)
    paths.tdx_guest_device.write_bytes(b"")
    with pytest.raises(PlatformError, match=r"TDX_CMD_GET_REPORT0.*does not implement it"):
        TDXPlatform(paths).td_report()


def test_configfs_without_a_tdx_provider_falls_back_to_the_device(
    paths: PlatformPaths, template: bytes
) -> None:
    paths.tdx_guest_device.parent.mkdir(parents=True)
    paths.tdx_guest_device.write_bytes(b"")  # a node, but not the driver: ioctl gives ENOTTY
    with (
        FakeTSM(paths.configfs_tsm, template, provider=None) as fake,
        pytest.raises(PlatformError, match=r"TDX_CMD_GET_REPORT0 on .*tdx_guest"),
    ):
        TDXPlatform(paths, configfs=fake).report(b"n")


def test_ioctl_numbers_match_the_published_constants() -> None:
    # _IOWR('T', 1, struct tdx_report_req) and _IOR('T', 4, struct tdx_quote_req) as
    # other TDX guest implementations hard-code them.
    assert TDX_CMD_GET_REPORT0 == 0xC4405401
    assert TDX_CMD_GET_QUOTE[0] == 0x80105404


# --------------------------------------------------------------------------- registers


def _manifest_registers() -> dict[str, bytes]:
    """MRTD and RTMR0..3 of the COS TD (quote body, and the replay of its CCEL)."""
    body = _body("ccel", COS_QUOTE)
    return {
        name: bytes.fromhex(body[name]) for name in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")
    }


def test_registers_are_read_from_the_measurement_files(paths: PlatformPaths) -> None:
    values = _manifest_registers()
    write_measurements(paths.tdx_rtmr_sysfs, values)
    platform = TDXPlatform(paths)
    for name, value in values.items():
        assert platform.read(name, "sha384") == value
    bank = platform.read_all()
    assert {v.register: v.digest for v in bank} == values
    assert bank.algorithms() == ["sha384"]


def test_registers_fall_back_to_a_fresh_quote(paths: PlatformPaths, fake: FakeTSM) -> None:
    body = _body("tdx-quote", TEMPLATE)
    bank = TDXPlatform(paths, configfs=fake).read_all()
    assert {v.register: v.digest.hex() for v in bank} == {
        name: body[name] for name in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")
    }
    assert len(_entries(fake)) == 1  # one quote for all five registers


def test_a_measurement_file_of_the_wrong_size_is_an_error(paths: PlatformPaths) -> None:
    write_measurements(paths.tdx_rtmr_sysfs, {"rtmr1": bytes(32)})
    with pytest.raises(PlatformError, match="32 bytes, expected 48"):
        TDXPlatform(paths).read("rtmr1", "sha384")


def test_bad_register_and_bank_names(paths: PlatformPaths) -> None:
    platform = TDXPlatform(paths)
    with pytest.raises(PlatformError, match="no register 'pcr0'"):
        platform.read("pcr0", "sha384")
    with pytest.raises(PlatformError, match="only a sha384 bank"):
        platform.read("rtmr0", "sha256")


def test_no_register_source_names_what_is_missing(paths: PlatformPaths) -> None:
    with pytest.raises(PlatformError) as err:
        TDXPlatform(paths).read("rtmr0", "sha384")
    for p in (paths.tdx_rtmr_sysfs, paths.tdx_guest_device, paths.configfs_tsm):
        assert str(p) in str(err.value)


def test_extend_writes_one_48_byte_value_to_the_rtmr_file(paths: PlatformPaths) -> None:
    old = _manifest_registers()
    write_measurements(paths.tdx_rtmr_sysfs, old)
    digest = hashlib.sha384(b"event").digest()
    TDXPlatform(paths).extend("rtmr3", "sha384", digest)
    # A regular file stands in for the attribute: it now holds exactly what was written
    # once, at offset 0 (the kernel would extend; the file shows the write itself).
    assert (paths.tdx_rtmr_sysfs / "rtmr3:sha384").read_bytes() == digest
    assert (paths.tdx_rtmr_sysfs / "rtmr2:sha384").read_bytes() == old["rtmr2"]


@pytest.mark.parametrize(
    ("register", "algorithm", "size", "message"),
    [
        ("rtmr0", "sha384", 48, "not extendable"),
        ("rtmr1", "sha384", 48, "not extendable"),
        ("mrtd", "sha384", 48, "not extendable"),
        ("rtmr3", "sha256", 32, "only a sha384 bank"),
        ("rtmr3", "sha384", 32, "takes 48 bytes"),
        ("pcr10", "sha384", 48, "no register"),
    ],
)
def test_extend_refuses(
    paths: PlatformPaths, register: str, algorithm: str, size: int, message: str
) -> None:
    write_measurements(paths.tdx_rtmr_sysfs, _manifest_registers())
    with pytest.raises(PlatformError, match=message):
        TDXPlatform(paths).extend(register, algorithm, bytes(size))


def test_extend_without_any_interface_names_what_is_missing(paths: PlatformPaths) -> None:
    with pytest.raises(PlatformError) as err:
        TDXPlatform(paths).extend("rtmr2", "sha384", bytes(48))
    assert "rtmr2:sha384" in str(err.value)
    assert str(paths.tdx_guest_device) in str(err.value)


# --------------------------------------------------------------------------- paths, info


def test_path_overrides_are_used_everywhere(paths: PlatformPaths, fake: FakeTSM) -> None:
    write_measurements(paths.tdx_rtmr_sysfs, _manifest_registers())
    info = TDXPlatform(paths, configfs=fake).info()
    assert info["configfs_tsm"] == {
        "path": str(paths.configfs_tsm),
        "present": True,
        "provider": "tdx_guest",
    }
    assert info["measurements"]["path"] == str(paths.tdx_rtmr_sysfs)
    assert "rtmr3:sha384" in info["measurements"]["files"]
    assert info["device"] == {"path": str(paths.tdx_guest_device), "present": False}
    assert info["ccel"]["data"] == str(paths.ccel_data)
    assert info["report_source"] == "configfs-tsm"
    assert (info["default_algorithm"], info["registers"]) == (
        "sha384",
        ["mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"],
    )


# --------------------------------------------------------------------------- CCEL


def _install_ccel(paths: PlatformPaths, data: bytes, table: bytes | None) -> None:
    paths.ccel_data.parent.mkdir(parents=True, exist_ok=True)
    paths.ccel_data.write_bytes(data)
    if table is not None:
        paths.ccel_table.write_bytes(table)


def test_boot_log_replays_to_the_quoted_rtmrs(paths: PlatformPaths) -> None:
    from cima.eventlog.replay import replay

    _install_ccel(
        paths,
        vectors.path("ccel", "go-tdx-guest/ccel_data.dat").read_bytes(),
        vectors.path("ccel", "go-tdx-guest/ccel_table.dat").read_bytes(),
    )
    expected = _expected("ccel", "go-tdx-guest/ccel_data.dat")
    events = TDXPlatform(paths).boot_log()
    assert events is not None
    assert len(events) == expected["event_count_including_header"]
    bank = replay(events, ["sha384"])
    rtmr = expected["rtmr"]
    assert isinstance(rtmr, dict)
    for i in range(4):
        assert bank.get(f"rtmr{i}", "sha384").hex() == rtmr[str(i)]


def _table_with_laml(table: bytes, laml: int) -> bytes:
    out = bytearray(table)
    struct.pack_into("<Q", out, 40, laml)  # ACPI CCEL: Log Area Minimum Length at 40
    out[9] = 0
    out[9] = (-sum(out)) % 256  # ACPI checksum: the table sums to 0
    return bytes(out)


def test_boot_log_reads_no_further_than_the_table_says(paths: PlatformPaths) -> None:
    data = vectors.path("ccel", "go-tdx-guest/ccel_data.dat").read_bytes()
    expected = _expected("ccel", "go-tdx-guest/ccel_data.dat")
    log_bytes = expected["log_bytes"]
    assert isinstance(log_bytes, int)
    from cima.eventlog import ccel

    last = ccel.parse(data).events[-1].to_bytes()
    # A valid record right after the log area: only the table's LAML keeps it out.
    padded = data[:log_bytes] + last + b"\xff" * 64
    table = vectors.path("ccel", "go-tdx-guest/ccel_table.dat").read_bytes()

    _install_ccel(paths, padded, None)
    without = TDXPlatform(paths).boot_log()
    _install_ccel(paths, padded, _table_with_laml(table, log_bytes))
    with_table = TDXPlatform(paths).boot_log()
    assert without is not None and with_table is not None
    assert len(with_table) == expected["event_count_including_header"]
    assert len(without) == len(with_table) + 1


def test_a_table_that_does_not_decode_is_ignored(paths: PlatformPaths) -> None:
    _install_ccel(paths, vectors.path("ccel", "go-tdx-guest/ccel_data.dat").read_bytes(), b"XXXX")
    events = TDXPlatform(paths).boot_log()
    assert events is not None
    assert (
        len(events)
        == _expected("ccel", "go-tdx-guest/ccel_data.dat")["event_count_including_header"]
    )


def test_no_ccel_gives_no_boot_log(paths: PlatformPaths) -> None:
    assert TDXPlatform(paths).boot_log() is None


def test_a_corrupt_ccel_is_a_parse_error_naming_the_file(paths: PlatformPaths) -> None:
    data = bytearray(vectors.path("ccel", "go-tdx-guest/ccel_data.dat").read_bytes())
    data[4:8] = b"\xee\xee\xee\xee"  # the Spec ID header's event type: not EV_NO_ACTION
    _install_ccel(paths, bytes(data), None)
    with pytest.raises(ParseError) as err:
        TDXPlatform(paths).boot_log()
    assert err.value.source == str(paths.ccel_data)


# --------------------------------------------------------------------------- TDREPORT


def _tdreport_from_manifest() -> tuple[bytes, dict[str, bytes]]:
    """A TDREPORT laid out by hand at the offsets of the kernel's tdx-guest.c enum."""
    body = _body("ccel", COS_QUOTE)
    regs = _manifest_registers()
    raw = bytearray(1024)
    raw[0] = 0x81  # REPORTTYPE.TYPE: TDX
    raw[128:192] = b"\x11" * 64  # REPORTDATA
    raw[264:280] = bytes.fromhex(body["tee_tcb_svn"])  # TEE_TCB_INFO (256) + VALID (8)
    raw[280:328] = bytes.fromhex(body["mrseam"])
    raw[512:520] = bytes.fromhex(body["td_attributes"])  # TDINFO at 512
    raw[520:528] = bytes.fromhex(body["xfam"])
    raw[528:576] = regs["mrtd"]
    for i in range(4):
        raw[720 + 48 * i : 768 + 48 * i] = regs[f"rtmr{i}"]
    raw[1000:1024] = b"\x77" * 24  # reserved: kept for the round trip
    return bytes(raw), regs


def test_tdreport_decodes_at_the_specified_offsets() -> None:
    raw, regs = _tdreport_from_manifest()
    report = TDReport.from_bytes(raw)
    assert report.registers() == regs
    assert report.report_data == b"\x11" * 64
    body = _body("ccel", COS_QUOTE)
    assert report.mrseam.hex() == body["mrseam"]
    assert report.tee_tcb_svn.hex() == body["tee_tcb_svn"]
    assert report.xfam.hex() == body["xfam"]
    assert report.to_bytes() == raw


BAD_TDREPORTS = {
    "short": (bytes([0x81]) + bytes(1022), TruncatedError),
    "long": (bytes([0x81]) + bytes(1024), ParseError),
    "empty": (b"", TruncatedError),
    "sgx report type": (bytes(1024), UnsupportedFormatError),
}


@pytest.mark.parametrize("name", sorted(BAD_TDREPORTS))
def test_bad_tdreports(name: str) -> None:
    data, error = BAD_TDREPORTS[name]
    with pytest.raises(error):
        TDReport.from_bytes(data)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=1100))
def test_random_tdreports_decode_or_raise_parse_error(data: bytes) -> None:
    try:
        report = TDReport.from_bytes(data)
    except ParseError:
        return
    assert report.to_bytes() == data


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=1023, max_size=1023))
def test_any_tdx_report_round_trips(rest: bytes) -> None:
    data = b"\x81" + rest
    assert TDReport.from_bytes(data).to_bytes() == data


# --------------------------------------------------------------------------- GetQuote buffer


def test_get_quote_request_layout() -> None:
    raw, _ = _tdreport_from_manifest()
    buf = encode_get_quote_request(raw)
    assert len(buf) == QUOTE_BUFFER_SIZE
    version, status, in_len, out_len = struct.unpack_from("<QQII", buf, 0)
    msg_len = 16 + 8 + 1024  # QGS header, report_size and id_list_size, the report
    assert (version, status, in_len, out_len) == (1, 0, 4 + msg_len, 0)
    assert int.from_bytes(buf[24:28], "big") == msg_len
    assert struct.unpack_from("<HHIIIII", buf, 28) == (1, 0, 0, msg_len, 0, 1024, 0)
    assert buf[52 : 52 + 1024] == raw
    assert set(buf[52 + 1024 :]) <= {0}


def _response(quote: bytes, *, status: int = 0, error: int = 0, selected_id: bytes = b"") -> bytes:
    msg = struct.pack("<HHIII", 1, 0, 1, 16 + 8 + len(selected_id) + len(quote), error)
    msg += struct.pack("<II", len(selected_id), len(quote)) + selected_id + quote
    data = len(msg).to_bytes(4, "big") + msg
    return (struct.pack("<QQII", 1, status, 1048, len(data)) + data).ljust(QUOTE_BUFFER_SIZE, b"\0")


def test_get_quote_response_gives_the_quote() -> None:
    quote = vectors.path("ccel", COS_QUOTE).read_bytes()[:4935]
    assert decode_get_quote_response(_response(quote)) == quote
    assert decode_get_quote_response(_response(quote, selected_id=b"\x01" * 16)) == quote


def _patched(buf: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(buf)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


_GOOD = _response(b"Q" * 100)
BAD_RESPONSES: dict[str, tuple[bytes, type[Exception], str]] = {
    "in flight": (_response(b"Q", status=0xFFFF_FFFF_FFFF_FFFF), PlatformError, "in flight"),
    "error": (_response(b"Q", status=0x8000_0000_0000_0000), PlatformError, "error"),
    "unavailable": (_response(b"Q", status=0x8000_0000_0000_0001), PlatformError, "unavailable"),
    "qgs error": (_response(b"Q", error=0x12), PlatformError, "error 0x12"),
    "empty quote": (_response(b""), PlatformError, "empty quote"),
    "short buffer": (_GOOD[:20], TruncatedError, "header"),
    "out_len beyond buffer": (_patched(_GOOD, 20, "<I", 1 << 20), ParseError, "exceeds"),
    "out_len too small": (_patched(_GOOD, 20, "<I", 8), TruncatedError, "too small"),
    "framing mismatch": (_patched(_GOOD, 24, ">I", 99), ParseError, "does not match"),
    "not a response": (_patched(_GOOD, 32, "<I", 0), UnsupportedFormatError, "GET_QUOTE_RESP"),
    "header size": (_patched(_GOOD, 36, "<I", 5), ParseError, "header size"),
    "quote too long": (_patched(_GOOD, 48, "<I", 101), ParseError, "claimed"),
    "id too long": (_patched(_GOOD, 44, "<I", 1 << 31), ParseError, "claimed"),
    "version": (_patched(_GOOD, 0, "<Q", 2), UnsupportedFormatError, "version 2"),
}


@pytest.mark.parametrize("name", sorted(BAD_RESPONSES))
def test_bad_get_quote_responses(name: str) -> None:
    buf, error, message = BAD_RESPONSES[name]
    with pytest.raises(error, match=message):
        decode_get_quote_response(buf)


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 200), st.binary(min_size=1, max_size=4))
def test_mutated_get_quote_responses(extra: bytes, at: int, patch: bytes) -> None:
    buf = bytearray(_GOOD[:200] + extra)
    buf[at : at + len(patch)] = patch
    try:
        quote = decode_get_quote_response(bytes(buf))
    except (ParseError, PlatformError):
        return
    assert quote
