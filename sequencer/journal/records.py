"""Checks of runs of records handed to the journal: whole ``Delivered`` frames back to back,
numbered ``first_seq..last_seq``, from the machine's encoder (``append``) or from a peer
(``fill``).

A run that fails raises ``JournalRecordError`` before anything is written. The checks raise
explicitly (never ``assert``): records from a peer are input from outside, and must be refused
under ``python -O`` as well.
"""

from __future__ import annotations

import zlib

from raftseq.sequencer import protocol
from raftseq.sequencer.journal.errors import JournalRecordError

HEADER = protocol.HEADER
HEADER_BYTES = protocol.HEADER_BYTES


def check_records(records: bytes, first_seq: int, last_seq: int) -> list[int]:
    """Offsets of the records in `records`, after checking every checksum, every number and
    the count."""
    view = memoryview(records)
    offsets = []
    pos = 0
    end = len(records)
    seq = first_seq
    while pos < end:
        offsets.append(pos)
        pos = _check_record(records, view, pos, seq)
        seq += 1
    if seq - 1 != last_seq:
        raise JournalRecordError(f"{len(offsets)} records for {first_seq}..{last_seq}")
    return offsets


def check_ends(records: bytes, first_seq: int, last_seq: int, offsets: list[int]) -> None:
    """The cheap check of an encoder's run, whose ``offsets`` say where each record starts:
    the count, and the first and last record."""
    assert len(offsets) == last_seq - first_seq + 1, f"{len(offsets)} offsets for {first_seq}..{last_seq}"
    assert offsets[0] == 0, f"first record at offset {offsets[0]}"
    view = memoryview(records)
    _check_record(records, view, 0, first_seq)
    end = _check_record(records, view, offsets[-1], last_seq)
    if end != len(records):
        raise JournalRecordError(f"{len(records) - end} bytes after the last record of a batch")


def _check_record(records: bytes, view: memoryview, pos: int, seq: int) -> int:
    """Where the record at `pos`, which must be number `seq`, ends."""
    if len(records) - pos < HEADER_BYTES:
        raise JournalRecordError(f"torn record at offset {pos} of a batch")
    length, crc = HEADER.unpack_from(records, pos)
    end = pos + HEADER_BYTES + length
    if length == 0 or end > len(records):
        raise JournalRecordError(f"record length {length} at offset {pos} of a batch")
    if zlib.crc32(view[pos + HEADER_BYTES : end]) != crc:
        raise JournalRecordError(f"checksum mismatch writing seq {seq}")
    found = protocol.delivered_seq(records, pos + HEADER_BYTES)
    if found != seq:
        raise JournalRecordError(f"record holds seq {found}, expected {seq}")
    return end


def record_offsets(records: bytes) -> list[int]:
    """Start offset of each record of an intact run, plus its end."""
    offsets = [0]
    pos = 0
    end = len(records)
    while pos < end:
        pos += HEADER_BYTES + HEADER.unpack_from(records, pos)[0]
        offsets.append(pos)
    return offsets
