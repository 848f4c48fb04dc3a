"""``cima verify BUNDLE --reference REFS.yaml``: appraise an evidence bundle.

Exit status: 0 when the result is affirming, 1 when it is not (warning,
contraindicated), 2 for bad input (a bundle or reference file that does not
decode, named with the key). Without ``--json`` the environment the logs
rebuild is printed as a tree, each part with its status, then the verdict per
submodule and every failure; with ``--json`` the result is one JSON document.
``--jwt-key PEM -o RESULT.jwt`` also writes the result as an ES256 JWT.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from cima.cli._util import (
    UsageError,
    add_json_flag,
    emit_json,
    fail_line,
    hex_arg,
    out,
    read_input,
)

_STYLE = {
    "affirming": "green",
    "warning": "yellow",
    "contraindicated": "bold red",
    "none": "dim",
}
_MARK = {"affirming": "ok", "warning": "warn", "contraindicated": "FAIL", "none": "-"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify",
        help="appraise an evidence bundle against reference values",
        description="Appraise an evidence bundle against reference values (exit 0: affirming).",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="an evidence bundle (JSON)")
    p.add_argument(
        "--reference", "-r", required=True, metavar="REFS.yaml", help="the reference values"
    )
    p.add_argument("--nonce", type=hex_arg, metavar="HEX", help="the nonce the report must bind")
    p.add_argument(
        "--user-data", type=hex_arg, metavar="HEX", help="the user data the report must bind"
    )
    p.add_argument(
        "--report-data",
        type=hex_arg,
        metavar="HEX",
        help="the exact TPM extraData / TDX REPORTDATA expected (legacy verifiers' binding)",
    )
    p.add_argument(
        "--jwt-key", metavar="PEM", help="sign the result as a JWT with this EC P-256 private key"
    )
    p.add_argument("-o", "--output", metavar="RESULT.jwt", help="where the JWT goes")
    add_json_flag(p)
    p.set_defaults(handler=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    from cima.evidence.bundle import EvidenceBundle
    from cima.verifier.appraise import appraise
    from cima.verifier.reference import load_references

    if (args.jwt_key is None) != (args.output is None):
        raise UsageError("--jwt-key and -o go together: the key signs the JWT written to -o")
    jwt_key: bytes | None = None
    if args.jwt_key is not None:
        jwt_key = read_input(args.jwt_key, limit=1 << 20)
    bundle = EvidenceBundle.from_json(read_input(args.bundle), source=args.bundle)
    refs = load_references(read_input(args.reference, limit=256 << 20), source=args.reference)
    result = appraise(
        bundle,
        refs,
        nonce=args.nonce,
        user_data=args.user_data,
        report_data=args.report_data,
    )
    if jwt_key is not None:
        from cima.verifier.result import ResultTokenError

        try:
            token = result.to_jwt(jwt_key)
        except ResultTokenError as e:
            raise UsageError(f"{args.jwt_key}: {e}") from None
        try:
            Path(args.output).write_text(token + "\n")
        except OSError as e:
            raise UsageError(f"{args.output}: cannot write: {e.strerror or e}") from e
    if args.json:
        emit_json(result.to_dict())
    else:
        show(result)
    if result.affirming:
        return 0
    first = result.failures[0].describe() if result.failures else "nothing was appraised"
    fail_line(f"cima: verification {result.status}: {first}")
    return 1


def _label(status: str, text: str) -> str:
    style = _STYLE.get(status, "")
    return f"[{style}]{_MARK.get(status, status)}[/] {escape(text)}"


def _details(details: dict[str, Any]) -> str:
    shown = []
    for k, v in details.items():
        if isinstance(v, list | dict):
            continue
        text = str(v)
        if len(text) > 72:
            text = text[:69] + "..."
        shown.append(f"{k}={text}")
    return ("  [dim]" + escape(", ".join(shown)) + "[/]") if shown else ""


def _tree(part: Any, tree: Tree) -> None:
    for child in part.children:
        node = tree.add(
            _label(child.status, f"{child.kind}: {child.name}") + _details(child.details)
        )
        _tree(child, node)


def show(result: Any) -> None:
    """The environment as a tree, the submodules' verdicts and the failures."""
    env = result.environment
    tree = Tree(_label(env.status, f"{env.name} ({result.mode} appraisal)"))
    _tree(env, tree)
    out.print(tree)
    table = Table(title="submodules")
    for col in ("submodule", "status", "failures"):
        table.add_column(col)
    for name, sub in result.submods.items():
        table.add_row(name, f"[{_STYLE[sub.status]}]{sub.status}[/]", str(len(sub.failures)))
    out.print(table)
    failures = result.failures
    if failures:
        ft = Table(title=f"failures ({len(failures)})")
        for col in ("severity", "submodule", "step", "where", "reason"):
            ft.add_column(col, overflow="fold")
        for f in failures[:200]:
            where = ", ".join(
                x
                for x in (
                    f.register or "",
                    f"{f.log} #{f.event}" if f.log and f.event is not None else (f.log or ""),
                )
                if x
            )
            ft.add_row(
                f"[{_STYLE[f.severity]}]{f.severity}[/]",
                f.submodule,
                str(f.step),
                escape(where),
                escape(f.reason),
            )
        out.print(ft)
    if result.mode_reason:
        out.print(f"[dim]{escape(result.mode_reason)}[/]")
    out.print(f"result: [{_STYLE[result.status]}]{result.status}[/]")
