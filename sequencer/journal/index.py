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
from raftseq.sequencer.journal.damage import Damage
from raftseq.sequencer.journal.segments import INDEX_SUFFIX, SEGMENT_SUFFIX, Segment, fsync_dir, replace_file, scan_segment

INDEX_MAGIC = b"RSQIDX01"
INDEX_HEADER = struct.Struct(">8sQQQI")  # magic, first_seq, record count, segment bytes, interval


def index_path(segment: Segment) -> str:
    return segment.path[: -len(SEGMENT_SUFFIX)] + INDEX_SUFFIX


def write_index(segment: Segment, *, fsync: bool) -> None:
    n = len(segment.offsets)
    body = INDEX_HEADER.pack(INDEX_MAGIC, segment.first_seq, segment.count, segment.size, limits.INDEX_INTERVAL_RECORDS)
    body += struct.pack(f">{n}Q", *segment.offsets)
    body += struct.pack(">I", zlib.crc32(body))
    replace_file(index_path(segment), body, fsync=fsync)


def load_sealed(segment: Segment, end_seq: int, *, verify: bool, rebuild: bool = False) -> Damage | None:
    """Index of a sealed segment whose numbers end before `end_seq` (where the next segment or
    hole starts): from its index file when it matches, else by a walk. With `verify` every
    record is read back even when the index matches. With `rebuild`, an index the walk had to
    find (the file missing or stale: an index is written without fsync under the journal's
    ``never`` policy, and a power cut takes it) is written again, fsynced, so that the next
    open reads it instead of walking the segment again.

    A segment that fails (a record fails its checks, the file is short, records are missing
    before `end_seq`) is not an error here: it keeps the numbers up to `end_seq` and the
    damaged range is returned, to be refused to readers and repaired from a peer.
    """
    segment.sealed = True
    indexed = False
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
            and first_seq + count == end_seq
            and interval == limits.INDEX_INTERVAL_RECORDS
            and len(body) == 8 * n + 4
            and zlib.crc32(data[:-4]) == struct.unpack(">I", body[-4:])[0]
        ):
            segment.count, segment.size = count, size
            segment.offsets = list(struct.unpack(f">{n}Q", body[:-4]))
            indexed = True
            if not verify:
                return None
    except (OSError, struct.error):
        pass
    scan = scan_segment(segment.path, segment.first_seq, check=True)
    if scan.problem or scan.good_bytes != size or segment.first_seq + scan.count != end_seq:
        problem = scan.problem or (
            "trailing bytes" if scan.good_bytes != size else f"records end at seq {segment.first_seq + scan.count - 1}"
        )
        if not segment.offsets:
            segment.offsets = scan.offsets
        segment.count, segment.size = end_seq - segment.first_seq, size
        first_bad = min(segment.first_seq + scan.count, end_seq - 1)
        return Damage(first_bad, end_seq - 1, segment.path, scan.good_bytes, problem)
    segment.count, segment.size, segment.offsets = scan.count, size, scan.offsets
    if rebuild and not indexed:
        write_index(segment, fsync=True)
        fsync_dir(os.path.dirname(segment.path))
    return None
