"""The attestation result: a status per submodule, every failure with its cause, the environment.

The result follows the EAT Attestation Result draft (draft-ietf-rats-ear): each
submodule gets an ``ear.status`` of ``affirming``, ``warning``,
``contraindicated`` or ``none`` (nothing to appraise, or no reference values to
appraise it against). The submodules are:

==============  ===================================================================
``evidence``    the report: it decodes, its signature chain is trusted, it is fresh
``boot``        firmware, boot loader and the boot registers (TCG log or CCEL)
``kernel``      kernel image, command line and initrd, as the boot log names them
``ima``         the kernel's IMA measurements: file digests, signatures, template hashes
``system``      system processes and the agent's own code and policy (runtime journal)
``kubernetes``  pods (runtime journal)
``container``   containers and their images (runtime journal)
==============  ===================================================================

The overall status is the worst status of a submodule that was appraised.
Every :class:`Failure` names the step of DESIGN.md section 9 that found it, the
error class, and where known the register, the log and the event index.

:attr:`AttestationResult.environment` is the node as its logs rebuild it
(firmware, boot loader, kernel and command line, initrd, IMA, system
processes, pods, containers with their images), each :class:`Part` with its
own status.

:meth:`AttestationResult.to_jwt` signs the result as a JWT (ES256) with EAR
claims; :func:`verify_jwt` checks one with the verifier's public key.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cima import __version__
from cima.errors import CimaError, SignatureError

__all__ = [
    "AFFIRMING",
    "CONTRAINDICATED",
    "EAR_PROFILE",
    "NONE",
    "STATUSES",
    "SUBMODULES",
    "WARNING",
    "AppraisalFailedError",
    "AttestationResult",
    "Failure",
    "Part",
    "ResultTokenError",
    "Submodule",
    "verify_jwt",
    "worst",
]

Status = Literal["affirming", "warning", "contraindicated", "none"]

AFFIRMING: Status = "affirming"
WARNING: Status = "warning"
CONTRAINDICATED: Status = "contraindicated"
NONE: Status = "none"
STATUSES: tuple[Status, ...] = (NONE, AFFIRMING, WARNING, CONTRAINDICATED)
_RANK = {NONE: 0, AFFIRMING: 1, WARNING: 2, CONTRAINDICATED: 3}

SUBMODULES: tuple[str, ...] = (
    "evidence",
    "boot",
    "kernel",
    "ima",
    "system",
    "kubernetes",
    "container",
)

#: Who made a result (EAR ``ear.verifier-id`` build).
VERIFIER_ID = f"cima {__version__}"
#: The EAR profile of draft-ietf-rats-ear.
EAR_PROFILE = "tag:github.com,2023:veraison/ear"
#: Failures listed per submodule in a JWT (the rest are counted).
JWT_FAILURES_PER_SUBMODULE = 10


def worst(statuses: Iterable[Status]) -> Status:
    """The worst of ``statuses`` (``none`` only when nothing else is there)."""
    out: Status = NONE
    for s in statuses:
        if _RANK[s] > _RANK[out]:
            out = s
    return out


class AppraisalFailedError(CimaError):
    """Raised by :meth:`AttestationResult.raise_for_status` for a result that is not affirming."""

    def __init__(self, result: AttestationResult) -> None:
        self.result = result
        first = result.failures[0].describe() if result.failures else "no failure recorded"
        more = len(result.failures) - 1
        tail = f" (and {more} more)" if more > 0 else ""
        super().__init__(f"{result.status}: {first}{tail}")


class ResultTokenError(SignatureError):
    """A result JWT does not verify with the verifier's key, or is not a cima result."""


@dataclass(frozen=True, slots=True)
class Failure:
    """One thing appraisal found wrong (``severity`` contraindicated) or doubtful (warning).

    ``step`` is the step of DESIGN.md section 9 (1 parse, 2 signature chain,
    3 freshness, 4 replay, 5 reference values); ``error`` the class name of the
    specific error; ``code`` a short stable key (``replay-mismatch``,
    ``unknown-file``, ...); ``log`` one of ``boot``, ``ima``, ``runtime``;
    ``event`` the record's index in that log.
    """

    submodule: str
    step: int
    code: str
    reason: str
    error: str
    severity: Status = CONTRAINDICATED
    register: str | None = None
    log: str | None = None
    event: int | None = None
    subject: str | None = None

    def describe(self) -> str:
        where = []
        if self.register:
            where.append(self.register)
        if self.log is not None and self.event is not None:
            where.append(f"{self.log} event {self.event}")
        elif self.log is not None:
            where.append(f"{self.log} log")
        prefix = f"[{', '.join(where)}] " if where else ""
        return f"{self.submodule}: step {self.step}: {prefix}{self.reason}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "submodule": self.submodule,
            "step": self.step,
            "code": self.code,
            "severity": self.severity,
            "error": self.error,
            "reason": self.reason,
        }
        for key in ("register", "log", "event", "subject"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Failure:
        return cls(
            submodule=str(d["submodule"]),
            step=int(d["step"]),
            code=str(d["code"]),
            reason=str(d["reason"]),
            error=str(d["error"]),
            severity=_status(d.get("severity", CONTRAINDICATED)),
            register=d.get("register"),
            log=d.get("log"),
            event=d.get("event"),
            subject=d.get("subject"),
        )


def _status(value: object) -> Status:
    for status in STATUSES:
        if value == status:
            return status
    raise ValueError(f"unknown status {value!r}")


@dataclass(slots=True)
class Submodule:
    """One submodule's verdict, with what was appraised (``details``) and what failed."""

    name: str
    status: Status = NONE
    failures: list[Failure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "details": self.details,
            "failures": [f.to_dict() for f in self.failures],
        }


@dataclass(slots=True)
class Part:
    """One part of the reconstructed environment (a firmware, a kernel, a pod ...)."""

    kind: str
    name: str
    status: Status = NONE
    details: dict[str, Any] = field(default_factory=dict)
    children: list[Part] = field(default_factory=list)

    def add(self, part: Part) -> Part:
        self.children.append(part)
        return part

    def find(self, kind: str) -> Part | None:
        """The first part of ``kind`` in this subtree (depth first)."""
        if self.kind == kind:
            return self
        for c in self.children:
            found = c.find(kind)
            if found is not None:
                return found
        return None

    def walk(self) -> Iterable[Part]:
        yield self
        for c in self.children:
            yield from c.walk()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "status": self.status}
        if self.details:
            out["details"] = self.details
        if self.children:
            out["children"] = [c.to_dict() for c in self.children]
        return out


@dataclass(slots=True)
class AttestationResult:
    """What :func:`cima.verifier.appraise.appraise` concluded about one bundle."""

    submods: dict[str, Submodule]
    environment: Part
    platform: str
    mode: str = "full"
    """``full``, or ``incremental`` when only new IMA entries were appraised."""
    mode_reason: str = ""
    issued_at: int = field(default_factory=lambda: int(time.time()))
    verifier_id: str = VERIFIER_ID
    nonce: bytes | None = None
    state: Any = None
    """The :class:`cima.verifier.appraise.AppraisalState` to pass to the next appraisal."""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def failures(self) -> list[Failure]:
        """Every failure, contraindications first, in step order."""
        out = [f for s in self.submods.values() for f in s.failures]
        return sorted(out, key=lambda f: (-_RANK[f.severity], f.step))

    @property
    def status(self) -> Status:
        return worst(s.status for s in self.submods.values())

    @property
    def affirming(self) -> bool:
        return self.status == AFFIRMING

    def submodule(self, name: str) -> Submodule:
        return self.submods[name]

    def raise_for_status(self) -> None:
        """Raise :class:`AppraisalFailedError` unless the result is affirming."""
        if self.status != AFFIRMING:
            raise AppraisalFailedError(self)

    def failures_for(
        self, *, code: str | None = None, register: str | None = None
    ) -> list[Failure]:
        return [
            f
            for f in self.failures
            if (code is None or f.code == code) and (register is None or f.register == register)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "platform": self.platform,
            "verifier": self.verifier_id,
            "issued_at": self.issued_at,
            "mode": self.mode,
            "mode_reason": self.mode_reason,
            "nonce": None if self.nonce is None else self.nonce.hex(),
            "submods": {name: s.to_dict() for name, s in self.submods.items()},
            "failures": [f.to_dict() for f in self.failures],
            "environment": self.environment.to_dict(),
            "timings_ms": {k: round(v * 1000, 3) for k, v in self.timings.items()},
        }

    # -- JWT ------------------------------------------------------------------------------------
    def claims(self) -> dict[str, Any]:
        """The EAR claims of this result (compact: a few failures per submodule)."""
        submods: dict[str, Any] = {}
        for name, s in self.submods.items():
            entry: dict[str, Any] = {"ear.status": s.status}
            details: dict[str, Any] = {}
            if s.failures:
                details["failures"] = [_compact(f) for f in s.failures[:JWT_FAILURES_PER_SUBMODULE]]
                if len(s.failures) > JWT_FAILURES_PER_SUBMODULE:
                    details["more_failures"] = len(s.failures) - JWT_FAILURES_PER_SUBMODULE
            summary = {k: v for k, v in s.details.items() if isinstance(v, int | str | bool)}
            if summary:
                details["summary"] = summary
            if details:
                entry["details"] = details
            submods[name] = entry
        out: dict[str, Any] = {
            "eat_profile": EAR_PROFILE,
            "iat": self.issued_at,
            "ear.verifier-id": {"developer": "cima", "build": self.verifier_id},
            "submods": submods,
            "cima.status": self.status,
            "cima.platform": self.platform,
            "cima.mode": self.mode,
        }
        if self.nonce is not None:
            out["eat_nonce"] = _b64url(self.nonce) if self.nonce else ""
        return out

    def to_jwt(self, private_key: Any, *, kid: str | None = None) -> str:
        """The result as a JWT signed with ES256 (``private_key``: an EC P-256 key or its PEM)."""
        import jwt
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = private_key
        if isinstance(key, bytes | str):
            raw = key.encode() if isinstance(key, str) else key
            try:
                key = serialization.load_pem_private_key(raw, password=None)
            except (ValueError, TypeError) as e:
                raise ResultTokenError(f"the JWT signing key does not load: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ResultTokenError("ES256 needs an EC P-256 private key")
        headers = {"kid": kid} if kid else None
        return jwt.encode(self.claims(), key, algorithm="ES256", headers=headers)


def _compact(f: Failure) -> dict[str, Any]:
    out: dict[str, Any] = {"code": f.code, "reason": f.reason}
    if f.severity != CONTRAINDICATED:
        out["severity"] = f.severity
    for key in ("register", "log", "event"):
        value = getattr(f, key)
        if value is not None:
            out[key] = value
    return out


def _b64url(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def verify_jwt(token: str | bytes, public_key: Any, *, leeway: float = 0) -> dict[str, Any]:
    """Check a result JWT's ES256 signature with the verifier's public key; return its claims.

    Raises :class:`ResultTokenError` when the signature does not verify, the
    token is not ES256 or its claims are not those of a cima result.
    """
    import jwt
    from cryptography.hazmat.primitives import serialization

    key = public_key
    if isinstance(key, bytes | str):
        raw = key.encode() if isinstance(key, str) else key
        try:
            key = serialization.load_pem_public_key(raw)
        except (ValueError, TypeError) as e:
            raise ResultTokenError(f"the verifier's public key does not load: {e}") from e
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=["ES256"],
            options={"require": ["iat", "eat_profile"]},
            leeway=leeway,
        )
    except jwt.PyJWTError as e:
        raise ResultTokenError(f"the result token does not verify: {e}") from e
    if claims.get("eat_profile") != EAR_PROFILE or not isinstance(claims.get("submods"), dict):
        raise ResultTokenError("the token is not an EAR attestation result")
    for name, sub in claims["submods"].items():
        if not isinstance(sub, dict) or sub.get("ear.status") not in _RANK:
            raise ResultTokenError(f"submodule {name!r} has no valid ear.status")
    return claims


def status_of(failures: Sequence[Failure], appraised: bool) -> Status:
    """The status a submodule gets from its failures (``none`` when nothing was appraised)."""
    if not failures:
        return AFFIRMING if appraised else NONE
    return worst(f.severity for f in failures)
