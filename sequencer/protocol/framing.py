"""Framing: how frames and journal records are laid out as bytes, and read back from a stream.

Every frame on a TCP connection, and every record in the journal, has the same layout::

    +----------------+----------------+---------------------------+
    | length: u32 BE | crc32: u32 BE  | body: msgpack, `length` B |
    +----------------+----------------+---------------------------+

``crc32`` is zlib's CRC-32 of the body. A journal record *is* a ``Delivered`` frame, so
replaying the journal to a subscriber is copying bytes, and a subscriber can check the checksum
the journal wrote.
"""

from __future__ import annotations

import enum
import struct
import zlib

import msgspec

from raftseq.sequencer import limits
from raftseq.sequencer.protocol.fields import DECODE_ERRORS
from raftseq.sequencer.protocol.frames import ClientFrame, Delivered, Frame, NodeFrame, Rejected, RejectReason

__all__ = [
    "HEADER",
    "HEADER_BYTES",
    "FrameError",
    "FrameErrorCode",
    "FrameReader",
    "decode_delivered_body",
    "delivered_seq",
    "encode_delivered",
    "encode_delivered_run",
    "encode_frame",
]

HEADER = struct.Struct(">II")
HEADER_BYTES = HEADER.size

_encoder = msgspec.msgpack.Encoder()
_client_decoder = msgspec.msgpack.Decoder(ClientFrame)
_node_decoder = msgspec.msgpack.Decoder(NodeFrame)
_delivered_decoder = msgspec.msgpack.Decoder(Delivered)
_header_pack = HEADER.pack
_crc32 = zlib.crc32
_encode = _encoder.encode


def encode_frame(frame: Frame) -> bytes:
    """Header and body of one frame."""
    body = _encode(frame)
    return _header_pack(len(body), _crc32(body)) + body


def encode_delivered(seq: int, log_time_ns: int, session: str, client_seq: int, payload: bytes) -> bytes:
    """The same bytes as ``encode_frame(Delivered(...))``, without building the Struct."""
    body = _encode(("d", seq, log_time_ns, session, client_seq, payload))
    return _header_pack(len(body), _crc32(body)) + body


def encode_delivered_run(first_seq: int, log_time_ns: int, session: str, first_client_seq: int, payloads: list[bytes]) -> list[bytes]:
    """``encode_delivered`` of each payload of a run: ``payloads[i]`` as sequence number
    ``first_seq + i``, client_seq ``first_client_seq + i`` (one call for a run of a session)."""
    encode, header_pack, crc32 = _encode, _header_pack, _crc32
    records = []
    for i, payload in enumerate(payloads):
        body = encode(("d", first_seq + i, log_time_ns, session, first_client_seq + i, payload))
        records.append(header_pack(len(body), crc32(body)) + body)
    return records


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

    def __init__(self, decoder_type: str = "client", *, frame_bytes_max: int = limits.FRAME_BYTES_MAX, keep_raw: bool = False) -> None:
        if decoder_type not in ("client", "node"):
            raise ValueError(f"decoder_type must be 'client' or 'node', got {decoder_type!r}")
        if not 1 <= frame_bytes_max <= limits.FRAME_READER_BYTES_MAX:
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
        self._parse(memoryview(pending), out)  # exactly the one frame
        self._pending = bytearray()
        if self.error is not None:
            return None
        return view

    def _parse(self, view: memoryview, out: list) -> int:
        # One pass per frame, everything in locals: it runs once per frame a client sends.
        pos = 0
        end = len(view)
        unpack_from = HEADER.unpack_from
        decode = self._decode
        append = out.append
        keep_raw = self.keep_raw
        frame_bytes_max = self.frame_bytes_max
        while end - pos >= HEADER_BYTES:
            length, crc = unpack_from(view, pos)
            if not 0 < length <= frame_bytes_max:
                self._length_ok(length, out)
                return end
            start = pos + HEADER_BYTES
            stop = start + length
            if stop > end:
                break
            body = view[start:stop]
            if _crc32(body) != crc:
                self._fail(FrameError(FrameErrorCode.CHECKSUM, f"frame {self.frames_read + 1}: checksum mismatch"), out)
                return end
            try:
                frame = decode(body)
            except DECODE_ERRORS as exc:
                self._fail(FrameError(FrameErrorCode.MALFORMED, f"frame {self.frames_read + 1}: {exc}"), out)
                return end
            self.frames_read += 1
            append((frame, bytes(view[pos:stop])) if keep_raw else frame)
            pos = stop
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

    def _fail(self, error: FrameError, out: list) -> None:
        self.error = error
        self._pending = bytearray()
        out.append(error)
