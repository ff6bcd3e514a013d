"""The journal directory: opening it, appending records, holes, fsync, handing out cursors.

One thread appends; any number of cursors read, each through its own file handle, up to a
limit the caller publishes after ``append`` returned. When a segment reaches
``segment_bytes_max`` it is sealed (fsynced unless the policy is ``never``, and given its index
file) and the next batch starts a new segment. Each batch is written at the offset the
segment's index says (never at the file's end), so a file changed under the journal never
shifts a record; damage found in the tail seals it early and is repaired like a sealed
segment's (``mark_damaged``, ``repair``).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Collection, Iterator
from typing import Literal

import msgspec

from raftseq.sequencer import limits, protocol
from raftseq.sequencer.journal.cursor import JournalCursor
from raftseq.sequencer.journal.damage import Damage, DamageMap
from raftseq.sequencer.journal.errors import JournalCorruptError, JournalError, JournalRecordError
from raftseq.sequencer.journal.holes import HoleFill, merge_adjacent, write_holes
from raftseq.sequencer.journal.index import index_path, write_index
from raftseq.sequencer.journal.records import check_ends, check_records
from raftseq.sequencer.journal.recovery import RecoveryReport, recover, tail_damage
from raftseq.sequencer.journal.retention import read_first_retained, write_first_retained
from raftseq.sequencer.journal.segments import FILE_MODE, HEADER_BYTES, ClosedOnExit, Segment, fsync_dir, pwrite_all, segment_name


class FsyncPolicy(msgspec.Struct, frozen=True):
    """When appended bytes are forced to disk.

    ``never``: left to the operating system (survives a process kill, not a power loss).
    ``batch``: after every ``append``. ``interval``: at the first append at least
    ``interval_ms`` after the previous fsync, and on ``sync_if_due()``.
    """

    mode: Literal["never", "batch", "interval"] = "never"
    interval_ms: int = 0

    @classmethod
    def parse(cls, text: str) -> FsyncPolicy:
        """``never``, ``batch`` or ``interval_ms=N`` (N >= 1)."""
        if text in ("never", "batch"):
            return cls(text)
        if text.startswith("interval_ms="):
            digits = text.split("=", 1)[1]
            if digits.isascii() and digits.isdigit() and int(digits) >= 1:
                return cls("interval", int(digits))
        raise ValueError(f"fsync policy must be 'never', 'batch' or 'interval_ms=N' with N >= 1, got {text!r}")


class Journal(ClosedOnExit):
    """Appends records and hands out cursors. Open with ``Journal.open``."""

    def __init__(
        self,
        directory: str,
        segments: list[Segment],
        *,
        segment_bytes_max: int,
        fsync: FsyncPolicy,
        clock_ns: Callable[[], int] | None,
        readonly: bool,
        recovery: RecoveryReport,
        holes: list[tuple[int, int]] | None = None,
        damages: list[Damage] | None = None,
    ) -> None:
        self.directory = directory
        #: Damaged ranges of sealed segments: refused to readers until ``repair`` replaces them.
        self.damage = DamageMap(damages)
        #: Damaged ranges found (on open, by the scrub, by readers) and repaired, since open.
        self.damage_found = len(self.damage)
        self.damage_repaired = 0
        self._repair: HoleFill | None = None
        #: Missing ranges ``(first, last)``, in order; filled by ``fill`` from a peer's copy.
        self.holes: list[tuple[int, int]] = holes or []
        self._fill: HoleFill | None = None
        self.segment_bytes_max = segment_bytes_max
        self.fsync_policy = fsync
        self.readonly = readonly
        self.recovery = recovery
        self._clock_ns = clock_ns
        self._segments = segments
        self._segment_firsts = [s.first_seq for s in segments]
        self._fd = -1
        self._last_fsync_ns = clock_ns() if clock_ns is not None else 0
        self.fsync_count = 0
        self.fsync_seconds_total = 0.0
        #: Called with each fsync's duration in seconds (the node feeds its metrics with it).
        self.fsync_observer: Callable[[float], None] | None = None
        #: Called with damage the journal finds itself, appending (the node logs it).
        self.on_damage: Callable[[Damage], None] | None = None
        #: The first number retention left in the journal (0: it never removed a segment).
        self.first_retained_seq = 0
        #: Called with the error and what was being written when ``append`` or ``skip_to``
        #: fails to write (a full disk, a disk error), before the error is raised. The records
        #: were applied to the machine already, so the node cannot go on: it ends the process
        #: (``NodeExit.DISK_FAILED``) and, at the next start, rebuilds what is missing from the
        #: Raft log. Nothing a failed append wrote is counted: the next append writes at the
        #: same offset.
        self.on_write_failed: Callable[[OSError, str], None] | None = None
        #: Files written and closed without an fsync (under the "never" policy: segments
        #: sealed, their index files) since the last ``sync``, which makes them durable.
        self._sealed_unsynced: list[str] = []

    # --- opening ------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str,
        *,
        segment_bytes_max: int = limits.SEGMENT_BYTES_MAX_DEFAULT,
        fsync: FsyncPolicy | None = None,
        clock_ns: Callable[[], int] | None = None,
        readonly: bool = False,
        create: bool = True,
        verify_bytes: int = limits.JOURNAL_VERIFY_ON_OPEN_BYTES_DEFAULT,
        start_seq: int = 0,
    ) -> Journal:
        """Open (and recover) the journal in `directory`.

        ``readonly`` opens for reading only: nothing is cut or written, a torn tail just ends
        the readable stream (``recovery`` still says what would be cut).
        ``clock_ns`` (monotonic nanoseconds) is needed by the ``interval`` fsync policy.
        ``verify_bytes``: the newest sealed segments up to this size are read back in full
        (``damage`` says what failed); older ones are trusted to their index until scrubbed.
        ``start_seq``: the number the journal must start at (a node's journal: 1); records
        missing before its first segment file become a hole (``recovery.missing_first``) to be
        fetched from a peer. 0: it starts wherever its first segment does (tools, tests).
        Retention moves a node's start up (``retention.FIRST_RETAINED_FILE``).
        """
        fsync = fsync or FsyncPolicy()
        if segment_bytes_max < limits.SEGMENT_BYTES_MIN:
            raise ValueError(f"segment_bytes_max must be at least {limits.SEGMENT_BYTES_MIN}, got {segment_bytes_max}")
        if fsync.mode == "interval" and (clock_ns is None or fsync.interval_ms < 1):
            raise ValueError("the interval fsync policy needs interval_ms >= 1 and a clock_ns")
        if not os.path.isdir(directory):
            if readonly or not create:
                raise JournalError(f"journal directory {directory} does not exist")
            os.makedirs(directory, exist_ok=True)
        first_retained = read_first_retained(directory)
        if start_seq:
            start_seq = max(start_seq, first_retained)
        segments, holes, recovery, damages = recover(directory, readonly=readonly, verify_bytes=verify_bytes, start_seq=start_seq)
        journal = cls(
            directory,
            segments,
            segment_bytes_max=segment_bytes_max,
            fsync=fsync,
            clock_ns=clock_ns,
            readonly=readonly,
            recovery=recovery,
            holes=holes,
            damages=damages,
        )
        journal.first_retained_seq = first_retained
        tail = segments[-1] if segments else None
        if not readonly and tail is not None and not tail.sealed and holes and holes[-1][0] >= tail.end_seq:
            # A hole follows the tail (``skip_to`` sealed it; a power cut can undo that seal):
            # the tail takes no more records.
            journal._seal(tail)
        return journal

    # --- state --------------------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        """First number of the journal (held, or missing in a hole); 0 for an empty journal."""
        first = 0
        if self._segments and self._segments[-1].end_seq > self._segments[0].first_seq:
            first = self._segments[0].first_seq
        if self.holes and (not first or self.holes[0][0] < first):
            first = self.holes[0][0]
        return first

    @property
    def last_seq(self) -> int:
        """Last number of the journal (held, or missing in a trailing hole); 0 when empty."""
        last = self._segments[-1].end_seq - 1 if self._segments else 0
        if self.holes and self.holes[-1][1] > last:
            last = self.holes[-1][1]
        return last

    @property
    def contiguous_last_seq(self) -> int:
        """Last number readable from ``first_seq`` without meeting a hole."""
        return self.holes[0][0] - 1 if self.holes else self.last_seq

    @property
    def missing_count(self) -> int:
        """Records in holes, still to be fetched."""
        return sum(last - first + 1 for first, last in self.holes)

    def has_hole_within(self, first_seq: int, last_seq: int) -> bool:
        return any(first <= last_seq and last >= first_seq for first, last in self.holes)

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def size_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    # --- appending ----------------------------------------------------------------------

    def append(self, records: bytes, first_seq: int, last_seq: int, offsets: list[int] | None = None) -> None:
        """Append the records numbered ``first_seq..last_seq`` (``last_seq + 1`` must follow on).

        ``records`` is whole ``Delivered`` frames back to back, as ``SequencerMachine.apply``
        produces them. Without ``offsets`` each record's checksum and number is checked before
        anything is written. ``offsets`` (where each record starts) comes from the encoder that
        just built the records; then only their count and the first and last record are
        checked. Records that fail their checks raise ``JournalRecordError``; a range that does
        not follow on raises ``AssertionError`` (a bug in the caller). Nothing is written then.
        """
        assert not self.readonly, "append on a read-only journal"
        assert first_seq >= 1 and last_seq >= first_seq, f"bad range {first_seq}..{last_seq}"
        expected = self.last_seq + 1 if self._segments else first_seq
        assert first_seq == expected, f"append of seq {first_seq}, journal expects {expected}"
        if offsets is None:
            offsets_in_batch = check_records(records, first_seq, last_seq)
        else:
            check_ends(records, first_seq, last_seq, offsets)
            offsets_in_batch = offsets
        try:
            segment = self._writable_segment(first_seq)
            # At the offset the journal's own index says, not at the file's end: a file cut or
            # lengthened under the journal never shifts a record (the reader that meets the
            # damage refuses it, and the tail is sealed and repaired).
            pwrite_all(self._fd, records, segment.size)
            segment.add_run(offsets_in_batch, len(records))
            mode = self.fsync_policy.mode
            if mode == "batch":
                self._fsync()
            elif mode == "interval":
                self.sync_if_due()
        except OSError as exc:
            self._write_failed(exc, f"appending seq {first_seq}..{last_seq}")
            raise

    def _write_failed(self, exc: OSError, what: str) -> None:
        if self.on_write_failed is not None:
            self.on_write_failed(exc, what)

    def _writable_segment(self, first_seq: int) -> Segment:
        segment = self._segments[-1] if self._segments else None
        if segment is not None and not segment.sealed and self._fd < 0:
            self._tail_file_changed(segment)  # the first write since open: sealed if damaged
        if segment is not None and (segment.sealed or segment.size >= self.segment_bytes_max or segment.end_seq != first_seq):
            if not segment.sealed:
                self._seal(segment)
            segment = None
        if segment is None:
            path = os.path.join(self.directory, segment_name(first_seq))
            segment = Segment(path, first_seq)
            self._close_fd()
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
            fsync_dir(self.directory)
            self._segments.append(segment)
            self._segment_firsts.append(first_seq)
        return segment

    def _tail_file_changed(self, segment: Segment) -> bool:
        """Is the tail segment's file no longer what the journal wrote to it (cut, lengthened
        or removed by something else: an operator, a broken disk)? Checked when the journal
        first writes to it after opening and when it seals it. If so, it is sealed as damaged
        (``on_damage`` is told), the next append starts a new segment, and True is returned. A
        tail with no records yet is just started afresh. Leaves the tail's file open."""
        try:
            if self._fd < 0:
                self._fd = os.open(segment.path, os.O_WRONLY)
            stat = os.fstat(self._fd)
            file_bytes = stat.st_size if stat.st_nlink else None
        except FileNotFoundError:
            file_bytes = None
        if file_bytes == segment.size:
            return False
        damage = tail_damage(segment, file_bytes)
        if damage is None:  # no records in it: start it again
            self._close_fd()
            self._fd = os.open(segment.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            segment.size = 0
            return False
        self._seal_damaged(segment, damage)
        if self.on_damage is not None:
            self.on_damage(damage)
        return True

    def _seal_damaged(self, segment: Segment, damage: Damage) -> bool:
        """Seal the tail segment, found damaged, where its records end now, and refuse
        `damage` until ``repair`` replaces the file. It gets no index file: opened again before
        the repair, the journal walks it and finds the damage again."""
        if self._fd >= 0 and self.fsync_policy.mode != "never":
            self._fsync()
        elif self._fd >= 0:
            self._sealed_unsynced.append(segment.path)
        self._close_fd()
        segment.sealed = True
        if not self.damage.add(damage):
            return False
        self.damage_found += 1
        return True

    def _seal(self, segment: Segment) -> None:
        if self._tail_file_changed(segment):
            return  # sealed as damaged, without an index
        if self._fd >= 0 and self.fsync_policy.mode != "never":
            self._fsync()
        self._close_fd()
        write_index(segment, fsync=self.fsync_policy.mode != "never")
        if self.fsync_policy.mode == "never":
            self._sealed_unsynced += [segment.path, index_path(segment)]
        segment.sealed = True

    # --- holes ----------------------------------------------------------------------------

    def skip_to(self, seq: int) -> None:
        """The next append starts at `seq`; ``last_seq + 1 .. seq - 1`` become a hole.

        Used when the replica's state jumps ahead (a Raft snapshot from the leader): the
        records in the hole are fetched from a peer and handed to ``fill``.
        """
        assert not self.readonly, "skip_to on a read-only journal"
        assert seq > self.last_seq + 1, f"skip_to({seq}) with last_seq {self.last_seq}"
        try:
            self._skip_to(seq)
        except OSError as exc:
            self._write_failed(exc, f"recording the hole before seq {seq}")
            raise

    def _skip_to(self, seq: int) -> None:
        hole = (self.last_seq + 1, seq - 1)
        if self._segments and self._segments[-1].count == 0:
            # A segment with no records (all cut by recovery) would sit inside the hole.
            empty = self._segments.pop()
            self._segment_firsts.pop()
            self._close_fd()
            os.unlink(empty.path)
            hole = (empty.first_seq, seq - 1)
            if self.holes and self.holes[-1][1] == empty.first_seq - 1:
                hole = (self.holes.pop()[0], seq - 1)
        elif self._segments and not self._segments[-1].sealed:
            self._seal(self._segments[-1])
        self.holes[:] = merge_adjacent([*self.holes, hole])
        write_holes(self.directory, self.holes)

    def fill(self, records: bytes, first_seq: int, last_seq: int) -> None:
        """Store records fetched from a peer into the first hole, in order.

        Records go to a side file; when the hole is complete it becomes a sealed segment
        (fsynced), and readers can cross it. Every record is checked (checksum, number, count)
        before any is written: records that fail raise ``JournalRecordError``.
        """
        assert not self.readonly, "fill on a read-only journal"
        assert self.holes, "fill without a hole"
        hole_first, hole_last = self.holes[0]
        path = os.path.join(self.directory, segment_name(hole_first))
        self._fill, segment = _side_file_write(self._fill, path, (hole_first, hole_last), records, first_seq, last_seq)
        if segment is None:
            return
        i = bisect.bisect_right(self._segment_firsts, segment.first_seq)
        self._segments.insert(i, segment)
        self._segment_firsts.insert(i, segment.first_seq)
        self.holes.pop(0)
        write_holes(self.directory, self.holes)

    @property
    def fill_next_seq(self) -> int:
        """Next number ``fill`` expects (0 when there is no hole)."""
        if not self.holes:
            return 0
        fill = self._fill
        if fill is not None and fill.segment.first_seq == self.holes[0][0]:
            return fill.segment.end_seq
        return self.holes[0][0]

    # --- retention (``retention``) ---------------------------------------------------------

    def segments(self) -> list[Segment]:
        """Every segment, in order, the tail (if not sealed) last."""
        return list(self._segments)

    def release_below(self, seq: int, *, recorded: bool = False) -> list[Segment]:
        """Retention: the journal starts at `seq` from now on. Records ``FIRST_RETAINED_FILE``
        (fsynced) first, unless the caller did (``recorded``: off the loop), then drops the
        sealed segments wholly below `seq` and returns them; the caller removes (or archives)
        their files. `seq` must start a segment or the first hole (the journal then starts with
        that hole, as one that joined empty does) and lie below every hole and damage."""
        assert not self.readonly, "release_below on a read-only journal"
        gone = [s for s in self._segments if s.end_seq <= seq]
        assert gone and all(s.sealed for s in gone), f"release_below({seq}): no sealed segment wholly below it"
        assert len(gone) < len(self._segments), f"release_below({seq}) would leave no segment"
        starts_hole = bool(self.holes) and self.holes[0][0] == seq
        assert starts_hole or self._segments[len(gone)].first_seq == seq, f"release_below({seq}) inside a segment"
        assert not self.holes or self.holes[0][0] >= seq, f"release_below({seq}) across hole {self.holes[0]}"
        assert self.damage.next_from(0) is None or self.damage.next_from(0).first_seq >= seq, "release_below across damage"
        if not recorded:
            write_first_retained(self.directory, seq)
        self.first_retained_seq = seq
        del self._segments[: len(gone)]
        del self._segment_firsts[: len(gone)]
        return gone

    def start_at(self, seq: int) -> None:
        """Retention on every peer removed the start of this journal's first hole: the journal
        now starts at `seq` (``FIRST_RETAINED_FILE``); the hole shrinks to ``seq..`` (or goes).
        Only for a hole the journal starts with (a node that joins or rejoins empty)."""
        assert not self.readonly, "start_at on a read-only journal"
        assert self.holes and self.holes[0][0] == self.first_seq, f"start_at({seq}) without a hole at the start"
        hole_first, hole_last = self.holes[0]
        assert hole_first < seq <= hole_last + 1, f"start_at({seq}) outside hole {hole_first}..{hole_last}"
        if self._fill is not None:
            self._fill.abandon()
            self._fill = None
        write_first_retained(self.directory, seq)
        self.first_retained_seq = seq
        if seq <= hole_last:
            self.holes[0] = (seq, hole_last)
        else:
            self.holes.pop(0)
        write_holes(self.directory, self.holes)

    # --- damage and repair ----------------------------------------------------------------

    def sealed_segments(self) -> list[Segment]:
        """The sealed segments, in order (what the scrub reads)."""
        return [s for s in self._segments if s.sealed]

    def mark_damaged(self, seq: int, path: str, offset: int, reason: str) -> Damage | None:
        """Record that record `seq` failed on read: it and the rest of its segment are refused
        to readers until repaired. A tail segment is sealed where it ends (appends go on in a
        new one) so that the damaged range is fixed. Returns the new damage, or None when it
        was known (or `seq` is in no segment)."""
        segment = self.segment_for(seq)
        if segment is None:
            return None
        damage = Damage(seq, segment.end_seq - 1, path or segment.path, offset, reason)
        if not segment.sealed:
            # The tail: seal it where it ends now (appends go on in a new segment), refused from
            # here or from where its file was cut, if that is earlier.
            assert not self.readonly, f"damage in the tail of a read-only journal: {damage}"
            try:
                file_bytes: int | None = os.stat(segment.path).st_size
            except FileNotFoundError:
                file_bytes = None
            found = tail_damage(segment, file_bytes)
            if found is not None and found.first_seq < seq:
                damage = found
            return damage if self._seal_damaged(segment, damage) else None
        if not self.damage.add(damage):
            return None
        self.damage_found += 1
        return damage

    @property
    def repair_range(self) -> tuple[int, int] | None:
        """The numbers ``repair`` wants next: the whole segment holding the first damage."""
        damage = self.damage.next_from(0)
        if damage is None:
            return None
        segment = self.segment_for(damage.first_seq)
        assert segment is not None, f"damage {damage} in no segment"
        return segment.first_seq, segment.end_seq - 1

    @property
    def repair_next_seq(self) -> int:
        """Next number ``repair`` expects (0 when nothing is damaged)."""
        target = self.repair_range
        if target is None:
            return 0
        fill = self._repair
        if fill is not None and fill.segment.first_seq == target[0]:
            return fill.segment.end_seq
        return target[0]

    def repair(self, records: bytes, first_seq: int, last_seq: int) -> None:
        """Store records fetched from a peer for the segment of the first damage, in order.

        They go to a side file; when it holds the whole segment it is fsynced, given its index
        and renamed over the damaged file (directory fsynced), and the damage is gone. Every
        record is checked (checksum, number, count) before any is written: records that fail
        raise ``JournalRecordError``. Readers holding the old file keep reading it (and are
        refused at its damage); new readers open the repaired one.
        """
        assert not self.readonly, "repair on a read-only journal"
        target = self.repair_range
        assert target is not None, "repair without damage"
        segment_first, segment_last = target
        self._check_against_intact(records, first_seq, last_seq)
        path = self.segment_for(segment_first).path
        self._repair, segment = _side_file_write(self._repair, path, target, records, first_seq, last_seq)
        if segment is None:
            return
        i = bisect.bisect_left(self._segment_firsts, segment_first)
        self._segments[i] = segment
        self.damage_repaired += self.damage.clear_range(segment_first, segment_last)

    def _check_against_intact(self, records: bytes, first_seq: int, last_seq: int) -> None:
        """Records a peer sends for the intact part of a damaged segment (before its first bad
        record) must be byte for byte what this node holds there: the committed stream is the
        same on every node. Raises ``JournalRecordError`` when they differ."""
        damage = self.damage.next_from(first_seq)
        intact_last = min(last_seq, damage.first_seq - 1) if damage is not None else last_seq
        if first_seq > intact_last:
            return
        try:
            held = self.read_bytes(first_seq, intact_last)
        except JournalCorruptError as exc:  # damage before the known one: the repair covers it
            self.mark_damaged(exc.seq, exc.path, exc.offset, str(exc))
            return
        if records[: len(held)] != held:
            raise JournalRecordError(f"records {first_seq}..{intact_last} from the peer differ from this node's intact copy")

    def _fsync(self) -> None:
        if self._fd < 0:
            return
        clock = self._clock_ns
        started = clock() if clock is not None else 0
        os.fsync(self._fd)
        self.fsync_count += 1
        if clock is not None:
            self._last_fsync_ns = clock()
            seconds = (self._last_fsync_ns - started) / 1e9
            self.fsync_seconds_total += seconds
            if self.fsync_observer is not None:
                self.fsync_observer(seconds)

    def sync(self) -> None:
        """Force everything appended so far to disk, whatever the policy: the open segment, and
        under the "never" policy the segments sealed since the last sync, their index files and
        the directory (the indexes are renamed into it). The node calls it before it writes a
        Raft snapshot: the snapshot must never cover records the journal could lose. (Only the
        open segment was synced before: a power cut of every node in the crash durability left
        each journal damaged below its durable snapshot, with no peer to repair it from.)"""
        try:
            for path in self._sealed_unsynced:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue  # removed or replaced since (a repair syncs its own file)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if self._sealed_unsynced:
                fsync_dir(self.directory)
                self._sealed_unsynced.clear()
            self._fsync()
        except OSError as exc:
            self._write_failed(exc, "syncing")
            raise

    def unsynced_files(self) -> list[str]:
        """What ``sync`` makes durable, for a caller that fsyncs it on a thread of its own (the
        Raft snapshot's): the segments sealed and index files written since the last sync
        (under the "never" policy), and the open segment. The caller fsyncs each and the
        directory, then tells ``synced``."""
        tail = [self._segments[-1].path] if self._segments else []
        return [*self._sealed_unsynced, *tail]

    def synced(self, files: Collection[str]) -> None:
        """`files` (from ``unsynced_files``) were fsynced, and the directory."""
        if files:
            done = set(files)
            self._sealed_unsynced = [path for path in self._sealed_unsynced if path not in done]

    def sync_if_due(self) -> None:
        """With the ``interval`` policy: fsync if the interval has passed since the last one."""
        if self.fsync_policy.mode != "interval" or self._clock_ns is None:
            return
        if self._clock_ns() - self._last_fsync_ns >= self.fsync_policy.interval_ms * 1_000_000:
            self._fsync()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        if self._fd >= 0 and self.fsync_policy.mode != "never":
            self._fsync()
        self._close_fd()

    # --- reading ------------------------------------------------------------------------

    def segment_for(self, seq: int) -> Segment | None:
        i = bisect.bisect_right(self._segment_firsts, seq) - 1
        if i < 0:
            return None
        segment = self._segments[i]
        return segment if seq < segment.end_seq else None

    def next_segment(self, segment: Segment) -> Segment | None:
        i = bisect.bisect_right(self._segment_firsts, segment.first_seq)
        return self._segments[i] if i < len(self._segments) else None

    def cursor(self, from_seq: int, *, verify: bool = True) -> JournalCursor:
        """A reader positioned at `from_seq` (which may be ``last_seq + 1``: a live tail)."""
        return JournalCursor(self, from_seq, verify=verify)

    def read_bytes(self, first_seq: int, last_seq: int) -> bytes:
        """The raw records ``first_seq..last_seq``, checked, as one byte string."""
        with self.cursor(first_seq) as cursor:
            parts = []
            while cursor.next_seq <= last_seq:
                count, block = cursor.read_block(last_seq, limits.READ_CHUNK_BYTES)
                assert count > 0, f"journal ends at {cursor.next_seq - 1}, asked up to {last_seq}"
                parts.append(block)
        return b"".join(parts)

    def records(self, from_seq: int = 0, to_seq: int = 0) -> Iterator[protocol.Delivered]:
        """Decoded records ``from_seq..to_seq`` (defaults: the whole journal)."""
        from_seq = from_seq or self.first_seq
        to_seq = to_seq or self.last_seq
        if not from_seq or from_seq > to_seq:
            return
        with self.cursor(from_seq) as cursor:
            while cursor.next_seq <= to_seq:
                frames = cursor.read_frames(to_seq, limits.JOURNAL_RECORDS_PER_READ)
                if not frames:
                    return
                for frame in frames:
                    yield protocol.decode_delivered_body(memoryview(frame)[HEADER_BYTES:])


def _side_file_write(
    fill: HoleFill | None, path: str, target: tuple[int, int], records: bytes, first_seq: int, last_seq: int
) -> tuple[HoleFill | None, Segment | None]:
    """Write peer records ``first_seq..last_seq`` of the range `target` (a hole, or a damaged
    segment) to the side file of segment `path`, after checking every record. Returns the side
    file still being written (None once complete) and the finished segment (None until then)."""
    range_first, range_last = target
    if fill is None or fill.segment.first_seq != range_first:
        if fill is not None:
            fill.abandon()
        fill = HoleFill(path, range_first)
    expected = fill.segment.end_seq
    assert first_seq == expected, f"records from seq {first_seq}, {range_first}..{range_last} expects {expected}"
    assert last_seq <= range_last, f"records up to {last_seq} overrun {range_first}..{range_last}"
    offsets = check_records(records, first_seq, last_seq)
    fill.write(records, offsets)
    if last_seq < range_last:
        return fill, None
    return None, fill.finish()
