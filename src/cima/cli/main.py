"""Entry point of the ``cima`` command (placeholder until the command groups land)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    del argv
    print("cima: no commands yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
