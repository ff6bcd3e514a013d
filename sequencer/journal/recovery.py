"""Opening a journal directory: its segments in order, its holes, and the tail's recovery.

The last segment is read record by record (length, checksum, decodable body, expected number);
from the first bad record on, the file is cut off and the cut is reported in a
``RecoveryReport``. The rest of the stream comes back from Raft. Damage before the tail (a
sealed segment, a gap between segments) is never cut away silently: opening fails with
``JournalCorruptError``.
"""

from __future__ import annotations

import os

import msgspec

from raftseq.sequencer.journal.errors import JournalCorruptError
from raftseq.sequencer.journal.holes import check_holes, read_holes
from raftseq.sequencer.journal.index import load_sealed
from raftseq.sequencer.journal.segments import FILL_SUFFIX, Segment, fsync_dir, list_segment_files, scan_segment


class RecoveryReport(msgspec.Struct, frozen=True):
    """What opening the journal cut from its tail. ``bytes_cut == 0``: nothing."""

    segment: str = ""
    offset: int = 0  # where the good records end in that segment
    bytes_cut: int = 0
    last_good_seq: int = 0
    reason: str = ""
    removed_empty_segments: int = 0


def recover(directory: str, *, readonly: bool) -> tuple[list[Segment], list[tuple[int, int]], RecoveryReport]:
    """The segments and holes of the journal in `directory` (which exists), its tail cut to
    the last good record, and what was cut.

    ``readonly``: nothing is cut, removed or written; a torn tail just ends the readable
    stream (the report still says what would be cut).
    """
    files = list_segment_files(directory)
    holes = read_holes(directory)
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
    recovery = RecoveryReport()
    for i, (first_seq, path) in enumerate(files):
        segment = Segment(path, first_seq)
        if segments and segments[-1].end_seq != first_seq and (segments[-1].end_seq, first_seq - 1) not in holes:
            raise JournalCorruptError(
                f"gap between segments: {segments[-1].path} ends before seq {segments[-1].end_seq}, next segment starts at {first_seq}",
                seq=segments[-1].end_seq,
                path=path,
            )
        if i == len(files) - 1:
            recovery = _recover_tail(segment, removed_empty, readonly=readonly)
        else:
            load_sealed(segment)
        segments.append(segment)
    if not readonly and (recovery.bytes_cut or removed_empty):
        fsync_dir(directory)
    check_holes(directory, holes, segments)
    return segments, holes, recovery


def _recover_tail(segment: Segment, removed_empty: int, *, readonly: bool) -> RecoveryReport:
    """Check the tail segment in full and cut it after its last good record."""
    path, first_seq = segment.path, segment.first_seq
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
    return recovery
