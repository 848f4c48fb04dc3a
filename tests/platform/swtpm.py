"""The swtpm launcher the tests use (it lives in the package: the demo starts one too)."""

from cima.platform.swtpm import DEFAULT_BANKS, SWTPM, ManufacturedTPM, available

__all__ = ["DEFAULT_BANKS", "SWTPM", "ManufacturedTPM", "available"]
