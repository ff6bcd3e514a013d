"""Partial faults cost about as little as a kill (issue 16, item 5).

A leader that no longer hears a majority stops leading within two election timeouts (Raft's
check-quorum, pysyncobj's ``leaderFallbackTimeout`` set from ``raft.leader_fallback_timeout_s``),
and a client whose leader goes silent while its submits wait asks the other nodes who leads and
moves there, instead of waiting out its whole ``heartbeat_timeout_s``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pysyncobj.syncobj
import pytest
from cluster_harness import running_cluster  # noqa: F401
from pysyncobj import SyncObjConf
from pysyncobj.node import TCPNode
from test_raft_member import LEADER_STATE, free_address

from raftseq.clients import SequencerClient
from raftseq.clients.metrics import ClientMetricsCollector
from raftseq.cluster.config import RaftConfig
from raftseq.cluster.raft.member import RaftMember


class Outbox:
    """Stands in for pysyncobj's transport: a leader with no peer to talk to."""

    ready = True

    def send(self, node, message) -> bool:
        return True

    def tryGetReady(self) -> None:  # noqa: N802 (pysyncobj's name)
        pass


@pytest.fixture
def leader_of_three():
    """A member leading a three-node cluster with the node config's default timings, its
    messages going nowhere; returns (member, its two peers)."""
    r = RaftConfig()
    address, peers = free_address(), [free_address(), free_address()]
    conf = SyncObjConf(
        autoTick=False,
        bindAddress=address,
        dynamicMembershipChange=False,
        raftMinTimeout=r.election_timeout_min_s,
        raftMaxTimeout=r.election_timeout_max_s,
        appendEntriesPeriod=r.append_entries_period_s,
        leaderFallbackTimeout=r.leader_fallback_timeout_s,
    )
    member = RaftMember(address, peers, conf)
    real_transport = member._SyncObj__transport
    member._SyncObj__transport = Outbox()
    member._SyncObj__onBecomeLeader()
    assert member._SyncObj__raftState == LEADER_STATE
    try:
        yield member, [TCPNode(p) for p in peers]
    finally:
        member._SyncObj__transport = real_transport
        member.destroy()


def last_heard(member, peer, seconds_ago: float) -> None:
    member._SyncObj__lastResponseTime[peer] = pysyncobj.syncobj.monotonicTime() - seconds_ago


def test_a_leader_that_hears_no_majority_for_two_election_timeouts_steps_down(leader_of_three):
    member, peers = leader_of_three
    silence_s = 2 * RaftConfig().election_timeout_max_s + 0.05
    last_heard(member, peers[0], silence_s)
    last_heard(member, peers[1], 0.0)
    member._onTick(0)
    assert member._SyncObj__raftState == LEADER_STATE, "one follower and itself are a majority"

    last_heard(member, peers[1], silence_s)
    member._onTick(0)
    assert member._SyncObj__raftState != LEADER_STATE, "no reply from a majority for two election timeouts"
    assert member._getLeader() is None


def test_the_quorum_check_is_two_election_timeouts():
    r = RaftConfig()
    assert r.leader_fallback_timeout_s == 2 * r.election_timeout_max_s


async def submit_through_a_pause(cluster, leader: dict, *, heartbeat_timeout_s: float, metrics=None) -> tuple[float, SequencerClient]:
    """Submit once, SIGSTOP the leader, submit again: how long the second submit took."""
    async with SequencerClient(
        cluster.endpoints, session="pause", token=cluster.token, heartbeat_timeout_s=heartbeat_timeout_s, metrics=metrics
    ) as client:
        await client.submit(b"before")
        pid = cluster.pid(leader["id"])
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            await asyncio.wait_for(client.submit(b"during"), 30)
            took = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        return took, client


def test_a_client_leaves_a_paused_leader_in_about_an_election_not_its_heartbeat_timeout(running_cluster):
    # The heartbeat timeout is long on purpose: only the probe can make the submit this quick.
    heartbeat_timeout_s = 5.0
    collector = ClientMetricsCollector()
    took, client = asyncio.run(
        submit_through_a_pause(
            running_cluster, running_cluster.wait_for_leader(), heartbeat_timeout_s=heartbeat_timeout_s, metrics=collector
        )
    )
    print(f"acknowledged {took:.2f} s after the leader was paused")
    assert took < heartbeat_timeout_s / 2
    assert client.silent_leaders_left == 1
    [family] = [f for f in collector.collect() if f.name == "raftseq_client_silent_leaders_left"]
    assert [s.value for s in family.samples if s.name.endswith("_total")] == [1], "exported, and kept after the client closed"
    assert client.failovers == 1
