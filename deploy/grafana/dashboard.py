#!/usr/bin/env python3
"""Write the raftseq Grafana dashboard (``dashboards/raftseq.json``).

The dashboard is generated so that its layout stays regular and every expression sits in one
readable list below; edit this file and regenerate rather than editing the JSON:

    python3 deploy/grafana/dashboard.py

``tests/test_dashboard.py`` checks that the JSON is up to date and that every expression in it
names a metric a raftseq node exports. Standard library only.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUTPUT = os.path.join(HERE, "dashboards", "raftseq.json")

UID = "raftseq-overview"
DS = {"type": "prometheus", "uid": "${datasource}"}
#: The node filter every expression carries.
N = 'node=~"$node"'
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


def heatmap(title: str, description: str, expr: str, *, unit: str) -> dict:
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
        "targets": targets([(expr, "{{le}}")], fmt="heatmap"),
    }


def role_timeline() -> dict:
    expr = f'2 * max by (node) (raftseq_role{{{N}, role="leader"}}) + max by (node) (raftseq_role{{{N}, role="follower"}})'
    return {
        "type": "state-timeline",
        "title": "Role",
        "description": "Each node's Raft role over time (raftseq_role).",
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
        "targets": targets([(expr, "{{node}}")]),
    }


def quantiles(metric: str, qs: tuple[float, ...], *, by: str = "node") -> list[tuple[str, str]]:
    return [
        (f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{N}}}[{RATE}])))", f"{{{{{by}}}}} p{q * 100:g}") for q in qs
    ]


def build() -> dict:
    L = Layout()

    L.row("Cluster")
    L.add(
        stat(
            "Leader, as each node sees it",
            "raftseq_raft_leader: the leader each node follows ('none' while it knows none). All nodes should agree.",
            [(f"raftseq_raft_leader{{{N}}} == 1", "{{node}} → {{leader}}")],
            text_mode="name",
        ),
        w=6,
        h=5,
    )
    L.add(
        stat(
            "Nodes reporting",
            "Nodes whose metrics Prometheus reads right now.",
            [("count(raftseq_start_time_seconds)", "nodes")],
            thresholds=[{"color": "red", "value": None}, {"color": "orange", "value": 2}, {"color": "green", "value": 3}],
        ),
        w=3,
        h=5,
    )
    L.add(
        stat(
            "Leaders",
            "Nodes that call themselves leader: 1 is healthy; 0 means no leader; 2 means a stale leader (or worse: see the alert rules).",
            [(f'sum(raftseq_role{{{N}, role="leader"}})', "leaders")],
            thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}, {"color": "red", "value": 2}],
        ),
        w=3,
        h=5,
    )
    L.add(role_timeline(), w=12, h=5)
    L.add(timeseries("Raft term", "raftseq_raft_term per node.", [(f"raftseq_raft_term{{{N}}}", "{{node}}")], minimum=None), w=8, h=7)
    L.add(
        timeseries(
            "Leader changes",
            "Leaders each node saw in the last 5 minutes (raftseq_leader_changes_total; the first leader after a start counts).",
            [(f"increase(raftseq_leader_changes_total{{{N}}}[5m])", "{{node}}")],
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries(
            "Uptime",
            "Seconds since each node process started; a drop is a restart.",
            [(f"time() - raftseq_start_time_seconds{{{N}}}", "{{node}}")],
            unit="s",
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries(
            "Commit and applied index",
            "Raft commit index and last applied index per node.",
            [
                (f"raftseq_raft_commit_index{{{N}}}", "{{node}} commit"),
                (f"raftseq_raft_last_applied_index{{{N}}}", "{{node}} applied"),
            ],
            minimum=None,
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries(
            "Follower lag (entries)",
            "Committed Raft entries each follower does not hold yet, as the leader sees it.",
            [(f"raftseq_follower_lag_entries{{{N}}}", "{{follower}} (leader {{node}})")],
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries(
            "Quorum and peer links",
            "1 while a node reaches a majority (quorum) and while each of its Raft links is connected.",
            [
                (f"raftseq_raft_has_quorum{{{N}}}", "{{node}} quorum"),
                (f"raftseq_raft_peer_connected{{{N}}}", "{{node}} → {{peer}}"),
            ],
            unit="bool",
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries(
            "Raft log entries in memory",
            "Entries in pysyncobj's Raft log, held in RAM until the next compaction.",
            [(f"raftseq_raft_log_entries{{{N}}}", "{{node}}")],
        ),
        w=12,
        h=7,
    )
    L.add(
        timeseries(
            "Raft corrections",
            "How often raftseq's corrections of pysyncobj kicked in (per second): kept matching entries, refused truncations, refused nextIndex rewinds, commit raises refused on snapshot pieces, elections deferred after long applies, older leaders told of a newer term, and steps down to one; and failed Raft ticks (each is in the node's log).",
            [
                (f"rate(raftseq_raft_matching_entries_kept_total{{{N}}}[{RATE}])", "{{node}} entries kept"),
                (f"rate(raftseq_raft_truncations_refused_total{{{N}}}[{RATE}])", "{{node}} truncations refused"),
                (f"rate(raftseq_raft_next_index_rewinds_refused_total{{{N}}}[{RATE}])", "{{node}} rewinds refused"),
                (f"rate(raftseq_raft_snapshot_commits_refused_total{{{N}}}[{RATE}])", "{{node}} snapshot commits refused"),
                (f"rate(raftseq_raft_elections_deferred_total{{{N}}}[{RATE}])", "{{node}} elections deferred"),
                (f"rate(raftseq_raft_newer_terms_told_total{{{N}}}[{RATE}])", "{{node}} newer term told"),
                (f"rate(raftseq_raft_newer_terms_heard_total{{{N}}}[{RATE}])", "{{node}} stepped down to a newer term"),
                (f"rate(raftseq_raft_ticks_failed_total{{{N}}}[{RATE}])", "{{node}} Raft ticks failed"),
            ],
            unit="ops",
        ),
        w=12,
        h=7,
    )

    L.row("Sequencing")
    L.add(
        timeseries(
            "Messages sequenced",
            "Messages given a sequence number per second, as each node applies them.",
            [(f"rate(raftseq_messages_sequenced_total{{{N}}}[{RATE}])", "{{node}}")],
            unit="ops",
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries(
            "Batches applied",
            "Raft entries (batches) applied per second.",
            [(f"rate(raftseq_batches_applied_total{{{N}}}[{RATE}])", "{{node}}")],
            unit="ops",
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries(
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
        w=8,
        h=7,
    )
    L.add(
        timeseries(
            "Last sequence number",
            "Last committed sequence number each node knows, and the last its subscribers may read (lower while a journal hole waits for catch-up).",
            [
                (f"raftseq_last_seq{{{N}}}", "{{node}} last"),
                (f"raftseq_readable_seq{{{N}}}", "{{node}} readable"),
            ],
            minimum=None,
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries(
            "Sequence lag behind the furthest node",
            "How many sequence numbers each node is behind the node furthest ahead.",
            [(f"scalar(max(raftseq_last_seq)) - raftseq_last_seq{{{N}}}", "{{node}}")],
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries(
            "Age of the last log time",
            "Seconds since the leader stamped the last applied batch (grows while the cluster is idle).",
            [(f"time() - raftseq_last_log_time_seconds{{{N}}}", "{{node}}")],
            unit="s",
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries(
            "Ack latency (leader)",
            "Submit received to ack sent, on the leader: p50, p99, p99.9.",
            quantiles("raftseq_ack_latency_seconds", (0.5, 0.99, 0.999)),
            unit="s",
        ),
        w=12,
        h=8,
    )
    L.add(
        heatmap(
            "Ack latency distribution",
            "Acknowledgements per latency bucket.",
            f"sum by (le) (increase(raftseq_ack_latency_seconds_bucket{{{N}}}[{RATE}]))",
            unit="s",
        ),
        w=12,
        h=8,
    )
    L.add(
        timeseries(
            "Batcher queue and in-flight batches",
            "Submits waiting in the leader's batcher, and batches proposed to Raft but not yet committed.",
            [
                (f"raftseq_batcher_queue_entries{{{N}}}", "{{node}} queued submits"),
                (f"raftseq_batcher_in_flight_batches{{{N}}}", "{{node}} in-flight batches"),
            ],
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries(
            "Proposed",
            "Submits and batches the leader proposed per second, and batches whose outcome became unknown.",
            [
                (f"rate(raftseq_entries_proposed_total{{{N}}}[{RATE}])", "{{node}} submits"),
                (f"rate(raftseq_batches_proposed_total{{{N}}}[{RATE}])", "{{node}} batches"),
                (f"rate(raftseq_batches_outcome_unknown_total{{{N}}}[{RATE}])", "{{node}} batches, outcome unknown"),
            ],
            unit="ops",
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries(
            "Duplicate submits",
            "Submits answered from the dedup window per second (client retries).",
            [(f"rate(raftseq_duplicate_submits_total{{{N}}}[{RATE}])", "{{node}}")],
            unit="ops",
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries(
            "Refusals by reason",
            "Submits and requests refused per second, by reason (busy, not_leader, outcome_unknown, …).",
            [(f"sum by (reason) (rate(raftseq_refusals_total{{{N}}}[{RATE}]))", "{{reason}}")],
            unit="ops",
        ),
        w=24,
        h=7,
    )

    L.row("Clients and subscribers")
    L.add(
        timeseries("Connected clients", "Open client connections per node.", [(f"raftseq_clients_connected{{{N}}}", "{{node}}")]),
        w=6,
        h=7,
    )
    L.add(timeseries("Subscribers", "Active subscriptions per node.", [(f"raftseq_subscribers{{{N}}}", "{{node}}")]), w=6, h=7)
    L.add(
        timeseries(
            "Delivered to subscribers",
            "Messages sent to subscribers per second.",
            [(f"rate(raftseq_delivered_messages_total{{{N}}}[{RATE}])", "{{node}}")],
            unit="ops",
        ),
        w=6,
        h=7,
    )
    L.add(
        timeseries(
            "Slowest subscriber lag",
            "How many messages the slowest subscription of each node is behind its last sequence number.",
            [(f"raftseq_subscriber_max_lag_messages{{{N}}}", "{{node}}")],
        ),
        w=6,
        h=7,
    )

    L.row("Journal, catch-up and disk")
    L.add(
        timeseries("Journal size", "Bytes in each node's journal.", [(f"raftseq_journal_bytes{{{N}}}", "{{node}}")], unit="bytes"), w=6, h=7
    )
    L.add(
        timeseries("Journal segments", "Segment files in each node's journal.", [(f"raftseq_journal_segments{{{N}}}", "{{node}}")]),
        w=6,
        h=7,
    )
    L.add(
        timeseries(
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
        w=6,
        h=7,
    )
    L.add(
        timeseries(
            "fsyncs",
            "Journal fsyncs per second (depends on journal.fsync: never, batch or interval_ms=N).",
            [(f"rate(raftseq_journal_fsyncs_total{{{N}}}[{RATE}])", "{{node}}")],
            unit="ops",
        ),
        w=6,
        h=7,
    )
    L.add(
        timeseries(
            "Journal verification",
            "Records that failed verification in the last hour, by check, and bytes of torn tail cut at the last start.",
            [
                (f"increase(raftseq_journal_verify_failures_total{{{N}}}[1h])", "{{node}} failed ({{check}})"),
                (f"raftseq_journal_tail_cut_bytes{{{N}}}", "{{node}} tail cut (bytes)"),
            ],
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries(
            "Catch-up",
            "Journal records still missing (a hole left by a Raft snapshot), holes, and records fetched from peers per second.",
            [
                (f"raftseq_catchup_missing_records{{{N}}}", "{{node}} missing"),
                (f"raftseq_journal_holes{{{N}}}", "{{node}} holes"),
                (f"rate(raftseq_catchup_fetched_records_total{{{N}}}[{RATE}])", "{{node}} fetched/s"),
            ],
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries(
            "Free disk",
            "Free bytes on each data directory's file system, and the minimum below which the node refuses submits.",
            [
                (f"raftseq_disk_free_bytes{{{N}}}", "{{node}} free"),
                (f"raftseq_disk_free_min_bytes{{{N}}}", "{{node}} minimum"),
            ],
            unit="bytes",
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries(
            "Free disk (%)",
            "Free share of each data directory's file system.",
            [(f"100 * raftseq_disk_free_bytes{{{N}}} / raftseq_disk_size_bytes{{{N}}}", "{{node}}")],
            unit="percent",
        ),
        w=12,
        h=7,
    )
    L.add(
        timeseries(
            "Refusing submits for lack of disk",
            "1 while a node's free disk is below its minimum and it answers Busy to every submit.",
            [(f"raftseq_disk_low{{{N}}}", "{{node}}")],
            unit="bool",
        ),
        w=12,
        h=7,
    )

    L.row("Process")
    L.add(
        timeseries(
            "Resident memory",
            "Resident memory of each node process (the Raft log is held in RAM until compaction).",
            [(f"process_resident_memory_bytes {OF_NODES}", "{{instance}}")],
            unit="bytes",
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries(
            "CPU",
            "CPU seconds per second used by each node process.",
            [(f"rate(process_cpu_seconds_total[{RATE}]) {OF_NODES}", "{{instance}}")],
            unit="percentunit",
        ),
        w=8,
        h=7,
    )
    L.add(
        timeseries("Open files", "Open file descriptors of each node process.", [(f"process_open_fds {OF_NODES}", "{{instance}}")]),
        w=8,
        h=7,
    )

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
        "description": "A raftseq sequencer cluster: Raft, sequencing, clients, journal and disk (metrics of cluster/metrics.py).",
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
                {
                    "name": "node",
                    "label": "Node",
                    "type": "query",
                    "datasource": DS,
                    "definition": "label_values(raftseq_role, node)",
                    "query": {"query": "label_values(raftseq_role, node)", "refId": "node"},
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "hide": 0,
                    "refresh": 2,
                    "sort": 1,
                    "regex": "",
                },
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
