"""The whole chain on this machine: platform, agent, client, verifier, result.

Run by ``cima demo`` (see :mod:`cima.cli.demo`). Everything it starts (swtpm,
containerd, the agent) lives in one work directory and is stopped at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from cima.cli._util import err, out
from cima.errors import CimaError, PlatformError

CONTAINERD = Path("/usr/bin/containerd")
AGENT_START_TIMEOUT = 60.0
MEASURE_TIMEOUT = 30.0


@dataclass
class _Service:
    """A real system process the default policy measures: containerd with its own state."""

    base: Path
    proc: subprocess.Popen[bytes] | None = None
    args: list[str] = field(default_factory=list)

    def start(self, *extra: str) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        config = self.base / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.base}/root"\n'
            f'state = "{self.base}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.base}/containerd.sock"\n'
            "[ttrpc]\n"
            f'  address = "{self.base}/containerd.sock.ttrpc"\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{self.base}/opt"\n'
        )
        self.args = [str(CONTAINERD), "--config", str(config), *extra]
        log = (self.base / "containerd.log").open("ab")
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + 10
        while not (self.base / "containerd.sock").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise PlatformError(f"containerd did not start: see {self.base / 'containerd.log'}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@contextlib.contextmanager
def _platform(kind: str, work: Path) -> Iterator[tuple[str, list[str], Any]]:
    """Yield the platform's name, the agent's arguments to reach it, and for swtpm its
    manufactured state (whose local CA signed the EK certificate)."""
    from cima.platform import swtpm

    reason = swtpm.available()
    if kind == "tpm" and reason:
        raise PlatformError(f"--platform tpm: {reason}")
    if kind == "software" or (kind == "auto" and reason):
        if reason:
            err.print(f"[yellow]swtpm cannot run here ({reason}): using the software platform[/]")
        yield "software", ["--platform", "software", "--state-dir", str(work / "software")], None
        return
    manufactured = swtpm.SWTPM.manufacture(work / "swtpm-manufactured")
    with swtpm.SWTPM(manufactured, work / "swtpm") as server:
        yield "tpm (swtpm)", ["--platform", "tpm", "--tcti", server.tcti], manufactured


def _enroll(client: Any, manufactured: Any) -> tuple[bytes, str]:
    """Trust the agent's AK through the TPM's EK certificate, as the verifier service's
    enrollment does: the chain up to the manufacturer's root (here swtpm's local CA), the
    public areas, and a credential for the AK's name that only this TPM can activate."""
    import hmac

    from cryptography import x509

    from cima.evidence.credential import (
        check_ak_public,
        check_ek_certificate,
        check_ek_public,
        make_credential,
    )

    e = client.get_enrollment()
    if not e.ek_certificate:
        raise PlatformError("the TPM has no EK certificate to enroll its AK with")
    cert = x509.load_der_x509_certificate(e.ek_certificate)
    root = x509.load_pem_x509_certificate(manufactured.root_ca_pem.read_bytes())
    issuer = x509.load_pem_x509_certificate(manufactured.issuer_ca_pem.read_bytes())
    check_ek_certificate(cert, [root], [issuer])
    check_ek_public(e.ek, cert)
    check_ak_public(e.ak)
    secret = os.urandom(32)
    blob, encrypted = make_credential(e.ek, e.ak_name, secret)
    if not hmac.compare_digest(client.activate_credential(blob, encrypted), secret):
        raise PlatformError("the TPM activated the credential to another secret")
    subject = cert.issuer.rfc4514_string()
    return e.ak_name, f"enrolled by EK certificate (issued by {subject})"


@contextlib.contextmanager
def _agent(work: Path, platform_args: list[str]) -> Iterator[Path]:
    from cima.agent.policy import DEFAULT_POLICY_TEXT

    policy = work / "policy.yaml"
    policy.write_text(DEFAULT_POLICY_TEXT)
    socket_path = work / "run" / "cima.sock"
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    log_path = work / "agent.log"
    cmd = [
        sys.executable, "-m", "cima.cli.main", "agent",
        "--policy", str(policy),
        *platform_args,
        "--socket", str(socket_path),
        "--journal", str(work / "journal"),
        "--interval", "0.2",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    try:
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        while not socket_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise PlatformError(f"the agent did not start: see {log_path}")
            time.sleep(0.05)
        yield socket_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _wait_measured(client: Any, args: list[str]) -> None:
    """Wait until the agent has journaled the process with exactly this command line."""
    deadline = time.monotonic() + MEASURE_TIMEOUT
    while time.monotonic() < deadline:
        for r in client.get_eventlog("runtime"):
            data = r.content.get("data") or {}
            if r.content.get("kind") == "process" and data.get("cmdline") == args:
                return
        time.sleep(0.1)
    raise PlatformError(f"the agent did not measure {' '.join(args)} in {MEASURE_TIMEOUT} s")


def _step(quiet: bool, text: str) -> None:
    if not quiet:
        out.print(f"\n[bold]{escape(text)}[/]")


def _summary(result: Any) -> dict[str, Any]:
    evidence = result.submods.get("evidence")
    return {
        "status": result.status,
        "attestation_key": None if evidence is None else evidence.details.get("attestation_key"),
        "submods": {name: s.status for name, s in result.submods.items()},
        "failures": [
            {"submodule": f.submodule, "step": f.step, "reason": f.reason}
            for f in result.failures
            if f.severity == "contraindicated"
        ],
    }


def run(*, platform: str = "auto", keep: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run the chain; return what happened (``ok`` when both verdicts are the expected ones)."""
    if keep:
        work = Path(keep).resolve()
        work.mkdir(parents=True, exist_ok=True)
        return _run(work, platform, quiet)
    with tempfile.TemporaryDirectory(prefix="cima-demo-") as tmp:
        return _run(Path(tmp), platform, quiet)


def _run(work: Path, platform: str, quiet: bool) -> dict[str, Any]:
    from cima.cli.verify import show
    from cima.client import CimaClient
    from cima.verifier.appraise import appraise
    from cima.verifier.reference import ReferenceValues, create_references

    report: dict[str, Any] = {"ok": False, "work": str(work)}
    if not CONTAINERD.exists() or shutil.which("containerd") is None:
        report["error"] = f"{CONTAINERD} is not installed (Debian package containerd)"
        err.print(f"[red]{report['error']}[/]")
        return report
    service = _Service(work / "containerd")
    try:
        with _platform(platform, work) as (name, platform_args, manufactured):
            report["platform"] = name
            _step(quiet, f"platform: {name}; system service: containerd; agent: default policy")
            service.start()
            with _agent(work, platform_args) as socket_path, CimaClient(str(socket_path)) as c:
                _wait_measured(c, service.args)

                _step(quiet, "run 1: evidence with a fresh nonce -> reference values")
                nonce = os.urandom(32)
                first = c.get_evidence(nonce)
                refs = create_references([first], name="demo node, run 1")
                enrolled: dict[bytes, str] | None = None
                if manufactured is not None:
                    _step(
                        quiet,
                        "enrollment: the attestation key is trusted through the TPM's EK "
                        "certificate (credential activation), not listed in the references",
                    )
                    ak_name, how = _enroll(c, manufactured)
                    enrolled = {ak_name: how}
                    doc = refs.to_dict()
                    doc["trusted_keys"] = []
                    refs = ReferenceValues.model_validate(doc)
                    report["enrolled"] = {"ak_name": ak_name.hex(), "how": how}
                    if not quiet:
                        out.print(f"AK {ak_name.hex()}: {how}")
                (work / "references.yaml").write_text(refs.to_yaml())
                if not quiet:
                    out.print(f"reference values written to {work / 'references.yaml'}")

                _step(quiet, "run 2: new nonce, appraised against run 1's reference values")
                nonce = os.urandom(32)
                second = appraise(c.get_evidence(nonce), refs, nonce=nonce, enrolled_keys=enrolled)
                if not quiet:
                    show(second)

                _step(quiet, "containerd restarted with another command line (--log-level debug)")
                service.stop()
                service.start("--log-level", "debug")
                _wait_measured(c, service.args)

                _step(quiet, "run 3: new nonce, appraised against the same reference values")
                nonce = os.urandom(32)
                third = appraise(c.get_evidence(nonce), refs, nonce=nonce, enrolled_keys=enrolled)
                if not quiet:
                    show(third)
        report["run2"] = _summary(second)
        report["run3"] = _summary(third)
        report["ok"] = second.status == "affirming" and third.status == "contraindicated"
        if not quiet:
            verdict = "[green]as expected[/]" if report["ok"] else "[red]NOT as expected[/]"
            out.print(
                f"\nrun 2: {second.status}; after the change, run 3: {third.status} ({verdict})"
            )
            for f in report["run3"]["failures"][:5]:
                out.print(f"  reason ({f['submodule']}): {escape(f['reason'])}")
    except CimaError as e:
        report["error"] = str(e)
        err.print(f"[red]demo failed: {escape(str(e))}[/]")
    finally:
        service.stop()
    return report
