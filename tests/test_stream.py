"""The machine and its journal together: restarts, replays, divergence, a journal behind.

A replica's story: it applies batches, Raft snapshots its machine now and then, the process
dies, and on restart Raft replays every entry after the last snapshot into a machine restored
from it, while the journal on disk already holds some (or all) of their records.
"""

from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftseq.sequencer import limits, protocol
from raftseq.sequencer.journal import Journal, JournalError, verify_journal
from raftseq.sequencer.limits import MachineConfig
from raftseq.sequencer.machine import ApplyResult, SequencerMachine
from raftseq.sequencer.stream import JournalBehindError, JournalDivergenceError, SequencedStream

SECOND = 1_000_000_000
NAMES = ["alpha", "bravo", "charlie"]
CONFIG = MachineConfig(dedup_window=8, session_idle_ns=3600 * SECOND)

# --- helpers: one per verb ------------------------------------------------------------------


def payload_of(session: str, client_seq: int, size: int = 150) -> bytes:
    text = f"{session}#{client_seq};".encode()
    return (text * (size // len(text) + 1))[:size]


def encode(time_ns: int, entries) -> bytes:
    return protocol.encode_batch(time_ns, [protocol.Entry(s, c, p) for s, c, p in entries])


def story(count: int) -> list[list[tuple[str, int, bytes]]]:
    """`count` batches of three records: each session submits its next message, and in every
    other batch bravo also retries an earlier one (a duplicate: no record)."""
    high = dict.fromkeys(NAMES, 0)
    batches = []
    for i in range(count):
        entries = []
        for name in NAMES:
            high[name] += 1
            entries.append((name, high[name], payload_of(name, high[name])))
        if i % 2 and high["bravo"] > 1:
            entries.insert(1, ("bravo", high["bravo"] - 1, b"retry"))
        batches.append(entries)
    return batches


def leader_time(i: int) -> int:
    """Leader clocks step back now and then (a new leader whose clock is behind)."""
    return (i + 1) * SECOND - (3 * SECOND if i % 5 == 4 else 0)


def encoded_story(count: int) -> list[bytes]:
    return [encode(leader_time(i), entries) for i, entries in enumerate(story(count))]


def open_journal(path) -> Journal:
    return Journal.open(str(path), segment_bytes_max=limits.SEGMENT_BYTES_MIN)


def journal_files(directory) -> dict[str, bytes]:
    files = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            files[name] = f.read()
    return files


def record_count(result: ApplyResult) -> int:
    return result.last_seq - result.first_seq + 1 if result.first_seq else 0


class Replica:
    """A node's machine and journal, with the snapshots Raft would have taken before each batch."""

    def __init__(self, directory, machine: SequencerMachine | None = None) -> None:
        self.directory = str(directory)
        self.journal = open_journal(directory)
        self.stream = SequencedStream(machine or SequencerMachine(CONFIG), self.journal)
        self.snapshots: list[bytes] = []
        self.results: list[ApplyResult] = []

    def apply_all(self, batches: list[bytes]) -> list[ApplyResult]:
        out = []
        for batch in batches:
            self.snapshots.append(self.stream.machine.snapshot())
            out.append(self.stream.apply(batch))
        self.results += out
        return out

    def kill(self) -> None:
        self.journal.close()

    @classmethod
    def killed_after(cls, directory, batches: list[bytes]) -> Replica:
        """A replica that applied `batches` (its ``results``) and was then killed."""
        replica = cls(directory)
        replica.apply_all(batches)
        replica.kill()
        return replica

    def tail_segment(self) -> str:
        """The file name of the journal's last segment."""
        return sorted(p for p in os.listdir(self.directory) if p.endswith(".seg"))[-1]

    def install(self, snapshot: bytes) -> None:
        """Raft hands this replica a snapshot (from the leader) instead of log entries."""
        self.stream.replace_machine(SequencerMachine.restore(snapshot))

    def restart_from(self, snapshot: bytes) -> Replica:
        self.kill()
        return Replica(self.directory, SequencerMachine.restore(snapshot))


def reference_run(directory, batches: list[bytes]) -> tuple[dict[str, bytes], str, list[ApplyResult]]:
    """What an uninterrupted replica ends with: its journal files, state digest and results."""
    replica = Replica(directory)
    results = replica.apply_all(batches)
    digest = replica.stream.machine.state_digest()
    replica.kill()
    return journal_files(directory), digest, results


# --- a fresh replica ------------------------------------------------------------------------


def test_fresh_replica_journals_every_record_once(tmp_path):
    batches = encoded_story(30)
    replica = Replica(tmp_path / "j")
    results = replica.apply_all(batches)
    last = replica.stream.machine.last_seq
    assert last == 90
    assert replica.stream.records_appended == last and replica.stream.records_already_held == 0
    assert replica.journal.last_seq == last
    assert replica.journal.read_bytes(1, last) == b"".join(r.records for r in results)
    assert replica.journal.segment_count > 1  # the story crosses segment boundaries
    replica.kill()
    report = verify_journal(str(tmp_path / "j"))
    assert report.ok, report.problem
    assert report.last_seq == last


def test_undecodable_or_duplicate_only_batches_append_nothing(tmp_path):
    replica = Replica(tmp_path / "j")
    replica.apply_all(encoded_story(2))
    before = replica.journal.last_seq
    assert replica.stream.apply(b"\x93\x03\x00\x90").error  # a newer batch format
    duplicates = replica.stream.apply(encode(10 * SECOND, [("alpha", 1, b"again"), ("bravo", 2, b"again")]))
    assert duplicates.first_seq == 0 and duplicates.records == b""
    assert replica.journal.last_seq == before
    assert replica.stream.records_appended == before and replica.stream.records_already_held == 0
    replica.kill()


# --- restart and replay ---------------------------------------------------------------------


@pytest.mark.parametrize("snapshot_at", [0, 1, 4, 9, 10])
def test_replay_after_restart_appends_nothing_twice(tmp_path, snapshot_at):
    batches = encoded_story(14)
    ref_files, ref_digest, ref_results = reference_run(tmp_path / "reference", batches)

    node = Replica(tmp_path / "node")
    node.apply_all(batches[:10])
    snapshots = node.snapshots + [node.stream.machine.snapshot()]
    node.kill()
    files_before = journal_files(node.directory)

    # Raft's last snapshot is from before batch `snapshot_at`; it replays everything after it.
    node = Replica(node.directory, SequencerMachine.restore(snapshots[snapshot_at]))
    replayed = node.apply_all(batches[snapshot_at:10])
    assert replayed == ref_results[snapshot_at:10], "a replay must give the same answers (acks)"
    assert node.stream.records_appended == 0
    assert node.stream.records_already_held == sum(record_count(r) for r in replayed)
    assert journal_files(node.directory) == files_before

    fresh = node.apply_all(batches[10:])
    assert fresh == ref_results[10:]
    assert node.stream.records_appended == sum(record_count(r) for r in fresh) > 0
    assert node.stream.machine.state_digest() == ref_digest
    node.kill()
    assert journal_files(node.directory) == ref_files


def test_replay_over_a_torn_tail_appends_only_the_records_cut(tmp_path):
    batches = encoded_story(10)
    ref_files, ref_digest, _ = reference_run(tmp_path / "reference", batches)

    node = Replica(tmp_path / "node")
    node.apply_all(batches)
    last_batch = node.results[-1]
    node.kill()
    # The process died in the middle of writing the last record.
    tail = node.tail_segment()
    with open(os.path.join(node.directory, tail), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 5)

    node = Replica(node.directory, SequencerMachine.restore(node.snapshots[-2]))
    assert node.journal.recovery.bytes_cut > 0
    assert node.journal.last_seq == last_batch.last_seq - 1
    node.apply_all(batches[-2:])
    # batch -2 held whole, batch -1 held but for its last record
    assert node.stream.records_appended == 1
    assert node.stream.records_already_held == record_count(node.results[0]) + record_count(last_batch) - 1
    assert node.stream.machine.state_digest() == ref_digest
    node.kill()
    assert journal_files(node.directory) == ref_files


def test_records_beyond_the_journal_end_are_appended_not_compared(tmp_path):
    batches = encoded_story(4)
    node = Replica.killed_after(tmp_path / "node", batches)
    tail = node.tail_segment()
    with open(os.path.join(node.directory, tail), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 1)
    # Raft's log (not the journal) is the truth for what the journal lost: the last entry of
    # the last batch is whatever the log says, even if the torn record said otherwise.
    entries = story(4)[-1]
    name, client_seq, _ = entries[-1]
    rewritten = encode(leader_time(3), entries[:-1] + [(name, client_seq, b"as the log has it")])
    node = Replica(node.directory, SequencerMachine.restore(node.snapshots[-1]))
    result = node.stream.apply(rewritten)
    assert node.stream.records_appended == 1
    node.kill()
    journal = open_journal(node.directory)
    assert [r.payload for r in journal.records(result.last_seq, result.last_seq)] == [b"as the log has it"]
    journal.close()


# --- divergence -----------------------------------------------------------------------------


def _diverging(entries, which: str) -> tuple[bytes, int]:
    """Batch index 3 of the story, changed so that one of its records differs from what was
    journaled; also returns that record's position among the batch's records."""
    entries = list(entries)
    if which == "log_time":
        return encode(leader_time(3) + 1, entries), 0
    recorded = [i for i, entry in enumerate(entries) if entry[2] != b"retry"]
    position = {"first_record": 0, "middle_record": 1, "last_record": len(recorded) - 1}[which]
    name, client_seq, payload = entries[recorded[position]]
    changed = payload + b"longer" if which == "middle_record" else payload[:-1] + b"!"
    entries[recorded[position]] = (name, client_seq, changed)
    return encode(leader_time(3), entries), position


@pytest.mark.parametrize("which", ["first_record", "middle_record", "last_record", "log_time"])
def test_divergent_replay_names_the_first_differing_seq(tmp_path, which):
    batches = encoded_story(6)
    node = Replica.killed_after(tmp_path / "node", batches)
    results = node.results
    files_before = journal_files(node.directory)

    node = Replica(node.directory, SequencerMachine.restore(node.snapshots[3]))
    data, position = _diverging(story(6)[3], which)
    with pytest.raises(JournalDivergenceError) as caught:
        node.stream.apply(data)
    expected_seq = results[3].first_seq + position
    assert caught.value.seq == expected_seq
    assert f"seq {expected_seq}" in str(caught.value)
    assert isinstance(caught.value, JournalError)
    assert node.stream.records_appended == 0
    node.kill()
    assert journal_files(node.directory) == files_before


def test_divergence_in_a_batch_the_journal_holds_in_part(tmp_path):
    batches = encoded_story(4)
    node = Replica.killed_after(tmp_path / "node", batches)
    results = node.results
    tail = node.tail_segment()
    with open(os.path.join(node.directory, tail), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 1)
    entries = story(4)[-1]
    name, client_seq, payload = entries[0]
    entries[0] = (name, client_seq, b"another history")

    node = Replica(node.directory, SequencerMachine.restore(node.snapshots[-1]))
    assert node.journal.last_seq == results[-1].last_seq - 1  # the torn record was cut on open
    files_before = journal_files(node.directory)
    with pytest.raises(JournalDivergenceError) as caught:
        node.stream.apply(encode(leader_time(3), entries))
    assert caught.value.seq == results[-1].first_seq
    node.kill()
    assert journal_files(node.directory) == files_before


# --- a journal behind the machine -----------------------------------------------------------


def _machine_after(batches: list[bytes]) -> SequencerMachine:
    machine = SequencerMachine(CONFIG)
    for batch in batches:
        machine.apply(batch)
    return machine


def test_empty_journal_behind_the_machine_names_the_whole_range(tmp_path):
    machine = _machine_after(encoded_story(5))
    journal = open_journal(tmp_path / "j")
    with pytest.raises(JournalBehindError) as caught:
        SequencedStream(machine, journal)
    assert (caught.value.missing_from, caught.value.missing_to) == (1, machine.last_seq)
    assert f"1..{machine.last_seq}" in str(caught.value)
    assert isinstance(caught.value, JournalError)
    journal.close()
    assert journal_files(tmp_path / "j") == {}


def test_short_journal_behind_the_machine_names_the_missing_range(tmp_path):
    batches = encoded_story(8)
    node = Replica(tmp_path / "node")
    node.apply_all(batches[:3])
    held = node.journal.last_seq
    node.kill()
    files_before = journal_files(node.directory)
    machine = _machine_after(batches)  # e.g. a Raft snapshot installed from the leader
    journal = open_journal(node.directory)
    with pytest.raises(JournalBehindError) as caught:
        SequencedStream(machine, journal)
    assert (caught.value.missing_from, caught.value.missing_to) == (held + 1, machine.last_seq)
    journal.close()
    assert journal_files(node.directory) == files_before


def test_journal_level_with_or_ahead_of_the_machine_is_accepted(tmp_path):
    batches = encoded_story(4)
    node = Replica.killed_after(tmp_path / "node", batches)
    for snapshot in (node.snapshots[-1], node.stream.machine.snapshot()):
        journal = open_journal(node.directory)
        SequencedStream(SequencerMachine.restore(snapshot), journal)
        journal.close()


# --- a snapshot from the leader: a hole in the journal -------------------------------------


def _lagging_node_given_a_snapshot(tmp_path):
    """A node that journaled batches 0..2, then received the leader's snapshot taken after
    batch 6 instead of the log entries, then applied batches 7..9."""
    batches = encoded_story(10)
    ref_files, ref_digest, ref_results = reference_run(tmp_path / "reference", batches)
    node = Replica(tmp_path / "node")
    node.apply_all(batches[:3])
    leader = Replica(tmp_path / "leader")
    leader.apply_all(batches[:7])
    node.install(leader.stream.machine.snapshot())
    leader.kill()
    return batches, node, ref_results, ref_digest


def test_snapshot_from_the_leader_leaves_a_hole_then_appends_after_it(tmp_path):
    batches, node, ref_results, ref_digest = _lagging_node_given_a_snapshot(tmp_path)
    hole = (ref_results[3].first_seq, ref_results[6].last_seq)
    assert node.journal.holes == [hole]
    assert node.journal.contiguous_last_seq == hole[0] - 1
    fresh = node.apply_all(batches[7:])
    assert fresh == ref_results[7:]
    before_hole, after_hole = hole[0] - 1, ref_results[-1].last_seq - hole[1]
    assert node.stream.records_appended == before_hole + after_hole  # nothing inside the hole
    assert node.stream.machine.state_digest() == ref_digest

    # Catch-up brings the hole's records from a peer; then the stream is the leader's, whole.
    reference = open_journal(tmp_path / "reference")
    node.journal.fill(reference.read_bytes(hole[0], hole[1]), hole[0], hole[1])
    last = reference.last_seq
    assert node.journal.holes == [] and node.journal.last_seq == last
    assert node.journal.read_bytes(1, last) == reference.read_bytes(1, last)
    reference.close()
    node.kill()
    assert verify_journal(node.directory).ok


def test_restart_with_a_hole_replays_into_it_without_appending(tmp_path):
    batches, node, ref_results, _ = _lagging_node_given_a_snapshot(tmp_path)
    node.apply_all(batches[7:])
    node.kill()
    files_before = journal_files(node.directory)
    # The node restarts from its own old snapshot (before batch 1): Raft replays 1..9.
    node = node.restart_from(node.snapshots[1])
    replayed = node.apply_all(batches[1:])
    assert replayed == ref_results[1:]
    assert node.stream.records_appended == 0
    assert node.stream.records_already_held == sum(record_count(r) for r in ref_results[1:])
    node.kill()
    assert journal_files(node.directory) == files_before


def test_restart_on_a_journal_with_a_trailing_hole_is_not_behind(tmp_path):
    _, node, ref_results, _ = _lagging_node_given_a_snapshot(tmp_path)
    installed = node.stream.machine.snapshot()
    node = node.restart_from(installed)  # SequencedStream accepts it: the hole counts as held
    assert node.journal.last_seq == node.stream.machine.last_seq == ref_results[6].last_seq
    node.kill()


def test_divergence_beside_a_hole_is_still_detected(tmp_path):
    # The journal holds part of batch 3 (its tail was torn), then a leader snapshot makes the
    # rest of batch 3 and batches 4..6 a hole. A replay of batch 3 that differs in a record
    # the journal does hold must still be caught.
    batches = encoded_story(7)
    node = Replica(tmp_path / "node")
    results = node.apply_all(batches[:4])
    node.kill()
    tail = node.tail_segment()
    with open(os.path.join(node.directory, tail), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 1)
    snapshots = node.snapshots
    node = Replica(node.directory, SequencerMachine.restore(snapshots[3]))
    node.install(_machine_after(batches).snapshot())
    assert node.journal.holes == [(results[3].last_seq, node.stream.machine.last_seq)]
    node = node.restart_from(snapshots[3])
    files_before = journal_files(node.directory)
    data, position = _diverging(story(7)[3], "first_record")
    with pytest.raises(JournalDivergenceError) as caught:
        node.stream.apply(data)
    assert caught.value.seq == results[3].first_seq + position
    node.kill()
    assert journal_files(node.directory) == files_before


# --- restarts at random points --------------------------------------------------------------


@st.composite
def restart_plans(draw):
    """Batches with retries and gaps, a point where the node dies, and how old its snapshot is."""
    high = dict.fromkeys(NAMES, 0)
    batches = []
    for i in range(draw(st.integers(1, 12))):
        entries = []
        for _ in range(draw(st.integers(0, 5))):
            name = draw(st.sampled_from(NAMES))
            kind = draw(st.sampled_from(["next", "next", "next", "retry", "gap"]))
            if kind == "retry" and high[name]:
                client_seq = draw(st.integers(1, high[name]))
            elif kind == "gap":
                client_seq = high[name] + 2
            else:
                high[name] += 1
                client_seq = high[name]
            entries.append((name, client_seq, payload_of(name, client_seq, draw(st.integers(0, 600)))))
        batches.append(encode(draw(st.integers(0, 50)) * SECOND, entries))
    died_after = draw(st.integers(0, len(batches)))
    snapshot_at = draw(st.integers(0, died_after))
    return batches, died_after, snapshot_at


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=restart_plans())
def test_any_restart_ends_with_the_uninterrupted_journal(plan):
    batches, died_after, snapshot_at = plan
    with tempfile.TemporaryDirectory() as tmp:
        ref_files, ref_digest, ref_results = reference_run(os.path.join(tmp, "reference"), batches)
        node = Replica(os.path.join(tmp, "node"))
        node.apply_all(batches[:died_after])
        snapshots = node.snapshots + [node.stream.machine.snapshot()]
        node = node.restart_from(snapshots[snapshot_at])
        results = node.apply_all(batches[snapshot_at:])
        assert results == ref_results[snapshot_at:]
        replayed = sum(record_count(r) for r in ref_results[snapshot_at:died_after])
        assert node.stream.records_already_held == replayed
        assert node.stream.records_appended == sum(record_count(r) for r in ref_results[died_after:])
        assert node.stream.machine.state_digest() == ref_digest
        node.kill()
        assert journal_files(node.directory) == ref_files
