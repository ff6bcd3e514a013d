"""The Raft log entry: one batch of submits, with the leader's wall clock.

Each batch is one pysyncobj command with one ``bytes`` argument. The format version travels
inside every entry: 1 for batches of ``Entry`` (no owner; byte for byte the format of raftseq
0.1), 2 for batches of ``FencedEntry`` (``owner``/``claim``: session fencing; ``digest``: the
payload digest as the client computed it). A node reads both;
a node that predates fencing refuses version 2 rather than sequence it unfenced.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

from raftseq.sequencer import limits
from raftseq.sequencer.protocol.fields import DECODE_ERRORS, ClientSeq, EntrySession, Owner, Payload, PayloadDigest, TimeNs

__all__ = [
    "BATCH_FORMAT_FENCED",
    "BATCH_FORMAT_VERSION",
    "Batch",
    "BatchError",
    "Entry",
    "FencedEntry",
    "decode_batch",
    "encode_batch",
]

#: The format of batches whose entries carry no owner (raftseq 0.1's, byte for byte).
BATCH_FORMAT_VERSION = 1
#: The format of batches in which some entry carries ``owner``/``claim``.
BATCH_FORMAT_FENCED = 2
_BATCH_FORMATS_READ = (BATCH_FORMAT_VERSION, BATCH_FORMAT_FENCED)


class Entry(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One submit of a client without an owner (format 1: three fields, as 0.1 wrote them)."""

    session: EntrySession
    client_seq: ClientSeq
    payload: Payload
    #: Not fenced, no digest given (``FencedEntry`` has the fields).
    owner: ClassVar[int] = 0
    claim: ClassVar[bool] = False
    digest: ClassVar[int] = 0


class FencedEntry(Entry, frozen=True, array_like=True, gc=False):
    """One submit of a client with an owner or a payload digest (format 2)."""

    #: The submitting client's ``Hello.owner`` (0: none).
    owner: Owner = 0
    #: The first entry of a connection: `owner` takes the session over.
    claim: bool = False
    #: The client's ``payload_digest(payload)`` (0: not given; the machine computes it).
    digest: PayloadDigest = 0


class Batch(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One Raft log entry: the leader's wall clock when it closed the batch, and its entries."""

    format_version: int
    leader_time_ns: TimeNs
    entries: list[Entry]


class _FencedBatch(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A batch of format 2 as decoded: entries with their owners."""

    format_version: int
    leader_time_ns: TimeNs
    entries: list[FencedEntry]


_encode = msgspec.msgpack.Encoder().encode
_batch_decoder = msgspec.msgpack.Decoder(Batch)
_fenced_decoder = msgspec.msgpack.Decoder(_FencedBatch)
#: How a format 2 batch starts: an array of three, then the version as a positive fixint.
_FENCED_HEAD = bytes((0x93, BATCH_FORMAT_FENCED))


def encode_batch(leader_time_ns: int, entries: list[Entry], *, fenced: bool = False) -> bytes:
    """`fenced`: some entry carries an owner (format 2); else format 1, as 0.1 wrote it."""
    return _encode(Batch(BATCH_FORMAT_FENCED if fenced else BATCH_FORMAT_VERSION, leader_time_ns, entries))


class BatchError(Exception):
    """A Raft log entry that this version cannot decode."""


def decode_batch(data: bytes) -> Batch:
    """Decode a Raft log entry. Raises ``BatchError`` (only) on anything it cannot use."""
    if len(data) > limits.BATCH_BYTES_MAX:
        raise BatchError(f"batch of {len(data)} bytes exceeds {limits.BATCH_BYTES_MAX}")
    try:
        batch = (_fenced_decoder if data.startswith(_FENCED_HEAD) else _batch_decoder).decode(data)
        if batch.format_version == BATCH_FORMAT_FENCED and type(batch) is Batch:
            batch = _fenced_decoder.decode(data)  # format 2, not written the usual way
    except DECODE_ERRORS as exc:
        raise BatchError(f"undecodable batch: {exc}") from None
    if batch.format_version not in _BATCH_FORMATS_READ:
        raise BatchError(f"batch format version {batch.format_version}, this node reads {_BATCH_FORMATS_READ}")
    if len(batch.entries) > limits.BATCH_ENTRIES_MAX:
        raise BatchError(f"batch of {len(batch.entries)} entries exceeds {limits.BATCH_ENTRIES_MAX}")
    return batch
