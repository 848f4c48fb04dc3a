"""``cima platform info|measurement|eventlog|report``: the TPM, TDX or software platform."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from cima.cli._util import UsageError, add_json_flag, emit_json, hex_arg, out
from cima.digests import by_name
from cima.errors import AlgorithmError, CimaError, RegisterError
from cima.eventlog import cel
from cima.platform.base import Platform, PlatformPaths, Report
from cima.registers import check_name

REPORT_JSON = "report.json"


def default_state_dir() -> Path:
    """Where the software platform keeps its registers and key between runs."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cima" / "software-platform"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("platform", help="read this machine's registers, logs and signed reports")
    s = p.add_subparsers(dest="platform_command", metavar="SUBCOMMAND")
    s.required = True

    def common(c: argparse.ArgumentParser) -> None:
        c.add_argument("--platform", choices=("auto", "tpm", "tdx", "software"), default="auto")
        c.add_argument(
            "--tcti",
            metavar="TCTI",
            help="TPM connection (swtpm:port=P); default: $TPM2TOOLS_TCTI, else /dev/tpmrm0",
        )
        c.add_argument(
            "--state-dir",
            metavar="DIR",
            help=f"software platform state (default {default_state_dir()})",
        )
        c.add_argument(
            "--securityfs",
            metavar="DIR",
            default="/sys/kernel/security",
            help="where securityfs is mounted (a container may mount the host's elsewhere)",
        )
        add_json_flag(c)

    info = s.add_parser("info", help="what the platform is")
    common(info)
    info.set_defaults(handler=cmd_info)

    m = s.add_parser("measurement", help="read registers")
    common(m)
    m.add_argument("--register", metavar="NAME", help="one register (default: all)")
    m.add_argument("--algorithm", metavar="ALG", help="one bank (default: every bank)")
    m.set_defaults(handler=cmd_measurement)

    e = s.add_parser("eventlog", help="the boot event log and the IMA log, as CEL")
    common(e)
    e.set_defaults(handler=cmd_eventlog)

    r = s.add_parser("report", help="a signed report bound to a nonce and user data")
    common(r)
    r.add_argument("--nonce", type=hex_arg, required=True, metavar="HEX")
    r.add_argument("--user-data", type=hex_arg, default=b"", metavar="HEX")
    r.add_argument("--register", action="append", metavar="NAME", help="TPM: quote these PCRs")
    r.add_argument(
        "--algorithm",
        action="append",
        metavar="ALG",
        help="TPM: quote this bank (repeatable; default: the platform's default bank)",
    )
    r.add_argument("-o", "--output", required=True, metavar="DIR", help="write the report here")
    r.set_defaults(handler=cmd_report)


def open_platform(args: argparse.Namespace) -> Platform:
    from cima.platform.detect import detect

    paths = PlatformPaths(securityfs=Path(args.securityfs))
    state = args.state_dir
    if args.platform == "software" and state is None:
        state = default_state_dir()
    return detect(paths, tcti=args.tcti, prefer=args.platform, state_dir=state)


def cmd_info(args: argparse.Namespace) -> int:
    with open_platform(args) as platform:
        info = platform.info()
    if args.json:
        emit_json(info)
        return 0
    table = Table(title=f"platform: {info.get('platform', '?')}", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for k, v in info.items():
        table.add_row(str(k), v if isinstance(v, str) else json.dumps(v))
    out.print(table)
    return 0


def cmd_measurement(args: argparse.Namespace) -> int:
    try:
        algs = [by_name(args.algorithm).name] if args.algorithm else None
        regs = [check_name(args.register)] if args.register else None
    except (AlgorithmError, RegisterError) as e:
        raise UsageError(str(e)) from None
    with open_platform(args) as platform:
        algs = algs or platform.algorithms()
        regs = regs or platform.register_names()
        values = [
            {"register": reg, "algorithm": alg, "digest": platform.read(reg, alg).hex()}
            for alg in algs
            for reg in regs
        ]
        name = platform.name
    if args.json:
        emit_json({"platform": name, "registers": values})
        return 0
    table = Table(title=f"{name} registers")
    for col in ("register", "bank", "value"):
        table.add_column(col, overflow="fold")
    for v in values:
        table.add_row(v["register"], v["algorithm"], v["digest"])
    out.print(table)
    return 0


def cmd_eventlog(args: argparse.Namespace) -> int:
    from cima.platform.ima import IMAReader

    with open_platform(args) as platform:
        boot = platform.boot_log()
    paths = PlatformPaths(securityfs=Path(args.securityfs))
    ima_entries: list[Any] = []
    ima_note = None
    if paths.ima_binary.exists():
        try:
            with IMAReader(paths.ima_binary) as reader:
                ima_entries = list(reader.read_new())
        except CimaError as e:
            ima_note = str(e)
    else:
        ima_note = f"{paths.ima_binary}: not present"
    records = cel.from_measurements([*(boot or []), *ima_entries])
    if args.json:
        emit_json([r.to_dict() for r in records])
        return 0
    out.print(
        f"boot log: {len(boot) if boot is not None else 'none'} events; "
        f"IMA: {len(ima_entries)} entries" + (f" ({ima_note})" if ima_note else "")
    )
    table = Table()
    for col in ("#", "register", "content", "digest"):
        table.add_column(col, overflow="fold")
    for r in records:
        label = str(r.content.get("template_name") or r.event_type)
        table.add_row(
            str(r.recnum), r.register, label, r.digests[0][1].hex()[:32] if r.digests else ""
        )
    out.print(table)
    return 0


def write_report(report: Report, platform: str, folder: Path) -> dict[str, Any]:
    """Write a report and what verifies it into ``folder``; return the metadata."""
    from cima.evidence import tpm

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    meta: dict[str, Any] = {
        "kind": report.kind,
        "platform": platform,
        "nonce": report.nonce.hex(),
        "user_data": report.user_data.hex(),
    }
    if report.kind == "tpm-quote":
        (folder / "attest.bin").write_bytes(report.body)
        (folder / "signature.bin").write_bytes(report.signature)
        (folder / "ak.pem").write_text(report.verification["ak_pem"])
        files.update(quote="attest.bin", signature="signature.bin", ak="ak.pem")
        quote = tpm.Quote.from_bytes(report.body)
        bank = {
            (v["register"], v["algorithm"]): bytes.fromhex(v["digest"])
            for v in report.verification.get("pcrs", [])
        }
        (folder / "pcrs.bin").write_bytes(
            tpm.PCRValues.from_values(quote.pcr_selection, bank).to_bytes()
        )
        files["pcrs"] = "pcrs.bin"
        if report.verification.get("ek_certificate_pem"):
            (folder / "ek.pem").write_text(report.verification["ek_certificate_pem"])
            files["ek_certificate"] = "ek.pem"
        meta["hash_algorithm"] = report.verification.get("hash_algorithm")
        meta["qualifying_data"] = quote.extra_data.hex()
        meta["pcrs"] = report.verification.get("pcrs", [])
    else:
        (folder / "quote.bin").write_bytes(report.body)
        files["quote"] = "quote.bin"
    meta["files"] = files
    (folder / REPORT_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def cmd_report(args: argparse.Namespace) -> int:
    regs = None
    if args.register:
        try:
            regs = [check_name(r) for r in args.register]
        except RegisterError as e:
            raise UsageError(str(e)) from None
    algs = None
    if args.algorithm:
        try:
            algs = [by_name(a).name for a in args.algorithm]
        except AlgorithmError as e:
            raise UsageError(f"--algorithm: {e}") from None
    with open_platform(args) as platform:
        if algs is None:
            report = platform.report(args.nonce, args.user_data, regs)
        elif platform.name == "tdx":
            raise UsageError("--algorithm: a TDX quote has one bank (sha384)")
        else:
            report = platform.report(args.nonce, args.user_data, regs, algorithms=algs)  # type: ignore[call-arg]
        name = platform.name
    folder = Path(args.output)
    meta = write_report(report, name, folder)
    verify = f"cima quote verify {folder} --nonce {args.nonce.hex()}"
    if args.user_data:
        verify += f" --user-data {args.user_data.hex()}"
    meta["verify_with"] = verify
    if args.json:
        emit_json({"output": str(folder), **meta})
    else:
        out.print(f"{report.kind} from the {name} platform written to {folder}/")
        for key, fname in meta["files"].items():
            out.print(f"  {key}: {folder / fname}", highlight=False)
        out.print(f"verify with: {verify}", highlight=False)
    return 0
