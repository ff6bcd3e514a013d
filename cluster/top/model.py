"""The pure core of ``raftseq top``: ``step(state, sample) -> (state, View)`` (no clock, no I/O).

From two successive samples it computes per node messages/s (last_seq delta over elapsed
monotonic time), lag (leader's last_seq minus the node's), p50/p99 acknowledgement latency over
the interval (from the histogram's bucket deltas, interpolated within a bucket as Prometheus'
``histogram_quantile`` does), and notices a leader change (another leader id or another term).
A node that cannot be reached is a row marked ``down`` (under the id it had when last seen).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

#: How long the new leader's row keeps its marker, so that a person glancing at it sees it.
MARKER_HOLD_S = 10.0

#: Cumulative histogram buckets as the metrics page shows them: (upper bound in seconds,
#: observations at or below it), ascending, ``+inf`` last.
Buckets = tuple[tuple[float, float], ...]


# --- samples (what the shell measured) -----------------------------------------------------


@dataclass(frozen=True)
class NodeSample:
    """One node at one refresh. ``up`` False: it could not be asked (``error`` says why)."""

    endpoint: str
    up: bool
    node_id: str = ""
    pid: int = 0
    role: str = ""
    term: int = 0
    last_seq: int = 0
    error: str = ""
    #: ``raftseq_ack_latency_seconds`` buckets; None when the metrics could not be read.
    ack_buckets: Buckets | None = None


@dataclass(frozen=True)
class Sample:
    #: Monotonic clock, seconds, when the statuses were in.
    at_s: float
    nodes: tuple[NodeSample, ...]


# --- the view (what a person sees) ---------------------------------------------------------


@dataclass(frozen=True)
class LeaderChange:
    at_s: float
    old_id: str
    old_term: int
    new_id: str
    new_term: int


@dataclass(frozen=True)
class Row:
    endpoint: str
    #: The node's id, or the id it had when last seen while it is down ("?" if never seen).
    node_id: str
    up: bool
    role: str
    term: int | None
    last_seq: int | None
    #: None: no previous sample of this node to compare with.
    messages_per_s: float | None
    #: Leader's last_seq minus this node's (never below 0); None without a leader.
    lag: int | None
    #: Acknowledgement latency over the last interval; None when nothing was acknowledged here.
    ack_p50_s: float | None
    ack_p99_s: float | None
    #: This node became leader within ``MARKER_HOLD_S``.
    new_leader: bool
    error: str = ""


@dataclass(frozen=True)
class View:
    at_s: float
    rows: tuple[Row, ...]
    #: The leader with the highest term among the nodes that call themselves leader ("" none).
    leader_id: str
    leader_term: int
    #: The latest leader change seen since top started (None: none yet).
    change: LeaderChange | None
    #: ``change`` happened in this very refresh.
    changed_now: bool
    changes: int


@dataclass(frozen=True)
class TopState:
    previous: Sample | None = None
    #: (id, term) of the last leader seen.
    leader: tuple[str, int] | None = None
    change: LeaderChange | None = None
    changes: int = 0
    #: endpoint -> node id, as last seen (to name nodes that are down).
    names: Mapping[str, str] = field(default_factory=dict)


# --- the pure core -------------------------------------------------------------------------


def bucket_quantile(q: float, before: Buckets | None, after: Buckets | None) -> float | None:
    """The `q` quantile (0 < q < 1) of the observations made between two scrapes of one
    cumulative histogram, linearly interpolated inside its bucket (Prometheus'
    ``histogram_quantile``). None when nothing was observed in between, or the two scrapes
    cannot be compared (missing, other buckets, a counter reset). A quantile in the ``+Inf``
    bucket is reported as the highest finite bound."""
    if not 0 < q < 1:
        raise ValueError(f"quantile must be between 0 and 1, got {q}")
    if before is None or after is None or len(before) != len(after) or not after:
        return None
    if any(b[0] != a[0] for b, a in zip(before, after)):
        return None
    deltas = [a[1] - b[1] for b, a in zip(before, after)]
    if any(d < 0 for d in deltas) or any(later < earlier for earlier, later in zip(deltas, deltas[1:])):
        return None
    total = deltas[-1]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for (bound, _), count in zip(after, deltas):
        if count >= rank:
            if math.isinf(bound):
                return lower_bound if lower_bound > 0 else None
            in_bucket = count - lower_count
            if in_bucket <= 0:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / in_bucket
        lower_bound, lower_count = bound, count
    return None


def leader_of(nodes: Sequence[NodeSample]) -> NodeSample | None:
    """The node that calls itself leader with the highest term (a deposed one may still think it
    leads for a moment)."""
    leaders = [n for n in nodes if n.up and n.role == "leader"]
    return max(leaders, key=lambda n: n.term) if leaders else None


def step(state: TopState, sample: Sample, *, marker_hold_s: float = MARKER_HOLD_S) -> tuple[TopState, View]:
    """The next state and the view of `sample`, compared with the previous sample."""
    previous = {n.endpoint: n for n in state.previous.nodes} if state.previous is not None else {}
    elapsed_s = sample.at_s - state.previous.at_s if state.previous is not None else 0.0

    leader = leader_of(sample.nodes)
    leader_key = (leader.node_id, leader.term) if leader is not None else None
    change, changes, changed_now = state.change, state.changes, False
    if leader_key is not None and state.leader is not None and leader_key != state.leader:
        change = LeaderChange(sample.at_s, state.leader[0], state.leader[1], leader_key[0], leader_key[1])
        changes += 1
        changed_now = True
    marker_on = change is not None and leader is not None and leader.node_id == change.new_id and sample.at_s - change.at_s < marker_hold_s

    names = dict(state.names)
    rows = []
    for node in sample.nodes:
        before = previous.get(node.endpoint)
        if not node.up:
            rows.append(
                Row(node.endpoint, names.get(node.endpoint, "?"), False, "down", None, None, None, None, None, None, False, node.error)
            )
            continue
        names[node.endpoint] = node.node_id
        rate = None
        p50 = p99 = None
        if before is not None and before.up and elapsed_s > 0:
            if node.last_seq >= before.last_seq:
                rate = (node.last_seq - before.last_seq) / elapsed_s
            if before.pid == node.pid:  # a restarted node counts from zero again
                p50 = bucket_quantile(0.5, before.ack_buckets, node.ack_buckets)
                p99 = bucket_quantile(0.99, before.ack_buckets, node.ack_buckets)
        lag = max(0, leader.last_seq - node.last_seq) if leader is not None else None
        rows.append(
            Row(
                node.endpoint,
                node.node_id,
                True,
                node.role,
                node.term,
                node.last_seq,
                rate,
                lag,
                p50,
                p99,
                marker_on and node is leader,
                node.error,
            )
        )

    new_state = TopState(
        previous=sample,
        leader=leader_key if leader_key is not None else state.leader,
        change=change,
        changes=changes,
        names=names,
    )
    view = View(
        sample.at_s,
        tuple(rows),
        leader.node_id if leader is not None else "",
        leader.term if leader is not None else 0,
        change,
        changed_now,
        changes,
    )
    return new_state, view
