"""``raftseq top``: a live view of the cluster for a person at a keyboard.

Every interval the shell takes one ``Sample``: each node's ``Status`` over the client protocol
and, from the node's metrics endpoint (``Status.metrics_address``), the cumulative buckets of
``raftseq_ack_latency_seconds``. The core, ``step(state, sample) -> (state, View)``, is pure (no
clock, no I/O): from two successive samples it computes per node messages/s (last_seq delta over
elapsed monotonic time), lag (leader's last_seq minus the node's), p50/p99 acknowledgement
latency over the interval (from the histogram's bucket deltas, interpolated within a bucket as
Prometheus' ``histogram_quantile`` does), and notices a leader change (another leader id or
another term). Rendering is separate: ``render_lines`` for plain text (a pipe, ``--plain``),
``render_table`` for the live terminal screen (rich).

A node that cannot be reached is a row marked ``down`` (under the id it had when last seen) and
comes back by itself when it answers again; top itself keeps running through all of it and
exits 0 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from raftseq.cluster.status import node_status

if TYPE_CHECKING:
    from rich.table import Table

#: Seconds between refreshes, by default.
INTERVAL_S_DEFAULT = 1.0
#: Seconds to wait for one node's status or metrics before showing it as down / without latency.
NODE_TIMEOUT_S_DEFAULT = 0.5
#: How long the new leader's row keeps its marker, so that a person glancing at it sees it.
MARKER_HOLD_S = 10.0
#: Largest metrics page read from a node (a node's page is a few KiB).
METRICS_BYTES_MAX = 1024 * 1024
#: Session name in the hello of every status request.
SESSION = "top"
ACK_LATENCY_METRIC = "raftseq_ack_latency_seconds"
NEW_LEADER_MARKER = "<-new-leader"
#: The same on the live screen, in a column of its own.
LIVE_MARKER = "*"

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


def _leader_of(nodes: Sequence[NodeSample]) -> NodeSample | None:
    """The node that calls itself leader with the highest term (a deposed one may still think it
    leads for a moment)."""
    leaders = [n for n in nodes if n.up and n.role == "leader"]
    return max(leaders, key=lambda n: n.term) if leaders else None


def step(state: TopState, sample: Sample, *, marker_hold_s: float = MARKER_HOLD_S) -> tuple[TopState, View]:
    """The next state and the view of `sample`, compared with the previous sample."""
    previous = {n.endpoint: n for n in state.previous.nodes} if state.previous is not None else {}
    elapsed_s = sample.at_s - state.previous.at_s if state.previous is not None else 0.0

    leader = _leader_of(sample.nodes)
    leader_key = (leader.node_id, leader.term) if leader is not None else None
    change, changes, changed_now = state.change, state.changes, False
    if leader_key is not None and state.leader is not None and leader_key != state.leader:
        change = LeaderChange(sample.at_s, state.leader[0], state.leader[1], leader_key[0], leader_key[1])
        changes += 1
        changed_now = True
    marker_on = (
        change is not None and leader is not None and leader.node_id == change.new_id and sample.at_s - change.at_s < marker_hold_s
    )

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


# --- rendering -----------------------------------------------------------------------------

COLUMNS = ("node", "endpoint", "role", "term", "last_seq", "msg/s", "lag", "ack_p50", "ack_p99", "")


def format_latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1.0:
        return f"{seconds * 1000:.1f}ms"
    return f"{seconds:.2f}s"


def format_rate(per_s: float | None) -> str:
    if per_s is None:
        return "-"
    return f"{per_s:.0f}" if per_s >= 100 else f"{per_s:.1f}"


def _cells(row: Row) -> tuple[str, ...]:
    def number(value: int | None) -> str:
        return "-" if value is None else str(value)

    note = NEW_LEADER_MARKER if row.new_leader else row.error
    return (
        row.node_id,
        row.endpoint,
        row.role,
        number(row.term),
        number(row.last_seq),
        format_rate(row.messages_per_s),
        number(row.lag),
        format_latency(row.ack_p50_s),
        format_latency(row.ack_p99_s),
        note,
    )


def headline(view: View) -> str:
    up = sum(1 for r in view.rows if r.up)
    leader = f"leader {view.leader_id} term {view.leader_term}" if view.leader_id else "leader none"
    return f"{leader}  nodes up {up}/{len(view.rows)}  leader changes {view.changes}"


def change_text(change: LeaderChange) -> str:
    return f"{change.old_id} (term {change.old_term}) -> {change.new_id} (term {change.new_term})"


def render_lines(view: View, *, wall_time: str = "") -> list[str]:
    """Plain text of one refresh: a headline, a ``LEADER CHANGE`` line when the leader changed
    in this refresh, the column names, and one whitespace-separated line per node (``-`` where a
    value is unknown; the marker or the error last)."""
    lines = [f"== {wall_time + '  ' if wall_time else ''}{headline(view)}"]
    if view.changed_now and view.change is not None:
        lines.append(f"LEADER CHANGE {change_text(view.change)}")
    widths = (6, 22, 10, 6, 12, 10, 8, 9, 9, 0)
    table = [COLUMNS] + [_cells(r) for r in view.rows]
    for cells in table:
        lines.append("  " + "".join(c.ljust(w) if w else c for c, w in zip(cells, widths)).rstrip())
    return lines


def render_table(view: View, *, wall_time: str = "") -> Table:
    """The live screen: the same cells as ``render_lines``, in a rich table."""
    from rich.table import Table

    caption = ""
    if view.change is not None:
        caption = f"last leader change: {change_text(view.change)}, {view.at_s - view.change.at_s:.0f} s ago   "
    table = Table(
        title=f"raftseq top  {wall_time}  {headline(view)}",
        caption=caption + "Ctrl-C quits",
        expand=True,
        box=None,
        header_style="bold",
        pad_edge=False,
        title_justify="left",
        caption_justify="left",
    )
    # First a narrow column for the new-leader marker, so it shows on any width.
    table.add_column("", no_wrap=True, width=1)
    for name in COLUMNS[:-1]:
        numeric = name in ("term", "last_seq", "msg/s", "lag", "ack_p50", "ack_p99")
        table.add_column(name, justify="right" if numeric else "left", no_wrap=True)
    # Then the marker in words, or the error, in what width is left; cut short, not wrapped.
    table.add_column("", no_wrap=True, overflow="ellipsis", ratio=1)
    for row in view.rows:
        style = "red" if not row.up else "bold green" if row.role == "leader" else ""
        cells = list(_cells(row))
        marker = ""
        if row.new_leader:
            marker = f"[bold yellow]{LIVE_MARKER}[/]"
            cells[-1] = f"[bold yellow]{NEW_LEADER_MARKER}[/]"
        table.add_row(marker, *cells, style=style)
    return table


# --- the shell: measuring ------------------------------------------------------------------


def parse_ack_buckets(text: str) -> Buckets | None:
    """``raftseq_ack_latency_seconds`` buckets from a Prometheus text page (None if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name != ACK_LATENCY_METRIC:
            continue
        buckets = sorted(
            (float(s.labels["le"]), s.value) for s in family.samples if s.name == f"{ACK_LATENCY_METRIC}_bucket" and "le" in s.labels
        )
        return tuple(buckets) or None
    return None


async def fetch_metrics_page(address: str, *, timeout_s: float) -> str:
    """GET http://address/metrics (loopback or wherever the node serves it), at most
    ``METRICS_BYTES_MAX`` bytes. Raises OSError, TimeoutError or ValueError."""
    host, port = address.rsplit(":", 1)

    async def get() -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"GET /metrics HTTP/1.0\r\nHost: {address}\r\nAccept: text/plain\r\n\r\n".encode("ascii"))
            data = await reader.read(METRICS_BYTES_MAX + 1)
            while data and len(data) <= METRICS_BYTES_MAX:
                more = await reader.read(METRICS_BYTES_MAX + 1 - len(data))
                if not more:
                    break
                data += more
            return data
        finally:
            writer.close()

    data = await asyncio.wait_for(get(), timeout_s)
    if len(data) > METRICS_BYTES_MAX:
        raise ValueError(f"metrics page of {address} exceeds {METRICS_BYTES_MAX} bytes")
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1.") or head.split(b" ", 2)[1:2] != [b"200"]:
        raise ValueError(f"unexpected answer from {address}: {head[:80]!r}")
    return body.decode("utf-8")


async def _ack_buckets(address: str, timeout_s: float) -> Buckets | None:
    if not address:
        return None
    try:
        return parse_ack_buckets(await fetch_metrics_page(address, timeout_s=timeout_s))
    except (OSError, TimeoutError, ValueError, UnicodeDecodeError):
        return None


async def take_sample(
    endpoints: Sequence[str], *, token: str, timeout_s: float, clock: Callable[[], float] = time.monotonic
) -> Sample:
    """Ask every node for its status, then scrape the metrics of those that answered."""
    statuses = await asyncio.gather(*(node_status(e, token=token, timeout_s=timeout_s, session=SESSION) for e in endpoints))
    at_s = clock()
    buckets = await asyncio.gather(
        *(_ack_buckets(s.get("metrics_address", ""), timeout_s) if s.get("role") != "unreachable" else _none() for s in statuses)
    )
    nodes = []
    for endpoint, status, ack in zip(endpoints, statuses, buckets):
        if status.get("role") == "unreachable":
            nodes.append(NodeSample(endpoint, False, error=status.get("error", "")))
            continue
        nodes.append(
            NodeSample(
                endpoint,
                True,
                node_id=status["id"],
                pid=status["pid"],
                role=status["role"],
                term=status["term"],
                last_seq=status["last_seq"],
                ack_buckets=ack,
            )
        )
    return Sample(at_s, tuple(nodes))


async def _none() -> None:
    return None


# --- the shell: the loop -------------------------------------------------------------------


async def _run(args: argparse.Namespace, endpoints: list[str], show: Callable[[View], None]) -> None:
    state = TopState()
    refreshes = 0
    next_at = time.monotonic()
    while True:
        sample = await take_sample(endpoints, token=args.token, timeout_s=args.timeout)
        state, view = step(state, sample)
        show(view)
        refreshes += 1
        if args.iterations and refreshes >= args.iterations:
            return
        # Pace the refreshes; after falling behind (slow nodes), start counting afresh.
        next_at += args.interval
        now = time.monotonic()
        if next_at < now:
            next_at = now
        await asyncio.sleep(next_at - now)


def _wall_time() -> str:
    return time.strftime("%H:%M:%S")


def run_top(args: argparse.Namespace) -> int:
    from raftseq.cluster.cli import DEFAULT_ENDPOINTS, _endpoints

    endpoints = _endpoints(args.endpoints or [os.environ.get("RAFTSEQ_ENDPOINTS", DEFAULT_ENDPOINTS)])
    if not endpoints:
        raise SystemExit("raftseq top: no endpoints")
    plain = args.plain or not sys.stdout.isatty()
    try:
        if plain:

            def show(view: View) -> None:
                print("\n".join(render_lines(view, wall_time=_wall_time())), flush=True)

            asyncio.run(_run(args, endpoints, show))
        else:
            from rich.console import Console
            from rich.live import Live

            with Live(console=Console(), auto_refresh=False, screen=False) as live:

                def show(view: View) -> None:
                    live.update(render_table(view, wall_time=_wall_time()), refresh=True)

                asyncio.run(_run(args, endpoints, show))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader of our pipe went away (`raftseq top | head`): not an error. Point stdout
        # at /dev/null so that the interpreter's final flush does not complain again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return 0


# --- the command line ----------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Define ``raftseq top`` on the ``raftseq`` command's subparsers."""
    top = subparsers.add_parser(
        "top",
        help="live view of every node: role, term, last_seq, messages/s, lag, ack latency",
        description=(
            "Show one row per node, refreshed every --interval seconds: role, term, last sequence number, "
            "messages/s, lag behind the leader (sequence numbers), acknowledgement latency p50/p99 over the "
            "last interval (on the leader, from its metrics endpoint), and a marker on the new leader when "
            "the leader changes. Nodes that cannot be reached show as down until they answer again. "
            "On a terminal the view is a live screen; when stdout is not a terminal (or with --plain) "
            "each refresh prints plain lines. Ctrl-C quits."
        ),
    )
    top.add_argument(
        "endpoints",
        nargs="*",
        metavar="ENDPOINT",
        help="HOST:PORT client endpoints, or comma-separated lists of them (default $RAFTSEQ_ENDPOINTS or the local cluster)",
    )
    top.add_argument("--token", default=os.environ.get("RAFTSEQ_TOKEN", ""), help="client token (default $RAFTSEQ_TOKEN)")
    top.add_argument(
        "--interval", type=_positive_float, default=INTERVAL_S_DEFAULT, help=f"seconds between refreshes (default {INTERVAL_S_DEFAULT:g})"
    )
    top.add_argument(
        "--timeout",
        type=_positive_float,
        default=NODE_TIMEOUT_S_DEFAULT,
        help=f"seconds to wait for each node's status and metrics before showing it as down (default {NODE_TIMEOUT_S_DEFAULT:g})",
    )
    count = top.add_mutually_exclusive_group()
    count.add_argument(
        "--iterations", type=_count, default=0, metavar="N", help="stop after N refreshes (default 0: run until Ctrl-C)"
    )
    count.add_argument("--once", dest="iterations", action="store_const", const=1, help="one refresh, then exit (same as --iterations 1)")
    top.add_argument("--plain", action="store_true", help="print plain lines per refresh even on a terminal")
    top.set_defaults(func=run_top)
    return top


def main(argv: list[str] | None = None) -> int:
    """``python -m cluster.top ENDPOINT...``: the same as ``raftseq top``."""
    parser = argparse.ArgumentParser(prog="raftseq")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_parser(sub)
    args = parser.parse_args(["top", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
