"""``make demo-vm``: attest a real kernel in a virtual machine, for a person to watch.

Builds the guest (or takes it from the cache), provisions a TPM and registers its
attestation key, then boots twice: a reference boot, and a boot in which one measured file
(``/payload/bin/hello``) has other content. For each boot it prints a tree: the quote (AK,
nonce, signature), every register of every bank with the value each source computed (cima,
tpm2-tools, ima-evm-utils, a hashlib replay), and at the end what differs between the two
boots, named by event.

In each boot cima's agent then runs in the guest (a service, a crun container and the
agent itself measured into pcr13, IMA as its backend, the TPM as its platform) and the host
asks it for an evidence bundle with a fresh nonce. Reference values are made from the
reference boot's bundle (:func:`cima.verifier.reference.create_references`, reviewed as
:func:`tests.vm.agent.reviewed_references` says), the changed boot's bundle is appraised
against them and its appraisal tree printed: contraindicated, the changed file named; then
again once the new version of the file is approved: affirming.

Exit status 0 when every source agreed, the only difference is the changed file, and the
verifier names it and nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.tree import Tree

from cima.cli.verify import show
from cima.verifier.appraise import appraise
from cima.verifier.reference import create_references
from cima.verifier.result import AttestationResult
from tests.platform.swtpm import SWTPM
from tests.vm import build, checks
from tests.vm.agent import reviewed_references, run_agent
from tests.vm.evidence import BANKS, BootEvidence, collect
from tests.vm.guest import BootConfig, VirtualMachine, provision_tpm

HELLO = "bin/hello"
PAYLOADS = {
    "reference boot": "#!/bin/sh\necho hello from the payload, version 1\n",
    "changed boot": "#!/bin/sh\necho hello from the payload, version 2\n",
}
PAYLOAD_CONTENT = {name: text.encode() for name, text in PAYLOADS.items()}


def _boot(
    console: Console,
    images: build.GuestImages,
    tpm_state: Path,
    state_disk: Path,
    work: Path,
    name: str,
    hello: str,
) -> BootEvidence:
    folder = work / name.replace(" ", "-")
    tree = folder / "payload"
    (tree / "bin").mkdir(parents=True)
    (tree / HELLO).write_text(hello)
    (tree / HELLO).chmod(0o755)
    payload = build.payload_image(tree, folder / "payload.ext4")
    config = BootConfig()
    with console.status(f"{name}: booting (OVMF, swtpm, IMA; about 15 s under TCG)"):
        vm = VirtualMachine(images, tpm_state, folder / "vm", config, payload, state=state_disk)
        with vm:
            session = vm.start()
            console.log(f"{name}: guest ready in {vm.boot_seconds:.1f} s ({session.cmdline})")
            with console.status(f"{name}: collecting the logs and a quote"):
                ev = collect(
                    session,
                    folder / "evidence",
                    name=name,
                    config=config,
                    payload_commands=[[f"/payload/{HELLO}"]],
                )
            with console.status(f"{name}: cima agent in the guest (about 15 s to start)"):
                ev.agent = run_agent(session, folder / "agent", name=name)
    console.log(f"{name}: evidence in {ev.folder}")
    bundle = ev.agent.bundle
    console.log(
        f"{name}: the agent served {len(bundle.runtime_log)} runtime events, "
        f"{len(bundle.ima_log or ())} IMA entries and {len(bundle.boot_log or ())} boot events "
        f"with a quote bound to nonce {ev.agent.nonce.hex()[:16]}…"
    )
    return ev


def _tree(ev: BootEvidence, result: checks.BootChecks, ak_pem: str) -> Tree:
    ok = not result.failures()
    root = Tree(
        f"[bold]{ev.name}[/]: " + ("[green]every source agrees[/]" if ok else "[red]DISAGREE[/]")
    )
    quote = root.add("quote")
    registered = (ev.quote_dir / "ak.pem").read_text() == ak_pem
    quote.add(f"signed by the registered AK: {'[green]yes[/]' if registered else '[red]no[/]'}")
    quote.add(f"nonce {ev.nonce.hex()[:16]}… bound ({result.quote['freshness']})")
    quote.add("tpm2_checkquote: [green]verified[/]")
    logs = root.add("logs")
    logs.add(f"boot log: {len(ev.boot_log)} events -> pcr0-pcr9")
    logs.add(
        f"IMA: {result.ima_entries} entries, the first {result.ima_prefix} match the quote "
        f"(evmctl: {result.evmctl}); tpm2_eventlog: {result.tpm2_eventlog_note}"
    )
    for alg in BANKS:
        bank = root.add(f"bank {alg}")
        for r in (r for r in result.registers if r.algorithm == alg):
            mark = "[green]✓[/]" if r.agreed else "[red]✗[/]"
            sources = ", ".join(name for name, v in r.sources.items() if v is not None)
            bank.add(f"{mark} {r.register:5} {r.quoted[:24]}…  ({sources})")
    return root


def _differences(a: BootEvidence, b: BootEvidence) -> tuple[Tree, bool]:
    root = Tree(f"[bold]{b.name}[/] against [bold]{a.name}[/]")
    boot_diff = [
        x.index
        for x, y in zip(a.boot_log.events, b.boot_log.events, strict=False)
        if any(x.replay_digest(alg) != y.replay_digest(alg) for alg in BANKS)
    ]
    root.add(f"boot log: {'identical' if not boot_diff else f'events {boot_diff} differ'}")
    first = {e.file_name: e for e in a.ima_log.entries}
    changed = []
    for e in b.ima_log.entries:
        old = first.get(e.file_name)
        if old is not None and old.file_digest != e.file_digest:
            changed.append(e)
            root.add(
                f"[yellow]IMA entry {e.index}[/] {e.file_name}: "
                f"{(old.file_digest or b'').hex()[:16]}… -> {(e.file_digest or b'').hex()[:16]}…"
            )
    quoted = sorted(
        {r for (r, alg) in a.quoted if a.quoted[(r, alg)] != b.quoted[(r, alg)]},
        key=lambda r: int(r[3:]),
    )
    root.add(f"quoted registers that differ: {', '.join(quoted) or 'none'}")
    expected = not boot_diff and [e.file_name for e in changed] == [f"/payload/{HELLO}"]
    return root, expected


def _appraisals(console: Console, reference: BootEvidence, changed: BootEvidence) -> bool:
    """Appraise the changed boot's bundle against the reference boot's values, print the
    trees; True when the changed file, and only it, is contraindicated, and approving its
    new content makes the boot affirming."""
    assert reference.agent is not None and changed.agent is not None
    created = create_references(
        [reference.agent.bundle], name=reference.name, sources=[reference.name]
    )
    refs = reviewed_references(created)
    (reference.folder / "references.yaml").write_text(refs.to_yaml())
    hello = f"/payload/{HELLO}"
    a = changed.agent
    console.rule(f"{changed.name} appraised against the {reference.name}'s reference values")
    result = appraise(a.bundle, refs, nonce=a.nonce)
    show(result)
    named = _only_file(result, hello)
    approved = reviewed_references(created, approve={hello: PAYLOAD_CONTENT[changed.name]})
    console.rule(f"{changed.name} appraised once a person approves the new {hello}")
    again = appraise(a.bundle, approved, nonce=a.nonce)
    show(again)
    return named and again.affirming


def _only_file(result: AttestationResult, path: str) -> bool:
    return (
        result.status == "contraindicated"
        and len(result.failures) == 1
        and result.failures[0].subject == path
        and result.failures[0].log == "ima"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vm.demo", description=__doc__)
    parser.add_argument("--workdir", type=Path, help="keep the evidence here (default: temp)")
    args = parser.parse_args(argv)
    console = Console(stderr=False)
    reason = build.available()
    if reason:
        console.print(f"[red]cannot run the virtual machine demo:[/] {reason}")
        return 2
    with tempfile.TemporaryDirectory(prefix="cima-demo-vm-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        with console.status("building the guest (cached after the first run)"):
            images = build.build(log=console.log)
        console.log(
            f"guest image ready in {time.monotonic() - t:.1f} s "
            f"({'built' if images.built else 'from the cache'}: {build.cache_dir()})"
        )
        manufactured = SWTPM.manufacture(work / "tpm-manufactured")
        tpm = provision_tpm(manufactured, work / "tpm")
        console.log("TPM manufactured (sha1, sha256, sha384 banks), attestation key registered")
        state_disk = build.state_image(work / "state.ext4")
        evidence = []
        all_ok = True
        for name, hello in PAYLOADS.items():
            ev = _boot(console, images, tpm.state, state_disk, work, name, hello)
            result = checks.check_boot(ev)
            all_ok &= not result.failures() and (ev.quote_dir / "ak.pem").read_text() == tpm.ak_pem
            console.print(_tree(ev, result, tpm.ak_pem))
            evidence.append(ev)
        diff, expected = _differences(*evidence)
        console.print(diff)
        appraised = _appraisals(console, *evidence)
        if args.workdir is None:
            console.log("evidence removed (use --workdir DIR to keep it)")
    ok = all_ok and expected and appraised
    console.print(
        "[bold green]attested: logs replay to the quotes, the verifier names the change[/]"
        if ok
        else "[bold red]the demo found a disagreement[/]"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
