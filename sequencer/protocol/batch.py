"""The Raft log entry: one batch of submits, with the leader's wall clock.

Each batch is one pysyncobj command with one ``bytes`` argument. ``BATCH_FORMAT_VERSION``
travels inside every entry.
"""

from __future__ import annotations

import msgspec

from raftseq.sequencer import limits
from raftseq.sequencer.protocol.fields import DECODE_ERRORS, ClientSeq, EntrySession, Payload, TimeNs

__all__ = [
    "BATCH_FORMAT_VERSION",
    "Batch",
    "BatchError",
    "Entry",
    "decode_batch",
    "encode_batch",
]

BATCH_FORMAT_VERSION = 1


class Entry(msgspec.Struct, frozen=True, array_like=True, gc=False):
    session: EntrySession
    client_seq: ClientSeq
    payload: Payload


class Batch(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One Raft log entry: the leader's wall clock when it closed the batch, and its entries."""

    format_version: int
    leader_time_ns: TimeNs
    entries: list[Entry]


_encode = msgspec.msgpack.Encoder().encode
_batch_decoder = msgspec.msgpack.Decoder(Batch)


def encode_batch(leader_time_ns: int, entries: list[Entry]) -> bytes:
    return _encode(Batch(BATCH_FORMAT_VERSION, leader_time_ns, entries))


class BatchError(Exception):
    """A Raft log entry that this version cannot decode."""


def decode_batch(data: bytes) -> Batch:
    """Decode a Raft log entry. Raises ``BatchError`` (only) on anything it cannot use."""
    if len(data) > limits.BATCH_BYTES_MAX:
        raise BatchError(f"batch of {len(data)} bytes exceeds {limits.BATCH_BYTES_MAX}")
    try:
        batch = _batch_decoder.decode(data)
    except DECODE_ERRORS as exc:
        raise BatchError(f"undecodable batch: {exc}") from None
    if batch.format_version != BATCH_FORMAT_VERSION:
        raise BatchError(f"batch format version {batch.format_version}, this node reads {BATCH_FORMAT_VERSION}")
    if len(batch.entries) > limits.BATCH_ENTRIES_MAX:
        raise BatchError(f"batch of {len(batch.entries)} entries exceeds {limits.BATCH_ENTRIES_MAX}")
    return batch
