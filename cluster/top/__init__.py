"""``raftseq top``'s parts: ``model`` (the pure core: samples in, rows out), ``render`` (plain
lines and the live table) and ``sample`` (status and metrics scraped from the nodes). The
command itself (options, the refresh loop) is ``cluster.cli.top``."""

from raftseq.cluster.top.model import (
    MARKER_HOLD_S,
    Buckets,
    LeaderChange,
    NodeSample,
    Row,
    Sample,
    TopState,
    View,
    bucket_quantile,
    step,
)
from raftseq.cluster.top.render import LIVE_MARKER, NEW_LEADER_MARKER, format_latency, format_rate, render_lines, render_table
from raftseq.cluster.top.sample import ACK_LATENCY_METRIC, fetch_metrics_page, parse_ack_buckets, take_sample

__all__ = [
    "ACK_LATENCY_METRIC",
    "Buckets",
    "LIVE_MARKER",
    "LeaderChange",
    "MARKER_HOLD_S",
    "NEW_LEADER_MARKER",
    "NodeSample",
    "Row",
    "Sample",
    "TopState",
    "View",
    "bucket_quantile",
    "fetch_metrics_page",
    "format_latency",
    "format_rate",
    "parse_ack_buckets",
    "render_lines",
    "render_table",
    "step",
    "take_sample",
]
