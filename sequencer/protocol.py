"""The wire protocol between clients and nodes, and the Raft log entry format.

Every frame on a TCP connection, and every record in the journal, has the same layout::

    +----------------+----------------+---------------------------+
    | length: u32 BE | crc32: u32 BE  | body: msgpack, `length` B |
    +----------------+----------------+---------------------------+

``crc32`` is zlib's CRC-32 of the body. The body is one tagged msgspec ``Struct`` encoded as a
msgpack array whose first element is the tag. A journal record *is* a ``Delivered`` frame, so
replaying the journal to a subscriber is copying bytes, and a subscriber can check the checksum
the journal wrote.

Schema evolution: new fields are added at the end with defaults; a reader ignores trailing
fields it does not know; field types never change. ``PROTOCOL_VERSION`` travels in ``Hello``
and ``Welcome``; ``BATCH_FORMAT_VERSION`` travels inside every Raft log entry. New frame types
(``SnapshotQuery``/``SnapshotList``) need no new protocol version: only clients that use them
send them, and a node that predates them answers ``Rejected(bad_frame)``.

The state-machine SDK's payload formats (``SmEnvelope``, ``Checkpoint``, ``Activate``,
``SnapshotChunk``) and the checkpoint comparison (``CheckpointLedger``) live here too, because
the SDK (``clients.sm``), the ``raftseq sm`` command and the machine's snapshot index all read
them; the sequencer itself never looks inside a payload except for ``SnapshotChunk``s from
snapshot sessions.
"""

from __future__ import annotations

import enum
import re
import struct
import zlib
from typing import Annotated, Union

import msgspec

from raftseq.sequencer import limits

PROTOCOL_VERSION = 1
BATCH_FORMAT_VERSION = 1

HEADER = struct.Struct(">II")
HEADER_BYTES = HEADER.size

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
ClientSeq = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
Seq = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
TimeNs = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Payload = Annotated[bytes, msgspec.Meta(max_length=limits.PAYLOAD_BYTES_MAX)]
#: Printable ASCII only, so its length in characters is its length in bytes.
Token = Annotated[str, msgspec.Meta(max_length=limits.TOKEN_BYTES_MAX, pattern=r"^[\x20-\x7e]*\Z")]
Detail = Annotated[str, msgspec.Meta(max_length=limits.DETAIL_CHARS_MAX)]
Address = Annotated[str, msgspec.Meta(max_length=256)]


class RejectReason(enum.Enum):
    """Why a node refused something. Sent as its string value."""

    BAD_FRAME = "bad_frame"  # undecodable, wrong types, bad checksum
    FRAME_TOO_LARGE = "frame_too_large"
    AUTH_FAILED = "auth_failed"
    PROTOCOL_VERSION = "protocol_version"
    HELLO_REQUIRED = "hello_required"
    SEQUENCE_GAP = "sequence_gap"  # client_seq skips ahead; `expected_client_seq` says the next
    STALE_CLIENT_SEQ = "stale_client_seq"  # applied long ago, outside the dedup window
    TOO_MANY_SESSIONS = "too_many_sessions"
    FROM_SEQ_UNAVAILABLE = "from_seq_unavailable"  # subscribe below the journal's start
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


class Role(enum.Enum):
    LEADER = "leader"
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    UNKNOWN = "unknown"


class _Frame(msgspec.Struct, frozen=True, array_like=True, tag_field="t", gc=False):
    """Base of every wire frame (array-encoded, tag first)."""


# --- client -> node -----------------------------------------------------------------------


class Hello(_Frame, tag="hello"):
    """First frame on every connection. Binds the connection to `session`."""

    session: Session
    token: Token
    protocol_version: int
    #: Highest client_seq this client has seen acknowledged (0: none); informational.
    last_client_seq_acked: Count = 0


class Submit(_Frame, tag="sub"):
    """Sequence `payload` as the session's message number `client_seq`."""

    client_seq: ClientSeq
    payload: Payload


class SubmitBatch(_Frame, tag="subs"):
    """``Submit`` for each payload, numbered ``first_client_seq``, ``first_client_seq + 1``, …

    One frame for many submits: the same semantics as that many ``Submit`` frames in a row,
    answered the same way (``Ack``/``AckRange``, ``Busy``, … per client_seq).
    """

    first_client_seq: ClientSeq
    payloads: Annotated[list[Payload], msgspec.Meta(min_length=1, max_length=limits.SUBMIT_BATCH_ENTRIES_MAX)]


class Subscribe(_Frame, tag="subscribe"):
    """Deliver the stream from `from_seq` on, then keep delivering as it grows."""

    from_seq: Seq


class StatusRequest(_Frame, tag="status?"):
    pass


class Heartbeat(_Frame, tag="hb"):
    """Sent by both sides when idle. From a node, `last_seq` is its last committed number."""

    last_seq: Count = 0


# --- node -> client -----------------------------------------------------------------------


class Welcome(_Frame, tag="welcome"):
    node_id: str
    protocol_version: int
    role: Role
    #: Client address of the leader as this node knows it, or "" when unknown.
    leader: Address
    #: Highest client_seq of this session the node has applied (0: unknown session).
    last_client_seq: Count
    heartbeat_interval_ms: int


class Ack(_Frame, tag="ack"):
    """`client_seq` is committed as sequence number `seq`. `duplicate`: it already was."""

    client_seq: ClientSeq
    seq: Seq
    duplicate: bool = False


class AckRange(_Frame, tag="acks"):
    """``Ack`` for ``count`` submits: client_seq ``first_client_seq + i`` is committed as
    ``first_seq + i``. Sent for runs of consecutive numbers on both sides."""

    first_client_seq: ClientSeq
    first_seq: Seq
    count: Annotated[int, msgspec.Meta(ge=1, le=limits.BATCH_ENTRIES_MAX)]


class Busy(_Frame, tag="busy"):
    """A limit was hit; `client_seq` was not taken. Retry after the hint."""

    client_seq: Count
    retry_after_ms: int
    limit: str = ""


class NotLeader(_Frame, tag="notleader"):
    """This node does not take submits. `leader` is the leader's client address, "" if unknown."""

    leader: Address
    client_seq: Count = 0


class OutcomeUnknown(_Frame, tag="unknown"):
    """The node cannot tell whether `client_seq` was sequenced (leader lost, commit timeout).

    Never a failure: resubmit under the same client_seq; the sequencer applies it at most once
    and answers a retry of an applied submit with the number it already has.
    """

    client_seq: ClientSeq
    detail: Detail = ""


class Rejected(_Frame, tag="rejected"):
    reason: RejectReason
    detail: Detail = ""
    client_seq: Count = 0
    #: With SEQUENCE_GAP: the client_seq the sequencer expects next for this session.
    expected_client_seq: Count = 0


class Delivered(_Frame, tag="d"):
    """One sequenced message. A journal record is exactly this frame."""

    seq: Seq
    log_time_ns: TimeNs
    session: Session
    client_seq: ClientSeq
    payload: Payload


class Status(_Frame, tag="status"):
    node_id: str
    role: Role
    leader: Address
    term: Count
    commit_index: Count
    last_seq: Count
    last_log_time_ns: Count
    pid: Count = 0
    client_address: Address = ""
    raft_address: Address = ""
    #: host:port of the node's Prometheus endpoint, "" when metrics are off (or an older node).
    metrics_address: Address = ""


# --- state-machine snapshots: the index query (any node answers from its machine) ----------

#: Sessions whose names start with this carry state-machine snapshots, one ``SnapshotChunk``
#: per message; the machine indexes complete uploads (``sequencer.machine``). Reserved: other
#: clients must not use it.
SNAPSHOT_SESSION_PREFIX = "@snap/"
#: Longest state-machine type name (``SmType``), in characters (ASCII only).
SM_TYPE_CHARS_MAX = 64
#: Longest message type name inside an ``SmEnvelope``, in characters (ASCII only).
SM_MESSAGE_TYPE_CHARS_MAX = 128
#: Longest digest (lowercase hex) a snapshot or checkpoint may carry, in characters.
SM_DIGEST_CHARS_MAX = 128
#: Most chunks one snapshot may have: with ``SNAPSHOT_CHUNK_DATA_BYTES_MAX`` a bound of ~2 GiB.
SNAPSHOT_CHUNKS_MAX = 65_536
#: Bytes of snapshot data per chunk: the payload limit less room for the chunk's header.
SNAPSHOT_CHUNK_DATA_BYTES_MAX = limits.PAYLOAD_BYTES_MAX - 1024
#: Most index entries one ``SnapshotList`` carries (newest first).
SNAPSHOT_LIST_MAX = 32

SmType = Annotated[str, msgspec.Meta(min_length=1, max_length=SM_TYPE_CHARS_MAX, pattern=r"^[A-Za-z0-9._-]+\Z")]
SmMessageType = Annotated[str, msgspec.Meta(min_length=1, max_length=SM_MESSAGE_TYPE_CHARS_MAX, pattern=r"^[A-Za-z0-9._-]+\Z")]
Digest = Annotated[str, msgspec.Meta(min_length=1, max_length=SM_DIGEST_CHARS_MAX, pattern=r"^[0-9a-f]+\Z")]
Sha256Hex = Annotated[str, msgspec.Meta(min_length=64, max_length=64, pattern=r"^[0-9a-f]+\Z")]
SchemaVersion = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]


class SnapshotInfo(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One complete state-machine snapshot the cluster holds: what it is and where its chunks are.

    The chunks are the messages of ``session`` numbered ``first_seq..last_seq`` (other sessions'
    messages may sit between them); read them with an ordinary subscription from ``first_seq``.
    ``bytes_sha256`` covers the concatenated chunk data; ``digest`` is the state machine's own
    digest of the state, checked after restoring it.
    """

    sm_type: SmType
    schema_version: SchemaVersion
    #: The snapshot holds the state after applying every message up to this number.
    covered_seq: Seq
    digest: Digest
    bytes_sha256: Sha256Hex
    total_bytes: Count
    chunk_count: Annotated[int, msgspec.Meta(ge=1, le=SNAPSHOT_CHUNKS_MAX)]
    session: Session
    first_seq: Seq
    last_seq: Seq
    #: Log time of the last chunk.
    log_time_ns: TimeNs


class SnapshotQuery(_Frame, tag="snaps?"):
    """Which snapshots of state-machine type `sm_type` does the cluster hold? Any node answers."""

    sm_type: SmType


class SnapshotList(_Frame, tag="snaps"):
    """The answer to ``SnapshotQuery``: the node's index, newest ``covered_seq`` first, as of
    its applied sequence number ``last_seq``."""

    sm_type: SmType
    snapshots: Annotated[list[SnapshotInfo], msgspec.Meta(max_length=SNAPSHOT_LIST_MAX)]
    last_seq: Count


ClientFrame = Union[Hello, Submit, SubmitBatch, Subscribe, StatusRequest, Heartbeat, SnapshotQuery]
NodeFrame = Union[Welcome, Ack, AckRange, Busy, NotLeader, OutcomeUnknown, Rejected, Delivered, Status, Heartbeat, SnapshotList]

# --- the Raft log entry -------------------------------------------------------------------


class Entry(msgspec.Struct, frozen=True, array_like=True, gc=False):
    session: EntrySession
    client_seq: ClientSeq
    payload: Payload


class Batch(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One Raft log entry: the leader's wall clock when it closed the batch, and its entries."""

    format_version: int
    leader_time_ns: TimeNs
    entries: list[Entry]


# --- encoding -----------------------------------------------------------------------------

#: What decoding untrusted bytes can raise: msgspec's errors, and UnicodeDecodeError for a
#: string that is not UTF-8 (msgspec does not wrap it).
DECODE_ERRORS = (msgspec.MsgspecError, UnicodeDecodeError)

_encoder = msgspec.msgpack.Encoder()
_client_decoder = msgspec.msgpack.Decoder(ClientFrame)
_node_decoder = msgspec.msgpack.Decoder(NodeFrame)
_batch_decoder = msgspec.msgpack.Decoder(Batch)
_delivered_decoder = msgspec.msgpack.Decoder(Delivered)
_header_pack = HEADER.pack
_crc32 = zlib.crc32
_encode = _encoder.encode


def encode_frame(frame: _Frame) -> bytes:
    """Header and body of one frame."""
    body = _encode(frame)
    return _header_pack(len(body), _crc32(body)) + body


def encode_delivered(seq: int, log_time_ns: int, session: str, client_seq: int, payload: bytes) -> bytes:
    """The same bytes as ``encode_frame(Delivered(...))``, without building the Struct."""
    body = _encode(("d", seq, log_time_ns, session, client_seq, payload))
    return _header_pack(len(body), _crc32(body)) + body


def decode_delivered_body(body: bytes | memoryview) -> Delivered:
    """Decode the body of a journal record; raises ``msgspec.DecodeError`` on garbage."""
    try:
        return _delivered_decoder.decode(body)
    except UnicodeDecodeError as exc:
        raise msgspec.DecodeError(f"invalid UTF-8: {exc}") from None


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def delivered_seq(buf: bytes | memoryview, body_start: int) -> int:
    """The sequence number of the ``Delivered`` body at ``buf[body_start:]``, read without
    decoding the rest; -1 if the bytes do not start like a ``Delivered`` body."""
    if len(buf) - body_start < 4 or not 0x96 <= buf[body_start] <= 0x9F or buf[body_start + 1 : body_start + 3] != b"\xa1d":
        return -1
    marker = buf[body_start + 3]
    at = body_start + 4
    try:
        if marker < 0x80:
            return marker
        if marker == 0xCC:
            return buf[at]
        if marker == 0xCD:
            return _U16.unpack_from(buf, at)[0]
        if marker == 0xCE:
            return _U32.unpack_from(buf, at)[0]
        if marker == 0xCF:
            return _U64.unpack_from(buf, at)[0]
    except (IndexError, struct.error):
        return -1
    return -1


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


# --- state machines: the SDK's payload formats (clients.sm, `raftseq sm`, the machine) --------
#
# These are payloads of ordinary sequenced messages, not frames: the sequencer does not look
# inside a payload, except that the machine indexes ``SnapshotChunk`` payloads from sessions
# named ``SNAPSHOT_SESSION_PREFIX...`` (``sequencer.machine``). They live here because the
# client SDK, the ``raftseq sm`` command and the machine all read them.


class SnapshotChunk(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="snapchunk", tag_field="t"):
    """One piece of a state-machine snapshot, the payload of one message of a snapshot session.

    Every chunk repeats the snapshot's header, so that the machine can check that the chunks of
    one upload belong together without keeping their data. Chunk ``0`` starts an upload
    (replacing any unfinished one of the same session); chunk ``chunk_count - 1`` completes it.
    """

    sm_type: SmType
    schema_version: SchemaVersion
    covered_seq: Seq
    digest: Digest
    bytes_sha256: Sha256Hex
    total_bytes: Count
    chunk_count: Annotated[int, msgspec.Meta(ge=1, le=SNAPSHOT_CHUNKS_MAX)]
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


class SmEnvelope(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="sm", tag_field="t"):
    """A typed, versioned application message: ``["sm", type, version, body]``.

    ``body`` is the msgpack encoding of the message Struct of that type and schema version
    (kept undecoded here: a reader decodes it with the type it registered for that version).
    """

    type: SmMessageType
    version: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
    body: msgspec.Raw


#: How every encoded ``SmEnvelope`` starts (a 4-element array, then the tag): payloads that do
#: not start so are not state-machine messages and are skipped without decoding.
SM_ENVELOPE_MARK = b"\x94\xa2sm"
_sm_envelope_decoder = msgspec.msgpack.Decoder(SmEnvelope)


def encode_sm_message(type_name: str, version: int, body: bytes) -> bytes:
    """The payload of a state-machine message: `body` (msgpack) in an ``SmEnvelope``."""
    return _encode(SmEnvelope(type_name, version, msgspec.Raw(body)))


def decode_sm_envelope(payload: bytes | memoryview) -> SmEnvelope | None:
    """The envelope of `payload`; ``None`` when it is not a state-machine message at all.
    Raises ``SmFormatError`` when it starts like one but does not decode."""
    if payload[:4] != SM_ENVELOPE_MARK:
        return None
    try:
        return _sm_envelope_decoder.decode(payload)
    except DECODE_ERRORS as exc:
        raise SmFormatError(f"malformed state-machine envelope: {exc}") from None


#: Envelope type of a ``Checkpoint`` (schema version 1).
CHECKPOINT_TYPE = "raftseq.checkpoint"
#: Envelope type of an ``Activate`` (schema version 1).
ACTIVATE_TYPE = "raftseq.activate"
#: Every envelope type the SDK itself reads; application types may not start with this.
SM_CONTROL_PREFIX = "raftseq."


class Checkpoint(msgspec.Struct, frozen=True, gc=False):
    """Replica `replica` held state `digest` for `sm_type` after applying messages 1..`seq`."""

    sm_type: SmType
    seq: Seq
    digest: Digest
    replica: Session


class Activate(msgspec.Struct, frozen=True, gc=False):
    """From message `at_seq` on, every replica of `sm_type` behaves as version `version`.

    Sequenced like any message, so that every replica switches at the same point of the stream;
    a replica that cannot run `version` stops there instead of applying messages differently.
    """

    sm_type: SmType
    version: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
    at_seq: Seq


_checkpoint_decoder = msgspec.msgpack.Decoder(Checkpoint)
_activate_decoder = msgspec.msgpack.Decoder(Activate)
#: How every encoded checkpoint payload starts.
CHECKPOINT_MARK = SM_ENVELOPE_MARK + _encode(CHECKPOINT_TYPE)


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    return encode_sm_message(CHECKPOINT_TYPE, 1, _encode(checkpoint))


def encode_activate(activate: Activate) -> bytes:
    return encode_sm_message(ACTIVATE_TYPE, 1, _encode(activate))


def decode_checkpoint(envelope: SmEnvelope) -> Checkpoint:
    return _decode_control(envelope, CHECKPOINT_TYPE, _checkpoint_decoder)


def decode_activate(envelope: SmEnvelope) -> Activate:
    return _decode_control(envelope, ACTIVATE_TYPE, _activate_decoder)


def _decode_control(envelope: SmEnvelope, type_name: str, decoder: msgspec.msgpack.Decoder):
    if envelope.type != type_name or envelope.version != 1:
        raise SmFormatError(f"{envelope.type} version {envelope.version}: this version reads {type_name} version 1")
    try:
        return decoder.decode(envelope.body)
    except DECODE_ERRORS as exc:
        raise SmFormatError(f"malformed {type_name} body: {exc}") from None


class Divergence(msgspec.Struct, frozen=True):
    """Two or more copies of `sm_type` reported different states after the same message."""

    sm_type: str
    #: The first checkpoint at which copies disagree.
    seq: int
    #: Replica -> its digest at `seq`.
    digests: dict[str, str]
    #: The latest earlier checkpoint at which every copy that reported one agreed (0: none),
    #: so the copies diverged at a message in ``last_agreed_seq + 1 .. seq``.
    last_agreed_seq: int = 0

    def groups(self) -> list[tuple[str, list[str]]]:
        """``(digest, replicas)`` pairs, the largest group first (then by digest)."""
        by_digest: dict[str, list[str]] = {}
        for replica, digest in sorted(self.digests.items()):
            by_digest.setdefault(digest, []).append(replica)
        return sorted(by_digest.items(), key=lambda item: (-len(item[1]), item[0]))

    def describe(self) -> str:
        where = f"after seq {self.last_agreed_seq}, at or before seq {self.seq}" if self.last_agreed_seq else f"at or before seq {self.seq}"
        parts = [f"{', '.join(replicas)} hold {digest[:16]}" for digest, replicas in self.groups()]
        return f"state machine {self.sm_type!r}: copies diverged {where} (first disagreeing checkpoint: seq {self.seq}): " + "; ".join(parts)


class CheckpointLedger:
    """Checkpoints seen, per state-machine type and sequence number; says where copies disagree.

    Pure bookkeeping, shared by the SDK's runner (which adds its own digests and those it reads
    in the stream) and ``raftseq sm check``. At most `seqs_per_type_max` checkpoint numbers are
    kept per type, the oldest dropped first.
    """

    def __init__(self, *, seqs_per_type_max: int = 4096) -> None:
        if seqs_per_type_max < 1:
            raise ValueError("seqs_per_type_max must be >= 1")
        self.seqs_per_type_max = seqs_per_type_max
        self._types: dict[str, dict[int, dict[str, str]]] = {}
        self.checkpoints_seen = 0

    def add(self, sm_type: str, seq: int, replica: str, digest: str) -> Divergence | None:
        """Record one checkpoint; returns the disagreement it reveals at `seq`, if any."""
        self.checkpoints_seen += 1
        seqs = self._types.setdefault(sm_type, {})
        replicas = seqs.get(seq)
        if replicas is None:
            replicas = seqs[seq] = {}
            if len(seqs) > self.seqs_per_type_max:
                del seqs[min(seqs)]
        known = replicas.get(replica)
        if known is None:
            replicas[replica] = digest
        elif known != digest:
            # The same replica reported two states for one point (a nondeterministic copy
            # that restarted): keep both.
            n = 2
            while f"{replica}#{n}" in replicas and replicas[f"{replica}#{n}"] != digest:
                n += 1
            replicas[f"{replica}#{n}"] = digest
        if len(set(replicas.values())) > 1:
            return self._divergence(sm_type, seq)
        return None

    def _divergence(self, sm_type: str, seq: int) -> Divergence:
        seqs = self._types[sm_type]
        agreed = [s for s, r in seqs.items() if s < seq and len(r) > 1 and len(set(r.values())) == 1]
        return Divergence(sm_type, seq, dict(seqs[seq]), max(agreed, default=0))

    def divergences(self) -> list[Divergence]:
        """Every checkpoint number with disagreeing copies, lowest first (then by type)."""
        found = [self._divergence(t, s) for t, seqs in self._types.items() for s, r in seqs.items() if len(set(r.values())) > 1]
        return sorted(found, key=lambda d: (d.seq, d.sm_type))

    def first_divergence(self) -> Divergence | None:
        found = self.divergences()
        return found[0] if found else None

    def summary(self) -> dict[str, dict]:
        """Per type: checkpoint numbers seen, the replicas, and the last seq every copy agreed on."""
        out = {}
        for sm_type, seqs in sorted(self._types.items()):
            agreed = [s for s, r in seqs.items() if len(r) > 1 and len(set(r.values())) == 1]
            out[sm_type] = {
                "checkpoints": len(seqs),
                "replicas": sorted({replica for r in seqs.values() for replica in r}),
                "last_agreed_seq": max(agreed, default=0),
            }
        return out


# --- framing ------------------------------------------------------------------------------


class FrameErrorCode(enum.Enum):
    TOO_LARGE = "too_large"  # length prefix above the reader's limit
    BAD_LENGTH = "bad_length"  # zero length
    CHECKSUM = "checksum"  # body does not match its crc32
    MALFORMED = "malformed"  # not msgpack, unknown tag, wrong types, out-of-range values
    TRUNCATED = "truncated"  # the stream ended inside a frame


class FrameError(msgspec.Struct, frozen=True):
    """What a ``FrameReader`` found wrong. After a framing error the stream cannot be trusted."""

    code: FrameErrorCode
    detail: str

    def as_rejected(self) -> Rejected:
        reason = RejectReason.FRAME_TOO_LARGE if self.code is FrameErrorCode.TOO_LARGE else RejectReason.BAD_FRAME
        return Rejected(reason, self.detail[: limits.DETAIL_CHARS_MAX])


class FrameReader:
    """Turns a byte stream, fed in chunks of any size, into frames.

    ``feed`` returns decoded frames in order (with ``keep_raw``, ``(frame, raw bytes)`` pairs,
    so a journal record fetched from a peer is stored exactly as received); if the stream is bad, the last item is a
    ``FrameError`` and the reader stays failed (every later ``feed`` returns that error again).
    The reader holds at most one incomplete frame: a length prefix above ``frame_bytes_max`` is
    refused before any of its body is buffered. Nothing escapes ``feed`` as an exception.
    """

    def __init__(
        self, decoder_type: str = "client", *, frame_bytes_max: int = limits.FRAME_BYTES_MAX, keep_raw: bool = False
    ) -> None:
        if decoder_type not in ("client", "node"):
            raise ValueError(f"decoder_type must be 'client' or 'node', got {decoder_type!r}")
        if not 1 <= frame_bytes_max <= 2**31:
            raise ValueError(f"frame_bytes_max must be 1..2**31, got {frame_bytes_max}")
        self._decode = (_client_decoder if decoder_type == "client" else _node_decoder).decode
        self.frame_bytes_max = frame_bytes_max
        self._pending = bytearray()
        self.error: FrameError | None = None
        self.frames_read = 0
        #: With ``keep_raw``, each frame comes as ``(frame, its bytes as received)``.
        self.keep_raw = keep_raw

    @property
    def buffered_bytes(self) -> int:
        return len(self._pending)

    def feed(self, data: bytes | bytearray | memoryview) -> list:
        if self.error is not None:
            return [self.error]
        out: list = []
        view = memoryview(data)
        if self._pending:
            view = self._complete_pending(view, out)
            if view is None:
                return out
        pos = self._parse(view, out)
        if self.error is None and pos < len(view):
            self._pending += view[pos:]
        return out

    def close(self) -> FrameError | None:
        """Call when the stream ends: a partial frame left over is an error."""
        if self.error is None and self._pending:
            self.error = FrameError(FrameErrorCode.TRUNCATED, f"stream ended with {len(self._pending)} bytes of an unfinished frame")
            self._pending = bytearray()
        return self.error

    # The pending buffer holds the start of one frame. Take just enough of `view` to finish
    # it (so the buffer never grows past one frame), emit it, return the rest of `view`.
    def _complete_pending(self, view: memoryview, out: list) -> memoryview | None:
        pending = self._pending
        if len(pending) < HEADER_BYTES:
            take = min(HEADER_BYTES - len(pending), len(view))
            pending += view[:take]
            view = view[take:]
            if len(pending) < HEADER_BYTES:
                return None
            length, _ = HEADER.unpack_from(pending, 0)
            if not self._length_ok(length, out):
                return None
        length, _ = HEADER.unpack_from(pending, 0)
        need = HEADER_BYTES + length - len(pending)
        take = min(need, len(view))
        pending += view[:take]
        view = view[take:]
        if take < need:
            return None
        self._emit(memoryview(pending), 0, length, out)
        self._pending = bytearray()
        if self.error is not None:
            return None
        return view

    def _parse(self, view: memoryview, out: list) -> int:
        pos = 0
        end = len(view)
        unpack_from = HEADER.unpack_from
        while end - pos >= HEADER_BYTES:
            length, _ = unpack_from(view, pos)
            if not self._length_ok(length, out):
                return end
            if end - pos - HEADER_BYTES < length:
                break
            self._emit(view, pos, length, out)
            if self.error is not None:
                return end
            pos += HEADER_BYTES + length
        return pos

    def _length_ok(self, length: int, out: list) -> bool:
        if length == 0:
            self._fail(FrameError(FrameErrorCode.BAD_LENGTH, "frame length 0"), out)
            return False
        if length > self.frame_bytes_max:
            self._fail(
                FrameError(FrameErrorCode.TOO_LARGE, f"frame of {length} bytes exceeds the limit of {self.frame_bytes_max}"),
                out,
            )
            return False
        return True

    def _emit(self, view: memoryview, pos: int, length: int, out: list) -> None:
        _, crc = HEADER.unpack_from(view, pos)
        body = view[pos + HEADER_BYTES : pos + HEADER_BYTES + length]
        if _crc32(body) != crc:
            self._fail(FrameError(FrameErrorCode.CHECKSUM, f"frame {self.frames_read + 1}: checksum mismatch"), out)
            return
        try:
            frame = self._decode(body)
        except DECODE_ERRORS as exc:
            self._fail(FrameError(FrameErrorCode.MALFORMED, f"frame {self.frames_read + 1}: {exc}"), out)
            return
        self.frames_read += 1
        if self.keep_raw:
            out.append((frame, bytes(view[pos : pos + HEADER_BYTES + length])))
        else:
            out.append(frame)

    def _fail(self, error: FrameError, out: list) -> None:
        self.error = error
        self._pending = bytearray()
        out.append(error)
