"""State-machine snapshot chunks: the one payload format the sequencer itself reads.

These are payloads of ordinary sequenced messages, not frames: the sequencer does not look
inside a payload, except that the machine indexes ``SnapshotChunk`` payloads from sessions
named ``SNAPSHOT_SESSION_PREFIX...`` (``sequencer.machine``). The SDK (``clients.sm``) writes
and reads them; its other payload formats live in ``clients.sm.formats``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from raftseq.sequencer.protocol.fields import (
    DECODE_ERRORS,
    SNAPSHOT_CHUNK_DATA_BYTES_MAX,
    SNAPSHOT_CHUNKS_MAX,
    Count,
    Digest,
    SchemaVersion,
    Seq,
    Sha256Hex,
    SmType,
)

__all__ = [
    "SmFormatError",
    "SnapshotChunk",
    "SnapshotHeader",
    "decode_snapshot_chunk",
    "encode_snapshot_chunk",
]

_encode = msgspec.msgpack.Encoder().encode


class SnapshotHeader(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """What a state-machine snapshot is: the fields every chunk repeats and every index entry
    (``SnapshotInfo``) starts with, in this order on the wire."""

    sm_type: SmType
    schema_version: SchemaVersion
    #: The snapshot holds the state after applying every message up to this number.
    covered_seq: Seq
    digest: Digest
    bytes_sha256: Sha256Hex
    total_bytes: Count
    chunk_count: Annotated[int, msgspec.Meta(ge=1, le=SNAPSHOT_CHUNKS_MAX)]


class SnapshotChunk(SnapshotHeader, tag="snapchunk", tag_field="t"):
    """One piece of a state-machine snapshot, the payload of one message of a snapshot session.

    Every chunk repeats the snapshot's header, so that the machine can check that the chunks of
    one upload belong together without keeping their data. Chunk ``0`` starts an upload
    (replacing any unfinished one of the same session); chunk ``chunk_count - 1`` completes it.
    """

    chunk_index: Annotated[int, msgspec.Meta(ge=0, le=SNAPSHOT_CHUNKS_MAX - 1)]
    data: Annotated[bytes, msgspec.Meta(max_length=SNAPSHOT_CHUNK_DATA_BYTES_MAX)]


class SmFormatError(Exception):
    """A payload that claims to be a state-machine format but cannot be decoded as one."""


_snapshot_chunk_decoder = msgspec.msgpack.Decoder(SnapshotChunk)


def encode_snapshot_chunk(chunk: SnapshotChunk) -> bytes:
    return _encode(chunk)


def decode_snapshot_chunk(payload: bytes | memoryview) -> SnapshotChunk:
    """Raises ``SmFormatError`` (only) on a payload that is not a valid chunk."""
    try:
        return _snapshot_chunk_decoder.decode(payload)
    except DECODE_ERRORS as exc:
        raise SmFormatError(f"not a snapshot chunk: {exc}") from None
