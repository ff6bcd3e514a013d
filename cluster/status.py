"""``raftseq status``: ask every node for its status over the client protocol."""

from __future__ import annotations

import asyncio

from raftseq.clients.connection import Rejected, open_connection


async def node_status(address: str, *, token: str, timeout_s: float, session: str = "status") -> dict:
    """One node's status as a dict (``role`` is ``"unreachable"``, with an ``error``, when it
    cannot be asked). Never raises for a node that is down, slow or refuses us."""
    try:
        connection = await open_connection(address, session=session, token=token, timeout_s=timeout_s)
    except (OSError, TimeoutError, Rejected) as exc:
        return {"address": address, "role": "unreachable", "error": str(exc) or type(exc).__name__}
    try:
        status = await connection.status(timeout_s)
    except (OSError, TimeoutError, Rejected) as exc:
        return {"address": address, "role": "unreachable", "error": str(exc) or type(exc).__name__}
    finally:
        connection.close()
    return {
        "id": status.node_id,
        "address": status.client_address or address,
        "pid": status.pid,
        "role": status.role.value,
        "term": status.term,
        "commit_index": status.commit_index,
        "last_seq": status.last_seq,
        "leader": status.leader,
        "metrics_address": status.metrics_address,
    }


def gather_status(endpoints: list[str], *, token: str, timeout_s: float) -> dict:
    async def run() -> list[dict]:
        return list(await asyncio.gather(*(node_status(e, token=token, timeout_s=timeout_s) for e in endpoints)))

    nodes = asyncio.run(run())
    leaders = [n for n in nodes if n.get("role") == "leader"]
    # The leader with the highest term: a deposed one may still think it leads for a moment.
    leader = max(leaders, key=lambda n: n["term"])["address"] if leaders else ""
    return {"leader": leader, "nodes": nodes}


def print_status(report: dict) -> None:
    print(f"{'id':<6}{'address':<22}{'pid':>8}  {'role':<12}{'term':>6}{'commit':>10}{'last_seq':>12}  leader")
    for n in report["nodes"]:
        if n.get("role") == "unreachable":
            print(f"{'?':<6}{n['address']:<22}{'-':>8}  {'unreachable':<12}  {n.get('error', '')}")
            continue
        print(
            f"{n['id']:<6}{n['address']:<22}{n['pid']:>8}  {n['role']:<12}{n['term']:>6}{n['commit_index']:>10}"
            f"{n['last_seq']:>12}  {n['leader']}"
        )
    print(f"leader: {report['leader'] or 'none'}")
