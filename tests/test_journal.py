"""The journal: torn-tail recovery, damage that must not be cut, reading from any number,
append assertions, fsync policies and the sealed-segment index.

Journals are built two ways: ``Delivered`` frames appended directly (``frames``), and batches
applied through the machine and journal together (``build_with_core``), as a replica does.
Segments are the smallest allowed (``limits.SEGMENT_BYTES_MIN``) so a few hundred small
records span several of them.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
import sys
import zlib

import pytest

from raftseq.sequencer import journal as journal_mod
from raftseq.sequencer import limits, protocol
from raftseq.sequencer.journal import holes as holes_mod
from raftseq.sequencer.journal import index as journal_index
from raftseq.sequencer.journal import recovery as journal_recovery
from raftseq.sequencer.stream import SequencedStream
from raftseq.sequencer.journal import (
    Damage,
    DamageMap,
    FsyncPolicy,
    Journal,
    JournalCorruptError,
    JournalError,
    JournalRecordError,
    RecoveryReport,
    Scrubber,
    verify_journal,
)
from raftseq.sequencer.machine import SequencerMachine

SEGMENT_BYTES = limits.SEGMENT_BYTES_MIN
HEADER = protocol.HEADER
HEADER_BYTES = protocol.HEADER_BYTES


# --- helpers ------------------------------------------------------------------------------


def frame(seq: int) -> bytes:
    """Record `seq` of a one-session stream: client_seq == seq, log time rising with seq."""
    return protocol.encode_delivered(seq, 1_000 + seq, "s", seq, b"p%d" % seq)


def frames(first: int, last: int) -> bytes:
    return b"".join(frame(seq) for seq in range(first, last + 1))


def opening_finds_damage_and_changes_nothing(directory) -> list[Damage]:
    """Open `directory` for writing, then read-only: each opens, finds one damaged range of a
    sealed segment (returned, in that order) and leaves every file as it was."""
    before = dir_state(directory)
    found = []
    for readonly in (False, True):
        with open_journal(directory, readonly=readonly) as journal:
            damages = list(journal.damage)
            assert len(damages) == 1, damages
            found.append(damages[0])
    assert dir_state(directory) == before
    return found


def spy_on_segment_walks(monkeypatch) -> list[str]:
    """The paths of the segments that opening a journal walks record by record (the tail, and
    sealed segments whose index cannot be used), in order."""
    walked = []
    real_scan = journal_mod.scan_segment

    def spy(path, first, *, check):
        walked.append(path)
        return real_scan(path, first, check=check)

    monkeypatch.setattr(journal_index, "scan_segment", spy)
    monkeypatch.setattr(journal_recovery, "scan_segment", spy)
    return walked


def open_journal(directory, **kwargs) -> Journal:
    kwargs.setdefault("segment_bytes_max", SEGMENT_BYTES)
    return Journal.open(str(directory), **kwargs)


def build(directory, last: int, *, per_append: int = 7, **kwargs) -> Journal:
    """A journal holding 1..last (frames of ``frame``), appended ``per_append`` at a time."""
    journal = open_journal(directory, **kwargs)
    seq = journal.last_seq + 1
    while seq <= last:
        end = min(last, seq + per_append - 1)
        journal.append(frames(seq, end), seq, end)
        seq = end + 1
    return journal


def build_with_core(directory, messages: int, **kwargs) -> tuple[Journal, list[bytes]]:
    """Batches from three sessions with payloads of varying size, through machine + journal.

    Returns the open journal and the record bytes of each sequence number (index seq - 1).
    """
    journal = open_journal(directory, **kwargs)
    core = SequencedStream(SequencerMachine(), journal)
    sessions = ["alpha", "beta", "gamma"]
    next_client_seq = dict.fromkeys(sessions, 1)
    produced = []
    t = 1_700_000_000_000_000_000
    i = 0
    while core.machine.last_seq < messages:
        entries = []
        for _ in range(min(1 + i % 9, messages - core.machine.last_seq)):
            session = sessions[i % 3]
            client_seq = next_client_seq[session]
            next_client_seq[session] += 1
            entries.append(protocol.Entry(session, client_seq, bytes([65 + i % 26]) * (i * 7 % 61)))
            i += 1
        t += 1_000
        result = core.apply(protocol.encode_batch(t, entries))
        assert not result.error
        produced.append(result.records)
    return journal, split_frames(b"".join(produced))


def split_frames(data: bytes) -> list[bytes]:
    out = []
    pos = 0
    while pos < len(data):
        end = pos + HEADER_BYTES + HEADER.unpack_from(data, pos)[0]
        out.append(data[pos:end])
        pos = end
    assert pos == len(data)
    return out


def record_spans(path) -> list[tuple[int, int]]:
    """``(start, end)`` byte offsets of each whole record in a segment file."""
    with open(path, "rb") as f:
        data = f.read()
    spans = []
    pos = 0
    while pos + HEADER_BYTES <= len(data):
        end = pos + HEADER_BYTES + HEADER.unpack_from(data, pos)[0]
        if end > len(data):
            break
        spans.append((pos, end))
        pos = end
    return spans


def segment_files(directory) -> list[str]:
    return [path for _, path in journal_mod.list_segment_files(str(directory))]


def index_path(segment_path: str) -> str:
    return segment_path[: -len(journal_mod.SEGMENT_SUFFIX)] + journal_mod.INDEX_SUFFIX


def dir_state(directory) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time, to prove nothing was touched."""
    state = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            state[name] = (f.read(), os.stat(path).st_mtime_ns)
    return state


def flip(path, offset: int, mask: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def seq_of_frame(data: bytes) -> int:
    return protocol.decode_delivered_body(memoryview(data)[HEADER_BYTES:]).seq


def read_all_frames(cursor, limit_seq: int, sizes=(1, 3, 64, 10_000)) -> list[bytes]:
    out = []
    i = 0
    while True:
        got = cursor.read_frames(limit_seq, sizes[i % len(sizes)])
        i += 1
        if not got:
            return out
        assert len(got) <= sizes[(i - 1) % len(sizes)]
        out.extend(got)


def read_all_blocks(cursor, limit_seq: int, sizes=(0, 1, 37, 500, 1 << 20)) -> bytes:
    parts = []
    i = 0
    while True:
        count, block = cursor.read_block(limit_seq, sizes[i % len(sizes)])
        i += 1
        if not count:
            assert block == b""
            return b"".join(parts)
        assert len(split_frames(block)) == count
        parts.append(block)


# --- 1. the tail: torn records are cut on open ---------------------------------------------


def test_truncated_tail_recovers_at_every_byte_offset(tmp_path):
    base = tmp_path / "base"
    build(base, 400).close()
    tail = segment_files(base)[-1]
    tail_first = journal_mod.list_segment_files(str(base))[-1][0]
    spans = record_spans(tail)
    assert len(spans) > 3 and len(segment_files(base)) >= 3
    size = os.path.getsize(tail)
    assert spans[-1][1] == size
    for cut in range(spans[-3][0], size + 1):
        directory = tmp_path / f"cut{cut}"
        shutil.copytree(base, directory)
        cut_tail = os.path.join(str(directory), os.path.basename(tail))
        os.truncate(cut_tail, cut)
        good_end = max([0] + [end for _, end in spans if end <= cut])
        last_good = tail_first + sum(1 for _, end in spans if end <= cut) - 1
        with open_journal(directory) as journal:
            assert journal.last_seq == last_good, cut
            report = journal.recovery
            if cut == good_end:
                assert report == RecoveryReport(), cut
            else:
                assert report.segment == cut_tail
                assert (report.offset, report.bytes_cut, report.last_good_seq) == (good_end, cut - good_end, last_good), cut
                assert report.reason, cut
            assert os.path.getsize(cut_tail) == good_end
            journal.append(frames(last_good + 1, last_good + 2), last_good + 1, last_good + 2)
            assert journal.last_seq == last_good + 2
        verified = verify_journal(str(directory))
        assert verified.ok, (cut, verified.problem)
        assert (verified.first_seq, verified.last_seq) == (1, last_good + 2)
        with open_journal(directory, readonly=True) as journal:
            assert journal.recovery.bytes_cut == 0
            assert journal.read_bytes(1, last_good + 2) == frames(1, last_good + 2)


def test_bit_flip_anywhere_in_the_last_record_cuts_it(tmp_path):
    base = tmp_path / "base"
    build(base, 300).close()
    tail = segment_files(base)[-1]
    start, end = record_spans(tail)[-1]
    for offset in range(start, end):
        for mask in (0x01, 0x80, 0xFF):
            directory = tmp_path / f"flip{offset}-{mask}"
            shutil.copytree(base, directory)
            damaged = os.path.join(str(directory), os.path.basename(tail))
            flip(damaged, offset, mask)
            with open_journal(directory) as journal:
                where = (offset - start, mask)
                assert journal.last_seq == 299, where
                report = journal.recovery
                assert (report.segment, report.offset, report.bytes_cut, report.last_good_seq) == (
                    damaged,
                    start,
                    end - start,
                    299,
                ), where
                assert report.reason
                assert os.path.getsize(damaged) == start
                journal.append(frames(300, 301), 300, 301)
            assert verify_journal(str(directory)).ok


def test_torn_first_record_of_a_new_segment_leaves_the_previous_one_whole(tmp_path):
    journal = build(tmp_path, 1)
    while os.path.getsize(segment_files(tmp_path)[-1]) < SEGMENT_BYTES:
        journal.append(frame(journal.last_seq + 1), journal.last_seq + 1, journal.last_seq + 1)
    last = journal.last_seq
    journal.append(frame(last + 1), last + 1, last + 1)  # rolls: one record in a new segment
    journal.close()
    new_tail = segment_files(tmp_path)[-1]
    assert os.path.basename(new_tail) == journal_mod.segment_name(last + 1)
    os.truncate(new_tail, 5)
    with open_journal(tmp_path) as journal:
        assert journal.last_seq == last
        assert (journal.recovery.bytes_cut, journal.recovery.last_good_seq, journal.recovery.offset) == (5, last, 0)
        assert os.path.getsize(new_tail) == 0
        journal.append(frames(last + 1, last + 3), last + 1, last + 3)
    assert verify_journal(str(tmp_path)).ok
    with open_journal(tmp_path) as journal:
        assert journal.recovery == RecoveryReport()
        assert [r.seq for r in journal.records()] == list(range(1, last + 4))


def _fill_tail_segment(journal: Journal, directory) -> None:
    """Append one record at a time until the tail segment is full (the next append rolls)."""
    while os.path.getsize(segment_files(directory)[-1]) < SEGMENT_BYTES:
        seq = journal.last_seq + 1
        journal.append(frame(seq), seq, seq)


def test_trailing_empty_segment_is_removed_and_the_previous_becomes_the_tail(tmp_path):
    journal = build(tmp_path, 200)
    _fill_tail_segment(journal, tmp_path)
    last = journal.last_seq
    segments = journal.segment_count
    journal.close()
    previous_tail = segment_files(tmp_path)[-1]
    # A roll created the next segment file, then the process died before writing to it.
    empty = os.path.join(str(tmp_path), journal_mod.segment_name(last + 1))
    open(empty, "wb").close()
    # The previous segment's last record is torn too: as the tail again it is checked in full.
    start, end = record_spans(previous_tail)[-1]
    os.truncate(previous_tail, end - 2)
    with open_journal(tmp_path) as journal:
        assert not os.path.exists(empty)
        assert journal.segment_count == segments
        assert journal.last_seq == last - 1
        report = journal.recovery
        assert report.removed_empty_segments == 1
        assert (report.segment, report.offset, report.bytes_cut, report.last_good_seq) == (
            previous_tail,
            start,
            end - 2 - start,
            last - 1,
        )
        journal.append(frames(last, last + 1), last, last + 1)
        assert journal.last_seq == last + 1
    verified = verify_journal(str(tmp_path))
    assert verified.ok and verified.last_seq == last + 1
    with open_journal(tmp_path, readonly=True) as journal:
        assert journal.read_bytes(1, last + 1) == frames(1, last + 1)


def test_trailing_empty_segment_alone(tmp_path):
    journal = build(tmp_path, 200)
    _fill_tail_segment(journal, tmp_path)
    last = journal.last_seq
    journal.close()
    empty = os.path.join(str(tmp_path), journal_mod.segment_name(last + 1))
    open(empty, "wb").close()
    with open_journal(tmp_path) as journal:
        assert not os.path.exists(empty)
        assert journal.recovery == RecoveryReport(removed_empty_segments=1)
        assert journal.last_seq == last
        journal.append(frames(last + 1, last + 2), last + 1, last + 2)
    assert os.path.getsize(empty) > 0  # the roll happened again, into a segment of that name
    assert verify_journal(str(tmp_path)).ok


def test_readonly_open_changes_nothing(tmp_path):
    journal = build(tmp_path, 200)
    _fill_tail_segment(journal, tmp_path)
    last = journal.last_seq
    journal.close()
    tail = segment_files(tmp_path)[-1]
    start, end = record_spans(tail)[-1]
    os.truncate(tail, end - 1)
    open(os.path.join(str(tmp_path), journal_mod.segment_name(last + 1)), "wb").close()
    before = dir_state(tmp_path)
    with open_journal(tmp_path, readonly=True) as journal:
        assert journal.last_seq == last - 1
        report = journal.recovery
        assert (report.segment, report.offset, report.bytes_cut, report.last_good_seq, report.removed_empty_segments) == (
            tail,
            start,
            end - 1 - start,
            last - 1,
            1,
        )
        assert journal.read_bytes(1, last - 1) == frames(1, last - 1)
        with pytest.raises(AssertionError):
            journal.append(frame(last), last, last)
    assert dir_state(tmp_path) == before


def test_readonly_open_of_a_missing_directory_fails_and_creates_nothing(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(JournalError):
        Journal.open(str(missing), readonly=True)
    with pytest.raises(JournalError):
        Journal.open(str(missing), create=False)
    assert not missing.exists()


# --- 2. damage before the tail is never cut silently -----------------------------------


def _sealed_middle(directory) -> tuple[str, int, list[tuple[int, int]]]:
    """Path, first seq and record spans of the second segment (sealed, not the tail)."""
    listed = journal_mod.list_segment_files(str(directory))
    assert len(listed) >= 3
    first_seq, path = listed[1]
    return path, first_seq, record_spans(path)


@pytest.mark.parametrize(
    "damage",
    ["torn end, index gone", "torn end, index stale", "length zeroed, index gone", "length huge, index gone"],
)
def test_damaged_sealed_segment_is_found_on_open_kept_and_refused_on_read(tmp_path, damage):
    build(tmp_path, 500).close()
    path, first_seq, spans = _sealed_middle(tmp_path)
    if damage.startswith("torn end"):
        os.truncate(path, spans[-1][1] - 3)
        bad_seq = first_seq + len(spans) - 1
    else:
        k = len(spans) // 2
        with open(path, "r+b") as f:
            f.seek(spans[k][0])
            f.write(struct.pack(">I", 0 if "zeroed" in damage else 0xFFFF_FFF0))
        bad_seq = first_seq + k
    if damage.endswith("index gone"):
        os.unlink(index_path(path))
    segment_last = first_seq + len(spans) - 1
    for found in opening_finds_damage_and_changes_nothing(tmp_path):
        assert (found.first_seq, found.last_seq, found.path) == (bad_seq, segment_last, path)
    with open_journal(tmp_path, readonly=True) as journal:
        assert journal.last_seq == 500
        assert [r.seq for r in journal.records(1, bad_seq - 1)] == list(range(1, bad_seq))
        with pytest.raises(JournalCorruptError):
            list(journal.records(bad_seq, bad_seq))
        assert [r.seq for r in journal.records(segment_last + 1, 500)] == list(range(segment_last + 1, 501))
    report = verify_journal(str(tmp_path))
    assert not report.ok
    assert report.first_bad_seq == bad_seq
    assert report.path == path
    assert [(d.seq, d.path) for d in report.damages] == [(bad_seq, path)]


def test_missing_middle_segment_is_damage_at_the_end_of_the_one_before(tmp_path):
    build(tmp_path, 500).close()
    path, first_seq, spans = _sealed_middle(tmp_path)
    before_path = journal_mod.list_segment_files(str(tmp_path))[0][1]
    os.unlink(path)
    os.unlink(index_path(path))
    for found in opening_finds_damage_and_changes_nothing(tmp_path):
        assert (found.first_seq, found.last_seq, found.path) == (first_seq, first_seq + len(spans) - 1, before_path)
        assert found.offset == os.path.getsize(before_path)
    report = verify_journal(str(tmp_path))
    assert not report.ok and report.first_bad_seq == first_seq
    assert [(d.seq, d.path, d.offset) for d in report.damages] == [(first_seq, before_path, os.path.getsize(before_path))]


def test_verify_names_every_damaged_segment_file_offset_and_seq(tmp_path):
    build(tmp_path, 500).close()
    listed = journal_mod.list_segment_files(str(tmp_path))
    assert len(listed) >= 4
    expected = []
    for first_seq, path in listed[1:3]:
        spans = record_spans(path)
        flip(path, spans[2][1] - 1)
        expected.append((first_seq + 2, path, spans[2][0]))
    report = verify_journal(str(tmp_path))
    assert [(d.seq, d.path, d.offset) for d in report.damages] == expected
    assert all("checksum" in d.problem for d in report.damages)
    assert report.last_seq == 500


def _rewrite_index(path: str, *, seg_bytes_delta: int = 0, interval: int | None = None) -> None:
    """Rewrite an index file with a valid checksum but a changed header field."""
    with open(path, "rb") as f:
        data = f.read()
    magic, first_seq, count, seg_bytes, old_interval = journal_index.INDEX_HEADER.unpack_from(data, 0)
    body = journal_index.INDEX_HEADER.pack(magic, first_seq, count, seg_bytes + seg_bytes_delta, interval or old_interval)
    body += data[journal_index.INDEX_HEADER.size : -4]
    with open(path, "wb") as f:
        f.write(body + struct.pack(">I", zlib.crc32(body)))


INDEX_DAMAGE = ["flipped byte", "truncated", "empty", "zero-filled", "other segment's", "wrong segment size", "other interval"]


@pytest.mark.parametrize("damage", INDEX_DAMAGE)
def test_stale_or_corrupt_index_is_ignored(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(limits, "INDEX_INTERVAL_RECORDS", 8)  # several index points per segment
    journal = build(tmp_path, 500)
    written = {}
    for first, _ in journal_mod.list_segment_files(str(tmp_path)):
        segment = journal.segment_for(first)
        written[first] = (segment.count, segment.size, list(segment.offsets))
    journal.close()
    expected = frames(1, 500)
    path, first_seq, _ = _sealed_middle(tmp_path)
    idx = index_path(path)
    size = os.path.getsize(idx)
    if damage == "flipped byte":
        flip(idx, size // 2)
    elif damage == "truncated":
        os.truncate(idx, 10)
    elif damage == "empty":
        os.truncate(idx, 0)
    elif damage == "zero-filled":
        with open(idx, "wb") as f:
            f.write(bytes(size))
    elif damage == "other segment's":
        shutil.copyfile(index_path(segment_files(tmp_path)[0]), idx)
    elif damage == "wrong segment size":
        _rewrite_index(idx, seg_bytes_delta=1)
    elif damage == "other interval":
        _rewrite_index(idx, interval=16)
    walked = spy_on_segment_walks(monkeypatch)
    with open_journal(tmp_path) as journal:
        assert path in walked
        segment = journal.segment_for(first_seq)
        assert (segment.count, segment.size, segment.offsets) == written[first_seq]
        assert segment.sealed
        assert journal.last_seq == 500
        assert journal.read_bytes(1, 500) == expected
        for seq in range(first_seq, first_seq + segment.count + 1):
            with journal.cursor(seq) as cursor:
                assert seq_of_frame(cursor.read_frames(500, 1)[0]) == seq
        journal.append(frame(501), 501, 501)
    assert verify_journal(str(tmp_path)).ok


# --- 3. reading from any number ------------------------------------------------------------


@pytest.mark.parametrize("interval", [limits.INDEX_INTERVAL_RECORDS, 16])
def test_read_from_every_number(tmp_path, monkeypatch, interval):
    monkeypatch.setattr(limits, "INDEX_INTERVAL_RECORDS", interval)
    journal, produced = build_with_core(tmp_path, 420)
    last = journal.last_seq
    assert last == 420 and journal.segment_count >= 4
    with journal:
        for from_seq in range(1, last + 2):
            expected = produced[from_seq - 1 :]
            with journal.cursor(from_seq) as cursor:
                assert read_all_frames(cursor, last) == expected, from_seq
                assert cursor.next_seq == last + 1
            with journal.cursor(from_seq) as cursor:
                assert read_all_blocks(cursor, last) == b"".join(expected), from_seq
                assert cursor.next_seq == last + 1
            assert [r.seq for r in journal.records(from_seq)] == list(range(from_seq, last + 1))
        decoded = list(journal.records())
        assert [r.seq for r in decoded] == list(range(1, last + 1))
        assert [protocol.encode_delivered(r.seq, r.log_time_ns, r.session, r.client_seq, r.payload) for r in decoded] == produced
        for bad in (0, last + 2):
            with pytest.raises(ValueError):
                journal.cursor(bad)


def test_read_stops_exactly_at_the_limit(tmp_path):
    journal, produced = build_with_core(tmp_path, 300)
    last = journal.last_seq
    boundaries = [first for first, _ in journal_mod.list_segment_files(str(tmp_path))][1:]
    limits_to_try = sorted({1, 2, last - 1} | {b - 1 for b in boundaries} | set(boundaries))
    with journal:
        for limit in limits_to_try:
            for read in ("frames", "block"):
                with journal.cursor(1) as cursor:
                    if read == "frames":
                        got = b"".join(read_all_frames(cursor, limit))
                        assert cursor.read_frames(limit, 100) == []
                    else:
                        got = read_all_blocks(cursor, limit)
                        assert cursor.read_block(limit, 1 << 20) == (0, b"")
                    assert got == b"".join(produced[:limit]), (limit, read)
                    assert cursor.next_seq == limit + 1
                    # Publishing a higher limit continues from there.
                    assert b"".join(read_all_frames(cursor, last)) == b"".join(produced[limit:])
            assert list(journal.records(1, limit))[-1].seq == limit


@pytest.mark.parametrize("read", ["frames", "block"])
def test_live_tail_sees_exactly_the_new_records(tmp_path, read):
    journal = open_journal(tmp_path)

    def take(cursor):
        if read == "frames":
            return b"".join(read_all_frames(cursor, 10**9))
        return read_all_blocks(cursor, 10**9)

    with journal:
        fresh = journal.cursor(1)  # on an empty journal
        assert take(fresh) == b""
        follower = journal.cursor(1)
        seq = 1
        rolls = 0
        while rolls < 3:
            segments = journal.segment_count
            late = journal.cursor(seq)  # opened at last + 1, never positioned yet
            assert take(late) == b""
            batch = 1 + seq % 5
            journal.append(frames(seq, seq + batch - 1), seq, seq + batch - 1)
            rolls += journal.segment_count > segments and segments > 0
            expected = frames(seq, seq + batch - 1)
            assert take(late) == expected, seq
            assert take(follower) == expected, seq  # has read everything before
            assert take(follower) == b""
            late.close()
            seq += batch
        assert take(fresh) == frames(1, seq - 1)
        fresh.close()
        follower.close()
    assert verify_journal(str(tmp_path)).ok


def test_readonly_second_open_reads_the_same_bytes(tmp_path):
    writer, produced = build_with_core(tmp_path, 300)
    with writer, open_journal(tmp_path, readonly=True) as reader:
        assert (reader.first_seq, reader.last_seq, reader.segment_count) == (1, 300, writer.segment_count)
        for from_seq in (1, 2, 150, 299, 300):
            with writer.cursor(from_seq) as a, reader.cursor(from_seq) as b:
                mine = read_all_frames(a, 300)
                theirs = read_all_frames(b, 300)
                assert mine == theirs == produced[from_seq - 1 :]
        assert list(reader.records()) == list(writer.records())


# --- 4. damage inside an older record is found on read ------------------------------------


def test_flipped_byte_in_a_sealed_record_is_named_on_read_and_verify(tmp_path):
    build(tmp_path, 500).close()
    path, first_seq, spans = _sealed_middle(tmp_path)
    k = len(spans) // 3
    bad_seq = first_seq + k
    flip(path, spans[k][1] - 1)  # last payload byte
    before = dir_state(tmp_path)
    with open_journal(tmp_path) as journal:
        assert journal.last_seq == 500 and journal.recovery == RecoveryReport()
        assert [(d.first_seq, d.path, d.offset) for d in journal.damage] == [(bad_seq, path, spans[k][0])]
        for from_seq in (1, first_seq, bad_seq):
            with journal.cursor(from_seq) as cursor, pytest.raises(JournalCorruptError) as caught:
                read_all_frames(cursor, 500)
            assert caught.value.seq == bad_seq
            assert f"seq {bad_seq}" in str(caught.value)
            assert caught.value.path == path
            assert caught.value.offset == spans[k][0]
        with journal.cursor(first_seq) as cursor, pytest.raises(JournalCorruptError) as caught:
            read_all_blocks(cursor, 500)
        assert caught.value.seq == bad_seq
        with pytest.raises(JournalCorruptError):
            list(journal.records())
        with journal.cursor(bad_seq, verify=False) as cursor:
            damaged = cursor.read_frames(500, 1)[0]
        assert damaged != frame(bad_seq) and len(damaged) == len(frame(bad_seq))
    assert dir_state(tmp_path) == before  # a sealed segment is never cut
    report = verify_journal(str(tmp_path))
    assert (report.ok, report.first_bad_seq, report.path, report.offset) == (False, bad_seq, path, spans[k][0])
    assert "checksum" in report.problem


def test_flipped_byte_in_a_sealed_record_without_index_is_not_cut(tmp_path):
    build(tmp_path, 500).close()
    path, first_seq, spans = _sealed_middle(tmp_path)
    bad_seq = first_seq + 4
    flip(path, spans[4][1] - 1)
    os.unlink(index_path(path))
    size = os.path.getsize(path)
    try:
        journal = open_journal(tmp_path)
    except JournalCorruptError as exc:
        assert exc.seq == bad_seq
    else:
        with journal, journal.cursor(1) as cursor, pytest.raises(JournalCorruptError) as caught:
            read_all_frames(cursor, 500)
        assert caught.value.seq == bad_seq
    assert os.path.getsize(path) == size
    assert verify_journal(str(tmp_path)).first_bad_seq == bad_seq


def test_flipped_byte_in_an_older_tail_record_of_a_live_journal(tmp_path):
    with build(tmp_path, 300) as journal:
        tail = segment_files(tmp_path)[-1]
        tail_first = journal_mod.list_segment_files(str(tmp_path))[-1][0]
        spans = record_spans(tail)
        flip(tail, spans[2][0] + HEADER_BYTES + 3)
        with journal.cursor(1) as cursor, pytest.raises(JournalCorruptError) as caught:
            read_all_frames(cursor, 300)
        assert caught.value.seq == tail_first + 2
        assert verify_journal(str(tmp_path)).first_bad_seq == tail_first + 2


# --- 5. append and fill refuse bad records and misuse, and write nothing --------------------


def _bad_checksum_in_middle() -> bytes:
    data = bytearray(frames(21, 23))
    data[len(frame(21)) + HEADER_BYTES + 2] ^= 0xFF
    return bytes(data)


BAD_APPENDS = {
    "gap": lambda: (frames(22, 23), 22, 23),
    "overlap": lambda: (frames(20, 21), 20, 21),
    "fewer records than numbers": lambda: (frames(21, 22), 21, 23),
    "more records than numbers": lambda: (frames(21, 22), 21, 21),
    "records hold other numbers": lambda: (frames(22, 23), 21, 22),
    "bad checksum inside": lambda: (_bad_checksum_in_middle(), 21, 23),
    "torn last record": lambda: (frames(21, 23)[:-3], 21, 23),
    "no records": lambda: (b"", 21, 21),
    "last before first": lambda: (frame(21), 21, 20),
    "middle record misnumbered": lambda: (frame(21) + frame(23) + frame(23), 21, 23),
}


#: Ranges that do not follow on: a bug in the caller (``AssertionError``). The other cases are
#: records that fail their checks (``JournalRecordError``).
MISUSED_RANGES = {"gap", "overlap", "last before first", "fewer offsets than numbers", "more offsets than numbers", "first offset not zero"}


def expected_error(case: str) -> type[Exception]:
    return AssertionError if case in MISUSED_RANGES else JournalRecordError


@pytest.mark.parametrize("case", list(BAD_APPENDS))
def test_append_refuses_misuse_and_bad_records_and_writes_nothing(tmp_path, case):
    records, first, last = BAD_APPENDS[case]()
    with build(tmp_path, 20, per_append=20) as journal:
        before = dir_state(tmp_path)
        with pytest.raises(expected_error(case)):
            journal.append(records, first, last)
        assert dir_state(tmp_path) == before
        assert journal.last_seq == 20
        journal.append(frames(21, 23), 21, 23)
    assert verify_journal(str(tmp_path)).ok
    with open_journal(tmp_path, readonly=True) as journal:
        assert journal.read_bytes(1, 23) == frames(1, 23)


def offsets_of(first: int, last: int) -> list[int]:
    """Where each of ``frames(first, last)`` starts, as the machine's encoder reports it."""
    starts, pos = [], 0
    for seq in range(first, last + 1):
        starts.append(pos)
        pos += len(frame(seq))
    return starts


def _bad_checksum_in_last() -> bytes:
    data = bytearray(frames(21, 23))
    data[-1] ^= 0xFF
    return bytes(data)


# With the encoder's offsets only the count and the two ends are checked.
BAD_APPENDS_WITH_OFFSETS = {
    "gap": lambda: (frames(22, 23), 22, 23, offsets_of(22, 23)),
    "fewer offsets than numbers": lambda: (frames(21, 22), 21, 23, offsets_of(21, 22)),
    "more offsets than numbers": lambda: (frames(21, 23), 21, 22, offsets_of(21, 23)),
    "first record holds another number": lambda: (frame(22) + frames(22, 23), 21, 23, offsets_of(21, 23)),
    "last record holds another number": lambda: (frames(21, 22) + frame(24), 21, 23, offsets_of(21, 23)),
    "bad checksum in the last record": lambda: (_bad_checksum_in_last(), 21, 23, offsets_of(21, 23)),
    "bytes after the last record": lambda: (frames(21, 23) + b"x", 21, 23, offsets_of(21, 23)),
    "first offset not zero": lambda: (frames(21, 23), 21, 23, [1] + offsets_of(21, 23)[1:]),
    "last offset off its record": lambda: (frames(21, 23), 21, 23, offsets_of(21, 23)[:-1] + [offsets_of(21, 23)[-1] - 1]),
}


@pytest.mark.parametrize("case", list(BAD_APPENDS_WITH_OFFSETS))
def test_append_with_offsets_refuses_misuse_and_bad_records_and_writes_nothing(tmp_path, case):
    records, first, last, offsets = BAD_APPENDS_WITH_OFFSETS[case]()
    with build(tmp_path, 20, per_append=20) as journal:
        before = dir_state(tmp_path)
        with pytest.raises(expected_error(case)):
            journal.append(records, first, last, offsets)
        assert dir_state(tmp_path) == before
        journal.append(frames(21, 23), 21, 23, offsets_of(21, 23))
    assert verify_journal(str(tmp_path)).ok


def test_append_with_offsets_indexes_like_a_checked_append(tmp_path):
    """The sparse index built from the encoder's offsets is the one a full check builds."""
    interval = limits.INDEX_INTERVAL_RECORDS
    last = 3 * interval + 7
    with open_journal(tmp_path / "checked") as checked, open_journal(tmp_path / "trusted") as trusted:
        for first in range(1, last + 1, 101):
            end = min(last, first + 100)
            checked.append(frames(first, end), first, end)
            trusted.append(frames(first, end), first, end, offsets_of(first, end))
        trusted_index = [(seg.first_seq, seg.offsets) for seg in trusted._segments]
        assert trusted_index == [(seg.first_seq, seg.offsets) for seg in checked._segments]
        assert sum(len(offsets) for _, offsets in trusted_index) >= 3
        for seq in (1, interval, interval + 1, last):
            assert trusted.read_bytes(seq, seq) == frame(seq)


def test_failed_append_on_an_empty_journal_creates_no_segment(tmp_path):
    with open_journal(tmp_path) as journal:
        with pytest.raises(JournalRecordError):
            journal.append(_bad_checksum_in_middle(), 21, 23)
        assert os.listdir(tmp_path) == []
        journal.append(frames(1, 2), 1, 2)
        assert journal.last_seq == 2


BAD_FILLS = {
    "bad checksum inside": lambda: (_bad_checksum_in_middle(), 21, 23),
    "torn last record": lambda: (frames(21, 23)[:-3], 21, 23),
    "fewer records than numbers": lambda: (frames(21, 22), 21, 23),
    "records hold other numbers": lambda: (frames(22, 24), 21, 23),
    "no records": lambda: (b"", 21, 21),
}


@pytest.mark.parametrize("case", list(BAD_FILLS))
def test_fill_refuses_bad_records_from_a_peer_and_writes_nothing(tmp_path, case):
    """Records fetched from a peer are input from outside: a typed error, the hole unchanged."""
    records, first, last = BAD_FILLS[case]()
    with build(tmp_path, 20, per_append=20) as journal:
        journal.skip_to(31)
        journal.append(frames(31, 33), 31, 33)
        with pytest.raises(JournalRecordError):
            journal.fill(records, first, last)
        assert (journal.holes, journal.fill_next_seq) == ([(21, 30)], 21)
        journal.fill(frames(21, 30), 21, 30)
        assert journal.holes == []
        assert journal.read_bytes(1, 33) == frames(1, 33)
    assert verify_journal(str(tmp_path)).ok


def test_bad_records_from_a_peer_are_refused_under_python_O(tmp_path):
    """The check is no ``assert``: ``python -O`` (which drops assertions) refuses them too."""
    program = f"""
import sys
from raftseq.sequencer import protocol
from raftseq.sequencer.journal import Journal, JournalRecordError
assert False, "assertions are on"
def frame(seq):
    return protocol.encode_delivered(seq, 1_000 + seq, "s", seq, b"p%d" % seq)
journal = Journal.open({str(tmp_path)!r})
journal.append(b"".join(frame(seq) for seq in range(1, 4)), 1, 3)
journal.skip_to(8)
bad = bytearray(b"".join(frame(seq) for seq in range(4, 8)))
bad[-1] ^= 0xFF
try:
    journal.fill(bytes(bad), 4, 7)
except JournalRecordError as exc:
    print("refused:", exc)
    sys.exit(0)
sys.exit("the damaged records were stored")
"""
    done = subprocess.run([sys.executable, "-O", "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "refused: checksum mismatch" in done.stdout


# --- 6. fsync policies and the sealed-segment index ---------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("never", FsyncPolicy("never")), ("batch", FsyncPolicy("batch")), ("interval_ms=25", FsyncPolicy("interval", 25))],
)
def test_fsync_policy_parse(text, expected):
    assert FsyncPolicy.parse(text) == expected


@pytest.mark.parametrize(
    "text", ["", "always", "Batch", "interval_ms=0", "interval_ms=-5", "interval_ms=abc", "interval_ms=", "interval_ms", "interval=5"]
)
def test_fsync_policy_parse_rejects_garbage(text):
    with pytest.raises(ValueError):
        FsyncPolicy.parse(text)


def test_fsync_batch_syncs_every_append(tmp_path):
    with open_journal(tmp_path, fsync=FsyncPolicy.parse("batch")) as journal:
        assert journal.fsync_count == 0
        seq = 1
        rolls = 0
        while rolls < 2:
            count, segments = journal.fsync_count, journal.segment_count
            journal.append(frames(seq, seq + 2), seq, seq + 2)
            rolled = journal.segment_count > segments and segments > 0
            # One fsync per append, plus one for the segment sealed by a roll.
            assert journal.fsync_count == count + 1 + rolled
            rolls += rolled
            seq += 3


def test_fsync_never_does_not_sync(tmp_path):
    with build(tmp_path, 400) as journal:
        assert journal.segment_count >= 3
        assert journal.fsync_count == 0


def test_fsync_interval_follows_the_injected_clock(tmp_path):
    now = [5_000_000_000]
    ms = 1_000_000
    policy = FsyncPolicy.parse("interval_ms=10")
    journal = open_journal(tmp_path, fsync=policy, clock_ns=lambda: now[0])
    seq = 1

    def append():
        nonlocal seq
        journal.append(frame(seq), seq, seq)
        seq += 1

    append()
    assert journal.fsync_count == 0
    now[0] += 10 * ms - 1
    append()
    journal.sync_if_due()
    assert journal.fsync_count == 0
    now[0] += 1
    append()
    assert journal.fsync_count == 1
    now[0] += 5 * ms
    append()
    journal.sync_if_due()
    assert journal.fsync_count == 1
    now[0] += 5 * ms  # 10 ms since the last fsync, no append
    journal.sync_if_due()
    assert journal.fsync_count == 2
    journal.sync_if_due()
    append()
    assert journal.fsync_count == 2
    journal.sync()  # forced, whatever the policy
    assert journal.fsync_count == 3
    journal.close()


def test_fsync_interval_needs_a_clock_and_a_positive_interval(tmp_path):
    with pytest.raises(ValueError):
        open_journal(tmp_path, fsync=FsyncPolicy.parse("interval_ms=10"))
    with pytest.raises(ValueError):
        open_journal(tmp_path, fsync=FsyncPolicy("interval", 0), clock_ns=lambda: 0)
    with pytest.raises(ValueError):
        open_journal(tmp_path, segment_bytes_max=limits.SEGMENT_BYTES_MIN - 1)


@pytest.mark.parametrize("interval", [limits.INDEX_INTERVAL_RECORDS, 8])
@pytest.mark.parametrize("policy", ["never", "batch"])
def test_sealed_segments_reopen_from_their_index(tmp_path, monkeypatch, interval, policy):
    monkeypatch.setattr(limits, "INDEX_INTERVAL_RECORDS", interval)
    journal = build(tmp_path, 700, fsync=FsyncPolicy.parse(policy))
    listed = journal_mod.list_segment_files(str(tmp_path))
    assert len(listed) >= 4
    written = {}
    for first, path in listed:
        segment = journal.segment_for(first)
        written[first] = (segment.count, segment.size, list(segment.offsets))
        assert os.path.exists(index_path(path)) == (path != listed[-1][1])
        assert len(segment.offsets) == (segment.count + interval - 1) // interval
    journal.close()
    walked = spy_on_segment_walks(monkeypatch)
    with open_journal(tmp_path, verify_bytes=0) as journal:
        assert walked == [listed[-1][1]]  # only the tail is read on open
        for first, _ in listed:
            segment = journal.segment_for(first)
            assert (segment.count, segment.size, segment.offsets) == written[first]
        for seq in (1, 2, interval, interval + 1, listed[1][0], listed[2][0] + interval, 700):
            with journal.cursor(seq) as cursor:
                assert cursor.read_frames(700, 2)[0] == frame(seq)


def test_an_index_lost_to_a_power_cut_is_walked_once_and_then_read(tmp_path, monkeypatch):
    """Under the ``never`` policy an index is written without fsync, so a power cut can take
    every one of them. The open that has to walk those segments writes their indexes again,
    fsynced; the next open reads them instead of walking the whole journal again (the power-cut
    soak, seed 20261207: 16 of 18 segments walked on every restart, a restart of 2.3 s CPU
    growing with the journal, 30 s at load 25, and the cluster did not acknowledge within its
    bound). A read-only open writes nothing."""
    build(tmp_path, 700, fsync=FsyncPolicy.parse("never")).close()
    listed = [path for _, path in journal_mod.list_segment_files(str(tmp_path))]
    assert len(listed) >= 4
    for path in listed[:-1]:
        os.unlink(index_path(path))  # what a power cut leaves of indexes never fsynced
    walked = spy_on_segment_walks(monkeypatch)
    with open_journal(tmp_path, readonly=True, verify_bytes=0):
        assert walked[:-1] == listed[:-1]
    assert not any(os.path.exists(index_path(path)) for path in listed[:-1])
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    walked.clear()
    with open_journal(tmp_path, verify_bytes=0):
        assert walked == listed
    assert all(index_path(path) + ".tmp" in synced for path in listed[:-1]), synced
    assert str(tmp_path) in synced  # the directory: the indexes' names are durable too
    walked.clear()
    with open_journal(tmp_path, verify_bytes=0) as journal:
        assert walked == [listed[-1]]  # only the tail
        assert journal.read_bytes(1, 700) == frames(1, 700)


def test_open_reads_back_the_newest_sealed_segments_within_its_bound(tmp_path, monkeypatch):
    build(tmp_path, 700).close()
    listed = [path for _, path in journal_mod.list_segment_files(str(tmp_path))]
    assert len(listed) >= 5
    two = os.path.getsize(listed[-2]) + os.path.getsize(listed[-3])
    walked = spy_on_segment_walks(monkeypatch)
    with open_journal(tmp_path, verify_bytes=two):
        assert walked == [listed[-3], listed[-2], listed[-1]]
    walked.clear()
    with open_journal(tmp_path, verify_bytes=1):  # at least the newest sealed segment
        assert walked == [listed[-2], listed[-1]]


def test_index_and_holes_files_are_complete_when_fsynced(tmp_path, monkeypatch):
    """A file replaced in place (an index, holes.json) is fsynced holding all its bytes, not
    before its buffered write reached the file."""
    synced: dict[str, int] = {}
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced[os.readlink(f"/proc/self/fd/{fd}")] = os.fstat(fd).st_size
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with build(tmp_path, 300, fsync=FsyncPolicy("batch")) as journal:
        journal.skip_to(400)
    written = sorted(name for name in os.listdir(tmp_path) if name.endswith(journal_mod.INDEX_SUFFIX) or name == journal_mod.HOLES_FILE)
    assert len(written) >= 3
    for name in written:
        path = str(tmp_path / name)
        assert synced.get(path + ".tmp") == os.path.getsize(path), name


# --- damaged sealed segments: scrub, mark on read, repair from a peer's copy ---------------


def _scrub_all(journal: Journal, step_bytes: int = 1000) -> Scrubber:
    """Run a scrub over `journal` until one full pass is done (bounded)."""
    scrubber = Scrubber(journal)
    for _ in range(10_000):
        scrubber.step(step_bytes)
        if scrubber.passes >= 1:
            return scrubber
    raise AssertionError("the scrub never finished a pass")


@pytest.mark.parametrize("damage", ["bit flip", "truncated"])
def test_scrub_finds_damage_the_index_hides_and_repair_restores_the_bytes(tmp_path, damage):
    build(tmp_path, 500).close()
    pristine = {path: open(path, "rb").read() for path in segment_files(tmp_path)}
    path, first_seq, spans = _sealed_middle(tmp_path)
    k = len(spans) // 2
    if damage == "bit flip":
        flip(path, spans[k][1] - 1)  # the index still matches: opening without read-back misses it
    with open_journal(tmp_path, verify_bytes=0) as journal:
        if damage == "truncated":
            os.truncate(path, spans[k][0] + 5)  # while the node runs
        assert not journal.damage
        scrubber = _scrub_all(journal)
        sealed_bytes = sum(len(b) for p, b in pristine.items() if p != segment_files(tmp_path)[-1])
        assert sealed_bytes - len(pristine[path]) <= scrubber.bytes_read <= sealed_bytes
        found = list(journal.damage)
        assert [(d.first_seq, d.path, d.offset) for d in found] == [(first_seq + k, path, spans[k][0])]
        assert journal.damage_found == 1
        # Readers stop before the damage; a read across it fails.
        assert [r.seq for r in journal.records(1, first_seq + k - 1)][-1] == first_seq + k - 1
        # Repair: the whole segment, as a peer sends it, in two pieces.
        target = journal.repair_range
        assert target == (first_seq, first_seq + len(spans) - 1)
        middle = first_seq + 10
        journal.repair(frames(first_seq, middle), first_seq, middle)
        assert journal.repair_next_seq == middle + 1 and journal.damage
        journal.repair(frames(middle + 1, target[1]), middle + 1, target[1])
        assert not journal.damage and journal.damage_repaired == 1 and journal.repair_range is None
        assert [r.seq for r in journal.records()] == list(range(1, 501))
    assert open(path, "rb").read() == pristine[path]
    assert verify_journal(str(tmp_path)).ok
    assert not [name for name in os.listdir(tmp_path) if name.endswith(journal_mod.FILL_SUFFIX)]
    with open_journal(tmp_path) as journal:
        assert not journal.damage


def test_repair_refuses_bad_records_and_keeps_the_damage(tmp_path):
    build(tmp_path, 500).close()
    path, first_seq, spans = _sealed_middle(tmp_path)
    flip(path, spans[3][1] - 1)
    with open_journal(tmp_path) as journal:
        assert journal.damage
        bad = bytearray(frames(first_seq, first_seq + 4))
        bad[-1] ^= 0xFF
        with pytest.raises(JournalRecordError):
            journal.repair(bytes(bad), first_seq, first_seq + 4)
        with pytest.raises(JournalRecordError):
            journal.repair(frames(first_seq + 1, first_seq + 4), first_seq, first_seq + 3)
        assert journal.damage and journal.repair_next_seq == first_seq


def test_a_read_that_meets_damage_marks_it_once(tmp_path):
    build(tmp_path, 500).close()
    path, first_seq, spans = _sealed_middle(tmp_path)
    flip(path, spans[5][1] - 1)
    with open_journal(tmp_path, verify_bytes=0) as journal:
        with journal.cursor(1) as cursor, pytest.raises(JournalCorruptError) as caught:
            read_all_frames(cursor, 500)
        exc = caught.value
        damage = journal.mark_damaged(exc.seq, exc.path, exc.offset, str(exc))
        assert damage is not None and (damage.first_seq, damage.last_seq) == (first_seq + 5, first_seq + len(spans) - 1)
        assert journal.mark_damaged(exc.seq, exc.path, exc.offset, str(exc)) is None
        assert journal.mark_damaged(501, "", 0, "past the end") is None
        assert journal.damage_found == 1


def test_a_sealed_segment_file_gone_while_open_is_damage_on_read_and_scrub(tmp_path):
    build(tmp_path, 500).close()
    path, first_seq, spans = _sealed_middle(tmp_path)
    with open_journal(tmp_path, verify_bytes=0) as journal:
        os.unlink(path)
        with journal.cursor(first_seq) as cursor, pytest.raises(JournalCorruptError) as caught:
            read_all_frames(cursor, 500)
        assert (caught.value.seq, caught.value.path) == (first_seq, path)
        _scrub_all(journal)
        assert [(d.first_seq, d.path) for d in journal.damage] == [(first_seq, path)]
        journal.repair(frames(first_seq, first_seq + len(spans) - 1), first_seq, first_seq + len(spans) - 1)
        assert not journal.damage
        assert [r.seq for r in journal.records()] == list(range(1, 501))


def test_repair_refuses_a_peer_copy_that_differs_from_the_intact_records(tmp_path):
    build(tmp_path, 500).close()
    path, first_seq, spans = _sealed_middle(tmp_path)
    flip(path, spans[20][1] - 1)
    with open_journal(tmp_path) as journal:
        forged = protocol.encode_delivered(first_seq + 1, 1_000 + first_seq + 1, "s", first_seq + 1, b"forged")
        records = frame(first_seq) + forged + frames(first_seq + 2, first_seq + 5)
        with pytest.raises(JournalRecordError, match="differ from this node's intact copy"):
            journal.repair(records, first_seq, first_seq + 5)
        assert journal.repair_next_seq == first_seq
        journal.repair(frames(first_seq, first_seq + 5), first_seq, first_seq + 5)
        assert journal.repair_next_seq == first_seq + 6


def test_damage_map_keeps_ranges_in_order_and_merges_within_a_segment():
    damage = DamageMap()
    assert not damage and damage.next_from(1) is None
    assert damage.add(Damage(50, 99, "b.seg", 10, "x"))
    assert damage.add(Damage(10, 19, "a.seg", 0, "y"))
    assert not damage.add(Damage(60, 99, "b.seg", 90, "later in a known range"))
    assert damage.add(Damage(40, 99, "b.seg", 5, "earlier in the same segment"))
    assert [(d.first_seq, d.last_seq) for d in damage] == [(10, 19), (40, 99)]
    assert damage.covering(45).reason == "earlier in the same segment" and damage.covering(30) is None
    assert damage.next_from(20).first_seq == 40 and damage.records == 70
    assert damage.clear_range(40, 99) == 1 and [d.first_seq for d in damage] == [10]


# --- 8. the tail segment damaged while the journal is open ------------------------------------


def _tail_journal(directory, last: int = 300) -> tuple[Journal, str, list[tuple[int, int]]]:
    """An open journal of 1..last in one (unsealed) tail segment, its path and record spans."""
    journal = build(directory, last, segment_bytes_max=limits.SEGMENT_BYTES_MAX_DEFAULT)
    [path] = segment_files(directory)
    return journal, path, record_spans(path)


def _repair_whole_tail(journal: Journal, last: int) -> None:
    """Repair the damaged (sealed) former tail 1..last as a peer sends it, in two pieces."""
    assert journal.repair_range == (1, last)
    journal.repair(frames(1, 100), 1, 100)
    journal.repair(frames(101, last), 101, last)
    assert not journal.damage and journal.damage_repaired == 1


def _flip_and_read_tail(journal: Journal, path: str, spans: list[tuple[int, int]]) -> Damage | None:
    """Flip a bit in record 201 of the tail, read across it, mark what the read met."""
    flip(path, spans[200][1] - 1)
    with journal.cursor(150) as cursor, pytest.raises(JournalCorruptError) as caught:
        read_all_frames(cursor, 300)
    exc = caught.value
    assert exc.seq == 201
    return journal.mark_damaged(exc.seq, exc.path, exc.offset, str(exc))


def test_a_read_that_meets_damage_in_the_tail_seals_it_and_appends_go_on_in_a_new_segment(tmp_path):
    journal, path, spans = _tail_journal(tmp_path)
    with journal:
        damage = _flip_and_read_tail(journal, path, spans)
        assert damage is not None and (damage.first_seq, damage.last_seq, damage.path) == (201, 300, path)
        assert journal.damage_found == 1 and journal.mark_damaged(250, path, 0, "known") is None
        size = os.path.getsize(path)
        journal.append(frames(301, 310), 301, 310)
        assert os.path.getsize(path) == size, "appended to the damaged tail"
        assert len(segment_files(tmp_path)) == 2
        assert [r.seq for r in journal.records(1, 200)] == list(range(1, 201))
        assert [r.seq for r in journal.records(301, 310)] == list(range(301, 311))
        _repair_whole_tail(journal, 300)
        assert [r.seq for r in journal.records()] == list(range(1, 311))
    assert verify_journal(str(tmp_path)).ok
    with open_journal(tmp_path) as journal:
        assert not journal.damage and journal.last_seq == 310


def _change_tail_file(path: str, spans: list[tuple[int, int]], change: str) -> None:
    """Cut (at record 201 or inside it), remove or lengthen the tail file under the journal."""
    if change == "cut at a record":
        os.truncate(path, spans[200][0])
    elif change == "cut inside a record":
        os.truncate(path, spans[200][0] + 5)
    elif change == "removed":
        os.unlink(path)
    else:
        with open(path, "ab") as f:
            f.write(frame(999))


@pytest.mark.parametrize("change", ["cut at a record", "cut inside a record", "removed", "lengthened"])
def test_appends_after_the_tail_file_changed_under_it_stay_at_their_offsets_and_reads_refuse_the_damage(tmp_path, change):
    """Appends write at the offsets the journal's index says: a cut or lengthened file never
    shifts a record (on main they went to the file's new end, and a reader got other records
    than those it asked for). A read that meets the damage seals the tail as damaged."""
    journal, path, spans = _tail_journal(tmp_path)
    with journal:
        _change_tail_file(path, spans, change)
        journal.append(frames(301, 310), 301, 310)
        if change == "lengthened":  # the bytes after the last record were overwritten: intact
            assert [r.seq for r in journal.records()] == list(range(1, 311)) and not journal.damage
            return
        first_bad = 1 if change == "removed" else 201
        with journal.cursor(150) as cursor, pytest.raises(JournalCorruptError) as caught:
            assert [seq_of_frame(f) for f in read_all_frames(cursor, 310)] == list(range(150, first_bad))
        exc = caught.value
        damage = journal.mark_damaged(exc.seq, exc.path, exc.offset, str(exc))
        assert damage is not None and (damage.first_seq, damage.last_seq) == (first_bad, 310)
        journal.append(frames(311, 312), 311, 312)
        assert len(segment_files(tmp_path)) == (1 if change == "removed" else 2)  # 311.. in a new segment
        _repair_whole_tail(journal, 310)
        assert [r.seq for r in journal.records()] == list(range(1, 313))
    assert verify_journal(str(tmp_path)).ok


@pytest.mark.parametrize("change", ["cut at a record", "cut inside a record", "removed", "lengthened"])
def test_a_tail_file_changed_before_the_first_append_since_open_is_sealed_as_damaged(tmp_path, change):
    build(tmp_path, 300, segment_bytes_max=limits.SEGMENT_BYTES_MAX_DEFAULT).close()
    [path] = segment_files(tmp_path)
    spans = record_spans(path)
    found: list[Damage] = []
    with open_journal(tmp_path, segment_bytes_max=limits.SEGMENT_BYTES_MAX_DEFAULT) as journal:
        journal.on_damage = found.append
        _change_tail_file(path, spans, change)
        size = os.path.getsize(path) if os.path.exists(path) else -1
        journal.append(frames(301, 310), 301, 310)
        expected = {
            "cut at a record": (201, 300, spans[200][0]),
            "cut inside a record": (201, 300, spans[200][0]),
            "removed": (1, 300, 0),
            "lengthened": (300, 300, spans[-1][1]),
        }[change]
        assert [(d.first_seq, d.last_seq, d.offset) for d in found] == [expected]
        assert list(journal.damage) == found and journal.damage_found == 1
        assert (os.path.getsize(path) if os.path.exists(path) else -1) == size, "wrote to the damaged tail"
        assert [r.seq for r in journal.records(301, 310)] == list(range(301, 311))
        _repair_whole_tail(journal, 300)
        assert [r.seq for r in journal.records()] == list(range(1, 311))
    assert verify_journal(str(tmp_path)).ok


def test_a_tail_file_removed_before_its_seal_is_sealed_as_damaged_without_an_index(tmp_path):
    found: list[Damage] = []
    with open_journal(tmp_path) as journal:
        journal.on_damage = found.append
        journal.append(frames(1, 10), 1, 10)
        [path] = segment_files(tmp_path)
        os.unlink(path)
        seq = 11
        while len(segment_files(tmp_path)) < 1:  # appends until the journal rolls to a new segment
            journal.append(frames(seq, seq + 9), seq, seq + 9)
            seq += 10
            assert seq < 10_000, "never rolled"
        assert [(d.first_seq, d.last_seq, d.reason) for d in found] == [(1, seq - 11, "segment file removed")]
        assert not os.path.exists(index_path(path))


def test_a_damaged_former_tail_is_found_again_when_reopened_before_its_repair(tmp_path):
    journal, path, spans = _tail_journal(tmp_path)
    with journal:
        _flip_and_read_tail(journal, path, spans)
        journal.append(frames(301, 310), 301, 310)
    with open_journal(tmp_path, verify_bytes=0) as journal:
        assert [(d.first_seq, d.last_seq) for d in journal.damage] == [(201, 300)]
        assert journal.last_seq == 310


# --- 9. the first segment file missing --------------------------------------------------------


def test_a_missing_first_segment_becomes_a_hole_from_the_start_and_is_filled(tmp_path):
    build(tmp_path, 500).close()
    files = journal_mod.list_segment_files(str(tmp_path))
    (_, first_path), (second_first, _) = files[0], files[1]
    os.unlink(first_path)
    os.unlink(index_path(first_path))
    with open_journal(tmp_path, readonly=True, start_seq=1) as journal:
        assert journal.holes == [(1, second_first - 1)]  # said, not written
    assert not os.path.exists(tmp_path / journal_mod.HOLES_FILE)
    report = verify_journal(str(tmp_path))
    assert (report.first_bad_seq, report.path, report.offset) == (1, files[1][1], 0), report
    assert f"records 1..{second_first - 1} are missing" in report.problem
    with open_journal(tmp_path) as journal:  # no start given: starts where its files do
        assert journal.first_seq == second_first and not journal.holes
    with open_journal(tmp_path, start_seq=1) as journal:
        recovery = journal.recovery
        assert (recovery.missing_first, recovery.missing_last) == (1, second_first - 1)
        assert journal.holes == [(1, second_first - 1)] and journal.first_seq == 1 and journal.contiguous_last_seq == 0
        assert journal.missing_count == second_first - 1
        journal.fill(frames(1, 10), 1, 10)
        journal.fill(frames(11, second_first - 1), 11, second_first - 1)
        assert not journal.holes and [r.seq for r in journal.records()] == list(range(1, 501))
    assert verify_journal(str(tmp_path)).ok
    with open_journal(tmp_path, start_seq=1) as journal:
        assert not journal.holes and journal.recovery.missing_first == 0


def test_a_missing_first_segment_before_a_recorded_hole_makes_one_hole(tmp_path):
    with build(tmp_path, 200) as journal:
        journal.skip_to(401)
        journal.append(frames(401, 450), 401, 450)
    files = journal_mod.list_segment_files(str(tmp_path))
    for _, path in files[:-1]:  # every segment before the recorded hole 201..400
        os.unlink(path)
        if os.path.exists(index_path(path)):
            os.unlink(index_path(path))
    with open_journal(tmp_path, start_seq=1) as journal:
        assert journal.holes == [(1, 400)] and journal.first_seq == 1 and journal.last_seq == 450
    with open_journal(tmp_path, start_seq=1) as journal:
        assert journal.holes == [(1, 400)] and journal.recovery.missing_first == 0  # written down once


# --- 10. journal verify on files it cannot read ----------------------------------------------


def _not_a_file(tmp_path, which: str) -> str:
    """Put something that is not a regular file where a journal file belongs; its path."""
    files = journal_mod.list_segment_files(str(tmp_path))
    if which == "holes.json directory":
        path = str(tmp_path / journal_mod.HOLES_FILE)
        os.mkdir(path)
        return path
    kind, position = which.split(" ", 1)
    path = {"first": files[0][1], "middle": files[len(files) // 2][1], "tail": files[-1][1]}[position]
    os.unlink(path)
    if kind == "directory":
        os.mkdir(path)
    else:
        os.symlink(str(tmp_path / "gone"), path)
    return path


@pytest.mark.parametrize("which", ["directory first", "directory middle", "directory tail", "broken-link middle", "holes.json directory"])
def test_verify_names_a_journal_file_it_cannot_read_and_never_raises(tmp_path, which):
    """``raftseq journal verify`` reports the path (a node stops on it with exit code 6 and
    one line); it used to end in an ``OSError`` traceback."""
    build(tmp_path, 500).close()
    path = _not_a_file(tmp_path, which)
    report = verify_journal(str(tmp_path))
    assert not report.ok and report.path == path, report
    assert "cannot read" in report.problem, report
    if which.endswith("middle"):  # and goes on with the next segment
        assert report.last_seq == 500 and len(report.damages) == 1, report


def test_verify_names_a_segment_it_cannot_read_and_goes_on(tmp_path, monkeypatch):
    from raftseq.sequencer.journal import verify as verify_mod

    build(tmp_path, 500).close()
    files = journal_mod.list_segment_files(str(tmp_path))
    unreadable = files[1][1]

    def fake_open(path, *args, **kwargs):
        if path == unreadable:
            raise PermissionError(13, "Permission denied", path)
        return open(path, *args, **kwargs)

    monkeypatch.setattr(verify_mod, "open", fake_open, raising=False)
    report = verify_journal(str(tmp_path))
    assert [(d.path, d.seq) for d in report.damages] == [(unreadable, files[1][0])]
    assert "cannot read: Permission denied" in report.problem
    assert report.last_seq == 500


# --- 11. a power cut: holes.json durable, the tail's records before it not -------------------


def test_a_tail_cut_short_of_a_recorded_hole_widens_the_hole(tmp_path):
    """Found by a power-cut soak (durability power, seed 20261206): a node's journal tail is not
    fsynced per batch (the durable Raft log rebuilds it), but ``holes.json`` is. After a cut the
    tail ended at 1605586 while the recorded hole began at 1606183; the node refused to open its
    journal ("hole ... does not follow segment") and never came back. The records between are
    lost like the hole's: they join it, and catch-up fetches them from a peer."""
    with build(tmp_path, 20) as journal:
        journal.skip_to(31)
    tail = segment_files(tmp_path)[-1]
    spans = record_spans(tail)
    with open(tail, "r+b") as f:  # the unsynced records 16..20 never reached the disk
        f.truncate(spans[14][1])
    with open_journal(tmp_path) as journal:
        assert journal.holes == [(16, 30)] and journal.contiguous_last_seq == 15
        journal.fill(frames(16, 30), 16, 30)
        journal.append(frames(31, 33), 31, 33)
        assert journal.holes == [] and journal.read_bytes(1, 33) == frames(1, 33)
    assert verify_journal(str(tmp_path)).ok


def test_two_jumps_in_a_row_make_one_hole_that_reopens(tmp_path):
    """Found by the same soak: a node restored a snapshot (a hole), then another before the hole
    was filled. The second hole followed the first, and on the next start the journal refused
    to open ("hole 1424212..1446936 does not follow segment ending at 1359192")."""
    with build(tmp_path, 20) as journal:
        journal.skip_to(31)
        journal.skip_to(41)
        assert journal.holes == [(21, 40)]
    with open_journal(tmp_path) as journal:
        assert journal.holes == [(21, 40)]
        journal.fill(frames(21, 40), 21, 40)
        journal.append(frames(41, 43), 41, 43)
        assert journal.holes == [] and journal.read_bytes(1, 43) == frames(1, 43)
    assert verify_journal(str(tmp_path)).ok


def test_adjacent_holes_written_by_an_older_node_still_open(tmp_path):
    with build(tmp_path, 20) as journal:
        journal.skip_to(31)
        journal.append(frames(31, 33), 31, 33)
    holes_mod.write_holes(str(tmp_path), [(21, 25), (26, 30)])
    with open_journal(tmp_path) as journal:
        assert journal.holes == [(21, 30)]
        journal.fill(frames(21, 30), 21, 30)
        assert journal.read_bytes(1, 33) == frames(1, 33)


@pytest.mark.parametrize("where", ["first hole", "middle hole", "hole from the start"])
def test_a_hole_filled_just_before_a_crash_is_not_a_hole_any_more(tmp_path, where):
    """A fill ends in two steps: the side file becomes a segment (renamed, directory fsynced),
    then ``holes.json`` is written without the hole. A kill or a power cut between the two left
    a segment exactly where ``holes.json`` still recorded a hole, and the journal refused to
    open ("hole 1..1183 overlaps a segment", seen once in the power-cut scenarios): the node
    never came back. The segment is the finished fill: the hole is gone."""
    with build(tmp_path, 20) as journal:
        journal.skip_to(31)
        journal.append(frames(31, 40), 31, 40)
        journal.skip_to(51)
        journal.append(frames(51, 55), 51, 55)
        assert journal.holes == [(21, 30), (41, 50)]
    if where == "hole from the start":
        files = journal_mod.list_segment_files(str(tmp_path))
        os.unlink(files[0][1])
        if os.path.exists(index_path(files[0][1])):
            os.unlink(index_path(files[0][1]))
        holes_mod.write_holes(str(tmp_path), [(1, 30), (41, 50)])
    filled = {"first hole": (21, 30), "middle hole": (41, 50), "hole from the start": (1, 30)}[where]
    recorded = holes_mod.read_holes(str(tmp_path))
    with open_journal(tmp_path, start_seq=1) as journal:
        while journal.holes and journal.holes[0] != filled:
            first, last = journal.holes[0]
            journal.fill(frames(first, last), first, last)
        journal.fill(frames(*filled), *filled)
    # The crash: holes.json as it was before the fill's last step.
    holes_mod.write_holes(str(tmp_path), [h for h in recorded if h[0] >= filled[0]])
    with open_journal(tmp_path, start_seq=1) as journal:
        assert filled not in journal.holes
        for first, last in list(journal.holes):
            journal.fill(frames(first, last), first, last)
        assert journal.holes == [] and journal.read_bytes(1, 55) == frames(1, 55)
    assert holes_mod.read_holes(str(tmp_path)) == []
    assert verify_journal(str(tmp_path)).ok


# --- a full disk ----------------------------------------------------------------------------


def test_a_failed_append_is_reported_counts_for_nothing_and_the_next_append_overwrites_it(tmp_path, monkeypatch):
    """ENOSPC part-way through an append: the journal tells its node (which ends the process:
    the records were applied to the machine already) and raises; it counts none of the bytes
    written, so an append after space returns writes over them and the journal reads whole."""
    from raftseq.sequencer.journal import store as journal_store

    journal = build(tmp_path, 10)
    failures = []
    journal.on_write_failed = lambda exc, what: failures.append((exc.errno, what))
    real_pwrite_all = journal_store.pwrite_all

    def half_then_full(fd, data, offset):
        real_pwrite_all(fd, data[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(journal_store, "pwrite_all", half_then_full)
    with pytest.raises(OSError):
        journal.append(frames(11, 17), 11, 17)
    assert failures == [(errno.ENOSPC, "appending seq 11..17")]
    assert journal.last_seq == 10

    monkeypatch.setattr(journal_store, "pwrite_all", real_pwrite_all)
    journal.append(frames(11, 17), 11, 17)
    journal.close()
    with open_journal(tmp_path, readonly=True) as again:
        assert not again.recovery.bytes_cut
        assert [r.seq for r in again.records()] == list(range(1, 18))


def test_a_live_tail_read_asks_the_file_for_no_more_than_the_segment_holds(tmp_path, monkeypatch):
    """A subscriber at the tail reads a few records per block: the cursor must not ask the file
    for ``SUBSCRIBER_BLOCK_BYTES`` and shrink the result (the 256 KiB allocation shrunk to a few
    KiB, block after block, fragmented the node's heap: RSS grew on subscriber-serving nodes)."""
    asked: list[int] = []

    class RecordingFile:
        def __init__(self, f):
            self._f = f

        def read(self, size=-1):
            asked.append(size)
            return self._f.read(size)

        def __getattr__(self, name):
            return getattr(self._f, name)

    real_open = open
    monkeypatch.setattr(journal_mod.cursor, "open", lambda *a, **k: RecordingFile(real_open(*a, **k)), raising=False)
    journal = build(tmp_path, 5)
    with journal.cursor(1) as cursor:
        for last in range(10, 40, 5):
            count, block = cursor.read_block(journal.last_seq, limits.SUBSCRIBER_BLOCK_BYTES)
            assert count and cursor.next_seq == journal.last_seq + 1
            journal.append(frames(journal.last_seq + 1, last), journal.last_seq + 1, last)
    segment_bytes = journal.segment_for(1).size
    journal.close()
    assert asked and max(asked) <= segment_bytes, f"asked {asked}, the segment holds {segment_bytes} bytes"
