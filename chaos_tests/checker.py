"""Checks a chaos history (``chaos_tests.history``) against the guarantees of DESIGN.md section 1.

``check(events)`` returns a ``Report``: the first violated invariant, up to
``VIOLATIONS_PER_INVARIANT_MAX`` violations of each (with how many there were in all), counts,
and availability figures around each fault. Invariants are checked in their number order and
each one's violations in the order found (mostly by seq), so "first" means the lowest-numbered
invariant violated, at its first place.

*The stream* is the longest final read (ties: the first in the file), the authoritative record
of what was committed. A history without final reads falls back to what deliveries and acks
saw, and invariants 2 and 5 are then not checked (the report says so).

1. ``one-record-per-seq``: a seq maps to one ``(session, client_seq, payload)`` across acks
   (record of the invoke), deliveries and final reads; a delivered seq that the stream lacks
   counts too (it mapped to a message, and then to nothing).
2. ``final-reads-prefix``: every final read holds seqs 1, 2, 3, … with no gap, and is a prefix of
   the longest one, field for field.
3. ``gapless-delivery``: per subscriber, the first delivery after ``sub_connect`` is its
   ``from_seq``; each next delivery is last + 1; ``sub_reconnect`` asks for last + 1 (or the
   original ``from_seq`` before any delivery).
4. ``payload-once``: no payload is at two seqs of the stream.
5. ``acked-write-kept``: every ``ok`` op's payload is at exactly its acknowledged seq of the
   stream: missing is a lost acknowledged write, elsewhere is a renumbered one.
6. ``submitted-only``: every record of the stream has the payload of an invoke, with that
   invoke's session and client_seq.
7. ``real-time-order``: if op A completed ``ok`` before op B was invoked (by ``t``), then
   seq(A) < seq(B); B is any op with a known seq (its ack, or for ``unknown`` its place in the
   stream).
8. ``session-order``: within a session, along the stream, client_seq rises strictly (higher
   client_seq ⇒ higher seq; one client_seq at most once).
9. ``failed-not-committed``: no ``fail`` op's payload is in the stream.

Availability, per fault (``fault`` start..end; a fault never ended lasts to the last event):
``longest_ok_gap_s`` is the longest interval between consecutive ``ok`` completions that
overlaps the window, the first and last event of the history counting as completions (so an
outage that never healed shows up whole). For a fault with ``details["role"] == "leader"``,
``recovery_s`` is the time from its start to the first ``ok`` completion of an op invoked at or
after that start (``None``: there was none). Times in reports are seconds since the first event.

``python -m chaos_tests.checker HISTORY.jsonl [--json]`` prints the report; exit status 0 when
every invariant holds, 1 on a violation, 2 when the history cannot be read or makes no sense.
"""

from __future__ import annotations

import argparse
import bisect
import sys
from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat
from typing import Any

import msgspec
import numpy

from chaos_tests.history import (
    AnyEvent,
    Fault,
    HistoryError,
    Note,
    Record,
    SubConnect,
    SubReconnect,
    iter_history,
)
from chaos_tests.history_index import (
    FAIL,
    OK,
    PENDING,
    POWER_CUT_FAULT,
    UNKNOWN,
    Indexed,
    Message,
    OpView,
    PayloadSeqs,
    Records,
    Stream,
    INDICES_PER_CHUNK,
    column,
    index,
    indices,
)

#: Op rows in numpy arrays (fewer than 2**31 ops: ``Ops`` refs are int32 too).
ROW = numpy.int32

INVARIANTS = {
    1: "one-record-per-seq",
    2: "final-reads-prefix",
    3: "gapless-delivery",
    4: "payload-once",
    5: "acked-write-kept",
    6: "submitted-only",
    7: "real-time-order",
    8: "session-order",
    9: "failed-not-committed",
}
VIOLATIONS_PER_INVARIANT_MAX = 20
#: What losing acknowledged messages breaks as a consequence: excused (and reported as the loss)
#: where a loss is expected — a power cut of nodes whose durability is "crash".
LOSS_INVARIANTS = (1, 2, 3, 5, 7)
#: Ranges of lost acknowledged seqs shown in a report.
LOSS_RANGES_SHOWN_MAX = 20
NS_PER_S = 1_000_000_000


class Violation(msgspec.Struct, frozen=True):
    invariant: int
    name: str
    message: str
    seqs: list[int]
    payloads: list[str]

    def __str__(self) -> str:
        return f"[{self.invariant} {self.name}] {self.message}"


class FaultFigure(msgspec.Struct, frozen=True):
    fault: int
    name: str
    details: dict[str, Any]
    start_s: float
    #: ``None``: the fault never ended in the history.
    end_s: float | None
    longest_ok_gap_s: float
    leader: bool
    #: Leader faults only: start → first ok of an op invoked at or after it; ``None`` if none.
    recovery_s: float | None = None


class Counts(msgspec.Struct):
    ops: int = 0
    ok: int = 0
    fail: int = 0
    #: ``unknown`` outcomes plus ops that never completed.
    unknown: int = 0
    never_completed: int = 0
    unknown_in_stream: int = 0
    deliveries: int = 0
    subscribers: int = 0
    #: Records per node's final read.
    final_reads: dict[str, int] = {}
    stream_length: int = 0
    faults: int = 0


class Loss(msgspec.Struct):
    """Acknowledged messages not at their acknowledged seq in the final stream."""

    #: Not in the stream at all.
    lost: int = 0
    #: In the stream, at another seq.
    renumbered: int = 0
    #: Their acknowledged seqs as ``first..last`` ranges (at most ``LOSS_RANGES_SHOWN_MAX``).
    ranges: list[str] = []
    ranges_total: int = 0

    @property
    def acked_lost(self) -> int:
        return self.lost + self.renumbered

    def format(self) -> str:
        more = f" (and {self.ranges_total - len(self.ranges)} more ranges)" if self.ranges_total > len(self.ranges) else ""
        return f"{self.acked_lost} acknowledged lost ({self.lost} missing, {self.renumbered} renumbered), acknowledged as seqs {', '.join(self.ranges)}{more}"


class Report(msgspec.Struct):
    ok: bool
    first_violation: Violation | None
    #: At most ``VIOLATIONS_PER_INVARIANT_MAX`` per invariant, by invariant number.
    violations: list[Violation]
    #: All violations found, by invariant name.
    violation_counts: dict[str, int]
    counts: Counts
    faults: list[FaultFigure]
    notes: list[str]
    #: Acknowledged messages lost or renumbered (none: an empty ``Loss``).
    loss: Loss = msgspec.field(default_factory=Loss)
    #: A loss is expected: the history has a power cut of nodes in the "crash" durability mode.
    #: Violations of ``LOSS_INVARIANTS`` are then counted here, not failed.
    loss_expected: bool = False
    excused_counts: dict[str, int] = {}

    def format(self) -> str:
        c = self.counts
        lines = []
        if self.ok and self.excused_counts:
            total = sum(self.excused_counts.values())
            lines.append(f"history check: OK with the EXPECTED LOSS of a power cut in crash durability: {self.loss.format()}")
            counts = ", ".join(f"{name}: {n}" for name, n in self.excused_counts.items())
            lines.append(f"  {total} violation(s) that follow from the loss excused ({counts}); every other invariant holds")
        elif self.ok:
            lines.append("history check: OK, every invariant holds")
        else:
            total = sum(self.violation_counts.values())
            lines.append(f"history check: FAILED, {total} violation(s) of {len(self.violation_counts)} invariant(s)")
            lines.append(f"first violation: {self.first_violation}")
            counts = ", ".join(f"{name}: {n}" for name, n in self.violation_counts.items())
            lines.append(f"violations ({counts}; at most {VIOLATIONS_PER_INVARIANT_MAX} of each shown):")
            lines += [f"  {violation}" for violation in self.violations]
        lines.append(
            f"ops: {c.ops} invoked, {c.ok} ok, {c.fail} fail, {c.unknown} unknown ({c.never_completed} never completed, {c.unknown_in_stream} of the unknown in the stream)"
        )
        lines.append(f"deliveries: {c.deliveries} to {c.subscribers} subscriber(s)")
        reads = ", ".join(f"{node} {n}" for node, n in c.final_reads.items()) or "none"
        lines.append(f"final reads: {reads}; stream length {c.stream_length}")
        for f in self.faults:
            end = f"{f.end_s:.3f} s" if f.end_s is not None else "never ended"
            details = " ".join(f"{k}={v}" for k, v in f.details.items())
            line = f"fault {f.fault} {f.name} ({details}) {f.start_s:.3f} s .. {end}: longest gap between oks {f.longest_ok_gap_s:.3f} s"
            if f.leader:
                line += f", leader recovery {f.recovery_s:.3f} s" if f.recovery_s is not None else ", leader recovery: no ok after it"
            lines.append(line)
        if self.loss.acked_lost and not (self.ok and self.excused_counts):
            lines.append(f"loss: {self.loss.format()}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _seconds(ns: int) -> float:
    return ns / NS_PER_S


# --- the checks ---------------------------------------------------------------------------


class _Checker:
    def __init__(self, h: Indexed) -> None:
        self.h = h
        self.messages = h.messages
        self.reference_node: str | None = None
        longest: Records = Records(h.messages)
        for node, records in h.final_reads.items():
            if self.reference_node is None or len(records) > len(longest):
                self.reference_node, longest = node, records
        self.longest = longest
        # The stream (seq -> message) and where each message was seen first.
        self.stream = Stream(h.messages)
        self.source_of: dict[int, tuple] = {}
        if self.reference_node is not None:
            self.stream = Stream.of(longest)
        else:
            for seq, ref, source in self._observations():
                if self.stream.ref(seq) is None:
                    self.stream.add(seq, ref)
                    self.source_of[seq] = source
            self.stream = self.stream.sorted()
        #: Where each payload first is in the stream.
        self.seq_of_payload = PayloadSeqs(h.messages)
        for seq, ref in zip(self.stream.seqs, self.stream.refs):
            self.seq_of_payload.setdefault(ref, seq)

    def _source(self, seq: int) -> tuple:
        """Where the stream's message at `seq` was seen first."""
        return self.source_of[seq] if self.reference_node is None else ("final", self.reference_node)

    def _where(self, source: tuple) -> str:
        kind = source[0]
        if kind == "final":
            return f"the final read of {source[1]}"
        if kind == "delivery":
            return f"the delivery to {source[1]} from {source[2]}"
        return f"the ack of {self.h.ops[source[1]]}"

    def _observations(self) -> Iterator[tuple[int, int, tuple]]:
        """Every (seq, message ref, source) the history saw besides the reference final read."""
        for node, records in self.h.final_reads.items():
            if node != self.reference_node:
                yield from zip(records.seqs, records.refs, repeat(("final", node)))
        for sub, subscription in self.h.subscriptions.items():
            sources: dict[str, tuple] = {}
            for seq, ref, node in subscription.delivered():
                source = sources.get(node)
                if source is None:
                    source = sources[node] = ("delivery", sub, node)
                yield seq, ref, source
        ops = self.h.ops
        for row in indices(ops.rows(OK)):
            yield ops.seq[row], row, ("ack", ops.op_id(row))

    def one_record_per_seq(self) -> Iterator[Violation]:
        reported: set[tuple[int, Message]] = set()
        for seq, ref, source in self._observations():
            known_ref = self.stream.ref(seq)
            if known_ref is not None and self.messages.same(known_ref, ref):
                continue
            message = self.messages.message(ref)
            if (seq, message) in reported:
                continue
            if known_ref is None:
                # Only with a final read (otherwise every observation is in the stream). An
                # acknowledged seq missing from it is invariant 5's lost write.
                if source[0] == "delivery":
                    reported.add((seq, message))
                    text = (
                        f"seq {seq} is {_show(message)} in {self._where(source)} but is not in the final stream "
                        f"(the final read of {self.reference_node}, {len(self.longest)} records): a delivered message vanished"
                    )
                    yield self._violation(1, text, [seq], [message[2]])
            else:
                known = self.messages.message(known_ref)
                reported.add((seq, message))
                text = f"seq {seq} is {_show(known)} in {self._where(self._source(seq))} but {_show(message)} in {self._where(source)}"
                yield self._violation(1, text, [seq], [known[2], message[2]])

    def final_reads_prefix(self) -> Iterator[Violation]:
        longest = self.longest
        for node, records in self.h.final_reads.items():
            seqs = column(records.seqs)
            out_of_place = numpy.flatnonzero(seqs != numpy.arange(1, len(seqs) + 1))
            if len(out_of_place):
                position = int(out_of_place[0]) + 1
                record = records[position - 1]
                after = f"after seq {records[position - 2][0]}" if position > 1 else "first"
                yield self._violation(
                    2,
                    f"the final read of {node} is not contiguous from 1: seq {record[0]} comes {after}, at position {position}",
                    [record[0]],
                    [record[3]],
                )
            at = records.first_difference(longest) if node != self.reference_node else None
            if at is not None:
                mine, theirs = records[at], longest[at]
                text = (
                    f"the final read of {node} ({len(records)} records) is not a prefix of the longest, {self.reference_node}'s "
                    f"({len(longest)} records): at position {at + 1} {node} has {_show_record(mine)}, {self.reference_node} has {_show_record(theirs)}"
                )
                yield self._violation(2, text, [mine[0], theirs[0]], [mine[3], theirs[3]])

    def gapless_delivery(self) -> Iterator[Violation]:
        for sub, events in self.h.subscriptions.items():
            expected = 0
            last = 0
            for e in events:
                kind = type(e)
                if kind is SubConnect:
                    expected, last = e.from_seq, 0
                elif kind is SubReconnect:
                    if e.from_seq != expected:
                        after = f"after delivering seq {last}" if last else "before any delivery"
                        yield self._violation(
                            3,
                            f"subscriber {sub} reconnected to {e.node} from seq {e.from_seq} {after}: expected from seq {expected}",
                            [e.from_seq, expected],
                            [],
                        )
                    expected = e.from_seq
                else:
                    if e.seq != expected:
                        if e.seq < expected:
                            what = (
                                f"a duplicate or a step back: seq {e.seq} after {last}"
                                if last
                                else f"seq {e.seq} although it asked for {expected}"
                            )
                        else:
                            what = (
                                f"a gap: seq {e.seq} after {last}, {_seqs(expected, e.seq - 1)} skipped"
                                if last
                                else f"seq {e.seq} first although it asked from {expected}"
                            )
                        yield self._violation(
                            3, f"subscriber {sub} got {what} (from {e.node}, payload {e.payload!r})", [e.seq, expected], [e.payload]
                        )
                    last = e.seq
                    expected = e.seq + 1

    def payload_once(self) -> Iterator[Violation]:
        for seq, ref in zip(self.stream.seqs, self.stream.refs):
            first = self.seq_of_payload.of_ref(ref)
            if first != seq:
                payload = self.messages.payload(ref)
                yield self._violation(
                    4,
                    f"payload {payload!r} is in the stream twice, at seq {first} and seq {seq}{self._of_op(payload)}",
                    [first, seq],
                    [payload],
                )

    def _acked_not_kept(self) -> Iterator[tuple[int, int, str]]:
        """``(row, seq, payload)`` of each ``ok`` op whose payload is not at its acknowledged seq
        of the stream."""
        ops, stream = self.h.ops, self.stream
        for row in indices(ops.rows(OK)):
            seq, payload = ops.seq[row], ops.payload[row]
            known = stream.ref(seq)
            if known is None or (known != row and self.messages.payload(known) != payload):
                yield row, seq, payload

    def acked_write_kept(self) -> Iterator[Violation]:
        if self.reference_node is None:
            return
        for row, seq, payload in self._acked_not_kept():
            op = OpView(self.h.ops, row)
            message = self.stream.get(seq)
            found = self.seq_of_payload.get(payload)
            there = f"seq {seq} holds {message[2]!r}" if message is not None else f"the stream ends at seq {len(self.longest)}"
            if found is None:
                yield self._violation(
                    5,
                    f"lost acknowledged write: {op} was acknowledged as seq {seq} and is not in the final stream ({there})",
                    [seq],
                    [payload],
                )
            else:
                yield self._violation(
                    5,
                    f"renumbered acknowledged write: {op} was acknowledged as seq {seq} but is at seq {found} in the final stream ({there})",
                    [seq, found],
                    [payload],
                )

    def submitted_only(self) -> Iterator[Violation]:
        # A ref >= 0 is exactly an invoke's message: only messages kept in full can fail.
        for position in indices(numpy.flatnonzero(column(self.stream.refs) < 0)):
            seq = self.stream.seqs[position]
            session, client_seq, payload = self.messages.message(self.stream.refs[position])
            op = self.h.ops.by_payload(payload)
            if op is None:
                yield self._violation(
                    6, f"seq {seq} holds {_show((session, client_seq, payload))}, which no client submitted", [seq], [payload]
                )
            elif (op.invoke.session, op.invoke.client_seq) != (session, client_seq):
                yield self._violation(
                    6, f"seq {seq} holds {_show((session, client_seq, payload))}, but that payload was submitted as {op}", [seq], [payload]
                )

    def real_time_order(self) -> Iterator[Violation]:
        ops = self.h.ops
        completed, highest = self._completed_by_time()
        later = self._later_by_invoke()
        if not len(completed) or not len(later):
            return
        completed_t = column(ops.complete_t)[completed]
        t0 = self.h.t_first
        # A chunk of later ops at a time, so the temporaries stay small.
        for start in range(0, len(later), INDICES_PER_CHUNK):
            part = later[start : start + INDICES_PER_CHUNK]
            # For each later op, the completed op with the highest seq among those that completed
            # (strictly) before it was invoked: the first `done` completed.
            done = numpy.searchsorted(completed_t, column(ops.invoke_t)[part], side="left")
            a_rows = completed[highest[numpy.maximum(done - 1, 0)]]
            seqs = self._known_seq(part)
            for i in indices(numpy.flatnonzero((done > 0) & (column(ops.seq)[a_rows] >= seqs))):
                a, op = OpView(ops, int(a_rows[i])), OpView(ops, int(part[i]))
                a_t, a_seq, invoked_t, seq = ops.complete_t[a.row], ops.seq[a.row], ops.invoke_t[op.row], int(seqs[i])
                text = (
                    f"{a} completed ok as seq {a_seq} at {_seconds(a_t - t0):.6f} s, before {op} was invoked at "
                    f"{_seconds(invoked_t - t0):.6f} s, yet the later op has the lower or equal seq {seq}"
                )
                yield self._violation(7, text, [a_seq, seq], [a.invoke.payload, op.invoke.payload])

    def _completed_by_time(self) -> tuple[numpy.ndarray, numpy.ndarray]:
        """The ok ops' rows by completion (t, seq), ties in invoke order; and for each k, the
        index among them of the op with the highest seq of the first k + 1 (the earliest on ties)."""
        ops = self.h.ops
        ok = ops.rows(OK)
        completed = ok[numpy.lexsort((column(ops.seq)[ok], column(ops.complete_t)[ok]))]
        del ok
        seqs = column(ops.seq)[completed]
        rising = numpy.ones(len(seqs), dtype=bool)
        rising[1:] = seqs[1:] > numpy.maximum.accumulate(seqs)[:-1]
        del seqs
        highest = numpy.maximum.accumulate(numpy.where(rising, numpy.arange(len(rising), dtype=ROW), 0))
        return completed.astype(ROW), highest

    def _known_seq(self, rows: numpy.ndarray | slice = slice(None)) -> numpy.ndarray:
        """Per op row (all by default): its acknowledged seq (ok), its first seq in the stream
        (unknown), or 0."""
        outcome = column(self.h.ops.outcome)[rows]
        in_stream = column(self.seq_of_payload.of_row)[rows]
        return numpy.where(outcome == OK, column(self.h.ops.seq)[rows], numpy.where(outcome == FAIL, 0, in_stream))

    def _later_by_invoke(self) -> numpy.ndarray:
        """The rows of the ops with a known seq, by invoke time (ties in invoke order)."""
        ops = self.h.ops
        later = numpy.flatnonzero(self._known_seq()).astype(ROW)
        return later[numpy.argsort(column(ops.invoke_t)[later], kind="stable")]

    def session_order(self) -> Iterator[Violation]:
        highest: dict[str, tuple[int, int]] = {}  # session -> (client_seq, seq), highest client_seq so far
        ops, full = self.h.ops, self.messages.full
        names, op_session, op_client_seq = ops.names.names, ops.session, ops.client_seq
        for seq, ref in zip(self.stream.seqs, self.stream.refs):
            if ref >= 0:
                session, client_seq = names[op_session[ref]], op_client_seq[ref]
            else:
                session, client_seq, _ = full[-ref - 1]
            top = highest.get(session)
            if top is None or client_seq > top[0]:
                highest[session] = (client_seq, seq)
                continue
            top_client_seq, top_seq = top
            if client_seq == top_client_seq:
                what = f"client_seq {client_seq} is sequenced twice, at seq {top_seq} and seq {seq}"
            else:
                what = f"client_seq {client_seq} is at seq {seq}, after client_seq {top_client_seq} at seq {top_seq}"
            yield self._violation(8, f"session {session}: {what}", [top_seq, seq], [self.stream[top_seq][2], self.messages.payload(ref)])

    def failed_not_committed(self) -> Iterator[Violation]:
        for row in indices(self.h.ops.rows(FAIL)):
            seq = self.seq_of_payload.of_row[row]
            if seq:
                op = OpView(self.h.ops, row)
                yield self._violation(
                    9,
                    f"{op} failed ({op.complete.reason or 'no reason given'}) but is in the stream at seq {seq}",
                    [seq],
                    [op.invoke.payload],
                )

    def _of_op(self, payload: str) -> str:
        op = self.h.ops.by_payload(payload)
        return f" (submitted by {op})" if op is not None else ""

    @staticmethod
    def _violation(invariant: int, message: str, seqs: list[int], payloads: list[str]) -> Violation:
        return Violation(invariant, INVARIANTS[invariant], message, sorted(set(seqs)), payloads)

    def all_invariants(self) -> list[Iterator[Violation]]:
        """The checks, in invariant order."""
        return [
            self.one_record_per_seq(),
            self.final_reads_prefix(),
            self.gapless_delivery(),
            self.payload_once(),
            self.acked_write_kept(),
            self.submitted_only(),
            self.real_time_order(),
            self.session_order(),
            self.failed_not_committed(),
        ]


def _show(message: Message) -> str:
    session, client_seq, payload = message
    return f"{payload!r} (session {session}, client_seq {client_seq})"


def _seqs(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seqs {first}..{last}"


def _show_record(record: Record) -> str:
    return f"seq {record[0]} = {_show(record[1:])}"


# --- availability -------------------------------------------------------------------------


def _fault_figures(h: Indexed) -> list[FaultFigure]:
    ops = h.ops
    ok = ops.rows(OK).astype(ROW)
    complete_t = column(ops.complete_t)[ok]
    marks = numpy.empty(len(ok) + 2, dtype=numpy.int64)
    marks[0], marks[1:-1], marks[-1] = h.t_first, complete_t, h.t_last
    marks[1:-1].sort()
    gaps = numpy.diff(marks)  # gaps[i] is marks[i] .. marks[i + 1]
    # For leader recovery: ok ops by invoke time, and the earliest completion from each on.
    order = numpy.lexsort((complete_t, column(ops.invoke_t)[ok]))
    invoke_times = column(ops.invoke_t)[ok[order]]
    del ok
    earliest_from = numpy.minimum.accumulate(complete_t[order][::-1])[::-1]
    del order, complete_t
    figures = []
    for start, end in h.faults:
        start_t, end_t = start.t, end.t if end is not None else h.t_last
        # Gaps overlapping [start_t, end_t]: from the last mark at or before start_t up to the
        # last mark before end_t.
        first_gap = max(0, bisect.bisect_right(marks, start_t) - 1)
        last_gap = max(first_gap, min(len(gaps) - 1, bisect.bisect_left(marks, end_t) - 1))
        longest = int(gaps[first_gap : last_gap + 1].max(initial=0))
        recovery = None
        if start.hit_leader:
            i = bisect.bisect_left(invoke_times, start_t)
            if i < len(invoke_times):
                recovery = _seconds(int(earliest_from[i]) - start_t)
        figures.append(
            FaultFigure(
                start.fault,
                start.name,
                start.details,
                _seconds(start_t - h.t_first),
                _seconds(end_t - h.t_first) if end is not None else None,
                _seconds(longest),
                start.hit_leader,
                recovery,
            )
        )
    return figures


# --- entry points -------------------------------------------------------------------------


def loss_expected(events: Iterable[AnyEvent]) -> bool:
    """Whether the history has a power cut of nodes whose durability is "crash": the
    ``scenario`` note's ``durability`` field ("crash" when absent) and a ``power_cut`` fault."""
    durability = "crash"
    power_cut = False
    for event in events:
        if type(event) is Note and event.text == "scenario":
            durability = event.fields.get("durability") or "crash"
        elif type(event) is Fault and event.name == POWER_CUT_FAULT:
            power_cut = True
    return power_cut and durability == "crash"


def check(events: Iterable[AnyEvent]) -> Report:
    """Check a history: a loaded one (``load_history``) or one read as it streams
    (``iter_history``), in one pass. Raises ``HistoryError`` on a history that makes no sense
    (an op completing twice, a payload invoked twice, a final read missing a part, …). Where a
    loss is expected (``loss_expected``), violations of ``LOSS_INVARIANTS`` are counted as
    excused and the loss is reported; every other invariant must still hold."""
    h = index(events)
    expected = h.loss_expected
    checker = _Checker(h)
    shown: list[Violation] = []
    counts: dict[str, int] = {}
    excused: dict[str, int] = {}
    for violations in checker.all_invariants():
        for violation in violations:
            if expected and violation.invariant in LOSS_INVARIANTS:
                excused[violation.name] = excused.get(violation.name, 0) + 1
                continue
            counts[violation.name] = counts.get(violation.name, 0) + 1
            if counts[violation.name] <= VIOLATIONS_PER_INVARIANT_MAX:
                shown.append(violation)
    notes = list(h.unservable)
    if checker.reference_node is None:
        notes.append("no final read: the stream is what deliveries and acks saw; final-reads-prefix and acked-write-kept were not checked")
    return Report(
        ok=not shown,
        first_violation=shown[0] if shown else None,
        violations=shown,
        violation_counts=counts,
        counts=_counts(h, checker),
        faults=_fault_figures(h),
        notes=notes,
        loss=_loss(h, checker),
        loss_expected=expected,
        excused_counts=excused,
    )


def _loss(h: Indexed, checker: _Checker) -> Loss:
    """The acknowledged ops not at their acknowledged seq of the final stream (none without a
    final read: nothing to compare with)."""
    loss = Loss()
    if checker.reference_node is None:
        return loss
    seqs = []
    for _, seq, payload in checker._acked_not_kept():
        seqs.append(seq)
        if payload in checker.seq_of_payload:
            loss.renumbered += 1
        else:
            loss.lost += 1
    ranges: list[list[int]] = []
    for seq in sorted(seqs):
        if ranges and seq <= ranges[-1][1] + 1:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    loss.ranges_total = len(ranges)
    loss.ranges = [str(first) if first == last else f"{first}..{last}" for first, last in ranges[:LOSS_RANGES_SHOWN_MAX]]
    return loss


def _counts(h: Indexed, checker: _Checker) -> Counts:
    ops = h.ops
    c = Counts(ops=len(ops), subscribers=len(h.subscriptions), faults=len(h.faults))
    outcome = column(ops.outcome)
    c.ok = int(numpy.count_nonzero(outcome == OK))
    c.fail = int(numpy.count_nonzero(outcome == FAIL))
    unknown = (outcome == UNKNOWN) | (outcome == PENDING)
    c.unknown = int(numpy.count_nonzero(unknown))
    c.never_completed = int(numpy.count_nonzero(outcome == PENDING))
    c.unknown_in_stream = int(numpy.count_nonzero(unknown & (column(checker.seq_of_payload.of_row) != 0)))
    c.deliveries = sum(subscription.deliveries for subscription in h.subscriptions.values())
    c.final_reads = {node: len(records) for node, records in h.final_reads.items()}
    c.stream_length = len(checker.stream)
    return c


def check_file(path: str) -> Report:
    """Check the history file at `path`, reading it as it streams."""
    return check(iter_history(path))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chaos_tests.checker", description="Check a chaos history against the guarantees of DESIGN.md section 1."
    )
    parser.add_argument("history", help="the history file (JSON lines, chaos_tests.history)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = check_file(args.history)
    except HistoryError as exc:
        print(f"unreadable history: {exc}", file=sys.stderr)
        return 2
    print(msgspec.json.encode(report).decode() if args.json else report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
