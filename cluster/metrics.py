"""Prometheus metrics of one node, counted at the edge (never inside ``machine.apply``).

Counters that the hot path bumps are plain integers on ``NodeMetrics`` (and histograms kept
as plain bucket counts); a custom collector turns them, the node's state and pysyncobj's
status into samples at scrape time. Every sample carries the ``node`` label (the node id);
other labels come from fixed, bounded sets: roles, refusal reasons, verification checks and
the ids of the cluster's own members — never a session name.

``METRICS`` lists every family this module exports (name, type, extra labels, help); the
dashboard and alert-rule tests check their expressions against it, and a test checks that a
scrape yields exactly these families.
"""

from __future__ import annotations

import shutil
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from raftseq.cluster.membership import CHANGE_KIND_NAMES, CHANGE_OUTCOMES
from raftseq.cluster.quotas import RefusalCounts
from raftseq.cluster.config import RAFT_LOG_WRITE_QUEUE_BYTES_MAX
from raftseq.cluster.tls import TLS_REFUSALS
from raftseq.sequencer.protocol import RejectReason, Role

if TYPE_CHECKING:
    from raftseq.cluster.batcher import Batcher
    from raftseq.cluster.config import NodeConfig
    from raftseq.cluster.node_reads import ScrapedNode
    from raftseq.cluster.retention import RetentionState
    from raftseq.sequencer.journal import Journal

#: Why a submit or request was refused: the gateway's own refusals, then every reason a node
#: sends in ``Rejected`` (``protocol.RejectReason``, defined there once).
REFUSAL_REASONS = ("busy", "not_leader", "outcome_unknown", *(reason.value for reason in RejectReason))

#: Where a journal record can fail verification while the node keeps running: records fetched
#: from a peer during catch-up (checksum or numbering). A record of its own journal failing on
#: read-back stops the node at once (``fail_stop``): that shows as a restart, not here.
VERIFY_CHECKS = ("catchup",)

#: The roles a node exports (``raftseq_role``); a node that knows no leader is a candidate.
ROLES = (Role.LEADER, Role.FOLLOWER, Role.CANDIDATE)

#: The ``leader`` label of ``raftseq_raft_leader`` while a node knows no leader.
NO_LEADER = "none"

#: Buckets of the submit-to-ack latency histogram, in seconds.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 4096)
#: Buckets of the journal fsync duration histogram, in seconds.
FSYNC_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

#: Attempts at reading pysyncobj's status from the scrape thread (``getStatus`` iterates
#: dictionaries that the Raft ticks on the node's loop may change meanwhile; a failed read is retried).
STATUS_READ_ATTEMPTS = 3


class MetricSpec(NamedTuple):
    name: str
    type: str  # "gauge", "counter" or "histogram"
    labels: tuple[str, ...]  # besides "node" (and "le" of a histogram)
    help: str


def _correction(name: str, what: str) -> MetricSpec:
    """A counter of one of the node's corrections of pysyncobj's Raft (``cluster.raft``)."""
    return MetricSpec(name, "counter", (), f"{what} (Raft correction)")


METRICS = (
    # Raft, read from pysyncobj's status and the node's role watcher.
    MetricSpec("raftseq_role", "gauge", ("role",), "1 for the role this node is in (leader, follower, candidate), else 0"),
    MetricSpec("raftseq_raft_leader", "gauge", ("leader",), "1, labelled with the id of the leader this node knows ('none' if none)"),
    MetricSpec("raftseq_raft_term", "gauge", (), "Current Raft term"),
    MetricSpec("raftseq_raft_commit_index", "gauge", (), "Raft commit index"),
    MetricSpec("raftseq_raft_last_applied_index", "gauge", (), "Raft index of the last entry applied here"),
    MetricSpec("raftseq_raft_log_entries", "gauge", (), "Entries in the Raft log (held in memory until compaction)"),
    MetricSpec(
        "raftseq_raft_durable_index",
        "gauge",
        (),
        "Last Raft index on this node's disk with every entry before it (the last index in crash durability)",
    ),
    MetricSpec("raftseq_raft_log_fsyncs_total", "counter", (), "Group commits of the Raft log (power durability: one fdatasync each)"),
    MetricSpec("raftseq_raft_log_fsync_duration_seconds", "histogram", (), "Duration of one Raft log fdatasync (power durability)"),
    MetricSpec("raftseq_raft_log_fsync_entries", "histogram", (), "Raft entries one Raft log fdatasync covered (power durability)"),
    MetricSpec(
        "raftseq_raft_log_writer_backlog_bytes",
        "gauge",
        (),
        "Bytes queued for the Raft log's writer thread, not yet on disk (power durability)",
    ),
    MetricSpec(
        "raftseq_raft_log_writer_backlog_max_bytes",
        "gauge",
        (),
        "Writer backlog beyond which the node takes no new entries (submits Busy, follower appends dropped)",
    ),
    MetricSpec(
        "raftseq_busy_raft_log_backlog_total", "counter", (), "Submits answered Busy because the Raft log's writer was behind its bound"
    ),
    MetricSpec("raftseq_raft_has_quorum", "gauge", (), "1 while this node is connected to a majority of the cluster"),
    MetricSpec("raftseq_raft_peer_connected", "gauge", ("peer",), "1 while the Raft link to a peer is connected"),
    MetricSpec(
        "raftseq_follower_lag_entries",
        "gauge",
        ("follower",),
        "Committed Raft entries a follower does not hold yet, as the leader sees it (only the leader exports samples)",
    ),
    _correction("raftseq_raft_matching_entries_kept_total", "Entries a follower kept instead of truncating"),
    _correction("raftseq_raft_truncations_refused_total", "Log truncations refused on a follower"),
    _correction("raftseq_raft_next_index_rewinds_refused_total", "nextIndex rewinds refused on the leader"),
    _correction("raftseq_raft_snapshot_commits_refused_total", "Commit-index raises refused on a snapshot piece over an unverified log"),
    _correction("raftseq_raft_elections_deferred_total", "Election timeouts renewed after a long run of applies on a follower"),
    _correction("raftseq_raft_newer_terms_told_total", "AppendEntries of an older term answered with this node's term"),
    _correction("raftseq_raft_newer_terms_heard_total", "Times this node stepped down to a newer term it was told of"),
    _correction("raftseq_raft_acks_held_for_fsync_total", "Follower replies held until the Raft log was on disk (power durability)"),
    _correction(
        "raftseq_raft_commits_held_for_fsync_total", "Leader ticks whose commit index waited for the leader's own fsync (power durability)"
    ),
    MetricSpec(
        "raftseq_raft_appends_dropped_total",
        "counter",
        (),
        "AppendEntries with entries a follower dropped while it took no new entries (Raft log writer behind its bound, or free disk below the minimum)",
    ),
    MetricSpec(
        "raftseq_raft_peer_messages_refused_total",
        "counter",
        (),
        "Raft messages refused: from a connection that is not a member, or with malformed fields",
    ),
    MetricSpec("raftseq_raft_ticks_failed_total", "counter", (), "Raft ticks (or socket events) in which pysyncobj raised; each is logged"),
    MetricSpec(
        "raftseq_raft_link_frames_refused_total",
        "counter",
        (),
        "Raft link frames refused at their length prefix (over the maximum); each drops its link",
    ),
    MetricSpec(
        "raftseq_raft_link_strangers_dropped_total",
        "counter",
        (),
        "Unauthenticated Raft links dropped (too many at once, or past their deadline)",
    ),
    MetricSpec(
        "raftseq_raft_link_accept_errors_total",
        "counter",
        (),
        "Failed accepts on the Raft listener (EMFILE...); it pauses, backing off, and accepts again",
    ),
    MetricSpec(
        "raftseq_raft_link_identities_refused_total",
        "counter",
        (),
        "Raft links dropped in the handshake of node keys (a claim or answer not signed by the member's key); each is logged",
    ),
    MetricSpec(
        "raftseq_raft_link_pickles_refused_total",
        "counter",
        (),
        "Raft pickles refused by the allow-list (they named a class or function); each drops its link",
    ),
    MetricSpec(
        "raftseq_leader_changes_total",
        "counter",
        (),
        "Times this node saw a new leader, or its leader in a new term (the first one after start included)",
    ),
    # Membership (cluster.membership; ``raftseq member``), as this node holds it.
    MetricSpec("raftseq_membership_voters", "gauge", (), "Voting members in the membership this node holds"),
    MetricSpec(
        "raftseq_membership_learners", "gauge", (), "Learners (members catching up without a vote) in the membership this node holds"
    ),
    MetricSpec("raftseq_membership_number", "gauge", (), "Membership changes that led to the membership this node holds"),
    MetricSpec(
        "raftseq_membership_changes_total",
        "counter",
        ("kind", "outcome"),
        "Membership changes asked of this node as leader, by kind (add, promote, remove) and outcome (committed, refused, failed)",
    ),
    MetricSpec(
        "raftseq_learner_lag_entries",
        "gauge",
        ("learner",),
        "Committed Raft entries a learner does not hold yet: its catch-up lag, promoted at 0 (only the leader exports samples)",
    ),
    # Sequencing.
    MetricSpec("raftseq_last_seq", "gauge", (), "Last sequence number this node knows as committed (applied or in its journal)"),
    MetricSpec("raftseq_readable_seq", "gauge", (), "Last sequence number subscribers of this node may read (below any journal hole)"),
    MetricSpec("raftseq_last_log_time_seconds", "gauge", (), "Log time (leader's clock, Unix seconds) of the last applied batch"),
    MetricSpec("raftseq_messages_sequenced_total", "counter", (), "Messages given a sequence number (applied here)"),
    MetricSpec("raftseq_batches_applied_total", "counter", (), "Raft entries (batches) applied here"),
    MetricSpec("raftseq_batch_entries", "histogram", (), "Messages per applied batch"),
    MetricSpec("raftseq_ack_latency_seconds", "histogram", (), "Submit received to ack sent, on the leader"),
    MetricSpec(
        "raftseq_priority_ack_latency_seconds",
        "histogram",
        (),
        "Submit received to ack sent, on the leader, for submits of credentials with priority (counted in raftseq_ack_latency_seconds too)",
    ),
    MetricSpec("raftseq_batcher_queue_entries", "gauge", (), "Submits waiting in the leader's batcher queue"),
    MetricSpec("raftseq_batcher_in_flight_batches", "gauge", (), "Batches proposed to Raft and not yet committed"),
    MetricSpec("raftseq_batcher_held_bytes", "gauge", (), "Bytes of submits the leader holds, queued or proposed and not yet answered"),
    MetricSpec("raftseq_batches_proposed_total", "counter", (), "Batches this node proposed as leader"),
    MetricSpec("raftseq_entries_proposed_total", "counter", (), "Submits this node proposed as leader"),
    MetricSpec(
        "raftseq_priority_entries_proposed_total",
        "counter",
        (),
        "Submits of credentials with priority this node proposed as leader (the priority lane; counted in raftseq_entries_proposed_total too)",
    ),
    MetricSpec(
        "raftseq_bulk_held_behind_priority_seconds_total",
        "counter",
        (),
        "Seconds bulk submits waited for a priority batch to commit before their batch was proposed (the priority lane)",
    ),
    MetricSpec(
        "raftseq_bulk_holds_capped_total",
        "counter",
        (),
        "Waits of bulk behind priority batches cut at 10 ms (PRIORITY_HOLDS_BULK_MAX_S): priority traffic without pause",
    ),
    MetricSpec(
        "raftseq_batches_outcome_unknown_total", "counter", (), "Proposed batches whose outcome became unknown (timeout, leader lost)"
    ),
    MetricSpec("raftseq_duplicate_submits_total", "counter", (), "Submits answered from the dedup window"),
    MetricSpec("raftseq_sessions", "gauge", (), "Sessions in the session table"),
    MetricSpec("raftseq_session_table_bytes", "gauge", (), "Bytes the session table counts (each session with a full dedup window)"),
    MetricSpec(
        "raftseq_sessions_evicted_total",
        "counter",
        (),
        "Idle sessions evicted from a full session table for new ones (since the machine was last restored)",
    ),
    MetricSpec("raftseq_refusals_total", "counter", ("reason",), "Submits and requests refused, by reason"),
    MetricSpec(
        "raftseq_tls_refusals_total",
        "counter",
        ("reason",),
        "Connections closed before their hello for TLS: plaintext client, TLS client on a plaintext port, handshake failed or timed out",
    ),
    MetricSpec(
        "raftseq_credential_refusals_total",
        "counter",
        ("credential", "limit"),
        "Refusals of named credentials, by credential (the first 50 named, the rest 'other') and limit or rule",
    ),
    # Clients and subscribers.
    MetricSpec("raftseq_clients_connected", "gauge", (), "Open client connections whose hello was welcomed"),
    MetricSpec("raftseq_clients_awaiting_hello", "gauge", (), "Open client connections that have not said hello yet"),
    MetricSpec("raftseq_subscribers", "gauge", (), "Active subscriptions"),
    MetricSpec("raftseq_delivered_messages_total", "counter", (), "Messages sent to subscribers"),
    MetricSpec("raftseq_subscriber_max_lag_messages", "gauge", (), "Largest distance of a subscription's position behind raftseq_last_seq"),
    # Journal, catch-up, disk.
    MetricSpec("raftseq_journal_bytes", "gauge", (), "Bytes in the journal"),
    MetricSpec("raftseq_journal_segments", "gauge", (), "Segment files in the journal"),
    MetricSpec("raftseq_journal_fsyncs_total", "counter", (), "fsync calls on the journal"),
    MetricSpec("raftseq_journal_fsync_seconds_total", "counter", (), "Time spent in journal fsync"),
    MetricSpec("raftseq_journal_fsync_duration_seconds", "histogram", (), "Duration of one journal fsync"),
    MetricSpec("raftseq_journal_holes", "gauge", (), "Ranges missing from the journal (waiting for catch-up)"),
    MetricSpec("raftseq_journal_tail_cut_bytes", "gauge", (), "Bytes of a torn journal tail cut when this node started"),
    MetricSpec(
        "raftseq_journal_verify_failures_total",
        "counter",
        ("check",),
        "Journal records that failed verification, by where they were checked",
    ),
    MetricSpec("raftseq_journal_scrubbed_bytes_total", "counter", (), "Bytes of sealed journal segments read back by the scrub"),
    MetricSpec(
        "raftseq_journal_damage_found_total",
        "counter",
        (),
        "Damaged ranges of sealed journal segments found (on start, by the scrub, by a read)",
    ),
    MetricSpec("raftseq_journal_damage_repaired_total", "counter", (), "Damaged journal segments repaired from a peer's copy"),
    MetricSpec("raftseq_journal_damaged_records", "gauge", (), "Journal records refused to readers until repaired from a peer"),
    MetricSpec("raftseq_catchup_missing_records", "gauge", (), "Journal records still to fetch from a peer"),
    MetricSpec("raftseq_catchup_fetched_records_total", "counter", (), "Journal records fetched from peers by catch-up"),
    # Retention (cluster.retention); the bytes it keeps are raftseq_journal_bytes.
    MetricSpec("raftseq_journal_first_retained_seq", "gauge", (), "First sequence number the journal still holds (retention moves it up)"),
    MetricSpec("raftseq_journal_retention_floor_seq", "gauge", (), "Retention floor: nothing at or above it leaves the journal"),
    MetricSpec("raftseq_journal_retention_max_bytes", "gauge", (), "Configured bound on journal bytes (0: none)"),
    MetricSpec(
        "raftseq_journal_retention_held_bytes",
        "gauge",
        (),
        "Journal bytes over the retention bounds kept by the floor or a failing archive",
    ),
    MetricSpec("raftseq_journal_archive_lag_bytes", "gauge", (), "Journal bytes due to leave whose archiving failed at the last check"),
    MetricSpec("raftseq_journal_archive_failures_total", "counter", (), "Segments whose archiving failed (kept, retried)"),
    MetricSpec("raftseq_journal_retention_removed_bytes_total", "counter", (), "Bytes of segments retention removed (archived or deleted)"),
    MetricSpec(
        "raftseq_journal_oldest_age_seconds",
        "gauge",
        (),
        "Log time from the newest record of the journal's oldest segment to the last applied",
    ),
    MetricSpec("raftseq_disk_free_bytes", "gauge", (), "Free bytes on the data directory's file system"),
    MetricSpec("raftseq_disk_size_bytes", "gauge", (), "Size of the data directory's file system"),
    MetricSpec("raftseq_disk_free_min_bytes", "gauge", (), "Free bytes below which the node refuses submits (journal.disk_free_bytes_min)"),
    MetricSpec("raftseq_disk_low", "gauge", (), "1 while free disk is below the minimum and submits are refused"),
    MetricSpec("raftseq_start_time_seconds", "gauge", (), "When this node process started (Unix seconds)"),
)

_SPECS = {spec.name: spec for spec in METRICS}

#: The counter families read from the Raft member's counters (``raft.RAFT_COUNTERS``).
RAFT_COUNTER_METRICS = (
    ("raftseq_raft_matching_entries_kept_total", "raftseq_matching_entries_kept"),
    ("raftseq_raft_truncations_refused_total", "raftseq_truncations_refused"),
    ("raftseq_raft_next_index_rewinds_refused_total", "raftseq_next_index_rewinds_refused"),
    ("raftseq_raft_snapshot_commits_refused_total", "raftseq_snapshot_commits_refused"),
    ("raftseq_raft_elections_deferred_total", "raftseq_elections_deferred"),
    ("raftseq_raft_newer_terms_told_total", "raftseq_newer_terms_told"),
    ("raftseq_raft_newer_terms_heard_total", "raftseq_newer_terms_heard"),
    ("raftseq_raft_acks_held_for_fsync_total", "raftseq_acks_held_for_fsync"),
    ("raftseq_raft_commits_held_for_fsync_total", "raftseq_commits_held_for_fsync"),
    ("raftseq_raft_appends_dropped_total", "raftseq_appends_dropped"),
    ("raftseq_raft_peer_messages_refused_total", "raftseq_peer_messages_refused"),
    ("raftseq_raft_ticks_failed_total", "ticks_failed"),
    ("raftseq_raft_link_frames_refused_total", "link_frames_refused"),
    ("raftseq_raft_link_strangers_dropped_total", "link_strangers_dropped"),
    ("raftseq_raft_link_accept_errors_total", "link_accept_errors"),
    ("raftseq_raft_link_identities_refused_total", "link_identities_refused"),
    ("raftseq_raft_link_pickles_refused_total", "link_pickles_refused"),
)


def exported_sample_names() -> frozenset[str]:
    """Every sample name a node's ``/metrics`` page holds (``_total``, ``_bucket``… included),
    the standard ``process_*`` ones aside."""
    names = set()
    for spec in METRICS:
        if spec.type == "histogram":
            names |= {f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"}
        else:
            names.add(spec.name)
    return frozenset(names)


def page_samples(text: str) -> dict[str, float]:
    """A ``/metrics`` page as ``{sample name: value}``, for the samples labelled with nothing
    but ``node`` (what a node says of itself; a sample per label value is left out)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if set(s.labels) <= {"node"}}


def _family_maker(specs: dict[str, MetricSpec], label: str, label_value: str) -> Callable[..., CounterMetricFamily | GaugeMetricFamily]:
    """What a collector makes its gauge and counter families with: ``family(name, extra, value)``
    makes family `name` from its spec in `specs`, each sample labelled `label`=`label_value`:
    one sample of `value`, or one per (extra label values, value) in `extra`."""

    def family(
        name: str, extra: tuple[tuple[tuple[str, ...], float], ...] | None = None, value: float = 0.0
    ) -> CounterMetricFamily | GaugeMetricFamily:
        spec = specs[name]
        cls = CounterMetricFamily if spec.type == "counter" else GaugeMetricFamily
        result = cls(name, spec.help, labels=[label, *spec.labels])
        for label_values, sample in extra if extra is not None else (((), value),):
            result.add_metric([label_value, *label_values], sample)
        return result

    return family


class _Histogram:
    """A histogram kept as plain counts (cheap to update from the hot path)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """`count` observations of `value`."""
        # The first bucket whose upper bound is >= value (Prometheus' buckets are "le").
        self.counts[bisect_left(self.buckets, value)] += count
        self.total += value * count

    def family(self, name: str, doc: str, node_id: str) -> HistogramMetricFamily:
        cumulative = []
        running = 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            cumulative.append((repr(float(bound)), running))
        running += self.counts[-1]
        cumulative.append(("+Inf", running))
        family = HistogramMetricFamily(name, doc, labels=["node"])
        family.add_metric([node_id], cumulative, sum_value=self.total)
        return family


class NodeMetrics:
    """What the node's hot paths count: plain integers and plain histograms, no locks."""

    def __init__(self) -> None:
        self.start_time_s = time.time()
        self.refusals = dict.fromkeys(REFUSAL_REASONS, 0)
        #: Submits refused (``Busy``, counted under "busy" too) while the Raft log's writer was backlogged.
        self.busy_raft_log_backlog = 0
        self.duplicates = 0
        self.clients_connected = 0
        self.clients_awaiting_hello = 0
        self.subscribers = 0
        self.delivered = 0
        self.messages_sequenced = 0
        self.batches_applied = 0
        self.leader_changes = 0
        self.batch_size = _Histogram(BATCH_SIZE_BUCKETS)
        self.ack_latency = _Histogram(LATENCY_BUCKETS_S)
        self.priority_ack_latency = _Histogram(LATENCY_BUCKETS_S)
        #: Filled by the journal's fsync observer (``Journal.fsync_observer``).
        self.fsync_latency = _Histogram(FSYNC_BUCKETS_S)
        #: Filled by the Raft log's writer thread (``RaftLogStore.sync_observer``).
        self.raft_log_fsync_latency = _Histogram(FSYNC_BUCKETS_S)
        self.raft_log_entries_per_fsync = _Histogram(BATCH_SIZE_BUCKETS)
        self.verify_failures = dict.fromkeys(VERIFY_CHECKS, 0)
        #: Refusals of named credentials, per (credential, limit) (``cluster.credentials``).
        self.credential_refusals = RefusalCounts()
        #: The journal cursors of the subscriptions being served (added when a subscription
        #: starts, discarded when it ends); their ``next_seq`` gives subscriber lag at scrape time.
        self.subscriber_cursors: set = set()
        #: Subscribers disconnected for falling too far behind (``Gateway`` with a lag bound: relays).
        self.subscriber_lag_disconnects = 0
        #: Connections refused before their hello for TLS, by reason (``cluster.tls``).
        self.tls_refusals = dict.fromkeys(TLS_REFUSALS, 0)

    def raft_log_synced(self, seconds: float, entries: int) -> None:
        """One group commit of the Raft log (called on its writer thread)."""
        self.raft_log_fsync_latency.observe(seconds)
        self.raft_log_entries_per_fsync.observe(entries)

    def refused(self, reason: str, count: int = 1) -> None:
        if reason in self.refusals:
            self.refusals[reason] += count
        else:
            self.refusals["internal"] += count


class NodeCollector:
    """Reads the node at scrape time (on the metrics server's thread)."""

    def __init__(self, config: NodeConfig, metrics: NodeMetrics, node: ScrapedNode, *, journal: Journal, batcher: Batcher | None) -> None:
        self.config = config
        self.metrics = metrics
        self.node = node
        self.journal = journal
        self.batcher = batcher
        #: Raft address -> node id, for labels that name cluster members.
        self.ids = {peer.raft_address: peer.id for peer in config.peers}
        self.ids[config.raft_address] = config.id

    def _member(self, raft_address: str) -> str:
        membership = self.node.membership_view()[0]
        member = membership.by_raft_address(raft_address) if membership is not None else None
        return member.id if member is not None else self.ids.get(raft_address, raft_address)

    def _raft_status(self) -> dict:
        node = self.node
        for _ in range(STATUS_READ_ATTEMPTS):
            status = node.raft_status()
            if status:
                return status
        return {}

    def _subscriber_max_lag(self, last_seq: int) -> int:
        for _ in range(STATUS_READ_ATTEMPTS):
            try:
                cursors = list(self.metrics.subscriber_cursors)
                break
            except RuntimeError:  # the set changed size while being copied
                continue
        else:
            return 0
        return max((last_seq - (cursor.next_seq - 1) for cursor in cursors), default=0)

    def collect(self) -> Iterator:
        node = self.node
        m = self.metrics
        config = self.config
        node_id = config.id

        family = _family_maker(_SPECS, "node", node_id)

        def histogram(name: str, hist: _Histogram) -> HistogramMetricFamily:
            return hist.family(name, _SPECS[name].help, node_id)

        # --- Raft -------------------------------------------------------------------------
        status = self._raft_status()
        role = node.role
        yield family("raftseq_role", tuple(((r.value,), 1.0 if role is r else 0.0) for r in ROLES))
        leader = node.leader_address
        yield family("raftseq_raft_leader", (((self._member(leader) if leader else NO_LEADER,), 1.0),))
        if status:
            # Without a status (replica starting, or unreadable this time) these are left out
            # rather than exported as 0: a term of 0 would look like a real (and odd) value.
            yield family("raftseq_raft_term", value=status.get("raft_term", 0))
            yield family("raftseq_raft_commit_index", value=status.get("commit_idx", 0))
            yield family("raftseq_raft_last_applied_index", value=status.get("last_applied", 0))
            yield family("raftseq_raft_log_entries", value=status.get("log_len", 0))
            yield family("raftseq_raft_has_quorum", value=1.0 if status.get("has_quorum") else 0.0)
            yield family("raftseq_raft_durable_index", value=status.get("durable_idx", 0))
        syncs = m.raft_log_entries_per_fsync
        yield family("raftseq_raft_log_fsyncs_total", value=sum(syncs.counts))
        yield histogram("raftseq_raft_log_fsync_duration_seconds", m.raft_log_fsync_latency)
        yield histogram("raftseq_raft_log_fsync_entries", syncs)
        yield family("raftseq_raft_log_writer_backlog_bytes", value=status.get("writer_backlog_bytes", 0))
        yield family("raftseq_raft_log_writer_backlog_max_bytes", value=RAFT_LOG_WRITE_QUEUE_BYTES_MAX)
        yield family("raftseq_busy_raft_log_backlog_total", value=m.busy_raft_log_backlog)
        prefix = "partner_node_status_server_"
        yield family(
            "raftseq_raft_peer_connected",
            tuple(((self._member(k[len(prefix) :]),), 1.0 if v == 2 else 0.0) for k, v in status.items() if k.startswith(prefix)),
        )
        lags = []
        if role is Role.LEADER and status:
            commit = status.get("commit_idx", 0)
            prefix = "match_idx_server_"
            lags = [((self._member(k[len(prefix) :]),), max(0, commit - v)) for k, v in status.items() if k.startswith(prefix)]
        yield family("raftseq_follower_lag_entries", tuple(lags))
        counters = node.raft_counters()
        for name, counter in RAFT_COUNTER_METRICS:
            yield family(name, value=counters.get(counter, 0))
        yield family("raftseq_leader_changes_total", value=m.leader_changes)
        yield from self._membership(family, status, role)

        # --- sequencing -------------------------------------------------------------------
        last_seq = node.published_seq
        yield family("raftseq_last_seq", value=last_seq)
        yield family("raftseq_readable_seq", value=node.readable_seq)
        yield family("raftseq_last_log_time_seconds", value=node.last_log_time_ns / 1e9)
        yield family("raftseq_messages_sequenced_total", value=m.messages_sequenced)
        yield family("raftseq_batches_applied_total", value=m.batches_applied)
        sessions, table_bytes, evicted = node.session_table()
        yield family("raftseq_sessions", value=sessions)
        yield family("raftseq_session_table_bytes", value=table_bytes)
        yield family("raftseq_sessions_evicted_total", value=evicted)
        yield histogram("raftseq_batch_entries", m.batch_size)
        yield histogram("raftseq_ack_latency_seconds", m.ack_latency)
        yield histogram("raftseq_priority_ack_latency_seconds", m.priority_ack_latency)
        batcher = self.batcher
        yield family("raftseq_batcher_queue_entries", value=batcher.queued if batcher is not None else 0)
        yield family("raftseq_batcher_in_flight_batches", value=batcher.in_flight if batcher is not None else 0)
        yield family("raftseq_batcher_held_bytes", value=batcher.held_bytes if batcher is not None else 0)
        yield family("raftseq_batches_proposed_total", value=batcher.batches_proposed if batcher is not None else 0)
        yield family("raftseq_entries_proposed_total", value=batcher.entries_proposed if batcher is not None else 0)
        yield family("raftseq_priority_entries_proposed_total", value=batcher.priority_entries_proposed if batcher is not None else 0)
        yield family(
            "raftseq_bulk_held_behind_priority_seconds_total", value=batcher.bulk_held_behind_priority_s if batcher is not None else 0
        )
        yield family("raftseq_bulk_holds_capped_total", value=batcher.bulk_holds_capped if batcher is not None else 0)
        yield family("raftseq_batches_outcome_unknown_total", value=batcher.batches_unknown if batcher is not None else 0)
        yield family("raftseq_duplicate_submits_total", value=m.duplicates)
        yield family("raftseq_refusals_total", tuple(((reason,), count) for reason, count in m.refusals.items()))
        yield family("raftseq_tls_refusals_total", tuple(((reason,), count) for reason, count in m.tls_refusals.items()))
        yield family("raftseq_credential_refusals_total", tuple(m.credential_refusals.counts.copy().items()))

        # --- clients and subscribers ------------------------------------------------------
        yield family("raftseq_clients_connected", value=m.clients_connected)
        yield family("raftseq_clients_awaiting_hello", value=m.clients_awaiting_hello)
        yield family("raftseq_subscribers", value=m.subscribers)
        yield family("raftseq_delivered_messages_total", value=m.delivered)
        yield family("raftseq_subscriber_max_lag_messages", value=max(0, self._subscriber_max_lag(last_seq)))

        # --- journal, catch-up, disk ------------------------------------------------------
        journal = self.journal
        yield family("raftseq_journal_bytes", value=journal.size_bytes)
        yield family("raftseq_journal_segments", value=journal.segment_count)
        yield family("raftseq_journal_fsyncs_total", value=journal.fsync_count)
        yield family("raftseq_journal_fsync_seconds_total", value=journal.fsync_seconds_total)
        yield histogram("raftseq_journal_fsync_duration_seconds", m.fsync_latency)
        yield family("raftseq_journal_holes", value=len(journal.holes))
        yield family("raftseq_journal_tail_cut_bytes", value=journal.recovery.bytes_cut)
        yield family("raftseq_journal_verify_failures_total", tuple(((check,), n) for check, n in m.verify_failures.items()))
        yield family("raftseq_journal_scrubbed_bytes_total", value=node.journal_scrubbed_bytes)
        yield family("raftseq_journal_damage_found_total", value=journal.damage_found)
        yield family("raftseq_journal_damage_repaired_total", value=journal.damage_repaired)
        yield family("raftseq_journal_damaged_records", value=journal.damage.records)
        yield family("raftseq_catchup_missing_records", value=node.catchup_missing)
        yield family("raftseq_catchup_fetched_records_total", value=node.catchup_fetched)
        retention = node.retention_state
        yield family("raftseq_journal_first_retained_seq", value=journal.first_seq)
        yield family("raftseq_journal_retention_floor_seq", value=retention.floor_seq)
        yield family("raftseq_journal_retention_max_bytes", value=config.retention.journal_bytes_max)
        yield family("raftseq_journal_retention_held_bytes", value=retention.held_bytes)
        yield family("raftseq_journal_archive_lag_bytes", value=retention.archive_lag_bytes)
        yield family("raftseq_journal_archive_failures_total", value=retention.archive_failures)
        yield family("raftseq_journal_retention_removed_bytes_total", value=retention.bytes_removed)
        yield family("raftseq_journal_oldest_age_seconds", value=retention.oldest_age_s)
        try:
            usage = shutil.disk_usage(config.data_dir)
            free, size = usage.free, usage.total
        except OSError:
            free, size = 0, 0
        yield family("raftseq_disk_free_bytes", value=free)
        yield family("raftseq_disk_size_bytes", value=size)
        yield family("raftseq_disk_free_min_bytes", value=config.journal.disk_free_bytes_min)
        yield family("raftseq_disk_low", value=1.0 if node.disk_low else 0.0)
        yield family("raftseq_start_time_seconds", value=m.start_time_s)

    def _membership(self, family: Callable, status: dict, role: Role) -> Iterator:
        membership, changes = self.node.membership_view()
        yield family("raftseq_membership_voters", value=len(membership.voters()) if membership is not None else 0)
        yield family("raftseq_membership_learners", value=len(membership.learners()) if membership is not None else 0)
        yield family("raftseq_membership_number", value=membership.number if membership is not None else 0)
        yield family(
            "raftseq_membership_changes_total",
            tuple(((kind, outcome), changes.get((kind, outcome), 0)) for kind in CHANGE_KIND_NAMES.values() for outcome in CHANGE_OUTCOMES),
        )
        lags = []
        if role is Role.LEADER and status and membership is not None:
            commit = status.get("commit_idx", 0)
            lags = [((m.id,), max(0, commit - status.get(f"match_idx_server_{m.raft_address}", 0))) for m in membership.learners()]
        yield family("raftseq_learner_lag_entries", tuple(lags))


def build_registry(collector: NodeCollector | RelayCollector) -> CollectorRegistry:
    """The registry a node serves: its collector and the standard ``process_*`` metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


#: The content type of the page ``page_maker`` writes (Prometheus' text format).
PAGE_CONTENT_TYPE = CONTENT_TYPE_LATEST


def page_maker(collector: NodeCollector | RelayCollector) -> Callable[[], bytes]:
    """What the metrics port serves: a function writing the page of `collector` (and the
    standard ``process_*`` metrics) as of the moment it is called."""
    registry = build_registry(collector)
    return lambda: generate_latest(registry)


# --- relays (``cluster.relay``) ------------------------------------------------------------------

#: Where a relay's copy can fail verification: records from the upstream out of order or failing
#: their checksum (``catchup``), and an upstream holding a different record under a number the
#: relay holds (``upstream_diverged``: the relay stops).
RELAY_VERIFY_CHECKS = ("catchup", "upstream_diverged")

#: Every family a relay exports; each sample carries the ``relay`` label (its id).
RELAY_METRICS = (
    MetricSpec("raftseq_relay_last_seq", "gauge", (), "Last sequence number the relay holds (and serves)"),
    MetricSpec(
        "raftseq_relay_upstream_lag_records", "gauge", (), "Records the upstream held (its last status) that the relay does not yet"
    ),
    MetricSpec(
        "raftseq_relay_upstream_behind_records",
        "gauge",
        (),
        "Records the relay holds that the upstream did not (its last status): a node behind, one that lost records, or another cluster",
    ),
    MetricSpec("raftseq_relay_upstream_records_total", "counter", (), "Records copied from the upstream"),
    MetricSpec("raftseq_relay_upstream_connects_total", "counter", (), "Connections to an upstream that welcomed the relay"),
    MetricSpec("raftseq_relay_subscribers", "gauge", (), "Subscriptions being served"),
    MetricSpec("raftseq_relay_clients_connected", "gauge", (), "Client connections whose hello was welcomed"),
    MetricSpec("raftseq_relay_delivered_records_total", "counter", (), "Records delivered to subscribers (rate: delivered msg/s)"),
    MetricSpec(
        "raftseq_relay_subscriber_lag_disconnects_total", "counter", (), "Subscribers disconnected for falling too far behind (they resume)"
    ),
    MetricSpec("raftseq_relay_refusals_total", "counter", ("reason",), "Requests refused, by reason (submits: not_leader)"),
    MetricSpec("raftseq_relay_tls_refusals_total", "counter", ("reason",), "Connections closed before their hello for TLS, by reason"),
    MetricSpec(
        "raftseq_relay_credential_refusals_total",
        "counter",
        ("credential", "limit"),
        "Refusals of named credentials (--credentials), by credential (the first 50 named, the rest 'other') and limit or rule",
    ),
    MetricSpec("raftseq_relay_verify_failures_total", "counter", ("check",), "Records from the upstream that failed verification"),
    MetricSpec(
        "raftseq_relay_journal_first_retained_seq",
        "gauge",
        (),
        "First sequence number the relay's journal still holds (retention moves it up)",
    ),
    MetricSpec("raftseq_relay_journal_bytes", "gauge", (), "Bytes in the relay's journal"),
    MetricSpec(
        "raftseq_relay_journal_retention_removed_bytes_total",
        "counter",
        (),
        "Bytes of segments the relay's retention removed (archived or deleted)",
    ),
)
_RELAY_SPECS = {spec.name: spec for spec in RELAY_METRICS}


class RelayMetrics(NodeMetrics):
    """A relay's counters: the gateway's (it serves through the node's gateway) and its upstream's."""

    def __init__(self) -> None:
        super().__init__()
        self.verify_failures = dict.fromkeys(RELAY_VERIFY_CHECKS, 0)
        self.upstream_records = 0
        self.upstream_connects = 0


class ScrapedRelay(Protocol):
    """What the relay collector reads of its relay at scrape time."""

    upstream_last_seq: int

    @property
    def published_seq(self) -> int: ...

    @property
    def journal_bytes(self) -> int: ...

    @property
    def retention_state(self) -> RetentionState: ...


class RelayCollector:
    """Reads a relay at scrape time (on the metrics server's thread)."""

    def __init__(self, relay_id: str, metrics: RelayMetrics, relay: ScrapedRelay) -> None:
        self.relay_id = relay_id
        self.metrics = metrics
        self.relay = relay

    def collect(self) -> Iterator:
        m = self.metrics
        relay_id = self.relay_id

        family = _family_maker(_RELAY_SPECS, "relay", relay_id)

        last_seq = self.relay.published_seq
        yield family("raftseq_relay_last_seq", value=last_seq)
        yield family("raftseq_relay_upstream_lag_records", value=max(0, self.relay.upstream_last_seq - last_seq))
        yield family("raftseq_relay_upstream_behind_records", value=max(0, last_seq - self.relay.upstream_last_seq))
        yield family("raftseq_relay_upstream_records_total", value=m.upstream_records)
        yield family("raftseq_relay_upstream_connects_total", value=m.upstream_connects)
        yield family("raftseq_relay_subscribers", value=m.subscribers)
        yield family("raftseq_relay_clients_connected", value=m.clients_connected)
        yield family("raftseq_relay_delivered_records_total", value=m.delivered)
        yield family("raftseq_relay_subscriber_lag_disconnects_total", value=m.subscriber_lag_disconnects)
        yield family("raftseq_relay_refusals_total", tuple(((reason,), n) for reason, n in m.refusals.items()))
        yield family("raftseq_relay_tls_refusals_total", tuple(((reason,), n) for reason, n in m.tls_refusals.items()))
        yield family("raftseq_relay_credential_refusals_total", tuple(m.credential_refusals.counts.copy().items()))
        yield family("raftseq_relay_verify_failures_total", tuple(((check,), n) for check, n in m.verify_failures.items()))
        retention = self.relay.retention_state
        yield family("raftseq_relay_journal_first_retained_seq", value=retention.first_retained_seq)
        yield family("raftseq_relay_journal_bytes", value=self.relay.journal_bytes)
        yield family("raftseq_relay_journal_retention_removed_bytes_total", value=retention.bytes_removed)
