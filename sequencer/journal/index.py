"""The sparse index of a sealed segment: the byte offset of every ``INDEX_INTERVAL_RECORDS``-th
record, so reading from any number is one seek and a scan of at most that many headers.

A sealed segment ``<first_seq>.seg`` has its index in ``<first_seq>.idx``: a header (magic,
first number, record count, segment bytes, interval), the offsets (u64 each, big-endian) and a
CRC-32 of all that. An index that does not match its segment is ignored and the segment walked.
"""

from __future__ import annotations

import os
import struct
import zlib

from raftseq.sequencer import limits
from raftseq.sequencer.journal.errors import JournalCorruptError
from raftseq.sequencer.journal.segments import INDEX_SUFFIX, SEGMENT_SUFFIX, Segment, replace_file, scan_segment

INDEX_MAGIC = b"RSQIDX01"
INDEX_HEADER = struct.Struct(">8sQQQI")  # magic, first_seq, record count, segment bytes, interval


def write_index(segment: Segment, *, fsync: bool) -> None:
    n = len(segment.offsets)
    body = INDEX_HEADER.pack(INDEX_MAGIC, segment.first_seq, segment.count, segment.size, limits.INDEX_INTERVAL_RECORDS)
    body += struct.pack(f">{n}Q", *segment.offsets)
    body += struct.pack(">I", zlib.crc32(body))
    replace_file(segment.path[: -len(SEGMENT_SUFFIX)] + INDEX_SUFFIX, body, fsync=fsync)


def load_sealed(segment: Segment) -> None:
    """Index of a sealed segment: from its index file when it matches, else by a walk."""
    segment.sealed = True
    size = os.path.getsize(segment.path)
    index_path = segment.path[: -len(SEGMENT_SUFFIX)] + INDEX_SUFFIX
    try:
        with open(index_path, "rb") as f:
            data = f.read()
        magic, first_seq, count, seg_bytes, interval = INDEX_HEADER.unpack_from(data, 0)
        if magic != INDEX_MAGIC or interval != limits.INDEX_INTERVAL_RECORDS:
            raise struct.error("not a current index file")
        n = (count + interval - 1) // interval
        body = data[INDEX_HEADER.size :]
        if (
            magic == INDEX_MAGIC
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
