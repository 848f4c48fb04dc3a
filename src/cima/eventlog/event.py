"""What replay needs from one record of any measurement log.

Every codec's record type (TCG, CCEL, IMA, CEL) satisfies :class:`Measurement`,
so :mod:`cima.eventlog.replay` works on any of them, or on a mix.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Measurement(Protocol):
    """One log record as replay sees it."""

    @property
    def register(self) -> str:
        """Canonical register name (``pcr10``, ``rtmr2``, ...)."""
        ...

    @property
    def extends(self) -> bool:
        """False for records that are logged but never extended (EV_NO_ACTION)."""
        ...

    @property
    def startup_locality(self) -> int | None:
        """For a TPM StartupLocality record, the locality that pcr0 starts at; else None."""
        ...

    def algorithms(self) -> tuple[str, ...]:
        """The banks this record carries (or can compute) a digest for."""
        ...

    def replay_digest(self, algorithm: str) -> bytes | None:
        """The digest this record extends into bank ``algorithm``, or None if it has none.

        This is the digest as logged; it is never recomputed from event data,
        except where the format defines it that way (IMA per-bank template hashes).
        """
        ...
