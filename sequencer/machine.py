"""The deterministic state machine that numbers messages.

``SequencerMachine.apply(batch_bytes)`` is a function of (state, batch) -> (state, outcome):
it reads no clock, no socket, no thread; the only time it knows is the leader's stamp inside
the batch. Every replica that applies the same batches in the same order holds the same state
and produces the same journal records, byte for byte.

What it decides, per entry ``(session, client_seq, payload)``:

* ``client_seq == last + 1``: the entry is new; it gets the next sequence number.
* ``client_seq <= last`` and inside the session's dedup window: a retry; answered with the
  sequence number it already has, nothing is appended.
* ``client_seq <= last`` and older than the window: ``stale_client_seq``.
* ``client_seq > last + 1``: ``sequence_gap`` with the expected number; nothing changes.

Sessions idle for ``MachineConfig.session_idle_ns`` of log time are forgotten, oldest first.
"""

from __future__ import annotations

import enum
import hashlib
import zlib
from collections import OrderedDict, deque

import msgspec

from sequencer import limits, protocol
from sequencer.limits import MachineConfig

SNAPSHOT_FORMAT_VERSION = 1


class Outcome(enum.IntEnum):
    SEQUENCED = 1  # new; `seq` is its number
    DUPLICATE = 2  # applied before; `seq` is the number it got then
    REJECTED = 3  # not applied; `reason` says why


class EntryResult(msgspec.Struct, frozen=True, gc=False):
    session: str
    client_seq: int
    outcome: Outcome
    seq: int = 0
    reason: protocol.RejectReason | None = None
    expected_client_seq: int = 0


class ApplyResult(msgspec.Struct, frozen=True, gc=False):
    """What one batch did. ``records`` are the journal bytes of seq ``first_seq..last_seq``.

    ``outcomes`` is ``None`` in the common case where every entry was new: entry ``i`` of the
    batch got ``first_seq + i``. Otherwise it holds one ``EntryResult`` per entry. ``results``
    gives the per-entry list either way.
    """

    outcomes: list[EntryResult] | None
    first_seq: int  # first number given in this batch; 0 when none
    last_seq: int  # last number given in this batch; 0 when none
    log_time_ns: int
    records: bytes
    #: Set when the batch could not be decoded: nothing was applied, ``results`` is empty.
    error: str = ""
    #: The batch's entries, in order (``outcomes`` is ``None`` only when this is set).
    entries: list[protocol.Entry] = []
    #: Offset of each record in ``records``; empty when the producer did not record them.
    offsets: list[int] = []

    @property
    def entry_count(self) -> int:
        return len(self.entries) if self.outcomes is None else len(self.outcomes)

    @property
    def results(self) -> list[EntryResult]:
        """One ``EntryResult`` per entry of the batch."""
        if self.outcomes is not None:
            return self.outcomes
        first = self.first_seq
        sequenced = Outcome.SEQUENCED
        return [EntryResult(e.session, e.client_seq, sequenced, first + i) for i, e in enumerate(self.entries)]


class _Session:
    __slots__ = ("last_client_seq", "last_active_ns", "window")

    def __init__(self, last_client_seq: int, last_active_ns: int, window: deque) -> None:
        self.last_client_seq = last_client_seq
        self.last_active_ns = last_active_ns
        # window[i] is the seq of client_seq (last_client_seq - len(window) + 1 + i):
        # client_seqs of a session are applied contiguously, so a list of seqs is the map.
        self.window = window


class SessionSnapshot(msgspec.Struct, frozen=True, array_like=True):
    session: str
    last_client_seq: int
    last_active_ns: int
    window_seqs: list[int]


class MachineSnapshot(msgspec.Struct, frozen=True, array_like=True):
    format_version: int
    config: MachineConfig
    next_seq: int
    last_log_time_ns: int
    stream_crc: int
    #: Ordered from least to most recently active: expiry order is part of the state.
    sessions: list[SessionSnapshot]


class SnapshotError(Exception):
    """A snapshot that cannot be restored (undecodable, newer format, inconsistent)."""


_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(MachineSnapshot)


class SequencerMachine:
    """Sessions, dedup and numbering. Not thread-safe: one thread applies."""

    def __init__(self, config: MachineConfig | None = None) -> None:
        config = config or MachineConfig()
        problems = config.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.config = config
        self.next_seq = 1
        self.last_log_time_ns = 0
        #: CRC-32 chained over every journal record this machine produced, in order.
        self.stream_crc = 0
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    # --- queries ------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def last_client_seq(self, session: str) -> int:
        """Highest applied client_seq of `session`, 0 if the session is unknown."""
        state = self._sessions.get(session)
        return state.last_client_seq if state is not None else 0

    def seq_of(self, session: str, client_seq: int) -> int | None:
        """Sequence number of an applied submit still inside its session's window."""
        state = self._sessions.get(session)
        if state is None:
            return None
        offset = client_seq - (state.last_client_seq - len(state.window) + 1)
        if 0 <= offset < len(state.window):
            return state.window[offset]
        return None

    # --- the transition -----------------------------------------------------------------

    def apply(self, batch_bytes: bytes) -> ApplyResult:
        """Apply one Raft log entry. Never raises on any input bytes."""
        try:
            batch = protocol.decode_batch(batch_bytes)
        except protocol.BatchError as exc:
            return ApplyResult([], 0, 0, self.last_log_time_ns, b"", error=str(exc))
        return self.apply_batch(batch)

    def apply_batch(self, batch: protocol.Batch) -> ApplyResult:
        log_time = batch.leader_time_ns
        if log_time < self.last_log_time_ns:
            log_time = self.last_log_time_ns  # log time never decreases along the log
        self.last_log_time_ns = log_time
        self._expire(log_time)

        sessions = self._sessions
        config = self.config
        window_max = config.dedup_window
        encode = protocol.encode_delivered
        records: list[bytes] = []
        offsets: list[int] = []
        offset = 0
        # None while every entry so far is new (entry i got first_seq + i): the common case
        # needs no per-entry result object.
        outcomes: list[EntryResult] | None = None
        entries = batch.entries
        first_seq = self.next_seq
        seq = first_seq
        sequenced = Outcome.SEQUENCED
        # The session last moved to the end of the idle order: moving it again before another
        # session moves changes nothing, so runs of one session cost one move.
        last_moved = None
        for index, entry in enumerate(entries):
            name = entry.session
            client_seq = entry.client_seq
            state = sessions.get(name)
            refusal = None
            if state is None:
                if not protocol.is_session_name(name):
                    refusal = EntryResult(name, client_seq, Outcome.REJECTED, 0, protocol.RejectReason.BAD_FRAME)
                elif client_seq != 1:
                    refusal = EntryResult(name, client_seq, Outcome.REJECTED, 0, protocol.RejectReason.SEQUENCE_GAP, 1)
                elif len(sessions) >= config.sessions_max:
                    refusal = EntryResult(name, client_seq, Outcome.REJECTED, 0, protocol.RejectReason.TOO_MANY_SESSIONS)
                else:
                    state = _Session(0, log_time, deque(maxlen=window_max))
                    sessions[name] = state
                    last_moved = name
            if refusal is None:
                last = state.last_client_seq
                if client_seq == last + 1:
                    record = encode(seq, log_time, name, client_seq, entry.payload)
                    records.append(record)
                    offsets.append(offset)
                    offset += len(record)
                    state.window.append(seq)
                    state.last_client_seq = client_seq
                    state.last_active_ns = log_time
                    if name != last_moved:
                        sessions.move_to_end(name)
                        last_moved = name
                    if outcomes is not None:
                        outcomes.append(EntryResult(name, client_seq, sequenced, seq))
                    seq += 1
                    continue
                if client_seq <= last:
                    window = state.window
                    at = client_seq - (last - len(window) + 1)
                    if at >= 0:
                        refusal = EntryResult(name, client_seq, Outcome.DUPLICATE, window[at])
                    else:
                        refusal = EntryResult(name, client_seq, Outcome.REJECTED, 0, protocol.RejectReason.STALE_CLIENT_SEQ)
                else:
                    refusal = EntryResult(
                        name, client_seq, Outcome.REJECTED, 0, protocol.RejectReason.SEQUENCE_GAP, last + 1
                    )
            if outcomes is None:
                # Every entry before this one was new and numbered in order.
                outcomes = [EntryResult(e.session, e.client_seq, sequenced, first_seq + i) for i, e in enumerate(entries[:index])]
            outcomes.append(refusal)
        blob = b"".join(records)
        if records:
            self.stream_crc = zlib.crc32(blob, self.stream_crc)
        self.next_seq = seq
        if seq == first_seq:
            return ApplyResult(outcomes if outcomes is not None else [], 0, 0, log_time, b"")
        return ApplyResult(outcomes, first_seq, seq - 1, log_time, blob, entries=entries, offsets=offsets)

    def _expire(self, log_time: int) -> None:
        horizon = log_time - self.config.session_idle_ns
        sessions = self._sessions
        while sessions:
            name, state = next(iter(sessions.items()))
            if state.last_active_ns >= horizon:
                break
            del sessions[name]

    # --- snapshots ----------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The whole state as msgspec bytes; equal states give equal bytes."""
        sessions = [
            SessionSnapshot(name, s.last_client_seq, s.last_active_ns, list(s.window)) for name, s in self._sessions.items()
        ]
        snap = MachineSnapshot(
            SNAPSHOT_FORMAT_VERSION, self.config, self.next_seq, self.last_log_time_ns, self.stream_crc, sessions
        )
        return _snapshot_encoder.encode(snap)

    @classmethod
    def restore(cls, data: bytes) -> SequencerMachine:
        """A machine in the state `data` describes. Raises ``SnapshotError`` on a bad snapshot."""
        try:
            snap = _snapshot_decoder.decode(data)
        except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
            raise SnapshotError(f"undecodable snapshot: {exc}") from None
        if snap.format_version != SNAPSHOT_FORMAT_VERSION:
            raise SnapshotError(f"snapshot format {snap.format_version}, this version reads {SNAPSHOT_FORMAT_VERSION}")
        problems = snap.config.problems()
        if snap.next_seq < 1 or snap.last_log_time_ns < 0:
            problems.append(f"next_seq {snap.next_seq} / last_log_time_ns {snap.last_log_time_ns} out of range")
        if snap.next_seq > 2**63 or not 0 <= snap.stream_crc < 2**32:
            problems.append(f"next_seq {snap.next_seq} / stream_crc {snap.stream_crc} out of range")
        previous_active = -1
        names = set()
        seen_seqs: set[int] = set()
        for s in snap.sessions:
            if s.session in names:
                problems.append(f"session {s.session!r} appears twice")
            names.add(s.session)
            # Every applied client_seq of a session enters its window, so the window always
            # holds the last min(last_client_seq, dedup_window) numbers, rising.
            if len(s.window_seqs) != min(s.last_client_seq, snap.config.dedup_window):
                problems.append(f"session {s.session!r}: window of {len(s.window_seqs)} entries is inconsistent")
            if any(not 1 <= q < snap.next_seq for q in s.window_seqs):
                problems.append(f"session {s.session!r}: window holds numbers outside 1..{snap.next_seq - 1}")
            if any(a >= b for a, b in zip(s.window_seqs, s.window_seqs[1:])):
                problems.append(f"session {s.session!r}: window numbers do not rise")
            if seen_seqs.intersection(s.window_seqs):
                problems.append(f"session {s.session!r}: a sequence number belongs to two sessions")
            seen_seqs.update(s.window_seqs)
            if s.last_active_ns < previous_active:
                problems.append(f"session {s.session!r}: sessions are not ordered by activity")
            if s.last_active_ns > snap.last_log_time_ns:
                problems.append(f"session {s.session!r}: active after the last log time")
            previous_active = s.last_active_ns
        if len(snap.sessions) > snap.config.sessions_max:
            problems.append(f"{len(snap.sessions)} sessions exceed sessions_max {snap.config.sessions_max}")
        if problems:
            raise SnapshotError("inconsistent snapshot: " + "; ".join(problems[:5]))
        machine = cls(snap.config)
        machine.next_seq = snap.next_seq
        machine.last_log_time_ns = snap.last_log_time_ns
        machine.stream_crc = snap.stream_crc
        window_max = snap.config.dedup_window
        for s in snap.sessions:
            machine._sessions[s.session] = _Session(s.last_client_seq, s.last_active_ns, deque(s.window_seqs, maxlen=window_max))
        return machine

    def state_digest(self) -> str:
        """SHA-256 of the snapshot: equal on two replicas exactly when their states are equal.

        The state includes ``stream_crc``, so equal digests also mean equal streams so far.
        """
        return hashlib.sha256(self.snapshot()).hexdigest()


__all__ = [
    "ApplyResult",
    "EntryResult",
    "MachineConfig",
    "MachineSnapshot",
    "Outcome",
    "SequencerMachine",
    "SnapshotError",
]
