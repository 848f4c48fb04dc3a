"""Software-platform nodes that make real evidence bundles, for the service's tests and benchmarks.

A :class:`SoftwareNode` is a :class:`~cima.platform.software.SoftwarePlatform`
(registers and a P-256 key in memory; quotes in the TPM format) holding a real
machine's measurements, extended into its sha256 and sha384 banks as the
firmware, the kernel and the agent would:

- boot: the TCG log of a Google Compute Engine Ubuntu 21.04 VM
  (``../shared/vectors/tcg/tpm2-tools/event-gce-ubuntu-2104-log.bin``, 112
  events; it has no StartupLocality event, so registers that start at zero
  replay it exactly);
- IMA: the first entries of a real ``ima-ng`` list
  (``../shared/vectors/ima/rust-keylime/ascii_runtime_measurements``, 826
  entries), more of them with each :meth:`SoftwareNode.measure_ima` (the list
  grows between attestations, as on a running node);
- runtime: agent events (the agent, its policy, system processes) in ``pcr13``.

:meth:`SoftwareNode.bundle` makes the :class:`~cima.evidence.bundle.EvidenceBundle`
the agent gives a node-scope caller: a quote over every sha256 PCR binding
``nonce || user_data``, with the three logs as CEL records.
:class:`FastBundler` makes the same bundles for many nonces quickly (the logs
encoded once), for load generation.

The software platform proves nothing about a machine (its key is in memory);
these nodes stand in for an agent so that the service is tested on real
logs, real quotes and real appraisal.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

import cima
from cima.agent.events import NODE, RuntimeEvent
from cima.digests import by_name
from cima.eventlog import cel, formats, ima
from cima.eventlog.cel import IMA_TEMPLATE, CELRecord
from cima.evidence.bundle import EvidenceBundle, TPMQuoteReport, node_binding, utc_now
from cima.platform.software import SoftwarePlatform
from cima.registers import RegisterValue
from tests.vectors import path

BOOT_LOG = path("tcg", "tpm2-tools/event-gce-ubuntu-2104-log.bin")
IMA_LOG = path("ima", "rust-keylime/ascii_runtime_measurements")
RUNTIME_REGISTER = "pcr13"
RUNTIME_ALGORITHM = "sha256"
QUOTE_BANK = "sha256"
BANKS = ("sha256", "sha384")


def boot_records() -> tuple[CELRecord, ...]:
    """The GCE boot log as CEL records."""
    log = formats.load(BOOT_LOG.read_bytes(), "auto", source=str(BOOT_LOG))
    return tuple(cel.from_measurements(log.events))


def ima_records() -> tuple[CELRecord, ...]:
    """The rust-keylime IMA list as CEL records (numbered by their place in the list)."""
    entries = ima.parse_ascii(IMA_LOG.read_bytes(), source=str(IMA_LOG)).entries
    return tuple(
        CELRecord(
            n,
            e.register,
            ((e.template_hash_algorithm, e.template_hash),),
            IMA_TEMPLATE,
            {"template_name": e.template_name, "template_data": e.template_data},
        )
        for n, e in enumerate(entries)
    )


class SoftwareNode:
    """A node on the software platform with real boot and IMA logs and agent events."""

    def __init__(
        self,
        *,
        ima_entries: int = 100,
        processes: Sequence[str] = ("/usr/bin/containerd", "/usr/bin/kubelet"),
    ) -> None:
        self.platform = SoftwarePlatform(algorithms=BANKS, key_type="ecc")
        self.boot = boot_records()
        for record in self.boot:
            self._extend(record)
        self._ima_all = ima_records()
        self.ima: list[CELRecord] = []
        self.measure_ima(ima_entries)
        self.runtime: list[RuntimeEvent] = []
        self.add_event("agent", "cima-agent", {"name": "cima", "version": cima.__version__})
        for p in processes:
            self.add_event("process", p, {"exe": p, "cmdline": [p]})

    def _extend(self, record: Any) -> None:
        if not record.extends:
            return
        for algorithm in BANKS:
            digest = record.replay_digest(algorithm)
            if digest is not None:
                self.platform.extend(record.register, algorithm, digest)

    def measure_ima(self, count: int) -> None:
        """Measure the next ``count`` entries of the IMA list (as the kernel appends them)."""
        start = len(self.ima)
        new = self._ima_all[start : start + count]
        if len(new) < count:
            raise ValueError(f"the IMA list has {len(self._ima_all)} entries")
        for record in new:
            self._extend(record)
        self.ima.extend(new)

    def add_event(self, kind: str, subject: str, data: dict[str, Any]) -> RuntimeEvent:
        """Measure one agent event (node scope) into the runtime register."""
        event = RuntimeEvent.create(
            len(self.runtime),
            RUNTIME_REGISTER,
            RUNTIME_ALGORITHM,
            kind=kind,
            scope=NODE,
            subject=subject,
            data=data,
        )
        self.platform.extend(RUNTIME_REGISTER, RUNTIME_ALGORITHM, event.digest)
        self.runtime.append(event)
        return event

    def bundle(self, nonce: bytes, user_data: bytes = b"") -> EvidenceBundle:
        """Evidence for ``nonce`` as the agent gives it to a node-scope caller."""
        binding = node_binding(nonce, user_data)
        report = self.platform.report(nonce, user_data, algorithms=[QUOTE_BANK])
        v = report.verification
        return EvidenceBundle(
            platform="software",
            report=TPMQuoteReport(
                attest=report.body,
                signature=report.signature,
                ak_pem=str(v["ak_pem"]),
                hash_algorithm=str(v["hash_algorithm"]),
                pcrs=tuple(
                    RegisterValue(p["register"], p["algorithm"], bytes.fromhex(p["digest"]))
                    for p in v["pcrs"]
                ),
            ),
            nonce=bytes(nonce),
            user_data=bytes(user_data),
            scope=NODE,
            binding=binding,
            runtime_register=RUNTIME_REGISTER,
            runtime_algorithm=RUNTIME_ALGORITHM,
            runtime_start=by_name(RUNTIME_ALGORITHM).zero,
            runtime_log=tuple(e.to_cel() for e in self.runtime),
            boot_log=self.boot,
            ima_log=tuple(self.ima),
            created=utc_now(),
            agent_version=cima.__version__,
        )

    def bundle_json(self, nonce: bytes, user_data: bytes = b"") -> bytes:
        return self.bundle(nonce, user_data).to_json().encode()


class FastBundler:
    """A node's bundles for many nonces quickly: the logs are encoded once, the quote is new.

    The bundles are those :meth:`SoftwareNode.bundle` gives (nothing measured in
    between): the JSON is made once with markers where the nonce, the binding,
    the time and the quote go, and each bundle joins the pieces around new values.
    """

    _FIELDS = ("nonce", "binding", "created", "attest", "signature")

    def __init__(self, node: SoftwareNode) -> None:
        self.node = node
        doc = node.bundle(b"\x00" * 32).to_dict()
        marks = {f: f"@@{f}@@" for f in self._FIELDS}
        doc["nonce"], doc["binding"], doc["created"] = (
            marks["nonce"],
            marks["binding"],
            marks["created"],
        )
        doc["report"] = {**doc["report"], "attest": marks["attest"]}
        doc["report"]["signature"] = marks["signature"]
        text = json.dumps(doc, separators=(",", ":")).encode()
        self._pieces: list[bytes | str] = []
        rest = text
        while rest:
            cut = min(
                ((rest.find(m.encode()), f) for f, m in marks.items() if m.encode() in rest),
                default=None,
            )
            if cut is None:
                self._pieces.append(rest)
                break
            at, field = cut
            self._pieces.extend((rest[:at], field))
            rest = rest[at + len(marks[field]) :]

    def bundle_json(self, nonce: bytes) -> bytes:
        report = self.node.platform.report(nonce, b"", algorithms=[QUOTE_BANK])
        values = {
            "nonce": nonce.hex().encode(),
            "binding": nonce.hex().encode(),
            "created": utc_now().encode(),
            "attest": base64.b64encode(report.body),
            "signature": base64.b64encode(report.signature),
        }
        return b"".join(values[p] if isinstance(p, str) else p for p in self._pieces)
