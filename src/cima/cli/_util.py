"""What every command shares: JSON output, reading inputs, hex arguments, failures."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console

from cima._files import read_bounded
from cima.errors import CimaError

#: Human output: tables and progress on stdout, diagnostics on stderr. When
#: stdout is not a terminal, tables are laid out wide rather than folded at 80.
out = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)


def fail_line(message: str) -> None:
    """One line of diagnosis on stderr, never wrapped."""
    sys.stderr.write(" ".join(message.split()) + "\n")
    sys.stderr.flush()


#: Largest input file a command reads whole (a measurement log, a quote, a bundle).
MAX_INPUT = 512 * 1024 * 1024


class UsageError(CimaError):
    """Bad arguments or unreadable input: exit status 2."""


class VerificationFailed(CimaError):
    """A verification that ran and said no: exit status 1."""


def emit_json(obj: Any) -> None:
    """Print exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def read_input(path: str, *, limit: int = MAX_INPUT) -> bytes:
    """Read a whole input file (``-`` is stdin), refusing one larger than ``limit``."""
    if path != "-":
        return read_bounded(path, limit, UsageError)
    data = sys.stdin.buffer.read(limit + 1)
    if len(data) > limit:
        raise UsageError(f"{path}: larger than {limit} bytes")
    return data


def hex_arg(value: str) -> bytes:
    """argparse type for a hex string (``0x`` prefix allowed, empty allowed)."""
    v = value.strip()
    if v.lower().startswith("0x"):
        v = v[2:]
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a hex string: {value!r}") from None


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
