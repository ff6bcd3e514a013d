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
from dataclasses import dataclass, field
from typing import Any

import msgspec

from chaos_tests.history import (
    AnyEvent,
    Complete,
    Deliver,
    Fault,
    FinalRead,
    HistoryError,
    Invoke,
    Note,
    Record,
    SubConnect,
    SubReconnect,
    load_history,
)

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
#: The fault whose loss is expected in the "crash" durability mode.
POWER_CUT_FAULT = "power_cut"
NS_PER_S = 1_000_000_000

#: ``(session, client_seq, payload)``: what a seq maps to.
Message = tuple[str, int, str]


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


# --- the history, indexed -----------------------------------------------------------------


@dataclass
class _Op:
    invoke: Invoke
    complete: Complete | None = None

    @property
    def outcome(self) -> str:
        return self.complete.outcome if self.complete is not None else "unknown"

    def __str__(self) -> str:
        i = self.invoke
        return f"op {i.op} ({i.client}, session {i.session}, client_seq {i.client_seq}, payload {i.payload!r})"


@dataclass
class _Indexed:
    ops: dict[int, _Op] = field(default_factory=dict)
    op_of_payload: dict[str, _Op] = field(default_factory=dict)
    #: Per subscriber, its connects, reconnects and deliveries in file order.
    subscriptions: dict[str, list[SubConnect | SubReconnect | Deliver]] = field(default_factory=dict)
    final_reads: dict[str, list[Record]] = field(default_factory=dict)
    faults: list[tuple[Fault, Fault | None]] = field(default_factory=list)
    t_first: int = 0
    t_last: int = 0


def _index(events: Iterable[AnyEvent]) -> _Indexed:
    """Group the events; raises ``HistoryError`` on a history that makes no sense."""
    h = _Indexed()
    read_parts: dict[str, int] = {}
    expected_parts: dict[str, int] = {}
    fault_at: dict[int, int] = {}
    first = True
    for event in events:
        if first:
            h.t_first = event.t
            first = False
        h.t_last = max(h.t_last, event.t)
        kind = type(event)
        if kind is Invoke:
            if event.op in h.ops:
                raise HistoryError(f"op {event.op} is invoked twice")
            if event.payload in h.op_of_payload:
                raise HistoryError(
                    f"payload {event.payload!r} is invoked twice (ops {h.op_of_payload[event.payload].invoke.op} and {event.op}); payloads must be unique"
                )
            h.ops[event.op] = h.op_of_payload[event.payload] = _Op(event)
        elif kind is Complete:
            op = h.ops.get(event.op)
            if op is None:
                raise HistoryError(f"op {event.op} completes before it is invoked")
            if op.complete is not None:
                raise HistoryError(f"op {event.op} completes twice")
            op.complete = event
        elif kind is Deliver or kind is SubReconnect:
            if event.sub not in h.subscriptions:
                raise HistoryError(
                    f"subscriber {event.sub!r} has a {'delivery' if kind is Deliver else 'reconnect'} before its sub_connect"
                )
            h.subscriptions[event.sub].append(event)
        elif kind is SubConnect:
            h.subscriptions.setdefault(event.sub, []).append(event)
        elif kind is FinalRead:
            done = read_parts.get(event.node, 0)
            if event.part != done or expected_parts.setdefault(event.node, event.parts) != event.parts:
                raise HistoryError(
                    f"final read of {event.node}: part {event.part} of {event.parts} where part {done} of {expected_parts[event.node]} was due"
                )
            read_parts[event.node] = done + 1
            h.final_reads.setdefault(event.node, []).extend(event.records)
        elif kind is Fault:
            if event.phase == "start":
                if event.fault in fault_at:
                    raise HistoryError(f"fault {event.fault} starts twice")
                fault_at[event.fault] = len(h.faults)
                h.faults.append((event, None))
            else:
                index = fault_at.get(event.fault)
                if index is None or h.faults[index][1] is not None:
                    raise HistoryError(f"fault {event.fault} ends without being in progress")
                h.faults[index] = (h.faults[index][0], event)
    for node, done in read_parts.items():
        if done != expected_parts[node]:
            raise HistoryError(f"final read of {node} is incomplete: {done} of {expected_parts[node]} parts")
    return h


def _seconds(ns: int) -> float:
    return ns / NS_PER_S


# --- the checks ---------------------------------------------------------------------------


class _Checker:
    def __init__(self, h: _Indexed) -> None:
        self.h = h
        self.reference_node: str | None = None
        longest: list[Record] = []
        for node, records in h.final_reads.items():
            if self.reference_node is None or len(records) > len(longest):
                self.reference_node, longest = node, records
        self.longest = longest
        # The stream (seq -> message) and where each message was seen first.
        self.stream: dict[int, Message] = {}
        self.source_of: dict[int, tuple] = {}
        if self.reference_node is not None:
            reference = ("final", self.reference_node)
            for seq, session, client_seq, payload in longest:
                if seq not in self.stream:
                    self.stream[seq] = (session, client_seq, payload)
                    self.source_of[seq] = reference
        else:
            for seq, message, source in self._observations():
                if seq not in self.stream:
                    self.stream[seq] = message
                    self.source_of[seq] = source
            self.stream = dict(sorted(self.stream.items()))
        #: Where each payload first is in the stream.
        self.seq_of_payload: dict[str, int] = {}
        for seq, (_, _, payload) in self.stream.items():
            self.seq_of_payload.setdefault(payload, seq)

    def _where(self, source: tuple) -> str:
        kind = source[0]
        if kind == "final":
            return f"the final read of {source[1]}"
        if kind == "delivery":
            return f"the delivery to {source[1]} from {source[2]}"
        return f"the ack of {self.h.ops[source[1]]}"

    def _observations(self) -> Iterator[tuple[int, Message, tuple]]:
        """Every (seq, message, source) the history saw besides the reference final read."""
        for node, records in self.h.final_reads.items():
            if node != self.reference_node:
                source = ("final", node)
                for seq, session, client_seq, payload in records:
                    yield seq, (session, client_seq, payload), source
        for sub, events in self.h.subscriptions.items():
            for e in events:
                if type(e) is Deliver:
                    yield e.seq, (e.session, e.client_seq, e.payload), ("delivery", sub, e.node)
        for op in self.h.ops.values():
            if op.outcome == "ok":
                i = op.invoke
                yield op.complete.seq, (i.session, i.client_seq, i.payload), ("ack", i.op)

    def one_record_per_seq(self) -> Iterator[Violation]:
        reported: set[tuple[int, Message]] = set()
        for seq, message, source in self._observations():
            known = self.stream.get(seq)
            if known == message or (seq, message) in reported:
                continue
            if known is None:
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
                reported.add((seq, message))
                text = f"seq {seq} is {_show(known)} in {self._where(self.source_of[seq])} but {_show(message)} in {self._where(source)}"
                yield self._violation(1, text, [seq], [known[2], message[2]])

    def final_reads_prefix(self) -> Iterator[Violation]:
        longest = self.longest
        for node, records in self.h.final_reads.items():
            for position, record in enumerate(records, start=1):
                if record[0] != position:
                    after = f"after seq {records[position - 2][0]}" if position > 1 else "first"
                    yield self._violation(
                        2,
                        f"the final read of {node} is not contiguous from 1: seq {record[0]} comes {after}, at position {position}",
                        [record[0]],
                        [record[3]],
                    )
                    break
            if node != self.reference_node and records != longest[: len(records)]:
                at = next(i for i, (a, b) in enumerate(zip(records, longest)) if a != b)
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
        for seq, (_, _, payload) in self.stream.items():
            first = self.seq_of_payload[payload]
            if first != seq:
                yield self._violation(
                    4,
                    f"payload {payload!r} is in the stream twice, at seq {first} and seq {seq}{self._of_op(payload)}",
                    [first, seq],
                    [payload],
                )

    def acked_write_kept(self) -> Iterator[Violation]:
        if self.reference_node is None:
            return
        for op in self.h.ops.values():
            if op.outcome != "ok":
                continue
            seq, payload = op.complete.seq, op.invoke.payload
            message = self.stream.get(seq)
            if message is not None and message[2] == payload:
                continue
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
        for seq, (session, client_seq, payload) in self.stream.items():
            op = self.h.op_of_payload.get(payload)
            if op is None:
                yield self._violation(
                    6, f"seq {seq} holds {_show((session, client_seq, payload))}, which no client submitted", [seq], [payload]
                )
            elif (op.invoke.session, op.invoke.client_seq) != (session, client_seq):
                yield self._violation(
                    6, f"seq {seq} holds {_show((session, client_seq, payload))}, but that payload was submitted as {op}", [seq], [payload]
                )

    def real_time_order(self) -> Iterator[Violation]:
        completed = sorted(
            ((op.complete.t, op.complete.seq, op) for op in self.h.ops.values() if op.outcome == "ok"), key=lambda item: item[:2]
        )
        later: list[tuple[int, int, _Op]] = []
        for op in self.h.ops.values():
            if op.outcome == "ok":
                later.append((op.invoke.t, op.complete.seq, op))
            elif op.outcome == "unknown" and op.invoke.payload in self.seq_of_payload:
                later.append((op.invoke.t, self.seq_of_payload[op.invoke.payload], op))
        later.sort(key=lambda item: item[0])
        done = 0
        highest: tuple[int, int, _Op] | None = None  # the op with the highest seq completed so far
        for invoked_t, seq, op in later:
            while done < len(completed) and completed[done][0] < invoked_t:
                if highest is None or completed[done][1] > highest[1]:
                    highest = completed[done]
                done += 1
            if highest is not None and highest[1] >= seq:
                a_t, a_seq, a = highest
                t0 = self.h.t_first
                text = (
                    f"{a} completed ok as seq {a_seq} at {_seconds(a_t - t0):.6f} s, before {op} was invoked at "
                    f"{_seconds(invoked_t - t0):.6f} s, yet the later op has the lower or equal seq {seq}"
                )
                yield self._violation(7, text, [a_seq, seq], [a.invoke.payload, op.invoke.payload])

    def session_order(self) -> Iterator[Violation]:
        highest: dict[str, tuple[int, int]] = {}  # session -> (client_seq, seq), highest client_seq so far
        for seq, (session, client_seq, payload) in self.stream.items():
            top = highest.get(session)
            if top is None or client_seq > top[0]:
                highest[session] = (client_seq, seq)
                continue
            top_client_seq, top_seq = top
            if client_seq == top_client_seq:
                what = f"client_seq {client_seq} is sequenced twice, at seq {top_seq} and seq {seq}"
            else:
                what = f"client_seq {client_seq} is at seq {seq}, after client_seq {top_client_seq} at seq {top_seq}"
            yield self._violation(8, f"session {session}: {what}", [top_seq, seq], [self.stream[top_seq][2], payload])

    def failed_not_committed(self) -> Iterator[Violation]:
        for op in self.h.ops.values():
            if op.outcome == "fail":
                seq = self.seq_of_payload.get(op.invoke.payload)
                if seq is not None:
                    yield self._violation(
                        9,
                        f"{op} failed ({op.complete.reason or 'no reason given'}) but is in the stream at seq {seq}",
                        [seq],
                        [op.invoke.payload],
                    )

    def _of_op(self, payload: str) -> str:
        op = self.h.op_of_payload.get(payload)
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


def _fault_figures(h: _Indexed) -> list[FaultFigure]:
    oks = sorted(op.complete.t for op in h.ops.values() if op.outcome == "ok")
    marks = [h.t_first, *oks, h.t_last]
    gaps = [b - a for a, b in zip(marks, marks[1:])]  # gaps[i] is marks[i] .. marks[i + 1]
    # For leader recovery: ok ops by invoke time, and the earliest completion from each on.
    by_invoke = sorted((op.invoke.t, op.complete.t) for op in h.ops.values() if op.outcome == "ok")
    invoke_times = [invoked for invoked, _ in by_invoke]
    earliest_from = [0] * len(by_invoke)
    running = None
    for i in range(len(by_invoke) - 1, -1, -1):
        running = by_invoke[i][1] if running is None else min(running, by_invoke[i][1])
        earliest_from[i] = running
    figures = []
    for start, end in h.faults:
        start_t, end_t = start.t, end.t if end is not None else h.t_last
        # Gaps overlapping [start_t, end_t]: from the last mark at or before start_t up to the
        # last mark before end_t.
        first_gap = max(0, bisect.bisect_right(marks, start_t) - 1)
        last_gap = max(first_gap, min(len(gaps) - 1, bisect.bisect_left(marks, end_t) - 1))
        longest = max(gaps[first_gap : last_gap + 1], default=0)
        recovery = None
        if start.hit_leader:
            i = bisect.bisect_left(invoke_times, start_t)
            if i < len(by_invoke):
                recovery = _seconds(earliest_from[i] - start_t)
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


def loss_expected(events: Sequence[AnyEvent]) -> bool:
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
    """Check a loaded history (``load_history``). Raises ``HistoryError`` on a history that
    makes no sense (an op completing twice, a payload invoked twice, a final read missing a
    part, …). Where a loss is expected (``loss_expected``), violations of ``LOSS_INVARIANTS``
    are counted as excused and the loss is reported; every other invariant must still hold."""
    events = list(events)
    expected = loss_expected(events)
    h = _index(events)
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
    notes = [
        f"{e.fields.get('node')} can no longer serve seqs {e.fields.get('first')}..{e.fields.get('last')} (skipped by its final read)"
        for e in events
        if type(e) is Note and e.text == "unservable"
    ]
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


def _loss(h: _Indexed, checker: _Checker) -> Loss:
    """The acknowledged ops not at their acknowledged seq of the final stream (none without a
    final read: nothing to compare with)."""
    loss = Loss()
    if checker.reference_node is None:
        return loss
    seqs = []
    for op in h.ops.values():
        if op.outcome != "ok":
            continue
        message = checker.stream.get(op.complete.seq)
        if message is not None and message[2] == op.invoke.payload:
            continue
        seqs.append(op.complete.seq)
        if op.invoke.payload in checker.seq_of_payload:
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


def _counts(h: _Indexed, checker: _Checker) -> Counts:
    c = Counts(ops=len(h.ops), subscribers=len(h.subscriptions), faults=len(h.faults))
    for op in h.ops.values():
        outcome = op.outcome
        if outcome == "ok":
            c.ok += 1
        elif outcome == "fail":
            c.fail += 1
        else:
            c.unknown += 1
            c.never_completed += op.complete is None
            c.unknown_in_stream += op.invoke.payload in checker.seq_of_payload
    c.deliveries = sum(type(e) is Deliver for events in h.subscriptions.values() for e in events)
    c.final_reads = {node: len(records) for node, records in h.final_reads.items()}
    c.stream_length = len(checker.stream)
    return c


def check_file(path: str) -> Report:
    return check(load_history(path))


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
