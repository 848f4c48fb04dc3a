"""``cima client measurement|eventlog|report|evidence|info|enroll``: ask the node's agent.

Every subcommand takes ``--socket PATH`` (default ``$CIMA_SOCKET``, else
``/run/cima/cima.sock``) and ``--json``. What the agent answers is the
caller's view: run in a container, another container's events are redacted.

``enroll`` enrolls the node's attestation key with a verifier service by EK
certificate: the agent's EK certificate and public areas go to the verifier
(``POST /v1/enrollments``), the agent's TPM activates the credential the
verifier answers, and its secret goes back (``POST
/v1/enrollments/ID/activate``). Exit status 1 when the verifier refuses the
endorsement (or the TPM the credential), 2 for usage and connection errors.
"""

from __future__ import annotations

import argparse
import base64
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from rich.table import Table

from cima.cli._util import (
    UsageError,
    VerificationFailed,
    add_json_flag,
    emit_json,
    err,
    hex_arg,
    out,
)
from cima.errors import CimaError
from cima.eventlog.cel import CELRecord

LOG_CHOICES = ("all", "boot", "ima", "runtime")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("client", help="ask the node's cima agent (measurements, logs, evidence)")
    s = p.add_subparsers(dest="client_command", metavar="SUBCOMMAND")
    s.required = True

    def common(c: argparse.ArgumentParser) -> None:
        c.add_argument(
            "--socket",
            metavar="PATH",
            help="the agent's socket (default $CIMA_SOCKET or /run/cima/cima.sock)",
        )
        c.add_argument("--timeout", type=float, default=60.0, metavar="S")
        add_json_flag(c)

    info = s.add_parser("info", help="the platform, and who the agent thinks the caller is")
    common(info)
    info.set_defaults(handler=cmd_info)

    m = s.add_parser("measurement", help="register values")
    common(m)
    m.add_argument("--register", metavar="NAME", help="one register (default: all)")
    m.add_argument("--algorithm", metavar="ALG", help="one bank (default: the platform's default)")
    m.set_defaults(handler=cmd_measurement)

    e = s.add_parser("eventlog", help="event log records (CEL-JSON), in the caller's view")
    common(e)
    e.add_argument("--log", choices=LOG_CHOICES, default="all")
    e.add_argument("--start", type=int, default=0, metavar="N")
    e.add_argument("--count", type=int, metavar="N", help="records (default: to the end)")
    e.set_defaults(handler=cmd_eventlog)

    for name, helptext, handler in (
        ("report", "a signed report bound to a nonce and user data", cmd_report),
        ("evidence", "an evidence bundle: report and logs", cmd_evidence),
    ):
        r = s.add_parser(name, help=helptext)
        common(r)
        r.add_argument("--nonce", type=hex_arg, default=b"", metavar="HEX")
        r.add_argument("--user-data", type=hex_arg, default=b"", metavar="HEX")
        r.add_argument("-o", "--output", metavar="FILE", help="also write the result here")
        r.set_defaults(handler=handler)

    en = s.add_parser(
        "enroll",
        help="enroll the node's attestation key with a verifier by EK certificate",
        description=(
            "Send the TPM's EK certificate and the EK and AK public areas (from the agent) to "
            "a verifier service, have the TPM activate the credential it answers, and send "
            "back the secret: the verifier then trusts the AK (appraisal step 2, 'enrolled by "
            "EK certificate'). Exit status 1 when the verifier refuses the endorsement."
        ),
    )
    common(en)
    en.add_argument(
        "--verifier", metavar="URL", required=True, help="the verifier service, http(s)://HOST:PORT"
    )
    en.add_argument(
        "--node",
        metavar="NAME",
        help="the node the key is enrolled for (default: the verifier derives key-<hex> from the "
        "AK, as it does for an attestation that names no node)",
    )
    en.add_argument(
        "--ek-intermediate",
        metavar="PEM",
        action="append",
        default=[],
        help="a PEM file of intermediate CA certificates between the EK certificate and the "
        "verifier's roots (the TPM manufacturer's), sent with the request; repeatable",
    )
    en.add_argument(
        "--cacert", metavar="PEM", help="CA certificates that verify the verifier (HTTPS)"
    )
    en.add_argument("--cert", metavar="PEM", help="a client certificate (mutual TLS)")
    en.add_argument("--key", metavar="PEM", help="the client certificate's private key")
    en.set_defaults(handler=cmd_enroll)

    from cima.cli import peer

    peer.register(s)


def _client(args: argparse.Namespace) -> Any:
    from cima.client import CimaClient

    return CimaClient(args.socket, timeout=args.timeout)


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as c:
        info = c.info()
    if args.json:
        emit_json(info)
        return 0
    table = Table(show_header=False)
    for key, value in info.items():
        table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    out.print(table)
    return 0


def cmd_measurement(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.register:
            values = [c.get_cc_measurement(args.register, args.algorithm)]
        else:
            alg = args.algorithm or c.get_default_algorithm().name
            values = c.list_measurements(alg)
    if args.json:
        emit_json({"registers": [v.to_dict() for v in values]})
        return 0
    table = Table("register", "algorithm", "digest")
    for v in values:
        table.add_row(v.register, v.algorithm, v.digest.hex())
    out.print(table)
    return 0


def cmd_eventlog(args: argparse.Namespace) -> int:
    if args.start < 0 or (args.count is not None and args.count < 1):
        raise UsageError("--start must be >= 0 and --count >= 1")
    with _client(args) as c:
        if args.log == "all":
            records = c.get_cc_eventlog(args.start, args.count)
        else:
            records = c.get_eventlog(args.log, args.start, args.count)
    if args.json:
        emit_json([r.to_dict() for r in records])
        return 0
    table = Table("recnum", "register", "type", "digest", "what")
    for r in records:
        table.add_row(str(r.recnum), r.register, r.content_type, _digest(r), _what(r))
    out.print(table)
    return 0


def _digest(r: CELRecord) -> str:
    if not r.digests:
        return ""
    alg, value = r.digests[0]
    return f"{alg}:{value.hex()[:16]}…"


def _what(r: CELRecord) -> str:
    c = r.content
    if r.content_type == "cima":
        if c.get("redacted"):
            return "(redacted)"
        return f"{c.get('kind')} {c.get('scope')} {c.get('subject')}"
    if r.content_type == "ima_template":
        try:
            name = r.ima_entry().file_name
        except CimaError:
            name = None
        return f"{c.get('template_name')} {name or ''}".rstrip()
    return f"event type 0x{int(c.get('event_type', 0)):08x}"


def _write(path: str | None, data: bytes) -> None:
    if path is None:
        return
    try:
        Path(path).write_bytes(data)
    except OSError as e:
        raise UsageError(f"{path}: cannot write: {e.strerror or e}") from e
    err.print(f"wrote {path}")


def cmd_report(args: argparse.Namespace) -> int:
    with _client(args) as c:
        report = c.get_cc_report(args.nonce, args.user_data)
    doc = {
        "platform": report.platform,
        "kind": report.kind,
        "scope": report.scope,
        "nonce": args.nonce.hex(),
        "user_data": args.user_data.hex(),
        "binding": report.binding.hex(),
        "report_nonce": report.report_nonce.hex(),
        "batch": None if report.batch is None else report.batch.to_dict(),
        "report": base64.b64encode(report.body).decode(),
        "signature": base64.b64encode(report.signature).decode(),
        "verification": report.verification,
    }
    _write(args.output, json.dumps(doc, indent=1).encode())
    if args.json:
        emit_json(doc)
        return 0
    table = Table(show_header=False)
    for key in ("platform", "kind", "scope", "binding", "report_nonce"):
        table.add_row(key, str(doc[key]))
    table.add_row("batch", "none" if report.batch is None else f"{report.batch.tree_size} leaves")
    table.add_row("report", f"{len(report.body)} bytes")
    out.print(table)
    return 0


def cmd_evidence(args: argparse.Namespace) -> int:
    from cima.evidence.bundle import EvidenceBundle

    with _client(args) as c:
        raw = c.get_evidence_json(args.nonce, args.user_data)
    bundle = EvidenceBundle.from_json(raw, source="the agent's evidence bundle")
    _write(args.output, raw)
    if args.json:
        emit_json(bundle.to_dict())
        return 0
    table = Table(show_header=False)
    table.add_row("platform", bundle.platform)
    table.add_row("report", bundle.report_type)
    table.add_row("scope", bundle.scope)
    table.add_row("binding", bundle.binding.hex())
    table.add_row("batch", "none" if bundle.batch is None else f"{bundle.batch.tree_size} leaves")
    for name, log in (
        ("boot log", bundle.boot_log),
        ("IMA log", bundle.ima_log),
        ("runtime log", bundle.runtime_log),
    ):
        table.add_row(name, "none" if log is None else f"{len(log)} records")
    out.print(table)
    return 0


# -- enroll --------------------------------------------------------------------------------------


def cmd_enroll(args: argparse.Namespace) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from cima.client import AgentError
    from cima.verifier.store import check_node_id

    base, context = _verifier(args)
    if args.node is not None:
        try:
            check_node_id(args.node)
        except ValueError as e:
            raise UsageError(f"--node: {e}") from None
    intermediates = [_pem_certificates(path) for path in args.ek_intermediate]
    with _client(args) as c:
        enrollment = c.get_enrollment()
        if not enrollment.ek_certificate:
            raise VerificationFailed(
                "the node's TPM has no EK certificate: its attestation key cannot be enrolled by "
                "EK certificate (register it in the reference values instead)"
            )
        try:
            certificate = x509.load_der_x509_certificate(enrollment.ek_certificate)
        except ValueError as e:
            raise VerificationFailed(f"the TPM's EK certificate does not decode: {e}") from None
        request: dict[str, Any] = {
            "ek_public": enrollment.ek_public.hex(),
            "ek_certificate": certificate.public_bytes(serialization.Encoding.PEM).decode(),
            "ak_public": enrollment.ak_public.hex(),
        }
        if args.node is not None:
            request["node_id"] = args.node
        if intermediates:
            request["intermediates"] = intermediates
        issued = _post(f"{base}/v1/enrollments", request, context, args.timeout)
        try:
            enrollment_id = str(issued["id"])
            blob = bytes.fromhex(str(issued["credential_blob"]))
            encrypted = bytes.fromhex(str(issued["encrypted_secret"]))
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{base}: not a verifier's answer to an enrollment: {e}") from None
        try:
            secret = c.activate_credential(blob, encrypted)
        except AgentError as e:
            if e.code == "FAILED_PRECONDITION":
                raise VerificationFailed(
                    f"the TPM does not activate the verifier's credential: {e.details}"
                ) from None
            raise
    done = _post(
        f"{base}/v1/enrollments/{urllib.parse.quote(enrollment_id, safe='')}/activate",
        {"secret": secret.hex()},
        context,
        args.timeout,
    )
    result = {
        "status": done.get("status"),
        "node_id": done.get("node_id"),
        "ak_name": done.get("ak_name"),
        "ek_subject": done.get("ek_subject"),
        "enrollment": enrollment_id,
        "verifier": base,
    }
    if args.json:
        emit_json(result)
        return 0
    table = Table(show_header=False)
    for key, value in result.items():
        table.add_row(key, str(value))
    out.print(table)
    return 0


def _verifier(args: argparse.Namespace) -> tuple[str, ssl.SSLContext | None]:
    """The verifier's base URL and, for HTTPS, the TLS context (CA file, client certificate)."""
    url = str(args.verifier).strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--verifier {args.verifier}: expected http(s)://HOST:PORT")
    if bool(args.cert) != bool(args.key):
        raise UsageError("--cert and --key go together")
    if parts.scheme == "http":
        if args.cacert or args.cert:
            raise UsageError(f"--cacert, --cert and --key need an https:// verifier, not {url}")
        return url, None
    try:
        context = ssl.create_default_context(cafile=args.cacert)
    except FileNotFoundError:
        raise UsageError(f"--cacert {args.cacert}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise UsageError(f"--cacert {args.cacert}: not PEM CA certificates: {e}") from None
    if args.cert:
        try:
            context.load_cert_chain(args.cert, args.key)
        except FileNotFoundError as e:
            raise UsageError(f"--cert/--key {e.filename}: no such file") from None
        except (ssl.SSLError, OSError) as e:
            raise UsageError(f"--cert {args.cert}, --key {args.key}: {e}") from None
    return url, context


def _pem_certificates(path: str) -> str:
    """The PEM certificates of file ``path``, checked (one or more)."""
    from cryptography import x509

    from cima.cli._util import read_input

    data = read_input(path, limit=1024 * 1024)
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise UsageError(f"--ek-intermediate {path}: not PEM certificates: {e}") from None
    from cryptography.hazmat.primitives import serialization

    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in found)


def _post(
    url: str, document: dict[str, Any], context: ssl.SSLContext | None, timeout: float
) -> dict[str, Any]:
    """POST ``document`` as JSON; the JSON answer. 403: VerificationFailed; else UsageError.

    ``url`` is http or https (:func:`_verifier` checked the scheme).
    """
    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked
        url,
        data=json.dumps(document).encode(),
        headers={"content-type": "application/json", "accept": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(  # noqa: S310 - http(s) only, checked
            request, timeout=timeout, context=context
        ) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        detail = _detail(e)
        if e.code == 403:
            raise VerificationFailed(f"the verifier refused: {detail}") from None
        raise UsageError(f"the verifier answered {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise UsageError(f"{url}: cannot reach the verifier: {reason}") from None
    try:
        answer = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        answer = None
    if not isinstance(answer, dict):
        raise UsageError(f"{url}: the answer is not a JSON object")
    return answer


def _detail(e: urllib.error.HTTPError) -> str:
    """The verifier's ``detail`` (and ``error`` code) of a refusal, in one line."""
    try:
        doc = json.loads(e.read())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        doc = None
    if isinstance(doc, dict) and doc.get("detail"):
        code = f" ({doc['error']})" if doc.get("error") else ""
        return " ".join(str(doc["detail"]).split()) + code
    return str(e.reason or e)
