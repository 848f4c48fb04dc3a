"""The verifier's store: reference values, challenges, results and per-node appraisal state.

One SQL database shared by every instance of the verifier service (DESIGN.md
section 3): SQLite by default (a file, nothing to start), PostgreSQL for a
cluster of verifier instances (``postgresql+psycopg://user@host:port/db``).
SQLAlchemy Core, synchronous; every method is one short transaction, safe to
call from many threads.

Tables (schema version :data:`SCHEMA_VERSION`, created on first use):

``cima_schema``
    one row: the schema version this database holds. A database written by a
    newer cima (a higher version) is refused with :class:`SchemaVersionError`
    before anything is created in it.
``cima_references``
    named sets of reference values, every ``put`` a new version (1, 2, ...):
    the document (the reference values as a JSON object), the text as it was
    uploaded (YAML or JSON) and the SHA-256 of the canonical document.
``cima_challenges``
    the nonces this verifier cluster handed out: nonce, session id, the node
    it was asked for (optional), when it was created, when it expires and when
    it was consumed. A nonce is accepted once across every instance: consuming
    it is one ``UPDATE ... SET consumed_at = now WHERE nonce = :n AND
    consumed_at IS NULL AND expires > now`` that must change exactly one row;
    the database serialises concurrent attempts, so exactly one wins. Unknown,
    expired and already consumed nonces are refused with :class:`NonceError`
    (its ``reason`` says which). An attestation reads what it needs in one
    statement (:meth:`Store.begin_attestation`: the challenge, the reference
    set's latest version, the node's state) and, after the appraisal, consumes
    the nonce and stores its result and the node's new state in one
    transaction (:meth:`Store.finish_attestation`; on PostgreSQL one statement,
    the nonce's UPDATE a data-modifying CTE that the other writes depend on):
    of two attestations with one nonce, the one that commits first wins and
    the other stores nothing.
``cima_results``
    attestation results: node id, time, status, the result document, the
    signed token (JWT) when the service signs results, the reference set
    (name and version, a foreign key) it was appraised against, and the key
    that signed the evidence.
``cima_node_state``
    the incremental appraisal state of each node (a JSON object), with a
    version counter for optimistic concurrency: a writer names the version it
    read, and :class:`StaleStateError` tells it another instance wrote first.
    An attestation that leaves the state as it was read (a node that attests
    again with nothing new) does not write it.
``cima_enrollments``
    the enrollments of attestation keys by EK certificate (credential
    activation): a random id, the node, the AK's TPM name and public area, the
    SHA-256 and subject of the EK certificate, the SHA-256 of the credential's
    secret (never the secret), when it was created, when it expires, its state
    (``pending``, ``enrolled``, ``refused``) and when it was spent. An
    enrollment is activated once across every instance: the first attempt
    spends it whatever its outcome (one transaction that locks the row; a
    wrong secret leaves it ``refused``). Unknown, expired and already spent
    enrollments are refused with :class:`EnrollmentError` (its ``reason``
    says which).
``cima_enrolled_keys``
    the attestation keys enrolled so, by TPM name (hex): the node, the public
    area, the EK certificate's SHA-256 and subject, when and by which
    enrollment. An attestation reads its AK's row in the statement that reads
    its challenge (:meth:`Store.begin_attestation`).

Tables missing from a database of this schema version (one written before
they were added) are created when the store is opened.

Times are stored in UTC (timezone-aware in PostgreSQL, naive UTC in SQLite)
and compared with the clock of the instance that asks, so the instances of a
cluster need synchronised clocks (NTP), as every nonce-based protocol does.

SQLite is opened in WAL mode with foreign keys on, a 30 s busy timeout, and
write transactions begun with ``BEGIN IMMEDIATE`` so that concurrent writers
queue instead of failing on a lock upgrade; the writers of one store queue on
a lock of their own first (a thread lock, then an exclusive ``flock`` of
``FILE-writer.lock`` beside the database, which the kernel hands to the next
process at once, where SQLite's busy handler would make it sleep and poll), so
the worker processes of one instance share one SQLite file without waiting on
each other more than their writes take. Commits are synchronous
(``synchronous=FULL``: a consumed nonce survives a power cut);
``sqlite:///FILE?synchronous=normal`` trades that for speed (a commit then
survives a crash of the process, not of the machine: after a power cut the
last nonces consumed could be accepted again until they expire).

PostgreSQL runs a statement that stands alone (a challenge's INSERT, the
attestation's read) in autocommit, one round trip; a pooled connection is
tested before use only when it has been idle for a while (a busy pool uses its
connections without an extra round trip), and a server that does not accept a
connection fails it after ``connect_timeout`` (10 s unless the URL says).
JSON columns are written and read with orjson.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    BindParameter,
    Column,
    Connection,
    DateTime,
    Dialect,
    Engine,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    NoSuchModuleError,
)

from cima.errors import CimaError

__all__ = [
    "DEFAULT_URL",
    "Attestation",
    "EnrolledKey",
    "Enrollment",
    "EnrollmentError",
    "NONCE_SIZE",
    "SCHEMA_VERSION",
    "Challenge",
    "NodeState",
    "NonceError",
    "NotFoundError",
    "ReferenceRecord",
    "SchemaVersionError",
    "StaleStateError",
    "Store",
    "StoreError",
    "StoredResult",
    "check_name",
    "check_node_id",
]

#: The schema this cima writes. Raise it with a migration when a table changes.
SCHEMA_VERSION = 1
#: Where ``cima verifier serve`` keeps its store without ``--store``.
DEFAULT_URL = "sqlite:///cima-verifier.db"
#: Bytes of a fresh nonce.
NONCE_SIZE = 32
#: How long a challenge's nonce stays usable by default.
DEFAULT_CHALLENGE_TTL = timedelta(minutes=5)
#: How long an enrollment's credential can be activated by default.
DEFAULT_ENROLLMENT_TTL = timedelta(minutes=5)
#: The longest TPM name (hex) stored: a 2-byte algorithm and a digest of up to 64 bytes.
_TPM_NAME_HEX = 2 * (2 + 64)

_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,252}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_PG_INIT_LOCK = 0x63696D61  # "cima": serialises schema creation between instances


class StoreError(CimaError):
    """The store cannot be opened or used."""


class SchemaVersionError(StoreError):
    """The database holds a schema this cima does not know."""


class NotFoundError(StoreError, LookupError):
    """No such reference set, version or node."""


class StaleStateError(StoreError):
    """Another instance updated a node's appraisal state since it was read."""


NonceRefusal = Literal["unknown", "expired", "used", "session"]


class NonceError(StoreError):
    """A nonce that is not (or no longer) acceptable; ``reason`` says why."""

    def __init__(self, reason: NonceRefusal, message: str) -> None:
        self.reason: NonceRefusal = reason
        super().__init__(message)


EnrollmentRefusal = Literal["unknown", "expired", "used", "wrong-secret"]


class EnrollmentError(StoreError):
    """An enrollment that cannot be activated; ``reason`` says why.

    ``unknown``: no such enrollment; ``expired``: not activated in time;
    ``used``: already spent by an earlier attempt; ``wrong-secret``: the
    secret is not the credential's (the enrollment is now spent, ``refused``).
    """

    def __init__(self, reason: EnrollmentRefusal, message: str) -> None:
        self.reason: EnrollmentRefusal = reason
        super().__init__(message)


def check_node_id(node_id: str) -> str:
    """A node id: 1..253 characters of letters, digits and ``._:@-`` (a DNS name fits)."""
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise ValueError(
            f"node id {node_id!r}: 1 to 253 letters, digits or '._:@-', starting with a "
            "letter or digit"
        )
    return node_id


def check_name(name: str) -> str:
    """A reference set name: 1..200 letters, digits or ``._-``, starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"reference set name {name!r}: 1 to 200 letters, digits or '._-', starting with "
            "a letter or digit"
        )
    return name


def _json_dumps(document: Any) -> str:
    """A JSON column's text (orjson; json for what orjson does not take, an int over 64 bits)."""
    try:
        return orjson.dumps(document, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(document)


def _json_loads(text: str | bytes) -> Any:
    """A JSON column's value (orjson; json for what orjson refuses, NaN or big integers)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def canonical_json(document: Any) -> bytes:
    """The canonical JSON bytes of a document (sorted keys, no spaces)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


# -- column types ------------------------------------------------------------------------------


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC time: ``timestamptz`` in PostgreSQL, naive UTC text in SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("a stored time must be timezone-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_JSON = JSON().with_variant(JSONB(), "postgresql")
_ID = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER keys only

metadata = MetaData()

schema_table = Table(
    "cima_schema",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("version", Integer, nullable=False),
    Column("created", UTCDateTime, nullable=False),
)

references_table = Table(
    "cima_references",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("created", UTCDateTime, nullable=False),
    Column("digest", String(64), nullable=False),
    Column("document", _JSON, nullable=False),
    Column("source", Text, nullable=True),
    Column("media_type", String(64), nullable=True),
)

challenges_table = Table(
    "cima_challenges",
    metadata,
    Column("nonce", String(2 * NONCE_SIZE), primary_key=True),
    Column("session", String(64), nullable=False, unique=True),
    Column("node_id", String(253), nullable=True),
    Column("created", UTCDateTime, nullable=False),
    Column("expires", UTCDateTime, nullable=False, index=True),
    Column("consumed_at", UTCDateTime, nullable=True),
    Column("consumed_by", String(200), nullable=True),
)

results_table = Table(
    "cima_results",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("node_id", String(253), nullable=False),
    Column("created", UTCDateTime, nullable=False),
    Column("status", String(32), nullable=False),
    Column("session", String(64), nullable=True),
    Column("reference_name", String(200), nullable=True),
    Column("reference_version", Integer, nullable=True),
    Column("instance", String(200), nullable=True),
    Column("key_id", String(128), nullable=True),
    Column("document", _JSON, nullable=False),
    Column("token", Text, nullable=True),
    ForeignKeyConstraint(
        ["reference_name", "reference_version"],
        ["cima_references.name", "cima_references.version"],
        name="fk_results_reference",
    ),
    Index("ix_cima_results_node", "node_id", "id"),
)

node_state_table = Table(
    "cima_node_state",
    metadata,
    Column("node_id", String(253), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("key_id", String(128), nullable=True),
    Column("updated", UTCDateTime, nullable=False),
    Column("state", _JSON, nullable=False),
)

enrollments_table = Table(
    "cima_enrollments",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("node_id", String(253), nullable=False),
    Column("ak_name", String(_TPM_NAME_HEX), nullable=False),
    Column("ak_public", Text, nullable=False),
    Column("ek_certificate_sha256", String(64), nullable=False),
    Column("ek_subject", Text, nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("created", UTCDateTime, nullable=False),
    Column("expires", UTCDateTime, nullable=False, index=True),
    Column("state", String(16), nullable=False),
    Column("spent", UTCDateTime, nullable=True),
    Column("instance", String(200), nullable=True),
)

enrolled_keys_table = Table(
    "cima_enrolled_keys",
    metadata,
    Column("ak_name", String(_TPM_NAME_HEX), primary_key=True),
    Column("node_id", String(253), nullable=False, index=True),
    Column("ak_public", Text, nullable=False),
    Column("ek_certificate_sha256", String(64), nullable=False),
    Column("ek_subject", Text, nullable=False),
    Column("enrolled", UTCDateTime, nullable=False),
    Column("enrollment", String(64), nullable=False),
)


# -- the statements of the attestation path, built once (bound by name at each execution) ------

_c = challenges_table.c
_INSERT_CHALLENGE = challenges_table.insert()
_SELECT_CHALLENGE = select(challenges_table).where(_c.nonce == bindparam("p_nonce"))
_CONSUME = (
    update(challenges_table)
    .where(
        (_c.nonce == bindparam("p_nonce"))
        & _c.consumed_at.is_(None)
        & (_c.expires > bindparam("p_when", type_=UTCDateTime()))
    )
    .values(consumed_at=bindparam("p_when", type_=UTCDateTime()), consumed_by=bindparam("p_by"))
)
_CONSUME_SESSION = _CONSUME.where(_c.session == bindparam("p_session"))
_REFERENCE_HEAD = (
    select(references_table.c.version, references_table.c.digest)
    .where(references_table.c.name == bindparam("p_name"))
    .order_by(references_table.c.version.desc())
    .limit(1)
)
_SELECT_STATE = select(node_state_table).where(node_state_table.c.node_id == bindparam("p_node"))
_UPDATE_STATE = (
    update(node_state_table)
    .where(
        (node_state_table.c.node_id == bindparam("p_node"))
        & (node_state_table.c.version == bindparam("p_version"))
    )
    .values(
        version=bindparam("p_new_version"),
        key_id=bindparam("p_key"),
        updated=bindparam("p_when", type_=UTCDateTime()),
        state=bindparam("p_state", type_=_JSON),
    )
)
# rowcount of an INSERT is not reliable on every driver unless asked for (psycopg gives -1).
_INSERT_STATE = {
    "postgresql": pg_insert(node_state_table)
    .on_conflict_do_nothing()
    .execution_options(preserve_rowcount=True),
    "sqlite": sqlite_insert(node_state_table)
    .on_conflict_do_nothing()
    .execution_options(preserve_rowcount=True),
}
_INSERT_RESULT = results_table.insert()
_s = node_state_table.c
_r = references_table.c
_k = enrolled_keys_table.c
# The challenge, the reference set's latest version, the node's state and the enrolled key
# of the report's AK (its TPM name, when it has one), in one statement.
_BEGIN_ATTESTATION = (
    select(
        challenges_table,
        select(_r.version)
        .where(_r.name == bindparam("p_name"))
        .order_by(_r.version.desc())
        .limit(1)
        .scalar_subquery()
        .label("ref_version"),
        select(_r.digest)
        .where(_r.name == bindparam("p_name"))
        .order_by(_r.version.desc())
        .limit(1)
        .scalar_subquery()
        .label("ref_digest"),
        _s.node_id.label("state_node"),
        _s.version.label("state_version"),
        _s.state,
        _s.key_id,
        _k.ak_name.label("enrolled_ak_name"),
        _k.node_id.label("enrolled_node"),
        _k.ak_public.label("enrolled_ak_public"),
        _k.ek_certificate_sha256.label("enrolled_ek_sha256"),
        _k.ek_subject.label("enrolled_ek_subject"),
        _k.enrolled.label("enrolled_at"),
        _k.enrollment.label("enrolled_by"),
    )
    .select_from(
        challenges_table.outerjoin(
            node_state_table,
            _s.node_id == func.coalesce(_c.node_id, bindparam("p_node", type_=String())),
        ).outerjoin(enrolled_keys_table, _k.ak_name == bindparam("p_ak", type_=String()))
    )
    .where(_c.nonce == bindparam("p_nonce"))
)
_SELECT_ENROLLED_KEY = select(enrolled_keys_table).where(_k.ak_name == bindparam("p_ak"))
del _c, _s, _r, _k


_PG_FINISH = """
WITH consumed AS (
    UPDATE cima_challenges SET consumed_at = :p_when, consumed_by = :p_by
    WHERE nonce = :p_nonce AND session = :p_session
        AND consumed_at IS NULL AND expires > :p_when
    RETURNING nonce
){state}
INSERT INTO cima_results (node_id, created, status, session, reference_name,
    reference_version, instance, key_id, document, token)
SELECT :p_node, :p_created, :p_status, :p_session, :p_ref_name, :p_ref_version, :p_by,
    :p_key, :p_document, :p_token
FROM consumed
RETURNING id, {saved} AS saved
"""
_PG_STATE = {
    "none": "",
    "update": """, saved AS (
    UPDATE cima_node_state
    SET version = :p_new_version, key_id = :p_key, updated = :p_created, state = :p_state
    WHERE node_id = :p_node AND version = :p_version AND EXISTS (SELECT 1 FROM consumed)
    RETURNING 1
)""",
    "insert": """, saved AS (
    INSERT INTO cima_node_state (node_id, version, key_id, updated, state)
    SELECT :p_node, 1, :p_key, :p_created, :p_state WHERE EXISTS (SELECT 1 FROM consumed)
    ON CONFLICT DO NOTHING
    RETURNING 1
)""",
}
_PG_FINISH_STATEMENTS: dict[str, Any] = {}


def _pg_finish_statement(mode: str) -> Any:
    """finish_attestation as one PostgreSQL statement; ``mode``: none, insert or update state."""
    found = _PG_FINISH_STATEMENTS.get(mode)
    if found is None:
        binds: list[BindParameter[Any]] = [
            bindparam("p_when", type_=UTCDateTime()),
            bindparam("p_created", type_=UTCDateTime()),
            bindparam("p_document", type_=_JSON),
            bindparam("p_ref_version", type_=Integer()),
        ]
        if mode != "none":
            binds.append(bindparam("p_state", type_=_JSON))
        found = text(
            _PG_FINISH.format(
                state=_PG_STATE[mode],
                saved="0" if mode == "none" else "(SELECT count(*) FROM saved)",
            )
        ).bindparams(*binds)
        _PG_FINISH_STATEMENTS[mode] = found
    return found


# -- records -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReferenceRecord:
    """One version of a named reference set."""

    name: str
    version: int
    created: datetime
    digest: str
    """SHA-256 (hex) of the document's canonical JSON."""
    document: dict[str, Any]
    source: str | None = None
    """The text as uploaded (YAML or JSON), when there was one."""
    media_type: str | None = None

    def to_dict(self, *, with_document: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "created": _rfc3339(self.created),
            "digest": self.digest,
        }
        if with_document:
            out["document"] = self.document
        return out


@dataclass(frozen=True, slots=True)
class Challenge:
    """A nonce handed out by the verifier, and what became of it."""

    nonce: bytes
    session: str
    node_id: str | None
    created: datetime
    expires: datetime
    consumed_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "nonce": self.nonce.hex(),
            "session": self.session,
            "node_id": self.node_id,
            "expires": _rfc3339(self.expires),
        }


@dataclass(frozen=True, slots=True)
class StoredResult:
    """An attestation result as stored."""

    id: int
    node_id: str
    created: datetime
    status: str
    document: dict[str, Any]
    token: str | None
    session: str | None
    reference_name: str | None
    reference_version: int | None
    key_id: str | None = None
    """The key that signed the evidence (``sha256:<hex>`` of its public key)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "node_id": self.node_id,
            "key_id": self.key_id,
            "created": _rfc3339(self.created),
            "status": self.status,
            "session": self.session,
            "reference": (
                None
                if self.reference_name is None
                else {"name": self.reference_name, "version": self.reference_version}
            ),
            "result": self.document,
            "token": self.token,
        }


@dataclass(frozen=True, slots=True)
class NodeState:
    """A node's incremental appraisal state; ``version`` 0 means none stored yet."""

    node_id: str
    version: int
    state: dict[str, Any] | None
    key_id: str | None = None


@dataclass(frozen=True, slots=True)
class Enrollment:
    """An enrollment of an attestation key by EK certificate, as stored (no secret)."""

    id: str
    node_id: str
    ak_name: bytes
    """The AK's TPM name: the credential is bound to it."""
    ak_public: bytes
    """The AK's TPM2B_PUBLIC."""
    ek_certificate_sha256: str
    ek_subject: str
    created: datetime
    expires: datetime
    state: str
    """``pending``, ``enrolled`` or ``refused``."""
    spent: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "node_id": self.node_id,
            "ak_name": self.ak_name.hex(),
            "ek_certificate_sha256": self.ek_certificate_sha256,
            "ek_subject": self.ek_subject,
            "created": _rfc3339(self.created),
            "expires": _rfc3339(self.expires),
            "state": self.state,
            "spent": None if self.spent is None else _rfc3339(self.spent),
        }


@dataclass(frozen=True, slots=True)
class EnrolledKey:
    """An attestation key enrolled by EK certificate: trusted in the appraisal's step 2."""

    ak_name: bytes
    node_id: str
    ak_public: bytes
    ek_certificate_sha256: str
    ek_subject: str
    enrolled: datetime
    enrollment: str
    """The id of the enrollment that enrolled it."""

    def description(self) -> str:
        """How step 2 of an appraisal names the key's trust."""
        return (
            f"enrolled by EK certificate ({self.ek_subject}, "
            f"{self.enrolled.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%SZ')})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ak_name": self.ak_name.hex(),
            "node_id": self.node_id,
            "ak_public": self.ak_public.hex(),
            "ek_certificate_sha256": self.ek_certificate_sha256,
            "ek_subject": self.ek_subject,
            "enrolled": _rfc3339(self.enrolled),
            "enrollment": self.enrollment,
        }


@dataclass(frozen=True, slots=True)
class Attestation:
    """What an attestation starts from (:meth:`Store.begin_attestation`)."""

    challenge: Challenge
    started: datetime
    """When the evidence arrived: the nonce must be unexpired at this time."""
    reference: tuple[str, int, str]
    """The reference set: name, latest version, digest."""
    node: NodeState
    """The node and its stored appraisal state."""
    enrolled: EnrolledKey | None = None
    """The enrolled key of the report's AK (asked for by its TPM name), if it is one."""


def _rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utc_now() -> datetime:
    return datetime.now(UTC)


# -- the store ---------------------------------------------------------------------------------


class Store:
    """The verifier's database (see the module docstring).

    ``url`` is an SQLAlchemy URL: ``sqlite:///path/to/file.db`` (the default,
    :data:`DEFAULT_URL`) or ``postgresql+psycopg://user:password@host:port/db``.
    The schema is created on first use. ``instance`` names this verifier
    instance in what it writes (which instance consumed a nonce, wrote a result).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        instance: str | None = None,
        pool_size: int = 16,
        echo: bool = False,
    ) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError as e:
            raise StoreError(f"store URL {url!r}: {e}") from e
        self.url = parsed.render_as_string(hide_password=True)
        self.instance = instance or f"verifier-{secrets.token_hex(4)}"
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {
            "echo": echo,
            "future": True,
            "json_serializer": _json_dumps,
            "json_deserializer": _json_loads,
        }
        if self.dialect == "sqlite":
            database = parsed.database or ""
            if database in ("", ":memory:") or database.startswith("file::memory:"):
                raise StoreError(
                    f"store URL {self.url}: an in-memory SQLite database is private to one "
                    "connection; give a file (sqlite:///path/verifier.db)"
                )
            synchronous = str(parsed.query.get("synchronous", "full")).lower()
            if synchronous not in ("full", "normal"):
                raise StoreError(
                    f"store URL {self.url}: synchronous={synchronous}: give full or normal"
                )
            parsed = parsed.difference_update_query(["synchronous"])
            kwargs["connect_args"] = {"timeout": 30.0, "check_same_thread": False}
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = pool_size
        elif self.dialect == "postgresql":
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = pool_size
            if "connect_timeout" not in parsed.query:
                # A server that does not answer fails a request in seconds, not when TCP
                # gives up (the service may run the store's work on its event loop).
                kwargs["connect_args"] = {"connect_timeout": _CONNECT_TIMEOUT}
        else:
            raise StoreError(
                f"store URL {self.url}: supported are sqlite:///FILE and "
                "postgresql+psycopg://USER@HOST:PORT/DB"
            )
        try:
            self._engine: Engine = create_engine(parsed, **kwargs)
        except (NoSuchModuleError, ImportError) as e:
            raise StoreError(
                f"store URL {self.url}: its database driver is not installed ({e}); for "
                "PostgreSQL install cima[postgresql]"
            ) from e
        self._write_lock: _WriterLock | None = None
        # Statements that stand alone (one INSERT, one SELECT) need no transaction of
        # their own: PostgreSQL runs them in autocommit, one round trip each.
        self._single: Engine = self._engine
        if self.dialect == "sqlite":
            _configure_sqlite(self._engine, synchronous.upper())
            self._write_lock = _WriterLock(database)
        else:
            _ping_idle_connections(self._engine)
            self._single = self._engine.execution_options(isolation_level="AUTOCOMMIT")
        try:
            self._create_schema()
        except DBAPIError as e:
            self._engine.dispose()
            raise StoreError(f"store {self.url}: cannot open: {_db_reason(e)}") from e
        except BaseException:
            self._engine.dispose()
            raise

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()
        if self._write_lock is not None:
            self._write_lock.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------------------
    @contextmanager
    def _tx(self, *, write: bool = False, single: bool = False) -> Iterator[Connection]:
        """A connection in a transaction (``single``: for one statement, which is atomic).

        ``single`` runs the statement in autocommit where that saves round trips
        (PostgreSQL); SQLite, in process, runs it in a transaction as any other.
        """
        if single and self._single is not self._engine:
            try:
                with self._single.connect() as conn:
                    yield conn
            except DBAPIError as e:
                if isinstance(e, IntegrityError):
                    raise
                raise StoreError(f"store {self.url}: {_db_reason(e)}") from e
            return
        # SQLite has one writer at a time; a writer that finds the lock taken sleeps in
        # the busy handler (up to 100 ms a turn) instead of being woken, so writers
        # queue on a lock of their own first (_WriterLock: this process's threads, then
        # the processes of this store), and meet SQLite's lock only when another
        # program writes.
        lock = self._write_lock if write and self._write_lock is not None else nullcontext()
        try:
            with lock, self._engine.connect() as conn:
                if write:
                    conn.execution_options(cima_write=True)
                with conn.begin():
                    yield conn
        except DBAPIError as e:
            if isinstance(e, IntegrityError):
                raise
            raise StoreError(f"store {self.url}: {_db_reason(e)}") from e

    def _create_schema(self) -> None:
        with self._tx(write=True) as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_INIT_LOCK})
            if inspect(conn).has_table(schema_table.name):
                version = conn.execute(select(func.max(schema_table.c.version))).scalar()
                if version is not None and version > SCHEMA_VERSION:
                    raise SchemaVersionError(
                        f"store {self.url} holds schema version {version}, written by a newer "
                        f"cima; this cima knows versions up to {SCHEMA_VERSION}: upgrade cima"
                    )
                if version is not None and version < SCHEMA_VERSION:  # pragma: no cover
                    raise SchemaVersionError(
                        f"store {self.url} holds schema version {version}; this cima has no "
                        f"migration from it to {SCHEMA_VERSION}"
                    )
            metadata.create_all(conn, checkfirst=True)
            if conn.execute(select(schema_table.c.version)).first() is None:
                conn.execute(
                    schema_table.insert().values(id=1, version=SCHEMA_VERSION, created=utc_now())
                )

    def schema_version(self) -> int:
        with self._tx() as conn:
            return int(conn.execute(select(schema_table.c.version)).scalar_one())

    def ping(self) -> None:
        """Raise :class:`StoreError` unless the database answers."""
        with self._tx() as conn:
            conn.execute(text("SELECT 1"))

    # -- reference values --------------------------------------------------------------------
    def put_reference(
        self,
        name: str,
        document: Mapping[str, Any],
        *,
        source: str | None = None,
        media_type: str | None = None,
        now: datetime | None = None,
    ) -> ReferenceRecord:
        """Store ``document`` as the next version of reference set ``name``.

        Storing the same document as the latest version again returns that
        version instead of adding one.
        """
        check_name(name)
        doc = dict(document)
        digest = hashlib.sha256(canonical_json(doc)).hexdigest()
        created = now or utc_now()
        for _ in range(8):
            try:
                with self._tx(write=True) as conn:
                    latest = conn.execute(
                        select(references_table.c.version, references_table.c.digest)
                        .where(references_table.c.name == name)
                        .order_by(references_table.c.version.desc())
                        .limit(1)
                    ).first()
                    if latest is not None and latest.digest == digest:
                        return self._reference(conn, name, int(latest.version))
                    version = 1 if latest is None else int(latest.version) + 1
                    conn.execute(
                        references_table.insert().values(
                            name=name,
                            version=version,
                            created=created,
                            digest=digest,
                            document=doc,
                            source=source,
                            media_type=media_type,
                        )
                    )
                return ReferenceRecord(name, version, created, digest, doc, source, media_type)
            except IntegrityError:
                continue  # another instance took this version number: take the next one
        raise StoreError(f"reference set {name}: too many concurrent updates")

    def reference_head(self, name: str) -> tuple[int, str]:
        """(version, digest) of the latest version of reference set ``name`` (no document)."""
        check_name(name)
        with self._tx() as conn:
            row = conn.execute(
                select(references_table.c.version, references_table.c.digest)
                .where(references_table.c.name == name)
                .order_by(references_table.c.version.desc())
                .limit(1)
            ).first()
        if row is None:
            raise NotFoundError(f"reference set {name!r}: not found")
        return int(row.version), str(row.digest)

    def get_reference(self, name: str, version: int | None = None) -> ReferenceRecord:
        """The latest version of reference set ``name`` (or ``version``)."""
        check_name(name)
        with self._tx() as conn:
            if version is None:
                latest = conn.execute(
                    select(func.max(references_table.c.version)).where(
                        references_table.c.name == name
                    )
                ).scalar()
                if latest is None:
                    raise NotFoundError(f"reference set {name!r}: not found")
                version = int(latest)
            return self._reference(conn, name, version)

    @staticmethod
    def _reference(conn: Connection, name: str, version: int) -> ReferenceRecord:
        row = conn.execute(
            select(references_table).where(
                references_table.c.name == name, references_table.c.version == version
            )
        ).first()
        if row is None:
            raise NotFoundError(f"reference set {name!r} version {version}: not found")
        return ReferenceRecord(
            name=row.name,
            version=int(row.version),
            created=row.created,
            digest=row.digest,
            document=dict(row.document),
            source=row.source,
            media_type=row.media_type,
        )

    def list_references(self) -> list[ReferenceRecord]:
        """The latest version of every reference set (documents included), by name."""
        latest = (
            select(references_table.c.name, func.max(references_table.c.version).label("v"))
            .group_by(references_table.c.name)
            .subquery()
        )
        with self._tx() as conn:
            rows = conn.execute(
                select(references_table)
                .join(
                    latest,
                    (references_table.c.name == latest.c.name)
                    & (references_table.c.version == latest.c.v),
                )
                .order_by(references_table.c.name)
            ).all()
        return [
            ReferenceRecord(r.name, int(r.version), r.created, r.digest, dict(r.document), r.source)
            for r in rows
        ]

    # -- challenges --------------------------------------------------------------------------
    def create_challenge(
        self,
        *,
        node_id: str | None = None,
        ttl: timedelta = DEFAULT_CHALLENGE_TTL,
        now: datetime | None = None,
    ) -> Challenge:
        """Hand out a fresh random nonce, usable once until ``now + ttl``."""
        if node_id is not None:
            check_node_id(node_id)
        if ttl <= timedelta(0):
            raise ValueError("a challenge's lifetime must be positive")
        created = now or utc_now()
        challenge = Challenge(
            nonce=secrets.token_bytes(NONCE_SIZE),
            session=secrets.token_urlsafe(24),
            node_id=node_id,
            created=created,
            expires=created + ttl,
        )
        with self._tx(write=True, single=True) as conn:
            conn.execute(
                _INSERT_CHALLENGE,
                {
                    "nonce": challenge.nonce.hex(),
                    "session": challenge.session,
                    "node_id": node_id,
                    "created": challenge.created,
                    "expires": challenge.expires,
                },
            )
        return challenge

    def consume_challenge(
        self, nonce: bytes, *, session: str | None = None, now: datetime | None = None
    ) -> Challenge:
        """Mark ``nonce`` used, atomically across every instance, and return its challenge.

        Raises :class:`NonceError` when the nonce is unknown, expired, already
        used, or (``session`` given) belongs to another session.
        """
        when = now or utc_now()
        with self._tx(write=True) as conn:
            self._consume(conn, bytes(nonce), session, when)
            row = conn.execute(_SELECT_CHALLENGE, {"p_nonce": bytes(nonce).hex()}).one()
        return _challenge(row)

    def _consume(self, conn: Connection, nonce: bytes, session: str | None, when: datetime) -> None:
        """The atomic use of a nonce: one UPDATE that must change exactly one row."""
        key = nonce.hex()
        params = {"p_nonce": key, "p_when": when, "p_by": self.instance}
        if session is None:
            rowcount = conn.execute(_CONSUME, params).rowcount
        else:
            rowcount = conn.execute(_CONSUME_SESSION, {**params, "p_session": session}).rowcount
        if rowcount != 1:
            row = conn.execute(_SELECT_CHALLENGE, {"p_nonce": key}).first()
            _refuse(key, None if row is None else _challenge(row), session, when)

    def check_challenge(
        self, nonce: bytes, *, session: str | None = None, now: datetime | None = None
    ) -> Challenge:
        """The challenge of ``nonce`` if it could be consumed now (nothing is changed)."""
        with self._tx() as conn:
            return self._check(conn, bytes(nonce), session, now or utc_now())

    @staticmethod
    def _check(conn: Connection, nonce: bytes, session: str | None, when: datetime) -> Challenge:
        key = nonce.hex()
        row = conn.execute(_SELECT_CHALLENGE, {"p_nonce": key}).first()
        return _consumable(key, None if row is None else _challenge(row), session, when)

    # -- attestations: one read before the appraisal, one write after ----------------------
    def begin_attestation(
        self,
        nonce: bytes,
        *,
        session: str | None,
        reference: str,
        node: Callable[[Challenge], str],
        node_hint: str | None = None,
        ak_name: bytes | None = None,
        now: datetime | None = None,
    ) -> Attestation:
        """Everything an appraisal needs, in one read: the challenge, the reference set's
        latest version, the node's state (``node`` names the node from the challenge) and,
        given the TPM name of the report's AK (``ak_name``), its enrolled key if it is one.

        One statement reads them all when the node is the challenge's, or else
        ``node_hint`` (what ``node`` gives for a challenge that names no node);
        another node's state takes one more.

        Raises :class:`NonceError` for a nonce that could not be consumed now,
        :class:`NotFoundError` without reference set ``reference``. Nothing is
        changed: :meth:`finish_attestation` consumes the nonce.
        """
        when = now or utc_now()
        check_name(reference)
        key = bytes(nonce).hex()
        with self._tx(single=True) as conn:
            row = conn.execute(
                _BEGIN_ATTESTATION,
                {
                    "p_nonce": key,
                    "p_name": reference,
                    "p_node": node_hint,
                    "p_ak": None if ak_name is None else bytes(ak_name).hex(),
                },
            ).first()
            found = _consumable(key, None if row is None else _challenge(row), session, when)
            assert row is not None
            if row.ref_version is None:
                raise NotFoundError(f"reference set {reference!r}: not found")
            node_id = check_node_id(node(found))
            version, digest = int(row.ref_version), str(row.ref_digest)
            guessed = found.node_id if found.node_id is not None else node_hint
            if node_id == guessed:
                state_row = None if row.state_version is None else row
            else:  # not the node the statement read: read its state
                state_row = conn.execute(_SELECT_STATE, {"p_node": node_id}).first()
        state = (
            NodeState(node_id, 0, None, None)
            if state_row is None
            else NodeState(
                node_id,
                int(state_row.state_version if node_id == guessed else state_row.version),
                dict(state_row.state),
                state_row.key_id,
            )
        )
        enrolled = (
            None
            if row.enrolled_ak_name is None
            else EnrolledKey(
                bytes.fromhex(row.enrolled_ak_name),
                row.enrolled_node,
                bytes.fromhex(row.enrolled_ak_public),
                row.enrolled_ek_sha256,
                row.enrolled_ek_subject,
                row.enrolled_at,
                row.enrolled_by,
            )
        )
        return Attestation(found, when, (reference, version, digest), state, enrolled)

    def finish_attestation(
        self,
        attestation: Attestation,
        *,
        status: str,
        document: Mapping[str, Any],
        token: str | None = None,
        state: Mapping[str, Any] | None = None,
        key_id: str | None = None,
        reference_version: int | None = None,
        created: datetime | None = None,
    ) -> tuple[StoredResult, bool]:
        """Consume the nonce, store the result and the node's new state: one transaction.

        The nonce is consumed only here, with the same atomic UPDATE as
        :meth:`consume_challenge`: of two attestations that presented one
        nonce, one commits and the other raises :class:`NonceError` with
        nothing stored. The node's state is replaced only if it is still the
        version read by :meth:`begin_attestation` (else another attestation
        of the node stored a newer one, which is kept), and not written at all
        when it is the state read (a node that attests again with nothing new).
        Returns the stored result and whether the state was stored (or was
        already).
        """
        challenge = attestation.challenge
        node = attestation.node
        when = created or utc_now()
        name, version, _ = attestation.reference
        if reference_version is not None:
            version = reference_version
        doc = dict(document)
        unchanged = (
            state is not None and node.version > 0 and node.key_id == key_id and node.state == state
        )
        row = {
            "node_id": node.node_id,
            "created": when,
            "status": status,
            "session": challenge.session,
            "reference_name": name,
            "reference_version": version,
            "instance": self.instance,
            "key_id": key_id,
            "document": doc,
            "token": token,
        }
        write = self._finish_in_one_statement if self.dialect == "postgresql" else self._finish
        try:
            result_id, saved = write(
                attestation, row, None if state is None or unchanged else dict(state)
            )
            saved = saved or unchanged
        except IntegrityError as e:
            raise NotFoundError(
                f"reference set {name!r} version {version}: not found ({_db_reason(e)})"
            ) from e
        stored = StoredResult(
            result_id,
            node.node_id,
            when,
            status,
            doc,
            token,
            challenge.session,
            name,
            version,
            key_id,
        )
        return stored, saved

    def _finish(
        self, attestation: Attestation, row: dict[str, Any], state: dict[str, Any] | None
    ) -> tuple[int, bool]:
        """finish_attestation's writes in one transaction: consume, state, result (SQLite)."""
        challenge = attestation.challenge
        saved = False
        with self._tx(write=True) as conn:
            self._consume(conn, challenge.nonce, challenge.session, attestation.started)
            if state is not None:
                saved = self._try_state(
                    conn, attestation.node, state, row["key_id"], row["created"]
                )
            key = conn.execute(_INSERT_RESULT, row).inserted_primary_key
            assert key is not None
            return int(key[0]), saved

    def _finish_in_one_statement(
        self, attestation: Attestation, result: dict[str, Any], state: dict[str, Any] | None
    ) -> tuple[int, bool]:
        """finish_attestation's writes as one statement, one round trip (PostgreSQL).

        The nonce's UPDATE is a data-modifying CTE; the state's write and the
        result's INSERT happen only if it consumed the nonce. A statement is
        atomic, so it needs no transaction of its own.
        """
        challenge = attestation.challenge
        node = attestation.node
        mode = "none" if state is None else ("insert" if node.version == 0 else "update")
        params: dict[str, Any] = {
            "p_nonce": challenge.nonce.hex(),
            "p_session": challenge.session,
            "p_when": attestation.started,
            "p_by": self.instance,
            "p_node": node.node_id,
            "p_created": result["created"],
            "p_status": result["status"],
            "p_ref_name": result["reference_name"],
            "p_ref_version": result["reference_version"],
            "p_key": result["key_id"],
            "p_document": result["document"],
            "p_token": result["token"],
        }
        if state is not None:
            params["p_state"] = state
            params["p_version"] = node.version
            params["p_new_version"] = node.version + 1
        with self._tx(write=True, single=True) as conn:
            row = conn.execute(_pg_finish_statement(mode), params).first()
            if row is None:  # the nonce was not consumed: say why
                key = challenge.nonce.hex()
                found = conn.execute(_SELECT_CHALLENGE, {"p_nonce": key}).first()
                _refuse(
                    key,
                    None if found is None else _challenge(found),
                    challenge.session,
                    attestation.started,
                )
            assert row is not None
            return int(row.id), bool(row.saved)

    def _try_state(
        self,
        conn: Connection,
        node: NodeState,
        state: dict[str, Any],
        key_id: str | None,
        when: datetime,
    ) -> bool:
        """Replace ``node``'s state if it is still at the version read; whether it was."""
        if node.version == 0:
            inserted = conn.execute(
                _INSERT_STATE[self.dialect],
                {
                    "node_id": node.node_id,
                    "version": 1,
                    "key_id": key_id,
                    "updated": when,
                    "state": state,
                },
            )
            return int(inserted.rowcount) == 1
        n = conn.execute(
            _UPDATE_STATE,
            {
                "p_node": node.node_id,
                "p_version": node.version,
                "p_new_version": node.version + 1,
                "p_key": key_id,
                "p_when": when,
                "p_state": state,
            },
        ).rowcount
        return int(n) == 1

    def get_challenge(self, nonce: bytes) -> Challenge | None:
        with self._tx() as conn:
            row = conn.execute(
                select(challenges_table).where(challenges_table.c.nonce == bytes(nonce).hex())
            ).first()
        return None if row is None else _challenge(row)

    def purge_challenges(self, *, expired_before: datetime) -> int:
        """Delete challenges that expired before ``expired_before``; how many went."""
        with self._tx(write=True) as conn:
            n = conn.execute(
                challenges_table.delete().where(challenges_table.c.expires < expired_before)
            ).rowcount
        return int(n)

    # -- results -----------------------------------------------------------------------------
    def add_result(
        self,
        *,
        node_id: str,
        status: str,
        document: Mapping[str, Any],
        token: str | None = None,
        session: str | None = None,
        reference: tuple[str, int] | None = None,
        created: datetime | None = None,
    ) -> StoredResult:
        """Store an attestation result and return it with its id.

        (The service stores results with :meth:`finish_attestation`, which also
        consumes the nonce and updates the node's state.)
        """
        check_node_id(node_id)
        when = created or utc_now()
        doc = dict(document)
        try:
            with self._tx(write=True) as conn:
                inserted = conn.execute(
                    results_table.insert().values(
                        node_id=node_id,
                        created=when,
                        status=status,
                        session=session,
                        reference_name=reference[0] if reference else None,
                        reference_version=reference[1] if reference else None,
                        instance=self.instance,
                        document=doc,
                        token=token,
                    )
                )
                key = inserted.inserted_primary_key
                assert key is not None
                result_id = key[0]
        except IntegrityError as e:
            if reference is not None:
                raise NotFoundError(
                    f"reference set {reference[0]!r} version {reference[1]}: not found"
                ) from e
            raise StoreError(
                f"result of node {node_id}: refused by the database: {_db_reason(e)}"
            ) from e
        return StoredResult(
            int(result_id),
            node_id,
            when,
            status,
            doc,
            token,
            session,
            reference[0] if reference else None,
            reference[1] if reference else None,
        )

    def results(
        self, *, node_id: str | None = None, limit: int = 100, before: int | None = None
    ) -> list[StoredResult]:
        """Results, newest first: of one node, or of all; ``before`` an id to page back from."""
        query = select(results_table).order_by(results_table.c.id.desc()).limit(limit)
        if node_id is not None:
            query = query.where(results_table.c.node_id == node_id)
        if before is not None:
            query = query.where(results_table.c.id < before)
        with self._tx() as conn:
            rows = conn.execute(query).all()
        return [_result(r) for r in rows]

    def latest_result(self, node_id: str) -> StoredResult | None:
        found = self.results(node_id=node_id, limit=1)
        return found[0] if found else None

    def get_result(self, result_id: int) -> StoredResult:
        with self._tx() as conn:
            row = conn.execute(select(results_table).where(results_table.c.id == result_id)).first()
        if row is None:
            raise NotFoundError(f"result {result_id}: not found")
        return _result(row)

    def count_results(self) -> int:
        with self._tx() as conn:
            return int(conn.execute(select(func.count()).select_from(results_table)).scalar_one())

    # -- node state --------------------------------------------------------------------------
    def node_state(self, node_id: str) -> NodeState:
        """The node's stored appraisal state (version 0 and no state when there is none)."""
        with self._tx() as conn:
            row = conn.execute(
                select(node_state_table).where(node_state_table.c.node_id == node_id)
            ).first()
        if row is None:
            return NodeState(node_id, 0, None, None)
        return NodeState(node_id, int(row.version), dict(row.state), row.key_id)

    def save_node_state(
        self,
        node_id: str,
        state: Mapping[str, Any],
        *,
        expected_version: int,
        key_id: str | None = None,
        now: datetime | None = None,
    ) -> int:
        """Replace the node's state if it is still at ``expected_version``; the new version.

        ``expected_version`` 0 creates the row. Raises :class:`StaleStateError`
        when another writer got there first.
        """
        check_node_id(node_id)
        try:
            with self._tx(write=True) as conn:
                return self._write_state(
                    conn,
                    node_id,
                    state,
                    expected_version=expected_version,
                    key_id=key_id,
                    when=now or utc_now(),
                )
        except IntegrityError as e:
            raise StaleStateError(
                f"node {node_id}: appraisal state was created by another writer"
            ) from e

    @staticmethod
    def _write_state(
        conn: Connection,
        node_id: str,
        state: Mapping[str, Any],
        *,
        expected_version: int,
        key_id: str | None,
        when: datetime,
    ) -> int:
        doc = dict(state)
        if expected_version == 0:
            conn.execute(
                node_state_table.insert().values(
                    node_id=node_id, version=1, key_id=key_id, updated=when, state=doc
                )
            )
            return 1
        n = conn.execute(
            update(node_state_table)
            .where(
                (node_state_table.c.node_id == node_id)
                & (node_state_table.c.version == expected_version)
            )
            .values(version=expected_version + 1, key_id=key_id, updated=when, state=doc)
        ).rowcount
        if n != 1:
            raise StaleStateError(
                f"node {node_id}: appraisal state is no longer at version {expected_version}"
            )
        return expected_version + 1

    def nodes(self) -> list[str]:
        """Every node with a result, sorted."""
        with self._tx() as conn:
            rows = conn.execute(
                select(results_table.c.node_id).distinct().order_by(results_table.c.node_id)
            ).all()
        return [r.node_id for r in rows]

    # -- enrollments -------------------------------------------------------------------------
    def create_enrollment(
        self,
        *,
        node_id: str,
        ak_name: bytes,
        ak_public: bytes,
        ek_certificate_sha256: str,
        ek_subject: str,
        secret_sha256: bytes,
        ttl: timedelta = DEFAULT_ENROLLMENT_TTL,
        now: datetime | None = None,
    ) -> Enrollment:
        """Store a pending enrollment, activable once until ``now + ttl``.

        ``secret_sha256`` is the SHA-256 digest of the credential's secret: the
        store never sees the secret itself.
        """
        check_node_id(node_id)
        if ttl <= timedelta(0):
            raise ValueError("an enrollment's lifetime must be positive")
        if len(secret_sha256) != 32:
            raise ValueError("secret_sha256 is a SHA-256 digest (32 bytes)")
        if not ak_name or len(ak_name) > _TPM_NAME_HEX // 2:
            raise ValueError(f"ak_name: a TPM name of 1 to {_TPM_NAME_HEX // 2} bytes")
        created = now or utc_now()
        enrollment = Enrollment(
            id=secrets.token_urlsafe(24),
            node_id=node_id,
            ak_name=bytes(ak_name),
            ak_public=bytes(ak_public),
            ek_certificate_sha256=ek_certificate_sha256,
            ek_subject=ek_subject,
            created=created,
            expires=created + ttl,
            state="pending",
        )
        with self._tx(write=True, single=True) as conn:
            conn.execute(
                enrollments_table.insert().values(
                    id=enrollment.id,
                    node_id=node_id,
                    ak_name=enrollment.ak_name.hex(),
                    ak_public=enrollment.ak_public.hex(),
                    ek_certificate_sha256=ek_certificate_sha256,
                    ek_subject=ek_subject,
                    secret_sha256=bytes(secret_sha256).hex(),
                    created=created,
                    expires=enrollment.expires,
                    state="pending",
                    instance=self.instance,
                )
            )
        return enrollment

    def get_enrollment(self, enrollment_id: str) -> Enrollment | None:
        with self._tx() as conn:
            row = conn.execute(
                select(enrollments_table).where(enrollments_table.c.id == enrollment_id)
            ).first()
        return None if row is None else _enrollment(row)

    def activate_enrollment(
        self, enrollment_id: str, secret: bytes, *, now: datetime | None = None
    ) -> EnrolledKey:
        """Spend enrollment ``enrollment_id`` with the credential's ``secret``; the enrolled key.

        One transaction, its row locked (``SELECT ... FOR UPDATE`` on PostgreSQL, the
        write lock on SQLite): of concurrent attempts, the first spends it and the others
        find it spent. The right secret (SHA-256 digests compared with
        :func:`hmac.compare_digest`) stores the AK as an enrolled key (replacing an
        earlier enrollment of the same AK); a wrong one marks the enrollment
        ``refused``. Raises :class:`EnrollmentError`: ``unknown``, ``expired``,
        ``used`` (nothing changed), ``wrong-secret`` (the enrollment was spent).
        """
        when = now or utc_now()
        presented = hashlib.sha256(bytes(secret)).digest()
        short = f"enrollment {enrollment_id[:16]}"
        refused = False
        key: EnrolledKey | None = None
        with self._tx(write=True) as conn:
            row = conn.execute(
                select(enrollments_table)
                .where(enrollments_table.c.id == enrollment_id)
                .with_for_update()
            ).first()
            if row is None:
                raise EnrollmentError("unknown", f"{short}: no such enrollment")
            if row.state != "pending":
                at = "" if row.spent is None else f" at {_rfc3339(row.spent)}"
                raise EnrollmentError("used", f"{short}: already activated{at} ({row.state})")
            if row.expires <= when:
                raise EnrollmentError("expired", f"{short}: expired at {_rfc3339(row.expires)}")
            refused = not hmac.compare_digest(presented, bytes.fromhex(row.secret_sha256))
            conn.execute(
                update(enrollments_table)
                .where(enrollments_table.c.id == enrollment_id)
                .values(state="refused" if refused else "enrolled", spent=when)
            )
            if not refused:
                key = EnrolledKey(
                    ak_name=bytes.fromhex(row.ak_name),
                    node_id=row.node_id,
                    ak_public=bytes.fromhex(row.ak_public),
                    ek_certificate_sha256=row.ek_certificate_sha256,
                    ek_subject=row.ek_subject,
                    enrolled=when,
                    enrollment=row.id,
                )
                values = {
                    "ak_name": row.ak_name,
                    "node_id": key.node_id,
                    "ak_public": row.ak_public,
                    "ek_certificate_sha256": key.ek_certificate_sha256,
                    "ek_subject": key.ek_subject,
                    "enrolled": when,
                    "enrollment": key.enrollment,
                }
                insert = (pg_insert if self.dialect == "postgresql" else sqlite_insert)(
                    enrolled_keys_table
                ).values(**values)
                conn.execute(
                    insert.on_conflict_do_update(
                        index_elements=[enrolled_keys_table.c.ak_name],
                        set_={k: v for k, v in values.items() if k != "ak_name"},
                    )
                )
        if refused or key is None:
            raise EnrollmentError(
                "wrong-secret", f"{short}: the secret is not the credential's (enrollment spent)"
            )
        return key

    def enrolled_key(self, ak_name: bytes) -> EnrolledKey | None:
        """The enrolled key of TPM name ``ak_name``, if it is one."""
        with self._tx(single=True) as conn:
            row = conn.execute(_SELECT_ENROLLED_KEY, {"p_ak": bytes(ak_name).hex()}).first()
        return None if row is None else _enrolled_key(row)

    def enrolled_keys(self, node: str | None = None) -> list[EnrolledKey]:
        """Every enrolled key (of node ``node``), oldest enrollment first."""
        query = select(enrolled_keys_table).order_by(
            enrolled_keys_table.c.enrolled, enrolled_keys_table.c.ak_name
        )
        if node is not None:
            query = query.where(enrolled_keys_table.c.node_id == node)
        with self._tx() as conn:
            rows = conn.execute(query).all()
        return [_enrolled_key(r) for r in rows]

    def revoke_enrolled_key(self, ak_name: bytes) -> EnrolledKey | None:
        """Delete the enrolled key of TPM name ``ak_name``; the key as it was, None if none."""
        with self._tx(write=True) as conn:
            row = conn.execute(
                select(enrolled_keys_table)
                .where(enrolled_keys_table.c.ak_name == bytes(ak_name).hex())
                .with_for_update()
            ).first()
            if row is None:
                return None
            conn.execute(
                enrolled_keys_table.delete().where(
                    enrolled_keys_table.c.ak_name == bytes(ak_name).hex()
                )
            )
        return _enrolled_key(row)

    def purge_enrollments(self, *, expired_before: datetime) -> int:
        """Delete enrollments that expired before ``expired_before`` without enrolling a key."""
        with self._tx(write=True) as conn:
            n = conn.execute(
                enrollments_table.delete().where(
                    (enrollments_table.c.expires < expired_before)
                    & (enrollments_table.c.state != "enrolled")
                )
            ).rowcount
        return int(n)


def _challenge(row: Any) -> Challenge:
    return Challenge(
        bytes.fromhex(row.nonce),
        row.session,
        row.node_id,
        row.created,
        row.expires,
        row.consumed_at,
    )


def _enrollment(row: Any) -> Enrollment:
    return Enrollment(
        id=row.id,
        node_id=row.node_id,
        ak_name=bytes.fromhex(row.ak_name),
        ak_public=bytes.fromhex(row.ak_public),
        ek_certificate_sha256=row.ek_certificate_sha256,
        ek_subject=row.ek_subject,
        created=row.created,
        expires=row.expires,
        state=row.state,
        spent=row.spent,
    )


def _enrolled_key(row: Any) -> EnrolledKey:
    return EnrolledKey(
        ak_name=bytes.fromhex(row.ak_name),
        node_id=row.node_id,
        ak_public=bytes.fromhex(row.ak_public),
        ek_certificate_sha256=row.ek_certificate_sha256,
        ek_subject=row.ek_subject,
        enrolled=row.enrolled,
        enrollment=row.enrollment,
    )


def _consumable(
    key: str, found: Challenge | None, session: str | None, when: datetime
) -> Challenge:
    """``found`` if its nonce can be consumed ``when`` in ``session``; else :func:`_refuse`."""
    if (
        found is None
        or found.consumed_at is not None
        or found.expires <= when
        or (session is not None and found.session != session)
    ):
        _refuse(key, found, session, when)
    assert found is not None
    return found


def _refuse(key: str, found: Challenge | None, session: str | None, when: datetime) -> None:
    """Raise the :class:`NonceError` that says why ``found`` cannot be consumed at ``when``."""
    short = f"nonce {key[:16]}..."
    if found is None:
        raise NonceError("unknown", f"{short}: not issued by this verifier (ask /v1/challenge)")
    if session is not None and found.session != session:
        raise NonceError("session", f"{short}: belongs to another session")
    if found.consumed_at is not None:
        raise NonceError("used", f"{short}: already used at {_rfc3339(found.consumed_at)}")
    if found.expires <= when:
        raise NonceError("expired", f"{short}: expired at {_rfc3339(found.expires)}")
    raise NonceError("used", f"{short}: taken by a concurrent attestation")


def _result(r: Any) -> StoredResult:
    return StoredResult(
        id=int(r.id),
        node_id=r.node_id,
        created=r.created,
        status=r.status,
        document=dict(r.document),
        token=r.token,
        session=r.session,
        reference_name=r.reference_name,
        reference_version=None if r.reference_version is None else int(r.reference_version),
        key_id=r.key_id,
    )


def _db_reason(e: DBAPIError) -> str:
    return " ".join(str(e.orig).split()) if e.orig is not None else str(e)


#: Seconds to wait for a PostgreSQL server to accept a connection (unless the URL says).
_CONNECT_TIMEOUT = 10

#: A pooled connection idle for longer than this is tested before use (the server may have
#: closed it, or restarted); a busy pool uses its connections without a round trip.
_PING_IDLE_AFTER = 10.0


def _ping_idle_connections(engine: Engine) -> None:
    """Test a pooled connection that has been idle before handing it out (else none)."""

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["cima_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("cima_idle_since")
        if since is None or time.monotonic() - since < _PING_IDLE_AFTER:
            return
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
            dbapi_connection.rollback()
        except Exception as e:  # any failure: the pool drops it and connects again
            raise DisconnectionError(f"a pooled connection does not answer: {e}") from e


class _WriterLock:
    """The writers of one SQLite store, queued: this process's threads, then its processes.

    A thread lock, then an exclusive ``flock`` of ``FILE-writer.lock`` beside the
    database, which the kernel hands to the next waiting process as soon as it is
    released (SQLite's own lock makes a waiting writer sleep and poll). Where
    ``flock`` is missing, the thread lock alone.
    """

    def __init__(self, database: str) -> None:
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        try:
            import fcntl  # noqa: F401 - POSIX only

            self._fd = os.open(f"{database}-writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except (ImportError, OSError):
            self._fd = None

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        if self._fd is not None:
            import fcntl

            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._thread_lock.release()
                raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd is not None:
                import fcntl

                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def close(self) -> None:
        with self._thread_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Transactions are begun by the "begin" hook below, not by the driver.
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        mode = "IMMEDIATE" if conn.get_execution_options().get("cima_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")
