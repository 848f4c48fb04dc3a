"""The agent benchmark runs end to end at a small size, and its load checks every call."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import struct
from pathlib import Path

import pytest

from benchmarks import bench_agent
from cima._proto.cima import agent_pb2

pytestmark = pytest.mark.skipif(
    shutil.which("h2load") is None,
    reason="h2load (Debian's nghttp2-client, installed by tools/setup-system.sh) is missing",
)


def test_every_row_is_measured_with_h2load() -> None:
    rows = bench_agent.run(entries=2000, seconds=1, clients=4, processes=1, swtpm=False)
    by_name = {r["name"]: r for r in rows}
    reads = by_name["agent reads: GetMeasurement (software platform)"]
    assert reads["load"] == "h2load"
    assert reads["entries"] > 0 and 0 < reads["p50_ms"] <= reads["p99_ms"]
    assert reads["server_cpu_ms_per_request"] > 0
    batched = by_name["agent reports: GetReport, batched (software platform)"]
    unbatched = by_name["agent reports: GetReport, unbatched (software platform)"]
    # Unbatched: a quote per call.
    assert unbatched["requests_per_quote"] == 1.0
    assert batched["requests_per_quote"] > 1.0
    assert batched["ratio_to_unbatched"] > 0
    # The one-core bound comes from the same run's figures.
    expected = 1000.0 / batched["server_cpu_ms_per_request"] / unbatched["entries_per_s"]
    assert batched["ratio_bound_one_core"] == round(expected, 1)
    loaded = next(r for r in rows if r["name"].startswith("agent peak RSS, 2,000"))
    assert loaded["entries"] == 2000 and loaded["peak_rss_mb"] > 0


def test_a_call_the_agent_refuses_fails_the_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """h2load sees HTTP 200 for a gRPC error: the row must fail on the agent's count."""
    unknown = agent_pb2.GetMeasurementRequest(register="pcr99").SerializeToString()
    monkeypatch.setattr(
        bench_agent, "_body", lambda kind: struct.pack(">?I", False, len(unknown)) + unknown
    )
    agent = bench_agent.AgentProcess(mp.get_context("spawn"), directory=str(tmp_path))
    try:
        with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
            bench_agent._h2load(agent, "read", clients=2, seconds=1)
    finally:
        agent.stop()
