"""The verifier's store, on SQLite and on a throwaway PostgreSQL cluster.

Every test runs on both backends (``store_url``): a file SQLite database in the
test's temporary directory, and a fresh database in the session's PostgreSQL
cluster (:mod:`tests.verifier.postgres`; skipped with the reason where the
server binaries or the driver are missing).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text, update

from cima.verifier.store import (
    SCHEMA_VERSION,
    NonceError,
    NotFoundError,
    SchemaVersionError,
    StaleStateError,
    Store,
    StoreError,
    schema_table,
)
from tests.verifier.postgres import postgres_cluster, postgres_url  # noqa: F401


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'verifier.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with Store(store_url, instance="test-a") as s:
        yield s


def _race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(0..n-1) on n threads released together; each outcome or its exception."""
    barrier = threading.Barrier(n)

    def one(i: int) -> Any:
        barrier.wait()
        try:
            return fn(i)
        except Exception as e:
            return e

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


# -- schema --------------------------------------------------------------------------------------


def test_schema_created_on_first_use_with_its_version(store_url: str) -> None:
    with Store(store_url) as s:
        assert s.schema_version() == SCHEMA_VERSION
    with Store(store_url) as s:  # a second open finds it and adds nothing
        assert s.schema_version() == SCHEMA_VERSION
        with s.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM cima_schema")).scalar_one() == 1


def test_newer_schema_version_is_refused(store_url: str) -> None:
    with Store(store_url) as s, s.engine.begin() as conn:
        conn.execute(update(schema_table).values(version=SCHEMA_VERSION + 1))
    with pytest.raises(SchemaVersionError, match=r"schema version 2, written by a newer cima"):
        Store(store_url)


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'v.db'}") as s, s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("sqlite://", "in-memory SQLite"),
        ("sqlite:///:memory:", "in-memory SQLite"),
        ("mysql://u@h/db", "supported are sqlite"),
        ("not a url", "store URL"),
    ],
)
def test_unusable_urls_are_refused(url: str, match: str) -> None:
    with pytest.raises(StoreError, match=match):
        Store(url)


def test_unreachable_postgresql_is_a_store_error() -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(StoreError, match="port 1 failed"):
        Store("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")


# -- challenges ----------------------------------------------------------------------------------


def test_a_nonce_is_consumed_once(store: Store) -> None:
    c = store.create_challenge(node_id="node-1")
    assert len(c.nonce) == 32 and c.expires > c.created
    used = store.consume_challenge(c.nonce)
    assert used.node_id == "node-1" and used.session == c.session
    assert used.consumed_at is not None
    with pytest.raises(NonceError, match="already used") as e:
        store.consume_challenge(c.nonce)
    assert e.value.reason == "used"


def test_unknown_nonce_is_refused(store: Store) -> None:
    with pytest.raises(NonceError, match="not issued by this verifier") as e:
        store.consume_challenge(b"\x01" * 32)
    assert e.value.reason == "unknown"


def test_expired_nonce_is_refused_and_stays_unused(store: Store) -> None:
    now = datetime.now(UTC)
    c = store.create_challenge(ttl=timedelta(seconds=30), now=now)
    with pytest.raises(NonceError, match="expired") as e:
        store.consume_challenge(c.nonce, now=now + timedelta(seconds=31))
    assert e.value.reason == "expired"
    found = store.get_challenge(c.nonce)
    assert found is not None and found.consumed_at is None


def test_a_nonce_of_another_session_is_refused(store: Store) -> None:
    c = store.create_challenge()
    with pytest.raises(NonceError) as e:
        store.consume_challenge(c.nonce, session="someone-else")
    assert e.value.reason == "session"
    assert store.consume_challenge(c.nonce, session=c.session).nonce == c.nonce


def test_two_instances_share_challenges(store_url: str) -> None:
    with Store(store_url, instance="a") as a, Store(store_url, instance="b") as b:
        c = a.create_challenge()
        b.consume_challenge(c.nonce)
        for s in (a, b):
            with pytest.raises(NonceError, match="already used"):
                s.consume_challenge(c.nonce)
        with a.engine.connect() as conn:
            consumed_by = conn.execute(
                text("SELECT consumed_by FROM cima_challenges WHERE nonce = :n"),
                {"n": c.nonce.hex()},
            ).scalar_one()
        assert consumed_by == "b"


def test_eight_concurrent_uses_of_one_nonce_exactly_one_wins(store_url: str) -> None:
    stores = [Store(store_url, instance=f"i{i}") for i in range(2)]
    try:
        c = stores[0].create_challenge()
        outcomes = _race(8, lambda i: stores[i % 2].consume_challenge(c.nonce))
        won = [o for o in outcomes if not isinstance(o, Exception)]
        lost = [o for o in outcomes if isinstance(o, Exception)]
        assert len(won) == 1
        assert all(isinstance(o, NonceError) and o.reason == "used" for o in lost), lost
    finally:
        for s in stores:
            s.close()


def test_thirty_two_concurrent_distinct_nonces_all_win(store: Store) -> None:
    challenges = [store.create_challenge() for _ in range(32)]
    outcomes = _race(32, lambda i: store.consume_challenge(challenges[i].nonce))
    assert [o.nonce for o in outcomes] == [c.nonce for c in challenges]


def test_purge_removes_only_long_expired_challenges(store: Store) -> None:
    now = datetime.now(UTC)
    old = store.create_challenge(ttl=timedelta(seconds=1), now=now - timedelta(days=2))
    fresh = store.create_challenge(now=now)
    assert store.purge_challenges(expired_before=now - timedelta(days=1)) == 1
    assert store.get_challenge(old.nonce) is None
    assert store.get_challenge(fresh.nonce) is not None


@pytest.mark.parametrize("node_id", ["", "-x", "a b", "x" * 254, "ü"])
def test_bad_node_ids_are_refused(store: Store, node_id: str) -> None:
    with pytest.raises(ValueError, match="node id"):
        store.create_challenge(node_id=node_id)


# -- references ----------------------------------------------------------------------------------


def test_reference_sets_are_versioned(store: Store) -> None:
    v1 = store.put_reference("workers", {"version": 1, "name": "a"}, source="version: 1\n")
    same = store.put_reference("workers", {"name": "a", "version": 1})
    v2 = store.put_reference("workers", {"version": 1, "name": "b"})
    assert (v1.version, same.version, v2.version) == (1, 1, 2)
    assert store.get_reference("workers").document == {"version": 1, "name": "b"}
    old = store.get_reference("workers", 1)
    assert old.document == {"version": 1, "name": "a"} and old.source == "version: 1\n"
    assert store.reference_head("workers") == (2, v2.digest)
    assert [(r.name, r.version) for r in store.list_references()] == [("workers", 2)]
    with pytest.raises(NotFoundError):
        store.get_reference("workers", 3)
    with pytest.raises(NotFoundError):
        store.get_reference("nothing")


def test_concurrent_reference_updates_get_distinct_versions(store_url: str) -> None:
    stores = [Store(store_url) for _ in range(2)]
    try:
        outcomes = _race(6, lambda i: stores[i % 2].put_reference("r", {"version": 1, "n": i}))
        assert sorted(o.version for o in outcomes) == [1, 2, 3, 4, 5, 6]
    finally:
        for s in stores:
            s.close()


@pytest.mark.parametrize("name", ["", "a/b", "../x", "x" * 201, ".hidden"])
def test_bad_reference_names_are_refused(store: Store, name: str) -> None:
    with pytest.raises(ValueError, match="reference set name"):
        store.put_reference(name, {"version": 1})


# -- results and node state ------------------------------------------------------------------------


def test_results_are_listed_newest_first(store: Store) -> None:
    store.put_reference("default", {"version": 1})
    ids = [
        store.add_result(
            node_id=f"node-{i % 2}",
            status="affirming",
            document={"i": i},
            reference=("default", 1),
        ).id
        for i in range(5)
    ]
    assert [r.id for r in store.results()] == ids[::-1]
    assert [r.document["i"] for r in store.results(node_id="node-0")] == [4, 2, 0]
    assert [r.id for r in store.results(limit=2, before=ids[3])] == [ids[2], ids[1]]
    latest = store.latest_result("node-1")
    assert latest is not None and latest.document == {"i": 3}
    assert latest.created.tzinfo is not None
    assert store.latest_result("node-9") is None
    assert store.get_result(ids[0]).reference_name == "default"
    assert store.nodes() == ["node-0", "node-1"]


def test_a_result_must_name_a_stored_reference_version(store: Store) -> None:
    with pytest.raises(NotFoundError, match="version 7"):
        store.add_result(node_id="n", status="none", document={}, reference=("default", 7))
    assert store.count_results() == 0


def test_node_state_is_optimistically_versioned(store: Store) -> None:
    assert store.node_state("n").version == 0
    assert store.save_node_state("n", {"ima": 10}, expected_version=0, key_id="k") == 1
    with pytest.raises(StaleStateError):
        store.save_node_state("n", {"ima": 11}, expected_version=0)
    assert store.save_node_state("n", {"ima": 12}, expected_version=1, key_id="k") == 2
    with pytest.raises(StaleStateError):
        store.save_node_state("n", {"ima": 13}, expected_version=1)
    state = store.node_state("n")
    assert (state.version, state.state, state.key_id) == (2, {"ima": 12}, "k")


def test_concurrent_state_writers_from_one_version_exactly_one_wins(store_url: str) -> None:
    stores = [Store(store_url) for _ in range(2)]
    try:
        stores[0].save_node_state("n", {"v": 0}, expected_version=0)
        outcomes = _race(
            8, lambda i: stores[i % 2].save_node_state("n", {"v": i}, expected_version=1)
        )
        assert sum(1 for o in outcomes if o == 2) == 1
        assert sum(1 for o in outcomes if isinstance(o, StaleStateError)) == 7
    finally:
        for s in stores:
            s.close()


# -- the attestation path: one read, then one write that consumes the nonce ---------------


def _begin(store: Store, nonce: bytes, node: str = "n") -> Any:
    return store.begin_attestation(nonce, session=None, reference="default", node=lambda c: node)


def test_an_attestation_consumes_its_nonce_only_when_it_is_stored(store: Store) -> None:
    store.put_reference("default", {"version": 1})
    c = store.create_challenge()
    started = _begin(store, c.nonce)
    assert started.reference[:2] == ("default", 1) and started.node.version == 0
    again = _begin(store, c.nonce)  # nothing was consumed by the first read
    result, saved = store.finish_attestation(
        started, status="affirming", document={"a": 1}, state={"s": 1}, key_id="k"
    )
    assert saved and result.reference_name == "default" and result.session == c.session
    with pytest.raises(NonceError) as e:
        store.finish_attestation(again, status="affirming", document={"a": 2}, state={"s": 2})
    assert e.value.reason == "used"
    assert store.count_results() == 1
    assert store.node_state("n").state == {"s": 1}
    with pytest.raises(NonceError, match="already used"):
        _begin(store, c.nonce)


def test_an_attestation_needs_its_reference_set(store: Store) -> None:
    c = store.create_challenge()
    with pytest.raises(NotFoundError, match="reference set 'default'"):
        _begin(store, c.nonce)


def test_a_newer_state_is_kept_and_the_later_result_still_stored(store: Store) -> None:
    store.put_reference("default", {"version": 1})
    first, second = (_begin(store, store.create_challenge().nonce) for _ in range(2))
    _, saved1 = store.finish_attestation(first, status="affirming", document={}, state={"v": 1})
    _, saved2 = store.finish_attestation(second, status="affirming", document={}, state={"v": 2})
    assert (saved1, saved2) == (True, False)
    assert store.node_state("n").state == {"v": 1}
    assert store.count_results() == 2


def test_eight_concurrent_attestations_with_one_nonce_store_one_result(store_url: str) -> None:
    stores = [Store(store_url, instance=f"i{i}") for i in range(2)]
    try:
        stores[0].put_reference("default", {"version": 1})
        c = stores[0].create_challenge()
        started = [_begin(stores[i % 2], c.nonce, f"n{i}") for i in range(8)]
        outcomes = _race(
            8,
            lambda i: stores[i % 2].finish_attestation(
                started[i], status="affirming", document={}, state={"i": i}
            ),
        )
        assert sum(1 for o in outcomes if not isinstance(o, Exception)) == 1
        assert all(isinstance(o, NonceError) for o in outcomes if isinstance(o, Exception)), (
            outcomes
        )
        assert stores[1].count_results() == 1
    finally:
        for s in stores:
            s.close()


def test_sqlite_synchronous_can_be_relaxed_by_url(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    with Store(url + "?synchronous=normal") as s, s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    with Store(url) as s, s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    with pytest.raises(StoreError, match="synchronous=off"):
        Store(url + "?synchronous=off")


def test_an_unchanged_state_is_not_written_again(store: Store) -> None:
    store.put_reference("default", {"version": 1})
    state = {"ima_entries": 3, "values": {"pcr10": "ab"}}
    _, saved = store.finish_attestation(
        _begin(store, store.create_challenge().nonce),
        status="affirming",
        document={},
        state=state,
        key_id="k",
    )
    assert saved and store.node_state("n").version == 1
    # The same state again (a node with nothing new): stored already, nothing written.
    started = _begin(store, store.create_challenge().nonce)
    assert started.node.state == state and started.node.version == 1
    result, saved = store.finish_attestation(
        started, status="affirming", document={"n": 2}, state=dict(state), key_id="k"
    )
    assert saved and store.node_state("n").version == 1
    assert store.get_result(result.id).document == {"n": 2}
    # Another key, or another state: written.
    for key, new in (("k2", state), ("k2", {**state, "ima_entries": 4})):
        started = _begin(store, store.create_challenge().nonce)
        _, saved = store.finish_attestation(
            started, status="affirming", document={}, state=new, key_id=key
        )
        assert saved and store.node_state("n").version == started.node.version + 1
    assert store.node_state("n").state == {**state, "ima_entries": 4}


def test_an_attestation_reads_the_node_it_names(store: Store) -> None:
    """The node is the challenge's, else the hint; either way its own state is read."""
    store.put_reference("default", {"version": 1})
    for node_id, state in (("a", {"s": "a"}), ("b", {"s": "b"})):
        store.save_node_state(node_id, state, expected_version=0, key_id="k")
    named = store.create_challenge(node_id="a")
    for hint in ("a", "b", None):
        started = store.begin_attestation(
            named.nonce,
            session=None,
            reference="default",
            node=lambda c: c.node_id or "b",
            node_hint=hint,
        )
        assert (started.node.node_id, started.node.state) == ("a", {"s": "a"})
    unnamed = store.create_challenge()
    for hint in ("b", "a", None):
        started = store.begin_attestation(
            unnamed.nonce, session=None, reference="default", node=lambda c: "b", node_hint=hint
        )
        assert (started.node.node_id, started.node.state) == ("b", {"s": "b"})
    fresh = store.begin_attestation(
        unnamed.nonce, session=None, reference="default", node=lambda c: "c", node_hint="c"
    )
    assert (fresh.node.version, fresh.node.state) == (0, None)


def test_a_nonce_that_expired_before_the_result_is_stored_is_refused(store: Store) -> None:
    store.put_reference("default", {"version": 1})
    now = datetime.now(UTC)
    c = store.create_challenge(ttl=timedelta(seconds=30), now=now)
    late = store.begin_attestation(
        c.nonce,
        session=None,
        reference="default",
        node=lambda _: "n",
        now=now + timedelta(seconds=10),
    )
    expired = dataclasses.replace(late, started=now + timedelta(seconds=31))
    with pytest.raises(NonceError, match="expired") as e:
        store.finish_attestation(expired, status="affirming", document={}, state={"s": 1})
    assert e.value.reason == "expired" and store.count_results() == 0
    assert store.node_state("n").version == 0
    result, _ = store.finish_attestation(late, status="affirming", document={}, state={"s": 1})
    assert store.get_result(result.id).status == "affirming"


def test_documents_json_cannot_hold_exactly_are_stored_as_json_writes_them(store: Store) -> None:
    store.put_reference("default", {"version": 1})
    doc = {"big": 2**70, "text": "naïve ✓", "nested": [1.5, None, True]}
    c = store.create_challenge()
    result, _ = store.finish_attestation(_begin(store, c.nonce), status="affirming", document=doc)
    assert store.get_result(result.id).document == doc


def test_a_pooled_postgresql_connection_closed_while_idle_is_replaced(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No round trip before each use; one that sat idle is tested first."""
    import cima.verifier.store as store_module

    url: str = request.getfixturevalue("postgres_url")
    monkeypatch.setattr(store_module, "_PING_IDLE_AFTER", 0.0)
    with Store(url, pool_size=1) as s:
        s.put_reference("default", {"version": 1})
        with s.engine.connect() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with Store(url) as other, other.engine.begin() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        c = s.create_challenge()
        assert s.consume_challenge(c.nonce).session == c.session
