"""The engine's IMA list: kept as records, served as snapshots, attributed once per list.

Binary records are assembled here with struct and hashlib (``ima_fs.c``
``ima_measurements_show``); the ``ima-cgpath`` ones name a container's cgroup.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from cima.agent.engine import Engine
from cima.agent.journal import Journal
from cima.agent.policy import parse_policy
from cima.agent.views import IMAAttribution, View, ima_owner, ima_view, iter_ima_view
from cima.eventlog import ima
from cima.platform.ima import IMAReader
from cima.platform.software import SoftwarePlatform

U32 = struct.Struct("<I").pack
A = "a" * 64
B = "b" * 64


def _framed(*fields: bytes) -> bytes:
    return b"".join(U32(len(f)) + f for f in fields)


def _record(name: bytes, data: bytes) -> bytes:
    return U32(10) + hashlib.sha1(data).digest() + U32(len(name)) + name + U32(len(data)) + data


def host_record(i: int) -> bytes:
    dng = b"sha256:\x00" + hashlib.sha256(b"%d" % i).digest()
    return _record(b"ima-ng", _framed(dng, b"/usr/bin/tool-%d\x00" % i))


def container_record(i: int, container: str) -> bytes:
    dng = b"sha256:\x00" + hashlib.sha256(b"c%d" % i).digest()
    cgroup = f"/kubepods/burstable/pod1234/{container}\x00".encode()
    return _record(
        b"ima-cgpath", _framed(b"/usr/bin/runc\x00", cgroup, dng, b"/app/file-%d\x00" % i)
    )


@pytest.fixture
def platform() -> SoftwarePlatform:
    return SoftwarePlatform(algorithms=("sha256",))


@pytest.fixture
def journal(tmp_path: Path, platform: SoftwarePlatform) -> Iterator[Journal]:
    j = Journal.open(tmp_path / "journal", platform=platform, register="pcr13", algorithm="sha256")
    yield j
    j.close()


def _engine(journal: Journal, platform: SoftwarePlatform, reader: IMAReader) -> Engine:
    policy = parse_policy("backend: ima\nhashAlgorithm: sha256\n")
    return Engine(policy, platform, journal, ima=reader)


def test_ima_entries_are_snapshots_of_the_list_read(
    tmp_path: Path, journal: Journal, platform: SoftwarePlatform
) -> None:
    list_path = tmp_path / "binary_runtime_measurements"
    records = [host_record(i) for i in range(300)]
    list_path.write_bytes(b"".join(records[:200]))
    with IMAReader(list_path, chunk_size=1000) as reader:
        engine = _engine(journal, platform, reader)
        assert len(engine.ima_entries()) == 0
        engine.poll()
        first = engine.ima_entries()
        assert isinstance(first, ima.IMAEntries) and len(first) == 200
        list_path.write_bytes(b"".join(records))
        assert engine.refresh_ima() == 100
        assert engine.refresh_ima() == 0
        assert len(first) == 200  # a snapshot stays as it was taken
        entries = engine.ima_entries()
    assert [e.to_bytes() for e in entries] == records
    assert entries == list(ima.parse_binary(b"".join(records)))
    assert [e.index for e in entries[195:205]] == list(range(195, 205))


def test_a_corrupt_record_keeps_what_came_before(
    tmp_path: Path, journal: Journal, platform: SoftwarePlatform
) -> None:
    list_path = tmp_path / "binary_runtime_measurements"
    bad = bytearray(host_record(9))
    struct.pack_into("<I", bad, 0, 77)  # PCR out of range
    list_path.write_bytes(b"".join(host_record(i) for i in range(3)) + bytes(bad))
    with IMAReader(list_path) as reader:
        engine = _engine(journal, platform, reader)
        engine.poll()
        assert len(engine.ima_entries()) == 3
        assert engine.refresh_ima() == 0  # logged, and the entries stay
        assert len(engine.ima_entries()) == 3


def test_a_reset_list_is_read_again_and_attributed_again(
    tmp_path: Path, journal: Journal, platform: SoftwarePlatform
) -> None:
    list_path = tmp_path / "binary_runtime_measurements"
    old = [host_record(0), container_record(1, A)]
    list_path.write_bytes(b"".join(old))
    attribution = IMAAttribution()
    with IMAReader(list_path, on_reset="restart") as reader:
        engine = _engine(journal, platform, reader)
        engine.poll()
        assert list(attribution.owners(engine.ima_entries())) == [None, A]
        # A new boot's list, already longer than the old one: not a continuation of it.
        new = [host_record(0), container_record(1, B), container_record(2, A)]
        list_path.write_bytes(b"")
        engine.poll()
        list_path.write_bytes(b"".join(new))
        engine.poll()
        entries = engine.ima_entries()
    assert [e.to_bytes() for e in entries] == new
    assert list(attribution.owners(entries)) == [None, B, A]
    assert list(attribution.owners(entries[:2])) == [None, B]


def test_a_view_of_a_snapshot_one_entry_at_a_time(
    tmp_path: Path, journal: Journal, platform: SoftwarePlatform
) -> None:
    list_path = tmp_path / "binary_runtime_measurements"
    records = [container_record(i, A if i % 2 else B) for i in range(40)]
    list_path.write_bytes(b"".join(records))
    with IMAReader(list_path) as reader:
        engine = _engine(journal, platform, reader)
        engine.poll()
    entries = engine.ima_entries()
    owners = IMAAttribution().owners(entries)
    assert list(owners) == [ima_owner(e) for e in entries]
    view = View(f"container:{A}", full=False)
    lazy = iter_ima_view(view, entries, owners, algorithms=["sha1", "sha256"])
    assert not isinstance(lazy, list)
    shown = list(lazy)
    assert shown == ima_view(view, entries, owners, algorithms=["sha1", "sha256"])
    assert [isinstance(s, ima.IMAEntry) for s in shown] == [i % 2 == 1 for i in range(40)]
