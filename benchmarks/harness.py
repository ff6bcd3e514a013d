"""The benchmarks' cluster: the local cluster (``raftseq.cluster.local.LocalCluster``) started
below a benchmark's directory with a leader, plus what a measurement needs from it: the CPU
seconds of its nodes, a convergence figure that is printed rather than raised, and what the
node logs say about leadership.

Only the node processes a benchmark started are ever signalled (``kill`` by node id, ``stop``).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Sequence

from benchmarks.figures import BenchError
from benchmarks.machine import cpu_times
from raftseq.clients import SequencerClient
from raftseq.cluster.local import ClusterTimeout, LocalCluster

#: From starting the nodes to a leader every node names.
LEADER_TIMEOUT_S = 20.0
#: For every node to report the same last_seq once the load stopped.
CONVERGE_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 15

LEADER_LINE = re.compile(r"leader is now (\S+) \(term (\d+)\)")
#: ``SequencerReplica.role`` names a node that knows no leader "candidate".
NO_LEADER_ROLE_LINE = re.compile(r"role \w+ -> candidate")


class BenchCluster(LocalCluster):
    """The local cluster of a benchmark: ``start_in`` gives it started, with a leader. Leaving
    a ``with`` block stops every node. A wait that runs out raises ``BenchError``."""

    log_tail_lines = LOG_TAIL_LINES

    @classmethod
    def start_in(cls, root: str, name: str, *, insecure: bool, overrides: dict | None) -> BenchCluster:
        """Three nodes in ``root/name`` on free ports (others, in ``root/name-2``..., when a port
        was taken before a node bound it), with a leader."""
        try:
            return cls.started(
                os.path.join(root, name), insecure=insecure, restart=False, overrides=overrides, leader_timeout_s=LEADER_TIMEOUT_S
            )
        except ClusterTimeout as exc:
            raise BenchError(f"cluster did not start: {exc}") from None

    def wait_for_leader(self, **options) -> dict:
        try:
            return super().wait_for_leader(**options)
        except ClusterTimeout as exc:
            raise BenchError(str(exc)) from None

    def wait_converged(self, at: int | None = None, **options) -> int:
        try:
            return super().wait_converged(at, **options)
        except ClusterTimeout as exc:
            raise BenchError(str(exc)) from None

    def settled_seq(self, timeout_s: float = CONVERGE_TIMEOUT_S) -> int | str:
        """The last_seq every node reports once they agree, or a sentence saying they did not
        within `timeout_s` (a figure of the report, not a failure)."""
        try:
            return super().wait_converged(timeout_s=timeout_s)
        except ClusterTimeout:
            return f"NOT REACHED within {timeout_s:.0f} s"

    def log_lines(self, since: dict[str, int] | None = None) -> dict[str, list[str]]:
        """Each node's log lines, from byte offset ``since[node]`` on (``log_sizes``)."""
        return {node_id: self.log_text(node_id, since=(since or {}).get(node_id, 0)).splitlines() for node_id in self.node_ids}

    def cpu_times(self, worker_pids: Sequence[int] = ()) -> dict[str, float]:
        """CPU seconds so far of each node, this process (``bench``) and the client processes
        `worker_pids` (``client1``...): ``machine.cpu_used`` of two of them is the run's share."""
        pids: dict[str, int | None] = dict(self.pids)
        pids.update({f"client{k + 1}": pid for k, pid in enumerate(worker_pids)})
        return cpu_times(pids)

    async def status_soon(self) -> dict:
        """``status`` from a coroutine (on a thread: the loop keeps serving the load)."""
        return await asyncio.to_thread(self.status)

    async def leader_soon(self, *, exclude: Sequence[str] = ()) -> dict:
        """``wait_for_leader`` from a coroutine."""
        return await asyncio.to_thread(self.wait_for_leader, timeout_s=LEADER_TIMEOUT_S, exclude=exclude)

    async def client(self, session: str, *, in_flight_max: int) -> SequencerClient:
        """A connected ``SequencerClient`` of this cluster."""
        client = SequencerClient(self.endpoints, session=session, token=self.token, in_flight_max=in_flight_max, tls=self.tls)
        await asyncio.wait_for(client.connect(), LEADER_TIMEOUT_S)
        return client


def leader_events(lines_by_node: dict[str, list[str]]) -> dict:
    """What the node logs say about leadership: the terms in which some node learned of a
    leader, "leader is now unknown" lines, and "role ... -> candidate" lines (a node that knows
    no leader, whether or not it stood for election)."""
    terms: set[int] = set()
    unknown = 0
    no_leader_roles = 0
    per_node: dict[str, int] = {}
    for node_id, lines in lines_by_node.items():
        per_node[node_id] = 0
        for line in lines:
            if NO_LEADER_ROLE_LINE.search(line):
                no_leader_roles += 1
            match = LEADER_LINE.search(line)
            if match is None:
                continue
            if match.group(1) == "unknown":
                unknown += 1
                continue
            per_node[node_id] += 1
            terms.add(int(match.group(2)))
    return {
        "leader_terms": sorted(terms),
        "leader_lines_per_node": per_node,
        "unknown_lines": unknown,
        "no_leader_role_lines": no_leader_roles,
    }
