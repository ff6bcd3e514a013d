"""Membership changes under load, checked by the history checker.

The story: a three-node cluster under pipelined load loses n2's machine (SIGKILL, for good). A
new node, n4, on new ports with a new data directory and node key, replaces it (``raftseq
member replace n2 --with n4``: n4 joins as a learner, catches up, gets its vote, then n2 is
removed). Then the leader is killed: the two voters left, n4 one of them, elect a new one.
0 acknowledged messages may be lost, renumbered or doubled, and acknowledgements may not stall
for more than 1 s outside the change itself.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

from chaos_tests.checker import check_file
from chaos_tests.history import Complete, HistoryRecorder, load_history
from chaos_tests.scenarios import CHAOS_OVERRIDES, CONVERGE_TIMEOUT_S, RECOVERY_TIMEOUT_S, WARMUP_ACKS
from chaos_tests.test_scenarios import chaos_seed
from chaos_tests.workload import Workload, WorkloadConfig, final_read
from raftseq.cluster import membership_client
from raftseq.cluster.local import LocalCluster
from raftseq.sequencer import protocol
from raftseq.sequencer.journal import verify_journal

#: Longest pause between two acknowledgements allowed outside the membership change.
ACK_STALL_MAX_S = 1.0
#: Pipelined load: three clients, 64 submits in flight each.
LOAD = {"clients": 3, "rate_per_client": 400.0, "window": 64}
CHANGE_TIMEOUT_S = 60.0


def _wait_acks_after(workload: Workload, what: str) -> float:
    started_ns = time.monotonic_ns()
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while time.monotonic() < deadline:
        if workload.ok_since(started_ns):
            return (time.monotonic_ns() - started_ns) / 1e9
        time.sleep(0.02)
    raise AssertionError(f"no acknowledgement within {RECOVERY_TIMEOUT_S:.0f} s {what}")


def _longest_ack_gap_s(history_path: str, *, outside: tuple[int, int]) -> tuple[float, float]:
    """The longest pause between two acknowledgements (seconds) and when it began (seconds
    into the history), leaving out pauses that overlap `outside` (monotonic ns)."""
    times = sorted(e.t for e in load_history(history_path) if isinstance(e, Complete) and e.outcome == "ok")
    low, high = outside
    longest, at = 0.0, 0.0
    for before, after in zip(times, times[1:]):
        if after >= low and before <= high:
            continue
        gap = (after - before) / 1e9
        if gap > longest:
            longest, at = gap, (before - times[0]) / 1e9
    return longest, at


def test_replace_a_dead_node_then_kill_the_leader(tmp_path):
    seed = chaos_seed()
    rng = random.Random(seed)
    print(f"membership replace: seed {seed}", flush=True)
    history_path = os.path.join(tmp_path, "history.jsonl")
    cluster = LocalCluster.started(
        str(tmp_path / "cluster"), rng=random.Random(rng.random()), insecure=False, restart=False, overrides=CHAOS_OVERRIDES
    )
    workload = None
    try:
        with HistoryRecorder(history_path) as history:
            endpoints = list(cluster.endpoints)
            workload = Workload(
                endpoints,
                token=cluster.token,
                history=history,
                rng=random.Random(rng.random()),
                config=WorkloadConfig(subscriber_nodes=[endpoints[0], endpoints[2]], **LOAD),
            )
            workload.start()
            assert workload.wait_for_acks(WARMUP_ACKS, timeout_s=RECOVERY_TIMEOUT_S), f"only {workload.stats.ok} acknowledged"

            # n2's machine is gone.
            killed = history.fault_start("kill", nodes=["n2"])
            cluster.kill("n2")
            cluster.forget_node("n2")
            history.fault_end(killed)
            time.sleep(1.0)  # load goes on with two of three (the figure below covers it)

            # n4: new ports, new data directory, new node key; it joins and replaces n2.
            n4 = cluster.joining_node("n4", rng=random.Random(rng.random()))
            cluster.start_node(n4)
            change_started = time.monotonic_ns()
            change = history.fault_start("membership-replace", old="n2", new="n4")
            new = protocol.MemberRequest("add", "n4", n4.config.raft_address, n4.config.client_address, n4.config.raft_public_key)
            reply = asyncio.run(membership_client.replace(endpoints, "n2", new, token=cluster.token, timeout_s=CHANGE_TIMEOUT_S))
            history.fault_end(change)
            change_ended = time.monotonic_ns()
            print(f"  replaced n2 by n4 in {(change_ended - change_started) / 1e9:.2f} s: membership {reply.number}", flush=True)
            assert sorted((m.id, m.learner) for m in reply.members) == [("n1", False), ("n3", False), ("n4", False)]
            assert reply.removed == ["n2"]
            assert _wait_acks_after(workload, "after the change") < ACK_STALL_MAX_S
            time.sleep(1.0)

            # Kill the leader: the two voters left (n4 is one) must elect a new one.
            leader = cluster.wait_for_leader(timeout_s=RECOVERY_TIMEOUT_S)["id"]
            assert leader in ("n1", "n3", "n4")
            killed = history.fault_start("kill", nodes=[leader], leader=True)
            cluster.kill(leader)
            took = _wait_acks_after(workload, f"after the leader {leader} was killed")
            print(f"  leader {leader} killed: acknowledgements again after {took:.2f} s", flush=True)
            time.sleep(0.5)
            cluster.restart(leader)
            history.fault_end(killed)
            time.sleep(1.0)

            stats = workload.stop()
            workload = None
            cluster.wait_converged(timeout_s=CONVERGE_TIMEOUT_S)
            final_read(cluster.endpoints, token=cluster.token, history=history)
        for node_id in cluster.node_ids:
            report = verify_journal(cluster.journal_dir(node_id))
            assert report.ok, f"{node_id}: {report}"
        report = check_file(history_path)
        print(report.format(), flush=True)
        assert report.ok, f"seed {seed}: {report.format()}"
        assert report.loss.acked_lost == 0
        assert stats.ok >= WARMUP_ACKS
        assert sorted(report.counts.final_reads) == ["n1", "n3", "n4"]
        gap, at = _longest_ack_gap_s(history_path, outside=(change_started, change_ended))
        print(f"  longest pause between acknowledgements outside the change: {gap:.3f} s (at {at:.1f} s)", flush=True)
        assert gap <= ACK_STALL_MAX_S, f"seed {seed}: acknowledgements stalled {gap:.3f} s at {at:.1f} s"
    finally:
        if workload is not None:
            workload.stop(drain_s=0)
        cluster.stop()
