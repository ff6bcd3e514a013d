"""What a node's /metrics page holds: exactly the families ``cluster.metrics.METRICS`` lists,
named by Prometheus' conventions, with bounded labels and the values the node's state implies.

A real ``Node`` is built (journal in a temp dir, nothing started); its pysyncobj replica is a
stub whose ``getStatus()`` returns what the test wants, so no sockets or threads are involved.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from raftseq.cluster import metrics as M
from raftseq.cluster.config import OTHER_CREDENTIALS_LABEL
from raftseq.cluster.local import local_configs
from raftseq.cluster.tls import TLS_REFUSALS
from raftseq.cluster.membership import CHANGE_KIND_NAMES, CHANGE_OUTCOMES, Member, Membership
from raftseq.cluster.node import Node
from raftseq.cluster.quotas import CREDENTIAL_REFUSALS
from raftseq.cluster.raft import RAFT_COUNTERS
from raftseq.sequencer.protocol import Role

UNIT_SUFFIXES = ("_seconds", "_bytes", "_entries", "_records", "_messages", "_batches", "_index", "_seq", "_total")
#: Gauges without a unit: counts of things, 0/1 states, or "info"-style 1s with a label.
UNITLESS_GAUGES = {
    "raftseq_role",
    "raftseq_raft_leader",
    "raftseq_raft_term",
    "raftseq_raft_has_quorum",
    "raftseq_raft_peer_connected",
    "raftseq_clients_connected",
    "raftseq_clients_awaiting_hello",
    "raftseq_subscribers",
    "raftseq_sessions",
    "raftseq_journal_segments",
    "raftseq_journal_holes",
    "raftseq_disk_low",
    "raftseq_membership_voters",
    "raftseq_membership_learners",
    "raftseq_membership_number",
}
#: Label names that would be unbounded (one series per client).
UNBOUNDED_LABELS = {"session", "client", "client_seq", "seq", "peer_address", "remote", "address"}


class StubReplica:
    #: The membership the node holds (None: as before its Raft member is up), and the changes
    #: asked of it as leader.
    membership = None
    membership_changes: dict = {}
    raftseq_matching_entries_kept = 0
    raftseq_truncations_refused = 0
    raftseq_next_index_rewinds_refused = 0

    def __init__(self, status: dict) -> None:
        self.status = status
        self.calls = 0
        self.failures_left = 0

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name, 0) for name in RAFT_COUNTERS}

    def getStatus(self) -> dict:  # noqa: N802 - pysyncobj's name
        self.calls += 1
        if self.failures_left:
            self.failures_left -= 1
            raise RuntimeError("dictionary changed size during iteration")
        return dict(self.status)


class FakeCursor:
    """What the collector reads of a subscription's ``JournalCursor``."""

    def __init__(self, next_seq: int) -> None:
        self.next_seq = next_seq


@pytest.fixture
def node(tmp_path):
    config = local_configs(str(tmp_path), 7100, insecure=True)[0]
    node = Node(config)
    try:
        yield node
    finally:
        node.journal.close()


def leader_status(node: Node, *, commit: int = 120, matches: tuple[int, int] = (120, 95)) -> dict:
    peers = [p.raft_address for p in node.config.peers]
    return {
        "raft_term": 7,
        "commit_idx": commit,
        "last_applied": commit - 1,
        "log_len": 33,
        "has_quorum": True,
        f"partner_node_status_server_{peers[0]}": 2,
        f"partner_node_status_server_{peers[1]}": 0,
        f"match_idx_server_{peers[0]}": matches[0],
        f"match_idx_server_{peers[1]}": matches[1],
        f"next_node_idx_server_{peers[0]}": matches[0] + 1,
    }


def scrape(node: Node) -> dict[str, object]:
    """The node's /metrics page, parsed: family name -> family (as Prometheus reads it)."""
    text = generate_latest(M.build_registry(node.collector())).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(families: dict, sample_name: str) -> dict[tuple, float]:
    """``{(label values, sorted by name, 'node' left out): value}`` of one sample name."""
    found = {}
    for family in families.values():
        for s in family.samples:
            if s.name == sample_name:
                key = tuple(v for k, v in sorted(s.labels.items()) if k != "node")
                found[key] = s.value
    return found


def value(families: dict, sample_name: str, **labels: str) -> float:
    for family in families.values():
        for s in family.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {sample_name}{labels}")


# --- the page as a whole ------------------------------------------------------------------


#: A member the configs do not name, added and catching up (a learner).
N4 = Member("n4", "127.0.0.1:7199", "127.0.0.1:7198", learner=True)


def with_learner(node: Node, status: dict, *, match: int) -> StubReplica:
    """A replica stub whose membership is the configs' plus the learner ``N4`` at `match`."""
    held = Membership.of_config(node.config)
    replica = StubReplica({**status, f"match_idx_server_{N4.raft_address}": match})
    replica.membership = Membership(held.format_version, 1, [*held.members, N4])
    return replica


def test_scrape_exports_exactly_the_listed_families(node):
    node.replica = with_learner(node, leader_status(node), match=100)
    node.role = Role.LEADER
    families = scrape(node)
    ours = {name: f for name, f in families.items() if name.startswith("raftseq_")}
    expected = {spec.name.removesuffix("_total") if spec.type == "counter" else spec.name: spec for spec in M.METRICS}
    assert sorted(ours) == sorted(expected)
    for name, family in ours.items():
        spec = expected[name]
        assert family.type == spec.type, f"{spec.name} is a {family.type}, listed as {spec.type}"
        assert family.samples, f"{spec.name} has no sample on a leader"
        for s in family.samples:
            assert s.labels.get("node") == "n1", f"{s.name} lacks node=n1: {s.labels}"
            extra = set(s.labels) - {"node"} - ({"le"} if s.name.endswith("_bucket") else set())
            assert extra == set(spec.labels), f"{s.name} has labels {sorted(s.labels)}, listed {spec.labels}"
    # Every sample name on the page is one the dashboard/alert checks accept.
    names = {s.name for f in ours.values() for s in f.samples}
    assert names == M.exported_sample_names()
    assert any(name.startswith("process_") for name in families), "the standard process metrics are missing"


def test_names_follow_prometheus_conventions():
    names = [spec.name for spec in M.METRICS]
    assert len(names) == len(set(names)), "a metric is listed twice"
    for spec in M.METRICS:
        assert re.fullmatch(r"raftseq_[a-z][a-z0-9_]*[a-z0-9]", spec.name), spec.name
        assert spec.help, spec.name
        if spec.type == "counter":
            assert spec.name.endswith("_total"), f"counter {spec.name} must end in _total"
        else:
            assert not spec.name.endswith("_total"), f"{spec.type} {spec.name} must not end in _total"
        if spec.type == "histogram":
            assert spec.name.endswith(("_seconds", "_entries")), f"histogram {spec.name} names no unit"
        if any(word in spec.name for word in ("latency", "duration", "time")):
            assert spec.name.removesuffix("_total").endswith("_seconds"), f"{spec.name}: times are in seconds"
        if spec.type == "gauge" and spec.name not in UNITLESS_GAUGES:
            assert spec.name.endswith(UNIT_SUFFIXES), f"gauge {spec.name} names no unit"
        assert "node" not in spec.labels and "le" not in spec.labels
        assert not set(spec.labels) & UNBOUNDED_LABELS, f"{spec.name} has an unbounded label {spec.labels}"


def test_labels_take_values_from_fixed_sets_only(node):
    """Roles, reasons and checks come from constants; members are named by node id, never by
    an address or a session."""
    node.replica = StubReplica(leader_status(node))
    node.role = Role.LEADER
    node.leader_address = node.config.raft_address
    node.metrics.refused("no such reason")
    families = scrape(node)
    ids = {node.config.id, *(p.id for p in node.config.peers)}
    allowed = {
        "role": {role.value for role in M.ROLES},
        "reason": set(M.REFUSAL_REASONS) | set(TLS_REFUSALS),
        "check": set(M.VERIFY_CHECKS),
        "leader": ids | {M.NO_LEADER},
        "follower": ids,
        "peer": ids,
        "node": {node.config.id},
        # Named credentials: bounded by CREDENTIAL_LABELS_MAX (tests/test_credentials.py).
        "credential": {OTHER_CREDENTIALS_LABEL},
        "limit": set(CREDENTIAL_REFUSALS),
        "kind": set(CHANGE_KIND_NAMES.values()),
        "outcome": set(CHANGE_OUTCOMES),
        "learner": ids,
    }
    for name, family in families.items():
        if not name.startswith("raftseq_"):
            continue
        for s in family.samples:
            for label, label_value in s.labels.items():
                if label == "le":
                    continue
                assert label_value in allowed[label], f"{s.name}{{{label}={label_value!r}}} is outside {allowed[label]}"


# --- values -------------------------------------------------------------------------------


def test_raft_view_of_a_leader(node):
    replica = StubReplica(leader_status(node, commit=120, matches=(120, 95)))
    replica.raftseq_truncations_refused = 4
    node.replica = replica
    node.role = Role.LEADER
    node.leader_address = node.config.raft_address
    node.metrics.leader_changes = 2
    f = scrape(node)
    assert samples(f, "raftseq_role") == {("leader",): 1.0, ("follower",): 0.0, ("candidate",): 0.0}
    assert samples(f, "raftseq_raft_leader") == {("n1",): 1.0}
    assert value(f, "raftseq_raft_term") == 7
    assert value(f, "raftseq_raft_commit_index") == 120
    assert value(f, "raftseq_raft_last_applied_index") == 119
    assert value(f, "raftseq_raft_log_entries") == 33
    assert value(f, "raftseq_raft_has_quorum") == 1
    assert samples(f, "raftseq_raft_peer_connected") == {("n2",): 1.0, ("n3",): 0.0}
    assert samples(f, "raftseq_follower_lag_entries") == {("n2",): 0.0, ("n3",): 25.0}
    assert value(f, "raftseq_raft_truncations_refused_total") == 4
    assert value(f, "raftseq_leader_changes_total") == 2


def test_membership_voters_learners_changes_and_a_learners_catch_up_lag(node):
    """A leader whose membership holds a learner n4 (added, not yet promoted): voters, learners,
    the membership's number, each change by kind and outcome, and n4's lag behind the commit
    index, labelled by its id (not its address)."""
    replica = with_learner(node, leader_status(node, commit=120), match=70)
    replica.membership_changes = {("add", "committed"): 1, ("remove", "refused"): 2}
    node.replica = replica
    node.role = Role.LEADER
    node.leader_address = node.config.raft_address
    f = scrape(node)
    assert (value(f, "raftseq_membership_voters"), value(f, "raftseq_membership_learners"), value(f, "raftseq_membership_number")) == (
        3,
        1,
        1,
    )
    changes = samples(f, "raftseq_membership_changes_total")
    assert len(changes) == len(CHANGE_KIND_NAMES) * len(CHANGE_OUTCOMES), "every kind and outcome, from the start"
    assert {k: v for k, v in changes.items() if v} == {("add", "committed"): 1.0, ("remove", "refused"): 2.0}
    assert samples(f, "raftseq_learner_lag_entries") == {("n4",): 50.0}
    assert samples(f, "raftseq_follower_lag_entries")[("n4",)] == 50.0, "a member the config does not name, by its id"
    node.role = Role.FOLLOWER
    assert samples(scrape(node), "raftseq_learner_lag_entries") == {}, "only the leader knows a learner's lag"


def test_a_follower_names_its_leader_and_exports_no_lag(node):
    node.replica = StubReplica(leader_status(node))
    node.role = Role.FOLLOWER
    node.leader_address = node.config.peers[1].raft_address
    f = scrape(node)
    assert samples(f, "raftseq_role") == {("leader",): 0.0, ("follower",): 1.0, ("candidate",): 0.0}
    assert samples(f, "raftseq_raft_leader") == {(node.config.peers[1].id,): 1.0}
    assert samples(f, "raftseq_follower_lag_entries") == {}


def test_without_a_raft_status_raft_numbers_are_left_out_not_zero(node):
    """Before the replica exists (or when its status cannot be read) a term of 0 would look
    like a real term to the alert rules; the samples are absent instead."""
    f = scrape(node)  # node.replica is None
    assert samples(f, "raftseq_raft_term") == {}
    assert samples(f, "raftseq_raft_commit_index") == {}
    assert samples(f, "raftseq_raft_leader") == {(M.NO_LEADER,): 1.0}
    assert samples(f, "raftseq_role") == {("leader",): 0.0, ("follower",): 1.0, ("candidate",): 0.0}
    assert value(f, "raftseq_batcher_queue_entries") == 0


def test_a_status_read_that_races_the_tick_thread_is_retried(node):
    replica = StubReplica(leader_status(node))
    replica.failures_left = M.STATUS_READ_ATTEMPTS - 1
    node.replica = replica
    assert value(scrape(node), "raftseq_raft_term") == 7
    replica.failures_left = M.STATUS_READ_ATTEMPTS
    assert samples(scrape(node), "raftseq_raft_term") == {}


def test_counters_and_histograms(node):
    m = node.metrics
    m.refused("busy")
    m.refused("busy")
    m.refused("no such reason")
    m.duplicates = 3
    m.messages_sequenced = 500
    m.batches_applied = 7
    m.verify_failures["catchup"] += 1
    for latency in (0.0004, 0.001, 0.003, 9.0):
        m.ack_latency.observe(latency)
    m.batch_size.observe(1)
    m.batch_size.observe(100)
    m.fsync_latency.observe(0.002)
    f = scrape(node)
    assert value(f, "raftseq_refusals_total", reason="busy") == 2
    assert value(f, "raftseq_refusals_total", reason="internal") == 1
    assert value(f, "raftseq_duplicate_submits_total") == 3
    assert value(f, "raftseq_messages_sequenced_total") == 500
    assert value(f, "raftseq_batches_applied_total") == 7
    assert samples(f, "raftseq_journal_verify_failures_total") == {("catchup",): 1.0}
    buckets = samples(f, "raftseq_ack_latency_seconds_bucket")
    assert buckets[("0.0005",)] == 1
    assert buckets[("0.001",)] == 2, "a value equal to a bound belongs to that bucket (le)"
    assert buckets[("0.005",)] == 3
    assert buckets[("5.0",)] == 3
    assert buckets[("+Inf",)] == 4
    assert value(f, "raftseq_ack_latency_seconds_count") == 4
    assert value(f, "raftseq_ack_latency_seconds_sum") == pytest.approx(9.0044)
    assert value(f, "raftseq_batch_entries_bucket", le="1.0") == 1
    assert value(f, "raftseq_batch_entries_bucket", le="100.0") == 2
    assert value(f, "raftseq_journal_fsync_duration_seconds_bucket", le="0.0025") == 1
    assert value(f, "raftseq_journal_fsync_duration_seconds_bucket", le="0.001") == 0


def test_histogram_buckets_match_the_le_definition():
    rng = random.Random(5)
    bounds = M.LATENCY_BUCKETS_S
    values = [rng.uniform(0, 6) for _ in range(500)] + list(bounds) + [0.0]
    hist = M._Histogram(bounds)
    for v in values:
        hist.observe(v)
    cumulative = [sum(hist.counts[: i + 1]) for i in range(len(bounds))]
    assert cumulative == [sum(1 for v in values if v <= b) for b in bounds]
    assert sum(hist.counts) == len(values)


def test_subscriber_lag_is_the_slowest_subscription(node, monkeypatch):
    m = node.metrics
    f = scrape(node)
    assert value(f, "raftseq_subscriber_max_lag_messages") == 0, "no subscriber, no lag"
    monkeypatch.setattr(Node, "published_seq", property(lambda self: 1000))
    fast, slow = FakeCursor(1001), FakeCursor(601)
    m.subscriber_cursors.update({fast, slow})
    assert value(scrape(node), "raftseq_subscriber_max_lag_messages") == 400
    m.subscriber_cursors.discard(slow)
    assert value(scrape(node), "raftseq_subscriber_max_lag_messages") == 0


def test_disk_and_journal(node):
    node.disk_low = True
    f = scrape(node)
    assert value(f, "raftseq_disk_low") == 1
    assert 0 < value(f, "raftseq_disk_free_bytes") <= value(f, "raftseq_disk_size_bytes")
    assert value(f, "raftseq_disk_free_min_bytes") == node.config.journal.disk_free_bytes_min
    assert value(f, "raftseq_journal_holes") == 0
    assert value(f, "raftseq_journal_tail_cut_bytes") == 0
    assert value(f, "raftseq_start_time_seconds") == pytest.approx(node.metrics.start_time_s)


def test_the_metrics_reference_lists_every_metric():
    """The node table lists ``METRICS``; the one under "## Relay metrics", ``RELAY_METRICS``."""
    readme = (Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "README.md").read_text()
    nodes, relays = readme.split("\n## Relay metrics\n", 1)
    for text, specs, what in ((nodes, M.METRICS, "metric"), (relays, M.RELAY_METRICS, "relay metric")):
        rows = dict(re.findall(r"^\| `(raftseq_\w+)` \| (\w+) \|", text, re.M))
        assert rows == {spec.name: spec.type for spec in specs}, f"deploy/prometheus/README.md's {what} table is out of date"
