"""Planned leadership transfer, on the leader (``LeaderTransfer``: ``raftseq leader transfer``).

1. Hold the batcher: nothing new is proposed; submits queue meanwhile (within the usual
   bounds: ``Busy`` beyond them).
2. Wait until every proposed batch has committed and the target holds the leader's last log
   index (at most ``TRANSFER_CATCH_UP_TIMEOUT_S``). The log no longer grows, so this ends.
3. Have the target stand for election at once (Raft's TimeoutNow through pysyncobj; its vote
   request skips the pre-vote). The leader steps down on that request (a newer term); its
   batcher, stopped with the role, answers the queued submits as unknown and their clients
   resubmit them to the new leader, which ``NotLeader`` names.
4. Wait until this node follows another leader (at most ``TRANSFER_ELECTION_TIMEOUT_S``), or
   leads again in a later term (leadership left and came back between two looks: the answer
   says so). If none comes, or the target could not catch up, the batcher is released and this
   node leads on; the answer says why. The hold belongs to the term this node led in: a
   leadership that ended and came back while the transfer waited ends the transfer, which then
   leaves the batcher to the role watcher (it restarted it for the new term).

A drained node (``raftseq node drain``) does not lead: elected again (its peers restarted, a
transfer named it, an election it happened to win), it proposes nothing and hands leadership
over again at once, and asks again (after ``DRAINED_HANDOVER_RETRY_S``, doubling up to
``DRAINED_HANDOVER_RETRY_MAX_S``) while no follower can take it (``keep_off_while_drained``).
Meanwhile it leads on: a cluster whose other nodes cannot lead still has a leader. It tries only
while another voter is connected (a transfer holds proposals while it waits for its target). It still votes and stands for election like any member: refusing to stand
would leave a cluster of drained nodes without a leader.

A node with a shorter log cannot win instead: a vote goes only to a candidate whose log is at
least as up to date as the voter's (Raft's election restriction, in pysyncobj's vote and our
pre-vote), and every committed entry is on a majority, so such a candidate lacks a majority
of votes; after step 2 neither the old leader nor the target votes for it (in three nodes
they are the majority). Whoever wins holds every entry the old leader acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from raftseq.cluster.batcher import Batcher
from raftseq.cluster.config import NodeConfig
from raftseq.cluster.raft.replica import SequencerReplica
from raftseq.sequencer import protocol
from raftseq.sequencer.protocol import Role

log = logging.getLogger("raftseq.handover")

#: How long the leader, its proposals held, waits for the target to hold its whole log. A
#: follower that is current needs one round trip; one that is not is the wrong target.
TRANSFER_CATCH_UP_TIMEOUT_S = 2.0
#: How long the old leader waits, after TimeoutNow, to follow a new leader: a few election
#: timeouts (the target's election is one round of vote requests).
TRANSFER_ELECTION_TIMEOUT_S = 2.0
#: How often the waits look at the Raft state, in seconds (a Raft tick runs every 5 ms).
TRANSFER_POLL_S = 0.002
#: A drained node that leads and could not hand leadership over asks again after this long, in
#: seconds, doubling up to the maximum (a failed transfer held proposals up to the catch-up
#: timeout above: tried often, it would stall the clients of a cluster it must lead).
DRAINED_HANDOVER_RETRY_S = 1.0
DRAINED_HANDOVER_RETRY_MAX_S = 30.0


class LeadingNode(Protocol):
    """What a transfer uses of its node."""

    config: NodeConfig
    replica: SequencerReplica | None
    batcher: Batcher | None

    def is_leader(self) -> bool: ...

    def leader_client_address(self) -> str: ...


class Handover:
    """One node's leadership transfers, one at a time."""

    def __init__(self, node: LeadingNode) -> None:
        self.node = node
        self.running = False
        #: Completed transfers away from this node (read by tests and the log).
        self.transfers_done = 0

    async def transfer(self, to: str) -> protocol.LeaderTransferred:
        """Hand leadership to node id `to` ("" : the most caught-up follower)."""
        node = self.node
        if self.running:
            return _refused("a leadership transfer is already under way on this node")
        if node.replica is None or node.batcher is None or not node.is_leader():
            return _refused(f"{node.config.id} is not the leader", leader=node.leader_client_address())
        # The voters as the membership stands now (``raftseq member``), never a learner: a
        # learner cannot be elected.
        peers = {m.id: m for m in node.replica.membership.voters() if m.id != node.config.id}
        if to and to not in peers:
            known = ", ".join(sorted(peers)) or "none"
            return _refused(f"unknown node {to!r} (the other nodes: {known})", leader=node.leader_client_address())
        self.running = True
        held_at = time.monotonic()
        # The term this node leads in: the hold is this term's. A leadership that ended and came
        # back between two looks (a new term) is a step-down: the role watcher stopped and
        # started the batcher (``Node._follow_role``), so the hold is gone or someone else's.
        term = node.replica.term()
        node.batcher.hold()
        try:
            target = await self._caught_up_target(to, peers, term)
            if target is None:
                if node.replica.term() != term:
                    return self._abandon(held_at, term, "this node's leadership ended while the target caught up")
                what = f"{to} did not" if to else "no follower did"
                return self._abandon(held_at, term, f"{what} catch up within {TRANSFER_CATCH_UP_TIMEOUT_S:g} s")
            log.warning("leadership transfer to %s: its log is current; it stands for election now", target.id)
            node.replica.hand_leadership_to(target.raft_address)
            leader = await self._new_leader(term)
            if not leader:
                return self._abandon(held_at, term, f"no new leader within {TRANSFER_ELECTION_TIMEOUT_S:g} s")
            held_ms = round((time.monotonic() - held_at) * 1000)
            self.transfers_done += 1
            detail = ""
            if leader == node.config.raft_address:
                detail = f"leadership left {node.config.id} (term {term} -> {node.replica.term()}) and came back to it"
                log.warning("leadership transfer: %s after %d ms", detail, held_ms)
            else:
                log.warning("leadership transferred to %s after %d ms", leader, held_ms)
            # The new leader by its Raft address (this node may not yet have seen its own role change).
            return protocol.LeaderTransferred(True, node.replica.client_address_of(leader), detail, held_ms)
        finally:
            self.running = False

    async def keep_off_while_drained(self, draining: Callable[[], bool]) -> None:
        """Hand leadership over while this node leads and `draining()` holds, until a transfer
        succeeds. The caller holds the batcher first, so that nothing is proposed meanwhile."""
        node = self.node
        delay = DRAINED_HANDOVER_RETRY_S
        while draining() and node.is_leader():
            if self._another_voter_connected():
                answer = await self.transfer("")
                if answer.ok:
                    log.warning("drained, and elected again: leadership handed over to %s", answer.leader)
                    return
                why = answer.detail
            else:
                why = "no other voter is connected"
                if node.batcher is not None and node.batcher.held and not self.running:
                    node.batcher.release()
            log.warning("drained, and leading: leadership not handed over (%s); trying again in %g s", why, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, DRAINED_HANDOVER_RETRY_MAX_S)

    def _another_voter_connected(self) -> bool:
        replica = self.node.replica
        if replica is None:
            return False
        connected = replica.connected_members()
        return any(m.raft_address in connected for m in replica.membership.voters() if m.id != self.node.config.id)

    async def _caught_up_target(self, to: str, peers: dict, term: int) -> object | None:
        """The peer to hand over to once it holds the whole log (and nothing is in flight),
        while this node leads in `term`."""
        replica, batcher = self.node.replica, self.node.batcher
        deadline = time.monotonic() + TRANSFER_CATCH_UP_TIMEOUT_S
        candidates = [peers[to]] if to else sorted(peers.values(), key=lambda p: p.id)
        while time.monotonic() < deadline and replica.role() is Role.LEADER and replica.term() == term:
            if not batcher.in_flight:
                last = replica.last_log_index()
                for peer in candidates:
                    if replica.follower_match_index(peer.raft_address) >= last:
                        return peer
            await asyncio.sleep(TRANSFER_POLL_S)
        return None

    async def _new_leader(self, term: int) -> str:
        """The Raft address of the leader after this node's leadership of `term` ended ("":
        none in time): another node, or this one again in a later term (leadership left and
        came back between two looks: a target that was drained hands it back at once)."""
        replica = self.node.replica
        deadline = time.monotonic() + TRANSFER_ELECTION_TIMEOUT_S
        while time.monotonic() < deadline:
            leader = replica.leader_raft_address()
            if leader and (leader != self.node.config.raft_address or replica.term() != term):
                return leader
            await asyncio.sleep(TRANSFER_POLL_S)
        return ""

    def _abandon(self, held_at: float, term: int, why: str) -> protocol.LeaderTransferred:
        node = self.node
        if node.is_leader() and node.replica.term() == term:
            node.batcher.release()  # (in a later term the hold is not this transfer's)
        held_ms = round((time.monotonic() - held_at) * 1000)
        log.warning("leadership transfer abandoned after %d ms: %s", held_ms, why)
        return _refused(why, leader=node.leader_client_address(), held_ms=held_ms)


def _refused(why: str, *, leader: str = "", held_ms: int = 0) -> protocol.LeaderTransferred:
    return protocol.LeaderTransferred(False, leader, why, held_ms)
