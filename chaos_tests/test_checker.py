"""The history recorder and the checker, on hand-made histories.

Each history is written by ``HistoryRecorder`` into a file and read back with ``load_history``,
so the format round-trips in every test. ``World`` plays a correct sequencer (submits get the
next seq, every node's final read is the whole stream); a test breaks one thing and expects the
checker to name that invariant with the seqs and payloads involved.
"""

from __future__ import annotations

import json
import threading

import pytest

from chaos_tests import checker, history
from chaos_tests.checker import check, main
from chaos_tests.history import HistoryError, HistoryRecorder, load_history

NODES = ("n1", "n2", "n3")


class Clock:
    """A settable clock: each reading is 1 µs after the previous one, or at the time set."""

    def __init__(self) -> None:
        self.now_ns = 0

    def __call__(self) -> int:
        self.now_ns += 1_000
        return self.now_ns

    def set_s(self, seconds: float) -> None:
        self.now_ns = round(seconds * 1e9) - 1_000


class World:
    """A correct sequencer and its clients, recorded."""

    def __init__(self, path) -> None:
        self.path = path
        self.clock = Clock()
        self.rec = HistoryRecorder(path, clock_ns=self.clock)
        self.client_seqs: dict[str, int] = {}
        self.message_of: dict[int, tuple[str, int, str]] = {}
        #: The committed stream: ``stream[seq - 1]`` is ``(session, client_seq, payload)``.
        self.stream: list[tuple[str, int, str]] = []

    def submit(self, client: str = "c1") -> int:
        session = f"s-{client}"
        client_seq = self.client_seqs[session] = self.client_seqs.get(session, 0) + 1
        payload = f"{client}-{client_seq:06d}"
        op = self.rec.invoke(client, session, client_seq, payload)
        self.message_of[op] = (session, client_seq, payload)
        return op

    def commit(self, op: int) -> int:
        self.stream.append(self.message_of[op])
        return len(self.stream)

    def ok(self, op: int) -> int:
        seq = self.commit(op)
        self.rec.complete_ok(op, seq)
        return seq

    def payload(self, op: int) -> str:
        return self.message_of[op][2]

    def records(self, last: int | None = None) -> list[tuple[int, str, int, str]]:
        return [(seq, *message) for seq, message in enumerate(self.stream[:last], start=1)]

    def subscribe(self, sub: str, node: str = "n1", from_seq: int = 1, last: int | None = None) -> None:
        """Connect `sub` and deliver from_seq..last (the whole stream by default)."""
        self.rec.sub_connect(sub, node, from_seq)
        self.deliver(sub, node, from_seq, last or len(self.stream))

    def deliver(self, sub: str, node: str, first: int, last: int) -> None:
        for seq in range(first, last + 1):
            self.rec.deliver(sub, node, seq, *self.stream[seq - 1])

    def finish(self, reads: dict[str, list] | None = None) -> list:
        """Final reads (the whole stream on every node unless `reads` says otherwise), then
        close and load the history."""
        reads = reads if reads is not None else {node: self.records() for node in NODES}
        for node, records in reads.items():
            self.rec.final_read(node, records)
        self.rec.close()
        return load_history(self.path)


@pytest.fixture
def world(tmp_path) -> World:
    return World(tmp_path / "history.jsonl")


def run_clean(world: World, ops: int, clients: int = 3, window: int = 4) -> None:
    """`clients` clients, each with up to `window` submits in flight, completing in order."""
    in_flight: list[int] = []
    for i in range(ops):
        in_flight.append(world.submit(f"c{i % clients}"))
        if len(in_flight) >= window * clients:
            world.ok(in_flight.pop(0))
    for op in in_flight:
        world.ok(op)


def names(report) -> dict[str, int]:
    return report.violation_counts


def only(report, name: str) -> list[checker.Violation]:
    return [v for v in report.violations if v.name == name]


# --- clean histories ----------------------------------------------------------------------


def test_a_clean_history_with_every_outcome_passes(world):
    run_clean(world, 30)
    unknown_committed = world.submit("c1")
    world.commit(unknown_committed)
    world.rec.complete_unknown(unknown_committed, "deadline")
    unknown_lost = world.submit("c2")
    world.rec.complete_unknown(unknown_lost, "leader lost")
    failed = world.submit("c0")
    world.rec.complete_fail(failed, "rejected: too_many_sessions")
    never = world.submit("c1")
    world.commit(never)
    world.subscribe("sub1", "n1")
    world.rec.sub_connect("sub2", "n2", 10)
    world.deliver("sub2", "n2", 10, 20)
    world.rec.sub_reconnect("sub2", "n3", 21)
    world.deliver("sub2", "n3", 21, len(world.stream))
    fault = world.rec.fault_start("kill", node="n2", role="follower", seed=7)
    world.rec.fault_end(fault)
    world.rec.note("config", seed=7, nodes=list(NODES))
    lagging = world.records(last=25)
    report = check(world.finish({"n1": world.records(), "n2": world.records(), "n3": lagging}))

    assert report.ok, report.format()
    assert report.first_violation is None and report.violations == [] and report.violation_counts == {}
    c = report.counts
    assert (c.ops, c.ok, c.fail, c.unknown, c.never_completed, c.unknown_in_stream) == (34, 30, 1, 3, 1, 2)
    assert c.stream_length == 32
    assert c.final_reads == {"n1": 32, "n2": 32, "n3": 25}
    assert c.deliveries == 32 + 23
    assert c.subscribers == 2 and c.faults == 1
    assert "OK" in report.format()


def test_a_large_clean_history_passes(world):
    run_clean(world, 50_000, clients=4, window=8)
    world.subscribe("sub1", "n1")
    world.subscribe("sub2", "n2", from_seq=40_000)
    report = check(world.finish())
    assert report.ok, report.format()
    assert report.counts.ok == 50_000
    assert report.counts.stream_length == 50_000
    assert report.counts.deliveries == 50_000 + 10_001


def test_a_large_history_with_one_lost_write_names_it(world):
    run_clean(world, 50_000, clients=4, window=8)
    report = check(world.finish({node: world.records(last=49_999) for node in NODES}))
    assert names(report) == {"acked-write-kept": 1}
    assert report.first_violation.seqs == [50_000]
    assert report.first_violation.payloads == [world.stream[-1][2]]


# --- each invariant -----------------------------------------------------------------------


def test_1_a_delivery_with_another_payload_at_a_seq(world):
    run_clean(world, 6)
    world.rec.sub_connect("sub1", "n2", 1)
    world.deliver("sub1", "n2", 1, 2)
    world.rec.deliver("sub1", "n2", 3, *world.stream[3])  # seq 3 carrying seq 4's message
    world.deliver("sub1", "n2", 4, 6)
    report = check(world.finish())
    assert not report.ok
    assert names(report) == {"one-record-per-seq": 1}
    first = report.first_violation
    assert (first.invariant, first.seqs) == (1, [3])
    assert first.payloads == [world.stream[2][2], world.stream[3][2]]
    assert "sub1" in first.message and "final read of n1" in first.message


def test_1_an_acknowledged_seq_holding_another_payload(world):
    run_clean(world, 3)
    op = world.submit("c9")
    world.commit(op)
    world.rec.complete_ok(op, 2)  # acknowledged with the number of another message
    report = check(world.finish())
    assert report.first_violation.invariant == 1
    assert report.first_violation.seqs == [2]
    assert report.first_violation.payloads == [world.stream[1][2], world.payload(op)]
    renumbered = only(report, "acked-write-kept")
    assert len(renumbered) == 1 and renumbered[0].seqs == [2, 4]
    assert "renumbered" in renumbered[0].message


def test_1_a_delivered_message_missing_from_the_final_stream(world):
    run_clean(world, 4)
    op = world.submit("c1")
    world.commit(op)
    world.rec.complete_unknown(op, "deadline")
    world.subscribe("sub1", "n3")
    report = check(world.finish({node: world.records(last=4) for node in NODES}))
    assert names(report) == {"one-record-per-seq": 1}
    assert report.first_violation.seqs == [5]
    assert report.first_violation.payloads == [world.payload(op)]
    assert "vanished" in report.first_violation.message


def test_2_a_final_read_with_a_gap(world):
    run_clean(world, 5)
    holed = [r for r in world.records() if r[0] != 3]
    report = check(world.finish({"n1": world.records(), "n2": holed, "n3": world.records()}))
    assert set(names(report)) == {"final-reads-prefix"}
    first = report.first_violation
    assert first.invariant == 2
    assert first.seqs == [4]
    assert "n2" in first.message and "position 3" in first.message


def test_2_a_final_read_that_diverges_field_by_field(world):
    run_clean(world, 5)
    diverged = world.records()
    seq, session, client_seq, payload = diverged[3]
    diverged[3] = (seq, session, client_seq + 100, payload)  # same payload, another client_seq
    report = check(world.finish({"n1": world.records(), "n2": world.records(last=3), "n3": diverged}))
    prefix = only(report, "final-reads-prefix")
    assert len(prefix) == 1
    assert "n3" in prefix[0].message and "position 4" in prefix[0].message
    assert prefix[0].seqs == [4]
    assert report.first_violation.invariant == 1 and report.first_violation.seqs == [4]


def test_2_a_shorter_prefix_is_fine_but_a_longer_read_decides(world):
    run_clean(world, 5)
    # n1 lags; n3 holds the whole stream: the longest read is the reference, not the first.
    report = check(world.finish({"n1": world.records(last=2), "n2": world.records(last=4), "n3": world.records()}))
    assert report.ok, report.format()
    assert report.counts.stream_length == 5


@pytest.mark.parametrize(
    "runs, what",
    [(((1, 2), (4, 6)), "gap"), (((1, 3), (3, 6)), "duplicate")],
    ids=["a gap", "a duplicate"],
)
def test_3_a_gap_or_a_duplicate_in_a_subscription(world, runs, what):
    run_clean(world, 6)
    world.rec.sub_connect("sub1", "n1", 1)
    for first, last in runs:
        world.deliver("sub1", "n1", first, last)
    report = check(world.finish())
    assert names(report) == {"gapless-delivery": 1}
    assert report.first_violation.seqs == [3, 4]
    assert what in report.first_violation.message and "sub1" in report.first_violation.message


def test_3_a_reconnect_that_does_not_resume_at_last_plus_one(world):
    run_clean(world, 8)
    world.rec.sub_connect("sub1", "n1", 1)
    world.deliver("sub1", "n1", 1, 3)
    world.rec.sub_reconnect("sub1", "n2", 5)
    world.deliver("sub1", "n2", 5, 8)
    report = check(world.finish())
    assert names(report) == {"gapless-delivery": 1}
    assert report.first_violation.seqs == [4, 5]
    assert "reconnected to n2 from seq 5" in report.first_violation.message
    assert "expected from seq 4" in report.first_violation.message


def test_3_a_first_delivery_other_than_from_seq(world):
    run_clean(world, 8)
    world.rec.sub_connect("sub1", "n1", 3)
    world.deliver("sub1", "n1", 1, 8)
    report = check(world.finish())
    assert names(report) == {"gapless-delivery": 1}
    assert report.first_violation.seqs == [1, 3]


def test_4_a_payload_sequenced_twice(world):
    a = world.submit("c1")
    world.ok(a)
    world.ok(world.submit("c2"))
    world.commit(a)  # applied again at seq 3: dedup failed
    report = check(world.finish())
    assert report.first_violation.invariant == 4
    assert report.first_violation.seqs == [1, 3]
    assert report.first_violation.payloads == [world.payload(a)]
    assert set(names(report)) == {"payload-once", "session-order"}


def test_5_lost_acknowledged_writes(world):
    run_clean(world, 10)
    world.subscribe("sub1", "n1", last=8)
    report = check(world.finish({node: world.records(last=8) for node in NODES}))
    assert names(report) == {"acked-write-kept": 2}
    first = report.first_violation
    assert first.seqs == [9] and first.payloads == [world.stream[8][2]]
    assert "lost acknowledged write" in first.message and "ends at seq 8" in first.message


def test_5_is_not_checked_without_a_final_read(world):
    run_clean(world, 4)
    report = check(world.finish({}))
    assert report.ok
    assert any("no final read" in note for note in report.notes)


def test_6_a_message_nobody_submitted(world):
    run_clean(world, 5)
    ghost = (6, "s-ghost", 1, "ghost-000001")
    report = check(world.finish({node: [*world.records(), ghost] for node in NODES}))
    assert names(report) == {"submitted-only": 1}
    assert report.first_violation.seqs == [6] and report.first_violation.payloads == ["ghost-000001"]
    assert "no client submitted" in report.first_violation.message


def test_6_a_submitted_payload_under_another_session(world):
    run_clean(world, 3)
    op = world.submit("c1")
    world.rec.complete_unknown(op)
    session, client_seq, payload = world.message_of[op]
    forged = world.records() + [(4, "s-other", client_seq, payload)]
    report = check(world.finish({node: forged for node in NODES}))
    assert names(report) == {"submitted-only": 1}
    assert report.first_violation.seqs == [4]
    assert "s-other" in report.first_violation.message and session in report.first_violation.message


def test_7_an_op_acknowledged_before_another_was_invoked_has_the_higher_seq(world):
    a = world.submit("c1")
    world.rec.complete_ok(a, 2)
    b = world.submit("c2")
    world.rec.complete_ok(b, 1)
    world.stream = [world.message_of[b], world.message_of[a]]
    report = check(world.finish())
    assert names(report) == {"real-time-order": 1}
    assert report.first_violation.seqs == [1, 2]
    assert report.first_violation.payloads == [world.payload(a), world.payload(b)]


def test_7_applies_to_unknown_ops_found_in_the_stream(world):
    a = world.submit("c1")
    world.rec.complete_ok(a, 2)
    b = world.submit("c2")
    world.rec.complete_unknown(b, "deadline")
    world.stream = [world.message_of[b], world.message_of[a]]
    report = check(world.finish())
    assert names(report) == {"real-time-order": 1}
    assert report.first_violation.payloads == [world.payload(a), world.payload(b)]


def test_7_concurrent_ops_may_take_either_order(world):
    a = world.submit("c1")
    b = world.submit("c2")
    world.rec.complete_ok(a, 2)  # b was invoked before a completed: no real-time constraint
    world.rec.complete_ok(b, 1)
    world.stream = [world.message_of[b], world.message_of[a]]
    report = check(world.finish())
    assert report.ok, report.format()


def test_7_names_the_worst_earlier_op(world):
    run_clean(world, 3)
    a = world.submit("c1")
    world.rec.complete_ok(a, 5)
    b = world.submit("c2")
    world.rec.complete_ok(b, 4)
    world.stream += [world.message_of[b], world.message_of[a]]
    report = check(world.finish())
    assert names(report) == {"real-time-order": 1}
    assert report.first_violation.seqs == [4, 5]


def test_8_a_session_sequenced_out_of_client_seq_order(world):
    first = world.submit("c1")
    second = world.submit("c1")
    world.ok(second)
    world.ok(first)
    report = check(world.finish())
    assert names(report) == {"session-order": 1}
    assert report.first_violation.seqs == [1, 2]
    assert report.first_violation.payloads == [world.payload(second), world.payload(first)]
    assert "client_seq 1 is at seq 2, after client_seq 2 at seq 1" in report.first_violation.message


def test_9_a_failed_op_in_the_stream(world):
    run_clean(world, 3)
    op = world.submit("c1")
    world.commit(op)
    world.rec.complete_fail(op, "rejected: sequence_gap")
    report = check(world.finish())
    assert names(report) == {"failed-not-committed": 1}
    assert report.first_violation.seqs == [4] and report.first_violation.payloads == [world.payload(op)]
    assert "sequence_gap" in report.first_violation.message


# --- the report ---------------------------------------------------------------------------


def test_the_first_violation_is_the_lowest_invariant(world):
    run_clean(world, 2)
    failed = world.submit("c1")
    world.commit(failed)  # seq 3
    world.rec.complete_fail(failed, "rejected")  # invariant 9, at a lower seq and earlier
    lost = world.submit("c2")
    world.ok(lost)  # seq 4, then lost: invariant 5
    report = check(world.finish({node: world.records(last=3) for node in NODES}))
    assert names(report) == {"acked-write-kept": 1, "failed-not-committed": 1}
    assert report.first_violation is report.violations[0]
    assert (report.first_violation.invariant, report.first_violation.seqs) == (5, [4])
    assert [(v.invariant, v.seqs) for v in report.violations] == [(5, [4]), (9, [3])]


def test_violations_are_capped_and_counted(world):
    run_clean(world, 100)
    report = check(world.finish({node: [] for node in NODES}))
    assert names(report) == {"acked-write-kept": 100}
    assert len(report.violations) == checker.VIOLATIONS_PER_INVARIANT_MAX
    assert report.first_violation.seqs == [1]
    text = report.format()
    assert "FAILED" in text and "acked-write-kept: 100" in text


def test_availability_figures_around_faults(world):
    clock = world.clock

    def ok_at(s: float, invoked_s: float | None = None) -> None:
        clock.set_s(invoked_s if invoked_s is not None else s - 0.01)
        op = world.submit("c1")
        clock.set_s(s)
        world.ok(op)

    clock.set_s(0)
    world.rec.note("start")
    for i in range(1, 11):
        ok_at(i / 10)  # oks at 0.1 .. 1.0
    clock.set_s(1.05)
    kill = world.rec.fault_start("kill", node="n1", role="leader")
    clock.set_s(1.1)
    slow = world.submit("c2")  # invoked after the kill, completes last
    ok_at(1.8, invoked_s=1.5)
    clock.set_s(1.6)
    world.rec.fault_end(kill, restarted=True)
    clock.set_s(2.0)
    world.ok(slow)
    ok_at(2.1)
    clock.set_s(2.15)
    pause = world.rec.fault_start("pause", node="n2", role="follower")
    clock.set_s(2.2)
    world.rec.fault_end(pause)
    ok_at(2.3)
    clock.set_s(2.5)
    world.rec.fault_start("partition", node="n3")
    clock.set_s(3.0)
    world.rec.note("end")
    report = check(world.finish({}))
    kill_f, pause_f, partition_f = report.faults
    approx = lambda s: pytest.approx(s, abs=1e-5)  # noqa: E731
    assert (kill_f.name, kill_f.leader, kill_f.details) == ("kill", True, {"node": "n1", "role": "leader"})
    assert kill_f.start_s == approx(1.05) and kill_f.end_s == approx(1.6)
    assert kill_f.longest_ok_gap_s == approx(0.8)  # ok at 1.0, next at 1.8
    assert kill_f.recovery_s == approx(0.75)  # first ok of an op invoked after 1.05: at 1.8
    assert (pause_f.leader, pause_f.recovery_s) == (False, None)
    assert pause_f.longest_ok_gap_s == approx(0.2)  # 2.1 .. 2.3
    assert partition_f.end_s is None
    assert partition_f.longest_ok_gap_s == approx(0.7)  # 2.3 .. the end of the history at 3.0
    assert "leader recovery 0.750 s" in report.format()


def test_a_leader_fault_with_no_recovery(world):
    world.ok(world.submit("c1"))
    world.rec.fault_start("kill", node="n1", role="leader")
    world.submit("c1")
    report = check(world.finish({}))
    (figure,) = report.faults
    assert figure.leader and figure.recovery_s is None
    assert "no ok after it" in report.format()


# --- the format ---------------------------------------------------------------------------


def test_final_reads_are_split_into_parts_and_joined(world, monkeypatch):
    monkeypatch.setattr(history, "FINAL_READ_RECORDS_PER_LINE", 10)
    run_clean(world, 25)
    events = world.finish({"n1": world.records()})
    parts = [e for e in events if isinstance(e, history.FinalRead)]
    assert [(p.part, p.parts, len(p.records)) for p in parts] == [(0, 3, 10), (1, 3, 10), (2, 3, 5)]
    assert [r for p in parts for r in p.records] == world.records()
    report = check(events)
    assert report.ok and report.counts.stream_length == 25


def test_a_final_read_missing_a_part_is_an_unreadable_history(world, monkeypatch):
    monkeypatch.setattr(history, "FINAL_READ_RECORDS_PER_LINE", 10)
    run_clean(world, 25)
    events = [e for e in world.finish({"n1": world.records()}) if not (isinstance(e, history.FinalRead) and e.part == 2)]
    with pytest.raises(HistoryError, match="final read of n1 is incomplete: 2 of 3"):
        check(events)


def test_bytes_payloads_are_stored_losslessly(tmp_path):
    path = tmp_path / "h.jsonl"
    with HistoryRecorder(path) as rec:
        op = rec.invoke("c1", "s1", 1, b"\xff\x00ok")
        rec.complete_ok(op, 1)
        rec.final_read("n1", [(1, "s1", 1, b"\xff\x00ok")])
    invoke, _, read = load_history(path)
    assert invoke.payload == "\xff\x00ok" and invoke.payload.encode("latin-1") == b"\xff\x00ok"
    assert read.records == [(1, "s1", 1, "\xff\x00ok")]
    assert check([invoke, _, read]).ok


def test_every_line_is_one_event_in_time_order(tmp_path):
    path = tmp_path / "h.jsonl"
    with HistoryRecorder(path) as rec:
        op = rec.invoke("c1", "s1", 1, "c1-000001")
        rec.complete_ok(op, 1)
        rec.sub_connect("sub1", "n1", 1)
        rec.deliver("sub1", "n1", 1, "s1", 1, "c1-000001")
        rec.sub_reconnect("sub1", "n2", 2)
        fault = rec.fault_start("kill", node="n1", role="leader", seed=3)
        rec.fault_end(fault)
        rec.note("seed", seed=3)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["invoke", "complete", "sub_connect", "deliver", "sub_reconnect", "fault", "fault", "note"]
    assert lines[0] == {
        "kind": "invoke",
        "t": lines[0]["t"],
        "op": 1,
        "client": "c1",
        "session": "s1",
        "client_seq": 1,
        "payload": "c1-000001",
    }
    assert lines[5]["details"] == {"node": "n1", "role": "leader", "seed": 3}
    assert lines[6]["name"] == "kill" and lines[6]["phase"] == "end"
    times = [line["t"] for line in lines]
    assert times == sorted(times)


def test_the_recorder_is_safe_from_many_threads(tmp_path):
    path = tmp_path / "h.jsonl"
    rec = HistoryRecorder(path)

    def client(n: int) -> None:
        for client_seq in range(1, 2_001):
            op = rec.invoke(f"c{n}", f"s{n}", client_seq, f"c{n}-{client_seq:06d}")
            rec.complete_unknown(op, "test")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rec.close()
    events = load_history(path)
    ops = [e.op for e in events if isinstance(e, history.Invoke)]
    assert len(ops) == 16_000 and sorted(ops) == list(range(1, 16_001))
    assert [e.t for e in events] == sorted(e.t for e in events)
    assert check(events).counts.unknown == 16_000


def test_a_fault_that_is_not_in_progress_cannot_end(tmp_path):
    with HistoryRecorder(tmp_path / "h.jsonl") as rec:
        fault = rec.fault_start("pause")
        rec.fault_end(fault)
        with pytest.raises(ValueError, match="not in progress"):
            rec.fault_end(fault)


def test_a_closed_recorder_refuses_events(tmp_path):
    rec = HistoryRecorder(tmp_path / "h.jsonl")
    rec.close()
    with pytest.raises(RuntimeError, match="closed"):
        rec.note("late")


@pytest.mark.parametrize(
    "bad_line, detail",
    [
        ("{not json", "JSON is malformed"),
        ('{"kind":"complete","t":5,"op":1,"outcome":"ok"}', "an ok completion needs its seq"),
        ('{"kind":"complete","t":5,"op":1,"outcome":"maybe"}', "$.outcome"),
        ('{"kind":"telepathy","t":5}', "'telepathy'"),
        ('{"kind":"deliver","t":5,"sub":"s","node":"n1","seq":0,"session":"s","client_seq":1,"payload":"p"}', "$.seq"),
        ('{"kind":"invoke","t":5,"op":1,"client":"c1","session":"s1","client_seq":1,"payl', "truncated"),
    ],
)
def test_a_malformed_line_is_named_by_its_number(tmp_path, bad_line, detail):
    path = tmp_path / "h.jsonl"
    with HistoryRecorder(path) as rec:
        rec.note("one")
        rec.note("two")
    with open(path, "a") as file:
        file.write(bad_line)  # the last line, as a test process killed mid-write leaves it
    with pytest.raises(HistoryError, match=r"h\.jsonl:3: not a valid history event") as caught:
        load_history(path)
    assert detail in str(caught.value)


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda rec: rec.complete_ok(7, 1), "op 7 completes before it is invoked"),
        (lambda rec: [rec.complete_ok(rec.invoke("c", "s", 1, "p"), 1) for _ in range(2)], "invoked twice"),
        (lambda rec: rec.deliver("sub1", "n1", 1, "s", 1, "p"), "before its sub_connect"),
    ],
)
def test_a_history_that_makes_no_sense_is_refused(tmp_path, make, error):
    path = tmp_path / "h.jsonl"
    with HistoryRecorder(path) as rec:
        make(rec)
    with pytest.raises(HistoryError, match=error):
        check(load_history(path))


def test_an_op_completing_twice_is_refused(tmp_path):
    path = tmp_path / "h.jsonl"
    with HistoryRecorder(path) as rec:
        op = rec.invoke("c", "s", 1, "p")
        rec.complete_unknown(op)
        rec.complete_ok(op, 1)
    with pytest.raises(HistoryError, match=f"op {op} completes twice"):
        check(load_history(path))


# --- the command --------------------------------------------------------------------------


def test_the_command_exits_0_1_2(world, tmp_path, capsys):
    run_clean(world, 5)
    world.finish()
    assert main([str(world.path)]) == 0
    assert "OK" in capsys.readouterr().out

    broken = World(tmp_path / "broken.jsonl")
    run_clean(broken, 5)
    broken.finish({node: broken.records(last=3) for node in NODES})
    assert main([str(broken.path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["first_violation"]["name"] == "acked-write-kept"
    assert report["first_violation"]["seqs"] == [4]
    assert report["violation_counts"] == {"acked-write-kept": 2}

    torn = tmp_path / "torn.jsonl"
    torn.write_text(world.path.read_text() + '{"kind":"note","t":1')
    assert main([str(torn)]) == 2
    assert "torn.jsonl:" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.jsonl")]) == 2


# --- power cuts: an expected loss in the "crash" durability ---------------------------------


def _lose_after_power_cut(world: World, durability: str | None) -> None:
    """10 acknowledged; a power cut of every node loses 7..10 (the final reads end at 6)."""
    if durability is not None:
        world.rec.note("scenario", scenario="power-all", durability=durability)
    run_clean(world, 10)
    fault = world.rec.fault_start("power_cut", nodes=list(NODES))
    world.rec.fault_end(fault)
    world.stream = world.stream[:6]


@pytest.mark.parametrize("durability", ["crash", None])
def test_a_power_cut_in_crash_durability_reports_the_loss_and_passes(world, durability):
    _lose_after_power_cut(world, durability)
    report = check(world.finish())
    assert report.ok and report.loss_expected
    assert report.excused_counts == {"acked-write-kept": 4}
    assert (report.loss.lost, report.loss.renumbered, report.loss.ranges) == (4, 0, ["7..10"])
    assert "EXPECTED LOSS" in report.format() and "4 acknowledged lost" in report.format()


def test_a_power_cut_in_power_durability_fails_on_the_loss(world):
    _lose_after_power_cut(world, "power")
    report = check(world.finish())
    assert not report.ok and not report.loss_expected
    assert names(report) == {"acked-write-kept": 4}
    assert report.loss.acked_lost == 4 and "loss: 4 acknowledged lost" in report.format()


def test_a_power_cut_excuses_only_what_follows_from_the_loss(world):
    _lose_after_power_cut(world, "crash")
    op = world.submit("c1")
    world.commit(op)
    world.rec.complete_fail(op, "rejected: sequence_gap")
    report = check(world.finish())
    assert not report.ok
    assert names(report) == {"failed-not-committed": 1}
    # The new seq 7 holds another message than the acknowledged one: excused too.
    assert report.excused_counts == {"one-record-per-seq": 1, "acked-write-kept": 4}


def test_a_kill_is_never_an_expected_loss(world):
    world.rec.note("scenario", scenario="kill-all", durability="crash")
    run_clean(world, 10)
    fault = world.rec.fault_start("kill", nodes=list(NODES))
    world.rec.fault_end(fault)
    world.stream = world.stream[:6]
    report = check(world.finish())
    assert not report.ok and not report.loss_expected and names(report) == {"acked-write-kept": 4}
