"""Entry point of the ``cima`` command.

Exit status: 0 ok, 1 verification failed, 2 usage or input error (one line
naming the file and the offset or key). ``-v`` shows the traceback of an error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cima import __version__
from cima.cli import _util
from cima.errors import CimaError


def build_parser() -> argparse.ArgumentParser:
    from cima.cli import demo, eventlog

    parser = argparse.ArgumentParser(
        prog="cima",
        description="Container Integrity Measurement Agent and verifier.",
    )
    parser.add_argument("--version", action="version", version=f"cima {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the traceback of an error"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    eventlog.register(sub)
    for optional in (
        "quote",
        "platform",
        "policy",
        "agent",
        "client",
        "verify",
        "reference",
        "verifier",
    ):
        module = _optional_module(optional)
        if module is not None:
            module.register(sub)
    demo.register(sub)
    return parser


def _optional_module(name: str) -> Any:

    try:
        return importlib.import_module(f"cima.cli.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"cima.cli.{name}":
            return None
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except _util.VerificationFailed as e:
        if args.verbose:
            raise
        _util.fail_line(f"cima: verification failed: {e}")
        return 1
    except CimaError as e:
        if args.verbose:
            raise
        _util.fail_line(f"cima: error: {e}")
        return 2
    except KeyboardInterrupt:
        _util.fail_line("cima: interrupted")
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
