"""How ``raftseq top`` shows a ``View``: ``render_lines`` for plain text (a pipe, ``--plain``),
``render_table`` for the live terminal screen (rich)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raftseq.cluster.top.model import LeaderChange, Row, View

if TYPE_CHECKING:
    from rich.table import Table

#: Ends the new leader's row for ``model.MARKER_HOLD_S`` once the leader changed.
NEW_LEADER_MARKER = "<-new-leader"
#: The same on the live screen, in a column of its own.
LIVE_MARKER = "*"

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
