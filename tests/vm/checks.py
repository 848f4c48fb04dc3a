"""Check a boot's evidence three ways: cima, tpm2-tools, ima-evm-utils (and plain hashlib).

Every function here returns what it found (register values, the matched IMA prefix, the
tools' own output) and raises :class:`CheckError` naming the register, the bank and the
tool when something disagrees; the tests assert on the results, ``make demo-vm`` prints them.

- cima: :func:`cima.evidence.tpm.verify_quote` (AK signature, nonce binding, pcrDigest over
  the reported values), the boot log replayed into pcr0-pcr9 and the IMA list's shortest
  matching prefix replayed into pcr10, in every bank.
- tpm2-tools 5.4: ``tpm2_checkquote`` (signature, qualifying data, PCR digest; it prints the
  PCR values it checked) and ``tpm2_eventlog`` (its ``pcrs:`` section). 5.4 extends every
  EV_NO_ACTION record after the log header and ignores StartupLocality (fixed in 5.6; PC
  Client PFP sections 10.4.5 and 10.4.5.3 say otherwise): where a log has such records the
  difference from cima is predicted record by record, not tolerated.
- ima-evm-utils 1.4: ``evmctl ima_measurement --pcrs BANK,FILE`` replays the binary list
  offline against given PCR values and checks every template hash; it knows the sha1 and
  sha256 banks only (``default_algos`` in evmctl.c), so the sha384 bank is replayed by
  :func:`hashlib_ima_replay`, an independent parser of the list written for this check.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cima.eventlog import replay
from cima.evidence import tpm
from cima.registers import RegisterBank
from tests.vm.evidence import BANKS, BootEvidence

BOOT_REGISTERS = [f"pcr{i}" for i in range(10)]
IMA_REGISTER = "pcr10"
EV_NO_ACTION = 0x00000003


class CheckError(AssertionError):
    """Two sources disagree (or a tool refused the evidence); the message names both."""


@dataclass
class RegisterAgreement:
    """One register in one bank, as each source sees it (hex; None: the source has no view)."""

    register: str
    algorithm: str
    quoted: str
    sources: dict[str, str | None] = field(default_factory=dict)

    @property
    def agreed(self) -> bool:
        return all(v == self.quoted for v in self.sources.values() if v is not None)


@dataclass
class BootChecks:
    """Everything checked about one boot."""

    quote: dict[str, Any]
    ima_prefix: int
    ima_entries: int
    evmctl: dict[str, int]
    registers: list[RegisterAgreement]
    tpm2_eventlog_note: str

    def failures(self) -> list[RegisterAgreement]:
        return [r for r in self.registers if not r.agreed]


# -- cima --------------------------------------------------------------------------------------


def cima_verify_quote(ev: BootEvidence) -> tpm.QuoteVerification:
    """AK signature over the attest bytes, extraData = H(nonce), pcrDigest over the values."""
    q = ev.quote_dir
    return tpm.verify_quote(
        (q / "attest.bin").read_bytes(),
        (q / "signature.bin").read_bytes(),
        (q / "ak.pem").read_bytes(),
        pcr_values=ev.quoted,
        nonce=ev.nonce,
        user_data=b"",
    )


def cima_boot_replay(ev: BootEvidence) -> RegisterBank:
    return replay.replay(ev.boot_log.events, BANKS)


def cima_ima_prefix(ev: BootEvidence) -> replay.ReplayResult:
    """The shortest prefix of the IMA list whose replay equals the quoted pcr10, every bank."""
    expected = {(IMA_REGISTER, alg): ev.quoted[(IMA_REGISTER, alg)] for alg in BANKS}
    return replay.compare_prefix(ev.ima_log.entries, expected, algorithms=BANKS)


def _value(bank: RegisterBank, register: str, alg: str) -> bytes:
    """A replayed value; a register no record extended holds its reset value (zeros)."""
    if (register, alg) in bank:
        return bank.get(register, alg)
    return bytes(hashlib.new(alg).digest_size)


# -- tpm2-tools --------------------------------------------------------------------------------


def tpm2_eventlog_pcrs(log_file: Path) -> dict[tuple[str, str], str]:
    """(register, bank) -> hex from ``tpm2_eventlog FILE``'s ``pcrs:`` section."""
    out = subprocess.run(
        ["tpm2_eventlog", str(log_file)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    doc = yaml.load(out, Loader=yaml.BaseLoader)
    result: dict[tuple[str, str], str] = {}
    for bank, values in (doc.get("pcrs") or {}).items():
        for index, value in values.items():
            result[(f"pcr{int(index)}", bank)] = value.removeprefix("0x").lower()
    return result


def tpm2_tools_54_prediction(ev: BootEvidence) -> tuple[dict[tuple[str, str], str], str]:
    """What tpm2_eventlog 5.4 must print for this log, and which rule made it differ, if any.

    5.4 extends every record after the Spec ID header, EV_NO_ACTION included, and starts
    pcr0 at zero whatever StartupLocality says.
    """
    bank = RegisterBank()
    no_action = []
    for ev_ in ev.boot_log.events[1:]:
        if not ev_.extends:
            no_action.append(f"#{ev_.index} {ev_.register} {ev_.event_type_name}")
        for alg in ev_.algorithms():
            digest = ev_.replay_digest(alg)
            if digest is not None:
                bank.extend(ev_.register, alg, digest)
    note = "no EV_NO_ACTION record after the header and no StartupLocality: no difference"
    if no_action or ev.boot_log.startup_locality is not None:
        note = (
            "tpm2_eventlog 5.4 extends EV_NO_ACTION records "
            f"({', '.join(no_action) or 'none'}) and ignores StartupLocality "
            f"({ev.boot_log.startup_locality})"
        )
    return {(v.register, v.algorithm): v.digest.hex() for v in bank}, note


def tpm2_checkquote(ev: BootEvidence) -> dict[tuple[str, str], str]:
    """Run ``tpm2_checkquote`` on the three-bank quote; return the PCR values it printed."""
    q = ev.quote_dir
    qualifying = str(ev.report["qualifying_data"])
    done = subprocess.run(
        [
            "tpm2_checkquote", "-u", "ak.pem", "-m", "attest.bin", "-s", "signature.bin",
            "-f", "pcrs.bin", "-g", str(ev.report["hash_algorithm"]), "-q", qualifying,
        ],
        cwd=q, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise CheckError(f"tpm2_checkquote refused the {ev.name} quote: {done.stderr.strip()}")
    doc = yaml.load(done.stdout, Loader=yaml.BaseLoader)
    result: dict[tuple[str, str], str] = {}
    for bank, values in (doc.get("pcrs") or {}).items():
        for index, value in values.items():
            result[(f"pcr{int(index)}", bank)] = value.removeprefix("0x").lower()
    return result


# -- ima-evm-utils and hashlib ---------------------------------------------------------------


def evmctl_pcr_file(ev: BootEvidence, alg: str, dest: Path) -> Path:
    """The quoted values in the ``PCR-NN: HEX`` lines ``evmctl --pcrs`` reads (PCR 0..23)."""
    size = hashlib.new(alg).digest_size
    lines = []
    for i in range(24):
        value = ev.quoted.get((f"pcr{i}", alg), bytes(size))
        lines.append(f"PCR-{i:02d}: {value.hex()}\n")
    dest.write_text("".join(lines))
    return dest


def evmctl_ima_measurement(
    ev: BootEvidence, alg: str, *, keys: list[Path] | None = None
) -> tuple[int, str]:
    """``evmctl ima_measurement --pcrs ALG,FILE LIST``: the entry number at which evmctl's
    replay of ``alg`` matched the quoted pcr10, and evmctl's output.

    evmctl 1.4 exits 0 even when it read no PCR value, so its words are checked, not its
    status. With ``keys`` (X.509 certificates, DER) it also verifies the ima-sig signatures.
    """
    if shutil.which("evmctl") is None:
        raise CheckError("evmctl is not installed (Debian package ima-evm-utils)")
    pcrs = evmctl_pcr_file(ev, alg, ev.folder / f"evmctl-pcrs-{alg}.txt")
    cmd = ["evmctl", "ima_measurement", "-v", "--pcrs", f"{alg},{pcrs}"]
    if keys:
        cmd[2:2] = ["-v"]
        cmd += ["--verify-sig", "--key", ",".join(str(k) for k in keys)]
    cmd.append(str(ev.ima_file))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    out = done.stdout + done.stderr
    (ev.folder / f"evmctl-{alg}.out").write_text(out)
    m = re.search(rf"^{alg} PCR-10: succeed at entry (\d+)$", out, re.MULTILINE)
    if (
        done.returncode != 0
        or m is None
        or "Matched per TPM bank calculated digest(s)." not in out
        or "Failed to verify template data digest" in out
    ):
        tail = "\n".join(out.splitlines()[-8:])
        raise CheckError(
            f"evmctl did not match the {ev.name} IMA list to the quoted pcr10 in the {alg} "
            f"bank (exit {done.returncode}):\n{tail}"
        )
    return int(m.group(1)), out


def hashlib_ima_replay(data: bytes, alg: str, target: bytes) -> tuple[int | None, bytes]:
    """Replay a binary IMA list into one bank with hashlib alone, per-bank form (Linux 5.8+).

    Each record is ``u32 pcr, 20-byte sha1 template hash, u32 name length, name, u32 data
    length, template data`` (little endian); the bank is extended with ``alg(template
    data)``, or all-ones for a violation (zero template hash). Returns the number of the
    first entry after which the register equals ``target`` (1-based, as evmctl counts), and
    the value after the whole list.
    """
    size = hashlib.new(alg).digest_size
    value = bytes(size)
    matched: int | None = None
    pos = n = 0
    while pos < len(data):
        _pcr, sha1, name_len = struct.unpack_from("<I20sI", data, pos)
        pos += 28
        name = data[pos : pos + name_len]
        pos += name_len
        if name == b"ima":
            raise CheckError("the 'ima' template is not used by these guests")
        (data_len,) = struct.unpack_from("<I", data, pos)
        pos += 4
        template = data[pos : pos + data_len]
        pos += data_len
        if len(template) != data_len:
            raise CheckError(f"IMA list truncated in entry {n + 1}")
        digest = b"\xff" * size if sha1 == bytes(20) else hashlib.new(alg, template).digest()
        if sha1 != bytes(20) and hashlib.sha1(template).digest() != sha1:
            raise CheckError(f"IMA entry {n + 1}: template hash is not sha1(template data)")
        value = hashlib.new(alg, value + digest).digest()
        n += 1
        if matched is None and hmac.compare_digest(value, target):
            matched = n
    return matched, value


# -- all together --------------------------------------------------------------------------------


def _matched_at(n: int | None, matched: int, quoted: str) -> str:
    if n == matched:
        return quoted
    return f"no match (cima: after entry {matched}; this replay: {n})"


def check_boot(ev: BootEvidence) -> BootChecks:
    """Verify the quote, replay both logs, and compare every register in every bank."""
    verification = cima_verify_quote(ev)
    boot_bank = cima_boot_replay(ev)
    prefix = cima_ima_prefix(ev)
    if not prefix.ok or prefix.prefix is None:
        raise CheckError(
            f"{ev.name}: no prefix of the IMA list replays to the quoted pcr10: "
            f"{[m.to_dict() for m in prefix.mismatches]}"
        )
    matched = prefix.prefix.matched_events
    peer_log = tpm2_eventlog_pcrs(ev.boot_log_file)
    predicted, note = tpm2_tools_54_prediction(ev)
    if peer_log != predicted:
        raise CheckError(
            f"{ev.name}: tpm2_eventlog differs from what the PFP rules predict for 5.4: "
            f"{sorted(set(peer_log.items()) ^ set(predicted.items()))}"
        )
    peer_quote = tpm2_checkquote(ev)
    evm: dict[str, int] = {}
    for alg in ("sha1", "sha256"):
        evm[alg], _ = evmctl_ima_measurement(ev, alg)
    raw = ev.ima_file.read_bytes()
    independent = {
        alg: hashlib_ima_replay(raw, alg, ev.quoted[(IMA_REGISTER, alg)]) for alg in BANKS
    }
    registers: list[RegisterAgreement] = []
    ima_bank = RegisterBank()
    replay.replay(ev.ima_log.entries[:matched], BANKS, ima_bank)
    for alg in BANKS:
        for reg in [*BOOT_REGISTERS, IMA_REGISTER]:
            quoted = ev.quoted[(reg, alg)].hex()
            if reg == IMA_REGISTER:
                # evmctl and the hashlib replay report the entry after which their replay
                # equals the quoted value: they agree when that is where cima's prefix ends.
                sources: dict[str, str | None] = {
                    "cima replay": _value(ima_bank, reg, alg).hex(),
                    "tpm2_checkquote": peer_quote.get((reg, alg), "not printed"),
                    "evmctl": _matched_at(evm.get(alg), matched, quoted) if alg in evm else None,
                    "hashlib replay": _matched_at(independent[alg][0], matched, quoted),
                }
            else:
                ours = _value(boot_bank, reg, alg).hex()
                peer = peer_log.get((reg, alg))
                sources = {
                    "cima replay": ours,
                    "tpm2_checkquote": peer_quote.get((reg, alg), "not printed"),
                    # tpm2_eventlog lists only registers that the log extends.
                    "tpm2_eventlog": peer
                    if peer is not None
                    else _value(RegisterBank(), reg, alg).hex(),
                }
            registers.append(RegisterAgreement(reg, alg, quoted, sources))
    return BootChecks(
        quote=verification.to_dict(),
        ima_prefix=matched,
        ima_entries=len(ev.ima_log),
        evmctl=evm,
        registers=registers,
        tpm2_eventlog_note=note,
    )
