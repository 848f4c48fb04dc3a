"""Reference values: what a known-good node measures, and the keys trusted to vouch for it.

A reference file is YAML (version 1). Every section is optional; a section that
is absent leaves its submodule unappraised (status ``none``)::

    version: 1
    name: known-good workers, January
    trusted_keys:                     # attestation keys trusted by registration
      - name: node-1
        public_key: |                 # the AK's SubjectPublicKeyInfo (PEM) ...
          -----BEGIN PUBLIC KEY-----
          ...
        tpm_name: 000b64ec...         # ... and/or its TPM name (standard AK template)
    tdx:                              # TD identity, checked against the quote
      trusted_roots: []               # PCK chain roots besides the Intel SGX Root CA (PEM)
      allow_debug: false
      mrseam: [<hex>]                 # each list: the allowed values (absent: not checked)
      td_attributes: [<hex>]
      xfam: [<hex>]
      mrconfigid: [<hex>]
      mrowner: [<hex>]
      mrownerconfig: [<hex>]
    boot:                             # known-good boots, each a whole boot log
      - name: boot 1
        registers:                    # what the boot log replays to (or the quote holds)
          pcr0: {sha256: <hex>}
        events:                       # the boot log, record by record, in order
          - register: pcr0
            type: EV_S_CRTM_VERSION
            digests: {sha256: <hex>, sha384: <hex>}
            data: sha256:<hex>         # digest of the event data
            note: A55 v1.62            # what the data says (informational)
    kernel:
      images: [sha256:<hex>]          # kernel image digests as the boot log records them
      cmdlines: ["/vmlinuz-6.8.0 root=/dev/sda1 ro"]
      initrds: [sha256:<hex>]
      load_options: [sha256:<hex>]    # the EFI stub's tagged LoadOptions (the command line)
    ima:
      files:                          # path -> allowed digests (several allowed per path)
        /usr/bin/bash: [sha256:<hex>]
      keys: []                        # file-signing keys (X.509 or public key PEM)
      exclude: []                     # path patterns (fnmatch) not appraised
      unknown: contraindicated        # a file with no entry and no trusted signature
      violations: warning             # measurement violations (ToMToU, open writers)
    system:
      processes:
        /usr/bin/containerd:
          exe_digests: [sha384:<hex>]
          cmdlines: [["/usr/bin/containerd"]]   # absent: any command line
      unknown: contraindicated
    kubernetes:
      pods:
        kube-apiserver: {namespace: kube-system}
      unknown: contraindicated
    containers:
      images: [sha256:<hex>]
      unknown: contraindicated
    agent:
      code_digests: [sha384:<hex>]
      policy_digests: [sha384:<hex>]

Digests are written ``algorithm:hex``. Unknown keys, wrong types and bad hex are
errors (:class:`ReferenceFileError`) that name the key path and its line.

:func:`create_references` makes a reference file from known-good evidence
bundles; :func:`load_references` reads one; :meth:`ReferenceValues.to_yaml`
writes one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from cima.digests import by_name
from cima.errors import AlgorithmError, ParseError, RegisterError, describe_type
from cima.eventlog.uefi import EventType, event_type_name
from cima.registers import check_name, sort_key

if TYPE_CHECKING:
    from cryptography import x509

    from cima.evidence.bundle import EvidenceBundle
    from cima.verifier.imasig import KeyRing

__all__ = [
    "REFERENCE_VERSION",
    "BootConfig",
    "BootEventRef",
    "CompiledReferences",
    "ReferenceFileError",
    "ReferenceValues",
    "create_references",
    "load_references",
    "parse_digest",
]

REFERENCE_VERSION = 1

#: Digest sizes of the algorithms a reference may name (IMA allows more than a TPM bank).
DIGEST_SIZES: Mapping[str, int] = {
    "md5": 16,
    "sha1": 20,
    "sha224": 28,
    "sha256": 32,
    "sha384": 48,
    "sha512": 64,
    "sm3_256": 32,
    "sha3_256": 32,
    "sha3_384": 48,
    "sha3_512": 64,
    "streebog256": 32,
    "streebog512": 64,
}
_ALIASES = {"sha-1": "sha1", "sha-256": "sha256", "sha-384": "sha384", "sha-512": "sha512"}
_ALIASES["sm3"] = "sm3_256"
_HEX = re.compile(r"[0-9a-fA-F]*")

TDX_FIELDS = (
    "mrseam",
    "mrsignerseam",
    "td_attributes",
    "xfam",
    "mrconfigid",
    "mrowner",
    "mrownerconfig",
)


class ReferenceFileError(ParseError):
    """An invalid reference file; ``key`` is the key path (``ima.files./usr/bin/x[0]``)."""

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        line: int | None = None,
        source: str | None = None,
    ) -> None:
        self.key = key
        self.message = message
        text = f"{key}: {message}" if key else message
        super().__init__(text, line=line, source=source)


# -- value types -------------------------------------------------------------------------------


def _algorithm(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DIGEST_SIZES:
        raise ValueError(f"unknown digest algorithm {name!r} (known: {', '.join(DIGEST_SIZES)})")
    return key


def parse_digest(text: str) -> tuple[str, bytes]:
    """``"sha256:<hex>"`` -> ("sha256", bytes); ValueError naming what is wrong."""
    alg, sep, hexpart = text.partition(":")
    if not sep:
        raise ValueError(f"{text!r} is not a digest 'algorithm:hex'")
    name = _algorithm(alg)
    if not _HEX.fullmatch(hexpart) or len(hexpart) % 2:
        raise ValueError(f"{text!r}: the digest is not hex")
    value = bytes.fromhex(hexpart)
    if len(value) != DIGEST_SIZES[name]:
        raise ValueError(
            f"{text!r}: a {name} digest is {DIGEST_SIZES[name]} bytes, not {len(value)}"
        )
    return name, value


def _digest(text: str) -> str:
    name, value = parse_digest(text)
    return f"{name}:{value.hex()}"


def _hex(text: str) -> str:
    if not _HEX.fullmatch(text) or len(text) % 2:
        raise ValueError(f"{text[:80]!r} is not hex (an even number of hex digits)")
    return text.lower()


def _register(name: str) -> str:
    try:
        return check_name(name)
    except RegisterError as e:
        raise ValueError(str(e)) from None


def _bank(name: str) -> str:
    try:
        return by_name(name).name
    except AlgorithmError as e:
        raise ValueError(str(e)) from None


def _event_type(value: str) -> str:
    text = value.strip()
    if text.startswith("EV_UNKNOWN_0x"):
        text = text[len("EV_UNKNOWN_") :]
    if text.lower().startswith("0x"):
        try:
            number = int(text, 16)
        except ValueError:
            raise ValueError(f"{value!r} is not an event type") from None
        if not 0 <= number <= 0xFFFFFFFF:
            raise ValueError(f"{value!r} is not a 32-bit event type")
        return event_type_name(number)
    if text not in EventType.__members__:
        raise ValueError(f"{value!r} is not an event type name (EV_...) or 0x number")
    return text


def event_type_number(name: str) -> int:
    if name.startswith("EV_UNKNOWN_0x"):
        return int(name[len("EV_UNKNOWN_") :], 16)
    return int(EventType[name])


def _pem(text: str) -> str:
    if "-----BEGIN" not in text:
        raise ValueError("not PEM (no -----BEGIN line)")
    return text


Digest = Annotated[str, AfterValidator(_digest)]
Hex = Annotated[str, AfterValidator(_hex)]
RegisterName = Annotated[str, AfterValidator(_register)]
BankName = Annotated[str, AfterValidator(_bank)]
EventTypeName = Annotated[str, AfterValidator(_event_type)]
PEM = Annotated[str, AfterValidator(_pem)]
Severity = Literal["contraindicated", "warning"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- sections ----------------------------------------------------------------------------------


class TrustedKeyRef(_Model):
    """An attestation key trusted by registration (its public key, its TPM name, or both)."""

    name: str = ""
    public_key: PEM | None = None
    tpm_name: Hex | None = None

    @model_validator(mode="after")
    def _one_of(self) -> TrustedKeyRef:
        if self.public_key is None and self.tpm_name is None:
            raise ValueError("a trusted key needs public_key or tpm_name")
        if self.public_key is not None:
            from cryptography.exceptions import UnsupportedAlgorithm
            from cryptography.hazmat.primitives import serialization

            try:
                serialization.load_pem_public_key(self.public_key.encode())
            except (ValueError, TypeError, UnsupportedAlgorithm) as e:
                raise ValueError(f"public_key does not load: {e}") from None
        return self


class TDXRefs(_Model):
    trusted_roots: list[PEM] = Field(default_factory=list)
    allow_debug: bool = False
    mrseam: list[Hex] | None = None
    mrsignerseam: list[Hex] | None = None
    td_attributes: list[Hex] | None = None
    xfam: list[Hex] | None = None
    mrconfigid: list[Hex] | None = None
    mrowner: list[Hex] | None = None
    mrownerconfig: list[Hex] | None = None


class BootEventRef(_Model):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    reg: RegisterName = Field(alias="register")
    type: EventTypeName
    digests: dict[BankName, Hex] = Field(default_factory=dict)
    data: Digest
    note: str | None = None


class BootConfig(_Model):
    name: str = ""
    registers: dict[RegisterName, dict[BankName, Hex]] = Field(default_factory=dict)
    events: list[BootEventRef] = Field(default_factory=list)


class KernelRefs(_Model):
    images: list[Digest] = Field(default_factory=list)
    cmdlines: list[str] = Field(default_factory=list)
    initrds: list[Digest] = Field(default_factory=list)
    load_options: list[Digest] = Field(default_factory=list)


class IMARefs(_Model):
    files: dict[str, list[Digest]] = Field(default_factory=dict)
    keys: list[PEM] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    unknown: Severity = "contraindicated"
    violations: Literal["contraindicated", "warning", "ignore"] = "warning"


class ProcessRef(_Model):
    exe_digests: list[Digest] = Field(default_factory=list)
    cmdlines: list[list[str]] | None = None


class SystemRefs(_Model):
    processes: dict[str, ProcessRef] = Field(default_factory=dict)
    unknown: Severity = "contraindicated"


class PodRef(_Model):
    namespace: str | None = None
    images: list[str] | None = None


class KubernetesRefs(_Model):
    pods: dict[str, PodRef] = Field(default_factory=dict)
    unknown: Severity = "contraindicated"


class ContainerRefs(_Model):
    images: list[str] = Field(default_factory=list)
    unknown: Severity = "contraindicated"


class AgentRefs(_Model):
    code_digests: list[Digest] = Field(default_factory=list)
    policy_digests: list[Digest] = Field(default_factory=list)


class ReferenceValues(_Model):
    """A reference file (see the module docstring)."""

    version: Literal[1]
    name: str = ""
    trusted_keys: list[TrustedKeyRef] = Field(default_factory=list)
    tdx: TDXRefs | None = None
    boot: list[BootConfig] = Field(default_factory=list)
    kernel: KernelRefs | None = None
    ima: IMARefs | None = None
    system: SystemRefs | None = None
    kubernetes: KubernetesRefs | None = None
    containers: ContainerRefs | None = None
    agent: AgentRefs | None = None

    _compiled: CompiledReferences | None = PrivateAttr(default=None)

    def to_dict(self) -> dict[str, Any]:
        """The file's content: absent sections and defaults left out."""
        return self.model_dump(
            mode="json", exclude_none=True, exclude_defaults=True, by_alias=True
        ) | {"version": self.version}

    def to_yaml(self) -> str:
        body = self.to_dict()
        ordered = {"version": body.pop("version"), **body}
        return yaml.dump(ordered, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the values (changes whenever a value does)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def compiled(self) -> CompiledReferences:
        """The values as lookup tables (built once per object)."""
        if self._compiled is None:
            self._compiled = CompiledReferences.build(self)
        return self._compiled


_BaseDumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when present


class _Dumper(_BaseDumper):  # type: ignore[misc]
    """Block style for multi-line strings (PEM), plain otherwise."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str_representer)


# -- loading -----------------------------------------------------------------------------------


def _lines(node: yaml.Node) -> dict[tuple[Any, ...], int]:
    """Line (from 1) of every key path of a composed document."""
    out: dict[tuple[Any, ...], int] = {}
    seen: set[int] = set()

    def walk(n: yaml.Node, at: tuple[Any, ...]) -> None:
        if id(n) in seen:
            return
        seen.add(id(n))
        out.setdefault(at, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            keys: set[Any] = set()
            for k, v in n.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else str(k)
                if key in keys:
                    raise ReferenceFileError(
                        "this key is written twice",
                        key=_path_text((*at, key)),
                        line=k.start_mark.line + 1,
                    )
                keys.add(key)
                out[(*at, key)] = k.start_mark.line + 1
                walk(v, (*at, key))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                out[(*at, i)] = v.start_mark.line + 1
                walk(v, (*at, i))

    walk(node, ())
    return out


def _path_text(path: Sequence[Any]) -> str:
    text = ""
    for p in path:
        if isinstance(p, int):
            text += f"[{p}]"
        else:
            text += ("." if text else "") + str(p)
    return text or "(document)"


def _line_for(lines: Mapping[tuple[Any, ...], int], loc: Sequence[Any]) -> int | None:
    path = tuple(loc)
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return lines.get(())


def load_references(data: str | bytes | Path, *, source: str | None = None) -> ReferenceValues:
    """Read and validate a reference file (a path, or its text)."""
    if isinstance(data, Path):
        source = source or str(data)
        try:
            data = data.read_bytes()
        except OSError as e:
            raise ReferenceFileError(f"cannot read: {e.strerror or e}", source=source) from e
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ReferenceFileError(f"not UTF-8 at byte {e.start}", source=source) from None
    else:
        text = data
    loader_class = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present
    try:
        loader = loader_class(text)
        try:
            node = loader.get_single_node()
            doc = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ReferenceFileError(
            f"not YAML: {getattr(e, 'problem', None) or e}",
            line=None if mark is None else mark.line + 1,
            source=source,
        ) from None
    if node is None or not isinstance(doc, dict):
        raise ReferenceFileError(
            "a reference file is a mapping with 'version: 1'", line=1, source=source
        )
    try:
        lines = _lines(node)
    except ReferenceFileError as e:
        raise e.with_source(source) if source else e from None
    if "version" not in doc:
        raise ReferenceFileError(
            "missing (this reader knows version 1)", key="version", line=1, source=source
        )
    if doc["version"] != REFERENCE_VERSION:
        raise ReferenceFileError(
            f"version {doc['version']!r} is not supported (this reader knows version 1)",
            key="version",
            line=lines.get(("version",)),
            source=source,
        )
    try:
        refs = ReferenceValues.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        loc = _clean_loc(loc)
        message = err["msg"]
        kind = err["type"]
        if kind == "extra_forbidden":
            message = "unknown key"
        elif kind == "missing":
            message = "missing"
        elif kind in _TYPE_MESSAGES:
            message = f"{_TYPE_MESSAGES[kind]}, not {describe_type(err.get('input'))}"
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        more = len(e.errors()) - 1
        if more:
            message += f" (and {more} more error{'s' if more > 1 else ''})"
        raise ReferenceFileError(
            message, key=_path_text(loc), line=_line_for(lines, loc), source=source
        ) from None
    try:
        refs.compiled()
    except ReferenceFileError as e:
        line = _line_for(lines, _split_key(e.key)) if e.key else None
        raise ReferenceFileError(e.message, key=e.key, line=line, source=source) from None
    return refs


_TYPE_MESSAGES = {
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "int_type": "must be an integer",
}


def _clean_loc(loc: Sequence[Any]) -> list[Any]:
    """pydantic writes a dict key error as (..., key, '[key]'): keep the key once."""
    out: list[Any] = []
    for p in loc:
        if p == "[key]":
            continue
        out.append(p)
    return out


def _split_key(key: str) -> tuple[Any, ...]:
    parts: list[Any] = []
    for piece in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        parts.append(int(piece[1:-1]) if piece.startswith("[") else piece)
    return tuple(parts)


# -- lookup tables -----------------------------------------------------------------------------

DigestPair = tuple[str, bytes]


@dataclass(frozen=True, slots=True)
class CompiledBootEvent:
    register: str
    event_type: int
    digests: tuple[DigestPair, ...]
    data: DigestPair
    note: str | None


@dataclass(frozen=True, slots=True)
class CompiledBoot:
    name: str
    registers: dict[tuple[str, str], bytes]
    events: tuple[CompiledBootEvent, ...]


@dataclass(slots=True)
class CompiledReferences:
    """The reference values as the appraisal looks them up."""

    digest: str
    trusted_spki: dict[bytes, str] = field(default_factory=dict)
    trusted_tpm_names: dict[bytes, str] = field(default_factory=dict)
    tdx: TDXRefs | None = None
    tdx_roots: list[x509.Certificate] = field(default_factory=list)
    tdx_fields: dict[str, frozenset[bytes]] = field(default_factory=dict)
    boot: list[CompiledBoot] = field(default_factory=list)
    kernel: KernelRefs | None = None
    kernel_images: frozenset[DigestPair] = frozenset()
    kernel_initrds: frozenset[DigestPair] = frozenset()
    kernel_load_options: frozenset[DigestPair] = frozenset()
    kernel_cmdlines: frozenset[str] = frozenset()
    ima: IMARefs | None = None
    ima_files: dict[str, frozenset[DigestPair]] = field(default_factory=dict)
    ima_keys: KeyRing | None = None
    ima_exclude: re.Pattern[str] | None = None
    system: SystemRefs | None = None
    processes: dict[str, tuple[frozenset[str], frozenset[tuple[str, ...]] | None]] = field(
        default_factory=dict
    )
    kubernetes: KubernetesRefs | None = None
    containers: ContainerRefs | None = None
    container_images: frozenset[str] = frozenset()
    agent: AgentRefs | None = None
    agent_code: frozenset[str] = frozenset()
    agent_policy: frozenset[str] = frozenset()

    @classmethod
    def build(cls, refs: ReferenceValues) -> CompiledReferences:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from cima.verifier.imasig import IMASignatureParseError, KeyRing, TrustedKey

        c = cls(digest=refs.digest())
        for i, k in enumerate(refs.trusted_keys):
            label = k.name or f"trusted key {i}"
            if k.public_key is not None:
                key = serialization.load_pem_public_key(k.public_key.encode())
                der = key.public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                c.trusted_spki[der] = label
            if k.tpm_name is not None:
                c.trusted_tpm_names[bytes.fromhex(k.tpm_name)] = label
        if refs.tdx is not None:
            c.tdx = refs.tdx
            for i, pem in enumerate(refs.tdx.trusted_roots):
                try:
                    c.tdx_roots.append(x509.load_pem_x509_certificate(pem.encode()))
                except ValueError as e:
                    raise ReferenceFileError(
                        f"not a PEM certificate: {e}", key=f"tdx.trusted_roots[{i}]"
                    ) from None
            for name in TDX_FIELDS:
                values = getattr(refs.tdx, name)
                if values is not None:
                    c.tdx_fields[name] = frozenset(bytes.fromhex(v) for v in values)
        for b in refs.boot:
            regs = {
                (reg, alg): bytes.fromhex(v)
                for reg, banks in b.registers.items()
                for alg, v in banks.items()
            }
            events = tuple(
                CompiledBootEvent(
                    e.reg,
                    event_type_number(e.type),
                    tuple(sorted((alg, bytes.fromhex(d)) for alg, d in e.digests.items())),
                    parse_digest(e.data),
                    e.note,
                )
                for e in b.events
            )
            c.boot.append(CompiledBoot(b.name, regs, events))
        if refs.kernel is not None:
            c.kernel = refs.kernel
            c.kernel_images = frozenset(parse_digest(d) for d in refs.kernel.images)
            c.kernel_initrds = frozenset(parse_digest(d) for d in refs.kernel.initrds)
            c.kernel_load_options = frozenset(parse_digest(d) for d in refs.kernel.load_options)
            c.kernel_cmdlines = frozenset(_normal_cmdline(s) for s in refs.kernel.cmdlines)
        if refs.ima is not None:
            c.ima = refs.ima
            c.ima_files = {
                path: frozenset(parse_digest(d) for d in digests)
                for path, digests in refs.ima.files.items()
            }
            ring = KeyRing()
            for i, pem in enumerate(refs.ima.keys):
                try:
                    ring.add(TrustedKey.from_pem(pem, name=f"ima.keys[{i}]"))
                except IMASignatureParseError as e:
                    raise ReferenceFileError(e.reason, key=f"ima.keys[{i}]") from None
            c.ima_keys = ring
            if refs.ima.exclude:
                c.ima_exclude = re.compile(
                    "|".join(f"(?:{fnmatch.translate(p)})" for p in refs.ima.exclude)
                )
        if refs.system is not None:
            c.system = refs.system
            c.processes = {
                path: (
                    frozenset(refs_digest(d) for d in p.exe_digests),
                    None if p.cmdlines is None else frozenset(tuple(x) for x in p.cmdlines),
                )
                for path, p in refs.system.processes.items()
            }
        c.kubernetes = refs.kubernetes
        if refs.containers is not None:
            c.containers = refs.containers
            c.container_images = frozenset(refs.containers.images)
        if refs.agent is not None:
            c.agent = refs.agent
            c.agent_code = frozenset(refs_digest(d) for d in refs.agent.code_digests)
            c.agent_policy = frozenset(refs_digest(d) for d in refs.agent.policy_digests)
        return c


def refs_digest(text: str) -> str:
    """A digest string in its normal form (``sha256:<lowercase hex>``), or the text itself."""
    try:
        alg, value = parse_digest(text)
    except ValueError:
        return text
    return f"{alg}:{value.hex()}"


def _normal_cmdline(text: str) -> str:
    return " ".join(text.split())


# -- creation ----------------------------------------------------------------------------------


def create_references(
    bundles: Sequence[EvidenceBundle], *, name: str = "", sources: Sequence[str] = ()
) -> ReferenceValues:
    """Reference values that accept every one of ``bundles`` (known-good evidence).

    Everything the bundles show is taken as good: the attestation keys, the TD
    identity, each distinct boot log (with the registers it explains and the
    quoted registers no log explains), the kernel, command line and initrd,
    every IMA file digest by path, the system processes, pods, container
    images and the agent's code and policy digests. Nothing is verified here:
    appraise the bundles against the result to check them.
    """
    from cima.verifier import appraise as ap

    if not bundles:
        raise ValueError("reference values need at least one bundle")
    trusted: list[dict[str, Any]] = []
    seen_keys: set[str] = set()
    tdx: dict[str, list[str]] = {}
    boots: list[dict[str, Any]] = []
    boot_keys: set[str] = set()
    kernel: dict[str, list[str]] = {"images": [], "cmdlines": [], "initrds": [], "load_options": []}
    files: dict[str, list[str]] = {}
    processes: dict[str, dict[str, Any]] = {}
    pods: dict[str, dict[str, Any]] = {}
    images: list[str] = []
    code: list[str] = []
    policy: list[str] = []
    any_ima = any_runtime = False

    def add(lst: list[str], value: str) -> None:
        if value not in lst:
            lst.append(value)

    for n, bundle in enumerate(bundles):
        label = sources[n] if n < len(sources) else f"bundle {n}"
        view = ap.EvidenceView.of(bundle)
        # attestation key and TD identity
        if view.ak_pem is not None and view.ak_pem not in seen_keys:
            seen_keys.add(view.ak_pem)
            entry: dict[str, Any] = {"name": label, "public_key": view.ak_pem}
            tpm_name = view.ak_tpm_name()
            if tpm_name is not None:
                entry["tpm_name"] = tpm_name.hex()
            trusted.append(entry)
        for fname, value in view.tdx_fields().items():
            add(tdx.setdefault(fname, []), value.hex())
        # boot
        config = ap.boot_config(view, name=label)
        key = json.dumps({"r": config["registers"], "e": config["events"]}, sort_keys=True)
        if key not in boot_keys:
            boot_keys.add(key)
            boots.append(config)
        # kernel
        k = ap.kernel_facts(view)
        for img in k.images:
            for alg, digest in img.digests:
                add(kernel["images"], f"{alg}:{digest.hex()}")
        for line in k.cmdlines:
            add(kernel["cmdlines"], line.text)
        for ird in k.initrds:
            for alg, digest in ird.digests:
                add(kernel["initrds"], f"{alg}:{digest.hex()}")
        for opt in k.load_options:
            for alg, digest in opt.digests:
                add(kernel["load_options"], f"{alg}:{digest.hex()}")
        # ima
        if view.ima_records:
            any_ima = True
            for path, alg, digest in ap.ima_file_digests(view):
                add(files.setdefault(path, []), f"{alg}:{digest.hex()}")
        # runtime
        for ev in view.runtime_events():
            any_runtime = True
            if ev.content is None:
                continue
            data = ev.data
            if ev.kind == "process" and ev.subject:
                p = processes.setdefault(ev.subject, {"exe_digests": []})
                if isinstance(data.get("exe_digest"), str):
                    add(p["exe_digests"], refs_digest(data["exe_digest"]))
                if isinstance(data.get("cmdline"), list):
                    p.setdefault("cmdlines", [])
                    if data["cmdline"] not in p["cmdlines"]:
                        p["cmdlines"].append([str(x) for x in data["cmdline"]])
            elif ev.kind == "pod" and ev.subject:
                pod = pods.setdefault(ap.pod_name(ev.subject, data), {})
                ns = data.get("namespace")
                if isinstance(ns, str):
                    pod["namespace"] = ns
            elif ev.kind == "container":
                for image in ap.container_images(data)[:1]:
                    add(images, image)
            elif ev.kind == "agent" and isinstance(data.get("code_digest"), str):
                add(code, refs_digest(data["code_digest"]))
            elif ev.kind == "policy" and isinstance(data.get("policy_digest"), str):
                add(policy, refs_digest(data["policy_digest"]))

    doc: dict[str, Any] = {"version": REFERENCE_VERSION}
    if name:
        doc["name"] = name
    if trusted:
        doc["trusted_keys"] = trusted
    if tdx:
        doc["tdx"] = tdx
    doc["boot"] = boots
    kernel = {k: v for k, v in kernel.items() if v}
    if kernel:
        doc["kernel"] = kernel
    if any_ima:
        doc["ima"] = {"files": dict(sorted(files.items()))}
    if any_runtime:
        doc["system"] = {"processes": processes}
        doc["kubernetes"] = {"pods": pods}
        doc["containers"] = {"images": images}
        doc["agent"] = {"code_digests": code, "policy_digests": policy}
    return ReferenceValues.model_validate(doc)


def sorted_registers(registers: Mapping[str, Any]) -> dict[str, Any]:
    return {r: registers[r] for r in sorted(registers, key=sort_key)}


def merge(values: Iterable[ReferenceValues]) -> ReferenceValues:
    """One reference file accepting whatever any of ``values`` accepts (lists are joined)."""
    merged: dict[str, Any] = {"version": REFERENCE_VERSION}
    for v in values:
        _merge_into(merged, v.to_dict())
    return ReferenceValues.model_validate(merged)


def _merge_into(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    for k, v in src.items():
        if k not in dst:
            dst[k] = v
        elif isinstance(dst[k], dict) and isinstance(v, Mapping):
            _merge_into(dst[k], v)
        elif isinstance(dst[k], list) and isinstance(v, list):
            for item in v:
                if item not in dst[k]:
                    dst[k].append(item)
