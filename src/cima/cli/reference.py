"""``cima reference create|check``: make and check reference values.

``create BUNDLE... -o REFS.yaml`` takes known-good evidence bundles and writes
reference values that accept them (see :func:`cima.verifier.reference.create_references`);
it then appraises each bundle against what it wrote and warns (on stderr) about
anything but freshness that would not be affirming, since a "known-good" bundle
whose logs do not replay is not one. ``check REFS.yaml`` validates a reference
file: exit 0 and a summary, or exit 2 with the key and line of the first error.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from cima.cli._util import UsageError, add_json_flag, emit_json, err, out, read_input


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("reference", help="create and check reference values")
    s = p.add_subparsers(dest="reference_command", metavar="SUBCOMMAND")
    s.required = True

    c = s.add_parser("create", help="reference values from known-good evidence bundles")
    c.add_argument("bundles", metavar="BUNDLE", nargs="+", help="evidence bundles (JSON)")
    c.add_argument("-o", "--output", required=True, metavar="REFS.yaml", help="where to write")
    c.add_argument("--name", default="", help="a name for the reference values")
    c.set_defaults(handler=cmd_create)

    k = s.add_parser("check", help="validate a reference file and summarise it")
    k.add_argument("file", metavar="REFS.yaml")
    add_json_flag(k)
    k.set_defaults(handler=cmd_check)


TDX_FIELDS = (
    "mrseam",
    "mrsignerseam",
    "td_attributes",
    "xfam",
    "mrconfigid",
    "mrowner",
    "mrownerconfig",
)


def cmd_create(args: argparse.Namespace) -> int:
    from cima.evidence.bundle import EvidenceBundle
    from cima.verifier.appraise import appraise
    from cima.verifier.reference import create_references

    bundles = [EvidenceBundle.from_json(read_input(p), source=p) for p in args.bundles]
    refs = create_references(bundles, name=args.name, sources=[Path(p).name for p in args.bundles])
    text = refs.to_yaml()
    tmp = f"{args.output}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.output)
    except OSError as e:
        raise UsageError(f"{args.output}: cannot write: {e.strerror or e}") from e
    for path, bundle in zip(args.bundles, bundles, strict=True):
        result = appraise(bundle, refs, nonce=bundle.nonce, user_data=bundle.user_data)
        doubts = [x for x in result.failures if x.code not in ("no-nonce",)]
        for doubt in doubts[:5]:
            err.print(f"[yellow]warning[/]: {path}: {doubt.describe()}")
    err.print(f"wrote {args.output}: {_summary_line(summary(refs))}")
    return 0


def summary(refs: Any) -> dict[str, Any]:
    """How many values each section holds."""
    return {
        "name": refs.name,
        "digest": refs.digest(),
        "trusted_keys": len(refs.trusted_keys),
        "tdx": None
        if refs.tdx is None
        else {
            "trusted_roots": len(refs.tdx.trusted_roots),
            "allow_debug": refs.tdx.allow_debug,
            "fields": sorted(k for k in TDX_FIELDS if getattr(refs.tdx, k) is not None),
        },
        "boot": [
            {"name": b.name, "registers": len(b.registers), "events": len(b.events)}
            for b in refs.boot
        ],
        "kernel": None
        if refs.kernel is None
        else {
            "images": len(refs.kernel.images),
            "cmdlines": len(refs.kernel.cmdlines),
            "initrds": len(refs.kernel.initrds),
        },
        "ima": None
        if refs.ima is None
        else {
            "files": len(refs.ima.files),
            "digests": sum(len(v) for v in refs.ima.files.values()),
            "keys": len(refs.ima.keys),
            "exclude": len(refs.ima.exclude),
        },
        "system": None if refs.system is None else {"processes": len(refs.system.processes)},
        "kubernetes": None if refs.kubernetes is None else {"pods": len(refs.kubernetes.pods)},
        "containers": None if refs.containers is None else {"images": len(refs.containers.images)},
        "agent": None
        if refs.agent is None
        else {
            "code_digests": len(refs.agent.code_digests),
            "policy_digests": len(refs.agent.policy_digests),
        },
    }


def _summary_line(s: dict[str, Any]) -> str:
    parts = [f"{s['trusted_keys']} trusted keys", f"{len(s['boot'])} boot configurations"]
    if s["ima"]:
        parts.append(f"{s['ima']['files']} IMA paths")
    if s["system"]:
        parts.append(f"{s['system']['processes']} processes")
    return ", ".join(parts)


def cmd_check(args: argparse.Namespace) -> int:
    from cima.verifier.reference import load_references

    refs = load_references(read_input(args.file, limit=256 << 20), source=args.file)
    s = summary(refs)
    if args.json:
        emit_json({"valid": True, "file": args.file, **s})
        return 0
    table = Table(
        title=f"{args.file}: valid reference values" + (f" ({s['name']})" if s["name"] else "")
    )
    table.add_column("section")
    table.add_column("values", overflow="fold")
    for key, value in s.items():
        if key in ("name",):
            continue
        if isinstance(value, list):
            text = (
                "; ".join(
                    f"{v['name'] or f'boot {i}'}: {v['registers']} registers, {v['events']} events"
                    for i, v in enumerate(value)
                )
                or "-"
            )
        elif isinstance(value, dict):
            text = ", ".join(f"{k}={v}" for k, v in value.items())
        else:
            text = "-" if value is None else str(value)
        table.add_row(key, text)
    out.print(table)
    return 0
