"""Checking a whole journal offline (``raftseq journal verify``): every record of every
segment, and what the journal promises about the stream.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable

import msgspec

from raftseq.sequencer import limits, protocol
from raftseq.sequencer.journal.errors import JournalCorruptError
from raftseq.sequencer.journal.retention import read_first_retained
from raftseq.sequencer.journal.holes import read_holes
from raftseq.sequencer.journal.segments import HEADER, HEADER_BYTES, list_segment_files


class VerifyDamage(msgspec.Struct):
    """One damaged place: the segment file, the byte offset of the first bad record in it, the
    sequence number that belongs there, and what is wrong."""

    path: str
    offset: int
    seq: int
    problem: str


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
    #: Every damaged place, in order (the first is also in ``problem``, ``path``, ``offset``).
    damages: list[VerifyDamage] = []

    @property
    def ok(self) -> bool:
        return not self.problem


def verify_journal(directory: str, *, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Read every record of every segment and check what the journal promises.

    Checks: the stream starts at 1 (or at a recorded hole, or where retention left it), segment names and continuity, each
    record's length, checksum and decodability, gapless numbering, log time never decreasing,
    and per session ``client_seq`` rising by one (or restarting at 1 after the session expired). After a damaged record the rest of its
    segment is skipped and checking goes on at the next segment, so that ``damages`` names
    every damaged place (numbering across the damage is not checked).
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
        holes = read_holes(directory)
    except JournalCorruptError as exc:
        report.problem = str(exc)
        return report
    except OSError as exc:  # a directory in its place, say
        report.problem = f"cannot read {exc.filename}: {exc.strerror or exc}"
        report.path = str(exc.filename)
        return report
    if holes and (not files or holes[0][0] < files[0][0]):
        report.problem = f"records {holes[0][0]}..{holes[0][1]} are missing (a hole waiting for catch-up)"
        report.first_bad_seq = holes[0][0]
        return report
    expected_seq = files[0][0] if files else 0
    report.first_seq = expected_seq
    try:
        first_retained = read_first_retained(directory)
    except JournalCorruptError as exc:
        report.problem = str(exc)
        return report
    if expected_seq > max(1, first_retained) and not holes:
        # A journal holds the stream from its start, or from where retention left it.
        start = max(1, first_retained)
        _damaged(
            report,
            files[0][1],
            0,
            start,
            f"records {start}..{expected_seq - 1} are missing: the first segment file starts at {expected_seq}",
        )
    last_time = 0
    client_seqs: dict[str, int] = {}
    unpack_from = HEADER.unpack_from
    # After a damage, or from a start that retention moved up: a session's first client_seq
    # seen may be anything.
    lenient = expected_seq > 1 and first_retained > 0
    previous_path = ""
    for i, (first_seq, path) in enumerate(files):
        report.segments += 1
        if first_seq != expected_seq:
            if (expected_seq, first_seq - 1) in holes:
                problem = f"records {expected_seq}..{first_seq - 1} are missing (a hole waiting for catch-up)"
            elif first_seq > expected_seq:
                problem = f"records {expected_seq}..{first_seq - 1} are missing: segment {os.path.basename(path)} starts at {first_seq}"
            else:
                problem = f"segment {os.path.basename(path)} starts at {first_seq}, expected {expected_seq}"
            end_of_previous = os.path.getsize(previous_path) if previous_path else 0
            _damaged(report, previous_path or path, end_of_previous, expected_seq, problem)
            if first_seq < expected_seq:
                return report
            expected_seq, lenient, client_seqs = first_seq, True, {}
        previous_path = path
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:  # unreadable: a damaged place like a bad record at its start
            _damaged(report, path, 0, expected_seq, f"cannot read: {exc.strerror or exc}")
            if i == len(files) - 1:
                return report
            expected_seq, lenient, client_seqs, last_time = files[i + 1][0], True, {}, 0
            continue
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
                        first_seen = lenient and record.session not in client_seqs
                        if record.seq != expected_seq:
                            problem = f"record holds seq {record.seq}, expected {expected_seq}"
                        elif record.log_time_ns < last_time:
                            problem = f"log time goes back from {last_time} to {record.log_time_ns}"
                        elif record.client_seq != previous + 1 and record.client_seq != 1 and not first_seen:
                            problem = f"session {record.session!r} client_seq {record.client_seq} follows {previous}"
                        else:
                            last_time = record.log_time_ns
                            client_seqs[record.session] = record.client_seq
            if problem:
                _damaged(report, path, pos, expected_seq, problem)
                if i == len(files) - 1:
                    return report
                # Skip to the next segment: its name says where its numbers start.
                expected_seq, lenient, client_seqs, last_time = files[i + 1][0], True, {}, 0
                break
            report.records += 1
            report.bytes += nxt - pos
            report.last_seq = expected_seq
            expected_seq += 1
            pos = nxt
        if progress is not None:
            progress(i + 1, report.records)
    return report


def _damaged(report: VerifyReport, path: str, offset: int, seq: int, problem: str) -> None:
    """Add a damaged place to `report` (the first one also sets its ``problem``)."""
    report.damages.append(VerifyDamage(path, offset, seq, problem))
    if not report.problem:
        report.problem, report.first_bad_seq, report.path, report.offset = problem, seq, path, offset
