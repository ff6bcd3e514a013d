"""Prometheus metrics of one node, counted at the edge (never inside ``machine.apply``).

Counters that the hot path bumps are plain integers on ``NodeMetrics``; a custom collector
turns them, and pysyncobj's status, into samples at scrape time. Labels are bounded: refusal
reasons come from a fixed list, never a session name.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

if TYPE_CHECKING:
    from cluster.node import Node

REFUSAL_REASONS = (
    "busy",
    "not_leader",
    "outcome_unknown",
    "auth_failed",
    "bad_frame",
    "frame_too_large",
    "protocol_version",
    "hello_required",
    "sequence_gap",
    "stale_client_seq",
    "too_many_sessions",
    "from_seq_unavailable",
    "shutting_down",
    "internal",
)

#: Buckets of the submit-to-ack latency histogram, in seconds.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 4096)


class _Histogram:
    """A histogram kept as plain counts (cheap to update from the hot path)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        i = 0
        buckets = self.buckets
        while i < len(buckets) and value > buckets[i]:
            i += 1
        self.counts[i] += 1
        self.total += value

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative = []
        running = 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            cumulative.append((repr(float(bound)), running))
        running += self.counts[-1]
        cumulative.append(("+Inf", running))
        return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=self.total)


class NodeMetrics:
    def __init__(self) -> None:
        self.refusals = dict.fromkeys(REFUSAL_REASONS, 0)
        self.duplicates = 0
        self.clients_connected = 0
        self.subscribers = 0
        self.delivered = 0
        self.messages_sequenced = 0
        self.batches_applied = 0
        self.leader_changes = 0
        self.batch_size = _Histogram(BATCH_SIZE_BUCKETS)
        self.ack_latency = _Histogram(LATENCY_BUCKETS_S)

    def refused(self, reason: str) -> None:
        if reason in self.refusals:
            self.refusals[reason] += 1
        else:
            self.refusals["internal"] += 1


class NodeCollector:
    """Reads the node at scrape time."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator:
        node = self.node
        m = node.metrics
        labels = {"node": node.config.id}

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["node"])
            family.add_metric([labels["node"]], value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["node"])
            family.add_metric([labels["node"]], value)
            return family

        status = node.raft_status()
        role = node.role
        roles = GaugeMetricFamily("raftseq_role", "1 for the role this node is in", labels=["node", "role"])
        for name in ("leader", "follower", "candidate"):
            roles.add_metric([labels["node"], name], 1.0 if role == name else 0.0)
        yield roles
        yield gauge("raftseq_raft_term", "Raft term", status.get("raft_term", 0))
        yield gauge("raftseq_raft_commit_index", "Raft commit index", status.get("commit_idx", 0))
        yield gauge("raftseq_raft_last_applied_index", "Raft last applied index", status.get("last_applied", 0))
        lag = GaugeMetricFamily(
            "raftseq_follower_lag_entries", "Raft entries a follower is behind the leader's log (on the leader)", labels=["node", "follower"]
        )
        if role == "leader":
            log_end = status.get("commit_idx", 0)
            for key, value in status.items():
                if key.startswith("match_idx_server_"):
                    lag.add_metric([labels["node"], key[len("match_idx_server_") :]], max(0, log_end - value))
        yield lag
        yield gauge("raftseq_last_seq", "Last sequence number this node has applied", node.published_seq)
        yield gauge("raftseq_last_log_time_seconds", "Log time of the last applied batch", node.core.machine.last_log_time_ns / 1e9)
        yield counter("raftseq_messages_sequenced_total", "Messages given a sequence number (applied here)", m.messages_sequenced)
        yield counter("raftseq_batches_applied_total", "Raft entries (batches) applied here", m.batches_applied)
        yield m.batch_size.family("raftseq_batch_entries", "Entries per applied batch")
        yield m.ack_latency.family("raftseq_ack_latency_seconds", "Submit received to ack sent, on the leader")
        yield counter("raftseq_duplicate_submits_total", "Submits answered from the dedup window", m.duplicates)
        refusals = CounterMetricFamily("raftseq_refusals_total", "Submits and requests refused, by reason", labels=["node", "reason"])
        for reason, count in m.refusals.items():
            refusals.add_metric([labels["node"], reason], count)
        yield refusals
        yield gauge("raftseq_clients_connected", "Open client connections", m.clients_connected)
        yield gauge("raftseq_subscribers", "Active subscriptions", m.subscribers)
        yield counter("raftseq_delivered_messages_total", "Messages sent to subscribers", m.delivered)
        yield counter("raftseq_leader_changes_total", "Leader changes seen by this node", m.leader_changes)
        journal = node.journal
        yield gauge("raftseq_journal_bytes", "Bytes in the journal", journal.size_bytes)
        yield gauge("raftseq_journal_segments", "Segment files in the journal", journal.segment_count)
        yield counter("raftseq_journal_fsyncs_total", "fsync calls on the journal", journal.fsync_count)
        yield counter("raftseq_journal_fsync_seconds_total", "Time spent in journal fsync", journal.fsync_seconds_total)
        yield gauge("raftseq_catchup_missing_records", "Journal records still to fetch from a peer", node.catchup_missing)
        try:
            free = shutil.disk_usage(node.config.data_dir).free
        except OSError:
            free = 0
        yield gauge("raftseq_disk_free_bytes", "Free bytes on the data directory's file system", free)


def serve_metrics(address: str, collector_source: Callable[[], NodeCollector]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector_source())
    host, port = address.rsplit(":", 1)
    start_http_server(int(port), addr=host, registry=registry)
    return registry
