"""``cima demo``: the main job on this machine, the whole chain.

1. The real machines' logs that ship beside the project (TCG, CCEL, IMA) are
   replayed and compared with the register values recorded with them.
2. The chain: a TPM (swtpm, or the software platform where swtpm cannot run),
   the agent with the default policy measuring this machine's real processes
   (a containerd the demo starts), a client asking for evidence with a fresh
   nonce, reference values created from a first run, and a verifier appraising
   a second run: the environment as a tree with each part's status.
3. One measured thing changes (containerd restarted with another command line)
   and the appraisal turns contraindicated, naming the reason.
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
    p.add_argument(
        "--platform",
        choices=("auto", "tpm", "software"),
        default="auto",
        help="swtpm (tpm), the software platform, or swtpm when it is installed (auto)",
    )
    p.add_argument(
        "--keep", metavar="DIR", help="work here and keep the files (default: a temp dir)"
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
    from cima.cli import demo_chain

    rows = _vectors(args)
    vectors_ok = all(r["ok"] for r in rows) and bool(rows)
    chain = demo_chain.run(platform=args.platform, keep=args.keep, quiet=args.json)
    ok = vectors_ok and chain["ok"]
    if args.json:
        emit_json({"ok": ok, "vectors": {"ok": vectors_ok, "logs": rows}, "chain": chain})
    return 0 if ok else 1


def _vectors(args: argparse.Namespace) -> list[dict[str, Any]]:
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
    if not args.json:
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
    return rows
