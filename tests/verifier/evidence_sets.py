"""Evidence bundles built from the real vectors in ../shared/vectors, and synthetic ones.

The vectors are matched sets from real machines, not bundles: these helpers
put each set into an :class:`~cima.evidence.bundle.EvidenceBundle` the way the
agent would, and say how its freshness is to be checked (``report_data``).

- ``keylime``: tpm-quote/keylime-perf-tests (TPMS_ATTEST, TPMT_SIGNATURE, the
  AK, the quoted sha256 PCRs 0-16, the UEFI log) with
  ima/keylime-perf-tests/ima_log.txt. The quote's extraData is the ASCII
  base64 of the 15-byte nonce (keylime's convention), so freshness is checked
  against qualifying_data.bin, as ``tpm2_checkquote -q`` does.
- ``cos113``: ccel/go-tdx-guest (the COS 113 TD's CCEL and its quote);
  REPORTDATA is nonce.dat itself (raw binding, 64 zero bytes).
- ``evidence_api``: tdx-quote/evidence-api/quote.bin with
  ccel/evidence-api (CCEL and an ascii IMA list in RTMR2). Its PCK chain ends
  in Intel's pre-production SGX root, which is trusted only because the
  reference values list it (``tdx.trusted_roots``); no challenge is recorded
  for it, so the quote's own REPORTDATA is the expected report data.
- :func:`synthetic_bundle`: a software-platform bundle (a TPM-format quote
  signed by a P-256 key made in the test) with a boot log, an IMA list of any
  size and runtime journal events, for what the vectors lack.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cima.agent.events import RuntimeEvent
from cima.digests import by_name
from cima.eventlog import ccel, cel, ima, tcg
from cima.eventlog.cel import IMA_TEMPLATE, PCCLIENT_STD, CELRecord
from cima.evidence.batch import MerkleTree
from cima.evidence.bundle import (
    EvidenceBundle,
    TDXQuoteReport,
    TPMQuoteReport,
    container_register,
)
from cima.evidence.reportdata import SCOPED_BINDING_TAG, container_binding, tpm_qualifying_data
from cima.evidence.tpm import PCRSelection, PCRValues, Quote, Signature
from cima.registers import RegisterBank, RegisterValue
from tests.vectors import path

CREATED = "2025-01-01T00:00:00.000000Z"


@dataclass(frozen=True)
class VectorBundle:
    """A bundle and how its freshness is checked."""

    name: str
    bundle: EvidenceBundle
    report_data: bytes | None = None
    nonce: bytes | None = None
    trusted_roots: tuple[str, ...] = ()

    def appraise_kwargs(self) -> dict[str, Any]:
        return {"report_data": self.report_data, "nonce": self.nonce}


def _ima_records(
    entries: Sequence[ima.IMAEntry], register: str | None = None
) -> tuple[CELRecord, ...]:
    return tuple(
        CELRecord(
            n,
            register or e.register,
            ((e.template_hash_algorithm, e.template_hash),),
            IMA_TEMPLATE,
            {"template_name": e.template_name, "template_data": e.template_data},
        )
        for n, e in enumerate(entries)
    )


def keylime() -> VectorBundle:
    d = "keylime-perf-tests/"
    attest = path("tpm-quote", d + "attest.bin").read_bytes()
    pcrs = PCRValues.from_bytes(path("tpm-quote", d + "pcrs.tpm2tools.bin").read_bytes())
    boot = tcg.parse(path("tpm-quote", d + "uefi_log.bin").read_bytes())
    log = ima.parse_ascii(path("ima", d + "ima_log.txt").read_bytes())
    nonce = path("tpm-quote", d + "nonce.bin").read_bytes()
    report = TPMQuoteReport(
        attest=attest,
        signature=path("tpm-quote", d + "signature.tpmt.bin").read_bytes(),
        ak_pem=path("tpm-quote", d + "ak.pem").read_text(),
        hash_algorithm="sha256",
        pcrs=tuple(pcrs.items()),
    )
    bundle = EvidenceBundle(
        platform="tpm",
        report=report,
        nonce=nonce,
        user_data=b"",
        scope="node",
        binding=nonce,
        runtime_register="pcr13",
        runtime_algorithm="sha256",
        runtime_start=bytes(32),
        runtime_log=(),
        boot_log=tuple(cel.from_measurements(boot.events)),
        ima_log=_ima_records(log.entries),
        created=CREATED,
        agent_version="vector",
    )
    qd = path("tpm-quote", d + "qualifying_data.bin").read_bytes()
    return VectorBundle("keylime", bundle, report_data=qd)


def cos113() -> VectorBundle:
    d = "go-tdx-guest/"
    quote = path("ccel", d + "cos-113-tdx-quote.dat").read_bytes()
    log = ccel.parse(path("ccel", d + "ccel_data.dat").read_bytes())
    nonce = path("ccel", d + "nonce.dat").read_bytes()
    bundle = EvidenceBundle(
        platform="tdx",
        report=TDXQuoteReport(quote),
        nonce=nonce,
        user_data=b"",
        scope="node",
        binding=nonce,
        runtime_register="rtmr3",
        runtime_algorithm="sha384",
        runtime_start=bytes(48),
        runtime_log=(),
        boot_log=tuple(cel.from_measurements(log.events)),
        ima_log=None,
        created=CREATED,
        agent_version="vector",
    )
    return VectorBundle("cos113", bundle, report_data=nonce, nonce=nonce)


def evidence_api() -> VectorBundle:
    from cima.evidence.tdx import TDXQuote

    quote = path("tdx-quote", "evidence-api/quote.bin").read_bytes()
    log = ccel.parse(path("ccel", "evidence-api/ccel_data.bin").read_bytes())
    ilog = ima.parse_ascii(path("ccel", "evidence-api/ima_log.bin").read_bytes())
    decoded = TDXQuote.from_bytes(quote)
    root = decoded.signature_data.pem_certificates()[-1]
    bundle = EvidenceBundle(
        platform="tdx",
        report=TDXQuoteReport(quote),
        nonce=b"",
        user_data=b"",
        scope="node",
        binding=b"",
        runtime_register="rtmr3",
        runtime_algorithm="sha384",
        runtime_start=bytes(48),
        runtime_log=(),
        boot_log=tuple(cel.from_measurements(log.events)),
        # IMR 2 of the CC Trusted API = rtmr2
        ima_log=_ima_records(ilog.entries, register="rtmr2"),
        created=CREATED,
        agent_version="vector",
    )
    return VectorBundle(
        "evidence-api", bundle, report_data=decoded.report_data, trusted_roots=(root,)
    )


# -- synthetic bundles -------------------------------------------------------------------------


def _boot_log() -> list[CELRecord]:
    """A small crypto-agile boot log (sha256) as firmware, shim and GRUB write one."""
    header = (
        b"Spec ID Event03\x00"
        + (1).to_bytes(4, "little")  # platform class
        + bytes([0, 2, 0, 2])  # version 2.0, errata 0, UINTN size 2
        + (1).to_bytes(4, "little")  # one algorithm
        + (0x000B).to_bytes(2, "little")  # sha256
        + (32).to_bytes(2, "little")
        + b"\x00"  # no vendor info
    )
    events: list[tuple[str, int, bytes, bytes | None]] = [
        ("pcr0", 0x08, b"Firmware 1.0\x00", None),  # EV_S_CRTM_VERSION
        ("pcr0", 0x80000008, bytes(16), b"firmware volume"),  # EV_EFI_PLATFORM_FIRMWARE_BLOB
        ("pcr7", 0x80000001, b"SecureBoot=1", None),  # EV_EFI_VARIABLE_DRIVER_CONFIG
        ("pcr1", 0x80000002, b"BootOrder", None),  # EV_EFI_VARIABLE_BOOT
        ("pcr4", 0x80000007, b"Calling EFI Application from Boot Option", None),
        *((f"pcr{i}", 0x04, bytes(4), None) for i in range(8)),  # EV_SEPARATOR
        ("pcr4", 0x80000003, bytes(32), b"shim image"),  # EV_EFI_BOOT_SERVICES_APPLICATION
        ("pcr4", 0x80000003, bytes(32), b"grub image"),
        ("pcr8", 0x0D, b"grub_cmd: linux /vmlinuz-6.1 root=/dev/sda1 ro\x00", None),  # EV_IPL
        ("pcr9", 0x0D, b"/vmlinuz-6.1\x00", b"kernel image"),
        ("pcr8", 0x0D, b"kernel_cmdline: /vmlinuz-6.1 root=/dev/sda1 ro\x00", None),
        ("pcr8", 0x0D, b"grub_cmd: initrd /initrd.img-6.1\x00", None),
        ("pcr9", 0x0D, b"/initrd.img-6.1\x00", b"initrd image"),
        ("pcr5", 0x80000007, b"Exit Boot Services Invocation", None),
    ]
    out = [
        CELRecord(
            0, "pcr0", (("sha1", bytes(20)),), PCCLIENT_STD, {"event_type": 3, "event_data": header}
        )
    ]
    for k, (reg, et, data, measured) in enumerate(events, start=1):
        digest = hashlib.sha256(data if measured is None else measured).digest()
        out.append(
            CELRecord(
                k, reg, (("sha256", digest),), PCCLIENT_STD, {"event_type": et, "event_data": data}
            )
        )
    return out


def ima_ng_entry(
    index: int, name: bytes, digest: bytes, alg: str = "sha256", sig: bytes | None = None
) -> CELRecord:
    dfield = alg.encode() + b":\x00" + digest
    nfield = name + b"\x00"
    fields = [dfield, nfield] if sig is None else [dfield, nfield, sig]
    data = b"".join(len(f).to_bytes(4, "little") + f for f in fields)
    th = hashlib.sha1(data).digest()
    tname = "ima-ng" if sig is None else "ima-sig"
    return CELRecord(
        index,
        "pcr10",
        (("sha1", th),),
        IMA_TEMPLATE,
        {"template_name": tname, "template_data": data},
    )


def ima_template_entry(index: int, template: str, fields: list[bytes]) -> CELRecord:
    """An IMA entry of any template from its fields' bytes (each framed by its length)."""
    data = b"".join(len(f).to_bytes(4, "little") + f for f in fields)
    return CELRecord(
        index,
        "pcr10",
        (("sha1", hashlib.sha1(data).digest()),),
        IMA_TEMPLATE,
        {"template_name": template, "template_data": data},
    )


def ima_entries(count: int, start: int = 0) -> list[CELRecord]:
    return [
        ima_ng_entry(
            start + k,
            f"/usr/lib/file-{start + k}".encode(),
            hashlib.sha256(b"%d" % (start + k)).digest(),
        )
        for k in range(count)
    ]


def runtime_events(register: str = "pcr13", algorithm: str = "sha256") -> list[RuntimeEvent]:
    alg = by_name(algorithm).name
    specs = [
        (
            "agent",
            "node",
            "cima",
            {
                "name": "cima",
                "version": "0.1.0",
                "files": 3,
                "code_digest": f"{alg}:" + "11" * by_name(alg).digest_size,
            },
        ),
        (
            "policy",
            "node",
            "/etc/cima/policy.yaml",
            {
                "source": "/etc/cima/policy.yaml",
                "file_digest": f"{alg}:" + "22" * by_name(alg).digest_size,
                "policy_digest": f"{alg}:" + "33" * by_name(alg).digest_size,
            },
        ),
        (
            "process",
            "node",
            "/usr/bin/containerd",
            {
                "pid": 100,
                "exe": "/usr/bin/containerd",
                "exe_digest": f"{alg}:" + "44" * by_name(alg).digest_size,
                "cmdline": ["/usr/bin/containerd"],
            },
        ),
        (
            "pod",
            "node",
            "kube-system/kube-apiserver-node1",
            {"name": "kube-apiserver-node1", "namespace": "kube-system", "uid": "pod-1"},
        ),
        (
            "container",
            "container:" + "ab" * 32,
            "ab" * 32,
            {
                "name": "web",
                "pod_uid": "pod-1",
                "image": "docker.io/library/nginx:1.27",
                "image_id": "sha256:" + "55" * 32,
            },
        ),
    ]
    return [
        RuntimeEvent.create(n, register, alg, kind=k, scope=s, subject=subj, data=d)
        for n, (k, s, subj, d) in enumerate(specs)
    ]


@dataclass
class SoftwareNode:
    """A node with a software signing key that makes bundles like the agent's."""

    key: ec.EllipticCurvePrivateKey
    reset_count: int = 1
    restart_count: int = 0

    @classmethod
    def new(cls) -> SoftwareNode:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @property
    def ak_pem(self) -> str:
        return (
            self.key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def bundle(
        self,
        *,
        boot: Sequence[CELRecord],
        ima_log: Sequence[CELRecord] | None,
        runtime: Sequence[RuntimeEvent] = (),
        nonce: bytes = b"n" * 16,
        user_data: bytes = b"",
        quote_ima: int | None = None,
        runtime_register: str = "pcr13",
        scope: str = "node",
        batch_with: Sequence[bytes] = (),
    ) -> EvidenceBundle:
        """Sign a quote over pcr0-16 (sha256) of what the logs replay to.

        ``quote_ima`` quotes the IMA register after that many entries (the log runs
        ahead); ``scope`` a container scope binds the container's register;
        ``batch_with`` other requests' bindings batched with this one into one quote.
        """
        bank = RegisterBank()
        from cima.eventlog.replay import Replayer

        r = Replayer(algorithms=("sha256",), bank=bank)
        r.feed_all(boot)
        entries = list(ima_log or ())
        for e in entries[: len(entries) if quote_ima is None else quote_ima]:
            r.feed(e)
        for ev in runtime:
            bank.extend(runtime_register, "sha256", ev.digest)
        regs = [f"pcr{i}" for i in range(17)]
        values = {(reg, "sha256"): bank.get(reg, "sha256") for reg in regs}
        sel = PCRSelection.of("sha256", regs)
        digest = hashlib.sha256(b"".join(values[(reg, "sha256")] for reg in regs)).digest()
        container_reg = None
        if scope == "node":
            binding = nonce + user_data
        else:
            container_reg = container_register(runtime, scope, "sha256")
            binding = container_binding(container_reg, nonce, user_data, "sha256")
        proof = None
        # The agent's convention: a node request binds its nonce and user data; a
        # container request or a batch binds its binding or root with the scoped tag.
        report_nonce, report_user_data = (
            (nonce, user_data) if scope == "node" else (binding, SCOPED_BINDING_TAG)
        )
        if batch_with:
            tree = MerkleTree([*batch_with, binding], "sha256")
            proof = tree.proof(len(batch_with))
            report_nonce, report_user_data = tree.root, SCOPED_BINDING_TAG
        quote = Quote.new(
            extra_data=tpm_qualifying_data(report_nonce, report_user_data, "sha256"),
            pcr_selection=[sel],
            pcr_digest=digest,
            reset_count=self.reset_count,
            restart_count=self.restart_count,
        )
        der = self.key.sign(quote.raw, ec.ECDSA(hashes.SHA256()))
        sig = Signature.ecdsa_from_der("sha256", der, 32)
        report = TPMQuoteReport(
            attest=quote.raw,
            signature=sig.to_bytes(),
            ak_pem=self.ak_pem,
            hash_algorithm="sha256",
            pcrs=tuple(RegisterValue(reg, "sha256", values[(reg, "sha256")]) for reg in regs),
        )
        return EvidenceBundle(
            platform="software",
            report=report,
            nonce=nonce,
            user_data=user_data,
            scope=scope,
            binding=binding,
            runtime_register=runtime_register,
            runtime_algorithm="sha256",
            runtime_start=bytes(32),
            runtime_log=tuple(ev.to_cel() for ev in runtime),
            boot_log=tuple(boot),
            ima_log=None if ima_log is None else tuple(ima_log),
            container_register=container_reg,
            batch=proof,
            batch_root=None if proof is None else report_nonce,
            created=CREATED,
            agent_version="test",
        )


def synthetic_boot() -> list[CELRecord]:
    return _boot_log()


def with_logs(bundle: EvidenceBundle, **logs: Any) -> EvidenceBundle:
    return replace(bundle, **logs)
