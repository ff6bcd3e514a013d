"""The power-safe mode's corrections of pysyncobj (``cluster.raft.member`` with a
``RaftLogStore`` of durability "power"): an entry counts toward commit on a node only once it
is on that node's disk.

Each scenario drives one member directly, without a network (as ``test_raft_member``): its log
store's fsync is held by an event, crafted Raft messages are handed to its message handler,
and what it sends is recorded. The same scenario on a crash-mode store shows pysyncobj's own
behaviour (the acknowledgement or the commit comes at once), so the scenario really tests the
hold.
"""

from __future__ import annotations

import threading
import time

import pytest
from pysyncobj import SyncObjConf, replicated
from pysyncobj.node import TCPNode

from raftseq.cluster import raft
from test_raft_member import free_address
from raftseq.cluster.raft import log_store
from raftseq.cluster.raft.log_store import RaftLogStore
from raftseq.cluster.raft.member import RaftMember

WAIT_S = 10.0
LEADER_STATE = 2


class Member(RaftMember):
    @replicated
    def apply_entry(self, batch):
        return batch


class HeldFsync:
    """An fsync that passes while `released` is set and waits for it otherwise."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.released.set()

    def __call__(self, fd: int) -> None:
        assert self.released.wait(WAIT_S), "fsync never released"


@pytest.fixture
def make_member(tmp_path):
    """A member on a store of `durability` whose fsync the test holds; its sends are recorded."""
    raft.install()
    built = []

    def make(durability: str, *, peers: int = 1):
        fsync = HeldFsync()
        store = RaftLogStore(str(tmp_path / f"raft-{len(built)}"), durability=durability, fsync=fsync)
        address = free_address()
        others = [free_address() for _ in range(peers)]
        conf = SyncObjConf(autoTick=False, bindAddress=address, journalFile=store, dynamicMembershipChange=False)
        member = Member(address, others, conf)
        built.append(member)
        sent: list[tuple[object, dict]] = []
        member._SyncObj__transport.send = lambda node, message: sent.append((node, message))
        wait_for(lambda: store.durable_index() == 1, "the first entry on disk")
        return member, [TCPNode(o) for o in others], fsync, sent

    yield make
    for member in built:
        member.destroy()


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def noop(index: int, term: int) -> tuple[bytes, int, int]:
    """An entry pysyncobj applies as a no-op (its first byte)."""
    return (b"\x01 entry %d" % index, index, term)


def acks(sent) -> list[int]:
    return [m["next_node_idx"] for _, m in sent if m.get("type") == "next_node_idx" and m.get("success")]


def append(member, leader, first: int, last: int, *, term: int = 1, prev_term: int = 0) -> None:
    member._SyncObj__onMessageReceived(
        leader,
        {
            "type": "append_entries",
            "term": term,
            "commit_index": 1,
            "prevLogIdx": first - 1,
            "prevLogTerm": prev_term,
            "entries": [noop(i, term) for i in range(first, last + 1)],
        },
    )


@pytest.mark.parametrize("durability", ["crash", "power"])
def test_a_follower_acknowledges_entries_only_once_they_are_on_its_disk(make_member, durability):
    member, (leader,), fsync, sent = make_member(durability)
    fsync.released.clear()

    append(member, leader, 2, 5)

    if durability == "crash":
        assert acks(sent) == [6], "pysyncobj's own reply comes at once"
        return
    assert acks(sent) == []
    assert member.raftseq_acks_held_for_fsync == 1
    member.raftseq_durable_advanced()
    assert acks(sent) == [], "nothing on disk yet"

    fsync.released.set()
    wait_for(lambda: member._SyncObj__raftLog.durable_index() == 5, "entries 2..5 on disk")
    member.raftseq_durable_advanced()
    assert acks(sent) == [6]


def test_a_held_reply_for_entries_since_replaced_is_dropped(make_member):
    member, (leader,), fsync, sent = make_member("power")
    fsync.released.clear()
    append(member, leader, 2, 5)
    append(member, leader, 4, 4, term=2, prev_term=1)  # a new leader replaces 4.. (5 goes)

    fsync.released.set()
    wait_for(lambda: member._SyncObj__raftLog.durable_index() == 4, "the new log on disk")
    member.raftseq_durable_advanced()
    assert acks(sent) == [5], "only the reply for the log as it is now"


def leader_of_three(make_member, durability: str):
    member, followers, fsync, sent = make_member(durability, peers=2)
    member._SyncObj__raftCurrentTerm = 1
    member._SyncObj__raftState = LEADER_STATE
    now = time.monotonic()
    for node in followers:
        member._SyncObj__raftNextIndex[node] = 2
        member._SyncObj__raftMatchIndex[node] = 1
        member._SyncObj__lastResponseTime[node] = now
    fsync.released.clear()
    for index in range(2, 6):
        member._SyncObj__raftLog.add(*noop(index, 1))
    return member, followers, fsync


def commit_after_tick(member) -> int:
    member._onTick(0.0)
    return member._SyncObj__raftCommitIndex


@pytest.mark.parametrize("durability", ["crash", "power"])
def test_a_leader_counts_itself_toward_commit_only_up_to_its_durable_index(make_member, durability):
    member, (first, _second), fsync = leader_of_three(make_member, durability)
    member._SyncObj__raftMatchIndex[first] = 5  # one follower of two holds 2..5 on its disk

    if durability == "crash":
        assert commit_after_tick(member) == 5, "pysyncobj counts the leader's whole log"
        return
    assert commit_after_tick(member) == 1
    assert member._SyncObj__raftLastApplied == 1, "nothing applied beyond the commit index"
    assert member.raftseq_commits_held_for_fsync >= 1

    fsync.released.set()
    wait_for(lambda: member._SyncObj__raftLog.durable_index() == 5, "the leader's entries on disk")
    assert commit_after_tick(member) == 5


def test_a_majority_of_followers_on_disk_commits_without_the_leaders_fsync(make_member):
    member, followers, fsync = leader_of_three(make_member, "power")
    for node in followers:
        member._SyncObj__raftMatchIndex[node] = 4

    assert commit_after_tick(member) == 4
    fsync.released.set()


@pytest.mark.parametrize("why", ["writer_backlog", "space_low"])
def test_a_follower_whose_log_refuses_entries_drops_appends_without_an_election_and_takes_them_later(make_member, monkeypatch, why):
    """A follower whose Raft log writer is behind its bound (a stalled disk) or whose free disk
    is below the minimum takes no new entries: an AppendEntries carrying some is dropped as if
    lost (no reply, nothing added: its loop never waits, its memory stays bounded) yet keeps
    it from standing for election; once the log takes entries again, the leader's next
    AppendEntries is handled as ever."""
    member, (leader,), fsync, sent = make_member("power")
    store = member._SyncObj__raftLog
    if why == "writer_backlog":
        monkeypatch.setattr(log_store, "RAFT_LOG_WRITE_QUEUE_BYTES_MAX", 0)
        fsync.released.clear()
        append(member, leader, 2, 2)  # queued behind the held fsync: the backlog passes 0 bytes
        assert store.writer_backlogged()
    else:
        store.space_low = True
    length = len(store)
    before = len(sent)
    member._SyncObj__raftElectionDeadline = 0.0  # as if it were about to stand for election

    append(member, leader, len(store) + 1, len(store) + 3, prev_term=store[-1][2])

    assert len(store) == length, "entries taken while the log refuses them"
    assert sent[before:] == [], "a dropped message is not answered"
    assert member.raftseq_appends_dropped == 1
    assert member._SyncObj__raftElectionDeadline > 0.0, "word from the leader: no election"

    store.space_low = False
    fsync.released.set()
    monkeypatch.setattr(log_store, "RAFT_LOG_WRITE_QUEUE_BYTES_MAX", 64 << 20)
    wait_for(lambda: not store.refusing_entries(), "the log taking entries again")
    append(member, leader, len(store) + 1, len(store) + 3, prev_term=store[-1][2])
    assert len(store) == length + 3
    assert member.raftseq_appends_dropped == 1
