"""The runtime journal (DESIGN.md section 6): format, append, reconcile, damage, new epochs.

The file format is decoded here independently, from the layout documented in
:mod:`cima.agent.journal` (struct and zlib only), and register values are
recomputed with hashlib. Most tests use the in-memory software platform; the
tampering test extends a real swtpm PCR with tpm2-tools.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cima.agent.journal import (
    JOURNAL_FILE,
    Journal,
    JournalCorruptError,
    JournalMismatchError,
    JournalUnusableError,
)
from cima.errors import JournalError, PlatformError
from cima.eventlog.cel import from_json, to_json
from cima.eventlog.replay import replay
from cima.platform.base import Platform, Report
from cima.platform.software import SoftwarePlatform
from cima.platform.tpm import TPMPlatform
from tests.platform.swtpm import SWTPM

REG = "pcr13"
ALG = "sha256"
BOOT = uuid.UUID("11111111-2222-3333-4444-555555555555").bytes
OTHER_BOOT = uuid.UUID("99999999-2222-3333-4444-555555555555").bytes

# -- the documented format, decoded and encoded independently ----------------------------------

MAGIC = b"CIMAJNL\x00"
HEADER = 12
BEGIN, EVENT, COMMIT = 1, 2, 3
ALG_IDS = {"sha256": 0x000B, "sha384": 0x000C}


def rec(rtype: int, payload: bytes) -> bytes:
    head = struct.pack("<IB", len(payload), rtype)
    return head + payload + struct.pack("<I", zlib.crc32(head + payload))


def begin_payload(
    register: str, alg: str, start: bytes, boot: bytes = BOOT, epoch: int = 0
) -> bytes:
    reg = register.encode()
    return (
        struct.pack("<I16sQHB", epoch, boot, 0, ALG_IDS[alg], len(reg))
        + reg
        + bytes([len(start)])
        + start
    )


def event_payload(seq: int, content: bytes, key: bytes = b"k", alg: str = ALG) -> bytes:
    digest = hashlib.new(alg, content).digest()
    return struct.pack("<QBH", seq, len(digest), len(key)) + digest + key + content


def content_bytes(i: int, pad: int = 0) -> bytes:
    obj = {"data": {"i": i, "pad": "x" * pad}, "kind": "marker", "scope": "node", "subject": "t"}
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Decoded:
    """One record as the documented layout says: offset, type, payload."""

    offset: int
    rtype: int
    payload: bytes


def decode_file(data: bytes) -> list[Decoded]:
    assert data[:8] == MAGIC and struct.unpack_from("<I", data, 8) == (1,)
    out = []
    pos = HEADER
    while pos < len(data):
        length, rtype = struct.unpack_from("<IB", data, pos)
        end = pos + 5 + length + 4
        (crc,) = struct.unpack_from("<I", data, end - 4)
        assert crc == zlib.crc32(data[pos : end - 4])
        out.append(Decoded(pos, rtype, data[pos + 5 : end - 4]))
        pos = end
    assert pos == len(data)
    return out


def chain(alg: str, start: bytes, digests: list[bytes]) -> bytes:
    value = start
    for d in digests:
        value = hashlib.new(alg, value + d).digest()
    return value


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def platform() -> SoftwarePlatform:
    return SoftwarePlatform(algorithms=("sha256", "sha384"))


def open_journal(directory: Path, platform: Platform, **kw: Any) -> Journal:
    kw.setdefault("boot_id", BOOT)
    return Journal.open(directory, platform=platform, register=REG, algorithm=ALG, **kw)


@pytest.fixture
def journal(tmp_path: Path, platform: SoftwarePlatform) -> Iterator[Journal]:
    j = open_journal(tmp_path / "j", platform)
    yield j
    j.close()


def fill(j: Journal, n: int) -> None:
    for i in range(n):
        j.append(kind="marker", scope="node", subject="t", data={"i": i})


class Interrupt(BaseException):
    """Stands for the process dying at that point."""


class Wrapped(Platform):
    """A platform that delegates to another and fails where told to (or reads a fixed value)."""

    name = "software"

    def __init__(
        self,
        inner: Platform,
        *,
        extend_mode: str = "ok",
        read_fails: bool = False,
        register_value: bytes | None = None,
    ):
        self.inner = inner
        self.extend_mode = extend_mode
        self.read_fails = read_fails
        self.register_value = register_value

    def info(self) -> dict[str, Any]:
        return self.inner.info()

    def default_algorithm(self) -> str:
        return self.inner.default_algorithm()

    def algorithms(self) -> list[str]:
        return self.inner.algorithms()

    def register_names(self) -> list[str]:
        return self.inner.register_names()

    def read(self, register: str, algorithm: str) -> bytes:
        if self.read_fails:
            raise PlatformError("read failed (test)")
        if self.register_value is not None:
            return self.register_value
        return self.inner.read(register, algorithm)

    def extend(self, register: str, algorithm: str, digest: bytes) -> None:
        mode = self.extend_mode
        if mode in ("extend-then-fail", "extend-then-die"):
            self.inner.extend(register, algorithm, digest)
        if mode == "fail" or mode == "extend-then-fail":
            raise PlatformError("extend failed (test)")
        if mode in ("die", "extend-then-die"):
            raise Interrupt
        if mode == "ok":
            self.inner.extend(register, algorithm, digest)

    def boot_log(self) -> None:
        return None

    def report(self, nonce: bytes, user_data: bytes = b"", registers: Any = None) -> Report:
        return self.inner.report(nonce, user_data, registers)


# -- creating, appending, reopening ------------------------------------------------------------


def test_new_journal(journal: Journal, platform: SoftwarePlatform) -> None:
    assert journal.recovery.created and len(journal) == 0
    assert journal.start_value == bytes(32)
    assert (journal.register, journal.algorithm) == (REG, ALG)
    records = decode_file(journal.path.read_bytes())
    assert [r.rtype for r in records] == [BEGIN]
    p = records[0].payload
    epoch, boot, _created, alg_id, reg_len = struct.unpack_from("<I16sQHB", p)
    assert (epoch, boot, alg_id, p[31 : 31 + reg_len]) == (0, BOOT, 0x000B, b"pcr13")
    assert p[31 + reg_len] == 32 and p[32 + reg_len :] == bytes(32)


def test_append_extends_what_it_journals(journal: Journal, platform: SoftwarePlatform) -> None:
    data = {"pid": 7, "cmdline": ["/usr/bin/x", "--flag"], "name": "é"}
    event = journal.append(kind="process", scope="node", subject="/usr/bin/x", data=data)
    content = {"kind": "process", "scope": "node", "subject": "/usr/bin/x", "data": data}
    assert event.digest == hashlib.sha256(canonical(content)).digest()
    assert event.content == content and event.seq == 0
    assert platform.read(REG, ALG) == chain(ALG, bytes(32), [event.digest])
    # On disk: EVENT (seq 0, digest, key, the canonical content) then COMMIT (seq 0).
    records = decode_file(journal.path.read_bytes())
    assert [r.rtype for r in records] == [BEGIN, EVENT, COMMIT]
    key = b"process:node:/usr/bin/x"
    assert records[1].payload == struct.pack("<QBH", 0, 32, len(key)) + event.digest + key + (
        canonical(content)
    )
    assert records[2].payload == struct.pack("<Q", 0)


def test_reopen_gives_the_same_events(tmp_path: Path, platform: SoftwarePlatform) -> None:
    with open_journal(tmp_path, platform) as j:
        fill(j, 25)
        before = j.events()
    with open_journal(tmp_path, platform) as j:
        assert j.recovery.clean and j.events() == before
        assert [e.seq for e in j.events()] == list(range(25))
        assert j.value == platform.read(REG, ALG) == chain(ALG, bytes(32), j.digests())
        assert j.events(20, 3) == before[20:23]
        assert j.events(24, 10) == before[24:]
        assert j.events(30) == []
        assert list(j) == before
        j.check()


def test_key_and_fingerprints(journal: Journal) -> None:
    e = journal.append(kind="marker", scope="node", subject="s", data={}, key="custom:1")
    journal.append(kind="marker", scope="node", subject="s", data={"a": 1})
    assert list(journal.fingerprints()) == [
        ("custom:1", e.digest),
        ("marker:node:s", journal.digests()[1]),
    ]
    assert [x.key for x in journal.entries()] == ["custom:1", "marker:node:s"]


def test_cel_export_replays_to_the_register(journal: Journal, platform: SoftwarePlatform) -> None:
    fill(journal, 10)
    records = from_json(to_json(journal.to_cel()))
    assert replay(records).get(REG, ALG) == platform.read(REG, ALG)
    assert [r.content for r in records] == [e.content for e in journal.events()]


def test_non_json_data_touches_nothing(journal: Journal) -> None:
    size = journal.path.stat().st_size
    with pytest.raises(TypeError):
        journal.append(kind="marker", scope="node", subject="t", data={"x": object()})
    assert journal.path.stat().st_size == size and len(journal) == 0


def test_lock(tmp_path: Path, platform: SoftwarePlatform) -> None:
    with open_journal(tmp_path, platform), pytest.raises(JournalError, match="in use"):
        open_journal(tmp_path, platform)
    open_journal(tmp_path, platform).close()


# -- crash points, simulated in-process ---------------------------------------------------------


def test_death_before_extend_drops_pending(tmp_path: Path, platform: SoftwarePlatform) -> None:
    with open_journal(tmp_path, platform) as j:
        fill(j, 3)
        size = j.path.stat().st_size
    j = open_journal(tmp_path, Wrapped(platform, extend_mode="die"))
    with pytest.raises(Interrupt):
        fill(j, 1)
    with pytest.raises(JournalUnusableError):
        fill(j, 1)
    j.close()
    assert j.path.stat().st_size > size  # the pending record is on disk
    with open_journal(tmp_path, platform) as j:
        assert j.recovery.dropped_seq == 3 and j.recovery.committed_seq is None
        assert len(j) == 3 and j.path.stat().st_size == size
        j.check()
        fill(j, 1)
        assert len(j) == 4


def test_death_after_extend_commits_pending(tmp_path: Path, platform: SoftwarePlatform) -> None:
    with open_journal(tmp_path, platform) as j:
        fill(j, 3)
    j = open_journal(tmp_path, Wrapped(platform, extend_mode="extend-then-die"))
    with pytest.raises(Interrupt):
        fill(j, 1)
    j.close()
    with open_journal(tmp_path, platform) as j:
        assert j.recovery.committed_seq == 3 and j.recovery.dropped_seq is None
        assert len(j) == 4 and j.value == platform.read(REG, ALG)
        assert [r.rtype for r in decode_file(j.path.read_bytes())][-2:] == [EVENT, COMMIT]


def test_failed_extend_is_dropped_and_reported(tmp_path: Path, platform: SoftwarePlatform) -> None:
    wrapped = Wrapped(platform, extend_mode="fail")
    with open_journal(tmp_path, wrapped) as j:
        fill(j, 0)
        size = j.path.stat().st_size
        with pytest.raises(PlatformError, match="extend failed"):
            fill(j, 1)
        assert len(j) == 0 and j.path.stat().st_size == size and j.healthy
        wrapped.extend_mode = "ok"
        fill(j, 2)
        assert j.value == platform.read(REG, ALG)


def test_failed_extend_that_happened_is_committed(
    tmp_path: Path, platform: SoftwarePlatform
) -> None:
    with open_journal(tmp_path, Wrapped(platform, extend_mode="extend-then-fail")) as j:
        event = j.append(kind="marker", scope="node", subject="t", data={})
        assert len(j) == 1 and j.value == platform.read(REG, ALG)
        assert j.digests() == [event.digest]


def test_failed_extend_with_unreadable_register(tmp_path: Path, platform: SoftwarePlatform) -> None:
    wrapped = Wrapped(platform, extend_mode="fail")
    j = open_journal(tmp_path, wrapped)
    wrapped.read_fails = True
    with pytest.raises(JournalUnusableError, match="could not be read"):
        fill(j, 1)
    wrapped.read_fails = False
    wrapped.extend_mode = "ok"
    with pytest.raises(JournalUnusableError):
        fill(j, 1)
    assert not j.healthy
    j.close()
    with open_journal(tmp_path, platform) as j:
        assert j.recovery.dropped_seq == 0 and len(j) == 0


# -- torn last records -------------------------------------------------------------------------


def _append_raw(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


TORN_CUTS = [
    ("header-only", 3),
    ("header-complete", 5),
    ("inside-payload", 40),
    ("crc-missing", -4),
    ("crc-half", -2),
]


@pytest.mark.parametrize(("name", "cut"), TORN_CUTS, ids=[c[0] for c in TORN_CUTS])
def test_torn_event_is_truncated(
    tmp_path: Path, platform: SoftwarePlatform, name: str, cut: int
) -> None:
    with open_journal(tmp_path, platform) as j:
        fill(j, 4)
        before = j.events()
    path = tmp_path / JOURNAL_FILE
    size = path.stat().st_size
    torn = rec(EVENT, event_payload(4, content_bytes(4)))[:cut]
    _append_raw(path, torn)
    with open_journal(tmp_path, platform) as j:
        assert (j.recovery.torn_offset, j.recovery.torn_bytes) == (size, len(torn))
        assert j.recovery.dropped_seq is None and j.events() == before
        assert path.stat().st_size == size


def test_last_record_with_bad_crc_is_torn(tmp_path: Path, platform: SoftwarePlatform) -> None:
    with open_journal(tmp_path, platform) as j:
        fill(j, 2)
    path = tmp_path / JOURNAL_FILE
    size = path.stat().st_size
    bad = bytearray(rec(EVENT, event_payload(2, content_bytes(2))))
    bad[20] ^= 0x40
    _append_raw(path, bytes(bad))
    with open_journal(tmp_path, platform) as j:
        assert j.recovery.torn_offset == size and len(j) == 2


def test_zero_filled_tail_is_torn(tmp_path: Path, platform: SoftwarePlatform) -> None:
    with open_journal(tmp_path, platform) as j:
        fill(j, 2)
    path = tmp_path / JOURNAL_FILE
    size = path.stat().st_size
    _append_raw(path, bytes(4096))
    with open_journal(tmp_path, platform) as j:
        assert (j.recovery.torn_offset, j.recovery.torn_bytes) == (size, 4096)


def test_torn_commit_of_extended_event(tmp_path: Path, platform: SoftwarePlatform) -> None:
    with open_journal(tmp_path, platform) as j:
        fill(j, 2)
    path = tmp_path / JOURNAL_FILE
    payload = event_payload(2, content_bytes(2))
    event_offset = path.stat().st_size
    _append_raw(path, rec(EVENT, payload))
    platform.extend(REG, ALG, payload[11 : 11 + 32])
    commit = rec(COMMIT, struct.pack("<Q", 2))
    _append_raw(path, commit[:7])
    with open_journal(tmp_path, platform) as j:
        r = j.recovery
        assert (r.torn_offset, r.torn_bytes, r.committed_seq) == (
            event_offset + len(rec(EVENT, payload)),
            7,
            2,
        )
        assert len(j) == 3 and j.value == platform.read(REG, ALG)
    assert [r.rtype for r in decode_file(path.read_bytes())][-2:] == [EVENT, COMMIT]


# -- damage that is not a torn write: loud, and nothing modified -------------------------------


def _build(records: list[bytes], start: bytes = bytes(32)) -> bytes:
    return (
        MAGIC
        + struct.pack("<I", 1)
        + rec(BEGIN, begin_payload(REG, ALG, start))
        + b"".join(records)
    )


def _pair(seq: int, content_seq: int | None = None) -> list[bytes]:
    c = content_bytes(seq if content_seq is None else content_seq)
    return [rec(EVENT, event_payload(seq, c)), rec(COMMIT, struct.pack("<Q", seq))]


def _flip(record: bytes, at: int) -> bytes:
    b = bytearray(record)
    b[at] ^= 0x01
    return bytes(b)


OFFSET_1 = HEADER + len(rec(BEGIN, begin_payload(REG, ALG, bytes(32))))

# (name, records after BEGIN, index of the offending record)
CORRUPT = [
    ("bad-crc-in-middle", [*_pair(0), _flip(_pair(1)[0], 30), _pair(1)[1], *_pair(2)], 2),
    ("bad-crc-commit-in-middle", [_pair(0)[0], _flip(_pair(0)[1], 6), *_pair(1)], 1),
    ("seq-gap", [*_pair(0), *_pair(2)], 2),
    ("seq-starts-at-1", [*_pair(1)], 0),
    ("commit-without-event", [*_pair(0), rec(COMMIT, struct.pack("<Q", 1))], 2),
    ("commit-of-other-seq", [_pair(0)[0], rec(COMMIT, struct.pack("<Q", 5))], 1),
    ("two-pending-events", [_pair(0)[0], *_pair(0)], 1),
    ("second-begin", [*_pair(0), rec(BEGIN, begin_payload(REG, ALG, bytes(32)))], 2),
    ("unknown-type", [*_pair(0), rec(9, b"xyz"), *_pair(1)], 2),
    (
        "content-not-digest",
        [
            rec(EVENT, event_payload(0, content_bytes(0))[:11] + bytes(32) + b"k" + b"{}"),
            rec(COMMIT, struct.pack("<Q", 0)),
        ],
        0,
    ),
    (
        "digest-size",
        [rec(EVENT, struct.pack("<QBH", 0, 20, 0) + bytes(20) + b"{}"), *_pair(0)[1:]],
        0,
    ),
    ("huge-length", [*_pair(0), struct.pack("<IB", 0x7FFFFFFF, EVENT) + b"x" * 64], 2),
]


@pytest.mark.parametrize(("name", "records", "bad"), CORRUPT, ids=[c[0] for c in CORRUPT])
def test_damage_is_a_journal_error(
    tmp_path: Path, platform: SoftwarePlatform, name: str, records: list[bytes], bad: int
) -> None:
    data = _build(records)
    (tmp_path / JOURNAL_FILE).write_bytes(data)
    with pytest.raises(JournalCorruptError) as info:
        open_journal(tmp_path, platform)
    assert info.value.offset == OFFSET_1 + sum(len(r) for r in records[:bad])
    assert (tmp_path / JOURNAL_FILE).read_bytes() == data


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("bad-magic", b"NOTAJNL\x00" + struct.pack("<I", 1)),
        ("bad-version", MAGIC + struct.pack("<I", 7)),
        ("short-header", MAGIC),
        (
            "begin-torn",
            MAGIC + struct.pack("<I", 1) + rec(BEGIN, begin_payload(REG, ALG, bytes(32)))[:9],
        ),
        ("first-not-begin", MAGIC + struct.pack("<I", 1) + _pair(0)[0]),
    ],
)
def test_bad_header_is_a_journal_error(
    tmp_path: Path, platform: SoftwarePlatform, name: str, data: bytes
) -> None:
    (tmp_path / JOURNAL_FILE).write_bytes(data)
    with pytest.raises(JournalCorruptError):
        open_journal(tmp_path, platform)


def test_journal_for_another_register(tmp_path: Path, platform: SoftwarePlatform) -> None:
    open_journal(tmp_path, platform).close()
    with pytest.raises(JournalError, match="pcr13/sha256, not pcr16/sha256"):
        Journal.open(tmp_path, platform=platform, register="pcr16", algorithm=ALG, boot_id=BOOT)


def test_file_changed_under_the_agent(journal: Journal) -> None:
    fill(journal, 3)
    data = bytearray(journal.path.read_bytes())
    data[-30] ^= 1  # inside the last event's content
    journal.path.write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError, match="changed under the agent"):
        journal.events()


# -- the register does not agree ---------------------------------------------------------------


def test_register_extended_by_someone_else(tmp_path: Path, platform: SoftwarePlatform) -> None:
    with open_journal(tmp_path, platform) as j:
        fill(j, 3)
        expected = j.value
    platform.extend(REG, ALG, hashlib.sha256(b"intruder").digest())
    actual = platform.read(REG, ALG)
    with pytest.raises(JournalMismatchError) as info:
        open_journal(tmp_path, platform)
    e = info.value
    assert (e.actual, e.expected) == (actual, (expected,))
    assert actual.hex() in str(e) and expected.hex() in str(e)


def test_register_differs_from_both_explanations(
    tmp_path: Path, platform: SoftwarePlatform
) -> None:
    with open_journal(tmp_path, platform) as j:
        fill(j, 2)
        v0 = j.value
    path = tmp_path / JOURNAL_FILE
    pending_offset = path.stat().st_size
    payload = event_payload(2, content_bytes(2))
    _append_raw(path, rec(EVENT, payload))
    platform.extend(REG, ALG, bytes(32))
    with pytest.raises(JournalMismatchError) as info:
        open_journal(tmp_path, platform)
    v1 = chain(ALG, v0, [payload[11:43]])
    assert info.value.expected == (v0, v1)
    assert f"offset {pending_offset}" in str(info.value)


def test_check_after_tampering(journal: Journal, platform: SoftwarePlatform) -> None:
    fill(journal, 2)
    journal.check()
    platform.extend(REG, ALG, bytes(32))
    with pytest.raises(JournalMismatchError):
        journal.check()
    with pytest.raises(JournalUnusableError):
        fill(journal, 1)


def test_tampering_with_tpm2_tools(swtpm: SWTPM, tmp_path: Path) -> None:
    tpm = TPMPlatform(swtpm.tcti)
    try:
        j = Journal.open(tmp_path, platform=tpm, register="pcr16", algorithm="sha384")
        for i in range(3):
            j.append(kind="marker", scope="node", subject="t", data={"i": i})
        j.check()
        expected = j.value
        j.close()
    finally:
        tpm.close()
    done = subprocess.run(
        ["tpm2_pcrextend", "16:sha384=" + "ab" * 48],
        env=swtpm.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    tpm = TPMPlatform(swtpm.tcti)
    try:
        with pytest.raises(JournalMismatchError) as info:
            Journal.open(tmp_path, platform=tpm, register="pcr16", algorithm="sha384")
        assert info.value.actual == chain("sha384", expected, [bytes.fromhex("ab" * 48)])
    finally:
        tpm.close()


def test_no_journal_for_an_extended_register(tmp_path: Path, platform: SoftwarePlatform) -> None:
    platform.extend(REG, ALG, hashlib.sha256(b"earlier").digest())
    with pytest.raises(JournalMismatchError, match="no journal"):
        open_journal(tmp_path, platform)
    assert not (tmp_path / JOURNAL_FILE).exists()
    with open_journal(tmp_path, platform, adopt=True) as j:
        assert j.start_value == platform.read(REG, ALG)
        fill(j, 2)
        assert platform.read(REG, ALG) == chain(ALG, j.start_value, j.digests())


# -- new epochs --------------------------------------------------------------------------------


def test_register_reset_starts_a_new_epoch(tmp_path: Path, platform: SoftwarePlatform) -> None:
    with open_journal(tmp_path, platform) as j:
        fill(j, 5)
        old = j.events()
    fresh = SoftwarePlatform()  # a platform reset: the register is back at zero
    with open_journal(tmp_path, fresh) as j:
        r = j.recovery
        assert r.new_epoch and not r.boot_changed and r.archived is not None
        assert j.epoch == 1 and len(j) == 0 and j.start_value == bytes(32)
        assert "reset" in r.notes[0]
        archived = decode_file(r.archived.read_bytes())
        assert [x.rtype for x in archived].count(COMMIT) == len(old)
        fill(j, 1)
    with open_journal(tmp_path, fresh) as j:
        assert j.recovery.clean and len(j) == 1 and j.epoch == 1


def test_new_boot_starts_a_new_epoch(tmp_path: Path, platform: SoftwarePlatform) -> None:
    with open_journal(tmp_path, platform) as j:
        fill(j, 2)
    with open_journal(tmp_path, SoftwarePlatform(), boot_id=OTHER_BOOT) as j:
        assert j.recovery.new_epoch and j.recovery.boot_changed
        assert j.boot_id == OTHER_BOOT and len(j) == 0


def test_new_boot_with_surviving_register_continues(
    tmp_path: Path, platform: SoftwarePlatform
) -> None:
    with open_journal(tmp_path, platform) as j:
        fill(j, 2)
    with open_journal(tmp_path, platform, boot_id=OTHER_BOOT) as j:
        assert j.recovery.boot_changed and not j.recovery.new_epoch
        assert len(j) == 2 and j.epoch == 0


def test_new_boot_with_unexplained_register(tmp_path: Path, platform: SoftwarePlatform) -> None:
    with open_journal(tmp_path, platform) as j:
        fill(j, 2)
    other = SoftwarePlatform()
    other.extend(REG, ALG, hashlib.sha256(b"not ours").digest())
    with pytest.raises(JournalMismatchError, match="boot id changed"):
        open_journal(tmp_path, other, boot_id=OTHER_BOOT)


def test_software_platform_state_survives(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with open_journal(tmp_path / "j", SoftwarePlatform(state)) as j:
        fill(j, 3)
    with open_journal(tmp_path / "j", SoftwarePlatform(state)) as j:
        assert j.recovery.clean and len(j) == 3


# -- robustness and size -----------------------------------------------------------------------


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.data())
def test_mutated_journal_gives_journal_or_journal_error(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    directory = tmp_path_factory.mktemp("mut")
    records = [r for i in range(4) for r in _pair(i)]
    raw = bytearray(_build(records))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    (directory / JOURNAL_FILE).write_bytes(bytes(raw[:cut]))
    platform = SoftwarePlatform()
    for d in [hashlib.sha256(content_bytes(i)).digest() for i in range(4)]:
        platform.extend(REG, ALG, d)
    try:
        j = open_journal(directory, platform)
    except JournalError:
        return
    try:
        assert j.value == platform.read(REG, ALG)
        assert j.events() is not None
    finally:
        j.close()


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def _rss_growth(action: Any) -> int:
    """Bytes by which the peak resident set grows while ``action`` runs (in a forked child)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports and exits
        code = 0
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            before = _kib("VmRSS")
            action()
            os.write(w, str((_kib("VmHWM") - before) * 1024).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    try:
        data = os.read(r, 64)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data
    return int(data)


def test_hundred_thousand_events_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 100_000
    parts = [MAGIC, struct.pack("<I", 1), rec(BEGIN, begin_payload(REG, ALG, bytes(32)))]
    value = bytes(32)
    for i in range(n):
        c = content_bytes(i, pad=200)
        payload = event_payload(i, c, key=f"k:{i}".encode())
        parts += [rec(EVENT, payload), rec(COMMIT, struct.pack("<Q", i))]
        value = hashlib.sha256(value + payload[11:43]).digest()
    (tmp_path / JOURNAL_FILE).write_bytes(b"".join(parts))
    del parts
    # A register holding the value those 100,000 extends give (computed above).
    platform = Wrapped(SoftwarePlatform(), register_value=value)
    start = time.perf_counter()
    j = open_journal(tmp_path, platform)
    load = time.perf_counter() - start
    try:
        assert len(j) == n and j.recovery.clean
        start = time.perf_counter()
        count = sum(1 for _ in j)
        read = time.perf_counter() - start
        assert count == n
    finally:
        j.close()
    peak = _rss_growth(lambda: open_journal(tmp_path, platform).close())
    size = (tmp_path / JOURNAL_FILE).stat().st_size
    with capsys.disabled():
        print(
            f"\n[journal] {n} events ({size / 1e6:.1f} MB): open+reconcile {load:.2f} s, "
            f"peak resident memory growth {peak / 1e6:.1f} MB, read back {read:.2f} s"
        )
    assert load < 15
    assert peak < 32 * 1024 * 1024


def test_append_latency_software(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with open_journal(tmp_path, SoftwarePlatform()) as j:
        start = time.perf_counter()
        fill(j, 200)
        per = (time.perf_counter() - start) / 200
    with capsys.disabled():
        print(f"\n[journal] append (fdatasync + in-memory extend): {per * 1e3:.3f} ms")
    assert per < 0.1


def test_append_latency_swtpm(
    swtpm: SWTPM, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tpm = TPMPlatform(swtpm.tcti)
    try:
        with Journal.open(tmp_path, platform=tpm, register=REG, algorithm=ALG) as j:
            start = time.perf_counter()
            fill(j, 200)
            per = (time.perf_counter() - start) / 200
            j.check()
            assert tpm.read(REG, ALG) == chain(ALG, bytes(32), j.digests())
    finally:
        tpm.close()
    with capsys.disabled():
        print(f"\n[journal] append (fdatasync + swtpm PCR_Extend): {per * 1e3:.3f} ms")
    assert per < 0.1


def test_os_errors_are_journal_errors(tmp_path: Path, platform: SoftwarePlatform) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(JournalError):
        open_journal(tmp_path / "file" / "j", platform)
