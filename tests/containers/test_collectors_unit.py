"""The container collector's runc and cgroup sources, and pod name matching, on files made here.

A fake ``/proc`` (``<pid>/cgroup``, ``cmdline``, ``environ``, ``stat``) and a
fake runc state directory (``<id>/state.json`` and the bundle's
``config.json``, as runc writes them) drive the collector without a runtime;
the real runtimes are in ``test_real_containers.py``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cima.agent.collectors.containers import ContainerCollector, oci_bind_mounts
from cima.agent.collectors.kubernetes import PodCollector, pod_matches
from cima.agent.policy import ContainerPolicy, parse_policy

CID = "aa" * 32
CID2 = "bb" * 32
UID = "0b6a2b8e-5c1d-4f3e-9a7b-1c2d3e4f5a6b"
START = 123456


class FakeHost:
    def __init__(self, tmp: Path) -> None:
        self.proc = tmp / "proc"
        self.runc = tmp / "runc"
        self.bundles = tmp / "bundles"
        for d in (self.proc, self.runc, self.bundles):
            d.mkdir()

    def process(
        self,
        pid: int,
        cgroup: str,
        argv: list[str],
        env: Sequence[str] = (),
        *,
        start: int = START,
    ) -> None:
        d = self.proc / str(pid)
        d.mkdir()
        (d / "cgroup").write_text(cgroup)
        (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
        (d / "environ").write_bytes(b"".join(e.encode() + b"\0" for e in env))
        fields = ["S", "1"] + ["0"] * 17 + [str(start)] + ["0"] * 10
        (d / "stat").write_text(f"{pid} (sleep (x)) " + " ".join(fields) + "\n")

    def runc_container(
        self,
        cid: str,
        pid: int,
        spec: dict[str, Any] | None,
        *,
        start: int = START,
        labels: Sequence[str] = (),
        created_only: bool = False,
    ) -> bytes | None:
        d = self.runc / cid
        d.mkdir()
        bundle = self.bundles / cid
        bundle.mkdir()
        raw = None
        if spec is not None:
            raw = json.dumps(spec).encode()
            (bundle / "config.json").write_bytes(raw)
        state = {
            "id": cid,
            "init_process_pid": pid,
            "init_process_start": start,
            "config": {
                "cgroups": {"path": f"/runc/{cid}"},
                "labels": [*labels, f"bundle={bundle}"],
            },
            "cgroup_paths": {},
        }
        (d / "state.json").write_text(json.dumps(state))
        if created_only:
            (d / "exec.fifo").write_bytes(b"")
        return raw


def spec(args: list[str], env: list[str], cwd: str = "/") -> dict[str, Any]:
    return {
        "ociVersion": "1.0.2",
        "process": {"args": args, "env": env, "cwd": cwd},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/d", "type": "bind", "source": "/host/d", "options": ["rbind", "ro"]},
            {"destination": "/e", "source": "/host/e", "options": ["bind", "rw", "rslave"]},
        ],
    }


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


def collector(
    host: FakeHost, policy: ContainerPolicy | None = None, **kw: Any
) -> ContainerCollector:
    return ContainerCollector(
        ContainerPolicy() if policy is None else policy,
        cri_socket=kw.pop("cri_socket", None),
        runc_roots=[host.runc],
        proc_root=host.proc,
        algorithm=kw.pop("algorithm", "sha256"),
        **kw,
    )


def test_runc_container_from_state_and_bundle(host: FakeHost) -> None:
    host.process(10, f"0::/runc/{CID}\n", ["sleep", "9"], ["PATH=/bin", "TOKEN=x"])
    raw = host.runc_container(CID, 10, spec(["sleep", "9"], ["PATH=/bin", "TOKEN=x"], "/w"))
    assert raw is not None
    (o,) = collector(host).collect()
    assert (o.kind, o.scope, o.subject, o.key) == (
        "container",
        f"container:{CID}",
        CID,
        f"container:{CID}",
    )
    assert o.data == {
        "name": CID,
        "image": None,
        "image_id": None,
        "image_digest": None,
        "pod": None,
        "args": ["sleep", "9"],
        "cwd": "/w",
        "mounts": [
            {"destination": "/d", "source": "/host/d", "readonly": True, "propagation": "private"},
            {"destination": "/e", "source": "/host/e", "readonly": False, "propagation": "rslave"},
        ],
        "env_names": ["PATH", "TOKEN"],
        "runtime": "runc",
        "bundle": str(host.bundles / CID),
        "spec_digest": "sha256:" + hashlib.sha256(raw).hexdigest(),
    }


def test_spec_digest_uses_the_policy_algorithm(host: FakeHost) -> None:
    host.process(10, f"0::/runc/{CID}\n", ["sleep"])
    raw = host.runc_container(CID, 10, spec(["sleep"], []))
    assert raw is not None
    (o,) = collector(host, algorithm="sha384").collect()
    assert o.data["spec_digest"] == "sha384:" + hashlib.sha384(raw).hexdigest()


def test_env_values_only_with_the_policy(host: FakeHost) -> None:
    host.process(10, f"0::/runc/{CID}\n", ["sleep"])
    host.runc_container(CID, 10, spec(["sleep"], ["A=1", "B=x=y", "C"]))
    c = collector(host)
    assert "env" not in c.collect()[0].data
    c.update_policy(parse_policy("backend: none\nhashAlgorithm: sha256\n"
                                 "measure:\n  container:\n    withEnvValues: true\n"))  # fmt: skip
    assert c.collect()[0].data["env"] == {"A": "1", "B": "x=y", "C": ""}
    c.update_policy(parse_policy("backend: none\nhashAlgorithm: sha256\n"))
    assert c.collect() == []  # no container section: nothing measured


RUNC_NOT_RUNNING: dict[str, dict[str, Any]] = {
    "created-not-started": {"created_only": True},
    "pid-reused-by-another-process": {"start": START + 1},
    "pod-sandbox": {"labels": ["io.kubernetes.cri.container-type=sandbox"]},
}


@pytest.mark.parametrize("name", sorted(RUNC_NOT_RUNNING))
def test_runc_containers_not_reported(host: FakeHost, name: str) -> None:
    host.process(10, "0::/\n", ["sleep"])
    host.runc_container(CID, 10, spec(["sleep"], []), **RUNC_NOT_RUNNING[name])
    assert collector(host, discover_cgroups=False).collect() == []


def test_runc_container_whose_process_is_gone(host: FakeHost) -> None:
    host.runc_container(CID, 77, spec(["sleep"], []))
    assert collector(host).collect() == []


def test_runc_container_without_bundle_falls_back_to_proc(host: FakeHost) -> None:
    host.process(10, "0::/\n", ["sleep", "5"], ["X=1"])
    host.runc_container(CID, 10, None)
    (o,) = collector(host).collect()
    assert o.data["args"] == ["sleep", "5"]
    assert o.data["env_names"] == ["X"]
    assert o.data["spec_digest"] is None
    assert o.data["mounts"] == []


def test_containers_found_only_through_cgroups(host: FakeHost) -> None:
    cg = f"0::/kubepods/besteffort/pod{UID}/{CID}\n"
    host.process(30, cg, ["sh", "-c", "child"], ["HOME=/root"])
    host.process(31, cg, ["child"])
    host.process(40, f"0::/docker/{CID2}\n", ["nginx"], ["SECRET=v"])
    host.process(50, "0::/system.slice/sshd.service\n", ["sshd"])
    host.process(60, "garbage\n", ["odd"])
    obs = {o.subject: o for o in collector(host).collect()}
    assert set(obs) == {CID, CID2}
    assert obs[CID].data["args"] == ["sh", "-c", "child"]  # the lowest pid: the container's init
    assert obs[CID].data["pod"] == {"name": None, "namespace": None, "uid": UID}
    assert obs[CID].data["runtime"] == "cgroup"
    assert obs[CID2].data["env_names"] == ["SECRET"]
    assert "v" not in json.dumps(obs[CID2].data["env_names"])
    assert obs[CID2].data["pod"] is None


def test_runc_state_wins_over_cgroups(host: FakeHost) -> None:
    host.process(10, f"0::/runc/{CID}\n", ["sleep"])
    host.runc_container(CID, 10, spec(["sleep"], []))
    (o,) = collector(host).collect()
    assert o.data["runtime"] == "runc"


def test_cgroup_discovery_can_be_turned_off(host: FakeHost) -> None:
    host.process(40, f"0::/docker/{CID2}\n", ["nginx"])
    assert collector(host, discover_cgroups=False).collect() == []


def test_unreachable_cri_skips_cgroup_guesses_but_keeps_runc(
    host: FakeHost, tmp_path: Path
) -> None:
    host.process(10, f"0::/runc/{CID}\n", ["sleep"])
    host.runc_container(CID, 10, spec(["sleep"], []))
    host.process(40, f"0::/kubepods/pod{UID}/{CID2}\n", ["app"])
    c = collector(host, cri_socket=tmp_path / "no.sock")
    c._cri.timeout = 2.0  # type: ignore[union-attr]
    obs = c.collect()
    assert [o.subject for o in obs] == [CID]
    assert c.last_error is not None and "UNAVAILABLE" in c.last_error
    c.close()


CRI_LABEL = "io.kubernetes.cri.container-type=container"


def test_cri_made_runc_container_waits_for_an_unreachable_cri(
    host: FakeHost, tmp_path: Path
) -> None:
    host.process(10, f"0::/runc/{CID}\n", ["sleep"])
    host.runc_container(CID, 10, spec(["sleep"], []), labels=[CRI_LABEL])
    c = collector(host, cri_socket=tmp_path / "no.sock")
    assert c.collect() == []
    c.close()


def test_cri_made_runc_container_without_a_cri_socket_is_runc(host: FakeHost) -> None:
    host.process(10, f"0::/runc/{CID}\n", ["sleep"])
    host.runc_container(CID, 10, spec(["sleep"], []), labels=[CRI_LABEL])
    (o,) = collector(host).collect()
    assert o.data["runtime"] == "runc"


def test_watch_without_a_socket_is_none(host: FakeHost) -> None:
    import threading

    assert collector(host).watch(lambda e: None, threading.Event()) is None


def test_pod_collector_without_policy_or_socket_is_empty() -> None:
    assert PodCollector(None, cri_socket=None).collect() == []


OCI_MOUNTS = {
    "proc-is-not-a-bind": ({"destination": "/proc", "type": "proc", "source": "proc"}, None),
    "bind-type": (
        {"destination": "/a", "type": "bind", "source": "/h", "options": ["rbind", "ro"]},
        {"destination": "/a", "source": "/h", "readonly": True, "propagation": "private"},
    ),
    "bind-option-without-type": (
        {"destination": "/a", "source": "/h", "options": ["bind", "rshared"]},
        {"destination": "/a", "source": "/h", "readonly": False, "propagation": "rshared"},
    ),
    "not-a-mapping": ("junk", None),
}


@pytest.mark.parametrize("name", sorted(OCI_MOUNTS))
def test_oci_bind_mounts(name: str) -> None:
    mount, expected = OCI_MOUNTS[name]
    assert oci_bind_mounts([mount]) == ([] if expected is None else [expected])


POD_NAMES = {
    "exact": ("kube-apiserver", "kube-apiserver"),
    "static-pod-on-a-node": ("kube-apiserver-node1", "kube-apiserver"),
    "node-name-with-dashes": ("kube-scheduler-cp-1.example", "kube-scheduler"),
    "longer-word": ("kube-apiserver2", None),
    "other-suffix-without-dash": ("kube-apiserverx-node1", None),
    "prefix-only-of-the-entry": ("kube-api", None),
    "another-pod": ("web-7d4f9", None),
    "case-matters": ("Kube-apiserver-node1", None),
}


@pytest.mark.parametrize("name", sorted(POD_NAMES))
def test_pod_name_matching(name: str) -> None:
    pod, entry = POD_NAMES[name]
    assert pod_matches(pod, ["kube-apiserver", "kube-scheduler"]) == entry
