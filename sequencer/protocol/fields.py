"""The field types of the wire formats, and the bounds they carry.

Every field type is a msgspec ``Annotated`` type whose bounds are checked as a frame, entry or
payload is decoded: a frame from outside with a field out of range is refused as a whole.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Annotated

import msgspec

from raftseq.sequencer import limits
from raftseq.sequencer.limits import (
    SM_DIGEST_CHARS_MAX,
    SM_TYPE_CHARS_MAX,
    SNAPSHOT_CHUNK_DATA_BYTES_MAX,
    SNAPSHOT_CHUNKS_MAX,
    SNAPSHOT_LIST_MAX,
)

__all__ = [
    "CLIENT_SEQ_MAX",
    "DECODE_ERRORS",
    "SESSION_PATTERN",
    "SM_DIGEST_CHARS_MAX",
    "SM_TYPE_CHARS_MAX",
    "SNAPSHOT_CHUNK_DATA_BYTES_MAX",
    "SNAPSHOT_CHUNKS_MAX",
    "SNAPSHOT_LIST_MAX",
    "SNAPSHOT_SESSION_PREFIX",
    "Address",
    "ClientSeq",
    "Count",
    "Detail",
    "Digest",
    "EntrySession",
    "Owner",
    "PayloadDigest",
    "Payload",
    "SchemaVersion",
    "Seq",
    "Session",
    "Sha256Hex",
    "SmType",
    "TimeNs",
    "Token",
    "is_session_name",
    "payload_digest",
    "payload_digests",
]

#: What a session name may contain (ASCII only, so its length in characters is its length in bytes).
SESSION_PATTERN = r"^[A-Za-z0-9._:@/+-]+\Z"
Session = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.SESSION_BYTES_MAX, pattern=SESSION_PATTERN)]
#: A session name inside a Raft entry: only its length is checked when the entry is decoded
#: (a pattern per entry costs three times the rest of the decode). The machine checks the
#: pattern once, when a session first appears (``is_session_name``).
EntrySession = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.SESSION_BYTES_MAX)]
_session_re = re.compile(SESSION_PATTERN)


def is_session_name(name: str) -> bool:
    """True when `name` is a session name a ``Hello`` would accept."""
    return 0 < len(name) <= limits.SESSION_BYTES_MAX and _session_re.match(name) is not None


#: The highest client_seq (and sequence number): msgpack's signed 64-bit range.
CLIENT_SEQ_MAX = 2**63 - 1
ClientSeq = Annotated[int, msgspec.Meta(ge=1, le=CLIENT_SEQ_MAX)]
Seq = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
TimeNs = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
#: A payload's digest (``payload_digest``); 0: not given (the node computes it).
PayloadDigest = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
#: A BLAKE2b-64 state that has hashed nothing: every digest starts from a copy of it, a quarter
#: cheaper than making one with its parameters each time (a client hashes every payload).
_blake2b_64 = hashlib.blake2b(digest_size=limits.SESSION_DIGEST_BYTES)


def payload_digest(payload: bytes) -> int:
    """The digest a session's dedup window keeps of a payload, which a client may send with its
    submit: BLAKE2b-64, its top bit dropped and its lowest set (never 0: 0 stands for unknown)."""
    state = _blake2b_64.copy()
    state.update(payload)
    return int.from_bytes(state.digest(), "little") >> 1 | 1


def payload_digests(payloads: Iterable[bytes]) -> list[int]:
    """``payload_digest`` of each payload, in order (one call for many: less per payload)."""
    fresh = _blake2b_64.copy
    from_bytes = int.from_bytes
    digests = []
    for payload in payloads:
        state = fresh()
        state.update(payload)
        digests.append(from_bytes(state.digest(), "little") >> 1 | 1)
    return digests


#: A client instance's random id (``Hello.owner``, ``Entry.owner``); 0: none (unfenced).
Owner = Annotated[int, msgspec.Meta(ge=0, le=2**limits.OWNER_BITS - 1)]
Payload = Annotated[bytes, msgspec.Meta(max_length=limits.PAYLOAD_BYTES_MAX)]
#: Printable ASCII only, so its length in characters is its length in bytes.
Token = Annotated[str, msgspec.Meta(max_length=limits.TOKEN_BYTES_MAX, pattern=r"^[\x20-\x7e]*\Z")]
Detail = Annotated[str, msgspec.Meta(max_length=limits.DETAIL_CHARS_MAX)]
Address = Annotated[str, msgspec.Meta(max_length=limits.ADDRESS_CHARS_MAX)]

#: Sessions whose names start with this carry state-machine snapshots, one ``SnapshotChunk``
#: per message; the machine indexes complete uploads (``sequencer.machine``). Reserved: other
#: clients must not use it.
SNAPSHOT_SESSION_PREFIX = "@snap/"

SmType = Annotated[str, msgspec.Meta(min_length=1, max_length=SM_TYPE_CHARS_MAX, pattern=r"^[A-Za-z0-9._-]+\Z")]
Digest = Annotated[str, msgspec.Meta(min_length=1, max_length=SM_DIGEST_CHARS_MAX, pattern=r"^[0-9a-f]+\Z")]
Sha256Hex = Annotated[str, msgspec.Meta(min_length=64, max_length=64, pattern=r"^[0-9a-f]+\Z")]
SchemaVersion = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]

#: What decoding untrusted bytes can raise: msgspec's errors, and UnicodeDecodeError for a
#: string that is not UTF-8 (msgspec does not wrap it).
DECODE_ERRORS = (msgspec.MsgspecError, UnicodeDecodeError)
