"""cima: Container Integrity Measurement Agent and verifier.

The pure core lives in :mod:`cima.eventlog` (measurement logs and replay) and
:mod:`cima.evidence` (signed reports). Hardware access is confined to
:mod:`cima.platform`.
"""

__version__ = "0.1.0"
