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
and ``Welcome``; ``BATCH_FORMAT_VERSION`` travels inside every Raft log entry.
"""

from __future__ import annotations

import enum
import re
import struct
import zlib
from typing import Annotated, Union

import msgspec

from sequencer import limits

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


ClientFrame = Union[Hello, Submit, SubmitBatch, Subscribe, StatusRequest, Heartbeat]
NodeFrame = Union[Welcome, Ack, AckRange, Busy, NotLeader, OutcomeUnknown, Rejected, Delivered, Status, Heartbeat]

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
