"""Replay semantics (DESIGN.md section 2), on records built in the test."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest

from cima.errors import ReplayError, ReplayMismatchError
from cima.eventlog.replay import Replayer, compare_prefix, replay, replay_and_compare


@dataclass(frozen=True)
class Rec:
    register: str
    digests: dict[str, bytes]
    extends: bool = True
    startup_locality: int | None = None

    def algorithms(self) -> tuple[str, ...]:
        return tuple(self.digests)

    def replay_digest(self, algorithm: str) -> bytes | None:
        return self.digests.get(algorithm)


def d256(x: bytes) -> bytes:
    return hashlib.sha256(x).digest()


def ext(old: bytes, new: bytes) -> bytes:
    return hashlib.sha256(old + new).digest()


def test_extend_chain_and_no_action() -> None:
    a, b = d256(b"a"), d256(b"b")
    bank = replay(
        [
            Rec("pcr4", {"sha256": a}),
            Rec("pcr4", {"sha256": d256(b"skip")}, extends=False),
            Rec("pcr4", {"sha256": b}),
        ]
    )
    assert bank.get("pcr4", "sha256") == ext(ext(bytes(32), a), b)


def test_startup_locality_sets_pcr0_start() -> None:
    d = d256(b"crtm")
    bank = replay(
        [
            Rec("pcr0", {"sha256": bytes(32)}, extends=False, startup_locality=3),
            Rec("pcr0", {"sha256": d}),
        ]
    )
    assert bank.get("pcr0", "sha256") == ext(bytes(31) + b"\x03", d)


def test_startup_locality_after_pcr0_extend_is_an_error() -> None:
    with pytest.raises(ReplayError, match="StartupLocality"):
        replay(
            [
                Rec("pcr0", {"sha256": d256(b"x")}),
                Rec("pcr0", {"sha256": bytes(32)}, extends=False, startup_locality=3),
            ]
        )


def test_bank_restriction_and_missing_bank() -> None:
    r = Replayer(algorithms=("sha256",))
    r.feed(Rec("pcr1", {"sha1": hashlib.sha1(b"x").digest(), "sha256": d256(b"x")}))
    assert r.bank.algorithms() == ["sha256"]


def test_compare_names_mismatches() -> None:
    a = d256(b"a")
    result = replay_and_compare(
        [Rec("pcr7", {"sha256": a})],
        {("pcr7", "sha256"): ext(bytes(32), a), ("pcr8", "sha256"): d256(b"not zero")},
    )
    assert not result.ok
    assert [(c.register, c.algorithm) for c in result.mismatches] == [("pcr8", "sha256")]
    with pytest.raises(ReplayMismatchError, match="pcr8/sha256"):
        result.raise_for_mismatch()


def test_prefix_shortest_match_and_beyond() -> None:
    recs = [Rec("pcr10", {"sha256": d256(bytes([i]))}) for i in range(10)]
    value = bytes(32)
    for r in recs[:6]:
        value = ext(value, r.digests["sha256"])
    result = compare_prefix(recs, {("pcr10", "sha256"): value})
    assert result.ok
    assert result.prefix is not None
    assert (result.prefix.matched_events, result.prefix.beyond) == (6, 4)


def test_prefix_no_match_reports_mismatch() -> None:
    recs = [Rec("pcr10", {"sha256": d256(bytes([i]))}) for i in range(3)]
    result = compare_prefix(recs, {("pcr10", "sha256"): d256(b"never")})
    assert not result.ok
    assert result.prefix is None


def test_prefix_starts_from_earlier_logs_bank() -> None:
    boot = replay([Rec("pcr10", {"sha256": d256(b"boot")})])
    ima = [Rec("pcr10", {"sha256": d256(b"ima1")}), Rec("pcr10", {"sha256": d256(b"ima2")})]
    value = ext(ext(bytes(32), d256(b"boot")), d256(b"ima1"))
    result = compare_prefix(ima, {("pcr10", "sha256"): value}, bank=boot)
    assert result.prefix is not None and result.prefix.matched_events == 1
    # the caller's bank is left as it was
    assert boot.get("pcr10", "sha256") == ext(bytes(32), d256(b"boot"))
