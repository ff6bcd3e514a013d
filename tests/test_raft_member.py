"""The correction of pysyncobj 0.3.17's log replication (``cluster.raft.member``).

Each scenario drives a Raft member directly, without a network: a follower (or a leader) is
built with ``autoTick=False`` on a free loopback port, and crafted Raft messages are handed to
its message handler as if they came from the other member. Where pysyncobj's own behaviour
differs from Raft's rules, the scenario runs on both classes: the unmodified ``SyncObj`` shows
the fault (so the scenario really reproduces it), ``RaftMember`` does not.

A follower's log starts with one entry, index 1 term 0. Entries are ``(command, index, term)``.
"""

from __future__ import annotations

import os
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pysyncobj.syncobj
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.node import TCPNode

from raftseq.cluster.config import RAFT_LEADER_SILENCE_ELECTION_TIMEOUTS
from raftseq.cluster.raft.member import RaftMember
from raftseq.cluster.raft.private_names import PINNED_VERSION
from raftseq.sequencer.protocol import Role

ROOT = Path(__file__).resolve().parents[1]
LEADER_STATE = 2


class PlainMember(SyncObj):
    """A member on pysyncobj's unmodified replication."""

    @replicated
    def apply_entry(self, batch):
        return batch


class CorrectedMember(RaftMember):
    """A member on raftseq's corrected replication."""

    @replicated
    def apply_entry(self, batch):
        return batch


BOTH = pytest.mark.parametrize("member_class", [PlainMember, CorrectedMember], ids=["unmodified", "corrected"])


# --- helpers: one per verb ------------------------------------------------------------------


def free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def make_member(tmp_path):
    """Build members bound to free loopback ports; every one is destroyed at the end."""
    built = []

    def make(member_class, *, journal_file: bool = False):
        address, peer_address = free_address(), free_address()
        conf = SyncObjConf(
            autoTick=False,
            bindAddress=address,
            journalFile=str(tmp_path / f"raft-{len(built)}.log") if journal_file else None,
            dynamicMembershipChange=False,
        )
        member = member_class(address, [peer_address], conf)
        built.append(member)
        return member, TCPNode(peer_address)

    yield make
    for member in built:
        member.destroy()


def command(index: int, term: int, tag: str = "") -> bytes:
    return f"batch {index} of term {term}{tag}".encode()


def entries(first: int, last: int, term: int, tag: str = "") -> list[tuple[bytes, int, int]]:
    return [(command(i, term, tag), i, term) for i in range(first, last + 1)]


def append(member, leader, *, term, prev_idx, prev_term, new_entries=(), commit_index=1) -> None:
    member._SyncObj__onMessageReceived(
        leader,
        {
            "type": "append_entries",
            "term": term,
            "commit_index": commit_index,
            "prevLogIdx": prev_idx,
            "prevLogTerm": prev_term,
            "entries": list(new_entries),
        },
    )


def heartbeat(member, leader, *, term, prev_idx, prev_term, commit_index=1) -> None:
    """An AppendEntries without entries, as pysyncobj's leader sends it."""
    member._SyncObj__onMessageReceived(
        leader,
        {"type": "append_entries", "term": term, "commit_index": commit_index, "prevLogIdx": prev_idx, "prevLogTerm": prev_term},
    )


def log_of(member) -> list[tuple[bytes, int, int]]:
    raft_log = member._SyncObj__raftLog
    return [tuple(raft_log[i]) for i in range(len(raft_log))]


def log_end(member) -> int:
    return member._SyncObj__raftLog[-1][1]


def commit_index(member) -> int:
    return member._SyncObj__raftCommitIndex


def counter(member, name: str) -> int:
    return getattr(member, name, 0)


def kept_and_refused(member) -> tuple[int, int]:
    """A corrected member's counts of matching entries kept and of truncations refused."""
    return member.raftseq_matching_entries_kept, member.raftseq_truncations_refused


def follower_holding_2_to_21(make_member, member_class, *, journal_file=False):
    """A follower that accepted 2..11 and then 12..21 from the leader of term 1."""
    member, leader = make_member(member_class, journal_file=journal_file)
    assert log_of(member) == [(log_of(member)[0][0], 1, 0)]
    append(member, leader, term=1, prev_idx=1, prev_term=0, new_entries=entries(2, 11, 1))
    append(member, leader, term=1, prev_idx=11, prev_term=1, new_entries=entries(12, 21, 1))
    assert log_end(member) == 21
    return member, leader


def assert_not_shrunk(member, member_class, before, *, counts: tuple[int, int]) -> None:
    """After a stale message to ``follower_holding_2_to_21``: the unmodified class shrank the log
    to 6 (the fault), the corrected one kept all of it and counted what it kept and refused."""
    if member_class is PlainMember:
        assert log_end(member) == 6, "the unmodified class no longer shows the shrink"
    else:
        assert log_end(member) == 21
        assert log_of(member) == before
        assert kept_and_refused(member) == counts


# --- a. a stale AppendEntries must not shrink a follower's log -----------------------------


@BOTH
@pytest.mark.parametrize("journal_file", [False, True], ids=["memory-log", "file-log"])
def test_stale_append_entries_does_not_shrink_the_log(make_member, member_class, journal_file):
    member, leader = follower_holding_2_to_21(make_member, member_class, journal_file=journal_file)
    before = log_of(member)

    # The leader's first append of 2..6, delivered after the follower accepted 2..21.
    append(member, leader, term=1, prev_idx=1, prev_term=0, new_entries=entries(2, 6, 1))

    assert_not_shrunk(member, member_class, before, counts=(5, 1))


@BOTH
def test_stale_append_entries_reaching_past_the_log_end_adds_only_the_new_entries(make_member, member_class):
    member, leader = follower_holding_2_to_21(make_member, member_class)
    before = log_of(member)

    append(member, leader, term=1, prev_idx=6, prev_term=1, new_entries=entries(7, 25, 1))

    assert log_end(member) == 25
    assert log_of(member) == before + entries(22, 25, 1)
    if member_class is CorrectedMember:
        assert kept_and_refused(member) == (15, 0)


# --- b. a heartbeat with an old prevLogIdx must not truncate --------------------------------


@BOTH
def test_heartbeat_with_old_prev_log_idx_does_not_truncate(make_member, member_class):
    member, leader = follower_holding_2_to_21(make_member, member_class)
    before = log_of(member)

    heartbeat(member, leader, term=1, prev_idx=6, prev_term=1)

    assert_not_shrunk(member, member_class, before, counts=(0, 1))


@BOTH
def test_heartbeat_with_mismatching_prev_log_term_changes_nothing(make_member, member_class):
    member, leader = follower_holding_2_to_21(make_member, member_class)
    before = log_of(member)

    heartbeat(member, leader, term=2, prev_idx=6, prev_term=2, commit_index=21)

    assert log_of(member) == before
    assert commit_index(member) == 1


# --- c. a genuine conflict is still truncated and replaced ----------------------------------


@BOTH
def test_conflicting_entries_are_replaced_from_the_first_conflict(make_member, member_class):
    member, leader = make_member(member_class)
    append(member, leader, term=1, prev_idx=1, prev_term=0, new_entries=entries(2, 11, 1))
    own = log_of(member)

    # The leader of term 2 holds 2..4 of term 1, then its own 5..7.
    new = entries(2, 4, 1) + entries(5, 7, 2, tag=" (new leader)")
    append(member, leader, term=2, prev_idx=1, prev_term=0, new_entries=new)

    assert log_end(member) == 7
    assert log_of(member) == own[:4] + entries(5, 7, 2, tag=" (new leader)")
    if member_class is CorrectedMember:
        assert kept_and_refused(member) == (3, 0)


@BOTH
def test_conflict_right_after_prev_log_idx_truncates_the_longer_tail(make_member, member_class):
    member, leader = make_member(member_class)
    append(member, leader, term=1, prev_idx=1, prev_term=0, new_entries=entries(2, 11, 1))
    own = log_of(member)

    append(member, leader, term=2, prev_idx=4, prev_term=1, new_entries=entries(5, 5, 2))

    assert log_of(member) == own[:4] + entries(5, 5, 2)


@BOTH
def test_conflict_on_the_first_entry_sent_replaces_everything_after_prev(make_member, member_class):
    member, leader = make_member(member_class)
    append(member, leader, term=1, prev_idx=1, prev_term=0, new_entries=entries(2, 11, 1))
    first = log_of(member)[0]

    append(member, leader, term=2, prev_idx=1, prev_term=0, new_entries=entries(2, 3, 2))

    assert log_of(member) == [first] + entries(2, 3, 2)
    if member_class is CorrectedMember:
        assert member.raftseq_matching_entries_kept == 0


# --- d. the commit index rises only over entries known to match -----------------------------


@BOTH
def test_commit_index_stops_at_the_verified_end_over_older_term_entries(make_member, member_class):
    member, leader = make_member(member_class)
    append(member, leader, term=1, prev_idx=1, prev_term=0, new_entries=entries(2, 11, 1))
    assert commit_index(member) == 1

    # A new leader (term 2) proves the follower's log matches up to 6 only; 7..11 are of
    # term 1 and may be absent from the new leader's log.
    heartbeat(member, leader, term=2, prev_idx=6, prev_term=1, commit_index=11)

    assert commit_index(member) == 6
    if member_class is CorrectedMember:
        assert log_end(member) == 11, "entries beyond the verified end are kept, not committed"
    else:
        assert log_end(member) == 6


@BOTH
def test_commit_index_stops_at_the_verified_end_of_a_stale_append(make_member, member_class):
    member, leader = make_member(member_class)
    append(member, leader, term=1, prev_idx=1, prev_term=0, new_entries=entries(2, 11, 1))

    append(member, leader, term=2, prev_idx=1, prev_term=0, new_entries=entries(2, 4, 1), commit_index=11)

    assert commit_index(member) == 4


@BOTH
def test_entries_of_the_leaders_term_beyond_the_message_are_verified_by_log_matching(make_member, member_class):
    member, leader = make_member(member_class)
    append(member, leader, term=2, prev_idx=1, prev_term=0, new_entries=entries(2, 11, 2))

    # The same leader (term 2) sent 2..11 itself: its log holds them all.
    heartbeat(member, leader, term=2, prev_idx=6, prev_term=2, commit_index=11)

    if member_class is CorrectedMember:
        assert log_end(member) == 11
        assert commit_index(member) == 11
    else:
        assert log_end(member) == 6
        assert commit_index(member) == 6


def snapshot_chunk(member, leader, *, term, commit_index, serialized) -> None:
    """A piece of an InstallSnapshot, as pysyncobj's leader sends it (no ``prevLogIdx``)."""
    member._SyncObj__onMessageReceived(
        leader, {"type": "append_entries", "term": term, "commit_index": commit_index, "serialized": serialized}
    )


@BOTH
@pytest.mark.parametrize(
    "serialized",
    [None, (b"first piece of a longer snapshot", True, False), (b"a piece without its first", False, False)],
    ids=["no-data", "first-piece", "orphan-piece"],
)
def test_a_snapshot_piece_does_not_commit_a_deposed_leaders_entries(make_member, member_class, serialized):
    """A deposed leader (its 2..11 of term 1 never reached a majority) hears from the new
    leader of term 3, whose log was compacted: the new leader sends its snapshot. Until the
    snapshot is complete nothing proves that 2..11 are in the new leader's log."""
    member, leader = make_member(member_class)
    append(member, leader, term=1, prev_idx=1, prev_term=0, new_entries=entries(2, 11, 1))
    assert commit_index(member) == 1

    snapshot_chunk(member, leader, term=3, commit_index=50, serialized=serialized)

    if member_class is CorrectedMember:
        assert commit_index(member) == 1
        assert counter(member, "raftseq_snapshot_commits_refused") == 1
    else:
        assert commit_index(member) == 11, "pysyncobj commits its unverified entries"
    assert log_end(member) == 11


class SlowPlainMember(PlainMember):
    """Applies each entry in 10 ms (a node replaying a long log after a restart)."""

    def _SyncObj__doApplyCommand(self, command):  # noqa: N802 (pysyncobj's name)
        time.sleep(0.01)  # the work of applying, not a synchronisation
        return SyncObj._SyncObj__doApplyCommand(self, command)


class SlowCorrectedMember(CorrectedMember):
    def _SyncObj__doApplyCommand(self, command):  # noqa: N802
        time.sleep(0.01)
        return SyncObj._SyncObj__doApplyCommand(self, command)


@pytest.mark.parametrize("member_class", [SlowPlainMember, SlowCorrectedMember], ids=["unmodified", "corrected"])
def test_a_follower_busy_applying_does_not_stand_for_election_first(tmp_path, member_class):
    """30 committed entries take 0.3 s to apply, longer than the election timeout (0.1-0.2 s).
    pysyncobj checks the deadline at the start of the next tick, before reading the
    leader's messages that arrived meanwhile: it stands for election against a live leader."""
    address, peer_address = free_address(), free_address()
    conf = SyncObjConf(
        autoTick=False, bindAddress=address, dynamicMembershipChange=False, raftMinTimeout=0.1, raftMaxTimeout=0.2, appendEntriesPeriod=0.02
    )
    member = member_class(address, [peer_address], conf)
    try:
        leader = TCPNode(peer_address)
        append(member, leader, term=1, prev_idx=1, prev_term=0, new_entries=entries(2, 31, 1), commit_index=31)
        member._onTick(0)  # applies 2..31
        assert member._SyncObj__raftLastApplied == 31
        # The next tick stands for election (when connected to anyone) if the deadline passed.
        deadline_passed = member._SyncObj__raftElectionDeadline < pysyncobj.syncobj.monotonicTime()  # its own clock
        if member_class is SlowCorrectedMember:
            assert not deadline_passed, "a fresh timeout after the long apply"
            assert counter(member, "raftseq_elections_deferred") == 1
        else:
            assert deadline_passed, "pysyncobj would stand for election straight after applying"
    finally:
        member.destroy()


def test_commit_index_never_goes_down(make_member):
    member, leader = make_member(CorrectedMember)
    append(member, leader, term=1, prev_idx=1, prev_term=0, new_entries=entries(2, 11, 1), commit_index=9)
    assert commit_index(member) == 9

    heartbeat(member, leader, term=2, prev_idx=4, prev_term=1, commit_index=11)

    assert commit_index(member) == 9
    assert log_end(member) == 11


# --- e. the leader never moves nextIndex backwards on success -------------------------------


def leader_with_two_appends_in_flight(make_member, member_class):
    member, follower = make_member(member_class)
    member._SyncObj__raftState = LEADER_STATE
    member._SyncObj__raftNextIndex[follower] = 21
    member._SyncObj__raftMatchIndex[follower] = 0
    member._SyncObj__lastResponseTime[follower] = 0
    return member, follower


def next_node_idx(member, follower, *, next_idx, success, reset) -> None:
    member._SyncObj__onMessageReceived(follower, {"type": "next_node_idx", "next_node_idx": next_idx, "success": success, "reset": reset})


@BOTH
def test_success_reply_for_an_early_append_keeps_next_index(make_member, member_class):
    member, follower = leader_with_two_appends_in_flight(make_member, member_class)

    next_node_idx(member, follower, next_idx=11, success=True, reset=False)

    assert member._SyncObj__raftMatchIndex[follower] == 10
    assert member._SyncObj__lastResponseTime[follower] > 0
    if member_class is PlainMember:
        assert member._SyncObj__raftNextIndex[follower] == 11, "the unmodified class no longer rewinds"
    else:
        assert member._SyncObj__raftNextIndex[follower] == 21
        assert member.raftseq_next_index_rewinds_refused == 1


@BOTH
@pytest.mark.parametrize(
    ("next_idx", "success", "reset", "match_idx"),
    [(26, True, False, 25), (5, False, True, 0)],
    ids=["success-beyond-next-index-moves-it-forwards", "failure-with-reset-still-moves-it-back"],
)
def test_other_replies_move_next_index_as_sent(make_member, member_class, next_idx, success, reset, match_idx):
    member, follower = leader_with_two_appends_in_flight(make_member, member_class)

    next_node_idx(member, follower, next_idx=next_idx, success=success, reset=reset)

    assert member._SyncObj__raftMatchIndex[follower] == match_idx
    assert member._SyncObj__raftNextIndex[follower] == next_idx
    assert counter(member, "raftseq_next_index_rewinds_refused") == 0


# --- counters ---------------------------------------------------------------------------------


def test_counters_stay_at_zero_on_in_order_replication(make_member):
    member, leader = make_member(CorrectedMember)
    assert kept_and_refused(member) == (0, 0)
    append(member, leader, term=1, prev_idx=1, prev_term=0, new_entries=entries(2, 11, 1))
    append(member, leader, term=1, prev_idx=11, prev_term=1, new_entries=entries(12, 21, 1), commit_index=11)
    heartbeat(member, leader, term=1, prev_idx=21, prev_term=1, commit_index=21)

    assert log_end(member) == 21
    assert commit_index(member) == 21
    assert kept_and_refused(member) == (0, 0)
    assert member.raftseq_next_index_rewinds_refused == 0


def test_counters_add_up_over_repeated_stale_messages(make_member):
    member, leader = follower_holding_2_to_21(make_member, CorrectedMember)

    append(member, leader, term=1, prev_idx=1, prev_term=0, new_entries=entries(2, 6, 1))
    append(member, leader, term=1, prev_idx=11, prev_term=1, new_entries=entries(12, 14, 1))
    heartbeat(member, leader, term=1, prev_idx=3, prev_term=1)

    assert log_end(member) == 21
    assert kept_and_refused(member) == (5 + 3, 3)
    # Counters belong to the member, not to the class.
    assert kept_and_refused(RaftMember) == (0, 0)


# --- f. the correction is pinned to the exact pysyncobj version -----------------------------


def import_with_version(version: str) -> subprocess.CompletedProcess:
    script = (
        "import pysyncobj.version\n"
        f"pysyncobj.version.VERSION = {version!r}\n"
        "try:\n"
        "    import raftseq.cluster.raft\n"
        "except ImportError as exc:\n"
        "    print('ImportError:', exc)\n"
        "    raise SystemExit(3)\n"
        "print('imported')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_import_with_another_pysyncobj_version_fails_loudly():
    run = import_with_version("0.3.18")
    assert run.returncode == 3, run.stdout + run.stderr
    assert "0.3.18" in run.stdout and PINNED_VERSION in run.stdout


def test_import_with_the_pinned_version_succeeds():
    run = import_with_version(PINNED_VERSION)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == "imported"


# --- no votes while the vote given in the current term may have been forgotten ----------------


def request_vote(member, candidate, *, term) -> None:
    member._SyncObj__onMessageReceived(candidate, {"type": "request_vote", "term": term, "last_log_term": 0, "last_log_index": 1})


def test_a_member_votes_when_votes_are_not_blocked(make_member):
    member, candidate = make_member(CorrectedMember)

    request_vote(member, candidate, term=3)

    assert member._SyncObj__votedForNodeId == candidate.id
    assert member._SyncObj__raftCurrentTerm == 3


def test_a_member_casts_no_vote_while_votes_are_blocked(make_member):
    member, candidate = make_member(CorrectedMember)
    member.raftseq_votes_blocked_until = time.monotonic() + 60

    request_vote(member, candidate, term=3)

    assert member._SyncObj__votedForNodeId is None

    member.raftseq_votes_blocked_until = time.monotonic() - 1
    request_vote(member, candidate, term=4)

    assert member._SyncObj__votedForNodeId == candidate.id


# --- e. pre-vote ------------------------------------------------------------------------------


class Outbox:
    """Stands in for pysyncobj's transport: records what a member sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[object, dict]] = []

    def send(self, node, message) -> bool:
        self.sent.append((node, dict(message)))
        return True

    def of_type(self, kind: str) -> list[tuple[object, dict]]:
        return [(n, m) for n, m in self.sent if m.get("type") == kind]


@pytest.fixture
def voter(tmp_path):
    """A member with two peers, connected to them as far as pysyncobj's election check goes,
    its messages captured. Returns (member, peers, outbox, make) where make(cls) builds one."""
    built = []

    def make(member_class):
        address, peers = free_address(), [free_address(), free_address()]
        conf = SyncObjConf(
            autoTick=False,
            bindAddress=address,
            dynamicMembershipChange=False,
            raftMinTimeout=0.2,
            raftMaxTimeout=0.4,
            appendEntriesPeriod=0.05,
        )
        member = member_class(address, peers, conf)
        outbox = Outbox()
        real_transport = member._SyncObj__transport
        built.append((member, real_transport))
        outbox.ready = True
        outbox.tryGetReady = real_transport.tryGetReady
        member._SyncObj__transport = outbox
        member._SyncObj__connectedToAnyone = lambda: True
        return member, [TCPNode(p) for p in peers], outbox

    yield make
    for member, real_transport in built:
        member._SyncObj__transport = real_transport
        member.destroy()


def timed_out(voter, member_class):
    """A member whose election deadline passed, after one tick: (member, peers, outbox, its term before the tick)."""
    member, peers, outbox = voter(member_class)
    term = member._SyncObj__raftCurrentTerm
    member._SyncObj__raftElectionDeadline = pysyncobj.syncobj.monotonicTime() - 1
    member._onTick(0)
    return member, peers, outbox, term


def pre_vote_reply(member, peer, *, term, granted) -> None:
    member._SyncObj__onMessageReceived(peer, {"type": "raftseq_pre_vote_response", "term": term, "granted": granted})


@BOTH
def test_a_node_whose_timeout_passes_asks_before_it_raises_its_term(voter, member_class):
    member, peers, outbox, term = timed_out(voter, member_class)
    if member_class is CorrectedMember:
        assert member._SyncObj__raftCurrentTerm == term, "a pre-vote raises no term"
        assert {n for n, _ in outbox.of_type("raftseq_pre_vote")} == set(peers)
        assert outbox.of_type("request_vote") == []
    else:
        assert member._SyncObj__raftCurrentTerm == term + 1, "pysyncobj stands for election at once"
        assert len(outbox.of_type("request_vote")) == 2


def test_a_pre_vote_won_by_a_majority_starts_the_election(voter):
    member, peers, outbox, term = timed_out(voter, CorrectedMember)
    asked = outbox.of_type("raftseq_pre_vote")[0][1]["term"]
    pre_vote_reply(member, peers[0], term=asked, granted=True)
    member._onTick(0)
    assert member._SyncObj__raftCurrentTerm == term + 1
    assert len(outbox.of_type("request_vote")) == 2


def test_a_pre_vote_refused_by_everyone_changes_nothing(voter):
    member, peers, outbox, term = timed_out(voter, CorrectedMember)
    asked = outbox.of_type("raftseq_pre_vote")[0][1]["term"]
    for peer in peers:
        pre_vote_reply(member, peer, term=asked, granted=False)
    member._onTick(0)
    assert member._SyncObj__raftCurrentTerm == term and outbox.of_type("request_vote") == []
    # a stale yes for another term counts for nothing either
    pre_vote_reply(member, peers[0], term=asked + 5, granted=True)
    member._onTick(0)
    assert outbox.of_type("request_vote") == []


def pre_vote_answer(member, outbox, candidate, *, term, last_log_index, last_log_term) -> bool:
    member._SyncObj__onMessageReceived(
        candidate, {"type": "raftseq_pre_vote", "term": term, "last_log_index": last_log_index, "last_log_term": last_log_term}
    )
    node, answer = outbox.of_type("raftseq_pre_vote_response")[-1]
    assert node == candidate and answer["term"] == term
    return answer["granted"]


def test_a_node_that_hears_its_leader_refuses_a_pre_vote_and_keeps_its_term(voter):
    member, peers, outbox = voter(CorrectedMember)
    leader, candidate = peers
    append(member, leader, term=3, prev_idx=1, prev_term=0, new_entries=entries(2, 5, 3), commit_index=5)
    assert not pre_vote_answer(member, outbox, candidate, term=4, last_log_index=5, last_log_term=3)
    assert member._SyncObj__raftCurrentTerm == 3
    # once the leader has been silent for a while, the same question gets a yes
    member._raftseq_leader_contact = pysyncobj.syncobj.monotonicTime() - 1
    assert pre_vote_answer(member, outbox, candidate, term=4, last_log_index=5, last_log_term=3)
    assert member._SyncObj__raftCurrentTerm == 3, "answering a pre-vote raises no term"


def test_a_pre_vote_from_a_shorter_or_older_log_is_refused(voter):
    member, peers, outbox = voter(CorrectedMember)
    leader, candidate = peers
    append(member, leader, term=3, prev_idx=1, prev_term=0, new_entries=entries(2, 5, 3), commit_index=5)
    member._raftseq_leader_contact = pysyncobj.syncobj.monotonicTime() - 1
    assert not pre_vote_answer(member, outbox, candidate, term=4, last_log_index=4, last_log_term=3)
    assert not pre_vote_answer(member, outbox, candidate, term=4, last_log_index=9, last_log_term=2)
    assert not pre_vote_answer(member, outbox, candidate, term=3, last_log_index=9, last_log_term=3), "not a later term"
    assert pre_vote_answer(member, outbox, candidate, term=4, last_log_index=5, last_log_term=3)


def test_a_leader_handover_skips_the_pre_vote(voter):
    member, peers, outbox = voter(CorrectedMember)
    leader = peers[0]
    append(member, leader, term=2, prev_idx=1, prev_term=0, new_entries=entries(2, 3, 2), commit_index=3)
    member._SyncObj__onMessageReceived(leader, {"type": "timeout_now", "term": 2})
    member._onTick(0)
    assert member._SyncObj__raftCurrentTerm == 3
    assert len(outbox.of_type("request_vote")) == 2 and outbox.of_type("raftseq_pre_vote") == []


# --- f. a node whose term got ahead ---------------------------------------------------------


@BOTH
def test_a_node_ahead_in_term_tells_an_older_leader(voter, member_class):
    """A node whose term got ahead (its vote requests lost) ignores the old leader's messages;
    unless it answers with its term, the leader never learns of it, and with pre-vote (the
    others hear their leader and refuse) the node stays a candidate for good."""
    member, peers, outbox = voter(member_class)
    leader = peers[0]
    append(member, leader, term=4, prev_idx=1, prev_term=0, new_entries=entries(2, 3, 4), commit_index=3)
    member._SyncObj__setCurrentTerm(5, None)  # stood for election; the requests were lost
    before = log_of(member)
    outbox.sent.clear()

    heartbeat(member, leader, term=4, prev_idx=3, prev_term=4, commit_index=3)

    assert log_of(member) == before and member._SyncObj__raftCurrentTerm == 5
    told = [(n, m) for n, m in outbox.sent if m.get("type") == "raftseq_newer_term"]
    if member_class is CorrectedMember:
        assert told == [(leader, {"type": "raftseq_newer_term", "term": 5})]
    else:
        assert outbox.sent == [], "pysyncobj answers nothing: the leader never learns of term 5"


def test_a_leader_told_of_a_newer_term_steps_down_to_it(voter):
    member, peers, outbox = voter(CorrectedMember)
    member._SyncObj__setCurrentTerm(4, None)
    member._SyncObj__setState(LEADER_STATE)
    member._SyncObj__onMessageReceived(peers[1], {"type": "raftseq_newer_term", "term": 4})
    assert member._SyncObj__raftState == LEADER_STATE, "not newer: ignored"

    member._SyncObj__onMessageReceived(peers[1], {"type": "raftseq_newer_term", "term": 5})
    assert member._SyncObj__raftState != LEADER_STATE
    assert member._SyncObj__raftCurrentTerm == 5 and member._getLeader() is None
    assert counter(member, "raftseq_newer_terms_heard") == 1


# --- pysyncobj's false CRITICAL line ------------------------------------------------------


@BOTH
def test_a_refused_truncation_of_applied_entries_logs_ours_not_pysyncobjs_false_critical(make_member, member_class, caplog):
    member, leader = follower_holding_2_to_21(make_member, member_class)
    member._SyncObj__raftLastApplied = 21  # as if 2..21 were committed and applied here
    caplog.set_level(logging.INFO)

    # A stale append of 2..6: every entry is held already, nothing conflicts.
    append(member, leader, term=1, prev_idx=1, prev_term=0, new_entries=entries(2, 6, 1))

    false_line = [r for r in caplog.records if "state machine may have diverged" in r.getMessage()]
    ours = [r for r in caplog.records if r.getMessage().startswith("kept Raft entries from index")]
    if member_class is PlainMember:
        assert false_line and log_end(member) == 6, "the unmodified class no longer logs (and truncates)"
    else:
        assert not false_line, "pysyncobj's false CRITICAL line is still logged"
        assert len(ours) == 1 and "nothing was truncated" in ours[0].getMessage()
        assert member.counters()["raftseq_truncations_refused"] == 1
        assert log_end(member) == 21


# --- a follower that no longer hears its leader -------------------------------------------


def test_a_follower_that_no_longer_hears_its_leader_reports_none(make_member):
    member, leader = make_member(CorrectedMember)
    heartbeat(member, leader, term=1, prev_idx=1, prev_term=0)
    assert member.role() is Role.FOLLOWER and member.leader_raft_address() == leader.id

    # Its links down (a closed listener, a partition) and no election possible: pysyncobj
    # keeps naming the last leader for good.
    silence_s = RAFT_LEADER_SILENCE_ELECTION_TIMEOUTS * member._SyncObj__conf.raftMaxTimeout
    member._raftseq_leader_contact -= silence_s + 0.1
    assert member._getLeader() == leader, "pysyncobj no longer keeps the leader it lost"
    assert member.role() is Role.CANDIDATE and member.leader_raft_address() == ""

    heartbeat(member, leader, term=1, prev_idx=1, prev_term=0)
    assert member.role() is Role.FOLLOWER and member.leader_raft_address() == leader.id


@pytest.mark.parametrize("member_class", [PlainMember, CorrectedMember], ids=["unmodified", "corrected"])
def test_a_term_beyond_the_wire_or_a_message_from_a_non_member_is_refused(voter, member_class):
    """Found by the protocol fuzzer (tests/test_abuse_fuzz.py): pysyncobj takes any message of
    any authenticated connection, one that said it is a read-only node included, and trusts its
    fields; a request_vote with term 2**64 became every node's term."""
    from pysyncobj.node import Node

    member, peers, outbox = voter(member_class)
    stranger = Node("0")  # what pysyncobj makes of a connection that says "readonly"
    member._SyncObj__onMessageReceived(stranger, {"type": "request_vote", "term": 7, "last_log_term": 0, "last_log_index": 0})
    member._SyncObj__onMessageReceived(peers[0], {"type": "request_vote", "term": 2**64, "last_log_term": 0, "last_log_index": 0})
    if member_class is PlainMember:
        assert member._SyncObj__raftCurrentTerm == 2**64
        return
    assert member._SyncObj__raftCurrentTerm == 0
    for malformed in (
        {"type": "request_vote", "term": True, "last_log_term": 0, "last_log_index": 0},
        {"type": "append_entries", "term": 1, "commit_index": 1, "prevLogIdx": 1, "prevLogTerm": 0, "entries": [b"x"]},
        {"type": 7, "term": 1},
        ["status"],
    ):
        member._SyncObj__onMessageReceived(peers[0], malformed)
    assert member._SyncObj__raftCurrentTerm == 0
    assert counter(member, "raftseq_peer_messages_refused") == 6
    member._SyncObj__onMessageReceived(peers[0], {"type": "request_vote", "term": 3, "last_log_term": 0, "last_log_index": 0})
    assert member._SyncObj__raftCurrentTerm == 3, "a member's well-formed message is taken"
