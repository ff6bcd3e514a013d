"""The conformance file (``FORMAT``): ``MAGIC``, then frames ``<u32 length><u32 crc32><msgpack
body>`` (big-endian; a body is at most ``FRAME_BODY_BYTES_MAX``). Each body is a msgpack map with
a ``kind``: first a ``Header``; then the starting snapshot in ``SnapshotPart``s (only when the
slice starts after 1); then one ``Entry`` per recorded message, in sequence order; last a
``Footer`` (count, last number, final digest). A file without its footer is truncated; a frame
whose checksum fails is garbled: ``scan_file`` checks the whole file before anything is replayed.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from raftseq.sequencer import limits, protocol

#: First bytes of a conformance file.
MAGIC = b"raftseq sm conformance\n"
#: Version of the file's layout and records (``Header.format``).
FORMAT = 1
#: Largest frame body; every record is far smaller except snapshot parts (``SNAPSHOT_PART_BYTES``).
FRAME_BODY_BYTES_MAX = limits.RECORDING_FRAME_BODY_BYTES_MAX
#: Bytes of the starting snapshot per ``SnapshotPart``.
SNAPSHOT_PART_BYTES = limits.RECORDING_SNAPSHOT_PART_BYTES
#: Largest starting snapshot (the cluster's own bound on a published snapshot).
SNAPSHOT_BYTES_MAX = protocol.SNAPSHOT_CHUNKS_MAX * protocol.SNAPSHOT_CHUNK_DATA_BYTES_MAX

_FRAME = struct.Struct(">II")
_DIGEST_CHARS = 64


# --- the records --------------------------------------------------------------------------------


class Header(msgspec.Struct, frozen=True, tag="header", tag_field="kind", kw_only=True):
    """What was recorded, from what, and by which reference."""

    format: int
    #: ``TYPE`` of the state machine; the reference as ``MODULE:CLASS``.
    sm_type: str
    machine: str
    #: The reference's message namespace, and per message type the versions it reads (the
    #: last one current).
    namespace: str
    message_versions: dict[str, list[int]]
    snapshot_version: int
    behaviour_versions: list[int]
    #: The slice: sequence numbers ``from_seq..to_seq``.
    from_seq: int
    to_seq: int
    #: True: every message of the slice is in the file; False: only those that can change the
    #: machine (the others are replayed as empty payloads).
    all_messages: bool
    #: Full digest of the reference's state after ``from_seq - 1`` (a fresh machine's when 1).
    start_digest: str
    #: The state after ``from_seq - 1`` as ``clients.sm.capture`` bytes, in ``SnapshotPart``s
    #: (0 bytes when the slice starts at 1), their SHA-256, and the snapshot schema version.
    start_snapshot_bytes: int = 0
    start_snapshot_sha256: str = ""
    start_snapshot_version: int = 0
    #: How the reference reached the start (for people: "fresh machine", "replayed 1..N-1",
    #: "cluster snapshot covering S (published by ...), then replayed S+1..N-1").
    start_from: str = ""
    #: Wall-clock time of the recording (information only).
    recorded_at_ns: int = 0


class SnapshotPart(msgspec.Struct, frozen=True, tag="snapshot", tag_field="kind"):
    index: int
    data: bytes


class Entry(msgspec.Struct, frozen=True, tag="message", tag_field="kind"):
    """One sequenced message as delivered, and the reference's full digest after it."""

    seq: int
    log_time_ns: int
    session: str
    client_seq: int
    payload: bytes
    #: Envelope type and version ("" and 0: not a state-machine message); redundant with the
    #: payload, for people reading the file.
    type: str
    version: int
    digest: str


class Footer(msgspec.Struct, frozen=True, tag="end", tag_field="kind"):
    #: Entries in the file; the last sequence number of the slice; the digest after it.
    messages: int
    last_seq: int
    final_digest: str


Record = Header | SnapshotPart | Entry | Footer

_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(Record)


class ConformanceFileError(Exception):
    """A file that is not a complete, intact conformance recording (exit 2)."""


class FileWriter:
    """Writes a recording to an open binary file: the magic, then one frame per record."""

    def __init__(self, f) -> None:
        self.f = f
        f.write(MAGIC)

    def write(self, record: Header | SnapshotPart | Entry | Footer) -> None:
        body = _encoder.encode(record)
        if len(body) > FRAME_BODY_BYTES_MAX:
            raise ValueError(f"a {type(record).__name__} of {len(body)} bytes is more than a frame holds ({FRAME_BODY_BYTES_MAX})")
        self.f.write(_FRAME.pack(len(body), zlib.crc32(body)) + body)


# --- reading ------------------------------------------------------------------------------------


@dataclass
class FileSummary:
    """A conformance file checked end to end."""

    path: str
    header: Header
    entries: int
    footer: Footer
    first_entry_seq: int = 0


def frames(f, path: str) -> Iterator[tuple[int, int, Any]]:
    """``(byte offset, frame index, record)`` of every frame after the magic."""
    offset = len(MAGIC)
    index = 0
    while True:
        head = f.read(_FRAME.size)
        if not head:
            return
        if len(head) < _FRAME.size:
            raise ConformanceFileError(f"{path}: truncated: frame {index} at byte {offset} is cut short")
        length, crc = _FRAME.unpack(head)
        if length > FRAME_BODY_BYTES_MAX:
            raise ConformanceFileError(
                f"{path}: garbled: frame {index} at byte {offset} claims {length} bytes (at most {FRAME_BODY_BYTES_MAX})"
            )
        body = f.read(length)
        if len(body) < length:
            raise ConformanceFileError(f"{path}: truncated: frame {index} at byte {offset} has {len(body)} of its {length} bytes")
        if zlib.crc32(body) != crc:
            raise ConformanceFileError(f"{path}: garbled: frame {index} at byte {offset} fails its checksum")
        try:
            item = _record_decoder.decode(body)
        except protocol.DECODE_ERRORS as exc:
            raise ConformanceFileError(
                f"{path}: frame {index} at byte {offset} does not decode ({exc}): a newer format, or garbled"
            ) from None
        yield offset, index, item
        offset += _FRAME.size + length
        index += 1


def open_recording(path: str):
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ConformanceFileError(f"{path}: cannot open: {exc.strerror or exc}") from None
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
        f.close()
        what = (
            "empty"
            if not magic
            else "truncated before its first frame"
            if MAGIC.startswith(magic)
            else "not a conformance recording (no magic)"
        )
        raise ConformanceFileError(f"{path}: {what}")
    return f


def is_digest(text: str) -> bool:
    return len(text) == _DIGEST_CHARS and all(c in "0123456789abcdef" for c in text)


def scan_file(path: str) -> FileSummary:
    """Read `path` end to end and check it is one complete, intact recording: magic, header
    first (format ``FORMAT``), the starting snapshot whole, entries in increasing order inside
    the slice, a footer that agrees, nothing after it. Raises ``ConformanceFileError``."""
    with open_recording(path) as f:
        header: Header | None = None
        footer: Footer | None = None
        parts = 0
        snapshot_bytes = 0
        snapshot_sha = hashlib.sha256()
        entries = 0
        first_entry = 0
        last_seq = 0
        last_digest = ""
        for offset, index, item in frames(f, path):
            where = f"{path}: frame {index} at byte {offset}"
            if footer is not None:
                raise ConformanceFileError(f"{where}: data after the footer")
            if index == 0:
                if not isinstance(item, Header):
                    raise ConformanceFileError(f"{where}: the first frame is a {type(item).__name__}, not the header")
                if item.format != FORMAT:
                    raise ConformanceFileError(f"{path}: format {item.format}; this SDK reads format {FORMAT}")
                if not 1 <= item.from_seq <= item.to_seq or not is_digest(item.start_digest):
                    raise ConformanceFileError(
                        f"{where}: header holds slice {item.from_seq}..{item.to_seq}, start digest {item.start_digest!r}"
                    )
                if (item.from_seq > 1) != (item.start_snapshot_bytes > 0) or item.start_snapshot_bytes > SNAPSHOT_BYTES_MAX:
                    raise ConformanceFileError(
                        f"{where}: a slice from seq {item.from_seq} with a starting snapshot of {item.start_snapshot_bytes} bytes"
                    )
                header = item
                last_seq = item.from_seq - 1
                last_digest = item.start_digest
                continue
            assert header is not None
            if isinstance(item, SnapshotPart):
                if entries or item.index != parts:
                    raise ConformanceFileError(
                        f"{where}: snapshot part {item.index} out of place (expected part {parts}, before any message)"
                    )
                parts += 1
                snapshot_bytes += len(item.data)
                snapshot_sha.update(item.data)
                if snapshot_bytes > header.start_snapshot_bytes:
                    raise ConformanceFileError(
                        f"{where}: the starting snapshot holds more than the {header.start_snapshot_bytes} bytes the header says"
                    )
            elif isinstance(item, Entry):
                if not entries and snapshot_bytes != header.start_snapshot_bytes:
                    raise ConformanceFileError(
                        f"{where}: the starting snapshot has {snapshot_bytes} of its {header.start_snapshot_bytes} bytes"
                    )
                if not last_seq < item.seq <= header.to_seq or (header.all_messages and item.seq != last_seq + 1):
                    raise ConformanceFileError(
                        f"{where}: message seq {item.seq} after seq {last_seq} in slice {header.from_seq}..{header.to_seq}"
                    )
                if not is_digest(item.digest):
                    raise ConformanceFileError(f"{where}: seq {item.seq} has digest {item.digest!r}")
                entries += 1
                first_entry = first_entry or item.seq
                last_seq = item.seq
                last_digest = item.digest
            elif isinstance(item, Footer):
                footer = item
                if (item.messages, item.last_seq, item.final_digest) != (entries, header.to_seq, last_digest):
                    raise ConformanceFileError(
                        f"{where}: the footer says {item.messages} messages up to seq {item.last_seq} ending with digest "
                        f"{item.final_digest[:16]}; the file holds {entries} up to {header.to_seq} ending with {last_digest[:16]}"
                    )
                if header.all_messages and last_seq != header.to_seq:
                    raise ConformanceFileError(f"{where}: messages end at seq {last_seq}, the slice at {header.to_seq}")
            else:
                raise ConformanceFileError(f"{where}: a second header")
        if header is None:
            raise ConformanceFileError(f"{path}: truncated: no header")
        if snapshot_bytes != header.start_snapshot_bytes:
            raise ConformanceFileError(
                f"{path}: truncated: the starting snapshot has {snapshot_bytes} of its {header.start_snapshot_bytes} bytes"
            )
        if header.start_snapshot_bytes and snapshot_sha.hexdigest() != header.start_snapshot_sha256:
            raise ConformanceFileError(f"{path}: garbled: the starting snapshot's SHA-256 is not the one the header says")
        if footer is None:
            seen = f"up to seq {last_seq}" if entries else "no message"
            raise ConformanceFileError(
                f"{path}: truncated: no footer ({entries} messages, {seen}; the slice is {header.from_seq}..{header.to_seq})"
            )
        return FileSummary(path, header, entries, footer, first_entry)


def read_snapshot(path: str) -> bytes:
    with open_recording(path) as f:
        return b"".join(item.data for _, _, item in frames(f, path) if isinstance(item, SnapshotPart))
