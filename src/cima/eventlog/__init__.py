"""Measurement logs: pure codecs (bytes in, objects out) and replay.

- :mod:`cima.eventlog.tcg`: TCG PC Client logs (SHA1 legacy and crypto-agile)
- :mod:`cima.eventlog.ccel`: the ACPI CCEL table and the CC event log
- :mod:`cima.eventlog.ima`: Linux IMA runtime measurement lists (ascii and binary)
- :mod:`cima.eventlog.uefi`: decoders of common event data
- :mod:`cima.eventlog.cel`: the TCG Canonical Event Log (CEL-JSON), the interchange format
- :mod:`cima.eventlog.replay`: replay into a register bank and comparison with quoted values
"""
