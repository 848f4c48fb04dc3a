"""Kubernetes pods named by the policy (``measure.kubernetes``), found through CRI.

kubelet creates each pod as a CRI pod sandbox whose metadata holds the pod's
name, namespace and uid (and labels ``io.kubernetes.pod.name``,
``io.kubernetes.pod.namespace``, ``io.kubernetes.pod.uid``). The control-plane
pods are static pods named ``<component>-<node>`` (``kube-apiserver-node1``),
so a policy entry names a pod when the pod's name equals it or starts with it
followed by ``-``: ``kube-apiserver`` names ``kube-apiserver-node1``, not
``kube-apiserver2`` nor ``kube-apiserverx-node1``.

Each ready sandbox so named, once it has at least one container, is one
observation: kind ``pod``, scope ``node``, subject ``<namespace>/<name>``, key
``pod:<namespace>/<name>:<uid>``, data::

    {"name", "namespace", "uid",
     "containers": [{"name", "image", "args" (with withParameter)}, ...]}

Containers are listed by name; a restarted container (a higher attempt) stands
for its name, so restarts with the same image and arguments are no change. The
arguments are the OCI ``process.args`` the container runs with (CRI
``ContainerStatus`` verbose info), which fold in the image's entrypoint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cima.agent.cri import LABEL_POD_NAME, ContainerInfo, CRIClient, CRIError
from cima.agent.engine import Observation
from cima.agent.events import NODE
from cima.agent.policy import KubernetesPolicy, Policy

__all__ = ["PodCollector", "pod_matches"]

log = logging.getLogger(__name__)


def pod_matches(pod_name: str, entries: tuple[str, ...] | list[str]) -> str | None:
    """The policy entry naming ``pod_name`` (equal, or a prefix followed by ``-``), or None."""
    for entry in entries:
        if pod_name == entry or pod_name.startswith(entry + "-"):
            return entry
    return None


class PodCollector:
    """Observations of the pods the policy names (see the module docstring)."""

    name = "pods"

    def __init__(
        self,
        kubernetes_policy: KubernetesPolicy | None,
        *,
        cri_socket: Path | None,
        cri: CRIClient | None = None,
    ) -> None:
        self._policy = kubernetes_policy
        self.cri_socket = cri_socket
        self._cri = cri if cri is not None else (CRIClient(cri_socket) if cri_socket else None)
        self._args_seen: dict[str, list[str]] = {}  # a container's arguments do not change

    def update_policy(self, policy: Policy) -> None:
        """Follow a reloaded policy (its ``measure.kubernetes`` section)."""
        self._policy = policy.measure.kubernetes

    def close(self) -> None:
        if self._cri is not None:
            self._cri.close()

    def _args(self, container: ContainerInfo) -> list[str] | None:
        assert self._cri is not None
        known = self._args_seen.get(container.id)
        if known is not None:
            return known
        try:
            status = self._cri.container_status(container.id, verbose=True)
        except CRIError as e:
            if e.code == "NOT_FOUND":
                return None
            raise
        spec = status.runtime_spec or {}
        process = spec.get("process")
        if isinstance(process, Mapping) and isinstance(process.get("args"), list):
            args = [str(a) for a in process["args"]]
            self._args_seen[container.id] = args
            return args
        config = status.info.get("config")
        if isinstance(config, Mapping):
            return [str(a) for a in [*config.get("command", []), *config.get("args", [])]]
        return []

    def collect(self) -> list[Observation]:
        """One observation per ready pod the policy names (raises CRIError if CRI fails)."""
        policy = self._policy
        if policy is None or self._cri is None:
            return []
        out: list[Observation] = []
        listed: set[str] = set()
        for sandbox in self._cri.list_pod_sandboxes(ready_only=True):
            name = sandbox.name or sandbox.labels.get(LABEL_POD_NAME, "")
            if pod_matches(name, policy.pods) is None:
                continue
            latest: dict[str, ContainerInfo] = {}
            for c in self._cri.list_containers(sandbox_id=sandbox.id):
                listed.add(c.id)
                seen = latest.get(c.name)
                if seen is None or (c.attempt, c.created_at) > (seen.attempt, seen.created_at):
                    latest[c.name] = c
            if not latest:
                continue  # measured once it has containers
            containers: list[dict[str, Any]] = []
            for cname in sorted(latest):
                c = latest[cname]
                entry: dict[str, Any] = {"name": cname, "image": c.image}
                if policy.with_parameter:
                    args = self._args(c)
                    if args is None:
                        continue
                    entry["args"] = args
                containers.append(entry)
            subject = f"{sandbox.namespace}/{name}"
            data = {
                "name": name,
                "namespace": sandbox.namespace,
                "uid": sandbox.uid,
                "containers": containers,
            }
            out.append(Observation("pod", NODE, subject, data, f"pod:{subject}:{sandbox.uid}"))
        for gone in set(self._args_seen) - listed:
            del self._args_seen[gone]
        return out
