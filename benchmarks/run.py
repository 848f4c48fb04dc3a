"""Run cima's benchmarks and print their figures.

Each benchmark module in :data:`BENCHMARKS` has a ``run(**options) -> list[dict]``
function; every dict is one measurement (``name``, and any of ``entries``,
``seconds``, ``entries_per_s``, ``ratio_to_floor``, ``peak_rss_mb``, ...).
Options given here are passed to the benchmarks whose ``run`` accepts them.

Usage: ``python benchmarks/run.py [--only NAME] [--entries N] [--repeat K] [--json]``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "src"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

BENCHMARKS: tuple[str, ...] = (
    "bench_ima",
    "bench_tdx",
    "bench_tpm",
    "bench_agent",
    "bench_verifier",
    "bench_service",
)

_COLUMNS = (
    ("name", "measurement", "{}"),
    ("entries", "entries", "{:,}"),
    ("seconds", "seconds", "{:.3f}"),
    ("entries_per_s", "entries/s", "{:,.0f}"),
    ("ratio_to_floor", "x floor", "{:.2f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.1f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("rss_mb", "RSS MB", "{:.1f}"),
    ("server_cpu_ms_per_request", "CPU ms/call", "{:.3f}"),
    ("ratio_to_unbatched", "x unbatched", "{:.1f}"),
    ("ratio_bound_one_core", "1-core bound", "{:.1f}"),
)


def run_all(names: Sequence[str], options: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        params = inspect.signature(module.run).parameters
        accepted = {k: v for k, v in options.items() if k in params and v is not None}
        for row in module.run(**accepted):
            rows.append({"benchmark": name, **row})
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    cells = [[title for _, title, _ in _COLUMNS]]
    for r in rows:
        cells.append([fmt.format(r[key]) if key in r else "" for key, _, fmt in _COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    lines = []
    for n, row in enumerate(cells):
        parts = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run cima's benchmarks.")
    ap.add_argument("--only", choices=BENCHMARKS, action="append", help="run only this one")
    ap.add_argument("--entries", type=int, help="entries per generated log")
    ap.add_argument("--repeat", type=int, help="timed runs per measurement (the best counts)")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)
    rows = run_all(args.only or BENCHMARKS, {"entries": args.entries, "repeat": args.repeat})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
