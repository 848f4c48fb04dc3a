"""TDX quote verification speed: cima's offline verification against the ECDSA floor.

The quote is the production v4 quote in ../shared/vectors/tdx-quote (go-tdx-guest
tdx_prod_quote_SPR_E4.dat, PCK chain to the Intel SGX Root CA). Measured:

- the floor: one ECDSA P-256 verification with ``cryptography`` (key already loaded);
  a warm verification needs two (quote signature, QE report signature), a cold one
  four (plus the PCK leaf and the Platform CA certificate signatures);
- decoding alone: :meth:`cima.evidence.tdx.TDXQuote.from_bytes`;
- warm: decode + :func:`cima.evidence.tdx.verify`, the PCK chain and attestation key
  cached from an earlier verification of the same platform (floor: 2 signatures);
- new platform: a quote from another platform (its own PCK leaf and attestation key)
  whose CA certificates (Platform CA, root) are cached from an earlier quote, as in a
  verifier serving a fleet (floor: 3 signatures, the leaf's certificate being new);
- cold: every cache cleared before each quote (floor: 4 signatures).

Usage: ``python benchmarks/bench_tdx.py [--quotes N] [--repeat K] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature  # noqa: E402

from cima.evidence.tdx import TDXQuote, clear_caches, verify  # noqa: E402

DEFAULT_QUOTES = 2000
VECTORS = ROOT.parent / "shared" / "vectors"
QUOTE = VECTORS / "tdx-quote" / "go-tdx-guest" / "tdx_prod_quote_SPR_E4.dat"
# Another production platform under the same Intel SGX PCK Platform CA.
OTHER_PLATFORM = VECTORS / "tdx-quote" / "trustee" / "tdx_quote_4.dat"
# Inside the validity of every certificate of that quote's chain (leaf: 2022-09-20..2029-09-20).
NOW = datetime(2026, 6, 1, tzinfo=UTC)


def _best(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _row(name: str, n: int, secs: float, floor_per_s: float | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "entries": n, "seconds": secs, "entries_per_s": n / secs}
    if floor_per_s is not None:
        row["ratio_to_floor"] = floor_per_s / (n / secs)
    return row


def run(*, quotes: int | None = None, repeat: int = 3) -> list[dict[str, Any]]:
    """Run the TDX benchmark; one dict per measurement."""
    if not QUOTE.is_file():
        return [{"name": f"tdx: skipped (no vector at {QUOTE})"}]
    n = DEFAULT_QUOTES if quotes is None else quotes
    n_cold = max(1, n // 4)
    data = QUOTE.read_bytes()
    quote = TDXQuote.from_bytes(data)
    sd = quote.signature_data
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + sd.attestation_key)
    sig = encode_dss_signature(
        int.from_bytes(sd.signature[:32], "big"), int.from_bytes(sd.signature[32:], "big")
    )
    algo = ec.ECDSA(hashes.SHA256())
    signed = quote.signed_bytes

    def floor() -> None:
        for _ in range(n):
            key.verify(sig, signed, algo)

    def decode() -> None:
        for _ in range(n):
            TDXQuote.from_bytes(data)

    def warm() -> None:
        for _ in range(n):
            verify(TDXQuote.from_bytes(data), now=NOW)

    other = OTHER_PLATFORM.read_bytes()

    def new_platform() -> float:
        spent = 0.0
        for _ in range(n_cold):
            clear_caches()
            verify(quote, now=NOW)
            t0 = time.perf_counter()
            verify(TDXQuote.from_bytes(other), now=NOW)
            spent += time.perf_counter() - t0
        return spent

    def cold() -> None:
        for _ in range(n_cold):
            clear_caches()
            verify(TDXQuote.from_bytes(data), now=NOW)

    floor_s = _best(floor, repeat)
    one = n / floor_s
    rows = [_row("tdx ECDSA P-256 verify (floor, 1 signature)", n, floor_s)]
    rows.append(_row("tdx TDXQuote.from_bytes", n, _best(decode, repeat)))
    verify(quote, now=NOW)
    rows.append(
        _row("tdx from_bytes + verify, warm (floor: 2 signatures)", n, _best(warm, repeat), one / 2)
    )
    rows.append(
        _row(
            "tdx from_bytes + verify, new platform (floor: 3 signatures)",
            n_cold,
            min(new_platform() for _ in range(max(1, repeat))),
            one / 3,
        )
    )
    rows.append(
        _row(
            "tdx from_bytes + verify, cold (floor: 4 signatures)",
            n_cold,
            _best(cold, repeat),
            one / 4,
        )
    )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quotes", type=int, default=DEFAULT_QUOTES)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = run(quotes=args.quotes, repeat=args.repeat)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
