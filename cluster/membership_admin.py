"""A node's side of ``raftseq member``: answering ``MemberRequest`` (the membership as the node
holds it; changes on the leader), and refusing to start a node that was removed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import msgspec

from raftseq.cluster import membership as members
from raftseq.cluster.membership import MEMBERSHIP_FORMAT_VERSION, Member, Membership, MembershipError
from raftseq.cluster.membership_client import ask
from raftseq.cluster.node_exit import NodeCannotRun, NodeExit
from raftseq.cluster.raft import PROPOSAL_OK, proposal_error_name
from raftseq.cluster.tls import node_client_tls
from raftseq.sequencer import protocol

if TYPE_CHECKING:
    from raftseq.cluster.config import NodeConfig
    from raftseq.cluster.raft import SequencerReplica


class MembershipNode(Protocol):
    """What membership reads of its node (``cluster.node.Node``)."""

    config: NodeConfig
    #: None until the node's Raft member is up.
    replica: SequencerReplica | None
    #: The leader's Raft address as the node knows it ("" for none).
    leader_address: str

    def is_leader(self) -> bool: ...

    def leader_client_address(self) -> str: ...


log = logging.getLogger("raftseq.membership")

#: A node that knows no leader asks its peers this often (seconds) whether it was removed
#: meanwhile: a member removed while it was down (or cut off) never gets the entry that
#: removed it, and the others refuse its links without telling it why.
REMOVAL_CHECK_INTERVAL_S = 2.0
#: Seconds one peer is given to answer that question.
REMOVAL_CHECK_TIMEOUT_S = 1.0

#: A change whose proposal ended this way did not happen for sure: the command asks again.
_RETRY_ERRORS = ("not_leader", "leader_changed", "missing_leader", "queue_full", "request_denied")


def refuse_if_removed(config: NodeConfig) -> None:
    """Raise ``NodeCannotRun(REMOVED)`` when the node's saved membership says it was removed
    (``INVALID_CONFIG`` when the membership file cannot be read)."""
    try:
        held = members.load(config.data_dir)
    except (OSError, MembershipError) as exc:
        raise NodeCannotRun(NodeExit.INVALID_CONFIG, f"cannot read the membership in {config.data_dir}: {exc}") from None
    if held is not None and config.id in held.removed:
        raise NodeCannotRun(
            NodeExit.REMOVED,
            f"this node ({config.id}) was removed from the cluster (membership change {held.number}) and is refused; "
            "to bring its machine back, clear its data directory and add it anew under a new id (raftseq member add)",
        )


def member_of(request: protocol.MemberRequest) -> Member:
    """The member a request names (``MembershipError`` when a field is malformed)."""
    try:
        return msgspec.convert(
            {
                "id": request.node_id,
                "raft_address": request.raft_address or "unknown:1",
                "client_address": request.client_address or "unknown:1",
                "raft_public_key": request.raft_public_key,
            },
            Member,
        )
    except msgspec.ValidationError as exc:
        raise MembershipError(f"bad member: {exc}") from None


def membership_reply(node: MembershipNode, request: protocol.MemberRequest, reply: Callable[[protocol.MemberReply], None]) -> None:
    replica = node.replica

    def answer(error: str = "", *, retry: bool = False) -> None:
        held = replica.membership if replica is not None else members.Membership.of_config(node.config)
        listed = [protocol.MemberInfo(m.id, m.raft_address, m.client_address, m.raft_public_key, m.learner) for m in held.members]
        removed = held.removed[-protocol.REMOVED_LISTED_MAX :]
        reply(
            protocol.MemberReply(
                error[: protocol.limits.DETAIL_CHARS_MAX], retry, node.leader_client_address(), held.number, listed, removed
            )
        )

    if replica is None:
        answer("the node is starting", retry=True)
        return
    if request.op == "list":
        answer()
        return
    if not node.is_leader():
        answer("not the leader", retry=True)
        return
    try:
        member = member_of(request)
        if request.op == "add":
            if not (request.raft_address and request.client_address):
                raise MembershipError("add needs the new member's raft and client addresses")
            kind = "learner"
        else:
            kind = "remove" if request.op == "remove" else "promote"
            member = replica.membership.member(member.id) or member
        if kind == "remove" and member.raft_address == node.config.raft_address:
            replica.request_handover()
            answer(f"{member.id} leads: handing leadership over first", retry=True)
            return

        def committed(result: object, error: int) -> None:
            if error == PROPOSAL_OK:
                answer()
            else:
                name = proposal_error_name(error)
                answer(f"{request.op} {member.id} not done ({name})", retry=name in _RETRY_ERRORS)

        replica.change_membership(kind, member, committed)
    except MembershipError as exc:
        answer(str(exc))


def membership_of(reply: protocol.MemberReply) -> Membership:
    """The membership a ``MemberReply`` lists (without history)."""
    listed = [Member(m.id, m.raft_address, m.client_address, m.raft_public_key, m.learner) for m in reply.members]
    return Membership(MEMBERSHIP_FORMAT_VERSION, reply.number, listed, list(reply.removed))


async def watch_for_removal(node: MembershipNode) -> None:
    """While the node knows no leader, ask its peers whether a newer membership removed it;
    if one did, the node adopts it (saved: a restart is refused too) and stops (``REMOVED``)."""
    while True:
        await asyncio.sleep(REMOVAL_CHECK_INTERVAL_S)
        replica = node.replica
        if replica is None or node.leader_address:
            continue
        for peer in replica.membership.peers_of(node.config.id):
            try:
                reply = await ask(
                    peer.client_address,
                    protocol.MemberRequest("list"),
                    token=node.config.client_token,
                    timeout_s=REMOVAL_CHECK_TIMEOUT_S,
                    tls=node_client_tls(node.config.tls),
                )
            except Exception as exc:  # noqa: BLE001 - a peer that cannot say (down, refusing us, an older version)
                log.debug("could not ask %s for the membership: %r", peer.id, exc)
                continue
            if reply.number > replica.membership.number and node.config.id in reply.removed:
                log.error("%s says membership %d removed this node (%s)", peer.id, reply.number, node.config.id)
                replica.adopt_newer(membership_of(reply))
                return
