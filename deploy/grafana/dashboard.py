#!/usr/bin/env python3
"""Write the raftseq Grafana dashboard (``dashboards/raftseq.json``).

The dashboard is generated so that its layout stays regular and every expression sits in one
readable list below; edit this file and regenerate rather than editing the JSON:

    python3 deploy/grafana/dashboard.py

``tests/test_dashboard.py`` checks that the JSON is up to date and that every expression in it
names a metric a raftseq node or relay exports, and that every metric they export has a panel.
Standard library only.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
OUTPUT = os.path.join(HERE, "dashboards", "raftseq.json")

UID = "raftseq-overview"
DS = {"type": "prometheus", "uid": "${datasource}"}
#: The node filter every expression of a node metric carries.
N = 'node=~"$node"'
#: The relay filter every expression of a relay metric (``raftseq_relay_*``) carries.
R = 'relay=~"$relay"'
RATE = "$__rate_interval"
#: Restricts the standard process_* metrics to raftseq nodes (other jobs export them too).
OF_NODES = f"and on(instance) raftseq_start_time_seconds{{{N}}}"


class Layout:
    """Places panels left to right in rows of 24 grid units."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.x = 0
        self.y = 0
        self.row_height = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "id": self._id(),
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
            }
        )
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.x = 0
            self.y += self.row_height
            self.row_height = 0

    def add(self, panel: dict, *, w: int, h: int) -> None:
        if self.x + w > 24:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_height = max(self.row_height, h)


def targets(queries: list[tuple[str, str]], *, instant: bool = False, fmt: str = "time_series") -> list[dict]:
    result = []
    for i, (expr, legend) in enumerate(queries):
        target = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i), "format": fmt}
        if instant:
            target["instant"] = True
            target["range"] = False
        else:
            target["range"] = True
        result.append(target)
    return result


def timeseries(
    title: str, description: str, queries: list[tuple[str, str]], *, unit: str = "short", minimum: float | None = 0, draw: str = "line"
) -> dict:
    defaults: dict = {
        "unit": unit,
        "custom": {"drawStyle": draw, "lineWidth": 1, "fillOpacity": 10, "showPoints": "never", "spanNulls": False},
    }
    if draw == "line" and unit == "bool":
        defaults["custom"]["lineInterpolation"] = "stepAfter"
    if minimum is not None:
        defaults["min"] = minimum
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets(queries),
    }


def stat(
    title: str,
    description: str,
    queries: list[tuple[str, str]],
    *,
    text_mode: str = "value",
    unit: str = "short",
    thresholds: list[dict] | None = None,
) -> dict:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": {"mode": "absolute", "steps": thresholds or [{"color": "green", "value": None}]},
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": text_mode,
            "colorMode": "value",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
        },
        "targets": targets(queries, instant=True),
    }


def heatmap(title: str, description: str, queries: list[tuple[str, str]], *, unit: str) -> dict:
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5},
            "yAxis": {"unit": unit},
            "tooltip": {"show": True, "yHistogram": False},
            "legend": {"show": False},
        },
        "targets": targets(queries, fmt="heatmap"),
    }


def role_timeline(title: str, description: str, queries: list[tuple[str, str]]) -> dict:
    return {
        "type": "state-timeline",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {
            "defaults": {
                "mappings": [
                    {
                        "type": "value",
                        "options": {
                            "0": {"text": "candidate", "color": "orange", "index": 0},
                            "1": {"text": "follower", "color": "blue", "index": 1},
                            "2": {"text": "leader", "color": "green", "index": 2},
                        },
                    }
                ],
                "color": {"mode": "thresholds"},
                "thresholds": {"mode": "absolute", "steps": [{"color": "text", "value": None}]},
            },
            "overrides": [],
        },
        "options": {"showValue": "auto", "mergeValues": True, "rowHeight": 0.8, "legend": {"showLegend": False}},
        "targets": targets(queries),
    }


def quantiles(metric: str, qs: tuple[float, ...], *, by: str = "node") -> list[tuple[str, str]]:
    return [
        (f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{N}}}[{RATE}])))", f"{{{{{by}}}}} p{q * 100:g}") for q in qs
    ]


def per_node(expr: str) -> list[tuple[str, str]]:
    """The one query of a panel that draws ``expr`` once per node."""
    return [(expr, "{{node}}")]


def per_relay(expr: str) -> list[tuple[str, str]]:
    """The one query of a panel that draws ``expr`` once per relay."""
    return [(expr, "{{relay}}")]


class Panel:
    """One row of the table below: the builder that draws a panel, its size (w, h) and what it draws."""

    def __init__(self, make: Callable[..., dict], size: tuple[int, int], title: str, description: str, queries: list, **options) -> None:
        self.make = make
        self.w, self.h = size
        self.title = title
        self.description = description
        self.queries = queries
        self.options = options

    def build(self) -> dict:
        return self.make(self.title, self.description, self.queries, **self.options)


#: Panel sizes in grid units (the grid is 24 wide).
QUARTER = (6, 7)
THIRD = (8, 7)
HALF = (12, 7)
WIDE = (24, 7)
TALL_HALF = (12, 8)
STAT_SIZE = (3, 5)

ROLE = f'2 * max by (node) (raftseq_role{{{N}, role="leader"}}) + max by (node) (raftseq_role{{{N}, role="follower"}})'

#: Every row of the dashboard and its panels, in order.
ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Cluster",
        [
            Panel(
                stat,
                (6, 5),
                "Leader, as each node sees it",
                "raftseq_raft_leader: the leader each node follows ('none' while it knows none). All nodes should agree.",
                [(f"raftseq_raft_leader{{{N}}} == 1", "{{node}} → {{leader}}")],
                text_mode="name",
            ),
            Panel(
                stat,
                STAT_SIZE,
                "Nodes reporting",
                "Nodes whose metrics Prometheus reads right now.",
                [("count(raftseq_start_time_seconds)", "nodes")],
                thresholds=[{"color": "red", "value": None}, {"color": "orange", "value": 2}, {"color": "green", "value": 3}],
            ),
            Panel(
                stat,
                STAT_SIZE,
                "Leaders",
                "Nodes that call themselves leader: 1 is healthy; 0 means no leader; 2 means a stale leader (or worse: see the alert rules).",
                [(f'sum(raftseq_role{{{N}, role="leader"}})', "leaders")],
                thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}, {"color": "red", "value": 2}],
            ),
            Panel(role_timeline, (12, 5), "Role", "Each node's Raft role over time (raftseq_role).", per_node(ROLE)),
            Panel(timeseries, THIRD, "Raft term", "raftseq_raft_term per node.", per_node(f"raftseq_raft_term{{{N}}}"), minimum=None),
            Panel(
                timeseries,
                THIRD,
                "Leader changes",
                "Leaders each node saw in the last 5 minutes (raftseq_leader_changes_total; the first leader after a start counts).",
                per_node(f"increase(raftseq_leader_changes_total{{{N}}}[5m])"),
            ),
            Panel(
                timeseries,
                THIRD,
                "Uptime",
                "Seconds since each node process started; a drop is a restart.",
                per_node(f"time() - raftseq_start_time_seconds{{{N}}}"),
                unit="s",
            ),
            Panel(
                timeseries,
                THIRD,
                "Commit and applied index",
                "Raft commit index and last applied index per node.",
                [
                    (f"raftseq_raft_commit_index{{{N}}}", "{{node}} commit"),
                    (f"raftseq_raft_last_applied_index{{{N}}}", "{{node}} applied"),
                ],
                minimum=None,
            ),
            Panel(
                timeseries,
                THIRD,
                "Follower lag (entries)",
                "Committed Raft entries each follower does not hold yet, as the leader sees it.",
                [(f"raftseq_follower_lag_entries{{{N}}}", "{{follower}} (leader {{node}})")],
            ),
            Panel(
                timeseries,
                THIRD,
                "Quorum and peer links",
                "1 while a node reaches a majority (quorum) and while each of its Raft links is connected.",
                [
                    (f"raftseq_raft_has_quorum{{{N}}}", "{{node}} quorum"),
                    (f"raftseq_raft_peer_connected{{{N}}}", "{{node}} → {{peer}}"),
                ],
                unit="bool",
            ),
            Panel(
                timeseries,
                HALF,
                "Raft log entries in memory",
                "Entries in the Raft log, held in RAM until the next compaction; and how far each node's log on disk is behind its commit index (power durability: entries counted toward commit only once on disk).",
                [
                    (f"raftseq_raft_log_entries{{{N}}}", "{{node}} entries"),
                    (
                        f"clamp_min(raftseq_raft_commit_index{{{N}}} - raftseq_raft_durable_index{{{N}}}, 0)",
                        "{{node}} committed, not on disk",
                    ),
                ],
            ),
            Panel(
                timeseries,
                HALF,
                "Raft log fsync (power durability)",
                "Group commits of the Raft log: fdatasync p50 and p99, fsyncs per second, and the Raft entries one fsync covered (p50).",
                [
                    *quantiles("raftseq_raft_log_fsync_duration_seconds", (0.5, 0.99)),
                    (f"rate(raftseq_raft_log_fsyncs_total{{{N}}}[{RATE}])", "{{node}} fsyncs/s"),
                    *quantiles("raftseq_raft_log_fsync_entries", (0.5,)),
                ],
            ),
            Panel(
                timeseries,
                HALF,
                "Raft log writer backlog (power durability)",
                "Bytes waiting for the Raft log's writer thread, and the bound past which the node takes no new entries (a stalled disk): the leader answers submits Busy (per second here), a follower drops AppendEntries carrying entries (per second; also while its free disk is below the minimum).",
                [
                    (f"raftseq_raft_log_writer_backlog_bytes{{{N}}}", "{{node}} backlog"),
                    (f"raftseq_raft_log_writer_backlog_max_bytes{{{N}}}", "{{node}} bound"),
                    (f"rate(raftseq_busy_raft_log_backlog_total{{{N}}}[{RATE}])", "{{node}} submits Busy/s"),
                    (f"rate(raftseq_raft_appends_dropped_total{{{N}}}[{RATE}])", "{{node}} appends dropped/s"),
                ],
            ),
            Panel(
                timeseries,
                HALF,
                "Raft corrections",
                "How often raftseq's corrections of pysyncobj kicked in (per second): kept matching entries, refused truncations, refused nextIndex rewinds, commit raises refused on snapshot pieces, elections deferred after long applies, older leaders told of a newer term, and steps down to one; replies and commits held for the Raft log's fsync (power durability); Raft messages refused (from a non-member, or malformed); and failed Raft ticks (each is in the node's log).",
                [
                    (f"rate(raftseq_raft_matching_entries_kept_total{{{N}}}[{RATE}])", "{{node}} entries kept"),
                    (f"rate(raftseq_raft_truncations_refused_total{{{N}}}[{RATE}])", "{{node}} truncations refused"),
                    (f"rate(raftseq_raft_next_index_rewinds_refused_total{{{N}}}[{RATE}])", "{{node}} rewinds refused"),
                    (f"rate(raftseq_raft_snapshot_commits_refused_total{{{N}}}[{RATE}])", "{{node}} snapshot commits refused"),
                    (f"rate(raftseq_raft_elections_deferred_total{{{N}}}[{RATE}])", "{{node}} elections deferred"),
                    (f"rate(raftseq_raft_newer_terms_told_total{{{N}}}[{RATE}])", "{{node}} newer term told"),
                    (f"rate(raftseq_raft_newer_terms_heard_total{{{N}}}[{RATE}])", "{{node}} stepped down to a newer term"),
                    (f"rate(raftseq_raft_acks_held_for_fsync_total{{{N}}}[{RATE}])", "{{node}} replies held for fsync"),
                    (f"rate(raftseq_raft_commits_held_for_fsync_total{{{N}}}[{RATE}])", "{{node}} commits held for fsync"),
                    (f"rate(raftseq_raft_peer_messages_refused_total{{{N}}}[{RATE}])", "{{node}} peer messages refused"),
                    (f"rate(raftseq_raft_ticks_failed_total{{{N}}}[{RATE}])", "{{node}} Raft ticks failed"),
                ],
                unit="ops",
            ),
            Panel(
                timeseries,
                HALF,
                "Raft link refusals",
                "What the Raft links refused (per second): frames over the maximum at their length prefix, unauthenticated links dropped (too many, or too slow to authenticate), failed accepts on the Raft listener (it backs off and accepts again), handshakes of node keys refused (a peer that is not the member it claims), and pickles refused by the allow-list. Anything but zero is an attack, a misconfigured peer or a node out of file descriptors: see the node's log.",
                [
                    (f"rate(raftseq_raft_link_frames_refused_total{{{N}}}[{RATE}])", "{{node}} frames refused"),
                    (f"rate(raftseq_raft_link_strangers_dropped_total{{{N}}}[{RATE}])", "{{node}} strangers dropped"),
                    (f"rate(raftseq_raft_link_accept_errors_total{{{N}}}[{RATE}])", "{{node}} accept errors"),
                    (f"rate(raftseq_raft_link_identities_refused_total{{{N}}}[{RATE}])", "{{node}} identities refused"),
                    (f"rate(raftseq_raft_link_pickles_refused_total{{{N}}}[{RATE}])", "{{node}} pickles refused"),
                ],
                unit="ops",
            ),
        ],
    ),
    (
        "Sequencing",
        [
            Panel(
                timeseries,
                THIRD,
                "Messages sequenced",
                "Messages given a sequence number per second, as each node applies them.",
                per_node(f"rate(raftseq_messages_sequenced_total{{{N}}}[{RATE}])"),
                unit="ops",
            ),
            Panel(
                timeseries,
                THIRD,
                "Batches applied",
                "Raft entries (batches) applied per second.",
                per_node(f"rate(raftseq_batches_applied_total{{{N}}}[{RATE}])"),
                unit="ops",
            ),
            Panel(
                timeseries,
                THIRD,
                "Batch size",
                "Messages per applied batch: median, p99 and mean.",
                [
                    *quantiles("raftseq_batch_entries", (0.5, 0.99)),
                    (
                        f"rate(raftseq_batch_entries_sum{{{N}}}[{RATE}]) / rate(raftseq_batch_entries_count{{{N}}}[{RATE}])",
                        "{{node}} mean",
                    ),
                ],
            ),
            Panel(
                timeseries,
                THIRD,
                "Last sequence number",
                "Last committed sequence number each node knows, and the last its subscribers may read (lower while a journal hole waits for catch-up).",
                [
                    (f"raftseq_last_seq{{{N}}}", "{{node}} last"),
                    (f"raftseq_readable_seq{{{N}}}", "{{node}} readable"),
                ],
                minimum=None,
            ),
            Panel(
                timeseries,
                THIRD,
                "Sequence lag behind the furthest node",
                "How many sequence numbers each node is behind the node furthest ahead.",
                per_node(f"scalar(max(raftseq_last_seq)) - raftseq_last_seq{{{N}}}"),
            ),
            Panel(
                timeseries,
                THIRD,
                "Age of the last log time",
                "Seconds since the leader stamped the last applied batch (grows while the cluster is idle).",
                per_node(f"time() - raftseq_last_log_time_seconds{{{N}}}"),
                unit="s",
            ),
            Panel(
                timeseries,
                TALL_HALF,
                "Ack latency (leader)",
                "Submit received to ack sent, on the leader: p50, p99, p99.9; and p99 of the priority lane's submits.",
                [
                    *quantiles("raftseq_ack_latency_seconds", (0.5, 0.99, 0.999)),
                    *[
                        (query, legend.replace("}}", "}} priority", 1))
                        for query, legend in quantiles("raftseq_priority_ack_latency_seconds", (0.99,))
                    ],
                ],
                unit="s",
            ),
            Panel(
                heatmap,
                TALL_HALF,
                "Ack latency distribution",
                "Acknowledgements per latency bucket.",
                [(f"sum by (le) (increase(raftseq_ack_latency_seconds_bucket{{{N}}}[{RATE}]))", "{{le}}")],
                unit="s",
            ),
            Panel(
                timeseries,
                THIRD,
                "Batcher queue and in-flight batches",
                "Submits waiting in the leader's batcher, batches proposed to Raft but not yet committed, "
                "the MiB of submits the leader holds (queued or proposed; bounded by batcher.held_bytes_max), and the "
                "share of time bulk waited behind a priority batch in Raft (the priority lane's cost to bulk, 0 to 1).",
                [
                    (f"raftseq_batcher_queue_entries{{{N}}}", "{{node}} queued submits"),
                    (f"raftseq_batcher_in_flight_batches{{{N}}}", "{{node}} in-flight batches"),
                    (f"raftseq_batcher_held_bytes{{{N}}} / 1048576", "{{node}} held MiB"),
                    (f"rate(raftseq_bulk_held_behind_priority_seconds_total{{{N}}}[{RATE}])", "{{node}} bulk held behind priority"),
                ],
            ),
            Panel(
                timeseries,
                THIRD,
                "Proposed",
                "Submits and batches the leader proposed per second (and of the submits, those of the priority lane), "
                "batches whose outcome became unknown, and waits of bulk behind priority batches cut at 10 ms (priority "
                "traffic without pause).",
                [
                    (f"rate(raftseq_entries_proposed_total{{{N}}}[{RATE}])", "{{node}} submits"),
                    (f"rate(raftseq_priority_entries_proposed_total{{{N}}}[{RATE}])", "{{node}} priority submits"),
                    (f"rate(raftseq_batches_proposed_total{{{N}}}[{RATE}])", "{{node}} batches"),
                    (f"rate(raftseq_batches_outcome_unknown_total{{{N}}}[{RATE}])", "{{node}} batches, outcome unknown"),
                    (f"rate(raftseq_bulk_holds_capped_total{{{N}}}[{RATE}])", "{{node}} bulk holds cut at 10 ms"),
                ],
                unit="ops",
            ),
            Panel(
                timeseries,
                THIRD,
                "Duplicate submits",
                "Submits answered from the dedup window per second (client retries).",
                per_node(f"rate(raftseq_duplicate_submits_total{{{N}}}[{RATE}])"),
                unit="ops",
            ),
            Panel(
                timeseries,
                WIDE,
                "Refusals by reason",
                "Submits and requests refused per second, by reason (busy, not_leader, outcome_unknown, …), and those of "
                "named credentials by credential and limit (raftseq cred; docs/operating.md, Credentials and quotas), and "
                "connections refused at the TLS handshake by reason (docs/operating.md, TLS).",
                [
                    (f"sum by (reason) (rate(raftseq_refusals_total{{{N}}}[{RATE}]))", "{{reason}}"),
                    (f"sum by (credential, limit) (rate(raftseq_credential_refusals_total{{{N}}}[{RATE}]))", "{{credential}} {{limit}}"),
                    (f"sum by (reason) (rate(raftseq_tls_refusals_total{{{N}}}[{RATE}]))", "TLS {{reason}}"),
                ],
                unit="ops",
            ),
            Panel(
                timeseries,
                THIRD,
                "Sessions",
                "Sessions in the session table (docs/sessions.md).",
                per_node(f"raftseq_sessions{{{N}}}"),
                unit="short",
            ),
            Panel(
                timeseries,
                THIRD,
                "Session table bytes",
                "Bytes the session table counts (each session with a full dedup window); bounded by machine.session_table_bytes_max.",
                per_node(f"raftseq_session_table_bytes{{{N}}}"),
                unit="bytes",
            ),
            Panel(
                timeseries,
                THIRD,
                "Sessions evicted",
                "Idle sessions evicted per second from a full session table to admit new ones.",
                per_node(f"rate(raftseq_sessions_evicted_total{{{N}}}[{RATE}])"),
                unit="ops",
            ),
        ],
    ),
    (
        "Clients and subscribers",
        [
            Panel(
                timeseries,
                QUARTER,
                "Connected clients",
                "Open client connections per node: welcomed, and still waiting for their hello.",
                [
                    (f"raftseq_clients_connected{{{N}}}", "{{node}} welcomed"),
                    (f"raftseq_clients_awaiting_hello{{{N}}}", "{{node}} awaiting hello"),
                ],
            ),
            Panel(timeseries, QUARTER, "Subscribers", "Active subscriptions per node.", per_node(f"raftseq_subscribers{{{N}}}")),
            Panel(
                timeseries,
                QUARTER,
                "Delivered to subscribers",
                "Messages sent to subscribers per second.",
                per_node(f"rate(raftseq_delivered_messages_total{{{N}}}[{RATE}])"),
                unit="ops",
            ),
            Panel(
                timeseries,
                QUARTER,
                "Slowest subscriber lag",
                "How many messages the slowest subscription of each node is behind its last sequence number.",
                per_node(f"raftseq_subscriber_max_lag_messages{{{N}}}"),
            ),
        ],
    ),
    (
        "Journal, catch-up and disk",
        [
            Panel(
                timeseries,
                QUARTER,
                "Journal size",
                "Bytes in each node's journal.",
                per_node(f"raftseq_journal_bytes{{{N}}}"),
                unit="bytes",
            ),
            Panel(
                timeseries,
                QUARTER,
                "Journal segments",
                "Segment files in each node's journal.",
                per_node(f"raftseq_journal_segments{{{N}}}"),
            ),
            Panel(
                timeseries,
                QUARTER,
                "fsync latency",
                "Duration of journal fsyncs: p50 and p99 (histogram), and the mean (from the totals).",
                [
                    *quantiles("raftseq_journal_fsync_duration_seconds", (0.5, 0.99)),
                    (
                        f"rate(raftseq_journal_fsync_seconds_total{{{N}}}[{RATE}]) / rate(raftseq_journal_fsyncs_total{{{N}}}[{RATE}])",
                        "{{node}} mean",
                    ),
                ],
                unit="s",
            ),
            Panel(
                timeseries,
                QUARTER,
                "fsyncs",
                "Journal fsyncs per second (depends on journal.fsync: never, batch or interval_ms=N).",
                per_node(f"rate(raftseq_journal_fsyncs_total{{{N}}}[{RATE}])"),
                unit="ops",
            ),
            Panel(
                timeseries,
                THIRD,
                "Journal verification",
                "Records that failed verification in the last hour, by check; bytes of torn tail cut at the last start; "
                "damaged sealed segments found and repaired in the last hour, records refused until repaired, and the "
                "scrub's read-back rate (bytes per second).",
                [
                    (f"increase(raftseq_journal_verify_failures_total{{{N}}}[1h])", "{{node}} failed ({{check}})"),
                    (f"raftseq_journal_tail_cut_bytes{{{N}}}", "{{node}} tail cut (bytes)"),
                    (f"increase(raftseq_journal_damage_found_total{{{N}}}[1h])", "{{node}} damage found"),
                    (f"increase(raftseq_journal_damage_repaired_total{{{N}}}[1h])", "{{node}} damage repaired"),
                    (f"raftseq_journal_damaged_records{{{N}}}", "{{node}} damaged records"),
                    (f"rate(raftseq_journal_scrubbed_bytes_total{{{N}}}[{RATE}])", "{{node}} scrubbed bytes/s"),
                ],
            ),
            Panel(
                timeseries,
                THIRD,
                "Catch-up",
                "Journal records still missing (a hole left by a Raft snapshot), holes, and records fetched from peers per second.",
                [
                    (f"raftseq_catchup_missing_records{{{N}}}", "{{node}} missing"),
                    (f"raftseq_journal_holes{{{N}}}", "{{node}} holes"),
                    (f"rate(raftseq_catchup_fetched_records_total{{{N}}}[{RATE}])", "{{node}} fetched/s"),
                ],
            ),
            Panel(
                timeseries,
                THIRD,
                "Free disk",
                "Free bytes on each data directory's file system, and the minimum below which the node refuses submits.",
                [
                    (f"raftseq_disk_free_bytes{{{N}}}", "{{node}} free"),
                    (f"raftseq_disk_free_min_bytes{{{N}}}", "{{node}} minimum"),
                ],
                unit="bytes",
            ),
            Panel(
                timeseries,
                HALF,
                "Free disk (%)",
                "Free share of each data directory's file system.",
                per_node(f"100 * raftseq_disk_free_bytes{{{N}}} / raftseq_disk_size_bytes{{{N}}}"),
                unit="percent",
            ),
            Panel(
                timeseries,
                HALF,
                "Refusing submits for lack of disk",
                "1 while a node's free disk is below its minimum and it answers Busy to every submit.",
                per_node(f"raftseq_disk_low{{{N}}}"),
                unit="bool",
            ),
        ],
    ),
    (
        "Membership",
        [
            Panel(
                timeseries,
                THIRD,
                "Voters and learners",
                "Members of the membership each node holds: voters, and learners catching up without a vote (raftseq member add; promoted once caught up); and the membership's number (changes that led to it: nodes that agree show one number).",
                [
                    (f"raftseq_membership_voters{{{N}}}", "{{node}} voters"),
                    (f"raftseq_membership_learners{{{N}}}", "{{node}} learners"),
                    (f"raftseq_membership_number{{{N}}}", "{{node}} membership number"),
                ],
            ),
            Panel(
                timeseries,
                THIRD,
                "Learner catch-up lag (entries)",
                "Committed Raft entries each learner does not hold yet, as the leader sees it; it is promoted to a voter at 0.",
                [(f"raftseq_learner_lag_entries{{{N}}}", "{{learner}} (leader {{node}})")],
            ),
            Panel(
                timeseries,
                THIRD,
                "Membership changes",
                "Membership changes asked of the leader in the last 15 minutes, by kind (add, promote, remove) and outcome (committed, refused, failed).",
                [(f"sum by (kind, outcome) (increase(raftseq_membership_changes_total{{{N}}}[15m])) > 0", "{{kind}} {{outcome}}")],
            ),
        ],
    ),
    (
        "Retention",
        [
            Panel(
                timeseries,
                THIRD,
                "Journal start and retention floor",
                "First sequence number each journal still holds, and the retention floor below which segments may leave.",
                [
                    (f"raftseq_journal_first_retained_seq{{{N}}}", "{{node}} first retained"),
                    (f"raftseq_journal_retention_floor_seq{{{N}}}", "{{node}} floor"),
                ],
            ),
            Panel(
                timeseries,
                THIRD,
                "Retained bytes",
                "Journal bytes kept, the configured bound, bytes over it held by the floor or the archive, and archive lag.",
                [
                    (f"raftseq_journal_bytes{{{N}}}", "{{node}} retained"),
                    (f"raftseq_journal_retention_max_bytes{{{N}}}", "{{node}} bound"),
                    (f"raftseq_journal_retention_held_bytes{{{N}}}", "{{node}} held over bound"),
                    (f"raftseq_journal_archive_lag_bytes{{{N}}}", "{{node}} archive lag"),
                ],
                unit="bytes",
            ),
            Panel(
                timeseries,
                THIRD,
                "Removed, archive failures, oldest age",
                "Bytes removed per second, archive failures per hour, and the log-time age of the oldest segment in seconds.",
                [
                    (f"rate(raftseq_journal_retention_removed_bytes_total{{{N}}}[{RATE}])", "{{node}} removed bytes/s"),
                    (f"increase(raftseq_journal_archive_failures_total{{{N}}}[1h])", "{{node}} archive failures"),
                    (f"raftseq_journal_oldest_age_seconds{{{N}}}", "{{node}} oldest age s"),
                ],
            ),
        ],
    ),
    (
        "Relays",
        [
            Panel(
                timeseries,
                QUARTER,
                "Relay sequence numbers",
                "Last sequence number each relay holds and serves (raftseq relay; docs/operating.md, Relays), and the first its journal still holds.",
                [
                    (f"raftseq_relay_last_seq{{{R}}}", "{{relay}} last"),
                    (f"raftseq_relay_journal_first_retained_seq{{{R}}}", "{{relay}} first retained"),
                ],
                minimum=None,
            ),
            Panel(
                timeseries,
                QUARTER,
                "Relay upstream lag (records)",
                "Records each relay's upstream held at its last status poll that the relay does not hold yet "
                "(alert RaftseqRelayLagging: above 10,000 for 3 minutes), and records the relay holds that its "
                "upstream did not (an upstream behind the relay: a lagging node, or another cluster).",
                [
                    (f"raftseq_relay_upstream_lag_records{{{R}}}", "{{relay}} behind its upstream"),
                    (f"raftseq_relay_upstream_behind_records{{{R}}}", "{{relay}} ahead of its upstream"),
                ],
            ),
            Panel(
                timeseries,
                QUARTER,
                "Relay subscribers and clients",
                "Subscriptions each relay serves, and its client connections whose hello was welcomed.",
                [
                    (f"raftseq_relay_subscribers{{{R}}}", "{{relay}} subscribers"),
                    (f"raftseq_relay_clients_connected{{{R}}}", "{{relay}} clients"),
                ],
            ),
            Panel(
                timeseries,
                QUARTER,
                "Relay delivered and copied",
                "Records each relay delivers to its subscribers per second (delivered msg/s), and copies from its upstream per second.",
                [
                    (f"rate(raftseq_relay_delivered_records_total{{{R}}}[{RATE}])", "{{relay}} delivered/s"),
                    (f"rate(raftseq_relay_upstream_records_total{{{R}}}[{RATE}])", "{{relay}} copied/s"),
                ],
                unit="ops",
            ),
            Panel(
                timeseries,
                THIRD,
                "Relay lag disconnects and refusals",
                "Per second: subscribers a relay disconnected for falling too far behind (--subscriber-lag-max; they resume), "
                "requests refused by reason (a submit to a relay: not_leader), refusals of named credentials by credential and "
                "limit (--credentials), and connections refused at the TLS handshake by reason.",
                [
                    (f"rate(raftseq_relay_subscriber_lag_disconnects_total{{{R}}}[{RATE}])", "{{relay}} lag disconnects"),
                    (f"sum by (relay, reason) (rate(raftseq_relay_refusals_total{{{R}}}[{RATE}]))", "{{relay}} {{reason}}"),
                    (
                        f"sum by (relay, credential, limit) (rate(raftseq_relay_credential_refusals_total{{{R}}}[{RATE}]))",
                        "{{relay}} {{credential}} {{limit}}",
                    ),
                    (f"sum by (relay, reason) (rate(raftseq_relay_tls_refusals_total{{{R}}}[{RATE}]))", "{{relay}} TLS {{reason}}"),
                ],
                unit="ops",
            ),
            Panel(
                timeseries,
                THIRD,
                "Relay upstream link",
                "Connections to an upstream that welcomed each relay in the last 5 minutes (more than one: the relay keeps "
                "losing its upstream), and records from the upstream that failed verification in the last hour, by check "
                "(upstream_diverged stops the relay).",
                [
                    (f"increase(raftseq_relay_upstream_connects_total{{{R}}}[5m])", "{{relay}} upstream connects"),
                    (f"increase(raftseq_relay_verify_failures_total{{{R}}}[1h])", "{{relay}} failed ({{check}})"),
                ],
            ),
            Panel(
                timeseries,
                THIRD,
                "Relay journal",
                "Bytes in each relay's journal, and bytes its retention removes per second (archived or deleted).",
                [
                    (f"raftseq_relay_journal_bytes{{{R}}}", "{{relay}} bytes"),
                    (f"rate(raftseq_relay_journal_retention_removed_bytes_total{{{R}}}[{RATE}])", "{{relay}} removed bytes/s"),
                ],
                unit="bytes",
            ),
        ],
    ),
    (
        "Process",
        [
            Panel(
                timeseries,
                THIRD,
                "Resident memory",
                "Resident memory of each node process (the Raft log is held in RAM until compaction).",
                [(f"process_resident_memory_bytes {OF_NODES}", "{{instance}}")],
                unit="bytes",
            ),
            Panel(
                timeseries,
                THIRD,
                "CPU",
                "CPU seconds per second used by each node process.",
                [(f"rate(process_cpu_seconds_total[{RATE}]) {OF_NODES}", "{{instance}}")],
                unit="percentunit",
            ),
            Panel(
                timeseries,
                THIRD,
                "Open files",
                "Open file descriptors of each node process.",
                [(f"process_open_fds {OF_NODES}", "{{instance}}")],
            ),
        ],
    ),
]


def label_filter(label: str, title: str, metric: str) -> dict:
    """A dashboard variable: the values of `label` on `metric`, several at once, all by default."""
    query = f"label_values({metric}, {label})"
    return {
        "name": label,
        "label": title,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": label},
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": 0,
        "refresh": 2,
        "sort": 1,
        "regex": "",
    }


def build() -> dict:
    L = Layout()
    for row_title, panels in ROWS:
        L.row(row_title)
        for panel in panels:
            L.add(panel.build(), w=panel.w, h=panel.h)

    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "A raftseq sequencer cluster: Raft, sequencing, clients, journal and disk, and its relays (metrics of cluster/metrics.py).",
        "editable": True,
        "graphTooltip": 1,
        "links": [],
        "panels": L.panels,
        "refresh": "5s",
        "schemaVersion": 39,
        "tags": ["raftseq"],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                },
                label_filter("node", "Node", "raftseq_role"),
                label_filter("relay", "Relay", "raftseq_relay_last_seq"),
            ]
        },
        "time": {"from": "now-15m", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "raftseq",
        "uid": UID,
        "version": 1,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else OUTPUT
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
