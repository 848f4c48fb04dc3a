"""The exception hierarchy of cima.

Every error cima raises derives from :class:`CimaError`. Subclasses name the
cause; a foreign exception is wrapped at the boundary with ``raise ... from e``.
Errors about input carry where the problem is (a file, a byte offset, a key),
so that a command line can print one line that points at it.
"""

from __future__ import annotations


def describe_type(value: object) -> str:
    """How an error message names the type of a value read from YAML or JSON ("a string")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


class CimaError(Exception):
    """Root of every error raised by cima."""


class ParseError(CimaError, ValueError):
    """Bytes or text that do not decode as the format they claim to be.

    ``offset`` is the byte offset (or, for text formats, the line number with
    ``line``) in the input where decoding failed; ``source`` names the input
    (a file path) when the caller knows it.
    """

    def __init__(
        self,
        message: str,
        *,
        offset: int | None = None,
        line: int | None = None,
        source: str | None = None,
    ) -> None:
        self.reason = message
        self.offset = offset
        self.line = line
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        where: list[str] = []
        if self.source is not None:
            where.append(self.source)
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        if where:
            return f"{', '.join(where)}: {self.reason}"
        return self.reason

    def with_source(self, source: str) -> ParseError:
        """Return a copy of this error that names ``source``."""
        err = type(self).__new__(type(self))
        err.__dict__.update(self.__dict__)
        err.source = source
        Exception.__init__(err, err._render())
        return err


class TruncatedError(ParseError):
    """The input ends in the middle of a record."""


class UnsupportedFormatError(ParseError):
    """The input is well formed but of a kind or version cima does not handle."""


class AlgorithmError(CimaError, ValueError):
    """An unknown or unsupported hash algorithm."""


class RegisterError(CimaError, ValueError):
    """An unknown register name or index."""


class ReplayError(CimaError):
    """A log cannot be replayed (for example a register it extends is not in the bank)."""


class ReplayMismatchError(ReplayError):
    """Replayed register values differ from the values they are compared with."""


class SignatureError(CimaError):
    """A signature, certificate chain or key does not verify."""


class FreshnessError(CimaError):
    """A report does not bind the expected nonce or user data."""


class PolicyError(CimaError, ValueError):
    """A policy file is invalid (unknown key, wrong type, unknown algorithm)."""


class PlatformError(CimaError):
    """The platform (TPM, TDX, software) failed or is not available."""


class JournalError(CimaError):
    """The runtime journal is damaged or does not reconcile with the register."""
