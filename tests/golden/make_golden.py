"""Writes the golden compatibility fixture: bytes produced by raftseq 0.1 that every later
version must read, verify and serve byte for byte (``tests/test_golden_compat.py``).

The fixture in ``tests/golden/v0.1/`` was written by this script at commit f156cf3 (the commit
before issue 12's refactor) and is never regenerated: it is the old version's output. The test
also runs ``write_golden`` with the current code into a temporary directory and compares, so
the current writer still produces the same bytes. Run by hand only to add a new version::

    python tests/golden/make_golden.py tests/golden/v0.2

What it writes:

- ``frames/<Name>.bin``: one encoded frame of every client-protocol message type (``frames()``
  holds the values);
- ``payloads/<Name>.bin``: the state-machine SDK's payload formats (``payloads()``);
- ``batches.bin``: the Raft log entries (``Batch``) applied to build the journal, each
  prefixed by its length (u32, big-endian);
- ``machine.snapshot``: the machine's snapshot after applying them (sessions, dedup windows,
  a state-machine snapshot index with one complete upload);
- ``journal/``: the journal they produced, in segments of the smallest size (sealed segments
  with their index files, and an open tail segment).
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys

import msgspec

from raftseq.clients.sm import formats
from raftseq.sequencer import limits, protocol
from raftseq.sequencer.journal import Journal
from raftseq.sequencer.machine import SequencerMachine
from raftseq.sequencer.stream import SequencedStream

#: Log time of the first batch; each later batch is one microsecond later.
LOG_TIME_START_NS = 1_700_000_000_000_000_000
#: Messages in the journal (besides the snapshot upload's chunks).
MESSAGES = 400
SESSIONS = ("alpha", "beta", "gamma")
SNAPSHOT_SESSION = protocol.SNAPSHOT_SESSION_PREFIX + "orders/replica-1"
SNAPSHOT_DATA = bytes(range(256)) * 40
SNAPSHOT_CHUNK_BYTES = 4_000
SHA = "ab" * 32


def snapshot_info() -> protocol.SnapshotInfo:
    return protocol.SnapshotInfo("orders", 2, 120, "c0ffee", SHA, 10_240, 3, SNAPSHOT_SESSION, 121, 123, LOG_TIME_START_NS + 5)


def frames() -> dict[str, object]:
    """One value of every client-protocol frame type, by class name."""
    return {
        "Hello": protocol.Hello("alpha", "secret token", protocol.PROTOCOL_VERSION, 17),
        "Submit": protocol.Submit(18, b"\x00payload\xff"),
        "SubmitBatch": protocol.SubmitBatch(19, [b"one", b"", b"three" * 100]),
        "Subscribe": protocol.Subscribe(4_000_000_000),
        "StatusRequest": protocol.StatusRequest(),
        "Heartbeat": protocol.Heartbeat(123_456),
        "Welcome": protocol.Welcome("n1", protocol.PROTOCOL_VERSION, protocol.Role.FOLLOWER, "127.0.0.1:7001", 17, 1000),
        "Ack": protocol.Ack(18, 300, True),
        "AckRange": protocol.AckRange(19, 301, 3),
        "Busy": protocol.Busy(22, 50, "in_flight_per_session"),
        "NotLeader": protocol.NotLeader("127.0.0.1:7002", 23),
        "OutcomeUnknown": protocol.OutcomeUnknown(24, "leader lost"),
        "Rejected": protocol.Rejected(protocol.RejectReason.SEQUENCE_GAP, "client_seq 30 skips ahead", 30, 25),
        "Delivered": protocol.Delivered(2**40, LOG_TIME_START_NS, "gamma", 2**33, b"delivered payload"),
        "Status": protocol.Status(
            "n2",
            protocol.Role.LEADER,
            "127.0.0.1:7002",
            7,
            9_001,
            8_800,
            LOG_TIME_START_NS,
            4242,
            "127.0.0.1:7002",
            "127.0.0.1:8002",
            "127.0.0.1:9102",
        ),
        "SnapshotQuery": protocol.SnapshotQuery("orders"),
        "SnapshotList": protocol.SnapshotList("orders", [snapshot_info()], 9_000),
    }


def payloads() -> dict[str, object]:
    """One value of each state-machine SDK payload format, by class name."""
    return {
        "SnapshotChunk": protocol.SnapshotChunk("orders", 2, 120, "c0ffee", SHA, 10_240, 3, 1, b"chunk data"),
        "SmEnvelope": formats.SmEnvelope("orders.NewOrder", 3, msgspec.Raw(b"\x92\x01\xa3abc")),
        "Checkpoint": formats.Checkpoint("orders", 500, "deadbeef", "replica-2"),
        "Activate": formats.Activate("orders", 4, 600),
    }


def encode_payload(name: str, value: object) -> bytes:
    if name == "SnapshotChunk":
        return protocol.encode_snapshot_chunk(value)
    if name == "Checkpoint":
        return formats.encode_checkpoint(value)
    if name == "Activate":
        return formats.encode_activate(value)
    return formats.encode_sm_message(value.type, value.version, bytes(value.body))


def batches() -> list[bytes]:
    """The Raft log entries the journal is built from: three sessions with payloads of varying
    size, a retry (deduplicated), and one complete state-machine snapshot upload."""
    out = []
    next_client_seq = dict.fromkeys(SESSIONS, 1)
    t = LOG_TIME_START_NS
    i = 0
    sequenced = 0
    while sequenced < MESSAGES:
        entries = []
        for _ in range(min(1 + i % 9, MESSAGES - sequenced)):
            session = SESSIONS[i % 3]
            entries.append(protocol.Entry(session, next_client_seq[session], bytes([65 + i % 26]) * (i * 7 % 61)))
            next_client_seq[session] += 1
            i += 1
        sequenced += len(entries)
        if len(out) == 5:
            entries.append(entries[0])  # a retry inside the same batch: answered, not sequenced
        t += 1_000
        out.append(protocol.encode_batch(t, entries))
        if len(out) == 20:
            out.append(protocol.encode_batch(t, _snapshot_upload(covered_seq=sequenced)))
    return out


def _snapshot_upload(*, covered_seq: int) -> list[protocol.Entry]:
    pieces = [SNAPSHOT_DATA[i : i + SNAPSHOT_CHUNK_BYTES] for i in range(0, len(SNAPSHOT_DATA), SNAPSHOT_CHUNK_BYTES)]
    sha = hashlib.sha256(SNAPSHOT_DATA).hexdigest()
    return [
        protocol.Entry(
            SNAPSHOT_SESSION,
            index + 1,
            protocol.encode_snapshot_chunk(
                protocol.SnapshotChunk("orders", 2, covered_seq, "c0ffee", sha, len(SNAPSHOT_DATA), len(pieces), index, piece)
            ),
        )
        for index, piece in enumerate(pieces)
    ]


def write_golden(directory: str) -> None:
    for sub in ("frames", "payloads", "journal"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    for name, value in frames().items():
        _write(os.path.join(directory, "frames", name + ".bin"), protocol.encode_frame(value))
    for name, value in payloads().items():
        _write(os.path.join(directory, "payloads", name + ".bin"), encode_payload(name, value))
    entries = batches()
    _write(os.path.join(directory, "batches.bin"), b"".join(struct.pack(">I", len(b)) + b for b in entries))
    journal = Journal.open(os.path.join(directory, "journal"), segment_bytes_max=limits.SEGMENT_BYTES_MIN)
    stream = SequencedStream(SequencerMachine(), journal)
    for batch in entries:
        result = stream.apply(batch)
        if result.error:
            raise SystemExit(f"batch not applied: {result.error}")
    journal.close()
    _write(os.path.join(directory, "machine.snapshot"), stream.machine.snapshot())


def read_batches(data: bytes) -> list[bytes]:
    out = []
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        out.append(data[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return out


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


if __name__ == "__main__":
    if len(sys.argv) != 2 or os.path.exists(sys.argv[1]):
        raise SystemExit("usage: make_golden.py NEW_DIRECTORY")
    write_golden(sys.argv[1])
