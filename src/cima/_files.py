"""Reading a whole small file with a size cap, and errors that name the file."""

from __future__ import annotations

import os
from collections.abc import Callable


def read_bounded(
    path: str | os.PathLike[str], limit: int, error: Callable[[str], Exception]
) -> bytes:
    """The bytes of file ``path``, never more than ``limit`` of them read.

    A missing file, a directory, an unreadable file or one larger than ``limit``
    raises ``error(message)``, the message naming the file.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{name}: no such file") from None
    except IsADirectoryError:
        raise error(f"{name}: is a directory") from None
    except OSError as e:
        raise error(f"{name}: cannot read: {e.strerror or e}") from e
    if len(data) > limit:
        raise error(f"{name}: larger than {limit} bytes")
    return data
