"""Appraisal speed: a full appraisal of a large bundle, then incremental ones.

The bundle is what an agent on a busy node sends: a TPM-format quote over
pcr0-16 (sha256) signed with an ECDSA P-256 AK, the real 153-record UEFI log of
the keylime vector (sha256 and sha384 banks) as the boot log, an ``ima-ng``
IMA list of ``--entries`` entries (100,000 by default, SHA-1 template hashes,
SHA-256 file digests, replayed into the quoted sha256 bank), and a few runtime
journal events. Reference values list every file digest.

Rows:

- ``appraise full``: :func:`cima.verifier.appraise.appraise` of that bundle with
  no earlier state (every step: signature, binding, boot log replay and
  comparison, every IMA entry hashed twice, replayed and looked up); the bundle
  is already decoded, as a verifier service holds it after reading the request
  (its JSON decoding is the next row);
- ``bundle decode``: :meth:`EvidenceBundle.from_json` of the same bundle;
- ``appraise incremental``: ``--rounds`` appraisals, each with 1,000 more IMA
  entries and a new quote, given the previous result's state (same boot);
- ``appraise keylime vector``: the real keylime bundle (780 IMA entries).

Targets: full < 1 s for 100,000 entries; incremental < 20 ms per 1,000 entries.

Usage: ``python benchmarks/bench_verifier.py [--entries N] [--repeat K] [--json]``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "src"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from cima.agent.events import RuntimeEvent  # noqa: E402
from cima.eventlog import cel, tcg  # noqa: E402
from cima.eventlog.cel import IMA_TEMPLATE, CELRecord  # noqa: E402
from cima.eventlog.replay import Replayer  # noqa: E402
from cima.evidence.bundle import EvidenceBundle, TPMQuoteReport  # noqa: E402
from cima.evidence.reportdata import tpm_qualifying_data  # noqa: E402
from cima.evidence.tpm import PCRSelection, Quote, Signature  # noqa: E402
from cima.registers import RegisterBank, RegisterValue  # noqa: E402
from cima.verifier.appraise import appraise  # noqa: E402
from cima.verifier.reference import ReferenceValues, create_references  # noqa: E402

DEFAULT_ENTRIES = 100_000
DEFAULT_ROUNDS = 20
STEP = 1000
VECTORS = ROOT.parent / "shared" / "vectors"
UEFI_LOG = VECTORS / "tpm-quote" / "keylime-perf-tests" / "uefi_log.bin"
NONCE = b"benchmark nonce!"


def _ima_entry(index: int) -> CELRecord:
    name = f"/usr/lib/x86_64-linux-gnu/lib{index % 5000}/module-{index}.so".encode()
    dfield = b"sha256:\x00" + hashlib.sha256(b"%d" % index).digest()
    nfield = name + b"\x00"
    data = len(dfield).to_bytes(4, "little") + dfield + len(nfield).to_bytes(4, "little") + nfield
    th = hashlib.sha1(data).digest()
    return CELRecord(
        index,
        "pcr10",
        (("sha1", th),),
        IMA_TEMPLATE,
        {"template_name": "ima-ng", "template_data": data},
    )


def _boot_log() -> list[CELRecord]:
    if UEFI_LOG.is_file():
        return cel.from_measurements(tcg.parse(UEFI_LOG.read_bytes()).events)
    # Without the vectors: a short synthetic log (the figures are then a little lower).
    return [
        CELRecord(
            i,
            f"pcr{i % 8}",
            (("sha256", hashlib.sha256(b"%d" % i).digest()),),
            "pcclient_std",
            {"event_type": 0x0D, "event_data": b"event %d" % i},
        )
        for i in range(150)
    ]


def _runtime() -> list[RuntimeEvent]:
    return [
        RuntimeEvent.create(
            i,
            "pcr13",
            "sha256",
            kind="process",
            scope="node",
            subject=f"/usr/bin/daemon{i}",
            data={"pid": 100 + i, "exe_digest": "sha256:" + hashlib.sha256(b"%d" % i).hexdigest()},
        )
        for i in range(8)
    ]


class Node:
    """Signs bundles like an agent on a TPM node (the AK a software P-256 key)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.ak_pem = (
            self.key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        self.boot = _boot_log()
        self.runtime = _runtime()
        self.bank = RegisterBank()
        r = Replayer(algorithms=("sha256",), bank=self.bank)
        r.feed_all(self.boot)
        for ev in self.runtime:
            self.bank.extend("pcr13", "sha256", ev.digest)
        self.ima: list[CELRecord] = []

    def grow(self, count: int) -> None:
        """Append ``count`` IMA entries (the kernel measures, the PCR follows)."""
        start = len(self.ima)
        new = [_ima_entry(i) for i in range(start, start + count)]
        value = self.bank.get("pcr10", "sha256")
        for e in new:
            value = hashlib.sha256(
                value + hashlib.sha256(e.content["template_data"]).digest()
            ).digest()
        self.bank.set("pcr10", "sha256", value)
        self.ima.extend(new)

    def bundle(self) -> EvidenceBundle:
        regs = [f"pcr{i}" for i in range(17)]
        values = [self.bank.get(r, "sha256") for r in regs]
        quote = Quote.new(
            extra_data=tpm_qualifying_data(NONCE, b"", "sha256"),
            pcr_selection=[PCRSelection.of("sha256", regs)],
            pcr_digest=hashlib.sha256(b"".join(values)).digest(),
            reset_count=1,
        )
        sig = Signature.ecdsa_from_der(
            "sha256", self.key.sign(quote.raw, ec.ECDSA(hashes.SHA256())), 32
        )
        return EvidenceBundle(
            platform="tpm",
            report=TPMQuoteReport(
                attest=quote.raw,
                signature=sig.to_bytes(),
                ak_pem=self.ak_pem,
                hash_algorithm="sha256",
                pcrs=tuple(
                    RegisterValue(r, "sha256", v) for r, v in zip(regs, values, strict=True)
                ),
            ),
            nonce=NONCE,
            user_data=b"",
            scope="node",
            binding=NONCE,
            runtime_register="pcr13",
            runtime_algorithm="sha256",
            runtime_start=bytes(32),
            runtime_log=tuple(ev.to_cel() for ev in self.runtime),
            boot_log=tuple(self.boot),
            ima_log=tuple(self.ima),
            created="2025-01-01T00:00:00.000000Z",
            agent_version="bench",
        )


def _row(name: str, entries: int, seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "entries": entries,
        "seconds": seconds,
        "entries_per_s": entries / seconds if seconds > 0 else 0.0,
        "ms": round(seconds * 1000, 3),
        **extra,
    }


def run(
    entries: int = DEFAULT_ENTRIES, repeat: int = 3, rounds: int = DEFAULT_ROUNDS
) -> list[dict[str, Any]]:
    node = Node()
    node.grow(entries)
    bundle = node.bundle()
    # Reference values that know every file, including those still to come.
    future = Node()
    future.key, future.ak_pem = node.key, node.ak_pem
    future.grow(entries + STEP * rounds)
    refs: ReferenceValues = create_references([future.bundle()])
    rows: list[dict[str, Any]] = []
    gc.collect()
    t0 = time.perf_counter()
    refs.compiled()  # a verifier keeps its reference values decoded: once, not per bundle
    rows.append(_row("references compile", entries + STEP * rounds, time.perf_counter() - t0))

    best = float("inf")
    result = None
    for _ in range(max(1, repeat)):
        gc.collect()
        t0 = time.perf_counter()
        result = appraise(bundle, refs, nonce=NONCE)
        best = min(best, time.perf_counter() - t0)
    assert result is not None and result.affirming, [f.describe() for f in result.failures][:5]
    rows.append(
        _row(
            "appraise full",
            entries,
            best,
            target_ms=1000,
            status=result.status,
            replay_ms=round(result.timings["replay"] * 1000, 1),
            appraise_ms=round(result.timings["appraise"] * 1000, 1),
        )
    )

    text = bundle.to_json()
    gc.collect()
    t0 = time.perf_counter()
    EvidenceBundle.from_json(text)
    rows.append(
        _row("bundle decode", entries, time.perf_counter() - t0, json_mb=round(len(text) / 1e6, 1))
    )

    state = result.state
    times: list[float] = []
    for _ in range(rounds):
        node.grow(STEP)
        b = node.bundle()
        gc.collect()
        t0 = time.perf_counter()
        r = appraise(b, refs, nonce=NONCE, state=state)
        times.append(time.perf_counter() - t0)
        assert r.affirming and r.mode == "incremental", (r.status, r.mode_reason)
        state = r.state
    median = statistics.median(times)
    rows.append(
        _row(
            "appraise incremental",
            STEP,
            median,
            target_ms=20,
            rounds=rounds,
            max_ms=round(max(times) * 1000, 3),
            log_entries=len(node.ima),
        )
    )

    if UEFI_LOG.is_file():
        rows.append(_keylime(repeat))
    return rows


def _keylime(repeat: int) -> dict[str, Any]:
    from tests.verifier.evidence_sets import keylime

    vb = keylime()
    refs = create_references([vb.bundle])
    refs.compiled()
    best = float("inf")
    for _ in range(max(3, repeat)):
        t0 = time.perf_counter()
        result = appraise(vb.bundle, refs, **vb.appraise_kwargs())
        best = min(best, time.perf_counter() - t0)
    assert result.affirming
    return _row("appraise keylime vector", 780, best)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=DEFAULT_ENTRIES)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = run(args.entries, args.repeat, args.rounds)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            extra = {
                k: v
                for k, v in r.items()
                if k not in ("name", "entries", "seconds", "entries_per_s")
            }
            print(
                f"{r['name']:26} {r['entries']:>8,} entries {r['seconds'] * 1000:10.1f} ms "
                f"{r['entries_per_s']:>12,.0f} entries/s  {extra}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
