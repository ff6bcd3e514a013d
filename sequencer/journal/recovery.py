"""Opening a journal directory: its segments in order, its holes, and the tail's recovery.

The last segment is read record by record (length, checksum, decodable body, expected number);
from the first bad record on, the file is cut off and the cut is reported in a
``RecoveryReport``. The rest of the stream comes back from Raft. Damage before the tail (a
sealed segment that fails its checks or is short, a gap between segments that is no recorded
hole) is never cut away: it is returned as ``Damage`` (refused to readers, repaired from a peer).
The newest sealed segments, up to ``verify_bytes``, are read back in full; the others are
trusted to their index here and read back by the scrub.
"""

from __future__ import annotations

import bisect
import os

import msgspec

from raftseq.sequencer import limits
from raftseq.sequencer.journal.damage import Damage
from raftseq.sequencer.journal.holes import check_holes, drop_filled, merge_adjacent, read_holes, write_holes
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
    #: Records ``missing_first..missing_last`` before the first segment file, which the journal
    #: must hold from its start: recorded as a hole, fetched from a peer (0, 0: none).
    missing_first: int = 0
    missing_last: int = 0


def recover(
    directory: str, *, readonly: bool, verify_bytes: int = 0, start_seq: int = 0
) -> tuple[list[Segment], list[tuple[int, int]], RecoveryReport, list[Damage]]:
    """The segments and holes of the journal in `directory` (which exists), its tail cut to
    the last good record, what was cut, and the damaged ranges of sealed segments.

    ``readonly``: nothing is cut, removed or written; a torn tail just ends the readable
    stream (the report still says what would be cut).
    ``start_seq``: the number the journal must start at (0: wherever its first file starts).
    Records missing before the first segment (its file removed) become a hole.
    """
    files = list_segment_files(directory)
    recorded = read_holes(directory)
    holes = merge_adjacent(recorded)
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
    damages: list[Damage] = []
    verify_from = _verify_from(files, verify_bytes)
    for i, (first_seq, path) in enumerate(files):
        segment = Segment(path, first_seq)
        if i == len(files) - 1:
            recovery = _recover_tail(segment, removed_empty, readonly=readonly)
        else:
            end_seq = files[i + 1][0]
            for hole_first, _ in holes:
                if first_seq < hole_first < end_seq:
                    end_seq = hole_first
            damage = load_sealed(segment, end_seq, verify=i >= verify_from, rebuild=not readonly)
            if damage is not None:
                damages.append(damage)
        segments.append(segment)
    if not readonly and (recovery.bytes_cut or removed_empty):
        fsync_dir(directory)
    widened = _widen_hole_after_cut_tail(segments, drop_filled(holes, segments))
    if widened != recorded:
        holes = widened
        if not readonly:
            write_holes(directory, holes)
    check_holes(directory, holes, segments)
    missing = _missing_start(segments, holes, start_seq)
    if missing is not None:
        recovery = msgspec.structs.replace(recovery, missing_first=missing[0], missing_last=missing[1])
        first, last = missing
        if holes and holes[0][0] == last + 1:  # a recorded hole follows on: one hole
            last = holes.pop(0)[1]
        holes = [(first, last), *holes]
        if not readonly:
            write_holes(directory, holes)
    return segments, holes, recovery, damages


def _widen_hole_after_cut_tail(segments: list[Segment], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The holes, the first one after the tail starting where the tail now ends.

    ``holes.json`` is fsynced when written; the tail's records before it may not be (the Raft log
    rebuilds them after a power cut). A tail cut short of the hole that followed it lost those
    records as the hole lacks its own: they join the hole and are fetched from a peer."""
    if not segments or not holes:
        return holes
    tail_end = segments[-1].end_seq
    for i, (first, last) in enumerate(holes):
        if first > tail_end:
            if i and holes[i - 1][1] >= tail_end:
                return holes  # a hole already reaches the tail: nothing was cut between
            return [*holes[:i], (tail_end, last), *holes[i + 1 :]]
    return holes


def _missing_start(segments: list[Segment], holes: list[tuple[int, int]], start_seq: int) -> tuple[int, int] | None:
    """The numbers from `start_seq` up to the first one the journal holds or knows it lacks."""
    firsts = [s.first_seq for s in segments if s.count] + [h[0] for h in holes[:1]]
    if not start_seq or not firsts or min(firsts) <= start_seq:
        return None
    return start_seq, min(firsts) - 1


def _verify_from(files: list[tuple[int, str]], verify_bytes: int) -> int:
    """Index of the first sealed segment to read back in full: the newest ones (the tail
    aside) that fit in `verify_bytes` together, and at least the newest one if any."""
    i = len(files) - 1
    total = 0
    while i > 0:
        size = os.path.getsize(files[i - 1][1])
        if total and total + size > verify_bytes:
            break
        total += size
        i -= 1
    return i if verify_bytes > 0 else len(files)


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


def tail_damage(segment: Segment, file_bytes: int | None) -> Damage | None:
    """The damage of the tail segment while it is written, found by comparing its file with
    what the journal wrote to it: ``file_bytes`` is the file's size now (None: the file is
    gone). None when they agree.

    A shorter file loses its records from the first one it no longer holds whole (found by
    reading from the index point before the cut, at most ``INDEX_INTERVAL_RECORDS`` records); a
    longer one holds bytes the journal never wrote after its last record, which is refused
    with them; a file gone loses every record.
    """
    last = segment.end_seq - 1
    if not segment.count:
        return None
    if file_bytes is None:
        return Damage(segment.first_seq, last, segment.path, 0, "segment file removed")
    if file_bytes == segment.size:
        return None
    if file_bytes > segment.size:
        return Damage(last, last, segment.path, segment.size, f"{file_bytes - segment.size} bytes written after the last record")
    point = max(0, bisect.bisect_right(segment.offsets, file_bytes) - 1)
    point_seq = segment.first_seq + point * limits.INDEX_INTERVAL_RECORDS
    scan = scan_segment(segment.path, point_seq, check=True, start=segment.offsets[point] if segment.offsets else 0)
    first_bad = min(point_seq + scan.count, last)
    return Damage(first_bad, last, segment.path, scan.good_bytes, f"file cut to {file_bytes} of {segment.size} bytes")
