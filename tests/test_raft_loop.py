"""pysyncobj on the node's asyncio loop (``cluster.raft_loop``, ``SequencerReplica``).

``LoopPoller`` is checked against real sockets on a running loop. Three ``SequencerReplica``
members then run in this process, on one loop and real loopback sockets: proposals commit,
every member applies them, and the commit index reaches the followers without a second
AppendEntries round per batch (``raft.commit_notify_delay_s``).
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from pysyncobj.poller import POLL_EVENT_TYPE

from cluster.config import NodeConfig
from cluster.local import free_base_port, local_configs
from cluster.raft_loop import LoopPoller
from cluster.replica import SequencerReplica
from sequencer import protocol
from sequencer.core import SequencerCore
from sequencer.journal import FsyncPolicy, Journal
from sequencer.machine import ApplyResult, SequencerMachine

WAIT_S = 10.0  # upper bound on waiting for something that should happen within a second


def run(test):
    asyncio.run(asyncio.wait_for(test(), 60))


# --- the poller -----------------------------------------------------------------------------


def test_the_poller_reports_reads_writes_and_forgets_closed_sockets():
    async def story():
        loop = asyncio.get_running_loop()
        poller = LoopPoller(loop)
        events: list[tuple[int, int]] = []
        ticks: list[int] = []
        got = asyncio.Event()
        poller.after_event = lambda: (ticks.append(len(events)), got.set())
        left, right = socket.socketpair()
        left.setblocking(False)
        right.setblocking(False)
        fd = left.fileno()

        sockets = {fd: left}

        def callback(descr: int, event: int) -> None:
            events.append((descr, event))
            if event & POLL_EVENT_TYPE.READ:
                sockets[descr].recv(100)
            if event & POLL_EVENT_TYPE.WRITE:  # as pysyncobj: nothing left to send
                poller.subscribe(descr, callback, POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR)

        # Writable at once: reported once, then the callback drops WRITE.
        poller.subscribe(fd, callback, POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE | POLL_EVENT_TYPE.ERROR)
        await asyncio.wait_for(got.wait(), WAIT_S)
        await asyncio.sleep(0.05)
        assert events == [(fd, POLL_EVENT_TYPE.WRITE)] and ticks == [1], "one event, followed by a tick"

        got.clear()
        right.send(b"x")
        await asyncio.wait_for(got.wait(), WAIT_S)
        assert events[-1] == (fd, POLL_EVENT_TYPE.READ)

        # pysyncobj closes a socket before it unsubscribes it: no error, nothing reported later.
        left.close()
        poller.unsubscribe(fd)
        assert loop.remove_reader(fd) is False and loop.remove_writer(fd) is False, "the loop forgot the socket"
        right.close()

        # A descriptor number reused by a new socket can be subscribed again.
        again, other = socket.socketpair()
        again.setblocking(False)
        sockets[again.fileno()] = again
        got.clear()
        poller.subscribe(again.fileno(), callback, POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR)
        other.send(b"z")
        await asyncio.wait_for(got.wait(), WAIT_S)
        assert events[-1] == (again.fileno(), POLL_EVENT_TYPE.READ)
        poller.close()
        again.close()
        other.close()

    run(story)


# --- three replicas on one loop -------------------------------------------------------------


def make_replicas(tmp_path, loop, overrides: dict) -> tuple[list[SequencerReplica], list[Journal]]:
    configs: list[NodeConfig] = local_configs(str(tmp_path), free_base_port(), insecure=False, overrides=overrides)
    replicas, journals = [], []
    for config in configs:
        journal = Journal.open(config.journal_dir, fsync=FsyncPolicy.parse("never"))
        core = SequencerCore(SequencerMachine(config.machine.machine_config()), journal)
        replicas.append(SequencerReplica(config, core, loop=loop, on_applied=lambda result: None))
        journals.append(journal)
    return replicas, journals


async def wait_until(condition, what: str, timeout_s: float = WAIT_S) -> float:
    """Seconds until ``condition()`` held; fails after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what} not within {timeout_s} s"
        await asyncio.sleep(0.002)
    return time.monotonic() - started


def commit_index(replica: SequencerReplica) -> int:
    return replica._SyncObj__raftCommitIndex


def propose(replica: SequencerReplica, client_seq: int) -> asyncio.Future:
    """One batch of one entry; the future gives the ApplyResult."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    batch = protocol.encode_batch(time.time_ns(), [protocol.Entry("loop-test", client_seq, b"payload %d" % client_seq)])

    def on_commit(result: object, error: int) -> None:
        assert asyncio.get_running_loop() is loop, "commits are reported on the loop"
        done.set_result((result, error))

    replica.apply_entry(batch, callback=on_commit)
    return done


@pytest.mark.parametrize("delay_s", [0.001, 0.0], ids=["commit-rides-next-batch", "commit-sent-at-once"])
def test_replicas_on_one_loop_commit_and_tell_the_followers(tmp_path, delay_s):
    """Heartbeats every 0.4 s here, so a follower learning a commit sooner proves the leader
    told it. With the delay, a batch proposed when the previous one commits carries the commit
    index: about one AppendEntries per follower per batch instead of two."""
    raft = {
        "append_entries_period_s": 0.4,
        "election_timeout_min_s": 1.3,
        "election_timeout_max_s": 2.6,
        "commit_notify_delay_s": delay_s,
    }

    async def story():
        replicas, journals = make_replicas(tmp_path, asyncio.get_running_loop(), {"raft": raft})
        try:
            await wait_until(lambda: sum(r._isLeader() for r in replicas) == 1, "a leader", timeout_s=20)
            leader = next(r for r in replicas if r._isLeader())
            followers = [r for r in replicas if r is not leader]
            await wait_until(lambda: all(commit_index(f) == commit_index(leader) for f in followers), "followers at the leader's commit index")

            # One batch on an idle cluster: the followers learn its commit well before a heartbeat.
            result, error = await asyncio.wait_for(propose(leader, 1), WAIT_S)
            assert error == 0 and isinstance(result, ApplyResult) and result.first_seq == 1
            told_s = await wait_until(lambda: all(commit_index(f) == commit_index(leader) for f in followers), "the followers told of the commit")
            assert told_s < 0.2, f"followers learned the commit after {told_s:.3f} s (heartbeat period 0.4 s)"

            # Back-to-back batches, each proposed when the previous one commits.
            sends = {"count": 0}
            original = leader._SyncObj__sendAppendEntries

            def counting_send():
                sends["count"] += 1
                return original()

            leader._SyncObj__sendAppendEntries = counting_send
            batches = 40
            for client_seq in range(2, 2 + batches):
                result, error = await asyncio.wait_for(propose(leader, client_seq), WAIT_S)
                assert error == 0 and result.first_seq == client_seq
            await wait_until(lambda: all(j.last_seq == batches + 1 for j in journals), "every journal at the last batch")
            print(f"commit_notify_delay_s {delay_s}: {sends['count']} AppendEntries rounds for {batches} batches")
            if delay_s:  # now and then the 1 ms passes before the next batch is proposed
                assert sends["count"] <= 1.25 * batches, sends
            else:
                assert sends["count"] >= 2 * batches - 1, sends
            for journal in journals[1:]:
                assert list(journal.records(1)) == list(journals[0].records(1)), "every member journaled the same records"
        finally:
            for replica in replicas:
                replica.destroy()
            for journal in journals:
                journal.close()

    run(story)
