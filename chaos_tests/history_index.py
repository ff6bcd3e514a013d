"""A chaos history indexed for the checker, in compact columns.

An hour of the ops soak is ~18M ops, ~36M deliveries and ~54M final-read records: kept as one
Python object each they need more memory than the box has. Here every op is one row of
``array`` columns (its payload string is the only object it owns), and a delivery or a final-read
record is a seq plus a *message ref*: the row of the op whose invoke has exactly its
``(session, client_seq, payload)``. A message that matches no invoke exactly (an unknown payload,
another session or client_seq) is kept in full and gets a negative ref, so the checks see it as
it was recorded. Names (clients, sessions, nodes, subscribers) are stored once each.

The containers read like what they replace: ``Ops`` maps op id → ``OpView`` (``.invoke``,
``.complete``, ``.outcome``), ``Records`` is a sequence of ``(seq, session, client_seq,
payload)``, ``Subscription`` yields the subscriber's ``SubConnect``/``SubReconnect``/``Deliver``
events in file order. The hot loops of the checker read the columns directly.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy

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
)

#: ``(session, client_seq, payload)``: what a seq maps to.
Message = tuple[str, int, str]

#: Op outcomes as stored in ``Ops.outcome`` (``PENDING``: no ``complete`` yet).
PENDING, OK, FAIL, UNKNOWN = 0, 1, 2, 3
_OUTCOME_CODE = {"ok": OK, "fail": FAIL, "unknown": UNKNOWN}
_OUTCOME_NAME = {PENDING: "unknown", OK: "ok", FAIL: "fail", UNKNOWN: "unknown"}
#: Column types: a name's number (``Names``); a message ref (``Messages``); a node's number
#: among a subscriber's deliveries. Appending a value out of range raises ``OverflowError``.
NAME = "i"
REF = "i"
#: The fault whose loss is expected in the "crash" durability mode.
POWER_CUT_FAULT = "power_cut"


def column(values: array) -> numpy.ndarray:
    """A read-only numpy view of an ``array`` column (no copy)."""
    if not len(values):
        return numpy.zeros(0, dtype=values.typecode)
    return numpy.frombuffer(values, dtype=values.typecode)


#: Indices handed from numpy to Python loops this many at a time: Python ints cost ~40 bytes
#: each, so a whole column's worth (18M ops) would be ~700 MB at once.
INDICES_PER_CHUNK = 1 << 16


def indices(positions: numpy.ndarray) -> Iterator[int]:
    """The values of an index array as Python ints, converted a chunk at a time."""
    for start in range(0, len(positions), INDICES_PER_CHUNK):
        yield from positions[start : start + INDICES_PER_CHUNK].tolist()


class Names:
    """Each distinct name once: name ↔ small int."""

    def __init__(self) -> None:
        self._number: dict[str, int] = {}
        self.names: list[str] = []

    def number(self, name: str) -> int:
        number = self._number.get(name)
        if number is None:
            number = self._number[name] = len(self.names)
            self.names.append(name)
        return number


class Positions:
    """Integer keys (op ids, seqs) → positions 0, 1, 2, … in the order added.

    Keys 1, 2, 3, … added in that order (what the recorder's op ids and a healthy stream are)
    cost nothing; from the first other key on, keys go to a dict.
    """

    def __init__(self) -> None:
        self.count = 0
        self._dense = 0  # keys 1..dense are at positions 0..dense-1
        self._sparse: dict[int, int] = {}
        self._sparse_keys: dict[int, int] = {}  # position -> key, for the others

    def get(self, key: int) -> int | None:
        if 1 <= key <= self._dense:
            return key - 1
        return self._sparse.get(key)

    def add(self, key: int) -> int:
        """The position of a new `key` (the caller checks it is new)."""
        position = self.count
        self.count += 1
        if self._dense == position and key == position + 1:
            self._dense += 1
        else:
            self._sparse[key] = position
            self._sparse_keys[position] = key
        return position

    def add_dense(self, count: int) -> None:
        """Add keys 1..`count` to an empty ``Positions``."""
        assert self.count == 0, "add_dense on a non-empty Positions"
        self.count = self._dense = count

    def key(self, position: int) -> int:
        return position + 1 if position < self._dense else self._sparse_keys[position]


class OpView:
    """One op, read from the columns: what ``check`` used to keep as an object per op."""

    __slots__ = ("_ops", "row")

    def __init__(self, ops: Ops, row: int) -> None:
        self._ops, self.row = ops, row

    @property
    def invoke(self) -> Invoke:
        o, i = self._ops, self.row
        return Invoke(o.invoke_t[i], o.op_id(i), o.names.names[o.client[i]], o.session_name(i), o.client_seq[i], o.payload[i])

    @property
    def complete(self) -> Complete | None:
        o, i = self._ops, self.row
        code = o.outcome[i]
        if code == PENDING:
            return None
        return Complete(o.complete_t[i], o.op_id(i), _OUTCOME_NAME[code], o.seq[i], o.reasons.get(i, ""))

    @property
    def outcome(self) -> str:
        return _OUTCOME_NAME[self._ops.outcome[self.row]]

    def __str__(self) -> str:
        o, i = self._ops, self.row
        return f"op {o.op_id(i)} ({o.names.names[o.client[i]]}, session {o.session_name(i)}, client_seq {o.client_seq[i]}, payload {o.payload[i]!r})"


class Ops:
    """Every op, one row each in invoke order; a mapping op id → ``OpView``."""

    def __init__(self, names: Names) -> None:
        self.names = names
        self._rows = Positions()
        self.client = array(NAME)
        self.session = array(NAME)
        self.client_seq = array("q")
        self.payload: list[str] = []
        self.invoke_t = array("q")
        self.outcome = array("b")
        self.complete_t = array("q")
        #: The acknowledged seq of an ``ok`` op, 0 otherwise.
        self.seq = array("q")
        #: Completion reasons that are not "" (failures and unknowns are few).
        self.reasons: dict[int, str] = {}
        self.row_of_payload: dict[str, int] = {}

    def __len__(self) -> int:
        return self._rows.count

    def op_id(self, row: int) -> int:
        return self._rows.key(row)

    def __contains__(self, op_id: int) -> bool:
        return self._rows.get(op_id) is not None

    def __getitem__(self, op_id: int) -> OpView:
        row = self._rows.get(op_id)
        if row is None:
            raise KeyError(op_id)
        return OpView(self, row)

    def values(self) -> Iterator[OpView]:
        return (OpView(self, row) for row in range(len(self)))

    def by_payload(self, payload: str) -> OpView | None:
        row = self.row_of_payload.get(payload)
        return OpView(self, row) if row is not None else None

    def session_name(self, row: int) -> str:
        return self.names.names[self.session[row]]

    def message(self, row: int) -> Message:
        return (self.session_name(row), self.client_seq[row], self.payload[row])

    def invoked(self, e: Invoke) -> None:
        if e.op in self:
            raise HistoryError(f"op {e.op} is invoked twice")
        if e.payload in self.row_of_payload:
            first = self.op_id(self.row_of_payload[e.payload])
            raise HistoryError(f"payload {e.payload!r} is invoked twice (ops {first} and {e.op}); payloads must be unique")
        row = self._rows.add(e.op)
        self.row_of_payload[e.payload] = row
        self.client.append(self.names.number(e.client))
        self.session.append(self.names.number(e.session))
        self.client_seq.append(e.client_seq)
        self.payload.append(e.payload)
        self.invoke_t.append(e.t)
        self.outcome.append(PENDING)
        self.complete_t.append(0)
        self.seq.append(0)

    def completed(self, e: Complete) -> None:
        row = self._rows.get(e.op)
        if row is None:
            raise HistoryError(f"op {e.op} completes before it is invoked")
        if self.outcome[row] != PENDING:
            raise HistoryError(f"op {e.op} completes twice")
        self.outcome[row] = _OUTCOME_CODE[e.outcome]
        self.complete_t[row] = e.t
        self.seq[row] = e.seq
        if e.reason:
            self.reasons[row] = e.reason

    def rows(self, *outcomes: int) -> numpy.ndarray:
        """The rows with one of `outcomes`, in invoke order."""
        return numpy.flatnonzero(numpy.isin(column(self.outcome), outcomes))


class Messages:
    """Message refs: an op's row (≥ 0) for a message that is exactly its invoke's, or -1, -2, …
    for one kept in full."""

    def __init__(self, ops: Ops) -> None:
        self.ops = ops
        self.full: list[Message] = []

    def ref(self, session: str, client_seq: int, payload: str) -> int:
        ops = self.ops
        row = ops.row_of_payload.get(payload)
        if row is not None and ops.client_seq[row] == client_seq and ops.session_name(row) == session:
            return row
        self.full.append((session, client_seq, payload))
        return -len(self.full)

    def message(self, ref: int) -> Message:
        return self.ops.message(ref) if ref >= 0 else self.full[-ref - 1]

    def payload(self, ref: int) -> str:
        return self.ops.payload[ref] if ref >= 0 else self.full[-ref - 1][2]

    def same(self, a: int, b: int) -> bool:
        """Whether refs `a` and `b` are the same message."""
        if a == b:
            return True
        if a >= 0 and b >= 0:
            return False  # two ops: payloads are unique
        # One kept in full may still equal an op's (recorded before that op's invoke).
        return self.message(a) == self.message(b)


class Records:
    """A final read (or the stream): a sequence of ``(seq, session, client_seq, payload)``."""

    def __init__(self, messages: Messages) -> None:
        self.messages = messages
        self.seqs = array("q")
        self.refs = array(REF)

    def append(self, seq: int, ref: int) -> None:
        self.seqs.append(seq)
        self.refs.append(ref)

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, position: int) -> Record:
        return (self.seqs[position], *self.messages.message(self.refs[position]))

    def __iter__(self) -> Iterator[Record]:
        message = self.messages.message
        for seq, ref in zip(self.seqs, self.refs):
            yield (seq, *message(ref))

    def first_difference(self, other: Records) -> int | None:
        """The first position where this and `other` differ, over this one's length (``None``:
        this is a prefix of `other`)."""
        n = len(self)
        if n > len(other):
            return len(other)
        seqs, refs = column(self.seqs), column(self.refs)
        differs = (seqs != column(other.seqs)[:n]) | (refs != column(other.refs)[:n])
        for position in indices(numpy.flatnonzero(differs)):
            if seqs[position] != other.seqs[position] or not self.messages.same(self.refs[position], other.refs[position]):
                return position
        return None


class Stream(Records):
    """The stream: seq → message, in the order built, each seq once."""

    def __init__(self, messages: Messages) -> None:
        super().__init__(messages)
        self._positions = Positions()

    @classmethod
    def of(cls, records: Records) -> Stream:
        """The stream of a final read: each seq at its first place. A read that is exactly seqs
        1, 2, 3, … (a healthy one) is shared, not copied."""
        stream = cls(records.messages)
        seqs = column(records.seqs)
        if numpy.array_equal(seqs, numpy.arange(1, len(seqs) + 1)):
            stream.seqs, stream.refs = records.seqs, records.refs
            stream._positions.add_dense(len(seqs))
        else:
            for seq, ref in zip(records.seqs, records.refs):
                stream.add(seq, ref)
        return stream

    def add(self, seq: int, ref: int) -> None:
        """Map `seq` to `ref` unless it is already mapped."""
        if self._positions.get(seq) is None:
            self._positions.add(seq)
            self.append(seq, ref)

    def ref(self, seq: int) -> int | None:
        position = self._positions.get(seq)
        return self.refs[position] if position is not None else None

    def get(self, seq: int) -> Message | None:
        ref = self.ref(seq)
        return self.messages.message(ref) if ref is not None else None

    def __getitem__(self, seq: int) -> Message:  # type: ignore[override]
        message = self.get(seq)
        if message is None:
            raise KeyError(seq)
        return message

    def items(self) -> Iterator[tuple[int, Message]]:
        message = self.messages.message
        for seq, ref in zip(self.seqs, self.refs):
            yield seq, message(ref)

    def sorted(self) -> Stream:
        """The same stream by seq."""
        ordered = Stream(self.messages)
        for position in indices(numpy.argsort(column(self.seqs), kind="stable")):
            ordered.add(self.seqs[position], self.refs[position])
        return ordered


class PayloadSeqs:
    """Where each payload first is in the stream: one column over the ops' payloads, a dict for
    the others."""

    def __init__(self, messages: Messages) -> None:
        self.messages = messages
        self.of_row = array("q", bytes(array("q").itemsize * len(messages.ops)))  # 0: not in the stream
        self._others: dict[str, int] = {}

    def setdefault(self, ref: int, seq: int) -> None:
        row = ref
        if ref < 0:
            payload = self.messages.payload(ref)
            row = self.messages.ops.row_of_payload.get(payload, -1)
            if row < 0:
                self._others.setdefault(payload, seq)
                return
        if not self.of_row[row]:
            self.of_row[row] = seq

    def get(self, payload: str) -> int | None:
        row = self.messages.ops.row_of_payload.get(payload)
        if row is None:
            return self._others.get(payload)
        return self.of_row[row] or None

    def of_ref(self, ref: int) -> int:
        """The first seq of the payload of `ref` (it is in the stream)."""
        return self.of_row[ref] if ref >= 0 else self.get(self.messages.payload(ref))

    def __contains__(self, payload: str) -> bool:
        return self.get(payload) is not None

    def __getitem__(self, payload: str) -> int:
        seq = self.get(payload)
        if seq is None:
            raise KeyError(payload)
        return seq


class Subscription:
    """One subscriber's connects, reconnects and deliveries, in file order."""

    def __init__(self, sub: str, names: Names, messages: Messages) -> None:
        self.sub, self.names, self.messages = sub, names, messages
        self.seqs = array("q")
        self.refs = array(REF)
        self.nodes = array(NAME)
        self.t = array("q")
        #: ``(deliveries before it, event)``
        self.connects: list[tuple[int, SubConnect | SubReconnect]] = []

    def add(self, e: Deliver | SubConnect | SubReconnect) -> None:
        if type(e) is Deliver:
            self.seqs.append(e.seq)
            self.refs.append(self.messages.ref(e.session, e.client_seq, e.payload))
            self.nodes.append(self.names.number(e.node))
            self.t.append(e.t)
        else:
            self.connects.append((len(self.seqs), e))

    @property
    def deliveries(self) -> int:
        return len(self.seqs)

    def delivered(self) -> Iterator[tuple[int, int, str]]:
        """``(seq, ref, node)`` of each delivery."""
        names = self.names.names
        for seq, ref, node in zip(self.seqs, self.refs, self.nodes):
            yield seq, ref, names[node]

    def __iter__(self) -> Iterator[SubConnect | SubReconnect | Deliver]:
        names, message = self.names.names, self.messages.message
        done = 0
        for before, connect in [*self.connects, (len(self.seqs), None)]:
            for i in range(done, before):
                yield Deliver(self.t[i], self.sub, names[self.nodes[i]], self.seqs[i], *message(self.refs[i]))
            done = before
            if connect is not None:
                yield connect


@dataclass
class Indexed:
    names: Names = field(default_factory=Names)
    ops: Ops = None  # type: ignore[assignment]
    messages: Messages = None  # type: ignore[assignment]
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    final_reads: dict[str, Records] = field(default_factory=dict)
    faults: list[tuple[Fault, Fault | None]] = field(default_factory=list)
    t_first: int = 0
    t_last: int = 0
    #: What the ``unservable`` notes say, in file order.
    unservable: list[str] = field(default_factory=list)
    #: A power cut of nodes whose durability is "crash" (see ``checker.loss_expected``).
    loss_expected: bool = False

    def __post_init__(self) -> None:
        self.ops = Ops(self.names)
        self.messages = Messages(self.ops)


def index(events: Iterable[AnyEvent]) -> Indexed:
    """Group the events in one pass; raises ``HistoryError`` on a history that makes no sense."""
    h = Indexed()
    ops, messages = h.ops, h.messages
    read_parts: dict[str, int] = {}
    expected_parts: dict[str, int] = {}
    fault_at: dict[int, int] = {}
    durability = "crash"
    power_cut = False
    first = True
    for event in events:
        if first:
            h.t_first = event.t
            first = False
        h.t_last = max(h.t_last, event.t)
        kind = type(event)
        if kind is Invoke:
            ops.invoked(event)
        elif kind is Complete:
            ops.completed(event)
        elif kind is Deliver or kind is SubReconnect:
            if event.sub not in h.subscriptions:
                raise HistoryError(
                    f"subscriber {event.sub!r} has a {'delivery' if kind is Deliver else 'reconnect'} before its sub_connect"
                )
            h.subscriptions[event.sub].add(event)
        elif kind is SubConnect:
            h.subscriptions.setdefault(event.sub, Subscription(event.sub, h.names, messages)).add(event)
        elif kind is FinalRead:
            done = read_parts.get(event.node, 0)
            if event.part != done or expected_parts.setdefault(event.node, event.parts) != event.parts:
                raise HistoryError(
                    f"final read of {event.node}: part {event.part} of {event.parts} where part {done} of {expected_parts[event.node]} was due"
                )
            read_parts[event.node] = done + 1
            records = h.final_reads.setdefault(event.node, Records(messages))
            for seq, session, client_seq, payload in event.records:
                records.append(seq, messages.ref(session, client_seq, payload))
        elif kind is Fault:
            power_cut = power_cut or event.name == POWER_CUT_FAULT
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
        elif kind is Note:
            if event.text == "scenario":
                durability = event.fields.get("durability") or "crash"
            elif event.text == "unservable":
                f = event.fields
                h.unservable.append(
                    f"{f.get('node')} can no longer serve seqs {f.get('first')}..{f.get('last')} (skipped by its final read)"
                )
    for node, done in read_parts.items():
        if done != expected_parts[node]:
            raise HistoryError(f"final read of {node} is incomplete: {done} of {expected_parts[node]} parts")
    h.loss_expected = power_cut and durability == "crash"
    return h
