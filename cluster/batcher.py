"""The leader's batcher: submits in, Raft log entries out, per-entry results back.

Natural batching: a batch is proposed as soon as no batch is in flight, or when a full batch is
waiting and fewer than ``in_flight_max`` are in flight. Under light load a batch holds one
message; under heavy load batches fill up to ``entries_max`` / ``bytes_max``.

The priority lane: submits of credentials with ``priority`` (``cluster.credentials``) wait in a
queue of their own with its own bounds (``priority_queue_entries_max``,
``priority_held_bytes_max``) and are taken into the next batch before any bulk submit: they never
wait behind a full bulk queue, and a full priority lane never refuses a bulk submit. What they
cannot skip is what Raft already carries: a batch commits after every batch proposed before it.
So while a priority submit waits, and for ``priority_recent_s`` after one came or was answered,
bulk is held back: at most ``priority_bulk_in_flight_entries_max`` bulk entries proposed and not
yet committed, in at most ``in_flight_max - 1`` batches (a slot stays free for the lane: a
priority submit is proposed at once, never beyond ``in_flight_max``), a bulk batch proposed beside
others only with room for half that bound (no trickle of tiny batches), and none behind a
priority batch in Raft: their rounds would take the nodes' CPU while the priority batch's round
runs (its Raft time 4.4 -> 3.6 ms mean in bench_priority on 2 cores), though at most
``PRIORITY_HOLDS_BULK_MAX_S`` in a row (a priority credential that submits without pause leaves
bulk a batch every 10 ms, not nothing). A priority batch holds priority submits only: its apply
and its answers wait for no bulk entry. Without recent priority traffic bulk has the whole
pipeline. Bulk bytes held keep their one bound (``held_bytes_max``): a
smaller one while priority traffic is recent let the bulk connections read together pass it, and
the ``Busy`` answers and resends cost 10x the CPU per message (bench_priority, 4 processes).

Group commit (power durability, ``unsynced``): a commit waits for the leader's fsync, so waiting
for it before the next batch left one batch per fsync. Given ``unsynced`` (the Raft entries the
leader holds not yet on its disk), a batch that is not full is also proposed while fewer than
``unsynced_entries_max`` such entries wait (and fewer than ``in_flight_max`` batches are in
flight): the log's writer covers every entry queued meanwhile with its next fsync. Off by
default (``BatcherConfig.unsynced_entries_max`` 0): the batch that waits for the commit already
groups the messages that arrive meanwhile, and smaller entries cost CPU.

Runs on the asyncio loop, as does pysyncobj (``cluster.raft.loop_poller``): a commit is reported from
inside a Raft tick, and a batch proposed meanwhile goes out in that same tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from raftseq.cluster import invariant, stage_probe
from raftseq.cluster.config import BatcherConfig
from raftseq.cluster.raft.proposals import PROPOSAL_OK, proposal_error_name
from raftseq.sequencer import protocol
from raftseq.sequencer.machine import ApplyResult

log = logging.getLogger("raftseq.batcher")

#: msgpack overhead of one Entry beyond session and payload bytes (array header, ints; a
#: fenced entry's owner and digest, up to 9 bytes each, and claim flag included).
_ENTRY_OVERHEAD_BYTES = 44
#: msgpack overhead of a batch beyond its entries (array headers, version, leader time).
_BATCH_OVERHEAD_BYTES = 16
#: Bulk waits behind a priority batch in Raft (module docstring) at most this long in a row;
#: then one bulk batch goes and the wait starts again: a priority credential that submits
#: without pause leaves bulk a batch every 10 ms (~40k msg/s of 100-byte messages), never
#: nothing. An admin submit's Raft time is 3-5 ms on a saturated 2-core leader.
PRIORITY_HOLDS_BULK_MAX_S = 0.010


def _observe_latencies(observe: Callable[[float, int], None], submits: list[PendingSubmit], now_ns: int) -> None:
    """Each of `submits`' time from queue to now, to `observe`; the submits of one frame came
    in at one clock read, and are observed together."""
    came_in_ns = submits[0].enqueued_ns
    together = 0
    for submit in submits:
        if submit.enqueued_ns != came_in_ns:
            observe((now_ns - came_in_ns) / 1e9, together)
            came_in_ns = submit.enqueued_ns
            together = 0
        together += 1
    observe((now_ns - came_in_ns) / 1e9, together)


def held_bytes_most(wire_bytes: int, session: str) -> int:
    """The most bytes held (``Batcher.has_room``) that the submits of `wire_bytes` read from a
    client of `session` can add, whatever frames they are: each entry at least one byte."""
    return wire_bytes * (1 + len(session) + _ENTRY_OVERHEAD_BYTES)


class PendingSubmit:
    """One submit waiting for its batch to commit. ``reply(client_seq, outcome, payload_bytes)``
    is called exactly once: with the sequence number (``int``) of a new entry, an
    ``EntryResult`` for a duplicate or refusal, or a ``CommitOutcome`` when the outcome is
    unknown; ``payload_bytes`` is the payload's length, for the caller's byte accounting.

    ``owner``: the connection's ``Hello.owner`` (0: a client without one); ``claim``: its first
    submit, which takes the session over (``sequencer.machine``, fencing); ``digest``: the
    client's ``payload_digest(payload)``, 0 when it sent none. ``enqueued_ns``: when it came
    in (``time.monotonic_ns``; a caller offering many at once reads the clock once).

    ``acked``, when given, answers runs: ``acked(first_client_seq, first_seq, count,
    payload_bytes)`` in place of ``reply`` for ``count`` new submits in a row that share it,
    with consecutive client_seqs (``client_seq + i`` got ``first_seq + i``)."""

    __slots__ = ("entry", "client_seq", "payload_bytes", "reply", "enqueued_ns", "cost_bytes", "acked")

    def __init__(
        self,
        session: str,
        client_seq: int,
        payload: bytes,
        reply: Callable[[int, object, int], None],
        owner: int = 0,
        claim: bool = False,
        digest: int = 0,
        enqueued_ns: int = 0,
        acked: Callable[[int, int, int, int], None] | None = None,
    ) -> None:
        #: The Raft log entry, made once here: the batch carries it as it is.
        self.entry = (
            protocol.FencedEntry(session, client_seq, payload, owner, claim, digest)
            if owner or digest
            else protocol.Entry(session, client_seq, payload)
        )
        self.client_seq = client_seq
        self.payload_bytes = len(payload)
        self.reply = reply
        self.enqueued_ns = enqueued_ns or time.monotonic_ns()
        #: What this submit adds to a batch, in bytes; held by the batcher until answered.
        self.cost_bytes = len(payload) + len(session) + _ENTRY_OVERHEAD_BYTES
        self.acked = acked

    def answer(self, outcome: object) -> None:
        self.reply(self.client_seq, outcome, self.payload_bytes)


def _answer_sequenced(members: list[PendingSubmit], first_seq: int) -> None:
    """Answer `members`, all new: member i got ``first_seq + i``. Runs of members that share
    an ``acked`` and have consecutive client_seqs are answered by one call."""
    seq = first_seq
    count = len(members)
    i = 0
    while i < count:
        submit = members[i]
        acked = submit.acked
        if acked is None:
            submit.reply(submit.client_seq, seq, submit.payload_bytes)
            i += 1
            seq += 1
            continue
        client_seq = submit.client_seq
        payload_bytes = submit.payload_bytes
        end = i + 1
        while end < count and members[end].acked is acked and members[end].client_seq == client_seq + end - i:
            payload_bytes += members[end].payload_bytes
            end += 1
        acked(client_seq, seq, end - i, payload_bytes)
        seq += end - i
        i = end


class CommitOutcome:
    """How a proposed batch ended: applied (``result``) or unknown (``error``)."""

    __slots__ = ("result", "error")

    def __init__(self, result: ApplyResult | None, error: str) -> None:
        self.result = result
        self.error = error


class Batcher:
    def __init__(
        self,
        config: BatcherConfig,
        propose: Callable[[bytes, Callable[[object, int], None]], None],
        *,
        loop: asyncio.AbstractEventLoop,
        clock_ns: Callable[[], int] = time.time_ns,
        unsynced: Callable[[], int] | None = None,
        now_s: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        #: The monotonic clock of commit deadlines and priority recency (the loop's by default).
        self._now_s = now_s or loop.time
        #: Raft entries the leader holds not yet on its disk (power durability; None: crash).
        self.unsynced = unsynced
        self._propose = propose
        self._loop = loop
        self._clock_ns = clock_ns
        self._queue: deque[PendingSubmit] = deque()
        self._queue_bytes = 0
        #: Bytes of every submit queued or proposed and not yet answered (``held_bytes_max``).
        self._held_bytes = 0
        #: The priority lane: its queue, and the bytes of its queued submits
        #: (``priority_held_bytes_max``). Once proposed they count in ``_held_bytes`` (at most
        #: a batch's worth: they are few).
        self._priority: deque[PendingSubmit] = deque()
        self._priority_bytes = 0
        #: Until when (``now_s``) priority traffic counts as recent and bulk is held back.
        self._priority_recent_until = 0.0
        #: Since when (``now_s``) bulk has waited behind a priority batch in Raft (None: not).
        self._bulk_held_since: float | None = None
        #: Bulk entries proposed and not yet answered (``priority_bulk_in_flight_entries_max``),
        #: and priority ones.
        self._bulk_in_flight = 0
        self._priority_in_flight = 0
        #: batch id -> its submits, its commit deadline, the bytes they hold and its bulk entries.
        self._in_flight: dict[int, tuple[list[PendingSubmit], float, int, int]] = {}
        self._next_batch_id = 1
        #: batch id -> when it was proposed (``time.monotonic_ns``), while ``stage_probe`` records.
        self._proposed_ns: dict[int, int] = {}
        self._last_time_ns = 0
        self.enabled = False
        #: Proposals held (``hold``): a leadership transfer is under way.
        self.held = False
        # Counters read by metrics.
        self.batches_proposed = 0
        self.batches_unknown = 0
        self.entries_proposed = 0
        #: Of ``entries_proposed``, those of the priority lane.
        self.priority_entries_proposed = 0
        #: Seconds bulk waited behind priority batches in Raft, and the holds that reached
        #: ``PRIORITY_HOLDS_BULK_MAX_S`` (a priority credential that submits without pause).
        self.bulk_held_behind_priority_s = 0.0
        self.bulk_holds_capped = 0
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._proposing = False
        #: Called with the queue-to-commit time of acknowledged submits, in seconds, and how
        #: many submits took that long.
        self.latency_observer: Callable[[float, int], None] | None = None
        #: The same, for the submits of the priority lane only (they count in the other too).
        self.priority_latency_observer: Callable[[float, int], None] | None = None

    @property
    def queued(self) -> int:
        return len(self._queue) + len(self._priority)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    @property
    def bulk_in_flight(self) -> int:
        return self._bulk_in_flight

    def priority_recent(self) -> bool:
        """Whether a priority submit waits (queued or proposed) or came or was answered within
        ``priority_recent_s``: bulk is held back."""
        if self._priority or self._priority_in_flight:
            return True
        return self._priority_recent_until > 0 and self._now_s() < self._priority_recent_until

    def has_room(self, cost_bytes: int, *, priority: bool = False) -> bool:
        """Whether the bytes held (of the priority lane, or of the bulk submits) leave room for `cost_bytes` more."""
        if priority:
            return self._priority_bytes + cost_bytes <= self.config.priority_held_bytes_max
        return self._held_bytes + cost_bytes <= self.config.held_bytes_max

    def _priority_came(self) -> None:
        self._priority_recent_until = self._now_s() + self.config.priority_recent_s

    def offer_all(self, submits: list[PendingSubmit], *, priority: bool = False) -> bool:
        """Queue every one of `submits` if all fit (by entries and by bytes held), else none:
        False, and the caller offers them one by one (``offer``) to learn which fit. Nothing is
        proposed: the caller calls ``flush``."""
        cost = sum(submit.cost_bytes for submit in submits)
        if priority:
            if len(self._priority) + len(submits) > self.config.priority_queue_entries_max or not self.has_room(cost, priority=True):
                return False
            self._priority_came()
            self._priority.extend(submits)
            self._queue_bytes += cost
            self._priority_bytes += cost
            return True
        if len(self._queue) + len(submits) > self.config.queue_entries_max or not self.has_room(cost):
            return False
        self._queue.extend(submits)
        self._queue_bytes += cost
        self._held_bytes += cost
        return True

    def offer(self, submit: PendingSubmit, *, propose: bool = True, priority: bool = False) -> bool:
        """Queue a submit; False when the queue is full, by entries or by the bytes held
        (queued and proposed), and the caller answers ``Busy``. ``priority``: in the priority lane.

        ``propose=False`` only queues it: the caller offers several and then calls ``flush``.
        """
        cost = submit.cost_bytes
        lane = self._priority if priority else self._queue
        entries_max = self.config.priority_queue_entries_max if priority else self.config.queue_entries_max
        if len(lane) >= entries_max or not self.has_room(cost, priority=priority):
            return False
        lane.append(submit)
        self._queue_bytes += cost
        if priority:
            self._priority_came()
            self._priority_bytes += cost
        else:
            self._held_bytes += cost
        if propose:
            self._maybe_propose()
        return True

    def flush(self) -> None:
        """Propose what the batching rule allows now."""
        self._maybe_propose()

    def _maybe_propose(self) -> None:
        config = self.config
        while (self._queue or self._priority) and self.enabled and not self.held:
            in_flight = len(self._in_flight)
            if in_flight >= config.in_flight_max:
                return
            if self.priority_recent():
                # Bulk held back: the next priority submit finds few bulk entries ahead of it in
                # Raft, and a free slot.
                bound = config.priority_bulk_in_flight_entries_max
                room = bound - self._bulk_in_flight
                if not self._priority and (
                    room <= 0
                    or in_flight >= max(1, config.in_flight_max - 1)
                    or (in_flight and 2 * room < bound)
                    or self._behind_priority()
                ):
                    return
            else:
                room = config.entries_max
            # A priority submit goes at once, in a batch of its own; a bulk batch when nothing
            # is in flight, or when it is full, or for group commit.
            if in_flight and not self._priority:
                full = len(self._queue) >= min(room, config.entries_max) or self._queue_bytes >= config.bytes_max
                if not (full or self._may_group()):
                    return
            self._propose_one(0 if self._priority else max(0, room))

    def _behind_priority(self) -> bool:
        """Whether a bulk batch that may otherwise go waits behind a priority batch in Raft
        (at most ``PRIORITY_HOLDS_BULK_MAX_S`` in a row)."""
        if not self._priority_in_flight:
            return False  # and no hold under way (``_release``, ``stop``)
        now = self._now_s()
        if self._bulk_held_since is None:
            self._bulk_held_since = now
        if now - self._bulk_held_since < PRIORITY_HOLDS_BULK_MAX_S:
            return True
        self.bulk_holds_capped += 1
        self._end_bulk_hold(now)
        return False

    def _end_bulk_hold(self, now: float) -> None:
        """Bulk no longer waits behind a priority batch (if it did); its wait is counted."""
        if self._bulk_held_since is not None:
            self.bulk_held_behind_priority_s += now - self._bulk_held_since
            self._bulk_held_since = None

    def _may_group(self) -> bool:
        """Group commit: fewer Raft entries than the bound wait for the leader's fsync."""
        bound = self.config.unsynced_entries_max
        return bound > 0 and self.unsynced is not None and self.unsynced() < bound

    def _propose_one(self, bulk_max: int) -> None:
        """Propose one batch: the priority lane's submits first, then at most `bulk_max` bulk ones."""
        config = self.config
        queue = self._queue
        size = _BATCH_OVERHEAD_BYTES + self._queue_bytes
        if not self._priority and len(queue) <= min(config.entries_max, bulk_max) and (size <= config.bytes_max or len(queue) == 1):
            # The whole queue fits in one batch (the usual case): taken at once.
            members = list(queue)
            bulk = len(members)
            queue.clear()
            self._queue_bytes = 0
        else:
            members, size, bulk = self._take_members(bulk_max)
        assert members, "a batch proposed with no submit"
        entries = [submit.entry for submit in members]
        fenced = protocol.FencedEntry in set(map(type, entries))
        now = self._clock_ns()
        if now < self._last_time_ns:
            now = self._last_time_ns
        self._last_time_ns = now
        data = protocol.encode_batch(now, entries, fenced=fenced)
        assert len(data) <= config.bytes_max, f"batch of {len(data)} bytes exceeds {config.bytes_max}"
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        self._in_flight[batch_id] = (members, self._now_s() + config.commit_timeout_s, size - _BATCH_OVERHEAD_BYTES, bulk)
        self._bulk_in_flight += bulk
        self._priority_in_flight += len(members) - bulk
        if stage_probe.recording:
            self._proposed_ns[batch_id] = time.monotonic_ns()
        self.batches_proposed += 1
        self.entries_proposed += len(entries)
        self.priority_entries_proposed += len(members) - bulk
        committed = self._committed

        def on_commit(result: object, error: int) -> None:  # inside a Raft tick, on the loop
            try:
                assert not self._proposing, "a commit reported before its propose call returned"
                committed(batch_id, result, error)
            except Exception as exc:  # noqa: BLE001 - pysyncobj would apply the entry again
                invariant.fail_stop("answering committed batch %d: %r", batch_id, exc)

        self._proposing = True
        try:
            self._propose(data, on_commit)
        finally:
            self._proposing = False
        if self._timeout_handle is None:
            self._timeout_handle = self._loop.call_later(config.commit_timeout_s, self._expire)

    def _take_members(self, bulk_max: int) -> tuple[list[PendingSubmit], int, int]:
        """A batch's members, the priority lane's submits first, then at most `bulk_max` bulk
        ones, up to the batch's entry and byte limits; the batch's size in bytes; how many
        of its members are bulk."""
        config = self.config
        members: list[PendingSubmit] = []
        size = _BATCH_OVERHEAD_BYTES
        priority = self._priority
        while priority and len(members) < config.entries_max:
            cost = priority[0].cost_bytes
            if members and size + cost > config.bytes_max:
                break
            members.append(priority.popleft())
            self._queue_bytes -= cost
            self._priority_bytes -= cost
            self._held_bytes += cost  # proposed: held as any other
            size += cost
        first_bulk = len(members)
        queue = self._queue
        most = min(config.entries_max, first_bulk + bulk_max)
        while queue and len(members) < most:
            cost = queue[0].cost_bytes
            if members and size + cost > config.bytes_max:
                break
            members.append(queue.popleft())
            self._queue_bytes -= cost
            size += cost
        return members, size, len(members) - first_bulk

    def _committed(self, batch_id: int, result: object, error: int) -> None:
        entry = self._in_flight.pop(batch_id, None)
        if entry is None:
            return  # answered as unknown already (timeout, step-down)
        members, _, held, bulk = entry
        self._release(held, bulk, len(members) - bulk)
        if bulk < len(members):
            # Recent from its answer on too: one that waited longer than priority_recent_s
            # (a node under load) does not let bulk fill the pipeline before the next one.
            self._priority_came()
        if error == PROPOSAL_OK and isinstance(result, ApplyResult) and not result.error:
            count = result.entry_count
            assert count == len(members), f"{count} results for {len(members)} entries"
            if result.outcomes is None:
                # Every entry was new: entry i got first_seq + i.
                if stage_probe.recording:
                    self._record_stages(batch_id, members, result.first_seq)
                _answer_sequenced(members, result.first_seq)
            else:
                for submit, outcome in zip(members, result.outcomes):
                    submit.answer(outcome)
            now_ns = time.monotonic_ns()
            if self.latency_observer is not None:
                _observe_latencies(self.latency_observer, members, now_ns)
            if self.priority_latency_observer is not None and bulk < len(members):
                # A batch's priority submits come first.
                _observe_latencies(self.priority_latency_observer, members[: len(members) - bulk], now_ns)
        else:
            reason = proposal_error_name(error) if error != PROPOSAL_OK else "batch not applied"
            self.batches_unknown += 1
            unknown = CommitOutcome(None, reason)
            for submit in members:
                submit.answer(unknown)
        self._maybe_propose()

    def _record_stages(self, batch_id: int, members: list[PendingSubmit], first_seq: int) -> None:
        committed_ns = time.monotonic_ns()
        proposed_ns = self._proposed_ns.pop(batch_id, committed_ns)
        for i, submit in enumerate(members):
            if submit.entry.session.startswith(stage_probe.sessions):
                stage_probe.sequenced(first_seq + i, submit.enqueued_ns, proposed_ns, committed_ns)

    def _release(self, held: int, bulk: int, priority: int) -> None:
        """A proposed batch is answered: its `held` bytes, `bulk` and `priority` entries are no longer in flight."""
        self._held_bytes -= held
        self._bulk_in_flight -= bulk
        self._priority_in_flight -= priority
        if not self._priority_in_flight and self._bulk_held_since is not None:
            self._end_bulk_hold(self._now_s())  # a hold counts from the next priority batch on
        assert self._held_bytes >= 0, f"held bytes {self._held_bytes} below zero"
        assert self._bulk_in_flight >= 0 and self._priority_in_flight >= 0, "entries in flight below zero"

    def _expire(self) -> None:
        self._timeout_handle = None
        now = self._now_s()
        for batch_id in [b for b, (_, deadline, _, _) in self._in_flight.items() if deadline <= now]:
            members, _, held, bulk = self._in_flight.pop(batch_id)
            self._proposed_ns.pop(batch_id, None)
            self._release(held, bulk, len(members) - bulk)
            self.batches_unknown += 1
            log.warning("batch %d not committed within %.1f s; outcome unknown", batch_id, self.config.commit_timeout_s)
            unknown = CommitOutcome(None, "commit timeout")
            for submit in members:
                submit.answer(unknown)
        if self._in_flight:
            next_deadline = min(deadline for _, deadline, _, _ in self._in_flight.values())
            self._timeout_handle = self._loop.call_later(max(0.0, next_deadline - now), self._expire)
        self._maybe_propose()

    def hold(self) -> None:
        """Propose nothing until ``release`` (a leadership transfer: the target must catch up
        with a log that no longer grows). Submits still queue, within the usual bounds."""
        self.held = True

    def release(self) -> None:
        self.held = False
        self._maybe_propose()

    def start(self) -> None:
        self.enabled = True
        self.held = False
        self._maybe_propose()

    def stop(self, reason: str) -> None:
        """No longer leader (or shutting down): answer everything queued and in flight as unknown."""
        self.enabled = False
        unknown = CommitOutcome(None, reason)
        # Nothing is held from here on: each answer may let a waiting connection read again.
        self._queue_bytes = 0
        self._held_bytes = 0
        self._priority_bytes = 0
        self._bulk_in_flight = 0
        self._priority_in_flight = 0
        self._end_bulk_hold(self._now_s())
        for lane in (self._priority, self._queue):
            while lane:
                lane.popleft().answer(unknown)
        for members, _, _, _ in self._in_flight.values():
            for submit in members:
                submit.answer(unknown)
        self.batches_unknown += len(self._in_flight)
        self._in_flight.clear()
        self._proposed_ns.clear()
