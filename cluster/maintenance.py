"""The operator's requests to nodes, written once: leadership transfer and drain (``raftseq
leader transfer``, ``raftseq node drain``, ``raftseq cluster up``'s rolling restart). The node
side is ``cluster.handover`` and the gateway."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raftseq.clients.tls import ClientTls


#: While a drain waits for the followers to be current, it asks every node this often.
DRAIN_POLL_S = 0.05

#: The session name of a request's connection (it submits nothing).
ADMIN_SESSION = "admin"


class AdminFailed(Exception):
    """An operator request did not happen; the message says why (one line)."""


async def ask_node(
    address: str, request: object, answer: type, *, token: str, timeout_s: float, what: str, tls: ClientTls = None
) -> object:
    """Send `request` to the node at `address` and return its `answer` frame; raises
    ``AdminFailed`` (a node that predates `request`, 0.2, answers ``bad_frame``). `what`
    names the node in messages ("the leader")."""
    from raftseq.clients.connection import open_connection
    from raftseq.clients.errors import SequencerError
    from raftseq.cluster.cli.args import describe_error  # the token hints the commands give
    from raftseq.sequencer import protocol

    try:
        link = await open_connection(address, session=ADMIN_SESSION, token=token, timeout_s=timeout_s, tls=tls)
    except (OSError, TimeoutError, SequencerError) as exc:
        raise AdminFailed(f"cannot reach {what} {address}: {describe_error(exc)}") from None
    try:
        return await link.request(request, answer, timeout_s)
    except ConnectionError as exc:
        if protocol.RejectReason.BAD_FRAME.value in str(exc):
            raise AdminFailed(f"{what} {address} does not know {type(request).__name__} (an older raftseq): {exc}") from None
        raise AdminFailed(f"{what} {address} closed the connection: {exc}") from None
    except TimeoutError:
        raise AdminFailed(f"no answer from {what} {address} within {timeout_s:g} s") from None
    except SequencerError as exc:
        raise AdminFailed(describe_error(exc)) from None
    finally:
        link.close()


async def cluster_status(endpoints: list[str], *, token: str, timeout_s: float, tls: ClientTls = None) -> list[dict]:
    """Every endpoint's status entry (``cluster.status.node_status``)."""
    from raftseq.cluster.status import node_status

    return list(await asyncio.gather(*(node_status(e, token=token, timeout_s=timeout_s, tls=tls) for e in endpoints)))


async def transfer_leadership(endpoints: list[str], *, to: str, token: str, timeout_s: float, tls: ClientTls = None) -> tuple[str, object]:
    """Ask the leader of `endpoints` to hand leadership to `to` ("": its choice). Returns the
    leader's address before and its ``LeaderTransferred`` answer; raises ``AdminFailed``."""
    from raftseq.cluster.status import leader_of
    from raftseq.sequencer import protocol

    leader = leader_of(await cluster_status(endpoints, token=token, timeout_s=timeout_s, tls=tls))
    if leader is None:
        raise AdminFailed(f"no leader among {', '.join(endpoints)}")
    answer = await ask_node(
        leader, protocol.LeaderTransfer(to), protocol.LeaderTransferred, token=token, timeout_s=timeout_s, what="the leader", tls=tls
    )
    return leader, answer


async def drain_node(endpoints: list[str], node_id: str, *, token: str, timeout_s: float, tls: ClientTls = None) -> str:
    """Drain `node_id` (``Drain``), then wait until a leader other than it exists and every
    node answering holds what that leader held when the drain was done. Returns a summary;
    raises ``AdminFailed``."""
    from raftseq.cluster.status import answered
    from raftseq.sequencer import protocol

    nodes = await cluster_status(endpoints, token=token, timeout_s=timeout_s, tls=tls)
    named = {n["id"]: n for n in nodes if answered(n)}
    if node_id not in named:
        raise AdminFailed(f"no node {node_id!r} among the nodes that answered ({', '.join(sorted(named)) or 'none'})")
    address = named[node_id]["address"]
    answer = await ask_node(address, protocol.Drain(), protocol.Drained, token=token, timeout_s=timeout_s, what=node_id, tls=tls)
    if not answer.ok:
        raise AdminFailed(f"{node_id} not drained: {answer.detail}")
    deadline = time.monotonic() + timeout_s
    target = None
    while True:
        nodes = [n for n in await cluster_status(endpoints, token=token, timeout_s=timeout_s, tls=tls) if answered(n)]
        leaders = [n for n in nodes if n["role"] == "leader" and n["id"] != node_id]
        if leaders:
            if target is None:
                target = leaders[0]["last_seq"]
            if all(n["last_seq"] >= target for n in nodes):
                return f"{node_id} drained: leader {leaders[0]['id']} ({leaders[0]['address']}); every node holds seq {target}"
        if time.monotonic() >= deadline:
            raise AdminFailed(f"{node_id} drained, but the nodes were not current within {timeout_s:g} s: {nodes}")
        await asyncio.sleep(DRAIN_POLL_S)
