"""Cluster membership: the records (``cluster.membership``) and the Raft member's side of a change
(``cluster.raft.member``: learners, one change at a time, undo only with the entries).

The Raft scenarios drive one member by hand (``autoTick=False``), as tests/test_raft_member.py
does; the ones about a pysyncobj fault run on both the unmodified ``SyncObj`` and ``RaftMember``.
The whole story under load (replace a dead node, then kill the leader) is
chaos_tests/test_membership.py.
"""

from __future__ import annotations

import json
import pickle

import msgspec


import pytest
from pysyncobj import FAIL_REASON, SyncObjConf
from pysyncobj import pickle as syncobj_pickle
from pysyncobj.node import TCPNode

from raftseq.cluster import membership as members
from raftseq.cluster.config import NodeConfig, PeerConfig
from raftseq.cluster.membership import Member, Membership, MembershipError, quorum_problem
from raftseq.cluster.raft.member import MEMBERSHIP_ADD
from raftseq.sequencer import protocol
from test_raft_member import CorrectedMember, PlainMember, free_address


@pytest.fixture(autouse=True)
def pysyncobj_loads_its_own_pickles(monkeypatch):
    """Several tests below drive pysyncobj's own membership API (``addNodeToCluster``), whose
    entries pickle a ``TCPNode``. A node never uses it (``RaftMember.propose_membership``
    pickles strings), and the allow-list that ``raft.install()`` puts in pysyncobj refuses that
    class: once any earlier test of the run installed it, these tests failed. They run with
    pysyncobj's plain loader, as when nothing installed it (the order no longer matters)."""
    monkeypatch.setattr(syncobj_pickle, "loads", pickle.loads)


KEY = {name: f"{i:02x}" * 32 for i, name in enumerate(["n1", "n2", "n3", "n4", "n5"], start=1)}


def config(node_id: str = "n1", *, join: bool = False, peers=("n2", "n3"), data_dir: str = "/tmp/x") -> NodeConfig:
    number = int(node_id[1:])
    return NodeConfig(
        id=node_id,
        data_dir=data_dir,
        raft_address=f"127.0.0.1:{200 + number}",
        client_address=f"127.0.0.1:{100 + number}",
        peers=[PeerConfig(p, f"127.0.0.1:{200 + int(p[1:])}", f"127.0.0.1:{100 + int(p[1:])}", KEY[p]) for p in peers],
        raft_public_key=KEY[node_id],
        join=join,
    )


def new_member(node_id: str = "n4", *, raft: str = "", client: str = "", key: str | None = None) -> Member:
    number = int(node_id[1:])
    return Member(node_id, raft or f"127.0.0.1:{200 + number}", client or f"127.0.0.1:{100 + number}", KEY[node_id] if key is None else key)


# --- the records ------------------------------------------------------------------------------


def test_the_configs_membership_has_every_node_as_a_voter_numbered_0():
    held = Membership.of_config(config())
    assert held.number == 0
    assert [(m.id, m.learner) for m in held.members] == [("n1", False), ("n2", False), ("n3", False)]


def test_a_joining_node_starts_as_a_learner_numbered_below_any_change():
    held = Membership.of_config(config("n4", join=True, peers=("n1", "n3")))
    assert held.number == -1
    assert held.member("n4").learner


def test_replace_is_a_learner_then_its_promotion_then_the_removal():
    held = Membership.of_config(config())
    for kind, member in (("learner", new_member()), ("promote", new_member()), ("remove", held.member("n2"))):
        change = held.change(kind, member)
        assert change.before == held.without_history()
        assert change.after.number == held.number + 1
        held = held.then(change.after)
    assert held.number == 3
    assert [(m.id, m.learner) for m in held.members] == [("n1", False), ("n3", False), ("n4", False)]
    assert held.removed == ["n2"]
    assert [h.number for h in held.history] == [0, 1, 2]


def test_undoing_a_change_goes_back_to_the_membership_before_it():
    held = Membership.of_config(config())
    change = held.change("learner", new_member())
    after = held.then(change.after)
    back = after.back_to(change.before)
    assert back.without_history() == held.without_history()
    assert back.history == []


@pytest.mark.parametrize(
    ("kind", "member", "why"),
    [
        ("remove", Member("n9", "127.0.0.1:9", "127.0.0.1:8"), "unknown node id n9 (members: n1, n2, n3)"),
        ("promote", Member("n9", "127.0.0.1:9", "127.0.0.1:8"), "unknown node id n9"),
        ("learner", new_member(raft="127.0.0.1:202"), "address 127.0.0.1:202 is in use by member n2"),
        ("learner", new_member(client="127.0.0.1:103"), "address 127.0.0.1:103 is in use by member n3"),
        ("learner", new_member(key=KEY["n1"]), "the public key of n4 is the key of member n1"),
        ("learner", new_member(key=""), "a new member needs its public key"),
        ("learner", Member("n2", "127.0.0.1:9", "127.0.0.1:8", KEY["n5"]), "n2 is a member already"),
        ("promote", Member("n2", "127.0.0.1:202", "127.0.0.1:102"), "n2 is a voter already"),
    ],
)
def test_a_change_that_cannot_follow_is_refused_in_one_line(kind, member, why):
    with pytest.raises(MembershipError) as refused:
        Membership.of_config(config()).change(kind, member)
    assert why in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_removed_id_cannot_come_back_and_one_learner_at_a_time():
    held = Membership.of_config(config())
    held = held.then(held.change("remove", held.member("n2")).after)
    with pytest.raises(MembershipError, match="node id n2 was removed from this cluster"):
        held.change("learner", new_member("n2", raft="127.0.0.1:9", client="127.0.0.1:8", key=KEY["n5"]))
    held = held.then(held.change("learner", new_member()).after)
    with pytest.raises(MembershipError, match="n4 is still catching up; one new member at a time"):
        held.change("learner", new_member("n5"))


def test_the_last_voter_cannot_be_removed():
    held = Membership.of_config(config(peers=()))
    with pytest.raises(MembershipError, match="n1 is the last voter"):
        held.change("remove", held.member("n1"))


def test_quorum_of_the_voters_after_a_change():
    assert quorum_problem(["n1", "n3", "n4"], {"n1", "n3"}) == ""
    assert "it would leave no quorum: 1 of the 2 voters after it are reachable (n1), a majority needs 2" in quorum_problem(
        ["n1", "n3"], {"n1", "n2"}
    )
    assert quorum_problem([], {"n1"}) == "it would leave no voter"


def test_the_membership_file_is_saved_whole_and_versioned(tmp_path):
    held = Membership.of_config(config())
    held = held.then(held.change("learner", new_member()).after)
    assert members.load(str(tmp_path)) is None
    members.save(str(tmp_path), held)
    assert members.load(str(tmp_path)) == held
    raw = json.loads((tmp_path / members.MEMBERSHIP_FILE).read_text())
    assert raw["format_version"] == members.MEMBERSHIP_FORMAT_VERSION
    raw["format_version"] = 99
    (tmp_path / members.MEMBERSHIP_FILE).write_text(json.dumps(raw))
    with pytest.raises(MembershipError, match="membership format 99, this node reads 1"):
        members.load(str(tmp_path))


def test_a_change_travels_as_bytes_and_garbage_is_refused():
    held = Membership.of_config(config())
    change = held.change("learner", new_member())
    assert members.decode_change(members.encode_change(change)) == change
    with pytest.raises(MembershipError, match="not a membership change"):
        members.decode_change(b"\x93\x01")


# --- the Raft member ----------------------------------------------------------------------------


BOTH = pytest.mark.parametrize("member_class", [PlainMember, CorrectedMember], ids=["unmodified", "corrected"])


@pytest.fixture
def make_member():
    built = []

    def make(member_class, partners=()):
        address = free_address()
        conf = SyncObjConf(autoTick=False, bindAddress=address, dynamicMembershipChange=True)
        member = member_class(address, list(partners), conf)
        built.append(member)
        return member

    yield make
    for member in built:
        member.destroy()


def lead_alone(member) -> None:
    """A member without partners elects itself and commits its no-op."""
    member._SyncObj__raftElectionDeadline = 0
    for _ in range(200):
        member._onTick(0)
        if member._isLeader() and member._SyncObj__raftLastApplied >= member._SyncObj__noopIDx:
            return
    raise AssertionError("a lone member did not become leader")


def membership_entry(kind: str, address: str) -> bytes:
    return bytes((2,)) + syncobj_pickle.dumps([kind, address, address, b""])


@BOTH
def test_one_membership_change_at_a_time(make_member, member_class):
    """pysyncobj checks for a change in flight against an index it never sets: a second change
    was taken while the first was not yet committed (Raft allows one at a time)."""
    leader = make_member(member_class)
    lead_alone(leader)
    outcomes = []
    leader.addNodeToCluster(free_address(), callback=lambda result, error: outcomes.append(error))
    leader._onTick(0)  # the first is appended; it cannot commit (its node never answers)
    leader.addNodeToCluster(free_address(), callback=lambda result, error: outcomes.append(error))
    leader._onTick(0)
    if member_class is PlainMember:
        assert len(leader.otherNodes) == 2  # the fault: both taken
    else:
        assert len(leader.otherNodes) == 1
        assert outcomes == [FAIL_REASON.REQUEST_DENIED]


@BOTH
def test_a_refused_truncation_does_not_undo_a_membership_change(make_member, member_class):
    """A repeated AppendEntries that holds only entries the follower has: pysyncobj undoes the
    membership changes past ``prevLogIdx`` before it truncates; ``RaftMember`` refuses that
    truncation (the entries match), so the undo must not happen either (the member set would
    no longer be the one its log names)."""
    leader_address = free_address()
    follower = make_member(member_class, [leader_address])
    leader = TCPNode(leader_address)
    added = free_address()
    new = [(b"\x00x", 2, 1), (membership_entry(MEMBERSHIP_ADD, added), 3, 1), (b"\x00y", 4, 1)]
    message = {"type": "append_entries", "term": 1, "commit_index": 1, "prevLogIdx": 1, "prevLogTerm": 0, "entries": new}
    follower._SyncObj__onMessageReceived(leader, message)
    assert TCPNode(added) in follower.otherNodes
    stale = dict(message, entries=new[:1])  # an older message: entry 2 only, held already
    follower._SyncObj__onMessageReceived(leader, stale)
    held = [entry[1] for entry in follower._SyncObj__getEntries(2, 3)]
    in_members = TCPNode(added) in follower.otherNodes
    if member_class is PlainMember:
        assert held == [2] and not in_members  # pysyncobj's own: log and members shrink together
    else:
        assert held == [2, 3, 4] and in_members, f"log {held}, member {added} {'kept' if in_members else 'dropped'}"


def test_a_learner_does_not_count_toward_a_commit(make_member):
    """A leader with an unreachable learner commits alone: pysyncobj would count the learner
    as a voter (two members: a majority needs both)."""
    leader = make_member(CorrectedMember)
    lead_alone(leader)
    learner = free_address()
    leader.set_learners([learner])
    leader.addNodeToCluster(learner)
    leader._onTick(0)
    applied = []
    leader.apply_entry(b"batch", callback=lambda result, error: applied.append(error))
    for _ in range(20):
        leader._onTick(0)
    assert applied == [FAIL_REASON.SUCCESS]
    assert leader._isLeader()


def test_without_the_learner_mark_the_same_leader_cannot_commit(make_member):
    """The contrast: the same add without a learner mark is a voter that never answers."""
    leader = make_member(CorrectedMember)
    lead_alone(leader)
    leader.addNodeToCluster(free_address())
    leader._onTick(0)
    applied = []
    leader.apply_entry(b"batch", callback=lambda result, error: applied.append(error))
    for _ in range(20):
        leader._onTick(0)
    assert applied == []


def test_a_learner_neither_votes_nor_stands(make_member):
    voter = free_address()
    member = make_member(CorrectedMember, [voter])
    member.set_learners([member.selfNode.id])
    sent = []
    member._SyncObj__transport.send = lambda node, message: sent.append(message)
    member._SyncObj__onMessageReceived(TCPNode(voter), {"type": "request_vote", "term": 5, "last_log_index": 9, "last_log_term": 4})
    assert not any(m.get("type") == "response_vote" for m in sent)
    member._SyncObj__raftElectionDeadline = 0
    member._SyncObj__connectedToAnyone = lambda: True
    for _ in range(5):
        member._onTick(0)
    assert member._SyncObj__raftCurrentTerm == 0
    assert not any(m.get("type") in ("request_vote", "raftseq_pre_vote") for m in sent)


def test_a_removed_node_is_refused_at_start(tmp_path):
    """A node whose saved membership removed it does not start, and says why."""
    conf = config(data_dir=str(tmp_path / "n2"), peers=("n1", "n3"))
    conf = NodeConfig(**{**{f: getattr(conf, f) for f in conf.__struct_fields__}, "id": "n2", "insecure": True})
    held = Membership.of_config(config())
    held = held.then(held.change("remove", held.member("n2")).after)
    (tmp_path / "n2").mkdir()
    members.save(str(tmp_path / "n2"), held)
    from raftseq.cluster.membership_admin import refuse_if_removed
    from raftseq.cluster.node_exit import NodeCannotRun, NodeExit

    with pytest.raises(NodeCannotRun) as refused:
        refuse_if_removed(conf)
    assert refused.value.code == NodeExit.REMOVED
    assert "this node (n2) was removed from the cluster (membership change 1) and is refused" in str(refused.value)


class SnapshotBeforeMembership(msgspec.Struct, frozen=True, array_like=True):
    """``replica.RaftSnapshot`` as raftseq 0.2 wrote and reads it (no membership field)."""

    format_version: int
    machine: bytes
    last_applied: tuple[bytes, int, int]
    previous: tuple[bytes, int, int]
    cluster: list[str]


def test_raft_snapshots_with_and_without_the_membership_read_both_ways():
    """The membership rides at the end of the Raft snapshot: a node of 0.2 reads a snapshot
    that carries it (and ignores it), and this one reads 0.2's (and keeps its own membership)."""
    from raftseq.cluster.raft.replica import RaftSnapshot

    held = Membership.of_config(config())
    new = RaftSnapshot(1, b"machine", (b"a", 9, 2), (b"b", 8, 2), ["127.0.0.1:201"], members.encode_membership(held))
    old = msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=SnapshotBeforeMembership)
    assert (old.machine, old.last_applied, old.cluster) == (b"machine", (b"a", 9, 2), ["127.0.0.1:201"])
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(old), type=RaftSnapshot)
    assert back.membership == b"" and back.machine == b"machine"
    assert members.decode_membership(new.membership, source="snapshot") == held


@BOTH
def test_pysyncobj_admin_requests_over_a_link_change_no_member(make_member, member_class):
    """pysyncobj takes ``add``/``remove`` from any authenticated link (``syncobj_admin``) once
    dynamic membership is on: a change without our change record (no key admitted, nothing
    saved). ``RaftMember`` refuses them."""
    leader = make_member(member_class)
    lead_alone(leader)
    outcomes = []
    leader._addNodeToCluster([free_address()], lambda result, error: outcomes.append(error))
    leader._onTick(0)
    if member_class is PlainMember:
        assert len(leader.otherNodes) == 1  # the fault: a member added behind our back
    else:
        assert leader.otherNodes == set()
        assert outcomes == [FAIL_REASON.REQUEST_DENIED]


def test_a_node_that_predates_membership_commands_is_named_as_such():
    """A node of raftseq 0.2 cannot decode ``MemberRequest`` and answers ``Rejected(bad_frame)``
    (new frame types need no protocol version): the command says so in its one line."""
    import asyncio

    from raftseq.cluster import membership_client
    from raftseq.sequencer.protocol import RejectReason
    from scripted_node import ScriptedConnection, ScriptedNode

    async def old_node(conn: ScriptedConnection) -> None:
        await conn.welcome()
        conn.send(protocol.Rejected(RejectReason.BAD_FRAME, "undecodable frame"))
        await conn.hold_until_stopped()

    async def scenario() -> str:
        node = ScriptedNode([old_node] * 20)
        address = await node.start()
        try:
            with pytest.raises(membership_client.MemberCommandError) as refused:
                await membership_client.list_members([address], token="", timeout_s=1.0)
            return str(refused.value)
        finally:
            await node.stop()

    said = asyncio.run(scenario())
    assert said.startswith("no node answered within 1 s: 127.0.0.1:"), said
    assert said.endswith(": this node predates membership commands"), said


def test_a_promotion_left_unanswered_in_an_earlier_term_does_not_block_membership_changes():
    """A leader that proposed a learner's promotion and lost leadership before it committed,
    then caught up past that entry by a snapshot, never gets the proposal's callback. Its mark
    stayed set: led again, it refused every membership change ("another membership change is in
    progress") and promoted no learner until restarted. The mark holds for its own term only."""
    from raftseq.cluster.raft.replica import SequencerReplica

    term = [2]
    replica = object.__new__(SequencerReplica)  # the one method under test, without a Raft node
    replica.membership_entry_pending = lambda: False
    replica._getTerm = lambda: term[0]
    replica._promotion_asked_term = 2
    assert replica._change_in_progress(), "a promotion asked in this term and not answered is in progress"
    term[0] = 5
    assert not replica._change_in_progress()
    replica.membership_entry_pending = lambda: True
    assert replica._change_in_progress()
