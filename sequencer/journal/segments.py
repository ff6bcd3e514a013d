"""Segment files: naming, listing, walking their records, and the low-level writes.

A journal is a directory of segment files ``<first_seq:020d>.seg``; a segment is a run of
records, each a ``Delivered`` wire frame (length, CRC-32, msgpack body).
"""

from __future__ import annotations

import os
import zlib
from typing import Self

import msgspec

from raftseq.sequencer import limits, protocol
from raftseq.sequencer.journal.errors import JournalCorruptError

HEADER = protocol.HEADER
HEADER_BYTES = protocol.HEADER_BYTES
SEGMENT_SUFFIX = ".seg"
INDEX_SUFFIX = ".idx"
FILL_SUFFIX = ".seg.fill"
#: Journal files hold payloads: owner read and write only.
FILE_MODE = 0o600


class ClosedOnExit:
    """Closed at the end of a ``with`` block: ``with Journal.open(...) as journal:``."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Segment:
    """One segment file and its sparse index. ``count`` grows as records are appended."""

    __slots__ = ("path", "first_seq", "count", "size", "offsets", "sealed")

    def __init__(self, path: str, first_seq: int) -> None:
        self.path = path
        self.first_seq = first_seq
        self.count = 0
        self.size = 0
        self.offsets: list[int] = []  # offsets[i]: record first_seq + i * INDEX_INTERVAL_RECORDS
        self.sealed = False

    @property
    def end_seq(self) -> int:
        """One past the last number in this segment."""
        return self.first_seq + self.count

    def add_run(self, offsets_in_run: list[int], run_bytes: int) -> None:
        """Account for a run of records just written at the end: ``offsets_in_run`` says where
        each starts within the run. Indexes every ``INDEX_INTERVAL_RECORDS``-th record."""
        base = self.size
        interval = limits.INDEX_INTERVAL_RECORDS
        index = self.count
        offsets = self.offsets
        for rel in offsets_in_run:
            if index % interval == 0:
                offsets.append(base + rel)
            index += 1
        self.count = index
        self.size = base + run_bytes


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def list_segment_files(directory: str) -> list[tuple[int, str]]:
    """``(first_seq, path)`` of each segment file, in order."""
    found = []
    for name in os.listdir(directory):
        if not name.endswith(SEGMENT_SUFFIX):
            continue
        stem = name[: -len(SEGMENT_SUFFIX)]
        if len(stem) != 20 or not stem.isdigit() or int(stem) < 1:
            raise JournalCorruptError(f"unexpected file {name!r} in journal directory {directory}")
        found.append((int(stem), os.path.join(directory, name)))
    found.sort()
    return found


class ScanResult(msgspec.Struct):
    count: int
    good_bytes: int
    file_bytes: int
    offsets: list[int]
    problem: str = ""
    problem_offset: int = -1


def scan_segment(path: str, first_seq: int, *, check: bool, start: int = 0) -> ScanResult:
    """Walk a segment's records. With ``check``: verify checksum, body and number of each.

    ``start``: the file offset to begin at, where record `first_seq` starts (an index point);
    ``count`` and ``offsets`` then count from there, ``good_bytes`` stays a file offset.
    Stops at the first record that fails; ``problem`` says why and ``good_bytes`` where.
    """
    interval = limits.INDEX_INTERVAL_RECORDS
    offsets: list[int] = []
    count = 0
    file_bytes = os.path.getsize(path)
    pos = start  # file offset of buf[0]
    problem = ""
    unpack_from = HEADER.unpack_from
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        buf = b""
        start = 0
        while True:
            if len(buf) - start < HEADER_BYTES or len(buf) - start < HEADER_BYTES + unpack_from(buf, start)[0]:
                chunk = f.read(limits.READ_CHUNK_BYTES)
                if not chunk:
                    if start < len(buf):
                        problem = f"torn record: {len(buf) - start} bytes at the end of the file"
                    break
                buf = buf[start:] + chunk
                pos += start
                start = 0
                continue
            length, crc = unpack_from(buf, start)
            if length == 0 or length > limits.FRAME_BYTES_MAX:
                problem = f"record length {length} out of range"
                break
            if check:
                body = memoryview(buf)[start + HEADER_BYTES : start + HEADER_BYTES + length]
                if zlib.crc32(body) != crc:
                    problem = f"checksum mismatch at seq {first_seq + count}"
                    break
                try:
                    record = protocol.decode_delivered_body(body)
                except msgspec.MsgspecError as exc:
                    problem = f"undecodable record at seq {first_seq + count}: {exc}"
                    break
                if record.seq != first_seq + count:
                    problem = f"record holds seq {record.seq} where {first_seq + count} belongs"
                    break
            if count % interval == 0:
                offsets.append(pos + start)
            count += 1
            start += HEADER_BYTES + length
    good = pos + start
    return ScanResult(count, good, file_bytes, offsets, problem, good if problem else -1)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of `data` at `offset` of `fd` (opened without ``O_APPEND``)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str, data: bytes, *, fsync: bool) -> None:
    """Write `data` to `path` whole or not at all: to a side file, fsynced (with `fsync`) once
    it holds every byte, then renamed over `path`."""
    tmp = path + ".tmp"
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
