"""Interop with tpm2-tools: our replay against ``tpm2_eventlog`` (Debian tpm2-tools 5.4).

tpm2_eventlog prints the events as YAML and then, under ``pcrs:``, the final
value of every PCR the log extends, as ``N : 0x<hex>`` (loaded here with
PyYAML's BaseLoader so that the hex keeps its leading zeros).

tpm2-tools 5.4 extends EV_NO_ACTION records and ignores StartupLocality
(tpm2-tools fixed both in 5.6). The PC Client PFP says otherwise (section
10.4.5: EV_NO_ACTION events are not extended; section 10.4.5.3: StartupLocality
sets pcr0's starting value to 00..0N). Where a log has such records, the test
checks that the difference from 5.4 is exactly the one these two rules predict.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cima.eventlog import replay, tcg
from cima.registers import RegisterBank
from tests.eventlog.test_tcg import startup_locality_log
from tests.vectors import manifest, path

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(shutil.which("tpm2_eventlog") is None, reason="tpm2_eventlog not installed"),
]

TCG_VECTORS = manifest("tcg")
KEYLIME_LOG = path("tpm-quote", "keylime-perf-tests/uefi_log.bin")


def peer_pcrs(log_file: Path) -> dict[tuple[str, str], str]:
    """(register, bank) -> hex from ``tpm2_eventlog FILE``'s ``pcrs:`` section."""
    out = subprocess.run(
        ["tpm2_eventlog", str(log_file)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    doc = yaml.load(out, Loader=yaml.BaseLoader)
    pcrs: dict[str, dict[str, str]] = doc.get("pcrs") or {}
    result: dict[tuple[str, str], str] = {}
    for bank, values in pcrs.items():
        for index, value in values.items():
            assert value.startswith("0x"), value
            result[(f"pcr{int(index)}", bank)] = value[2:].lower()
    return result


def ours(log: tcg.TCGEventLog) -> dict[tuple[str, str], str]:
    return {(v.register, v.algorithm): v.digest.hex() for v in replay.replay(log.events)}


def tpm2_tools_54_replay(log: tcg.TCGEventLog) -> dict[tuple[str, str], str]:
    """What tpm2-tools 5.4 computes: every record after the header extends, no StartupLocality."""
    bank = RegisterBank()
    first = 1 if log.format == "crypto-agile" else 0
    for ev in log.events[first:]:
        if log.format == "sha1-legacy" and not ev.extends:
            continue  # 5.4 skips EV_NO_ACTION in SHA1 logs
        for alg in ev.algorithms():
            digest = ev.replay_digest(alg)
            assert digest is not None
            bank.extend(f"pcr{ev.pcr_index}", alg, digest)
    return {(v.register, v.algorithm): v.digest.hex() for v in bank}


def _compare(log_file: Path) -> None:
    log = tcg.parse(log_file.read_bytes())
    peer = peer_pcrs(log_file)
    mine = ours(log)
    if all(e.extends for e in log.events[1:]) and log.startup_locality is None:
        assert mine == peer
        return
    differing = {k for k in peer.keys() | mine.keys() if peer.get(k) != mine.get(k)}
    assert peer == tpm2_tools_54_replay(log), (
        "tpm2_eventlog 5.4 differs from the PFP only by extending EV_NO_ACTION records "
        "and ignoring StartupLocality"
    )
    touched = {
        f"pcr{e.pcr_index}"
        for e in log.events[1:]
        if not e.extends or e.startup_locality is not None
    }
    assert {reg for reg, _ in differing} <= touched, (
        "only the PCRs holding EV_NO_ACTION / StartupLocality records may differ"
    )


@pytest.mark.parametrize("entry", TCG_VECTORS, ids=[e["file"] for e in TCG_VECTORS])
def test_vector_pcrs_equal_tpm2_eventlog(entry: dict[str, Any]) -> None:
    _compare(path("tcg", entry["file"]))


def test_keylime_uefi_log_pcrs_equal_tpm2_eventlog() -> None:
    _compare(KEYLIME_LOG)


def test_startup_locality_log_differs_from_tpm2_tools_54_as_the_pfp_predicts(
    tmp_path: Path,
) -> None:
    locality = 3
    data = startup_locality_log(locality, b"crtm")
    log_file = tmp_path / "startup-locality.bin"
    log_file.write_bytes(data)
    peer = peer_pcrs(log_file)
    mine = ours(tcg.parse(data))
    for bank, h in (("sha1", hashlib.sha1), ("sha256", hashlib.sha256)):
        size = h().digest_size
        measured = h(b"crtm").digest()
        pfp = h(bytes(size - 1) + bytes([locality]) + measured).hexdigest()
        # 5.4: pcr0 starts at zero and the StartupLocality record's zero digest is extended.
        v54 = h(h(bytes(2 * size)).digest() + measured).hexdigest()
        assert mine[("pcr0", bank)] == pfp, (
            "PFP 10.4.5.3: pcr0 starts at 00..03 after StartupLocality 3; EV_NO_ACTION not extended"
        )
        assert peer[("pcr0", bank)] == v54, (
            "tpm2_eventlog 5.4 extends the EV_NO_ACTION record and ignores StartupLocality"
        )
    assert set(peer) == set(mine) == {("pcr0", "sha1"), ("pcr0", "sha256")}
    _compare(log_file)
