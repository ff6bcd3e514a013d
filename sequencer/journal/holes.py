"""Holes: ranges of sequence numbers the journal lacks, and filling them from a peer.

When a replica's state jumps ahead (a Raft snapshot from the leader), the records in between
are missing; they are recorded in ``holes.json`` as ``[[first, last], ...]`` and fetched from a
peer. Records of a hole go to a side file ``<first_seq>.seg.fill``; when the hole is complete
the side file becomes a sealed segment (fsynced, with its index) and the hole is gone.
"""

from __future__ import annotations

import os

import msgspec

from raftseq.sequencer.journal.errors import JournalCorruptError
from raftseq.sequencer.journal.index import write_index
from raftseq.sequencer.journal.segments import FILE_MODE, FILL_SUFFIX, SEGMENT_SUFFIX, Segment, fsync_dir, replace_file, write_all

#: Ranges of sequence numbers the journal lacks (after a Raft snapshot), as JSON [[first, last], ...].
HOLES_FILE = "holes.json"

_HOLES_DECODER = msgspec.json.Decoder(list[tuple[int, int]])


def read_holes(directory: str) -> list[tuple[int, int]]:
    path = os.path.join(directory, HOLES_FILE)
    try:
        with open(path, "rb") as f:
            return [tuple(h) for h in _HOLES_DECODER.decode(f.read())]
    except FileNotFoundError:
        return []
    except msgspec.MsgspecError as exc:
        raise JournalCorruptError(f"{path} is unreadable: {exc}", path=path) from None


def write_holes(directory: str, holes: list[tuple[int, int]]) -> None:
    path = os.path.join(directory, HOLES_FILE)
    if not holes:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        fsync_dir(directory)
        return
    replace_file(path, msgspec.json.encode(holes), fsync=True)
    fsync_dir(directory)


def merge_adjacent(holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`holes` with each hole that follows on from the one before joined to it (two Raft
    snapshots in a row, the first hole not yet filled)."""
    merged: list[tuple[int, int]] = []
    for first, last in holes:
        if merged and merged[-1][1] == first - 1:
            merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged


def drop_filled(holes: list[tuple[int, int]], segments: list[Segment]) -> list[tuple[int, int]]:
    """`holes` without those a segment holds exactly: a fill ends with its side file renamed
    to a segment, then ``holes.json`` rewritten; a crash between the two leaves the hole
    recorded with its finished fill in place."""
    filled = {(s.first_seq, s.end_seq - 1) for s in segments if s.count}
    return [hole for hole in holes if hole not in filled]


def check_holes(directory: str, holes: list[tuple[int, int]], segments: list[Segment]) -> None:
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


class HoleFill:
    """A hole being filled: a side file that becomes a segment when complete."""

    def __init__(self, segment_path: str, first_seq: int) -> None:
        self.segment = Segment(segment_path, first_seq)
        self.path = segment_path[: -len(SEGMENT_SUFFIX)] + FILL_SUFFIX
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)

    def write(self, records: bytes, offsets: list[int]) -> None:
        write_all(self.fd, records)
        self.segment.add_run(offsets, len(records))

    def finish(self) -> Segment:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        write_index(self.segment, fsync=True)
        os.replace(self.path, self.segment.path)
        fsync_dir(os.path.dirname(self.path))
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


def held_runs(holes: list[tuple[int, int]], first: int, last: int) -> list[tuple[int, int]]:
    """The parts of ``first..last`` outside every hole."""
    runs = []
    start = first
    for hole_first, hole_last in holes:
        if hole_last < start or hole_first > last:
            continue
        if hole_first > start:
            runs.append((start, hole_first - 1))
        start = hole_last + 1
    if start <= last:
        runs.append((start, last))
    return runs
