"""``raftseq status``: ask every node for its status over the client protocol."""

from __future__ import annotations

import asyncio

from raftseq.clients.connection import Rejected, request_once
from raftseq.clients.errors import AuthenticationError
from raftseq.clients.tls import ClientTls, TlsError
from raftseq.sequencer import protocol


#: The role of a node that could not be asked, and of one that refused our token.
UNREACHABLE = "unreachable"
REFUSED = "refused"


def answered(node: dict) -> bool:
    """Whether `node` (an entry of ``gather_status``) answered with its status."""
    return node["role"] not in (UNREACHABLE, REFUSED)


def _not_asked(address: str, exc: BaseException) -> dict:
    if isinstance(exc, (AuthenticationError, TlsError)):  # says whether a token was missing or wrong, or TLS
        return {"address": address, "role": REFUSED, "error": str(exc)}
    return {"address": address, "role": UNREACHABLE, "error": str(exc) or type(exc).__name__}


async def node_status(address: str, *, token: str, timeout_s: float, session: str = "status", tls: ClientTls = None) -> dict:
    """One node's status as a dict (``role`` is ``"unreachable"`` when it cannot be asked and
    ``"refused"`` when it refused our token, each with an ``error``). Never raises for a node
    that is down, slow or refuses us."""
    try:
        status = await request_once(
            address, protocol.StatusRequest(), protocol.Status, session=session, token=token, timeout_s=timeout_s, tls=tls
        )
    except (OSError, TimeoutError, Rejected, TlsError) as exc:
        return _not_asked(address, exc)
    return {
        "id": status.node_id,
        "address": status.client_address or address,
        "pid": status.pid,
        "role": status.role.value,
        "term": status.term,
        "commit_index": status.commit_index,
        "last_seq": status.last_seq,
        "leader": status.leader or None,
        "metrics_address": status.metrics_address,
    }


def gather_status(endpoints: list[str], *, token: str, timeout_s: float, tls: ClientTls = None) -> dict:
    async def run() -> list[dict]:
        return list(await asyncio.gather(*(node_status(e, token=token, timeout_s=timeout_s, tls=tls) for e in endpoints)))

    nodes = asyncio.run(run())
    return {"leader": leader_of(nodes), "nodes": nodes}


def leader_of(nodes: list[dict]) -> str | None:
    """The leader's client address as the nodes asked see it, None when none knows one. A node
    that leads wins over what others report, and the highest term wins: a deposed leader may
    still think it leads for a moment."""
    known = [n for n in nodes if answered(n) and (n["role"] == "leader" or n["leader"])]
    if not known:
        return None
    newest = max(known, key=lambda n: (n["term"], n["role"] == "leader"))
    return newest["address"] if newest["role"] == "leader" else newest["leader"]


def print_status(report: dict) -> None:
    print(f"{'id':<6}{'address':<22}{'pid':>8}  {'role':<12}{'term':>6}{'commit':>10}{'last_seq':>12}  leader")
    for n in report["nodes"]:
        if not answered(n):
            print(f"{'?':<6}{n['address']:<22}{'-':>8}  {n['role']:<12}  {n['error']}")
            continue
        print(
            f"{n['id']:<6}{n['address']:<22}{n['pid']:>8}  {n['role']:<12}{n['term']:>6}{n['commit_index']:>10}"
            f"{n['last_seq']:>12}  {n['leader'] or '-'}"
        )
    print(f"leader: {report['leader'] or 'none'}")
