"""The deterministic state machine: numbering, dedup, log time, expiry, snapshots.

Scenario tests read as a session's story; property tests drive random histories (retries,
duplicates inside a batch, gaps, interleaved sessions, leader clocks that go backwards)
through two or three replicas and through a reference model written here, independently of
``sequencer.machine``.
"""

from __future__ import annotations

import os
import tempfile
import zlib

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from raftseq.sequencer import limits, protocol
from raftseq.sequencer.journal import Journal
from raftseq.sequencer.limits import MachineConfig
from raftseq.sequencer.stream import SequencedStream
from raftseq.sequencer.machine import (
    SNAPSHOT_FORMAT_VERSION,
    ApplyResult,
    EntryResult,
    MachineSnapshot,
    Outcome,
    SequencerMachine,
    SessionSnapshot,
    SnapshotError,
)
from raftseq.sequencer.protocol import RejectReason

SECOND = 1_000_000_000
SESSION_NAMES = ["alpha", "bravo", "charlie", "delta", "echo", "fox"]

# --- helpers: one per verb ------------------------------------------------------------------


def payload_of(session: str, client_seq: int) -> bytes:
    return f"{session}#{client_seq}".encode()


def encode(time_ns: int, entries) -> bytes:
    """A Raft log entry holding `entries`, each ``(session, client_seq, payload)``."""
    return protocol.encode_batch(time_ns, [protocol.Entry(s, c, p) for s, c, p in entries])


def submit(machine: SequencerMachine, time_ns: int, *submits) -> ApplyResult:
    """Apply one batch; each submit is ``(session, client_seq)`` or ``(session, client_seq, payload)``."""
    entries = [(s[0], s[1], s[2] if len(s) > 2 else payload_of(s[0], s[1])) for s in submits]
    result = machine.apply(encode(time_ns, entries))
    assert not result.error, result.error
    return result


def split_records(blob: bytes) -> list[protocol.Delivered]:
    """Decode the journal records of an ``ApplyResult``, checking each frame's checksum."""
    out = []
    pos = 0
    while pos < len(blob):
        length, crc = protocol.HEADER.unpack_from(blob, pos)
        body = blob[pos + protocol.HEADER_BYTES : pos + protocol.HEADER_BYTES + length]
        assert len(body) == length, "torn record in ApplyResult.records"
        assert zlib.crc32(body) == crc, "record checksum mismatch"
        out.append(protocol.decode_delivered_body(body))
        pos += protocol.HEADER_BYTES + length
    return out


def journal_files(directory: str) -> dict[str, bytes]:
    files = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            files[name] = f.read()
    return files


def sequenced(result: ApplyResult) -> list[int]:
    return [r.seq for r in result.results if r.outcome is Outcome.SEQUENCED]


# --- a reference model, written from DESIGN.md section 1 and the machine's docstring --------


class ReferenceSequencer:
    """The same decisions as ``SequencerMachine``, by the plainest code: dictionaries, no
    window structure, expiry as "forget every session idle too long", eviction as "while the
    table is full, forget the least recently active session if it is idle long enough"."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self.next_seq = 1
        self.log_time = 0
        self.last: dict[str, int] = {}
        self.active: dict[str, int] = {}
        self.seq_of: dict[tuple[str, int], int] = {}
        self.payload_of: dict[tuple[str, int], bytes] = {}
        self.expired: list[str] = []  # forgotten by the last apply

    def forget(self, name: str) -> None:
        del self.last[name], self.active[name]
        self.seq_of = {k: v for k, v in self.seq_of.items() if k[0] != name}

    def room_for(self, name: str) -> bool:
        config = self.config
        while (
            len(self.last) >= config.sessions_max
            or sum(map(config.session_bytes, self.last)) + config.session_bytes(name) > config.session_table_bytes_max
        ):
            oldest = next(iter(self.active), None)
            if oldest is None or self.active[oldest] > self.log_time - config.session_evict_idle_ns:
                return False
            self.forget(oldest)
        return True

    def apply(self, time_ns: int, entries) -> tuple[list[EntryResult], list[tuple]]:
        self.log_time = max(self.log_time, time_ns)
        horizon = self.log_time - self.config.session_idle_ns
        self.expired = [name for name, t in self.active.items() if t < horizon]
        for name in self.expired:
            self.forget(name)
        results, records = [], []
        for name, client_seq, payload in entries:
            if name not in self.last:
                if not protocol.is_session_name(name):
                    results.append(EntryResult(name, client_seq, Outcome.REJECTED, 0, RejectReason.BAD_FRAME))
                    continue
                if client_seq != 1:
                    results.append(EntryResult(name, client_seq, Outcome.REJECTED, 0, RejectReason.SEQUENCE_GAP, 1))
                    continue
                if not self.room_for(name):
                    results.append(EntryResult(name, client_seq, Outcome.REJECTED, 0, RejectReason.TOO_MANY_SESSIONS))
                    continue
                self.last[name] = 0
            last = self.last[name]
            if client_seq == last + 1:
                seq = self.next_seq
                self.next_seq += 1
                self.last[name] = client_seq
                self.active.pop(name, None)  # to the end: the most recently active
                self.active[name] = self.log_time
                self.seq_of[(name, client_seq)] = seq
                self.payload_of[(name, client_seq)] = payload
                records.append((seq, self.log_time, name, client_seq, payload))
                results.append(EntryResult(name, client_seq, Outcome.SEQUENCED, seq))
            elif client_seq <= last - self.config.dedup_window:
                results.append(EntryResult(name, client_seq, Outcome.REJECTED, 0, RejectReason.STALE_CLIENT_SEQ))
            elif client_seq <= last and self.payload_of[(name, client_seq)] != payload:
                results.append(EntryResult(name, client_seq, Outcome.REJECTED, 0, RejectReason.SESSION_CONFLICT))
            elif client_seq <= last:
                results.append(EntryResult(name, client_seq, Outcome.DUPLICATE, self.seq_of[(name, client_seq)]))
            else:
                results.append(EntryResult(name, client_seq, Outcome.REJECTED, 0, RejectReason.SEQUENCE_GAP, last + 1))
        return results, records


# --- strategies -----------------------------------------------------------------------------


@st.composite
def small_configs(draw):
    """Small tables that fill up: by count or by bytes, with eviction ages up to the idle age."""
    window = draw(st.integers(1, 5))
    idle_ns = draw(st.integers(1 * SECOND, 20 * SECOND))
    one = MachineConfig(dedup_window=window).session_bytes("s" * limits.SESSION_BYTES_MAX)
    return MachineConfig(
        sessions_max=draw(st.integers(1, 6)),
        dedup_window=window,
        session_idle_ns=idle_ns,
        session_table_bytes_max=draw(st.integers(one, 6 * one)),
        session_evict_idle_ns=draw(st.integers(1 * SECOND, idle_ns)),
    )


small_configs = small_configs()
configs = st.one_of(small_configs, st.just(MachineConfig()))

time_steps = st.one_of(
    st.just(0),
    st.integers(-3 * SECOND, 3 * SECOND),  # leader clocks disagree: sometimes backwards
    st.integers(1 * SECOND, 30 * SECOND),  # idle stretches that expire sessions
)


@st.composite
def histories(draw, max_batches: int = 16, max_entries: int = 8):
    """A list of batches ``(leader_time_ns, [(session, client_seq, payload), ...])``.

    Clients mostly submit their next number, but also retry earlier ones, repeat an entry
    inside one batch, skip ahead, or start over at 1 (a session the sequencer expired).
    """
    names = SESSION_NAMES[: draw(st.integers(1, len(SESSION_NAMES)))]
    high = dict.fromkeys(names, 0)
    time_ns = draw(st.integers(0, 100 * SECOND))
    batches = []
    for _ in range(draw(st.integers(0, max_batches))):
        time_ns = max(0, time_ns + draw(time_steps))
        entries: list[tuple[str, int, bytes]] = []
        for _ in range(draw(st.integers(0, max_entries))):
            name = draw(st.sampled_from(names))
            kind = draw(st.sampled_from(["next", "next", "next", "next", "retry", "repeat", "gap", "restart"]))
            if kind == "repeat" and entries:
                entries.append(draw(st.sampled_from(entries)))
                continue
            if kind == "retry" and high[name]:
                client_seq = draw(st.integers(1, high[name]))
            elif kind == "gap":
                client_seq = high[name] + draw(st.integers(2, 4))
            elif kind == "restart":
                high[name] = client_seq = 1
            else:
                high[name] += 1
                client_seq = high[name]
            payload = draw(st.one_of(st.just(payload_of(name, client_seq)), st.binary(max_size=12)))
            entries.append((name, client_seq, payload))
        batches.append((time_ns, entries))
    return batches


FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- 1. replicas agree ----------------------------------------------------------------------


@FAST
@given(config=configs, history=histories(), cut=st.integers(0, 1000))
def test_replicas_fed_the_same_batches_agree_byte_for_byte(config, history, cut):
    batches = [encode(t, entries) for t, entries in history]
    cut %= len(batches) + 1
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [os.path.join(tmp, "r1"), os.path.join(tmp, "r2")]
        journals = [Journal.open(d, segment_bytes_max=limits.SEGMENT_BYTES_MIN) for d in dirs]
        cores = [SequencedStream(SequencerMachine(config), j) for j in journals]
        one, two = (c.machine for c in cores)
        snapshot = one.snapshot() if cut == 0 else None
        results = []
        for i, batch in enumerate(batches):
            first, second = (c.apply(batch) for c in cores)
            assert first == second
            assert first.records == second.records
            assert one.state_digest() == two.state_digest()
            results.append(first)
            if i + 1 == cut:
                snapshot = one.snapshot()
        assert one.snapshot() == two.snapshot()
        for j in journals:
            j.close()
        stream = b"".join(r.records for r in results)
        files = [journal_files(d) for d in dirs]
        assert files[0] == files[1]
        segments = b"".join(data for name, data in files[0].items() if name.endswith(".seg"))
        assert segments == stream

    # A third replica starts from a snapshot taken part way and applies the rest.
    third = SequencerMachine.restore(snapshot)
    assert third.snapshot() == snapshot
    rest = [third.apply(batch) for batch in batches[cut:]]
    assert rest == results[cut:]
    assert b"".join(r.records for r in rest) == b"".join(r.records for r in results[cut:])
    assert third.state_digest() == one.state_digest()


# --- 2. exactly once ------------------------------------------------------------------------


@FAST
@given(config=configs, history=histories())
def test_machine_decides_as_the_reference_model(config, history):
    machine = SequencerMachine(config)
    model = ReferenceSequencer(config)
    stream_crc = 0
    for time_ns, entries in history:
        result = machine.apply(encode(time_ns, entries))
        expected_results, expected_records = model.apply(time_ns, entries)
        if model.expired:
            event("sessions expired")
        for answer in expected_results:
            event(f"answer: {answer.reason.value if answer.reason else answer.outcome.name}")
        assert result.error == ""
        assert result.results == expected_results
        assert result.log_time_ns == model.log_time
        expected_blob = b"".join(protocol.encode_frame(protocol.Delivered(*r)) for r in expected_records)
        assert result.records == expected_blob
        stream_crc = zlib.crc32(expected_blob, stream_crc)
        assert machine.stream_crc == stream_crc, "stream_crc is not the CRC-32 of the stream so far"
        if expected_records:
            assert (result.first_seq, result.last_seq) == (expected_records[0][0], expected_records[-1][0])
        else:
            assert (result.first_seq, result.last_seq) == (0, 0)
        assert machine.last_seq == model.next_seq - 1
        assert machine.session_count == len(model.last)
        for name in SESSION_NAMES:
            assert machine.last_client_seq(name) == model.last.get(name, 0)
        for (name, client_seq), seq in model.seq_of.items():
            in_window = client_seq > model.last[name] - config.dedup_window
            assert machine.seq_of(name, client_seq) == (seq if in_window else None)


class ClientModel:
    """One application session: numbers its messages 1..total, resubmits what is unacknowledged."""

    def __init__(self, name: str, total: int) -> None:
        self.name = name
        self.total = total
        self.sent_high = 0
        self.acked: dict[int, int] = {}  # client_seq -> seq
        self.applied_unknown_seq: set[int] = set()  # answered stale: applied, number unknown

    def resolved(self, client_seq: int) -> bool:
        return client_seq in self.acked or client_seq in self.applied_unknown_seq

    def unresolved(self) -> list[int]:
        return [c for c in range(1, self.total + 1) if not self.resolved(c)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), window=st.integers(1, 6), totals=st.lists(st.integers(1, 10), min_size=1, max_size=4))
def test_retries_and_duplicates_sequence_each_submit_exactly_once(data, window, totals):
    machine = SequencerMachine(MachineConfig(dedup_window=window))
    clients = {SESSION_NAMES[i]: ClientModel(SESSION_NAMES[i], total) for i, total in enumerate(totals)}
    records: list[protocol.Delivered] = []
    seq_of: dict[tuple[str, int], int] = {}
    last: dict[str, int] = {}  # from the records: highest client_seq applied per session
    time_ns = 0

    def apply(entries, *, answers_may_be_lost: bool = True) -> None:
        nonlocal time_ns
        time_ns += 1000
        result = machine.apply(encode(time_ns, [(s, c, payload_of(s, c)) for s, c in entries]))
        assert not result.error
        assert len(result.results) == len(entries)
        new = split_records(result.records)
        records.extend(new)
        by_seq = {r.seq: r for r in new}
        outcome_lost = answers_may_be_lost and data.draw(st.booleans(), label="answers lost")
        for (name, client_seq), answer in zip(entries, result.results):
            event(f"answer: {answer.reason.value if answer.reason else answer.outcome.name}")
            before = last.get(name, 0)
            if answer.outcome is Outcome.SEQUENCED:
                assert client_seq == before + 1, "sequenced out of client_seq order"
                record = by_seq[answer.seq]
                assert (record.session, record.client_seq) == (name, client_seq)
                seq_of[(name, client_seq)] = answer.seq
                last[name] = client_seq
            elif answer.outcome is Outcome.DUPLICATE:
                assert before - window < client_seq <= before
                assert answer.seq == seq_of[(name, client_seq)], "a retry got a number it never had"
            elif answer.reason is RejectReason.STALE_CLIENT_SEQ:
                assert client_seq <= before - window
            else:
                assert answer.reason is RejectReason.SEQUENCE_GAP
                assert client_seq > before + 1
                assert answer.expected_client_seq == before + 1
            if outcome_lost:
                continue  # leader lost before answering: outcome unknown, the client resubmits
            client = clients[name]
            if answer.outcome in (Outcome.SEQUENCED, Outcome.DUPLICATE):
                assert client.acked.setdefault(client_seq, answer.seq) == answer.seq
            elif answer.reason is RejectReason.STALE_CLIENT_SEQ:
                client.applied_unknown_seq.add(client_seq)

    for _ in range(data.draw(st.integers(0, 25), label="rounds")):
        entries = []
        for _ in range(data.draw(st.integers(0, 6), label="submits")):
            client = clients[data.draw(st.sampled_from(sorted(clients)), label="session")]
            action = data.draw(st.sampled_from(["new", "new", "unacked", "any"]), label="action")
            if action == "new" and client.sent_high < client.total:
                client.sent_high += 1
                entries.append((client.name, client.sent_high))
            elif action == "unacked" and [c for c in client.unresolved() if c <= client.sent_high]:
                pending = [c for c in client.unresolved() if c <= client.sent_high]
                entries.append((client.name, data.draw(st.sampled_from(pending), label="resubmit")))
            elif client.sent_high:
                entries.append((client.name, data.draw(st.integers(1, client.sent_high), label="retry")))
        if data.draw(st.booleans(), label="batch lost before commit"):
            continue  # never applied: Raft did not commit it
        apply(entries)

    # Every client resubmits all it has not seen acknowledged, in client_seq order, and this
    # time hears the answers: one round settles everything.
    apply([(c.name, s) for c in clients.values() for s in c.unresolved()], answers_may_be_lost=False)
    assert not any(c.unresolved() for c in clients.values()), "resubmitting the unacknowledged did not settle"

    assert [r.seq for r in records] == list(range(1, len(records) + 1)), "numbers are not 1..N gapless"
    for name, client in clients.items():
        mine = [r.client_seq for r in records if r.session == name]
        assert mine == list(range(1, client.total + 1)), f"{name}: not exactly once, in order"
        for client_seq, seq in client.acked.items():
            assert seq_of[(name, client_seq)] == seq


def test_first_submits_of_two_sessions_are_numbered_from_one():
    machine = SequencerMachine()
    result = submit(machine, 10, ("alpha", 1), ("bravo", 1), ("alpha", 2))
    assert sequenced(result) == [1, 2, 3]
    assert (result.first_seq, result.last_seq) == (1, 3)
    assert [(r.seq, r.session, r.client_seq) for r in split_records(result.records)] == [
        (1, "alpha", 1),
        (2, "bravo", 1),
        (3, "alpha", 2),
    ]
    assert machine.last_seq == 3


def test_retry_inside_the_window_is_answered_with_its_original_number():
    machine = SequencerMachine(MachineConfig(dedup_window=3))
    submit(machine, 10, ("alpha", 1), ("bravo", 1), ("alpha", 2), ("alpha", 3))
    retry = submit(machine, 20, ("alpha", 1), ("alpha", 3), ("alpha", 2))
    assert retry.results == [
        EntryResult("alpha", 1, Outcome.DUPLICATE, 1),
        EntryResult("alpha", 3, Outcome.DUPLICATE, 4),
        EntryResult("alpha", 2, Outcome.DUPLICATE, 3),
    ]
    assert retry.records == b"" and retry.first_seq == 0 and machine.last_seq == 4


def test_repeat_inside_one_batch_is_a_duplicate_of_the_first():
    machine = SequencerMachine()
    result = submit(machine, 10, ("alpha", 1), ("alpha", 1), ("alpha", 2))
    assert result.results == [
        EntryResult("alpha", 1, Outcome.SEQUENCED, 1),
        EntryResult("alpha", 1, Outcome.DUPLICATE, 1),
        EntryResult("alpha", 2, Outcome.SEQUENCED, 2),
    ]
    assert [r.payload for r in split_records(result.records)] == [b"alpha#1", b"alpha#2"]


# --- sessions: payload digests, fencing, the table's bound (docs/sessions.md) ----------------


def test_a_retry_with_another_payload_is_a_session_conflict_never_a_duplicate():
    """Defect: two clients on one session; the second one's client_seq 1 (another payload)
    was acknowledged as a duplicate of the first one's: acknowledged, and in no journal."""
    machine = SequencerMachine()
    submit(machine, 10, ("alpha", 1, b"from client a"), ("alpha", 2, b"a2"))
    result = submit(machine, 20, ("alpha", 1, b"from client b"), ("alpha", 1, b"from client a"), ("alpha", 2, b"b2"))
    assert result.results == [
        EntryResult("alpha", 1, Outcome.REJECTED, 0, RejectReason.SESSION_CONFLICT),
        EntryResult("alpha", 1, Outcome.DUPLICATE, 1),
        EntryResult("alpha", 2, Outcome.REJECTED, 0, RejectReason.SESSION_CONFLICT),
    ]
    assert machine.last_seq == 2


def fenced(name: str, client_seq: int, owner: int, *, claim: bool = False, payload: bytes = b"") -> protocol.FencedEntry:
    return protocol.FencedEntry(name, client_seq, payload or payload_of(name, client_seq), owner, claim)


def test_a_newer_claim_takes_the_session_over_and_the_older_owner_is_refused():
    machine = SequencerMachine()
    a, b = 11, 22
    first = machine.apply(protocol.encode_batch(10, [fenced("x", 1, a, claim=True), fenced("x", 2, a)], fenced=True))
    assert [r.outcome for r in first.results] == [Outcome.SEQUENCED] * 2 and machine.owner_of("x") == a
    taken = machine.apply(protocol.encode_batch(20, [fenced("x", 3, b, claim=True), fenced("x", 4, a), fenced("x", 4, b)], fenced=True))
    assert taken.results == [
        EntryResult("x", 3, Outcome.SEQUENCED, 3),
        EntryResult("x", 4, Outcome.REJECTED, 0, RejectReason.SESSION_TAKEN_OVER),
        EntryResult("x", 4, Outcome.SEQUENCED, 4),
    ]
    assert machine.owner_of("x") == b
    # Entries without an owner (a client that predates fencing) are not fenced.
    assert submit(machine, 30, ("x", 5)).results == [EntryResult("x", 5, Outcome.SEQUENCED, 5)]
    # The owner survives a snapshot.
    assert SequencerMachine.restore(machine.snapshot()).owner_of("x") == b


def test_the_digest_a_client_sends_is_the_one_kept_and_compared():
    """A client computes ``payload_digest`` itself (so that no node hashes its payloads); a
    retry is compared against it, whoever computed the retry's digest."""
    machine = SequencerMachine()
    mine, other = b"my payload", b"another client's payload"
    sent = protocol.FencedEntry("x", 1, mine, 5, True, protocol.payload_digest(mine))
    machine.apply(protocol.encode_batch(10, [sent], fenced=True))
    retries = [
        protocol.Entry("x", 1, mine),  # digest computed by the machine: the same
        protocol.FencedEntry("x", 1, mine, 5, False, protocol.payload_digest(mine)),
        protocol.FencedEntry("x", 1, other, 6, True, protocol.payload_digest(other)),
    ]
    result = machine.apply(protocol.encode_batch(20, retries, fenced=True))
    assert result.results == [
        EntryResult("x", 1, Outcome.DUPLICATE, 1),
        EntryResult("x", 1, Outcome.DUPLICATE, 1),
        EntryResult("x", 1, Outcome.REJECTED, 0, RejectReason.SESSION_CONFLICT),
    ]


@st.composite
def fenced_batches(draw, max_batches: int = 8, max_runs: int = 6):
    """Batches ``(leader_time_ns, [FencedEntry, ...])`` made of runs: a few entries of one
    session and owner, most often with consecutive client_seqs (as a SubmitBatch brings them),
    some with a claim, a retry, a gap, another payload, or no digest (0: the machine hashes)."""
    names = SESSION_NAMES[: draw(st.integers(1, 3))]
    high = dict.fromkeys(names, 0)
    time_ns = draw(st.integers(0, 100 * SECOND))
    batches = []
    for _ in range(draw(st.integers(1, max_batches))):
        time_ns = max(0, time_ns + draw(time_steps))
        entries = []
        for _ in range(draw(st.integers(0, max_runs))):
            name = draw(st.sampled_from(names))
            owner = draw(st.sampled_from([0, 7, 7, 8]))
            claim = draw(st.booleans())
            start = draw(st.sampled_from(["next", "next", "next", "retry", "gap", "restart"]))
            if start == "retry" and high[name]:
                client_seq = draw(st.integers(1, high[name]))
            elif start == "gap":
                client_seq = high[name] + 2
            elif start == "restart":
                client_seq = 1
            else:
                client_seq = high[name] + 1
            for i in range(draw(st.integers(1, 7))):
                payload = payload_of(name, client_seq + i) if draw(st.integers(0, 9)) else b"other"
                digest = draw(st.sampled_from([protocol.payload_digest(payload), protocol.payload_digest(payload), 0, 3]))
                entries.append(protocol.FencedEntry(name, client_seq + i, payload, owner, claim and i == 0, digest))
                high[name] = max(high[name], client_seq + i)
        batches.append((time_ns, entries))
    return batches


@FAST
@given(config=configs, history=fenced_batches())
def test_a_batch_decides_as_its_entries_applied_one_by_one(config, history):
    """The machine numbers a run of one session's entries in one go: a batch must give the
    same answers, records and state as its entries applied one at a time (at the same log
    time), fencing, claims, retries, gaps and digests included."""
    batched = SequencerMachine(config)
    single = SequencerMachine(config)
    for time_ns, entries in history:
        result = batched.apply(protocol.encode_batch(time_ns, entries, fenced=True))
        single.apply(protocol.encode_batch(time_ns, [], fenced=True))  # the log time, even for no entry
        ones = [single.apply(protocol.encode_batch(time_ns, [entry], fenced=True)) for entry in entries]
        assert not result.error
        assert result.results == [r for one in ones for r in one.results]
        assert result.records == b"".join(one.records for one in ones)
        if result.first_seq:
            assert result.offsets == [len(result.records[:i]) for i in _record_starts(result.records)]
        assert batched.snapshot() == single.snapshot()


def _record_starts(blob: bytes) -> list[int]:
    """Where each framed record of `blob` starts."""
    starts, pos = [], 0
    while pos < len(blob):
        starts.append(pos)
        pos += protocol.HEADER_BYTES + protocol.HEADER.unpack_from(blob, pos)[0]
    return starts


def test_the_first_owner_of_a_session_claims_it_even_without_the_claim_flag():
    machine = SequencerMachine()
    machine.apply(protocol.encode_batch(10, [fenced("x", 1, 5)], fenced=True))
    assert machine.owner_of("x") == 5
    refused = machine.apply(protocol.encode_batch(10, [fenced("x", 2, 6)], fenced=True))
    assert refused.results == [EntryResult("x", 2, Outcome.REJECTED, 0, RejectReason.SESSION_TAKEN_OVER)]


def test_a_full_table_evicts_the_least_recently_active_session_idle_long_enough():
    config = MachineConfig(sessions_max=2, session_idle_ns=3600 * SECOND, session_evict_idle_ns=60 * SECOND)
    machine = SequencerMachine(config)
    submit(machine, 0, ("alpha", 1))
    submit(machine, 10 * SECOND, ("bravo", 1))
    # Full, and nobody idle for 60 s: the newcomer is refused, nobody is evicted.
    refused = submit(machine, 59 * SECOND, ("charlie", 1))
    assert refused.results == [EntryResult("charlie", 1, Outcome.REJECTED, 0, RejectReason.TOO_MANY_SESSIONS)]
    assert machine.session_count == 2 and machine.sessions_evicted == 0
    # alpha idle for 60 s: it goes (least recently active), charlie comes in; bravo stays.
    admitted = submit(machine, 60 * SECOND, ("charlie", 1))
    assert admitted.results == [EntryResult("charlie", 1, Outcome.SEQUENCED, 3)]
    assert machine.last_client_seq("alpha") == 0 and machine.last_client_seq("bravo") == 1
    assert machine.sessions_evicted == 1


def test_the_table_is_bounded_by_bytes_counting_a_full_window_per_session():
    one = MachineConfig(dedup_window=64).session_bytes("s-0")
    config = MachineConfig(dedup_window=64, session_table_bytes_max=3 * one, session_evict_idle_ns=60 * SECOND)
    machine = SequencerMachine(config)
    results = submit(machine, 0, *[(f"s-{i}", 1) for i in range(4)]).results
    assert [r.outcome for r in results] == [Outcome.SEQUENCED] * 3 + [Outcome.REJECTED]
    assert results[3].reason is RejectReason.TOO_MANY_SESSIONS
    assert machine.session_table_bytes == 3 * one <= config.session_table_bytes_max
    # A session's window filling up never changes what the table counts.
    submit(machine, SECOND, *[("s-0", c) for c in range(2, 200)])
    assert machine.session_table_bytes == 3 * one
    assert SequencerMachine.restore(machine.snapshot()).session_table_bytes == 3 * one


def test_the_window_ring_answers_every_retry_it_holds_after_wrapping_and_restore():
    machine = SequencerMachine(MachineConfig(dedup_window=5))
    submit(machine, 10, *[("alpha", c) for c in range(1, 13)])
    for m in (machine, SequencerMachine.restore(machine.snapshot())):
        assert [m.seq_of("alpha", c) for c in range(6, 14)] == [None, None, 8, 9, 10, 11, 12, None]
        retries = submit(m, 20, *[("alpha", c) for c in (8, 12)], ("alpha", 9, b"not the payload"), ("alpha", 7))
        assert retries.results == [
            EntryResult("alpha", 8, Outcome.DUPLICATE, 8),
            EntryResult("alpha", 12, Outcome.DUPLICATE, 12),
            EntryResult("alpha", 9, Outcome.REJECTED, 0, RejectReason.SESSION_CONFLICT),
            EntryResult("alpha", 7, Outcome.REJECTED, 0, RejectReason.STALE_CLIENT_SEQ),
        ]


def test_a_format_2_snapshot_restores_with_unknown_digests_and_no_owners():
    """A snapshot of the previous format (no digests, no owners, no byte bound): restored,
    its sessions' retries answered as before (their digests are unknown), new ones checked."""
    old = SequencerMachine()
    submit(old, 10, ("alpha", 1), ("alpha", 2))
    snap = msgspec.msgpack.decode(old.snapshot())
    snap[0] = 2
    snap[1] = snap[1][:3]  # the config of format 2
    snap[5] = [session[:4] for session in snap[5]]  # sessions without digests and owner
    machine = SequencerMachine.restore(msgspec.msgpack.encode(snap))
    assert machine.config == MachineConfig()
    result = submit(machine, 20, ("alpha", 1, b"another payload"), ("alpha", 3), ("alpha", 3, b"another payload"))
    assert result.results == [
        EntryResult("alpha", 1, Outcome.DUPLICATE, 1),
        EntryResult("alpha", 3, Outcome.SEQUENCED, 3),
        EntryResult("alpha", 3, Outcome.REJECTED, 0, RejectReason.SESSION_CONFLICT),
    ]


def test_retry_older_than_the_window_is_stale():
    machine = SequencerMachine(MachineConfig(dedup_window=2))
    submit(machine, 10, *[("alpha", c) for c in range(1, 6)])
    result = submit(machine, 20, ("alpha", 3), ("alpha", 4), ("alpha", 5))
    assert result.results == [
        EntryResult("alpha", 3, Outcome.REJECTED, 0, RejectReason.STALE_CLIENT_SEQ),
        EntryResult("alpha", 4, Outcome.DUPLICATE, 4),
        EntryResult("alpha", 5, Outcome.DUPLICATE, 5),
    ]
    assert machine.seq_of("alpha", 3) is None and machine.seq_of("alpha", 4) == 4


def test_skipping_ahead_is_a_gap_expecting_the_next_number():
    machine = SequencerMachine()
    submit(machine, 10, ("alpha", 1), ("alpha", 2))
    result = submit(machine, 20, ("alpha", 5), ("alpha", 3), ("alpha", 5))
    assert result.results == [
        EntryResult("alpha", 5, Outcome.REJECTED, 0, RejectReason.SEQUENCE_GAP, 3),
        EntryResult("alpha", 3, Outcome.SEQUENCED, 3),
        EntryResult("alpha", 5, Outcome.REJECTED, 0, RejectReason.SEQUENCE_GAP, 4),
    ]
    assert machine.last_client_seq("alpha") == 3


def test_unknown_session_starting_above_one_is_a_gap_expecting_one():
    machine = SequencerMachine()
    result = submit(machine, 10, ("alpha", 7))
    assert result.results == [EntryResult("alpha", 7, Outcome.REJECTED, 0, RejectReason.SEQUENCE_GAP, 1)]
    assert machine.session_count == 0 and machine.last_seq == 0 and result.records == b""


# --- 3. log time ----------------------------------------------------------------------------


@FAST
@given(times=st.lists(st.integers(0, 2**63 - 1) | st.integers(0, 50), max_size=30))
def test_log_time_never_decreases_even_when_the_leader_clock_does(times):
    machine = SequencerMachine()
    previous = 0
    for i, time_ns in enumerate(times):
        result = submit(machine, time_ns, (f"s{i}", 1))
        assert result.log_time_ns == max(previous, time_ns)
        records = split_records(result.records)
        assert [r.log_time_ns for r in records] == [result.log_time_ns]
        previous = result.log_time_ns
        assert machine.last_log_time_ns == previous
    # an undecodable batch reports the current log time and leaves it alone
    assert machine.apply(b"\xc1").log_time_ns == previous


def test_log_time_going_back_does_not_expire_or_revive_anything():
    machine = SequencerMachine(MachineConfig(session_idle_ns=10 * SECOND))
    submit(machine, 100 * SECOND, ("alpha", 1))
    result = submit(machine, 5 * SECOND, ("bravo", 1))
    assert result.log_time_ns == 100 * SECOND
    assert split_records(result.records)[0].log_time_ns == 100 * SECOND
    submit(machine, 109 * SECOND, ("charlie", 1))
    assert machine.session_count == 3  # bravo was active at log time 100 s, not 5 s


# --- 4. session expiry ----------------------------------------------------------------------


def test_idle_sessions_are_forgotten_by_log_time_least_recently_active_first():
    machine = SequencerMachine(MachineConfig(session_idle_ns=10 * SECOND))
    submit(machine, 0, ("alpha", 1))  # seq 1
    submit(machine, 1 * SECOND, ("bravo", 1))  # seq 2
    submit(machine, 2 * SECOND, ("charlie", 1))  # seq 3
    submit(machine, 3 * SECOND, ("alpha", 2))  # seq 4: alpha is now the most recently active
    submit(machine, 9 * SECOND, ("alpha", 2))  # a duplicate is not activity

    def known() -> list[str]:
        return [s for s in ("alpha", "bravo", "charlie") if machine.last_client_seq(s)]

    submit(machine, 11 * SECOND)  # exactly 10 s idle is not too long
    assert known() == ["alpha", "bravo", "charlie"]
    submit(machine, 11 * SECOND + 1)
    assert known() == ["alpha", "charlie"]  # bravo, idle longest, goes first (not alpha, older)
    submit(machine, 12 * SECOND + 1)
    assert known() == ["alpha"]
    submit(machine, 13 * SECOND + 1)
    assert known() == []
    # a forgotten session starts again at 1
    result = submit(machine, 13 * SECOND + 2, ("bravo", 2), ("bravo", 1))
    assert result.results == [
        EntryResult("bravo", 2, Outcome.REJECTED, 0, RejectReason.SEQUENCE_GAP, 1),
        EntryResult("bravo", 1, Outcome.SEQUENCED, 5),
    ]


def test_a_new_session_with_a_bad_name_is_refused_and_changes_nothing():
    machine = SequencerMachine(MachineConfig())
    submit(machine, 0, ("alpha", 1))
    before = machine.state_digest()
    result = submit(machine, 1, ("bad\nname", 1), ("é", 1), ("alpha", 2))
    assert result.results == [
        EntryResult("bad\nname", 1, Outcome.REJECTED, 0, RejectReason.BAD_FRAME),
        EntryResult("é", 1, Outcome.REJECTED, 0, RejectReason.BAD_FRAME),
        EntryResult("alpha", 2, Outcome.SEQUENCED, 2),
    ]
    assert machine.session_count == 1 and machine.last_client_seq("bad\nname") == 0
    refused_only = submit(machine, 2, ("bad\nname", 1))
    assert refused_only.first_seq == 0 and refused_only.records == b""
    assert before != machine.state_digest()  # alpha's second message moved it on


def test_active_sessions_are_kept_however_long_the_log_runs():
    machine = SequencerMachine(MachineConfig(session_idle_ns=10 * SECOND))
    for step in range(1, 30):
        submit(machine, step * 5 * SECOND, ("alpha", step))
    assert machine.last_client_seq("alpha") == 29
    assert machine.session_count == 1


def test_too_many_sessions_until_expiry_frees_room():
    machine = SequencerMachine(MachineConfig(sessions_max=2, session_idle_ns=10 * SECOND))
    submit(machine, 0, ("alpha", 1))
    result = submit(machine, 5 * SECOND, ("bravo", 1), ("charlie", 1), ("charlie", 2))
    assert result.results[1:] == [
        EntryResult("charlie", 1, Outcome.REJECTED, 0, RejectReason.TOO_MANY_SESSIONS),
        EntryResult("charlie", 2, Outcome.REJECTED, 0, RejectReason.SEQUENCE_GAP, 1),
    ]
    assert machine.session_count == 2
    # known sessions go on while the table is full
    assert sequenced(submit(machine, 6 * SECOND, ("alpha", 2))) == [3]
    # alpha last active at 6 s, bravo at 5 s: bravo is the one forgotten
    result = submit(machine, 15 * SECOND + 1, ("charlie", 1))
    assert sequenced(result) == [4]
    assert machine.last_client_seq("bravo") == 0 and machine.last_client_seq("alpha") == 2


def _activity_story(machine: SequencerMachine) -> None:
    """Sessions created alpha..echo, then made active in a different order."""
    for i, name in enumerate(SESSION_NAMES[:5]):
        submit(machine, i * SECOND, (name, 1))
    for i, name in enumerate(["charlie", "alpha", "echo"]):
        submit(machine, (10 + i) * SECOND, (name, 2))


def test_expiry_order_survives_snapshot_and_restore():
    config = MachineConfig(session_idle_ns=20 * SECOND)
    original = SequencerMachine(config)
    _activity_story(original)
    snap = msgspec.msgpack.decode(original.snapshot(), type=MachineSnapshot)
    assert [s.session for s in snap.sessions] == ["bravo", "delta", "charlie", "alpha", "echo"]
    restored = SequencerMachine.restore(original.snapshot())
    survivors = []
    for time_ns in [21 * SECOND + 1, 23 * SECOND + 1, 30 * SECOND + 1, 31 * SECOND + 1, 32 * SECOND + 1]:
        for machine in (original, restored):
            submit(machine, time_ns)
        assert original.state_digest() == restored.state_digest()
        survivors.append([s for s in SESSION_NAMES[:5] if restored.last_client_seq(s)])
    assert survivors == [
        ["alpha", "charlie", "delta", "echo"],
        ["alpha", "charlie", "echo"],
        ["alpha", "echo"],
        ["echo"],
        [],
    ]


@FAST
@given(history=histories(max_batches=12), idle_s=st.integers(1, 20), sessions_max=st.integers(1, 6))
def test_expiry_is_the_same_on_every_replica_and_after_restore(history, idle_s, sessions_max):
    config = MachineConfig(sessions_max=sessions_max, session_idle_ns=idle_s * SECOND)
    one, two = SequencerMachine(config), SequencerMachine(config)
    for time_ns, entries in history:
        batch = encode(time_ns, entries)
        assert one.apply(batch) == two.apply(batch)
        assert one.session_count == two.session_count
        two = SequencerMachine.restore(two.snapshot())  # a replica restarting between every batch
        assert one.state_digest() == two.state_digest()


# --- 5. apply never raises ------------------------------------------------------------------


def _seeded_machine() -> SequencerMachine:
    machine = SequencerMachine(MachineConfig(dedup_window=4))
    submit(machine, 50 * SECOND, ("alpha", 1), ("alpha", 2), ("bravo", 1))
    return machine


def _assert_refused_without_effect(machine: SequencerMachine, data: bytes) -> None:
    before = machine.state_digest()
    result = machine.apply(data)
    assert result.error, "a broken batch must be reported"
    assert result.results == [] and result.records == b""
    assert (result.first_seq, result.last_seq) == (0, 0)
    assert result.log_time_ns == machine.last_log_time_ns
    assert machine.state_digest() == before


@FAST
@given(data=st.binary(max_size=300))
def test_apply_never_raises_on_arbitrary_bytes(data):
    machine = _seeded_machine()
    before = machine.state_digest()
    result = machine.apply(data)  # must not raise
    assert isinstance(result, ApplyResult)
    if result.error:
        assert result.results == [] and result.records == b""
        assert machine.state_digest() == before


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@FAST
@given(value=msgpack_values)
def test_apply_never_raises_on_arbitrary_msgpack(value):
    machine = _seeded_machine()
    before = machine.state_digest()
    result = machine.apply(msgspec.msgpack.encode(value))
    if result.error:
        assert machine.state_digest() == before
        assert result.results == []


def _good_entry() -> list:
    return ["charlie", 1, b"payload"]


# Each mutation turns a well-formed batch (as a plain msgpack list) into one apply must refuse.
WRONG_BATCHES = {
    "format_version_newer": lambda b: [protocol.BATCH_FORMAT_FENCED + 1, *b[1:]],
    "format_version_zero": lambda b: [0, *b[1:]],
    "format_version_text": lambda b: ["1", *b[1:]],
    "not_an_array": lambda b: {"format_version": 1, "leader_time_ns": b[1], "entries": b[2]},
    "too_short": lambda b: b[:2],
    "time_negative": lambda b: [b[0], -1, b[2]],
    "time_too_large": lambda b: [b[0], 2**63, b[2]],
    "time_float": lambda b: [b[0], 1.5, b[2]],
    "time_text": lambda b: [b[0], "now", b[2]],
    "entries_not_a_list": lambda b: [b[0], b[1], _good_entry()],
    "entry_too_short": lambda b: [b[0], b[1], [["charlie", 1]]],
    "entry_not_a_list": lambda b: [b[0], b[1], ["charlie"]],
    "client_seq_zero": lambda b: [b[0], b[1], [["charlie", 0, b"x"]]],
    "client_seq_negative": lambda b: [b[0], b[1], [["charlie", -3, b"x"]]],
    "client_seq_too_large": lambda b: [b[0], b[1], [["charlie", 2**63, b"x"]]],
    "client_seq_bool": lambda b: [b[0], b[1], [["charlie", True, b"x"]]],
    "client_seq_text": lambda b: [b[0], b[1], [["charlie", "1", b"x"]]],
    "session_empty": lambda b: [b[0], b[1], [["", 1, b"x"]]],
    "session_too_long": lambda b: [b[0], b[1], [["s" * (limits.SESSION_BYTES_MAX + 1), 1, b"x"]]],
    "session_bytes": lambda b: [b[0], b[1], [[b"charlie", 1, b"x"]]],
    "payload_text": lambda b: [b[0], b[1], [["charlie", 1, "x"]]],
    "payload_oversize": lambda b: [b[0], b[1], [["charlie", 1, b"x" * (limits.PAYLOAD_BYTES_MAX + 1)]]],
    "too_many_entries": lambda b: [b[0], b[1], [["charlie", 1, b""]] * (limits.BATCH_ENTRIES_MAX + 1)],
    "one_bad_entry_among_good": lambda b: [b[0], b[1], [_good_entry(), ["delta", 0, b"x"], ["echo", 1, b"y"]]],
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutation=st.sampled_from(sorted(WRONG_BATCHES)),
    time_ns=st.integers(0, 100 * SECOND),
    extra=st.lists(st.tuples(st.sampled_from(SESSION_NAMES), st.integers(1, 3), st.binary(max_size=8)), max_size=4),
)
def test_apply_refuses_wrong_batches_without_changing_state(mutation, time_ns, extra):
    good = [protocol.BATCH_FORMAT_VERSION, time_ns, [_good_entry(), *[list(e) for e in extra]]]
    machine = _seeded_machine()
    assert not machine.apply(msgspec.msgpack.encode(good)).error  # the unmutated batch is fine
    _assert_refused_without_effect(machine, msgspec.msgpack.encode(WRONG_BATCHES[mutation](good)))


@pytest.mark.parametrize("name", ["char lie", "charlié", "a\nb", "a\x00b", "charlie\n"])
def test_apply_refuses_an_entry_whose_new_session_name_is_not_allowed(name):
    """A name of the right length is decoded; the machine refuses it when the session would
    start, and nothing about sessions or numbers changes. (A regex `$` would also match before
    a final newline: the pattern must not let a control character reach the journal, the
    session table and one-line logs.)"""
    machine = _seeded_machine()
    sessions_before = machine.session_count
    result = machine.apply(encode(50 * SECOND, [(name, 1, b"x")]))
    assert not result.error
    assert result.results == [EntryResult(name, 1, Outcome.REJECTED, 0, RejectReason.BAD_FRAME)]
    assert result.records == b"" and (result.first_seq, result.last_seq) == (0, 0)
    assert machine.session_count == sessions_before and machine.next_seq == 4


@pytest.mark.parametrize(
    "data",
    [
        b"\x93\x01\x00\x91\x93\xa1\xff\x01\xc4\x00",  # session: a string that is not UTF-8
        b"\x93\x01\x00\x91\x93\xa2\xc3\x28\x01\xc4\x00",  # an invalid two-byte sequence
        b"\x93\x01\x00\x91\x93\xa3ab\xed\x01\xc4\x00",  # cut inside a multi-byte character
    ],
    ids=["lone_ff", "bad_continuation", "truncated_sequence"],
)
def test_apply_refuses_a_session_that_is_not_utf8(data):
    _assert_refused_without_effect(_seeded_machine(), data)


@FAST
@given(
    entries=st.lists(st.tuples(st.sampled_from(SESSION_NAMES), st.integers(1, 3), st.binary(max_size=6)), min_size=1, max_size=4),
    where=st.integers(0, 10**6),
    value=st.integers(0, 255),
)
def test_apply_never_raises_on_a_corrupted_batch(entries, where, value):
    data = bytearray(encode(60 * SECOND, entries))
    data[where % len(data)] = value
    machine = _seeded_machine()
    before = machine.state_digest()
    result = machine.apply(bytes(data))  # must not raise
    if result.error:
        assert result.results == [] and machine.state_digest() == before


def test_apply_refuses_a_batch_above_the_byte_limit():
    machine = _seeded_machine()
    payload = b"x" * 1100
    entries = [(f"s{i}", 1, payload) for i in range(limits.BATCH_ENTRIES_MAX)]
    data = encode(60 * SECOND, entries)
    assert len(data) > limits.BATCH_BYTES_MAX
    _assert_refused_without_effect(machine, data)


# --- 6. snapshots and configuration ---------------------------------------------------------


def _valid_snapshot(**changes) -> MachineSnapshot:
    """The state after alpha#1=1, bravo#1=2, alpha#2=3, alpha#3=4 (at 10 s), bravo#2=5 (at 20 s)."""
    snap = MachineSnapshot(
        format_version=SNAPSHOT_FORMAT_VERSION,
        config=MachineConfig(sessions_max=5, dedup_window=2, session_idle_ns=60 * SECOND),
        next_seq=6,
        last_log_time_ns=30 * SECOND,
        stream_crc=12345,
        sessions=[
            SessionSnapshot("alpha", 3, 10 * SECOND, [3, 4], [7, 8], 99),
            SessionSnapshot("bravo", 2, 20 * SECOND, [2, 5], [5, 6]),
        ],
    )
    return msgspec.structs.replace(snap, **changes)


def _sessions(*sessions) -> list[SessionSnapshot]:
    """Sessions of the current format: (name, last client_seq, last active, window[, digests])."""
    return [SessionSnapshot(*s) if len(s) > 4 else SessionSnapshot(*s, [1] * len(s[3])) for s in sessions]


def test_the_valid_snapshot_used_below_restores():
    machine = SequencerMachine.restore(msgspec.msgpack.encode(_valid_snapshot()))
    assert machine.last_seq == 5 and machine.seq_of("alpha", 3) == 4 and machine.seq_of("bravo", 1) == 2
    assert machine.seq_of("alpha", 1) is None
    assert machine.snapshot() == msgspec.msgpack.encode(_valid_snapshot())


BAD_SNAPSHOTS = {
    "newer_format": dict(format_version=SNAPSHOT_FORMAT_VERSION + 1),
    "older_format": dict(format_version=0),
    "bad_config": dict(config=MachineConfig(sessions_max=0)),
    "next_seq_zero": dict(next_seq=0, sessions=[]),
    "log_time_negative": dict(last_log_time_ns=-1, sessions=[]),
    "duplicated_session": dict(sessions=_sessions(("alpha", 1, 1, [1]), ("alpha", 2, 2, [2]))),
    "window_seq_at_next_seq": dict(sessions=_sessions(("alpha", 2, 1, [5, 6]))),
    "window_seq_zero": dict(sessions=_sessions(("alpha", 2, 1, [0, 1]))),
    "window_seq_negative": dict(sessions=_sessions(("alpha", 1, 1, [-1]))),
    "window_longer_than_dedup_window": dict(sessions=_sessions(("alpha", 3, 1, [1, 2, 3]))),
    "window_longer_than_client_seq": dict(sessions=_sessions(("alpha", 1, 1, [1, 2]))),
    "sessions_not_in_activity_order": dict(sessions=_sessions(("alpha", 1, 20, [1]), ("bravo", 1, 10, [2]))),
    "digests_fewer_than_the_window": dict(sessions=_sessions(("alpha", 2, 1, [1, 2], [1]))),
    "digest_negative": dict(sessions=_sessions(("alpha", 1, 1, [1], [-1]))),
    "digests_in_format_2": dict(format_version=2, config=MachineConfig(sessions_max=5), sessions=_sessions(("alpha", 1, 1, [1]))),
    "table_over_its_byte_bound": dict(
        config=MachineConfig(dedup_window=2, session_table_bytes_max=MachineConfig(dedup_window=2).session_bytes("s" * 128)),
        sessions=_sessions(("alpha", 1, 1, [1]), ("bravo", 1, 2, [2])),
    ),
    "more_sessions_than_sessions_max": dict(
        config=MachineConfig(sessions_max=1), sessions=_sessions(("alpha", 1, 1, [1]), ("bravo", 1, 2, [2]))
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_SNAPSHOTS))
def test_restore_rejects_an_inconsistent_snapshot(name):
    with pytest.raises(SnapshotError):
        SequencerMachine.restore(msgspec.msgpack.encode(_valid_snapshot(**BAD_SNAPSHOTS[name])))


# States no run of the machine can reach; restoring one would make this replica answer
# retries or expire sessions differently from the history that produced the stream.
UNREACHABLE_SNAPSHOTS = {
    # a retry of alpha#2 would be answered "duplicate, seq 4" and alpha#3 "seq 3"
    "window_seqs_not_increasing": dict(sessions=_sessions(("alpha", 3, 10 * SECOND, [4, 3]), ("bravo", 2, 20 * SECOND, [2, 5]))),
    # one sequence number claimed by two submits
    "seq_in_two_sessions": dict(sessions=_sessions(("alpha", 3, 10 * SECOND, [3, 4]), ("bravo", 2, 20 * SECOND, [2, 4]))),
    # a session active after the log's own time does not expire on schedule
    "session_active_after_log_time": dict(sessions=_sessions(("alpha", 3, 10 * SECOND, [3, 4]), ("bravo", 2, 31 * SECOND, [2, 5]))),
    # the window always holds min(last_client_seq, dedup_window) numbers: a short one turns
    # retries that other replicas answer as duplicates into stale_client_seq
    "window_shorter_than_it_must_be": dict(sessions=_sessions(("alpha", 3, 10 * SECOND, [4]), ("bravo", 2, 20 * SECOND, [2, 5]))),
}


@pytest.mark.parametrize("name", sorted(UNREACHABLE_SNAPSHOTS))
def test_restore_rejects_a_snapshot_no_history_produces(name):
    with pytest.raises(SnapshotError):
        SequencerMachine.restore(msgspec.msgpack.encode(_valid_snapshot(**UNREACHABLE_SNAPSHOTS[name])))


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"\xc1", msgspec.msgpack.encode([]), msgspec.msgpack.encode({"next_seq": 1}), b"\x96" + b"\x01" * 5],
)
def test_restore_rejects_garbage(data):
    with pytest.raises(SnapshotError):
        SequencerMachine.restore(data)


def _real_snapshot() -> bytes:
    machine = SequencerMachine(MachineConfig(dedup_window=3))
    submit(machine, 10, ("alpha", 1), ("alpha", 2), ("bravo", 1))
    return machine.snapshot()


def test_restore_rejects_every_truncation_of_a_real_snapshot():
    data = _real_snapshot()
    for end in range(len(data)):
        with pytest.raises(SnapshotError):
            SequencerMachine.restore(data[:end])


def test_restore_rejects_a_session_name_that_is_not_utf8():
    data = msgspec.msgpack.encode(_valid_snapshot())
    assert data.count(b"\xa5alpha") == 1
    with pytest.raises(SnapshotError):
        SequencerMachine.restore(data.replace(b"\xa5alpha", b"\xa5alph\xff"))


@FAST
@given(where=st.integers(0, 10**6), value=st.integers(0, 255))
def test_restore_of_a_corrupted_snapshot_raises_only_snapshot_error(where, value):
    data = bytearray(_real_snapshot())
    data[where % len(data)] = value
    try:
        machine = SequencerMachine.restore(bytes(data))
    except SnapshotError:
        return
    machine.apply(encode(machine.last_log_time_ns, [("alpha", 3, b"x")]))  # a usable machine


@FAST
@given(data=st.binary(max_size=200) | msgpack_values.map(msgspec.msgpack.encode))
def test_restore_raises_only_snapshot_error(data):
    try:
        machine = SequencerMachine.restore(data)
    except SnapshotError:
        return
    # Whatever restores must be a working machine whose own snapshot restores again.
    assert SequencerMachine.restore(machine.snapshot()).state_digest() == machine.state_digest()
    machine.apply(encode(machine.last_log_time_ns, [("alpha", 1, b"x")]))


@FAST
@given(config=configs, history=histories(max_batches=10))
def test_snapshot_round_trip_is_exact(config, history):
    machine = SequencerMachine(config)
    for time_ns, entries in history:
        machine.apply(encode(time_ns, entries))
    restored = SequencerMachine.restore(machine.snapshot())
    assert restored.snapshot() == machine.snapshot()
    assert restored.state_digest() == machine.state_digest()
    assert restored.config == config


BAD_CONFIGS = {
    "sessions_max_zero": dict(sessions_max=0),
    "sessions_max_negative": dict(sessions_max=-1),
    "sessions_max_too_large": dict(sessions_max=10_000_001),
    "dedup_window_zero": dict(dedup_window=0),
    "dedup_window_too_large": dict(dedup_window=1_000_001),
    "session_idle_below_one_second": dict(session_idle_ns=999_999_999),
    "session_idle_negative": dict(session_idle_ns=-1),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_machine_config_is_refused(name):
    changes = BAD_CONFIGS[name]
    config = MachineConfig(**changes)
    problems = config.problems()
    assert len(problems) == 1
    field = next(iter(changes))
    assert field in problems[0]
    with pytest.raises(ValueError, match=field):
        SequencerMachine(config)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        dict(sessions_max=1, dedup_window=1, session_idle_ns=1_000_000_000),
        dict(sessions_max=10_000_000, dedup_window=1_000_000),
    ],
)
def test_machine_config_at_its_bounds_is_accepted(changes):
    config = MachineConfig(**changes)
    assert config.problems() == []
    assert SequencerMachine(config).config == config


def test_several_config_problems_are_all_named():
    problems = MachineConfig(sessions_max=0, dedup_window=0, session_idle_ns=0).problems()
    assert len(problems) == 3
    assert any("sessions_max" in p for p in problems)
    assert any("dedup_window" in p for p in problems)
    assert any("session_idle_ns" in p for p in problems)
