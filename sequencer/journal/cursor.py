"""Reading the journal: a cursor reads records in order, through its own file handle, from any
sequence number (one seek by the sparse index, then a scan of at most
``INDEX_INTERVAL_RECORDS`` headers) up to a limit the caller gives each time.
"""

from __future__ import annotations

import zlib
from typing import Protocol

from raftseq.sequencer import limits
from raftseq.sequencer.journal.errors import JournalCorruptError
from raftseq.sequencer.journal.segments import HEADER, HEADER_BYTES, ClosedOnExit, Segment


class SegmentSource(Protocol):
    """What a cursor reads from: the journal's bounds and segments."""

    @property
    def first_seq(self) -> int: ...

    @property
    def last_seq(self) -> int: ...

    def segment_for(self, seq: int) -> Segment | None: ...

    def next_segment(self, segment: Segment) -> Segment | None: ...


class JournalCursor(ClosedOnExit):
    """Reads records in order from ``next_seq`` up to a limit the caller gives each time.

    Has its own file handle. Checksums are verified unless ``verify=False``; a mismatch raises
    ``JournalCorruptError`` naming the sequence number.
    """

    def __init__(self, journal: SegmentSource, from_seq: int, *, verify: bool = True) -> None:
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
        if point >= len(seg.offsets):
            # Only a damaged segment lacks index points: they end at its first bad record.
            raise JournalCorruptError(
                f"seq {self.next_seq} lies past the damage in {seg.path}", seq=self.next_seq, path=seg.path, offset=seg.size
            )
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
        try:
            self._file = open(segment.path, "rb", buffering=0)
        except OSError as exc:  # a segment file gone or unreadable is damage, like a bad record
            raise JournalCorruptError(
                f"cannot read seq {self.next_seq}: {exc}", seq=self.next_seq, path=segment.path, offset=offset
            ) from None
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
        # Ask for no more than the segment holds: a live tail reads a few KiB per block, and a
        # read of max_bytes shrunk to that (glibc realloc) left the node's heap fragmented (RSS
        # growth on subscriber-serving nodes, issue 16 item 6).
        data = f.read(max(min(max_bytes, segment.size - self._offset), HEADER_BYTES))
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
