"""Retention on a real three-node cluster: the newest state-machine snapshot holds the floor;
once a newer one is published every node removes what is below it; a subscriber below the
first retained number gets ``Truncated`` (a 0.2 client ``from_seq_unavailable``, run with the
previous release's own code); a runner behind the truncation raises ``Truncated``, and a late
joiner's runner loads the newest snapshot and goes on to the same state."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time

import pytest
from cluster_harness import ClusterHarness, RawConnection, running_cluster  # noqa: F401
from test_sm_cluster import STEP_TIMEOUT_S, puts, submit_all
from test_sm_runner import KvStore
from upgrade_harness import PREVIOUS_RELEASE, PREVIOUS_RELEASE_COMMIT, materialise

from raftseq.clients import Truncated, subscribe
from raftseq.clients.sm import StateMachineRunner
from raftseq.cluster import retention as node_retention
from raftseq.sequencer import limits, protocol
from raftseq.sequencer.journal import Journal, list_segment_files

SEGMENT_BYTES = limits.SEGMENT_BYTES_MIN
BOUND_BYTES = 8 * SEGMENT_BYTES

RETENTION = {
    "journal": {"segment_bytes_max": SEGMENT_BYTES},
    "retention": {"journal_bytes_max": BOUND_BYTES, "check_interval_s": 0.1},
}

#: The previous release's connection asked for the stream from 1 (its Subscribe has no
#: ``truncated_known``): it prints what it got.
OLD_SUBSCRIBE = """
import asyncio, sys
from raftseq.clients.connection import open_connection

async def main(address, token):
    link = await open_connection(address, session="old-subscriber", token=token, timeout_s=5)
    try:
        async for frames in link.subscribe(1, silence_s=5):
            print("delivered", frames[0].seq)
            return
    except ConnectionError as exc:
        print("refused", exc)
    finally:
        link.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def first_retained_answer(h: ClusterHarness, node_id: str, from_seq: int, *, known: bool) -> object:
    with RawConnection(h.endpoint(node_id)) as raw:
        raw.hello("probe", h.token)
        raw.send_frame(protocol.Subscribe(from_seq, known))
        return raw.next_frame()


def wait_truncated_everywhere(h: ClusterHarness, from_seq: int, *, timeout_s: float) -> dict[str, int]:
    """Until every node answers ``Truncated`` to a subscription at `from_seq`: node -> first held."""
    deadline = time.monotonic() + timeout_s
    while True:
        answers = {n: first_retained_answer(h, n, from_seq, known=True) for n in h.node_ids}
        if all(type(a) is protocol.Truncated for a in answers.values()):
            return {n: a.first_seq for n, a in answers.items()}
        assert time.monotonic() < deadline, f"not truncated at {from_seq} everywhere: {answers}"
        time.sleep(0.1)


@pytest.mark.parametrize("running_cluster", [RETENTION], indirect=True)
def test_truncation_below_the_snapshot_floor_and_a_late_joiner_recovering_from_a_snapshot(running_cluster, tmp_path):
    h = running_cluster
    kv = KvStore()
    publisher = StateMachineRunner(h.endpoints, [kv], token=h.token, replica="r1")
    behind = KvStore()
    joiner = StateMachineRunner(h.endpoints, [behind], token=h.token, replica="r2", from_snapshot=True)
    stubborn = StateMachineRunner(h.endpoints, [KvStore()], token=h.token, replica="r3")

    async def scenario():
        # 1. A little traffic (well within the bound); every runner reads it, and the
        #    publisher's first snapshot pins the floor just after it.
        early = await submit_all(h, "writer-1", puts("a", 100))
        for runner in (publisher, joiner, stubborn):
            await asyncio.wait_for(runner.run(until_seq=early[-1]), STEP_TIMEOUT_S)
        [first] = await publisher.publish_snapshot("kv")
        assert first.covered_seq == early[-1]

        # 2. Far more than the bound: the first snapshot holds the floor, nothing after it leaves.
        more = await submit_all(h, "writer-2", puts("b", 3000))
        await asyncio.wait_for(publisher.run(until_seq=more[-1]), STEP_TIMEOUT_S)
        for node_id in h.node_ids:
            answer = await asyncio.to_thread(first_retained_answer, h, node_id, first.covered_seq + 1, known=True)
            assert type(answer) is not protocol.Truncated, f"{node_id} removed what the newest snapshot needs: {answer}"

        # 3. A newer snapshot: every node removes the stream below it (within its bound).
        [second] = await publisher.publish_snapshot("kv")
        last = (await submit_all(h, "writer-3", puts("c", 200)))[-1]
        await asyncio.wait_for(publisher.run(until_seq=last), STEP_TIMEOUT_S)
        starts = await asyncio.to_thread(wait_truncated_everywhere, h, first.covered_seq + 1, timeout_s=30)
        assert all(first.covered_seq + 1 < start <= second.covered_seq + 1 for start in starts.values()), (starts, second)

        # 4. The client library raises Truncated with the lowest first number held.
        with pytest.raises(Truncated) as caught:
            async for _ in subscribe(h.endpoints, from_seq=1, token=h.token):
                pass
        # (Retention goes on meanwhile: a node's start only moves up, never past the floor.)
        assert min(starts.values()) <= caught.value.first_seq <= second.covered_seq + 1 and caught.value.from_seq == 1

        # 5. A runner behind the truncation raises it; a late joiner loads the newest snapshot.
        with pytest.raises(Truncated):
            await asyncio.wait_for(stubborn.run(until_seq=last), STEP_TIMEOUT_S)
        await asyncio.wait_for(joiner.run(until_seq=last), STEP_TIMEOUT_S)
        return second, starts, last

    try:
        second, starts, last = asyncio.run(asyncio.wait_for(scenario(), 4 * STEP_TIMEOUT_S))
        assert joiner.joined_from["kv"] == second
        assert behind.data == kv.data and joiner.last_seq == publisher.last_seq == last
        assert joiner.digest("kv") == publisher.digest("kv")

        # 6. An old subscriber (no truncated_known) is refused with from_seq_unavailable naming
        #    the first number held; so is the 0.2 release's own client code.
        for node_id, start in starts.items():
            answer = first_retained_answer(h, node_id, 1, known=False)
            assert isinstance(answer, protocol.Rejected) and answer.reason is protocol.RejectReason.FROM_SEQ_UNAVAILABLE, answer
            held = int(re.search(r"before seq (\d+)", answer.detail).group(1))
            assert start <= held <= second.covered_seq + 1, (answer, start)
        release = materialise(PREVIOUS_RELEASE_COMMIT, PREVIOUS_RELEASE, str(tmp_path / "previous"))
        said = release.run_python(OLD_SUBSCRIBE, h.endpoints[0], h.token).strip()
        assert said.startswith("refused from_seq_unavailable: truncated: retention removed the records before seq"), said
    finally:
        for runner in (publisher, joiner, stubborn):
            asyncio.run(runner.close())

    # Every journal is whole from where retention left it, and within its bound plus a segment.
    h.stop()
    for node_id in h.node_ids:
        contents = h.read_journal(node_id)
        assert contents.report.ok, contents.report
        assert contents.first_seq >= starts[node_id] and contents.records[0].seq == contents.first_seq
        assert contents.last_seq == contents.records[-1].seq >= last
        # Within the bound plus two segments (a segment rolls at a batch's end: it may be larger
        # than segment_bytes_max by a batch).
        sizes = [os.path.getsize(path) for _, path in list_segment_files(h.journal_dir(node_id))]
        assert sum(sizes) - 2 * max(sizes) <= BOUND_BYTES, f"{node_id}: segments of {sizes} bytes"


#: A Raft log compacted after a few entries (a follower that was down gets a snapshot and a
#: journal hole to fill from its peers) and a small retention bound.
LAGGING = {
    "raft": {"log_compaction_min_entries": 20, "log_compaction_min_time_s": 0.5},
    "journal": {"segment_bytes_max": SEGMENT_BYTES},
    "retention": {"journal_bytes_max": BOUND_BYTES, "check_interval_s": 0.1},
}


def peers_heard(h: ClusterHarness, node_id: str) -> dict[str, int]:
    """What `node_id`'s retention last heard its peers need (``retention.PEERS_FILE``)."""
    try:
        with open(os.path.join(h.node(node_id).config.data_dir, node_retention.PEERS_FILE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


#: Reads of a running node's journal directory in a row that may find a segment gone between
#: listing and reading it (its retention removes segments every check_interval_s).
LIVE_JOURNAL_READS_MAX = 20


def journal_holes(h: ClusterHarness, node_id: str) -> list:
    """The holes of `node_id`'s journal as its files say now (read-only; the node runs on, and
    its retention may remove a segment while it is read: then it is read again)."""
    for attempt in range(1, LIVE_JOURNAL_READS_MAX + 1):
        try:
            journal = Journal.open(h.journal_dir(node_id), readonly=True)
            break
        except FileNotFoundError:  # a segment removed between the listing and its read
            if attempt == LIVE_JOURNAL_READS_MAX:
                raise
    try:
        return list(journal.holes)
    finally:
        journal.close()


def held_from(h: ClusterHarness, node_id: str, seq: int) -> bool:
    """Does `node_id` still hold `seq` (a subscription there is served)?"""
    return type(first_retained_answer(h, node_id, seq, known=True)) is protocol.Delivered


@pytest.mark.parametrize("running_cluster", [LAGGING], indirect=True)
def test_a_lagging_follower_holds_the_floor_until_it_has_filled_its_hole(running_cluster):
    h = running_cluster
    leader = h.wait_for_leader()["id"]
    follower = next(n for n in h.node_ids if n != leader)
    before = asyncio.run(submit_all(h, "writer-1", puts("a", 200)))
    h.wait_converged(before[-1], timeout_s=20)
    need = before[-1] + 1
    # Each peer's retention asks the follower every check_interval_s; wait until both heard it
    # need `need` (an older answer only holds the floor lower).
    deadline = time.monotonic() + 20
    while not all(peers_heard(h, n).get(follower, 0) >= need for n in h.node_ids if n != follower):
        assert time.monotonic() < deadline, {n: peers_heard(h, n) for n in h.node_ids}
        time.sleep(0.05)
    h.kill(follower)

    # Far over the bound while it is down: the others keep everything from what it needs.
    during = asyncio.run(submit_all(h, "writer-2", puts("b", 3000)))
    for node_id in h.node_ids:
        if node_id != follower:
            line = h.wait_for_log(node_id, f"needed by peer {follower}", timeout_s=20)
            assert f"retention floor is seq {need}" in line, line
            assert held_from(h, node_id, need), f"{node_id} removed seq {need}, which {follower} needs"

    # Back, it gets a Raft snapshot and fills its journal hole from a peer; then the others
    # let the old segments go.
    h.restart(follower)
    h.wait_hole_filled(follower, timeout_s=30)
    after = asyncio.run(submit_all(h, "writer-3", puts("c", 300)))
    h.wait_converged(after[-1], timeout_s=30)
    deadline = time.monotonic() + 30
    # The peers it held back now go past its old need. (The follower's own journal need not:
    # its filled hole is one segment, removed only once its own bounds are exceeded.)
    peers = [n for n in h.node_ids if n != follower]
    while any(held_from(h, n, need) for n in peers):
        assert time.monotonic() < deadline, "retention never went past the follower's old need"
        time.sleep(0.1)
    h.stop()
    for node_id in h.node_ids:
        contents = h.read_journal(node_id)
        assert contents.report.ok and contents.holes == [], (node_id, contents.report)
        assert contents.last_seq == after[-1] >= during[-1]
        assert node_id == follower or contents.first_seq > need, (node_id, contents.first_seq, need)


@pytest.mark.parametrize("running_cluster", [LAGGING], indirect=True)
def test_a_node_rejoining_empty_behind_the_peers_retention_starts_its_journal_where_they_do(running_cluster):
    h = running_cluster
    leader = h.wait_for_leader()["id"]
    wiped = next(n for n in h.node_ids if n != leader)
    asyncio.run(submit_all(h, "writer-1", puts("a", 2000)))
    # Every peer has removed the stream's start before the node loses its data directory.
    deadline = time.monotonic() + 30
    while any(held_from(h, n, 1) for n in h.node_ids if n != wiped):
        assert time.monotonic() < deadline, "the peers never removed seq 1"
        time.sleep(0.1)
    h.kill(wiped)
    shutil.rmtree(h.node(wiped).config.data_dir)
    more = asyncio.run(submit_all(h, "writer-2", puts("b", 500)))

    # Empty, it gets a Raft snapshot and a hole from 1; the peers answer Truncated; it starts
    # its journal where they do and fills the rest (without the fallback: exit 7 after six tries).
    h.restart(wiped)
    h.wait_for_log(wiped, "this journal now starts there", timeout_s=30)
    # What follows the peers' first number comes from a peer ("journal hole filled") or, when
    # the Raft snapshot it got lies above that number, from its own Raft log (no fill, no such
    # line): wait until its journal has no hole.
    h.wait_converged(more[-1], timeout_s=30)
    deadline = time.monotonic() + 30
    while holes := journal_holes(h, wiped):
        assert time.monotonic() < deadline, f"{wiped} still has holes {holes}"
        time.sleep(0.1)
    answer = first_retained_answer(h, wiped, 1, known=True)
    assert type(answer) is protocol.Truncated and answer.first_seq > 1, answer
    h.stop()
    contents = h.read_journal(wiped)
    assert contents.report.ok and contents.holes == [] and contents.last_seq == more[-1], contents.report
    # Its own retention goes on meanwhile (it may remove more before it stops): never less.
    assert contents.first_seq >= answer.first_seq > 1, (contents.first_seq, answer.first_seq)
