"""An incremental reader of the kernel's IMA measurement list.

securityfs publishes the list as ``ima/binary_runtime_measurements`` and
``ima/ascii_runtime_measurements`` (``security/integrity/ima/ima_fs.c``). Both
are ``seq_file`` files, and that decides how to read them incrementally:

- ``seq_read`` keeps, per open file, the index of the next record
  (``m->index``). At the end of the list ``ima_measurements_next`` has
  advanced that index past the last record, so a later ``read()`` on the same
  open file calls ``ima_measurements_start`` with that index and returns the
  records appended since, and nothing already read. Keeping the file open and
  reading on is therefore O(new records) in bytes copied.
- ``seq_lseek`` to a byte offset re-generates the records from the first one
  up to that offset inside the kernel (``traverse``): correct, O(list) kernel
  work, but no bytes copied to user space. It is what a reader must do after
  reopening the file (a restarted agent resuming from a saved position).
- ``stat`` reports a size of 0 for securityfs files, so the end of the list is
  found by reading until ``read()`` returns nothing.

:class:`IMAReader` therefore keeps one file descriptor open and reads on from
where it stopped; it seeks to its saved offset only when it (re)opens the file.
A read may end in the middle of a record (a chunk boundary, or a regular file
that a writer is still appending to): those bytes are kept until the rest
arrives, and :attr:`IMAReader.offset` only ever counts whole records.

The list is read a chunk at a time, and each chunk's whole records are taken
(into an :class:`~cima.eventlog.ima.IMAStore`, :meth:`IMAReader.read_into`)
before the next chunk is read: besides the entries, memory holds one chunk and
a record still arriving, never a copy of the list.

The list never shrinks while the kernel runs. A list that is shorter than a
saved position, or whose record just before that position is not the one
remembered, belongs to another boot: :class:`IMALogResetError`, or with
``on_reset="restart"`` a fresh read from the first record
(:attr:`IMAReader.restarted` tells the caller).

Binary records (``ima_measurements_show``): u32 PCR, 20-byte template digest,
u32 template name length, the name, then for the ``ima`` template a 20-byte
file digest and a u32-length-prefixed file name, and for every other template
a u32 template data length and the template data. ASCII records are lines.
Framing, validating and decoding them is :mod:`cima.eventlog.ima`'s
(:class:`~cima.eventlog.ima.IMAStore`).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cima.errors import ParseError, PlatformError

if TYPE_CHECKING:
    from cima.eventlog.ima import IMAEntry, IMAStore

__all__ = ["IMALogResetError", "IMAPosition", "IMAReader"]

Format = Literal["auto", "binary", "ascii"]
OnReset = Literal["error", "restart"]

#: The longest ascii line waited for: a longer one without its newline is corruption.
MAX_ASCII_LINE = 64 * 1024 * 1024


class IMALogResetError(PlatformError):
    """The measurement list no longer continues the one read so far (a new boot)."""


@dataclass(frozen=True, slots=True)
class IMAPosition:
    """Where a reader stands: records and bytes consumed, and the last record's bytes.

    ``last_record`` lets a reader that resumes from a saved position recognise
    the same list (the record just before ``offset`` must be these bytes).
    """

    count: int = 0
    offset: int = 0
    last_record: bytes = b""

    def __post_init__(self) -> None:
        if self.count < 0 or self.offset < 0 or len(self.last_record) > self.offset:
            raise ValueError(f"inconsistent IMA position {self.count}/{self.offset}")


class IMAReader:
    """Reads an IMA measurement list a little at a time, each byte once.

    ``path`` is the binary list (preferred: it carries the template data
    exactly) or the ASCII one; ``format="auto"`` decides by the file name
    and, failing that, by the first byte. ``position`` resumes from a saved
    :attr:`position`.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        format: Format = "auto",
        position: IMAPosition | None = None,
        on_reset: OnReset = "error",
        chunk_size: int = 1 << 16,
    ) -> None:
        if format not in ("auto", "binary", "ascii"):
            raise ValueError(f"format must be auto, binary or ascii, not {format!r}")
        if on_reset not in ("error", "restart"):
            raise ValueError(f"on_reset must be error or restart, not {on_reset!r}")
        self.path = Path(path)
        self.on_reset = on_reset
        self.chunk_size = chunk_size
        self._format: Literal["binary", "ascii"] | None = (
            format if format != "auto" else self._format_from_name(self.path)
        )
        start = position or IMAPosition()
        self._count = start.count
        self._lines = start.count
        self._offset = start.offset
        self._last = start.last_record
        self._pending = bytearray()
        self._fd: int | None = None
        self._read_pos = 0
        self._bytes_read = 0
        self._sized = True
        self.restarted = False

    @staticmethod
    def _format_from_name(path: Path) -> Literal["binary", "ascii"] | None:
        name = path.name
        if "ascii" in name:
            return "ascii"
        if "binary" in name:
            return "binary"
        return None

    # -- state

    @property
    def count(self) -> int:
        """Whole records read so far (from the first record of the list)."""
        return self._count

    @property
    def offset(self) -> int:
        """Byte offset just past the last whole record read."""
        return self._offset

    @property
    def bytes_read(self) -> int:
        """Bytes this reader has read from the file, in total."""
        return self._bytes_read

    @property
    def position(self) -> IMAPosition:
        """The state to save and resume from."""
        return IMAPosition(self._count, self._offset, bytes(self._last))

    @property
    def format(self) -> Literal["binary", "ascii"] | None:
        """``binary`` or ``ascii``; None until ``auto`` has seen the first byte."""
        return self._format

    # -- file handling

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> IMAReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, action: str, e: OSError) -> PlatformError:
        code = e.errno
        name = errno.errorcode.get(code, "unknown") if code is not None else "unknown"
        return PlatformError(f"{action} {self.path}: {e.strerror or e} ({name}, errno {code})")

    def _read_exact(self, fd: int, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            chunk = os.read(fd, size - len(out))
            if not chunk:
                break
            out += chunk
        self._bytes_read += len(out)
        return bytes(out)

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise self._error("open", e) from e
        self._fd = fd
        self._pending.clear()
        self._read_pos = 0
        if self._offset == 0:
            return fd
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and 0 < st.st_size < self._offset:
                self._reset(f"the list is {st.st_size} bytes, shorter than offset {self._offset}")
                return fd
            tail = self._last
            os.lseek(fd, self._offset - len(tail), os.SEEK_SET)
            if tail and self._read_exact(fd, len(tail)) != tail:
                self._reset(f"the record before offset {self._offset} is not the one read before")
                return fd
            if not tail:
                os.lseek(fd, self._offset, os.SEEK_SET)
        except OSError as e:
            raise self._error("seek", e) from e
        self._read_pos = self._offset
        return fd

    def _reset(self, why: str) -> None:
        if self.on_reset == "error":
            self.close()  # the next call starts over from the saved position and fails again
            raise IMALogResetError(
                f"{self.path}: {why}: the measurement list was reset (new boot?)"
            )
        assert self._fd is not None
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._count = 0
        self._lines = 0
        self._offset = 0
        self._last = b""
        self._pending.clear()
        self._read_pos = 0
        self.restarted = True

    # -- reading

    def read_new(self) -> list[IMAEntry]:
        """The records appended since the last call (all of them on the first call).

        When a corrupt record follows good ones, the good ones are returned and
        the next call raises the :class:`ParseError` (it starts at that record).
        """
        from cima.eventlog.ima import IMAStore

        store = IMAStore()
        self.read_into(store)
        return list(store.entries())

    def read_into(self, store: IMAStore) -> int:
        """Append the records appended since the last call to ``store``; return how many.

        The entries are kept in ``store`` compactly (their records, no object
        per entry). The file is read in chunks of :attr:`chunk_size`, each
        taken into ``store`` before the next is read, so that the list is never
        held twice. ``store`` must be empty or hold what this reader read
        before; after a reset (:attr:`restarted`) it is cleared first. Records
        before a corrupt one are appended and counted, and the next call raises
        the :class:`ParseError` (it starts at that record).
        """
        self.restarted = False
        fd = self._fd if self._fd is not None else self._open()
        if self.restarted:
            store.clear()
        nxt = store.next_index
        if nxt is not None and nxt != self._count:
            raise ValueError(
                f"{store!r} does not continue this reader's list ({self._count} entries read)"
            )
        added = 0
        got = 0
        while True:
            try:
                chunk = os.read(fd, self.chunk_size)
            except OSError as e:
                raise self._error("read", e) from e
            if not chunk:
                if self._check_truncation(fd, got):
                    store.clear()
                    got = 0
                    continue
                if self._pending:
                    n, error = self._take(store)  # a corrupt record left from the last call
                    added += n
                    if error is not None and not added:
                        raise error
                return added
            got += len(chunk)
            self._bytes_read += len(chunk)
            self._read_pos += len(chunk)
            self._pending += chunk
            n, error = self._take(store)
            added += n
            if error is not None:
                if added:
                    return added  # the next call starts at the corrupt record, and raises
                raise error

    def _check_truncation(self, fd: int, got: int) -> bool:
        """Regular files only: a file now shorter than what was read was reset (True)."""
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise self._error("stat", e) from e
        if not stat.S_ISREG(st.st_mode) or st.st_size >= self._read_pos:
            return False
        if got:
            self._sized = False  # a pseudo-file (securityfs reports size 0)
        elif self._sized:
            self._reset(f"the list is {st.st_size} bytes, shorter than offset {self._read_pos}")
            return True
        return False

    def _take(self, store: IMAStore) -> tuple[int, ParseError | None]:
        """Move the whole records at the start of the pending bytes into ``store``."""
        buf = self._pending
        if self._format is None:
            if not buf:
                return 0, None
            self._format = "ascii" if buf[:1] in b"0123456789 " else "binary"
        source = str(self.path)
        if self._format == "binary":
            done = store.append_binary(buf, offset=self._offset, index=self._count, source=source)
        else:
            done = store.append_ascii(buf, line=self._lines + 1, index=self._count, source=source)
        error = done.error
        if done.taken:
            self._last = bytes(buf[done.last : done.taken])
            self._offset += done.taken
            self._count += done.entries
            self._lines += done.lines
            del buf[: done.taken]
        elif error is None and self._format == "ascii" and len(buf) > MAX_ASCII_LINE:
            error = ParseError("line longer than any IMA record", line=self._lines + 1)
        return done.entries, error
