"""Collect a boot's evidence from the guest: boot log, IMA list, TPM quotes, cima's own views.

What the guest runs, in a fixed order (so that two boots of the same image measure the same
files in the same order, and a difference between them is the difference made on purpose):

1. the payload commands of the boot (files on the payload disk, measured by IMA);
2. ``cima platform measurement --json`` and ``cima platform eventlog --json`` (the CLI in the
   guest, on ``/dev/tpmrm0`` and securityfs);
3. ``cima platform report --platform tpm --nonce N -o DIR`` (the CLI: one sha256 quote);
4. one quote over pcr0-pcr10 in every bank the TPM has (sha1, sha256, sha384), made with
   :class:`cima.platform.tpm.TPMPlatform` and written with the CLI's ``write_report``
   (the CLI quotes one bank);
5. the raw files: ``binary_bios_measurements``, IMA ``binary_runtime_measurements`` and
   ``ascii_runtime_measurements``, read after the quotes (the IMA list may run ahead of
   them: verifiers match its shortest prefix).

The nonce is chosen on the host, fresh for every boot.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from cima.eventlog import ima, tcg
from tests.vm.agent import AgentEvidence
from tests.vm.guest import BootConfig, GuestSession

SECURITYFS = "/sys/kernel/security"
BOOT_LOG = f"{SECURITYFS}/tpm0/binary_bios_measurements"
IMA_BINARY = f"{SECURITYFS}/ima/binary_runtime_measurements"
IMA_ASCII = f"{SECURITYFS}/ima/ascii_runtime_measurements"
QUOTED = [f"pcr{i}" for i in range(11)]
BANKS = ("sha1", "sha256", "sha384")
#: What this process measured (build, boots), printed at the end of a test session.
TIMINGS: dict[str, Any] = {}

# Run in the guest: one TPM2_Quote over pcr0-pcr10 in every bank, bound to the host's nonce.
QUOTE_SCRIPT = """
import sys
from pathlib import Path
from cima.cli.platform import write_report
from cima.platform.tpm import TPMPlatform

nonce, folder, banks, registers = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
with TPMPlatform() as platform:
    report = platform.report(
        bytes.fromhex(nonce), b"", registers.split(","), algorithms=banks.split(",")
    )
write_report(report, platform.name, Path(folder))
"""


@dataclass
class BootEvidence:
    """What one boot left on the host (files under ``folder``) and how long each step took."""

    name: str
    folder: Path
    config: BootConfig
    cmdline: str
    nonce: bytes
    payload_runs: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    #: What cima's agent served afterwards (:func:`tests.vm.agent.run_agent`), if it ran.
    agent: AgentEvidence | None = None

    @property
    def boot_log_file(self) -> Path:
        return self.folder / "binary_bios_measurements"

    @property
    def ima_file(self) -> Path:
        return self.folder / "binary_runtime_measurements"

    @property
    def ima_ascii_file(self) -> Path:
        return self.folder / "ascii_runtime_measurements"

    @property
    def quote_dir(self) -> Path:
        """The quote over pcr0-pcr10 in every bank (attest.bin, signature.bin, ak.pem, ...)."""
        return self.folder / "quote"

    @property
    def cli_quote_dir(self) -> Path:
        """The sha256 quote made by ``cima platform report`` in the guest."""
        return self.folder / "cli-quote"

    @cached_property
    def boot_log(self) -> tcg.TCGEventLog:
        return tcg.parse(self.boot_log_file.read_bytes(), source=str(self.boot_log_file))

    @cached_property
    def ima_log(self) -> ima.IMALog:
        return ima.parse_binary(self.ima_file.read_bytes(), source=str(self.ima_file))

    @cached_property
    def report(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.quote_dir / "report.json").read_text())
        return data

    @cached_property
    def quoted(self) -> dict[tuple[str, str], bytes]:
        """(register, bank) -> the value the quote covers (checked against its pcrDigest)."""
        return {
            (p["register"], p["algorithm"]): bytes.fromhex(p["digest"]) for p in self.report["pcrs"]
        }

    @cached_property
    def guest_eventlog(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = json.loads((self.folder / "guest-eventlog.json").read_text())
        return data

    @cached_property
    def guest_measurement(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.folder / "guest-measurement.json").read_text())
        return data


def _timed(timings: dict[str, float], key: str, start: float) -> None:
    timings[key] = round(time.monotonic() - start, 2)


def collect(
    session: GuestSession,
    folder: Path,
    *,
    name: str,
    config: BootConfig,
    payload_commands: list[list[str]] | None = None,
    nonce: bytes | None = None,
) -> BootEvidence:
    """Run the fixed sequence above in the guest and fetch everything into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ev = BootEvidence(
        name=name,
        folder=folder,
        config=config,
        cmdline=session.read_file("/proc/cmdline").decode().strip(),
        nonce=nonce if nonce is not None else os.urandom(32),
    )
    # (1) the payload
    for argv in payload_commands or []:
        t = time.monotonic()
        r = session.run(argv).check()
        ev.payload_runs.append({"argv": argv, "stdout": r.text, "seconds": r.seconds})
        _timed(ev.timings, f"run {argv[0]}", t)
    # (2) cima's views
    t = time.monotonic()
    measurement = session.cima("platform", "measurement", "--platform", "tpm", "--json")
    (folder / "guest-measurement.json").write_bytes(measurement.check().stdout)
    _timed(ev.timings, "cima platform measurement", t)
    t = time.monotonic()
    eventlog = session.cima("platform", "eventlog", "--platform", "tpm", "--json")
    (folder / "guest-eventlog.json").write_bytes(eventlog.check().stdout)
    _timed(ev.timings, "cima platform eventlog", t)
    # (3) the CLI's quote
    t = time.monotonic()
    cli_dir = "/tmp/cima-cli-quote"
    session.cima(
        "platform",
        "report",
        "--platform",
        "tpm",
        "--nonce",
        ev.nonce.hex(),
        "-o",
        cli_dir,
        "--json",
    ).check()
    _timed(ev.timings, "cima platform report", t)
    # (4) every bank
    t = time.monotonic()
    quote_dir = "/tmp/cima-quote"
    session.run(
        [
            "/usr/local/bin/python3", "-c", QUOTE_SCRIPT,
            ev.nonce.hex(), quote_dir, ",".join(BANKS), ",".join(QUOTED),
        ]
    ).check()  # fmt: skip
    _timed(ev.timings, "quote (3 banks)", t)
    # (5) the raw files
    t = time.monotonic()
    for guest_dir, host_dir in ((cli_dir, ev.cli_quote_dir), (quote_dir, ev.quote_dir)):
        meta = json.loads(session.read_file(f"{guest_dir}/report.json"))
        host_dir.mkdir(parents=True, exist_ok=True)
        (host_dir / "report.json").write_text(json.dumps(meta, indent=2) + "\n")
        for fname in meta["files"].values():
            session.fetch(f"{guest_dir}/{fname}", host_dir / fname)
    for path in (BOOT_LOG, IMA_BINARY, IMA_ASCII):
        session.fetch(path, folder / Path(path).name)
    _timed(ev.timings, "fetch", t)
    (folder / "evidence.json").write_text(
        json.dumps(
            {
                "name": name,
                "cmdline": ev.cmdline,
                "nonce": ev.nonce.hex(),
                "payload_runs": ev.payload_runs,
                "timings": ev.timings,
            },
            indent=2,
        )
        + "\n"
    )
    return ev
