"""What one caller may see of the node's measurements (DESIGN.md section 7).

The caller is who the kernel says it is (:mod:`cima.agent.identity`, from the
Unix socket's peer credentials), never what a request claims. Its *view*:

- a container sees the node's events (boot log, system processes, pods, the
  agent itself) and its own container's events in full; every other
  container's event appears only as its digest (:meth:`RuntimeEvent.redacted`),
  so that the runtime register still replays from the log but nothing about the
  other containers is revealed;
- IMA entries are treated alike: an entry whose template carries the measuring
  task's cgroup (``ima-cgpath``: the ``cg-path`` field; ``ima-dep-cgn``: the
  ``cgn`` field) belongs to the container that cgroup names. Another
  container's entry is redacted to its per-bank digests (the digest it
  extended into each bank, computed while the template data is still at hand),
  so the IMA register replays too. An entry of such a template whose fields do
  not decode cannot be attributed and is redacted for every container;
- a process outside any container (on the host) gets the node view, everything
  in full, where that is allowed (``node_view_allowed``); otherwise it sees
  what a container with no events of its own would see;
- with isolation off (the policy's ``measure.container.isolated: false``)
  everyone sees everything.

Events of any scope other than ``node`` and the caller's own are redacted
unless the view is full: what is not known to be the caller's is not shown.

The *container register* of a container is the replay, from zeros, of that
container's own runtime events in the policy's algorithm
(:func:`cima.evidence.bundle.container_register`); every report a container
asks for binds it (DESIGN.md section 4).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from cima.agent.events import NODE, RuntimeEvent, container_scope
from cima.agent.identity import Caller, container_id_from_cgroup
from cima.errors import CimaError
from cima.eventlog.cel import CIMA, IMA_TEMPLATE, CELRecord
from cima.eventlog.ima import IMAEntries, IMAEntry
from cima.evidence.bundle import container_register

__all__ = [
    "CGROUP_TEMPLATES",
    "UNKNOWN_OWNER",
    "IMAAttribution",
    "RedactedIMAEntry",
    "View",
    "container_register_of",
    "ima_owner",
    "ima_records",
    "ima_to_cel",
    "ima_view",
    "iter_ima_records",
    "iter_ima_view",
    "runtime_view",
    "view_for",
    "view_of",
]

#: IMA templates whose entries name the measuring task's cgroup.
CGROUP_TEMPLATES = frozenset(
    {"ima-cgpath", "ima-dep-cgn", "dep|cg-path|d-ng|n-ng", "dep|cgn|d-ng|n-ng"}
)
_HEX64 = re.compile(r"[0-9a-f]{64}")
#: ima_owner's answer for an entry of a cgroup template that cannot be attributed.
UNKNOWN_OWNER = "?"


@dataclass(frozen=True, slots=True)
class View:
    """What one caller sees: its scope, and whether it sees everything in full."""

    scope: str
    """``node`` for a host process, ``container:<id>`` for a container."""
    full: bool
    """True for the node view (or with isolation off): nothing is redacted."""

    @property
    def container_id(self) -> str | None:
        return None if self.scope == NODE else self.scope.split(":", 1)[1]

    def sees(self, scope: str | None) -> bool:
        """Whether an event of ``scope`` is shown in full."""
        return self.full or scope == NODE or (scope is not None and scope == self.scope)

    def sees_container(self, container_id: str | None) -> bool:
        """Whether an IMA entry of ``container_id`` (None: the host's) is shown in full."""
        if self.full or container_id is None:
            return True
        return container_id != UNKNOWN_OWNER and container_id == self.container_id


def view_of(caller: Caller, *, isolated: bool, node_view_allowed: bool) -> View:
    """The view of ``caller`` (see the module docstring)."""
    if caller.container_id is not None:
        return View(container_scope(caller.container_id), full=not isolated)
    return View(NODE, full=node_view_allowed or not isolated)


def runtime_view(view: View, events: Iterable[RuntimeEvent]) -> list[RuntimeEvent]:
    """``events`` as ``view`` shows them: in full or redacted to their digests."""
    return [e if e.content is None or view.sees(e.scope) else e.redacted() for e in events]


def view_for(
    caller: Caller,
    events: Sequence[RuntimeEvent],
    *,
    isolated: bool,
    node_view_allowed: bool,
) -> list[RuntimeEvent]:
    """The runtime events ``caller`` may see (others' redacted), in order."""
    return runtime_view(
        view_of(caller, isolated=isolated, node_view_allowed=node_view_allowed), events
    )


def container_register_of(view: View, events: Iterable[RuntimeEvent], algorithm: str) -> bytes:
    """The container register of ``view``'s container (its own events replayed from zeros)."""
    if view.scope == NODE:
        raise ValueError("the node view has no container register")
    return container_register(events, view.scope, algorithm)


# -- IMA -------------------------------------------------------------------------------------


def _id_from_cgroup_name(name: str) -> str | None:
    if _HEX64.fullmatch(name):
        return name
    return container_id_from_cgroup(f"0::/{name.lstrip('/')}")


def ima_owner(entry: IMAEntry) -> str | None:
    """The container an IMA entry belongs to: its id, None (the host) or ``"?"`` (unknown).

    Only the ``ima-cgpath`` and ``ima-dep-cgn`` templates say who measured; any
    other entry is the host's (None). A cgroup that names no container is the
    host's; fields that do not decode give ``"?"``.
    """
    if entry.template_name not in CGROUP_TEMPLATES:
        return None
    try:
        fields = entry.fields
        path = fields.cgroup_path
        name = fields.cgroup_name
        if path is not None:
            text = path.rstrip(b"\x00").decode("utf-8", "replace")
            return container_id_from_cgroup(f"0::/{text.lstrip('/')}")
        if name is not None:
            return _id_from_cgroup_name(name.rstrip(b"\x00").decode("utf-8", "replace"))
    except CimaError:
        pass
    return UNKNOWN_OWNER


class IMAAttribution:
    """Owners of IMA entries, computed once per entry and remembered (the list only grows).

    Thread-safe; memory is one reference per entry (owner strings are shared).
    """

    def __init__(self) -> None:
        self._owners: list[str | None] = []
        self._interned: dict[str, str] = {}
        self._list_id: int | None = None
        self._lock = threading.Lock()

    def owners(self, entries: Sequence[IMAEntry]) -> Sequence[str | None]:
        """The owner of each of ``entries`` (entries ``0..n-1`` of the same growing list)."""
        with self._lock:
            # An IMAEntries run says which list it is; a plain sequence is taken to be
            # another list when it is shorter than the one seen.
            list_id = entries.list_id if isinstance(entries, IMAEntries) else None
            if len(entries) < len(self._owners) or list_id != self._list_id:
                # The list restarted (a new IMA list after a reset): start over.
                self._owners.clear()
                self._list_id = list_id
            done = len(self._owners)
            if done < len(entries):
                append = self._owners.append
                interned = self._interned
                new = entries[done:]
                if isinstance(new, IMAEntries):
                    # Only an entry of a cgroup template is built (and decoded).
                    for i, name in enumerate(new.template_names()):
                        owner = ima_owner(new[i]) if name in CGROUP_TEMPLATES else None
                        append(owner if owner is None else interned.setdefault(owner, owner))
                else:
                    for entry in new:
                        owner = ima_owner(entry)
                        append(owner if owner is None else interned.setdefault(owner, owner))
            return self._owners[: len(entries)]


@dataclass(frozen=True, slots=True)
class RedactedIMAEntry:
    """Another container's IMA entry: where it was extended and with what, nothing else.

    Satisfies :class:`cima.eventlog.event.Measurement`. In CEL-JSON it is a
    record of content type ``cima`` with content ``{"redacted": true}`` and the
    per-bank digests.
    """

    index: int
    register: str
    digests: tuple[tuple[str, bytes], ...]

    @classmethod
    def of(cls, entry: IMAEntry, algorithms: Sequence[str]) -> RedactedIMAEntry:
        digests: list[tuple[str, bytes]] = [(entry.template_hash_algorithm, entry.template_hash)]
        for alg in algorithms:
            if alg == entry.template_hash_algorithm:
                continue
            try:
                digest = entry.replay_digest(alg)
            except CimaError:
                continue  # an entry without template data has only its logged bank
            if digest is not None:
                digests.append((alg, digest))
        return cls(entry.index, entry.register, tuple(digests))

    @property
    def extends(self) -> bool:
        return True

    @property
    def startup_locality(self) -> int | None:
        return None

    def algorithms(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.digests)

    def replay_digest(self, algorithm: str) -> bytes | None:
        return dict(self.digests).get(algorithm)

    def to_cel(self) -> CELRecord:
        return CELRecord(self.index, self.register, self.digests, CIMA, {"redacted": True})


def ima_to_cel(entry: IMAEntry) -> CELRecord:
    """A visible IMA entry as a CEL ``ima_template`` record numbered by its place in the list."""
    return CELRecord(
        entry.index,
        entry.register,
        ((entry.template_hash_algorithm, entry.template_hash),),
        IMA_TEMPLATE,
        {"template_name": entry.template_name, "template_data": entry.template_data},
    )


def iter_ima_view(
    view: View,
    entries: Iterable[IMAEntry],
    owners: Iterable[str | None],
    *,
    algorithms: Sequence[str],
) -> Iterator[IMAEntry | RedactedIMAEntry]:
    """:func:`ima_view`, one entry at a time (a long list is never held as objects at once)."""
    sees = view.sees_container
    for entry, owner in zip(entries, owners, strict=True):
        yield entry if sees(owner) else RedactedIMAEntry.of(entry, algorithms)


def ima_view(
    view: View,
    entries: Sequence[IMAEntry],
    owners: Sequence[str | None],
    *,
    algorithms: Sequence[str],
) -> list[IMAEntry | RedactedIMAEntry]:
    """``entries`` as ``view`` shows them; ``owners`` from :class:`IMAAttribution`.

    A redacted entry keeps its digest for each bank of ``algorithms``.
    """
    return list(iter_ima_view(view, entries, owners, algorithms=algorithms))


def ima_records(items: Iterable[IMAEntry | RedactedIMAEntry]) -> list[CELRecord]:
    """CEL records of a view's IMA entries.

    An entry whose template data is unknown (an unknown template read from an
    ascii list) has no ``ima_template`` form: it is served by its digest alone.
    """
    return list(iter_ima_records(items))


def iter_ima_records(items: Iterable[IMAEntry | RedactedIMAEntry]) -> Iterator[CELRecord]:
    """:func:`ima_records`, one record at a time."""
    for i in items:
        if isinstance(i, RedactedIMAEntry):
            yield i.to_cel()
        elif not i.has_template_data:
            yield RedactedIMAEntry.of(i, ()).to_cel()
        else:
            yield ima_to_cel(i)
