"""``cima quote show|verify``: decode and verify a TPM quote or a TDX quote (detected)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from rich.table import Table

from cima.cli._util import UsageError, add_json_flag, emit_json, hex_arg, out, read_input
from cima.errors import CimaError, FreshnessError, ParseError, ReplayMismatchError, SignatureError
from cima.evidence import tdx, tpm

REPORT_JSON = "report.json"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("quote", help="decode and verify TPM and TDX quotes")
    s = p.add_subparsers(dest="quote_command", metavar="SUBCOMMAND")
    s.required = True

    show = s.add_parser("show", help="decode a quote (TPMS_ATTEST or TDX quote, detected)")
    show.add_argument(
        "file", metavar="FILE", help="the quote, or a directory from 'platform report'"
    )
    add_json_flag(show)
    show.set_defaults(handler=cmd_show)

    v = s.add_parser(
        "verify",
        help="verify a quote's signature, freshness and register values",
        description="Exit 0 verified, 1 failed (the step is named), 2 bad input.",
    )
    v.add_argument("file", metavar="FILE", help="the quote, or a directory from 'platform report'")
    v.add_argument(
        "--ak", metavar="PEM", help="TPM: the attestation key (PEM or DER SPKI, or TPM2B_PUBLIC)"
    )
    v.add_argument("--signature", metavar="FILE", help="TPM: the TPMT_SIGNATURE")
    v.add_argument("--pcrs", metavar="FILE", help="TPM: quoted PCR values (tpm2_quote -o format)")
    v.add_argument("--nonce", type=hex_arg, metavar="HEX", help="the nonce the quote must bind")
    v.add_argument(
        "--user-data",
        type=hex_arg,
        metavar="HEX",
        default=None,
        help="user data bound with the nonce",
    )
    v.add_argument(
        "--qualifying-data",
        type=hex_arg,
        metavar="HEX",
        help="TPM: the exact extraData expected (as tpm2_checkquote -q)",
    )
    v.add_argument(
        "--binding",
        choices=("hash", "raw"),
        default="hash",
        help="TDX: REPORTDATA = SHA-512(nonce || user data) (hash) or the bytes themselves (raw)",
    )
    v.add_argument(
        "--trusted-root", metavar="PEM", help="TDX: trust this root CA instead of Intel's"
    )
    v.add_argument(
        "--crl", metavar="FILE", action="append", default=[], help="TDX: a CRL (PEM or DER)"
    )
    v.add_argument("--at", metavar="ISO-TIME", help="TDX: check certificate validity at this time")
    add_json_flag(v)
    v.set_defaults(handler=cmd_verify)


@dataclass
class _Inputs:
    """A quote and what verifies it, from files or a report directory."""

    quote: bytes
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None

    def sibling(self, key: str) -> Path | None:
        name = self.meta.get("files", {}).get(key)
        if self.folder is None or not isinstance(name, str) or not name:
            return None
        return Path(self.folder / name)


def _inputs(path: str) -> _Inputs:
    p = Path(path)
    if p.is_dir():
        meta_file = p / REPORT_JSON
        if not meta_file.exists():
            raise UsageError(
                f"{path}: a directory needs the {REPORT_JSON} that 'platform report' writes"
            )
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{meta_file}: not JSON: {e}") from e
        name = meta.get("files", {}).get("quote")
        if not isinstance(name, str):
            raise UsageError(f"{meta_file}: 'files.quote' is missing")
        return _Inputs(read_input(str(p / name)), str(p / name), meta, p)
    return _Inputs(read_input(path), path)


def _kind(data: bytes, source: str) -> str:
    if tdx.looks_like(data):
        return "tdx-quote"
    if tpm.looks_like(data):
        return "tpm-quote"
    raise ParseError(
        "not a TPM quote (TPMS_ATTEST) or a TDX quote (v4/v5)", offset=0, source=source
    )


def cmd_show(args: argparse.Namespace) -> int:
    inp = _inputs(args.file)
    kind = _kind(inp.quote, inp.source)
    doc: dict[str, Any]
    try:
        if kind == "tdx-quote":
            doc = tdx.TDXQuote.from_bytes(inp.quote).to_dict()
        else:
            doc = tpm.Quote.from_bytes(inp.quote).to_dict()
    except ParseError as e:
        raise e.with_source(inp.source) from None
    doc = {"kind": kind, **doc}
    if args.json:
        emit_json(doc)
        return 0
    table = Table(title=f"{inp.source}: {kind}", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for key, value in _flatten(doc):
        table.add_row(key, value)
    out.print(table)
    return 0


def _flatten(doc: Any, prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            rows.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(doc, list) and doc and all(isinstance(x, dict | list) for x in doc):
        for i, v in enumerate(doc):
            rows.extend(_flatten(v, f"{prefix}[{i}]"))
    else:
        rows.append((prefix, json.dumps(doc) if isinstance(doc, list) else str(doc)))
    return rows


def cmd_verify(args: argparse.Namespace) -> int:
    inp = _inputs(args.file)
    kind = _kind(inp.quote, inp.source)
    nonce = args.nonce
    user_data = args.user_data
    if user_data is not None and nonce is None:
        raise UsageError("--user-data needs --nonce")
    try:
        if kind == "tpm-quote":
            result = _verify_tpm(args, inp, nonce, user_data)
        else:
            result = _verify_tdx(args, inp, nonce, user_data)
    except ParseError as e:
        raise e.with_source(e.source or inp.source) from None
    except (SignatureError, FreshnessError, ReplayMismatchError) as e:
        step = getattr(e, "step_name", None) or getattr(e, "step", None) or type(e).__name__
        if args.json:
            emit_json({"kind": kind, "verified": False, "step": str(step), "error": str(e)})
        else:
            out.print(f"[red]NOT VERIFIED[/] at step {step}: {e}", markup=True, highlight=False)
        return 1
    if args.json:
        emit_json({"kind": kind, "verified": True, **result})
    else:
        out.print(f"[green]verified[/] {kind}: {inp.source}")
        for k, v in result.items():
            if isinstance(v, str | int | bool):
                out.print(f"  {k}: {v}", highlight=False)
    return 0


def _verify_tpm(
    args: argparse.Namespace, inp: _Inputs, nonce: bytes | None, user_data: bytes | None
) -> dict[str, Any]:
    sig_path = args.signature or inp.sibling("signature")
    ak_path = args.ak or inp.sibling("ak")
    if sig_path is None:
        raise UsageError("a TPM quote needs --signature FILE (the TPMT_SIGNATURE)")
    if ak_path is None:
        raise UsageError("a TPM quote needs --ak PEM (the attestation key)")
    signature = read_input(str(sig_path))
    ak = read_input(str(ak_path))
    ak_key: Any = ak
    if not ak.lstrip().startswith(b"-----"):
        try:
            ak_key = tpm.PublicArea.from_bytes(ak)
        except ParseError:
            ak_key = ak  # DER SubjectPublicKeyInfo
    pcr_values = None
    pcrs_path = args.pcrs or inp.sibling("pcrs")
    if pcrs_path is not None:
        try:
            pcr_values = tpm.PCRValues.from_bytes(read_input(str(pcrs_path))).to_bank()
        except ParseError as e:
            raise e.with_source(str(pcrs_path)) from None
    skip = nonce is None and args.qualifying_data is None
    v = tpm.verify_quote(
        inp.quote,
        signature,
        ak_key,
        pcr_values=pcr_values,
        nonce=nonce,
        user_data=user_data if user_data is not None else (b"" if nonce is not None else None),
        qualifying_data=args.qualifying_data,
        skip_freshness=skip,
    )
    doc = v.to_dict()
    return {
        "freshness": doc["freshness"],
        "hash_algorithm": doc["hash_algorithm"],
        "pcrs_checked": v.pcrs_checked,
        "quote": doc["quote"],
        "pcrs": doc["pcrs"],
    }


def _load_pem_or_der_cert(data: bytes, source: str) -> x509.Certificate:
    try:
        if data.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise ParseError(f"not an X.509 certificate: {e}", source=source) from e


def _load_crl(data: bytes, source: str) -> x509.CertificateRevocationList:
    try:
        if data.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as e:
        raise ParseError(f"not a CRL: {e}", source=source) from e


def _verify_tdx(
    args: argparse.Namespace, inp: _Inputs, nonce: bytes | None, user_data: bytes | None
) -> dict[str, Any]:
    root = None
    if args.trusted_root:
        root = _load_pem_or_der_cert(read_input(args.trusted_root), args.trusted_root)
    crls = [_load_crl(read_input(c), c) for c in args.crl]
    now = None
    if args.at:
        try:
            now = datetime.fromisoformat(args.at)
        except ValueError:
            raise UsageError(f"--at: not an ISO 8601 time: {args.at!r}") from None
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
    quote = tdx.TDXQuote.from_bytes(inp.quote)
    v = tdx.verify(
        quote,
        trusted_root=root,
        now=now,
        crls=crls,
        nonce=nonce,
        user_data=user_data if user_data is not None else b"",
        binding=args.binding,
    )
    return v.to_dict()


__all__ = ["CimaError", "register"]
