"""The wire protocol: frame round trips, chunking, garbage, bounded memory, schema evolution.

Everything arriving from a socket or the Raft log is untrusted: a ``FrameReader`` turns any
byte stream into frames and at most one typed ``FrameError``, and ``decode_batch`` turns any
bytes into a ``Batch`` or a ``BatchError`` (DESIGN.md sections 3 and 6, STYLE.md habits 3, 4, 6).
"""

from __future__ import annotations

import hashlib
import typing
import zlib

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftseq.sequencer import limits, protocol
from raftseq.sequencer.protocol import (
    BATCH_FORMAT_VERSION,
    HEADER,
    HEADER_BYTES,
    PROTOCOL_VERSION,
    Ack,
    AckRange,
    Batch,
    BatchError,
    Busy,
    ClientFrame,
    Delivered,
    Entry,
    FrameError,
    FrameErrorCode,
    FrameReader,
    Heartbeat,
    Hello,
    NodeFrame,
    NotLeader,
    OutcomeUnknown,
    Rejected,
    RejectReason,
    Role,
    SnapshotInfo,
    SnapshotList,
    SnapshotQuery,
    Status,
    StatusRequest,
    Submit,
    SubmitBatch,
    Subscribe,
    Truncated,
    Welcome,
    decode_batch,
    decode_delivered_body,
    encode_batch,
    encode_delivered,
    encode_frame,
)

CLIENT_TYPES = typing.get_args(ClientFrame)
NODE_TYPES = typing.get_args(NodeFrame)
FRAME_TYPES = tuple(dict.fromkeys(CLIENT_TYPES + NODE_TYPES))

FUZZ = settings(deadline=None, database=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(deadline=None, database=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])

# --- helpers ------------------------------------------------------------------------------


def frame_of_body(body: bytes) -> bytes:
    """A frame with a correct header around any body."""
    return HEADER.pack(len(body), zlib.crc32(body)) + body


def frame_of_fields(*fields: object) -> bytes:
    """A frame whose body is the msgpack array `fields` (tag first), valid or not."""
    return frame_of_body(msgspec.msgpack.encode(list(fields)))


def fields_of(frame: msgspec.Struct) -> list:
    """The msgpack array a frame is encoded as, tag first."""
    return msgspec.msgpack.decode(encode_frame(frame)[HEADER_BYTES:])


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    """`data` cut into chunks whose sizes cycle through `sizes`."""
    chunks, pos, i = [], 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        chunks.append(data[pos : pos + size])
        pos += size
        i += 1
    return chunks


def feed_all(reader: FrameReader, chunks: list[bytes]) -> list:
    """Feed every chunk; check after each feed that the reader stayed within its memory bound.

    Returns what the reader produced up to and including its first error; once failed, the
    reader must answer every later feed with that same error.
    """
    items: list = []
    for chunk in chunks:
        got = reader.feed(chunk)
        assert reader.buffered_bytes <= HEADER_BYTES + reader.frame_bytes_max
        if items and isinstance(items[-1], FrameError):
            assert got == [items[-1]]
        else:
            items += got
    return items


def chunk_sizes(chunking: str | list[int], stream: bytes) -> list[int]:
    if chunking == "one":
        return [max(1, len(stream))]
    if chunking == "bytes":
        return [1]
    return list(chunking)


def read_one(data: bytes, decoder_type: str = "client") -> list:
    return FrameReader(decoder_type).feed(data)


def assert_error(items: list, code: FrameErrorCode) -> FrameError:
    assert len(items) >= 1, items
    error = items[-1]
    assert isinstance(error, FrameError), items
    assert error.code is code, error
    assert not any(isinstance(item, FrameError) for item in items[:-1]), items
    return error


def check_stream_contract(items: list, frame_types: tuple) -> FrameError | None:
    """Every item is a frame or a FrameError; at most one error, and it is the last item."""
    for item in items:
        assert isinstance(item, frame_types + (FrameError,)), item
    errors = [i for i, item in enumerate(items) if isinstance(item, FrameError)]
    assert len(errors) <= 1, items
    if errors:
        assert errors[0] == len(items) - 1, items
        assert isinstance(items[-1].code, FrameErrorCode)
        assert isinstance(items[-1].detail, str)
        return items[-1]
    return None


# --- strategies ---------------------------------------------------------------------------

SESSION_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@/+-"
sessions = st.text(SESSION_ALPHABET, min_size=1, max_size=limits.SESSION_BYTES_MAX)


def texts(n: int) -> st.SearchStrategy[str]:
    """Text that msgpack can carry (no lone surrogates), at most `n` characters."""
    return st.text(st.characters(exclude_categories=("Cs",)), max_size=n)


#: Tokens are printable ASCII, so their limit in characters is their limit in bytes.
tokens = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=limits.TOKEN_BYTES_MAX)
positive = st.integers(1, 2**63 - 1)
counts = st.integers(0, 2**63 - 1)
wire_ints = st.integers(-(2**63), 2**64 - 1)  # any integer msgpack can carry
small_payloads = st.binary(max_size=64)
# Hypothesis draws few large byte strings cheaply, so build the ones near the limit.
big_payloads = st.builds(
    lambda n, b: bytes([b]) * n, st.integers(limits.PAYLOAD_BYTES_MAX - 2, limits.PAYLOAD_BYTES_MAX), st.integers(0, 255)
)
payloads = st.one_of(small_payloads, small_payloads, big_payloads)
addresses = texts(256)
roles = st.sampled_from(Role)


def client_frames(payload: st.SearchStrategy[bytes] = payloads) -> st.SearchStrategy:
    return st.one_of(
        st.builds(Hello, sessions, tokens, wire_ints, counts),
        st.builds(Submit, positive, payload),
        st.builds(SubmitBatch, positive, st.lists(small_payloads, min_size=1, max_size=20)),
        st.builds(Subscribe, positive),
        st.just(StatusRequest()),
        st.builds(Heartbeat, counts),
    )


def node_frames(payload: st.SearchStrategy[bytes] = payloads) -> st.SearchStrategy:
    return st.one_of(
        st.builds(Welcome, texts(64), wire_ints, roles, addresses, counts, wire_ints),
        st.builds(Ack, positive, positive, st.booleans()),
        st.builds(AckRange, positive, positive, st.integers(1, limits.BATCH_ENTRIES_MAX)),
        st.builds(Busy, counts, wire_ints, texts(32)),
        st.builds(NotLeader, addresses, counts),
        st.builds(OutcomeUnknown, positive, texts(limits.DETAIL_CHARS_MAX)),
        st.builds(Rejected, st.sampled_from(RejectReason), texts(limits.DETAIL_CHARS_MAX), counts, counts),
        st.builds(Delivered, positive, counts, sessions, positive, payload),
        st.builds(
            Status,
            texts(64),
            roles,
            addresses,
            counts,
            counts,
            counts,
            counts,
            pid=counts,
            client_address=addresses,
            raft_address=addresses,
        ),
        st.builds(Heartbeat, counts),
    )


entries = st.builds(Entry, sessions, positive, small_payloads)

# One example of every frame type, at its limits where it has any.
EXAMPLES = [
    Hello("session-1", "x" * limits.TOKEN_BYTES_MAX, PROTOCOL_VERSION, 7),
    Hello("a" * limits.SESSION_BYTES_MAX, "", PROTOCOL_VERSION),
    Submit(1, b""),
    Submit(2**63 - 1, b"\xff" * limits.PAYLOAD_BYTES_MAX),
    SubmitBatch(1, [b"a"]),
    SubmitBatch(7, [b"x" * 10] * limits.SUBMIT_BATCH_ENTRIES_MAX),
    Subscribe(1),
    Subscribe(2**63 - 1),
    Subscribe(5, True),
    Truncated(1, 2**63 - 1),
    StatusRequest(),
    Heartbeat(),
    Heartbeat(2**63 - 1),
    Welcome("n1", PROTOCOL_VERSION, Role.FOLLOWER, "10.0.0.1:7001", 12, 500),
    Ack(3, 99, True),
    AckRange(3, 99, 1),
    AckRange(1, 2, limits.BATCH_ENTRIES_MAX),
    Busy(4, 250, "in_flight_per_session"),
    NotLeader("", 5),
    OutcomeUnknown(8, "leader lost"),
    OutcomeUnknown(2**63 - 1),
    Rejected(RejectReason.SEQUENCE_GAP, "gap", 9, 6),
    Rejected(RejectReason.BAD_FRAME, "d" * limits.DETAIL_CHARS_MAX),
    Delivered(1, 0, "s", 1, b"payload"),
    Delivered(2**63 - 1, 2**63 - 1, "Z" * limits.SESSION_BYTES_MAX, 2**63 - 1, b"\x00" * limits.PAYLOAD_BYTES_MAX),
    Status("n2", Role.LEADER, "127.0.0.1:7000", 3, 40, 39, 1_700_000_000_000_000_000),
    SnapshotQuery("refdata"),
    SnapshotQuery("t" * protocol.SM_TYPE_CHARS_MAX),
    SnapshotList("refdata", [], 0),
    protocol.MemberRequest("list"),
    protocol.MemberRequest("add", "n4", "10.0.0.4:7201", "10.0.0.4:7101", "ab" * 32),
    protocol.MemberReply(
        "", False, "127.0.0.1:7101", 3, [protocol.MemberInfo("n1", "127.0.0.1:7201", "127.0.0.1:7101", "cd" * 32)], ["n2"]
    ),
    protocol.MemberReply(
        "d" * limits.DETAIL_CHARS_MAX,
        True,
        "",
        2**62,
        [protocol.MemberInfo("n" * 32, "h" * 10 + ":1", "h:2", "ef" * 32, True)] * protocol.MEMBERS_LISTED_MAX,
        ["x" * 32] * protocol.REMOVED_LISTED_MAX,
    ),
    SnapshotList(
        "t" * protocol.SM_TYPE_CHARS_MAX,
        [
            SnapshotInfo(
                "t" * protocol.SM_TYPE_CHARS_MAX,
                2**31 - 1,
                2**63 - 2,
                "f" * protocol.SM_DIGEST_CHARS_MAX,
                "0" * 64,
                2**63 - 1,
                protocol.SNAPSHOT_CHUNKS_MAX,
                "@snap/" + "s" * (limits.SESSION_BYTES_MAX - 6),
                2**63 - 2,
                2**63 - 1,
                2**63 - 1,
            )
        ]
        * protocol.SNAPSHOT_LIST_MAX,
        2**63 - 1,
    ),
    protocol.LeaderTransfer(),
    protocol.LeaderTransfer("n2"),
    protocol.LeaderTransferred(True, "127.0.0.1:7002", "", 40),
    protocol.LeaderTransferred(False, "", "d" * limits.DETAIL_CHARS_MAX, 2**63 - 1),
    protocol.Drain(),
    protocol.Drained(True, "127.0.0.1:7002", ""),
]


def reader_type(frame: msgspec.Struct) -> str:
    return "client" if isinstance(frame, CLIENT_TYPES) else "node"


# --- 1. round trips -----------------------------------------------------------------------


def test_examples_cover_every_frame_type():
    assert {type(f) for f in EXAMPLES} == set(FRAME_TYPES)


@pytest.mark.parametrize("frame", EXAMPLES, ids=lambda f: type(f).__name__)
def test_example_frame_round_trips(frame):
    readers = ["client"] if isinstance(frame, CLIENT_TYPES) else []
    readers += ["node"] if isinstance(frame, NODE_TYPES) else []
    for decoder_type in readers:
        reader = FrameReader(decoder_type)
        out = reader.feed(encode_frame(frame))
        assert out == [frame]
        assert type(out[0]) is type(frame)
        assert reader.buffered_bytes == 0
        assert reader.frames_read == 1
        assert reader.close() is None


@FUZZ
@given(client_frames())
def test_client_frames_round_trip(frame):
    data = encode_frame(frame)
    length, crc = HEADER.unpack_from(data)
    assert length == len(data) - HEADER_BYTES
    assert crc == zlib.crc32(data[HEADER_BYTES:])
    out = read_one(data, "client")
    assert out == [frame] and type(out[0]) is type(frame)


@FUZZ
@given(node_frames())
def test_node_frames_round_trip(frame):
    out = read_one(encode_frame(frame), "node")
    assert out == [frame] and type(out[0]) is type(frame)


@FUZZ
@given(st.builds(Delivered, positive, counts, sessions, positive, payloads))
def test_encode_delivered_is_encode_frame_of_delivered(d):
    data = encode_delivered(d.seq, d.log_time_ns, d.session, d.client_seq, d.payload)
    assert data == encode_frame(d)
    assert decode_delivered_body(data[HEADER_BYTES:]) == d
    assert decode_delivered_body(memoryview(data)[HEADER_BYTES:]) == d


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",
        msgspec.msgpack.encode(["d", 0, 0, "s", 1, b""]),
        encode_frame(Ack(1, 1))[HEADER_BYTES:],
        msgspec.msgpack.encode(["d", 1, 0, "s", 1, b""]).replace(b"\xa1s", b"\xa1\xff"),  # invalid UTF-8
    ],
    ids=["empty", "reserved-byte", "seq-0", "ack", "invalid-utf8"],
)
def test_decode_delivered_body_raises_decode_error_on_garbage(body):
    with pytest.raises(msgspec.DecodeError):
        decode_delivered_body(body)


# --- 2. chunking --------------------------------------------------------------------------

chunkings = st.one_of(
    st.just("one"),
    st.just("bytes"),
    st.lists(st.integers(1, 97), min_size=1, max_size=16),
)


@FUZZ
@given(
    decoder_type=st.sampled_from(["client", "node"]),
    data=st.data(),
    chunking=chunkings,
    chunk_type=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_chunked_stream_yields_same_frames_in_order(decoder_type, data, chunking, chunk_type):
    strategy = client_frames(small_payloads) if decoder_type == "client" else node_frames(small_payloads)
    frames = data.draw(st.lists(strategy, max_size=40))
    stream = b"".join(encode_frame(f) for f in frames)
    reader = FrameReader(decoder_type)
    out = feed_all(reader, [chunk_type(c) for c in split(stream, chunk_sizes(chunking, stream))])
    assert out == frames
    assert [type(f) for f in out] == [type(f) for f in frames]
    assert reader.buffered_bytes == 0
    assert reader.frames_read == len(frames)
    assert reader.close() is None


@SOME
@given(st.lists(client_frames(), min_size=1, max_size=6), st.lists(st.integers(1, 40_000), min_size=1, max_size=5))
def test_chunked_stream_of_large_frames(frames, sizes):
    stream = b"".join(encode_frame(f) for f in frames)
    assert feed_all(FrameReader("client"), split(stream, sizes)) == frames


def test_reader_copies_what_it_keeps_from_a_reused_buffer():
    # A transport may hand the reader the same buffer again and again (BufferedProtocol).
    first, second = Submit(1, b"a" * 100), Submit(2, b"b" * 100)
    stream = encode_frame(first) + encode_frame(second)
    cut = len(encode_frame(first)) + 30
    buffer = bytearray(stream[:cut])
    reader = FrameReader("client")
    assert reader.feed(memoryview(buffer)) == [first]
    buffer[:] = b"\x00" * len(buffer)
    buffer[: len(stream) - cut] = stream[cut:]
    assert reader.feed(memoryview(buffer)[: len(stream) - cut]) == [second]


def test_empty_feed_returns_nothing():
    reader = FrameReader("client")
    assert reader.feed(b"") == []
    assert reader.buffered_bytes == 0
    assert reader.close() is None


# --- 3. garbage ---------------------------------------------------------------------------

ALL_TAGS = [t.__struct_config__.tag for t in FRAME_TYPES]
msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        wire_ints,
        st.floats(allow_nan=False),
        texts(20),
        st.binary(max_size=20),
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts(5), inner, max_size=3),
    max_leaves=10,
)
tagged_garbage = st.builds(
    lambda tag, rest: frame_of_fields(tag, *rest),
    st.one_of(st.sampled_from(ALL_TAGS), msgpack_values),
    st.lists(msgpack_values, max_size=8),
)
flipped_frames = st.builds(
    lambda frame, pos, bit: (lambda b: bytes(b[: pos % len(b)]) + bytes([b[pos % len(b)] ^ (1 << bit)]) + bytes(b[pos % len(b) + 1 :]))(
        encode_frame(frame)
    ),
    st.one_of(client_frames(small_payloads), node_frames(small_payloads)),
    st.integers(0, 10_000),
    st.integers(0, 7),
)


def _refit(frame: msgspec.Struct, pos: int, byte: int) -> bytes:
    """`frame` with one body byte replaced and the checksum made to match again."""
    body = bytearray(encode_frame(frame)[HEADER_BYTES:])
    body[pos % len(body)] = byte
    return frame_of_body(bytes(body))


refitted_frames = st.builds(
    _refit, st.one_of(client_frames(small_payloads), node_frames(small_payloads)), st.integers(0, 10_000), st.integers(0, 255)
)
stream_pieces = st.one_of(
    refitted_frames,  # good crc over a damaged frame: mostly near-valid msgpack
    st.binary(max_size=64),  # raw bytes: mostly bad lengths
    st.builds(frame_of_body, st.binary(min_size=1, max_size=64)),  # good crc over random bytes
    tagged_garbage,  # good crc over msgpack of the wrong shape
    flipped_frames,
    st.builds(encode_frame, client_frames(small_payloads)),
    st.builds(encode_frame, node_frames(small_payloads)),
)


@FUZZ
@given(
    decoder_type=st.sampled_from(["client", "node"]),
    pieces=st.lists(stream_pieces, max_size=8),
    chunking=chunkings,
)
def test_garbage_yields_frames_then_at_most_one_error(decoder_type, pieces, chunking):
    stream = b"".join(pieces)
    frame_types = CLIENT_TYPES if decoder_type == "client" else NODE_TYPES
    reader = FrameReader(decoder_type)
    items = feed_all(reader, split(stream, chunk_sizes(chunking, stream)))
    error = check_stream_contract(items, frame_types)
    assert reader.error == error

    # The outcome does not depend on how the stream was cut.
    assert FrameReader(decoder_type).feed(stream) == items

    if error is not None:
        assert reader.feed(b"more") == [error]
        assert reader.feed(encode_frame(Heartbeat(1))) == [error]
        assert reader.close() == error
        assert reader.feed(b"") == [error]
    else:
        pending = reader.buffered_bytes
        closed = reader.close()
        if pending:
            assert closed is not None and closed.code is FrameErrorCode.TRUNCATED
            assert reader.feed(b"x") == [closed]
        else:
            assert closed is None


def test_zero_length_is_bad_length():
    assert_error(read_one(HEADER.pack(0, 0)), FrameErrorCode.BAD_LENGTH)
    # After good frames, the good frames come first.
    items = read_one(encode_frame(Subscribe(3)) + HEADER.pack(0, zlib.crc32(b"")) + encode_frame(Subscribe(4)))
    assert items[0] == Subscribe(3)
    assert len(items) == 2
    assert_error(items, FrameErrorCode.BAD_LENGTH)


@pytest.mark.parametrize("length", [limits.FRAME_BYTES_MAX + 1, 2**31, 2**32 - 1])
def test_too_large_is_refused_from_the_header_alone(length):
    reader = FrameReader("client")
    header = HEADER.pack(length, 0)
    items = reader.feed(header)  # no body byte sent
    error = assert_error(items, FrameErrorCode.TOO_LARGE)
    assert str(length) in error.detail
    assert reader.buffered_bytes == 0
    assert reader.feed(b"\x00" * 4096) == [error]
    assert reader.buffered_bytes == 0


def test_too_large_header_fed_byte_by_byte():
    reader = FrameReader("client")
    header = encode_frame(Subscribe(1))[HEADER_BYTES:]  # a frame that follows, unread
    stream = encode_frame(Heartbeat(2)) + HEADER.pack(limits.FRAME_BYTES_MAX + 1, 0) + header
    items = feed_all(reader, split(stream, [1]))
    assert items[0] == Heartbeat(2)
    assert_error(items, FrameErrorCode.TOO_LARGE)
    assert reader.buffered_bytes == 0


def test_frame_bytes_max_is_inclusive():
    data = encode_frame(Submit(1, b"p" * 1000))
    body_bytes = len(data) - HEADER_BYTES
    assert FrameReader("client", frame_bytes_max=body_bytes).feed(data) == [Submit(1, b"p" * 1000)]
    assert_error(FrameReader("client", frame_bytes_max=body_bytes - 1).feed(data[:HEADER_BYTES]), FrameErrorCode.TOO_LARGE)
    # The default limit admits the largest legal frame.
    biggest = Delivered(2**63 - 1, 2**63 - 1, "s" * limits.SESSION_BYTES_MAX, 2**63 - 1, b"x" * limits.PAYLOAD_BYTES_MAX)
    assert len(encode_frame(biggest)) - HEADER_BYTES <= limits.FRAME_BYTES_MAX


def test_checksum_mismatch():
    data = bytearray(encode_frame(Submit(5, b"hello")))
    data[-1] ^= 0x01  # body changed
    assert_error(read_one(bytes(data)), FrameErrorCode.CHECKSUM)
    data = bytearray(encode_frame(Submit(5, b"hello")))
    data[5] ^= 0x80  # crc changed
    assert_error(read_one(bytes(data)), FrameErrorCode.CHECKSUM)


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # a byte msgpack never uses
        b"\x92\xa3sub",  # array cut short
        b"\xff\xff\xff",
        msgspec.msgpack.encode(["sub", 1, b"x"]) + b"\x00",  # trailing bytes after the frame
        msgspec.msgpack.encode(["hello", "s", b"\xff", 1]).replace(b"\xc4\x01\xff", b"\xa1\xff"),  # invalid UTF-8
    ],
    ids=["reserved-byte", "cut-short", "ff", "trailing-bytes", "invalid-utf8"],
)
def test_valid_crc_over_non_msgpack_is_malformed(body):
    assert_error(read_one(frame_of_body(body)), FrameErrorCode.MALFORMED)


@pytest.mark.parametrize(
    "fields",
    [
        ["nope", 1],
        ["", 1],
        [1, 1],
        [None],
        ["SUB", 1, b"x"],
        ["ack", 1, 1],  # a node frame sent to a node
    ],
    ids=repr,
)
def test_unknown_tag_is_malformed(fields):
    assert_error(read_one(frame_of_fields(*fields)), FrameErrorCode.MALFORMED)


def test_not_an_array_is_malformed():
    for value in ({"t": "sub", "client_seq": 1, "payload": b"x"}, "sub", 1, None, b"sub"):
        assert_error(read_one(frame_of_body(msgspec.msgpack.encode(value))), FrameErrorCode.MALFORMED)


@pytest.mark.parametrize(
    "fields",
    [
        ["sub", "1", b"x"],
        ["sub", 1, "x"],
        ["sub", 1.0, b"x"],
        ["sub", True, b"x"],
        ["sub", 1],  # missing field
        ["sub"],
        ["subscribe", None],
        ["subscribe", [1]],
        ["hello", 1, "tok", 1],
        ["hello", "s", 5, 1],
        ["hello", "s", "tok", "1"],
        ["hello", "s", "tok", 1, "0"],
        ["hb", -0.5],
    ],
    ids=repr,
)
def test_wrong_field_types_are_malformed(fields):
    assert_error(read_one(frame_of_fields(*fields)), FrameErrorCode.MALFORMED)


@pytest.mark.parametrize(
    "fields",
    [
        ["sub", 0, b"x"],
        ["sub", -1, b"x"],
        ["sub", 2**63, b"x"],
        ["sub", 1, b"x" * (limits.PAYLOAD_BYTES_MAX + 1)],
        ["subscribe", 0],
        ["subscribe", -5],
        ["hb", -1],
        ["hello", "s", "tok", 1, -1],
        ["hello", "s", "t" * (limits.TOKEN_BYTES_MAX + 1), 1],
    ],
    ids=lambda f: repr(f)[:60],
)
def test_out_of_range_values_are_malformed(fields):
    assert_error(read_one(frame_of_fields(*fields)), FrameErrorCode.MALFORMED)


BAD_SESSIONS = [
    "",
    "a b",
    "é",
    "tab\there",
    "semi;colon",
    "a" * (limits.SESSION_BYTES_MAX + 1),
    "alice\n",  # `$` in the pattern also matches before a trailing newline
    "\nalice",
    "bob\r\n",
]


@pytest.mark.parametrize("session", BAD_SESSIONS, ids=repr)
def test_invalid_session_is_malformed(session):
    assert_error(read_one(frame_of_fields("hello", session, "tok", PROTOCOL_VERSION)), FrameErrorCode.MALFORMED)
    assert_error(read_one(frame_of_fields("d", 1, 0, session, 1, b"x"), "node"), FrameErrorCode.MALFORMED)


def test_hello_token_limit_is_in_utf8_bytes():
    # limits.TOKEN_BYTES_MAX is documented in UTF-8 bytes; a token of that many characters
    # that encodes to more bytes is over the limit.
    token = "\u20ac" * limits.TOKEN_BYTES_MAX  # 3 bytes each
    assert len(token.encode()) > limits.TOKEN_BYTES_MAX
    assert_error(read_one(frame_of_fields("hello", "s", token, PROTOCOL_VERSION)), FrameErrorCode.MALFORMED)


@pytest.mark.parametrize("frame", [f for f in EXAMPLES if not isinstance(f, CLIENT_TYPES)], ids=lambda f: type(f).__name__)
def test_node_frame_fed_to_client_reader_is_malformed(frame):
    reader = FrameReader("client")
    items = reader.feed(encode_frame(Subscribe(1)) + encode_frame(frame) + encode_frame(Subscribe(2)))
    assert items[0] == Subscribe(1)
    assert len(items) == 2
    assert_error(items, FrameErrorCode.MALFORMED)
    assert "frame 2" in items[-1].detail


@pytest.mark.parametrize("frame", [f for f in EXAMPLES if not isinstance(f, NODE_TYPES)], ids=lambda f: type(f).__name__)
def test_client_frame_fed_to_node_reader_is_malformed(frame):
    assert_error(read_one(encode_frame(frame), "node"), FrameErrorCode.MALFORMED)


def test_heartbeat_is_read_by_both_readers():
    assert read_one(encode_frame(Heartbeat(4)), "client") == [Heartbeat(4)]
    assert read_one(encode_frame(Heartbeat(4)), "node") == [Heartbeat(4)]


@pytest.mark.parametrize("cut", [1, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 1, -1])
def test_close_inside_a_frame_is_truncated(cut):
    data = encode_frame(Submit(1, b"abcdef"))
    reader = FrameReader("client")
    assert reader.feed(encode_frame(Heartbeat()) + data[:cut]) == [Heartbeat()]
    assert reader.buffered_bytes > 0
    error = reader.close()
    assert error is not None and error.code is FrameErrorCode.TRUNCATED
    assert reader.error == error
    assert reader.feed(data[cut:]) == [error]
    assert reader.close() == error


def test_close_between_frames_is_clean_and_reader_stays_usable():
    reader = FrameReader("node")
    assert reader.feed(encode_frame(Ack(1, 1))) == [Ack(1, 1)]
    assert reader.close() is None
    assert reader.feed(encode_frame(Ack(2, 2))) == [Ack(2, 2)]


def test_error_in_the_middle_keeps_earlier_frames_and_drops_later_ones():
    good = [Submit(i, b"x") for i in range(1, 4)]
    bad = frame_of_fields("sub", 0, b"x")
    stream = b"".join(encode_frame(f) for f in good) + bad + encode_frame(Submit(9, b"y"))
    for sizes in ([len(stream)], [1], [7, 3]):
        reader = FrameReader("client")
        items = feed_all(reader, split(stream, sizes))
        assert items[:3] == good
        assert len(items) == 4
        error = assert_error(items, FrameErrorCode.MALFORMED)
        assert "frame 4" in error.detail
        assert reader.frames_read == 3
        assert reader.buffered_bytes == 0


# --- 4. bounded memory --------------------------------------------------------------------


def test_never_completed_frame_stays_within_bound():
    frame_bytes_max = 8 * limits.MIB
    reader = FrameReader("client", frame_bytes_max=frame_bytes_max)
    assert reader.feed(HEADER.pack(frame_bytes_max, 0)) == []
    chunk = b"\x00" * (64 * limits.KIB)
    sent = 0
    while sent + len(chunk) < frame_bytes_max:
        assert reader.feed(chunk) == []
        sent += len(chunk)
        assert reader.buffered_bytes == HEADER_BYTES + sent
        assert reader.buffered_bytes <= HEADER_BYTES + frame_bytes_max
    assert reader.feed(chunk[: frame_bytes_max - sent - 1]) == []
    assert reader.buffered_bytes == HEADER_BYTES + frame_bytes_max - 1
    error = reader.close()
    assert error is not None and error.code is FrameErrorCode.TRUNCATED


@pytest.mark.parametrize("chunk_bytes", [1000, 49_999, 100_001, 3 * limits.FRAME_BYTES_MAX + 5])
def test_stream_of_largest_frames_stays_within_bound(chunk_bytes):
    frame = Submit(1, b"z" * limits.PAYLOAD_BYTES_MAX)
    data = encode_frame(frame)
    reader = FrameReader("client", frame_bytes_max=len(data) - HEADER_BYTES)
    stream = data * 12
    out = []
    for chunk in split(stream, [chunk_bytes]):
        out += reader.feed(chunk)
        # At most one unfinished frame is held.
        assert reader.buffered_bytes < len(data)
    assert out == [frame] * 12
    assert reader.buffered_bytes == 0


def test_ten_megabyte_chunk_of_small_frames():
    frames, data, size = [], [], 0
    seq = 0
    while size < 10 * limits.MIB:
        seq += 1
        frame = Submit(seq, seq.to_bytes(8, "big") * 12)
        encoded = encode_frame(frame)
        frames.append(frame)
        data.append(encoded)
        size += len(encoded)
    stream = b"".join(data)
    reader = FrameReader("client")
    out = reader.feed(stream)
    assert len(out) == len(frames)
    assert [f.client_seq for f in out] == list(range(1, seq + 1))
    assert out[-1] == frames[-1]
    assert reader.buffered_bytes == 0
    assert reader.frames_read == len(frames)
    assert reader.close() is None


@pytest.mark.parametrize("code", list(FrameErrorCode))
def test_frame_error_as_rejected(code):
    expected = RejectReason.FRAME_TOO_LARGE if code is FrameErrorCode.TOO_LARGE else RejectReason.BAD_FRAME
    short = FrameError(code, "why").as_rejected()
    assert short == Rejected(expected, "why")
    long = FrameError(code, "\u00e9" * (limits.DETAIL_CHARS_MAX * 3)).as_rejected()
    assert long.reason is expected
    assert 0 < len(long.detail) <= limits.DETAIL_CHARS_MAX
    # The rejection passes the peer's own validation.
    for rejected in (short, long):
        assert read_one(encode_frame(rejected), "node") == [rejected]


def test_real_reader_errors_map_to_rejections():
    too_large = FrameReader("client").feed(HEADER.pack(limits.FRAME_BYTES_MAX + 1, 0))[-1]
    assert too_large.as_rejected().reason is RejectReason.FRAME_TOO_LARGE
    malformed = read_one(frame_of_fields("sub", 0, b"x"))[-1]
    assert malformed.as_rejected().reason is RejectReason.BAD_FRAME


# --- 5. schema evolution ------------------------------------------------------------------

NEWER_FIELDS = [[0], ["future", 1.5], [None, [1, 2], {"k": b"v"}, True]]


@pytest.mark.parametrize("extra", NEWER_FIELDS, ids=repr)
@pytest.mark.parametrize("frame", EXAMPLES, ids=lambda f: type(f).__name__)
def test_trailing_fields_from_a_newer_peer_are_ignored(frame, extra):
    data = frame_of_fields(*fields_of(frame), *extra)
    assert read_one(data, reader_type(frame)) == [frame]


@pytest.mark.parametrize(
    "fields, expected",
    [
        (["hello", "s", "tok", 1], Hello("s", "tok", 1, 0)),
        (["ack", 1, 2], Ack(1, 2, False)),
        (["busy", 1, 100], Busy(1, 100, "")),
        (["notleader", "h:1"], NotLeader("h:1", 0)),
        (["rejected", "internal"], Rejected(RejectReason.INTERNAL, "", 0, 0)),
        (["hb"], Heartbeat(0)),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else "",
)
def test_fields_with_defaults_may_be_missing_from_an_older_peer(fields, expected):
    assert read_one(frame_of_fields(*fields), reader_type(expected)) == [expected]


@FUZZ
@given(counts, st.lists(entries, max_size=20))
def test_batch_round_trip(leader_time_ns, batch_entries):
    batch = decode_batch(encode_batch(leader_time_ns, batch_entries))
    assert batch == Batch(BATCH_FORMAT_VERSION, leader_time_ns, batch_entries)


def test_batch_with_trailing_fields_from_a_newer_leader_decodes():
    data = msgspec.msgpack.encode([BATCH_FORMAT_VERSION, 5, [["s", 1, b"a", "new"], ["s", 2, b"b", 7, [1]]], "extra", {}])
    assert decode_batch(data) == Batch(BATCH_FORMAT_VERSION, 5, [Entry("s", 1, b"a"), Entry("s", 2, b"b")])
    fenced = msgspec.msgpack.encode([protocol.BATCH_FORMAT_FENCED, 5, [["s", 1, b"a", 7, True, 9, "new"]], "extra"])
    assert decode_batch(fenced).entries == [protocol.FencedEntry("s", 1, b"a", 7, True, 9)]


def test_fenced_entries_go_in_format_2_and_unfenced_ones_encode_as_before():
    plain = [Entry("s", 1, b"a")]
    assert encode_batch(5, plain) == msgspec.msgpack.encode([1, 5, [["s", 1, b"a"]]])
    assert (plain[0].owner, plain[0].claim) == (0, False)
    fenced = [protocol.FencedEntry("s", 1, b"a", 2**63 - 1, True), protocol.FencedEntry("s", 2, b"b", 3)]
    batch = decode_batch(encode_batch(5, fenced, fenced=True))
    assert (batch.format_version, batch.leader_time_ns, batch.entries) == (protocol.BATCH_FORMAT_FENCED, 5, fenced)
    # Written another way (the version as a uint8), still read with its owners.
    odd = msgspec.msgpack.encode([protocol.BATCH_FORMAT_FENCED, 5, [["s", 1, b"a", 9, True]]]).replace(b"\x93\x02", b"\x93\xcc\x02", 1)
    assert decode_batch(odd).entries == [protocol.FencedEntry("s", 1, b"a", 9, True)]


@pytest.mark.parametrize("version", [0, protocol.BATCH_FORMAT_FENCED + 1, -1, 2**63])
def test_batch_with_other_format_version_is_refused(version):
    data = msgspec.msgpack.encode(Batch(version, 1, [Entry("s", 1, b"x")]))
    with pytest.raises(BatchError, match="version|undecodable"):
        decode_batch(data)


def test_batch_entry_count_limit():
    at_limit = [Entry("s", i, b"") for i in range(1, limits.BATCH_ENTRIES_MAX + 1)]
    assert len(decode_batch(encode_batch(1, at_limit)).entries) == limits.BATCH_ENTRIES_MAX
    over = at_limit + [Entry("s", limits.BATCH_ENTRIES_MAX + 1, b"")]
    with pytest.raises(BatchError, match="entries"):
        decode_batch(encode_batch(1, over))


def batch_of_exact_size(size: int) -> bytes:
    """A valid encoded batch of exactly `size` bytes, of full-size payloads and one smaller one."""
    full = b"f" * limits.PAYLOAD_BYTES_MAX
    count = size // (limits.PAYLOAD_BYTES_MAX + 16)
    last = 1000
    for _ in range(5):
        batch_entries = [Entry("s", i + 1, full) for i in range(count)] + [Entry("s", count + 1, b"l" * last)]
        data = encode_batch(1, batch_entries)
        if len(data) == size:
            return data
        last += size - len(data)
        assert 256 <= last <= limits.PAYLOAD_BYTES_MAX  # keeps the bin header at 3 bytes
    raise AssertionError(f"could not build a batch of {size} bytes")


def test_batch_byte_limit():
    at_limit = batch_of_exact_size(limits.BATCH_BYTES_MAX)
    assert len(decode_batch(at_limit).entries) > 1
    over = batch_of_exact_size(limits.BATCH_BYTES_MAX + 1)
    with pytest.raises(BatchError, match="bytes"):
        decode_batch(over)
    with pytest.raises(BatchError):
        decode_batch(memoryview(over))


@pytest.mark.parametrize(
    "value",
    [
        [BATCH_FORMAT_VERSION, -1, []],
        [BATCH_FORMAT_VERSION, 1, [["s", 0, b"x"]]],
        [BATCH_FORMAT_VERSION, 1, [["", 1, b"x"]]],
        [BATCH_FORMAT_VERSION, 1, [["s" * (limits.SESSION_BYTES_MAX + 1), 1, b"x"]]],
        [BATCH_FORMAT_VERSION, 1, [["s", 1, b"x" * (limits.PAYLOAD_BYTES_MAX + 1)]]],
        [BATCH_FORMAT_VERSION, 1, [["s", 1, "text"]]],
        [BATCH_FORMAT_VERSION, 1, [[b"\xff\xfe", 1, b"x"]]],  # becomes a str of invalid UTF-8 below
        [BATCH_FORMAT_VERSION, 1, None],
        [BATCH_FORMAT_VERSION, 1],
        {"format_version": BATCH_FORMAT_VERSION},
    ],
    ids=lambda v: repr(v)[:50],
)
def test_invalid_batch_is_refused(value):
    data = msgspec.msgpack.encode(value).replace(b"\xc4\x02\xff\xfe", b"\xa2\xff\xfe")  # bin -> str
    with pytest.raises(BatchError):
        decode_batch(data)


def test_entry_session_pattern_is_left_to_the_machine():
    """Decoding a batch checks a session name's length only; ``is_session_name`` checks the rest."""
    batch = decode_batch(msgspec.msgpack.encode([BATCH_FORMAT_VERSION, 1, [["s\n", 1, b"x"]]]))
    assert batch.entries[0].session == "s\n"
    assert not protocol.is_session_name("s\n")
    assert not protocol.is_session_name("")
    assert not protocol.is_session_name("é")
    assert not protocol.is_session_name("s" * (limits.SESSION_BYTES_MAX + 1))
    assert protocol.is_session_name("s" * limits.SESSION_BYTES_MAX)
    assert protocol.is_session_name("oms-1/a:b@c+d.e_f")


def assert_decodes_or_batch_error(data: bytes) -> None:
    try:
        batch = decode_batch(data)
    except BatchError:
        return
    assert isinstance(batch, Batch)
    assert batch.format_version == BATCH_FORMAT_VERSION
    assert len(batch.entries) <= limits.BATCH_ENTRIES_MAX


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.builds(msgspec.msgpack.encode, msgpack_values)))
def test_garbage_batch_is_batch_error_only(data):
    assert_decodes_or_batch_error(data)


@FUZZ
@given(st.lists(entries, min_size=1, max_size=5), st.integers(0, 10_000), st.integers(0, 255))
def test_damaged_batch_is_batch_error_only(batch_entries, pos, byte):
    data = bytearray(encode_batch(7, batch_entries))
    data[pos % len(data)] = byte
    assert_decodes_or_batch_error(bytes(data))
    assert_decodes_or_batch_error(bytes(data[: pos % len(data)]))


@FUZZ
@given(st.lists(msgpack_values, max_size=4), st.lists(st.lists(msgpack_values, max_size=5), max_size=3))
def test_batch_shaped_garbage_is_batch_error_only(head, entry_values):
    assert_decodes_or_batch_error(msgspec.msgpack.encode([BATCH_FORMAT_VERSION, *head]))
    assert_decodes_or_batch_error(msgspec.msgpack.encode([BATCH_FORMAT_VERSION, 1, entry_values]))


# --- 6. constructor -----------------------------------------------------------------------


@pytest.mark.parametrize("decoder_type", ["", "Client", "NODE", "both", "server", None, 1])
def test_reader_refuses_unknown_decoder_type(decoder_type):
    with pytest.raises(ValueError):
        FrameReader(decoder_type)


@pytest.mark.parametrize("frame_bytes_max", [0, -1, -(2**40), 2**31 + 1, 2**40])
def test_reader_refuses_bad_frame_bytes_max(frame_bytes_max):
    with pytest.raises(ValueError):
        FrameReader("client", frame_bytes_max=frame_bytes_max)


@pytest.mark.parametrize("frame_bytes_max", [1, HEADER_BYTES, limits.FRAME_BYTES_MAX, 2**31])
def test_reader_accepts_frame_bytes_max_in_range(frame_bytes_max):
    reader = FrameReader("node", frame_bytes_max=frame_bytes_max)
    assert reader.frame_bytes_max == frame_bytes_max
    assert reader.buffered_bytes == 0 and reader.error is None and reader.frames_read == 0


@given(st.integers(1, 2**63 - 1), counts, sessions, positive, small_payloads)
def test_delivered_seq_reads_the_number_without_decoding(seq, log_time, session, client_seq, payload):
    frame = encode_delivered(seq, log_time, session, client_seq, payload)
    assert protocol.delivered_seq(frame, HEADER_BYTES) == seq
    assert protocol.delivered_seq(b"xx" + frame, HEADER_BYTES + 2) == seq


@pytest.mark.parametrize("frame", [Ack(1, 2), Heartbeat(5), Subscribe(9)], ids=lambda f: type(f).__name__)
def test_delivered_seq_of_another_frame_is_minus_one(frame):
    assert protocol.delivered_seq(encode_frame(frame), HEADER_BYTES) == -1
    assert protocol.delivered_seq(b"\x96\xa1d", 0) == -1  # cut short


@pytest.mark.parametrize(
    "fields",
    [
        ["subs", 1, []],  # no payloads
        ["subs", 1, [b"x"] * (limits.SUBMIT_BATCH_ENTRIES_MAX + 1)],
        ["subs", 0, [b"x"]],
        ["subs", 1, [b"x" * (limits.PAYLOAD_BYTES_MAX + 1)]],
    ],
    ids=["empty", "too-many", "client-seq-0", "payload-too-large"],
)
def test_bad_submit_batch_is_malformed(fields):
    body = msgspec.msgpack.encode(fields)
    data = HEADER.pack(len(body), zlib.crc32(body)) + body
    items = FrameReader("client", frame_bytes_max=len(body) + 1).feed(data)
    assert len(items) == 1 and isinstance(items[0], FrameError) and items[0].code is FrameErrorCode.MALFORMED


@pytest.mark.parametrize("count", [0, limits.BATCH_ENTRIES_MAX + 1])
def test_bad_ack_range_is_malformed(count):
    items = FrameReader("node").feed(encode_frame_unchecked(["acks", 1, 1, count]))
    assert len(items) == 1 and isinstance(items[0], FrameError) and items[0].code is FrameErrorCode.MALFORMED


def encode_frame_unchecked(fields: list) -> bytes:
    body = msgspec.msgpack.encode(fields)
    return HEADER.pack(len(body), zlib.crc32(body)) + body


@given(payloads=st.lists(st.binary(max_size=300), max_size=8))
def test_payload_digests_are_blake2b_64_with_the_top_bit_dropped_and_the_lowest_set(payloads):
    """The digest is part of the formats (sent by clients, kept in machine snapshots): however
    it is computed, it is this."""
    expected = [int.from_bytes(hashlib.blake2b(p, digest_size=8).digest(), "little") >> 1 | 1 for p in payloads]
    assert [protocol.payload_digest(p) for p in payloads] == expected
    assert protocol.payload_digests(payloads) == expected
    assert protocol.payload_digest(b"") == 0x5A593CBA2BD05373  # a fixed value: the definition cannot drift


def test_a_run_of_delivered_records_is_the_records_one_by_one():
    payloads = [b"", b"a", b"x" * 300]
    run = protocol.encode_delivered_run(2**40, 7, "s", 9, payloads)
    assert run == [protocol.encode_delivered(2**40 + i, 7, "s", 9 + i, p) for i, p in enumerate(payloads)]
    assert protocol.encode_delivered_run(1, 7, "s", 1, []) == []
