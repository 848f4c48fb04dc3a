"""The workload SDK (cima.client) against a running agent: the CC Trusted API names."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cima.agent.events import container_scope
from cima.client import AgentError, CimaClient, default_socket
from cima.digests import by_name
from cima.evidence.batch import verify_inclusion
from cima.evidence.bundle import EvidenceBundle, TPMQuoteReport
from cima.evidence.tpm import verify_quote
from cima.registers import RegisterValue
from tests.agent.test_server import (
    IMA_ENTRIES,
    A,
    Agent,
    boot_log_vector,
    booted_software_platform,
    start_agent,
)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = start_agent(tmp_path_factory.mktemp("client"), booted_software_platform())
    yield a
    a.stop()


@pytest.fixture
def client(agent: Agent) -> Iterator[CimaClient]:
    with CimaClient(agent.socket) as c:
        yield c


def test_default_algorithm_and_count(agent: Agent, client: CimaClient) -> None:
    assert client.get_default_algorithm() == by_name(agent.platform.default_algorithm())
    assert client.get_measurement_count() == 24


def test_get_cc_measurement(agent: Agent, client: CimaClient) -> None:
    value = client.get_cc_measurement("pcr13", "sha384")
    assert value == RegisterValue("pcr13", "sha384", agent.platform.read("pcr13", "sha384"))
    # An int register is a CC Trusted API index (here a PCR's), an int algorithm a TPM_ALG_ID.
    assert client.get_cc_measurement(13, 0x000C) == value
    default = client.get_cc_measurement("pcr10")
    assert default.algorithm == agent.platform.default_algorithm()
    listed = client.list_measurements("sha256")
    assert [v.register for v in listed] == [f"pcr{i}" for i in range(24)]


def test_get_cc_eventlog_joins_the_logs(agent: Agent, client: CimaClient) -> None:
    events = client.get_cc_eventlog()
    boot = len(boot_log_vector()[0])
    assert len(events) == boot + IMA_ENTRIES + len(agent.journal)
    kinds = [r.content_type for r in events]
    assert kinds == ["pcclient_std"] * boot + ["ima_template"] * IMA_ENTRIES + ["cima"] * len(
        agent.journal
    )
    # start and count number the joined records.
    assert client.get_cc_eventlog(boot - 2, 5) == events[boot - 2 : boot + 3]
    assert client.get_cc_eventlog(len(events) - 1) == events[-1:]
    assert client.get_cc_eventlog(len(events)) == []


def test_replay_cc_eventlog(agent: Agent, client: CimaClient) -> None:
    bank = client.replay_cc_eventlog(client.get_cc_eventlog())
    for reg, alg in (("pcr13", "sha384"), ("pcr10", "sha256"), ("pcr10", "sha1")):
        assert bank.get(reg, alg) == agent.platform.read(reg, alg)
    _, expected = boot_log_vector()
    for index, value in expected["sha256"].items():
        assert bank.get(f"pcr{index}", "sha256").hex() == value


def test_paged_reads(client: CimaClient) -> None:
    page = client.get_eventlog_page("ima", 3, 4)
    assert (page.start, page.total, len(page.records), page.next_start) == (3, IMA_ENTRIES, 4, 7)
    assert not page.done
    assert client.get_eventlog("ima", 3, 4) == page.records
    assert [r.recnum for r in client.get_eventlog("ima")] == list(range(IMA_ENTRIES))


def _verify(agent: Agent, report: Any) -> None:
    pcrs = {
        (p["register"], p["algorithm"]): bytes.fromhex(p["digest"])
        for p in report.verification["pcrs"]
    }
    if report.batch is not None:
        verify_inclusion(report.binding, report.batch, report.report_nonce)
    verify_quote(
        report.body,
        report.signature,
        report.verification["ak_pem"],
        nonce=report.report_nonce,
        pcr_values=pcrs,
    )


def test_get_cc_report(agent: Agent, client: CimaClient) -> None:
    nonce, user = os.urandom(32), b"hello"
    report = client.get_cc_report(nonce, user)
    assert (report.kind, report.scope, report.platform) == ("tpm-quote", "node", "software")
    assert report.binding == nonce + user
    _verify(agent, report)


def test_get_evidence(agent: Agent, client: CimaClient) -> None:
    nonce = os.urandom(32)
    bundle = client.get_evidence(nonce, b"ud")
    assert isinstance(bundle, EvidenceBundle)
    assert (bundle.nonce, bundle.user_data, bundle.scope) == (nonce, b"ud", "node")
    bundle.verify_binding()
    assert isinstance(bundle.report, TPMQuoteReport)
    assert EvidenceBundle.from_json(client.get_evidence_json(nonce)).nonce == nonce


def test_a_container_client_gets_its_own_view(agent: Agent) -> None:
    agent.as_container(A)
    try:
        with CimaClient(agent.socket) as c:
            info = c.info()
            assert (info["scope"], info["container_id"]) == (container_scope(A), A)
            bundle = c.get_evidence(b"n")
            assert bundle.scope == container_scope(A)
            bundle.verify_binding()
            events = c.get_cc_eventlog()
            redacted = [r for r in events if r.content == {"redacted": True}]
            assert redacted
            bank = c.replay_cc_eventlog(events)
            assert bank.get("pcr13", "sha384") == agent.platform.read("pcr13", "sha384")
    finally:
        agent.as_host()


def test_errors_carry_the_status(client: CimaClient) -> None:
    with pytest.raises(AgentError) as info:
        client.get_cc_measurement("pcr99")
    assert info.value.code == "INVALID_ARGUMENT"
    with pytest.raises(AgentError) as info:
        client.get_cc_report(bytes(65))
    assert info.value.code == "INVALID_ARGUMENT"
    with pytest.raises(AgentError) as info:
        client.get_eventlog_page("ima", 10**6)
    assert info.value.code == "OUT_OF_RANGE"


def test_no_agent(tmp_path: Path) -> None:
    with CimaClient(tmp_path / "nothing.sock", timeout=2) as c, pytest.raises(AgentError) as info:
        c.get_measurement_count()
    assert info.value.code == "UNAVAILABLE"
    assert "nothing.sock" in str(info.value)


def test_default_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIMA_SOCKET", raising=False)
    assert default_socket() == Path("/run/cima/cima.sock")
    monkeypatch.setenv("CIMA_SOCKET", "/tmp/x.sock")
    assert default_socket() == Path("/tmp/x.sock")


def test_node_request_may_not_use_the_scoped_tag(client: CimaClient) -> None:
    # Otherwise a host caller could obtain a report that reads as a container's.
    from cima.evidence.reportdata import SCOPED_BINDING_TAG

    for nonce, user_data in (
        (b"n", SCOPED_BINDING_TAG),
        (b"n" + SCOPED_BINDING_TAG[:5], SCOPED_BINDING_TAG[5:]),
    ):
        with pytest.raises(AgentError) as info:
            client.get_cc_report(nonce, user_data)
        assert info.value.code == "INVALID_ARGUMENT"
    assert client.get_cc_report(b"n", b"ok").binding == b"nok"
