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

The list never shrinks while the kernel runs. A list that is shorter than a
saved position, or whose record just before that position is not the one
remembered, belongs to another boot: :class:`IMALogResetError`, or with
``on_reset="restart"`` a fresh read from the first record
(:attr:`IMAReader.restarted` tells the caller).

Binary records (``ima_measurements_show``): u32 PCR, 20-byte template digest,
u32 template name length, the name, then for the ``ima`` template a 20-byte
file digest and a u32-length-prefixed file name, and for every other template
a u32 template data length and the template data. ASCII records are lines.
Decoding is :mod:`cima.eventlog.ima`'s; this module only frames records.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cima.errors import ParseError, PlatformError

if TYPE_CHECKING:
    from cima.eventlog.ima import IMAEntry

__all__ = ["IMALogResetError", "IMAPosition", "IMAReader"]

Format = Literal["auto", "binary", "ascii"]
OnReset = Literal["error", "restart"]

#: Bounds beyond which a length field is taken as corruption, not as a record still arriving.
MAX_TEMPLATE_NAME = 255
MAX_TEMPLATE_DATA = 16 * 1024 * 1024
MAX_ASCII_LINE = 64 * 1024 * 1024

_U32 = struct.Struct("<I")
_FIXED = 4 + 20 + 4  # pcr, template digest, template name length
_IMA_FIXED = 20 + 4  # the ima template: file digest, file name length


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


def _binary_record_end(buf: bytes | bytearray, pos: int, base: int) -> int | None:
    """End of the binary record starting at ``pos``, or None if it is not all there yet."""
    have = len(buf)
    if have - pos < _FIXED:
        return None
    (name_len,) = _U32.unpack_from(buf, pos + 24)
    if name_len == 0 or name_len > MAX_TEMPLATE_NAME:
        raise ParseError(
            f"template name length {name_len} (at most {MAX_TEMPLATE_NAME})", offset=base + pos + 24
        )
    p = pos + _FIXED + name_len
    if have < p:
        return None
    if buf[pos + _FIXED : p] == b"ima":
        if have < p + _IMA_FIXED:
            return None
        (n,) = _U32.unpack_from(buf, p + 20)
        if n > MAX_TEMPLATE_DATA:
            raise ParseError(f"file name length {n} is implausible", offset=base + p + 20)
        end = p + _IMA_FIXED + n
    else:
        if have < p + 4:
            return None
        (n,) = _U32.unpack_from(buf, p)
        if n > MAX_TEMPLATE_DATA:
            raise ParseError(
                f"template data length {n} (at most {MAX_TEMPLATE_DATA})", offset=base + p
            )
        end = p + 4 + n
    return end if end <= have else None


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

    def _read_available(self, fd: int) -> int:
        """Read until end of file; return how many bytes came."""
        got = 0
        while True:
            try:
                chunk = os.read(fd, self.chunk_size)
            except OSError as e:
                raise self._error("read", e) from e
            if not chunk:
                return got
            got += len(chunk)
            self._bytes_read += len(chunk)
            self._read_pos += len(chunk)
            self._pending += chunk

    def _check_truncation(self, fd: int, got: int) -> None:
        """Regular files only: a file now shorter than what was read was reset."""
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise self._error("stat", e) from e
        if not stat.S_ISREG(st.st_mode) or st.st_size >= self._read_pos:
            return
        if got:
            self._sized = False  # a pseudo-file (securityfs reports size 0)
        elif self._sized:
            self._reset(f"the list is {st.st_size} bytes, shorter than offset {self._read_pos}")
            self._read_available(fd)

    def read_new(self) -> list[IMAEntry]:
        """The records appended since the last call (all of them on the first call)."""
        self.restarted = False
        fd = self._fd if self._fd is not None else self._open()
        got = self._read_available(fd)
        self._check_truncation(fd, got)
        if self._format is None:
            if not self._pending:
                return []
            self._format = "ascii" if self._pending[:1] in b"0123456789 " else "binary"
        if self._format == "binary":
            return self._take_binary()
        return self._take_ascii()

    def _take_binary(self) -> list[IMAEntry]:
        buf = self._pending
        pos = 0
        last_start = 0
        while True:
            end = _binary_record_end(buf, pos, self._offset)
            if end is None:
                break
            last_start, pos = pos, end
        return self._decode(pos, last_start)

    def _take_ascii(self) -> list[IMAEntry]:
        buf = self._pending
        end = buf.rfind(b"\n") + 1
        if end == 0:
            if len(buf) > MAX_ASCII_LINE:
                raise ParseError("line longer than any IMA record", line=self._count + 1)
            return []
        last_start = buf.rfind(b"\n", 0, end - 1) + 1
        return self._decode(end, last_start)

    def _decode(self, end: int, last_start: int) -> list[IMAEntry]:
        if end == 0:
            return []
        from cima.eventlog import ima

        data = bytes(self._pending[:end])
        source = str(self.path)
        stream = io.BytesIO(data)
        if self._format == "binary":
            entries = list(
                ima.iter_binary(stream, source=source, offset=self._offset, index=self._count)
            )
        else:
            entries = list(
                ima.iter_ascii(stream, source=source, line=self._lines + 1, index=self._count)
            )
            self._lines += data.count(b"\n")
        self._last = data[last_start:end]
        self._offset += end
        self._count += len(entries)
        del self._pending[:end]
        return entries
