"""The agent's own measurement events: what is journaled, extended and served.

Each event is extended into the runtime register (rtmr3 on TDX, a PCR on a
TPM) as ``H(content)``, where ``content`` is the canonical JSON encoding of
``{"kind", "scope", "subject", "data"}``: keys sorted, no insignificant white
space, UTF-8. A verifier recomputes that digest from the served content, so
what a caller reads is exactly what was measured.

Scopes: ``"node"`` for the agent itself, its policy, system processes and
control-plane pods; ``"container:<id>"`` (the 64-hex container id) for a
container's own events. A container's view (DESIGN.md section 7) shows node
events and its own in full and every other container's event only as its
digest: :meth:`RuntimeEvent.redacted`.

In CEL-JSON an event is a record with content type ``cima`` and content
``{"kind", "scope", "subject", "data"}``, or ``{"redacted": true}``.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cima.digests import by_name
from cima.eventlog.cel import CIMA, CELRecord

KINDS = ("agent", "policy", "process", "pod", "container", "marker")
NODE = "node"


def container_scope(container_id: str) -> str:
    return f"container:{container_id}"


def canonical(content: Mapping[str, Any]) -> bytes:
    """The canonical JSON bytes that are hashed and extended."""
    return json.dumps(
        content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def event_content(kind: str, scope: str, subject: str, data: Mapping[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "scope": scope, "subject": subject, "data": dict(data)}


@dataclass(frozen=True, slots=True)
class RuntimeEvent:
    """One agent event. ``content`` is None for a redacted event (digest only).

    Satisfies :class:`cima.eventlog.event.Measurement`.
    """

    seq: int
    register: str
    algorithm: str
    digest: bytes
    content: dict[str, Any] | None = field(default=None, compare=True, hash=False)

    @classmethod
    def create(
        cls,
        seq: int,
        register: str,
        algorithm: str,
        *,
        kind: str,
        scope: str,
        subject: str,
        data: Mapping[str, Any],
    ) -> RuntimeEvent:
        content = event_content(kind, scope, subject, data)
        digest = by_name(algorithm).hash(canonical(content))
        return cls(seq, register, by_name(algorithm).name, digest, content)

    # -- what the event says ----------------------------------------------------
    @property
    def is_redacted(self) -> bool:
        return self.content is None

    @property
    def kind(self) -> str | None:
        return None if self.content is None else str(self.content["kind"])

    @property
    def scope(self) -> str | None:
        return None if self.content is None else str(self.content["scope"])

    @property
    def subject(self) -> str | None:
        return None if self.content is None else str(self.content["subject"])

    @property
    def data(self) -> dict[str, Any]:
        return {} if self.content is None else dict(self.content["data"])

    def content_matches_digest(self) -> bool:
        """True when the content hashes to the digest (always True for a redacted event)."""
        if self.content is None:
            return True
        return hmac.compare_digest(
            by_name(self.algorithm).hash(canonical(self.content)), self.digest
        )

    def redacted(self) -> RuntimeEvent:
        """The same event with its content removed: it still replays, it reveals nothing."""
        return RuntimeEvent(self.seq, self.register, self.algorithm, self.digest, None)

    # -- Measurement protocol ---------------------------------------------------
    @property
    def extends(self) -> bool:
        return True

    @property
    def startup_locality(self) -> int | None:
        return None

    def algorithms(self) -> tuple[str, ...]:
        return (self.algorithm,)

    def replay_digest(self, algorithm: str) -> bytes | None:
        return self.digest if by_name(algorithm).name == self.algorithm else None

    # -- encodings ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "register": self.register,
            "algorithm": self.algorithm,
            "digest": self.digest.hex(),
            "content": self.content,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> RuntimeEvent:
        return cls(
            int(obj["seq"]),
            str(obj["register"]),
            by_name(str(obj["algorithm"])).name,
            bytes.fromhex(str(obj["digest"])),
            None if obj.get("content") is None else dict(obj["content"]),
        )

    def to_cel(self) -> CELRecord:
        content = {"redacted": True} if self.content is None else dict(self.content)
        return CELRecord(self.seq, self.register, ((self.algorithm, self.digest),), CIMA, content)

    @classmethod
    def from_cel(cls, record: CELRecord) -> RuntimeEvent:
        (alg, digest), *_ = record.digests
        content = None if record.content.get("redacted") else dict(record.content)
        return cls(record.recnum, record.register, alg, digest, content)
