"""The sequenced stream of one replica: the machine that numbers it and the journal that keeps
it, applied together. ``SequencedStream.apply`` is what a replica does with each committed batch.

After a restart, Raft replays entries committed after its last snapshot of the machine state;
the journal may already hold the records they produce. ``SequencedStream.apply`` recognises those
(same numbers, same bytes) and appends only what is new. Records that differ from what the
journal holds at the same numbers mean two histories: a broken invariant, raised as
``JournalDivergenceError`` for the node to stop on.
"""

from __future__ import annotations

from raftseq.sequencer.journal import Journal, JournalCorruptError, JournalError
from raftseq.sequencer.journal.holes import held_runs
from raftseq.sequencer.journal.records import record_offsets
from raftseq.sequencer.machine import ApplyResult, SequencerMachine
from raftseq.sequencer.protocol import HEADER, HEADER_BYTES


class JournalDivergenceError(JournalError):
    """The journal holds different records at numbers the machine just produced."""

    def __init__(self, message: str, *, seq: int) -> None:
        super().__init__(message)
        self.seq = seq


class JournalBehindError(JournalError):
    """The machine state is ahead of the journal: records ``missing_from..missing_to`` must be
    fetched from a peer before this replica can append."""

    def __init__(self, missing_from: int, missing_to: int) -> None:
        super().__init__(f"journal lacks records {missing_from}..{missing_to} that the machine state covers")
        self.missing_from = missing_from
        self.missing_to = missing_to


class SequencedStream:
    """One replica's machine plus journal: the stream it has sequenced. One thread calls ``apply``."""

    def __init__(self, machine: SequencerMachine, journal: Journal) -> None:
        self.machine = machine
        self.journal = journal
        if journal.last_seq < machine.last_seq:
            raise JournalBehindError(journal.last_seq + 1, machine.last_seq)
        #: Records appended by ``apply`` (not counting those found already in the journal).
        self.records_appended = 0
        self.records_already_held = 0

    def replace_machine(self, machine: SequencerMachine) -> None:
        """Continue from `machine` (a restored snapshot). If it is ahead of the journal, the
        records in between become a hole, to be filled from a peer (``Journal.fill``)."""
        if machine.last_seq > self.journal.last_seq:
            self.journal.skip_to(machine.last_seq + 1)
        self.machine = machine

    def apply(self, batch_bytes: bytes) -> ApplyResult:
        result = self.machine.apply(batch_bytes)
        if result.first_seq:
            self._append(result)
        return result

    def _append(self, result: ApplyResult) -> None:
        journal = self.journal
        first, last, records = result.first_seq, result.last_seq, result.records
        offsets = result.offsets or None  # where each record starts, when the machine said
        held_to = min(journal.last_seq, last)
        if first <= held_to:
            # Compare what the journal holds; records inside holes are still to come from a
            # peer (catch-up brings the committed records, byte for byte, with checksums).
            # Damaged ranges likewise: catch-up repairs them from a peer.
            bounds = offsets + [len(records)] if offsets else record_offsets(records)
            missing = journal.holes
            if journal.damage:
                missing = sorted([*missing, *((d.first_seq, d.last_seq) for d in journal.damage)])
            if first < journal.first_seq:
                # Below what retention left (a Raft snapshot older than it): checked before.
                missing = [(first, journal.first_seq - 1), *missing]
            for run_first, run_last in held_runs(missing, first, held_to):
                start = bounds[run_first - first]
                end = bounds[run_last - first + 1]
                try:
                    held = journal.read_bytes(run_first, run_last)
                except JournalCorruptError as exc:  # damage no check had found yet: repaired later
                    if journal.mark_damaged(exc.seq, exc.path, exc.offset, str(exc)) is None and journal.damage.covering(exc.seq) is None:
                        raise
                    continue
                if records[start:end] != held:
                    seq = _first_difference(records[start:end], held, run_first)
                    raise JournalDivergenceError(f"journal holds a different record at seq {seq} than the replicated log produces", seq=seq)
            self.records_already_held += held_to - first + 1
            cut = held_to - first + 1
            base = bounds[cut]
            records = records[base:]
            offsets = [o - base for o in bounds[cut:-1]]
            first = held_to + 1
        if first <= last:
            journal.append(records, first, last, offsets)
            self.records_appended += last - first + 1


def _first_difference(records: bytes, held: bytes, first_seq: int) -> int:
    """Number of the first record that differs between two runs of records (which differ)."""
    pos = 0
    seq = first_seq
    while pos < len(held):
        end = pos + HEADER_BYTES + HEADER.unpack_from(held, pos)[0]
        if records[pos:end] != held[pos:end]:
            break
        pos = end
        seq += 1
    return seq
