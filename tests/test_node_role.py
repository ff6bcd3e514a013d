"""The node's role watcher (``Node._follow_role``): the batcher runs exactly while this node leads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from raftseq.cluster.local import local_configs
from raftseq.cluster.node import Node
from raftseq.sequencer.protocol import Role


class FakeReplica:
    def __init__(self) -> None:
        self.now = (Role.FOLLOWER, 1, "127.0.0.1:7201")

    def role(self) -> Role:
        return self.now[0]

    def term(self) -> int:
        return self.now[1]

    def leader_raft_address(self) -> str:
        return self.now[2]


class FakeBatcher:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.enabled = False
        self.held = False

    def start(self) -> None:
        self.calls.append("start")
        self.enabled, self.held = True, False

    def stop(self, reason: str) -> None:
        self.calls.append("stop")
        self.enabled = False

    def hold(self) -> None:
        self.calls.append("hold")
        self.held = True


@pytest.fixture
def node(tmp_path):
    node = Node(local_configs(str(tmp_path), 7300, insecure=True)[0])
    node.replica = FakeReplica()
    node.batcher = FakeBatcher()
    node.gateway = SimpleNamespace(draining=False)
    try:
        yield node
    finally:
        node.journal.close()


def test_the_batcher_starts_when_this_node_leads_and_stops_when_it_follows(node):
    me = node.config.raft_address
    node._follow_role()
    node.replica.now = (Role.LEADER, 2, me)
    node._follow_role()
    node._follow_role()
    node.replica.now = (Role.FOLLOWER, 3, "127.0.0.1:7202")
    node._follow_role()
    assert node.batcher.calls == ["start", "stop"]
    assert not node.is_leader()


def test_a_leader_that_stepped_down_and_was_elected_again_between_two_looks_restarts_its_batcher(node):
    """A transfer held the batcher and handed leadership away; leadership came back within one
    look of the watcher. Seen as leading on, the node kept the held batcher and its queued
    submits were never proposed nor answered (a client waited forever)."""
    me = node.config.raft_address
    node.replica.now = (Role.LEADER, 2, me)
    node._follow_role()
    node.batcher.hold()  # the transfer away
    node.replica.now = (Role.LEADER, 4, me)  # term 3 under another leader went unseen
    node._follow_role()
    assert node.batcher.calls == ["start", "hold", "stop", "start"]
    assert node.batcher.enabled and not node.batcher.held
    assert node.is_leader() and node.leader_term == 4


def test_a_drained_node_elected_again_between_two_looks_holds_and_hands_over_again(node, monkeypatch):
    handed: list[str] = []
    monkeypatch.setattr(Node, "_keep_leadership_off", lambda self: handed.append("keep off") or self.batcher.hold())
    me = node.config.raft_address
    node.gateway.draining = True
    node.replica.now = (Role.LEADER, 2, me)
    node._follow_role()
    node.replica.now = (Role.LEADER, 4, me)
    node._follow_role()
    assert node.batcher.calls == ["start", "hold", "stop", "start", "hold"]
    assert handed == ["keep off", "keep off"]


def test_a_leader_elected_again_between_two_looks_counts_as_a_leader_change(node):
    me = node.config.raft_address
    node.replica.now = (Role.LEADER, 2, me)
    node._follow_role()
    before = node.metrics.leader_changes
    node.replica.now = (Role.LEADER, 4, me)  # term 3 had another leader, unseen
    node._follow_role()
    node._follow_role()
    assert node.metrics.leader_changes == before + 1


def test_a_follower_whose_leader_lost_and_won_again_between_two_looks_counts_it_once(node):
    other = "127.0.0.1:7202"
    node.replica.now = (Role.FOLLOWER, 3, other)
    node._follow_role()
    before = node.metrics.leader_changes
    node.replica.now = (Role.FOLLOWER, 5, other)
    node._follow_role()
    node.replica.now = (Role.CANDIDATE, 6, "")  # no leader: nothing to count
    node._follow_role()
    assert node.metrics.leader_changes == before + 1
