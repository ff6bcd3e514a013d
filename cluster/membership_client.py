"""``raftseq member``'s side: ask the nodes for the membership, and have the leader change it.

A change goes to the leader (a node that is not answers with ``retry`` and the leader it
knows); a leader asked to remove itself hands leadership over first and answers ``retry``.
``add`` returns once the new member is a voter (the leader promotes a learner that holds every
committed entry); ``replace`` is ``add`` of the new member, then ``remove`` of the old one.
"""

from __future__ import annotations

import asyncio
import time

from raftseq.clients.connection import Rejected, request_once
from raftseq.clients.tls import ClientTls, TlsError
from raftseq.sequencer import protocol

#: Seconds between two asks while a leader is being elected or leadership handed over.
RETRY_INTERVAL_S = 0.2
#: How often ``add`` looks whether the new member has its vote yet, in seconds.
PROMOTION_POLL_S = 0.2
SESSION = "member-admin"


class MemberCommandError(Exception):
    """A membership command that failed; the message is one line for the operator."""


async def ask(
    address: str, request: protocol.MemberRequest, *, token: str, timeout_s: float, tls: ClientTls = None
) -> protocol.MemberReply:
    """One node's answer (``OSError``/``TimeoutError``/``ConnectionError`` when it gives none)."""
    return await request_once(address, request, protocol.MemberReply, session=SESSION, token=token, timeout_s=timeout_s, tls=tls)


async def ask_cluster(
    endpoints: list[str], request: protocol.MemberRequest, *, token: str, timeout_s: float, tls: ClientTls = None
) -> protocol.MemberReply:
    """The answer of the first node that gives one without ``retry`` (a change: the leader's;
    a node that is not the leader sends us to the one it knows), retrying for up to `timeout_s`. Raises ``MemberCommandError`` (one line) when none does."""
    deadline = time.monotonic() + timeout_s
    problems: dict[str, str] = {}
    preferred: str | None = None
    while True:
        order = ([preferred] if preferred else []) + [e for e in endpoints if e != preferred]
        for address in order:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                reply = await ask(address, request, token=token, timeout_s=min(left, max(1.0, timeout_s / 4)), tls=tls)
            except (Rejected, TlsError):
                raise
            except (OSError, TimeoutError, ConnectionError) as exc:
                text = str(exc) or type(exc).__name__
                if "bad_frame" in text:
                    text = "this node predates membership commands"
                problems[address] = text
                continue
            if not reply.retry:
                return reply
            problems[address] = reply.error
            if reply.leader and reply.leader != address:
                preferred = reply.leader
                break
        if time.monotonic() >= deadline:
            said = "; ".join(f"{a}: {p}" for a, p in problems.items()) or "no answer"
            if request.op == "list":
                raise MemberCommandError(f"no node answered within {timeout_s:g} s: {said}")
            raise MemberCommandError(f"no leader took the request within {timeout_s:g} s (the cluster may lack a quorum): {said}")
        await asyncio.sleep(RETRY_INTERVAL_S)


async def list_members(endpoints: list[str], *, token: str, timeout_s: float, tls: ClientTls = None) -> protocol.MemberReply:
    """The membership as the node that answers first holds it (the leader's, when it answers)."""
    return await ask_cluster(endpoints, protocol.MemberRequest("list"), token=token, timeout_s=timeout_s, tls=tls)


def _done_already(reply: protocol.MemberReply, request: protocol.MemberRequest) -> bool:
    """Whether the membership shows `request` done (an ask that was retried after its first
    try committed is refused as a repeat)."""
    if request.op == "add":
        return any(m.id == request.node_id and m.raft_address == request.raft_address for m in reply.members)
    if request.op == "remove":
        return request.node_id in reply.removed
    return False


def _is_voter(reply: protocol.MemberReply, node_id: str) -> bool:
    return any(m.id == node_id and not m.learner for m in reply.members)


async def change(
    endpoints: list[str], request: protocol.MemberRequest, *, token: str, timeout_s: float, tls: ClientTls = None
) -> protocol.MemberReply:
    """Have the leader make one change; ``add`` waits until the new member is a voter.
    Raises ``MemberCommandError``."""
    deadline = time.monotonic() + timeout_s
    reply = await ask_cluster(endpoints, request, token=token, timeout_s=timeout_s, tls=tls)
    if reply.error and not _done_already(reply, request):
        raise MemberCommandError(reply.error)
    if request.op != "add":
        return reply
    while not _is_voter(reply, request.node_id):
        left = deadline - time.monotonic()
        if left <= 0:
            raise MemberCommandError(
                f"{request.node_id} joined as a learner but did not catch up within {timeout_s:g} s; it stays a learner"
            )
        await asyncio.sleep(PROMOTION_POLL_S)
        leader = [reply.leader] if reply.leader else []
        reply = await ask_cluster(leader + endpoints, protocol.MemberRequest("list"), token=token, timeout_s=left, tls=tls)
    return reply


async def replace(
    endpoints: list[str], old_id: str, new: protocol.MemberRequest, *, token: str, timeout_s: float, tls: ClientTls = None
) -> protocol.MemberReply:
    """Add `new` (as a learner, promoted once caught up), then remove `old_id`."""
    current = await list_members(endpoints, token=token, timeout_s=timeout_s, tls=tls)
    if not any(m.id == old_id for m in current.members):
        raise MemberCommandError(f"unknown node id {old_id} (members: {', '.join(m.id for m in current.members)})")
    await change(endpoints, new, token=token, timeout_s=timeout_s, tls=tls)
    return await change(endpoints, protocol.MemberRequest("remove", old_id), token=token, timeout_s=timeout_s, tls=tls)
