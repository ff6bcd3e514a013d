"""The deterministic state machine that numbers messages.

``SequencerMachine.apply(batch_bytes)`` is a function of (state, batch) -> (state, outcome):
it reads no clock, no socket, no thread; the only time it knows is the leader's stamp inside
the batch. Every replica that applies the same batches in the same order holds the same state
and produces the same journal records, byte for byte.

What it decides, per entry ``(session, client_seq, payload)``:

* ``client_seq == last + 1``: the entry is new; it gets the next sequence number.
* ``client_seq <= last`` and inside the session's dedup window: a retry; answered with the
  sequence number it already has, nothing is appended — if its payload is the one applied
  (the window keeps a BLAKE2b-64 digest of each payload); another payload under that number is
  refused as ``session_conflict``, never acknowledged as the original.
* ``client_seq <= last`` and older than the window: ``stale_client_seq``.
* ``client_seq > last + 1``: ``sequence_gap`` with the expected number; nothing changes.

Sessions idle for ``MachineConfig.session_idle_ns`` of log time are forgotten, oldest first.

**Fencing.** An entry may carry its client's ``owner`` (``Hello.owner``, a random id per client
instance); the first entry of each connection also carries ``claim``. A claim makes its owner
the session's owner (a newer hello takes the session over, in log order, the same on every
replica); an entry of another owner without a claim is then refused (``session_taken_over``).
Entries without an owner (clients that predate fencing) are not fenced.

**The table's bound** (``docs/sessions.md``). Each session counts ``MachineConfig.session_bytes``
(a full window) from its first submit; a new session is admitted while the table stays within
``sessions_max`` and ``session_table_bytes_max``. When it would not, the least recently active
session goes if it has been idle for ``session_evict_idle_ns`` of log time (repeatedly, as
needed); otherwise the new session is refused (``too_many_sessions``). All of it is decided
from log time, so every replica evicts the same sessions.

**The state-machine snapshot index.** Application processes publish snapshots of their own
state machines (``clients.sm``) as ordinary sequenced messages: a session whose name starts
with ``protocol.SNAPSHOT_SESSION_PREFIX`` submits one ``protocol.SnapshotChunk`` per message.
The journal keeps the bytes like any other message; the machine keeps, in its own (replicated,
snapshotted) state, a small index: per (state-machine type, schema version) the latest
``SM_SNAPSHOTS_PER_KIND`` complete uploads (``protocol.SnapshotInfo``: header, publishing
session, first and last chunk number), and the uploads in progress. Any node answers "which
snapshots of type T" from it (``SnapshotQuery``), and a late joiner reads the chunks with an
ordinary subscription from ``first_seq``. The index never changes what is sequenced: chunks
are numbered, deduplicated and journaled like every message; a chunk that does not fit its
upload (undecodable, out of order, a header that changed, a covered number not below its own)
only abandons that upload. The cost for ordinary traffic is one flag test each time the batch
moves on to another session (next to the idle-order move it already makes then); everything
else runs only for batches that hold snapshot chunks.
"""

from __future__ import annotations

import enum
import hashlib
import zlib
from array import array
from collections import OrderedDict
from itertools import accumulate, islice

import msgspec

from raftseq.sequencer import protocol
from raftseq.sequencer.limits import (
    SM_SNAPSHOT_KINDS_MAX,
    SM_SNAPSHOT_UPLOADS_MAX,
    SM_SNAPSHOTS_PER_KIND,
    MachineConfig,
)

#: 2: the state-machine snapshot index (``snapshots``, ``uploads``) follows the sessions.
#: 3: each session's window keeps its payload digests (``window_digests``) and its ``owner``;
#: the config has the table's byte bound and eviction age. ``restore`` reads formats 1 to 3
#: (an older session's digests are unknown, 0: its retries are not checked).
SNAPSHOT_FORMAT_VERSION = 3
_SNAPSHOT_FORMATS_READ = (1, 2, 3)


payload_digest = protocol.payload_digest


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
        return _all_sequenced(self.entries, self.first_seq)


def _all_sequenced(entries: list[protocol.Entry], first_seq: int) -> list[EntryResult]:
    """The results of `entries` when each was new: entry i got ``first_seq + i``."""
    sequenced = Outcome.SEQUENCED
    return [EntryResult(e.session, e.client_seq, sequenced, first_seq + i) for i, e in enumerate(entries)]


class _Session:
    __slots__ = ("last_client_seq", "last_active_ns", "seqs", "digests", "owner", "snapshot_session")

    def __init__(self, last_client_seq: int, last_active_ns: int, owner: int = 0, snapshot_session: bool = False) -> None:
        self.last_client_seq = last_client_seq
        self.last_active_ns = last_active_ns
        # The dedup window, a ring: client_seq c's sequence number and payload digest (0:
        # unknown) are at index (c - 1) % dedup_window while c is one of the last
        # min(last_client_seq, dedup_window) numbers. Client_seqs of a session are applied
        # contiguously, so every applied number is in it until pushed out. 16 bytes a submit.
        self.seqs = array("q")
        self.digests = array("Q")
        #: The owner of the session (``Hello.owner``), 0 while none has claimed it.
        self.owner = owner
        #: The session's name starts with SNAPSHOT_SESSION_PREFIX: its messages are chunks.
        self.snapshot_session = snapshot_session

    def remember(self, last: int, first_seq: int, digests: list[int], window_max: int) -> None:
        """Put client_seqs ``last + 1 ..`` into the window: sequence numbers ``first_seq ..``
        and `digests`, one per client_seq."""
        seqs, kept = self.seqs, self.digests
        count = len(digests)
        done = 0
        at = last % window_max
        while done < count:
            take = min(count - done, window_max - at)
            numbers = range(first_seq + done, first_seq + done + take)
            if at == len(seqs):  # the window is not full yet: it grows
                seqs.extend(numbers)
                kept.extend(digests[done : done + take])
            else:
                seqs[at : at + take] = array("q", numbers)
                kept[at : at + take] = array("Q", digests[done : done + take])
            done += take
            at = 0

    def window_in_order(self, window_max: int) -> tuple[list[int], list[int]]:
        """The window's seqs and digests, oldest client_seq first."""
        seqs, digests = self.seqs, self.digests
        if len(seqs) < window_max:
            return list(seqs), list(digests)
        start = self.last_client_seq % window_max  # the index of the oldest number kept
        return list(seqs[start:] + seqs[:start]), list(digests[start:] + digests[:start])


class SessionSnapshot(msgspec.Struct, frozen=True, array_like=True):
    session: str
    last_client_seq: int
    last_active_ns: int
    window_seqs: list[int]
    #: Format 3: the payload digest of each window entry (0: unknown); empty before.
    window_digests: list[int] = []
    #: Format 3: the session's owner (0: none).
    owner: int = 0


class SnapshotUpload(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """An unfinished snapshot upload: the header its chunks carry and how far it got."""

    session: protocol.Session
    sm_type: protocol.SmType
    schema_version: protocol.SchemaVersion
    covered_seq: protocol.Seq
    digest: protocol.Digest
    bytes_sha256: protocol.Sha256Hex
    total_bytes: protocol.Count
    chunk_count: int
    #: Chunks 0..next_index-1 arrived, holding `bytes_seen` bytes of data.
    next_index: int
    bytes_seen: int
    first_seq: protocol.Seq
    last_seq: protocol.Seq


class MachineSnapshot(msgspec.Struct, frozen=True, array_like=True):
    format_version: int
    config: MachineConfig
    next_seq: int
    last_log_time_ns: int
    stream_crc: int
    #: Ordered from least to most recently active: expiry order is part of the state.
    sessions: list[SessionSnapshot]
    #: Format 2: the snapshot index, by (sm_type, schema_version), each kind newest first.
    snapshots: list[protocol.SnapshotInfo] = []
    #: Format 2: unfinished uploads, least recently extended first.
    uploads: list[SnapshotUpload] = []


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
        #: What the session table counts (``MachineConfig.session_bytes`` of each session).
        self.session_table_bytes = 0
        #: Sessions evicted from a full table since this machine was made or restored (a
        #: count for metrics; not part of the replicated state).
        self.sessions_evicted = 0
        # The snapshot index. Replaced, never changed in place, so that another thread (a
        # node's gateway answering SnapshotQuery) can read it while batches are applied.
        #: (sm_type, schema_version) -> complete snapshots, newest covered_seq first.
        self._sm_snapshots: dict[tuple[str, int], tuple[protocol.SnapshotInfo, ...]] = {}
        #: session -> its unfinished upload, least recently extended first.
        self._sm_uploads: OrderedDict[str, SnapshotUpload] = OrderedDict()

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
        if 0 <= state.last_client_seq - client_seq < len(state.seqs) and client_seq >= 1:
            return state.seqs[(client_seq - 1) % self.config.dedup_window]
        return None

    def owner_of(self, session: str) -> int:
        """The owner (``Hello.owner``) that holds `session`, 0 when none does."""
        state = self._sessions.get(session)
        return state.owner if state is not None else 0

    def snapshots_of(self, sm_type: str) -> list[protocol.SnapshotInfo]:
        """The complete snapshots of `sm_type` in the index (every schema version), newest
        ``covered_seq`` first, at most ``protocol.SNAPSHOT_LIST_MAX``. Safe to call from
        another thread while batches are applied."""
        index = self._sm_snapshots  # one read: the dict is replaced, never changed in place
        found = [info for (kind_type, _), infos in index.items() if kind_type == sm_type for info in infos]
        found.sort(key=lambda info: (info.covered_seq, info.last_seq), reverse=True)
        return found[: protocol.SNAPSHOT_LIST_MAX]

    def snapshot_floor_seq(self) -> int:
        """The lowest number a late joiner may still need to start from a state-machine
        snapshot: for the newest snapshot of each (sm_type, schema_version) and each unfinished
        upload, the first of its chunks and of the messages after what it covers. 0: none
        (retention keeps this, ``sequencer.journal.retention``). Safe from another thread."""
        index = self._sm_snapshots  # one read each: both are replaced, never changed in place
        uploads = list(self._sm_uploads.values())
        needs = [min(infos[0].first_seq, infos[0].covered_seq + 1) for infos in index.values() if infos]
        needs += [min(u.first_seq, u.covered_seq + 1) for u in uploads]
        return min(needs, default=0)

    @property
    def snapshot_uploads(self) -> list[SnapshotUpload]:
        """Unfinished snapshot uploads, least recently extended first."""
        return list(self._sm_uploads.values())

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
        encode_run = protocol.encode_delivered_run
        digest_of = payload_digest
        records: list[bytes] = []
        # None while every entry so far is new (entry i got first_seq + i): the common case
        # needs no per-entry result object.
        outcomes: list[EntryResult] | None = None
        entries = batch.entries
        count = len(entries)
        first_seq = self.next_seq
        seq = first_seq
        sequenced = Outcome.SEQUENCED
        # The session last moved to the end of the idle order: moving it again before another
        # session moves changes nothing, so runs of one session cost one move.
        last_moved = None
        # A snapshot session's entry was sequenced: index its chunks after the loop. Tested
        # where the session changes (with the idle-order move), not on every entry.
        chunks_seen = False
        # A run of entries numbered in one go is skipped over on this iterator.
        numbered = enumerate(entries)
        for index, entry in numbered:
            name = entry.session
            client_seq = entry.client_seq
            state = sessions.get(name)
            refusal = None
            if state is None:
                if not protocol.is_session_name(name):
                    refusal = EntryResult(name, client_seq, Outcome.REJECTED, 0, protocol.RejectReason.BAD_FRAME)
                elif client_seq != 1:
                    refusal = EntryResult(name, client_seq, Outcome.REJECTED, 0, protocol.RejectReason.SEQUENCE_GAP, 1)
                elif not self._make_room(name, log_time):
                    refusal = EntryResult(name, client_seq, Outcome.REJECTED, 0, protocol.RejectReason.TOO_MANY_SESSIONS)
                else:
                    state = _Session(0, log_time, 0, name.startswith(_SNAPSHOT_PREFIX))
                    sessions[name] = state
                    self.session_table_bytes += config.session_bytes(name)
                    last_moved = name
                    if state.snapshot_session:
                        chunks_seen = True
            owner = entry.owner
            if refusal is None and owner and owner != state.owner:
                if entry.claim or not state.owner:
                    state.owner = owner  # a newer hello takes the session over
                else:
                    refusal = EntryResult(name, client_seq, Outcome.REJECTED, 0, protocol.RejectReason.SESSION_TAKEN_OVER)
            if refusal is None:
                last = state.last_client_seq
                if client_seq == last + 1:
                    # New, and so is every entry after it that continues it (the same session
                    # and owner, the next client_seq; a claim changes nothing: the session is
                    # the owner's now): a run is numbered in one go, its session looked up,
                    # checked and moved once. Each entry's digest is the client's (a fenced
                    # entry), else payload_digest.
                    end = index + 1
                    while end < count:
                        following = entries[end]
                        if following.session != name or following.client_seq != client_seq + end - index or following.owner != owner:
                            break
                        end += 1
                    if end == index + 1:
                        payload = entry.payload
                        records.append(encode(seq, log_time, name, client_seq, payload))
                        digest = entry.digest or digest_of(payload)
                        at = last % window_max
                        window_seqs = state.seqs
                        if at == len(window_seqs):
                            window_seqs.append(seq)
                            state.digests.append(digest)
                        else:
                            window_seqs[at] = seq
                            state.digests[at] = digest
                        state.last_client_seq = client_seq
                        seq += 1
                    else:
                        run = entries[index:end]
                        records += encode_run(seq, log_time, name, client_seq, [e.payload for e in run])
                        state.remember(last, seq, [e.digest or digest_of(e.payload) for e in run], window_max)
                        state.last_client_seq = client_seq + len(run) - 1
                        seq += len(run)
                        next(islice(numbered, len(run) - 2, None), None)  # past the run's last entry
                    state.last_active_ns = log_time
                    if name != last_moved:
                        sessions.move_to_end(name)
                        last_moved = name
                        if state.snapshot_session:
                            chunks_seen = True
                    if outcomes is not None:
                        length = state.last_client_seq - client_seq + 1
                        outcomes += [EntryResult(name, client_seq + i, sequenced, seq - length + i) for i in range(length)]
                    continue
                if client_seq <= last:
                    if last - client_seq < len(state.seqs):
                        at = (client_seq - 1) % window_max
                        digest = state.digests[at]
                        if digest and digest != (entry.digest or digest_of(entry.payload)):
                            refusal = EntryResult(name, client_seq, Outcome.REJECTED, 0, protocol.RejectReason.SESSION_CONFLICT)
                        else:
                            refusal = EntryResult(name, client_seq, Outcome.DUPLICATE, state.seqs[at])
                    else:
                        refusal = EntryResult(name, client_seq, Outcome.REJECTED, 0, protocol.RejectReason.STALE_CLIENT_SEQ)
                else:
                    refusal = EntryResult(name, client_seq, Outcome.REJECTED, 0, protocol.RejectReason.SEQUENCE_GAP, last + 1)
            if outcomes is None:
                # Every entry before this one was new and numbered in order.
                outcomes = _all_sequenced(entries[:index], first_seq)
            outcomes.append(refusal)
        blob = b"".join(records)
        if records:
            self.stream_crc = zlib.crc32(blob, self.stream_crc)
        self.next_seq = seq
        if chunks_seen:
            self._index_chunks(entries, outcomes, first_seq, log_time)
        if seq == first_seq:
            return ApplyResult(outcomes if outcomes is not None else [], 0, 0, log_time, b"")
        offsets = list(accumulate(map(len, records[:-1]), initial=0))
        return ApplyResult(outcomes, first_seq, seq - 1, log_time, blob, entries=entries, offsets=offsets)

    # --- the snapshot index ---------------------------------------------------------------

    def _index_chunks(self, entries: list[protocol.Entry], outcomes: list[EntryResult] | None, first_seq: int, log_time: int) -> None:
        """Feed the sequenced entries of snapshot sessions to their uploads (batch order)."""
        sessions = self._sessions
        for index, entry in enumerate(entries):
            if outcomes is None:
                seq = first_seq + index
            else:
                result = outcomes[index]
                if result.outcome is not Outcome.SEQUENCED:
                    continue
                seq = result.seq
            state = sessions.get(entry.session)
            if state is not None and state.snapshot_session:
                self._chunk(entry.session, seq, entry.payload, log_time)

    def _chunk(self, session: str, seq: int, payload: bytes, log_time: int) -> None:
        uploads = self._sm_uploads
        try:
            chunk = protocol.decode_snapshot_chunk(payload)
        except protocol.SmFormatError:
            uploads.pop(session, None)  # whatever it was, it breaks the upload in progress
            return
        if chunk.covered_seq >= seq or chunk.chunk_index >= chunk.chunk_count:
            uploads.pop(session, None)  # a snapshot cannot cover its own or later messages
            return
        size = len(chunk.data)
        if chunk.chunk_index == 0:
            upload = SnapshotUpload(
                session, chunk.sm_type, chunk.schema_version, chunk.covered_seq, chunk.digest, chunk.bytes_sha256,
                chunk.total_bytes, chunk.chunk_count, 1, size, seq, seq,
            )  # fmt: skip
        else:
            upload = uploads.get(session)
            if (
                upload is None
                or chunk.chunk_index != upload.next_index
                or (
                    chunk.sm_type,
                    chunk.schema_version,
                    chunk.covered_seq,
                    chunk.digest,
                    chunk.bytes_sha256,
                    chunk.total_bytes,
                    chunk.chunk_count,
                )
                != (
                    upload.sm_type,
                    upload.schema_version,
                    upload.covered_seq,
                    upload.digest,
                    upload.bytes_sha256,
                    upload.total_bytes,
                    upload.chunk_count,
                )
            ):
                uploads.pop(session, None)
                return
            upload = msgspec.structs.replace(upload, next_index=upload.next_index + 1, bytes_seen=upload.bytes_seen + size, last_seq=seq)
        uploads.pop(session, None)
        if upload.bytes_seen > upload.total_bytes:
            return
        if upload.next_index < upload.chunk_count:
            uploads[session] = upload  # at the end: the most recently extended
            if len(uploads) > SM_SNAPSHOT_UPLOADS_MAX:
                uploads.popitem(last=False)
            return
        if upload.bytes_seen != upload.total_bytes:
            return
        info = protocol.SnapshotInfo(
            upload.sm_type, upload.schema_version, upload.covered_seq, upload.digest, upload.bytes_sha256,
            upload.total_bytes, upload.chunk_count, session, upload.first_seq, seq, log_time,
        )  # fmt: skip
        key = (info.sm_type, info.schema_version)
        index = dict(self._sm_snapshots)
        kept = sorted((*index.get(key, ()), info), key=lambda i: (i.covered_seq, i.last_seq), reverse=True)
        index[key] = tuple(kept[:SM_SNAPSHOTS_PER_KIND])
        if len(index) > SM_SNAPSHOT_KINDS_MAX:
            # The kind whose newest snapshot was completed earliest goes.
            del index[min(index, key=lambda k: (max(i.last_seq for i in index[k]), k))]
        self._sm_snapshots = dict(sorted(index.items()))

    def _expire(self, log_time: int) -> None:
        horizon = log_time - self.config.session_idle_ns
        sessions = self._sessions
        while sessions:
            name, state = next(iter(sessions.items()))
            if state.last_active_ns >= horizon:
                break
            self._forget(name)

    def _forget(self, name: str) -> None:
        del self._sessions[name]
        self.session_table_bytes -= self.config.session_bytes(name)

    def _make_room(self, name: str, log_time: int) -> bool:
        """Whether new session `name` fits the table, after evicting the least recently
        active sessions idle for ``session_evict_idle_ns`` as far as needed (and only then)."""
        config = self.config
        sessions = self._sessions
        needed = config.session_bytes(name)
        horizon = log_time - config.session_evict_idle_ns
        while len(sessions) >= config.sessions_max or self.session_table_bytes + needed > config.session_table_bytes_max:
            if not sessions:
                return False
            oldest, state = next(iter(sessions.items()))
            if state.last_active_ns > horizon:
                return False  # nobody has been idle long enough: refuse the newcomer
            self._forget(oldest)
            self.sessions_evicted += 1
        return True

    # --- snapshots ----------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The whole state as msgspec bytes; equal states give equal bytes."""
        window_max = self.config.dedup_window
        sessions = [
            SessionSnapshot(name, s.last_client_seq, s.last_active_ns, *s.window_in_order(window_max), s.owner)
            for name, s in self._sessions.items()
        ]
        snapshots = [info for infos in self._sm_snapshots.values() for info in infos]
        snap = MachineSnapshot(
            SNAPSHOT_FORMAT_VERSION,
            self.config,
            self.next_seq,
            self.last_log_time_ns,
            self.stream_crc,
            sessions,
            snapshots,
            list(self._sm_uploads.values()),
        )
        return _snapshot_encoder.encode(snap)

    @classmethod
    def restore(cls, data: bytes) -> SequencerMachine:
        """A machine in the state `data` describes. Raises ``SnapshotError`` on a bad snapshot."""
        try:
            snap = _snapshot_decoder.decode(data)
        except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
            raise SnapshotError(f"undecodable snapshot: {exc}") from None
        if snap.format_version not in _SNAPSHOT_FORMATS_READ:
            raise SnapshotError(f"snapshot format {snap.format_version}, this version reads {', '.join(map(str, _SNAPSHOT_FORMATS_READ))}")
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
            if snap.format_version >= 3:
                if len(s.window_digests) != len(s.window_seqs) or any(not 0 <= d < 2**64 for d in s.window_digests):
                    problems.append(f"session {s.session!r}: {len(s.window_digests)} digests for a window of {len(s.window_seqs)}")
                if not 0 <= s.owner < 2**63:
                    problems.append(f"session {s.session!r}: owner out of range")
            elif s.window_digests or s.owner:
                problems.append(f"session {s.session!r}: format {snap.format_version} has no digests or owners")
        if len(snap.sessions) > snap.config.sessions_max:
            problems.append(f"{len(snap.sessions)} sessions exceed sessions_max {snap.config.sessions_max}")
        table_bytes = sum(snap.config.session_bytes(s.session) for s in snap.sessions)
        # An older format knew no byte bound: its table may be over it (no new session is
        # admitted until it is under again).
        if snap.format_version >= 3 and table_bytes > snap.config.session_table_bytes_max:
            problems.append(f"sessions count {table_bytes} bytes, over session_table_bytes_max {snap.config.session_table_bytes_max}")
        problems += _index_problems(snap)
        if problems:
            raise SnapshotError("inconsistent snapshot: " + "; ".join(problems[:5]))
        machine = cls(snap.config)
        machine.next_seq = snap.next_seq
        machine.last_log_time_ns = snap.last_log_time_ns
        machine.stream_crc = snap.stream_crc
        window_max = snap.config.dedup_window
        for s in snap.sessions:
            state = _Session(s.last_client_seq, s.last_active_ns, s.owner, s.session.startswith(_SNAPSHOT_PREFIX))
            count = len(s.window_seqs)
            digests = s.window_digests or [0] * count
            state.seqs = array("q", bytes(8 * count))
            state.digests = array("Q", bytes(8 * count))
            first = s.last_client_seq - count + 1
            for i, (seq, digest) in enumerate(zip(s.window_seqs, digests)):
                at = (first + i - 1) % window_max
                state.seqs[at] = seq
                state.digests[at] = digest
            machine._sessions[s.session] = state
        machine.session_table_bytes = table_bytes
        index: dict[tuple[str, int], list[protocol.SnapshotInfo]] = {}
        for info in snap.snapshots:
            index.setdefault((info.sm_type, info.schema_version), []).append(info)
        machine._sm_snapshots = {key: tuple(infos) for key, infos in index.items()}
        machine._sm_uploads = OrderedDict((u.session, u) for u in snap.uploads)
        return machine

    def state_digest(self) -> str:
        """SHA-256 of the snapshot: equal on two replicas exactly when their states are equal.

        The state includes ``stream_crc``, so equal digests also mean equal streams so far.
        """
        return hashlib.sha256(self.snapshot()).hexdigest()


_SNAPSHOT_PREFIX = protocol.SNAPSHOT_SESSION_PREFIX


def _index_problems(snap: MachineSnapshot) -> list[str]:
    """What is wrong with the snapshot index of `snap`: anything ``_chunk`` could not produce."""
    problems = []
    if snap.format_version == 1 and (snap.snapshots or snap.uploads):
        problems.append("format 1 has no snapshot index")
    last = snap.next_seq - 1
    kinds: dict[tuple[str, int], list[protocol.SnapshotInfo]] = {}
    previous_key = None
    for info in snap.snapshots:
        key = (info.sm_type, info.schema_version)
        if key != previous_key and key in kinds:
            problems.append(f"snapshot index: kind {key} is not contiguous")
        if previous_key is not None and key < previous_key:
            problems.append(f"snapshot index: kind {key} out of order")
        previous_key = key
        kinds.setdefault(key, []).append(info)
        if not info.session.startswith(_SNAPSHOT_PREFIX):
            problems.append(f"snapshot index: session {info.session!r} is not a snapshot session")
        if not info.covered_seq < info.first_seq <= info.last_seq <= last:
            problems.append(f"snapshot index: {key} covered {info.covered_seq}, chunks {info.first_seq}..{info.last_seq} (last seq {last})")
        if info.last_seq - info.first_seq + 1 < info.chunk_count:
            problems.append(f"snapshot index: {key} has {info.chunk_count} chunks in {info.first_seq}..{info.last_seq}")
        if info.log_time_ns > snap.last_log_time_ns:
            problems.append(f"snapshot index: {key} completed after the last log time")
    if len(kinds) > SM_SNAPSHOT_KINDS_MAX:
        problems.append(f"snapshot index: {len(kinds)} kinds exceed {SM_SNAPSHOT_KINDS_MAX}")
    for key, infos in kinds.items():
        order = [(i.covered_seq, i.last_seq) for i in infos]
        if len(infos) > SM_SNAPSHOTS_PER_KIND or order != sorted(set(order), reverse=True):
            problems.append(f"snapshot index: kind {key} holds {len(infos)} snapshots, not newest first")
    if len(snap.uploads) > SM_SNAPSHOT_UPLOADS_MAX:
        problems.append(f"{len(snap.uploads)} snapshot uploads exceed {SM_SNAPSHOT_UPLOADS_MAX}")
    if len({u.session for u in snap.uploads}) != len(snap.uploads):
        problems.append("a snapshot session has two uploads")
    previous_last = 0
    for u in snap.uploads:
        if not u.session.startswith(_SNAPSHOT_PREFIX):
            problems.append(f"upload: session {u.session!r} is not a snapshot session")
        if not (1 <= u.next_index < u.chunk_count <= protocol.SNAPSHOT_CHUNKS_MAX and 0 <= u.bytes_seen <= u.total_bytes):
            problems.append(f"upload of {u.session!r}: {u.next_index} of {u.chunk_count} chunks, {u.bytes_seen} of {u.total_bytes} bytes")
        if not (1 <= u.covered_seq < u.first_seq <= u.last_seq <= last) or u.last_seq - u.first_seq + 1 < u.next_index:
            problems.append(f"upload of {u.session!r}: covered {u.covered_seq}, chunks {u.first_seq}..{u.last_seq} (last seq {last})")
        if u.last_seq <= previous_last:
            problems.append(f"upload of {u.session!r}: uploads are not in the order they were extended")
        previous_last = u.last_seq
    return problems


__all__ = [
    "SNAPSHOT_FORMAT_VERSION",
    "ApplyResult",
    "EntryResult",
    "MachineConfig",
    "MachineSnapshot",
    "Outcome",
    "SequencerMachine",
    "SnapshotError",
    "SnapshotUpload",
    "payload_digest",
]
