"""The agent's policy file (DESIGN.md section 5): what the agent measures, and with which hash.

The file is YAML::

    backend: ima                 # ima (kernel IMA) or none
    hashAlgorithm: sha384        # sha256 | sha384 | sha512
    measure:
      system:
        withParameter: true      # measure the command line with the executable
        processes: [/usr/bin/containerd, /usr/bin/kubelet]
      container:
        isolated: true           # others' container events are redacted (section 7)
        withEnvValues: false     # environment values may be secrets: names only by default
      kubernetes:
        withParameter: true
        pods: [kube-apiserver, kube-scheduler]

``backend`` and ``hashAlgorithm`` are required; ``measure`` and each of its
sections are optional, and a section that is absent (or null) is not measured.
Where a section is present its list must name at least one entry. Process
entries are absolute paths of executables; pod entries are pod-name prefixes.

Validation (pydantic v2, ``extra="forbid"``) happens before anything starts.
Every error is a :class:`PolicyFileError` that names the file, the line and
the key path (``measure.system.processes[2]``), and says what is wrong in one
line. Lines come from the YAML node tree (``yaml.compose``): the line of a key
is where the key is written; a missing key is reported at its parent's line.
A key written twice in one mapping is an error (YAML would silently keep the
last); an entry listed twice in ``processes`` or ``pods`` is accepted once with
a warning (published example policies list ``kube-scheduler`` twice).

Whether the runtime register has a bank for ``hashAlgorithm`` depends on the
platform, so that check is :meth:`Policy.check_bank`, which the engine calls at
start.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StringConstraints,
    ValidationError,
)

from cima.agent.events import canonical
from cima.digests import by_name
from cima.errors import AlgorithmError, PolicyError, describe_type

__all__ = [
    "ALGORITHMS",
    "DEFAULT_POLICY_TEXT",
    "MAX_POLICY_SIZE",
    "ContainerPolicy",
    "KubernetesPolicy",
    "Measure",
    "Policy",
    "PolicyFileError",
    "SystemPolicy",
    "load_policy",
    "parse_policy",
]

log = logging.getLogger(__name__)

#: The hash algorithms a policy may name for the runtime register.
ALGORITHMS: tuple[str, ...] = ("sha256", "sha384", "sha512")
#: A policy file larger than this is refused before it is parsed.
MAX_POLICY_SIZE = 1024 * 1024

#: The example of DESIGN.md section 5 (used by the demo and as a starting point).
DEFAULT_POLICY_TEXT = """\
backend: ima                 # where runtime measurements come from: ima (kernel IMA), or none
hashAlgorithm: sha384        # sha256 | sha384 | sha512; must match the runtime register's bank
measure:
  system:
    withParameter: true      # measure the command line with the executable
    processes:
      - /usr/bin/containerd
      - /usr/bin/kubelet
      - /usr/bin/containerd-shim-runc-v2
  container:
    isolated: true           # a container sees only its own events; others' are redacted
  kubernetes:
    withParameter: true
    pods:
      - kube-apiserver
      - kube-scheduler
      - kube-proxy
      - kube-controller-manager
"""

#: A key path as a tuple: ("measure", "system", "processes", 2).
_Loc = tuple[str | int, ...]


class PolicyFileError(PolicyError):
    """An invalid policy: where (``source``, ``line``, ``key``) and what (``code``, ``reason``).

    ``code`` is one of ``unreadable`` (missing or unreadable file), ``syntax``
    (not YAML, not UTF-8), ``not-mapping`` (the document is not a mapping),
    ``duplicate-key``, ``unknown-key``, ``missing-key``, ``type`` (wrong type),
    ``value`` (a value outside its set, a relative path), ``algorithm`` (an
    unknown or unsupported hash algorithm), ``empty`` (an empty list where
    entries are required), ``bank`` (the runtime register has no bank for the
    algorithm) and ``reload`` (a reload that would change the algorithm).
    ``others`` holds further errors found in the same file, in line order.
    """

    def __init__(
        self,
        reason: str,
        *,
        code: str,
        source: str = "<policy>",
        line: int | None = None,
        key: str | None = None,
        others: Sequence[PolicyFileError] = (),
    ) -> None:
        self.reason = reason
        self.code = code
        self.source = source
        self.line = line
        self.key = key
        self.others = tuple(others)
        where = [source]
        if line is not None:
            where.append(f"line {line}")
        if key:
            where.append(key)
        more = f" (and {len(self.others)} more)" if self.others else ""
        super().__init__(f"{', '.join(where)}: {reason}{more}")


# -- the model ------------------------------------------------------------------------------------


def _absolute(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    if "\x00" in path:
        raise ValueError("a path cannot contain a NUL byte")
    return path


def _algorithm_name(value: object) -> object:
    """Accept the spellings cima accepts everywhere (``SHA-384``); the Literal decides the rest."""
    if isinstance(value, str):
        try:
            return by_name(value).name
        except AlgorithmError:
            return value
    return value


ProcessPath = Annotated[
    str, StringConstraints(strict=True, min_length=1), AfterValidator(_absolute)
]
PodName = Annotated[str, StringConstraints(strict=True, min_length=1)]


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_by_alias=True, validate_by_name=False
    )


class SystemPolicy(_Section):
    """``measure.system``: host processes named by their executable's path."""

    with_parameter: StrictBool = Field(default=False, alias="withParameter")
    processes: tuple[ProcessPath, ...] = Field(min_length=1)


class ContainerPolicy(_Section):
    """``measure.container``: every container, and how isolated their views are."""

    isolated: StrictBool = True
    with_env_values: StrictBool = Field(default=False, alias="withEnvValues")


class KubernetesPolicy(_Section):
    """``measure.kubernetes``: pods named by a prefix of their name."""

    with_parameter: StrictBool = Field(default=False, alias="withParameter")
    pods: tuple[PodName, ...] = Field(min_length=1)


class Measure(_Section):
    """``measure``: each section optional; an absent section is not measured."""

    system: SystemPolicy | None = None
    container: ContainerPolicy | None = None
    kubernetes: KubernetesPolicy | None = None


class Policy(_Section):
    """A validated policy. Build it with :func:`load_policy` or :func:`parse_policy`."""

    backend: Literal["ima", "none"]
    hash_algorithm: Annotated[
        Literal["sha256", "sha384", "sha512"], BeforeValidator(_algorithm_name)
    ] = Field(alias="hashAlgorithm")
    measure: Measure = Field(default_factory=Measure)

    _source: str = PrivateAttr(default="<policy>")
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)
    _warnings: tuple[str, ...] = PrivateAttr(default=())
    _raw: bytes = PrivateAttr(default=b"")

    # -- where it came from ---------------------------------------------------------------------
    @property
    def source(self) -> str:
        """The file (or label) the policy was read from."""
        return self._source

    @property
    def raw(self) -> bytes:
        """The policy exactly as read (the file's bytes; the UTF-8 text for parse_policy)."""
        return self._raw

    @property
    def warnings(self) -> tuple[str, ...]:
        """What was accepted with a warning (duplicate entries)."""
        return self._warnings

    def line_of(self, key: str) -> int | None:
        """The line a key path (``measure.system.processes[0]``) was written on, if known."""
        return self._lines.get(key)

    # -- what it says ----------------------------------------------------------------------------
    @property
    def isolated(self) -> bool:
        """Whether container views are isolated (True unless the container section says no)."""
        container = self.measure.container
        return True if container is None else container.isolated

    def to_dict(self) -> dict[str, Any]:
        """The normalised policy: every key with its value or default, duplicates removed."""
        return self.model_dump(mode="json", by_alias=True)

    def canonical_bytes(self) -> bytes:
        """Canonical JSON of :meth:`to_dict` (sorted keys, no white space), as measured."""
        return canonical(self.to_dict())

    def digest(self, algorithm: str | None = None) -> bytes:
        """Digest of :meth:`canonical_bytes` (with ``hashAlgorithm`` by default)."""
        return by_name(algorithm or self.hash_algorithm).hash(self.canonical_bytes())

    def check_bank(
        self, platform_algorithms: Iterable[str], *, register: str | None = None
    ) -> None:
        """Raise :class:`PolicyFileError` if the runtime register has no ``hashAlgorithm`` bank."""
        banks: list[str] = []
        for a in platform_algorithms:
            try:
                banks.append(by_name(a).name)
            except AlgorithmError:
                banks.append(a)
        if self.hash_algorithm in banks:
            return
        what = f"the runtime register {register}" if register else "the runtime register"
        raise PolicyFileError(
            f"{self.hash_algorithm} is not a bank of {what} (its banks: "
            f"{', '.join(banks) or 'none'})",
            code="bank",
            source=self._source,
            line=self.line_of("hashAlgorithm"),
            key="hashAlgorithm",
        )


# -- YAML with lines ------------------------------------------------------------------------------


def key_path(loc: Iterable[str | int]) -> str:
    """``("measure", "system", "processes", 2)`` -> ``measure.system.processes[2]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class _Lines:
    """Line numbers (from 1) of every key and list item of a composed YAML document."""

    def __init__(self, root: yaml.Node, source: str) -> None:
        self.source = source
        self.lines: dict[_Loc, int] = {(): root.start_mark.line + 1}
        self._seen: set[int] = set()
        self._walk(root, ())

    def _walk(self, node: yaml.Node, at: _Loc) -> None:
        # An alias refers to a node already walked: walk each node once (no alias bombs).
        if id(node) in self._seen:
            return
        self._seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[object, int] = {}
            for key_node, value_node in node.value:
                key: object = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                line = key_node.start_mark.line + 1
                if key is None:
                    continue
                if key in first and key != "<<":
                    raise PolicyFileError(
                        f"key {key!r} is written twice in this mapping (first at line "
                        f"{first[key]})",
                        code="duplicate-key",
                        source=self.source,
                        line=line,
                        key=key_path((*at, str(key))),
                    )
                first[key] = line
                path = (*at, str(key))
                self.lines.setdefault(path, line)
                self._walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                path = (*at, i)
                self.lines.setdefault(path, item.start_mark.line + 1)
                self._walk(item, path)

    def line(self, loc: _Loc) -> int:
        """The line of ``loc``, or of its nearest ancestor that was written."""
        for n in range(len(loc), -1, -1):
            found = self.lines.get(loc[:n])
            if found is not None:
                return found
        return 1


def _yaml_error(e: yaml.YAMLError, source: str, text: str) -> PolicyFileError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    line: int | None = mark.line + 1 if mark is not None else None
    if isinstance(e, yaml.reader.ReaderError):
        # A character YAML does not allow: the reader knows its position only.
        line = text.count("\n", 0, max(0, e.position)) + 1
        problem = f"character 0x{e.character:x} is not allowed in YAML"
    else:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return PolicyFileError(f"not valid YAML: {problem}", code="syntax", source=source, line=line)


def _compose(text: str, source: str) -> tuple[Any, _Lines]:
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as e:
        raise _yaml_error(e, source, text) from e
    try:
        node = loader.get_single_node()
        if node is None:
            raise PolicyFileError(
                "the policy is empty (expected a mapping with backend and hashAlgorithm)",
                code="not-mapping",
                source=source,
                line=1,
            )
        lines = _Lines(node, source)
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        raise _yaml_error(e, source, text) from e
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        raise PolicyFileError(
            f"the policy must be a mapping of keys to values, not {kind}",
            code="not-mapping",
            source=source,
            line=lines.line(()),
        )
    return data, lines


_DEDUPLICATED: tuple[_Loc, ...] = (
    ("measure", "system", "processes"),
    ("measure", "kubernetes", "pods"),
)


def _dig(data: Any, path: _Loc) -> Any:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _deduplicate(data: dict[str, Any], lines: _Lines) -> tuple[list[str], dict[_Loc, list[int]]]:
    """Drop repeated list entries in place; return the warnings and the index maps."""
    warnings: list[str] = []
    index_maps: dict[_Loc, list[int]] = {}
    for path in _DEDUPLICATED:
        items = _dig(data, path)
        if not isinstance(items, list):
            continue
        kept: list[Any] = []
        kept_index: list[int] = []
        first_line: dict[str, int] = {}
        for i, item in enumerate(items):
            line = lines.line((*path, i))
            if isinstance(item, str) and item in first_line:
                message = (
                    f"{lines.source}, line {line}, {key_path((*path, i))}: {item!r} is already "
                    f"listed at line {first_line[item]}; accepted once"
                )
                warnings.append(message)
                log.warning("%s", message)
                continue
            if isinstance(item, str):
                first_line[item] = line
            kept.append(item)
            kept_index.append(i)
        if len(kept) != len(items):
            parent = _dig(data, path[:-1])
            assert isinstance(parent, dict)
            parent[path[-1]] = kept
            index_maps[path] = kept_index
    return warnings, index_maps


def _allowed_keys(loc: _Loc) -> list[str]:
    """The keys the model accepts at the mapping ``loc``."""
    model: type[BaseModel] = Policy
    for part in loc:
        field = next(
            (f for name, f in model.model_fields.items() if (f.alias or name) == part), None
        )
        if field is None:
            return []
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return [f.alias or name for name, f in model.model_fields.items()]


def _brief(value: object) -> str:
    """A scalar's repr (cut at 60 characters); a container only by its type.

    Containers are never rendered: YAML aliases can make a small file a huge value.
    """
    if value is None or isinstance(value, bool | int | float | str):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return describe_type(value)


def _shown(value: object) -> str:
    """``a string ('yes')``, ``a number (5)``, ``a list``."""
    if value is None or isinstance(value, bool | int | float | str):
        return "null" if value is None else f"{describe_type(value)} ({_brief(value)})"
    return describe_type(value)


_EXPECTED = {
    "bool_type": "a boolean (true or false)",
    "string_type": "a string",
    "tuple_type": "a list",
    "list_type": "a list",
    "model_type": "a mapping",
    "dict_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _translate(
    err: Mapping[str, Any], lines: _Lines, index_maps: dict[_Loc, list[int]]
) -> PolicyFileError:
    loc: _Loc = tuple(err["loc"])
    # Map list indices back to the file's (before duplicates were dropped).
    fixed: list[str | int] = []
    for part in loc:
        mapping = index_maps.get(tuple(fixed)) if isinstance(part, int) else None
        if isinstance(part, int) and mapping is not None and part < len(mapping):
            fixed.append(mapping[part])
        else:
            fixed.append(part)
    loc = tuple(fixed)
    kind = str(err["type"])
    value = err.get("input")
    key = key_path(loc)
    line = lines.line(loc)
    source = lines.source
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        where = key_path(loc[:-1]) or "the top level"
        return PolicyFileError(
            f"unknown key {loc[-1]!r} (allowed in {where}: {', '.join(allowed)})",
            code="unknown-key",
            source=source,
            line=line,
            key=key,
        )
    if kind == "missing":
        return PolicyFileError(
            f"missing required key {loc[-1]!r}",
            code="missing-key",
            source=source,
            line=line,
            key=key,
        )
    if kind == "too_short":
        return PolicyFileError(
            "empty list: name at least one entry, or remove the section",
            code="empty",
            source=source,
            line=line,
            key=key,
        )
    if loc == ("hashAlgorithm",) and kind in ("literal_error", "string_type"):
        return PolicyFileError(
            f"unknown or unsupported hash algorithm {_brief(value)} (expected one of "
            f"{', '.join(ALGORITHMS)})",
            code="algorithm",
            source=source,
            line=line,
            key=key,
        )
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return PolicyFileError(
            f"{_brief(value)} is not one of {expected}",
            code="value",
            source=source,
            line=line,
            key=key,
        )
    if kind in _EXPECTED:
        return PolicyFileError(
            f"expected {_EXPECTED[kind]}, got {_shown(value)}",
            code="type",
            source=source,
            line=line,
            key=key,
        )
    if kind == "string_too_short":
        return PolicyFileError(
            "an empty string is not allowed", code="value", source=source, line=line, key=key
        )
    message = str(err.get("msg", kind))
    message = message.removeprefix("Value error, ")
    return PolicyFileError(message, code="value", source=source, line=line, key=key)


def _nonempty(value: object) -> bool:
    return isinstance(value, list | tuple) and len(value) > 0


# -- entry points --------------------------------------------------------------------------------


def parse_policy(text: str, *, source: str = "<policy>") -> Policy:
    """Validate a policy given as YAML text; ``source`` names it in errors."""
    data, lines = _compose(text, source)
    warnings, index_maps = _deduplicate(data, lines)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        # pydantic also reports a list whose items all failed as too short: only an
        # empty list is "empty".
        errors = [
            err
            for err in e.errors()
            if not (err["type"] == "too_short" and _nonempty(err.get("input")))
        ]
        found = sorted(
            (_translate(err, lines, index_maps) for err in errors),
            key=lambda x: (x.line or 0, x.key or ""),
        )
        first, rest = found[0], found[1:]
        raise PolicyFileError(
            first.reason,
            code=first.code,
            source=first.source,
            line=first.line,
            key=first.key,
            others=rest,
        ) from None
    policy._source = source
    policy._lines = {key_path(loc): line for loc, line in lines.lines.items() if loc}
    policy._warnings = tuple(warnings)
    policy._raw = text.encode("utf-8")
    return policy


def load_policy(path: Path | str) -> Policy:
    """Read and validate a policy file (see the module docstring for the errors)."""
    p = Path(path)
    source = str(p)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_POLICY_SIZE + 1)
    except FileNotFoundError:
        raise PolicyFileError("no such file", code="unreadable", source=source) from None
    except IsADirectoryError:
        raise PolicyFileError("is a directory", code="unreadable", source=source) from None
    except OSError as e:
        raise PolicyFileError(
            f"cannot read: {e.strerror or e}", code="unreadable", source=source
        ) from e
    if len(raw) > MAX_POLICY_SIZE:
        raise PolicyFileError(
            f"larger than {MAX_POLICY_SIZE} bytes: not a policy", code="unreadable", source=source
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyFileError(
            f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})",
            code="syntax",
            source=source,
            line=raw.count(b"\n", 0, e.start) + 1,
        ) from None
    policy = parse_policy(text, source=source)
    policy._raw = raw
    return policy
