"""Compatibility with raftseq 0.1: frames, Raft entries, a machine snapshot and a journal
written by the commit before issue 12 (``tests/golden/v0.1``, made by
``tests/golden/make_golden.py``) are read, verified and served byte for byte by this code.

A version N must work with peers and clients of N-1 (DESIGN §8): a failure here means a wire
or file format changed.
"""

from __future__ import annotations

import filecmp
import importlib.util
import os
import shutil

import msgspec
import pytest

from raftseq.clients.sm import formats
from raftseq.sequencer import limits, protocol
from raftseq.sequencer.journal import Journal, verify_journal
from raftseq.sequencer.machine import SNAPSHOT_FORMAT_VERSION, Outcome, SequencerMachine

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "v0.1")
RECORDS = 403  # 400 messages and a snapshot upload of three chunks
CLIENT_FRAMES = {"Hello", "Submit", "SubmitBatch", "Subscribe", "StatusRequest", "Heartbeat", "SnapshotQuery"}


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_golden", os.path.join(os.path.dirname(__file__), "golden", "make_golden.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


golden = _load_generator()


def read(*parts: str) -> bytes:
    with open(os.path.join(GOLDEN, *parts), "rb") as f:
        return f.read()


def segment_files() -> list[str]:
    directory = os.path.join(GOLDEN, "journal")
    return sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".seg"))


def journal_bytes() -> bytes:
    parts = []
    for path in segment_files():
        with open(path, "rb") as f:
            parts.append(f.read())
    return b"".join(parts)


def split_records(data: bytes) -> list[bytes]:
    out = []
    pos = 0
    while pos < len(data):
        end = pos + protocol.HEADER_BYTES + protocol.HEADER.unpack_from(data, pos)[0]
        out.append(data[pos:end])
        pos = end
    return out


@pytest.fixture
def journal_copy(tmp_path):
    directory = tmp_path / "journal"
    shutil.copytree(os.path.join(GOLDEN, "journal"), directory)
    return str(directory)


# --- frames and payloads ------------------------------------------------------------------


#: Frame types newer than the fixture, which 0.1 never sent: ``Truncated`` answers only a
#: ``Subscribe`` that says it knows it (0.3, retention); a 0.1 or 0.2 node answers the requests of
#: ``raftseq member``, ``leader transfer`` and ``node drain`` with ``Rejected(bad_frame)``
#: (tests/test_protocol.py round-trips them; the commands say so: test_leader_transfer.py).
FRAMES_AFTER_FIXTURE = {"Truncated", "MemberRequest", "MemberReply", "LeaderTransfer", "LeaderTransferred", "Drain", "Drained"}


def test_the_fixture_covers_every_frame_type():
    frame_types = set(protocol.ClientFrame.__args__) | set(protocol.NodeFrame.__args__)
    assert {t.__name__ for t in frame_types} - FRAMES_AFTER_FIXTURE == set(golden.frames())
    assert set(golden.frames()) == {name[: -len(".bin")] for name in os.listdir(os.path.join(GOLDEN, "frames"))}


#: Frames that gained trailing fields since 0.1: name -> the new fields' values by default.
#: (``Hello``: ``owner`` and ``snapshot_publisher``, session fencing; ``Submit``/``SubmitBatch``:
#: the payload digests the client computed; ``Welcome``: the node's dedup window; ``Subscribe``:
#: ``truncated_known``, ``Status``: ``journal_needs_from``, retention.)
GROWN_FRAMES = {"Hello": [0, False], "Submit": [0], "SubmitBatch": [[]], "Welcome": [0], "Subscribe": [False], "Status": [0]}


@pytest.mark.parametrize("name", sorted(golden.frames()))
def test_frames_decode_to_the_same_values_and_reencode_identically(name):
    data = read("frames", name + ".bin")
    reader = protocol.FrameReader("client" if name in CLIENT_FRAMES else "node")
    [frame] = reader.feed(data)
    assert frame == golden.frames()[name]
    assert type(frame).__name__ == name
    if name in GROWN_FRAMES:
        # The old fields as they were, then the new ones with their defaults (an old reader
        # ignores trailing fields it does not know).
        old_body = msgspec.msgpack.decode(data[8:])
        assert msgspec.msgpack.decode(protocol.encode_frame(frame)[8:]) == old_body + GROWN_FRAMES[name]
        return
    assert protocol.encode_frame(frame) == data
    assert protocol.encode_frame(golden.frames()[name]) == data


def test_delivered_frame_encodes_the_same_through_the_fast_path():
    data = read("frames", "Delivered.bin")
    d = golden.frames()["Delivered"]
    assert protocol.encode_delivered(d.seq, d.log_time_ns, d.session, d.client_seq, d.payload) == data
    assert protocol.decode_delivered_body(data[protocol.HEADER_BYTES :]) == d
    assert protocol.delivered_seq(data, protocol.HEADER_BYTES) == d.seq


def test_state_machine_payloads_decode_and_reencode_identically():
    values = golden.payloads()
    assert set(values) == {name[: -len(".bin")] for name in os.listdir(os.path.join(GOLDEN, "payloads"))}
    chunk = read("payloads", "SnapshotChunk.bin")
    assert protocol.decode_snapshot_chunk(chunk) == values["SnapshotChunk"]
    assert protocol.encode_snapshot_chunk(values["SnapshotChunk"]) == chunk
    envelope = formats.decode_sm_envelope(read("payloads", "SmEnvelope.bin"))
    assert (envelope.type, envelope.version, bytes(envelope.body)) == ("orders.NewOrder", 3, bytes(values["SmEnvelope"].body))
    for name, decode in (("Checkpoint", formats.decode_checkpoint), ("Activate", formats.decode_activate)):
        data = read("payloads", name + ".bin")
        assert decode(formats.decode_sm_envelope(data)) == values[name]
        assert golden.encode_payload(name, values[name]) == data
    assert golden.encode_payload("SmEnvelope", envelope) == read("payloads", "SmEnvelope.bin")


# --- Raft entries and the machine snapshot ----------------------------------------------------


def test_raft_batches_decode_and_reencode_identically():
    entries = golden.read_batches(read("batches.bin"))
    assert entries == golden.batches()
    for data in entries:
        batch = protocol.decode_batch(data)
        assert batch.format_version == protocol.BATCH_FORMAT_VERSION
        assert protocol.encode_batch(batch.leader_time_ns, batch.entries) == data


def as_format_2(snapshot: bytes) -> list:
    """A snapshot of this version as the previous format (2) holds it: no payload digests or
    owners in the sessions, the config without the table's byte bound and eviction age."""
    snap = msgspec.msgpack.decode(snapshot)
    assert snap[0] == SNAPSHOT_FORMAT_VERSION == 3
    return [2, snap[1][:3], *snap[2:5], [session[:4] for session in snap[5]], *snap[6:]]


def test_machine_snapshot_of_the_previous_format_restores_to_the_same_state():
    """The golden snapshot is format 2 (no digests, no owners): it restores, and the state is
    the same; its windows' digests are unknown (0), so retries of those submits are answered as
    duplicates whatever their payload, as 0.1 answered them."""
    data = read("machine.snapshot")
    assert msgspec.msgpack.decode(data)[0] == 2
    machine = SequencerMachine.restore(data)
    assert as_format_2(machine.snapshot()) == msgspec.msgpack.decode(data)
    sessions = msgspec.msgpack.decode(machine.snapshot())[5]
    assert all(set(session[4]) == {0} and session[5] == 0 for session in sessions)
    assert machine.last_seq == RECORDS
    assert machine.session_count == 4
    assert machine.last_client_seq("alpha") == 134
    [info] = machine.snapshots_of("orders")
    assert (info.chunk_count, info.first_seq, info.last_seq, info.session) == (3, 85, 87, golden.SNAPSHOT_SESSION)
    retry = machine.apply(protocol.encode_batch(golden.LOG_TIME_START_NS + 10**12, [protocol.Entry("alpha", 134, b"not the payload")]))
    assert [r.outcome for r in retry.results] == [Outcome.DUPLICATE]


def test_replaying_the_batches_gives_the_same_state_and_journal(tmp_path):
    """The current machine and journal, fed the old Raft entries, write the old bytes; the
    machine's snapshot is of the new format and holds the same state (plus the digests)."""
    golden.write_golden(str(tmp_path / "now"))
    compare = filecmp.dircmp(GOLDEN, str(tmp_path / "now"))
    assert compare.diff_files == ["machine.snapshot"] and not compare.left_only and not compare.right_only
    for sub in ("frames", "payloads", "journal"):
        names = sorted(os.listdir(os.path.join(GOLDEN, sub)))
        assert names == sorted(os.listdir(tmp_path / "now" / sub))
        _, mismatch, errors = filecmp.cmpfiles(os.path.join(GOLDEN, sub), str(tmp_path / "now" / sub), names, shallow=False)
        # Hello gained trailing fields (GROWN_FRAMES): its bytes are checked above.
        assert sorted(mismatch) == (sorted(f"{name}.bin" for name in GROWN_FRAMES) if sub == "frames" else []) and errors == []
    replayed = (tmp_path / "now" / "machine.snapshot").read_bytes()
    assert as_format_2(replayed) == msgspec.msgpack.decode(read("machine.snapshot"))


# --- the journal ------------------------------------------------------------------------------


def test_the_journal_verifies():
    report = verify_journal(os.path.join(GOLDEN, "journal"))
    assert report.ok, report.problem
    assert (report.first_seq, report.last_seq, report.records, report.segments) == (1, RECORDS, RECORDS, len(segment_files()))
    assert report.bytes == len(journal_bytes())


def test_the_journal_opens_without_cutting_anything(journal_copy):
    before = {name: (open(os.path.join(journal_copy, name), "rb").read()) for name in os.listdir(journal_copy)}
    with Journal.open(journal_copy, segment_bytes_max=limits.SEGMENT_BYTES_MIN) as journal:
        assert journal.recovery.bytes_cut == 0
        assert (journal.first_seq, journal.last_seq, journal.holes) == (1, RECORDS, [])
        assert journal.segment_count == len(segment_files())
    after = {name: (open(os.path.join(journal_copy, name), "rb").read()) for name in os.listdir(journal_copy)}
    assert after == before


def test_every_record_reads_back_byte_identically_from_any_number():
    records = split_records(journal_bytes())
    assert len(records) == RECORDS
    with Journal.open(os.path.join(GOLDEN, "journal"), readonly=True) as journal:
        assert journal.read_bytes(1, RECORDS) == journal_bytes()
        for seq in range(1, RECORDS + 1):
            with journal.cursor(seq) as cursor:
                assert cursor.read_frames(RECORDS, 1) == [records[seq - 1]]
        decoded = list(journal.records())
    assert [d.seq for d in decoded] == list(range(1, RECORDS + 1))
    for raw, record in zip(records, decoded):
        assert protocol.encode_frame(record) == raw
        assert protocol.encode_delivered(record.seq, record.log_time_ns, record.session, record.client_seq, record.payload) == raw


def test_a_subscriber_is_served_the_old_bytes():
    """What the gateway sends a subscriber is the journal's blocks: the old records, byte for
    byte, which a client's frame reader decodes to the records."""
    served = []
    with Journal.open(os.path.join(GOLDEN, "journal"), readonly=True) as journal, journal.cursor(1) as cursor:
        while cursor.next_seq <= RECORDS:
            count, block = cursor.read_block(RECORDS, 4 * limits.KIB)
            assert count > 0
            served.append(block)
        expected = list(journal.records())
    assert b"".join(served) == journal_bytes()
    reader = protocol.FrameReader("node", keep_raw=True)
    frames = [item for block in served for item in reader.feed(block)]
    assert [frame for frame, _ in frames] == expected
    assert [raw for _, raw in frames] == split_records(journal_bytes())


# --- a node of 0.1 and a client of this version ------------------------------------------------


class _HelloOf01(msgspec.Struct, frozen=True, array_like=True, tag_field="t", tag="hello"):
    """``Hello`` as raftseq 0.1 declared it (the golden frame is its encoding)."""

    session: str
    token: str
    protocol_version: int
    last_client_seq_acked: int = 0


def test_a_node_of_0_1_reads_the_hello_of_a_fencing_client():
    """A client of this version says hello with an owner; a 0.1 node reads the fields it knows
    (it does not fence, and never sends the new reasons)."""
    old = golden.frames()["Hello"]
    assert msgspec.msgpack.decode(read("frames", "Hello.bin")[8:], type=_HelloOf01) == _HelloOf01(
        old.session, old.token, old.protocol_version, old.last_client_seq_acked
    )
    body = protocol.encode_frame(protocol.Hello("desk", "token", protocol.PROTOCOL_VERSION, 7, 2**63 - 1, True))[8:]
    assert msgspec.msgpack.decode(body, type=_HelloOf01) == _HelloOf01("desk", "token", protocol.PROTOCOL_VERSION, 7)


class _WelcomeOf01(msgspec.Struct, frozen=True, array_like=True, tag_field="t", tag="welcome"):
    """``Welcome`` as raftseq 0.1 declared it."""

    node_id: str
    protocol_version: int
    role: protocol.Role
    leader: str
    last_client_seq: int
    heartbeat_interval_ms: int


def test_a_client_of_0_1_reads_the_welcome_that_names_the_dedup_window():
    welcome = protocol.Welcome("n1", protocol.PROTOCOL_VERSION, protocol.Role.LEADER, "127.0.0.1:7101", 9, 500, 4096)
    body = protocol.encode_frame(welcome)[8:]
    assert msgspec.msgpack.decode(body, type=_WelcomeOf01) == _WelcomeOf01(
        "n1", protocol.PROTOCOL_VERSION, protocol.Role.LEADER, "127.0.0.1:7101", 9, 500
    )
