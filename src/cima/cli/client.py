"""``cima client measurement|eventlog|report|evidence|info``: ask the node's agent.

Every subcommand takes ``--socket PATH`` (default ``$CIMA_SOCKET``, else
``/run/cima/cima.sock``) and ``--json``. What the agent answers is the
caller's view: run in a container, another container's events are redacted.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from cima.cli._util import UsageError, add_json_flag, emit_json, err, hex_arg, out
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
