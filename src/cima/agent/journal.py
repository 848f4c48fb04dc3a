"""The runtime journal: the agent's events, written before they are extended (DESIGN.md section 6).

Every event the agent measures is appended here first and then extended into
the runtime register, so that the journal always explains the register:
replaying the journal's committed events from its start value gives the
register's value. A verifier replays the served events (as CEL) the same way.

Append
------
1. write the event record (it is *pending*: no commit follows it yet) and
   ``fdatasync`` the file;
2. extend the register with the event's digest;
3. write the commit record. The commit is not synced on its own: it becomes
   durable with the next event's sync or at :meth:`Journal.close`. A commit
   lost in a crash is recovered at the next open, because the register then
   includes the pending event (step 1 was synced before step 2 started).

Reconcile (at every open)
-------------------------
The file is read record by record (each framed with its length and a CRC32)
and the register is read from the platform. Let ``V0`` be the replay of the
start value and the committed events, and ``V1`` that of ``V0`` and the
pending last event, if there is one.

- a torn last record (cut short, or its CRC does not match and nothing but
  zeros follows) is the trace of a write that never finished: it is truncated
  and reported. Its extend never started (extends follow a completed sync);
- register = ``V0``: a pending last event was never extended; it is dropped
  (truncated) and reported;
- register = ``V1``: the pending last event was extended but its commit was
  not written; the commit is written and reported;
- register at its reset value (zeros; PCR 17-22 also all ones), while ``V0``
  is not, or the boot id differs: the register is provably fresh (no extend
  reaches a reset value) and the journal belongs to an earlier boot of the
  platform (a reboot, or a TPM restarted). The file is archived as
  ``journal.<epoch>.cima`` and a new epoch begins from the reset value; this
  is reported. A changed boot id alone never starts an epoch: a software
  platform keeps its registers across reboots, and then the journal simply
  continues;
- anything else is a :class:`JournalError` that says what differs: the
  register against ``V0`` (and ``V1``), where the journal ends; or a damaged
  record before the last (a CRC mismatch followed by more records), a gap in
  the sequence numbers, a commit without its event, two uncommitted events.
  Nothing is modified then, and the agent must not serve views it cannot
  prove.

A new journal is only started against a register at its reset value (or one
named explicitly with ``adopt=True``, whose start value a verifier must then
be told): a register already extended with no journal to explain it cannot be
proved.

File format (``journal.cima``, little-endian)
---------------------------------------------
::

    header   : magic "CIMAJNL\\0" (8 bytes), version u32 (= 1)
    record   : length u32 (of the payload), type u8, payload, crc32 u32
               (the CRC-32 of zlib over length, type and payload)
    BEGIN  1 : epoch u32, boot id (16 bytes, the UUID of
               /proc/sys/kernel/random/boot_id), created u64 (ns since the epoch),
               algorithm u16 (TPM_ALG_ID), register name length u8, register
               name (ASCII), start value length u8, start value
    EVENT  2 : seq u64, digest length u8, key length u16, digest, key (UTF-8),
               content (the rest: the canonical JSON that the digest hashes,
               see :mod:`cima.agent.events`)
    COMMIT 3 : seq u64

The first record is BEGIN; then EVENT/COMMIT pairs with seq 0, 1, 2, ...
The key is the engine's change-detection key; it is not measured.

Memory: the journal keeps, per committed event, its file offset (8 bytes) and
its digest; contents are read back from the file when asked for
(:meth:`Journal.events`), and checked against the digest again then.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hmac
import json
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cima.agent.events import RuntimeEvent, canonical, event_content
from cima.digests import HashAlgorithm, by_id, by_name
from cima.errors import AlgorithmError, JournalError, PlatformError
from cima.eventlog.cel import CELRecord
from cima.platform.base import Platform
from cima.registers import check_name

__all__ = [
    "BOOT_ID_PATH",
    "JOURNAL_FILE",
    "Journal",
    "JournalCorruptError",
    "JournalEntry",
    "JournalMismatchError",
    "JournalRecovery",
    "JournalUnusableError",
    "read_boot_id",
    "reset_values",
]

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.cima"
LOCK_FILE = ".lock"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")

MAGIC = b"CIMAJNL\x00"
VERSION = 1
BEGIN, EVENT, COMMIT = 1, 2, 3
_TYPE_NAMES = {BEGIN: "BEGIN", EVENT: "EVENT", COMMIT: "COMMIT"}

_HEADER = struct.Struct("<8sI")  # magic, version
_HEAD = struct.Struct("<IB")  # payload length, record type
_CRC = struct.Struct("<I")
_BEGIN = struct.Struct("<I16sQHB")  # epoch, boot id, created ns, TPM_ALG_ID, register length
_EVENT = struct.Struct("<QBH")  # seq, digest length, key length
_COMMIT = struct.Struct("<Q")  # seq
_FRAME = _HEAD.size + _CRC.size

#: No record the agent writes is larger; a larger length field is damage, not a record.
MAX_PAYLOAD = 16 * 1024 * 1024
_JSON = json.JSONDecoder()
#: events() reads the file in batches of about this many bytes.
_READ_BATCH = 4 * 1024 * 1024


class JournalCorruptError(JournalError):
    """The file is damaged where it cannot be a torn last write (``offset`` says where)."""

    def __init__(self, message: str, *, path: Path, offset: int) -> None:
        self.path = path
        self.offset = offset
        self.reason = message
        super().__init__(f"{path}, offset {offset}: {message}")


class JournalMismatchError(JournalError):
    """The register holds a value the journal does not explain."""

    def __init__(
        self,
        message: str,
        *,
        register: str,
        algorithm: str,
        actual: bytes,
        expected: tuple[bytes, ...],
        offset: int | None = None,
    ) -> None:
        self.register = register
        self.algorithm = algorithm
        self.actual = actual
        self.expected = expected
        self.offset = offset
        super().__init__(message)


class JournalUnusableError(JournalError):
    """An earlier failure left the journal unproven; it must be reopened (reconciled)."""


@dataclass(frozen=True, slots=True)
class JournalRecovery:
    """What the last open found and did (every field False/None: a clean reopen)."""

    created: bool = False
    new_epoch: bool = False
    archived: Path | None = None
    boot_changed: bool = False
    committed_seq: int | None = None
    dropped_seq: int | None = None
    torn_offset: int | None = None
    torn_bytes: int = 0
    notes: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        return not (
            self.created
            or self.new_epoch
            or self.committed_seq is not None
            or self.dropped_seq is not None
            or self.torn_offset is not None
        )


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A committed event and the change-detection key it was journaled under."""

    key: str
    event: RuntimeEvent


# -- records ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BeginRecord:
    epoch: int
    boot_id: bytes
    created_ns: int
    algorithm: str
    register: str
    start_value: bytes

    def to_payload(self) -> bytes:
        reg = self.register.encode("ascii")
        alg = by_name(self.algorithm)
        head = _BEGIN.pack(self.epoch, self.boot_id, self.created_ns, alg.alg_id, len(reg))
        return head + reg + bytes([len(self.start_value)]) + self.start_value

    @classmethod
    def from_payload(cls, payload: bytes, *, path: Path, offset: int) -> BeginRecord:
        def bad(why: str) -> JournalCorruptError:
            return JournalCorruptError(f"BEGIN record: {why}", path=path, offset=offset)

        if len(payload) < _BEGIN.size:
            raise bad(f"{len(payload)} bytes, shorter than its fixed part")
        epoch, boot, created, alg_id, reg_len = _BEGIN.unpack_from(payload)
        p = _BEGIN.size
        if len(payload) < p + reg_len + 1:
            raise bad("register name runs past the record")
        try:
            register = check_name(payload[p : p + reg_len].decode("ascii"))
            alg = by_id(alg_id)
        except (UnicodeDecodeError, ValueError) as e:
            raise bad(str(e)) from None
        p += reg_len
        value_len = payload[p]
        p += 1
        if value_len != alg.digest_size or len(payload) != p + value_len:
            raise bad(f"start value of {len(payload) - p} bytes for {alg.name}")
        return cls(epoch, bytes(boot), created, alg.name, register, bytes(payload[p:]))


def _record(rtype: int, payload: bytes) -> bytes:
    head = _HEAD.pack(len(payload), rtype)
    return head + payload + _CRC.pack(zlib.crc32(payload, zlib.crc32(head)))


def _event_payload(seq: int, digest: bytes, key: str, content: bytes) -> bytes:
    k = key.encode("utf-8")
    if len(k) > 0xFFFF:
        raise ValueError(f"a journal key is at most 65535 bytes, not {len(k)}")
    return _EVENT.pack(seq, len(digest), len(k)) + digest + k + content


def _decode_event(
    payload: bytes, alg: HashAlgorithm, *, path: Path, offset: int
) -> tuple[int, bytes, bytes, bytes]:
    """(seq, digest, key bytes, content bytes) of an EVENT payload."""
    if len(payload) < _EVENT.size:
        raise JournalCorruptError(
            "EVENT record shorter than its fixed part", path=path, offset=offset
        )
    seq, dlen, klen = _EVENT.unpack_from(payload)
    if dlen != alg.digest_size:
        raise JournalCorruptError(
            f"EVENT seq {seq}: a {dlen}-byte digest in a {alg.name} journal",
            path=path,
            offset=offset,
        )
    p = _EVENT.size
    if len(payload) < p + dlen + klen:
        raise JournalCorruptError(
            f"EVENT seq {seq}: digest and key run past the record", path=path, offset=offset
        )
    digest = payload[p : p + dlen]
    key = payload[p + dlen : p + dlen + klen]
    content = payload[p + dlen + klen :]
    return seq, digest, key, content


# -- small helpers ---------------------------------------------------------------------------------


def read_boot_id(path: Path = BOOT_ID_PATH) -> bytes:
    """This boot's id (16 bytes), or 16 zero bytes where the kernel does not say."""
    try:
        return uuid.UUID(path.read_text().strip()).bytes
    except (OSError, ValueError):
        return bytes(16)


def reset_values(register: str, algorithm: str) -> tuple[bytes, ...]:
    """Values a register holds right after a platform reset (PCR 17-22 reset to all ones)."""
    size = by_name(algorithm).digest_size
    if register in {f"pcr{i}" for i in range(17, 23)}:
        return (bytes(size), b"\xff" * size)
    return (bytes(size),)


def _eq(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _uuid_text(boot: bytes) -> str:
    return str(uuid.UUID(bytes=boot)) if len(boot) == 16 else boot.hex()


# -- reading a journal file ------------------------------------------------------------------------


@dataclass(slots=True)
class _Scan:
    """Everything the records of one file say, before the register is looked at."""

    begin: BeginRecord
    offsets: array[int] = field(default_factory=lambda: array("Q"))
    digests: bytearray = field(default_factory=bytearray)
    value: bytes = b""
    pending_offset: int | None = None
    pending_seq: int | None = None
    pending_digest: bytes | None = None
    good_end: int = 0
    torn_offset: int | None = None
    torn_bytes: int = 0
    torn_why: str = ""
    size: int = 0

    @property
    def count(self) -> int:
        return len(self.offsets)


class _Torn(Exception):
    def __init__(self, why: str) -> None:
        self.why = why


#: The file is read in windows of this many bytes (not mapped whole: a large journal must
#: not swell the agent's resident memory while it is checked).
_WINDOW = 1 << 20


class _FrameReader:
    """Frames of one journal file, read through a window (see the module docstring)."""

    def __init__(self, fd: int, size: int, path: Path) -> None:
        self.fd = fd
        self.size = size
        self.path = path
        self._buf = b""
        self._base = 0

    def _window(self, pos: int, end: int) -> bytes:
        """The file's bytes ``pos`` .. ``end`` (``end`` <= size)."""
        if not (self._base <= pos and end <= self._base + len(self._buf)):
            want = min(max(end - pos, _WINDOW), self.size - pos)
            self._buf = os.pread(self.fd, want, pos)
            self._base = pos
            if len(self._buf) < end - pos:
                raise JournalCorruptError(
                    "the file shrank while it was read", path=self.path, offset=pos
                )
        a = pos - self._base
        return self._buf[a : a + end - pos]

    def zeros_from(self, pos: int) -> bool:
        """True if every byte from ``pos`` to the end is zero."""
        while pos < self.size:
            end = min(self.size, pos + _WINDOW)
            if self._window(pos, end).strip(b"\x00"):
                return False
            pos = end
        return True

    def header(self) -> tuple[bytes, int]:
        magic, version = _HEADER.unpack(self._window(0, _HEADER.size))
        return bytes(magic), int(version)

    def frame(self, pos: int) -> tuple[int, bytes, int]:
        """(type, payload, end) of the record at ``pos``; _Torn for a torn last record."""
        left = self.size - pos
        if left < _FRAME:
            raise _Torn(f"{left} bytes, less than a record frame")
        length, rtype = _HEAD.unpack(self._window(pos, pos + _HEAD.size))
        if length > MAX_PAYLOAD:
            if self.zeros_from(pos):
                raise _Torn("zero-filled tail")
            raise JournalCorruptError(
                f"record length {length} exceeds {MAX_PAYLOAD}", path=self.path, offset=pos
            )
        end = pos + _FRAME + length
        if end > self.size:
            raise _Torn(f"a {_FRAME + length}-byte record cut short at {left} bytes")
        record = self._window(pos, end)
        (crc,) = _CRC.unpack_from(record, len(record) - _CRC.size)
        if zlib.crc32(record[: -_CRC.size]) != crc:
            if end == self.size:
                raise _Torn("CRC mismatch in the last record")
            if self.zeros_from(pos):
                raise _Torn("zero-filled tail")
            raise JournalCorruptError(
                f"CRC mismatch in a record followed by {self.size - end} more bytes "
                "(damage, not a torn last write)",
                path=self.path,
                offset=pos,
            )
        if rtype not in _TYPE_NAMES:
            raise JournalCorruptError(f"unknown record type {rtype}", path=self.path, offset=pos)
        return rtype, record[_HEAD.size : -_CRC.size], end


def _scan(path: Path) -> _Scan:
    """Read and check every record of ``path`` (see the module docstring); modify nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise JournalError(f"{path}: cannot read the journal: {e}") from e
    try:
        size = os.fstat(fd).st_size
        if size < _HEADER.size:
            raise JournalCorruptError(
                f"{size} bytes, shorter than the file header", path=path, offset=0
            )
        return _scan_frames(_FrameReader(fd, size, path))
    except OSError as e:
        raise JournalError(f"{path}: cannot read the journal: {e}") from e
    finally:
        os.close(fd)


def _scan_frames(reader: _FrameReader) -> _Scan:
    path, size = reader.path, reader.size
    magic, version = reader.header()
    if magic != MAGIC:
        raise JournalCorruptError("not a cima journal (bad magic)", path=path, offset=0)
    if version != VERSION:
        raise JournalCorruptError(
            f"journal version {version}, expected {VERSION}", path=path, offset=8
        )
    pos = _HEADER.size
    try:
        rtype, payload, end = reader.frame(pos)
    except _Torn as t:
        raise JournalCorruptError(
            f"the BEGIN record is torn ({t.why})", path=path, offset=pos
        ) from None
    if rtype != BEGIN:
        raise JournalCorruptError(
            f"first record is {_TYPE_NAMES[rtype]}, not BEGIN", path=path, offset=pos
        )
    begin = BeginRecord.from_payload(payload, path=path, offset=pos)
    alg = by_name(begin.algorithm)
    hash_ctor = alg.constructor()
    scan = _Scan(begin=begin, value=begin.start_value)
    value = begin.start_value
    next_seq = 0
    pos = end
    while pos < size:
        try:
            rtype, payload, end = reader.frame(pos)
        except _Torn as t:
            scan.torn_offset, scan.torn_bytes, scan.torn_why = pos, size - pos, t.why
            break
        if rtype == EVENT:
            seq, digest, _, content = _decode_event(payload, alg, path=path, offset=pos)
            if scan.pending_offset is not None:
                raise JournalCorruptError(
                    f"EVENT seq {seq} follows EVENT seq {scan.pending_seq} (offset "
                    f"{scan.pending_offset}), which was never committed",
                    path=path,
                    offset=pos,
                )
            if seq != next_seq:
                raise JournalCorruptError(
                    f"sequence gap: expected EVENT seq {next_seq}, found seq {seq}",
                    path=path,
                    offset=pos,
                )
            if not _eq(hash_ctor(content).digest(), digest):
                raise JournalCorruptError(
                    f"EVENT seq {seq}: its content does not hash to its digest",
                    path=path,
                    offset=pos,
                )
            scan.pending_offset, scan.pending_seq, scan.pending_digest = pos, seq, digest
        elif rtype == COMMIT:
            if len(payload) != _COMMIT.size:
                raise JournalCorruptError(
                    f"COMMIT record of {len(payload)} bytes", path=path, offset=pos
                )
            (seq,) = _COMMIT.unpack(payload)
            if scan.pending_offset is None or seq != scan.pending_seq:
                raise JournalCorruptError(
                    f"COMMIT of seq {seq} without its pending EVENT", path=path, offset=pos
                )
            assert scan.pending_digest is not None
            scan.offsets.append(scan.pending_offset)
            scan.digests += scan.pending_digest
            value = hash_ctor(value + scan.pending_digest).digest()
            scan.pending_offset = scan.pending_seq = scan.pending_digest = None
            next_seq += 1
        else:
            raise JournalCorruptError("a second BEGIN record", path=path, offset=pos)
        pos = end
    scan.value = value
    scan.good_end = pos if scan.torn_offset is None else scan.torn_offset
    scan.size = size
    return scan


# -- the journal --------------------------------------------------------------------------------


class Journal:
    """A durable, reconciled log of the agent's runtime events (see the module docstring).

    Open with :meth:`open`. Appends are serialised by one lock; reads
    (:meth:`events`) may run concurrently with appends.
    """

    def __init__(
        self,
        *,
        directory: Path,
        platform: Platform,
        fd: int,
        lock_fd: int,
        scan: _Scan,
        recovery: JournalRecovery,
    ) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_FILE
        self.platform = platform
        self.recovery = recovery
        self._fd = fd
        self._lock_fd = lock_fd
        self._begin = scan.begin
        self._alg = by_name(scan.begin.algorithm)
        self._hash = self._alg.constructor()
        self._offsets = scan.offsets
        self._digests = scan.digests
        self._value = scan.value
        self._size = scan.good_end
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._closed = False

    # -- opening and reconciling --------------------------------------------------------------
    @classmethod
    def open(
        cls,
        directory: Path | str,
        *,
        platform: Platform,
        register: str,
        algorithm: str,
        boot_id: bytes | None = None,
        adopt: bool = False,
    ) -> Journal:
        """Create or reopen the journal in ``directory`` and reconcile it with the register.

        ``boot_id`` (16 bytes) replaces this boot's id (read from the kernel);
        ``adopt`` lets a new journal start from a register that is not at its
        reset value. Raises :class:`JournalError` when the register cannot be
        proved (see the module docstring).
        """
        directory = Path(directory)
        try:
            alg = by_name(algorithm)
        except AlgorithmError as e:
            raise JournalError(f"journal algorithm: {e}") from e
        register = check_name(register)
        boot = read_boot_id() if boot_id is None else bytes(boot_id)
        if len(boot) != 16:
            raise JournalError(f"a boot id is 16 bytes, not {len(boot)}")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise JournalError(f"{directory}: cannot create the journal directory: {e}") from e
        lock_fd = _lock(directory)
        try:
            return cls._open_locked(
                directory,
                platform=platform,
                register=register,
                alg=alg,
                boot=boot,
                adopt=adopt,
                lock_fd=lock_fd,
            )
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open_locked(
        cls,
        directory: Path,
        *,
        platform: Platform,
        register: str,
        alg: HashAlgorithm,
        boot: bytes,
        adopt: bool,
        lock_fd: int,
    ) -> Journal:
        path = directory / JOURNAL_FILE
        current = platform.read(register, alg.name)
        fresh = any(_eq(current, r) for r in reset_values(register, alg.name))
        notes: list[str] = []
        if not path.exists():
            if not fresh and not adopt:
                raise JournalMismatchError(
                    f"{path}: no journal, and register {register}/{alg.name} is not at its reset "
                    f"value (it holds {current.hex()}): nothing explains it. Start from it only "
                    "with adopt (a verifier must then be given the start value)",
                    register=register,
                    algorithm=alg.name,
                    actual=current,
                    expected=reset_values(register, alg.name),
                )
            scan = _create(
                path,
                epoch=_next_epoch(directory),
                boot=boot,
                register=register,
                alg=alg,
                start=current,
            )
            note = f"{path}: new journal for {register}/{alg.name} from {current.hex()}"
            log.info("%s", note)
            recovery = JournalRecovery(created=True, notes=(note,))
            return cls._from_scan(directory, platform, scan, recovery, lock_fd)

        scan = _scan(path)
        begin = scan.begin
        if begin.register != register or begin.algorithm != alg.name:
            raise JournalError(
                f"{path}: this journal is for {begin.register}/{begin.algorithm}, not "
                f"{register}/{alg.name}; move it aside to start a journal for the new register"
            )
        boot_changed = not _eq(begin.boot_id, boot)
        v0 = scan.value
        v1 = (
            _extend_value(alg, v0, scan.pending_digest) if scan.pending_digest is not None else None
        )
        torn = ""
        if scan.torn_offset is not None:
            torn = (
                f"a torn last record of {scan.torn_bytes} bytes at offset {scan.torn_offset} "
                f"({scan.torn_why})"
            )

        if fresh and (boot_changed or not _eq(v0, current)):
            # (the register cannot be V1: no extend reaches a reset value)
            why = (
                f"boot id {_uuid_text(boot)} differs from the journal's {_uuid_text(begin.boot_id)}"
                if boot_changed
                else "the platform was reset since the journal was written"
            )
            archived = _archive(path, begin.epoch)
            new_scan = _create(
                path,
                epoch=begin.epoch + 1,
                boot=boot,
                register=register,
                alg=alg,
                start=current,
            )
            note = (
                f"{path}: new epoch {begin.epoch + 1}: register {register}/{alg.name} is at its "
                f"reset value and {why}; epoch {begin.epoch} ({scan.count} events) archived as "
                f"{archived.name}"
            )
            if torn:
                note += f" (it ended with {torn})"
            log.warning("%s", note)
            recovery = JournalRecovery(
                new_epoch=True, archived=archived, boot_changed=boot_changed, notes=(note,)
            )
            return cls._from_scan(directory, platform, new_scan, recovery, lock_fd)

        if _eq(current, v0):
            action = "drop" if scan.pending_offset is not None else "none"
        elif v1 is not None and _eq(current, v1):
            action = "commit"
        else:
            raise _mismatch(
                path,
                scan,
                register=register,
                alg=alg,
                current=current,
                v0=v0,
                v1=v1,
                torn=torn,
                boot_changed=boot_changed,
            )

        # Decided: now repair, in the order the writes were made.
        committed: int | None = None
        dropped: int | None = None
        fd = _open_rw(path)
        try:
            if scan.torn_offset is not None:
                os.ftruncate(fd, scan.torn_offset)
                notes.append(f"{path}: truncated {torn}")
            if action == "drop":
                assert scan.pending_offset is not None
                os.ftruncate(fd, scan.pending_offset)
                dropped = scan.pending_seq
                scan.good_end = scan.pending_offset
                notes.append(
                    f"{path}: dropped pending event seq {dropped} at offset "
                    f"{scan.pending_offset}: the register does not include it"
                )
            elif action == "commit":
                assert scan.pending_offset is not None and scan.pending_digest is not None
                assert scan.pending_seq is not None
                commit = _record(COMMIT, _COMMIT.pack(scan.pending_seq))
                _write_all(fd, commit)  # O_APPEND: at scan.good_end, the end after truncation
                scan.offsets.append(scan.pending_offset)
                scan.digests += scan.pending_digest
                assert v1 is not None
                scan.value = v1
                scan.good_end += len(commit)
                committed = scan.pending_seq
                notes.append(
                    f"{path}: committed pending event seq {committed} at offset "
                    f"{scan.pending_offset}: the register includes it"
                )
            if notes:
                os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise JournalError(f"{path}: cannot repair the journal: {e}") from e
        if boot_changed:
            notes.append(
                f"{path}: boot id changed ({_uuid_text(begin.boot_id)} -> {_uuid_text(boot)}) "
                "but the register continues the journal (its state survived the reboot)"
            )
        for note in notes:
            log.warning("%s", note)
        scan.pending_offset = scan.pending_seq = scan.pending_digest = None
        recovery = JournalRecovery(
            boot_changed=boot_changed,
            committed_seq=committed,
            dropped_seq=dropped,
            torn_offset=scan.torn_offset,
            torn_bytes=scan.torn_bytes,
            notes=tuple(notes),
        )
        return cls(
            directory=directory,
            platform=platform,
            fd=fd,
            lock_fd=lock_fd,
            scan=scan,
            recovery=recovery,
        )

    @classmethod
    def _from_scan(
        cls,
        directory: Path,
        platform: Platform,
        scan: _Scan,
        recovery: JournalRecovery,
        lock_fd: int,
    ) -> Journal:
        fd = _open_rw(directory / JOURNAL_FILE)
        return cls(
            directory=directory,
            platform=platform,
            fd=fd,
            lock_fd=lock_fd,
            scan=scan,
            recovery=recovery,
        )

    # -- what it holds ------------------------------------------------------------------------
    @property
    def register(self) -> str:
        return self._begin.register

    @property
    def algorithm(self) -> str:
        return self._begin.algorithm

    @property
    def start_value(self) -> bytes:
        """The register's value when this journal (epoch) began."""
        return self._begin.start_value

    @property
    def value(self) -> bytes:
        """The register value the committed events replay to (what :meth:`check` expects)."""
        return self._value

    @property
    def epoch(self) -> int:
        return self._begin.epoch

    @property
    def boot_id(self) -> bytes:
        return self._begin.boot_id

    @property
    def healthy(self) -> bool:
        """False once an append or a check left the register unproven (reopen to reconcile)."""
        return self._broken is None and not self._closed

    def __len__(self) -> int:
        return len(self._offsets)

    def digests(self) -> list[bytes]:
        """The committed events' digests, in order (what the register was extended with)."""
        size = self._alg.digest_size
        data = bytes(self._digests)
        return [data[i : i + size] for i in range(0, len(data), size)]

    def _records(self, start: int, count: int | None) -> Iterator[tuple[int, bytes, bytes, bytes]]:
        """(index, key, digest, content) of committed events, each checked again."""
        n = len(self._offsets)
        start = max(0, min(start, n))
        stop = n if count is None else max(start, min(n, start + count))
        i = start
        while i < stop:
            # One read covers a run of events (and the commits between them).
            j = i + 1
            base = self._offsets[i]
            while j < stop and self._offsets[j] - base < _READ_BATCH:
                j += 1
            end = self._offsets[j] if j < n else self._size
            data = os.pread(self._fd, end - base, base)
            for k in range(i, j):
                yield self._record_at(data, self._offsets[k] - base, k)
            i = j

    def _record_at(self, data: bytes, pos: int, index: int) -> tuple[int, bytes, bytes, bytes]:
        offset = self._offsets[index]
        if len(data) - pos < _FRAME:
            raise JournalCorruptError("event record cut short", path=self.path, offset=offset)
        length, rtype = _HEAD.unpack_from(data, pos)
        end = pos + _FRAME + length
        if rtype != EVENT or end > len(data):
            raise JournalCorruptError(
                "the journal file changed under the agent", path=self.path, offset=offset
            )
        (crc,) = _CRC.unpack_from(data, end - _CRC.size)
        if zlib.crc32(data[pos : end - _CRC.size]) != crc:
            raise JournalCorruptError(
                "CRC mismatch: the journal file changed under the agent",
                path=self.path,
                offset=offset,
            )
        payload = data[pos + _HEAD.size : end - _CRC.size]
        seq, digest, key, content = _decode_event(payload, self._alg, path=self.path, offset=offset)
        size = self._alg.digest_size
        expected = bytes(self._digests[index * size : (index + 1) * size])
        if (
            seq != index
            or not _eq(digest, expected)
            or not _eq(self._hash(content).digest(), digest)
        ):
            raise JournalCorruptError(
                f"event seq {index} no longer matches what was extended: the journal file "
                "changed under the agent",
                path=self.path,
                offset=offset,
            )
        return index, key, digest, content

    def entries(self, start: int = 0, count: int | None = None) -> list[JournalEntry]:
        """Committed events ``start`` .. ``start + count`` with their keys, read from the file."""
        out: list[JournalEntry] = []
        for index, key, digest, content in self._records(start, count):
            try:
                obj = _JSON.decode(content.decode("utf-8"))
                key_text = key.decode("utf-8")
            except (ValueError, UnicodeDecodeError) as e:
                raise JournalCorruptError(
                    f"event seq {index}: content is not JSON: {e}",
                    path=self.path,
                    offset=self._offsets[index],
                ) from None
            event = RuntimeEvent(index, self.register, self.algorithm, digest, obj)
            out.append(JournalEntry(key_text, event))
        return out

    def fingerprints(self) -> Iterator[tuple[str, bytes]]:
        """(key, digest) of every committed event, in order, without decoding contents.

        The digest hashes the whole content, so an unchanged digest under a key
        means an unchanged observation: what the engine's change detection needs.
        """
        for index, key, digest, _ in self._records(0, None):
            try:
                yield key.decode("utf-8"), digest
            except UnicodeDecodeError:
                raise JournalCorruptError(
                    f"event seq {index}: key is not UTF-8",
                    path=self.path,
                    offset=self._offsets[index],
                ) from None

    def events(self, start: int = 0, count: int | None = None) -> list[RuntimeEvent]:
        """Committed events, in order (all by default), read back from the file and checked."""
        return [e.event for e in self.entries(start, count)]

    def __iter__(self) -> Iterator[RuntimeEvent]:
        step = 4096
        for i in range(0, len(self._offsets), step):
            yield from self.events(i, step)

    def to_cel(self) -> list[CELRecord]:
        """The committed events as CEL records (content type ``cima``)."""
        return [e.to_cel() for e in self]

    # -- appending ----------------------------------------------------------------------------
    def append(
        self,
        *,
        kind: str,
        scope: str,
        subject: str,
        data: Mapping[str, Any],
        key: str | None = None,
    ) -> RuntimeEvent:
        """Journal one event, extend the register with it, commit it; return the event.

        ``key`` is the engine's change-detection key (default ``kind:scope:subject``).
        A failed extend is settled on the spot by reading the register: the event
        is committed if the register includes it, dropped (and the platform's
        error raised) if not; if the register cannot be read the journal becomes
        unusable until reopened.
        """
        body = canonical(event_content(kind, scope, subject, data))
        content = json.loads(body)
        digest = self._hash(body).digest()
        key = f"{kind}:{scope}:{subject}" if key is None else key
        with self._lock:
            self._usable()
            seq = len(self._offsets)
            record = _record(EVENT, _event_payload(seq, digest, key, body))
            offset = self._size
            # (1) the pending record, synced.
            try:
                self._write(record)
                os.fdatasync(self._fd)
            except OSError as e:
                self._undo_write(offset, e)
                raise JournalError(f"{self.path}: cannot write event seq {seq}: {e}") from e
            self._size = offset + len(record)
            # (2) the extend.
            expected = self._hash(self._value + digest).digest()
            try:
                self.platform.extend(self.register, self.algorithm, digest)
            except Exception as e:
                self._settle(offset, seq, expected, e)
            except BaseException:
                self._broken = f"the extend of event seq {seq} was interrupted"
                raise
            # (3) the commit.
            self._commit(offset, seq, digest, expected)
        return RuntimeEvent(seq, self.register, self.algorithm, digest, content)

    def _commit(self, offset: int, seq: int, digest: bytes, value: bytes) -> None:
        commit = _record(COMMIT, _COMMIT.pack(seq))
        try:
            self._write(commit)
        except OSError as e:
            self._broken = f"event seq {seq} was extended but its commit could not be written ({e})"
            raise JournalUnusableError(f"{self.path}: {self._broken}; reopen to reconcile") from e
        self._size += len(commit)
        self._offsets.append(offset)
        self._digests += digest
        self._value = value

    def _settle(self, offset: int, seq: int, with_event: bytes, error: Exception) -> None:
        """After a failed extend: commit, drop, or give up (see :meth:`append`)."""
        try:
            current = self.platform.read(self.register, self.algorithm)
        except Exception as e:
            self._broken = (
                f"the extend of event seq {seq} failed ({error}) and the register could not "
                f"be read ({e})"
            )
            raise JournalUnusableError(f"{self.path}: {self._broken}; reopen to reconcile") from e
        if _eq(current, with_event):
            log.warning("extend of event seq %d reported %s, but the register has it", seq, error)
            return
        if _eq(current, self._value):
            try:
                os.ftruncate(self._fd, offset)
                os.fsync(self._fd)
            except OSError as e:
                self._broken = f"event seq {seq} was not extended and could not be dropped ({e})"
                raise JournalUnusableError(f"{self.path}: {self._broken}") from e
            self._size = offset
            if isinstance(error, PlatformError | JournalError):
                raise error
            raise PlatformError(f"extend of event seq {seq} failed: {error}") from error
        self._broken = (
            f"the extend of event seq {seq} failed ({error}) and register "
            f"{self.register}/{self.algorithm} now holds {current.hex()}, neither "
            f"{self._value.hex()} (without it) nor {with_event.hex()} (with it)"
        )
        raise JournalMismatchError(
            f"{self.path}: {self._broken}",
            register=self.register,
            algorithm=self.algorithm,
            actual=current,
            expected=(self._value, with_event),
            offset=offset,
        ) from error

    def _undo_write(self, offset: int, error: OSError) -> None:
        try:
            os.ftruncate(self._fd, offset)
        except OSError:
            self._broken = f"a failed write ({error}) could not be undone"

    def _write(self, data: bytes) -> None:
        """Write all of ``data`` at the end of the file (one write where the kernel allows)."""
        _write_all(self._fd, data)

    def _usable(self) -> None:
        if self._closed:
            raise JournalUnusableError(f"{self.path}: the journal is closed")
        if self._broken is not None:
            raise JournalUnusableError(f"{self.path}: {self._broken}; reopen to reconcile")

    # -- checking -------------------------------------------------------------------------------
    def check(self) -> None:
        """Read the register again: :class:`JournalMismatchError` unless the journal explains it.

        A mismatch (someone else extended the register) leaves the journal
        unusable: its events no longer prove the register.
        """
        with self._lock:
            self._usable()
            current = self.platform.read(self.register, self.algorithm)
            if _eq(current, self._value):
                return
            self._broken = (
                f"register {self.register}/{self.algorithm} holds {current.hex()}, but the "
                f"journal's {len(self._offsets)} events replay to {self._value.hex()}: something "
                "else extended or reset it"
            )
            raise JournalMismatchError(
                f"{self.path}: {self._broken}",
                register=self.register,
                algorithm=self.algorithm,
                actual=current,
                expected=(self._value,),
                offset=self._size,
            )

    # -- closing --------------------------------------------------------------------------------
    def close(self) -> None:
        """Make the last commit durable and release the file and its lock."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                os.fsync(self._fd)
            except OSError as e:
                log.warning("%s: fsync at close failed: %s", self.path, e)
            finally:
                os.close(self._fd)
                os.close(self._lock_fd)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Journal({str(self.path)!r}, {self.register}/{self.algorithm}, epoch {self.epoch}, "
            f"{len(self)} events)"
        )


# -- file operations -------------------------------------------------------------------------------


def _extend_value(alg: HashAlgorithm, value: bytes, digest: bytes) -> bytes:
    """``H(value || digest)``: one extend."""
    return alg.hash(value + digest)


def _lock(directory: Path) -> int:
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise JournalError(f"{path}: cannot open the journal lock: {e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise JournalError(
                f"{directory}: the journal is in use by another process (lock {path})"
            ) from None
        raise JournalError(f"{path}: cannot lock the journal: {e}") from e
    return fd


def _open_rw(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
    except OSError as e:
        raise JournalError(f"{path}: cannot open the journal: {e}") from e


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _create(
    path: Path, *, epoch: int, boot: bytes, register: str, alg: HashAlgorithm, start: bytes
) -> _Scan:
    """Write a new journal atomically (temporary file, fsync, rename, fsync of the directory)."""
    begin = BeginRecord(epoch, boot, time.time_ns(), alg.name, register, bytes(start))
    data = _HEADER.pack(MAGIC, VERSION) + _record(BEGIN, begin.to_payload())
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise JournalError(f"{path}: cannot create the journal: {e}") from e
    scan = _Scan(begin=begin, value=begin.start_value)
    scan.good_end = scan.size = len(data)
    return scan


def _archive(path: Path, epoch: int) -> Path:
    target = path.with_name(f"journal.{epoch}.cima")
    n = 1
    while target.exists():
        target = path.with_name(f"journal.{epoch}.{n}.cima")
        n += 1
    try:
        os.rename(path, target)
        _fsync_dir(path.parent)
    except OSError as e:
        raise JournalError(f"{path}: cannot archive the journal as {target.name}: {e}") from e
    return target


def _next_epoch(directory: Path) -> int:
    """One more than the highest archived epoch in ``directory`` (0 for the first)."""
    highest = -1
    for p in directory.glob("journal.*.cima"):
        part = p.name.split(".")[1]
        if part.isdigit():
            highest = max(highest, int(part))
    return highest + 1


def _mismatch(
    path: Path,
    scan: _Scan,
    *,
    register: str,
    alg: HashAlgorithm,
    current: bytes,
    v0: bytes,
    v1: bytes | None,
    torn: str,
    boot_changed: bool,
) -> JournalMismatchError:
    last = (
        f"its last committed event is seq {scan.count - 1} at offset {scan.offsets[-1]}"
        if scan.count
        else "it has no committed event"
    )
    text = (
        f"{path}: register {register}/{alg.name} holds {current.hex()}, but the journal's "
        f"{scan.count} committed events replay from {scan.begin.start_value.hex()} to "
        f"{v0.hex()}"
    )
    expected: tuple[bytes, ...] = (v0,)
    if v1 is not None:
        expected = (v0, v1)
        text += (
            f" (or to {v1.hex()} with the pending event seq {scan.pending_seq} at offset "
            f"{scan.pending_offset})"
        )
    text += f"; {last}; the journal ends at offset {scan.good_end}"
    if torn:
        text += f", followed by {torn}"
    if boot_changed:
        text += "; the boot id changed but the register is not at its reset value"
    text += ": it was extended by something else, or the journal lost events"
    return JournalMismatchError(
        text,
        register=register,
        algorithm=alg.name,
        actual=current,
        expected=expected,
        offset=scan.offsets[-1] if scan.count else scan.good_end,
    )
