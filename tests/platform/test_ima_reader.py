"""IMAReader: only what is new, each byte once, partial records kept, resets detected.

Binary records are assembled here from the kernel's layout (ima_fs.c
``ima_measurements_show``) with template hashes computed independently; the
real lists are the ascii vectors in ../shared/vectors/ima and their binary form
re-encoded by :mod:`cima.eventlog.ima`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cima.errors import ParseError, PlatformError
from cima.eventlog import ima
from cima.eventlog.replay import replay
from cima.platform.base import PlatformPaths
from cima.platform.ima import IMALogResetError, IMAPosition, IMAReader
from tests import vectors

KEYLIME = "keylime-perf-tests/ima_log.txt"


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


def ima_ng_record(path: str, content: bytes, pcr: int = 10) -> bytes:
    """One binary ``ima-ng`` record (template fields ``d-ng|n-ng``)."""
    d_ng = b"sha256:\0" + hashlib.sha256(content).digest()
    n_ng = path.encode() + b"\0"
    data = _u32(len(d_ng)) + d_ng + _u32(len(n_ng)) + n_ng
    name = b"ima-ng"
    return _u32(pcr) + hashlib.sha1(data).digest() + _u32(len(name)) + name + _u32(len(data)) + data


def ima_record(path: str, content: bytes) -> bytes:
    """One binary record of the original ``ima`` template (``d|n``): no template data length."""
    digest = hashlib.sha1(content).digest()
    name = path.encode()
    template_hash = hashlib.sha1(digest + name.ljust(256, b"\0")).digest()
    return _u32(10) + template_hash + _u32(3) + b"ima" + digest + _u32(len(name)) + name


def ascii_line(path: str, content: bytes) -> bytes:
    digest = hashlib.sha256(content).digest()
    d_ng = b"sha256:\0" + digest
    n_ng = path.encode() + b"\0"
    data = _u32(len(d_ng)) + d_ng + _u32(len(n_ng)) + n_ng
    th = hashlib.sha1(data).hexdigest()
    return f"10 {th} ima-ng sha256:{digest.hex()} {path}\n".encode()


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def _records(n: int, start: int = 0) -> list[bytes]:
    return [ima_ng_record(f"/usr/bin/tool{i}", b"content %d" % i) for i in range(start, start + n)]


@pytest.fixture
def binary_path(tmp_path: Path) -> Path:
    return tmp_path / "binary_runtime_measurements"


def test_returns_only_what_was_appended(binary_path: Path) -> None:
    first, second = _records(3), _records(2, start=3)
    binary_path.write_bytes(b"".join(first))
    with IMAReader(binary_path) as reader:
        got = reader.read_new()
        assert [e.to_bytes() for e in got] == first
        assert (reader.count, reader.offset) == (3, len(b"".join(first)))
        assert reader.read_new() == []

        _append(binary_path, b"".join(second))
        got = reader.read_new()
        assert [e.to_bytes() for e in got] == second
        assert [e.index for e in got] == [3, 4]
        assert [e.template_name for e in got] == ["ima-ng", "ima-ng"]
        assert reader.count == 5
        assert reader.offset == binary_path.stat().st_size == reader.bytes_read
        assert reader.format == "binary"


RECORD_A = ima_ng_record("/etc/a", b"a")
RECORD_IMA = ima_record("/etc/old-style", b"b")


@pytest.mark.parametrize("record", [RECORD_A, RECORD_IMA], ids=["ima-ng", "ima"])
@pytest.mark.parametrize("cut", [1, 4, 23, 24, 27, 28, 30, 31, 34, -30, -1])
def test_a_partial_trailing_record_waits_for_the_rest(
    binary_path: Path, record: bytes, cut: int
) -> None:
    head = _records(1)[0]
    binary_path.write_bytes(head + record[:cut])
    reader = IMAReader(binary_path)
    try:
        assert [e.to_bytes() for e in reader.read_new()] == [head]
        assert (reader.count, reader.offset) == (1, len(head))
        assert reader.read_new() == []
        _append(binary_path, record[cut:])
        assert [e.to_bytes() for e in reader.read_new()] == [record]
        assert (reader.count, reader.offset) == (2, len(head) + len(record))
        assert reader.bytes_read == len(head) + len(record)
    finally:
        reader.close()


def test_ascii_list_with_a_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "ascii_runtime_measurements"
    lines = [ascii_line(f"/bin/t{i}", b"%d" % i) for i in range(4)]
    path.write_bytes(lines[0] + lines[1] + lines[2][:17])
    with IMAReader(path) as reader:
        got = reader.read_new()
        assert [e.file_name for e in got] == ["/bin/t0", "/bin/t1"]
        assert [e.line for e in got] == [1, 2]
        _append(path, lines[2][17:] + lines[3])
        got = reader.read_new()
        assert [e.file_name for e in got] == ["/bin/t2", "/bin/t3"]
        assert [e.line for e in got] == [3, 4]
        assert (reader.count, reader.offset, reader.format) == (4, len(b"".join(lines)), "ascii")


def test_auto_format_sniffs_a_file_without_a_telling_name(tmp_path: Path) -> None:
    ascii_path, binary_path = tmp_path / "list.txt", tmp_path / "list.bin"
    ascii_path.write_bytes(ascii_line("/x", b"x"))
    binary_path.write_bytes(_records(1)[0])
    for path, fmt in ((ascii_path, "ascii"), (binary_path, "binary")):
        with IMAReader(path) as reader:
            assert reader.format is None
            assert len(reader.read_new()) == 1
            assert reader.format == fmt


def test_an_empty_list_then_entries(binary_path: Path) -> None:
    binary_path.write_bytes(b"")
    with IMAReader(binary_path, format="auto") as reader:
        assert reader.read_new() == []
        _append(binary_path, _records(1)[0])
        assert len(reader.read_new()) == 1


def test_100000_entries_in_100_steps_read_each_byte_once(binary_path: Path) -> None:
    records = _records(100_000)
    data = b"".join(records)
    binary_path.write_bytes(b"")
    written = 0
    got: list[ima.IMAEntry] = []
    with IMAReader(binary_path) as reader:
        for step in range(1, 101):
            cut = len(data) * step // 100 - (37 if step < 100 else 0)  # mostly mid-record
            _append(binary_path, data[written:cut])
            written = cut
            new = reader.read_new()
            assert new
            assert new[0].index == len(got)
            got += new
            assert reader.bytes_read == written  # nothing read twice
            assert reader.offset <= written
            assert reader.count == len(got)
        assert reader.count == 100_000
        assert reader.offset == reader.bytes_read == len(data)
    assert [e.to_bytes() for e in got] == records


def test_cuts_anywhere_in_a_large_list_read_each_byte_once(binary_path: Path) -> None:
    data = b"".join(_records(3000))
    binary_path.write_bytes(b"")
    cuts = sorted({len(data) * k // 37 + k for k in range(37)} | {len(data)})
    seen: list[bytes] = []
    with IMAReader(binary_path, chunk_size=4096) as reader:
        written = 0
        for cut in cuts:
            _append(binary_path, data[written:cut])
            written = cut
            seen += [e.to_bytes() for e in reader.read_new()]
            assert reader.bytes_read == written
        assert b"".join(seen) == data
        assert reader.count == 3000


def _keylime_binary() -> bytes:
    log = ima.parse_ascii(vectors.path("ima", KEYLIME).read_bytes())
    return b"".join(e.to_bytes() for e in log.entries)


def _manifest(file: str) -> dict[str, object]:
    (entry,) = [e for e in vectors.manifest("ima") if e["file"] == file]
    expected: dict[str, object] = entry["expected"]
    return expected


@pytest.mark.parametrize("fmt", ["ascii", "binary"])
def test_a_real_list_read_in_pieces_replays_to_the_manifest_pcr10(tmp_path: Path, fmt: str) -> None:
    if fmt == "ascii":
        data = vectors.path("ima", KEYLIME).read_bytes()
        path = tmp_path / "ascii_runtime_measurements"
    else:
        data = _keylime_binary()
        path = tmp_path / "binary_runtime_measurements"
    path.write_bytes(b"")
    entries: list[ima.IMAEntry] = []
    with IMAReader(path) as reader:
        for start in range(0, len(data), 997):
            _append(path, data[start : start + 997])
            entries += reader.read_new()
        assert reader.bytes_read == len(data)
    expected = _manifest(KEYLIME)
    assert len(entries) == expected["entries"]
    pcr10 = expected["pcr10"]
    assert isinstance(pcr10, dict)
    assert replay(entries, ["sha1"]).get("pcr10", "sha1").hex() == pcr10["sha1"]


def test_resume_from_a_saved_position_seeks_instead_of_rereading(binary_path: Path) -> None:
    first, second = _records(50), _records(5, start=50)
    binary_path.write_bytes(b"".join(first))
    with IMAReader(binary_path) as reader:
        reader.read_new()
        saved = reader.position
    assert saved == IMAPosition(50, len(b"".join(first)), first[-1])
    _append(binary_path, b"".join(second))
    with IMAReader(binary_path, position=saved) as resumed:
        got = resumed.read_new()
        assert [e.to_bytes() for e in got] == second
        assert [e.index for e in got] == list(range(50, 55))
        # The last record before the offset (to recognise the list), then only the new ones.
        assert resumed.bytes_read == len(first[-1]) + len(b"".join(second))


def test_a_truncated_list_is_a_reset(binary_path: Path) -> None:
    binary_path.write_bytes(b"".join(_records(5)))
    with IMAReader(binary_path) as reader:
        reader.read_new()
        binary_path.write_bytes(b"".join(_records(2, start=100)))
        with pytest.raises(IMALogResetError, match="reset"):
            reader.read_new()
        with pytest.raises(IMALogResetError):  # and stays so: nothing half-read is returned
            reader.read_new()


def test_a_truncated_list_restarts_when_asked(binary_path: Path) -> None:
    binary_path.write_bytes(b"".join(_records(5)))
    with IMAReader(binary_path, on_reset="restart") as reader:
        reader.read_new()
        flags = [reader.restarted]
        fresh = _records(2, start=100)
        binary_path.write_bytes(b"".join(fresh))
        got = reader.read_new()
        flags.append(reader.restarted)
        assert flags == [False, True]
        assert [e.to_bytes() for e in got] == fresh
        assert [e.index for e in got] == [0, 1]
        assert (reader.count, reader.offset) == (2, len(b"".join(fresh)))


def test_resuming_on_another_boots_list_is_a_reset(binary_path: Path) -> None:
    binary_path.write_bytes(b"".join(_records(5)))
    with IMAReader(binary_path) as reader:
        reader.read_new()
        saved = reader.position
    other = _records(8, start=1000)  # longer than the saved offset, different records
    binary_path.write_bytes(b"".join(other))
    with IMAReader(binary_path, position=saved) as resumed, pytest.raises(IMALogResetError):
        resumed.read_new()
    with IMAReader(binary_path, position=saved, on_reset="restart") as resumed:
        assert [e.to_bytes() for e in resumed.read_new()] == other
        assert resumed.restarted


def test_a_corrupt_length_is_a_parse_error_at_its_offset(binary_path: Path) -> None:
    good = _records(2)
    bad = bytearray(ima_ng_record("/x", b"x"))
    struct.pack_into("<I", bad, 24, 100_000)  # template name length
    binary_path.write_bytes(b"".join(good))
    with IMAReader(binary_path) as reader:
        reader.read_new()
        _append(binary_path, bytes(bad))
        with pytest.raises(ParseError) as err:
            reader.read_new()
    assert err.value.offset == len(b"".join(good)) + 24


def test_an_implausible_template_data_length_is_a_parse_error(binary_path: Path) -> None:
    bad = bytearray(ima_ng_record("/x", b"x"))
    struct.pack_into("<I", bad, 34, 1 << 30)  # template data length, after "ima-ng"
    binary_path.write_bytes(bytes(bad))
    with IMAReader(binary_path) as reader, pytest.raises(ParseError) as err:
        reader.read_new()
    assert err.value.offset == 34


def test_the_running_kernels_list_when_there_is_one() -> None:
    """securityfs's seq_file: reading on after the end returns only later records."""
    path = PlatformPaths().ima_binary
    if not os.access(path, os.R_OK):
        pytest.skip(f"{path} is not readable here (no securityfs with IMA, or not root)")
    with IMAReader(path, chunk_size=512) as reader:
        first = reader.read_new()
        assert first
        later = reader.read_new()
        assert [e.index for e in later] == list(range(len(first), len(first) + len(later)))
        whole = ima.parse_binary(path.read_bytes()).entries
        assert [e.to_bytes() for e in whole[: reader.count]] == [
            e.to_bytes() for e in first + later
        ]


def test_a_seq_file_read_on_after_its_end_gives_only_new_records(tmp_path: Path) -> None:
    """The kernel behaviour the reader relies on, shown on another seq_file that grows.

    /proc/self/mountinfo is a seq_file like the IMA lists: after reading to its end,
    a mount appends a record, and reading on from the same open file returns that
    record alone.
    """
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount(8) is not installed")
    target = tmp_path / "mnt"
    target.mkdir()
    fd = os.open("/proc/self/mountinfo", os.O_RDONLY)
    try:
        while os.read(fd, 65536):
            pass
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "cima-probe", str(target)], capture_output=True, check=False
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        try:
            more = b""
            while chunk := os.read(fd, 65536):
                more += chunk
        finally:
            subprocess.run(["umount", str(target)], check=True)
    finally:
        os.close(fd)
    assert more.count(b"\n") == 1
    assert f" {target} ".encode() in more


def test_a_missing_list_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "security/ima/binary_runtime_measurements"
    with pytest.raises(PlatformError, match=r"binary_runtime_measurements.*ENOENT"):
        IMAReader(path).read_new()


@pytest.mark.parametrize(
    "kwargs",
    [{"format": "xml"}, {"on_reset": "ignore"}],
)
def test_bad_arguments(binary_path: Path, kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        IMAReader(binary_path, **kwargs)  # type: ignore[arg-type]


def test_inconsistent_positions_are_refused() -> None:
    with pytest.raises(ValueError):
        IMAPosition(1, 4, b"longer than four")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=400), st.integers(0, 400))
def test_random_bytes_give_entries_or_a_parse_error(tmp_path: Path, data: bytes, cut: int) -> None:
    path = tmp_path / f"binary_runtime_measurements.{os.getpid()}"
    path.write_bytes(data[:cut])
    try:
        with IMAReader(path) as reader:
            reader.read_new()
            _append(path, data[cut:])
            reader.read_new()
    except ParseError:
        pass
    finally:
        path.unlink()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.integers(0, 3000), st.integers(0, 255), st.integers(1, 2999))
def test_mutated_real_lists_give_entries_or_a_parse_error(
    tmp_path: Path, at: int, value: int, cut: int
) -> None:
    data = bytearray(_KEYLIME_HEAD)
    data[at % len(data)] = value
    path = tmp_path / "binary_runtime_measurements"
    path.write_bytes(bytes(data[:cut]))
    try:
        with IMAReader(path) as reader:
            reader.read_new()
            _append(path, bytes(data[cut:]))
            reader.read_new()
    except ParseError:
        pass
    finally:
        path.unlink()


_KEYLIME_HEAD = _keylime_binary()[:3000]


# -- reading into a compact store --------------------------------------------------------------


def test_read_into_a_store_reads_each_byte_once(binary_path: Path) -> None:
    records = _records(5000)
    data = b"".join(records)
    binary_path.write_bytes(b"")
    store = ima.IMAStore()
    written = 0
    with IMAReader(binary_path, chunk_size=4096) as reader:
        for step in range(1, 21):
            cut = len(data) * step // 20 - (11 if step < 20 else 0)  # mostly mid-record
            _append(binary_path, data[written:cut])
            written = cut
            added = reader.read_into(store)
            assert added == reader.count - (len(store) - added)
            assert len(store) == reader.count
            assert reader.bytes_read == written
        assert reader.read_into(store) == 0
        assert reader.offset == reader.bytes_read == len(data)
    entries = store.entries()
    assert [e.to_bytes() for e in entries] == records
    assert [e.index for e in entries] == list(range(5000))
    assert entries == list(ima.parse_binary(data))


def test_read_into_holds_one_chunk_besides_the_store(binary_path: Path) -> None:
    data = b"".join(_records(30_000))  # about 4 MB
    binary_path.write_bytes(data)
    store = ima.IMAStore()
    with IMAReader(binary_path) as reader:
        tracemalloc.start()
        try:
            reader.read_into(store)
            used, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert len(store) == 30_000
    assert used < len(data) + 16 * 30_000
    # Reading the whole list first, or decoding entries, would take a second copy or more.
    assert peak - used < 1024 * 1024, (peak, used)


def test_read_into_an_ascii_store(tmp_path: Path) -> None:
    path = tmp_path / "ascii_runtime_measurements"
    lines = [ascii_line(f"/bin/t{i}", b"%d" % i) for i in range(6)]
    path.write_bytes(lines[0] + b"\n" + lines[1] + lines[2][:9])
    store = ima.IMAStore()
    with IMAReader(path, chunk_size=16) as reader:
        assert reader.read_into(store) == 2
        _append(path, lines[2][9:] + b"".join(lines[3:]))
        assert reader.read_into(store) == 4
    assert [e.file_name for e in store.entries()] == [f"/bin/t{i}" for i in range(6)]
    assert [e.line for e in store.entries()] == [1, 3, 4, 5, 6, 7]


def test_a_reset_clears_the_store_and_keeps_old_snapshots(binary_path: Path) -> None:
    old = _records(5)
    binary_path.write_bytes(b"".join(old))
    store = ima.IMAStore()
    with IMAReader(binary_path, on_reset="restart") as reader:
        reader.read_into(store)
        before = store.entries()
        fresh = _records(7, start=100)
        binary_path.write_bytes(b"".join(fresh[:2]))
        assert reader.read_into(store) == 2
        assert reader.restarted
        _append(binary_path, b"".join(fresh[2:]))
        assert reader.read_into(store) == 5
        assert not reader.restarted
    assert [e.to_bytes() for e in before] == old
    assert [e.to_bytes() for e in store.entries()] == fresh
    assert [e.index for e in store.entries()] == list(range(7))
    assert store.entries().list_id != before.list_id


def test_records_before_a_corrupt_one_are_kept_and_the_next_read_raises(
    binary_path: Path,
) -> None:
    good = _records(3)
    bad = bytearray(ima_ng_record("/x", b"x"))
    struct.pack_into("<I", bad, 24, 100_000)  # template name length
    binary_path.write_bytes(b"".join(good) + bytes(bad))
    store = ima.IMAStore()
    with IMAReader(binary_path) as reader:
        assert reader.read_into(store) == 3
        assert reader.offset == len(b"".join(good))
        for _ in range(2):
            with pytest.raises(ParseError) as err:
                reader.read_into(store)
            assert err.value.offset == len(b"".join(good)) + 24
        assert len(store) == 3
    with IMAReader(binary_path) as reader:
        assert [e.to_bytes() for e in reader.read_new()] == good
        with pytest.raises(ParseError):
            reader.read_new()


def test_a_store_must_continue_the_readers_list(binary_path: Path) -> None:
    binary_path.write_bytes(b"".join(_records(4)))
    store = ima.IMAStore()
    store.append_binary(_records(1)[0])
    with IMAReader(binary_path) as reader, pytest.raises(ValueError, match="does not continue"):
        reader.read_into(store)


def test_resuming_into_an_empty_store_numbers_from_the_saved_position(binary_path: Path) -> None:
    first, second = _records(4), _records(3, start=4)
    binary_path.write_bytes(b"".join(first))
    with IMAReader(binary_path) as reader:
        reader.read_new()
        saved = reader.position
    _append(binary_path, b"".join(second))
    store = ima.IMAStore()
    with IMAReader(binary_path, position=saved) as resumed:
        assert resumed.read_into(store) == 3
    assert [(e.index, e.offset) for e in store.entries()] == [
        (4 + i, len(b"".join(first + second[:i]))) for i in range(3)
    ]
