"""What one caller sees (cima.agent.views): containers isolated, logs that still replay."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from cima.agent.events import NODE, RuntimeEvent, container_scope
from cima.agent.identity import Caller
from cima.agent.journal import Journal
from cima.agent.views import (
    UNKNOWN_OWNER,
    IMAAttribution,
    RedactedIMAEntry,
    View,
    container_register_of,
    ima_owner,
    ima_records,
    ima_view,
    runtime_view,
    view_for,
    view_of,
)
from cima.eventlog import cel
from cima.eventlog.ima import IMAEntry, parse_ascii
from cima.eventlog.replay import replay
from cima.platform.software import SoftwarePlatform
from tests.vectors import manifest, path

A = "a" * 64
B = "b" * 64
C = "c" * 64
POD_A = "0b6a8f6e-1d2c-4e5f-8a9b-0c1d2e3f4a5b"
POD_B = "9f8e7d6c-5b4a-4938-8271-605f4e3d2c1b"

CALLER_A = Caller(pid=100, uid=0, container_id=A, pod_uid=POD_A)
CALLER_B = Caller(pid=200, uid=0, container_id=B, pod_uid=POD_B)
HOST = Caller(pid=1, uid=0, container_id=None, pod_uid=None)


# -- runtime events, journaled and extended for real ----------------------------------------


@pytest.fixture
def journaled(tmp_path: Path) -> tuple[SoftwarePlatform, list[RuntimeEvent]]:
    """A software platform whose pcr13 holds node events and three containers' events."""
    platform = SoftwarePlatform(tmp_path / "platform")
    journal = Journal.open(
        tmp_path / "journal", platform=platform, register="pcr13", algorithm="sha384"
    )
    node = [
        ("agent", NODE, "cima", {"code_digest": "sha384:00"}),
        ("policy", NODE, "/etc/cima/policy.yaml", {"backend": "ima"}),
        ("process", NODE, "/usr/bin/containerd", {"pid": 10, "exe_digest": "sha384:11"}),
        ("pod", NODE, "kube-apiserver", {"name": "kube-apiserver", "namespace": "kube-system"}),
    ]
    for kind, scope, subject, data in node:
        journal.append(kind=kind, scope=scope, subject=subject, data=data)
    for cid, name in ((A, "secret-a"), (B, "secret-b"), (C, "secret-c"), (A, "secret-a2")):
        journal.append(
            kind="container",
            scope=container_scope(cid),
            subject=cid,
            data={"name": name, "image": f"registry.example/{name}:1", "env_names": ["TOKEN"]},
        )
    journal.append(kind="process", scope=NODE, subject="/usr/bin/kubelet", data={"pid": 11})
    events = journal.events()
    journal.close()
    return platform, events


def test_a_container_sees_the_node_and_itself_in_full(
    journaled: tuple[SoftwarePlatform, list[RuntimeEvent]],
) -> None:
    _, events = journaled
    view = view_for(CALLER_A, events, isolated=True, node_view_allowed=True)
    assert [e.seq for e in view] == [e.seq for e in events]
    for original, shown in zip(events, view, strict=True):
        assert shown.digest == original.digest
        if original.scope in (NODE, container_scope(A)):
            assert shown.content == original.content
        else:
            assert shown.is_redacted
            assert shown.content is None


def test_the_redacted_log_replays_to_the_register(
    journaled: tuple[SoftwarePlatform, list[RuntimeEvent]],
) -> None:
    platform, events = journaled
    register = platform.read("pcr13", "sha384")
    for caller in (CALLER_A, CALLER_B, HOST):
        for allowed in (True, False):
            view = view_for(caller, events, isolated=True, node_view_allowed=allowed)
            assert replay(view).get("pcr13", "sha384") == register
            # ... and so does its CEL-JSON, as a client receives it.
            text = cel.to_json([e.to_cel() for e in view])
            assert replay(cel.from_json(text)).get("pcr13", "sha384") == register


def test_redacted_events_reveal_nothing(
    journaled: tuple[SoftwarePlatform, list[RuntimeEvent]],
) -> None:
    _, events = journaled
    text = cel.to_json(
        [e.to_cel() for e in view_for(CALLER_B, events, isolated=True, node_view_allowed=True)]
    )
    assert "secret-b" in text
    for other in (A, C, "secret-a", "secret-c", "secret-a2"):
        assert other not in text
    for record in json.loads(text):
        if record["content"].get("redacted"):
            assert record["content"] == {"redacted": True}


def test_a_host_process_gets_the_node_view_when_allowed(
    journaled: tuple[SoftwarePlatform, list[RuntimeEvent]],
) -> None:
    _, events = journaled
    assert view_for(HOST, events, isolated=True, node_view_allowed=True) == events
    limited = view_for(HOST, events, isolated=True, node_view_allowed=False)
    assert [e.is_redacted for e in limited] == [e.scope not in (NODE,) for e in events]


def test_without_isolation_everyone_sees_everything(
    journaled: tuple[SoftwarePlatform, list[RuntimeEvent]],
) -> None:
    _, events = journaled
    assert view_for(CALLER_A, events, isolated=False, node_view_allowed=False) == events


def test_an_unknown_scope_is_redacted_for_containers() -> None:
    odd = RuntimeEvent.create(
        0, "pcr13", "sha256", kind="marker", scope="pod:x", subject="x", data={}
    )
    assert runtime_view(view_of(CALLER_A, isolated=True, node_view_allowed=True), [odd])[
        0
    ].is_redacted
    assert not runtime_view(view_of(HOST, isolated=True, node_view_allowed=True), [odd])[
        0
    ].is_redacted


def test_container_register_is_the_replay_of_its_own_events(
    journaled: tuple[SoftwarePlatform, list[RuntimeEvent]],
) -> None:
    _, events = journaled
    value = bytes(48)
    for e in events:
        if e.scope == container_scope(A):
            value = hashlib.sha384(value + e.digest).digest()
    view = view_of(CALLER_A, isolated=True, node_view_allowed=True)
    assert container_register_of(view, events, "sha384") == value
    # Redacted copies (what another container's view holds) carry no scope and are skipped.
    assert container_register_of(view, [e.redacted() for e in events], "sha384") == bytes(48)
    with pytest.raises(ValueError):
        container_register_of(
            view_of(HOST, isolated=True, node_view_allowed=True), events, "sha384"
        )


def test_view_scopes() -> None:
    assert view_of(CALLER_A, isolated=True, node_view_allowed=True) == View(
        container_scope(A), False
    )
    assert view_of(CALLER_A, isolated=False, node_view_allowed=True) == View(
        container_scope(A), True
    )
    assert view_of(HOST, isolated=True, node_view_allowed=True) == View(NODE, True)
    assert view_of(HOST, isolated=True, node_view_allowed=False) == View(NODE, False)


# -- IMA ----------------------------------------------------------------------------------------


def _framed(*fields: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(f)) + f for f in fields)


def _dng(alg: bytes, digest: bytes) -> bytes:
    return alg + b":\x00" + digest


def _entry(index: int, template: str, data: bytes) -> IMAEntry:
    return IMAEntry(index, 10, hashlib.sha1(data).digest(), template, data)


def _cgpath(index: int, cgroup: str, file: str) -> IMAEntry:
    digest = hashlib.sha256(file.encode()).digest()
    data = _framed(
        b"/usr/bin/runc:/usr/bin/containerd-shim-runc-v2\x00",
        cgroup.encode() + b"\x00",
        _dng(b"sha256", digest),
        file.encode() + b"\x00",
    )
    return _entry(index, "ima-cgpath", data)


def _cgn(index: int, name: str, file: str) -> IMAEntry:
    digest = hashlib.sha256(file.encode()).digest()
    data = _framed(
        b"/usr/bin/runc\x00",
        name.encode() + b"\x00",
        _dng(b"sha256", digest),
        file.encode() + b"\x00",
    )
    return _entry(index, "ima-dep-cgn", data)


SYSTEMD_A = (
    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
    + POD_A.replace("-", "_")
    + f".slice/cri-containerd-{A}.scope"
)
CGROUPFS_B = f"/kubepods/burstable/pod{POD_B}/{B}"


@pytest.fixture
def ima_entries() -> list[IMAEntry]:
    entry = next(
        e for e in manifest("ima") if e["file"] == "rust-keylime/ascii_runtime_measurements"
    )
    host = list(parse_ascii(path("ima", entry["file"]).read_bytes()))[:6]
    out: list[IMAEntry] = list(host)
    n = len(out)
    extra = [
        _cgpath(n, SYSTEMD_A, "/app/a-secret-binary"),
        _cgpath(n + 1, CGROUPFS_B, "/app/b-secret-binary"),
        _cgn(n + 2, f"cri-containerd-{A}.scope", "/app/a-tool"),
        _cgn(n + 3, B, "/app/b-tool"),
        _cgpath(n + 4, f"/kubepods/burstable/pod{POD_B}", "/pause-like-host-file"),
        _cgpath(n + 5, "/system.slice/containerd.service", "/usr/bin/containerd"),
        # An ima-cgpath entry whose template data does not hold its four fields.
        _entry(n + 6, "ima-cgpath", _framed(b"only one field\x00")),
    ]
    out.extend(extra)
    return out


def test_ima_owners(ima_entries: list[IMAEntry]) -> None:
    owners = [ima_owner(e) for e in ima_entries]
    assert owners[:6] == [None] * 6
    assert owners[6:] == [A, B, A, B, None, None, UNKNOWN_OWNER]


def _replay_ima(items: object, bank: str) -> bytes:
    return replay(items, algorithms=[bank]).get("pcr10", bank)  # type: ignore[arg-type]


@pytest.mark.parametrize("bank", ["sha1", "sha256", "sha384"])
def test_a_container_ima_view_redacts_the_others_and_still_replays(
    ima_entries: list[IMAEntry], bank: str
) -> None:
    owners = IMAAttribution().owners(ima_entries)
    view = view_of(CALLER_A, isolated=True, node_view_allowed=True)
    shown = ima_view(view, ima_entries, owners, algorithms=["sha1", "sha256", "sha384"])
    redacted = [i for i, item in enumerate(shown) if isinstance(item, RedactedIMAEntry)]
    # B's entries and the one that cannot be attributed.
    assert redacted == [7, 9, 12]
    # Independent replay of every entry in full: the kernel's per-bank extends.
    value = bytes(hashlib.new(bank).digest_size)
    for e in ima_entries:
        digest = e.template_hash if bank == "sha1" else hashlib.new(bank, e.template_data).digest()
        value = hashlib.new(bank, value + digest).digest()
    assert _replay_ima(shown, bank) == value
    # As CEL-JSON, as a client receives it.
    records = cel.from_json(cel.to_json(ima_records(shown)))
    assert _replay_ima(records, bank) == value
    served = b"".join(
        r.content["template_data"] for r in records if r.content_type == "ima_template"
    )
    assert b"b-secret-binary" not in served and b"b-tool" not in served
    assert b"a-secret-binary" in served and b"a-tool" in served


def test_the_node_view_shows_every_ima_entry(ima_entries: list[IMAEntry]) -> None:
    owners = IMAAttribution().owners(ima_entries)
    view = view_of(HOST, isolated=True, node_view_allowed=True)
    assert ima_view(view, ima_entries, owners, algorithms=["sha256"]) == ima_entries


def test_ima_attribution_grows_and_restarts(ima_entries: list[IMAEntry]) -> None:
    attribution = IMAAttribution()
    first = list(attribution.owners(ima_entries[:8]))
    assert first == [ima_owner(e) for e in ima_entries[:8]]
    assert list(attribution.owners(ima_entries)) == [ima_owner(e) for e in ima_entries]
    # A shorter list is a new list (the IMA list restarted): attributed again.
    fresh = [_cgpath(0, CGROUPFS_B, "/x"), _cgpath(1, SYSTEMD_A, "/y")]
    assert list(attribution.owners(fresh)) == [B, A]
