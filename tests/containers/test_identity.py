"""Caller identity from /proc/<pid>/cgroup: every runtime's layout, one assertion each.

The texts are written from the layouts the runtimes document and produce:
``cgroups(7)`` for the file format (v1 ``id:controllers:path``, v2 ``0::path``),
kubelet's cgroup manager (``/kubepods[/<qos>]/pod<uid>``, systemd
``kubepods-<qos>-pod<uid with _>.slice``), containerd's CRI plugin
(``cri-containerd-<id>.scope`` with the systemd driver, ``<parent>/<id>``
with cgroupfs), CRI-O (``crio-<id>.scope``, ``crio-conmon-<id>.scope`` for its
monitor), Docker (``/docker/<id>``, ``docker-<id>.scope``), Podman
(``libpod-<id>.scope``), ``ctr run`` (``/<namespace>/<id>``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cima.agent.identity import (
    Caller,
    IdentityError,
    caller_from_pid,
    container_id_from_cgroup,
    parse_cgroup,
    pod_uid_from_cgroup,
    runc_container_for_cgroup,
)

CID = "3f4e1c9a8b7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f"
OTHER = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
UID = "0b6a2b8e-5c1d-4f3e-9a7b-1c2d3e4f5a6b"
UID_ = UID.replace("-", "_")
STATIC_UID = "6d1a5c3e5b3f4f6ab0c9e1d2f3a4b5c6"
V1_CONTROLLERS = (
    "12:hugetlb", "11:memory", "10:pids", "9:cpu,cpuacct", "8:devices", "7:freezer",
    "6:net_cls,net_prio", "5:blkio", "4:perf_event", "3:cpuset", "2:rdma", "1:name=systemd",
)  # fmt: skip


def v1(path: str, *, unified: str | None = "/") -> str:
    """A cgroup v1 (hybrid) file: every controller at ``path``, and the v2 line."""
    lines = [f"{c}:{path}" for c in V1_CONTROLLERS]
    if unified is not None:
        lines.append(f"0::{unified}")
    return "\n".join(lines) + "\n"


def v2(path: str) -> str:
    return f"0::{path}\n"


# name -> (text, container id, pod uid)
LAYOUTS: dict[str, tuple[str, str | None, str | None]] = {
    "containerd-cri-cgroupfs-v1-besteffort": (
        v1(f"/kubepods/besteffort/pod{UID}/{CID}"), CID, UID),
    "containerd-cri-cgroupfs-v1-hybrid-unified-too": (
        v1(f"/kubepods/besteffort/pod{UID}/{CID}", unified=f"/kubepods/besteffort/pod{UID}/{CID}"),
        CID, UID),
    "containerd-cri-cgroupfs-v2-burstable": (v2(f"/kubepods/burstable/pod{UID}/{CID}"), CID, UID),
    "containerd-cri-cgroupfs-v2-guaranteed": (v2(f"/kubepods/pod{UID}/{CID}"), CID, UID),
    "containerd-cri-systemd-v2-besteffort": (
        v2("/kubepods.slice/kubepods-besteffort.slice/"
           f"kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"), CID, UID),
    "containerd-cri-systemd-v2-guaranteed": (
        v2(f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope"), CID, UID),
    "containerd-cri-systemd-v1": (
        v1("/kubepods.slice/kubepods-burstable.slice/"
           f"kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"), CID, UID),
    "crio-systemd-v2": (
        v2("/kubepods.slice/kubepods-burstable.slice/"
           f"kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope"), CID, UID),
    "crio-cgroupfs-v1": (v1(f"/kubepods/burstable/pod{UID}/crio-{CID}"), CID, UID),
    "crio-conmon-is-a-host-process": (
        v2("/kubepods.slice/kubepods-burstable.slice/"
           f"kubepods-burstable-pod{UID_}.slice/crio-conmon-{CID}.scope"), None, UID),
    "docker-cgroupfs-v1": (v1(f"/docker/{CID}"), CID, None),
    "docker-systemd-v2": (v2(f"/system.slice/docker-{CID}.scope"), CID, None),
    "docker-systemd-v1": (v1(f"/system.slice/docker-{CID}.scope"), CID, None),
    "docker-in-docker-innermost": (v1(f"/docker/{OTHER}/docker/{CID}"), CID, None),
    "podman-root-v2": (v2(f"/machine.slice/libpod-{CID}.scope"), CID, None),
    "podman-rootless-v2": (
        v2(f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope"),
        CID, None),
    "podman-conmon-is-a-host-process": (v2(f"/machine.slice/libpod-conmon-{CID}.scope"),
                                        None, None),
    "ctr-run-cgroupfs-namespace-parent": (v2(f"/default/{CID}"), CID, None),
    "containerd-systemd-scope-outside-kubernetes": (
        v2(f"/system.slice/containerd-{CID}.scope"), CID, None),
    "systemd-inside-a-container": (v2(f"/kubepods/besteffort/pod{UID}/{CID}/init.scope"),
                                   CID, UID),
    "agent-in-its-own-cgroup-namespace": (v2(f"/../../kubepods/besteffort/pod{UID}/{CID}"),
                                          CID, UID),
    "static-pod-uid-without-dashes": (v1(f"/kubepods/burstable/pod{STATIC_UID}/{CID}"),
                                      CID, STATIC_UID),
    "only-one-v1-hierarchy-names-it": (
        f"4:memory:/kubepods/besteffort/pod{UID}/{CID}\n1:name=systemd:/\n0::/\n", CID, UID),
    "host-root": (v1("/"), None, None),
    "host-v2-root": (v2("/"), None, None),
    "host-systemd-service": (v2("/system.slice/containerd.service"), None, None),
    "host-kubelet": (v1("/system.slice/kubelet.service"), None, None),
    "host-user-session": (v2("/user.slice/user-0.slice/session-3.scope"), None, None),
    "host-sandbox-with-a-32-hex-name": (
        "4:memory:/process_api/63d2cdf3a604ca2fb184f41c6de4d029\n0::/\n", None, None),
    "pod-slice-but-no-container-yet": (v2(f"/kubepods/besteffort/pod{UID}"), None, UID),
    "pod-component-outside-kubepods": (v2(f"/pod{UID}/{CID}"), CID, None),
    "uppercase-hex-is-no-runtime-id": (v2(f"/docker/{CID.upper()}"), None, None),
    "63-hex-is-no-id": (v2(f"/docker/{CID[:63]}"), None, None),
    "65-hex-is-no-id": (v2(f"/docker/{CID}0"), None, None),
    "unknown-prefix-is-no-id": (v2(f"/system.slice/lxc-{CID}.scope"), None, None),
    "empty-file": ("", None, None),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_container_id_of_each_layout(name: str) -> None:
    text, cid, _ = LAYOUTS[name]
    assert container_id_from_cgroup(text) == cid


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_pod_uid_of_each_layout(name: str) -> None:
    text, _, uid = LAYOUTS[name]
    assert pod_uid_from_cgroup(text) == uid


CONTRADICTIONS = {
    "two-containers-in-two-hierarchies": (
        f"11:memory:/kubepods/besteffort/pod{UID}/{CID}\n"
        f"9:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{OTHER}\n0::/\n"
    ),
    "v1-and-v2-disagree": f"11:memory:/docker/{CID}\n0::/docker/{OTHER}\n",
}


@pytest.mark.parametrize("name", sorted(CONTRADICTIONS))
def test_contradictory_cgroups_are_an_error_not_the_host(name: str) -> None:
    with pytest.raises(IdentityError, match="different containers"):
        container_id_from_cgroup(CONTRADICTIONS[name])


def test_pods_that_disagree_are_an_error() -> None:
    text = f"11:memory:/kubepods/pod{UID}/{CID}\n0::/kubepods/pod{STATIC_UID}/{CID}\n"
    with pytest.raises(IdentityError, match="different pods"):
        pod_uid_from_cgroup(text)


MALFORMED = {
    "no-colons": "garbage\n",
    "hierarchy-not-a-number": "x:memory:/docker\n",
    "relative-path": "1:cpu:docker/abc\n",
    "two-fields": "0:/\n",
    "good-then-bad": f"0::/docker/{CID}\nnot a line\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_cgroup_text_is_an_identity_error(name: str) -> None:
    with pytest.raises(IdentityError, match="malformed"):
        parse_cgroup(MALFORMED[name])


def test_parse_cgroup_lines() -> None:
    lines = parse_cgroup("9:cpu,cpuacct:/a\n1:name=systemd:/b\n0::/c\n")
    assert [(x.hierarchy, x.controllers, x.path, x.unified) for x in lines] == [
        (9, ("cpu", "cpuacct"), "/a", False),
        (1, ("name=systemd",), "/b", False),
        (0, (), "/c", True),
    ]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_random_text_gives_an_id_none_or_an_identity_error(text: str) -> None:
    try:
        cid = container_id_from_cgroup(text)
        uid = pod_uid_from_cgroup(text)
    except IdentityError:
        return
    assert cid is None or (len(cid) == 64 and cid in text)
    assert uid is None or uid.replace("-", "_") in text or uid in text


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(LAYOUTS)),
    st.integers(min_value=0, max_value=400),
    st.sampled_from(["", ":", "/", "\n", "0", "-", "_", "..", "a"]),
)
def test_mutated_layouts_give_an_id_none_or_an_identity_error(
    name: str, at: int, insert: str
) -> None:
    text = LAYOUTS[name][0]
    at = min(at, len(text))
    mutated = text[:at] + insert + text[at:]
    try:
        cid = container_id_from_cgroup(mutated)
    except IdentityError:
        return
    assert cid is None or cid in mutated


# -- runc containers named in their state directories (rule 5) -------------------------------------


def runc_state(
    root: Path, cid: str, *, path: str = "", cgroup_paths: dict[str, str] | None = None
) -> None:
    d = root / cid
    d.mkdir(parents=True)
    state = {
        "id": cid,
        "init_process_pid": 1,
        "config": {"cgroups": {"path": path}, "labels": [f"bundle=/bundles/{cid}"]},
        "cgroup_paths": cgroup_paths or {},
    }
    (d / "state.json").write_text(json.dumps(state))


RUNC_CASES: dict[str, tuple[str, str | None]] = {
    "exact-cgroupfs-path-v1": (v1("/mygroup/box"), "box"),
    "exact-cgroupfs-path-v2": (v2("/mygroup/box"), "box"),
    "parent-of-the-container-cgroup": (v2("/mygroup"), None),
    "same-leaf-elsewhere": (v2("/other/box"), None),
    "leaf-alone": (v2("/box"), None),
    "child-of-the-container-cgroup": (v2("/mygroup/box/sub"), None),
    "systemd-driver-v2-pure": (v2("/system.slice/runc-sysd.scope"), "sysd"),
    "systemd-driver-hybrid-v1-line": ("1:name=systemd:/system.slice/runc-hyb.scope\n0::/\n",
                                      "hyb"),
    "systemd-driver-wrong-controller": ("4:memory:/system.slice/runc-hyb.scope\n0::/\n", None),
    "host-root": (v1("/"), None),
}  # fmt: skip


@pytest.fixture
def runc_root(tmp_path: Path) -> Path:
    root = tmp_path / "runc"
    runc_state(root, "box", path="/mygroup/box")
    runc_state(
        root,
        "sysd",
        cgroup_paths={"": "/sys/fs/cgroup/system.slice/runc-sysd.scope"},
    )
    runc_state(
        root,
        "hyb",
        cgroup_paths={
            "name=systemd": "/sys/fs/cgroup/systemd/system.slice/runc-hyb.scope",
            "": "/sys/fs/cgroup/unified/system.slice/runc-hyb.scope",
        },
    )
    (root / "not-a-container").mkdir()
    (root / "bad-json").mkdir()
    (root / "bad-json" / "state.json").write_text("{")
    return root


@pytest.mark.parametrize("name", sorted(RUNC_CASES))
def test_runc_rule(runc_root: Path, name: str) -> None:
    text, expected = RUNC_CASES[name]
    assert runc_container_for_cgroup(parse_cgroup(text), [runc_root]) == expected


def test_two_runc_containers_claiming_one_cgroup_is_an_error(runc_root: Path) -> None:
    runc_state(runc_root, "box2", path="/mygroup/box")
    with pytest.raises(IdentityError, match="several runc containers"):
        runc_container_for_cgroup(parse_cgroup(v2("/mygroup/box")), [runc_root])


def test_missing_runc_root_is_no_container(tmp_path: Path) -> None:
    assert runc_container_for_cgroup(parse_cgroup(v2("/a/b")), [tmp_path / "none"]) is None


# -- caller_from_pid -------------------------------------------------------------------------------


def fake_proc(tmp_path: Path, pid: int, text: str | bytes) -> Path:
    proc = tmp_path / "proc"
    (proc / str(pid)).mkdir(parents=True)
    data = text.encode() if isinstance(text, str) else text
    (proc / str(pid) / "cgroup").write_bytes(data)
    return proc


def test_caller_from_pid_reads_the_cgroup_file(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 4242, LAYOUTS["containerd-cri-cgroupfs-v1-besteffort"][0])
    assert caller_from_pid(4242, 1000, proc_root=proc) == Caller(4242, 1000, CID, UID)


def test_caller_from_pid_uses_runc_roots_only_when_asked(tmp_path: Path, runc_root: Path) -> None:
    proc = fake_proc(tmp_path, 7, v1("/mygroup/box"))
    assert caller_from_pid(7, 0, proc_root=proc).container_id is None
    assert caller_from_pid(7, 0, proc_root=proc, runc_roots=[runc_root]).container_id == "box"


def test_a_hex_cgroup_needs_no_runc_root(tmp_path: Path, runc_root: Path) -> None:
    proc = fake_proc(tmp_path, 8, v2(f"/mygroup/{CID}"))
    assert caller_from_pid(8, 0, proc_root=proc, runc_roots=[runc_root]).container_id == CID


BAD_CALLERS = {
    "gone": (None, "exited before"),
    "oversized": (b"0::/" + b"a" * (70 * 1024) + b"\n", "larger than"),
    "contradictory": (CONTRADICTIONS["v1-and-v2-disagree"].encode(), "different containers"),
    "malformed": (b"garbage\n", "malformed"),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLERS))
def test_caller_that_cannot_be_identified_is_an_error(tmp_path: Path, name: str) -> None:
    text, message = BAD_CALLERS[name]
    proc = fake_proc(tmp_path, 99, text) if text is not None else tmp_path / "empty-proc"
    with pytest.raises(IdentityError, match=message):
        caller_from_pid(99, 0, proc_root=proc)


@pytest.mark.parametrize("pid", [0, -1])
def test_caller_without_a_pid_is_an_error(pid: int) -> None:
    with pytest.raises(IdentityError, match="no process id"):
        caller_from_pid(pid, 0)


def test_this_test_process_is_on_the_host() -> None:
    caller = caller_from_pid(os.getpid(), os.getuid())
    assert caller.on_host and caller.pod_uid is None
