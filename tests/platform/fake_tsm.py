"""A configfs-tsm report directory that a TDX guest's code drives with ordinary file I/O.

The kernel's ``drivers/virt/coco/guest/report.c`` semantics, emulated:

- creating an entry (``mkdir``; the kernel's ``make_item``) gives a directory
  holding the attributes ``provider``, ``generation``, ``inblob``, ``outblob``;
- a write to ``inblob`` is committed when the writer closes the file (configfs
  binary attributes are flushed on release); each commit increments
  ``write_generation``;
- ``generation`` reads as ``"%lu\\n"`` of the write generation;
- ``outblob`` is produced on read: when the request changed since the last
  report (``read_generation != write_generation``) a new report is made from
  the current ``inblob`` and ``read_generation`` catches up; the TDX provider
  insists on exactly 64 bytes of inblob (any other length reads as an error,
  here: an empty outblob);
- removing the entry (``rmdir``; the kernel's ``drop_item``) removes it with
  its attributes.

How: a plain directory cannot compute a file's contents when it is read, but a
named pipe can: every attribute is a FIFO served by a thread of this fake. A
reader's ``open()`` of ``generation`` or ``outblob`` meets the serving
thread's ``open()`` for writing, and the thread computes the content at that
moment, after committing whatever ``inblob`` writes have been closed. ``inblob``
is held open for reading (non-blocking) by the fake; a writer's ``close()``
shows up as POLLHUP after its data, which is the commit. So the code under
test performs the real system calls a TDX guest makes (``open``/``read``/
``write``/``close`` on each attribute); only ``mkdir``/``rmdir`` of an entry go
through :class:`FakeTSM`'s ``make_item``/``drop_item``, the seam
:class:`cima.platform.tdx.ConfigfsItems` (they create and remove the FIFOs and
their threads as the kernel's ``make_item``/``drop_item`` do).

``on_commit`` is called after each committed write, in the fake's thread, with
the entry and the new generation: a test makes a second writer write
``inblob`` there, which lands between the code's write and its read of
``outblob`` every time, with no timing luck involved.

Each report is the template quote with its REPORTDATA replaced by the inblob
(the Intel TDX DCAP quote v4 layout: 48-byte header, then the TD report body
whose REPORTDATA is at body offset 520); its signature no longer verifies.
"""

from __future__ import annotations

import errno
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cima.platform.base import PlatformPaths

QUOTE_V4_HEADER = 48
QUOTE_V4_BODY = 584
REPORT_DATA_AT = QUOTE_V4_HEADER + 520
REPORT_DATA_LEN = 64
INBLOB_MAX = 64


def quote_v4_length(template: bytes) -> int:
    """Length of the v4 quote at the start of ``template``: header, body, u32 length, signature."""
    sig_len = int.from_bytes(template[QUOTE_V4_HEADER + QUOTE_V4_BODY :][:4], "little")
    return QUOTE_V4_HEADER + QUOTE_V4_BODY + 4 + sig_len


def quote_with_report_data(template: bytes, report_data: bytes) -> bytes:
    """``template`` (a v4 quote, trailing bytes dropped) with its REPORTDATA replaced."""
    assert len(report_data) == REPORT_DATA_LEN
    quote = template[: quote_v4_length(template)]
    return quote[:REPORT_DATA_AT] + report_data + quote[REPORT_DATA_AT + REPORT_DATA_LEN :]


@dataclass
class FakeEntry:
    """One report entry: its FIFOs, its state and the threads that serve it."""

    fake: FakeTSM
    path: Path
    inblob: bytes = b""
    write_generation: int = 0
    read_generation: int = 0
    outblob: bytes | None = None
    _pending: bytearray = field(default_factory=bytearray)
    _in_fd: int = -1
    _wake: tuple[int, int] = (-1, -1)
    _stopped: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    OUTPUTS = ("provider", "generation", "outblob")

    def start(self) -> None:
        for name in (*self.OUTPUTS, "inblob"):
            os.mkfifo(self.path / name, 0o600)
        self._open_inblob()
        self._wake = os.pipe()
        for name in self.OUTPUTS:
            t = threading.Thread(target=self._serve, args=(name,), daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._watch_inblob, daemon=True)
        t.start()
        self._threads.append(t)

    # -- inblob: commit on close

    def _open_inblob(self) -> None:
        self._in_fd = os.open(self.path / "inblob", os.O_RDONLY | os.O_NONBLOCK)

    def _drain(self) -> None:
        """Take in what writers of inblob wrote; commit each write whose writer closed.

        Called with the fake's lock held.
        """
        while not self._stopped.is_set():
            poller = select.poll()
            poller.register(self._in_fd, select.POLLIN)
            events = poller.poll(0)
            if not events:
                return  # no writer since the last commit, or one that has not written yet
            try:
                chunk = os.read(self._in_fd, 4096)
            except BlockingIOError:
                return  # a writer is connected and has not closed yet
            if chunk:
                self._pending += chunk
                continue
            # End of file: the writer closed. Reopen so the next writer starts afresh.
            os.close(self._in_fd)
            self._open_inblob()
            if self._pending:
                self._commit(bytes(self._pending))
                self._pending.clear()

    def _commit(self, data: bytes) -> None:
        if len(data) > INBLOB_MAX:
            self.fake.events.append(("rejected", self.path.name, len(data)))
            return
        self.inblob = data
        self.write_generation += 1
        self.fake.events.append(("commit", self.path.name, self.write_generation))
        self.fake.commits.append((self.path.name, self.write_generation, data))
        if self.fake.on_commit is not None:
            self.fake.on_commit(self, self.write_generation)

    def _watch_inblob(self) -> None:
        """Commit writes as their writers close, as the kernel does (reads also drain first)."""
        while not self._stopped.is_set():
            poller = select.poll()
            poller.register(self._in_fd, select.POLLIN)  # reopened by _drain: poll again soon
            poller.register(self._wake[0], select.POLLIN)
            if poller.poll(200):
                with self.fake.lock:
                    if not self._stopped.is_set():
                        self._drain()

    # -- outputs: content computed when a reader opens the file

    def _produce(self, name: str) -> bytes:
        if name == "provider":
            return f"{self.fake.provider}\n".encode()
        if name == "generation":
            return f"{self.write_generation}\n".encode()
        # outblob
        if len(self.inblob) != REPORT_DATA_LEN:
            return b""  # the kernel answers EINVAL: no (or a wrong-sized) request
        if self.outblob is None or self.read_generation != self.write_generation:
            self.outblob = self.fake.make_quote(self.inblob)
            self.read_generation = self.write_generation
        return self.outblob

    def _serve(self, name: str) -> None:
        path = self.path / name
        while not self._stopped.is_set():
            try:
                fd = os.open(path, os.O_WRONLY)  # waits for a reader
            except OSError:
                return
            try:
                if self._stopped.is_set():
                    return
                with self.fake.lock:
                    self._drain()
                    data = self._produce(name)
                    self.fake.events.append(("read", self.path.name, name))
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except BrokenPipeError:
                pass
            finally:
                # The reader sees end of file once no writer holds this pipe. Put a
                # fresh FIFO in place first, so that the next open() of the path (ours
                # or the next reader's) meets a new pipe and not this reader.
                fresh = path.with_name(f".{name}.next")
                os.mkfifo(fresh, 0o600)
                os.rename(fresh, path)
                os.close(fd)

    # -- removal

    def stop(self) -> None:
        self._stopped.set()
        os.write(self._wake[1], b"x")
        # A thread waiting in open() for a reader is released by opening the reader side.
        wakers = [os.open(self.path / name, os.O_RDONLY | os.O_NONBLOCK) for name in self.OUTPUTS]
        try:
            for t in self._threads:
                t.join(timeout=5)
                assert not t.is_alive(), "a fake configfs-tsm thread did not stop"
        finally:
            for fd in wakers:
                os.close(fd)
            os.close(self._in_fd)
            os.close(self._wake[0])
            os.close(self._wake[1])
        for name in (*self.OUTPUTS, "inblob"):
            os.unlink(self.path / name)


class FakeTSM:
    """``/sys/kernel/config/tsm/report`` for tests; pass it as ``configfs=`` to TDXPlatform.

    ``provider`` None means no provider is registered: creating an entry fails
    with ENXIO as the kernel's ``tsm_report_make_item`` does.
    """

    def __init__(
        self,
        root: Path,
        template_quote: bytes,
        *,
        provider: str | None = "tdx_guest",
        make_quote: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.template = template_quote
        self.provider = provider
        self.make_quote = make_quote or (lambda rd: quote_with_report_data(self.template, rd))
        self.lock = threading.RLock()
        self.entries: dict[str, FakeEntry] = {}
        self.events: list[tuple[object, ...]] = []
        self.commits: list[tuple[str, int, bytes]] = []
        self.on_commit: Callable[[FakeEntry, int], None] | None = None

    # ConfigfsItems
    def make_item(self, path: Path) -> None:
        if path.parent != self.root:
            raise OSError(errno.EPERM, "not a report entry", str(path))
        if self.provider is None:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO), str(path))
        os.mkdir(path, 0o700)
        entry = FakeEntry(self, path)
        entry.start()
        with self.lock:
            self.entries[path.name] = entry
            self.events.append(("mkdir", path.name))

    def drop_item(self, path: Path) -> None:
        with self.lock:
            entry = self.entries.pop(path.name, None)
        if entry is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        entry.stop()
        os.rmdir(path)
        with self.lock:
            self.events.append(("rmdir", path.name))

    def close(self) -> None:
        for name in list(self.entries):
            self.drop_item(self.root / name)

    def __enter__(self) -> FakeTSM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def kinds(self, entry: str) -> list[str]:
        """The protocol seen for one entry: "mkdir", "read provider", "commit", ..."""
        out: list[str] = []
        for event in self.events:
            if len(event) < 2 or event[1] != entry:
                continue
            kind = str(event[0])
            out.append(f"{kind} {event[2]}" if kind == "read" else kind)
        return out


def tmp_platform_paths(root: Path) -> PlatformPaths:
    """PlatformPaths with every interface under ``root`` (none of them exists yet)."""
    return PlatformPaths(
        securityfs=root / "sys/kernel/security",
        ccel_table=root / "sys/firmware/acpi/tables/CCEL",
        ccel_data=root / "sys/firmware/acpi/tables/data/CCEL",
        configfs_tsm=root / "sys/kernel/config/tsm/report",
        tdx_guest_device=root / "dev/tdx_guest",
        tdx_rtmr_sysfs=root / "sys/class/misc/tdx_guest/measurements",
        tpm_device=root / "dev/tpmrm0",
    )


def write_measurements(directory: Path, values: dict[str, bytes]) -> Path:
    """A stand-in for ``/sys/class/misc/tdx_guest/measurements``: one file per register."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in values.items():
        (directory / f"{name}:sha384").write_bytes(value)
    return directory
