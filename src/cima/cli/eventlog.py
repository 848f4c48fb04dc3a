"""``cima eventlog show|replay|convert``: read, replay and convert measurement logs."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from cima.cli._util import UsageError, add_json_flag, emit_json, err, out, read_input
from cima.digests import by_name
from cima.errors import AlgorithmError, RegisterError
from cima.eventlog import cel, formats
from cima.eventlog.replay import Replayer

_FORMAT_CHOICES = ("auto", *formats.FORMATS)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("eventlog", help="show, replay and convert measurement logs")
    s = p.add_subparsers(dest="eventlog_command", metavar="SUBCOMMAND")
    s.required = True

    show = s.add_parser("show", help="list a log's events with their decoded data")
    show.add_argument("file", metavar="FILE")
    show.add_argument("--format", choices=_FORMAT_CHOICES, default="auto")
    add_json_flag(show)
    show.set_defaults(handler=cmd_show)

    rp = s.add_parser("replay", help="replay logs into registers and print their final values")
    rp.add_argument("files", metavar="FILE", nargs="+", help="logs, replayed in this order")
    rp.add_argument("--format", choices=_FORMAT_CHOICES, default="auto")
    rp.add_argument(
        "--bank",
        metavar="ALG",
        action="append",
        help="replay into this bank (repeatable; default: every bank the logs carry)",
    )
    add_json_flag(rp)
    rp.set_defaults(handler=cmd_replay)

    cv = s.add_parser("convert", help="convert a log to CEL-JSON, or CEL-JSON back to native")
    cv.add_argument("file", metavar="FILE")
    cv.add_argument("--format", choices=_FORMAT_CHOICES, default="auto")
    cv.add_argument("--to", required=True, choices=("cel-json", "tcg", "ima-binary"))
    cv.add_argument("-o", "--output", metavar="OUT", help="write here instead of stdout")
    cv.set_defaults(handler=cmd_convert)


def _load(path: str, fmt: str) -> formats.LoadedLog:
    return formats.load(read_input(path), fmt, source=path)


def cmd_show(args: argparse.Namespace) -> int:
    log = _load(args.file, args.format)
    if args.json:
        emit_json(log.to_dict())
        return 0
    table = Table(title=f"{args.file} ({log.format}, {len(log.events)} events)")
    if log.format.startswith("ima"):
        for col in ("#", "register", "template", "file digest", "file"):
            table.add_column(col, overflow="fold")
        for e in log.events:
            table.add_row(*_ima_row(e))
    else:
        for col in ("#", "register", "event", "digest", "details"):
            table.add_column(col, overflow="fold")
        for n, e in enumerate(log.events):
            table.add_row(*_tcg_row(n, e))
    out.print(table)
    return 0


def _short(b: bytes | None) -> str:
    return "-" if b is None else b.hex()[:16] + ("…" if len(b) > 8 else "")


def _ima_row(e: Any) -> list[str]:
    d = e.to_dict()
    digest = d.get("file_digest") or _short(e.template_hash)
    return [
        str(d.get("index", "")),
        e.register,
        e.template_name,
        str(digest)[:40],
        str(d.get("file_name", "")),
    ]


def _tcg_row(n: int, e: Any) -> list[str]:
    if isinstance(e, cel.CELRecord):
        name = e.content.get("template_name") or str(e.event_type)
        shown = _short(e.digests[0][1]) if e.digests else "-"
        return [str(e.recnum), e.register, str(name), shown, ""]
    alg, digest = (e.digests[0][0], bytes(e.digests[0][1])) if e.digests else ("", None)
    details = e.decoded() if hasattr(e, "decoded") else {}
    text = json.dumps(details, ensure_ascii=False)
    if len(text) > 160:
        text = text[:157] + "..."
    return [str(e.index), e.register, e.event_type_name, f"{alg}:{_short(digest)}", text]


_HEAD = 64 * 1024
_PROGRESS_MIN = 16 * 1024 * 1024


def _ima_format(path: str, fmt: str) -> str | None:
    """``ima-binary``/``ima-ascii`` when ``path`` is an IMA list (these are streamed)."""
    if fmt in ("ima-binary", "ima-ascii"):
        return fmt
    if fmt != "auto" or path == "-":
        return None
    from cima.eventlog import ima

    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
    except OSError:
        return None  # read_input reports it
    if cel.looks_like(head):
        return None
    if ima.looks_like_ascii(head):
        return "ima-ascii"
    if ima.looks_like_binary(head):
        return "ima-binary"
    return None


class _ProgressReader:
    """A binary stream that advances a progress bar as it is read."""

    def __init__(self, raw: Any, progress: Any, task: Any) -> None:
        self._raw = raw
        self._progress = progress
        self._task = task

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._raw.read(n)
        self._progress.advance(self._task, len(data))
        return data

    def readinto(self, buf: Any) -> int:
        n: int = self._raw.readinto(buf)
        self._progress.advance(self._task, n)
        return n


def _stream_ima(
    path: str, fmt: str, replayer: Replayer, algorithms: tuple[str, ...] | None, td: bool
) -> None:
    from rich.progress import Progress

    from cima.eventlog import ima

    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror or e}") from e
    with f:
        if algorithms is None:
            head = f.read(_HEAD)
            f.seek(0)
            first = (
                ima.parse_ascii(head.split(b"\n", 1)[0] + b"\n")
                if fmt == "ima-ascii"
                else next(ima.iter_binary(io.BytesIO(head)), None)
            )
            first_entry = first.entries[0] if isinstance(first, ima.IMALog) else first
            algorithms = (first_entry.template_hash_algorithm,) if first_entry else ("sha1",)
        registers = None
        if td:
            registers = {}
            for i in range(24):
                try:
                    registers[i] = formats.td_register_for_ima(i)
                except RegisterError:
                    continue
        size = os.fstat(f.fileno()).st_size
        show = err.is_terminal and size >= _PROGRESS_MIN
        with Progress(console=err, transient=True, disable=not show) as progress:
            task = progress.add_task(f"replaying {path}", total=size)
            stream: Any = _ProgressReader(f, progress, task)
            replay_fn = ima.replay_binary if fmt == "ima-binary" else ima.replay_ascii
            result = replay_fn(
                stream, algorithms, source=path, bank=replayer.bank, registers=registers
            )
    replayer.bank = result.bank
    replayer.events += result.entries
    replayer.extended += result.entries


def cmd_replay(args: argparse.Namespace) -> int:
    algorithms: tuple[str, ...] | None = None
    if args.bank:
        try:
            algorithms = tuple(by_name(b).name for b in args.bank)
        except AlgorithmError as e:
            raise UsageError(f"--bank: {e}") from None
    # IMA lists are streamed (a list can hold millions of entries); other logs are small.
    plan: list[tuple[str, str | None, formats.LoadedLog | None]] = []
    for path in args.files:
        ima_fmt = _ima_format(path, args.format)
        plan.append((path, ima_fmt, None if ima_fmt else _load(path, args.format)))
    td = any(log is not None and log.is_td_log for _, _, log in plan)
    replayer = Replayer(algorithms=algorithms)
    for path, ima_fmt, log in plan:
        if log is not None:
            replayer.feed_all(formats.combined([log]))
        else:
            assert ima_fmt is not None
            _stream_ima(path, ima_fmt, replayer, algorithms, td)
    registers = replayer.bank.to_list()
    if args.json:
        emit_json({"registers": registers, "events": replayer.events})
        return 0
    table = Table(title=f"replay of {', '.join(args.files)}: {replayer.events} events")
    table.add_column("register")
    table.add_column("bank")
    table.add_column("value", overflow="fold")
    for r in registers:
        table.add_row(r["register"], r["algorithm"], r["digest"])
    out.print(table)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    log = _load(args.file, args.format)
    records = log.events if log.format == "cel" else cel.from_measurements(log.events)
    data: bytes
    if args.to == "cel-json":
        data = (cel.to_json(records) + "\n").encode()
    elif args.to == "tcg":
        data = cel.to_tcg_bytes(records)
    else:
        data = cel.to_ima_binary(records)
    if not data and args.to != "cel-json":
        raise UsageError(f"{args.file}: no records of the kind {args.to} holds")
    if args.output:
        Path(args.output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0
