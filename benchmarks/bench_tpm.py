"""TPM quote verification speed on one core, and quotes per second from swtpm.

Verification: a quote over 24 sha256 PCRs, signed with an ECC P-256 (ECDSA/SHA-256)
or RSA-2048 (RSASSA/SHA-256) key, goes through all four steps of
:func:`cima.evidence.tpm.verify_quote` (parse, signature, nonce binding, pcrDigest
from the PCR values) with the AK given as PEM bytes every call, as a verifier
service receives it. The real keylime quote from the vectors is measured too.

swtpm (optional, skipped when swtpm or tpm2-pytss is missing): a manufactured TPM
on a temporary state, :meth:`cima.platform.tpm.TPMPlatform.report` in a loop (PCR
reads of the 24 quoted PCRs + TPM2_Quote) with an ECC and an RSA AK.

Usage: ``python benchmarks/bench_tpm.py [--entries N] [--repeat K] [--json]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "src"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa  # noqa: E402

from cima.evidence.reportdata import tpm_qualifying_data  # noqa: E402
from cima.evidence.tpm import (  # noqa: E402
    PCRSelection,
    PCRValues,
    Quote,
    Signature,
    pcr_digest,
    verify_quote,
)
from cima.registers import PCR_NAMES, RegisterBank  # noqa: E402

DEFAULT_ENTRIES = 5000
DEFAULT_QUOTES = 200
VECTORS = ROOT.parent / "shared" / "vectors" / "tpm-quote" / "keylime-perf-tests"


def _best(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _signed_quote(kind: str) -> tuple[bytes, bytes, bytes, RegisterBank, bytes]:
    """A quote over pcr0..pcr23 (sha256) signed by a fresh key of ``kind``."""
    bank = RegisterBank()
    for i, reg in enumerate(PCR_NAMES):
        bank.set(reg, "sha256", hashlib.sha256(bytes([i])).digest())
    selection = [PCRSelection.of("sha256", PCR_NAMES)]
    nonce = b"benchmark nonce 0123456789abcdef"
    quote = Quote.new(
        extra_data=tpm_qualifying_data(nonce, b"", "sha256"),
        pcr_selection=selection,
        pcr_digest=pcr_digest(selection, bank, "sha256"),
        clock=123456,
    )
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if kind == "ecc":
        key = ec.generate_private_key(ec.SECP256R1())
        sig = Signature.ecdsa_from_der("sha256", key.sign(quote.raw, ec.ECDSA(hashes.SHA256())), 32)
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        sig = Signature.rsassa("sha256", key.sign(quote.raw, padding.PKCS1v15(), hashes.SHA256()))
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return quote.raw, sig.to_bytes(), pem, bank, nonce


def _verify_rows(entries: int, repeat: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for kind, label in (("ecc", "ECC P-256 ECDSA"), ("rsa", "RSA-2048 RSASSA")):
        attest, sig, pem, bank, nonce = _signed_quote(kind)
        verify_quote(attest, sig, pem, nonce=nonce, pcr_values=bank)  # warm the key cache

        def loop(
            attest: bytes = attest, sig: bytes = sig, pem: bytes = pem, bank: RegisterBank = bank,
            nonce: bytes = nonce,
        ) -> None:  # fmt: skip
            for _ in range(entries):
                verify_quote(attest, sig, pem, nonce=nonce, pcr_values=bank)

        secs = _best(loop, repeat)
        rows.append(
            {
                "name": f"tpm verify_quote {label}, 24 PCRs, nonce (all 4 steps)",
                "entries": entries,
                "seconds": secs,
                "entries_per_s": entries / secs,
            }
        )
    if VECTORS.is_dir():
        attest = (VECTORS / "attest.bin").read_bytes()
        sig = (VECTORS / "signature.tpmt.bin").read_bytes()
        pem = (VECTORS / "ak.pem").read_bytes()
        qd = (VECTORS / "qualifying_data.bin").read_bytes()
        values = PCRValues.from_bytes((VECTORS / "pcrs.tpm2tools.bin").read_bytes()).to_bank()

        def vector_loop() -> None:
            for _ in range(entries):
                verify_quote(attest, sig, pem, qualifying_data=qd, pcr_values=values)

        secs = _best(vector_loop, repeat)
        rows.append(
            {
                "name": "tpm verify_quote keylime vector (RSA-2048, 17 PCRs)",
                "entries": entries,
                "seconds": secs,
                "entries_per_s": entries / secs,
            }
        )
    return rows


def _swtpm_rows(quotes: int, repeat: int) -> list[dict[str, Any]]:
    try:
        import tpm2_pytss  # noqa: F401
        from tests.platform.swtpm import SWTPM, available

        from cima.platform.tpm import TPMPlatform
    except ImportError as e:
        return [{"name": f"tpm swtpm quotes: skipped ({e})"}]
    reason = available()
    if reason:
        return [{"name": f"tpm swtpm quotes: skipped ({reason})"}]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cima-bench-tpm-") as tmp:
        t0 = time.perf_counter()
        manufactured = SWTPM.manufacture(Path(tmp) / "manufactured")
        rows.append({"name": "tpm swtpm_setup (manufacture)", "seconds": time.perf_counter() - t0})
        with SWTPM(manufactured, Path(tmp) / "server") as server:
            for kind, handle in (("ecc", 0x81010002), ("rsa", 0x81010003)):
                with TPMPlatform(server.tcti, ak_type=kind, ak_handle=handle) as p:
                    t0 = time.perf_counter()
                    p.ak_pem()
                    rows.append(
                        {
                            "name": f"tpm swtpm AK creation ({kind}, EK + policy sessions)",
                            "seconds": time.perf_counter() - t0,
                        }
                    )

                    def loop(p: Any = p) -> None:
                        for i in range(quotes):
                            p.report(i.to_bytes(4, "big"))

                    secs = _best(loop, repeat)
                    rows.append(
                        {
                            "name": f"tpm swtpm report ({kind} AK, PCR_Read x24 + Quote)",
                            "entries": quotes,
                            "seconds": secs,
                            "entries_per_s": quotes / secs,
                        }
                    )
    return rows


def run(*, entries: int | None = None, repeat: int = 3, swtpm: bool = True) -> list[dict[str, Any]]:
    """Run the TPM benchmark; one dict per measurement."""
    n = DEFAULT_ENTRIES if entries is None else entries
    rows = _verify_rows(n, repeat)
    if swtpm:
        rows += _swtpm_rows(max(1, min(n, DEFAULT_QUOTES)), repeat)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=DEFAULT_ENTRIES)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-swtpm", action="store_true", help="skip the swtpm part")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = run(entries=args.entries, repeat=args.repeat, swtpm=not args.no_swtpm)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
