"""Relays (``raftseq relay``) beside a real three-node cluster: they follow the cluster through a
leader kill, chain, serve subscribers and the state-machine runner like a node, send submits on
to the leader, disconnect a subscriber that stops reading, and refuse upstreams that are
themselves or hold other records.

Each test starts its own cluster (``running_cluster``) and relays as processes
(``cluster.relay_local``), stopped at teardown whatever happens.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest
from cluster_harness import ClusterHarness, StreamRecorder, pipeline, running_cluster  # noqa: F401

from raftseq.clients import SequencerClient, subscribe
from raftseq.clients.connection import open_connection
from raftseq.cluster.local import LocalCluster, free_base_port
from raftseq.cluster.node_exit import NodeExit
from raftseq.cluster.relay_local import LocalRelay, local_relays, wait_relay_serving
from raftseq.sequencer import protocol
from raftseq.sequencer.journal import list_segment_files

STEP_TIMEOUT_S = 60


@pytest.fixture
def relays(running_cluster, tmp_path):
    """A function starting relays of the running cluster (``upstream``: the nodes, or a relay's
    address for a chain); every relay started is stopped at teardown."""
    h = running_cluster
    started: list[LocalRelay] = []

    def start(count: int = 1, *, upstream: list[str] | None = None, subscriber_lag_max: int | None = None) -> list[LocalRelay]:
        made = local_relays(os.path.join(h.data_dir, f"relays{len(started)}"), h.base_port + len(started), count, upstream=upstream or h.endpoints, token=h.token)
        for relay in made:
            relay.subscriber_lag_max = subscriber_lag_max
            relay.start()
            started.append(relay)
        return made

    try:
        yield start
    finally:
        for relay in started:
            relay.stop()
            print(f"--- {relay.id} log (tail) ---\n" + "\n".join(relay.log_text().splitlines()[-15:]), flush=True)


async def submit_all(h: ClusterHarness, session: str, payloads: list[bytes], *, endpoints: list[str] | None = None) -> list[int]:
    async with SequencerClient(endpoints or h.endpoints, session=session, token=h.token, in_flight_max=2000) as client:
        return await pipeline(client, payloads, timeout_s=STEP_TIMEOUT_S)


def payloads(prefix: str, count: int) -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(count)]


def assert_gapless(messages, first: int, last: int) -> None:
    seqs = [m.seq for m in messages]
    assert seqs == list(range(first, last + 1)), f"got {len(seqs)} messages {seqs[:3]}..{seqs[-3:]}, expected {first}..{last}"


def test_a_relay_follows_through_a_leader_kill_and_serves_gapless_from_any_number(running_cluster, relays):
    h = running_cluster
    leader = h.wait_for_leader()
    # The relay follows the leader first: the kill takes its upstream away.
    [relay] = relays(1, upstream=[leader["address"], *(e for e in h.endpoints if e != leader["address"])])

    async def scenario():
        recorder = StreamRecorder([relay.client_address], token=h.token, session="via-relay").start()
        first = await submit_all(h, "w1", payloads("a", 2000))
        writing = asyncio.create_task(submit_all(h, "w2", payloads("b", 20_000)))
        # The leader dies while the second writer is under way and the relay copies from it.
        await recorder.wait_until(first[-1] + 500, timeout_s=STEP_TIMEOUT_S)
        await asyncio.to_thread(h.kill, leader["id"])
        second = await writing
        last = second[-1]
        await recorder.wait_until(last, timeout_s=STEP_TIMEOUT_S)
        await recorder.stop()
        # Late subscribers from any number read the same records from the relay's journal.
        for start in (1, 777, last):
            got = []
            async for m in subscribe([relay.client_address], from_seq=start, token=h.token, session=f"from-{start}"):
                got.append(m)
                if m.seq == last:
                    break
            assert_gapless(got, start, last)
        return recorder.messages, sorted(first + second)

    messages, acked = asyncio.run(asyncio.wait_for(scenario(), 3 * STEP_TIMEOUT_S))
    assert_gapless(messages, 1, acked[-1])
    assert [m.seq for m in messages if m.session in ("w1", "w2")] == acked
    # The relay's journal is the cluster's, byte for byte.
    relay.stop()
    survivor = next(n for n in h.node_ids if h.is_running(n))
    h.stop()
    node_copy = h.read_journal(survivor)
    relay_bytes = b"".join(open(path, "rb").read() for _, path in list_segment_files(os.path.join(relay.data_dir, "journal")))
    assert node_copy.last_seq == acked[-1]
    assert relay_bytes == node_copy.segment_bytes, "the relay's journal is the cluster's, byte for byte"
