"""Isolation end to end: real containers ask the real agent for their view.

Two containers made through containerd's CRI API (pods, as kubelet makes them)
and one started by runc directly each run a small client with the agent's socket
directory mounted in. Each must get its own events in full and the others' only
as digests, the redacted log must still replay to the runtime register, naming
another container's id must be refused, and a host process gets the node view.
The agent runs as ``cima agent`` against swtpm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cima.client import CimaClient
from cima.eventlog.cel import from_json
from cima.eventlog.replay import replay
from cima.platform.swtpm import SWTPM
from tests.containers.pods import PodFactory, RuncFactory, hex_id, python_argv

POLICY = """\
backend: none
hashAlgorithm: sha256
measure:
  container:
    isolated: true
"""

# Runs inside each container: wait until the agent has measured this container
# and its peers, then print what the agent shows it, and what it gets when it names another id.
CLIENT = r"""
import json, sys, time
import grpc
from cima.client import CimaClient
from cima._proto.cima import cima_server_pb2, cima_server_pb2_grpc
other, peers = sys.argv[1], int(sys.argv[2])
sock = "/run/cima/cima.sock"
c = CimaClient(sock)
deadline = time.time() + 30
while True:
    info = c.info()
    runtime = c.get_eventlog("runtime")
    mine = [r for r in runtime if r.content.get("scope") == info["scope"]]
    hidden = [r for r in runtime if r.content.get("redacted")]
    if (mine and len(hidden) >= peers) or time.time() > deadline:
        break
    time.sleep(0.2)
value = c.get_cc_measurement(info["runtime_register"], info["runtime_algorithm"])
records = [r.to_dict() for r in c.get_eventlog("runtime")]
channel = grpc.insecure_channel("unix:" + sock)
stub = cima_server_pb2_grpc.cimaStub(channel)
try:
    stub.GetCcEventlog(cima_server_pb2.GetCcEventlogRequest(container_id=other), timeout=10)
    naming = "allowed"
except grpc.RpcError as e:
    naming = e.code().name
print("RESULT " + json.dumps({"info": info, "records": records,
      "value": value.digest.hex(), "naming": naming}))
"""


@dataclass
class Agent:
    socket: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self) -> CimaClient:
        return CimaClient(str(self.socket))


@pytest.fixture
def agent(
    swtpm: SWTPM, containerd: Any, runc_factory: RuncFactory, tmp_path: Path
) -> Iterator[Agent]:
    sockets = tmp_path / "run-cima"
    sockets.mkdir()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    log = tmp_path / "agent.log"
    cmd = [
        sys.executable, "-m", "cima.cli.main", "agent",
        "--policy", str(policy),
        "--platform", "tpm", "--tcti", swtpm.tcti,
        "--socket", str(sockets / "cima.sock"), "--socket-mode", "0666",
        "--journal", str(tmp_path / "journal"),
        "--cri-socket", str(containerd.socket),
        "--runc-root", str(runc_factory.root),
        "--interval", "0.2",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env={**os.environ})
    a = Agent(sockets / "cima.sock", proc, log)
    deadline = time.monotonic() + 30
    while not a.socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the agent did not start:\n{log.read_text()}")
        time.sleep(0.05)
    try:
        yield a
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _result(output: str) -> dict[str, Any]:
    for line in output.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    raise AssertionError(f"no result from the client:\n{output}")


def _runtime_records(doc: dict[str, Any]) -> list[Any]:
    return from_json(json.dumps(doc["records"]))


def test_each_container_sees_only_its_own_events(
    agent: Agent, pod_factory: PodFactory, runc_factory: RuncFactory
) -> None:
    sockets = agent.socket.parent
    decoy = hex_id()  # a container id that is not the caller's
    pods = [pod_factory.pod(f"tenant-{n}", f"team-{n}") for n in ("a", "b")]
    cri = [
        pod_factory.host_command_container(
            pod, "client", [*python_argv(CLIENT), decoy, "2"], socket_dir=sockets
        )
        for pod in pods
    ]
    runc_id = hex_id()
    runc = runc_factory.run_host_command(
        runc_id, [*python_argv(CLIENT), decoy, "2"], socket_dir=sockets
    )
    try:
        outputs: dict[str, dict[str, Any]] = {}
        for c in cri:
            status = pod_factory.wait_exited(c, timeout=60)
            assert status.exit_code == 0, c.logs() + agent.log.read_text()
            outputs[c.id] = _result(c.logs())
        runc_factory.wait_exited(runc, timeout=60)
        outputs[runc_id] = _result(runc.output.read_text())

        ids = set(outputs)
        assert len(ids) == 3
        for cid, doc in outputs.items():
            info = doc["info"]
            # (1) the agent identified the caller from the kernel, not from the request
            assert info["container_id"] == cid
            assert info["scope"] == f"container:{cid}"
            records = _runtime_records(doc)
            own = [r for r in records if r.content.get("scope") == f"container:{cid}"]
            redacted = [r for r in records if r.content.get("redacted")]
            # (2) its own container events in full, with the data the runtime reported
            assert own, f"{cid}: its own container was not measured"
            assert all(r.content["kind"] == "container" for r in own)
            # (3) nobody else's details: the other containers' events are digests only
            others = ids - {cid}
            text = json.dumps(doc["records"])
            for other in others:
                assert other not in text, f"{cid} can read details of {other}"
            assert len(redacted) >= len(others)
            # (4) the redacted log still replays to the runtime register
            alg = info["runtime_algorithm"]
            bank = replay(records, [alg])
            assert bank.get(info["runtime_register"], alg).hex() == doc["value"]
            # (5) naming another container's id is refused
            assert doc["naming"] == "PERMISSION_DENIED"
    finally:
        for pod in pods:
            pod_factory.remove_pod(pod)
        runc_factory.delete(runc)


def test_host_process_gets_the_node_view(
    agent: Agent, pod_factory: PodFactory, runc_factory: RuncFactory
) -> None:
    pod = pod_factory.pod("tenant-c", "team-c")
    c = pod_factory.container(pod, "sleeper", command=["sleep", "3600"])
    try:
        client = agent.client()
        deadline = time.monotonic() + 20
        while True:
            records = client.get_eventlog("runtime")
            scopes = {r.content.get("scope") for r in records}
            if f"container:{c.id}" in scopes or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        info = client.info()
        assert info["scope"] == "node"
        assert f"container:{c.id}" in scopes
        assert not any(r.content.get("redacted") for r in records)
        alg = info["runtime_algorithm"]
        value = client.get_cc_measurement(info["runtime_register"], alg)
        assert replay(records, [alg]).get(info["runtime_register"], alg) == value.digest
    finally:
        pod_factory.remove_pod(pod)
