"""Replay measurement logs into registers and compare them with quoted values.

Replay semantics (DESIGN.md section 2): ``new = H(old || digest)`` per bank;
registers start at zero, except pcr0 after a TPM StartupLocality record;
records that do not extend (EV_NO_ACTION) are skipped. Digests are the logged
ones, never recomputed from event data.

A log that runs ahead of a quote (an IMA list read after the quote was taken)
is matched by :func:`compare_prefix`: it finds the shortest prefix of the log
whose replay equals the quoted values and reports how many records lie beyond.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cima.digests import by_name
from cima.errors import ReplayError, ReplayMismatchError
from cima.eventlog.event import Measurement
from cima.registers import RegisterBank, RegisterValue, sort_key


def _locality_value(locality: int, digest_size: int) -> bytes:
    return bytes(digest_size - 1) + bytes([locality & 0xFF])


@dataclass(slots=True)
class Replayer:
    """Incremental replay: feed records one at a time or in batches.

    ``algorithms`` restricts the banks replayed into; None means every bank a
    record carries a digest for.
    """

    algorithms: tuple[str, ...] | None = None
    bank: RegisterBank = field(default_factory=RegisterBank)
    events: int = 0
    extended: int = 0
    _pcr0_locality: int | None = None

    def __post_init__(self) -> None:
        if self.algorithms is not None:
            self.algorithms = tuple(by_name(a).name for a in self.algorithms)

    def feed(self, event: Measurement) -> None:
        """Replay one record."""
        self.events += 1
        locality = event.startup_locality
        if locality is not None:
            self._set_locality(locality)
        if not event.extends:
            return
        algs = self.algorithms if self.algorithms is not None else event.algorithms()
        register = event.register
        for alg in algs:
            digest = event.replay_digest(alg)
            if digest is None:
                continue
            if (
                register == "pcr0"
                and self._pcr0_locality is not None
                and ("pcr0", alg) not in self.bank
            ):
                size = by_name(alg).digest_size
                self.bank.initialise("pcr0", alg, _locality_value(self._pcr0_locality, size))
            try:
                self.bank.extend(register, alg, digest)
            except ReplayError:
                raise
            except Exception as e:
                raise ReplayError(f"record {self.events - 1}: {e}") from e
        self.extended += 1

    def _set_locality(self, locality: int) -> None:
        if self._pcr0_locality is not None or any(v.register == "pcr0" for v in self.bank):
            raise ReplayError("StartupLocality after pcr0 was already set or extended")
        self._pcr0_locality = locality

    def feed_all(self, events: Iterable[Measurement]) -> None:
        for event in events:
            self.feed(event)


def replay(
    events: Iterable[Measurement],
    algorithms: Iterable[str] | None = None,
    bank: RegisterBank | None = None,
) -> RegisterBank:
    """Replay ``events`` into ``bank`` (a new one by default) and return it."""
    r = Replayer(
        algorithms=tuple(algorithms) if algorithms is not None else None,
        bank=bank if bank is not None else RegisterBank(),
    )
    r.feed_all(events)
    return r.bank


@dataclass(frozen=True, slots=True)
class RegisterComparison:
    """One register's replayed value against the value it should have."""

    register: str
    algorithm: str
    expected: bytes
    actual: bytes

    @property
    def matched(self) -> bool:
        return hmac.compare_digest(self.expected, self.actual)

    def to_dict(self) -> dict[str, object]:
        return {
            "register": self.register,
            "algorithm": self.algorithm,
            "expected": self.expected.hex(),
            "actual": self.actual.hex(),
            "matched": self.matched,
        }


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """How much of a log that may run ahead of a quote the quote covers."""

    matched_events: int
    """Records in the shortest matching prefix (0 when even the empty prefix matches)."""
    beyond: int
    """Records after that prefix: logged, but not covered by the quoted value."""


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """The outcome of comparing replayed registers with expected ones."""

    comparisons: tuple[RegisterComparison, ...]
    events: int
    prefix: PrefixMatch | None = None

    @property
    def mismatches(self) -> tuple[RegisterComparison, ...]:
        return tuple(c for c in self.comparisons if not c.matched)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def raise_for_mismatch(self) -> None:
        """Raise :class:`ReplayMismatchError` naming every mismatched register."""
        bad = self.mismatches
        if bad:
            names = ", ".join(f"{c.register}/{c.algorithm}" for c in bad)
            raise ReplayMismatchError(f"replayed registers differ from expected: {names}")

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "events": self.events,
            "ok": self.ok,
            "registers": [c.to_dict() for c in self.comparisons],
        }
        if self.prefix is not None:
            out["prefix"] = {
                "matched_events": self.prefix.matched_events,
                "beyond": self.prefix.beyond,
            }
        return out


ExpectedValues = Mapping[tuple[str, str], bytes]


def _normalise(expected: ExpectedValues | Iterable[RegisterValue]) -> dict[tuple[str, str], bytes]:
    if isinstance(expected, Mapping):
        return {(r, by_name(a).name): bytes(v) for (r, a), v in expected.items()}
    return {(v.register, by_name(v.algorithm).name): v.digest for v in expected}


def _ordered(keys: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted(keys, key=lambda k: (k[1], sort_key(k[0])))


def compare(
    bank: RegisterBank,
    expected: ExpectedValues | Iterable[RegisterValue],
    events: int = 0,
) -> ReplayResult:
    """Compare every expected register with the replayed bank.

    A register that the log never touched replays to its reset value (zeros).
    """
    exp = _normalise(expected)
    comps = tuple(
        RegisterComparison(reg, alg, exp[(reg, alg)], bank.get(reg, alg))
        for reg, alg in _ordered(exp)
    )
    return ReplayResult(comps, events)


def replay_and_compare(
    events: Iterable[Measurement],
    expected: ExpectedValues | Iterable[RegisterValue],
    algorithms: Iterable[str] | None = None,
) -> ReplayResult:
    """Replay ``events`` in full and compare with ``expected``."""
    exp = _normalise(expected)
    algs = tuple(algorithms) if algorithms is not None else tuple(sorted({a for _, a in exp}))
    r = Replayer(algorithms=algs)
    r.feed_all(events)
    return compare(r.bank, exp, r.events)


def compare_prefix(
    events: Iterable[Measurement],
    expected: ExpectedValues | Iterable[RegisterValue],
    bank: RegisterBank | None = None,
    algorithms: Iterable[str] | None = None,
) -> ReplayResult:
    """Replay a log that may run ahead of ``expected``; accept the shortest matching prefix.

    ``bank`` holds what earlier logs replayed (a boot log that extends the same
    register first); it is not modified. The comparison is made after each
    record: the first point at which every expected register this log touches
    equals its expected value ends the matched prefix. When no prefix matches,
    the comparison of the whole log is returned with ``prefix`` None.
    """
    exp = _normalise(expected)
    algs = tuple(algorithms) if algorithms is not None else tuple(sorted({a for _, a in exp}))
    start = RegisterBank()
    if bank is not None:
        for v in bank:
            start.set(v.register, v.algorithm, v.digest)
    r = Replayer(algorithms=algs, bank=start)
    watched: set[tuple[str, str]] = set(exp)

    def all_match() -> bool:
        return all(
            hmac.compare_digest(r.bank.get(reg, alg), val) for (reg, alg), val in exp.items()
        )

    matched_at: int | None = 0 if all_match() else None
    for event in events:
        r.feed(event)
        if (
            matched_at is None
            and event.extends
            and any((event.register, a) in watched for a in algs)
            and all_match()
        ):
            matched_at = r.events
    if matched_at is None:
        return compare(r.bank, exp, r.events)
    # Re-derive the matched state: the values equal the expected ones by construction.
    comps = tuple(
        RegisterComparison(reg, alg, exp[(reg, alg)], exp[(reg, alg)]) for reg, alg in _ordered(exp)
    )
    return ReplayResult(comps, r.events, PrefixMatch(matched_at, r.events - matched_at))
