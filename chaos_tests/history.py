"""The history of a chaos run: what every client, subscriber and the nemesis saw, in one file.

One JSON object per line, written by ``HistoryRecorder`` and read back by ``iter_history`` (as it
streams) or ``load_history`` (a list).
Every event carries ``kind`` (its tag, first) and ``t``: ``time.monotonic_ns()`` of the test
process when the recorder took the event. One recorder, one clock, so the lines are in ``t``
order and ``t`` is comparable across clients, subscribers and the nemesis.

Events and their fields (``HistoryRecorder`` has one method per kind, three for ``complete``:
``complete_ok``, ``complete_fail``, ``complete_unknown``):

``invoke``        ``op`` (int ≥ 1, assigned by the recorder), ``client`` (e.g. ``"c2"``),
                  ``session``, ``client_seq``, ``payload`` — a submit starts. Record it *before*
                  the submit is sent: a late invoke stamp can make the real-time check raise a
                  false alarm (a late completion stamp only makes the check weaker).
``complete``      ``op``, ``outcome`` (``"ok"`` | ``"fail"`` | ``"unknown"``), ``seq`` (≥ 1 with
                  ``ok``, 0 otherwise), ``reason`` (why it failed or is unknown; may be "").
                  ``fail`` is a *definite* failure (e.g. ``Rejected``): the message must not be
                  in the stream. ``unknown`` (deadline, leader lost, client closed in flight) may
                  or may not be. An op with no ``complete`` counts as unknown.
``deliver``       ``sub`` (subscriber id), ``node`` (the endpoint it is connected to), ``seq``,
                  ``session``, ``client_seq``, ``payload`` — one message reached a subscriber.
``sub_connect``   ``sub``, ``node``, ``from_seq`` — a subscription starts (any ``from_seq``).
``sub_reconnect`` ``sub``, ``node``, ``from_seq`` — it resumes after a lost connection;
                  ``from_seq`` must be the last delivered seq + 1.
``fault``         ``fault`` (int ≥ 1, assigned by ``fault_start``), ``name``, ``phase``
                  (``"start"`` | ``"end"``), ``details`` (a JSON object: node, seed, …). By
                  convention ``details["role"] == "leader"`` marks a fault that hit the node
                  the nemesis knew as leader when it struck (kill, pause, partition alike);
                  the checker measures leader recovery for those.
``final_read``    ``node``, ``part``, ``parts``, ``records`` — a full read of one node's stream
                  after healing, split into ``parts`` lines of at most
                  ``FINAL_READ_RECORDS_PER_LINE`` records, ``part`` 0, 1, … in order. Each
                  record is ``[seq, session, client_seq, payload]``.
``note``          ``text``, ``fields`` (a JSON object) — anything else: seed, config.

Payloads are text. The workload's payloads are unique ASCII strings (``c2-000123``); a payload
given as ``bytes`` is stored as latin-1 text, which is the same string for ASCII and lossless
for any bytes. Payloads must be unique per history: the library retries a submit under its
``client_seq``, the workload never resubmits a payload as a new op.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, Literal, Union

import msgspec

#: Records per ``final_read`` line: keeps each line near 0.5 MB at the workload's payload size.
FINAL_READ_RECORDS_PER_LINE = 10_000
#: The recorder's write buffer. Lines reach the file when it fills, on ``flush`` and on ``close``.
WRITE_BUFFER_BYTES = 1 << 16

Outcome = Literal["ok", "fail", "unknown"]
Phase = Literal["start", "end"]
Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
#: ``(seq, session, client_seq, payload)``
Record = tuple[Positive, str, Positive, str]


class HistoryError(ValueError):
    """A history that cannot be read or makes no sense (not a violation of the guarantees)."""


class Event(msgspec.Struct, frozen=True, tag_field="kind", gc=False):
    t: NonNegative


class Invoke(Event, tag="invoke"):
    op: Positive
    client: str
    session: str
    client_seq: Positive
    payload: str


class Complete(Event, tag="complete"):
    op: Positive
    outcome: Outcome
    seq: NonNegative = 0
    reason: str = ""

    def __post_init__(self) -> None:
        if self.outcome == "ok" and self.seq < 1:
            raise ValueError("an ok completion needs its seq (>= 1)")
        if self.outcome != "ok" and self.seq != 0:
            raise ValueError(f"a {self.outcome} completion has no seq")


class Deliver(Event, tag="deliver"):
    sub: str
    node: str
    seq: Positive
    session: str
    client_seq: Positive
    payload: str


class SubConnect(Event, tag="sub_connect"):
    sub: str
    node: str
    from_seq: Positive


class SubReconnect(Event, tag="sub_reconnect"):
    sub: str
    node: str
    from_seq: Positive


class Fault(Event, tag="fault"):
    fault: Positive
    name: str
    phase: Phase
    details: dict[str, Any] = {}

    @property
    def hit_leader(self) -> bool:
        return self.details.get("role") == "leader"


class FinalRead(Event, tag="final_read"):
    node: str
    part: NonNegative
    parts: Positive
    records: list[Record]

    def __post_init__(self) -> None:
        if self.part >= self.parts:
            raise ValueError(f"part {self.part} of {self.parts} is out of range")


class Note(Event, tag="note"):
    text: str
    fields: dict[str, Any] = {}


AnyEvent = Union[Invoke, Complete, Deliver, SubConnect, SubReconnect, Fault, FinalRead, Note]
_decoder = msgspec.json.Decoder(AnyEvent)


def _text(payload: str | bytes) -> str:
    return payload if isinstance(payload, str) else payload.decode("latin-1")


class HistoryRecorder:
    """Appends events to a JSON-lines file; safe to call from any thread.

    Each call stamps ``t`` and writes one line under one lock (encoding included), so lines are
    in ``t`` order. Writes go through a buffer of ``WRITE_BUFFER_BYTES``; ``close`` flushes.
    ``clock_ns`` is for tests; a real run keeps ``time.monotonic_ns``.
    """

    def __init__(self, path: str | os.PathLike[str], *, clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.path = os.fspath(path)
        self._clock_ns = clock_ns
        self._file = open(self.path, "wb", buffering=WRITE_BUFFER_BYTES)
        self._lock = threading.Lock()
        # Free-form fields (fault details, notes) that JSON cannot hold are written as str().
        self._encoder = msgspec.json.Encoder(enc_hook=str)
        self._op_ids = itertools.count(1)
        self._fault_ids = itertools.count(1)
        self._open_faults: dict[int, str] = {}
        self._closed = False

    def __enter__(self) -> HistoryRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one method per event kind --------------------------------------------------------

    def invoke(self, client: str, session: str, client_seq: int, payload: str | bytes) -> int:
        """Record the start of a submit; returns its op id for ``complete_*``."""
        with self._lock:
            op = next(self._op_ids)
            self._write(Invoke(self._clock_ns(), op, client, session, client_seq, _text(payload)))
        return op

    def complete_ok(self, op: int, seq: int) -> None:
        self._record(lambda t: Complete(t, op, "ok", seq))

    def complete_fail(self, op: int, reason: str) -> None:
        self._record(lambda t: Complete(t, op, "fail", reason=reason))

    def complete_unknown(self, op: int, reason: str = "") -> None:
        self._record(lambda t: Complete(t, op, "unknown", reason=reason))

    def deliver(self, sub: str, node: str, seq: int, session: str, client_seq: int, payload: str | bytes) -> None:
        self._record(lambda t: Deliver(t, sub, node, seq, session, client_seq, _text(payload)))

    def sub_connect(self, sub: str, node: str, from_seq: int) -> None:
        self._record(lambda t: SubConnect(t, sub, node, from_seq))

    def sub_reconnect(self, sub: str, node: str, from_seq: int) -> None:
        self._record(lambda t: SubReconnect(t, sub, node, from_seq))

    def fault_start(self, name: str, /, **details: Any) -> int:
        """Record a fault beginning; returns its id for ``fault_end``. See the module docstring
        for ``role="leader"``."""
        with self._lock:
            fault = next(self._fault_ids)
            self._open_faults[fault] = name
            self._write(Fault(self._clock_ns(), fault, name, "start", details))
        return fault

    def fault_end(self, fault: int, /, **details: Any) -> None:
        with self._lock:
            name = self._open_faults.pop(fault, None)
            if name is None:
                raise ValueError(f"fault {fault} is not in progress")
            self._write(Fault(self._clock_ns(), fault, name, "end", details))

    def final_read(self, node: str, records: Sequence[tuple[int, str, int, str | bytes]]) -> None:
        """Record a full read of `node`'s stream: ``(seq, session, client_seq, payload)`` each,
        in the order read, in lines of ``FINAL_READ_RECORDS_PER_LINE``."""
        size = FINAL_READ_RECORDS_PER_LINE
        parts = max(1, -(-len(records) // size))
        for part in range(parts):
            chunk = [
                (seq, session, client_seq, _text(payload)) for seq, session, client_seq, payload in records[part * size : (part + 1) * size]
            ]
            self._record(lambda t: FinalRead(t, node, part, parts, chunk))

    def note(self, text: str, /, **fields: Any) -> None:
        self._record(lambda t: Note(t, text, fields))

    # --- file -----------------------------------------------------------------------------

    def flush(self) -> None:
        with self._lock:
            if not self._closed:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._file.close()

    def _record(self, make: Callable[[int], Event]) -> None:
        with self._lock:
            self._write(make(self._clock_ns()))

    def _write(self, event: Event) -> None:
        # Called with the lock held.
        if self._closed:
            raise RuntimeError(f"history {self.path} is closed")
        self._file.write(self._encoder.encode(event) + b"\n")


def iter_history(path: str | os.PathLike[str]) -> Iterator[AnyEvent]:
    """Every event of the file at `path`, in file order, read as it streams: a history may be
    larger than memory. Raises ``HistoryError`` naming the file and line of the first line that
    is not a valid event (a torn last line included)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    event = _decoder.decode(line)
                except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
                    raise HistoryError(f"{path}:{number}: not a valid history event: {exc}") from None
                yield event
    except OSError as exc:
        raise HistoryError(f"cannot read history {path}: {exc}") from exc


def load_history(path: str | os.PathLike[str]) -> list[AnyEvent]:
    """Every event of the file at `path` in a list (``iter_history``)."""
    return list(iter_history(path))


__all__ = [
    "FINAL_READ_RECORDS_PER_LINE",
    "AnyEvent",
    "Complete",
    "Deliver",
    "Event",
    "Fault",
    "FinalRead",
    "HistoryError",
    "HistoryRecorder",
    "Invoke",
    "Note",
    "Outcome",
    "Record",
    "SubConnect",
    "SubReconnect",
    "iter_history",
    "load_history",
]
