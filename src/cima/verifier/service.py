"""The HTTP verifier service: challenges, evidence in, attestation results out.

Any number of instances may serve one store (:mod:`cima.verifier.store`):
everything they share lives in the database, so a challenge handed out by one
instance is accepted by any other, once.

API (version 1; the OpenAPI description is served at ``/openapi.json`` and
kept in ``docs/verifier-openapi.json``):

``POST /v1/challenge`` ``{"node_id": "..."}`` (optional)
    a fresh nonce: ``{"nonce": "<hex>", "session": "...", "node_id": ...,
    "expires": "<RFC 3339>"}``.
``POST /v1/attest[?session=S][&node=N][&reference=NAME]``
    the body is an evidence bundle (:mod:`cima.evidence.bundle`) whose
    ``nonce`` came from a challenge; the nonce is consumed (once, across every
    instance), the evidence appraised against reference set ``NAME``
    (``default``), and the result stored and returned:
    ``{"id", "node_id", "key_id", "created", "status", "session",
    "reference", "result", "token"}``, ``token`` the result signed as a JWT
    (ES256, EAR claims) when the service has a key. The node is the
    challenge's ``node_id``, else ``N``, else derived from the report's
    signing key (``key-<hex>``). A node name is what the caller says;
    ``key_id`` in every result (``cima.key`` in the token) names the key that
    signed the evidence, which is what ties the name to a machine for a
    relying party that pins it.
``PUT /v1/references/{name}`` (YAML or JSON body), ``GET /v1/references/{name}[?version=V]``
    named, versioned sets of reference values; ``GET /v1/references`` lists them.
    A PUT is an operator's: see Authorization below.
``GET /v1/results[?node=N][&limit=L][&before=ID]``, ``GET /v1/results/{id}``
    stored results, newest first; ``GET /v1/nodes/{node}/results/latest`` a node's newest.
``GET /v1/keys``
    the public key that signs result tokens, as a JSON Web Key Set.
``POST /v1/enrollments`` ``{"node_id", "ek_public", "ek_certificate", "ak_public",
"intermediates"}``
    enrollment of an attestation key by EK certificate (credential activation),
    step one: the EK certificate (PEM) must lead, through the request's
    ``intermediates`` (PEM, optional), to one of the instance's EK roots
    (``ServiceConfig.ek_roots``, ``cima verifier serve --ek-ca``); the EK
    public area (hex TPM2B_PUBLIC) must hold the certificate's key and the AK
    public area (hex TPM2B_PUBLIC) be a restricted signing key. The answer
    (201) is a credential (TPM2_MakeCredential) of a fresh random secret,
    bound to the AK's TPM name and encrypted to the EK: ``{"id",
    "credential_blob", "encrypted_secret", "expires", "node_id",
    "ak_name"}`` (hex). The node is ``node_id``, else derived from the AK as
    an attestation derives it (``key-<hex>``). Only the secret's SHA-256 is
    stored.
``POST /v1/enrollments/{id}/activate`` ``{"secret": "<hex>"}``
    step two: the secret the node's TPM recovered (TPM2_ActivateCredential,
    which it performs only when the AK named lives in the TPM of the EK).
    The first attempt spends the enrollment, whatever its outcome; the right
    secret enrolls the AK (200 ``{"status": "enrolled", "node_id",
    "ak_name", "ek_subject"}``), and from then on step 2 of an appraisal
    trusts it "by EK certificate" when the reference values do not list it.
``GET /v1/enrollments/keys[?node=N]``
    the enrolled attestation keys (TPM name, node, public area, EK
    certificate's SHA-256 and subject, when, which enrollment).
``DELETE /v1/enrollments/keys/{ak_name}``
    an operator's (see Authorization): revokes an enrolled key (hex TPM
    name); from the next attestation on, step 2 no longer trusts it by its
    enrollment. 200 with the key as it was, 404 when no key has that name.
``GET /healthz``
    ``{"status": "ok"}`` when the store answers, 503 otherwise.

Authorization: reference values decide every appraisal, so only an operator
stores them, or revokes an enrolled key. ``PUT /v1/references/{name}`` (and
``DELETE /v1/enrollments/keys/{ak_name}``) needs ``Authorization: Bearer
<token>`` with one of the instance's operator tokens
(``ServiceConfig.operator_tokens``, read by :func:`load_operator_tokens` from
``cima verifier serve --operator-token-file``; the instance keeps their
SHA-256 digests only and compares a presented token's digest with every one
of them). The token is checked before the body is read: a request without
one, with another scheme (``Basic``) or with a wrong token gets 401
``unauthorized`` with ``WWW-Authenticate: Bearer realm="cima-verifier"``; an
instance that has no operator tokens takes no reference values at all: 403
``read_only``. Either way nothing is stored. Everything else (challenges,
attestations, reading references, results and keys) is open to whoever
reaches the service; ``--client-ca`` (mutual TLS) restricts that to clients
with a certificate.

Errors are ``{"detail": "<one line>", "error": "<code>"}``: 400 unreadable
body (not JSON, not YAML), 401 no operator token or a wrong one (reference
writes), 403 nonce unknown, expired or of another session, a reference
write on a read-only instance, an enrollment on an instance without EK roots
(``no_ek_roots``), an endorsement that does not hold (``untrusted_endorsement``:
the detail names the step, ``ek-certificate``, ``ek-public`` or ``ak-public``,
and the reason) or an activation with a wrong secret (``wrong_secret``), 404 no
such thing (an unknown enrollment too), 409 nonce already used, or enrollment
already activated (``enrollment_spent``), 410 enrollment expired
(``enrollment_expired``), 413 body over the cap (``max_body``, 64 MiB by
default), 415 a body type the endpoint does not take, 422 a body that decodes
but is not valid (the field is named: a missing field, a wrong type, an
unsupported bundle version, an enrollment's field that is not hex, PEM or a
public area), 503 store unavailable.
A refused request changes nothing stored and leaves its nonce usable: a
nonce is spent in the transaction that stores its attestation's result (an
appraisal that finds the evidence bad is a result too, ``contraindicated``).
Of enrollments, only a refused activation leaves a trace: the enrollment it
spent, ``refused``.

Enrollment is open to whoever reaches the service, as attestation is: what
it trusts is a TPM manufacturer's signature over the EK and the TPM's own
refusal to activate a credential for a key that is not its own. An
attestation whose report is a TPM quote reads, in the statement that reads its
challenge, the enrolled key of its AK's TPM name (the name the appraisal's
step 2 gives the AK of the bundle's ``ak_pem``), and the appraisal trusts it
as ``enrolled by EK certificate (<EK subject>, <date>)``. An enrolled key
speaks for the node it was enrolled as: an attestation that names another
node (its challenge's ``node_id`` or ``?node=``) is refused, 400
``node-mismatch``, and changes nothing stored.

Appraisal (:func:`cima.verifier.appraise.appraise`) is incremental: each
node's appraisal state is kept in the store, tied to the report's signing key
(a state written for another key is not used), and updated with optimistic
concurrency: when two attestations of one node are appraised at once, the
first to finish stores its state and the other only its result.

Serving (``cima verifier serve``): an instance is one worker process per CPU
by default, each with a listening socket of its own (:func:`listening_socket`,
``SO_REUSEPORT``) and its own connections to the store, like instances of a
cluster. In a worker, decoding and appraising run on the event loop (they
hold the interpreter lock whatever thread runs them), and so does the store's
short work unless ``ServiceConfig.threads`` moves it to threads. What a
worker keeps between requests changes no result: parsed reference sets (by
version and digest), decoded logs whose JSON is byte-identical to one seen
(:data:`cima.eventlog.cel.DECODED_LOGS`) and what a boot log says by itself
(:data:`cima.verifier.appraise.BOOT_FACTS`, by the log's digest; its replay
is compared with the registers of every quote), and the key id and TPM name
of the AK PEMs seen last (a pure function of the PEM).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gc
import hashlib
import hmac
import json
import logging
import os
import secrets
import signal
import socket
import stat
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Protocol, TypeVar

import anyio
import anyio.to_thread
import orjson
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from cima._files import read_bounded
from cima.errors import CimaError, ParseError, UnsupportedFormatError
from cima.evidence.bundle import EvidenceBundle, TDXQuoteReport, TPMQuoteReport
from cima.evidence.bundle import loads as loads_json
from cima.evidence.tpm import PublicArea
from cima.verifier.appraise import AppraisalState
from cima.verifier.appraise import appraise as run_appraisal
from cima.verifier.reference import ReferenceValues, load_references
from cima.verifier.store import (
    Attestation,
    Challenge,
    EnrolledKey,
    Enrollment,
    EnrollmentError,
    NonceError,
    NotFoundError,
    ReferenceRecord,
    Store,
    StoredResult,
    StoreError,
    check_name,
    check_node_id,
)

__all__ = [
    "DEFAULT_ENROLLMENT_TTL",
    "DEFAULT_MAX_BODY",
    "DEFAULT_REFERENCE",
    "DEFAULT_THREADS",
    "MIN_OPERATOR_TOKEN",
    "OPERATOR_REALM",
    "Appraisal",
    "EKRootError",
    "EnrollmentRequest",
    "IssuedCredential",
    "OperatorTokenError",
    "ServiceConfig",
    "ServiceError",
    "VerifierService",
    "create_app",
    "load_ek_roots",
    "load_jwt_key",
    "load_operator_tokens",
    "openapi_document",
    "operator_token_digest",
]

log = logging.getLogger("cima.verifier")
T = TypeVar("T")

#: The largest request body accepted by default (a bundle with a long IMA log is tens of MB).
DEFAULT_MAX_BODY = 64 * 1024 * 1024
#: Threads per process for the store's work (0: on the event loop; see :class:`ServiceConfig`).
DEFAULT_THREADS = 0
#: The reference set an attestation is appraised against unless the request names one.
DEFAULT_REFERENCE = "default"
#: How long an enrollment's credential can be activated unless the instance says.
DEFAULT_ENROLLMENT_TTL = timedelta(minutes=5)
#: Bytes of an enrollment's secret (what the credential carries).
ENROLLMENT_SECRET_SIZE = 32
#: How many parsed reference sets an instance keeps.
_REFERENCE_CACHE = 32
#: How often an instance deletes long-expired challenges, and how long after expiry.
_PURGE_EVERY = 600.0
_PURGE_AFTER = timedelta(days=1)

JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


class ServiceError(CimaError):
    """A request the service refuses: an HTTP status, a short code and a one-line reason.

    ``headers``: response headers that go with the refusal (``WWW-Authenticate`` on a 401).
    """

    def __init__(
        self, status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        self.status = status
        self.code = code
        self.headers = dict(headers or {})
        super().__init__(message)


# -- appraisal -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Appraisal:
    """What the service needs of one appraisal."""

    status: str
    """The overall status (EAR: affirming, warning, contraindicated, none)."""
    document: dict[str, Any]
    """The attestation result as JSON (EAR-style)."""
    state: dict[str, Any] | None
    """The node's appraisal state after this evidence (None: keep none)."""
    claims: dict[str, Any]
    """The result's claims as a token carries them (EAR)."""


class Appraiser(Protocol):
    def __call__(
        self,
        bundle: EvidenceBundle,
        references: ReferenceValues,
        *,
        nonce: bytes,
        state: dict[str, Any] | None,
        enrolled_keys: Mapping[bytes, str] | None = None,
    ) -> Appraisal: ...


def parse_references(text: str, source: str) -> ReferenceValues:
    """Read and validate reference values (YAML or JSON text)."""
    return load_references(text, source=source)


def appraise(
    bundle: EvidenceBundle,
    references: ReferenceValues,
    *,
    nonce: bytes,
    state: dict[str, Any] | None,
    enrolled_keys: Mapping[bytes, str] | None = None,
) -> Appraisal:
    """Run :func:`cima.verifier.appraise.appraise` with the node's state (and the enrolled
    key of the report's AK, when it is one)."""
    previous = None
    if state is not None:
        try:
            previous = AppraisalState.from_dict(state)
        except ParseError as e:  # written by another cima version: start over
            log.info("stored appraisal state not used: %s", e)
    result = run_appraisal(
        bundle, references, nonce=nonce, state=previous, enrolled_keys=enrolled_keys
    )
    new_state = result.state.to_dict() if result.state is not None else None
    return Appraisal(
        status=str(result.status),
        document=result.to_dict(),
        state=new_state,
        claims=result.claims(),
    )


# -- keys and tokens -----------------------------------------------------------------------------


def load_jwt_key(pem: bytes | str) -> ec.EllipticCurvePrivateKey:
    """The EC P-256 private key (PEM) that signs result tokens (ES256, as EAR results are)."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CimaError(f"not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CimaError(
            "result tokens are signed with ES256: give an EC P-256 private key "
            "(openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256)"
        )
    return key


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenSigner:
    """Signs results as JWTs (ES256, EAR claims) and publishes the public key as a JWK."""

    algorithm = "ES256"

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        import jwt

        self.key = key
        jwk = json.loads(jwt.get_algorithm_by_name(self.algorithm).to_jwk(key.public_key()))
        # RFC 7638 thumbprint: the required members, sorted, no white space.
        members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
        self.kid = _b64u(
            hashlib.sha256(
                json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
            ).digest()
        )
        self.jwk = {**jwk, "kid": self.kid, "alg": self.algorithm, "use": "sig"}
        self.public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: Mapping[str, Any]) -> str:
        import jwt

        token: str = jwt.encode(
            dict(claims), self.key, algorithm=self.algorithm, headers={"kid": self.kid}
        )
        return token


# -- operator tokens -----------------------------------------------------------------------------

#: The shortest operator token accepted (characters; 32 random ones are far beyond guessing).
MIN_OPERATOR_TOKEN = 32
#: The realm of the ``WWW-Authenticate`` challenge that goes with a 401.
OPERATOR_REALM = "cima-verifier"
#: The largest operator token file read.
_MAX_TOKEN_FILE = 1024 * 1024


class OperatorTokenError(CimaError):
    """An operator token file that cannot be used (the message names the file, and the line)."""


def operator_token_digest(token: str) -> bytes:
    """The SHA-256 digest of an operator token: what an instance keeps of it."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def load_operator_tokens(path: str | os.PathLike[str]) -> tuple[bytes, ...]:
    """The digests (:func:`operator_token_digest`) of the operator tokens in file ``path``.

    One token a line; blank lines and lines that start with ``#`` are
    ignored, and several tokens are all valid (to rotate one: add the new
    token, hand it out, remove the old one). A token is at least
    :data:`MIN_OPERATOR_TOKEN` characters of printable ASCII without spaces.
    The file must not be readable by others (as ssh refuses such a key).
    Any problem raises :class:`OperatorTokenError` naming the file and,
    for a bad token, its line; no message ever shows a token.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise OperatorTokenError(f"{name}: no such file") from None
    except OSError as e:
        raise OperatorTokenError(f"{name}: cannot read: {e.strerror or e}") from None
    try:  # the mode and the content of one open file
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OperatorTokenError(f"{name}: not a regular file")
        if mode & 0o004:
            raise OperatorTokenError(
                f"{name}: readable by others (mode {stat.S_IMODE(mode):04o}): "
                f"the operator tokens must be private (chmod o-rwx {name})"
            )
        chunks: list[bytes] = []
        size = 0
        while size <= _MAX_TOKEN_FILE and (chunk := os.read(fd, 65536)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise OperatorTokenError(f"{name}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > _MAX_TOKEN_FILE:
        raise OperatorTokenError(f"{name}: larger than {_MAX_TOKEN_FILE} bytes")
    digests: list[bytes] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        if any(not 0x21 <= b <= 0x7E for b in line):
            raise OperatorTokenError(
                f"{name}: line {number}: a token is printable ASCII without spaces"
            )
        if len(line) < MIN_OPERATOR_TOKEN:
            raise OperatorTokenError(
                f"{name}: line {number}: a token is at least {MIN_OPERATOR_TOKEN} characters, "
                f"this one has {len(line)}"
            )
        digest = operator_token_digest(line.decode("ascii"))
        if digest not in digests:
            digests.append(digest)
    if not digests:
        raise OperatorTokenError(
            f"{name}: no operator token (one a line; blank lines and lines starting with # "
            "are ignored)"
        )
    return tuple(digests)


# -- EK roots -------------------------------------------------------------------------------------

#: The largest EK root file read.
_MAX_ROOT_FILE = 16 * 1024 * 1024


class EKRootError(CimaError):
    """An EK root file that cannot be used (the message names the file)."""


def load_ek_roots(paths: Sequence[str | os.PathLike[str]]) -> tuple[x509.Certificate, ...]:
    """The certificates in the PEM files ``paths``: the roots an EK certificate must lead to.

    A file holds one or more PEM certificates (a TPM manufacturer's root CAs);
    every certificate is a trust anchor. A file that cannot be read or holds
    no certificate raises :class:`EKRootError` naming it.
    """
    roots: list[x509.Certificate] = []
    for path in paths:
        name = os.fspath(path)
        data = read_bounded(name, _MAX_ROOT_FILE, EKRootError)
        try:
            found = x509.load_pem_x509_certificates(data)
        except ValueError as e:
            raise EKRootError(f"{name}: not PEM certificates: {e}") from None
        for cert in found:
            if cert not in roots:
                roots.append(cert)
    return tuple(roots)


#: The operator token as a request carries it: the security scheme of reference writes.
#: It only reads the header (None when there is no bearer token); :meth:`VerifierService.
#: authorize_operator` decides, and the service answers with its own 401 and 403.
_OPERATOR_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="operatorToken",
    description=(
        "An operator token of the instance (cima verifier serve --operator-token-file): "
        "storing reference values takes one."
    ),
)


#: The 401 of an operator's request, as the API description gives it.
_OPERATOR_401: dict[str, Any] = {
    "description": "No operator token (no Authorization: Bearer), or a wrong one.",
    "headers": {
        "WWW-Authenticate": {
            "description": f'Bearer realm="{OPERATOR_REALM}"',
            "schema": {"type": "string"},
        }
    },
}


def _unauthorized(message: str) -> ServiceError:
    return ServiceError(
        401,
        "unauthorized",
        message,
        headers={"WWW-Authenticate": f'Bearer realm="{OPERATOR_REALM}"'},
    )


# -- the service (no HTTP) ------------------------------------------------------------------------


@dataclass(slots=True)
class ServiceConfig:
    """How one verifier instance behaves."""

    max_body: int = DEFAULT_MAX_BODY
    challenge_ttl: timedelta = timedelta(minutes=5)
    default_reference: str = DEFAULT_REFERENCE
    jwt_key: ec.EllipticCurvePrivateKey | None = None
    operator_tokens: tuple[bytes, ...] = ()
    """SHA-256 digests of the tokens that authorize reference writes (:func:`load_operator_tokens`).

    Empty: the instance takes no reference values (403 ``read_only``)."""
    ek_roots: tuple[x509.Certificate, ...] = ()
    """The roots an EK certificate must lead to for its TPM's AK to be enrolled
    (:func:`load_ek_roots`). Empty: the instance enrolls no key (403 ``no_ek_roots``)."""
    enrollment_ttl: timedelta = DEFAULT_ENROLLMENT_TTL
    """How long an enrollment's credential can be activated."""
    threads: int = DEFAULT_THREADS
    """Threads for the store's work (0: on the event loop, the work running to completion).

    Decoding and appraising hold the interpreter lock whatever thread runs them,
    so they run on the event loop; the store's work (short: SQLite in WAL mode,
    PostgreSQL in a few round trips) runs there too by default, which costs the
    least CPU. Threads let a process go on with other requests while the
    database answers, for a distant or slow database."""


@dataclass(frozen=True, slots=True)
class PendingAttestation:
    """An attestation between the steps of :meth:`VerifierService.attest`."""

    bundle: EvidenceBundle
    key_id: str
    reference: str
    session: str | None
    node: str | None
    fallback_node: str
    """The node when the challenge names none: the request's, else the signing key's."""
    ak_name: bytes | None = None
    """The TPM name of the report's AK (TPM quotes), what an enrolled key is found by."""


@dataclass(frozen=True, slots=True)
class EnrollmentRequest:
    """What ``POST /v1/enrollments`` carries (hex public areas, PEM certificates)."""

    ek_public: str
    ek_certificate: str
    ak_public: str
    node_id: str | None = None
    intermediates: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class IssuedCredential:
    """An enrollment and its credential, as ``POST /v1/enrollments`` answers it."""

    enrollment: Enrollment
    credential_blob: bytes
    """TPM2B_ID_OBJECT."""
    encrypted_secret: bytes
    """TPM2B_ENCRYPTED_SECRET."""

    def to_dict(self) -> dict[str, Any]:
        e = self.enrollment
        return {
            "id": e.id,
            "credential_blob": self.credential_blob.hex(),
            "encrypted_secret": self.encrypted_secret.hex(),
            "expires": e.to_dict()["expires"],
            "node_id": e.node_id,
            "ak_name": e.ak_name.hex(),
        }


@dataclass(frozen=True, slots=True)
class _Parsed:
    version: int
    digest: str
    references: ReferenceValues


class VerifierService:
    """The verifier's operations over a store; :func:`create_app` is its thin HTTP adapter.

    Every method is blocking (database, cryptography) and thread-safe.
    """

    def __init__(
        self,
        store: Store,
        config: ServiceConfig | None = None,
        *,
        appraiser: Appraiser = appraise,
    ) -> None:
        self.store = store
        self.config = config or ServiceConfig()
        self.appraiser = appraiser
        self.signer = TokenSigner(self.config.jwt_key) if self.config.jwt_key is not None else None
        self._cache: OrderedDict[str, _Parsed] = OrderedDict()
        self._lock = threading.Lock()
        self._last_purge = time.monotonic()

    # -- challenges ----------------------------------------------------------------------------
    def challenge(self, node_id: str | None = None) -> Challenge:
        if node_id is not None:
            _node(node_id)
        self._maybe_purge()
        return self.store.create_challenge(node_id=node_id, ttl=self.config.challenge_ttl)

    def _maybe_purge(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_purge < _PURGE_EVERY:
                return
            self._last_purge = now
        try:
            self.store.purge_challenges(expired_before=datetime.now(UTC) - _PURGE_AFTER)
        except StoreError as e:  # housekeeping only
            log.warning("purging expired challenges failed: %s", e)
        try:
            self.store.purge_enrollments(expired_before=datetime.now(UTC) - _PURGE_AFTER)
        except StoreError as e:
            log.warning("purging expired enrollments failed: %s", e)

    # -- references ----------------------------------------------------------------------------
    def authorize_operator(self, token: str | None, what: str = "reference values") -> int:
        """Refuse an operator's request unless ``token`` is an operator token of this instance.

        ``what`` names what the request changes (``reference values``, ``key
        revocations``) in the refusals.

        403 ``read_only`` when the instance has no operator tokens; 401
        ``unauthorized`` when ``token`` is None (no bearer token) or none of
        them. The presented token's digest is compared with every configured
        digest (:func:`hmac.compare_digest`), whichever matches. Returns which
        token it is (1: the first of the file).
        """
        digests = self.config.operator_tokens
        if not digests:
            raise ServiceError(
                403,
                "read_only",
                f"this instance takes no {what}: it was started without --operator-token-file",
            )
        if token is None:
            raise _unauthorized(
                f"{what} take an operator token: send Authorization: Bearer <token>"
            )
        presented = operator_token_digest(token)
        found = 0
        for i, digest in enumerate(digests, start=1):
            if hmac.compare_digest(presented, digest) and not found:
                found = i
        if not found:
            raise _unauthorized("the bearer token is not an operator token of this instance")
        return found

    def put_reference(
        self, name: str, body: bytes, media_type: str | None
    ) -> tuple[ReferenceRecord, bool]:
        """Store a new version of reference set ``name``; (the record, whether it is new)."""
        _name(name)
        text = _text(body)
        kind = _media(media_type)
        if kind == "json":
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as e:
                raise ServiceError(400, "bad-json", f"reference values: not JSON: {e}") from None
        else:
            doc = _load_yaml(text)
        if not isinstance(doc, dict):
            raise ServiceError(
                422, "invalid-references", "reference values: the document must be a mapping"
            )
        try:
            parsed = parse_references(text, f"reference set {name}")
        except (CimaError, ValueError) as e:
            raise ServiceError(422, "invalid-references", str(e)) from None
        normalised = parsed.to_dict()
        before = self._head(name)
        record = self.store.put_reference(
            name,
            normalised,
            source=text,
            media_type="application/json" if kind == "json" else "application/yaml",
        )
        return record, before is None or before[0] != record.version

    def _head(self, name: str) -> tuple[int, str] | None:
        try:
            return self.store.reference_head(name)
        except NotFoundError:
            return None

    def get_reference(self, name: str, version: int | None = None) -> ReferenceRecord:
        _name(name)
        try:
            return self.store.get_reference(name, version)
        except NotFoundError as e:
            raise ServiceError(404, "not-found", str(e)) from None

    def _references(self, name: str, version: int, digest: str) -> ReferenceValues:
        """Version ``version`` of reference set ``name``, parsed (cached by content digest)."""
        key = f"{name}\x00{version}"
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit.digest == digest:
                self._cache.move_to_end(key)
                return hit.references
        record = self.store.get_reference(name, version)
        try:
            parsed = parse_references(
                json.dumps(record.document), f"stored reference set {name} v{version}"
            )
        except (CimaError, ValueError) as e:
            raise ServiceError(
                500, "bad-stored-references", f"stored reference set {name} v{version}: {e}"
            ) from e
        with self._lock:
            self._cache[key] = _Parsed(version, record.digest, parsed)
            while len(self._cache) > _REFERENCE_CACHE:
                self._cache.popitem(last=False)
        return parsed

    # -- attestation ---------------------------------------------------------------------------
    def attest(
        self,
        body: bytes,
        *,
        session: str | None = None,
        node: str | None = None,
        reference: str | None = None,
    ) -> StoredResult:
        """Appraise one evidence bundle (JSON bytes) and store the result.

        Steps:
        (1) decode the bundle (400 not JSON, 422 not a valid bundle);
        (2) read, in one statement: the challenge of the bundle's nonce, which must be
            issued by this cluster, unexpired and unused (403, 409); the reference set's
            latest version (404); the node (the challenge's, else the request's, else
            the signing key's) and its stored appraisal state;
        (3) appraise, from that state when it was left by the same signing key;
        (4) sign the result when the service has a key;
        (5) in one transaction: consume the nonce (exactly once across every instance:
            of two attestations with one nonce, the second is refused here and stores
            nothing), store the result, and the node's new state unless another
            attestation of the node stored a newer one meanwhile.
        A request refused before (5) leaves its nonce usable.
        """
        pending = self.decode(body, session=session, node=node, reference=reference)
        started = self.begin(pending)
        done = self.appraise(pending, started)
        return self.finish(pending, started, done)

    # The steps of attest(), for a caller that runs the store's (2, 5) elsewhere than the
    # appraisal's (1, 3, 4): the HTTP adapter runs the store's on a thread.
    def decode(
        self,
        body: bytes,
        *,
        session: str | None = None,
        node: str | None = None,
        reference: str | None = None,
    ) -> PendingAttestation:
        """Step (1) of :meth:`attest`: the bundle and what names the node."""
        bundle = decode_bundle(body)
        if node is not None:
            _node(node)
        name = _name(reference or self.config.default_reference)
        key_id, ak_name = _signing_key(bundle)
        fallback = node or f"key-{key_id.split(':', 1)[1][:32]}"
        return PendingAttestation(bundle, key_id, name, session, node, fallback, ak_name)

    def begin(self, pending: PendingAttestation) -> tuple[Attestation, ReferenceValues]:
        """Step (2) of :meth:`attest` (the store): the challenge, the references, the node."""
        node = pending.node

        def node_of(challenge: Challenge) -> str:
            if challenge.node_id is not None and node is not None and node != challenge.node_id:
                raise ServiceError(
                    400,
                    "node-mismatch",
                    f"the challenge was issued for node {challenge.node_id!r}, not {node!r}",
                )
            return challenge.node_id or pending.fallback_node

        name = pending.reference
        try:
            started = self.store.begin_attestation(
                pending.bundle.nonce,
                session=pending.session,
                reference=name,
                node=node_of,
                node_hint=pending.fallback_node,
                ak_name=pending.ak_name,
            )
        except NonceError as e:
            raise _nonce_refused(e) from None
        except NotFoundError:
            raise ServiceError(
                404,
                "no-references",
                f"reference set {name!r}: not found (store it with PUT /v1/references/{name})",
            ) from None
        _, version, digest = started.reference
        return started, self._references(name, version, digest)

    def appraise(
        self, pending: PendingAttestation, begun: tuple[Attestation, ReferenceValues]
    ) -> tuple[Appraisal, str | None, datetime]:
        """Steps (3) and (4) of :meth:`attest`: the appraisal and its token."""
        started, references = begun
        stored = started.node
        previous = stored.state if stored.key_id == pending.key_id else None
        enrolled = started.enrolled
        named = started.challenge.node_id or pending.node
        if enrolled is not None and named is not None and named != enrolled.node_id:
            # An enrolled key speaks for the node it was enrolled as, and for no other.
            raise ServiceError(
                400,
                "node-mismatch",
                f"the attestation key is enrolled for node {enrolled.node_id!r}, not {named!r}",
            )
        appraisal = self.appraiser(
            pending.bundle,
            references,
            nonce=started.challenge.nonce,
            state=previous,
            enrolled_keys={} if enrolled is None else {enrolled.ak_name: enrolled.description()},
        )
        created = datetime.now(UTC)
        token = self._token(appraisal, stored.node_id, pending.key_id, started.challenge, created)
        return appraisal, token, created

    def finish(
        self,
        pending: PendingAttestation,
        begun: tuple[Attestation, ReferenceValues],
        done: tuple[Appraisal, str | None, datetime],
    ) -> StoredResult:
        """Step (5) of :meth:`attest` (the store): consume the nonce, store the result."""
        started, _ = begun
        appraisal, token, created = done
        try:
            result, saved = self.store.finish_attestation(
                started,
                status=appraisal.status,
                document=appraisal.document,
                token=token,
                state=appraisal.state,
                key_id=pending.key_id,
                created=created,
            )
        except NonceError as e:
            raise _nonce_refused(e) from None
        if appraisal.state is not None and not saved:
            log.info("node %s: a newer appraisal state was stored meanwhile", started.node.node_id)
        return result

    def _token(
        self,
        appraisal: Appraisal,
        node_id: str,
        key_id: str,
        challenge: Challenge,
        created: datetime,
    ) -> str | None:
        if self.signer is None:
            return None
        claims: dict[str, Any] = dict(appraisal.claims)
        claims.setdefault("iat", int(created.timestamp()))
        claims.setdefault("eat_nonce", _b64u(challenge.nonce))
        claims["cima.node"] = node_id
        claims["cima.key"] = key_id
        return self.signer.sign(claims)

    # -- enrollment ----------------------------------------------------------------------------
    def enroll(self, request: EnrollmentRequest) -> IssuedCredential:
        """Check an endorsement and answer a credential for the AK (``POST /v1/enrollments``).

        403 ``no_ek_roots`` when the instance has no EK roots; 422 naming the field for
        what is not hex, PEM or a public area; 403 ``untrusted_endorsement`` when the EK
        certificate does not lead to a root, the EK public area is not the certificate's
        key or the AK's is not a restricted signing key (the detail names the step).
        Then a fresh secret, its credential (bound to the AK's TPM name, encrypted to
        the EK) and a pending enrollment holding the secret's SHA-256.
        """
        from cima.evidence.credential import (
            CredentialError,
            EndorsementError,
            check_ak_public,
            check_ek_certificate,
            check_ek_public,
            make_credential,
        )

        roots = self.config.ek_roots
        if not roots:
            raise ServiceError(
                403,
                "no_ek_roots",
                "this instance enrolls no attestation key: it was started without --ek-ca "
                "(the TPM manufacturers' root certificates)",
            )
        if request.node_id is not None:
            _node(request.node_id)
        ek = _public_area("ek_public", request.ek_public)
        ak = _public_area("ak_public", request.ak_public)
        cert = _certificate("ek_certificate", request.ek_certificate)
        intermediates: list[x509.Certificate] = []
        for i, pem in enumerate(request.intermediates):
            intermediates.extend(_certificates(f"intermediates[{i}]", pem))
        try:
            check_ek_certificate(cert, roots, intermediates, at=datetime.now(UTC))
            check_ek_public(ek, cert)
            check_ak_public(ak)
            _check_ak_name(ak)
        except EndorsementError as e:
            raise ServiceError(403, "untrusted_endorsement", _endorsement_detail(e)) from None
        try:
            ak_name = ak.name
            spki = ak.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        except CimaError as e:
            raise ServiceError(422, "invalid-enrollment", f"ak_public: {e}") from None
        node_id = request.node_id or f"key-{hashlib.sha256(spki).hexdigest()[:32]}"
        secret = secrets.token_bytes(ENROLLMENT_SECRET_SIZE)
        try:
            blob, encrypted = make_credential(ek, ak_name, secret)
        except CredentialError as e:
            raise ServiceError(422, "invalid-enrollment", f"ek_public: {e}") from None
        der = cert.public_bytes(serialization.Encoding.DER)
        enrollment = self.store.create_enrollment(
            node_id=node_id,
            ak_name=ak_name,
            ak_public=len(ak.raw).to_bytes(2, "big") + ak.raw,  # as received
            ek_certificate_sha256=hashlib.sha256(der).hexdigest(),
            ek_subject=_subject(cert),
            secret_sha256=hashlib.sha256(secret).digest(),
            ttl=self.config.enrollment_ttl,
        )
        log.info(
            "enrollment %s: node %s, AK %s, EK certificate %s",
            enrollment.id,
            node_id,
            ak_name.hex(),
            enrollment.ek_subject,
        )
        return IssuedCredential(enrollment, blob, encrypted)

    def activate(self, enrollment_id: str, secret: str) -> EnrolledKey:
        """Spend an enrollment with the secret the node's TPM recovered; the enrolled key.

        422 for a secret that is not hex; 404 no such enrollment; 403 ``wrong_secret``
        (the enrollment is spent); 409 ``enrollment_spent`` (activated before, rightly
        or not); 410 ``enrollment_expired``.
        """
        try:
            value = bytes.fromhex(secret)
        except ValueError:
            raise ServiceError(422, "invalid-enrollment", "secret: not a hex string") from None
        try:
            key = self.store.activate_enrollment(enrollment_id, value)
        except EnrollmentError as e:
            status, code = _ENROLLMENT_REFUSALS[e.reason]
            log.warning("enrollment %.16s: activation refused: %s", enrollment_id, e)
            raise ServiceError(status, code, str(e)) from None
        log.info(
            "enrollment %s: AK %s of node %s enrolled",
            key.enrollment,
            key.ak_name.hex(),
            key.node_id,
        )
        return key

    def enrolled_keys(self, node: str | None = None) -> list[EnrolledKey]:
        if node is not None:
            _node(node)
        return self.store.enrolled_keys(node)

    def revoke(self, ak_name: str) -> EnrolledKey:
        """Withdraw the trust an enrollment gave attestation key ``ak_name`` (hex TPM name)."""
        try:
            name = bytes.fromhex(ak_name)
        except ValueError:
            raise ServiceError(422, "invalid-request", "ak_name: not a hex string") from None
        key = self.store.revoke_enrolled_key(name)
        if key is None:
            raise ServiceError(404, "not-found", f"no enrolled key has TPM name {ak_name}")
        log.warning(
            "enrolled key %s of node %s revoked (enrolled %s)",
            ak_name,
            key.node_id,
            key.enrolled.isoformat(),
        )
        return key

    # -- results -------------------------------------------------------------------------------
    def results(
        self, node: str | None = None, *, limit: int = 100, before: int | None = None
    ) -> list[StoredResult]:
        if node is not None:
            _node(node)
        return self.store.results(node_id=node, limit=limit, before=before)

    def latest(self, node: str) -> StoredResult:
        _node(node)
        found = self.store.latest_result(node)
        if found is None:
            raise ServiceError(404, "not-found", f"node {node!r}: no results")
        return found

    def result(self, result_id: int) -> StoredResult:
        try:
            return self.store.get_result(result_id)
        except NotFoundError as e:
            raise ServiceError(404, "not-found", str(e)) from None


# -- helpers ---------------------------------------------------------------------------------------


def _nonce_refused(e: NonceError) -> ServiceError:
    return ServiceError(409 if e.reason == "used" else 403, f"nonce-{e.reason}", str(e))


#: What an activation refused by the store is answered with: (status, code).
_ENROLLMENT_REFUSALS: dict[str, tuple[int, str]] = {
    "unknown": (404, "not-found"),
    "expired": (410, "enrollment_expired"),
    "used": (409, "enrollment_spent"),
    "wrong-secret": (403, "wrong_secret"),
}


def _hex_field(field: str, value: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ServiceError(422, "invalid-enrollment", f"{field}: not a hex string") from None


def _public_area(field: str, value: str) -> PublicArea:
    """A TPM2B_PUBLIC given in hex: 422 naming ``field`` when it is not one."""
    data = _hex_field(field, value)
    try:
        return PublicArea.from_bytes(data)
    except (ParseError, ValueError) as e:
        raise ServiceError(
            422, "invalid-enrollment", f"{field}: not a TPM2B_PUBLIC of an RSA or ECC key: {e}"
        ) from None


def _certificates(field: str, pem: str) -> list[x509.Certificate]:
    try:
        found = x509.load_pem_x509_certificates(pem.encode())
    except ValueError as e:
        reason = " ".join(str(e).split())
        raise ServiceError(
            422, "invalid-enrollment", f"{field}: not a PEM certificate: {reason}"
        ) from None
    return found


def _certificate(field: str, pem: str) -> x509.Certificate:
    found = _certificates(field, pem)
    if len(found) != 1:
        raise ServiceError(
            422, "invalid-enrollment", f"{field}: one PEM certificate, not {len(found)}"
        )
    return found[0]


def _check_ak_name(ak: PublicArea) -> None:
    """The AK's TPM name is the one step 2 gives the key of a report's ``ak_pem``.

    A report carries the AK's public key only; the appraisal names it as the
    standard attestation key template would (:meth:`EvidenceView.ak_tpm_name`).
    An AK of another template would be enrolled under a name no report leads to.
    """
    from cima.digests import by_id
    from cima.evidence.credential import EndorsementError

    why = ""
    try:
        standard = PublicArea.from_public_key(
            ak.public_key(), algorithm=by_id(ak.scheme_hash).name
        ).name
    except (CimaError, ValueError) as e:
        standard, why = None, f" ({e})"
    if standard != ak.name:
        raise EndorsementError(
            "the AK's public area is not the standard attestation key template (nameAlg "
            "SHA-256, no policy, the attributes fixedTPM, fixedParent, sensitiveDataOrigin, "
            "userWithAuth, restricted and sign, an RSASSA or ECDSA scheme): a quote names its "
            "AK by that template, so none would lead to this one" + why,
            step="ak-public",
            reason="template",
        )


def _subject(cert: x509.Certificate) -> str:
    """An EK certificate's subject; for an empty one (usual: the TPM is named in the
    subjectAltName), who issued it."""
    try:
        subject = cert.subject.rfc4514_string()
        return subject or f"empty subject, issued by {cert.issuer.rfc4514_string()}"
    except (ValueError, TypeError):
        return f"serial 0x{cert.serial_number:x}"


def _endorsement_detail(e: Any) -> str:
    step = str(getattr(e, "step", "") or "")
    reason = " ".join(str(e).split())
    return reason if not step or reason.startswith(step) else f"{step}: {reason}"


def decode_bundle(body: bytes) -> EvidenceBundle:
    """A bundle from request bytes: 400 when not JSON, 422 when not a valid bundle."""
    try:
        doc = loads_json(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ServiceError(400, "bad-json", f"evidence bundle: not JSON: {e}") from None
    except RecursionError:
        raise ServiceError(400, "bad-json", "evidence bundle: JSON nested too deeply") from None
    try:
        return EvidenceBundle.from_dict(doc, parsed=True)
    except UnsupportedFormatError as e:
        raise ServiceError(422, "unsupported-version", str(e)) from None
    except ParseError as e:
        raise ServiceError(422, "invalid-bundle", f"evidence bundle: {e}") from None


def signing_key_id(bundle: EvidenceBundle) -> str:
    """``sha256:<hex>`` of the key that signed the report (TPM AK SPKI, TDX attestation key)."""
    return _signing_key(bundle)[0]


def _signing_key(bundle: EvidenceBundle) -> tuple[str, bytes | None]:
    """:func:`signing_key_id`, and the TPM name of a TPM report's AK (as step 2 names it)."""
    report = bundle.report
    if isinstance(report, TPMQuoteReport):
        if len(report.ak_pem) > _MAX_CACHED_PEM:  # not an AK's PEM: not worth keeping
            return _tpm_signing_key.__wrapped__(report.ak_pem, report.hash_algorithm)
        return _tpm_signing_key(report.ak_pem, report.hash_algorithm)
    assert isinstance(report, TDXQuoteReport)
    try:
        from cima.evidence.tdx import TDXQuote

        material = TDXQuote.from_bytes(report.quote).signature_data.attestation_key
    except (ParseError, AttributeError):
        material = report.quote[:48]
    return "sha256:" + hashlib.sha256(material).hexdigest(), None


#: The longest AK PEM whose key id and name are kept (an RSA-4096 key's is about 800 bytes).
_MAX_CACHED_PEM = 4096


@functools.lru_cache(maxsize=1024)
def _tpm_signing_key(ak_pem: str, algorithm: str) -> tuple[str, bytes | None]:
    """The key id and the TPM name of an AK given as PEM (a node sends the same one each
    time: kept for the keys seen last). The name is the standard template's
    (:meth:`EvidenceView.ak_tpm_name`); None for a key that has none."""
    try:
        key = serialization.load_pem_public_key(ak_pem.encode())
        material = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError, UnsupportedFormatError):
        return "sha256:" + hashlib.sha256(ak_pem.encode()).hexdigest(), None
    name = None
    if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        try:
            name = PublicArea.from_public_key(key, algorithm=algorithm).name
        except (CimaError, ValueError, KeyError):
            name = None
    return "sha256:" + hashlib.sha256(material).hexdigest(), name


def _node(node: str) -> str:
    try:
        return check_node_id(node)
    except ValueError as e:
        raise ServiceError(422, "invalid-node", str(e)) from None


def _name(name: str) -> str:
    try:
        return check_name(name)
    except ValueError as e:
        raise ServiceError(422, "invalid-name", str(e)) from None


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ServiceError(400, "bad-encoding", f"the body is not UTF-8: {e}") from None


def _media(media_type: str | None) -> str:
    """``json`` or ``yaml`` for a Content-Type (none: YAML, which reads JSON too)."""
    if not media_type:
        return "yaml"
    base = media_type.split(";", 1)[0].strip().lower()
    if base in JSON_TYPES or base.endswith("+json"):
        return "json"
    if base in YAML_TYPES or base in ("text/plain", "application/octet-stream"):
        return "yaml"
    raise ServiceError(
        415, "unsupported-media-type", f"{base}: send application/json or application/yaml"
    )


class _NoAliasLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses aliases (no billion-laughs expansion)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event: Any = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: YAML aliases are not accepted")
        return super().compose_node(parent, index)


def _load_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ServiceError(
            400, "bad-yaml", "reference values: not YAML: " + " ".join(str(e).split())
        ) from None
    except RecursionError:
        raise ServiceError(400, "bad-yaml", "reference values: nested too deeply") from None


# -- HTTP ----------------------------------------------------------------------------------------

#: The version of the HTTP API in the OpenAPI description.
API_VERSION = "1.0.0"


#: The environment variable that carries ``cima verifier serve``'s settings to worker processes.
SETTINGS_VARIABLE = "CIMA_VERIFIER_SETTINGS"


def app_from_environment() -> FastAPI:
    """The app of one worker process of ``cima verifier serve --workers N`` (uvicorn factory)."""
    settings = json.loads(os.environ[SETTINGS_VARIABLE])
    key = None
    if settings.get("jwt_key"):
        with open(settings["jwt_key"], "rb") as f:
            key = load_jwt_key(f.read())
    # The file's path, not its tokens, is in the environment: each worker reads the file.
    token_file = settings.get("operator_token_file")
    # The EK roots' files too (each worker reads them).
    ek_ca = [str(p) for p in settings.get("ek_ca") or ()]
    config = ServiceConfig(
        max_body=int(settings["max_body"]),
        challenge_ttl=timedelta(seconds=float(settings["challenge_ttl"])),
        default_reference=str(settings["reference"]),
        jwt_key=key,
        operator_tokens=load_operator_tokens(token_file) if token_file else (),
        ek_roots=load_ek_roots(ek_ca) if ek_ca else (),
        enrollment_ttl=timedelta(
            seconds=float(settings.get("enrollment_ttl") or DEFAULT_ENROLLMENT_TTL.total_seconds())
        ),
        threads=int(settings["threads"]),
    )
    store = Store(str(settings["store"]), instance=f"{settings['instance']}/{os.getpid()}")
    return create_app(VerifierService(store, config), close_store=True)


def listening_socket(
    host: str, port: int, *, listen: bool = True, reuse_port: bool = False
) -> socket.socket:
    """A TCP socket bound to ``host:port``, listening unless ``listen`` is false.

    Its connections are set ``TCP_NODELAY`` (a response written in two parts,
    headers then body, is otherwise held back by Nagle's algorithm until the
    client's delayed ACK, some 40 ms). ``reuse_port`` (``SO_REUSEPORT``, Linux):
    the worker processes of one instance each listen on a socket of their own
    and the kernel spreads new connections over them evenly (on one shared
    socket, whichever worker wakes first takes a whole burst of connections,
    and keep-alive connections stay where they were accepted).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say they are TCP.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def tune_gc(young: int = 20_000) -> None:
    """Garbage collection for a server process, once it has started.

    What start-up made (modules, the application, the store) lives as long
    as the process: frozen, the collector no longer walks it. Each request
    makes thousands of short-lived objects (the bundle's JSON, the result
    document), and a collection of the young generation every ``young``
    allocations instead of every 700 keeps the collector's cost low.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young, older, oldest)


def serve_worker(
    host: str, port: int, options: dict[str, Any], ready: Any, parent: int | None = None
) -> None:
    """One worker process of ``cima verifier serve --workers N`` on Linux.

    It opens the store and builds the app from the settings in the
    environment (:func:`app_from_environment`), listens on a socket of its own
    (:func:`listening_socket`), sets ``ready`` and serves until told to stop
    (SIGTERM, SIGINT) or its parent, the instance's process (``parent``, its
    pid), is gone.
    """
    import uvicorn

    # A spawned process starts with logging unconfigured: as the instance's process does.
    logging.basicConfig(
        level=getattr(logging, str(options.get("log_level", "warning")).upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        sock = listening_socket(host, port, reuse_port=True)
        config = uvicorn.Config(app_from_environment(), **options)
        config.load()
    except (CimaError, OSError, ValueError) as e:
        sys.stderr.write(f"cima verifier worker {os.getpid()}: {e}\n")
        raise SystemExit(3) from None
    if parent is None:
        parent = os.getppid()

    def orphaned() -> None:  # the instance's process is gone (killed): stop serving
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphaned, name="cima-parent-watch", daemon=True).start()
    tune_gc()
    ready.set()
    uvicorn.Server(config).run(sockets=[sock])


def instance_name() -> str:
    """A default name for this instance: host and process id."""
    return f"{socket.gethostname()}-{os.getpid()}"


class ChallengeRequest(BaseModel):
    """Body of ``POST /v1/challenge``."""

    model_config = ConfigDict(extra="forbid")
    node_id: str | None = Field(
        default=None,
        max_length=253,
        description="The node that will answer; its result is stored under this id.",
    )


class ChallengeResponse(BaseModel):
    nonce: str = Field(description="Hex; the evidence must bind it (bundle field `nonce`).")
    session: str
    node_id: str | None
    expires: str = Field(description="RFC 3339, UTC.")


class ReferenceName(BaseModel):
    name: str
    version: int


class AttestationResponse(BaseModel):
    id: int
    node_id: str
    key_id: str | None = Field(
        description="sha256:<hex> of the public key that signed the evidence (TPM AK, TDX "
        "attestation key): what ties the node name to a machine."
    )
    created: str
    status: str = Field(description="affirming | warning | contraindicated | none")
    session: str | None
    reference: ReferenceName | None
    result: dict[str, Any] = Field(description="The attestation result (EAR-style).")
    token: str | None = Field(
        description="The result as a signed JWT, when the verifier has a key."
    )


class ResultList(BaseModel):
    results: list[AttestationResponse]


class Reference(BaseModel):
    name: str
    version: int
    created: str
    digest: str = Field(description="SHA-256 of the document's canonical JSON.")
    document: dict[str, Any] | None = None


class ReferenceList(BaseModel):
    references: list[Reference]


class EnrollmentBody(BaseModel):
    """Body of ``POST /v1/enrollments``."""

    model_config = ConfigDict(extra="forbid")
    node_id: str | None = Field(
        default=None,
        max_length=253,
        description="The node the key is enrolled for (default: derived from the AK, "
        "key-<hex>, as an attestation derives it).",
    )
    ek_public: str = Field(
        max_length=4096, description="The EK's public area: a TPM2B_PUBLIC, hex."
    )
    ek_certificate: str = Field(
        max_length=65536, description="The EK certificate (PEM), as the TPM's NV holds it."
    )
    ak_public: str = Field(
        max_length=4096, description="The AK's public area: a TPM2B_PUBLIC, hex."
    )
    intermediates: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="CA certificates (PEM) between the EK certificate and a root of the "
        "verifier (--ek-ca): the TPM manufacturer's intermediate CAs.",
    )


class EnrollmentResponse(BaseModel):
    id: str = Field(description="The enrollment, activated at /v1/enrollments/{id}/activate.")
    credential_blob: str = Field(description="TPM2B_ID_OBJECT, hex (TPM2_ActivateCredential).")
    encrypted_secret: str = Field(description="TPM2B_ENCRYPTED_SECRET, hex.")
    expires: str = Field(description="RFC 3339, UTC: activate before.")
    node_id: str
    ak_name: str = Field(description="The AK's TPM name (hex): the credential is bound to it.")


class ActivationBody(BaseModel):
    """Body of ``POST /v1/enrollments/{id}/activate``."""

    model_config = ConfigDict(extra="forbid")
    secret: str = Field(
        max_length=1024, description="The secret TPM2_ActivateCredential recovered, hex."
    )


class ActivationResponse(BaseModel):
    status: str = Field(description="enrolled")
    node_id: str
    ak_name: str
    ek_subject: str


class EnrolledKeyModel(BaseModel):
    ak_name: str = Field(description="The AK's TPM name, hex.")
    node_id: str
    ak_public: str = Field(description="The AK's TPM2B_PUBLIC, hex.")
    ek_certificate_sha256: str
    ek_subject: str
    enrolled: str = Field(description="RFC 3339, UTC.")
    enrollment: str = Field(description="The enrollment that enrolled it.")


class EnrolledKeyList(BaseModel):
    keys: list[EnrolledKeyModel]


class ErrorResponse(BaseModel):
    detail: str
    error: str


class Health(BaseModel):
    status: str
    instance: str
    schema_version: int


class KeySet(BaseModel):
    keys: list[dict[str, Any]]


def _bundle_schemas() -> dict[str, Any]:
    """The evidence bundle's JSON Schema as OpenAPI components (its ``$defs`` lifted out)."""
    from cima.evidence.bundle import SCHEMA_PATH

    schema = json.loads(SCHEMA_PATH.read_text())
    defs = schema.pop("$defs", {})
    schema.pop("$schema", None)
    schema.pop("$id", None)

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: (
                    "#/components/schemas/EvidenceBundle_" + v.removeprefix("#/$defs/")
                    if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/")
                    else rewrite(v)
                )
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    out = {"EvidenceBundle": rewrite(schema)}
    for name, sub in defs.items():
        out[f"EvidenceBundle_{name}"] = rewrite(sub)
    return out


def create_app(service: VerifierService | None, *, close_store: bool = False) -> FastAPI:
    """The FastAPI application of one verifier instance (``None``: for the description only).

    ``close_store``: close the service's store when the server shuts down.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if close_store and service is not None:
                service.store.close()

    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 403, 404, 409, 413, 415, 422, 503)
    }
    app = FastAPI(
        title="cima verifier",
        version=API_VERSION,
        description=(
            "Challenges (nonces), evidence bundles in, attestation results out. "
            "Any number of instances may share one store; a nonce is accepted once."
        ),
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )

    limiter: list[anyio.CapacityLimiter] = []

    threads = service.config.threads if service is not None else 0

    async def blocking(fn: Callable[[], T]) -> T:
        """Run ``fn``, the store's work, where ``ServiceConfig.threads`` says.

        0: here, on the event loop, to completion (a worker process serves one
        request's store work at a time, as a synchronous server would; the
        other workers serve meanwhile). N: on one of N threads, while the loop
        goes on; each handing over of the interpreter lock between the loop and
        a thread costs more CPU than the short work of the store it hands over.
        """
        if threads <= 0:
            return fn()
        if not limiter:
            limiter.append(anyio.CapacityLimiter(threads))
        return await anyio.to_thread.run_sync(fn, limiter=limiter[0])

    def svc() -> VerifierService:
        if service is None:  # pragma: no cover - description-only app
            raise ServiceError(503, "no-service", "this application only describes the API")
        return service

    def limit() -> int:
        return svc().config.max_body

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, e: ServiceError) -> JSONResponse:
        return _JSON(
            {"detail": str(e), "error": e.code}, status_code=e.status, headers=e.headers or None
        )

    @app.exception_handler(NotFoundError)
    async def _not_found(_request: Request, e: NotFoundError) -> JSONResponse:
        return _JSON({"detail": str(e), "error": "not-found"}, status_code=404)

    @app.exception_handler(StoreError)
    async def _store_error(_request: Request, e: StoreError) -> JSONResponse:
        log.error("store: %s", e)
        return _JSON({"detail": str(e), "error": "store-unavailable"}, status_code=503)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for item in e.errors():
            where = ".".join(str(x) for x in item.get("loc", ()) if x != "body")
            msg = "unknown field" if item.get("type") == "extra_forbidden" else item.get("msg")
            parts.append(f"{where}: {msg}" if where else str(msg))
        return _JSON(
            {"detail": "; ".join(parts) or "invalid request", "error": "invalid-request"},
            status_code=422,
        )

    async def operator(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_OPERATOR_BEARER)],
    ) -> None:
        """The request is an operator's (401, 403 otherwise), before its body is read.

        It runs before the route's parameters are checked and its body read: a
        request that is not an operator's costs no more than its headers.
        """
        name = request.path_params.get("name")
        token = None if credentials is None else credentials.credentials
        try:
            which = svc().authorize_operator(token)
        except ServiceError as e:
            client = request.client.host if request.client is not None else "-"
            log.warning("reference write to %.200r from %s refused: %s", name, client, e)
            raise
        log.info("reference write to %.200r with operator token %d", name, which)

    async def revoker(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_OPERATOR_BEARER)],
    ) -> None:
        """The request is an operator's (401, 403 otherwise): a key revocation."""
        name = request.path_params.get("ak_name")
        token = None if credentials is None else credentials.credentials
        try:
            which = svc().authorize_operator(token, "key revocations")
        except ServiceError as e:
            client = request.client.host if request.client is not None else "-"
            log.warning("revocation of %.200r from %s refused: %s", name, client, e)
            raise
        log.info("revocation of %.200r with operator token %d", name, which)

    async def read_body(request: Request) -> bytes:
        # _BodyCap (below) refuses a body over the cap, declared or streamed.
        chunks = [chunk async for chunk in request.stream()]
        return b"".join(chunks)

    @app.get(
        "/healthz",
        response_model=Health,
        responses={503: {"model": ErrorResponse}},
        tags=["service"],
    )
    async def healthz() -> JSONResponse:
        """The instance is up and its store answers."""
        s = svc()
        version = await blocking(s.store.schema_version)
        return _JSON({"status": "ok", "instance": s.store.instance, "schema_version": version})

    @app.post(
        "/v1/challenge",
        response_model=ChallengeResponse,
        responses=errors,
        tags=["attestation"],
    )
    async def challenge(body: ChallengeRequest | None = None) -> JSONResponse:
        """A fresh nonce for one attestation, usable once at any instance until it expires."""
        node_id = None if body is None else body.node_id
        made = await blocking(lambda: svc().challenge(node_id))
        return _JSON(made.to_dict())

    @app.post(
        "/v1/attest",
        response_model=AttestationResponse,
        responses=errors,
        tags=["attestation"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "An evidence bundle (cima.evidence.bundle) that binds a nonce.",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/EvidenceBundle"}}
                },
            }
        },
    )
    async def attest(
        request: Request,
        session: str | None = Query(
            default=None, max_length=64, description="The challenge's session."
        ),
        node: str | None = Query(
            default=None, max_length=253, description="The node, when the challenge named none."
        ),
        reference: str | None = Query(
            default=None, max_length=200, description="The reference set (default: `default`)."
        ),
    ) -> JSONResponse:
        """Appraise an evidence bundle; the result is stored and returned."""
        _json_only(request.headers.get("content-type"))
        body = await read_body(request)
        s = svc()
        # Decoding and appraising hold the interpreter whatever thread runs them: they run
        # here; the store's steps, which wait on the database, where `blocking` runs them.
        pending = s.decode(body, session=session, node=node, reference=reference)
        begun = await blocking(lambda: s.begin(pending))
        done = s.appraise(pending, begun)
        stored = await blocking(lambda: s.finish(pending, begun, done))
        return _JSON(stored.to_dict())

    @app.put(
        "/v1/references/{name}",
        response_model=Reference,
        responses={
            **errors,
            201: {"model": Reference, "description": "A new version."},
            401: {"model": ErrorResponse, **_OPERATOR_401},
            403: {
                "model": ErrorResponse,
                "description": "The instance takes no reference values (read_only): it has no "
                "operator tokens.",
            },
        },
        tags=["references"],
        dependencies=[Depends(operator)],
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "Reference values (cima.verifier.reference), YAML or JSON.",
                "content": {
                    "application/yaml": {"schema": {"type": "object"}},
                    "application/json": {"schema": {"type": "object"}},
                },
            }
        },
    )
    async def put_reference(
        request: Request, name: str = PathParam(max_length=200)
    ) -> JSONResponse:
        """Store reference values as the next version of set `name` (200 if unchanged).

        Operators only: `Authorization: Bearer <operator token>`, checked before the body
        is read (401 without one or with a wrong one; 403 on an instance without operator
        tokens). A refused request stores nothing.
        """
        body = await read_body(request)
        media_type = request.headers.get("content-type")
        record, new = await blocking(lambda: svc().put_reference(name, body, media_type))
        return _JSON(record.to_dict(with_document=False), status_code=201 if new else 200)

    @app.get("/v1/references", response_model=ReferenceList, responses=errors, tags=["references"])
    async def list_references() -> JSONResponse:
        """The latest version of every reference set (without documents)."""
        found = await blocking(svc().store.list_references)
        return _JSON({"references": [r.to_dict(with_document=False) for r in found]})

    @app.get(
        "/v1/references/{name}", response_model=Reference, responses=errors, tags=["references"]
    )
    async def get_reference(
        name: str = PathParam(max_length=200),
        version: int | None = Query(default=None, ge=1, description="Default: the latest."),
    ) -> JSONResponse:
        """One version of a reference set, with its document."""
        record = await blocking(lambda: svc().get_reference(name, version))
        return _JSON(record.to_dict())

    @app.get("/v1/results", response_model=ResultList, responses=errors, tags=["results"])
    async def results(
        node: str | None = Query(default=None, max_length=253),
        limit: int = Query(default=100, ge=1, le=1000),
        before: int | None = Query(
            default=None, ge=1, description="Only results with a smaller id."
        ),
    ) -> JSONResponse:
        """Stored results, newest first."""
        found = await blocking(lambda: svc().results(node, limit=limit, before=before))
        return _JSON({"results": [r.to_dict() for r in found]})

    @app.get(
        "/v1/results/{result_id}",
        response_model=AttestationResponse,
        responses=errors,
        tags=["results"],
    )
    async def result(result_id: int = PathParam(ge=1)) -> JSONResponse:
        """One stored result."""
        found = await blocking(lambda: svc().result(result_id))
        return _JSON(found.to_dict())

    @app.get(
        "/v1/nodes/{node}/results/latest",
        response_model=AttestationResponse,
        responses=errors,
        tags=["results"],
    )
    async def latest(node: str = PathParam(max_length=253)) -> JSONResponse:
        """A node's newest result."""
        found = await blocking(lambda: svc().latest(node))
        return _JSON(found.to_dict())

    @app.post(
        "/v1/enrollments",
        status_code=201,
        response_model=EnrollmentResponse,
        responses={
            **errors,
            403: {
                "model": ErrorResponse,
                "description": "The instance has no EK roots (no_ek_roots), or the "
                "endorsement does not hold (untrusted_endorsement: the EK certificate does "
                "not lead to a root, the EK public area is not its key, the AK is not a "
                "restricted signing key; the detail names the step).",
            },
        },
        tags=["enrollment"],
    )
    async def enroll(body: EnrollmentBody) -> JSONResponse:
        """Enroll an attestation key by EK certificate, step one: a credential for the AK.

        The credential (TPM2_MakeCredential) carries a fresh secret, bound to the AK's TPM
        name and encrypted to the EK: only the TPM of that EK recovers it, and only when
        it holds that AK. A refused request stores nothing.
        """
        request = EnrollmentRequest(
            ek_public=body.ek_public,
            ek_certificate=body.ek_certificate,
            ak_public=body.ak_public,
            node_id=body.node_id,
            intermediates=tuple(body.intermediates),
        )
        issued = await blocking(lambda: svc().enroll(request))
        return _JSON(issued.to_dict(), status_code=201)

    @app.post(
        "/v1/enrollments/{enrollment_id}/activate",
        response_model=ActivationResponse,
        responses={
            **errors,
            403: {
                "model": ErrorResponse,
                "description": "A wrong secret (wrong_secret): the enrollment is spent.",
            },
            404: {"model": ErrorResponse, "description": "No such enrollment."},
            409: {
                "model": ErrorResponse,
                "description": "The enrollment was activated before (enrollment_spent).",
            },
            410: {
                "model": ErrorResponse,
                "description": "The enrollment expired (enrollment_expired).",
            },
        },
        tags=["enrollment"],
    )
    async def activate(
        body: ActivationBody, enrollment_id: str = PathParam(max_length=64)
    ) -> JSONResponse:
        """Enroll an attestation key by EK certificate, step two: the recovered secret.

        The first attempt spends the enrollment, whatever its outcome. With the right
        secret the AK is enrolled: from then on an appraisal trusts it (step 2) when the
        reference values do not list it.
        """
        key = await blocking(lambda: svc().activate(enrollment_id, body.secret))
        return _JSON(
            {
                "status": "enrolled",
                "node_id": key.node_id,
                "ak_name": key.ak_name.hex(),
                "ek_subject": key.ek_subject,
            }
        )

    @app.get(
        "/v1/enrollments/keys",
        response_model=EnrolledKeyList,
        responses=errors,
        tags=["enrollment"],
    )
    async def enrolled_keys(node: str | None = Query(default=None, max_length=253)) -> JSONResponse:
        """The attestation keys enrolled by EK certificate (of one node)."""
        found = await blocking(lambda: svc().enrolled_keys(node))
        return _JSON({"keys": [k.to_dict() for k in found]})

    @app.delete(
        "/v1/enrollments/keys/{ak_name}",
        response_model=EnrolledKeyModel,
        responses={
            **errors,
            401: {"model": ErrorResponse, **_OPERATOR_401},
            403: {
                "model": ErrorResponse,
                "description": "The instance has no operator tokens (read_only).",
            },
            404: {"model": ErrorResponse, "description": "No enrolled key has that name."},
        },
        dependencies=[Depends(revoker)],
        tags=["enrollment"],
    )
    async def revoke(ak_name: str = PathParam(max_length=256)) -> JSONResponse:
        """Revoke an enrolled attestation key (operators only): from then on an appraisal
        no longer trusts it by its enrollment. Answers the key as it was enrolled."""
        key = await blocking(lambda: svc().revoke(ak_name))
        return _JSON(key.to_dict())

    @app.get("/v1/keys", response_model=KeySet, tags=["results"])
    async def keys() -> JSONResponse:
        """The key that signs result tokens, as a JSON Web Key Set (empty without a key)."""
        signer = svc().signer
        return _JSON({"keys": [] if signer is None else [signer.jwk]})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            doc.setdefault("components", {}).setdefault("schemas", {}).update(_bundle_schemas())
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(_BodyCap, cap=limit)
    return app


class _JSON(JSONResponse):
    """A JSON response encoded with orjson (compact UTF-8, as JSONResponse writes it)."""

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:  # something orjson does not take (an integer over 64 bits)
            return super().render(content)


class _BodyCap:
    """ASGI middleware: 413 for any request body over the cap (``ServiceConfig.max_body``).

    A declared Content-Length over the cap is answered before the app runs; a
    streamed body is counted as it is received, and the app's read of it fails
    with a 413 :class:`ServiceError` when it goes over.
    """

    def __init__(self, app: Any, cap: Callable[[], int]) -> None:
        self.app = app
        self.cap = cap

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.cap()
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _error(send, 400, "bad-length", "Content-Length is not a number")
                    return
                if declared > cap:
                    await _error(
                        send, 413, "too-large", f"the body is {declared} bytes, at most {cap}"
                    )
                    return
        total = 0

        async def counted() -> Any:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > cap:
                    raise ServiceError(413, "too-large", f"the body is over {cap} bytes")
            return message

        await self.app(scope, counted, send)


async def _error(send: Any, status: int, code: str, message: str) -> None:
    body = json.dumps({"detail": message, "error": code}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _json_only(content_type: str | None) -> None:
    if content_type is None:
        return
    base = content_type.split(";", 1)[0].strip().lower()
    if base not in JSON_TYPES and not base.endswith("+json"):
        raise ServiceError(415, "unsupported-media-type", f"{base}: send application/json")


def openapi_document() -> dict[str, Any]:
    """The service's OpenAPI description (what ``/openapi.json`` serves)."""
    doc: dict[str, Any] = create_app(None).openapi()
    return doc


def openapi_json() -> str:
    """:func:`openapi_document` as committed in ``docs/verifier-openapi.json``."""
    return json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"
