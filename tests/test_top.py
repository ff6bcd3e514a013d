"""``raftseq top``: the row computation on hand-made samples (rates, lag, latency quantiles from
bucket deltas, the leader-change marker, nodes going down and coming back), the plain and rich
renderings, the command line, and one run against a real three-node cluster whose leader is
killed while traffic flows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import msgspec
import pytest
from cluster_harness import ClusterHarness, running_cluster  # noqa: F401

from raftseq.clients import SequencerClient
from raftseq.cluster import top
from raftseq.cluster.cli import top as top_command
from raftseq.cluster.metrics import LATENCY_BUCKETS_S
from raftseq.cluster.top import NEW_LEADER_MARKER, NodeSample, Row, Sample, TopState, View, bucket_quantile, render_lines, step
from raftseq.sequencer import protocol

INF = float("inf")
BOUNDS = (0.001, 0.002, 0.005, 0.01, INF)


def buckets(*counts: float) -> tuple[tuple[float, float], ...]:
    """Cumulative buckets over BOUNDS from per-bucket counts."""
    assert len(counts) == len(BOUNDS)
    out, running = [], 0.0
    for bound, count in zip(BOUNDS, counts):
        running += count
        out.append((bound, running))
    return tuple(out)


def node(endpoint: str, node_id: str, role: str = "follower", *, term: int = 2, last_seq: int = 0, pid: int = 0, ack=None) -> NodeSample:
    return NodeSample(
        endpoint, True, node_id=node_id, pid=pid or 1000 + int(node_id[1:]), role=role, term=term, last_seq=last_seq, ack_buckets=ack
    )


def down(endpoint: str) -> NodeSample:
    return NodeSample(endpoint, False, error="connection refused")


E1, E2, E3 = "127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"


def run_steps(*samples: Sample, state: TopState | None = None) -> list[View]:
    state = state or TopState()
    views = []
    for sample in samples:
        state, view = step(state, sample)
        views.append(view)
    return views


def row_of(view: View, node_id: str) -> Row:
    (row,) = [r for r in view.rows if r.node_id == node_id]
    return row


# --- latency quantiles from bucket deltas ---------------------------------------------------


def test_quantiles_interpolate_inside_the_bucket_like_histogram_quantile():
    before = buckets(0, 0, 0, 0, 0)
    after = buckets(50, 40, 10, 0, 0)  # 100 acks: 50 <= 1 ms, 40 in (1, 2] ms, 10 in (2, 5] ms
    assert bucket_quantile(0.5, before, after) == pytest.approx(0.001)
    assert bucket_quantile(0.25, before, after) == pytest.approx(0.0005)
    assert bucket_quantile(0.7, before, after) == pytest.approx(0.001 + 0.001 * 20 / 40)
    assert bucket_quantile(0.99, before, after) == pytest.approx(0.002 + 0.003 * 9 / 10)


def test_quantiles_cover_only_the_interval_not_everything_since_the_node_started():
    # Before: 1000 slow acks (5..10 ms). In the interval: 100 fast ones (<= 1 ms).
    before = buckets(0, 0, 0, 1000, 0)
    after = buckets(100, 0, 0, 1000, 0)
    assert bucket_quantile(0.99, before, after) == pytest.approx(0.00099)
    # ...whereas over the node's whole life p99 sits in the slow bucket.
    assert bucket_quantile(0.99, buckets(0, 0, 0, 0, 0), after) > 0.005


def test_no_acks_in_the_interval_or_incomparable_scrapes_give_no_latency():
    same = buckets(3, 4, 5, 6, 7)
    assert bucket_quantile(0.5, same, same) is None
    assert bucket_quantile(0.5, None, same) is None
    assert bucket_quantile(0.5, same, None) is None
    # A counter reset (the node restarted): counts went down.
    assert bucket_quantile(0.5, buckets(10, 0, 0, 0, 0), buckets(2, 0, 0, 0, 0)) is None
    # Other buckets.
    other = tuple((b * 2, c) for b, c in buckets(1, 1, 1, 1, 1))
    assert bucket_quantile(0.5, buckets(0, 0, 0, 0, 0), other) is None


def test_a_quantile_in_the_inf_bucket_is_the_highest_finite_bound():
    assert bucket_quantile(0.99, buckets(0, 0, 0, 0, 0), buckets(1, 0, 0, 0, 99)) == 0.01


def test_quantile_rejects_a_nonsense_q():
    with pytest.raises(ValueError):
        bucket_quantile(1.0, buckets(0, 0, 0, 0, 0), buckets(1, 0, 0, 0, 0))


# --- rows: rates, lag, latency --------------------------------------------------------------


def test_rates_lag_and_latency_from_two_samples():
    first = Sample(
        10.0,
        (node(E1, "n1", "leader", last_seq=100, ack=buckets(5, 0, 0, 0, 0)), node(E2, "n2", last_seq=90), node(E3, "n3", last_seq=100)),
    )
    second = Sample(
        12.0,
        (node(E1, "n1", "leader", last_seq=500, ack=buckets(105, 0, 0, 0, 0)), node(E2, "n2", last_seq=450), node(E3, "n3", last_seq=510)),
    )
    v1, v2 = run_steps(first, second)

    # The first refresh has nothing to compare with.
    assert [r.messages_per_s for r in v1.rows] == [None, None, None]
    assert [r.ack_p50_s for r in v1.rows] == [None, None, None]
    assert [r.lag for r in v1.rows] == [0, 10, 0]

    assert v2.leader_id == "n1" and v2.leader_term == 2
    n1, n2, n3 = v2.rows
    assert n1.messages_per_s == pytest.approx(200.0)  # (500 - 100) / 2 s
    assert n2.messages_per_s == pytest.approx(180.0)
    assert n3.messages_per_s == pytest.approx(205.0)
    assert (n1.lag, n2.lag) == (0, 50)
    assert n3.lag == 0  # a follower asked a moment later than the leader is never "ahead"
    assert n1.ack_p50_s == pytest.approx(0.0005) and n1.ack_p99_s == pytest.approx(0.00099)
    assert (n2.ack_p50_s, n2.ack_p99_s) == (None, None)  # followers acknowledge nothing
    assert (n1.role, n1.term, n1.last_seq, n1.up) == ("leader", 2, 500, True)
    assert not v2.changed_now and v2.change is None and v2.changes == 0


def test_no_lag_without_a_leader_and_no_latency_across_a_restart():
    first = Sample(0.0, (node(E1, "n1", "leader", last_seq=10, pid=1, ack=buckets(9, 0, 0, 0, 0)),))
    # Same node, new pid: its histogram counts from zero again, and it is a candidate now.
    second = Sample(1.0, (node(E1, "n1", "candidate", last_seq=10, pid=2, ack=buckets(20, 0, 0, 0, 0)),))
    _, v2 = run_steps(first, second)
    (row,) = v2.rows
    assert row.lag is None and v2.leader_id == ""
    assert row.ack_p50_s is None
    assert row.messages_per_s == 0.0


# --- the leader-change marker ---------------------------------------------------------------


def test_a_new_leader_is_marked_and_the_marker_fades():
    steady = Sample(
        0.0, (node(E1, "n1", "leader", term=2, last_seq=10), node(E2, "n2", term=2, last_seq=10), node(E3, "n3", term=2, last_seq=10))
    )
    leader_dead = Sample(1.0, (down(E1), node(E2, "n2", "candidate", term=3, last_seq=10), node(E3, "n3", term=3, last_seq=10)))
    elected = Sample(2.0, (down(E1), node(E2, "n2", "leader", term=3, last_seq=12), node(E3, "n3", term=3, last_seq=11)))
    later = Sample(
        2.0 + top.MARKER_HOLD_S - 0.5, (down(E1), node(E2, "n2", "leader", term=3, last_seq=40), node(E3, "n3", term=3, last_seq=40))
    )
    much_later = Sample(2.0 + top.MARKER_HOLD_S + 0.5, (down(E1), node(E2, "n2", "leader", term=3), node(E3, "n3", term=3)))
    v_steady, v_dead, v_elected, v_later, v_much_later = run_steps(steady, leader_dead, elected, later, much_later)

    assert not any(r.new_leader for r in v_steady.rows) and v_steady.change is None
    # No leader yet: no change reported, no marker.
    assert v_dead.leader_id == "" and not v_dead.changed_now and v_dead.change is None
    assert [r.lag for r in v_dead.rows] == [None, None, None]

    assert v_elected.changed_now and v_elected.changes == 1
    assert (v_elected.change.old_id, v_elected.change.old_term, v_elected.change.new_id, v_elected.change.new_term) == ("n1", 2, "n2", 3)
    assert row_of(v_elected, "n2").new_leader and not row_of(v_elected, "n3").new_leader
    assert row_of(v_elected, "n3").lag == 1

    assert not v_later.changed_now and row_of(v_later, "n2").new_leader and v_later.changes == 1
    assert not row_of(v_much_later, "n2").new_leader and v_much_later.change is not None


def test_the_same_node_elected_again_in_a_new_term_is_a_change():
    a = Sample(0.0, (node(E1, "n1", "leader", term=2), node(E2, "n2", term=2)))
    b = Sample(1.0, (node(E1, "n1", "leader", term=4), node(E2, "n2", term=4)))
    _, vb = run_steps(a, b)
    assert vb.changed_now and (vb.change.old_term, vb.change.new_term) == (2, 4) and vb.change.new_id == "n1"
    assert row_of(vb, "n1").new_leader


def test_a_deposed_leader_that_still_claims_to_lead_is_not_a_change_back():
    a = Sample(0.0, (node(E1, "n1", "leader", term=2), node(E2, "n2", term=2)))
    both = Sample(1.0, (node(E1, "n1", "leader", term=2), node(E2, "n2", "leader", term=3)))
    again = Sample(2.0, (node(E1, "n1", "leader", term=2), node(E2, "n2", "leader", term=3)))
    _, v_both, v_again = run_steps(a, both, again)
    assert v_both.leader_id == "n2" and v_both.changed_now and v_both.changes == 1
    assert not v_again.changed_now and v_again.changes == 1
    assert row_of(v_again, "n2").new_leader and not row_of(v_again, "n1").new_leader


# --- nodes down and back ---------------------------------------------------------------------


def test_a_node_that_dies_keeps_its_name_and_comes_back():
    up = Sample(0.0, (node(E1, "n1", "leader", last_seq=100), node(E2, "n2", last_seq=100)))
    gone = Sample(1.0, (node(E1, "n1", "leader", last_seq=150), down(E2)))
    back = Sample(2.0, (node(E1, "n1", "leader", last_seq=200), node(E2, "n2", last_seq=120, pid=5555)))
    again = Sample(3.0, (node(E1, "n1", "leader", last_seq=250), node(E2, "n2", last_seq=250, pid=5555)))
    _, v_gone, v_back, v_again = run_steps(up, gone, back, again)

    row = row_of(v_gone, "n2")
    assert (row.up, row.role, row.term, row.last_seq, row.messages_per_s, row.lag) == (False, "down", None, None, None, None)
    assert row.error == "connection refused"
    row = row_of(v_back, "n2")
    assert row.up and row.role == "follower" and row.lag == 80
    assert row.messages_per_s is None  # nothing to compare with: it was down a refresh ago
    assert row_of(v_again, "n2").messages_per_s == pytest.approx(130.0)
    assert not any(v.changed_now for v in (v_gone, v_back, v_again))


def test_a_node_never_seen_is_named_by_a_question_mark():
    (view,) = run_steps(Sample(0.0, (down(E1),)))
    assert view.rows[0].node_id == "?" and view.rows[0].role == "down"


# --- rendering --------------------------------------------------------------------------------


def _fields(line: str) -> list[str]:
    return line.split()


def test_plain_lines_have_one_row_per_node_and_the_marker():
    samples = (
        Sample(
            0.0, (node(E1, "n1", "leader", term=2, last_seq=10), node(E2, "n2", term=2, last_seq=10), node(E3, "n3", term=2, last_seq=10))
        ),
        Sample(1.0, (down(E1), node(E2, "n2", "leader", term=3, last_seq=30, ack=None), node(E3, "n3", term=3, last_seq=25))),
    )
    _, view = run_steps(*samples)
    lines = render_lines(view, wall_time="12:00:00")
    assert lines[0] == "== 12:00:00  leader n2 term 3  nodes up 2/3  leader changes 1"
    assert lines[1] == "LEADER CHANGE n1 (term 2) -> n2 (term 3)"
    assert _fields(lines[2]) == ["node", "endpoint", "role", "term", "last_seq", "msg/s", "lag", "ack_p50", "ack_p99"]
    rows = {f[0]: f for f in map(_fields, lines[3:])}
    assert set(rows) == {"n1", "n2", "n3"} and len(lines) == 6
    assert rows["n1"][:9] == ["n1", E1, "down", "-", "-", "-", "-", "-", "-"] and " ".join(rows["n1"][9:]) == "connection refused"
    assert rows["n2"] == ["n2", E2, "leader", "3", "30", "20.0", "0", "-", "-", NEW_LEADER_MARKER]
    assert rows["n3"] == ["n3", E3, "follower", "3", "25", "15.0", "5", "-", "-"]


def test_latency_and_rate_formats():
    assert top.format_latency(None) == "-"
    assert top.format_latency(0.00049) == "0.5ms"
    assert top.format_latency(0.25) == "250.0ms"
    assert top.format_latency(2.5) == "2.50s"
    assert top.format_rate(1234.56) == "1235"
    assert top.format_rate(99.94) == "99.9"
    assert top.format_rate(None) == "-"


def test_the_rich_table_shows_every_node():
    from rich.console import Console

    samples = (
        Sample(0.0, (node(E1, "n1", "leader", term=2), node(E2, "n2", term=2))),
        Sample(1.0, (down(E1), node(E2, "n2", "leader", term=3, last_seq=7))),
    )
    _, view = run_steps(*samples)
    console = Console(width=160, record=True, file=open(os.devnull, "w"))
    try:
        console.print(top.render_table(view, wall_time="12:00:00"))
        text = console.export_text()
    finally:
        console.file.close()
    assert "leader n2 term 3" in text and NEW_LEADER_MARKER in text and "down" in text
    assert "last leader change: n1 (term 2) -> n2 (term 3)" in text


# --- measuring: the metrics page and the Status frame -----------------------------------------


def test_ack_buckets_are_read_from_a_prometheus_page():
    # The node's histogram has these buckets and a node label; the live-cluster test below
    # reads a real node's page.
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    histogram = Histogram(
        "raftseq_ack_latency_seconds", "Submit received to ack sent", ["node"], buckets=LATENCY_BUCKETS_S, registry=registry
    )
    Histogram("raftseq_batch_entries", "Entries per applied batch", ["node"], registry=registry).labels("n1").observe(3)
    for seconds in (0.0004, 0.0004, 0.003, 7.0):
        histogram.labels("n1").observe(seconds)
    parsed = top.parse_ack_buckets(generate_latest(registry).decode())
    assert [b for b, _ in parsed] == [*LATENCY_BUCKETS_S, INF]
    counts = dict(parsed)
    assert (counts[0.0005], counts[0.002], counts[0.005], counts[5.0], counts[INF]) == (2, 2, 3, 3, 4)
    assert top.parse_ack_buckets("# nothing here\n") is None


def test_status_carries_the_metrics_address_and_stays_compatible_both_ways():
    new = protocol.Status("n1", protocol.Role.LEADER, "a:1", 3, 4, 5, 6, 7, "c:1", "r:1", "127.0.0.1:7201")
    assert protocol.FrameReader("node").feed(protocol.encode_frame(new)) == [new]

    # A frame from an older node (no metrics_address) reads with the default.
    old_body = msgspec.msgpack.encode(("status", "n1", "leader", "a:1", 3, 4, 5, 6, 7, "c:1", "r:1"))
    assert msgspec.msgpack.decode(old_body, type=protocol.NodeFrame).metrics_address == ""

    # An older reader (its Status ends before the field; later releases added more after it) ignores it.
    all_fields = msgspec.structs.fields(protocol.Status)
    fields = all_fields[: [f.name for f in all_fields].index("metrics_address")]
    OldStatus = msgspec.defstruct(
        "OldStatus",
        [(f.name, f.type) if f.required else (f.name, f.type, f.default) for f in fields],
        frozen=True, array_like=True, tag_field="t", tag="status",
    )  # fmt: skip
    assert [f.name for f in fields][-1] == "raft_address"

    old = msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=OldStatus)
    assert (old.node_id, old.last_seq, old.raft_address) == ("n1", 5, "r:1")


# --- the command line -------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="raftseq")
    top_command.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["top", *argv])


def test_options_and_their_help():
    args = parse("--endpoints", "127.0.0.1:1,127.0.0.1:2", "--once", "--token", "t", "--interval", "0.5")
    assert (args.endpoints, args.iterations, args.token, args.interval, args.func) == (
        ["127.0.0.1:1", "127.0.0.1:2"],
        1,
        "t",
        0.5,
        top_command.run_top,
    )
    assert parse("--iterations", "7").iterations == 7
    assert parse().iterations == 0 and parse().interval == 1.0 and not parse().plain

    parser = argparse.ArgumentParser(prog="raftseq")
    sub = top_command.add_parser(parser.add_subparsers(dest="command"))
    assert all(action.help for action in sub._actions), [a.dest for a in sub._actions if not a.help]
    # Endpoints as arguments (how top took them before --endpoints) still work.
    assert parse("127.0.0.1:1,127.0.0.1:2").legacy_endpoints == ["127.0.0.1:1,127.0.0.1:2"]

    for bad in (["--interval", "0"], ["--interval", "x"], ["--iterations", "-1"], ["--once", "--iterations", "3"]):
        with pytest.raises(SystemExit):
            parse(*bad)


def read_lines_into(stream, lines: queue.Queue) -> threading.Thread:
    def pump() -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


class TopProcess:
    """``raftseq top`` (``python -m raftseq.cluster.cli top``) with a pipe for stdout (so: plain lines), read refresh by
    refresh. Always killed and reaped by ``close``."""

    def __init__(self, endpoints: list[str], *args: str, env: dict | None = None) -> None:
        self.node_count = len(endpoints)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "raftseq.cluster.cli", "top", "--endpoints", ",".join(endpoints), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        read_lines_into(self.process.stdout, self.lines)

    def next_refresh(self, *, timeout_s: float) -> list[str]:
        """The lines of the next refresh: headline, maybe a LEADER CHANGE line, the column
        names, one line per node. Raises AssertionError on timeout or when top ended."""
        deadline = time.monotonic() + timeout_s
        block: list[str] = []
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no refresh from top within {timeout_s} s; output so far:\n" + "\n".join(self.seen[-40:])) from None
            if line is None:
                raise AssertionError(f"top ended (exit {self.process.wait(5)}); output:\n" + "\n".join(self.seen[-40:]) + self.stderr())
            self.seen.append(line)
            assert block or line.startswith("== "), f"a refresh starting with {line!r}"
            block.append(line)
            header = [i for i, text in enumerate(block) if text.split()[:2] == ["node", "endpoint"]]
            if header and len(block) - header[0] - 1 == self.node_count:
                return block

    def stderr(self) -> str:
        if self.process.poll() is None:
            return ""
        return "\n--- stderr ---\n" + self.process.stderr.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.process.stdout.close()
        self.process.stderr.close()


def row_fields(block: list[str]) -> list[list[str]]:
    header = next(i for i, line in enumerate(block) if line.split()[:2] == ["node", "endpoint"])
    return [line.split() for line in block[header + 1 :]]


def rows_of(block: list[str]) -> dict[str, list[str]]:
    return {f[0]: f for f in row_fields(block)}


def test_ctrl_c_exits_130_and_unreachable_nodes_show_as_down():
    # Nobody listens on these (below the ephemeral range, see test_cluster); top keeps refreshing.
    from raftseq.cluster.local import free_base_port

    base = free_base_port()
    endpoints = [f"127.0.0.1:{base + 1}", f"127.0.0.1:{base + 2}"]
    process = TopProcess(endpoints, "--interval", "0.2", "--timeout", "0.2")
    try:
        for _ in range(2):
            block = process.next_refresh(timeout_s=15)
            assert block[0].endswith("leader none  nodes up 0/2  leader changes 0"), block
            assert [f[:3] for f in row_fields(block)] == [["?", e, "down"] for e in endpoints], block
        process.process.send_signal(signal.SIGINT)
        assert process.process.wait(10) == 130
        assert "Traceback" not in process.process.stderr.read()
    finally:
        process.close()


# --- against a real cluster -------------------------------------------------------------------

TRAFFIC_RATE_PER_S = 200


class Traffic:
    """One session submitting at a steady rate on its own thread until stopped; the client
    follows the leader through failovers by itself."""

    def __init__(self, h: ClusterHarness) -> None:
        self.h = h
        self.acked = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="top-traffic", daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "traffic thread did not stop"

    async def _run(self) -> None:
        client = SequencerClient(self.h.endpoints, session="top-traffic", token=self.h.token, in_flight_max=500)
        pending: set[asyncio.Future] = set()

        def done(future: asyncio.Future) -> None:
            pending.discard(future)
            if not future.cancelled() and future.exception() is None:
                self.acked += 1

        try:
            await client.connect()
            next_at = time.monotonic()
            while not self._stop.is_set():
                await client.wait_for_room()
                future = client.submit_nowait(b"x")
                pending.add(future)
                future.add_done_callback(done)
                next_at += 1 / TRAFFIC_RATE_PER_S
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            await client.close()


def test_top_follows_a_live_cluster_through_a_leader_kill(running_cluster):
    h = running_cluster
    with Traffic(h) as traffic:
        # At most 60 refreshes of 0.5 s: top ends by itself even if this test is stuck.
        process = TopProcess(h.endpoints, "--interval", "0.5", "--iterations", "60", env={"RAFTSEQ_TOKEN": h.token})
        try:
            # Steady state: three nodes, exactly one leader, last_seq rising, latency measured.
            leader_seqs: list[int] = []
            latency_seen = False
            leader_id = ""
            for _ in range(20):
                rows = rows_of(process.next_refresh(timeout_s=15))
                assert set(rows) == set(h.node_ids), rows
                leaders = [f for f in rows.values() if f[2] == "leader"]
                assert len(leaders) == 1 and all(f[2] == "follower" for f in rows.values() if f not in leaders), rows
                leader_id = leaders[0][0]
                leader_seqs.append(int(leaders[0][4]))
                latency_seen = latency_seen or leaders[0][7] != "-"
                if len(leader_seqs) >= 3 and leader_seqs[-1] > leader_seqs[-2] > leader_seqs[-3] and latency_seen:
                    break
            else:
                raise AssertionError(f"leader's last_seq {leader_seqs}, latency seen {latency_seen}\n" + "\n".join(process.seen[-20:]))
            assert traffic.error is None, traffic.error

            h.kill(leader_id)

            # top keeps going: the dead leader shows as down, a new leader is marked, and the
            # stream moves on.
            change_line = ""
            new_leader = ""
            seq_at_change = 0
            for _ in range(40):
                block = process.next_refresh(timeout_s=15)
                rows = rows_of(block)
                assert set(rows) == set(h.node_ids), block
                change_line = change_line or next((line for line in block if line.startswith("LEADER CHANGE")), "")
                marked = [f for f in rows.values() if f[-1] == NEW_LEADER_MARKER]
                if marked:
                    assert change_line, f"a new-leader marker without a LEADER CHANGE line:\n{block}"
                    assert len(marked) == 1 and marked[0][2] == "leader", block
                    assert rows[leader_id][2] == "down", block
                    if not new_leader:
                        new_leader, seq_at_change = marked[0][0], int(marked[0][4])
                    elif int(rows[new_leader][4]) > seq_at_change:
                        break
            else:
                raise AssertionError("no new leader marked with a rising last_seq:\n" + "\n".join(process.seen[-30:]))
            assert change_line.startswith(f"LEADER CHANGE {leader_id} (term ") and f"-> {new_leader} (term " in change_line, change_line

            # The killed node comes back and top shows it up again.
            h.restart(leader_id)
            for _ in range(40):
                rows = rows_of(process.next_refresh(timeout_s=15))
                if rows[leader_id][2] == "follower":
                    break
            else:
                raise AssertionError(f"{leader_id} never came back in top:\n" + "\n".join(process.seen[-20:]))

            process.process.send_signal(signal.SIGINT)
            assert process.process.wait(10) == 130, process.stderr()
            assert "Traceback" not in process.process.stderr.read()
        finally:
            process.close()
            print("--- what top printed ---\n" + "\n".join(process.seen), flush=True)
    assert traffic.error is None, traffic.error
    assert traffic.acked > 0
