"""The stage probe (``cluster.stage_probe``): the leader's batcher and gateway record when each
sequenced submit was read, proposed, committed and acked, within a bound of rows; the
benchmarks join those rows with the load generator's send and ack times
(``benchmarks.stages``)."""

from __future__ import annotations

import asyncio
import time

import pytest
from bench_runs import run_benchmark
from test_batcher import FakeRaft, Replies, drain, make_batcher
from test_gateway_io import recorded_connection

from benchmarks import stages
from raftseq.cluster import stage_probe
from raftseq.cluster.gateway import Gateway
from raftseq.cluster.local import free_base_port, local_configs
from raftseq.cluster.metrics import NodeMetrics

WAIT_S = 10.0
BENCH_TIMEOUT_S = 120


@pytest.fixture
def recording(tmp_path, monkeypatch):
    """The probe on in this process, writing into a directory of the test's own."""
    monkeypatch.setattr(stage_probe, "recording", True)
    monkeypatch.setattr(stage_probe, "directory", str(tmp_path))
    monkeypatch.setattr(stage_probe, "sessions", "")
    monkeypatch.setattr(stage_probe, "_rows", [])
    return tmp_path


def test_a_committed_batch_and_its_written_acks_give_one_row_each_in_time_order(recording, tmp_path) -> None:
    config = local_configs(str(tmp_path / "c"), free_base_port(), insecure=True)[0]

    async def story() -> int:
        raft = FakeRaft()
        replies = Replies()
        batcher = make_batcher(raft)
        gateway = Gateway(config, None, batcher=batcher, journal=None, publication=None, metrics=NodeMetrics())
        conn, written = recorded_connection(gateway)
        started_ns = time.monotonic_ns()
        batcher.offer(replies.submit("s", 1))  # proposed at once: nothing in flight
        batcher.offer(replies.submit("s", 2), propose=False)
        raft.commit_all_new(raft.proposals[0])
        await replies.wait_for(1)
        batcher.flush()
        raft.commit_all_new(raft.proposals[1])
        await replies.wait_for(2)
        conn.ack(1, 1)
        conn.ack(2, 2)
        await drain()
        assert written, "the acks were not written"
        return started_ns

    started_ns = asyncio.run(asyncio.wait_for(story(), WAIT_S))
    stage_probe.write()
    sequenced, acks = stages.read_rows(str(recording))
    assert sorted(sequenced) == [1, 2] and sorted(acks) == [1, 2], (sequenced, acks)
    for seq in (1, 2):
        came_in, proposed, committed = sequenced[seq]
        assert started_ns <= came_in <= proposed <= committed <= acks[seq], (seq, sequenced[seq], acks[seq])
    assert sequenced[2][1] >= sequenced[1][2], "the second batch was proposed before the first committed"


def test_only_the_sessions_asked_for_and_at_most_the_bound_of_rows_are_kept(recording, monkeypatch) -> None:
    monkeypatch.setattr(stage_probe, "sessions", "admin")
    monkeypatch.setattr(stage_probe, "_rows_left", 3)

    async def story() -> None:
        raft = FakeRaft()
        replies = Replies()
        batcher = make_batcher(raft)
        submits = [replies.submit("bulk", 1), *(replies.submit("admin", i) for i in range(1, 6))]
        assert batcher.offer_all(submits)
        batcher.flush()
        raft.commit_all_new(raft.proposals[0])
        await replies.wait_for(len(submits))

    asyncio.run(asyncio.wait_for(story(), WAIT_S))
    stage_probe.write()
    sequenced, _ = stages.read_rows(str(recording))
    assert sorted(sequenced) == [2, 3, 4], "the bulk submit recorded, or more rows than the bound"


def test_the_benchmark_joins_the_rows_with_its_own_send_and_ack_times(tmp_path) -> None:
    ms = 1_000_000
    (tmp_path / "stages-1.txt").write_text(f"L 7 {2 * ms} {3 * ms} {6 * ms}\nL 8 {2 * ms} {3 * ms} {6 * ms}\nW 7 2 {7 * ms}\n")
    table = stages.stage_table(str(tmp_path), [(6, 0.0005, 0.010), (7, 0.001, 0.009), (8, 0.0015, 0.0095)])
    assert table["joined"] == 2 and table["submits"] == 3
    means = {name: round(s["mean_ms"], 3) for name, s in table["stages"].items()}
    assert means == {
        "send -> gateway read": 0.75,
        "read -> proposed": 1.0,
        "proposed -> committed": 3.0,
        "committed -> ack written": 1.0,
        "ack written -> acked": 2.25,
    }, means
    assert sum(means.values()) == pytest.approx((0.008 + 0.008) / 2 * 1000)


def test_the_benchmark_says_when_the_rows_of_its_last_submit_never_came(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(stages, "ROWS_POLL_S", 0.01)
    (tmp_path / "stages-1.txt").write_text("L 7 1 2 3\n")
    with pytest.raises(stages.BenchError, match="seq 7"):
        stages.wait_for_rows(str(tmp_path), 7, 0.05)


def test_the_latency_benchmark_prints_and_reports_where_the_time_went(tmp_path) -> None:
    """End to end at smoke size: the nodes record, the benchmark joins nearly every submit.
    Only the shape is checked, never the figures (they depend on the machine)."""
    report, output = run_benchmark(
        "benchmarks.bench_cluster",
        ["--workload", "latency", "--rates", "500", "--latency-seconds", "1", "--stages"],
        tmp_path,
        timeout_s=BENCH_TIMEOUT_S,
    )
    assert "where the time went" in output, output
    table = report["workloads"]["latency"]["rates"]["500"]["stages"]
    assert table["submits"] >= 400 and table["joined"] >= 0.95 * table["submits"], table
    assert list(table["stages"]) == list(stages.STAGES)
    assert all(s["count"] == table["joined"] and s["mean_ms"] >= 0 for s in table["stages"].values()), table
