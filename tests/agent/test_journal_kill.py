"""SIGKILL at random points during a long run of appends, and a reconcile after every kill.

A child process (forked from this one, which has imported everything already)
opens its own platform connection and the journal and appends events in a
loop; the parent kills it with SIGKILL after a random delay, waits for it, then
opens the journal again (the reconcile of DESIGN.md section 6) with a fresh
platform connection and checks that

- the journal's committed events replay, from its start value, exactly to the
  register value read from the platform (recomputed here with hashlib): no
  event whose extend reached the register is missing, and no journaled event
  was not extended;
- every event's content hashes to its digest and the sequence numbers run
  0, 1, 2, ... without a gap;
- what was committed before is still there, unchanged (a prefix).

Records are written by the child in many small writes (1 to 16 bytes), so that
a kill can land between any two of them, leaving on disk any prefix of a
record, as a power cut could. Some events are several kilobytes, spanning
pages. Some kills land before the child has finished opening the journal
(inside its own reconcile).

The run must have exercised every case: a pending record whose extend had
reached the register (committed at the reconcile), one whose extend had not
(dropped), and a torn last record (truncated). Against swtpm: at least 500
kills, sha256 in pcr13 and sha384 in pcr16 alternately; against the software
platform (registers in a state directory): fewer.
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cima.agent.journal import Journal
from cima.platform.base import Platform
from cima.platform.software import SoftwarePlatform
from cima.platform.tpm import TPMPlatform
from tests.platform.swtpm import SWTPM

BOOT = bytes(range(16))


class ChunkedJournal(Journal):
    """A journal whose records reach the file in small pieces (see the module docstring)."""

    rng = random.Random(0)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view[: self.rng.randint(1, 16)])
            view = view[n:]


@dataclass
class Variant:
    name: str
    register: str
    algorithm: str
    directory: Path
    committed: list[bytes] = field(default_factory=list)


@dataclass
class Run:
    stats: Counter[str] = field(default_factory=Counter)
    events: int = 0


def _child(
    variant: Variant, connect: Callable[[], Platform], ready_fd: int, error_file: Path, seed: int
) -> None:
    """The killed process: open, signal readiness, append until killed. Never returns."""
    code = 0
    try:
        ChunkedJournal.rng = random.Random(seed)
        rng = random.Random(seed + 1)
        platform = connect()
        j = ChunkedJournal.open(
            variant.directory,
            platform=platform,
            register=variant.register,
            algorithm=variant.algorithm,
            boot_id=BOOT,
        )
        os.write(ready_fd, b"r")
        n = len(j)
        while True:
            pad = rng.randint(4000, 9000) if rng.random() < 0.1 else rng.randint(0, 300)
            j.append(
                kind="marker",
                scope="node",
                subject="kill-test",
                data={"n": n, "pid": os.getpid(), "pad": "x" * pad},
            )
            n += 1
    except BaseException:
        error_file.write_text(traceback.format_exc())
        code = 3
    finally:
        os._exit(code)


def _wait_ready(fd: int, timeout: float) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r) and os.read(fd, 1) == b"r"


def _delay(rng: random.Random) -> float:
    roll = rng.random()
    if roll < 0.3:
        return rng.uniform(0, 0.0005)
    if roll < 0.8:
        return rng.uniform(0.0005, 0.003)
    return rng.uniform(0.003, 0.012)


def _pause(seconds: float) -> None:
    """Wait precisely (short waits spin: sleep overshoots by more than they last)."""
    end = time.perf_counter() + seconds
    if seconds > 0.002:
        time.sleep(seconds - 0.001)
    while time.perf_counter() < end:
        pass


def _verify(variant: Variant, connect: Callable[[], Platform], run: Run) -> None:
    platform = connect()
    try:
        j = Journal.open(
            variant.directory,
            platform=platform,
            register=variant.register,
            algorithm=variant.algorithm,
            boot_id=BOOT,
        )
        try:
            r = j.recovery
            assert not r.new_epoch
            if r.committed_seq is not None:
                run.stats["pending committed"] += 1
            if r.dropped_seq is not None:
                run.stats["pending dropped"] += 1
            if r.torn_offset is not None:
                run.stats["torn truncated"] += 1
            if r.clean:
                run.stats["clean"] += 1
            digests = j.digests()
            # Replayed here, independently, from the start value to the register.
            value = j.start_value
            for d in digests:
                value = hashlib.new(variant.algorithm, value + d).digest()
            assert value == platform.read(variant.register, variant.algorithm)
            # Nothing committed earlier is lost or changed.
            before = variant.committed
            assert digests[: len(before)] == before
            # The new events: contiguous, and their contents hash to their digests.
            for e in j.events(max(0, len(before) - 1)):
                assert e.content_matches_digest()
                assert e.digest == digests[e.seq]
            assert [e.seq for e in j.events(0, 3)] == list(range(min(3, len(digests))))
            variant.committed = digests
            run.events = max(run.events, len(digests))
        finally:
            j.close()
    finally:
        platform.close()


def _kill_run(
    variants: list[Variant],
    connect: Callable[[], Platform],
    kills: int,
    tmp_path: Path,
    seed: int,
) -> Run:
    rng = random.Random(seed)
    run = Run()
    error_file = tmp_path / "child-error.txt"
    for k in range(kills):
        variant = variants[k % len(variants)]
        read_fd, write_fd = os.pipe()
        child_seed = rng.randrange(1 << 30)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            os.close(read_fd)
            _child(variant, connect, write_fd, error_file, child_seed)
        os.close(write_fd)
        try:
            if rng.random() < 0.12:
                # Kill during the child's start: its connection or its own reconcile.
                run.stats["killed while opening"] += 1
                _pause(rng.uniform(0, 0.004))
            else:
                assert _wait_ready(read_fd, 10), "the child did not open the journal"
                _pause(_delay(rng))
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        finally:
            os.close(read_fd)
        if not os.WIFSIGNALED(status):
            detail = error_file.read_text() if error_file.exists() else ""
            pytest.fail(f"kill {k}: the child exited by itself ({status}):\n{detail}")
        run.stats["kills"] += 1
        _verify(variant, connect, run)
    # A last, full check of every event's content.
    for variant in variants:
        platform = connect()
        try:
            with Journal.open(
                variant.directory,
                platform=platform,
                register=variant.register,
                algorithm=variant.algorithm,
                boot_id=BOOT,
            ) as j:
                events = j.events()
                assert [e.seq for e in events] == list(range(len(events)))
                assert all(e.content_matches_digest() for e in events)
                j.check()
        finally:
            platform.close()
    return run


def _report(name: str, run: Run, elapsed: float, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        stats = ", ".join(f"{k} {v}" for k, v in sorted(run.stats.items()))
        print(f"\n[kill {name}] {elapsed:.1f} s: {stats}; longest journal {run.events} events")


def _assert_exercised(run: Run, kills: int) -> None:
    assert run.stats["kills"] == kills
    assert run.stats["pending committed"] >= 1
    assert run.stats["pending dropped"] >= 1
    assert run.stats["torn truncated"] >= 1


@pytest.mark.slow
def test_sigkill_against_swtpm(
    swtpm: SWTPM, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kills = 520
    variants = [
        Variant("sha256", "pcr13", "sha256", tmp_path / "j256"),
        Variant("sha384", "pcr16", "sha384", tmp_path / "j384"),
    ]

    def connect() -> Platform:
        return TPMPlatform(swtpm.tcti)

    start = time.monotonic()
    run = _kill_run(variants, connect, kills, tmp_path, seed=20240613)
    _report("swtpm", run, time.monotonic() - start, capsys)
    _assert_exercised(run, kills)


@pytest.mark.slow
def test_sigkill_against_software_platform(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kills = 300
    state = tmp_path / "state"
    SoftwarePlatform(state, algorithms=("sha256", "sha384")).close()
    variants = [Variant("sha256", "pcr13", "sha256", tmp_path / "j")]

    def connect() -> Platform:
        return SoftwarePlatform(state, algorithms=("sha256", "sha384"))

    start = time.monotonic()
    run = _kill_run(variants, connect, kills, tmp_path, seed=7)
    _report("software", run, time.monotonic() - start, capsys)
    _assert_exercised(run, kills)
