"""The container and pod collectors, and caller identity, against a real containerd and runc.

One containerd per module (``containerd`` fixture). The scene: two pods made
through CRI as kubelet makes them, each with a busybox container, and one
container made by ``runc run -d`` from an OCI bundle. Expected values come from
what the test created (and from the image digests computed when the image was
built), never from the collectors' own output.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cima.agent.collectors.containers import ContainerCollector
from cima.agent.collectors.kubernetes import PodCollector
from cima.agent.cri import CRIError, TaskEvent
from cima.agent.events import container_scope
from cima.agent.identity import caller_from_pid
from cima.agent.policy import ContainerPolicy, KubernetesPolicy, parse_policy
from tests.containers.containerd import Containerd
from tests.containers.pods import (
    Container,
    Images,
    Pod,
    PodFactory,
    RuncContainer,
    RuncFactory,
    hex_id,
    python_argv,
)

SECRET = "s3cr3t-token-value"


@dataclass
class Scene:
    web: Pod
    app: Container
    apiserver_pod: Pod
    apiserver: Container
    runc: RuncContainer
    data_dir: Path
    runc_data: Path


@pytest.fixture(scope="module")
def scene(
    pod_factory: PodFactory,
    runc_factory: RuncFactory,
    tmp_path_factory: pytest.TempPathFactory,
) -> Scene:
    data_dir = tmp_path_factory.mktemp("web-data")
    runc_data = tmp_path_factory.mktemp("runc-data")
    web = pod_factory.pod("web-7d4f9", "team-a")
    app = pod_factory.container(
        web,
        "app",
        command=["sleep"],
        args=["3600"],
        envs={"GREETING": "hello", "API_TOKEN": SECRET},
        mounts=[(data_dir, "/data", True)],
        working_dir="/tmp",
    )
    apiserver_pod = pod_factory.pod("kube-apiserver-node1", "kube-system")
    apiserver = pod_factory.container(
        apiserver_pod,
        "kube-apiserver",
        command=["sleep"],
        args=["3601"],
    )
    runc = runc_factory.run_detached(
        hex_id(),
        ["sleep", "3602"],
        env=["PATH=/usr/bin:/bin", "RUNC_TOKEN=" + SECRET],
        cwd="/tmp",
        binds=[(runc_data, "/mnt/data", True)],
    )
    return Scene(web, app, apiserver_pod, apiserver, runc, data_dir, runc_data)


def collector(containerd: Containerd, runc_factory: RuncFactory) -> ContainerCollector:
    return ContainerCollector(
        ContainerPolicy(),
        cri_socket=containerd.socket,
        runc_roots=[containerd.namespace_runc_root, runc_factory.root],
        algorithm="sha256",
    )


def by_subject(observations: Any) -> dict[str, Any]:
    return {o.subject: o for o in observations}


# -- the container collector ---------------------------------------------------------------------


def test_cri_container_observed_as_created(
    containerd: Containerd, runc_factory: RuncFactory, images: Images, scene: Scene
) -> None:
    obs = by_subject(collector(containerd, runc_factory).collect())
    o = obs[scene.app.id]
    assert (o.kind, o.scope, o.key) == (
        "container",
        container_scope(scene.app.id),
        f"container:{scene.app.id}",
    )
    d = o.data
    assert d["runtime"] == "cri"
    assert d["name"] == "app"
    assert d["image"] == images.busybox.ref
    assert d["image_id"] == images.busybox.config_digest
    assert d["image_digest"] == images.busybox.manifest_digest
    assert d["args"] == ["sleep", "3600"]
    assert d["cwd"] == "/tmp"
    assert d["pod"] == {"name": "web-7d4f9", "namespace": "team-a", "uid": scene.web.uid}
    assert {"destination": "/data", "source": str(scene.data_dir), "readonly": True,
            "propagation": "private"} in d["mounts"]  # fmt: skip
    assert {"GREETING", "API_TOKEN", "PATH"} <= set(d["env_names"])


def test_env_values_absent_unless_the_policy_asks(
    containerd: Containerd, runc_factory: RuncFactory, scene: Scene
) -> None:
    c = collector(containerd, runc_factory)
    obs = by_subject(c.collect())
    for cid in (scene.app.id, scene.runc.id):
        assert "env" not in obs[cid].data
        assert SECRET not in json.dumps(obs[cid].data)
    # A reloaded policy that asks for values shows them (nothing kept from before).
    c.update_policy(
        parse_policy(
            "backend: none\nhashAlgorithm: sha256\nmeasure:\n  container:\n"
            "    withEnvValues: true\n"
        )
    )
    with_values = by_subject(c.collect())
    assert with_values[scene.app.id].data["env"]["API_TOKEN"] == SECRET
    assert with_values[scene.app.id].data["env"]["GREETING"] == "hello"
    assert with_values[scene.runc.id].data["env"]["RUNC_TOKEN"] == SECRET


def test_runc_container_observed_from_its_state_and_bundle(
    containerd: Containerd, runc_factory: RuncFactory, scene: Scene
) -> None:
    obs = by_subject(collector(containerd, runc_factory).collect())
    d = obs[scene.runc.id].data
    assert obs[scene.runc.id].scope == container_scope(scene.runc.id)
    assert d["runtime"] == "runc"
    assert d["name"] == scene.runc.id
    assert d["args"] == ["sleep", "3602"]
    assert d["cwd"] == "/tmp"
    assert d["env_names"] == ["PATH", "RUNC_TOKEN"]
    assert d["pod"] is None and d["image"] is None
    assert {"destination": "/mnt/data", "source": str(scene.runc_data), "readonly": True,
            "propagation": "private"} in d["mounts"]  # fmt: skip
    assert d["bundle"] == str(scene.runc.bundle)
    assert d["spec_digest"] == "sha256:" + hashlib.sha256(scene.runc.config_bytes).hexdigest()


def test_exactly_the_three_containers_and_no_sandbox(
    containerd: Containerd, runc_factory: RuncFactory, scene: Scene
) -> None:
    obs = by_subject(collector(containerd, runc_factory).collect())
    assert set(obs) == {scene.app.id, scene.apiserver.id, scene.runc.id}
    assert scene.web.sandbox_id not in obs
    assert scene.apiserver_pod.sandbox_id not in obs


def test_without_runc_roots_the_runc_container_is_found_through_its_cgroup(
    containerd: Containerd, scene: Scene
) -> None:
    c = ContainerCollector(
        ContainerPolicy(), cri_socket=containerd.socket, runc_roots=(), algorithm="sha256"
    )
    d = by_subject(c.collect())[scene.runc.id].data
    assert d["runtime"] == "cgroup"
    assert d["args"] == ["sleep", "3602"]
    assert "RUNC_TOKEN" in d["env_names"]


def test_a_restarted_container_is_a_new_observation_and_wakes_the_watcher(
    containerd: Containerd, runc_factory: RuncFactory, pod_factory: PodFactory, scene: Scene
) -> None:
    pod = pod_factory.pod("restarts-1", "team-a")
    first = pod_factory.container(pod, "worker", command=["sleep", "3603"])
    c = collector(containerd, runc_factory)
    events: list[TaskEvent] = []
    arrived = threading.Event()
    stop = threading.Event()

    def on_event(event: TaskEvent) -> None:
        events.append(event)
        arrived.set()

    thread = c.watch(on_event, stop)
    assert thread is not None
    try:
        time.sleep(0.3)  # the subscription is in place
        before = by_subject(c.collect())
        assert first.id in before
        pod_factory.stop_container(first)
        second = pod_factory.container(pod, "worker", command=["sleep", "3603"])
        deadline = time.monotonic() + 10
        while not any(e.container_id == second.id for e in events):
            assert arrived.wait(max(0.0, deadline - time.monotonic())), "no /tasks/start event"
            arrived.clear()
        start = next(e for e in events if e.container_id == second.id)
        assert start.topic == "/tasks/start"
        assert start.namespace == "k8s.io"
        assert start.pid == pod_factory.status(second).pid
        after = by_subject(c.collect())
        assert second.id in after and first.id not in after
        assert after[second.id].key != before[first.id].key
        assert after[second.id].data == before[first.id].data  # same container, same data
    finally:
        stop.set()
        thread.join(5)
        pod_factory.remove_pod(pod)
    assert not thread.is_alive()


# -- the pod collector ---------------------------------------------------------------------------


def test_pod_collector_picks_the_named_pods_only(containerd: Containerd, scene: Scene) -> None:
    policy = KubernetesPolicy.model_validate(
        {"withParameter": True, "pods": ["kube-apiserver", "kube-scheduler"]}
    )
    obs = PodCollector(policy, cri_socket=containerd.socket).collect()
    assert [o.subject for o in obs] == ["kube-system/kube-apiserver-node1"]
    (o,) = obs
    assert (o.kind, o.scope) == ("pod", "node")
    assert o.key == f"pod:kube-system/kube-apiserver-node1:{scene.apiserver_pod.uid}"
    assert o.data == {
        "name": "kube-apiserver-node1",
        "namespace": "kube-system",
        "uid": scene.apiserver_pod.uid,
        "containers": [
            {
                "name": "kube-apiserver",
                "image": scene.apiserver.image,
                "args": ["sleep", "3601"],
            }
        ],
    }


def test_pod_collector_without_parameters_omits_args(containerd: Containerd, scene: Scene) -> None:
    policy = KubernetesPolicy.model_validate({"pods": ["kube-apiserver", "web"]})
    obs = {o.subject: o for o in PodCollector(policy, cri_socket=containerd.socket).collect()}
    assert set(obs) == {"kube-system/kube-apiserver-node1", "team-a/web-7d4f9"}
    assert obs["team-a/web-7d4f9"].data["containers"] == [{"name": "app", "image": scene.app.image}]


def test_cri_errors_carry_the_status_code(containerd: Containerd) -> None:
    with pytest.raises(CRIError) as e:
        containerd.cri.container_status("0" * 64)
    assert e.value.code == "NOT_FOUND"


# -- identity --------------------------------------------------------------------------------------


def test_cri_container_pid_maps_to_its_id_and_pod(pod_factory: PodFactory, scene: Scene) -> None:
    pid = pod_factory.status(scene.app).pid
    assert pid is not None
    caller = caller_from_pid(pid, 0)
    assert caller.container_id == scene.app.id
    assert caller.pod_uid == scene.web.uid


def test_runc_container_pid_maps_to_its_id(scene: Scene) -> None:
    caller = caller_from_pid(scene.runc.pid, 0)
    assert caller.container_id == scene.runc.id
    assert caller.pod_uid is None


def test_runc_container_with_a_plain_name_needs_its_state_dir(runc_factory: RuncFactory) -> None:
    c = runc_factory.run_detached("cima-named", ["sleep", "3604"])
    try:
        assert caller_from_pid(c.pid, 0).container_id is None
        named = caller_from_pid(c.pid, 0, runc_roots=[runc_factory.root])
        assert named.container_id == "cima-named"
    finally:
        runc_factory.delete(c)


def test_host_process_is_not_a_container() -> None:
    caller = caller_from_pid(os.getpid(), os.getuid())
    assert caller.container_id is None and caller.pod_uid is None


# -- a host command (Python with cima) in a container, through a socket directory ------------------

CLIENT = """
import socket, cima
s = socket.socket(socket.AF_UNIX)
s.connect("/run/cima/agent.sock")
s.sendall(b"hello")
print("reply", s.recv(64).decode())
print("cima", cima.__file__)
print(open("/proc/self/cgroup").read())
"""


class PeerServer:
    """A Unix socket server that identifies each peer at accept time (SO_PEERCRED)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "agent.sock"
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(self.path))
        self.sock.listen(4)
        self.sock.settimeout(60)
        self.callers: list[Any] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            self.callers.append(caller_from_pid(pid, uid))
            conn.recv(64)
            conn.sendall(b"identified")

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def test_python_client_in_a_cri_container(
    pod_factory: PodFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sockets = tmp_path_factory.mktemp("sock")
    server = PeerServer(sockets)
    pod = pod_factory.pod("client-1", "team-b")
    try:
        c = pod_factory.host_command_container(
            pod, "client", python_argv(CLIENT), socket_dir=sockets
        )
        status = pod_factory.wait_exited(c)
        out = c.logs()
        assert status.exit_code == 0, out
        assert "reply identified" in out, out
        assert f"/kubepods/besteffort/pod{pod.uid}/{c.id}" in out
        server.thread.join(10)
        assert [(x.container_id, x.pod_uid) for x in server.callers] == [(c.id, pod.uid)]
    finally:
        server.close()
        pod_factory.remove_pod(pod)


def test_python_client_in_a_runc_container(
    runc_factory: RuncFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sockets = tmp_path_factory.mktemp("sock")
    server = PeerServer(sockets)
    cid = hex_id()
    c = runc_factory.run_host_command(cid, python_argv(CLIENT), socket_dir=sockets)
    try:
        runc_factory.wait_exited(c)
        out = c.output.read_text()
        assert "reply identified" in out, out
        assert f"{c.cgroups_path}\n" in out
        server.thread.join(10)
        assert [(x.container_id, x.pod_uid) for x in server.callers] == [(cid, None)]
    finally:
        server.close()
        runc_factory.delete(c)
