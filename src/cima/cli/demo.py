"""``cima demo``: the main job on this machine.

It replays the real machines' logs that ship beside the project (TCG, CCEL, IMA)
and compares each with the register values recorded with it, printing one
table of results.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from cima.cli._util import UsageError, add_json_flag, emit_json, out
from cima.errors import CimaError
from cima.eventlog import formats
from cima.eventlog.replay import replay_and_compare
from cima.registers import cc_name, pcr_name


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run the main job on this machine and print the result")
    p.add_argument(
        "--vectors",
        metavar="DIR",
        default=None,
        help="real-machine logs with a MANIFEST.json per category (default: ../shared/vectors)",
    )
    add_json_flag(p)
    p.set_defaults(handler=cmd_demo)


def _default_vectors() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "vectors"
        if (parent / "pyproject.toml").exists() and candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "vectors"


def _expected_registers(category: str, expected: dict[str, Any]) -> dict[tuple[str, str], bytes]:
    values: dict[tuple[str, str], bytes] = {}
    if category == "ccel":
        for alg, regs in expected.get("registers_by_log_index", {}).items():
            for idx, hexval in regs.items():
                values[(cc_name(int(idx)), alg)] = bytes.fromhex(hexval)
    elif category == "ima":
        for alg, hexval in expected.get("pcr10", {}).items():
            values[(pcr_name(expected.get("pcr", 10)), alg)] = bytes.fromhex(hexval)
    else:
        for alg, regs in expected.get("pcrs", {}).items():
            for idx, hexval in regs.items():
                values[(pcr_name(int(idx)), alg)] = bytes.fromhex(hexval)
    return values


def cmd_demo(args: argparse.Namespace) -> int:
    root = Path(args.vectors) if args.vectors else _default_vectors()
    if not root.is_dir():
        raise UsageError(f"{root}: no vectors directory")
    rows: list[dict[str, Any]] = []
    for category in ("tcg", "ccel", "ima", "tpm-quote"):
        manifest = root / category / "MANIFEST.json"
        if not manifest.exists():
            continue
        for entry in json.loads(manifest.read_text())["files"]:
            exp = entry.get("expected") or {}
            if not exp.get("format") or exp.get("format") not in (
                "crypto-agile",
                "sha1-legacy",
                "ima-ascii",
            ):
                continue
            expected = _expected_registers(
                "ccel"
                if category == "ccel"
                else ("ima" if exp["format"] == "ima-ascii" else "tcg"),
                exp,
            )
            if not expected:
                continue
            path = root / category / entry["file"]
            row: dict[str, Any] = {"log": f"{category}/{entry['file']}"}
            start = time.perf_counter()
            try:
                fmt = "ccel" if category == "ccel" else "auto"
                log = formats.load(path.read_bytes(), fmt, source=str(path))
                result = replay_and_compare(log.events, expected)
                row.update(
                    format=log.format,
                    events=result.events,
                    registers=len(result.comparisons),
                    matched=len(result.comparisons) - len(result.mismatches),
                    ok=result.ok,
                )
            except CimaError as e:
                row.update(
                    format="?", events=0, registers=len(expected), matched=0, ok=False, error=str(e)
                )
            row["ms"] = round((time.perf_counter() - start) * 1000, 2)
            rows.append(row)
    ok = all(r["ok"] for r in rows) and bool(rows)
    if args.json:
        emit_json({"ok": ok, "logs": rows})
    else:
        table = Table(title="cima: real machines' logs replayed against their recorded registers")
        for col in ("log", "format", "events", "registers matched", "ms", "result"):
            table.add_column(col)
        for r in rows:
            table.add_row(
                r["log"],
                r["format"],
                str(r["events"]),
                f"{r['matched']}/{r['registers']}",
                str(r["ms"]),
                "[green]match[/]" if r["ok"] else f"[red]MISMATCH[/] {r.get('error', '')}",
            )
        out.print(table)
        out.print(f"{sum(r['ok'] for r in rows)}/{len(rows)} logs replay to their recorded values")
    return 0 if ok else 1
