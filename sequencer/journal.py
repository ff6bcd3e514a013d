"""The journal: the permanent, replayable record of the sequenced stream.

On disk a journal is a directory of segment files ``<first_seq:020d>.seg``. A segment is a run
of records; a record is a ``Delivered`` wire frame (see ``protocol``): length, CRC-32, msgpack
body holding sequence number, log time, session, client_seq and payload. Numbers are gapless
from the first segment's first number to the last record. When a segment reaches
``segment_bytes_max`` it is sealed (fsynced unless the policy is ``never``, and given an index
file ``<first_seq>.idx``) and the next batch starts a new segment.

Each segment has a sparse index: the byte offset of every ``INDEX_INTERVAL_RECORDS``-th
record, so reading from any number is one seek and a scan of at most that many headers.

Opening a journal checks its tail: the last segment is read record by record (length, checksum,
decodable body, expected number); from the first bad record on, the file is cut off and the
cut is reported in ``Journal.recovery``. The rest of the stream comes back from Raft. Damage
before the tail (a sealed segment, a gap between segments) is never cut away silently: opening
fails with ``JournalCorruptError``.

One thread appends; any number of cursors read, each through its own file handle, up to a
limit the caller publishes after ``append`` returned.
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Literal

import msgspec

from raftseq.sequencer import limits, protocol

HEADER = protocol.HEADER
HEADER_BYTES = protocol.HEADER_BYTES
SEGMENT_SUFFIX = ".seg"
INDEX_SUFFIX = ".idx"
FILL_SUFFIX = ".seg.fill"
#: Ranges of sequence numbers the journal lacks (after a Raft snapshot), as JSON [[first, last], ...].
HOLES_FILE = "holes.json"
_INDEX_MAGIC = b"RSQIDX01"
_INDEX_HEADER = struct.Struct(">8sQQQI")  # magic, first_seq, record count, segment bytes, interval


class JournalError(Exception):
    """Base of journal errors."""


class JournalCorruptError(JournalError):
    """The journal holds a record that fails its checks, somewhere it may not be cut off.

    ``seq`` is the first sequence number that could not be read (0 when unknown).
    """

    def __init__(self, message: str, *, seq: int = 0, path: str = "", offset: int = -1) -> None:
        super().__init__(message)
        self.seq = seq
        self.path = path
        self.offset = offset


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


class RecoveryReport(msgspec.Struct, frozen=True):
    """What opening the journal cut from its tail. ``bytes_cut == 0``: nothing."""

    segment: str = ""
    offset: int = 0  # where the good records end in that segment
    bytes_cut: int = 0
    last_good_seq: int = 0
    reason: str = ""
    removed_empty_segments: int = 0


class Segment:
    """One segment file and its sparse index. ``count`` grows as records are appended."""

    __slots__ = ("path", "first_seq", "count", "size", "offsets", "sealed")

    def __init__(self, path: str, first_seq: int) -> None:
        self.path = path
        self.first_seq = first_seq
        self.count = 0
        self.size = 0
        self.offsets: list[int] = []  # offsets[i]: record first_seq + i * INDEX_INTERVAL_RECORDS
        self.sealed = False

    @property
    def end_seq(self) -> int:
        """One past the last number in this segment."""
        return self.first_seq + self.count


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def list_segment_files(directory: str) -> list[tuple[int, str]]:
    """``(first_seq, path)`` of each segment file, in order."""
    found = []
    for name in os.listdir(directory):
        if not name.endswith(SEGMENT_SUFFIX):
            continue
        stem = name[: -len(SEGMENT_SUFFIX)]
        if len(stem) != 20 or not stem.isdigit() or int(stem) < 1:
            raise JournalCorruptError(f"unexpected file {name!r} in journal directory {directory}")
        found.append((int(stem), os.path.join(directory, name)))
    found.sort()
    return found


class ScanResult(msgspec.Struct):
    count: int
    good_bytes: int
    file_bytes: int
    offsets: list[int]
    problem: str = ""
    problem_offset: int = -1


def scan_segment(path: str, first_seq: int, *, check: bool) -> ScanResult:
    """Walk a segment's records. With ``check``: verify checksum, body and number of each.

    Stops at the first record that fails; ``problem`` says why and ``good_bytes`` where.
    """
    interval = limits.INDEX_INTERVAL_RECORDS
    offsets: list[int] = []
    count = 0
    file_bytes = os.path.getsize(path)
    pos = 0  # file offset of buf[0]
    problem = ""
    unpack_from = HEADER.unpack_from
    with open(path, "rb", buffering=0) as f:
        buf = b""
        start = 0
        while True:
            if len(buf) - start < HEADER_BYTES or len(buf) - start < HEADER_BYTES + unpack_from(buf, start)[0]:
                chunk = f.read(limits.READ_CHUNK_BYTES)
                if not chunk:
                    if start < len(buf):
                        problem = f"torn record: {len(buf) - start} bytes at the end of the file"
                    break
                buf = buf[start:] + chunk
                pos += start
                start = 0
                continue
            length, crc = unpack_from(buf, start)
            if length == 0 or length > limits.FRAME_BYTES_MAX:
                problem = f"record length {length} out of range"
                break
            if check:
                body = memoryview(buf)[start + HEADER_BYTES : start + HEADER_BYTES + length]
                if zlib.crc32(body) != crc:
                    problem = f"checksum mismatch at seq {first_seq + count}"
                    break
                try:
                    record = protocol.decode_delivered_body(body)
                except msgspec.MsgspecError as exc:
                    problem = f"undecodable record at seq {first_seq + count}: {exc}"
                    break
                if record.seq != first_seq + count:
                    problem = f"record holds seq {record.seq} where {first_seq + count} belongs"
                    break
            if count % interval == 0:
                offsets.append(pos + start)
            count += 1
            start += HEADER_BYTES + length
    good = pos + start
    return ScanResult(count, good, file_bytes, offsets, problem, good if problem else -1)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Journal:
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
    ) -> None:
        self.directory = directory
        #: Missing ranges ``(first, last)``, in order; filled by ``fill`` from a peer's copy.
        self.holes: list[tuple[int, int]] = holes or []
        self._fill: _Fill | None = None
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
    ) -> Journal:
        """Open (and recover) the journal in `directory`.

        ``readonly`` opens for reading only: nothing is cut or written, a torn tail just ends
        the readable stream (``recovery`` still says what would be cut).
        ``clock_ns`` (monotonic nanoseconds) is needed by the ``interval`` fsync policy.
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
        files = list_segment_files(directory)
        holes = _read_holes(directory)
        for name in os.listdir(directory):
            if name.endswith(FILL_SUFFIX) and not readonly:
                os.unlink(os.path.join(directory, name))  # an unfinished catch-up starts over
        segments: list[Segment] = []
        removed_empty = 0
        # Trailing empty segments (a roll that wrote nothing yet) are dropped; the segment
        # before them becomes the tail and is checked in full.
        while len(files) > 1 and os.path.getsize(files[-1][1]) == 0:
            if not readonly:
                os.unlink(files[-1][1])
            files.pop()
            removed_empty += 1
        for i, (first_seq, path) in enumerate(files):
            is_tail = i == len(files) - 1
            segment = Segment(path, first_seq)
            if segments and segments[-1].end_seq != first_seq and (segments[-1].end_seq, first_seq - 1) not in holes:
                raise JournalCorruptError(
                    f"gap between segments: {segments[-1].path} ends before seq {segments[-1].end_seq}, "
                    f"next segment starts at {first_seq}",
                    seq=segments[-1].end_seq,
                    path=path,
                )
            if is_tail:
                scan = scan_segment(path, first_seq, check=True)
                recovery = RecoveryReport(removed_empty_segments=removed_empty)
                if scan.good_bytes < scan.file_bytes:
                    recovery = RecoveryReport(
                        segment=path,
                        offset=scan.good_bytes,
                        bytes_cut=scan.file_bytes - scan.good_bytes,
                        last_good_seq=first_seq + scan.count - 1,
                        reason=scan.problem or "trailing bytes",
                        removed_empty_segments=removed_empty,
                    )
                    if not readonly:
                        with open(path, "r+b") as f:
                            f.truncate(scan.good_bytes)
                            os.fsync(f.fileno())
                segment.count, segment.size, segment.offsets = scan.count, scan.good_bytes, scan.offsets
            else:
                cls._load_sealed(segment)
            segments.append(segment)
        if not files:
            recovery = RecoveryReport()
        if not readonly and (recovery.bytes_cut or removed_empty):
            _fsync_dir(directory)
        _check_holes(directory, holes, segments)
        return cls(
            directory,
            segments,
            segment_bytes_max=segment_bytes_max,
            fsync=fsync,
            clock_ns=clock_ns,
            readonly=readonly,
            recovery=recovery,
            holes=holes,
        )

    @staticmethod
    def _load_sealed(segment: Segment) -> None:
        """Index of a sealed segment: from its index file when it matches, else by a walk."""
        segment.sealed = True
        size = os.path.getsize(segment.path)
        index_path = segment.path[: -len(SEGMENT_SUFFIX)] + INDEX_SUFFIX
        try:
            with open(index_path, "rb") as f:
                data = f.read()
            magic, first_seq, count, seg_bytes, interval = _INDEX_HEADER.unpack_from(data, 0)
            if magic != _INDEX_MAGIC or interval != limits.INDEX_INTERVAL_RECORDS:
                raise struct.error("not a current index file")
            n = (count + interval - 1) // interval
            body = data[_INDEX_HEADER.size :]
            if (
                magic == _INDEX_MAGIC
                and first_seq == segment.first_seq
                and seg_bytes == size
                and interval == limits.INDEX_INTERVAL_RECORDS
                and len(body) == 8 * n + 4
                and zlib.crc32(data[:-4]) == struct.unpack(">I", body[-4:])[0]
            ):
                segment.count, segment.size = count, size
                segment.offsets = list(struct.unpack(f">{n}Q", body[:-4]))
                return
        except (OSError, struct.error):
            pass
        scan = scan_segment(segment.path, segment.first_seq, check=True)
        if scan.problem or scan.good_bytes != size:
            raise JournalCorruptError(
                f"sealed segment {segment.path} is damaged at offset {scan.good_bytes}: {scan.problem or 'trailing bytes'}",
                seq=segment.first_seq + scan.count,
                path=segment.path,
                offset=scan.good_bytes,
            )
        segment.count, segment.size, segment.offsets = scan.count, size, scan.offsets

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
        checked. A broken batch raises ``AssertionError`` (a bug in the caller, never input
        from outside).
        """
        assert not self.readonly, "append on a read-only journal"
        assert first_seq >= 1 and last_seq >= first_seq, f"bad range {first_seq}..{last_seq}"
        expected = self.last_seq + 1 if self._segments else first_seq
        assert first_seq == expected, f"append of seq {first_seq}, journal expects {expected}"
        if offsets is None:
            offsets_in_batch = self._check_records(records, first_seq, last_seq)
        else:
            self._check_ends(records, first_seq, last_seq, offsets)
            offsets_in_batch = offsets
        segment = self._writable_segment(first_seq)
        base = segment.size
        _write_all(self._fd, records)
        interval = limits.INDEX_INTERVAL_RECORDS
        index = segment.count
        offsets = segment.offsets
        for rel in offsets_in_batch:
            if index % interval == 0:
                offsets.append(base + rel)
            index += 1
        segment.size = base + len(records)
        segment.count = index
        mode = self.fsync_policy.mode
        if mode == "batch":
            self._fsync()
        elif mode == "interval":
            self.sync_if_due()

    @staticmethod
    def _check_ends(records: bytes, first_seq: int, last_seq: int, offsets: list[int]) -> None:
        """The cheap check of an encoder's batch: count, first and last record."""
        assert len(offsets) == last_seq - first_seq + 1, f"{len(offsets)} offsets for {first_seq}..{last_seq}"
        assert offsets[0] == 0, f"first record at offset {offsets[0]}"
        for seq, pos in ((first_seq, 0), (last_seq, offsets[-1])):
            assert len(records) - pos >= HEADER_BYTES, f"torn record at offset {pos} of a batch"
            length, crc = HEADER.unpack_from(records, pos)
            end = pos + HEADER_BYTES + length
            assert 0 < length and end <= len(records), f"record length {length} at offset {pos} of a batch"
            assert zlib.crc32(memoryview(records)[pos + HEADER_BYTES : end]) == crc, f"checksum mismatch writing seq {seq}"
            found = protocol.delivered_seq(records, pos + HEADER_BYTES)
            assert found == seq, f"record holds seq {found}, expected {seq}"
        assert end == len(records), f"{len(records) - end} bytes after the last record of a batch"

    @staticmethod
    def _check_records(records: bytes, first_seq: int, last_seq: int) -> list[int]:
        """Offsets of the records in `records`, after checking every checksum and the count."""
        unpack_from = HEADER.unpack_from
        crc32 = zlib.crc32
        record_seq = protocol.delivered_seq
        view = memoryview(records)
        offsets = []
        pos = 0
        end = len(records)
        seq = first_seq
        while pos < end:
            assert end - pos >= HEADER_BYTES, f"torn record at offset {pos} of a batch"
            length, crc = unpack_from(records, pos)
            nxt = pos + HEADER_BYTES + length
            assert 0 < length and nxt <= end, f"record length {length} at offset {pos} of a batch"
            assert crc32(view[pos + HEADER_BYTES : nxt]) == crc, f"checksum mismatch writing seq {seq}"
            found = record_seq(records, pos + HEADER_BYTES)
            assert found == seq, f"record holds seq {found}, expected {seq}"
            offsets.append(pos)
            pos = nxt
            seq += 1
        assert seq - 1 == last_seq, f"{len(offsets)} records for {first_seq}..{last_seq}"
        return offsets

    def _writable_segment(self, first_seq: int) -> Segment:
        segment = self._segments[-1] if self._segments else None
        if segment is not None and (segment.size >= self.segment_bytes_max or segment.end_seq != first_seq):
            if not segment.sealed:
                self._seal(segment)
            segment = None
        if segment is None:
            path = os.path.join(self.directory, segment_name(first_seq))
            segment = Segment(path, first_seq)
            self._close_fd()
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            _fsync_dir(self.directory)
            self._segments.append(segment)
            self._segment_firsts.append(first_seq)
        elif self._fd < 0:
            self._fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)
        return segment

    def _seal(self, segment: Segment) -> None:
        if self._fd >= 0 and self.fsync_policy.mode != "never":
            self._fsync()
        self._close_fd()
        _write_index(segment, fsync=self.fsync_policy.mode != "never")
        segment.sealed = True

    # --- holes ----------------------------------------------------------------------------

    def skip_to(self, seq: int) -> None:
        """The next append starts at `seq`; ``last_seq + 1 .. seq - 1`` become a hole.

        Used when the replica's state jumps ahead (a Raft snapshot from the leader): the
        records in the hole are fetched from a peer and handed to ``fill``.
        """
        assert not self.readonly, "skip_to on a read-only journal"
        assert seq > self.last_seq + 1, f"skip_to({seq}) with last_seq {self.last_seq}"
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
        self.holes.append(hole)
        _write_holes(self.directory, self.holes)

    def fill(self, records: bytes, first_seq: int, last_seq: int) -> None:
        """Store records fetched from a peer into the first hole, in order.

        Records go to a side file; when the hole is complete it becomes a sealed segment
        (fsynced), and readers can cross it. Checked like ``append``.
        """
        assert not self.readonly, "fill on a read-only journal"
        assert self.holes, "fill without a hole"
        hole_first, hole_last = self.holes[0]
        fill = self._fill
        if fill is None or fill.segment.first_seq != hole_first:
            if fill is not None:
                fill.abandon()
            fill = self._fill = _Fill(os.path.join(self.directory, segment_name(hole_first)), hole_first)
        expected = fill.segment.end_seq
        assert first_seq == expected, f"fill of seq {first_seq}, hole expects {expected}"
        assert last_seq <= hole_last, f"fill up to {last_seq} overruns the hole ending at {hole_last}"
        offsets = self._check_records(records, first_seq, last_seq)
        fill.write(records, offsets)
        if last_seq < hole_last:
            return
        segment = fill.finish()
        self._fill = None
        i = bisect.bisect_right(self._segment_firsts, segment.first_seq)
        self._segments.insert(i, segment)
        self._segment_firsts.insert(i, segment.first_seq)
        self.holes.pop(0)
        _write_holes(self.directory, self.holes)

    @property
    def fill_next_seq(self) -> int:
        """Next number ``fill`` expects (0 when there is no hole)."""
        if not self.holes:
            return 0
        fill = self._fill
        if fill is not None and fill.segment.first_seq == self.holes[0][0]:
            return fill.segment.end_seq
        return self.holes[0][0]

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
        """Force everything appended so far to disk, whatever the policy."""
        self._fsync()

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

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
                frames = cursor.read_frames(to_seq, 4096)
                if not frames:
                    return
                for frame in frames:
                    yield protocol.decode_delivered_body(memoryview(frame)[HEADER_BYTES:])


class _Fill:
    """A hole being filled: a side file that becomes a segment when complete."""

    def __init__(self, segment_path: str, first_seq: int) -> None:
        self.segment = Segment(segment_path, first_seq)
        self.path = segment_path[: -len(SEGMENT_SUFFIX)] + FILL_SUFFIX
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(self, records: bytes, offsets: list[int]) -> None:
        segment = self.segment
        base = segment.size
        _write_all(self.fd, records)
        index = segment.count
        for rel in offsets:
            if index % limits.INDEX_INTERVAL_RECORDS == 0:
                segment.offsets.append(base + rel)
            index += 1
        segment.count = index
        segment.size = base + len(records)

    def finish(self) -> Segment:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        _write_index(self.segment, fsync=True)
        os.replace(self.path, self.segment.path)
        _fsync_dir(os.path.dirname(self.path))
        self.segment.sealed = True
        return self.segment

    def abandon(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _write_index(segment: Segment, *, fsync: bool) -> None:
    n = len(segment.offsets)
    body = _INDEX_HEADER.pack(_INDEX_MAGIC, segment.first_seq, segment.count, segment.size, limits.INDEX_INTERVAL_RECORDS)
    body += struct.pack(f">{n}Q", *segment.offsets)
    body += struct.pack(">I", zlib.crc32(body))
    index_path = segment.path[: -len(SEGMENT_SUFFIX)] + INDEX_SUFFIX
    tmp = index_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(body)
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, index_path)


_holes_decoder = msgspec.json.Decoder(list[tuple[int, int]])


def _read_holes(directory: str) -> list[tuple[int, int]]:
    path = os.path.join(directory, HOLES_FILE)
    try:
        with open(path, "rb") as f:
            return [tuple(h) for h in _holes_decoder.decode(f.read())]
    except FileNotFoundError:
        return []
    except msgspec.MsgspecError as exc:
        raise JournalCorruptError(f"{path} is unreadable: {exc}", path=path) from None


def _write_holes(directory: str, holes: list[tuple[int, int]]) -> None:
    path = os.path.join(directory, HOLES_FILE)
    if not holes:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        _fsync_dir(directory)
        return
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(msgspec.json.encode(holes))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)


def _check_holes(directory: str, holes: list[tuple[int, int]], segments: list[Segment]) -> None:
    """Every recorded hole must sit exactly between (or before, or after) segments."""
    previous_end = 0
    for first, last in holes:
        if first > last or first <= previous_end:
            raise JournalCorruptError(f"{directory}/{HOLES_FILE}: holes out of order: {holes}")
        previous_end = last
    bounds = {(s.first_seq, s.end_seq) for s in segments if s.count}
    for first, last in holes:
        before = [s for s in segments if s.count and s.end_seq <= first]
        after = [s for s in segments if s.count and s.first_seq > last]
        if before and before[-1].end_seq != first:
            raise JournalCorruptError(f"hole {first}..{last} does not follow segment ending at {before[-1].end_seq - 1}")
        if after and after[0].first_seq != last + 1:
            raise JournalCorruptError(f"hole {first}..{last} is not followed by a segment at {last + 1}")
        if any(a < last + 1 and b > first for a, b in bounds):
            raise JournalCorruptError(f"hole {first}..{last} overlaps a segment")


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JournalCursor:
    """Reads records in order from ``next_seq`` up to a limit the caller gives each time.

    Has its own file handle. Checksums are verified unless ``verify=False``; a mismatch raises
    ``JournalCorruptError`` naming the sequence number.
    """

    def __init__(self, journal: Journal, from_seq: int, *, verify: bool = True) -> None:
        if from_seq < 1:
            raise ValueError(f"from_seq must be >= 1, got {from_seq}")
        first = journal.first_seq
        if first and from_seq < first:
            raise ValueError(f"seq {from_seq} is below the journal's first record {first}")
        if from_seq > journal.last_seq + 1 and journal.last_seq:
            raise ValueError(f"seq {from_seq} is beyond the journal's end {journal.last_seq} + 1")
        self._journal = journal
        self.next_seq = from_seq
        self.verify = verify
        self._segment: Segment | None = None
        self._file = None
        self._offset = 0  # file offset of record next_seq within _segment

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JournalCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _position(self) -> bool:
        """Make sure `_segment`/`_offset` point at `next_seq`; False if nothing is there yet."""
        seg = self._segment
        if seg is not None and self.next_seq < seg.end_seq:
            return True
        if seg is not None and self.next_seq == seg.end_seq:
            if not seg.sealed:
                return False
            nxt = self._journal.next_segment(seg)
            if nxt is None or nxt.first_seq != self.next_seq:
                return False
            self._open(nxt, 0)
            return nxt.count > 0
        seg = self._journal.segment_for(self.next_seq)
        if seg is None:
            return False
        rel = self.next_seq - seg.first_seq
        point = rel // limits.INDEX_INTERVAL_RECORDS
        self._open(seg, seg.offsets[point])
        skip = rel - point * limits.INDEX_INTERVAL_RECORDS
        target = self.next_seq
        self.next_seq = seg.first_seq + point * limits.INDEX_INTERVAL_RECORDS
        while skip:
            # Skipping to the target does not check checksums: damage before the target must
            # not hide intact records after it.
            skipped, _ = self._read(target - 1, limits.READ_CHUNK_BYTES, skip, verify=False)
            assert skipped > 0, f"cannot reach seq {target} in {seg.path}"
            skip -= skipped
        return True

    def _open(self, segment: Segment, offset: int) -> None:
        self.close()
        self._file = open(segment.path, "rb", buffering=0)
        self._segment = segment
        self._offset = offset

    def read_block(self, limit_seq: int, max_bytes: int) -> tuple[int, bytes]:
        """Whole records from ``next_seq`` up to ``limit_seq`` and about ``max_bytes``, as one
        byte string (at least one record if any is available). Returns ``(count, bytes)``."""
        if self.next_seq > limit_seq or not self._position():
            return 0, b""
        return self._read(limit_seq, max_bytes, 1 << 62)

    def read_frames(self, limit_seq: int, max_records: int) -> list[bytes]:
        """Up to ``max_records`` records as separate frames (each header and body)."""
        if self.next_seq > limit_seq or not self._position():
            return []
        count, block = self._read(limit_seq, limits.READ_CHUNK_BYTES, max_records)
        frames = []
        pos = 0
        unpack_from = HEADER.unpack_from
        for _ in range(count):
            end = pos + HEADER_BYTES + unpack_from(block, pos)[0]
            frames.append(block[pos:end])
            pos = end
        return frames

    def _read(self, limit_seq: int, max_bytes: int, max_records: int, *, verify: bool | None = None) -> tuple[int, bytes]:
        """Read whole records; stops before a bad record when good ones precede it (the next
        call raises), so callers get every intact record before the damage."""
        segment = self._segment
        want = min(limit_seq, segment.end_seq - 1, self.next_seq + max_records - 1) - self.next_seq + 1
        if want <= 0:
            return 0, b""
        f = self._file
        f.seek(self._offset)
        data = f.read(max(max_bytes, HEADER_BYTES))
        unpack_from = HEADER.unpack_from
        crc32 = zlib.crc32
        verify = self.verify if verify is None else verify
        view = memoryview(data)
        pos = 0
        count = 0
        end = len(data)
        while count < want:
            if end - pos < HEADER_BYTES:
                if count:
                    break
                data += f.read(HEADER_BYTES)
                view = memoryview(data)
                end = len(data)
                if end - pos < HEADER_BYTES:
                    self._corrupt("short read of a record header", pos)
            length, crc = unpack_from(data, pos)
            if length == 0 or length > limits.FRAME_BYTES_MAX:
                if count:
                    break
                self._corrupt(f"record length {length} out of range", pos, count)
            nxt = pos + HEADER_BYTES + length
            if nxt > end:
                if count:
                    break
                data += f.read(nxt - end)
                view = memoryview(data)
                end = len(data)
                if nxt > end:
                    self._corrupt("short read of a record", pos)
            if verify and crc32(view[pos + HEADER_BYTES : nxt]) != crc:
                if count:
                    break
                self._corrupt("checksum mismatch", pos, count)
            pos = nxt
            count += 1
        self.next_seq += count
        self._offset += pos
        return count, data[:pos] if pos < end else data

    def _corrupt(self, what: str, pos: int, count: int = 0) -> None:
        seq = self.next_seq + count
        raise JournalCorruptError(
            f"{what} at seq {seq} in {self._segment.path} offset {self._offset + pos}",
            seq=seq,
            path=self._segment.path,
            offset=self._offset + pos,
        )


class VerifyReport(msgspec.Struct):
    """Outcome of ``verify_journal``. ``ok`` is False exactly when ``problem`` is set."""

    directory: str
    segments: int = 0
    records: int = 0
    first_seq: int = 0
    last_seq: int = 0
    bytes: int = 0
    #: First sequence number that failed (0 when the failure has no number, or none failed).
    first_bad_seq: int = 0
    problem: str = ""
    path: str = ""
    offset: int = -1

    @property
    def ok(self) -> bool:
        return not self.problem


def verify_journal(directory: str, *, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Read every record of every segment and check what the journal promises.

    Checks: segment names and continuity, each record's length, checksum and decodability,
    gapless numbering, log time never decreasing, and per session ``client_seq`` rising by one
    (or restarting at 1 after the session expired). Stops at the first failure.
    ``progress(segments_done, records_done)`` is called after each segment.
    """
    report = VerifyReport(directory)
    if not os.path.isdir(directory):
        report.problem = f"journal directory {directory} does not exist"
        report.path = directory
        return report
    try:
        files = list_segment_files(directory)
    except JournalCorruptError as exc:
        report.problem = str(exc)
        return report
    try:
        holes = _read_holes(directory)
    except JournalCorruptError as exc:
        report.problem = str(exc)
        return report
    if holes and (not files or holes[0][0] < files[0][0]):
        report.problem = f"records {holes[0][0]}..{holes[0][1]} are missing (a hole waiting for catch-up)"
        report.first_bad_seq = holes[0][0]
        return report
    expected_seq = files[0][0] if files else 0
    report.first_seq = expected_seq
    last_time = 0
    client_seqs: dict[str, int] = {}
    unpack_from = HEADER.unpack_from
    for i, (first_seq, path) in enumerate(files):
        report.segments += 1
        if first_seq != expected_seq:
            if (expected_seq, first_seq - 1) in holes:
                report.problem = f"records {expected_seq}..{first_seq - 1} are missing (a hole waiting for catch-up)"
            else:
                report.problem = f"segment {os.path.basename(path)} starts at {first_seq}, expected {expected_seq}"
            report.first_bad_seq = expected_seq
            report.path = path
            return report
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        end = len(data)
        view = memoryview(data)
        while pos < end:
            problem = ""
            if end - pos < HEADER_BYTES:
                problem = f"torn record header ({end - pos} bytes)"
            else:
                length, crc = unpack_from(data, pos)
                nxt = pos + HEADER_BYTES + length
                if length == 0 or length > limits.FRAME_BYTES_MAX:
                    problem = f"record length {length} out of range"
                elif nxt > end:
                    problem = f"torn record: {end - pos} of {HEADER_BYTES + length} bytes"
                elif zlib.crc32(view[pos + HEADER_BYTES : nxt]) != crc:
                    problem = "checksum mismatch"
                else:
                    try:
                        record = protocol.decode_delivered_body(view[pos + HEADER_BYTES : nxt])
                    except msgspec.MsgspecError as exc:
                        problem = f"undecodable record: {exc}"
                    else:
                        previous = client_seqs.get(record.session, 0)
                        if record.seq != expected_seq:
                            problem = f"record holds seq {record.seq}, expected {expected_seq}"
                        elif record.log_time_ns < last_time:
                            problem = f"log time goes back from {last_time} to {record.log_time_ns}"
                        elif record.client_seq != previous + 1 and record.client_seq != 1:
                            problem = (
                                f"session {record.session!r} client_seq {record.client_seq} follows {previous}"
                            )
                        else:
                            last_time = record.log_time_ns
                            client_seqs[record.session] = record.client_seq
            if problem:
                report.problem = problem
                report.first_bad_seq = expected_seq
                report.path = path
                report.offset = pos
                return report
            report.records += 1
            report.bytes += nxt - pos
            report.last_seq = expected_seq
            expected_seq += 1
            pos = nxt
        if progress is not None:
            progress(i + 1, report.records)
    return report
