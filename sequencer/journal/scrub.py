"""The scrub: sealed segments read back record by record, a bounded step at a time, so that a
flipped bit or a truncated file is found before a reader needs the record.

The node calls ``step`` at the rate it allows (``journal.scrub_bytes_per_s``); each step reads
at most ``max_bytes`` (plus one record) and checks each record's checksum and number. A record
that fails is recorded as damage (``Journal.mark_damaged``) and the scrub moves on to the next
segment. After the newest sealed segment it starts again from the oldest.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import msgspec

from raftseq.sequencer import limits, protocol
from raftseq.sequencer.journal.damage import Damage, DamageMap
from raftseq.sequencer.journal.segments import HEADER, HEADER_BYTES, Segment


class ScrubbedJournal(Protocol):
    """What the scrub needs of the journal (``Journal``)."""

    damage: DamageMap

    def sealed_segments(self) -> list[Segment]: ...

    def mark_damaged(self, seq: int, path: str, offset: int, reason: str) -> Damage | None: ...


class Scrubber:
    """Reads `journal`'s sealed segments in order, a step at a time."""

    def __init__(self, journal: ScrubbedJournal) -> None:
        self.journal = journal
        self.bytes_read = 0
        #: Full passes over every sealed segment.
        self.passes = 0
        self._segment: Segment | None = None
        self._offset = 0
        self._seq = 0

    def step(self, max_bytes: int) -> Damage | None:
        """Read and check up to about `max_bytes` of the current segment; the damage found,
        if any (already recorded in the journal)."""
        segment = self._segment
        if segment is None or segment not in self.journal.sealed_segments():
            segment = self._next_segment()
            if segment is None:
                return None
        if self._seq >= segment.end_seq or self.journal.damage.covering(self._seq) is not None:
            self._segment = None  # done, or already known to be damaged: its repair rewrites it
            return None
        try:
            with open(segment.path, "rb", buffering=0) as f:
                f.seek(self._offset)
                data = f.read(max(max_bytes, HEADER_BYTES + limits.FRAME_BYTES_MAX))
        except OSError as exc:
            return self._damaged(segment, f"cannot read: {exc}")
        view = memoryview(data)
        pos = 0
        end = len(data)
        # Per record: the loop runs some 450 times a step for 100-byte payloads (locals bound).
        unpack_from, crc32, seq_of = HEADER.unpack_from, zlib.crc32, protocol.delivered_seq
        frame_bytes_max, end_seq = limits.FRAME_BYTES_MAX, segment.end_seq
        seq = self._seq
        while seq < end_seq and pos < max_bytes:
            if end - pos < HEADER_BYTES:
                if len(data) < max(max_bytes, HEADER_BYTES + frame_bytes_max):
                    return self._damaged(segment, f"file ends at offset {self._offset + end}", pos, seq)
                break
            length, crc = unpack_from(data, pos)
            start = pos + HEADER_BYTES
            nxt = start + length
            if length == 0 or length > frame_bytes_max:
                return self._damaged(segment, f"record length {length} out of range", pos, seq)
            if nxt > end:
                if pos == 0:
                    return self._damaged(segment, f"torn record: {end - pos} of {HEADER_BYTES + length} bytes", pos, seq)
                break
            if crc32(view[start:nxt]) != crc:
                return self._damaged(segment, "checksum mismatch", pos, seq)
            try:
                found = seq_of(data, start)
            except (msgspec.MsgspecError, ValueError, IndexError) as exc:
                return self._damaged(segment, f"undecodable record: {exc}", pos, seq)
            if found != seq:
                return self._damaged(segment, f"record holds seq {found}", pos, seq)
            pos = nxt
            seq += 1
        self._seq = seq
        self._offset += pos
        self.bytes_read += pos
        if self._seq >= segment.end_seq:
            self._segment = None
        return None

    def _next_segment(self) -> Segment | None:
        sealed = self.journal.sealed_segments()
        if not sealed:
            return None
        previous = self._segment.first_seq if self._segment is not None else self._seq
        following = [s for s in sealed if s.first_seq >= previous] if previous else []
        if not following:
            self.passes += 1 if previous else 0
            following = sealed
        segment = following[0]
        self._segment, self._offset, self._seq = segment, 0, segment.first_seq
        return segment

    def _damaged(self, segment: Segment, reason: str, pos: int = 0, seq: int | None = None) -> Damage | None:
        """Record damage at `pos` of this step, in record `seq` (by default where the step began)."""
        damage = self.journal.mark_damaged(self._seq if seq is None else seq, segment.path, self._offset + pos, reason)
        self.bytes_read += pos
        self._segment = None
        self._seq = segment.end_seq
        return damage
