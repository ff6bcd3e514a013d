"""Retention: which sealed segments of a journal may leave it, and where the journal now starts.

A node keeps its journal within bounds by bytes, by age and by count of records; what leaves it
is whole sealed segments, oldest first (deleted, or archived by ``cluster.retention``). Age is
measured in log time (the batches' leader timestamps, ``Delivered.log_time_ns``): a segment is
old when the newest record of the journal is ``age_s_max`` later than the segment's last one.
No wall clock is read here; the caller passes the journal's newest log time.

Nothing at or above the *retention floor* ever leaves: the floor is the lowest number that
someone may still need from this journal, and the caller computes it (``cluster.retention``
explains its parts: peers' catch-up, this node's own holes and repairs, the newest state-machine
snapshots). The tail segment (not sealed) never leaves either.

Where the journal starts is kept in ``FIRST_RETAINED_FILE`` (written, fsynced, before any
segment file is removed): on open, the journal starts there rather than at 1, so removed records
are not taken for a hole to fetch from a peer; a subscriber asking below it is told the first
number still held (``protocol.Truncated``).
"""

from __future__ import annotations

import os

import msgspec

from raftseq.sequencer.journal.errors import JournalCorruptError
from raftseq.sequencer.journal.segments import fsync_dir, replace_file

#: The first number the journal still holds after retention removed segments (JSON integer).
FIRST_RETAINED_FILE = "first_retained.json"

_int_decoder = msgspec.json.Decoder(int)


class RetentionPolicy(msgspec.Struct, frozen=True):
    """The bounds a journal is kept within (0: no bound of that kind).

    ``bytes_max``: bytes of all segments, the tail included. ``age_s_max``: seconds of log time
    between the journal's newest record and a sealed segment's newest. ``records_max``: records
    held (numbers from the first held to the last, holes included).
    """

    bytes_max: int = 0
    age_s_max: int = 0
    records_max: int = 0

    @property
    def active(self) -> bool:
        return bool(self.bytes_max or self.age_s_max or self.records_max)


class SegmentSpan(msgspec.Struct, frozen=True):
    """What the policy reads of one segment: its numbers, its size and its newest log time."""

    first_seq: int
    end_seq: int  # one past its last number
    size_bytes: int
    last_log_time_ns: int
    sealed: bool


class RetentionPlan(msgspec.Struct, frozen=True):
    """What a policy decided: the segments (oldest first) to remove, the journal's first number
    after that, and whether the floor kept segments that the bounds alone would remove."""

    remove: tuple[SegmentSpan, ...]
    first_retained_seq: int
    #: Segments over the bounds that the floor (or the tail) keeps: 0 when the bounds are met.
    held_segments: int = 0
    held_bytes: int = 0


def plan_retention(policy: RetentionPolicy, segments: list[SegmentSpan], *, floor_seq: int, newest_log_time_ns: int) -> RetentionPlan:
    """The oldest segments of `segments` (in order) that `policy` sends out of the journal.

    A segment leaves when any bound is exceeded with it kept, it is sealed, and all its numbers
    are below `floor_seq` (0: nothing may leave). Segments leave oldest first, never one whose
    predecessor stays. ``newest_log_time_ns`` is the log time of the journal's newest record.
    """
    assert floor_seq >= 0, f"floor {floor_seq}"
    if not segments:
        return RetentionPlan((), 0)
    total_bytes = sum(s.size_bytes for s in segments)
    last_seq = segments[-1].end_seq - 1
    age_ns_max = policy.age_s_max * 1_000_000_000
    remove: list[SegmentSpan] = []
    held_segments = 0
    held_bytes = 0
    for i, segment in enumerate(segments):
        over_bytes = policy.bytes_max and total_bytes > policy.bytes_max
        over_records = policy.records_max and last_seq - segment.first_seq + 1 > policy.records_max
        over_age = age_ns_max and newest_log_time_ns - segment.last_log_time_ns > age_ns_max
        if not (over_bytes or over_records or over_age):
            break
        allowed = segment.sealed and i < len(segments) - 1 and segment.end_seq <= floor_seq
        if not allowed or held_segments:
            held_segments += 1
            held_bytes += segment.size_bytes
            total_bytes -= segment.size_bytes  # count the bounds as if it left, to size the hold
            continue
        remove.append(segment)
        total_bytes -= segment.size_bytes
    first = segments[len(remove)].first_seq if len(remove) < len(segments) else segments[-1].end_seq
    return RetentionPlan(tuple(remove), first if remove else segments[0].first_seq, held_segments, held_bytes)


def read_first_retained(directory: str) -> int:
    """The first number the journal in `directory` still holds after retention (0: none removed)."""
    path = os.path.join(directory, FIRST_RETAINED_FILE)
    try:
        with open(path, "rb") as f:
            value = _int_decoder.decode(f.read())
    except FileNotFoundError:
        return 0
    except msgspec.MsgspecError as exc:
        raise JournalCorruptError(f"{path} is unreadable: {exc}", path=path) from None
    if value < 1:
        raise JournalCorruptError(f"{path} holds {value}, not a sequence number", path=path)
    return value


def write_first_retained(directory: str, seq: int) -> None:
    """Record that the journal in `directory` starts at `seq` now (fsynced, with the directory)."""
    assert seq >= 1, f"first retained {seq}"
    replace_file(os.path.join(directory, FIRST_RETAINED_FILE), msgspec.json.encode(seq), fsync=True)
    fsync_dir(directory)


def remove_first_retained(directory: str) -> None:
    """The journal in `directory` starts where its files do again (a record written for a
    release that did not happen)."""
    try:
        os.unlink(os.path.join(directory, FIRST_RETAINED_FILE))
    except FileNotFoundError:
        return
    fsync_dir(directory)
