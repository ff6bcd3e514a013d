"""``RaftLogStore``: the node's Raft log on disk, in place of pysyncobj's ``FileJournal``.

pysyncobj's ``FileJournal`` keeps the log in an mmapped file that is never synced, writes term
and vote with a rename and no fsync, has no checksums and a 4 GiB cap, and dies of SIGBUS on a
full disk. This store speaks pysyncobj's journal interface (``add``, ``clear``,
``deleteEntriesFrom``/``To``, indexing, the commit index, term and vote) over plain files:

* **Segments.** The log is a sequence of files ``log-NNNNNNNN.seg`` in the Raft directory, each
  a header (``SEGMENT_MAGIC``, ``FORMAT_VERSION``) and records appended with ``os.write``
  (no mmap, no O_DIRECT: a data directory on a FUSE mount works). A segment ends before it
  would pass ``RAFT_LOG_SEGMENT_BYTES_MAX``.
* **Records.** ``RECORD_MAGIC``, the body's length and a CRC-32 of length and body, then the
  body: an entry (index, term, command), or an operation on the entries before it: truncate from
  an index (a follower's conflict), drop those before an index (compaction), clear (a snapshot
  installed), the commit index (every second). Opening replays the records in order.
* **Compaction** appends one record and deletes the segments whose every entry was dropped:
  nothing is rewritten (``FileJournal`` rewrote the whole log on each compaction).
* **Torn tail.** A bad record in the last segment with no good record after it is a write cut
  short: the segment is cut there on open. A bad record anywhere else (a good one follows it,
  or it is not in the last segment) is damage: opening raises ``RaftLogDamaged`` naming the
  file and the byte offset, and the node refuses to start (``NodeExit.RAFT_LOG_DAMAGED``).
  In power mode a power cut can leave good records after a bad one: the writer's last batch
  may reach the disk in pieces (a page lost, the next one kept). So the power-mode writer
  begins each batch after an fsync with a ``SYNCED_TO`` record naming how far the segment was
  synced; in a segment holding such records, a bad record in the last segment is damage only
  when a later ``SYNCED_TO`` names an offset past it (an fsync covered it), and a torn tail
  otherwise: nothing from it on was ever covered by an fsync, so nothing there was acknowledged.
* **Term and vote** live in their own small file, ``term``, replaced by write, fsync, rename
  and a directory fsync before ``setCurrentTerm`` returns (so before any vote or message of
  the new term leaves the node), in both durability modes.
* **Memory.** Every entry stays in RAM until compaction drops it, as with ``FileJournal``: the
  log holds at most ``raft.log_compaction_min_entries`` entries plus those of
  ``raft.log_compaction_min_time_s``, each below ``raft.append_entries_batch_bytes``.

Durability (``durability``):

* ``"crash"``: each record is written to the file before ``add`` returns (it survives a kill
  of the process: the kernel holds it), never fsynced.
* ``"power"``: ``add`` queues the record for a writer thread that writes everything queued and
  covers it with one ``fdatasync`` (group commit); the loop never waits for the disk. Past
  ``RAFT_LOG_WRITE_QUEUE_BYTES_MAX`` bytes queued (a stalled disk) ``writer_backlogged()`` says
  so and the node takes no new entries: the leader's gateway answers submits with
  ``Busy("raft_log_backlog")`` and a follower drops AppendEntries that carry entries (as a
  lost message; the leader sends them again), so the queue exceeds the bound by at most what
  was admitted before (the batcher's ``held_bytes_max``) and a few small records.
  ``durable_index()`` is the
  last index whose entries, and every one before, are on disk as the log holds them now;
  ``on_durable`` is called (from the writer thread) when it may have risen. An error from a
  write or an fsync ends the process at once (``NodeExit.DISK_FAILED``): what the kernel
  failed to write is never taken as written (fsync does not report the same error twice).
  Opening in this mode first fsyncs what the directory holds, so a directory written in crash
  mode is durable before the power mode relies on it.

Migration: a Raft directory of an earlier release holds pysyncobj's ``raft.log`` (and
``raft.log.meta``). Opening it converts every entry, the commit index, term and vote into the
new files, fsyncs them, and then renames the old files to ``*.migrated`` and puts a directory
named ``raft.log`` in their place: an earlier release started on a converted directory fails to
open its log ("Is a directory") and refuses to start, rather than start with an empty log.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable

from raftseq.cluster.config import (
    DURABILITY_MODES,
    RAFT_LOG_CLOSE_WAIT_S,
    RAFT_LOG_RECORD_BYTES_MAX,
    RAFT_LOG_SEGMENT_BYTES_MAX,
    RAFT_LOG_WRITE_QUEUE_BYTES_MAX,
)
from raftseq.cluster.node_exit import NodeExit
from raftseq.cluster.raft import safe_pickle

log = logging.getLogger("raftseq.raft_log")

FORMAT_VERSION = 1
SEGMENT_MAGIC = b"RSQRAFT\x00"
_SEGMENT_HEADER = struct.Struct("<8sII")  # magic, format version, segment number
RECORD_MAGIC = b"\xc3RL\x01"
_RECORD_HEADER = struct.Struct("<4sII")  # magic, body length, crc32(body, length)
_ENTRY = struct.Struct("<BQQ")  # kind, index, term; the command follows
_OP = struct.Struct("<BQ")  # kind, index
ENTRY, TRUNCATE_FROM, DROP_BEFORE, CLEAR, COMMIT, SYNCED_TO = 1, 2, 3, 4, 5, 6

TERM_FILE = "term"
TERM_MAGIC = b"RSQTERM\x00"
_TERM = struct.Struct("<8sIQH")  # magic, format version, term, length of voted-for (0xFFFF: None)
_NO_VOTE = 0xFFFF
#: Errors opening a file that say the process has no file descriptor left, not that the disk
#: failed: writing the term file is then refused (and retried), the node goes on.
_OUT_OF_FILES = (errno.EMFILE, errno.ENFILE)
#: pysyncobj's log file name, kept as a directory once converted (see the module doc).
LEGACY_LOG = "raft.log"
_LEGACY_HEADER_BYTES = 40  # name (24), version (8), format version (4), end of records (4)
_SEGMENT_NAME = re.compile(r"^log-(\d{8})\.seg$")
_MARKER_NOTE = (
    "The Raft log of this directory is in raftseq's own format (log-*.seg, term), converted\n"
    "from pysyncobj's raft.log (kept as raft.log.migrated). Releases that read raft.log cannot\n"
    "read it: this directory stands in its place so that they refuse to start.\n"
)


class RaftLogDamaged(Exception):
    """A Raft log file is damaged somewhere other than a torn tail: the node must not start."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path} at byte {offset}: {reason}")
        self.path = path
        self.offset = offset


def disk_error(what: str, exc: OSError) -> str:
    """One line for a write or sync that failed: a full disk says so, and what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what}: the disk is full ({exc.strerror}); free space, then restart the node"
    return f"{what}: {exc}"


def disk_failed(message: str) -> None:
    """The disk under the Raft log failed: log one line and end the process at once."""
    log.critical("%s; stopping the node (exit %d): what the disk refused is never taken as written", message, NodeExit.DISK_FAILED)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - nothing may stop the exit
            pass
    os._exit(NodeExit.DISK_FAILED)


def sync_directory(path: str, fsync: Callable[[int], None] | None = None) -> None:
    """fsync a directory (its entries: created, renamed and removed files)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (fsync or os.fsync)(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS):
            raise
        # A file system that cannot sync directories (some FUSE ones) orders them itself.
    finally:
        os.close(fd)


def _encode(body: bytes) -> bytes:
    return _RECORD_HEADER.pack(RECORD_MAGIC, len(body), zlib.crc32(body, len(body))) + body


def _record_at(data: bytes | memoryview, offset: int) -> tuple[int, memoryview] | str:
    """(end offset, body) of the record at `offset`, or why there is none."""
    end = offset + _RECORD_HEADER.size
    if end > len(data):
        return "a record header cut short"
    magic, length, crc = _RECORD_HEADER.unpack_from(data, offset)
    if magic != RECORD_MAGIC:
        return "no record starts here"
    if length > RAFT_LOG_RECORD_BYTES_MAX or length < 1:
        return f"a record length of {length} bytes"
    if end + length > len(data):
        return "a record cut short"
    body = memoryview(data)[end : end + length]
    if zlib.crc32(body, length) != crc:
        return "a record whose checksum does not match"
    return end + length, body


def _good_record_after(data: bytes, offset: int) -> bool:
    """Whether a whole, checksummed record starts anywhere after `offset`."""
    at = data.find(RECORD_MAGIC, offset + 1)
    while at >= 0:
        if not isinstance(_record_at(data, at), str):
            return True
        at = data.find(RECORD_MAGIC, at + 1)
    return False


def _never_synced(data: bytes, offset: int) -> bool:
    """Whether no fsync covered the byte at `offset`: no whole ``SYNCED_TO`` record after it
    names an offset past it (the power-mode writer's proof; see the module doc)."""
    at = data.find(RECORD_MAGIC, offset + 1)
    while at >= 0:
        found = _record_at(data, at)
        if not isinstance(found, str):
            body = found[1]
            if body[0] == SYNCED_TO and len(body) == _OP.size and _OP.unpack_from(body)[1] > offset:
                return False
        at = data.find(RECORD_MAGIC, at + 1)
    return True


def _segment_path(directory: str, number: int) -> str:
    return os.path.join(directory, f"log-{number:08d}.seg")


def segment_numbers(directory: str) -> list[int]:
    found = (_SEGMENT_NAME.match(name) for name in os.listdir(directory))
    return sorted(int(m.group(1)) for m in found if m)


class _Pending:
    """One record queued for the writer thread."""

    __slots__ = ("data", "delete_below", "end", "entries", "segment", "seq", "sync_dir_first")

    def __init__(self, seq: int, data: bytes, segment: int, end: int, entries: int) -> None:
        self.seq = seq
        self.data = data
        self.segment = segment
        self.end = end  # the log's last index once this record is applied
        self.entries = entries
        self.sync_dir_first = False  # a snapshot renamed into the directory must be durable first
        self.delete_below = 0  # segments below this number hold no entry once this is written


class _SegmentFiles:
    """The open segment (writes go to it) and the creation of the next ones."""

    def __init__(self, directory: str, number: int, fsync: Callable[[int], None], fsync_dir: Callable[[int], None], power: bool) -> None:
        self.directory = directory
        self.number = number
        self.fsync = fsync
        self.fsync_dir = fsync_dir
        self.power = power
        self.fd = -1
        self.dir_dirty = False
        #: Bytes in the open segment, and how many of them the last fsync covered.
        self.size = 0
        self.synced_size = 0
        #: Power mode: the next write begins with a ``SYNCED_TO`` record (see the module doc).
        self.mark_synced = power
        if number:
            self.fd = os.open(_segment_path(directory, number), os.O_WRONLY | os.O_APPEND)
            # Power mode synced every file on open: all of it is durable.
            self.size = self.synced_size = os.fstat(self.fd).st_size

    def write(self, segment: int, data: bytes) -> None:
        if segment != self.number:
            self._start(segment)
        if self.mark_synced:
            data = _encode(_OP.pack(SYNCED_TO, self.synced_size)) + data
            self.mark_synced = False
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.size += len(data)

    def _start(self, number: int) -> None:
        if self.fd >= 0:
            if self.power:
                self.fsync(self.fd)  # the segment before is whole on disk before the next one counts
            os.close(self.fd)
        self.fd = os.open(_segment_path(self.directory, number), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        self.number = number
        self.dir_dirty = True
        os.write(self.fd, _SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, number))
        self.size, self.synced_size, self.mark_synced = _SEGMENT_HEADER.size, 0, self.power

    def sync(self) -> None:
        if self.fd >= 0:
            self.fsync(self.fd)
            if self.synced_size != self.size:
                self.synced_size, self.mark_synced = self.size, self.power
        if self.dir_dirty:
            sync_directory(self.directory, self.fsync_dir)
            self.dir_dirty = False

    def delete_below(self, number: int) -> None:
        for old in segment_numbers(self.directory):
            if old < number and old != self.number:
                os.unlink(_segment_path(self.directory, old))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RaftLogStore:
    """pysyncobj's journal interface over the files above; see the module doc.

    Built and used on one thread (the node's loop); in power mode a writer thread of its own
    writes and syncs. ``fsync`` is what syncs the segments and the directory (``os.fdatasync``
    and ``os.fsync``; tests pass their own); the term file is always synced with ``os.fsync``.
    """

    def __init__(self, directory: str, *, durability: str = "crash", fsync: Callable[[int], None] | None = None) -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}, got {durability!r}")
        self.directory = directory
        self.durability = durability
        self.power = durability == "power"
        self._fsync = fsync or os.fdatasync  # segments: their data (and size)
        self._fsync_full = fsync or os.fsync  # the term file and the directory
        #: Called from the writer thread after a group commit (power mode); set by the member.
        self.on_durable: Callable[[], None] | None = None
        #: Called with (seconds, entries) after each group commit; set by the node's metrics.
        self.sync_observer: Callable[[float, int], None] | None = None
        self.entries_migrated = 0
        self.bytes_cut = 0
        self.syncs = 0
        self.entries_synced = 0
        #: Set by the node while free disk is below ``journal.disk_free_bytes_min``: a follower
        #: then takes no new entries (``refusing_entries``), the leader's gateway none either.
        self.space_low = False
        #: Truncations and clears so far (a reply held for an entry since cut is dropped).
        self.cuts = 0
        self._entries: list[tuple[bytes, int, int]] = []
        self._entry_segments: list[int] = []
        self._commit_index = 1
        self._commit_recorded = 1
        self._term = 0
        self._voted_for: str | None = None
        self._term_unsaved = False
        os.makedirs(directory, exist_ok=True)
        legacy = os.path.join(directory, LEGACY_LOG)
        if os.path.isfile(legacy):
            self._migrate(legacy)
        elif not os.path.isdir(legacy):
            self._mark_converted(legacy)
        self._read_term()
        numbers = segment_numbers(directory)
        for number in numbers:
            self._replay(number, last=number == numbers[-1])
        self._segment = numbers[-1] if numbers else 0
        self._segment_bytes = os.path.getsize(_segment_path(directory, self._segment)) if numbers else 0
        self._files = _SegmentFiles(directory, self._segment, self._fsync, self._fsync_full, self.power)
        if self.power:
            self._sync_everything(numbers)
        # power mode: what the writer thread shares with the loop (under _lock)
        self._lock = threading.Condition()
        self._queue: list[_Pending] = []
        self._queue_bytes = 0
        self._queued_seq = 0
        self._synced_seq = 0
        self._synced_end = self._last_index()
        self._pending_cuts: deque[tuple[int, int]] = deque()  # (seq, end) of truncations not yet synced
        self._stopping = False
        self._closed = False
        self._writer: threading.Thread | None = None
        if self.power:
            self._writer = threading.Thread(target=self._write_loop, name="raft-log-writer", daemon=True)
            self._writer.start()

    # --- pysyncobj's journal interface ---------------------------------------------------------

    def add(self, command, idx, term) -> None:
        command = bytes(command)
        if self._entries:
            assert idx == self._entries[-1][1] + 1, f"Raft entry {idx} added after {self._entries[-1][1]}"
        head = _ENTRY.pack(ENTRY, idx, term)
        length = len(head) + len(command)
        crc = zlib.crc32(command, zlib.crc32(head, length))
        record = b"".join((_RECORD_HEADER.pack(RECORD_MAGIC, length, crc), head, command))
        self._entries.append((command, idx, term))
        self._entry_segments.append(self._submit(record, entries=1).segment)

    def clear(self) -> None:
        self._entries = []
        self._entry_segments = []
        self._submit(_encode(bytes([CLEAR])), cut=True)

    def deleteEntriesFrom(self, entryFrom) -> None:  # noqa: N802,N803 (pysyncobj's names)
        if entryFrom >= len(self._entries):
            return
        index = self._entries[entryFrom][1]
        del self._entries[entryFrom:]
        del self._entry_segments[entryFrom:]
        self._submit(_encode(_OP.pack(TRUNCATE_FROM, index)), cut=True)

    def deleteEntriesTo(self, entryTo) -> None:  # noqa: N802,N803 (pysyncobj's names)
        if entryTo <= 0 or not self._entries:
            return
        index = self._entries[entryTo][1] if entryTo < len(self._entries) else self._entries[-1][1] + 1
        self._entries = self._entries[entryTo:]
        self._entry_segments = self._entry_segments[entryTo:]
        # The snapshot covering the dropped entries was renamed into the directory: that name is
        # synced before this record can reach the disk, and segments go only after it did.
        pending = self._submit(_encode(_OP.pack(DROP_BEFORE, index)), drop=True)
        if not self.power:
            self._files.delete_below(pending.delete_below)

    def __getitem__(self, item):
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        self.close()

    def flush(self) -> None:
        """Nothing waits here: crash mode wrote every record already, power mode syncs on its own."""

    def setRaftCommitIndex(self, raftCommitIndex) -> None:  # noqa: N802,N803 (pysyncobj's names)
        self._commit_index = raftCommitIndex

    def getRaftCommitIndex(self) -> int:  # noqa: N802 (pysyncobj's name)
        return max(1, min(self._commit_index, self._last_index()))

    def setCurrentTerm(self, term, votedForNodeId) -> None:  # noqa: N802,N803 (pysyncobj's names)
        self._term = term
        self._voted_for = votedForNodeId
        self._write_term()

    def getCurrentTerm(self) -> int:  # noqa: N802 (pysyncobj's name)
        return self._term

    def getVotedForNodeId(self):  # noqa: N802 (pysyncobj's name)
        return self._voted_for

    def onOneSecondTimer(self) -> None:  # noqa: N802 (pysyncobj's name)
        if self._term_unsaved:
            self._write_term()
        if self._commit_index != self._commit_recorded:
            self._commit_recorded = self._commit_index
            self._submit(_encode(_OP.pack(COMMIT, self._commit_index)))

    # --- ours -----------------------------------------------------------------------------------

    def durable_index(self) -> int:
        """The last index such that it and every entry before it are on disk as held now
        (crash mode: the last index, for the kernel holds every record written)."""
        last = self._last_index()
        if not self.power:
            return last
        with self._lock:
            synced_seq, durable = self._synced_seq, self._synced_end
            for seq, end in self._pending_cuts:
                if seq > synced_seq:
                    durable = min(durable, end)
        return min(durable, last)

    def writer_backlog_bytes(self) -> int:
        """Bytes queued for the writer thread and not yet on disk (0 in crash mode). Read
        without the lock: one int, written under it by either thread."""
        return self._queue_bytes

    def refusing_entries(self) -> bool:
        """Whether the node should take no new entries: the writer is backlogged, or free disk
        is below the minimum (``space_low``, set by the node's disk check)."""
        return self.space_low or self.writer_backlogged()

    def writer_backlogged(self) -> bool:
        """More than ``RAFT_LOG_WRITE_QUEUE_BYTES_MAX`` bytes wait for the writer (a stalled
        disk): the node takes no new entries until it catches up."""
        return self._queue_bytes > RAFT_LOG_WRITE_QUEUE_BYTES_MAX

    def align_to_snapshot(self, previous: tuple, last_applied: tuple) -> None:
        """Drop the entries before a snapshot's `previous` entry when the log holds both of its
        entries: a compaction whose snapshot reached the disk but whose record dropping the
        entries did not. (pysyncobj compares the log's first two entries with the snapshot's
        and, when they differ, clears the whole log, entries after the snapshot included.)"""
        if len(self._entries) < 2 or self._entries[0][1] >= previous[1]:
            return
        at = previous[1] - self._entries[0][1]
        if at + 1 < len(self._entries) and self._entries[at] == tuple(previous) and self._entries[at + 1] == tuple(last_applied):
            log.info("Raft log aligned to the snapshot: entries before %d dropped", previous[1])
            self.deleteEntriesTo(at)

    def close(self) -> None:
        """Write what is queued (and the commit index) and close the files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.onOneSecondTimer()  # the commit index, for the next start's replay
        if self._writer is not None:
            with self._lock:
                self._stopping = True
                self._lock.notify_all()
            self._writer.join(RAFT_LOG_CLOSE_WAIT_S)
            assert not self._writer.is_alive(), f"the Raft log writer did not finish in {RAFT_LOG_CLOSE_WAIT_S} s"
            self._writer = None
        self._files.close()

    # --- writing ----------------------------------------------------------------------------------

    def _last_index(self) -> int:
        return self._entries[-1][1] if self._entries else 0

    def _submit(self, record: bytes, *, entries: int = 0, cut: bool = False, drop: bool = False) -> _Pending:
        """Write `record` (crash mode) or queue it for the writer (power mode). `cut`: it cuts
        the log's end; `drop`: it drops compacted entries."""
        self.cuts += cut
        if self._segment == 0 or (
            self._segment_bytes + len(record) > RAFT_LOG_SEGMENT_BYTES_MAX and self._segment_bytes > _SEGMENT_HEADER.size
        ):
            self._segment += 1
            self._segment_bytes = _SEGMENT_HEADER.size
        self._segment_bytes += len(record)
        pending = _Pending(0, record, self._segment, self._last_index(), entries)
        if drop:
            pending.sync_dir_first = True
            pending.delete_below = self._entry_segments[0] if self._entry_segments else self._segment
        if not self.power:
            try:
                self._files.write(pending.segment, record)
            except OSError as exc:
                disk_failed(disk_error(f"cannot write the Raft log in {self.directory}", exc))
            return pending
        with self._lock:
            # Never waits for the writer, however much is queued: the node stops taking new
            # entries while ``writer_backlogged()`` (see the module doc).
            self._queued_seq += 1
            pending.seq = self._queued_seq
            self._queue.append(pending)
            self._queue_bytes += len(record)
            if cut:
                self._pending_cuts.append((pending.seq, pending.end))
            self._lock.notify_all()
        return pending

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                batch, self._queue = self._queue, []
                if not batch:
                    return
            try:
                self._write_batch(batch)
            except OSError as exc:
                disk_failed(disk_error(f"cannot write or sync the Raft log in {self.directory}", exc))
            with self._lock:
                self._queue_bytes -= sum(len(p.data) for p in batch)
                self._synced_seq = batch[-1].seq
                self._synced_end = batch[-1].end
                while self._pending_cuts and self._pending_cuts[0][0] <= self._synced_seq:
                    self._pending_cuts.popleft()
                self._lock.notify_all()
            if self.on_durable is not None:
                self.on_durable()

    def _write_batch(self, batch: list[_Pending]) -> None:
        chunks: list[bytes] = []
        segment = batch[0].segment
        for pending in batch:
            if pending.segment != segment or pending.sync_dir_first:
                self._files.write(segment, b"".join(chunks))
                chunks, segment = [], pending.segment
            if pending.sync_dir_first:
                sync_directory(self.directory, self._fsync_full)
            chunks.append(pending.data)
        self._files.write(segment, b"".join(chunks))
        started = time.perf_counter()
        self._files.sync()
        elapsed = time.perf_counter() - started
        entries = sum(p.entries for p in batch)
        self.syncs += 1
        self.entries_synced += entries
        if self.sync_observer is not None:
            self.sync_observer(elapsed, entries)
        below = max(p.delete_below for p in batch)
        if below:
            self._files.delete_below(below)

    def _sync_everything(self, numbers: list[int]) -> None:
        """fsync every file and the directory: what an earlier run (maybe in crash mode) wrote."""
        try:
            for number in numbers:
                fd = os.open(_segment_path(self.directory, number), os.O_RDONLY)
                try:
                    self._fsync(fd)
                finally:
                    os.close(fd)
            sync_directory(self.directory, self._fsync_full)
            # The log's own name, and the data directory's, are entries of the directories
            # above: a directory made since the last sync of its parent is lost with it.
            parent = os.path.dirname(os.path.abspath(self.directory))
            for above in (parent, os.path.dirname(parent)):
                sync_directory(above)
        except OSError as exc:
            disk_failed(f"cannot sync the Raft log in {self.directory}: {exc}")

    # --- reading ----------------------------------------------------------------------------------

    def _replay(self, number: int, *, last: bool) -> None:
        path = _segment_path(self.directory, number)
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < _SEGMENT_HEADER.size and last:
            self._cut(path, 0, len(data), "a segment header cut short")
            os.unlink(path)
            return
        magic, version, found = _SEGMENT_HEADER.unpack_from(data, 0) if len(data) >= _SEGMENT_HEADER.size else (b"", 0, 0)
        if magic != SEGMENT_MAGIC:
            raise RaftLogDamaged(path, 0, "not a raftseq Raft log segment")
        if version != FORMAT_VERSION:
            raise RaftLogDamaged(path, 8, f"format version {version}: this release reads version {FORMAT_VERSION} only")
        if found != number:
            raise RaftLogDamaged(path, 12, f"segment number {found} in a file named for {number}")
        offset = _SEGMENT_HEADER.size
        marked = False  # a SYNCED_TO record was read: the power-mode writer wrote this segment
        while offset < len(data):
            found_record = _record_at(data, offset)
            if isinstance(found_record, str):
                if last and (_never_synced(data, offset) if marked else not _good_record_after(data, offset)):
                    self._cut(path, offset, len(data) - offset, found_record)
                    return
                raise RaftLogDamaged(path, offset, found_record)
            end, body = found_record
            marked = marked or body[0] == SYNCED_TO
            problem = self._apply(body, number)
            if problem:
                raise RaftLogDamaged(path, offset, problem)
            offset = end

    def _apply(self, body: memoryview, segment: int) -> str:
        kind = body[0]
        if kind == ENTRY and len(body) >= _ENTRY.size:
            _, idx, term = _ENTRY.unpack_from(body)
            if self._entries and idx != self._entries[-1][1] + 1:
                return f"entry {idx} follows entry {self._entries[-1][1]}"
            self._entries.append((bytes(body[_ENTRY.size :]), idx, term))
            self._entry_segments.append(segment)
        elif kind == CLEAR and len(body) == 1:
            self._entries, self._entry_segments = [], []
        elif kind == SYNCED_TO and len(body) == _OP.size:
            pass  # read by _replay when it meets a bad record
        elif kind in (TRUNCATE_FROM, DROP_BEFORE, COMMIT) and len(body) == _OP.size:
            _, index = _OP.unpack_from(body)
            first = self._entries[0][1] if self._entries else index
            at = max(0, min(len(self._entries), index - first))
            if kind == TRUNCATE_FROM:
                del self._entries[at:], self._entry_segments[at:]
            elif kind == DROP_BEFORE:
                del self._entries[:at], self._entry_segments[:at]
            else:
                self._commit_index = self._commit_recorded = index
        else:
            return f"a record of kind {kind} and {len(body)} bytes"
        return ""

    def _cut(self, path: str, offset: int, length: int, reason: str) -> None:
        log.warning("Raft log tail cut: %d bytes of %s from byte %d (%s: a write cut short)", length, path, offset, reason)
        self.bytes_cut += length
        with open(path, "r+b") as f:
            f.truncate(offset)
            if self.power:
                self._fsync(f.fileno())

    # --- term and vote ----------------------------------------------------------------------------

    def _term_bytes(self) -> bytes:
        voted = b"" if self._voted_for is None else str(self._voted_for).encode()
        assert len(voted) < _NO_VOTE, "a node id too long for the term file"
        head = _TERM.pack(TERM_MAGIC, FORMAT_VERSION, self._term, _NO_VOTE if self._voted_for is None else len(voted)) + voted
        return head + struct.pack("<I", zlib.crc32(head))

    def _write_term(self) -> None:
        path = os.path.join(self.directory, TERM_FILE)
        temporary = path + ".tmp"
        try:
            with open(temporary, "wb") as f:
                f.write(self._term_bytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
            sync_directory(self.directory)
        except OSError as exc:
            if exc.errno not in _OUT_OF_FILES:
                disk_failed(f"cannot write the Raft term and vote to {path}: {exc}")
            # No file could be opened: nothing was written, the disk did not fail. The caller
            # (pysyncobj's handler) stops here, sending nothing of the new term; the next
            # setCurrentTerm, or the one-second timer, writes it again.
            self._term_unsaved = True
            log.warning("cannot write the Raft term and vote to %s now: %s; nothing of term %d is sent until it is", path, exc, self._term)
            raise
        self._term_unsaved = False

    def _read_term(self) -> None:
        path = os.path.join(self.directory, TERM_FILE)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        if len(data) < _TERM.size + 4 or data[:8] != TERM_MAGIC:
            raise RaftLogDamaged(path, 0, "not a raftseq term file")
        magic, version, term, voted_length = _TERM.unpack_from(data)
        if version != FORMAT_VERSION:
            raise RaftLogDamaged(path, 8, f"format version {version}: this release reads version {FORMAT_VERSION} only")
        end = _TERM.size + (0 if voted_length == _NO_VOTE else voted_length)
        if len(data) != end + 4 or struct.unpack_from("<I", data, end)[0] != zlib.crc32(data[:end]):
            raise RaftLogDamaged(path, 0, "the term file's checksum does not match")
        self._term = term
        self._voted_for = None if voted_length == _NO_VOTE else data[_TERM.size : end].decode()

    # --- conversion from pysyncobj's FileJournal ------------------------------------------------

    def _migrate(self, legacy: str) -> None:
        """Convert pysyncobj's raft.log (and raft.log.meta) into segments and a term file."""
        entries = read_file_journal(legacy)
        meta: dict = {}
        meta_path = legacy + ".meta"
        if os.path.exists(meta_path):
            try:
                with open(meta_path, "rb") as f:
                    loaded = safe_pickle.loads(f.read())
                meta = loaded if isinstance(loaded, dict) else {}
            except Exception as exc:  # noqa: BLE001 - as pysyncobj: unreadable metadata is none
                log.warning("the metadata of %s is unreadable (%r): term and vote start from the log", legacy, exc)
        for number in segment_numbers(self.directory):  # a conversion cut short: start again
            os.unlink(_segment_path(self.directory, number))
        term = meta.get("currentTerm", 0)
        voted = meta.get("votedForNodeId")
        commit = meta.get("raftCommitIndex", 1)
        self._term = term if isinstance(term, int) else 0
        self._voted_for = voted if isinstance(voted, str) else None
        records = [_encode(_ENTRY.pack(ENTRY, idx, t) + bytes(command)) for command, idx, t in entries]
        if isinstance(commit, int):
            records.append(_encode(_OP.pack(COMMIT, commit)))
        path = _segment_path(self.directory, 1)
        with open(path, "wb") as f:
            f.write(_SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, 1))
            for record in records:
                f.write(record)
            f.flush()
            os.fsync(f.fileno())
        self._write_term()
        os.replace(legacy, legacy + ".migrated")
        if os.path.exists(meta_path):
            os.replace(meta_path, meta_path + ".migrated")
        self._mark_converted(legacy)
        self.entries_migrated = len(entries)
        log.warning(
            "Raft log converted from pysyncobj's %s: %d entries (the old file is kept as %s.migrated)", legacy, len(entries), legacy
        )

    def _mark_converted(self, legacy: str) -> None:
        os.makedirs(legacy, exist_ok=True)
        with open(os.path.join(legacy, "README"), "w") as f:
            f.write(_MARKER_NOTE)
            f.flush()
            os.fsync(f.fileno())
        sync_directory(self.directory)


def read_file_journal(path: str) -> list[tuple[bytes, int, int]]:
    """The entries of pysyncobj 0.3.17's ``FileJournal`` file at `path` (its records are
    ``size, index, term, command, size`` after a 40-byte header ending in the records' end)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _LEGACY_HEADER_BYTES:
        raise RaftLogDamaged(path, 0, "shorter than pysyncobj's log header")
    end = struct.unpack_from("<I", data, _LEGACY_HEADER_BYTES - 4)[0]
    if end > len(data):
        raise RaftLogDamaged(path, _LEGACY_HEADER_BYTES - 4, f"records end at byte {end}, past the file's {len(data)}")
    entries = []
    offset = _LEGACY_HEADER_BYTES
    while offset < end:
        if offset + 4 > end:
            raise RaftLogDamaged(path, offset, "a record size cut short")
        (size,) = struct.unpack_from("<I", data, offset)
        if size < 16 or offset + 8 + size > end or struct.unpack_from("<I", data, offset + 4 + size)[0] != size:
            raise RaftLogDamaged(path, offset, f"a record of {size} bytes that does not fit")
        idx, term = struct.unpack_from("<QQ", data, offset + 4)
        entries.append((data[offset + 20 : offset + 4 + size], idx, term))
        offset += size + 8
    return entries
