"""The machine's state-machine snapshot index: chunks from snapshot sessions become index
entries, deterministically, bounded, snapshotted and restored strictly — and ordinary traffic
is numbered exactly as before.
"""

from __future__ import annotations

import hashlib

import msgspec
import pytest

from raftseq.sequencer import protocol
from raftseq.sequencer.machine import (
    SM_SNAPSHOT_KINDS_MAX,
    SM_SNAPSHOT_UPLOADS_MAX,
    SM_SNAPSHOTS_PER_KIND,
    MachineSnapshot,
    SequencerMachine,
    SnapshotError,
    SnapshotUpload,
)

SECOND = 1_000_000_000
PREFIX = protocol.SNAPSHOT_SESSION_PREFIX


class Feeder:
    """One machine and the client_seq of every session, one verb per action."""

    def __init__(self, machine: SequencerMachine | None = None) -> None:
        self.machine = machine or SequencerMachine()
        self.client_seqs: dict[str, int] = {}
        self.time_ns = 10 * SECOND

    def batch(self, *entries: tuple[str, bytes]) -> list[int]:
        """Apply one batch of ``(session, payload)``; returns the sequence numbers given."""
        out = []
        for session, _ in entries:
            self.client_seqs[session] = self.client_seqs.get(session, 0) + 1
            out.append(self.client_seqs[session])
        self.time_ns += SECOND
        batch = protocol.encode_batch(self.time_ns, [protocol.Entry(s, c, p) for (s, p), c in zip(entries, out)])
        result = self.machine.apply(batch)
        assert not result.error
        return [r.seq for r in result.results]

    def traffic(self, count: int, session: str = "oms") -> list[int]:
        return self.batch(*[(session, b"order %d" % i) for i in range(count)])

    def publish(self, session: str, data: bytes, *, sm_type="refdata", version=1, covered=None, chunk=10, interleave=0) -> list[int]:
        """Publish `data` as chunks of `chunk` bytes, one batch each, with `interleave`
        ordinary messages between chunks. Returns the chunks' numbers."""
        covered = self.machine.last_seq if covered is None else covered
        chunks = chunk_payloads(data, sm_type=sm_type, version=version, covered=covered, chunk=chunk)
        seqs = []
        for payload in chunks:
            seqs += self.batch((session, payload))
            if interleave:
                self.traffic(interleave)
        return seqs


def chunk_payloads(data: bytes, *, sm_type="refdata", version=1, covered=1, chunk=10, digest="ab" * 32) -> list[bytes]:
    count = max(1, -(-len(data) // chunk))
    sha = hashlib.sha256(data).hexdigest()
    return [
        protocol.encode_snapshot_chunk(
            protocol.SnapshotChunk(sm_type, version, covered, digest, sha, len(data), count, i, data[i * chunk : (i + 1) * chunk])
        )
        for i in range(count)
    ]


def test_a_complete_upload_is_indexed_with_where_its_chunks_are():
    f = Feeder()
    f.traffic(5)
    seqs = f.publish(PREFIX + "refdata/r1", b"x" * 35, interleave=2)
    [info] = f.machine.snapshots_of("refdata")
    assert (info.first_seq, info.last_seq, info.chunk_count, info.total_bytes) == (seqs[0], seqs[-1], 4, 35)
    assert (info.sm_type, info.schema_version, info.covered_seq, info.session) == ("refdata", 1, 5, PREFIX + "refdata/r1")
    assert info.bytes_sha256 == hashlib.sha256(b"x" * 35).hexdigest()
    assert f.machine.snapshots_of("other") == [] and f.machine.snapshot_uploads == []


def test_chunks_are_sequenced_and_journaled_like_any_message():
    plain, indexed = Feeder(), Feeder()
    data = chunk_payloads(b"y" * 25, covered=1)
    for feeder in (plain, indexed):
        feeder.traffic(1)
    # The same payloads from an ordinary session and from a snapshot session: same numbers.
    a = [plain.batch(("plain-session", p))[0] for p in data]
    b = [indexed.batch((PREFIX + "t/r", p))[0] for p in data]
    assert a == b and plain.machine.last_seq == indexed.machine.last_seq
    assert plain.machine.snapshots_of("refdata") == [] and len(indexed.machine.snapshots_of("refdata")) == 1


def test_the_latest_few_per_kind_are_kept_newest_first_and_versions_separately():
    f = Feeder()
    for n in range(SM_SNAPSHOTS_PER_KIND + 2):
        f.traffic(3)
        f.publish(PREFIX + "refdata/r1", b"v1-%d" % n)
    f.traffic(3)
    f.publish(PREFIX + "refdata/r2", b"v2", version=2)
    infos = f.machine.snapshots_of("refdata")
    v1 = [i for i in infos if i.schema_version == 1]
    assert len(v1) == SM_SNAPSHOTS_PER_KIND
    assert [i.covered_seq for i in infos] == sorted((i.covered_seq for i in infos), reverse=True)
    assert infos[0].schema_version == 2 and infos[0].session == PREFIX + "refdata/r2"
    assert min(i.covered_seq for i in v1) > 3 * 2  # the two oldest went


@pytest.mark.parametrize(
    "break_it",
    ["garbage_chunk", "skipped_chunk", "changed_header", "covered_not_below_own_seq", "too_many_bytes"],
)
def test_an_upload_that_does_not_fit_together_is_abandoned(break_it):
    f = Feeder()
    f.traffic(2)
    session = PREFIX + "refdata/r1"
    chunks = chunk_payloads(b"z" * 30, covered=2)
    f.batch((session, chunks[0]))
    if break_it == "garbage_chunk":
        f.batch((session, b"not a chunk"))
        rest = chunks[1:]
    elif break_it == "skipped_chunk":
        rest = chunks[2:]
    elif break_it == "changed_header":
        rest = chunk_payloads(b"z" * 30, covered=2, digest="cd" * 32)[1:]
    elif break_it == "too_many_bytes":
        chunk = msgspec.msgpack.decode(chunks[1], type=protocol.SnapshotChunk)
        rest = [protocol.encode_snapshot_chunk(msgspec.structs.replace(chunk, data=b"z" * 40)), *chunks[2:]]
    else:
        f = Feeder()
        chunks = chunk_payloads(b"z" * 30, covered=1)  # chunk 0 itself is seq 1
        f.batch((session, chunks[0]))
        rest = chunks[1:]
    for payload in rest:
        f.batch((session, payload))
    assert f.machine.snapshots_of("refdata") == []
    # The session starts again with chunk 0 and completes.
    f.publish(session, b"z" * 30)
    assert len(f.machine.snapshots_of("refdata")) == 1


def test_a_retried_chunk_does_not_advance_the_upload_twice():
    f = Feeder()
    f.traffic(1)
    session = PREFIX + "t/r"
    chunks = chunk_payloads(b"q" * 30, covered=1)
    f.batch((session, chunks[0]))
    machine = f.machine
    # client_seq 1 again: a duplicate, answered with its number, not indexed again.
    retry = machine.apply(protocol.encode_batch(f.time_ns + SECOND, [protocol.Entry(session, 1, chunks[0])]))
    assert retry.results[0].outcome.name == "DUPLICATE"
    assert machine.snapshot_uploads[0].next_index == 1
    for payload in chunks[1:]:
        f.batch((session, payload))
    assert len(machine.snapshots_of("refdata")) == 1


def test_unfinished_uploads_and_kinds_are_bounded():
    f = Feeder()
    f.traffic(1)
    for n in range(SM_SNAPSHOT_UPLOADS_MAX + 3):
        f.batch((PREFIX + f"t/r{n}", chunk_payloads(b"u" * 30, covered=1)[0]))
    uploads = f.machine.snapshot_uploads
    assert len(uploads) == SM_SNAPSHOT_UPLOADS_MAX and uploads[0].session == PREFIX + "t/r3"
    for n in range(SM_SNAPSHOT_KINDS_MAX + 2):
        f.publish(PREFIX + f"k{n}/r", b"k", sm_type=f"kind{n}")
    kinds = [n for n in range(SM_SNAPSHOT_KINDS_MAX + 2) if f.machine.snapshots_of(f"kind{n}")]
    assert kinds == list(range(2, SM_SNAPSHOT_KINDS_MAX + 2))  # the two completed earliest went


def test_replicas_build_the_same_index_and_restore_it():
    one, two = Feeder(), Feeder()
    for f in (one, two):
        f.traffic(4)
        f.publish(PREFIX + "refdata/r1", b"a" * 55, interleave=1)
        f.publish(PREFIX + "refdata/r2", b"b" * 15)
        f.batch((PREFIX + "refdata/r3", chunk_payloads(b"c" * 30, covered=2)[0]))  # unfinished
    assert one.machine.snapshot() == two.machine.snapshot()
    restored = SequencerMachine.restore(one.machine.snapshot())
    assert restored.state_digest() == one.machine.state_digest()
    assert restored.snapshots_of("refdata") == one.machine.snapshots_of("refdata")
    assert restored.snapshot_uploads == one.machine.snapshot_uploads
    # ... and the restored copy carries on identically: the unfinished upload completes.
    two.machine = restored
    for payload in chunk_payloads(b"c" * 30, covered=2)[1:]:
        for f in (one, two):
            f.batch((PREFIX + "refdata/r3", payload))
    assert two.machine.snapshot() == one.machine.snapshot()
    assert len(one.machine.snapshots_of("refdata")) == 3


def test_a_format_1_snapshot_restores_with_an_empty_index():
    f = Feeder()
    f.traffic(3)
    snap = msgspec.msgpack.decode(f.machine.snapshot(), type=MachineSnapshot)
    sessions = [[s.session, s.last_client_seq, s.last_active_ns, s.window_seqs] for s in snap.sessions]  # no digests yet
    config = msgspec.msgpack.decode(msgspec.msgpack.encode(snap.config))[:3]  # no byte bound yet
    old = msgspec.msgpack.encode([1, config, snap.next_seq, snap.last_log_time_ns, snap.stream_crc, sessions])
    machine = SequencerMachine.restore(old)
    assert machine.last_seq == 3 and machine.snapshots_of("refdata") == []


def _indexed_snapshot() -> MachineSnapshot:
    f = Feeder()
    f.traffic(2)
    f.publish(PREFIX + "refdata/r1", b"a" * 25)
    f.publish(PREFIX + "refdata/r1", b"b" * 25)
    f.batch((PREFIX + "refdata/r2", chunk_payloads(b"c" * 30, covered=2)[0]))
    return msgspec.msgpack.decode(f.machine.snapshot(), type=MachineSnapshot)


def _bad(snap: MachineSnapshot, name: str) -> MachineSnapshot:
    infos, uploads = list(snap.snapshots), list(snap.uploads)
    replace = msgspec.structs.replace
    if name == "format_1_with_index":
        return replace(snap, format_version=1)
    if name == "oldest_first":
        return replace(snap, snapshots=infos[::-1])
    if name == "chunks_beyond_last_seq":
        return replace(snap, snapshots=[replace(infos[0], last_seq=snap.next_seq)] + infos[1:])
    if name == "covers_its_own_chunks":
        return replace(snap, snapshots=[replace(infos[0], covered_seq=infos[0].first_seq)] + infos[1:])
    if name == "fewer_numbers_than_chunks":
        return replace(snap, snapshots=[replace(infos[0], chunk_count=infos[0].last_seq - infos[0].first_seq + 2)] + infos[1:])
    if name == "not_a_snapshot_session":
        return replace(snap, snapshots=[replace(infos[0], session="oms")] + infos[1:])
    if name == "too_many_per_kind":
        extra = [replace(infos[-1], covered_seq=1, last_seq=infos[-1].first_seq + i) for i in range(SM_SNAPSHOTS_PER_KIND)]
        return replace(snap, snapshots=infos + extra)
    if name == "upload_finished":
        return replace(snap, uploads=[replace(uploads[0], next_index=uploads[0].chunk_count)])
    if name == "upload_twice":
        return replace(snap, uploads=uploads * 2)
    if name == "upload_of_ordinary_session":
        return replace(snap, uploads=[replace(uploads[0], session="oms")])
    raise AssertionError(name)


BAD_INDEXES = [
    "format_1_with_index",
    "oldest_first",
    "chunks_beyond_last_seq",
    "covers_its_own_chunks",
    "fewer_numbers_than_chunks",
    "not_a_snapshot_session",
    "too_many_per_kind",
    "upload_finished",
    "upload_twice",
    "upload_of_ordinary_session",
]


def test_the_indexed_snapshot_used_below_restores():
    snap = _indexed_snapshot()
    assert len(snap.snapshots) == 2 and len(snap.uploads) == 1
    assert SequencerMachine.restore(msgspec.msgpack.encode(snap)).snapshot() == msgspec.msgpack.encode(snap)


@pytest.mark.parametrize("name", BAD_INDEXES)
def test_restore_refuses_an_index_no_run_could_produce(name):
    with pytest.raises(SnapshotError, match="snapshot index|upload|format 1"):
        SequencerMachine.restore(msgspec.msgpack.encode(_bad(_indexed_snapshot(), name)))


def test_upload_struct_fields_are_validated_on_restore():
    snap = _indexed_snapshot()
    bad = msgspec.structs.replace(snap, uploads=[msgspec.structs.replace(snap.uploads[0], digest="NOT HEX")])
    with pytest.raises(SnapshotError):
        SequencerMachine.restore(msgspec.msgpack.encode(bad))
    assert isinstance(snap.uploads[0], SnapshotUpload)
