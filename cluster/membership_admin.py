"""A node's side of ``raftseq member``: answering ``MemberRequest`` (the membership as the node
holds it; changes on the leader), and refusing to start a node that was removed."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from raftseq.cluster import membership as members
from raftseq.cluster.membership import Member, MembershipError
from raftseq.cluster.node_exit import NodeCannotRun, NodeExit
from raftseq.cluster.raft import PROPOSAL_OK, proposal_error_name
from raftseq.sequencer import protocol

if TYPE_CHECKING:
    from raftseq.cluster.config import NodeConfig
    from raftseq.cluster.node import Node

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


def membership_reply(node: Node, request: protocol.MemberRequest, reply: Callable[[protocol.MemberReply], None]) -> None:
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
