"""IMAStore: a list kept as its records, entries built on demand, exact, bounded in memory.

Records are assembled here with struct and hashlib from the kernel's layout
(``ima_fs.c`` ``ima_measurements_show``); what the store builds is compared with
what :func:`cima.eventlog.ima.parse_binary` and :func:`parse_ascii` decode from
the same bytes, field by field.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import tracemalloc

import pytest

from cima.errors import ParseError
from cima.eventlog import ima
from cima.eventlog.replay import replay
from tests.vectors import path

U32 = struct.Struct("<I").pack
KEYLIME = "keylime-perf-tests/ima_log.txt"


def _framed(*fields: bytes) -> bytes:
    return b"".join(U32(len(f)) + f for f in fields)


def _record(name: bytes, data: bytes, *, pcr: int = 10, violation: bool = False) -> bytes:
    th = bytes(20) if violation else hashlib.sha1(data).digest()
    return U32(pcr) + th + U32(len(name)) + name + U32(len(data)) + data


def ima_ng(i: int) -> bytes:
    dng = b"sha256:\x00" + hashlib.sha256(b"%d" % i).digest()
    return _record(b"ima-ng", _framed(dng, b"/usr/lib/file-%d.so\x00" % i))


def old_ima(i: int) -> bytes:
    """The original ``ima`` template: no template data length (``d|n``)."""
    digest = hashlib.sha1(b"%d" % i).digest()
    name = b"/etc/old-%d" % i
    th = hashlib.sha1(digest + name.ljust(256, b"\x00")).digest()
    return U32(10) + th + U32(3) + b"ima" + digest + U32(len(name)) + name


def ima_sig(i: int) -> bytes:
    dng = b"sha256:\x00" + hashlib.sha256(b"s%d" % i).digest()
    return _record(b"ima-sig", _framed(dng, b"/bin/signed-%d\x00" % i, b"\x03\x02" + bytes(30)))


def unknown(i: int) -> bytes:
    return _record(b"my-template", b"opaque %d" % i, pcr=11)


def violation(i: int) -> bytes:
    dng = b"sha256:\x00" + bytes(20)
    return _record(b"ima-ng", _framed(dng, b"/tmp/open-for-write\x00"), violation=True)


MAKERS = (ima_ng, old_ima, ima_sig, unknown, violation)


def mixed(n: int, start: int = 0) -> list[bytes]:
    return [MAKERS[i % len(MAKERS)](i) for i in range(start, start + n)]


def _fields(e: ima.IMAEntry) -> tuple[object, ...]:
    return (
        e.index,
        e.pcr,
        e.template_hash,
        e.template_name,
        e.template_data,
        e.offset,
        e.line,
        e.ascii_fields,
    )


def test_binary_entries_are_those_parse_binary_decodes() -> None:
    records = mixed(50)
    data = b"".join(records)
    store = ima.IMAStore()
    done = store.append_binary(data)
    assert (done.entries, done.taken, done.error) == (50, len(data), None)
    assert data[done.last : done.taken] == records[-1]
    expected = ima.parse_binary(data).entries
    got = store.entries()
    assert len(got) == 50 and store.format == ima.BINARY
    assert [_fields(e) for e in got] == [_fields(e) for e in expected]
    assert got == list(expected)
    assert [e.to_bytes() for e in got] == records
    assert got[-1] == expected[-1] and got[7] == expected[7]
    assert all(type(e.template_name) is str for e in got)
    assert got[0].template_name is got[5].template_name  # interned


def test_a_store_replays_as_the_parsed_list() -> None:
    data = b"".join(mixed(40))
    store = ima.IMAStore()
    store.append_binary(data)
    expected = ima.parse_binary(data).replay(["sha1", "sha256"])
    assert replay(store.entries(), ["sha1", "sha256"]) == expected


def test_ascii_entries_are_those_parse_ascii_decodes() -> None:
    text = path("ima", KEYLIME).read_bytes()
    lines = text.split(b"\n")
    # A blank line in the middle: skipped, and the line numbers after it move on.
    text = b"\n".join([*lines[:3], b"", *lines[3:]])
    store = ima.IMAStore()
    done = store.append_ascii(text)
    expected = ima.parse_ascii(text).entries
    assert done.error is None and done.entries == len(expected) == len(store)
    assert done.lines == text.count(b"\n")
    assert store.format == ima.ASCII
    assert [_fields(e) for e in store.entries()] == [_fields(e) for e in expected]
    assert [e.line for e in store.entries()[2:5]] == [3, 5, 6]


def test_only_whole_records_are_taken_and_appends_continue_the_list() -> None:
    records = mixed(10)
    data = b"".join(records)
    store = ima.IMAStore()
    cut = len(b"".join(records[:4])) + 7
    first = store.append_binary(data[:cut])
    assert (first.entries, first.taken) == (4, cut - 7)
    with pytest.raises(ValueError, match="does not continue"):
        store.append_binary(data[first.taken :], offset=0, index=4)
    second = store.append_binary(data[first.taken :], offset=first.taken, index=4)
    assert second.entries == 6
    assert [e.index for e in store.entries()] == list(range(10))
    assert [e.offset for e in store.entries()] == [e.offset for e in ima.parse_binary(data)]
    with pytest.raises(ValueError, match="ascii records to a store of ima-binary"):
        store.append_ascii(b"", index=10)


def test_a_store_may_start_in_the_middle_of_a_list() -> None:
    records = mixed(8)
    head = b"".join(records[:3])
    store = ima.IMAStore()
    store.append_binary(b"".join(records[3:]), offset=len(head), index=3)
    entries = store.entries()
    assert [e.index for e in entries] == [3, 4, 5, 6, 7]
    assert entries[0].offset == len(head)
    assert [e.to_bytes() for e in entries] == records[3:]


def test_a_corrupt_record_keeps_the_ones_before_it() -> None:
    good = mixed(3)
    bad = bytearray(ima_ng(9))
    struct.pack_into("<I", bad, 0, 99)  # PCR out of range
    store = ima.IMAStore()
    done = store.append_binary(b"".join(good) + bytes(bad) + ima_ng(10))
    assert done.entries == 3 and done.taken == len(b"".join(good))
    assert isinstance(done.error, ParseError)
    assert done.error.offset == len(b"".join(good))
    assert len(store) == 3


def test_a_store_takes_a_bytearray_and_keeps_no_reference_to_it() -> None:
    buf = bytearray(b"".join(mixed(5)))
    store = ima.IMAStore()
    store.append_binary(buf)
    expected = list(store.entries())
    buf[:] = bytes(len(buf))
    del buf[:10]  # would fail with an export still alive
    assert list(store.entries()) == expected


def test_snapshots_do_not_change_with_later_appends_or_a_clear() -> None:
    records = mixed(30)
    store = ima.IMAStore()
    assert store.entries() == [] and len(store) == 0 and store.format is None
    empty = store.entries()
    taken = store.append_binary(b"".join(records[:10])).taken
    ten = store.entries()
    store.append_binary(b"".join(records[10:]), offset=taken, index=10)
    assert len(empty) == 0 and len(ten) == 10 and len(store.entries()) == 30
    assert ten.list_id == store.entries().list_id != empty.list_id
    store.clear()
    assert len(store) == 0 and store.next_index is None
    assert [e.to_bytes() for e in ten] == records[:10]
    store.append_binary(b"".join(records[:2]))
    assert store.entries().list_id != ten.list_id


def test_a_run_is_a_sequence() -> None:
    records = mixed(25)
    store = ima.IMAStore()
    store.append_binary(b"".join(records[:12]))
    store.append_binary(b"".join(records[12:]), offset=len(b"".join(records[:12])), index=12)
    entries = store.entries()
    expected = list(ima.parse_binary(b"".join(records)))
    assert entries[-1] == expected[-1] and entries[-25] == expected[0]
    with pytest.raises(IndexError):
        entries[25]
    with pytest.raises(IndexError):
        entries[-26]
    page = entries[10:15]  # across the two appends
    assert isinstance(page, ima.IMAEntries)
    assert list(page) == expected[10:15] and page == expected[10:15]
    assert page[1:3] == expected[11:13]
    assert entries[20:100] == expected[20:]
    assert entries[5:2] == []
    assert entries[::5] == expected[::5]
    assert list(reversed(entries)) == expected[::-1]
    assert expected[3] in entries
    assert entries.index(expected[13]) == 13
    assert entries != expected[:-1] and entries != "not a list"
    with pytest.raises(TypeError):
        hash(entries)


def test_memory_is_the_records_and_an_offset_per_entry() -> None:
    records = [ima_ng(i) for i in range(20_000)]
    data = b"".join(records)
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    store = ima.IMAStore()
    pending = b""
    offset = 0
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for chunk in chunks:
            pending += chunk
            done = store.append_binary(pending, offset=offset, index=len(store))
            offset += done.taken
            pending = pending[done.taken :]
        del pending, done
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(store) == 20_000
    # The records themselves, 8 bytes of offset each, and a little for the blocks.
    assert used < len(data) + 12 * len(records) + 64 * 1024, used
    # An IMAEntry per entry would be several hundred bytes each.
    assert used / len(records) < len(data) / len(records) + 16


def test_readers_on_other_threads_see_whole_entries_while_one_appends() -> None:
    records = mixed(3000)
    store = ima.IMAStore()
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                entries = store.entries()
                n = len(entries)
                if n:
                    assert entries[n - 1].index == n - 1
                    assert sum(1 for _ in entries[max(0, n - 50) :]) == min(n, 50)
        except BaseException as e:  # reported to the main thread
            errors.append(e)

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    offset = 0
    for i in range(0, len(records), 7):
        done = store.append_binary(b"".join(records[i : i + 7]), offset=offset, index=i)
        offset += done.taken
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert [e.to_bytes() for e in store.entries()] == records


def test_template_names_without_building_the_entries() -> None:
    data = b"".join(mixed(12))
    store = ima.IMAStore()
    store.append_binary(data)
    expected = [e.template_name for e in ima.parse_binary(data)]
    assert list(store.entries().template_names()) == expected
    assert list(store.entries()[3:9].template_names()) == expected[3:9]
    text = path("ima", KEYLIME).read_bytes()
    ascii_store = ima.IMAStore()
    ascii_store.append_ascii(text)
    assert list(ascii_store.entries().template_names()) == [
        e.template_name for e in ima.parse_ascii(text)
    ]
    assert list(ima.IMAStore().entries().template_names()) == []
