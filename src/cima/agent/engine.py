"""The measurement engine: policy and collectors in, journaled and extended events out.

At start the engine checks that the runtime register has a bank for the
policy's ``hashAlgorithm`` (and that the journal uses it), then remembers, from
the journal, the last digest journaled under each observation key, so that a
restarted agent does not measure again what has not changed.

:meth:`Engine.measure_self` measures the agent's code and its policy
(:mod:`cima.agent.selfmeasure`), first. :meth:`Engine.poll` runs every
collector once and journals each observation whose key is new or whose content
changed; the journal extends the runtime register (:mod:`cima.agent.journal`).
A collector that fails is logged and skipped for that round (a container
runtime that is down must not stop process measurement); a journal error stops
the engine, since the register would no longer be proved.

Change detection compares the digest the observation would be extended with,
``H(canonical({kind, scope, subject, data}))``, with the last digest journaled
under the same key: equal digests mean equal contents.

The runtime register (DESIGN.md section 2): ``rtmr3`` on TDX; on a TPM and on
the software platform a PCR, ``pcr13`` unless configured otherwise
(:func:`default_runtime_register`).
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from cima.agent.events import NODE, RuntimeEvent, canonical, event_content
from cima.agent.journal import Journal
from cima.agent.policy import Policy, PolicyFileError
from cima.agent.selfmeasure import agent_measurement, policy_measurement
from cima.digests import by_name
from cima.errors import CimaError, JournalError
from cima.eventlog.ima import IMAEntries, IMAStore
from cima.platform.base import Platform

if TYPE_CHECKING:
    from cima.platform.ima import IMAReader

__all__ = [
    "AGENT_KEY",
    "POLICY_KEY",
    "Collector",
    "Engine",
    "Observation",
    "PolicyAware",
    "default_runtime_register",
]

log = logging.getLogger(__name__)

AGENT_KEY = "agent"
POLICY_KEY = "policy"
TPM_RUNTIME_REGISTER = "pcr13"
TDX_RUNTIME_REGISTER = "rtmr3"


def default_runtime_register(platform: Platform) -> str:
    """``rtmr3`` on TDX; ``pcr13`` on a TPM and on the software platform."""
    return TDX_RUNTIME_REGISTER if platform.name == "tdx" else TPM_RUNTIME_REGISTER


@dataclass(frozen=True, slots=True)
class Observation:
    """Something a collector saw; journaled when ``key`` is new or its content changed."""

    kind: str
    scope: str
    subject: str
    data: Mapping[str, Any]
    key: str


@runtime_checkable
class Collector(Protocol):
    """A source of observations, polled by the engine."""

    name: str

    def collect(self) -> Iterable[Observation]: ...


@runtime_checkable
class PolicyAware(Protocol):
    """A collector that follows a reloaded policy."""

    def update_policy(self, policy: Policy) -> None: ...


class Engine:
    """Turns the policy and the collectors into journaled events (see the module docstring)."""

    def __init__(
        self,
        policy: Policy,
        platform: Platform,
        journal: Journal,
        *,
        collectors: Sequence[Collector] = (),
        ima: IMAReader | None = None,
    ) -> None:
        self._check_algorithm(policy, platform, journal)
        self._policy = policy
        self._platform = platform
        self._journal = journal
        self._collectors = list(collectors)
        self._ima = ima
        # The IMA list as read: its records, an entry object built only when one is read.
        self._ima_store = IMAStore()
        self._lock = threading.RLock()
        self._hash = by_name(journal.algorithm).constructor()
        # The last digest journaled under each key, rebuilt from the journal.
        self._seen: dict[str, bytes] = dict(journal.fingerprints())

    @staticmethod
    def _check_algorithm(policy: Policy, platform: Platform, journal: Journal) -> None:
        policy.check_bank(platform.algorithms(), register=journal.register)
        if journal.algorithm != policy.hash_algorithm:
            raise PolicyFileError(
                f"{policy.hash_algorithm}, but the journal of {journal.register} holds "
                f"{journal.algorithm} events (open the journal with the policy's algorithm)",
                code="bank",
                source=policy.source,
                line=policy.line_of("hashAlgorithm"),
                key="hashAlgorithm",
            )

    # -- properties -------------------------------------------------------------------------------
    @property
    def journal(self) -> Journal:
        return self._journal

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def platform(self) -> Platform:
        return self._platform

    @property
    def collectors(self) -> list[Collector]:
        return list(self._collectors)

    def remembered(self, key: str) -> bytes | None:
        """The digest last journaled under ``key`` (None: never)."""
        return self._seen.get(key)

    # -- journaling ------------------------------------------------------------------------------
    def _fingerprint(self, obs: Observation) -> bytes:
        content = event_content(obs.kind, obs.scope, obs.subject, obs.data)
        return bytes(self._hash(canonical(content)).digest())

    def _record(self, obs: Observation) -> RuntimeEvent | None:
        """Journal ``obs`` unless the same content was last journaled under its key."""
        previous = self._seen.get(obs.key)
        if previous is not None and hmac.compare_digest(previous, self._fingerprint(obs)):
            return None
        event = self._journal.append(
            kind=obs.kind, scope=obs.scope, subject=obs.subject, data=obs.data, key=obs.key
        )
        self._seen[obs.key] = event.digest
        return event

    def _self_observations(self) -> list[Observation]:
        alg = self._journal.algorithm
        return [
            Observation("agent", NODE, "cima", agent_measurement(alg), AGENT_KEY),
            self._policy_observation(None),
        ]

    def _policy_observation(self, policy_path: Path | None) -> Observation:
        data = policy_measurement(self._policy, self._journal.algorithm)
        if policy_path is not None:
            data["source"] = str(policy_path)
        return Observation("policy", NODE, str(data["source"]), data, POLICY_KEY)

    def measure_self(self, policy_path: Path | None = None) -> list[RuntimeEvent]:
        """Measure the agent's code, then its policy; return the events journaled.

        Nothing is journaled for what the journal already holds unchanged (an
        agent restarted with the same code and policy). ``policy_path`` names
        the policy's file in the event when it differs from where it was parsed.
        """
        with self._lock:
            observations = self._self_observations()
            if policy_path is not None:
                observations[1] = self._policy_observation(policy_path)
            return [e for e in map(self._record, observations) if e is not None]

    def poll(self) -> list[RuntimeEvent]:
        """Run every collector once (and read new IMA entries); return the events journaled."""
        with self._lock:
            observations: list[Observation] = []
            for collector in self._collectors:
                try:
                    observations.extend(collector.collect())
                except JournalError:
                    raise
                except Exception as e:
                    log.warning("collector %s failed this round: %s", collector.name, e)
            self._read_ima()
            events: list[RuntimeEvent] = []
            for obs in observations:
                event = self._record(obs)
                if event is not None:
                    events.append(event)
            return events

    def _read_ima(self) -> int:
        if self._ima is None or self._policy.backend != "ima":
            return 0
        try:
            added = self._ima.read_into(self._ima_store)
        except CimaError as e:
            log.warning("reading the IMA list failed this round: %s", e)
            return 0
        if self._ima.restarted:
            log.warning("the IMA list was reset (a new boot?): read again from its first entry")
        return added

    def refresh_ima(self) -> int:
        """Read the IMA entries appended since the last read, now; return how many.

        The server calls it right after a quote, so that an evidence bundle never
        carries an IMA log shorter than the quoted register.
        """
        with self._lock:
            return self._read_ima()

    def ima_entries(self) -> IMAEntries:
        """Every IMA entry read so far, in order: a snapshot that later reads leave as it is.

        The entries are kept as their records; each is built when it is read
        (see :class:`~cima.eventlog.ima.IMAStore`), so taking the snapshot costs
        nothing and a page of it only that page.
        """
        with self._lock:
            return self._ima_store.entries()

    def run(self, stop: threading.Event, interval: float = 2.0) -> None:
        """Poll and check the register every ``interval`` seconds until ``stop`` is set.

        A :class:`JournalError` (the register is no longer proved) ends the loop
        by propagating: the agent must then stop serving views.
        """
        while not stop.is_set():
            self.poll()
            self._journal.check()
            stop.wait(interval)

    def reload(self, policy: Policy, policy_path: Path | None = None) -> list[RuntimeEvent]:
        """Switch to ``policy`` (SIGHUP) and journal it; the journal and its memory stay.

        The algorithm cannot change on a reload: the runtime register's journal
        is in one bank (a :class:`PolicyFileError` with code ``reload``).
        """
        with self._lock:
            policy.check_bank(self._platform.algorithms(), register=self._journal.register)
            if policy.hash_algorithm != self._journal.algorithm:
                raise PolicyFileError(
                    f"a reload cannot change the algorithm from {self._journal.algorithm} to "
                    f"{policy.hash_algorithm}: the journal is in one bank; restart the agent "
                    "with a new journal instead",
                    code="reload",
                    source=policy.source,
                    line=policy.line_of("hashAlgorithm"),
                    key="hashAlgorithm",
                )
            self._policy = policy
            for collector in self._collectors:
                if isinstance(collector, PolicyAware):
                    collector.update_policy(policy)
            event = self._record(self._policy_observation(policy_path))
            return [] if event is None else [event]
